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
//! | the same, while another app's pull hangs (its registry never answers) | the kill → started again above, same run |
//! | RSS and CPU of `boot` managing 20 apps, idle | the podman API service over the same window |
//! | `images import` of a 100 MB archive | `podman load -i` of the same file |
//!
//! The table goes to the terminal and, as markdown with the date and the
//! machine, to `target/bench/report.md`. Missed targets are reported, not
//! fatal: the exit status is 0 unless a measurement could not be made.

mod engine;
mod figures;
pub mod iso;
pub mod table;

use engine::get_json;
use figures::{create_dir, sleep_checked};
use table::{measured_on, print_missed, render_markdown, render_text, Row, Unit};

use std::collections::BTreeSet;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use archy_agent::manifest::{self, LoadOptions, Naming, PinnedImage};

use xshell::{cmd, Cmd, Shell};

use crate::harness::podman::REMOVE_ALL_CONTAINERS;
use crate::harness::procs::{bail_if_interrupted, capture, Service};
use crate::harness::test_env::{self, TestEnv};
use crate::harness::test_images::ROOT_OWNED_TAR_FLAGS;
use crate::pipeline::flags::target_dir;

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
/// The app whose registry accepts and never answers, in the kill-while-hanging run.
const HANGING_APP: &str = "bench-hang";
const KILL_WHILE_HANGING: &str = "container killed → started again, while another app's pull hangs";
/// The container the kill baseline starts by hand.
const KILL_REFERENCE: &str = "bench-kill-reference";
/// Long enough that only engine events can explain a quick restart.
const BOOT_EVENTS_ONLY: &[&str] = &["boot", "--resync", "3600"];
const BOOT: &[&str] = &["boot"];
const RECONCILE_ONCE: &[&str] = &["reconcile", "--once", "--json"];
const IMAGES_IMPORT: &[&str] = &["images", "import", "--json"];
const PODMAN_PULL: &[&str] = &["pull", "--quiet", "--tls-verify=false"];

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
            (
                &["container killed → started again", KILL_WHILE_HANGING],
                Self::kill_to_start,
            ),
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
}
/// `Measured <date> on <cpu>, N CPUs, X GB RAM, Linux …, podman …`.
fn machine_facts(sh: &Shell, bench: &Bench<'_>) -> String {
    let podman =
        capture(bench.podman().arg("--version")).map_or_else(|e| format!("(podman: {e:#})"), |v| v.trim().to_owned());
    format!("{}, {podman}. MB = 10⁶ bytes.", measured_on(sh))
}
