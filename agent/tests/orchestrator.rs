//! The orchestrator against the real Podman service and registries that
//! `cargo xtask test` starts.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use archy_agent::dataroot::DataRoot;
use archy_agent::orchestrator::{built_tag, AppState, ContainerOrchestrator, HealthState, OrchestratorError};
use archy_agent::registry::{Credentials, Registry, RegistryStore, RegistryUrl};
use common::node::{app_id, free_port, push_unique_image, Node, SERVE};

#[tokio::test]
async fn install_pulls_by_digest_creates_with_labels_and_runs() {
    let node = Node::new();
    let id = app_id("inst");
    let port = free_port();
    node.app(
        &id,
        &node.env.image.to_string(),
        &format!(
            "{SERVE}user: \"1000:1000\"\nports: [{{ host: {port}, container: 8080 }}]\n\
             volumes: [{{ source: data, target: /data }}]\nresources: {{ memory: 64Mi }}\n"
        ),
    );
    let orch = node.orchestrator().await;
    let report = orch.install(&id).await.expect("install");
    assert!(report.created);
    assert_eq!(report.container, id);

    let status = orch.status(&id).await.expect("status");
    assert_eq!(status.state, AppState::Running);
    assert!(
        status.managed && !status.drifted && !status.update_available,
        "{status:?}"
    );
    assert_eq!(status.running_version.as_deref(), Some("1.0"));

    let labels = node.podman(&["inspect", "--format", "{{json .Config.Labels}}", &id]);
    assert!(labels.contains(&format!("\"io.archipelago.app\":\"{id}\"")), "{labels}");
    assert!(
        labels.contains("\"io.archipelago.managed-by\":\"archy-agent\""),
        "{labels}"
    );
    assert!(labels.contains("io.archipelago.spec-hash"), "{labels}");
    // Created from the exact pulled image, not from a tag.
    let image_id = node.podman(&["inspect", "--format", "{{.Image}}", &id]);
    assert_eq!(format!("sha256:{}", image_id.trim()), report.image_id);
    // The volume folder exists under <data>/<id>/ and belongs to the app's user.
    let vol = node.data.join(&id).join("data");
    let meta = fs::metadata(&vol).expect("volume folder");
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), 1000);

    // Installing again changes nothing.
    let again = orch.install(&id).await.expect("install again");
    assert!(!again.created);
    assert_eq!(
        orch.status(&id).await.expect("status").container_id,
        status.container_id
    );
}

#[tokio::test]
async fn stop_start_restart_remove_and_exit_codes_map_to_states() {
    let node = Node::new();
    let clean = app_id("clean");
    let crash = app_id("crash");
    let killed = app_id("killed");
    let image = node.env.image.to_string();
    node.app(&clean, &image, SERVE);
    node.app(&crash, &image, "command: [\"sh\", \"-c\", \"sleep 1; exit 3\"]\n");
    // What SIGKILL (the OOM killer, kill -9) leaves: exit code 137. The
    // shell is PID 1 in its container and cannot be killed from inside.
    node.app(&killed, &image, "command: [\"sh\", \"-c\", \"sleep 1; exit 137\"]\n");
    let orch = node.orchestrator().await;
    for app in [&clean, &crash, &killed] {
        orch.install(app).await.expect("install");
    }

    orch.stop(&clean).await.expect("stop");
    let s = orch.status(&clean).await.expect("status");
    assert_eq!((s.state, s.exit_code), (AppState::Stopped, Some(0)));
    orch.start(&clean).await.expect("start");
    assert_eq!(orch.status(&clean).await.expect("status").state, AppState::Running);
    let before = orch.status(&clean).await.expect("status").container_id;
    orch.restart(&clean).await.expect("restart");
    let after = orch.status(&clean).await.expect("status");
    assert_eq!(
        (after.state, after.container_id),
        (AppState::Running, before),
        "restart keeps the container"
    );

    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = orch.status(&crash).await.expect("status");
    assert_eq!((s.state, s.exit_code), (AppState::Crashed, Some(3)));
    let s = orch.status(&killed).await.expect("status");
    assert_eq!((s.state, s.exit_code), (AppState::Killed, Some(137)));

    // Remove keeps the data.
    let marker = node.data.join(&clean).join("kept");
    fs::create_dir_all(node.data.join(&clean)).expect("dir");
    fs::write(&marker, "x").expect("marker");
    orch.remove(&clean).await.expect("remove");
    assert_eq!(orch.status(&clean).await.expect("status").state, AppState::Missing);
    assert!(marker.exists(), "data survives remove");
    assert!(matches!(
        orch.stop(&clean).await,
        Err(OrchestratorError::NotInstalled { .. })
    ));

    let list = orch.list().await.expect("list");
    assert_eq!(list.len(), 3, "{list:?}");
}

#[tokio::test]
async fn unknown_app_is_a_typed_error_naming_the_known_apps() {
    let node = Node::new();
    let id = app_id("known");
    node.app(&id, &node.env.image.to_string(), SERVE);
    let orch = node.orchestrator().await;
    match orch.status("no-such-app").await {
        Err(OrchestratorError::UnknownApp { app, known }) => {
            assert_eq!(app, "no-such-app");
            assert_eq!(known, vec![id]);
        }
        other => panic!("expected UnknownApp, got {other:?}"),
    }
}

#[tokio::test]
async fn a_registry_that_is_down_falls_through_to_the_next() {
    let node = Node::new();
    let id = app_id("fallback");
    // The manifest names a registry nobody listens on; the configured
    // fallback has the same digest.
    let dead = format!("127.0.0.1:{}", free_port());
    let (pushed, _) = push_unique_image(&node, &node.env.registry, None);
    let image = pushed
        .parse::<archy_agent::manifest::PinnedImage>()
        .expect("pinned")
        .with_registry(&dead);
    node.app(&id, &image.to_string(), "command: [\"sleep\", \"300\"]\n");
    let mut store = RegistryStore::open(&DataRoot::new(&node.data)).expect("store");
    let url: RegistryUrl = format!("http://{}", node.env.registry).parse().expect("url");
    store
        .add(Registry::new("fallback", url, 200).expect("registry"))
        .expect("add");

    let orch = node.orchestrator().await;
    let report = orch.install(&id).await.expect("install through the fallback");
    assert_eq!(report.attempts.len(), 2, "{:?}", report.attempts);
    assert!(report.attempts[0].reference.starts_with(&dead));
    assert!(report.attempts[0].error.is_some(), "{:?}", report.attempts[0]);
    assert_eq!(report.attempts[1].registry, "fallback");
    assert!(report.attempts[1].error.is_none());
    assert_eq!(orch.status(&id).await.expect("status").state, AppState::Running);
}

#[tokio::test]
async fn the_auth_registry_refuses_without_credentials_and_serves_with_them() {
    let node = Node::new();
    let id = app_id("auth");
    let creds = format!("{}:{}", node.env.auth.username, node.env.auth.password);
    let (image, _) = push_unique_image(&node, &node.env.auth_registry, Some(&creds));
    node.app(&id, &image, "command: [\"sleep\", \"300\"]\n");
    let orch = node.orchestrator().await;
    match orch.install(&id).await {
        Err(OrchestratorError::PullFailed { attempts, .. }) => {
            assert_eq!(attempts.len(), 1);
            assert!(attempts[0].error.is_some());
        }
        other => panic!("expected PullFailed without credentials, got {other:?}"),
    }
    assert_eq!(orch.status(&id).await.expect("status").state, AppState::Missing);

    let mut store = RegistryStore::open(&DataRoot::new(&node.data)).expect("store");
    let url: RegistryUrl = format!("http://{}", node.env.auth_registry).parse().expect("url");
    let creds = Credentials::new(&node.env.auth.username, &node.env.auth.password).expect("creds");
    store
        .add(
            Registry::new("auth", url, 100)
                .expect("registry")
                .with_credentials(creds),
        )
        .expect("add");
    let report = orch.install(&id).await.expect("install with credentials");
    assert_eq!(report.attempts.last().and_then(|a| a.error.clone()), None);
    assert_eq!(orch.status(&id).await.expect("status").state, AppState::Running);
}

#[tokio::test]
async fn a_blob_altered_in_the_registry_is_refused_and_nothing_runs() {
    let node = Node::new();
    // A fresh image of our own, so other tests' images stay intact.
    let (image, marker) = push_unique_image(&node, &node.env.registry, None);
    // Alter the layer blob of that image on disk (the one with our marker).
    let layer = find_blob_containing(&node.env.registry_data, marker.as_bytes()).expect("layer blob");
    let mut bytes = fs::read(&layer).expect("read blob");
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    fs::write(&layer, bytes).expect("alter blob");

    let id = app_id("tampered");
    node.app(&id, &image, "command: [\"sleep\", \"300\"]\n");
    let orch = node.orchestrator().await;
    match orch.install(&id).await {
        Err(OrchestratorError::PullFailed { attempts, .. }) => {
            assert!(attempts.iter().all(|a| a.error.is_some()), "{attempts:?}");
        }
        other => panic!("expected the pull to be refused, got {other:?}"),
    }
    assert_eq!(orch.status(&id).await.expect("status").state, AppState::Missing);
}

/// The registry keeps blobs under `docker/registry/v2/blobs/sha256/xx/<hex>/data`;
/// layers are gzipped, so look inside them for the marker.
fn find_blob_containing(root: &Path, needle: &[u8]) -> Option<PathBuf> {
    let blobs = root.join("docker/registry/v2/blobs/sha256");
    for prefix in fs::read_dir(&blobs).ok()?.flatten() {
        for blob in fs::read_dir(prefix.path()).ok()?.flatten() {
            let data = blob.path().join("data");
            let Ok(bytes) = fs::read(&data) else { continue };
            let mut plain = Vec::new();
            let decoded = std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&bytes[..]), &mut plain).is_ok();
            let hay = if decoded { &plain } else { &bytes };
            if hay.windows(needle.len()).any(|w| w == needle) {
                return Some(data);
            }
        }
    }
    None
}

fn release_of(node: &Node, container: &str) -> String {
    node.podman(&["exec", container, "cat", "/etc/archy-test-release"])
        .trim()
        .to_owned()
}

#[tokio::test]
async fn upgrade_replaces_the_container_and_keeps_the_data() {
    let node = Node::new();
    let id = app_id("upg");
    let volume = "volumes: [{ source: data, target: /data }]\n";
    node.app(&id, &node.env.image.to_string(), &format!("{SERVE}{volume}"));
    let orch = node.orchestrator().await;
    orch.install(&id).await.expect("install v1");
    node.podman(&["exec", &id, "sh", "-c", "echo precious > /data/file"]);
    assert_eq!(release_of(&node, &id), "v1");

    node.app(&id, &node.env.image_v2.to_string(), &format!("{SERVE}{volume}"));
    orch.reload();
    let report = orch.upgrade(&id).await.expect("upgrade");
    assert!(report.replaced);
    assert_ne!(report.from_image_id.as_deref(), Some(report.to_image_id.as_str()));
    assert_eq!(release_of(&node, &id), "v2");
    assert_eq!(
        fs::read_to_string(node.data.join(&id).join("data/file"))
            .expect("file")
            .trim(),
        "precious"
    );
    let backups = node.podman(&["ps", "-a", "--format", "{{.Names}}"]);
    assert!(
        !backups.contains(&format!("{id}-archy-backup")),
        "backup removed: {backups}"
    );
    // Nothing to do the second time.
    assert!(!orch.upgrade(&id).await.expect("upgrade again").replaced);
}

#[tokio::test]
async fn a_failed_upgrade_restores_the_previous_container_and_its_data() {
    let node = Node::new();
    let id = app_id("rollback");
    let volume = "volumes: [{ source: data, target: /data }]\n";
    node.app(&id, &node.env.image.to_string(), &format!("{SERVE}{volume}"));
    let orch = node.orchestrator().await;
    orch.install(&id).await.expect("install v1");
    node.podman(&["exec", &id, "sh", "-c", "echo precious > /data/file"]);
    let old_id = orch.status(&id).await.expect("status").container_id;

    // v2 whose health check always fails.
    let failing = "health:\n  exec: [\"false\"]\n  interval: 1s\n  timeout: 1s\n  retries: 2\n  start_period: 1s\n";
    node.app(
        &id,
        &node.env.image_v2.to_string(),
        &format!("{SERVE}{volume}{failing}"),
    );
    orch.reload();
    match orch.upgrade(&id).await {
        Err(OrchestratorError::UpgradeFailed {
            rolled_back, reason, ..
        }) => {
            assert!(rolled_back, "{reason}");
            assert!(reason.contains("not healthy"), "{reason}");
        }
        other => panic!("expected UpgradeFailed, got {other:?}"),
    }
    let status = orch.status(&id).await.expect("status");
    assert_eq!(status.state, AppState::Running);
    assert_eq!(status.container_id, old_id, "the very same container runs again");
    assert_eq!(release_of(&node, &id), "v1");
    assert_eq!(
        fs::read_to_string(node.data.join(&id).join("data/file"))
            .expect("file")
            .trim(),
        "precious"
    );
    let names = node.podman(&["ps", "-a", "--format", "{{.Names}}"]);
    assert!(!names.contains(&format!("{id}-archy-backup")), "{names}");
}

#[tokio::test]
async fn operations_on_two_apps_overlap_and_on_one_app_never_do() {
    let node = Node::new();
    let a = app_id("lock-a");
    let b = app_id("lock-b");
    // sleep as PID 1 ignores SIGTERM, so every stop takes the full grace.
    let slow = "command: [\"sleep\", \"300\"]\n";
    let image = node.env.image.to_string();
    node.app(&a, &image, slow);
    node.app(&b, &image, slow);
    let orch = std::sync::Arc::new(node.orchestrator().await);
    orch.install(&a).await.expect("install a");
    orch.install(&b).await.expect("install b");

    let timed = |app: String| {
        let orch = orch.clone();
        async move {
            let start = Instant::now();
            orch.restart(&app).await.expect("restart");
            (start, Instant::now())
        }
    };
    // Two apps: both restarts (2 s grace each) run side by side.
    let t0 = Instant::now();
    let (ra, rb) = tokio::join!(timed(a.clone()), timed(b.clone()));
    let both = ra.1.max(rb.1) - t0;
    assert!(
        both < Duration::from_millis(3900),
        "two apps ran one after the other: {both:?}"
    );

    // One app: the second restart waits for the first.
    let t0 = Instant::now();
    let (r1, r2) = tokio::join!(timed(a.clone()), timed(a.clone()));
    let (first, second) = if r1.1 <= r2.1 { (r1, r2) } else { (r2, r1) };
    assert!(
        second.1 - first.1 >= Duration::from_millis(1900),
        "the restarts of one app overlapped"
    );
    assert!(
        second.1 - t0 >= Duration::from_millis(3900),
        "one app's restarts overlapped: {:?}",
        second.1 - t0
    );
}

#[tokio::test]
async fn secrets_are_mounted_as_files_and_never_visible_in_inspect_or_logs() {
    let node = Node::new();
    let id = app_id("secret");
    node.app(
        &id,
        &node.env.image.to_string(),
        "command: [\"sh\", \"-c\", \"echo started; trap 'exit 0' TERM; while true; do sleep 1; done\"]\n\
         secrets: [{ name: test-rpc, kind: hex32 }]\nsecret_env: [{ key: RPC_PASSWORD, secret: test-rpc }]\n",
    );
    let orch = node.orchestrator().await;
    orch.install(&id).await.expect("install");
    let value = fs::read_to_string(node.data.join("secrets/test-rpc")).expect("secret generated");
    assert_eq!(value.trim().len(), 64);
    let inside = node.podman(&["exec", &id, "cat", "/run/secrets/test-rpc"]);
    assert_eq!(inside.trim(), value.trim(), "the app reads its secret");
    let env_file = node.podman(&["exec", &id, "sh", "-c", "echo $RPC_PASSWORD_FILE"]);
    assert_eq!(env_file.trim(), "/run/secrets/test-rpc");
    let inspect = node.podman(&["inspect", &id]);
    assert!(
        !inspect.contains(value.trim()),
        "secret value leaked into podman inspect"
    );
    let logs = orch.logs(&id, None).await.expect("logs").logs;
    assert!(logs.contains("started"), "{logs}");
    assert!(!logs.contains(value.trim()));
}

#[tokio::test]
async fn health_probes_http_tcp_and_exec_report_healthy_and_unhealthy() {
    let node = Node::new();
    let image = node.env.image.to_string();
    let web = app_id("web");
    let port = free_port();
    node.app(
        &web,
        &image,
        &format!(
            "command: [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/etc\"]\n\
             ports: [{{ host: {port}, container: 8080 }}]\n\
             health:\n  http: {{ port: 8080, path: /archy-test-release }}\n  interval: 1s\n  timeout: 1s\n"
        ),
    );
    let tcp = app_id("tcp");
    node.app(
        &tcp,
        &image,
        "command: [\"httpd\", \"-f\", \"-p\", \"9000\"]\nhealth:\n  tcp: { port: 9000 }\n  interval: 1s\n  timeout: 1s\n",
    );
    let bad = app_id("sick");
    node.app(
        &bad,
        &image,
        &format!("{SERVE}health:\n  exec: [\"test\", \"-e\", \"/nope\"]\n  interval: 1s\n  timeout: 1s\n"),
    );
    let orch = node.orchestrator().await;
    for app in [&web, &tcp, &bad] {
        orch.install(app).await.expect("install");
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let h = orch.health(&web).await.expect("health");
    assert_eq!(h.health, Some(HealthState::Healthy), "{h:?}");
    assert!(h.probe.as_ref().is_some_and(|p| p.detail == "HTTP 200"), "{h:?}");
    let h = orch.health(&tcp).await.expect("health");
    assert_eq!(h.health, Some(HealthState::Healthy), "{h:?}");
    let h = orch.health(&bad).await.expect("health");
    assert_eq!(h.health, Some(HealthState::Unhealthy), "{h:?}");
}

#[tokio::test]
async fn a_build_context_is_hashed_once_and_again_only_after_a_file_in_it_changed() {
    let node = Node::new();
    let id = app_id("ctx-hash");
    let dir = node.apps.join(&id);
    fs::create_dir_all(dir.join("image")).expect("context");
    fs::write(dir.join("image/Containerfile"), "FROM scratch\nCOPY page /page\n").expect("containerfile");
    fs::write(dir.join("image/page"), "one").expect("page");
    fs::write(
        dir.join("manifest.yml"),
        format!("id: {id}\nname: {id}\nversion: \"1.0\"\nbuild:\n  context: image\n"),
    )
    .expect("manifest");
    let orch = node.orchestrator().await;
    let m = orch.manifest(&id).expect("manifest loads");

    let first = orch.spec(&m).await.expect("spec").image;
    for _ in 0..5 {
        assert_eq!(orch.spec(&m).await.expect("spec").image, first);
    }
    let _ = orch.status(&id).await;
    assert_eq!(orch.context_hashes().computed(), 1, "nothing changed: hashed once");
    assert_eq!(
        Some(first.clone()),
        built_tag(&m).expect("tag"),
        "the tag the image builder gives"
    );

    // Same size, other bytes.
    fs::write(dir.join("image/page"), "two").expect("page");
    let second = orch.spec(&m).await.expect("spec").image;
    assert_ne!(second, first, "a changed context is a new tag");
    assert_eq!(orch.context_hashes().computed(), 2);
    assert_eq!(Some(second.clone()), built_tag(&m).expect("tag"));
    assert_eq!(orch.spec(&m).await.expect("spec").image, second);
    assert_eq!(orch.context_hashes().computed(), 2, "unchanged again: not hashed");
}
