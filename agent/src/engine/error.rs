use std::path::{Path, PathBuf};
use std::time::Duration;

use bollard::errors::Error as BollardError;

/// The cause behind a transport or client failure: bollard's, or the raw
/// client's (hyper, I/O).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What went wrong talking to the engine, sorted by what a caller does
/// about it: retry later (`Unreachable`), create or pull (`NotFound`),
/// adopt or rename (`Conflict`), fix the input (`HostPathMissing`,
/// `InvalidSpec`, `BuildFailed`, `BuildContext`, `NetworkWithoutDns`,
/// `Archive`), report (`PullFailed`, `LoadFailed`, `ExecTimeout`, `Api`,
/// `Decode`, `Client`).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// No engine answers on the socket: not started, wrong path, hung.
    #[error("cannot reach the engine at {}", socket.display())]
    Unreachable {
        socket: PathBuf,
        #[source]
        source: BoxError,
    },
    /// The container, image or network does not exist (HTTP 404).
    #[error("{what} not found")]
    NotFound { what: String },
    /// The request clashes with the current state (HTTP 409), such as a
    /// container name already in use or removing a running container.
    #[error("{what}: {message}")]
    Conflict { what: String, message: String },
    /// The engine answered the pull but could not fetch the image: unknown
    /// manifest, refused credentials, unreachable registry, bad digest.
    #[error("pulling {image} failed: {message}")]
    PullFailed { image: String, message: String },
    /// A host path the container would bind-mount does not exist. Podman
    /// would silently create it as an empty root-owned folder, even where
    /// a secret file belongs, so the engine module refuses first.
    #[error("container {container}: host path {} does not exist", path.display())]
    HostPathMissing { container: String, path: PathBuf },
    /// The spec says something the engine API cannot express faithfully.
    #[error("container {container}: {message}")]
    InvalidSpec { container: String, message: String },
    /// An exec did not finish in time. Its process may still run in the
    /// container: the API has no way to kill it.
    #[error("exec in container {container} did not finish within {}", humantime::format_duration(*timeout))]
    ExecTimeout { container: String, timeout: Duration },
    /// The engine refused or failed the build (bad Containerfile, failing
    /// `RUN`, missing base image).
    #[error("building {tag} from {} failed: {message}", context.display())]
    BuildFailed {
        context: PathBuf,
        tag: String,
        message: String,
    },
    /// The build context could not be read or packed.
    #[error("cannot pack the build context {}", context.display())]
    BuildContext {
        context: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The engine refused or failed to load an image archive: not a
    /// `docker-archive` tarball, a truncated or corrupt layer.
    #[error("loading the image archive {} failed: {message}", archive.display())]
    LoadFailed { archive: PathBuf, message: String },
    /// The image archive could not be opened or read while sending it.
    #[error("cannot read the image archive {}", archive.display())]
    Archive {
        archive: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The network exists but has DNS off (Podman's default `podman`
    /// network, or one created with `--disable-dns`): apps on it could not
    /// reach each other by name.
    #[error("network {network} exists without DNS, so containers on it cannot find each other by name")]
    NetworkWithoutDns { network: String },
    /// Any other refusal by the engine, with its HTTP status.
    #[error("the engine refused the request (HTTP {status}): {message}")]
    Api { status: u16, message: String },
    /// An answer that is not the JSON it should be.
    #[error("cannot decode the engine's answer about {what}: {message}")]
    Decode { what: String, message: String },
    /// The client side failed: an answer that does not decode, a bad request.
    #[error("engine client error")]
    Client(#[source] BoxError),
}

impl EngineError {
    /// Sorts a bollard error. With the engine's `socket`, transport
    /// failures become `Unreachable`; `what` names the object for
    /// `NotFound` and `Conflict`.
    pub(crate) fn classify(err: BollardError, socket: Option<&Path>, what: impl FnOnce() -> String) -> EngineError {
        match err {
            BollardError::DockerResponseServerError { status_code, message } => {
                EngineError::from_status(status_code, message, what)
            }
            err if is_transport(&err) => match socket {
                Some(socket) => EngineError::Unreachable {
                    socket: socket.to_path_buf(),
                    source: Box::new(err),
                },
                None => EngineError::Client(Box::new(err)),
            },
            err => EngineError::Client(Box::new(err)),
        }
    }

    /// Sorts an HTTP refusal, whichever client received it.
    pub(crate) fn from_status(status: u16, message: String, what: impl FnOnce() -> String) -> EngineError {
        match status {
            404 => EngineError::NotFound { what: what() },
            409 => EngineError::Conflict { what: what(), message },
            500 if is_podman_conflict(&message) => EngineError::Conflict { what: what(), message },
            status => EngineError::Api { status, message },
        }
    }
}

/// 404 becomes `NotFound` naming what the engine said; prefer the engine
/// methods, which name the object and know the socket.
impl From<BollardError> for EngineError {
    fn from(err: BollardError) -> EngineError {
        let message = match &err {
            BollardError::DockerResponseServerError { message, .. } => message.clone(),
            other => other.to_string(),
        };
        EngineError::classify(err, None, || message)
    }
}

/// Podman 4.3 reports these state clashes as 500 where Docker uses 409.
const PODMAN_CONFLICT_MESSAGES: &[&str] = &[
    // creating a container under a name in use, renaming onto one
    "is already in use",
    // removing a running container without force, and similar
    "container state improper",
    // creating a network under a name in use
    "network already exists",
];

fn is_podman_conflict(message: &str) -> bool {
    PODMAN_CONFLICT_MESSAGES.iter().any(|m| message.contains(m))
}

fn is_transport(err: &BollardError) -> bool {
    matches!(
        err,
        BollardError::SocketNotFoundError(_)
            | BollardError::HyperLegacyError { .. }
            | BollardError::HyperResponseError { .. }
            | BollardError::IOError { .. }
            | BollardError::RequestTimeoutError
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(status_code: u16, message: &str) -> BollardError {
        BollardError::DockerResponseServerError {
            status_code,
            message: message.to_owned(),
        }
    }

    #[test]
    fn http_404_is_not_found_naming_the_object() {
        let e = EngineError::classify(server(404, "no such container"), None, || "container web".into());
        assert!(
            matches!(&e, EngineError::NotFound { what } if what == "container web"),
            "{e:?}"
        );
        assert_eq!(e.to_string(), "container web not found");
    }

    #[test]
    fn from_keeps_the_engine_message_for_404() {
        let e = EngineError::from(server(404, "no such image"));
        assert!(
            matches!(&e, EngineError::NotFound { what } if what == "no such image"),
            "{e:?}"
        );
    }

    #[test]
    fn http_409_and_podmans_500_for_a_state_clash_are_conflicts_other_500s_api_errors() {
        let e = EngineError::classify(server(409, "name in use"), None, || "container web".into());
        assert!(matches!(e, EngineError::Conflict { .. }), "{e:?}");
        let e = EngineError::from(server(
            500,
            "cannot remove container x as it is running: container state improper",
        ));
        assert!(matches!(e, EngineError::Conflict { .. }), "{e:?}");
        let e = EngineError::from_status(
            500,
            "network name n already used: network already exists".into(),
            || "network n".into(),
        );
        assert!(matches!(e, EngineError::Conflict { .. }), "{e:?}");
        let e = EngineError::from(server(500, "boom"));
        assert!(matches!(e, EngineError::Api { status: 500, .. }), "{e:?}");
    }

    #[test]
    fn transport_failures_are_unreachable_only_when_the_socket_is_known() {
        let socket = Path::new("/run/x.sock");
        let e = EngineError::classify(BollardError::RequestTimeoutError, Some(socket), String::new);
        assert!(
            matches!(&e, EngineError::Unreachable { socket: s, .. } if s == socket),
            "{e:?}"
        );
        let e = EngineError::from(BollardError::RequestTimeoutError);
        assert!(matches!(e, EngineError::Client(_)), "{e:?}");
    }
}
