//! `archy-agent install|start|stop|remove|status|list|logs|health`, run as
//! the built binary against the Podman service and registries that
//! `cargo xtask test` starts.

mod common;

use std::fs;
use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{env, unique_name, TestEnv};

/// A shell loop that echoes three lines, then exits 0 on SIGTERM, so a
/// stop is clean and quick.
const SERVE: &str = "command: [\"sh\", \"-c\", \"echo line-1; echo line-2; echo line-3; \
                     trap 'exit 0' TERM; while true; do sleep 1; done\"]\n";

/// A node of our own: an apps folder and a data root in a temp folder, and
/// every container its apps may have, removed when dropped (pass or fail).
struct Node {
    tmp: tempfile::TempDir,
    apps: PathBuf,
    data: PathBuf,
    env: TestEnv,
    containers: std::sync::Mutex<Vec<String>>,
}

impl Node {
    fn new() -> Node {
        let tmp = tempfile::tempdir().expect("tempdir");
        let apps = tmp.path().join("apps");
        let data = tmp.path().join("data");
        fs::create_dir_all(&apps).expect("apps dir");
        fs::create_dir_all(&data).expect("data dir");
        Node {
            tmp,
            apps,
            data,
            env: env(),
            containers: Default::default(),
        }
    }

    /// Writes `apps/<id>/manifest.yml`: the test image, version 1.0, a 2 s
    /// stop grace, and `extra` YAML.
    fn app(&self, id: &str, extra: &str) {
        write_manifest(&self.apps.join(id), id, &self.env.image.to_string(), extra);
        self.remove_at_end(id);
    }

    fn remove_at_end(&self, container: &str) {
        let mut containers = self.containers.lock().unwrap_or_else(|p| p.into_inner());
        containers.push(container.to_owned());
        containers.push(format!("{container}-archy-backup"));
    }

    /// The binary with `--engine`, `--apps` and `--data` before the
    /// subcommand, and no ARCHY_* setting inherited.
    fn agent(&self, args: &[&str]) -> Command {
        let mut cmd = bare_agent();
        cmd.arg("--engine")
            .arg(&self.env.engine_socket)
            .arg("--apps")
            .arg(&self.apps)
            .arg("--data")
            .arg(&self.data)
            .args(args);
        cmd
    }

    fn run(&self, args: &[&str]) -> Run {
        run(self.agent(args))
    }

    fn podman(&self, args: &[&str]) -> String {
        let out = self.env.podman().args(args).output().expect("podman runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Every container's name, running or not.
    fn container_names(&self) -> Vec<String> {
        self.podman(&["ps", "-a", "--format", "{{.Names}}"])
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let containers = self.containers.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if !containers.is_empty() {
            let _ = self
                .env
                .podman()
                .args(["rm", "--force", "--ignore", "--time", "0"])
                .args(&containers)
                .output();
        }
    }
}

fn write_manifest(dir: &Path, id: &str, image: &str, extra: &str) {
    fs::create_dir_all(dir).expect("app dir");
    fs::write(
        dir.join("manifest.yml"),
        format!("id: {id}\nname: {id}\nversion: \"1.0\"\nimage: {image}\nstop_grace_period: 2s\n{extra}"),
    )
    .expect("write manifest");
}

/// The binary with no ARCHY_* setting inherited.
fn bare_agent() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_archy-agent"));
    for var in ["ARCHY_APPS", "ARCHY_DATA", "ARCHY_ENGINE"] {
        cmd.env_remove(var);
    }
    cmd
}

/// An app id no other test uses (ids are also container names).
fn app_id(prefix: &str) -> String {
    unique_name(prefix).replace('_', "-")
}

struct Run {
    out: Output,
    stdout: String,
    stderr: String,
}

impl Run {
    fn code(&self) -> Option<i32> {
        self.out.status.code()
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{self}"))
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\nstdout:\n{}\nstderr:\n{}",
            self.out.status, self.stdout, self.stderr
        )
    }
}

fn run(mut cmd: Command) -> Run {
    let out = cmd.output().expect("the archy-agent binary runs");
    Run {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        out,
    }
}

#[track_caller]
fn ok(run: &Run) {
    assert_eq!(run.code(), Some(0), "{run}");
}

#[track_caller]
fn failed(run: &Run) {
    assert!(!run.out.status.success(), "expected a failure\n{run}");
    assert!(run.stderr.starts_with("error: "), "a failure says why on stderr\n{run}");
}

/// Runs `args` until `done` accepts the run, for at most `within`; returns
/// the last run.
fn until(node: &Node, args: &[&str], within: Duration, done: impl Fn(&Run) -> bool) -> Run {
    let deadline = Instant::now() + within;
    loop {
        let r = node.run(args);
        if done(&r) || Instant::now() >= deadline {
            return r;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn install_then_status_list_and_logs_describe_the_running_app() {
    let node = Node::new();
    let id = app_id("cli-run");
    node.app(&id, SERVE);

    let install = node.run(&["install", &id]);
    ok(&install);
    assert!(
        install
            .stdout
            .contains(&format!("{id}: installed as {id} (image sha256:")),
        "{install}"
    );

    let status = node.run(&["status", &id, "--json"]);
    ok(&status);
    let s = status.json();
    assert_eq!(s["app"], id.as_str(), "{status}");
    assert_eq!(s["container"], id.as_str(), "{status}");
    assert_eq!(s["state"], "running", "{status}");
    assert_eq!(s["version"], "1.0", "{status}");
    assert_eq!(s["running_version"], "1.0", "{status}");
    assert_eq!(s["managed"], true, "{status}");
    assert_eq!(s["drifted"], false, "{status}");

    let list = node.run(&["list"]);
    ok(&list);
    let mut lines = list.stdout.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split_whitespace().collect();
    assert_eq!(
        header,
        ["APP", "CONTAINER", "STATE", "VERSION", "RUNNING", "UPDATE"],
        "{list}"
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows, [[id.as_str(), id.as_str(), "running", "1.0", "1.0"]], "{list}");

    // The lines come out as soon as the shell starts; give conmon a moment.
    let all = until(&node, &["logs", &id], Duration::from_secs(10), |r| {
        r.stdout.contains("line-3")
    });
    ok(&all);
    assert_eq!(all.stdout, "line-1\nline-2\nline-3\n", "{all}");
    let last = node.run(&["logs", &id, "--tail", "1"]);
    ok(&last);
    assert_eq!(last.stdout, "line-3\n", "{last}");
}

/// Writes `line-1` to `line-1500`, then idles until SIGTERM. One write
/// per line: a pipe's buffered output reaches conmon in blocks that split
/// lines, and Podman 4.3's `tail` then shows a split line as two.
const LOUD: &str = "command: [\"sh\", \"-c\", \"i=1; while [ $i -le 1500 ]; do echo line-$i; i=$((i+1)); done; \
                    trap 'exit 0' TERM; while true; do sleep 1; done\"]\n";

#[test]
fn logs_default_to_the_last_thousand_lines_and_all_streams_the_whole_log() {
    let node = Node::new();
    let id = app_id("cli-logs");
    node.app(&id, LOUD);
    ok(&node.run(&["install", &id]));

    let all = until(&node, &["logs", &id, "--all"], Duration::from_secs(20), |r| {
        r.stdout.ends_with("line-1500\n")
    });
    ok(&all);
    let every: Vec<String> = (1..=1500).map(|n| format!("line-{n}")).collect();
    assert_eq!(
        all.stdout.lines().collect::<Vec<_>>(),
        every,
        "--all streams every line"
    );

    let default = node.run(&["logs", &id]);
    ok(&default);
    assert_eq!(
        default.stdout.lines().collect::<Vec<_>>(),
        every[500..],
        "without --tail, the last 1000 lines"
    );
    assert!(!default.stderr.contains("cut"), "{default}");
    let json = node.run(&["logs", &id, "--json"]);
    ok(&json);
    let reply = json.json();
    assert_eq!(reply["tail"], 1000, "{json}");
    assert_eq!(reply["logs"].as_str().map(|l| l.lines().count()), Some(1000), "{json}");
    assert!(reply.get("cut").is_none(), "{json}");

    let ten = node.run(&["logs", &id, "--tail", "10"]);
    ok(&ten);
    assert_eq!(ten.stdout.lines().collect::<Vec<_>>(), every[1490..]);
    let both = node.run(&["logs", &id, "--tail", "10", "--all"]);
    assert_eq!(both.code(), Some(2), "--tail and --all conflict: {both}");
}

#[test]
fn install_json_says_created_and_a_second_install_changes_nothing() {
    let node = Node::new();
    let id = app_id("cli-json");
    node.app(&id, SERVE);

    let first = node.run(&["--json", "install", &id]);
    ok(&first);
    let r = first.json();
    assert_eq!(r["created"], true, "{first}");
    assert_eq!(r["container"], id.as_str(), "{first}");
    assert!(
        r["image_id"].as_str().is_some_and(|i| i.starts_with("sha256:")),
        "{first}"
    );
    let container_id = node.podman(&["inspect", "--format", "{{.Id}}", &id]);

    let again = node.run(&["install", &id, "--json"]);
    ok(&again);
    assert_eq!(again.json()["created"], false, "{again}");
    let table = node.run(&["install", &id]);
    ok(&table);
    assert!(
        table.stdout.contains(&format!("{id}: already installed as {id}")),
        "{table}"
    );
    assert_eq!(
        node.podman(&["inspect", "--format", "{{.Id}}", &id]),
        container_id,
        "the same container"
    );
}

#[test]
fn engine_apps_and_data_come_from_the_environment_or_after_the_subcommand() {
    let node = Node::new();
    let id = app_id("cli-env");
    node.app(&id, SERVE);

    let mut by_env = bare_agent();
    by_env
        .env("ARCHY_ENGINE", &node.env.engine_socket)
        .env("ARCHY_APPS", &node.apps)
        .env("ARCHY_DATA", &node.data)
        .args(["install", &id]);
    let install = run(by_env);
    ok(&install);
    assert!(install.stdout.contains(&format!("installed as {id}")), "{install}");

    let mut after = bare_agent();
    after
        .args(["status", &id, "--json", "--engine"])
        .arg(&node.env.engine_socket)
        .arg("--apps")
        .arg(&node.apps)
        .arg("--data")
        .arg(&node.data);
    let status = run(after);
    ok(&status);
    assert_eq!(status.json()["state"], "running", "{status}");
}

#[test]
fn health_exits_0_when_the_probe_passes_and_3_when_it_fails() {
    let node = Node::new();
    let well = app_id("cli-well");
    let sick = app_id("cli-sick");
    let probe = |cmd: &str| format!("{SERVE}health:\n  exec: [\"{cmd}\"]\n  interval: 1s\n  timeout: 1s\n");
    node.app(&well, &probe("true"));
    node.app(&sick, &probe("false"));
    ok(&node.run(&["install", &well]));
    ok(&node.run(&["install", &sick]));

    let h = node.run(&["health", &well]);
    assert_eq!(h.code(), Some(0), "{h}");
    assert!(h.stdout.contains(&format!("{well}: running (healthy)")), "{h}");
    let h = node.run(&["health", &sick]);
    assert_eq!(h.code(), Some(3), "{h}");
    assert!(h.stdout.contains(&format!("{sick}: running (unhealthy)")), "{h}");
    let h = node.run(&["health", &sick, "--json"]);
    assert_eq!(h.code(), Some(3), "{h}");
    let j = h.json();
    assert_eq!(j["state"], "running", "{h}");
    assert_eq!(j["health"], "unhealthy", "{h}");
    assert!(
        j["probe"]["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("exit code 1")),
        "{h}"
    );

    // Stopped, the app is not probed; it still has a health check.
    ok(&node.run(&["stop", &well]));
    let h = node.run(&["health", &well]);
    assert_eq!(h.code(), Some(3), "{h}");
    assert_eq!(h.stdout, format!("{well}: stopped (not probed: not running)\n"), "{h}");
}

#[test]
fn stop_makes_status_exit_3_start_brings_it_back_and_remove_keeps_the_data() {
    let node = Node::new();
    let id = app_id("cli-stop");
    node.app(&id, &format!("{SERVE}volumes: [{{ source: data, target: /data }}]\n"));
    ok(&node.run(&["install", &id]));
    let kept = node.data.join(&id).join("data").join("kept");
    fs::write(&kept, "precious").expect("write into the app's data folder");

    let stop = node.run(&["stop", &id]);
    ok(&stop);
    assert_eq!(stop.stdout, format!("{id}: stopped; now stopped\n"), "{stop}");
    let status = node.run(&["status", &id]);
    assert_eq!(status.code(), Some(3), "{status}");
    assert!(status.stdout.contains("stopped (exit 0)"), "{status}");

    let start = node.run(&["start", &id]);
    ok(&start);
    assert_eq!(start.stdout, format!("{id}: started; now running\n"), "{start}");
    ok(&node.run(&["status", &id]));

    let remove = node.run(&["remove", &id]);
    ok(&remove);
    assert_eq!(
        remove.stdout,
        format!("{id}: removed (data kept); now missing\n"),
        "{remove}"
    );
    assert!(!node.container_names().contains(&id), "the container is gone");
    assert_eq!(fs::read_to_string(&kept).expect("data kept"), "precious");
    let status = node.run(&["status", &id, "--json"]);
    assert_eq!(status.code(), Some(3), "{status}");
    assert_eq!(status.json()["state"], "missing", "{status}");
    let stop = node.run(&["stop", &id]);
    failed(&stop);
    assert!(stop.stderr.contains("is not installed"), "{stop}");
}

#[test]
fn an_unknown_app_fails_with_a_message_naming_the_known_apps() {
    let node = Node::new();
    let a = app_id("cli-known-a");
    let b = app_id("cli-known-b");
    node.app(&a, SERVE);
    node.app(&b, SERVE);
    for op in ["install", "status", "stop", "logs", "health"] {
        let r = node.run(&[op, "no-such-app"]);
        failed(&r);
        assert!(r.stderr.contains("unknown app \"no-such-app\""), "{op}: {r}");
        assert!(r.stderr.contains(&format!("known apps: [{a}, {b}]")), "{op}: {r}");
    }
}

#[test]
fn install_from_a_manifest_path_is_refused_outside_dev_mode() {
    let node = Node::new();
    let id = app_id("cli-path");
    let dir = node.tmp.path().join("elsewhere").join(&id);
    write_manifest(&dir, &id, &node.env.image.to_string(), SERVE);
    node.remove_at_end(&id);
    node.remove_at_end(&format!("{id}-dev"));
    let manifest = dir.join("manifest.yml");

    let manifest = manifest.to_str().expect("utf-8 path");
    let r = node.run(&["install", "--manifest", manifest]);
    failed(&r);
    assert!(r.stderr.contains("dev mode only"), "{r}");
    // The same answer whether or not the engine is up.
    let mut no_engine = bare_agent();
    no_engine
        .arg("--engine")
        .arg(node.tmp.path().join("no-such.sock"))
        .args([
            "--data",
            node.data.to_str().expect("utf-8 path"),
            "install",
            "--manifest",
            manifest,
        ]);
    let r = run(no_engine);
    failed(&r);
    assert!(r.stderr.contains("dev mode only"), "{r}");
    let names = node.container_names();
    assert!(
        !names.contains(&id) && !names.contains(&format!("{id}-dev")),
        "nothing was created: {names:?}"
    );
}

/// A host port `p` with `p` and `p + 10000` both free on every address.
fn free_base_port() -> u16 {
    for _ in 0..100 {
        let Ok(port) = TcpListener::bind("0.0.0.0:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
        else {
            continue;
        };
        // Ephemeral ports sit above 32768: take the one 10000 below.
        let Some(base) = port.checked_sub(10000).filter(|b| *b >= 1024) else {
            continue;
        };
        if TcpListener::bind(("0.0.0.0", base)).is_ok() && TcpListener::bind(("0.0.0.0", port)).is_ok() {
            return base;
        }
    }
    panic!("no free pair of ports 10000 apart");
}

/// `GET path` on 127.0.0.1:`port` over a plain socket; the whole answer.
fn http_get(port: u16, path: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}

#[test]
fn dev_install_from_a_manifest_path_names_the_container_dev_and_offsets_the_host_port() {
    let node = Node::new();
    let id = app_id("cli-dev");
    let base = free_base_port();
    let dev_port = base + 10000;
    // Outside the apps folder; the folder must still be named after the id.
    let dir = node.tmp.path().join("elsewhere").join(&id);
    write_manifest(
        &dir,
        &id,
        &node.env.image.to_string(),
        &format!(
            "command: [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/etc\"]\n\
             ports: [{{ host: {base}, container: 8080 }}]\n"
        ),
    );
    let container = format!("{id}-dev");
    node.remove_at_end(&container);
    node.remove_at_end(&id);
    let manifest = dir.join("manifest.yml");
    let manifest = manifest.to_str().expect("utf-8 path");

    let r = node.run(&["install", "--manifest", manifest, "--dev", "--json"]);
    ok(&r);
    let j = r.json();
    assert_eq!(j["container"], container.as_str(), "{r}");
    assert_eq!(j["created"], true, "{r}");
    let names = node.container_names();
    assert!(names.contains(&container) && !names.contains(&id), "{names:?}");

    let bindings = node.podman(&["inspect", "--format", "{{json .HostConfig.PortBindings}}", &container]);
    assert!(bindings.contains(&format!("\"HostPort\":\"{dev_port}\"")), "{bindings}");
    assert!(!bindings.contains(&format!("\"HostPort\":\"{base}\"")), "{bindings}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let answer = loop {
        match http_get(dev_port, "/archy-test-release") {
            Ok(answer) => break answer,
            Err(e) if Instant::now() >= deadline => panic!("nothing answers on {dev_port}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    assert!(answer.starts_with("HTTP/1.") && answer.contains(" 200 "), "{answer}");
    assert!(answer.trim_end().ends_with("v1"), "{answer}");
    assert!(
        TcpStream::connect(("127.0.0.1", base)).is_err(),
        "the base port stays free"
    );

    // The same install again creates nothing, and says so.
    let again = node.run(&["--dev", "install", "--manifest", manifest]);
    ok(&again);
    assert!(
        again
            .stdout
            .contains(&format!("{id}: already installed as {container}")),
        "{again}"
    );
    // Later commands know the app: its folder was copied into the apps folder.
    let status = node.run(&["--dev", "status", &id, "--json"]);
    ok(&status);
    assert_eq!(status.json()["container"], container.as_str(), "{status}");
}

#[test]
fn a_missing_engine_socket_is_a_clear_error_naming_the_socket() {
    let node = Node::new();
    let id = app_id("cli-nosock");
    node.app(&id, SERVE);
    let socket = node.tmp.path().join("no-such-podman.sock");
    for args in [vec!["status", id.as_str()], vec!["list"], vec!["install", id.as_str()]] {
        let mut cmd = bare_agent();
        cmd.arg("--engine")
            .arg(&socket)
            .arg("--apps")
            .arg(&node.apps)
            .arg("--data")
            .arg(&node.data)
            .args(&args);
        let r = run(cmd);
        failed(&r);
        assert_eq!(r.code(), Some(1), "{r}");
        assert!(
            r.stderr
                .contains(&format!("cannot reach the engine at {}", socket.display())),
            "{args:?}: {r}"
        );
        assert!(r.stdout.is_empty(), "{r}");
    }
}

#[test]
fn shutdown_stops_dependents_first_holds_nothing_and_reconcile_starts_the_same_containers() {
    let node = Node::new();
    let base = app_id("sd-base");
    let dependent = app_id("sd-dep");
    let absent = app_id("sd-absent");
    node.app(&base, SERVE);
    // The dependent takes a second to stop: were both stopped side by
    // side, the base would be down first.
    node.app(
        &dependent,
        &format!(
            "depends_on: [{base}]\ncommand: [\"sh\", \"-c\", \"trap 'sleep 1; exit 0' TERM; \
             while true; do sleep 0.2; done\"]\n"
        ),
    );
    node.app(&absent, SERVE);
    ok(&node.run(&["install", &base]));
    ok(&node.run(&["install", &dependent]));
    let ids_before = node.podman(&["inspect", "--format", "{{.Id}}", &base, &dependent]);

    let shutdown = node.run(&["shutdown"]);
    ok(&shutdown);
    let lines: Vec<&str> = shutdown.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "a line per app\n{shutdown}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&format!("{dependent}: stopped {dependent} in "))),
        "{shutdown}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&format!("{base}: stopped {base} in "))),
        "{shutdown}"
    );
    assert!(
        lines.contains(&format!("{absent}: not installed, nothing to stop").as_str()),
        "{shutdown}"
    );
    let finished = |name: &str| {
        let at = node.podman(&["inspect", "--format", "{{.State.FinishedAt.UnixNano}}", name]);
        at.trim()
            .parse::<i128>()
            .unwrap_or_else(|e| panic!("{name} finished at {at:?}: {e}"))
    };
    assert!(
        finished(&dependent) < finished(&base),
        "the dependent is down before what it depends on"
    );
    for app in [&base, &dependent] {
        let status = node.run(&["status", app, "--json"]);
        assert_eq!(status.json()["state"], "stopped", "{status}");
    }
    assert!(!node.container_names().contains(&absent), "shutdown installs nothing");

    // No hold marker: the agent's passes start both (the dependent once
    // its dependency runs, a pass later), the same containers, as after a
    // reboot.
    let running = |app: &str| node.run(&["status", app, "--json"]).json()["state"] == "running";
    let pass = until(&node, &["reconcile", "--once"], Duration::from_secs(60), |_| {
        running(&base) && running(&dependent)
    });
    assert!(running(&base) && running(&dependent), "{pass}");
    assert_eq!(
        node.podman(&["inspect", "--format", "{{.Id}}", &base, &dependent]),
        ids_before,
        "started again, not recreated"
    );
}

#[test]
fn shutdown_also_stops_an_app_whose_manifest_went_bad_and_nothing_of_other_apps_folders() {
    let node = Node::new();
    let broken = app_id("sd-broken");
    node.app(&broken, SERVE);
    ok(&node.run(&["install", &broken]));
    // Another node's app on the same engine: not ours to stop.
    let other = Node::new();
    let foreign = app_id("sd-foreign");
    other.app(&foreign, SERVE);
    ok(&other.run(&["install", &foreign]));
    // An edit gone wrong: the manifest no longer validates.
    fs::write(
        node.apps.join(&broken).join("manifest.yml"),
        format!("id: {broken}\nname: {broken}\nversion: \"1.0\"\nimage: busybox:latest\n"),
    )
    .expect("break the manifest");

    let shutdown = node.run(&["shutdown"]);
    ok(&shutdown);
    assert!(
        shutdown.stdout.starts_with(&format!("{broken}: stopped {broken} in ")),
        "{shutdown}"
    );
    let state = |name: &str| node.podman(&["inspect", "--format", "{{.State.Status}}", name]);
    assert_eq!(state(&broken).trim(), "exited", "{shutdown}");
    assert_eq!(
        state(&foreign).trim(),
        "running",
        "another apps folder's app is left alone"
    );
}
