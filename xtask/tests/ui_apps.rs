//! The web UIs (`manifests/*-ui`) and their base image, for real:
//! `cargo xtask images` builds the UIs FROM the UI base image (mmdebstrap,
//! or its cached Debian layer in target/cache), the agent imports the
//! archives and installs the apps on the Podman service that `cargo xtask
//! test` starts, and each UI must serve its page, pass its health check and
//! proxy `/api/` to a stub backend named as the real backend's container,
//! by that name, also after the stub was recreated with another address.
//!
//! Needs root, Debian's archive (on a cache miss) and the `ARCHY_TEST_*`
//! services: run through `cargo xtask test`.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use archy_agent::engine::Engine;
use archy_agent::manifest::Naming;
use archy_agent::orchestrator::{ContainerOrchestrator, HealthState, Orchestrator, OrchestratorConfig};

/// The same value as the rootfs and ISO tests: one cached Debian layer.
const EPOCH: &str = "1700000000";
const BASE: &str = "localhost/archipelago/ui-base:bookworm";
/// The apps' network. Not `archy-net` itself: rootful podman instances
/// share one aardvark-dns and its per-network-name configuration
/// (/run/containers/networks/aardvark-dns/<name>), so another test run on
/// the same machine with its own `archy-net` would take over the name's
/// DNS. The UIs do not care which network they are on; they resolve the
/// backend's name through whatever DNS server their network has.
fn network() -> String {
    format!("archy-net-ui-test-{}", std::process::id())
}
/// Tests that may run mmdebstrap run one at a time: the first builds the
/// Debian layer, the others find it in the cache.
static MMDEBSTRAP: Mutex<()> = Mutex::new(());

/// Each UI, the container name of its backend, the port that backend
/// serves and whether it speaks TLS (LND's REST does).
const UIS: &[(&str, &str, u16, bool)] = &[
    ("bitcoin-ui", "bitcoin", 8332, false),
    ("electrs-ui", "electrs", 4224, false),
    ("lnd-ui", "lnd", 8080, true),
];

fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn var(name: &str) -> String {
    match std::env::var(name) {
        Ok(value) if !value.is_empty() => value,
        _ => panic!(
            "{name} is not set: run the integration tests through `cargo xtask test`, which starts the services they need"
        ),
    }
}

/// The podman CLI, and `xtask images`, on the test service's storage.
fn podman_env(cmd: &mut Command) -> &mut Command {
    cmd.env("CONTAINERS_CONF", var("ARCHY_TEST_CONTAINERS_CONF"))
        .env("CONTAINERS_REGISTRIES_CONF", var("ARCHY_TEST_REGISTRIES_CONF"))
        .env("CONTAINERS_STORAGE_CONF", var("ARCHY_TEST_STORAGE_CONF"))
}

fn podman(args: &[&str]) -> Output {
    let mut cmd = Command::new("podman");
    cmd.args(var("ARCHY_TEST_PODMAN_ARGS").split_whitespace());
    podman_env(&mut cmd).args(args).output().unwrap()
}

fn podman_ok(args: &[&str]) -> String {
    let out = podman(args);
    assert!(
        out.status.success(),
        "podman {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn xtask(args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xtask"));
    cmd.args(args).env("SOURCE_DATE_EPOCH", EPOCH);
    let out = podman_env(&mut cmd).output().unwrap();
    eprintln!(
        "$ xtask {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn scratch(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

/// One plain HTTP/1.0 GET: (status, body), or why it failed.
fn get(port: u16, path: &str) -> Result<(u16, String), String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").map_err(|e| format!("send: {e}"))?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).map_err(|e| format!("read: {e}"))?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no header end: {answer:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status: {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// GETs `path` from `ui` until it answers 200 with `want` in the body, or
/// fails after `within` with the last answer and what the containers say.
fn wait_for(ui: &str, port: u16, path: &str, want: &str, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let answer = get(port, path);
        if matches!(&answer, Ok((200, body)) if body.contains(want)) {
            return started.elapsed();
        }
        if started.elapsed() > within {
            panic!(
                "GET {ui}:{port}{path} did not answer 200 with {want:?} within {within:?}; last answer: {answer:?}\n{}",
                diagnostics(ui)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What the containers say, for a failure message.
fn diagnostics(ui: &str) -> String {
    let container = format!("archy-{ui}");
    let said = |args: &[&str]| {
        let out = podman(args);
        format!(
            "$ podman {}\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    [
        said(&["ps", "--all", "--format", "{{.Names}} {{.Status}} {{.Networks}}"]),
        said(&["logs", "--tail", "20", &container]),
        said(&[
            "exec",
            &container,
            "cat",
            "/etc/resolv.conf",
            "/tmp/archy-ui/runtime.conf",
        ]),
    ]
    .into_iter()
    .chain(
        UIS.iter()
            .filter(|(u, ..)| *u == ui)
            .map(|(_, backend, ..)| said(&["logs", "--tail", "20", backend])),
    )
    .collect::<Vec<_>>()
    .join("\n")
}

/// Removes the containers a test made, also when it fails.
struct Containers(Vec<String>);

impl Drop for Containers {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            let mut args = vec!["rm", "--force", "--time", "0", "--ignore"];
            args.extend(self.0.iter().map(String::as_str));
            let _ = podman(&args);
        }
        let _ = podman(&["network", "rm", "--force", &network()]);
    }
}

/// A stand-in for a backend: nginx from the UI base image (it has it
/// already) serving `marker` at `/marker`, over TLS when `tls`, as
/// container `name` on the test's network. Its files live in `dir`.
fn run_stub(dir: &Path, name: &str, port: u16, tls: bool, marker: &str) {
    let stub = dir.join(name);
    fs::create_dir_all(stub.join("www")).unwrap();
    fs::write(stub.join("www/marker"), format!("{marker}\n")).unwrap();
    let listen = if tls {
        let ok = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj"])
            .arg(format!("/CN={name}"))
            .arg("-keyout")
            .arg(stub.join("key.pem"))
            .arg("-out")
            .arg(stub.join("cert.pem"))
            .output()
            .unwrap();
        assert!(ok.status.success(), "openssl: {}", String::from_utf8_lossy(&ok.stderr));
        format!("{port} ssl;\n ssl_certificate /stub/cert.pem;\n ssl_certificate_key /stub/key.pem")
    } else {
        port.to_string()
    };
    fs::write(
        stub.join("nginx.conf"),
        format!(
            "pid /tmp/nginx.pid;\nerror_log stderr;\ndaemon off;\nevents {{}}\n\
             http {{\n client_body_temp_path /tmp/b;\n proxy_temp_path /tmp/p;\n fastcgi_temp_path /tmp/f;\n\
             uwsgi_temp_path /tmp/u;\n scgi_temp_path /tmp/s;\n access_log off;\n\
             server {{\n listen {listen};\n root /stub/www;\n }}\n}}\n"
        ),
    )
    .unwrap();
    // Readable by the image's user (www-data), which runs the stub too.
    for entry in fs::read_dir(&stub).unwrap() {
        use std::os::unix::fs::PermissionsExt as _;
        let path = entry.unwrap().path();
        let mode = if path.is_dir() { 0o755 } else { 0o644 };
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
    }
    let mount = format!("{}:/stub:ro", stub.display());
    podman_ok(&[
        "run",
        "--detach",
        "--name",
        name,
        "--network",
        &network(),
        "--volume",
        &mount,
        "--entrypoint",
        "nginx",
        BASE,
        "-e",
        "stderr",
        "-c",
        "/stub/nginx.conf",
    ]);
}

/// Each UI container's ID and start time: what a restart would change.
fn runs(ports: &[(String, u16)]) -> Vec<String> {
    ports
        .iter()
        .map(|(ui, _)| {
            let container = format!("archy-{ui}");
            podman_ok(&["inspect", "--format", "{{.Id}} {{.State.StartedAt}}", &container])
        })
        .collect()
}

/// Every UI's `/api/marker` answers with its backend's `which` marker.
fn proxies_reach(ports: &[(String, u16)], which: &str) {
    for ((ui, ui_port), (_, backend, _, _)) in ports.iter().zip(UIS) {
        let marker = format!("{backend} {which}");
        let took = wait_for(ui, *ui_port, "/api/marker", &marker, Duration::from_secs(10));
        eprintln!("{ui}: /api/ reached the {which} {backend} after {took:?}");
    }
}

fn address(container: &str) -> String {
    let format = format!("{{{{(index .NetworkSettings.Networks \"{}\").IPAddress}}}}", network());
    podman_ok(&["inspect", "--format", &format, container])
}

/// A scratch copy of the UI apps, each on a free host port, with stub
/// manifests for their backends (the same ids and container names, the
/// test image) so that the set validates as the real one does.
fn ui_app_set(dir: &Path) -> Vec<(String, u16)> {
    let manifests = dir.join("manifests");
    let image = var("ARCHY_TEST_IMAGE");
    let mut ports = Vec::new();
    for (ui, backend, _, _) in UIS {
        let from = project_root().join("manifests").join(ui);
        let to = manifests.join(ui);
        fs::create_dir_all(to.join("image")).unwrap();
        for file in fs::read_dir(from.join("image")).unwrap() {
            let file = file.unwrap();
            fs::copy(file.path(), to.join("image").join(file.file_name())).unwrap();
        }
        let text = fs::read_to_string(from.join("manifest.yml")).unwrap();
        let (_, rest) = text.split_once("- { host: ").expect("the manifest publishes a port");
        let (host, _) = rest.split_once(',').unwrap();
        let port = free_port();
        let text = text.replace(&format!("- {{ host: {host},"), &format!("- {{ host: {port},"));
        fs::write(to.join("manifest.yml"), format!("{text}network: {}\n", network())).unwrap();
        ports.push(((*ui).to_owned(), port));

        let backend_id = match *backend {
            "bitcoin" => "bitcoin-core",
            other => other,
        };
        let stub = manifests.join(backend_id);
        fs::create_dir_all(&stub).unwrap();
        fs::write(
            stub.join("manifest.yml"),
            format!(
                "id: {backend_id}\nname: stub\nversion: \"1\"\ncontainer_name: {backend}\nimage: {image}\nnetwork: {}\n",
                network()
            ),
        )
        .unwrap();
    }
    ports
}

#[tokio::test(flavor = "multi_thread")]
async fn each_ui_serves_its_page_and_proxies_to_its_backend_by_name() {
    let dir = scratch("ui-apps-");
    let ports = ui_app_set(dir.path());
    let manifests = dir.path().join("manifests");
    let out = dir.path().join("images");
    let cache = dir.path().join("cache");
    let built = {
        // Only the build may run mmdebstrap; the rest needs no lock.
        let _mmdebstrap = MMDEBSTRAP.lock().unwrap_or_else(|e| e.into_inner());
        xtask(&[
            "images",
            "--manifests",
            manifests.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--cache",
            cache.to_str().unwrap(),
        ])
    };
    assert!(built.status.success(), "xtask images failed");

    // The archives are what a node gets: the built images leave the store
    // (the base image stays, for the stubs) and come back by import.
    let lock: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(out.join("images.lock.json")).unwrap()).unwrap();
    for (ui, _, _, _) in UIS {
        let entry = lock["images"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["app"] == *ui)
            .unwrap_or_else(|| panic!("{ui} is not in the lock: {lock}"));
        let reference = entry["reference"].as_str().unwrap();
        assert!(
            reference.starts_with(&format!("localhost/archipelago/{ui}:")),
            "{reference}"
        );
        podman_ok(&["rmi", "--force", reference]);
    }
    let data = dir.path().join("data");
    fs::create_dir_all(&data).unwrap();
    let engine = Engine::connect(Path::new(&var("ARCHY_TEST_ENGINE"))).await.unwrap();
    let imported = archy_agent::images::import_all(&engine, &out, &archy_agent::dataroot::DataRoot::new(&data)).await;
    assert!(imported.is_clean(), "{imported:?}");
    assert!(imported.imported() >= UIS.len(), "{imported:?}");

    let mut containers = Containers(Vec::new());
    let orch = Orchestrator::new(
        engine,
        OrchestratorConfig {
            apps_dir: manifests.clone(),
            data_root: data.clone().into(),
            naming: Naming::Prod,
            images_dir: out.clone(),
        },
    );
    for (ui, port) in &ports {
        containers.0.push(format!("archy-{ui}"));
        let report = orch
            .install(ui)
            .await
            .unwrap_or_else(|e| panic!("installing {ui}: {e:#}"));
        assert_eq!(report.container, format!("archy-{ui}"));
        // The page, and the health check the agent runs.
        wait_for(ui, *port, "/healthz", "ok", Duration::from_secs(30));
        let (status, page) = get(*port, "/").unwrap();
        assert_eq!(status, 200, "{page}");
        assert!(page.contains("· Archipelago</title>"), "{ui}: {page}");
        let (status, style) = get(*port, "/style.css").unwrap();
        assert!(status == 200 && style.contains("font-family"), "{ui}: {status} {style}");
        let health = orch.health(ui).await.unwrap();
        assert_eq!(health.health, Some(HealthState::Healthy), "{ui}: {health:?}");
        // Unprivileged: www-data, a read-only root, no capabilities.
        let container = format!("archy-{ui}");
        let security = podman_ok(&[
            "inspect",
            "--format",
            "{{.Config.User}} {{.HostConfig.ReadonlyRootfs}} {{.EffectiveCaps}}",
            &container,
        ]);
        assert_eq!(security, "33:33 true []", "{ui}");
    }

    // Without its backend, a UI still serves its page and /api/ fails fast.
    let asked = Instant::now();
    let (status, _) = get(ports[0].1, "/api/marker").unwrap();
    assert_eq!(status, 502);
    assert!(asked.elapsed() < Duration::from_secs(8), "{:?}", asked.elapsed());

    for (_, backend, port, tls) in UIS {
        containers.0.push((*backend).to_owned());
        run_stub(dir.path(), backend, *port, *tls, &format!("{backend} first"));
    }
    proxies_reach(&ports, "first");

    // Recreated backends come back with other addresses (a placeholder
    // takes the old one, whatever order the network hands them out in);
    // each UI, still the same container, finds them by name.
    let started = runs(&ports);
    for (i, (_, backend, port, tls)) in UIS.iter().enumerate() {
        let before = address(backend);
        podman_ok(&["rm", "--force", "--time", "0", backend]);
        let placeholder = format!("ui-apps-placeholder-{i}-{}", std::process::id());
        containers.0.push(placeholder.clone());
        podman_ok(&[
            "run",
            "--detach",
            "--name",
            &placeholder,
            "--network",
            &network(),
            "--entrypoint",
            "sleep",
            BASE,
            "600",
        ]);
        run_stub(dir.path(), backend, *port, *tls, &format!("{backend} second"));
        let after = address(backend);
        assert_ne!(before, after, "{backend} kept its address; the test proves nothing");
    }
    proxies_reach(&ports, "second");
    assert_eq!(started, runs(&ports), "the UIs must not have been restarted");
}

fn base_lock(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&fs::read_to_string(dir.join("ui-base.lock.json")).unwrap()).unwrap()
}

#[test]
fn the_base_image_is_reproducible_and_loads_as_its_pinned_digest() {
    let _mmdebstrap = MMDEBSTRAP.lock().unwrap_or_else(|e| e.into_inner());
    let a = scratch("base-a-");
    // From the cache when an earlier run (or test) made the Debian layer.
    assert!(xtask(&["base-image", "--out", a.path().to_str().unwrap()])
        .status
        .success());
    let b = scratch("base-b-");
    // mmdebstrap again, from Debian's archive.
    assert!(
        xtask(&["base-image", "--no-cache", "--out", b.path().to_str().unwrap()])
            .status
            .success()
    );
    if base_lock(a.path())["packages"] != base_lock(b.path())["packages"] {
        // Debian published updates since the cached layer was made: "the
        // same inputs" no longer hold, so compare two fresh builds.
        eprintln!("Debian's archive changed since the cached layer was built; building once more");
        assert!(
            xtask(&["base-image", "--no-cache", "--out", a.path().to_str().unwrap()])
                .status
                .success()
        );
    }
    let (first, second) = (base_lock(a.path()), base_lock(b.path()));
    assert_eq!(first["config_digest"], second["config_digest"], "{first}\n{second}");
    assert_eq!(first["archive_sha256"], second["archive_sha256"]);
    assert_eq!(
        fs::read(a.path().join("ui-base.tar")).unwrap(),
        fs::read(b.path().join("ui-base.tar")).unwrap()
    );
    let packages: Vec<&str> = first["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert!(packages.contains(&"nginx"), "{packages:?}");
    assert!(!packages.contains(&"perl"), "{packages:?}");
    assert!(!packages.contains(&"apt"), "{packages:?}");

    // Loaded, the image's ID is the pinned digest.
    let loaded = podman_ok(&[
        "load",
        "--quiet",
        "--input",
        b.path().join("ui-base.tar").to_str().unwrap(),
    ]);
    assert!(loaded.contains(BASE), "{loaded}");
    let id = podman_ok(&["image", "inspect", "--format", "{{.Id}}", BASE]);
    assert_eq!(format!("sha256:{id}"), first["config_digest"].as_str().unwrap());
}
