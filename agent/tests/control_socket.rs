//! The control socket against the real Podman service that `cargo xtask
//! test` starts: raw JSON-RPC, the CLI through a running agent and without
//! one, the socket file's life cycle.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use archy_agent::control::{self, protocol, ControlClient, ControlHandler, OrchestratorHandler, RemoteOrchestrator};
use archy_agent::dataroot::DataRoot;
use archy_agent::engine::Engine;
use archy_agent::orchestrator::{
    AppState, ContainerOrchestrator, LogCut, Orchestrator, OrchestratorError, DEFAULT_LOG_TAIL, MAX_LOG_REPLY_BYTES,
};
use archy_agent::registry::RegistryStore;
use common::{env, unique_name, Cleanup, TestEnv};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

const PASSWORD: &str = "correct-horse-battery-staple-42";
/// Prints a marker, then idles until SIGTERM, which it exits 0 on.
const SERVE: &str =
    "command: [\"sh\", \"-c\", \"echo hello-from-the-app; trap 'exit 0' TERM; while true; do sleep 1; done\"]\n";

/// An apps folder, a data root and a socket path in a temp folder, and the
/// containers to remove at the end.
struct Node {
    tmp: tempfile::TempDir,
    apps: PathBuf,
    data: PathBuf,
    sock: PathBuf,
    env: TestEnv,
    cleanup: Cleanup,
}

impl Node {
    fn new() -> Node {
        let tmp = tempfile::tempdir().expect("tempdir");
        let apps = tmp.path().join("apps");
        let data = tmp.path().join("data");
        fs::create_dir_all(&apps).expect("apps dir");
        fs::create_dir_all(&data).expect("data dir");
        let env = env();
        let cleanup = Cleanup::new(&env);
        Node {
            sock: tmp.path().join("run").join("agent.sock"),
            tmp,
            apps,
            data,
            env,
            cleanup,
        }
    }

    /// Writes `apps/<id>/manifest.yml` for a fresh app id and returns it.
    fn app(&mut self, prefix: &str) -> String {
        self.app_running(prefix, SERVE)
    }

    /// [`Node::app`] with another `command:` line.
    fn app_running(&mut self, prefix: &str, command: &str) -> String {
        let id = unique_name(prefix).replace('_', "-");
        let dir = self.apps.join(&id);
        fs::create_dir_all(&dir).expect("app dir");
        fs::write(
            dir.join("manifest.yml"),
            format!(
                "id: {id}\nname: {id}\nversion: \"1.0\"\nimage: {}\nstop_grace_period: 2s\n{command}",
                self.env.image
            ),
        )
        .expect("write manifest");
        self.cleanup.also_container(&id);
        id
    }

    async fn orchestrator(&self) -> Arc<Orchestrator> {
        let engine = Engine::connect(&self.env.engine_socket).await.expect("engine");
        Arc::new(Orchestrator::prod(engine, &self.apps, &DataRoot::new(&self.data)))
    }

    /// Serves the control socket over a fresh orchestrator until the
    /// returned sender fires, and waits until it answers.
    async fn serve(&self, reconcile_now: Option<control::ReconcileNow>) -> Server {
        self.serve_with(self.orchestrator().await, reconcile_now).await
    }

    /// [`Node::serve`] over `orch`.
    async fn serve_with(&self, orch: Arc<Orchestrator>, reconcile_now: Option<control::ReconcileNow>) -> Server {
        let handler: Arc<dyn ControlHandler> = Arc::new(OrchestratorHandler::new(orch, reconcile_now));
        let (stop, stopped) = oneshot::channel::<()>();
        let sock = self.sock.clone();
        let task = tokio::spawn(async move {
            control::serve(&sock, handler, async move {
                let _ = stopped.await;
            })
            .await
        });
        wait_for_socket(&self.sock).await;
        Server { stop, task }
    }
}

struct Server {
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Server {
    async fn shut_down(self) {
        self.stop.send(()).expect("the server is still running");
        self.task.await.expect("joined").expect("served and shut down cleanly");
    }
}

async fn wait_for_socket(sock: &Path) {
    let ok = common::eventually(Duration::from_secs(10), || async {
        UnixStream::connect(sock).await.ok()
    })
    .await;
    assert!(ok.is_some(), "the control socket {} never answered", sock.display());
}

/// One connection speaking raw lines.
struct Raw {
    lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    write: tokio::net::unix::OwnedWriteHalf,
}

impl Raw {
    async fn connect(sock: &Path) -> Raw {
        let (read, write) = UnixStream::connect(sock).await.expect("connect").into_split();
        Raw {
            lines: BufReader::new(read).lines(),
            write,
        }
    }

    /// Sends one line and returns the one response line, parsed.
    async fn send(&mut self, line: &str) -> Value {
        self.write
            .write_all(format!("{line}\n").as_bytes())
            .await
            .expect("send");
        let answer = self.lines.next_line().await.expect("read").expect("an answer line");
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("not JSON: {answer}: {e}"))
    }

    async fn call(&mut self, id: u64, method: &str, params: Value) -> Value {
        let line = json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params }).to_string();
        let response = self.send(&line).await;
        assert_eq!(response["id"], json!(id), "{response}");
        response
    }

    async fn ok(&mut self, id: u64, method: &str, params: Value) -> Value {
        let response = self.call(id, method, params).await;
        assert!(response.get("error").is_none(), "{method} failed: {response}");
        response["result"].clone()
    }

    async fn err(&mut self, id: u64, method: &str, params: Value) -> Value {
        let response = self.call(id, method, params).await;
        assert!(response.get("result").is_none(), "{method} should fail: {response}");
        response["error"].clone()
    }
}

#[tokio::test]
async fn raw_json_rpc_installs_an_app_and_reports_its_status_list_and_logs() {
    let mut node = Node::new();
    let id = node.app("ctl-inst");
    let never = node.app("ctl-never");
    let server = node.serve(None).await;
    let mut raw = Raw::connect(&node.sock).await;

    let report = raw.ok(1, "container-install", json!({ "app": id })).await;
    assert_eq!(report["app"], json!(id));
    assert_eq!(report["container"], json!(id));
    assert_eq!(report["created"], json!(true));
    assert!(
        report["image_id"].as_str().is_some_and(|s| s.starts_with("sha256:")),
        "{report}"
    );

    let status = raw.ok(2, "container-status", json!({ "app": id })).await;
    assert_eq!(status["state"], json!("running"), "{status}");
    assert_eq!(status["managed"], json!(true), "{status}");

    let list = raw.ok(3, "container-list", json!({})).await;
    let states: Vec<(String, String)> = list
        .as_array()
        .expect("an array")
        .iter()
        .map(|s| {
            (
                s["app"].as_str().unwrap_or("").to_owned(),
                s["state"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert!(states.contains(&(id.clone(), "running".to_owned())), "{list}");
    assert!(states.contains(&(never.clone(), "missing".to_owned())), "{list}");

    let mut logs = Value::Null;
    for n in 0..100 {
        logs = raw.ok(10 + n, "container-logs", json!({ "app": id, "tail": 5 })).await;
        if logs["logs"].as_str().is_some_and(|l| l.contains("hello-from-the-app")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        logs["logs"].as_str().is_some_and(|l| l.contains("hello-from-the-app")),
        "{logs}"
    );

    // Typed orchestrator errors keep their codes and fields.
    let unknown = raw.err(200, "container-status", json!({ "app": "no-such-app" })).await;
    assert_eq!(unknown["code"], json!(protocol::UNKNOWN_APP), "{unknown}");
    let known = unknown["data"]["known"].as_array().expect("known apps");
    assert!(known.contains(&json!(id)) && known.contains(&json!(never)), "{unknown}");
    assert!(
        unknown["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("unknown app \"no-such-app\"")),
        "{unknown}"
    );
    let not_installed = raw.err(201, "container-start", json!({ "app": never })).await;
    assert_eq!(not_installed["code"], json!(protocol::NOT_INSTALLED), "{not_installed}");
    assert_eq!(not_installed["data"]["container"], json!(never), "{not_installed}");

    let stopped = raw.ok(202, "container-stop", json!({ "app": id })).await;
    assert_eq!(stopped, json!({ "app": id, "done": "stopped" }));
    let status = raw.ok(203, "container-status", json!({ "app": id })).await;
    assert_eq!(status["state"], json!("stopped"), "{status}");

    server.shut_down().await;
}

#[tokio::test]
async fn registry_add_and_list_over_the_socket_never_return_the_password() {
    let node = Node::new();
    let server = node.serve(None).await;
    let mut raw = Raw::connect(&node.sock).await;

    let added = raw
        .ok(
            1,
            "registry.add",
            json!({ "name": "lan", "url": "https://mirror.lan:5000", "priority": 10, "username": "me", "password": PASSWORD }),
        )
        .await;
    assert_eq!(
        added,
        json!({ "name": "lan", "url": "https://mirror.lan:5000", "priority": 10, "auth": true })
    );
    let listing = raw.ok(2, "registry.list", Value::Null).await;
    assert_eq!(
        listing["registries"],
        json!([{ "name": "lan", "url": "https://mirror.lan:5000", "priority": 10, "auth": true }])
    );
    assert_eq!(
        listing["file"],
        json!(DataRoot::new(&node.data).registries().display().to_string())
    );
    assert!(!listing.to_string().contains(PASSWORD), "{listing}");
    // Stored with the login, where the agent's pulls find it.
    let store = RegistryStore::open(&DataRoot::new(&node.data)).expect("store");
    let creds = store
        .get("lan")
        .and_then(|r| r.credentials.clone())
        .expect("credentials");
    assert_eq!(creds.password(), PASSWORD);

    // Invalid values are invalid params naming the field; the password is
    // in no error.
    let bad_url = raw
        .err(
            3,
            "registry.add",
            json!({ "name": "web", "url": "http://mirror.example.org", "username": "me", "password": PASSWORD }),
        )
        .await;
    assert_eq!(bad_url["code"], json!(protocol::INVALID_PARAMS), "{bad_url}");
    assert_eq!(bad_url["data"]["param"], json!("url"), "{bad_url}");
    assert!(!bad_url.to_string().contains(PASSWORD), "{bad_url}");
    let no_user = raw
        .err(
            4,
            "registry.add",
            json!({ "name": "web", "url": "https://mirror.example.org", "password": PASSWORD }),
        )
        .await;
    assert_eq!(no_user["data"]["param"], json!("username"), "{no_user}");
    assert!(!no_user.to_string().contains(PASSWORD), "{no_user}");
    let duplicate = raw
        .err(5, "registry.add", json!({ "name": "lan", "url": "https://other.lan" }))
        .await;
    assert_eq!(duplicate["code"], json!(protocol::SERVER_ERROR), "{duplicate}");
    assert!(
        duplicate["message"]
            .as_str()
            .is_some_and(|m| m.contains("already exists")),
        "{duplicate}"
    );

    let unknown = raw.err(6, "registry.remove", json!({ "name": "ghost" })).await;
    assert_eq!(unknown["code"], json!(protocol::UNKNOWN_REGISTRY), "{unknown}");
    assert_eq!(unknown["data"]["known"], json!(["lan"]), "{unknown}");
    let removed = raw.ok(7, "registry.remove", json!({ "name": "lan" })).await;
    assert_eq!(removed["name"], json!("lan"));
    assert_eq!(raw.ok(8, "registry.list", json!({})).await["registries"], json!([]));

    server.shut_down().await;
}

#[tokio::test]
async fn bad_requests_get_json_rpc_errors_and_the_connection_keeps_serving() {
    let node = Node::new();
    let server = node.serve(None).await;
    let mut raw = Raw::connect(&node.sock).await;

    let unknown = raw.err(1, "container-explode", json!({})).await;
    assert_eq!(unknown["code"], json!(-32601), "{unknown}");
    let message = unknown["message"].as_str().expect("message");
    assert!(message.contains("\"container-explode\""), "{message}");
    for valid in ["container-install", "container-logs", "registry.test", "reconcile-now"] {
        assert!(message.contains(valid), "{valid} missing from: {message}");
    }

    let bad = raw.err(2, "container-logs", json!({ "app": "x", "tail": "ten" })).await;
    assert_eq!(bad["code"], json!(-32602), "{bad}");
    assert_eq!(bad["data"]["param"], json!("tail"), "{bad}");
    assert!(
        bad["message"]
            .as_str()
            .is_some_and(|m| m.contains("\"tail\" must be a non-negative integer")),
        "{bad}"
    );
    let missing = raw.err(3, "container-status", json!({})).await;
    assert_eq!(missing["data"]["param"], json!("app"), "{missing}");

    let malformed = raw.send("{\"jsonrpc\": \"2.0\", \"id\": 4, \"method\": ").await;
    assert_eq!(malformed["error"]["code"], json!(-32700), "{malformed}");
    assert_eq!(malformed["id"], Value::Null);
    let batch = raw
        .send(r#"[{"jsonrpc":"2.0","id":5,"method":"container-list"}]"#)
        .await;
    assert_eq!(batch["error"]["code"], json!(-32600), "{batch}");

    // The same connection still answers.
    let list = raw.ok(6, "container-list", json!({})).await;
    assert_eq!(list, json!([]));

    server.shut_down().await;
}

#[tokio::test]
async fn the_socket_file_is_mode_0660_in_a_created_folder_and_removed_on_shutdown() {
    let node = Node::new();
    assert!(!node.sock.parent().expect("parent").exists());
    let server = node.serve(None).await;
    let mode = fs::metadata(&node.sock).expect("socket").permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "{mode:o}");
    server.shut_down().await;
    assert!(!node.sock.exists(), "the socket file is removed on shutdown");
}

#[tokio::test]
async fn a_stale_socket_file_is_replaced_and_a_live_or_foreign_one_refused() {
    let node = Node::new();
    fs::create_dir_all(node.sock.parent().expect("parent")).expect("run dir");
    // A socket file nobody listens on: what a killed agent leaves.
    drop(std::os::unix::net::UnixListener::bind(&node.sock).expect("bind"));
    assert!(node.sock.exists());
    let server = node.serve(None).await;

    let handler: Arc<dyn ControlHandler> = Arc::new(OrchestratorHandler::new(node.orchestrator().await, None));
    let second = control::serve(&node.sock, handler.clone(), std::future::ready(())).await;
    let e = second.expect_err("a second server on a live socket is refused");
    assert!(format!("{e:#}").contains("another process"), "{e:#}");
    // The first one still serves.
    let mut raw = Raw::connect(&node.sock).await;
    raw.ok(1, "container-list", json!({})).await;
    server.shut_down().await;

    let plain = node.tmp.path().join("not-a-socket");
    fs::write(&plain, "keep me").expect("write");
    let e = control::serve(&plain, handler, std::future::ready(()))
        .await
        .expect_err("a regular file is refused");
    assert!(format!("{e:#}").contains("is not a socket"), "{e:#}");
    assert_eq!(fs::read_to_string(&plain).expect("kept"), "keep me");
}

#[tokio::test]
async fn reconcile_now_waits_for_the_loop_report_and_is_refused_without_a_loop() {
    let node = Node::new();
    let server = node.serve(None).await;
    let e = Raw::connect(&node.sock)
        .await
        .err(1, "reconcile-now", Value::Null)
        .await;
    assert_eq!(e["code"], json!(protocol::UNAVAILABLE), "{e}");
    assert!(
        e["message"]
            .as_str()
            .is_some_and(|m| m.contains("reconcile-now needs the running agent")),
        "{e}"
    );
    server.shut_down().await;

    // A stand-in for the reconcile loop: answers each request with a report.
    let (tx, mut rx) = mpsc::channel::<oneshot::Sender<Value>>(4);
    let fake_loop = tokio::spawn(async move {
        let mut passes = 0;
        while let Some(reply) = rx.recv().await {
            passes += 1;
            let _ = reply.send(json!({ "pass": passes, "actions": [] }));
        }
    });
    let server = node.serve(Some(tx)).await;
    let mut raw = Raw::connect(&node.sock).await;
    assert_eq!(
        raw.ok(2, "reconcile-now", json!({})).await,
        json!({ "pass": 1, "actions": [] })
    );
    assert_eq!(raw.ok(3, "reconcile-now", json!({})).await["pass"], json!(2));
    drop(raw);
    server.shut_down().await;
    fake_loop.await.expect("the loop ends when the handler is gone");
}

#[tokio::test]
async fn the_remote_orchestrator_returns_the_same_structs_and_typed_errors() {
    let mut node = Node::new();
    let id = node.app("ctl-remote");
    let server = node.serve(None).await;
    let local = node.orchestrator().await;
    local.install(&id).await.expect("install");

    let client = ControlClient::connect(&node.sock)
        .await
        .expect("connects")
        .expect("an agent answers");
    let remote = RemoteOrchestrator::new(client);
    let (mine, theirs) = (
        local.status(&id).await.expect("local"),
        remote.status(&id).await.expect("remote"),
    );
    assert_eq!(mine, theirs);
    assert_eq!(theirs.state, AppState::Running);
    let health = remote.health(&id).await.expect("health");
    assert_eq!((health.app.as_str(), health.state), (id.as_str(), AppState::Running));
    match remote.logs("no-such-app", None).await {
        Err(OrchestratorError::UnknownApp { app, known }) => {
            assert_eq!(app, "no-such-app");
            assert_eq!(known, vec![id.clone()]);
        }
        other => panic!("expected UnknownApp, got {other:?}"),
    }
    server.shut_down().await;

    let nowhere = node.tmp.path().join("nobody-here.sock");
    assert!(ControlClient::connect(&nowhere).await.expect("no error").is_none());
}

/// The binary, with no ARCHY_* setting inherited.
fn agent() -> Command {
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
    cmd
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
    tokio::task::spawn_blocking(move || cmd.output().expect("the archy-agent binary runs"))
        .await
        .expect("joined")
}

#[tokio::test]
async fn the_cli_goes_through_a_running_agent_and_acts_in_process_without_one() {
    let mut node = Node::new();
    let id = node.app("ctl-cli");
    let server = node.serve(None).await;
    node.orchestrator().await.install(&id).await.expect("install");
    let bogus_engine = node.tmp.path().join("no-engine-here.sock");
    // Nothing of the agent's: another data root and apps folder, and an
    // engine that does not exist. Only the socket can answer.
    let elsewhere = node.tmp.path().join("elsewhere");

    let mut via_socket = agent();
    via_socket
        .arg("--control")
        .arg(&node.sock)
        .arg("--engine")
        .arg(&bogus_engine)
        .arg("--apps")
        .arg(&elsewhere)
        .arg("--data")
        .arg(&elsewhere)
        .args(["--json", "status", &id]);
    let out = run(via_socket).await;
    assert!(out.status.success(), "{}", show(&out));
    let status: Value = serde_json::from_slice(&out.stdout).expect("JSON status");
    assert_eq!(
        (status["app"].as_str(), status["state"].as_str()),
        (Some(id.as_str()), Some("running"))
    );
    assert!(out.stderr.is_empty(), "nothing extra without RUST_LOG: {}", show(&out));

    // Registry commands go to the agent's list too.
    let mut add = agent();
    add.arg("--control")
        .arg(&node.sock)
        .arg("--data")
        .arg(&elsewhere)
        .args(["registry", "add", "lan", "https://mirror.lan:5000"]);
    let out = run(add).await;
    assert!(out.status.success(), "{}", show(&out));
    assert!(RegistryStore::open(&DataRoot::new(&node.data))
        .expect("store")
        .get("lan")
        .is_some());
    assert!(!elsewhere.exists(), "nothing is written beside the agent");

    server.shut_down().await;

    // No agent: the same command acts in-process, with the real engine.
    let nowhere = node.tmp.path().join("nobody-here.sock");
    let local = |engine: &Path| {
        let mut cmd = agent();
        cmd.arg("--control")
            .arg(&nowhere)
            .arg("--engine")
            .arg(engine)
            .arg("--apps")
            .arg(&node.apps)
            .arg("--data")
            .arg(&node.data)
            .args(["status", &id]);
        cmd
    };
    let out = run(local(&node.env.engine_socket)).await;
    assert!(out.status.success(), "{}", show(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.lines().any(|l| l.starts_with(&id) && l.contains("running")),
        "{stdout}"
    );
    // ... and so needs the engine: with the bogus one it fails.
    let out = run(local(&bogus_engine)).await;
    assert!(!out.status.success(), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no-engine-here.sock"),
        "{}",
        show(&out)
    );
}

#[tokio::test]
async fn shutdown_is_refused_while_an_agent_answers_and_stops_the_apps_once_it_is_gone() {
    let mut node = Node::new();
    let id = node.app("ctl-shutdown");
    let server = node.serve(None).await;
    node.orchestrator().await.install(&id).await.expect("install");
    let shutdown = || {
        let mut cmd = agent();
        cmd.arg("--control")
            .arg(&node.sock)
            .arg("--engine")
            .arg(&node.env.engine_socket)
            .arg("--apps")
            .arg(&node.apps)
            .arg("--data")
            .arg(&node.data)
            .arg("shutdown");
        cmd
    };
    let state = || async { node.orchestrator().await.status(&id).await.expect("status").state };

    // A running agent would start the apps again: refuse, touch nothing.
    let out = run(shutdown()).await;
    assert!(!out.status.success(), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the agent is running") && stderr.contains(&node.sock.display().to_string()),
        "{}",
        show(&out)
    );
    assert_eq!(state().await, AppState::Running);

    server.shut_down().await;
    let out = run(shutdown()).await;
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with(&format!("{id}: stopped {id} in ")),
        "{}",
        show(&out)
    );
    assert_eq!(state().await, AppState::Stopped);
}

/// A registry url with a login is refused through the socket, raw and
/// from the CLI, by a real `archy-agent boot`; neither a reply, the CLI's
/// output nor the agent's log (at debug) holds the password.
#[tokio::test]
async fn a_url_with_a_login_is_refused_and_the_password_is_never_echoed_or_logged() {
    const URL_PASSWORD: &str = "hunter2-in-the-url-77";
    let node = Node::new();
    let url = format!("https://me:{URL_PASSWORD}@mirror.lan:5000");
    let log = node.tmp.path().join("agent.log");
    let mut boot = agent();
    boot.env("RUST_LOG", "debug")
        .arg("--control")
        .arg(&node.sock)
        .arg("--engine")
        .arg(&node.env.engine_socket)
        .arg("--apps")
        .arg(&node.apps)
        .arg("--data")
        .arg(&node.data)
        .arg("--images")
        .arg(node.tmp.path().join("no-images"))
        .args(["boot", "--resync", "3600"])
        .stdout(fs::File::create(&log).expect("log file"))
        .stderr(fs::File::options().append(true).open(&log).expect("log file"));
    let mut agent_process = boot.spawn().expect("archy-agent boot starts");
    wait_for_socket(&node.sock).await;

    let mut raw = Raw::connect(&node.sock).await;
    let mut replies = Vec::new();
    for (id, params) in [
        json!({ "name": "lan", "url": url }),
        json!({ "name": "lan", "url": url, "username": "me", "password": PASSWORD }),
        json!({ "name": "lan", "url": format!("http://me:{URL_PASSWORD}@10.0.0.1") }),
    ]
    .into_iter()
    .enumerate()
    {
        let error = raw.err(id as u64 + 1, "registry.add", params).await;
        assert_eq!(error["data"]["param"], json!("url"), "{error}");
        assert!(
            error["message"].as_str().is_some_and(|m| m.contains("<hidden>@")),
            "{error}"
        );
        replies.push(error.to_string());
    }

    let mut outputs = Vec::new();
    for json_flag in [false, true] {
        let mut add = agent();
        add.arg("--control").arg(&node.sock).arg("--data").arg(&node.data);
        if json_flag {
            add.arg("--json");
        }
        add.args(["registry", "add", "lan", &url]);
        let out = run(add).await;
        assert!(!out.status.success(), "{}", show(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("<hidden>@mirror.lan"),
            "{}",
            show(&out)
        );
        outputs.push(show(&out));
    }

    // Stop the agent (the process this test started), then read its log.
    let stopped = std::process::Command::new("kill")
        .args(["-TERM", &agent_process.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(stopped.success());
    let status = tokio::task::spawn_blocking(move || agent_process.wait().expect("agent waited"))
        .await
        .expect("joined");
    assert!(status.success(), "the agent exits 0 on SIGTERM: {status:?}");
    let log = fs::read_to_string(&log).expect("agent log");
    assert!(
        log.contains("control request failed"),
        "the refusals are logged:\n{log}"
    );

    for text in replies.iter().chain(&outputs).chain([&log]) {
        assert!(!text.contains(URL_PASSWORD), "the password leaked:\n{text}");
        assert!(!text.contains(PASSWORD), "the password leaked:\n{text}");
    }
    assert!(
        RegistryStore::open(&DataRoot::new(&node.data))
            .expect("store")
            .registries()
            .is_empty(),
        "nothing is added"
    );
}

/// Writes `line-1` to `line-1500`, then idles until SIGTERM. One write
/// per line: a pipe's buffered output reaches conmon in blocks that split
/// lines, and Podman 4.3's `tail` then shows a split line as two.
const LOUD: &str = "command: [\"sh\", \"-c\", \"i=1; while [ $i -le 1500 ]; do echo line-$i; i=$((i+1)); done; \
                    trap 'exit 0' TERM; while true; do sleep 1; done\"]\n";

#[tokio::test]
async fn a_logs_reply_over_the_limit_keeps_its_last_whole_lines_and_says_it_was_cut() {
    let mut node = Node::new();
    let id = node.app_running("ctl-logs", LOUD);
    let engine = Engine::connect(&node.env.engine_socket).await.expect("engine");
    let agents_own = Orchestrator::prod(engine, &node.apps, &DataRoot::new(&node.data));
    assert_eq!(
        agents_own.log_reply_limit(),
        MAX_LOG_REPLY_BYTES,
        "an orchestrator as `boot` makes it carries the 16 MiB limit"
    );
    assert_eq!(MAX_LOG_REPLY_BYTES, 16 << 20);
    agents_own.install(&id).await.expect("install");
    let written = common::eventually(Duration::from_secs(20), || async {
        let last = agents_own.logs(&id, Some(1)).await.expect("logs");
        (last.logs == "line-1500\n").then_some(())
    })
    .await;
    assert!(written.is_some(), "the app never wrote its 1500 lines");

    // 4,000 bytes instead of 16 MiB: the same path, without writing 16 MiB.
    const LIMIT: usize = 4000;
    let server = node
        .serve_with(Arc::new(agents_own.with_log_reply_limit(LIMIT)), None)
        .await;
    let mut raw = Raw::connect(&node.sock).await;
    let reply = raw.ok(1, "container-logs", json!({ "app": id })).await;
    assert_eq!(reply["tail"], json!(DEFAULT_LOG_TAIL), "{reply}");
    let logs = reply["logs"].as_str().expect("logs text");
    let cut: LogCut = serde_json::from_value(reply["cut"].clone()).expect("the reply says it was cut");
    assert_eq!(cut.limit_bytes, LIMIT as u64);
    // The default tail, line-501 to line-1500, is 9,501 bytes.
    let tail_bytes: usize = (501..=1500).map(|n| format!("line-{n}\n").len()).sum();
    assert_eq!(cut.dropped_bytes + logs.len() as u64, tail_bytes as u64, "{cut:?}");
    assert!(logs.len() <= LIMIT && logs.len() > LIMIT - 20, "{} bytes", logs.len());
    let lines: Vec<&str> = logs.lines().collect();
    let first: usize = lines[0]
        .strip_prefix("line-")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("starts at a whole line: {:?}", lines[0]));
    let want: Vec<String> = (first..=1500).map(|n| format!("line-{n}")).collect();
    assert_eq!(lines, want, "the last lines, in order, none missing");

    let short = raw.ok(2, "container-logs", json!({ "app": id, "tail": 100 })).await;
    assert!(short.get("cut").is_none(), "100 lines fit: {short}");
    assert_eq!(short["logs"].as_str().map(|l| l.lines().count()), Some(100), "{short}");

    // The CLI through the agent prints the lines and says, apart, that
    // they were cut.
    let mut cli = agent();
    cli.arg("--control").arg(&node.sock).args(["logs", &id]);
    let out = run(cli).await;
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), logs);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("the log of {id} was cut to its last {LIMIT} bytes")),
        "{}",
        show(&out)
    );
    server.shut_down().await;
}
