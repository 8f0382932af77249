//! The installer's disk survey and the A/B layout on real block devices:
//! loop devices over sparse image files, real `sfdisk`, `mkfs`, mounts.
//!
//! Loop devices are never offered on a node; these tests ask the survey to
//! offer them (`gather(true)`), and look only at their own devices.

use std::fs;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;

use archy_agent::os::disks::{self, Content, Hidden};
use archy_agent::os::layout::{self, Part, GIB, MIB};
use archy_agent::os::partition::{self, Consent, NoConsent, Plan, ESP_LABEL};
use archy_agent::os::release::{Release, LIVE_FILES};
use archy_agent::os::slot;
use sha2::{Digest as _, Sha256};

/// A loop device over a sparse image file, detached on drop.
struct Disk {
    dir: tempfile::TempDir,
    device: PathBuf,
}

impl Disk {
    fn new(size: &str) -> Disk {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("disk.img");
        run("truncate", &["-s", size, path(&image)]);
        let out = run("losetup", &["--find", "--show", "-P", path(&image)]);
        let device = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Disk { dir, device }
    }

    fn partition(&self, part: Part) -> PathBuf {
        PathBuf::from(format!("{}p{}", self.device.display(), part.number()))
    }

    fn offered(&self) -> Result<disks::Offered, Hidden> {
        let survey = disks::gather(true).expect("survey");
        if let Some(o) = survey.offered.into_iter().find(|o| o.path == self.device) {
            return Ok(o);
        }
        match survey.hidden.into_iter().find(|(p, _)| *p == self.device) {
            Some((_, why)) => Err(why),
            None => panic!("{} is not in the survey at all", self.device.display()),
        }
    }

    /// The sha256 of the first and last MiB of the device.
    fn edges(&self) -> String {
        let mut f = fs::File::open(&self.device).expect("open device");
        let len = f.seek(SeekFrom::End(0)).expect("seek");
        let mut hash = Sha256::new();
        for at in [0, len - MIB] {
            let mut buf = vec![0u8; MIB as usize];
            f.seek(SeekFrom::Start(at)).expect("seek");
            f.read_exact(&mut buf).expect("read");
            hash.update(&buf);
        }
        format!("{:x}", hash.finalize())
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn run(program: &str, args: &[&str]) -> std::process::Output {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn blkid(node: &Path, tag: &str) -> String {
    let out = run("blkid", &["-p", "-o", "value", "-s", tag, path(node)]);
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Runs `f` with `node` mounted.
fn mounted<T>(node: &Path, f: impl FnOnce(&Path) -> T) -> T {
    let mnt = tempfile::tempdir().expect("mountpoint");
    run("mount", &[path(node), path(mnt.path())]);
    let out = f(mnt.path());
    run("umount", &[path(mnt.path())]);
    out
}

/// The files in a FAT file system's root (mtools).
fn esp_files(node: &Path) -> Vec<String> {
    let out = Command::new("mdir")
        .args(["-b", "-i", path(node), "::/"])
        .output()
        .expect("mdir");
    // mdir exits 1 on an empty folder.
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim_start_matches("::/").to_owned())
        .filter(|l| !l.is_empty())
        .collect()
}

/// What must survive a reinstall: the data partition's file system UUID,
/// its first 16 MiB and a file in it.
fn data_fingerprint(disk: &Disk) -> (String, String, Vec<u8>) {
    let node = disk.partition(Part::Data);
    let mut f = fs::File::open(&node).expect("open data partition");
    let mut head = vec![0u8; 16 * MIB as usize];
    f.read_exact(&mut head).expect("read data partition");
    // debugfs reads without mounting: a mount would change the superblock.
    let file = run("debugfs", &["-R", "cat /chain/blocks.dat", path(&node)]).stdout;
    assert_eq!(file, b"the owner's chain data", "the app data reads back");
    (blkid(&node, "UUID"), format!("{:x}", Sha256::digest(&head)), file)
}

#[test]
fn a_blank_disk_gets_the_layout_and_a_reinstall_keeps_its_data_partition() {
    let disk = Disk::new("20G");
    let offered = disk.offered().expect("a blank 20 GiB disk is offered");
    assert_eq!(offered.content, Content::Blank, "{offered:?}");
    assert!(offered.refused.is_empty(), "{offered:?}");

    let plan = layout::plan(offered.size, 300 * MIB).expect("layout");
    let consent = Consent::unattended(&disk.device, offered.content, plan).expect("consent");
    let parts = partition::write(&consent).expect("fresh install");

    // The table as sfdisk reads it back, names, types and sizes.
    let dump = run("sfdisk", &["--json", path(&disk.device)]);
    match layout::recognize(&String::from_utf8_lossy(&dump.stdout)).expect("sfdisk json") {
        layout::Recognized::Archipelago(found) => assert_eq!(found, parts),
        other => panic!("not the layout: {other:?}"),
    }
    assert_eq!(parts[2].extent.size, 4 * GIB);
    assert_eq!(parts[4].extent.start + parts[4].extent.size, 20 * GIB - MIB);
    assert_eq!(blkid(&disk.partition(Part::Data), "LABEL"), "ARCHY-DATA");
    assert_eq!(blkid(&disk.partition(Part::Esp), "LABEL"), ESP_LABEL);
    assert_eq!(blkid(&disk.partition(Part::Esp), "TYPE"), "vfat");
    assert_eq!(blkid(&disk.partition(Part::SlotB), "LABEL"), "archy-b");
    assert_eq!(disk.offered().expect("still offered").content, Content::Archipelago);
    // The owner's view: `archy-agent os disks` lists it as a reinstall.
    let out = Command::new(env!("CARGO_BIN_EXE_archy-agent"))
        .args(["os", "disks", "--allow-loop-devices"])
        .output()
        .expect("archy-agent os disks");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listing = String::from_utf8_lossy(&out.stdout);
    let line = listing
        .lines()
        .find(|l| l.starts_with(&format!("{} ", disk.device.display())))
        .unwrap_or_else(|| panic!("{} not listed:\n{listing}", disk.device.display()));
    assert!(
        line.contains("20.0 GiB") && line.contains("reinstall keeps its data"),
        "{line}"
    );
    assert!(line.contains("archy-data"), "{line}");

    // App data on the data partition, a marker on the ESP.
    mounted(&disk.partition(Part::Data), |m| {
        fs::create_dir_all(m.join("chain")).expect("mkdir");
        fs::write(m.join("chain/blocks.dat"), b"the owner's chain data").expect("write");
    });
    // FAT through mtools: a build machine's kernel may lack vfat.
    let marker = disk.dir.path().join("old-release");
    fs::write(&marker, b"x").expect("marker");
    let esp = disk.partition(Part::Esp);
    run("mcopy", &["-i", path(&esp), path(&marker), "::/old-release"]);
    assert_eq!(esp_files(&esp), vec!["old-release".to_owned()]);
    let before = data_fingerprint(&disk);

    let consent = Consent::unattended(
        &disk.device,
        Content::Archipelago,
        layout::plan(20 * GIB, 0).expect("plan"),
    )
    .expect("reinstall consent");
    assert_eq!(consent.plan(), &Plan::Reinstall);
    let again = partition::write(&consent).expect("reinstall");
    assert_eq!(again, parts, "a reinstall keeps the partition table and its PARTUUIDs");
    assert_eq!(
        data_fingerprint(&disk),
        before,
        "the data partition is kept byte for byte"
    );
    assert_eq!(esp_files(&esp), Vec::<String>::new(), "the ESP is made anew");
}

#[test]
fn a_disk_holding_another_file_system_is_never_taken_unattended() {
    let disk = Disk::new("17G");
    run("mkfs.ext4", &["-q", "-L", "OWNERS", path(&disk.device)]);
    let before = disk.edges();
    let offered = disk.offered().expect("offered");
    assert_eq!(offered.content, Content::Other);
    assert!(offered.contents.contains("ext4"), "{}", offered.contents);
    let e = Consent::unattended(
        &disk.device,
        offered.content,
        layout::plan(offered.size, 0).expect("plan"),
    )
    .expect_err("an unattended install never takes another system's disk");
    assert!(matches!(e, NoConsent::NotBlank { .. }), "{e}");
    let e = disks::choose(std::slice::from_ref(&offered), &[], None).expect_err("not chosen");
    assert!(e.to_string().contains("name the one"), "{e}");
    assert_eq!(disk.edges(), before, "nothing was written");
}

#[test]
fn a_small_disk_is_not_offered_and_a_mounted_one_is_refused() {
    let small = Disk::new("1G");
    assert_eq!(small.offered(), Err(Hidden::TooSmall { size: GIB }));

    let busy = Disk::new("16G");
    run("mkfs.ext4", &["-q", path(&busy.device)]);
    let mnt = busy.dir.path().join("mnt");
    fs::create_dir_all(&mnt).expect("mkdir");
    run("mount", &[path(&busy.device), path(&mnt)]);
    let offered = busy.offered();
    run("umount", &[path(&mnt)]);
    let offered = offered.expect("a mounted disk is shown");
    assert_eq!(offered.refused.len(), 1, "{offered:?}");
    assert!(
        offered.refused[0].to_string().contains("mounted"),
        "{:?}",
        offered.refused
    );
}

/// A release folder of small stand-in files and its `release.json`.
fn small_release(dir: &Path, version: &str) -> Release {
    fs::create_dir_all(dir.join("live")).expect("mkdir");
    for (i, name) in LIVE_FILES.iter().enumerate() {
        fs::write(dir.join(name), format!("{name} of {version}").repeat(1000 + i)).expect("write");
    }
    Release::of_dir(dir, version, archy_agent::os::release::ARCHITECTURE).expect("release")
}

#[test]
fn a_release_goes_into_a_slot_verified_and_a_bad_one_never_does() {
    let disk = Disk::new("16G");
    let plan = layout::plan(16 * GIB, 0).expect("plan");
    let consent = Consent::unattended(&disk.device, Content::Blank, plan).expect("consent");
    partition::write(&consent).expect("layout");
    let src = disk.dir.path().join("iso");
    let release = small_release(&src, "0.2.0");

    // A source file that does not match its release.json: refused, and
    // the slot is left as it was (an empty file system).
    let slot_a = disk.partition(Part::SlotA);
    let uuid = blkid(&slot_a, "UUID");
    fs::write(src.join("live/initrd.img"), b"truncated").expect("corrupt");
    let e = slot::write_release(&src, &release, &slot_a).expect_err("a bad source is refused");
    assert!(format!("{e:#}").contains("live/initrd.img"), "{e:#}");
    let listing = run("debugfs", &["-R", "ls -p /", path(&slot_a)]).stdout;
    assert!(
        !String::from_utf8_lossy(&listing).contains("live"),
        "nothing was written: {}",
        String::from_utf8_lossy(&listing)
    );
    assert_eq!(blkid(&slot_a, "UUID"), uuid);

    // A release for another architecture: refused the same way.
    let mut foreign = small_release(&src, "0.2.0");
    foreign.architecture = if foreign.architecture == "amd64" {
        "arm64"
    } else {
        "amd64"
    }
    .to_owned();
    let e = slot::write_release(&src, &foreign, &slot_a).expect_err("another architecture is refused");
    assert!(format!("{e:#}").contains("this node runs"), "{e:#}");
    assert_eq!(blkid(&slot_a, "UUID"), uuid);

    let release = small_release(&src, "0.2.0");
    slot::write_release(&src, &release, &slot_a).expect("install into slot a");
    let json = run("debugfs", &["-R", "cat /release.json", path(&slot_a)]).stdout;
    assert_eq!(
        Release::parse(&json, Path::new("slot a")).expect("release.json"),
        release
    );
    let kernel = run("debugfs", &["-R", "cat /live/vmlinuz", path(&slot_a)]).stdout;
    assert_eq!(kernel, fs::read(src.join("live/vmlinuz")).expect("source"));
}

// ---- archy-agent os install on loop devices -------------------------------
//
// GRUB is left out (`--skip-bootloader`): this host's kernel has no vfat, so
// the ESP cannot be mounted here; the QEMU tests install and boot GRUB.

/// A throwaway ed25519 key (ssh-keygen), as an owner would paste it.
const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ0uuTaaPauXcmjuorxd6ozbeGxPgKdbBm9W1fjQMifX owner@laptop";
/// Another one, on the ARCHY-CONF stick.
const CONF_KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMqlvosMrkI0h4Lt1RhGnRIXYpdqIUybt8IWuHPKOUBh stick@node";

/// `archy-agent os install` with `args` and `stdin`; its stdout and exit code.
fn install(args: &[&str], stdin: &str) -> (String, Option<i32>) {
    use std::io::Write as _;
    let mut child = Command::new(env!("CARGO_BIN_EXE_archy-agent"))
        .args(["os", "install", "--allow-loop-devices", "--skip-bootloader"])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("archy-agent os install");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    (stdout, out.status.code())
}

fn last_line(out: &str) -> &str {
    out.lines().last().unwrap_or("")
}

/// An ARCHY-CONF stick: a small ext4 disk holding `authorized_keys`.
fn conf_stick(keys: &str) -> Disk {
    let stick = Disk::new("64M");
    run("mkfs.ext4", &["-q", "-L", "ARCHY-CONF", path(&stick.device)]);
    mounted(&stick.device, |m| {
        fs::write(m.join("authorized_keys"), keys).expect("keys")
    });
    stick
}

/// `debugfs -R "stat PATH"`'s owner and mode line parts.
fn owner_and_mode(node: &Path, file: &str) -> (String, String) {
    let out = run("debugfs", &["-R", &format!("stat {file}"), path(node)]).stdout;
    let text = String::from_utf8_lossy(&out).into_owned();
    let user = text
        .split_whitespace()
        .skip_while(|w| *w != "User:")
        .nth(1)
        .unwrap_or("")
        .to_owned();
    let mode = text
        .split_whitespace()
        .skip_while(|w| *w != "Mode:")
        .nth(1)
        .unwrap_or("")
        .to_owned();
    (user, mode)
}

fn debugfs_cat(node: &Path, file: &str) -> String {
    String::from_utf8_lossy(&run("debugfs", &["-R", &format!("cat {file}"), path(node)]).stdout).into_owned()
}

/// The machine-id the summary line names.
fn summary_machine_id(line: &str) -> String {
    line.split("machine-id ")
        .nth(1)
        .and_then(|rest| rest.get(..32))
        .unwrap_or_else(|| panic!("no machine-id in {line:?}"))
        .to_owned()
}

#[test]
fn the_installer_installs_reinstalls_keeping_data_and_erases_only_when_told() {
    let disk = Disk::new("20G");
    let name = disk.device.file_name().expect("name").to_string_lossy().into_owned();
    let src = disk.dir.path().join("iso");
    let release = small_release(&src, "0.2.0");
    fs::write(src.join("release.json"), release.to_file_bytes().expect("bytes")).expect("release.json");
    let stick = conf_stick(&format!("# the owner's laptop\n{CONF_KEY}\n"));
    let source = path(&src).to_owned();
    let conf = path(&stick.device).to_owned();

    // Interactive, fresh: the disk's name, a refused key, then a good one.
    let answers = format!("{name}\nssh-dss AAAAB3NzaC1kc3M=\n{KEY}\n");
    let (out, code) = install(&["--source", &source, "--conf-device", &conf], &answers);
    assert!(out.contains(&format!("{name}  20.0 GiB")), "the disk is listed: {out}");
    assert!(
        out.contains("the pasted key: \"ssh-dss\" keys are not accepted"),
        "{out}"
    );
    let line = last_line(&out);
    assert!(
        line.starts_with(&format!(
            "archipelago install: installed 0.2.0 on {} (fresh install;",
            disk.device.display()
        )),
        "{line}"
    );
    assert!(line.contains("2 SSH keys"), "{line}");
    assert_eq!(code, Some(0));
    let machine_id = summary_machine_id(line);

    let dump = run("sfdisk", &["--json", path(&disk.device)]);
    let parts = match layout::recognize(&String::from_utf8_lossy(&dump.stdout)).expect("json") {
        layout::Recognized::Archipelago(found) => found,
        other => panic!("not the layout: {other:?}"),
    };
    // Slot A holds the release, slot B is empty.
    let slot_a = disk.partition(Part::SlotA);
    let json = run("debugfs", &["-R", "cat /release.json", path(&slot_a)]).stdout;
    assert_eq!(Release::parse(&json, Path::new("slot a")).expect("release"), release);
    let b = run("debugfs", &["-R", "ls -p /", path(&disk.partition(Part::SlotB))]).stdout;
    let b = String::from_utf8_lossy(&b);
    assert!(
        b.contains("lost+found") && !b.contains("live") && !b.contains("release.json"),
        "{b}"
    );
    // The data partition: machine-id, and both keys for the archipelago user.
    let data = disk.partition(Part::Data);
    assert_eq!(debugfs_cat(&data, "/system/machine-id"), format!("{machine_id}\n"));
    assert_eq!(
        debugfs_cat(&data, "/ssh/authorized_keys"),
        format!("{CONF_KEY}\n{KEY}\n")
    );
    assert_eq!(
        owner_and_mode(&data, "/ssh/authorized_keys"),
        ("1000".into(), "0600".into())
    );
    assert_eq!(owner_and_mode(&data, "/ssh"), ("1000".into(), "0700".into()));
    assert_eq!(owner_and_mode(&data, "/system"), ("0".into(), "0755".into()));

    // App data, then an unattended reinstall from the kernel command line:
    // the data partition byte for byte, the same machine-id, the same table.
    mounted(&data, |m| {
        fs::create_dir_all(m.join("chain")).expect("mkdir");
        fs::write(m.join("chain/blocks.dat"), b"the owner's chain data").expect("write");
    });
    let before = data_fingerprint(&disk);
    let cmdline = disk.dir.path().join("cmdline");
    fs::write(
        &cmdline,
        format!(
            "boot=live archipelago.install=auto archipelago.install.disk={}\n",
            disk.device.display()
        ),
    )
    .expect("cmdline");
    let (out, code) = install(&["--source", &source, "--cmdline", path(&cmdline)], "");
    let line = last_line(&out);
    assert!(line.contains("(reinstall, data partition kept;"), "{line}");
    assert_eq!(summary_machine_id(line), machine_id, "the kept machine-id");
    assert_eq!(code, Some(0));
    assert_eq!(
        data_fingerprint(&disk),
        before,
        "the data partition is kept byte for byte"
    );
    let dump = run("sfdisk", &["--json", path(&disk.device)]);
    match layout::recognize(&String::from_utf8_lossy(&dump.stdout)).expect("json") {
        layout::Recognized::Archipelago(found) => assert_eq!(found, parts, "the same PARTUUIDs"),
        other => panic!("{other:?}"),
    }

    // Interactive over the layout: Enter keeps the data...
    let (out, _) = install(&["--source", &source, "--conf-device", &conf], &format!("{name}\n\n"));
    assert!(last_line(&out).contains("(reinstall, data partition kept;"), "{out}");
    assert_eq!(data_fingerprint(&disk), before);
    // ...and "erase data" erases it: a new file system and machine-id.
    let (out, code) = install(
        &["--source", &source, "--conf-device", &conf],
        &format!("{name}\nerase data\n\n"),
    );
    let line = last_line(&out);
    assert!(line.contains("(fresh install;"), "{line}");
    assert_eq!(code, Some(0));
    assert_ne!(summary_machine_id(line), machine_id);
    assert_ne!(blkid(&data, "UUID"), before.0, "a new data file system");
    assert_eq!(debugfs_cat(&data, "/ssh/authorized_keys"), format!("{CONF_KEY}\n"));
}

#[test]
fn the_installer_changes_nothing_it_was_not_asked_to() {
    let disk = Disk::new("17G");
    let name = disk.device.file_name().expect("name").to_string_lossy().into_owned();
    let src = disk.dir.path().join("iso");
    let release = small_release(&src, "0.3.0");
    fs::write(src.join("release.json"), release.to_file_bytes().expect("bytes")).expect("release.json");
    let source = path(&src).to_owned();
    let empty_stick = conf_stick("");
    let conf = path(&empty_stick.device).to_owned();
    let before = disk.edges();
    let nothing = |args: &[&str], stdin: &str, says: &str| {
        let (out, code) = install(args, stdin);
        let line = last_line(&out);
        assert!(line.starts_with("archipelago install: nothing changed: "), "{line}");
        assert!(line.contains(says), "{line} should say {says:?}");
        assert_eq!(code, Some(2));
        assert_eq!(disk.edges(), before, "{args:?}: the disk is unchanged");
    };
    let cmdline = disk.dir.path().join("cmdline");
    fs::write(&cmdline, "boot=live quiet\n").expect("cmdline");
    nothing(
        &["--source", &source, "--cmdline", path(&cmdline)],
        "",
        "does not ask for an install",
    );
    nothing(&["--source", &source, "--disk", "/dev/sda"], "", "not a stable name");
    nothing(
        &["--source", &source, "--disk", "/dev/disk/by-id/no-such-disk"],
        "",
        "no disk this machine has",
    );
    // The owner mistypes, then presses Enter.
    nothing(
        &["--source", &source, "--conf-device", &conf],
        &format!("{name}x\n\n"),
        "no disk was chosen",
    );
    nothing(&["--source", &source, "--conf-device", &conf], "", "console closed");

    // A stick with a line that is not a key fails the install before the
    // disk is touched (the installer reads it strictly; the boot would
    // skip the line), naming the stick's file and the line.
    let bad_stick = conf_stick(&format!("{CONF_KEY}\nfrom=\"10.0.0.1\" {CONF_KEY}\n"));
    let bad = path(&bad_stick.device).to_owned();
    let (out, code) = install(
        &["--source", &source, "--disk", path(&disk.device), "--conf-device", &bad],
        "",
    );
    let line = last_line(&out);
    assert!(
        line.starts_with("archipelago install: failed: ")
            && line.contains(&format!("ARCHY-CONF ({bad}) authorized_keys"))
            && line.contains("line 2: \"from\" is not a key type"),
        "{line}"
    );
    assert_eq!(code, Some(1));
    assert_eq!(disk.edges(), before, "a refused stick left the disk as it was");

    // A damaged source fails before the disk is touched.
    fs::write(src.join("live/initrd.img"), b"truncated").expect("corrupt");
    let (out, code) = install(
        &[
            "--source",
            &source,
            "--disk",
            path(&disk.device),
            "--conf-device",
            &conf,
        ],
        "",
    );
    let line = last_line(&out);
    assert!(
        line.starts_with("archipelago install: failed: ") && line.contains("live/initrd.img"),
        "{line}"
    );
    assert_eq!(code, Some(1));
    assert_eq!(disk.edges(), before, "a failed install left the disk as it was");
}

#[test]
fn check_medium_passes_a_live_boot_and_refuses_a_medium_it_cannot_match() {
    let dir = tempfile::tempdir().expect("tempdir");
    let check = |cmdline: &str| {
        let file = dir.path().join("cmdline");
        fs::write(&file, cmdline).expect("cmdline");
        Command::new(env!("CARGO_BIN_EXE_archy-agent"))
            .args(["os", "check-medium", "--no-panic", "--medium"])
            .arg(dir.path())
            .arg("--cmdline")
            .arg(&file)
            .output()
            .expect("check-medium")
    };
    let out = check("boot=live archipelago.install\n");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to check"));
    let out =
        check("boot=live live-media=/dev/disk/by-partuuid/00000000-0000-4000-8000-000000000000 archipelago.slot=a\n");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("wrong boot medium") && err.contains("names no device"),
        "{err}"
    );
}

// GRUB itself (grub-emu) running the installed grub.cfg: agent/tests/grub_boot.rs.
