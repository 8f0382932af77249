//! The installed node's disk layout (`docs/disk-layout.md`), pure: the
//! partition plan for a disk of a given size, the `sfdisk` script that
//! writes it, and recognising it again in `sfdisk --json`'s dump.
//!
//! GPT, every partition aligned to 1 MiB:
//! 1. BIOS boot, 1 MiB (GRUB's core image on BIOS machines);
//! 2. EFI system partition, 512 MiB (GRUB for UEFI and BIOS, `grub.cfg`,
//!    the GRUB environment block);
//! 3. and 4. the system slots `archy-a` and `archy-b`, one release each;
//! 5. the data partition, the rest of the disk.
//!
//! Partition names are for people: another disk can carry the same names.
//! What boots and mounts names this disk's PARTUUIDs.

use serde::Deserialize;

pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;
/// The smallest disk the installer offers.
pub const MIN_DISK: u64 = 16 * GIB;
/// A slot holds at least this much...
pub const MIN_SLOT: u64 = 4 * GIB;
/// ...and at least this many times the release being installed, so later
/// (larger) releases still fit.
pub const SLOT_FACTOR: u64 = 3;
/// The data partition gets at least this much.
pub const MIN_DATA: u64 = 4 * GIB;
const SECTOR: u64 = 512;
const BIOS_BOOT_SIZE: u64 = MIB;
const ESP_SIZE: u64 = 512 * MIB;
/// Where the first partition starts, and the alignment of every one.
const ALIGN: u64 = MIB;
/// GPT keeps a backup table in the disk's last 33 sectors; the data
/// partition ends 1 MiB before the end, aligned.
const TAIL: u64 = MIB;

/// One partition of the layout, in disk order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Part {
    BiosBoot,
    Esp,
    SlotA,
    SlotB,
    Data,
}

impl Part {
    pub const ALL: [Part; 5] = [Part::BiosBoot, Part::Esp, Part::SlotA, Part::SlotB, Part::Data];

    /// Its partition number (1-based), as the kernel names it (`sda3`).
    pub fn number(self) -> u32 {
        match self {
            Part::BiosBoot => 1,
            Part::Esp => 2,
            Part::SlotA => 3,
            Part::SlotB => 4,
            Part::Data => 5,
        }
    }

    /// The GPT partition name.
    pub fn name(self) -> &'static str {
        match self {
            Part::BiosBoot => "bios-boot",
            Part::Esp => "esp",
            Part::SlotA => "archy-a",
            Part::SlotB => "archy-b",
            Part::Data => "archy-data",
        }
    }

    /// The GPT partition type GUID (upper case, as sfdisk prints it).
    pub fn type_guid(self) -> &'static str {
        match self {
            Part::BiosBoot => "21686148-6449-6E6F-744E-656564454649",
            Part::Esp => "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
            // Linux file system data.
            Part::SlotA | Part::SlotB | Part::Data => "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
        }
    }
}

/// Where a partition lies, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub start: u64,
    pub size: u64,
}

/// A planned layout for one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub disk_bytes: u64,
    /// In [`Part::ALL`] order.
    pub extents: [Extent; 5],
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("the disk holds {} and the installer needs at least {}", gib(*.disk), gib(MIN_DISK))]
    DiskTooSmall { disk: u64 },
    #[error(
        "the disk holds {}: two system slots of {} each (3 times this release of {}) leave less than {} for data",
        gib(*.disk), gib(*.slot), gib(*.release), gib(MIN_DATA)
    )]
    NoRoomForData { disk: u64, slot: u64, release: u64 },
}

/// A size in GiB with one decimal, for messages.
pub fn gib(bytes: u64) -> String {
    // Precision is irrelevant for a message; sizes stay far below 2^52.
    #[allow(clippy::cast_precision_loss)]
    let g = bytes as f64 / GIB as f64;
    format!("{g:.1} GiB")
}

fn align_up(bytes: u64) -> u64 {
    bytes.div_ceil(ALIGN) * ALIGN
}

/// The size of each system slot for a release of `release_bytes`.
pub fn slot_size(release_bytes: u64) -> u64 {
    align_up(MIN_SLOT.max(release_bytes.saturating_mul(SLOT_FACTOR)))
}

/// Plans the layout of a disk of `disk_bytes` for a release of
/// `release_bytes` (its three live files together).
pub fn plan(disk_bytes: u64, release_bytes: u64) -> Result<Layout, LayoutError> {
    if disk_bytes < MIN_DISK {
        return Err(LayoutError::DiskTooSmall { disk: disk_bytes });
    }
    let slot = slot_size(release_bytes);
    let bios = Extent {
        start: ALIGN,
        size: BIOS_BOOT_SIZE,
    };
    let esp = Extent {
        start: bios.start + bios.size,
        size: ESP_SIZE,
    };
    let a = Extent {
        start: esp.start + esp.size,
        size: slot,
    };
    let b = Extent {
        start: a.start + a.size,
        size: slot,
    };
    let data_start = b.start + b.size;
    let data_end = (disk_bytes - TAIL) / ALIGN * ALIGN;
    if data_end < data_start + MIN_DATA {
        return Err(LayoutError::NoRoomForData {
            disk: disk_bytes,
            slot,
            release: release_bytes,
        });
    }
    let data = Extent {
        start: data_start,
        size: data_end - data_start,
    };
    Ok(Layout {
        disk_bytes,
        extents: [bios, esp, a, b, data],
    })
}

impl Layout {
    pub fn extent(&self, part: Part) -> Extent {
        self.extents[(part.number() - 1) as usize]
    }

    /// The `sfdisk` script that writes this layout (a new GPT, new
    /// random disk and partition GUIDs).
    pub fn sfdisk_script(&self) -> String {
        let mut script = String::from("label: gpt\nunit: sectors\nsector-size: 512\n\n");
        for part in Part::ALL {
            let e = self.extent(part);
            script.push_str(&format!(
                "start={}, size={}, type={}, name=\"{}\"\n",
                e.start / SECTOR,
                e.size / SECTOR,
                part.type_guid(),
                part.name()
            ));
        }
        script
    }
}

/// `sfdisk --json DEVICE`, the part this reads.
#[derive(Debug, Deserialize)]
struct Dump {
    partitiontable: Table,
}

#[derive(Debug, Deserialize)]
struct Table {
    label: String,
    #[serde(default)]
    sectorsize: Option<u64>,
    #[serde(default)]
    partitions: Vec<DumpPartition>,
}

#[derive(Debug, Deserialize)]
struct DumpPartition {
    node: String,
    start: u64,
    size: u64,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    uuid: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

/// One partition of a disk that holds this layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The kernel's node (`/dev/sda3`).
    pub node: String,
    pub extent: Extent,
    /// Lower case, as `/dev/disk/by-partuuid/` names it.
    pub partuuid: String,
}

/// What a disk's partition table is, to the installer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recognized {
    /// This layout: every partition by its number, name and type.
    Archipelago(Box<[Found; 5]>),
    /// A partition table of something else (the reason says what differs).
    Other(String),
}

/// Recognises this layout in `sfdisk --json`'s output. Only an exact
/// match (GPT, five partitions, each with its number's name and type)
/// counts: anything else is another system's disk.
pub fn recognize(sfdisk_json: &str) -> Result<Recognized, serde_json::Error> {
    let dump: Dump = serde_json::from_str(sfdisk_json)?;
    let t = dump.partitiontable;
    if t.label != "gpt" {
        return Ok(Recognized::Other(format!("a {} partition table, not GPT", t.label)));
    }
    let sector = t.sectorsize.unwrap_or(SECTOR);
    if t.partitions.len() != Part::ALL.len() {
        return Ok(Recognized::Other(format!("{} partitions, not 5", t.partitions.len())));
    }
    let mut found = Vec::new();
    for (part, p) in Part::ALL.into_iter().zip(&t.partitions) {
        let name = p.name.as_deref().unwrap_or("");
        if name != part.name() || !p.kind.eq_ignore_ascii_case(part.type_guid()) {
            return Ok(Recognized::Other(format!(
                "partition {} is {:?} of type {}, not {:?}",
                p.node,
                name,
                p.kind,
                part.name()
            )));
        }
        let Some(uuid) = &p.uuid else {
            return Ok(Recognized::Other(format!("partition {} has no PARTUUID", p.node)));
        };
        found.push(Found {
            node: p.node.clone(),
            extent: Extent {
                start: p.start * sector,
                size: p.size * sector,
            },
            partuuid: uuid.to_ascii_lowercase(),
        });
    }
    match <[Found; 5]>::try_from(found) {
        Ok(all) => Ok(Recognized::Archipelago(Box::new(all))),
        Err(_) => Ok(Recognized::Other("not 5 partitions".to_owned())),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_20_gib_disk_gets_two_4_gib_slots_and_the_rest_for_data() {
        let l = plan(20 * GIB, 400 * MIB).unwrap();
        assert_eq!(l.extent(Part::BiosBoot), Extent { start: MIB, size: MIB });
        assert_eq!(
            l.extent(Part::Esp),
            Extent {
                start: 2 * MIB,
                size: 512 * MIB
            }
        );
        assert_eq!(l.extent(Part::SlotA).size, 4 * GIB);
        assert_eq!(l.extent(Part::SlotB).start, l.extent(Part::SlotA).start + 4 * GIB);
        let data = l.extent(Part::Data);
        assert_eq!(data.start, 514 * MIB + 8 * GIB);
        assert_eq!(data.start + data.size, 20 * GIB - MIB);
        for part in Part::ALL {
            let e = l.extent(part);
            assert_eq!(e.start % MIB, 0, "{part:?}");
            assert_eq!(e.size % MIB, 0, "{part:?}");
        }
    }

    #[test]
    fn slots_hold_three_times_a_large_release() {
        assert_eq!(slot_size(2 * GIB), 6 * GIB);
        assert_eq!(slot_size(2 * GIB + 1), 6 * GIB + MIB);
        assert_eq!(slot_size(0), MIN_SLOT);
    }

    #[test]
    fn small_disks_and_huge_releases_are_refused_with_the_sizes() {
        let e = plan(GIB, 400 * MIB).unwrap_err();
        assert_eq!(e, LayoutError::DiskTooSmall { disk: GIB });
        assert!(e.to_string().contains("1.0 GiB"), "{e}");
        assert!(e.to_string().contains("16.0 GiB"), "{e}");
        let e = plan(16 * GIB, 2 * GIB).unwrap_err();
        assert!(matches!(e, LayoutError::NoRoomForData { .. }), "{e}");
    }

    #[test]
    fn the_script_names_every_partition_in_sectors() {
        let script = plan(20 * GIB, 0).unwrap().sfdisk_script();
        assert!(script.starts_with("label: gpt\n"));
        assert!(script.contains("start=2048, size=2048, type=21686148-6449-6E6F-744E-656564454649, name=\"bios-boot\""));
        assert!(script.contains("name=\"archy-data\""));
        assert_eq!(script.lines().filter(|l| l.starts_with("start=")).count(), 5);
    }

    fn dump(parts: &[(&str, &str)]) -> String {
        let partitions: Vec<String> = parts
            .iter()
            .enumerate()
            .map(|(i, (name, kind))| {
                format!(
                    r#"{{"node":"/dev/vda{n}","start":{s},"size":2048,"type":"{kind}","uuid":"AB-{n}","name":"{name}"}}"#,
                    n = i + 1,
                    s = 2048 * (i + 1)
                )
            })
            .collect();
        format!(
            r#"{{"partitiontable":{{"label":"gpt","id":"X","device":"/dev/vda","unit":"sectors","firstlba":34,"lastlba":99,"sectorsize":512,"partitions":[{}]}}}}"#,
            partitions.join(",")
        )
    }

    #[test]
    fn recognizes_exactly_this_layout() {
        let ours: Vec<(&str, &str)> = Part::ALL.iter().map(|p| (p.name(), p.type_guid())).collect();
        match recognize(&dump(&ours)).unwrap() {
            Recognized::Archipelago(found) => {
                assert_eq!(found[4].node, "/dev/vda5");
                assert_eq!(found[4].partuuid, "ab-5");
                assert_eq!(
                    found[2].extent,
                    Extent {
                        start: 3 * MIB,
                        size: MIB
                    }
                );
            }
            other => panic!("{other:?}"),
        }
        let mut renamed = ours.clone();
        renamed[3].0 = "other";
        assert!(matches!(recognize(&dump(&renamed)).unwrap(), Recognized::Other(_)));
        assert!(matches!(recognize(&dump(&ours[..4])).unwrap(), Recognized::Other(_)));
        let dos = r#"{"partitiontable":{"label":"dos","partitions":[]}}"#;
        assert_eq!(
            recognize(dos).unwrap(),
            Recognized::Other("a dos partition table, not GPT".to_owned())
        );
        assert!(recognize("not json").is_err());
    }
}
