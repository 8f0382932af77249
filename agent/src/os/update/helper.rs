//! The root helper (`archy-agent os helper`, `archy-os@.service`) and its
//! client (`os update`, control `os.update`).
//!
//! The agent runs as `archipelago`; installing a bundle and rebooting
//! need root, and RAUC's D-Bus policy lets only root call it. So the agent
//! asks this helper, one request per connection: systemd accepts on
//! `/run/archipelago/os.sock` (root:archipelago 0660, `Accept=yes`) and
//! starts one helper with the connection as its stdin and stdout. The
//! helper checks the peer's credentials again (root or the archipelago
//! group), reads one JSON request line ([`Request`]; an update carries the
//! bundle as an open file in the same message, SCM_RIGHTS, so the helper
//! never opens a path the agent names), streams [`Reply::Progress`] lines
//! and ends with one [`Reply::Done`] or [`Reply::Failed`].
//!
//! An update: one at a time (a lock in the run folder); free space on the
//! data partition checked; the bundle copied to a root-only
//! `<data>/system/os/incoming.raucb` (the agent cannot change it under
//! RAUC); `rauc info` checks its signature and reads its version;
//! `trial.json` records what the trial must keep healthy; `rauc install`
//! (through rauc.service) runs our handlers, writes the other slot and
//! makes it primary with 3 tries (the custom backend). A failure after the
//! slot became primary marks it bad again, so the next boot stays on the
//! booted release.

use std::fs;
use std::io::{BufRead, BufReader, IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt as _;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, Context as _};
use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::handlers::{Refusal, ALLOW_DOWNGRADE_FILE, REFUSAL_FILE};
use crate::dataroot::DataRoot;
use crate::os::release::{Release, Version};

/// Where systemd listens for the helper.
pub const SOCKET: &str = "/run/archipelago/os.sock";
/// The group whose members (besides root) may ask.
pub const GROUP: &str = "archipelago";
/// The staged bundle's name in `DataRoot::os_dir()`.
pub const INCOMING: &str = "incoming.raucb";
/// Room kept free on the data partition beyond the bundle itself.
const SPARE_BYTES: u64 = 64 << 20;
/// A request line is small; a longer one is refused.
const MAX_REQUEST: usize = 64 << 10;

/// One request per connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// RAUC's view of the slots, and boot.json when there is one.
    Status {},
    /// Installs the bundle passed with the request (SCM_RIGHTS).
    Update {
        #[serde(default)]
        allow_downgrade: bool,
    },
    /// `systemctl reboot`: clean, every unit stopped in order.
    Reboot {},
    /// The owner has read the last rollback (`os acknowledge`).
    Acknowledge {},
}

/// One line the helper writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reply {
    Progress(String),
    Done(Value),
    Failed {
        message: String,
        /// A bundle refused by a check (signature, architecture, version,
        /// hashes), as opposed to a failure of the node.
        #[serde(default)]
        refused: bool,
    },
}

/// Where the helper finds things (the node's unless a test says).
#[derive(Debug, Clone)]
pub struct HelperConfig {
    pub data: DataRoot,
    /// The handlers' and the helper's meeting folder.
    pub run_dir: PathBuf,
    pub rauc: PathBuf,
    /// RAUC's system.conf, for `rauc info`'s keyring.
    pub system_conf: PathBuf,
    /// The agent's control socket (which apps are healthy now).
    pub control: PathBuf,
    /// The booted release (the live medium's release.json).
    pub booted_release: PathBuf,
    /// Checked against the peer's gid; `None` in tests lets any peer in.
    pub group: Option<String>,
}

impl HelperConfig {
    pub fn node(data: DataRoot) -> HelperConfig {
        HelperConfig {
            data,
            run_dir: PathBuf::from(super::handlers::RUN_DIR),
            rauc: PathBuf::from("rauc"),
            system_conf: PathBuf::from(super::rauc_conf::SYSTEM_CONF),
            control: PathBuf::from(crate::control::DEFAULT_CONTROL_SOCKET),
            booted_release: Path::new(crate::os::medium::MEDIUM_DIR).join(crate::os::release::RELEASE_FILE),
            group: Some(GROUP.to_owned()),
        }
    }
}

/// A failure with the [`Reply::Failed`] it becomes.
#[derive(Debug)]
struct Failure {
    message: String,
    refused: bool,
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Failure {
        Failure {
            message: format!("{:#}", e.into()),
            refused: false,
        }
    }
}

fn refused(message: impl Into<String>) -> Failure {
    Failure {
        message: message.into(),
        refused: true,
    }
}

/// The gid of `group` in an /etc/group text.
fn group_gid(etc_group: &str, group: &str) -> Option<u32> {
    etc_group.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next() == Some(group)).then(|| f.nth(1).and_then(|g| g.parse().ok()))?
    })
}

/// Serves one connection: `conn` is the accepted socket (stdin under
/// systemd). Writes the replies to it; errors only when it cannot.
pub fn serve(cfg: &HelperConfig, conn: &UnixStream) -> anyhow::Result<()> {
    let mut out = conn.try_clone().context("cannot duplicate the connection")?;
    let mut send = |r: &Reply| -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(r)?;
        line.push(b'\n');
        out.write_all(&line).context("the client went away")?;
        Ok(())
    };
    let result = (|| -> Result<Value, Failure> {
        let peer = rustix::net::sockopt::socket_peercred(conn.as_fd()).context("cannot read the peer's credentials")?;
        let (uid, gid) = (peer.uid.as_raw(), peer.gid.as_raw());
        eprintln!(
            "archipelago os helper: request from uid {uid} gid {gid} (pid {})",
            peer.pid.as_raw_pid()
        );
        if let Some(group) = &cfg.group {
            let text = fs::read_to_string("/etc/group").context("cannot read /etc/group")?;
            let allowed = group_gid(&text, group);
            if uid != 0 && Some(gid) != allowed {
                return Err(refused(format!(
                    "uid {uid} (gid {gid}) may not ask the OS helper: only root and the group {group} may"
                )));
            }
        }
        let (line, fds) = read_request(conn)?;
        let request: Request = serde_json::from_slice(&line).map_err(|e| {
            refused(format!(
                "not a request: {e}; allowed: {{\"request\": \"status\" | \"update\" | \"reboot\" | \"acknowledge\"}}"
            ))
        })?;
        eprintln!("archipelago os helper: {request:?} from uid {uid}");
        match request {
            Request::Status {} => status(cfg),
            Request::Update { allow_downgrade } => {
                let mut fds = fds.into_iter();
                let (Some(fd), None) = (fds.next(), fds.next()) else {
                    return Err(refused(
                        "an update request carries exactly one open bundle file (SCM_RIGHTS)",
                    ));
                };
                update(cfg, fs::File::from(fd), allow_downgrade, &mut |p| {
                    eprintln!("archipelago os helper: {p}");
                    // A client gone does not stop the install.
                    let _ = send(&Reply::Progress(p.to_owned()));
                })
            }
            Request::Reboot {} => {
                run_ok(Command::new("systemctl").arg("reboot"), "systemctl reboot")?;
                Ok(json!({ "rebooting": true }))
            }
            Request::Acknowledge {} => {
                let exe = std::env::current_exe().context("cannot find this program")?;
                let said = run_ok(
                    Command::new(exe).args(["os", "acknowledge"]),
                    "archy-agent os acknowledge",
                )?;
                Ok(json!({ "acknowledged": true, "said": said.trim() }))
            }
        }
    })();
    match result {
        Ok(v) => send(&Reply::Done(v)),
        Err(f) => {
            eprintln!("archipelago os helper: failed: {}", f.message);
            send(&Reply::Failed {
                message: f.message,
                refused: f.refused,
            })
        }
    }
}

/// The request line and the descriptors that came with it.
fn read_request(conn: &UnixStream) -> Result<(Vec<u8>, Vec<OwnedFd>), Failure> {
    let mut line = Vec::new();
    let mut fds = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let got = rustix::net::recvmsg(
            conn.as_fd(),
            &mut [IoSliceMut::new(&mut buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )
        .context("cannot read the request")?;
        for msg in control.drain() {
            if let RecvAncillaryMessage::ScmRights(rights) = msg {
                fds.extend(rights);
            }
        }
        if got.bytes == 0 {
            break;
        }
        line.extend_from_slice(&buf[..got.bytes]);
        if line.len() > MAX_REQUEST {
            return Err(refused(format!("the request line is over {MAX_REQUEST} bytes")));
        }
        if line.contains(&b'\n') {
            break;
        }
    }
    let end = line.iter().position(|b| *b == b'\n').unwrap_or(line.len());
    line.truncate(end);
    Ok((line, fds))
}

fn run_ok(cmd: &mut Command, what: &str) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// RAUC's slots (`rauc status --output-format=json`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaucStatus {
    /// The booted slot's bootname ("A").
    pub booted: String,
    /// The primary slot's name ("rootfs.1"), if RAUC knows one.
    pub primary: Option<String>,
    /// Each slot's name and bootname.
    pub slots: Vec<(String, String)>,
    pub raw: Value,
}

impl RaucStatus {
    pub fn parse(text: &str) -> anyhow::Result<RaucStatus> {
        let raw: Value = serde_json::from_str(text).context("rauc status printed no JSON")?;
        let booted = raw["booted"].as_str().unwrap_or_default().to_owned();
        let primary = raw["boot_primary"].as_str().map(str::to_owned);
        let mut slots = Vec::new();
        for entry in raw["slots"].as_array().into_iter().flatten() {
            for (name, slot) in entry.as_object().into_iter().flatten() {
                slots.push((name.clone(), slot["bootname"].as_str().unwrap_or_default().to_owned()));
            }
        }
        Ok(RaucStatus {
            booted,
            primary,
            slots,
            raw,
        })
    }

    /// The rootfs slot that is not booted: the one an install writes.
    pub fn target(&self) -> anyhow::Result<(String, String)> {
        let others: Vec<&(String, String)> = self
            .slots
            .iter()
            .filter(|(name, boot)| name.starts_with("rootfs.") && *boot != self.booted)
            .collect();
        match others.as_slice() {
            [one] => Ok((*one).clone()),
            _ => bail!(
                "RAUC reports booted slot {:?} and slots {:?}: no single other slot to write",
                self.booted,
                self.slots
            ),
        }
    }
}

fn rauc_status(cfg: &HelperConfig) -> anyhow::Result<RaucStatus> {
    let text = run_ok(
        Command::new(&cfg.rauc).args(["status", "--output-format=json"]),
        "rauc status",
    )?;
    RaucStatus::parse(&text)
}

fn status(cfg: &HelperConfig) -> Result<Value, Failure> {
    let rauc = rauc_status(cfg)?;
    let boot = fs::read(cfg.run_dir.join("boot.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok());
    Ok(json!({ "rauc": rauc.raw, "boot": boot }))
}

/// The apps healthy now, from the agent's `container-list` (running, and
/// healthy when they have a health check). No agent: none.
fn healthy_apps(control: &Path) -> Vec<String> {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(_) => return Vec::new(),
    };
    rt.block_on(async {
        let Ok(Some(client)) = crate::control::ControlClient::connect(control).await else {
            return Vec::new();
        };
        let Ok(list) = client.call("container-list", json!({})).await else {
            return Vec::new();
        };
        list.as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["state"] == "running" && (a["health"].is_null() || a["health"] == "healthy"))
            .filter_map(|a| a["app"].as_str().map(str::to_owned))
            .collect()
    })
}

/// Bytes free for an unprivileged writer under `dir`.
fn free_bytes(dir: &Path) -> anyhow::Result<u64> {
    let s = rustix::fs::statvfs(dir).with_context(|| format!("cannot read the free space of {}", dir.display()))?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

/// The update: see the module's doc. `progress` gets each line to relay.
fn update(
    cfg: &HelperConfig,
    mut bundle: fs::File,
    allow_downgrade: bool,
    progress: &mut dyn FnMut(&str),
) -> Result<Value, Failure> {
    fs::create_dir_all(&cfg.run_dir).with_context(|| format!("cannot create {}", cfg.run_dir.display()))?;
    // Root's, writable by root only: the handlers trust what is in it.
    fs::set_permissions(&cfg.run_dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .with_context(|| format!("cannot set the mode of {}", cfg.run_dir.display()))?;
    let lock_path = cfg.run_dir.join("update.lock");
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .with_context(|| format!("cannot open {}", lock_path.display()))?;
    if rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        return Err(refused("another OS update is under way; try again when it has ended"));
    }
    let os_dir = cfg.data.os_dir();
    fs::create_dir_all(&os_dir).with_context(|| format!("cannot create {}", os_dir.display()))?;
    let meta = bundle.metadata().context("cannot read the bundle's size")?;
    if !meta.is_file() {
        return Err(refused("the bundle passed is not a regular file"));
    }
    let size = meta.len();
    let free = free_bytes(&os_dir)?;
    if size.saturating_add(SPARE_BYTES) > free {
        return Err(refused(format!(
            "the data partition ({}) has {} MiB free; the bundle needs {} MiB and {} MiB spare: nothing was written",
            os_dir.display(),
            free >> 20,
            size >> 20,
            SPARE_BYTES >> 20
        )));
    }
    let staged = os_dir.join(INCOMING);
    let result = (|| {
        copy_in(&mut bundle, &staged, size, progress)?;
        install(cfg, &staged, allow_downgrade, progress)
    })();
    let _ = fs::remove_file(&staged);
    let _ = fs::remove_file(cfg.run_dir.join(ALLOW_DOWNGRADE_FILE));
    result
}

fn copy_in(bundle: &mut fs::File, staged: &Path, size: u64, progress: &mut dyn FnMut(&str)) -> Result<(), Failure> {
    // No more than the size the space check allowed, should the file grow.
    let mut bundle = bundle.take(size);
    let _ = fs::remove_file(staged);
    let mut to = fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(staged)
        .with_context(|| format!("cannot create {}", staged.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    let (mut done, mut said) = (0u64, 0u64);
    loop {
        let n = bundle.read(&mut buf).context("cannot read the bundle")?;
        if n == 0 {
            break;
        }
        to.write_all(&buf[..n])
            .with_context(|| format!("cannot write {}", staged.display()))?;
        done += n as u64;
        let pct = (done * 100).checked_div(size).unwrap_or(100);
        if pct >= said + 10 {
            said = pct - pct % 10;
            progress(&format!("copying the bundle: {said}%"));
        }
    }
    to.sync_all()
        .with_context(|| format!("cannot sync {}", staged.display()))?;
    progress(&format!("bundle staged: {} MiB", done >> 20));
    Ok(())
}

fn install(
    cfg: &HelperConfig,
    staged: &Path,
    allow_downgrade: bool,
    progress: &mut dyn FnMut(&str),
) -> Result<Value, Failure> {
    // The signature first, and the version it signs.
    let info = Command::new(&cfg.rauc)
        .arg(format!("--conf={}", cfg.system_conf.display()))
        .args(["info", "--output-format=json"])
        .arg(staged)
        .output()
        .context("cannot run rauc info")?;
    if !info.status.success() {
        return Err(refused(format!(
            "RAUC refused the bundle before installing it (its signature, its signer or its format): {}",
            rauc_error(&String::from_utf8_lossy(&info.stderr))
        )));
    }
    let manifest: Value = serde_json::from_slice(&info.stdout).context("rauc info printed no JSON")?;
    let to_version = manifest["version"].as_str().unwrap_or_default().to_owned();
    let compatible = manifest["compatible"].as_str().unwrap_or_default();
    progress(&format!("signature verified: {compatible} version {to_version}"));
    let booted = Release::read(&cfg.booted_release)?;
    // What the signed manifest says is checked here, before RAUC is asked
    // to install; the pre-install handler checks release.json again.
    check_manifest(compatible, &to_version, &booted.version, allow_downgrade).map_err(refused)?;
    let before = rauc_status(cfg)?;
    let (target, target_boot) = before.target()?;
    let healthy = healthy_apps(&cfg.control);
    progress(&format!(
        "booted slot {} holds {}; writing slot {target_boot}; apps healthy now: {}",
        before.booted,
        booted.version,
        if healthy.is_empty() {
            "none".to_owned()
        } else {
            healthy.join(", ")
        }
    ));
    let trial = crate::os::records::Trial {
        format: crate::os::records::FORMAT,
        from_version: booted.version.clone(),
        to_version: to_version.clone(),
        to_slot: crate::os::bootenv::SlotName::from_rauc(&target_boot)?,
        healthy_before: healthy,
        started_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        failures: Vec::new(),
    };
    let trial_path = cfg.data.os_trial();
    trial.write(&trial_path)?;

    let refusal_path = cfg.run_dir.join(REFUSAL_FILE);
    let _ = fs::remove_file(&refusal_path);
    if allow_downgrade {
        fs::write(cfg.run_dir.join(ALLOW_DOWNGRADE_FILE), b"this install only\n")
            .context("cannot write the downgrade permission")?;
    }
    let started = std::time::SystemTime::now();
    let outcome = run_install(cfg, staged, progress);
    let after = rauc_status(cfg);
    match outcome {
        Ok(()) => {
            let after = after?;
            if after.primary.as_deref() != Some(target.as_str()) {
                return Err(anyhow!(
                    "rauc install succeeded but RAUC's primary slot is {:?}, not {target}",
                    after.primary
                )
                .into());
            }
            progress(&format!(
                "slot {target_boot} holds {to_version} and boots next, on trial (3 tries); a reboot applies it"
            ));
            Ok(json!({
                "installed": to_version,
                "slot": target_boot,
                "from": booted.version,
                "reboot_needed": true,
            }))
        }
        Err(rauc_says) => {
            let _ = fs::remove_file(&trial_path);
            // A failure after RAUC made the slot primary (post-install):
            // mark it bad, so the next boot stays on the booted release. A
            // slot already primary before (an update installed earlier and
            // not yet booted) that RAUC never touched stays as it was.
            if let Ok(after) = &after {
                let made_primary = before.primary.as_deref() != Some(target.as_str())
                    && after.primary.as_deref() == Some(target.as_str());
                if made_primary {
                    progress(&format!(
                        "marking slot {target_boot} bad: the booted slot stays primary"
                    ));
                    run_ok(
                        Command::new(&cfg.rauc).args(["status", "mark-bad", &target]),
                        "rauc status mark-bad",
                    )?;
                }
            }
            let refusal = fs::read(&refusal_path)
                .ok()
                .and_then(|b| serde_json::from_slice::<Refusal>(&b).ok());
            let _ = fs::remove_file(&refusal_path);
            Err(match refusal {
                Some(r) => refused(r.reason),
                // RAUC's own check of the manifest's compatible.
                None if rauc_says.contains("Compatible mismatch") => {
                    refused(format!("the bundle is for another kind of node: {rauc_says}"))
                }
                // RAUC says only that a handler failed: its journal says why.
                None => anyhow!(
                    "rauc install failed: {rauc_says}{}",
                    rauc_journal(started)
                        .map(|j| format!("\nRAUC's journal:\n{j}"))
                        .unwrap_or_default()
                )
                .into(),
            })
        }
    }
}

/// A bundle whose signed manifest names another kind of node, or an older
/// release without the owner's `--allow-downgrade`, is refused: the
/// reason, said as the owner needs it.
fn check_manifest(compatible: &str, version: &str, booted: &str, allow_downgrade: bool) -> Result<(), String> {
    let ours = crate::os::release::rauc_compatible(crate::os::release::ARCHITECTURE);
    if compatible != ours {
        return Err(format!(
            "the bundle is for {compatible:?}, and this node is {ours:?} (another architecture or kind of node): nothing was written"
        ));
    }
    Version::parse(version).map_err(|e| format!("the bundle's manifest version {version:?}: {e}"))?;
    // The same rule as the pre-install handler's (`handlers::check_version`).
    super::handlers::check_version(version, booted, allow_downgrade).map_err(|e| format!("{e}: nothing was written"))
}

/// rauc.service's journal since `since` (the handlers' own words), when
/// journalctl can give it.
fn rauc_journal(since: std::time::SystemTime) -> Option<String> {
    let secs = since.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs();
    let out = Command::new("journalctl")
        .args(["--no-pager", "-o", "cat", "-n", "30", "-u", "rauc.service"])
        .arg(format!("--since=@{secs}"))
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (out.status.success() && !text.is_empty()).then_some(text)
}

/// The useful part of RAUC's error text.
fn rauc_error(text: &str) -> String {
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    // `rauc install` says why on its LastError line.
    if let Some(last) = lines.iter().rev().find_map(|l| l.strip_prefix("LastError:")) {
        let last = last.trim();
        return last
            .strip_prefix("Installation error:")
            .unwrap_or(last)
            .trim()
            .to_owned();
    }
    // Otherwise (`rauc info`) every line but RAUC's progress messages: the
    // first says what failed ("signature verification failed: …",
    // "Invalid bundle format: …"), OpenSSL's lines after it say why.
    let said: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| !l.starts_with("rauc-Message"))
        .collect();
    if said.is_empty() {
        "no message".to_owned()
    } else {
        said.join("; ")
    }
}

/// `rauc install`, its output relayed; Err(RAUC's error) on failure.
fn run_install(cfg: &HelperConfig, staged: &Path, progress: &mut dyn FnMut(&str)) -> Result<(), String> {
    let (reader, writer) = std::io::pipe().map_err(|e| format!("cannot make a pipe: {e}"))?;
    let writer2 = writer.try_clone().map_err(|e| format!("cannot make a pipe: {e}"))?;
    let mut child = Command::new(&cfg.rauc)
        .arg("install")
        .arg(staged)
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(writer2)
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", cfg.rauc.display()))?;
    let mut text = String::new();
    for line in BufReader::new(reader).lines() {
        let Ok(line) = line else { break };
        let line = line.trim().to_owned();
        if !line.is_empty() {
            progress(&format!("rauc: {line}"));
            text.push_str(&line);
            text.push('\n');
        }
    }
    let status = child.wait().map_err(|e| format!("cannot wait for rauc: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(rauc_error(&text))
    }
}

// ---- the client ----

/// Sends `request` (with `bundle` for an update) to the helper at
/// `socket`, calls `progress` with each progress line, and returns the
/// final result or the failure.
pub fn call(
    socket: &Path,
    request: &Request,
    bundle: Option<&fs::File>,
    progress: &mut dyn FnMut(&str),
) -> anyhow::Result<Value> {
    let conn = UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach the OS helper at {} (archy-os.socket; only root and the group {GROUP} may)",
            socket.display()
        )
    })?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    let fds: Vec<_> = bundle.iter().map(|f| f.as_fd()).collect();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        bail!("cannot attach the bundle to the request");
    }
    let sent = rustix::net::sendmsg(
        conn.as_fd(),
        &[IoSlice::new(&line)],
        &mut control,
        rustix::net::SendFlags::empty(),
    )
    .context("cannot send the request to the OS helper")?;
    if sent < line.len() {
        (&conn).write_all(&line[sent..]).context("cannot send the request")?;
    }
    conn.shutdown(std::net::Shutdown::Write).ok();
    for line in BufReader::new(&conn).lines() {
        let line = line.context("the OS helper's connection broke")?;
        match serde_json::from_str::<Reply>(&line) {
            Ok(Reply::Progress(p)) => progress(&p),
            Ok(Reply::Done(v)) => return Ok(v),
            Ok(Reply::Failed { message, refused }) => {
                if refused {
                    bail!("refused: {message}");
                }
                bail!("{message}");
            }
            Err(e) => bail!("the OS helper sent {line:?}: {e}"),
        }
    }
    bail!("the OS helper closed the connection without a result")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_signed_manifest_is_checked_before_rauc_installs() {
        let ours = crate::os::release::rauc_compatible(crate::os::release::ARCHITECTURE);
        assert_eq!(check_manifest(&ours, "0.2.0", "0.1.0", false), Ok(()));
        assert_eq!(check_manifest(&ours, "0.1.0", "0.1.0", false), Ok(()));
        let e = check_manifest(&ours, "0.0.9", "0.1.0", false).unwrap_err();
        assert!(
            e.contains("older than the booted 0.1.0") && e.contains("--allow-downgrade"),
            "{e}"
        );
        assert_eq!(check_manifest(&ours, "0.0.9", "0.1.0", true), Ok(()));
        let e = check_manifest("archipelago-riscv64", "0.2.0", "0.1.0", false).unwrap_err();
        assert!(e.contains("archipelago-riscv64") && e.contains(&ours), "{e}");
        assert!(check_manifest(&ours, "two", "0.1.0", true).is_err());
    }

    #[test]
    fn requests_and_replies_on_the_wire() {
        let r: Request = serde_json::from_str(r#"{"request":"update","allow_downgrade":true}"#).unwrap();
        assert_eq!(r, Request::Update { allow_downgrade: true });
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"request":"reboot"}"#).unwrap(),
            Request::Reboot {}
        );
        assert_eq!(
            serde_json::to_string(&Request::Reboot {}).unwrap(),
            r#"{"request":"reboot"}"#
        );
        assert!(serde_json::from_str::<Request>(r#"{"request":"reboot","force":true}"#).is_err());
        let line = serde_json::to_string(&Reply::Progress("x".into())).unwrap();
        assert_eq!(line, r#"{"progress":"x"}"#);
    }

    #[test]
    fn the_group_and_the_target_slot() {
        assert_eq!(group_gid("root:x:0:\narchipelago:x:1000:\n", "archipelago"), Some(1000));
        assert_eq!(group_gid("root:x:0:\n", "archipelago"), None);
        let s = RaucStatus::parse(
            r#"{"booted":"A","boot_primary":"rootfs.0","slots":[{"rootfs.1":{"bootname":"B"}},{"rootfs.0":{"bootname":"A"}}]}"#,
        )
        .unwrap();
        assert_eq!(s.target().unwrap(), ("rootfs.1".to_owned(), "B".to_owned()));
        assert_eq!(s.primary.as_deref(), Some("rootfs.0"));
    }

    #[test]
    fn a_bundle_travels_with_its_request() {
        let (a, b) = UnixStream::pair().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bundle");
        fs::write(&path, b"bundle bytes").unwrap();
        let file = fs::File::open(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (line, fds) = read_request(&b).unwrap();
            let mut f = fs::File::from(fds.into_iter().next().unwrap());
            let mut s = String::new();
            f.read_to_string(&mut s).unwrap();
            (b, line, s)
        });
        // Only the sending half of `call`: the reply is not awaited here.
        let mut line = br#"{"request":"update"}"#.to_vec();
        line.push(b'\n');
        let fds = [file.as_fd()];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        assert!(control.push(SendAncillaryMessage::ScmRights(&fds)));
        rustix::net::sendmsg(
            a.as_fd(),
            &[IoSlice::new(&line)],
            &mut control,
            rustix::net::SendFlags::empty(),
        )
        .unwrap();
        let (_b, line, content) = t.join().unwrap();
        assert_eq!(line, br#"{"request":"update"}"#);
        assert_eq!(content, "bundle bytes");
    }
}
