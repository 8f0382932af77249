//! `images.lock.json`: what the image folder holds (docs/images.md).

use std::fs::File;
use std::io::{self, Read as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::manifest::{AppId, Digest, PinnedImage};

/// The lock file's name inside the image folder.
pub const LOCK_FILE: &str = "images.lock.json";
/// The only format version this agent reads.
pub const LOCK_VERSION: u32 = 1;
/// Far more than any real lock (a few hundred bytes per app); a bigger
/// file is not one.
const MAX_LOCK_BYTES: u64 = 16 << 20;
/// What a build app's `reference` starts with: its local build tag.
const LOCAL_PREFIX: &str = "localhost/";

/// The image folder's lock file: one entry per app image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageLock {
    pub version: u32,
    pub images: Vec<LockEntry>,
}

impl ImageLock {
    /// A lock in the format version this agent reads, its entries sorted
    /// by app: what the image stage (`cargo xtask images`) writes.
    pub fn new(mut images: Vec<LockEntry>) -> ImageLock {
        images.sort_by(|a, b| a.app.cmp(&b.app));
        ImageLock {
            version: LOCK_VERSION,
            images,
        }
    }

    /// The file's bytes (pretty JSON and a final newline), checked by
    /// [`parse_lock`] first so that no writer can produce a lock the agent
    /// would refuse; `path` only names the file in errors.
    pub fn to_file_bytes(&self, path: &Path) -> Result<Vec<u8>, LockError> {
        let mut bytes = serde_json::to_vec_pretty(self).map_err(|e| LockError::Invalid {
            path: path.to_path_buf(),
            field: String::new(),
            message: format!("cannot be written as JSON: {e}"),
        })?;
        bytes.push(b'\n');
        parse_lock(path, &bytes)?;
        Ok(bytes)
    }
}

/// One archive and the image it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockEntry {
    /// The app whose manifest names the image.
    pub app: String,
    /// The manifest's `image` as written (pinned by digest), or a build
    /// app's local tag (`localhost/archipelago/<id>:<hash>`).
    pub reference: String,
    /// The digest of the image manifest actually stored.
    pub manifest_digest: Digest,
    /// The image ID after loading: how the store proves the image is there.
    pub config_digest: Digest,
    /// File name of the archive inside the folder.
    pub archive: String,
    /// 64 lowercase hex: the archive file's sha256.
    pub archive_sha256: String,
    /// The archive's size in bytes.
    pub size: u64,
}

/// Why the lock file cannot be used. Every message names the file, and
/// the field when one is at fault.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// No lock file: a base OS built without images.
    #[error("{} does not exist", path.display())]
    Missing { path: PathBuf },
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Not JSON, not the documented shape, or a value out of its rules;
    /// `field` is a path such as `images[2].archive_sha256`, empty when the
    /// file as a whole is at fault.
    #[error("{}: {}{message}", path.display(), if field.is_empty() { String::new() } else { format!("{field}: ") })]
    Invalid {
        path: PathBuf,
        field: String,
        message: String,
    },
}

/// Reads and checks `<dir>/images.lock.json`.
pub fn load_lock(dir: &Path) -> Result<ImageLock, LockError> {
    let path = dir.join(LOCK_FILE);
    let bytes = read_limited(&path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => LockError::Missing { path: path.clone() },
        _ => LockError::Read {
            path: path.clone(),
            source,
        },
    })?;
    parse_lock(&path, &bytes)
}

fn read_limited(path: &Path) -> io::Result<Vec<u8>> {
    let file = File::open(path)?;
    let mut bytes = Vec::new();
    file.take(MAX_LOCK_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_LOCK_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the file is larger than the {MAX_LOCK_BYTES} bytes a lock may have"),
        ));
    }
    Ok(bytes)
}

/// Parses and checks a lock's bytes; `path` only names the file in errors.
pub fn parse_lock(path: &Path, bytes: &[u8]) -> Result<ImageLock, LockError> {
    let invalid = |field: &str, message: String| LockError::Invalid {
        path: path.to_path_buf(),
        field: field.to_owned(),
        message,
    };
    let value: Value = serde_json::from_slice(bytes).map_err(|e| invalid("", format!("not JSON: {e}")))?;
    // The version first: a later format may change every other field, and
    // "unsupported version" says more than its first unknown field would.
    match value.get("version") {
        None => return Err(invalid("version", "missing".into())),
        Some(v) if v.as_u64() == Some(u64::from(LOCK_VERSION)) => {}
        Some(v) => {
            return Err(invalid(
                "version",
                format!("{v} is not supported, this agent reads version {LOCK_VERSION}"),
            ))
        }
    }
    let lock: ImageLock = serde_path_to_error::deserialize(value).map_err(|e| {
        let at = e.path().to_string();
        invalid(if at == "." { "" } else { &at }, e.into_inner().to_string())
    })?;
    for (i, entry) in lock.images.iter().enumerate() {
        let field = |name: &str| format!("images[{i}].{name}");
        if AppId::parse(&entry.app).is_none() {
            return Err(invalid(&field("app"), format!("`{}` is not an app id", entry.app)));
        }
        if let Some(first) = lock.images[..i].iter().position(|e| e.app == entry.app) {
            return Err(invalid(
                &field("app"),
                format!("`{}` is listed twice (also images[{first}])", entry.app),
            ));
        }
        check_reference(&entry.reference).map_err(|m| invalid(&field("reference"), m))?;
        check_archive_name(&entry.archive).map_err(|m| invalid(&field("archive"), m))?;
        if !is_sha256_hex(&entry.archive_sha256) {
            return Err(invalid(
                &field("archive_sha256"),
                format!("`{}` is not 64 lowercase hex characters", entry.archive_sha256),
            ));
        }
    }
    Ok(lock)
}

fn check_reference(reference: &str) -> Result<(), String> {
    if reference.starts_with(LOCAL_PREFIX) && !reference.contains('@') {
        // A build app's local tag: it names no registry to pull from, and
        // the store finds it by that name after the load.
        return if reference
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            Err(format!("`{reference}` is not an image reference"))
        } else {
            Ok(())
        };
    }
    reference
        .parse::<PinnedImage>()
        .map(drop)
        .map_err(|e| format!("`{reference}` is neither pinned nor a local build tag ({LOCAL_PREFIX}…): {e}"))
}

/// A plain file name: the lock may not send the agent outside its folder.
fn check_archive_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        Err(format!(
            "`{name}` is not a file name inside the folder (no '/', not '.' or '..')"
        ))
    } else {
        Ok(())
    }
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Whether a lock's `reference` names the same image as `pinned`: the same
/// registry, repository, tag and digest, however the registry was spelled
/// (`busybox` and `docker.io/library/busybox` are one name).
pub(crate) fn same_reference(written: &str, pinned: &PinnedImage) -> bool {
    written
        .parse::<PinnedImage>()
        .is_ok_and(|p| p.by_digest() == pinned.by_digest() && p.tag() == pinned.tag())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "c991fd3d8b19614fa7309525e8ccb6c0a87464f8bf6bd4dff1479b493f7308f2";
    const HEX2: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn entry_json(app: &str) -> Value {
        serde_json::json!({
            "app": app,
            "reference": format!("docker.io/getumbrel/electrs:v0.10.10@sha256:{HEX}"),
            "manifest_digest": format!("sha256:{HEX2}"),
            "config_digest": format!("sha256:{HEX2}"),
            "archive": format!("{app}.tar"),
            "archive_sha256": HEX,
            "size": 1234
        })
    }

    fn lock_json(entries: Vec<Value>) -> Value {
        serde_json::json!({ "version": 1, "images": entries })
    }

    fn parse(value: &Value) -> Result<ImageLock, LockError> {
        parse_lock(Path::new("/x/images.lock.json"), value.to_string().as_bytes())
    }

    /// The error's field and its whole message.
    fn invalid(value: &Value) -> (String, String) {
        match parse(value) {
            Err(e @ LockError::Invalid { .. }) => {
                let text = e.to_string();
                let LockError::Invalid { field, .. } = e else {
                    unreachable!()
                };
                (field, text)
            }
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn the_documented_example_parses_into_typed_entries() {
        let lock = parse(&lock_json(vec![entry_json("electrs"), entry_json("bitcoin-core")])).expect("valid");
        assert_eq!(lock.version, 1);
        assert_eq!(lock.images.len(), 2);
        assert_eq!(lock.images[0].app, "electrs");
        assert_eq!(lock.images[0].config_digest.hex(), HEX2);
        assert_eq!(lock.images[1].archive, "bitcoin-core.tar");
        assert_eq!(lock.images[1].size, 1234);
    }

    #[test]
    fn a_new_lock_is_sorted_and_its_bytes_read_back_the_same() {
        let lock = parse(&lock_json(vec![entry_json("lnd"), entry_json("electrs")])).expect("valid");
        let built = ImageLock::new(lock.images.clone());
        assert_eq!(built.version, LOCK_VERSION);
        let apps: Vec<&str> = built.images.iter().map(|e| e.app.as_str()).collect();
        assert_eq!(apps, ["electrs", "lnd"]);
        let path = Path::new("/x/images.lock.json");
        let bytes = built.to_file_bytes(path).expect("writable");
        assert!(bytes.ends_with(b"}\n"), "one final newline");
        assert_eq!(parse_lock(path, &bytes).expect("reads back"), built);

        let mut bad = built;
        bad.images[0].archive_sha256 = "not hex".into();
        let err = bad.to_file_bytes(path).expect_err("refused");
        assert!(
            matches!(&err, LockError::Invalid { field, .. } if field == "images[0].archive_sha256"),
            "{err:?}"
        );
    }

    #[test]
    fn a_build_apps_local_tag_is_a_valid_reference() {
        let mut e = entry_json("wallet-ui");
        e["reference"] = "localhost/archipelago/wallet-ui:0123456789abcdef".into();
        assert!(parse(&lock_json(vec![e])).is_ok());
    }

    #[test]
    fn any_version_but_1_is_refused_before_other_fields_are_read() {
        let mut v = lock_json(vec![]);
        v["version"] = 2.into();
        v["something_new"] = true.into();
        let (field, text) = invalid(&v);
        assert_eq!(field, "version");
        assert_eq!(
            text,
            "/x/images.lock.json: version: 2 is not supported, this agent reads version 1"
        );
        let (field, _) = invalid(&serde_json::json!({ "images": [] }));
        assert_eq!(field, "version");
    }

    #[test]
    fn unknown_fields_are_refused_naming_their_place() {
        let mut e = entry_json("electrs");
        e["arch"] = "amd64".into();
        let (field, text) = invalid(&lock_json(vec![entry_json("a"), e]));
        assert_eq!(field, "images[1].arch");
        assert!(text.contains("unknown field `arch`"), "{text}");
        let mut v = lock_json(vec![]);
        v["extra"] = 1.into();
        let (field, text) = invalid(&v);
        assert_eq!(field, "extra");
        assert!(
            text.starts_with("/x/images.lock.json: extra: unknown field `extra`"),
            "{text}"
        );
    }

    #[test]
    fn a_missing_field_is_refused_naming_the_entry() {
        let mut e = entry_json("electrs");
        e.as_object_mut().expect("object").remove("config_digest");
        let (field, text) = invalid(&lock_json(vec![e]));
        assert_eq!(field, "images[0]");
        assert!(text.contains("missing field `config_digest`"), "{text}");
    }

    #[test]
    fn malformed_digests_are_refused_naming_the_field() {
        for name in ["manifest_digest", "config_digest"] {
            let mut e = entry_json("electrs");
            e[name] = format!("sha256:{}", &HEX[..10]).into();
            let (field, _) = invalid(&lock_json(vec![e]));
            assert_eq!(field, format!("images[0].{name}"));
        }
    }

    #[test]
    fn archive_sha256_must_be_64_lowercase_hex() {
        for bad in [HEX.to_uppercase(), format!("sha256:{HEX}"), HEX[1..].to_owned()] {
            let mut e = entry_json("electrs");
            e["archive_sha256"] = bad.clone().into();
            let (field, text) = invalid(&lock_json(vec![e]));
            assert_eq!(field, "images[0].archive_sha256", "{bad}");
            assert!(text.contains("64 lowercase hex"), "{text}");
        }
    }

    #[test]
    fn archive_names_cannot_leave_the_folder() {
        for bad in ["", ".", "..", "../etc/passwd", "sub/electrs.tar", "/abs.tar"] {
            let mut e = entry_json("electrs");
            e["archive"] = bad.into();
            let (field, _) = invalid(&lock_json(vec![e]));
            assert_eq!(field, "images[0].archive", "{bad:?}");
        }
    }

    #[test]
    fn tag_only_references_and_bad_app_ids_are_refused() {
        let mut e = entry_json("electrs");
        e["reference"] = "docker.io/getumbrel/electrs:v0.10.10".into();
        let (field, text) = invalid(&lock_json(vec![e]));
        assert_eq!(field, "images[0].reference");
        assert!(text.contains("neither pinned nor a local build tag"), "{text}");
        let mut e = entry_json("electrs");
        e["app"] = "Not_An_Id".into();
        let (field, _) = invalid(&lock_json(vec![e]));
        assert_eq!(field, "images[0].app");
    }

    #[test]
    fn an_app_listed_twice_is_refused() {
        let (field, text) = invalid(&lock_json(vec![entry_json("electrs"), entry_json("electrs")]));
        assert_eq!(field, "images[1].app");
        assert!(text.contains("listed twice (also images[0])"), "{text}");
    }

    #[test]
    fn bytes_that_are_not_json_are_invalid_as_a_whole() {
        let err = parse_lock(Path::new("/x/images.lock.json"), b"{ nope").expect_err("invalid");
        assert!(
            matches!(&err, LockError::Invalid { field, .. } if field.is_empty()),
            "{err:?}"
        );
        assert!(err.to_string().starts_with("/x/images.lock.json: not JSON"), "{err}");
    }

    #[test]
    fn a_missing_lock_file_is_its_own_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = load_lock(dir.path()).expect_err("missing");
        assert!(matches!(err, LockError::Missing { .. }), "{err:?}");
        assert!(err.to_string().ends_with("images.lock.json does not exist"), "{err}");
    }

    #[test]
    fn references_match_by_name_tag_and_digest_however_the_registry_is_spelled() {
        let pinned: PinnedImage = format!("busybox:1.36@sha256:{HEX}").parse().expect("pinned");
        assert!(same_reference(&format!("busybox:1.36@sha256:{HEX}"), &pinned));
        assert!(same_reference(
            &format!("docker.io/library/busybox:1.36@sha256:{HEX}"),
            &pinned
        ));
        assert!(!same_reference(&format!("busybox:1.37@sha256:{HEX}"), &pinned));
        assert!(!same_reference(&format!("busybox:1.36@sha256:{HEX2}"), &pinned));
        assert!(!same_reference(&format!("quay.io/busybox:1.36@sha256:{HEX}"), &pinned));
        assert!(!same_reference("localhost/archipelago/busybox:1", &pinned));
    }
}
