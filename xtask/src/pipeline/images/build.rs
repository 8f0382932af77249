//! Apps with `build`: built here, at image-build time, so that a node
//! starts every app with no network. The image is built with the host's
//! podman, tagged with the agent's own build tag, saved, and its config
//! and layers go through the blob cache and the same archive writer as
//! pulled images.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use archy_agent::manifest::{Digest, ImageSource, Manifest};
use serde::Deserialize;
use xshell::{cmd, Shell};

use super::archive::{self, Layer};
use super::cache::Cache;
use super::oci::ImageConfig;

/// `--format docker` keeps what the OCI format drops (HEALTHCHECK, SHELL);
/// `--timestamp` makes the config and the files' mtimes reproducible.
const BUILD_ARGS: &[&str] = &["build", "--format", "docker", "--timestamp"];
const SAVE_ARGS: &[&str] = &["save", "--format", "docker-archive", "--output"];
const INSPECT_ID_ARGS: &[&str] = &["image", "inspect", "--format", "{{.Id}}"];

/// A built image, ready for the archive writer.
#[derive(Debug)]
pub struct Built {
    /// `localhost/archipelago/<id>:<context hash>`, as the agent names it.
    pub tag: String,
    pub image: archive::Image,
}

/// `podman save`'s manifest.json entry.
#[derive(Debug, Deserialize)]
struct SavedItem {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

pub fn build(sh: &Shell, m: &Manifest, cache: &Cache, work: &Path, epoch: u64) -> anyhow::Result<Built> {
    let ImageSource::Build { context, containerfile } = &m.image else {
        bail!("{}: has no build section", m.id);
    };
    let tag = archy_agent::orchestrator::built_tag(m)
        .with_context(|| format!("{}: hashing the build context {}", m.id, context.display()))?
        .with_context(|| format!("{}: the agent gives no build tag for it", m.id))?;
    let file = context.join(containerfile);
    let epoch = epoch.to_string();
    cmd!(sh, "podman {BUILD_ARGS...} {epoch} --file {file} --tag {tag} {context}")
        .run()
        .with_context(|| format!("{}: building {} from {}", m.id, tag, context.display()))?;
    let id = cmd!(sh, "podman {INSPECT_ID_ARGS...} {tag}")
        .quiet()
        .read()
        .with_context(|| format!("{}: reading the image ID of {tag}", m.id))?;
    let id: Digest = format!("sha256:{}", id.trim().trim_start_matches("sha256:"))
        .parse()
        .with_context(|| format!("{}: podman gave {id:?} as the image ID of {tag}", m.id))?;

    let dir = work.join(m.id.as_str());
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("emptying {}", dir.display()))?;
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let saved = dir.join("saved.tar");
    cmd!(sh, "podman {SAVE_ARGS...} {saved} {tag}")
        .quiet()
        .run()
        .with_context(|| format!("{}: saving {tag}", m.id))?;
    let image = from_saved(&saved, &dir.join("unpacked"), cache, &id)
        .with_context(|| format!("{}: reading what podman saved of {tag} ({})", m.id, saved.display()))?;
    fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok(Built {
        image: archive::Image {
            repo_tag: Some(tag.clone()),
            ..image
        },
        tag,
    })
}

/// Moves the config and layers of a `podman save` archive into the cache,
/// checking each against the digest the config gives it.
fn from_saved(saved: &Path, unpacked: &Path, cache: &Cache, id: &Digest) -> anyhow::Result<archive::Image> {
    let file = fs::File::open(saved).with_context(|| format!("opening {}", saved.display()))?;
    tar::Archive::new(file)
        .unpack(unpacked)
        .with_context(|| format!("unpacking into {}", unpacked.display()))?;
    let manifest_path = unpacked.join("manifest.json");
    let text = fs::read(&manifest_path).with_context(|| format!("reading {}", manifest_path.display()))?;
    let items: Vec<SavedItem> =
        serde_json::from_slice(&text).with_context(|| format!("parsing {}", manifest_path.display()))?;
    let [item] = &items[..] else {
        bail!("{} lists {} images, expected one", manifest_path.display(), items.len());
    };
    let config = fs::read(inside(unpacked, &item.config)?).with_context(|| format!("reading {}", item.config))?;
    let config_digest = Digest::of(&config);
    if config_digest != *id {
        bail!("the saved config hashes to {config_digest}, but podman reports the image ID {id}");
    }
    let parsed = ImageConfig::parse(&config)?;
    if parsed.rootfs.diff_ids.len() != item.layers.len() {
        bail!(
            "the config lists {} layers, the archive {}",
            parsed.rootfs.diff_ids.len(),
            item.layers.len()
        );
    }
    let mut layers = Vec::with_capacity(item.layers.len());
    for (name, diff_id) in item.layers.iter().zip(&parsed.rootfs.diff_ids) {
        let path = inside(unpacked, name)?;
        if cache.size(diff_id).is_none() {
            if let Err(m) = cache.put_file(diff_id, &path)? {
                bail!("layer {name} hashes to {}, but the config names it {diff_id}", m.actual);
            }
        }
        layers.push(Layer {
            digest: diff_id.clone(),
            path: cache.path(diff_id),
        });
    }
    cache
        .put(&config_digest, &config)?
        .map_err(|m| anyhow::anyhow!("the config changed while it was stored: {}", m.actual))?;
    Ok(archive::Image {
        repo_tag: None,
        config_digest,
        config,
        layers,
    })
}

/// `name` from an archive's manifest.json, as a path inside `dir`.
fn inside(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let rel = Path::new(name);
    if rel.is_absolute() || rel.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        bail!("the archive names {name:?}, which is outside it");
    }
    Ok(dir.join(rel))
}
