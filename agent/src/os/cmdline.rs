//! The kernel command line's `archipelago.*` words the installer and the
//! installed boot read (`docs/disk-layout.md`), pure.
//!
//! - `archipelago.install` asks for the interactive installer,
//!   `archipelago.install=auto` for an unattended one;
//! - `archipelago.install.disk=/dev/disk/by-id/…` names the disk;
//! - `archipelago.slot=a|b` marks a boot from an installed disk, and
//!   `live-media=` names the partition its live system must come from.

use std::path::Path;

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
}
