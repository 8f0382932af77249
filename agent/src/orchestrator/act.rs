//! The one way to act on an app: [`Orchestrator::with_app`] takes the
//! app's lock, applies the [`HoldPolicy`], then acts. Every operation that
//! changes an app's container goes through it, for the owner's commands
//! and the reconcile loop alike; only the policy differs.

use std::future::Future;

use super::{install, InstallReport, Orchestrator, OrchestratorError, Result, UpgradeReport};
use crate::engine::EngineError;
use crate::manifest::Manifest;

/// What an act does with the owner's hold on a stopped app (see
/// [`Orchestrator::is_held`]), decided under the app's lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldPolicy {
    /// The reconcile loop's: a held app is left as it is, and the act
    /// fails with [`OrchestratorError::Held`] without running. So a stop
    /// that lands between a pass's plan and its action wins.
    Respect,
    /// The owner's install, start, restart and upgrade: the hold is lifted,
    /// then the act runs.
    Release,
    /// The owner's stop and remove: the hold is placed before the act, so
    /// a pass between the act and the marker cannot start the app again.
    Place,
}

impl Orchestrator {
    /// Looks up `app`'s manifest, takes its lock, applies `hold`, and runs
    /// `act` with the manifest, still under the lock.
    pub(super) async fn with_app<T, F, Fut>(&self, app: &str, hold: HoldPolicy, act: F) -> Result<T>
    where
        F: FnOnce(Manifest) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let m = self.manifest(app)?;
        let _guard = self.locks.lock(app).await;
        match hold {
            HoldPolicy::Respect if self.is_held(app) => return Err(OrchestratorError::Held { app: app.to_owned() }),
            HoldPolicy::Respect => {}
            HoldPolicy::Release => self.set_held(app, false)?,
            HoldPolicy::Place => self.set_held(app, true)?,
        }
        act(m).await
    }

    /// Maps an engine error about `app`'s container `container`: a missing
    /// container is [`OrchestratorError::NotInstalled`].
    pub(super) fn not_installed<'a>(
        app: &'a str,
        container: &'a str,
    ) -> impl Fn(EngineError) -> OrchestratorError + 'a {
        move |e| match e {
            EngineError::NotFound { .. } => OrchestratorError::NotInstalled {
                app: app.to_owned(),
                container: container.to_owned(),
            },
            e => Self::engine_err(app)(e),
        }
    }

    /// Gets the image, prepares the host and creates and starts the
    /// container (see [`super::ContainerOrchestrator::install`]).
    pub async fn install_app(&self, app: &str, hold: HoldPolicy) -> Result<InstallReport> {
        self.with_app(app, hold, |m| async move { install::install(self, &m).await })
            .await
    }

    /// Renders the config files and starts the installed container.
    pub async fn start_app(&self, app: &str, hold: HoldPolicy) -> Result<()> {
        self.with_app(app, hold, |m| async move {
            let spec = self.spec(&m).await?;
            self.start_with_files(&m, &spec, Self::not_installed(app, &spec.name))
                .await
        })
        .await
    }

    /// Stops and starts the container, so that it reads its config files
    /// again (an adopted one's files are left as they are). The container
    /// itself is kept (same id).
    pub async fn restart_app(&self, app: &str, hold: HoldPolicy) -> Result<()> {
        self.with_app(app, hold, |m| async move {
            let spec = self.spec(&m).await?;
            let not_installed = Self::not_installed(app, &spec.name);
            self.engine
                .stop(&spec.name, spec.stop_grace_period)
                .await
                .map_err(&not_installed)?;
            if !self.is_adopted(app, &spec.name).await? {
                self.render_files(&m).await?;
            }
            self.engine.start(&spec.name).await.map_err(not_installed)
        })
        .await
    }

    /// Replaces the container with one from the current manifest (see
    /// [`super::ContainerOrchestrator::upgrade`]).
    pub async fn upgrade_app(&self, app: &str, hold: HoldPolicy) -> Result<UpgradeReport> {
        self.with_app(app, hold, |m| async move { install::upgrade(self, &m).await })
            .await
    }

    pub async fn unpause(&self, app: &str, hold: HoldPolicy) -> Result<()> {
        self.with_app(app, hold, |m| async move {
            let spec = self.spec(&m).await?;
            self.engine.unpause(&spec.name).await.map_err(Self::engine_err(app))
        })
        .await
    }

    /// Removes a container stuck in a state it cannot leave (dead) and
    /// installs it again. Data folders live on the host and are untouched.
    /// Refused for an adopted container: only `upgrade` replaces those.
    pub async fn rebuild(&self, app: &str, hold: HoldPolicy) -> Result<()> {
        self.with_app(app, hold, |m| async move {
            let spec = self.spec(&m).await?;
            if self.is_adopted(app, &spec.name).await? {
                return Err(anyhow::anyhow!(
                    "{app}: {} was not created by the agent and is never removed; `archy-agent upgrade {app}` converts it",
                    spec.name
                )
                .into());
            }
            match self.engine.force_remove(&spec.name).await {
                Ok(()) | Err(EngineError::NotFound { .. }) => {}
                Err(e) => return Err(Self::engine_err(app)(e)),
            }
            install::install(self, &m).await.map(|_| ())
        })
        .await
    }
}
