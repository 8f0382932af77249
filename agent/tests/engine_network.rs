//! Networks through the engine module against the real Podman service.
//! Needs the services that `cargo xtask test` starts.

mod common;

use std::time::Duration;

use archy_agent::engine::{ContainerStatus, EngineError};
use archy_agent::manifest::{network_subnet, DEFAULT_NETWORK, DEFAULT_NETWORK_SUBNET};

#[tokio::test]
async fn ensure_network_creates_once_and_containers_on_it_resolve_each_other_by_name() {
    let env = common::env();
    let engine = common::engine_with_image(&env).await;
    let mut cleanup = common::Cleanup::new(&env);
    let network = cleanup.network("dns-net");

    assert!(
        engine.ensure_network(&network, None).await.expect("create"),
        "first call creates"
    );
    assert!(
        !engine.ensure_network(&network, None).await.expect("exists"),
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
    match engine.ensure_network(&network, None).await {
        Err(EngineError::NetworkWithoutDns { network: n }) => assert_eq!(n, network),
        other => panic!("expected NetworkWithoutDns, got {other:?}"),
    }
}

/// The subnets of network `name`, as `podman network inspect` shows them.
fn subnets(env: &common::TestEnv, name: &str) -> Vec<String> {
    let out = env
        .podman()
        .args([
            "network",
            "inspect",
            "--format",
            "{{range .Subnets}}{{.Subnet}} {{end}}",
            name,
        ])
        .output()
        .expect("run podman network inspect");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// A /24 in 10.123.0.0/16 that no network of the test Podman uses now
/// (test runs share it, and Podman refuses a subnet used twice).
fn free_subnet(env: &common::TestEnv, skip: &[String]) -> String {
    let out = env
        .podman()
        .args(["network", "ls", "--format", "{{range .Subnets}}{{.Subnet}} {{end}}"])
        .output()
        .expect("run podman network ls");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let used = String::from_utf8_lossy(&out.stdout).into_owned();
    let start = std::process::id() % 250;
    (0..250)
        .map(|i| format!("10.123.{}.0/24", (start + i) % 250))
        .find(|s| !used.split_whitespace().any(|u| u == s) && !skip.contains(s))
        .expect("a free /24 in 10.123.0.0/16")
}

#[tokio::test]
async fn archy_net_is_made_with_its_fixed_subnet_and_a_network_with_another_is_kept() {
    let env = common::env();
    let engine = common::engine(&env).await;
    let mut cleanup = common::Cleanup::new(&env);

    // What install asks for archy-net: its documented subnet.
    assert_eq!(network_subnet(DEFAULT_NETWORK), Some(DEFAULT_NETWORK_SUBNET));
    // archy-net itself may exist on the shared test Podman (apps of other
    // tests), and Podman refuses a subnet used twice: an archy-net-like
    // network with a unique name and a free subnet stands in for it.
    let network = cleanup.network("archy-net-like");
    let subnet = free_subnet(&env, &[]);
    assert!(
        engine.ensure_network(&network, Some(&subnet)).await.expect("create"),
        "first call creates"
    );
    assert_eq!(subnets(&env, &network), [subnet.as_str()]);
    assert!(
        !engine.ensure_network(&network, Some(&subnet)).await.expect("exists"),
        "second call finds it"
    );

    // A network made before the subnet was fixed (a migrated node): kept
    // as it is, with its containers, never replaced.
    let old = cleanup.network("archy-net-old");
    let created = env
        .podman()
        .args(["network", "create", &old])
        .output()
        .expect("run podman network create");
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    let before = subnets(&env, &old);
    let wanted = free_subnet(&env, &before);
    assert!(
        !engine.ensure_network(&old, Some(&wanted)).await.expect("kept"),
        "an existing network is not made again"
    );
    assert_eq!(subnets(&env, &old), before, "its subnet is unchanged");
}
