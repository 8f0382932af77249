//! The registry documents the stage reads: image manifests (Docker schema 2
//! and OCI), indexes (Docker manifest lists and OCI indexes) and image
//! configs, as far as building an archive needs them, and the choice of one
//! platform from an index.

use std::collections::BTreeMap;
use std::fmt;

use anyhow::{bail, Context as _};
use archy_agent::manifest::Digest;
use serde::Deserialize;

pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// What a manifest request accepts: schema 1 never (it cannot be pinned).
pub const ACCEPTED_MANIFESTS: &[&str] = &[OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST];

/// Layer types `podman load` unpacks from a docker-archive.
const LAYER_TYPES: &[&str] = &[
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
];
const CONFIG_TYPES: &[&str] = &[
    "application/vnd.docker.container.image.v1+json",
    "application/vnd.oci.image.config.v1+json",
];

/// The operating system every node runs.
pub const TARGET_OS: &str = "linux";

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default)]
    pub platform: Option<Platform>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// The annotation BuildKit puts on the attestation entries of an index.
const REFERENCE_TYPE: &str = "vnd.docker.reference.type";

impl Descriptor {
    fn is_attestation(&self) -> bool {
        self.annotations.contains_key(REFERENCE_TYPE)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default)]
    pub variant: Option<String>,
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// A manifest as fetched: an image, or an index of images.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Manifest {
    Image(ImageManifest),
    Index(Vec<Descriptor>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageManifest {
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    schema_version: u32,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
}

impl Manifest {
    /// Parses a manifest or index and checks that an archive can hold it.
    pub fn parse(bytes: &[u8]) -> anyhow::Result<Manifest> {
        let raw: RawManifest = serde_json::from_slice(bytes).context("not a manifest or index document")?;
        if raw.schema_version != 2 {
            bail!(
                "schema version {} is not supported (only 2: Docker schema 2 or OCI)",
                raw.schema_version
            );
        }
        let media_type = raw.media_type.as_deref();
        match (media_type, raw.manifests, raw.config, raw.layers) {
            (Some(DOCKER_MANIFEST_LIST | OCI_INDEX) | None, Some(manifests), None, None) => {
                Ok(Manifest::Index(manifests))
            }
            (Some(DOCKER_MANIFEST | OCI_MANIFEST) | None, None, Some(config), Some(layers)) => {
                if !CONFIG_TYPES.contains(&config.media_type.as_str()) {
                    bail!(
                        "the config has media type {:?}: not a container image (allowed: {})",
                        config.media_type,
                        CONFIG_TYPES.join(", ")
                    );
                }
                if let Some(bad) = layers.iter().find(|l| !LAYER_TYPES.contains(&l.media_type.as_str())) {
                    bail!(
                        "layer {} has media type {:?}, which an image archive cannot carry (allowed: {})",
                        bad.digest,
                        bad.media_type,
                        LAYER_TYPES.join(", ")
                    );
                }
                Ok(Manifest::Image(ImageManifest { config, layers }))
            }
            (Some(other), _, _, _) => bail!("media type {other:?} is not an image manifest or index"),
            (None, ..) => bail!("neither an image manifest (config and layers) nor an index (manifests)"),
        }
    }
}

/// The one entry of an index to use on `os`/`arch`. Attestations and other
/// platforms are skipped; an entry without a variant (or amd64's `v1`) is
/// preferred over a more specific variant, which older CPUs may not run.
pub fn choose_platform<'a>(entries: &'a [Descriptor], os: &str, arch: &str) -> anyhow::Result<&'a Descriptor> {
    let images = || {
        entries.iter().filter(|e| {
            [DOCKER_MANIFEST, OCI_MANIFEST].contains(&e.media_type.as_str())
                && !e.is_attestation()
                && e.platform
                    .as_ref()
                    .is_some_and(|p| p.os == os && p.architecture == arch)
        })
    };
    let plain = images().find(|e| {
        e.platform
            .as_ref()
            .is_some_and(|p| matches!(p.variant.as_deref(), None | Some("v1")))
    });
    if let Some(entry) = plain.or_else(|| images().next()) {
        return Ok(entry);
    }
    let offered: Vec<String> = entries
        .iter()
        .filter(|e| !e.is_attestation())
        .filter_map(|e| e.platform.as_ref())
        .map(ToString::to_string)
        .collect();
    bail!(
        "the index has no {os}/{arch} image (it offers: {})",
        if offered.is_empty() {
            "no platforms".to_owned()
        } else {
            offered.join(", ")
        }
    )
}

/// The part of an image config the stage checks.
#[derive(Debug, Deserialize)]
pub struct ImageConfig {
    pub architecture: String,
    pub os: String,
    pub rootfs: RootFs,
}

#[derive(Debug, Deserialize)]
pub struct RootFs {
    pub diff_ids: Vec<Digest>,
}

impl ImageConfig {
    pub fn parse(bytes: &[u8]) -> anyhow::Result<ImageConfig> {
        serde_json::from_slice(bytes).context("not an image config")
    }

    /// The image runs on `os`/`arch` and has one layer per diff id.
    pub fn check(&self, os: &str, arch: &str, layers: usize) -> anyhow::Result<()> {
        if self.os != os || self.architecture != arch {
            bail!(
                "it is a {}/{} image; the node needs {os}/{arch}",
                self.os,
                self.architecture
            );
        }
        if self.rootfs.diff_ids.len() != layers {
            bail!(
                "its config lists {} layers (rootfs.diff_ids) but its manifest {layers}",
                self.rootfs.diff_ids.len()
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Docker Hub manifest list in the shape `lightninglabs/lnd` and most
    /// multi-platform images publish, with BuildKit attestations: an OCI
    /// index whose entries include `unknown/unknown` attestation manifests.
    const INDEX: &str = include_str!("fixtures/index.json");

    #[test]
    fn an_index_resolves_to_its_linux_amd64_image() {
        let Manifest::Index(entries) = Manifest::parse(INDEX.as_bytes()).expect("parses") else {
            panic!("expected an index");
        };
        assert_eq!(entries.len(), 5);
        let chosen = choose_platform(&entries, "linux", "amd64").expect("amd64 is there");
        assert_eq!(
            chosen.digest.as_str(),
            "sha256:1111111111111111111111111111111111111111111111111111111111111111"
        );
        let arm = choose_platform(&entries, "linux", "arm64").expect("arm64 is there");
        assert_eq!(
            arm.platform.as_ref().map(ToString::to_string).as_deref(),
            Some("linux/arm64/v8")
        );
    }

    #[test]
    fn a_missing_platform_names_what_the_index_offers() {
        let Manifest::Index(entries) = Manifest::parse(INDEX.as_bytes()).expect("parses") else {
            panic!("expected an index");
        };
        let err = choose_platform(&entries, "linux", "riscv64")
            .expect_err("absent")
            .to_string();
        assert!(err.contains("no linux/riscv64 image"), "{err}");
        assert!(err.contains("linux/amd64, linux/arm64/v8, linux/arm/v7"), "{err}");
        // Attestations are never chosen, even when asked for their platform.
        assert!(choose_platform(&entries, "unknown", "unknown").is_err());
    }

    #[test]
    fn a_plain_variant_wins_over_a_specific_one() {
        let entry = |hex: char, variant: Option<&str>| Descriptor {
            media_type: OCI_MANIFEST.into(),
            digest: format!("sha256:{}", hex.to_string().repeat(64))
                .parse()
                .expect("digest"),
            size: 1,
            platform: Some(Platform {
                architecture: "amd64".into(),
                os: "linux".into(),
                variant: variant.map(str::to_owned),
            }),
            annotations: BTreeMap::new(),
        };
        let entries = [entry('a', Some("v3")), entry('b', None)];
        assert_eq!(
            choose_platform(&entries, "linux", "amd64").expect("found").digest,
            entries[1].digest
        );
        let only_v3 = [entry('a', Some("v3"))];
        assert_eq!(
            choose_platform(&only_v3, "linux", "amd64").expect("found").digest,
            only_v3[0].digest
        );
    }

    #[test]
    fn image_manifests_of_both_formats_parse_and_odd_layers_are_refused() {
        let hex = "2".repeat(64);
        let docker = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}","config":{{"mediaType":"application/vnd.docker.container.image.v1+json","size":7,"digest":"sha256:{hex}"}},"layers":[{{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","size":9,"digest":"sha256:{hex}"}}]}}"#
        );
        let Manifest::Image(m) = Manifest::parse(docker.as_bytes()).expect("docker") else {
            panic!("expected an image");
        };
        assert_eq!((m.config.size, m.layers.len()), (7, 1));
        // OCI manifests may leave out their media type.
        let oci = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"application/vnd.oci.image.config.v1+json","size":7,"digest":"sha256:{hex}"}},"layers":[]}}"#
        );
        assert!(matches!(Manifest::parse(oci.as_bytes()), Ok(Manifest::Image(_))));
        let foreign = docker.replace(
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
            "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
        );
        let err = Manifest::parse(foreign.as_bytes()).expect_err("foreign").to_string();
        assert!(err.contains("foreign"), "{err}");
        let helm = docker.replace(
            "application/vnd.docker.container.image.v1+json",
            "application/vnd.cncf.helm.config.v1+json",
        );
        assert!(Manifest::parse(helm.as_bytes()).is_err());
        let schema1 = r#"{"schemaVersion":1,"name":"x","tag":"y","fsLayers":[]}"#;
        assert!(Manifest::parse(schema1.as_bytes())
            .expect_err("schema 1")
            .to_string()
            .contains("schema version 1"));
    }

    #[test]
    fn a_config_for_another_platform_or_layer_count_is_refused() {
        let hex = "3".repeat(64);
        let config = format!(
            r#"{{"architecture":"arm64","os":"linux","config":{{}},"rootfs":{{"type":"layers","diff_ids":["sha256:{hex}"]}}}}"#
        );
        let parsed = ImageConfig::parse(config.as_bytes()).expect("parses");
        let err = parsed.check("linux", "amd64", 1).expect_err("arm64").to_string();
        assert!(err.contains("linux/arm64 image; the node needs linux/amd64"), "{err}");
        assert!(parsed.check("linux", "arm64", 1).is_ok());
        assert!(parsed.check("linux", "arm64", 2).is_err());
    }
}
