//! A pass never fails as a whole because one container cannot be
//! observed, against the real Podman service.
//!
//! Reproduced as seen: one container's record removed from the storage
//! library behind Podman's back (as another engine on the same storage
//! does). Podman 4.3.1 then answers HTTP 500 "getting container from store
//! …: container not known" for the whole Docker listing and for that
//! container's inspect. Removing the container's storage folder alone does
//! not do it: the running container keeps it busy, and the listing never
//! looks at it.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use archy_agent::orchestrator::{AppState, ContainerOrchestrator};
use archy_agent::reconcile::pass::Reconciler;
use archy_agent::reconcile::plan::{Action, Decision, Wait};
use common::node::{app_id, decision, Node, SERVE};

/// Runs `edit` on the storage library's container records under its
/// lock, then marks the library as written so the service reads it again
/// (containers/storage compares the writer token at the start of the lock
/// file).
fn edit_records(graph_root: &Path, edit: impl FnOnce(Vec<serde_json::Value>) -> Vec<serde_json::Value>) {
    let dir = graph_root.join("overlay-containers");
    let lock = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("containers.lock"))
        .expect("the storage library's lock");
    // The POSIX record lock (F_SETLKW) containers/storage takes.
    rustix::fs::fcntl_lock(&lock, rustix::fs::FlockOperation::LockExclusive).expect("cannot lock the storage library");
    let path = dir.join("containers.json");
    let records: Vec<serde_json::Value> =
        serde_json::from_slice(&fs::read(&path).expect("records")).expect("records are JSON");
    fs::write(&path, serde_json::to_vec(&edit(records)).expect("encode")).expect("write records");
    let token = format!(
        "{:064x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_nanos()
    );
    std::os::unix::fs::FileExt::write_all_at(&lock, token.as_bytes(), 0).expect("mark written");
    // Closing the descriptor releases the lock.
    drop(lock);
}

/// Puts container records back into the storage library on drop.
struct RestoreRecords {
    graph_root: PathBuf,
    records: Vec<serde_json::Value>,
}

impl Drop for RestoreRecords {
    fn drop(&mut self) {
        let records = std::mem::take(&mut self.records);
        edit_records(&self.graph_root, |mut all| {
            all.extend(records);
            all
        });
    }
}

#[tokio::test]
async fn a_container_the_engine_cannot_describe_is_reported_and_every_other_app_reconciled() {
    let node = Node::new();
    let image = node.env.image.to_string();
    let (broken, stopped, missing) = (app_id("unseen"), app_id("seen"), app_id("absent"));
    let needs = app_id("needs");
    for app in [&broken, &stopped, &missing] {
        node.app(app, &image, SERVE);
    }
    node.app(&needs, &image, &format!("{SERVE}depends_on: [{broken}]\n"));
    let orch = Arc::new(node.orchestrator().await);
    for app in [&broken, &stopped] {
        orch.install(app).await.expect("install");
    }
    node.podman(&["stop", "-t", "1", &stopped]);
    let broken_id = node
        .podman(&["inspect", "--format", "{{.Id}}", &broken])
        .trim()
        .to_owned();
    let graph_root = node
        .podman(&["info", "--format", "{{.Store.GraphRoot}}"])
        .trim()
        .to_owned();
    let mut removed = Vec::new();
    edit_records(Path::new(&graph_root), |records| {
        let (gone, kept) = records
            .into_iter()
            .partition(|r| r["id"].as_str() == Some(broken_id.as_str()));
        removed = gone;
        kept
    });
    assert_eq!(removed.len(), 1, "the broken container's record was found");
    // Put back when the test ends, pass or fail: with its record gone,
    // Podman can neither remove the container nor reset its storage.
    let _restore = RestoreRecords {
        graph_root: PathBuf::from(&graph_root),
        records: removed,
    };

    let mut reconciler = Reconciler::new(orch.clone());
    let report = reconciler.pass().await;
    assert!(report.error.is_none(), "{report:#?}");
    let b = report.apps.iter().find(|a| a.app == broken).expect("reported");
    assert!(
        matches!(&b.decision, Decision::Wait(Wait::Unobservable { error }) if error.contains("container not known")),
        "{b:?}"
    );
    assert!(
        b.error.as_deref().is_some_and(|e| e.contains("container not known")),
        "{b:?}"
    );
    assert_eq!(decision(&report, &stopped), &Decision::Act(Action::Start));
    assert_eq!(decision(&report, &missing), &Decision::Act(Action::Install));
    assert_eq!(
        decision(&report, &needs),
        &Decision::Wait(Wait::Dependency {
            app: broken.clone(),
            state: "unobservable".to_owned()
        })
    );
    for app in [&stopped, &missing] {
        assert!(
            report.apps.iter().all(|a| a.error.is_none() || a.app == broken),
            "{report:#?}"
        );
        assert_eq!(
            orch.status(app).await.expect("status").state,
            AppState::Running,
            "{app}"
        );
    }
    // Never acted on: the same container, still running.
    let name_filter = format!("name=^{broken}$");
    let listed = node.podman(&[
        "ps",
        "-a",
        "--no-trunc",
        "--filter",
        &name_filter,
        "--format",
        "{{.ID}} {{.Status}}",
    ]);
    assert!(
        listed.trim().starts_with(&format!("{broken_id} Up ")),
        "left alone: {listed}"
    );
    // `list` shows it with the engine's error, and every other app.
    let list = orch.list().await.expect("list despite one broken container");
    let shown = list.iter().find(|a| a.app == broken).expect("listed");
    assert_eq!(shown.state, AppState::Unknown);
    assert!(
        shown
            .error
            .as_deref()
            .is_some_and(|e| e.contains("container not known")),
        "{shown:?}"
    );
    assert_eq!(list.len(), 4, "{list:#?}");
}
