//! `cargo xtask rootfs` for real: mmdebstrap from Debian's archive (minutes
//! when target/cache has no base yet), then the checks a node depends on.
//! Needs root and the network, like the build itself; run through
//! `cargo xtask test`.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

/// The same value in iso_build.rs, so that both share one cached base.
const EPOCH: &str = "1700000000";
/// Tests that need the base run one at a time: the first builds it, the
/// others find it in the cache.
static BASE: Mutex<()> = Mutex::new(());

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

fn xtask(args: &[&str]) -> Output {
    let output = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .env("SOURCE_DATE_EPOCH", EPOCH)
        .output()
        .unwrap();
    eprintln!(
        "$ xtask {}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    output
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
    assert_eq!(
        value_in_table(&storage, "storage", "rootless_storage_path").as_deref(),
        Some("\"/var/lib/archipelago/containers/rootless\"")
    );
    assert_eq!(
        fs::read_link(tree.join("etc/systemd/system/multi-user.target.wants/archy-data.service")).unwrap(),
        Path::new("/usr/lib/systemd/system/archy-data.service")
    );
    // systemd of the rootfs itself parses them: a typo only warns (exit 0),
    // so any output at all fails the test.
    let verify = Command::new("chroot")
        .arg(&tree)
        .args(["systemd-analyze", "verify", "archy-data.service", "archy-agent.service"])
        .output()
        .unwrap();
    assert!(
        verify.status.success() && verify.stderr.is_empty() && verify.stdout.is_empty(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    assert_eq!(
        fs::read_link(tree.join("etc/systemd/system/multi-user.target.wants/archy-agent.service")).unwrap(),
        Path::new("/usr/lib/systemd/system/archy-agent.service")
    );
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

    let report: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(out.path().join("rootfs-report.json")).unwrap()).unwrap();
    let packages = report["packages"].as_array().unwrap();
    assert!(packages
        .iter()
        .any(|p| p["name"] == "netavark" && p["version"].as_str() == Some(version.as_str())));
    assert!(packages.len() > 100, "{} packages", packages.len());
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
