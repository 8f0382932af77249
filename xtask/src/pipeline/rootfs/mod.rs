//! `cargo xtask rootfs`: the Debian 12 root filesystem of a node.
//!
//! Two layers, so that the slow part is cached under the right key:
//!
//! 1. The **base**: mmdebstrap of `rootfs/packages.txt` from Debian's
//!    archive, with the files of `rootfs/overlay/`, the `archipelago` user
//!    and the enabled services. Cached as `target/cache/rootfs-<key>.tar`,
//!    the key being a sha256 over the package list, the overlay's contents,
//!    the release, the mirrors, the mmdebstrap flags and (when set)
//!    `SOURCE_DATE_EPOCH`.
//! 2. The **payload**, added to a fresh copy of the base at every build:
//!    the agent binary and its unit, the manifests, the pre-pulled images
//!    and a registry list. Changing only these reuses the cached base.
//!
//! Nothing comes from the build host: the base is Debian 12's packages, and
//! the agent binary, the one thing we build, is refused when it needs a
//! newer glibc than the base ships.

mod base;
mod checks;
mod timers;

pub use base::{
    debs_setup_hooks, debs_sync_out_hook, parse_package_list, release_and_mirrors, BaseSpec, CachedTarball,
};
use base::{obtain_base, unpack};
pub use checks::{verify, verify_keyring};

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use xshell::{cmd, Shell};

use crate::pipeline::flags::{self, BuildArgs, Epoch};
use crate::pipeline::glibc::{self, GlibcVersion};
use crate::pipeline::keys::SigningKey;
use crate::pipeline::layers::{sha256_file, Layer, EXEC_MODE, FILE_MODE};
use crate::pipeline::payload;
use crate::pipeline::progress::{self, Progress, StageOutput};
use crate::pipeline::report::{AgentInput, ImageRecord, Inputs, KeyringInput, Package, Report, REPORT_FORMAT};
use crate::tools;
use archy_agent::os::release::Version;

pub const RELEASE: &str = "bookworm";
/// What `/etc/debian_version` of a bookworm rootfs starts with.
const DEBIAN_VERSION_PREFIX: &str = "12.";
pub const PACKAGES_FILE: &str = "rootfs/packages.txt";
pub const OVERLAY_DIR: &str = "rootfs/overlay";
pub const UNIT_FILE: &str = "rootfs/units/archy-agent.service";

/// Debian 12 and its updates. Security updates come from their own archive.
pub const MIRRORS: &[&str] = &[
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://security.debian.org/debian-security bookworm-security main",
];

/// mmdebstrap's flags; every one of them is part of the cache key.
const MMDEBSTRAP_FLAGS: &[&str] = &["--mode=root", "--variant=minbase", "--format=tar"];

/// What every tree mmdebstrap makes for us leaves out (also the UI base
/// image's): recommends, suggests, and files nobody reads on a node.
pub const SLIM_FLAGS: &[&str] = &[
    r#"--aptopt=APT::Install-Recommends "false""#,
    r#"--aptopt=APT::Install-Suggests "false""#,
    // Documentation, man pages and translations are left out, now and for
    // every package installed later (the options stay in the image).
    // Copyright files stay.
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-include=/usr/share/doc/*/copyright",
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/info/*",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
    "--dpkgopt=path-exclude=/usr/share/lintian/*",
    // Keep downloaded packages until the customize hooks have copied them
    // to the download cache (target/cache/debs).
    "--skip=essential/unlink",
];

/// The user apps' rootless containers map to (subuid/subgid 100000:65536
/// come from the overlay). useradd leaves the password field `!`, which
/// sshd without PAM takes for a locked account and refuses even with a key;
/// `*` matches no password either and is no lock, so a key login never
/// depends on Debian's `UsePAM yes`. The installer may set a console
/// password; sshd never takes one (sshd_config.d/archipelago.conf).
const USER_HOOK: &str = r#"chroot "$1" useradd --uid 1000 --user-group --create-home --shell /bin/bash archipelago && chroot "$1" usermod --password '*' archipelago"#;
/// The node's user, made by [`USER_HOOK`].
const NODE_USER: &str = "archipelago";
/// The user's password field after [`USER_HOOK`], checked in the tree.
const USER_PASSWORD_FIELD: &str = "*";
/// openssh-server's postinst makes host keys: every node would share them
/// and no two builds would be the same. Each node makes its own, once, on
/// its data disk (`archy-agent ssh prepare`).
const SSH_HOST_KEYS_HOOK: &str = r#"rm -f "$1"/etc/ssh/ssh_host_*"#;
const SSH_HOST_KEYS_DIR: &str = "etc/ssh";
const SSH_HOST_KEY_PREFIX: &str = "ssh_host_";
/// The console text `archy-agent ssh prepare` writes (the node's addresses
/// as agetty's `\4`, `ssh archipelago@…`, the host key's fingerprint, the
/// apps' UIs). Debian 12's agetty (util-linux 2.38) reads /run/issue.d only
/// when /etc/issue does not exist, and base-files ships /etc/issue; it does
/// read /etc/issue.d/*.issue, following symlinks and skipping a dangling
/// one. So the overlay links the file there, and every getty (tty1, the
/// serial console) shows it and reprints it when an address changes (the
/// `\4` escape makes agetty watch netlink) or on `agetty --reload`.
pub const CONSOLE_ISSUE_FILE: &str = "/run/issue.d/50-archipelago.issue";
const CONSOLE_ISSUE_LINK: &str = "/etc/issue.d/50-archipelago.issue";
/// Services Debian does not enable by itself.
/// Rootless: the archipelago user's Podman socket starts with its systemd
/// (which lingering starts at boot).
const ENABLE_HOOK: &str =
    r#"chroot "$1" systemctl enable systemd-networkd.service && chroot "$1" systemctl --global enable podman.socket"#;

/// The netavark binary podman runs, and the series bookworm ships.
const NETAVARK_PATH: &str = "/usr/lib/podman/netavark";
const NETAVARK_PACKAGE: &str = "netavark";
const BOOKWORM_NETAVARK_SERIES: &str = "1.4.";
/// Checked with `dpkg --verify`: their files are exactly what Debian shipped.
const VERIFIED_PACKAGES: &[&str] = &["netavark", "aardvark-dns", "podman", "crun", "conmon"];
const CONTAINERS_CONF: &str = "etc/containers/containers.conf";

const AGENT_PACKAGE: &str = "archy-agent";
const AGENT_BIN: &str = "archy-agent";
const NODE_AGENT_PATH: &str = "usr/bin/archy-agent";
/// The node's own units, from `rootfs/units/`, each installed and enabled
/// in its target: the medium check early (installed boots), the data disk
/// first, then the apps unit (it stops them at shutdown), the agent, and
/// SSH's preparation; the installer in install mode only. Each unit's
/// conditions decide whether it runs (install mode, installed boot).
pub const UNITS_DIR: &str = "rootfs/units";
const NODE_UNITS: &[(&str, &str)] = &[
    ("archy-medium.service", "sysinit.target"),
    ("archy-data.service", "multi-user.target"),
    ("archy-apps.service", "multi-user.target"),
    ("archy-agent.service", "multi-user.target"),
    ("archy-ssh.service", "multi-user.target"),
    ("archy-installer.service", "multi-user.target"),
    ("archy-os.socket", "sockets.target"),
    // OS updates (issue 16): boot-prepare, the trial's check (also required
    // by boot-complete.target's drop-in) and the commit.
    ("archy-os-prepare.service", "multi-user.target"),
    ("archy-boot-check.service", "boot-complete.target"),
    ("archy-mark-good.service", "multi-user.target"),
];
/// Node units installed but not enabled: started by another unit (the OS
/// helper, one instance per connection to archy-os.socket).
const NODE_STATIC_UNITS: &[&str] = &["archy-os@.service"];
const NODE_UNIT_DIR: &str = "usr/lib/systemd/system";
const SYSTEM_UNIT_ETC: &str = "etc/systemd/system";
/// Units that expect a mutable, networked Debian: a node's OS is replaced
/// whole by updates, never upgraded by apt in place. Masked; every timer
/// still enabled must be on `rootfs/timers.allow`.
const APPLIANCE_MASKED_UNITS: &[&str] = &[
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    // e2scrub checks ext4 file systems on LVM snapshots; a node has no LVM.
    "e2scrub_all.timer",
];
/// The enabled timers the rootfs may have, beside packages.txt.
pub const TIMERS_ALLOW_FILE: &str = "rootfs/timers.allow";
const ROOT_PODMAN_UNITS: &[&str] = &[
    "podman.socket",
    "podman.service",
    "podman-restart.service",
    "podman-auto-update.service",
    "podman-auto-update.timer",
];
/// Which Archipelago a node runs, for people and scripts.
const NODE_RELEASE_FILE: &str = "etc/archipelago-release";
/// The certificates RAUC trusts: a node installs only bundles signed by
/// the key its own image was built with.
pub const KEYRING_PATH: &str = "etc/rauc/keyring.pem";

const CACHE_FORMAT: u32 = 1;
/// Base tarballs kept in target/cache (each is several hundred MB).
const CACHE_KEEP: usize = 3;
/// GNU tar flags that keep a rootfs tree as it is: numeric owners, modes
/// and extended attributes (file capabilities).
pub const TREE_TAR_FLAGS: &[&str] = &["--numeric-owner", "--xattrs", "--xattrs-include=*"];
const DPKG_STATUS_MEMBER: &str = "./var/lib/dpkg/status";

/// How the base layer is obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BasePolicy {
    /// From the cache, building and caching it on a miss.
    Cached,
    /// Built again, replacing the cached copy.
    Refresh,
    /// Built again into the work folder, the cache neither read nor written
    /// (`--check-reproducible`'s second build).
    Fresh,
}

impl BasePolicy {
    pub fn from_args(args: &BuildArgs) -> BasePolicy {
        if args.no_cache {
            BasePolicy::Refresh
        } else {
            BasePolicy::Cached
        }
    }
}

/// An assembled rootfs tree and what the report says about it.
#[derive(Debug)]
pub struct Built {
    pub tree: PathBuf,
    pub packages: Vec<Package>,
    pub inputs: Inputs,
    pub images: Vec<ImageRecord>,
    /// The release's version, as the tree names it.
    pub version: Version,
    /// The key whose certificate the tree trusts as its RAUC keyring.
    pub key: SigningKey,
}

/// `cargo xtask rootfs`.
pub fn run(root: &Path, args: &BuildArgs) -> anyhow::Result<ExitCode> {
    args.arch.check_supported()?;
    flags::require_root("rootfs")?;
    let sh = Shell::new().context("creating a shell")?;
    tools::ensure(&sh, tools::ROOTFS_STAGE)?;
    let epoch = Epoch::from_env()?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| flags::target_dir(root).join("rootfs"));
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let mut progress = Progress::new();
    let built = build(
        root,
        &sh,
        args,
        epoch,
        &out.join("tree"),
        BasePolicy::from_args(args),
        &mut progress,
    )?;
    let report = Report {
        format: REPORT_FORMAT,
        product: flags::PRODUCT.into(),
        version: built.version.to_string(),
        arch: args.arch.debian_name().into(),
        release: RELEASE.into(),
        source_date_epoch: epoch.explicit_seconds(),
        artifact: None,
        bundle: None,
        sums_signature: None,
        inputs: built.inputs,
        packages: built.packages,
        images: built.images,
        stages: progress.stages.clone(),
        total_seconds: (progress.elapsed_seconds() * 10.0).round() / 10.0,
    };
    let report_path = out.join("rootfs-report.json");
    report.write(&report_path)?;
    println!("rootfs:  {}", built.tree.display());
    println!("report:  {}", report_path.display());
    println!("total:   {}", progress::human_duration(progress.elapsed_seconds()));
    Ok(ExitCode::SUCCESS)
}

/// Builds the rootfs tree at `tree` (replacing what is there).
pub fn build(
    root: &Path,
    sh: &Shell,
    args: &BuildArgs,
    epoch: Epoch,
    tree: &Path,
    policy: BasePolicy,
    progress: &mut Progress,
) -> anyhow::Result<Built> {
    let cache_dir = args.cache_dir(root);
    flags::refuse_whitespace(&cache_dir, "the cache folder")?;
    flags::refuse_whitespace(tree, "the output folder")?;
    let version = args.release.version()?;
    let key = SigningKey::resolve(root, sh, &args.release)?;

    // Everything cheap and likely to fail first, before minutes of work.
    let (payload, inputs_partial) =
        progress.stage("inputs", "checking the manifests, images and registry list", || {
            let apps = payload::load_manifests(&args.manifests)?;
            let mut layer = Layer::new();
            let manifests = payload::add_manifests(&mut layer, &apps)?;
            let (images, images_lock_sha256) = match args.images_dir(root)? {
                Some(dir) => {
                    let images = payload::add_images(&mut layer, &dir, &apps)?;
                    (images, Some(sha256_file(&dir.join(flags::IMAGES_LOCK))?))
                }
                None => {
                    if !args.no_images {
                        // Not an error: a base OS is a valid build. But the
                        // node then pulls at first boot, so say it.
                        progress::say(
                            "inputs",
                            &format!(
                                "no pre-pulled images ({} does not exist): the node will pull at first boot; \
                                 run `cargo xtask images` first (`cargo xtask iso` does), or pass --no-images \
                                 to say this is meant",
                                flags::target_dir(root).join(flags::IMAGES_SUBDIR).display()
                            ),
                        );
                    }
                    (Vec::new(), None)
                }
            };
            let registries_sha256 = args
                .registries
                .as_deref()
                .map(|f| payload::add_registries(&mut layer, f))
                .transpose()?;
            for (name, target) in NODE_UNITS {
                let installed = format!("{NODE_UNIT_DIR}/{name}");
                layer.add_file_with_mode(&installed, &root.join(UNITS_DIR).join(name), FILE_MODE)?;
                layer.add_symlink(
                    &format!("{SYSTEM_UNIT_ETC}/{target}.wants/{name}"),
                    &format!("/{installed}"),
                )?;
            }
            for name in NODE_STATIC_UNITS {
                layer.add_file_with_mode(
                    &format!("{NODE_UNIT_DIR}/{name}"),
                    &root.join(UNITS_DIR).join(name),
                    FILE_MODE,
                )?;
            }
            for unit in APPLIANCE_MASKED_UNITS {
                layer.add_symlink(&format!("{SYSTEM_UNIT_ETC}/{unit}"), "/dev/null")?;
            }
            // Apps run rootless: root's own Podman units, which Debian
            // enables, are masked (README: the rootful option unmasks
            // them). podman-restart.service once ran root's podman at boot,
            // which made /var/lib/archipelago/containers root's and left the
            // rootless engine unable to start.
            for unit in ROOT_PODMAN_UNITS {
                layer.add_symlink(&format!("{SYSTEM_UNIT_ETC}/{unit}"), "/dev/null")?;
            }
            if let Some(extra) = &args.overlay {
                layer
                    .add_tree("", extra)
                    .with_context(|| format!("adding the overlay {}", extra.display()))?;
            }
            let unit = root.join(UNIT_FILE);
            let release = format!("NAME=Archipelago\nVERSION={version}\nDEBIAN_RELEASE={RELEASE}\n");
            layer.add_bytes(NODE_RELEASE_FILE, release.into_bytes(), FILE_MODE)?;
            layer.add_file_with_mode(KEYRING_PATH, &key.cert, FILE_MODE)?;
            let note = format!(
                "{} app{}, {} image{}{}",
                apps.len(),
                if apps.len() == 1 { "" } else { "s" },
                images.len(),
                if images.len() == 1 { "" } else { "s" },
                if registries_sha256.is_some() {
                    ", a registry list"
                } else {
                    ""
                }
            );
            let partial = PartialInputs {
                manifests,
                images,
                images_lock_sha256,
                registries_sha256,
                unit_sha256: sha256_file(&unit)?,
            };
            let bytes = layer.size()?;
            Ok((
                (layer, partial),
                StageOutput {
                    bytes: Some(bytes),
                    note,
                },
            ))
        })?;
    let mut payload = payload;

    let what = match &args.agent {
        Some(path) => format!("using the agent binary {}", path.display()),
        None => "building the agent (cargo build --release)".to_owned(),
    };
    let (agent_path, agent_source) = progress.stage("agent", &what, || {
        let (path, source) = match &args.agent {
            Some(path) => (path.clone(), format!("--agent {}", path.display())),
            None => (build_agent(root, sh)?, "cargo build --release".to_owned()),
        };
        let bytes = fs::metadata(&path)
            .with_context(|| format!("the agent binary {}", path.display()))?
            .len();
        Ok((
            (path, source),
            StageOutput {
                bytes: Some(bytes),
                note: String::new(),
            },
        ))
    })?;
    let needs = glibc::needs_of_file(&agent_path)?;

    let spec = BaseSpec::load(root, args.arch, epoch)?;
    let base = progress.stage("rootfs-base", "the Debian 12 base (mmdebstrap, or the cache)", || {
        let base = obtain_base(sh, &spec, &cache_dir, tree, policy)?;
        let bytes = fs::metadata(&base.tar).map(|m| m.len()).ok();
        let note = if base.from_cache {
            format!("cached, key {}", short(&spec.key))
        } else {
            format!("built, key {}", short(&spec.key))
        };
        Ok((base, StageOutput { bytes, note }))
    })?;

    let libc = base
        .packages
        .iter()
        .find(|p| p.name == "libc6")
        .context("the base rootfs has no libc6 package")?;
    let available = GlibcVersion::from_debian(&libc.version)
        .with_context(|| format!("cannot read a glibc version from libc6 {}", libc.version))?;
    glibc::check(&agent_path, &needs, &available, &format!("libc6 {}", libc.version))?;
    payload.add_file_with_mode(NODE_AGENT_PATH, &agent_path, EXEC_MODE)?;

    progress.stage(
        "rootfs",
        "unpacking the base and adding the agent, manifests and images",
        || {
            unpack(sh, &base.tar, tree)?;
            payload.install_into(tree, Some((0, 0)))?;
            if policy == BasePolicy::Fresh {
                // A fresh base lives in its work folder only.
                if let Some(work) = base.tar.parent() {
                    fs::remove_dir_all(work).with_context(|| format!("removing {}", work.display()))?;
                }
            }
            progress::say(
                "rootfs",
                "checking netavark, containers.conf, the agent, SSH, the enabled timers and the RAUC keyring inside the rootfs",
            );
            verify(sh, root, tree)?;
            verify_keyring(tree, &key.cert)?;
            Ok((
                (),
                StageOutput {
                    bytes: Some(progress::tree_size(tree)?),
                    note: String::new(),
                },
            ))
        },
    )?;

    let inputs = Inputs {
        git_commit: crate::pipeline::report::git_commit(sh),
        packages_txt_sha256: spec.packages_txt_sha256.clone(),
        package_list: spec.packages.clone(),
        overlay_sha256: spec.overlay_digest.clone(),
        mirrors: MIRRORS.iter().map(|m| (*m).to_owned()).collect(),
        mmdebstrap_args: spec.keyed_args(),
        rootfs_cache_key: spec.key.clone(),
        rootfs_base_sha256: base.sha256.clone(),
        agent: AgentInput {
            source: agent_source,
            sha256: sha256_file(&agent_path)?,
            glibc_needed: needs.newest()?.map(|v| v.to_string()),
            glibc_available: available.to_string(),
        },
        unit_sha256: inputs_partial.unit_sha256,
        manifests: inputs_partial.manifests,
        registries_sha256: inputs_partial.registries_sha256,
        images_lock_sha256: inputs_partial.images_lock_sha256,
        grub_cfg_sha256: None,
        keyring: KeyringInput {
            development: key.development,
            certificate_sha256: sha256_file(&key.cert)?,
        },
    };
    Ok(Built {
        tree: tree.to_path_buf(),
        packages: base.packages,
        inputs,
        images: inputs_partial.images,
        version,
        key,
    })
}

struct PartialInputs {
    manifests: Vec<crate::pipeline::report::ManifestRecord>,
    images: Vec<ImageRecord>,
    images_lock_sha256: Option<String>,
    registries_sha256: Option<String>,
    unit_sha256: String,
}

fn short(key: &str) -> &str {
    &key[..key.len().min(16)]
}

pub fn build_agent(root: &Path, sh: &Shell) -> anyhow::Result<PathBuf> {
    let target = flags::target_dir(root);
    agent_build_cmd(root, sh, &target)
        .run()
        .context("building the agent with cargo build --release")?;
    Ok(agent_binary(&target))
}

/// `cargo build --release` of the agent into the cargo target folder
/// `target`, with the flags every embedded agent is built with.
pub fn agent_build_cmd<'a>(root: &Path, sh: &'a Shell, target: &Path) -> xshell::Cmd<'a> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    cmd!(
        sh,
        "{cargo} build --release --package {AGENT_PACKAGE} --bin {AGENT_BIN}"
    )
    .env("CARGO_TARGET_DIR", target)
    .env("CARGO_ENCODED_RUSTFLAGS", agent_rustflags(root))
}

/// Where [`agent_build_cmd`] leaves the binary.
pub fn agent_binary(target: &Path) -> PathBuf {
    target.join("release").join(AGENT_BIN)
}

/// The build's own paths (the checkout, cargo's registry) are written into
/// the binary's panic messages; mapped to fixed names, the same sources
/// give the same binary in any checkout. RUSTFLAGS, if set, still apply.
fn agent_rustflags(root: &Path) -> String {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    let mut flags: Vec<String> = std::env::var("RUSTFLAGS")
        .map(|f| f.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    flags.push(format!("--remap-path-prefix={}=/build/archipelago", root.display()));
    if let Some(home) = cargo_home {
        flags.push(format!("--remap-path-prefix={}=/cargo", home.display()));
    }
    flags.join("\u{1f}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The image's agent (and the e2e's, built by the same command) never
    /// has the test builds' fail-points: no feature is turned on, not even
    /// by the environment.
    #[test]
    fn the_release_agent_is_built_without_test_features() {
        let sh = Shell::new().expect("shell");
        let root = Path::new("/checkout");
        let shown = agent_build_cmd(root, &sh, Path::new("/target")).to_string();
        assert!(shown.contains("build --release"), "{shown}");
        for feature in ["--features", "--all-features", "-F", "failpoints"] {
            assert!(
                !shown
                    .split_whitespace()
                    .any(|w| w == feature || w.contains("failpoints")),
                "{feature} in the release agent's build command: {shown}"
            );
        }
        assert!(
            crate::harness::test_env::TEST_FEATURES.contains("failpoints"),
            "the tests' features are the ones the release build must not have"
        );
    }
}
