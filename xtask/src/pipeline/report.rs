//! The build report (`build-report.json`): what went in, what came out
//! (the ISO, the signed update bundle, the signature of `SHA256SUMS`),
//! every Debian package and app image in the image, and how long each
//! stage took.

use std::path::Path;

use anyhow::Context as _;
use serde::Serialize;

/// Bumped when a field changes meaning or disappears.
pub const REPORT_FORMAT: u32 = 1;

#[derive(Debug, Serialize)]
pub struct Report {
    pub format: u32,
    pub product: String,
    /// The release version (the ISO's and bundle's file names,
    /// release.json, the bundle's manifest).
    pub version: String,
    pub arch: String,
    pub release: String,
    /// None when SOURCE_DATE_EPOCH was not set (then the build is stamped
    /// with its start time and is not meant to be reproducible).
    pub source_date_epoch: Option<u64>,
    /// The ISO; None for a rootfs-only build.
    pub artifact: Option<Artifact>,
    /// The signed update bundle; None for a rootfs-only build.
    pub bundle: Option<BundleArtifact>,
    /// The detached signature of SHA256SUMS (`SHA256SUMS.sig`).
    pub sums_signature: Option<String>,
    pub inputs: Inputs,
    /// Every installed Debian package, by name.
    pub packages: Vec<Package>,
    /// Every pre-pulled app image, by app.
    pub images: Vec<ImageRecord>,
    pub stages: Vec<StageRecord>,
    pub total_seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Artifact {
    pub file: String,
    pub size: u64,
    pub sha256: String,
    pub volume_id: String,
}

/// The update bundle (`archipelago-<version>-<arch>.raucb`).
#[derive(Debug, Clone, Serialize)]
pub struct BundleArtifact {
    pub file: String,
    pub size: u64,
    pub sha256: String,
    /// The sha256 of its `rootfs.tar`: reproducible, unlike the bundle,
    /// whose signature carries its signing time.
    pub payload_sha256: String,
    /// The manifest's `compatible`.
    pub compatible: String,
}

/// The certificate the image trusts as its RAUC keyring.
#[derive(Debug, Clone, Serialize)]
pub struct KeyringInput {
    /// The development key under target/keys/ (not a release key).
    pub development: bool,
    pub certificate_sha256: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Inputs {
    pub git_commit: Option<String>,
    pub packages_txt_sha256: String,
    /// The package list as installed by mmdebstrap (comments removed).
    pub package_list: Vec<String>,
    pub overlay_sha256: String,
    pub mirrors: Vec<String>,
    pub mmdebstrap_args: Vec<String>,
    /// The cache key of the base rootfs.
    pub rootfs_cache_key: String,
    pub rootfs_base_sha256: String,
    pub agent: AgentInput,
    pub unit_sha256: String,
    pub manifests: Vec<ManifestRecord>,
    pub registries_sha256: Option<String>,
    pub images_lock_sha256: Option<String>,
    pub grub_cfg_sha256: Option<String>,
    pub keyring: KeyringInput,
}

#[derive(Debug, Clone, Serialize)]
pub struct AgentInput {
    /// `cargo build --release`, or the file given with --agent.
    pub source: String,
    pub sha256: String,
    /// The newest glibc symbol version it needs.
    pub glibc_needed: Option<String>,
    pub glibc_available: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ManifestRecord {
    pub app: String,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, serde::Deserialize)]
pub struct Package {
    pub name: String,
    pub version: String,
    pub arch: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ImageRecord {
    pub app: String,
    pub reference: String,
    pub manifest_digest: String,
    pub config_digest: String,
    pub archive_sha256: String,
    pub size: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct StageRecord {
    pub name: String,
    pub seconds: f64,
    pub output_bytes: Option<u64>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub note: String,
}

impl Report {
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(self).context("serialising the build report")?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
    }
}

/// `git rev-parse HEAD`, with `-dirty` when tracked files changed; None
/// outside a git checkout.
pub fn git_commit(sh: &xshell::Shell) -> Option<String> {
    let head = crate::harness::procs::capture(xshell::cmd!(sh, "git rev-parse HEAD")).ok()?;
    let dirty = crate::harness::procs::capture(xshell::cmd!(sh, "git status --porcelain --untracked-files=no"))
        .map(|s| !s.trim().is_empty())
        .unwrap_or(false);
    Some(format!("{}{}", head.trim(), if dirty { "-dirty" } else { "" }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;

    pub fn sample() -> Report {
        Report {
            format: REPORT_FORMAT,
            product: "archipelago".into(),
            version: "0.1.0".into(),
            arch: "amd64".into(),
            release: "bookworm".into(),
            source_date_epoch: Some(1_700_000_000),
            artifact: Some(Artifact {
                file: "archipelago-0.1.0-amd64.iso".into(),
                size: 42,
                sha256: "ab".repeat(32),
                volume_id: "ARCHIPELAGO".into(),
            }),
            bundle: Some(BundleArtifact {
                file: "archipelago-0.1.0-amd64.raucb".into(),
                size: 43,
                sha256: "cd".repeat(32),
                payload_sha256: "ef".repeat(32),
                compatible: "archipelago-amd64".into(),
            }),
            sums_signature: Some("SHA256SUMS.sig".into()),
            inputs: Inputs {
                git_commit: None,
                packages_txt_sha256: "00".repeat(32),
                package_list: vec!["podman".into()],
                overlay_sha256: "11".repeat(32),
                mirrors: vec!["deb http://deb.debian.org/debian bookworm main".into()],
                mmdebstrap_args: vec!["--variant=minbase".into()],
                rootfs_cache_key: "22".repeat(32),
                rootfs_base_sha256: "33".repeat(32),
                agent: AgentInput {
                    source: "cargo build --release".into(),
                    sha256: "44".repeat(32),
                    glibc_needed: Some("2.34".into()),
                    glibc_available: "2.36".into(),
                },
                unit_sha256: "55".repeat(32),
                manifests: vec![ManifestRecord {
                    app: "electrs".into(),
                    sha256: "66".repeat(32),
                }],
                registries_sha256: None,
                images_lock_sha256: None,
                grub_cfg_sha256: None,
                keyring: KeyringInput {
                    development: true,
                    certificate_sha256: "77".repeat(32),
                },
            },
            packages: vec![Package {
                name: "netavark".into(),
                version: "1.4.0-3".into(),
                arch: "amd64".into(),
            }],
            images: vec![ImageRecord {
                app: "electrs".into(),
                reference: "docker.io/getumbrel/electrs:v0.10.10@sha256:c991".into(),
                manifest_digest: "sha256:aa".into(),
                config_digest: "sha256:bb".into(),
                archive_sha256: "cc".into(),
                size: 7,
            }],
            stages: vec![
                StageRecord {
                    name: "rootfs-base".into(),
                    seconds: 83.2,
                    output_bytes: Some(700),
                    note: "cached".into(),
                },
                StageRecord {
                    name: "iso".into(),
                    seconds: 4.0,
                    output_bytes: Some(42),
                    note: String::new(),
                },
            ],
            total_seconds: 87.2,
        }
    }

    #[test]
    fn report_json_has_inputs_packages_images_and_stages() {
        let value = serde_json::to_value(sample()).unwrap();
        assert_eq!(value["format"], 1);
        assert_eq!(value["source_date_epoch"], 1_700_000_000);
        assert_eq!(value["artifact"]["volume_id"], "ARCHIPELAGO");
        assert_eq!(value["bundle"]["file"], "archipelago-0.1.0-amd64.raucb");
        assert_eq!(value["bundle"]["compatible"], "archipelago-amd64");
        assert_eq!(value["sums_signature"], "SHA256SUMS.sig");
        assert_eq!(value["inputs"]["keyring"]["development"], true);
        assert_eq!(value["inputs"]["agent"]["glibc_available"], "2.36");
        assert_eq!(value["inputs"]["manifests"][0]["app"], "electrs");
        assert_eq!(value["packages"][0]["name"], "netavark");
        assert_eq!(value["packages"][0]["version"], "1.4.0-3");
        assert_eq!(value["images"][0]["config_digest"], "sha256:bb");
        assert_eq!(value["stages"][0]["name"], "rootfs-base");
        assert_eq!(value["stages"][0]["output_bytes"], 700);
        assert_eq!(value["stages"][0]["note"], "cached");
        assert!(value["stages"][1].get("note").is_none(), "empty notes are left out");
    }

    #[test]
    fn report_file_is_pretty_json_with_a_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("build-report.json");
        sample().write(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.ends_with("}\n"));
        assert!(text.contains("\n  \"packages\": ["));
        let back: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back["total_seconds"], 87.2);
    }
}
