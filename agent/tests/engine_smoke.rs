//! The engine module against a real Podman API service and registries.
//! Needs the services that `cargo xtask test` starts.

mod common;

use std::time::Duration;

use archy_agent::engine::{ContainerStatus, Engine, EngineError};
use archy_agent::manifest::PinnedImage;

async fn connect(env: &common::TestEnv) -> Engine {
    common::engine(env).await
}

#[tokio::test]
async fn container_lifecycle_through_bollard_with_image_pulled_by_digest() {
    let env = common::env();
    let engine = connect(&env).await;
    let version = engine.version().await.expect("engine version");
    assert!(version.podman, "expected Podman, got {version:?}");

    let pulled = engine.pull(&env.image, None).await.expect("pull by digest");
    assert!(
        pulled.repo_digests.contains(&env.image.by_digest()),
        "{pulled:?} lacks RepoDigest {}",
        env.image.by_digest()
    );
    let stored = engine
        .inspect_image(&env.image)
        .await
        .expect("inspect the pulled image");
    assert_eq!(stored.id, pulled.id);
    // The CLI flags the tests get must show the service's own store.
    let exists = env
        .podman()
        .args(["image", "exists", &env.image.by_digest()])
        .status()
        .expect("run podman image exists");
    assert!(
        exists.success(),
        "podman CLI does not see {} ({exists})",
        env.image.by_digest()
    );

    let mut cleanup = common::Cleanup::new(&env);
    let name = cleanup.container("lifecycle");
    let mut spec = common::spec(&env, &name, &["sleep", "300"]);
    spec.labels.insert("archy.test".into(), "engine_smoke".into());
    let id = engine.create(&spec).await.expect("create");

    let created = engine.inspect(&name).await.expect("inspect after create");
    assert_eq!(created.id, id);
    assert_eq!(created.name, name);
    assert_eq!(created.status, ContainerStatus::Created);
    assert_eq!(created.image_id, pulled.id, "container runs another image");
    assert_eq!(
        created.labels.get("archy.test").map(String::as_str),
        Some("engine_smoke")
    );

    engine.start(&name).await.expect("start");
    let running = engine.inspect(&name).await.expect("inspect after start");
    assert_eq!(running.status, ContainerStatus::Running);
    assert_eq!(running.exit_code, None);

    // sleep is PID 1 in the container and ignores SIGTERM: the grace runs
    // out and SIGKILL ends it.
    engine.stop(&name, Duration::from_secs(1)).await.expect("stop");
    let stopped = engine.inspect(&name).await.expect("inspect after stop");
    assert_eq!(stopped.status, ContainerStatus::Exited);
    assert!(stopped.exit_code.is_some(), "{stopped:?}");

    engine.remove(&name).await.expect("remove");
    match engine.inspect(&name).await {
        Err(EngineError::NotFound { what }) => assert!(what.contains(&name), "{what}"),
        other => panic!("expected NotFound after remove, got {other:?}"),
    }
}

#[tokio::test]
async fn removing_a_running_container_is_a_conflict_until_forced() {
    let env = common::env();
    let engine = connect(&env).await;
    engine.pull(&env.image, None).await.expect("pull");
    let mut cleanup = common::Cleanup::new(&env);
    let name = cleanup.container("conflict");
    let spec = common::spec(&env, &name, &["sleep", "300"]);
    engine.create(&spec).await.expect("create");
    match engine.create(&spec).await {
        Err(EngineError::Conflict { what, .. }) => assert!(what.contains(&name), "{what}"),
        other => panic!("expected Conflict for a second container named {name}, got {other:?}"),
    }
    engine.start(&name).await.expect("start");
    match engine.remove(&name).await {
        Err(EngineError::Conflict { .. }) => {}
        other => panic!("expected Conflict removing a running container, got {other:?}"),
    }
    engine.force_remove(&name).await.expect("force remove");
    assert!(matches!(engine.inspect(&name).await, Err(EngineError::NotFound { .. })));
}

#[tokio::test]
async fn pulling_from_the_auth_registry_needs_credentials() {
    let env = common::env();
    let engine = connect(&env).await;
    match engine.pull(&env.auth_image, None).await {
        Err(EngineError::PullFailed { image, message }) => {
            assert_eq!(image, env.auth_image.by_digest());
            assert!(!message.is_empty());
        }
        other => panic!("expected PullFailed without credentials, got {other:?}"),
    }
    let pulled = engine
        .pull(&env.auth_image, Some(&env.auth))
        .await
        .expect("pull with credentials");
    assert!(pulled.repo_digests.contains(&env.auth_image.by_digest()), "{pulled:?}");
}

#[tokio::test]
async fn pulling_a_digest_the_registry_does_not_have_fails() {
    let env = common::env();
    let engine = connect(&env).await;
    let missing: PinnedImage = format!("{}/{}@sha256:{}", env.registry, env.image.repository(), "0".repeat(64))
        .parse()
        .expect("a valid reference");
    match engine.pull(&missing, None).await {
        Err(EngineError::PullFailed { image, .. }) => assert_eq!(image, missing.by_digest()),
        other => panic!("expected PullFailed, got {other:?}"),
    }
}

#[tokio::test]
async fn an_engine_nobody_serves_is_unreachable() {
    let dir = tempfile::tempdir().expect("temp dir");

    let absent = dir.path().join("absent.sock");
    match Engine::connect(&absent).await {
        Err(EngineError::Unreachable { socket, .. }) => assert_eq!(socket, absent),
        other => panic!("expected Unreachable for a missing socket, got {other:?}"),
    }

    // A socket file that nobody listens on any more.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind a unix socket"));
    match Engine::connect(&stale).await {
        Err(e @ EngineError::Unreachable { .. }) => {
            assert!(e.to_string().contains("stale.sock"), "{e}");
        }
        other => panic!("expected Unreachable for a socket nobody listens on, got {other:?}"),
    }
}
