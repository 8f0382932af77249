//! What `cargo xtask test` sets up for the integration tests: a private
//! Podman API service, two loopback registries and pushed test images.
//!
//! Each test crate uses part of this module, so unused items are expected.
#![allow(dead_code)]

use std::path::PathBuf;

pub mod confine;
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

/// The rootless Podman service that `cargo xtask test` also starts, as the
/// unprivileged user it made, read from `ARCHY_TEST_ROOTLESS_*` variables.
#[derive(Debug, Clone)]
pub struct RootlessEnv {
    /// The rootless Podman API socket.
    pub engine_socket: PathBuf,
    pub user: String,
    pub uid: u32,
    pub gid: u32,
    /// The user's `/etc/subuid` and `/etc/subgid` ranges: (start, count).
    pub subuid: (u32, u32),
    pub subgid: (u32, u32),
    /// `HOME` and `XDG_RUNTIME_DIR` of the user's podman: its
    /// configuration and storage.
    pub home: PathBuf,
    pub runtime_dir: PathBuf,
    /// A folder the user owns, for the tests' nodes.
    pub work: PathBuf,
    /// Global flags that point the `podman` CLI at the service's storage.
    pub podman_args: Vec<String>,
}

/// Reads the rootless service's environment. Panics when it is missing:
/// a rootless test must fail, never pass, without the service.
pub fn rootless_env() -> RootlessEnv {
    let number = |name: &str| -> u32 {
        let text = var(name);
        text.parse()
            .unwrap_or_else(|e| panic!("{name}={text} is not a number: {e}"))
    };
    let range = |name: &str| -> (u32, u32) {
        let text = var(name);
        text.split_once(':')
            .and_then(|(s, c)| Some((s.parse().ok()?, c.parse().ok()?)))
            .unwrap_or_else(|| panic!("{name}={text} is not start:count"))
    };
    RootlessEnv {
        engine_socket: var("ARCHY_TEST_ROOTLESS_ENGINE").into(),
        user: var("ARCHY_TEST_ROOTLESS_USER"),
        uid: number("ARCHY_TEST_ROOTLESS_UID"),
        gid: number("ARCHY_TEST_ROOTLESS_GID"),
        subuid: range("ARCHY_TEST_ROOTLESS_SUBUID"),
        subgid: range("ARCHY_TEST_ROOTLESS_SUBGID"),
        home: var("ARCHY_TEST_ROOTLESS_HOME").into(),
        runtime_dir: var("ARCHY_TEST_ROOTLESS_RUNTIME_DIR").into(),
        work: var("ARCHY_TEST_ROOTLESS_WORK").into(),
        podman_args: var("ARCHY_TEST_ROOTLESS_PODMAN_ARGS")
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
    }
}

impl RootlessEnv {
    /// `program` run as the rootless user, with the environment its podman
    /// needs (and so the agent's `podman unshare`), from `cwd`.
    pub fn as_user(&self, cwd: &std::path::Path, program: &std::path::Path) -> Command {
        let mut cmd = Command::new("runuser");
        cmd.arg("-u")
            .arg(&self.user)
            .arg("--")
            .arg("env")
            .arg("-i")
            .arg(format!("--chdir={}", cwd.display()))
            .arg(format!("HOME={}", self.home.display()))
            .arg(format!("XDG_RUNTIME_DIR={}", self.runtime_dir.display()))
            .arg(format!("PATH={}", std::env::var("PATH").unwrap_or_default()))
            .arg(program);
        cmd
    }

    /// The `podman` CLI as the user, on the service's storage.
    pub fn podman(&self) -> Command {
        let mut cmd = self.as_user(&self.work, std::path::Path::new("podman"));
        cmd.args(&self.podman_args);
        cmd
    }

    /// The host uid (or gid) a container's id `n` owns files as: the
    /// user itself for 0, `start + n - 1` of its range otherwise.
    pub fn host_uid(&self, n: u32) -> u32 {
        if n == 0 {
            self.uid
        } else {
            self.subuid.0 + n - 1
        }
    }
}
