//! The update bundle: one release as a signed RAUC bundle
//! (`archipelago-<version>-<arch>.raucb`), written next to the ISO.
//!
//! Format `plain`: RAUC checks the CMS signature over the whole bundle
//! before it mounts it, so a flipped byte anywhere is refused before any
//! slot is touched (`verity` would find it only while writing). The bundle
//! holds one image for the slot class `rootfs`: `rootfs.tar`, with
//! `release.json` first (a reader learns what the release is before the
//! large files), then the live files. RAUC makes an ext4 file system in
//! the slot and extracts the tar into it.
//!
//! The payload is reproducible like the ISO: the tar's members in a fixed
//! order with one owner (root) and one mtime (`SOURCE_DATE_EPOCH`), and
//! RAUC's `mksquashfs` stamped with the same epoch. The signature carries
//! its signing time and is not.

use std::fs::{self, File};
use std::io::{BufWriter, Read as _, Write as _};
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context as _};
use archy_agent::os::release::{Version, LIVE_FILES, OPTIONAL_LIVE_FILES, RELEASE_FILE};
use serde::Deserialize;
use xshell::{cmd, Shell};

use crate::harness::procs::capture;
use crate::pipeline::flags::{self, Epoch};
use crate::pipeline::keys::SigningKey;
use crate::pipeline::layers::sha256_file;

pub const BUNDLE_SUFFIX: &str = "raucb";
/// The slot class the image is for, and the one image's file name.
pub const SLOT_CLASS: &str = "rootfs";
pub const IMAGE_FILE: &str = "rootfs.tar";
pub const MANIFEST_FILE: &str = "manifest.raucm";
/// RAUC's `mksquashfs`: the payload is compressed already (squashfs,
/// kernel, initrd), so compressing it again would cost a minute for
/// nothing.
const MKSQUASHFS_ARGS: &str = "-noI -noD -noF -noX";
const FILE_MODE: u32 = 0o644;
const DIR_MODE: u32 = 0o755;

/// `archipelago-<arch>`: what the node's `system.conf` names as
/// `compatible` and a bundle must match.
pub fn compatible(arch: &str) -> String {
    format!("{}-{arch}", flags::PRODUCT)
}

/// `archipelago-<version>-<arch>.raucb`.
pub fn file_name(version: &Version, arch: &str) -> String {
    format!("{}-{version}-{arch}.{BUNDLE_SUFFIX}", flags::PRODUCT)
}

/// The bundle's manifest.
pub fn manifest(version: &Version, arch: &str) -> String {
    format!(
        "[update]\ncompatible={}\nversion={version}\n\n[bundle]\nformat=plain\n\n[image.{SLOT_CLASS}]\nfilename={IMAGE_FILE}\n",
        compatible(arch)
    )
}

/// A release's members under `root` (the ISO's staging folder or a
/// slot): `release.json` first, then the live files, then the optional
/// ones present.
pub fn release_members(root: &Path) -> Vec<(String, PathBuf)> {
    let mut members = vec![(RELEASE_FILE.to_owned(), root.join(RELEASE_FILE))];
    members.extend(LIVE_FILES.iter().map(|n| ((*n).to_owned(), root.join(n))));
    members.extend(
        OPTIONAL_LIVE_FILES
            .iter()
            .filter(|n| root.join(n).exists())
            .map(|n| ((*n).to_owned(), root.join(n))),
    );
    members
}

/// Writes a signed bundle into the folder `out` from `files` (the member
/// name in `rootfs.tar`, and the host file), in the order given, each
/// member's parent folders before it; returns its path
/// (`out/archipelago-<version>-<arch>.raucb`, replaced if there). Nothing
/// is checked about the members: tests build bundles a node must refuse
/// with it. The tar's mtimes are `SOURCE_DATE_EPOCH`, else now.
// The e2e's update scenarios (harness/e2e) build their bundles with it.
#[cfg_attr(not(test), allow(dead_code))]
pub fn write_bundle(
    sh: &Shell,
    out: &Path,
    files: &[(&str, &Path)],
    version: &Version,
    arch: &str,
    key: &SigningKey,
) -> anyhow::Result<PathBuf> {
    let epoch = Epoch::from_env()?;
    Ok(write_bundle_at(sh, out, files, version, arch, key, epoch.seconds)?.bundle)
}

/// A bundle written, and the sha256 of its payload's `rootfs.tar` (the
/// part that is reproducible).
#[derive(Debug, Clone)]
pub struct Written {
    pub bundle: PathBuf,
    pub payload_sha256: String,
}

/// [`write_bundle`] with the tar's mtime given.
pub fn write_bundle_at(
    sh: &Shell,
    out: &Path,
    files: &[(&str, &Path)],
    version: &Version,
    arch: &str,
    key: &SigningKey,
    mtime: u64,
) -> anyhow::Result<Written> {
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let name = file_name(version, arch);
    let work = tempfile::Builder::new()
        .prefix(".bundle-")
        .tempdir_in(out)
        .with_context(|| format!("creating a work folder in {}", out.display()))?;
    let content = work.path().join("content");
    fs::create_dir(&content).with_context(|| format!("creating {}", content.display()))?;
    let tar = content.join(IMAGE_FILE);
    write_tar(&tar, files, mtime)?;
    let payload_sha256 = sha256_file(&tar)?;
    fs::write(content.join(MANIFEST_FILE), manifest(version, arch)).context("writing the bundle's manifest")?;

    let partial = work.path().join(&name);
    let (cert, key_file) = (&key.cert, &key.key);
    let mksquashfs_args = format!("--mksquashfs-args={MKSQUASHFS_ARGS}");
    capture(
        cmd!(
            sh,
            "rauc bundle --cert {cert} --key {key_file} {mksquashfs_args} {content} {partial}"
        )
        .env("SOURCE_DATE_EPOCH", mtime.to_string()),
    )
    .with_context(|| format!("signing the bundle {name} (rauc bundle)"))?;
    let bundle = out.join(&name);
    fs::rename(&partial, &bundle).with_context(|| format!("moving the bundle to {}", bundle.display()))?;
    Ok(Written { bundle, payload_sha256 })
}

/// `rootfs.tar`: the members in the order given, each after its parent
/// folders; root's, files 0644, folders 0755, all stamped `mtime`.
pub fn write_tar(path: &Path, files: &[(&str, &Path)], mtime: u64) -> anyhow::Result<()> {
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut builder = tar::Builder::new(BufWriter::new(file));
    let mut dirs: Vec<String> = Vec::new();
    let header = |mode: u32, kind: tar::EntryType, size: u64| -> anyhow::Result<tar::Header> {
        let mut h = tar::Header::new_gnu();
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_username("root").context("setting a tar user name")?;
        h.set_groupname("root").context("setting a tar group name")?;
        h.set_mtime(mtime);
        h.set_entry_type(kind);
        h.set_size(size);
        Ok(h)
    };
    for (name, source) in files {
        check_member(name)?;
        let parts: Vec<&str> = name.split('/').collect();
        for depth in 1..parts.len() {
            let dir = parts[..depth].join("/");
            if !dirs.contains(&dir) {
                let mut h = header(DIR_MODE, tar::EntryType::Directory, 0)?;
                builder
                    .append_data(&mut h, format!("{dir}/"), std::io::empty())
                    .with_context(|| format!("adding {dir}/ to {}", path.display()))?;
                dirs.push(dir);
            }
        }
        let f = File::open(source).with_context(|| format!("opening {}", source.display()))?;
        let meta = f.metadata().with_context(|| format!("reading {}", source.display()))?;
        if !meta.is_file() {
            bail!("{} (member {name}) is not a regular file", source.display());
        }
        let mut h = header(FILE_MODE, tar::EntryType::Regular, meta.len())?;
        builder
            .append_data(&mut h, name, f.take(meta.len()))
            .with_context(|| format!("adding {} to {} as {name}", source.display(), path.display()))?;
    }
    let mut out = builder
        .into_inner()
        .with_context(|| format!("finishing {}", path.display()))?;
    out.flush().with_context(|| format!("writing {}", path.display()))?;
    out.into_inner()
        .map_err(|e| e.into_error())
        .and_then(|f| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

/// A member name is a relative path without `.` or `..`.
fn check_member(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && !name.ends_with('/')
        && Path::new(name).components().all(|c| matches!(c, Component::Normal(_)))
        && !name.contains("//");
    if !ok {
        bail!("bundle member {name:?}: allowed: a relative path (like live/vmlinuz) without '.', '..' or empty parts");
    }
    Ok(())
}

/// What `rauc info` says about a bundle it verified.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BundleInfo {
    pub compatible: String,
    pub version: String,
}

/// `rauc info --keyring CERT`: the bundle's signature checked against
/// `keyring` (as a node with that keyring checks it, at the current time),
/// and its manifest.
pub fn verify(sh: &Shell, bundle: &Path, keyring: &Path) -> anyhow::Result<BundleInfo> {
    let json = capture(cmd!(sh, "rauc info --keyring {keyring} --output-format=json {bundle}")).with_context(|| {
        format!(
            "the bundle {} does not verify with the keyring {}",
            bundle.display(),
            keyring.display()
        )
    })?;
    serde_json::from_str(json.trim()).with_context(|| format!("reading `rauc info` of {}: {json}", bundle.display()))
}

/// The release bundle of an ISO build, from its staging folder: signed,
/// then verified with the certificate the image trusts, as a node would.
pub fn write_release_bundle(
    sh: &Shell,
    staging: &Path,
    out: &Path,
    version: &Version,
    arch: &str,
    key: &SigningKey,
    epoch: Epoch,
) -> anyhow::Result<Written> {
    let members = release_members(staging);
    let files: Vec<(&str, &Path)> = members.iter().map(|(n, p)| (n.as_str(), p.as_path())).collect();
    let written = write_bundle_at(sh, out, &files, version, arch, key, epoch.seconds)?;
    let info = verify(sh, &written.bundle, &key.cert)?;
    let expected = BundleInfo {
        compatible: compatible(arch),
        version: version.to_string(),
    };
    if info != expected {
        bail!(
            "rauc info of {} shows {info:?}; it must show {expected:?}",
            written.bundle.display()
        );
    }
    Ok(written)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        Version::parse(s).unwrap()
    }

    #[test]
    fn the_manifest_names_compatible_version_format_and_the_one_image() {
        assert_eq!(
            manifest(&v("1.2.0-rc.1"), "amd64"),
            "[update]\ncompatible=archipelago-amd64\nversion=1.2.0-rc.1\n\n[bundle]\nformat=plain\n\n\
             [image.rootfs]\nfilename=rootfs.tar\n"
        );
        assert_eq!(file_name(&v("0.1.0"), "amd64"), "archipelago-0.1.0-amd64.raucb");
    }

    #[test]
    fn the_tar_holds_the_members_in_order_after_their_folders_as_root() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        fs::write(&a, b"{}\n").unwrap();
        fs::write(&b, vec![7u8; 3000]).unwrap();
        let tar = dir.path().join("rootfs.tar");
        write_tar(
            &tar,
            &[("release.json", &a), ("live/vmlinuz", &b), ("live/initrd.img", &a)],
            1_700_000_000,
        )
        .unwrap();
        let mut archive = tar::Archive::new(File::open(&tar).unwrap());
        let entries: Vec<(String, u32, u64, u64, u64)> = archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                (
                    e.path().unwrap().display().to_string(),
                    h.mode().unwrap(),
                    h.uid().unwrap(),
                    h.mtime().unwrap(),
                    h.size().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            entries,
            [
                ("release.json".into(), 0o644, 0, 1_700_000_000, 3),
                ("live/".into(), 0o755, 0, 1_700_000_000, 0),
                ("live/vmlinuz".into(), 0o644, 0, 1_700_000_000, 3000),
                ("live/initrd.img".into(), 0o644, 0, 1_700_000_000, 3),
            ]
        );
        for bad in ["/etc/passwd", "../x", "live/../x", "./x", "", "live/", "a//b"] {
            let e = write_tar(&tar, &[(bad, &a)], 0).unwrap_err().to_string();
            assert!(e.contains("allowed: a relative path"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_release_lists_release_json_first_and_bootargs_when_present() {
        let dir = tempfile::tempdir().unwrap();
        let names = |d: &Path| -> Vec<String> { release_members(d).into_iter().map(|(n, _)| n).collect() };
        assert_eq!(
            names(dir.path()),
            [
                "release.json",
                "live/vmlinuz",
                "live/initrd.img",
                "live/filesystem.squashfs"
            ]
        );
        fs::create_dir(dir.path().join("live")).unwrap();
        fs::write(dir.path().join("live/bootargs"), b"x").unwrap();
        assert_eq!(names(dir.path()).last().unwrap(), "live/bootargs");
    }

    /// Real openssl and rauc, on small dummy files.
    mod signed {
        use std::os::unix::fs::PermissionsExt as _;

        use super::*;
        use crate::pipeline::keys;

        fn shell() -> Shell {
            Shell::new().unwrap()
        }

        /// A release folder of dummy files, with a real release.json.
        fn release_dir(dir: &Path, version: &str) -> PathBuf {
            let root = dir.join("release");
            fs::create_dir_all(root.join("live")).unwrap();
            for (i, name) in LIVE_FILES.iter().enumerate() {
                fs::write(root.join(name), vec![b'a' + i as u8; 5000 + i]).unwrap();
            }
            let release = archy_agent::os::release::Release::of_dir(&root, v(version), "amd64").unwrap();
            fs::write(root.join(RELEASE_FILE), release.to_file_bytes().unwrap()).unwrap();
            root
        }

        fn members(root: &Path) -> Vec<(String, PathBuf)> {
            release_members(root)
        }

        fn as_refs(m: &[(String, PathBuf)]) -> Vec<(&str, &Path)> {
            m.iter().map(|(n, p)| (n.as_str(), p.as_path())).collect()
        }

        /// The bundle without its signature (and the signature's size
        /// after it): RAUC appends the CMS signature and its length as a
        /// big-endian u64.
        fn unsigned_part(bundle: &Path) -> Vec<u8> {
            let bytes = fs::read(bundle).unwrap();
            let (rest, len) = bytes.split_at(bytes.len() - 8);
            let sig_len = u64::from_be_bytes(len.try_into().unwrap()) as usize;
            rest[..rest.len() - sig_len].to_vec()
        }

        #[test]
        fn the_development_key_is_made_once_private_and_valid_from_before_2000() {
            let sh = shell();
            let dir = tempfile::tempdir().unwrap();
            let keys_dir = dir.path().join("target/keys");
            let (key, made) = keys::development(&sh, &keys_dir).unwrap();
            assert!(made && key.development);
            let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&key.key), 0o600, "the key is the owner's only");
            assert_eq!(mode(&keys_dir) & 0o077, 0, "its folder too");
            let cert = fs::read(&key.cert).unwrap();
            let (again, made) = keys::development(&sh, &keys_dir).unwrap();
            assert!(!made, "made once");
            assert_eq!(again, key);
            assert_eq!(fs::read(&again.cert).unwrap(), cert);
            let dates = keys::cert_dates(&sh, &key.cert).unwrap();
            assert!(
                dates.not_before <= keys::LATEST_START,
                "notBefore {} is after 2000-01-01",
                dates.not_before
            );
            assert!(dates.not_after.year >= 2099, "{}", dates.not_after);

            // A key others may read is refused, naming the mode and the fix.
            fs::set_permissions(&key.key, fs::Permissions::from_mode(0o644)).unwrap();
            let e = key.check(&sh).unwrap_err().to_string();
            assert!(e.contains("mode 0644") && e.contains("chmod 600"), "{e}");
            fs::set_permissions(&key.key, fs::Permissions::from_mode(0o600)).unwrap();
            // A certificate of another key is refused.
            let other_dir = dir.path().join("other");
            fs::create_dir(&other_dir).unwrap();
            let other = keys::generate(&sh, &other_dir, "other").unwrap();
            let mixed = keys::SigningKey {
                key: key.key.clone(),
                cert: other.cert.clone(),
                development: false,
            };
            let e = mixed.check(&sh).unwrap_err().to_string();
            assert!(e.contains("does not belong to the signing key"), "{e}");
        }

        #[test]
        fn a_bundle_verifies_with_its_keyring_only_and_not_once_a_byte_changed() {
            let sh = shell();
            let dir = tempfile::tempdir().unwrap();
            let (key, _) = keys::development(&sh, &dir.path().join("keys")).unwrap();
            let root = release_dir(dir.path(), "1.2.3-rc.1");
            let m = members(&root);
            let out = dir.path().join("out");
            let bundle = write_bundle(&sh, &out, &as_refs(&m), &v("1.2.3-rc.1"), "amd64", &key).unwrap();
            assert_eq!(bundle, out.join("archipelago-1.2.3-rc.1-amd64.raucb"));
            let info = verify(&sh, &bundle, &key.cert).unwrap();
            assert_eq!(
                info,
                BundleInfo {
                    compatible: "archipelago-amd64".into(),
                    version: "1.2.3-rc.1".into()
                }
            );
            let leftovers: Vec<_> = fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name()).collect();
            assert_eq!(leftovers, [bundle.file_name().unwrap()], "no work folder is left");

            // What RAUC extracts is the tar: release.json first, then the live files.
            let extracted = dir.path().join("extracted");
            let keyring = &key.cert;
            capture(cmd!(sh, "rauc extract --keyring {keyring} {bundle} {extracted}")).unwrap();
            let mut archive = tar::Archive::new(File::open(extracted.join(IMAGE_FILE)).unwrap());
            let names: Vec<String> = archive
                .entries()
                .unwrap()
                .map(|e| e.unwrap().path().unwrap().display().to_string())
                .collect();
            assert_eq!(
                names,
                [
                    "release.json",
                    "live/",
                    "live/vmlinuz",
                    "live/initrd.img",
                    "live/filesystem.squashfs"
                ]
            );

            // Another key's certificate: refused.
            let other_dir = dir.path().join("other");
            fs::create_dir(&other_dir).unwrap();
            let other = keys::generate(&sh, &other_dir, keys::DEV_SUBJECT_CN).unwrap();
            let e = format!("{:#}", verify(&sh, &bundle, &other.cert).unwrap_err());
            assert!(
                e.contains("does not verify") && e.contains("signature verification failed"),
                "{e}"
            );

            // One byte flipped, anywhere in the payload or in the signature
            // value (the CMS structure's last bytes before RAUC's length):
            // refused. (Some bytes of the CMS structure, like its list of
            // digest algorithms, are hints no signature covers.)
            let len = fs::metadata(&bundle).unwrap().len() as usize;
            let payload_len = unsigned_part(&bundle).len();
            for at in [0, 100, payload_len / 2, payload_len - 1, len - 8 - 10] {
                assert!(at < len);
                let mut bytes = fs::read(&bundle).unwrap();
                bytes[at] ^= 0x01;
                let flipped = dir.path().join(format!("flipped-{at}.raucb"));
                fs::write(&flipped, bytes).unwrap();
                let e = format!("{:#}", verify(&sh, &flipped, &key.cert).unwrap_err());
                assert!(e.contains("does not verify"), "byte {at}: {e}");
            }
        }

        #[test]
        fn the_payload_is_reproducible_and_only_the_signature_differs() {
            let sh = shell();
            let dir = tempfile::tempdir().unwrap();
            let (key, _) = keys::development(&sh, &dir.path().join("keys")).unwrap();
            let root = release_dir(dir.path(), "0.3.0");
            fs::write(root.join("live/bootargs"), b"# GRUB Environment Block\n").unwrap();
            let m = members(&root);
            assert_eq!(m.last().unwrap().0, "live/bootargs");
            let first = write_bundle_at(
                &sh,
                &dir.path().join("one"),
                &as_refs(&m),
                &v("0.3.0"),
                "amd64",
                &key,
                1_700_000_000,
            )
            .unwrap();
            // Other mtimes on the host files change nothing.
            std::thread::sleep(std::time::Duration::from_millis(1100));
            for (_, path) in &m {
                let f = File::options().append(true).open(path).unwrap();
                f.set_modified(std::time::SystemTime::now()).unwrap();
            }
            let second = write_bundle_at(
                &sh,
                &dir.path().join("two"),
                &as_refs(&m),
                &v("0.3.0"),
                "amd64",
                &key,
                1_700_000_000,
            )
            .unwrap();
            assert_eq!(first.payload_sha256, second.payload_sha256);
            assert_eq!(
                unsigned_part(&first.bundle),
                unsigned_part(&second.bundle),
                "the bundles differ before their signatures"
            );
            let third = write_bundle_at(
                &sh,
                &dir.path().join("three"),
                &as_refs(&m),
                &v("0.3.0"),
                "amd64",
                &key,
                1_700_000_001,
            )
            .unwrap();
            assert_ne!(
                first.payload_sha256, third.payload_sha256,
                "the epoch is in the payload"
            );
        }
    }
}
