//! Writing `images.lock.json`: what the agent reads to import the
//! archives. The format is the agent library's [`ImageLock`]
//! (`docs/images.md`); this stage writes it through that type, checked by
//! the agent's own reader, so a field can never exist on one side only.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
pub use archy_agent::images::{ImageLock, LockEntry, LOCK_FILE};

/// Writes `lock` to `<dir>/images.lock.json` atomically (see
/// `archy_agent::fsutil::write_atomic`); a lock the agent would refuse is
/// an error and nothing is written.
pub fn write(lock: &ImageLock, dir: &Path) -> anyhow::Result<PathBuf> {
    let path = dir.join(LOCK_FILE);
    let text = lock
        .to_file_bytes(&path)
        .context("the image lock file is not one the agent accepts")?;
    archy_agent::fsutil::write_atomic(&path, &text, 0o644).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use std::fs;

    use archy_agent::images::{load_lock, LockError};
    use archy_agent::manifest::Digest;

    use super::*;

    fn digest(c: char) -> Digest {
        format!("sha256:{}", c.to_string().repeat(64))
            .parse()
            .expect("a valid digest")
    }

    fn entry(app: &str) -> LockEntry {
        LockEntry {
            app: app.into(),
            reference: format!("docker.io/x/{app}:1@sha256:{}", "a".repeat(64)),
            manifest_digest: digest('b'),
            config_digest: digest('c'),
            archive: format!("{app}.tar"),
            archive_sha256: "d".repeat(64),
            size: 42,
        }
    }

    /// A lock written by this stage's code round-trips through the agent's
    /// reader: same entries, sorted by app, nothing left behind.
    #[test]
    fn the_lock_is_sorted_by_app_and_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let lock = ImageLock::new(vec![entry("lnd"), entry("bitcoin-core"), entry("electrs")]);
        let path = write(&lock, dir.path()).expect("write");
        assert_eq!(path, dir.path().join(LOCK_FILE));
        // What the agent's own reader accepts is the contract.
        let again = load_lock(dir.path()).expect("the agent accepts the written lock");
        assert_eq!(again, lock);
        let apps: Vec<&str> = again.images.iter().map(|e| e.app.as_str()).collect();
        assert_eq!(apps, ["bitcoin-core", "electrs", "lnd"]);
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, [LOCK_FILE], "no temporary file is left");
    }

    /// A lock the agent would refuse is never written.
    #[test]
    fn a_lock_the_agent_would_refuse_is_not_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut bad = entry("electrs");
        bad.archive = "../electrs.tar".into();
        let err = write(&ImageLock::new(vec![bad]), dir.path()).expect_err("refused");
        assert!(format!("{err:#}").contains("images[0].archive"), "{err:#}");
        assert!(!dir.path().join(LOCK_FILE).exists(), "nothing is written");
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
        let written = serde_json::to_value(ImageLock::new(vec![entry("electrs")])).expect("json");
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
        let err = load_lock(dir.path()).expect_err("v2");
        assert!(
            matches!(&err, LockError::Invalid { field, .. } if field == "version"),
            "{err:?}"
        );
        assert!(err.to_string().contains("version: 2 is not supported"), "{err}");
        fs::write(&path, r#"{"version": 1, "images": [], "extra": 1}"#).expect("write");
        assert!(load_lock(dir.path()).is_err());
    }
}
