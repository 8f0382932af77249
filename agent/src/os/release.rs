//! `release.json`: what one release of the OS is (version, architecture,
//! the sha256 of each of its live files). The ISO carries one at its root
//! (written by `cargo xtask iso` through this type), each system slot
//! carries the one of the release it holds, and an update bundle carries
//! it as the first member of its `rootfs.tar`.
//!
//! [`Version`] is the one release version: the ISO's file name, the
//! bundle's manifest, `release.json` and `os status` all show it, and an
//! update compares two of them to refuse a downgrade. It is semver's
//! `MAJOR.MINOR.PATCH` with an optional pre-release, ordered as semver
//! orders them; build metadata (`+…`) is refused, since it would let two
//! different releases compare equal.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Its name, at the root of the ISO and of a slot.
pub const RELEASE_FILE: &str = "release.json";
/// The files of a release, relative to the ISO's or the slot's root.
pub const LIVE_FILES: [&str; 3] = ["live/vmlinuz", "live/initrd.img", "live/filesystem.squashfs"];
/// A release's own extra kernel words (a GRUB environment block with
/// `ARCHY_ARGS`, which the installed `grub.cfg` appends), present only in
/// the releases that need them (the tests' short trial deadline).
pub const BOOTARGS_FILE: &str = "live/bootargs";
/// The files a release may carry besides [`LIVE_FILES`].
pub const OPTIONAL_LIVE_FILES: [&str; 1] = [BOOTARGS_FILE];
/// The longest version string allowed.
pub const VERSION_MAX_LEN: usize = 64;
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
    /// A [`Version`] (checked when read; [`Release::parsed_version`]).
    pub version: String,
    pub architecture: String,
    /// Each of [`LIVE_FILES`] (and of [`OPTIONAL_LIVE_FILES`] the release
    /// carries) and its sha256 (lower-case hex).
    pub files: BTreeMap<String, String>,
}

/// A release version: `MAJOR.MINOR.PATCH`, optionally `-PRE` (dot-separated
/// identifiers of ASCII letters, digits and `-`), numbers without leading
/// zeros. Ordered as semver orders versions: a pre-release comes before its
/// release (`1.0.0-rc.1 < 1.0.0`), numeric identifiers compare as numbers
/// and before alphanumeric ones. Written and read as its string.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Version {
    pub major: u64,
    pub minor: u64,
    pub patch: u64,
    /// Empty for a release.
    pub pre: Vec<PreRelease>,
}

/// One dot-separated identifier of a pre-release.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PreRelease {
    /// Digits only; compared as a number, and before any [`PreRelease::Alpha`].
    Numeric(u64),
    /// With a letter or `-`; compared as ASCII.
    Alpha(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "version {value:?} is not a release version: {why}; allowed: MAJOR.MINOR.PATCH with an optional \
     pre-release after '-' (e.g. 1.2.0 or 1.2.0-rc.1), numbers without leading zeros, at most {VERSION_MAX_LEN} characters"
)]
pub struct VersionError {
    pub value: String,
    pub why: String,
}

impl Version {
    pub fn parse(value: &str) -> Result<Version, VersionError> {
        let fail = |why: String| VersionError {
            value: value.to_owned(),
            why,
        };
        if value.is_empty() {
            return Err(fail("it is empty".into()));
        }
        if value.len() > VERSION_MAX_LEN {
            return Err(fail(format!("it has {} characters", value.len())));
        }
        if value.contains('+') {
            return Err(fail(
                "build metadata ('+…') is not allowed: two releases would compare equal".into(),
            ));
        }
        let (core, pre) = match value.split_once('-') {
            Some((core, pre)) => (core, Some(pre)),
            None => (value, None),
        };
        let numbers: Vec<&str> = core.split('.').collect();
        let [major, minor, patch] = numbers.as_slice() else {
            return Err(fail(format!(
                "{core:?} has {} dot-separated numbers, not 3",
                numbers.len()
            )));
        };
        let number = |what: &str, text: &str| -> Result<u64, VersionError> {
            numeric(text).ok_or_else(|| fail(format!("its {what} {text:?} is not a number without leading zeros")))
        };
        let version = Version {
            major: number("major", major)?,
            minor: number("minor", minor)?,
            patch: number("patch", patch)?,
            pre: match pre {
                None => Vec::new(),
                Some(pre) => pre
                    .split('.')
                    .map(|id| pre_release(id).ok_or_else(|| fail(format!("its pre-release identifier {id:?} is not allowed (ASCII letters, digits and '-', not empty, a number without leading zeros)"))))
                    .collect::<Result<_, _>>()?,
            },
        };
        Ok(version)
    }

    pub fn is_pre_release(&self) -> bool {
        !self.pre.is_empty()
    }
}

/// Digits only, no leading zero (but "0"), within u64.
fn numeric(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) || (text.len() > 1 && text.starts_with('0')) {
        return None;
    }
    text.parse().ok()
}

fn pre_release(id: &str) -> Option<PreRelease> {
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return None;
    }
    if id.bytes().all(|b| b.is_ascii_digit()) {
        numeric(id).map(PreRelease::Numeric)
    } else {
        Some(PreRelease::Alpha(id.to_owned()))
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.major, self.minor, self.patch)
            .cmp(&(other.major, other.minor, other.patch))
            .then_with(|| match (self.pre.is_empty(), other.pre.is_empty()) {
                (true, true) => Ordering::Equal,
                // A pre-release comes before its release.
                (true, false) => Ordering::Greater,
                (false, true) => Ordering::Less,
                // Identifier by identifier; a longer list wins a tie.
                (false, false) => self.pre.cmp(&other.pre),
            })
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)?;
        for (i, id) in self.pre.iter().enumerate() {
            f.write_str(if i == 0 { "-" } else { "." })?;
            match id {
                PreRelease::Numeric(n) => write!(f, "{n}")?,
                PreRelease::Alpha(s) => f.write_str(s)?,
            }
        }
        Ok(())
    }
}

impl FromStr for Version {
    type Err = VersionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Version::parse(s)
    }
}

impl TryFrom<String> for Version {
    type Error = VersionError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Version::parse(&s)
    }
}

impl From<Version> for String {
    fn from(v: Version) -> String {
        v.to_string()
    }
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
        self.parsed_version_at(path)?;
        if !["amd64", "arm64"].contains(&self.architecture.as_str()) {
            return Err(invalid(
                path,
                format!("field architecture is {:?}; allowed: amd64, arm64", self.architecture),
            ));
        }
        let names: Vec<&str> = self.files.keys().map(String::as_str).collect();
        let mut required = LIVE_FILES.to_vec();
        required.sort_unstable();
        let mut wanted = required.clone();
        wanted.extend(OPTIONAL_LIVE_FILES.iter().filter(|f| names.contains(f)));
        wanted.sort_unstable();
        if names != wanted {
            return Err(invalid(
                path,
                format!("field files names {names:?}; it must name exactly {required:?}, and may name {OPTIONAL_LIVE_FILES:?}"),
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

    /// The field version as a [`Version`].
    pub fn parsed_version(&self) -> Result<Version, ReleaseError> {
        self.parsed_version_at(Path::new(RELEASE_FILE))
    }

    fn parsed_version_at(&self, path: &Path) -> Result<Version, ReleaseError> {
        Version::parse(&self.version).map_err(|e| invalid(path, format!("field version: {e}")))
    }

    /// The release of the live files under `root` (and of the optional
    /// ones present there), hashed now. `version` is a [`Version`] or its
    /// text (checked).
    pub fn of_dir(root: &Path, version: impl fmt::Display, architecture: &str) -> Result<Release, ReleaseError> {
        let mut files = BTreeMap::new();
        for name in LIVE_FILES {
            files.insert(name.to_owned(), sha256_file(&root.join(name))?);
        }
        for name in OPTIONAL_LIVE_FILES {
            let path = root.join(name);
            let present = fs::symlink_metadata(&path).map(|_| true).or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Ok(false)
                } else {
                    Err(ReleaseError::Io {
                        path: path.clone(),
                        source: e,
                    })
                }
            })?;
            if present {
                files.insert(name.to_owned(), sha256_file(&path)?);
            }
        }
        let release = Release {
            version: version.to_string(),
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

    fn v(s: &str) -> Version {
        Version::parse(s).unwrap()
    }

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
        let r = Release::of_dir(dir.path(), v("0.2.0"), "amd64").unwrap();
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
        let good = Release::of_dir(dir.path(), v("1.0.0"), "amd64").unwrap();
        let cases: Vec<(Release, &str)> = vec![
            (
                Release {
                    version: "1 0".into(),
                    ..good.clone()
                },
                "field version: version \"1 0\" is not a release version",
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

    #[test]
    fn versions_order_as_semver_orders_them() {
        let ordered = [
            "0.0.1",
            "0.1.0-alpha",
            "0.1.0-alpha.1",
            "0.1.0-alpha.beta",
            "0.1.0-beta",
            "0.1.0-beta.2",
            "0.1.0-beta.11",
            "0.1.0-rc.1",
            "0.1.0",
            "0.1.1",
            "0.2.0",
            "0.10.0",
            "1.0.0-0",
            "1.0.0-0.a",
            "1.0.0-1",
            "1.0.0",
            "2.0.0",
            "10.0.0",
        ];
        for pair in ordered.windows(2) {
            let (a, b) = (v(pair[0]), v(pair[1]));
            assert!(a < b, "{a} < {b}");
            assert!(b > a, "{b} > {a}");
        }
        for text in ordered {
            assert_eq!(v(text).to_string(), text, "round trip");
            assert_eq!(v(text).cmp(&v(text)), Ordering::Equal);
        }
        assert!(v("1.0.0-rc.1").is_pre_release() && !v("1.0.0").is_pre_release());
        let json = serde_json::to_string(&v("1.2.3-rc.4")).unwrap();
        assert_eq!(json, "\"1.2.3-rc.4\"");
        assert_eq!(serde_json::from_str::<Version>(&json).unwrap(), v("1.2.3-rc.4"));
        let e = serde_json::from_str::<Version>("\"1.2\"").unwrap_err().to_string();
        assert!(e.contains("not a release version"), "{e}");
    }

    #[test]
    fn bad_versions_say_what_is_wrong_and_what_is_allowed() {
        let cases = [
            ("", "it is empty"),
            ("1.2", "has 2 dot-separated numbers, not 3"),
            ("1.2.3.4", "has 4 dot-separated numbers"),
            ("v1.2.3", "its major \"v1\" is not a number"),
            ("01.2.3", "its major \"01\""),
            ("1.x.3", "its minor \"x\""),
            ("1.2.", "its patch \"\""),
            ("1.2.3-", "pre-release identifier \"\""),
            ("1.2.3-rc..1", "pre-release identifier \"\""),
            ("1.2.3-rc.01", "pre-release identifier \"01\""),
            ("1.2.3-rc_1", "pre-release identifier \"rc_1\""),
            ("1.2.3+build.5", "build metadata"),
            ("1.2.99999999999999999999", "its patch"),
            (&"1.2.3-a".repeat(10), "characters"),
        ];
        for (text, says) in cases {
            let e = Version::parse(text).unwrap_err();
            assert_eq!(e.value, text);
            let e = e.to_string();
            assert!(e.contains(says), "{text:?}: {e}");
            assert!(e.contains("allowed: MAJOR.MINOR.PATCH"), "{e}");
        }
        // A hyphen inside a pre-release is one identifier, not a second '-'.
        assert_eq!(
            v("1.0.0-x-y.2").pre,
            [PreRelease::Alpha("x-y".into()), PreRelease::Numeric(2)]
        );
    }

    #[test]
    fn a_release_may_carry_its_bootargs() {
        let dir = live_dir();
        let without = Release::of_dir(dir.path(), v("1.0.0"), "amd64").unwrap();
        assert!(!without.files.contains_key(BOOTARGS_FILE));
        fs::write(dir.path().join(BOOTARGS_FILE), b"# GRUB Environment Block\n").unwrap();
        let with = Release::of_dir(dir.path(), v("1.0.0"), "amd64").unwrap();
        assert_eq!(
            with.files[BOOTARGS_FILE],
            sha256_file(&dir.path().join(BOOTARGS_FILE)).unwrap()
        );
        let bytes = with.to_file_bytes().unwrap();
        assert_eq!(Release::parse(&bytes, Path::new("r")).unwrap(), with);
        with.verify(dir.path()).unwrap();
        assert_eq!(with.parsed_version().unwrap(), v("1.0.0"));
        // Any other extra file is refused, naming what is allowed.
        let mut extra = with.clone();
        extra.files.insert("live/other".into(), "a".repeat(64));
        let e = Release::parse(&serde_json::to_vec(&extra).unwrap(), Path::new("r"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("may name [\"live/bootargs\"]"), "{e}");
    }
}
