//! `cargo xtask iso` for real, checked with xorriso: the images stage it
//! runs itself (an image from the loopback test registry, found in the
//! squashfs), both El Torito boot entries (BIOS and UEFI), the live
//! system's files, the label, the boot menu, the checksum file, the
//! build report and the SBOM. Needs root, the test registry and Debian's archive (for
//! the base rootfs when target/cache lacks it); run through `cargo xtask
//! test`.

#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::{one_app_from_the_test_registry, sha256_hex, xtask_with_env, TestApp, EPOCH};

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

/// Copies `file` out of the ISO to `to`.
fn extract(iso: &Path, file: &str, to: &Path) {
    let output = Command::new("xorriso")
        .args(["-osirrox", "on", "-indev"])
        .arg(iso)
        .args(["-extract", file])
        .arg(to)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "xorriso -extract {file}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn the_iso_boots_bios_and_uefi_and_carries_the_live_system() {
    let out = tempfile::Builder::new()
        .prefix("iso-test-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    // A real glibc-linked program that answers --help stands in for the agent.
    let agent = std::env::current_exe().unwrap();
    // Neither --images nor --no-images: `iso` runs the images stage itself,
    // here for one app from the loopback test registry, into the
    // target/images of a target folder of the test's own (the base rootfs
    // still comes from the shared cache).
    let TestApp {
        manifests: apps,
        registries,
        image,
    } = one_app_from_the_test_registry(out.path(), "iso-app");
    let target = out.path().join("target");
    let shared_cache = Path::new(env!("CARGO_TARGET_TMPDIR")).parent().unwrap().join("cache");
    let built = xtask_with_env(
        &[
            "iso",
            "--manifests",
            apps.to_str().unwrap(),
            "--registries",
            registries.to_str().unwrap(),
            "--cache",
            shared_cache.to_str().unwrap(),
            "--out",
            out.path().to_str().unwrap(),
            "--agent",
            agent.to_str().unwrap(),
        ],
        &[("CARGO_TARGET_DIR", target.as_os_str())],
    );
    assert!(built.status.success(), "cargo xtask iso failed");
    let stdout = String::from_utf8_lossy(&built.stdout);
    assert!(stdout.contains("==> images: done"), "the images stage ran:\n{stdout}");
    let lock: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(target.join("images/images.lock.json")).unwrap()).unwrap();
    let digest = image.split_once('@').unwrap().1;
    assert_eq!(lock["images"][0]["app"], "iso-app", "{lock}");
    assert_eq!(lock["images"][0]["manifest_digest"], digest, "{lock}");
    let archive = lock["images"][0]["archive"].as_str().unwrap().to_owned();

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
    extract(&iso, "/boot/grub/grub.cfg", &grub_cfg);
    let cfg = fs::read_to_string(&grub_cfg).unwrap();
    assert!(cfg.contains("boot=live"), "{cfg}");
    assert!(cfg.contains("console=ttyS0,115200"), "a serial console entry: {cfg}");
    assert_eq!(
        cfg.matches("menuentry \"Install Archipelago on this machine's disk")
            .count(),
        2,
        "the installer's entries, screen and serial: {cfg}"
    );
    assert_eq!(cfg.matches(" archipelago.install\n").count(), 2, "{cfg}");

    let sha = sha256_hex(&fs::read(&iso).unwrap());
    let sums = fs::read_to_string(out.path().join("SHA256SUMS")).unwrap();
    assert!(sums.lines().any(|l| l == format!("{sha}  {name}")), "{sums}");
    // The SBOM, listed in SHA256SUMS, from the report's data.
    let sbom_bytes = fs::read(out.path().join("sbom.spdx.json")).unwrap();
    assert!(
        sums.lines()
            .any(|l| l == format!("{}  sbom.spdx.json", sha256_hex(&sbom_bytes))),
        "{sums}"
    );
    let sbom: serde_json::Value = serde_json::from_slice(&sbom_bytes).unwrap();
    assert_eq!(sbom["spdxVersion"], "SPDX-2.3");
    let purls: Vec<&str> = sbom["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["externalRefs"][0]["referenceLocator"].as_str())
        .collect();
    assert!(
        purls
            .iter()
            .any(|p| p.starts_with("pkg:deb/debian/podman@") && p.ends_with("?arch=amd64&distro=debian-12")),
        "no podman purl in the SBOM: {purls:?}"
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
    assert_eq!(report["images"][0]["manifest_digest"], digest, "{report}");
    assert!(
        purls
            .iter()
            .any(|p| p.starts_with("pkg:oci/") && p.contains(&format!("@{digest}?"))),
        "the image is in the SBOM by its digest {digest}: {purls:?}"
    );
    assert_eq!(
        purls.iter().filter(|p| p.starts_with("pkg:deb/")).count(),
        report["packages"].as_array().unwrap().len(),
        "every package of the report is in the SBOM"
    );

    // The pulled image is in the live system, beside its lock.
    let squashfs = out.path().join("filesystem.squashfs");
    extract(&iso, "/live/filesystem.squashfs", &squashfs);
    let listing = Command::new("unsquashfs")
        .args(["-l", "-d", ""])
        .arg(&squashfs)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    for file in [
        format!("/usr/share/archipelago/images/{archive}"),
        "/usr/share/archipelago/images/images.lock.json".to_owned(),
    ] {
        assert!(listing.lines().any(|l| l == file), "{file} is not in the squashfs");
    }
    assert!(
        !out.path().join("work").exists(),
        "the work folder is removed after a build"
    );
}
