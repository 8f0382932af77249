//! The default app set in `manifests/`: what a node runs after a flash.
//! It validates clean, the three backends are there as the product needs
//! them, and their rendered configs agree on the RPC password, with
//! bitcoind's rpcauth line checked against an HMAC computed by openssl.
//! Each web UI's proxy target (`ARCHY_UI_BACKEND` in its image) is what
//! its backend's rendered config serves, over archy-net only.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use archy_agent::dataroot::DataRoot;
use archy_agent::files;
use archy_agent::manifest::template::{self, rpcauth};
use archy_agent::manifest::{
    load_dir, ImageSource, LoadOptions, LoadReport, Manifest, Naming, Probe, VolumeSource, DEFAULT_NETWORK,
    DEFAULT_NETWORK_SUBNET,
};

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
    assert_eq!(host_ports(bitcoin), [8333], "only P2P: RPC and ZMQ stay on archy-net");
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

/// Fixed secrets for the pure renderings below.
const PASSWORD: &str = "5a1c0ffee0ddba11c0de5eed00d1e5a1c0ffee0ddba11c0de5eed00d1e5a1c0f";
const SALT: &str = "0badc0de1dea5e1ec7ab1e5a1700ff1c";

/// `m`'s one config file rendered with the fixed secrets, without touching
/// any file but the host name.
fn render_pure(report: &LoadReport, m: &Manifest) -> String {
    let facts = files::facts(m, &report.apps, &Naming::Prod).unwrap();
    let file = &m.files[0];
    let secrets = file
        .secrets
        .iter()
        .map(|name| {
            let value = match name.as_str() {
                "bitcoin-rpc-password" => PASSWORD,
                "bitcoin-rpcauth-salt" => SALT,
                other => panic!("{}: unexpected secret {other}", m.id),
            };
            (name.clone(), value.to_owned())
        })
        .collect();
    template::render(&file.template, &secrets, &facts).unwrap_or_else(|e| panic!("{}: the template {e}", m.id))
}

/// The values of `key` in an INI-like file (`key=value` or `key = "value"`,
/// comments with `#` or `;`), in order.
fn values(conf: &str, key: &str) -> Vec<String> {
    conf.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with(';'))
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().trim_matches('"').to_owned())
        .collect()
}

/// A UI's proxy target, from `ENV ARCHY_UI_BACKEND=` in the Containerfile
/// of its build context: (scheme, host, port).
fn ui_backend(ui: &Manifest) -> (String, String, u16) {
    let ImageSource::Build { context, containerfile } = &ui.image else {
        panic!("{}: a UI is built", ui.id)
    };
    let containerfile = context.join(containerfile);
    let text = fs::read_to_string(&containerfile).unwrap();
    let url = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("ENV ARCHY_UI_BACKEND="))
        .unwrap_or_else(|| panic!("{} sets no ARCHY_UI_BACKEND", containerfile.display()))
        .trim();
    let (scheme, rest) = url.split_once("://").unwrap();
    let (host, port) = rest.split_once(':').unwrap_or_else(|| panic!("{url}: no port"));
    (scheme.to_owned(), host.to_owned(), port.parse().unwrap())
}

/// `addr` (`host:port`, the host maybe empty or `*`) listens on `port` on
/// an address other containers reach: not loopback.
fn listens_beyond_loopback(addr: &str, port: u16) -> bool {
    let Some((host, p)) = addr.rsplit_once(':') else {
        return false;
    };
    let host = host.trim_matches(['[', ']']);
    let loopback = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    p.parse() == Ok(port) && !loopback
}

#[test]
fn each_ui_proxies_to_what_its_backend_serves_over_archy_net_only() {
    let report = load();
    let mut checked = Vec::new();
    for ui in report.apps.iter().filter(|m| m.id.as_str().ends_with("-ui")) {
        let (scheme, host, port) = ui_backend(ui);
        let deps: Vec<&str> = ui.depends_on.iter().map(|d| d.as_str()).collect();
        let [backend_id] = deps[..] else {
            panic!("{}: a UI depends on its one backend, not {deps:?}", ui.id)
        };
        let backend = app(&report, backend_id);
        assert_eq!(
            host,
            Naming::Prod.container_name(backend),
            "{}: the proxy's host is {backend_id}'s container name",
            ui.id
        );
        assert_eq!(ui.network, backend.network, "{}: on its backend's network", ui.id);
        assert_eq!(backend.network, DEFAULT_NETWORK, "{backend_id}");
        let conf = render_pure(&report, backend);
        match backend_id {
            "bitcoin-core" => {
                assert_eq!(scheme, "http", "bitcoind's RPC is plain HTTP");
                let rpcport = values(&conf, "rpcport");
                assert!(rpcport.is_empty() || rpcport == [port.to_string()], "{conf}");
                assert_eq!(port, 8332, "bitcoind's mainnet RPC port");
                let binds = values(&conf, "rpcbind");
                assert!(
                    binds
                        .iter()
                        .any(|b| listens_beyond_loopback(&format!("{b}:{port}"), port)),
                    "bitcoind's RPC binds beyond loopback (rpcbind {binds:?}):\n{conf}"
                );
                assert_eq!(
                    values(&conf, "rpcallowip"),
                    [DEFAULT_NETWORK_SUBNET],
                    "RPC is allowed from archy-net's subnet only:\n{conf}"
                );
                // Auth: user "archy" with the node's RPC password, the
                // credentials the page says RPC answers to.
                let want = rpcauth("archy", PASSWORD, SALT).unwrap();
                assert_eq!(values(&conf, "rpcauth"), [want], "{conf}");
                for (key, zmq) in [("zmqpubrawblock", 28332), ("zmqpubrawtx", 28333)] {
                    let addr = values(&conf, key).join("");
                    let addr = addr.strip_prefix("tcp://").unwrap_or(&addr);
                    assert!(listens_beyond_loopback(addr, zmq), "{key} {addr}:\n{conf}");
                }
                for private in [8332, 28332, 28333] {
                    assert!(
                        backend.ports.iter().all(|p| p.container != private),
                        "{backend_id}: container port {private} (RPC/ZMQ) is published on the host"
                    );
                }
            }
            "electrs" => {
                assert_eq!(scheme, "http", "electrs' monitoring is plain HTTP");
                let addr = values(&conf, "monitoring_addr").join("");
                assert!(
                    listens_beyond_loopback(&addr, port),
                    "electrs' monitoring_addr {addr:?} is not {port} beyond loopback:\n{conf}"
                );
                assert!(
                    backend.ports.iter().all(|p| p.container != port),
                    "{backend_id}: the monitoring port {port} is published on the host"
                );
            }
            "lnd" => {
                // REST over LND's own TLS, for the container's name, with
                // macaroons (the page says requests carry one).
                assert_eq!(scheme, "https", "LND's REST is TLS");
                assert!(values(&conf, "no-rest-tls").is_empty(), "{conf}");
                assert!(values(&conf, "no-macaroons").is_empty(), "{conf}");
                assert_eq!(values(&conf, "tlsextradomain"), [host.as_str()], "{conf}");
                let rest = values(&conf, "restlisten");
                assert!(
                    rest.iter().any(|a| listens_beyond_loopback(a, port)),
                    "LND's restlisten {rest:?} is not {port} beyond loopback:\n{conf}"
                );
            }
            other => panic!("{}: no check for its backend {other}", ui.id),
        }
        checked.push(backend_id.to_owned());
    }
    checked.sort();
    assert_eq!(
        checked,
        ["bitcoin-core", "electrs", "lnd"],
        "every backend's UI is checked"
    );
}

#[test]
fn the_apps_reach_bitcoind_over_archy_net_where_it_allows_them() {
    let report = load();
    let bitcoin = app(&report, "bitcoin-core");
    let name = Naming::Prod.container_name(bitcoin);
    let conf = render_pure(&report, bitcoin);
    assert_eq!(values(&conf, "rpcallowip"), [DEFAULT_NETWORK_SUBNET], "{conf}");
    for id in ["electrs", "lnd"] {
        let m = app(&report, id);
        assert_eq!(m.network, bitcoin.network, "{id} shares bitcoind's network");
        let conf = render_pure(&report, m);
        assert!(
            conf.contains(&format!("{name}:8332")),
            "{id} reaches RPC at {name}:8332:\n{conf}"
        );
    }
    let lnd = render_pure(&report, app(&report, "lnd"));
    assert_eq!(
        values(&lnd, "bitcoind.zmqpubrawtx"),
        [format!("tcp://{name}:28333")],
        "{lnd}"
    );
}
