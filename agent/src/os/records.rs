//! The records of a node's life around an OS update (`docs/updates.md`,
//! "Trial, commit and rollback"): one type per file, each with
//! `"format": 1`, read strictly and written atomically.
//!
//! - [`Trial`]: `<data>/system/os/trial.json`, written by the update helper
//!   when it has installed a release and made its slot primary; the new
//!   release's boots append their failures to it; gone once committed.
//! - [`Rollback`]: `<data>/system/os/rollback.json`, written by
//!   `os boot-prepare` when it finds the node back on its old release after
//!   a trial failed; kept (acknowledged or not) until the next rollback.
//! - [`BootStatus`]: `/run/archipelago/os/boot.json`, written by
//!   `os boot-prepare` (and `os mark-good`) on every installed boot: what
//!   this boot is. The agent reads only this one (a trial freezes app
//!   changes), so it is world-readable (0644); the others are root's (0600).
//!
//! The records live on the data partition because the slots are replaced
//! whole by an update: only the data partition outlives both releases.
//! Slots are named `"A"` and `"B"` as in the boot environment.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::fsutil;

/// The one format version each record carries in `"format"`.
pub const FORMAT: u32 = 1;
/// The runtime folder of the OS records (`/run`, gone at power-off).
pub const RUN_OS_DIR: &str = "/run/archipelago/os";
/// The boot status file: [`BootStatus`].
pub const BOOT_JSON: &str = "/run/archipelago/os/boot.json";
/// The runtime folder's mode: the agent (not root) reads boot.json.
pub const RUN_OS_DIR_MODE: u32 = 0o755;
/// boot.json's mode: anyone on the node may read what this boot is.
pub const BOOT_JSON_MODE: u32 = 0o644;
/// The mode of the records on the data partition (root's).
pub const RECORD_MODE: u32 = 0o600;
/// The mode of the records' folder on the data partition (root's).
pub const RECORD_DIR_MODE: u32 = 0o700;
/// How many boots a release on trial gets before GRUB gives up on it.
pub const MAX_TRIES: u8 = 3;

/// A record that could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: not a valid {what}: {why}")]
    Invalid {
        path: PathBuf,
        what: &'static str,
        why: String,
    },
}

/// One of the two system slots (the boot environment's name, serialized
/// `"A"`/`"B"`).
pub use super::bootenv::SlotName as Slot;

/// One boot of a release on trial that did not pass its checks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrialFailure {
    /// Which boot of the trial (1..=3).
    #[serde(rename = "try")]
    pub try_n: u8,
    /// Why `os boot-check` failed it, as it said.
    pub reason: String,
}

/// `trial.json`: a release installed into `to_slot` and not yet committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trial {
    pub format: u32,
    /// The committed release the update started from.
    pub from_version: String,
    /// The release on trial.
    pub to_version: String,
    /// The slot it was written to.
    pub to_slot: Slot,
    /// The apps healthy when the update began: the new release must bring
    /// each of them up healthy again before it is committed.
    pub healthy_before: Vec<String>,
    /// RFC 3339, when the update was installed.
    pub started_at: String,
    /// Each failed boot of the trial, in order.
    #[serde(default)]
    pub failures: Vec<TrialFailure>,
}

impl Trial {
    /// The reason a rollback gives: the failures the trial's boots wrote,
    /// or, when none wrote one, that the release never got far enough.
    pub fn rollback_reason(&self) -> String {
        if self.failures.is_empty() {
            return format!("it did not come up in {MAX_TRIES} tries (no report: kernel or early boot failure)");
        }
        self.failures
            .iter()
            .map(|f| format!("try {}: {}", f.try_n, f.reason))
            .collect::<Vec<_>>()
            .join("; ")
    }

    pub fn read(path: &Path) -> Result<Option<Trial>, RecordError> {
        let t: Option<Trial> = read_json(path, "trial record")?;
        if let Some(t) = &t {
            check_format(path, "trial record", t.format)?;
        }
        Ok(t)
    }

    pub fn write(&self, path: &Path) -> Result<(), RecordError> {
        write_record(path, self)
    }
}

/// `rollback.json`: the node went back to its committed release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollback {
    pub format: u32,
    /// The release that failed its trial.
    pub from: String,
    /// The release the node runs again.
    pub to: String,
    /// Why (the trial's failures, or that it never reported).
    pub reason: String,
    /// RFC 3339, when `os boot-prepare` found it.
    pub at: String,
    /// Whether the owner acknowledged it (`os acknowledge`): the console
    /// stops showing it.
    #[serde(default)]
    pub acknowledged: bool,
}

impl Rollback {
    /// "rolled back from <new> to <old>: <reason>", the one line the
    /// console, the journal and `os status` show.
    pub fn message(&self) -> String {
        format!("rolled back from {} to {}: {}", self.from, self.to, self.reason)
    }

    pub fn read(path: &Path) -> Result<Option<Rollback>, RecordError> {
        let r: Option<Rollback> = read_json(path, "rollback record")?;
        if let Some(r) = &r {
            check_format(path, "rollback record", r.format)?;
        }
        Ok(r)
    }

    pub fn write(&self, path: &Path) -> Result<(), RecordError> {
        write_record(path, self)
    }
}

/// What a slot holds, as the boot environment says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlotState {
    /// Committed, or bootable and not counted.
    Good,
    /// Not bootable (failed its trial, or being written).
    Bad,
    /// On trial: `tries` boots of [`MAX_TRIES`] used.
    Trying,
    /// No release in it.
    Empty,
}

/// One slot in [`BootStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotStatus {
    /// Its release's version, when it holds a readable `release.json`.
    pub version: Option<String>,
    pub state: SlotState,
    /// Boots of the trial used (only meaningful while `trying`).
    #[serde(default)]
    pub tries: u8,
}

impl fmt::Display for SlotStatus {
    /// "good", "bad", "trying 2 of 3", "empty".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.state {
            SlotState::Good => f.write_str("good"),
            SlotState::Bad => f.write_str("bad"),
            SlotState::Trying => write!(f, "trying {} of {MAX_TRIES}", self.tries),
            SlotState::Empty => f.write_str("empty"),
        }
    }
}

/// `/run/archipelago/os/boot.json`: what this boot is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootStatus {
    pub format: u32,
    /// The slot this boot runs from.
    pub booted_slot: Slot,
    /// Its release's version (from the live medium's `release.json`).
    pub booted_version: Option<String>,
    pub a: SlotStatus,
    pub b: SlotStatus,
    /// The booted release is committed (not on trial).
    pub committed: bool,
    /// The booted release is on trial: the agent makes no app changes
    /// (no install, upgrade or recreate) until it is committed.
    pub trial: bool,
    /// GRUB found no usable boot environment (`archipelago.degraded=1`).
    pub degraded: bool,
    /// Seconds `os boot-check` waits for a trial boot to come up healthy.
    pub trial_deadline_secs: Option<u64>,
    /// The last rollback (acknowledged or not), from `rollback.json`.
    pub last_rollback: Option<Rollback>,
}

impl BootStatus {
    pub fn slot(&self, s: Slot) -> &SlotStatus {
        match s {
            Slot::A => &self.a,
            Slot::B => &self.b,
        }
    }

    /// Reads boot.json; `None` when there is none (a live boot, a dev
    /// node, or before `os boot-prepare` ran).
    pub fn read(path: &Path) -> Result<Option<BootStatus>, RecordError> {
        let b: Option<BootStatus> = read_json(path, "boot status")?;
        if let Some(b) = &b {
            check_format(path, "boot status", b.format)?;
        }
        Ok(b)
    }

    /// Writes boot.json (0644), its folder made 0755 when missing.
    pub fn write(&self, path: &Path) -> Result<(), RecordError> {
        if let Some(dir) = path.parent() {
            ensure_dir(dir, RUN_OS_DIR_MODE).map_err(|source| RecordError::Write {
                path: dir.to_owned(),
                source,
            })?;
        }
        write_json(path, self, BOOT_JSON_MODE)
    }
}

/// Creates `dir` (and its parents) when missing, the last one with `mode`.
pub fn ensure_dir(dir: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    if let Some(parent) = dir.parent() {
        fs::create_dir_all(parent)?;
    }
    match fs::DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => fs::set_permissions(dir, fs::Permissions::from_mode(mode)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes a record; a missing one is fine.
pub fn remove(path: &Path) -> Result<(), RecordError> {
    match fs::remove_file(path) {
        Ok(()) => {
            if let Some(dir) = path.parent() {
                // Durable removal: the folder's entry is gone after a crash too.
                fs::File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|source| RecordError::Write {
                        path: dir.to_owned(),
                        source,
                    })?;
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(RecordError::Write {
            path: path.to_owned(),
            source,
        }),
    }
}

fn read_json<T: DeserializeOwned>(path: &Path, what: &'static str) -> Result<Option<T>, RecordError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(RecordError::Read {
                path: path.to_owned(),
                source,
            })
        }
    };
    let de = &mut serde_json::Deserializer::from_slice(&bytes);
    serde_path_to_error::deserialize(de)
        .map(Some)
        .map_err(|e| RecordError::Invalid {
            path: path.to_owned(),
            what,
            why: format!("field {}: {}", e.path(), e.inner()),
        })
}

fn check_format(path: &Path, what: &'static str, found: u32) -> Result<(), RecordError> {
    if found == FORMAT {
        return Ok(());
    }
    Err(RecordError::Invalid {
        path: path.to_owned(),
        what,
        why: format!("field format is {found}; allowed: {FORMAT}"),
    })
}

/// A root-only record: its folder 0700 when missing, the file 0600.
fn write_record<T: Serialize>(path: &Path, value: &T) -> Result<(), RecordError> {
    if let Some(dir) = path.parent() {
        ensure_dir(dir, RECORD_DIR_MODE).map_err(|source| RecordError::Write {
            path: dir.to_owned(),
            source,
        })?;
    }
    write_json(path, value, RECORD_MODE)
}

/// Atomic: tmp file with `mode`, fsync, rename, fsync the folder.
fn write_json<T: Serialize>(path: &Path, value: &T, mode: u32) -> Result<(), RecordError> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|e| RecordError::Write {
        path: path.to_owned(),
        source: io::Error::other(e),
    })?;
    bytes.push(b'\n');
    fsutil::write_atomic(path, &bytes, mode).map_err(|source| RecordError::Write {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn trial() -> Trial {
        Trial {
            format: FORMAT,
            from_version: "0.1.0".into(),
            to_version: "0.2.0".into(),
            to_slot: Slot::B,
            healthy_before: vec!["wallet".into()],
            started_at: "2026-12-02T10:00:00Z".into(),
            failures: vec![],
        }
    }

    #[test]
    fn records_round_trip_with_their_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("os").join("trial.json");
        assert_eq!(Trial::read(&path).unwrap(), None);
        let mut t = trial();
        t.failures.push(TrialFailure {
            try_n: 1,
            reason: "app wallet is not healthy".into(),
        });
        t.write(&path).unwrap();
        assert_eq!(Trial::read(&path).unwrap(), Some(t));
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(
            fs::metadata(path.parent().unwrap()).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"format\": 1"), "{text}");
        assert!(text.contains("\"try\": 1"), "{text}");

        let boot = BootStatus {
            format: FORMAT,
            booted_slot: Slot::A,
            booted_version: Some("0.1.0".into()),
            a: SlotStatus {
                version: Some("0.1.0".into()),
                state: SlotState::Good,
                tries: 0,
            },
            b: SlotStatus {
                version: None,
                state: SlotState::Empty,
                tries: 0,
            },
            committed: true,
            trial: false,
            degraded: false,
            trial_deadline_secs: None,
            last_rollback: None,
        };
        let path = tmp.path().join("run").join("os").join("boot.json");
        boot.write(&path).unwrap();
        assert_eq!(BootStatus::read(&path).unwrap(), Some(boot));
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o644);
        assert_eq!(
            fs::metadata(path.parent().unwrap()).unwrap().permissions().mode() & 0o777,
            0o755
        );
    }

    #[test]
    fn another_format_or_an_unknown_field_is_refused_naming_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("rollback.json");
        fs::write(
            &path,
            r#"{"format":2,"from":"0.2.0","to":"0.1.0","reason":"x","at":"t","acknowledged":false}"#,
        )
        .unwrap();
        let e = Rollback::read(&path).unwrap_err().to_string();
        assert!(
            e.contains("rollback.json") && e.contains("format is 2") && e.contains("allowed: 1"),
            "{e}"
        );
        fs::write(
            &path,
            r#"{"format":1,"from":"a","to":"b","reason":"x","at":"t","extra":1}"#,
        )
        .unwrap();
        let e = Rollback::read(&path).unwrap_err().to_string();
        assert!(e.contains("extra"), "{e}");
        fs::write(
            &path,
            r#"{"format":1,"from":"0.2.0","to":"0.1.0","reason":"x","at":"t"}"#,
        )
        .unwrap();
        let r = Rollback::read(&path).unwrap().unwrap();
        assert!(!r.acknowledged);
        assert_eq!(r.message(), "rolled back from 0.2.0 to 0.1.0: x");
    }

    #[test]
    fn the_rollback_reason_is_the_failures_or_no_report() {
        let mut t = trial();
        assert_eq!(
            t.rollback_reason(),
            "it did not come up in 3 tries (no report: kernel or early boot failure)"
        );
        t.failures = vec![
            TrialFailure {
                try_n: 1,
                reason: "a".into(),
            },
            TrialFailure {
                try_n: 2,
                reason: "b".into(),
            },
        ];
        assert_eq!(t.rollback_reason(), "try 1: a; try 2: b");
    }

    #[test]
    fn slot_status_reads_as_the_docs_say() {
        let s = |state, tries| SlotStatus {
            version: None,
            state,
            tries,
        };
        assert_eq!(s(SlotState::Trying, 2).to_string(), "trying 2 of 3");
        assert_eq!(s(SlotState::Good, 0).to_string(), "good");
        assert_eq!(s(SlotState::Empty, 0).to_string(), "empty");
        assert_eq!(Slot::A.other(), Slot::B);
    }

    #[test]
    fn removing_a_missing_record_is_fine() {
        let tmp = tempfile::tempdir().unwrap();
        remove(&tmp.path().join("trial.json")).unwrap();
    }
}
