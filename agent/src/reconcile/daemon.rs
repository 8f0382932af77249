//! `archy-agent boot`: the long-running agent.
//!
//! Shape (tokio's mini-redis): a thin `main` sets up tracing and config and
//! calls [`run`] with a shutdown future. `run` takes the data root's writer
//! lock (`writer.rs`), connects to the engine (retrying while it is away),
//! opens the control socket, imports the pre-pulled images (saying how far
//! it is in `status` and `list`), reconciles once, tells systemd it is ready,
//! then reconciles on engine events, on a periodic resync, at backoff
//! deadlines and on request, until shutdown. A pass in flight always
//! finishes before the agent exits; containers belong to the engine and
//! outlive the agent.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::pass::{PassReport, Reconciler};
use crate::dataroot::DataRoot;
use crate::engine::{Engine, EngineEvent, EventKind};
use crate::manifest::Naming;
use crate::orchestrator::{ContainerOrchestrator as _, Orchestrator, OrchestratorConfig};

/// Engine events that can change what a pass would decide.
const EVENT_ACTIONS: &[&str] = &[
    "die",
    "stop",
    "kill",
    "oom",
    "remove",
    "destroy",
    "pause",
    "health_status",
    "create",
];
/// How often the agent looks whether every app is healthy yet, until they are.
const HEALTHY_POLL: Duration = Duration::from_secs(2);
/// Events that arrive together (a stop sends several) make one pass.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// Waiting for the engine: from 1 s doubling to 30 s.
const ENGINE_RETRY_MAX: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub engine: PathBuf,
    pub apps_dir: PathBuf,
    pub data_root: DataRoot,
    /// Pre-pulled image archives, imported once at boot.
    pub images_dir: PathBuf,
    pub naming: Naming,
    /// The periodic, level-triggered resync.
    pub resync: Duration,
    /// Where to serve the JSON-RPC control socket; `None` serves none.
    pub control: Option<PathBuf>,
}

/// A request for a pass now, answered with its report.
pub type ReconcileRequest = oneshot::Sender<PassReport>;

/// Runs the agent until `shutdown` completes.
pub async fn run(
    config: AgentConfig,
    requests: mpsc::Receiver<ReconcileRequest>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::pin!(shutdown);
    // Pings from their own task: a first pass that pulls for many minutes
    // must not look like a hang, while a wedged runtime still stops them.
    let watchdog = watchdog_interval().map(|period| {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                notify(&[sd_notify::NotifyState::Watchdog]);
            }
        })
    });
    // One writer per data root: held for the agent's life. A second agent
    // is refused; a command acting in-process is waited for
    // (the watchdog is pinged meanwhile).
    let _writer = tokio::select! {
        _ = &mut shutdown => return Ok(()),
        lock = crate::writer::acquire(&config.data_root, crate::writer::AGENT_COMMAND, crate::writer::WAIT) => lock?,
    };
    let Some(engine) = connect_until(&config, &mut shutdown).await else {
        return Ok(());
    };
    let orch = Arc::new(Orchestrator::new(
        engine,
        OrchestratorConfig {
            apps_dir: config.apps_dir.clone(),
            data_root: config.data_root.clone(),
            naming: config.naming,
            // `AgentConfig` does not carry `--images` yet: the node's folder.
            images_dir: config.images_dir.clone(),
        },
    ));
    // Requests from the control socket and from the caller share one queue.
    let (queue_tx, queue) = mpsc::channel::<ReconcileRequest>(8);
    let forward = queue_tx.clone();
    tokio::spawn(async move {
        let mut requests = requests;
        while let Some(r) = requests.recv().await {
            if forward.send(r).await.is_err() {
                break;
            }
        }
    });
    // The socket opens before the import: `status` and `list` answer during
    // it and say how far it is; app changes wait for it to end.
    let (busy, busy_rx) = tokio::sync::watch::channel(Some("importing images".to_owned()));
    let (stop_control, control_stopped) = oneshot::channel::<()>();
    let control = config.control.clone().map(|path| {
        let handler = Arc::new(
            crate::control::OrchestratorHandler::new(
                orch.clone(),
                Some(crate::control::reconcile_bridge(queue_tx.clone())),
            )
            .with_busy(busy_rx),
        );
        tokio::spawn(async move {
            let stopped = async move {
                let _ = control_stopped.await;
            };
            if let Err(e) = crate::control::serve(&path, handler, stopped).await {
                tracing::error!(socket = %path.display(), error = %format!("{e:#}"), "control socket failed");
            }
        })
    });
    // Before the first pass, so installs find the pre-pulled images and
    // a node with no network still starts every app.
    let imported = crate::images::import_all_reporting(orch.engine(), &config.images_dir, &config.data_root, |n, m| {
        busy.send_replace(Some(format!("importing images ({n} of {m})")));
    })
    .await;
    busy.send_replace(None);
    log_import(&imported);
    let mut reconciler = Reconciler::new(orch.clone());
    drop(queue_tx);
    let first = reconciler.pass().await;
    log_report(&first, true);
    print_console_summary(orch.as_ref()).await;
    notify(&[sd_notify::NotifyState::Ready]);
    tracing::info!(since_kernel_start_s = since_kernel_start(), "agent ready");
    let healthy_watch = tokio::spawn(announce_all_healthy(orch.clone()));
    run_loop(&config, &mut reconciler, queue, &mut shutdown, first.next_deadline()).await;
    let _ = stop_control.send(());
    if let Some(control) = control {
        // In-flight calls finish; the socket file is removed.
        let _ = control.await;
    }
    notify(&[sd_notify::NotifyState::Stopping]);
    healthy_watch.abort();
    if let Some(task) = watchdog {
        task.abort();
    }
    tracing::info!("agent stopped; containers keep running");
    Ok(())
}

/// Connects to the engine, retrying with backoff. `None` on shutdown.
async fn connect_until(config: &AgentConfig, shutdown: &mut (impl Future<Output = ()> + Unpin)) -> Option<Engine> {
    let mut delay = Duration::from_secs(1);
    loop {
        match Engine::connect(&config.engine).await {
            Ok(engine) => return Some(engine),
            Err(e) => {
                tracing::warn!(engine = %config.engine.display(), error = %crate::error_chain(&e), retry_in_s = delay.as_secs(), "engine not reachable");
            }
        }
        tokio::select! {
            _ = &mut *shutdown => return None,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(ENGINE_RETRY_MAX);
    }
}

async fn run_loop(
    config: &AgentConfig,
    reconciler: &mut Reconciler,
    requests: mpsc::Receiver<ReconcileRequest>,
    shutdown: &mut (impl Future<Output = ()> + Unpin),
    mut deadline: Option<Instant>,
) {
    let mut requests = Some(requests);
    let mut resync = tokio::time::interval_at(Instant::now() + config.resync, config.resync);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut events = None;
    let mut events_retry = Duration::from_secs(1);
    let mut events_next_try = Instant::now();
    loop {
        if events.is_none() && Instant::now() >= events_next_try {
            match reconciler.orchestrator().engine().events(&event_filters()).await {
                Ok(stream) => {
                    events = Some(stream);
                    events_retry = Duration::from_secs(1);
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_s = events_retry.as_secs(), "cannot follow engine events");
                    events_next_try = Instant::now() + events_retry;
                    events_retry = (events_retry * 2).min(ENGINE_RETRY_MAX);
                }
            }
        }
        let wake = deadline.unwrap_or_else(|| Instant::now() + config.resync);
        let events_wake = if events.is_none() { events_next_try } else { wake };
        let mut reply: Option<ReconcileRequest> = None;
        tokio::select! {
            _ = &mut *shutdown => break,
            _ = resync.tick() => reconciler.reload(),
            _ = tokio::time::sleep_until(wake) => {}
            _ = tokio::time::sleep_until(events_wake), if events.is_none() => continue,
            request = next_request(&mut requests) => match request {
                Some(r) => reply = Some(r),
                // Nobody can ask any more; keep reconciling on our own.
                None => {
                    requests = None;
                    continue;
                }
            },
            event = next_event(&mut events) => match event {
                Some(Ok(e)) if is_relevant(&e) => {
                    tracing::debug!(action = %e.action, container = ?e.name, "engine event");
                    // Let the rest of a burst arrive, then make one pass.
                    tokio::time::sleep(DEBOUNCE).await;
                    drain(&mut events);
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "engine event stream failed; following again");
                    events = None;
                    continue;
                }
                None => {
                    tracing::warn!("engine event stream ended (engine restarting?); following again");
                    events = None;
                    events_next_try = Instant::now() + events_retry;
                    continue;
                }
            },
        }
        let report = reconciler.pass().await;
        log_report(&report, false);
        deadline = report.next_deadline();
        if let Some(reply) = reply {
            // The asker may have gone away; the pass happened regardless.
            let _ = reply.send(report);
        }
    }
}

async fn next_request(requests: &mut Option<mpsc::Receiver<ReconcileRequest>>) -> Option<ReconcileRequest> {
    match requests {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

fn event_filters() -> BTreeMap<String, Vec<String>> {
    BTreeMap::from([("type".to_owned(), vec!["container".to_owned()])])
}

fn is_relevant(e: &EngineEvent) -> bool {
    e.kind == EventKind::Container && EVENT_ACTIONS.contains(&e.action.as_str())
}

async fn next_event(events: &mut Option<crate::engine::EventStream>) -> Option<crate::engine::Result<EngineEvent>> {
    match events {
        Some(stream) => stream.next().await,
        None => std::future::pending().await,
    }
}

/// Takes whatever events are already waiting, without blocking.
fn drain(events: &mut Option<crate::engine::EventStream>) {
    let Some(stream) = events else { return };
    let waker = futures_util::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    while let std::task::Poll::Ready(Some(_)) = stream.poll_next_unpin(&mut cx) {}
}

fn watchdog_interval() -> Option<Duration> {
    // Half the watchdog period, as systemd recommends.
    sd_notify::watchdog_enabled().map(|period| period / 2)
}

fn notify(state: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

fn log_import(report: &crate::images::ImportReport) {
    for note in &report.notes {
        tracing::info!(dir = %report.dir.display(), note, "images");
    }
    if let Some(e) = &report.error {
        tracing::warn!(dir = %report.dir.display(), error = %e, "pre-pulled images not imported");
    }
    tracing::info!(
        imported = report.imported(),
        already_present = report.already_present(),
        skipped = report.skipped(),
        "pre-pulled images"
    );
}

fn log_report(report: &PassReport, first: bool) {
    if let Some(e) = &report.error {
        tracing::warn!(error = %e, "reconcile pass could not run");
        return;
    }
    if report.is_quiet() && !first {
        tracing::debug!(ms = report.duration_ms, "quiet pass");
        return;
    }
    for a in &report.apps {
        match &a.error {
            Some(e) => tracing::warn!(app = %a.app, observed = %a.observed, decision = ?a.decision, error = %e, "app"),
            None => tracing::info!(app = %a.app, observed = %a.observed, decision = ?a.decision, "app"),
        }
    }
    if !report.unmatched.is_empty() {
        tracing::info!(containers = ?report.unmatched, "containers that match no manifest are left alone");
    }
    tracing::info!(ms = report.duration_ms, apps = report.apps.len(), "reconcile pass");
}

/// One line per app on the console when the first pass ends.
/// One line per app on the console (the unit sends stderr there): what a
/// person at a headless node's serial port sees when the first pass ends.
async fn print_console_summary(orch: &Orchestrator) {
    match orch.list().await {
        Ok(apps) => {
            for a in &apps {
                eprintln!(
                    "archipelago: app {:<20} {:<10} {}",
                    a.app,
                    a.state.to_string(),
                    a.health.map(|h| h.to_string()).unwrap_or_else(|| "-".to_owned())
                );
            }
        }
        Err(e) => eprintln!("archipelago: cannot list the apps: {}", crate::error_chain(&e)),
    }
}

/// Seconds since the kernel started (CLOCK_BOOTTIME, as /proc/uptime).
fn since_kernel_start() -> Option<f64> {
    let uptime = std::fs::read_to_string("/proc/uptime").ok()?;
    uptime.split_whitespace().next()?.parse().ok()
}

/// Running, and healthy if it has a health check.
fn is_healthy(app: &crate::orchestrator::AppStatus) -> bool {
    use crate::orchestrator::{AppState, HealthState};
    app.state == AppState::Running && matches!(app.health, None | Some(HealthState::Healthy))
}

/// Prints, once, how long after kernel start every app became healthy:
/// the figure a node's owner waits for after power on.
///
/// Each poll probes only the apps not yet seen healthy: on a rootless node
/// a probe spawns `podman unshare`, which costs a slow machine dearly while
/// it is still starting its apps. Once every app has been seen healthy,
/// one listing of them all confirms it at one moment; an app that has
/// failed since is probed again from then on.
async fn announce_all_healthy(orch: Arc<Orchestrator>) {
    let mut seen_healthy: BTreeSet<String> = BTreeSet::new();
    loop {
        for m in orch.manifests() {
            let app = m.id.to_string();
            if !seen_healthy.contains(&app) && orch.status(&app).await.is_ok_and(|s| is_healthy(&s)) {
                seen_healthy.insert(app);
            }
        }
        let all_seen = orch.manifests().iter().all(|m| seen_healthy.contains(m.id.as_str()));
        if all_seen {
            if let Ok(apps) = orch.list().await {
                seen_healthy.retain(|app| apps.iter().any(|a| &a.app == app && is_healthy(a)));
                if apps.iter().all(is_healthy) {
                    let since = since_kernel_start();
                    let shown = since
                        .map(|s| format!("{s:.1} s"))
                        .unwrap_or_else(|| "an unknown time".to_owned());
                    eprintln!(
                        "archipelago: all {} apps healthy {shown} after kernel start",
                        apps.len()
                    );
                    tracing::info!(apps = apps.len(), since_kernel_start_s = since, "all apps healthy");
                    return;
                }
            }
        }
        tokio::time::sleep(HEALTHY_POLL).await;
    }
}
