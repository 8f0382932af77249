//! The node's mode, tested: `archy-agent` run as the unprivileged user of
//! the rootless Podman service that `cargo xtask test` starts, against that
//! service, as the node runs it (`archipelago` against its own Podman).
//!
//! The agent decides rootful or rootless from the ids it runs as
//! (`Ownership::current`), and then needs the user's `/etc/subuid` range
//! and `podman unshare` as that user. So the tests run as root but spawn
//! the agent's CLI as that user (`runuser`), with `--engine`, `--apps` and
//! `--data` in a folder the user owns: the same binary and code paths as on
//! the node, with nothing faked.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::confine::{snapshot, swapper};
use common::{env, rootless_env, unique_name, RootlessEnv};

/// Copies the config the process saw when it started to /data/seen, then
/// waits for SIGTERM.
const READS_CONFIG_AT_START: &str = "command: [\"sh\", \"-c\", \"cat /data/app.conf > /data/seen; \
                                     trap 'exit 0' TERM; while true; do sleep 1; done\"]\n";

/// The container's uid and gid in every manifest here.
const APP_UID: u32 = 1000;

/// A node of the rootless user: apps folder, data root and a copy of the
/// agent's binary in a folder it owns (the build's target folder need not
/// be open to it). Containers named are removed when dropped.
struct Node {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    apps: PathBuf,
    data: PathBuf,
    agent: PathBuf,
    image: String,
    rl: RootlessEnv,
    containers: Vec<String>,
}

impl Node {
    fn new() -> Node {
        let rl = rootless_env();
        let image = env().image.to_string();
        let tmp = tempfile::tempdir_in(&rl.work).expect("tempdir in the rootless work folder");
        let root = tmp.path().to_path_buf();
        let (apps, data, bin) = (root.join("apps"), root.join("data"), root.join("bin"));
        for dir in [&apps, &data, &bin] {
            fs::create_dir_all(dir).expect("node folder");
        }
        let agent = bin.join("archy-agent");
        fs::copy(env!("CARGO_BIN_EXE_archy-agent"), &agent).expect("copy the agent binary");
        fs::set_permissions(&agent, fs::Permissions::from_mode(0o755)).expect("chmod agent");
        let node = Node {
            _tmp: tmp,
            root,
            apps,
            data,
            agent,
            image,
            rl,
            containers: Vec::new(),
        };
        node.give_to_user(&node.root);
        node
    }

    /// Hands `path` and everything below it to the rootless user.
    fn give_to_user(&self, path: &Path) {
        let out = Command::new("chown")
            .arg("-R")
            .arg(format!("{}:{}", self.rl.uid, self.rl.gid))
            .arg(path)
            .output()
            .expect("chown runs");
        assert!(out.status.success(), "chown {}: {out:?}", path.display());
    }

    /// Writes `apps/<id>/manifest.yml` (the test image, 2 s grace, `extra`).
    fn app(&mut self, id: &str, extra: &str) {
        let dir = self.apps.join(id);
        fs::create_dir_all(&dir).expect("app dir");
        fs::write(
            dir.join("manifest.yml"),
            format!(
                "id: {id}\nname: {id}\nversion: \"1.0\"\nimage: {}\nstop_grace_period: 2s\n{extra}",
                self.image
            ),
        )
        .expect("write manifest");
        self.give_to_user(&dir);
        self.containers.push(id.to_owned());
        self.containers.push(format!("{id}-archy-backup"));
    }

    /// `archy-agent --engine … --apps … --data … ARGS` as the rootless user.
    fn run(&self, args: &[&str]) -> Run {
        let mut cmd = self.rl.as_user(&self.root, &self.agent);
        cmd.arg("--engine")
            .arg(&self.rl.engine_socket)
            .arg("--apps")
            .arg(&self.apps)
            .arg("--data")
            .arg(&self.data)
            .args(args);
        let out = cmd.output().expect("the agent runs");
        Run {
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            out,
            args: args.join(" "),
        }
    }

    /// The rootless podman CLI's stdout; panics when it fails.
    fn podman(&self, args: &[&str]) -> String {
        let out = self.rl.podman().args(args).output().expect("podman runs");
        assert!(out.status.success(), "podman {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// (container id, StartedAt) as the rootless podman CLI sees them.
    fn run_of(&self, container: &str) -> (String, String) {
        let out = self.podman(&["inspect", "--format", "{{.Id}} {{.State.StartedAt}}", container]);
        let (id, started) = out
            .trim()
            .split_once(' ')
            .unwrap_or_else(|| panic!("inspect {container}: {out:?}"));
        (id.to_owned(), started.to_owned())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.containers.is_empty() {
            return;
        }
        let _ = self
            .rl
            .podman()
            .args(["rm", "--force", "--ignore", "--time", "0"])
            .args(&self.containers)
            .output();
    }
}

struct Run {
    out: Output,
    stdout: String,
    stderr: String,
    args: String,
}

impl Run {
    fn ok(&self) -> &Run {
        assert!(
            self.out.status.success(),
            "archy-agent {} failed ({}):\nstdout: {}\nstderr: {}",
            self.args,
            self.out.status,
            self.stdout,
            self.stderr
        );
        self
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("archy-agent {}: not JSON ({e}): {}", self.args, self.stdout))
    }
}

fn app_id(prefix: &str) -> String {
    unique_name(prefix).replace('_', "-")
}

fn meta(path: &Path) -> fs::Metadata {
    fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Polls `check` every 100 ms for up to `secs` seconds.
fn eventually<T>(secs: u64, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_rootless_agent_owns_volumes_in_the_users_range_probes_through_the_netns_and_lists_healthy() {
    let mut node = Node::new();
    let web = app_id("rlweb");
    let sick = app_id("rlsick");
    // No published port: the probe has to reach the container's address,
    // which lives in the rootless network namespace.
    let serve = |path: &str| {
        format!(
            "user: \"{APP_UID}:{APP_UID}\"\n\
             command: [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/etc\"]\n\
             volumes: [{{ source: data, target: /data }}]\n\
             files:\n  - path: data/app.conf\n    template: \"name={{{{ facts.container }}}}\\n\"\n\
             health:\n  http: {{ port: 8080, path: {path} }}\n  interval: 2s\n  timeout: 2s\n"
        )
    };
    node.app(&web, &serve("/archy-test-release"));
    node.app(&sick, &serve("/no-such-file"));
    node.run(&["install", &web]).ok();
    // An app that never gets healthy fails its install; it still runs.
    let _ = node.run(&["install", &sick]);

    // The folder and file belong to container uid 1000: on the host, the
    // user's subordinate uid start + 999; the group is the agent's own.
    let host_uid = node.rl.subuid.0 + APP_UID - 1;
    assert_eq!(node.rl.host_uid(APP_UID), host_uid);
    let folder = node.data.join(&web).join("data");
    let m = meta(&folder);
    assert!(m.is_dir());
    assert_eq!(m.uid(), host_uid, "{} owner", folder.display());
    let conf = folder.join("app.conf");
    let m = meta(&conf);
    assert_eq!(
        (m.uid(), m.gid(), m.mode() & 0o7777),
        (host_uid, node.rl.gid, 0o640),
        "{} owner, group, mode",
        conf.display()
    );
    assert_eq!(fs::read_to_string(&conf).expect("rendered"), format!("name={web}\n"));
    // The container itself sees its own uid on the file.
    let inside = node.podman(&["exec", &web, "stat", "-c", "%u", "/data/app.conf"]);
    assert_eq!(inside.trim(), APP_UID.to_string());

    // The probe goes to the container's address, not to loopback, and
    // answers for the file that exists and fails for the one that does not.
    let health = node.run(&["--json", "health", &web]).ok().json();
    let target = health["probe"]["target"].as_str().unwrap_or_default().to_owned();
    assert!(
        target.starts_with("http://") && !target.contains("127.0.0.1"),
        "probe target {target}: {health}"
    );
    assert_eq!(health["probe"]["ok"], true, "{health}");
    assert_eq!(health["health"], "healthy", "{health}");
    let sick_health = node.run(&["--json", "health", &sick]).json();
    assert_eq!(sick_health["probe"]["ok"], false, "{sick_health}");
    assert!(
        sick_health["probe"]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("404")),
        "{sick_health}"
    );

    // `list --json` reports both running, one healthy and one not.
    let list = node.run(&["--json", "list"]).ok().json();
    let entry = |app: &str| {
        list.as_array()
            .and_then(|a| a.iter().find(|e| e["app"] == app))
            .cloned()
            .unwrap_or_else(|| panic!("{app} not in {list}"))
    };
    let w = entry(&web);
    assert_eq!(
        (&w["state"], &w["health"]),
        (&"running".into(), &"healthy".into()),
        "{w}"
    );
    let s = entry(&sick);
    assert_eq!(s["state"], "running", "{s}");
    assert_ne!(s["health"], "healthy", "{s}");
}

#[test]
fn the_rootless_agent_rerenders_a_changed_config_and_restarts_the_app_to_read_it() {
    let mut node = Node::new();
    let app = app_id("rlconf");
    node.app(
        &app,
        &format!(
            "{READS_CONFIG_AT_START}user: \"{APP_UID}:{APP_UID}\"\n\
             volumes: [{{ source: data, target: /data }}]\n\
             secrets: [{{ name: pw, kind: hex16 }}]\n\
             files:\n  - path: data/app.conf\n    template: \"pw={{{{ secrets.pw }}}}\\n\"\n"
        ),
    );
    node.run(&["install", &app]).ok();
    let conf = node.data.join(&app).join("data/app.conf");
    let seen = node.data.join(&app).join("data/seen");
    let secret = node.data.join("secrets/pw");
    let password = fs::read_to_string(&secret).expect("the secret was generated");
    // Secrets are the agent's own: the user's, 0600.
    let m = meta(&secret);
    assert_eq!((m.uid(), m.mode() & 0o777), (node.rl.uid, 0o600));
    let first = format!("pw={password}\n");
    assert_eq!(fs::read_to_string(&conf).expect("rendered"), first);
    let read = |want: &str| eventually(15, || fs::read_to_string(&seen).ok().filter(|t| t == want));
    assert_eq!(read(&first).as_deref(), Some(first.as_str()), "the first start read it");
    let before = node.run_of(&app);

    // Nothing changed: a pass leaves file and container alone.
    let report = node.run(&["--json", "reconcile", "--once"]).ok().json();
    let decision = |report: &serde_json::Value| {
        report["apps"]
            .as_array()
            .and_then(|a| a.iter().find(|e| e["app"] == app.as_str()))
            .map(|e| e["decision"].to_string())
            .unwrap_or_else(|| panic!("{app} not in {report}"))
    };
    assert!(!decision(&report).contains("restart"), "{report}");
    assert_eq!(node.run_of(&app), before);

    // The secret changes (the write keeps the file's owner): the pass
    // re-renders the file, as the container's uid, and restarts the app.
    let rotated = "00112233445566778899aabbccddeeff";
    fs::write(&secret, rotated).expect("rotate the secret");
    let report = node.run(&["--json", "reconcile", "--once"]).ok().json();
    let d = decision(&report);
    assert!(
        d.contains("restart") && d.contains("config changed: data/app.conf"),
        "{report}"
    );
    let second = format!("pw={rotated}\n");
    assert_eq!(fs::read_to_string(&conf).expect("re-rendered"), second);
    let m = meta(&conf);
    assert_eq!((m.uid(), m.gid()), (node.rl.host_uid(APP_UID), node.rl.gid));
    assert_eq!(read(&second).as_deref(), Some(second.as_str()), "the restart read it");
    let after = node.run_of(&app);
    assert_eq!(after.0, before.0, "restarted, not recreated");
    assert_ne!(after.1, before.1, "a new run");
}

/// A container cannot make the rootless agent touch a host file: the race
/// of `confinement.rs`, with the agent's CLI run as the rootless user, so
/// every change of owner goes through `podman unshare archy-agent
/// confine-give`. The host files are the user's own, in its own folder:
/// without the confined walk, the agent (as the user, or as root of the
/// user namespace) could change them.
#[test]
fn a_container_swapping_its_folders_for_symlinks_never_makes_the_rootless_agent_touch_a_host_file() {
    /// Config files of the app, all in the folder the container swaps.
    const FILES: usize = 6;
    const MAX_ROUNDS: usize = 80;
    const BUDGET: Duration = Duration::from_secs(150);

    let mut node = Node::new();
    let host = node.root.join("host");
    fs::create_dir_all(&host).expect("host dir");
    let (precious, victim) = (host.join("app0.conf"), host.join("victim"));
    for file in [&precious, &victim] {
        fs::write(file, "host file\n").expect("host file");
        fs::set_permissions(file, fs::Permissions::from_mode(0o644)).expect("chmod");
    }
    node.give_to_user(&host);
    let before = [snapshot(&precious), snapshot(&victim)];
    assert_eq!(before[1].2, node.rl.uid, "the host file is the user's own");

    let app = app_id("rlconfine");
    let command = serde_json::to_string(&swapper(&host, &victim, FILES)).expect("command as JSON");
    let files: String = (0..FILES)
        .map(|i| format!("  - path: data/conf/app{i}.conf\n    template: \"rendered {i}\\n\"\n"))
        .collect();
    node.app(
        &app,
        &format!(
            "command: {command}\nuser: \"{APP_UID}:{APP_UID}\"\n\
             volumes: [{{ source: data, target: /data }}]\nfiles:\n{files}"
        ),
    );
    node.run(&["install", &app]).ok();
    let app_dir = node.data.join(&app).display().to_string();

    let started = std::time::Instant::now();
    let (mut rounds, mut rendered, mut refusals) = (0, 0, 0);
    let mut failures = Vec::new();
    while rounds < MAX_ROUNDS && started.elapsed() < BUDGET {
        rounds += 1;
        let run = node.run(&["--json", "reconcile", "--once"]);
        if run.stdout.contains("config changed: data/conf/") {
            rendered += 1;
        }
        for line in run.stdout.lines().chain(run.stderr.lines()) {
            if line.contains("refus") {
                refusals += 1;
                assert!(line.contains(&app_dir), "a refusal names a path in {app_dir}: {line}");
            }
        }
        if !run.out.status.success() {
            failures.push(format!("{}\n{}", run.stdout, run.stderr));
        }
    }
    // The container stops swapping before the host files are compared.
    let _ = node.podman(&["rm", "--force", "--time", "0", &app]);

    let after = [snapshot(&precious), snapshot(&victim)];
    assert_eq!(
        before, after,
        "a host file changed (content, mode, owner) in {rounds} rounds"
    );
    let mut names: Vec<_> = fs::read_dir(&host)
        .expect("ls host")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["app0.conf", "victim"], "nothing new in the host folder");
    assert!(
        rendered > 0,
        "the agent re-rendered the files at least once in {rounds} rounds: {failures:#?}"
    );
    assert!(
        refusals > 0,
        "the container's symlinks were met and refused at least once in {rounds} rounds"
    );
    eprintln!(
        "{rounds} rounds, {rendered} re-rendered, {refusals} refusal lines, {} failed passes",
        failures.len()
    );
}
