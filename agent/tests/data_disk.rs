//! `archy-agent data-disk` against real block devices: loop devices over
//! image files, real ext4, real mounts (root, as on the node). Each test
//! uses a label of its own so that nothing else is ever touched.
//!
//! These machines have no udev, so no `/dev/disk`: each disk gets a lookup
//! folder of its own (`--disk-dir`) where the test makes the `by-id` links
//! udev would make. Whether a disk was left untouched is checked on its
//! bytes: its first and last MiB read through the device, and a checksum of
//! its image file, before and after.

use std::fs;
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sha2::{Digest as _, Sha256};

const OWNER: &str = "4242:4243";
const MIB: usize = 1 << 20;
/// The MBR disk id of [`Disk::partitioned`]: its partition's PARTUUID is
/// `41524348-01`.
const MBR_DISK_ID: u32 = 0x4152_4348;

/// A loop device over a sparse image file, detached (and unmounted) on drop.
struct Disk {
    _dir: tempfile::TempDir,
    image: PathBuf,
    device: PathBuf,
    mountpoint: PathBuf,
    cmdline: PathBuf,
    /// The lookup folder of stable names (`/dev/disk` on a node).
    disk_dir: PathBuf,
    /// Where the data disk's journal folder is bound (`/var/log/journal`
    /// on a node).
    journal_dir: PathBuf,
    label: String,
    /// Prepended to PATH for the agent (a folder of failing tools).
    path_first: Option<PathBuf>,
}

impl Disk {
    /// A blank disk (no file system yet) with a label of its own.
    fn new() -> Disk {
        Disk::create(unique_label(), false)
    }

    /// A blank disk that expects the data disk under `label`.
    fn with_label(label: &str) -> Disk {
        Disk::create(label.to_owned(), false)
    }

    /// A disk with an MBR partition table and one partition over all but
    /// its first MiB (the partition device is `partition()`).
    fn partitioned() -> Disk {
        Disk::create(unique_label(), true)
    }

    /// [`Disk::partitioned`] with the MBR disk id `id` (its partition's
    /// PARTUUID is `<id>-01`).
    fn partitioned_with_id(id: u32) -> Disk {
        Disk::create_sized(unique_label(), Some(id), "64M")
    }

    fn create(label: String, partitioned: bool) -> Disk {
        Disk::create_sized(label, partitioned.then_some(MBR_DISK_ID), "64M")
    }

    /// A blank disk of `size` (truncate's units), sparse; with an MBR of
    /// that disk id when given.
    fn create_sized(label: String, mbr: Option<u32>, size: &str) -> Disk {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("disk.img");
        run("truncate", &["-s", size, image.to_str().expect("utf8")]);
        if let Some(id) = mbr {
            write_mbr(&image, 64 * MIB as u64, id);
        }
        let out = run("losetup", &["--find", "--show", "-P", image.to_str().expect("utf8")]);
        let device = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if mbr.is_some() {
            // losetup's own scan does not always show the partition here.
            run("partx", &["-u", device.to_str().expect("utf8")]);
        }
        let mountpoint = dir.path().join("data");
        fs::create_dir_all(&mountpoint).expect("mountpoint");
        let cmdline = dir.path().join("cmdline");
        fs::write(&cmdline, "BOOT_IMAGE=/live/vmlinuz boot=live\n").expect("cmdline");
        let disk_dir = dir.path().join("disk");
        fs::create_dir_all(disk_dir.join("by-id")).expect("by-id");
        let journal_dir = dir.path().join("var-log-journal");
        Disk {
            _dir: dir,
            image,
            device,
            mountpoint,
            cmdline,
            disk_dir,
            journal_dir,
            label,
            path_first: None,
        }
    }

    fn partition(&self) -> PathBuf {
        PathBuf::from(format!("{}p1", self.device.display()))
    }

    fn format(&self) {
        run(
            "mkfs.ext4",
            &["-q", "-F", "-L", &self.label, self.device.to_str().expect("utf8")],
        );
    }

    /// Makes the link udev would make, and returns the name it stands for.
    fn link_by_id(&self) -> String {
        let name = format!("archy-test-{}", self.label.to_ascii_lowercase());
        std::os::unix::fs::symlink(&self.device, self.disk_dir.join("by-id").join(&name)).expect("by-id link");
        format!("/dev/disk/by-id/{name}")
    }

    /// Boots with `archipelago.data=VALUE` on the kernel command line, as
    /// an installed node does.
    fn name_data(&self, value: &str) {
        fs::write(
            &self.cmdline,
            format!("boot=live archipelago.slot=a archipelago.data={value} quiet\n"),
        )
        .expect("cmdline");
    }

    /// Boots with `archipelago.format=VALUE` on the kernel command line.
    fn ask_format(&self, value: &str) {
        fs::write(&self.cmdline, format!("boot=live archipelago.format={value} quiet\n")).expect("cmdline");
    }

    fn data_disk(&self) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_archy-agent"));
        command
            .args([
                "data-disk",
                "--owner",
                OWNER,
                "--wait-secs",
                "2",
                "--label",
                &self.label,
            ])
            .arg("--data")
            .arg(&self.mountpoint)
            .arg("--cmdline")
            .arg(&self.cmdline)
            .arg("--disk-dir")
            .arg(&self.disk_dir)
            .arg("--journal-dir")
            .arg(&self.journal_dir);
        if let Some(first) = &self.path_first {
            let path = std::env::var("PATH").unwrap_or_default();
            command.env("PATH", format!("{}:{path}", first.display()));
        }
        let out = command.output().expect("archy-agent runs");
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        out
    }

    fn mounted(&self) -> bool {
        is_mounted(&self.mountpoint)
    }

    /// What is mounted at the mountpoint.
    fn mounted_source(&self) -> String {
        let out = run(
            "findmnt",
            &[
                "-n",
                "-o",
                "SOURCE",
                "--mountpoint",
                self.mountpoint.to_str().expect("utf8"),
            ],
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn unmount(&self) {
        if is_mounted(&self.journal_dir) {
            run("umount", &[self.journal_dir.to_str().expect("utf8")]);
        }
        if self.mounted() {
            run("umount", &[self.mountpoint.to_str().expect("utf8")]);
        }
    }

    /// The disk's bytes, to show it was left untouched.
    fn snapshot(&self) -> Snapshot {
        let mut device = fs::File::open(&self.device).expect("open device");
        let size = device.seek(SeekFrom::End(0)).expect("size");
        let mut read_at = |at: u64| {
            let mut buf = vec![0u8; MIB];
            device.seek(SeekFrom::Start(at)).expect("seek");
            device.read_exact(&mut buf).expect("read");
            buf
        };
        let first_mib = read_at(0);
        let last_mib = read_at(size - MIB as u64);
        let image_sha256 = Sha256::digest(fs::read(&self.image).expect("image")).into();
        Snapshot {
            first_mib,
            last_mib,
            image_sha256,
        }
    }
}

#[derive(PartialEq, Eq)]
struct Snapshot {
    first_mib: Vec<u8>,
    last_mib: Vec<u8>,
    image_sha256: [u8; 32],
}

/// Asserts the disk's bytes are those of `before`.
fn assert_untouched(disk: &Disk, before: &Snapshot) {
    let after = disk.snapshot();
    assert!(
        after.first_mib == before.first_mib,
        "the first MiB of {} changed",
        disk.device.display()
    );
    assert!(
        after.last_mib == before.last_mib,
        "the last MiB of {} changed",
        disk.device.display()
    );
    assert!(
        after.image_sha256 == before.image_sha256,
        "the image of {} changed",
        disk.device.display()
    );
}

impl Drop for Disk {
    fn drop(&mut self) {
        // Best effort: a failed test must still free its loop device.
        let _ = Command::new("umount").arg(&self.journal_dir).output();
        let _ = Command::new("umount").arg(&self.mountpoint).output();
        let _ = Command::new("losetup").arg("-d").arg(&self.device).output();
    }
}

/// An MBR with one Linux partition from 1 MiB to the end, as fdisk makes.
fn write_mbr(image: &Path, size: u64, disk_id: u32) {
    let sectors = size / 512;
    let mut entry = vec![0u8, 0, 0, 0, 0x83, 0, 0, 0];
    entry.extend_from_slice(&2048u32.to_le_bytes());
    entry.extend_from_slice(&u32::try_from(sectors - 2048).expect("small disk").to_le_bytes());
    let mut file = fs::OpenOptions::new().write(true).open(image).expect("image");
    file.seek(SeekFrom::Start(440)).expect("seek");
    file.write_all(&disk_id.to_le_bytes()).expect("disk id");
    file.seek(SeekFrom::Start(446)).expect("seek");
    file.write_all(&entry).expect("partition entry");
    file.seek(SeekFrom::Start(510)).expect("seek");
    file.write_all(&[0x55, 0xaa]).expect("boot signature");
}

/// ext4 labels hold 16 bytes.
fn unique_label() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .subsec_nanos();
    format!("AT{:05}{:08x}", std::process::id() % 100_000, nanos)
}

fn is_mounted(path: &Path) -> bool {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let want = path.to_string_lossy();
    mountinfo.lines().any(|l| l.split(' ').nth(4) == Some(want.as_ref()))
}

fn run(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program).args(args).output().expect(program);
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn owner_of(path: &Path) -> (u32, u32) {
    let md = fs::metadata(path).expect("metadata");
    (md.uid(), md.gid())
}

fn fs_uuid(device: &Path) -> String {
    let out = run(
        "blkid",
        &["-p", "-o", "value", "-s", "UUID", device.to_str().expect("utf8")],
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn the_labelled_disk_is_mounted_given_to_the_agent_user_seeded_and_kept_across_boots() {
    let disk = Disk::new();
    disk.format();
    // What the image ships under the data root, hidden once mounted.
    let seed = disk.mountpoint.join("config/registries.json");
    fs::create_dir_all(seed.parent().expect("parent")).expect("config dir");
    fs::write(&seed, b"{\"version\": 1, \"registries\": []}\n").expect("seed");

    let out = disk.data_disk();
    assert!(out.status.success());
    assert!(disk.mounted(), "the data disk is mounted at the data root");
    assert_eq!(owner_of(&disk.mountpoint), (4242, 4243));
    // The journal is kept on the data disk: its folder bound on the
    // journal's place (journalctl may not run here: no systemd).
    let journal = disk.mountpoint.join("system/journal");
    assert!(journal.is_dir());
    assert!(is_mounted(&disk.journal_dir), "the journal folder is bound");
    fs::write(disk.journal_dir.join("probe"), b"x").expect("write through the bind");
    assert_eq!(fs::read(journal.join("probe")).expect("on the data disk"), b"x");
    assert!(
        stderr(&out).contains("the journal is kept on the data disk"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        owner_of(&disk.mountpoint.join("containers")),
        (4242, 4243),
        "container storage belongs to the agent's user before any podman runs"
    );
    let copied = disk.mountpoint.join("config/registries.json");
    assert_eq!(
        fs::read(&copied).expect("seeded"),
        b"{\"version\": 1, \"registries\": []}\n"
    );
    assert_eq!(owner_of(&copied), (4242, 4243));
    assert_eq!(fs::metadata(&copied).expect("md").permissions().mode() & 0o777, 0o600);

    // Data written now survives an unmount ("power off") and the next boot,
    // even with the format parameter still on the command line.
    fs::write(disk.mountpoint.join("chain.dat"), b"blocks").expect("data");
    fs::write(&copied, b"{\"version\": 1, \"registries\": [], \"edited\": true}\n").ok();
    disk.unmount();
    disk.ask_format(&disk.link_by_id());
    let out = disk.data_disk();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not formatting it again"));
    assert_eq!(fs::read(disk.mountpoint.join("chain.dat")).expect("kept"), b"blocks");
    assert!(
        fs::read_to_string(&copied).expect("kept").contains("edited"),
        "a seed never overwrites what the disk has"
    );
}

#[test]
fn a_blank_disk_named_by_a_stable_name_is_formatted_once_and_never_again() {
    let disk = Disk::new();
    // Blank and not named: left alone, and the node runs from RAM.
    let out = disk.data_disk();
    assert!(out.status.success());
    assert!(!disk.mounted());
    let blkid = Command::new("blkid").arg(&disk.device).output().expect("blkid");
    assert!(blkid.stdout.is_empty(), "a disk nobody named was formatted");

    disk.ask_format(&disk.link_by_id());
    let out = disk.data_disk();
    assert!(out.status.success());
    assert!(
        stderr(&out).contains("formatting /dev/disk/by-id/archy-test-"),
        "{}",
        stderr(&out)
    );
    assert!(disk.mounted(), "formatted and mounted");
    let label = run(
        "blkid",
        &["-o", "value", "-s", "LABEL", disk.device.to_str().expect("utf8")],
    );
    assert_eq!(String::from_utf8_lossy(&label.stdout).trim(), disk.label);

    // The parameter stays: the next boots keep the disk and its data.
    let uuid = fs_uuid(&disk.device);
    fs::write(disk.mountpoint.join("wallet.dat"), b"keys").expect("data");
    for _ in 0..2 {
        disk.unmount();
        let out = disk.data_disk();
        assert!(out.status.success());
        assert!(stderr(&out).contains("not formatting it again"), "{}", stderr(&out));
        assert!(disk.mounted());
        assert_eq!(fs_uuid(&disk.device), uuid, "the data disk was formatted again");
        assert_eq!(fs::read(disk.mountpoint.join("wallet.dat")).expect("kept"), b"keys");
    }
}

#[test]
fn a_disk_whose_partition_is_the_data_disk_is_not_formatted_and_its_partition_is_mounted() {
    let disk = Disk::partitioned();
    let partition = disk.partition();
    run(
        "mkfs.ext4",
        &["-q", "-F", "-L", &disk.label, partition.to_str().expect("utf8")],
    );
    let uuid = fs_uuid(&partition);
    let before = disk.snapshot();
    // The owner made the partition by hand and named the whole disk.
    disk.ask_format(&disk.link_by_id());
    let out = disk.data_disk();
    let after = disk.snapshot();
    assert!(after.first_mib == before.first_mib, "the partition table changed");
    assert_eq!(fs_uuid(&partition), uuid, "the partition was formatted");
    assert!(out.status.success(), "the data disk is there: the node boots");
    assert_eq!(disk.mounted_source(), partition.display().to_string());
    let said = stderr(&out);
    assert!(
        said.contains("refusing to format /dev/disk/by-id/archy-test-")
            && said.contains("it has partitions")
            && said.contains("already carries the label"),
        "{said}"
    );
}

#[test]
fn a_blank_partition_named_by_its_partuuid_is_formatted() {
    let disk = Disk::partitioned();
    let partition = disk.partition();
    // The disk ID write_mbr gives, and partition 1: what udev names it by.
    let partuuid = "41524348-01";
    let probed = run(
        "blkid",
        &[
            "-p",
            "-o",
            "value",
            "-s",
            "PART_ENTRY_UUID",
            partition.to_str().expect("utf8"),
        ],
    );
    assert_eq!(String::from_utf8_lossy(&probed.stdout).trim(), partuuid);
    fs::create_dir_all(disk.disk_dir.join("by-partuuid")).expect("by-partuuid");
    std::os::unix::fs::symlink(&partition, disk.disk_dir.join("by-partuuid").join(partuuid)).expect("link");
    let table = disk.snapshot().first_mib;
    disk.ask_format(&format!("PARTUUID={}", partuuid.to_ascii_uppercase()));
    let out = disk.data_disk();
    assert!(out.status.success());
    assert_eq!(disk.mounted_source(), partition.display().to_string());
    let label = run(
        "blkid",
        &["-p", "-o", "value", "-s", "LABEL", partition.to_str().expect("utf8")],
    );
    assert_eq!(String::from_utf8_lossy(&label.stdout).trim(), disk.label);
    assert!(disk.snapshot().first_mib == table, "the partition table changed");
}

#[test]
fn a_disk_with_a_file_system_and_no_label_is_left_untouched() {
    let disk = Disk::new();
    run("mkfs.ext4", &["-q", "-F", disk.device.to_str().expect("utf8")]);
    let before = disk.snapshot();
    disk.ask_format(&disk.link_by_id());
    let out = disk.data_disk();
    disk.unmount();
    assert_untouched(&disk, &before);
    assert!(!out.status.success(), "asked for a data disk and got none");
    let said = stderr(&out);
    assert!(
        said.contains("refusing to format") && said.contains("blkid finds ext4 without a label"),
        "{said}"
    );
}

#[test]
fn a_kernel_name_is_refused_showing_the_disks_stable_name() {
    let disk = Disk::new();
    let stable = disk.link_by_id();
    let before = disk.snapshot();
    disk.ask_format(&disk.device.display().to_string());
    let out = disk.data_disk();
    disk.unmount();
    assert_untouched(&disk, &before);
    assert!(!out.status.success());
    let said = stderr(&out);
    assert!(
        said.contains(&format!("refusing to format {}", disk.device.display()))
            && said.contains("kernel name")
            && said.contains(&stable),
        "{said}"
    );
}

#[test]
fn a_blank_disk_is_not_formatted_while_another_disk_has_the_label() {
    let data = Disk::new();
    data.format();
    let blank = Disk::with_label(&data.label);
    let before = blank.snapshot();
    blank.ask_format(&blank.link_by_id());
    let out = blank.data_disk();
    let source = blank.mounted_source();
    blank.unmount();
    assert_untouched(&blank, &before);
    assert!(out.status.success(), "the data disk is there: the node boots");
    assert_eq!(source, data.device.display().to_string());
    let said = stderr(&out);
    assert!(
        said.contains("refusing to format")
            && said.contains(&format!("{} already carries the label", data.device.display())),
        "{said}"
    );
}

#[test]
fn a_failing_blkid_formats_nothing() {
    let mut disk = Disk::new();
    let shims = tempfile::tempdir().expect("tempdir");
    let blkid = shims.path().join("blkid");
    fs::write(&blkid, "#!/bin/sh\necho 'blkid: out of memory' >&2\nexit 4\n").expect("shim");
    fs::set_permissions(&blkid, fs::Permissions::from_mode(0o755)).expect("chmod");
    disk.path_first = Some(shims.path().to_owned());
    let before = disk.snapshot();
    disk.ask_format(&disk.link_by_id());
    let out = disk.data_disk();
    disk.unmount();
    assert_untouched(&disk, &before);
    assert!(!out.status.success());
    let said = stderr(&out);
    assert!(
        said.contains("refusing to format")
            && said.contains("could not be checked: blkid")
            && said.contains("exit status: 4"),
        "{said}"
    );
}

#[test]
fn without_a_data_disk_the_node_boots_from_ram_and_says_so_loudly() {
    let disk = Disk::new();
    let out = disk.data_disk();
    assert!(out.status.success(), "no data disk is not a failure");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("WARNING: no partition labelled") && stderr.contains("LOST at power off"),
        "{stderr}"
    );
    assert!(!disk.mounted());
    assert_eq!(owner_of(&disk.mountpoint), (4242, 4243));
}

#[test]
fn a_format_parameter_naming_a_missing_device_fails_and_formats_nothing() {
    let disk = Disk::new();
    let before = disk.snapshot();
    disk.ask_format("/dev/disk/by-id/archy-no-such-disk");
    let out = disk.data_disk();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/dev/disk/by-id/archy-no-such-disk") && stderr.contains("no such device"),
        "{stderr}"
    );
    assert_untouched(&disk, &before);
}

#[test]
fn two_disks_carrying_the_label_mount_neither_and_say_which() {
    let first = Disk::new();
    first.format();
    let second = Disk::with_label(&first.label);
    second.format();
    let out = first.data_disk();
    assert!(
        !out.status.success(),
        "apps must not start while it is unclear which disk is theirs"
    );
    assert!(!first.mounted());
    let said = stderr(&out);
    assert!(
        said.contains("2 partitions carry the label")
            && said.contains(&first.device.display().to_string())
            && said.contains(&second.device.display().to_string())
            && said.contains("none is mounted"),
        "{said}"
    );
    assert!(!is_mounted(&first.journal_dir));
}

/// A disk with the installed A/B layout (os::partition), its data
/// partition relabelled with the test's own label.
fn installed_disk() -> Disk {
    use archy_agent::os::disks::Content;
    use archy_agent::os::layout::{plan, GIB};
    use archy_agent::os::partition::{self, Consent};
    let disk = Disk::create_sized(unique_label(), None, "20G");
    let consent = Consent::unattended(&disk.device, Content::Blank, plan(20 * GIB, 0).expect("plan")).expect("consent");
    let parts = partition::write(&consent).expect("the layout");
    run("e2label", &[&parts[4].node, &disk.label]);
    disk
}

#[test]
fn an_installed_nodes_data_partition_is_mounted_only_when_named() {
    let disk = installed_disk();
    let data = PathBuf::from(format!("{}p5", disk.device.display()));
    // Live mode: never an installed node's data.
    let out = disk.data_disk();
    assert!(out.status.success(), "no data disk: the live system runs from RAM");
    assert!(!disk.mounted());
    let said = stderr(&out);
    assert!(
        said.contains(&format!(
            "{} is not mounted: it lies on {}, which holds the Archipelago disk layout",
            data.display(),
            disk.device.display()
        )),
        "{said}"
    );

    // Named by its PARTUUID (upper case, as a person may copy it): mounted.
    let partuuid = String::from_utf8_lossy(
        &run(
            "blkid",
            &[
                "-p",
                "-o",
                "value",
                "-s",
                "PART_ENTRY_UUID",
                data.to_str().expect("utf8"),
            ],
        )
        .stdout,
    )
    .trim()
    .to_owned();
    disk.name_data(&format!("PARTUUID={}", partuuid.to_ascii_uppercase()));
    let out = disk.data_disk();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(disk.mounted_source(), data.display().to_string());
    assert!(is_mounted(&disk.journal_dir));
    disk.unmount();

    // Named and absent: nothing mounted, the boot stops, the console says why.
    disk.name_data("PARTUUID=00000000-0000-4000-8000-000000000015");
    let out = disk.data_disk();
    assert!(!out.status.success());
    assert!(!disk.mounted());
    let said = stderr(&out);
    assert!(
        said.contains("archipelago.data=PARTUUID=00000000-0000-4000-8000-000000000015")
            && said.contains("no partition has that PARTUUID"),
        "{said}"
    );
}

#[test]
fn a_named_partition_is_mounted_even_when_another_disk_carries_the_label() {
    // The installed node's partition is named; a stick with the label is
    // plugged in too: only the named one is ever mounted.
    // A disk id of its own: the other tests' partitions share theirs.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .subsec_nanos();
    let id = nanos | 0x1000_0000;
    let disk = Disk::partitioned_with_id(id);
    let partition = disk.partition();
    run(
        "mkfs.ext4",
        &["-q", "-F", "-L", &disk.label, partition.to_str().expect("utf8")],
    );
    let other = Disk::with_label(&disk.label);
    other.format();
    disk.name_data(&format!("PARTUUID={id:08x}-01"));
    let out = disk.data_disk();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(disk.mounted_source(), partition.display().to_string());
}
