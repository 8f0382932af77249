//! Image builds through the engine module against the real Podman
//! service. Needs the services that `cargo xtask test` starts.

mod common;

use std::path::Path;
use std::time::Duration;

use archy_agent::engine::{ContainerStatus, EngineError};

fn context_with(containerfile: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("Containerfile"), containerfile).expect("write the Containerfile");
    dir
}

fn local_tag(prefix: &str) -> String {
    format!("localhost/archy-test/{}:ctx", common::unique_name(prefix))
}

#[tokio::test]
async fn build_image_builds_from_a_pulled_base_and_the_result_runs() {
    let env = common::env();
    // Podman builds FROM the local image; it must be pulled first.
    let engine = common::engine_with_image(&env).await;
    let mut cleanup = common::Cleanup::new(&env);
    let tag = local_tag("built");
    cleanup.image(&tag);
    let context = context_with(&format!(
        "FROM {}\nCOPY greeting /greeting\nRUN echo hi > /built\n",
        env.image.by_digest()
    ));
    std::fs::write(context.path().join("greeting"), "from the context\n").expect("write");

    let built = engine
        .build_image(context.path(), Path::new("Containerfile"), &tag)
        .await
        .expect("build");
    assert!(built.id.starts_with("sha256:"), "{built:?}");
    assert!(built.repo_tags.contains(&tag), "{built:?}");
    assert_eq!(engine.inspect_image_ref(&tag).await.expect("inspect the tag"), built);

    let name = cleanup.container("built");
    let mut spec = common::spec(&env, &name, &["cat", "/built", "/greeting"]);
    spec.image = tag.clone();
    engine.create(&spec).await.expect("create from the built image");
    engine.start(&name).await.expect("start");
    let (e, n) = (&engine, name.as_str());
    let ended = common::eventually(Duration::from_secs(10), || async move {
        let info = e.inspect(n).await.expect("inspect");
        (info.status == ContainerStatus::Exited).then_some(info)
    })
    .await
    .expect("the container exits");
    assert_eq!(ended.exit_code, Some(0));
    assert_eq!(engine.logs(&name, None).await.expect("logs"), "hi\nfrom the context\n");
}

#[tokio::test]
async fn a_failing_build_is_a_build_error_naming_the_context() {
    let env = common::env();
    let engine = common::engine_with_image(&env).await;
    let mut cleanup = common::Cleanup::new(&env);

    let tag = local_tag("fails");
    cleanup.image(&tag);
    let context = context_with(&format!("FROM {}\nRUN exit 7\n", env.image.by_digest()));
    match engine
        .build_image(context.path(), Path::new("Containerfile"), &tag)
        .await
    {
        Err(EngineError::BuildFailed {
            context: c,
            tag: t,
            message,
        }) => {
            assert_eq!(c, context.path());
            assert_eq!(t, tag);
            assert!(message.contains("exit status 7"), "{message}");
        }
        other => panic!("expected BuildFailed for a failing RUN, got {other:?}"),
    }

    let context = context_with("FROM\nNOT-AN-INSTRUCTION\n");
    match engine
        .build_image(context.path(), Path::new("Containerfile"), &tag)
        .await
    {
        Err(EngineError::BuildFailed {
            context: c, message, ..
        }) => {
            assert_eq!(c, context.path());
            assert!(!message.is_empty());
        }
        other => panic!("expected BuildFailed for a broken Containerfile, got {other:?}"),
    }
    assert!(matches!(
        engine.inspect_image_ref(&tag).await,
        Err(EngineError::NotFound { .. })
    ));
}

#[tokio::test]
async fn a_containerfile_outside_the_context_is_refused_before_building() {
    let env = common::env();
    let engine = common::engine(&env).await;
    let context = context_with("FROM scratch\n");
    let outside = tempfile::tempdir().expect("temp dir");
    let containerfile = outside.path().join("Containerfile");
    match engine
        .build_image(context.path(), &containerfile, &local_tag("outside"))
        .await
    {
        Err(EngineError::BuildFailed { message, .. }) => assert!(message.contains("not inside"), "{message}"),
        other => panic!("expected BuildFailed, got {other:?}"),
    }
    match engine
        .build_image(
            &context.path().join("absent"),
            Path::new("Containerfile"),
            &local_tag("absent"),
        )
        .await
    {
        Err(EngineError::BuildContext { context: c, .. }) => assert!(c.ends_with("absent")),
        other => panic!("expected BuildContext for a missing context, got {other:?}"),
    }
}
