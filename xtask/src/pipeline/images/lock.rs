//! `images.lock.json`: what the agent reads to import the archives. The
//! format is documented in `docs/images.md`, the contract between this
//! stage and the agent's importer.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

pub const LOCK_FILE: &str = "images.lock.json";
pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockFile {
    pub version: u32,
    pub images: Vec<LockEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockEntry {
    pub app: String,
    pub reference: String,
    pub manifest_digest: String,
    pub config_digest: String,
    pub archive: String,
    pub archive_sha256: String,
    pub size: u64,
}

impl LockFile {
    /// A version 1 lock of `images`, sorted by app.
    pub fn new(mut images: Vec<LockEntry>) -> LockFile {
        images.sort_by(|a, b| a.app.cmp(&b.app));
        LockFile {
            version: FORMAT_VERSION,
            images,
        }
    }

    #[cfg(test)]
    pub fn read(path: &Path) -> anyhow::Result<LockFile> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let lock: LockFile =
            serde_json::from_slice(&bytes).with_context(|| format!("{} is not an image lock file", path.display()))?;
        if lock.version != FORMAT_VERSION {
            anyhow::bail!(
                "{}: version {} is not supported (this build writes and reads {FORMAT_VERSION})",
                path.display(),
                lock.version
            );
        }
        Ok(lock)
    }

    /// Writes `<dir>/images.lock.json` atomically (see
    /// `archy_agent::fsutil::write_atomic`).
    pub fn write(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        let path = dir.join(LOCK_FILE);
        let mut text = serde_json::to_vec_pretty(self).context("serialising the image lock file")?;
        text.push(b'\n');
        archy_agent::fsutil::write_atomic(&path, &text, 0o644)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    fn entry(app: &str) -> LockEntry {
        LockEntry {
            app: app.into(),
            reference: format!("docker.io/x/{app}:1@sha256:{}", "a".repeat(64)),
            manifest_digest: format!("sha256:{}", "b".repeat(64)),
            config_digest: format!("sha256:{}", "c".repeat(64)),
            archive: format!("{app}.tar"),
            archive_sha256: "d".repeat(64),
            size: 42,
        }
    }

    #[test]
    fn the_lock_is_sorted_by_app_and_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let lock = LockFile::new(vec![entry("lnd"), entry("bitcoin-core"), entry("electrs")]);
        let path = lock.write(dir.path()).expect("write");
        assert_eq!(path, dir.path().join(LOCK_FILE));
        let again = LockFile::read(&path).expect("read");
        assert_eq!(again, lock);
        let apps: Vec<&str> = again.images.iter().map(|e| e.app.as_str()).collect();
        assert_eq!(apps, ["bitcoin-core", "electrs", "lnd"]);
        // What the agent's own reader accepts is the contract.
        let agent = archy_agent::images::load_lock(dir.path()).expect("the agent accepts the written lock");
        let agent_apps: Vec<&str> = agent.images.iter().map(|e| e.app.as_str()).collect();
        assert_eq!(agent_apps, apps);
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, [LOCK_FILE], "no temporary file is left");
    }

    /// The example in docs/images.md has exactly the fields written here.
    #[test]
    fn the_documented_example_has_the_written_fields() {
        let doc = include_str!("../../../../docs/images.md");
        let json = doc
            .split("```json\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .expect("the doc has a json example");
        let documented: serde_json::Value = serde_json::from_str(json).expect("the example is json");
        let written = serde_json::to_value(LockFile::new(vec![entry("electrs")])).expect("json");
        let keys = |v: &serde_json::Value| -> Vec<String> {
            v.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default()
        };
        assert_eq!(keys(&documented), keys(&written));
        assert_eq!(keys(&documented["images"][0]), keys(&written["images"][0]));
        assert_eq!(documented["version"], 1);
    }

    #[test]
    fn another_version_or_an_unknown_field_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(LOCK_FILE);
        fs::write(&path, r#"{"version": 2, "images": []}"#).expect("write");
        assert!(LockFile::read(&path)
            .expect_err("v2")
            .to_string()
            .contains("version 2 is not supported"));
        fs::write(&path, r#"{"version": 1, "images": [], "extra": 1}"#).expect("write");
        assert!(LockFile::read(&path).is_err());
    }
}
