//! The kernel command line's `archipelago.*` words the installer and the
//! installed boot read (`docs/disk-layout.md`), pure.
//!
//! - `archipelago.install` asks for the interactive installer,
//!   `archipelago.install=auto` for an unattended one;
//! - `archipelago.install.disk=/dev/disk/by-id/…` names the disk;
//! - `archipelago.slot=a|b` marks a boot from an installed disk, and
//!   `live-media=` names the partition its live system must come from;
//!   `rauc.slot=A|B` is the same slot as RAUC names it;
//! - `archipelago.esp=PARTUUID=…` names the ESP holding the boot
//!   environment (`os::bootenv`); `archipelago.degraded=1` says GRUB could
//!   not use it and booted the committed slot anyway;
//! - tests only (a release's `live/bootargs` adds them):
//!   `archipelago.trial_deadline=<seconds>` shortens the trial's health
//!   deadline, `archipelago.test.unhealthy` makes the trial fail its check.

use std::path::Path;

use super::bootenv::SlotName;
use super::grub::PartUuid;

/// How the installer was asked to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstallMode {
    /// Questions on the console.
    Interactive,
    /// No questions (`archipelago.install=auto`).
    Auto,
}

/// The words of one kernel command line that matter here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cmdline {
    pub install: Option<InstallMode>,
    /// `archipelago.install.disk=`, as given.
    pub install_disk: Option<String>,
    /// `archipelago.slot=`: `a` or `b`.
    pub slot: Option<char>,
    /// `live-media=`, as given.
    pub live_media: Option<String>,
    /// `rauc.slot=`: A or B.
    pub rauc_slot: Option<SlotName>,
    /// `archipelago.esp=PARTUUID=`.
    pub esp: Option<PartUuid>,
    /// `archipelago.degraded=1`.
    pub degraded: bool,
    /// `archipelago.trial_deadline=` (seconds, tests).
    pub trial_deadline: Option<u64>,
    /// `archipelago.test.unhealthy` (tests).
    pub test_unhealthy: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: the kernel command line has {word}={value:?}; allowed: {allowed}")]
pub struct CmdlineError {
    pub file: String,
    pub word: &'static str,
    pub value: String,
    pub allowed: &'static str,
}

const INSTALL: &str = "archipelago.install";
const INSTALL_DISK: &str = "archipelago.install.disk";
const SLOT: &str = "archipelago.slot";
const LIVE_MEDIA: &str = "live-media";
const RAUC_SLOT: &str = "rauc.slot";
const ESP: &str = "archipelago.esp";
const DEGRADED: &str = "archipelago.degraded";
const TRIAL_DEADLINE: &str = "archipelago.trial_deadline";
const TEST_UNHEALTHY: &str = "archipelago.test.unhealthy";

/// Parses `text` (the contents of `/proc/cmdline`, read from `file`,
/// named in errors). The last occurrence of a word wins, as in the kernel.
/// Words are split on white space: none of ours takes a quoted value.
pub fn parse(text: &str, file: &Path) -> Result<Cmdline, CmdlineError> {
    let err = |word: &'static str, value: &str, allowed: &'static str| CmdlineError {
        file: file.display().to_string(),
        word,
        value: value.to_owned(),
        allowed,
    };
    let mut out = Cmdline::default();
    for token in text.split_whitespace() {
        let (word, value) = match token.split_once('=') {
            Some((w, v)) => (w, Some(v)),
            None => (token, None),
        };
        match (word, value) {
            (INSTALL, None) => out.install = Some(InstallMode::Interactive),
            (INSTALL, Some("auto")) => out.install = Some(InstallMode::Auto),
            (INSTALL, Some(v)) => {
                return Err(err(INSTALL, v, "no value (interactive) or auto"));
            }
            (INSTALL_DISK, Some(v)) if v.starts_with("/dev/") => out.install_disk = Some(v.to_owned()),
            (INSTALL_DISK, v) => {
                return Err(err(
                    INSTALL_DISK,
                    v.unwrap_or(""),
                    "a disk's stable name, /dev/disk/by-id/…",
                ));
            }
            (SLOT, Some("a")) => out.slot = Some('a'),
            (SLOT, Some("b")) => out.slot = Some('b'),
            (SLOT, v) => return Err(err(SLOT, v.unwrap_or(""), "a or b")),
            (LIVE_MEDIA, Some(v)) => out.live_media = Some(v.to_owned()),
            (RAUC_SLOT, Some("A")) => out.rauc_slot = Some(SlotName::A),
            (RAUC_SLOT, Some("B")) => out.rauc_slot = Some(SlotName::B),
            (RAUC_SLOT, v) => return Err(err(RAUC_SLOT, v.unwrap_or(""), "A or B")),
            (ESP, v) => {
                let uuid = v
                    .and_then(|v| v.strip_prefix("PARTUUID="))
                    .and_then(|u| PartUuid::parse(u).ok())
                    .ok_or_else(|| {
                        err(
                            ESP,
                            v.unwrap_or(""),
                            "PARTUUID=<GPT partition GUID, 8-4-4-4-12 hex digits>",
                        )
                    })?;
                out.esp = Some(uuid);
            }
            (DEGRADED, Some("1")) => out.degraded = true,
            (DEGRADED, v) => return Err(err(DEGRADED, v.unwrap_or(""), "1")),
            (TRIAL_DEADLINE, v) => {
                let secs = v
                    .and_then(|v| v.parse::<u64>().ok())
                    .filter(|s| *s > 0)
                    .ok_or_else(|| err(TRIAL_DEADLINE, v.unwrap_or(""), "a whole number of seconds, 1 or more"))?;
                out.trial_deadline = Some(secs);
            }
            (TEST_UNHEALTHY, None) => out.test_unhealthy = true,
            (TEST_UNHEALTHY, Some(v)) => return Err(err(TEST_UNHEALTHY, v, "no value")),
            _ => {}
        }
    }
    Ok(out)
}

/// Reads and parses a command line file (`/proc/cmdline`).
pub fn read(file: &Path) -> anyhow::Result<Cmdline> {
    use anyhow::Context as _;
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    Ok(parse(&text, file)?)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<Cmdline, CmdlineError> {
        parse(text, Path::new("/proc/cmdline"))
    }

    #[test]
    fn reads_the_install_words() {
        let c = p("BOOT_IMAGE=/live/vmlinuz boot=live archipelago.install quiet\n").unwrap();
        assert_eq!(c.install, Some(InstallMode::Interactive));
        assert_eq!(c.install_disk, None);
        let c = p("boot=live archipelago.install=auto archipelago.install.disk=/dev/disk/by-id/virtio-s1").unwrap();
        assert_eq!(c.install, Some(InstallMode::Auto));
        assert_eq!(c.install_disk.as_deref(), Some("/dev/disk/by-id/virtio-s1"));
        // The menu's interactive entry with auto appended: the last wins.
        let c = p("archipelago.install archipelago.install=auto").unwrap();
        assert_eq!(c.install, Some(InstallMode::Auto));
        let c = p("boot=live quiet").unwrap();
        assert_eq!(c, Cmdline::default());
    }

    #[test]
    fn reads_an_installed_boot() {
        let c =
            p("boot=live live-media=/dev/disk/by-partuuid/0a-1 live-media-path=/live archipelago.slot=b rauc.slot=B")
                .unwrap();
        assert_eq!(c.slot, Some('b'));
        assert_eq!(c.live_media.as_deref(), Some("/dev/disk/by-partuuid/0a-1"));
        assert_eq!(c.install, None);
    }

    #[test]
    fn bad_values_name_the_word_the_value_and_what_is_allowed() {
        let e = p("archipelago.install=yes").unwrap_err();
        assert_eq!(e.word, "archipelago.install");
        let msg = e.to_string();
        assert!(
            msg.contains("/proc/cmdline") && msg.contains("\"yes\"") && msg.contains("auto"),
            "{msg}"
        );
        let e = p("archipelago.install.disk=sda").unwrap_err();
        assert!(e.to_string().contains("/dev/disk/by-id/"), "{e}");
        assert!(p("archipelago.install.disk").is_err());
        let e = p("archipelago.slot=c").unwrap_err();
        assert!(e.to_string().contains("a or b"), "{e}");
        assert!(p("archipelago.slot").is_err());
    }

    #[test]
    fn reads_the_boot_counting_words() {
        let c = p(
            "archipelago.slot=b rauc.slot=B archipelago.esp=PARTUUID=0A0B0C0D-1111-4111-8111-111111111111 \
             archipelago.degraded=1 archipelago.trial_deadline=90 archipelago.test.unhealthy",
        )
        .unwrap();
        assert_eq!(c.rauc_slot, Some(SlotName::B));
        assert_eq!(
            c.esp.as_ref().map(PartUuid::as_str),
            Some("0a0b0c0d-1111-4111-8111-111111111111")
        );
        assert!(c.degraded && c.test_unhealthy);
        assert_eq!(c.trial_deadline, Some(90));
        let c = p("rauc.slot=A").unwrap();
        assert_eq!(c.rauc_slot, Some(SlotName::A));
        assert!(!c.degraded && !c.test_unhealthy && c.esp.is_none() && c.trial_deadline.is_none());
        for (bad, word, allowed) in [
            ("archipelago.esp=/dev/sda2", "archipelago.esp", "PARTUUID="),
            ("archipelago.esp=PARTUUID=xyz", "archipelago.esp", "PARTUUID="),
            ("archipelago.esp", "archipelago.esp", "PARTUUID="),
            ("archipelago.degraded=yes", "archipelago.degraded", "1"),
            ("archipelago.degraded", "archipelago.degraded", "1"),
            ("archipelago.trial_deadline=0", "archipelago.trial_deadline", "seconds"),
            ("archipelago.trial_deadline=5m", "archipelago.trial_deadline", "seconds"),
            ("archipelago.trial_deadline", "archipelago.trial_deadline", "seconds"),
            ("archipelago.test.unhealthy=1", "archipelago.test.unhealthy", "no value"),
            ("rauc.slot=a", "rauc.slot", "A or B"),
        ] {
            let e = p(bad).unwrap_err();
            assert_eq!(e.word, word, "{bad}");
            let msg = e.to_string();
            assert!(msg.contains(allowed) && msg.contains("/proc/cmdline"), "{bad}: {msg}");
        }
    }
}
