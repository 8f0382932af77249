//! `cargo xtask test`: start the services the integration tests need, run
//! `cargo test --workspace` against them, and tear everything down again,
//! also on failure or Ctrl-C.
//!
//! The tests read (see `agent/tests/common/mod.rs`), and
//! `target/test-env/env.json` repeats for humans:
//! - `ARCHY_TEST_ENGINE`: the Podman API socket;
//! - `ARCHY_TEST_REGISTRY`, `ARCHY_TEST_AUTH_REGISTRY`: `127.0.0.1:PORT` of
//!   the registry without and with basic auth (`ARCHY_TEST_AUTH_USER`,
//!   `ARCHY_TEST_AUTH_PASSWORD`);
//! - `ARCHY_TEST_IMAGE`, `ARCHY_TEST_IMAGE_V2`: busybox images on the plain
//!   registry, `host/archy-test/busybox:vN@sha256:…`; `ARCHY_TEST_AUTH_IMAGE`:
//!   v1 on the auth registry, same digest;
//! - `ARCHY_TEST_PODMAN_ARGS` (space separated), `ARCHY_TEST_CONTAINERS_CONF`,
//!   `ARCHY_TEST_REGISTRIES_CONF`, `ARCHY_TEST_STORAGE_CONF`: what the
//!   `podman` CLI needs to see the service's storage;
//! - `ARCHY_TEST_REGISTRY_DATA`: the plain registry's storage directory;
//! - `ARCHY_TEST_ROOTLESS_*`: the rootless Podman service (`rootless.rs`)
//!   and its user: `ENGINE` (socket), `USER`, `UID`, `GID`, `SUBUID` and
//!   `SUBGID` (`start:count`), `HOME` and `RUNTIME_DIR` (the environment its
//!   `podman` needs), `PODMAN_ARGS`, and `WORK`, a folder the user owns.
//!
//! Everything lives in `$TMPDIR/archy-test-<pid>`. Not under target/: the
//! API socket's path must fit in a unix socket address (108 bytes), and a CI
//! checkout can sit deep in the file system.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use xshell::{cmd, Shell};

use crate::harness::podman::Podman;
use crate::harness::procs::{self, bail_if_interrupted, capture, Service, STOP_GRACE};
use crate::harness::registries::{Credentials, Registry};
use crate::harness::rootless::{self, HostChanges, RootlessPodman};
use crate::harness::test_images::{self, Published};
use crate::pipeline::flags;
use crate::pipeline::rootfs;
use crate::tools;

/// The release agent for the e2e, built in the background by
/// [`rootfs::agent_build_cmd`] into a cargo target folder of its own
/// (`target/e2e-agent`: cargo locks a target folder for one build at a
/// time, and `cargo test` holds `target/`). Its output goes to a log, shown
/// when it fails. Dropped unfinished (a failed or interrupted run), it is
/// killed.
struct AgentBuild {
    child: Child,
    log: PathBuf,
    binary: PathBuf,
    started: Instant,
}

impl AgentBuild {
    fn start(root: &Path, sh: &Shell) -> anyhow::Result<AgentBuild> {
        let target = flags::target_dir(root).join(AGENT_TARGET_SUBDIR);
        fs::create_dir_all(&target).with_context(|| format!("creating {}", target.display()))?;
        let log = target.join("build.log");
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone().with_context(|| format!("opening {}", log.display()))?;
        let mut command = Command::from(rootfs::agent_build_cmd(root, sh, &target));
        // Its own process group: Ctrl-C reaches it only through Drop.
        command.process_group(0).stdin(Stdio::null()).stdout(out).stderr(err);
        let child = command.spawn().context("starting cargo build --release of the agent")?;
        eprintln!(
            "xtask: building the e2e's release agent in the background (log: {})",
            log.display()
        );
        Ok(AgentBuild {
            child,
            log,
            binary: rootfs::agent_binary(&target),
            started: Instant::now(),
        })
    }

    /// Waits for the build; the binary, or the log's end in the error.
    fn finish(mut self) -> anyhow::Result<PathBuf> {
        let status = self.child.wait().context("waiting for the agent's release build")?;
        if !status.success() {
            let log = fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log
                .lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            bail!(
                "the e2e's release agent build failed ({status}); the end of {}:\n{}",
                self.log.display(),
                tail.join("\n")
            );
        }
        eprintln!(
            "xtask: the e2e's release agent was ready {:.1}s after it started",
            self.started.elapsed().as_secs_f64()
        );
        Ok(self.binary.clone())
    }
}

impl Drop for AgentBuild {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let pgid = Pid::from_raw(self.child.id() as i32);
            if let Err(e) = killpg(pgid, Signal::SIGKILL) {
                eprintln!("xtask: could not stop the agent's release build (pid {pgid}): {e}");
            }
            if let Err(e) = self.child.wait() {
                eprintln!("xtask: waiting for the agent's release build (pid {pgid}): {e}");
            }
        }
    }
}

/// How often teardown tries `podman system reset` before reporting it.
const RESET_ATTEMPTS: u32 = 3;
const RESET_RETRY_PAUSE: Duration = Duration::from_millis(300);
/// How long one `podman system reset` may take before it is killed.
const RESET_TIMEOUT: Duration = Duration::from_secs(90);

enum Reset {
    Done,
    HungAndKilled,
}

/// Runs the reset, killing it after [`RESET_TIMEOUT`].
fn reset_within(cmd: xshell::Cmd<'_>) -> anyhow::Result<Reset> {
    let shown = cmd.to_string();
    let mut command = std::process::Command::from(cmd);
    command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = command.spawn().with_context(|| format!("running `{shown}`"))?;
    let started = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().with_context(|| format!("waiting for `{shown}`"))? {
            if status.success() {
                return Ok(Reset::Done);
            }
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            bail!("`{shown}` failed ({status}): {}", err.trim());
        }
        if started.elapsed() > RESET_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(Reset::HungAndKilled);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub const DIR_PREFIX: &str = "archy-test-";
/// Cargo features the tests are built with: test-only code paths.
pub const TEST_FEATURES: &str = "archy-agent/failpoints";
/// The e2e agent's own cargo target folder, under target/.
const AGENT_TARGET_SUBDIR: &str = "e2e-agent";
/// Fixed test values: the registry only listens on loopback for one run.
const AUTH_USER: &str = "archy";
const AUTH_PASSWORD: &str = "archy-test-password";

pub fn run(root: &Path, cargo_args: &[String]) -> anyhow::Result<ExitCode> {
    let sh = Shell::new().context("creating a shell")?;
    let started = Instant::now();
    // The CI workflows first: seconds, and a finding fails the run before
    // the services start. A run narrowed with cargo arguments leaves it out.
    if cargo_args.is_empty() {
        eprintln!("xtask: step zizmor: the CI workflows, offline");
        crate::harness::zizmor::check(root).context("step zizmor (the CI workflows in .github/workflows)")?;
    } else {
        eprintln!("xtask: zizmor not run: cargo arguments narrow this run");
    }
    let (mut env, vars) = start()?;
    eprintln!("xtask: services ready in {:.1}s", started.elapsed().as_secs_f64());
    let json = write_env_json(root, &vars)?;
    eprintln!("xtask: test environment written to {}", json.display());

    // The whole run also boots the node (`cargo xtask e2e`), against the
    // same registries; a run narrowed with cargo arguments is a developer's
    // loop and leaves it out, saying so. The e2e's release agent compiles
    // meanwhile: the tests mostly wait on Podman, the registries and
    // Debian's archive, and the build would otherwise hold the boots back
    // by minutes.
    let whole_run = cargo_args.is_empty();
    let agent_build = whole_run.then(|| AgentBuild::start(root, &sh)).transpose()?;

    let tests_started = Instant::now();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // The agent's fail-points (an upgrade killed at each journaled step,
    // agent/tests/upgrade_journal.rs) exist in this build only; the e2e's
    // and the image's agent are built without them (`agent_build_cmd`).
    let test = cmd!(
        sh,
        "{cargo} test --workspace --features {TEST_FEATURES} {cargo_args...}"
    )
    .envs(&vars);
    eprintln!("$ {test}");
    let status = procs::run_forwarding_interrupts(Command::from(test), "cargo test");
    let tests_took = tests_started.elapsed();

    // A run whose cargo tests failed has failed already; the boots would
    // take most of its time.
    let tests_passed = matches!(&status, Ok(s) if s.success());
    let e2e = match agent_build {
        None => {
            eprintln!("xtask: e2e not run: cargo arguments narrow this run (run `cargo xtask e2e` for it)");
            None
        }
        Some(_) if !tests_passed => {
            eprintln!("xtask: e2e not run: the cargo tests failed (run `cargo xtask e2e` for it alone)");
            None
        }
        Some(build) => {
            let e2e_started = Instant::now();
            let result = build.finish().and_then(|agent| {
                let args = crate::harness::e2e::E2eArgs {
                    agent: Some(agent),
                    ..Default::default()
                };
                crate::harness::e2e::check(root, &vars, &args)
            });
            eprintln!("xtask: e2e took {:.1}s", e2e_started.elapsed().as_secs_f64());
            Some(result)
        }
    };

    let teardown_started = Instant::now();
    let problems = env.teardown();
    eprintln!(
        "xtask: tests took {:.1}s, teardown {:.1}s, all {:.1}s",
        tests_took.as_secs_f64(),
        teardown_started.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    let status = status?;
    bail_if_interrupted()?;
    if let Some(Err(e)) = e2e {
        eprintln!("error: {e:#}");
        return Ok(ExitCode::FAILURE);
    }
    if !problems.is_empty() {
        bail!("teardown was not clean:\n  {}", problems.join("\n  "));
    }
    Ok(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        None => {
            eprintln!("xtask: cargo test was killed ({status})");
            ExitCode::FAILURE
        }
    })
}

/// Installs missing tools, clears what killed runs left, and starts every
/// service in `$TMPDIR/archy-test-<pid>`. Returns the guard (dropping it
/// tears the services down) and the `ARCHY_TEST_*` variables. Also what
/// `cargo xtask bench` runs against.
pub fn start() -> anyhow::Result<(TestEnv, BTreeMap<String, String>)> {
    let sh = Shell::new().context("creating a shell")?;
    tools::ensure(&sh, tools::TEST_STAGE)?;
    procs::install_interrupt_handler()?;
    clean_up_stale_runs();
    let dir = std::env::temp_dir().join(format!("{DIR_PREFIX}{}", std::process::id()));
    let mut env = TestEnv::create(&dir)?;
    let vars = env.start()?;
    Ok((env, vars))
}

/// The services of one run, and the guard that stops them: dropping a
/// `TestEnv` that was not torn down explicitly tears it down.
pub struct TestEnv {
    dir: PathBuf,
    sh: Shell,
    podman: Podman,
    podman_service: Option<Service>,
    /// The rootless Podman; `None` until its user is known.
    rootless: Option<RootlessPodman>,
    rootless_service: Option<Service>,
    registries: Vec<Registry>,
    torn_down: bool,
}

impl TestEnv {
    fn create(dir: &Path) -> anyhow::Result<TestEnv> {
        if dir.to_string_lossy().chars().any(char::is_whitespace) {
            // ARCHY_TEST_PODMAN_ARGS is a space-separated list of paths.
            bail!(
                "the temporary directory {} contains whitespace; set TMPDIR to a simpler path",
                dir.display()
            );
        }
        if dir.exists() {
            // Left by an earlier process that had our pid.
            TestEnv::adopt(dir)?.teardown();
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating the test directory {}", dir.display()))?;
        TestEnv::adopt(dir)
    }

    /// A guard for a directory whose services, if any, we did not start.
    fn adopt(dir: &Path) -> anyhow::Result<TestEnv> {
        // A run that got as far as the rootless service left its user.
        let rootless = rootless::read_user().ok().map(|user| RootlessPodman::at(dir, user));
        Ok(TestEnv {
            dir: dir.to_path_buf(),
            sh: Shell::new().context("creating a shell")?,
            podman: Podman::at(dir),
            podman_service: None,
            rootless,
            rootless_service: None,
            registries: Vec::new(),
            torn_down: false,
        })
    }

    /// Starts registries, the podman service and the images; returns the
    /// variables the tests read.
    fn start(&mut self) -> anyhow::Result<BTreeMap<String, String>> {
        let logs = self.dir.join("logs");
        std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;

        let plain = Registry::start(
            &self.sh,
            "plain",
            &self.dir.join("registry-plain"),
            None,
            &logs.join("registry-plain.log"),
        )?;
        self.registries.push(plain);
        bail_if_interrupted()?;
        let creds = Credentials {
            user: AUTH_USER.to_owned(),
            password: AUTH_PASSWORD.to_owned(),
        };
        let auth = Registry::start(
            &self.sh,
            "auth",
            &self.dir.join("registry-auth"),
            Some(creds.clone()),
            &logs.join("registry-auth.log"),
        )?;
        self.registries.push(auth);
        bail_if_interrupted()?;

        let hosts: Vec<String> = self.registries.iter().map(|r| r.host.clone()).collect();
        self.podman.write_config(&hosts)?;
        self.podman_service = Some(self.podman.start_service(&self.sh, &logs.join("podman-service.log"))?);
        bail_if_interrupted()?;
        self.start_rootless(&hosts, &logs)?;
        bail_if_interrupted()?;

        let [plain, auth] = &self.registries[..] else {
            bail!("expected two registries, have {}", self.registries.len());
        };
        let images = test_images::build_and_publish(&self.sh, &self.podman, &self.dir.join("images"), plain, auth)?;
        let mut vars = self.vars(plain, auth, &creds, &images);
        if let Some(rootless) = &self.rootless {
            vars.extend(rootless.vars());
        }
        Ok(vars)
    }

    /// The rootless service: the machine's settings it needs (recorded
    /// first, put back at teardown), its user, its configuration and the
    /// service. It pulls the same test images from the same registries.
    fn start_rootless(&mut self, insecure_registries: &[String], logs: &Path) -> anyhow::Result<()> {
        rootless::check_host()?;
        HostChanges::apply(&self.sh, &self.dir)?;
        let user = rootless::ensure_user(&self.sh)?;
        let podman = RootlessPodman::at(&self.dir, user);
        self.rootless = Some(podman.clone());
        podman.write_config(insecure_registries)?;
        self.rootless_service = Some(podman.start_service(&self.sh, &logs.join("rootless-podman-service.log"))?);
        Ok(())
    }

    fn vars(
        &self,
        plain: &Registry,
        auth: &Registry,
        creds: &Credentials,
        images: &Published,
    ) -> BTreeMap<String, String> {
        let path = |p: &Path| p.display().to_string();
        BTreeMap::from([
            ("ARCHY_TEST_ENGINE".into(), path(&self.podman.socket)),
            ("ARCHY_TEST_REGISTRY".into(), plain.host.clone()),
            ("ARCHY_TEST_AUTH_REGISTRY".into(), auth.host.clone()),
            ("ARCHY_TEST_AUTH_USER".into(), creds.user.clone()),
            ("ARCHY_TEST_AUTH_PASSWORD".into(), creds.password.clone()),
            ("ARCHY_TEST_IMAGE".into(), images.v1.to_string()),
            ("ARCHY_TEST_IMAGE_V2".into(), images.v2.to_string()),
            ("ARCHY_TEST_AUTH_IMAGE".into(), images.v1_auth.to_string()),
            ("ARCHY_TEST_PODMAN_ARGS".into(), self.podman.global_args().join(" ")),
            ("ARCHY_TEST_CONTAINERS_CONF".into(), path(&self.podman.containers_conf)),
            ("ARCHY_TEST_REGISTRIES_CONF".into(), path(&self.podman.registries_conf)),
            ("ARCHY_TEST_STORAGE_CONF".into(), path(&self.podman.storage_conf)),
            ("ARCHY_TEST_REGISTRY_DATA".into(), path(&plain.data_dir)),
        ])
    }

    /// The run's directory; everything below it goes at teardown.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The private Podman, for its CLI.
    pub fn podman(&self) -> &Podman {
        &self.podman
    }

    /// The pid of the `podman system service` process, once started.
    pub fn podman_service_pid(&self) -> Option<u32> {
        self.podman_service.as_ref().map(Service::pid)
    }

    /// Stops everything and deletes the directory. Returns what was not
    /// clean: a process that had to be killed, a mount left behind, a step
    /// that failed. Never gives up half-way.
    pub fn teardown(&mut self) -> Vec<String> {
        self.torn_down = true;
        let mut problems = Vec::new();
        if let Some(rootless) = &self.rootless {
            problems.extend(rootless.clean(&self.sh));
        }
        let storage_exists = self.podman.root.exists();
        if storage_exists && self.podman.containers_conf.exists() {
            if let Err(e) = capture(
                self.podman
                    .cmd(&self.sh)
                    .args(crate::harness::podman::REMOVE_ALL_CONTAINERS),
            ) {
                problems.push(format!("{e:#}"));
            }
        }
        let services = self
            .podman_service
            .iter_mut()
            .chain(self.rootless_service.iter_mut())
            .chain(self.registries.iter_mut().map(|r| &mut r.service));
        for service in services {
            if let Err(e) = service.stop(STOP_GRACE) {
                problems.push(format!("stopping {}: {e:#}", service.name()));
            }
        }
        // Conmon and podman's cleanup helpers run outside our process groups.
        problems.extend(procs::reap_leftovers(&self.dir));
        if let Some(rootless) = &self.rootless {
            problems.extend(rootless.reset(&self.sh));
        }
        if storage_exists && self.podman.containers_conf.exists() {
            // Podman 4.3 logs a "system reset" event into the tmp folder it
            // is deleting, so the reset can trip over its own file
            // ("unlinkat …/tmp: directory not empty"). The reset is
            // idempotent: try again before calling it a failure.
            let mut last = None;
            for attempt in 0..RESET_ATTEMPTS {
                if attempt > 0 {
                    std::thread::sleep(RESET_RETRY_PAUSE);
                }
                match reset_within(self.podman.cmd(&self.sh).args(crate::harness::podman::RESET_STORAGE)) {
                    Ok(Reset::Done) => {
                        last = None;
                        break;
                    }
                    // A reset that hangs (as one did on storage a test had
                    // edited) fails the run in bounded time, never at CI's
                    // limit. The folder is removed below all the same.
                    Ok(Reset::HungAndKilled) => {
                        last = Some(anyhow::anyhow!(
                            "`podman system reset` did not end within {}s and was killed",
                            RESET_TIMEOUT.as_secs()
                        ));
                        break;
                    }
                    Err(e) => last = Some(e),
                }
            }
            if let Some(e) = last {
                problems.push(format!("{e:#}"));
            }
        }
        problems.extend(HostChanges::restore(&self.sh, &self.dir));
        for mount in procs::mounts_under(&self.dir) {
            problems.push(format!("unmounting leftover mount {}", mount.display()));
            if let Err(e) = capture(cmd!(self.sh, "umount {mount}")) {
                problems.push(format!("{e:#}"));
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                problems.push(format!("removing {}: {e}", self.dir.display()));
            }
        }
        problems
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if self.torn_down {
            return;
        }
        eprintln!("xtask: tearing down the test services in {}", self.dir.display());
        for problem in self.teardown() {
            eprintln!("xtask: teardown: {problem}");
        }
    }
}

/// Tears down what runs killed outright (SIGKILL, a lost machine) left in
/// the temporary directory: their pid is gone, their services may not be.
fn clean_up_stale_runs() {
    let tmp = std::env::temp_dir();
    let Ok(entries) = std::fs::read_dir(&tmp) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(DIR_PREFIX))
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if procs::pid_alive(pid) {
            continue;
        }
        let dir = entry.path();
        eprintln!(
            "xtask: cleaning up {} left by an earlier run that did not finish",
            dir.display()
        );
        match TestEnv::adopt(&dir) {
            Ok(mut stale) => {
                for note in stale.teardown() {
                    eprintln!("xtask:   {note}");
                }
            }
            Err(e) => eprintln!("xtask:   {e:#}"),
        }
    }
}

fn write_env_json(root: &Path, vars: &BTreeMap<String, String>) -> anyhow::Result<PathBuf> {
    let target = flags::target_dir(root);
    let dir = target.join("test-env");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("env.json");
    let text = serde_json::to_string_pretty(vars).context("serialising the test environment")?;
    std::fs::write(&path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}
