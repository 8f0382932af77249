//! The container engine seam: the only module of the agent that talks to
//! bollard (and through it to Podman's Docker-compatible API).
//!
//! Why a seam:
//! - bollard's API churns: 0.19 moved every option into
//!   `bollard::query_parameters` builders and request bodies into
//!   `bollard::models::*Body`. One module absorbs such moves.
//! - The engine is Podman, not Docker. Its differences are handled here,
//!   once, instead of in the orchestrator.
//! - Callers match on [`EngineError`] variants (unreachable, not found,
//!   conflict, pull failed) instead of HTTP status codes, and speak the
//!   agent's types: [`PinnedImage`] in, [`ContainerInfo`] out.
//!
//! Podman 4.3 behaviour seen through this API:
//! - A pull (`POST /images/create`) answers 200 at once and reports failure
//!   inside the progress stream, so the stream must be read to the end;
//!   [`Engine::pull`] then inspects the image to be sure it arrived.
//! - The Docker API has no tls-verify switch: a registry over plain HTTP
//!   works only when the service's registries.conf marks it `insecure`.
//! - After a pull by digest, the image lists `host/repo@sha256:…` in
//!   `RepoDigests` and, unlike Docker, in `RepoTags` too.
//! - Where Docker answers 409 (a container name already in use, removing
//!   a running container), Podman answers 500; `EngineError` recognises
//!   those messages and still says `Conflict`.
//! - Podman ignores the version in the path (`/v1.53/…` works); we still
//!   speak 1.41, the version it implements, so requests mean what Podman
//!   thinks they mean.

mod error;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bollard::auth::DockerCredentials;
use bollard::errors::Error as BollardError;
use bollard::models::{ContainerCreateBody, ContainerStateStatusEnum};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, RemoveContainerOptionsBuilder, RemoveImageOptionsBuilder,
    StopContainerOptionsBuilder,
};
use bollard::{ClientVersion, Docker};
use futures_util::StreamExt as _;

use crate::manifest::PinnedImage;

pub use error::EngineError;

/// Docker API version Podman 4.3 implements.
pub const API_VERSION: ClientVersion = ClientVersion {
    major_version: 1,
    minor_version: 41,
};

/// Per request, until the answer's headers arrive; a pull's progress
/// stream is not limited by it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Added to a stop's grace period: the engine answers only once the
/// container is down.
const STOP_SLACK: Duration = Duration::from_secs(30);

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// A connection to the engine's API socket.
#[derive(Debug, Clone)]
pub struct Engine {
    docker: Docker,
    socket: PathBuf,
}

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
pub struct EngineVersion {
    /// Product version, e.g. `4.3.1`.
    pub version: String,
    /// Docker API version the engine implements, e.g. `1.41`.
    pub api_version: String,
    /// Whether the engine says it is Podman.
    pub podman: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// `sha256:…` of the image config.
    pub id: String,
    /// `host/repo@sha256:…` references the image was pulled by.
    pub repo_digests: Vec<String>,
    pub repo_tags: Vec<String>,
}

/// What to create a container from. Deliberately small: it grows with
/// the orchestrator's needs.
#[derive(Debug, Clone)]
pub struct ContainerSpec {
    pub image: PinnedImage,
    /// Overrides the image's CMD.
    pub cmd: Option<Vec<String>>,
    /// `KEY=value` entries.
    pub env: Vec<String>,
    pub labels: BTreeMap<String, String>,
}

impl ContainerSpec {
    pub fn new(image: PinnedImage) -> ContainerSpec {
        ContainerSpec {
            image,
            cmd: None,
            env: Vec::new(),
            labels: BTreeMap::new(),
        }
    }

    pub fn cmd<S: Into<String>>(mut self, cmd: impl IntoIterator<Item = S>) -> ContainerSpec {
        self.cmd = Some(cmd.into_iter().map(Into::into).collect());
        self
    }

    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> ContainerSpec {
        self.labels.insert(key.into(), value.into());
        self
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerStatus {
    Created,
    Running,
    Paused,
    Restarting,
    Removing,
    Stopping,
    Exited,
    Dead,
    /// The engine reported no status.
    Unknown,
}

impl From<ContainerStateStatusEnum> for ContainerStatus {
    fn from(s: ContainerStateStatusEnum) -> ContainerStatus {
        match s {
            ContainerStateStatusEnum::CREATED => ContainerStatus::Created,
            ContainerStateStatusEnum::RUNNING => ContainerStatus::Running,
            ContainerStateStatusEnum::PAUSED => ContainerStatus::Paused,
            ContainerStateStatusEnum::RESTARTING => ContainerStatus::Restarting,
            ContainerStateStatusEnum::REMOVING => ContainerStatus::Removing,
            ContainerStateStatusEnum::STOPPING => ContainerStatus::Stopping,
            ContainerStateStatusEnum::EXITED => ContainerStatus::Exited,
            ContainerStateStatusEnum::DEAD => ContainerStatus::Dead,
            ContainerStateStatusEnum::EMPTY => ContainerStatus::Unknown,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    pub id: String,
    /// Without Docker's leading `/`.
    pub name: String,
    pub status: ContainerStatus,
    /// Set once the container has run and exited.
    pub exit_code: Option<i64>,
    /// `sha256:…` of the image config the container runs.
    pub image_id: String,
    /// The reference the container was created from.
    pub image: Option<String>,
    pub labels: BTreeMap<String, String>,
}

impl Engine {
    /// Connects to the API socket and checks that an engine answers there.
    pub async fn connect(socket: &Path) -> Result<Engine> {
        let unreachable = |source| EngineError::Unreachable {
            socket: socket.to_path_buf(),
            source,
        };
        // bollard takes the path as text; a path that is not UTF-8 cannot
        // be a socket it could reach.
        let path = socket
            .to_str()
            .ok_or_else(|| unreachable(BollardError::SocketNotFoundError(socket.display().to_string())))?;
        let docker = Docker::connect_with_unix(path, REQUEST_TIMEOUT.as_secs(), &API_VERSION).map_err(unreachable)?;
        let engine = Engine {
            docker,
            socket: socket.to_path_buf(),
        };
        engine.ping().await?;
        Ok(engine)
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn classify<'a, W: FnOnce() -> String + 'a>(&'a self, what: W) -> impl FnOnce(BollardError) -> EngineError + 'a {
        move |err| EngineError::classify(err, Some(&self.socket), what)
    }

    pub async fn ping(&self) -> Result<()> {
        self.docker.ping().await.map_err(self.classify(|| "engine".into()))?;
        Ok(())
    }

    pub async fn version(&self) -> Result<EngineVersion> {
        let v = self.docker.version().await.map_err(self.classify(|| "engine".into()))?;
        let podman = v
            .components
            .iter()
            .flatten()
            .any(|c| c.name.to_ascii_lowercase().contains("podman"));
        Ok(EngineVersion {
            version: v.version.unwrap_or_default(),
            api_version: v.api_version.unwrap_or_default(),
            podman,
        })
    }

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
        let reference = image.by_digest();
        let found = self
            .docker
            .inspect_image(&reference)
            .await
            .map_err(self.classify(|| format!("image {reference}")))?;
        Ok(ImageInfo {
            id: found.id.unwrap_or_default(),
            repo_digests: found.repo_digests.unwrap_or_default(),
            repo_tags: found.repo_tags.unwrap_or_default(),
        })
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

    /// Creates (does not start) container `name`; returns its id.
    pub async fn create_container(&self, name: &str, spec: &ContainerSpec) -> Result<String> {
        let options = CreateContainerOptionsBuilder::new().name(name).build();
        let body = ContainerCreateBody {
            image: Some(spec.image.by_digest()),
            cmd: spec.cmd.clone(),
            env: (!spec.env.is_empty()).then(|| spec.env.clone()),
            labels: (!spec.labels.is_empty()).then(|| {
                spec.labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect::<HashMap<_, _>>()
            }),
            ..Default::default()
        };
        let created = self
            .docker
            .create_container(Some(options), body)
            .await
            .map_err(self.classify(|| format!("container {name}")))?;
        for warning in &created.warnings {
            tracing::warn!(container = name, %warning, "engine warning on create");
        }
        Ok(created.id)
    }

    /// Starts the container; starting a running one is not an error.
    pub async fn start(&self, name: &str) -> Result<()> {
        self.docker
            .start_container(name, None)
            .await
            .map_err(self.classify(|| format!("container {name}")))
    }

    pub async fn inspect(&self, name: &str) -> Result<ContainerInfo> {
        let c = self
            .docker
            .inspect_container(name, None)
            .await
            .map_err(self.classify(|| format!("container {name}")))?;
        let state = c.state.unwrap_or_default();
        let status = state.status.map_or(ContainerStatus::Unknown, ContainerStatus::from);
        let config = c.config.unwrap_or_default();
        Ok(ContainerInfo {
            id: c.id.unwrap_or_default(),
            name: c.name.unwrap_or_default().trim_start_matches('/').to_owned(),
            exit_code: match status {
                ContainerStatus::Exited | ContainerStatus::Dead => state.exit_code,
                _ => None,
            },
            status,
            image_id: c.image.unwrap_or_default(),
            image: config.image,
            labels: config.labels.unwrap_or_default().into_iter().collect(),
        })
    }

    /// Sends the stop signal, then SIGKILL after `grace`; stopping a
    /// stopped container is not an error.
    pub async fn stop(&self, name: &str, grace: Duration) -> Result<()> {
        let secs = i32::try_from(grace.as_secs()).unwrap_or(i32::MAX);
        let options = StopContainerOptionsBuilder::new().t(secs).build();
        // The answer comes only once the container is down.
        let docker = self
            .docker
            .clone()
            .with_timeout(REQUEST_TIMEOUT.max(grace + STOP_SLACK));
        docker
            .stop_container(name, Some(options))
            .await
            .map_err(self.classify(|| format!("container {name}")))
    }

    /// Removes a stopped container; a running one gives `Conflict`.
    pub async fn remove(&self, name: &str) -> Result<()> {
        self.remove_with(name, false).await
    }

    /// Kills the container if it runs, then removes it.
    pub async fn force_remove(&self, name: &str) -> Result<()> {
        self.remove_with(name, true).await
    }

    async fn remove_with(&self, name: &str, force: bool) -> Result<()> {
        let options = RemoveContainerOptionsBuilder::new().force(force).build();
        self.docker
            .remove_container(name, Some(options))
            .await
            .map_err(self.classify(|| format!("container {name}")))
    }
}
