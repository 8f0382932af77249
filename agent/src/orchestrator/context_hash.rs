//! A build context's hash, computed once per change of the context, not
//! on every [`Orchestrator::spec`](super::Orchestrator::spec).
//!
//! Hashing reads every byte of the context; the spec is asked for on every
//! status, list, log and action. So each app keeps its last hash beside a
//! *stamp* of its context: a walk that only stats, giving for every entry
//! (in a fixed order, not following symlinks) its path, type and mode, size,
//! inode, and modification and change times to the nanosecond, plus the
//! Containerfile's name. The hash is computed again only when the stamp
//! differs: a file added, removed, renamed, replaced, rewritten, truncated
//! or chmodded is a change. A write that keeps the size and puts the
//! modification time back (`touch -d`) still moves the change time, which
//! only the kernel sets. The stamp is taken before the hash, so a change
//! made while hashing is seen on the next call.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use anyhow::Context as _;

/// One entry of a context as its stamp sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct EntryStamp {
    rel: PathBuf,
    mode: u32,
    size: u64,
    ino: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

/// What a context looked like when it was last hashed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    containerfile: PathBuf,
    entries: Vec<EntryStamp>,
}

/// The last hash of each app's build context, by app id.
#[derive(Debug, Default)]
pub struct ContextHashes {
    cache: Mutex<HashMap<String, (Stamp, String)>>,
    /// How many times a context was hashed (read by tests).
    computed: AtomicU64,
}

impl ContextHashes {
    /// The hash of `app`'s context (`context`, built with `containerfile`):
    /// the cached one while the context's stamp is unchanged, else
    /// `compute()`'s. Blocking: it stats the whole context.
    pub fn get(
        &self,
        app: &str,
        context: &Path,
        containerfile: &Path,
        compute: impl FnOnce() -> anyhow::Result<String>,
    ) -> anyhow::Result<String> {
        let stamp = Stamp {
            containerfile: containerfile.to_path_buf(),
            entries: stamp_tree(context)?,
        };
        if let Some((seen, hash)) = self.lock().get(app) {
            if *seen == stamp {
                return Ok(hash.clone());
            }
        }
        let hash = compute()?;
        self.computed.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(app.to_owned(), (stamp, hash.clone()));
        Ok(hash)
    }

    /// How many contexts were hashed so far.
    pub fn computed(&self) -> u64 {
        self.computed.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Stamp, String)>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Every entry below `root`, each folder's in name order, stat'ed without
/// following symlinks.
fn stamp_tree(root: &Path) -> anyhow::Result<Vec<EntryStamp>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let mut entries: Vec<_> = fs::read_dir(&dir)
            .with_context(|| format!("cannot read build context {}", dir.display()))?
            .collect::<Result<_, _>>()
            .with_context(|| format!("cannot list build context {}", dir.display()))?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = entry.path();
            let md = fs::symlink_metadata(&path).with_context(|| format!("cannot stat {}", path.display()))?;
            if md.is_dir() {
                stack.push(path.clone());
            }
            out.push(EntryStamp {
                rel: path.strip_prefix(root).unwrap_or(&path).to_path_buf(),
                mode: md.mode(),
                size: md.size(),
                ino: md.ino(),
                mtime: (md.mtime(), md.mtime_nsec()),
                ctime: (md.ctime(), md.ctime_nsec()),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash_of(dir: &Path) -> anyhow::Result<String> {
        let mut all = Vec::new();
        for e in stamp_tree(dir)? {
            let p = dir.join(&e.rel);
            if p.is_file() {
                all.extend(fs::read(p)?);
            }
        }
        Ok(format!("{:x}", <sha2::Sha256 as sha2::Digest>::digest(&all)))
    }

    #[test]
    fn a_context_is_hashed_again_only_after_it_changed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ctx = dir.path();
        fs::create_dir_all(ctx.join("site")).expect("folder");
        fs::write(ctx.join("Containerfile"), "FROM scratch\n").expect("write");
        fs::write(ctx.join("site/index.html"), "one").expect("write");
        let cf = Path::new("Containerfile");
        let hashes = ContextHashes::default();
        let first = hashes.get("ui", ctx, cf, || hash_of(ctx)).expect("hash");
        for _ in 0..3 {
            let again = hashes
                .get("ui", ctx, cf, || panic!("nothing changed: no hashing"))
                .expect("cached");
            assert_eq!(again, first);
        }
        assert_eq!(hashes.computed(), 1);

        // Same size, new bytes: a change.
        fs::write(ctx.join("site/index.html"), "two").expect("rewrite");
        let second = hashes.get("ui", ctx, cf, || hash_of(ctx)).expect("hash");
        assert_ne!(second, first);
        assert_eq!(hashes.computed(), 2);
        assert_eq!(
            hashes.get("ui", ctx, cf, || panic!("unchanged")).expect("cached"),
            second
        );

        // A new file deep down, and another Containerfile name: changes.
        fs::write(ctx.join("site/new.css"), "").expect("add");
        hashes.get("ui", ctx, cf, || hash_of(ctx)).expect("hash");
        assert_eq!(hashes.computed(), 3);
        hashes
            .get("ui", ctx, Path::new("Other"), || hash_of(ctx))
            .expect("hash");
        assert_eq!(hashes.computed(), 4);
        // Another app has its own entry.
        hashes
            .get("ui2", ctx, Path::new("Other"), || hash_of(ctx))
            .expect("hash");
        assert_eq!(hashes.computed(), 5);
    }

    #[test]
    fn a_context_that_cannot_be_read_is_an_error_naming_it() {
        let hashes = ContextHashes::default();
        let missing = Path::new("/nonexistent/context");
        let e = hashes
            .get("ui", missing, Path::new("Containerfile"), || Ok(String::new()))
            .expect_err("missing");
        assert!(format!("{e:#}").contains("/nonexistent/context"), "{e:#}");
    }
}
