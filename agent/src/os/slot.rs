//! Putting a release into a system slot: verified before a byte is
//! written, read back after (effects: `mount`, `umount`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _};

use super::release::{Release, LIVE_FILES, RELEASE_FILE};

/// A file system mounted at a folder of its own, unmounted on drop.
pub(crate) struct Mounted {
    pub(crate) dir: PathBuf,
    mounted: bool,
}

impl Mounted {
    fn new(node: &Path, read_only: bool) -> anyhow::Result<Mounted> {
        Mounted::with(node, "ext4", if read_only { "ro" } else { "rw" })
    }

    /// Mounts `node` (file system `fstype`, mount options `options`) at a
    /// new folder under the temp dir.
    pub(crate) fn with(node: &Path, fstype: &str, options: &str) -> anyhow::Result<Mounted> {
        let dir = std::env::temp_dir().join(format!(
            "archy-mnt-{}-{}",
            std::process::id(),
            node.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ));
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut mount = Command::new("mount");
        mount.args(["-t", fstype, "-o", options]);
        if let Err(e) = run(mount.arg(node).arg(&dir), "mount", "mount") {
            let _ = fs::remove_dir(&dir);
            return Err(e.context(format!("cannot mount {} ({fstype}, {options})", node.display())));
        }
        Ok(Mounted { dir, mounted: true })
    }

    /// Unmounts, failing when the kernel refuses.
    pub(crate) fn unmount(mut self) -> anyhow::Result<()> {
        self.mounted = false;
        run(Command::new("umount").arg(&self.dir), "umount", "mount")?;
        let _ = fs::remove_dir(&self.dir);
        Ok(())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg(&self.dir).status();
            let _ = fs::remove_dir(&self.dir);
        }
    }
}

pub(crate) fn run(cmd: &mut Command, program: &str, package: &str) -> anyhow::Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {program} (package {package})"))?;
    if !out.status.success() {
        bail!(
            "{program} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Copies the release under `src` into the slot file system on `node`
/// (ext4, empty: `partition::write` made it). The source is verified
/// against `release` first, so a bad source never reaches the slot; the
/// copy is read back from a fresh read-only mount and compared.
/// `release.json` is written last: a slot without it holds no release.
pub fn write_release(src: &Path, release: &Release, node: &Path) -> anyhow::Result<()> {
    release.require_native(&src.join(RELEASE_FILE))?;
    release
        .verify(src)
        .context("the release to install does not match its own release.json; nothing was written")?;
    let slot = Mounted::new(node, false)?;
    let need = release.size(src)?;
    let free = rustix::fs::statvfs(&slot.dir)
        .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
        .with_context(|| format!("cannot read the free space of {}", node.display()))?;
    if need > free {
        bail!(
            "{} has {free} bytes free and the release needs {need}: nothing was copied",
            node.display()
        );
    }
    for name in LIVE_FILES {
        let to = slot.dir.join(name);
        if let Some(dir) = to.parent() {
            fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        fs::copy(src.join(name), &to).with_context(|| format!("cannot copy {name} into {}", node.display()))?;
        fs::File::open(&to)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("cannot sync {name} on {}", node.display()))?;
    }
    crate::fsutil::write_atomic(&slot.dir.join(RELEASE_FILE), &release.to_file_bytes()?, 0o644)
        .with_context(|| format!("cannot write {RELEASE_FILE} on {}", node.display()))?;
    slot.unmount()?;
    // The read-back: from the disk, through a mount of its own.
    let check = Mounted::new(node, true)?;
    let written = Release::read(&check.dir.join(RELEASE_FILE))?;
    if &written != release {
        bail!(
            "{}: {RELEASE_FILE} reads back different from what was written",
            node.display()
        );
    }
    release
        .verify(&check.dir)
        .with_context(|| format!("{}: the copied release does not read back intact", node.display()))?;
    check.unmount()
}
