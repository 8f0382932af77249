//! Images: pull by digest, inspect, import an archive, remove, build.

use std::path::Path;
use std::time::Duration;

use bollard::auth::DockerCredentials;
use bollard::errors::Error as BollardError;
use bollard::query_parameters::{
    BuildImageOptionsBuilder, CreateImageOptionsBuilder, ImportImageOptionsBuilder, RemoveImageOptionsBuilder,
};
use futures_util::StreamExt as _;

use super::{build, load, Engine, EngineError, Result};
use crate::manifest::PinnedImage;

/// How long a load may take until the engine answers: it answers only
/// after storing every layer, and archives run to gigabytes.
const LOAD_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Registry credentials for a pull.
#[derive(Clone, PartialEq, Eq)]
pub struct RegistryAuth {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryAuth")
            .field("username", &self.username)
            .field("password", &"<hidden>")
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// `sha256:…` of the image config.
    pub id: String,
    /// `host/repo@sha256:…` references the image was pulled by.
    pub repo_digests: Vec<String>,
    pub repo_tags: Vec<String>,
}

impl Engine {
    /// Pulls `image` by digest (never by tag) and returns it as stored.
    pub async fn pull(&self, image: &PinnedImage, auth: Option<&RegistryAuth>) -> Result<ImageInfo> {
        let reference = image.by_digest();
        let options = CreateImageOptionsBuilder::new().from_image(&reference).build();
        let credentials = auth.map(|a| DockerCredentials {
            username: Some(a.username.clone()),
            password: Some(a.password.clone()),
            serveraddress: Some(image.registry().to_owned()),
            ..Default::default()
        });
        let mut progress = self.docker.create_image(Some(options), None, credentials);
        while let Some(event) = progress.next().await {
            match event {
                Ok(info) => tracing::debug!(image = %reference, status = ?info.status, id = ?info.id, "pull progress"),
                Err(BollardError::DockerStreamError { error }) => {
                    return Err(EngineError::PullFailed {
                        image: reference,
                        message: error,
                    })
                }
                Err(err) => return Err(self.classify(|| format!("image {reference}"))(err)),
            }
        }
        match self.inspect_image(image).await {
            Err(EngineError::NotFound { .. }) => Err(EngineError::PullFailed {
                image: reference,
                message: "the engine reported no error, but the image is not in its store".into(),
            }),
            other => other,
        }
    }

    /// The stored image named by `image`'s digest reference.
    pub async fn inspect_image(&self, image: &PinnedImage) -> Result<ImageInfo> {
        self.inspect_image_ref(&image.by_digest()).await
    }

    /// The stored image named by any reference (tag, digest reference) or
    /// image id; `NotFound` when the engine has none.
    pub async fn inspect_image_ref(&self, reference: &str) -> Result<ImageInfo> {
        let found = self
            .docker
            .inspect_image(reference)
            .await
            .map_err(self.classify(|| format!("image {reference}")))?;
        Ok(ImageInfo {
            id: found.id.unwrap_or_default(),
            repo_digests: found.repo_digests.unwrap_or_default(),
            repo_tags: found.repo_tags.unwrap_or_default(),
        })
    }

    /// Whether the store holds the image whose config digest (image ID) is
    /// `id` (`sha256:…`). Asked by ID, never by name: a name can point at
    /// other content, an ID cannot.
    pub async fn has_image(&self, id: &str) -> Result<bool> {
        match self.inspect_image_ref(id).await {
            Ok(info) => Ok(strip_sha256(&info.id) == strip_sha256(id)),
            Err(EngineError::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Loads a `docker-archive` tarball (what `podman save` writes) into
    /// the store, streaming the file as the request body, and returns the
    /// names the engine reports for what it loaded (tags, or an image ID
    /// for an untagged image). The caller confirms what arrived by config
    /// digest ([`Engine::has_image`]): the names say nothing about content.
    pub async fn load_image(&self, archive: &Path) -> Result<Vec<String>> {
        let unreadable = |source: std::io::Error| EngineError::Archive {
            archive: archive.to_path_buf(),
            source,
        };
        let failed = |message: String| EngineError::LoadFailed {
            archive: archive.to_path_buf(),
            message,
        };
        let file = tokio::fs::File::open(archive).await.map_err(unreadable)?;
        let read_error = load::ReadErrorSlot::default();
        let body = load::body(file, read_error.clone());
        let options = ImportImageOptionsBuilder::new().build();
        let docker = self.docker.clone().with_timeout(LOAD_TIMEOUT);
        let mut answer = docker.import_image_stream(options, body, None);
        let mut names = Vec::new();
        let mut outcome = Ok(());
        while let Some(event) = answer.next().await {
            match event {
                Ok(info) => {
                    if let Some(line) = info.stream.as_deref() {
                        tracing::debug!(archive = %archive.display(), line = line.trim_end(), "load");
                        names.extend(load::loaded_names(line));
                    }
                }
                Err(BollardError::DockerStreamError { error }) => {
                    outcome = Err(failed(error.trim_end().to_owned()));
                    break;
                }
                Err(BollardError::DockerResponseServerError { status_code, message }) => {
                    outcome = Err(failed(format!("HTTP {status_code}: {}", message.trim_end())));
                    break;
                }
                Err(err) => {
                    outcome = Err(self.classify(|| format!("image archive {}", archive.display()))(err));
                    break;
                }
            }
        }
        // A file that fails while being sent breaks the connection; the
        // archive is what to report, not the engine.
        if let Some(e) = read_error.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Err(unreadable(e));
        }
        outcome.map(|()| names)
    }

    /// Removes the image by its digest reference; fails with `Conflict` while
    /// a container uses it.
    pub async fn remove_image(&self, image: &PinnedImage) -> Result<()> {
        let reference = image.by_digest();
        let options = RemoveImageOptionsBuilder::new().build();
        self.docker
            .remove_image(&reference, Some(options), None)
            .await
            .map_err(self.classify(|| format!("image {reference}")))?;
        Ok(())
    }

    /// Builds `context` (a folder, packed deterministically) with
    /// `containerfile` (relative to the context, or an absolute path inside
    /// it) and tags the result `tag`. The base image is used if present and
    /// pulled otherwise. A failing build is `BuildFailed` naming the
    /// context, with the engine's last words.
    pub async fn build_image(&self, context: &Path, containerfile: &Path, tag: &str) -> Result<ImageInfo> {
        let failed = |message: String| EngineError::BuildFailed {
            context: context.to_path_buf(),
            tag: tag.to_owned(),
            message,
        };
        let dockerfile = build::containerfile_in_context(context, containerfile)
            .and_then(|p| p.to_str().map(str::to_owned))
            .ok_or_else(|| {
                failed(format!(
                    "the Containerfile {} is not inside the context",
                    containerfile.display()
                ))
            })?;
        let folder = context.to_path_buf();
        let packed = tokio::task::spawn_blocking(move || build::pack_context(&folder))
            .await
            .map_err(|e| EngineError::BuildContext {
                context: context.to_path_buf(),
                source: std::io::Error::other(e),
            })?
            .map_err(|source| EngineError::BuildContext {
                context: context.to_path_buf(),
                source,
            })?;
        let options = BuildImageOptionsBuilder::new()
            .dockerfile(&dockerfile)
            .t(tag)
            .rm(true)
            .forcerm(true)
            .build();
        let mut progress = self
            .docker
            .build_image(options, None, Some(bollard::body_full(packed.into())));
        let mut last_lines: Vec<String> = Vec::new();
        while let Some(event) = progress.next().await {
            match event {
                Ok(info) => {
                    if let Some(line) = info.stream.as_deref().map(str::trim_end).filter(|l| !l.is_empty()) {
                        tracing::debug!(context = %context.display(), %tag, line, "build");
                        // Kept to explain a failure the engine reports
                        // without a message.
                        if last_lines.len() == 5 {
                            last_lines.remove(0);
                        }
                        last_lines.push(line.to_owned());
                    }
                }
                Err(BollardError::DockerStreamError { error }) => return Err(failed(error.trim_end().to_owned())),
                Err(BollardError::DockerResponseServerError { status_code, message }) if status_code != 404 => {
                    return Err(failed(format!("HTTP {status_code}: {message}")))
                }
                Err(err) => return Err(self.classify(|| format!("build of {tag}"))(err)),
            }
        }
        match self.inspect_image_ref(tag).await {
            Err(EngineError::NotFound { .. }) => Err(failed(format!(
                "the engine reported no error, but no image is tagged {tag}; last output: {}",
                last_lines.join(" | ")
            ))),
            other => other,
        }
    }
}

/// An image ID without its `sha256:` prefix, as engines write it either way.
fn strip_sha256(id: &str) -> &str {
    id.strip_prefix("sha256:").unwrap_or(id)
}
