//! The one way into an app's data folder (`<data>/<id>/`).
//!
//! An app's container may write below its folder: it can replace a
//! subfolder or a file by a symlink at any moment, also between the
//! agent's check and its write. Checking a path and then using it by name
//! is therefore never safe there. An [`AppDir`] holds an open folder and
//! reaches everything below it relative to that descriptor with `openat2`
//! (`RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`): a lookup can neither leave
//! the folder nor follow a symlink, whatever the container does meanwhile.
//! Modes and owners are set on an opened descriptor, never by path; files
//! are replaced by a temporary file created, written, given and synced
//! through the folder's descriptor and renamed within it.
//!
//! A refusal (a symlink, or something else, where a folder or file was
//! expected; a name with `..` or an absolute path) is a [`ConfineError`]
//! naming the path, and it is logged where it happens.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read as _, Write as _};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Stat};
use rustix::io::Errno;

use crate::dataroot::DataRoot;
use crate::manifest::{AppId, VolumeSource};

/// Why a path below an app's folder was not used.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    /// `..`, an absolute path or an empty name: it would leave the folder.
    #[error("{path}: only plain names below the app's folder are allowed (no `..`, no absolute path); refused")]
    NotBeneath { path: PathBuf },
    /// A symlink (or another kind of file) where a folder or a plain file
    /// was expected.
    #[error("{path} is a symlink or not a plain {expected}; refusing to follow or use it")]
    Refused { path: PathBuf, expected: &'static str },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl ConfineError {
    fn refused(path: PathBuf, expected: &'static str) -> ConfineError {
        tracing::warn!(path = %path.display(), expected, "refused: a symlink or another kind of file where a plain {expected} was expected");
        ConfineError::Refused { path, expected }
    }

    fn not_beneath(path: PathBuf) -> ConfineError {
        tracing::warn!(path = %path.display(), "refused: a path that would leave the app's folder");
        ConfineError::NotBeneath { path }
    }

    fn io(path: PathBuf, source: impl Into<io::Error>) -> ConfineError {
        ConfineError::Io {
            path,
            source: source.into(),
        }
    }
}

type Result<T> = std::result::Result<T, ConfineError>;

/// What is at a name in a folder, looked at without following anything.
#[derive(Debug)]
pub enum Entry {
    Missing,
    /// A plain file, with its bytes.
    File {
        stat: Box<Stat>,
        bytes: Vec<u8>,
    },
    /// A plain file larger than asked for: not read.
    Larger,
    /// A symlink, a folder or anything else: never read through.
    Other,
}

/// An open folder at or below an app's data folder.
#[derive(Debug)]
pub struct AppDir {
    fd: OwnedFd,
    /// The app's folder, `<data>/<id>`.
    root: PathBuf,
    /// This folder, relative to `root` (empty for the app's folder).
    rel: PathBuf,
}

const RESOLVE: ResolveFlags = ResolveFlags::BENEATH.union(ResolveFlags::NO_SYMLINKS);

impl AppDir {
    /// Opens `<data>/<id>`, creating it (and the data root) if needed. The
    /// app's own folder is the agent's, out of every container's reach;
    /// still, a symlink there is refused.
    pub fn create(data_root: &DataRoot, app: &AppId) -> Result<AppDir> {
        let root = data_root.app_dir(app);
        std::fs::create_dir_all(&root).map_err(|e| ConfineError::io(root.clone(), e))?;
        AppDir::open_root(&root)
    }

    /// Opens `<data>/<id>` if it exists.
    pub fn open(data_root: &DataRoot, app: &AppId) -> Result<Option<AppDir>> {
        match AppDir::open_root(&data_root.app_dir(app)) {
            Ok(dir) => Ok(Some(dir)),
            Err(ConfineError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Opens an app's folder by its full path (the rootless helper gets it
    /// so). Its last component must not be a symlink.
    pub fn open_root(root: &Path) -> Result<AppDir> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::open(root, flags, Mode::empty()).map_err(|e| match e {
            Errno::LOOP | Errno::NOTDIR => ConfineError::refused(root.to_owned(), "folder"),
            e => ConfineError::io(root.to_owned(), e),
        })?;
        Ok(AppDir {
            fd,
            root: root.to_owned(),
            rel: PathBuf::new(),
        })
    }

    /// The folder a volume's `source` names, opened (and made where
    /// missing) through the confined walk from the app folder it lies in:
    /// `<data>/<id>/<rel>` for a name, or the absolute path inside another
    /// app's folder, which validation checked. A symlink anywhere below
    /// the app folder is refused, so a container cannot point another
    /// app's mount (or its own) at a host path. `created` is called on
    /// each folder made.
    pub fn for_volume(
        data_root: &DataRoot,
        app: &AppId,
        source: &VolumeSource,
        created: impl FnMut(&AppDir) -> anyhow::Result<()>,
    ) -> anyhow::Result<AppDir> {
        let (root, rel) = match source {
            VolumeSource::AppData(rel) => (data_root.app_dir(app), rel.as_path()),
            VolumeSource::Absolute(path) => {
                let folder = data_root.app_folder_of(path).with_context(|| {
                    format!(
                        "{app}: the volume source {} is not inside an app's folder under {}",
                        path.display(),
                        data_root.display()
                    )
                })?;
                let root = data_root.path().join(folder);
                let rel = path.strip_prefix(&root).with_context(|| {
                    format!(
                        "{app}: the volume source {} is not below {}",
                        path.display(),
                        root.display()
                    )
                })?;
                (root, rel)
            }
        };
        std::fs::create_dir_all(&root).with_context(|| format!("{app}: cannot create {}", root.display()))?;
        let dir = AppDir::open_root(&root)?
            .ensure_dir(rel, created)
            .with_context(|| format!("{app}: the volume source {}", root.join(rel).display()))?;
        Ok(dir)
    }

    /// This folder's full path, for messages.
    pub fn path(&self) -> PathBuf {
        self.root.join(&self.rel)
    }

    /// The app's folder this one lies in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// This folder relative to the app's folder.
    pub fn rel(&self) -> &Path {
        &self.rel
    }

    fn full(&self, rel: &Path) -> PathBuf {
        self.path().join(rel)
    }

    /// `rel` split into plain names, or refused.
    fn names<'p>(&self, rel: &'p Path) -> Result<Vec<&'p OsStr>> {
        let mut out = Vec::new();
        for c in rel.components() {
            match c {
                Component::Normal(name) => out.push(name),
                Component::CurDir => {}
                _ => return Err(ConfineError::not_beneath(self.full(rel))),
            }
        }
        Ok(out)
    }

    /// One plain name (a file in this folder), or refused.
    fn name<'p>(&self, name: &'p Path) -> Result<&'p OsStr> {
        match self.names(name)?.as_slice() {
            [one] => Ok(one),
            _ => Err(ConfineError::not_beneath(self.full(name))),
        }
    }

    fn openat(&self, rel: &Path, flags: OFlags, mode: u32, expected: &'static str) -> Result<OwnedFd> {
        rustix::fs::openat2(
            &self.fd,
            rel,
            flags | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode),
            RESOLVE,
        )
        .map_err(|e| {
            match e {
                // A symlink on the way (RESOLVE_NO_SYMLINKS, O_NOFOLLOW) or a
                // file where a folder was expected.
                Errno::LOOP | Errno::NOTDIR => ConfineError::refused(self.full(rel), expected),
                // An escape RESOLVE_BENEATH stopped.
                Errno::XDEV => ConfineError::not_beneath(self.full(rel)),
                e => ConfineError::io(self.full(rel), e),
            }
        })
    }

    /// Opens the existing folder `rel` below this one.
    pub fn dir(&self, rel: &Path) -> Result<AppDir> {
        let names = self.names(rel)?;
        let clean: PathBuf = names.iter().collect();
        let at = if names.is_empty() {
            Path::new(".")
        } else {
            clean.as_path()
        };
        let fd = self.openat(at, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW, 0, "folder")?;
        Ok(AppDir {
            fd,
            root: self.root.clone(),
            rel: self.rel.join(clean),
        })
    }

    /// Opens the folder `rel` below this one, creating what is missing
    /// (mode 0755 before the umask); `created` is called on each folder
    /// made, to give it to the app's user.
    pub fn ensure_dir(
        &self,
        rel: &Path,
        mut created: impl FnMut(&AppDir) -> anyhow::Result<()>,
    ) -> anyhow::Result<AppDir> {
        let names = self.names(rel)?;
        let mut dir = self.dir(Path::new(""))?;
        for name in names {
            let name = Path::new(name);
            let next = match dir.dir(name) {
                Ok(next) => next,
                Err(ConfineError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                    match rustix::fs::mkdirat(&dir.fd, name, Mode::from_raw_mode(0o755)) {
                        Ok(()) => {
                            // Opened anew: what is there now may be a
                            // symlink the container put in its place.
                            let next = dir.dir(name)?;
                            created(&next)?;
                            next
                        }
                        Err(Errno::EXIST) => dir.dir(name)?,
                        Err(e) => return Err(ConfineError::io(dir.full(name), e).into()),
                    }
                }
                Err(e) => return Err(e.into()),
            };
            dir = next;
        }
        Ok(dir)
    }

    /// What is at `name` in this folder: a plain file's bytes (at most
    /// `max` of them: a container may put a huge file there), read through
    /// a descriptor opened without following anything.
    pub fn read(&self, name: &Path, max: u64) -> Result<Entry> {
        let name = Path::new(self.name(name)?);
        let stat = match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => stat,
            Err(Errno::NOENT) => return Ok(Entry::Missing),
            Err(e) => return Err(ConfineError::io(self.full(name), e)),
        };
        if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
            return Ok(Entry::Other);
        }
        // Non-blocking: a FIFO put there meanwhile must not hang the agent.
        let fd = match self.openat(name, OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK, 0, "file") {
            Ok(fd) => fd,
            Err(ConfineError::Refused { .. }) => return Ok(Entry::Other),
            Err(ConfineError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                return Ok(Entry::Missing)
            }
            Err(e) => return Err(e),
        };
        let stat = rustix::fs::fstat(&fd).map_err(|e| ConfineError::io(self.full(name), e))?;
        if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
            return Ok(Entry::Other);
        }
        if u64::try_from(stat.st_size).map_or(true, |size| size > max) {
            return Ok(Entry::Larger);
        }
        let mut bytes = Vec::new();
        // It may grow meanwhile: one byte more than `max` tells.
        File::from(fd)
            .take(max.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(|e| ConfineError::io(self.full(name), e))?;
        if bytes.len() as u64 > max {
            return Ok(Entry::Larger);
        }
        Ok(Entry::File {
            stat: Box::new(stat),
            bytes,
        })
    }

    /// Replaces `name` in this folder with `bytes` atomically: a temporary
    /// file created through this folder's descriptor, its mode (and owner,
    /// host ids) set on the descriptor before any byte is in it, synced,
    /// renamed over `name` within the folder, the folder synced. Whatever
    /// was at `name` (also a symlink) is replaced, never followed.
    pub fn write_atomic(&self, name: &Path, bytes: &[u8], mode: u32, owner: Option<(u32, u32)>) -> Result<()> {
        let name = Path::new(self.name(name)?);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let tmp = PathBuf::from(format!(
            ".{}.{}.{nanos}.tmp",
            name.to_string_lossy(),
            std::process::id()
        ));
        let fd = self.openat(
            &tmp,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW,
            mode,
            "file",
        )?;
        let written = (|| -> io::Result<()> {
            // The creation mode passes through the umask; set it exactly.
            rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode))?;
            if let Some((uid, gid)) = owner {
                rustix::fs::fchown(&fd, Some(uid_of(uid)), Some(gid_of(gid)))?;
            }
            let mut file = File::from(fd);
            file.write_all(bytes)?;
            file.sync_all()?;
            rustix::fs::renameat(&self.fd, &tmp, &self.fd, name)?;
            rustix::fs::fsync(&self.fd)?;
            Ok(())
        })();
        if let Err(e) = written {
            // Best effort: the temporary file is useless now, and an error
            // removing it would hide the one that matters.
            let _ = rustix::fs::unlinkat(&self.fd, &tmp, AtFlags::empty());
            return Err(ConfineError::io(self.full(name), e));
        }
        Ok(())
    }

    /// Sets the mode and owner (host ids) of `rel` below this folder
    /// (empty: this folder) where they differ, on a descriptor: the file
    /// type is checked first (a plain file or folder, no symlink), then it
    /// is opened without following anything and checked to be the same
    /// file.
    pub fn set_meta(&self, rel: &Path, mode: Option<u32>, owner: Option<(u32, u32)>) -> Result<()> {
        let names = self.names(rel)?;
        let fd = match names.split_last() {
            None => self
                .fd
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| ConfineError::io(self.path(), e))?,
            Some((name, parents)) => {
                let parent = self.dir(&parents.iter().collect::<PathBuf>())?;
                parent.open_meta(Path::new(name))?
            }
        };
        let path = self.full(rel);
        let stat = rustix::fs::fstat(&fd).map_err(|e| ConfineError::io(path.clone(), e))?;
        if let Some(mode) = mode {
            if stat.st_mode & 0o7777 != mode {
                rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode)).map_err(|e| ConfineError::io(path.clone(), e))?;
            }
        }
        if let Some((uid, gid)) = owner {
            if (stat.st_uid, stat.st_gid) != (uid, gid) {
                rustix::fs::fchown(&fd, Some(uid_of(uid)), Some(gid_of(gid))).map_err(|e| ConfineError::io(path, e))?;
            }
        }
        Ok(())
    }

    /// Renames the plain file `rel` (below this folder) to `new_name` in the
    /// same folder, through the folder's descriptor: nothing on the way is
    /// followed, and an existing `new_name` is never replaced
    /// (`RENAME_NOREPLACE`; an `EEXIST` error then).
    pub fn rename_file(&self, rel: &Path, new_name: &OsStr) -> Result<()> {
        self.rename_in_folder(rel, new_name, rustix::fs::RenameFlags::NOREPLACE)
    }

    /// Like [`AppDir::rename_file`], but an existing file (or symlink, not
    /// followed) at `new_name` is replaced: for putting a file back over
    /// one this agent wrote in its place.
    pub fn rename_file_over(&self, rel: &Path, new_name: &OsStr) -> Result<()> {
        self.rename_in_folder(rel, new_name, rustix::fs::RenameFlags::empty())
    }

    /// Removes `rel` (below this folder) when it is a file or a symlink
    /// (never followed); a missing one is not an error. Returns whether
    /// something was removed.
    pub fn remove_file(&self, rel: &Path) -> Result<bool> {
        let names = self.names(rel)?;
        let Some((name, parents)) = names.split_last() else {
            return Err(ConfineError::not_beneath(self.full(rel)));
        };
        let parent = match self.dir(&parents.iter().collect::<PathBuf>()) {
            Ok(parent) => parent,
            Err(ConfineError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        match rustix::fs::unlinkat(&parent.fd, Path::new(name), AtFlags::empty()) {
            Ok(()) => {}
            Err(Errno::NOENT) => return Ok(false),
            Err(e) => return Err(ConfineError::io(self.full(rel), e)),
        }
        rustix::fs::fsync(&parent.fd).map_err(|e| ConfineError::io(parent.path(), e))?;
        Ok(true)
    }

    fn rename_in_folder(&self, rel: &Path, new_name: &OsStr, flags: rustix::fs::RenameFlags) -> Result<()> {
        let names = self.names(rel)?;
        let Some((name, parents)) = names.split_last() else {
            return Err(ConfineError::not_beneath(self.full(rel)));
        };
        let new_name = self.name(Path::new(new_name))?;
        let parent = self.dir(&parents.iter().collect::<PathBuf>())?;
        let stat = rustix::fs::statat(&parent.fd, Path::new(name), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| ConfineError::io(self.full(rel), e))?;
        if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
            return Err(ConfineError::refused(self.full(rel), "file"));
        }
        rustix::fs::renameat_with(&parent.fd, Path::new(name), &parent.fd, Path::new(new_name), flags)
            .map_err(|e| ConfineError::io(self.full(rel), e))?;
        rustix::fs::fsync(&parent.fd).map_err(|e| ConfineError::io(parent.path(), e))
    }

    /// The mode and owner of `rel` (empty: this folder), not following
    /// anything.
    pub fn stat(&self, rel: &Path) -> Result<Stat> {
        let names = self.names(rel)?;
        match names.split_last() {
            None => rustix::fs::fstat(&self.fd).map_err(|e| ConfineError::io(self.path(), e)),
            Some((name, parents)) => {
                let parent = self.dir(&parents.iter().collect::<PathBuf>())?;
                let fd = parent.open_meta(Path::new(name))?;
                rustix::fs::fstat(&fd).map_err(|e| ConfineError::io(self.full(rel), e))
            }
        }
    }

    /// Opens `name` in this folder for `fchmod`/`fchown`: only a plain file
    /// or a folder, checked before opening (`O_PATH` descriptors cannot be
    /// chmodded) and again on the descriptor.
    fn open_meta(&self, name: &Path) -> Result<OwnedFd> {
        let stat = rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| ConfineError::io(self.full(name), e))?;
        let kind = FileType::from_raw_mode(stat.st_mode);
        let flags = match kind {
            FileType::RegularFile => OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK,
            FileType::Directory => OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::DIRECTORY,
            _ => return Err(ConfineError::refused(self.full(name), "file or folder")),
        };
        let fd = self.openat(name, flags, 0, "file or folder")?;
        let now = rustix::fs::fstat(&fd).map_err(|e| ConfineError::io(self.full(name), e))?;
        if (now.st_dev, now.st_ino) != (stat.st_dev, stat.st_ino) || FileType::from_raw_mode(now.st_mode) != kind {
            return Err(ConfineError::refused(self.full(name), "file or folder"));
        }
        Ok(fd)
    }
}

fn uid_of(uid: u32) -> rustix::fs::Uid {
    rustix::fs::Uid::from_raw(uid)
}

fn gid_of(gid: u32) -> rustix::fs::Gid {
    rustix::fs::Gid::from_raw(gid)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::fs;
    use std::os::unix::fs::{symlink, PermissionsExt};

    use super::*;

    fn setup() -> (tempfile::TempDir, AppDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("app");
        fs::create_dir_all(root.join("data")).unwrap();
        let outside = tmp.path().join("outside");
        fs::create_dir_all(&outside).unwrap();
        fs::write(outside.join("victim"), "keep").unwrap();
        fs::set_permissions(outside.join("victim"), fs::Permissions::from_mode(0o644)).unwrap();
        let dir = AppDir::open_root(&root).unwrap();
        (tmp, dir, outside)
    }

    fn untouched(outside: &Path) {
        assert_eq!(fs::read_to_string(outside.join("victim")).unwrap(), "keep");
        assert_eq!(
            fs::metadata(outside.join("victim")).unwrap().permissions().mode() & 0o7777,
            0o644
        );
        assert_eq!(fs::read_dir(outside).unwrap().count(), 1, "nothing written outside");
    }

    #[test]
    fn a_symlinked_folder_is_refused_with_its_path() {
        let (_tmp, dir, outside) = setup();
        symlink(&outside, dir.path().join("data/conf")).unwrap();
        let err = dir.ensure_dir(Path::new("data/conf"), |_| Ok(())).unwrap_err();
        let err = err.downcast::<ConfineError>().unwrap();
        assert!(
            matches!(&err, ConfineError::Refused { path, .. } if path.ends_with("data/conf")),
            "{err}"
        );
        let err = dir
            .set_meta(Path::new("data/conf/victim"), Some(0o600), None)
            .unwrap_err();
        assert!(matches!(err, ConfineError::Refused { .. }), "{err}");
        let err = dir.dir(Path::new("data/conf")).unwrap_err();
        assert!(err.to_string().contains("data/conf"), "{err}");
        untouched(&outside);
    }

    #[test]
    fn a_symlinked_file_is_refused_for_metadata_and_replaced_not_followed_by_a_write() {
        let (_tmp, dir, outside) = setup();
        let data = dir.dir(Path::new("data")).unwrap();
        symlink(outside.join("victim"), dir.path().join("data/app.conf")).unwrap();
        let err = data
            .set_meta(Path::new("app.conf"), Some(0o600), Some((1, 1)))
            .unwrap_err();
        assert!(
            matches!(&err, ConfineError::Refused { path, .. } if path.ends_with("data/app.conf")),
            "{err}"
        );
        assert!(matches!(data.read(Path::new("app.conf"), 100).unwrap(), Entry::Other));
        data.write_atomic(Path::new("app.conf"), b"new", 0o600, None).unwrap();
        let path = dir.path().join("data/app.conf");
        assert!(fs::symlink_metadata(&path).unwrap().is_file());
        assert_eq!(fs::read_to_string(&path).unwrap(), "new");
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o7777, 0o600);
        untouched(&outside);
    }

    #[test]
    fn dot_dot_and_absolute_paths_are_refused() {
        let (_tmp, dir, outside) = setup();
        for rel in ["../outside", "data/../../outside", "/etc", "data/../.."] {
            let err = dir.dir(Path::new(rel)).unwrap_err();
            assert!(matches!(err, ConfineError::NotBeneath { .. }), "{rel}: {err}");
            let err = dir.set_meta(Path::new(rel), Some(0o600), None).unwrap_err();
            assert!(matches!(err, ConfineError::NotBeneath { .. }), "{rel}: {err}");
            assert!(dir.ensure_dir(Path::new(rel), |_| Ok(())).is_err(), "{rel}");
        }
        let data = dir.dir(Path::new("data")).unwrap();
        for name in ["../x", "/tmp/x", "a/b", ""] {
            let err = data.write_atomic(Path::new(name), b"x", 0o600, None).unwrap_err();
            assert!(matches!(err, ConfineError::NotBeneath { .. }), "{name}: {err}");
        }
        untouched(&outside);
    }

    #[test]
    fn a_symlinked_app_folder_is_refused() {
        let (tmp, _dir, outside) = setup();
        let link = tmp.path().join("linked");
        symlink(&outside, &link).unwrap();
        assert!(matches!(
            AppDir::open_root(&link).unwrap_err(),
            ConfineError::Refused { .. }
        ));
    }

    #[test]
    fn a_volume_source_that_is_a_symlink_is_refused_never_mounted() {
        let tmp = tempfile::tempdir().unwrap();
        let data = DataRoot::new(tmp.path().join("data"));
        let outside = tmp.path().join("outside");
        fs::create_dir_all(&outside).unwrap();
        let (me, other) = (AppId::parse("me").unwrap(), AppId::parse("other").unwrap());
        // Another app's folder holds a symlink where its volume was.
        fs::create_dir_all(data.app_dir(&other)).unwrap();
        symlink(&outside, data.app_dir(&other).join("exports")).unwrap();
        let shared = VolumeSource::Absolute(data.app_dir(&other).join("exports"));
        let err = format!("{:#}", AppDir::for_volume(&data, &me, &shared, |_| Ok(())).unwrap_err());
        assert!(
            err.contains(&format!(
                "{} is a symlink",
                data.app_dir(&other).join("exports").display()
            )),
            "{err}"
        );
        // The app's own volume likewise.
        fs::create_dir_all(data.app_dir(&me)).unwrap();
        symlink(&outside, data.app_dir(&me).join("data")).unwrap();
        let own = VolumeSource::AppData(PathBuf::from("data"));
        assert!(AppDir::for_volume(&data, &me, &own, |_| Ok(())).is_err());
        // A plain one is made and opened.
        let fresh = VolumeSource::AppData(PathBuf::from("fresh"));
        let dir = AppDir::for_volume(&data, &me, &fresh, |_| Ok(())).unwrap();
        assert_eq!(dir.path(), data.app_dir(&me).join("fresh"));
        assert!(fs::symlink_metadata(dir.path()).unwrap().is_dir());
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
    }

    #[test]
    fn folders_are_created_modes_set_and_files_read_through_the_descriptor() {
        let (_tmp, dir, _outside) = setup();
        let mut made = Vec::new();
        let sub = dir
            .ensure_dir(Path::new("data/a/b"), |d| {
                made.push(d.rel().to_owned());
                Ok(())
            })
            .unwrap();
        assert_eq!(made, [PathBuf::from("data/a"), PathBuf::from("data/a/b")]);
        sub.write_atomic(Path::new("f"), b"x", 0o640, None).unwrap();
        dir.set_meta(Path::new("data/a/b/f"), Some(0o600), None).unwrap();
        dir.set_meta(Path::new("data/a"), Some(0o750), None).unwrap();
        assert_eq!(dir.stat(Path::new("data/a/b/f")).unwrap().st_mode & 0o7777, 0o600);
        assert_eq!(dir.stat(Path::new("data/a")).unwrap().st_mode & 0o7777, 0o750);
        assert!(matches!(sub.read(Path::new("f"), 1).unwrap(), Entry::File { bytes, .. } if bytes == b"x"));
        assert!(matches!(sub.read(Path::new("f"), 0).unwrap(), Entry::Larger));
        assert!(matches!(sub.read(Path::new("none"), 1).unwrap(), Entry::Missing));
    }

    #[test]
    fn rename_file_renames_a_plain_file_and_never_replaces_or_follows() {
        let (_tmp, dir, outside) = setup();
        let data = dir.path().join("data");
        fs::write(data.join("app.conf"), "own").unwrap();
        dir.rename_file(Path::new("data/app.conf"), OsStr::new("app.conf.old"))
            .unwrap();
        assert!(!data.join("app.conf").exists(), "moved, not copied");
        assert_eq!(fs::read_to_string(data.join("app.conf.old")).unwrap(), "own");

        // An existing target is never replaced: both stay as they are.
        fs::write(data.join("app.conf"), "newer").unwrap();
        let err = dir
            .rename_file(Path::new("data/app.conf"), OsStr::new("app.conf.old"))
            .unwrap_err();
        assert!(
            matches!(&err, ConfineError::Io { path, source } if path.ends_with("data/app.conf")
                && source.kind() == io::ErrorKind::AlreadyExists),
            "{err}"
        );
        assert_eq!(fs::read_to_string(data.join("app.conf")).unwrap(), "newer");
        assert_eq!(fs::read_to_string(data.join("app.conf.old")).unwrap(), "own");

        // rename_file_over puts a file back over the one written in its place.
        dir.rename_file_over(Path::new("data/app.conf.old"), OsStr::new("app.conf"))
            .unwrap();
        assert_eq!(fs::read_to_string(data.join("app.conf")).unwrap(), "own");
        assert!(!data.join("app.conf.old").exists());

        // A symlinked parent folder is refused, nothing renamed outside.
        symlink(&outside, data.join("link")).unwrap();
        let err = dir
            .rename_file(Path::new("data/link/victim"), OsStr::new("moved"))
            .unwrap_err();
        assert!(
            matches!(&err, ConfineError::Refused { path, .. } if path.ends_with("data/link")),
            "{err}"
        );
        // A symlink as the source is refused too, for both kinds of rename.
        symlink(outside.join("victim"), data.join("app.link")).unwrap();
        for over in [false, true] {
            let rel = Path::new("data/app.link");
            let err = if over {
                dir.rename_file_over(rel, OsStr::new("app.conf")).unwrap_err()
            } else {
                dir.rename_file(rel, OsStr::new("moved")).unwrap_err()
            };
            assert!(
                matches!(&err, ConfineError::Refused { path, .. } if path.ends_with("data/app.link")),
                "{err}"
            );
        }
        assert!(fs::symlink_metadata(data.join("app.link")).unwrap().is_symlink());
        assert!(!data.join("moved").exists());
        assert_eq!(fs::read_to_string(data.join("app.conf")).unwrap(), "own");
        // A name with a slash is refused: the rename stays in its folder.
        let err = dir
            .rename_file(Path::new("data/app.conf"), OsStr::new("../app.conf"))
            .unwrap_err();
        assert!(matches!(err, ConfineError::NotBeneath { .. }), "{err}");
        untouched(&outside);
    }
}
