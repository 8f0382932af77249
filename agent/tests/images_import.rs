//! Importing the pre-pulled image folder (docs/images.md) into the real
//! Podman service that `cargo xtask test` starts. Every test makes its own
//! images, saves them as archives with the podman CLI, and removes them
//! from the store, so that only an import can bring them back.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use archy_agent::dataroot::DataRoot;
use archy_agent::engine::{Engine, EngineError};
use archy_agent::images::{import_all, EntryOutcome, ImageLock, ImportReport, Ledger, LockEntry, Outcome, LOCK_FILE};
use archy_agent::manifest::{Digest, Naming};
use archy_agent::orchestrator::{AppState, ContainerOrchestrator, Orchestrator, OrchestratorConfig, OrchestratorError};
use archy_agent::reconcile::daemon::{self, AgentConfig};
use common::{env, unique_name, Cleanup, TestEnv};
use sha2::{Digest as _, Sha256};

/// An image folder, a data root and an apps folder of our own.
struct Node {
    tmp: tempfile::TempDir,
    images: PathBuf,
    data: PathBuf,
    apps: PathBuf,
    env: TestEnv,
    cleanup: Cleanup,
}

/// An archive written into the folder, with the entry that describes it.
struct Archive {
    entry: LockEntry,
    path: PathBuf,
}

impl Node {
    fn new() -> Node {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (images, data, apps) = (
            tmp.path().join("images"),
            tmp.path().join("data"),
            tmp.path().join("apps"),
        );
        for dir in [&images, &data, &apps] {
            fs::create_dir_all(dir).expect("folder");
        }
        let env = env();
        let cleanup = Cleanup::new(&env);
        Node {
            tmp,
            images,
            data,
            apps,
            env,
            cleanup,
        }
    }

    fn podman(&self, args: &[&str]) -> String {
        let out = self.env.podman().args(args).output().expect("podman runs");
        assert!(
            out.status.success(),
            "podman {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Makes an image no other test has (busybox and a marker file), saves
    /// it as `<app>.tar` in the folder, and removes it from the store.
    /// `reference` is what the lock says the app's manifest pins;
    /// `None` makes up one on the test registry.
    fn archive(&mut self, app: &str, reference: Option<&str>) -> Archive {
        let marker = unique_name("img");
        let stage = self.tmp.path().join(&marker);
        fs::create_dir_all(stage.join("bin")).expect("stage");
        fs::write(stage.join("marker"), &marker).expect("marker");
        fs::copy("/bin/busybox", stage.join("bin/busybox")).expect("busybox-static is installed");
        for applet in ["sh", "sleep"] {
            std::os::unix::fs::symlink("busybox", stage.join("bin").join(applet)).expect("applet");
        }
        let tar = self.tmp.path().join(format!("{marker}.rootfs.tar"));
        let packed = Command::new("tar")
            .arg("-C")
            .arg(&stage)
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .status()
            .expect("tar runs");
        assert!(packed.success());
        let local = format!("localhost/archy-img/{marker}:1");
        self.podman(&["import", path_str(&tar), &local]);
        let id = self
            .podman(&["inspect", "--format", "{{.Id}}", &local])
            .trim()
            .to_owned();
        let config_digest: Digest = format!("sha256:{}", id.trim_start_matches("sha256:"))
            .parse()
            .expect("an image id is a sha256 digest");
        // Removed at the end whatever happens: an import puts it back.
        self.cleanup.image(config_digest.hex());
        let path = self.images.join(format!("{app}.tar"));
        self.podman(&["save", "--format", "docker-archive", "-o", path_str(&path), &local]);
        self.podman(&["rmi", "--force", &local]);
        assert!(!self.in_store(&config_digest), "the image left the store");

        // No registry ever served this image: its "manifest digest" only
        // has to be the same in the manifest and the lock.
        let manifest_digest = Digest::of(format!("manifest of {marker}").as_bytes());
        let reference = reference.map_or_else(
            || format!("{}/archy-img/{marker}:1@{manifest_digest}", self.env.registry),
            |r| format!("{r}/archy-img/{marker}:1@{manifest_digest}"),
        );
        let bytes = fs::read(&path).expect("archive");
        let entry = LockEntry {
            app: app.to_owned(),
            reference,
            manifest_digest,
            config_digest,
            archive: format!("{app}.tar"),
            archive_sha256: format!("{:x}", Sha256::digest(&bytes)),
            size: bytes.len() as u64,
        };
        Archive { entry, path }
    }

    fn write_lock(&self, entries: &[&LockEntry]) {
        let lock = ImageLock {
            version: 1,
            images: entries.iter().map(|e| (*e).clone()).collect(),
        };
        let json = serde_json::to_vec_pretty(&lock).expect("lock as JSON");
        fs::write(self.images.join(LOCK_FILE), json).expect("write lock");
    }

    fn in_store(&self, digest: &Digest) -> bool {
        self.env
            .podman()
            .args(["image", "exists", digest.hex()])
            .status()
            .expect("podman runs")
            .success()
    }

    async fn import(&self) -> ImportReport {
        let engine = common::engine(&self.env).await;
        import_all(&engine, &self.images, &DataRoot::new(&self.data)).await
    }

    fn ledger(&self) -> Ledger {
        let bytes = fs::read(DataRoot::new(&self.data).images_ledger()).expect("the ledger exists");
        serde_json::from_slice(&bytes).expect("the ledger is valid JSON")
    }
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

fn outcome_of<'a>(report: &'a ImportReport, app: &str) -> &'a EntryOutcome {
    report
        .entries
        .iter()
        .find(|e| e.app == app)
        .unwrap_or_else(|| panic!("no outcome for {app}: {report:#?}"))
}

#[tokio::test]
async fn the_first_import_loads_each_archive_and_the_store_then_holds_its_config_digest() {
    let mut node = Node::new();
    let a = node.archive("alpha", None);
    let b = node.archive("beta", None);
    node.write_lock(&[&a.entry, &b.entry]);

    let report = node.import().await;
    assert!(report.is_clean(), "{report:#?}");
    for archive in [&a, &b] {
        let got = outcome_of(&report, &archive.entry.app);
        assert!(matches!(got.outcome, Outcome::Imported { .. }), "{got:?}");
        assert_eq!(got.config_digest, archive.entry.config_digest);
        assert!(
            node.in_store(&archive.entry.config_digest),
            "{} is in the store",
            archive.entry.app
        );
    }
    let ledger = node.ledger();
    assert_eq!(ledger.images.len(), 2, "{ledger:?}");
    assert!(ledger.images.iter().all(|r| r.imported_at.is_some()), "{ledger:?}");
}

#[tokio::test]
async fn a_second_import_reads_no_archive_and_reports_every_entry_already_present() {
    let mut node = Node::new();
    let a = node.archive("alpha", None);
    let b = node.archive("beta", None);
    node.write_lock(&[&a.entry, &b.entry]);
    let first = node.import().await;
    assert!(first.is_clean(), "{first:#?}");
    let ledger_before = fs::read(DataRoot::new(&node.data).images_ledger()).expect("ledger");

    // Had the second run opened an archive, it would have failed to.
    fs::remove_file(&a.path).expect("remove archive");
    fs::remove_file(&b.path).expect("remove archive");
    let second = node.import().await;
    assert!(second.is_clean(), "{second:#?}");
    assert_eq!(second.entries.len(), 2);
    for e in &second.entries {
        assert_eq!(e.outcome, Outcome::AlreadyPresent, "{e:?}");
    }
    assert_eq!(
        fs::read(DataRoot::new(&node.data).images_ledger()).expect("ledger"),
        ledger_before,
        "nothing new to record, so the ledger keeps its import times"
    );
}

#[tokio::test]
async fn a_tampered_archive_is_skipped_for_its_sha256_while_a_good_one_beside_it_is_imported() {
    let mut node = Node::new();
    let good = node.archive("good", None);
    let bad = node.archive("tampered", None);
    node.write_lock(&[&good.entry, &bad.entry]);
    let mut bytes = fs::read(&bad.path).expect("archive");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    fs::write(&bad.path, bytes).expect("tamper");

    let report = node.import().await;
    let got = outcome_of(&report, "tampered");
    match &got.outcome {
        Outcome::Skipped { reason } => {
            assert!(reason.starts_with("archive sha256 "), "{reason}");
            assert!(
                reason.contains(&format!("does not match the lock's {}", bad.entry.archive_sha256)),
                "{reason}"
            );
        }
        other => panic!("expected Skipped, got {other:?}"),
    }
    assert!(
        !node.in_store(&bad.entry.config_digest),
        "nothing of the tampered archive was loaded"
    );
    assert!(
        matches!(outcome_of(&report, "good").outcome, Outcome::Imported { .. }),
        "{report:#?}"
    );
    assert!(node.in_store(&good.entry.config_digest));
    assert!(!report.is_clean());
    let ledger = node.ledger();
    assert_eq!(
        ledger.images.iter().map(|r| r.app.as_str()).collect::<Vec<_>>(),
        vec!["good"],
        "only what the store holds is recorded"
    );
}

#[tokio::test]
async fn an_archive_holding_another_image_than_the_lock_says_is_skipped_after_loading() {
    let mut node = Node::new();
    let mut a = node.archive("liar", None);
    let real = a.entry.config_digest.clone();
    a.entry.config_digest = Digest::of(b"an image this archive does not hold");
    node.write_lock(&[&a.entry]);

    let report = node.import().await;
    match &outcome_of(&report, "liar").outcome {
        Outcome::Skipped { reason } => {
            assert!(
                reason.starts_with(&format!("loaded, but the store has no image {}", a.entry.config_digest)),
                "{reason}"
            );
            // What the engine said it loaded: the archive's own tag.
            assert!(reason.contains("holds [localhost/archy-img/img-"), "{reason}");
        }
        other => panic!("expected Skipped, got {other:?}"),
    }
    // The load itself happened: the check after it is what caught the lie.
    assert!(node.in_store(&real));
    assert!(!report.is_clean());
}

#[tokio::test]
async fn a_corrupt_ledger_is_moved_aside_and_rebuilt_from_the_engine() {
    let mut node = Node::new();
    let a = node.archive("alpha", None);
    node.write_lock(&[&a.entry]);
    assert!(node.import().await.is_clean());
    let path = DataRoot::new(&node.data).images_ledger();
    fs::write(&path, b"{\"version\": 1, \"images\": [ truncated").expect("corrupt the ledger");

    let report = node.import().await;
    assert_eq!(outcome_of(&report, "alpha").outcome, Outcome::AlreadyPresent);
    assert!(
        report
            .notes
            .iter()
            .any(|n| n.contains("was corrupt") && n.contains("rebuilt from the engine")),
        "{report:#?}"
    );
    let aside: Vec<PathBuf> = fs::read_dir(path.parent().expect("state folder"))
        .expect("state folder")
        .map(|e| e.expect("entry").path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("images.json.corrupt-"))
        })
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(
        fs::read(&aside[0]).expect("moved file"),
        b"{\"version\": 1, \"images\": [ truncated",
        "the corrupt file is kept as it was"
    );
    let ledger = node.ledger();
    assert_eq!(ledger.images.len(), 1, "{ledger:?}");
    assert_eq!(ledger.images[0].config_digest, a.entry.config_digest);
    assert_eq!(
        ledger.images[0].imported_at, None,
        "the engine knows the image is there, not when it came"
    );
}

#[tokio::test]
async fn a_missing_folder_or_lock_is_an_empty_report_with_a_note_and_an_unusable_lock_an_error() {
    let node = Node::new();
    let engine = common::engine(&node.env).await;

    let nowhere = node.tmp.path().join("no-such-folder");
    let report = import_all(&engine, &nowhere, &DataRoot::new(&node.data)).await;
    assert!(report.entries.is_empty() && report.error.is_none(), "{report:#?}");
    assert!(
        report.notes.iter().any(|n| n.contains("no image folder at")),
        "{report:#?}"
    );
    assert!(report.is_clean());

    let report = import_all(&engine, &node.images, &DataRoot::new(&node.data)).await;
    assert!(
        report.notes.iter().any(|n| n.contains("no images.lock.json in")),
        "{report:#?}"
    );
    assert!(report.is_clean());

    fs::write(node.images.join(LOCK_FILE), r#"{"version": 2, "images": []}"#).expect("lock");
    let report = import_all(&engine, &node.images, &DataRoot::new(&node.data)).await;
    let error = report.error.as_deref().expect("an unusable lock is an error");
    assert!(
        error.contains("images.lock.json: version: 2 is not supported"),
        "{error}"
    );
    assert!(!report.is_clean());
    assert!(
        !DataRoot::new(&node.data).images_ledger().exists(),
        "nothing imported, nothing recorded"
    );
}

#[tokio::test]
async fn loading_a_file_that_is_not_an_archive_is_load_failed_and_a_missing_one_unreadable() {
    let node = Node::new();
    let engine: Engine = common::engine(&node.env).await;
    let junk = node.images.join("junk.tar");
    fs::write(&junk, b"this is not a tarball").expect("junk");
    match engine.load_image(&junk).await {
        Err(EngineError::LoadFailed { archive, message }) => {
            assert_eq!(archive, junk);
            // Podman refuses what it cannot read with a 500.
            assert!(message.starts_with("HTTP 500: "), "{message}");
        }
        other => panic!("expected LoadFailed, got {other:?}"),
    }
    let missing = node.images.join("missing.tar");
    match engine.load_image(&missing).await {
        Err(EngineError::Archive { archive, source }) => {
            assert_eq!(archive, missing);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected Archive, got {other:?}"),
    }
}

impl Node {
    /// Writes a manifest for `id` running `reference`, and removes its
    /// container at the end.
    fn app(&mut self, id: &str, reference: &str) {
        let app_dir = self.apps.join(id);
        fs::create_dir_all(&app_dir).expect("app folder");
        fs::write(
            app_dir.join("manifest.yml"),
            format!(
                "id: {id}\nname: {id}\nversion: \"1.0\"\nimage: {reference}\nstop_grace_period: 1s\ncommand: [\"sleep\", \"300\"]\n"
            ),
        )
        .expect("manifest");
        self.cleanup.also_container(id);
    }

    async fn orchestrator(&self) -> Orchestrator {
        let engine = Engine::connect(&self.env.engine_socket).await.expect("engine");
        Orchestrator::new(
            engine,
            OrchestratorConfig {
                apps_dir: self.apps.clone(),
                data_root: DataRoot::new(&self.data),
                naming: Naming::Prod,
                images_dir: self.images.clone(),
            },
        )
    }
}

#[tokio::test]
async fn installing_an_app_whose_image_is_only_in_the_folder_imports_it_with_no_registry_reachable() {
    let mut node = Node::new();
    // Nothing listens on port 1: a pull from there can only fail.
    let a = node.archive("offline", Some("127.0.0.1:1"));
    node.write_lock(&[&a.entry]);
    let id = unique_name("offline").replace('_', "-");
    node.app(&id, &a.entry.reference);
    let orch = node.orchestrator().await;

    // No import ran: the image is in the folder only.
    assert!(!node.in_store(&a.entry.config_digest));
    let report = orch.install(&id).await.expect("install from the image folder");
    assert!(report.attempts.is_empty(), "no pull: {:?}", report.attempts);
    assert!(!report.built);
    assert_eq!(report.image_id, a.entry.config_digest.as_str());
    assert_eq!(orch.status(&id).await.expect("status").state, AppState::Running);
    let runs = node.podman(&["inspect", "--format", "{{.Image}}", &id]);
    assert_eq!(
        runs.trim(),
        a.entry.config_digest.hex(),
        "the container runs the archive's image"
    );
    let ledger = node.ledger();
    assert_eq!(ledger.images.len(), 1, "{ledger:?}");
    assert_eq!(ledger.images[0].config_digest, a.entry.config_digest);
    assert!(ledger.images[0].imported_at.is_some(), "{ledger:?}");
}

#[tokio::test]
async fn an_install_whose_archive_fails_its_check_pulls_instead() {
    let mut node = Node::new();
    let a = node.archive("tampered", Some("127.0.0.1:1"));
    fs::write(&a.path, b"not the archive the lock describes").expect("tamper");
    node.write_lock(&[&a.entry]);
    let id = unique_name("tampered").replace('_', "-");
    node.app(&id, &a.entry.reference);
    let orch = node.orchestrator().await;

    // The lock alone is not enough: what is loaded must be what it says.
    match orch.install(&id).await {
        Err(OrchestratorError::PullFailed { attempts, .. }) => assert_eq!(attempts.len(), 1, "{attempts:?}"),
        other => panic!("expected the pull after a refused archive, got {other:?}"),
    }
    assert!(!node.in_store(&a.entry.config_digest));
}

/// Without the retry (the hook in `daemon::run` removed) this fails: the
/// archive put back is never imported.
#[tokio::test]
async fn an_archive_that_failed_at_boot_is_imported_on_a_later_pass_once_put_right() {
    let mut node = Node::new();
    let app = node.archive("served", Some("127.0.0.1:1"));
    // An image no manifest runs: only the retry can bring it in.
    let spare = node.archive("spare", None);
    node.write_lock(&[&app.entry, &spare.entry]);
    let id = unique_name("served").replace('_', "-");
    node.app(&id, &app.entry.reference);
    let away = node.tmp.path().join("spare.tar.away");
    fs::rename(&spare.path, &away).expect("the archive is missing at boot");

    let config = AgentConfig {
        engine: node.env.engine_socket.clone(),
        apps_dir: node.apps.clone(),
        data_root: DataRoot::new(&node.data),
        images_dir: node.images.clone(),
        naming: Naming::Prod,
        resync: Duration::from_secs(1),
        control: None,
        os_boot_status: node.data.join("no-boot.json"),
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (_req_tx, req_rx) = tokio::sync::mpsc::channel(1);
    let agent = tokio::spawn(daemon::run(config, req_rx, async move {
        let _ = stop_rx.await;
    }));
    // The first pass installed the app: the boot import is over.
    let ran = common::eventually(Duration::from_secs(60), || async {
        let out = node
            .env
            .podman()
            .args(["inspect", "--format", "{{.State.Status}}", &id])
            .output()
            .ok()?;
        (String::from_utf8_lossy(&out.stdout).trim() == "running").then_some(())
    })
    .await;
    assert!(ran.is_some(), "the first pass never started {id}");
    assert!(!node.in_store(&spare.entry.config_digest), "skipped at boot");

    fs::rename(&away, &spare.path).expect("put the archive back");
    let put_back = Instant::now();
    // The first retry is due 10 s after boot; passes come every second.
    let imported = common::eventually(Duration::from_secs(45), || async {
        node.in_store(&spare.entry.config_digest).then_some(())
    })
    .await;
    assert!(
        imported.is_some(),
        "the archive put back was not imported within {:?}",
        put_back.elapsed()
    );
    // The ledger is written just after the store has the image.
    let recorded = common::eventually(Duration::from_secs(10), || async {
        let bytes = fs::read(DataRoot::new(&node.data).images_ledger()).ok()?;
        let ledger: Ledger = serde_json::from_slice(&bytes).ok()?;
        ledger
            .images
            .iter()
            .any(|r| r.app == "spare" && r.config_digest == spare.entry.config_digest && r.imported_at.is_some())
            .then_some(())
    })
    .await;
    assert!(recorded.is_some(), "no ledger record: {:?}", node.ledger());
    let _ = stop_tx.send(());
    agent.await.expect("agent task").expect("agent exits cleanly");
}

#[tokio::test]
async fn images_import_prints_a_table_and_exits_non_zero_when_an_entry_is_skipped() {
    let mut node = Node::new();
    let good = node.archive("good", None);
    let bad = node.archive("broken", None);
    fs::write(&bad.path, b"short").expect("truncate");
    node.write_lock(&[&good.entry, &bad.entry]);
    let run = |json: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_archy-agent"));
        for var in ["ARCHY_APPS", "ARCHY_DATA", "ARCHY_ENGINE", "ARCHY_IMAGES"] {
            cmd.env_remove(var);
        }
        cmd.arg("--images")
            .arg(&node.images)
            .arg("--data")
            .arg(&node.data)
            .arg("--engine")
            .arg(&node.env.engine_socket)
            .args(["images", "import"]);
        if json {
            cmd.arg("--json");
        }
        cmd.output().expect("archy-agent runs")
    };

    let out = run(false);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].starts_with("APP") && lines[0].contains("OUTCOME") && lines[0].ends_with("DETAIL"));
    assert!(
        lines.iter().any(|l| l.starts_with("good") && l.contains("imported")),
        "{stdout}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("broken") && l.contains("skipped") && l.contains("the lock says")),
        "{stdout}"
    );
    assert!(
        stdout.contains("1 imported, 0 already present, 1 skipped from"),
        "{stdout}"
    );

    let out = run(true);
    assert_eq!(out.status.code(), Some(1));
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON output");
    let outcomes: Vec<&str> = value["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["outcome"].as_str().expect("outcome"))
        .collect();
    assert_eq!(outcomes, vec!["already_present", "skipped"]);
}
