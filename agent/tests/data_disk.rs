//! `archy-agent data-disk` against real block devices: loop devices over
//! image files, real ext4, real mounts (root, as on the node). Each test
//! uses a label of its own so that nothing else is ever touched.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const OWNER: &str = "4242:4243";

/// A loop device over a sparse image file, detached (and unmounted) on drop.
struct Disk {
    _dir: tempfile::TempDir,
    device: PathBuf,
    mountpoint: PathBuf,
    cmdline: PathBuf,
    label: String,
}

impl Disk {
    /// A blank disk (no file system yet) with a label of its own.
    fn new() -> Disk {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("disk.img");
        run("truncate", &["-s", "64M", image.to_str().expect("utf8")]);
        let label = unique_label();
        let out = run("losetup", &["--find", "--show", image.to_str().expect("utf8")]);
        let device = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let mountpoint = dir.path().join("data");
        fs::create_dir_all(&mountpoint).expect("mountpoint");
        let cmdline = dir.path().join("cmdline");
        fs::write(&cmdline, "BOOT_IMAGE=/live/vmlinuz boot=live\n").expect("cmdline");
        Disk {
            _dir: dir,
            device,
            mountpoint,
            cmdline,
            label,
        }
    }

    fn format(&self) {
        run(
            "mkfs.ext4",
            &["-q", "-F", "-L", &self.label, self.device.to_str().expect("utf8")],
        );
    }

    fn data_disk(&self) -> Output {
        let out = Command::new(env!("CARGO_BIN_EXE_archy-agent"))
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
            .output()
            .expect("archy-agent runs");
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        out
    }

    fn mounted(&self) -> bool {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let want = self.mountpoint.to_string_lossy();
        mountinfo.lines().any(|l| l.split(' ').nth(4) == Some(want.as_ref()))
    }

    fn unmount(&self) {
        if self.mounted() {
            run("umount", &[self.mountpoint.to_str().expect("utf8")]);
        }
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        // Best effort: a failed test must still free its loop device.
        let _ = Command::new("umount").arg(&self.mountpoint).output();
        let _ = Command::new("losetup").arg("-d").arg(&self.device).output();
    }
}

/// ext4 labels hold 16 bytes.
fn unique_label() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .subsec_nanos();
    format!("AT{:05}{:08x}", std::process::id() % 100_000, nanos)
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
    fs::write(
        &disk.cmdline,
        format!("boot=live archipelago.format={}\n", disk.device.display()),
    )
    .expect("cmdline");
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
fn a_disk_is_formatted_only_when_the_kernel_command_line_names_it() {
    let disk = Disk::new();
    // Blank and not named: left alone, and the node runs from RAM.
    let out = disk.data_disk();
    assert!(out.status.success());
    assert!(!disk.mounted());
    let blkid = Command::new("blkid").arg(&disk.device).output().expect("blkid");
    assert!(blkid.stdout.is_empty(), "a disk nobody named was formatted");

    fs::write(
        &disk.cmdline,
        format!("boot=live archipelago.format={} quiet\n", disk.device.display()),
    )
    .expect("cmdline");
    let out = disk.data_disk();
    assert!(out.status.success());
    assert!(disk.mounted(), "formatted and mounted");
    let label = run(
        "blkid",
        &["-o", "value", "-s", "LABEL", disk.device.to_str().expect("utf8")],
    );
    assert_eq!(String::from_utf8_lossy(&label.stdout).trim(), disk.label);
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
    fs::write(&disk.cmdline, "archipelago.format=/dev/archy-no-such-disk\n").expect("cmdline");
    let out = disk.data_disk();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/dev/archy-no-such-disk") && stderr.contains("no such device"),
        "{stderr}"
    );
}
