//! Per-node secrets: generated once, never overwritten, never logged.
//!
//! The canonical value lives in `<data>/secrets/<name>` (folder 0700, file
//! 0600). Each app that declares a secret gets its own copy under
//! `<data>/secrets/apps/<id>/<name>`, owned by the app's user and mounted
//! read-only at `/run/secrets/<name>`: environment variables would show in
//! `podman inspect`, a mounted file does not.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};

use crate::dataroot::DataRoot;
use crate::fsutil;
use crate::manifest::{AppId, SecretKind, SecretSpec};

/// Creates `dir` with mode 0700, or tightens it to 0700.
fn private_dir(dir: &Path) -> anyhow::Result<()> {
    fsutil::ensure_private_dir(dir)
        .with_context(|| format!("cannot create the secrets folder {} (mode 0700)", dir.display()))
}

fn random_hex(kind: SecretKind) -> anyhow::Result<String> {
    let mut bytes = vec![0u8; kind.bytes()];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("cannot read random bytes from the kernel: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Makes sure the node's secret `spec` exists, generating it the first
/// time. Returns its path. An existing secret is never changed; one of the
/// wrong shape is an error, not a reason to replace it.
pub fn ensure_secret(data_root: &DataRoot, spec: &SecretSpec) -> anyhow::Result<PathBuf> {
    private_dir(&data_root.secrets_dir())?;
    let path = data_root.secret(&spec.name);
    if !path.exists() {
        let value = random_hex(spec.kind)?;
        // Never replaces a secret, even one another process wrote meanwhile.
        let created = fsutil::write_new(&path, value.as_bytes(), 0o600)
            .with_context(|| format!("cannot create {}", path.display()))?;
        if created {
            tracing::info!(secret = %spec.name, kind = %spec.kind, "generated secret");
        }
    }
    let value = read_secret(&path)?;
    if !well_formed(&value, spec.kind) {
        bail!(
            "secret {} is not {} hex characters ({}); it is kept as it is: fix or remove it by hand",
            path.display(),
            spec.kind.bytes() * 2,
            spec.kind
        );
    }
    Ok(path)
}

/// Whether `value` (without its trailing newline) is a secret of `kind`.
fn well_formed(value: &str, kind: SecretKind) -> bool {
    value.len() == kind.bytes() * 2 && value.bytes().all(|b| b.is_ascii_hexdigit())
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

/// The secrets of `app` whose copy differs from the node's value (or is
/// missing), by name: what [`provision_app_secrets`] would rewrite. Reads
/// only. A node value that is missing or malformed is left out: copying
/// cannot fix it, and counting it would restart the app on every pass
/// (install reports it).
pub fn stale_app_copies(data_root: &DataRoot, app: &AppId, secrets: &[SecretSpec]) -> Vec<String> {
    secrets
        .iter()
        .filter(|spec| {
            let Ok(value) = fs::read_to_string(data_root.secret(&spec.name)) else {
                return false;
            };
            let value = value.trim_end();
            well_formed(value, spec.kind)
                && fs::read_to_string(data_root.app_secret(app, &spec.name)).map_or(true, |copy| copy != value)
        })
        .map(|spec| spec.name.clone())
        .collect()
}

/// Gives app `app` its own copy of every secret it declares, owned by
/// `owner` (host uid and gid) with mode 0400, refreshed when the canonical
/// value changed. Returns whether any copy changed.
///
/// A copy is replaced by rename, never rewritten in place, so a reader
/// sees the old bytes or the new ones. A container's bind mount of the
/// old file keeps the old bytes until the container restarts: a reconcile
/// pass restarts the app whose copies it refreshed (the app reads its
/// secret at start anyway).
pub fn provision_app_secrets(
    data_root: &DataRoot,
    app: &AppId,
    secrets: &[SecretSpec],
    owner: Option<(u32, u32)>,
) -> anyhow::Result<bool> {
    let mut changed = false;
    for spec in secrets {
        let canonical = ensure_secret(data_root, spec)?;
        let value = read_secret(&canonical)?;
        let copy = data_root.app_secret(app, &spec.name);
        let dir = copy.parent().context("an app secret path has a parent folder")?;
        // `secrets/apps` as well as the app's own folder stay 0700.
        if let Some(apps) = dir.parent() {
            private_dir(apps)?;
        }
        private_dir(dir)?;
        let current = fs::read_to_string(&copy).ok();
        if current.as_deref() != Some(value.as_str()) {
            fsutil::write_atomic(&copy, value.as_bytes(), 0o400)
                .with_context(|| format!("cannot write {}", copy.display()))?;
            changed = true;
        }
        if let Some((uid, gid)) = owner {
            crate::ownership::Ownership::current()?.give_secret(&copy, uid, gid)?;
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
        let path = ensure_secret(&DataRoot::new(tmp.path()), &spec("rpc", SecretKind::Hex32)).expect("generate");
        let first = fs::read_to_string(&path).expect("read");
        assert_eq!(first.len(), 64);
        assert!(first.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(fs::metadata(&path).expect("meta").permissions().mode() & 0o777, 0o600);
        let dir_mode = fs::metadata(DataRoot::new(tmp.path()).secrets_dir())
            .expect("meta")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dir_mode, 0o700);
        ensure_secret(&DataRoot::new(tmp.path()), &spec("rpc", SecretKind::Hex32)).expect("again");
        assert_eq!(fs::read_to_string(&path).expect("read"), first, "never overwritten");
    }

    #[test]
    fn hex16_secret_has_32_hex_characters_and_differs_per_generation() {
        let a = tempfile::tempdir().expect("tempdir");
        let b = tempfile::tempdir().expect("tempdir");
        let pa = ensure_secret(&DataRoot::new(a.path()), &spec("s", SecretKind::Hex16)).expect("a");
        let pb = ensure_secret(&DataRoot::new(b.path()), &spec("s", SecretKind::Hex16)).expect("b");
        let (va, vb) = (read_secret(&pa).expect("a"), read_secret(&pb).expect("b"));
        assert_eq!(va.len(), 32);
        assert_ne!(va, vb, "random per node");
    }

    #[test]
    fn malformed_existing_secret_is_kept_and_reported_without_its_value() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = DataRoot::new(tmp.path()).secrets_dir();
        fs::create_dir_all(&dir).expect("mkdir");
        fs::write(dir.join("rpc"), "hunter2").expect("write");
        let err = ensure_secret(&DataRoot::new(tmp.path()), &spec("rpc", SecretKind::Hex32)).expect_err("malformed");
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
        assert!(provision_app_secrets(&DataRoot::new(tmp.path()), &app, &secrets, None).expect("first"));
        assert!(
            !provision_app_secrets(&DataRoot::new(tmp.path()), &app, &secrets, None).expect("same"),
            "unchanged"
        );
        let copy = DataRoot::new(tmp.path()).app_secret(&app, "rpc");
        assert_eq!(fs::metadata(&copy).expect("meta").permissions().mode() & 0o777, 0o400);
        // Rotating the canonical secret by hand reaches the app's copy.
        let canonical = DataRoot::new(tmp.path()).secrets_dir().join("rpc");
        fs::write(&canonical, "0123456789abcdef0123456789abcdef").expect("rotate");
        assert!(provision_app_secrets(&DataRoot::new(tmp.path()), &app, &secrets, None).expect("rotated"));
        assert_eq!(read_secret(&copy).expect("copy"), "0123456789abcdef0123456789abcdef");
    }

    #[test]
    fn stale_copies_are_those_that_differ_from_the_node_value() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = DataRoot::new(tmp.path());
        let app = AppId::parse("electrs").expect("id");
        let secrets = [spec("rpc", SecretKind::Hex16), spec("salt", SecretKind::Hex16)];
        assert!(stale_app_copies(&root, &app, &secrets).is_empty(), "no node value yet");
        for s in &secrets {
            ensure_secret(&root, s).expect("generated");
        }
        assert_eq!(
            stale_app_copies(&root, &app, &secrets),
            ["rpc", "salt"],
            "no copies yet"
        );
        provision_app_secrets(&root, &app, &secrets, None).expect("provisioned");
        assert!(stale_app_copies(&root, &app, &secrets).is_empty());
        fs::write(root.secret("salt"), "0123456789abcdef0123456789abcdef\n").expect("rotate");
        assert_eq!(stale_app_copies(&root, &app, &secrets), ["salt"]);
        provision_app_secrets(&root, &app, &secrets, None).expect("refreshed");
        assert!(
            stale_app_copies(&root, &app, &secrets).is_empty(),
            "a trailing newline is no change"
        );
        // A malformed node value is no reason to restart the app each pass.
        fs::write(root.secret("rpc"), "hunter2").expect("break");
        assert!(stale_app_copies(&root, &app, &secrets).is_empty());
    }
}
