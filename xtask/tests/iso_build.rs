//! `cargo xtask iso` for real, checked with xorriso: both El Torito boot
//! entries (BIOS and UEFI), the live system's files, the label, the boot
//! menu, the checksum file and the build report. Needs root and the
//! network (for the base rootfs when target/cache lacks it); run through
//! `cargo xtask test`.

#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::{sha256_hex, xtask, EPOCH};

fn xorriso(iso: &Path, args: &[&str]) -> String {
    let output = Command::new("xorriso")
        .arg("-indev")
        .arg(iso)
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "xorriso {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn the_iso_boots_bios_and_uefi_and_carries_the_live_system() {
    let out = tempfile::Builder::new()
        .prefix("iso-test-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    // A real glibc-linked program that answers --help stands in for the agent.
    let agent = std::env::current_exe().unwrap();
    let built = xtask(&[
        "iso",
        "--no-images",
        "--out",
        out.path().to_str().unwrap(),
        "--agent",
        agent.to_str().unwrap(),
    ]);
    assert!(built.status.success(), "cargo xtask iso failed");
    let stdout = String::from_utf8_lossy(&built.stdout);

    let name = format!("archipelago-{}-amd64.iso", env!("CARGO_PKG_VERSION"));
    let iso = out.path().join(&name);
    assert!(iso.is_file(), "{} is missing; stdout:\n{stdout}", iso.display());

    // Both El Torito entries: BIOS (CD) and UEFI.
    let el_torito = xorriso(&iso, &["-report_el_torito", "plain"]);
    let platforms: Vec<&str> = el_torito
        .lines()
        .filter_map(|l| l.strip_prefix("El Torito boot img :"))
        .filter_map(|rest| rest.split_whitespace().nth(1))
        .collect();
    assert_eq!(platforms, ["BIOS", "UEFI"], "{el_torito}");
    // The USB stick: GRUB's hybrid MBR and the EFI partition.
    let system_area = xorriso(&iso, &["-report_system_area", "plain"]);
    assert!(system_area.contains("grub2-mbr"), "{system_area}");
    assert!(system_area.contains("EFI boot partition"), "{system_area}");

    let pvd = xorriso(&iso, &["-pvd_info"]);
    assert!(pvd.contains("Volume Id    : ARCHIPELAGO"), "{pvd}");

    let files = xorriso(&iso, &["-find", "/", "-type", "f"]);
    for file in [
        "/live/filesystem.squashfs",
        "/live/vmlinuz",
        "/live/initrd.img",
        "/boot/grub/grub.cfg",
        "/boot/grub/efi.img",
        "/boot/grub/i386-pc/eltorito.img",
        "/EFI/BOOT/BOOTX64.EFI",
    ] {
        assert!(
            files.lines().any(|l| l.trim().trim_matches('\'') == file),
            "{file} is not on the ISO:\n{files}"
        );
    }

    let grub_cfg = out.path().join("grub.cfg");
    let extract = Command::new("xorriso")
        .args(["-osirrox", "on", "-indev"])
        .arg(&iso)
        .args(["-extract", "/boot/grub/grub.cfg"])
        .arg(&grub_cfg)
        .output()
        .unwrap();
    assert!(extract.status.success(), "{}", String::from_utf8_lossy(&extract.stderr));
    let cfg = fs::read_to_string(&grub_cfg).unwrap();
    assert!(cfg.contains("boot=live"), "{cfg}");
    assert!(cfg.contains("console=ttyS0,115200"), "a serial console entry: {cfg}");

    let sha = sha256_hex(&fs::read(&iso).unwrap());
    assert_eq!(
        fs::read_to_string(out.path().join("SHA256SUMS")).unwrap(),
        format!("{sha}  {name}\n")
    );
    assert!(stdout.contains(&format!("sha256:  {sha}")), "{stdout}");
    assert!(stdout.contains("total:"), "{stdout}");

    let report: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(out.path().join("build-report.json")).unwrap()).unwrap();
    assert_eq!(report["artifact"]["sha256"], sha.as_str());
    assert_eq!(report["artifact"]["file"], name.as_str());
    assert_eq!(report["source_date_epoch"], EPOCH.parse::<u64>().unwrap());
    assert!(report["packages"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == "netavark"));
    let stages: Vec<&str> = report["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    for stage in ["rootfs-base", "rootfs", "squashfs", "bootloader", "iso"] {
        assert!(
            stages.contains(&stage),
            "{stage} is not in the report's stages {stages:?}"
        );
    }
    assert!(report["inputs"]["rootfs_cache_key"].as_str().unwrap().len() == 64);
    assert!(
        !out.path().join("work").exists(),
        "the work folder is removed after a build"
    );
}
