//! RAUC's `system.conf` for this node, rendered (pure) from the node's
//! facts. `archy-agent os boot-prepare` writes it at each boot into
//! [`SYSTEM_CONF`] (the slots' PARTUUIDs are only known on the node);
//! rauc.service's drop-in reads it from there.
//!
//! Option names as RAUC 1.8 documents them (docs/reference.rst at v1.8):
//! `[system] compatible, bootloader=custom, statusfile, bundle-formats`,
//! `[keyring] path, use-bundle-signing-time`, `[handlers] pre-install,
//! post-install, bootloader-custom-backend`, `[slot.rootfs.N] device,
//! type, bootname`. Slots are named by PARTUUID because RAUC's `mkfs.ext4`
//! gives the slot a new file system UUID on each install.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::os::release::{rauc_compatible as compatible, RAUC_SLOT_CLASS as SLOT_CLASS};

/// Where boot-prepare writes the rendered file.
pub const SYSTEM_CONF: &str = "/run/archipelago/os/system.conf";
/// The keyring built into the image (the rootfs stage installs the
/// signing certificate there, `xtask/src/pipeline/keys.rs`).
pub const KEYRING: &str = "/etc/rauc/keyring.pem";
/// The wrappers RAUC runs (rootfs/overlay/usr/lib/archipelago/).
pub const BACKEND: &str = "/usr/lib/archipelago/rauc-backend";
pub const PRE_INSTALL: &str = "/usr/lib/archipelago/rauc-pre-install";
pub const POST_INSTALL: &str = "/usr/lib/archipelago/rauc-post-install";
/// RAUC's status file's name in the data partition's OS folder
/// (`DataRoot::os_dir()`): kept across updates, unlike a slot.
pub const STATUS_FILE: &str = "rauc.status";

/// The device path of a partition by its PARTUUID.
pub fn by_partuuid(partuuid: &str) -> PathBuf {
    Path::new("/dev/disk/by-partuuid").join(partuuid.to_ascii_lowercase())
}

/// What the file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaucConf {
    /// Debian's architecture name (`amd64`).
    pub arch: String,
    /// Slot A's and slot B's devices ([`by_partuuid`] on a node).
    pub slot_a: PathBuf,
    pub slot_b: PathBuf,
    /// `<data>/system/os/rauc.status`.
    pub statusfile: PathBuf,
    pub keyring: PathBuf,
    pub backend: PathBuf,
    pub pre_install: PathBuf,
    pub post_install: PathBuf,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("RAUC's system.conf: {field} is {value:?}; allowed: {allowed}")]
pub struct ConfError {
    pub field: &'static str,
    pub value: String,
    pub allowed: &'static str,
}

impl RaucConf {
    /// A node's file: its slots by PARTUUID, the image's keyring and
    /// wrappers, the status file at `statusfile`.
    pub fn node(arch: &str, partuuid_a: &str, partuuid_b: &str, statusfile: PathBuf) -> RaucConf {
        RaucConf {
            arch: arch.to_owned(),
            slot_a: by_partuuid(partuuid_a),
            slot_b: by_partuuid(partuuid_b),
            statusfile,
            keyring: PathBuf::from(KEYRING),
            backend: PathBuf::from(BACKEND),
            pre_install: PathBuf::from(PRE_INSTALL),
            post_install: PathBuf::from(POST_INSTALL),
        }
    }
}

fn path_value(field: &'static str, p: &Path) -> Result<String, ConfError> {
    let s = p.to_str().unwrap_or("");
    // One line of an ini file: an absolute UTF-8 path without control
    // characters, and no ';' or '#' (comment characters to GLib).
    if !p.is_absolute() || s.is_empty() || s.chars().any(|c| c.is_control() || c == ';' || c == '#') {
        return Err(ConfError {
            field,
            value: p.to_string_lossy().into_owned(),
            allowed: "an absolute UTF-8 path without control characters, ';' or '#'",
        });
    }
    Ok(s.to_owned())
}

/// The file's text.
pub fn render(conf: &RaucConf) -> Result<String, ConfError> {
    if !["amd64", "arm64"].contains(&conf.arch.as_str()) {
        return Err(ConfError {
            field: "arch",
            value: conf.arch.clone(),
            allowed: "amd64, arm64",
        });
    }
    let mut s = String::new();
    // Writing into a String cannot fail.
    let _ = writeln!(
        s,
        "# Made at boot by archy-agent os boot-prepare (docs/updates.md); not kept.\n\
         [system]\n\
         compatible={}\n\
         # Our own backend (archy-agent os rauc-backend): two copies of the GRUB\n\
         # environment with a sequence number, never one rewritten in place.\n\
         bootloader=custom\n\
         # Plain bundles: the signature covers the whole file and is checked\n\
         # before anything is mounted or written.\n\
         bundle-formats=plain\n\
         statusfile={}\n\
         \n\
         [keyring]\n\
         path={}\n\
         # A node whose clock is wrong (dead RTC battery, no network yet) still\n\
         # accepts a valid bundle: certificates are checked at the signing time.\n\
         use-bundle-signing-time=true\n\
         \n\
         [handlers]\n\
         bootloader-custom-backend={}\n\
         pre-install={}\n\
         post-install={}",
        compatible(&conf.arch),
        path_value("statusfile", &conf.statusfile)?,
        path_value("keyring", &conf.keyring)?,
        path_value("backend", &conf.backend)?,
        path_value("pre_install", &conf.pre_install)?,
        path_value("post_install", &conf.post_install)?,
    );
    for (i, (bootname, device)) in [("A", &conf.slot_a), ("B", &conf.slot_b)].into_iter().enumerate() {
        let field = if i == 0 { "slot_a" } else { "slot_b" };
        let _ = write!(
            s,
            "\n[slot.{SLOT_CLASS}.{i}]\ndevice={}\ntype=ext4\nbootname={bootname}\n",
            path_value(field, device)?
        );
    }
    Ok(s)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_node_file_names_its_slots_by_partuuid() {
        let conf = RaucConf::node(
            "amd64",
            "0A1B-1",
            "0a1b-2",
            PathBuf::from("/var/lib/archipelago/system/os/rauc.status"),
        );
        let text = render(&conf).unwrap();
        for line in [
            "compatible=archipelago-amd64",
            "bootloader=custom",
            "bundle-formats=plain",
            "statusfile=/var/lib/archipelago/system/os/rauc.status",
            "[keyring]",
            "path=/etc/rauc/keyring.pem",
            "use-bundle-signing-time=true",
            "bootloader-custom-backend=/usr/lib/archipelago/rauc-backend",
            "pre-install=/usr/lib/archipelago/rauc-pre-install",
            "post-install=/usr/lib/archipelago/rauc-post-install",
            "[slot.rootfs.0]",
            "device=/dev/disk/by-partuuid/0a1b-1",
            "bootname=A",
            "[slot.rootfs.1]",
            "device=/dev/disk/by-partuuid/0a1b-2",
            "bootname=B",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from\n{text}");
        }
        assert_eq!(text.matches("type=ext4").count(), 2);
    }

    #[test]
    fn values_that_would_break_the_file_are_refused() {
        let mut conf = RaucConf::node("amd64", "a", "b", PathBuf::from("/s"));
        conf.statusfile = PathBuf::from("/x\n[slot.evil.0]");
        let e = render(&conf).unwrap_err();
        assert_eq!(e.field, "statusfile");
        conf.statusfile = PathBuf::from("relative");
        assert!(render(&conf).is_err());
        let conf = RaucConf::node("i386", "a", "b", PathBuf::from("/s"));
        assert!(render(&conf).unwrap_err().to_string().contains("allowed: amd64, arm64"));
    }
}
