//! What `cargo xtask test` sets up for the integration tests: a private
//! Podman API service, two loopback registries and pushed test images.
//!
//! Each test crate uses part of this module, so unused items are expected.
#![allow(dead_code)]

use std::path::PathBuf;

pub mod node;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use archy_agent::engine::{Engine, RegistryAuth};
use archy_agent::manifest::{AppId, PinnedImage};
use archy_agent::spec::ContainerSpec;

/// The services' coordinates, read from `ARCHY_TEST_*` variables.
#[derive(Debug, Clone)]
pub struct TestEnv {
    /// The Podman API socket.
    pub engine_socket: PathBuf,
    /// `127.0.0.1:PORT` of the registry without auth.
    pub registry: String,
    /// `127.0.0.1:PORT` of the registry with basic auth.
    pub auth_registry: String,
    pub auth: RegistryAuth,
    /// busybox v1 on `registry`, pinned by digest.
    pub image: PinnedImage,
    /// A different image on `registry`: the upgrade target.
    pub image_v2: PinnedImage,
    /// The same content as `image`, on `auth_registry`.
    pub auth_image: PinnedImage,
    /// Global flags that point the `podman` CLI at the service's storage.
    pub podman_args: Vec<String>,
    pub containers_conf: PathBuf,
    pub registries_conf: PathBuf,
    pub storage_conf: PathBuf,
    /// The plain registry's storage directory.
    pub registry_data: PathBuf,
}

/// Reads the environment that `cargo xtask test` exports. Panics when it is
/// missing: a test that needs these services must fail, never pass, when
/// they are not there.
pub fn env() -> TestEnv {
    TestEnv {
        engine_socket: var("ARCHY_TEST_ENGINE").into(),
        registry: var("ARCHY_TEST_REGISTRY"),
        auth_registry: var("ARCHY_TEST_AUTH_REGISTRY"),
        auth: RegistryAuth {
            username: var("ARCHY_TEST_AUTH_USER"),
            password: var("ARCHY_TEST_AUTH_PASSWORD"),
        },
        image: image("ARCHY_TEST_IMAGE"),
        image_v2: image("ARCHY_TEST_IMAGE_V2"),
        auth_image: image("ARCHY_TEST_AUTH_IMAGE"),
        podman_args: var("ARCHY_TEST_PODMAN_ARGS")
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
        containers_conf: var("ARCHY_TEST_CONTAINERS_CONF").into(),
        registries_conf: var("ARCHY_TEST_REGISTRIES_CONF").into(),
        storage_conf: var("ARCHY_TEST_STORAGE_CONF").into(),
        registry_data: var("ARCHY_TEST_REGISTRY_DATA").into(),
    }
}

fn var(name: &str) -> String {
    match std::env::var(name) {
        Ok(value) if !value.is_empty() => value,
        _ => panic!(
            "{name} is not set: run the integration tests through `cargo xtask test`, which starts the services they need"
        ),
    }
}

fn image(name: &str) -> PinnedImage {
    let text = var(name);
    text.parse()
        .unwrap_or_else(|e| panic!("{name}={text} is not a pinned image reference: {e}"))
}

impl TestEnv {
    /// The `podman` CLI on the service's private storage, for checks the
    /// engine module does not offer.
    pub fn podman(&self) -> Command {
        let mut cmd = Command::new("podman");
        cmd.args(&self.podman_args)
            .env("CONTAINERS_CONF", &self.containers_conf)
            .env("CONTAINERS_REGISTRIES_CONF", &self.registries_conf)
            .env("CONTAINERS_STORAGE_CONF", &self.storage_conf);
        cmd
    }
}

/// A container name no other test (or run) uses.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{prefix}-{}-{}-{nanos:x}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Connects to the test engine; panics naming the socket when it cannot.
pub async fn engine(env: &TestEnv) -> Engine {
    Engine::connect(&env.engine_socket)
        .await
        .unwrap_or_else(|e| panic!("connecting to {}: {e:#?}", env.engine_socket.display()))
}

/// Connects and pulls the test image.
pub async fn engine_with_image(env: &TestEnv) -> Engine {
    let engine = engine(env).await;
    engine
        .pull(&env.image, None)
        .await
        .unwrap_or_else(|e| panic!("pulling {}: {e:#?}", env.image.by_digest()));
    engine
}

/// A spec of the test image with the manifest's secure defaults, running
/// `command`, on Podman's default network (which always exists).
pub fn spec(env: &TestEnv, name: &str, command: &[&str]) -> ContainerSpec {
    let app = AppId::parse("engine-test").expect("a valid app id");
    let mut spec = ContainerSpec::for_image(app, name, env.image.by_digest());
    spec.command = Some(command.iter().map(|s| (*s).to_owned()).collect());
    spec.network = "podman".to_owned();
    spec.update_labels("0");
    spec
}

/// Removes what a test created, through the podman CLI, when dropped:
/// also when the test panics. Containers go first, then pods, networks
/// and images, each removal forced and ignoring what is already gone.
pub struct Cleanup {
    env: TestEnv,
    containers: Vec<String>,
    pods: Vec<String>,
    networks: Vec<String>,
    images: Vec<String>,
}

impl Cleanup {
    pub fn new(env: &TestEnv) -> Cleanup {
        Cleanup {
            env: env.clone(),
            containers: Vec::new(),
            pods: Vec::new(),
            networks: Vec::new(),
            images: Vec::new(),
        }
    }

    /// A unique container name that is removed at the end.
    pub fn container(&mut self, prefix: &str) -> String {
        let name = unique_name(prefix);
        self.containers.push(name.clone());
        name
    }

    /// Also removes `name`, a container made under another name.
    pub fn also_container(&mut self, name: &str) {
        self.containers.push(name.to_owned());
    }

    pub fn pod(&mut self, prefix: &str) -> String {
        let name = unique_name(prefix);
        self.pods.push(name.clone());
        name
    }

    pub fn network(&mut self, prefix: &str) -> String {
        let name = unique_name(prefix);
        self.networks.push(name.clone());
        name
    }

    pub fn image(&mut self, reference: &str) {
        self.images.push(reference.to_owned());
    }

    fn run(&self, args: &[&str], names: &[String]) {
        if names.is_empty() {
            return;
        }
        match self.env.podman().args(args).args(names).output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "cleanup: podman {} {names:?}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => eprintln!("cleanup: running podman: {e}"),
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.run(&["rm", "--force", "--ignore", "--time", "0"], &self.containers);
        self.run(&["pod", "rm", "--force", "--ignore", "--time", "0"], &self.pods);
        self.run(&["network", "rm", "--force"], &self.networks);
        self.run(&["rmi", "--force", "--ignore"], &self.images);
    }
}

/// Polls `check` every 50 ms until it gives a value or `within` passes.
pub async fn eventually<T, F, Fut>(within: std::time::Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
