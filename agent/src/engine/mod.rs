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
//! - Podman 4.3's log `tail` reads the log file backwards in blocks and
//!   garbles a line that crosses a block boundary (`line-922li`, `ne-923`);
//!   [`Engine::logs_capped`] counts lines itself from the whole stream.
//! - conmon reads stdout and stderr separately: their interleaving in the
//!   logs is not the order in which they were written.

mod build;
mod create;
mod error;
mod exec;
mod images;
mod load;
pub(crate) mod model;
mod network;
mod pause;
mod raw;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use bollard::errors::Error as BollardError;
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, KillContainerOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder,
    RenameContainerOptionsBuilder, StopContainerOptionsBuilder,
};
use bollard::{ClientVersion, Docker};
use futures_util::{Stream, StreamExt as _};

use crate::spec::ContainerSpec;

pub use error::{BoxError, EngineError};
pub use exec::ExecOutput;
pub use images::{ImageInfo, RegistryAuth};
pub use model::{ContainerInfo, ContainerStatus, ContainerSummary, EngineEvent, EventKind, Listing, Unobservable};

/// The last lines of a log, as they stream in: at most `tail` lines, of
/// which the oldest are left out (whole) while they hold more than
/// `max_bytes`.
struct LogWindow {
    tail: usize,
    max_bytes: usize,
    /// Each line's length, and its bytes unless left out for the cap.
    /// Left-out lines are always the oldest: the first `left_out`.
    lines: std::collections::VecDeque<(usize, Option<Vec<u8>>)>,
    left_out: usize,
    kept_bytes: usize,
    /// A line still waiting for its newline.
    partial: Vec<u8>,
}

impl LogWindow {
    fn new(tail: usize, max_bytes: usize) -> LogWindow {
        LogWindow {
            tail,
            max_bytes,
            lines: std::collections::VecDeque::new(),
            left_out: 0,
            kept_bytes: 0,
            partial: Vec::new(),
        }
    }

    fn push(&mut self, mut bytes: &[u8]) {
        while let Some(nl) = bytes.iter().position(|b| *b == b'\n') {
            self.partial.extend_from_slice(&bytes[..=nl]);
            let line = std::mem::take(&mut self.partial);
            self.add(line);
            bytes = &bytes[nl + 1..];
        }
        self.partial.extend_from_slice(bytes);
    }

    fn add(&mut self, line: Vec<u8>) {
        if self.tail == 0 {
            return;
        }
        self.kept_bytes += line.len();
        self.lines.push_back((line.len(), Some(line)));
        if self.lines.len() > self.tail {
            match self.lines.pop_front() {
                Some((_, Some(old))) => self.kept_bytes -= old.len(),
                Some((_, None)) => self.left_out -= 1,
                None => {}
            }
        }
        while self.kept_bytes > self.max_bytes {
            let Some((_, content)) = self.lines.get_mut(self.left_out) else {
                break;
            };
            self.kept_bytes -= content.take().map_or(0, |c| c.len());
            self.left_out += 1;
        }
    }

    fn finish(mut self) -> CappedLogs {
        if !self.partial.is_empty() {
            let last = std::mem::take(&mut self.partial);
            self.add(last);
        }
        let dropped_bytes = self.lines.iter().take(self.left_out).map(|(n, _)| *n as u64).sum();
        let bytes: Vec<u8> = self.lines.into_iter().filter_map(|(_, c)| c).flatten().collect();
        CappedLogs {
            text: String::from_utf8_lossy(&bytes).into_owned(),
            dropped_bytes,
        }
    }
}

/// What [`Engine::logs_capped`] read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CappedLogs {
    pub text: String,
    /// Bytes left out from the front to keep within the cap (0: none).
    pub dropped_bytes: u64,
}

use raw::{encode, RawClient};

/// Docker API version Podman 4.3 implements.
pub const API_VERSION: ClientVersion = ClientVersion {
    major_version: 1,
    minor_version: 41,
};
/// The same, as a path prefix for the raw client.
const API_PREFIX: &str = "/v1.41";
/// Podman's own API, for what the Docker API does not say (a network's
/// DNS flag, a listing that does not fail on one container). Podman 4.x
/// serves it under any 4.x version.
const LIBPOD_PREFIX: &str = "/v4.0.0/libpod";

/// Per request, until the answer's headers arrive; a pull's progress
/// stream is not limited by it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Added to a stop's grace period: the engine answers only once the
/// container is down.
const STOP_SLACK: Duration = Duration::from_secs(30);
/// What `force_remove` sends first.
const KILL_SIGNAL: &str = "KILL";

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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineVersion {
    /// Product version, e.g. `4.3.1`.
    pub version: String,
    /// Docker API version the engine implements, e.g. `1.41`.
    pub api_version: String,
    /// Whether the engine says it is Podman.
    pub podman: bool,
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

    // ---- containers ------------------------------------------------------

    /// Every container, whatever its state. Read by the raw client: a
    /// state bollard does not know (Podman's `stopped`) must not fail the
    /// whole listing.
    ///
    /// Podman 4.3's Docker-compatible listing inspects every container and
    /// fails as a whole (HTTP 500 "getting container from store …:
    /// container not known") when one container's record is gone from the
    /// storage library (another engine on the same storage removed it).
    /// Then the listing is read from Podman's own API, which does not look
    /// into the storage library, and each container is inspected: those
    /// that cannot be are in [`Listing::unobservable`] with the engine's
    /// error, every other one is listed. Only an engine that cannot be
    /// reached, or a refusal of both listings, fails the whole call.
    pub async fn list(&self) -> Result<Listing> {
        let what = "the container list";
        let compat = self
            .raw
            .get_json(&format!("{API_PREFIX}/containers/json?all=true"), what)
            .await;
        let refusal = match compat {
            Ok(value) => {
                return Ok(Listing {
                    containers: model::parse_summaries(&value)?,
                    unobservable: Vec::new(),
                })
            }
            Err(e @ EngineError::Api { .. }) => e,
            Err(e) => return Err(e),
        };
        tracing::warn!(error = %refusal, "the engine cannot list its containers as a whole; listing them one by one");
        let value = self
            .raw
            .get_json(&format!("{LIBPOD_PREFIX}/containers/json?all=true"), what)
            .await?;
        let candidates = model::parse_summaries(&value)?;
        let mut inspected = Vec::with_capacity(candidates.len());
        for c in candidates {
            let result = self.inspect(&c.id).await;
            inspected.push((c, result));
        }
        Ok(Listing::from_inspected(inspected))
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

    /// The container's output as it comes, stdout and stderr interleaved:
    /// the last `tail` lines (`None`: all of it; see [`Engine::logs_capped`]
    /// for a line count that is always right), and with `follow` what it
    /// writes from then on, until it stops. The one way the agent reads
    /// logs: [`Engine::logs_capped`] collects it, `archy-agent logs --all`
    /// and `--follow` copy it to the terminal.
    pub fn log_stream<'a>(
        &'a self,
        name: &'a str,
        tail: Option<usize>,
        follow: bool,
    ) -> impl Stream<Item = Result<bytes::Bytes>> + Send + 'a {
        let tail = tail.map_or_else(|| "all".to_owned(), |n| n.to_string());
        let options = LogsOptionsBuilder::new()
            .stdout(true)
            .stderr(true)
            .follow(follow)
            .tail(&tail)
            .build();
        self.docker.logs(name, Some(options)).map(move |chunk| {
            chunk
                .map(|c| c.into_bytes())
                .map_err(self.classify(|| format!("container {name}")))
        })
    }

    /// The container's output so far, lossily decoded; the last `tail`
    /// lines, or all of it.
    pub async fn logs(&self, name: &str, tail: Option<usize>) -> Result<String> {
        Ok(self.logs_capped(name, tail, usize::MAX).await?.text)
    }

    /// The last `tail` lines of the container's output (`None`: all), of
    /// which at most the last `max_bytes` worth of whole lines are kept;
    /// `dropped_bytes` says how much of those `tail` lines was left out.
    /// The engine sends the whole log and the lines are counted here:
    /// Podman 4.3's own `tail` garbles a line that crosses one of its read
    /// blocks. Memory stays within `max_bytes` plus a length per line.
    pub async fn logs_capped(&self, name: &str, tail: Option<usize>, max_bytes: usize) -> Result<CappedLogs> {
        let mut chunks = std::pin::pin!(self.log_stream(name, None, false));
        let mut window = LogWindow::new(tail.unwrap_or(usize::MAX), max_bytes);
        while let Some(chunk) = chunks.next().await {
            window.push(&chunk?);
        }
        Ok(window.finish())
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

#[cfg(test)]
mod log_window_tests {
    use super::LogWindow;

    fn window(tail: usize, max: usize, chunks: &[&str]) -> (String, u64) {
        let mut w = LogWindow::new(tail, max);
        for c in chunks {
            w.push(c.as_bytes());
        }
        let r = w.finish();
        (r.text, r.dropped_bytes)
    }

    #[test]
    fn the_window_keeps_the_last_lines_across_chunk_boundaries() {
        assert_eq!(window(2, 100, &["a\nb", "b\nc", "c\n"]), ("bb\ncc\n".to_owned(), 0));
        assert_eq!(window(usize::MAX, 100, &["a\nb"]), ("a\nb".to_owned(), 0));
        assert_eq!(window(0, 100, &["a\n"]), (String::new(), 0));
    }

    #[test]
    fn over_the_cap_the_oldest_whole_lines_of_the_tail_are_left_out_and_counted() {
        // Tail 3 of five lines: "333\n4444\n55555\n" is 15 bytes; 11 fit.
        let (text, dropped) = window(3, 11, &["1\n22\n333\n4444\n55555\n"]);
        assert_eq!(text, "4444\n55555\n");
        assert_eq!(dropped, 4, "only the tail's own lines count as dropped");
        // One line alone over the cap leaves nothing, and says so.
        assert_eq!(window(5, 3, &["12345\n"]), (String::new(), 6));
    }
}

#[cfg(test)]
mod tests {
    //! The listing's fallback at the seam: an engine on a socket of the
    //! test's own, answering as Podman 4.3.1 did when one container's
    //! record was gone from its storage library.

    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    const NOT_KNOWN: &str = r#"{"cause":"container not known","message":"getting container from store \"bbbb\": container not known","response":500}"#;

    /// Serves canned answers on a unix socket: `answer(path)` gives the
    /// status and the body.
    fn serve(socket: &Path, answer: fn(&str) -> (u16, String)) -> tokio::task::JoinHandle<()> {
        let listener = tokio::net::UnixListener::bind(socket).expect("bind");
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&head);
                    let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
                    let (status, body) = answer(&path);
                    let reply = format!(
                        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(reply.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        })
    }

    fn summary(id: &str, name: &str, state: &str) -> String {
        format!(
            r#"{{"Id":"{id}","Names":["{name}"],"State":"{state}","Status":"","ExitCode":0,"Labels":{{"io.archipelago.managed-by":"archipelago"}},"Image":"img","ImageID":"sha256:1"}}"#
        )
    }

    /// Podman 4.3.1 with container `broken` (id `bbbb`) gone from its
    /// storage library, and `gone` removed between listing and inspect.
    fn one_broken(path: &str) -> (u16, String) {
        match path {
            p if p.ends_with("/_ping") => (200, "OK".to_owned()),
            "/v1.41/containers/json?all=true" => (500, NOT_KNOWN.to_owned()),
            "/v4.0.0/libpod/containers/json?all=true" => (
                200,
                format!(
                    "[{},{},{}]",
                    summary("aaaa", "fine", "running"),
                    summary("bbbb", "broken", "exited"),
                    summary("cccc", "gone", "running")
                ),
            ),
            "/v1.41/containers/aaaa/json" => (
                200,
                r#"{"Id":"aaaa","Name":"/fine","State":{"Status":"running"}}"#.to_owned(),
            ),
            "/v1.41/containers/bbbb/json" => (500, NOT_KNOWN.to_owned()),
            _ => (404, r#"{"message":"no such container"}"#.to_owned()),
        }
    }

    /// Both listings refused: nothing to go on.
    fn both_refused(path: &str) -> (u16, String) {
        match path {
            p if p.ends_with("/_ping") => (200, "OK".to_owned()),
            _ => (500, NOT_KNOWN.to_owned()),
        }
    }

    #[tokio::test]
    async fn one_container_the_engine_cannot_describe_is_set_apart_and_the_rest_listed() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let socket = tmp.path().join("engine.sock");
        let server = serve(&socket, one_broken);
        let engine = Engine::connect(&socket).await.expect("connect");
        let listing = engine.list().await.expect("listed despite one broken container");
        let names: Vec<&str> = listing.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["fine"], "gone since the listing: left out");
        assert_eq!(listing.containers[0].status, ContainerStatus::Running);
        assert_eq!(listing.unobservable.len(), 1, "{listing:?}");
        let u = &listing.unobservable[0];
        assert_eq!((u.id.as_str(), u.name.as_str()), ("bbbb", "broken"));
        assert!(
            u.error.contains("HTTP 500") && u.error.contains("container not known"),
            "{}",
            u.error
        );
        server.abort();

        let socket = tmp.path().join("refusing.sock");
        let server = serve(&socket, both_refused);
        let engine = Engine::connect(&socket).await.expect("connect");
        let err = engine.list().await.expect_err("no listing at all");
        assert!(matches!(err, EngineError::Api { status: 500, .. }), "{err:?}");
        server.abort();
    }
}
