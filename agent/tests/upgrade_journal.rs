//! An upgrade is never left half done: the agent killed at each journaled
//! step of an upgrade, then started again, leaves exactly one container
//! under the app's name, from the old image with the old config files or
//! from the new image with the new ones, and the data folder as it was.
//! Against the real Podman service and registries of `cargo xtask test`,
//! which builds the agent with its fail-points (`failpoints` feature).

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use archy_agent::dataroot::DataRoot;
use archy_agent::orchestrator::journal::{Journal, Step, FAILPOINT_ENV};
use common::node::{app_id, Node, SERVE};
use sha2::{Digest as _, Sha256};

/// The data folder, and the config files' own volume.
const VOLUME: &str = "volumes: [{ source: data, target: /data }, { source: conf, target: /conf }]\n";
const V1_CONF: &str = "release=1\n";
const V2_CONF: &str = "release=2\n";
const V2_EXTRA: &str = "only in release 2\n";

/// v1: one config file. Healthy at once.
fn v1(node: &Node, id: &str) {
    let health = "health:\n  exec: [\"true\"]\n  interval: 1s\n  timeout: 1s\n  retries: 3\n  start_period: 2s\n";
    node.app(
        id,
        &node.env.image.to_string(),
        &format!("{SERVE}{VOLUME}{health}files:\n  - path: conf/app.conf\n    template: \"release=1\\n\"\n"),
    );
}

/// v2: the same file with other bytes and one more file; `health` decides
/// whether it ever passes its gate.
fn v2(node: &Node, id: &str, health: &str) {
    node.app(
        id,
        &node.env.image_v2.to_string(),
        &format!(
            "{SERVE}{VOLUME}{health}files:\n  - path: conf/app.conf\n    template: \"release=2\\n\"\n\
             \x20 - path: conf/extra.conf\n    template: \"only in release 2\\n\"\n"
        ),
    );
}

const V2_HEALTHY: &str =
    "health:\n  exec: [\"true\"]\n  interval: 1s\n  timeout: 1s\n  retries: 3\n  start_period: 2s\n";

/// Every file below `dir` with its content's hash.
fn checksums(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                todo.push(path);
            } else {
                let bytes = fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                let rel = path.strip_prefix(dir).expect("below").display().to_string();
                out.insert(rel, format!("{:x}", Sha256::digest(&bytes)));
            }
        }
    }
    out
}

fn inspect(node: &Node, name: &str, format: &str) -> String {
    node.podman(&["inspect", "--format", format, name]).trim().to_owned()
}

/// The names of every container whose name starts with `id`.
fn containers_of(node: &Node, id: &str) -> Vec<String> {
    let mut names: Vec<String> = node
        .podman(&["ps", "-a", "--format", "{{.Names}}"])
        .lines()
        .filter(|n| n.starts_with(id))
        .map(str::to_owned)
        .collect();
    names.sort();
    names
}

fn release_of(node: &Node, container: &str) -> String {
    node.podman(&["exec", container, "cat", "/etc/archy-test-release"])
        .trim()
        .to_owned()
}

/// The app installed at v1 through the command line, with data in its
/// volume: its container id and the data folder's checksums.
fn installed_v1(node: &Node, id: &str) -> (String, BTreeMap<String, String>) {
    v1(node, id);
    let out = node.agent_cmd().args(["install", id]).output().expect("install runs");
    assert!(
        out.status.success(),
        "install: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    node.podman(&[
        "exec",
        id,
        "sh",
        "-c",
        "echo precious > /data/file && mkdir -p /data/deep && echo more > /data/deep/x",
    ]);
    let data = checksums(&node.data.join(id).join("data"));
    assert_eq!(data.len(), 2, "{data:?}");
    assert_eq!(
        fs::read_to_string(node.data.join(id).join("conf/app.conf")).expect("v1 config"),
        V1_CONF
    );
    (inspect(node, id, "{{.Id}}"), data)
}

/// Starts the agent's command line again (no agent runs: the command
/// works in-process, after finishing or undoing the journaled upgrade),
/// then checks the one container, its image, its files and the data.
fn restart_and_check(node: &Node, id: &str, old_id: &str, data: &BTreeMap<String, String>, expect_new: bool) {
    // A kept new container is in step with its manifest, so a reconcile
    // pass may run first and must change nothing; an old one would be
    // recreated by the pass (drift), so only `list` starts it there.
    let command: &[&str] = if expect_new {
        &["reconcile", "--once"]
    } else {
        &["list"]
    };
    let out = node.agent_cmd().args(command).output().expect("the command runs");
    assert!(
        out.status.success(),
        "{command:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let root = DataRoot::new(&node.data);
    assert_eq!(
        Journal::load(&root, id).expect("journal readable"),
        None,
        "the journal is gone once handled"
    );
    assert_eq!(
        containers_of(node, id),
        [id.to_owned()],
        "exactly one container, under the app's name"
    );
    assert_eq!(inspect(node, id, "{{.State.Status}}"), "running");
    let app = node.data.join(id);
    let conf = fs::read_to_string(app.join("conf/app.conf")).expect("config file");
    let kept: Vec<_> = fs::read_dir(app.join("conf"))
        .expect("conf folder")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".pre-upgrade"))
        .collect();
    assert!(kept.is_empty(), "no kept file left: {kept:?}");
    if expect_new {
        assert_ne!(inspect(node, id, "{{.Id}}"), old_id, "the new container stays");
        assert_eq!(release_of(node, id), "v2");
        assert_eq!(conf, V2_CONF);
        assert_eq!(
            fs::read_to_string(app.join("conf/extra.conf")).expect("extra"),
            V2_EXTRA
        );
    } else {
        assert_eq!(
            inspect(node, id, "{{.Id}}"),
            old_id,
            "the old container is back under its name"
        );
        assert_eq!(release_of(node, id), "v1");
        assert_eq!(conf, V1_CONF, "the old config file's bytes are back");
        assert!(!app.join("conf/extra.conf").exists(), "the new version's file is gone");
    }
    assert_eq!(&checksums(&app.join("data")), data, "the data folder is unchanged");
}

/// The upgrade through the command line, killed by the fail-point right
/// after journaling `step`; then started again.
fn killed_at(step: Step) {
    let node = Node::new();
    let id = app_id(&format!("jrn-{}", step.name()));
    let (old_id, data) = installed_v1(&node, &id);
    v2(&node, &id, V2_HEALTHY);
    let out = node
        .agent_cmd()
        .args(["upgrade", &id])
        .env(FAILPOINT_ENV, format!("upgrade:{}", step.name()))
        .output()
        .expect("upgrade runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code().is_none(),
        "the agent must die at the fail-point upgrade:{} (built with the `failpoints` feature, as \
         `cargo xtask test` does?); it exited with {:?}: {stderr}",
        step.name(),
        out.status
    );
    assert!(stderr.contains(&format!("upgrade:{} reached", step.name())), "{stderr}");
    let journal = Journal::load(&DataRoot::new(&node.data), &id)
        .expect("journal readable")
        .expect("the interrupted upgrade is journaled");
    assert_eq!(journal.steps.last(), Some(&step), "{journal:?}");
    restart_and_check(&node, &id, &old_id, &data, step == Step::Commit);
}

#[test]
fn killed_at_begin_the_old_container_runs_with_its_files() {
    killed_at(Step::Begin);
}

#[test]
fn killed_at_stop_the_old_container_runs_with_its_files() {
    killed_at(Step::Stop);
}

#[test]
fn killed_at_rename_the_old_container_runs_with_its_files() {
    killed_at(Step::Rename);
}

#[test]
fn killed_at_render_the_old_container_runs_with_its_files() {
    killed_at(Step::Render);
}

#[test]
fn killed_at_create_the_old_container_runs_with_its_files() {
    killed_at(Step::Create);
}

#[test]
fn killed_at_start_the_old_container_runs_with_its_files() {
    killed_at(Step::Start);
}

#[test]
fn killed_at_health_the_old_container_runs_with_its_files() {
    killed_at(Step::Health);
}

#[test]
fn killed_at_commit_the_new_container_stays_with_its_files() {
    killed_at(Step::Commit);
}

/// Every journaled step has its test above.
#[test]
fn every_step_is_tested() {
    let src = include_str!("upgrade_journal.rs");
    for step in Step::ALL {
        let call = format!("killed_at(Step::{step:?});");
        assert!(src.contains(&call), "no test for step {}", step.name());
    }
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Without any fail-point: the command is killed (SIGKILL) while its new
/// container waits for a health gate it never passes. The next start puts
/// the old container and its files back. Before the journal, the backup
/// stayed beside a new container that never passed its health check.
#[test]
fn killed_while_the_new_container_waits_for_health_the_old_one_comes_back() {
    let node = Node::new();
    let id = app_id("jrn-kill");
    let (old_id, data) = installed_v1(&node, &id);
    let never = "health:\n  exec: [\"false\"]\n  interval: 1s\n  timeout: 1s\n  retries: 3\n  start_period: 120s\n";
    v2(&node, &id, never);
    let mut upgrade = node
        .agent_cmd()
        .args(["upgrade", &id])
        .env_remove(FAILPOINT_ENV)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("upgrade starts");
    // Waiting for health: the backup exists and the new container runs v2.
    let backup = format!("{id}-archy-backup");
    let started = Instant::now();
    loop {
        let names = containers_of(&node, &id);
        if names.contains(&backup)
            && names.contains(&id)
            && inspect(&node, &id, "{{.State.Status}}") == "running"
            && inspect(&node, &id, "{{.Id}}") != old_id
        {
            break;
        }
        if let Ok(Some(status)) = upgrade.try_wait() {
            panic!("the upgrade ended before its health wait: {status}");
        }
        if started.elapsed() > Duration::from_secs(90) {
            kill(&mut upgrade);
            panic!("the new container never started: {names:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(release_of(&node, &id), "v2", "the new one runs, unverified");
    kill(&mut upgrade);
    restart_and_check(&node, &id, &old_id, &data, false);
}
