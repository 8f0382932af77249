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

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};
use xshell::{cmd, Shell};

use crate::harness::procs::capture;
use crate::pipeline::flags::{self, Arch, BuildArgs, Epoch};
use crate::pipeline::glibc::{self, GlibcVersion};
use crate::pipeline::layers::{sha256_file, sha256_hex, Layer, EXEC_MODE, FILE_MODE};
use crate::pipeline::payload;
use crate::pipeline::progress::{self, Progress, StageOutput};
use crate::pipeline::report::{AgentInput, ImageRecord, Inputs, Package, Report, REPORT_FORMAT};
use crate::tools;

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
/// come from the overlay).
const USER_HOOK: &str = r#"chroot "$1" useradd --uid 1000 --user-group --create-home --shell /bin/bash archipelago"#;
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
/// (multi-user.target): the data disk first, then the apps unit (it
/// stops them at shutdown), then the agent.
pub const UNITS_DIR: &str = "rootfs/units";
const NODE_UNITS: &[&str] = &["archy-data.service", "archy-apps.service", "archy-agent.service"];
const NODE_UNIT_DIR: &str = "usr/lib/systemd/system";
const NODE_UNIT_WANTS: &str = "etc/systemd/system/multi-user.target.wants";
const ROOT_PODMAN_UNITS: &[&str] = &[
    "podman.socket",
    "podman.service",
    "podman-restart.service",
    "podman-auto-update.service",
    "podman-auto-update.timer",
];
/// Which Archipelago a node runs, for people and scripts.
const NODE_RELEASE_FILE: &str = "etc/archipelago-release";

const CACHE_FORMAT: u32 = 1;
/// Base tarballs kept in target/cache (each is several hundred MB).
const CACHE_KEEP: usize = 3;
const TAR_EXTRACT_FLAGS: &[&str] = &["--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf"];
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
        version: flags::VERSION.into(),
        arch: args.arch.debian_name().into(),
        release: RELEASE.into(),
        source_date_epoch: epoch.explicit_seconds(),
        artifact: None,
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
            for name in NODE_UNITS {
                let installed = format!("{NODE_UNIT_DIR}/{name}");
                layer.add_file_with_mode(&installed, &root.join(UNITS_DIR).join(name), FILE_MODE)?;
                layer.add_symlink(&format!("{NODE_UNIT_WANTS}/{name}"), &format!("/{installed}"))?;
            }
            // Apps run rootless: root's own Podman units, which Debian
            // enables, are masked (README: the rootful option unmasks
            // them). podman-restart.service once ran root's podman at boot,
            // which made /var/lib/archipelago/containers root's and left the
            // rootless engine unable to start.
            for unit in ROOT_PODMAN_UNITS {
                layer.add_symlink(&format!("etc/systemd/system/{unit}"), "/dev/null")?;
            }
            if let Some(extra) = &args.overlay {
                layer
                    .add_tree("", extra)
                    .with_context(|| format!("adding the overlay {}", extra.display()))?;
            }
            let unit = root.join(UNIT_FILE);
            let release = format!(
                "NAME=Archipelago\nVERSION={}\nDEBIAN_RELEASE={RELEASE}\n",
                flags::VERSION
            );
            layer.add_bytes(NODE_RELEASE_FILE, release.into_bytes(), FILE_MODE)?;
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
                "checking netavark, containers.conf and the agent inside the rootfs",
            );
            verify(sh, tree)?;
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
    };
    Ok(Built {
        tree: tree.to_path_buf(),
        packages: base.packages,
        inputs,
        images: inputs_partial.images,
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

/// Everything the base layer is made from, and its cache key.
#[derive(Debug)]
pub struct BaseSpec {
    pub arch: Arch,
    pub packages: Vec<String>,
    pub packages_txt_sha256: String,
    pub overlay: Layer,
    pub overlay_digest: String,
    pub epoch: Epoch,
    pub key: String,
}

/// What the cache key is computed over: no host paths, no times except an
/// explicit SOURCE_DATE_EPOCH.
#[derive(Serialize)]
struct KeyInputs<'a> {
    format: u32,
    release: &'a str,
    arch: &'a str,
    packages: &'a [String],
    overlay: &'a str,
    mirrors: &'a [&'a str],
    mmdebstrap: Vec<String>,
    source_date_epoch: Option<u64>,
}

impl BaseSpec {
    pub fn load(root: &Path, arch: Arch, epoch: Epoch) -> anyhow::Result<BaseSpec> {
        let path = root.join(PACKAGES_FILE);
        let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let packages = parse_package_list(&text).with_context(|| format!("in {}", path.display()))?;
        let mut overlay = Layer::new();
        overlay.add_tree("", &root.join(OVERLAY_DIR))?;
        let overlay_digest = overlay.digest()?;
        Ok(BaseSpec::new(
            arch,
            packages,
            sha256_hex(text.as_bytes()),
            overlay,
            overlay_digest,
            epoch,
        ))
    }

    fn new(
        arch: Arch,
        packages: Vec<String>,
        packages_txt_sha256: String,
        overlay: Layer,
        overlay_digest: String,
        epoch: Epoch,
    ) -> BaseSpec {
        let mut spec = BaseSpec {
            arch,
            packages,
            packages_txt_sha256,
            overlay,
            overlay_digest,
            epoch,
            key: String::new(),
        };
        let inputs = KeyInputs {
            format: CACHE_FORMAT,
            release: RELEASE,
            arch: arch.debian_name(),
            packages: &spec.packages,
            overlay: &spec.overlay_digest,
            mirrors: MIRRORS,
            mmdebstrap: spec.keyed_args(),
            source_date_epoch: epoch.explicit_seconds(),
        };
        // Serialising plain strings and numbers cannot fail.
        let json = serde_json::to_vec(&inputs).unwrap_or_default();
        spec.key = sha256_hex(&json);
        spec
    }

    /// mmdebstrap's arguments with host paths replaced by placeholders:
    /// the part that decides what the base contains.
    pub fn keyed_args(&self) -> Vec<String> {
        self.args(Path::new("<overlay.tar>"), None, Path::new("<output.tar>"))
    }

    fn args(&self, overlay_tar: &Path, debs: Option<&Path>, output: &Path) -> Vec<String> {
        let mut args: Vec<String> = MMDEBSTRAP_FLAGS
            .iter()
            .chain(SLIM_FLAGS)
            .map(|f| (*f).to_owned())
            .collect();
        args.push(format!("--architectures={}", self.arch.debian_name()));
        args.push(format!("--include={}", self.packages.join(",")));
        args.extend(debs.map(debs_setup_hooks).into_iter().flatten());
        args.push(format!("--customize-hook={USER_HOOK}"));
        args.push(format!("--customize-hook=tar-in {} /", overlay_tar.display()));
        args.push(format!("--customize-hook={ENABLE_HOOK}"));
        args.extend(debs.map(debs_sync_out_hook));
        args.extend(release_and_mirrors(output));
        args
    }
}

/// mmdebstrap's setup hooks that put the downloads kept in `debs` where
/// apt looks first, so that a rebuild downloads only what changed.
pub fn debs_setup_hooks(debs: &Path) -> [String; 2] {
    [
        r#"--setup-hook=mkdir -p "$1"/var/cache/apt/archives/"#.to_owned(),
        format!("--setup-hook=sync-in {} /var/cache/apt/archives/", debs.display()),
    ]
}

/// The customize hook that copies this build's downloads back to `debs`
/// (it needs `--skip=essential/unlink`).
pub fn debs_sync_out_hook(debs: &Path) -> String {
    format!("--customize-hook=sync-out /var/cache/apt/archives {}", debs.display())
}

/// mmdebstrap's last arguments: the release, the output and the mirrors.
pub fn release_and_mirrors(output: &Path) -> Vec<String> {
    let mut args = vec![RELEASE.to_owned(), output.display().to_string()];
    args.extend(MIRRORS.iter().map(|m| (*m).to_owned()));
    args
}

/// One package name per line; `#` starts a comment.
pub fn parse_package_list(text: &str) -> anyhow::Result<Vec<String>> {
    let mut packages = BTreeSet::new();
    let mut problems = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let name = line.split('#').next().unwrap_or("").trim();
        if name.is_empty() {
            continue;
        }
        let valid = name.len() >= 2
            && name.as_bytes()[0].is_ascii_alphanumeric()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b));
        if !valid {
            problems.push(format!(
                "line {}: {name:?} is not a Debian package name (lowercase letters, digits, + - .)",
                n + 1
            ));
        } else if !packages.insert(name.to_owned()) {
            problems.push(format!("line {}: {name} is listed twice", n + 1));
        }
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("; "));
    }
    if packages.is_empty() {
        bail!("the package list is empty");
    }
    Ok(packages.into_iter().collect())
}

/// A base tarball and its installed packages.
#[derive(Debug)]
pub struct Base {
    pub tar: PathBuf,
    pub sha256: String,
    pub packages: Vec<Package>,
    pub from_cache: bool,
}

/// The sidecar of a cached base tarball.
#[derive(Debug, Serialize, Deserialize)]
struct CacheMeta {
    key: String,
    sha256: String,
    packages: Vec<Package>,
}

/// One mmdebstrap tarball kept in the cache: `<cache>/<prefix>-<key>.tar`,
/// its sidecar `.json`, and its downloads in `<cache>/<debs>`.
#[derive(Debug, Clone, Copy)]
pub struct CachedTarball<'a> {
    /// The progress lines' stage name.
    pub stage: &'a str,
    /// What the cache files' names start with.
    pub prefix: &'a str,
    /// A sha256 over everything that decides the tarball's contents.
    pub key: &'a str,
    /// `SOURCE_DATE_EPOCH` for mmdebstrap, when the build is to be reproducible.
    pub epoch: Option<u64>,
    /// The download cache's folder name inside the cache folder: each
    /// tarball has its own, since each run prunes what it did not install.
    pub debs: &'a str,
    /// How many tarballs of this prefix are kept.
    pub keep: usize,
}

impl CachedTarball<'_> {
    fn name(&self) -> String {
        format!("{}-{}", self.prefix, short(self.key))
    }

    /// The tarball from the cache or from mmdebstrap, built in `work`
    /// (emptied first, on the cache's file system). `args` gets `work`, the
    /// download cache and the output path, may write inputs into `work`, and
    /// gives mmdebstrap's arguments.
    pub fn obtain(
        &self,
        sh: &Shell,
        cache_dir: &Path,
        work: &Path,
        policy: BasePolicy,
        args: impl FnOnce(&Path, &Path, &Path) -> anyhow::Result<Vec<String>>,
    ) -> anyhow::Result<Base> {
        fs::create_dir_all(cache_dir).with_context(|| format!("creating {}", cache_dir.display()))?;
        let name = self.name();
        let cached_tar = cache_dir.join(format!("{name}.tar"));
        let cached_meta = cache_dir.join(format!("{name}.json"));
        if policy == BasePolicy::Cached {
            if let Some(meta) = read_meta(&cached_meta, self.key) {
                if cached_tar.is_file() {
                    progress::say(self.stage, &format!("using the cached {}", cached_tar.display()));
                    // Mark it used, for pruning.
                    if let Ok(f) = fs::File::options().write(true).open(&cached_tar) {
                        let _ = f.set_modified(std::time::SystemTime::now());
                    }
                    return Ok(Base {
                        tar: cached_tar,
                        sha256: meta.sha256,
                        packages: meta.packages,
                        from_cache: true,
                    });
                }
            }
            progress::say(self.stage, &format!("nothing cached for key {}", short(self.key)));
        }

        if work.exists() {
            fs::remove_dir_all(work).with_context(|| format!("removing {}", work.display()))?;
        }
        fs::create_dir_all(work).with_context(|| format!("creating {}", work.display()))?;
        let debs = cache_dir.join(self.debs);
        fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
        let tmp = work.join("tmp");
        fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let output = work.join("base.tar");
        let args = args(work, &debs, &output)?;
        progress::say(
            self.stage,
            &format!("mmdebstrap {RELEASE} (downloads go to {})", debs.display()),
        );
        let mut mmdebstrap = cmd!(sh, "mmdebstrap {args...}").env("TMPDIR", &tmp);
        mmdebstrap = match self.epoch {
            Some(seconds) => mmdebstrap.env("SOURCE_DATE_EPOCH", seconds.to_string()),
            None => mmdebstrap.env_remove("SOURCE_DATE_EPOCH"),
        };
        mmdebstrap.run().context("mmdebstrap failed (see its output above)")?;

        let status = capture(cmd!(sh, "tar -xOf {output} {DPKG_STATUS_MEMBER}"))
            .context("reading the dpkg status of the new tarball")?;
        let packages = parse_dpkg_status(&status);
        prune_debs(&debs, &packages);
        let sha256 = sha256_file(&output)?;
        let meta = CacheMeta {
            key: self.key.to_owned(),
            sha256: sha256.clone(),
            packages: packages.clone(),
        };
        if policy == BasePolicy::Fresh {
            let tar = work.join(format!("{name}.tar"));
            fs::rename(&output, &tar).with_context(|| format!("moving the tarball to {}", tar.display()))?;
            return Ok(Base {
                tar,
                sha256,
                packages,
                from_cache: false,
            });
        }
        // Tarball first, then the sidecar that makes it a cache hit.
        let _ = fs::remove_file(&cached_meta);
        fs::rename(&output, &cached_tar)
            .or_else(|_| fs::copy(&output, &cached_tar).map(|_| ()))
            .with_context(|| format!("storing the tarball as {}", cached_tar.display()))?;
        let text = serde_json::to_string_pretty(&meta).context("serialising the cache metadata")?;
        fs::write(&cached_meta, text).with_context(|| format!("writing {}", cached_meta.display()))?;
        fs::remove_dir_all(work).with_context(|| format!("removing {}", work.display()))?;
        self.prune(cache_dir);
        Ok(Base {
            tar: cached_tar,
            sha256,
            packages,
            from_cache: false,
        })
    }

    /// Keeps the `keep` most recently used tarballs of this prefix.
    fn prune(&self, dir: &Path) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        let prefix = format!("{}-", self.prefix);
        let mut tars: Vec<(std::time::SystemTime, PathBuf)> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_prefix(&prefix))
                    .and_then(|n| n.strip_suffix(".tar"))
                    .is_some_and(|key| key.bytes().all(|b| b.is_ascii_hexdigit()))
            })
            .filter_map(|p| Some((fs::metadata(&p).ok()?.modified().ok()?, p)))
            .collect();
        tars.sort_by_key(|t| std::cmp::Reverse(t.0));
        for (_, tar) in tars.into_iter().skip(self.keep) {
            progress::say(self.stage, &format!("pruning the old cached {}", tar.display()));
            let _ = fs::remove_file(tar.with_extension("json"));
            let _ = fs::remove_file(&tar);
        }
    }
}

fn obtain_base(sh: &Shell, spec: &BaseSpec, cache_dir: &Path, tree: &Path, policy: BasePolicy) -> anyhow::Result<Base> {
    let job = CachedTarball {
        stage: "rootfs-base",
        prefix: "rootfs",
        key: &spec.key,
        epoch: spec.epoch.explicit_seconds(),
        debs: "debs",
        keep: CACHE_KEEP,
    };
    progress::say(
        "rootfs-base",
        &format!("the base has {} packages and their dependencies", spec.packages.len()),
    );
    // Built next to the tree (same file system), then moved into the cache.
    job.obtain(
        sh,
        cache_dir,
        &tree.with_extension("base"),
        policy,
        |work, debs, output| {
            let overlay_tar = work.join("overlay.tar");
            let file = fs::File::create(&overlay_tar).with_context(|| format!("creating {}", overlay_tar.display()))?;
            spec.overlay
                .write_tar(std::io::BufWriter::new(file), spec.epoch.seconds)
                .and_then(|mut w| std::io::Write::flush(&mut w).context("writing the overlay tar"))?;
            Ok(spec.args(&overlay_tar, Some(debs), output))
        },
    )
}

fn read_meta(path: &Path, key: &str) -> Option<CacheMeta> {
    let text = fs::read_to_string(path).ok()?;
    let meta: CacheMeta = serde_json::from_str(&text).ok()?;
    (meta.key == key).then_some(meta)
}

/// Keeps only the downloads of what is installed now.
fn prune_debs(dir: &Path, installed: &[Package]) {
    let wanted: BTreeSet<String> = installed
        .iter()
        .map(|p| format!("{}_{}_{}.deb", p.name, p.version.replace(':', "%3a"), p.arch))
        .collect();
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".deb") && !wanted.contains(&name) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Installed packages from a dpkg status file, sorted by name.
pub fn parse_dpkg_status(text: &str) -> Vec<Package> {
    let mut packages = Vec::new();
    for stanza in text.split("\n\n") {
        let mut fields: BTreeMap<&str, &str> = BTreeMap::new();
        for line in stanza.lines() {
            if line.starts_with(' ') || line.starts_with('\t') {
                continue;
            }
            if let Some((k, v)) = line.split_once(':') {
                fields.insert(k, v.trim());
            }
        }
        let installed = fields
            .get("Status")
            .is_some_and(|s| s.split_whitespace().last() == Some("installed"));
        if let (true, Some(name), Some(version)) = (installed, fields.get("Package"), fields.get("Version")) {
            packages.push(Package {
                name: (*name).to_owned(),
                version: (*version).to_owned(),
                arch: fields.get("Architecture").copied().unwrap_or("").to_owned(),
            });
        }
    }
    packages.sort();
    packages
}

fn unpack(sh: &Shell, tar: &Path, tree: &Path) -> anyhow::Result<()> {
    if tree.exists() {
        fs::remove_dir_all(tree).with_context(|| format!("removing the old tree {}", tree.display()))?;
    }
    fs::create_dir_all(tree).with_context(|| format!("creating {}", tree.display()))?;
    progress::say(
        "rootfs",
        &format!("unpacking {} into {}", tar.display(), tree.display()),
    );
    capture(cmd!(sh, "tar {TAR_EXTRACT_FLAGS...} {tar} -C {tree}"))
        .with_context(|| format!("unpacking {}", tar.display()))?;
    Ok(())
}

/// The checks that prove the rootfs is Debian 12's, runs netavark from
/// Debian's package, and can run the agent.
pub fn verify(sh: &Shell, tree: &Path) -> anyhow::Result<()> {
    let debian_version = fs::read_to_string(tree.join("etc/debian_version")).context("reading etc/debian_version")?;
    if !debian_version.starts_with(DEBIAN_VERSION_PREFIX) {
        bail!(
            "the rootfs is Debian {}, not Debian 12 ({RELEASE})",
            debian_version.trim()
        );
    }
    let owner = capture(cmd!(sh, "chroot {tree} dpkg-query -S {NETAVARK_PATH}"))
        .with_context(|| format!("no package of the rootfs owns {NETAVARK_PATH}"))?;
    if owner.trim() != format!("{NETAVARK_PACKAGE}: {NETAVARK_PATH}") {
        bail!(
            "{NETAVARK_PATH} belongs to {:?}, not to the {NETAVARK_PACKAGE} package",
            owner.trim()
        );
    }
    let format = "-f=${Version}";
    let version = capture(cmd!(sh, "chroot {tree} dpkg-query -W {format} {NETAVARK_PACKAGE}"))?;
    if !version.starts_with(BOOKWORM_NETAVARK_SERIES) || version.contains("bpo") {
        bail!(
            "netavark in the rootfs is {version}, not bookworm's {BOOKWORM_NETAVARK_SERIES}x: it must come from Debian 12 itself"
        );
    }
    // Exit status 1 with a list when anything differs, including the
    // files left out on purpose; those are filtered below.
    let verify = cmd!(sh, "chroot {tree} dpkg --verify {VERIFIED_PACKAGES...}")
        .quiet()
        .ignore_status()
        .output()
        .context("running dpkg --verify in the rootfs")?;
    let stdout = String::from_utf8_lossy(&verify.stdout);
    if !verify.status.success() && stdout.trim().is_empty() {
        bail!(
            "dpkg --verify of the container packages failed ({}): {}",
            verify.status,
            String::from_utf8_lossy(&verify.stderr).trim()
        );
    }
    let changed = changed_files(&stdout);
    if !changed.is_empty() {
        bail!(
            "files of Debian's container packages differ from what the packages installed:\n{}",
            changed.join("\n")
        );
    }
    let conf_path = tree.join(CONTAINERS_CONF);
    let conf = fs::read_to_string(&conf_path).with_context(|| format!("reading {}", conf_path.display()))?;
    if toml_value(&conf, "network", "network_backend").as_deref() != Some("\"netavark\"") {
        bail!("{CONTAINERS_CONF} does not set network_backend = \"netavark\" in [network]");
    }
    capture(cmd!(sh, "chroot {tree} /{NODE_AGENT_PATH} --help")).context("the agent does not run inside the rootfs")?;
    Ok(())
}

/// The lines of `dpkg --verify` output that are real changes: files left
/// out on purpose (docs, man pages: the path-exclude options) are not.
fn changed_files(verify_output: &str) -> Vec<String> {
    let excluded: Vec<&str> = SLIM_FLAGS
        .iter()
        .filter_map(|f| f.strip_prefix("--dpkgopt=path-exclude="))
        .filter_map(|p| p.strip_suffix("/*"))
        .collect();
    verify_output
        .lines()
        .filter(|line| !line.trim().is_empty())
        .filter(|line| {
            let mut words = line.split_whitespace();
            let missing = words.next() == Some("missing");
            let path = words.last().unwrap_or("");
            let left_out = excluded
                .iter()
                .any(|dir| path == *dir || path.strip_prefix(dir).is_some_and(|rest| rest.starts_with('/')));
            !(missing && left_out)
        })
        .map(str::to_owned)
        .collect()
}

/// The raw value of `key` in `[table]` of a simple TOML file.
pub fn toml_value(text: &str, table: &str, key: &str) -> Option<String> {
    let mut current = String::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = name.trim().to_owned();
        } else if current == table {
            if let Some((k, v)) = line.split_once('=') {
                if k.trim() == key {
                    return Some(v.trim().to_owned());
                }
            }
        }
    }
    None
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn spec(packages: &[&str], overlay: &[(&str, &str)], epoch: Option<u64>) -> BaseSpec {
        let mut layer = Layer::new();
        for (path, text) in overlay {
            layer.add_bytes(path, text.as_bytes().to_vec(), FILE_MODE).unwrap();
        }
        let digest = layer.digest().unwrap();
        let epoch = match epoch {
            Some(seconds) => Epoch {
                seconds,
                explicit: true,
            },
            None => Epoch {
                seconds: flags::now_seconds(),
                explicit: false,
            },
        };
        BaseSpec::new(
            Arch::Amd64,
            packages.iter().map(|p| (*p).to_owned()).collect(),
            String::new(),
            layer,
            digest,
            epoch,
        )
    }

    #[test]
    fn the_cache_key_covers_packages_overlay_and_an_explicit_epoch() {
        let base = spec(&["podman"], &[("etc/hostname", "a\n")], None);
        // The build time alone does not change the key.
        assert_eq!(base.key, spec(&["podman"], &[("etc/hostname", "a\n")], None).key);
        assert_eq!(base.key.len(), 64);
        assert_ne!(
            base.key,
            spec(&["podman", "crun"], &[("etc/hostname", "a\n")], None).key
        );
        assert_ne!(base.key, spec(&["podman"], &[("etc/hostname", "b\n")], None).key);
        assert_ne!(base.key, spec(&["podman"], &[("etc/hostname", "a\n")], Some(1)).key);
        assert_eq!(spec(&["podman"], &[], Some(7)).key, spec(&["podman"], &[], Some(7)).key);
    }

    #[test]
    fn keyed_args_name_no_host_path() {
        let s = spec(&["netavark", "podman"], &[], None);
        let args = s.keyed_args();
        assert!(args.contains(&"--include=netavark,podman".to_owned()));
        assert!(args.contains(&"--variant=minbase".to_owned()));
        assert!(args.iter().any(|a| a.contains("useradd --uid 1000")));
        assert!(args.contains(&"--customize-hook=tar-in <overlay.tar> /".to_owned()));
        assert!(
            !args.iter().any(|a| a.contains("sync-in")),
            "the download cache is not part of the key"
        );
        let real = s.args(
            Path::new("/x/overlay.tar"),
            Some(Path::new("/c/debs")),
            Path::new("/o.tar"),
        );
        assert!(real.contains(&"--setup-hook=sync-in /c/debs /var/cache/apt/archives/".to_owned()));
        // Hooks run in order: the user first, then the overlay's subuid
        // and subgid replace what useradd wrote.
        let user = real.iter().position(|a| a.contains("useradd")).unwrap();
        let overlay = real.iter().position(|a| a.contains("tar-in")).unwrap();
        assert!(user < overlay);
        assert_eq!(real[real.len() - 5], "bookworm");
        assert_eq!(real[real.len() - 4], "/o.tar");
    }

    #[test]
    fn package_lists_are_parsed_sorted_and_checked() {
        let list = parse_package_list("# boot\nsystemd\n\npodman   # engine\nlinux-image-amd64\n").unwrap();
        assert_eq!(list, ["linux-image-amd64", "podman", "systemd"]);
        let err = parse_package_list("podman\nPodman\npodman\n").unwrap_err().to_string();
        assert!(err.contains("line 2: \"Podman\" is not a Debian package name"), "{err}");
        assert!(err.contains("line 3: podman is listed twice"), "{err}");
        assert!(parse_package_list("# nothing\n").is_err());
    }

    #[test]
    fn the_real_package_list_has_what_the_node_needs() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let text = fs::read_to_string(root.join(PACKAGES_FILE)).unwrap();
        let list = parse_package_list(&text).unwrap();
        for needed in [
            "systemd",
            "linux-image-amd64",
            "live-boot",
            "podman",
            "netavark",
            "aardvark-dns",
            "crun",
            "conmon",
            "uidmap",
            "slirp4netns",
        ] {
            assert!(
                list.iter().any(|p| p == needed),
                "{needed} is missing from {PACKAGES_FILE}"
            );
        }
    }

    #[test]
    fn the_overlay_sets_netavark_storage_and_subids() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let overlay = root.join(OVERLAY_DIR);
        let conf = fs::read_to_string(overlay.join(CONTAINERS_CONF)).unwrap();
        assert_eq!(
            toml_value(&conf, "network", "network_backend").as_deref(),
            Some("\"netavark\"")
        );
        assert_eq!(toml_value(&conf, "engine", "exit_command_delay").as_deref(), Some("5"));
        assert_eq!(
            toml_value(&conf, "engine", "runtime"),
            None,
            "the node keeps Debian's crun"
        );
        let storage = fs::read_to_string(overlay.join("etc/containers/storage.conf")).unwrap();
        let graphroot = toml_value(&storage, "storage", "graphroot").unwrap();
        assert!(graphroot.starts_with("\"/var/lib/archipelago/"), "{graphroot}");
        for file in ["etc/subuid", "etc/subgid"] {
            assert_eq!(
                fs::read_to_string(overlay.join(file)).unwrap(),
                "archipelago:100000:65536\n"
            );
        }
    }

    #[test]
    fn dpkg_verify_ignores_only_the_files_left_out_on_purpose() {
        let output = "missing     /usr/share/man/man1/podman.1.gz\n\
                      missing     /usr/share/man/man1\n\
                      missing     /usr/share/doc/crun/README.md.gz\n\
                      missing     /usr/lib/podman/rootlessport\n\
                      ??5??????   /usr/lib/podman/netavark\n\
                      ??5?????? c /etc/containers/registries.conf\n\
                      missing     /usr/share/documentation\n";
        assert_eq!(
            changed_files(output),
            [
                "missing     /usr/lib/podman/rootlessport",
                "??5??????   /usr/lib/podman/netavark",
                "??5?????? c /etc/containers/registries.conf",
                "missing     /usr/share/documentation",
            ]
        );
    }

    #[test]
    fn toml_values_are_found_in_their_table_only() {
        let text = "[engine]\nnetwork_backend = \"cni\"\n[network]\n# network_backend = \"x\"\nnetwork_backend = \"netavark\" # here\n";
        assert_eq!(
            toml_value(text, "network", "network_backend").as_deref(),
            Some("\"netavark\"")
        );
        assert_eq!(
            toml_value(text, "engine", "network_backend").as_deref(),
            Some("\"cni\"")
        );
        assert_eq!(toml_value(text, "storage", "network_backend"), None);
    }

    #[test]
    fn dpkg_status_gives_installed_packages_only() {
        let status = "Package: netavark\nStatus: install ok installed\nPriority: optional\nArchitecture: amd64\nVersion: 1.4.0-3\nDescription: x\n multi-line: not a field\n\n\
                      Package: gone\nStatus: deinstall ok config-files\nArchitecture: amd64\nVersion: 1\n\n\
                      Package: base-files\nStatus: install ok installed\nArchitecture: amd64\nVersion: 12.4+deb12u11\n";
        let packages = parse_dpkg_status(status);
        let names: Vec<(&str, &str)> = packages.iter().map(|p| (p.name.as_str(), p.version.as_str())).collect();
        assert_eq!(names, [("base-files", "12.4+deb12u11"), ("netavark", "1.4.0-3")]);
    }
}
