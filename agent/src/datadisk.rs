//! `archy-agent data-disk`: mount the node's data partition before anything
//! else runs (the root-run `archy-data.service` calls it at every boot).
//!
//! The OS comes fresh from the squashfs at every boot; container storage,
//! app data, secrets and agent state live on the partition labelled
//! `ARCHY-DATA`, mounted at the data root. Without one the node still
//! boots, but everything is in RAM, and this says so loudly. A disk is
//! formatted only when the kernel command line names it
//! (`archipelago.format=/dev/…`), and never when it already carries the
//! label: the parameter can stay on the command line without ever wiping
//! the data it protects.
//!
//! The decisions are pure (`parse_cmdline`, `decide`); the effects run
//! Debian's own tools (util-linux, e2fsprogs, udev).

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

pub const LABEL: &str = "ARCHY-DATA";
const FORMAT_PARAM: &str = "archipelago.format=";
/// How long udev gets to show a labelled partition after boot.
const DEVICE_WAIT: Duration = Duration::from_secs(10);

/// What the node's kernel command line asks of the data disk.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Cmdline {
    /// `archipelago.format=/dev/…`: the only way a disk is ever formatted.
    pub format: Option<PathBuf>,
}

pub fn parse_cmdline(text: &str) -> anyhow::Result<Cmdline> {
    let mut out = Cmdline::default();
    for word in text.split_whitespace() {
        if let Some(device) = word.strip_prefix(FORMAT_PARAM) {
            if !device.starts_with("/dev/") || device.contains("..") {
                bail!(
                    "kernel command line: {FORMAT_PARAM}{device} names no device; \
                     allowed: a path under /dev/, e.g. {FORMAT_PARAM}/dev/vdb"
                );
            }
            out.format = Some(PathBuf::from(device));
        }
    }
    Ok(out)
}

/// What is on the device the command line asks to format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// No such device.
    Missing,
    /// The device and its file system label, if any.
    Present { label: Option<String> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormatDecision {
    /// Nothing asked.
    NotAsked,
    /// Asked, but the device already is a data disk: keep its data.
    AlreadyFormatted,
    Format,
}

pub fn decide(cmdline: &Cmdline, found: &Found) -> anyhow::Result<FormatDecision> {
    let Some(device) = &cmdline.format else {
        return Ok(FormatDecision::NotAsked);
    };
    match found {
        Found::Missing => bail!(
            "kernel command line asks to format {} but there is no such device",
            device.display()
        ),
        Found::Present { label: Some(l) } if l == LABEL => Ok(FormatDecision::AlreadyFormatted),
        Found::Present { .. } => Ok(FormatDecision::Format),
    }
}

/// Options of `archy-agent data-disk`.
#[derive(Debug, Clone)]
pub struct Options {
    pub mountpoint: PathBuf,
    /// The agent's user, who owns the data root (rootless).
    pub owner: Option<(u32, u32)>,
    pub cmdline: PathBuf,
}

/// Formats if asked, mounts the data disk if there is one, warns if not.
/// Returns whether a data disk is mounted.
pub fn run(opts: &Options) -> anyhow::Result<bool> {
    let cmdline_text =
        fs::read_to_string(&opts.cmdline).with_context(|| format!("cannot read {}", opts.cmdline.display()))?;
    let cmdline = parse_cmdline(&cmdline_text)?;
    if let Some(device) = &cmdline.format {
        settle();
        let found = probe(device)?;
        match decide(&cmdline, &found)? {
            FormatDecision::Format => {
                say(&format!(
                    "formatting {} as ext4, label {LABEL} (asked on the kernel command line)",
                    device.display()
                ));
                tool(
                    "mkfs.ext4",
                    "e2fsprogs",
                    &[
                        "-F".as_ref(),
                        "-q".as_ref(),
                        "-L".as_ref(),
                        LABEL.as_ref(),
                        device.as_os_str(),
                    ],
                )?;
            }
            FormatDecision::AlreadyFormatted => say(&format!(
                "{} already is the data disk (label {LABEL}); not formatting it again",
                device.display()
            )),
            FormatDecision::NotAsked => {}
        }
    }
    fs::create_dir_all(&opts.mountpoint).with_context(|| format!("cannot create {}", opts.mountpoint.display()))?;
    let by_label = Path::new("/dev/disk/by-label").join(LABEL);
    if is_mountpoint(&opts.mountpoint)? {
        say(&format!("{} is already mounted", opts.mountpoint.display()));
    } else if wait_for(&by_label) {
        // A power loss leaves the journal to replay and maybe more: the
        // same check fstab would run (exit 1 means errors were fixed).
        let status = Command::new("e2fsck")
            .args(["-p"])
            .arg(&by_label)
            .status()
            .context("cannot run e2fsck (package e2fsprogs)")?;
        if !matches!(status.code(), Some(0 | 1)) {
            bail!(
                "e2fsck -p {} failed ({status}): the data disk needs a manual check; \
                 refusing to mount it, and refusing to run apps without it",
                by_label.display()
            );
        }
        tool(
            "mount",
            "mount",
            &[
                "-o".as_ref(),
                "noatime".as_ref(),
                by_label.as_os_str(),
                opts.mountpoint.as_os_str(),
            ],
        )?;
    } else {
        warn_in_ram(&opts.mountpoint);
        own(opts)?;
        return Ok(false);
    }
    own(opts)?;
    say(&format!("data disk {LABEL} mounted at {}", opts.mountpoint.display()));
    Ok(true)
}

fn own(opts: &Options) -> anyhow::Result<()> {
    if let Some((uid, gid)) = opts.owner {
        std::os::unix::fs::chown(&opts.mountpoint, Some(uid), Some(gid))
            .with_context(|| format!("cannot give {} to uid {uid}", opts.mountpoint.display()))?;
    }
    fs::set_permissions(&opts.mountpoint, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("cannot set the mode of {}", opts.mountpoint.display()))
}

fn warn_in_ram(mountpoint: &Path) {
    let line = "=".repeat(72);
    say(&format!(
        "{line}\nWARNING: no partition labelled {LABEL}. Container storage, app data, secrets \
         and agent state under {} are in RAM and are LOST at power off.\nAdd a disk with an ext4 \
         partition labelled {LABEL}, or boot once with archipelago.format=/dev/<disk> to format one.\n{line}",
        mountpoint.display()
    ));
}

/// To stderr, which the unit sends to the journal and the console.
fn say(message: &str) {
    eprintln!("archipelago: {message}");
}

fn settle() {
    // Best effort: without udev (a container, a test) devices are there
    // or not; the wait below covers the rest.
    let _ = Command::new("udevadm").args(["settle", "--timeout=10"]).status();
}

fn wait_for(device: &Path) -> bool {
    settle();
    let deadline = Instant::now() + DEVICE_WAIT;
    loop {
        if device.exists() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn probe(device: &Path) -> anyhow::Result<Found> {
    if !device.exists() {
        return Ok(Found::Missing);
    }
    // blkid exits 2 when the device has no (recognised) file system.
    let output = Command::new("blkid")
        .args(["-o", "value", "-s", "LABEL"])
        .arg(device)
        .output()
        .context("cannot run blkid (package util-linux)")?;
    let label = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    Ok(Found::Present {
        label: (!label.is_empty()).then_some(label),
    })
}

fn is_mountpoint(path: &Path) -> anyhow::Result<bool> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").context("cannot read /proc/self/mountinfo")?;
    let want = path.to_string_lossy();
    Ok(mountinfo
        .lines()
        .any(|line| line.split(' ').nth(4) == Some(want.as_ref())))
}

fn tool(program: &str, package: &str, args: &[&OsStr]) -> anyhow::Result<()> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program} (package {package})"))?;
    if !output.status.success() {
        let shown: Vec<_> = args.iter().map(|a| a.to_string_lossy()).collect();
        bail!(
            "{program} {} failed ({}): {}",
            shown.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_format_parameter_is_read_from_the_command_line() {
        let c = parse_cmdline("BOOT_IMAGE=/live/vmlinuz boot=live archipelago.format=/dev/vdb quiet\n").unwrap();
        assert_eq!(c.format, Some(PathBuf::from("/dev/vdb")));
        assert_eq!(parse_cmdline("boot=live").unwrap(), Cmdline::default());
    }

    #[test]
    fn a_format_parameter_that_names_no_device_is_an_error() {
        let err = parse_cmdline("archipelago.format=vdb").unwrap_err().to_string();
        assert!(err.contains("archipelago.format=vdb") && err.contains("/dev/"), "{err}");
        assert!(parse_cmdline("archipelago.format=/dev/../etc/x").is_err());
    }

    #[test]
    fn a_disk_is_formatted_only_when_named_and_never_twice() {
        let asked = Cmdline {
            format: Some(PathBuf::from("/dev/vdb")),
        };
        let blank = Found::Present { label: None };
        let other = Found::Present {
            label: Some("WINDOWS".into()),
        };
        let ours = Found::Present {
            label: Some(LABEL.into()),
        };
        assert_eq!(decide(&Cmdline::default(), &blank).unwrap(), FormatDecision::NotAsked);
        assert_eq!(decide(&asked, &blank).unwrap(), FormatDecision::Format);
        assert_eq!(decide(&asked, &other).unwrap(), FormatDecision::Format);
        assert_eq!(decide(&asked, &ours).unwrap(), FormatDecision::AlreadyFormatted);
        let err = decide(&asked, &Found::Missing).unwrap_err().to_string();
        assert!(err.contains("/dev/vdb") && err.contains("no such device"), "{err}");
    }
}
