//! `cargo xtask bench`: the agent's performance targets, measured against
//! the real Podman service that `cargo xtask test` starts (same machinery:
//! [`test_env::start`]), each next to a baseline measured in the same run,
//! because these machines are noisy and only ratios travel.
//!
//! | figure | baseline |
//! | --- | --- |
//! | stripped release binary | the podman binary, for scale |
//! | no-op reconcile pass, 50 apps (`duration_ms` of `reconcile --once --json`) | one raw `GET /containers/json?all=true` on the same socket, in-process |
//! | container killed → started again by `boot` (engine events) | one raw `POST /containers/{id}/start` of a stopped container |
//! | RSS and CPU of `boot` managing 20 apps, idle | the podman API service over the same window |
//! | `images import` of a 100 MB archive | `podman load -i` of the same file |
//!
//! The table goes to the terminal and, as markdown with the date and the
//! machine, to `target/bench/report.md`. Missed targets are reported, not
//! fatal: the exit status is 0 unless a measurement could not be made.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context as _};
use archy_agent::manifest::{self, LoadOptions, Naming, PinnedImage};
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use xshell::{cmd, Cmd, Shell};

use crate::podman::{http_status, REMOVE_ALL_CONTAINERS};
use crate::procs::{bail_if_interrupted, capture, Service, STOP_GRACE};
use crate::test_env::{self, TestEnv};

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Seconds the idle agent is watched for RSS and CPU.
    #[arg(long, default_value_t = 60)]
    idle_secs: u64,
    /// Measured runs of the no-op pass and of its baseline.
    #[arg(long, default_value_t = 20)]
    runs: usize,
}

const CARGO_BUILD_AGENT: &[&str] = &["build", "--release", "-p", "archy-agent"];
/// Podman's Docker-compatible API, the version the agent's engine seam uses.
const API: &str = "/v1.41";
/// Podman's own API, for the kill: the compatible one answers a SIGKILL only
/// once it saw the container stopped, which the agent's restart can outrun
/// (the answer then came ~20 s late).
const LIBPOD_API: &str = "/v4.0.0/libpod";
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

const NOOP_APPS: usize = 50;
const IDLE_APPS: usize = 20;
/// One app per kill: the first restart after a crash is immediate, the
/// next ones of the same app wait out the crash-loop backoff (10 s, …).
const KILL_RUNS: usize = 5;
const IMPORT_RUNS: usize = 3;
const IMPORT_PAYLOAD_BYTES: u64 = 100_000_000;

/// What every bench app runs: busybox `sleep`, no ports.
const APP_COMMAND: &str = r#"["sleep", "3600"]"#;
const SLEEP: &[&str] = &["sleep", "3600"];
/// The container the kill baseline starts by hand.
const KILL_REFERENCE: &str = "bench-kill-reference";
/// Long enough that only engine events can explain a quick restart.
const BOOT_EVENTS_ONLY: &[&str] = &["boot", "--resync", "3600"];
const BOOT: &[&str] = &["boot"];
const RECONCILE_ONCE: &[&str] = &["reconcile", "--once", "--json"];
const IMAGES_IMPORT: &[&str] = &["images", "import", "--json"];
const PODMAN_PULL: &[&str] = &["pull", "--quiet", "--tls-verify=false"];
const TAR_FLAGS: &[&str] = &["--numeric-owner", "--owner=0", "--group=0"];

const INSTALL_TIMEOUT: Duration = Duration::from_secs(180);
const RESTART_TIMEOUT: Duration = Duration::from_secs(60);
/// The engine's `StartedAt` gives the time; polling only notices it.
const STATE_POLL: Duration = Duration::from_millis(50);
/// After the last container came up: the passes its events caused end.
const SETTLE: Duration = Duration::from_secs(5);
const BETWEEN_KILLS: Duration = Duration::from_secs(1);

/// The local tag of the import image; `localhost/` lets the lock name it
/// without a registry digest, as it does build apps' images.
const IMPORT_APP: &str = "bench-import";
const IMPORT_REFERENCE: &str = "localhost/archipelago/bench-import:1";
/// The image folder's lock (docs/images.md).
const LOCK_FILE: &str = "images.lock.json";

pub fn run(root: &Path, args: &BenchArgs) -> anyhow::Result<ExitCode> {
    let sh = Shell::new().context("creating a shell")?;
    let target = target_dir(root);
    let agent = build_agent(&sh, &target)?;
    let mut rows = measure_or_fail(&["stripped release binary"], || binary_size(&agent));

    let started = Instant::now();
    let (mut env, vars) = test_env::start()?;
    eprintln!("bench: services ready in {:.1}s", started.elapsed().as_secs_f64());
    let var = |name: &str| {
        vars.get(name)
            .cloned()
            .with_context(|| format!("the test environment has no {name}"))
    };
    let image: PinnedImage = var("ARCHY_TEST_IMAGE")?
        .parse()
        .context("parsing ARCHY_TEST_IMAGE as a pinned image")?;
    let bench = Bench {
        sh: Shell::new().context("creating a shell")?,
        env: &env,
        agent,
        socket: PathBuf::from(var("ARCHY_TEST_ENGINE")?),
        image,
        work: env.dir().join("bench"),
        logs: target.join("bench/logs"),
        args,
    };
    create_dir(&bench.work)?;
    create_dir(&bench.logs)?;
    rows.extend(bench.all());
    let facts = machine_facts(&sh, &bench);
    drop(bench);

    let problems = env.teardown();
    let text = render_text(&rows);
    println!("{text}");
    let report = render_markdown(&rows, &facts);
    let dir = target.join("bench");
    create_dir(&dir)?;
    let path = dir.join("report.md");
    std::fs::write(&path, &report).with_context(|| format!("writing the bench report {}", path.display()))?;
    println!("report written to {}", path.display());
    print_missed(&rows);
    let failed: Vec<&Row> = rows.iter().filter(|r| r.failure.is_some()).collect();
    for row in &failed {
        eprintln!(
            "bench: {} could not be measured: {}",
            row.figure,
            row.failure.as_deref().unwrap_or("")
        );
    }
    for problem in &problems {
        eprintln!("bench: teardown: {problem}");
    }
    Ok(if failed.is_empty() && problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from)
}

/// `cargo build --release -p archy-agent` (the release profile strips).
fn build_agent(sh: &Shell, target: &Path) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    cmd!(sh, "{cargo} {CARGO_BUILD_AGENT...}")
        .run()
        .context("building the release agent")?;
    let agent = target.join("release/archy-agent");
    if !agent.is_file() {
        bail!("the release build left no binary at {}", agent.display());
    }
    Ok(agent)
}

/// Runs one measurement; a failure becomes a row saying why, so that the
/// rest of the table is still measured.
fn measure_or_fail(figures: &[&str], measure: impl FnOnce() -> anyhow::Result<Vec<Row>>) -> Vec<Row> {
    match measure() {
        Ok(rows) => rows,
        Err(e) => figures.iter().map(|f| Row::failed(f, format!("{e:#}"))).collect(),
    }
}

fn binary_size(agent: &Path) -> anyhow::Result<Vec<Row>> {
    let size = file_size(agent)?;
    let podman = find_on_path("podman").context("podman is not on PATH")?;
    Ok(vec![Row {
        figure: "stripped release binary".into(),
        unit: Unit::Bytes,
        measured: Some(size as f64),
        baseline: Some(file_size(&podman)? as f64),
        baseline_what: format!("{} (for scale)", podman.display()),
        max: Some(10e6),
        max_ratio: None,
        failure: None,
    }])
}

fn file_size(path: &Path) -> anyhow::Result<u64> {
    Ok(std::fs::metadata(path)
        .with_context(|| format!("reading the size of {}", path.display()))?
        .len())
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Everything the measurements share.
struct Bench<'a> {
    sh: Shell,
    env: &'a TestEnv,
    agent: PathBuf,
    socket: PathBuf,
    image: PinnedImage,
    work: PathBuf,
    /// Agent logs, kept after the run.
    logs: PathBuf,
    args: &'a BenchArgs,
}

/// One measurement: the rows it gives.
type Step<'c> = fn(&Bench<'c>) -> anyhow::Result<Vec<Row>>;

/// One agent's folders: apps, data, image folder, control socket; its
/// log goes to `target/bench/logs/`, which outlives the services.
struct Node {
    dir: PathBuf,
    log: PathBuf,
    apps: PathBuf,
    data: PathBuf,
    images: PathBuf,
    control: PathBuf,
}

impl Bench<'_> {
    fn all(&self) -> Vec<Row> {
        let mut rows = Vec::new();
        let steps: [(&[&str], Step<'_>); 4] = [
            (
                &["no-op reconcile pass, 50 apps", "reconcile --once, whole process"],
                Self::noop_pass,
            ),
            (&["container killed → started again"], Self::kill_to_start),
            (&["RSS of boot, 20 apps, idle", "CPU of boot while idle"], Self::idle),
            (
                &["images import, 100 MB archive", "raw POST /images/load"],
                Self::import,
            ),
        ];
        for (figures, step) in steps {
            if let Err(e) = bail_if_interrupted() {
                rows.extend(figures.iter().map(|f| Row::failed(f, format!("{e:#}"))));
                continue;
            }
            eprintln!("bench: measuring {}", figures.join(", "));
            rows.extend(measure_or_fail(figures, || step(self)));
            if let Err(e) = self.remove_containers() {
                eprintln!("bench: {e:#}");
            }
        }
        rows
    }

    fn podman(&self) -> Cmd<'_> {
        self.env.podman().cmd(&self.sh)
    }

    fn remove_containers(&self) -> anyhow::Result<()> {
        capture(self.podman().args(REMOVE_ALL_CONTAINERS)).context("removing the bench's containers")?;
        Ok(())
    }

    fn node(&self, name: &str) -> anyhow::Result<Node> {
        let dir = self.work.join(name);
        let node = Node {
            log: self.logs.join(format!("{name}-agent.log")),
            apps: dir.join("apps"),
            data: dir.join("data"),
            images: dir.join("images"),
            control: dir.join("control.sock"),
            dir,
        };
        for d in [&node.apps, &node.data, &node.images] {
            create_dir(d)?;
        }
        Ok(node)
    }

    /// `archy-agent` with the node's folders and the engine, before `args`.
    /// The control socket goes by its variable, which an agent without one
    /// ignores; a node's own path keeps `reconcile --once` from handing the
    /// pass to some other running agent.
    fn agent(&self, node: &Node, args: &[&str]) -> Cmd<'_> {
        let (agent, engine) = (&self.agent, &self.socket);
        let (apps, data, images) = (&node.apps, &node.data, &node.images);
        cmd!(
            self.sh,
            "{agent} --engine {engine} --apps {apps} --data {data} --images {images} {args...}"
        )
        .env("ARCHY_CONTROL", &node.control)
        // The agent's own default log level, whatever the caller's shell says.
        .env_remove("RUST_LOG")
    }

    /// Writes `count` apps `<prefix>-NN` running the test image; returns
    /// their container names, as the agent's own naming rule gives them.
    fn write_apps(&self, node: &Node, prefix: &str, count: usize) -> anyhow::Result<Vec<String>> {
        let image = &self.image;
        for i in 1..=count {
            let id = format!("{prefix}-{i:02}");
            let dir = node.apps.join(&id);
            create_dir(&dir)?;
            let path = dir.join(manifest::MANIFEST_FILE);
            let text = format!(
                "id: {id}\nname: {id}\nversion: \"1.0\"\nimage: {image}\nstop_grace_period: 2s\ncommand: {APP_COMMAND}\n"
            );
            std::fs::write(&path, text).with_context(|| format!("writing the manifest {}", path.display()))?;
        }
        let report = manifest::load_dir(
            &node.apps,
            &LoadOptions {
                data_root: node.data.clone().into(),
            },
        );
        if !report.is_clean() || report.apps.len() != count {
            let errors: Vec<String> = report.errors.iter().map(ToString::to_string).collect();
            bail!(
                "the bench's {count} manifests in {} do not load: {}",
                node.apps.display(),
                errors.join("; ")
            );
        }
        Ok(report.apps.iter().map(|m| Naming::Prod.container_name(m)).collect())
    }

    /// Puts the test image in the store, so that installs do not each pull.
    fn pull_image(&self) -> anyhow::Result<()> {
        let reference = self.image.by_digest();
        capture(self.podman().args(PODMAN_PULL).arg(&reference))
            .with_context(|| format!("pulling the test image {reference}"))?;
        Ok(())
    }

    fn all_running(&self, names: &[String]) -> anyhow::Result<bool> {
        let running = self.running_containers()?;
        Ok(names.iter().all(|n| running.contains(n)))
    }

    fn running_containers(&self) -> anyhow::Result<BTreeSet<String>> {
        let list = get_json(&self.socket, &format!("{API}/containers/json?all=true"))?;
        let items = list.as_array().context("the container listing is not a JSON array")?;
        Ok(items
            .iter()
            .filter(|c| c["State"].as_str() == Some("running"))
            .filter_map(|c| c["Names"].as_array()?.first()?.as_str())
            .map(|n| n.trim_start_matches('/').to_owned())
            .collect())
    }

    /// Starts `archy-agent <args>` as a service with its log in the node.
    fn spawn_agent(&self, node: &Node, args: &[&str]) -> anyhow::Result<Service> {
        let command = Command::from(self.agent(node, args));
        Service::spawn("archy-agent boot", command, &node.log)
    }

    /// Waits until every container in `names` runs, then lets the passes
    /// their events caused finish.
    fn wait_all_running(&self, agent: &mut Service, names: &[String]) -> anyhow::Result<()> {
        let what = format!("all {} apps running", names.len());
        agent.wait_ready(&what, INSTALL_TIMEOUT, || self.all_running(names).unwrap_or(false))?;
        sleep_checked(SETTLE)
    }

    /// Figure 2: the median `duration_ms` of `reconcile --once` with 50
    /// running apps, against a raw listing on the same socket.
    fn noop_pass(&self) -> anyhow::Result<Vec<Row>> {
        let node = self.node("noop")?;
        let names = self.write_apps(&node, "bench-noop", NOOP_APPS)?;
        self.pull_image()?;
        // The first passes install; later ones find everything running.
        let deadline = Instant::now() + INSTALL_TIMEOUT;
        loop {
            bail_if_interrupted()?;
            let (pass, _) = self.reconcile_once(&node)?;
            if self.all_running(&names)? && pass.is_quiet() {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "the {NOOP_APPS} apps were not all running and quiet after {INSTALL_TIMEOUT:?}; last pass: {}",
                    pass.summary()
                );
            }
            sleep(Duration::from_secs(1));
        }
        let runs = self.args.runs.max(1);
        let listing = format!("{API}/containers/json?all=true");
        let (mut pass_ms, mut process_ms, mut raw_ms) = (Vec::new(), Vec::new(), Vec::new());
        // Interleaved, so that both see the same load on a busy machine.
        for _ in 0..runs {
            bail_if_interrupted()?;
            let (pass, took) = self.reconcile_once(&node)?;
            if !pass.is_quiet() || pass.apps.len() != NOOP_APPS {
                bail!("a measured pass was not a no-op: {}", pass.summary());
            }
            pass_ms.push(pass.duration_ms as f64);
            process_ms.push(millis(took));

            let started = Instant::now();
            let (status, _) = request(&self.socket, "GET", &listing)?;
            raw_ms.push(millis(started.elapsed()));
            if status != 200 {
                bail!("GET {listing} answered {status}");
            }
        }
        let raw = median(&raw_ms);
        Ok(vec![
            Row {
                figure: "no-op reconcile pass, 50 apps".into(),
                unit: Unit::Millis,
                measured: median(&pass_ms),
                baseline: raw,
                baseline_what: format!("raw GET {listing}, in-process, median of {runs}"),
                max: Some(150.0),
                max_ratio: Some(3.0),
                failure: None,
            },
            Row {
                figure: "reconcile --once, whole process".into(),
                unit: Unit::Millis,
                measured: median(&process_ms),
                baseline: raw,
                baseline_what: "the same raw GET (informational: includes process start and manifest loading)".into(),
                max: None,
                max_ratio: None,
                failure: None,
            },
        ])
    }

    /// One `reconcile --once --json`: its report and the process's wall time.
    fn reconcile_once(&self, node: &Node) -> anyhow::Result<(PassJson, Duration)> {
        let started = Instant::now();
        let output = self
            .agent(node, RECONCILE_ONCE)
            .quiet()
            .ignore_status()
            .output()
            .context("running archy-agent reconcile --once")?;
        let took = started.elapsed();
        let pass: PassJson = serde_json::from_slice(&output.stdout).with_context(|| {
            format!(
                "archy-agent reconcile --once --json ({}) printed no pass report: {}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout).trim(),
                String::from_utf8_lossy(&output.stderr).trim()
            )
        })?;
        if let Some(e) = &pass.error {
            bail!("the reconcile pass could not run: {e}");
        }
        Ok((pass, took))
    }

    /// Figure 3: kill a container of a running `boot`; the time until the
    /// engine says it started again. Against a raw start of a stopped one.
    fn kill_to_start(&self) -> anyhow::Result<Vec<Row>> {
        let node = self.node("kill")?;
        let names = self.write_apps(&node, "bench-kill", KILL_RUNS)?;
        self.pull_image()?;
        // The baseline's container, made by hand: the agent lists it as
        // matching no manifest and leaves it alone.
        capture(
            self.podman()
                .args(["run", "--detach", "--name", KILL_REFERENCE])
                .arg(self.image.by_digest())
                .args(SLEEP),
        )
        .with_context(|| format!("starting the reference container {KILL_REFERENCE}"))?;
        let mut agent = self.spawn_agent(&node, BOOT_EVENTS_ONLY)?;
        let runs = self.kill_runs(&mut agent, &names);
        agent
            .stop(STOP_GRACE)
            .with_context(|| format!("stopping {}", agent.name()))?;
        let (measured, start_ms) = runs?;
        Ok(vec![Row {
            figure: "container killed → started again".into(),
            unit: Unit::Millis,
            measured: median(&measured),
            baseline: median(&start_ms),
            baseline_what: format!(
                "raw POST {API}/containers/{{name}}/start of a stopped container (not the agent's), \
                 between the kills, median of {KILL_RUNS}"
            ),
            max: Some(1000.0),
            max_ratio: None,
            failure: None,
        }])
    }

    /// Kills each app's container once (a second kill of the same app
    /// would meet the crash-loop backoff) and takes the time from the kill
    /// to the engine's `StartedAt` of the new run; between kills, times a
    /// raw start of the stopped reference container.
    fn kill_runs(&self, agent: &mut Service, names: &[String]) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
        self.wait_all_running(agent, names)?;
        let (mut took, mut start_ms) = (Vec::new(), Vec::new());
        for name in names {
            bail_if_interrupted()?;
            let before = self.inspect_state(name)?;
            let killed_at = SystemTime::now();
            post(
                &self.socket,
                &format!("{LIBPOD_API}/containers/{name}/kill?signal=SIGKILL"),
            )?;
            let mut after = None;
            wait_for(RESTART_TIMEOUT, &format!("the agent to start {name} again"), || {
                let now = self.inspect_state(name)?;
                let restarted = now.running && now.started_at != before.started_at;
                after = Some(now);
                Ok(restarted)
            })?;
            let started_at = after.map(|a| a.started_at).unwrap_or_default();
            let started = parse_rfc3339(&started_at)
                .with_context(|| format!("{name}'s StartedAt {started_at:?} is not an RFC 3339 time"))?;
            let elapsed = started.duration_since(killed_at).unwrap_or_default();
            took.push(millis(elapsed));
            agent.check_running()?;
            sleep_checked(BETWEEN_KILLS)?;

            post(
                &self.socket,
                &format!("{LIBPOD_API}/containers/{KILL_REFERENCE}/kill?signal=SIGKILL"),
            )?;
            wait_for(RESTART_TIMEOUT, &format!("{KILL_REFERENCE} to stop"), || {
                Ok(!self.inspect_state(KILL_REFERENCE)?.running)
            })?;
            // The pass the reference's events caused ends first.
            sleep_checked(BETWEEN_KILLS)?;
            let started = Instant::now();
            post(&self.socket, &format!("{API}/containers/{KILL_REFERENCE}/start"))?;
            start_ms.push(millis(started.elapsed()));
            sleep_checked(BETWEEN_KILLS)?;
        }
        Ok((took, start_ms))
    }

    fn inspect_state(&self, name: &str) -> anyhow::Result<ContainerState> {
        let info = get_json(&self.socket, &format!("{API}/containers/{name}/json"))?;
        let state = &info["State"];
        Ok(ContainerState {
            running: state["Running"].as_bool().unwrap_or(false),
            started_at: state["StartedAt"].as_str().unwrap_or("").to_owned(),
        })
    }

    /// Figures 4 and 5: RSS and CPU of `boot` with 20 running apps over
    /// the idle window, against the podman service over the same window.
    fn idle(&self) -> anyhow::Result<Vec<Row>> {
        let node = self.node("idle")?;
        let names = self.write_apps(&node, "bench-idle", IDLE_APPS)?;
        self.pull_image()?;
        let podman_pid = self
            .env
            .podman_service_pid()
            .context("the podman service is not running")?;
        let clk_tck = clock_ticks(&self.sh)?;
        let mut agent = self.spawn_agent(&node, BOOT)?;
        let measured = self.idle_window(&mut agent, &names, podman_pid, clk_tck);
        agent
            .stop(STOP_GRACE)
            .with_context(|| format!("stopping {}", agent.name()))?;
        let (agent_use, podman_use) = measured?;
        let secs = self.args.idle_secs;
        Ok(vec![
            Row {
                figure: format!("RSS of boot, {IDLE_APPS} apps, after {secs} s idle"),
                unit: Unit::Bytes,
                measured: Some(agent_use.rss_bytes),
                baseline: Some(podman_use.rss_bytes),
                baseline_what: "VmRSS of the podman API service at the same moment".into(),
                max: Some(15e6),
                max_ratio: None,
                failure: None,
            },
            Row {
                figure: format!("CPU of boot while idle, {secs} s"),
                unit: Unit::Percent,
                measured: Some(agent_use.cpu_percent),
                baseline: Some(podman_use.cpu_percent),
                baseline_what: "utime+stime of the podman API service over the same window".into(),
                max: Some(1.0),
                max_ratio: None,
                failure: None,
            },
        ])
    }

    fn idle_window(
        &self,
        agent: &mut Service,
        names: &[String],
        podman_pid: u32,
        clk_tck: f64,
    ) -> anyhow::Result<(Usage, Usage)> {
        self.wait_all_running(agent, names)?;
        let pids = [agent.pid(), podman_pid];
        let before = pids.map(ProcSample::read);
        let started = Instant::now();
        let window = Duration::from_secs(self.args.idle_secs);
        while started.elapsed() < window {
            bail_if_interrupted()?;
            agent.check_running()?;
            sleep(Duration::from_millis(250).min(window.saturating_sub(started.elapsed())));
        }
        let after = pids.map(ProcSample::read);
        let elapsed = started.elapsed();
        let [agent_before, podman_before] = before;
        let [agent_after, podman_after] = after;
        Ok((
            Usage::between(&agent_before?, &agent_after?, elapsed, clk_tck),
            Usage::between(&podman_before?, &podman_after?, elapsed, clk_tck),
        ))
    }

    /// Figure 6: `images import` of a ~100 MB archive against `podman load`
    /// of the same file, the image removed before every run.
    fn import(&self) -> anyhow::Result<Vec<Row>> {
        let node = self.node("import")?;
        let (archive, image_id) = self.import_archive(&node)?;
        let (mut agent_ms, mut load_ms, mut api_ms) = (Vec::new(), Vec::new(), Vec::new());
        let load = format!("{API}/images/load");
        // Alternating, so that neither side always runs with a warmer cache.
        for _ in 0..IMPORT_RUNS {
            bail_if_interrupted()?;
            self.remove_image(&image_id)?;
            let started = Instant::now();
            let out = capture(self.agent(&node, IMAGES_IMPORT)).context("running archy-agent images import")?;
            agent_ms.push(millis(started.elapsed()));
            check_imported(&out)?;

            self.remove_image(&image_id)?;
            let started = Instant::now();
            capture(self.podman().args(["load", "--quiet", "--input"]).arg(&archive))
                .with_context(|| format!("podman load of {}", archive.display()))?;
            load_ms.push(millis(started.elapsed()));

            self.remove_image(&image_id)?;
            let started = Instant::now();
            let (status, body) = request_with_body(&self.socket, "POST", &load, Some(&archive))?;
            api_ms.push(millis(started.elapsed()));
            if status != 200 {
                bail!("POST {load} answered {status}: {}", String::from_utf8_lossy(&body));
            }
        }
        self.remove_image(&image_id)?;
        let size = file_size(&archive)?;
        let load_what = format!("podman load --input of the same archive, median of {IMPORT_RUNS}");
        Ok(vec![
            Row {
                figure: format!("images import, {:.0} MB archive", size as f64 / 1e6),
                unit: Unit::Millis,
                measured: median(&agent_ms),
                baseline: median(&load_ms),
                baseline_what: load_what.clone(),
                max: None,
                max_ratio: Some(1.2),
                failure: None,
            },
            Row {
                figure: "raw POST /images/load, same archive".into(),
                unit: Unit::Millis,
                measured: median(&api_ms),
                baseline: median(&load_ms),
                baseline_what: format!("{load_what} (informational: the engine API's own cost, no agent)"),
                max: None,
                max_ratio: None,
                failure: None,
            },
        ])
    }

    /// Builds a busybox image with a layer of random bytes, saves it as a
    /// docker-archive into the node's image folder with its lock; returns
    /// the archive and the image ID.
    fn import_archive(&self, node: &Node) -> anyhow::Result<(PathBuf, String)> {
        let rootfs = node.dir.join("rootfs");
        let bin = rootfs.join("bin");
        create_dir(&bin)?;
        let busybox = bin.join("busybox");
        std::fs::copy(crate::tools::STATIC_BUSYBOX, &busybox)
            .with_context(|| format!("copying {} to {}", crate::tools::STATIC_BUSYBOX, busybox.display()))?;
        let payload = rootfs.join("payload");
        let mut random = File::open("/dev/urandom")
            .context("opening /dev/urandom")?
            .take(IMPORT_PAYLOAD_BYTES);
        let mut out = File::create(&payload).with_context(|| format!("creating {}", payload.display()))?;
        std::io::copy(&mut random, &mut out)
            .with_context(|| format!("writing random bytes to {}", payload.display()))?;
        let layer = node.dir.join("layer.tar");
        capture(cmd!(self.sh, "tar {TAR_FLAGS...} -C {rootfs} -cf {layer} ."))
            .with_context(|| format!("packing {}", rootfs.display()))?;
        capture(
            self.podman()
                .args(["import", "--quiet"])
                .arg(&layer)
                .arg(IMPORT_REFERENCE),
        )
        .with_context(|| format!("importing {} as {IMPORT_REFERENCE}", layer.display()))?;
        let archive = node.images.join(format!("{IMPORT_APP}.tar"));
        capture(
            self.podman()
                .args(["save", "--quiet", "--format", "docker-archive", "--output"])
                .arg(&archive)
                .arg(IMPORT_REFERENCE),
        )
        .with_context(|| format!("saving {IMPORT_REFERENCE} to {}", archive.display()))?;
        let id = capture(
            self.podman()
                .args(["image", "inspect", "--format", "{{.Id}}", IMPORT_REFERENCE]),
        )
        .with_context(|| format!("reading the image ID of {IMPORT_REFERENCE}"))?;
        let id = id.trim().trim_start_matches("sha256:").to_owned();
        let (size, sha256) = hash_file(&archive)?;
        let lock = serde_json::json!({
            "version": 1,
            "images": [{
                "app": IMPORT_APP,
                "reference": IMPORT_REFERENCE,
                "manifest_digest": format!("sha256:{id}"),
                "config_digest": format!("sha256:{id}"),
                "archive": format!("{IMPORT_APP}.tar"),
                "archive_sha256": sha256,
                "size": size,
            }],
        });
        let lock_path = node.images.join(LOCK_FILE);
        let text = serde_json::to_string_pretty(&lock).context("serialising the bench's image lock")?;
        std::fs::write(&lock_path, text + "\n").with_context(|| format!("writing {}", lock_path.display()))?;
        for scratch in [&payload, &layer] {
            std::fs::remove_file(scratch).with_context(|| format!("removing {}", scratch.display()))?;
        }
        Ok((archive, id))
    }

    fn remove_image(&self, id: &str) -> anyhow::Result<()> {
        capture(self.podman().args(["rmi", "--force", "--ignore", id]))
            .with_context(|| format!("removing image {id}"))?;
        Ok(())
    }
}

/// What `reconcile --once --json` prints (a `PassReport`), the parts used.
#[derive(Debug, Deserialize)]
struct PassJson {
    duration_ms: u64,
    apps: Vec<AppJson>,
    error: Option<String>,
}

#[derive(Debug, Deserialize)]
struct AppJson {
    app: String,
    observed: String,
    decision: Value,
}

impl PassJson {
    /// Every app left alone because it runs and matches: `{"wait": {"reason": "ok"}}`.
    fn is_quiet(&self) -> bool {
        self.apps.iter().all(|a| a.decision["wait"]["reason"] == "ok")
    }

    fn summary(&self) -> String {
        let busy: Vec<String> = self
            .apps
            .iter()
            .filter(|a| a.decision["wait"]["reason"] != "ok")
            .map(|a| format!("{} ({}): {}", a.app, a.observed, a.decision))
            .collect();
        format!(
            "{} apps in {} ms, {} not quiet{}{}",
            self.apps.len(),
            self.duration_ms,
            busy.len(),
            if busy.is_empty() { "" } else { ": " },
            busy.join(", ")
        )
    }
}

/// `images import --json` reported its one entry imported.
fn check_imported(json: &str) -> anyhow::Result<()> {
    let report: Value = serde_json::from_str(json).with_context(|| format!("images import printed {json}"))?;
    let outcome = report["entries"][0]["outcome"].as_str().unwrap_or("");
    if outcome != "imported" {
        bail!("images import did not import the archive: {json}");
    }
    Ok(())
}

struct ContainerState {
    running: bool,
    started_at: String,
}

/// Polls `done` every 10 ms until true, or fails after `timeout`.
fn wait_for(timeout: Duration, what: &str, mut done: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        if done()? {
            return Ok(());
        }
        bail_if_interrupted()?;
        if started.elapsed() > timeout {
            bail!("waited {timeout:?} for {what}");
        }
        sleep(STATE_POLL);
    }
}

fn sleep_checked(total: Duration) -> anyhow::Result<()> {
    let until = Instant::now() + total;
    while Instant::now() < until {
        bail_if_interrupted()?;
        sleep(Duration::from_millis(100).min(until.saturating_duration_since(Instant::now())));
    }
    Ok(())
}

/// Parses the engine's `StartedAt` (`2026-11-26T21:35:13.155781398Z`, or
/// with a `±HH:MM` offset).
fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let (date, time) = text.split_once('T')?;
    let mut ymd = date.splitn(3, '-');
    let year: i64 = ymd.next()?.parse().ok()?;
    let month: i64 = ymd.next()?.parse().ok()?;
    let day: i64 = ymd.next()?.parse().ok()?;
    let (clock, offset) = match time.strip_suffix('Z') {
        Some(clock) => (clock, 0),
        None => {
            let at = time.rfind(['+', '-'])?;
            let (clock, zone) = time.split_at(at);
            let sign = if zone.starts_with('-') { -1 } else { 1 };
            let (h, m) = zone[1..].split_once(':')?;
            (
                clock,
                sign * (h.parse::<i64>().ok()? * 3600 + m.parse::<i64>().ok()? * 60),
            )
        }
    };
    let (hms, fraction) = clock.split_once('.').unwrap_or((clock, ""));
    let mut parts = hms.splitn(3, ':');
    let hour: i64 = parts.next()?.parse().ok()?;
    let minute: i64 = parts.next()?.parse().ok()?;
    let second: i64 = parts.next()?.parse().ok()?;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits: String = fraction.chars().chain(std::iter::repeat('0')).take(9).collect();
    let nanos: u32 = digits.parse().ok()?;
    let secs = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second - offset;
    Some(SystemTime::UNIX_EPOCH + Duration::new(u64::try_from(secs).ok()?, nanos))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn create_dir(path: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))
}

fn hash_file(path: &Path) -> anyhow::Result<(u64, String)> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let size = std::io::copy(&mut file, &mut hasher).with_context(|| format!("hashing {}", path.display()))?;
    Ok((size, format!("{:x}", hasher.finalize())))
}

// --- The engine's API, by hand: nothing between the bench and the socket.

/// One HTTP/1.1 request on the engine's unix socket (`Connection: close`);
/// the status and the body, de-chunked.
fn request(socket: &Path, method: &str, path: &str) -> anyhow::Result<(u16, Vec<u8>)> {
    request_with_body(socket, method, path, None)
}

/// [`request`] with a file as the body (`Content-Length`, streamed).
fn request_with_body(socket: &Path, method: &str, path: &str, body: Option<&Path>) -> anyhow::Result<(u16, Vec<u8>)> {
    let mut stream =
        UnixStream::connect(socket).with_context(|| format!("connecting to the engine at {}", socket.display()))?;
    stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
    stream.set_write_timeout(Some(HTTP_TIMEOUT))?;
    let file = match body {
        Some(p) => Some((
            File::open(p).with_context(|| format!("opening {}", p.display()))?,
            file_size(p)?,
        )),
        None => None,
    };
    let length = file.as_ref().map_or(0, |(_, len)| *len);
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: podman\r\nConnection: close\r\nContent-Type: application/x-tar\r\nContent-Length: {length}\r\n\r\n"
    );
    stream
        .write_all(head.as_bytes())
        .with_context(|| format!("sending {method} {path}"))?;
    if let Some((mut file, _)) = file {
        std::io::copy(&mut file, &mut stream).with_context(|| format!("sending the body of {method} {path}"))?;
    }
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .with_context(|| format!("reading the answer to {method} {path}"))?;
    parse_response(&raw).with_context(|| format!("the answer to {method} {path}"))
}

fn get_json(socket: &Path, path: &str) -> anyhow::Result<Value> {
    let (status, body) = request(socket, "GET", path)?;
    if status != 200 {
        bail!("GET {path} answered {status}: {}", String::from_utf8_lossy(&body));
    }
    serde_json::from_slice(&body).with_context(|| format!("the answer to GET {path} is not JSON"))
}

/// A POST that must succeed (2xx; 304 means already in that state).
fn post(socket: &Path, path: &str) -> anyhow::Result<()> {
    let (status, body) = request(socket, "POST", path)?;
    if !(200..300).contains(&status) && status != 304 {
        bail!("POST {path} answered {status}: {}", String::from_utf8_lossy(&body));
    }
    Ok(())
}

fn parse_response(raw: &[u8]) -> anyhow::Result<(u16, Vec<u8>)> {
    let end = find(raw, b"\r\n\r\n").context("no end of the headers")?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let status = http_status(&head).with_context(|| format!("not an HTTP answer: {head}"))?;
    let chunked = head.lines().skip(1).any(|line| {
        line.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("transfer-encoding") && value.trim().eq_ignore_ascii_case("chunked")
        })
    });
    let body = &raw[end + 4..];
    Ok((status, if chunked { dechunk(body)? } else { body.to_vec() }))
}

fn dechunk(mut body: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = find(body, b"\r\n").context("a chunk size line without its end")?;
        let line = String::from_utf8_lossy(&body[..line_end]);
        let hex = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(hex, 16).with_context(|| format!("chunk size {hex:?} is not hex"))?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if body.len() < size + 2 {
            bail!("a chunk of {size} bytes is cut short");
        }
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

// --- /proc

/// CPU time and resident memory of one process, from /proc.
struct ProcSample {
    ticks: u64,
    rss_bytes: f64,
}

impl ProcSample {
    fn read(pid: u32) -> anyhow::Result<ProcSample> {
        let stat_path = format!("/proc/{pid}/stat");
        let stat = std::fs::read_to_string(&stat_path).with_context(|| format!("reading {stat_path}"))?;
        let status_path = format!("/proc/{pid}/status");
        let status = std::fs::read_to_string(&status_path).with_context(|| format!("reading {status_path}"))?;
        Ok(ProcSample {
            ticks: cpu_ticks(&stat).with_context(|| format!("no utime and stime in {stat_path}"))?,
            rss_bytes: vm_rss_kib(&status).with_context(|| format!("no VmRSS in {status_path}"))? as f64 * 1024.0,
        })
    }
}

struct Usage {
    rss_bytes: f64,
    cpu_percent: f64,
}

impl Usage {
    /// RSS at the end; CPU as a percentage of one core over `elapsed`.
    fn between(before: &ProcSample, after: &ProcSample, elapsed: Duration, clk_tck: f64) -> Usage {
        let cpu_secs = after.ticks.saturating_sub(before.ticks) as f64 / clk_tck;
        Usage {
            rss_bytes: after.rss_bytes,
            cpu_percent: 100.0 * cpu_secs / elapsed.as_secs_f64().max(f64::EPSILON),
        }
    }
}

/// utime + stime (fields 14 and 15) of a `/proc/<pid>/stat` line; the
/// command name in parentheses may hold spaces, so count after the last ')'.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn vm_rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn clock_ticks(sh: &Shell) -> anyhow::Result<f64> {
    let text = capture(cmd!(sh, "getconf CLK_TCK")).context("reading CLK_TCK")?;
    let ticks: f64 = text
        .trim()
        .parse()
        .with_context(|| format!("getconf CLK_TCK printed {text:?}"))?;
    if ticks <= 0.0 {
        bail!("getconf CLK_TCK printed {ticks}");
    }
    Ok(ticks)
}

// --- The table

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unit {
    Bytes,
    Millis,
    Percent,
    Seconds,
}

impl Unit {
    fn format(self, value: f64) -> String {
        match self {
            Unit::Bytes => format!("{:.1} MB", value / 1e6),
            Unit::Millis if value >= 1000.0 => format!("{:.2} s", value / 1000.0),
            Unit::Millis => format!("{value:.1} ms"),
            Unit::Percent => format!("{value:.2} %"),
            // As the build stages print their times.
            Unit::Seconds => crate::build::human_duration(value),
        }
    }
}

/// One figure of the table. `max` is in `unit`; `max_ratio` bounds
/// measured / baseline.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    pub(crate) figure: String,
    pub(crate) unit: Unit,
    pub(crate) measured: Option<f64>,
    pub(crate) baseline: Option<f64>,
    pub(crate) baseline_what: String,
    pub(crate) max: Option<f64>,
    pub(crate) max_ratio: Option<f64>,
    /// Why the figure could not be measured.
    pub(crate) failure: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    Met,
    /// The bounds it broke.
    Missed(Vec<String>),
    /// Informational: no target.
    NoTarget,
    NotMeasured,
}

impl Row {
    pub(crate) fn failed(figure: &str, why: String) -> Row {
        Row {
            figure: figure.to_owned(),
            unit: Unit::Millis,
            measured: None,
            baseline: None,
            baseline_what: String::new(),
            max: None,
            max_ratio: None,
            failure: Some(why),
        }
    }

    pub(crate) fn ratio(&self) -> Option<f64> {
        match (self.measured, self.baseline) {
            (Some(m), Some(b)) if b > 0.0 => Some(m / b),
            _ => None,
        }
    }

    fn target(&self) -> String {
        let mut parts = Vec::new();
        if let Some(max) = self.max {
            parts.push(format!("≤ {}", self.unit.format(max)));
        }
        if let Some(r) = self.max_ratio {
            parts.push(format!("≤ {r}× baseline"));
        }
        if parts.is_empty() {
            "—".into()
        } else {
            parts.join(", ")
        }
    }

    pub(crate) fn verdict(&self) -> Verdict {
        let Some(measured) = self.measured else {
            return Verdict::NotMeasured;
        };
        if self.max.is_none() && self.max_ratio.is_none() {
            return Verdict::NoTarget;
        }
        let mut missed = Vec::new();
        if let Some(max) = self.max.filter(|max| measured > *max) {
            missed.push(format!("{} > {}", self.unit.format(measured), self.unit.format(max)));
        }
        if let Some(max_ratio) = self.max_ratio {
            match self.ratio() {
                Some(r) if r > max_ratio => missed.push(format!("{r:.2}× > {max_ratio}× baseline")),
                Some(_) => {}
                None => missed.push("no baseline to compare with".into()),
            }
        }
        if missed.is_empty() {
            Verdict::Met
        } else {
            Verdict::Missed(missed)
        }
    }

    fn cells(&self) -> [String; 6] {
        let value = |v: Option<f64>| v.map_or_else(|| "—".to_owned(), |v| self.unit.format(v));
        let verdict = match self.verdict() {
            Verdict::Met => "yes".to_owned(),
            Verdict::Missed(_) => "**NO**".to_owned(),
            Verdict::NoTarget => "—".to_owned(),
            Verdict::NotMeasured => "not measured".to_owned(),
        };
        [
            self.figure.clone(),
            value(self.measured),
            value(self.baseline),
            self.ratio().map_or_else(|| "—".to_owned(), |r| format!("{r:.2}×")),
            self.target(),
            verdict,
        ]
    }
}

const HEADER: [&str; 6] = ["figure", "measured", "baseline", "ratio", "target", "ok?"];

fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

pub(crate) fn render_text(rows: &[Row]) -> String {
    let cells: Vec<[String; 6]> = rows.iter().map(Row::cells).collect();
    let mut widths = HEADER.map(|h| h.chars().count());
    for row in &cells {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| -> String {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c}{}", " ".repeat(w - c.chars().count())))
            .collect();
        padded.join("  ").trim_end().to_owned()
    };
    let mut out = line(&HEADER.map(str::to_owned));
    for row in &cells {
        out.push('\n');
        out.push_str(&line(row));
    }
    out
}

pub(crate) fn render_markdown(rows: &[Row], facts: &str) -> String {
    let mut out = format!("{facts}\n\n| {} |\n|", HEADER.join(" | "));
    out.push_str(&" --- |".repeat(HEADER.len()));
    for row in rows {
        out.push_str(&format!("\n| {} |", row.cells().join(" | ")));
    }
    out.push_str("\n\nBaselines, measured in the same run:\n");
    for row in rows.iter().filter(|r| !r.baseline_what.is_empty()) {
        out.push_str(&format!("\n- {}: {}", row.figure, row.baseline_what));
    }
    let missed = missed_targets(rows);
    if !missed.is_empty() {
        out.push_str("\n\nMissed:\n");
        for m in &missed {
            out.push_str(&format!("\n- {m}"));
        }
    }
    out.push('\n');
    out
}

/// The last lines of a bench: every target met, or which were not.
pub(crate) fn print_missed(rows: &[Row]) {
    let missed = missed_targets(rows);
    if missed.is_empty() {
        println!("every target is met");
    } else {
        println!("TARGETS MISSED:");
        for line in &missed {
            println!("  {line}");
        }
    }
}

/// One line per figure that missed its target or was not measured.
fn missed_targets(rows: &[Row]) -> Vec<String> {
    rows.iter()
        .filter_map(|r| match r.verdict() {
            Verdict::Missed(why) => Some(format!("{}: {}", r.figure, why.join("; "))),
            Verdict::NotMeasured => Some(format!(
                "{}: not measured ({})",
                r.figure,
                r.failure.as_deref().and_then(|f| f.lines().next()).unwrap_or("")
            )),
            Verdict::Met | Verdict::NoTarget => None,
        })
        .collect()
}

/// `Measured <date> on <cpu>, N CPUs, X GB RAM, Linux …, podman …`.
fn machine_facts(sh: &Shell, bench: &Bench<'_>) -> String {
    let podman =
        capture(bench.podman().arg("--version")).map_or_else(|e| format!("(podman: {e:#})"), |v| v.trim().to_owned());
    format!("{}, {podman}. MB = 10⁶ bytes.", measured_on(sh))
}

/// `Measured <date> on <cpu>, N CPUs, X GB RAM, Linux …`.
pub(crate) fn measured_on(sh: &Shell) -> String {
    let date_format = "+%Y-%m-%d %H:%M UTC";
    let date =
        capture(cmd!(sh, "date -u {date_format}")).map_or_else(|e| format!("(date: {e:#})"), |d| d.trim().to_owned());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or_else(
            || "unknown memory".into(),
            |kib| format!("{:.1} GB RAM", kib * 1024.0 / 1e9),
        );
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".into(), |k| k.trim().to_owned());
    format!("Measured {date} on {cpu}, {cpus} CPUs, {memory}, Linux {kernel}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(measured: f64, baseline: f64, max: Option<f64>, max_ratio: Option<f64>) -> Row {
        Row {
            figure: "pass".into(),
            unit: Unit::Millis,
            measured: Some(measured),
            baseline: Some(baseline),
            baseline_what: "raw GET".into(),
            max,
            max_ratio,
            failure: None,
        }
    }

    #[test]
    fn median_of_odd_and_even_counts_and_of_nothing() {
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn a_row_meets_its_target_only_within_every_bound() {
        assert_eq!(row(30.0, 12.0, Some(150.0), Some(3.0)).verdict(), Verdict::Met);
        assert_eq!(
            row(40.0, 10.0, Some(150.0), Some(3.0)).verdict(),
            Verdict::Missed(vec!["4.00× > 3× baseline".into()])
        );
        assert_eq!(
            row(1500.0, 100.0, Some(1000.0), None).verdict(),
            Verdict::Missed(vec!["1.50 s > 1.00 s".into()])
        );
        assert_eq!(row(1.0, 0.0, None, None).verdict(), Verdict::NoTarget);
        assert_eq!(Row::failed("x", "boom".into()).verdict(), Verdict::NotMeasured);
    }

    #[test]
    fn cells_format_values_ratio_and_target() {
        let cells = row(24.0, 8.0, Some(150.0), Some(3.0)).cells();
        assert_eq!(
            cells,
            ["pass", "24.0 ms", "8.0 ms", "3.00×", "≤ 150.0 ms, ≤ 3× baseline", "yes"].map(String::from)
        );
        let bytes = Row {
            unit: Unit::Bytes,
            ..row(7_340_032.0, 32_969_312.0, Some(10e6), None)
        };
        assert_eq!(
            bytes.cells()[1..].to_vec(),
            ["7.3 MB", "33.0 MB", "0.22×", "≤ 10.0 MB", "yes"]
        );
    }

    #[test]
    fn text_table_aligns_columns_and_markdown_lists_misses() {
        let rows = [
            row(24.0, 8.0, Some(150.0), None),
            row(2000.0, 100.0, Some(1000.0), None),
        ];
        let text = render_text(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        let col = |l: &str| l.find("measured").or_else(|| l.find("24.0")).or_else(|| l.find("2.00"));
        assert_eq!(col(lines[0]), col(lines[1]));
        assert_eq!(col(lines[1]), col(lines[2]));

        let md = render_markdown(&rows, "Measured today.");
        assert!(md.starts_with("Measured today.\n\n| figure | measured | baseline | ratio | target | ok? |\n| --- |"));
        assert!(md.contains("| pass | 2.00 s | 100.0 ms | 20.00× | ≤ 1.00 s | **NO** |"));
        assert!(md.contains("Missed:\n\n- pass: 2.00 s > 1.00 s"));
        assert!(md.contains("- pass: raw GET"));
    }

    #[test]
    fn engine_timestamps_parse_with_nanoseconds_and_offsets() {
        let at = |s: &str| {
            parse_rfc3339(s)
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map(|d| (d.as_secs(), d.subsec_nanos()))
        };
        assert_eq!(at("1970-01-01T00:00:00Z"), Some((0, 0)));
        assert_eq!(at("2000-03-01T00:00:00Z"), Some((951_868_800, 0)));
        assert_eq!(at("2026-11-26T21:35:13.155781398Z"), Some((1_795_728_913, 155_781_398)));
        assert_eq!(at("2026-11-26T22:35:13.5+01:00"), Some((1_795_728_913, 500_000_000)));
        assert_eq!(at("2026-11-26T21:35:13-00:30"), Some((1_795_730_713, 0)));
        assert_eq!(at("0001-01-01T00:00:00Z"), None, "before 1970: podman's zero time");
        assert_eq!(at("yesterday"), None);
    }

    #[test]
    fn proc_fields_are_read_after_the_command_name() {
        let stat = "4242 (tokio (worker) 1) S 1 4242 4242 0 -1 4194560 100 0 0 0 37 5 0 0 20 0 9 0 123 456 789";
        assert_eq!(cpu_ticks(stat), Some(42));
        assert_eq!(cpu_ticks("garbage"), None);
        assert_eq!(vm_rss_kib("Name:\tx\nVmRSS:\t   9876 kB\n"), Some(9876));
        assert_eq!(vm_rss_kib("Name:\tx\n"), None);
    }

    #[test]
    fn chunked_answers_are_joined_and_plain_ones_kept() {
        let raw =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n[1,2\r\n2;x=y\r\n,3\r\n1\r\n]\r\n0\r\n\r\n";
        assert_eq!(parse_response(raw).expect("parses"), (200, b"[1,2,3]".to_vec()));
        let plain = b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(parse_response(plain).expect("parses"), (204, Vec::new()));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n9\r\nabc").is_err());
    }
}
