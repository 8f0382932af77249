//! What the image stages share: their command-line flags, where things
//! go (the target folder, the node's paths), the build time stamp, and the
//! preconditions every stage checks (root, paths without whitespace).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use archy_agent::images;
use archy_agent::os::release::Version;

/// The product name in file names and the report.
pub const PRODUCT: &str = "archipelago";
/// The workspace version (xtask shares it): a release's version unless
/// the build is given another ([`ReleaseArgs::version`]).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// What `cargo xtask images` writes, relative to the target directory.
pub const IMAGES_SUBDIR: &str = "images";
pub const IMAGES_LOCK: &str = images::LOCK_FILE;

/// Where things go on the node.
pub const NODE_APPS_DIR: &str = "opt/archipelago/apps";
pub const NODE_IMAGES_DIR: &str = "usr/share/archipelago/images";

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
    #[command(flatten)]
    pub release: ReleaseArgs,
}

/// What names and signs a release: its version and the key its update
/// bundle and `SHA256SUMS` are signed with (whose certificate the image
/// trusts as its RAUC keyring).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ReleaseArgs {
    /// The release's version, in the ISO's and the bundle's file names,
    /// release.json, the bundle's manifest and `os status`: MAJOR.MINOR.PATCH
    /// with an optional pre-release (1.2.0-rc.1) [default: the workspace version].
    #[arg(long = "release-version", value_name = "VERSION", env = "ARCHY_RELEASE_VERSION")]
    pub version: Option<Version>,
    /// The release signing key (PEM, mode 0600) [default: a development key
    /// made once under target/keys/].
    #[arg(long, value_name = "FILE", env = "ARCHY_SIGN_KEY", requires = "sign_cert")]
    pub sign_key: Option<PathBuf>,
    /// The release signing key's X.509 certificate (PEM): the image's RAUC
    /// keyring (/etc/rauc/keyring.pem).
    #[arg(long, value_name = "FILE", env = "ARCHY_SIGN_CERT", requires = "sign_key")]
    pub sign_cert: Option<PathBuf>,
}

impl ReleaseArgs {
    /// `--release-version` (or ARCHY_RELEASE_VERSION), else the workspace
    /// version.
    pub fn version(&self) -> anyhow::Result<Version> {
        match &self.version {
            Some(v) => Ok(v.clone()),
            None => workspace_version(),
        }
    }
}

/// [`VERSION`] as a release version.
pub fn workspace_version() -> anyhow::Result<Version> {
    Version::parse(VERSION).context("the workspace version in Cargo.toml")
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
                rfc3339(seconds).with_context(|| format!("SOURCE_DATE_EPOCH={value:?}"))?;
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

/// The last second a build can be stamped with, 9999-12-31T23:59:59Z:
/// RFC 3339 and ISO 9660 dates have four-digit years.
pub const LAST_SECOND: u64 = 253_402_300_799;

/// `YYYY-MM-DDThh:mm:ssZ`: `seconds` since 1970 as an RFC 3339 UTC time.
pub fn rfc3339(seconds: u64) -> anyhow::Result<String> {
    if seconds > LAST_SECOND {
        bail!("{seconds} seconds since 1970 is after 9999-12-31T23:59:59Z, the last time a build can be stamped with");
    }
    Ok(humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(seconds)).to_string())
}

pub fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from)
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
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(rfc3339(0).unwrap(), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000).unwrap(), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400).unwrap(), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(4_102_444_799).unwrap(), "2099-12-31T23:59:59Z");
        assert_eq!(rfc3339(LAST_SECOND).unwrap(), "9999-12-31T23:59:59Z");
        let err = rfc3339(LAST_SECOND + 1).unwrap_err().to_string();
        assert!(err.contains("after 9999-12-31T23:59:59Z"), "{err}");
    }

    fn release_args(args: &[&str]) -> Result<ReleaseArgs, clap::Error> {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            release: ReleaseArgs,
        }
        <Cli as clap::Parser>::try_parse_from(std::iter::once("x").chain(args.iter().copied())).map(|c| c.release)
    }

    #[test]
    fn the_release_version_is_the_workspace_one_unless_given() {
        // The test process's own environment must not decide the default.
        if std::env::var_os("ARCHY_RELEASE_VERSION").is_none() {
            assert_eq!(release_args(&[]).unwrap().version().unwrap().to_string(), VERSION);
        }
        let given = release_args(&["--release-version", "2.0.0-rc.1"]).unwrap();
        assert_eq!(given.version().unwrap().to_string(), "2.0.0-rc.1");
        let e = release_args(&["--release-version", "2.0"]).unwrap_err().to_string();
        assert!(
            e.contains("not a release version") && e.contains("MAJOR.MINOR.PATCH"),
            "{e}"
        );
        workspace_version().unwrap();
    }

    #[test]
    fn a_signing_key_needs_its_certificate() {
        if std::env::var_os("ARCHY_SIGN_KEY").is_some() || std::env::var_os("ARCHY_SIGN_CERT").is_some() {
            return;
        }
        assert!(release_args(&["--sign-key", "/k"]).is_err());
        assert!(release_args(&["--sign-cert", "/c"]).is_err());
        let both = release_args(&["--sign-key", "/k", "--sign-cert", "/c"]).unwrap();
        assert_eq!(both.sign_key.as_deref(), Some(Path::new("/k")));
    }

    #[test]
    fn arm64_is_refused_with_a_reason() {
        let err = Arch::Arm64.check_supported().unwrap_err().to_string();
        assert!(err.contains("arm64 is not supported yet"), "{err}");
        Arch::Amd64.check_supported().unwrap();
    }
}
