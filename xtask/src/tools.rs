//! Host tools the stages need, and installing the missing ones from Debian.
//!
//! A fresh CI machine has none of them, so `cargo xtask test` installs what
//! is missing (as root) instead of assuming a prepared machine.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use xshell::{cmd, Shell};

/// How to tell whether a tool is installed.
#[derive(Debug, Clone, Copy)]
enum Probe {
    /// An executable of this name on PATH (or in the sbin directories,
    /// which a non-login root shell may lack).
    OnPath(&'static str),
    /// An executable at this path: helpers that podman finds itself.
    File(&'static str),
    /// The Debian package itself, when the file alone proves nothing.
    Package,
}

#[derive(Debug, Clone, Copy)]
pub struct Tool {
    pub name: &'static str,
    pub package: &'static str,
    probe: Probe,
    why: &'static str,
}

const SBIN_DIRS: &[&str] = &["/usr/local/sbin", "/usr/sbin", "/sbin"];

/// What `cargo xtask test` needs.
pub const TEST_STAGE: &[Tool] = &[
    Tool {
        name: "podman",
        package: "podman",
        probe: Probe::OnPath("podman"),
        why: "the container engine whose Docker-compatible API the agent drives",
    },
    Tool {
        name: "runc",
        package: "runc",
        probe: Probe::OnPath("runc"),
        why: "OCI runtime (crun fails on this kind of machine: hybrid cgroups)",
    },
    Tool {
        name: "netavark",
        package: "netavark",
        probe: Probe::File("/usr/lib/podman/netavark"),
        why: "podman's network backend; without recommends apt may pick CNI instead",
    },
    Tool {
        name: "aardvark-dns",
        package: "aardvark-dns",
        probe: Probe::File("/usr/lib/podman/aardvark-dns"),
        why: "DNS between containers on a podman network",
    },
    Tool {
        name: "iptables",
        package: "iptables",
        probe: Probe::OnPath("iptables"),
        why: "netavark sets up bridge NAT and port publishing with it",
    },
    Tool {
        name: "docker-registry",
        package: "docker-registry",
        probe: Probe::OnPath("docker-registry"),
        why: "the loopback OCI registries the tests pull from",
    },
    Tool {
        name: "skopeo",
        package: "skopeo",
        probe: Probe::OnPath("skopeo"),
        why: "copies test images between registries, keeping their digests",
    },
    Tool {
        name: "htpasswd",
        package: "apache2-utils",
        probe: Probe::OnPath("htpasswd"),
        why: "the password file of the registry with basic auth",
    },
    Tool {
        name: "busybox",
        package: "busybox-static",
        // The dynamically linked `busybox` package puts a binary at the same
        // path that would not run inside an image without a libc.
        probe: Probe::Package,
        why: "the statically linked userland of the test images",
    },
    Tool {
        name: "openssl",
        package: "openssl",
        probe: Probe::OnPath("openssl"),
        why: "computes bitcoind's rpcauth HMAC in a test, independently of the agent",
    },
    Tool {
        name: "newuidmap",
        package: "uidmap",
        probe: Probe::OnPath("newuidmap"),
        why: "maps the rootless test service's user namespace through /etc/subuid",
    },
    Tool {
        name: "slirp4netns",
        package: "slirp4netns",
        probe: Probe::OnPath("slirp4netns"),
        why: "the rootless test service's network namespace reaches out through it",
    },
    Tool {
        name: "sfdisk",
        package: "fdisk",
        probe: Probe::OnPath("sfdisk"),
        why: "the installer's partition table, written onto loop devices in the tests",
    },
    Tool {
        name: "mkfs.vfat",
        package: "dosfstools",
        probe: Probe::OnPath("mkfs.vfat"),
        why: "the installer's EFI system partition",
    },
    Tool {
        name: "mcopy",
        package: "mtools",
        probe: Probe::OnPath("mcopy"),
        why: "reads and writes the EFI system partition in the tests without mounting it (a build machine's kernel may lack vfat)",
    },
    Tool {
        name: "grub-editenv",
        package: "grub-common",
        probe: Probe::OnPath("grub-editenv"),
        why: "the installer's GRUB environment block, and grub-script-check for its grub.cfg, in the unit tests",
    },
    Tool {
        name: "grub-emu",
        package: "grub-emu",
        probe: Probe::OnPath("grub-emu"),
        why: "runs the installed grub.cfg in GRUB itself against a loop disk: boot counting (grub_boot tests)",
    },
    Tool {
        name: "debugfs",
        package: "e2fsprogs",
        probe: Probe::OnPath("debugfs"),
        why: "puts a release's live/bootargs into an ext4 slot without mounting it (grub_boot tests)",
    },
    Tool {
        name: "rauc",
        package: "rauc",
        probe: Probe::OnPath("rauc"),
        why: "RAUC 1.8 calling the custom bootloader backend, os rauc-backend (grub_boot tests)",
    },
    Tool {
        name: "dbus-daemon",
        package: "dbus",
        probe: Probe::OnPath("dbus-daemon"),
        why: "the private system bus rauc service runs on in the tests",
    },
    Tool {
        name: "rauc",
        package: "rauc",
        probe: Probe::OnPath("rauc"),
        why: "makes and verifies signed update bundles in the bundle tests (xtask/tests/bundle.rs)",
    },
    Tool {
        name: "mksquashfs",
        package: "squashfs-tools",
        probe: Probe::OnPath("mksquashfs"),
        why: "rauc bundle packs a bundle's content with it",
    },
];

/// What `cargo xtask images` needs, and only for apps with `build`:
/// pulling is done by the xtask itself.
pub const IMAGES_STAGE: &[Tool] = &[
    Tool {
        name: "podman",
        package: "podman",
        probe: Probe::OnPath("podman"),
        why: "builds the images of apps with `build` and saves them as archives",
    },
    Tool {
        name: "runc",
        package: "runc",
        probe: Probe::OnPath("runc"),
        why: "runs the RUN steps of those builds",
    },
];

/// What `cargo xtask base-image` needs (and `cargo xtask images`, when a
/// build starts from the UI base image and it is not cached).
pub const BASE_IMAGE_STAGE: &[Tool] = &[
    Tool {
        name: "mmdebstrap",
        package: "mmdebstrap",
        probe: Probe::OnPath("mmdebstrap"),
        why: "builds the UI base image's Debian 12 layer from Debian's archive",
    },
    Tool {
        name: "tar",
        package: "tar",
        probe: Probe::OnPath("tar"),
        why: "reads the installed packages out of that layer",
    },
];

/// What `cargo xtask rootfs` needs (and `cargo xtask iso`, which builds
/// the rootfs first).
pub const ROOTFS_STAGE: &[Tool] = &[
    Tool {
        name: "mmdebstrap",
        package: "mmdebstrap",
        probe: Probe::OnPath("mmdebstrap"),
        why: "builds the Debian 12 rootfs from Debian's archive",
    },
    Tool {
        name: "tar",
        package: "tar",
        probe: Probe::OnPath("tar"),
        why: "unpacks the cached base rootfs with its owners and xattrs",
    },
    Tool {
        name: "chroot",
        package: "coreutils",
        probe: Probe::OnPath("chroot"),
        why: "checks packages and the agent inside the rootfs",
    },
    Tool {
        name: "openssl",
        package: "openssl",
        probe: Probe::OnPath("openssl"),
        why: "makes the development signing key, whose certificate the rootfs trusts as its RAUC keyring",
    },
];

/// What `cargo xtask iso` needs besides the rootfs tools.
pub const ISO_STAGE: &[Tool] = &[
    Tool {
        name: "mksquashfs",
        package: "squashfs-tools",
        probe: Probe::OnPath("mksquashfs"),
        why: "compresses the rootfs into live/filesystem.squashfs (zstd)",
    },
    Tool {
        name: "grub-mkimage",
        package: "grub-common",
        probe: Probe::OnPath("grub-mkimage"),
        why: "makes GRUB's BIOS and UEFI boot images",
    },
    Tool {
        name: "grub i386-pc",
        package: "grub-pc-bin",
        probe: Probe::File("/usr/lib/grub/i386-pc/boot_hybrid.img"),
        why: "GRUB for BIOS: El Torito image and the USB stick's MBR",
    },
    Tool {
        name: "grub x86_64-efi",
        package: "grub-efi-amd64-bin",
        probe: Probe::File("/usr/lib/grub/x86_64-efi/kernel.img"),
        why: "GRUB for UEFI",
    },
    Tool {
        name: "mformat",
        package: "mtools",
        probe: Probe::OnPath("mformat"),
        why: "the FAT image that holds the UEFI boot loader",
    },
    Tool {
        name: "xorriso",
        package: "xorriso",
        probe: Probe::OnPath("xorriso"),
        why: "writes the hybrid ISO and reads its boot records back",
    },
    Tool {
        name: "rauc",
        package: "rauc",
        probe: Probe::OnPath("rauc"),
        why: "signs the update bundle (rauc bundle) and verifies it with the image's keyring (rauc info)",
    },
    Tool {
        name: "openssl",
        package: "openssl",
        probe: Probe::OnPath("openssl"),
        why: "signs SHA256SUMS (openssl cms)",
    },
];

/// What `cargo xtask e2e` needs beyond the ISO stages: a guest to boot the
/// ISO in, UEFI firmware for it, its disks, and an SSH client.
pub const E2E_STAGE: &[Tool] = &[
    Tool {
        name: "qemu-system-x86_64",
        package: "qemu-system-x86",
        probe: Probe::OnPath("qemu-system-x86_64"),
        why: "boots the ISO (TCG: nested KVM hangs on the build machines)",
    },
    Tool {
        name: "OVMF",
        package: "ovmf",
        probe: Probe::File(OVMF_CODE),
        why: "UEFI firmware for the guest",
    },
    Tool {
        name: "mkfs.ext4",
        package: "e2fsprogs",
        probe: Probe::OnPath("mkfs.ext4"),
        why: "makes the guest's ARCHY-DATA disk",
    },
    Tool {
        name: "ssh",
        package: "openssh-client",
        probe: Probe::OnPath("ssh"),
        why: "logs into the installed node with a test key (also ssh-keygen, ssh-keyscan)",
    },
    Tool {
        name: "sfdisk",
        package: "fdisk",
        probe: Probe::OnPath("sfdisk"),
        why: "reads the table the installer wrote (sfdisk --json) and makes the ARCHY-CONF stick's",
    },
    Tool {
        name: "sgdisk",
        package: "gdisk",
        probe: Probe::OnPath("sgdisk"),
        why: "prints the installed disk's GPT (sgdisk -p) in the log",
    },
    Tool {
        name: "mkfs.vfat",
        package: "dosfstools",
        probe: Probe::OnPath("mkfs.vfat"),
        why: "the ARCHY-CONF stick's FAT file system",
    },
    Tool {
        name: "mcopy",
        package: "mtools",
        probe: Probe::OnPath("mcopy"),
        why: "copies the test key onto the ARCHY-CONF stick without mounting it",
    },
];

/// What the PyPI tools' virtual environments need (`harness/pytool.rs`:
/// zizmor in `cargo xtask test`, the SPDX validator in a unit test).
pub const PYTHON_VENV: &[Tool] = &[
    Tool {
        name: "python3",
        package: "python3",
        probe: Probe::OnPath("python3"),
        why: "runs zizmor's and the SPDX validator's virtual environments under target/",
    },
    Tool {
        name: "python3-venv",
        package: "python3-venv",
        // `python3 -m venv` fails without ensurepip, which this package adds.
        probe: Probe::Package,
        why: "`python3 -m venv` with pip, for those virtual environments",
    },
];

/// UEFI firmware (package ovmf): code, and variables each guest copies.
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// What `cargo xtask bench-iso` needs besides the rootfs and ISO tools.
pub const BENCH_ISO_STAGE: &[Tool] = &[Tool {
    name: "zstd",
    package: "zstd",
    probe: Probe::OnPath("zstd"),
    why: "compresses a tar of the rootfs, to compare the squashfs with",
}];

/// Where the test images take their busybox from (package busybox-static).
pub const STATIC_BUSYBOX: &str = "/bin/busybox";

const APT_INSTALL_FLAGS: &[&str] = &["install", "-y", "--no-install-recommends"];
const APT_LISTS_DIR: &str = "/var/lib/apt/lists";

impl Tool {
    pub fn is_present(&self, sh: &Shell) -> bool {
        match self.probe {
            Probe::OnPath(name) => find_on_path(name).is_some(),
            Probe::File(path) => Path::new(path).is_file(),
            Probe::Package => package_installed(sh, self.package),
        }
    }
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(SBIN_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

fn package_installed(sh: &Shell, package: &str) -> bool {
    let format = "-f=${db:Status-Abbrev}";
    let status = cmd!(sh, "dpkg-query -W {format} {package}")
        .quiet()
        .ignore_stderr()
        .read();
    // "ii " is installed; "rc " (removed, config left) and errors are not.
    matches!(status, Ok(s) if s.starts_with("ii"))
}

pub fn missing<'a>(sh: &Shell, tools: &'a [Tool]) -> Vec<&'a Tool> {
    tools.iter().filter(|t| !t.is_present(sh)).collect()
}

fn packages_of(tools: &[&Tool]) -> Vec<&'static str> {
    let mut packages: Vec<&'static str> = tools.iter().map(|t| t.package).collect();
    packages.sort_unstable();
    packages.dedup();
    packages
}

pub fn apt_install_line(packages: &[&str]) -> String {
    format!("apt-get {} {}", APT_INSTALL_FLAGS.join(" "), packages.join(" "))
}

/// Installs whatever `tools` lack, or fails with the command to run when
/// not root.
pub fn ensure(sh: &Shell, tools: &[Tool]) -> anyhow::Result<()> {
    let missing = missing(sh, tools);
    if missing.is_empty() {
        return Ok(());
    }
    let packages = packages_of(&missing);
    let names: Vec<&str> = missing.iter().map(|t| t.name).collect();
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "missing host tools: {}; install them as root with: {}",
            names.join(", "),
            apt_install_line(&packages)
        );
    }
    eprintln!(
        "xtask: installing missing host tools ({}): {}",
        names.join(", "),
        apt_install_line(&packages)
    );
    if !apt_lists_present() {
        apt_update(sh)?;
    }
    if let Err(first) = apt_install(sh, &packages) {
        eprintln!("xtask: apt-get install failed ({first:#}); updating the package lists and retrying");
        apt_update(sh)?;
        apt_install(sh, &packages)?;
    }
    let still_missing: Vec<&str> = self::missing(sh, tools).iter().map(|t| t.name).collect();
    if !still_missing.is_empty() {
        bail!(
            "after installing {}, these tools are still missing: {}",
            packages.join(" "),
            still_missing.join(", ")
        );
    }
    Ok(())
}

fn apt_lists_present() -> bool {
    std::fs::read_dir(APT_LISTS_DIR)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .any(|e| e.file_name().to_string_lossy().contains("_Packages"))
        })
        .unwrap_or(false)
}

fn apt_update(sh: &Shell) -> anyhow::Result<()> {
    cmd!(sh, "apt-get update")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .run()
        .context("running apt-get update")
}

fn apt_install(sh: &Shell, packages: &[&str]) -> anyhow::Result<()> {
    cmd!(sh, "apt-get {APT_INSTALL_FLAGS...} {packages...}")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .run()
        .with_context(|| format!("installing {}", packages.join(" ")))
}

/// Every stage and the tools it needs, as `cargo xtask doctor` lists them.
const DOCTOR_STAGES: &[(&str, &[Tool])] = &[
    ("test (cargo xtask test)", TEST_STAGE),
    ("images (cargo xtask images; only for apps with `build`)", IMAGES_STAGE),
    (
        "base-image (cargo xtask base-image, and images for the UIs)",
        BASE_IMAGE_STAGE,
    ),
    ("rootfs (cargo xtask rootfs, and iso)", ROOTFS_STAGE),
    ("iso (cargo xtask iso)", ISO_STAGE),
    ("e2e (cargo xtask e2e, and cargo xtask test)", E2E_STAGE),
    ("python venvs (zizmor in cargo xtask test)", PYTHON_VENV),
    (
        "bench-iso (cargo xtask bench-iso, with rootfs and iso)",
        BENCH_ISO_STAGE,
    ),
];

/// `cargo xtask doctor`: exit status 0 when every tool is present.
pub fn doctor() -> ExitCode {
    let sh = match Shell::new() {
        Ok(sh) => sh,
        Err(e) => {
            eprintln!("error: creating a shell: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (text, all_present) = doctor_report(DOCTOR_STAGES, |tool| tool.is_present(&sh));
    print!("{text}");
    if all_present {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The doctor's listing, given how to tell whether a tool is present;
/// true when every one is.
fn doctor_report(stages: &[(&str, &[Tool])], present: impl Fn(&Tool) -> bool) -> (String, bool) {
    use std::fmt::Write as _;
    let mut out = String::new();
    let mut all_missing = Vec::new();
    for (stage, tools) in stages {
        let _ = writeln!(out, "stage {stage}:");
        let _ = writeln!(out, "  {:<8} {:<16} {:<19} why", "status", "tool", "package");
        for tool in *tools {
            let ok = present(tool);
            if !ok {
                all_missing.push(tool);
            }
            let _ = writeln!(
                out,
                "  {:<8} {:<16} {:<19} {}",
                if ok { "ok" } else { "MISSING" },
                tool.name,
                tool.package,
                tool.why
            );
        }
    }
    if all_missing.is_empty() {
        out.push_str("all host tools are present\n");
    } else {
        let _ = writeln!(
            out,
            "install what is missing with:\n  {}",
            apt_install_line(&packages_of(&all_missing))
        );
    }
    (out, all_missing.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doctor_lists_every_stage_and_the_install_line_for_what_is_missing() {
        let missing = ["mksquashfs", "xorriso", "zstd"];
        let (text, ok) = doctor_report(DOCTOR_STAGES, |t| !missing.contains(&t.name));
        assert!(!ok);
        for (stage, _) in DOCTOR_STAGES {
            assert!(text.contains(&format!("stage {stage}:\n")), "{text}");
        }
        assert!(
            text.lines()
                .any(|l| l.starts_with("  MISSING  mksquashfs       squashfs-tools")),
            "{text}"
        );
        assert!(
            text.lines()
                .any(|l| l.starts_with("  ok       mmdebstrap       mmdebstrap")),
            "{text}"
        );
        assert!(
            text.ends_with(
                "install what is missing with:\n  apt-get install -y --no-install-recommends squashfs-tools xorriso zstd\n"
            ),
            "{text}"
        );

        let (text, ok) = doctor_report(DOCTOR_STAGES, |_| true);
        assert!(ok);
        assert!(text.ends_with("all host tools are present\n"), "{text}");
        assert!(!text.contains("MISSING"), "{text}");
    }

    #[test]
    fn install_line_names_each_package_once_in_order() {
        let tools: Vec<&Tool> = TEST_STAGE.iter().filter(|t| t.name != "podman").collect();
        let line = apt_install_line(&packages_of(&tools));
        assert!(line.starts_with("apt-get install -y --no-install-recommends aardvark-dns apache2-utils "));
        assert!(!line.contains(" podman"));
    }
}
