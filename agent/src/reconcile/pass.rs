//! One reconcile pass: observe, plan, act, remember.
//!
//! A pass reads the engine once (one listing), plans with the pure
//! [`plan`], and carries out every app's action concurrently, so an app
//! that takes minutes to pull never holds up the others. Each app's
//! failure lands in the report; none aborts the pass.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant as StdInstant;

use serde::Serialize;
use tokio::time::Instant;

use super::plan::{
    next_probe, note_restart, plan, probe_due, record, record_probe, Action, AppMemory, Decision, Desired, HealthRule,
    Wait,
};
use super::state;
use crate::engine::ContainerSummary;
use crate::files;
use crate::manifest::{AppId, LoadReport, Manifest};
use crate::orchestrator::{is_managed, HoldPolicy, Orchestrator, OrchestratorError, BACKUP_SUFFIX};
use crate::spec::SECRETS_MOUNT_DIR;

/// One app in a pass report.
#[derive(Debug, Clone, Serialize)]
pub struct AppReport {
    pub app: String,
    pub container: String,
    /// The container's state as the pass found it (`missing` when absent).
    pub observed: String,
    pub decision: Decision,
    /// Why the action was taken (`exited 137`, `unhealthy: 3 failed
    /// probes …`, `config changed: …`); `None` when waiting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Set when the action failed, or the container cannot be observed:
    /// the whole error chain.
    pub error: Option<String>,
}

/// What one pass saw and did.
#[derive(Debug, Clone, Serialize)]
pub struct PassReport {
    pub duration_ms: u64,
    pub apps: Vec<AppReport>,
    /// Containers that match no manifest: listed and left alone.
    pub unmatched: Vec<String>,
    /// Manifests that did not load, and why.
    pub manifest_errors: Vec<String>,
    /// Set when the pass could not run at all (engine unreachable).
    pub error: Option<String>,
    /// When the next health probe falls due, or the backoff of an action
    /// that failed in this pass ends: the loop wakes up for it.
    #[serde(skip)]
    pub wake_at: Option<Instant>,
}

impl PassReport {
    /// Whether the pass found nothing to do and nothing wrong.
    pub fn is_quiet(&self) -> bool {
        self.error.is_none()
            && self
                .apps
                .iter()
                .all(|a| matches!(a.decision, Decision::Wait(Wait::Ok | Wait::Held)))
    }

    /// The earliest backoff deadline or health probe: when the loop must
    /// wake up again.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.apps
            .iter()
            .filter_map(|a| match &a.decision {
                Decision::Wait(Wait::Backoff { until, .. }) => Some(*until),
                _ => None,
            })
            .chain(self.wake_at)
            .min()
    }
}

/// Desired state derived from one load of the manifests.
struct DesiredSet {
    report: Arc<LoadReport>,
    desired: Vec<Desired>,
    errors: Vec<String>,
    /// The apps that have config files to render.
    with_files: Vec<Manifest>,
}

/// Carries out passes for one orchestrator and keeps the memory between
/// them (persisted under `<data>/state/`).
pub struct Reconciler {
    orch: Arc<Orchestrator>,
    memory: BTreeMap<AppId, AppMemory>,
    desired: Option<DesiredSet>,
    /// Whether the pass only plans (adopt --dry-run, reconcile reports).
    dry_run: bool,
}

impl Reconciler {
    pub fn new(orch: Arc<Orchestrator>) -> Reconciler {
        let memory = state::load(&orch.config().data_root);
        Reconciler {
            orch,
            memory,
            desired: None,
            dry_run: false,
        }
    }

    /// A reconciler that plans but never acts or writes state.
    pub fn dry_run(orch: Arc<Orchestrator>) -> Reconciler {
        Reconciler {
            dry_run: true,
            ..Reconciler::new(orch)
        }
    }

    pub fn orchestrator(&self) -> &Arc<Orchestrator> {
        &self.orch
    }

    /// Re-reads the manifests before the next pass.
    pub fn reload(&mut self) {
        self.orch.reload();
        self.desired = None;
    }

    /// The desired set, recomputed only when the manifests were reloaded:
    /// hashing build contexts on every event would make quiet passes slow.
    fn desired(&mut self) -> &DesiredSet {
        let report = self.orch.report();
        let stale = self.desired.as_ref().is_none_or(|d| !Arc::ptr_eq(&d.report, &report));
        if stale {
            let mut desired = Vec::new();
            let mut errors: Vec<String> = report.errors.iter().map(|e| e.to_string()).collect();
            for m in self.orch.manifests() {
                match self.orch.spec(&m) {
                    Ok(spec) => desired.push(Desired {
                        app: m.id.clone(),
                        container: spec.name.clone(),
                        spec_hash: spec.hash(),
                        depends_on: m.depends_on.clone(),
                        differences: Vec::new(),
                        held: false,
                        health: m.health.as_ref().map(|h| HealthRule {
                            interval: h.interval,
                            retries: h.retries,
                            start_period: h.start_period,
                        }),
                        unobservable: None,
                    }),
                    Err(e) => errors.push(format!("{}: {e:#}", m.id)),
                }
            }
            let with_files = report.apps.iter().filter(|m| !m.files.is_empty()).cloned().collect();
            self.desired = Some(DesiredSet {
                report,
                desired,
                errors,
                with_files,
            });
        }
        // Just set above when it was missing.
        self.desired.get_or_insert_with(|| DesiredSet {
            report: Arc::default(),
            desired: Vec::new(),
            errors: Vec::new(),
            with_files: Vec::new(),
        })
    }

    /// One pass. Never fails: problems are in the report.
    pub async fn pass(&mut self) -> PassReport {
        let started = StdInstant::now();
        let set = self.desired();
        let manifest_errors = set.errors.clone();
        let mut desired = set.desired.clone();
        let (with_files, all) = (set.with_files.clone(), set.report.clone());
        let listing = match self.orch.engine().list().await {
            Ok(l) => l,
            Err(e) => {
                return PassReport {
                    duration_ms: elapsed_ms(started),
                    apps: Vec::new(),
                    unmatched: Vec::new(),
                    manifest_errors,
                    error: Some(crate::error_chain(&e)),
                    wake_at: None,
                }
            }
        };
        let unobservable: BTreeMap<String, String> =
            listing.unobservable.into_iter().map(|u| (u.name, u.error)).collect();
        let observed: BTreeMap<String, ContainerSummary> =
            listing.containers.into_iter().map(|c| (c.name.clone(), c)).collect();
        for d in &mut desired {
            d.held = self.orch.is_held(d.app.as_str());
            d.unobservable = unobservable.get(&d.container).cloned();
            // Only a container made by hand needs comparing field by field.
            if let Some(c) = observed.get(&d.container).filter(|c| !is_managed(&c.labels)) {
                d.differences = self.hand_made_differences(&d.app, &c.name).await;
            }
        }
        let (file_errors, dry_memory) = self.render_files(&desired, &observed, &with_files, &all.apps);
        if !self.dry_run {
            self.probe_due(&desired, &observed).await;
        }
        let now = Instant::now();
        let plans = plan(&desired, &observed, dry_memory.as_ref().unwrap_or(&self.memory), now);

        let mut tasks = Vec::new();
        for p in &plans {
            if let (Decision::Act(action), false) = (&p.decision, self.dry_run) {
                let orch = self.orch.clone();
                let (app, action) = (p.app.clone(), action.clone());
                tasks.push(async move {
                    let result = act(&orch, &app, &action).await.map_err(|e| crate::error_chain(&e));
                    if let Err(e) = &result {
                        tracing::warn!(app, action = ?action, error = %e, "reconcile action failed");
                    } else {
                        tracing::info!(app, action = ?action, "reconciled");
                    }
                    (app, result)
                });
            }
        }
        let outcomes: BTreeMap<String, Result<(), String>> =
            futures_util::future::join_all(tasks).await.into_iter().collect();

        let mut apps = Vec::new();
        let before = self.memory.clone();
        for (p, d) in plans.into_iter().zip(&desired) {
            let outcome = outcomes.get(&p.app);
            if !self.dry_run {
                let mem = self.memory.entry(d.app.clone()).or_default();
                let ok = !matches!(outcome, Some(Err(_)));
                record(mem, &p.decision, ok, &d.spec_hash, now);
                note_restart(mem, &p, ok, now);
            }
            let error = outcome
                .and_then(|o| o.clone().err())
                .or_else(|| file_errors.get(&p.app).cloned())
                .or_else(|| d.unobservable.clone());
            apps.push(AppReport {
                observed: observed
                    .get(&p.container)
                    .map_or("missing".to_owned(), |c| c.status.to_string()),
                app: p.app,
                container: p.container,
                decision: p.decision,
                reason: p.reason,
                error,
            });
        }
        if !self.dry_run && self.memory != before {
            if let Err(e) = state::save(&self.orch.config().data_root, &self.memory) {
                tracing::error!(error = %format!("{e:#}"), "cannot save the agent state");
            }
        }
        let wanted: BTreeSet<&str> = desired.iter().map(|d| d.container.as_str()).collect();
        let unmatched = observed
            .keys()
            .chain(unobservable.keys())
            .filter(|n| !wanted.contains(n.as_str()) && !n.ends_with(BACKUP_SUFFIX))
            .cloned()
            .collect();
        let (empty, now) = (AppMemory::default(), Instant::now());
        let wake_at = desired
            .iter()
            .filter_map(|d| {
                let mem = self.memory.get(&d.app).unwrap_or(&empty);
                let acted = outcomes.contains_key(d.app.as_str());
                let retry = mem.next_try.filter(|t| *t > now && acted);
                // An app just (re)started is probed an interval later,
                // whatever the listing taken before its action said.
                let first_probe = d.health.filter(|_| acted && !d.held).map(|rule| now + rule.interval);
                next_probe(d, observed.get(&d.container), mem, now)
                    .into_iter()
                    .chain(retry)
                    .chain(first_probe)
                    .min()
            })
            .min();
        PassReport {
            duration_ms: elapsed_ms(started),
            apps,
            unmatched,
            manifest_errors,
            error: None,
            wake_at,
        }
    }

    /// Probes, together, every running app of the agent's own whose health
    /// probe is due, and counts the outcomes in the memory: the planner
    /// restarts an app whose probes failed `retries` times in a row. Each
    /// probe is bounded by the manifest's `timeout`.
    async fn probe_due(&mut self, desired: &[Desired], observed: &BTreeMap<String, ContainerSummary>) {
        let now = Instant::now();
        let empty = AppMemory::default();
        let due: Vec<&Desired> = desired
            .iter()
            .filter(|d| {
                let mem = self.memory.get(&d.app).unwrap_or(&empty);
                probe_due(d, observed.get(&d.container), mem, now)
            })
            .collect();
        if due.is_empty() {
            return;
        }
        let orch = &self.orch;
        let results = futures_util::future::join_all(due.iter().map(|d| async move {
            let result = match orch.manifest(d.app.as_str()) {
                Ok(m) => orch.probe_once(&m).await,
                Err(e) => Err(e),
            };
            (*d, result)
        }))
        .await;
        let now = Instant::now();
        for (d, result) in results {
            let Some(rule) = d.health else { continue };
            let mem = self.memory.entry(d.app.clone()).or_default();
            match result {
                Ok(Some(probe)) => {
                    if !probe.ok {
                        tracing::info!(app = %d.app, target = probe.target, detail = probe.detail, "health probe failed");
                    }
                    record_probe(
                        mem,
                        &rule,
                        probe.ok,
                        &format!("{}: {}", probe.target, probe.detail),
                        now,
                    );
                }
                // Not running any more: the planner sees that in the listing.
                Ok(None) => {}
                // A probe that cannot run says nothing about the app's health.
                Err(e) => {
                    mem.last_probe = Some(now);
                    tracing::warn!(app = %d.app, error = %crate::error_chain(&e), "cannot probe the app");
                }
            }
        }
    }

    /// Renders the config files of every app that has a container of the
    /// agent's own and is not held (install renders them for the others;
    /// an adopted app gets its files only when `upgrade` converts it), refreshes its copies
    /// of the node's secrets (`/run/secrets/<name>`), and remembers which
    /// changed: the planner restarts those apps. The memory is saved before
    /// any file is written, so an agent killed in between still restarts
    /// the app on its next pass. A dry run writes nothing and returns the
    /// memory it would have. Returns render errors by app.
    fn render_files(
        &mut self,
        desired: &[Desired],
        observed: &BTreeMap<String, ContainerSummary>,
        with_files: &[Manifest],
        all: &[Manifest],
    ) -> (BTreeMap<String, String>, Option<BTreeMap<AppId, AppMemory>>) {
        let mut errors = BTreeMap::new();
        let mut rendered = Vec::new();
        let (data_root, naming) = (&self.orch.config().data_root, &self.orch.config().naming);
        for m in with_files {
            let Some(d) = desired.iter().find(|d| d.app == m.id) else {
                continue;
            };
            if d.held || !observed.get(&d.container).is_some_and(|c| is_managed(&c.labels)) {
                continue;
            }
            match files::render_app(data_root, m, all, naming, !self.dry_run) {
                Ok(r) => rendered.push((m, r)),
                Err(e) => {
                    let error = format!("{e:#}");
                    tracing::warn!(app = %m.id, error, "cannot render config files");
                    errors.insert(m.id.to_string(), error);
                }
            }
        }
        // Secret copies follow the node's secrets the same way: the
        // container sees a refreshed copy once the app restarts.
        let mut stale_secrets = Vec::new();
        for m in all.iter().filter(|m| !m.secrets.is_empty()) {
            let Some(d) = desired.iter().find(|d| d.app == m.id) else {
                continue;
            };
            if d.held || !observed.get(&d.container).is_some_and(|c| is_managed(&c.labels)) {
                continue;
            }
            let stale = crate::secrets::stale_app_copies(data_root, &m.id, &m.secrets);
            if !stale.is_empty() {
                stale_secrets.push((m, stale));
            }
        }
        let mut memory = self.dry_run.then(|| self.memory.clone());
        let target = memory.as_mut().unwrap_or(&mut self.memory);
        let mut pending = false;
        let secret_changes = stale_secrets.iter().map(|(m, names)| {
            let mounted = names.iter().map(|n| format!("{SECRETS_MOUNT_DIR}/{n}")).collect();
            (*m, mounted)
        });
        let file_changes = rendered.iter().map(|(m, r)| (*m, files::changed(r)));
        for (m, changed) in file_changes.chain(secret_changes) {
            if changed.is_empty() {
                continue;
            }
            let list = &mut target.entry(m.id.clone()).or_default().config_changed;
            for file in changed {
                if !list.contains(&file) {
                    list.push(file);
                    pending = true;
                }
            }
        }
        if self.dry_run {
            return (errors, memory);
        }
        if pending {
            if let Err(e) = state::save(data_root, &self.memory) {
                tracing::error!(error = %format!("{e:#}"), "cannot save the agent state");
            }
        }
        for (m, r) in &rendered {
            if let Err(e) = files::apply(data_root, m, r) {
                let error = format!("{e:#}");
                tracing::warn!(app = %m.id, error, "cannot write config files");
                errors.insert(m.id.to_string(), error);
            }
        }
        for (m, names) in &stale_secrets {
            match crate::secrets::provision_app_secrets(data_root, &m.id, &m.secrets, m.owner()) {
                Ok(_) => tracing::info!(app = %m.id, secrets = ?names, "refreshed the app's secret copies"),
                Err(e) => {
                    let error = format!("{e:#}");
                    tracing::warn!(app = %m.id, error, "cannot refresh the app's secret copies");
                    errors.entry(m.id.to_string()).or_insert(error);
                }
            }
        }
        (errors, None)
    }

    /// How the container made by hand `name` differs from `app`'s
    /// manifest. One that cannot be compared (gone since the listing, a
    /// manifest whose spec fails) shows no difference: it is left alone
    /// either way.
    async fn hand_made_differences(&self, app: &AppId, name: &str) -> Vec<String> {
        let Ok(m) = self.orch.manifest(app.as_str()) else {
            return Vec::new();
        };
        let (spec, info) = match (self.orch.spec(&m), self.orch.engine().inspect(name).await) {
            (Ok(spec), Ok(info)) => (spec, info),
            (Err(e), _) => {
                tracing::warn!(app = %app, error = %crate::error_chain(&e), "cannot compare the adopted container");
                return Vec::new();
            }
            (_, Err(e)) => {
                tracing::warn!(app = %app, error = %crate::error_chain(&e), "cannot compare the adopted container");
                return Vec::new();
            }
        };
        self.orch.hand_made_differences(&m, &spec, &info).await
    }
}

fn elapsed_ms(started: StdInstant) -> u64 {
    u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Carries out one app's action through the orchestrator. An app its
/// owner stopped since the plan is left alone, and that is no failure.
async fn act(orch: &Orchestrator, app: &str, action: &Action) -> Result<(), OrchestratorError> {
    let hold = HoldPolicy::Respect;
    let result = match action {
        Action::Install => orch.install_app(app, hold).await.map(drop),
        Action::Start => orch.start_app(app, hold).await,
        Action::Unpause => orch.unpause(app, hold).await,
        Action::Restart { .. } | Action::RestartUnhealthy { .. } => orch.restart_app(app, hold).await,
        Action::Recreate { .. } => orch.upgrade_app(app, hold).await.map(drop),
        Action::Rebuild { .. } => orch.rebuild(app, hold).await,
        // Claiming is bookkeeping only: adoption never touches a container.
        Action::Adopt { .. } => Ok(()),
    };
    match result {
        Err(OrchestratorError::Held { .. }) => Ok(()),
        other => other,
    }
}
