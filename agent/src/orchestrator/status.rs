//! What an app is doing, in the words a node's owner uses. Pure: built from
//! what the engine reports and, for running apps, one health probe.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::engine::{ContainerInfo, ContainerStatus};
use crate::spec::{ContainerSpec, LABEL_MANAGED_BY, LABEL_SPEC_HASH, LABEL_VERSION, MANAGED_BY};

/// Exit code of a process killed by SIGKILL (the OOM killer, `kill -9`).
const EXIT_KILLED: i64 = 137;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
    /// A state the agent does not know (Podman's word for it is in the
    /// reconcile report): reported, never acted on.
    Unknown,
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
            AppState::Unknown => "unknown",
        };
        f.write_str(s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    /// The spec hash differs from the manifest's, or a container made by
    /// hand differs from it (see `differences`): a drift.
    pub drifted: bool,
    /// What differs, for a container made by hand (adopted): left as it
    /// is until `upgrade` converts it (see [`differences`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub differences: Vec<String>,
    /// The reconcile action running for it now, if any (see
    /// [`super::InFlightSet`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<super::InFlightStatus>,
    /// What the running agent is busy with that holds up every app's
    /// changes, e.g. "importing images (2 of 5)"; absent when nothing is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// The last action the reconcile loop took on the app, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_restart: Option<LastRestart>,
    /// Set when the engine cannot describe the app's container (its error);
    /// the state is then `unknown`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The last action the reconcile loop took on an app, as it is kept in
/// `<data>/state/agent.json` and shown by `list` and `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LastRestart {
    /// Why: `unhealthy: 3 failed probes (…)`, `exited 137`,
    /// `config changed: data/app.conf`, `no container`.
    pub reason: String,
    /// Whether the action succeeded.
    pub ok: bool,
    /// When, in Unix seconds.
    pub at: u64,
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
        ContainerStatus::Other(_) => AppState::Unknown,
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
        differences: Vec::new(),
        in_flight: None,
        agent: None,
        last_restart: None,
        error: None,
    }
}

/// What differs between a container made by hand and the one `spec`
/// describes, as a person reads it: the image (when the store has the
/// pinned one, `pinned_image_id`), the command, the entrypoint, and the
/// names (never the values) of environment variables the manifest sets
/// that are missing or have another value. Empty when nothing the agent
/// can tell differs.
pub fn differences(spec: &ContainerSpec, pinned_image_id: Option<&str>, info: &ContainerInfo) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(want) = pinned_image_id {
        if want != info.image_id {
            out.push(format!(
                "image: runs {} instead of the pinned {}",
                short_id(&info.image_id),
                short_id(want)
            ));
        }
    }
    if let Some(want) = &spec.entrypoint {
        if info.entrypoint.as_ref() != Some(want) {
            out.push(format!(
                "entrypoint: {:?} instead of {want:?}",
                info.entrypoint.clone().unwrap_or_default()
            ));
        }
    }
    if let Some(want) = &spec.command {
        if info.cmd.as_ref() != Some(want) {
            out.push(format!(
                "command: {:?} instead of {want:?}",
                info.cmd.clone().unwrap_or_default()
            ));
        }
    }
    let have: BTreeMap<&str, &str> = info.env.iter().filter_map(|kv| kv.split_once('=')).collect();
    let env: Vec<&str> = spec
        .env
        .iter()
        .filter(|(k, v)| have.get(k.as_str()) != Some(&v.as_str()))
        .map(|(k, _)| k.as_str())
        .collect();
    if !env.is_empty() {
        out.push(format!("env: {} missing or different", env.join(", ")));
    }
    out
}

/// The first 12 hex digits of a hash or id, as Podman shows ids.
pub fn short_id(hash: &str) -> &str {
    let h = hash.strip_prefix("sha256:").unwrap_or(hash);
    h.get(..12).unwrap_or(h)
}

#[cfg(test)]
mod tests {
    //! Table-driven: each row is an inspect answer captured from Podman
    //! 4.3.1 (see `agent/tests/fixtures/inspect/README.md`), read as the
    //! engine reads it, and the manifest it is compared with.

    use super::*;

    /// The manifest version every captured app was installed with, except
    /// `older-version.json` (installed as 0.9).
    const VERSION: &str = "1.0";
    /// The spec hash of `running.json`'s manifest (and of `exited-0`,
    /// `paused` and `older-version`, which share its settings).
    const SERVE_HASH: &str = "28f8b6422c9554559f3438560686b718f87e3707ebbf22c2d51ce274ab9016ba";
    /// The spec hash `drifted.json`'s manifest gave after its env changed:
    /// the label of the container `upgrade` then created from it.
    const DRIFTED_WANT: &str = "6692e0b5ba560b057a91a1e2fe937bd8111ef5eb1907d797386ced262f421de6";

    macro_rules! fixture {
        ($name:literal) => {
            (
                $name,
                include_str!(concat!("../../tests/fixtures/inspect/", $name)),
            )
        };
    }

    enum Fixture {
        File((&'static str, &'static str)),
        /// A captured answer with one text replaced: for what this host
        /// cannot produce.
        Patched((&'static str, &'static str), &'static str, &'static str),
        /// No container.
        Missing,
    }

    enum Want {
        /// The manifest is unchanged since install: the hash the
        /// container's own label carries.
        OwnLabel,
        Hash(&'static str),
    }

    struct Row {
        fixture: Fixture,
        /// The manifest's version and spec hash.
        version: &'static str,
        hash: Want,
        state: AppState,
        exit_code: Option<i64>,
        managed: bool,
        drifted: bool,
        update_available: bool,
    }

    const ROWS: &[Row] = &[
        Row {
            fixture: Fixture::File(fixture!("running.json")),
            version: VERSION,
            hash: Want::Hash(SERVE_HASH),
            state: AppState::Running,
            exit_code: None,
            managed: true,
            drifted: false,
            update_available: false,
        },
        Row {
            fixture: Fixture::File(fixture!("exited-0.json")),
            version: VERSION,
            hash: Want::Hash(SERVE_HASH),
            state: AppState::Stopped,
            exit_code: Some(0),
            managed: true,
            drifted: false,
            update_available: false,
        },
        Row {
            fixture: Fixture::File(fixture!("exited-3.json")),
            version: VERSION,
            hash: Want::OwnLabel,
            state: AppState::Crashed,
            exit_code: Some(3),
            managed: true,
            drifted: false,
            update_available: false,
        },
        Row {
            fixture: Fixture::File(fixture!("exited-137-sigkill.json")),
            version: VERSION,
            hash: Want::OwnLabel,
            state: AppState::Killed,
            exit_code: Some(137),
            managed: true,
            drifted: false,
            update_available: false,
        },
        // A real OOM kill; this host's Podman (cgroups v1) leaves OOMKilled
        // false, so the exit code alone must say killed.
        Row {
            fixture: Fixture::File(fixture!("exited-137-oom.json")),
            version: VERSION,
            hash: Want::OwnLabel,
            state: AppState::Killed,
            exit_code: Some(137),
            managed: true,
            drifted: false,
            update_available: false,
        },
        // Where OOMKilled is reported, it says killed whatever the code
        // (a shell whose child the OOM killer took exits with its own).
        Row {
            fixture: Fixture::Patched(fixture!("exited-3.json"), "\"OOMKilled\": false", "\"OOMKilled\": true"),
            version: VERSION,
            hash: Want::OwnLabel,
            state: AppState::Killed,
            exit_code: Some(3),
            managed: true,
            drifted: false,
            update_available: false,
        },
        // A state this agent does not know: reported as such, never as a
        // passing one.
        Row {
            fixture: Fixture::Patched(
                fixture!("running.json"),
                "\"Status\": \"running\"",
                "\"Status\": \"exploded\"",
            ),
            version: VERSION,
            hash: Want::OwnLabel,
            state: AppState::Unknown,
            exit_code: None,
            managed: true,
            drifted: false,
            update_available: false,
        },
        // install's start failed (no such executable): created, never ran.
        Row {
            fixture: Fixture::File(fixture!("created-start-failed.json")),
            version: VERSION,
            hash: Want::OwnLabel,
            state: AppState::Created,
            exit_code: None,
            managed: true,
            drifted: false,
            update_available: false,
        },
        Row {
            fixture: Fixture::File(fixture!("paused.json")),
            version: VERSION,
            hash: Want::Hash(SERVE_HASH),
            state: AppState::Paused,
            exit_code: None,
            managed: true,
            drifted: false,
            update_available: false,
        },
        Row {
            fixture: Fixture::File(fixture!("stopping.json")),
            version: VERSION,
            hash: Want::OwnLabel,
            state: AppState::Transitioning,
            exit_code: None,
            managed: true,
            drifted: false,
            update_available: false,
        },
        // Podman's brief `stopped` (engine fixture), labelled by hand
        // without a hash or version: managed, and a drift.
        Row {
            fixture: Fixture::File((
                "engine/podman-4.3.1-inspect_stopped.json",
                include_str!("../../tests/fixtures/engine/podman-4.3.1-inspect_stopped.json"),
            )),
            version: VERSION,
            hash: Want::Hash(SERVE_HASH),
            state: AppState::Stopped,
            exit_code: Some(0),
            managed: true,
            drifted: true,
            update_available: false,
        },
        // Created with `podman run`, no labels: never managed, so never a
        // drift or an update, whatever the manifest says.
        Row {
            fixture: Fixture::File(fixture!("unlabelled-running.json")),
            version: VERSION,
            hash: Want::Hash(SERVE_HASH),
            state: AppState::Running,
            exit_code: None,
            managed: false,
            drifted: false,
            update_available: false,
        },
        Row {
            fixture: Fixture::File(fixture!("drifted.json")),
            version: VERSION,
            hash: Want::Hash(DRIFTED_WANT),
            state: AppState::Running,
            exit_code: None,
            managed: true,
            drifted: true,
            update_available: false,
        },
        // The same container against its unchanged manifest.
        Row {
            fixture: Fixture::File(fixture!("drifted.json")),
            version: VERSION,
            hash: Want::OwnLabel,
            state: AppState::Running,
            exit_code: None,
            managed: true,
            drifted: false,
            update_available: false,
        },
        // Installed as 0.9, the manifest now says 1.0 (same settings).
        Row {
            fixture: Fixture::File(fixture!("older-version.json")),
            version: VERSION,
            hash: Want::Hash(SERVE_HASH),
            state: AppState::Running,
            exit_code: None,
            managed: true,
            drifted: false,
            update_available: true,
        },
        Row {
            fixture: Fixture::Missing,
            version: VERSION,
            hash: Want::Hash(SERVE_HASH),
            state: AppState::Missing,
            exit_code: None,
            managed: false,
            drifted: false,
            update_available: false,
        },
    ];

    fn read(fixture: &Fixture) -> (String, Option<ContainerInfo>) {
        let (name, text) = match fixture {
            Fixture::Missing => return ("(no container)".to_owned(), None),
            Fixture::File((name, text)) => ((*name).to_owned(), (*text).to_owned()),
            Fixture::Patched((name, text), from, to) => {
                assert!(text.contains(from), "{name} has no {from:?} to patch");
                (format!("{name} with {to}"), text.replace(from, to))
            }
        };
        let info = ContainerInfo::from_inspect_json(&text).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        (name, Some(info))
    }

    #[test]
    fn captured_inspect_answers_map_to_state_exit_code_managed_drift_and_update() {
        let mut wrong = Vec::new();
        for row in ROWS {
            let (name, info) = read(&row.fixture);
            let label = |key: &str| info.as_ref().and_then(|i| i.labels.get(key)).cloned();
            let hash = match row.hash {
                Want::OwnLabel => label(LABEL_SPEC_HASH).unwrap_or_else(|| panic!("{name} has no spec hash")),
                Want::Hash(h) => h.to_owned(),
            };
            let state = app_state(info.as_ref());
            if state != row.state {
                wrong.push(format!("{name}: app_state {state:?}, expected {:?}", row.state));
            }
            let s = app_status(
                "app",
                "container",
                row.version,
                &hash,
                info.as_ref(),
                Some(HealthState::Healthy),
            );
            let got = (s.state, s.exit_code, s.managed, s.drifted, s.update_available);
            let want = (row.state, row.exit_code, row.managed, row.drifted, row.update_available);
            if got != want {
                wrong.push(format!(
                    "{name}: (state, exit_code, managed, drifted, update_available) is {got:?}, expected {want:?}"
                ));
            }
            // What every row shares: ids and versions passed through, and
            // a health only for a running app.
            let health = (row.state == AppState::Running).then_some(HealthState::Healthy);
            let passed = (
                s.container_id.clone(),
                s.running_version.clone(),
                s.version.clone(),
                s.health,
            );
            let expected = (
                info.as_ref().map(|i| i.id.clone()),
                label(LABEL_VERSION),
                row.version.to_owned(),
                health,
            );
            if passed != expected {
                wrong.push(format!(
                    "{name}: (container_id, running_version, version, health) is {passed:?}, expected {expected:?}"
                ));
            }
        }
        assert!(wrong.is_empty(), "{} row(s) wrong:\n{}", wrong.len(), wrong.join("\n"));
    }

    #[test]
    fn the_table_covers_every_app_state() {
        let covered: Vec<AppState> = ROWS.iter().map(|r| r.state).collect();
        for state in [
            AppState::Running,
            AppState::Stopped,
            AppState::Killed,
            AppState::Crashed,
            AppState::Created,
            AppState::Paused,
            AppState::Transitioning,
            AppState::Missing,
            AppState::Unknown,
        ] {
            assert!(covered.contains(&state), "no row for {state}");
        }
    }

    #[test]
    fn a_fixture_that_is_not_an_inspect_answer_is_a_decode_error() {
        let err = ContainerInfo::from_inspect_json("[]").expect_err("a list is no container");
        assert!(matches!(err, crate::engine::EngineError::Decode { .. }), "{err:?}");
        let err = ContainerInfo::from_inspect_json("{").expect_err("not JSON");
        assert!(matches!(err, crate::engine::EngineError::Decode { .. }), "{err:?}");
    }

    /// `unlabelled-running.json`: made with `podman run … sleep 300`.
    fn hand_made() -> ContainerInfo {
        ContainerInfo::from_inspect_json(include_str!("../../tests/fixtures/inspect/unlabelled-running.json"))
            .expect("fixture parses")
    }

    fn spec_for(info: &ContainerInfo) -> ContainerSpec {
        let app = crate::manifest::AppId::parse("demo").expect("a valid id");
        let mut spec = ContainerSpec::for_image(app, "demo", "reg/demo@sha256:abc".into());
        spec.command = info.cmd.clone();
        spec.env = BTreeMap::from([("TERM".to_owned(), "xterm".to_owned())]);
        spec
    }

    #[test]
    fn a_hand_made_container_that_matches_shows_no_difference() {
        let info = hand_made();
        let spec = spec_for(&info);
        assert_eq!(differences(&spec, Some(&info.image_id), &info), Vec::<String>::new());
        assert_eq!(
            differences(&spec, None, &info),
            Vec::<String>::new(),
            "an image the store lacks cannot be compared"
        );
    }

    #[test]
    fn a_hand_made_container_shows_each_difference_and_never_an_env_value() {
        let info = hand_made();
        let mut spec = spec_for(&info);
        spec.command = Some(vec!["serve".to_owned()]);
        spec.entrypoint = Some(vec!["/bin/app".to_owned()]);
        spec.env.insert("RPC_PASSWORD".to_owned(), "hunter2-secret".to_owned());
        spec.env.insert("TERM".to_owned(), "dumb".to_owned());
        let got = differences(&spec, Some("sha256:0123456789abcdef"), &info);
        assert_eq!(
            got,
            [
                "image: runs 4f3f6b13bb6a instead of the pinned 0123456789ab",
                "entrypoint: [] instead of [\"/bin/app\"]",
                "command: [\"sleep\", \"300\"] instead of [\"serve\"]",
                "env: RPC_PASSWORD, TERM missing or different",
            ]
        );
        assert!(!got.concat().contains("hunter2") && !got.concat().contains("dumb"));
    }
}
