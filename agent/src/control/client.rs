//! The calling side: [`ControlClient`] speaks the protocol, and
//! [`RemoteOrchestrator`] and [`RemoteRegistries`] put the usual traits
//! over it, so the CLI prints the same whichever side does the work.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::io::{AsyncWriteExt as _, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::Mutex;

use super::protocol::{self, Response, RpcError, TRANSPORT_ERROR};
use super::server::{read_line_limited, LineRead};
use crate::dataroot::DataRoot;
use crate::engine::Engine;
use crate::orchestrator::{
    self, AppStatus, ContainerOrchestrator, HealthReport, InstallReport, LogsReport, Orchestrator, OrchestratorConfig,
    UpgradeReport,
};
use crate::registry::commands::{LocalRegistries, NewRegistry, RegistryListing, RegistryOps, TestResults};
use crate::registry::RegistrySummary;
use crate::writer::{self, WriterLock};

/// A socket that does not accept in this long is an agent that does not
/// answer: an error, never "no agent" (acting beside it would race it).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Responses carry logs, at most `MAX_LOG_REPLY_BYTES` of them, escaped as
/// JSON (up to six bytes for one); this only guards against a peer that is
/// not an agent.
const MAX_RESPONSE_BYTES: usize = 256 * 1024 * 1024;
const _: () = assert!(orchestrator::MAX_LOG_REPLY_BYTES * 6 + 64 * 1024 < MAX_RESPONSE_BYTES);

/// A connection to a running agent's control socket. Calls on one client
/// are sent one at a time.
pub struct ControlClient {
    path: PathBuf,
    conn: Mutex<Conn>,
    next_id: AtomicU64,
}

struct Conn {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

fn transport(message: String) -> RpcError {
    RpcError::new(TRANSPORT_ERROR, message)
}

impl ControlClient {
    /// Connects to the agent at `path`. `None` when no agent is there: no
    /// socket file, or a stale one (connection refused); callers then act
    /// in-process, under the data root's writer lock when they change
    /// anything ([`route`]). Other failures, such as a socket this user may
    /// not open or one that does not accept in time, are errors: an agent
    /// is there, and acting beside it would bypass its locks.
    pub async fn connect(path: &Path) -> anyhow::Result<Option<ControlClient>> {
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, UnixStream::connect(path)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) => {
                tracing::debug!(socket = %path.display(), error = %e, "no agent on the control socket; acting in-process");
                return Ok(None);
            }
            Err(_) => anyhow::bail!(
                "the agent's control socket {} does not accept a connection within {} s: the agent is stuck \
                 or overloaded; nothing was done (acting beside it would race it)",
                path.display(),
                CONNECT_TIMEOUT.as_secs()
            ),
            Ok(Err(e)) => {
                let hint = if e.kind() == io::ErrorKind::PermissionDenied {
                    " (run as root or as a member of the socket's group)"
                } else {
                    ""
                };
                return Err(e)
                    .with_context(|| format!("cannot connect to the agent's control socket {}{hint}", path.display()));
            }
        };
        tracing::debug!(socket = %path.display(), "via agent at {}", path.display());
        let (read, writer) = stream.into_split();
        Ok(Some(ControlClient {
            path: path.to_owned(),
            conn: Mutex::new(Conn {
                reader: BufReader::new(read),
                writer,
            }),
            next_id: AtomicU64::new(1),
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Calls `method` with named `params` (an object, or `null` for none)
    /// and waits for its result. A broken connection or an answer that is
    /// not JSON-RPC is a [`TRANSPORT_ERROR`].
    pub async fn call(&self, method: &str, params: Value) -> Result<Value, RpcError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let request = json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params });
        let mut line = request.to_string();
        line.push('\n');
        let agent = self.path.display();
        let mut conn = self.conn.lock().await;
        conn.writer
            .write_all(line.as_bytes())
            .await
            .map_err(|e| transport(format!("cannot send {method} to the agent at {agent}: {e}")))?;
        let mut buf = Vec::new();
        match read_line_limited(&mut conn.reader, &mut buf, MAX_RESPONSE_BYTES).await {
            Ok(LineRead::Line) => {}
            Ok(LineRead::Eof) => {
                return Err(transport(format!(
                    "the agent at {agent} closed the connection without answering {method}"
                )))
            }
            Ok(LineRead::TooLong) => {
                return Err(transport(format!(
                    "the answer to {method} from {agent} is longer than {MAX_RESPONSE_BYTES} bytes"
                )))
            }
            Err(e) => {
                return Err(transport(format!(
                    "cannot read the answer to {method} from {agent}: {e}"
                )))
            }
        }
        let response: Response = serde_json::from_slice(&buf).map_err(|e| {
            transport(format!(
                "the answer to {method} from {agent} is not a JSON-RPC response: {e}"
            ))
        })?;
        if let Some(error) = response.error {
            return Err(error);
        }
        if response.id != json!(id) {
            return Err(transport(format!(
                "the agent at {agent} answered request {} instead of {id}",
                response.id
            )));
        }
        Ok(response.result.unwrap_or(Value::Null))
    }

    /// [`ControlClient::call`], with the result read as `T`.
    pub async fn call_as<T: DeserializeOwned>(&self, method: &str, params: Value) -> Result<T, RpcError> {
        let value = self.call(method, params).await?;
        serde_json::from_value(value).map_err(|e| {
            transport(format!(
                "the result of {method} from {} is not what this client expects (a different agent version?): {e}",
                self.path.display()
            ))
        })
    }
}

/// The orchestrator of a running agent, over its control socket.
pub struct RemoteOrchestrator {
    client: ControlClient,
}

impl RemoteOrchestrator {
    pub fn new(client: ControlClient) -> RemoteOrchestrator {
        RemoteOrchestrator { client }
    }

    pub fn client(&self) -> &ControlClient {
        &self.client
    }

    async fn call<T: DeserializeOwned>(&self, method: &str, params: Value) -> orchestrator::Result<T> {
        self.client
            .call_as(method, params)
            .await
            .map_err(protocol::into_orchestrator)
    }

    /// Installs from a manifest file; the agent reads it, so the path is
    /// made absolute here, where it was typed.
    pub async fn install_from_path(&self, path: &Path) -> orchestrator::Result<InstallReport> {
        let absolute = std::path::absolute(path).with_context(|| format!("cannot make {} absolute", path.display()))?;
        let text = absolute.to_str().with_context(|| {
            format!(
                "{} is not UTF-8, which the control socket cannot carry",
                absolute.display()
            )
        })?;
        self.call("container-install", json!({ "manifest": text })).await
    }
}

#[async_trait]
impl ContainerOrchestrator for RemoteOrchestrator {
    async fn install(&self, app: &str) -> orchestrator::Result<InstallReport> {
        self.call("container-install", json!({ "app": app })).await
    }

    async fn start(&self, app: &str) -> orchestrator::Result<()> {
        self.call::<Value>("container-start", json!({ "app": app }))
            .await
            .map(drop)
    }

    async fn stop(&self, app: &str) -> orchestrator::Result<()> {
        self.call::<Value>("container-stop", json!({ "app": app }))
            .await
            .map(drop)
    }

    async fn restart(&self, app: &str) -> orchestrator::Result<()> {
        self.call::<Value>("container-restart", json!({ "app": app }))
            .await
            .map(drop)
    }

    async fn remove(&self, app: &str) -> orchestrator::Result<()> {
        self.call::<Value>("container-remove", json!({ "app": app }))
            .await
            .map(drop)
    }

    async fn upgrade(&self, app: &str) -> orchestrator::Result<UpgradeReport> {
        self.call("container-upgrade", json!({ "app": app })).await
    }

    async fn status(&self, app: &str) -> orchestrator::Result<AppStatus> {
        self.call("container-status", json!({ "app": app })).await
    }

    async fn list(&self) -> orchestrator::Result<Vec<AppStatus>> {
        self.call("container-list", Value::Null).await
    }

    async fn logs(&self, app: &str, tail: Option<usize>) -> orchestrator::Result<LogsReport> {
        self.call("container-logs", json!({ "app": app, "tail": tail })).await
    }

    async fn health(&self, app: &str) -> orchestrator::Result<HealthReport> {
        self.call("container-health", json!({ "app": app })).await
    }
}

/// Where `archy-agent`'s app subcommands run: through the agent when one
/// answers on the control socket, so its per-app locks apply, else here.
pub enum AppBackend {
    /// Boxed: an orchestrator is large, and a backend is made once. With
    /// the data root's writer lock, held until the backend is dropped, when
    /// the command changes anything.
    Local(Box<Orchestrator>, Option<WriterLock>),
    Remote(RemoteOrchestrator),
}

impl AppBackend {
    /// The running agent at `control`, else a local orchestrator over the
    /// engine at `engine` (which is then connected, and must answer). A
    /// command that changes anything names itself in `writes` and acts
    /// in-process only under the data root's writer lock ([`route`]).
    pub async fn open(
        control: &Path,
        engine: &Path,
        config: OrchestratorConfig,
        writes: Option<&str>,
    ) -> anyhow::Result<AppBackend> {
        let lock = match route(control, &config.data_root, writes).await? {
            Route::Agent(client) => return Ok(AppBackend::Remote(RemoteOrchestrator::new(client))),
            Route::Local(lock) => lock,
        };
        let engine = Engine::connect(engine).await?;
        // No agent, and this command changes things: it acts alone, once
        // every interrupted upgrade is finished or undone under the lock.
        // A read-only command does it too when the lock is free at once
        // (a `list` after a crash shows the app as it will stay), and
        // never beside another writer.
        match &lock {
            Some(_) => {
                orchestrator::recover_upgrades(&engine, &config.data_root).await;
            }
            None => {
                if let Ok(Some(_briefly)) = WriterLock::try_acquire(&config.data_root, "recover-upgrades") {
                    orchestrator::recover_upgrades(&engine, &config.data_root).await;
                }
            }
        }
        Ok(AppBackend::Local(Box::new(Orchestrator::new(engine, config)), lock))
    }

    fn inner(&self) -> &dyn ContainerOrchestrator {
        match self {
            AppBackend::Local(orch, _) => orch.as_ref(),
            AppBackend::Remote(remote) => remote,
        }
    }

    /// Installs from a manifest file anywhere (dev mode only, as the side
    /// doing the work decides).
    pub async fn install_from_path(&self, path: &Path) -> orchestrator::Result<InstallReport> {
        match self {
            AppBackend::Local(orch, _) => orch.install_from_path(path).await,
            AppBackend::Remote(remote) => remote.install_from_path(path).await,
        }
    }
}

#[async_trait]
impl ContainerOrchestrator for AppBackend {
    async fn install(&self, app: &str) -> orchestrator::Result<InstallReport> {
        self.inner().install(app).await
    }

    async fn start(&self, app: &str) -> orchestrator::Result<()> {
        self.inner().start(app).await
    }

    async fn stop(&self, app: &str) -> orchestrator::Result<()> {
        self.inner().stop(app).await
    }

    async fn restart(&self, app: &str) -> orchestrator::Result<()> {
        self.inner().restart(app).await
    }

    async fn remove(&self, app: &str) -> orchestrator::Result<()> {
        self.inner().remove(app).await
    }

    async fn upgrade(&self, app: &str) -> orchestrator::Result<UpgradeReport> {
        self.inner().upgrade(app).await
    }

    async fn status(&self, app: &str) -> orchestrator::Result<AppStatus> {
        self.inner().status(app).await
    }

    async fn list(&self) -> orchestrator::Result<Vec<AppStatus>> {
        self.inner().list().await
    }

    async fn logs(&self, app: &str, tail: Option<usize>) -> orchestrator::Result<LogsReport> {
        self.inner().logs(app, tail).await
    }

    async fn health(&self, app: &str) -> orchestrator::Result<HealthReport> {
        self.inner().health(app).await
    }
}

/// A running agent's registry list, over its control socket.
pub struct RemoteRegistries {
    client: ControlClient,
}

impl RemoteRegistries {
    pub fn new(client: ControlClient) -> RemoteRegistries {
        RemoteRegistries { client }
    }
}

#[async_trait]
impl RegistryOps for RemoteRegistries {
    async fn list(&self) -> anyhow::Result<RegistryListing> {
        Ok(self.client.call_as("registry.list", Value::Null).await?)
    }

    async fn add(&self, new: NewRegistry) -> anyhow::Result<RegistrySummary> {
        // Built by hand: `NewRegistry` is not `Serialize`, so that the
        // password only ever leaves in this one request.
        let params = json!({
            "name": new.name,
            "url": new.url,
            "priority": new.priority,
            "username": new.username,
            "password": new.password,
        });
        Ok(self.client.call_as("registry.add", params).await?)
    }

    async fn remove(&self, name: &str) -> anyhow::Result<RegistrySummary> {
        Ok(self.client.call_as("registry.remove", json!({ "name": name })).await?)
    }

    async fn test(&self, name: Option<&str>) -> anyhow::Result<TestResults> {
        Ok(self.client.call_as("registry.test", json!({ "name": name })).await?)
    }
}

/// Where `archy-agent registry …` runs: through the agent when one answers
/// on `control`, else on the list under `data_root`, with the writer lock
/// (kept by the caller while it acts) when the command names itself in
/// `writes` ([`route`]).
pub async fn registry_backend(
    control: &Path,
    data_root: &DataRoot,
    writes: Option<&str>,
) -> anyhow::Result<(Box<dyn RegistryOps>, Option<WriterLock>)> {
    Ok(match route(control, data_root, writes).await? {
        Route::Agent(client) => (Box::new(RemoteRegistries::new(client)), None),
        Route::Local(lock) => (
            Box::new(LocalRegistries {
                data_root: data_root.clone(),
            }),
            lock,
        ),
    })
}

/// Where a command runs.
pub enum Route {
    /// Through the running agent, the data root's one writer.
    Agent(ControlClient),
    /// In-process: no agent answers. With the writer lock when the command
    /// changes anything.
    Local(Option<WriterLock>),
}

/// Where a command runs: through the agent when one answers on `control`.
/// Else a command that only reads (`writes` is `None`) runs in-process; one
/// that changes anything (`writes` names it, for the lock file) takes the
/// data root's writer lock first. While the lock is held and no agent
/// answers (another command acting in-process, or an agent still starting:
/// its socket opens once the engine answers), it waits, up to
/// [`writer::WAIT`], looking for the agent's socket and the lock by turns.
/// A socket that does not accept in time is an error, never "no agent".
pub async fn route(control: &Path, data_root: &DataRoot, writes: Option<&str>) -> anyhow::Result<Route> {
    let started = tokio::time::Instant::now();
    let mut told = false;
    loop {
        if let Some(client) = ControlClient::connect(control).await? {
            return Ok(Route::Agent(client));
        }
        let Some(command) = writes else {
            return Ok(Route::Local(None));
        };
        if let Some(lock) = WriterLock::try_acquire(data_root, command)? {
            return Ok(Route::Local(Some(lock)));
        }
        let holder = writer::holder(data_root);
        if started.elapsed() >= writer::WAIT {
            let busy = writer::busy(data_root, holder.clone(), started.elapsed());
            return Err(match holder.filter(writer::Holder::is_agent) {
                Some(_) => anyhow::anyhow!(
                    "{busy}: that is the agent, and its control socket {} still does not answer \
                     (it opens once the engine answers); nothing was done",
                    control.display()
                ),
                None => busy.into(),
            });
        }
        if !told {
            let who = holder.map_or_else(|| "another process".to_owned(), |h| h.to_string());
            tracing::warn!(
                lock = %data_root.writer_lock().display(),
                socket = %control.display(),
                "waiting for {who} to finish (or for the agent's socket to answer)"
            );
            told = true;
        }
        tokio::time::sleep(writer::POLL).await;
    }
}
