//! One image as a `docker-archive` tarball, written deterministically:
//! entries sorted by name, mtime from `SOURCE_DATE_EPOCH` (0 without it),
//! uid and gid 0, no user or group names, mode 0644. The same image (and
//! epoch) always gives the same bytes.
//!
//! The archive holds `manifest.json`, the config as `<hex>.json` and every
//! layer blob as `<hex>.tar`, exactly as the registry stored it (still
//! compressed): `podman load` unpacks gzip and zstd layers itself, and the
//! config's bytes, hence the image ID, are kept.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use archy_agent::manifest::Digest;
use serde::Serialize;
use sha2::{Digest as _, Sha256};

use super::cache::hex_digest;

const FILE_MODE: u32 = 0o644;
const MANIFEST_JSON: &str = "manifest.json";

/// What goes into one archive.
#[derive(Debug, Clone)]
pub struct Image {
    /// `registry/repository:tag`, or `None` for an untagged image.
    pub repo_tag: Option<String>,
    pub config_digest: Digest,
    pub config: Vec<u8>,
    /// In order; the same blob may appear twice.
    pub layers: Vec<Layer>,
}

#[derive(Debug, Clone)]
pub struct Layer {
    pub digest: Digest,
    /// The verified blob in the cache.
    pub path: PathBuf,
}

/// The written archive's identity, for the lock file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub sha256: String,
    pub size: u64,
}

/// A layer whose cached bytes no longer match their digest.
#[derive(Debug, thiserror::Error)]
#[error("the cached layer {} is corrupt: its bytes hash to {actual}", path.display())]
pub struct CorruptLayer {
    pub digest: Digest,
    pub actual: Digest,
    pub path: PathBuf,
}

/// One entry of `manifest.json`, with docker's field names and order.
#[derive(Debug, Serialize)]
struct ManifestItem<'a> {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags")]
    repo_tags: Vec<&'a str>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

/// The epoch every entry's mtime is set to.
pub fn source_date_epoch() -> anyhow::Result<u64> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(text) if !text.trim().is_empty() => text
            .trim()
            .parse()
            .with_context(|| format!("SOURCE_DATE_EPOCH={text:?} is not a whole number of seconds")),
        _ => Ok(0),
    }
}

/// Writes `image` to `path` (through a temporary file in the same folder,
/// renamed into place) and returns its sha256 and size. Every layer is
/// hashed again on the way: a corrupt cache entry fails with
/// [`CorruptLayer`] instead of reaching a node.
pub fn write(path: &Path, image: &Image, mtime: u64) -> anyhow::Result<Written> {
    let dir = path
        .parent()
        .with_context(|| format!("{} has no parent folder", path.display()))?;
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    let tmp = dir.join(format!(".{}.{}.partial", name.to_string_lossy(), std::process::id()));
    let result = write_to(&tmp, image, mtime).and_then(|written| {
        fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        Ok(written)
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn write_to(tmp: &Path, image: &Image, mtime: u64) -> anyhow::Result<Written> {
    let file = File::create(tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let out = HashingWriter::new(BufWriter::new(file));
    let mut builder = tar::Builder::new(out);

    let config_name = format!("{}.json", image.config_digest.hex());
    let layer_names: Vec<String> = image.layers.iter().map(|l| format!("{}.tar", l.digest.hex())).collect();
    let item = ManifestItem {
        config: config_name.clone(),
        repo_tags: image.repo_tag.iter().map(String::as_str).collect(),
        layers: layer_names.clone(),
    };
    let manifest_json = serde_json::to_vec(&[item]).context("serialising manifest.json")?;

    // Sorted by name, each blob once.
    enum Body<'a> {
        Bytes(&'a [u8]),
        Layer(&'a Layer),
    }
    let mut entries: BTreeMap<String, Body<'_>> = BTreeMap::new();
    entries.insert(MANIFEST_JSON.to_owned(), Body::Bytes(&manifest_json));
    entries.insert(config_name, Body::Bytes(&image.config));
    for (layer, name) in image.layers.iter().zip(layer_names) {
        entries.insert(name, Body::Layer(layer));
    }

    for (name, body) in &entries {
        match body {
            Body::Bytes(bytes) => {
                let mut header = header(bytes.len() as u64, mtime);
                builder
                    .append_data(&mut header, name, *bytes)
                    .with_context(|| format!("writing {name} into {}", tmp.display()))?;
            }
            Body::Layer(layer) => {
                let file = File::open(&layer.path)
                    .with_context(|| format!("opening the cached layer {}", layer.path.display()))?;
                let size = file
                    .metadata()
                    .with_context(|| format!("reading the size of {}", layer.path.display()))?
                    .len();
                let mut reader = HashingReader::new(file);
                let mut header = header(size, mtime);
                builder
                    .append_data(&mut header, name, &mut reader)
                    .with_context(|| format!("copying {} into {}", layer.path.display(), tmp.display()))?;
                let actual = reader.digest();
                if actual != layer.digest {
                    return Err(CorruptLayer {
                        digest: layer.digest.clone(),
                        actual,
                        path: layer.path.clone(),
                    }
                    .into());
                }
            }
        }
    }
    let out = builder
        .into_inner()
        .with_context(|| format!("finishing {}", tmp.display()))?;
    let (buffered, sha256, size) = out.finish();
    let file = buffered
        .into_inner()
        .map_err(io::IntoInnerError::into_error)
        .with_context(|| format!("flushing {}", tmp.display()))?;
    file.sync_all().with_context(|| format!("syncing {}", tmp.display()))?;
    Ok(Written { sha256, size })
}

fn header(size: u64, mtime: u64) -> tar::Header {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(size);
    header.set_mode(FILE_MODE);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(mtime);
    header
}

/// sha256 and size of a whole file.
#[cfg(test)]
pub fn file_sha256(path: &Path) -> anyhow::Result<Written> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut reader = HashingReader::new(file);
    let size = io::copy(&mut reader, &mut io::sink()).with_context(|| format!("reading {}", path.display()))?;
    Ok(Written {
        sha256: reader.digest().hex().to_owned(),
        size,
    })
}

struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> HashingWriter<W> {
    fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            written: 0,
        }
    }

    /// The inner writer, the hex sha256 and the byte count.
    fn finish(self) -> (W, String, u64) {
        let digest = hex_digest(&self.hasher.finalize());
        (self.inner, digest.hex().to_owned(), self.written)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> HashingReader<R> {
    fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
        }
    }

    fn digest(&self) -> Digest {
        hex_digest(&self.hasher.clone().finalize())
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// One entry of an archive as read back, for tests.
#[cfg(test)]
#[derive(Debug)]
pub struct Entry {
    pub name: String,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    pub user: String,
    pub bytes: Vec<u8>,
}

/// The entries of an archive, in order.
#[cfg(test)]
pub fn list(path: &Path) -> anyhow::Result<Vec<Entry>> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut archive = tar::Archive::new(file);
    let mut out = Vec::new();
    for entry in archive
        .entries()
        .with_context(|| format!("reading {}", path.display()))?
    {
        let mut entry = entry.with_context(|| format!("reading an entry of {}", path.display()))?;
        let header = entry.header().clone();
        let name = entry.path().context("an entry name")?.to_string_lossy().into_owned();
        let mut bytes = Vec::new();
        entry
            .read_to_end(&mut bytes)
            .with_context(|| format!("reading {name}"))?;
        out.push(Entry {
            user: header.username().ok().flatten().unwrap_or_default().to_owned(),
            mode: header.mode().context("mode")?,
            uid: header.uid().context("uid")?,
            gid: header.gid().context("gid")?,
            mtime: header.mtime().context("mtime")?,
            name,
            bytes,
        });
    }
    if out.is_empty() {
        anyhow::bail!("{} holds no entries", path.display());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(dir: &Path) -> Image {
        let layer_a = b"layer a, as a registry would store it".to_vec();
        let layer_b = b"layer b".to_vec();
        let mut layers = Vec::new();
        // b first: entries are sorted by name, layer order lives in manifest.json.
        for bytes in [&layer_b, &layer_a, &layer_b] {
            let digest = Digest::of(bytes);
            let path = dir.join(digest.hex());
            fs::write(&path, bytes).expect("write layer");
            layers.push(Layer { digest, path });
        }
        let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
        Image {
            repo_tag: Some("docker.io/getumbrel/electrs:v0.10.10".into()),
            config_digest: Digest::of(&config),
            config,
            layers,
        }
    }

    #[test]
    fn the_same_image_gives_the_same_bytes_with_fixed_metadata() {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = sample(dir.path());
        let (one, two) = (dir.path().join("one.tar"), dir.path().join("two.tar"));
        let first = write(&one, &image, 0).expect("first");
        std::thread::sleep(std::time::Duration::from_millis(20));
        let second = write(&two, &image, 0).expect("second");
        assert_eq!(first, second);
        assert_eq!(fs::read(&one).expect("one"), fs::read(&two).expect("two"));
        assert_eq!(file_sha256(&one).expect("hash"), first);

        let entries = list(&one).expect("list");
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        assert_eq!(names, sorted);
        assert_eq!(names.len(), 4, "{names:?}: the repeated layer is stored once");
        for e in &entries {
            assert_eq!(
                (e.mode, e.uid, e.gid, e.mtime, e.user.as_str()),
                (0o644, 0, 0, 0, ""),
                "{}",
                e.name
            );
        }
        // A different epoch changes the bytes, and only the mtimes.
        let three = dir.path().join("three.tar");
        let other = write(&three, &image, 1_700_000_000).expect("third");
        assert_ne!(other.sha256, first.sha256);
        assert!(list(&three).expect("list").iter().all(|e| e.mtime == 1_700_000_000));
    }

    #[test]
    fn manifest_json_names_the_config_the_tag_and_the_layers_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = sample(dir.path());
        let path = dir.path().join("img.tar");
        write(&path, &image, 0).expect("write");
        let entries = list(&path).expect("list");
        let manifest = &entries
            .iter()
            .find(|e| e.name == MANIFEST_JSON)
            .expect("manifest.json")
            .bytes;
        let value: serde_json::Value = serde_json::from_slice(manifest).expect("json");
        let item = &value[0];
        assert_eq!(item["Config"], format!("{}.json", image.config_digest.hex()));
        assert_eq!(item["RepoTags"][0], "docker.io/getumbrel/electrs:v0.10.10");
        let layers: Vec<String> = image.layers.iter().map(|l| format!("{}.tar", l.digest.hex())).collect();
        assert_eq!(item["Layers"], serde_json::json!(layers));
        let config = &entries
            .iter()
            .find(|e| e.name == format!("{}.json", image.config_digest.hex()))
            .expect("config")
            .bytes;
        assert_eq!(config, &image.config, "the config is stored byte for byte");

        let untagged = Image {
            repo_tag: None,
            ..image
        };
        write(&path, &untagged, 0).expect("untagged");
        let entries = list(&path).expect("list");
        let manifest = &entries
            .iter()
            .find(|e| e.name == MANIFEST_JSON)
            .expect("manifest.json")
            .bytes;
        let value: serde_json::Value = serde_json::from_slice(manifest).expect("json");
        assert_eq!(value[0]["RepoTags"], serde_json::json!([]));
    }

    #[test]
    fn a_corrupt_cached_layer_fails_and_leaves_no_archive() {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = sample(dir.path());
        fs::write(&image.layers[1].path, b"flipped").expect("corrupt");
        let path = dir.path().join("img.tar");
        let err = write(&path, &image, 0).expect_err("corrupt");
        let corrupt = err.downcast_ref::<CorruptLayer>().expect("typed");
        assert_eq!(corrupt.digest, image.layers[1].digest);
        assert_eq!(corrupt.actual, Digest::of(b"flipped"));
        assert!(!path.exists());
        let left: Vec<_> = fs::read_dir(dir.path())
            .expect("list")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".partial"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}
