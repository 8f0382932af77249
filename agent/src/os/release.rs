//! `release.json`: what one release of the OS is (version, architecture,
//! the sha256 of each of its live files). The ISO carries one at its root
//! (written by `cargo xtask iso` through this type), each system slot
//! carries the one of the release it holds.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Its name, at the root of the ISO and of a slot.
pub const RELEASE_FILE: &str = "release.json";
/// The files of a release, relative to the ISO's or the slot's root.
pub const LIVE_FILES: [&str; 3] = ["live/vmlinuz", "live/initrd.img", "live/filesystem.squashfs"];
/// The architecture this agent was built for, as Debian names it: a node
/// installs only a release of its own.
pub const ARCHITECTURE: &str = if cfg!(target_arch = "aarch64") {
    "arm64"
} else {
    "amd64"
};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Release {
    pub version: String,
    pub architecture: String,
    /// Each of [`LIVE_FILES`] and its sha256 (lower-case hex).
    pub files: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("{path}: not a release file: {why}")]
    Invalid { path: PathBuf, why: String },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: its sha256 is {found}, the release says {expected}")]
    Mismatch {
        path: PathBuf,
        expected: String,
        found: String,
    },
}

fn invalid(path: &Path, why: impl Into<String>) -> ReleaseError {
    ReleaseError::Invalid {
        path: path.to_owned(),
        why: why.into(),
    }
}

impl Release {
    /// Reads and checks `path`: its fields, exactly [`LIVE_FILES`], each
    /// with a sha256 in lower-case hex.
    pub fn read(path: &Path) -> Result<Release, ReleaseError> {
        let bytes = fs::read(path).map_err(|source| ReleaseError::Io {
            path: path.to_owned(),
            source,
        })?;
        Release::parse(&bytes, path)
    }

    /// Parses `bytes`, read from `path` (named in errors).
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Release, ReleaseError> {
        let release: Release = serde_json::from_slice(bytes).map_err(|e| invalid(path, e.to_string()))?;
        release.check(path)?;
        Ok(release)
    }

    fn check(&self, path: &Path) -> Result<(), ReleaseError> {
        let version_ok = !self.version.is_empty()
            && self.version.len() <= 64
            && self
                .version
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+' | '~'));
        if !version_ok {
            return Err(invalid(
                path,
                format!(
                    "field version is {:?}; allowed: 1 to 64 of letters, digits, '.', '-', '+', '~'",
                    self.version
                ),
            ));
        }
        if !["amd64", "arm64"].contains(&self.architecture.as_str()) {
            return Err(invalid(
                path,
                format!("field architecture is {:?}; allowed: amd64, arm64", self.architecture),
            ));
        }
        let names: Vec<&str> = self.files.keys().map(String::as_str).collect();
        let mut wanted = LIVE_FILES.to_vec();
        wanted.sort_unstable();
        if names != wanted {
            return Err(invalid(
                path,
                format!("field files names {names:?}; it must name exactly {wanted:?}"),
            ));
        }
        for (name, hash) in &self.files {
            if hash.len() != 64 || !hash.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)) {
                return Err(invalid(
                    path,
                    format!("field files.{name} is {hash:?}; allowed: a sha256 as 64 lower-case hex digits"),
                ));
            }
        }
        Ok(())
    }

    /// The release of the live files under `root`, hashed now.
    pub fn of_dir(root: &Path, version: &str, architecture: &str) -> Result<Release, ReleaseError> {
        let mut files = BTreeMap::new();
        for name in LIVE_FILES {
            files.insert(name.to_owned(), sha256_file(&root.join(name))?);
        }
        let release = Release {
            version: version.to_owned(),
            architecture: architecture.to_owned(),
            files,
        };
        release.check(&root.join(RELEASE_FILE))?;
        Ok(release)
    }

    /// The file's bytes: pretty JSON and a newline, parsed back before
    /// they are returned, so nothing writes a file the reader refuses.
    pub fn to_file_bytes(&self) -> Result<Vec<u8>, ReleaseError> {
        let mut bytes = serde_json::to_vec_pretty(self).map_err(|e| invalid(Path::new(RELEASE_FILE), e.to_string()))?;
        bytes.push(b'\n');
        Release::parse(&bytes, Path::new(RELEASE_FILE))?;
        Ok(bytes)
    }

    /// Refuses a release built for another architecture than this node's.
    pub fn require_native(&self, path: &Path) -> Result<(), ReleaseError> {
        if self.architecture == ARCHITECTURE {
            Ok(())
        } else {
            Err(invalid(
                path,
                format!("it is for {}, and this node runs {ARCHITECTURE}", self.architecture),
            ))
        }
    }

    /// Checks every file under `root` against its sha256.
    pub fn verify(&self, root: &Path) -> Result<(), ReleaseError> {
        for (name, expected) in &self.files {
            let path = root.join(name);
            let found = sha256_file(&path)?;
            if &found != expected {
                return Err(ReleaseError::Mismatch {
                    path,
                    expected: expected.clone(),
                    found,
                });
            }
        }
        Ok(())
    }

    /// The release's size: its live files under `root` together.
    pub fn size(&self, root: &Path) -> Result<u64, ReleaseError> {
        self.files.keys().try_fold(0u64, |sum, name| {
            let path = root.join(name);
            let len = fs::metadata(&path)
                .map_err(|source| ReleaseError::Io { path, source })?
                .len();
            Ok(sum + len)
        })
    }
}

/// The sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String, ReleaseError> {
    let io = |source| ReleaseError::Io {
        path: path.to_owned(),
        source,
    };
    let mut f = fs::File::open(path).map_err(io)?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
    }
    Ok(format!("{:x}", hash.finalize()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn live_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("live")).unwrap();
        for (i, name) in LIVE_FILES.iter().enumerate() {
            fs::write(dir.path().join(name), vec![b'a' + i as u8; 1000 + i]).unwrap();
        }
        dir
    }

    #[test]
    fn a_release_round_trips_and_verifies() {
        let dir = live_dir();
        let r = Release::of_dir(dir.path(), "0.2.0", "amd64").unwrap();
        let bytes = r.to_file_bytes().unwrap();
        assert_eq!(Release::parse(&bytes, Path::new("x")).unwrap(), r);
        r.verify(dir.path()).unwrap();
        assert_eq!(r.size(dir.path()).unwrap(), 3003);
        fs::write(dir.path().join("live/initrd.img"), b"changed").unwrap();
        match r.verify(dir.path()).unwrap_err() {
            ReleaseError::Mismatch { path, .. } => assert!(path.ends_with("live/initrd.img")),
            other => panic!("{other}"),
        }
    }

    #[test]
    fn bad_fields_are_named_with_what_is_allowed() {
        let dir = live_dir();
        let good = Release::of_dir(dir.path(), "1.0.0", "amd64").unwrap();
        let cases: Vec<(Release, &str)> = vec![
            (
                Release {
                    version: "1 0".into(),
                    ..good.clone()
                },
                "field version is \"1 0\"",
            ),
            (
                Release {
                    architecture: "i386".into(),
                    ..good.clone()
                },
                "field architecture is \"i386\"",
            ),
            (
                Release {
                    files: good.files.clone().into_iter().take(2).collect(),
                    ..good.clone()
                },
                "it must name exactly",
            ),
            (
                Release {
                    files: good.files.keys().map(|k| (k.clone(), "ABC".to_owned())).collect(),
                    ..good.clone()
                },
                "64 lower-case hex",
            ),
        ];
        for (bad, says) in cases {
            let bytes = serde_json::to_vec(&bad).unwrap();
            let e = Release::parse(&bytes, Path::new("/iso/release.json"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(says) && e.contains("/iso/release.json"), "{e}");
        }
        let e = Release::parse(
            br#"{"version":"1","architecture":"amd64","files":{},"extra":1}"#,
            Path::new("r"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unknown field"), "{e}");
    }
}
