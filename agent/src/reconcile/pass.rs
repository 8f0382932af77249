//! One reconcile pass: observe, plan, act, remember.
//!
//! A pass reads the engine once (one listing), plans with the pure
//! [`plan`], and starts every app's action as its own task
//! ([`Reconciler::turn`]): the pass does not wait for them, so an app that
//! takes minutes to pull never holds up the others, and the next pass sees
//! it in flight ([`crate::orchestrator::InFlightSet`]) and starts no second
//! action for it. When a task ends, its outcome goes into the app's memory
//! ([`Reconciler::record_finished`]) and into the next pass's report.
//! [`Reconciler::pass`] waits for the actions it started, for the CLI's
//! `reconcile --once`. Each app's failure lands in the report; none aborts
//! the pass.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant as StdInstant;

use futures_util::FutureExt as _;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::plan::{
    next_probe, note_restart, plan, probe_due, record, record_probe, Action, AppMemory, Decision, Desired, HealthRule,
    NodeFacts, Wait,
};
use super::state;
use crate::engine::ContainerSummary;
use crate::files;
use crate::manifest::{AppId, LoadReport, Manifest};
use crate::orchestrator::{
    is_managed, AppState, ContainerOrchestrator as _, HealthState, HoldPolicy, InFlightGuard, Orchestrator,
    OrchestratorError, BACKUP_SUFFIX,
};

/// While an app's health check says `starting`, the loop passes again this
/// soon to see it become healthy (or not).
pub const HEALTH_RECHECK: std::time::Duration = std::time::Duration::from_secs(2);
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
    /// Set when the action failed (this pass's, or one that ended since
    /// the last pass), or the container cannot be observed: the whole
    /// error chain.
    pub error: Option<String>,
    /// For a running app with a health check: what its probe says
    /// (probed until it is seen healthy, then again after it stops).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthState>,
}

/// An action that ended since the previous pass.
#[derive(Debug, Clone, Serialize)]
pub struct ActionOutcome {
    pub app: String,
    pub action: String,
    /// How long it ran.
    pub secs: u64,
    /// `None` when it succeeded: the whole error chain otherwise.
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
    /// Actions of earlier passes that ended since the previous pass.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ended: Vec<ActionOutcome>,
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

    /// When the loop must pass again: the earliest backoff deadline or
    /// health probe, or soon while a health check still says `starting`.
    pub fn next_deadline(&self) -> Option<Instant> {
        let recheck = self
            .apps
            .iter()
            .any(|a| a.health == Some(HealthState::Starting))
            .then(|| Instant::now() + HEALTH_RECHECK);
        self.apps
            .iter()
            .filter_map(|a| match &a.decision {
                Decision::Wait(Wait::Backoff { until, .. }) => Some(*until),
                _ => None,
            })
            .chain(recheck)
            .chain(self.wake_at)
            .min()
    }
}

/// What the task that ran one app's action sends back when it ends.
#[derive(Debug)]
pub struct Finished {
    app: AppId,
    action: Action,
    spec_hash: String,
    reason: Option<String>,
    started: Instant,
    result: Result<(), String>,
    /// Keeps the app in flight until its outcome is recorded: no pass in
    /// between plans it from memory that does not know the outcome yet.
    guard: InFlightGuard,
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
    /// What the boot import skipped, retried at the start of each pass
    /// once its backoff ends (`boot` only).
    image_retry: Option<crate::images::ImportRetry>,
    /// Where the action tasks report their end.
    done_tx: mpsc::UnboundedSender<Finished>,
    done_rx: mpsc::UnboundedReceiver<Finished>,
    /// Tasks started and not yet recorded.
    running: usize,
    /// Outcomes recorded since the last pass, for its report.
    ended: Vec<ActionOutcome>,
    /// The error of each app's latest action, while it stands: shown in
    /// every report until an action succeeds or the app runs well.
    last_errors: BTreeMap<String, String>,
    /// Apps seen healthy, with the container id they were seen in: not
    /// probed again while they stay running.
    seen_healthy: BTreeMap<AppId, String>,
    /// The OS boot status file (boot.json), read at every turn: an OS
    /// release on trial freezes installs and recreates. `None`: never.
    os_boot_status: Option<std::path::PathBuf>,
    /// Whether the last turn saw an OS trial (to log the change once).
    os_trial_seen: Option<bool>,
}

impl Reconciler {
    pub fn new(orch: Arc<Orchestrator>) -> Reconciler {
        let memory = state::load(&orch.config().data_root);
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Reconciler {
            orch,
            memory,
            desired: None,
            dry_run: false,
            image_retry: None,
            done_tx,
            done_rx,
            running: 0,
            ended: Vec::new(),
            last_errors: BTreeMap::new(),
            seen_healthy: BTreeMap::new(),
            os_boot_status: None,
            os_trial_seen: None,
        }
    }

    /// Reads the OS boot status at `path` before each plan: while it says
    /// trial, no app is installed or recreated (`docs/updates.md`).
    pub fn with_os_boot_status(mut self, path: std::path::PathBuf) -> Reconciler {
        self.os_boot_status = Some(path);
        self
    }

    /// The node-wide facts for this turn's plan. An unreadable boot.json
    /// counts as a trial: every doubt means no change.
    fn node_facts(&mut self) -> NodeFacts {
        let Some(path) = &self.os_boot_status else {
            return NodeFacts::default();
        };
        let os_trial = match crate::os::records::BootStatus::read(path) {
            Ok(status) => status.is_some_and(|s| s.trial),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the OS boot status: app changes wait");
                true
            }
        };
        if self.os_trial_seen != Some(os_trial) {
            if os_trial {
                tracing::info!(file = %path.display(), "{}", super::plan::OS_TRIAL_WAIT);
            } else if self.os_trial_seen.is_some() {
                tracing::info!(file = %path.display(), "OS release committed: app changes resume");
            }
            self.os_trial_seen = Some(os_trial);
        }
        NodeFacts { os_trial }
    }

    /// Retries what the boot import skipped on later passes.
    pub fn retry_imports(&mut self, retry: crate::images::ImportRetry) {
        self.image_retry = Some(retry).filter(|r| !r.is_done());
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
    async fn desired(&mut self) -> &DesiredSet {
        let report = self.orch.report();
        let stale = self.desired.as_ref().is_none_or(|d| !Arc::ptr_eq(&d.report, &report));
        if stale {
            let mut desired = Vec::new();
            let mut errors: Vec<String> = report.errors.iter().map(|e| e.to_string()).collect();
            for m in self.orch.manifests() {
                match self.orch.spec(&m).await {
                    Ok(spec) => desired.push(Desired {
                        app: m.id.clone(),
                        container: spec.name.clone(),
                        spec_hash: spec.hash(),
                        depends_on: m.depends_on.clone(),
                        differences: Vec::new(),
                        held: false,
                        in_flight: None,
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

    /// One pass that waits for the actions it starts and reports their
    /// outcomes: `reconcile --once`, and callers that want a pass done.
    /// Never fails: problems are in the report.
    pub async fn pass(&mut self) -> PassReport {
        let started = StdInstant::now();
        let mut report = self.turn().await;
        while let Some(outcome) = self.next_finished().await {
            let outcome = self.record_finished(outcome);
            if let Some(a) = report.apps.iter_mut().find(|a| a.app == outcome.app) {
                if outcome.error.is_some() {
                    a.error = outcome.error;
                }
            }
        }
        // Their outcomes are in this report already.
        self.ended.clear();
        report.duration_ms = elapsed_ms(started);
        report
    }

    /// Whether actions started by earlier turns are still running.
    pub fn busy(&self) -> bool {
        self.running > 0
    }

    /// The next action to end; `None` at once when none is running.
    /// Cancel-safe: a `select!` may drop it and call it again.
    pub async fn next_finished(&mut self) -> Option<Finished> {
        if self.running == 0 {
            return None;
        }
        // `self` holds a sender: the channel never closes.
        self.done_rx.recv().await
    }

    /// Records an ended action into its app's memory (backoff, drift
    /// history, config changes read), saves the state, and keeps the
    /// outcome for the next pass's report.
    pub fn record_finished(&mut self, f: Finished) -> ActionOutcome {
        self.running = self.running.saturating_sub(1);
        let now = Instant::now();
        let before = self.memory.clone();
        let spec_hash = f.spec_hash.clone();
        let mem = self.memory.entry(f.app.clone()).or_default();
        record(mem, &Decision::Act(f.action.clone()), f.result.is_ok(), &spec_hash, now);
        note_restart(mem, f.reason.as_deref(), f.result.is_ok(), now);
        if self.memory != before {
            if let Err(e) = state::save(&self.orch.config().data_root, &self.memory) {
                tracing::error!(error = %format!("{e:#}"), "cannot save the agent state");
            }
        }
        let outcome = ActionOutcome {
            app: f.app.to_string(),
            action: f.action.name().to_owned(),
            secs: now.saturating_duration_since(f.started).as_secs(),
            error: f.result.err(),
        };
        match &outcome.error {
            Some(e) => self.last_errors.insert(outcome.app.clone(), e.clone()),
            None => self.last_errors.remove(&outcome.app),
        };
        // Recorded: the app is free for the next pass (drops its guard).
        drop(f.guard);
        self.ended.push(outcome.clone());
        outcome
    }

    /// Observes, plans, and starts each app's action as its own task,
    /// without waiting for any: apps with an action in flight wait for it.
    /// Never fails: problems are in the report.
    pub async fn turn(&mut self) -> PassReport {
        let started = StdInstant::now();
        // First, so that an install in this turn finds the image.
        if let Some(retry) = &mut self.image_retry {
            retry.retry_due(self.orch.engine(), Instant::now()).await;
        }
        let set = self.desired().await;
        let manifest_errors = set.errors.clone();
        let mut desired = set.desired.clone();
        let (with_files, all) = (set.with_files.clone(), set.report.clone());
        let ended = std::mem::take(&mut self.ended);
        let listing = match self.orch.engine().list().await {
            Ok(l) => l,
            Err(e) => {
                return PassReport {
                    duration_ms: elapsed_ms(started),
                    apps: Vec::new(),
                    unmatched: Vec::new(),
                    manifest_errors,
                    error: Some(crate::error_chain(&e)),
                    ended,
                    wake_at: None,
                }
            }
        };
        let unobservable: BTreeMap<String, String> =
            listing.unobservable.into_iter().map(|u| (u.name, u.error)).collect();
        let observed: BTreeMap<String, ContainerSummary> =
            listing.containers.into_iter().map(|c| (c.name.clone(), c)).collect();
        let in_flight = self.orch.in_flight().snapshot();
        for d in &mut desired {
            d.held = self.orch.is_held(d.app.as_str());
            d.in_flight = in_flight.get(d.app.as_str()).cloned();
            d.unobservable = unobservable.get(&d.container).cloned();
            // Only a container made by hand needs comparing field by field.
            if let Some(c) = observed.get(&d.container).filter(|c| !is_managed(&c.labels)) {
                d.differences = self.hand_made_differences(&d.app, &c.name).await;
            }
        }
        // An app busy with an action has its files rendered by it, and is
        // not probed while it acts.
        let idle: Vec<Desired> = desired.iter().filter(|d| d.in_flight.is_none()).cloned().collect();
        let node = self.node_facts();
        // On an OS trial the files stay as the committed release rendered
        // them: a new release's templates (and the restart they would
        // bring) wait for the commit, like its other app changes.
        let (file_errors, dry_memory) = if node.os_trial {
            (BTreeMap::new(), None)
        } else {
            self.render_files(&idle, &observed, &with_files, &all.apps).await
        };
        if !self.dry_run {
            self.probe_due(&idle, &observed).await;
        }
        let now = Instant::now();
        let plans = plan(
            &desired,
            &observed,
            dry_memory.as_ref().unwrap_or(&self.memory),
            node,
            now,
        );

        let mut apps = Vec::new();
        let before = self.memory.clone();
        for (p, d) in plans.into_iter().zip(&desired) {
            match (&p.decision, self.dry_run) {
                (_, true) => {}
                // Claiming is bookkeeping only: recorded at once.
                (Decision::Act(action @ Action::Adopt { .. }), false) => {
                    let mem = self.memory.entry(d.app.clone()).or_default();
                    record(mem, &Decision::Act(action.clone()), true, &d.spec_hash, now);
                    note_restart(mem, p.reason.as_deref(), true, now);
                }
                (Decision::Act(action), false) => self.spawn(&d.app, action, &d.spec_hash, p.reason.clone(), now),
                (decision, false) => {
                    let mem = self.memory.entry(d.app.clone()).or_default();
                    record(mem, decision, true, &d.spec_hash, now);
                }
            }
            if p.decision == Decision::Wait(Wait::Ok) {
                self.last_errors.remove(&p.app);
            }
            // A new action supersedes the last one's error.
            let standing = match &p.decision {
                Decision::Act(_) => None,
                Decision::Wait(_) => self.last_errors.get(&p.app).cloned(),
            };
            let error = standing
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
                health: None,
            });
        }
        if !self.dry_run && self.memory != before {
            if let Err(e) = state::save(&self.orch.config().data_root, &self.memory) {
                tracing::error!(error = %format!("{e:#}"), "cannot save the agent state");
            }
        }
        self.observe_health(&mut apps, &observed).await;
        let wanted: BTreeSet<&str> = desired.iter().map(|d| d.container.as_str()).collect();
        let unmatched = observed
            .keys()
            .chain(unobservable.keys())
            .filter(|n| !wanted.contains(n.as_str()) && !n.ends_with(BACKUP_SUFFIX))
            .cloned()
            .collect();
        let (empty, now) = (AppMemory::default(), Instant::now());
        let acted_on: BTreeSet<&str> = apps
            .iter()
            .filter(|a| matches!(a.decision, Decision::Act(_)))
            .map(|a| a.app.as_str())
            .collect();
        let wake_at = desired
            .iter()
            .filter_map(|d| {
                let mem = self.memory.get(&d.app).unwrap_or(&empty);
                let acted = acted_on.contains(d.app.as_str());
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
            ended,
            wake_at,
        }
    }

    /// Starts `action` for `app` as its own task, marked in flight until
    /// it ends. Its end comes back through [`Reconciler::next_finished`].
    fn spawn(&mut self, app: &AppId, action: &Action, spec_hash: &str, reason: Option<String>, now: Instant) {
        let Some(guard) = self.orch.in_flight().begin(app.as_str(), action.name(), now) else {
            // Planned from a snapshot that saw it free; it is not now.
            return;
        };
        self.running += 1;
        let task = ActionTask {
            orch: self.orch.clone(),
            app: app.clone(),
            action: action.clone(),
            spec_hash: spec_hash.to_owned(),
            reason,
            started: now,
            done: self.done_tx.clone(),
            guard,
        };
        tokio::spawn(task.run());
    }

    /// Fills in the health of each running app that has a health check and
    /// was not yet seen healthy in its current container, probing them
    /// side by side. An app that stops or is acted on is probed again when
    /// it runs again.
    async fn observe_health(&mut self, apps: &mut [AppReport], observed: &BTreeMap<String, ContainerSummary>) {
        let manifests = self.orch.manifests();
        let has_check = |app: &str| manifests.iter().any(|m| m.id.as_str() == app && m.health.is_some());
        let mut probes = Vec::new();
        for (i, a) in apps.iter_mut().enumerate() {
            let running_ok = matches!(a.decision, Decision::Wait(Wait::Ok));
            let id = observed.get(&a.container).map(|c| c.id.clone());
            let Some(app) = AppId::parse(&a.app) else { continue };
            if !running_ok || id.is_none() {
                self.seen_healthy.remove(&app);
                continue;
            }
            if !has_check(&a.app) {
                continue;
            }
            if self.seen_healthy.get(&app) == id.as_ref() {
                a.health = Some(HealthState::Healthy);
                continue;
            }
            let orch = self.orch.clone();
            probes.push(async move {
                let status = orch.status(app.as_str()).await;
                (i, app, id, status)
            });
        }
        for (i, app, id, status) in futures_util::future::join_all(probes).await {
            match status {
                Ok(s) if s.state == AppState::Running => {
                    apps[i].health = s.health;
                    if let (Some(HealthState::Healthy), Some(id)) = (s.health, id) {
                        self.seen_healthy.insert(app, id);
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(app = %app, error = %crate::error_chain(&e), "cannot probe the app's health"),
            }
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
    async fn render_files(
        &mut self,
        desired: &[Desired],
        observed: &BTreeMap<String, ContainerSummary>,
        with_files: &[Manifest],
        all: &[Manifest],
    ) -> (BTreeMap<String, String>, Option<BTreeMap<AppId, AppMemory>>) {
        // Only apps with a container of the agent's own and no hold.
        let eligible = |m: &Manifest| {
            desired
                .iter()
                .find(|d| d.app == m.id)
                .is_some_and(|d| !d.held && observed.get(&d.container).is_some_and(|c| is_managed(&c.labels)))
        };
        let with_files: Vec<Manifest> = with_files.iter().filter(|m| eligible(m)).cloned().collect();
        let with_secrets: Vec<Manifest> = all
            .iter()
            .filter(|m| !m.secrets.is_empty() && eligible(m))
            .cloned()
            .collect();
        let apps: Vec<String> = with_files
            .iter()
            .chain(&with_secrets)
            .map(|m| m.id.to_string())
            .collect();
        let (data_root, naming, dry_run) = (
            self.orch.config().data_root.clone(),
            self.orch.config().naming,
            self.dry_run,
        );
        let (all, mut memory) = (all.to_vec(), self.memory.clone());
        // Off the async threads: files, secrets and, rootless, `podman unshare`.
        let outcome = crate::orchestrator::blocking("rendering config files", move || {
            let errors = render_and_apply(
                &data_root,
                &naming,
                dry_run,
                &with_files,
                &with_secrets,
                &all,
                &mut memory,
            );
            Ok((errors, memory))
        })
        .await;
        match outcome {
            Ok((errors, memory)) if self.dry_run => (errors, Some(memory)),
            Ok((errors, memory)) => {
                self.memory = memory;
                (errors, None)
            }
            Err(e) => {
                let error = format!("{e:#}");
                tracing::error!(error, "rendering config files failed");
                (apps.into_iter().map(|app| (app, error.clone())).collect(), None)
            }
        }
    }

    /// How the container made by hand `name` differs from `app`'s
    /// manifest. One that cannot be compared (gone since the listing, a
    /// manifest whose spec fails) shows no difference: it is left alone
    /// either way.
    async fn hand_made_differences(&self, app: &AppId, name: &str) -> Vec<String> {
        let Ok(m) = self.orch.manifest(app.as_str()) else {
            return Vec::new();
        };
        let (spec, info) = match (self.orch.spec(&m).await, self.orch.engine().inspect(name).await) {
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

/// What [`Reconciler::render_files`] does off the async threads: renders
/// `with_files`' config files and finds `with_secrets`' stale secret
/// copies, records the changes in `memory`, then (unless `dry_run`) saves
/// it and only then writes the files and refreshes the copies. Returns
/// the errors by app.
fn render_and_apply(
    data_root: &crate::dataroot::DataRoot,
    naming: &crate::manifest::Naming,
    dry_run: bool,
    with_files: &[Manifest],
    with_secrets: &[Manifest],
    all: &[Manifest],
    memory: &mut BTreeMap<AppId, AppMemory>,
) -> BTreeMap<String, String> {
    let mut errors = BTreeMap::new();
    let mut rendered = Vec::new();
    for m in with_files {
        match files::render_app(data_root, m, all, naming, !dry_run) {
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
    for m in with_secrets {
        let stale = crate::secrets::stale_app_copies(data_root, &m.id, &m.secrets);
        if !stale.is_empty() {
            stale_secrets.push((m, stale));
        }
    }
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
        let list = &mut memory.entry(m.id.clone()).or_default().config_changed;
        for file in changed {
            if !list.contains(&file) {
                list.push(file);
                pending = true;
            }
        }
    }
    if dry_run {
        return errors;
    }
    if pending {
        if let Err(e) = state::save(data_root, memory) {
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
    errors
}

fn elapsed_ms(started: StdInstant) -> u64 {
    u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// One app's action, run as its own task.
struct ActionTask {
    orch: Arc<Orchestrator>,
    app: AppId,
    action: Action,
    spec_hash: String,
    /// Why it was planned, for the app's `last_restart`.
    reason: Option<String>,
    started: Instant,
    done: mpsc::UnboundedSender<Finished>,
    /// Handed over with the outcome (see [`Finished`]).
    guard: InFlightGuard,
}

impl ActionTask {
    async fn run(self) {
        let app = self.app.as_str();
        let run = std::panic::AssertUnwindSafe(act(&self.orch, app, &self.action)).catch_unwind();
        let result = match run.await {
            Ok(r) => r.map_err(|e| crate::error_chain(&e)),
            Err(_) => Err(format!("the {} action panicked", self.action.name())),
        };
        match &result {
            Err(e) => tracing::warn!(app, action = ?self.action, error = %e, "reconcile action failed"),
            Ok(()) => tracing::info!(app, action = ?self.action, "reconciled"),
        }
        // The receiver lives as long as the reconciler; gone only at exit.
        let _ = self.done.send(Finished {
            app: self.app,
            action: self.action,
            spec_hash: self.spec_hash,
            reason: self.reason,
            started: self.started,
            result,
            guard: self.guard,
        });
    }
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
