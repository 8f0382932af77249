//! A file system mounted for a moment at a private folder of its own
//! (effects: `mount`, `umount`): the installer's slot, ESP and data
//! partition, and the `ARCHY-CONF` stick, read by the installer and by
//! `ssh prepare`. The data disk's lasting mount is `datadisk.rs`'s.

use std::fs;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _};

/// A file system mounted at a folder of its own (0700, under the temp
/// dir), unmounted on drop.
pub struct Mounted {
    pub dir: PathBuf,
    mounted: bool,
}

impl Mounted {
    /// Mounts `node` (file system `fstype`, mount options `options`) at a
    /// new folder under the temp dir.
    pub fn with(node: &Path, fstype: &str, options: &str) -> anyhow::Result<Mounted> {
        let dir = std::env::temp_dir().join(format!(
            "archy-mnt-{}-{}",
            std::process::id(),
            node.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ));
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let mut mount = Command::new("mount");
        mount.args(["-t", fstype, "-o", options]);
        if let Err(e) = run(mount.arg(node).arg(&dir), "mount", "mount") {
            // Only an empty folder goes: never a mounted file system's files.
            let _ = fs::remove_dir(&dir);
            return Err(e.context(format!("cannot mount {} ({fstype}, {options})", node.display())));
        }
        Ok(Mounted { dir, mounted: true })
    }

    /// Unmounts, failing when the kernel refuses.
    pub fn unmount(mut self) -> anyhow::Result<()> {
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

/// Runs `cmd` (`program`, from Debian package `package`), failing with its
/// stderr when it fails.
pub fn run(cmd: &mut Command, program: &str, package: &str) -> anyhow::Result<()> {
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
