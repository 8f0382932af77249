//! Reconcile passes and the agent loop against the real Podman service.

mod common;

use std::fs;
use std::sync::Arc;
use std::time::{Duration, Instant};

use archy_agent::orchestrator::{AppState, ContainerOrchestrator, OrchestratorError, PRE_ARCHIPELAGO};
use archy_agent::reconcile::daemon::{self, AgentConfig};
use archy_agent::reconcile::pass::Reconciler;
use archy_agent::reconcile::plan::{Action, Decision, Wait};
use common::node::{app_id, decision, Node, SERVE};

fn started_at(node: &Node, container: &str) -> String {
    node.podman(&["inspect", "--format", "{{.State.StartedAt}}", container])
        .trim()
        .to_owned()
}

fn container_id(node: &Node, container: &str) -> String {
    node.podman(&["inspect", "--format", "{{.Id}}", container])
        .trim()
        .to_owned()
}

#[tokio::test]
async fn a_container_made_with_the_podman_cli_is_adopted_untouched() {
    let node = Node::new();
    let id = app_id("adopt");
    let image = node.env.image.to_string();
    node.app(&id, &image, SERVE);
    // An older install made it by hand: no labels, the pinned image.
    node.podman(&["pull", "--tls-verify=false", &node.env.image.by_digest()]);
    // The manifest's command too: nothing differs.
    node.podman(&[
        "run",
        "-d",
        "--name",
        &id,
        &node.env.image.by_digest(),
        "sh",
        "-c",
        SERVE_SCRIPT,
    ]);
    let before = (container_id(&node, &id), started_at(&node, &id));
    assert!(!before.0.is_empty(), "the hand-made container runs");

    let orch = Arc::new(node.orchestrator().await);
    let mut reconciler = Reconciler::new(orch.clone());
    let first = reconciler.pass().await;
    assert_eq!(
        decision(&first, &id),
        &Decision::Act(Action::Adopt {
            container_id: before.0.clone()
        })
    );
    let second = reconciler.pass().await;
    assert_eq!(
        decision(&second, &id),
        &Decision::Wait(Wait::Ok),
        "claimed once, then left alone"
    );
    assert_eq!(
        (container_id(&node, &id), started_at(&node, &id)),
        before,
        "same container, never restarted"
    );
    let state = fs::read_to_string(node.data.join("state/agent.json")).expect("state saved");
    assert!(state.contains(&before.0), "the adoption is recorded: {state}");
}

/// `SERVE`'s script, for containers made by hand with the podman CLI.
const SERVE_SCRIPT: &str = "trap 'exit 0' TERM; while true; do sleep 1; done";

/// What the owner of a migrated node wrote by hand.
const HAND_WRITTEN: &str = "# my own settings\nrpcallowip=0.0.0.0/0\n";

/// A migrated node: the app `id` (its manifest renders `data/app.conf`,
/// plus `extra`) runs in a container made by hand with another image,
/// another env and the owner's own `data/app.conf`. Returns the config
/// file's path and the container's ID and start time.
fn hand_made_differing(node: &Node, id: &str, extra: &str) -> (std::path::PathBuf, (String, String)) {
    node.app(
        id,
        &node.env.image.to_string(),
        &format!(
            "{SERVE}volumes: [{{ source: data, target: /data }}]\nenv: {{ GREETING: from-manifest }}\n\
             files:\n  - path: data/app.conf\n    template: \"rendered for {{{{ facts.container }}}}\\n\"\n{extra}"
        ),
    );
    let conf = node.data.join(id).join("data/app.conf");
    fs::create_dir_all(conf.parent().expect("folder")).expect("data folder");
    fs::write(&conf, HAND_WRITTEN).expect("hand-written config");
    // Both images in the store: the pinned one is what the hand-made one is compared with.
    node.podman(&["pull", "--tls-verify=false", &node.env.image.by_digest()]);
    node.podman(&["pull", "--tls-verify=false", &node.env.image_v2.by_digest()]);
    let volume = format!("{}:/data", conf.parent().expect("folder").display());
    node.podman(&[
        "run",
        "-d",
        "--name",
        id,
        "-e",
        "GREETING=by-hand",
        "-v",
        &volume,
        &node.env.image_v2.by_digest(),
        "sh",
        "-c",
        SERVE_SCRIPT,
    ]);
    let before = (container_id(node, id), started_at(node, id));
    assert!(!before.0.is_empty(), "the hand-made container runs");
    (conf, before)
}

/// The hand-made container `container` runs under the app's name, and
/// no backup is left.
fn runs_again(node: &Node, id: &str, container: &str) {
    assert_eq!(container_id(node, id), container, "the hand-made container");
    assert_eq!(
        node.podman(&["inspect", "--format", "{{.State.Status}}", id]).trim(),
        "running"
    );
    let names = node.podman(&["ps", "-a", "--format", "{{.Names}}"]);
    assert!(!names.contains(&format!("{id}-archy-backup")), "{names}");
}

#[tokio::test]
async fn an_adopted_container_that_differs_is_left_running_until_upgrade_converts_it() {
    let node = Node::new();
    let id = app_id("adrift");
    let (conf, before) = hand_made_differing(&node, &id, "");

    let orch = Arc::new(node.orchestrator().await);
    let mut reconciler = Reconciler::new(orch.clone());
    for pass in 1..=3 {
        let report = reconciler.pass().await;
        let d = decision(&report, &id);
        if pass == 1 {
            assert_eq!(
                d,
                &Decision::Act(Action::Adopt {
                    container_id: before.0.clone()
                })
            );
        } else {
            let Decision::Wait(Wait::Drift { differences }) = d else {
                panic!("pass {pass}: drift is reported, not acted on: {d:?}");
            };
            let text = differences.join("; ");
            assert!(
                text.contains("image: runs") && text.contains("env: GREETING"),
                "pass {pass}: says what differs: {text}"
            );
            assert!(!text.contains("by-hand"), "never an env value: {text}");
        }
        assert_eq!(
            (container_id(&node, &id), started_at(&node, &id)),
            before,
            "pass {pass}: the same container, never restarted"
        );
        assert_eq!(
            node.podman(&["inspect", "--format", "{{.State.Status}}", &id]).trim(),
            "running",
            "pass {pass}"
        );
        assert_eq!(
            fs::read_to_string(&conf).expect("config"),
            HAND_WRITTEN,
            "pass {pass}: the owner's config file keeps its bytes"
        );
    }
    let status = orch.status(&id).await.expect("status");
    assert!(
        status.drifted && !status.managed && status.differences.iter().any(|d| d.starts_with("env: GREETING")),
        "status says what differs: {status:?}"
    );
    // `list` on the command line says it too.
    let out = agent_cmd(&node).args(["list", "--json"]).output().expect("list runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json list");
    let listed = list
        .as_array()
        .and_then(|a| a.iter().find(|s| s["app"] == id.as_str()))
        .unwrap_or_else(|| panic!("{id} in {list}"));
    assert_eq!(listed["drifted"], true, "{listed}");
    assert!(listed["differences"].to_string().contains("image: runs"), "{listed}");
    let out = agent_cmd(&node).args(["status", &id]).output().expect("status runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "{id}: adopted, left as it is; differs from its manifest (image: runs"
        )) && text.contains(&format!("`archy-agent upgrade {id}` converts it")),
        "{text}"
    );

    // The owner converts it: recreated from the manifest, the own file kept beside.
    let report = orch.upgrade(&id).await.expect("upgrade converts");
    assert!(report.replaced, "{report:?}");
    assert_eq!(report.kept_aside, ["data/app.conf.pre-archipelago"]);
    let after = container_id(&node, &id);
    assert_ne!(after, before.0, "recreated");
    let inspect = |format: &str| node.podman(&["inspect", "--format", format, &id]).trim().to_owned();
    assert_eq!(
        inspect("{{index .Config.Labels \"io.archipelago.managed-by\"}}"),
        "archy-agent"
    );
    assert!(
        inspect("{{.Config.Env}}").contains("GREETING=from-manifest"),
        "{}",
        inspect("{{.Config.Env}}")
    );
    let pinned = node.podman(&["image", "inspect", "--format", "{{.Id}}", &node.env.image.by_digest()]);
    assert_eq!(inspect("{{.Image}}"), pinned.trim(), "runs the pinned image");
    assert_eq!(
        fs::read_to_string(&conf).expect("rendered"),
        format!("rendered for {id}\n")
    );
    let aside = conf.with_file_name("app.conf.pre-archipelago");
    assert_eq!(fs::read_to_string(&aside).expect("kept aside"), HAND_WRITTEN);
    let report = reconciler.pass().await;
    assert_eq!(decision(&report, &id), &Decision::Wait(Wait::Ok), "converted: in step");
    assert_eq!(container_id(&node, &id), after);
}

#[tokio::test]
async fn a_conversion_that_fails_its_health_gate_restores_the_hand_made_container_and_its_file() {
    let node = Node::new();
    let id = app_id("adfail");
    let never_healthy =
        "health:\n  exec: [\"false\"]\n  interval: 1s\n  timeout: 1s\n  retries: 2\n  start_period: 1s\n";
    let (conf, before) = hand_made_differing(&node, &id, never_healthy);
    let orch = Arc::new(node.orchestrator().await);
    let mut reconciler = Reconciler::new(orch.clone());
    let report = reconciler.pass().await;
    assert!(
        matches!(decision(&report, &id), Decision::Act(Action::Adopt { .. })),
        "{report:#?}"
    );

    match orch.upgrade(&id).await {
        Err(OrchestratorError::UpgradeFailed {
            rolled_back, reason, ..
        }) => {
            assert!(rolled_back, "{reason}");
            assert!(reason.contains("not healthy"), "{reason}");
        }
        other => panic!("expected UpgradeFailed, got {other:?}"),
    }
    // Started again by the rollback, the very same container.
    runs_again(&node, &id, &before.0);
    assert!(
        node.podman(&["inspect", "--format", "{{.Config.Env}}", &id])
            .contains("GREETING=by-hand"),
        "its own env"
    );
    assert_eq!(
        fs::read_to_string(&conf).expect("config"),
        HAND_WRITTEN,
        "the owner's file is back at its path with its bytes"
    );
    let folder: Vec<_> = fs::read_dir(conf.parent().expect("folder"))
        .expect("data folder")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(folder, ["app.conf"], "no .pre-archipelago left behind");
    let report = reconciler.pass().await;
    assert!(
        matches!(decision(&report, &id), Decision::Wait(Wait::Drift { .. })),
        "still adopted and left as it is: {report:#?}"
    );
    assert_eq!(container_id(&node, &id), before.0);
}

#[tokio::test]
async fn a_conversion_never_overwrites_an_earlier_pre_archipelago_file() {
    let node = Node::new();
    let id = app_id("adkeep");
    let (conf, before) = hand_made_differing(&node, &id, "");
    // Kept by an earlier conversion.
    let aside = conf.with_file_name(format!("app.conf{PRE_ARCHIPELAGO}"));
    let earlier = "# kept by an earlier conversion\n";
    fs::write(&aside, earlier).expect("earlier copy");
    let orch = Arc::new(node.orchestrator().await);
    let mut reconciler = Reconciler::new(orch.clone());
    reconciler.pass().await;

    let err = orch.upgrade(&id).await.expect_err("the conversion is refused");
    let text = archy_agent::error_chain(&err);
    assert!(
        text.contains(&aside.display().to_string()) && text.contains("never replaced"),
        "names the file: {text}"
    );
    runs_again(&node, &id, &before.0);
    assert_eq!(started_at(&node, &id), before.1, "never stopped");
    assert_eq!(fs::read_to_string(&conf).expect("config"), HAND_WRITTEN);
    assert_eq!(fs::read_to_string(&aside).expect("earlier copy"), earlier);
    let report = reconciler.pass().await;
    assert!(
        matches!(decision(&report, &id), Decision::Wait(Wait::Drift { .. })),
        "{report:#?}"
    );
}

#[tokio::test]
async fn passes_install_missing_start_exited_recreate_drifted_and_leave_held_apps() {
    let node = Node::new();
    let image = node.env.image.to_string();
    let (missing, exited, drifted, held) = (app_id("miss"), app_id("exit"), app_id("drift"), app_id("held"));
    for app in [&missing, &exited, &drifted, &held] {
        node.app(
            app,
            &image,
            &format!("{SERVE}volumes: [{{ source: data, target: /data }}]\n"),
        );
    }
    let orch = Arc::new(node.orchestrator().await);
    for app in [&exited, &drifted, &held] {
        orch.install(app).await.expect("install");
    }
    node.podman(&["stop", "-t", "1", &exited]);
    orch.stop(&held).await.expect("owner stops it");
    node.podman(&["exec", &drifted, "sh", "-c", "echo kept > /data/file"]);
    // The manifest changes under a running container: drift.
    node.app(
        &drifted,
        &image,
        &format!("{SERVE}volumes: [{{ source: data, target: /data }}]\nenv: {{ NEW: \"1\" }}\n"),
    );
    let unmanaged = app_id("stranger");
    node.cleanup_container(&unmanaged);
    node.podman(&[
        "run",
        "-d",
        "--name",
        &unmanaged,
        &node.env.image.by_digest(),
        "sleep",
        "300",
    ]);

    let mut reconciler = Reconciler::new(orch.clone());
    reconciler.reload();
    let report = reconciler.pass().await;
    assert_eq!(decision(&report, &missing), &Decision::Act(Action::Install));
    assert_eq!(decision(&report, &exited), &Decision::Act(Action::Start));
    assert!(
        matches!(decision(&report, &drifted), Decision::Act(Action::Recreate { .. })),
        "{report:#?}"
    );
    assert_eq!(decision(&report, &held), &Decision::Wait(Wait::Held));
    assert!(report.unmatched.contains(&unmanaged), "{:?}", report.unmatched);
    assert!(report.apps.iter().all(|a| a.error.is_none()), "{report:#?}");

    for app in [&missing, &exited, &drifted] {
        assert_eq!(
            orch.status(app).await.expect("status").state,
            AppState::Running,
            "{app}"
        );
    }
    assert_eq!(orch.status(&held).await.expect("status").state, AppState::Stopped);
    assert_eq!(
        node.podman(&["exec", &drifted, "cat", "/data/file"]).trim(),
        "kept",
        "data survives the recreate"
    );
    assert_eq!(node.podman(&["exec", &drifted, "sh", "-c", "echo $NEW"]).trim(), "1");
    assert!(!node.podman(&["ps", "--format", "{{.Names}}"]).trim().is_empty());
    // The stranger is left alone.
    assert_eq!(
        node.podman(&["inspect", "--format", "{{.State.Status}}", &unmanaged])
            .trim(),
        "running"
    );

    let quiet = reconciler.pass().await;
    assert!(quiet.is_quiet(), "{quiet:#?}");
}

#[tokio::test]
async fn one_broken_app_never_blocks_the_others_and_its_dependants_wait() {
    let node = Node::new();
    let image = node.env.image.to_string();
    let broken = app_id("broken");
    let dependant = app_id("needs");
    let fine = app_id("fine");
    // Pinned to a digest no registry has.
    let missing = node
        .env
        .image
        .to_string()
        .rsplit_once('@')
        .map(|(name, _)| format!("{name}@sha256:{}", "0".repeat(64)))
        .expect("pinned");
    node.app(&broken, &missing, SERVE);
    node.app(&dependant, &image, &format!("{SERVE}depends_on: [{broken}]\n"));
    node.app(&fine, &image, SERVE);
    let orch = Arc::new(node.orchestrator().await);
    let mut reconciler = Reconciler::new(orch.clone());
    let report = reconciler.pass().await;
    let b = report.apps.iter().find(|a| a.app == broken).expect("broken");
    assert!(
        b.error
            .as_deref()
            .is_some_and(|e| e.contains("no registry could provide")),
        "{b:?}"
    );
    assert_eq!(
        decision(&report, &dependant),
        &Decision::Wait(Wait::Dependency {
            app: broken.clone(),
            state: "missing".to_owned()
        })
    );
    assert_eq!(orch.status(&fine).await.expect("status").state, AppState::Running);
    // The failed install backs off instead of retrying at once.
    let again = reconciler.pass().await;
    assert!(
        matches!(decision(&again, &broken), Decision::Wait(Wait::Backoff { .. })),
        "{again:#?}"
    );
}

#[tokio::test]
async fn a_corrupt_state_file_is_moved_aside_and_the_pass_still_runs() {
    let node = Node::new();
    let id = app_id("corrupt");
    node.app(&id, &node.env.image.to_string(), SERVE);
    fs::create_dir_all(node.data.join("state")).expect("state dir");
    fs::write(node.data.join("state/agent.json"), b"\x00garbage").expect("corrupt");
    let orch = Arc::new(node.orchestrator().await);
    let mut reconciler = Reconciler::new(orch.clone());
    let report = reconciler.pass().await;
    assert_eq!(decision(&report, &id), &Decision::Act(Action::Install));
    let names: Vec<String> = fs::read_dir(node.data.join("state"))
        .expect("ls")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().any(|n| n.starts_with("agent.json.corrupt-")), "{names:?}");
    assert!(names.iter().any(|n| n == "agent.json"), "rebuilt: {names:?}");
}

#[tokio::test]
async fn the_agent_restarts_a_killed_app_from_events_not_the_resync() {
    let node = Node::new();
    let id = app_id("evented");
    node.app(&id, &node.env.image.to_string(), SERVE);
    // Far beyond the test: only events can explain a quick restart.
    let config = node.agent_config(Duration::from_secs(3600));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (_req_tx, req_rx) = tokio::sync::mpsc::channel(1);
    let agent = tokio::spawn(daemon::run(config, req_rx, async move {
        let _ = stop_rx.await;
    }));
    let deadline = Instant::now() + Duration::from_secs(60);
    while node.podman(&["inspect", "--format", "{{.State.Status}}", &id]).trim() != "running" {
        assert!(Instant::now() < deadline, "the first pass never installed {id}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let first_start = started_at(&node, &id);
    node.podman(&["kill", &id]);
    let killed = Instant::now();
    loop {
        let now_started = started_at(&node, &id);
        let running = node.podman(&["inspect", "--format", "{{.State.Status}}", &id]).trim() == "running";
        if running && now_started != first_start {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(20),
            "the agent did not restart {id} after a kill"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("killed -> running again in {:?}", killed.elapsed());
    let _ = stop_tx.send(());
    agent.await.expect("agent task").expect("agent exits cleanly");
    // Stopping the agent never stops an app.
    assert_eq!(
        node.podman(&["inspect", "--format", "{{.State.Status}}", &id]).trim(),
        "running"
    );
}

fn agent_cmd(node: &Node) -> std::process::Command {
    node.agent_cmd()
}

#[tokio::test]
async fn adopt_dry_run_touches_nothing_and_boot_exits_on_sigterm_leaving_apps_running() {
    let node = Node::new();
    let id = app_id("cliadopt");
    node.app(&id, &node.env.image.to_string(), SERVE);
    node.podman(&["pull", "--tls-verify=false", &node.env.image.by_digest()]);
    node.podman(&["run", "-d", "--name", &id, &node.env.image.by_digest(), "sleep", "300"]);
    let before = (container_id(&node, &id), started_at(&node, &id));

    let out = agent_cmd(&node)
        .args(["adopt", "--dry-run", "--json"])
        .output()
        .expect("adopt runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json report");
    assert_eq!(report["apps"][0]["app"], id.as_str());
    assert_eq!(report["apps"][0]["decision"]["act"]["action"], "adopt");
    assert!(
        !node.data.join("state/agent.json").exists(),
        "a dry run writes no state"
    );

    let out = agent_cmd(&node)
        .args(["reconcile", "--once"])
        .output()
        .expect("reconcile runs");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && table.contains(&format!("adopt {}", &before.0[..12])),
        "{table}"
    );

    let mut boot = agent_cmd(&node)
        .arg("boot")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("boot starts");
    let socket = node.data.join("agent.sock");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "boot never served its control socket");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The CLI goes through the running agent's socket.
    let status = agent_cmd(&node)
        .args(["status", &id, "--json"])
        .output()
        .expect("status runs");
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    // Made with `sleep 300`, not the manifest's command: drift, said over the socket.
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).expect("json status");
    assert_eq!(status["drifted"], true, "{status}");
    assert!(
        status["differences"]
            .to_string()
            .contains("command: [\\\"sleep\\\", \\\"300\\\"]"),
        "{status}"
    );
    let pid = boot.id().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = boot.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "boot did not exit on SIGTERM");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "boot exits 0 on SIGTERM: {status:?}");
    assert!(!socket.exists(), "the control socket is removed on shutdown");
    assert_eq!(
        (container_id(&node, &id), started_at(&node, &id)),
        before,
        "adopted, never restarted, still there"
    );
    assert_eq!(
        node.podman(&["inspect", "--format", "{{.State.Status}}", &id]).trim(),
        "running"
    );
}

/// A stand-in for the engine's socket that can go away and come back, as
/// the socket does when Podman restarts.
struct FlakySocket {
    path: std::path::PathBuf,
    task: Option<tokio::task::JoinHandle<()>>,
    upstream: std::path::PathBuf,
}

impl FlakySocket {
    fn new(path: std::path::PathBuf, upstream: std::path::PathBuf) -> FlakySocket {
        let mut s = FlakySocket {
            path,
            task: None,
            upstream,
        };
        s.up();
        s
    }

    /// Serves: every connection is piped to the real engine.
    fn up(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let listener = tokio::net::UnixListener::bind(&self.path).expect("bind proxy");
        let upstream = self.upstream.clone();
        self.task = Some(tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                conns.spawn(async move {
                    if let Ok(mut server) = tokio::net::UnixStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        }));
    }

    /// Goes away: the socket file and every open connection.
    fn down(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

#[tokio::test]
async fn the_agent_survives_the_engine_going_away_and_converges_when_it_returns() {
    let node = Node::new();
    let id = app_id("enginerestart");
    node.app(&id, &node.env.image.to_string(), SERVE);
    let socket = node.data.join("engine.sock");
    let mut flaky = FlakySocket::new(socket.clone(), node.env.engine_socket.clone());
    let config = AgentConfig {
        engine: socket,
        ..node.agent_config(Duration::from_secs(2))
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (_req_tx, req_rx) = tokio::sync::mpsc::channel(1);
    let agent = tokio::spawn(daemon::run(config, req_rx, async move {
        let _ = stop_rx.await;
    }));
    let running = |node: &Node| node.podman(&["inspect", "--format", "{{.State.Status}}", &id]).trim() == "running";
    let deadline = Instant::now() + Duration::from_secs(60);
    while !running(&node) {
        assert!(Instant::now() < deadline, "never installed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The engine goes away; meanwhile the app dies.
    flaky.down();
    node.podman(&["stop", "-t", "1", &id]);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!agent.is_finished(), "the agent must survive the engine's absence");
    // The engine comes back: the agent notices and converges.
    flaky.up();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !running(&node) {
        assert!(
            Instant::now() < deadline,
            "the agent did not converge after the engine came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = stop_tx.send(());
    agent.await.expect("agent task").expect("agent exits cleanly");
}

#[tokio::test]
async fn kill_9_during_an_install_leaves_nothing_the_next_pass_cannot_converge_from() {
    let node = Node::new();
    let id = app_id("killnine");
    // A fresh image, so the install really pulls and takes a moment.
    let (image, _) = common::node::push_unique_image(&node, &node.env.registry, None);
    node.app(
        &id,
        &image,
        &format!(
            "{SERVE}volumes: [{{ source: data, target: /data }}]\nsecrets: [{{ name: k9-secret, kind: hex16 }}]\n"
        ),
    );
    for delay_ms in [50u64, 300, 800] {
        let mut child = agent_cmd(&node)
            .args(["reconcile", "--once"])
            .spawn()
            .expect("reconcile starts");
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
    }
    let secret = node.data.join("secrets/k9-secret");
    let secret_before = fs::read_to_string(&secret).ok();
    let out = agent_cmd(&node)
        .args(["reconcile", "--once"])
        .output()
        .expect("reconcile runs");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        node.podman(&["inspect", "--format", "{{.State.Status}}", &id]).trim(),
        "running"
    );
    let names = node.podman(&["ps", "-a", "--format", "{{.Names}}"]);
    assert_eq!(
        names.lines().filter(|n| n.starts_with(&id)).count(),
        1,
        "one container, no leftovers: {names}"
    );
    if let Some(before) = secret_before {
        assert_eq!(
            fs::read_to_string(&secret).expect("secret"),
            before,
            "a secret is never regenerated"
        );
    }
    let again = agent_cmd(&node)
        .args(["reconcile", "--once", "--json"])
        .output()
        .expect("reconcile runs");
    let report: serde_json::Value = serde_json::from_slice(&again.stdout).expect("json");
    assert_eq!(report["apps"][0]["decision"]["wait"]["reason"], "ok", "{report}");
}

/// Reads one datagram from the notify socket, as systemd would.
fn next_notification(socket: &std::os::unix::net::UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).expect("a notification before the timeout");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test]
async fn boot_tells_systemd_ready_after_the_first_pass_then_pings_the_watchdog_and_says_stopping() {
    let node = Node::new();
    let id = app_id("notify");
    node.app(&id, &node.env.image.to_string(), SERVE);
    let notify_path = node.data.join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&notify_path).expect("bind notify socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(120)))
        .expect("timeout");

    let boot = agent_cmd(&node)
        .arg("boot")
        .env("NOTIFY_SOCKET", &notify_path)
        // One second: pings come every half period.
        .env("WATCHDOG_USEC", "1000000")
        .env_remove("WATCHDOG_PID")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("boot starts");

    // Pings start at once; READY only when the first pass has installed the app.
    let ready_at = loop {
        let message = next_notification(&socket);
        if message.lines().any(|l| l == "READY=1") {
            break Instant::now();
        }
        assert_eq!(message.trim(), "WATCHDOG=1", "only pings before READY");
    };
    assert_eq!(
        node.podman(&["inspect", "--format", "{{.State.Status}}", &id]).trim(),
        "running",
        "READY came before the first pass had started the app"
    );
    let mut pings = 0;
    while pings < 3 {
        let message = next_notification(&socket);
        assert_eq!(message.trim(), "WATCHDOG=1");
        pings += 1;
    }
    assert!(
        ready_at.elapsed() < Duration::from_secs(5),
        "three pings at a 1 s watchdog took {:?}",
        ready_at.elapsed()
    );

    let killed = std::process::Command::new("kill")
        .args(["-TERM", &boot.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let stopping = loop {
        let message = next_notification(&socket);
        if message.trim() != "WATCHDOG=1" {
            break message;
        }
    };
    assert_eq!(stopping.trim(), "STOPPING=1");
    let output = boot.wait_with_output().expect("boot exits");
    assert!(output.status.success(), "{:?}", output.status);
    // The console summary: one line per app, then the time to all healthy.
    let console = String::from_utf8_lossy(&output.stderr);
    assert!(
        console
            .lines()
            .any(|l| l.starts_with(&format!("archipelago: app {id}")) && l.contains("running")),
        "{console}"
    );
    assert!(
        console
            .lines()
            .any(|l| l.starts_with("archipelago: all 1 apps healthy") && l.ends_with("s after kernel start")),
        "{console}"
    );
}
