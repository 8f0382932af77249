//! Install and upgrade: getting the image, preparing folders and secrets,
//! creating the container, and replacing it safely.

use std::fmt;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::journal::{self, Journal, JournaledFile, Step, PRE_UPGRADE};
use super::{is_managed, Orchestrator, OrchestratorError, Result, BACKUP_SUFFIX};
use crate::appdir::{AppDir, ConfineError};
use crate::dataroot::DataRoot;
use crate::engine::RegistryAuth;
use crate::images::{self, LockError};
use crate::manifest::{network_subnet, ImageSource, Manifest, PinnedImage};
use crate::registry::{candidates, RegistryStore};
use crate::spec::{build_tag, ContainerSpec, LABEL_MANAGED_BY, LABEL_SPEC_HASH, MANAGED_BY};

/// How long one pull attempt (one registry) may take before the next
/// registry is tried (docs/registries.md).
pub const PULL_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a pull may take over all its registries together.
pub const PULL_TIMEOUT: Duration = Duration::from_secs(1800);
/// How long building an app's image from its context may take.
pub const BUILD_TIMEOUT: Duration = Duration::from_secs(3600);
/// The environment variable that sets shorter limits, for tests only
/// (`pull-attempt=5s,pull=20s,build=1m`; docs/registries.md).
pub const TIMEOUTS_ENV: &str = "ARCHY_TIMEOUTS";

/// How long pulls and builds may take: a registry that accepts the
/// connection and never answers, or a build that hangs, ends in an error
/// naming the image, the registry and the limit, and the app backs off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// One registry attempt ([`PULL_ATTEMPT_TIMEOUT`]).
    pub pull_attempt: Duration,
    /// A whole pull, every registry together ([`PULL_TIMEOUT`]).
    pub pull: Duration,
    /// A whole build ([`BUILD_TIMEOUT`]).
    pub build: Duration,
}

impl Default for Timeouts {
    fn default() -> Timeouts {
        Timeouts {
            pull_attempt: PULL_ATTEMPT_TIMEOUT,
            pull: PULL_TIMEOUT,
            build: BUILD_TIMEOUT,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TimeoutsError {
    #[error("{var}: {item:?} is not NAME=DURATION; allowed names: pull-attempt, pull, build (for example pull-attempt=5s,pull=20s,build=1m)")]
    Shape { var: &'static str, item: String },
    #[error("{var}: {name}={value:?} is not a duration above zero (for example 5s, 2m): {reason}")]
    Duration {
        var: &'static str,
        name: String,
        value: String,
        reason: String,
    },
}

impl Timeouts {
    /// Parses `pull-attempt=5s,pull=20s,build=1m`; names left out keep
    /// their defaults.
    pub fn parse(text: &str) -> Result<Timeouts, TimeoutsError> {
        let mut t = Timeouts::default();
        for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let shape = || TimeoutsError::Shape {
                var: TIMEOUTS_ENV,
                item: item.to_owned(),
            };
            let (name, value) = item.split_once('=').ok_or_else(shape)?;
            let (name, value) = (name.trim(), value.trim());
            let slot = match name {
                "pull-attempt" => &mut t.pull_attempt,
                "pull" => &mut t.pull,
                "build" => &mut t.build,
                _ => return Err(shape()),
            };
            let bad = |reason: String| TimeoutsError::Duration {
                var: TIMEOUTS_ENV,
                name: name.to_owned(),
                value: value.to_owned(),
                reason,
            };
            let d = humantime::parse_duration(value).map_err(|e| bad(e.to_string()))?;
            if d.is_zero() {
                return Err(bad("zero would fail every pull".to_owned()));
            }
            *slot = d;
        }
        Ok(t)
    }

    /// The limits [`TIMEOUTS_ENV`] sets, or the defaults when it is unset.
    pub fn from_env() -> Result<Timeouts, TimeoutsError> {
        match std::env::var(TIMEOUTS_ENV) {
            Ok(text) => Timeouts::parse(&text),
            Err(_) => Ok(Timeouts::default()),
        }
    }
}

/// A duration as people write it (`10m`, `5s`).
fn shown(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// One try at one registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullAttempt {
    /// The configured registry's name, or the image's own registry host.
    pub registry: String,
    pub reference: String,
    /// `None` when the pull succeeded.
    pub error: Option<String>,
    pub elapsed_ms: u64,
}

impl fmt::Display for PullAttempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.error {
            None => write!(
                f,
                "{} ({}): ok in {} ms",
                self.registry, self.reference, self.elapsed_ms
            ),
            Some(e) => write!(f, "{} ({}): {e}", self.registry, self.reference),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstallReport {
    pub app: String,
    pub container: String,
    /// The image reference the spec names (digest or local build tag).
    pub image: String,
    /// The image's config digest: the exact image the container runs.
    pub image_id: String,
    /// Every pull attempt, in order; empty when the image was already
    /// present or was built.
    pub attempts: Vec<PullAttempt>,
    /// Whether the image was built from the app's context.
    pub built: bool,
    /// Whether a container was created (false: it existed with this spec).
    pub created: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpgradeReport {
    pub app: String,
    pub container: String,
    pub from_image_id: Option<String>,
    pub to_image_id: String,
    pub attempts: Vec<PullAttempt>,
    /// False when the container already matched the manifest.
    pub replaced: bool,
    /// Converting an adopted container: the owner's config files that
    /// differed from the rendering, kept beside it under
    /// [`PRE_ARCHIPELAGO`]'s suffix (paths as the manifest names them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kept_aside: Vec<String>,
}

/// Suffix of an adopted app's own config file, kept beside the rendered
/// one when `upgrade` converts the app.
pub const PRE_ARCHIPELAGO: &str = ".pre-archipelago";

/// The local tag an app's built image gets: content-addressed by its build
/// context, so a changed context is a new image. `None` for pulled apps.
/// Public because the image builder (`cargo xtask images`) tags what it
/// builds with the same name, so that a node finds the image it shipped.
pub fn built_tag(m: &Manifest) -> anyhow::Result<Option<String>> {
    let ImageSource::Build { context, containerfile } = &m.image else {
        return Ok(None);
    };
    Ok(Some(build_tag(&m.id, &context_hash(context, containerfile)?)))
}

/// The hash a build tag carries: every path and byte of the context, and
/// the Containerfile's name (16 hex digits). Reads the whole context: the
/// agent asks for it through [`super::ContextHashes`], once per change.
pub(crate) fn context_hash(context: &Path, containerfile: &Path) -> anyhow::Result<String> {
    let mut hasher = Sha256::new();
    hasher.update(containerfile.to_string_lossy().as_bytes());
    hash_tree(context, context, &mut hasher)?;
    let hex = format!("{:x}", hasher.finalize());
    Ok(hex[..16].to_owned())
}

fn hash_tree(root: &Path, dir: &Path, hasher: &mut Sha256) -> anyhow::Result<()> {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .with_context(|| format!("cannot read build context {}", dir.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("cannot list build context {}", dir.display()))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let rel = path.strip_prefix(root).unwrap_or(&path);
        hasher.update(rel.to_string_lossy().as_bytes());
        hasher.update([0]);
        let meta = fs::symlink_metadata(&path).with_context(|| format!("cannot stat {}", path.display()))?;
        if meta.is_dir() {
            hash_tree(root, &path, hasher)?;
        } else if meta.is_file() {
            let bytes = fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            hasher.update((bytes.len() as u64).to_le_bytes());
            hasher.update(&bytes);
        }
    }
    Ok(())
}

/// Makes sure the app's image is in the engine's store and returns its
/// config digest, with the pull attempts made.
async fn ensure_image(
    orch: &Orchestrator,
    m: &Manifest,
    spec: &ContainerSpec,
) -> Result<(String, Vec<PullAttempt>, bool)> {
    let app = m.id.as_str();
    match &m.image {
        ImageSource::Build { context, containerfile } => {
            if let Ok(info) = orch.engine.inspect_image_ref(&spec.image).await {
                return Ok((info.id, Vec::new(), false));
            }
            tracing::info!(app, context = %context.display(), tag = %spec.image, "building image");
            let limit = orch.timeouts().build;
            let info = tokio::time::timeout(limit, orch.engine.build_image(context, containerfile, &spec.image))
                .await
                .map_err(|_| {
                    anyhow::anyhow!(
                        "{app}: building image {} from {} timed out after {} (the build limit)",
                        spec.image,
                        context.display(),
                        shown(limit)
                    )
                })?
                .map_err(Orchestrator::engine_err(app))?;
            Ok((info.id, Vec::new(), true))
        }
        ImageSource::Pinned(image) => {
            if let Some(id) = imported_image(orch, app, image).await {
                return Ok((id, Vec::new(), false));
            }
            let (id, attempts) = pull_with_fallback(orch, app, image).await?;
            Ok((id, attempts, false))
        }
    }
}

/// The config digest of the image the image folder's lock ships for this
/// exact reference, imported first when the engine's store lacks it: an
/// imported archive stands for its pinned reference (docs/images.md),
/// though the store knows it only by config digest and tag, not by the
/// digest the manifest pins. `None` (pull instead) when there is no lock,
/// no entry, or the archive cannot be imported (said in the log).
async fn imported_image(orch: &Orchestrator, app: &str, image: &PinnedImage) -> Option<String> {
    let dir = &orch.config.images_dir;
    let lock = match images::load_lock(dir) {
        Ok(lock) => lock,
        Err(LockError::Missing { .. }) => return None,
        Err(e) => {
            let error = crate::error_chain(&e);
            tracing::warn!(app, error, "image lock unusable, pulling instead");
            return None;
        }
    };
    let entry = images::entry_for(&lock, image)?;
    let digest = &entry.config_digest;
    let done = images::import_entry(&orch.engine, dir, &orch.config.data_root, &lock, entry).await;
    match done.outcome {
        images::Outcome::AlreadyPresent => {
            tracing::info!(app, image = %image, config_digest = %digest, "using the imported image");
            Some(digest.to_string())
        }
        images::Outcome::Imported { ms } => {
            tracing::info!(app, image = %image, config_digest = %digest, ms, "imported the image from the image folder");
            Some(digest.to_string())
        }
        images::Outcome::Skipped { reason } => {
            tracing::warn!(app, image = %image, config_digest = %digest, reason, "the image folder's archive cannot be imported; pulling instead");
            None
        }
    }
}

/// Pulls `image` from the first registry that has it, in priority order.
/// Any failure (unreachable, timeout, unknown, refused credentials, content
/// that does not match the digest) falls through to the next candidate.
async fn pull_with_fallback(orch: &Orchestrator, app: &str, image: &PinnedImage) -> Result<(String, Vec<PullAttempt>)> {
    let store = RegistryStore::open(&orch.config.data_root)
        .with_context(|| format!("cannot read the registries list for {app}"))?;
    let cands = candidates(image, store.registries());
    // Already present under any candidate's name: nothing to pull.
    for c in &cands {
        if let Ok(info) = orch.engine.inspect_image(&c.image).await {
            if pinned_matches(&info.repo_digests, image) {
                return Ok((info.id, Vec::new()));
            }
        }
    }
    let mut attempts = Vec::new();
    let limits = *orch.timeouts();
    let pull_started = Instant::now();
    for c in cands {
        let registry = c.registry.clone().unwrap_or_else(|| c.image.registry().to_owned());
        let auth = c.credentials.as_ref().map(|cr| RegistryAuth {
            username: cr.username().to_owned(),
            password: cr.password().to_owned(),
        });
        let started = Instant::now();
        // One attempt gets its own limit, or what is left of the pull's.
        let left = limits.pull.saturating_sub(pull_started.elapsed());
        if left.is_zero() {
            attempts.push(PullAttempt {
                registry,
                reference: c.image.by_digest(),
                error: Some(format!(
                    "not tried: the pull's limit of {} was reached",
                    shown(limits.pull)
                )),
                elapsed_ms: 0,
            });
            continue;
        }
        let (limit, which) = if left < limits.pull_attempt {
            (
                left,
                format!("what was left of the pull's limit of {}", shown(limits.pull)),
            )
        } else {
            (limits.pull_attempt, "the limit for one registry".to_owned())
        };
        let outcome = match tokio::time::timeout(limit, orch.engine.pull(&c.image, auth.as_ref())).await {
            Err(_) => Err(format!("timed out after {} ({which})", shown(limit))),
            Ok(Err(e)) => Err(crate::error_chain(&e)),
            Ok(Ok(info)) if pinned_matches(&info.repo_digests, image) => Ok(info.id),
            Ok(Ok(info)) => {
                // Never keep what we did not ask for.
                let _ = orch.engine.remove_image(&c.image).await;
                Err(format!(
                    "content does not match the pinned digest {} (got {})",
                    image.digest(),
                    info.repo_digests.join(", ")
                ))
            }
        };
        let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let reference = c.image.by_digest();
        match outcome {
            Ok(id) => {
                tracing::info!(app, registry, reference, elapsed_ms, "pulled image");
                attempts.push(PullAttempt {
                    registry,
                    reference,
                    error: None,
                    elapsed_ms,
                });
                return Ok((id, attempts));
            }
            Err(error) => {
                tracing::warn!(app, registry, reference, error, "pull failed, trying the next registry");
                attempts.push(PullAttempt {
                    registry,
                    reference,
                    error: Some(error),
                    elapsed_ms,
                });
            }
        }
    }
    Err(OrchestratorError::PullFailed {
        app: app.to_owned(),
        image: image.to_string(),
        attempts,
    })
}

fn pinned_matches(repo_digests: &[String], image: &PinnedImage) -> bool {
    let want = format!("@{}", image.digest());
    repo_digests.iter().any(|d| d.ends_with(&want))
}

/// Creates the app's folders (owned by its user), its secrets and its
/// config files.
async fn prepare_host(orch: &Orchestrator, m: &Manifest, spec: &ContainerSpec) -> Result<()> {
    prepare_folders_and_secrets(orch, m, spec).await?;
    // Config files before the container exists: it must never start
    // without them, or with an old version of them.
    orch.render_files(m).await?;
    Ok(())
}

/// Creates the app's folders (owned by its user) and its secrets, off the
/// async threads (rootless, giving a folder runs `podman unshare`). Each
/// volume's folder is resolved through the confined walk ([`AppDir`]): a
/// symlink where a folder should be is refused, never mounted.
async fn prepare_folders_and_secrets(orch: &Orchestrator, m: &Manifest, _spec: &ContainerSpec) -> anyhow::Result<()> {
    let (data_root, m) = (orch.config.data_root.clone(), m.clone());
    super::blocking("preparing folders and secrets", move || {
        prepare_volumes(&data_root, &m)?;
        crate::secrets::provision_app_secrets(&data_root, &m.id, &m.secrets, m.owner())?;
        Ok(())
    })
    .await
}

/// Makes (or checks) the folder of each of `m`'s volumes through the
/// confined walk, and gives the app's own ones to its user. Returns their
/// host paths, the ones the container mounts.
pub fn prepare_volumes(data_root: &DataRoot, m: &Manifest) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let owner = m.owner();
    let app_dir = data_root.app_dir(&m.id);
    let mut out = Vec::new();
    for v in &m.volumes {
        let dir = AppDir::for_volume(data_root, &m.id, &v.source, |_| Ok(()))
            .with_context(|| format!("cannot prepare the volume folder for {}", v.target))?;
        // Only folders of the app's own data follow its user; another
        // app's folder mounted here keeps its owner.
        // Rootless, the uid is the container's: `Ownership` maps it.
        if let (Some((uid, gid)), true) = (owner, dir.root() == app_dir) {
            crate::ownership::Ownership::current()?.give_in(&dir, Path::new(""), uid, gid)?;
        }
        out.push(dir.path());
    }
    Ok(out)
}

/// Creates the container from `spec`, running image `image_id`.
async fn create(orch: &Orchestrator, app: &str, spec: &ContainerSpec, image_id: &str) -> Result<()> {
    orch.engine
        .ensure_network(&spec.network, network_subnet(&spec.network))
        .await
        .map_err(Orchestrator::engine_err(app))?;
    // Created from the image's config digest: exact, whichever registry
    // or mirror it came from. The labels keep the spec's own reference.
    let mut exact = spec.clone();
    exact.image = image_id.to_owned();
    orch.engine
        .create(&exact)
        .await
        .map(drop)
        .map_err(Orchestrator::engine_err(app))
}

/// Creates and starts the container from `spec`, running image `image_id`.
async fn create_and_start(orch: &Orchestrator, app: &str, spec: &ContainerSpec, image_id: &str) -> Result<()> {
    create(orch, app, spec, image_id).await?;
    orch.engine
        .start(&spec.name)
        .await
        .map_err(Orchestrator::engine_err(app))
}

pub(super) async fn install(orch: &Orchestrator, m: &Manifest) -> Result<InstallReport> {
    let app = m.id.as_str();
    let spec = orch.spec(m).await?;
    let (image_id, attempts, built) = ensure_image(orch, m, &spec).await?;
    let mut report = InstallReport {
        app: app.to_owned(),
        container: spec.name.clone(),
        image: spec.image.clone(),
        image_id: image_id.clone(),
        attempts,
        built,
        created: false,
    };
    if let Some(existing) = orch.inspect(app, &spec.name).await? {
        let same = existing.labels.get(LABEL_MANAGED_BY).map(String::as_str) == Some(MANAGED_BY)
            && existing.labels.get(LABEL_SPEC_HASH) == spec.labels.get(LABEL_SPEC_HASH);
        if !same {
            return Err(OrchestratorError::AlreadyExists {
                app: app.to_owned(),
                container: spec.name,
            });
        }
        prepare_folders_and_secrets(orch, m, &spec).await?;
        orch.start_with_files(m, &spec, |e| Orchestrator::engine_err(app)(e))
            .await?;
        return Ok(report);
    }
    prepare_host(orch, m, &spec).await?;
    create_and_start(orch, app, &spec, &image_id).await?;
    tracing::info!(app, container = %spec.name, image = %spec.image, "installed");
    report.created = true;
    Ok(report)
}

/// Replaces the app's container with one from the current manifest, as a
/// journaled sequence ([`journal`]): the old container is stopped and kept
/// as the backup, the config files are rendered only then (the previous
/// ones kept beside them), the new container is created and started, and
/// only once it passed its health gate are the backup and the kept files
/// removed. Any failure, and any interruption (at the next start), puts
/// the old container and its files back.
pub(super) async fn upgrade(orch: &Orchestrator, m: &Manifest) -> Result<UpgradeReport> {
    let app = m.id.as_str();
    let data_root = &orch.config.data_root;
    let spec = orch.spec(m).await?;
    let backup = format!("{}{BACKUP_SUFFIX}", spec.name);

    // An earlier upgrade of this app was interrupted: finished or undone
    // first (the agent does it at start; a command in-process does it here).
    if let Some(earlier) = Journal::load(data_root, app)? {
        journal::recover(&orch.engine, data_root, &earlier).await?;
    }

    // 1. The new image first, while the old container keeps running.
    let (image_id, attempts, _) = ensure_image(orch, m, &spec).await?;

    // A backup without a journal: left by an agent from before the journal.
    let current = orch.inspect(app, &spec.name).await?;
    let stale = orch.inspect(app, &backup).await?;
    match (&current, &stale) {
        (None, Some(_)) => {
            tracing::warn!(app, backup, "restoring the backup of an interrupted upgrade");
            orch.engine
                .rename(&backup, &spec.name)
                .await
                .map_err(Orchestrator::engine_err(app))?;
            orch.engine
                .start(&spec.name)
                .await
                .map_err(Orchestrator::engine_err(app))?;
        }
        (Some(_), Some(_)) => {
            tracing::warn!(app, backup, "removing the backup left by an interrupted upgrade");
            orch.engine
                .force_remove(&backup)
                .await
                .map_err(Orchestrator::engine_err(app))?;
        }
        _ => {}
    }
    let Some(old) = orch.inspect(app, &spec.name).await? else {
        let r = install(orch, m).await?;
        return Ok(UpgradeReport {
            app: r.app,
            container: r.container,
            from_image_id: None,
            to_image_id: r.image_id,
            attempts,
            replaced: true,
            kept_aside: Vec::new(),
        });
    };
    let mut report = UpgradeReport {
        app: app.to_owned(),
        container: spec.name.clone(),
        from_image_id: Some(old.image_id.clone()),
        to_image_id: image_id.clone(),
        attempts,
        replaced: false,
        kept_aside: Vec::new(),
    };
    if old.labels.get(LABEL_SPEC_HASH) == spec.labels.get(LABEL_SPEC_HASH) && old.image_id == image_id {
        return Ok(report);
    }
    // Folders and secrets change nothing the old container reads; the
    // templates are rendered (not written) now, so a broken one stops the
    // upgrade before anything is stopped.
    prepare_folders_and_secrets(orch, m, &spec).await?;
    // Converting an adopted container: its owner's config files stay
    // beside the ones the manifest renders.
    let adopted = !is_managed(&old.labels);
    let files = files_to_keep(orch, m, adopted)?;
    if adopted {
        report.kept_aside = files
            .iter()
            .filter_map(|f| f.aside.as_ref().map(|a| a.display().to_string()))
            .collect();
    }
    let mut j = Journal {
        app: app.to_owned(),
        container: spec.name.clone(),
        backup: backup.clone(),
        old_id: old.id.clone(),
        old_image_id: old.image_id.clone(),
        new_image_id: image_id.clone(),
        keep_aside: adopted,
        files,
        steps: Vec::new(),
    };
    j.record(data_root, Step::Begin)?;

    // 2. Stop the old container, keep it as the backup, then the files.
    // 3. Create and start the new one, and wait for it to be healthy.
    let outcome = async {
        let chain = |e: OrchestratorError| crate::error_chain(&e);
        let journal_err = |e: anyhow::Error| format!("{e:#}");
        j.record(data_root, Step::Stop).map_err(journal_err)?;
        orch.engine
            .stop(&spec.name, spec.stop_grace_period)
            .await
            .map_err(|e| chain(Orchestrator::engine_err(app)(e)))?;
        j.record(data_root, Step::Rename).map_err(journal_err)?;
        orch.engine
            .rename(&spec.name, &backup)
            .await
            .map_err(|e| chain(Orchestrator::engine_err(app)(e)))?;
        j.record(data_root, Step::Render).map_err(journal_err)?;
        j.set_files_aside(data_root).map_err(journal_err)?;
        orch.render_files(m).await.map_err(chain)?;
        j.record(data_root, Step::Create).map_err(journal_err)?;
        create(orch, app, &spec, &image_id).await.map_err(chain)?;
        j.record(data_root, Step::Start).map_err(journal_err)?;
        orch.engine
            .start(&spec.name)
            .await
            .map_err(|e| chain(Orchestrator::engine_err(app)(e)))?;
        j.record(data_root, Step::Health).map_err(journal_err)?;
        orch.wait_healthy(m).await.map_err(|e| crate::error_chain(&e))?;
        // The gate is passed: from here on the new container stays.
        j.record(data_root, Step::Commit).map_err(journal_err)
    }
    .await;
    match outcome {
        Ok(()) => {
            // 4. Remove the backup and the kept files.
            j.commit(&orch.engine, data_root).await?;
            tracing::info!(app, container = %spec.name, image_id, "upgraded");
            report.replaced = true;
            Ok(report)
        }
        Err(reason) => {
            tracing::error!(app, reason, "upgrade failed, restoring the previous container");
            let restored = j.roll_back(&orch.engine, data_root).await;
            if let Err(e) = &restored {
                tracing::error!(app, error = %format!("{e:#}"), "rollback failed; the journal stays for the next start");
            }
            Err(OrchestratorError::UpgradeFailed {
                app: app.to_owned(),
                reason,
                rolled_back: restored.is_ok(),
            })
        }
    }
}

/// The config files the upgrade renders anew (new bytes), each with where
/// its previous version is kept until the upgrade commits: beside it,
/// with [`PRE_UPGRADE`]'s suffix, or, converting an adopted app, with
/// [`PRE_ARCHIPELAGO`]'s (kept for good). Only plain files are kept; a
/// missing one is removed again on rollback; anything else there is left
/// for the render to refuse. An earlier copy is never overwritten: the
/// upgrade stops here, before anything is stopped.
fn files_to_keep(orch: &Orchestrator, m: &Manifest, adopted: bool) -> Result<Vec<JournaledFile>> {
    let data_root = &orch.config.data_root;
    let all = orch.manifests();
    let rendered = crate::files::render_app(data_root, m, &all, &orch.config.naming, true)?;
    let dir = AppDir::open(data_root, &m.id).map_err(anyhow::Error::from)?;
    let suffix = if adopted { PRE_ARCHIPELAGO } else { PRE_UPGRADE };
    let mut out = Vec::new();
    for r in rendered.iter().filter(|r| r.change == crate::files::Change::Content) {
        let stat = match &dir {
            None => Err(None),
            Some(dir) => dir.stat(&r.rel).map_err(Some),
        };
        let aside = match stat {
            Ok(st) if rustix::fs::FileType::from_raw_mode(st.st_mode).is_file() => {
                Some(journal::aside_of(&r.rel, suffix))
            }
            Ok(_) => continue,
            Err(None) => None,
            Err(Some(ConfineError::Io { source, .. })) if source.kind() == std::io::ErrorKind::NotFound => None,
            Err(Some(_)) => continue,
        };
        if let (Some(aside), Some(dir)) = (&aside, &dir) {
            if dir.stat(aside).is_ok() {
                let what = if adopted { "convert" } else { "upgrade" };
                return Err(anyhow::anyhow!(
                    "{}: cannot keep {} as {} (an earlier copy there is never replaced: move it away to {what} the app)",
                    m.id,
                    r.path.display(),
                    data_root.app_dir(&m.id).join(aside).display()
                )
                .into());
            }
        }
        out.push(JournaledFile {
            rel: r.rel.clone(),
            aside,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_parse_names_durations_and_keep_defaults_for_the_rest() {
        let t = Timeouts::parse("pull-attempt=5s, build=1m").expect("valid");
        assert_eq!(
            t,
            Timeouts {
                pull_attempt: Duration::from_secs(5),
                pull: PULL_TIMEOUT,
                build: Duration::from_secs(60),
            }
        );
        assert_eq!(Timeouts::parse("").expect("empty"), Timeouts::default());
    }

    #[test]
    fn timeouts_parse_refuses_unknown_names_bad_and_zero_durations_naming_them() {
        let e = Timeouts::parse("pul=5s").expect_err("unknown name").to_string();
        assert!(
            e.contains("ARCHY_TIMEOUTS") && e.contains("\"pul=5s\"") && e.contains("pull-attempt, pull, build"),
            "{e}"
        );
        let e = Timeouts::parse("pull=soon").expect_err("bad duration").to_string();
        assert!(e.contains("pull=\"soon\""), "{e}");
        let e = Timeouts::parse("build=0s").expect_err("zero").to_string();
        assert!(e.contains("build=\"0s\"") && e.contains("above zero"), "{e}");
        assert!(Timeouts::parse("pull").is_err(), "no value");
    }
}
