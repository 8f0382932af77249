//! `archy-agent os check-medium`: on a boot from an installed disk, the
//! live system must come from the slot partition `grub.cfg` named.
//!
//! live-boot falls back to scanning every device, removable ones first,
//! when the named one fails, so a stick left in the machine could boot
//! instead of the slot. Early at boot (`archy-medium.service`) this checks
//! that `/run/live/medium` is mounted from the device `live-media=` names,
//! and otherwise panics the kernel: `panic=10` restarts the machine, and
//! GRUB counts the try. The decision is pure ([`decide`]); [`gather`]
//! resolves the names and [`panic_kernel`] is the effect.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::cmdline::Cmdline;

/// Where live-boot mounts the medium it booted from.
pub const MEDIUM_DIR: &str = "/run/live/medium";
/// The only form of `live-media=` an installed `grub.cfg` writes.
pub const BY_PARTUUID: &str = "/dev/disk/by-partuuid/";

/// What the boot found, resolved to device nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediumFacts {
    /// The device `live-media=` names, when its link resolves.
    pub named: Option<PathBuf>,
    /// The source of the medium's mount, resolved, when it is mounted.
    pub mounted: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MediumDecision {
    /// Not a boot from an installed disk (no `archipelago.slot=`).
    NotInstalled,
    /// The medium is the named slot partition.
    Good { device: PathBuf },
    /// Anything else: panic, with the reason for the console.
    Panic(String),
}

/// Decides from the command line and the facts (pure).
pub fn decide(cmd: &Cmdline, facts: &MediumFacts) -> MediumDecision {
    let Some(slot) = cmd.slot else {
        return MediumDecision::NotInstalled;
    };
    let Some(media) = &cmd.live_media else {
        return MediumDecision::Panic(format!(
            "archipelago.slot={slot} without live-media=: cannot tell which partition to run from"
        ));
    };
    if !media.starts_with(BY_PARTUUID) {
        return MediumDecision::Panic(format!("live-media={media} is not a {BY_PARTUUID}… name"));
    }
    let Some(named) = &facts.named else {
        return MediumDecision::Panic(format!("live-media={media} names no device on this machine"));
    };
    match &facts.mounted {
        None => MediumDecision::Panic(format!("{MEDIUM_DIR} is not mounted")),
        Some(m) if m == named => MediumDecision::Good { device: named.clone() },
        Some(m) => MediumDecision::Panic(format!(
            "{MEDIUM_DIR} is mounted from {}, not from slot {slot}'s {} ({media}): live-boot fell back to another device",
            m.display(),
            named.display()
        )),
    }
}

/// Resolves `live-media=` and the source of `medium`'s mount.
pub fn gather(cmd: &Cmdline, medium: &Path) -> MediumFacts {
    let named = cmd.live_media.as_deref().and_then(|m| std::fs::canonicalize(m).ok());
    let mounted = Command::new("findmnt")
        .args(["-n", "-o", "SOURCE", "--mountpoint"])
        .arg(medium)
        .stdin(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
        .map(|s| std::fs::canonicalize(&s).unwrap_or_else(|_| PathBuf::from(s)));
    MediumFacts { named, mounted }
}

/// Crashes the kernel (`echo c > /proc/sysrq-trigger`): with `panic=10`
/// the machine restarts. Returns only if the kernel refused.
pub fn panic_kernel() -> anyhow::Result<()> {
    use anyhow::Context as _;
    // Give the console a moment to show why.
    std::thread::sleep(std::time::Duration::from_secs(3));
    std::fs::write("/proc/sysrq-trigger", b"c").context("cannot write /proc/sysrq-trigger")?;
    anyhow::bail!("the kernel did not panic")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn installed(media: Option<&str>) -> Cmdline {
        Cmdline {
            slot: Some('a'),
            live_media: media.map(str::to_owned),
            ..Cmdline::default()
        }
    }

    fn facts(named: Option<&str>, mounted: Option<&str>) -> MediumFacts {
        MediumFacts {
            named: named.map(PathBuf::from),
            mounted: mounted.map(PathBuf::from),
        }
    }

    const MEDIA: &str = "/dev/disk/by-partuuid/0fc63daf-8483-4772-8e79-3d69d8477de4";

    #[test]
    fn a_live_boot_is_not_checked() {
        let live = Cmdline {
            live_media: Some("/dev/sr0".into()),
            ..Cmdline::default()
        };
        assert_eq!(
            decide(&live, &facts(None, Some("/dev/sr0"))),
            MediumDecision::NotInstalled
        );
    }

    #[test]
    fn the_named_partition_is_good() {
        assert_eq!(
            decide(&installed(Some(MEDIA)), &facts(Some("/dev/vda3"), Some("/dev/vda3"))),
            MediumDecision::Good {
                device: PathBuf::from("/dev/vda3")
            }
        );
    }

    #[test]
    fn anything_else_panics_with_the_reason() {
        let cases = [
            (
                installed(Some(MEDIA)),
                facts(Some("/dev/vda3"), Some("/dev/sdb1")),
                "mounted from /dev/sdb1",
            ),
            (installed(Some(MEDIA)), facts(Some("/dev/vda3"), None), "is not mounted"),
            (
                installed(Some(MEDIA)),
                facts(None, Some("/dev/sdb1")),
                "names no device",
            ),
            (installed(None), facts(None, Some("/dev/sdb1")), "without live-media="),
            (
                installed(Some("/dev/sdb1")),
                facts(Some("/dev/sdb1"), Some("/dev/sdb1")),
                "not a /dev/disk/by-partuuid/",
            ),
        ];
        for (cmd, f, says) in cases {
            match decide(&cmd, &f) {
                MediumDecision::Panic(why) => assert!(why.contains(says), "{why}"),
                other => panic!("{other:?} for {f:?}"),
            }
        }
    }
}
