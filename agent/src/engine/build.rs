//! Packing a build context: the same folder always gives the same bytes
//! (sorted entries, mtime 0, owner 0:0), so the context's content alone
//! decides what the engine sees.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Component, Path, PathBuf};

/// Packs `context` into an uncompressed tar. Regular files, folders and
/// symlinks (kept as links, never followed); any other file type is an
/// error, as is a context that is not a folder.
pub(crate) fn pack_context(context: &Path) -> io::Result<Vec<u8>> {
    let meta = fs::metadata(context)?;
    if !meta.is_dir() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a folder"));
    }
    let mut builder = tar::Builder::new(Vec::new());
    builder.mode(tar::HeaderMode::Deterministic);
    add_dir(&mut builder, context, Path::new(""))?;
    builder.into_inner()
}

fn add_dir(builder: &mut tar::Builder<Vec<u8>>, root: &Path, relative: &Path) -> io::Result<()> {
    let mut entries = fs::read_dir(root.join(relative))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<Vec<_>>>()?;
    entries.sort();
    for name in entries {
        let rel = relative.join(&name);
        let path = root.join(&rel);
        let meta = fs::symlink_metadata(&path)?;
        let file_type = meta.file_type();
        let mut header = tar::Header::new_gnu();
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        // Only the permission bits matter to a build; the exec bit must
        // survive so that copied scripts run.
        header.set_mode(meta.permissions().mode() & 0o7777);
        if file_type.is_dir() {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_size(0);
            builder.append_data(&mut header, &rel, io::empty())?;
            add_dir(builder, root, &rel)?;
        } else if file_type.is_file() {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(meta.len());
            builder.append_data(&mut header, &rel, fs::File::open(&path)?)?;
        } else if file_type.is_symlink() {
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_size(0);
            let target = fs::read_link(&path)?;
            builder.append_link(&mut header, &rel, &target)?;
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is neither a file, a folder nor a symlink", path.display()),
            ));
        }
    }
    Ok(())
}

/// The Containerfile's path inside the context, as the build request names
/// it: relative as given, or an absolute path inside `context`.
pub(crate) fn containerfile_in_context(context: &Path, containerfile: &Path) -> Option<PathBuf> {
    let relative = if containerfile.is_absolute() {
        containerfile.strip_prefix(context).ok()?.to_path_buf()
    } else {
        containerfile.to_path_buf()
    };
    let inside = relative.components().all(|c| matches!(c, Component::Normal(_)));
    (inside && !relative.as_os_str().is_empty()).then_some(relative)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(tar_bytes: &[u8]) -> Vec<(String, u64, u32, u64)> {
        let mut archive = tar::Archive::new(tar_bytes);
        archive
            .entries()
            .expect("entries")
            .map(|e| {
                let e = e.expect("entry");
                let h = e.header();
                (
                    e.path().expect("path").display().to_string(),
                    h.mtime().expect("mtime"),
                    h.mode().expect("mode"),
                    h.uid().expect("uid") + h.gid().expect("gid"),
                )
            })
            .collect()
    }

    #[test]
    fn packing_is_sorted_owner_and_time_free_and_repeatable() {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path();
        fs::write(root.join("b.txt"), "b").expect("write");
        fs::create_dir(root.join("a")).expect("mkdir");
        fs::write(root.join("a/run.sh"), "#!/bin/sh\n").expect("write");
        fs::set_permissions(root.join("a/run.sh"), fs::Permissions::from_mode(0o755)).expect("chmod");
        std::os::unix::fs::symlink("b.txt", root.join("c")).expect("symlink");

        let first = pack_context(root).expect("pack");
        let listed = entries(&first);
        let names: Vec<&str> = listed.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(names, ["a", "a/run.sh", "b.txt", "c"]);
        assert!(listed.iter().all(|e| e.1 == 0 && e.3 == 0), "{listed:?}");
        assert_eq!(listed[1].2 & 0o777, 0o755, "the exec bit survives");

        // A later mtime changes nothing.
        fs::write(root.join("b.txt"), "b").expect("rewrite");
        assert_eq!(pack_context(root).expect("pack again"), first);
    }

    #[test]
    fn a_context_that_is_not_a_folder_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("f");
        fs::write(&file, "x").expect("write");
        assert!(pack_context(&file).is_err());
        assert!(pack_context(&dir.path().join("absent")).is_err());
    }

    #[test]
    fn the_containerfile_must_lie_inside_the_context() {
        let ctx = Path::new("/apps/demo/build");
        assert_eq!(
            containerfile_in_context(ctx, Path::new("Containerfile")),
            Some(PathBuf::from("Containerfile"))
        );
        assert_eq!(
            containerfile_in_context(ctx, Path::new("/apps/demo/build/sub/Containerfile")),
            Some(PathBuf::from("sub/Containerfile"))
        );
        assert_eq!(
            containerfile_in_context(ctx, Path::new("/elsewhere/Containerfile")),
            None
        );
        assert_eq!(containerfile_in_context(ctx, Path::new("../Containerfile")), None);
    }
}
