//! `cargo xtask images` against the loopback registries that `cargo xtask
//! test` starts: fallback through the registry list, the registry with basic
//! auth, a tampered blob, a second run that downloads nothing, `podman load`
//! of the archives, and an app with `build`.
//!
//! Each test pushes an image of its own (a unique marker file makes unique
//! layers), so tampering one never touches another test's content. Without
//! the `ARCHY_TEST_*` variables every test fails: run them through
//! `cargo xtask test`.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use serde_json::Value;

struct TestEnv {
    registry: String,
    auth_registry: String,
    auth_user: String,
    auth_password: String,
    podman_args: Vec<String>,
    containers_conf: String,
    registries_conf: String,
    storage_conf: String,
    registry_data: PathBuf,
}

fn var(name: &str) -> String {
    match std::env::var(name) {
        Ok(value) if !value.is_empty() => value,
        _ => panic!(
            "{name} is not set: run the integration tests through `cargo xtask test`, which starts the services they need"
        ),
    }
}

fn env() -> TestEnv {
    TestEnv {
        registry: var("ARCHY_TEST_REGISTRY"),
        auth_registry: var("ARCHY_TEST_AUTH_REGISTRY"),
        auth_user: var("ARCHY_TEST_AUTH_USER"),
        auth_password: var("ARCHY_TEST_AUTH_PASSWORD"),
        podman_args: var("ARCHY_TEST_PODMAN_ARGS")
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
        containers_conf: var("ARCHY_TEST_CONTAINERS_CONF"),
        registries_conf: var("ARCHY_TEST_REGISTRIES_CONF"),
        storage_conf: var("ARCHY_TEST_STORAGE_CONF"),
        registry_data: var("ARCHY_TEST_REGISTRY_DATA").into(),
    }
}

impl TestEnv {
    /// The podman CLI on the test service's private storage.
    fn podman(&self) -> Command {
        let mut cmd = Command::new("podman");
        cmd.args(&self.podman_args);
        self.podman_env(&mut cmd);
        cmd
    }

    fn podman_env(&self, cmd: &mut Command) {
        cmd.env("CONTAINERS_CONF", &self.containers_conf)
            .env("CONTAINERS_REGISTRIES_CONF", &self.registries_conf)
            .env("CONTAINERS_STORAGE_CONF", &self.storage_conf);
    }

    fn podman_ok(&self, args: &[&str]) -> String {
        let out = self.podman().args(args).output().expect("running podman");
        assert!(
            out.status.success(),
            "podman {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

fn unique(prefix: &str) -> String {
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

/// A port nothing listens on (it was free a moment ago).
fn dead_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// One test's folders: manifests, output, cache.
struct Work {
    _tmp: tempfile::TempDir,
    manifests: PathBuf,
    out: PathBuf,
    cache: PathBuf,
    root: PathBuf,
}

impl Work {
    fn new() -> Work {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().to_path_buf();
        let work = Work {
            manifests: root.join("manifests"),
            out: root.join("out"),
            cache: root.join("cache"),
            root,
            _tmp: tmp,
        };
        fs::create_dir_all(&work.manifests).expect("manifests dir");
        work
    }

    fn app(&self, id: &str, image_or_build: &str) {
        let dir = self.manifests.join(id);
        fs::create_dir_all(&dir).expect("app dir");
        fs::write(
            dir.join("manifest.yml"),
            format!("id: {id}\nname: {id}\nversion: \"1\"\n{image_or_build}\n"),
        )
        .expect("manifest");
    }

    fn registries(&self, entries: &[String]) -> PathBuf {
        let path = self.root.join(format!("{}.json", unique("registries")));
        fs::write(
            &path,
            format!("{{\"version\": 1, \"registries\": [{}]}}", entries.join(", ")),
        )
        .expect("registries file");
        path
    }

    /// Runs `xtask images` on these folders, with `extra` arguments.
    fn run(&self, env: &TestEnv, extra: &[&str]) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_xtask"));
        cmd.arg("images")
            .arg("--manifests")
            .arg(&self.manifests)
            .arg("--out")
            .arg(&self.out)
            .arg("--cache")
            .arg(&self.cache)
            .args(extra);
        // Builds go to the test service's storage, not the machine's.
        env.podman_env(&mut cmd);
        cmd.output().expect("running xtask images")
    }

    fn lock(&self) -> Value {
        let text = fs::read_to_string(self.out.join("images.lock.json")).expect("lock file");
        serde_json::from_str(&text).expect("lock json")
    }
}

fn registry_entry(name: &str, host: &str, priority: i32, login: Option<(&str, &str)>) -> String {
    let auth = login
        .map(|(u, p)| format!(", \"auth\": {{\"username\": \"{u}\", \"password\": \"{p}\"}}"))
        .unwrap_or_default();
    format!("{{\"name\": \"{name}\", \"url\": \"http://{host}\", \"priority\": {priority}{auth}}}")
}

fn text(out: &Output) -> String {
    format!(
        "status: {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn sha256_hex(path: &Path) -> String {
    use sha2::Digest as _;
    let bytes = fs::read(path).expect("read");
    format!("{:x}", sha2::Sha256::digest(bytes))
}

/// Pushes a busybox image with a unique marker to `registry`; returns
/// `registry/archy-images/<marker>:1@sha256:…`.
fn push_unique(env: &TestEnv, work: &Work, registry: &str, creds: Option<&str>) -> String {
    let marker = unique("img");
    let stage = work.root.join(&marker);
    fs::create_dir_all(stage.join("bin")).expect("stage");
    fs::write(stage.join("marker"), &marker).expect("marker");
    fs::copy("/bin/busybox", stage.join("bin/busybox")).expect("busybox-static is installed");
    std::os::unix::fs::symlink("busybox", stage.join("bin/sh")).expect("applet");
    let tar = work.root.join(format!("{marker}.tar"));
    let ok = Command::new("tar")
        .args(["--numeric-owner", "--owner=0", "--group=0", "-C"])
        .arg(&stage)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .expect("tar");
    assert!(ok.success());
    let local = format!("localhost/archy-images/{marker}:1");
    env.podman_ok(&["import", "--quiet", tar.to_str().expect("utf8"), &local]);
    let remote = format!("{registry}/archy-images/{marker}:1");
    let digest_file = work.root.join(format!("{marker}.digest"));
    let mut push = env.podman();
    push.args(["push", "--quiet", "--tls-verify=false", "--digestfile"])
        .arg(&digest_file);
    if let Some(creds) = creds {
        push.args(["--creds", creds]);
    }
    let pushed = push.args([&local, &remote]).output().expect("push");
    assert!(pushed.status.success(), "push to {registry}: {}", text(&pushed));
    env.podman_ok(&["rmi", "--force", &local]);
    let digest = fs::read_to_string(&digest_file).expect("digest").trim().to_owned();
    format!("{remote}@{digest}")
}

/// `image` as served by another host (same repository and digest).
fn on_host(image: &str, host: &str) -> String {
    let (_, rest) = image.split_once('/').expect("a host");
    format!("{host}/{rest}")
}

fn only_entry(lock: &Value) -> &Value {
    assert_eq!(lock["version"], 1, "{lock}");
    let images = lock["images"].as_array().expect("images");
    assert_eq!(images.len(), 1, "{lock}");
    &images[0]
}

/// Removes images loaded by a test, also when it fails.
struct Loaded<'a>(&'a TestEnv, Vec<String>);

impl Drop for Loaded<'_> {
    fn drop(&mut self) {
        if !self.1.is_empty() {
            let _ = self
                .0
                .podman()
                .args(["rmi", "--force", "--ignore"])
                .args(&self.1)
                .output();
        }
    }
}

#[test]
fn images_fall_back_through_the_registry_list_in_priority_order() {
    let env = env();
    let work = Work::new();
    let pushed = push_unique(&env, &work, &env.registry, None);
    // The image names a registry that is down; so is the first mirror.
    let own = format!("127.0.0.1:{}", dead_port());
    let image = on_host(&pushed, &own);
    work.app("fallback-app", &format!("image: {image}"));
    let registries = work.registries(&[
        registry_entry("dead-mirror", &format!("127.0.0.1:{}", dead_port()), 10, None),
        registry_entry("live-fallback", &env.registry, 200, None),
    ]);
    let out = work.run(&env, &["--registries", registries.to_str().expect("utf8")]);
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dead_at = stdout.find("registry `dead-mirror`").expect(&log);
    let own_at = stdout
        .find(&format!("{own} (the image's own registry) failed"))
        .expect(&log);
    let live_at = stdout.find("from registry `live-fallback`").expect(&log);
    assert!(dead_at < own_at && own_at < live_at, "{log}");
    assert!(stdout.contains("==> images:"), "{log}");

    let lock = work.lock();
    let entry = only_entry(&lock);
    assert_eq!(entry["app"], "fallback-app");
    assert_eq!(entry["reference"], image.as_str(), "the manifest's image, as written");
    let pinned = image.rsplit_once('@').expect("digest").1;
    assert_eq!(
        entry["manifest_digest"], pinned,
        "a single-platform image keeps its digest"
    );
    assert_eq!(entry["archive"], "fallback-app.tar");
    let archive = work.out.join("fallback-app.tar");
    assert_eq!(entry["archive_sha256"], sha256_hex(&archive).as_str());
    assert_eq!(entry["size"], fs::metadata(&archive).expect("archive").len());
    assert!(entry["config_digest"].as_str().expect("config").starts_with("sha256:"));
}

#[test]
fn a_second_run_downloads_nothing_and_podman_loads_the_archive_as_the_locked_image() {
    let env = env();
    let work = Work::new();
    let pushed = push_unique(&env, &work, &env.registry, None);
    work.app("cached-app", &format!("image: {pushed}"));
    let first = work.run(&env, &[]);
    assert!(first.status.success(), "{}", text(&first));
    assert!(!String::from_utf8_lossy(&first.stdout).contains("downloaded 0 bytes"));
    let archive = work.out.join("cached-app.tar");
    let first_sha256 = sha256_hex(&archive);

    // The registry is out of reach now: only the cache can serve the run.
    let unreachable = on_host(&pushed, &format!("127.0.0.1:{}", dead_port()));
    work.app("cached-app", &format!("image: {unreachable}"));
    let second = work.run(&env, &[]);
    let log = text(&second);
    assert!(second.status.success(), "{log}");
    assert!(
        String::from_utf8_lossy(&second.stdout).contains("images: downloaded 0 bytes (0 blobs), 3 blobs from cache"),
        "{log}"
    );
    let lock = work.lock();

    // Named as at first, the image comes out of the cache byte for byte.
    work.app("cached-app", &format!("image: {pushed}"));
    let third = work.run(&env, &[]);
    let log = text(&third);
    assert!(third.status.success(), "{log}");
    assert!(
        String::from_utf8_lossy(&third.stdout).contains("downloaded 0 bytes (0 blobs)"),
        "{log}"
    );
    assert_eq!(
        sha256_hex(&archive),
        first_sha256,
        "the same image gives the same bytes"
    );
    assert_eq!(
        work.lock()["images"][0]["config_digest"],
        lock["images"][0]["config_digest"]
    );

    let lock = work.lock();
    let entry = only_entry(&lock);
    let config_digest = entry["config_digest"].as_str().expect("config digest").to_owned();
    let id = config_digest.strip_prefix("sha256:").expect("sha256").to_owned();
    let mut loaded = Loaded(&env, Vec::new());
    let out = env.podman_ok(&["load", "--input", archive.to_str().expect("utf8")]);
    loaded.1.push(id.clone());
    assert!(out.contains("Loaded image"), "{out}");
    let tag = pushed.rsplit_once('@').expect("digest").0;
    let loaded_id = env.podman_ok(&["image", "inspect", "--format", "{{.Id}}", tag]);
    assert_eq!(
        loaded_id.trim(),
        id,
        "the image ID after load is the locked config digest"
    );
    let marker = env.podman_ok(&[
        "run",
        "--rm",
        "--network",
        "none",
        &id,
        "/bin/busybox",
        "cat",
        "/marker",
    ]);
    assert!(pushed.contains(marker.trim()), "{marker} / {pushed}");
}

#[test]
fn the_auth_registry_refuses_without_the_login_and_serves_with_it() {
    let env = env();
    let work = Work::new();
    let creds = format!("{}:{}", env.auth_user, env.auth_password);
    let image = push_unique(&env, &work, &env.auth_registry, Some(&creds));
    work.app("auth-app", &format!("image: {image}"));

    let refused = work.run(&env, &[]);
    let log = text(&refused);
    assert!(!refused.status.success(), "{log}");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("auth-app: no registry could provide"), "{log}");
    assert!(stderr.contains("Not authorized"), "{log}");
    assert!(!work.out.join("images.lock.json").exists(), "{log}");

    let registries = work.registries(&[registry_entry(
        "auth",
        &env.auth_registry,
        100,
        Some((&env.auth_user, &env.auth_password)),
    )]);
    let served = work.run(&env, &["--registries", registries.to_str().expect("utf8")]);
    let log = text(&served);
    assert!(served.status.success(), "{log}");
    assert!(!log.contains(&env.auth_password), "the password is never printed");
    assert_eq!(only_entry(&work.lock())["app"], "auth-app");
}

#[test]
fn a_tampered_blob_fails_the_build_naming_the_image_the_blob_and_the_registry() {
    let env = env();
    let work = Work::new();
    let image = push_unique(&env, &work, &env.registry, None);
    let digest = image.rsplit_once('@').expect("digest").1;
    let blob = |digest: &str| -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("sha256");
        env.registry_data
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    };
    let manifest: Value = serde_json::from_slice(&fs::read(blob(digest)).expect("manifest blob")).expect("json");
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .expect("layer digest")
        .to_owned();
    let path = blob(&layer);
    let mut bytes = fs::read(&path).expect("layer blob");
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    fs::write(&path, &bytes).expect("tamper");

    work.app("tampered-app", &format!("image: {image}"));
    let out = work.run(&env, &[]);
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("tampered-app"), "{log}");
    assert!(stderr.contains(&image), "{log}");
    assert!(stderr.contains(&format!("layer blob {layer}")), "{log}");
    assert!(
        stderr.contains(&format!("{} (the image's own registry)", env.registry)),
        "{log}"
    );
    assert!(stderr.contains("does not match its digest"), "{log}");
    let hex = layer.strip_prefix("sha256:").expect("sha256");
    assert!(!work.cache.join("blobs/sha256").join(hex).exists(), "{log}");
    assert!(!work.out.join("tampered-app.tar").exists(), "{log}");
}

#[test]
fn an_app_with_build_is_built_and_locked_under_the_agents_build_tag() {
    let env = env();
    let work = Work::new();
    let id = "built-app";
    let marker = unique("built");
    let context = work.manifests.join(id).join("image");
    fs::create_dir_all(&context).expect("context");
    fs::copy("/bin/busybox", context.join("busybox")).expect("busybox-static is installed");
    fs::write(context.join("marker"), &marker).expect("marker");
    fs::write(
        context.join("Containerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\nCOPY marker /marker\nCMD [\"/bin/busybox\", \"cat\", \"/marker\"]\n",
    )
    .expect("containerfile");
    work.app(id, "build: { context: image }");

    let out = work.run(&env, &[]);
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    let report = archy_agent::manifest::load_dir(&work.manifests, &archy_agent::manifest::LoadOptions::default());
    assert!(report.is_clean(), "{:?}", report.errors);
    let manifest = report.get(id).expect("the app loads");
    let tag = archy_agent::orchestrator::built_tag(manifest)
        .expect("hashes")
        .expect("a build tag");

    let lock = work.lock();
    let entry = only_entry(&lock);
    assert_eq!(entry["reference"], tag.as_str());
    assert_eq!(entry["manifest_digest"], entry["config_digest"]);
    let config_digest = entry["config_digest"].as_str().expect("config").to_owned();
    let built_id = env.podman_ok(&["image", "inspect", "--format", "{{.Id}}", &tag]);
    assert_eq!(format!("sha256:{}", built_id.trim()), config_digest);

    // Loaded elsewhere (here: after removing it), it is the same image.
    env.podman_ok(&["rmi", "--force", &tag]);
    let mut loaded = Loaded(&env, vec![built_id.trim().to_owned()]);
    let archive = work.out.join(format!("{id}.tar"));
    env.podman_ok(&["load", "--input", archive.to_str().expect("utf8")]);
    let id_after = env.podman_ok(&["image", "inspect", "--format", "{{.Id}}", &tag]);
    assert_eq!(format!("sha256:{}", id_after.trim()), config_digest);
    let said = env.podman_ok(&["run", "--rm", "--network", "none", &tag]);
    assert_eq!(said.trim(), marker);
    loaded.1.push(tag);
}

#[test]
fn arm64_is_refused_with_a_clear_message() {
    let work = Work::new();
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["images", "--arch", "arm64", "--out"])
        .arg(&work.out)
        .output()
        .expect("running xtask images");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--arch arm64 is not supported"), "{}", text(&out));
    assert!(!work.out.exists());
}
