//! `os boot-prepare`'s effects on a real installed disk: a loop device
//! with the A/B layout (`os::partition`, the installer's own code), slot
//! B holding a release read back through a read-only mount, the ESP found
//! through its PARTUUID link, the boot environment the real two-copy store
//! (`os::bootenv::EnvStore`). The host kernel has no vfat, so the ESP is a
//! folder (`mount_esp: false`).
//!
//! Needs root and losetup (package mount), sfdisk (fdisk), mkfs.vfat
//! (dosfstools), mkfs.ext4 (e2fsprogs).

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use archy_agent::dataroot::DataRoot;
use archy_agent::os::boot::{self, Kind, Paths, Prepared};
use archy_agent::os::bootenv::{BootEnv, EnvStore, SlotBoot};
use archy_agent::os::records::{BootStatus, Rollback, Slot, SlotState, Trial, TrialFailure, FORMAT};

fn run(program: &str, package: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (Debian package {package}): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn release_json(version: &str) -> String {
    let h = "0".repeat(64);
    format!(
        r#"{{"version":"{version}","architecture":"amd64","files":{{"live/vmlinuz":"{h}","live/initrd.img":"{h}","live/filesystem.squashfs":"{h}"}}}}"#
    )
}

/// An installed disk on a loop device, detached at the end.
struct Installed {
    _tmp: tempfile::TempDir,
    device: PathBuf,
    root: PathBuf,
    esp_partuuid: String,
}

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.device).output();
    }
}

fn installed_disk() -> Installed {
    use archy_agent::os::disks::Content;
    use archy_agent::os::layout::{plan, GIB};
    use archy_agent::os::partition::{self, Consent};
    let tmp = tempfile::tempdir().expect("tempdir");
    let image = tmp.path().join("disk.img");
    run("truncate", "coreutils", &["-s", "20G", image.to_str().expect("utf8")]);
    let device = PathBuf::from(
        run(
            "losetup",
            "mount",
            &["--find", "--show", "-P", image.to_str().expect("utf8")],
        )
        .trim(),
    );
    let root = tmp.path().to_path_buf();
    let mut disk = Installed {
        _tmp: tmp,
        device: device.clone(),
        root,
        esp_partuuid: String::new(),
    };
    let consent = Consent::unattended(&device, Content::Blank, plan(20 * GIB, 0).expect("plan")).expect("consent");
    let parts = partition::write(&consent).expect("the layout");
    // Slot B holds release 2.0.0 (slot A's is the live medium's).
    let mnt = disk.root.join("slot-b");
    fs::create_dir_all(&mnt).expect("mountpoint");
    run("mount", "mount", &[&parts[3].node, mnt.to_str().expect("utf8")]);
    fs::write(mnt.join("release.json"), release_json("2.0.0")).expect("release.json");
    run("umount", "mount", &[mnt.to_str().expect("utf8")]);
    // udev's link, in the test's own /dev/disk.
    disk.esp_partuuid = parts[1].partuuid.clone();
    let by = disk.root.join("disk/by-partuuid");
    fs::create_dir_all(&by).expect("by-partuuid");
    std::os::unix::fs::symlink(&parts[1].node, by.join(&disk.esp_partuuid)).expect("link");
    disk
}

fn paths(disk: &Installed, booted: Slot) -> Paths {
    let medium = disk.root.join("medium");
    fs::create_dir_all(&medium).expect("medium");
    let version = if booted == Slot::A { "1.0.0" } else { "2.0.0" };
    fs::write(medium.join("release.json"), release_json(version)).expect("medium release");
    let cmdline = disk.root.join("cmdline");
    fs::write(
        &cmdline,
        format!(
            "boot=live rauc.slot={booted} archipelago.esp=PARTUUID={} quiet\n",
            disk.esp_partuuid.to_ascii_uppercase()
        ),
    )
    .expect("cmdline");
    let esp = disk.root.join("esp");
    fs::create_dir_all(&esp).expect("esp");
    let data = DataRoot::new(disk.root.join("data"));
    Paths {
        cmdline,
        data,
        esp_dir: esp,
        boot_json: disk.root.join("run/os/boot.json"),
        system_conf: disk.root.join("run/os/system.conf"),
        medium,
        issue: disk.root.join("issue.d/40-archipelago-os.issue"),
        disk_dir: disk.root.join("disk"),
        mount_esp: false,
    }
}

fn prepare(paths: &Paths) -> boot::BootPlan {
    match boot::prepare(paths, EnvStore::new).expect("boot-prepare") {
        Prepared::Done(plan) => *plan,
        Prepared::NotInstalled => panic!("an installed boot"),
    }
}

/// Sets the boot environment as GRUB would have left it.
fn set_env(paths: &Paths, a: SlotBoot, b: SlotBoot, committed: Slot) {
    let store = EnvStore::new(paths.grub_dir());
    if store.read().is_err() {
        fs::create_dir_all(paths.grub_dir()).expect("grub dir");
        store.init().expect("init");
    }
    store
        .update(|env: &mut BootEnv| {
            env.a = a;
            env.b = b;
            env.committed = committed;
        })
        .expect("write env");
}

fn read_env(paths: &Paths) -> BootEnv {
    EnvStore::new(paths.grub_dir()).read().expect("read env")
}

const GOOD: SlotBoot = SlotBoot {
    ok: true,
    trial: false,
    tries: 0,
};

#[test]
fn a_trial_snapshots_the_state_once_and_a_rollback_records_why_and_restores_it() {
    let disk = installed_disk();
    // The first boot of release 2.0.0 in slot B, on trial.
    let p = paths(&disk, Slot::B);
    let data = p.data.clone();
    fs::create_dir_all(data.state_dir()).expect("state");
    fs::write(data.agent_state(), b"the old agent's state").expect("state file");
    Trial {
        format: FORMAT,
        from_version: "1.0.0".into(),
        to_version: "2.0.0".into(),
        to_slot: Slot::B,
        healthy_before: vec!["wallet".into()],
        started_at: "2026-12-02T10:00:00Z".into(),
        failures: vec![],
    }
    .write(&data.os_trial())
    .expect("trial.json");
    let trying = |tries| SlotBoot {
        ok: true,
        trial: true,
        tries,
    };
    set_env(&p, GOOD, trying(1), Slot::A);
    let plan = prepare(&p);
    assert_eq!(plan.kind, Kind::Trial { tries: 1 });
    // RAUC's system.conf names this disk's slots by PARTUUID and the
    // status file on the data partition.
    let conf = fs::read_to_string(&p.system_conf).expect("system.conf");
    let parts = archy_agent::os::partition::read_layout(&disk.device)
        .expect("sfdisk")
        .expect("layout");
    for part in [&parts[2], &parts[3]] {
        assert!(
            conf.contains(&format!("/dev/disk/by-partuuid/{}", part.partuuid)),
            "{conf}"
        );
    }
    assert!(conf.contains(&data.os_rauc_status().display().to_string()), "{conf}");
    assert!(conf.contains("bootloader=custom"), "{conf}");
    let status = BootStatus::read(&p.boot_json).expect("read").expect("boot.json");
    assert!(status.trial && !status.committed);
    // The other slot's release, read through a read-only mount of slot A:
    // empty here (slot A holds no release.json on this disk).
    assert_eq!(status.b.version.as_deref(), Some("2.0.0"));
    assert_eq!(status.b.to_string(), "trying 1 of 3");
    assert!(fs::read_to_string(&p.issue)
        .expect("console")
        .contains("on trial in slot B (try 1 of 3)"));
    let snapshot = data.os_state_snapshot().join("agent.json");
    assert_eq!(fs::read(&snapshot).expect("snapshot"), b"the old agent's state");

    // The new agent runs and changes the state; the check fails; a second
    // try boots: the snapshot stays the one taken before the new agent ran.
    fs::write(data.agent_state(), b"the new agent's state").expect("new state");
    fs::write(data.state_dir().join("images.json"), b"new").expect("new file");
    set_env(&p, GOOD, trying(2), Slot::A);
    assert_eq!(prepare(&p).kind, Kind::Trial { tries: 2 });
    assert_eq!(fs::read(&snapshot).expect("snapshot"), b"the old agent's state");
    let mut trial = Trial::read(&data.os_trial()).expect("read").expect("trial.json");
    trial.failures = vec![
        TrialFailure {
            try_n: 1,
            reason: "app wallet is not healthy".into(),
        },
        TrialFailure {
            try_n: 2,
            reason: "app wallet is not healthy".into(),
        },
    ];
    trial.write(&data.os_trial()).expect("failures");

    // GRUB gave up after the third try: slot A boots, committed.
    let p = paths(&disk, Slot::A);
    set_env(
        &p,
        GOOD,
        SlotBoot {
            ok: false,
            trial: true,
            tries: 3,
        },
        Slot::A,
    );
    let plan = prepare(&p);
    assert_eq!(plan.kind, Kind::RolledBack);
    let rollback = Rollback::read(&data.os_rollback())
        .expect("read")
        .expect("rollback.json");
    assert_eq!(
        rollback.message(),
        "rolled back from 2.0.0 to 1.0.0: try 1: app wallet is not healthy; try 2: app wallet is not healthy"
    );
    assert!(!rollback.acknowledged);
    assert_eq!(fs::read(data.agent_state()).expect("state"), b"the old agent's state");
    assert!(
        !data.state_dir().join("images.json").exists(),
        "the new agent's file went"
    );
    // Slot B's trial is cleared in the boot environment: found once.
    let env = read_env(&p);
    assert_eq!(
        env.b,
        SlotBoot {
            ok: false,
            trial: false,
            tries: 0
        }
    );
    assert_eq!((env.a, env.committed), (GOOD, Slot::A));
    assert!(!data.os_trial().exists() && !data.os_state_snapshot().exists());
    let status = BootStatus::read(&p.boot_json).expect("read").expect("boot.json");
    assert!(status.committed && !status.trial);
    assert_eq!(status.booted_version.as_deref(), Some("1.0.0"));
    assert_eq!(status.b.version.as_deref(), Some("2.0.0"));
    assert_eq!(status.b.state, SlotState::Bad);
    assert_eq!(status.last_rollback.as_ref(), Some(&rollback));
    assert!(fs::read_to_string(&p.issue)
        .expect("console")
        .contains("rolled back from 2.0.0 to 1.0.0"));

    // The next boot finds no new rollback: the record stays as it was.
    let plan = prepare(&p);
    assert_eq!(plan.kind, Kind::Committed);
    assert_eq!(Rollback::read(&data.os_rollback()).expect("read"), Some(rollback));

    // A later update to slot B comes up and is committed by mark-good.
    let p = paths(&disk, Slot::B);
    set_env(&p, GOOD, trying(1), Slot::A);
    assert_eq!(prepare(&p).kind, Kind::Trial { tries: 1 });
    let check_paths = archy_agent::os::check::CheckPaths {
        cmdline: p.cmdline.clone(),
        data: data.clone(),
        boot_json: p.boot_json.clone(),
        control: disk.root.join("no-agent.sock"),
        issue: p.issue.clone(),
        esp_dir: p.esp_dir.clone(),
    };
    let line = archy_agent::os::check::mark_good(&check_paths, &EnvStore::new(p.grub_dir())).expect("mark-good");
    assert_eq!(line.as_deref(), Some("committed 2.0.0 in slot B"));
    let env = read_env(&p);
    assert_eq!((env.b, env.committed), (GOOD, Slot::B));
    let status = BootStatus::read(&p.boot_json).expect("read").expect("boot.json");
    assert!(status.committed && !status.trial);
    assert!(!data.os_state_snapshot().exists());
}
