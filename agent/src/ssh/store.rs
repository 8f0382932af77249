//! The node's `authorized_keys` file (`DataRoot::authorized_keys_file`):
//! read strictly, changed under a lock, replaced atomically.
//!
//! A file with a line the node does not accept is never rewritten: the
//! error names the file and each line, and nothing is lost. Writers hold an
//! exclusive `flock` on the `ssh/` folder, so two commands adding keys at
//! once both land.

use std::fs;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::Context as _;

use super::keys::{parse_text, BadLine, Line, PublicKey};
use crate::dataroot::DataRoot;

/// The file's mode, and its folder's.
pub const FILE_MODE: u32 = 0o600;
pub const DIR_MODE: u32 = 0o700;
/// A larger file is no list of keys.
pub const MAX_FILE: u64 = 1 << 20;

/// A file (or a key given on the command line) with lines the node does
/// not accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {} not accepted:\n{}", .file, if .lines.len() == 1 { "a line is" } else { "lines are" }, list(.lines))]
pub struct BadFile {
    /// The file, as shown (a path, or `the key given`).
    pub file: String,
    pub lines: Vec<BadLine>,
}

fn list(lines: &[BadLine]) -> String {
    let shown: Vec<String> = lines.iter().map(|l| format!("  {l}")).collect();
    shown.join("\n")
}

/// Parses a whole text of keys; any bad line refuses it all.
pub fn parse_strict(text: &str, shown: &str) -> Result<Vec<Line>, BadFile> {
    let (good, bad) = parse_text(text);
    if !bad.is_empty() {
        return Err(BadFile {
            file: shown.to_owned(),
            lines: bad,
        });
    }
    Ok(good.into_iter().map(|(_, l)| l).collect())
}

/// Reads a text file of at most [`MAX_FILE`] bytes, never through a
/// symlink.
pub fn read_text(path: &Path) -> anyhow::Result<Option<String>> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let file = match fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot open {} (a symlink is refused)", path.display())),
    };
    let md = file
        .metadata()
        .with_context(|| format!("cannot stat {}", path.display()))?;
    if !md.is_file() {
        anyhow::bail!("{} is not a regular file", path.display());
    }
    if md.len() > MAX_FILE {
        anyhow::bail!(
            "{} holds {} bytes; a list of public keys holds at most {MAX_FILE}",
            path.display(),
            md.len()
        );
    }
    let mut bytes = Vec::new();
    file.take(MAX_FILE + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {}", path.display()))?;
    String::from_utf8(bytes).map(Some).map_err(|e| {
        anyhow::anyhow!(
            "{} is not UTF-8 text (byte {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

/// The node's `authorized_keys`, as read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyFile {
    lines: Vec<Line>,
}

impl KeyFile {
    /// Reads `path`; a missing file is an empty one.
    pub fn read(path: &Path) -> anyhow::Result<KeyFile> {
        let Some(text) = read_text(path)? else {
            return Ok(KeyFile::default());
        };
        let lines = parse_strict(&text, &path.display().to_string()).map_err(|e| {
            anyhow::anyhow!(
                "{e}\nthe file is left as it is: fix or remove those lines (sshd ignores them too), then try again"
            )
        })?;
        Ok(KeyFile { lines })
    }

    pub fn keys(&self) -> impl Iterator<Item = &PublicKey> {
        self.lines.iter().filter_map(|l| match l {
            Line::Key(k) => Some(k),
            Line::Other(_) => None,
        })
    }

    /// Adds `key` unless the same key is there (whatever its comment).
    /// Returns whether it was added.
    pub fn add(&mut self, key: &PublicKey) -> bool {
        if self.keys().any(|k| k.same_key(key)) {
            return false;
        }
        self.lines.push(Line::Key(key.clone()));
        true
    }

    /// Removes every key with `fingerprint` (`SHA256:…`); returns them.
    pub fn remove(&mut self, fingerprint: &str) -> Vec<PublicKey> {
        let mut removed = Vec::new();
        self.lines.retain(|l| match l {
            Line::Key(k) if k.fingerprint() == fingerprint => {
                removed.push(k.clone());
                false
            }
            _ => true,
        });
        removed
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for line in &self.lines {
            match line {
                Line::Key(k) => out.push_str(&k.line()),
                Line::Other(text) => out.push_str(text),
            }
            out.push('\n');
        }
        out
    }
}

/// Who the `ssh/` folder and its file belong to: `owner` when given, else
/// the data root's owner (`data-disk --owner` gives it to the agent's
/// user, who is also the one SSH user).
pub fn owner_or_data_roots(data: &DataRoot, owner: Option<(u32, u32)>) -> anyhow::Result<(u32, u32)> {
    if let Some(owner) = owner {
        return Ok(owner);
    }
    let md = fs::metadata(data.path()).with_context(|| format!("cannot stat the data root {}", data.display()))?;
    Ok((md.uid(), md.gid()))
}

/// The `ssh/` folder, made if missing, 0700 and `owner`'s, locked
/// exclusively while the value lives.
pub struct Locked {
    _dir: fs::File,
    file: PathBuf,
    owner: (u32, u32),
}

impl Locked {
    pub fn open(data: &DataRoot, owner: (u32, u32)) -> anyhow::Result<Locked> {
        let dir = data.ssh_dir();
        crate::fsutil::ensure_private_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let md = fs::symlink_metadata(&dir).with_context(|| format!("cannot stat {}", dir.display()))?;
        if !md.is_dir() {
            anyhow::bail!("{} is not a folder", dir.display());
        }
        if (md.uid(), md.gid()) != owner {
            std::os::unix::fs::chown(&dir, Some(owner.0), Some(owner.1))
                .with_context(|| format!("cannot give {} to {}:{}", dir.display(), owner.0, owner.1))?;
        }
        let handle = fs::File::open(&dir).with_context(|| format!("cannot open {}", dir.display()))?;
        rustix::fs::flock(&handle, rustix::fs::FlockOperation::LockExclusive)
            .with_context(|| format!("cannot lock {}", dir.display()))?;
        Ok(Locked {
            _dir: handle,
            file: data.authorized_keys_file(),
            owner,
        })
    }

    pub fn path(&self) -> &Path {
        &self.file
    }

    pub fn read(&self) -> anyhow::Result<KeyFile> {
        KeyFile::read(&self.file)
    }

    /// Replaces the file with `keys`, 0600 and the owner's, atomically.
    pub fn write(&self, keys: &KeyFile) -> anyhow::Result<()> {
        crate::fsutil::write_atomic_owned(&self.file, keys.render().as_bytes(), FILE_MODE, Some(self.owner))
            .with_context(|| format!("cannot write {}", self.file.display()))
    }

    /// Gives an existing file its owner and mode (the installer or a
    /// person may have written it as root).
    pub fn fix_file(&self) -> anyhow::Result<()> {
        let md = match fs::symlink_metadata(&self.file) {
            Ok(md) => md,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("cannot stat {}", self.file.display())),
        };
        if !md.is_file() {
            anyhow::bail!("{} is not a regular file", self.file.display());
        }
        if (md.uid(), md.gid()) != self.owner {
            std::os::unix::fs::lchown(&self.file, Some(self.owner.0), Some(self.owner.1)).with_context(|| {
                format!(
                    "cannot give {} to {}:{}",
                    self.file.display(),
                    self.owner.0,
                    self.owner.1
                )
            })?;
        }
        if md.permissions().mode() & 0o7777 != FILE_MODE {
            fs::set_permissions(&self.file, fs::Permissions::from_mode(FILE_MODE))
                .with_context(|| format!("cannot set the mode of {}", self.file.display()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const A: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICTIZDkT/58mJaqMOlNmdMOsOEJb3r4bCjuTHsZfsLdS test@archy";

    #[test]
    fn adding_twice_keeps_one_and_comments_survive_a_rewrite() {
        let mut file = KeyFile {
            lines: parse_strict(&format!("# mine\n{A}\n"), "f").unwrap(),
        };
        let key = PublicKey::parse(&A.replace("test@archy", "other comment")).unwrap();
        assert!(!file.add(&key), "the same key under another comment is a duplicate");
        assert_eq!(file.render(), format!("# mine\n{A}\n"));
        let removed = file.remove(&key.fingerprint());
        assert_eq!(removed.len(), 1);
        assert_eq!(file.render(), "# mine\n");
        assert!(file.add(&key));
        assert_eq!(file.keys().count(), 1);
    }

    #[test]
    fn a_bad_file_names_every_bad_line() {
        let e = parse_strict(&format!("{A}\nssh-dss AAAA\n\nnonsense\n"), "/d/ssh/authorized_keys").unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with("/d/ssh/authorized_keys: lines are not accepted:\n  line 2: "),
            "{text}"
        );
        assert!(text.contains("\n  line 4: \"nonsense\" is not a key type"), "{text}");
    }
}
