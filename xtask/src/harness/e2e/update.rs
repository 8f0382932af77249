//! The update scenarios (issue 16): signed A/B updates with RAUC, GRUB's
//! boot counting and the rollbacks, on the installed disk.
//!
//! Bundles reach the guest on a read-only ext4 disk labelled
//! [`UPDATES_LABEL`] (copying 300 MB over TCG's user-mode network takes
//! minutes): the probe (root) mounts it read-only at [`UPDATES_MOUNT`] when
//! it is attached, and the host drives `archy-agent os update` over SSH as
//! `archipelago` (the agent's root helper does the privileged part).
//!
//! The good update is v1's own live files in a bundle whose `release.json`
//! names a higher version (a second build of the same inputs would differ
//! in nothing the node looks at, and would cost a second ISO build); the bad
//! and refused bundles are built small here, signed by the run's release
//! key (`pipeline::bundle::write_bundle`) or by a key made for the run.
//!
//! OVMF, on the installed disk, sharing the install sequence's last boot:
//! 1. **good**: that boot (the disk again after the reinstall, with its
//!    own checks) installs v2 with `--reboot`; the next boot runs v2 from
//!    slot b, commits it within the deadline with the same containers.
//! 2. **never healthy**: installed from v2's committed boot with `--reboot`;
//!    its own kernel words (`live/bootargs`) shorten the deadline and make
//!    the check fail: three tries, then the boot back on v2, which says so.
//! 3. **refusals**: that boot refuses each bad bundle with its reason;
//!    after power-off the host reads the inactive slot (a, the failed
//!    release): its bytes unchanged. The owner, logged in as archipelago,
//!    acknowledges the rollback.
//!
//! SeaBIOS, on a copy of the installed disk taken right after the install
//! (so both sequences run side by side), after its live boots:
//! 4. **broken initrd**: installed with `--reboot`; three tries panic (the
//!    kernel reboots itself), then the boot back on v1, which says so.
//! 5. **power cuts**: QEMU killed while the slot is being written (seen on
//!    the host: the slot's first bytes change), then, in a boot whose clock
//!    says 2000-01-01 (`-rtc base=`: a valid bundle is still accepted),
//!    killed right after the update switched slots: each next boot comes up
//!    on a good release (v1, then v2 on trial and committed).

use std::fs;
use std::io::{BufRead as _, BufReader, Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use serde_json::Value;
use xshell::{cmd, Shell};

use super::disks::{self, Table, MIB};
use super::install::{Installed, LastBoot};
use super::qemu::{boot, AfterTurn, BootReport, Disk, Ending, Firmware, Guest, Start};
use super::ssh::{self, Endpoint, TestKey};
use super::{progress, STAGE};
use crate::pipeline::bundle as pipeline_bundle;
use crate::pipeline::{flags, keys};
use archy_agent::os::release::{Release, Version, BOOTARGS_FILE, RELEASE_FILE};

/// The label of the bundles' disk, and its virtio serial.
pub(super) const UPDATES_LABEL: &str = "ARCHY-UPDATES";
pub(super) const UPDATES_SERIAL: &str = "archy-updates";
/// Where the probe mounts it in the guest (read-only).
pub(super) const UPDATES_MOUNT: &str = "/run/archy-e2e/updates";
/// The test-only kernel words of the never-healthy release: a short trial
/// deadline and a check that always fails.
pub(super) const UNHEALTHY_ARGS: &str = "archipelago.trial_deadline=60 archipelago.test.unhealthy";
/// Boots GRUB gives a release on trial before it falls back.
const TRIES: usize = 3;
/// How long the host waits for sshd after the probe handed it the turn.
const SSH_PATIENCE: Duration = Duration::from_secs(120);
/// How long a trial may take to be committed (the product's deadline is
/// the agent's; this only bounds the wait).
const COMMIT_PATIENCE: Duration = Duration::from_secs(600);
/// A boot that installs an update: the boot, then the bundle's copy and
/// the slot write under TCG.
const UPDATE_BOOT_TIMEOUT: Duration = Duration::from_secs(1800);
/// A boot that panics needs GRUB, the kernel and `panic=`'s delay.
const PANIC_TIMEOUT: Duration = Duration::from_secs(300);
/// The guest's clock in the wrong-clock boot.
const WRONG_CLOCK: &str = "2000-01-01";
/// Slot a's and b's partitions in the installed table
/// (docs/disk-layout.md): vda3, vda4.
const SLOT_A: usize = 2;
const SLOT_B: usize = 3;

/// One bundle on the updates disk: its file name, and for a refused one
/// what the refusal must say (any of these words, case-insensitive).
#[derive(Debug, Clone, Copy)]
pub(super) struct Bundle {
    pub(super) file: &'static str,
    pub(super) refused_for: &'static [&'static str],
}

pub(super) const GOOD: Bundle = Bundle {
    file: "v2.raucb",
    refused_for: &[],
};
pub(super) const BROKEN_INITRD: Bundle = Bundle {
    file: "broken-initrd.raucb",
    refused_for: &[],
};
pub(super) const NEVER_HEALTHY: Bundle = Bundle {
    file: "never-healthy.raucb",
    refused_for: &[],
};
/// The refused ones, each with its reason.
pub(super) const REFUSED: &[Bundle] = &[
    Bundle {
        file: "flipped-byte.raucb",
        refused_for: &["signature", "verif"],
    },
    Bundle {
        file: "other-key.raucb",
        refused_for: &["signature", "verif", "certificate", "signer"],
    },
    Bundle {
        file: "truncated-signature.raucb",
        refused_for: &["signature", "verif", "cms", "bundle"],
    },
    Bundle {
        file: "older.raucb",
        refused_for: &["older", "downgrade"],
    },
    Bundle {
        file: "other-arch.raucb",
        refused_for: &["compatible", "architecture", "arm64"],
    },
];

/// The versions of the run's releases: v1 is the ISO's (the workspace
/// version), the others count up from it; the older one is below it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Versions {
    pub(super) v1: String,
    pub(super) v2: String,
    pub(super) broken: String,
    pub(super) never_healthy: String,
    pub(super) older: String,
}

impl Versions {
    pub(super) fn from(v1: &str) -> anyhow::Result<Versions> {
        let parts: Vec<u64> = v1
            .split(['-', '+'])
            .next()
            .unwrap_or_default()
            .split('.')
            .map(str::parse)
            .collect::<Result<_, _>>()
            .with_context(|| format!("the release version {v1:?} is not major.minor.patch"))?;
        let [major, minor, patch] = parts[..] else {
            bail!("the release version {v1:?} is not major.minor.patch");
        };
        let up = |n: u64| format!("{major}.{}.0", minor + n);
        let older = if patch > 0 {
            format!("{major}.{minor}.{}", patch - 1)
        } else if minor > 0 {
            format!("{major}.{}.0", minor - 1)
        } else if major > 0 {
            format!("{}.0.0", major - 1)
        } else {
            bail!("the release version {v1:?} has no older version to refuse");
        };
        Ok(Versions {
            v1: v1.to_owned(),
            v2: up(1),
            broken: up(2),
            never_healthy: up(3),
            older,
        })
    }
}

/// `bundle` with one byte flipped halfway through its payload (before the
/// signature): the signature no longer matches.
pub(super) fn flip_byte(bundle: &[u8]) -> anyhow::Result<Vec<u8>> {
    let (payload, _) = split_signature(bundle)?;
    let mut out = bundle.to_vec();
    let at = payload / 2;
    out[at] ^= 0xff;
    Ok(out)
}

/// `bundle` with its CMS signature cut short by `cut` bytes, the size
/// trailer saying so (a well-framed bundle whose signature is broken).
pub(super) fn truncate_signature(bundle: &[u8], cut: usize) -> anyhow::Result<Vec<u8>> {
    let (payload, signature) = split_signature(bundle)?;
    ensure!(
        cut < signature,
        "cannot cut {cut} bytes off a {signature}-byte signature"
    );
    let kept = signature - cut;
    let mut out = bundle[..payload + kept].to_vec();
    out.extend_from_slice(&(kept as u64).to_be_bytes());
    Ok(out)
}

/// A plain RAUC bundle: the payload (squashfs), the CMS signature, then
/// the signature's size as a big-endian u64. Returns (payload length,
/// signature length).
fn split_signature(bundle: &[u8]) -> anyhow::Result<(usize, usize)> {
    let trailer: [u8; 8] = bundle
        .len()
        .checked_sub(8)
        .and_then(|at| bundle[at..].try_into().ok())
        .context("a bundle shorter than its 8-byte signature size")?;
    let signature = usize::try_from(u64::from_be_bytes(trailer)).context("the signature size")?;
    let payload = bundle
        .len()
        .checked_sub(8 + signature)
        .filter(|p| *p > 0)
        .with_context(|| {
            format!(
                "a {}-byte bundle cannot hold a {signature}-byte signature",
                bundle.len()
            )
        })?;
    Ok((payload, signature))
}

/// The bundles of a run, on their read-only disk.
#[derive(Debug, Clone)]
pub(super) struct Bundles {
    pub(super) disk: Disk,
    pub(super) versions: Versions,
    /// When they were signed (seconds since 1970, the host's clock).
    pub(super) signed_at: u64,
}

/// Builds every bundle into `work/updates/` and the disk holding them.
/// `iso` gives v1's live files; the release key is the build's
/// (`pipeline::keys`, the one the ISO's keyring trusts).
pub(super) fn build(sh: &Shell, root: &Path, work: &Path, iso: &Path) -> anyhow::Result<Bundles> {
    let versions = Versions::from(flags::VERSION)?;
    let dir = work.join("updates");
    let files = dir.join("files");
    let live = work.join("v1-live");
    fs::create_dir_all(&files).with_context(|| format!("creating {}", files.display()))?;
    progress::say(STAGE, "update bundles: v1's live files from the ISO");
    extract_live(sh, iso, &live)?;
    let (key, _) = keys::development(sh, &flags::target_dir(root).join(keys::DEV_KEYS_SUBDIR))
        .context("the build's signing key")?;
    let arch = "amd64";
    let v1 = |name: &str| live.join(name.trim_start_matches("live/"));
    let junk = |name: &str, bytes: &[u8]| -> anyhow::Result<PathBuf> {
        let p = dir.join(name);
        fs::write(&p, bytes).with_context(|| format!("writing {}", p.display()))?;
        Ok(p)
    };
    let make = |bundle: &str, members: &[(&str, PathBuf)], version: &str, arch: &str, key: &keys::SigningKey| {
        let stage = dir.join(format!("stage-{bundle}"));
        release_tree(&stage, members, version, arch)?;
        let written = write_staged(sh, &stage, &dir.join("out"), version, arch, key)?;
        let to = files.join(bundle);
        fs::rename(&written, &to).with_context(|| format!("moving {} to {}", written.display(), to.display()))?;
        fs::remove_dir_all(&stage).with_context(|| format!("removing {}", stage.display()))?;
        anyhow::Ok(to)
    };
    let live_files = ["live/vmlinuz", "live/initrd.img", "live/filesystem.squashfs"];
    let v1_members: Vec<(&str, PathBuf)> = live_files.iter().map(|n| (*n, v1(n))).collect();

    progress::say(STAGE, &format!("update bundles: v2 ({})", versions.v2));
    make(GOOD.file, &v1_members, &versions.v2, arch, &key)?;

    progress::say(
        STAGE,
        "update bundles: never healthy (v1's files, its own kernel words)",
    );
    let args = dir.join("bootargs");
    bootargs(sh, &args, UNHEALTHY_ARGS)?;
    let mut members = v1_members.clone();
    members.push((BOOTARGS_FILE, args));
    make(NEVER_HEALTHY.file, &members, &versions.never_healthy, arch, &key)?;

    progress::say(STAGE, "update bundles: broken initrd, and the refused ones (small)");
    // Not an initramfs: the kernel finds no root and panics. The squashfs
    // is never reached.
    let broken = [
        ("live/vmlinuz", v1("vmlinuz")),
        ("live/initrd.img", junk("broken-initrd", &[0x5a; 4096])?),
        ("live/filesystem.squashfs", junk("tiny-squashfs", b"not a squashfs")?),
    ];
    make(BROKEN_INITRD.file, &broken, &versions.broken, arch, &key)?;
    let tiny = [
        ("live/vmlinuz", junk("tiny-vmlinuz", b"not a kernel")?),
        ("live/initrd.img", junk("tiny-initrd", b"not an initrd")?),
        ("live/filesystem.squashfs", junk("tiny-squashfs", b"not a squashfs")?),
    ];
    let signed = make("tiny-signed.raucb", &tiny, &versions.v2, arch, &key)?;
    let signed_bytes = fs::read(&signed).with_context(|| format!("reading {}", signed.display()))?;
    fs::remove_file(&signed).with_context(|| format!("removing {}", signed.display()))?;
    let write = |name: &str, bytes: &[u8]| {
        let p = files.join(name);
        fs::write(&p, bytes).with_context(|| format!("writing {}", p.display()))
    };
    write(REFUSED[0].file, &flip_byte(&signed_bytes)?)?;
    let other_dir = dir.join("other-key");
    let _ = fs::remove_dir_all(&other_dir);
    fs::create_dir_all(&other_dir).with_context(|| format!("creating {}", other_dir.display()))?;
    let other = keys::generate(sh, &other_dir, "not the release key (cargo xtask e2e)")?;
    make(REFUSED[1].file, &tiny, &versions.v2, arch, &other)?;
    write(REFUSED[2].file, &truncate_signature(&signed_bytes, 64)?)?;
    make(REFUSED[3].file, &tiny, &versions.older, arch, &key)?;
    make(REFUSED[4].file, &tiny, &versions.v2, "arm64", &key)?;

    let disk = Disk::read_only(dir.join("updates.img"), UPDATES_SERIAL);
    updates_disk(sh, &files, &disk.path)?;
    // The bundles hold them now.
    fs::remove_dir_all(&live).with_context(|| format!("removing {}", live.display()))?;
    fs::remove_dir_all(&files).with_context(|| format!("removing {}", files.display()))?;
    let signed_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("the host's clock is before 1970")?
        .as_secs();
    Ok(Bundles {
        disk,
        versions,
        signed_at,
    })
}

/// A release's tree under `stage`: `members` (hard links where they can
/// be, else copies) and its `release.json` for `version` and `arch`.
fn release_tree(stage: &Path, members: &[(&str, PathBuf)], version: &str, arch: &str) -> anyhow::Result<()> {
    if stage.exists() {
        fs::remove_dir_all(stage).with_context(|| format!("removing {}", stage.display()))?;
    }
    for (name, from) in members {
        let to = stage.join(name);
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        if fs::hard_link(from, &to).is_err() {
            fs::copy(from, &to).with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
        }
    }
    let version = Version::parse(version).with_context(|| format!("the release version {version:?}"))?;
    let release =
        Release::of_dir(stage, &version, arch).with_context(|| format!("the release of {}", stage.display()))?;
    let path = stage.join(RELEASE_FILE);
    fs::write(&path, release.to_file_bytes()?).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The release tree `stage` as a bundle signed by `key`
/// (`pipeline::bundle::write_bundle`, release.json first); its path.
fn write_staged(
    sh: &Shell,
    stage: &Path,
    out: &Path,
    version: &str,
    arch: &str,
    key: &keys::SigningKey,
) -> anyhow::Result<PathBuf> {
    let members = pipeline_bundle::release_members(stage);
    let members: Vec<(&str, &Path)> = members.iter().map(|(n, p)| (n.as_str(), p.as_path())).collect();
    let version = Version::parse(version).with_context(|| format!("the release version {version:?}"))?;
    pipeline_bundle::write_bundle(sh, out, &members, &version, arch, key)
}

/// `/live/*` of the ISO into `dir` (xorriso reads ISO 9660 without a mount).
fn extract_live(sh: &Shell, iso: &Path, dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    cmd!(sh, "xorriso -osirrox on -indev {iso} -extract /live {dir}")
        .quiet()
        .ignore_stderr()
        .run()
        .with_context(|| format!("extracting /live from {} (xorriso)", iso.display()))?;
    // xorriso keeps the ISO's read-only modes.
    for name in ["vmlinuz", "initrd.img", "filesystem.squashfs"] {
        let p = dir.join(name);
        ensure!(p.is_file(), "{} has no /live/{name}", iso.display());
    }
    Ok(())
}

/// A GRUB environment block holding `ARCHY_ARGS` (what grub.cfg appends
/// to the kernel line of a slot carrying `live/bootargs`).
fn bootargs(sh: &Shell, path: &Path, args: &str) -> anyhow::Result<()> {
    let _ = fs::remove_file(path);
    let setting = format!("ARCHY_ARGS={args}");
    cmd!(sh, "grub-editenv {path} create")
        .quiet()
        .run()
        .context("grub-editenv create (package grub-common)")?;
    cmd!(sh, "grub-editenv {path} set {setting}")
        .quiet()
        .run()
        .context("grub-editenv set ARCHY_ARGS")?;
    Ok(())
}

/// An ext4 image labelled [`UPDATES_LABEL`] holding `files`' content,
/// made without a mount (`mkfs.ext4 -d`), no journal (it is attached
/// read-only).
fn updates_disk(sh: &Shell, files: &Path, image: &Path) -> anyhow::Result<()> {
    let mut bytes = 0;
    for entry in fs::read_dir(files).with_context(|| format!("listing {}", files.display()))? {
        bytes += entry?.metadata()?.len();
    }
    // ext4's own metadata, rounded up to whole MiB.
    let size = ((bytes + bytes / 10 + 64 * MIB) / MIB * MIB).to_string();
    let _ = fs::remove_file(image);
    disks::blank(image, size.parse()?)?;
    cmd!(
        sh,
        "mkfs.ext4 -q -F -L {UPDATES_LABEL} -O ^has_journal -E root_owner=0:0 -d {files} {image}"
    )
    .quiet()
    .run()
    .context("making the updates disk (mkfs.ext4 -d)")?;
    Ok(())
}

/// The host's side of one boot: SSH as archipelago with the test key.
struct Host<'a> {
    sh: &'a Shell,
    endpoint: Endpoint<'a>,
}

impl Host<'_> {
    /// Waits for sshd and records its host key.
    fn connect(&self) -> anyhow::Result<()> {
        self.endpoint.scan(self.sh, SSH_PATIENCE).map(|_| ())
    }

    fn run(&self, command: &str) -> anyhow::Result<ssh::Outcome> {
        self.endpoint.with_key(self.sh, ssh::USER, command)
    }

    /// `archy-agent os status --json`, parsed.
    fn status(&self) -> anyhow::Result<OsStatus> {
        let out = self.run("archy-agent os status --json")?;
        ensure!(
            out.ok,
            "`archy-agent os status --json` failed: {}{}",
            out.stdout.trim(),
            out.stderr.trim()
        );
        OsStatus::parse(&out.stdout)
    }

    /// Polls `os status` until the booted release is committed.
    fn wait_committed(&self) -> anyhow::Result<(OsStatus, Duration)> {
        let start = Instant::now();
        loop {
            let status = self.status()?;
            if status.committed {
                return Ok((status, start.elapsed()));
            }
            ensure!(
                start.elapsed() < COMMIT_PATIENCE,
                "the booted release was not committed within {} s: {status:?}",
                COMMIT_PATIENCE.as_secs()
            );
            std::thread::sleep(Duration::from_secs(5));
        }
    }

    /// `archy-agent os update <bundle> [--reboot]`: its output, and whether
    /// it succeeded. With `--reboot` the connection may drop as the guest
    /// restarts; the guest's reboot is then what counts (the caller checks
    /// the boot's ending).
    fn update(&self, bundle: &Bundle, reboot: bool) -> anyhow::Result<ssh::Outcome> {
        let flag = if reboot { " --reboot" } else { "" };
        let started = Instant::now();
        let out = self.run(&format!("archy-agent os update {UPDATES_MOUNT}/{}{flag}", bundle.file))?;
        progress::say(
            STAGE,
            &format!(
                "os update {}{flag}: {} after {:.0} s: {}",
                bundle.file,
                if out.ok { "ok" } else { "failed" },
                started.elapsed().as_secs_f64(),
                out.stdout.lines().chain(out.stderr.lines()).last().unwrap_or_default()
            ),
        );
        Ok(out)
    }

    /// [`Host::update`] that must install (and, with `reboot`, restart the
    /// guest): fails at once otherwise, instead of waiting for a reboot
    /// that will not come.
    fn install(&self, bundle: &Bundle, reboot: bool) -> anyhow::Result<ssh::Outcome> {
        let out = self.update(bundle, reboot)?;
        ensure!(
            out.stdout.contains("installed "),
            "os update {} did not install: {}{}",
            bundle.file,
            out.stdout.trim(),
            out.stderr.trim()
        );
        Ok(out)
    }

    /// Lets the probe finish.
    fn done(&self) -> anyhow::Result<()> {
        let go = self.run(&format!("touch {}", ssh::GO_FILE))?;
        ensure!(go.ok, "could not signal the probe over SSH: {}", go.stderr.trim());
        Ok(())
    }

    /// Starts `archy-agent os update <bundle>` (no reboot) and returns the
    /// ssh process, its output read line by line on a thread.
    fn spawn_update(&self, bundle: &Bundle) -> anyhow::Result<(Child, mpsc::Receiver<String>)> {
        let port = self.endpoint.port.to_string();
        let mut child = Command::new("ssh")
            .args(["-F", "/dev/null", "-p", &port, "-o", "BatchMode=yes"])
            .args(self.endpoint.strict_options())
            .args(["-o", "IdentitiesOnly=yes", "-i"])
            .arg(&self.endpoint.key.private)
            .arg(format!("{}@127.0.0.1", ssh::USER))
            .arg(format!("archy-agent os update {UPDATES_MOUNT}/{} 2>&1", bundle.file))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting ssh")?;
        let stdout = child.stdout.take().context("ssh's stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok((child, rx))
    }
}

/// What `archy-agent os status --json` says (the fields the scenarios
/// check; `os::records::BootStatus`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct OsStatus {
    pub(super) booted: String,
    pub(super) booted_version: String,
    /// Slot a's and b's state: good, bad, trying, empty.
    pub(super) a: String,
    pub(super) b: String,
    pub(super) committed: bool,
    pub(super) trial: bool,
    /// The last rollback's message, when there was one.
    pub(super) rollback: Option<String>,
    /// Whether the owner acknowledged it.
    pub(super) acknowledged: bool,
    pub(super) json: String,
}

impl OsStatus {
    pub(super) fn parse(text: &str) -> anyhow::Result<OsStatus> {
        let v: Value =
            serde_json::from_str(text.trim()).with_context(|| format!("`os status --json` printed {text:?}"))?;
        // boot.json as is, or wrapped under "boot".
        let b = v.get("boot").filter(|b| b.is_object()).unwrap_or(&v);
        let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or_default().to_lowercase();
        let slot = |k: &str| b.get(k).map(|x| s(x, "state")).unwrap_or_default();
        let rollback = b.get("last_rollback").filter(|r| r.is_object()).map(|r| {
            format!(
                "rolled back from {} to {}: {}",
                s(r, "from"),
                s(r, "to"),
                r.get("reason").and_then(Value::as_str).unwrap_or_default()
            )
        });
        let acknowledged = b
            .get("last_rollback")
            .and_then(|r| r.get("acknowledged"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let booted = s(b, "booted_slot");
        ensure!(
            booted == "a" || booted == "b",
            "`os status --json` names no booted slot (a or b): {text}"
        );
        Ok(OsStatus {
            booted,
            booted_version: s(b, "booted_version"),
            a: slot("a"),
            b: slot("b"),
            committed: b.get("committed").and_then(Value::as_bool).unwrap_or(false),
            trial: b.get("trial").and_then(Value::as_bool).unwrap_or(false),
            rollback,
            acknowledged,
            json: text.trim().to_owned(),
        })
    }

    fn slot(&self, slot: &str) -> &str {
        if slot == "a" {
            &self.a
        } else {
            &self.b
        }
    }
}

/// A disk boot of `node` with the bundles attached, SSH forwarded, the
/// probe told `mode`.
fn guest<'a>(name: &str, firmware: Firmware, node: &Disk, bundles: &Bundles, mode: &str, port: u16) -> Guest<'a> {
    Guest {
        name: name.to_owned(),
        firmware,
        start: Start::Disk,
        disks: vec![node.clone(), bundles.disk.clone()],
        mode: mode.to_owned(),
        ssh_port: Some(port),
        rtc_base: None,
    }
}

/// Runs `guest`; when the probe hands over, `turn` runs with a connected
/// [`Host`]. Fails unless the turn ran.
fn host_boot(
    work: &Path,
    sh: &Shell,
    key: &TestKey,
    guest: &Guest<'_>,
    timeout: Duration,
    turn: &mut dyn FnMut(&Host<'_>) -> anyhow::Result<AfterTurn>,
) -> anyhow::Result<BootReport> {
    let port = guest.ssh_port.context("a host boot needs an SSH port")?;
    let host = Host {
        sh,
        endpoint: Endpoint::new(port, key, &work.join("ssh")),
    };
    let mut ran = false;
    let mut on_turn = |_console: &str| -> anyhow::Result<AfterTurn> {
        host.connect()?;
        let after = turn(&host)?;
        ran = true;
        Ok(after)
    };
    // The turn may install an update: more than a boot's time.
    let report = boot(work, guest, timeout.max(UPDATE_BOOT_TIMEOUT), Some(&mut on_turn))?;
    report.check(ran, || "the probe never handed the turn to the host".into())?;
    Ok(report)
}

/// The slot the boot ran from, from the kernel command line the probe
/// reported (`archipelago.slot=`).
fn booted_slot(r: &BootReport) -> anyhow::Result<String> {
    let cmdline = r.fact("cmdline")?;
    let slot = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("archipelago.slot="))
        .unwrap_or("-")
        .to_lowercase();
    Ok(slot)
}

fn expect_ending(r: &BootReport, ending: Ending) -> anyhow::Result<()> {
    r.check(r.ending == ending, || {
        format!(
            "the boot should have ended with `{}`, not `{}`",
            ending.name(),
            r.ending.name()
        )
    })
}

fn check_updated(r: &BootReport, out: &ssh::Outcome, what: &str) -> anyhow::Result<()> {
    // With --reboot the session may end as the guest restarts (ssh 255).
    r.check(r.ending == Ending::Rebooted, || {
        format!(
            "{what}: the guest did not reboot into the update ({}); os update said: {}{}",
            r.ending.name(),
            out.stdout.trim(),
            out.stderr.trim()
        )
    })
}

/// The inactive slot's content hash, read on the host (guest off).
fn slot_sha256(node: &Disk, table: &Table, index: usize) -> anyhow::Result<String> {
    let (start, len) = table
        .partitions
        .get(index)
        .with_context(|| format!("the installed table has no partition {}", index + 1))?
        .bytes(table.sectorsize);
    disks::content_sha256(&node.path, start, len)
}

/// The first 64 KiB of a slot (its ext4 superblock): a slot write starts
/// with mkfs.ext4, which changes them.
fn slot_head(node: &Disk, table: &Table, index: usize) -> anyhow::Result<Vec<u8>> {
    let (start, _) = table
        .partitions
        .get(index)
        .with_context(|| format!("the installed table has no partition {}", index + 1))?
        .bytes(table.sectorsize);
    let mut file = fs::File::open(&node.path).with_context(|| format!("opening {}", node.path.display()))?;
    let mut head = vec![0u8; 64 * 1024];
    file.seek(SeekFrom::Start(start))
        .and_then(|_| file.read_exact(&mut head))
        .with_context(|| format!("reading {} at {start}", node.path.display()))?;
    Ok(head)
}

/// The OVMF update sequence on the installed disk (v1 on slot a,
/// committed): the good update from the install sequence's last boot
/// (`last` checks it as that boot, when the install sequence ran), never
/// healthy from v2's trial boot, then the refusals in the boot that finds
/// the rollback.
pub(super) fn ovmf(
    work: &Path,
    node: &Installed,
    bundles: &Bundles,
    last: Option<&LastBoot>,
    timeout: Duration,
    reports: &mut Vec<BootReport>,
) -> anyhow::Result<()> {
    let sh = Shell::new().context("creating a shell")?;
    let fw = Firmware::Ovmf;
    let (disk, key) = (&node.disk, &node.key);
    let table = disks::table(&sh, &disk.path)?;
    let v = &bundles.versions;

    // 1. The good update: installed from v1, one reboot, v2 committed on
    // slot b with the same containers.
    let g = guest("disk-third+v2", fw, disk, bundles, "wait-host", ssh::free_port()?);
    let mut said = None;
    let r = host_boot(work, &sh, key, &g, timeout, &mut |host| {
        let status = host.status()?;
        ensure!(
            status.booted == "a" && status.committed && status.booted_version == v.v1,
            "before any update the node should run v1 from slot a, committed: {}",
            status.json
        );
        said = Some(host.install(&GOOD, true)?);
        Ok(AfterTurn::Continue)
    })?;
    if let Some(last) = last {
        last.check(&r)?;
    }
    let out = said.context("no update ran")?;
    check_updated(&r, &out, "v2")?;
    let v1_containers = r.containers()?;
    reports.push(r);

    let g = guest("v2-trial", fw, disk, bundles, "wait-host", ssh::free_port()?);
    let mut committed = None;
    let r = host_boot(work, &sh, key, &g, timeout, &mut |host| {
        let (status, waited) = host.wait_committed()?;
        ensure!(
            status.booted == "b" && status.b == "good" && status.booted_version == v.v2,
            "v2 should run from slot b, good: {}",
            status.json
        );
        committed = Some(waited);
        // 2. Never healthy, installed from v2's committed boot.
        host.install(&NEVER_HEALTHY, true)?;
        Ok(AfterTurn::Continue)
    })?;
    r.check(booted_slot(&r)? == "b", || {
        format!("v2 did not boot from slot b: {}", r.fact("cmdline").unwrap_or("-"))
    })?;
    let v2_containers = r.containers()?;
    r.check(v1_containers == v2_containers, || {
        format!("the containers changed across the update: {v1_containers:?} then {v2_containers:?}")
    })?;
    progress::say(
        STAGE,
        &format!(
            "{}: v2 committed on slot b ({:.0} s after the host's first look), same containers",
            r.step,
            committed.unwrap_or_default().as_secs_f64()
        ),
    );
    check_updated(
        &r,
        &ssh::Outcome {
            ok: true,
            stdout: String::new(),
            stderr: String::new(),
        },
        "never healthy",
    )?;
    reports.push(r);

    for n in 1..=TRIES {
        let g = Guest {
            ssh_port: None,
            ..guest(&format!("unhealthy-try-{n}"), fw, disk, bundles, "idle", 0)
        };
        let r = boot(work, &g, timeout, None)?;
        expect_ending(&r, Ending::Rebooted)?;
        // The check may fail (and reboot) before the probe starts: the
        // slot is checked when the probe saw it, and the boot after the
        // tries shows where they went.
        if let Some(cmdline) = r.facts.get("cmdline") {
            r.check(booted_slot(&r)? == "a" && cmdline.contains(UNHEALTHY_ARGS), || {
                format!("try {n} should boot slot a with `{UNHEALTHY_ARGS}`: {cmdline}")
            })?;
        }
        reports.push(r);
    }

    // Back on v2, which says so; 3. the refusals: each bundle refused
    // with its reason, the inactive slot (a, the failed release) untouched.
    let a_before = slot_sha256(disk, &table, SLOT_A)?;
    let g = guest("after-unhealthy", fw, disk, bundles, "wait-host", ssh::free_port()?);
    let mut refusals = Vec::new();
    let r = host_boot(work, &sh, key, &g, timeout, &mut |host| {
        let status = host.status()?;
        ensure!(
            status.booted == "b" && status.booted_version == v.v2 && status.a == "bad" && status.committed,
            "after three failed tries the node should be back on v2 (slot b), committed, slot a bad: {}",
            status.json
        );
        let rollback = status.rollback.clone().unwrap_or_default();
        ensure!(
            rollback.contains(&v.never_healthy) && rollback.contains(&v.v2),
            "`os status` does not record the rollback from {} to {}: {}",
            v.never_healthy,
            v.v2,
            status.json
        );
        for bundle in REFUSED {
            let out = host.update(bundle, false)?;
            let said = format!("{}\n{}", out.stdout.trim(), out.stderr.trim());
            ensure!(!out.ok, "{} was not refused: {said}", bundle.file);
            let lower = said.to_lowercase();
            ensure!(
                bundle.refused_for.iter().any(|w| lower.contains(w)),
                "{} was refused, but not for its reason (one of {:?}): {said}",
                bundle.file,
                bundle.refused_for
            );
            refusals.push(format!("{}: {}", bundle.file, said.lines().last().unwrap_or_default()));
        }
        let after = host.status()?;
        ensure!(
            after.booted == "b" && after.committed && after.a == status.a,
            "the refusals changed the node's slots: before {}, after {}",
            status.json,
            after.json
        );
        // The owner, logged in as archipelago (no sudo), acknowledges the
        // rollback through the OS helper.
        ensure!(
            !status.acknowledged,
            "the rollback reads as acknowledged already: {}",
            status.json
        );
        let ack = host.run("archy-agent os acknowledge")?;
        ensure!(
            ack.ok && ack.stdout.contains("acknowledged"),
            "`archy-agent os acknowledge` as archipelago failed: {}{}",
            ack.stdout.trim(),
            ack.stderr.trim()
        );
        let acked = host.status()?;
        ensure!(
            acked.acknowledged && acked.rollback == status.rollback,
            "after `os acknowledge` the rollback should read as acknowledged: {}",
            acked.json
        );
        host.done()?;
        Ok(AfterTurn::Continue)
    })?;
    check_rollback_on_console(&r)?;
    expect_ending(&r, Ending::PoweredOff)?;
    let a_after = slot_sha256(disk, &table, SLOT_A)?;
    r.check(a_before == a_after, || {
        format!("slot a's bytes changed although every bundle was refused: {a_before} then {a_after}")
    })?;
    for line in &refusals {
        progress::say(STAGE, &format!("{}: refused {line}", r.step));
    }
    progress::say(
        STAGE,
        &format!(
            "{}: slot a unchanged ({a_after}); the rollback acknowledged as archipelago",
            r.step
        ),
    );
    reports.push(r);
    Ok(())
}

/// The console says the node rolled back (the issue line agetty shows,
/// `/run/issue.d/40-archipelago-os.issue`, or the boot's own line).
fn check_rollback_on_console(r: &BootReport) -> anyhow::Result<()> {
    let line = r
        .console
        .lines()
        .find(|l| l.to_lowercase().contains("rolled back"))
        .map(str::trim);
    let line = line.with_context(|| r.failure("the console never said the node rolled back"))?;
    progress::say(STAGE, &format!("{}: console: {line}", r.step));
    Ok(())
}

/// The SeaBIOS update sequence on `node` (a copy of the installed disk,
/// never booted): broken initrd, then the power cuts.
pub(super) fn seabios(
    work: &Path,
    node: &Disk,
    key: &TestKey,
    bundles: &Bundles,
    timeout: Duration,
    reports: &mut Vec<BootReport>,
) -> anyhow::Result<()> {
    let sh = Shell::new().context("creating a shell")?;
    let fw = Firmware::SeaBios;
    let table = disks::table(&sh, &node.path)?;
    let v = &bundles.versions;

    // 4. Broken initrd: three tries panic, then v1 again.
    let g = guest("upd-broken", fw, node, bundles, "wait-host", ssh::free_port()?);
    let mut said = None;
    let r = host_boot(work, &sh, key, &g, timeout, &mut |host| {
        said = Some(host.install(&BROKEN_INITRD, true)?);
        Ok(AfterTurn::Continue)
    })?;
    check_updated(
        &r,
        &said.unwrap_or(ssh::Outcome {
            ok: false,
            stdout: String::new(),
            stderr: String::new(),
        }),
        "broken initrd",
    )?;
    reports.push(r);
    for n in 1..=TRIES {
        let g = Guest {
            ssh_port: None,
            ..guest(&format!("broken-try-{n}"), fw, node, bundles, "check", 0)
        };
        let r = boot(work, &g, PANIC_TIMEOUT, None)?;
        expect_ending(&r, Ending::Panicked)?;
        reports.push(r);
    }

    // Back on v1; then 5a: a power cut while slot b is being written.
    let g = guest("after-broken", fw, node, bundles, "wait-host", ssh::free_port()?);
    let mut cut_at = None;
    let r = host_boot(work, &sh, key, &g, timeout, &mut |host| {
        let status = host.status()?;
        ensure!(
            status.booted == "a" && status.booted_version == v.v1 && status.b == "bad",
            "after three panics the node should be back on v1 (slot a), slot b bad: {}",
            status.json
        );
        let rollback = status.rollback.clone().unwrap_or_default();
        ensure!(
            rollback.contains(&v.broken) && rollback.contains(&v.v1),
            "`os status` does not record the rollback from {} to {}: {}",
            v.broken,
            v.v1,
            status.json
        );
        let head = slot_head(node, &table, SLOT_B)?;
        let (mut child, lines) = host.spawn_update(&GOOD)?;
        let started = Instant::now();
        let mut seen = Vec::new();
        loop {
            while let Ok(line) = lines.try_recv() {
                seen.push(line);
            }
            if slot_head(node, &table, SLOT_B)? != head {
                // The write is under way: cut the power a moment later,
                // in the middle of it.
                std::thread::sleep(Duration::from_secs(3));
                cut_at = Some(started.elapsed());
                break;
            }
            if let Some(status) = child.try_wait()? {
                bail!(
                    "os update ended ({status}) before the host saw slot b being written: {}",
                    seen.join("\n")
                );
            }
            ensure!(
                started.elapsed() < Duration::from_secs(600),
                "slot b was not written within 600 s: {}",
                seen.join("\n")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = child.kill();
        let _ = child.wait();
        Ok(AfterTurn::PowerCut)
    })?;
    check_rollback_on_console(&r)?;
    expect_ending(&r, Ending::PowerCut)?;
    progress::say(
        STAGE,
        &format!(
            "{}: power cut {:.1} s into writing v2 to slot b",
            r.step,
            cut_at.unwrap_or_default().as_secs_f64()
        ),
    );
    reports.push(r);

    // 5b: back on v1 with a clock in 2000; a valid bundle is accepted,
    // and the power is cut right after the switch.
    let g = Guest {
        rtc_base: Some(WRONG_CLOCK),
        ..guest("after-cut-write", fw, node, bundles, "wait-host", ssh::free_port()?)
    };
    let r = host_boot(work, &sh, key, &g, timeout, &mut |host| {
        let status = host.status()?;
        ensure!(
            status.booted == "a" && status.booted_version == v.v1 && status.committed,
            "after the power cut during the write the node should run v1 (slot a), committed: {}",
            status.json
        );
        let out = host.update(&GOOD, false)?;
        ensure!(
            out.ok && out.stdout.contains("installed "),
            "a valid bundle was refused on a node whose clock is wrong: {}{}",
            out.stdout.trim(),
            out.stderr.trim()
        );
        Ok(AfterTurn::PowerCut)
    })?;
    expect_ending(&r, Ending::PowerCut)?;
    // systemd moves a clock that is before its own build time up to it,
    // so the guest does not stay in 2000; it is still behind the time the
    // bundles were signed, which a check of the certificate's validity
    // against the clock would have refused.
    let clock = r.fact("clock")?;
    r.check(clock.parse::<u64>().is_ok_and(|c| c < bundles.signed_at), || {
        format!(
            "the guest's clock should be behind the bundles' signing time {} (-rtc base={WRONG_CLOCK}), but says {clock} (year {})",
            bundles.signed_at,
            r.fact("year").unwrap_or("-")
        )
    })?;
    progress::say(
        STAGE,
        &format!(
            "{}: the guest's clock said {} ({} days behind the signing), and the bundle was accepted",
            r.step,
            r.fact("year").unwrap_or("-"),
            bundles.signed_at.saturating_sub(clock.parse().unwrap_or(0)) / 86_400
        ),
    );
    reports.push(r);

    let g = guest("after-cut-switch", fw, node, bundles, "wait-host", ssh::free_port()?);
    let r = host_boot(work, &sh, key, &g, timeout, &mut |host| {
        let (status, _) = host.wait_committed()?;
        ensure!(
            status.booted == "b" && status.booted_version == v.v2 && status.slot("b") == "good",
            "after the power cut right after the switch the node should run v2 (slot b), committed: {}",
            status.json
        );
        host.done()?;
        Ok(AfterTurn::Continue)
    })?;
    expect_ending(&r, Ending::PoweredOff)?;
    reports.push(r);
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn versions_count_up_from_v1_and_one_is_older() {
        let v = Versions::from("0.1.0").unwrap();
        assert_eq!(
            (v.v2.as_str(), v.broken.as_str(), v.never_healthy.as_str()),
            ("0.2.0", "0.3.0", "0.4.0")
        );
        assert_eq!(v.older, "0.0.0");
        assert_eq!(Versions::from("1.2.3").unwrap().older, "1.2.2");
        assert_eq!(Versions::from("2.0.0").unwrap().older, "1.0.0");
        assert!(Versions::from("0.0.0").is_err());
        assert!(Versions::from("one").is_err());
    }

    fn fake_bundle(payload: &[u8], signature: &[u8]) -> Vec<u8> {
        let mut b = payload.to_vec();
        b.extend_from_slice(signature);
        b.extend_from_slice(&(signature.len() as u64).to_be_bytes());
        b
    }

    #[test]
    fn a_flipped_byte_lands_in_the_payload() {
        let bundle = fake_bundle(&[1u8; 100], &[2u8; 40]);
        let flipped = flip_byte(&bundle).unwrap();
        assert_eq!(flipped.len(), bundle.len());
        let diff: Vec<usize> = (0..bundle.len()).filter(|&i| bundle[i] != flipped[i]).collect();
        assert_eq!(diff, [50]);
        assert!(flip_byte(&[0u8; 4]).is_err());
    }

    #[test]
    fn a_truncated_signature_keeps_the_framing() {
        let bundle = fake_bundle(&[1u8; 100], &[2u8; 40]);
        let cut = truncate_signature(&bundle, 16).unwrap();
        assert_eq!(cut.len(), 100 + 24 + 8);
        assert_eq!(split_signature(&cut).unwrap(), (100, 24));
        assert_eq!(&cut[100..124], &[2u8; 24]);
        assert!(truncate_signature(&bundle, 40).is_err());
        // A size trailer larger than the file is refused, not trusted.
        let mut bad = bundle.clone();
        let n = bad.len();
        bad[n - 8..].copy_from_slice(&1000u64.to_be_bytes());
        assert!(split_signature(&bad).is_err());
    }

    #[test]
    fn os_status_is_read_from_boot_json() {
        let json = r#"{"format":1,"booted_slot":"b","booted_version":"0.2.0",
            "a":{"version":"0.4.0","state":"bad","tries":3},"b":{"version":"0.2.0","state":"good","tries":0},
            "committed":true,"trial":false,"degraded":false,"trial_deadline_secs":null,
            "last_rollback":{"format":1,"from":"0.4.0","to":"0.2.0","reason":"not healthy within 60 s","at":"x","acknowledged":false}}"#;
        let s = OsStatus::parse(json).unwrap();
        assert_eq!((s.booted.as_str(), s.a.as_str(), s.b.as_str()), ("b", "bad", "good"));
        assert!(s.committed && !s.trial && !s.acknowledged);
        assert_eq!(s.booted_version, "0.2.0");
        assert_eq!(
            s.rollback.as_deref(),
            Some("rolled back from 0.4.0 to 0.2.0: not healthy within 60 s")
        );
        assert!(OsStatus::parse(r#"{"booted_slot":null}"#).is_err());
        assert!(OsStatus::parse("not json").is_err());
    }
}
