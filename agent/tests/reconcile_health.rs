//! Health drives reconcile, against the real Podman service: an app whose
//! probe starts failing after it was healthy is restarted, then backed
//! off, and its owner's stop holds it.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use archy_agent::orchestrator::{AppState, ContainerOrchestrator, HealthState};
use archy_agent::reconcile::daemon;
use common::node::{app_id, Node};

/// Healthy while `/tmp/ok` exists; the command makes it at every start.
/// A probe every second, two failures in a row make it unhealthy.
const FLAKY: &str = "command: [\"sh\", \"-c\", \"touch /tmp/ok; trap 'exit 0' TERM; while true; do sleep 1; done\"]\n\
health:\n  exec: [\"test\", \"-f\", \"/tmp/ok\"]\n  interval: 1s\n  timeout: 1s\n  retries: 2\n  start_period: 0s\n";
const INTERVAL: Duration = Duration::from_secs(1);
const RETRIES: u32 = 2;
/// The crash-loop backoff's first delay (`reconcile/backoff.rs`).
const FIRST_BACKOFF: Duration = Duration::from_secs(10);
/// Added to every bound for a loaded machine.
const MARGIN: Duration = Duration::from_secs(10);

fn inspect(node: &Node, container: &str, format: &str) -> String {
    node.podman(&["inspect", "--format", format, container])
        .trim()
        .to_owned()
}

fn started_at(node: &Node, container: &str) -> String {
    inspect(node, container, "{{.State.StartedAt}}")
}

fn running(node: &Node, container: &str) -> bool {
    inspect(node, container, "{{.State.Status}}") == "running"
}

/// Waits until the container runs with another start time than `before`;
/// returns the new one. Panics after `within`.
async fn restarted(node: &Node, container: &str, before: &str, within: Duration, what: &str) -> String {
    let deadline = Instant::now() + within;
    loop {
        let now_started = started_at(node, container);
        if running(node, container) && now_started != before && !now_started.is_empty() {
            return now_started;
        }
        assert!(Instant::now() < deadline, "{what}: not restarted within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn healthy(orch: &impl ContainerOrchestrator, app: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let s = orch.status(app).await.expect("status");
        if s.state == AppState::Running && s.health == Some(HealthState::Healthy) {
            return;
        }
        assert!(Instant::now() < deadline, "{app} never healthy: {s:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn an_app_whose_probe_starts_failing_is_restarted_once_then_backed_off_and_stop_holds_it() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_max_level(tracing::Level::INFO)
        .try_init();
    let node = Node::new();
    let id = app_id("sick");
    node.app(&id, &node.env.image.to_string(), FLAKY);
    // Far beyond the test: only the probes can explain a restart.
    let config = node.agent_config(Duration::from_secs(3600));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (_req_tx, req_rx) = tokio::sync::mpsc::channel(1);
    let agent = tokio::spawn(daemon::run(config, req_rx, async move {
        let _ = stop_rx.await;
    }));
    // The owner's view: another orchestrator on the same node, as the CLI.
    let owner = Arc::new(node.orchestrator().await);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !running(&node, &id) {
        assert!(Instant::now() < deadline, "the first pass never installed {id}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    healthy(owner.as_ref(), &id, MARGIN).await;
    // Healthy for a few probes: nothing restarts it.
    let first_start = started_at(&node, &id);
    tokio::time::sleep(INTERVAL * 3).await;
    assert_eq!(started_at(&node, &id), first_start, "a healthy app is left running");

    // The probe starts failing.
    node.podman(&["exec", &id, "rm", "/tmp/ok"]);
    let broke = Instant::now();
    let bound = INTERVAL * RETRIES + Duration::from_secs(2);
    let second_start = restarted(&node, &id, &first_start, bound + MARGIN, "unhealthy").await;
    let first_restart = Instant::now();
    eprintln!(
        "probe failing -> restarted in {:?} (target {bound:?})",
        first_restart - broke
    );
    // The pass saves its memory once the restart has returned.
    let deadline = Instant::now() + MARGIN;
    let last = loop {
        let s = owner.status(&id).await.expect("status");
        match s.last_restart {
            Some(last) if last.reason != "no container" => break last,
            other => assert!(Instant::now() < deadline, "the restart is never remembered: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        last.reason.starts_with("unhealthy: 2 failed probes") && last.ok,
        "{last:?}"
    );
    let list = owner.list().await.expect("list");
    assert_eq!(
        list.iter()
            .find(|a| a.app == id)
            .and_then(|a| a.last_restart.as_ref())
            .map(|l| l.reason.as_str()),
        Some(last.reason.as_str()),
        "list says why"
    );
    // The agent runs in this process without a socket: `list` works in-process.
    let cli = node.agent_cmd().arg("list").output().expect("list runs");
    let table = String::from_utf8_lossy(&cli.stdout);
    assert!(
        table.contains(&format!("{id}: last restarted")) && table.contains("unhealthy: 2 failed probes"),
        "{table}\n{}",
        String::from_utf8_lossy(&cli.stderr)
    );

    // Restarted, it is healthy again (its command made the file); it
    // fails again at once: seen unhealthy, but backed off.
    healthy(owner.as_ref(), &id, MARGIN).await;
    node.podman(&["exec", &id, "rm", "/tmp/ok"]);
    let deadline = Instant::now() + MARGIN;
    while owner.status(&id).await.expect("status").health != Some(HealthState::Unhealthy) {
        assert!(Instant::now() < deadline, "the failing probe is never seen");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The agent restarts no earlier than the backoff's first delay after
    // the first restart (its own clock read before that restart: a second
    // of slack).
    let backed_off_until = first_restart + FIRST_BACKOFF - Duration::from_secs(1);
    while Instant::now() < backed_off_until {
        assert_eq!(
            started_at(&node, &id),
            second_start,
            "restarted again {:?} after the first restart, inside the backoff",
            first_restart.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // After the deadline it is restarted again.
    let third_start = restarted(&node, &id, &second_start, FIRST_BACKOFF + MARGIN, "after the backoff").await;
    let second_restart = Instant::now();
    eprintln!(
        "second restart {:?} after the first (backoff {FIRST_BACKOFF:?})",
        second_restart - first_restart
    );

    // The owner stops it: held, however its health or backoff goes.
    owner.stop(&id).await.expect("the owner stops it");
    let held_until = second_restart + FIRST_BACKOFF * 2 + Duration::from_secs(3);
    while Instant::now() < held_until {
        assert!(!running(&node, &id), "restarted while held");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(started_at(&node, &id), third_start, "never started while held");

    let _ = stop_tx.send(());
    agent.await.expect("agent task").expect("agent exits cleanly");
}
