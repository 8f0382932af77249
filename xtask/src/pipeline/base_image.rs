//! `cargo xtask base-image`: the base every web UI image starts `FROM`,
//! made from Debian 12's own packages so that no UI depends on Docker Hub.
//!
//! Two layers:
//!
//! 1. **Debian**: mmdebstrap of Debian's essential set plus
//!    `base-image/packages.txt` (nginx), as a tarball. Cached as
//!    `target/cache/ui-base-<key>.tar`, the key being a sha256 over the
//!    package list, the release, the mirrors, mmdebstrap's flags and the
//!    epoch; its downloads are kept in `target/cache/ui-base-debs`.
//! 2. **Overlay**: the files of `base-image/overlay/` (the `archy-ui`
//!    entrypoint and its nginx configuration), written as a deterministic
//!    tar at every build, so changing them needs no mmdebstrap run.
//!
//! Both go, with an image config of our own, into one `docker-archive`
//! (`target/base-image/ui-base.tar`) tagged [`REFERENCE`]. Every file and
//! the config carry `SOURCE_DATE_EPOCH` (0 when unset, as in `cargo xtask
//! images`), so the same epoch and the same state of Debian's archive give
//! the same bytes and the same image ID: the config digest is the pin,
//! recorded in `ui-base.lock.json` beside the archive. `cargo xtask images`
//! loads the archive into the podman that builds the UIs and checks that
//! [`REFERENCE`] then names exactly that digest.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context as _};
use archy_agent::manifest::{Digest, ImageSource, Manifest};
use serde::{Deserialize, Serialize};
use xshell::{cmd, Shell};

use crate::pipeline::flags::{self, Arch};
use crate::pipeline::images::archive as image_archive;
use crate::pipeline::layers::{sha256_file, sha256_hex, Layer};
use crate::pipeline::progress;
use crate::pipeline::report::Package;
use crate::pipeline::rootfs::{self, BasePolicy, CachedTarball};
use crate::tools;

/// The name UI Containerfiles start `FROM`. It exists only in a local
/// store, loaded from the archive: there is no registry to pull it from.
pub const REFERENCE: &str = "localhost/archipelago/ui-base:bookworm";
pub const PACKAGES_FILE: &str = "base-image/packages.txt";
pub const OVERLAY_DIR: &str = "base-image/overlay";
/// `target/<this>`: where `cargo xtask images` puts the base image.
pub const OUT_SUBDIR: &str = "base-image";
pub const ARCHIVE_FILE: &str = "ui-base.tar";
pub const LOCK_FILE: &str = "ui-base.lock.json";
const LOCK_VERSION: u32 = 1;

const STAGE: &str = "base-image";
const CACHE_PREFIX: &str = "ui-base";
const DEBS_DIR: &str = "ui-base-debs";
/// Cached Debian layers kept (each is about 100 MB).
const CACHE_KEEP: usize = 2;
const CACHE_FORMAT: u32 = 1;
const ARCH: Arch = Arch::Amd64;

/// mmdebstrap's flags besides `rootfs::SLIM_FLAGS`; all part of the key.
const MMDEBSTRAP_FLAGS: &[&str] = &[
    "--mode=root",
    // Debian's essential set (a shell, coreutils, sed, grep) and what the
    // packages need; no apt: nothing is installed into a running UI.
    "--variant=essential",
    "--format=tar",
    // The container engine makes /dev itself.
    "--skip=output/dev",
    // /usr merged by mmdebstrap itself, as Debian 12 has it: otherwise apt
    // satisfies init-system-helpers with usrmerge, which brings all of perl.
    "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
];

/// The image config. nginx runs as www-data (uid 33 in Debian's
/// base-passwd) on an unprivileged port, so no capability is needed;
/// SIGQUIT is nginx's graceful stop.
const USER: &str = "33:33";
const ENTRYPOINT: &str = "/usr/local/bin/archy-ui";
const EXPOSED_PORT: &str = "8080/tcp";
const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const STOP_SIGNAL: &str = "SIGQUIT";

const LOAD_ARGS: &[&str] = &["load", "--quiet", "--input"];
const INSPECT_ID_ARGS: &[&str] = &["image", "inspect", "--format", "{{.Id}}"];

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Where the archive and its lock file go.
    #[arg(long, value_name = "DIR", default_value = "target/base-image")]
    pub out: PathBuf,
    /// Build the Debian layer again with mmdebstrap, replacing the cached one.
    #[arg(long)]
    pub no_cache: bool,
}

/// `ui-base.lock.json`: the archive and the digest it pins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseLock {
    pub version: u32,
    pub reference: String,
    /// The image ID after loading: the pin.
    pub config_digest: Digest,
    pub archive: String,
    pub archive_sha256: String,
    pub size: u64,
    pub source_date_epoch: u64,
    /// The Debian layer's cache key and sha256.
    pub debian_key: String,
    pub debian_layer_sha256: String,
    pub packages: Vec<Package>,
}

/// `cargo xtask base-image`.
pub fn run(root: &Path, args: &Args) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let sh = Shell::new().context("creating a shell")?;
    let policy = if args.no_cache {
        BasePolicy::Refresh
    } else {
        BasePolicy::Cached
    };
    let lock = build(root, &sh, &args.out, policy)?;
    println!("image:    {}", lock.reference);
    println!("digest:   {}", lock.config_digest);
    println!("archive:  {}", args.out.join(&lock.archive).display());
    println!("sha256:   {}", lock.archive_sha256);
    println!("size:     {}", progress::human_size(lock.size));
    println!("packages: {}", lock.packages.len());
    println!(
        "total:    {}",
        progress::human_duration(started.elapsed().as_secs_f64())
    );
    Ok(ExitCode::SUCCESS)
}

/// Everything the Debian layer is made from, and its cache key.
#[derive(Debug)]
struct Spec {
    packages: Vec<String>,
    key: String,
}

/// What the key is computed over: no host paths.
#[derive(Serialize)]
struct KeyInputs<'a> {
    format: u32,
    release: &'a str,
    arch: &'a str,
    packages: &'a [String],
    mirrors: &'a [&'a str],
    mmdebstrap: Vec<String>,
    source_date_epoch: u64,
}

impl Spec {
    fn load(root: &Path, epoch: u64) -> anyhow::Result<Spec> {
        let path = root.join(PACKAGES_FILE);
        let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let packages = rootfs::parse_package_list(&text).with_context(|| format!("in {}", path.display()))?;
        Ok(Spec::new(packages, epoch))
    }

    fn new(packages: Vec<String>, epoch: u64) -> Spec {
        let mut spec = Spec {
            packages,
            key: String::new(),
        };
        let inputs = KeyInputs {
            format: CACHE_FORMAT,
            release: rootfs::RELEASE,
            arch: ARCH.debian_name(),
            packages: &spec.packages,
            mirrors: rootfs::MIRRORS,
            mmdebstrap: spec.args(None, Path::new("<output.tar>")),
            source_date_epoch: epoch,
        };
        // Serialising plain strings and numbers cannot fail.
        spec.key = sha256_hex(&serde_json::to_vec(&inputs).unwrap_or_default());
        spec
    }

    fn args(&self, debs: Option<&Path>, output: &Path) -> Vec<String> {
        let mut args: Vec<String> = MMDEBSTRAP_FLAGS
            .iter()
            .chain(rootfs::SLIM_FLAGS)
            .map(|f| (*f).to_owned())
            .collect();
        args.push(format!("--architectures={}", ARCH.debian_name()));
        args.push(format!("--include={}", self.packages.join(",")));
        args.extend(debs.map(rootfs::debs_setup_hooks).into_iter().flatten());
        args.extend(debs.map(rootfs::debs_sync_out_hook));
        args.extend(rootfs::release_and_mirrors(output));
        args
    }
}

/// Builds (or takes from the cache) the base image and writes
/// `<out>/ui-base.tar` and `<out>/ui-base.lock.json`.
pub fn build(root: &Path, sh: &Shell, out: &Path, policy: BasePolicy) -> anyhow::Result<BaseLock> {
    let epoch = image_archive::source_date_epoch()?;
    let spec = Spec::load(root, epoch)?;
    let cache_dir = flags::target_dir(root).join("cache");
    flags::refuse_whitespace(&cache_dir, "the cache folder")?;
    flags::refuse_whitespace(out, "the output folder")?;
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let job = CachedTarball {
        stage: STAGE,
        prefix: CACHE_PREFIX,
        key: &spec.key,
        epoch: Some(epoch),
        debs: DEBS_DIR,
        keep: CACHE_KEEP,
    };
    progress::say(
        STAGE,
        &format!(
            "the Debian layer: essential packages and {} (key {})",
            spec.packages.join(", "),
            &spec.key[..16]
        ),
    );
    let debian = job.obtain(sh, &cache_dir, &out.join(".mmdebstrap"), policy, |_, debs, output| {
        // Checked here, when mmdebstrap is really needed: a cached layer
        // needs neither root nor mmdebstrap.
        flags::require_root(STAGE)?;
        tools::ensure(sh, tools::BASE_IMAGE_STAGE)?;
        Ok(spec.args(Some(debs), output))
    })?;

    let mut overlay = Layer::new();
    overlay.add_tree("", &root.join(OVERLAY_DIR))?;
    let overlay_tar = out.join(".overlay.tar");
    let file = fs::File::create(&overlay_tar).with_context(|| format!("creating {}", overlay_tar.display()))?;
    overlay
        .write_tar(std::io::BufWriter::new(file), epoch)
        .and_then(|mut w| std::io::Write::flush(&mut w).context("writing the overlay layer"))?;
    let overlay_digest: Digest = format!("sha256:{}", sha256_file(&overlay_tar)?).parse()?;
    let debian_digest: Digest = format!("sha256:{}", debian.sha256).parse()?;

    let config = config_json(&[&debian_digest, &overlay_digest], epoch)?;
    let image = image_archive::Image {
        repo_tag: Some(REFERENCE.to_owned()),
        config_digest: Digest::of(&config),
        config,
        layers: vec![
            image_archive::Layer {
                digest: debian_digest,
                path: debian.tar.clone(),
            },
            image_archive::Layer {
                digest: overlay_digest,
                path: overlay_tar.clone(),
            },
        ],
    };
    let archive_path = out.join(ARCHIVE_FILE);
    let written = image_archive::write(&archive_path, &image, epoch)
        .with_context(|| format!("writing the base image {}", archive_path.display()))?;
    fs::remove_file(&overlay_tar).with_context(|| format!("removing {}", overlay_tar.display()))?;
    let lock = BaseLock {
        version: LOCK_VERSION,
        reference: REFERENCE.to_owned(),
        config_digest: image.config_digest,
        archive: ARCHIVE_FILE.to_owned(),
        archive_sha256: written.sha256,
        size: written.size,
        source_date_epoch: epoch,
        debian_key: spec.key.clone(),
        debian_layer_sha256: debian.sha256,
        packages: debian.packages,
    };
    let lock_path = out.join(LOCK_FILE);
    let text = serde_json::to_vec_pretty(&lock).context("serialising the base image lock")?;
    archy_agent::fsutil::write_atomic(&lock_path, &text, 0o644)
        .with_context(|| format!("writing {}", lock_path.display()))?;
    progress::say(
        STAGE,
        &format!(
            "{REFERENCE} is {} ({}, Debian layer {})",
            lock.config_digest,
            progress::human_size(lock.size),
            if debian.from_cache { "cached" } else { "built" }
        ),
    );
    Ok(lock)
}

/// The image config, in Docker's format (what `podman build --format
/// docker` keeps too). Fields in a fixed order: these bytes are the pin.
fn config_json(diff_ids: &[&Digest], epoch: u64) -> anyhow::Result<Vec<u8>> {
    #[derive(Serialize)]
    #[serde(rename_all = "PascalCase")]
    struct RunConfig<'a> {
        user: &'a str,
        exposed_ports: std::collections::BTreeMap<&'a str, serde_json::Map<String, serde_json::Value>>,
        env: [&'a str; 1],
        entrypoint: [&'a str; 1],
        working_dir: &'a str,
        stop_signal: &'a str,
    }
    #[derive(Serialize)]
    struct History<'a> {
        created: &'a str,
        created_by: &'a str,
    }
    #[derive(Serialize)]
    struct RootFs<'a> {
        #[serde(rename = "type")]
        kind: &'a str,
        diff_ids: Vec<String>,
    }
    #[derive(Serialize)]
    struct Config<'a> {
        architecture: &'a str,
        os: &'a str,
        created: &'a str,
        config: RunConfig<'a>,
        rootfs: RootFs<'a>,
        history: [History<'a>; 2],
    }
    let created = flags::rfc3339(epoch)?;
    let debian = format!("mmdebstrap --variant=essential {} ({})", rootfs::RELEASE, PACKAGES_FILE);
    let config = Config {
        architecture: ARCH.debian_name(),
        os: "linux",
        created: &created,
        config: RunConfig {
            user: USER,
            exposed_ports: [(EXPOSED_PORT, serde_json::Map::new())].into_iter().collect(),
            env: [PATH_ENV],
            entrypoint: [ENTRYPOINT],
            working_dir: "/",
            stop_signal: STOP_SIGNAL,
        },
        rootfs: RootFs {
            kind: "layers",
            diff_ids: diff_ids.iter().map(ToString::to_string).collect(),
        },
        history: [
            History {
                created: &created,
                created_by: &debian,
            },
            History {
                created: &created,
                created_by: OVERLAY_DIR,
            },
        ],
    };
    serde_json::to_vec(&config).context("serialising the base image config")
}

/// Whether `m` is built `FROM` the base image (its Containerfile names
/// [`REFERENCE`] in a `FROM` line).
pub fn used_by(m: &Manifest) -> anyhow::Result<bool> {
    let ImageSource::Build { context, containerfile } = &m.image else {
        return Ok(false);
    };
    let path = context.join(containerfile);
    let text = fs::read_to_string(&path).with_context(|| format!("{}: reading {}", m.id, path.display()))?;
    Ok(names_base(&text))
}

fn names_base(containerfile: &str) -> bool {
    containerfile.lines().any(|line| {
        let mut words = line.split_whitespace();
        words.next().is_some_and(|w| w.eq_ignore_ascii_case("FROM"))
            && words.any(|w| w == REFERENCE || w.starts_with(&format!("{REFERENCE}@")))
    })
}

/// Loads the archive into the podman that the environment points at (the
/// one `cargo xtask images` builds with) and proves that [`REFERENCE`] now
/// names the pinned digest, so a build `FROM` it uses exactly this image
/// and never looks for a registry.
pub fn load(sh: &Shell, dir: &Path, lock: &BaseLock) -> anyhow::Result<()> {
    let archive = dir.join(&lock.archive);
    let sha = sha256_file(&archive)?;
    if sha != lock.archive_sha256 {
        bail!(
            "{} has sha256 {sha}, but {} says {}; run `cargo xtask base-image` again",
            archive.display(),
            dir.join(LOCK_FILE).display(),
            lock.archive_sha256
        );
    }
    cmd!(sh, "podman {LOAD_ARGS...} {archive}")
        .quiet()
        .ignore_stdout()
        .run()
        .with_context(|| format!("loading the base image {}", archive.display()))?;
    let reference = &lock.reference;
    let id = cmd!(sh, "podman {INSPECT_ID_ARGS...} {reference}")
        .quiet()
        .read()
        .with_context(|| format!("reading the image ID of {reference} after loading it"))?;
    let id = format!("sha256:{}", id.trim().trim_start_matches("sha256:"));
    if id != lock.config_digest.as_str() {
        bail!(
            "after loading {}, {reference} is {id}, not the pinned {}",
            archive.display(),
            lock.config_digest
        );
    }
    progress::say(STAGE, &format!("loaded {reference} ({id})"));
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_key_covers_packages_and_epoch_and_names_no_host_path() {
        let a = Spec::new(vec!["nginx".into()], 0);
        assert_eq!(a.key, Spec::new(vec!["nginx".into()], 0).key);
        assert_ne!(a.key, Spec::new(vec!["nginx".into(), "curl".into()], 0).key);
        assert_ne!(a.key, Spec::new(vec!["nginx".into()], 1_700_000_000).key);
        let keyed = a.args(None, Path::new("<output.tar>"));
        assert!(keyed.contains(&"--variant=essential".to_owned()));
        assert!(keyed.contains(&"--include=nginx".to_owned()));
        assert!(!keyed.iter().any(|arg| arg.contains("sync")), "{keyed:?}");
        let real = a.args(Some(Path::new("/c/debs")), Path::new("/o.tar"));
        assert!(real.contains(&"--setup-hook=sync-in /c/debs /var/cache/apt/archives/".to_owned()));
        assert!(real.contains(&"--customize-hook=sync-out /var/cache/apt/archives /c/debs".to_owned()));
        assert!(real.contains(&"--skip=essential/unlink".to_owned()));
        assert_eq!(real[real.len() - 5], "bookworm");
        assert_eq!(real[real.len() - 4], "/o.tar");
    }

    #[test]
    fn the_config_is_deterministic_and_runs_unprivileged() {
        let one: Digest = format!("sha256:{}", "1".repeat(64)).parse().unwrap();
        let two: Digest = format!("sha256:{}", "2".repeat(64)).parse().unwrap();
        let config = config_json(&[&one, &two], 1_700_000_000).unwrap();
        assert_eq!(config, config_json(&[&one, &two], 1_700_000_000).unwrap());
        assert_ne!(config, config_json(&[&one, &two], 0).unwrap());
        let value: serde_json::Value = serde_json::from_slice(&config).unwrap();
        assert_eq!(value["created"], "2023-11-14T22:13:20Z");
        assert_eq!(value["config"]["User"], "33:33");
        assert_eq!(value["config"]["Entrypoint"][0], ENTRYPOINT);
        assert!(value["config"]["ExposedPorts"]["8080/tcp"].is_object());
        assert_eq!(value["rootfs"]["diff_ids"][1], two.to_string());
        // What the images stage's own reader accepts for amd64.
        crate::pipeline::images::oci::ImageConfig::parse(&config)
            .unwrap()
            .check("linux", "amd64", 2)
            .unwrap();
    }

    #[test]
    fn from_lines_naming_the_base_are_recognised() {
        assert!(names_base(&format!("# ui\nFROM {REFERENCE}\nCOPY a /a\n")));
        assert!(names_base(&format!("from   {REFERENCE}@sha256:{}\n", "0".repeat(64))));
        assert!(names_base(&format!("FROM --platform=linux/amd64 {REFERENCE} AS ui\n")));
        assert!(!names_base(&format!("# FROM {REFERENCE}\nFROM scratch\n")));
        assert!(!names_base("FROM localhost/archipelago/ui-base:trixie\n"));
    }

    #[test]
    fn the_default_uis_are_unprivileged_and_built_from_the_base_image() {
        use archy_agent::manifest::{AppKind, Naming, Probe};
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let apps = crate::pipeline::payload::load_manifests(&root.join("manifests")).unwrap();
        for (ui, backend, container) in [
            ("bitcoin-ui", "bitcoin-core", "bitcoin"),
            ("electrs-ui", "electrs", "electrs"),
            ("lnd-ui", "lnd", "lnd"),
        ] {
            let m = apps.iter().find(|m| m.id.as_str() == ui).unwrap();
            assert_eq!(m.kind, AppKind::Ui, "{ui}");
            assert_eq!(Naming::Prod.container_name(m), format!("archy-{ui}"));
            assert_eq!(m.depends_on.iter().map(|d| d.as_str()).collect::<Vec<_>>(), [backend]);
            let b = apps.iter().find(|b| b.id.as_str() == backend).unwrap();
            assert_eq!(Naming::Prod.container_name(b), container, "{ui} proxies to {container}");
            assert!(used_by(m).unwrap(), "{ui} must start FROM {REFERENCE}");
            let ImageSource::Build { context, containerfile } = &m.image else {
                unreachable!("used_by is true only for builds");
            };
            let file = fs::read_to_string(context.join(containerfile)).unwrap();
            assert!(
                file.contains(&format!("ENV ARCHY_UI_BACKEND=http://{container}:"))
                    || file.contains(&format!("ENV ARCHY_UI_BACKEND=https://{container}:")),
                "{ui}: {file}"
            );
            assert!(context.join("index.html").is_file(), "{ui}");
            assert_eq!(m.user.as_deref(), Some(USER), "{ui}");
            assert!(
                m.security.capabilities_add.is_empty() && m.security.read_only_root,
                "{ui}"
            );
            let health = m.health.as_ref().unwrap();
            assert_eq!(
                health.probe,
                Probe::Http {
                    port: 8080,
                    target: "/healthz".into()
                },
                "{ui}"
            );
            assert!(m.ports.iter().any(|p| p.container == 8080), "{ui}");
        }
    }

    #[test]
    fn the_package_list_has_nginx() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let spec = Spec::load(root, 0).unwrap();
        assert!(spec.packages.iter().any(|p| p == "nginx"), "{:?}", spec.packages);
    }

    #[test]
    fn the_entrypoint_and_nginx_config_are_in_the_overlay() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let overlay = root.join(OVERLAY_DIR);
        let script = fs::read_to_string(overlay.join(ENTRYPOINT.trim_start_matches('/'))).unwrap();
        assert!(script.contains("exec nginx -e stderr -c /etc/nginx/archy-ui.conf"));
        use std::os::unix::fs::PermissionsExt as _;
        let mode = fs::metadata(overlay.join(ENTRYPOINT.trim_start_matches('/')))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o111, 0o111, "the entrypoint must be executable");
        let conf = fs::read_to_string(overlay.join("etc/nginx/archy-ui.conf")).unwrap();
        // A variable in proxy_pass: resolved when requests come.
        assert!(conf.contains("proxy_pass $archy_backend;"), "{conf}");
        assert!(conf.contains("listen 8080;"), "{conf}");
    }
}
