//! [`OrchestratorHandler`]: the agent's answers to control calls, from its
//! orchestrator (and therefore its per-app locks) and its registry list.

use std::sync::Arc;

use async_trait::async_trait;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, watch, Mutex};

use super::protocol::{
    self, params_of, Call, InstallTarget, RpcError, INTERNAL_ERROR, SERVER_ERROR, UNAVAILABLE, UNKNOWN_REGISTRY,
};
use super::ControlHandler;
use crate::dataroot::DataRoot;
use crate::orchestrator::{ContainerOrchestrator, Orchestrator, OrchestratorError};
use crate::registry::commands::{self as registry_commands, AddError, TestError};
use crate::registry::{RegistryError, StoreError};

/// How `reconcile-now` reaches the reconcile loop: the handler sends a
/// reply slot and waits; the loop runs a pass (or lets the caller join the
/// pass under way) and sends the pass report, as JSON, into every slot it
/// took. Dropping a slot unanswered fails that call.
pub type ReconcileNow = mpsc::Sender<oneshot::Sender<Value>>;

/// A [`ReconcileNow`] for a loop that takes reply slots of its own report
/// type: a task forwards each request to `loop_tx` and sends the report on
/// as JSON. Requests are forwarded as they come, so the loop may answer
/// several with one pass. Call it inside the runtime; the task ends when
/// the handler or the loop goes away.
pub fn reconcile_bridge<R: Serialize + Send + 'static>(loop_tx: mpsc::Sender<oneshot::Sender<R>>) -> ReconcileNow {
    let (tx, mut rx) = mpsc::channel::<oneshot::Sender<Value>>(16);
    tokio::spawn(async move {
        while let Some(reply) = rx.recv().await {
            let (report_tx, report_rx) = oneshot::channel();
            if loop_tx.send(report_tx).await.is_err() {
                // The loop has stopped; dropping `reply` fails the call.
                break;
            }
            tokio::spawn(async move {
                if let Ok(report) = report_rx.await {
                    let json = serde_json::to_value(&report)
                        .unwrap_or_else(|e| json!({ "error": format!("cannot encode the pass report: {e}") }));
                    let _ = reply.send(json);
                }
            });
        }
    });
    tx
}

/// Answers calls with the agent's own orchestrator, so calls over the
/// socket share its per-app locks with everything else the agent does.
pub struct OrchestratorHandler {
    pub orch: Arc<Orchestrator>,
    /// Where the registry list lives (`<data>/config/registries.json`).
    pub data_root: DataRoot,
    /// `None` when nothing reconciles (then `reconcile-now` is refused).
    pub reconcile_now: Option<ReconcileNow>,
    /// Registry changes read, modify and rewrite one file: two at once
    /// would lose one.
    registry_lock: Mutex<()>,
    /// What the agent is busy with before its loop starts ("importing
    /// images (2 of 5)"), `None` once it is done: `status` and `list` say
    /// it, and app changes wait for it to end ([`OrchestratorHandler::with_busy`]).
    busy: Option<watch::Receiver<Option<String>>>,
    /// The OS boot status file `os.status` reads (boot.json).
    os_boot_status: std::path::PathBuf,
}

impl OrchestratorHandler {
    /// A handler over `orch`, with the registry list under its data root.
    pub fn new(orch: Arc<Orchestrator>, reconcile_now: Option<ReconcileNow>) -> OrchestratorHandler {
        let data_root = orch.config().data_root.clone();
        OrchestratorHandler {
            orch,
            data_root,
            reconcile_now,
            registry_lock: Mutex::new(()),
            busy: None,
            os_boot_status: std::path::PathBuf::from(crate::os::records::BOOT_JSON),
        }
    }

    /// Reads the OS boot status for `os.status` from `path` (tests).
    pub fn with_os_boot_status(mut self, path: std::path::PathBuf) -> OrchestratorHandler {
        self.os_boot_status = path;
        self
    }

    /// Says what the agent is busy with (`Some`) until it is done (`None`):
    /// meanwhile `status` and `list` carry it in each app's `agent` field,
    /// and calls that change an app wait for it (the pre-pulled images an
    /// install needs are what is being imported).
    pub fn with_busy(mut self, busy: watch::Receiver<Option<String>>) -> OrchestratorHandler {
        self.busy = Some(busy);
        self
    }

    fn busy_now(&self) -> Option<String> {
        self.busy.as_ref().and_then(|b| b.borrow().clone())
    }

    /// Returns once the agent is no longer busy (or can no longer say).
    async fn until_idle(&self) {
        if let Some(busy) = &self.busy {
            let mut busy = busy.clone();
            // An error is a sender gone: nothing left to wait for.
            let _ = busy.wait_for(Option::is_none).await;
        }
    }

    async fn reconcile(&self) -> Result<Value, RpcError> {
        let Some(loop_tx) = &self.reconcile_now else {
            return Err(RpcError::new(
                UNAVAILABLE,
                "reconcile-now needs the running agent: this server has no reconcile loop",
            ));
        };
        let (reply, report) = oneshot::channel();
        loop_tx
            .send(reply)
            .await
            .map_err(|_| RpcError::new(UNAVAILABLE, "the reconcile loop has stopped"))?;
        report
            .await
            .map_err(|_| RpcError::new(SERVER_ERROR, "the reconcile pass ended without a report"))
    }
}

/// The result as JSON. Only a map with non-string keys fails to convert,
/// and no result type has one.
fn to_json(value: &impl Serialize) -> Result<Value, RpcError> {
    serde_json::to_value(value).map_err(|e| RpcError::new(INTERNAL_ERROR, format!("cannot encode the result: {e}")))
}

fn orch<T: Serialize>(outcome: Result<T, OrchestratorError>) -> Result<Value, RpcError> {
    to_json(&outcome.map_err(|e| protocol::from_orchestrator(&e))?)
}

/// What start/stop/restart/remove answer: the trait gives nothing back,
/// and a status would be a second engine call that could fail on its own.
fn done(app: &str, outcome: Result<(), OrchestratorError>, what: &str) -> Result<Value, RpcError> {
    outcome.map_err(|e| protocol::from_orchestrator(&e))?;
    Ok(json!({ "app": app, "done": what }))
}

fn store_error(e: &StoreError, known: impl FnOnce() -> Vec<String>) -> RpcError {
    match e {
        StoreError::UnknownName(name) => RpcError::server(e)
            .with_code(UNKNOWN_REGISTRY)
            .with_data(json!({ "name": name, "known": known() })),
        _ => RpcError::server(e),
    }
}

fn add_error(e: &AddError) -> RpcError {
    const METHOD: &str = "registry.add";
    let param = match e {
        AddError::Invalid(RegistryError::BadName(_)) => "name",
        AddError::Invalid(RegistryError::BadUrl(_)) => "url",
        AddError::Invalid(RegistryError::EmptyUsername | RegistryError::BadUsername) | AddError::MissingUsername => {
            "username"
        }
        AddError::Invalid(RegistryError::EmptyPassword) | AddError::MissingPassword => "password",
        AddError::Store(e) => return store_error(e, Vec::new),
    };
    RpcError::invalid_params(METHOD, param, e, params_of(METHOD))
}

impl OrchestratorHandler {
    fn known_registries(&self) -> Vec<String> {
        registry_commands::listing(&self.data_root)
            .map(|l| l.registries.into_iter().map(|r| r.name).collect())
            .unwrap_or_default()
    }
}

#[async_trait]
impl ControlHandler for OrchestratorHandler {
    async fn handle(&self, call: Call) -> Result<Value, RpcError> {
        let o = &*self.orch;
        if matches!(
            call,
            Call::Install(_)
                | Call::Start { .. }
                | Call::Stop { .. }
                | Call::Restart { .. }
                | Call::Remove { .. }
                | Call::Upgrade { .. }
        ) {
            self.until_idle().await;
        }
        match call {
            Call::Install(InstallTarget::App(app)) => orch(o.install(&app).await),
            Call::Install(InstallTarget::Manifest(path)) => orch(o.install_from_path(&path).await),
            Call::Start { app } => done(&app, o.start(&app).await, "started"),
            Call::Stop { app } => done(&app, o.stop(&app).await, "stopped"),
            Call::Restart { app } => done(&app, o.restart(&app).await, "restarted"),
            Call::Remove { app } => done(&app, o.remove(&app).await, "removed"),
            Call::Upgrade { app } => orch(o.upgrade(&app).await),
            Call::Status { app } => orch(o.status(&app).await.map(|mut s| {
                s.agent = self.busy_now();
                s
            })),
            Call::List => orch(o.list().await.map(|mut list| {
                let busy = self.busy_now();
                for s in &mut list {
                    s.agent.clone_from(&busy);
                }
                list
            })),
            Call::Logs { app, tail } => orch(o.logs(&app, tail).await),
            Call::Health { app } => orch(o.health(&app).await),
            Call::RegistryList => {
                let listing = registry_commands::listing(&self.data_root).map_err(|e| store_error(&e, Vec::new))?;
                to_json(&listing)
            }
            Call::RegistryAdd(new) => {
                let _guard = self.registry_lock.lock().await;
                to_json(&registry_commands::add_registry(&self.data_root, new).map_err(|e| add_error(&e))?)
            }
            Call::RegistryRemove { name } => {
                let _guard = self.registry_lock.lock().await;
                let removed = registry_commands::remove_registry(&self.data_root, &name)
                    .map_err(|e| store_error(&e, || self.known_registries()))?;
                to_json(&removed)
            }
            Call::RegistryTest { name } => {
                let results = registry_commands::test_registries(&self.data_root, name.as_deref())
                    .await
                    .map_err(|e| match &e {
                        TestError::Store(store) => store_error(store, || self.known_registries()),
                        TestError::Setup(_) => RpcError::server(&e),
                    })?;
                to_json(&results)
            }
            Call::ReconcileNow => self.reconcile().await,
            // `null` on a node not booted from its disk (live, dev).
            Call::OsStatus => to_json(
                &crate::os::life::status(&self.os_boot_status, &self.data_root)
                    .map_err(|e| RpcError::new(SERVER_ERROR, format!("{e:#}")))?,
            ),
            Call::OsUpdate {
                source,
                allow_downgrade,
            } => {
                // The helper streams progress; the control socket answers
                // once, so progress goes to the agent's log.
                let data = self.data_root.clone();
                let socket = std::path::PathBuf::from(crate::os::update::helper::SOCKET);
                tokio::task::spawn_blocking(move || {
                    crate::os::update::update_via_helper(
                        &data,
                        &source,
                        allow_downgrade,
                        &socket,
                        &mut |line| tracing::info!(target: "os-update", "{line}"),
                    )
                })
                .await
                .map_err(|e| RpcError::new(INTERNAL_ERROR, format!("the update task failed: {e}")))?
                .map_err(|e| RpcError::new(SERVER_ERROR, format!("{e:#}")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Report {
        pass: u32,
    }

    #[tokio::test]
    async fn the_bridge_forwards_requests_and_turns_reports_into_json() {
        let (loop_tx, mut loop_rx) = mpsc::channel::<oneshot::Sender<Report>>(1);
        let fake_loop = tokio::spawn(async move {
            let mut pass = 0;
            while let Some(reply) = loop_rx.recv().await {
                pass += 1;
                let _ = reply.send(Report { pass });
            }
        });
        let bridge = reconcile_bridge(loop_tx);
        for want in 1..=2 {
            let (reply, report) = oneshot::channel();
            bridge.send(reply).await.expect("the bridge takes requests");
            assert_eq!(report.await.expect("a report"), json!({ "pass": want }));
        }
        drop(bridge);
        fake_loop.await.expect("the loop ends once the bridge is gone");
    }

    #[tokio::test]
    async fn a_stopped_loop_fails_the_request_instead_of_hanging() {
        let (loop_tx, loop_rx) = mpsc::channel::<oneshot::Sender<Report>>(1);
        drop(loop_rx);
        let bridge = reconcile_bridge(loop_tx);
        let (reply, report) = oneshot::channel();
        // Either the send or the reply fails; neither waits forever.
        if bridge.send(reply).await.is_ok() {
            assert!(report.await.is_err());
        }
    }
}
