//! The content-addressed download cache: `<cache>/blobs/sha256/<hex>`.
//!
//! Manifests, configs and layers alike are kept by their digest. A file only
//! ever appears under its final name after its bytes were checked against
//! that name (written to a temporary file, verified, renamed), so a file in
//! the cache is trusted as long as its name and size agree; a layer is
//! hashed again anyway while it is copied into an archive.

use std::fs::{self, File};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use archy_agent::manifest::Digest;
use sha2::{Digest as _, Sha256};

#[derive(Debug, Clone)]
pub struct Cache {
    blobs: PathBuf,
}

/// What arrived does not match the digest it was asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub actual: Digest,
    pub size: u64,
}

impl Cache {
    /// Opens (creating) the cache below `root`.
    pub fn open(root: &Path) -> anyhow::Result<Cache> {
        let blobs = root.join("blobs").join("sha256");
        fs::create_dir_all(&blobs).with_context(|| format!("creating the blob cache {}", blobs.display()))?;
        Ok(Cache { blobs })
    }

    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.blobs.join(digest.hex())
    }

    /// The cached blob's size, when it is there.
    pub fn size(&self, digest: &Digest) -> Option<u64> {
        fs::metadata(self.path(digest))
            .ok()
            .filter(fs::Metadata::is_file)
            .map(|m| m.len())
    }

    /// A small cached object (manifest, config), read and checked. A file
    /// whose bytes do not match its name is removed and counts as missing.
    pub fn read_verified(&self, digest: &Digest) -> anyhow::Result<Option<Vec<u8>>> {
        let path = self.path(digest);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading the cached blob {}", path.display())),
        };
        if Digest::of(&bytes) == *digest {
            return Ok(Some(bytes));
        }
        eprintln!(
            "images: the cached blob {} does not match its name; removing it and fetching it again",
            path.display()
        );
        fs::remove_file(&path).with_context(|| format!("removing the corrupt cached blob {}", path.display()))?;
        Ok(None)
    }

    /// Removes a cached blob found corrupt.
    pub fn evict(&self, digest: &Digest) -> anyhow::Result<()> {
        let path = self.path(digest);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing the corrupt cached blob {}", path.display())),
        }
    }

    /// Starts writing the blob `digest`; nothing is visible under its name
    /// until [`BlobWriter::finish`] found the bytes right.
    pub fn writer(&self, digest: &Digest) -> anyhow::Result<BlobWriter> {
        let target = self.path(digest);
        let tmp = self
            .blobs
            .join(format!(".{}.{}.partial", digest.hex(), std::process::id()));
        let file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        Ok(BlobWriter {
            file: Some(file),
            tmp,
            target,
            expected: digest.clone(),
            hasher: Sha256::new(),
            written: 0,
        })
    }

    /// Copies the file at `path` in as `digest` when its bytes match it.
    pub fn put_file(&self, digest: &Digest, path: &Path) -> anyhow::Result<Result<(), Mismatch>> {
        let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut writer = self.writer(digest)?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = io::Read::read(&mut file, &mut buf).with_context(|| format!("reading {}", path.display()))?;
            if n == 0 {
                break;
            }
            writer.write(&buf[..n])?;
        }
        writer.finish()
    }

    /// Stores `bytes` as `digest` when they match it.
    pub fn put(&self, digest: &Digest, bytes: &[u8]) -> anyhow::Result<Result<(), Mismatch>> {
        let mut writer = self.writer(digest)?;
        writer.write(bytes)?;
        writer.finish()
    }
}

/// A blob being written into the cache, hashed as it goes. Dropped
/// unfinished, it removes its temporary file.
#[derive(Debug)]
pub struct BlobWriter {
    file: Option<File>,
    tmp: PathBuf,
    target: PathBuf,
    expected: Digest,
    hasher: Sha256,
    written: u64,
}

impl BlobWriter {
    pub fn write(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        let file = self
            .file
            .as_mut()
            .with_context(|| format!("{} was already finished", self.tmp.display()))?;
        file.write_all(bytes)
            .with_context(|| format!("writing {}", self.tmp.display()))?;
        self.hasher.update(bytes);
        self.written += bytes.len() as u64;
        Ok(())
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    /// The digest of what was written so far.
    pub fn digest_so_far(&self) -> Digest {
        hex_digest(self.hasher.clone().finalize().as_slice())
    }

    /// Checks the bytes against the expected digest: on a match the blob
    /// takes its name in the cache; otherwise the bytes are thrown away and
    /// the digest they do have is returned.
    pub fn finish(mut self) -> anyhow::Result<Result<(), Mismatch>> {
        let actual = self.digest_so_far();
        let file = self
            .file
            .take()
            .with_context(|| format!("{} was already finished", self.tmp.display()))?;
        if actual != self.expected {
            drop(file);
            let _ = fs::remove_file(&self.tmp);
            return Ok(Err(Mismatch {
                actual,
                size: self.written,
            }));
        }
        file.sync_all()
            .with_context(|| format!("flushing {}", self.tmp.display()))?;
        drop(file);
        fs::rename(&self.tmp, &self.target)
            .with_context(|| format!("renaming {} to {}", self.tmp.display(), self.target.display()))?;
        Ok(Ok(()))
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// `sha256:<hex>` of a finished sha256.
pub fn hex_digest(sum: &[u8]) -> Digest {
    let hex: String = sum.iter().map(|b| format!("{b:02x}")).collect();
    // 32 bytes always give 64 lowercase hex characters.
    format!("sha256:{hex}").parse().unwrap_or_else(|_| Digest::of(b""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blob_appears_only_when_its_bytes_match_its_digest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::open(dir.path()).expect("cache");
        let good = Digest::of(b"hello");
        assert_eq!(cache.put(&good, b"hello").expect("io"), Ok(()));
        assert_eq!(cache.size(&good), Some(5));
        assert_eq!(cache.read_verified(&good).expect("io").as_deref(), Some(&b"hello"[..]));

        let wanted = Digest::of(b"expected");
        let result = cache.put(&wanted, b"tampered").expect("io");
        assert_eq!(
            result,
            Err(Mismatch {
                actual: Digest::of(b"tampered"),
                size: 8
            })
        );
        assert_eq!(cache.size(&wanted), None);
        // Nothing but the good blob is left: no temporary files.
        let names: Vec<_> = fs::read_dir(dir.path().join("blobs/sha256"))
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, [good.hex()]);
    }

    #[test]
    fn a_corrupt_cached_object_is_removed_and_counts_as_missing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::open(dir.path()).expect("cache");
        let digest = Digest::of(b"manifest");
        fs::write(cache.path(&digest), b"something else").expect("write");
        assert_eq!(cache.read_verified(&digest).expect("io"), None);
        assert!(!cache.path(&digest).exists());
    }

    #[test]
    fn hex_digest_matches_digest_of() {
        assert_eq!(hex_digest(&Sha256::digest(b"abc")), Digest::of(b"abc"));
    }
}
