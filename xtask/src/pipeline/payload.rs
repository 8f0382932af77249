//! The node's payload inputs: the app manifests, the pre-pulled image
//! folder and a registry list, each checked by the agent's own reader
//! before it goes into a layer.

use std::fs;
use std::path::Path;

use anyhow::{bail, Context as _};
use archy_agent::dataroot::DataRoot;
use archy_agent::images::{self, ImageLock};
use archy_agent::manifest::{self, LoadOptions, Manifest};
use archy_agent::registry::RegistryStore;

use crate::pipeline::flags::{IMAGES_LOCK, NODE_APPS_DIR, NODE_IMAGES_DIR};
use crate::pipeline::layers::{sha256_file, Layer};
use crate::pipeline::report::{ImageRecord, ManifestRecord};

/// The manifests, validated by the agent's own loader. Any error stops
/// the build with every error the validator found.
pub fn load_manifests(dir: &Path) -> anyhow::Result<Vec<Manifest>> {
    let report = manifest::load_dir(dir, &LoadOptions::default());
    if !report.is_clean() {
        let errors: Vec<String> = report.errors.iter().map(|e| format!("  {e}")).collect();
        bail!(
            "the manifests in {} are invalid ({} error{}); fix them or pass --manifests DIR:\n{}",
            dir.display(),
            errors.len(),
            if errors.len() == 1 { "" } else { "s" },
            errors.join("\n")
        );
    }
    let mut apps = report.apps;
    apps.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(apps)
}

/// Adds every app folder to `layer` under `opt/archipelago/apps/<id>/`.
pub fn add_manifests(layer: &mut Layer, apps: &[Manifest]) -> anyhow::Result<Vec<ManifestRecord>> {
    let mut records = Vec::new();
    for app in apps {
        let folder = app
            .path
            .parent()
            .with_context(|| format!("the manifest {} has no folder", app.path.display()))?;
        let dest = format!("{NODE_APPS_DIR}/{}", app.id);
        layer.add_dir(&dest)?;
        layer.add_tree(&dest, folder)?;
        records.push(ManifestRecord {
            app: app.id.to_string(),
            sha256: sha256_file(&app.path)?,
        });
    }
    Ok(records)
}

/// Reads the image folder, checks every archive against the lock file and
/// the lock file against the manifests, and adds them to `layer`.
pub fn add_images(layer: &mut Layer, dir: &Path, apps: &[Manifest]) -> anyhow::Result<Vec<ImageRecord>> {
    let lock_path = dir.join(IMAGES_LOCK);
    // The agent's own reader: the ISO carries exactly what the node accepts.
    let lock = images::load_lock(dir).with_context(|| {
        format!(
            "{} has no usable {IMAGES_LOCK}; run `cargo xtask images` again or pass --no-images",
            dir.display()
        )
    })?;
    check_lock_matches_manifests(&lock, apps).with_context(|| {
        format!(
            "{} does not match the manifests; run `cargo xtask images` again or pass --no-images",
            dir.display()
        )
    })?;
    layer.add_dir(NODE_IMAGES_DIR)?;
    layer.add_file(&format!("{NODE_IMAGES_DIR}/{IMAGES_LOCK}"), &lock_path)?;
    let mut records = Vec::new();
    for entry in &lock.images {
        if entry.archive.contains('/') || entry.archive.starts_with('.') {
            bail!(
                "{}: archive name {:?} is not a plain file name",
                lock_path.display(),
                entry.archive
            );
        }
        let archive = dir.join(&entry.archive);
        let size = fs::metadata(&archive)
            .with_context(|| format!("the image archive {} named in the lock file", archive.display()))?
            .len();
        if size != entry.size {
            bail!(
                "{} is {size} bytes but the lock file says {}; run `cargo xtask images` again",
                archive.display(),
                entry.size
            );
        }
        let sha = sha256_file(&archive)?;
        if sha != entry.archive_sha256 {
            bail!(
                "{} has sha256 {sha} but the lock file says {}; run `cargo xtask images` again",
                archive.display(),
                entry.archive_sha256
            );
        }
        layer.add_file_with_mode(&format!("{NODE_IMAGES_DIR}/{}", entry.archive), &archive, 0o644)?;
        records.push(ImageRecord {
            app: entry.app.clone(),
            reference: entry.reference.clone(),
            manifest_digest: entry.manifest_digest.to_string(),
            config_digest: entry.config_digest.to_string(),
            archive_sha256: entry.archive_sha256.clone(),
            size: entry.size,
        });
    }
    records.sort_by(|a, b| a.app.cmp(&b.app));
    Ok(records)
}

fn check_lock_matches_manifests(lock: &ImageLock, apps: &[Manifest]) -> anyhow::Result<()> {
    let mut problems = Vec::new();
    for app in apps {
        let entry = lock.images.iter().find(|e| e.app == app.id.as_str());
        match (app.pinned_image(), entry) {
            (_, None) => problems.push(format!("app {} has no image in the lock file", app.id)),
            (Some(pinned), Some(entry)) => {
                let digest = pinned.digest().as_str();
                if !entry.reference.ends_with(&format!("@{digest}")) {
                    problems.push(format!(
                        "app {}: the manifest pins {digest} but the lock file has {}",
                        app.id, entry.reference
                    ));
                }
            }
            (None, Some(_)) => {}
        }
    }
    for entry in &lock.images {
        if !apps.iter().any(|a| a.id.as_str() == entry.app) {
            problems.push(format!(
                "the lock file has an image for {}, which has no manifest",
                entry.app
            ));
        }
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("; "));
    }
    Ok(())
}

/// A node's absolute `path` as a path inside the rootfs tree.
fn in_rootfs(path: &Path) -> String {
    path.strip_prefix("/").unwrap_or(path).to_string_lossy().into_owned()
}

/// Checks a registry list with the agent's own reader and adds it to
/// `layer` as the node's list. Returns its sha256.
pub fn add_registries(layer: &mut Layer, file: &Path) -> anyhow::Result<String> {
    RegistryStore::open_file(file)
        .and_then(|list| list.refuse_credentials())
        .with_context(|| format!("checking the registry list {}", file.display()))?;
    // Where the agent reads it, in the data root's seed folder: the data
    // disk hides it once mounted, and `data-disk` copies it onto a disk
    // that has none.
    let node = DataRoot::default();
    layer.add_dir_with_mode(&in_rootfs(&node.config_dir()), 0o700)?;
    layer.add_file_with_mode(&in_rootfs(&node.registries()), file, 0o600)?;
    sha256_file(file)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use archy_agent::images::LockEntry;

    use super::*;

    #[test]
    fn a_registry_list_is_checked_and_installed_private() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("registries.json");
        fs::write(
            &good,
            r#"{"version": 1, "registries": [{"name": "lan", "url": "https://mirror.lan:5000", "priority": 10}]}"#,
        )
        .unwrap();
        let mut layer = Layer::new();
        let sha = add_registries(&mut layer, &good).unwrap();
        assert_eq!(sha.len(), 64);
        let root = tempfile::tempdir().unwrap();
        layer.install_into(root.path(), None).unwrap();
        let installed = root.path().join("var/lib/archipelago/config/registries.json");
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(fs::metadata(&installed).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(
            fs::metadata(root.path().join("var/lib/archipelago/config"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o700
        );

        let bad = dir.path().join("bad.json");
        fs::write(
            &bad,
            r#"{"version": 1, "registries": [{"name": "lan", "url": "ftp://x"}]}"#,
        )
        .unwrap();
        let err = add_registries(&mut Layer::new(), &bad).unwrap_err();
        assert!(format!("{err:#}").contains("checking the registry list"), "{err:#}");
    }

    fn lock(entries: &[(&str, &str)]) -> ImageLock {
        let digest: archy_agent::manifest::Digest =
            format!("sha256:{}", "0".repeat(64)).parse().expect("a valid digest");
        ImageLock {
            version: 1,
            images: entries
                .iter()
                .map(|(app, reference)| LockEntry {
                    app: (*app).into(),
                    reference: (*reference).into(),
                    manifest_digest: digest.clone(),
                    config_digest: digest.clone(),
                    archive: format!("{app}.tar"),
                    archive_sha256: String::new(),
                    size: 0,
                })
                .collect(),
        }
    }

    #[test]
    fn the_image_lock_must_match_the_manifests() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let apps = load_manifests(&root.join("manifests")).unwrap();
        // Built apps (the UIs) are locked under the agent's build tag.
        let listed: Vec<(String, String)> = apps
            .iter()
            .map(|a| {
                let reference = match a.pinned_image() {
                    Some(p) => p.to_string(),
                    None => archy_agent::orchestrator::built_tag(a).unwrap().unwrap(),
                };
                (a.id.to_string(), reference)
            })
            .collect();
        assert!(apps[0].pinned_image().is_some(), "the cases below change a pinned app");
        let entries: Vec<(&str, &str)> = listed.iter().map(|(a, r)| (a.as_str(), r.as_str())).collect();
        check_lock_matches_manifests(&lock(&entries), &apps).unwrap();

        let err = check_lock_matches_manifests(&lock(&entries[1..]), &apps)
            .unwrap_err()
            .to_string();
        assert!(err.contains("has no image in the lock file"), "{err}");

        let mut stale = entries.clone();
        stale[0].1 = "docker.io/x/y:1@sha256:0000000000000000000000000000000000000000000000000000000000000000";
        let err = check_lock_matches_manifests(&lock(&stale), &apps)
            .unwrap_err()
            .to_string();
        assert!(err.contains("the manifest pins"), "{err}");

        let mut extra = entries.clone();
        extra.push(("ghost", "docker.io/x/y@sha256:00"));
        let err = check_lock_matches_manifests(&lock(&extra), &apps)
            .unwrap_err()
            .to_string();
        assert!(err.contains("ghost, which has no manifest"), "{err}");
    }
}
