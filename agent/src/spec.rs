//! The container an app should have: a pure function of its manifest, the
//! naming rule and the data root.
//!
//! Install, upgrade and reconcile all derive the image and every other
//! setting from [`ContainerSpec::from_manifest`], so they can never
//! disagree (a version pin once got re-rendered back to `:latest` on every
//! reconcile tick because two code paths resolved images differently).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::dataroot::DataRoot;
use crate::manifest::{
    AppId, ImageSource, Manifest, Naming, NamingError, PortMapping, SecretKind, Security, VolumeSource, DEFAULT_NETWORK,
};

/// Label naming the app a container belongs to.
pub const LABEL_APP: &str = "io.archipelago.app";
/// Label marking containers the agent manages.
pub const LABEL_MANAGED_BY: &str = "io.archipelago.managed-by";
/// Value of [`LABEL_MANAGED_BY`].
pub const MANAGED_BY: &str = "archy-agent";
/// Label holding the hash of the effective spec; drift detection compares it.
pub const LABEL_SPEC_HASH: &str = "io.archipelago.spec-hash";
/// Label holding the manifest version the container was created from.
pub const LABEL_VERSION: &str = "io.archipelago.version";
/// Where secret files appear inside a container.
pub const SECRETS_MOUNT_DIR: &str = "/run/secrets";
/// Stop grace of [`ContainerSpec::for_image`]: the manifest's default.
const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(30);
/// [`LABEL_VERSION`] of [`ContainerSpec::for_image`], which has no manifest.
const FOR_IMAGE_VERSION: &str = "0";

/// A bind mount from the host into the container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mount {
    pub host: PathBuf,
    pub target: String,
    pub read_only: bool,
}

/// A secret the container reads from a file, never from its environment:
/// environment values show in `podman inspect`, files do not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SecretMount {
    pub name: String,
    pub kind: SecretKind,
    /// The app's own copy, owned by the app's user.
    pub host: PathBuf,
    /// `/run/secrets/<name>`.
    pub target: String,
}

/// Everything the engine needs to create an app's container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ContainerSpec {
    pub app: AppId,
    pub name: String,
    /// The exact image reference containers are created from: a digest
    /// reference for pulled images, a content-addressed local tag for built
    /// ones. Never a tag that can move.
    pub image: String,
    pub entrypoint: Option<Vec<String>>,
    pub command: Option<Vec<String>>,
    /// Plain environment, sorted by name.
    pub env: BTreeMap<String, String>,
    pub secrets: Vec<SecretMount>,
    pub user: Option<String>,
    pub network: String,
    pub ports: Vec<PortMapping>,
    pub mounts: Vec<Mount>,
    pub cap_add: Vec<String>,
    pub read_only_root: bool,
    pub no_new_privileges: bool,
    pub memory: Option<u64>,
    #[serde(skip)]
    pub stop_grace_period: Duration,
    /// Labels, including the spec hash.
    pub labels: BTreeMap<String, String>,
}

impl ContainerSpec {
    /// Derives the container for `app`. `built_image` is the local image
    /// reference for apps with `build`, which only the builder knows.
    pub fn from_manifest(
        app: &Manifest,
        naming: &Naming,
        data_root: &DataRoot,
        built_image: Option<&str>,
    ) -> Result<ContainerSpec, NamingError> {
        let image = match (&app.image, built_image) {
            (ImageSource::Pinned(p), _) => p.by_digest(),
            (ImageSource::Build { .. }, Some(built)) => built.to_owned(),
            (ImageSource::Build { .. }, None) => build_tag(&app.id, "unbuilt"),
        };
        let app_dir = data_root.app_dir(&app.id);
        let mounts = app
            .volumes
            .iter()
            .map(|v| Mount {
                host: match &v.source {
                    VolumeSource::AppData(rel) => app_dir.join(rel),
                    VolumeSource::Absolute(abs) => abs.clone(),
                },
                target: v.target.clone(),
                read_only: v.read_only,
            })
            .collect();
        let mut env = app.env.clone();
        let mut secrets: Vec<SecretMount> = Vec::new();
        for s in &app.secret_env {
            let target = format!("{SECRETS_MOUNT_DIR}/{}", s.secret);
            env.insert(format!("{}_FILE", s.key), target);
        }
        for s in &app.secrets {
            secrets.push(SecretMount {
                name: s.name.clone(),
                kind: s.kind,
                host: data_root.app_secret(&app.id, &s.name),
                target: format!("{SECRETS_MOUNT_DIR}/{}", s.name),
            });
        }
        let mut spec = ContainerSpec {
            app: app.id.clone(),
            name: naming.container_name(app),
            image,
            entrypoint: app.entrypoint.clone(),
            command: app.command.clone(),
            env,
            secrets,
            user: app.user.clone(),
            network: app.network.clone(),
            ports: naming.ports(app)?,
            mounts,
            cap_add: app.security.capabilities_add.clone(),
            read_only_root: app.security.read_only_root,
            no_new_privileges: app.security.no_new_privileges,
            memory: app.memory,
            stop_grace_period: app.stop_grace_period,
            labels: BTreeMap::new(),
        };
        spec.update_labels(&app.version);
        Ok(spec)
    }

    /// A container of `image` with the manifest's secure defaults and
    /// nothing else: read-only root, no new privileges, every capability
    /// dropped, on [`DEFAULT_NETWORK`]. For tests and tools that need a
    /// spec without a manifest; change fields, then call
    /// [`ContainerSpec::update_labels`].
    pub fn for_image(app: AppId, name: impl Into<String>, image: String) -> ContainerSpec {
        let security = Security::default();
        let mut spec = ContainerSpec {
            app,
            name: name.into(),
            image,
            entrypoint: None,
            command: None,
            env: BTreeMap::new(),
            secrets: Vec::new(),
            user: None,
            network: DEFAULT_NETWORK.to_owned(),
            ports: Vec::new(),
            mounts: Vec::new(),
            cap_add: security.capabilities_add,
            read_only_root: security.read_only_root,
            no_new_privileges: security.no_new_privileges,
            memory: None,
            stop_grace_period: DEFAULT_STOP_GRACE,
            labels: BTreeMap::new(),
        };
        spec.update_labels(FOR_IMAGE_VERSION);
        spec
    }

    /// Recomputes the labels, spec hash included, from the other fields:
    /// the one place that decides them, so call it after changing any
    /// field. Replaces every label.
    pub fn update_labels(&mut self, version: &str) {
        let hash = self.hash();
        self.labels = BTreeMap::from([
            (LABEL_APP.to_owned(), self.app.to_string()),
            (LABEL_MANAGED_BY.to_owned(), MANAGED_BY.to_owned()),
            (LABEL_SPEC_HASH.to_owned(), hash),
            (LABEL_VERSION.to_owned(), version.to_owned()),
        ]);
    }

    /// sha256 over the settings that define the container. Labels are left
    /// out (they carry the hash), and so is the stop grace period, which
    /// changes nothing about a running container.
    pub fn hash(&self) -> String {
        #[derive(Serialize)]
        struct Hashed<'a> {
            image: &'a str,
            entrypoint: &'a Option<Vec<String>>,
            command: &'a Option<Vec<String>>,
            env: &'a BTreeMap<String, String>,
            secrets: Vec<(&'a str, &'a Path)>,
            user: &'a Option<String>,
            network: &'a str,
            ports: &'a [PortMapping],
            mounts: &'a [Mount],
            cap_add: &'a [String],
            read_only_root: bool,
            no_new_privileges: bool,
            memory: Option<u64>,
        }
        let hashed = Hashed {
            image: &self.image,
            entrypoint: &self.entrypoint,
            command: &self.command,
            env: &self.env,
            secrets: self
                .secrets
                .iter()
                .map(|s| (s.target.as_str(), s.host.as_path()))
                .collect(),
            user: &self.user,
            network: &self.network,
            ports: &self.ports,
            mounts: &self.mounts,
            cap_add: &self.cap_add,
            read_only_root: self.read_only_root,
            no_new_privileges: self.no_new_privileges,
            memory: self.memory,
        };
        // Serializing plain structs, strings and numbers cannot fail.
        let bytes = serde_json::to_vec(&hashed).unwrap_or_default();
        format!("{:x}", Sha256::digest(bytes))
    }
}

/// Local tag for an image built from an app's context: content-addressed by
/// the context's hash, so a changed context is a different image.
pub fn build_tag(app: &AppId, context_hash: &str) -> String {
    format!("localhost/archipelago/{app}:{context_hash}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demo() -> ContainerSpec {
        let app = AppId::parse("demo").expect("a valid id");
        ContainerSpec::for_image(app, "archy-demo", "reg/demo@sha256:abc".into())
    }

    #[test]
    fn for_image_starts_from_the_manifests_secure_defaults() {
        let spec = demo();
        assert!(spec.read_only_root);
        assert!(spec.no_new_privileges);
        assert!(spec.cap_add.is_empty());
        assert_eq!(spec.network, DEFAULT_NETWORK);
        assert_eq!(spec.labels.get(LABEL_APP).map(String::as_str), Some("demo"));
        assert_eq!(spec.labels.get(LABEL_MANAGED_BY).map(String::as_str), Some(MANAGED_BY));
        assert_eq!(spec.labels.get(LABEL_SPEC_HASH), Some(&spec.hash()));
    }

    #[test]
    fn update_labels_follows_a_changed_field_and_the_version() {
        let mut spec = demo();
        let before = spec.hash();
        spec.cap_add.push("NET_BIND_SERVICE".into());
        assert_eq!(
            spec.labels.get(LABEL_SPEC_HASH),
            Some(&before),
            "labels change only on request"
        );
        spec.update_labels("2.0");
        assert_ne!(spec.hash(), before);
        assert_eq!(spec.labels.get(LABEL_SPEC_HASH), Some(&spec.hash()));
        assert_eq!(spec.labels.get(LABEL_VERSION).map(String::as_str), Some("2.0"));
    }

    #[test]
    fn the_stop_grace_period_is_not_part_of_the_hash() {
        let mut spec = demo();
        let before = spec.hash();
        spec.stop_grace_period = Duration::from_secs(1);
        assert_eq!(spec.hash(), before);
    }
}
