//! The `ARCHY-CONF` stick, in one place: a partition (or a whole stick)
//! labelled [`CONF_LABEL`], FAT or ext2/3/4, mounted read-only (no journal
//! replayed, nothing executable) at a private folder, holding
//! [`CONF_KEYS_FILE`] at its top. Read by `ssh prepare` at every boot and
//! by the installer, which differ only in how they meet a doubt
//! ([`Strictness`]).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _};

use super::keys::{parse_text, BadLine, Line, PublicKey};
use super::store::{self, BadFile};
use crate::mount::Mounted;

/// The label, 10 characters: fits FAT's 11.
pub const CONF_LABEL: &str = "ARCHY-CONF";
/// The file of keys at the partition's top.
pub const CONF_KEYS_FILE: &str = "authorized_keys";

/// How a reader meets a doubt about the stick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strictness {
    /// The installer: two partitions with the label, one that cannot be
    /// mounted or read, or any line that is not a key fails the install
    /// before anything is written (every doubt means no; the owner is at
    /// the machine to fix the stick).
    Strict,
    /// `ssh prepare` at boot: every labelled partition is read; the caller
    /// says and skips one that cannot be read, and each refused line comes
    /// back in [`ConfKeys::refused`] while the good keys are imported (a
    /// boot never stops over a stick).
    Lenient,
}

/// What one `ARCHY-CONF` partition holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfKeys {
    pub device: PathBuf,
    /// How messages name the file: `ARCHY-CONF (/dev/sdb1) authorized_keys`.
    pub shown: String,
    /// The keys with their line numbers.
    pub keys: Vec<(usize, PublicKey)>,
    /// The refused lines ([`Strictness::Lenient`] only: strict reading
    /// fails on them).
    pub refused: Vec<BadLine>,
}

/// The partitions labelled `label`, probed afresh; [`Strictness::Strict`]
/// refuses more than one.
pub fn devices(label: &str, strictness: Strictness) -> anyhow::Result<Vec<PathBuf>> {
    let found = crate::datadisk::devices_labelled(label)
        .map_err(|e| anyhow::anyhow!("cannot look for partitions labelled {label}: {e}"))?;
    if strictness == Strictness::Strict && found.len() > 1 {
        let shown: Vec<String> = found.iter().map(|p| p.display().to_string()).collect();
        bail!(
            "{} partitions are labelled {label} ({}): remove all but one",
            found.len(),
            shown.join(", ")
        );
    }
    Ok(found)
}

/// The mount options for a partition labelled `label` holding file system
/// `fstype`: read-only, nothing run or opened as a device from it, and for
/// ext3/4 without replaying the journal (the stick stays byte for byte).
pub fn mount_options(fstype: &str, device: &Path, label: &str) -> anyhow::Result<&'static str> {
    match fstype {
        "vfat" | "ext2" => Ok("ro,nosuid,nodev,noexec"),
        "ext3" | "ext4" => Ok("ro,nosuid,nodev,noexec,noload"),
        other => bail!(
            "{}: the {label} partition holds {other:?}; allowed: FAT (vfat) or ext2/ext3/ext4",
            device.display()
        ),
    }
}

/// The keys of the partition `device` (labelled `label`), mounted
/// read-only and unmounted again; `None` when it holds no
/// [`CONF_KEYS_FILE`]. A refused line fails it when `strictness` is
/// [`Strictness::Strict`], naming the file and every refused line.
pub fn read(device: &Path, label: &str, strictness: Strictness) -> anyhow::Result<Option<ConfKeys>> {
    let out = Command::new("blkid")
        .args(["-c", "/dev/null", "-p", "-o", "value", "-s", "TYPE"])
        .arg(device)
        .stdin(Stdio::null())
        .output()
        .context("cannot run blkid (package util-linux)")?;
    let fstype = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let options = mount_options(&fstype, device, label)?;
    let mounted = Mounted::with(device, &fstype, options)?;
    let text = store::read_text(&mounted.dir.join(CONF_KEYS_FILE));
    mounted.unmount()?;
    let Some(text) = text.with_context(|| format!("{label} ({})", device.display()))? else {
        return Ok(None);
    };
    let shown = format!("{label} ({}) {CONF_KEYS_FILE}", device.display());
    let (good, refused) = parse_text(&text);
    if strictness == Strictness::Strict && !refused.is_empty() {
        return Err(BadFile {
            file: shown,
            lines: refused,
        }
        .into());
    }
    let keys = good
        .into_iter()
        .filter_map(|(n, l)| match l {
            Line::Key(k) => Some((n, k)),
            Line::Other(_) => None,
        })
        .collect();
    Ok(Some(ConfKeys {
        device: device.to_owned(),
        shown,
        keys,
        refused,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fat_and_ext_mount_read_only_without_journal_replay() {
        let d = Path::new("/dev/sdb1");
        assert_eq!(
            mount_options("vfat", d, CONF_LABEL).ok(),
            Some("ro,nosuid,nodev,noexec")
        );
        assert_eq!(
            mount_options("ext4", d, CONF_LABEL).ok(),
            Some("ro,nosuid,nodev,noexec,noload")
        );
        let e = mount_options("ntfs", d, CONF_LABEL)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("/dev/sdb1") && e.contains("\"ntfs\"") && e.contains("FAT") && e.contains(CONF_LABEL),
            "{e}"
        );
    }
}
