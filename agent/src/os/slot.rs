//! Putting a release into a system slot: verified before a byte is
//! written, read back after (through `crate::mount`).

use std::fs;
use std::path::Path;

use anyhow::{bail, Context as _};

use super::release::{Release, RELEASE_FILE};
use crate::mount::Mounted;

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
    let slot = Mounted::with(node, "ext4", "rw")?;
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
    // Every file the release names: the live files and its optional ones.
    for name in release.files.keys() {
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
    let check = Mounted::with(node, "ext4", "ro")?;
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
