//! Networks through the engine module against the real Podman service.
//! Needs the services that `cargo xtask test` starts.

mod common;

use std::time::Duration;

use archy_agent::engine::{ContainerStatus, EngineError};

#[tokio::test]
async fn ensure_network_creates_once_and_containers_on_it_resolve_each_other_by_name() {
    let env = common::env();
    let engine = common::engine_with_image(&env).await;
    let mut cleanup = common::Cleanup::new(&env);
    let network = cleanup.network("dns-net");

    assert!(
        engine.ensure_network(&network).await.expect("create"),
        "first call creates"
    );
    assert!(
        !engine.ensure_network(&network).await.expect("exists"),
        "second call finds it"
    );

    let server = cleanup.container("dns-a");
    let client = cleanup.container("dns-b");
    for name in [&server, &client] {
        let mut spec = common::spec(&env, name, &["sleep", "300"]);
        spec.network = network.clone();
        engine.create(&spec).await.expect("create");
        engine.start(name).await.expect("start");
    }
    let info = engine.inspect(&server).await.expect("inspect");
    assert_eq!(info.status, ContainerStatus::Running);
    let address = info
        .ips
        .get(&network)
        .unwrap_or_else(|| panic!("no address on {network}: {info:?}"))
        .to_string();

    let lookup = vec!["nslookup".to_owned(), server.clone()];
    let out = engine
        .exec(&client, &lookup, Duration::from_secs(10))
        .await
        .expect("exec nslookup");
    assert_eq!(out.exit_code, 0, "{}", out.output);
    assert!(
        out.output.contains(&address),
        "{server} did not resolve to {address}: {}",
        out.output
    );
}

#[tokio::test]
async fn a_network_without_dns_is_refused() {
    let env = common::env();
    let engine = common::engine(&env).await;
    let mut cleanup = common::Cleanup::new(&env);
    let network = cleanup.network("no-dns");
    let created = env
        .podman()
        .args(["network", "create", "--disable-dns", &network])
        .output()
        .expect("run podman network create");
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    match engine.ensure_network(&network).await {
        Err(EngineError::NetworkWithoutDns { network: n }) => assert_eq!(n, network),
        other => panic!("expected NetworkWithoutDns, got {other:?}"),
    }
}
