//! The default app set in `manifests/`: what a node runs after a flash.
//! It validates clean, the three backends are there as the product needs
//! them, and their rendered configs agree on the RPC password, with
//! bitcoind's rpcauth line checked against an HMAC computed by openssl.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use archy_agent::dataroot::DataRoot;
use archy_agent::files;
use archy_agent::manifest::{load_dir, LoadOptions, LoadReport, Manifest, Naming, Probe, VolumeSource};

fn manifests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("manifests")
}

fn load() -> LoadReport {
    load_dir(&manifests_dir(), &LoadOptions::default())
}

fn app<'a>(report: &'a LoadReport, id: &str) -> &'a Manifest {
    report
        .get(id)
        .unwrap_or_else(|| panic!("{id} is missing from manifests/"))
}

fn host_ports(m: &Manifest) -> Vec<u16> {
    let mut ports: Vec<u16> = m.ports.iter().map(|p| p.host).collect();
    ports.sort_unstable();
    ports
}

#[test]
fn the_default_set_validates_with_no_errors() {
    let report = load();
    let errors: Vec<String> = report.errors.iter().map(ToString::to_string).collect();
    assert!(errors.is_empty(), "manifests/ has errors:\n{}", errors.join("\n"));
    let folders = fs::read_dir(manifests_dir())
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().is_dir())
        .count();
    assert_eq!(report.apps.len(), folders, "every folder in manifests/ is an app");
    for id in ["bitcoin-core", "electrs", "lnd"] {
        app(&report, id);
    }
}

#[test]
fn the_backends_have_their_names_dependencies_ports_and_users() {
    let report = load();
    let bitcoin = app(&report, "bitcoin-core");
    assert_eq!(Naming::Prod.container_name(bitcoin), "bitcoin");
    assert_eq!(host_ports(bitcoin), [8332, 8333, 28332, 28333]);
    let electrs = app(&report, "electrs");
    assert_eq!(host_ports(electrs), [50001]);
    let lnd = app(&report, "lnd");
    assert_eq!(host_ports(lnd), [8080, 9735, 10009]);
    for m in [electrs, lnd] {
        let deps: Vec<&str> = m.depends_on.iter().map(|d| d.as_str()).collect();
        assert_eq!(deps, ["bitcoin-core"], "{}", m.id);
    }
    for m in [bitcoin, electrs, lnd] {
        assert_eq!(m.owner(), Some((1000, 1000)), "{}: data follows a declared uid", m.id);
        assert!(
            m.volumes
                .iter()
                .any(|v| v.source == VolumeSource::AppData(PathBuf::from("data"))),
            "{}: its data lives in its own folder",
            m.id
        );
        assert!(
            matches!(m.health.as_ref().map(|h| &h.probe), Some(Probe::Tcp { .. })),
            "{} has a health check",
            m.id
        );
        assert!(m.pinned_image().is_some(), "{} is pinned by digest", m.id);
        assert_eq!(m.files.len(), 1, "{} renders its config", m.id);
    }
    // Start order: bitcoin-core before the apps that use it.
    assert_eq!(report.apps[0].id.as_str(), "bitcoin-core");
}

/// HMAC-SHA256(key = salt, message = password) in hex, by openssl.
fn openssl_hmac(salt: &str, password: &str) -> String {
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-hmac", salt])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("openssl runs (Debian package openssl; `cargo xtask test` installs it)");
    child.stdin.take().unwrap().write_all(password.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "openssl failed");
    // `SHA2-256(stdin)= <hex>` (older versions: `(stdin)= <hex>`).
    let text = String::from_utf8(out.stdout).unwrap();
    let hex = text.trim().rsplit(' ').next().unwrap().to_owned();
    assert_eq!(hex.len(), 64, "{text}");
    hex
}

#[test]
fn the_rendered_configs_share_the_rpc_password_and_bitcoind_gets_its_rpcauth_hash() {
    let report = load();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path();
    let password = "5a1c0ffee0ddba11c0de5eed00d1e5a1c0ffee0ddba11c0de5eed00d1e5a1c0f";
    let salt = "0badc0de1dea5e1ec7ab1e5a1700ff1c";
    fs::create_dir_all(data.join("secrets")).unwrap();
    fs::write(data.join("secrets/bitcoin-rpc-password"), password).unwrap();
    fs::write(data.join("secrets/bitcoin-rpcauth-salt"), salt).unwrap();
    let render = |id: &str| -> String {
        let m = app(&report, id);
        // No generation: only the fixed secrets above may be used.
        let root = DataRoot::new(data);
        let rendered = files::render_app(&root, m, &report.apps, &Naming::Prod, false).unwrap();
        files::apply(&root, m, &rendered).unwrap();
        fs::read_to_string(data.join(id).join(&m.files[0].path)).unwrap()
    };

    let bitcoin_conf = render("bitcoin-core");
    let want = format!("rpcauth=archy:{salt}${}", openssl_hmac(salt, password));
    assert!(
        bitcoin_conf.lines().any(|l| l == want),
        "bitcoin.conf has no line {want:?}:\n{bitcoin_conf}"
    );
    assert!(
        !bitcoin_conf.contains(password),
        "bitcoind keeps only the hash:\n{bitcoin_conf}"
    );

    let electrs = render("electrs");
    assert!(electrs.contains(&format!("auth = \"archy:{password}\"")), "{electrs}");
    assert!(electrs.contains("daemon_rpc_addr = \"bitcoin:8332\""), "{electrs}");
    let lnd = render("lnd");
    for line in [
        "bitcoind.rpcuser=archy".to_owned(),
        format!("bitcoind.rpcpass={password}"),
        "bitcoind.rpchost=bitcoin:8332".to_owned(),
        "bitcoind.zmqpubrawblock=tcp://bitcoin:28332".to_owned(),
    ] {
        assert!(lnd.lines().any(|l| l == line), "lnd.conf has no line {line:?}:\n{lnd}");
    }
}
