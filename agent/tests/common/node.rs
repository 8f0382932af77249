//! A throwaway node for integration tests: an apps folder and a data root
//! in a temp folder, manifests written on the fly, and every container the
//! test names removed when it ends, pass or fail.

use std::fs;
use std::path::PathBuf;

use archy_agent::dataroot::DataRoot;
use archy_agent::engine::Engine;
use archy_agent::manifest::Naming;
use archy_agent::orchestrator::{Orchestrator, OrchestratorConfig};

use super::{env, unique_name, TestEnv};

/// A node of our own: an apps folder and a data root in a temp folder.
pub struct Node {
    pub _tmp: tempfile::TempDir,
    pub apps: PathBuf,
    pub data: PathBuf,
    pub env: TestEnv,
    /// Containers to remove when the test ends, pass or fail.
    cleanup: std::sync::Mutex<Vec<String>>,
}

impl Node {
    pub fn new() -> Node {
        let tmp = tempfile::tempdir().expect("tempdir");
        let apps = tmp.path().join("apps");
        let data = tmp.path().join("data");
        fs::create_dir_all(&apps).expect("apps dir");
        fs::create_dir_all(&data).expect("data dir");
        Node {
            _tmp: tmp,
            apps,
            data,
            env: env(),
            cleanup: Default::default(),
        }
    }

    /// Writes `apps/<id>/manifest.yml` from `id`, `image` and extra YAML.
    pub fn app(&self, id: &str, image: &str, extra: &str) {
        let dir = self.apps.join(id);
        fs::create_dir_all(&dir).expect("app dir");
        fs::write(
            dir.join("manifest.yml"),
            format!("id: {id}\nname: {id}\nversion: \"1.0\"\nimage: {image}\nstop_grace_period: 2s\n{extra}"),
        )
        .expect("write manifest");
        let mut cleanup = self.cleanup.lock().unwrap_or_else(|p| p.into_inner());
        cleanup.push(id.to_owned());
        cleanup.push(format!("{id}-archy-backup"));
    }

    /// Removes container `name` when the test ends.
    pub fn cleanup_container(&self, name: &str) {
        self.cleanup
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(name.to_owned());
    }

    pub async fn orchestrator(&self) -> Orchestrator {
        let engine = Engine::connect(&self.env.engine_socket).await.expect("engine");
        Orchestrator::new(
            engine,
            OrchestratorConfig {
                apps_dir: self.apps.clone(),
                data_root: DataRoot::new(&self.data),
                naming: Naming::Prod,
                // No image folder: these tests pull.
                images_dir: self.data.join("no-images"),
            },
        )
    }

    /// The configuration of a `boot` agent on this node, run in the test's
    /// own process: no image folder, no control socket.
    pub fn agent_config(&self, resync: std::time::Duration) -> archy_agent::reconcile::daemon::AgentConfig {
        archy_agent::reconcile::daemon::AgentConfig {
            engine: self.env.engine_socket.clone(),
            apps_dir: self.apps.clone(),
            data_root: DataRoot::new(&self.data),
            images_dir: self.data.join("no-images"),
            naming: Naming::Prod,
            resync,
            control: None,
            // No OS trial unless the test writes this boot.json.
            os_boot_status: self.data.join("os-boot.json"),
        }
    }

    /// The agent's command line on this node: its engine, apps, data root
    /// and a control socket where no agent answers (commands run
    /// in-process), whatever the environment says.
    pub fn agent_cmd(&self) -> std::process::Command {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_archy-agent"));
        cmd.arg("--engine")
            .arg(&self.env.engine_socket)
            .arg("--apps")
            .arg(&self.apps)
            .arg("--data")
            .arg(&self.data)
            .arg("--images")
            .arg(self.data.join("no-images"))
            .arg("--control")
            .arg(self.data.join("agent.sock"))
            .env_remove("ARCHY_CONTROL");
        cmd
    }

    pub fn podman(&self, args: &[&str]) -> String {
        let out = self.env.podman().args(args).output().expect("podman runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for name in self.cleanup.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = self.env.podman().args(["rm", "-f", "-t", "0", name]).output();
        }
    }
}

/// An app id no other test uses (ids are also container names).
pub fn app_id(prefix: &str) -> String {
    unique_name(prefix).replace('_', "-")
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Pushes an image that no other test has (busybox and a marker file) to
/// `registry` and returns it pinned, with its marker.
/// Tests of pulling need their own content: the engine rightly skips a pull
/// when the same digest is already in its store.
pub fn push_unique_image(node: &Node, registry: &str, creds: Option<&str>) -> (String, String) {
    let marker = unique_name("uniq");
    let stage = node._tmp.path().join(&marker);
    fs::create_dir_all(&stage).expect("stage");
    fs::write(stage.join("marker"), &marker).expect("marker");
    fs::create_dir_all(stage.join("bin")).expect("bin");
    fs::copy("/bin/busybox", stage.join("bin/busybox")).expect("busybox-static is installed");
    for applet in ["sh", "sleep"] {
        std::os::unix::fs::symlink("busybox", stage.join("bin").join(applet)).expect("applet");
    }
    let tar = node._tmp.path().join(format!("{marker}.tar"));
    let ok = std::process::Command::new("tar")
        .arg("-C")
        .arg(&stage)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status();
    assert!(ok.expect("tar").success());
    let local = format!("localhost/archy-uniq/{marker}:1");
    node.podman(&["import", tar.to_str().expect("utf8"), &local]);
    let remote = format!("{registry}/archy-uniq/{marker}:1");
    let digest_file = node._tmp.path().join(format!("{marker}.digest"));
    let mut push = node.env.podman();
    push.args(["push", "--tls-verify=false", "--digestfile"])
        .arg(&digest_file);
    if let Some(creds) = creds {
        push.args(["--creds", creds]);
    }
    let pushed = push.args([&local, &remote]).status().expect("push");
    assert!(pushed.success(), "push to {registry}");
    node.podman(&["rmi", "-f", &local]);
    let digest = fs::read_to_string(&digest_file).expect("digest").trim().to_owned();
    (format!("{remote}@{digest}"), marker)
}

/// A shell loop that exits 0 on SIGTERM, so a stop is clean and quick.
pub const SERVE: &str = "command: [\"sh\", \"-c\", \"trap 'exit 0' TERM; while true; do sleep 1; done\"]\n";

/// What a pass decided for `app`.
pub fn decision<'a>(
    report: &'a archy_agent::reconcile::pass::PassReport,
    app: &str,
) -> &'a archy_agent::reconcile::plan::Decision {
    &report
        .apps
        .iter()
        .find(|a| a.app == app)
        .unwrap_or_else(|| panic!("{app} in {report:#?}"))
        .decision
}
