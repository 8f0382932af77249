//! `archy-agent boot`: the long-running agent.
//!
//! Shape (tokio's mini-redis): a thin `main` sets up tracing and config and
//! calls [`run`] with a shutdown future. `run` takes the data root's writer
//! lock (`writer.rs`), connects to the engine (retrying while it is away),
//! finishes or undoes an interrupted upgrade, opens the control socket,
//! imports the pre-pulled images (saying how far it is in `status` and
//! `list`), makes a first pass, then turns its loop: a pass on engine
//! events, on a periodic resync, at backoff deadlines, on request and
//! whenever an app's action ends. Each pass starts the actions it plans as
//! tasks of their own and does not wait for them ([`Reconciler::turn`]):
//! one slow app (a pull, a build, a health wait) never holds up the others,
//! the events, or `reconcile-now`. systemd hears READY once the first
//! pass's actions have ended, and a watchdog ping after every turn of the
//! loop, which turns at least every half watchdog period: a wedged loop is
//! restarted (before the loop, through the lock wait, the engine wait and
//! the import, a task of its own pings). Actions in flight finish before
//! the agent exits; containers belong to the engine and outlive the agent.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::pass::{PassReport, Reconciler};
use super::plan::{Action, Decision, Wait};
use crate::dataroot::DataRoot;
use crate::engine::{Engine, EngineEvent, EventKind};
use crate::manifest::Naming;
use crate::orchestrator::{ContainerOrchestrator as _, HealthState, Orchestrator, OrchestratorConfig, Timeouts};

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
/// Backing off after this many failures in a row counts as a crash loop
/// for the console's healthy line: it stops waiting for that app.
const CRASH_LOOP_AFTER: u32 = 3;
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
    /// The OS boot status (`/run/archipelago/os/boot.json`, `--os-boot-status`):
    /// while it says trial, no app is installed or recreated.
    pub os_boot_status: PathBuf,
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
    // Bad limits are refused before anything happens.
    let timeouts = Timeouts::from_env()?;
    // Until the loop turns, a task pings the watchdog: waiting for the
    // writer lock, the engine and the image import are long waits, not a
    // hang. From the loop's first turn on, only the loop pings.
    let preamble_pings = watchdog_interval().map(|period| {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                notify(&[sd_notify::NotifyState::Watchdog]);
            }
        })
    });
    // One writer per data root: held for the agent's life. A second agent
    // is refused; a command acting in-process is waited for.
    let _writer = tokio::select! {
        _ = &mut shutdown => return Ok(()),
        lock = crate::writer::acquire(&config.data_root, crate::writer::AGENT_COMMAND, crate::writer::WAIT) => lock?,
    };
    let Some(engine) = connect_until(&config, &mut shutdown).await else {
        return Ok(());
    };
    // An upgrade a kill interrupted is finished or undone before anything
    // else acts (docs/upgrades.md).
    crate::orchestrator::recover_upgrades(&engine, &config.data_root).await;
    let orch = Arc::new(
        Orchestrator::new(
            engine,
            OrchestratorConfig {
                apps_dir: config.apps_dir.clone(),
                data_root: config.data_root.clone(),
                naming: config.naming,
                // `AgentConfig` does not carry `--images` yet: the node's folder.
                images_dir: config.images_dir.clone(),
            },
        )
        .with_timeouts(timeouts),
    );
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
            .with_busy(busy_rx)
            .with_os_boot_status(config.os_boot_status.clone()),
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
    let mut reconciler = Reconciler::new(orch.clone()).with_os_boot_status(config.os_boot_status.clone());
    reconciler.retry_imports(crate::images::ImportRetry::from_report(
        &imported,
        &config.data_root,
        Instant::now(),
    ));
    drop(queue_tx);
    let first = reconciler.turn().await;
    log_report(&first, true);
    let mut watch = Watch {
        first_actions: acted_on(&first),
        ready: false,
        healthy: HealthyLine::default(),
    };
    watch.after_turn(&orch, &first).await;
    if let Some(task) = preamble_pings {
        task.abort();
    }
    run_loop(
        &config,
        &mut reconciler,
        queue,
        &mut shutdown,
        &mut watch,
        first.next_deadline(),
    )
    .await;
    let _ = stop_control.send(());
    if let Some(control) = control {
        // In-flight calls finish; the socket file is removed.
        let _ = control.await;
    }
    finish_actions(&mut reconciler).await;
    notify(&[sd_notify::NotifyState::Stopping]);
    tracing::info!("agent stopped; containers keep running");
    Ok(())
}

/// The apps whose actions a pass started.
fn acted_on(report: &PassReport) -> BTreeSet<String> {
    report
        .apps
        .iter()
        .filter(|a| matches!(&a.decision, Decision::Act(action) if !matches!(action, Action::Adopt { .. })))
        .map(|a| a.app.clone())
        .collect()
}

/// What the loop tells the world after each turn: READY, once the first
/// pass's actions have ended, and the console's healthy line.
struct Watch {
    /// The apps the first pass acted on: READY waits for their actions.
    first_actions: BTreeSet<String>,
    ready: bool,
    healthy: HealthyLine,
}

impl Watch {
    async fn after_turn(&mut self, orch: &Arc<Orchestrator>, report: &PassReport) {
        if !self.ready {
            let in_flight = orch.in_flight().snapshot();
            if self.first_actions.iter().any(|app| in_flight.contains_key(app)) {
                return;
            }
            self.ready = true;
            notify(&[sd_notify::NotifyState::Ready]);
            tracing::info!(since_kernel_start_s = since_kernel_start(), "agent ready");
            // Its health probes take seconds on a slow rootless node: never
            // before ready, and never in the loop's way.
            tokio::spawn(print_console_summary(orch.clone()));
        }
        self.healthy.observe(report);
    }
}

/// Lets the actions in flight end, and records them, before the agent
/// exits: an install or an upgrade is never cut short by a stop. The
/// watchdog keeps hearing from the agent meanwhile.
async fn finish_actions(reconciler: &mut Reconciler) {
    if reconciler.busy() {
        tracing::info!("waiting for the actions in flight to end");
    }
    let mut tick = watchdog_tick();
    loop {
        tokio::select! {
            finished = reconciler.next_finished() => match finished {
                Some(f) => {
                    reconciler.record_finished(f);
                }
                None => break,
            },
            _ = next_tick(&mut tick) => notify(&[sd_notify::NotifyState::Watchdog]),
        }
    }
}

/// Ticks every half watchdog period; `None` without a watchdog.
fn watchdog_tick() -> Option<tokio::time::Interval> {
    watchdog_interval().map(|period| {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick
    })
}

async fn next_tick(tick: &mut Option<tokio::time::Interval>) {
    match tick {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
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
    watch: &mut Watch,
    mut deadline: Option<Instant>,
) {
    let mut requests = Some(requests);
    // The loop turns at least this often, so that it can ping the watchdog.
    let mut tick = watchdog_tick();
    let mut resync = tokio::time::interval_at(Instant::now() + config.resync, config.resync);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut events = None;
    let mut events_retry = Duration::from_secs(1);
    let mut events_next_try = Instant::now();
    loop {
        // After every turn, and only from here: a loop that stops turning
        // stops the pings, and systemd restarts the agent.
        if tick.is_some() {
            notify(&[sd_notify::NotifyState::Watchdog]);
        }
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
            // An idle turn: nothing to observe, only the ping above.
            _ = next_tick(&mut tick) => continue,
            // An action ended: its outcome goes into the app's memory, and
            // a pass follows.
            finished = reconciler.next_finished(), if reconciler.busy() => {
                if let Some(f) = finished {
                    reconciler.record_finished(f);
                }
            }
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
        let report = reconciler.turn().await;
        log_report(&report, false);
        deadline = report.next_deadline();
        watch.after_turn(reconciler.orchestrator(), &report).await;
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
async fn print_console_summary(orch: Arc<Orchestrator>) {
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

/// The console's line about health, derived from the passes' own
/// observations (no poll of its own): printed once, when every app is
/// healthy, or when the apps not healthy are settled that way (held by
/// their owner, unhealthy, crash-looping, left alone); then it is done.
#[derive(Debug, Default)]
struct HealthyLine {
    done: bool,
}

/// What one pass says about every app's health.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Some app is still on its way (installing, starting, backing off).
    Pending,
    AllHealthy {
        apps: usize,
    },
    /// Nothing is on its way any more, and these apps are not healthy.
    NotAll {
        healthy: usize,
        apps: usize,
        why: Vec<String>,
    },
}

/// Whether one app is healthy (`Ok(true)`), on its way (`Ok(false)`), or
/// settled not healthy (`Err(why)`).
fn app_verdict(a: &super::pass::AppReport) -> Result<bool, String> {
    let running = a.observed == "running";
    let health_ok = matches!(a.health, None | Some(HealthState::Healthy));
    match &a.decision {
        Decision::Wait(Wait::Ok | Wait::Drift { .. }) if running => match a.health {
            Some(HealthState::Unhealthy) => Err(format!("{} unhealthy", a.app)),
            Some(HealthState::Starting) => Ok(false),
            _ => Ok(health_ok),
        },
        Decision::Wait(Wait::Held) => Err(format!("{} held (stopped by its owner)", a.app)),
        Decision::Wait(Wait::OsTrial { action, why }) => Err(format!("{} waits to {action}: {why}", a.app)),
        Decision::Wait(Wait::DriftLoop) => Err(format!("{} left alone after recreating it again and again", a.app)),
        Decision::Wait(Wait::AdoptedDead) => Err(format!("{} dead (adopted; `upgrade` converts it)", a.app)),
        Decision::Wait(Wait::Drift { .. }) => {
            Err(format!("{} {} (adopted, differs from its manifest)", a.app, a.observed))
        }
        Decision::Wait(Wait::UnknownState { state }) => Err(format!("{} in an unknown state {state}", a.app)),
        Decision::Wait(Wait::Backoff { failures, .. }) if *failures >= CRASH_LOOP_AFTER => {
            Err(format!("{} failing ({failures} times in a row)", a.app))
        }
        _ => Ok(false),
    }
}

fn verdict(report: &PassReport) -> Verdict {
    if report.error.is_some() {
        return Verdict::Pending;
    }
    let mut healthy = 0;
    let mut why = Vec::new();
    for a in &report.apps {
        match app_verdict(a) {
            Ok(true) => healthy += 1,
            Ok(false) => return Verdict::Pending,
            Err(reason) => why.push(reason),
        }
    }
    let apps = report.apps.len();
    if why.is_empty() {
        Verdict::AllHealthy { apps }
    } else {
        Verdict::NotAll { healthy, apps, why }
    }
}

impl HealthyLine {
    /// Looks at one pass; prints the line when the verdict is in.
    fn observe(&mut self, report: &PassReport) {
        if self.done {
            return;
        }
        let since = since_kernel_start();
        let shown = since
            .map(|s| format!("{s:.1} s"))
            .unwrap_or_else(|| "an unknown time".to_owned());
        match verdict(report) {
            Verdict::Pending => return,
            Verdict::AllHealthy { apps } => {
                // The e2e reads this line (xtask/src/harness/e2e/qemu.rs).
                eprintln!("archipelago: all {apps} apps healthy {shown} after kernel start");
                tracing::info!(apps, since_kernel_start_s = since, "all apps healthy");
            }
            Verdict::NotAll { healthy, apps, why } => {
                let mut line = format!(
                    "archipelago: not all apps healthy {shown} after kernel start: {healthy} of {apps} healthy"
                );
                for w in &why {
                    let _ = write!(line, "; {w}");
                }
                eprintln!("{line}");
                tracing::warn!(healthy, apps, not_healthy = ?why, since_kernel_start_s = since, "not all apps healthy");
            }
        }
        self.done = true;
    }
}

#[cfg(test)]
mod tests {
    use super::super::pass::AppReport;
    use super::*;

    fn app(name: &str, observed: &str, decision: Decision, health: Option<HealthState>) -> AppReport {
        AppReport {
            app: name.to_owned(),
            container: name.to_owned(),
            observed: observed.to_owned(),
            decision,
            reason: None,
            error: None,
            health,
        }
    }

    fn report(apps: Vec<AppReport>) -> PassReport {
        PassReport {
            duration_ms: 0,
            apps,
            unmatched: Vec::new(),
            manifest_errors: Vec::new(),
            error: None,
            ended: Vec::new(),
            wake_at: None,
        }
    }

    const OK: Decision = Decision::Wait(Wait::Ok);

    #[tokio::test]
    async fn the_healthy_line_waits_for_apps_on_their_way_and_names_the_settled_ones() {
        let healthy = app("web", "running", OK, Some(HealthState::Healthy));
        let no_check = app("db", "running", OK, None);
        assert_eq!(
            verdict(&report(vec![healthy.clone(), no_check.clone()])),
            Verdict::AllHealthy { apps: 2 }
        );
        // On their way: starting, installing, in flight, waiting for a dependency.
        let on_the_way = [
            app("web", "running", OK, Some(HealthState::Starting)),
            app("web", "missing", Decision::Act(Action::Install), None),
            app(
                "web",
                "missing",
                Decision::Wait(Wait::InFlight {
                    action: "install".to_owned(),
                    since: Instant::now(),
                    for_secs: 3,
                }),
                None,
            ),
            app(
                "web",
                "exited",
                Decision::Wait(Wait::Backoff {
                    until: Instant::now(),
                    in_secs: 10,
                    failures: 1,
                }),
                None,
            ),
        ];
        for a in on_the_way {
            assert_eq!(
                verdict(&report(vec![a.clone(), no_check.clone()])),
                Verdict::Pending,
                "{a:?}"
            );
        }
        // Settled: held, unhealthy, crash-looping. The line names them.
        let settled = report(vec![
            healthy,
            app("db", "exited", Decision::Wait(Wait::Held), None),
            app("lnd", "running", OK, Some(HealthState::Unhealthy)),
            app(
                "electrs",
                "exited",
                Decision::Wait(Wait::Backoff {
                    until: Instant::now(),
                    in_secs: 40,
                    failures: CRASH_LOOP_AFTER,
                }),
                None,
            ),
        ]);
        assert_eq!(
            verdict(&settled),
            Verdict::NotAll {
                healthy: 1,
                apps: 4,
                why: vec![
                    "db held (stopped by its owner)".to_owned(),
                    "lnd unhealthy".to_owned(),
                    "electrs failing (3 times in a row)".to_owned(),
                ],
            }
        );
        // A pass that could not look says nothing.
        let mut failed = report(Vec::new());
        failed.error = Some("engine away".to_owned());
        assert_eq!(verdict(&failed), Verdict::Pending);
    }

    #[tokio::test]
    async fn the_healthy_line_is_printed_once() {
        let mut line = HealthyLine::default();
        line.observe(&report(vec![app(
            "web",
            "missing",
            Decision::Act(Action::Install),
            None,
        )]));
        assert!(!line.done, "still on its way");
        line.observe(&report(vec![app("web", "running", OK, None)]));
        assert!(line.done);
    }
}
