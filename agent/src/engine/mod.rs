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
//!   agent's types: [`PinnedImage`] and [`ContainerSpec`] in,
//!   [`ContainerInfo`] out.
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
//! - States and event types Docker never reports: a container is `stopped`
//!   for a moment between `running` and `exited` (its process ended,
//!   conmon's cleanup has not run), and events have `"Type": "pod"`.
//!   bollard's closed enums fail a whole answer on them, so listing,
//!   inspecting and events go through a small raw client (`raw`) and a
//!   lenient reader (`model`).
//! - Bind mounts whose host path is missing are created by Podman as empty
//!   root-owned folders, even when the create then fails. [`Engine::create`]
//!   checks the paths first.
//! - Inspect reports capabilities relative to Podman's default set:
//!   `CapDrop: ["ALL"]` reads back as the list of default capabilities, and
//!   an added one that is in the default set does not show in `CapAdd`.
//!   `NetworkMode` reads back as `bridge`; the network's name is the key of
//!   `NetworkSettings.Networks`. An absent entrypoint reads back as `[]`.
//! - A read-only root gets tmpfs on `/tmp`, `/var/tmp` and `/run`
//!   (containers.conf `read_only_tmpfs`, on by default, and always on
//!   through this API).
//! - A forced removal first stops the container with its own stop timeout
//!   (SIGTERM, wait, SIGKILL); [`Engine::force_remove`] kills it first.
//! - A create with a missing network answers 500 "network not found";
//!   [`Engine::create`] says `NotFound` naming the network.
//! - Networks made through this API are bridges with DNS (aardvark-dns);
//!   Podman's default `podman` network has DNS off. Only Podman's own API
//!   (`/libpod/networks/{name}/json`) tells which.
//! - An exec through this API keeps its session, and two conmon processes,
//!   for containers.conf's `exit_command_delay` (5 minutes by default,
//!   Docker's exec lifetime), even after the container is removed. The
//!   exit code must be read before that delay ends; a smaller delay (a few
//!   seconds) keeps frequent health checks from piling up processes.
//! - A load (`POST /images/load`) answers only once the whole archive is
//!   received and stored (Podman copies the body to a temporary file
//!   first), with one `{"stream": "Loaded image: a,b"}`; a refusal is a
//!   500. [`Engine::load_image`] waits longer than other requests for it.
//! - conmon reads stdout and stderr separately: their interleaving in the
//!   logs is not the order in which they were written.

mod build;
mod create;
mod error;
mod load;
pub(crate) mod model;
mod pause;
mod raw;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use bollard::auth::DockerCredentials;
use bollard::errors::Error as BollardError;
use bollard::exec::{StartExecOptions, StartExecResults};
use bollard::models::{ExecConfig, NetworkCreateRequest};
use bollard::query_parameters::{
    BuildImageOptionsBuilder, CreateContainerOptionsBuilder, CreateImageOptionsBuilder, ImportImageOptionsBuilder,
    KillContainerOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder, RemoveImageOptionsBuilder,
    RenameContainerOptionsBuilder, StopContainerOptionsBuilder,
};
use bollard::{ClientVersion, Docker};
use futures_util::{Stream, StreamExt as _};
use serde_json::Value;

use crate::manifest::PinnedImage;
use crate::spec::ContainerSpec;

pub use error::{BoxError, EngineError};
pub use model::{ContainerInfo, ContainerStatus, ContainerSummary, EngineEvent, EventKind};

use raw::{encode, RawClient};

/// Docker API version Podman 4.3 implements.
pub const API_VERSION: ClientVersion = ClientVersion {
    major_version: 1,
    minor_version: 41,
};
/// The same, as a path prefix for the raw client.
const API_PREFIX: &str = "/v1.41";
/// Podman's own API, for what the Docker API does not say (a network's
/// DNS flag). Podman 4.x serves it under any 4.x version.
const LIBPOD_PREFIX: &str = "/v4.0.0/libpod";

/// Per request, until the answer's headers arrive; a pull's progress
/// stream is not limited by it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a load may take until the engine answers: it answers only
/// after storing every layer, and archives run to gigabytes.
const LOAD_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Added to a stop's grace period: the engine answers only once the
/// container is down.
const STOP_SLACK: Duration = Duration::from_secs(30);
/// Output an exec keeps; the rest is read and dropped, so that a chatty
/// command cannot exhaust the agent's memory.
const MAX_EXEC_OUTPUT: usize = 1 << 20;
/// Between polls for an exec's exit code, which Podman may set a moment
/// after the output ends.
const EXEC_POLL: Duration = Duration::from_millis(50);
/// What `force_remove` sends first.
const KILL_SIGNAL: &str = "KILL";
/// The driver of the networks the agent creates: the only one with DNS.
const NETWORK_DRIVER: &str = "bridge";

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// The engine's events, as they happen. Ends when the engine closes the
/// connection (a restart) or after its first error.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<EngineEvent>> + Send>>;

/// A connection to the engine's API socket.
#[derive(Debug, Clone)]
pub struct Engine {
    docker: Docker,
    raw: RawClient,
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

/// What a command run in a container printed, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub exit_code: i64,
    /// stdout and stderr interleaved as they came, lossily decoded, cut
    /// after 1 MiB.
    pub output: String,
}

impl Engine {
    /// Connects to the API socket and checks that an engine answers there.
    pub async fn connect(socket: &Path) -> Result<Engine> {
        let unreachable = |source: BollardError| EngineError::Unreachable {
            socket: socket.to_path_buf(),
            source: Box::new(source),
        };
        // bollard takes the path as text; a path that is not UTF-8 cannot
        // be a socket it could reach.
        let path = socket
            .to_str()
            .ok_or_else(|| unreachable(BollardError::SocketNotFoundError(socket.display().to_string())))?;
        let docker = Docker::connect_with_unix(path, REQUEST_TIMEOUT.as_secs(), &API_VERSION).map_err(unreachable)?;
        let engine = Engine {
            docker,
            raw: RawClient::new(socket, REQUEST_TIMEOUT),
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

    // ---- images ----------------------------------------------------------

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

    // ---- containers ------------------------------------------------------

    /// Every container, whatever its state. Read by the raw client: a
    /// state bollard does not know (Podman's `stopped`) must not fail the
    /// whole listing.
    pub async fn list(&self) -> Result<Vec<ContainerSummary>> {
        let what = "the container list";
        let value = self
            .raw
            .get_json(&format!("{API_PREFIX}/containers/json?all=true"), what)
            .await?;
        model::parse_summaries(&value)
    }

    /// One container, by name or id; `NotFound` when absent.
    pub async fn inspect(&self, name: &str) -> Result<ContainerInfo> {
        let what = format!("container {name}");
        let value = self
            .raw
            .get_json(&format!("{API_PREFIX}/containers/{}/json", encode(name)), &what)
            .await?;
        model::parse_inspect(&value, &what)
    }

    /// Creates (does not start) `spec.name` as `spec` says; returns its id.
    ///
    /// Every bind-mounted host path must exist (`HostPathMissing` names the
    /// first that does not), and the network too (`NotFound` names it; see
    /// [`Engine::ensure_network`]). A missing image is `NotFound` naming
    /// the image; a name in use is `Conflict`.
    pub async fn create(&self, spec: &ContainerSpec) -> Result<String> {
        let body = create::create_body(spec)?;
        create::check_host_paths(spec)?;
        let options = CreateContainerOptionsBuilder::new().name(&spec.name).build();
        let created = self.docker.create_container(Some(options), body).await.map_err(|err| {
            match self.classify(|| format!("container {}", spec.name))(err) {
                // Podman answers 404 only when the image is missing.
                EngineError::NotFound { .. } => EngineError::NotFound {
                    what: format!("image {}", spec.image),
                },
                EngineError::Api { message, .. } if message.contains("network not found") => EngineError::NotFound {
                    what: format!("network {}", spec.network),
                },
                other => other,
            }
        })?;
        for warning in &created.warnings {
            tracing::warn!(container = %spec.name, %warning, "engine warning on create");
        }
        Ok(created.id)
    }

    /// Renames a container; `Conflict` when `new_name` is taken.
    pub async fn rename(&self, name: &str, new_name: &str) -> Result<()> {
        let options = RenameContainerOptionsBuilder::new().name(new_name).build();
        self.docker
            .rename_container(name, options)
            .await
            .map_err(self.classify(|| format!("container {name}")))
    }

    /// Starts the container; starting a running one is not an error.
    pub async fn start(&self, name: &str) -> Result<()> {
        self.docker
            .start_container(name, None)
            .await
            .map_err(self.classify(|| format!("container {name}")))
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
        // Podman's forced removal stops the container first, giving it its
        // full stop timeout; SIGKILL first makes it as immediate as Docker's.
        let options = KillContainerOptionsBuilder::new().signal(KILL_SIGNAL).build();
        match self
            .docker
            .kill_container(name, Some(options))
            .await
            .map_err(self.classify(|| format!("container {name}")))
        {
            // Conflict: it was not running.
            Ok(()) | Err(EngineError::Conflict { .. }) => {}
            Err(e @ (EngineError::NotFound { .. } | EngineError::Unreachable { .. })) => return Err(e),
            // The removal below forces its way anyway.
            Err(e) => tracing::debug!(container = name, error = %e, "kill before forced removal failed"),
        }
        self.remove_with(name, true).await
    }

    async fn remove_with(&self, name: &str, force: bool) -> Result<()> {
        let options = RemoveContainerOptionsBuilder::new().force(force).build();
        self.docker
            .remove_container(name, Some(options))
            .await
            .map_err(self.classify(|| format!("container {name}")))
    }

    /// The container's output so far, stdout and stderr interleaved,
    /// lossily decoded; the last `tail` lines, or all of it.
    pub async fn logs(&self, name: &str, tail: Option<usize>) -> Result<String> {
        let tail = tail.map_or_else(|| "all".to_owned(), |n| n.to_string());
        let options = LogsOptionsBuilder::new().stdout(true).stderr(true).tail(&tail).build();
        let mut chunks = self.docker.logs(name, Some(options));
        let mut bytes = Vec::new();
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(self.classify(|| format!("container {name}")))?;
            bytes.extend_from_slice(&chunk.into_bytes());
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Runs `cmd` in the running container and waits for it, at most
    /// `timeout` (`ExecTimeout`; the process may live on, as the API cannot
    /// kill it).
    pub async fn exec(&self, name: &str, cmd: &[String], timeout: Duration) -> Result<ExecOutput> {
        tokio::time::timeout(timeout, self.exec_to_end(name, cmd))
            .await
            .map_err(|_| EngineError::ExecTimeout {
                container: name.to_owned(),
                timeout,
            })?
    }

    async fn exec_to_end(&self, name: &str, cmd: &[String]) -> Result<ExecOutput> {
        let what = || format!("container {name}");
        let config = ExecConfig {
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            cmd: Some(cmd.to_vec()),
            ..Default::default()
        };
        let created = self
            .docker
            .create_exec(name, config)
            .await
            .map_err(self.classify(what))?;
        let options = StartExecOptions {
            detach: false,
            tty: false,
            output_capacity: None,
        };
        let started = self
            .docker
            .start_exec(&created.id, Some(options))
            .await
            .map_err(self.classify(what))?;
        let mut output = Vec::new();
        if let StartExecResults::Attached { output: mut chunks, .. } = started {
            while let Some(chunk) = chunks.next().await {
                let chunk = chunk.map_err(self.classify(what))?.into_bytes();
                let room = MAX_EXEC_OUTPUT.saturating_sub(output.len());
                output.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
        }
        // The caller's timeout bounds this wait.
        loop {
            let inspected = match self.docker.inspect_exec(&created.id).await {
                Ok(inspected) => inspected,
                Err(err) => {
                    return Err(match self.classify(what)(err) {
                        // Podman removes an ended exec session after
                        // containers.conf's exit_command_delay.
                        EngineError::NotFound { .. } => EngineError::Api {
                            status: 404,
                            message: format!(
                                "the exec session in container {name} was removed before its exit code was read \
                                 (is exit_command_delay 0 in containers.conf?)"
                            ),
                        },
                        other => other,
                    });
                }
            };
            match (inspected.running, inspected.exit_code) {
                (Some(true), _) | (_, None) => tokio::time::sleep(EXEC_POLL).await,
                (_, Some(exit_code)) => {
                    return Ok(ExecOutput {
                        exit_code,
                        output: String::from_utf8_lossy(&output).into_owned(),
                    })
                }
            }
        }
    }

    // ---- networks --------------------------------------------------------

    /// Creates bridge network `name`, with DNS between its containers, if
    /// there is none; true when it created it. An existing network with DNS
    /// off is `NetworkWithoutDns`: apps on it could not reach each other by
    /// name.
    pub async fn ensure_network(&self, name: &str) -> Result<bool> {
        match self.network_has_dns(name).await {
            Ok(true) => return Ok(false),
            Ok(false) => {
                return Err(EngineError::NetworkWithoutDns {
                    network: name.to_owned(),
                })
            }
            Err(EngineError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        // The Docker API's create turns DNS on for bridge networks.
        let request = NetworkCreateRequest {
            name: name.to_owned(),
            driver: Some(NETWORK_DRIVER.to_owned()),
            ..Default::default()
        };
        match self.docker.create_network(request).await {
            Ok(created) => {
                if !created.warning.is_empty() {
                    tracing::warn!(network = name, warning = %created.warning, "engine warning on network create");
                }
                Ok(true)
            }
            Err(err) => match self.classify(|| format!("network {name}"))(err) {
                // Someone else created it in between: theirs must do.
                EngineError::Conflict { .. } => match self.network_has_dns(name).await? {
                    true => Ok(false),
                    false => Err(EngineError::NetworkWithoutDns {
                        network: name.to_owned(),
                    }),
                },
                other => Err(other),
            },
        }
    }

    /// Whether network `name` resolves container names. Only Podman's own
    /// API says so (`dns_enabled`).
    async fn network_has_dns(&self, name: &str) -> Result<bool> {
        let what = format!("network {name}");
        let value = self
            .raw
            .get_json(&format!("{LIBPOD_PREFIX}/networks/{}/json", encode(name)), &what)
            .await?;
        Ok(value.get("dns_enabled").and_then(Value::as_bool).unwrap_or(false))
    }

    // ---- events ----------------------------------------------------------

    /// The engine's events from now on, filtered the Docker way (`type`,
    /// `event`, `label`, `container`, …; values within a key are ORed).
    /// Read by the raw client: Podman's `pod` events are kept as
    /// [`EventKind::Pod`] instead of failing the stream.
    pub async fn events(&self, filters: &BTreeMap<String, Vec<String>>) -> Result<EventStream> {
        let mut path = format!("{API_PREFIX}/events");
        if !filters.is_empty() {
            let json = serde_json::to_string(filters).map_err(|e| EngineError::Client(Box::new(e)))?;
            path.push_str("?filters=");
            path.push_str(&encode(&json));
        }
        let lines = self.raw.get_lines(&path, "the event stream").await?;
        Ok(Box::pin(
            lines.map(|line| line.and_then(|value| model::parse_event(&value))),
        ))
    }
}

/// An image ID without its `sha256:` prefix, as engines write it either way.
fn strip_sha256(id: &str) -> &str {
    id.strip_prefix("sha256:").unwrap_or(id)
}
