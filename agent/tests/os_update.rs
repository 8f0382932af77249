//! `archy-agent os update` against the real RAUC 1.8 (Debian's `rauc`,
//! `rauc-service`), on loop devices: a private dbus-daemon built from
//! Debian's own system.conf with our policy file in place of
//! /etc/dbus-1/system.d, `rauc service` on it with a system.conf rendered
//! by `os::update::rauc_conf`, our pre/post-install handlers (the real
//! `archy-agent os rauc-pre-install|rauc-post-install`), the root helper
//! served one connection at a time as archy-os.socket does (Accept=yes,
//! the connection as its stdin), and the CLI `os update` as the agent runs
//! it. Bundles are made here with `rauc bundle` and openssl keys.
//!
//! The bootloader backend is a small sh script (state in files), not
//! `archy-agent os rauc-backend`, which `tests/grub_boot.rs` drives with
//! RAUC itself.
//!
//! Needs root (loop devices, mounts), rauc and rauc-service, dbus-daemon
//! (dbus-daemon), dbus-send (dbus-bin), openssl, mksquashfs
//! (squashfs-tools), mkfs.ext4 (e2fsprogs), losetup and setpriv
//! (util-linux).

#![allow(clippy::unwrap_used)]

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use archy_agent::os::release::{Release, LIVE_FILES};
use archy_agent::os::update::rauc_conf::{self, RaucConf};
use sha2::{Digest, Sha256};

const AGENT: &str = env!("CARGO_BIN_EXE_archy-agent");
/// The agent's path in the image, as the rootfs's RAUC wrappers name it.
const NODE_AGENT: &str = "/usr/bin/archy-agent";
const BOOTED_VERSION: &str = "0.2.0";

fn need_tools() {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0")),
        "os_update needs root: loop devices, mounts and RAUC's service"
    );
    for (tool, package) in [
        ("rauc", "rauc (and rauc-service)"),
        ("dbus-daemon", "dbus-daemon"),
        ("dbus-send", "dbus-bin"),
        ("openssl", "openssl"),
        ("mksquashfs", "squashfs-tools"),
        ("mkfs.ext4", "e2fsprogs"),
        ("losetup", "util-linux"),
        ("setpriv", "util-linux"),
    ] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        assert!(found, "{tool} is missing: apt-get install {package}");
    }
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn sha256_of(path: &Path) -> String {
    let mut f = fs::File::open(path).unwrap();
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).unwrap();
    format!("{:x}", h.finalize())
}

/// Everything started for the test, stopped and detached on drop.
struct Rig {
    dir: tempfile::TempDir,
    loops: Vec<PathBuf>,
    children: Vec<Child>,
    bus: String,
}

impl Drop for Rig {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for l in &self.loops {
            let _ = Command::new("losetup").arg("-d").arg(l).status();
        }
    }
}

impl Rig {
    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }
    fn slot_b(&self) -> &Path {
        &self.loops[1]
    }
    fn backend_file(&self, name: &str) -> String {
        fs::read_to_string(self.path("bootenv").join(name))
            .unwrap_or_default()
            .trim()
            .to_owned()
    }
}

/// A key and a self-signed certificate under `dir/<name>.{key,cert}.pem`.
fn keypair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let key = dir.join(format!("{name}.key.pem"));
    let cert = dir.join(format!("{name}.cert.pem"));
    run(Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650"])
        .arg("-subj")
        .arg(format!("/CN=archipelago test {name}"))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert));
    (key, cert)
}

/// Debian's own /usr/share/dbus-1/system.conf, listening at `socket`,
/// not forking, with our rootfs's policy folder where /etc/dbus-1/system.d
/// is read: the precedence a node has.
fn bus_config(socket: &Path) -> String {
    let debian = fs::read_to_string("/usr/share/dbus-1/system.conf").unwrap();
    let ours = Path::new(env!("CARGO_MANIFEST_DIR")).join("../rootfs/overlay/etc/dbus-1/system.d");
    let mut conf = debian.clone();
    for (from, to) in [
        ("<user>messagebus</user>", String::new()),
        ("<fork/>", String::new()),
        ("<pidfile>/run/dbus/pid</pidfile>", String::new()),
        (
            "<listen>unix:path=/run/dbus/system_bus_socket</listen>",
            format!("<listen>unix:path={}</listen>", socket.display()),
        ),
        (
            "<includedir>system.d</includedir>",
            "<includedir>/usr/share/dbus-1/system.d</includedir>".to_owned(),
        ),
        (
            "<includedir>/etc/dbus-1/system.d</includedir>",
            format!("<includedir>{}</includedir>", ours.canonicalize().unwrap().display()),
        ),
        (
            "<include ignore_missing=\"yes\">/etc/dbus-1/system.conf</include>",
            String::new(),
        ),
        (
            "<include ignore_missing=\"yes\">/etc/dbus-1/system-local.conf</include>",
            String::new(),
        ),
    ] {
        assert!(conf.contains(from), "Debian's system.conf no longer has {from}");
        conf = conf.replace(from, &to);
    }
    // Debian's allow-all file is read first, ours after it.
    assert!(conf.find("/usr/share/dbus-1/system.d").unwrap() < conf.find("rootfs/overlay").unwrap());
    conf
}

const BACKEND: &str = r#"#!/bin/sh
# A test bootloader backend (RAUC 1.8's custom interface): the primary
# slot, unless marked bad, and each slot's state, in files.
d="$(dirname "$0")/bootenv"
other() { [ "$1" = A ] && echo B || echo A; }
echo "$*" >> "$d/log"
case "$1" in
  get-primary)
    p=$(cat "$d/primary" 2>/dev/null || echo A)
    [ "$(cat "$d/state.$p" 2>/dev/null)" = bad ] && p=$(other "$p")
    echo "$p" ;;
  set-primary) echo "$2" > "$d/primary"; echo good > "$d/state.$2" ;;
  get-state) cat "$d/state.$2" 2>/dev/null || echo good ;;
  set-state) echo "$3" > "$d/state.$2" ;;
  *) echo "unknown: $*" >&2; exit 1 ;;
esac
"#;

fn setup() -> Rig {
    need_tools();
    let dir = tempfile::tempdir().unwrap();
    // `nobody` must reach the bus socket for the policy check.
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let mut rig = Rig {
        dir,
        loops: Vec::new(),
        children: Vec::new(),
        bus: String::new(),
    };
    for name in ["a.img", "b.img"] {
        let img = rig.path(name);
        fs::File::create(&img).unwrap().set_len(48 << 20).unwrap();
        let out = run(Command::new("losetup").args(["--find", "--show"]).arg(&img));
        let dev = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        rig.loops.push(dev.clone());
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&dev));
    }
    for d in ["bootenv", "run", "booted", "mnt", "data/system/os"] {
        fs::create_dir_all(rig.path(d)).unwrap();
    }
    // The booted release (slot A's), as the live medium would hold it.
    let booted = Release {
        version: BOOTED_VERSION.into(),
        architecture: "amd64".into(),
        files: LIVE_FILES.iter().map(|f| (f.to_string(), "0".repeat(64))).collect(),
    };
    fs::write(rig.path("booted/release.json"), booted.to_file_bytes().unwrap()).unwrap();
    let backend = rig.path("backend.sh");
    fs::write(&backend, BACKEND).unwrap();
    fs::set_permissions(&backend, fs::Permissions::from_mode(0o755)).unwrap();
    // The post-install wrapper can damage the written slot first (when
    // the file `damage-slot` exists), as a disk that wrote badly would.
    let damage = format!(
        "if [ -e {marker} ]; then mount -t ext4 {dev} {at} && printf x >> {at}/live/vmlinuz && umount {at}; fi\n",
        marker = rig.path("damage-slot").display(),
        dev = rig.loops[1].display(),
        at = rig.path("damage").display(),
    );
    fs::create_dir_all(rig.path("damage")).unwrap();
    // RAUC runs the image's own wrappers (rootfs/overlay), with the agent
    // they exec replaced by a shim that adds the test's folders: what RAUC
    // passes them reaches the agent as on a node.
    for (name, wrapper, before) in [
        ("pre-install.sh", "rauc-pre-install", String::new()),
        ("post-install.sh", "rauc-post-install", damage),
    ] {
        let shim = rig.path(&format!("{name}.agent"));
        fs::write(
            &shim,
            format!(
                "#!/bin/sh\n{before}exec {AGENT} \"$@\" --run-dir {} --booted-release {}\n",
                rig.path("run").display(),
                rig.path("booted/release.json").display()
            ),
        )
        .unwrap();
        let image_wrapper = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../rootfs/overlay/usr/lib/archipelago")
            .join(wrapper);
        let text = fs::read_to_string(&image_wrapper).unwrap();
        assert!(text.contains(NODE_AGENT), "{}: {text}", image_wrapper.display());
        let p = rig.path(name);
        fs::write(&p, text.replace(NODE_AGENT, &shim.display().to_string())).unwrap();
        for f in [&p, &shim] {
            fs::set_permissions(f, fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
    let (_, good_cert) = keypair(rig.dir.path(), "good");
    keypair(rig.dir.path(), "other");
    let conf = RaucConf {
        arch: "amd64".into(),
        slot_a: rig.loops[0].clone(),
        slot_b: rig.loops[1].clone(),
        statusfile: rig.path("data/system/os/rauc.status"),
        keyring: good_cert,
        backend,
        pre_install: rig.path("pre-install.sh"),
        post_install: rig.path("post-install.sh"),
    };
    fs::write(rig.path("system.conf"), rauc_conf::render(&conf).unwrap()).unwrap();

    // The bus, then RAUC's service on it (booted from A).
    let socket = rig.path("bus/system_bus_socket");
    fs::create_dir_all(socket.parent().unwrap()).unwrap();
    fs::set_permissions(socket.parent().unwrap(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(rig.path("bus.conf"), bus_config(&socket)).unwrap();
    let daemon = Command::new("dbus-daemon")
        .arg(format!("--config-file={}", rig.path("bus.conf").display()))
        .arg("--nofork")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    rig.children.push(daemon);
    rig.bus = format!("unix:path={}", socket.display());
    wait_for(|| socket.exists(), "the dbus-daemon's socket");
    let service = Command::new("rauc")
        .arg(format!("--conf={}", rig.path("system.conf").display()))
        .arg(format!("--mount={}", rig.path("mnt").display()))
        .args(["service", "--override-boot-slot=A"])
        .env("DBUS_SYSTEM_BUS_ADDRESS", &rig.bus)
        .stdout(fs::File::create(rig.path("service.log")).unwrap())
        .stderr(fs::File::create(rig.path("service.err")).unwrap())
        .spawn()
        .unwrap();
    rig.children.push(service);
    let bus = rig.bus.clone();
    wait_for(
        || {
            Command::new("rauc")
                .arg("status")
                .env("DBUS_SYSTEM_BUS_ADDRESS", &bus)
                .output()
                .is_ok_and(|o| o.status.success())
        },
        "rauc service on the test bus",
    );

    // archy-os.socket: one helper per connection, the connection as stdin.
    let listener = UnixListener::bind(rig.path("os.sock")).unwrap();
    let (data, run_dir, conf, booted) = (
        rig.path("data"),
        rig.path("run"),
        rig.path("system.conf"),
        rig.path("booted/release.json"),
    );
    let bus = rig.bus.clone();
    let log = rig.path("helper.log");
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { break };
            let status = Command::new(AGENT)
                .arg("--data")
                .arg(&data)
                .arg("--control")
                .arg(data.join("no-agent.sock"))
                .args(["os", "helper", "--any-peer"])
                .arg("--run-dir")
                .arg(&run_dir)
                .arg("--rauc-conf")
                .arg(&conf)
                .arg("--booted-release")
                .arg(&booted)
                .env("DBUS_SYSTEM_BUS_ADDRESS", &bus)
                .stdin(Stdio::from(std::os::fd::OwnedFd::from(conn)))
                .stdout(Stdio::null())
                .stderr(fs::OpenOptions::new().create(true).append(true).open(&log).unwrap())
                .status();
            if status.is_err() {
                break;
            }
        }
    });
    rig
}

fn wait_for(mut ok: impl FnMut() -> bool, what: &str) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < Duration::from_secs(20), "{what} did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What goes into a bundle.
struct Spec<'a> {
    name: &'a str,
    version: &'a str,
    compatible: &'a str,
    release_arch: &'a str,
    /// Changes release.json's hash of this file.
    wrong_hash: Option<&'a str>,
    key: &'a str,
    /// The manifest's version, when it is not release.json's.
    manifest_version: Option<&'a str>,
}

impl Spec<'_> {
    fn good(name: &str, version: &str) -> Spec<'static> {
        Spec {
            name: Box::leak(name.to_owned().into_boxed_str()),
            version: Box::leak(version.to_owned().into_boxed_str()),
            compatible: "archipelago-amd64",
            release_arch: "amd64",
            wrong_hash: None,
            key: "good",
            manifest_version: None,
        }
    }
}

/// Builds the bundle with `rauc bundle`: rootfs.tar with release.json
/// first, then small live files.
fn bundle(rig: &Rig, spec: &Spec) -> PathBuf {
    let content = rig.path(&format!("content-{}", spec.name));
    fs::create_dir_all(&content).unwrap();
    let files: Vec<(&str, Vec<u8>)> = LIVE_FILES
        .iter()
        .map(|f| (*f, format!("{f} of {}\n", spec.version).repeat(500).into_bytes()))
        .collect();
    let mut release = Release {
        version: spec.version.into(),
        architecture: spec.release_arch.into(),
        files: files
            .iter()
            .map(|(f, d)| (f.to_string(), format!("{:x}", Sha256::digest(d))))
            .collect(),
    };
    if let Some(f) = spec.wrong_hash {
        release.files.insert(f.to_owned(), "1".repeat(64));
    }
    let mut tar = tar::Builder::new(fs::File::create(content.join("rootfs.tar")).unwrap());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, name, data).unwrap();
    };
    add("release.json", &release.to_file_bytes().unwrap());
    for (f, d) in &files {
        add(f, d);
    }
    tar.finish().unwrap();
    drop(tar);
    fs::write(
        content.join("manifest.raucm"),
        format!(
            "[update]\ncompatible={}\nversion={}\n\n[bundle]\nformat=plain\n\n[image.rootfs]\nfilename=rootfs.tar\n",
            spec.compatible,
            spec.manifest_version.unwrap_or(spec.version)
        ),
    )
    .unwrap();
    let out = rig.path(&format!("{}.raucb", spec.name));
    let _ = fs::remove_file(&out);
    run(Command::new("rauc")
        .arg("bundle")
        .arg(format!(
            "--cert={}",
            rig.path(&format!("{}.cert.pem", spec.key)).display()
        ))
        .arg(format!(
            "--key={}",
            rig.path(&format!("{}.key.pem", spec.key)).display()
        ))
        .arg(&content)
        .arg(&out));
    out
}

/// `archy-agent os update` as the agent's CLI runs it.
fn os_update(rig: &Rig, source: &Path, extra: &[&str]) -> Output {
    Command::new(AGENT)
        .arg("--data")
        .arg(rig.path("data"))
        .args(["os", "update"])
        .arg(source)
        .arg("--helper")
        .arg(rig.path("os.sock"))
        .args(extra)
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The slot on `dev`, mounted read-only: its release.json and whether
/// every file matches it.
fn read_slot(rig: &Rig, dev: &Path) -> Release {
    let at = rig.path("check");
    fs::create_dir_all(&at).unwrap();
    run(Command::new("mount").args(["-o", "ro", "-t", "ext4"]).arg(dev).arg(&at));
    let r = Release::read(&at.join("release.json"));
    let verified: Result<(), String> = match &r {
        Ok(r) => r.verify(&at).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    run(Command::new("umount").arg(&at));
    let r = r.unwrap();
    verified.unwrap();
    r
}

#[test]
fn rauc_installs_a_good_bundle_and_refuses_bad_ones_without_touching_the_slot() {
    let rig = setup();

    // The D-Bus policy: root reaches RAUC, another user is denied.
    let call = |as_nobody: bool| {
        let mut cmd = if as_nobody {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "dbus-send"]);
            c
        } else {
            Command::new("dbus-send")
        };
        cmd.args([
            "--system",
            "--print-reply",
            "--dest=de.pengutronix.rauc",
            "/",
            "org.freedesktop.DBus.Properties.Get",
            "string:de.pengutronix.rauc.Installer",
            "string:Compatible",
        ])
        .env("DBUS_SYSTEM_BUS_ADDRESS", &rig.bus)
        .output()
        .unwrap()
    };
    let root = call(false);
    assert!(
        root.status.success() && text(&root).contains("archipelago-amd64"),
        "root: {}",
        text(&root)
    );
    let nobody = call(true);
    assert!(
        !nobody.status.success() && text(&nobody).contains("AccessDenied"),
        "nobody: {}",
        text(&nobody)
    );

    // A slot that does not read back as written: the post-install handler
    // says so, and the helper marks the slot RAUC had just made primary
    // bad, so the booted slot A stays the one to boot.
    let good = bundle(&rig, &Spec::good("good", "0.3.0"));
    fs::write(rig.path("damage-slot"), b"").unwrap();
    let out = os_update(&rig, &good, &[]);
    fs::remove_file(rig.path("damage-slot")).unwrap();
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("refused:") && said.contains("live/vmlinuz: its sha256 is"),
        "{said}"
    );
    assert!(said.contains("marking slot B bad"), "{said}");
    assert_eq!(rig.backend_file("state.B"), "bad");
    let primary = Command::new(rig.path("backend.sh"))
        .arg("get-primary")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&primary.stdout).trim(), "A");
    assert!(
        !rig.path("data/system/os/trial.json").exists(),
        "no trial without an install"
    );

    // A good bundle lands in slot B, reads back, and B boots next.
    let out = os_update(&rig, &good, &[]);
    assert!(
        out.status.success(),
        "{}\nhelper: {}",
        text(&out),
        fs::read_to_string(rig.path("helper.log")).unwrap_or_default()
    );
    let said = text(&out);
    assert!(said.contains("signature verified"), "{said}");
    assert!(said.contains("installed 0.3.0 into slot B"), "{said}");
    let written = read_slot(&rig, rig.slot_b());
    assert_eq!(written.version, "0.3.0");
    assert_eq!(rig.backend_file("primary"), "B");
    let trial: serde_json::Value =
        serde_json::from_slice(&fs::read(rig.path("data/system/os/trial.json")).unwrap()).unwrap();
    assert_eq!(trial["from_version"], BOOTED_VERSION);
    assert_eq!(trial["to_version"], "0.3.0");
    assert_eq!(trial["to_slot"], "B");
    assert!(
        !rig.path("data/system/os/incoming.raucb").exists(),
        "the staged copy is removed"
    );

    // Refusals: each names its reason, and slot B's bytes stay as they are.
    let mut flipped = fs::read(&good).unwrap();
    let mid = flipped.len() / 3;
    flipped[mid] ^= 0x01;
    fs::write(rig.path("flipped.raucb"), &flipped).unwrap();
    let mut truncated = fs::read(&good).unwrap();
    truncated.truncate(truncated.len() - 40);
    fs::write(rig.path("truncated.raucb"), &truncated).unwrap();
    let cases: Vec<(PathBuf, &str)> = vec![
        (rig.path("flipped.raucb"), "signature verification failed"),
        // A cut-short bundle is a format error, not called a bad signature.
        (
            rig.path("truncated.raucb"),
            "RAUC refused the bundle before installing it (its signature, its signer or its format): Invalid bundle format",
        ),
        (
            bundle(
                &rig,
                &Spec {
                    key: "other",
                    ..Spec::good("other-key", "0.4.0")
                },
            ),
            "signature verification failed: Verify error",
        ),
        (
            bundle(
                &rig,
                &Spec {
                    compatible: "archipelago-arm64",
                    ..Spec::good("other-compatible", "0.4.0")
                },
            ),
            // The helper reads the signed manifest before RAUC installs.
            "the bundle is for \"archipelago-arm64\", and this node is \"archipelago-amd64\"",
        ),
        (
            bundle(
                &rig,
                &Spec {
                    release_arch: "arm64",
                    ..Spec::good("other-arch", "0.4.0")
                },
            ),
            "the bundle's release is for arm64, and this node runs amd64",
        ),
        (
            bundle(&rig, &Spec::good("older", "0.1.0")),
            "older than the booted 0.2.0; a downgrade needs --allow-downgrade",
        ),
        // A manifest that claims a newer version than its release.json:
        // the pre-install handler finds the downgrade.
        (
            bundle(
                &rig,
                &Spec {
                    manifest_version: Some("0.4.0"),
                    ..Spec::good("older-inside", "0.1.0")
                },
            ),
            "the bundle holds version 0.1.0, older than the booted 0.2.0; a downgrade needs --allow-downgrade",
        ),
        (
            bundle(
                &rig,
                &Spec {
                    wrong_hash: Some("live/initrd.img"),
                    ..Spec::good("wrong-hash", "0.4.0")
                },
            ),
            "live/initrd.img in the bundle has sha256",
        ),
    ];
    for (bundle, reason) in &cases {
        let before = sha256_of(rig.slot_b());
        let out = os_update(&rig, bundle, &[]);
        let said = text(&out);
        assert!(!out.status.success(), "{} was installed: {said}", bundle.display());
        assert!(
            said.contains("refused") && said.contains(reason),
            "{}: wanted {reason:?} in\n{said}",
            bundle.display()
        );
        assert_eq!(sha256_of(rig.slot_b()), before, "{} changed slot B", bundle.display());
        // Nor the boot choice: the update installed before still boots next.
        assert_eq!(rig.backend_file("primary"), "B", "{}", bundle.display());
        assert_eq!(rig.backend_file("state.B"), "good", "{}", bundle.display());
        assert!(!rig.path("run/allow-downgrade").exists());
    }
    assert_eq!(read_slot(&rig, rig.slot_b()).version, "0.3.0");

    // The owner may downgrade, for that one install.
    let older = rig.path("older.raucb");
    let out = os_update(&rig, &older, &["--allow-downgrade"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(read_slot(&rig, rig.slot_b()).version, "0.1.0");
    assert!(
        !rig.path("run/allow-downgrade").exists(),
        "the permission is for one install"
    );

    // A URL: fetched by the CLI (loopback http is allowed for tests) into
    // the data root, handed over open, and removed after.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let body = fs::read(&good).unwrap();
    std::thread::spawn(move || {
        use std::io::Write;
        let (mut s, _) = listener.accept().unwrap();
        let mut req = [0u8; 2048];
        let _ = s.read(&mut req).unwrap();
        write!(
            s,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .unwrap();
        s.write_all(&body).unwrap();
    });
    let url = format!("http://127.0.0.1:{port}/good.raucb");
    let out = os_update(&rig, Path::new(&url), &[]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains(&format!("downloaded 0 MiB from {url}")), "{said}");
    assert!(said.contains("installed 0.3.0 into slot B"), "{said}");
    assert_eq!(read_slot(&rig, rig.slot_b()).version, "0.3.0");
    assert!(!rig.path("data/state/os-download.raucb").exists());
}

/// The helper refuses a connection that sends no bundle with an update.
#[test]
fn an_update_request_without_a_bundle_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    let mut child = Command::new(AGENT)
        .arg("--data")
        .arg(dir.path())
        .args(["os", "helper", "--any-peer", "--run-dir"])
        .arg(dir.path().join("run"))
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(b)))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    (&a).write_all(b"{\"request\":\"update\"}\n").unwrap();
    let mut line = String::new();
    BufReader::new(&a).read_line(&mut line).unwrap();
    assert!(
        line.contains("exactly one open bundle file") && line.contains("\"refused\":true"),
        "{line}"
    );
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(child.wait().unwrap().success());
    assert!(err.contains("request from uid 0"), "{err}");
}

/// Only root and the archipelago group may ask the helper: a connection
/// from another user (here `nobody`; this host has no archipelago group)
/// is refused on its SO_PEERCRED, and the helper logs the uid.
#[test]
fn another_user_is_refused_by_the_helper() {
    need_tools();
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let sock = dir.path().join("os.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    // The socket's mode lets anyone connect: the helper's own check is tested.
    fs::set_permissions(&sock, fs::Permissions::from_mode(0o777)).unwrap();
    let bundle = dir.path().join("b.raucb");
    fs::write(&bundle, b"not even a bundle").unwrap();
    fs::set_permissions(&bundle, fs::Permissions::from_mode(0o644)).unwrap();
    let run_dir = dir.path().join("run");
    let data = dir.path().join("data");
    let helper = std::thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        Command::new(AGENT)
            .arg("--data")
            .arg(&data)
            .args(["os", "helper", "--run-dir"])
            .arg(&run_dir)
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(conn)))
            .stdout(Stdio::null())
            .output()
            .unwrap()
    });
    let client = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", AGENT])
        .arg("--data")
        .arg(dir.path().join("data"))
        .args(["os", "update"])
        .arg(&bundle)
        .arg("--helper")
        .arg(&sock)
        .output()
        .unwrap();
    let said = text(&client);
    assert!(!client.status.success(), "{said}");
    assert!(
        said.contains(
            "refused: uid 65534 (gid 65534) may not ask the OS helper: only root and the group archipelago may"
        ),
        "{said}"
    );
    let log = helper.join().unwrap();
    let log = String::from_utf8_lossy(&log.stderr);
    assert!(log.contains("request from uid 65534"), "{log}");
    assert!(!dir.path().join("data/system/os/incoming.raucb").exists());
}
