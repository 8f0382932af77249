//! One writer per data root, against the real Podman service that `cargo
//! xtask test` starts and real `archy-agent` processes: app changes from
//! the CLI beside a booting agent all go through it, a second agent and
//! `reconcile --once` are refused while one runs, and the control socket
//! answers during the pre-pulled image import.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use archy_agent::dataroot::DataRoot;
use archy_agent::images::{ImageLock, LockEntry, LOCK_FILE};
use archy_agent::manifest::Digest;
use archy_agent::reconcile::state;
use archy_agent::writer;
use common::node::{app_id, Node, SERVE};
use serde_json::Value;
use tokio::time::Instant;

/// A node's agent and the CLI's view of it: the data root and apps of
/// `node`, a control socket and an images folder of their own.
struct Setup {
    node: Node,
    sock: PathBuf,
    images: PathBuf,
    /// An engine socket that does not exist: a CLI command given it can
    /// only succeed through the agent.
    no_engine: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let node = Node::new();
        let root = node._tmp.path().to_path_buf();
        Setup {
            sock: root.join("run/agent.sock"),
            images: root.join("images"),
            no_engine: root.join("no-engine-here.sock"),
            node,
        }
    }

    /// `archy-agent` on this node, with no ARCHY_* setting inherited.
    fn agent(&self, engine: &Path) -> Command {
        self.agent_at(engine, &self.sock)
    }

    /// [`Setup::agent`] with another control socket.
    fn agent_at(&self, engine: &Path, control: &Path) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_archy-agent"));
        for var in [
            "ARCHY_APPS",
            "ARCHY_DATA",
            "ARCHY_ENGINE",
            "ARCHY_CONTROL",
            "ARCHY_IMAGES",
        ] {
            cmd.env_remove(var);
        }
        cmd.arg("--engine")
            .arg(engine)
            .arg("--apps")
            .arg(&self.node.apps)
            .arg("--data")
            .arg(&self.node.data)
            .arg("--images")
            .arg(&self.images)
            .arg("--control")
            .arg(control);
        cmd
    }

    /// `archy-agent boot` with the real engine, its log in `name`.log.
    fn boot(&self, name: &str, resync_s: u64) -> Agent {
        let log = self.node._tmp.path().join(format!("{name}.log"));
        let out = fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        self.agent(&self.node.env.engine_socket)
            .args(["boot", "--resync", &resync_s.to_string()])
            .stdout(out)
            .stderr(err)
            .spawn()
            .map(Agent)
            .expect("archy-agent boot starts")
    }

    fn log(&self, name: &str) -> String {
        fs::read_to_string(self.node._tmp.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// A CLI command that can only succeed through the agent.
    fn via_agent(&self, args: &[&str]) -> Command {
        let mut cmd = self.agent(&self.no_engine);
        cmd.args(args);
        cmd
    }

    /// An app running the test image's idle loop.
    fn app(&self, prefix: &str) -> String {
        let id = app_id(prefix);
        self.node.app(&id, &self.node.env.image.to_string(), SERVE);
        id
    }

    /// An images folder whose import takes a while, for real: `count`
    /// sparse archives of `size` bytes, each hashed in full before its
    /// (wrong) sha256 skips it. No engine has their images.
    fn slow_images(&self, count: usize, size: u64) {
        fs::create_dir_all(&self.images).expect("images dir");
        let entries = (0..count)
            .map(|n| {
                let marker = app_id("slow");
                let archive = format!("{marker}.tar");
                fs::File::create(self.images.join(&archive))
                    .and_then(|f| f.set_len(size))
                    .expect("sparse archive");
                let manifest_digest = Digest::of(format!("manifest {marker} {n}").as_bytes());
                LockEntry {
                    app: marker.clone(),
                    reference: format!("{}/archy-slow/{marker}:1@{manifest_digest}", self.node.env.registry),
                    manifest_digest,
                    config_digest: Digest::of(format!("config {marker} {n}").as_bytes()),
                    archive,
                    archive_sha256: "0".repeat(64),
                    size,
                }
            })
            .collect();
        let path = self.images.join(LOCK_FILE);
        let bytes = ImageLock::new(entries).to_file_bytes(&path).expect("a valid lock");
        fs::write(&path, bytes).expect("write lock");
    }

    /// `state/agent.json`, when it exists, is a state file the agent reads.
    fn assert_state_valid(&self, after: &str) {
        let path = self.node.data.join("state/agent.json");
        if let Ok(bytes) = fs::read(&path) {
            if let Err(e) = state::check(&bytes) {
                panic!(
                    "after {after}: {} is not a valid state file ({e}):\n{}",
                    path.display(),
                    String::from_utf8_lossy(&bytes)
                );
            }
        }
    }
}

fn show(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

async fn run(mut cmd: Command) -> Output {
    cmd.stdin(Stdio::null());
    tokio::task::spawn_blocking(move || cmd.output().expect("the archy-agent binary runs"))
        .await
        .expect("joined")
}

/// An agent this test started: killed if the test ends without [`stop`].
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// SIGTERM to the agent this test started, and its exit status.
async fn stop(agent: Agent) -> std::process::ExitStatus {
    let sent = Command::new("kill")
        .args(["-TERM", &agent.0.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(sent.success());
    tokio::task::spawn_blocking(move || {
        let mut agent = agent;
        agent.0.wait().expect("agent waited")
    })
    .await
    .expect("joined")
}

/// Waits up to `within` for `child` to exit.
async fn exited_within(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// Waits until the agent's socket accepts a connection.
async fn wait_for_socket(sock: &Path, within: Duration) {
    let ok = common::eventually(within, || async { tokio::net::UnixStream::connect(sock).await.ok() }).await;
    assert!(ok.is_some(), "the control socket {} never answered", sock.display());
}

/// `list --json` through the agent.
async fn list(setup: &Setup) -> Vec<Value> {
    let out = run(setup.via_agent(&["--json", "list"])).await;
    assert!(out.status.success(), "list: {}", show(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("list is JSON ({e}): {}", show(&out)))
}

/// Twenty app changes from real CLI processes, started as soon as the
/// agent holds the data root's lock (before its socket is open, and during
/// its image import), four
/// apps' sequences at once while the agent's own passes run every second:
/// every one goes through the agent (the CLI is given no engine, so acting
/// beside the agent would fail), none fails, the state file is valid after
/// each, and each app ends as its last request left it.
#[tokio::test]
async fn twenty_cli_changes_beside_a_booting_agent_all_go_through_it_and_the_last_one_wins() {
    let setup = Setup::new();
    setup.slow_images(2, 64 << 20);
    let apps: Vec<String> = (0..4).map(|n| setup.app(&format!("writer{n}"))).collect();
    let plans: [[&str; 5]; 4] = [
        ["install", "stop", "start", "upgrade", "stop"],
        ["install", "upgrade", "stop", "start", "restart"],
        ["install", "stop", "upgrade", "start", "stop"],
        ["install", "start", "upgrade", "stop", "upgrade"],
    ];
    let agent = setup.boot("agent", 1);
    // The agent is running once it holds the data root's lock; its socket
    // opens later, when the engine answers.
    let data = DataRoot::new(&setup.node.data);
    let held = common::eventually(Duration::from_secs(30), || async {
        writer::holder(&data).filter(writer::Holder::is_agent)
    })
    .await;
    assert!(
        held.is_some(),
        "the agent never took the data root's lock:\n{}",
        setup.log("agent")
    );
    let setup = std::sync::Arc::new(setup);
    let mut chains = Vec::new();
    for (app, plan) in apps.iter().cloned().zip(plans) {
        let setup = setup.clone();
        chains.push(tokio::spawn(async move {
            for op in plan {
                let out = run(setup.via_agent(&[op, &app])).await;
                assert!(
                    out.status.success(),
                    "`{op} {app}` failed beside the running agent:\n{}",
                    show(&out)
                );
                setup.assert_state_valid(&format!("{op} {app}"));
            }
        }));
    }
    for chain in chains {
        chain.await.expect("every change succeeded");
    }
    // A few of the agent's own passes after the last change: none undoes it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let listed = list(&setup).await;
    for (app, plan) in apps.iter().zip(plans) {
        let want = if plan[4] == "stop" { "stopped" } else { "running" };
        let status = listed
            .iter()
            .find(|s| s["app"] == app.as_str())
            .unwrap_or_else(|| panic!("{app} is listed: {listed:?}"));
        assert_eq!(status["state"], want, "{app} after {plan:?}: {status}");
        assert_eq!(
            setup.node.data.join("state/held").join(app).exists(),
            want == "stopped",
            "{app}'s hold after {plan:?}"
        );
    }
    setup.assert_state_valid("the last pass");
    let aside: Vec<_> = fs::read_dir(setup.node.data.join("state"))
        .expect("state dir")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("corrupt"))
        .collect();
    assert!(aside.is_empty(), "no state file was ever moved aside: {aside:?}");
    assert!(stop(agent).await.success(), "{}", setup.log("agent"));
}

/// While an agent runs, a second `boot` on the same data root (even with
/// another control socket) refuses to start, naming the lock file, and
/// `reconcile --once` is refused; once the agent has stopped, it runs.
#[tokio::test]
async fn a_second_agent_and_reconcile_once_are_refused_while_an_agent_runs() {
    let setup = Setup::new();
    let id = setup.app("onewriter");
    let agent = setup.boot("first", 3600);
    wait_for_socket(&setup.sock, Duration::from_secs(60)).await;
    let lock = setup.node.data.join("state/agent.lock");

    let mut second = setup.agent_at(
        &setup.node.env.engine_socket,
        &setup.node._tmp.path().join("run/second.sock"),
    );
    second
        .args(["boot", "--resync", "3600"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut second = second.spawn().expect("the second boot starts");
    let status = exited_within(&mut second, Duration::from_secs(30)).await;
    let Some(status) = status else {
        let _ = second.kill();
        let _ = second.wait();
        panic!("a second agent on the same data root kept running");
    };
    let out = second.wait_with_output().expect("output");
    assert!(!status.success(), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("an agent is already running on the data root")
            && stderr.contains(&lock.display().to_string())
            && stderr.contains("`archy-agent boot`"),
        "{}",
        show(&out)
    );
    assert!(
        !setup.node._tmp.path().join("run/second.sock").exists(),
        "the refused agent served nothing"
    );

    let out = run({
        let mut cmd = setup.agent(&setup.node.env.engine_socket);
        cmd.args(["reconcile", "--once"]);
        cmd
    })
    .await;
    assert!(!out.status.success(), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("reconcile --once is refused while the agent runs")
            && stderr.contains(&lock.display().to_string()),
        "{}",
        show(&out)
    );
    assert!(out.stdout.is_empty(), "no pass ran: {}", show(&out));

    assert!(stop(agent).await.success(), "{}", setup.log("first"));
    let out = run({
        let mut cmd = setup.agent(&setup.node.env.engine_socket);
        cmd.args(["reconcile", "--once"]);
        cmd
    })
    .await;
    assert!(out.status.success(), "without an agent it runs: {}", show(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&id), "{}", show(&out));
}

/// The control socket opens before the pre-pulled images are imported:
/// `list` and `status` answer during the import and say how far it is, a
/// change waits for the import to end, and once it has, nothing says
/// "importing" any more.
#[tokio::test]
async fn status_and_list_answer_during_the_image_import_and_say_how_far_it_is() {
    let setup = Setup::new();
    setup.slow_images(4, 128 << 20);
    let id = setup.app("importing");
    let agent = setup.boot("agent", 3600);
    wait_for_socket(&setup.sock, Duration::from_secs(60)).await;

    let listed = list(&setup).await;
    let note = listed[0]["agent"].as_str().unwrap_or_default().to_owned();
    assert!(
        note.starts_with("importing images") && note.ends_with(" of 4)"),
        "the first answer comes during the import and says so: {listed:?}\n{}",
        setup.log("agent")
    );
    assert_eq!(listed[0]["state"], "missing", "no pass has run yet: {listed:?}");
    // A change sent now waits for the import, then is done.
    let install_during_import = tokio::spawn(run(setup.via_agent(&["install", &id])));
    let out = run(setup.via_agent(&["status", &id])).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("agent: importing images (") && l.ends_with(" of 4)")),
        "{}",
        show(&out)
    );
    let out = install_during_import.await.expect("joined");
    assert!(out.status.success(), "{}", show(&out));
    let after = list(&setup).await;
    assert!(
        after[0].get("agent").is_none(),
        "a change returns only after the import: {after:?}"
    );
    assert_eq!(after[0]["state"], "running", "{after:?}");
    assert!(stop(agent).await.success(), "{}", setup.log("agent"));
}
