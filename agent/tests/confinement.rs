//! A container cannot make the agent touch a host file: while a real
//! container keeps replacing folders and files of its volume by symlinks
//! to host paths outside the data root, the agent renders, gives and
//! re-renders the app's config files, and the host files never change.
//!
//! The race runs against an engine socket given as a parameter: the
//! rootful service `cargo xtask test` starts, and any other (a rootless
//! one) the same way.

mod common;

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex};

use archy_agent::dataroot::DataRoot;
use archy_agent::engine::Engine;
use archy_agent::files;
use archy_agent::manifest::{load_file, AppId, LoadOptions, Manifest, Naming, PinnedImage};
use archy_agent::spec::{ContainerSpec, Mount};
use common::confine::{snapshot, swapper};

const ROUNDS: usize = 200;
/// Config files of the app, all in the folder the container swaps: each is
/// one more check-then-use the container can race.
const FILES: usize = 16;

/// The log lines the agent writes during a test, kept in memory.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl io::Write for Log {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Log {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}

/// Writes and loads the manifest of app `id`: user 1000, a volume `data`,
/// [`FILES`] config files in its folder `conf`.
fn manifest(apps: &Path, data: &Path, id: &str, image: &PinnedImage) -> Manifest {
    let dir = apps.join(id);
    fs::create_dir_all(&dir).expect("app dir");
    let files: String = (0..FILES)
        .map(|i| format!("  - path: data/conf/app{i}.conf\n    template: \"rendered {i}\\n\"\n"))
        .collect();
    fs::write(
        dir.join("manifest.yml"),
        format!(
            "id: {id}\nname: {id}\nversion: \"1\"\nimage: {}\nuser: \"1000:1000\"\n\
             volumes: [{{ source: data, target: /data }}]\nfiles:\n{files}",
            image.by_digest()
        ),
    )
    .expect("manifest");
    let opts = LoadOptions {
        data_root: DataRoot::new(data),
    };
    load_file(&dir.join("manifest.yml"), &opts).unwrap_or_else(|e| panic!("{e:?}"))
}

/// The race, against the engine at `socket` with `image` in reach of it.
async fn race_on(socket: &Path, image: &PinnedImage) {
    let engine = Engine::connect(socket)
        .await
        .unwrap_or_else(|e| panic!("connecting to {}: {e:#?}", socket.display()));
    engine
        .pull(image, None)
        .await
        .unwrap_or_else(|e| panic!("pulling {}: {e:#?}", image.by_digest()));

    let tmp = tempfile::tempdir().expect("tempdir");
    let (apps, data) = (tmp.path().join("apps"), tmp.path().join("data"));
    // Host files outside the data root, which the container names.
    let host = tmp.path().join("host");
    fs::create_dir_all(&host).expect("host dir");
    let (precious, victim) = (host.join("app0.conf"), host.join("victim"));
    for file in [&precious, &victim] {
        fs::write(file, "host file\n").expect("host file");
        fs::set_permissions(file, fs::Permissions::from_mode(0o644)).expect("chmod");
    }
    let before = [snapshot(&precious), snapshot(&victim)];

    let id = common::node::app_id("confine");
    let m = manifest(&apps, &data, &id, image);
    let all = [m.clone()];
    let data_root = DataRoot::new(&data);
    // The first rendering makes the volume folder, the app's.
    files::sync(&data_root, &m, &all, &Naming::Prod).expect("first rendering");
    let app_dir = data.join(&id);
    let volume = app_dir.join("data");

    let mut spec = ContainerSpec::for_image(AppId::parse(&id).expect("app id"), id.clone(), image.by_digest());
    spec.command = Some(swapper(&host, &victim, FILES));
    spec.user = Some("1000:1000".into());
    spec.network = "podman".into();
    spec.mounts = vec![Mount {
        host: volume.clone(),
        target: "/data".into(),
        read_only: false,
    }];
    spec.update_labels("0");
    engine.create(&spec).await.expect("create the swapper");
    engine.start(&id).await.expect("start the swapper");

    let log = Log::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let guard = tracing::subscriber::set_default(subscriber);
    let mut errors = Vec::new();
    let mut written = 0;
    for _ in 0..ROUNDS {
        match files::sync(&data_root, &m, &all, &Naming::Prod) {
            Ok(changed) => written += changed.len(),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    drop(guard);
    let _ = engine.force_remove(&id).await;

    let after = [snapshot(&precious), snapshot(&victim)];
    assert_eq!(before, after, "a host file changed (content, mode, owner)");
    let mut names: Vec<_> = fs::read_dir(&host)
        .expect("ls host")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["app0.conf", "victim"], "nothing new in the host folder");

    assert!(written > 0, "the agent wrote the file at least once: {errors:#?}");
    let log = log.text();
    let mut refusals = 0;
    for e in &errors {
        assert!(
            e.contains(&app_dir.display().to_string()),
            "names a path in the app's folder: {e}"
        );
        if e.contains("is a symlink or not a plain") {
            refusals += 1;
            // The refused path, as the error names it, is in the log.
            let path = e
                .split(" is a symlink")
                .next()
                .and_then(|head| head.rsplit(": ").next())
                .unwrap_or_default();
            assert!(
                log.lines().any(|l| l.contains("refused") && l.contains(path)),
                "refusal of {path} logged:\n{log}"
            );
        }
    }
    assert!(
        refusals > 0,
        "the container's symlinks were met and refused at least once in {ROUNDS} rounds: {errors:#?}"
    );
}

#[tokio::test]
async fn a_container_swapping_its_folders_for_symlinks_never_makes_the_agent_touch_a_host_file() {
    let env = common::env();
    race_on(&env.engine_socket, &env.image).await;
}

/// `confine-give`, the walk the agent runs inside `podman unshare` when
/// rootless, run here directly: it sets mode and owner on a plain file and
/// refuses, naming the path, a symlinked folder or file on the way.
#[test]
fn confine_give_sets_mode_and_owner_through_the_walk_and_refuses_symlinks() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let app = tmp.path().join("data/app");
    let outside = tmp.path().join("outside");
    fs::create_dir_all(app.join("data/conf")).expect("app");
    fs::create_dir_all(&outside).expect("outside");
    fs::write(outside.join("victim"), "host file\n").expect("victim");
    fs::set_permissions(outside.join("victim"), fs::Permissions::from_mode(0o644)).expect("chmod");
    fs::write(app.join("data/conf/app.conf"), "x").expect("conf");
    std::os::unix::fs::symlink(&outside, app.join("data/linked")).expect("link");
    std::os::unix::fs::symlink(outside.join("victim"), app.join("data/conf/evil.conf")).expect("link");
    let before = snapshot(&outside.join("victim"));
    let give = |rel: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_archy-agent"))
            .arg("confine-give")
            .arg("--app-dir")
            .arg(&app)
            .args(["--path", rel, "--uid", "1000", "--gid", "1001", "--mode", "640"])
            .output()
            .expect("archy-agent runs")
    };
    let ok = give("data/conf/app.conf");
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let md = fs::symlink_metadata(app.join("data/conf/app.conf")).expect("meta");
    assert_eq!(
        (md.permissions().mode() & 0o7777, md.uid(), md.gid()),
        (0o640, 1000, 1001)
    );
    let app_path = |rel: &str| app.join(rel).display().to_string();
    for (rel, named) in [
        // The symlinked folder on the way is what the error names.
        ("data/linked/victim", app_path("data/linked")),
        ("data/conf/evil.conf", app_path("data/conf/evil.conf")),
        ("../outside/victim", app_path("../outside/victim")),
        ("/etc/passwd", "/etc/passwd".to_owned()),
    ] {
        let out = give(rel);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{rel} refused");
        assert!(
            (stderr.contains(&format!("{named} ")) || stderr.contains(&format!("{named}:")))
                && stderr.contains("refus"),
            "{rel}: the error names {named}: {stderr}"
        );
    }
    assert_eq!(snapshot(&outside.join("victim")), before, "the host file is untouched");
}
