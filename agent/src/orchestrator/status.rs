//! What an app is doing, in the words a node's owner uses. Pure: built from
//! what the engine reports and, for running apps, one health probe.

use serde::Serialize;

use crate::engine::{ContainerInfo, ContainerStatus};
use crate::spec::{LABEL_MANAGED_BY, LABEL_SPEC_HASH, LABEL_VERSION, MANAGED_BY};

/// Exit code of a process killed by SIGKILL (the OOM killer, `kill -9`).
const EXIT_KILLED: i64 = 137;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AppState {
    Running,
    /// Exited with code 0.
    Stopped,
    /// Exited with 137: SIGKILL, often the out-of-memory killer.
    Killed,
    /// Exited with any other code.
    Crashed,
    /// Created but never started.
    Created,
    Paused,
    /// Podman is between states (stopping, removing, restarting).
    Transitioning,
    /// No container.
    Missing,
}

impl std::fmt::Display for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            AppState::Running => "running",
            AppState::Stopped => "stopped",
            AppState::Killed => "killed",
            AppState::Crashed => "crashed",
            AppState::Created => "created",
            AppState::Paused => "paused",
            AppState::Transitioning => "transitioning",
            AppState::Missing => "missing",
        };
        f.write_str(s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HealthState {
    Healthy,
    /// Failing, but still inside the manifest's start period.
    Starting,
    Unhealthy,
}

impl std::fmt::Display for HealthState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HealthState::Healthy => "healthy",
            HealthState::Starting => "starting",
            HealthState::Unhealthy => "unhealthy",
        })
    }
}

/// One app's status, as `status` and `list` return it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AppStatus {
    pub app: String,
    pub container: String,
    pub state: AppState,
    /// `None` when the app is not running or declares no health check.
    pub health: Option<HealthState>,
    pub exit_code: Option<i64>,
    pub container_id: Option<String>,
    /// The version the manifest pins.
    pub version: String,
    /// The version the container was created from (its label); `None` for
    /// a missing container or one created outside the agent.
    pub running_version: Option<String>,
    /// The running container differs from the manifest's version.
    pub update_available: bool,
    /// The container carries the agent's labels.
    pub managed: bool,
    /// The spec hash differs from the manifest's: a drift.
    pub drifted: bool,
}

/// Maps engine state to an [`AppState`].
pub fn app_state(info: Option<&ContainerInfo>) -> AppState {
    let Some(info) = info else { return AppState::Missing };
    match &info.status {
        ContainerStatus::Running => AppState::Running,
        ContainerStatus::Created => AppState::Created,
        ContainerStatus::Paused => AppState::Paused,
        ContainerStatus::Exited | ContainerStatus::Stopped | ContainerStatus::Dead => match info.exit_code {
            Some(0) => AppState::Stopped,
            Some(EXIT_KILLED) => AppState::Killed,
            _ if info.oom_killed => AppState::Killed,
            Some(_) => AppState::Crashed,
            None => AppState::Stopped,
        },
        ContainerStatus::Restarting | ContainerStatus::Removing | ContainerStatus::Stopping => AppState::Transitioning,
        ContainerStatus::Other(_) => AppState::Transitioning,
    }
}

/// Builds the status of one app from what the engine reports.
pub fn app_status(
    app: &str,
    container: &str,
    manifest_version: &str,
    want_hash: &str,
    info: Option<&ContainerInfo>,
    health: Option<HealthState>,
) -> AppStatus {
    let state = app_state(info);
    let labels = info.map(|i| &i.labels);
    let managed = labels.is_some_and(|l| l.get(LABEL_MANAGED_BY).map(String::as_str) == Some(MANAGED_BY));
    let running_version = labels.and_then(|l| l.get(LABEL_VERSION)).cloned();
    let drifted = labels.is_some_and(|l| managed && l.get(LABEL_SPEC_HASH).map(String::as_str) != Some(want_hash));
    AppStatus {
        app: app.to_owned(),
        container: container.to_owned(),
        state,
        health: if state == AppState::Running { health } else { None },
        exit_code: info.and_then(|i| i.exit_code).filter(|_| state != AppState::Running),
        container_id: info.map(|i| i.id.clone()),
        version: manifest_version.to_owned(),
        update_available: running_version.as_deref().is_some_and(|v| v != manifest_version),
        running_version,
        managed,
        drifted,
    }
}
