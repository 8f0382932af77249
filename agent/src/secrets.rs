//! Per-node secrets: generated once, never overwritten, never logged.
//!
//! The canonical value lives in `<data>/secrets/<name>` (folder 0700, file
//! 0600). Each app that declares a secret gets its own copy under
//! `<data>/secrets/apps/<id>/<name>`, owned by the app's user and mounted
//! read-only at `/run/secrets/<name>`: environment variables would show in
//! `podman inspect`, a mounted file does not.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};

use crate::manifest::{AppId, SecretKind, SecretSpec};
use crate::spec::{app_secret_path, secrets_dir};

/// Creates `dir` (and parents) with mode 0700 if missing, and tightens it
/// to 0700 if it exists.
fn private_dir(dir: &Path) -> anyhow::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create the secrets folder {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot set mode 0700 on {}", dir.display()))
}

fn random_hex(kind: SecretKind) -> anyhow::Result<String> {
    let mut bytes = vec![0u8; kind.bytes()];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("cannot read random bytes from the kernel: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes `value` to a fresh file in `dir` with `mode`, fsynced, and moves
/// it to `path`. With `overwrite` false an existing `path` is kept (hard
/// link fails on an existing name), so a secret can never be replaced.
/// Returns whether `path` was written.
fn write_private(path: &Path, value: &[u8], mode: u32, overwrite: bool) -> anyhow::Result<bool> {
    let dir = path.parent().context("a secret path has a parent folder")?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
        std::process::id()
    ));
    let _ = fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(value)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    drop(f);
    let written = if overwrite {
        fs::rename(&tmp, path).with_context(|| format!("cannot move {} into place", path.display()))?;
        true
    } else {
        let linked = fs::hard_link(&tmp, path);
        fs::remove_file(&tmp).with_context(|| format!("cannot remove {}", tmp.display()))?;
        match linked {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
            Err(e) => return Err(e).with_context(|| format!("cannot create {}", path.display())),
        }
    };
    // The rename or link is durable only once the folder is synced.
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync {}", dir.display()))?;
    Ok(written)
}

/// Makes sure the node's secret `spec` exists, generating it the first
/// time. Returns its path. An existing secret is never changed; one of the
/// wrong shape is an error, not a reason to replace it.
pub fn ensure_secret(data_root: &Path, spec: &SecretSpec) -> anyhow::Result<PathBuf> {
    let dir = secrets_dir(data_root);
    private_dir(&dir)?;
    let path = dir.join(&spec.name);
    if !path.exists() {
        let value = random_hex(spec.kind)?;
        if write_private(&path, value.as_bytes(), 0o600, false)? {
            tracing::info!(secret = %spec.name, kind = %spec.kind, "generated secret");
        }
    }
    let value = read_secret(&path)?;
    let want = spec.kind.bytes() * 2;
    if value.len() != want || !value.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!(
            "secret {} is not {} hex characters ({}); it is kept as it is: fix or remove it by hand",
            path.display(),
            want,
            spec.kind
        );
    }
    Ok(path)
}

/// Reads a secret's value. The value never appears in an error.
pub fn read_secret(path: &Path) -> anyhow::Result<String> {
    let meta = fs::metadata(path).with_context(|| format!("cannot read secret {}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot set mode 0600 on {}", path.display()))?;
        tracing::warn!(path = %path.display(), "secret was readable by others; set its mode to 0600");
    }
    let value = fs::read_to_string(path).with_context(|| format!("cannot read secret {}", path.display()))?;
    Ok(value.trim_end().to_owned())
}

/// Gives app `app` its own copy of every secret it declares, owned by
/// `owner` (host uid and gid) with mode 0400, refreshed when the canonical
/// value changed. Returns whether any copy changed.
pub fn provision_app_secrets(
    data_root: &Path,
    app: &AppId,
    secrets: &[SecretSpec],
    owner: Option<(u32, u32)>,
) -> anyhow::Result<bool> {
    let mut changed = false;
    for spec in secrets {
        let canonical = ensure_secret(data_root, spec)?;
        let value = read_secret(&canonical)?;
        let copy = app_secret_path(data_root, app, &spec.name);
        let dir = copy.parent().context("an app secret path has a parent folder")?;
        private_dir(dir)?;
        let current = fs::read_to_string(&copy).ok();
        if current.as_deref() != Some(value.as_str()) {
            write_private(&copy, value.as_bytes(), 0o400, true)?;
            changed = true;
        }
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&copy, Some(uid), Some(gid))
                .with_context(|| format!("cannot give {} to uid {uid}", copy.display()))?;
        }
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, kind: SecretKind) -> SecretSpec {
        SecretSpec {
            name: name.to_owned(),
            kind,
        }
    }

    #[test]
    fn secret_is_generated_once_with_private_modes() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = ensure_secret(tmp.path(), &spec("rpc", SecretKind::Hex32)).expect("generate");
        let first = fs::read_to_string(&path).expect("read");
        assert_eq!(first.len(), 64);
        assert!(first.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(fs::metadata(&path).expect("meta").permissions().mode() & 0o777, 0o600);
        let dir_mode = fs::metadata(secrets_dir(tmp.path()))
            .expect("meta")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dir_mode, 0o700);
        ensure_secret(tmp.path(), &spec("rpc", SecretKind::Hex32)).expect("again");
        assert_eq!(fs::read_to_string(&path).expect("read"), first, "never overwritten");
    }

    #[test]
    fn hex16_secret_has_32_hex_characters_and_differs_per_generation() {
        let a = tempfile::tempdir().expect("tempdir");
        let b = tempfile::tempdir().expect("tempdir");
        let pa = ensure_secret(a.path(), &spec("s", SecretKind::Hex16)).expect("a");
        let pb = ensure_secret(b.path(), &spec("s", SecretKind::Hex16)).expect("b");
        let (va, vb) = (read_secret(&pa).expect("a"), read_secret(&pb).expect("b"));
        assert_eq!(va.len(), 32);
        assert_ne!(va, vb, "random per node");
    }

    #[test]
    fn malformed_existing_secret_is_kept_and_reported_without_its_value() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = secrets_dir(tmp.path());
        fs::create_dir_all(&dir).expect("mkdir");
        fs::write(dir.join("rpc"), "hunter2").expect("write");
        let err = ensure_secret(tmp.path(), &spec("rpc", SecretKind::Hex32)).expect_err("malformed");
        let msg = format!("{err:#}");
        assert!(msg.contains("is not 64 hex characters"), "{msg}");
        assert!(!msg.contains("hunter2"), "the value never appears in errors: {msg}");
        assert_eq!(fs::read_to_string(dir.join("rpc")).expect("read"), "hunter2", "kept");
    }

    #[test]
    fn app_copy_follows_the_canonical_value_and_is_read_only() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let app = AppId::parse("electrs").expect("id");
        let secrets = [spec("rpc", SecretKind::Hex16)];
        assert!(provision_app_secrets(tmp.path(), &app, &secrets, None).expect("first"));
        assert!(
            !provision_app_secrets(tmp.path(), &app, &secrets, None).expect("same"),
            "unchanged"
        );
        let copy = app_secret_path(tmp.path(), &app, "rpc");
        assert_eq!(fs::metadata(&copy).expect("meta").permissions().mode() & 0o777, 0o400);
        // Rotating the canonical secret by hand reaches the app's copy.
        let canonical = secrets_dir(tmp.path()).join("rpc");
        fs::write(&canonical, "0123456789abcdef0123456789abcdef").expect("rotate");
        assert!(provision_app_secrets(tmp.path(), &app, &secrets, None).expect("rotated"));
        assert_eq!(read_secret(&copy).expect("copy"), "0123456789abcdef0123456789abcdef");
    }
}
