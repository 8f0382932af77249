//! Whether `archipelago.format=` may format the disk it names: pure
//! decisions over facts gathered beforehand (`gather.rs` runs the tools).
//!
//! Formatting is the one destructive act of the agent, so every doubt means
//! no: the name must be stable across boots, and the device must show
//! positive evidence of being blank (nothing `blkid` or `wipefs` recognise,
//! no partition, holder or mount, nobody holding it open exclusively, its
//! first and last MiB all zero), with no other device carrying the data
//! disk's label. A device that already carries the label is the data disk:
//! it is kept, so the parameter may stay on the command line.

use std::fmt;
use std::path::{Path, PathBuf};

/// The folder udev keeps the stable names of disks in (`--disk-dir`).
pub const DISK_DIR: &str = "/dev/disk";
/// What `archipelago.format=` accepts, for error messages.
pub const ALLOWED: &str = "/dev/disk/by-id/…, /dev/disk/by-path/… or PARTUUID=…";
/// How to find the stable names of the disks, for error messages.
pub const HOW_TO_LIST: &str = "list them with `ls -l /dev/disk/by-id/ /dev/disk/by-path/`";

/// A name of a disk or partition that does not move between boots (unlike
/// `/dev/sdX`, which follows the order disks are found in).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum StableName {
    /// `/dev/disk/by-id/NAME`: model and serial number.
    ById(String),
    /// `/dev/disk/by-path/NAME`: the port the disk is plugged into.
    ByPath(String),
    /// `PARTUUID=…`: a partition, by the ID its partition table gives it.
    PartUuid(String),
}

/// The folders under the lookup folder that hold stable names.
pub const STABLE_FOLDERS: [&str; 3] = ["by-id", "by-path", "by-partuuid"];

impl StableName {
    /// The name a link in `folder` (one of [`STABLE_FOLDERS`]) stands for.
    pub fn from_link(folder: &str, file_name: &str) -> Option<StableName> {
        let name = file_name.to_owned();
        match folder {
            "by-id" => Some(StableName::ById(name)),
            "by-path" => Some(StableName::ByPath(name)),
            "by-partuuid" => Some(StableName::PartUuid(name)),
            _ => None,
        }
    }

    /// Where udev keeps this name's link, under the lookup folder.
    pub fn link(&self, disk_dir: &Path) -> PathBuf {
        match self {
            StableName::ById(name) => disk_dir.join("by-id").join(name),
            StableName::ByPath(name) => disk_dir.join("by-path").join(name),
            // udev writes partition UUIDs in lower case.
            StableName::PartUuid(uuid) => disk_dir.join("by-partuuid").join(uuid.to_ascii_lowercase()),
        }
    }
}

/// As it is written on the kernel command line.
impl fmt::Display for StableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StableName::ById(name) => write!(f, "{DISK_DIR}/by-id/{name}"),
            StableName::ByPath(name) => write!(f, "{DISK_DIR}/by-path/{name}"),
            StableName::PartUuid(uuid) => write!(f, "PARTUUID={uuid}"),
        }
    }
}

/// The device `archipelago.format=` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormatRequest {
    Stable(StableName),
    /// A device path that can name another disk at the next boot
    /// (`/dev/sdb`, `/dev/loop3`, `/dev/disk/by-label/…`): always refused.
    Unstable(PathBuf),
}

impl fmt::Display for FormatRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FormatRequest::Stable(name) => name.fmt(f),
            FormatRequest::Unstable(path) => path.display().fmt(f),
        }
    }
}

/// Reads the value of `archipelago.format=`.
pub fn parse_request(param: &str, value: &str) -> anyhow::Result<FormatRequest> {
    let bad = |why: &str| {
        anyhow::anyhow!(
            "kernel command line: {param}{value} {why}; allowed: {ALLOWED}, \
             e.g. {param}/dev/disk/by-id/ata-ST2000DM008-2FR102_ZFL0ABCD ({HOW_TO_LIST})"
        )
    };
    if let Some(uuid) = value.strip_prefix("PARTUUID=") {
        if uuid.is_empty() || !uuid.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            return Err(bad("is no partition UUID (hex digits and dashes)"));
        }
        return Ok(FormatRequest::Stable(StableName::PartUuid(uuid.to_owned())));
    }
    if !value.starts_with("/dev/") || value.split('/').any(|part| part == "..") {
        return Err(bad("names no device"));
    }
    for (prefix, make) in [
        ("/dev/disk/by-id/", StableName::ById as fn(String) -> StableName),
        ("/dev/disk/by-path/", StableName::ByPath),
    ] {
        if let Some(name) = value.strip_prefix(prefix) {
            if name.is_empty() || name == "." || name.contains('/') {
                return Err(bad("names no link of that folder"));
            }
            return Ok(FormatRequest::Stable(make(name.to_owned())));
        }
    }
    Ok(FormatRequest::Unstable(PathBuf::from(value)))
}

/// A fact about the device, or why it could not be found out (a failed
/// tool): a fact nobody could find out is a doubt, and a doubt is a no.
pub type Fact<T> = Result<T, String>;

/// What `blkid -p` recognises on the device.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Signature {
    /// File system, RAID member, swap… (`TYPE`) or partition table (`PTTYPE`).
    pub kind: Option<String>,
    pub label: Option<String>,
}

/// What `lsblk` shows of the device.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Lsblk {
    /// Its partitions and holders (device mapper, RAID…).
    pub children: Vec<String>,
    /// Where it or any of its children is mounted (`[SWAP]` for swap).
    pub mountpoints: Vec<String>,
}

/// Everything the decision looks at, gathered by `gather::facts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskFacts {
    /// What the name resolves to.
    pub device: PathBuf,
    pub block_device: bool,
    /// `blkid -p`: `None` when it finds nothing (exit 2).
    pub signature: Fact<Option<Signature>>,
    /// The signatures `wipefs -n` lists.
    pub wipefs: Fact<Vec<String>>,
    /// From sysfs.
    pub partitions: Fact<Vec<String>>,
    /// From sysfs (`holders/`).
    pub holders: Fact<Vec<String>>,
    pub lsblk: Fact<Lsblk>,
    /// Every device whose file system carries the data disk's label.
    pub labelled: Fact<Vec<PathBuf>>,
    /// The kernel refuses to let us open it exclusively: something holds it.
    pub busy: Fact<bool>,
    pub first_mib_zero: Fact<bool>,
    pub last_mib_zero: Fact<bool>,
}

/// Why a disk is not formatted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "{given} is a kernel name, which can name another disk at the next boot; {}",
        stable_names_hint(.stable)
    )]
    UnstableName { given: PathBuf, stable: Vec<StableName> },
    #[error("there is no such device ({HOW_TO_LIST})")]
    Missing,
    #[error("it is not a block device")]
    NotABlockDevice,
    #[error("{what} could not be checked: {why}")]
    Unknown { what: &'static str, why: String },
    #[error("it is not blank: {tool} finds {found}")]
    Signature { tool: &'static str, found: String },
    #[error("it has partitions: {}", .0.join(", "))]
    Partitions(Vec<String>),
    #[error("it has holders (device mapper, RAID…): {}", .0.join(", "))]
    Holders(Vec<String>),
    #[error("lsblk shows partitions or holders on it: {}", .0.join(", "))]
    Children(Vec<String>),
    #[error("it is mounted or in use as swap: {}", .0.join(", "))]
    Mounted(Vec<String>),
    #[error("the kernel says it is in use (an exclusive open fails with EBUSY)")]
    Busy,
    #[error("its {0} MiB is not all zero: it holds data no tool recognised")]
    NotZero(&'static str),
    #[error("{} already carries the label {label}: that is the data disk", paths(.devices))]
    LabelElsewhere { label: String, devices: Vec<PathBuf> },
}

fn stable_names_hint(stable: &[StableName]) -> String {
    if stable.is_empty() {
        format!("no stable name of it was found; use one of {ALLOWED} ({HOW_TO_LIST})")
    } else {
        let names: Vec<_> = stable.iter().map(ToString::to_string).collect();
        format!("name it by a stable name instead: {}", names.join(" or "))
    }
}

fn paths(devices: &[PathBuf]) -> String {
    let shown: Vec<_> = devices.iter().map(|d| d.display().to_string()).collect();
    shown.join(", ")
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormatDecision {
    /// The device already is a data disk: keep its data.
    AlreadyFormatted,
    /// Positive evidence that the device is blank.
    Format,
    /// Every reason found (at least one).
    Refuse(Vec<Refusal>),
}

/// Formats only on positive evidence of a blank device.
pub fn decide(facts: &DiskFacts, label: &str) -> FormatDecision {
    if !facts.block_device {
        return FormatDecision::Refuse(vec![Refusal::NotABlockDevice]);
    }
    if let Ok(Some(Signature { label: Some(l), .. })) = &facts.signature {
        if l == label {
            return FormatDecision::AlreadyFormatted;
        }
    }
    let mut no = Vec::new();
    let unknown = |what: &'static str, why: &String| Refusal::Unknown { what, why: why.clone() };
    match &facts.signature {
        Err(why) => no.push(unknown("what blkid recognises on it", why)),
        Ok(None) => {}
        Ok(Some(sig)) => no.push(Refusal::Signature {
            tool: "blkid",
            found: match (&sig.kind, &sig.label) {
                (Some(kind), Some(l)) => format!("{kind} labelled {l}"),
                (Some(kind), None) => format!("{kind} without a label"),
                (None, Some(l)) => format!("something labelled {l}"),
                (None, None) => "a signature".to_owned(),
            },
        }),
    }
    match &facts.wipefs {
        Err(why) => no.push(unknown("what wipefs lists on it", why)),
        Ok(found) if !found.is_empty() => no.push(Refusal::Signature {
            tool: "wipefs",
            found: found.join(", "),
        }),
        Ok(_) => {}
    }
    match &facts.partitions {
        Err(why) => no.push(unknown("its partitions", why)),
        Ok(found) if !found.is_empty() => no.push(Refusal::Partitions(found.clone())),
        Ok(_) => {}
    }
    match &facts.holders {
        Err(why) => no.push(unknown("its holders", why)),
        Ok(found) if !found.is_empty() => no.push(Refusal::Holders(found.clone())),
        Ok(_) => {}
    }
    match &facts.lsblk {
        Err(why) => no.push(unknown("what lsblk shows of it", why)),
        Ok(shown) => {
            if !shown.children.is_empty() {
                no.push(Refusal::Children(shown.children.clone()));
            }
            if !shown.mountpoints.is_empty() {
                no.push(Refusal::Mounted(shown.mountpoints.clone()));
            }
        }
    }
    match &facts.busy {
        Err(why) => no.push(unknown("whether it is in use", why)),
        Ok(true) => no.push(Refusal::Busy),
        Ok(false) => {}
    }
    for (which, zero) in [("first", &facts.first_mib_zero), ("last", &facts.last_mib_zero)] {
        match zero {
            Err(why) => no.push(unknown(
                if which == "first" {
                    "its first MiB"
                } else {
                    "its last MiB"
                },
                why,
            )),
            Ok(false) => no.push(Refusal::NotZero(which)),
            Ok(true) => {}
        }
    }
    match &facts.labelled {
        Err(why) => no.push(unknown("which devices carry the label", why)),
        Ok(devices) if !devices.is_empty() => no.push(Refusal::LabelElsewhere {
            label: label.to_owned(),
            devices: devices.clone(),
        }),
        Ok(_) => {}
    }
    if no.is_empty() {
        FormatDecision::Format
    } else {
        FormatDecision::Refuse(no)
    }
}

/// A format the kernel command line asked for and the agent refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "refusing to format {named}{}:{}\nNothing was written to it. Formatting is the one \
     destructive act of the node: it needs a blank disk (nothing on it, first and last MiB \
     zero) named by {ALLOWED}.",
    .device.as_ref().map(|d| format!(" ({})", d.display())).unwrap_or_default(),
    joined(.reasons)
)]
pub struct Refused {
    pub named: FormatRequest,
    /// What the name resolved to, if anything.
    pub device: Option<PathBuf>,
    pub reasons: Vec<Refusal>,
}

fn joined(reasons: &[Refusal]) -> String {
    reasons.iter().map(|r| format!("\n  - {r}")).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const LABEL: &str = "ARCHY-DATA";

    fn blank() -> DiskFacts {
        DiskFacts {
            device: PathBuf::from("/dev/vdb"),
            block_device: true,
            signature: Ok(None),
            wipefs: Ok(vec![]),
            partitions: Ok(vec![]),
            holders: Ok(vec![]),
            lsblk: Ok(Lsblk::default()),
            labelled: Ok(vec![]),
            busy: Ok(false),
            first_mib_zero: Ok(true),
            last_mib_zero: Ok(true),
        }
    }

    fn refused(facts: &DiskFacts) -> Vec<Refusal> {
        match decide(facts, LABEL) {
            FormatDecision::Refuse(why) => why,
            other => panic!("{facts:?} was not refused: {other:?}"),
        }
    }

    /// Refused for this one reason, and the reason says so.
    fn refused_for(facts: DiskFacts, needle: &str) {
        let why = refused(&facts);
        assert_eq!(why.len(), 1, "{why:?}");
        let text = why[0].to_string();
        assert!(text.contains(needle), "{text:?} does not contain {needle:?}");
    }

    #[test]
    fn only_stable_names_are_taken_as_stable() {
        let p = "archipelago.format=";
        assert_eq!(
            parse_request(p, "/dev/disk/by-id/ata-X_123").unwrap(),
            FormatRequest::Stable(StableName::ById("ata-X_123".into()))
        );
        assert_eq!(
            parse_request(p, "/dev/disk/by-path/pci-0000:00:1f.2-ata-1").unwrap(),
            FormatRequest::Stable(StableName::ByPath("pci-0000:00:1f.2-ata-1".into()))
        );
        assert_eq!(
            parse_request(p, "PARTUUID=1A2B-03").unwrap(),
            FormatRequest::Stable(StableName::PartUuid("1A2B-03".into()))
        );
        for unstable in ["/dev/sdb", "/dev/loop3", "/dev/disk/by-label/X", "/dev/disk/by-uuid/1"] {
            assert_eq!(
                parse_request(p, unstable).unwrap(),
                FormatRequest::Unstable(PathBuf::from(unstable))
            );
        }
        for bad in [
            "sdb",
            "PARTUUID=",
            "PARTUUID=x/y",
            "/dev/disk/by-id/",
            "/dev/disk/by-id/a/b",
            "/dev/../x",
        ] {
            let err = parse_request(p, bad).unwrap_err().to_string();
            assert!(err.contains(bad) && err.contains("/dev/disk/by-id/"), "{err}");
        }
    }

    #[test]
    fn a_stable_name_is_looked_up_in_the_lookup_folder_and_shown_as_written() {
        let dir = Path::new("/tmp/disks");
        let by_id = StableName::ById("usb-X".into());
        assert_eq!(by_id.link(dir), Path::new("/tmp/disks/by-id/usb-X"));
        assert_eq!(by_id.to_string(), "/dev/disk/by-id/usb-X");
        let part = StableName::PartUuid("ABCD-01".into());
        assert_eq!(part.link(dir), Path::new("/tmp/disks/by-partuuid/abcd-01"));
        assert_eq!(part.to_string(), "PARTUUID=ABCD-01");
        assert_eq!(
            StableName::from_link("by-path", "pci-1"),
            Some(StableName::ByPath("pci-1".into()))
        );
    }

    #[test]
    fn only_positive_evidence_of_a_blank_disk_formats() {
        assert_eq!(decide(&blank(), LABEL), FormatDecision::Format);
    }

    #[test]
    fn the_data_disk_itself_is_never_formatted_again() {
        let mut facts = blank();
        facts.signature = Ok(Some(Signature {
            kind: Some("ext4".into()),
            label: Some(LABEL.into()),
        }));
        facts.wipefs = Ok(vec!["ext4".into()]);
        facts.labelled = Ok(vec![facts.device.clone()]);
        facts.first_mib_zero = Ok(false);
        assert_eq!(decide(&facts, LABEL), FormatDecision::AlreadyFormatted);
    }

    #[test]
    fn a_signature_refuses() {
        let mut facts = blank();
        facts.signature = Ok(Some(Signature {
            kind: Some("ext4".into()),
            label: None,
        }));
        refused_for(facts, "blkid finds ext4 without a label");
        let mut facts = blank();
        facts.signature = Ok(Some(Signature {
            kind: Some("ext4".into()),
            label: Some("WINDOWS".into()),
        }));
        refused_for(facts, "ext4 labelled WINDOWS");
        let mut facts = blank();
        facts.wipefs = Ok(vec!["dos at 0x1fe".into()]);
        refused_for(facts, "wipefs finds dos at 0x1fe");
    }

    #[test]
    fn partitions_holders_and_mounts_refuse() {
        let mut facts = blank();
        facts.partitions = Ok(vec!["sdb1".into()]);
        refused_for(facts, "partitions: sdb1");
        let mut facts = blank();
        facts.holders = Ok(vec!["dm-0".into()]);
        refused_for(facts, "holders (device mapper, RAID…): dm-0");
        let mut facts = blank();
        facts.lsblk = Ok(Lsblk {
            children: vec!["sdb1".into()],
            mountpoints: vec![],
        });
        refused_for(facts, "lsblk shows partitions or holders on it: sdb1");
        let mut facts = blank();
        facts.lsblk = Ok(Lsblk {
            children: vec![],
            mountpoints: vec!["[SWAP]".into()],
        });
        refused_for(facts, "mounted or in use as swap: [SWAP]");
        let mut facts = blank();
        facts.busy = Ok(true);
        refused_for(facts, "in use");
    }

    #[test]
    fn data_no_tool_recognises_refuses() {
        let mut facts = blank();
        facts.first_mib_zero = Ok(false);
        refused_for(facts, "first MiB is not all zero");
        let mut facts = blank();
        facts.last_mib_zero = Ok(false);
        refused_for(facts, "last MiB is not all zero");
    }

    #[test]
    fn another_disk_with_the_label_refuses() {
        let mut facts = blank();
        facts.labelled = Ok(vec![PathBuf::from("/dev/sda1")]);
        refused_for(facts, "/dev/sda1 already carries the label ARCHY-DATA");
    }

    #[test]
    fn a_device_that_is_no_block_device_refuses() {
        let mut facts = blank();
        facts.block_device = false;
        refused_for(facts, "not a block device");
    }

    #[test]
    fn every_fact_nobody_could_find_out_refuses() {
        type Spoil = fn(&mut DiskFacts);
        let spoilers: [(&str, Spoil); 9] = [
            ("what blkid recognises", |f| f.signature = Err("blkid exited 4".into())),
            ("what wipefs lists", |f| f.wipefs = Err("wipefs exited 1".into())),
            ("its partitions", |f| f.partitions = Err("no sysfs".into())),
            ("its holders", |f| f.holders = Err("no sysfs".into())),
            ("what lsblk shows", |f| f.lsblk = Err("lsblk exited 32".into())),
            ("whether it is in use", |f| f.busy = Err("EACCES".into())),
            ("its first MiB", |f| f.first_mib_zero = Err("EIO".into())),
            ("its last MiB", |f| f.last_mib_zero = Err("EIO".into())),
            ("which devices carry the label", |f| {
                f.labelled = Err("blkid exited 4".into())
            }),
        ];
        for (what, spoil) in spoilers {
            let mut facts = blank();
            spoil(&mut facts);
            refused_for(facts, what);
        }
        // A failed blkid never hides the label check either.
        let mut facts = blank();
        facts.signature = Err("blkid exited 4".into());
        facts.labelled = Err("blkid exited 4".into());
        assert_eq!(refused(&facts).len(), 2);
    }

    #[test]
    fn a_kernel_name_is_refused_showing_the_stable_names() {
        let why = Refusal::UnstableName {
            given: PathBuf::from("/dev/sdb"),
            stable: vec![
                StableName::ById("ata-X_1".into()),
                StableName::ByPath("pci-0000:00:1f.2-ata-2".into()),
            ],
        }
        .to_string();
        assert!(
            why.contains("/dev/sdb")
                && why.contains("/dev/disk/by-id/ata-X_1 or /dev/disk/by-path/pci-0000:00:1f.2-ata-2"),
            "{why}"
        );
        let none = Refusal::UnstableName {
            given: PathBuf::from("/dev/sdb"),
            stable: vec![],
        }
        .to_string();
        assert!(none.contains("ls -l /dev/disk/by-id/"), "{none}");
        let report = Refused {
            named: FormatRequest::Unstable(PathBuf::from("/dev/sdb")),
            device: None,
            reasons: vec![Refusal::Missing],
        }
        .to_string();
        assert!(
            report.starts_with("refusing to format /dev/sdb:\n  - there is no such device")
                && report.contains("Nothing was written"),
            "{report}"
        );
    }
}
