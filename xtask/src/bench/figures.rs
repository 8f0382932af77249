//! The four measurements, each beside its baseline from the same run: a no-op
//! pass, kill-to-start, idle use and image import.

use std::fs::File;
use std::io::Read as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context as _};
use archy_agent::images::{ImageLock, LockEntry};
use archy_agent::manifest::Digest;
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use xshell::cmd;

use super::{
    file_size, Bench, Node, Row, Unit, API, APP_COMMAND, BETWEEN_KILLS, BOOT, BOOT_EVENTS_ONLY, HANGING_APP, IDLE_APPS,
    IMAGES_IMPORT, IMPORT_APP, IMPORT_PAYLOAD_BYTES, IMPORT_REFERENCE, IMPORT_RUNS, INSTALL_TIMEOUT, KILL_REFERENCE,
    KILL_RUNS, KILL_WHILE_HANGING, LIBPOD_API, NOOP_APPS, RECONCILE_ONCE, RESTART_TIMEOUT, ROOT_OWNED_TAR_FLAGS, SLEEP,
    STATE_POLL,
};
use crate::bench::engine::{clock_ticks, get_json, parse_rfc3339, post, request, request_with_body, ProcSample, Usage};
use crate::bench::table::median;
use crate::harness::procs::{bail_if_interrupted, capture, Service, STOP_GRACE};
use crate::pipeline::images::lock;

impl Bench<'_> {
    /// Figure 2: the median `duration_ms` of `reconcile --once` with 50
    /// running apps, against a raw listing on the same socket.
    pub(super) fn noop_pass(&self) -> anyhow::Result<Vec<Row>> {
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
    pub(super) fn kill_to_start(&self) -> anyhow::Result<Vec<Row>> {
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
        let plain = median(&measured);
        let hanging = self
            .kill_while_a_pull_hangs(plain)
            .unwrap_or_else(|e| Row::failed(KILL_WHILE_HANGING, format!("{e:#}")));
        Ok(vec![
            Row {
                figure: "container killed → started again".into(),
                unit: Unit::Millis,
                measured: plain,
                baseline: median(&start_ms),
                baseline_what: format!(
                    "raw POST {API}/containers/{{name}}/start of a stopped container (not the agent's), \
                     between the kills, median of {KILL_RUNS}"
                ),
                max: Some(1000.0),
                max_ratio: None,
                failure: None,
            },
            hanging,
        ])
    }

    /// The same kills while another app's pull hangs (its registry, a
    /// listener of this process, accepts and never answers): one slow app
    /// must not hold up another's restart. Each kill is made only while the
    /// agent's `list` shows that app's install in flight.
    fn kill_while_a_pull_hangs(&self, plain: Option<f64>) -> anyhow::Result<Row> {
        let node = self.node("kill-hang")?;
        let names = self.write_apps(&node, "bench-hangkill", KILL_RUNS)?;
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the silent registry")?;
        let port = listener.local_addr().context("the silent registry's address")?.port();
        // Accepts and keeps every connection, never answers; the thread
        // ends with the bench.
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for conn in listener.incoming().flatten() {
                held.push(conn);
            }
        });
        let dir = node.apps.join(HANGING_APP);
        create_dir(&dir)?;
        let path = dir.join(archy_agent::manifest::MANIFEST_FILE);
        // A digest no store has: the pull must reach the silent registry.
        let text = format!(
            "id: {HANGING_APP}\nname: {HANGING_APP}\nversion: \"1.0\"\n\
             image: 127.0.0.1:{port}/bench/silent@sha256:{}\ncommand: {APP_COMMAND}\n",
            "5a".repeat(32)
        );
        std::fs::write(&path, text).with_context(|| format!("writing the manifest {}", path.display()))?;
        let mut agent = self.spawn_agent(&node, BOOT_EVENTS_ONLY)?;
        let runs = (|| {
            self.wait_all_running(&mut agent, &names)?;
            let mut took = Vec::new();
            for name in &names {
                bail_if_interrupted()?;
                self.check_in_flight(&node, HANGING_APP)?;
                took.push(self.kill_once(name)?);
                agent.check_running()?;
                sleep_checked(BETWEEN_KILLS)?;
            }
            // Still hanging after the last restart: every kill came during it.
            self.check_in_flight(&node, HANGING_APP)?;
            anyhow::Ok(took)
        })();
        // Its install is still in flight: the agent waits for it, then is killed.
        agent
            .stop(STOP_GRACE)
            .with_context(|| format!("stopping {}", agent.name()))?;
        let took = runs?;
        Ok(Row {
            figure: KILL_WHILE_HANGING.into(),
            unit: Unit::Millis,
            measured: median(&took),
            baseline: plain,
            baseline_what: "container killed → started again (above), same run".into(),
            max: Some(1000.0),
            max_ratio: Some(3.0),
            failure: None,
        })
    }

    /// Fails unless the agent's `list` (through its control socket) shows
    /// `app`'s action in flight.
    fn check_in_flight(&self, node: &Node, app: &str) -> anyhow::Result<()> {
        let out = capture(self.agent(node, &["list", "--json"])).context("archy-agent list --json")?;
        let list: Value = serde_json::from_str(&out).with_context(|| format!("`list --json` printed {out:?}"))?;
        let entry = list
            .as_array()
            .and_then(|l| l.iter().find(|s| s["app"] == app))
            .with_context(|| format!("{app} is not in the agent's list: {out}"))?;
        if entry["in_flight"].is_null() {
            bail!("{app}'s pull was not in flight any more (the measurement needs it hanging): {entry}");
        }
        Ok(())
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
            took.push(self.kill_once(name)?);
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

    /// Kills `name` and returns the milliseconds from the kill to the
    /// engine's `StartedAt` of its new run.
    fn kill_once(&self, name: &str) -> anyhow::Result<f64> {
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
        Ok(millis(started.duration_since(killed_at).unwrap_or_default()))
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
    pub(super) fn idle(&self) -> anyhow::Result<Vec<Row>> {
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
    pub(super) fn import(&self) -> anyhow::Result<Vec<Row>> {
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
        capture(cmd!(self.sh, "tar {ROOT_OWNED_TAR_FLAGS...} -C {rootfs} -cf {layer} ."))
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
        let digest: Digest = format!("sha256:{id}")
            .parse()
            .with_context(|| format!("podman gave {IMPORT_REFERENCE} the image ID {id:?}, not a sha256"))?;
        let lock = ImageLock::new(vec![LockEntry {
            app: IMPORT_APP.to_owned(),
            reference: IMPORT_REFERENCE.to_owned(),
            manifest_digest: digest.clone(),
            config_digest: digest,
            archive: format!("{IMPORT_APP}.tar"),
            archive_sha256: sha256,
            size,
        }]);
        lock::write(&lock, &node.images).context("writing the bench's image lock")?;
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
pub(super) struct PassJson {
    duration_ms: u64,
    apps: Vec<AppJson>,
    error: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(super) struct AppJson {
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
pub(super) fn check_imported(json: &str) -> anyhow::Result<()> {
    let report: Value = serde_json::from_str(json).with_context(|| format!("images import printed {json}"))?;
    let outcome = report["entries"][0]["outcome"].as_str().unwrap_or("");
    if outcome != "imported" {
        bail!("images import did not import the archive: {json}");
    }
    Ok(())
}

pub(super) struct ContainerState {
    running: bool,
    started_at: String,
}

/// Polls `done` every 10 ms until true, or fails after `timeout`.
pub(super) fn wait_for(
    timeout: Duration,
    what: &str,
    mut done: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
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

pub(super) fn sleep_checked(total: Duration) -> anyhow::Result<()> {
    let until = Instant::now() + total;
    while Instant::now() < until {
        bail_if_interrupted()?;
        sleep(Duration::from_millis(100).min(until.saturating_duration_since(Instant::now())));
    }
    Ok(())
}

pub(super) fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub(super) fn create_dir(path: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))
}

pub(super) fn hash_file(path: &Path) -> anyhow::Result<(u64, String)> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let size = std::io::copy(&mut file, &mut hasher).with_context(|| format!("hashing {}", path.display()))?;
    Ok((size, format!("{:x}", hasher.finalize())))
}
