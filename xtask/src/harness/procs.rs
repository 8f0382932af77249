//! Background services, interruption, and finding what a run left behind.
//!
//! Each service runs in a process group of its own so that a Ctrl-C on the
//! terminal reaches only xtask (and `cargo test`), never the services
//! directly: xtask then tears them down in order instead of leaving podman's
//! storage half-unmounted.

use std::fs::File;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use xshell::Cmd;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

const POLL: Duration = Duration::from_millis(100);
const LOG_TAIL_BYTES: u64 = 4000;

/// After this, SIGTERM becomes SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// Catches SIGINT, SIGTERM and SIGHUP so that the guard's teardown runs
/// instead of the default of dying on the spot.
pub fn install_interrupt_handler() -> anyhow::Result<()> {
    ctrlc::set_handler(|| {
        if !INTERRUPTED.swap(true, Ordering::SeqCst) {
            eprintln!("xtask: interrupted; stopping the tests and tearing the services down");
        }
    })
    .context("installing the interrupt handler")
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

pub fn bail_if_interrupted() -> anyhow::Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// A long-running child in its own process group, its output in a log file.
#[derive(Debug)]
pub struct Service {
    name: String,
    child: Child,
    log: PathBuf,
    exited: bool,
}

impl Service {
    pub fn spawn(name: &str, mut command: Command, log: &Path) -> anyhow::Result<Service> {
        let out = File::create(log).with_context(|| format!("creating the log file {}", log.display()))?;
        let err = out
            .try_clone()
            .with_context(|| format!("duplicating the log file {}", log.display()))?;
        command.stdin(Stdio::null()).stdout(out).stderr(err).process_group(0);
        let child = command
            .spawn()
            .with_context(|| format!("starting {name}: {command:?}"))?;
        Ok(Service {
            name: name.to_owned(),
            child,
            log: log.to_path_buf(),
            exited: false,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The child's pid (also its process group's id).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn pgid(&self) -> Pid {
        // process_group(0) made the child the leader of a group named after it.
        Pid::from_raw(self.child.id() as i32)
    }

    /// Fails, quoting the end of the log, if the service has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => {
                self.exited = true;
                bail!(
                    "{} exited early ({status}); end of {}:\n{}",
                    self.name,
                    self.log.display(),
                    self.log_tail()
                )
            }
            Err(e) => Err(e).with_context(|| format!("checking on {}", self.name)),
        }
    }

    /// Polls `ready` until it answers true, the service dies, the run is
    /// interrupted, or `timeout` passes.
    pub fn wait_ready(&mut self, what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            bail_if_interrupted()?;
            self.check_running()?;
            if ready() {
                return Ok(());
            }
            if start.elapsed() > timeout {
                bail!(
                    "{} did not answer {what} within {timeout:?}; end of {}:\n{}",
                    self.name,
                    self.log.display(),
                    self.log_tail()
                );
            }
            sleep(POLL);
        }
    }

    pub fn log_tail(&self) -> String {
        let mut text = String::new();
        let read = File::open(&self.log).and_then(|mut f| {
            let len = f.metadata()?.len();
            f.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)))?;
            f.read_to_string(&mut text)
        });
        match read {
            Ok(_) => text,
            Err(e) => format!("(cannot read {}: {e})", self.log.display()),
        }
    }

    /// SIGTERM to the whole group, SIGKILL after `grace`; reaps the child.
    pub fn stop(&mut self, grace: Duration) -> anyhow::Result<()> {
        if self.exited {
            return Ok(());
        }
        let pgid = self.pgid();
        // ESRCH: the group is already gone, which is what we want.
        let _ = killpg(pgid, Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => sleep(POLL),
                Ok(None) => {
                    eprintln!("xtask: {} ignored SIGTERM for {grace:?}; killing it", self.name);
                    let _ = killpg(pgid, Signal::SIGKILL);
                    self.child
                        .wait()
                        .with_context(|| format!("waiting for {} to die", self.name))?;
                    break;
                }
                Err(e) => return Err(e).with_context(|| format!("waiting for {} to stop", self.name)),
            }
        }
        self.exited = true;
        // Whatever else the leader left in its group goes too.
        let _ = killpg(pgid, Signal::SIGKILL);
        Ok(())
    }
}

/// Runs a short command without echoing it; its stdout is the result, and
/// on failure the error quotes its stderr (which is otherwise dropped, to
/// keep podman's progress chatter out of the test output).
pub fn capture(cmd: Cmd<'_>) -> anyhow::Result<String> {
    let shown = cmd.to_string();
    let output = cmd
        .quiet()
        .ignore_status()
        .output()
        .with_context(|| format!("running `{shown}`"))?;
    if !output.status.success() {
        bail!(
            "`{shown}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs `command` in its own process group and waits for it, passing an
/// interruption on as SIGINT so that `cargo test` stops its test binaries too.
pub fn run_forwarding_interrupts(mut command: Command, what: &str) -> anyhow::Result<std::process::ExitStatus> {
    command.process_group(0);
    let mut child = command.spawn().with_context(|| format!("starting {what}"))?;
    let pgid = Pid::from_raw(child.id() as i32);
    let mut interrupted_at: Option<Instant> = None;
    loop {
        if let Some(status) = child.try_wait().with_context(|| format!("waiting for {what}"))? {
            return Ok(status);
        }
        match interrupted_at {
            None if interrupted() => {
                let _ = killpg(pgid, Signal::SIGINT);
                interrupted_at = Some(Instant::now());
            }
            Some(at) if at.elapsed() > STOP_GRACE => {
                let _ = killpg(pgid, Signal::SIGKILL);
            }
            _ => {}
        }
        sleep(POLL);
    }
}

/// Processes whose command line names a path inside `dir`: conmon, the
/// podman service and registries started for it, `podman container
/// cleanup`, aardvark-dns. Conmon double-forks out of every process group,
/// so this is the only reliable way to find it.
pub fn processes_using(dir: &Path) -> Vec<(Pid, String)> {
    let needle = format!("{}/", dir.display());
    let exact = dir.display().to_string();
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.filter_map(Result::ok) {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        // Processes vanish while we look; a failed read means gone.
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = raw
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.iter().any(|a| a.contains(&needle) || a.ends_with(&exact)) {
            found.push((Pid::from_raw(pid as i32), args.join(" ")));
        }
    }
    found
}

/// Waits briefly for processes tied to `dir` to exit on their own, then
/// terminates them. Returns a line for each one that had to be killed.
pub fn reap_leftovers(dir: &Path) -> Vec<String> {
    let settle = Instant::now() + Duration::from_secs(3);
    while Instant::now() < settle && !processes_using(dir).is_empty() {
        sleep(POLL);
    }
    let leftovers = processes_using(dir);
    if leftovers.is_empty() {
        return Vec::new();
    }
    for (pid, _) in &leftovers {
        let _ = kill(*pid, Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline && !processes_using(dir).is_empty() {
        sleep(POLL);
    }
    for (pid, _) in processes_using(dir) {
        let _ = kill(pid, Signal::SIGKILL);
    }
    leftovers
        .into_iter()
        .map(|(pid, args)| format!("killed leftover process {pid}: {}", shorten(&args, 200)))
        .collect()
}

pub fn pid_alive(pid: i32) -> bool {
    // Signal 0 checks existence; EPERM still means it exists.
    !matches!(kill(Pid::from_raw(pid), None), Err(nix::errno::Errno::ESRCH))
}

/// Mount points at or below `dir`, deepest first, so they unmount in order.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut mounts: Vec<PathBuf> = table
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    mounts.dedup();
    mounts
}

/// mountinfo writes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            let code = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(code);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn shorten(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_octal_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo(r"/tmp/a\040b/c"), "/tmp/a b/c");
        assert_eq!(unescape_mountinfo(r"/plain"), "/plain");
        assert_eq!(unescape_mountinfo(r"/trailing\04"), r"/trailing\04");
    }

    #[test]
    fn processes_are_matched_by_paths_inside_the_dir_only() {
        let dir = tempfile::tempdir().expect("temp dir");
        let spawn_named = |arg0: String| Command::new("sleep").arg0(arg0).arg("30").spawn().expect("spawn sleep");
        let mut ours = spawn_named(format!("{}/podman.sock", dir.path().display()));
        let mut sibling = spawn_named(format!("{}0/podman.sock", dir.path().display()));
        // Right after fork the child still shows the parent's command
        // line until it execs; give it a moment.
        let scan = || -> Vec<u32> {
            processes_using(dir.path())
                .iter()
                .map(|(pid, _)| pid.as_raw() as u32)
                .collect()
        };
        let mut found = scan();
        for _ in 0..100 {
            if found.contains(&ours.id()) {
                break;
            }
            sleep(Duration::from_millis(20));
            found = scan();
        }
        for child in [&mut ours, &mut sibling] {
            let _ = child.kill();
            let _ = child.wait();
        }
        assert!(found.contains(&ours.id()), "{found:?}");
        assert!(!found.contains(&sibling.id()), "{found:?}");
    }
}
