//! The pure heart of reconciliation: what should happen to each app, from
//! what is wanted (manifests), what is there (the engine's listing) and
//! what the agent remembers (backoff, drift history, adoptions).
//!
//! No I/O and no clock here: `now` comes in as a value, so every rule is
//! a table-driven unit test. Adoption is one case of the plan.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use super::backoff;
use crate::engine::{ContainerStatus, ContainerSummary};
use crate::manifest::AppId;
use crate::orchestrator::{short_id, InFlight};
use crate::spec::{LABEL_MANAGED_BY, LABEL_SPEC_HASH, MANAGED_BY};

/// Drift recreates within this window count towards a drift loop.
pub const DRIFT_WINDOW: Duration = Duration::from_secs(600);
/// This many drift recreates within the window make a drift loop.
pub const DRIFT_LOOP_AFTER: usize = 3;

/// What the manifests want for one app.
#[derive(Debug, Clone)]
pub struct Desired {
    pub app: AppId,
    pub container: String,
    pub spec_hash: String,
    pub depends_on: Vec<AppId>,
    /// How a container created by hand (no labels) differs from the
    /// manifest (see [`crate::orchestrator::differences`]); empty for the agent's own.
    pub differences: Vec<String>,
    /// Stopped by its owner (`archy-agent stop`): reconcile leaves it be.
    pub held: bool,
    /// The action running for it now, if any: never a second one.
    pub in_flight: Option<InFlight>,
    /// The manifest's health check, as the restart rule reads it.
    pub health: Option<HealthRule>,
    /// The engine lists the container but cannot describe it: its error.
    /// Every doubt means no: the app is reported and left alone.
    pub unobservable: Option<String>,
}

/// When failing probes make a running app unhealthy (the manifest's
/// `health:`): after `start_period` since it started, `retries` failed
/// probes in a row, one every `interval`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthRule {
    pub interval: Duration,
    pub retries: u32,
    pub start_period: Duration,
}

/// The last action the agent took on an app, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restarted {
    /// As a person reads it: `unhealthy: 3 failed probes (…)`,
    /// `exited 137`, `config changed: data/app.conf`.
    pub reason: String,
    /// Whether the action succeeded.
    pub ok: bool,
    pub at: Instant,
}

/// What the agent remembers about one app between passes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppMemory {
    /// Restarts (or installs) that did not lead to a lasting run.
    pub failures: u32,
    /// No restart before this instant.
    pub next_try: Option<Instant>,
    /// When the app was first seen running in the current run of it.
    pub running_since: Option<Instant>,
    /// Recent drift recreates.
    pub drift_recreates: Vec<Instant>,
    /// Set once drift recreates loop; cleared when the manifest changes.
    pub drift_loop_hash: Option<String>,
    /// The container id claimed by adoption.
    pub adopted: Option<String>,
    /// Config files rewritten since the container last started, as the
    /// manifest names them: a running container gets restarted to read
    /// them. Kept across passes and agent restarts until a start succeeds.
    pub config_changed: Vec<String>,
    /// Failed health probes in a row since the container last started,
    /// counted only after its start period.
    pub probe_failures: u32,
    /// When the app was last probed; `None` since it (re)started.
    pub last_probe: Option<Instant>,
    /// What the last failed probe said.
    pub last_probe_error: Option<String>,
    /// The last action taken on the app and why (shown by `list`).
    pub last_restart: Option<Restarted>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum Action {
    /// No container: create it.
    Install,
    /// A container that is not running: start it.
    Start,
    Unpause,
    /// A running container whose config files changed: stop and start it
    /// again (the same container) so that it reads them.
    Restart {
        reason: String,
    },
    /// A running container whose health probes failed `retries` times in
    /// a row after its start period: stop and start it again. Counts as a
    /// failure for the crash-loop backoff, like a crash.
    RestartUnhealthy {
        reason: String,
    },
    /// The container no longer matches the manifest: replace it, keeping
    /// the data.
    Recreate {
        reason: String,
    },
    /// One of the agent's containers stuck dead: remove and create again,
    /// keeping the data. Never a container it did not create.
    Rebuild {
        state: String,
    },
    /// Claim an existing container by name. Read-only: never stops,
    /// recreates or renames it.
    Adopt {
        container_id: String,
    },
}

impl Action {
    /// The action's name, as the report spells it.
    pub fn name(&self) -> &'static str {
        match self {
            Action::Install => "install",
            Action::Start => "start",
            Action::Unpause => "unpause",
            Action::Restart { .. } => "restart",
            Action::RestartUnhealthy { .. } => "restart-unhealthy",
            Action::Recreate { .. } => "recreate",
            Action::Rebuild { .. } => "rebuild",
            Action::Adopt { .. } => "adopt",
        }
    }
}

/// Why an app is left alone this pass.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", rename_all = "kebab-case")]
pub enum Wait {
    /// An action started by an earlier pass is still running (a pull, a
    /// build, a health wait): its outcome is recorded when it ends.
    InFlight {
        action: String,
        #[serde(skip)]
        since: Instant,
        for_secs: u64,
    },
    /// Running and matching its manifest.
    Ok,
    /// A dependency is not running.
    Dependency { app: String, state: String },
    /// Backing off after failures; retried at the deadline.
    Backoff {
        #[serde(skip)]
        until: Instant,
        in_secs: u64,
        failures: u32,
    },
    /// Recreated for drift again and again: the agent stops touching it.
    DriftLoop,
    /// Podman is moving it between states.
    Transitioning { state: String },
    /// An adopted container (made by hand) that differs from its manifest:
    /// reported and left as it is until its owner converts it
    /// (`archy-agent upgrade APP`).
    Drift { differences: Vec<String> },
    /// A state the agent does not know: reported, never acted on.
    UnknownState { state: String },
    /// An adopted container that is dead: the agent never removes a
    /// container it did not create; `upgrade` converts it.
    AdoptedDead,
    /// Stopped by its owner.
    Held,
    /// The engine lists the container but cannot describe it (its error):
    /// reported, never acted on.
    Unobservable { error: String },
    /// The node runs an OS release on trial (`/run/archipelago/os/boot.json`):
    /// no app is installed or recreated until the release is committed,
    /// so a rollback finds the apps as the old release left them.
    /// `action` is what waits; `why` says it as [`OS_TRIAL_WAIT`].
    OsTrial { action: String, why: String },
}

/// What an app change waiting for the OS commit says.
pub const OS_TRIAL_WAIT: &str = "OS update on trial: app changes wait for the commit";

/// The node-wide facts the plan reads besides the apps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeFacts {
    /// An OS release on trial: no Install or Recreate (starts and
    /// restarts of existing containers go on).
    pub os_trial: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Decision {
    Act(Action),
    Wait(Wait),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AppPlan {
    pub app: String,
    pub container: String,
    pub decision: Decision,
    /// Why the action is taken, as a person reads it (`None` when waiting).
    pub reason: Option<String>,
}

/// Whether a listed container counts as up, for dependants.
fn is_up(c: &ContainerSummary) -> bool {
    c.status == ContainerStatus::Running
}

fn is_managed(c: &ContainerSummary) -> bool {
    c.labels.get(LABEL_MANAGED_BY).map(String::as_str) == Some(MANAGED_BY)
}

/// Plans one pass. `desired` is in start order; `observed` is the engine's
/// listing keyed by container name; `node` the node-wide facts (an OS
/// trial freezes app changes).
pub fn plan(
    desired: &[Desired],
    observed: &BTreeMap<String, ContainerSummary>,
    memory: &BTreeMap<AppId, AppMemory>,
    node: NodeFacts,
    now: Instant,
) -> Vec<AppPlan> {
    let container_of: BTreeMap<&AppId, &str> = desired.iter().map(|d| (&d.app, d.container.as_str())).collect();
    let unobservable: BTreeSet<&AppId> = desired
        .iter()
        .filter(|d| d.unobservable.is_some())
        .map(|d| &d.app)
        .collect();
    let empty = AppMemory::default();
    desired
        .iter()
        .map(|d| {
            let mem = memory.get(&d.app).unwrap_or(&empty);
            let container = observed.get(&d.container);
            let decision = frozen(
                node,
                decide(d, container, mem, &container_of, &unobservable, observed, node, now),
            );
            let reason = match &decision {
                Decision::Act(action) => reason_for(action, container),
                Decision::Wait(_) => None,
            };
            AppPlan {
                app: d.app.to_string(),
                container: d.container.clone(),
                decision,
                reason,
            }
        })
        .collect()
}

/// While the OS is on trial, an install or a recreate waits.
fn frozen(node: NodeFacts, decision: Decision) -> Decision {
    match decision {
        Decision::Act(action @ (Action::Install | Action::Recreate { .. })) if node.os_trial => {
            Decision::Wait(Wait::OsTrial {
                action: action.name().to_owned(),
                why: OS_TRIAL_WAIT.to_owned(),
            })
        }
        d => d,
    }
}

fn backoff_or(mem: &AppMemory, now: Instant, action: Action) -> Decision {
    match mem.next_try {
        Some(until) if until > now => Decision::Wait(Wait::Backoff {
            until,
            in_secs: (until - now).as_secs(),
            failures: mem.failures,
        }),
        _ => Decision::Act(action),
    }
}

/// Why `action` is taken on `container`, as `list` and the report say it.
/// `None` for a claim, which is no action on the container.
fn reason_for(action: &Action, container: Option<&ContainerSummary>) -> Option<String> {
    Some(match action {
        Action::Install => "no container".to_owned(),
        Action::Start => match container.map(|c| (&c.status, c.exit_code)) {
            Some((ContainerStatus::Created, _)) => "created, never started".to_owned(),
            Some((_, Some(code))) => format!("exited {code}"),
            Some((status, None)) => status.to_string(),
            None => "not running".to_owned(),
        },
        Action::Unpause => "paused".to_owned(),
        Action::Restart { reason } | Action::RestartUnhealthy { reason } | Action::Recreate { reason } => {
            reason.clone()
        }
        Action::Rebuild { state } => state.clone(),
        Action::Adopt { .. } => return None,
    })
}

#[allow(clippy::too_many_arguments)]
fn decide(
    d: &Desired,
    container: Option<&ContainerSummary>,
    mem: &AppMemory,
    container_of: &BTreeMap<&AppId, &str>,
    unobservable: &BTreeSet<&AppId>,
    observed: &BTreeMap<String, ContainerSummary>,
    node: NodeFacts,
    now: Instant,
) -> Decision {
    if let Some(f) = &d.in_flight {
        return Decision::Wait(Wait::InFlight {
            action: f.action.clone(),
            since: f.since,
            for_secs: now.saturating_duration_since(f.since).as_secs(),
        });
    }
    // Every doubt means no: a container the engine cannot describe is
    // never started, replaced or claimed.
    if let Some(error) = &d.unobservable {
        return Decision::Wait(Wait::Unobservable { error: error.clone() });
    }
    if mem.drift_loop_hash.as_deref() == Some(d.spec_hash.as_str()) {
        return Decision::Wait(Wait::DriftLoop);
    }
    if d.held {
        return Decision::Wait(Wait::Held);
    }
    // Dependencies first: an app whose dependency is not up waits.
    for dep in &d.depends_on {
        let Some(name) = container_of.get(dep) else { continue };
        if unobservable.contains(dep) {
            return Decision::Wait(Wait::Dependency {
                app: dep.to_string(),
                state: "unobservable".to_owned(),
            });
        }
        let dep_state = observed.get(*name);
        if !dep_state.is_some_and(is_up) {
            return Decision::Wait(Wait::Dependency {
                app: dep.to_string(),
                state: dep_state.map_or("missing".to_owned(), |c| c.status.to_string()),
            });
        }
    }
    let Some(c) = container else {
        return backoff_or(mem, now, Action::Install);
    };

    // A container made by hand is claimed, never stopped, removed or
    // recreated: what differs is reported until its owner converts it.
    if !is_managed(c) {
        if mem.adopted.as_deref() != Some(c.id.as_str()) {
            return Decision::Act(Action::Adopt {
                container_id: c.id.clone(),
            });
        }
        if !d.differences.is_empty() {
            return Decision::Wait(Wait::Drift {
                differences: d.differences.clone(),
            });
        }
        if c.status == ContainerStatus::Dead {
            return Decision::Wait(Wait::AdoptedDead);
        }
    }

    // Drift of the agent's own container: another spec hash.
    let have = c.labels.get(LABEL_SPEC_HASH).map(String::as_str).unwrap_or("");
    if is_managed(c) && have != d.spec_hash {
        let reason = format!(
            "spec hash {} differs from the manifest's {}",
            short_id(have),
            short_id(&d.spec_hash)
        );
        let recent = mem
            .drift_recreates
            .iter()
            .filter(|t| now.saturating_duration_since(**t) < DRIFT_WINDOW)
            .count();
        if recent >= DRIFT_LOOP_AFTER {
            return Decision::Wait(Wait::DriftLoop);
        }
        // On an OS trial the old container stays until the commit, and is
        // started again when it is down.
        if node.os_trial {
            return match c.status {
                ContainerStatus::Created | ContainerStatus::Exited | ContainerStatus::Stopped => {
                    backoff_or(mem, now, Action::Start)
                }
                ContainerStatus::Paused => Decision::Act(Action::Unpause),
                _ => frozen(node, Decision::Act(Action::Recreate { reason })),
            };
        }
        return backoff_or(mem, now, Action::Recreate { reason });
    }
    match &c.status {
        ContainerStatus::Running if !mem.config_changed.is_empty() => backoff_or(
            mem,
            now,
            Action::Restart {
                reason: format!("config changed: {}", mem.config_changed.join(", ")),
            },
        ),
        ContainerStatus::Running => match unhealthy(d, c, mem, now) {
            Some(reason) => backoff_or(mem, now, Action::RestartUnhealthy { reason }),
            None => Decision::Wait(Wait::Ok),
        },
        ContainerStatus::Created | ContainerStatus::Exited | ContainerStatus::Stopped => {
            backoff_or(mem, now, Action::Start)
        }
        ContainerStatus::Paused => Decision::Act(Action::Unpause),
        ContainerStatus::Stopping | ContainerStatus::Removing | ContainerStatus::Restarting => {
            Decision::Wait(Wait::Transitioning {
                state: c.status.to_string(),
            })
        }
        ContainerStatus::Dead => backoff_or(
            mem,
            now,
            Action::Rebuild {
                state: c.status.to_string(),
            },
        ),
        ContainerStatus::Other(state) => Decision::Wait(Wait::UnknownState { state: state.clone() }),
    }
}

/// Why a running container counts as unhealthy, or `None`: only one the
/// agent created (an adopted one is never stopped unasked), with a health
/// check, past its start period since the agent saw it start, whose
/// probes failed `retries` times in a row.
fn unhealthy(d: &Desired, c: &ContainerSummary, mem: &AppMemory, now: Instant) -> Option<String> {
    let rule = d.health?;
    let past_start = mem
        .running_since
        .is_some_and(|since| now.saturating_duration_since(since) >= rule.start_period);
    if !is_managed(c) || !past_start || mem.probe_failures < rule.retries {
        return None;
    }
    let last = mem
        .last_probe_error
        .as_deref()
        .map(|e| format!(" (last: {e})"))
        .unwrap_or_default();
    Some(format!("unhealthy: {} failed probes{last}", mem.probe_failures))
}

/// The health rule of `d` when its container `c` is one to probe: running,
/// the agent's own, with a health check, neither held nor unobservable.
fn probed(d: &Desired, c: Option<&ContainerSummary>) -> Option<HealthRule> {
    let c = c?;
    let probed = !d.held && d.unobservable.is_none() && c.status == ContainerStatus::Running && is_managed(c);
    d.health.filter(|_| probed)
}

/// Whether the app of `d` is due a health probe at `now`: probed last at
/// least an interval ago, or not since it started.
pub fn probe_due(d: &Desired, c: Option<&ContainerSummary>, mem: &AppMemory, now: Instant) -> bool {
    probed(d, c).is_some_and(|rule| {
        mem.last_probe
            .is_none_or(|last| now.saturating_duration_since(last) >= rule.interval)
    })
}

/// When the next health probe of `d` falls due.
pub fn next_probe(d: &Desired, c: Option<&ContainerSummary>, mem: &AppMemory, now: Instant) -> Option<Instant> {
    let rule = probed(d, c)?;
    Some(mem.last_probe.unwrap_or(now) + rule.interval)
}

/// Counts one probe of a running app: a pass resets the count, a failure
/// adds one once the start period is over (a failure during it does not
/// count, as with Podman's own healthchecks).
pub fn record_probe(mem: &mut AppMemory, rule: &HealthRule, ok: bool, detail: &str, now: Instant) {
    mem.last_probe = Some(now);
    if ok {
        mem.probe_failures = 0;
        mem.last_probe_error = None;
        return;
    }
    let past_start = mem
        .running_since
        .is_some_and(|since| now.saturating_duration_since(since) >= rule.start_period);
    if past_start {
        mem.probe_failures = mem.probe_failures.saturating_add(1);
        mem.last_probe_error = Some(detail.to_owned());
    }
}

/// Updates `mem` after the pass that saw the app in `status` ran `action`
/// with `ok`. Pure, so the backoff rule is testable with any clock.
pub fn record(mem: &mut AppMemory, decision: &Decision, ok: bool, spec_hash: &str, now: Instant) {
    match decision {
        Decision::Wait(Wait::Ok) => {
            let since = *mem.running_since.get_or_insert(now);
            if now.saturating_duration_since(since) >= backoff::RESET_AFTER {
                mem.failures = 0;
                mem.next_try = None;
            }
        }
        Decision::Act(Action::Adopt { container_id }) => {
            mem.adopted = Some(container_id.clone());
        }
        Decision::Act(action) => {
            mem.running_since = None;
            // A new run: its probes count afresh.
            mem.probe_failures = 0;
            mem.last_probe = None;
            mem.last_probe_error = None;
            if let Action::Recreate { .. } = action {
                mem.drift_recreates
                    .retain(|t| now.saturating_duration_since(*t) < DRIFT_WINDOW);
                mem.drift_recreates.push(now);
                if mem.drift_recreates.len() >= DRIFT_LOOP_AFTER {
                    mem.drift_loop_hash = Some(spec_hash.to_owned());
                }
            }
            // Whatever started the app's process read its config files.
            if ok && !matches!(action, Action::Unpause) {
                mem.config_changed.clear();
            }
            // Every restart counts until the app stays up: a container that
            // starts fine and crashes a second later is a crash loop too.
            if matches!(
                action,
                Action::Start | Action::Rebuild { .. } | Action::RestartUnhealthy { .. }
            ) || !ok
            {
                mem.failures = mem.failures.saturating_add(1);
                mem.next_try = Some(now + backoff::delay(mem.failures));
            }
        }
        Decision::Wait(_) => {}
    }
}

/// Remembers why the planned action was taken and whether it worked, for
/// `list` and `status`.
pub fn note_restart(mem: &mut AppMemory, reason: Option<&str>, ok: bool, now: Instant) {
    if let Some(reason) = reason {
        mem.last_restart = Some(Restarted {
            reason: reason.to_owned(),
            ok,
            at: now,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::model::parse_summaries;

    /// The engine's listing as Podman 4.3.1 really answered it
    /// (`tests/fixtures/engine/podman-4.3.1-list.json`): created, stopped,
    /// stopping and running containers, with and without our labels.
    fn captured() -> BTreeMap<String, ContainerSummary> {
        let text = include_str!("../../tests/fixtures/engine/podman-4.3.1-list.json");
        let value: serde_json::Value = serde_json::from_str(text).expect("fixture is JSON");
        parse_summaries(&value)
            .expect("fixture parses")
            .into_iter()
            .map(|c| (c.name.clone(), c))
            .collect()
    }

    fn id(s: &str) -> AppId {
        AppId::parse(s).expect("valid id")
    }

    fn desired(app: &str, container: &str) -> Desired {
        Desired {
            app: id(app),
            container: container.to_owned(),
            spec_hash: "want".to_owned(),
            depends_on: Vec::new(),
            differences: Vec::new(),
            held: false,
            in_flight: None,
            health: None,
            unobservable: None,
        }
    }

    /// Gives a listed container our labels with `hash`.
    fn managed(observed: &mut BTreeMap<String, ContainerSummary>, name: &str, hash: &str) {
        let c = observed.get_mut(name).expect("fixture container");
        c.labels.insert(LABEL_MANAGED_BY.to_owned(), MANAGED_BY.to_owned());
        c.labels.insert(LABEL_SPEC_HASH.to_owned(), hash.to_owned());
    }

    fn decision_of(
        d: Desired,
        observed: &BTreeMap<String, ContainerSummary>,
        mem: AppMemory,
        now: Instant,
    ) -> Decision {
        let memory = BTreeMap::from([(d.app.clone(), mem)]);
        plan(&[d], observed, &memory, NodeFacts::default(), now)
            .remove(0)
            .decision
    }

    #[tokio::test]
    async fn each_observed_state_gets_its_decision() {
        let now = Instant::now();
        let recreate = |reason: &str| {
            Decision::Act(Action::Recreate {
                reason: reason.to_owned(),
            })
        };
        // (container, managed with hash, expected)
        let table: Vec<(&str, Option<&str>, Decision)> = vec![
            ("absent", None, Decision::Act(Action::Install)),
            ("fixture-app", Some("want"), Decision::Act(Action::Start)),
            ("fixture-created", Some("want"), Decision::Act(Action::Start)),
            ("fixture-pod-infra", Some("want"), Decision::Wait(Wait::Ok)),
            (
                "fixture-stopping",
                Some("want"),
                Decision::Wait(Wait::Transitioning {
                    state: "stopping".to_owned(),
                }),
            ),
            (
                "fixture-pod-infra",
                Some("old"),
                recreate("spec hash old differs from the manifest's want"),
            ),
            // Made by hand (no labels): claimed, untouched.
            (
                "fixture-pod-member",
                None,
                Decision::Act(Action::Adopt {
                    container_id: String::new(),
                }),
            ),
        ];
        for (container, hash, want) in table {
            let mut observed = captured();
            if let Some(hash) = hash {
                managed(&mut observed, container, hash);
            }
            let d = desired("demo", container);
            let got = decision_of(d, &observed, AppMemory::default(), now);
            let want = match want {
                Decision::Act(Action::Adopt { .. }) => Decision::Act(Action::Adopt {
                    container_id: observed[container].id.clone(),
                }),
                other => other,
            };
            assert_eq!(got, want, "container {container}, hash {hash:?}");
        }
    }

    /// An OS release on trial: no install and no recreate (they wait,
    /// saying why), but starts, restarts and claims go on; the same table
    /// plans normally once committed.
    #[tokio::test]
    async fn an_os_trial_freezes_installs_and_recreates_only() {
        let now = Instant::now();
        let trial = NodeFacts { os_trial: true };
        let waits = |action: &str| {
            Decision::Wait(Wait::OsTrial {
                action: action.to_owned(),
                why: OS_TRIAL_WAIT.to_owned(),
            })
        };
        // (container, managed with hash, memory, on trial, committed)
        let table: Vec<(&str, Option<&str>, AppMemory, Decision, &str)> = vec![
            ("absent", None, AppMemory::default(), waits("install"), "install"),
            (
                "fixture-pod-infra",
                Some("old"),
                AppMemory::default(),
                waits("recreate"),
                "recreate",
            ),
            (
                "fixture-app",
                Some("want"),
                AppMemory::default(),
                Decision::Act(Action::Start),
                "start",
            ),
            // A stopped container of an older manifest: started as it is on
            // trial, replaced once committed.
            (
                "fixture-app",
                Some("old"),
                AppMemory::default(),
                Decision::Act(Action::Start),
                "recreate",
            ),
            (
                "fixture-pod-infra",
                Some("want"),
                config_changed(),
                Decision::Act(Action::Restart {
                    reason: "config changed: data/app.conf".to_owned(),
                }),
                "restart",
            ),
            (
                "fixture-pod-infra",
                Some("want"),
                AppMemory::default(),
                Decision::Wait(Wait::Ok),
                "",
            ),
        ];
        for (container, hash, mem, on_trial, committed) in table {
            let mut observed = captured();
            if let Some(hash) = hash {
                managed(&mut observed, container, hash);
            }
            let d = desired("demo", container);
            let memory = BTreeMap::from([(d.app.clone(), mem)]);
            let p = plan(std::slice::from_ref(&d), &observed, &memory, trial, now).remove(0);
            assert_eq!(p.decision, on_trial, "on trial: {container} {hash:?}");
            assert_eq!(p.reason.is_some(), matches!(on_trial, Decision::Act(_)));
            let p = plan(&[d], &observed, &memory, NodeFacts::default(), now).remove(0);
            let name = match &p.decision {
                Decision::Act(a) => a.name(),
                Decision::Wait(_) => "",
            };
            assert_eq!(name, committed, "committed: {container} {hash:?}");
        }
        let json = serde_json::to_value(waits("install")).unwrap_or_default();
        assert_eq!(json["wait"]["reason"], "os-trial", "{json}");
    }

    /// Memory of an app whose hand-made container `name` was claimed.
    fn claimed(observed: &BTreeMap<String, ContainerSummary>, name: &str) -> AppMemory {
        AppMemory {
            adopted: Some(observed[name].id.clone()),
            ..AppMemory::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_adopted_container_that_differs_is_reported_and_never_replaced() {
        let observed = captured();
        let mut d = desired("demo", "fixture-pod-member");
        d.differences = vec!["image: runs 5cd7c9e3c457 instead of the pinned 0123456789ab".to_owned()];
        // Unclaimed, it is claimed first, whatever differs.
        assert_eq!(
            decision_of(d.clone(), &observed, AppMemory::default(), Instant::now()),
            Decision::Act(Action::Adopt {
                container_id: observed["fixture-pod-member"].id.clone()
            })
        );
        let mut mem = claimed(&observed, "fixture-pod-member");
        for _ in 0..20 {
            let now = Instant::now();
            let decision = decision_of(d.clone(), &observed, mem.clone(), now);
            assert_eq!(
                decision,
                Decision::Wait(Wait::Drift {
                    differences: d.differences.clone()
                }),
                "reported, left running, never a drift loop"
            );
            record(&mut mem, &decision, true, &d.spec_hash, now);
            tokio::time::advance(Duration::from_secs(30)).await;
        }
    }

    #[tokio::test]
    async fn a_state_the_agent_does_not_know_is_reported_never_rebuilt() {
        for hand_made in [false, true] {
            let mut observed = captured();
            let name = "fixture-pod-infra";
            if !hand_made {
                managed(&mut observed, name, "want");
            }
            observed.get_mut(name).expect("fixture").status = ContainerStatus::Other("exploded".to_owned());
            let mem = if hand_made {
                claimed(&observed, name)
            } else {
                AppMemory::default()
            };
            assert_eq!(
                decision_of(desired("demo", name), &observed, mem, Instant::now()),
                Decision::Wait(Wait::UnknownState {
                    state: "exploded".to_owned()
                }),
                "hand made: {hand_made}"
            );
        }
    }

    #[tokio::test]
    async fn a_dead_container_is_rebuilt_only_when_the_agent_made_it() {
        let mut observed = captured();
        let name = "fixture-pod-infra";
        observed.get_mut(name).expect("fixture").status = ContainerStatus::Dead;
        let mem = claimed(&observed, name);
        assert_eq!(
            decision_of(desired("demo", name), &observed, mem, Instant::now()),
            Decision::Wait(Wait::AdoptedDead)
        );
        managed(&mut observed, name, "want");
        assert_eq!(
            decision_of(desired("demo", name), &observed, AppMemory::default(), Instant::now()),
            Decision::Act(Action::Rebuild {
                state: "dead".to_owned()
            })
        );
    }

    #[tokio::test]
    async fn an_adopted_container_is_left_running_on_later_passes() {
        let observed = captured();
        let container_id = observed["fixture-pod-member"].id.clone();
        let mem = AppMemory {
            adopted: Some(container_id),
            ..AppMemory::default()
        };
        let got = decision_of(desired("demo", "fixture-pod-member"), &observed, mem, Instant::now());
        assert_eq!(got, Decision::Wait(Wait::Ok));
    }

    #[tokio::test]
    async fn an_app_waits_for_a_dependency_that_is_not_running() {
        let mut observed = captured();
        managed(&mut observed, "fixture-app", "want");
        managed(&mut observed, "fixture-pod-infra", "want");
        let db = desired("db", "fixture-app");
        let mut web = desired("web", "fixture-pod-infra");
        web.depends_on = vec![id("db")];
        let plans = plan(
            &[db, web],
            &observed,
            &BTreeMap::new(),
            NodeFacts::default(),
            Instant::now(),
        );
        assert_eq!(plans[0].decision, Decision::Act(Action::Start));
        assert_eq!(
            plans[1].decision,
            Decision::Wait(Wait::Dependency {
                app: "db".to_owned(),
                state: "stopped".to_owned()
            })
        );
    }

    #[tokio::test]
    async fn a_held_app_is_left_stopped() {
        let mut observed = captured();
        managed(&mut observed, "fixture-app", "want");
        let mut d = desired("demo", "fixture-app");
        d.held = true;
        assert_eq!(
            decision_of(d, &observed, AppMemory::default(), Instant::now()),
            Decision::Wait(Wait::Held)
        );
    }

    #[tokio::test]
    async fn an_app_with_an_action_in_flight_gets_no_second_one_whatever_it_looks_like() {
        let now = Instant::now();
        let since = now - Duration::from_secs(42);
        let in_flight = Some(InFlight {
            action: "install".to_owned(),
            since,
        });
        let want = Decision::Wait(Wait::InFlight {
            action: "install".to_owned(),
            since,
            for_secs: 42,
        });
        // Missing (would install), exited (would start), drifted (would
        // recreate), held: the action in flight decides.
        let mut observed = captured();
        managed(&mut observed, "fixture-app", "want");
        managed(&mut observed, "fixture-pod-infra", "old");
        for (container, held) in [
            ("absent", false),
            ("fixture-app", false),
            ("fixture-pod-infra", false),
            ("fixture-app", true),
        ] {
            let mut d = desired("demo", container);
            d.held = held;
            d.in_flight = in_flight.clone();
            assert_eq!(
                decision_of(d, &observed, AppMemory::default(), now),
                want,
                "{container}, held {held}"
            );
        }
        // Another app is planned as usual.
        let other = desired("other", "absent");
        assert_eq!(
            decision_of(other, &observed, AppMemory::default(), now),
            Decision::Act(Action::Install)
        );
    }

    /// Memory of an app whose `data/app.conf` was rewritten.
    fn config_changed() -> AppMemory {
        AppMemory {
            config_changed: vec!["data/app.conf".to_owned()],
            ..AppMemory::default()
        }
    }

    #[tokio::test]
    async fn a_running_app_whose_config_changed_is_restarted_once() {
        let mut observed = captured();
        managed(&mut observed, "fixture-pod-infra", "want");
        let d = desired("demo", "fixture-pod-infra");
        let mut mem = config_changed();
        let now = Instant::now();
        let decision = decision_of(d.clone(), &observed, mem.clone(), now);
        assert_eq!(
            decision,
            Decision::Act(Action::Restart {
                reason: "config changed: data/app.conf".to_owned()
            })
        );
        record(&mut mem, &decision, true, &d.spec_hash, now);
        assert!(mem.config_changed.is_empty(), "read by the restarted process");
        assert_eq!(
            (mem.failures, mem.next_try),
            (0, None),
            "a restart asked for is no failure"
        );
        assert_eq!(decision_of(d, &observed, mem, now), Decision::Wait(Wait::Ok));
    }

    #[tokio::test]
    async fn a_failed_restart_keeps_the_change_and_backs_off() {
        let mut observed = captured();
        managed(&mut observed, "fixture-pod-infra", "want");
        let d = desired("demo", "fixture-pod-infra");
        let mut mem = config_changed();
        let now = Instant::now();
        let decision = decision_of(d.clone(), &observed, mem.clone(), now);
        record(&mut mem, &decision, false, &d.spec_hash, now);
        assert_eq!(mem.config_changed, ["data/app.conf"]);
        assert!(matches!(
            decision_of(d, &observed, mem, now),
            Decision::Wait(Wait::Backoff { failures: 1, .. })
        ));
    }

    #[tokio::test]
    async fn a_stopped_app_whose_config_changed_is_started_and_the_change_is_done() {
        let mut observed = captured();
        managed(&mut observed, "fixture-app", "want");
        let d = desired("demo", "fixture-app");
        let mut mem = config_changed();
        let now = Instant::now();
        let decision = decision_of(d.clone(), &observed, mem.clone(), now);
        assert_eq!(decision, Decision::Act(Action::Start));
        record(&mut mem, &decision, true, &d.spec_hash, now);
        assert!(mem.config_changed.is_empty());
    }

    #[tokio::test]
    async fn a_held_or_waiting_app_keeps_its_config_change_for_later() {
        let mut observed = captured();
        managed(&mut observed, "fixture-app", "want");
        managed(&mut observed, "fixture-pod-infra", "want");
        let db = desired("db", "fixture-app");
        let mut web = desired("web", "fixture-pod-infra");
        web.depends_on = vec![id("db")];
        let mut mem = config_changed();
        let memory = BTreeMap::from([(id("web"), mem.clone())]);
        let now = Instant::now();
        let decision = plan(&[db, web.clone()], &observed, &memory, NodeFacts::default(), now)
            .remove(1)
            .decision;
        assert!(
            matches!(decision, Decision::Wait(Wait::Dependency { .. })),
            "{decision:?}"
        );
        record(&mut mem, &decision, true, &web.spec_hash, now);
        assert_eq!(
            mem.config_changed,
            ["data/app.conf"],
            "restarted once the dependency is up"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn crash_loop_restarts_back_off_from_10_seconds_to_5_minutes_and_reset_after_10_minutes() {
        let mut observed = captured();
        managed(&mut observed, "fixture-app", "want");
        let d = desired("demo", "fixture-app");
        let mut mem = AppMemory::default();
        let mut restarts = Vec::new();
        let start = Instant::now();
        // The app crashes right after every start; pass every second for 22 minutes.
        for _ in 0..1300 {
            let now = Instant::now();
            let decision = decision_of(d.clone(), &observed, mem.clone(), now);
            if decision == Decision::Act(Action::Start) {
                restarts.push((now - start).as_secs());
            }
            record(&mut mem, &decision, true, &d.spec_hash, now);
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        let gaps: Vec<u64> = restarts.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(restarts[0], 0, "the first restart is immediate");
        assert_eq!(gaps, [10, 20, 40, 80, 160, 300, 300, 300]);

        // Ten minutes of running forgives the failures.
        let running = "fixture-pod-infra";
        managed(&mut observed, running, "want");
        let d = desired("demo", running);
        for _ in 0..=600 {
            let now = Instant::now();
            let decision = decision_of(d.clone(), &observed, mem.clone(), now);
            record(&mut mem, &decision, true, &d.spec_hash, now);
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        assert_eq!((mem.failures, mem.next_try), (0, None));
    }

    #[tokio::test(start_paused = true)]
    async fn drift_recreated_three_times_in_ten_minutes_becomes_a_drift_loop() {
        let mut observed = captured();
        managed(&mut observed, "fixture-pod-infra", "never-matches");
        let d = desired("demo", "fixture-pod-infra");
        let mut mem = AppMemory::default();
        let mut recreates = 0;
        for _ in 0..20 {
            let now = Instant::now();
            let decision = decision_of(d.clone(), &observed, mem.clone(), now);
            if let Decision::Act(Action::Recreate { .. }) = decision {
                recreates += 1;
            }
            record(&mut mem, &decision, true, &d.spec_hash, now);
            tokio::time::advance(Duration::from_secs(30)).await;
        }
        assert_eq!(recreates, DRIFT_LOOP_AFTER);
        assert_eq!(
            decision_of(d.clone(), &observed, mem.clone(), Instant::now()),
            Decision::Wait(Wait::DriftLoop)
        );
        // A new manifest (another hash) gets a fresh chance.
        let mut changed = d;
        changed.spec_hash = "newer".to_owned();
        assert!(matches!(
            decision_of(changed, &observed, mem, Instant::now()),
            Decision::Act(Action::Recreate { .. })
        ));
    }

    const RULE: HealthRule = HealthRule {
        interval: Duration::from_secs(1),
        retries: 3,
        start_period: Duration::from_secs(5),
    };

    /// A running container of the agent's own, with `RULE`.
    fn healthy_app() -> (Desired, BTreeMap<String, ContainerSummary>) {
        let mut observed = captured();
        managed(&mut observed, "fixture-pod-infra", "want");
        let mut d = desired("demo", "fixture-pod-infra");
        d.health = Some(RULE);
        (d, observed)
    }

    #[tokio::test(start_paused = true)]
    async fn failed_probes_count_only_after_the_start_period_and_restart_at_retries() {
        let start = Instant::now();
        // (seconds since the app was first seen running, probes in order
        // after it, expected decision after them)
        let unhealthy = |n: u32| {
            Decision::Act(Action::RestartUnhealthy {
                reason: format!("unhealthy: {n} failed probes (last: exit code 1)"),
            })
        };
        let table: Vec<(u64, Vec<bool>, Decision)> = vec![
            // Inside the start period failures do not count.
            (0, vec![false; 4], Decision::Wait(Wait::Ok)),
            (6, vec![false, false], Decision::Wait(Wait::Ok)),
            (6, vec![false, false, false], unhealthy(3)),
            // A pass in between resets the count.
            (6, vec![false, false, true, false, false], Decision::Wait(Wait::Ok)),
            (6, vec![false, false, true, false, false, false], unhealthy(3)),
        ];
        for (row, (after, probes, want)) in table.into_iter().enumerate() {
            let (d, observed) = healthy_app();
            let mut mem = AppMemory {
                running_since: Some(start),
                ..AppMemory::default()
            };
            let now = start + Duration::from_secs(after);
            for ok in &probes {
                record_probe(&mut mem, &RULE, *ok, "exit code 1", now);
            }
            assert_eq!(decision_of(d, &observed, mem, now), want, "row {row}: {probes:?}");
        }
    }

    #[tokio::test]
    async fn an_unhealthy_app_is_left_alone_when_held_adopted_in_a_drift_loop_or_without_a_check() {
        let now = Instant::now();
        let failing = AppMemory {
            running_since: now.checked_sub(Duration::from_secs(60)),
            probe_failures: 5,
            ..AppMemory::default()
        };
        let (d, observed) = healthy_app();
        assert!(matches!(
            decision_of(d.clone(), &observed, failing.clone(), now),
            Decision::Act(Action::RestartUnhealthy { .. })
        ));
        let mut held = d.clone();
        held.held = true;
        assert_eq!(
            decision_of(held, &observed, failing.clone(), now),
            Decision::Wait(Wait::Held)
        );
        let mut no_check = d.clone();
        no_check.health = None;
        assert_eq!(
            decision_of(no_check, &observed, failing.clone(), now),
            Decision::Wait(Wait::Ok)
        );
        let looping = AppMemory {
            drift_loop_hash: Some(d.spec_hash.clone()),
            ..failing.clone()
        };
        assert_eq!(
            decision_of(d.clone(), &observed, looping, now),
            Decision::Wait(Wait::DriftLoop)
        );
        // Made by hand and claimed: never stopped unasked.
        let observed = captured();
        let adopted = AppMemory {
            adopted: Some(observed["fixture-pod-infra"].id.clone()),
            ..failing
        };
        assert_eq!(decision_of(d, &observed, adopted, now), Decision::Wait(Wait::Ok));
    }

    #[tokio::test(start_paused = true)]
    async fn unhealthy_restarts_back_off_like_crashes_and_say_why() {
        let (d, observed) = healthy_app();
        let mut mem = AppMemory::default();
        let mut restarts = Vec::new();
        let start = Instant::now();
        // Fails every probe from the start; a pass and a probe every second.
        for _ in 0..400 {
            let now = Instant::now();
            if probe_due(&d, observed.get(&d.container), &mem, now) {
                record_probe(&mut mem, &RULE, false, "exit code 1", now);
            }
            let memory = BTreeMap::from([(d.app.clone(), mem.clone())]);
            let p = plan(std::slice::from_ref(&d), &observed, &memory, NodeFacts::default(), now).remove(0);
            if let Decision::Act(Action::RestartUnhealthy { reason }) = &p.decision {
                assert_eq!(p.reason.as_deref(), Some(reason.as_str()));
                restarts.push(((now - start).as_secs(), reason.clone()));
            }
            record(&mut mem, &p.decision, true, &d.spec_hash, now);
            note_restart(&mut mem, p.reason.as_deref(), true, now);
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        // Seen running at 0, start period 5 s, then 3 failures a second
        // apart: the first restart at 7 s; each later one waits for the
        // start period and retries again, and for the backoff.
        assert_eq!(
            restarts[0],
            (7, "unhealthy: 3 failed probes (last: exit code 1)".to_owned())
        );
        let gaps: Vec<u64> = restarts.windows(2).map(|w| w[1].0 - w[0].0).collect();
        assert_eq!(gaps, [10, 20, 40, 80, 160], "{restarts:?}");
        // Probes failing while it backs off still count: the reason says how many.
        let last = mem.last_restart.expect("remembered");
        assert_eq!(Some(&last.reason), restarts.last().map(|r| &r.1));
        assert!(last.reason.starts_with("unhealthy: ") && last.ok, "{last:?}");
    }

    #[tokio::test]
    async fn a_restart_says_why_it_happened() {
        let now = Instant::now();
        let mut observed = captured();
        managed(&mut observed, "fixture-app", "want");
        observed.get_mut("fixture-app").expect("fixture").exit_code = Some(137);
        let d = desired("demo", "fixture-app");
        let p = plan(&[d], &observed, &BTreeMap::new(), NodeFacts::default(), now).remove(0);
        assert_eq!(p.decision, Decision::Act(Action::Start));
        assert_eq!(p.reason.as_deref(), Some("exited 137"));
        let mut mem = AppMemory::default();
        note_restart(&mut mem, p.reason.as_deref(), false, now);
        assert_eq!(
            mem.last_restart,
            Some(Restarted {
                reason: "exited 137".to_owned(),
                ok: false,
                at: now
            })
        );
        let (d, observed) = healthy_app();
        let p = plan(
            &[d],
            &observed,
            &BTreeMap::from([(id("demo"), config_changed())]),
            NodeFacts::default(),
            now,
        )
        .remove(0);
        assert_eq!(p.reason.as_deref(), Some("config changed: data/app.conf"));
        let p = plan(
            &[desired("demo", "absent")],
            &observed,
            &BTreeMap::new(),
            NodeFacts::default(),
            now,
        )
        .remove(0);
        assert_eq!(p.reason.as_deref(), Some("no container"));
    }

    #[tokio::test]
    async fn an_unobservable_container_is_never_acted_on_and_its_dependants_wait() {
        let now = Instant::now();
        let observed = captured();
        let error = "the engine refused the request (HTTP 500): getting container from store: container not known";
        // Missing from the listing, unobservable, or listed: never acted on.
        for name in ["absent", "fixture-app", "fixture-pod-member"] {
            let mut d = desired("db", name);
            d.unobservable = Some(error.to_owned());
            let mut web = desired("web", "fixture-pod-infra");
            web.depends_on = vec![id("db")];
            let plans = plan(&[d, web], &observed, &BTreeMap::new(), NodeFacts::default(), now);
            assert_eq!(
                plans[0].decision,
                Decision::Wait(Wait::Unobservable {
                    error: error.to_owned()
                }),
                "{name}"
            );
            assert_eq!(
                plans[1].decision,
                Decision::Wait(Wait::Dependency {
                    app: "db".to_owned(),
                    state: "unobservable".to_owned()
                })
            );
        }
    }
}
