//! The `ARCHY-CONF` stick as the installer reads it: a partition (or a
//! whole stick) labelled `ARCHY-CONF`, FAT or ext4, mounted read-only,
//! holding `authorized_keys`. Every key is checked before anything is
//! written; two such partitions are a doubt, and a doubt means no.
//!
//! The installed node imports the same file at every boot
//! (`archy-agent ssh prepare`); the installer writes the keys onto a fresh
//! data partition so the first boot already accepts them.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _};

use super::authkey;
use crate::mount::Mounted;

/// The label, 10 characters: fits FAT's 11.
pub const CONF_LABEL: &str = "ARCHY-CONF";
/// The file of keys at the partition's root.
pub const KEYS_FILE: &str = "authorized_keys";

/// The partitions labelled [`CONF_LABEL`] (`blkid`, probing the devices,
/// no cache).
pub fn find() -> anyhow::Result<Option<PathBuf>> {
    let out = Command::new("blkid")
        .args(["-c", "/dev/null", "-o", "device", "-t"])
        .arg(format!("LABEL={CONF_LABEL}"))
        .stdin(Stdio::null())
        .output()
        .context("cannot run blkid (package util-linux)")?;
    // blkid exits 2 when nothing matches.
    if !out.status.success() && out.status.code() != Some(2) {
        bail!(
            "blkid failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let found: Vec<PathBuf> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(PathBuf::from)
        .collect();
    match found.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(one.clone())),
        several => bail!(
            "{} partitions are labelled {CONF_LABEL} ({}): remove all but one",
            several.len(),
            several
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The mount options for a [`CONF_LABEL`] partition of file system
/// `fstype`: read-only, and for ext3/4 without replaying the journal.
pub fn mount_options(fstype: &str, device: &Path) -> anyhow::Result<&'static str> {
    match fstype {
        "vfat" | "ext2" => Ok("ro"),
        "ext3" | "ext4" => Ok("ro,noload"),
        other => bail!(
            "{}: the {CONF_LABEL} partition holds {other:?}; allowed: FAT (vfat) or ext4",
            device.display()
        ),
    }
}

/// The checked keys of the [`CONF_LABEL`] partition `device`; empty when
/// it holds no `authorized_keys`.
pub fn read_keys(device: &Path) -> anyhow::Result<Vec<String>> {
    let out = Command::new("blkid")
        .args(["-c", "/dev/null", "-p", "-o", "value", "-s", "TYPE"])
        .arg(device)
        .stdin(Stdio::null())
        .output()
        .context("cannot run blkid (package util-linux)")?;
    let fstype = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let options = mount_options(&fstype, device)?;
    let mounted = Mounted::with(device, &fstype, options)?;
    let file = mounted.dir.join(KEYS_FILE);
    let keys = match std::fs::read(&file) {
        Ok(bytes) => {
            let text = String::from_utf8(bytes)
                .with_context(|| format!("{}: {KEYS_FILE} is not UTF-8 text", device.display()))?;
            authkey::check_file(&text, &format!("{} ({CONF_LABEL}) {KEYS_FILE}", device.display()))?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {KEYS_FILE} on {}", device.display())),
    };
    mounted.unmount()?;
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fat_and_ext4_mount_read_only_without_journal_replay() {
        let d = Path::new("/dev/sdb1");
        assert_eq!(mount_options("vfat", d).ok(), Some("ro"));
        assert_eq!(mount_options("ext4", d).ok(), Some("ro,noload"));
        let e = mount_options("ntfs", d)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("/dev/sdb1") && e.contains("\"ntfs\"") && e.contains("FAT"),
            "{e}"
        );
    }
}
