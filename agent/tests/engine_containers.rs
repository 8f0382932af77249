//! Containers through the engine module against the real Podman service:
//! create from a full spec, listing in Podman-only states, pods, rename,
//! logs, exec and events. Needs the services that `cargo xtask test` starts.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use archy_agent::engine::{ContainerStatus, Engine, EngineError, EventKind};
use archy_agent::manifest::{PortMapping, Protocol, SecretKind};
use archy_agent::spec::{Mount, SecretMount, LABEL_SPEC_HASH};
use futures_util::StreamExt as _;
use serde_json::Value;

/// Long enough for Podman to act, short enough to fail fast.
const SETTLE: Duration = Duration::from_secs(10);

fn strings(cmd: &[&str]) -> Vec<String> {
    cmd.iter().map(|s| (*s).to_owned()).collect()
}

async fn exec(engine: &Engine, name: &str, cmd: &[&str]) -> (i64, String) {
    let out = engine
        .exec(name, &strings(cmd), SETTLE)
        .await
        .unwrap_or_else(|e| panic!("exec {cmd:?} in {name}: {e:#?}"));
    (out.exit_code, out.output)
}

/// `podman inspect` of one container, as the CLI prints it.
fn podman_inspect(env: &common::TestEnv, name: &str) -> (String, Value) {
    let out = env
        .podman()
        .args(["container", "inspect", name])
        .output()
        .expect("run podman inspect");
    assert!(
        out.status.success(),
        "podman inspect {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("podman prints UTF-8");
    let value: Value = serde_json::from_str(&text).expect("podman inspect prints JSON");
    (text, value[0].clone())
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("0.0.0.0:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address").port()
}

fn string_list(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn create_applies_every_setting_of_the_spec_and_keeps_the_secret_out_of_inspect() {
    let env = common::env();
    let engine = common::engine_with_image(&env).await;
    let mut cleanup = common::Cleanup::new(&env);
    let name = cleanup.container("full");
    let network = cleanup.network("full-net");
    engine.ensure_network(&network, None).await.expect("ensure network");

    let host = tempfile::tempdir().expect("temp dir");
    let data = host.path().join("data");
    let config = host.path().join("config");
    for dir in [&data, &config] {
        std::fs::create_dir(dir).expect("mkdir");
        // The container runs as nobody.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    }
    let secret_value = format!("s3cret-{}", common::unique_name("v"));
    let secret_file = host.path().join("token");
    std::fs::write(&secret_file, &secret_value).expect("write the secret");
    std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let port = free_port();

    let mut spec = common::spec(&env, &name, &[]);
    spec.entrypoint = Some(strings(&["/bin/sh", "-c"]));
    spec.command = Some(strings(&["echo written > /data/out && exec sleep 300"]));
    spec.env = BTreeMap::from([("GREETING".to_owned(), "hello".to_owned())]);
    spec.env.insert("TOKEN_FILE".into(), "/run/secrets/token".into());
    spec.secrets = vec![SecretMount {
        name: "token".into(),
        kind: SecretKind::Hex16,
        host: secret_file.clone(),
        target: "/run/secrets/token".into(),
    }];
    spec.user = Some("65534:65534".into());
    spec.network = network.clone();
    spec.ports = vec![PortMapping {
        host: port,
        container: 8080,
        protocol: Protocol::Tcp,
    }];
    spec.mounts = vec![
        Mount {
            host: data.clone(),
            target: "/data".into(),
            read_only: false,
        },
        Mount {
            host: config.clone(),
            target: "/config".into(),
            read_only: true,
        },
    ];
    spec.cap_add = vec!["NET_BIND_SERVICE".into()];
    spec.memory = Some(64 << 20);
    spec.stop_grace_period = Duration::from_secs(3);
    spec.update_labels("1.2.3");

    let id = engine.create(&spec).await.expect("create");
    let info = engine.inspect(&name).await.expect("inspect");
    assert_eq!(info.id, id);
    assert_eq!(info.entrypoint, spec.entrypoint, "entrypoint as given");
    assert_eq!(
        info.cmd, spec.command,
        "command as given, not folded into the entrypoint"
    );
    assert!(info.env.contains(&"GREETING=hello".to_owned()), "{:?}", info.env);
    assert_eq!(info.image.as_deref(), Some(spec.image.as_str()));
    for (key, value) in &spec.labels {
        assert_eq!(info.labels.get(key), Some(value), "label {key}");
    }
    assert_eq!(info.labels.get(LABEL_SPEC_HASH), Some(&spec.hash()));

    let (_, cli) = podman_inspect(&env, &name);
    let host_config = &cli["HostConfig"];
    assert_eq!(host_config["ReadonlyRootfs"], Value::Bool(true), "{host_config:#}");
    assert!(
        string_list(&host_config["SecurityOpt"])
            .iter()
            .any(|o| o.starts_with("no-new-privileges")),
        "{host_config:#}"
    );
    assert_eq!(host_config["Memory"].as_i64(), Some(64 << 20));
    assert_eq!(
        host_config["RestartPolicy"]["Name"].as_str(),
        Some("no"),
        "{host_config:#}"
    );
    assert_eq!(cli["Config"]["User"].as_str(), Some("65534:65534"));
    assert_eq!(cli["Config"]["StopTimeout"].as_u64(), Some(3));
    // Podman reports capabilities relative to its default set: everything
    // it grants by default shows as dropped, except what was added back.
    let dropped = string_list(&host_config["CapDrop"]);
    for cap in ["CAP_CHOWN", "CAP_KILL", "CAP_SETUID", "CAP_NET_RAW"] {
        assert!(dropped.contains(&cap.to_owned()), "{cap} not dropped: {dropped:?}");
    }
    assert!(!dropped.contains(&"CAP_NET_BIND_SERVICE".to_owned()), "{dropped:?}");
    let bindings = &host_config["PortBindings"]["8080/tcp"];
    assert_eq!(
        bindings[0]["HostPort"].as_str(),
        Some(port.to_string().as_str()),
        "{bindings:#}"
    );
    let mounts = cli["Mounts"].as_array().cloned().unwrap_or_default();
    let mount = |dest: &str| {
        mounts
            .iter()
            .find(|m| m["Destination"] == dest)
            .unwrap_or_else(|| panic!("no mount at {dest}: {mounts:#?}"))
            .clone()
    };
    assert_eq!(mount("/data")["RW"], Value::Bool(true));
    assert_eq!(mount("/config")["RW"], Value::Bool(false));
    assert_eq!(mount("/run/secrets/token")["RW"], Value::Bool(false));

    engine.start(&name).await.expect("start");
    let out = data.join("out");
    let out = &out;
    let written = common::eventually(SETTLE, || async move { std::fs::read_to_string(out).ok() }).await;
    assert_eq!(written.as_deref(), Some("written\n"), "the volume's file on the host");
    let running = engine.inspect(&name).await.expect("inspect running");
    assert_eq!(running.status, ContainerStatus::Running);
    assert!(running.ips.contains_key(&network), "{:?}", running.ips);
    assert!(running.started_at.is_some());

    assert_eq!(
        exec(&engine, &name, &["cat", "/run/secrets/token"]).await,
        (0, secret_value.clone())
    );
    let (code, _) = exec(&engine, &name, &["touch", "/config/x"]).await;
    assert_ne!(code, 0, "a read-only volume took a write");
    let (code, _) = exec(&engine, &name, &["touch", "/etc/x"]).await;
    assert_ne!(code, 0, "the read-only root took a write");
    // Podman mounts a tmpfs on /tmp, /var/tmp and /run under a read-only
    // root (containers.conf read_only_tmpfs, on by default).
    assert_eq!(exec(&engine, &name, &["touch", "/tmp/x"]).await.0, 0);
    let (_, status) = exec(&engine, &name, &["cat", "/proc/self/status"]).await;
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no {key} in {status}"))
            .to_owned()
    };
    // Bit 10 is CAP_NET_BIND_SERVICE: the only capability left.
    assert_eq!(field("CapBnd:"), "0000000000000400");
    assert_eq!(field("NoNewPrivs:"), "1");
    assert_eq!(exec(&engine, &name, &["id", "-u"]).await, (0, "65534\n".to_owned()));

    let (text, _) = podman_inspect(&env, &name);
    assert!(
        !text.contains(&secret_value),
        "the secret's value shows in podman inspect"
    );
    let info = engine.inspect(&name).await.expect("inspect");
    assert!(
        !info.env.iter().any(|e| e.contains(&secret_value)),
        "the secret's value is in the environment"
    );
}

#[tokio::test]
async fn create_refuses_a_missing_host_path_before_podman_can_create_it() {
    let env = common::env();
    let engine = common::engine(&env).await;
    let mut cleanup = common::Cleanup::new(&env);
    let name = cleanup.container("missing");
    let host = tempfile::tempdir().expect("temp dir");
    let absent = host.path().join("absent");
    let mut spec = common::spec(&env, &name, &["true"]);
    spec.mounts = vec![Mount {
        host: absent.clone(),
        target: "/data".into(),
        read_only: false,
    }];
    match engine.create(&spec).await {
        Err(EngineError::HostPathMissing { path, container }) => {
            assert_eq!(path, absent);
            assert_eq!(container, name);
        }
        other => panic!("expected HostPathMissing, got {other:?}"),
    }
    assert!(!absent.exists(), "the missing folder was created");
    assert!(matches!(engine.inspect(&name).await, Err(EngineError::NotFound { .. })));
}

#[tokio::test]
async fn create_names_a_missing_image_or_network() {
    let env = common::env();
    let engine = common::engine(&env).await;
    let mut cleanup = common::Cleanup::new(&env);
    let name = cleanup.container("absent-image");
    let mut spec = common::spec(&env, &name, &["true"]);
    spec.image = format!("{}/archy-test/absent@sha256:{}", env.registry, "1".repeat(64));
    match engine.create(&spec).await {
        Err(EngineError::NotFound { what }) => assert!(what.contains(&spec.image), "{what}"),
        other => panic!("expected NotFound for the image, got {other:?}"),
    }

    engine.pull(&env.image, None).await.expect("pull");
    let mut spec = common::spec(&env, &name, &["true"]);
    spec.network = common::unique_name("absent-net");
    match engine.create(&spec).await {
        Err(EngineError::NotFound { what }) => assert_eq!(what, format!("network {}", spec.network)),
        other => panic!("expected NotFound for the network, got {other:?}"),
    }
}

#[tokio::test]
async fn listing_reports_a_container_being_stopped_as_stopping() {
    let env = common::env();
    let engine = common::engine_with_image(&env).await;
    let mut cleanup = common::Cleanup::new(&env);
    let name = cleanup.container("stopping");
    // busybox sleep as PID 1 ignores SIGTERM: the stop waits out its grace.
    engine
        .create(&common::spec(&env, &name, &["sleep", "300"]))
        .await
        .expect("create");
    engine.start(&name).await.expect("start");

    let stopper = engine.clone();
    let stopped_name = name.clone();
    let stop = tokio::spawn(async move { stopper.stop(&stopped_name, Duration::from_secs(10)).await });
    let (e, n) = (&engine, name.as_str());
    let seen = common::eventually(SETTLE, || async move {
        let list = e.list().await.expect("list while a stop is in progress");
        list.containers
            .into_iter()
            .find(|c| c.name == n && c.status == ContainerStatus::Stopping)
    })
    .await;
    let seen = seen.unwrap_or_else(|| panic!("{name} never listed as stopping"));
    assert_eq!(
        seen.labels.get("io.archipelago.app").map(String::as_str),
        Some("engine-test")
    );
    let inspected = engine.inspect(&name).await.expect("inspect while stopping");
    assert_eq!(inspected.status, ContainerStatus::Stopping);

    // Do not wait out the grace: kill it.
    engine
        .force_remove(&name)
        .await
        .expect("force remove a stopping container");
    let _ = tokio::time::timeout(SETTLE, stop).await;
}

#[tokio::test]
async fn a_pod_made_with_the_cli_neither_breaks_the_listing_nor_the_event_stream() {
    let env = common::env();
    let engine = common::engine_with_image(&env).await;
    let mut cleanup = common::Cleanup::new(&env);
    let pod = cleanup.pod("pod");
    let infra = format!("{pod}-infra");
    let member = format!("{pod}-member");
    cleanup.also_container(&infra);
    cleanup.also_container(&member);

    let filters = BTreeMap::from([("type".to_owned(), vec!["pod".to_owned()])]);
    let mut events = engine.events(&filters).await.expect("subscribe to pod events");

    // The default infra image is built locally and needs catatonit; the
    // test image with a long sleep does the same job.
    let image = env.image.by_digest();
    let created = env
        .podman()
        .args(["pod", "create", "--name", &pod, "--infra-name", &infra])
        .args(["--infra-image", &image, "--infra-command", "sleep 300"])
        .output()
        .expect("run podman pod create");
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    let run = env
        .podman()
        .args(["run", "-d", "--pod", &pod, "--name", &member, &image, "sleep", "300"])
        .output()
        .expect("run podman run --pod");
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));

    let list = engine.list().await.expect("list with a pod").containers;
    let status = |n: &str| list.iter().find(|c| c.name == n).map(|c| c.status.clone());
    assert_eq!(status(&infra), Some(ContainerStatus::Running), "{list:#?}");
    assert_eq!(status(&member), Some(ContainerStatus::Running), "{list:#?}");

    let event = tokio::time::timeout(SETTLE, events.next())
        .await
        .expect("a pod event within the time")
        .expect("the stream goes on")
        .expect("a readable event");
    assert_eq!(event.kind, EventKind::Pod);
    assert_eq!(event.name.as_deref(), Some(pod.as_str()));
}

#[tokio::test]
async fn rename_moves_the_name_and_refuses_one_in_use() {
    let env = common::env();
    let engine = common::engine_with_image(&env).await;
    let mut cleanup = common::Cleanup::new(&env);
    let name = cleanup.container("rename");
    let other = cleanup.container("rename-other");
    let backup = cleanup.container("rename-backup");
    let id = engine
        .create(&common::spec(&env, &name, &["true"]))
        .await
        .expect("create");
    engine
        .create(&common::spec(&env, &other, &["true"]))
        .await
        .expect("create the other");

    engine.rename(&name, &backup).await.expect("rename");
    assert_eq!(engine.inspect(&backup).await.expect("inspect by the new name").id, id);
    assert!(matches!(engine.inspect(&name).await, Err(EngineError::NotFound { .. })));

    match engine.rename(&backup, &other).await {
        Err(EngineError::Conflict { .. }) => {}
        other => panic!("expected Conflict renaming onto a name in use, got {other:?}"),
    }
    match engine.rename(&name, &common::unique_name("x")).await {
        Err(EngineError::NotFound { what }) => assert!(what.contains(&name), "{what}"),
        other => panic!("expected NotFound renaming a missing container, got {other:?}"),
    }
}

#[tokio::test]
async fn logs_hold_stdout_and_stderr_and_tail_keeps_the_last_lines() {
    let env = common::env();
    let engine = common::engine_with_image(&env).await;
    let mut cleanup = common::Cleanup::new(&env);
    let name = cleanup.container("logs");
    // conmon reads stdout and stderr separately: only a pause orders lines
    // across the two.
    let spec = common::spec(
        &env,
        &name,
        &["sh", "-c", "echo one; echo two >&2; sleep 0.3; echo three"],
    );
    engine.create(&spec).await.expect("create");
    engine.start(&name).await.expect("start");
    let (e, n) = (&engine, name.as_str());
    let ended = common::eventually(SETTLE, || async move {
        let info = e.inspect(n).await.expect("inspect");
        (info.status == ContainerStatus::Exited).then_some(info)
    })
    .await
    .expect("the container exits");
    assert_eq!(ended.exit_code, Some(0));
    assert!(ended.finished_at.is_some());

    let all = engine.logs(&name, None).await.expect("logs");
    let lines: Vec<&str> = all.lines().collect();
    assert_eq!(lines.len(), 3, "{all:?}");
    for expected in ["one", "two", "three"] {
        assert!(lines.contains(&expected), "{expected} missing from {all:?}");
    }
    assert_eq!(engine.logs(&name, Some(1)).await.expect("tail").trim_end(), "three");
    assert!(matches!(
        engine.logs(&common::unique_name("absent"), None).await,
        Err(EngineError::NotFound { .. })
    ));
}

#[tokio::test]
async fn exec_reports_exit_code_and_output_and_a_slow_command_times_out_in_a_running_container() {
    let env = common::env();
    let engine = common::engine_with_image(&env).await;
    let mut cleanup = common::Cleanup::new(&env);
    let name = cleanup.container("exec");
    engine
        .create(&common::spec(&env, &name, &["sh", "-c", "echo ready; exec sleep 300"]))
        .await
        .expect("create");
    engine.start(&name).await.expect("start");
    // Logs of a running container answer at once with what is there.
    let (e, n) = (&engine, name.as_str());
    let ready = common::eventually(SETTLE, || async move {
        let logs = e.logs(n, None).await.expect("logs of a running container");
        (!logs.is_empty()).then_some(logs)
    })
    .await;
    assert_eq!(ready.as_deref(), Some("ready\n"));

    let (code, output) = exec(&engine, &name, &["sh", "-c", "echo out; echo err >&2; exit 3"]).await;
    assert_eq!(code, 3);
    assert!(output.contains("out\n") && output.contains("err\n"), "{output:?}");

    let timeout = Duration::from_millis(500);
    let started = std::time::Instant::now();
    match engine.exec(&name, &strings(&["sleep", "30"]), timeout).await {
        Err(EngineError::ExecTimeout { container, timeout: t }) => {
            assert_eq!(container, name);
            assert_eq!(t, timeout);
        }
        other => panic!("expected ExecTimeout, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
}

#[tokio::test]
async fn inspect_image_ref_finds_an_image_by_reference_or_id_and_not_an_absent_one() {
    let env = common::env();
    let engine = common::engine_with_image(&env).await;
    let by_digest = engine
        .inspect_image_ref(&env.image.by_digest())
        .await
        .expect("by digest reference");
    let by_id = engine.inspect_image_ref(&by_digest.id).await.expect("by id");
    assert_eq!(by_id, by_digest);
    let absent = format!("{}/archy-test/absent:nope", env.registry);
    match engine.inspect_image_ref(&absent).await {
        Err(EngineError::NotFound { what }) => assert!(what.contains(&absent), "{what}"),
        other => panic!("expected NotFound, got {other:?}"),
    }
}
