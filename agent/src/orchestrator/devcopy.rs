//! Dev mode's `install PATH`: the manifest's folder (its build context
//! too) is copied into the dev apps folder. The copy is bounded: at most
//! [`MAX_COPY_BYTES`], plain files and folders only (a symlink could reach
//! anywhere), and never into a folder that lies inside what it copies
//! (which would copy itself forever).

use std::fs;
use std::path::Path;

use anyhow::{bail, Context as _};

/// The most a dev install copies from a manifest's folder.
pub const MAX_COPY_BYTES: u64 = 512 * 1024 * 1024;

/// Copies the folder `source` to `target` (made if missing), refusing a
/// `target` inside `source`, symlinks and special files, and more than
/// `cap` bytes in all; nothing is copied when a check fails. Returns the
/// bytes copied.
pub fn copy_context(source: &Path, target: &Path, cap: u64) -> anyhow::Result<u64> {
    let src = source
        .canonicalize()
        .with_context(|| format!("cannot resolve the manifest's folder {}", source.display()))?;
    let parent = target
        .parent()
        .with_context(|| format!("{} has no parent folder", target.display()))?;
    fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let name = target
        .file_name()
        .with_context(|| format!("{} has no name", target.display()))?;
    let dst = parent
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", parent.display()))?
        .join(name);
    if dst.starts_with(&src) {
        bail!(
            "refusing to copy {} into {}: the target lies inside the folder it copies \
             (move the manifest's folder out of the dev apps folder's path)",
            src.display(),
            dst.display()
        );
    }
    let total = measure(&src, cap)?;
    copy_tree(&src, &dst)?;
    Ok(total)
}

/// The bytes of the plain files below `dir`; refuses symlinks, special
/// files and a total above `cap`.
fn measure(dir: &Path, cap: u64) -> anyhow::Result<u64> {
    let mut total = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))? {
            let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
            let path = entry.path();
            let md = fs::symlink_metadata(&path).with_context(|| format!("cannot read {}", path.display()))?;
            if md.is_dir() {
                stack.push(path);
            } else if md.is_file() {
                total = total.saturating_add(md.len());
                if total > cap {
                    bail!(
                        "{} holds more than {} MiB (the most a dev install copies); \
                         keep large files out of the manifest's folder",
                        dir.display(),
                        cap / (1024 * 1024)
                    );
                }
            } else {
                bail!(
                    "{} is a symlink or a special file; a dev install copies plain files and folders only",
                    path.display()
                );
            }
        }
    }
    Ok(total)
}

fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(to).with_context(|| format!("cannot create {}", to.display()))?;
    for entry in fs::read_dir(from).with_context(|| format!("cannot list {}", from.display()))? {
        let entry = entry.with_context(|| format!("cannot list {}", from.display()))?;
        let path = entry.path();
        let md = fs::symlink_metadata(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let dest = to.join(entry.file_name());
        if md.is_dir() {
            copy_tree(&path, &dest)?;
        } else if md.is_file() {
            fs::copy(&path, &dest).with_context(|| format!("cannot copy {} to {}", path.display(), dest.display()))?;
        } else {
            bail!(
                "{} is a symlink or a special file; a dev install copies plain files and folders only",
                path.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_is_copied_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir_all(src.join("ctx")).unwrap();
        fs::write(src.join("manifest.yml"), "id: a\n").unwrap();
        fs::write(src.join("ctx/Containerfile"), "FROM x\n").unwrap();
        let dst = tmp.path().join("apps/a");
        assert_eq!(copy_context(&src, &dst, MAX_COPY_BYTES).unwrap(), 13);
        assert_eq!(fs::read_to_string(dst.join("ctx/Containerfile")).unwrap(), "FROM x\n");
    }

    #[test]
    fn a_target_inside_the_source_is_refused_and_nothing_copied() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir_all(&src).unwrap();
        fs::write(src.join("manifest.yml"), "id: a\n").unwrap();
        let dst = src.join("apps/a");
        let err = copy_context(&src, &dst, MAX_COPY_BYTES).unwrap_err().to_string();
        assert!(err.contains("lies inside the folder it copies"), "{err}");
        assert!(!dst.exists());
        // Also when the source is named through `..`.
        let err = copy_context(&src.join("apps/.."), &dst, MAX_COPY_BYTES).unwrap_err();
        assert!(err.to_string().contains("lies inside"), "{err}");
    }

    #[test]
    fn more_than_the_cap_is_refused_and_nothing_copied() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir_all(src.join("big")).unwrap();
        fs::write(src.join("big/a"), vec![0u8; 600]).unwrap();
        fs::write(src.join("big/b"), vec![0u8; 600]).unwrap();
        let dst = tmp.path().join("apps/a");
        let err = copy_context(&src, &dst, 1000).unwrap_err().to_string();
        assert!(err.contains("more than") && err.contains("dev install"), "{err}");
        assert!(!dst.exists());
    }

    #[test]
    fn a_symlink_in_the_source_is_refused_and_nothing_copied() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir_all(&src).unwrap();
        std::os::unix::fs::symlink("/etc", src.join("etc")).unwrap();
        let dst = tmp.path().join("apps/a");
        let err = copy_context(&src, &dst, MAX_COPY_BYTES).unwrap_err().to_string();
        assert!(err.contains("symlink"), "{err}");
        assert!(!dst.exists());
    }
}
