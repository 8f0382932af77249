//! Which disks the installer may offer, and which one it takes.
//!
//! The decisions are pure ([`assess`], [`choose`]); [`gather`] asks
//! `lsblk` and `findmnt` (util-linux) and reuses the data disk's blank
//! check (`datadisk::gather`). Every doubt means no: a disk whose facts
//! cannot be read is not offered.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};

use super::layout::{self, gib, Recognized, MIN_DISK};

/// A disk as `lsblk` shows it, with its partitions.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Device {
    pub name: String,
    pub path: PathBuf,
    pub size: u64,
    pub ro: bool,
    /// Removable media.
    pub rm: bool,
    /// `disk`, `part`, `loop`, `rom`, `raid1`, `lvm`, …
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub serial: Option<String>,
    #[serde(default)]
    pub fstype: Option<String>,
    #[serde(default)]
    pub label: Option<String>,
    #[serde(default)]
    pub partlabel: Option<String>,
    #[serde(default)]
    pub pttype: Option<String>,
    #[serde(default)]
    pub mountpoints: Vec<Option<String>>,
    #[serde(default)]
    pub children: Vec<Device>,
}

#[derive(Debug, Deserialize)]
struct LsblkOutput {
    blockdevices: Vec<Device>,
}

/// The columns [`parse_lsblk`] reads, for `lsblk -J -b -o`.
pub const LSBLK_COLUMNS: &str = "NAME,PATH,SIZE,RO,RM,TYPE,MODEL,SERIAL,FSTYPE,LABEL,PARTLABEL,PTTYPE,MOUNTPOINTS";

pub fn parse_lsblk(json: &str) -> Result<Vec<Device>, serde_json::Error> {
    Ok(serde_json::from_str::<LsblkOutput>(json)?.blockdevices)
}

impl Device {
    /// Every mount point of the disk and its partitions.
    fn mounts(&self) -> Vec<String> {
        let own = self.mountpoints.iter().flatten().cloned();
        own.chain(self.children.iter().flat_map(Device::mounts)).collect()
    }

    /// RAID or LVM members among the disk and its partitions.
    fn members(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(fs) = &self.fstype {
            if fs == "linux_raid_member" || fs == "LVM2_member" {
                out.push(format!("{} ({fs})", self.path.display()));
            }
        }
        if matches!(self.kind.as_str(), "lvm" | "crypt") || self.kind.starts_with("raid") {
            out.push(format!("{} ({})", self.path.display(), self.kind));
        }
        out.extend(self.children.iter().flat_map(Device::members));
        out
    }

    /// One line about what is on it, for the list.
    pub fn contents(&self) -> String {
        if self.children.is_empty() {
            return match (&self.pttype, &self.fstype) {
                (_, Some(fs)) => format!("{fs} on the whole disk"),
                (Some(pt), None) => format!("an empty {pt} partition table"),
                (None, None) => "nothing recognised".to_owned(),
            };
        }
        let parts: Vec<String> = self
            .children
            .iter()
            .map(|p| {
                let what = [p.fstype.as_deref(), p.label.as_deref(), p.partlabel.as_deref()]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join(" ");
                format!(
                    "{} {} {}",
                    p.name,
                    gib(p.size),
                    if what.is_empty() { "?" } else { &what }
                )
            })
            .collect();
        parts.join("; ")
    }
}

/// Why a disk is never offered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(tag = "reason", rename_all = "kebab-case")]
pub enum Hidden {
    #[error("it is the medium the installer booted from")]
    BootMedium,
    #[error("it is read-only")]
    ReadOnly,
    #[error("it is a {kind} device, not a disk")]
    NotADisk { kind: String },
    #[error("it holds {}, less than the {} the installer needs", gib(*.size), gib(MIN_DISK))]
    TooSmall { size: u64 },
}

/// Why a disk is shown but refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(tag = "reason", rename_all = "kebab-case")]
pub enum Refused {
    #[error("it is mounted: {}", .0.join(", "))]
    Mounted(Vec<String>),
    #[error("it is a RAID or LVM member: {}", .0.join(", "))]
    Member(Vec<String>),
}

/// What the installer would do to a disk it may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Content {
    /// Positive evidence of a blank disk: a fresh install.
    Blank,
    /// It holds this layout: a reinstall keeping its data partition.
    Archipelago,
    /// Anything else: a fresh install replaces everything on it.
    Other,
}

/// One disk in the installer's list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Offered {
    pub path: PathBuf,
    /// `/dev/disk/by-id/…` names, the ones `archipelago.install.disk=` takes.
    pub stable_names: Vec<String>,
    pub size: u64,
    pub model: String,
    pub serial: String,
    pub contents: String,
    pub content: Content,
    /// Empty when the installer may take it.
    pub refused: Vec<Refused>,
}

/// Facts about a disk beyond what `lsblk` lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extra {
    pub content: Content,
    pub stable_names: Vec<String>,
}

/// Whether a disk is offered (`Ok`, maybe refused) or never shown.
pub fn assess(dev: &Device, boot_disks: &[PathBuf], allow_loop: bool, extra: &Extra) -> Result<Offered, Hidden> {
    if boot_disks.contains(&dev.path) {
        return Err(Hidden::BootMedium);
    }
    if dev.name.starts_with("zram") {
        return Err(Hidden::NotADisk {
            kind: "zram".to_owned(),
        });
    }
    if !(dev.kind == "disk" || (dev.kind == "loop" && allow_loop)) {
        return Err(Hidden::NotADisk { kind: dev.kind.clone() });
    }
    if dev.ro {
        return Err(Hidden::ReadOnly);
    }
    if dev.size < MIN_DISK {
        return Err(Hidden::TooSmall { size: dev.size });
    }
    let mut refused = Vec::new();
    let mounts = dev.mounts();
    if !mounts.is_empty() {
        refused.push(Refused::Mounted(mounts));
    }
    let members = dev.members();
    if !members.is_empty() {
        refused.push(Refused::Member(members));
    }
    Ok(Offered {
        path: dev.path.clone(),
        stable_names: extra.stable_names.clone(),
        size: dev.size,
        model: dev.model.clone().unwrap_or_default().trim().to_owned(),
        serial: dev.serial.clone().unwrap_or_default().trim().to_owned(),
        contents: dev.contents(),
        content: extra.content,
        refused,
    })
}

/// Why no disk was chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoChoice {
    #[error("{named} is not a disk the installer may take: {why}")]
    NamedHidden { named: String, why: Hidden },
    #[error("{named} is no disk this machine has")]
    NamedMissing { named: String },
    #[error("{named} is refused: {}", reasons(.why))]
    NamedRefused { named: String, why: Vec<Refused> },
    #[error("no disk is blank or holds Archipelago; name the one to install onto with archipelago.install.disk=/dev/disk/by-id/…{}", listed(.others))]
    NoneAutomatic { others: Vec<String> },
    #[error("{} disks could be installed onto ({}); name one with archipelago.install.disk=/dev/disk/by-id/…", .0.len(), .0.join(", "))]
    Several(Vec<String>),
}

fn reasons(r: &[Refused]) -> String {
    let shown: Vec<String> = r.iter().map(ToString::to_string).collect();
    shown.join("; ")
}

fn listed(others: &[String]) -> String {
    if others.is_empty() {
        String::new()
    } else {
        format!(" (other disks: {})", others.join(", "))
    }
}

/// The disk an unattended install takes: the one named (`named`, already
/// resolved to its device, with the name as given), or else the only
/// offered, unrefused disk that is blank or holds this layout.
pub fn choose<'a>(
    offered: &'a [Offered],
    hidden: &[(PathBuf, Hidden)],
    named: Option<(&str, &Path)>,
) -> Result<&'a Offered, NoChoice> {
    if let Some((given, device)) = named {
        if let Some((_, why)) = hidden.iter().find(|(p, _)| p == device) {
            return Err(NoChoice::NamedHidden {
                named: given.to_owned(),
                why: why.clone(),
            });
        }
        let Some(disk) = offered.iter().find(|o| o.path == device) else {
            return Err(NoChoice::NamedMissing {
                named: given.to_owned(),
            });
        };
        if !disk.refused.is_empty() {
            return Err(NoChoice::NamedRefused {
                named: given.to_owned(),
                why: disk.refused.clone(),
            });
        }
        return Ok(disk);
    }
    let takeable: Vec<&Offered> = offered
        .iter()
        .filter(|o| o.refused.is_empty() && matches!(o.content, Content::Blank | Content::Archipelago))
        .collect();
    match takeable.as_slice() {
        [one] => Ok(one),
        [] => Err(NoChoice::NoneAutomatic {
            others: offered
                .iter()
                .map(|o| format!("{} ({})", o.path.display(), o.contents))
                .collect(),
        }),
        several => Err(NoChoice::Several(
            several.iter().map(|o| o.path.display().to_string()).collect(),
        )),
    }
}

/// Every disk on this machine: offered (maybe refused) and hidden.
#[derive(Debug, Clone, Default)]
pub struct Survey {
    pub offered: Vec<Offered>,
    pub hidden: Vec<(PathBuf, Hidden)>,
}

/// Asks the machine. `allow_loop` offers loop devices (tests only).
pub fn gather(allow_loop: bool) -> anyhow::Result<Survey> {
    let out = Command::new("lsblk")
        .args(["-J", "-b", "-o", LSBLK_COLUMNS])
        .stdin(Stdio::null())
        .output()
        .context("cannot run lsblk (package util-linux)")?;
    if !out.status.success() {
        bail!(
            "lsblk failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let mut devices = parse_lsblk(&String::from_utf8_lossy(&out.stdout)).context("cannot read lsblk's JSON")?;
    for dev in &mut devices {
        probe_signatures(dev);
    }
    let boot = boot_disks(&devices);
    let mut survey = Survey::default();
    for dev in &devices {
        let extra = Extra {
            content: content_of(&dev.path),
            stable_names: by_id_names(&dev.path),
        };
        match assess(dev, &boot, allow_loop, &extra) {
            Ok(o) => survey.offered.push(o),
            Err(h) => survey.hidden.push((dev.path.clone(), h)),
        }
    }
    Ok(survey)
}

/// lsblk reads file system types from udev's database; where udev has
/// not probed a device (or runs not at all), `blkid -p` asks the device.
fn probe_signatures(dev: &mut Device) {
    let unprobed = (dev.fstype.is_none() && dev.pttype.is_none()) || (dev.kind == "part" && dev.partlabel.is_none());
    if unprobed {
        if let Ok(o) = Command::new("blkid")
            .args(["-p", "-o", "export"])
            .arg(&dev.path)
            .output()
        {
            for line in String::from_utf8_lossy(&o.stdout).lines() {
                match line.split_once('=') {
                    Some(("TYPE", v)) => dev.fstype = Some(v.to_owned()),
                    Some(("LABEL", v)) => dev.label = Some(v.to_owned()),
                    Some(("PTTYPE", v)) => dev.pttype = Some(v.to_owned()),
                    Some(("PART_ENTRY_NAME", v)) => dev.partlabel = Some(v.to_owned()),
                    _ => {}
                }
            }
        }
    }
    for child in &mut dev.children {
        probe_signatures(child);
    }
}

/// The disks that hold the live medium (`/run/live/medium`) or the root.
fn boot_disks(devices: &[Device]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for target in ["/run/live/medium", "/"] {
        let Ok(o) = Command::new("findmnt").args(["-n", "-o", "SOURCE", target]).output() else {
            continue;
        };
        let source = String::from_utf8_lossy(&o.stdout).trim().to_owned();
        for dev in devices {
            let holds = |d: &Device| d.path.as_os_str() == source.as_str();
            if holds(dev) || dev.children.iter().any(holds) {
                out.push(dev.path.clone());
            }
        }
    }
    out
}

/// Blank, this layout, or other. A fact that cannot be read is "other":
/// never taken without being named.
fn content_of(disk: &Path) -> Content {
    if let Ok(o) = Command::new("sfdisk")
        .arg("--json")
        .arg(disk)
        .stderr(Stdio::null())
        .output()
    {
        if o.status.success() {
            if let Ok(Recognized::Archipelago(_)) = layout::recognize(&String::from_utf8_lossy(&o.stdout)) {
                return Content::Archipelago;
            }
        }
    }
    let facts = crate::datadisk::gather_facts(disk, crate::datadisk::LABEL);
    if crate::datadisk::blank(&facts) {
        Content::Blank
    } else {
        Content::Other
    }
}

fn by_id_names(disk: &Path) -> Vec<String> {
    crate::datadisk::stable_names_of(disk)
        .into_iter()
        .map(|n| n.to_string())
        .filter(|n| n.starts_with("/dev/disk/by-id/"))
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::os::layout::GIB;

    fn disk(name: &str, size: u64) -> Device {
        Device {
            name: name.to_owned(),
            path: PathBuf::from(format!("/dev/{name}")),
            size,
            ro: false,
            rm: false,
            kind: "disk".to_owned(),
            model: Some("QEMU HARDDISK ".to_owned()),
            serial: Some("s1".to_owned()),
            fstype: None,
            label: None,
            partlabel: None,
            pttype: None,
            mountpoints: vec![None],
            children: Vec::new(),
        }
    }

    fn extra(content: Content) -> Extra {
        Extra {
            content,
            stable_names: vec!["/dev/disk/by-id/virtio-s1".to_owned()],
        }
    }

    #[test]
    fn never_offered_the_boot_medium_small_read_only_and_non_disks() {
        let boot = vec![PathBuf::from("/dev/sdb")];
        let e = extra(Content::Blank);
        assert_eq!(
            assess(&disk("sdb", 32 * GIB), &boot, false, &e),
            Err(Hidden::BootMedium)
        );
        assert_eq!(
            assess(&disk("vda", GIB), &boot, false, &e),
            Err(Hidden::TooSmall { size: GIB })
        );
        let mut ro = disk("vdb", 32 * GIB);
        ro.ro = true;
        assert_eq!(assess(&ro, &boot, false, &e), Err(Hidden::ReadOnly));
        for kind in ["loop", "rom"] {
            let mut d = disk("x0", 32 * GIB);
            d.kind = kind.to_owned();
            assert_eq!(
                assess(&d, &boot, false, &e),
                Err(Hidden::NotADisk { kind: kind.to_owned() })
            );
        }
        let zram = disk("zram0", 32 * GIB);
        assert_eq!(
            assess(&zram, &boot, false, &e),
            Err(Hidden::NotADisk {
                kind: "zram".to_owned()
            })
        );
        let mut lo = disk("loop3", 32 * GIB);
        lo.kind = "loop".to_owned();
        assert!(
            assess(&lo, &boot, true, &e).is_ok(),
            "loop devices only when tests allow them"
        );
    }

    #[test]
    fn mounted_disks_and_raid_members_are_shown_but_refused() {
        let mut d = disk("sda", 64 * GIB);
        let mut part = disk("sda1", 64 * GIB);
        part.kind = "part".to_owned();
        part.mountpoints = vec![Some("/srv".to_owned())];
        let mut member = disk("sda2", GIB);
        member.kind = "part".to_owned();
        member.fstype = Some("linux_raid_member".to_owned());
        d.children = vec![part, member];
        let o = assess(&d, &[], false, &extra(Content::Other)).unwrap();
        assert_eq!(o.refused.len(), 2, "{:?}", o.refused);
        assert_eq!(o.refused[0], Refused::Mounted(vec!["/srv".to_owned()]));
        assert!(o.refused[1].to_string().contains("/dev/sda2 (linux_raid_member)"));
        assert_eq!(o.model, "QEMU HARDDISK");
    }

    fn offered(name: &str, content: Content) -> Offered {
        assess(&disk(name, 32 * GIB), &[], false, &extra(content)).unwrap()
    }

    #[test]
    fn auto_takes_the_only_blank_or_archipelago_disk() {
        let disks = [offered("vda", Content::Other), offered("vdb", Content::Blank)];
        assert_eq!(choose(&disks, &[], None).unwrap().path, PathBuf::from("/dev/vdb"));
        let disks = [offered("vda", Content::Archipelago), offered("vdb", Content::Other)];
        assert_eq!(choose(&disks, &[], None).unwrap().path, PathBuf::from("/dev/vda"));
    }

    #[test]
    fn auto_refuses_two_candidates_and_other_file_systems() {
        let two = [offered("vda", Content::Blank), offered("vdb", Content::Blank)];
        assert!(matches!(choose(&two, &[], None), Err(NoChoice::Several(v)) if v.len() == 2));
        let other = [offered("vda", Content::Other)];
        let e = choose(&other, &[], None).unwrap_err();
        assert!(matches!(e, NoChoice::NoneAutomatic { .. }), "{e}");
        assert!(e.to_string().contains("archipelago.install.disk="), "{e}");
    }

    #[test]
    fn a_named_disk_must_be_offered_and_not_refused() {
        let disks = [offered("vda", Content::Other), offered("vdb", Content::Blank)];
        let hidden = vec![(PathBuf::from("/dev/sr0"), Hidden::BootMedium)];
        let named = |p: &'static str| Some(("/dev/disk/by-id/x", Path::new(p)));
        assert_eq!(
            choose(&disks, &hidden, named("/dev/vda")).unwrap().path,
            PathBuf::from("/dev/vda")
        );
        assert!(matches!(
            choose(&disks, &hidden, named("/dev/sr0")),
            Err(NoChoice::NamedHidden {
                why: Hidden::BootMedium,
                ..
            })
        ));
        assert!(matches!(
            choose(&disks, &hidden, named("/dev/vdz")),
            Err(NoChoice::NamedMissing { .. })
        ));
        let mut refused = offered("vdc", Content::Blank);
        refused.refused.push(Refused::Mounted(vec!["/".to_owned()]));
        let disks = [refused];
        assert!(matches!(
            choose(&disks, &hidden, named("/dev/vdc")),
            Err(NoChoice::NamedRefused { .. })
        ));
    }

    #[test]
    fn reads_lsblk_json_with_partitions() {
        let json = r#"{"blockdevices":[{"name":"vda","path":"/dev/vda","size":21474836480,"ro":false,"rm":false,"type":"disk","model":null,"serial":"s1","fstype":null,"label":null,"partlabel":null,"pttype":"gpt","mountpoints":[null],
          "children":[{"name":"vda5","path":"/dev/vda5","size":1048576,"ro":false,"rm":false,"type":"part","model":null,"serial":null,"fstype":"ext4","label":"ARCHY-DATA","partlabel":"archy-data","pttype":"gpt","mountpoints":[null]}]}]}"#;
        let devs = parse_lsblk(json).unwrap();
        assert_eq!(devs[0].children[0].label.as_deref(), Some("ARCHY-DATA"));
        assert_eq!(devs[0].contents(), "vda5 0.0 GiB ext4 ARCHY-DATA archy-data");
        assert!(devs[0].mounts().is_empty());
    }
}
