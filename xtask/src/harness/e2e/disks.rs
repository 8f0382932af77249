//! The guests' disks, made and read on the host: raw sparse images, so
//! that the host reads what a guest wrote (`sfdisk --json`, the bytes at
//! each end, a partition's content) without mounting anything.

use std::fs::{self, File};
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::Path;

use anyhow::{bail, ensure, Context as _};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use xshell::{cmd, Shell};

pub(super) const MIB: u64 = 1024 * 1024;
pub(super) const GIB: u64 = 1024 * MIB;
/// The live boots' data disk (a whole-disk ext4 `ARCHY-DATA`, as today).
const DATA_DISK_SIZE: u64 = 3 * GIB;
/// The `ARCHY-CONF` stick: an MBR table with one FAT partition.
const CONF_DISK_SIZE: u64 = 64 * MIB;
const SECTOR: u64 = 512;

/// A blank disk: a sparse file of zeros (no table, no signature).
pub(super) fn blank(path: &Path, size: u64) -> anyhow::Result<()> {
    let _ = fs::remove_file(path);
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    file.set_len(size)
        .with_context(|| format!("sizing {} to {size} bytes", path.display()))
}

/// The live boots' data disk: ext4 labelled ARCHY-DATA on the whole disk.
pub(super) fn data_disk(sh: &Shell, path: &Path) -> anyhow::Result<()> {
    blank(path, DATA_DISK_SIZE)?;
    cmd!(sh, "mkfs.ext4 -q -F -L ARCHY-DATA {path}").quiet().run()?;
    Ok(())
}

/// A disk holding another system's file system (ext4 on the whole disk,
/// no table): never eligible for an unattended install.
pub(super) fn foreign_disk(sh: &Shell, path: &Path, size: u64) -> anyhow::Result<()> {
    blank(path, size)?;
    cmd!(sh, "mkfs.ext4 -q -F -L OLD-SYSTEM {path}").quiet().run()?;
    Ok(())
}

/// The `ARCHY-CONF` stick as a PC formats one: an MBR table with one FAT
/// partition from 1 MiB, labelled `ARCHY-CONF`, holding `authorized_keys`.
pub(super) fn conf_disk(sh: &Shell, path: &Path, authorized_keys: &Path) -> anyhow::Result<()> {
    blank(path, CONF_DISK_SIZE)?;
    let table = "label: dos\nstart=2048, type=c\n";
    cmd!(sh, "sfdisk --quiet {path}")
        .stdin(table)
        .quiet()
        .run()
        .context("writing the ARCHY-CONF stick's partition table")?;
    let offset = (MIB / SECTOR).to_string();
    let kib = ((CONF_DISK_SIZE - MIB) / 1024).to_string();
    cmd!(sh, "mkfs.vfat -n ARCHY-CONF --offset={offset} {path} {kib}")
        .quiet()
        .ignore_stdout()
        .run()
        .context("making the ARCHY-CONF stick's FAT file system")?;
    let image = format!("{}@@{MIB}", path.display());
    cmd!(sh, "mcopy -i {image} {authorized_keys} ::authorized_keys")
        .env("MTOOLS_SKIP_CHECK", "1")
        .quiet()
        .run()
        .context("copying authorized_keys onto the ARCHY-CONF stick")?;
    Ok(())
}

/// The first and the last MiB of a disk image: what an untouched disk
/// keeps (a partition table, GPT's backup, a file system's superblock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Edges {
    first: Vec<u8>,
    last: Vec<u8>,
}

impl Edges {
    pub(super) fn read(path: &Path) -> anyhow::Result<Edges> {
        let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let size = file
            .metadata()
            .with_context(|| format!("reading {}", path.display()))?
            .len();
        ensure!(size >= 2 * MIB, "{} is smaller than 2 MiB", path.display());
        let mut first = vec![0; MIB as usize];
        let mut last = vec![0; MIB as usize];
        file.read_exact(&mut first)
            .and_then(|()| file.seek(SeekFrom::Start(size - MIB)))
            .and_then(|_| file.read_exact(&mut last))
            .with_context(|| format!("reading the ends of {}", path.display()))?;
        Ok(Edges { first, last })
    }
}

/// `sfdisk --json`'s table, the fields the checks read.
#[derive(Debug, Clone, Deserialize)]
pub(super) struct Table {
    pub(super) label: String,
    pub(super) id: String,
    #[serde(default)]
    pub(super) partitions: Vec<Partition>,
    #[serde(default = "default_sector_size")]
    pub(super) sectorsize: u64,
}

fn default_sector_size() -> u64 {
    SECTOR
}

#[derive(Debug, Clone, Deserialize)]
pub(super) struct Partition {
    pub(super) start: u64,
    pub(super) size: u64,
    #[serde(rename = "type")]
    pub(super) kind: String,
    #[serde(default)]
    pub(super) uuid: String,
    #[serde(default)]
    pub(super) name: String,
}

impl Partition {
    pub(super) fn bytes(&self, sector: u64) -> (u64, u64) {
        (self.start * sector, self.size * sector)
    }
}

#[derive(Debug, Deserialize)]
struct SfdiskJson {
    partitiontable: Table,
}

/// The partition table of a disk image, as `sfdisk --json` reads it.
pub(super) fn table(sh: &Shell, path: &Path) -> anyhow::Result<Table> {
    let json = cmd!(sh, "sfdisk --json {path}")
        .quiet()
        .read()
        .with_context(|| format!("reading the partition table of {}", path.display()))?;
    Ok(serde_json::from_str::<SfdiskJson>(&json)
        .with_context(|| format!("parsing sfdisk --json of {}: {json}", path.display()))?
        .partitiontable)
}

/// `sgdisk -p`'s view, for the log.
pub(super) fn print_table(sh: &Shell, path: &Path) -> anyhow::Result<String> {
    cmd!(sh, "sgdisk -p {path}")
        .quiet()
        .read()
        .with_context(|| format!("sgdisk -p {}", path.display()))
}

/// GPT partition types (the issue's layout, docs/disk-layout.md).
const BIOS_BOOT: &str = "21686148-6449-6E6F-744E-656564454649";
const ESP: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
const LINUX: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
/// A slot's smallest size (docs/disk-layout.md).
const MIN_SLOT: u64 = 4 * GIB;

/// Checks a table against the issue's layout, independently of the
/// installer's own code: GPT; `bios-boot` 1 MiB, `esp` 512 MiB, `archy-a`
/// and `archy-b` of one size of at least 4 GiB, `archy-data` the rest;
/// each with its type, on MiB boundaries, in order. Every problem is
/// named; an empty list is a pass.
pub(super) fn layout_problems(table: &Table, disk_size: u64) -> Vec<String> {
    let mut problems = Vec::new();
    if table.label != "gpt" {
        problems.push(format!("the table is {:?}, not gpt", table.label));
    }
    let expected = [
        ("bios-boot", BIOS_BOOT),
        ("esp", ESP),
        ("archy-a", LINUX),
        ("archy-b", LINUX),
        ("archy-data", LINUX),
    ];
    if table.partitions.len() != expected.len() {
        problems.push(format!(
            "{} partitions, not {}: {:?}",
            table.partitions.len(),
            expected.len(),
            table.partitions.iter().map(|p| &p.name).collect::<Vec<_>>()
        ));
        return problems;
    }
    let sector = table.sectorsize;
    let mut previous_end = 0;
    for (i, (p, (name, kind))) in table.partitions.iter().zip(expected).enumerate() {
        let n = i + 1;
        let (start, size) = p.bytes(sector);
        if p.name != name {
            problems.push(format!("partition {n} is named {:?}, not {name:?}", p.name));
        }
        if !p.kind.eq_ignore_ascii_case(kind) {
            problems.push(format!("partition {n} ({name}) has type {}, not {kind}", p.kind));
        }
        if start % MIB != 0 || size % MIB != 0 {
            problems.push(format!(
                "partition {n} ({name}) is not on MiB boundaries: start {start}, size {size}"
            ));
        }
        if start < previous_end.max(MIB) {
            problems.push(format!(
                "partition {n} ({name}) starts at {start}, before {}",
                previous_end.max(MIB)
            ));
        }
        previous_end = start + size;
    }
    let size_of = |i: usize| table.partitions[i].size * sector;
    if size_of(0) != MIB {
        problems.push(format!("bios-boot is {} bytes, not 1 MiB", size_of(0)));
    }
    if size_of(1) != 512 * MIB {
        problems.push(format!("esp is {} bytes, not 512 MiB", size_of(1)));
    }
    if size_of(2) != size_of(3) || size_of(2) < MIN_SLOT {
        problems.push(format!(
            "the slots are {} and {} bytes: not one size of at least 4 GiB",
            size_of(2),
            size_of(3)
        ));
    }
    // The rest of the disk: all but GPT's backup at the end (and at most
    // one MiB of alignment).
    if previous_end + 2 * MIB < disk_size || previous_end > disk_size {
        problems.push(format!(
            "archy-data ends at {previous_end}, not at the end of the {disk_size}-byte disk"
        ));
    }
    problems
}

/// A sha256 of a byte range's content, holes and runs of zeros alike:
/// a partition written anew with the same bytes hashes the same, however
/// its image is sparse. The range is cut in MiB chunks from its start;
/// each chunk that is not all zeros counts, with its offset. Chunks with
/// no data extent (`SEEK_DATA`) are not read: a sparse image's holes cost
/// nothing.
pub(super) fn content_sha256(path: &Path, start: u64, len: u64) -> anyhow::Result<String> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let end = start + len;
    let mut hasher = Sha256::new();
    let mut chunk = vec![0u8; MIB as usize];
    let mut pos = start;
    while pos < end {
        let data = match rustix::fs::seek(&file, rustix::fs::SeekFrom::Data(pos)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => bail!("SEEK_DATA in {} at {pos}: {e}", path.display()),
        };
        if data >= end {
            break;
        }
        // The chunk that holds the next data, read whole (holes read as zeros).
        let chunk_start = start + (data - start) / MIB * MIB;
        let n = usize::try_from((end - chunk_start).min(MIB)).context("chunk size")?;
        file.seek(SeekFrom::Start(chunk_start))
            .and_then(|_| file.read_exact(&mut chunk[..n]))
            .with_context(|| format!("reading {} at {chunk_start}", path.display()))?;
        if chunk[..n].iter().any(|&b| b != 0) {
            hasher.update((chunk_start - start).to_le_bytes());
            hasher.update(&chunk[..n]);
        }
        pos = chunk_start + n as u64;
    }
    hasher.update(len.to_le_bytes());
    Ok(format!("{:x}", hasher.finalize()))
}

/// A file system's type and label at a byte offset of an image, as
/// `blkid` probes it (`TYPE=… LABEL=…`).
pub(super) fn probe_fs(sh: &Shell, path: &Path, offset: u64) -> anyhow::Result<String> {
    let offset = offset.to_string();
    let out = cmd!(sh, "blkid -p -o export -O {offset} {path}")
        .quiet()
        .ignore_status()
        .read()
        .with_context(|| format!("blkid at {offset} of {}", path.display()))?;
    Ok(out
        .lines()
        .filter(|l| l.starts_with("TYPE=") || l.starts_with("LABEL="))
        .collect::<Vec<_>>()
        .join(" "))
}

/// The size of an image file.
pub(super) fn size(path: &Path) -> anyhow::Result<u64> {
    Ok(fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len())
}

/// Fails unless the disk's ends are what they were.
pub(super) fn ensure_unchanged(path: &Path, before: &Edges, what: &str) -> anyhow::Result<()> {
    let after = Edges::read(path)?;
    if &after != before {
        bail!("{what} ({}) changed: its first or last MiB differs", path.display());
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn part(start_mib: u64, size_mib: u64, name: &str, kind: &str) -> Partition {
        Partition {
            start: start_mib * MIB / SECTOR,
            size: size_mib * MIB / SECTOR,
            kind: kind.into(),
            uuid: String::new(),
            name: name.into(),
        }
    }

    fn good() -> Table {
        Table {
            label: "gpt".into(),
            id: String::new(),
            sectorsize: SECTOR,
            partitions: vec![
                part(1, 1, "bios-boot", BIOS_BOOT),
                part(2, 512, "esp", ESP),
                part(514, 4096, "archy-a", LINUX),
                part(4610, 4096, "archy-b", LINUX),
                part(8706, 20 * 1024 - 8706 - 1, "archy-data", LINUX),
            ],
        }
    }

    #[test]
    fn the_issues_layout_passes_and_each_departure_is_named() {
        assert_eq!(layout_problems(&good(), 20 * GIB), Vec::<String>::new());

        let mut t = good();
        t.partitions[3].name = "other".into();
        t.partitions[1].kind = LINUX.into();
        let problems = layout_problems(&t, 20 * GIB);
        assert!(
            problems.iter().any(|p| p.contains("partition 4 is named \"other\"")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.contains("partition 2 (esp) has type")),
            "{problems:?}"
        );

        let mut t = good();
        t.partitions[3].size -= MIB / SECTOR;
        assert!(layout_problems(&t, 20 * GIB)
            .iter()
            .any(|p| p.contains("the slots are")));

        let mut t = good();
        t.partitions.pop();
        assert!(layout_problems(&t, 20 * GIB)[0].contains("4 partitions, not 5"));

        // The data partition must take the rest of the disk.
        assert!(layout_problems(&good(), 21 * GIB)
            .iter()
            .any(|p| p.contains("archy-data ends")));

        let mut t = good();
        t.label = "dos".into();
        assert!(layout_problems(&t, 20 * GIB)[0].contains("not gpt"));
    }

    #[test]
    fn content_hashes_see_bytes_not_holes() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        blank(&a, 4 * MIB).unwrap();
        // Same content, but b's zeros are written, not holes.
        fs::write(&b, vec![0u8; 4 * MIB as usize]).unwrap();
        assert_eq!(
            content_sha256(&a, MIB, 2 * MIB).unwrap(),
            content_sha256(&b, MIB, 2 * MIB).unwrap()
        );
        let mut bytes = vec![0u8; 4 * MIB as usize];
        bytes[2 * MIB as usize + 7] = 1;
        fs::write(&b, &bytes).unwrap();
        assert_ne!(
            content_sha256(&a, MIB, 2 * MIB).unwrap(),
            content_sha256(&b, MIB, 2 * MIB).unwrap()
        );
        // A sparse file with the same byte (a data extent only around it,
        // not on a MiB boundary) hashes as the fully written one.
        let c = dir.path().join("c");
        blank(&c, 4 * MIB).unwrap();
        {
            use std::io::Write as _;
            let mut f = fs::OpenOptions::new().write(true).open(&c).unwrap();
            f.seek(SeekFrom::Start(2 * MIB + 7)).unwrap();
            f.write_all(&[1]).unwrap();
        }
        assert_eq!(
            content_sha256(&c, MIB, 2 * MIB).unwrap(),
            content_sha256(&b, MIB, 2 * MIB).unwrap()
        );
        assert_eq!(
            content_sha256(&c, 4096, 3 * MIB).unwrap(),
            content_sha256(&b, 4096, 3 * MIB).unwrap()
        );
        // Outside the range, a change does not count.
        assert_eq!(content_sha256(&a, 0, MIB).unwrap(), content_sha256(&b, 0, MIB).unwrap());
    }

    #[test]
    fn edges_see_the_first_and_last_mib() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d");
        blank(&path, 8 * MIB).unwrap();
        let before = Edges::read(&path).unwrap();
        let mut bytes = vec![0u8; 8 * MIB as usize];
        bytes[4 * MIB as usize] = 1; // the middle: not an edge
        fs::write(&path, &bytes).unwrap();
        ensure_unchanged(&path, &before, "the disk").unwrap();
        bytes[8 * MIB as usize - 1] = 1;
        fs::write(&path, &bytes).unwrap();
        let err = ensure_unchanged(&path, &before, "the disk").unwrap_err().to_string();
        assert!(err.contains("changed"), "{err}");
    }
}
