//! `archy-agent os boot-prepare` (`archy-os-prepare.service`, root, on
//! every boot from an installed disk, after the data partition is mounted
//! and before the agent, the apps and RAUC start): says what this boot is.
//!
//! It mounts the ESP (`archipelago.esp=PARTUUID=`) at
//! [`ESP_DIR`], writes RAUC's `system.conf` for this disk, reads the boot
//! environment, the booted slot (`rauc.slot=`) and both slots'
//! `release.json`, and decides ([`decide`], pure):
//!
//! - a committed boot: nothing to do;
//! - a trial boot (the booted slot's `TRIAL=1`, try n of 3): on the first
//!   boot of the trial, a copy of `<data>/state/` is kept
//!   (`state-snapshot/`) before the new release's agent ever runs;
//! - a rollback: the booted slot is the committed one and the other slot
//!   failed its trial (`TRIAL=1`, `OK=0`). `rollback.json` says from which
//!   release to which and why (the trial's failures, or that it never
//!   reported), `<data>/state/` is put back from the snapshot so the old
//!   agent finds the state it left, and the other slot's trial flag is
//!   cleared so the rollback is found once;
//! - a degraded boot (`archipelago.degraded=1`: GRUB found no usable
//!   environment).
//!
//! It writes `/run/archipelago/os/boot.json` ([`BootStatus`]) and the
//! console line `/run/issue.d/40-archipelago-os.issue`. Every effect of a
//! rollback is idempotent and ordered so that a power cut in the middle
//! finds the same rollback again at the next boot.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _};

use super::bootenv::{BootEnv, SlotBoot};
use super::cmdline::Cmdline;
use super::records::{
    self, BootStatus, Rollback, Slot, SlotState, SlotStatus, Trial, BOOT_JSON, FORMAT, MAX_TRIES, RECORD_DIR_MODE,
};
use super::release::{Release, RELEASE_FILE};
use crate::dataroot::DataRoot;

/// Where the ESP is mounted on an installed node (root only).
pub const ESP_DIR: &str = "/run/archipelago/esp";
/// The console's line about the OS (agetty shows `/run/issue.d/*.issue`).
pub const ISSUE_FILE: &str = "/run/issue.d/40-archipelago-os.issue";
/// How long `os boot-check` waits for a trial boot to come up healthy,
/// unless `archipelago.trial_deadline=` says otherwise.
pub const DEFAULT_TRIAL_DEADLINE_SECS: u64 = 15 * 60;
/// The file in the state snapshot that says which trial it was taken for
/// (not part of the state: never restored).
const SNAPSHOT_MARKER: &str = ".archy-trial";

/// The boot environment's store, as boot-prepare and mark-good use it:
/// `bootenv::EnvStore` on a node (see [`BootEnvStore`]).
pub trait EnvAccess {
    /// The newer valid copy.
    fn read_env(&self) -> anyhow::Result<BootEnv>;
    /// After a rollback: `slot` is not bootable and no longer on trial, so
    /// the rollback is found once (`set_bad`, trial and tries cleared).
    fn retire_trial(&self, slot: Slot) -> anyhow::Result<()>;
    /// The commit: `slot` good, not on trial, committed (`set_good`).
    fn commit(&self, slot: Slot) -> anyhow::Result<()>;
}

/// Everything [`decide`] looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    pub booted: Slot,
    /// The kernel command line.
    pub words: Cmdline,
    /// `None` when the environment cannot be read.
    pub env: Option<BootEnv>,
    pub booted_version: Option<String>,
    pub other_version: Option<String>,
    pub trial: Option<Trial>,
    /// What the state snapshot's marker says it was taken for, if any.
    pub snapshot_for: Option<String>,
    /// The rollback record already on disk.
    pub rollback: Option<Rollback>,
    /// RFC 3339, now.
    pub now: String,
}

/// What this boot is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Committed,
    Trial { tries: u8 },
    RolledBack,
    Degraded,
}

/// What [`decide`] asks the effects to do, in this order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootPlan {
    pub kind: Kind,
    /// A new `rollback.json`.
    pub write_rollback: Option<Rollback>,
    /// Put `<data>/state/` back from the snapshot.
    pub restore_snapshot: bool,
    /// Clear the failed slot's trial in the boot environment.
    pub retire_trial: Option<Slot>,
    /// Remove `trial.json` and the snapshot (the trial is over).
    pub end_trial: bool,
    /// Copy `<data>/state/` into the snapshot, marked with this.
    pub take_snapshot: Option<String>,
    pub status: BootStatus,
    /// The console's text (`None`: no line).
    pub console: Option<String>,
    /// One line for the journal.
    pub journal: String,
}

fn slot_status(env: Option<&SlotBoot>, version: Option<&String>, booted: bool) -> SlotStatus {
    let state = match env {
        Some(e) if e.ok && e.trial => SlotState::Trying,
        Some(e) if e.ok => SlotState::Good,
        _ if version.is_none() => SlotState::Empty,
        Some(_) => SlotState::Bad,
        // No environment: the booted slot evidently boots.
        None if booted => SlotState::Good,
        None => SlotState::Bad,
    };
    SlotStatus {
        version: version.cloned(),
        state,
        tries: env.filter(|e| e.trial).map_or(0, |e| e.tries),
    }
}

/// The marker of the trial a trial boot belongs to: the slot, the
/// release, and when the update was installed.
pub fn trial_marker(booted: Slot, version: Option<&str>, trial: Option<&Trial>) -> String {
    format!(
        "{booted} {} {}",
        version.unwrap_or("unknown"),
        trial.map_or("-", |t| t.started_at.as_str())
    )
}

/// Decides what this boot is and what to do about it (pure).
pub fn decide(f: &Facts) -> BootPlan {
    let booted = f.booted;
    let other = booted.other();
    let version = |v: &Option<String>| v.clone().unwrap_or_else(|| "an unknown release".to_owned());
    let mut plan = BootPlan {
        kind: Kind::Committed,
        write_rollback: None,
        restore_snapshot: false,
        retire_trial: None,
        end_trial: false,
        take_snapshot: None,
        status: BootStatus {
            format: FORMAT,
            booted_slot: booted,
            booted_version: f.booted_version.clone(),
            a: SlotStatus {
                version: None,
                state: SlotState::Empty,
                tries: 0,
            },
            b: SlotStatus {
                version: None,
                state: SlotState::Empty,
                tries: 0,
            },
            committed: true,
            trial: false,
            degraded: f.words.degraded,
            trial_deadline_secs: None,
            last_rollback: f.rollback.clone(),
        },
        console: None,
        journal: String::new(),
    };
    let booted_env = f.env.as_ref().map(|e| e.slot(booted));
    let other_env = f.env.as_ref().map(|e| e.slot(other));
    let mut own = slot_status(booted_env, f.booted_version.as_ref(), true);
    let mut theirs = slot_status(other_env, f.other_version.as_ref(), false);

    match (&f.env, booted_env, other_env) {
        _ if f.words.degraded => {
            plan.kind = Kind::Degraded;
        }
        (None, _, _) => plan.kind = Kind::Degraded,
        (Some(_), Some(b), _) if b.trial && b.ok => {
            plan.kind = Kind::Trial { tries: b.tries };
            plan.status.committed = false;
            plan.status.trial = true;
            plan.status.trial_deadline_secs = Some(f.words.trial_deadline.unwrap_or(DEFAULT_TRIAL_DEADLINE_SECS));
            let marker = trial_marker(booted, f.booted_version.as_deref(), f.trial.as_ref());
            if f.snapshot_for.as_deref() != Some(marker.as_str()) {
                plan.take_snapshot = Some(marker);
            }
        }
        (Some(env), Some(_), Some(o)) if env.committed == booted && o.trial && !o.ok => {
            plan.kind = Kind::RolledBack;
            // The trial record says why, when it is this slot's trial.
            let trial = f.trial.as_ref().filter(|t| t.to_slot == other);
            let reason = trial.map_or_else(
                || format!("it did not come up in {MAX_TRIES} tries (no report: kernel or early boot failure)"),
                Trial::rollback_reason,
            );
            let from = trial.map(|t| t.to_version.clone()).or_else(|| f.other_version.clone());
            let rollback = Rollback {
                format: FORMAT,
                from: version(&from),
                to: version(&f.booted_version),
                reason,
                at: f.now.clone(),
                acknowledged: false,
            };
            plan.status.last_rollback = Some(rollback.clone());
            plan.write_rollback = Some(rollback);
            plan.restore_snapshot = f.snapshot_for.is_some();
            plan.retire_trial = Some(other);
            plan.end_trial = true;
            // After the effects, the failed slot reads as bad.
            theirs.state = SlotState::Bad;
            theirs.tries = 0;
        }
        _ => {}
    }
    if plan.kind == Kind::Degraded {
        own.state = SlotState::Good;
    }
    match booted {
        Slot::A => (plan.status.a, plan.status.b) = (own, theirs),
        Slot::B => (plan.status.b, plan.status.a) = (own, theirs),
    }
    plan.console = console_text(&plan.status);
    plan.journal = match &plan.kind {
        Kind::Committed => format!("committed boot of {} in slot {booted}", version(&f.booted_version)),
        Kind::Trial { tries } => format!(
            "trial boot of {} in slot {booted}: try {tries} of {MAX_TRIES}",
            version(&f.booted_version)
        ),
        Kind::RolledBack => plan.write_rollback.as_ref().map(Rollback::message).unwrap_or_default(),
        Kind::Degraded => format!(
            "degraded boot of {} in slot {booted}: no usable boot environment",
            version(&f.booted_version)
        ),
    };
    plan
}

/// The console's text for a boot status: an unacknowledged rollback, a
/// degraded boot, a trial. `None` when there is nothing to say.
pub fn console_text(status: &BootStatus) -> Option<String> {
    let mut lines = Vec::new();
    if let Some(r) = status.last_rollback.as_ref().filter(|r| !r.acknowledged) {
        lines.push(format!(
            "Archipelago OS: {} (at {}). Acknowledge with: archy-agent os acknowledge",
            r.message(),
            r.at
        ));
    }
    if status.degraded {
        lines.push(
            "Archipelago OS: degraded boot: the boot environment could not be read; updates are refused until it is repaired"
                .to_owned(),
        );
    }
    if status.trial {
        let s = status.slot(status.booted_slot);
        lines.push(format!(
            "Archipelago OS: release {} on trial in slot {} (try {} of {MAX_TRIES}); app changes wait for the commit",
            status.booted_version.as_deref().unwrap_or("unknown"),
            status.booted_slot,
            s.tries
        ));
    }
    (!lines.is_empty()).then(|| lines.join("\n") + "\n")
}

/// Where boot-prepare reads and writes (each overridable for tests).
#[derive(Debug, Clone)]
pub struct Paths {
    pub cmdline: PathBuf,
    pub data: DataRoot,
    /// Where the ESP is (or gets) mounted.
    pub esp_dir: PathBuf,
    /// boot.json.
    pub boot_json: PathBuf,
    /// Where RAUC's `system.conf` is written.
    pub system_conf: PathBuf,
    /// The live medium the booted slot's release is on.
    pub medium: PathBuf,
    pub issue: PathBuf,
    /// `/dev/disk` (its `by-partuuid/` links).
    pub disk_dir: PathBuf,
    /// Mount the ESP (false when the test mounted it already).
    pub mount_esp: bool,
}

impl Paths {
    pub fn node(data: DataRoot) -> Paths {
        Paths {
            cmdline: PathBuf::from("/proc/cmdline"),
            data,
            esp_dir: PathBuf::from(ESP_DIR),
            boot_json: PathBuf::from(BOOT_JSON),
            system_conf: Path::new(records::RUN_OS_DIR).join("system.conf"),
            medium: PathBuf::from(super::medium::MEDIUM_DIR),
            issue: PathBuf::from(ISSUE_FILE),
            disk_dir: PathBuf::from(crate::datadisk::DISK_DIR),
            mount_esp: true,
        }
    }

    /// The boot environment's folder on the ESP.
    pub fn grub_dir(&self) -> PathBuf {
        self.esp_dir.join(super::grub::GRUB_DIR)
    }
}

/// Whether `dir` is a mount point (its device differs from its parent's).
fn is_mount_point(dir: &Path) -> bool {
    let (Ok(m), Some(Ok(p))) = (fs::metadata(dir), dir.parent().map(fs::metadata)) else {
        return false;
    };
    m.dev() != p.dev() || m.ino() == p.ino()
}

/// Mounts the ESP `partuuid` (through `disk_dir`'s `by-partuuid/` link)
/// at `dir` (0700, vfat, root only), unless it is mounted there already.
/// Returns the partition's device node.
pub fn mount_esp(partuuid: &str, disk_dir: &Path, dir: &Path, mount: bool) -> anyhow::Result<PathBuf> {
    let link = disk_dir.join("by-partuuid").join(partuuid);
    let node = fs::canonicalize(&link).with_context(|| {
        format!(
            "archipelago.esp=PARTUUID={partuuid}: {} does not resolve",
            link.display()
        )
    })?;
    if !mount || is_mount_point(dir) {
        return Ok(node);
    }
    records::ensure_dir(dir, 0o700).with_context(|| format!("cannot create {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot make {} 0700", dir.display()))?;
    crate::mount::run(
        Command::new("mount")
            .args(["-t", "vfat", "-o", "umask=0077,nodev,nosuid,noexec,flush"])
            .arg(&node)
            .arg(dir),
        "mount",
        "mount",
    )
    .with_context(|| format!("cannot mount the ESP {} at {}", node.display(), dir.display()))?;
    Ok(node)
}

/// The whole disk a partition node lies on (sysfs: the partition's
/// folder is inside its disk's).
pub fn disk_of(partition: &Path) -> anyhow::Result<PathBuf> {
    let name = partition
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{} has no device name", partition.display()))?;
    let sys = fs::canonicalize(Path::new("/sys/class/block").join(name))
        .with_context(|| format!("cannot find {name} in /sys/class/block"))?;
    let disk = sys
        .parent()
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str())
        .with_context(|| format!("{}: no parent disk", sys.display()))?;
    Ok(Path::new("/dev").join(disk))
}

/// The release in the slot partition `node`, mounted read-only for a
/// moment; `None` when the slot holds none (or none readable).
fn slot_release(node: &Path) -> Option<Release> {
    let mounted = crate::mount::Mounted::with(node, "ext4", "ro,noload,nodev,nosuid,noexec").ok()?;
    let release = Release::read(&mounted.dir.join(RELEASE_FILE)).ok();
    if let Err(e) = mounted.unmount() {
        tracing::warn!(error = %format!("{e:#}"), "cannot unmount the other slot");
    }
    release
}

/// Copies `src` (a folder) to `dst` (which must not exist): files,
/// folders and symlinks, with their modes and owners.
fn copy_tree(src: &Path, dst: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(src)?;
    fs::create_dir(dst)?;
    for entry in fs::read_dir(src)? {
        let entry = entry?;
        let (from, to) = (entry.path(), dst.join(entry.file_name()));
        let ft = entry.file_type()?;
        if ft.is_dir() {
            copy_tree(&from, &to)?;
        } else if ft.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&from)?, &to)?;
        } else if ft.is_file() {
            let m = entry.metadata()?;
            fs::copy(&from, &to)?;
            fs::File::open(&to)?.sync_all()?;
            std::os::unix::fs::lchown(&to, Some(m.uid()), Some(m.gid()))?;
            fs::set_permissions(&to, fs::Permissions::from_mode(m.mode() & 0o7777))?;
        }
        // Sockets, fifos, devices: not state; skipped.
    }
    std::os::unix::fs::lchown(dst, Some(meta.uid()), Some(meta.gid()))?;
    fs::set_permissions(dst, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
    fs::File::open(dst)?.sync_all()
}

fn remove_tree(dir: &Path) -> io::Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// Takes the state snapshot: `<data>/state/` copied into a temporary
/// folder, the marker written, then renamed into place (a crash leaves no
/// half snapshot under the real name).
pub fn take_snapshot(data: &DataRoot, marker: &str) -> anyhow::Result<()> {
    let os = data.os_dir();
    records::ensure_dir(&os, RECORD_DIR_MODE).with_context(|| format!("cannot create {}", os.display()))?;
    let snap = data.os_state_snapshot();
    let tmp = os.join("state-snapshot.tmp");
    remove_tree(&tmp).with_context(|| format!("cannot remove {}", tmp.display()))?;
    let state = data.state_dir();
    if state.is_dir() {
        copy_tree(&state, &tmp).with_context(|| format!("cannot copy {} to {}", state.display(), tmp.display()))?;
    } else {
        fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    }
    crate::fsutil::write_atomic(&tmp.join(SNAPSHOT_MARKER), format!("{marker}\n").as_bytes(), 0o600)
        .with_context(|| format!("cannot write the marker in {}", tmp.display()))?;
    remove_tree(&snap).with_context(|| format!("cannot remove the old {}", snap.display()))?;
    fs::rename(&tmp, &snap).with_context(|| format!("cannot rename {} to {}", tmp.display(), snap.display()))?;
    sync_dir(&os).with_context(|| format!("cannot sync {}", os.display()))?;
    Ok(())
}

/// What the snapshot was taken for (its marker), if there is one.
pub fn snapshot_marker(data: &DataRoot) -> Option<String> {
    fs::read_to_string(data.os_state_snapshot().join(SNAPSHOT_MARKER))
        .ok()
        .map(|s| s.trim().to_owned())
}

/// Puts `<data>/state/` back from the snapshot: copied beside it first,
/// then swapped in by two renames. Idempotent: a crash between them
/// leaves no `state/`, and the next boot (which finds the same rollback)
/// does it again.
pub fn restore_snapshot(data: &DataRoot) -> anyhow::Result<()> {
    let os = data.os_dir();
    let snap = data.os_state_snapshot();
    let fresh = os.join("state-restore");
    let old = os.join("state-replaced");
    remove_tree(&fresh).with_context(|| format!("cannot remove {}", fresh.display()))?;
    copy_tree(&snap, &fresh).with_context(|| format!("cannot copy {} to {}", snap.display(), fresh.display()))?;
    let _ = fs::remove_file(fresh.join(SNAPSHOT_MARKER));
    let state = data.state_dir();
    remove_tree(&old).with_context(|| format!("cannot remove {}", old.display()))?;
    if state.exists() {
        fs::rename(&state, &old).with_context(|| format!("cannot move {} aside", state.display()))?;
    }
    fs::rename(&fresh, &state).with_context(|| format!("cannot move {} to {}", fresh.display(), state.display()))?;
    sync_dir(data.path()).with_context(|| format!("cannot sync {}", data.display()))?;
    remove_tree(&old).with_context(|| format!("cannot remove {}", old.display()))?;
    Ok(())
}

/// Writes (or removes, for `None`) the console line, and asks agetty to
/// show it when agetty is there.
pub fn write_console(issue: &Path, text: Option<&str>) -> anyhow::Result<()> {
    match text {
        Some(t) => crate::fsutil::write_atomic(issue, t.as_bytes(), 0o644)
            .with_context(|| format!("cannot write {}", issue.display()))?,
        None => match fs::remove_file(issue) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("cannot remove {}", issue.display()))
            }
            _ => {}
        },
    }
    let agetty = ["/usr/sbin/agetty", "/sbin/agetty"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    if let Some(agetty) = agetty {
        // Best effort: the line shows at the next prompt anyway.
        let _ = Command::new(agetty)
            .arg("--reload")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    Ok(())
}

/// The outcome of boot-prepare, for its caller's last line.
#[derive(Debug)]
pub enum Prepared {
    /// Not a boot from an installed disk (no `rauc.slot=`).
    NotInstalled,
    Done(Box<BootPlan>),
}

/// The slot partitions of the disk the ESP is on: (A, B) device nodes and
/// PARTUUIDs.
pub struct SlotParts {
    pub a: (PathBuf, String),
    pub b: (PathBuf, String),
}

impl SlotParts {
    pub fn of_disk(disk: &Path) -> anyhow::Result<SlotParts> {
        let parts = super::partition::read_layout(disk)?
            .with_context(|| format!("{}: does not hold the Archipelago layout", disk.display()))?;
        let p = |part: super::layout::Part| {
            let f = &parts[(part.number() - 1) as usize];
            (PathBuf::from(&f.node), f.partuuid.clone())
        };
        Ok(SlotParts {
            a: p(super::layout::Part::SlotA),
            b: p(super::layout::Part::SlotB),
        })
    }

    pub fn node(&self, s: Slot) -> &Path {
        match s {
            Slot::A => &self.a.0,
            Slot::B => &self.b.0,
        }
    }
}

/// Renders RAUC's `system.conf` for these slots (`update::rauc_conf`)
/// into `path`, and makes the data partition's OS folder its status file
/// lives in.
fn write_system_conf(path: &Path, slots: &SlotParts, data: &DataRoot) -> anyhow::Result<()> {
    use super::update::rauc_conf::{render, RaucConf};
    let conf = RaucConf::node(
        super::release::ARCHITECTURE,
        &slots.a.1,
        &slots.b.1,
        data.os_rauc_status(),
    );
    let text = render(&conf)?;
    records::ensure_dir(&data.os_dir(), RECORD_DIR_MODE)
        .with_context(|| format!("cannot create {}", data.os_dir().display()))?;
    if let Some(dir) = path.parent() {
        records::ensure_dir(dir, records::RUN_OS_DIR_MODE)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    crate::fsutil::write_atomic(path, text.as_bytes(), 0o644)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// boot-prepare, all of it. `env_for` opens the boot environment in the
/// ESP's grub folder.
pub fn prepare<E: EnvAccess>(paths: &Paths, env_for: impl FnOnce(PathBuf) -> E) -> anyhow::Result<Prepared> {
    let words = super::cmdline::read(&paths.cmdline)?;
    let Some(booted) = words.rauc_slot else {
        return Ok(Prepared::NotInstalled);
    };
    let Some(esp) = words.esp.as_ref().map(|p| p.as_str().to_owned()) else {
        bail!(
            "{}: rauc.slot={booted} without archipelago.esp=PARTUUID=…: cannot find the boot environment",
            paths.cmdline.display()
        );
    };
    let esp_node = mount_esp(&esp, &paths.disk_dir, &paths.esp_dir, paths.mount_esp)?;
    let slots = SlotParts::of_disk(&disk_of(&esp_node)?)?;
    write_system_conf(&paths.system_conf, &slots, &paths.data)?;

    let store = env_for(paths.grub_dir());
    let env = match store.read_env() {
        Ok(e) => Some(e),
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "cannot read the boot environment");
            None
        }
    };
    let booted_version = Release::read(&paths.medium.join(RELEASE_FILE)).ok().map(|r| r.version);
    let other_version = slot_release(slots.node(booted.other())).map(|r| r.version);
    let data = &paths.data;
    let facts = Facts {
        booted,
        words,
        env,
        booted_version,
        other_version,
        trial: Trial::read(&data.os_trial())?,
        snapshot_for: snapshot_marker(data),
        rollback: Rollback::read(&data.os_rollback())?,
        now: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
    };
    let plan = decide(&facts);
    apply(paths, &plan, &store)?;
    Ok(Prepared::Done(Box::new(plan)))
}

/// The effects of `plan`, in its order.
pub fn apply(paths: &Paths, plan: &BootPlan, store: &impl EnvAccess) -> anyhow::Result<()> {
    let data = &paths.data;
    if let Some(r) = &plan.write_rollback {
        r.write(&data.os_rollback())?;
    }
    if plan.restore_snapshot {
        restore_snapshot(data)?;
    }
    if let Some(slot) = plan.retire_trial {
        store.retire_trial(slot)?;
    }
    if plan.end_trial {
        records::remove(&data.os_trial())?;
        remove_tree(&data.os_state_snapshot())
            .with_context(|| format!("cannot remove {}", data.os_state_snapshot().display()))?;
    }
    if let Some(marker) = &plan.take_snapshot {
        take_snapshot(data, marker)?;
    }
    plan.status.write(&paths.boot_json)?;
    write_console(&paths.issue, plan.console.as_deref())?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::os::records::TrialFailure;

    fn words(slot: Slot) -> Cmdline {
        Cmdline {
            rauc_slot: Some(slot),
            ..Cmdline::default()
        }
    }

    fn env(a: (bool, bool, u8), b: (bool, bool, u8), committed: Slot) -> Option<BootEnv> {
        let s = |(ok, trial, tries)| SlotBoot { ok, trial, tries };
        Some(BootEnv {
            a: s(a),
            b: s(b),
            committed,
            ..BootEnv::fresh()
        })
    }

    fn trial(failures: &[&str]) -> Trial {
        Trial {
            format: FORMAT,
            from_version: "1.0.0".into(),
            to_version: "2.0.0".into(),
            to_slot: Slot::B,
            healthy_before: vec!["wallet".into()],
            started_at: "2026-12-02T10:00:00Z".into(),
            failures: failures
                .iter()
                .enumerate()
                .map(|(i, r)| TrialFailure {
                    try_n: i as u8 + 1,
                    reason: (*r).into(),
                })
                .collect(),
        }
    }

    fn facts(booted: Slot, env: Option<BootEnv>) -> Facts {
        let (bv, ov) = match booted {
            Slot::A => ("1.0.0", "2.0.0"),
            Slot::B => ("2.0.0", "1.0.0"),
        };
        Facts {
            booted,
            words: words(booted),
            env,
            booted_version: Some(bv.into()),
            other_version: Some(ov.into()),
            trial: None,
            snapshot_for: None,
            rollback: None,
            now: "2026-12-02T11:00:00Z".into(),
        }
    }

    #[test]
    fn a_committed_boot_does_nothing_and_says_so() {
        let p = decide(&facts(Slot::A, env((true, false, 0), (false, false, 0), Slot::A)));
        assert_eq!(p.kind, Kind::Committed);
        assert!(p.write_rollback.is_none() && !p.restore_snapshot && p.take_snapshot.is_none() && !p.end_trial);
        assert!(p.status.committed && !p.status.trial);
        assert_eq!(p.status.a.state, SlotState::Good);
        assert_eq!(p.status.b.state, SlotState::Bad);
        assert_eq!(p.console, None);
        assert_eq!(p.journal, "committed boot of 1.0.0 in slot A");
    }

    #[test]
    fn an_installed_update_waiting_for_its_reboot_is_not_a_rollback() {
        // B was made primary (ok, trial, tries 0); A still runs, committed.
        let p = decide(&facts(Slot::A, env((true, false, 0), (true, true, 0), Slot::A)));
        assert_eq!(p.kind, Kind::Committed);
        assert_eq!(p.status.b.state, SlotState::Trying);
        assert_eq!(p.status.b.to_string(), "trying 0 of 3");
    }

    #[test]
    fn a_trial_boot_snapshots_the_state_once_per_trial() {
        let mut f = facts(Slot::B, env((true, false, 0), (true, true, 1), Slot::A));
        f.trial = Some(trial(&[]));
        let p = decide(&f);
        assert_eq!(p.kind, Kind::Trial { tries: 1 });
        assert!(p.status.trial && !p.status.committed);
        assert_eq!(p.status.trial_deadline_secs, Some(DEFAULT_TRIAL_DEADLINE_SECS));
        let marker = p.take_snapshot.clone().unwrap();
        assert_eq!(marker, "B 2.0.0 2026-12-02T10:00:00Z");
        assert_eq!(p.status.b.to_string(), "trying 1 of 3");
        assert!(p
            .console
            .unwrap()
            .contains("release 2.0.0 on trial in slot B (try 1 of 3)"));
        // The second try finds the snapshot taken for this trial.
        f.env = env((true, false, 0), (true, true, 2), Slot::A);
        f.snapshot_for = Some(marker);
        let p = decide(&f);
        assert_eq!(p.kind, Kind::Trial { tries: 2 });
        assert_eq!(p.take_snapshot, None);
        // A snapshot of an earlier trial is replaced.
        f.snapshot_for = Some("B 1.5.0 2026-01-01T00:00:00Z".into());
        assert!(decide(&f).take_snapshot.is_some());
        f.words.trial_deadline = Some(60);
        assert_eq!(decide(&f).status.trial_deadline_secs, Some(60));
    }

    #[test]
    fn a_rollback_with_reported_failures_names_them() {
        let mut f = facts(Slot::A, env((true, false, 0), (false, true, 3), Slot::A));
        f.trial = Some(trial(&[
            "app wallet is not healthy",
            "app wallet is not healthy",
            "unit x failed",
        ]));
        f.snapshot_for = Some("B 2.0.0 2026-12-02T10:00:00Z".into());
        let p = decide(&f);
        assert_eq!(p.kind, Kind::RolledBack);
        let r = p.write_rollback.clone().unwrap();
        assert_eq!(
            r.message(),
            "rolled back from 2.0.0 to 1.0.0: try 1: app wallet is not healthy; try 2: app wallet is not healthy; try 3: unit x failed"
        );
        assert!(!r.acknowledged);
        assert!(p.restore_snapshot && p.end_trial);
        assert_eq!(p.retire_trial, Some(Slot::B));
        assert_eq!(p.status.last_rollback, Some(r));
        assert_eq!(p.status.b.state, SlotState::Bad);
        assert!(p.status.committed && !p.status.trial);
        let console = p.console.unwrap();
        assert!(console.contains("rolled back from 2.0.0 to 1.0.0") && console.contains("os acknowledge"));
        assert!(p.journal.starts_with("rolled back from 2.0.0 to 1.0.0: try 1"));
    }

    #[test]
    fn a_rollback_without_a_report_says_the_release_never_came_up() {
        let mut f = facts(Slot::A, env((true, false, 0), (false, true, 3), Slot::A));
        f.trial = Some(trial(&[]));
        let p = decide(&f);
        assert_eq!(
            p.write_rollback.unwrap().message(),
            "rolled back from 2.0.0 to 1.0.0: it did not come up in 3 tries (no report: kernel or early boot failure)"
        );
        // No snapshot (the new agent never ran): nothing to restore.
        assert!(!p.restore_snapshot);
        // Without trial.json, the other slot's release names it.
        f.trial = None;
        assert_eq!(decide(&f).write_rollback.unwrap().from, "2.0.0");
    }

    #[test]
    fn a_retired_trial_is_not_found_twice_and_an_acknowledged_rollback_is_quiet() {
        // After the first rollback boot: B bad, trial cleared.
        let mut f = facts(Slot::A, env((true, false, 0), (false, false, 0), Slot::A));
        let mut r = Rollback {
            format: FORMAT,
            from: "2.0.0".into(),
            to: "1.0.0".into(),
            reason: "x".into(),
            at: "t".into(),
            acknowledged: false,
        };
        f.rollback = Some(r.clone());
        let p = decide(&f);
        assert_eq!(p.kind, Kind::Committed);
        assert!(p.write_rollback.is_none());
        assert_eq!(p.status.last_rollback, Some(r.clone()));
        assert!(p.console.unwrap().contains("rolled back"), "shown until acknowledged");
        r.acknowledged = true;
        f.rollback = Some(r);
        assert_eq!(decide(&f).console, None);
    }

    #[test]
    fn a_degraded_boot_is_said_and_freezes_nothing() {
        let mut f = facts(Slot::A, None);
        let p = decide(&f);
        assert_eq!(p.kind, Kind::Degraded);
        f.words.degraded = true;
        f.env = env((true, false, 0), (true, true, 1), Slot::A);
        let p = decide(&f);
        assert_eq!(p.kind, Kind::Degraded);
        assert!(p.status.degraded && !p.status.trial);
        assert!(p.console.unwrap().contains("degraded boot"));
        assert!(p.take_snapshot.is_none() && p.write_rollback.is_none());
    }

    #[test]
    fn snapshot_restore_puts_the_old_state_back_and_take_replaces_an_old_one() {
        let tmp = tempfile::tempdir().unwrap();
        let data = DataRoot::new(tmp.path());
        fs::create_dir_all(data.held_dir()).unwrap();
        fs::write(data.agent_state(), b"old").unwrap();
        fs::write(data.held_marker("wallet"), b"").unwrap();
        take_snapshot(&data, "B 2.0.0 t").unwrap();
        assert_eq!(snapshot_marker(&data).as_deref(), Some("B 2.0.0 t"));
        assert_eq!(fs::metadata(data.os_dir()).unwrap().permissions().mode() & 0o777, 0o700);
        // The new agent changes the state.
        fs::write(data.agent_state(), b"new").unwrap();
        fs::remove_file(data.held_marker("wallet")).unwrap();
        fs::write(data.state_dir().join("new-only"), b"x").unwrap();
        restore_snapshot(&data).unwrap();
        assert_eq!(fs::read(data.agent_state()).unwrap(), b"old");
        assert!(data.held_marker("wallet").exists());
        assert!(!data.state_dir().join("new-only").exists());
        assert!(!data.state_dir().join(SNAPSHOT_MARKER).exists());
        // Taking one again replaces it.
        take_snapshot(&data, "A 3.0.0 u").unwrap();
        assert_eq!(snapshot_marker(&data).as_deref(), Some("A 3.0.0 u"));
        let names: Vec<_> = fs::read_dir(data.os_dir())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }
}
