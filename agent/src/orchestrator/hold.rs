//! Operations the reconcile loop needs beyond the trait: the owner's hold
//! on a stopped app, unpausing, and rebuilding a wedged container.

use std::fs;
use std::path::PathBuf;

use anyhow::Context as _;

use super::{install, Orchestrator, OrchestratorError, Result};
use crate::engine::EngineError;

impl Orchestrator {
    /// `<data>/state/held/<app>`: present while the owner wants the app
    /// stopped. A file, so the CLI and the running agent agree on it.
    fn hold_marker(&self, app: &str) -> PathBuf {
        self.config.data_root.held_marker(app)
    }

    /// Whether the owner stopped `app` and reconcile must leave it so.
    pub fn is_held(&self, app: &str) -> bool {
        self.hold_marker(app).exists()
    }

    pub(super) fn set_held(&self, app: &str, held: bool) -> Result<()> {
        let marker = self.hold_marker(app);
        if held {
            let dir = marker.parent().context("the hold marker has a folder")?;
            fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            crate::fsutil::write_atomic(&marker, b"stopped by its owner\n", 0o644)
                .with_context(|| format!("cannot write {}", marker.display()))?;
        } else {
            match fs::remove_file(&marker) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(anyhow::Error::new(e)
                        .context(format!("cannot remove {}", marker.display()))
                        .into())
                }
            }
        }
        Ok(())
    }

    pub async fn unpause(&self, app: &str) -> Result<()> {
        let m = self.manifest(app)?;
        let _guard = self.locks.lock(app).await;
        let spec = self.spec(&m)?;
        self.engine.unpause(&spec.name).await.map_err(Self::engine_err(app))
    }

    /// Removes a container stuck in a state it cannot leave (dead) and
    /// installs it again. Data folders live on the host and are untouched.
    pub async fn rebuild(&self, app: &str) -> Result<()> {
        let m = self.manifest(app)?;
        let _guard = self.locks.lock(app).await;
        let spec = self.spec(&m)?;
        match self.engine.force_remove(&spec.name).await {
            Ok(()) | Err(EngineError::NotFound { .. }) => {}
            Err(e) => {
                return Err(OrchestratorError::Engine {
                    app: app.to_owned(),
                    source: e,
                })
            }
        }
        install::install(self, &m).await.map(|_| ())
    }
}

/// The reconcile loop's versions of start, install and upgrade: they check
/// the owner's hold under the app's lock, so a stop that lands between a
/// pass's plan and its action wins, and they never clear the hold.
impl Orchestrator {
    pub async fn start_unheld(&self, app: &str) -> Result<()> {
        let m = self.manifest(app)?;
        let _guard = self.locks.lock(app).await;
        if self.is_held(app) {
            return Ok(());
        }
        let spec = self.spec(&m)?;
        self.start_with_files(&m, &spec, |e| Self::engine_err(app)(e)).await
    }

    /// Stops and starts the container, so that it reads its config files
    /// again. The container itself is kept (same id).
    pub async fn restart_unheld(&self, app: &str) -> Result<()> {
        let m = self.manifest(app)?;
        let _guard = self.locks.lock(app).await;
        if self.is_held(app) {
            return Ok(());
        }
        let spec = self.spec(&m)?;
        self.engine
            .stop(&spec.name, spec.stop_grace_period)
            .await
            .map_err(Self::engine_err(app))?;
        self.render_files(&m)?;
        self.engine.start(&spec.name).await.map_err(Self::engine_err(app))
    }

    pub async fn install_unheld(&self, app: &str) -> Result<()> {
        let m = self.manifest(app)?;
        let _guard = self.locks.lock(app).await;
        if self.is_held(app) {
            return Ok(());
        }
        install::install(self, &m).await.map(|_| ())
    }

    pub async fn upgrade_unheld(&self, app: &str) -> Result<()> {
        let m = self.manifest(app)?;
        let _guard = self.locks.lock(app).await;
        if self.is_held(app) {
            return Ok(());
        }
        install::upgrade(self, &m).await.map(|_| ())
    }
}
