//! RAUC's pre-install and post-install handlers
//! (`archy-agent os rauc-pre-install|rauc-post-install`, run by RAUC
//! through /usr/lib/archipelago/rauc-*).
//!
//! RAUC 1.8 checks the bundle's signature and its manifest's compatible
//! before it runs a handler, but not what we also require: the release's
//! architecture, no downgrade without the owner asking, every file's
//! sha256 as the release says. The pre-install handler streams the
//! bundle's `rootfs.tar` (release.json first) and hashes each file,
//! writing nothing, before RAUC touches the slot. RAUC does not read back
//! what it extracted, so the post-install handler mounts the written slot
//! read-only and verifies it.
//!
//! A refusal is printed on stderr (RAUC's journal) and written as JSON to
//! `<run>/refusal` (the helper reports it: RAUC's own error only says the
//! handler failed). Handlers get no manifest version from RAUC 1.8 (only
//! hooks get `RAUC_MF_VERSION`): the version is release.json's.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::os::release::{Release, ReleaseError, Version, RELEASE_FILE};

/// Where the helper and the handlers meet (`--run-dir` in tests).
pub const RUN_DIR: &str = "/run/archipelago/os";
/// The refusal of the last install, as [`Refusal`] JSON.
pub const REFUSAL_FILE: &str = "refusal";
/// Present only during an install the owner allowed to downgrade.
pub const ALLOW_DOWNGRADE_FILE: &str = "allow-downgrade";
/// The slot class the bundle's image is for.
const SLOT_CLASS: &str = crate::os::release::RAUC_SLOT_CLASS;

/// Which handler refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    PreInstall,
    PostInstall,
}

/// What `<run>/refusal` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub stage: Stage,
    pub reason: String,
}

/// Why a bundle is refused.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("the bundle's release is for {found}, and this node runs {node}")]
    Architecture { found: String, node: String },
    #[error("the bundle holds version {bundle}, older than the booted {booted}; a downgrade needs --allow-downgrade")]
    Downgrade { bundle: String, booted: String },
    #[error("{file} in the bundle has sha256 {found}, and its release.json says {expected}")]
    Hash {
        file: String,
        expected: String,
        found: String,
    },
    #[error("the bundle's {image} does not start with {RELEASE_FILE} (its first member is {first:?})")]
    NoRelease { image: String, first: String },
    #[error("the bundle's {image} holds {file}, which its release.json does not name")]
    Extra { image: String, file: String },
    #[error("the bundle's {image} lacks {file}, which its release.json names")]
    Missing { image: String, file: String },
    #[error("the bundle's {RELEASE_FILE}: {0}")]
    Release(#[from] ReleaseError),
    #[error("cannot read the bundle's {image}: {source}")]
    Read {
        image: String,
        #[source]
        source: std::io::Error,
    },
    #[error("RAUC's handler environment: {0}")]
    Env(String),
    #[error("slot {device}: {why}")]
    Slot { device: String, why: String },
}

/// The part of RAUC's handler environment we use (docs/reference.rst at
/// v1.8, "Custom Handlers (Interface)").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerEnv {
    /// `RAUC_BUNDLE_MOUNT_POINT`.
    pub bundle: PathBuf,
    /// The image for the target rootfs slot (`RAUC_IMAGE_NAME_<n>`), as a
    /// path under the bundle.
    pub image: PathBuf,
    /// `RAUC_SLOT_DEVICE_<n>` and `RAUC_SLOT_BOOTNAME_<n>` of that slot.
    pub device: PathBuf,
    pub bootname: String,
}

impl HandlerEnv {
    /// Reads it through `var` (`std::env::var` on a node).
    pub fn read(var: impl Fn(&str) -> Option<String>) -> Result<HandlerEnv, Refused> {
        let need = |name: &str| var(name).ok_or_else(|| Refused::Env(format!("{name} is not set")));
        let bundle = PathBuf::from(need("RAUC_BUNDLE_MOUNT_POINT")?);
        let targets = need("RAUC_TARGET_SLOTS")?;
        let mut found = None;
        for n in targets.split_whitespace() {
            if var(&format!("RAUC_SLOT_CLASS_{n}")).as_deref() != Some(SLOT_CLASS) {
                continue;
            }
            if found.is_some() {
                return Err(Refused::Env(format!(
                    "RAUC_TARGET_SLOTS={targets:?} names more than one {SLOT_CLASS} slot"
                )));
            }
            let image = need(&format!("RAUC_IMAGE_NAME_{n}"))?;
            let image = if Path::new(&image).is_absolute() {
                PathBuf::from(image)
            } else {
                bundle.join(image)
            };
            found = Some(HandlerEnv {
                bundle: bundle.clone(),
                image,
                device: PathBuf::from(need(&format!("RAUC_SLOT_DEVICE_{n}"))?),
                bootname: need(&format!("RAUC_SLOT_BOOTNAME_{n}"))?,
            });
        }
        found.ok_or_else(|| {
            Refused::Env(format!(
                "RAUC_TARGET_SLOTS={targets:?} names no slot of class {SLOT_CLASS}"
            ))
        })
    }
}

fn member_name(path: &Path) -> String {
    let s = path.to_string_lossy();
    s.trim_start_matches("./").trim_end_matches('/').to_owned()
}

/// Reads a release tar (release.json first, then the files it names),
/// hashing each file as it streams by: the release if every file is
/// there with its sha256 and nothing else is, else why not. `image`
/// names the tar in messages.
pub fn check_tar(tar: impl Read, image: &str) -> Result<Release, Refused> {
    let read_err = |source| Refused::Read {
        image: image.to_owned(),
        source,
    };
    let mut archive = tar::Archive::new(tar);
    let mut entries = archive.entries().map_err(read_err)?;
    let mut release: Option<Release> = None;
    let mut seen = BTreeMap::new();
    for entry in entries.by_ref() {
        let mut entry = entry.map_err(read_err)?;
        let name = member_name(&entry.path().map_err(read_err)?);
        let kind = entry.header().entry_type();
        let Some(rel) = &release else {
            if name != RELEASE_FILE || !kind.is_file() {
                return Err(Refused::NoRelease {
                    image: image.to_owned(),
                    first: name,
                });
            }
            let mut bytes = Vec::new();
            entry.by_ref().take(1 << 20).read_to_end(&mut bytes).map_err(read_err)?;
            release = Some(Release::parse(&bytes, Path::new(RELEASE_FILE))?);
            continue;
        };
        if kind.is_dir() && rel.files.keys().any(|f| f.starts_with(&format!("{name}/"))) {
            continue;
        }
        let Some(expected) = rel.files.get(&name).filter(|_| kind.is_file()) else {
            return Err(Refused::Extra {
                image: image.to_owned(),
                file: name,
            });
        };
        let mut hash = Sha256::new();
        std::io::copy(&mut entry, &mut hash).map_err(read_err)?;
        let found = format!("{:x}", hash.finalize());
        if &found != expected {
            return Err(Refused::Hash {
                file: name,
                expected: expected.clone(),
                found,
            });
        }
        seen.insert(name, ());
    }
    let Some(release) = release else {
        return Err(Refused::NoRelease {
            image: image.to_owned(),
            first: String::new(),
        });
    };
    if let Some(file) = release.files.keys().find(|f| !seen.contains_key(*f)) {
        return Err(Refused::Missing {
            image: image.to_owned(),
            file: file.clone(),
        });
    }
    Ok(release)
}

/// The checks of a release against the node: its architecture, and no
/// downgrade unless allowed.
pub fn check_release(release: &Release, node_arch: &str, booted: &str, allow_downgrade: bool) -> Result<(), Refused> {
    if release.architecture != node_arch {
        return Err(Refused::Architecture {
            found: release.architecture.clone(),
            node: node_arch.to_owned(),
        });
    }
    check_version(&release.version, booted, allow_downgrade)
}

/// No downgrade unless allowed: `version` (a bundle's) against the
/// booted release's. A version that does not parse is refused as older
/// (every doubt means no).
pub fn check_version(version: &str, booted: &str, allow_downgrade: bool) -> Result<(), Refused> {
    let older = match (Version::parse(version), Version::parse(booted)) {
        (Ok(new), Ok(old)) => new < old,
        _ => true,
    };
    if !allow_downgrade && older {
        return Err(Refused::Downgrade {
            bundle: version.to_owned(),
            booted: booted.to_owned(),
        });
    }
    Ok(())
}

/// Options of both handlers (hidden flags; the defaults are the node's).
#[derive(Debug, Clone)]
pub struct HandlerOptions {
    pub run_dir: PathBuf,
    /// The booted release's release.json (the live medium's).
    pub booted_release: PathBuf,
    pub arch: String,
}

fn record(opts: &HandlerOptions, stage: Stage, e: &Refused) {
    let refusal = Refusal {
        stage,
        reason: e.to_string(),
    };
    eprintln!("archipelago: {stage:?} refuses the bundle: {}", refusal.reason);
    let _ = fs::create_dir_all(&opts.run_dir);
    if let Ok(bytes) = serde_json::to_vec(&refusal) {
        if let Err(w) = crate::fsutil::write_atomic(&opts.run_dir.join(REFUSAL_FILE), &bytes, 0o644) {
            eprintln!(
                "archipelago: cannot write {}: {w:#}",
                opts.run_dir.join(REFUSAL_FILE).display()
            );
        }
    }
}

/// Whether the helper allowed a downgrade for this install: its file in
/// `run_dir`, both root's, the folder writable by root only. The agent's
/// user may own `/run/archipelago` (the agent's RuntimeDirectory), so it
/// could swap in an `os` folder of its own; that one is not root's.
fn downgrade_allowed(run_dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let root_only = |p: &Path, dir: bool| {
        fs::symlink_metadata(p).is_ok_and(|m| {
            m.uid() == 0 && (m.is_dir() == dir) && (!dir || m.mode() & 0o022 == 0) && !m.file_type().is_symlink()
        })
    };
    root_only(run_dir, true) && root_only(&run_dir.join(ALLOW_DOWNGRADE_FILE), false)
}

/// `os rauc-pre-install`: Ok when RAUC may write the slot.
pub fn pre_install(opts: &HandlerOptions, env: &HandlerEnv) -> Result<Release, Refused> {
    let result = (|| {
        let booted = Release::read(&opts.booted_release)?;
        let image = env.image.display().to_string();
        let file = fs::File::open(&env.image).map_err(|source| Refused::Read {
            image: image.clone(),
            source,
        })?;
        let release = check_tar(std::io::BufReader::with_capacity(1 << 20, file), &image)?;
        let allow = downgrade_allowed(&opts.run_dir);
        check_release(&release, &opts.arch, &booted.version, allow)?;
        Ok(release)
    })();
    match &result {
        Ok(r) => eprintln!(
            "archipelago: bundle release {} ({}) checked: every file matches its release.json; slot {} ({}) may be written",
            r.version,
            r.architecture,
            env.bootname,
            env.device.display()
        ),
        Err(e) => record(opts, Stage::PreInstall, e),
    }
    result
}

/// `os rauc-post-install`: the written slot, mounted read-only, holds
/// exactly the bundle's release.
pub fn post_install(opts: &HandlerOptions, env: &HandlerEnv) -> Result<Release, Refused> {
    let result = (|| {
        let image = env.image.display().to_string();
        let file = fs::File::open(&env.image).map_err(|source| Refused::Read {
            image: image.clone(),
            source,
        })?;
        // Only release.json: the first member.
        let mut archive = tar::Archive::new(file);
        let mut entries = archive.entries().map_err(|source| Refused::Read {
            image: image.clone(),
            source,
        })?;
        let first = entries
            .next()
            .transpose()
            .map_err(|source| Refused::Read {
                image: image.clone(),
                source,
            })?
            .ok_or_else(|| Refused::NoRelease {
                image: image.clone(),
                first: String::new(),
            })?;
        let mut bytes = Vec::new();
        first
            .take(1 << 20)
            .read_to_end(&mut bytes)
            .map_err(|source| Refused::Read {
                image: image.clone(),
                source,
            })?;
        let wanted = Release::parse(&bytes, Path::new(RELEASE_FILE))?;
        let device = env.device.display().to_string();
        let slot = crate::mount::Mounted::with(&env.device, "ext4", "ro").map_err(|e| Refused::Slot {
            device: device.clone(),
            why: format!("cannot mount it read-only: {e:#}"),
        })?;
        let written = Release::read(&slot.dir.join(RELEASE_FILE))?;
        if written != wanted {
            return Err(Refused::Slot {
                device,
                why: format!("its {RELEASE_FILE} differs from the bundle's"),
            });
        }
        written.verify(&slot.dir)?;
        slot.unmount().map_err(|e| Refused::Slot {
            device,
            why: format!("{e:#}"),
        })?;
        Ok(written)
    })();
    match &result {
        Ok(r) => eprintln!(
            "archipelago: slot {} ({}) reads back release {} intact",
            env.bootname,
            env.device.display(),
            r.version
        ),
        Err(e) => record(opts, Stage::PostInstall, e),
    }
    result
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::os::release::LIVE_FILES;

    fn tar_of(members: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in members {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, &data[..]).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn release(version: &str, arch: &str) -> (Release, Vec<(&'static str, Vec<u8>)>) {
        let files: Vec<(&str, Vec<u8>)> = LIVE_FILES.iter().map(|n| (*n, n.as_bytes().repeat(100))).collect();
        let r = Release {
            version: version.into(),
            architecture: arch.into(),
            files: files
                .iter()
                .map(|(n, d)| (n.to_string(), format!("{:x}", Sha256::digest(d))))
                .collect(),
        };
        (r, files)
    }

    fn bundle_tar(r: &Release, files: &[(&'static str, Vec<u8>)]) -> Vec<u8> {
        let mut m = vec![("release.json", r.to_file_bytes().unwrap())];
        m.extend(files.iter().cloned());
        tar_of(&m)
    }

    #[test]
    fn a_good_tar_gives_its_release() {
        let (r, files) = release("0.2.0", "amd64");
        assert_eq!(check_tar(&bundle_tar(&r, &files)[..], "rootfs.tar").unwrap(), r);
    }

    #[test]
    fn a_changed_file_release_last_a_missing_and_an_extra_file_are_refused() {
        let (r, mut files) = release("0.2.0", "amd64");
        files[1].1[0] ^= 1;
        let e = check_tar(&bundle_tar(&r, &files)[..], "rootfs.tar").unwrap_err();
        assert!(matches!(&e, Refused::Hash { file, .. } if file == LIVE_FILES[1]), "{e}");

        let (r, files) = release("0.2.0", "amd64");
        let mut m = files.clone();
        m.push(("release.json", r.to_file_bytes().unwrap()));
        let e = check_tar(&tar_of(&m)[..], "rootfs.tar").unwrap_err();
        assert!(e.to_string().contains("does not start with release.json"), "{e}");

        let e = check_tar(&bundle_tar(&r, &files[..2])[..], "rootfs.tar").unwrap_err();
        assert!(matches!(&e, Refused::Missing { .. }), "{e}");

        let mut more = files.clone();
        more.push(("live/extra", b"x".to_vec()));
        let e = check_tar(&bundle_tar(&r, &more)[..], "rootfs.tar").unwrap_err();
        assert!(e.to_string().contains("holds live/extra"), "{e}");
    }

    #[test]
    fn architecture_and_downgrade() {
        let (r, _) = release("0.2.0", "arm64");
        let e = check_release(&r, "amd64", "0.1.0", false).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the bundle's release is for arm64, and this node runs amd64"
        );
        let (r, _) = release("0.1.0", "amd64");
        let e = check_release(&r, "amd64", "0.2.0", false).unwrap_err();
        assert!(e.to_string().contains("older than the booted 0.2.0"), "{e}");
        check_release(&r, "amd64", "0.2.0", true).unwrap();
        check_release(&r, "amd64", "0.1.0", false).unwrap();
    }

    #[test]
    fn the_downgrade_permission_counts_only_in_a_root_only_folder() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("os");
        fs::create_dir(&run).unwrap();
        fs::set_permissions(&run, fs::Permissions::from_mode(0o755)).unwrap();
        assert!(!downgrade_allowed(&run));
        fs::write(run.join(ALLOW_DOWNGRADE_FILE), b"").unwrap();
        // The tests run as root (the os_update test needs it too).
        assert!(downgrade_allowed(&run));
        fs::set_permissions(&run, fs::Permissions::from_mode(0o777)).unwrap();
        assert!(!downgrade_allowed(&run), "a folder anyone may write is not trusted");
    }

    #[test]
    fn the_environment_gives_the_rootfs_target() {
        let vars: BTreeMap<&str, &str> = [
            ("RAUC_BUNDLE_MOUNT_POINT", "/run/rauc/bundle"),
            ("RAUC_TARGET_SLOTS", "2"),
            ("RAUC_SLOT_CLASS_1", "rootfs"),
            ("RAUC_SLOT_CLASS_2", "rootfs"),
            ("RAUC_IMAGE_NAME_2", "rootfs.tar"),
            ("RAUC_SLOT_DEVICE_2", "/dev/sda3"),
            ("RAUC_SLOT_BOOTNAME_2", "B"),
        ]
        .into();
        let env = HandlerEnv::read(|k| vars.get(k).map(|v| v.to_string())).unwrap();
        assert_eq!(env.image, Path::new("/run/rauc/bundle/rootfs.tar"));
        assert_eq!(env.device, Path::new("/dev/sda3"));
        assert_eq!(env.bootname, "B");
        let e = HandlerEnv::read(|k| {
            (k != "RAUC_TARGET_SLOTS")
                .then(|| vars.get(k).map(|v| v.to_string()))
                .flatten()
        })
        .unwrap_err();
        assert!(e.to_string().contains("RAUC_TARGET_SLOTS is not set"), "{e}");
    }
}
