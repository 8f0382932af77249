//! The pre-pulled image folder (docs/images.md): importing its archives
//! into the engine's store, once, so that a node starts its apps with no
//! network.
//!
//! Presence is always asked of the engine, by config digest: an entry
//! whose image the store holds is not touched (its archive is not even
//! opened), whatever file names, times or the ledger say. Every other
//! entry is checked (size, sha256), loaded, and confirmed in the store by
//! its config digest. An entry that fails is reported and skipped; nothing
//! here stops a boot.

pub mod commands;
mod ledger;
mod lock;
mod retry;

use std::fs::File;
use std::io::{self, Read as _};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::dataroot::DataRoot;
use crate::engine::Engine;
use crate::manifest::{Digest, PinnedImage};

pub use ledger::{Ledger, LedgerRecord};
pub use lock::{load_lock, parse_lock, ImageLock, LockEntry, LockError, LOCK_FILE, LOCK_VERSION};
pub use retry::ImportRetry;

/// One writer of the ledger at a time within the agent: a retry and an
/// install may import at once.
static LEDGER_WRITE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Where a node's image folder is, unless `--images` or `ARCHY_IMAGES`
/// says otherwise.
pub const DEFAULT_IMAGES_DIR: &str = "/usr/share/archipelago/images";

/// Bytes read at a time while hashing an archive.
const HASH_CHUNK: usize = 1 << 20;

/// The config digest of the image the lock ships for `reference`: the
/// entry whose `reference` names the same image (registry, repository, tag
/// and digest). Whether the store holds it is for the caller to ask.
pub fn local_image_for<'a>(lock: &'a ImageLock, reference: &PinnedImage) -> Option<&'a Digest> {
    entry_for(lock, reference).map(|e| &e.config_digest)
}

/// The lock entry whose `reference` names the same image as `reference`.
pub fn entry_for<'a>(lock: &'a ImageLock, reference: &PinnedImage) -> Option<&'a LockEntry> {
    lock.images
        .iter()
        .find(|e| lock::same_reference(&e.reference, reference))
}

/// What became of one lock entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// The store already held the config digest; the archive was not read.
    AlreadyPresent,
    /// Checked, loaded and confirmed in the store, in `ms` milliseconds.
    Imported { ms: u64 },
    /// Not imported, and why. Its app's image will be pulled instead.
    Skipped { reason: String },
}

impl Outcome {
    /// The outcome's name, as the table and the JSON say it.
    pub fn name(&self) -> &'static str {
        match self {
            Outcome::AlreadyPresent => "already_present",
            Outcome::Imported { .. } => "imported",
            Outcome::Skipped { .. } => "skipped",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EntryOutcome {
    pub app: String,
    pub reference: String,
    pub config_digest: Digest,
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// What one import run did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ImportReport {
    /// The image folder read.
    pub dir: PathBuf,
    /// One per lock entry, in lock order.
    pub entries: Vec<EntryOutcome>,
    /// What is worth knowing beyond the entries: no folder or no lock (a
    /// base OS built without images), a corrupt ledger moved aside.
    pub notes: Vec<String>,
    /// The lock file exists but cannot be used: nothing was imported.
    pub error: Option<String>,
}

impl ImportReport {
    pub fn imported(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| matches!(e.outcome, Outcome::Imported { .. }))
            .count()
    }

    pub fn already_present(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| e.outcome == Outcome::AlreadyPresent)
            .count()
    }

    pub fn skipped(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| matches!(e.outcome, Outcome::Skipped { .. }))
            .count()
    }

    /// No unusable lock and no skipped entry.
    pub fn is_clean(&self) -> bool {
        self.error.is_none() && self.skipped() == 0
    }
}

/// Imports every entry of `dir`'s lock that the engine's store lacks, and
/// records what the store holds in `<data_root>/state/images.json`. Never
/// fails as a whole: a missing folder or lock is a note, an unusable lock
/// is `error`, and each entry has its own outcome.
pub async fn import_all(engine: &Engine, dir: &Path, data_root: &DataRoot) -> ImportReport {
    import_all_reporting(engine, dir, data_root, |_, _| {}).await
}

/// [`import_all`], calling `progress(n, m)` as entry `n` (from 1) of the
/// lock's `m` starts: the agent says so in `status` and `list`.
pub async fn import_all_reporting(
    engine: &Engine,
    dir: &Path,
    data_root: &DataRoot,
    progress: impl Fn(usize, usize),
) -> ImportReport {
    let mut report = ImportReport {
        dir: dir.to_path_buf(),
        ..ImportReport::default()
    };
    let lock = match load_lock(dir) {
        Ok(lock) => lock,
        Err(LockError::Missing { path }) => {
            let note = if dir.is_dir() {
                format!("no {} in {}", LOCK_FILE, dir.display())
            } else {
                format!("no image folder at {}", dir.display())
            };
            // A base OS built with --no-images: its apps pull at first use.
            tracing::info!(lock = %path.display(), "no image lock; nothing to import");
            report
                .notes
                .push(format!("{note}: nothing to import, apps' images will be pulled"));
            return report;
        }
        Err(e) => {
            let message = crate::error_chain(&e);
            tracing::error!(error = %message, "image lock unusable; nothing imported");
            report.error = Some(message);
            return report;
        }
    };
    let loaded = ledger::load(data_root);
    report.notes.extend(loaded.note);
    let old = loaded.ledger;
    let mut ledger = Ledger {
        version: old.version,
        images: Vec::new(),
    };
    for (n, entry) in lock.images.iter().enumerate() {
        progress(n + 1, lock.images.len());
        let (outcome, in_store) = import_one(engine, dir, entry).await;
        match &outcome {
            Outcome::AlreadyPresent => {
                tracing::debug!(app = %entry.app, config_digest = %entry.config_digest, "image already in the store")
            }
            Outcome::Imported { ms } => {
                tracing::info!(app = %entry.app, config_digest = %entry.config_digest, ms, "image imported")
            }
            Outcome::Skipped { reason } => tracing::warn!(app = %entry.app, reason, "image archive skipped"),
        }
        let previous = old
            .images
            .iter()
            .find(|r| r.config_digest == entry.config_digest && r.app == entry.app);
        let record = |imported_at: Option<String>| LedgerRecord {
            app: entry.app.clone(),
            reference: entry.reference.clone(),
            config_digest: entry.config_digest.clone(),
            archive_sha256: entry.archive_sha256.clone(),
            imported_at,
        };
        match (&outcome, in_store) {
            (Outcome::Imported { .. }, _) => ledger.images.push(record(Some(now_rfc3339()))),
            (_, Some(true)) => ledger.images.push(record(previous.and_then(|p| p.imported_at.clone()))),
            // The store could not be asked: keep what was known.
            (_, None) => ledger.images.extend(previous.cloned()),
            (_, Some(false)) => {}
        }
        report.entries.push(EntryOutcome {
            app: entry.app.clone(),
            reference: entry.reference.clone(),
            config_digest: entry.config_digest.clone(),
            outcome,
        });
    }
    if loaded.rewrite || ledger != old {
        let _writing = LEDGER_WRITE.lock().await;
        if let Err(e) = ledger::save(data_root, &ledger) {
            let path = data_root.images_ledger();
            tracing::warn!(path = %path.display(), error = %e, "cannot write the image ledger");
            report
                .notes
                .push(format!("cannot write the ledger {}: {e}", path.display()));
        }
    }
    report
}

/// Imports one entry of `lock` (unless the store holds it already) and,
/// when the store then holds it, records it in the ledger. For the boot
/// import's retries and for an install that finds its image in the folder.
pub async fn import_entry(
    engine: &Engine,
    dir: &Path,
    data_root: &DataRoot,
    lock: &ImageLock,
    entry: &LockEntry,
) -> EntryOutcome {
    let (outcome, in_store) = import_one(engine, dir, entry).await;
    if in_store == Some(true) {
        let imported_at = matches!(outcome, Outcome::Imported { .. }).then(now_rfc3339);
        let record = LedgerRecord {
            app: entry.app.clone(),
            reference: entry.reference.clone(),
            config_digest: entry.config_digest.clone(),
            archive_sha256: entry.archive_sha256.clone(),
            imported_at,
        };
        let _writing = LEDGER_WRITE.lock().await;
        if let Err(e) = ledger::record(data_root, lock, record) {
            let path = data_root.images_ledger();
            tracing::warn!(path = %path.display(), error = %e, "cannot write the image ledger");
        }
    }
    EntryOutcome {
        app: entry.app.clone(),
        reference: entry.reference.clone(),
        config_digest: entry.config_digest.clone(),
        outcome,
    }
}

/// One entry: its outcome, and whether the store now holds its image
/// (`None`: the engine could not be asked).
async fn import_one(engine: &Engine, dir: &Path, entry: &LockEntry) -> (Outcome, Option<bool>) {
    let skipped = |reason: String| Outcome::Skipped { reason };
    let digest = entry.config_digest.as_str();
    match engine.has_image(digest).await {
        Ok(true) => return (Outcome::AlreadyPresent, Some(true)),
        Ok(false) => {}
        Err(e) => {
            let reason = format!("cannot ask the engine's store for {digest}: {}", crate::error_chain(&e));
            return (skipped(reason), None);
        }
    }
    let started = Instant::now();
    let path = dir.join(&entry.archive);
    if let Err(reason) = verify_archive(&path, entry.size, &entry.archive_sha256).await {
        return (skipped(reason), Some(false));
    }
    let names = match engine.load_image(&path).await {
        Ok(names) => names,
        Err(e) => return (skipped(crate::error_chain(&e)), Some(false)),
    };
    match engine.has_image(digest).await {
        Ok(true) => {
            let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            (Outcome::Imported { ms }, Some(true))
        }
        // What was loaded stays: the agent runs images by config digest
        // only, so a stray one is never used, and removing it by name could
        // take an image another entry shipped under the same tag.
        Ok(false) => (
            skipped(format!(
                "loaded, but the store has no image {digest}: the archive {} holds [{}]",
                entry.archive,
                names.join(", ")
            )),
            Some(false),
        ),
        Err(e) => (
            skipped(format!(
                "loaded, but cannot ask the engine's store for {digest}: {}",
                crate::error_chain(&e)
            )),
            None,
        ),
    }
}

/// Checks the archive's size, then its sha256, reading it once in chunks.
async fn verify_archive(path: &Path, size: u64, want_hex: &str) -> Result<(), String> {
    let owned = path.to_path_buf();
    let hashed = tokio::task::spawn_blocking(move || -> io::Result<(u64, String)> {
        let mut file = File::open(&owned)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; HASH_CHUNK];
        let mut total = 0u64;
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            total += n as u64;
            // Past the lock's size the hash cannot match: stop reading.
            if total > size {
                break;
            }
        }
        Ok((total, format!("{:x}", hasher.finalize())))
    })
    .await
    .map_err(|e| format!("hashing {} failed: {e}", path.display()))?;
    let (total, got_hex) = hashed.map_err(|e| format!("cannot read the archive {}: {e}", path.display()))?;
    if total != size {
        let got = if total > size {
            "more".to_owned()
        } else {
            total.to_string()
        };
        return Err(format!(
            "archive {} has {got} bytes, the lock says {size}",
            path.display()
        ));
    }
    if got_hex != want_hex {
        return Err(format!(
            "archive sha256 {got_hex} of {} does not match the lock's {want_hex}",
            path.display()
        ));
    }
    Ok(())
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "c991fd3d8b19614fa7309525e8ccb6c0a87464f8bf6bd4dff1479b493f7308f2";

    fn entry(app: &str, reference: &str) -> LockEntry {
        LockEntry {
            app: app.to_owned(),
            reference: reference.to_owned(),
            manifest_digest: Digest::of(app.as_bytes()),
            config_digest: Digest::of(format!("config of {app}").as_bytes()),
            archive: format!("{app}.tar"),
            archive_sha256: "0".repeat(64),
            size: 1,
        }
    }

    #[test]
    fn local_image_for_gives_the_config_digest_of_the_entry_naming_the_same_reference() {
        let lock = ImageLock {
            version: LOCK_VERSION,
            images: vec![
                entry("ui", "localhost/archipelago/ui:0123456789abcdef"),
                entry("electrs", &format!("docker.io/getumbrel/electrs:v0.10.10@sha256:{HEX}")),
            ],
        };
        let pinned: PinnedImage = format!("getumbrel/electrs:v0.10.10@sha256:{HEX}")
            .parse()
            .expect("pinned");
        assert_eq!(local_image_for(&lock, &pinned), Some(&lock.images[1].config_digest));
        let other_tag: PinnedImage = format!("getumbrel/electrs:v0.10.11@sha256:{HEX}")
            .parse()
            .expect("pinned");
        assert_eq!(local_image_for(&lock, &other_tag), None);
        let mirror = pinned.with_registry("mirror.example:5000");
        assert_eq!(
            local_image_for(&lock, &mirror),
            None,
            "another registry is another reference"
        );
    }

    #[tokio::test]
    async fn an_archive_is_checked_for_size_then_sha256() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.tar");
        std::fs::write(&path, b"archive bytes").expect("write");
        let good = format!("{:x}", Sha256::digest(b"archive bytes"));
        assert_eq!(verify_archive(&path, 13, &good).await, Ok(()));
        let short = verify_archive(&path, 20, &good).await.expect_err("size");
        assert!(short.ends_with("has 13 bytes, the lock says 20"), "{short}");
        let long = verify_archive(&path, 5, &good).await.expect_err("size");
        assert!(long.ends_with("has more bytes, the lock says 5"), "{long}");
        let wrong = verify_archive(&path, 13, &"0".repeat(64)).await.expect_err("sha256");
        assert!(wrong.starts_with(&format!("archive sha256 {good} of ")), "{wrong}");
        let missing = verify_archive(&dir.path().join("none.tar"), 13, &good)
            .await
            .expect_err("missing");
        assert!(missing.starts_with("cannot read the archive "), "{missing}");
    }
}
