//! The facts `format::decide` looks at, asked of the kernel (sysfs, the
//! device itself) and of util-linux (`blkid`, `wipefs`, `lsblk`). A tool
//! that fails leaves its fact unknown, never assumed.

use std::fs;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::format::{DiskFacts, Fact, Lsblk, Signature, StableName, STABLE_FOLDERS};

const MIB: u64 = 1 << 20;
/// `O_EXCL` on a block device: the open fails with EBUSY while the kernel
/// has it claimed (mounted, swap, RAID, device mapper).
const O_EXCL: i32 = libc::O_EXCL;

/// The device a stable name's link (under the lookup folder) points to;
/// `None` when there is no such link or it leads nowhere.
pub fn resolve(name: &StableName, disk_dir: &Path) -> Option<PathBuf> {
    fs::canonicalize(name.link(disk_dir)).ok()
}

/// The stable names under the lookup folder that lead to `device`.
pub fn stable_names(device: &Path, disk_dir: &Path) -> Vec<StableName> {
    let Some(rdev) = block_rdev(device) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for folder in STABLE_FOLDERS {
        let Ok(entries) = fs::read_dir(disk_dir.join(folder)) else {
            continue;
        };
        for entry in entries.flatten() {
            if block_rdev(&entry.path()) == Some(rdev) {
                if let Some(name) = StableName::from_link(folder, &entry.file_name().to_string_lossy()) {
                    out.push(name);
                }
            }
        }
    }
    out.sort();
    out
}

fn block_rdev(path: &Path) -> Option<u64> {
    let md = fs::metadata(path).ok()?;
    md.file_type().is_block_device().then(|| md.rdev())
}

/// Linux's `major()` and `minor()` of a device number.
fn major_minor(rdev: u64) -> (u64, u64) {
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
    (major, minor)
}

/// Gathers every fact about `device` (already resolved).
pub fn facts(device: &Path, label: &str) -> DiskFacts {
    let Some(rdev) = block_rdev(device) else {
        fn not<T>() -> Fact<T> {
            Err("not a block device".to_owned())
        }
        return DiskFacts {
            device: device.to_owned(),
            block_device: false,
            signature: not(),
            wipefs: not(),
            partitions: not(),
            holders: not(),
            lsblk: not(),
            labelled: not(),
            busy: not(),
            first_mib_zero: not(),
            last_mib_zero: not(),
        };
    };
    let (major, minor) = major_minor(rdev);
    let sysfs = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    let (busy, first_mib_zero, last_mib_zero) = read_edges(device);
    DiskFacts {
        device: device.to_owned(),
        block_device: true,
        signature: signature(device),
        wipefs: wipefs(device),
        partitions: partitions(&sysfs),
        holders: list_dir(&sysfs.join("holders")),
        lsblk: lsblk(device),
        labelled: labelled(label),
        busy,
        first_mib_zero,
        last_mib_zero,
    }
}

/// Runs a tool; `Err` says why it could not run.
fn output(program: &str, package: &str, args: &[&std::ffi::OsStr]) -> Fact<std::process::Output> {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {program} (package {package}): {e}"))
}

fn failed(program: &str, args: &[&std::ffi::OsStr], out: &std::process::Output) -> String {
    let shown: Vec<_> = args.iter().map(|a| a.to_string_lossy()).collect();
    format!(
        "{program} {} failed ({}): {}",
        shown.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

/// `blkid`'s answer: `None` for exit status 2, "nothing found"; any
/// status but 0 and 2 is a failure (4: usage or other error, 8: ambivalent).
fn blkid(args: &[&std::ffi::OsStr]) -> Fact<Option<String>> {
    let out = output("blkid", "util-linux", args)?;
    match out.status.code() {
        Some(0) => Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned())),
        Some(2) => Ok(None),
        _ => Err(failed("blkid", args, &out)),
    }
}

fn signature(device: &Path) -> Fact<Option<Signature>> {
    // Low-level probing (-p): the device itself, no cache.
    let found = blkid(&["-p".as_ref(), "-o".as_ref(), "export".as_ref(), device.as_os_str()])?;
    Ok(found.and_then(|text| parse_blkid_export(&text)))
}

/// `blkid -p -o export`: what it found on the device. A partition's own
/// entry in its disk's table (`PART_ENTRY_*`) says nothing of what is on
/// it; any other key does, even one this does not know.
fn parse_blkid_export(text: &str) -> Option<Signature> {
    let pairs: Vec<(&str, &str)> = text
        .lines()
        .filter_map(|line| line.split_once('='))
        .filter(|(key, _)| *key != "DEVNAME" && !key.starts_with("PART_ENTRY_"))
        .collect();
    let value = |key: &str| pairs.iter().find(|(k, _)| *k == key).map(|(_, v)| (*v).to_owned());
    let (first, _) = pairs.first()?;
    Some(Signature {
        kind: value("TYPE")
            .or_else(|| value("PTTYPE").map(|t| format!("a {t} partition table")))
            .or_else(|| Some(format!("something ({first})"))),
        label: value("LABEL"),
    })
}

/// Every device with a file system labelled `label`, probed afresh
/// (`-c /dev/null`: a stale cache must not hide one).
pub fn labelled(label: &str) -> Fact<Vec<PathBuf>> {
    tagged(&format!("LABEL={label}"))
}

/// Every device blkid finds with `token` (`LABEL=…`, `PARTUUID=…`),
/// probed afresh.
pub fn tagged(token: &str) -> Fact<Vec<PathBuf>> {
    let found = blkid(&[
        "-c".as_ref(),
        "/dev/null".as_ref(),
        "-t".as_ref(),
        token.as_ref(),
        "-o".as_ref(),
        "device".as_ref(),
    ])?;
    Ok(found
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(PathBuf::from)
        .collect())
}

/// The disk `device` is a partition of (`None`: it is a whole disk).
pub fn parent_disk(device: &Path) -> Fact<Option<PathBuf>> {
    let args: [&std::ffi::OsStr; 4] = ["-n".as_ref(), "-d".as_ref(), "-oPKNAME".as_ref(), device.as_os_str()];
    let out = output("lsblk", "util-linux", &args)?;
    if !out.status.success() {
        return Err(failed("lsblk", &args, &out));
    }
    let name = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    Ok((!name.is_empty()).then(|| Path::new("/dev").join(name)))
}

/// The disk `device` lies on, when that disk holds the installed A/B
/// layout (`os::layout`).
pub fn installed_disk(device: &Path) -> Fact<Option<PathBuf>> {
    let Some(disk) = parent_disk(device)? else {
        return Ok(None);
    };
    match crate::os::partition::read_layout(&disk) {
        Ok(Some(_)) => Ok(Some(disk)),
        Ok(None) => Ok(None),
        Err(e) => Err(format!("{e:#}")),
    }
}

fn wipefs(device: &Path) -> Fact<Vec<String>> {
    let args: [&std::ffi::OsStr; 5] = [
        "--no-act".as_ref(),
        "--noheadings".as_ref(),
        "--output".as_ref(),
        "TYPE,OFFSET".as_ref(),
        device.as_os_str(),
    ];
    let out = output("wipefs", "util-linux", &args)?;
    if !out.status.success() {
        return Err(failed("wipefs", &args, &out));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" at "))
        .filter(|l| !l.is_empty())
        .collect())
}

fn lsblk(device: &Path) -> Fact<Lsblk> {
    let args: [&std::ffi::OsStr; 4] = [
        "--json".as_ref(),
        "--output".as_ref(),
        "NAME,MOUNTPOINTS".as_ref(),
        device.as_os_str(),
    ];
    let out = output("lsblk", "util-linux", &args)?;
    if !out.status.success() {
        return Err(failed("lsblk", &args, &out));
    }
    parse_lsblk(&out.stdout)
}

/// `lsblk --json --output NAME,MOUNTPOINTS DEVICE`: its children and mounts.
fn parse_lsblk(json: &[u8]) -> Fact<Lsblk> {
    let value: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| format!("lsblk printed no JSON it was asked for: {e}"))?;
    let devices = value
        .get("blockdevices")
        .and_then(|d| d.as_array())
        .filter(|d| d.len() == 1)
        .ok_or("lsblk printed no one device (\"blockdevices\")")?;
    let mut out = Lsblk::default();
    fn walk(node: &serde_json::Value, depth: usize, out: &mut Lsblk) {
        if depth > 0 {
            if let Some(name) = node.get("name").and_then(|n| n.as_str()) {
                out.children.push(name.to_owned());
            }
        }
        for mount in node.get("mountpoints").and_then(|m| m.as_array()).into_iter().flatten() {
            if let Some(mount) = mount.as_str() {
                out.mountpoints.push(mount.to_owned());
            }
        }
        for child in node.get("children").and_then(|c| c.as_array()).into_iter().flatten() {
            walk(child, depth + 1, out);
        }
    }
    for device in devices {
        walk(device, 0, &mut out);
    }
    Ok(out)
}

/// The partitions sysfs lists under the device (each has a `partition` file).
fn partitions(sysfs: &Path) -> Fact<Vec<String>> {
    let entries = fs::read_dir(sysfs).map_err(|e| format!("cannot list {}: {e}", sysfs.display()))?;
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("cannot list {}: {e}", sysfs.display()))?;
        if entry.path().join("partition").exists() {
            out.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    out.sort();
    Ok(out)
}

fn list_dir(dir: &Path) -> Fact<Vec<String>> {
    let entries = fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
        out.push(entry.file_name().to_string_lossy().into_owned());
    }
    out.sort();
    Ok(out)
}

/// Opens the device exclusively and reads its first and last MiB:
/// (busy, first MiB zero, last MiB zero).
fn read_edges(device: &Path) -> (Fact<bool>, Fact<bool>, Fact<bool>) {
    let file = match fs::OpenOptions::new().read(true).custom_flags(O_EXCL).open(device) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::ResourceBusy => {
            let why = || Err("not read: the device is in use".to_owned());
            return (Ok(true), why(), why());
        }
        Err(e) => {
            let why = || Err(format!("cannot open {}: {e}", device.display()));
            return (why(), why(), why());
        }
    };
    let mut file = file;
    let size = match file.seek(SeekFrom::End(0)) {
        Ok(size) => size,
        Err(e) => {
            let why = || Err(format!("cannot find the size of {}: {e}", device.display()));
            return (Ok(false), why(), why());
        }
    };
    let mut zero_at = |start: u64| -> Fact<bool> {
        let mut buf = vec![0u8; MIB.min(size) as usize];
        file.seek(SeekFrom::Start(start))
            .and_then(|_| file.read_exact(&mut buf))
            .map_err(|e| format!("cannot read {} at byte {start}: {e}", device.display()))?;
        Ok(buf.iter().all(|&b| b == 0))
    };
    let first = zero_at(0);
    let last = zero_at(size.saturating_sub(MIB));
    (Ok(false), first, last)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn device_numbers_split_as_the_kernel_does() {
        assert_eq!(major_minor(0x0703), (7, 3));
        assert_eq!(major_minor(0x0810), (8, 16));
        // Minors past 255 (the 13th loop partition and on).
        assert_eq!(major_minor((259 << 8) | (0x12 << 20) | 0x34), (259, 0x1234));
    }

    #[test]
    fn blkid_finds_a_signature_only_in_what_is_on_the_device() {
        let ext4 = "DEVNAME=/dev/loop0\nLABEL=ARCHY-DATA\nUUID=15\nTYPE=ext4\nUSAGE=filesystem\n";
        assert_eq!(
            parse_blkid_export(ext4),
            Some(Signature {
                kind: Some("ext4".into()),
                label: Some("ARCHY-DATA".into())
            })
        );
        let table = parse_blkid_export("DEVNAME=/dev/loop0\nPTUUID=41524348\nPTTYPE=dos\n").unwrap();
        assert_eq!(table.kind.as_deref(), Some("a dos partition table"));
        let blank_partition = "DEVNAME=/dev/loop0p1\nPART_ENTRY_SCHEME=dos\nPART_ENTRY_UUID=41524348-01\n\
                               PART_ENTRY_TYPE=0x83\nPART_ENTRY_NUMBER=1\n";
        assert_eq!(parse_blkid_export(blank_partition), None);
        let unknown = parse_blkid_export("DEVNAME=/dev/sdb\nSBMAGIC=x\n").unwrap();
        assert_eq!(unknown.kind.as_deref(), Some("something (SBMAGIC)"));
    }

    #[test]
    fn lsblk_children_and_mounts_are_read_at_every_depth() {
        let json = br#"{"blockdevices": [{"name": "loop3", "mountpoints": [null],
            "children": [{"name": "loop3p1", "mountpoints": ["/var/lib/archipelago", "/mnt"]},
                         {"name": "loop3p2", "mountpoints": [null],
                          "children": [{"name": "dm-0", "mountpoints": ["[SWAP]"]}]}]}]}"#;
        let shown = parse_lsblk(json).unwrap();
        assert_eq!(shown.children, ["loop3p1", "loop3p2", "dm-0"]);
        assert_eq!(shown.mountpoints, ["/var/lib/archipelago", "/mnt", "[SWAP]"]);
        let bare = parse_lsblk(br#"{"blockdevices": [{"name": "vdb", "mountpoints": [null]}]}"#).unwrap();
        assert_eq!(bare, Lsblk::default());
        assert!(parse_lsblk(b"not json").is_err());
        assert!(parse_lsblk(br#"{"blockdevices": []}"#).is_err());
    }
}
