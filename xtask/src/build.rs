//! What the image stages share: their command-line flags, the build time
//! stamp, progress and timing, and the inputs they read (manifests, the
//! pre-pulled image folder, a registry list).

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use archy_agent::images::{self, ImageLock};
use archy_agent::manifest::{self, LoadOptions, Manifest};
use archy_agent::registry::{RegistryStore, REGISTRIES_FILE};

use crate::archive::{sha256_file, Layer};
use crate::report::{ImageRecord, ManifestRecord, StageRecord};

/// The product name in file names and the report.
pub const PRODUCT: &str = "archipelago";
/// The workspace version (xtask shares it).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// What `cargo xtask images` writes, relative to the target directory.
pub const IMAGES_SUBDIR: &str = "images";
pub const IMAGES_LOCK: &str = images::LOCK_FILE;

/// Where things go on the node.
pub const NODE_APPS_DIR: &str = "opt/archipelago/apps";
pub const NODE_IMAGES_DIR: &str = "usr/share/archipelago/images";
/// The agent reads its registry list from `<data root>/config/`.
pub const NODE_CONFIG_DIR: &str = "var/lib/archipelago/config";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Arch {
    Amd64,
    Arm64,
}

impl Arch {
    pub fn debian_name(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }

    /// Only amd64 is built for now.
    pub fn check_supported(self) -> anyhow::Result<()> {
        match self {
            Arch::Amd64 => Ok(()),
            Arch::Arm64 => bail!(
                "--arch arm64 is not supported yet: the image pipeline builds amd64 only \
                 (arm64 needs a cross-architecture mmdebstrap and GRUB for arm64-efi); use --arch amd64"
            ),
        }
    }
}

/// Flags shared by `cargo xtask rootfs` and `cargo xtask iso`.
#[derive(Debug, Clone, clap::Args)]
pub struct BuildArgs {
    /// Target architecture; only amd64 for now.
    #[arg(long, value_enum, default_value_t = Arch::Amd64)]
    pub arch: Arch,
    /// The app manifests to embed, one folder per app.
    #[arg(long, value_name = "DIR", default_value = "manifests")]
    pub manifests: PathBuf,
    /// A registry list (docs/registries.md) to install as the node's
    /// /var/lib/archipelago/config/registries.json.
    #[arg(long, value_name = "FILE")]
    pub registries: Option<PathBuf>,
    /// The pre-pulled images (`cargo xtask images`' output) to embed
    /// [default: target/images, left out with a note when it does not exist].
    #[arg(long, value_name = "DIR", conflicts_with = "no_images")]
    pub images: Option<PathBuf>,
    /// Leave out the pre-pulled images even when target/images exists: a
    /// base OS whose agent pulls them at first boot.
    #[arg(long)]
    pub no_images: bool,
    /// Output folder [default: target/rootfs for rootfs, target/iso for iso].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Embed this agent binary instead of building it with `cargo build --release`.
    #[arg(long, value_name = "FILE")]
    pub agent: Option<PathBuf>,
    /// Rebuild the base rootfs with mmdebstrap even when the cache has it.
    #[arg(long)]
    pub no_cache: bool,
    /// Extra files laid over the finished rootfs, e.g. a test's probe unit
    /// (`cargo xtask e2e`). Not part of the cached base.
    #[arg(long, value_name = "DIR")]
    pub overlay: Option<PathBuf>,
    /// `iso`: the GRUB menu to boot with [default: iso/grub.cfg]. It must
    /// keep `boot=live` and a serial-console entry.
    #[arg(long, value_name = "FILE")]
    pub boot_menu: Option<PathBuf>,
    /// Where base rootfs tarballs and downloaded packages are kept
    /// [default: target/cache].
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
}

impl BuildArgs {
    /// The cache folder: `--cache`, else target/cache.
    pub fn cache_dir(&self, root: &Path) -> PathBuf {
        self.cache.clone().unwrap_or_else(|| target_dir(root).join("cache"))
    }

    /// The image folder to embed, if any: `--images` (which must exist),
    /// else target/images when it exists, nothing with `--no-images`.
    pub fn images_dir(&self, root: &Path) -> anyhow::Result<Option<PathBuf>> {
        if self.no_images {
            return Ok(None);
        }
        if let Some(dir) = &self.images {
            if !dir.is_dir() {
                bail!(
                    "--images {}: no such folder; run `cargo xtask images --out {}` first",
                    dir.display(),
                    dir.display()
                );
            }
            return Ok(Some(dir.clone()));
        }
        let default = target_dir(root).join(IMAGES_SUBDIR);
        Ok(default.is_dir().then_some(default))
    }
}

/// The time stamped on everything built: `SOURCE_DATE_EPOCH` when set,
/// else the start of the build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Epoch {
    pub seconds: u64,
    /// Set by the caller: the build is meant to be reproducible, and the
    /// base rootfs is built with it too.
    pub explicit: bool,
}

impl Epoch {
    pub fn from_env() -> anyhow::Result<Epoch> {
        match std::env::var("SOURCE_DATE_EPOCH") {
            Ok(value) => {
                let seconds = value
                    .trim()
                    .parse()
                    .with_context(|| format!("SOURCE_DATE_EPOCH={value:?} is not a number of seconds since 1970"))?;
                Ok(Epoch {
                    seconds,
                    explicit: true,
                })
            }
            Err(std::env::VarError::NotPresent) => Ok(Epoch {
                seconds: now_seconds(),
                explicit: false,
            }),
            Err(e) => bail!("reading SOURCE_DATE_EPOCH: {e}"),
        }
    }

    /// As `SOURCE_DATE_EPOCH` only when the caller set it.
    pub fn explicit_seconds(self) -> Option<u64> {
        self.explicit.then_some(self.seconds)
    }
}

pub fn now_seconds() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// UTC calendar time of `seconds` since 1970: (year, month, day, hour,
/// minute, second).
pub fn utc(seconds: u64) -> (i64, u32, u32, u32, u32, u32) {
    let days = i64::try_from(seconds / 86_400).unwrap_or(i64::MAX / 2);
    let rem = seconds % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (
        year,
        month,
        day,
        (rem / 3_600) as u32,
        (rem % 3_600 / 60) as u32,
        (rem % 60) as u32,
    )
}

pub fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from)
}

/// Stage timing and progress lines: every stage says its name, what it is
/// doing, and how long it took.
#[derive(Debug)]
pub struct Progress {
    started: Instant,
    pub stages: Vec<StageRecord>,
}

/// What a finished stage reports besides its time.
#[derive(Debug, Default)]
pub struct StageOutput {
    pub bytes: Option<u64>,
    pub note: String,
}

impl Progress {
    pub fn new() -> Progress {
        Progress {
            started: Instant::now(),
            stages: Vec::new(),
        }
    }

    pub fn elapsed_seconds(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Runs one stage and records it.
    pub fn stage<T>(
        &mut self,
        name: &str,
        what: &str,
        body: impl FnOnce() -> anyhow::Result<(T, StageOutput)>,
    ) -> anyhow::Result<T> {
        say(name, what);
        let started = Instant::now();
        let result = body();
        let seconds = started.elapsed().as_secs_f64();
        match result {
            Ok((value, out)) => {
                let size = out
                    .bytes
                    .map(|b| format!(", output {}", human_size(b)))
                    .unwrap_or_default();
                let note = if out.note.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", out.note)
                };
                say(name, &format!("done in {}{size}{note}", human_duration(seconds)));
                self.stages.push(StageRecord {
                    name: name.to_owned(),
                    seconds: (seconds * 10.0).round() / 10.0,
                    output_bytes: out.bytes,
                    note: out.note,
                });
                Ok(value)
            }
            Err(e) => {
                say(name, &format!("failed after {}", human_duration(seconds)));
                Err(e)
            }
        }
    }
}

/// One progress line of a stage.
pub fn say(stage: &str, what: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "xtask: [{stage}] {what}");
}

pub fn human_size(bytes: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    if bytes >= 1024 * 1024 {
        format!("{:.1} MiB", bytes as f64 / MIB)
    } else {
        format!("{bytes} bytes")
    }
}

pub fn human_duration(seconds: f64) -> String {
    if seconds < 60.0 {
        format!("{seconds:.1}s")
    } else {
        let whole = seconds.round() as u64;
        format!("{}m{:02}s", whole / 60, whole % 60)
    }
}

/// Bytes of regular files under `dir` (hard links once), like `du -b`.
pub fn tree_size(dir: &Path) -> anyhow::Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))? {
            let entry = entry.with_context(|| format!("listing {}", d.display()))?;
            let meta = entry
                .metadata()
                .with_context(|| format!("reading {}", entry.path().display()))?;
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.is_file() && (meta.nlink() == 1 || seen.insert((meta.dev(), meta.ino()))) {
                total += meta.len();
            }
        }
    }
    Ok(total)
}

/// The manifests, validated by the agent's own loader. Any error stops
/// the build with every error the validator found.
pub fn load_manifests(dir: &Path) -> anyhow::Result<Vec<Manifest>> {
    let report = manifest::load_dir(dir, &LoadOptions::default());
    if !report.is_clean() {
        let errors: Vec<String> = report.errors.iter().map(|e| format!("  {e}")).collect();
        bail!(
            "the manifests in {} are invalid ({} error{}); fix them or pass --manifests DIR:\n{}",
            dir.display(),
            errors.len(),
            if errors.len() == 1 { "" } else { "s" },
            errors.join("\n")
        );
    }
    let mut apps = report.apps;
    apps.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(apps)
}

/// Adds every app folder to `layer` under `opt/archipelago/apps/<id>/`.
pub fn add_manifests(layer: &mut Layer, apps: &[Manifest]) -> anyhow::Result<Vec<ManifestRecord>> {
    let mut records = Vec::new();
    for app in apps {
        let folder = app
            .path
            .parent()
            .with_context(|| format!("the manifest {} has no folder", app.path.display()))?;
        let dest = format!("{NODE_APPS_DIR}/{}", app.id);
        layer.add_dir(&dest)?;
        layer.add_tree(&dest, folder)?;
        records.push(ManifestRecord {
            app: app.id.to_string(),
            sha256: sha256_file(&app.path)?,
        });
    }
    Ok(records)
}

/// Reads the image folder, checks every archive against the lock file and
/// the lock file against the manifests, and adds them to `layer`.
pub fn add_images(layer: &mut Layer, dir: &Path, apps: &[Manifest]) -> anyhow::Result<Vec<ImageRecord>> {
    let lock_path = dir.join(IMAGES_LOCK);
    // The agent's own reader: the ISO carries exactly what the node accepts.
    let lock = images::load_lock(dir).with_context(|| {
        format!(
            "{} has no usable {IMAGES_LOCK}; run `cargo xtask images` again or pass --no-images",
            dir.display()
        )
    })?;
    check_lock_matches_manifests(&lock, apps).with_context(|| {
        format!(
            "{} does not match the manifests; run `cargo xtask images` again or pass --no-images",
            dir.display()
        )
    })?;
    layer.add_dir(NODE_IMAGES_DIR)?;
    layer.add_file(&format!("{NODE_IMAGES_DIR}/{IMAGES_LOCK}"), &lock_path)?;
    let mut records = Vec::new();
    for entry in &lock.images {
        if entry.archive.contains('/') || entry.archive.starts_with('.') {
            bail!(
                "{}: archive name {:?} is not a plain file name",
                lock_path.display(),
                entry.archive
            );
        }
        let archive = dir.join(&entry.archive);
        let size = fs::metadata(&archive)
            .with_context(|| format!("the image archive {} named in the lock file", archive.display()))?
            .len();
        if size != entry.size {
            bail!(
                "{} is {size} bytes but the lock file says {}; run `cargo xtask images` again",
                archive.display(),
                entry.size
            );
        }
        let sha = sha256_file(&archive)?;
        if sha != entry.archive_sha256 {
            bail!(
                "{} has sha256 {sha} but the lock file says {}; run `cargo xtask images` again",
                archive.display(),
                entry.archive_sha256
            );
        }
        layer.add_file_with_mode(&format!("{NODE_IMAGES_DIR}/{}", entry.archive), &archive, 0o644)?;
        records.push(ImageRecord {
            app: entry.app.clone(),
            reference: entry.reference.clone(),
            manifest_digest: entry.manifest_digest.to_string(),
            config_digest: entry.config_digest.to_string(),
            archive_sha256: entry.archive_sha256.clone(),
            size: entry.size,
        });
    }
    records.sort_by(|a, b| a.app.cmp(&b.app));
    Ok(records)
}

fn check_lock_matches_manifests(lock: &ImageLock, apps: &[Manifest]) -> anyhow::Result<()> {
    let mut problems = Vec::new();
    for app in apps {
        let entry = lock.images.iter().find(|e| e.app == app.id.as_str());
        match (app.pinned_image(), entry) {
            (_, None) => problems.push(format!("app {} has no image in the lock file", app.id)),
            (Some(pinned), Some(entry)) => {
                let digest = pinned.digest().as_str();
                if !entry.reference.ends_with(&format!("@{digest}")) {
                    problems.push(format!(
                        "app {}: the manifest pins {digest} but the lock file has {}",
                        app.id, entry.reference
                    ));
                }
            }
            (None, Some(_)) => {}
        }
    }
    for entry in &lock.images {
        if !apps.iter().any(|a| a.id.as_str() == entry.app) {
            problems.push(format!(
                "the lock file has an image for {}, which has no manifest",
                entry.app
            ));
        }
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("; "));
    }
    Ok(())
}

/// Checks a registry list with the agent's own reader and adds it to
/// `layer` as the node's list. Returns its sha256.
pub fn add_registries(layer: &mut Layer, file: &Path) -> anyhow::Result<String> {
    RegistryStore::open_file(file)
        .and_then(|list| list.refuse_credentials())
        .with_context(|| format!("checking the registry list {}", file.display()))?;
    layer.add_dir_with_mode(NODE_CONFIG_DIR, 0o700)?;
    layer.add_file_with_mode(&format!("{NODE_CONFIG_DIR}/{REGISTRIES_FILE}"), file, 0o600)?;
    sha256_file(file)
}

/// Refuses paths that special hooks and shell-free tools would split.
pub fn refuse_whitespace(path: &Path, what: &str) -> anyhow::Result<()> {
    if path.to_string_lossy().chars().any(char::is_whitespace) {
        bail!(
            "{what} {} contains whitespace, which mmdebstrap hooks cannot take; use a simpler path",
            path.display()
        );
    }
    Ok(())
}

pub fn require_root(stage: &str) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "the {stage} stage must run as root: mmdebstrap builds the rootfs in a chroot and every file must keep its owner"
        );
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use archy_agent::images::LockEntry;

    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), (1970, 1, 1, 0, 0, 0));
        assert_eq!(utc(1_700_000_000), (2023, 11, 14, 22, 13, 20));
        assert_eq!(utc(951_782_400), (2000, 2, 29, 0, 0, 0));
        assert_eq!(utc(4_102_444_799), (2099, 12, 31, 23, 59, 59));
    }

    #[test]
    fn arm64_is_refused_with_a_reason() {
        let err = Arch::Arm64.check_supported().unwrap_err().to_string();
        assert!(err.contains("arm64 is not supported yet"), "{err}");
        Arch::Amd64.check_supported().unwrap();
    }

    #[test]
    fn human_units() {
        assert_eq!(human_duration(3.25), "3.2s");
        assert_eq!(human_duration(125.0), "2m05s");
        assert_eq!(human_size(512), "512 bytes");
        assert_eq!(human_size(3 * 1024 * 1024 + 512 * 1024), "3.5 MiB");
    }

    #[test]
    fn a_registry_list_is_checked_and_installed_private() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("registries.json");
        fs::write(
            &good,
            r#"{"version": 1, "registries": [{"name": "lan", "url": "https://mirror.lan:5000", "priority": 10}]}"#,
        )
        .unwrap();
        let mut layer = Layer::new();
        let sha = add_registries(&mut layer, &good).unwrap();
        assert_eq!(sha.len(), 64);
        let root = tempfile::tempdir().unwrap();
        layer.install_into(root.path(), None).unwrap();
        let installed = root.path().join(NODE_CONFIG_DIR).join(REGISTRIES_FILE);
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(fs::metadata(&installed).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(
            fs::metadata(root.path().join(NODE_CONFIG_DIR))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o700
        );

        let bad = dir.path().join("bad.json");
        fs::write(
            &bad,
            r#"{"version": 1, "registries": [{"name": "lan", "url": "ftp://x"}]}"#,
        )
        .unwrap();
        let err = add_registries(&mut Layer::new(), &bad).unwrap_err();
        assert!(format!("{err:#}").contains("checking the registry list"), "{err:#}");
    }

    fn lock(entries: &[(&str, &str)]) -> ImageLock {
        let digest: archy_agent::manifest::Digest =
            format!("sha256:{}", "0".repeat(64)).parse().expect("a valid digest");
        ImageLock {
            version: 1,
            images: entries
                .iter()
                .map(|(app, reference)| LockEntry {
                    app: (*app).into(),
                    reference: (*reference).into(),
                    manifest_digest: digest.clone(),
                    config_digest: digest.clone(),
                    archive: format!("{app}.tar"),
                    archive_sha256: String::new(),
                    size: 0,
                })
                .collect(),
        }
    }

    #[test]
    fn the_image_lock_must_match_the_manifests() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let apps = load_manifests(&root.join("manifests")).unwrap();
        // Built apps (the UIs) are locked under the agent's build tag.
        let listed: Vec<(String, String)> = apps
            .iter()
            .map(|a| {
                let reference = match a.pinned_image() {
                    Some(p) => p.to_string(),
                    None => archy_agent::orchestrator::built_tag(a).unwrap().unwrap(),
                };
                (a.id.to_string(), reference)
            })
            .collect();
        assert!(apps[0].pinned_image().is_some(), "the cases below change a pinned app");
        let entries: Vec<(&str, &str)> = listed.iter().map(|(a, r)| (a.as_str(), r.as_str())).collect();
        check_lock_matches_manifests(&lock(&entries), &apps).unwrap();

        let err = check_lock_matches_manifests(&lock(&entries[1..]), &apps)
            .unwrap_err()
            .to_string();
        assert!(err.contains("has no image in the lock file"), "{err}");

        let mut stale = entries.clone();
        stale[0].1 = "docker.io/x/y:1@sha256:0000000000000000000000000000000000000000000000000000000000000000";
        let err = check_lock_matches_manifests(&lock(&stale), &apps)
            .unwrap_err()
            .to_string();
        assert!(err.contains("the manifest pins"), "{err}");

        let mut extra = entries.clone();
        extra.push(("ghost", "docker.io/x/y@sha256:00"));
        let err = check_lock_matches_manifests(&lock(&extra), &apps)
            .unwrap_err()
            .to_string();
        assert!(err.contains("ghost, which has no manifest"), "{err}");
    }
}
