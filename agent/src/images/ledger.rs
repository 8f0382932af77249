//! `<data>/state/images.json`: which lock entries the store holds and when
//! the agent imported them. Informational only: whether to import is
//! always decided by asking the engine, so a lost or stale ledger costs a
//! timestamp, never an import or a skipped one.

use std::fs::File;
use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::dataroot::DataRoot;
use crate::fsutil;
use crate::manifest::Digest;

use super::ImageLock;

const LEDGER_VERSION: u32 = 1;
/// Far more than any real ledger; a bigger file is not one.
const MAX_LEDGER_BYTES: u64 = 16 << 20;
/// Not a secret: what was imported when.
const LEDGER_MODE: u32 = 0o644;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ledger {
    pub version: u32,
    /// One record per lock entry whose image the store holds, in lock order.
    pub images: Vec<LedgerRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerRecord {
    pub app: String,
    pub reference: String,
    pub config_digest: Digest,
    pub archive_sha256: String,
    /// RFC 3339, when this agent imported the archive; `None` when the
    /// image was found in the store without a record of its import (it was
    /// there already, or the ledger was rebuilt).
    pub imported_at: Option<String>,
}

/// What reading the ledger gave.
#[derive(Debug)]
pub(crate) struct Loaded {
    pub ledger: Ledger,
    /// Said once, for the report: a corrupt file moved aside, an unreadable one.
    pub note: Option<String>,
    /// Whether the file must be written even if nothing changed (it was
    /// corrupt and moved aside).
    pub rewrite: bool,
}

/// Reads the ledger. A missing file is an empty ledger; a corrupt one is
/// moved aside (`images.json.corrupt-<unix seconds>`) with a warning, and
/// the caller rebuilds it from the engine.
pub(crate) fn load(data_root: &DataRoot) -> Loaded {
    let path = data_root.images_ledger();
    let empty = |note: Option<String>, rewrite: bool| Loaded {
        ledger: Ledger {
            version: LEDGER_VERSION,
            images: Vec::new(),
        },
        note,
        rewrite,
    };
    let bytes = match read_limited(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return empty(None, false),
        Err(e) if e.kind() == io::ErrorKind::InvalidData => return set_aside(&path, &e.to_string()),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the image ledger; rebuilding it");
            return empty(
                Some(format!("cannot read the ledger {}: {e}; rebuilt", path.display())),
                true,
            );
        }
    };
    match parse(&bytes) {
        Ok(ledger) => Loaded {
            ledger,
            note: None,
            rewrite: false,
        },
        Err(problem) => set_aside(&path, &problem),
    }
}

/// Moves the corrupt file aside so that the evidence survives the rebuild.
fn set_aside(path: &Path, problem: &str) -> Loaded {
    let note = match fsutil::move_aside(path) {
        Ok(aside) => {
            tracing::warn!(path = %path.display(), moved_to = %aside.display(), problem, "corrupt image ledger moved aside; rebuilding it from the engine");
            format!(
                "the ledger {} was corrupt ({problem}); moved aside to {} and rebuilt from the engine",
                path.display(),
                aside.display()
            )
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), problem, error = %e, "corrupt image ledger could not be moved aside; replacing it");
            format!(
                "the ledger {} was corrupt ({problem}) and could not be moved aside ({e}); rebuilt from the engine",
                path.display()
            )
        }
    };
    Loaded {
        ledger: Ledger {
            version: LEDGER_VERSION,
            images: Vec::new(),
        },
        note: Some(note),
        rewrite: true,
    }
}

fn read_limited(path: &Path) -> io::Result<Vec<u8>> {
    let file = File::open(path)?;
    let mut bytes = Vec::new();
    io::Read::read_to_end(&mut io::Read::take(file, MAX_LEDGER_BYTES + 1), &mut bytes)?;
    if bytes.len() as u64 > MAX_LEDGER_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {MAX_LEDGER_BYTES} bytes"),
        ));
    }
    Ok(bytes)
}

fn parse(bytes: &[u8]) -> Result<Ledger, String> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let ledger: Ledger = serde_path_to_error::deserialize(de).map_err(|e| {
        let at = e.path().to_string();
        if at == "." {
            e.into_inner().to_string()
        } else {
            format!("{at}: {}", e.into_inner())
        }
    })?;
    if ledger.version != LEDGER_VERSION {
        return Err(format!("version {} is not {LEDGER_VERSION}", ledger.version));
    }
    Ok(ledger)
}

/// Records that the store holds `record`'s image: replaces the record of
/// the same app and config digest (keeping its import time when the new
/// one has none), keeps the records in `lock`'s order, and writes the
/// ledger when that changed it. The caller holds the ledger's write lock.
pub(crate) fn record(data_root: &DataRoot, lock: &ImageLock, mut record: LedgerRecord) -> io::Result<()> {
    let loaded = load(data_root);
    let mut ledger = loaded.ledger.clone();
    let same = |r: &LedgerRecord| r.app == record.app && r.config_digest == record.config_digest;
    if let Some(old) = ledger.images.iter().find(|r| same(r)) {
        if record.imported_at.is_none() {
            record.imported_at.clone_from(&old.imported_at);
        }
    }
    ledger.images.retain(|r| !same(r));
    ledger.images.push(record);
    let position = |r: &LedgerRecord| {
        lock.images
            .iter()
            .position(|e| e.app == r.app && e.config_digest == r.config_digest)
            .unwrap_or(usize::MAX)
    };
    ledger.images.sort_by_key(position);
    if loaded.rewrite || ledger != loaded.ledger {
        save(data_root, &ledger)?;
    }
    Ok(())
}

/// Writes the ledger atomically (temporary file, fsync, rename).
pub(crate) fn save(data_root: &DataRoot, ledger: &Ledger) -> io::Result<()> {
    let mut bytes = serde_json::to_vec_pretty(ledger).map_err(io::Error::other)?;
    bytes.push(b'\n');
    fsutil::write_atomic(&data_root.images_ledger(), &bytes, LEDGER_MODE)
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    fn record(app: &str) -> LedgerRecord {
        LedgerRecord {
            app: app.to_owned(),
            reference: "localhost/archipelago/x:1".to_owned(),
            config_digest: Digest::of(app.as_bytes()),
            archive_sha256: "0".repeat(64),
            imported_at: Some("2024-01-01T00:00:00Z".to_owned()),
        }
    }

    #[test]
    fn a_saved_ledger_reads_back_the_same_and_leaves_no_temporary_file() {
        let data = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger {
            version: LEDGER_VERSION,
            images: vec![record("a"), record("b")],
        };
        save(&DataRoot::new(data.path()), &ledger).expect("save");
        let loaded = load(&DataRoot::new(data.path()));
        assert_eq!(loaded.ledger, ledger);
        assert!(loaded.note.is_none() && !loaded.rewrite);
        let names: Vec<_> = fs::read_dir(DataRoot::new(data.path()).state_dir())
            .expect("state dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec!["images.json"]);
    }

    #[test]
    fn a_missing_ledger_is_empty_and_creates_nothing() {
        let data = tempfile::tempdir().expect("tempdir");
        let loaded = load(&DataRoot::new(data.path()));
        assert!(loaded.ledger.images.is_empty() && loaded.note.is_none() && !loaded.rewrite);
        assert!(!DataRoot::new(data.path()).state_dir().exists());
    }

    #[test]
    fn a_corrupt_ledger_is_moved_aside_with_a_note_and_marked_for_rewrite() {
        for garbage in [&b"{ not json"[..], br#"{"version": 9, "images": []}"#] {
            let data = tempfile::tempdir().expect("tempdir");
            let path = DataRoot::new(data.path()).images_ledger();
            fs::create_dir_all(path.parent().expect("parent")).expect("state dir");
            fs::write(&path, garbage).expect("write");
            let loaded = load(&DataRoot::new(data.path()));
            assert!(loaded.ledger.images.is_empty() && loaded.rewrite);
            let note = loaded.note.expect("a note");
            assert!(note.contains("was corrupt") && note.contains(".corrupt-"), "{note}");
            assert!(!path.exists(), "the corrupt file was moved, not left in place");
            let aside: Vec<_> = fs::read_dir(path.parent().expect("parent"))
                .expect("read")
                .map(|e| e.expect("entry").path())
                .collect();
            assert_eq!(aside.len(), 1, "{aside:?}");
            assert_eq!(fs::read(&aside[0]).expect("moved file"), garbage, "kept as it was");
        }
    }
}
