//! One slow app never holds up the others: the agent (`archy-agent boot`,
//! against the real Podman service and registry) installs app A from a
//! registry that accepts the connection and never answers, and app B from
//! the test registry. While A's install still hangs, B is killed and runs
//! again, and `reconcile-now` and `list` answer over the control socket;
//! A's attempt then ends with the pull's timeout, named in its report.
//!
//! Order is asserted, with bounds far above what each step takes: every
//! answer comes while A is still in flight (its attempt has not ended).
//! Before each app's action ran as its own task, the first pass waited
//! for A's pull and this test failed: "B was not started again while A's
//! pull hangs".

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use archy_agent::control::ControlClient;
use common::node::{app_id, Node, SERVE};
use serde_json::{json, Value};

/// The pull limit for one registry attempt in this test: far above what
/// B's restart takes, below Podman's own give-up (about 84 s of TLS
/// handshake retries against a silent listener).
const ATTEMPT_LIMIT_S: u64 = 45;

/// The agent as `boot` runs it, on this node, with short pull limits.
fn boot(node: &Node, log: &Path) -> Child {
    let log = std::fs::File::create(log).expect("log file");
    node.agent_cmd()
        .arg("boot")
        .env(
            "ARCHY_TIMEOUTS",
            format!("pull-attempt={ATTEMPT_LIMIT_S}s,pull={}s", ATTEMPT_LIMIT_S + 5),
        )
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("boot starts")
}

/// Stops the agent when the test ends, pass or fail.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn state(node: &Node, container: &str) -> (String, String) {
    let out = node.podman(&[
        "inspect",
        "--format",
        "{{.State.Status}} {{.State.StartedAt}}",
        container,
    ]);
    let (status, started) = out.trim().split_once(' ').unwrap_or((out.trim(), ""));
    (status.to_owned(), started.to_owned())
}

/// The app's entry in a `container-list` answer.
fn entry<'a>(list: &'a Value, app: &str) -> &'a Value {
    list.as_array()
        .and_then(|l| l.iter().find(|s| s["app"] == app))
        .unwrap_or_else(|| panic!("{app} in {list:#}"))
}

/// How long A's action has been in flight, from a `list` answer; `None`
/// when it has none.
fn in_flight_secs(list: &Value, app: &str) -> Option<u64> {
    let f = &entry(list, app)["in_flight"];
    assert!(f.is_null() || f["action"] == "install", "{f}");
    f["for_secs"].as_u64()
}

async fn call(client: &ControlClient, method: &str) -> Value {
    client
        .call(method, json!({}))
        .await
        .unwrap_or_else(|e| panic!("{method}: {e:?}"))
}

#[tokio::test]
async fn an_app_whose_registry_never_answers_holds_up_no_other_app() {
    let node = Node::new();
    // A's registry: accepts every connection and never says a word.
    let listener = TcpListener::bind("127.0.0.1:0").expect("listener");
    let port = listener.local_addr().expect("addr").port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming().flatten() {
            counter.fetch_add(1, Ordering::SeqCst);
            held.push(conn);
        }
    });
    let slow = app_id("slow");
    let quick = app_id("quick");
    // A digest no store has: the pull must reach the silent registry.
    let slow_image = format!("127.0.0.1:{port}/archy-test/silent@sha256:{}", "5a".repeat(32));
    node.app(&slow, &slow_image, SERVE);
    node.app(&quick, &node.env.image.to_string(), SERVE);

    let log = node._tmp.path().join("agent.log");
    let _agent = Agent(boot(&node, &log));
    let show_log = || std::fs::read_to_string(&log).unwrap_or_default();

    // B runs, and A's pull has reached its registry (and hangs there).
    let deadline = Instant::now() + Duration::from_secs(40);
    while state(&node, &quick).0 != "running" || accepted.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "B never ran, or A's pull never reached its registry\n{}",
            show_log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(state(&node, &slow).0, "", "A has no container while its pull hangs");

    // 1. B is killed and runs again, while A still hangs.
    let first_start = state(&node, &quick).1;
    node.podman(&["kill", &quick]);
    let killed = Instant::now();
    loop {
        let (status, started) = state(&node, &quick);
        if status == "running" && started != first_start {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "B was not started again while A's pull hangs\n{}",
            show_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "B: killed -> running again in {:?} while A's pull hangs",
        killed.elapsed()
    );

    // 2. `list` and `reconcile-now` answer over the control socket, and A
    // is in flight in both: its install, the same attempt all along.
    let client = ControlClient::connect(&node.data.join("agent.sock"))
        .await
        .expect("connect")
        .expect("the agent serves its control socket");
    let asked = Instant::now();
    let list = call(&client, "container-list").await;
    assert!(
        asked.elapsed() < Duration::from_secs(20),
        "list took {:?}",
        asked.elapsed()
    );
    let first_secs = in_flight_secs(&list, &slow).unwrap_or_else(|| panic!("A is in flight: {list:#}"));
    assert_eq!(entry(&list, &quick)["state"], "running", "{list:#}");

    let asked = Instant::now();
    let report = call(&client, "reconcile-now").await;
    assert!(
        asked.elapsed() < Duration::from_secs(20),
        "reconcile-now took {:?}",
        asked.elapsed()
    );
    let app_report = |report: &Value, app: &str| {
        report["apps"]
            .as_array()
            .and_then(|a| a.iter().find(|r| r["app"] == app))
            .cloned()
            .unwrap_or_else(|| panic!("{app} in {report:#}"))
    };
    let a = app_report(&report, &slow);
    assert_eq!(a["decision"]["wait"]["reason"], "in-flight", "{report:#}");
    assert_eq!(a["decision"]["wait"]["action"], "install", "{report:#}");
    assert_eq!(
        app_report(&report, &quick)["decision"]["wait"]["reason"],
        "ok",
        "{report:#}"
    );

    let list = call(&client, "container-list").await;
    let later_secs = in_flight_secs(&list, &slow).unwrap_or_else(|| panic!("A is still in flight: {list:#}"));
    // The same attempt: a new one would count from zero again.
    assert!(
        later_secs >= first_secs,
        "A's attempt restarted: {first_secs} s, then {later_secs} s"
    );

    // 3. A's attempt ends with the timeout, named in its report.
    let deadline = Instant::now() + Duration::from_secs(ATTEMPT_LIMIT_S + 60);
    let report = loop {
        let list = call(&client, "container-list").await;
        if in_flight_secs(&list, &slow).is_none() {
            break call(&client, "reconcile-now").await;
        }
        assert!(Instant::now() < deadline, "A's pull never timed out\n{}", show_log());
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let a = app_report(&report, &slow);
    let error = a["error"].as_str().unwrap_or_else(|| panic!("A's error: {report:#}"));
    for part in [
        format!("timed out after {ATTEMPT_LIMIT_S}s"),
        format!("127.0.0.1:{port}"),
        "archy-test/silent".to_owned(),
    ] {
        assert!(error.contains(&part), "{part:?} in {error}");
    }
    // It backs off and tries again later; B kept running throughout.
    assert_eq!(a["decision"]["wait"]["reason"], "backoff", "{report:#}");
    assert_eq!(state(&node, &quick).0, "running");
}
