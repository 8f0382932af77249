//! Writing the layout onto a disk: the partition table (`sfdisk`, package
//! fdisk) and the file systems (`mkfs.vfat`, dosfstools; `mkfs.ext4`,
//! e2fsprogs).
//!
//! Two ways, and the type says which: [`Plan::Fresh`] replaces the whole
//! disk; [`Plan::Reinstall`] keeps the partition table and the data
//! partition byte for byte, and makes the ESP and both slots anew. Neither
//! runs without a [`Consent`], which only the owner's typed answer or an
//! unattended install's checked choice can make.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _};

use super::layout::{self, Found, Layout, Part, Recognized};

/// The ESP's FAT label (11 characters at most).
pub const ESP_LABEL: &str = "ARCHY-ESP";

/// What the installer writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// A new partition table: everything on the disk is lost.
    Fresh(Layout),
    /// The disk already holds this layout: the data partition is kept.
    Reinstall,
}

/// The owner's yes to one plan on one disk. Only [`Consent::typed`],
/// [`Consent::unattended`] and [`Consent::named`] make one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consent {
    disk: PathBuf,
    plan: Plan,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoConsent {
    #[error("you typed {typed:?}, not the disk's name {expected:?}: nothing was written")]
    Mistyped { typed: String, expected: String },
    #[error("the data partition would be wiped and that was not confirmed: nothing was written")]
    DataNotConfirmed,
    #[error("an unattended install replaces only a blank disk or reinstalls Archipelago; {disk} holds something else")]
    NotBlank { disk: String },
}

impl Consent {
    /// The owner typed `typed` for `disk` (its kernel name, `sda`, or its
    /// full path). Replacing a disk that holds Archipelago (its data
    /// partition with it) also needs `wipe_data_confirmed`.
    pub fn typed(
        disk: &Path,
        plan: Plan,
        holds_archipelago: bool,
        typed: &str,
        wipe_data_confirmed: bool,
    ) -> Result<Consent, NoConsent> {
        let name = disk
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let typed = typed.trim();
        if typed != name && Path::new(typed) != disk {
            return Err(NoConsent::Mistyped {
                typed: typed.to_owned(),
                expected: name,
            });
        }
        if matches!(plan, Plan::Fresh(_)) && holds_archipelago && !wipe_data_confirmed {
            return Err(NoConsent::DataNotConfirmed);
        }
        Ok(Consent {
            disk: disk.to_owned(),
            plan,
        })
    }

    /// An unattended install: a fresh layout only onto a blank disk, a
    /// reinstall only onto this layout; never anything else.
    pub fn unattended(disk: &Path, content: super::disks::Content, layout: Layout) -> Result<Consent, NoConsent> {
        use super::disks::Content;
        let plan = match content {
            Content::Blank => Plan::Fresh(layout),
            Content::Archipelago => Plan::Reinstall,
            Content::Other => {
                return Err(NoConsent::NotBlank {
                    disk: disk.display().to_string(),
                })
            }
        };
        Ok(Consent {
            disk: disk.to_owned(),
            plan,
        })
    }

    /// An unattended install onto a disk named by its stable name
    /// (`archipelago.install.disk=`): that name is the owner's yes. A
    /// disk that holds this layout is reinstalled keeping its data; any
    /// other is replaced.
    pub fn named(disk: &Path, content: super::disks::Content, layout: Layout) -> Consent {
        use super::disks::Content;
        let plan = match content {
            Content::Archipelago => Plan::Reinstall,
            Content::Blank | Content::Other => Plan::Fresh(layout),
        };
        Consent {
            disk: disk.to_owned(),
            plan,
        }
    }

    pub fn disk(&self) -> &Path {
        &self.disk
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }
}

/// Writes what `consent` allows. Returns the disk's five partitions.
pub fn write(consent: &Consent) -> anyhow::Result<Box<[Found; 5]>> {
    let disk = consent.disk();
    let parts = match consent.plan() {
        Plan::Fresh(layout) => {
            write_table(disk, layout)?;
            let parts = read_layout(disk)?.with_context(|| {
                format!(
                    "{}: the partition table just written does not read back",
                    disk.display()
                )
            })?;
            mkfs(
                "mkfs.ext4",
                "e2fsprogs",
                &["-q", "-F", "-L", crate::datadisk::LABEL],
                &parts[4].node,
            )?;
            parts
        }
        Plan::Reinstall => read_layout(disk)?.with_context(|| {
            format!(
                "{}: no longer holds the Archipelago layout; nothing was written",
                disk.display()
            )
        })?,
    };
    mkfs(
        "mkfs.vfat",
        "dosfstools",
        &["-F", "32", "-n", ESP_LABEL],
        &parts[1].node,
    )?;
    for part in [Part::SlotA, Part::SlotB] {
        let node = &parts[(part.number() - 1) as usize].node;
        mkfs("mkfs.ext4", "e2fsprogs", &["-q", "-F", "-L", part.name()], node)?;
    }
    Ok(parts)
}

/// This disk's partitions, if it holds the layout.
pub fn read_layout(disk: &Path) -> anyhow::Result<Option<Box<[Found; 5]>>> {
    let out = Command::new("sfdisk")
        .arg("--json")
        .arg(disk)
        .stdin(Stdio::null())
        .output()
        .context("cannot run sfdisk (package fdisk)")?;
    if !out.status.success() {
        // No partition table at all.
        return Ok(None);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    match layout::recognize(&text).with_context(|| format!("cannot read sfdisk --json {}", disk.display()))? {
        Recognized::Archipelago(parts) => Ok(Some(parts)),
        Recognized::Other(_) => Ok(None),
    }
}

fn write_table(disk: &Path, layout: &Layout) -> anyhow::Result<()> {
    let mut child = Command::new("sfdisk")
        .args(["--quiet", "--wipe", "always", "--wipe-partitions", "always"])
        .arg(disk)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run sfdisk (package fdisk)")?;
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().context("sfdisk's stdin")?;
        stdin
            .write_all(layout.sfdisk_script().as_bytes())
            .context("cannot give sfdisk the layout")?;
    }
    let out = child.wait_with_output().context("waiting for sfdisk")?;
    if !out.status.success() {
        bail!(
            "sfdisk {} failed ({}): {}",
            disk.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    // The kernel's view of the new partitions, before anything uses them.
    let _ = Command::new("partx").arg("-u").arg(disk).status();
    let _ = Command::new("udevadm").arg("settle").status();
    Ok(())
}

fn mkfs(program: &str, package: &str, args: &[&str], node: &str) -> anyhow::Result<()> {
    let out = Command::new(program)
        .args(args)
        .arg(node)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {program} (package {package})"))?;
    if !out.status.success() {
        bail!(
            "{program} {node} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::os::disks::Content;
    use crate::os::layout::{plan, GIB};

    #[test]
    fn consent_needs_the_disk_name_typed() {
        let l = plan(20 * GIB, 0).unwrap();
        let disk = Path::new("/dev/vdb");
        assert!(Consent::typed(disk, Plan::Fresh(l.clone()), false, "vdb\n", false).is_ok());
        assert!(Consent::typed(disk, Plan::Fresh(l.clone()), false, "/dev/vdb", false).is_ok());
        assert_eq!(
            Consent::typed(disk, Plan::Fresh(l.clone()), false, "vda", false),
            Err(NoConsent::Mistyped {
                typed: "vda".to_owned(),
                expected: "vdb".to_owned()
            })
        );
        assert_eq!(
            Consent::typed(disk, Plan::Fresh(l.clone()), true, "vdb", false),
            Err(NoConsent::DataNotConfirmed)
        );
        assert!(Consent::typed(disk, Plan::Fresh(l), true, "vdb", true).is_ok());
        assert!(Consent::typed(disk, Plan::Reinstall, true, "vdb", false).is_ok());
    }

    #[test]
    fn unattended_consent_only_for_blank_or_archipelago() {
        let l = plan(20 * GIB, 0).unwrap();
        let disk = Path::new("/dev/vdb");
        let c = Consent::unattended(disk, Content::Blank, l.clone()).unwrap();
        assert!(matches!(c.plan(), Plan::Fresh(_)));
        let c = Consent::unattended(disk, Content::Archipelago, l.clone()).unwrap();
        assert_eq!(c.plan(), &Plan::Reinstall);
        assert!(matches!(
            Consent::unattended(disk, Content::Other, l),
            Err(NoConsent::NotBlank { .. })
        ));
    }
}
