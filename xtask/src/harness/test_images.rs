//! Test images built from Debian's static busybox (no Docker Hub), pushed
//! to the loopback registries and then removed from the private storage, so
//! that every test that needs one really pulls it.

use std::os::unix::fs::symlink;
use std::path::Path;

use anyhow::{bail, Context as _};
use archy_agent::manifest::{Digest, PinnedImage};
use xshell::{cmd, Shell};

use crate::harness::podman::Podman;
use crate::harness::procs::{bail_if_interrupted, capture};
use crate::harness::registries::Registry;
use crate::tools::STATIC_BUSYBOX;

pub const REPOSITORY: &str = "archy-test/busybox";
/// Where an image says which variant it is; tests can `cat` it.
pub const RELEASE_FILE: &str = "etc/archy-test-release";

const DEFAULT_CMD: &str = r#"CMD ["/bin/sh"]"#;
/// GNU tar flags for an image layer whose files all belong to root,
/// whoever packs it.
pub const ROOT_OWNED_TAR_FLAGS: &[&str] = &["--numeric-owner", "--owner=0", "--group=0"];
const EMPTY_DIRS: &[&str] = &["dev", "proc", "sys", "etc", "root", "run", "var", "usr", "home"];
/// Shebangs and scripts name tools under any of these.
const BIN_ALIASES: &[(&str, &str)] = &[("sbin", "bin"), ("usr/bin", "../bin"), ("usr/sbin", "../bin")];
const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
const GROUP: &str = "root:x:0:\nnogroup:x:65534:\n";

#[derive(Debug)]
pub struct Published {
    /// v1 on the registry without auth.
    pub v1: PinnedImage,
    /// A different image (another release file), the upgrade target.
    pub v2: PinnedImage,
    /// v1 on the registry with auth: the same digest as `v1`.
    pub v1_auth: PinnedImage,
}

pub fn build_and_publish(
    sh: &Shell,
    podman: &Podman,
    work: &Path,
    plain: &Registry,
    auth: &Registry,
) -> anyhow::Result<Published> {
    let applets = busybox_applets(sh)?;
    let v1 = build_and_push(sh, podman, work, &applets, "v1", plain)?;
    let v2 = build_and_push(sh, podman, work, &applets, "v2", plain)?;
    if v1.digest() == v2.digest() {
        bail!("test images v1 and v2 came out identical ({})", v1.digest());
    }
    let v1_auth = copy_to(sh, podman, work, &v1, auth)?;
    remove_local_images(sh, podman)?;
    Ok(Published { v1, v2, v1_auth })
}

fn busybox_applets(sh: &Shell) -> anyhow::Result<Vec<String>> {
    let list = cmd!(sh, "{STATIC_BUSYBOX} --list")
        .quiet()
        .read()
        .with_context(|| format!("listing the applets of {STATIC_BUSYBOX}"))?;
    Ok(list
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox")
        .map(str::to_owned)
        .collect())
}

fn build_and_push(
    sh: &Shell,
    podman: &Podman,
    work: &Path,
    applets: &[String],
    tag: &str,
    registry: &Registry,
) -> anyhow::Result<PinnedImage> {
    bail_if_interrupted()?;
    let rootfs = work.join(tag).join("rootfs");
    stage_rootfs(&rootfs, applets, tag).with_context(|| format!("staging the rootfs of test image {tag}"))?;
    let tarball = work.join(format!("{tag}.tar"));
    capture(cmd!(sh, "tar {ROOT_OWNED_TAR_FLAGS...} -C {rootfs} -cf {tarball} ."))
        .with_context(|| format!("packing test image {tag}"))?;

    let local = format!("localhost/{REPOSITORY}:{tag}");
    capture(
        podman
            .cmd(sh)
            .args(["import", "--quiet", "--change", DEFAULT_CMD])
            .arg(&tarball)
            .arg(&local),
    )
    .with_context(|| format!("importing {} as {local}", tarball.display()))?;

    let remote = format!("{}/{REPOSITORY}:{tag}", registry.host);
    let digest_file = work.join(format!("{tag}.{}.digest", registry.name));
    let mut push = podman
        .cmd(sh)
        .args(["push", "--quiet", "--tls-verify=false", "--digestfile"])
        .arg(&digest_file);
    if let Some(creds) = &registry.auth {
        push = push.args(["--creds", &creds.joined()]);
    }
    capture(push.arg(&local).arg(format!("docker://{remote}")))
        .with_context(|| format!("pushing {local} to {remote}"))?;
    pinned(&remote, &digest_file)
}

fn stage_rootfs(rootfs: &Path, applets: &[String], release: &str) -> anyhow::Result<()> {
    let bin = rootfs.join("bin");
    create_dir(&bin)?;
    for dir in EMPTY_DIRS {
        create_dir(&rootfs.join(dir))?;
    }
    let tmp = rootfs.join("tmp");
    create_dir(&tmp)?;
    set_mode(&tmp, 0o1777)?;
    let busybox = bin.join("busybox");
    std::fs::copy(STATIC_BUSYBOX, &busybox)
        .with_context(|| format!("copying {STATIC_BUSYBOX} to {}", busybox.display()))?;
    for applet in applets {
        link(Path::new("busybox"), &bin.join(applet))?;
    }
    for (alias, target) in BIN_ALIASES {
        link(Path::new(target), &rootfs.join(alias))?;
    }
    write(&rootfs.join("etc/passwd"), PASSWD)?;
    write(&rootfs.join("etc/group"), GROUP)?;
    write(&rootfs.join(RELEASE_FILE), &format!("{release}\n"))?;
    Ok(())
}

/// Copies `image` to `registry` keeping its manifest byte for byte, so that
/// both registries serve the same digest (a mirror).
fn copy_to(
    sh: &Shell,
    podman: &Podman,
    work: &Path,
    image: &PinnedImage,
    registry: &Registry,
) -> anyhow::Result<PinnedImage> {
    bail_if_interrupted()?;
    let tag = image.tag().unwrap_or("latest");
    let source = format!("docker://{}", image.by_digest());
    let remote = format!("{}/{}:{tag}", registry.host, image.repository());
    let digest_file = work.join(format!("{tag}.{}.digest", registry.name));
    let mut copy = cmd!(
        sh,
        "skopeo copy --quiet --preserve-digests --src-tls-verify=false --dest-tls-verify=false"
    );
    for (key, path) in podman.env() {
        copy = copy.env(key, path);
    }
    if let Some(creds) = &registry.auth {
        copy = copy.args(["--dest-creds", &creds.joined()]);
    }
    capture(
        copy.arg("--digestfile")
            .arg(&digest_file)
            .arg(&source)
            .arg(format!("docker://{remote}")),
    )
    .with_context(|| format!("copying {source} to {remote}"))?;
    let copied = pinned(&remote, &digest_file)?;
    if copied.digest() != image.digest() {
        bail!(
            "copying {} to {remote} changed its digest to {}",
            image.by_digest(),
            copied.digest()
        );
    }
    Ok(copied)
}

fn pinned(remote: &str, digest_file: &Path) -> anyhow::Result<PinnedImage> {
    let text = std::fs::read_to_string(digest_file)
        .with_context(|| format!("reading the digest of {remote} from {}", digest_file.display()))?;
    let digest: Digest = text
        .trim()
        .parse()
        .with_context(|| format!("digest file {} holds {text:?}", digest_file.display()))?;
    let reference = format!("{remote}@{digest}");
    reference
        .parse()
        .with_context(|| format!("the pushed image's reference {reference} is not a valid pinned image"))
}

/// Empties the private image store so that tests have to pull.
fn remove_local_images(sh: &Shell, podman: &Podman) -> anyhow::Result<()> {
    capture(podman.cmd(sh).args(["rmi", "--all", "--force"])).context("removing the built images from the store")?;
    let left = capture(podman.cmd(sh).args(["images", "--quiet"])).context("listing the store's images")?;
    if !left.trim().is_empty() {
        bail!("images remain in the private store after removing them all: {left}");
    }
    Ok(())
}

fn create_dir(path: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting mode {mode:o} on {}", path.display()))
}

fn link(target: &Path, at: &Path) -> anyhow::Result<()> {
    symlink(target, at).with_context(|| format!("linking {} to {}", at.display(), target.display()))
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}
