//! The container orchestrator: everything the agent does to containers,
//! keyed by app id, behind one trait.
//!
//! Effects go through [`Engine`]; what a container should look like comes
//! from [`ContainerSpec::from_manifest`], the one place that decides it.
//! Every mutating operation goes through [`Orchestrator::with_app`]: the
//! app's lock ([`locks::AppLocks`]), the owner's hold ([`HoldPolicy`]),
//! then the act.

mod act;
pub mod commands;
mod context_hash;
mod devcopy;
mod health;
mod hold;
mod inflight;
mod install;
pub mod journal;
mod locks;
mod logs;
mod shutdown;
mod status;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::dataroot::DataRoot;
use crate::engine::{ContainerInfo, Engine, EngineError};
use crate::manifest::{self, ImageSource, LoadOptions, LoadReport, Manifest, Naming, NamingError};
use crate::spec::{build_tag, ContainerSpec, LABEL_MANAGED_BY, MANAGED_BY};

pub use act::HoldPolicy;
pub use context_hash::ContextHashes;
pub use health::{http_url, probe_address, NetProbe, ProbeResult};
pub use inflight::{InFlight, InFlightGuard, InFlightSet, InFlightStatus};
pub use install::{built_tag, prepare_volumes, InstallReport, PullAttempt, UpgradeReport, PRE_ARCHIPELAGO};
pub use install::{Timeouts, TimeoutsError};
pub use journal::{recover_upgrades, Recovered, Recovery};
pub use locks::AppLocks;
pub use logs::{LogCut, LogsReport, DEFAULT_LOG_TAIL, MAX_LOG_REPLY_BYTES};
pub use shutdown::{stop_waves, StopOutcome, Stopped};
pub use status::{app_state, app_status, differences, short_id, AppState, AppStatus, HealthState, LastRestart};

/// Runs blocking work (file I/O, `podman unshare`, hashing) on tokio's
/// blocking threads, so that it never stalls the agent's async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    what: &'static str,
    work: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .with_context(|| format!("{what} did not finish (panicked or cancelled)"))?
}

/// Suffix of the stopped container an upgrade keeps until the new one is
/// healthy.
pub const BACKUP_SUFFIX: &str = "-archy-backup";

/// Errors callers act on. Anything else is `Other`, with its context.
#[derive(Debug, thiserror::Error)]
pub enum OrchestratorError {
    #[error("unknown app {app:?}; known apps: [{}]", known.join(", "))]
    UnknownApp { app: String, known: Vec<String> },
    #[error("installing from a manifest path is allowed in dev mode only (--dev)")]
    DevOnly,
    #[error("{app}: no registry could provide {image}:\n{}", attempts.iter().map(|a| format!("  - {a}")).collect::<Vec<_>>().join("\n"))]
    PullFailed {
        app: String,
        image: String,
        attempts: Vec<PullAttempt>,
    },
    #[error("{app}: container {container} already exists with another spec; use `upgrade` to replace it")]
    AlreadyExists { app: String, container: String },
    #[error("{app}: {container} is not installed")]
    NotInstalled { app: String, container: String },
    #[error("{app}: upgrade failed ({reason}); {}", if *rolled_back { "the previous container was restored and runs again" } else { "the previous container could NOT be restored" })]
    UpgradeFailed {
        app: String,
        reason: String,
        rolled_back: bool,
    },
    /// The owner stopped the app, and the act respects that
    /// ([`HoldPolicy::Respect`]): nothing was done.
    #[error("{app} is stopped by its owner; left alone")]
    Held { app: String },
    #[error(transparent)]
    Naming(#[from] NamingError),
    #[error("{app}: engine request failed")]
    Engine {
        app: String,
        #[source]
        source: EngineError,
    },
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

pub type Result<T, E = OrchestratorError> = std::result::Result<T, E>;

/// A probe's result for `health`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HealthReport {
    pub app: String,
    pub container: String,
    pub state: AppState,
    /// `None` when the app declares no health check or is not running.
    pub health: Option<HealthState>,
    pub probe: Option<ProbeResult>,
}

/// Everything the agent does to an app's container.
#[async_trait]
pub trait ContainerOrchestrator: Send + Sync {
    /// Gets the image (pull by digest with fallback, or build), creates the
    /// network, folders and secrets, and creates and starts the container.
    async fn install(&self, app: &str) -> Result<InstallReport>;
    async fn start(&self, app: &str) -> Result<()>;
    async fn stop(&self, app: &str) -> Result<()>;
    async fn restart(&self, app: &str) -> Result<()>;
    /// Removes the container. Data folders and secrets are kept.
    async fn remove(&self, app: &str) -> Result<()>;
    /// Replaces the container with one from the current manifest, keeping
    /// the old one until the new one is healthy, and restoring it otherwise.
    async fn upgrade(&self, app: &str) -> Result<UpgradeReport>;
    async fn status(&self, app: &str) -> Result<AppStatus>;
    /// Every app's status, in start order.
    async fn list(&self) -> Result<Vec<AppStatus>>;
    /// The last `tail` lines of the app's log ([`DEFAULT_LOG_TAIL`] when
    /// `None`), at most [`MAX_LOG_REPLY_BYTES`] of them, saying when cut.
    async fn logs(&self, app: &str, tail: Option<usize>) -> Result<LogsReport>;
    async fn health(&self, app: &str) -> Result<HealthReport>;
}

/// Where an orchestrator finds its apps and keeps their data.
#[derive(Debug, Clone)]
pub struct OrchestratorConfig {
    pub apps_dir: PathBuf,
    pub data_root: DataRoot,
    pub naming: Naming,
    /// The pre-pulled image folder (docs/images.md): an image its lock
    /// ships for an app's exact reference, once imported, is used instead
    /// of a pull.
    pub images_dir: PathBuf,
}

/// Why an app did not become healthy (see [`Orchestrator::wait_healthy`]).
#[derive(Debug, thiserror::Error)]
pub enum NotHealthy {
    /// Without a health check: the container stopped right after starting.
    #[error("the container is {state} after starting")]
    NotRunning { state: AppState },
    /// The container stopped while its probe was awaited.
    #[error("the container is {state} while waiting for health")]
    Stopped { state: AppState },
    #[error("not healthy within its start period and retries; last probe: {last}")]
    TimedOut { last: String },
    /// Its status could not be read.
    #[error(transparent)]
    Status(#[from] OrchestratorError),
}

/// The orchestrator over a real engine. [`Orchestrator::prod`] and
/// [`Orchestrator::dev`] build it with their rules, [`Orchestrator::new`]
/// from a config that already says which.
pub struct Orchestrator {
    engine: Engine,
    config: OrchestratorConfig,
    apps: RwLock<Arc<LoadReport>>,
    locks: AppLocks,
    /// The most log bytes one reply carries ([`MAX_LOG_REPLY_BYTES`]).
    log_reply_limit: usize,
    /// Each built app's context hash, kept until its context changes.
    context_hashes: Arc<ContextHashes>,
    in_flight: InFlightSet,
    timeouts: Timeouts,
}

impl Orchestrator {
    /// Production rules: manifests from the apps folder
    /// (`/opt/archipelago/apps` by default), names and ports as written.
    pub fn prod(engine: Engine, apps_dir: &Path, data_root: &DataRoot) -> Orchestrator {
        Orchestrator::new(
            engine,
            OrchestratorConfig {
                apps_dir: apps_dir.to_path_buf(),
                data_root: data_root.clone(),
                naming: Naming::Prod,
                images_dir: PathBuf::from(crate::images::DEFAULT_IMAGES_DIR),
            },
        )
    }

    /// Dev rules: manifests under `<data>/apps`, container names with
    /// `-dev`, host ports shifted by the offset, and installs from any
    /// manifest path.
    pub fn dev(engine: Engine, data_root: &DataRoot, port_offset: u16) -> Orchestrator {
        Orchestrator::new(
            engine,
            OrchestratorConfig {
                apps_dir: data_root.dev_apps_dir(),
                data_root: data_root.clone(),
                naming: Naming::Dev { port_offset },
                images_dir: PathBuf::from(crate::images::DEFAULT_IMAGES_DIR),
            },
        )
    }

    pub fn new(engine: Engine, config: OrchestratorConfig) -> Orchestrator {
        let orch = Orchestrator {
            engine,
            config,
            apps: RwLock::new(Arc::new(LoadReport::default())),
            locks: AppLocks::default(),
            log_reply_limit: MAX_LOG_REPLY_BYTES,
            context_hashes: Arc::default(),
            in_flight: InFlightSet::default(),
            timeouts: Timeouts::default(),
        };
        orch.reload();
        orch
    }

    /// The same orchestrator with other pull and build limits (tests set
    /// short ones through `ARCHY_TIMEOUTS`, see [`Timeouts::from_env`]).
    pub fn with_timeouts(mut self, timeouts: Timeouts) -> Orchestrator {
        self.timeouts = timeouts;
        self
    }

    pub fn timeouts(&self) -> &Timeouts {
        &self.timeouts
    }

    /// The reconcile actions running now, one at most per app.
    pub fn in_flight(&self) -> &InFlightSet {
        &self.in_flight
    }

    pub fn config(&self) -> &OrchestratorConfig {
        &self.config
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Re-reads the manifests. Invalid ones are logged and left out; the
    /// report keeps their errors.
    pub fn reload(&self) -> Arc<LoadReport> {
        let opts = LoadOptions {
            data_root: self.config.data_root.clone(),
        };
        let report = Arc::new(manifest::load_dir(&self.config.apps_dir, &opts));
        for e in &report.errors {
            tracing::warn!(error = %e, "invalid manifest left out");
        }
        *self.apps.write().unwrap_or_else(|p| p.into_inner()) = report.clone();
        report
    }

    /// The loaded manifests and their errors.
    pub fn report(&self) -> Arc<LoadReport> {
        self.apps.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Every known app, in start order.
    pub fn manifests(&self) -> Vec<Manifest> {
        self.report().apps.clone()
    }

    /// The manifest of `app`, or a typed error listing the known apps.
    pub fn manifest(&self, app: &str) -> Result<Manifest> {
        let all = self.manifests();
        all.iter()
            .find(|m| m.id.as_str() == app)
            .cloned()
            .ok_or_else(|| OrchestratorError::UnknownApp {
                app: app.to_owned(),
                known: all.iter().map(|m| m.id.to_string()).collect(),
            })
    }

    /// The container `app` should have. A built app's image tag follows
    /// its context's hash, computed off the async threads and only when the
    /// context changed ([`ContextHashes`]).
    pub async fn spec(&self, m: &Manifest) -> Result<ContainerSpec> {
        let built = match &m.image {
            ImageSource::Build { context, containerfile } => {
                let (hashes, app) = (self.context_hashes.clone(), m.id.clone());
                let (context, containerfile) = (context.clone(), containerfile.clone());
                let hash = blocking("hashing a build context", move || {
                    hashes.get(app.as_str(), &context, &containerfile, || {
                        install::context_hash(&context, &containerfile)
                    })
                })
                .await?;
                Some(build_tag(&m.id, &hash))
            }
            ImageSource::Pinned(_) => None,
        };
        Ok(ContainerSpec::from_manifest(
            m,
            &self.config.naming,
            &self.config.data_root,
            built.as_deref(),
        )?)
    }

    /// The build context hashes this orchestrator keeps.
    pub fn context_hashes(&self) -> &ContextHashes {
        &self.context_hashes
    }

    /// Renders `m`'s config files and writes those that changed (see
    /// [`crate::files`]), off the async threads (rootless, giving a file
    /// to its container user runs `podman unshare`). Returns the changed
    /// ones.
    pub async fn render_files(&self, m: &Manifest) -> Result<Vec<String>> {
        let (data_root, m, all, naming) = (
            self.config.data_root.clone(),
            m.clone(),
            self.manifests(),
            self.config.naming,
        );
        Ok(blocking("rendering config files", move || {
            crate::files::sync(&data_root, &m, &all, &naming)
        })
        .await?)
    }

    /// Renders `m`'s config files and refreshes its secret copies, then
    /// starts its container. Starting a running container changes nothing,
    /// so one whose files or secret copies just changed is stopped first:
    /// its process must read them, and its secret mounts are bound afresh
    /// only at start. An adopted container (made by hand) is only started:
    /// its files are its owner's until `upgrade` converts it. `map` turns
    /// engine errors into the caller's.
    pub(crate) async fn start_with_files(
        &self,
        m: &Manifest,
        spec: &ContainerSpec,
        map: impl Fn(EngineError) -> OrchestratorError,
    ) -> Result<()> {
        if self.is_adopted(m.id.as_str(), &spec.name).await? {
            return self.engine.start(&spec.name).await.map_err(map);
        }
        let (data_root, app, secrets, owner) = (
            self.config.data_root.clone(),
            m.id.clone(),
            m.secrets.clone(),
            m.owner(),
        );
        let secrets_changed = blocking("copying secrets", move || {
            crate::secrets::provision_app_secrets(&data_root, &app, &secrets, owner)
        })
        .await?;
        if !self.render_files(m).await?.is_empty() || secrets_changed {
            self.engine
                .stop(&spec.name, spec.stop_grace_period)
                .await
                .map_err(&map)?;
        }
        self.engine.start(&spec.name).await.map_err(map)
    }

    /// Installs from a manifest file anywhere on disk. Dev mode only: in
    /// production only the apps folder decides what runs. The manifest's
    /// folder is copied into the dev apps folder first, so later commands
    /// (and the agent) know the app too.
    pub async fn install_from_path(&self, path: &Path) -> Result<InstallReport> {
        if !matches!(self.config.naming, Naming::Dev { .. }) {
            return Err(OrchestratorError::DevOnly);
        }
        let opts = LoadOptions {
            data_root: self.config.data_root.clone(),
        };
        let m = manifest::load_file(path, &opts).map_err(|errs| {
            anyhow::anyhow!(
                "{} is invalid:\n{}",
                path.display(),
                errs.iter().map(|e| format!("  {e}")).collect::<Vec<_>>().join("\n")
            )
        })?;
        let source = path.parent().unwrap_or(Path::new("."));
        let target = self.config.apps_dir.join(m.id.as_str());
        if source.canonicalize().ok() != target.canonicalize().ok() {
            devcopy::copy_context(source, &target, devcopy::MAX_COPY_BYTES)
                .with_context(|| format!("cannot copy {} into {}", source.display(), target.display()))?;
        }
        let report = self.reload();
        if let Some(e) = report.errors.iter().find(|e| e.file.starts_with(&target)) {
            return Err(anyhow::anyhow!("{} does not load beside the other apps: {e}", m.id).into());
        }
        self.install(m.id.as_str()).await
    }

    fn engine_err(app: &str) -> impl FnOnce(EngineError) -> OrchestratorError + '_ {
        move |source| OrchestratorError::Engine {
            app: app.to_owned(),
            source,
        }
    }

    /// Whether `name` exists and was not created by the agent (adopted):
    /// then no config file or secret copy of the app is written.
    pub(crate) async fn is_adopted(&self, app: &str, name: &str) -> Result<bool> {
        Ok(self.inspect(app, name).await?.is_some_and(|i| !is_managed(&i.labels)))
    }

    /// Inspects a container; `None` when it does not exist.
    async fn inspect(&self, app: &str, name: &str) -> Result<Option<crate::engine::ContainerInfo>> {
        match self.engine.inspect(name).await {
            Ok(info) => Ok(Some(info)),
            Err(EngineError::NotFound { .. }) => Ok(None),
            Err(e) => Err(Self::engine_err(app)(e)),
        }
    }

    /// The config digest of `m`'s pinned image, when the store has it.
    pub async fn pinned_image_id(&self, m: &Manifest) -> Option<String> {
        let pinned = m.pinned_image()?;
        match self.engine.inspect_image(pinned).await {
            Ok(info) => Some(info.id),
            Err(EngineError::NotFound { .. }) => None,
            Err(e) => {
                tracing::warn!(app = %m.id, error = %e, "cannot look up the pinned image");
                None
            }
        }
    }

    /// How `info` differs from `spec` when the agent did not create it (an
    /// adopted container); empty for the agent's own containers, whose
    /// drift the spec hash tells.
    pub async fn hand_made_differences(&self, m: &Manifest, spec: &ContainerSpec, info: &ContainerInfo) -> Vec<String> {
        if is_managed(&info.labels) {
            return Vec::new();
        }
        differences(spec, self.pinned_image_id(m).await.as_deref(), info)
    }

    /// Runs `m`'s health probe once against its container; `None` when the
    /// app has no health check or its container is not running.
    pub async fn probe_once(&self, m: &Manifest) -> Result<Option<ProbeResult>> {
        let Some(h) = &m.health else { return Ok(None) };
        let spec = self.spec(m).await?;
        let Some(info) = self.inspect(m.id.as_str(), &spec.name).await? else {
            return Ok(None);
        };
        if app_state(Some(&info)) != AppState::Running {
            return Ok(None);
        }
        let probe = health::run_probe(&self.engine, &h.probe, h.timeout, &spec.ports, &spec.network, &info).await;
        Ok(Some(probe))
    }

    /// `m`'s status with the last restart the reconcile loop remembers
    /// (`restarts`, from its state file). A container the engine cannot
    /// describe gives a status in state `unknown` with the engine's error:
    /// one app never hides the others.
    async fn status_with(&self, m: &Manifest, restarts: &BTreeMap<String, LastRestart>) -> Result<AppStatus> {
        let mut status = match self.status_of(m).await {
            Ok((status, _)) => status,
            // An engine that cannot be reached fails the whole call.
            Err(
                e @ OrchestratorError::Engine {
                    source: EngineError::Api { .. } | EngineError::Decode { .. },
                    ..
                },
            ) => {
                let container = self.spec(m).await?.name;
                let mut status = app_status(m.id.as_str(), &container, &m.version, "", None, None);
                status.state = AppState::Unknown;
                status.error = Some(crate::error_chain(&e));
                status
            }
            Err(e) => return Err(e),
        };
        status.last_restart = restarts.get(m.id.as_str()).cloned();
        Ok(status)
    }

    async fn status_of(&self, m: &Manifest) -> Result<(AppStatus, Option<ProbeResult>)> {
        let spec = self.spec(m).await?;
        let info = self.inspect(m.id.as_str(), &spec.name).await?;
        let mut probe = None;
        let mut health_state = None;
        if let (Some(info), Some(h)) = (&info, &m.health) {
            if app_state(Some(info)) == AppState::Running {
                let result =
                    health::run_probe(&self.engine, &h.probe, h.timeout, &spec.ports, &spec.network, info).await;
                health_state = Some(if result.ok {
                    HealthState::Healthy
                } else if within_start_period(info.started_at.as_deref(), h.start_period) {
                    HealthState::Starting
                } else {
                    HealthState::Unhealthy
                });
                probe = Some(result);
            }
        }
        let hash = spec.hash();
        let mut status = app_status(
            m.id.as_str(),
            &spec.name,
            &m.version,
            &hash,
            info.as_ref(),
            health_state,
        );
        if let Some(info) = &info {
            status.differences = self.hand_made_differences(m, &spec, info).await;
            status.drifted |= !status.differences.is_empty();
        }
        status.in_flight = self
            .in_flight
            .get(m.id.as_str())
            .map(|f| f.status(tokio::time::Instant::now()));
        Ok((status, probe))
    }

    /// Waits until `app` is healthy: its probe passes, or, without a health
    /// check, it is still running after a short settling time. Gives up
    /// after the start period plus `retries` intervals.
    pub async fn wait_healthy(&self, m: &Manifest) -> Result<(), NotHealthy> {
        let Some(h) = &m.health else {
            tokio::time::sleep(Duration::from_secs(2)).await;
            return match self.status_of(m).await? {
                (s, _) if s.state == AppState::Running => Ok(()),
                (s, _) => Err(NotHealthy::NotRunning { state: s.state }),
            };
        };
        let deadline = Instant::now() + h.start_period + h.interval * h.retries;
        let poll = h.interval.min(Duration::from_secs(1));
        loop {
            let last = match self.status_of(m).await {
                Ok((s, _)) if s.state != AppState::Running => return Err(NotHealthy::Stopped { state: s.state }),
                Ok((s, _)) if s.health == Some(HealthState::Healthy) => return Ok(()),
                Ok((_, probe)) => probe.map(|p| format!("{}: {}", p.target, p.detail)).unwrap_or_default(),
                Err(e) => crate::error_chain(&e),
            };
            if Instant::now() >= deadline {
                return Err(NotHealthy::TimedOut { last });
            }
            tokio::time::sleep(poll).await;
        }
    }
}

/// Whether a container carries the agent's label: it created it. Anything
/// else was adopted, and is never stopped, removed or recreated unasked.
pub fn is_managed(labels: &std::collections::BTreeMap<String, String>) -> bool {
    labels.get(LABEL_MANAGED_BY).map(String::as_str) == Some(MANAGED_BY)
}

/// Whether a container that started at `started_at` (RFC 3339) is still
/// inside `period`. An unknown start time counts as inside: better a
/// `starting` than a false `unhealthy`.
fn within_start_period(started_at: Option<&str>, period: Duration) -> bool {
    let Some(started) = started_at.and_then(|s| humantime::parse_rfc3339_weak(s.get(..19).unwrap_or(s)).ok()) else {
        return true;
    };
    std::time::SystemTime::now()
        .duration_since(started)
        .map_or(true, |age| age < period)
}

#[async_trait]
impl ContainerOrchestrator for Orchestrator {
    async fn install(&self, app: &str) -> Result<InstallReport> {
        self.install_app(app, HoldPolicy::Release).await
    }

    async fn start(&self, app: &str) -> Result<()> {
        self.start_app(app, HoldPolicy::Release).await
    }

    async fn stop(&self, app: &str) -> Result<()> {
        self.with_app(app, HoldPolicy::Place, |m| async move {
            let spec = self.spec(&m).await?;
            self.engine
                .stop(&spec.name, spec.stop_grace_period)
                .await
                .map_err(Self::not_installed(app, &spec.name))
        })
        .await
    }

    async fn restart(&self, app: &str) -> Result<()> {
        self.restart_app(app, HoldPolicy::Release).await
    }

    async fn remove(&self, app: &str) -> Result<()> {
        // Removed on purpose: reconcile must not install it again.
        self.with_app(app, HoldPolicy::Place, |m| async move {
            let spec = self.spec(&m).await?;
            if self.inspect(app, &spec.name).await?.is_none() {
                return Err(OrchestratorError::NotInstalled {
                    app: app.to_owned(),
                    container: spec.name,
                });
            }
            self.engine
                .stop(&spec.name, spec.stop_grace_period)
                .await
                .map_err(Self::engine_err(app))?;
            self.engine.remove(&spec.name).await.map_err(Self::engine_err(app))
        })
        .await
    }

    async fn upgrade(&self, app: &str) -> Result<UpgradeReport> {
        self.upgrade_app(app, HoldPolicy::Release).await
    }

    async fn status(&self, app: &str) -> Result<AppStatus> {
        let m = self.manifest(app)?;
        let restarts = crate::reconcile::state::last_restarts(&self.config.data_root);
        self.status_with(&m, &restarts).await
    }

    async fn list(&self) -> Result<Vec<AppStatus>> {
        let restarts = crate::reconcile::state::last_restarts(&self.config.data_root);
        let mut out = Vec::new();
        for m in self.manifests() {
            out.push(self.status_with(&m, &restarts).await?);
        }
        Ok(out)
    }

    async fn logs(&self, app: &str, tail: Option<usize>) -> Result<LogsReport> {
        self.logs_report(app, tail).await
    }

    async fn health(&self, app: &str) -> Result<HealthReport> {
        let m = self.manifest(app)?;
        let (status, probe) = self.status_of(&m).await?;
        Ok(HealthReport {
            app: status.app,
            container: status.container,
            state: status.state,
            health: status.health,
            probe,
        })
    }
}
