//! `cargo xtask iso`: the rootfs as a squashfs, with its kernel and initrd
//! and GRUB for BIOS and UEFI, in one hybrid ISO that boots from a CD and
//! from a USB stick written with `dd`.
//!
//! GRUB's images are made here with `grub-mkimage`, `mformat` and
//! `xorriso` rather than `grub-mkrescue`, which stamps each ISO with the
//! current time (its search UUID and the EFI image's FAT) and so never
//! builds the same ISO twice. Every time stamp here comes from
//! `SOURCE_DATE_EPOCH` (or the build's start).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use xshell::{cmd, Shell};

use crate::archive::{sha256_file, sorted_names};
use crate::build::{self, BuildArgs, Epoch, Progress, StageOutput};
use crate::procs::capture;
use crate::report::{Artifact, Report, REPORT_FORMAT};
use crate::rootfs::{self, BasePolicy};
use crate::stage_images;
use crate::tools;

/// The ISO's volume label; live-boot and people both see it.
pub const VOLUME_ID: &str = "ARCHIPELAGO";
pub const GRUB_CFG: &str = "iso/grub.cfg";
pub const SUMS_FILE: &str = "SHA256SUMS";
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
    pub work: PathBuf,
    pub packages: Vec<crate::report::Package>,
    pub stages: Vec<crate::report::StageRecord>,
    pub total_seconds: f64,
}

pub fn run(root: &Path, args: &IsoArgs) -> anyhow::Result<ExitCode> {
    args.build.arch.check_supported()?;
    build::require_root("iso")?;
    let sh = Shell::new().context("creating a shell")?;
    // Both stages' tools, before minutes of work.
    tools::ensure(&sh, tools::ROOTFS_STAGE)?;
    tools::ensure(&sh, tools::ISO_STAGE)?;
    let mut epoch = Epoch::from_env()?;
    let out = args
        .build
        .out
        .clone()
        .unwrap_or_else(|| build::target_dir(root).join("iso"));
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

    if !epoch.explicit {
        eprintln!(
            "xtask: SOURCE_DATE_EPOCH is not set; both builds use {} (the start of this run)",
            epoch.seconds
        );
        epoch.explicit = true;
    }
    eprintln!("xtask: reproducibility check, build 1 of 2");
    let first = build_iso(root, &sh, &args.build, epoch, &out, BasePolicy::from_args(&args.build))?;
    eprintln!("xtask: reproducibility check, build 2 of 2 (a fresh base rootfs from mmdebstrap)");
    let second_out = out.join(CHECK_DIR);
    let second = build_iso(root, &sh, &args.build, epoch, &second_out, BasePolicy::Fresh)?;
    if first.sha256 == second.sha256 {
        println!("reproducible: both builds are byte-identical (sha256 {})", first.sha256);
        remove_work(&first.work)?;
        fs::remove_dir_all(&second_out).with_context(|| format!("removing {}", second_out.display()))?;
        return Ok(ExitCode::SUCCESS);
    }
    let why = explain_difference(&first, &second)?;
    bail!(
        "not reproducible: {} and {} differ: {why}\nthe work folders {} and {} are kept for inspection",
        first.iso.display(),
        second.iso.display(),
        first.work.display(),
        second.work.display()
    );
}

/// `iso` runs every stage: unless `--images DIR` names images pulled
/// before or `--no-images` asks for a base OS, the images stage pulls (or
/// builds) every app's image into target/images first, exactly as
/// `cargo xtask images` does, and the build embeds them.
fn with_images_stage(root: &Path, args: &BuildArgs) -> anyhow::Result<BuildArgs> {
    let Some(out) = images_stage_out(root, args) else {
        return Ok(args.clone());
    };
    stage_images::run(&stage_images::Args {
        manifests: args.manifests.clone(),
        registries: args.registries.clone(),
        out: out.clone(),
        cache: args.cache_dir(root),
        arch: stage_images::Arch::Amd64,
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
    (!args.no_images && args.images.is_none()).then(|| build::target_dir(root).join(build::IMAGES_SUBDIR))
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
        let bytes = build::tree_size(&staging.join("boot")).ok();
        Ok((
            (),
            StageOutput {
                bytes,
                note: String::new(),
            },
        ))
    })?;

    let file = format!("{}-{}-{}.iso", build::PRODUCT, build::VERSION, args.arch.debian_name());
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

    let sums = out.join(SUMS_FILE);
    fs::write(&sums, format!("{sha256}  {file}\n")).with_context(|| format!("writing {}", sums.display()))?;
    let mut inputs = built.inputs;
    inputs.grub_cfg_sha256 = Some(sha256_file(&grub_cfg)?);
    let total = progress.elapsed_seconds();
    let report = Report {
        format: REPORT_FORMAT,
        product: build::PRODUCT.into(),
        version: build::VERSION.into(),
        arch: args.arch.debian_name().into(),
        release: rootfs::RELEASE.into(),
        source_date_epoch: epoch.explicit_seconds(),
        artifact: Some(Artifact {
            file: file.clone(),
            size,
            sha256: sha256.clone(),
            volume_id: VOLUME_ID.into(),
        }),
        inputs,
        packages: built.packages.clone(),
        images: built.images,
        stages: progress.stages.clone(),
        total_seconds: (total * 10.0).round() / 10.0,
    };
    let report_path = out.join(REPORT_FILE);
    report.write(&report_path)?;

    println!("iso:     {}", iso.display());
    println!("size:    {} ({size} bytes)", build::human_size(size));
    println!("sha256:  {sha256}");
    println!("report:  {}", report_path.display());
    println!("total:   {}", build::human_duration(total));
    Ok(Output {
        iso,
        size,
        sha256,
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
pub fn iso_date(seconds: u64) -> String {
    let (y, mo, d, h, mi, s) = build::utc(seconds);
    format!("{y:04}{mo:02}{d:02}{h:02}{mi:02}{s:02}00")
}

/// The same date as GRUB writes an ISO 9660 UUID: `YYYY-MM-DD-hh-mm-ss-00`.
pub fn grub_uuid(seconds: u64) -> String {
    let (y, mo, d, h, mi, s) = build::utc(seconds);
    format!("{y:04}-{mo:02}-{d:02}-{h:02}-{mi:02}-{s:02}-00")
}

/// The configuration built into both core images: find this ISO (on a
/// CD or a USB stick) and read /boot/grub/grub.cfg from it.
pub fn embedded_config(seconds: u64) -> String {
    format!(
        "search --no-floppy --fs-uuid --set=root {}\nset prefix=($root)/boot/grub\n",
        grub_uuid(seconds)
    )
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
    fs::write(&embedded, embedded_config(epoch.seconds)).context("writing GRUB's embedded config")?;
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
    let date = format!("--modification-date={}", iso_date(epoch.seconds));
    let file_dates = iso_date(epoch.seconds);
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

/// Why two ISOs differ: the Debian archive, or the first differing file.
fn explain_difference(first: &Output, second: &Output) -> anyhow::Result<String> {
    if first.packages != second.packages {
        let changed: Vec<String> = first
            .packages
            .iter()
            .filter(|p| !second.packages.contains(p))
            .map(|p| {
                let other = second.packages.iter().find(|q| q.name == p.name);
                format!(
                    "{} {} -> {}",
                    p.name,
                    p.version,
                    other.map_or("(absent)", |q| q.version.as_str())
                )
            })
            .collect();
        return Ok(format!(
            "Debian's archive changed between the builds (run again): {}",
            changed.join(", ")
        ));
    }
    let staging = |o: &Output| o.work.join("iso");
    let Some(diff) = first_difference(&staging(first), &staging(second))? else {
        return Ok(format!(
            "every file on the ISOs is identical, so xorriso's own structures differ (sizes {} and {})",
            first.size, second.size
        ));
    };
    if diff.path != Path::new("live/filesystem.squashfs") {
        return Ok(format!("the first differing file is /{}", diff));
    }
    let tree = |o: &Output| o.work.join("rootfs");
    Ok(match first_difference(&tree(first), &tree(second))? {
        Some(inner) => format!("the first differing file is /live/filesystem.squashfs, and in it /{inner}"),
        None => "the first differing file is /live/filesystem.squashfs, but the rootfs trees are identical \
                 (mksquashfs wrote them differently)"
            .to_owned(),
    })
}

/// The first difference between two trees, in path order.
#[derive(Debug, PartialEq, Eq)]
pub struct Difference {
    pub path: PathBuf,
    pub what: String,
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.path.display(), self.what)
    }
}

/// Compares kind, mode, owner, link target and content, depth first in
/// name order; times are left out (the image stamps them all anyway).
pub fn first_difference(a: &Path, b: &Path) -> anyhow::Result<Option<Difference>> {
    compare_dirs(a, b, Path::new(""))
}

fn compare_dirs(a: &Path, b: &Path, rel: &Path) -> anyhow::Result<Option<Difference>> {
    use std::os::unix::fs::MetadataExt as _;
    let names_a = sorted_names(&a.join(rel))?;
    let names_b = sorted_names(&b.join(rel))?;
    let mut all: Vec<&std::ffi::OsString> = names_a.iter().chain(names_b.iter()).collect();
    all.sort();
    all.dedup();
    for name in all {
        let path = rel.join(name);
        let diff = |what: String| {
            Ok(Some(Difference {
                path: path.clone(),
                what,
            }))
        };
        let (ma, mb) = match (fs::symlink_metadata(a.join(&path)), fs::symlink_metadata(b.join(&path))) {
            (Ok(ma), Ok(mb)) => (ma, mb),
            (Ok(_), Err(_)) => return diff("only in the first build".into()),
            (Err(_), Ok(_)) => return diff("only in the second build".into()),
            (Err(e), Err(_)) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        if ma.file_type() != mb.file_type() {
            return diff("a different kind of file".into());
        }
        if ma.mode() != mb.mode() {
            return diff(format!("mode {:o} vs {:o}", ma.mode() & 0o7777, mb.mode() & 0o7777));
        }
        if (ma.uid(), ma.gid()) != (mb.uid(), mb.gid()) {
            return diff(format!("owner {}:{} vs {}:{}", ma.uid(), ma.gid(), mb.uid(), mb.gid()));
        }
        if ma.file_type().is_symlink() {
            let (ta, tb) = (fs::read_link(a.join(&path))?, fs::read_link(b.join(&path))?);
            if ta != tb {
                return diff(format!("link to {} vs {}", ta.display(), tb.display()));
            }
        } else if ma.is_dir() {
            if let Some(d) = compare_dirs(a, b, &path)? {
                return Ok(Some(d));
            }
        } else if ma.is_file() {
            if ma.len() != mb.len() {
                return diff(format!("{} vs {} bytes", ma.len(), mb.len()));
            }
            if sha256_file(&a.join(&path))? != sha256_file(&b.join(&path))? {
                return diff("different content".into());
            }
        } else if ma.rdev() != mb.rdev() {
            return diff("a different device".into());
        }
    }
    Ok(None)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt as _};

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
            Some(build::target_dir(root).join("images"))
        );
        assert_eq!(images_stage_out(root, &build_args(&["--images", "/elsewhere"])), None);
        assert_eq!(images_stage_out(root, &build_args(&["--no-images"])), None);
    }

    #[test]
    fn iso_dates_and_grub_uuid_come_from_the_epoch() {
        assert_eq!(iso_date(1_700_000_000), "2023111422132000");
        assert_eq!(grub_uuid(1_700_000_000), "2023-11-14-22-13-20-00");
        let cfg = embedded_config(0);
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

    #[test]
    fn the_boot_menu_boots_live_and_has_a_serial_entry() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let cfg = fs::read_to_string(root.join(GRUB_CFG)).unwrap();
        assert_eq!(cfg.matches("menuentry").count(), 2, "{cfg}");
        assert_eq!(cfg.matches("linux /live/vmlinuz boot=live").count(), 2, "{cfg}");
        assert!(cfg.contains("console=ttyS0,115200"), "{cfg}");
        assert!(cfg.contains("initrd /live/initrd.img"), "{cfg}");
    }

    fn tree(dir: &Path) {
        fs::create_dir_all(dir.join("etc/a")).unwrap();
        fs::write(dir.join("etc/a/one"), "1").unwrap();
        fs::write(dir.join("etc/two"), "2").unwrap();
        fs::write(dir.join("z"), "z").unwrap();
        symlink("two", dir.join("etc/link")).unwrap();
    }

    #[test]
    fn tree_comparison_names_the_first_differing_file() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        tree(a.path());
        tree(b.path());
        assert_eq!(first_difference(a.path(), b.path()).unwrap(), None);

        fs::write(b.path().join("z"), "Z").unwrap();
        fs::write(b.path().join("etc/two"), "3").unwrap();
        let d = first_difference(a.path(), b.path()).unwrap().unwrap();
        assert_eq!(d.path, Path::new("etc/two"));
        assert_eq!(d.what, "different content");

        fs::write(b.path().join("etc/two"), "2").unwrap();
        fs::set_permissions(b.path().join("etc/a/one"), fs::Permissions::from_mode(0o600)).unwrap();
        let d = first_difference(a.path(), b.path()).unwrap().unwrap();
        assert_eq!(d.to_string(), "etc/a/one (mode 644 vs 600)");

        fs::remove_file(b.path().join("etc/a/one")).unwrap();
        let d = first_difference(a.path(), b.path()).unwrap().unwrap();
        assert_eq!(d.to_string(), "etc/a/one (only in the first build)");
    }

    fn output(work: &Path, netavark: &str) -> Output {
        for sub in ["iso/live", "iso/boot/grub", "rootfs/etc"] {
            fs::create_dir_all(work.join(sub)).unwrap();
        }
        fs::write(work.join("iso/boot/grub/grub.cfg"), "menuentry").unwrap();
        fs::write(work.join("iso/live/filesystem.squashfs"), "squashfs").unwrap();
        fs::write(work.join("rootfs/etc/hostname"), "archipelago").unwrap();
        Output {
            iso: work.join("a.iso"),
            size: 1,
            sha256: String::new(),
            work: work.to_path_buf(),
            packages: vec![crate::report::Package {
                name: "netavark".into(),
                version: netavark.into(),
                arch: "amd64".into(),
            }],
            stages: Vec::new(),
            total_seconds: 0.0,
        }
    }

    #[test]
    fn a_reproducibility_failure_names_the_archive_change_or_the_first_differing_file() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let first = output(a.path(), "1.4.0-3");
        let why = explain_difference(&first, &output(b.path(), "1.4.0-4")).unwrap();
        assert_eq!(
            why,
            "Debian's archive changed between the builds (run again): netavark 1.4.0-3 -> 1.4.0-4"
        );

        let second = output(b.path(), "1.4.0-3");
        assert!(explain_difference(&first, &second)
            .unwrap()
            .starts_with("every file on the ISOs is identical"));

        // A file inside the squashfs: named by its path in the rootfs.
        fs::write(b.path().join("iso/live/filesystem.squashfs"), "squashfS").unwrap();
        fs::write(b.path().join("rootfs/etc/hostname"), "archipelagO").unwrap();
        assert_eq!(
            explain_difference(&first, &second).unwrap(),
            "the first differing file is /live/filesystem.squashfs, and in it /etc/hostname (different content)"
        );

        // A file on the ISO itself comes first in path order.
        fs::write(b.path().join("iso/boot/grub/grub.cfg"), "menuentrY").unwrap();
        assert_eq!(
            explain_difference(&first, &second).unwrap(),
            "the first differing file is /boot/grub/grub.cfg (different content)"
        );
    }

    #[test]
    fn tree_comparison_sees_link_targets() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        tree(a.path());
        tree(b.path());
        fs::remove_file(b.path().join("etc/link")).unwrap();
        symlink("a/one", b.path().join("etc/link")).unwrap();
        let d = first_difference(a.path(), b.path()).unwrap().unwrap();
        assert_eq!(d.to_string(), "etc/link (link to two vs a/one)");
    }
}
