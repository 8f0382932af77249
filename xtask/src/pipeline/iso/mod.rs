//! `cargo xtask iso`: the rootfs as a squashfs, with its kernel and initrd
//! and GRUB for BIOS and UEFI, in one hybrid ISO that boots from a CD and
//! from a USB stick written with `dd`; the same release as a signed RAUC
//! update bundle beside it (`pipeline::bundle`), and `SHA256SUMS` of both
//! with its detached signature `SHA256SUMS.sig`.
//!
//! GRUB's images are made here with `grub-mkimage`, `mformat` and
//! `xorriso` rather than `grub-mkrescue`, which stamps each ISO with the
//! current time (its search UUID and the EFI image's FAT) and so never
//! builds the same ISO twice. Every time stamp here comes from
//! `SOURCE_DATE_EPOCH` (or the build's start).

mod reproducible;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use xshell::{cmd, Shell};

use crate::harness::procs::capture;
use crate::pipeline::flags::{self, BuildArgs, Epoch};
use crate::pipeline::layers::sha256_file;
use crate::pipeline::progress::{self, Progress, StageOutput};
use crate::pipeline::report::{Artifact, BundleArtifact, Report, REPORT_FORMAT};
use crate::pipeline::rootfs::{self, BasePolicy};
use crate::pipeline::{bundle, images, keys};
use crate::tools;
use archy_agent::os::release::Version;

/// The ISO's volume label; live-boot and people both see it.
pub const VOLUME_ID: &str = "ARCHIPELAGO";
pub const GRUB_CFG: &str = "iso/grub.cfg";
pub const SUMS_FILE: &str = "SHA256SUMS";
/// Its detached CMS signature (PEM), by the release signing key.
pub const SUMS_SIG_FILE: &str = "SHA256SUMS.sig";
pub const REPORT_FILE: &str = "build-report.json";
const CHECK_DIR: &str = "reproducible-check";

const GRUB_LIB: &str = "/usr/lib/grub";
const BIOS_PLATFORM: &str = "i386-pc";
const EFI_PLATFORM: &str = "x86_64-efi";
/// In the core images: enough to find the ISO by its UUID and start
/// GRUB's normal mode; everything else loads from /boot/grub/<platform>/.
const BIOS_CORE_MODULES: &[&str] = &[
    "biosdisk",
    "iso9660",
    "part_msdos",
    "part_gpt",
    "search",
    "search_fs_uuid",
    "configfile",
    "normal",
];
const EFI_CORE_MODULES: &[&str] = &[
    "iso9660",
    "part_msdos",
    "part_gpt",
    "fat",
    "search",
    "search_fs_uuid",
    "configfile",
    "normal",
];
/// GRUB's files copied to the ISO for each platform.
const GRUB_MODULE_SUFFIXES: &[&str] = &[".mod", ".lst"];
/// A 2.88 MB FAT image for the EFI boot loader, as grub-mkrescue makes it,
/// with a fixed serial number instead of a random one.
const MFORMAT_FLAGS: &[&str] = &["-C", "-f", "2880", "-L", "16", "-N", "41524348"];
/// zstd level 9 in 1 MiB blocks: measured on this rootfs, smaller than the
/// default (level 15, 128 KiB blocks) and about seven times faster.
const MKSQUASHFS_FLAGS: &[&str] = &[
    "-comp",
    "zstd",
    "-Xcompression-level",
    "9",
    "-b",
    "1M",
    "-noappend",
    "-reproducible",
    "-xattrs",
    "-quiet",
];
/// Hybrid: El Torito for CDs (BIOS and EFI), an MBR with GRUB's hybrid
/// boot code and the EFI image as a partition for USB sticks.
const XORRISO_BOOT_FLAGS: &[&str] = &[
    "-b",
    "boot/grub/i386-pc/eltorito.img",
    "-no-emul-boot",
    "-boot-load-size",
    "4",
    "-boot-info-table",
    "--grub2-boot-info",
    "--grub2-mbr",
    "/usr/lib/grub/i386-pc/boot_hybrid.img",
    "--efi-boot",
    "boot/grub/efi.img",
    "-efi-boot-part",
    "--efi-boot-image",
    "--protective-msdos-label",
];
const XORRISO_FS_FLAGS: &[&str] = &["-iso-level", "3", "-full-iso9660-filenames", "-r"];

#[derive(Debug, Clone, clap::Args)]
pub struct IsoArgs {
    #[command(flatten)]
    pub build: BuildArgs,
    /// Build the ISO twice (the second time with a fresh base rootfs from
    /// mmdebstrap) and fail, naming the first differing file, unless both
    /// are byte-identical.
    #[arg(long)]
    pub check_reproducible: bool,
}

/// One finished ISO build. `work` (the rootfs tree and the ISO's staging
/// folder) is left for the caller to inspect or remove.
pub struct Output {
    pub iso: PathBuf,
    pub size: u64,
    pub sha256: String,
    /// The signed update bundle, and its payload's sha256 (reproducible).
    pub bundle: PathBuf,
    pub bundle_payload_sha256: String,
    pub work: PathBuf,
    pub packages: Vec<crate::pipeline::report::Package>,
    pub stages: Vec<crate::pipeline::report::StageRecord>,
    pub total_seconds: f64,
}

pub fn run(root: &Path, args: &IsoArgs) -> anyhow::Result<ExitCode> {
    args.build.arch.check_supported()?;
    flags::require_root("iso")?;
    let sh = Shell::new().context("creating a shell")?;
    // Both stages' tools, before minutes of work.
    tools::ensure(&sh, tools::ROOTFS_STAGE)?;
    tools::ensure(&sh, tools::ISO_STAGE)?;
    let epoch = Epoch::from_env()?;
    let out = args
        .build
        .out
        .clone()
        .unwrap_or_else(|| flags::target_dir(root).join("iso"));
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    // The list goes into the image: no login, checked before any stage.
    if let Some(file) = &args.build.registries {
        archy_agent::registry::RegistryStore::open_file(file)?.refuse_credentials()?;
    }
    let build_args = with_images_stage(root, &args.build)?;
    let args = &IsoArgs {
        build: build_args,
        check_reproducible: args.check_reproducible,
    };

    if !args.check_reproducible {
        let output = build_iso(root, &sh, &args.build, epoch, &out, BasePolicy::from_args(&args.build))?;
        remove_work(&output.work)?;
        return Ok(ExitCode::SUCCESS);
    }

    reproducible::check(root, &sh, &args.build, epoch, &out)
}

/// `iso` runs every stage: unless `--images DIR` names images pulled
/// before or `--no-images` asks for a base OS, the images stage pulls (or
/// builds) every app's image into target/images first, exactly as
/// `cargo xtask images` does, and the build embeds them.
fn with_images_stage(root: &Path, args: &BuildArgs) -> anyhow::Result<BuildArgs> {
    let Some(out) = images_stage_out(root, args) else {
        return Ok(args.clone());
    };
    images::run(&images::Args {
        manifests: args.manifests.clone(),
        registries: args.registries.clone(),
        out: out.clone(),
        cache: args.cache_dir(root),
        arch: images::Arch::Amd64,
    })
    .context(
        "the images stage failed; pass --images DIR for images pulled elsewhere, \
         or --no-images for a base OS whose agent pulls them at first boot",
    )?;
    Ok(BuildArgs {
        images: Some(out),
        ..args.clone()
    })
}

/// Where the images stage writes, when `iso` has to run it.
fn images_stage_out(root: &Path, args: &BuildArgs) -> Option<PathBuf> {
    (!args.no_images && args.images.is_none()).then(|| flags::target_dir(root).join(flags::IMAGES_SUBDIR))
}

pub fn remove_work(work: &Path) -> anyhow::Result<()> {
    if work.exists() {
        fs::remove_dir_all(work).with_context(|| format!("removing the work folder {}", work.display()))?;
    }
    Ok(())
}

pub fn build_iso(
    root: &Path,
    sh: &Shell,
    args: &BuildArgs,
    epoch: Epoch,
    out: &Path,
    policy: BasePolicy,
) -> anyhow::Result<Output> {
    let mut progress = Progress::new();
    let work = out.join("work");
    remove_work(&work)?;
    let tree = work.join("rootfs");
    let staging = work.join("iso");
    fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;

    let built = rootfs::build(root, sh, args, epoch, &tree, policy, &mut progress)?;

    let squashfs = staging.join("live/filesystem.squashfs");
    progress.stage("squashfs", "compressing the rootfs (mksquashfs, zstd)", || {
        make_squashfs(sh, &tree, &squashfs, epoch)?;
        copy_kernel(&tree, &staging.join("live"))?;
        write_release(&staging, &built.version, args.arch.debian_name())?;
        let bytes = fs::metadata(&squashfs).map(|m| m.len()).ok();
        Ok((
            (),
            StageOutput {
                bytes,
                note: String::new(),
            },
        ))
    })?;

    let grub_cfg = args.boot_menu.clone().unwrap_or_else(|| root.join(GRUB_CFG));
    progress.stage("bootloader", "GRUB for BIOS and UEFI (grub-mkimage, mtools)", || {
        make_bootloader(sh, &grub_cfg, &staging, &work, epoch)?;
        let bytes = progress::tree_size(&staging.join("boot")).ok();
        Ok((
            (),
            StageOutput {
                bytes,
                note: String::new(),
            },
        ))
    })?;

    let arch = args.arch.debian_name();
    let file = format!("{}-{}-{arch}.iso", flags::PRODUCT, built.version);
    let iso = out.join(&file);
    let (size, sha256) = progress.stage(
        "iso",
        &format!("writing the hybrid ISO {} (xorriso)", iso.display()),
        || {
            make_iso(sh, &staging, &iso, epoch)?;
            check_iso(sh, &iso)?;
            let size = fs::metadata(&iso)
                .with_context(|| format!("reading {}", iso.display()))?
                .len();
            let sha256 = sha256_file(&iso)?;
            Ok((
                (size, sha256),
                StageOutput {
                    bytes: Some(size),
                    note: String::new(),
                },
            ))
        },
    )?;

    let bundle_name = bundle::file_name(&built.version, arch);
    let (written, bundle_size, bundle_sha256) = progress.stage(
        "bundle",
        &format!(
            "signing the update bundle {} (rauc bundle) and verifying it with the image's keyring (rauc info)",
            out.join(&bundle_name).display()
        ),
        || {
            let written = bundle::write_release_bundle(sh, &staging, out, &built.version, arch, &built.key, epoch)?;
            let size = fs::metadata(&written.bundle)
                .with_context(|| format!("reading {}", written.bundle.display()))?
                .len();
            let sha256 = sha256_file(&written.bundle)?;
            Ok((
                (written, size, sha256.clone()),
                StageOutput {
                    bytes: Some(size),
                    note: if built.key.development {
                        "development key".into()
                    } else {
                        String::new()
                    },
                },
            ))
        },
    )?;
    let mut inputs = built.inputs;
    inputs.grub_cfg_sha256 = Some(sha256_file(&grub_cfg)?);
    let total = progress.elapsed_seconds();
    let report = Report {
        format: REPORT_FORMAT,
        product: flags::PRODUCT.into(),
        version: built.version.to_string(),
        arch: arch.into(),
        release: rootfs::RELEASE.into(),
        source_date_epoch: epoch.explicit_seconds(),
        artifact: Some(Artifact {
            file: file.clone(),
            size,
            sha256: sha256.clone(),
            volume_id: VOLUME_ID.into(),
        }),
        bundle: Some(BundleArtifact {
            file: bundle_name,
            size: bundle_size,
            sha256: bundle_sha256.clone(),
            payload_sha256: written.payload_sha256.clone(),
            compatible: bundle::compatible(arch),
        }),
        sums_signature: Some(SUMS_SIG_FILE.into()),
        inputs,
        packages: built.packages.clone(),
        images: built.images,
        stages: progress.stages.clone(),
        total_seconds: (total * 10.0).round() / 10.0,
    };
    let report_path = out.join(REPORT_FILE);
    report.write(&report_path)?;
    // The SBOM, from the report's own data; SHA256SUMS lists it (issue 16)
    // beside the ISO and the bundle, and is signed.
    let sbom = crate::pipeline::sbom::write(&report, epoch.seconds, out)?;
    write_sums(
        sh,
        out,
        &[
            (file.as_str(), sha256.as_str()),
            (
                report.bundle.as_ref().map_or("", |b| b.file.as_str()),
                bundle_sha256.as_str(),
            ),
            (sbom.file.as_str(), sbom.sha256.as_str()),
        ],
        &built.key,
    )?;

    println!("iso:     {}", iso.display());
    println!("size:    {} ({size} bytes)", progress::human_size(size));
    println!("sha256:  {sha256}");
    println!("bundle:  {}", written.bundle.display());
    println!(
        "         {} ({bundle_size} bytes), sha256 {bundle_sha256}, version {}, {}",
        progress::human_size(bundle_size),
        built.version,
        if built.key.development {
            "signed with the development key"
        } else {
            "signed with the release key"
        }
    );
    println!("sums:    {} and {}", out.join(SUMS_FILE).display(), SUMS_SIG_FILE);
    println!("report:  {}", report_path.display());
    println!("total:   {}", progress::human_duration(total));
    Ok(Output {
        iso,
        size,
        sha256,
        bundle: written.bundle,
        bundle_payload_sha256: written.payload_sha256,
        work,
        packages: built.packages,
        stages: progress.stages,
        total_seconds: total,
    })
}

fn make_squashfs(sh: &Shell, tree: &Path, squashfs: &Path, epoch: Epoch) -> anyhow::Result<()> {
    if let Some(dir) = squashfs.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let time = epoch.seconds.to_string();
    // mksquashfs refuses SOURCE_DATE_EPOCH together with these flags.
    capture(
        cmd!(
            sh,
            "mksquashfs {tree} {squashfs} {MKSQUASHFS_FLAGS...} -all-time {time} -mkfs-time {time}"
        )
        .env_remove("SOURCE_DATE_EPOCH"),
    )
    .context("making the squashfs")?;
    Ok(())
}

/// `SHA256SUMS` of `artifacts` (file name, sha256) in name order, and its
/// detached signature `SHA256SUMS.sig` by `key`, checked with its
/// certificate before the build goes on.
pub fn write_sums(sh: &Shell, out: &Path, artifacts: &[(&str, &str)], key: &keys::SigningKey) -> anyhow::Result<()> {
    let mut lines: Vec<String> = artifacts.iter().map(|(name, sha)| format!("{sha}  {name}\n")).collect();
    lines.sort_by(|a, b| a.split_once("  ").map(|x| x.1).cmp(&b.split_once("  ").map(|x| x.1)));
    let sums = out.join(SUMS_FILE);
    fs::write(&sums, lines.concat()).with_context(|| format!("writing {}", sums.display()))?;
    let sig = out.join(SUMS_SIG_FILE);
    keys::sign_detached(sh, key, &sums, &sig)?;
    keys::verify_detached(sh, &key.cert, &sums, &sig)
}

/// `release.json` at the ISO's root: the version and the sha256 of each
/// live file, through the agent's own type (the installer checks the copy
/// it makes against it, and the bundle carries it first).
fn write_release(staging: &Path, version: &Version, arch: &str) -> anyhow::Result<()> {
    use archy_agent::os::release::{Release, RELEASE_FILE};
    let release = Release::of_dir(staging, version, arch)?;
    let path = staging.join(RELEASE_FILE);
    fs::write(&path, release.to_file_bytes()?).with_context(|| format!("writing {}", path.display()))
}

/// The rootfs's one kernel and its initrd, as live/vmlinuz and
/// live/initrd.img.
fn copy_kernel(tree: &Path, live: &Path) -> anyhow::Result<()> {
    let boot = tree.join("boot");
    let mut kernels: Vec<String> = fs::read_dir(&boot)
        .with_context(|| format!("listing {}", boot.display()))?
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter(|n| n.starts_with("vmlinuz-"))
        .collect();
    kernels.sort();
    let [kernel] = kernels.as_slice() else {
        bail!(
            "the rootfs must have exactly one kernel in /boot, it has {}: {}",
            kernels.len(),
            kernels.join(", ")
        );
    };
    let version = kernel.trim_start_matches("vmlinuz-");
    let initrd = boot.join(format!("initrd.img-{version}"));
    fs::copy(boot.join(kernel), live.join("vmlinuz")).with_context(|| format!("copying the kernel {kernel}"))?;
    fs::copy(&initrd, live.join("initrd.img")).with_context(|| format!("copying {}", initrd.display()))?;
    Ok(())
}

/// `YYYYMMDDhhmmss00`: xorriso's --modification-date, which is also the
/// ISO's UUID that GRUB searches for.
pub fn iso_date(seconds: u64) -> anyhow::Result<String> {
    let digits: String = flags::rfc3339(seconds)?.chars().filter(char::is_ascii_digit).collect();
    Ok(format!("{digits}00"))
}

/// The same date as GRUB writes an ISO 9660 UUID: `YYYY-MM-DD-hh-mm-ss-00`.
pub fn grub_uuid(seconds: u64) -> anyhow::Result<String> {
    let time = flags::rfc3339(seconds)?;
    let fields: String = time
        .trim_end_matches('Z')
        .chars()
        .map(|c| if c.is_ascii_digit() { c } else { '-' })
        .collect();
    Ok(format!("{fields}-00"))
}

/// The configuration built into both core images: find this ISO (on a
/// CD or a USB stick) and read /boot/grub/grub.cfg from it.
pub fn embedded_config(seconds: u64) -> anyhow::Result<String> {
    Ok(format!(
        "search --no-floppy --fs-uuid --set=root {}\nset prefix=($root)/boot/grub\n",
        grub_uuid(seconds)?
    ))
}

fn make_bootloader(sh: &Shell, grub_cfg: &Path, staging: &Path, work: &Path, epoch: Epoch) -> anyhow::Result<()> {
    let grub_dir = staging.join("boot/grub");
    fs::create_dir_all(&grub_dir).with_context(|| format!("creating {}", grub_dir.display()))?;
    let cfg = fs::read_to_string(grub_cfg).with_context(|| format!("reading {}", grub_cfg.display()))?;
    if !cfg.contains("boot=live") || !cfg.contains("console=ttyS0") {
        bail!(
            "{} must boot with boot=live and have a serial console entry (console=ttyS0)",
            grub_cfg.display()
        );
    }
    fs::write(grub_dir.join("grub.cfg"), cfg).context("writing boot/grub/grub.cfg")?;
    for platform in [BIOS_PLATFORM, EFI_PLATFORM] {
        copy_grub_modules(&Path::new(GRUB_LIB).join(platform), &grub_dir.join(platform))?;
    }
    let embedded = work.join("embedded.cfg");
    fs::write(&embedded, embedded_config(epoch.seconds)?).context("writing GRUB's embedded config")?;
    let time = epoch.seconds.to_string();

    let bios_dir = Path::new(GRUB_LIB).join(BIOS_PLATFORM);
    let eltorito = grub_dir.join(BIOS_PLATFORM).join("eltorito.img");
    capture(cmd!(sh, "grub-mkimage -O i386-pc-eltorito -d {bios_dir} -p /boot/grub -c {embedded} -o {eltorito} {BIOS_CORE_MODULES...}"))
        .context("making GRUB's BIOS El Torito image")?;

    let efi_dir = Path::new(GRUB_LIB).join(EFI_PLATFORM);
    let efi_binary = work.join("BOOTX64.EFI");
    capture(cmd!(
        sh,
        "grub-mkimage -O x86_64-efi -d {efi_dir} -p /boot/grub -c {embedded} -o {efi_binary} {EFI_CORE_MODULES...}"
    ))
    .context("making GRUB's UEFI image")?;
    // Also on the ISO file system, where some firmware looks for it.
    let efi_boot = staging.join("EFI/BOOT");
    fs::create_dir_all(&efi_boot).with_context(|| format!("creating {}", efi_boot.display()))?;
    fs::copy(&efi_binary, efi_boot.join("BOOTX64.EFI")).context("copying BOOTX64.EFI")?;

    let efi_img = grub_dir.join("efi.img");
    let _ = fs::remove_file(&efi_img);
    let mtools = |c: xshell::Cmd<'_>| capture(c.env("SOURCE_DATE_EPOCH", &time).env("MTOOLS_SKIP_CHECK", "1"));
    mtools(cmd!(sh, "mformat -i {efi_img} {MFORMAT_FLAGS...} ::")).context("making the EFI FAT image")?;
    mtools(cmd!(sh, "mmd -i {efi_img} ::/EFI ::/EFI/BOOT")).context("making folders in the EFI image")?;
    mtools(cmd!(sh, "mcopy -i {efi_img} {efi_binary} ::/EFI/BOOT/BOOTX64.EFI"))
        .context("copying GRUB into the EFI image (is it larger than 2.88 MB?)")?;
    Ok(())
}

fn copy_grub_modules(from: &Path, to: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in fs::read_dir(from).with_context(|| format!("listing {}", from.display()))? {
        let entry = entry.with_context(|| format!("listing {}", from.display()))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if GRUB_MODULE_SUFFIXES.iter().any(|s| name.ends_with(s)) {
            fs::copy(entry.path(), to.join(name)).with_context(|| format!("copying {}", entry.path().display()))?;
        }
    }
    Ok(())
}

fn make_iso(sh: &Shell, staging: &Path, iso: &Path, epoch: Epoch) -> anyhow::Result<()> {
    let partial = iso.with_extension("iso.partial");
    let _ = fs::remove_file(&partial);
    let time = epoch.seconds.to_string();
    // SOURCE_DATE_EPOCH alone leaves files with their mtimes from disk.
    let date = format!("--modification-date={}", iso_date(epoch.seconds)?);
    let file_dates = iso_date(epoch.seconds)?;
    capture(
        cmd!(sh, "xorriso -as mkisofs {XORRISO_FS_FLAGS...} -volid {VOLUME_ID} {date} --set_all_file_dates {file_dates} {XORRISO_BOOT_FLAGS...} -o {partial} {staging}")
            .env("SOURCE_DATE_EPOCH", &time),
    )
    .context("writing the ISO with xorriso")?;
    fs::rename(&partial, iso).with_context(|| format!("moving the ISO to {}", iso.display()))?;
    Ok(())
}

/// What `xorriso -report_el_torito plain` must show, and the files the
/// live system boots from.
pub fn check_iso(sh: &Shell, iso: &Path) -> anyhow::Result<()> {
    let report = capture(cmd!(sh, "xorriso -indev {iso} -report_el_torito plain"))
        .with_context(|| format!("reading the boot records of {}", iso.display()))?;
    for platform in ["BIOS", "UEFI"] {
        if !boot_entries(&report).iter().any(|p| p == platform) {
            bail!("{} has no {platform} El Torito boot entry:\n{report}", iso.display());
        }
    }
    let listing = capture(cmd!(sh, "xorriso -indev {iso} -find /live -type f"))
        .with_context(|| format!("listing {}", iso.display()))?;
    for file in ["/live/filesystem.squashfs", "/live/vmlinuz", "/live/initrd.img"] {
        if !listing.lines().any(|l| l.trim().trim_matches('\'') == file) {
            bail!("{} lacks {file}", iso.display());
        }
    }
    // The release file the installer checks its copies against.
    let copy = iso.with_extension("release.json");
    let _ = fs::remove_file(&copy);
    capture(cmd!(sh, "osirrox -indev {iso} -extract /release.json {copy}"))
        .with_context(|| format!("reading /release.json of {}", iso.display()))?;
    let bytes = fs::read(&copy).with_context(|| format!("reading {}", copy.display()));
    let _ = fs::remove_file(&copy);
    archy_agent::os::release::Release::parse(&bytes?, &iso.join("release.json"))?;
    Ok(())
}

/// The platforms of the El Torito boot images in an xorriso report
/// (`El Torito boot img :   1  BIOS  y ...`).
pub fn boot_entries(report: &str) -> Vec<String> {
    report
        .lines()
        .filter_map(|l| l.strip_prefix("El Torito boot img :"))
        .filter_map(|rest| rest.split_whitespace().nth(1).map(str::to_owned))
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn build_args(args: &[&str]) -> BuildArgs {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            iso: IsoArgs,
        }
        <Cli as clap::Parser>::parse_from(std::iter::once("iso").chain(args.iter().copied()))
            .iso
            .build
    }

    #[test]
    fn iso_runs_the_images_stage_unless_given_images_or_told_not_to() {
        let root = Path::new("/project");
        assert_eq!(
            images_stage_out(root, &build_args(&[])),
            Some(flags::target_dir(root).join("images"))
        );
        assert_eq!(images_stage_out(root, &build_args(&["--images", "/elsewhere"])), None);
        assert_eq!(images_stage_out(root, &build_args(&["--no-images"])), None);
    }

    #[test]
    fn sha256sums_lists_each_artifact_by_name_and_its_signature_verifies_with_the_cert_only() {
        let sh = Shell::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (key, _) = keys::development(&sh, &dir.path().join("keys")).unwrap();
        let out = dir.path().join("out");
        fs::create_dir(&out).unwrap();
        let (a, b) = ("a".repeat(64), "b".repeat(64));
        write_sums(
            &sh,
            &out,
            &[
                ("archipelago-1.0.0-amd64.raucb", &b),
                ("archipelago-1.0.0-amd64.iso", &a),
            ],
            &key,
        )
        .unwrap();
        let sums = out.join(SUMS_FILE);
        let sig = out.join(SUMS_SIG_FILE);
        assert_eq!(
            fs::read_to_string(&sums).unwrap(),
            format!("{a}  archipelago-1.0.0-amd64.iso\n{b}  archipelago-1.0.0-amd64.raucb\n")
        );
        assert!(fs::read_to_string(&sig).unwrap().starts_with("-----BEGIN CMS-----\n"));
        // The README's command, by hand.
        let cert = &key.cert;
        capture(cmd!(
            sh,
            "openssl cms -verify -binary -content {sums} -in {sig} -inform PEM -CAfile {cert} -purpose any -out /dev/null"
        ))
        .unwrap();
        // Another key's certificate, or a changed list: refused.
        let other_dir = dir.path().join("other");
        fs::create_dir(&other_dir).unwrap();
        let other = keys::generate(&sh, &other_dir, "other").unwrap();
        let e = keys::verify_detached(&sh, &other.cert, &sums, &sig)
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not verify"), "{e}");
        fs::write(&sums, format!("{b}  archipelago-1.0.0-amd64.iso\n")).unwrap();
        assert!(keys::verify_detached(&sh, &key.cert, &sums, &sig).is_err());
    }

    #[test]
    fn iso_dates_and_grub_uuid_come_from_the_epoch() {
        assert_eq!(iso_date(1_700_000_000).unwrap(), "2023111422132000");
        assert_eq!(grub_uuid(1_700_000_000).unwrap(), "2023-11-14-22-13-20-00");
        let cfg = embedded_config(0).unwrap();
        assert!(cfg.contains("--fs-uuid --set=root 1970-01-01-00-00-00-00\n"), "{cfg}");
        assert!(cfg.contains("set prefix=($root)/boot/grub"), "{cfg}");
    }

    #[test]
    fn el_torito_platforms_are_read_from_the_xorriso_report() {
        let report = "El Torito catalog  : 33  1\n\
                      El Torito images   :   N  Pltf  B   Emul  Ld_seg  Hdpt  Ldsiz         LBA\n\
                      El Torito boot img :   1  BIOS  y   none  0x0000  0x00      4         34\n\
                      El Torito boot img :   2  UEFI  y   none  0x0000  0x00   5760        101\n\
                      El Torito img path :   1  /boot/grub/i386-pc/eltorito.img\n";
        assert_eq!(boot_entries(report), ["BIOS", "UEFI"]);
        assert!(boot_entries("El Torito catalog  : 33  1\n").is_empty());
    }

    /// Each `menuentry "title"` of a GRUB menu with its `linux` line.
    fn menu_entries(cfg: &str) -> Vec<(String, String)> {
        let mut entries = Vec::new();
        let mut lines = cfg.lines().map(str::trim);
        while let Some(line) = lines.next() {
            let Some(rest) = line.strip_prefix("menuentry \"") else {
                continue;
            };
            let title = rest.split('"').next().unwrap().to_owned();
            let linux = lines
                .by_ref()
                .take_while(|l| *l != "}")
                .find(|l| l.starts_with("linux "))
                .unwrap_or_default()
                .to_owned();
            entries.push((title, linux));
        }
        entries
    }

    #[test]
    fn the_boot_menu_boots_live_then_offers_the_installer_each_on_screen_and_serial() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let cfg = fs::read_to_string(root.join(GRUB_CFG)).unwrap();
        assert_eq!(cfg.matches("menuentry").count(), 4, "{cfg}");
        assert_eq!(cfg.matches("initrd /live/initrd.img").count(), 4, "{cfg}");
        // The e2e's menu edit (harness/e2e) boots entry 1, the live serial one.
        assert!(
            cfg.contains("set default=0\n") && cfg.contains("set timeout=5\n"),
            "{cfg}"
        );
        let entries = menu_entries(&cfg);
        let kinds: Vec<(bool, bool)> = entries
            .iter()
            .map(|(_, linux)| {
                let words: Vec<&str> = linux.split_whitespace().collect();
                assert_eq!(words[..3], ["linux", "/live/vmlinuz", "boot=live"], "{linux}");
                let serial = words.contains(&"console=ttyS0,115200n8");
                if serial {
                    // The serial console last: /dev/console, where systemd
                    // and the installer write, is the last console=.
                    let tty0 = words.iter().position(|w| *w == "console=tty0").unwrap();
                    let ttys0 = words.iter().position(|w| *w == "console=ttyS0,115200n8").unwrap();
                    assert!(tty0 < ttys0, "{linux}");
                }
                (words.contains(&"archipelago.install"), serial)
            })
            .collect();
        assert_eq!(
            kinds,
            [(false, false), (false, true), (true, false), (true, true)],
            "live, live serial, install, install serial: {entries:?}"
        );
        assert_eq!(entries[2].0, "Install Archipelago on this machine's disk");
        assert!(entries[3]
            .0
            .starts_with("Install Archipelago on this machine's disk (serial"));
        assert!(entries[1].0.contains("serial"));
    }
}
