//! `cargo xtask images`: every app's image, pinned by digest, pulled
//! through the registry list (or built, for apps with `build`), verified,
//! and written as one `docker-archive` per app plus `images.lock.json`:
//! the folder `docs/images.md` describes, which the agent imports at boot.
//!
//! Pulls need no host tool (the OCI client is a library); builds need
//! podman. Downloads land in a content-addressed cache, so a second run
//! fetches nothing. Builds `FROM` the UI base image get it from
//! `base_image`, loaded into the building podman and checked against its
//! pin, never from a registry.

pub(crate) mod archive;
mod build;
mod cache;
#[cfg(test)]
mod fake_registry;
pub mod lock;
pub(crate) mod oci;
mod pull;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context as _};
use archy_agent::manifest::{load_dir, ImageSource, LoadOptions, Manifest, PinnedImage};
use archy_agent::registry::{candidates, Registry, RegistryStore};
use clap::ValueEnum;
use indicatif::HumanBytes;
use xshell::Shell;

use crate::pipeline::base_image;
use crate::pipeline::rootfs::BasePolicy;
use crate::tools;
use cache::Cache;
use lock::{ImageLock, LockEntry, LOCK_FILE};
use pull::Puller;

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The folder of app manifests, one folder per app.
    #[arg(long, value_name = "DIR", default_value = "manifests")]
    pub manifests: PathBuf,
    /// Registries to pull through, in the agent's registries.json format
    /// (priorities and logins; see docs/registries.md). Without it every
    /// image comes from the registry its reference names.
    #[arg(long, value_name = "FILE")]
    pub registries: Option<PathBuf>,
    /// Where the archives and images.lock.json are written.
    #[arg(long, value_name = "DIR", default_value = "target/images")]
    pub out: PathBuf,
    /// The content-addressed download cache (blobs/sha256/<hex>).
    #[arg(long, value_name = "DIR", default_value = "target/cache")]
    pub cache: PathBuf,
    /// The node's CPU architecture: which image of a multi-platform index to take.
    #[arg(long, value_enum, default_value_t = Arch::Amd64)]
    pub arch: Arch,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Arch {
    Amd64,
    Arm64,
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    println!(
        "==> images: pull every app image by digest (or build it), verify every blob, and write one archive per app and {LOCK_FILE} into {}",
        args.out.display()
    );
    let arch = match args.arch {
        Arch::Amd64 => "amd64",
        Arch::Arm64 => bail!(
            "--arch arm64 is not supported: the node image (rootfs, kernel, ISO) is built for amd64 only, so arm64 app images would have nothing to run on"
        ),
    };
    let apps = load_apps(&args.manifests)?;
    let registries = load_registries(args.registries.as_deref())?;
    let sh = Shell::new().context("creating a shell")?;
    if apps.iter().any(|m| matches!(m.image, ImageSource::Build { .. })) {
        tools::ensure(&sh, tools::IMAGES_STAGE)?;
    }
    prepare_base_image(&sh, &apps)?;
    fs::create_dir_all(&args.out).with_context(|| format!("creating the output folder {}", args.out.display()))?;
    let cache = Cache::open(&args.cache)?;
    let epoch = archive::source_date_epoch()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime for registry downloads")?;
    let mut puller = Puller::new(cache.clone(), arch);

    let mut entries = Vec::with_capacity(apps.len());
    let mut failed = Vec::new();
    for m in &apps {
        let app_started = Instant::now();
        let result = match &m.image {
            ImageSource::Pinned(pinned) => {
                println!("images: {}: {pinned}", m.id);
                let list = candidates(pinned, &registries);
                runtime
                    .block_on(puller.pull(m.id.as_str(), pinned, &list))
                    .and_then(|pulled| archive_pulled(m, pinned, pulled, &args.out, &cache, epoch))
            }
            ImageSource::Build { context, .. } => {
                println!("images: {}: building {}", m.id, context.display());
                build::build(&sh, m, &cache, &args.cache.join("build"), epoch).and_then(|built| {
                    let digest = built.image.config_digest.clone();
                    write_archive(m, built.tag, digest, &built.image, &args.out, &cache, epoch)
                })
            }
        };
        match result {
            Ok(entry) => {
                println!(
                    "images: {}: wrote {} ({}) in {:.1}s",
                    m.id,
                    entry.archive,
                    HumanBytes(entry.size),
                    app_started.elapsed().as_secs_f64()
                );
                entries.push(entry);
            }
            // Every failure fails the stage, once the other apps were
            // tried too, so that one run reports them all.
            Err(e) => {
                println!("images: {}: failed (see the error at the end)", m.id);
                failed.push(format!("{e:#}"));
            }
        }
    }
    if !failed.is_empty() {
        bail!(
            "{} of {} images failed; no lock file was written:\n  {}",
            failed.len(),
            apps.len(),
            failed.join("\n  ")
        );
    }
    let lock = ImageLock::new(entries);
    let lock_path = lock::write(&lock, &args.out)?;
    remove_stale(&args.out, &lock)?;
    let stats = puller.stats();
    println!(
        "images: downloaded {} bytes ({} blobs), {} blobs from cache ({} bytes)",
        stats.downloaded_bytes, stats.downloaded_blobs, stats.cached_blobs, stats.cached_bytes
    );
    println!(
        "==> images: done in {:.1}s: {} images, lock file {}",
        started.elapsed().as_secs_f64(),
        lock.images.len(),
        lock_path.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// UIs start `FROM` the base image, which no registry has: it is built
/// (or taken from the cache) and loaded into the podman that builds them,
/// its name checked against the digest it pins.
fn prepare_base_image(sh: &Shell, apps: &[Manifest]) -> anyhow::Result<()> {
    let mut users = Vec::new();
    for m in apps {
        if base_image::used_by(m)? {
            users.push(m.id.as_str());
        }
    }
    if users.is_empty() {
        return Ok(());
    }
    println!(
        "images: {} start FROM {}: building or loading it",
        users.join(", "),
        base_image::REFERENCE
    );
    let root = crate::project_root()?;
    let dir = crate::pipeline::flags::target_dir(&root).join(base_image::OUT_SUBDIR);
    let lock = base_image::build(&root, sh, &dir, BasePolicy::Cached)?;
    base_image::load(sh, &dir, &lock)
}

fn archive_pulled(
    m: &Manifest,
    pinned: &PinnedImage,
    pulled: pull::Pulled,
    out: &Path,
    cache: &Cache,
    epoch: u64,
) -> anyhow::Result<LockEntry> {
    println!(
        "images: {}: verified manifest {} ({} layers), {}",
        m.id,
        pulled.manifest_digest,
        pulled.layers.len(),
        match &pulled.source {
            Some(from) => format!("missing parts fetched from {from}"),
            None => "everything from the cache".to_owned(),
        }
    );
    let image = archive::Image {
        repo_tag: repo_tag(pinned),
        config_digest: pulled.config_digest,
        config: pulled.config,
        layers: pulled.layers,
    };
    write_archive(m, pinned.to_string(), pulled.manifest_digest, &image, out, cache, epoch)
}

/// Writes `<out>/<app>.tar` and gives its lock entry.
fn write_archive(
    m: &Manifest,
    reference: String,
    manifest_digest: archy_agent::manifest::Digest,
    image: &archive::Image,
    out: &Path,
    cache: &Cache,
    epoch: u64,
) -> anyhow::Result<LockEntry> {
    let app = m.id.as_str();
    let name = format!("{app}.tar");
    let path = out.join(&name);
    let written = match archive::write(&path, image, epoch) {
        Ok(written) => written,
        Err(e) => {
            if let Some(corrupt) = e.downcast_ref::<archive::CorruptLayer>() {
                cache.evict(&corrupt.digest)?;
                bail!("{app}: {corrupt}; it was removed from the cache: run the stage again to fetch it");
            }
            return Err(e.context(format!("{app}: writing the archive {}", path.display())));
        }
    };
    Ok(LockEntry {
        app: app.to_owned(),
        reference,
        manifest_digest,
        config_digest: image.config_digest.clone(),
        archive: name,
        archive_sha256: written.sha256,
        size: written.size,
    })
}

/// Every app, sorted by id; any invalid manifest fails the stage, since
/// the image must not ship without an app it was meant to have.
fn load_apps(dir: &Path) -> anyhow::Result<Vec<Manifest>> {
    let report = load_dir(dir, &LoadOptions::default());
    if !report.is_clean() {
        let errors: Vec<String> = report.errors.iter().map(ToString::to_string).collect();
        bail!(
            "{} has invalid manifests; fix them first (`archy-agent validate --apps {}`):\n  {}",
            dir.display(),
            dir.display(),
            errors.join("\n  ")
        );
    }
    if report.apps.is_empty() {
        bail!("{} holds no app manifests", dir.display());
    }
    let mut apps = report.apps;
    apps.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(apps)
}

fn load_registries(path: Option<&Path>) -> anyhow::Result<Vec<Registry>> {
    let Some(path) = path else {
        println!("images: no registry list given: each image comes from its own registry");
        return Ok(Vec::new());
    };
    let store = RegistryStore::open_file(path)?;
    let registries = store.registries().to_vec();
    for r in &registries {
        println!(
            "images: registry `{}` {} priority {}{}",
            r.name,
            r.url,
            r.priority,
            if r.credentials.is_some() { " (with login)" } else { "" }
        );
    }
    Ok(registries)
}

/// The name the archive tags its image with: `registry/repository:tag`,
/// or none when the reference has no tag.
fn repo_tag(image: &PinnedImage) -> Option<String> {
    image
        .tag()
        .map(|tag| format!("{}/{}:{tag}", image.registry(), image.repository()))
}

/// Removes archives of apps that are gone and partial files of runs that
/// did not finish: the folder holds exactly what the lock names.
fn remove_stale(out: &Path, lock: &ImageLock) -> anyhow::Result<()> {
    let keep: Vec<&str> = lock.images.iter().map(|e| e.archive.as_str()).collect();
    let entries = fs::read_dir(out).with_context(|| format!("listing {}", out.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", out.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let stale_archive = name.ends_with(".tar") && !keep.contains(&name.as_str());
        if stale_archive || name.ends_with(".partial") {
            println!("images: removing {name}: no app in the lock file names it");
            fs::remove_file(entry.path()).with_context(|| format!("removing {}", entry.path().display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_archive_tag_is_the_full_repository_and_tag() {
        let hex = "c".repeat(64);
        let tagged: PinnedImage = format!("nginx:1.27@sha256:{hex}").parse().expect("valid");
        assert_eq!(repo_tag(&tagged).as_deref(), Some("docker.io/library/nginx:1.27"));
        let untagged: PinnedImage = format!("127.0.0.1:5000/a/b@sha256:{hex}").parse().expect("valid");
        assert_eq!(repo_tag(&untagged), None);
    }

    #[test]
    fn stale_archives_and_partial_files_are_removed_and_the_rest_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        for name in ["electrs.tar", "gone.tar", ".lnd.tar.1.partial", "README"] {
            fs::write(dir.path().join(name), b"x").expect("write");
        }
        let lock = ImageLock::new(vec![LockEntry {
            app: "electrs".into(),
            reference: String::new(),
            manifest_digest: archy_agent::manifest::Digest::of(b""),
            config_digest: archy_agent::manifest::Digest::of(b""),
            archive: "electrs.tar".into(),
            archive_sha256: String::new(),
            size: 1,
        }]);
        remove_stale(dir.path(), &lock).expect("clean");
        let mut left: Vec<String> = fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["README", "electrs.tar"]);
    }
}
