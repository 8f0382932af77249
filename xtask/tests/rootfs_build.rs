//! `cargo xtask rootfs` for real: mmdebstrap from Debian's archive (minutes
//! when target/cache has no base yet), then the checks a node depends on.
//! Needs root and the network, like the build itself; run through
//! `cargo xtask test`.

#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use common::{one_app_from_the_test_registry, sha256_hex, xtask, TestApp};
/// Tests that need the base run one at a time: the first builds it, the
/// others find it in the cache.
static BASE: Mutex<()> = Mutex::new(());
/// The base's cache key of the first finished build here. The builds differ
/// in agent, manifests, images and registry list, never in the base's
/// inputs, so every later one must find the same key, cached.
static FIRST_BASE_KEY: Mutex<Option<String>> = Mutex::new(None);

fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn scratch(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap()
}

/// A stand-in for the agent: this test binary is a real glibc-linked Rust
/// program that answers `--help`, without minutes of `cargo build --release`.
fn stand_in_agent() -> PathBuf {
    std::env::current_exe().unwrap()
}

fn chroot(tree: &Path, args: &[&str]) -> String {
    let output = Command::new("chroot").arg(tree).args(args).output().unwrap();
    assert!(
        output.status.success(),
        "chroot {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn value_in_table(text: &str, table: &str, key: &str) -> Option<String> {
    let mut current = "";
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            current = line.trim_matches(|c| c == '[' || c == ']');
        } else if current == table && !line.starts_with('#') {
            if let Some((k, v)) = line.split_once('=') {
                if k.trim() == key {
                    return Some(v.trim().to_owned());
                }
            }
        }
    }
    None
}

fn read_report(path: &Path) -> serde_json::Value {
    serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap()
}

/// Changing only the payload (agent, manifests, images, registry list)
/// reuses the cached base: the second build in this binary checks it.
fn check_base_is_shared(report: &serde_json::Value) {
    let key = report["inputs"]["rootfs_cache_key"].as_str().unwrap().to_owned();
    let note = report["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "rootfs-base")
        .and_then(|s| s["note"].as_str())
        .unwrap()
        .to_owned();
    let mut first = FIRST_BASE_KEY.lock().unwrap_or_else(|e| e.into_inner());
    match first.as_deref() {
        None => *first = Some(key),
        Some(first_key) => {
            assert_eq!(key, first_key, "only the payload changed, so the base's key must not");
            assert!(note.starts_with("cached"), "the base must come from the cache: {note}");
        }
    }
}

#[test]
fn the_rootfs_runs_debian_12s_netavark_with_the_netavark_backend() {
    let _base = BASE.lock().unwrap_or_else(|e| e.into_inner());
    let out = scratch("rootfs-test-");
    let agent = stand_in_agent();
    let built = xtask(&[
        "rootfs",
        "--no-images",
        "--out",
        out.path().to_str().unwrap(),
        "--agent",
        agent.to_str().unwrap(),
    ]);
    assert!(built.status.success(), "cargo xtask rootfs failed");
    let tree = out.path().join("tree");

    // netavark is Debian 12's own package, not a copy from the build host.
    assert_eq!(
        chroot(&tree, &["dpkg", "-S", "/usr/lib/podman/netavark"]).trim(),
        "netavark: /usr/lib/podman/netavark"
    );
    let version = chroot(&tree, &["dpkg-query", "-W", "-f=${Version}", "netavark"]);
    assert!(
        version.starts_with("1.4."),
        "bookworm ships netavark 1.4, the rootfs has {version}"
    );
    assert!(fs::read_to_string(tree.join("etc/debian_version"))
        .unwrap()
        .starts_with("12."));
    let aardvark = chroot(&tree, &["dpkg", "-S", "/usr/lib/podman/aardvark-dns"]);
    assert_eq!(aardvark.trim(), "aardvark-dns: /usr/lib/podman/aardvark-dns");

    let conf = fs::read_to_string(tree.join("etc/containers/containers.conf")).unwrap();
    assert_eq!(
        value_in_table(&conf, "network", "network_backend").as_deref(),
        Some("\"netavark\"")
    );
    assert_eq!(
        value_in_table(&conf, "engine", "exit_command_delay").as_deref(),
        Some("5")
    );
    let storage = fs::read_to_string(tree.join("etc/containers/storage.conf")).unwrap();
    assert_eq!(
        value_in_table(&storage, "storage", "graphroot").as_deref(),
        Some("\"/var/lib/archipelago/containers/storage\"")
    );

    let passwd = fs::read_to_string(tree.join("etc/passwd")).unwrap();
    assert!(
        passwd.lines().any(|l| l.starts_with("archipelago:x:1000:1000:")),
        "{passwd}"
    );
    for file in ["etc/subuid", "etc/subgid"] {
        assert_eq!(
            fs::read_to_string(tree.join(file)).unwrap(),
            "archipelago:100000:65536\n"
        );
    }

    // The agent, its enabled unit and the manifests.
    assert_eq!(
        fs::read(tree.join("usr/bin/archy-agent")).unwrap(),
        fs::read(&agent).unwrap()
    );
    let unit = fs::read_to_string(tree.join("usr/lib/systemd/system/archy-agent.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/archy-agent boot"), "{unit}");
    // What issue 4 asks of the unit: READY after the first pass, a watchdog,
    // restarts on failure, and a start timeout long enough for a slow first boot.
    for line in [
        "Type=notify",
        "WatchdogSec=2min",
        "Restart=on-failure",
        "TimeoutStartSec=1h",
    ] {
        assert!(unit.lines().any(|l| l == line), "{line} missing from\n{unit}");
    }
    // Rootless: the agent runs as archipelago, against that user's socket.
    for line in [
        "User=archipelago",
        "Environment=ARCHY_ENGINE=/run/user/1000/podman/podman.sock",
    ] {
        assert!(unit.lines().any(|l| l == line), "{line} missing from\n{unit}");
    }
    assert!(
        tree.join("var/lib/systemd/linger/archipelago").is_file(),
        "lingering starts the user's systemd at boot"
    );
    assert_eq!(
        fs::read_link(tree.join("etc/systemd/user/sockets.target.wants/podman.socket")).unwrap(),
        Path::new("/usr/lib/systemd/user/podman.socket")
    );
    // Root's own Podman never runs on a rootless node: it would take the
    // container storage folder.
    for unit in ["podman.socket", "podman.service", "podman-restart.service"] {
        assert_eq!(
            fs::read_link(tree.join("etc/systemd/system").join(unit)).unwrap(),
            Path::new("/dev/null"),
            "{unit} is masked"
        );
    }
    assert_eq!(
        value_in_table(&storage, "storage", "rootless_storage_path").as_deref(),
        Some("\"/var/lib/archipelago/containers/rootless\"")
    );
    // systemd of the rootfs itself parses them: a typo only warns (exit 0),
    // so any output at all fails the test.
    // With the drop-ins of Debian's units (their Documentation= man pages
    // are left out of the image: --man=no).
    let verify = Command::new("chroot")
        .arg(&tree)
        .args(["systemd-analyze", "verify", "--man=no"])
        .args(NODE_UNITS.iter().map(|(unit, _)| *unit))
        .args([
            "ssh.service",
            "getty@tty1.service",
            "serial-getty@ttyS0.service",
            "user@1000.service",
            // The OS helper's template, as one instance of it, and RAUC with its drop-in.
            "archy-os@0.service",
            "rauc.service",
        ])
        .output()
        .unwrap();
    assert!(
        verify.status.success() && verify.stderr.is_empty() && verify.stdout.is_empty(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    for (unit, target) in NODE_UNITS {
        assert_eq!(
            fs::read_link(tree.join(format!("etc/systemd/system/{target}.wants")).join(unit)).unwrap(),
            Path::new("/usr/lib/systemd/system").join(unit),
            "{unit} is enabled in {target}"
        );
    }
    check_install_mode_and_ssh(&tree);
    // A release on trial: boot-complete.target requires the check, which
    // reboots cleanly on failure (never reboot-force: the failure just
    // written must reach the disk), and a hung check reboots after 20 min.
    let complete = unit_lines(&tree, "boot-complete.target");
    for line in [
        "Requires=archy-boot-check.service",
        "JobTimeoutSec=20min",
        "JobTimeoutAction=reboot",
    ] {
        assert!(complete.iter().any(|l| l == line), "boot-complete.target lacks {line}");
    }
    let check = unit_lines(&tree, "archy-boot-check.service");
    assert!(check.iter().any(|l| l == "FailureAction=reboot"));
    assert!(!check.iter().any(|l| l.contains("reboot-force")));
    let prepare = unit_lines(&tree, "archy-os-prepare.service");
    assert!(prepare.iter().any(|l| l == "ConditionKernelCommandLine=rauc.slot"));
    assert!(prepare
        .iter()
        .any(|l| l.starts_with("Before=") && l.contains("archy-agent.service") && l.contains("rauc.service")));
    for app in fs::read_dir(project_root().join("manifests")).unwrap() {
        let app = app.unwrap().file_name();
        let copied = tree.join("opt/archipelago/apps").join(&app).join("manifest.yml");
        let original = project_root().join("manifests").join(&app).join("manifest.yml");
        assert_eq!(
            fs::read(&copied).unwrap(),
            fs::read(&original).unwrap(),
            "{}",
            copied.display()
        );
    }

    // No documentation but the copyright files, no man pages.
    let man = tree.join("usr/share/man");
    assert!(!man.exists() || fs::read_dir(&man).unwrap().all(|e| e.unwrap().path().is_dir()));
    assert!(tree.join("usr/share/doc/podman/copyright").is_file());
    assert!(!tree.join("usr/share/doc/podman/changelog.Debian.gz").exists());

    let report = read_report(&out.path().join("rootfs-report.json"));
    let packages = report["packages"].as_array().unwrap();
    assert!(packages
        .iter()
        .any(|p| p["name"] == "netavark" && p["version"].as_str() == Some(version.as_str())));
    assert!(packages.len() > 100, "{} packages", packages.len());
    check_base_is_shared(&report);
}

/// The node's own units and the target each is enabled in.
const NODE_UNITS: &[(&str, &str)] = &[
    ("archy-medium.service", "sysinit.target"),
    ("archy-data.service", "multi-user.target"),
    ("archy-apps.service", "multi-user.target"),
    ("archy-agent.service", "multi-user.target"),
    ("archy-ssh.service", "multi-user.target"),
    ("archy-installer.service", "multi-user.target"),
    ("archy-os.socket", "sockets.target"),
    // OS updates (issue 16): boot-prepare, the trial's check (also required
    // by boot-complete.target's drop-in) and the commit.
    ("archy-os-prepare.service", "multi-user.target"),
    ("archy-boot-check.service", "boot-complete.target"),
    ("archy-mark-good.service", "multi-user.target"),
];

/// The lines of a unit's file and of its drop-ins (the instance's and the
/// template's) in the tree, where systemd reads them (`systemctl cat` needs
/// a running systemd).
fn unit_lines(tree: &Path, unit: &str) -> Vec<String> {
    let template = unit
        .split_once('@')
        .map(|(prefix, rest)| format!("{prefix}@.{}", rest.rsplit('.').next().unwrap()));
    let file_name = template.clone().unwrap_or_else(|| unit.to_owned());
    let mut text = ["usr/lib/systemd/system", "lib/systemd/system", "etc/systemd/system"]
        .iter()
        .find_map(|dir| fs::read_to_string(tree.join(dir).join(&file_name)).ok())
        .unwrap_or_else(|| panic!("no unit file for {unit}"));
    for name in std::iter::once(unit.to_owned()).chain(template) {
        let dir = tree.join("etc/systemd/system").join(format!("{name}.d"));
        for entry in fs::read_dir(&dir).into_iter().flatten() {
            text.push_str(&fs::read_to_string(entry.unwrap().path()).unwrap());
        }
    }
    text.lines().map(|l| l.trim().to_owned()).collect()
}

/// Install mode, the installer's console, SSH, mDNS and the appliance's
/// timers, in the built tree.
fn check_install_mode_and_ssh(tree: &Path) {
    // Install mode starts neither the data disk nor anything on it; a
    // skipped condition counts as started for dependents, so each unit
    // (or its drop-in) carries the condition itself. The gettys too: the
    // installer owns the console.
    let not_in_install_mode = "ConditionKernelCommandLine=!archipelago.install";
    for unit in [
        "archy-data.service",
        "archy-agent.service",
        "archy-apps.service",
        "archy-ssh.service",
        "ssh.service",
        "user@1000.service",
        "getty@tty1.service",
        "serial-getty@ttyS0.service",
    ] {
        let lines = unit_lines(tree, unit);
        assert!(lines.iter().any(|l| l == not_in_install_mode), "{unit}: {lines:#?}");
    }
    let installer = unit_lines(tree, "archy-installer.service");
    for line in [
        "ConditionKernelCommandLine=archipelago.install",
        "ExecStart=/usr/bin/archy-agent os install --cmdline /proc/cmdline",
        "TTYPath=/dev/console",
        "SuccessAction=poweroff",
        "FailureAction=poweroff",
    ] {
        assert!(installer.iter().any(|l| l == line), "{line}: {installer:#?}");
    }
    let medium = unit_lines(tree, "archy-medium.service");
    for line in [
        "ConditionKernelCommandLine=archipelago.slot",
        "DefaultDependencies=no",
        "ExecStart=/usr/bin/archy-agent os check-medium --cmdline /proc/cmdline",
    ] {
        assert!(medium.iter().any(|l| l == line), "{line}: {medium:#?}");
    }
    let ssh = unit_lines(tree, "ssh.service");
    for line in ["Requires=archy-ssh.service", "After=archy-ssh.service"] {
        assert!(ssh.iter().any(|l| l == line), "{line}: {ssh:#?}");
    }
    assert_eq!(
        fs::read_link(tree.join("etc/systemd/system/multi-user.target.wants/ssh.service")).unwrap(),
        Path::new("/lib/systemd/system/ssh.service"),
        "openssh-server enables sshd"
    );

    // The tools the installer runs, from Debian's packages.
    for tool in [
        "sfdisk",
        "mkfs.vfat",
        "mkfs.ext4",
        "grub-install",
        "grub-editenv",
        "wipefs",
        "partx",
        "udevadm",
        "sshd",
        "ssh-keygen",
    ] {
        chroot(tree, &["sh", "-c", &format!("command -v {tool}")]);
    }
    for platform in ["i386-pc", "x86_64-efi"] {
        assert!(
            tree.join("usr/lib/grub").join(platform).join("normal.mod").is_file(),
            "GRUB's {platform} modules"
        );
    }

    // No host key: each node makes its own.
    let host_keys: Vec<_> = fs::read_dir(tree.join("etc/ssh"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("ssh_host_"))
        .collect();
    assert!(host_keys.is_empty(), "{host_keys:?}");
    let shadow = fs::read_to_string(tree.join("etc/shadow")).unwrap();
    assert!(
        shadow.lines().any(|l| l.starts_with("archipelago:*:")),
        "a password field that sshd never takes for a lock"
    );
    // sshd's own reading of its configuration, with a throwaway key (the
    // node's lives on its data disk).
    let scratch_key = tree.join("tmp/scratch_host_key");
    let _ = fs::remove_file(&scratch_key);
    chroot(
        tree,
        &[
            "ssh-keygen",
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-f",
            "/tmp/scratch_host_key",
        ],
    );
    fs::create_dir_all(tree.join("run/sshd")).unwrap();
    let effective = Command::new("chroot")
        .arg(tree)
        .args(["/usr/sbin/sshd", "-T", "-h", "/tmp/scratch_host_key"])
        .output()
        .unwrap();
    let effective_text = String::from_utf8_lossy(&effective.stdout).into_owned();
    for file in ["tmp/scratch_host_key", "tmp/scratch_host_key.pub"] {
        fs::remove_file(tree.join(file)).unwrap();
    }
    fs::remove_dir(tree.join("run/sshd")).unwrap();
    assert!(
        effective.status.success(),
        "sshd -T: {}",
        String::from_utf8_lossy(&effective.stderr)
    );
    for line in [
        "passwordauthentication no",
        "kbdinteractiveauthentication no",
        "permitrootlogin no",
        "allowusers archipelago",
        "authorizedkeysfile /var/lib/archipelago/ssh/authorized_keys",
        "hostkey /var/lib/archipelago/system/ssh/ssh_host_ed25519_key",
        "usepam yes",
    ] {
        assert!(
            effective_text.lines().any(|l| l == line),
            "{line} missing from sshd -T:\n{effective_text}"
        );
    }

    // The console text part C writes in /run/issue.d is what the rootfs's
    // own agetty shows (it reads /etc/issue.d, linked to it), with the
    // address escape expanded; without the file, nothing of it shows.
    let issue_dir = tree.join("run/issue.d");
    fs::create_dir_all(&issue_dir).unwrap();
    fs::write(
        issue_dir.join("50-archipelago.issue"),
        "ssh archipelago@\\4 (issue test)\n",
    )
    .unwrap();
    // And the OS's line (os boot-prepare: a rollback, a trial).
    fs::write(
        issue_dir.join("40-archipelago-os.issue"),
        "Archipelago OS: rolled back (os issue test)\n",
    )
    .unwrap();
    let shown = show_issue(tree);
    assert!(shown.contains("(os issue test)"), "{shown}");
    fs::remove_dir_all(&issue_dir).unwrap();
    let line = shown
        .lines()
        .find(|l| l.contains("(issue test)"))
        .unwrap_or_else(|| panic!("agetty does not show the console text:\n{shown}"));
    assert!(!line.contains('\\'), "agetty expands \\4: {line}");
    let shown = show_issue(tree);
    assert!(shown.contains("Debian GNU/Linux 12"), "/etc/issue: {shown}");
    assert!(!shown.contains("issue test"), "{shown}");

    // mDNS on the wired links (archipelago.local).
    let resolved = fs::read_to_string(tree.join("etc/systemd/resolved.conf.d/archipelago.conf")).unwrap();
    assert!(resolved.lines().any(|l| l == "MulticastDNS=yes"), "{resolved}");
    let network = fs::read_to_string(tree.join("etc/systemd/network/80-wired.network")).unwrap();
    assert!(network.lines().any(|l| l == "MulticastDNS=yes"), "{network}");
    assert_eq!(fs::read_to_string(tree.join("etc/hostname")).unwrap(), "archipelago\n");

    // An appliance: apt and dpkg run nothing on their own.
    for unit in ["apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer"] {
        assert_eq!(
            fs::read_link(tree.join("etc/systemd/system").join(unit)).unwrap(),
            Path::new("/dev/null"),
            "{unit} is masked"
        );
    }
}

/// What the tree's own agetty prints above a login prompt. agetty needs a
/// terminal: the host's `script` makes one (the tree has no /dev/pts), the
/// chrooted agetty inherits it.
fn show_issue(tree: &Path) -> String {
    let output = Command::new("script")
        .arg("-qc")
        .arg(format!("chroot {} agetty --show-issue", tree.display()))
        .arg("/dev/null")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "agetty --show-issue: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// A rootfs that enables a timer `rootfs/timers.allow` does not list is
/// refused, naming the timer and the list.
#[test]
fn a_timer_not_on_the_allow_list_stops_the_build() {
    let _base = BASE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("rootfs-timer-");
    let overlay = dir.path().join("overlay");
    let wants = overlay.join("etc/systemd/system/timers.target.wants");
    fs::create_dir_all(&wants).unwrap();
    std::os::unix::fs::symlink("/lib/systemd/system/apt-daily.timer", wants.join("stray-daily.timer")).unwrap();
    let out = dir.path().join("out");
    let agent = stand_in_agent();
    let built = xtask(&[
        "rootfs",
        "--no-images",
        "--overlay",
        overlay.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--agent",
        agent.to_str().unwrap(),
    ]);
    assert!(!built.status.success(), "a stray timer must fail the build");
    let stderr = String::from_utf8_lossy(&built.stderr);
    assert!(
        stderr.contains("stray-daily.timer (enabled for the system's systemd by /etc/systemd/system/timers.target.wants/stray-daily.timer)"),
        "{stderr}"
    );
    assert!(stderr.contains("rootfs/timers.allow does not allow"), "{stderr}");
    assert!(
        !stderr.contains("apt-daily.timer (enabled"),
        "apt's own timer is masked: {stderr}"
    );
}

#[test]
fn pre_pulled_images_and_the_registry_list_land_in_the_rootfs_and_the_report() {
    let _base = BASE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("rootfs-images-");
    let TestApp {
        manifests,
        registries,
        image,
    } = one_app_from_the_test_registry(dir.path(), "pinned-app");
    let images = dir.path().join("images");
    let pulled = xtask(&[
        "images",
        "--manifests",
        manifests.to_str().unwrap(),
        "--registries",
        registries.to_str().unwrap(),
        "--out",
        images.to_str().unwrap(),
        "--cache",
        dir.path().join("blobs").to_str().unwrap(),
    ]);
    assert!(pulled.status.success(), "cargo xtask images failed");
    let lock_bytes = fs::read(images.join("images.lock.json")).unwrap();
    let lock: serde_json::Value = serde_json::from_slice(&lock_bytes).unwrap();

    // Another agent binary than the other tests embed: the same program
    // with bytes appended, which the ELF loader ignores.
    let mut agent_bytes = fs::read(stand_in_agent()).unwrap();
    agent_bytes.extend_from_slice(b"another agent build");
    let agent = dir.path().join("archy-agent");
    fs::write(&agent, &agent_bytes).unwrap();

    let out = dir.path().join("out");
    let built = xtask(&[
        "rootfs",
        "--manifests",
        manifests.to_str().unwrap(),
        "--images",
        images.to_str().unwrap(),
        "--registries",
        registries.to_str().unwrap(),
        "--agent",
        agent.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(built.status.success(), "cargo xtask rootfs failed");
    let tree = out.join("tree");

    let node_images = tree.join("usr/share/archipelago/images");
    assert_eq!(fs::read(node_images.join("images.lock.json")).unwrap(), lock_bytes);
    let entry = &lock["images"][0];
    assert_eq!(entry["app"], "pinned-app");
    let archive = fs::read(node_images.join(entry["archive"].as_str().unwrap())).unwrap();
    assert_eq!(sha256_hex(&archive), entry["archive_sha256"].as_str().unwrap());
    assert_eq!(
        archive,
        fs::read(images.join("pinned-app.tar")).unwrap(),
        "the archive is the one `cargo xtask images` wrote"
    );
    let node_registries = tree.join("var/lib/archipelago/config/registries.json");
    assert_eq!(fs::read(&node_registries).unwrap(), fs::read(&registries).unwrap());
    assert_eq!(
        fs::metadata(&node_registries).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        fs::read(tree.join("opt/archipelago/apps/pinned-app/manifest.yml")).unwrap(),
        fs::read(manifests.join("pinned-app/manifest.yml")).unwrap()
    );
    assert_eq!(fs::read(tree.join("usr/bin/archy-agent")).unwrap(), agent_bytes);

    let report = read_report(&out.join("rootfs-report.json"));
    let images_in_report = report["images"].as_array().unwrap();
    assert_eq!(images_in_report.len(), 1, "{report}");
    for field in [
        "app",
        "reference",
        "manifest_digest",
        "config_digest",
        "archive_sha256",
        "size",
    ] {
        assert_eq!(images_in_report[0][field], entry[field], "report field {field}");
    }
    assert_eq!(images_in_report[0]["reference"], image.as_str());
    assert_eq!(report["inputs"]["images_lock_sha256"], sha256_hex(&lock_bytes).as_str());
    assert_eq!(report["inputs"]["agent"]["sha256"], sha256_hex(&agent_bytes).as_str());
    check_base_is_shared(&report);
}

#[test]
fn an_agent_built_for_a_newer_glibc_is_refused_with_the_reason() {
    let _base = BASE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("rootfs-glibc-");
    // This binary, as a build against a future glibc would have it.
    let mut bytes = fs::read(stand_in_agent()).unwrap();
    let at = bytes.windows(12).position(|w| w == b"GLIBC_2.2.5\0").unwrap();
    bytes[at + 6] = b'9';
    let agent = dir.path().join("archy-agent");
    fs::write(&agent, bytes).unwrap();
    let out = dir.path().join("out");
    let built = xtask(&[
        "rootfs",
        "--no-images",
        "--out",
        out.to_str().unwrap(),
        "--agent",
        agent.to_str().unwrap(),
    ]);
    assert!(!built.status.success());
    let stderr = String::from_utf8_lossy(&built.stderr);
    assert!(stderr.contains("refusing to embed"), "{stderr}");
    assert!(stderr.contains("needs glibc 9.2.5"), "{stderr}");
    assert!(stderr.contains("ships glibc 2.36"), "{stderr}");
    assert!(!out.join("tree").exists(), "nothing was assembled");
}

#[test]
fn invalid_manifests_stop_the_build_with_the_validators_errors() {
    let dir = scratch("rootfs-manifests-");
    let apps = dir.path().join("apps");
    let broken = apps.join("broken");
    fs::create_dir_all(&broken).unwrap();
    fs::write(
        broken.join("manifest.yml"),
        "id: broken\nname: Broken\nversion: \"1\"\nkind: service\nimage: nginx:latest\n",
    )
    .unwrap();
    let built = xtask(&[
        "rootfs",
        "--no-images",
        "--manifests",
        apps.to_str().unwrap(),
        "--out",
        dir.path().join("out").to_str().unwrap(),
    ]);
    assert!(!built.status.success());
    let stderr = String::from_utf8_lossy(&built.stderr);
    assert!(stderr.contains("are invalid"), "{stderr}");
    assert!(stderr.contains("broken/manifest.yml"), "{stderr}");
    assert!(
        stderr.contains("image"),
        "the validator's error names the field: {stderr}"
    );
    assert!(
        !stderr.contains("mmdebstrap"),
        "it stops before building anything: {stderr}"
    );
}

#[test]
fn arm64_is_refused_for_now() {
    let built = xtask(&["rootfs", "--arch", "arm64"]);
    assert!(!built.status.success());
    let stderr = String::from_utf8_lossy(&built.stderr);
    assert!(stderr.contains("arm64 is not supported yet"), "{stderr}");
}

#[test]
fn a_missing_images_folder_stops_the_build_before_anything_is_built() {
    let dir = scratch("rootfs-no-images-");
    let missing = dir.path().join("no-such-images");
    let built = xtask(&[
        "rootfs",
        "--images",
        missing.to_str().unwrap(),
        "--out",
        dir.path().join("out").to_str().unwrap(),
    ]);
    assert!(!built.status.success());
    let stderr = String::from_utf8_lossy(&built.stderr);
    assert!(
        stderr.contains(&format!("--images {}: no such folder", missing.display())),
        "{stderr}"
    );
    assert!(
        !stderr.contains("mmdebstrap"),
        "it stops before building anything: {stderr}"
    );

    let both = xtask(&["rootfs", "--images", missing.to_str().unwrap(), "--no-images"]);
    assert!(!both.status.success());
    let stderr = String::from_utf8_lossy(&both.stderr);
    assert!(stderr.contains("cannot be used with"), "{stderr}");
}

#[test]
fn a_registry_list_with_a_login_stops_rootfs_and_iso_before_anything_is_built() {
    const SECRET: &str = "pw-that-must-stay-home-31";
    let dir = scratch("rootfs-login-");
    let bad = dir.path().join("bad.json");
    fs::write(
        &bad,
        format!(
            r#"{{"version": 1, "registries": [{{"name": "lan", "url": "https://mirror.lan:5000", "priority": 10, "auth": {{"username": "me", "password": "{SECRET}"}}}}]}}"#
        ),
    )
    .unwrap();
    for stage in ["rootfs", "iso"] {
        let out = dir.path().join(format!("out-{stage}"));
        let built = xtask(&[
            stage,
            "--registries",
            bad.to_str().unwrap(),
            "--no-images",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(!built.status.success(), "{stage} must refuse");
        let stdout = String::from_utf8_lossy(&built.stdout);
        let stderr = String::from_utf8_lossy(&built.stderr);
        for part in [
            bad.display().to_string().as_str(),
            "`lan`",
            "field `auth`",
            "--password-stdin",
        ] {
            assert!(stderr.contains(part), "{stage}: missing {part:?} in {stderr}");
        }
        // No stage but the input checks started (host tools may be
        // installed before, as for any build).
        let stages: Vec<&str> = stderr
            .lines()
            .chain(stdout.lines())
            .filter_map(|l| l.strip_prefix("xtask: ["))
            .filter_map(|l| l.split_once(']').map(|(name, _)| name))
            .collect();
        assert!(
            stages.iter().all(|s| *s == "inputs"),
            "{stage}: it stops before building anything: {stages:?}\n{stderr}"
        );
        assert!(
            !stdout.contains(SECRET) && !stderr.contains(SECRET),
            "{stage}: the password leaked"
        );
        let reports: Vec<_> = walk(&out)
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        assert!(reports.is_empty(), "{stage}: no report is written: {reports:?}");
    }
}

/// Every file under `dir` (none when it does not exist).
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}
