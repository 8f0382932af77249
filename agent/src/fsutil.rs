//! File writes that survive a crash or power loss, in the agent's own
//! folders. Below an app's data folder, which its container can change,
//! everything goes through `appdir::AppDir` instead.

use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Writes `bytes` to a fresh temporary file beside `path` with `mode` (and
/// `owner`, when given) set before any byte is in it, and fsyncs it. The
/// caller moves it into place.
fn write_temp(path: &Path, bytes: &[u8], mode: u32, owner: Option<(u32, u32)>) -> io::Result<PathBuf> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the path has no parent folder"))?;
    fs::create_dir_all(dir)?;
    let file_name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let tmp = dir.join(format!(".{file_name}.{}.{nanos}.tmp", std::process::id()));
    let result = (|| {
        let mut file = OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        // The creation mode passes through the umask; set it exactly.
        file.set_permissions(Permissions::from_mode(mode))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(&file, Some(uid), Some(gid))?;
        }
        file.write_all(bytes)?;
        file.sync_all()
    })();
    match result {
        Ok(()) => Ok(tmp),
        Err(e) => {
            // Best effort: the temporary file is useless now, and an error
            // removing it would hide the one that matters.
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// A rename or link is durable only once its folder is synced.
fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) => File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// Replaces `path` with `bytes` so that a reader sees the old file or the
/// new one, never a mix, and a crash leaves one of the two: write a
/// temporary file in the same folder with `mode` set before any byte is in
/// it, fsync it, rename it over the target, fsync the folder. For the
/// agent's own folders; below an app's folder, use `AppDir::write_atomic`.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    write_atomic_owned(path, bytes, mode, None)
}

/// [`write_atomic`], the new file given to `owner` (uid, gid) before it
/// holds a byte or has its name, when given.
pub fn write_atomic_owned(path: &Path, bytes: &[u8], mode: u32, owner: Option<(u32, u32)>) -> io::Result<()> {
    let tmp = write_temp(path, bytes, mode, owner)?;
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_parent(path)
}

/// Creates `path` with `bytes` unless it exists, durably and all at once:
/// an existing file is never replaced, not even by a concurrent writer
/// (linking fails on an existing name). Returns whether it was created.
pub fn write_new(path: &Path, bytes: &[u8], mode: u32) -> io::Result<bool> {
    let tmp = write_temp(path, bytes, mode, None)?;
    let linked = fs::hard_link(&tmp, path);
    fs::remove_file(&tmp)?;
    match linked {
        Ok(()) => sync_parent(path).map(|()| true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// Creates `dir` (and missing parents) and makes it 0700, for folders that
/// hold secrets. The parents' modes are not ours to choose.
pub fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    const DIR_MODE: u32 = 0o700;
    if let Some(parent) = dir.parent() {
        fs::create_dir_all(parent)?;
    }
    match DirBuilder::new().mode(DIR_MODE).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    if fs::metadata(dir)?.permissions().mode() & 0o777 != DIR_MODE {
        fs::set_permissions(dir, Permissions::from_mode(DIR_MODE))?;
    }
    Ok(())
}

/// Moves an unreadable file aside as `<name>.corrupt-<unix secs>` so it
/// can be looked at later, and returns where it went. Nothing is deleted.
pub fn move_aside(path: &Path) -> io::Result<std::path::PathBuf> {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let aside = path.with_file_name(format!("{name}.corrupt-{secs}"));
    fs::rename(path, &aside)?;
    Ok(aside)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_the_file_with_the_given_mode_and_leaves_no_temp_file() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("state").join("x.json");
        write_atomic(&path, b"one", 0o600).expect("first");
        write_atomic(&path, b"two", 0o600).expect("second");
        assert_eq!(fs::read(&path).expect("read"), b"two");
        assert_eq!(fs::metadata(&path).expect("meta").permissions().mode() & 0o777, 0o600);
        let names: Vec<_> = fs::read_dir(path.parent().expect("dir"))
            .expect("ls")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn write_new_never_replaces_an_existing_file() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("secret");
        assert!(write_new(&path, b"first", 0o600).expect("create"));
        assert!(!write_new(&path, b"second", 0o600).expect("exists"));
        assert_eq!(fs::read(&path).expect("read"), b"first");
        assert_eq!(
            fs::read_dir(tmp.path()).expect("ls").count(),
            1,
            "no temporary file left"
        );
    }

    #[test]
    fn private_dir_is_0700_even_when_it_existed_wider() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("a").join("secrets");
        fs::create_dir_all(&dir).expect("mkdir");
        fs::set_permissions(&dir, Permissions::from_mode(0o755)).expect("chmod");
        ensure_private_dir(&dir).expect("private");
        assert_eq!(fs::metadata(&dir).expect("meta").permissions().mode() & 0o777, 0o700);
    }

    #[test]
    fn move_aside_keeps_the_bytes() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("agent.json");
        fs::write(&path, b"{broken").expect("write");
        let aside = move_aside(&path).expect("aside");
        assert!(!path.exists());
        assert_eq!(fs::read(aside).expect("read"), b"{broken");
    }
}
