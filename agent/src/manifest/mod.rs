//! App manifests: parsing and validation, with no effects beyond reading
//! files.
//!
//! `manifests/<id>/manifest.yml` is read by both the image builder and the
//! node agent. [`load_dir`] returns every valid app and every error, so one
//! bad manifest never hides another; the format is documented in
//! `docs/manifest.md`.

mod error;
mod image_ref;
mod load;
mod naming;
mod raw;
mod set;
pub mod template;
mod validate;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

pub use error::ManifestError;
pub use image_ref::{Digest, ImageRefError, PinnedImage, DEFAULT_REGISTRY};
pub use load::{load_dir, load_file, LoadOptions, LoadReport, MANIFEST_FILE, MAX_MANIFEST_BYTES};
pub use naming::{Naming, NamingError, DEFAULT_DEV_PORT_OFFSET};
pub use set::start_order;

/// The network every app joins unless it names another.
pub const DEFAULT_NETWORK: &str = "archy-net";

/// The IPv4 subnet of [`DEFAULT_NETWORK`], fixed so that config files can
/// name it (bitcoind's `rpcallowip`, through `facts.network_subnet`). It
/// lies in the pool Podman takes its own networks from (10.89.0.0/16), far
/// above the /24s it hands out in order from 10.89.0.0/24, so it meets
/// neither a LAN nor another Podman network in practice.
pub const DEFAULT_NETWORK_SUBNET: &str = "10.89.200.0/24";

/// The fixed subnet of `network`, which the agent creates it with and
/// templates read as `facts.network_subnet`: only [`DEFAULT_NETWORK`] has
/// one; another network gets whatever subnet Podman picks.
pub fn network_subnet(network: &str) -> Option<&'static str> {
    (network == DEFAULT_NETWORK).then_some(DEFAULT_NETWORK_SUBNET)
}

/// A validated app identifier: lowercase letters, digits and '-', starting
/// with a letter, at most 63 characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(into = "String")]
pub struct AppId(String);

impl AppId {
    pub const MAX_LEN: usize = 63;

    pub fn parse(s: &str) -> Option<AppId> {
        let ok = (1..=Self::MAX_LEN).contains(&s.len())
            && s.as_bytes()[0].is_ascii_lowercase()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        ok.then(|| AppId(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<AppId> for String {
    fn from(id: AppId) -> String {
        id.0
    }
}

impl std::fmt::Display for AppId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::borrow::Borrow<str> for AppId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AppKind {
    Service,
    Ui,
}

impl std::fmt::Display for AppKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AppKind::Service => "service",
            AppKind::Ui => "ui",
        })
    }
}

/// Where an app's image comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageSource {
    /// Pulled (or imported) by digest.
    Pinned(PinnedImage),
    /// Built from a context inside the app's folder.
    Build {
        /// Absolute path of the build context.
        context: PathBuf,
        /// Containerfile, relative to the context.
        containerfile: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PortMapping {
    pub host: u16,
    pub container: u16,
    pub protocol: Protocol,
}

/// Where a volume's host side lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeSource {
    /// A relative path under `<data root>/<id>/`.
    AppData(PathBuf),
    /// An absolute path, already checked to lie inside the data root.
    Absolute(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VolumeMount {
    pub source: VolumeSource,
    pub target: String,
    pub read_only: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SecretKind {
    /// 16 random bytes, hex encoded.
    Hex16,
    /// 32 random bytes, hex encoded.
    Hex32,
}

impl SecretKind {
    /// How many random bytes the secret holds.
    pub fn bytes(self) -> usize {
        match self {
            SecretKind::Hex16 => 16,
            SecretKind::Hex32 => 32,
        }
    }
}

impl std::fmt::Display for SecretKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SecretKind::Hex16 => "hex16",
            SecretKind::Hex32 => "hex32",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SecretSpec {
    pub name: String,
    pub kind: SecretKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SecretEnv {
    pub key: String,
    pub secret: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Security {
    /// Capabilities kept; every other one is dropped. Upper case, no `CAP_`.
    pub capabilities_add: Vec<String>,
    pub read_only_root: bool,
    pub no_new_privileges: bool,
}

impl Default for Security {
    fn default() -> Self {
        Security {
            capabilities_add: Vec::new(),
            read_only_root: true,
            no_new_privileges: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Probe {
    /// `target` is a path (`/health`) or a full `http://` URL, kept as written.
    Http {
        port: u16,
        target: String,
    },
    Tcp {
        port: u16,
    },
    Exec {
        command: Vec<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Health {
    pub probe: Probe,
    #[serde(with = "humantime_serde_secs")]
    pub interval: Duration,
    #[serde(with = "humantime_serde_secs")]
    pub timeout: Duration,
    pub retries: u32,
    #[serde(with = "humantime_serde_secs")]
    pub start_period: Duration,
}

/// A config file rendered into the app's data folder before its
/// container starts, and again on every reconcile pass.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConfigFile {
    /// Relative to the app's data folder `<data root>/<id>/`, inside one
    /// of its volumes.
    pub path: PathBuf,
    /// Permission bits, such as `0o600`.
    pub mode: u32,
    /// A minijinja template (see [`template`]).
    pub template: String,
    /// The declared secrets the template reads.
    pub secrets: Vec<String>,
}

/// A validated app manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Manifest {
    pub id: AppId,
    pub name: String,
    pub version: String,
    pub kind: AppKind,
    pub container_name: Option<String>,
    pub depends_on: Vec<AppId>,
    pub image: ImageSource,
    pub entrypoint: Option<Vec<String>>,
    pub command: Option<Vec<String>>,
    pub user: Option<String>,
    pub network: String,
    pub ports: Vec<PortMapping>,
    pub volumes: Vec<VolumeMount>,
    pub env: BTreeMap<String, String>,
    pub secret_env: Vec<SecretEnv>,
    pub secrets: Vec<SecretSpec>,
    /// Memory limit in bytes.
    pub memory: Option<u64>,
    pub security: Security,
    pub health: Option<Health>,
    #[serde(with = "humantime_serde_secs")]
    pub stop_grace_period: Duration,
    /// Config files rendered from templates.
    pub files: Vec<ConfigFile>,
    /// The manifest file this came from.
    pub path: PathBuf,
}

impl Manifest {
    /// Numeric owner from `user` ("1000" or "1000:1000"): data and
    /// config files follow it.
    pub fn owner(&self) -> Option<(u32, u32)> {
        let user = self.user.as_deref()?;
        let (u, g) = user.split_once(':').unwrap_or((user, user));
        Some((u.parse().ok()?, g.parse().ok()?))
    }

    /// The pinned image, when the app does not build its own.
    pub fn pinned_image(&self) -> Option<&PinnedImage> {
        match &self.image {
            ImageSource::Pinned(p) => Some(p),
            ImageSource::Build { .. } => None,
        }
    }
}

/// Durations serialize as whole seconds with an `s`, like the manifest says them.
mod humantime_serde_secs {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

/// A valid app named `name` that depends on `deps`, for unit tests that
/// need whole manifests without parsing YAML.
#[cfg(test)]
#[allow(clippy::expect_used)]
pub(crate) fn test_app(name: &str, deps: &[&str]) -> Manifest {
    let id = |s: &str| AppId::parse(s).expect("test ids are valid");
    Manifest {
        id: id(name),
        name: name.to_owned(),
        version: "1".to_owned(),
        kind: AppKind::Service,
        container_name: None,
        depends_on: deps.iter().map(|d| id(d)).collect(),
        image: ImageSource::Build {
            context: PathBuf::from(format!("/apps/{name}")),
            containerfile: PathBuf::from("Containerfile"),
        },
        entrypoint: None,
        command: None,
        user: None,
        network: "archy-net".to_owned(),
        ports: Vec::new(),
        volumes: Vec::new(),
        env: BTreeMap::new(),
        secret_env: Vec::new(),
        secrets: Vec::new(),
        memory: None,
        security: Security::default(),
        health: None,
        stop_grace_period: Duration::from_secs(30),
        files: Vec::new(),
        path: PathBuf::from(format!("/apps/{name}/manifest.yml")),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn app_id_accepts_lowercase_digits_and_dashes_starting_with_a_letter() {
        for ok in ["a", "bitcoin-core", "app2", "a-1-b", &"x".repeat(63)] {
            assert_eq!(AppId::parse(ok).map(String::from).as_deref(), Some(ok), "{ok}");
        }
    }

    #[test]
    fn app_id_refuses_everything_else() {
        for bad in [
            "",
            "1app",
            "-app",
            "App",
            "my_app",
            "my.app",
            "my app",
            "é",
            &"x".repeat(64),
        ] {
            assert_eq!(AppId::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn security_defaults_to_read_only_root_and_no_new_privileges_without_capabilities() {
        let s = Security::default();
        assert!(s.read_only_root);
        assert!(s.no_new_privileges);
        assert!(s.capabilities_add.is_empty());
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        use crate::dataroot::DEFAULT_DATA_ROOT;
        assert_eq!(DEFAULT_DATA_ROOT, "/var/lib/archipelago");
        assert_eq!(DEFAULT_NETWORK, "archy-net");
        assert_eq!(DEFAULT_NETWORK_SUBNET, "10.89.200.0/24");
        assert_eq!(network_subnet(DEFAULT_NETWORK), Some(DEFAULT_NETWORK_SUBNET));
        assert_eq!(network_subnet("other-net"), None);
    }

    #[test]
    fn ids_and_kinds_serialize_as_plain_strings_and_durations_with_units() {
        let id = AppId::parse("electrs").expect("valid");
        assert_eq!(serde_json::to_string(&id).expect("json"), "\"electrs\"");
        assert_eq!(serde_json::to_string(&AppKind::Ui).expect("json"), "\"ui\"");
        assert_eq!(AppKind::Service.to_string(), "service");
        assert_eq!(Protocol::Udp.to_string(), "udp");
        let health = Health {
            probe: Probe::Tcp { port: 1 },
            interval: Duration::from_secs(90),
            timeout: Duration::from_secs(5),
            retries: 3,
            start_period: Duration::ZERO,
        };
        let v = serde_json::to_value(&health).expect("json");
        assert_eq!(v["interval"], "1m 30s");
        assert_eq!(v["timeout"], "5s");
        assert_eq!(v["start_period"], "0s");
    }
}
