//! Deterministic file layers: a set of files, directories and symlinks with
//! normalised metadata, written as a tar archive or straight into a tree.
//!
//! The same layer always gives the same bytes: entries in path order,
//! owner root (uid and gid 0), one mtime for everything, and modes taken
//! from the layer (0644, or 0755 for executables and directories), never
//! from who checked the sources out or when.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{lchown, symlink, MetadataExt as _, PermissionsExt as _};
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context as _};
use sha2::{Digest as _, Sha256};

pub const DIR_MODE: u32 = 0o755;
pub const FILE_MODE: u32 = 0o644;
pub const EXEC_MODE: u32 = 0o755;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Dir,
    /// A file on the build host, read when the layer is written.
    File(PathBuf),
    Bytes(Vec<u8>),
    Symlink(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub source: Source,
    pub mode: u32,
}

/// Paths are relative to the root (`etc/hostname`), `/`-separated, with
/// no `.`/`..` components.
#[derive(Debug, Default, Clone)]
pub struct Layer {
    entries: BTreeMap<String, Entry>,
}

impl Layer {
    pub fn new() -> Layer {
        Layer::default()
    }

    pub fn add_dir(&mut self, path: &str) -> anyhow::Result<()> {
        self.insert(path, Source::Dir, DIR_MODE)
    }

    pub fn add_dir_with_mode(&mut self, path: &str, mode: u32) -> anyhow::Result<()> {
        self.insert(path, Source::Dir, mode)
    }

    /// A host file; its mode is 0755 when any execute bit is set, else 0644.
    pub fn add_file(&mut self, path: &str, source: &Path) -> anyhow::Result<()> {
        let meta = fs::metadata(source).with_context(|| format!("reading {}", source.display()))?;
        if !meta.is_file() {
            bail!("{} is not a regular file", source.display());
        }
        let mode = if meta.mode() & 0o111 != 0 { EXEC_MODE } else { FILE_MODE };
        self.insert(path, Source::File(source.to_path_buf()), mode)
    }

    pub fn add_file_with_mode(&mut self, path: &str, source: &Path, mode: u32) -> anyhow::Result<()> {
        self.insert(path, Source::File(source.to_path_buf()), mode)
    }

    pub fn add_bytes(&mut self, path: &str, bytes: Vec<u8>, mode: u32) -> anyhow::Result<()> {
        self.insert(path, Source::Bytes(bytes), mode)
    }

    pub fn add_symlink(&mut self, path: &str, target: &str) -> anyhow::Result<()> {
        self.insert(path, Source::Symlink(PathBuf::from(target)), 0o777)
    }

    /// Everything under `dir`, placed under `prefix` (`""` for the root).
    /// Only directories, regular files and symlinks are allowed.
    pub fn add_tree(&mut self, prefix: &str, dir: &Path) -> anyhow::Result<()> {
        for name in sorted_names(dir)? {
            let Some(name) = name.to_str() else {
                bail!("{} holds a file name that is not UTF-8: {name:?}", dir.display());
            };
            let source = dir.join(name);
            let path = if prefix.is_empty() {
                name.to_owned()
            } else {
                format!("{prefix}/{name}")
            };
            let meta = fs::symlink_metadata(&source).with_context(|| format!("reading {}", source.display()))?;
            let kind = meta.file_type();
            if kind.is_symlink() {
                let target =
                    fs::read_link(&source).with_context(|| format!("reading the link {}", source.display()))?;
                let Some(target) = target.to_str() else {
                    bail!("the symlink {} points at a path that is not UTF-8", source.display());
                };
                self.add_symlink(&path, target)?;
            } else if kind.is_dir() {
                self.add_dir(&path)?;
                self.add_tree(&path, &source)?;
            } else if kind.is_file() {
                self.add_file(&path, &source)?;
            } else {
                bail!(
                    "{} is neither a file, a directory nor a symlink; layers hold only those",
                    source.display()
                );
            }
        }
        Ok(())
    }

    fn insert(&mut self, path: &str, source: Source, mode: u32) -> anyhow::Result<()> {
        check_path(path)?;
        // Parents first, so that a tar creates them with our metadata.
        let parts: Vec<&str> = path.split('/').collect();
        for depth in 1..parts.len() {
            let parent = parts[..depth].join("/");
            match self.entries.get(&parent) {
                Some(Entry {
                    source: Source::Dir, ..
                }) => {}
                Some(_) => bail!("{path}: its parent {parent} is not a directory in the layer"),
                None => {
                    self.entries.insert(
                        parent,
                        Entry {
                            source: Source::Dir,
                            mode: DIR_MODE,
                        },
                    );
                }
            }
        }
        if let Some(existing) = self.entries.get(path) {
            if !(existing.source == Source::Dir && source == Source::Dir) {
                bail!("{path} is in the layer twice");
            }
        }
        self.entries.insert(path.to_owned(), Entry { source, mode });
        Ok(())
    }

    /// Sum of the file sizes.
    pub fn size(&self) -> anyhow::Result<u64> {
        let mut total = 0;
        for entry in self.entries.values() {
            total += match &entry.source {
                Source::File(p) => fs::metadata(p)
                    .with_context(|| format!("reading {}", p.display()))?
                    .len(),
                Source::Bytes(b) => b.len() as u64,
                Source::Dir | Source::Symlink(_) => 0,
            };
        }
        Ok(total)
    }

    /// sha256 over what the layer puts in a tree: paths, kinds, modes,
    /// contents and link targets. Host paths and times do not count.
    pub fn digest(&self) -> anyhow::Result<String> {
        let mut hasher = Sha256::new();
        for (path, entry) in &self.entries {
            let (kind, detail) = match &entry.source {
                Source::Dir => ("dir", String::new()),
                Source::File(p) => ("file", sha256_file(p)?),
                Source::Bytes(b) => ("file", sha256_hex(b)),
                Source::Symlink(t) => ("symlink", t.display().to_string()),
            };
            hasher.update(format!("{path}\0{kind}\0{:o}\0{detail}\n", entry.mode).as_bytes());
        }
        Ok(hex(&hasher.finalize()))
    }

    /// Writes the layer as a tar archive in which every entry has `mtime`.
    pub fn write_tar<W: Write>(&self, out: W, mtime: u64) -> anyhow::Result<W> {
        let mut builder = tar::Builder::new(out);
        for (path, entry) in &self.entries {
            let mut header = tar::Header::new_gnu();
            header.set_mode(entry.mode);
            header.set_uid(0);
            header.set_gid(0);
            header.set_username("root").context("setting a tar user name")?;
            header.set_groupname("root").context("setting a tar group name")?;
            header.set_mtime(mtime);
            match &entry.source {
                Source::Dir => {
                    header.set_entry_type(tar::EntryType::Directory);
                    header.set_size(0);
                    builder
                        .append_data(&mut header, format!("{path}/"), io::empty())
                        .with_context(|| format!("adding {path} to a tar"))?;
                }
                Source::File(p) => {
                    let file = File::open(p).with_context(|| format!("opening {}", p.display()))?;
                    let len = file
                        .metadata()
                        .with_context(|| format!("reading {}", p.display()))?
                        .len();
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_size(len);
                    builder
                        .append_data(&mut header, path, file.take(len))
                        .with_context(|| format!("adding {} to a tar as {path}", p.display()))?;
                }
                Source::Bytes(b) => {
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_size(b.len() as u64);
                    builder
                        .append_data(&mut header, path, b.as_slice())
                        .with_context(|| format!("adding {path} to a tar"))?;
                }
                Source::Symlink(target) => {
                    header.set_entry_type(tar::EntryType::Symlink);
                    header.set_size(0);
                    builder
                        .append_link(&mut header, path, target)
                        .with_context(|| format!("adding the symlink {path} to a tar"))?;
                }
            }
        }
        builder.into_inner().context("finishing a tar archive")
    }

    /// Writes the layer into the tree at `root`. Directories that exist are
    /// left as they are; files and symlinks replace what is there. With
    /// `owner`, everything written gets that uid and gid.
    pub fn install_into(&self, root: &Path, owner: Option<(u32, u32)>) -> anyhow::Result<()> {
        for (path, entry) in &self.entries {
            let dest = root.join(path);
            refuse_symlinked_parents(root, path)?;
            let existing = fs::symlink_metadata(&dest).ok();
            match &entry.source {
                Source::Dir => {
                    if existing.as_ref().is_some_and(|m| m.file_type().is_symlink()) {
                        bail!(
                            "{} is a symlink in the tree; refusing to write through it",
                            dest.display()
                        );
                    }
                    if existing.as_ref().is_some_and(|m| m.is_dir()) {
                        continue;
                    }
                    if existing.is_some() {
                        bail!("{} exists and is not a directory", dest.display());
                    }
                    fs::create_dir(&dest).with_context(|| format!("creating {}", dest.display()))?;
                }
                Source::File(_) | Source::Bytes(_) | Source::Symlink(_) => {
                    if let Some(meta) = existing {
                        if meta.is_dir() {
                            bail!("{} is a directory; the layer has a file there", dest.display());
                        }
                        fs::remove_file(&dest).with_context(|| format!("replacing {}", dest.display()))?;
                    }
                    match &entry.source {
                        Source::File(p) => {
                            fs::copy(p, &dest)
                                .with_context(|| format!("copying {} to {}", p.display(), dest.display()))?;
                        }
                        Source::Bytes(b) => {
                            fs::write(&dest, b).with_context(|| format!("writing {}", dest.display()))?
                        }
                        Source::Symlink(target) => symlink(target, &dest)
                            .with_context(|| format!("creating the symlink {}", dest.display()))?,
                        Source::Dir => {}
                    }
                }
            }
            if let Some((uid, gid)) = owner {
                lchown(&dest, Some(uid), Some(gid))
                    .with_context(|| format!("changing the owner of {}", dest.display()))?;
            }
            if !matches!(entry.source, Source::Symlink(_)) {
                fs::set_permissions(&dest, fs::Permissions::from_mode(entry.mode))
                    .with_context(|| format!("setting the mode of {}", dest.display()))?;
            }
        }
        Ok(())
    }
}

fn check_path(path: &str) -> anyhow::Result<()> {
    let ok = !path.is_empty()
        && !path.ends_with('/')
        && Path::new(path).components().all(|c| matches!(c, Component::Normal(_)))
        && !path.contains("//");
    if !ok {
        bail!("{path:?} is not a relative path without `.` and `..` (layer paths are like etc/hostname)");
    }
    Ok(())
}

/// Writing through a symlink in the tree could land outside it.
fn refuse_symlinked_parents(root: &Path, path: &str) -> anyhow::Result<()> {
    let mut dir = root.to_path_buf();
    let parts: Vec<&str> = path.split('/').collect();
    for part in &parts[..parts.len().saturating_sub(1)] {
        dir.push(part);
        if fs::symlink_metadata(&dir).is_ok_and(|m| m.file_type().is_symlink()) {
            bail!(
                "{} is a symlink in the tree; refusing to write {path} through it",
                dir.display()
            );
        }
    }
    Ok(())
}

/// The names in `dir`, sorted: a fixed order for everything built from a
/// folder.
pub fn sorted_names(dir: &Path) -> anyhow::Result<Vec<std::ffi::OsString>> {
    let mut names: Vec<_> = fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .with_context(|| format!("listing {}", dir.display()))?;
    names.sort();
    Ok(names)
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

pub fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    io::copy(&mut file, &mut hasher).with_context(|| format!("reading {}", path.display()))?;
    Ok(hex(&hasher.finalize()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sample(dir: &Path) -> Layer {
        fs::create_dir_all(dir.join("etc/containers")).unwrap();
        fs::write(dir.join("etc/containers/containers.conf"), "[network]\n").unwrap();
        fs::write(dir.join("etc/hostname"), "archipelago\n").unwrap();
        fs::write(dir.join("tool"), "#!/bin/sh\n").unwrap();
        fs::set_permissions(dir.join("tool"), fs::Permissions::from_mode(0o700)).unwrap();
        symlink("../run/x", dir.join("etc/link")).unwrap();
        let mut layer = Layer::new();
        layer.add_tree("", dir).unwrap();
        layer
    }

    fn tar_bytes(layer: &Layer, mtime: u64) -> Vec<u8> {
        layer.write_tar(Vec::new(), mtime).unwrap()
    }

    #[test]
    fn the_same_files_give_the_same_tar_whatever_their_times_and_order() {
        let a = tempfile::tempdir().unwrap();
        let layer = sample(a.path());
        let first = tar_bytes(&layer, 1_700_000_000);
        // Newer mtimes and a different creation order on the host.
        let b = tempfile::tempdir().unwrap();
        symlink("../run/x", b.path().join("link-first")).unwrap();
        fs::remove_file(b.path().join("link-first")).unwrap();
        let second = tar_bytes(&sample(b.path()), 1_700_000_000);
        assert_eq!(first, second);
        assert_ne!(first, tar_bytes(&layer, 1_700_000_001));

        // Entries added in another order make the same archive.
        let mut forward = Layer::new();
        forward.add_bytes("b/x", b"1".to_vec(), FILE_MODE).unwrap();
        forward.add_bytes("a/y", b"2".to_vec(), FILE_MODE).unwrap();
        let mut backward = Layer::new();
        backward.add_bytes("a/y", b"2".to_vec(), FILE_MODE).unwrap();
        backward.add_bytes("b/x", b"1".to_vec(), FILE_MODE).unwrap();
        assert_eq!(tar_bytes(&forward, 0), tar_bytes(&backward, 0));
    }

    #[test]
    fn tar_entries_are_sorted_root_owned_with_normalised_modes() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = tar_bytes(&sample(dir.path()), 42);
        let mut archive = tar::Archive::new(bytes.as_slice());
        let mut seen = Vec::new();
        for entry in archive.entries().unwrap() {
            let entry = entry.unwrap();
            let h = entry.header();
            assert_eq!((h.uid().unwrap(), h.gid().unwrap()), (0, 0));
            assert_eq!(h.mtime().unwrap(), 42);
            let path = entry.path().unwrap().display().to_string();
            seen.push((path, h.mode().unwrap(), h.entry_type()));
        }
        let paths: Vec<&str> = seen.iter().map(|(p, _, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                "etc/",
                "etc/containers/",
                "etc/containers/containers.conf",
                "etc/hostname",
                "etc/link",
                "tool"
            ]
        );
        let mode = |name: &str| seen.iter().find(|(p, _, _)| p == name).unwrap().1;
        assert_eq!(mode("etc/"), 0o755);
        assert_eq!(mode("etc/hostname"), 0o644);
        // 0700 on the host: executable, so 0755 in the layer.
        assert_eq!(mode("tool"), 0o755);
    }

    #[test]
    fn digest_follows_content_mode_and_links_but_not_host_paths() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let digest = sample(a.path()).digest().unwrap();
        assert_eq!(digest, sample(b.path()).digest().unwrap());

        fs::write(b.path().join("etc/hostname"), "other\n").unwrap();
        assert_ne!(digest, sample_again(b.path()).digest().unwrap());

        let c = tempfile::tempdir().unwrap();
        sample(c.path());
        fs::set_permissions(c.path().join("etc/hostname"), fs::Permissions::from_mode(0o755)).unwrap();
        assert_ne!(digest, sample_again(c.path()).digest().unwrap());
    }

    fn sample_again(dir: &Path) -> Layer {
        let mut layer = Layer::new();
        layer.add_tree("", dir).unwrap();
        layer
    }

    #[test]
    fn install_writes_files_links_and_modes_and_keeps_existing_dirs() {
        let src = tempfile::tempdir().unwrap();
        let layer = sample(src.path());
        let root = tempfile::tempdir().unwrap();
        fs::create_dir(root.path().join("etc")).unwrap();
        fs::set_permissions(root.path().join("etc"), fs::Permissions::from_mode(0o750)).unwrap();
        fs::write(root.path().join("etc/hostname"), "old\n").unwrap();
        layer.install_into(root.path(), None).unwrap();
        assert_eq!(
            fs::read_to_string(root.path().join("etc/hostname")).unwrap(),
            "archipelago\n"
        );
        assert_eq!(
            fs::read_link(root.path().join("etc/link")).unwrap(),
            Path::new("../run/x")
        );
        let mode = |p: &str| fs::metadata(root.path().join(p)).unwrap().mode() & 0o7777;
        assert_eq!(mode("etc"), 0o750, "an existing directory keeps its mode");
        assert_eq!(mode("tool"), 0o755);
        assert_eq!(mode("etc/containers/containers.conf"), 0o644);
    }

    #[test]
    fn install_refuses_to_write_through_a_symlink() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        symlink(outside.path(), root.path().join("opt")).unwrap();
        let mut layer = Layer::new();
        layer.add_bytes("opt/x", b"1".to_vec(), FILE_MODE).unwrap();
        let err = layer.install_into(root.path(), None).unwrap_err();
        assert!(format!("{err:#}").contains("symlink"), "{err:#}");
        assert!(!outside.path().join("x").exists());
    }

    #[test]
    fn bad_paths_and_duplicates_are_refused() {
        let mut layer = Layer::new();
        for bad in ["", "/etc/x", "etc/../x", "./x", "etc/", "a//b"] {
            assert!(layer.add_bytes(bad, Vec::new(), FILE_MODE).is_err(), "{bad:?}");
        }
        layer.add_bytes("etc/x", Vec::new(), FILE_MODE).unwrap();
        assert!(layer.add_bytes("etc/x", Vec::new(), FILE_MODE).is_err());
        assert!(layer.add_bytes("etc/x/y", Vec::new(), FILE_MODE).is_err());
    }
}
