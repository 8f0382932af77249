//! `archy-agent data-disk`: mount the node's data partition before anything
//! else runs (the root-run `archy-data.service` calls it at every boot).
//!
//! The OS comes fresh from the squashfs at every boot; container storage,
//! app data, secrets and agent state live on the partition labelled
//! `ARCHY-DATA`, mounted at the data root. Without one the node still
//! boots, but everything is in RAM, and this says so loudly. A disk is
//! formatted only when the kernel command line names it by a stable name
//! (`archipelago.format=/dev/disk/by-id/…`) and shows positive evidence of
//! being blank (`format.rs`); a disk that carries the label is never
//! formatted again: the parameter can stay on the command line without ever
//! wiping the data it protects. A refused format is said loudly; the data
//! disk that exists is still mounted, and without one the unit fails.
//!
//! Which partition is mounted (`choose.rs`): on an installed node, exactly
//! the one the kernel command line names (`archipelago.data=PARTUUID=…`),
//! or none, and the boot stops; in live mode (no such parameter) the one
//! partition labelled `ARCHY-DATA` that does not lie on a disk holding the
//! installed layout, and none when there are two or more. Once mounted,
//! `<data>/system/journal` is bound on `/var/log/journal`: the journal is
//! kept on the data disk.
//!
//! The decisions are pure (`parse_cmdline`, `format::decide`,
//! `choose.rs`); the effects (`gather.rs` and below) run Debian's own tools
//! (util-linux, e2fsprogs, fdisk).

mod choose;
mod format;
mod gather;

pub use choose::{
    choose_live, choose_named, parse_data_param, Candidate, LiveDecision, NamedError, SkipReason, Skipped, DATA_PARAM,
};

pub use format::{
    decide, DiskFacts, Fact, FormatDecision, FormatRequest, Lsblk, Refusal, Refused, Signature, StableName, DISK_DIR,
};

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::dataroot::DataRoot;

pub const LABEL: &str = "ARCHY-DATA";
const FORMAT_PARAM: &str = "archipelago.format=";
/// How long udev gets to show a labelled partition after boot.
pub const DEVICE_WAIT: Duration = Duration::from_secs(10);
const POLL_EVERY: Duration = Duration::from_millis(250);

/// Every fact [`decide`] looks at, for another reader of disks (the
/// installer's blank check).
pub fn gather_facts(device: &Path, label: &str) -> DiskFacts {
    gather::facts(device, label)
}

/// Positive evidence that `facts`' device is blank: [`decide`] would
/// format it, except that another disk may carry the label.
pub fn blank(facts: &DiskFacts) -> bool {
    match decide(facts, LABEL) {
        FormatDecision::Format => true,
        FormatDecision::Refuse(reasons) => reasons.iter().all(|r| matches!(r, Refusal::LabelElsewhere { .. })),
        FormatDecision::AlreadyFormatted => false,
    }
}

/// Every device with a file system labelled `label`, probed afresh (no
/// blkid cache); `Err` says why blkid could not tell.
pub fn devices_labelled(label: &str) -> Result<Vec<PathBuf>, String> {
    gather::labelled(label)
}

/// The stable names (under [`DISK_DIR`]) that lead to `device`.
pub fn stable_names_of(device: &Path) -> Vec<StableName> {
    gather::stable_names(device, Path::new(DISK_DIR))
}

/// What the node's kernel command line asks of the data disk.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Cmdline {
    /// `archipelago.format=…`: the only way a disk is ever formatted.
    pub format: Option<FormatRequest>,
    /// `archipelago.data=PARTUUID=…` (lower case): the installed node's
    /// data partition, the only one mounted then.
    pub data: Option<String>,
}

pub fn parse_cmdline(text: &str) -> anyhow::Result<Cmdline> {
    let mut out = Cmdline::default();
    for word in text.split_whitespace() {
        if let Some(value) = word.strip_prefix(FORMAT_PARAM) {
            out.format = Some(format::parse_request(FORMAT_PARAM, value)?);
        }
        if let Some(value) = word.strip_prefix(DATA_PARAM) {
            out.data = Some(parse_data_param(value)?);
        }
    }
    Ok(out)
}

/// Options of `archy-agent data-disk`.
#[derive(Debug, Clone)]
pub struct Options {
    pub mountpoint: PathBuf,
    /// The file system label of the data disk (tests use their own).
    pub label: String,
    /// How long to wait for the disk to appear.
    pub wait: Duration,
    /// The agent's user, who owns the data root (rootless).
    pub owner: Option<(u32, u32)>,
    pub cmdline: PathBuf,
    /// Where the stable names' links are looked up ([`DISK_DIR`]; tests,
    /// on machines without udev, make their own).
    pub disk_dir: PathBuf,
    /// Where `<data>/system/journal` is bound ([`JOURNAL_DIR`]; tests,
    /// on machines without systemd, use a folder of their own).
    pub journal_dir: PathBuf,
}

/// Where journald keeps a persistent journal.
pub const JOURNAL_DIR: &str = "/var/log/journal";

/// Formats if asked and allowed, mounts the data disk if there is one,
/// warns if not. A refused format fails only when there is no data disk.
/// Returns whether a data disk is mounted.
pub fn run(opts: &Options) -> anyhow::Result<bool> {
    let cmdline_text =
        fs::read_to_string(&opts.cmdline).with_context(|| format!("cannot read {}", opts.cmdline.display()))?;
    let cmdline = parse_cmdline(&cmdline_text)?;
    let refused = match &cmdline.format {
        Some(request) => format_if_allowed(request, opts)?.err(),
        None => None,
    };
    if let Some(refused) = &refused {
        loudly(&refused.to_string());
    }
    fs::create_dir_all(&opts.mountpoint).with_context(|| format!("cannot create {}", opts.mountpoint.display()))?;
    // What the image ships under the data root (the registry list of
    // `cargo xtask iso --registries`) is hidden once the disk is mounted
    // over it: read it first, and give it to a disk that lacks it.
    let seed = read_seed(&DataRoot::new(&opts.mountpoint).seed_dir())?;
    if is_mountpoint(&opts.mountpoint)? {
        say(&format!("{} is already mounted", opts.mountpoint.display()));
    } else if let Some(device) = find_data_partition(&cmdline, opts)? {
        // A power loss leaves the journal to replay and maybe more: the
        // same check fstab would run (exit 1 means errors were fixed).
        let status = Command::new("e2fsck")
            .args(["-p"])
            .arg(&device)
            .status()
            .context("cannot run e2fsck (package e2fsprogs)")?;
        if !matches!(status.code(), Some(0 | 1)) {
            bail!(
                "e2fsck -p {} failed ({status}): the data disk needs a manual check; \
                 refusing to mount it, and refusing to run apps without it",
                device.display()
            );
        }
        tool(
            "mount",
            "mount",
            &[
                "-o".as_ref(),
                "noatime".as_ref(),
                device.as_os_str(),
                opts.mountpoint.as_os_str(),
            ],
        )?;
        say(&format!(
            "data disk {} ({}) mounted at {}",
            opts.label,
            device.display(),
            opts.mountpoint.display()
        ));
    } else if let Some(refused) = refused {
        // Asked for a data disk, got none: the agent must not start and
        // keep in RAM what its owner expects on a disk.
        return Err(refused).context(format!(
            "no partition labelled {}, and the disk the kernel command line names is not formatted",
            opts.label
        ));
    } else {
        warn_in_ram(&opts.mountpoint, &opts.label);
        own(opts)?;
        write_seed(&DataRoot::new(&opts.mountpoint).seed_dir(), &seed, opts.owner)?;
        return Ok(false);
    }
    own(opts)?;
    write_seed(&DataRoot::new(&opts.mountpoint).seed_dir(), &seed, opts.owner)?;
    keep_journal(&DataRoot::new(&opts.mountpoint), &opts.journal_dir)?;
    Ok(true)
}

/// The partition to mount, if any: the named one (or an error), else live
/// mode's choice (an error when it is ambiguous). Waits up to `opts.wait`
/// for it to appear.
fn find_data_partition(cmdline: &Cmdline, opts: &Options) -> anyhow::Result<Option<PathBuf>> {
    if let Some(uuid) = &cmdline.data {
        let token = format!("PARTUUID={uuid}");
        let found = poll(opts.wait, || {
            Ok(match gather::tagged(&token) {
                Ok(found) if found.is_empty() => None,
                other => Some(other),
            })
        })?
        .unwrap_or_else(|| Ok(Vec::new()));
        return match choose_named(uuid, found) {
            Ok(device) => Ok(Some(device)),
            Err(e) => {
                loudly(&e.to_string());
                Err(e.into())
            }
        };
    }
    let found = poll(opts.wait, || {
        Ok(match gather::labelled(&opts.label) {
            Ok(found) if found.is_empty() => None,
            other => Some(other),
        })
    })?
    .unwrap_or_else(|| Ok(Vec::new()))
    .map_err(|e| anyhow::anyhow!("cannot look for partitions labelled {}: {e}", opts.label))?;
    let candidates: Vec<Candidate> = found
        .into_iter()
        .map(|device| Candidate {
            installed_disk: gather::installed_disk(&device),
            device,
        })
        .collect();
    let (decision, skipped) = choose_live(&candidates);
    for skip in &skipped {
        loudly(&skip.to_string());
    }
    match decision {
        LiveDecision::Mount(device) => Ok(Some(device)),
        LiveDecision::InRam => Ok(None),
        LiveDecision::Ambiguous(devices) => {
            let message = choose::ambiguous_message(&opts.label, &devices);
            loudly(&message);
            bail!("{message}")
        }
    }
}

/// Makes `<data>/system/journal`, binds it on `journal_dir` and has
/// journald write there: the journal of this boot and the next is kept.
/// Without journalctl (no systemd) it says so and only binds.
fn keep_journal(data: &DataRoot, journal_dir: &Path) -> anyhow::Result<()> {
    let system = data.system_dir();
    let journal = data.journal_dir();
    // Made once; journald and systemd-tmpfiles own the journal folder's
    // mode after that.
    for dir in [&system, &journal] {
        if !dir.exists() {
            fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
                .with_context(|| format!("cannot set the mode of {}", dir.display()))?;
        }
    }
    if is_mountpoint(journal_dir)? {
        say(&format!("{} is already mounted", journal_dir.display()));
        return Ok(());
    }
    // journald may have opened files under the target already: it lets go
    // of them first, and writes to the data disk after.
    journalctl("--relinquish-var");
    fs::create_dir_all(journal_dir).with_context(|| format!("cannot create {}", journal_dir.display()))?;
    tool(
        "mount",
        "mount",
        &["--bind".as_ref(), journal.as_os_str(), journal_dir.as_os_str()],
    )?;
    say(&format!(
        "the journal is kept on the data disk ({} on {})",
        journal.display(),
        journal_dir.display()
    ));
    journalctl("--flush");
    Ok(())
}

/// `journalctl FLAG`; absent or failing, it says so and goes on (the data
/// disk matters more than the journal's place).
fn journalctl(flag: &str) {
    match Command::new("journalctl")
        .arg(flag)
        .stdin(std::process::Stdio::null())
        .output()
    {
        Ok(out) if out.status.success() => {}
        Ok(out) => say(&format!(
            "journalctl {flag} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            say(&format!("journalctl is not installed: skipping journalctl {flag}"))
        }
        Err(e) => say(&format!("cannot run journalctl {flag}: {e}")),
    }
}

/// Formats the disk `request` names if it is blank; `Err(Refused)` says
/// why not (nothing was written then).
fn format_if_allowed(request: &FormatRequest, opts: &Options) -> anyhow::Result<Result<(), Refused>> {
    let refuse = |device: Option<PathBuf>, reasons| {
        Ok(Err(Refused {
            named: request.clone(),
            device,
            reasons,
        }))
    };
    let device = match request {
        FormatRequest::Unstable(given) => {
            // Wait as for any device: its stable names show once it is there.
            wait_for_path(given, opts.wait);
            let stable = gather::stable_names(given, &opts.disk_dir);
            let mut reasons = vec![Refusal::UnstableName {
                given: given.clone(),
                stable,
            }];
            if !given.exists() {
                reasons.push(Refusal::Missing);
            }
            return refuse(None, reasons);
        }
        FormatRequest::Stable(name) => {
            // udev makes the links shortly after the disks appear.
            wait_for_path(&name.link(&opts.disk_dir), opts.wait);
            match gather::resolve(name, &opts.disk_dir) {
                Some(device) => device,
                None => return refuse(None, vec![Refusal::Missing]),
            }
        }
    };
    let facts = gather::facts(&device, &opts.label);
    match decide(&facts, &opts.label) {
        FormatDecision::Refuse(reasons) => refuse(Some(device), reasons),
        FormatDecision::AlreadyFormatted => {
            say(&format!(
                "{request} ({}) already is the data disk (label {}); not formatting it again",
                device.display(),
                opts.label
            ));
            Ok(Ok(()))
        }
        FormatDecision::Format => {
            say(&format!(
                "formatting {request} ({}) as ext4, label {}: asked on the kernel command line, \
                 and the device is blank",
                device.display(),
                opts.label
            ));
            // No -F: mke2fs keeps its own refusals (a mounted device).
            tool(
                "mkfs.ext4",
                "e2fsprogs",
                &["-q".as_ref(), "-L".as_ref(), opts.label.as_ref(), device.as_os_str()],
            )?;
            Ok(Ok(()))
        }
    }
}

/// Files of `dir` (one level: the registry list), read before the mount.
fn read_seed(dir: &Path) -> anyhow::Result<Vec<(std::ffi::OsString, Vec<u8>)>> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        if entry.file_type().map(|t| t.is_file()).unwrap_or(false) {
            let bytes = fs::read(entry.path()).with_context(|| format!("cannot read {}", entry.path().display()))?;
            out.push((entry.file_name(), bytes));
        }
    }
    Ok(out)
}

/// Writes the seed files the disk does not have yet; never overwrites.
fn write_seed(dir: &Path, seed: &[(std::ffi::OsString, Vec<u8>)], owner: Option<(u32, u32)>) -> anyhow::Result<()> {
    if seed.is_empty() {
        return Ok(());
    }
    crate::fsutil::ensure_private_dir(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let give = |path: &Path| -> anyhow::Result<()> {
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .with_context(|| format!("cannot give {} to uid {uid}", path.display()))?;
        }
        Ok(())
    };
    give(dir)?;
    for (name, bytes) in seed {
        let path = dir.join(name);
        if crate::fsutil::write_new(&path, bytes, 0o600).with_context(|| format!("cannot write {}", path.display()))? {
            say(&format!("{} copied from the image to the data disk", path.display()));
        }
        // Also in RAM, where the image's own root-owned copy is the one.
        give(&path)?;
    }
    Ok(())
}

fn own(opts: &Options) -> anyhow::Result<()> {
    if let Some((uid, gid)) = opts.owner {
        // The container storage folder too: whoever creates it first owns
        // it, and a root `podman` run must never take it from the agent's
        // rootless engine.
        let containers = DataRoot::new(&opts.mountpoint).containers_dir();
        fs::create_dir_all(&containers).with_context(|| format!("cannot create {}", containers.display()))?;
        for dir in [&opts.mountpoint, &containers] {
            std::os::unix::fs::chown(dir, Some(uid), Some(gid))
                .with_context(|| format!("cannot give {} to uid {uid}", dir.display()))?;
        }
    }
    fs::set_permissions(&opts.mountpoint, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("cannot set the mode of {}", opts.mountpoint.display()))
}

fn warn_in_ram(mountpoint: &Path, label: &str) {
    let line = "=".repeat(72);
    say(&format!(
        "{line}\nWARNING: no partition labelled {label}. Container storage, app data, secrets \
         and agent state under {} are in RAM and are LOST at power off.\nAdd a disk with an ext4 \
         partition labelled {label}, or boot once with archipelago.format=/dev/disk/by-id/<disk> to format a \
         blank one (ls -l /dev/disk/by-id/ shows the names).\n{line}",
        mountpoint.display()
    ));
}

/// To stderr, which the unit sends to the journal and the console.
fn say(message: &str) {
    eprintln!("archipelago: {message}");
}

/// What the owner must not miss, framed on the console.
fn loudly(message: &str) {
    let line = "=".repeat(72);
    say(&format!("{line}\n{message}\n{line}"));
}

/// Asks `find` every quarter second until it finds something or `wait`
/// has passed (it is always asked at least once).
fn poll<T>(wait: Duration, mut find: impl FnMut() -> anyhow::Result<Option<T>>) -> anyhow::Result<Option<T>> {
    let deadline = Instant::now() + wait;
    loop {
        if let Some(found) = find()? {
            return Ok(Some(found));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(POLL_EVERY);
    }
}

fn wait_for_path(path: &Path, wait: Duration) {
    // Not there in time: the caller says so.
    let _ = poll(wait, || Ok(path.exists().then_some(())));
}

fn is_mountpoint(path: &Path) -> anyhow::Result<bool> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").context("cannot read /proc/self/mountinfo")?;
    let want = path.to_string_lossy();
    Ok(mountinfo
        .lines()
        .any(|line| line.split(' ').nth(4) == Some(want.as_ref())))
}

fn tool(program: &str, package: &str, args: &[&OsStr]) -> anyhow::Result<()> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program} (package {package})"))?;
    if !output.status.success() {
        let shown: Vec<_> = args.iter().map(|a| a.to_string_lossy()).collect();
        bail!(
            "{program} {} failed ({}): {}",
            shown.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_format_parameter_is_read_from_the_command_line() {
        let c =
            parse_cmdline("BOOT_IMAGE=/live/vmlinuz boot=live archipelago.format=/dev/disk/by-id/virtio-data quiet\n")
                .unwrap();
        assert_eq!(
            c.format,
            Some(FormatRequest::Stable(StableName::ById("virtio-data".into())))
        );
        assert_eq!(parse_cmdline("boot=live").unwrap(), Cmdline::default());
        // A kernel name is read, to be refused with the disk's stable names.
        assert_eq!(
            parse_cmdline("archipelago.format=/dev/vdb").unwrap().format,
            Some(FormatRequest::Unstable(PathBuf::from("/dev/vdb")))
        );
    }

    #[test]
    fn a_format_parameter_that_names_no_device_is_an_error() {
        let err = parse_cmdline("archipelago.format=vdb").unwrap_err().to_string();
        assert!(
            err.contains("archipelago.format=vdb") && err.contains("/dev/disk/by-id/"),
            "{err}"
        );
        assert!(parse_cmdline("archipelago.format=/dev/../etc/x").is_err());
    }

    #[test]
    fn the_data_parameter_is_read_from_an_installed_boots_command_line() {
        let c = parse_cmdline(
            "linux boot=live live-media=/dev/disk/by-partuuid/aa archipelago.slot=a rauc.slot=A \
             archipelago.data=PARTUUID=5E0F8C3A-1B2C-4D5E-8F90-A1B2C3D4E5F6 systemd.machine_id=0123 quiet\n",
        )
        .unwrap();
        assert_eq!(c.data.as_deref(), Some("5e0f8c3a-1b2c-4d5e-8f90-a1b2c3d4e5f6"));
        assert_eq!(c.format, None);
        let err = parse_cmdline("archipelago.data=/dev/vda5").unwrap_err().to_string();
        assert!(
            err.contains("archipelago.data=/dev/vda5") && err.contains("PARTUUID=<uuid>"),
            "{err}"
        );
    }
}
