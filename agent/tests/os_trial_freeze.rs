//! The agent's freeze while an OS release is on trial, against the real
//! Podman service: with `boot.json` saying trial, a changed manifest is
//! not applied and a new app is not installed, while a stopped container
//! is still started; once `boot.json` says committed, the next resync
//! applies both.

mod common;

use std::time::{Duration, Instant};

use archy_agent::orchestrator::ContainerOrchestrator as _;
use archy_agent::os::records::{BootStatus, Slot, SlotState, SlotStatus, FORMAT};
use archy_agent::reconcile::daemon;
use common::node::{app_id, Node, SERVE};

fn boot_status(trial: bool) -> BootStatus {
    let slot = |version: &str, state| SlotStatus {
        version: Some(version.to_owned()),
        state,
        tries: 0,
    };
    BootStatus {
        format: FORMAT,
        booted_slot: Slot::B,
        booted_version: Some("2.0.0".to_owned()),
        a: slot("1.0.0", SlotState::Good),
        b: slot("2.0.0", if trial { SlotState::Trying } else { SlotState::Good }),
        committed: !trial,
        trial,
        degraded: false,
        trial_deadline_secs: trial.then_some(900),
        last_rollback: None,
    }
}

fn state(node: &Node, name: &str) -> String {
    node.podman(&["inspect", "--format", "{{.State.Status}}", name])
        .trim()
        .to_owned()
}

fn env_new(node: &Node, name: &str) -> String {
    node.podman(&["exec", name, "sh", "-c", "echo $NEW"]).trim().to_owned()
}

/// Waits up to `secs` for `what`, saying `failure` otherwise.
async fn until(secs: u64, failure: &str, mut what: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !what() {
        assert!(Instant::now() < deadline, "{failure}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn an_os_trial_holds_app_changes_until_the_commit_but_still_starts_containers() {
    let node = Node::new();
    let image = node.env.image.to_string();
    let (kept, added) = (app_id("trial-kept"), app_id("trial-new"));
    node.app(&kept, &image, SERVE);
    let orch = node.orchestrator().await;
    orch.install(&kept).await.expect("install before the update");
    let id_before = node
        .podman(&["inspect", "--format", "{{.Id}}", &kept])
        .trim()
        .to_owned();
    // The new release's manifests: one app changed, one new.
    node.app(&kept, &image, &format!("{SERVE}env: {{ NEW: \"1\" }}\n"));
    node.app(&added, &image, SERVE);
    // Stopped: the agent must start it even on trial.
    node.podman(&["stop", "-t", "1", &kept]);
    let config = node.agent_config(Duration::from_secs(1));
    boot_status(true)
        .write(&config.os_boot_status)
        .expect("boot.json fixture");
    let boot_json = config.os_boot_status.clone();

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (_req_tx, req_rx) = tokio::sync::mpsc::channel(1);
    let agent = tokio::spawn(daemon::run(config, req_rx, async move {
        let _ = stop_rx.await;
    }));
    until(60, "the stopped app was not started on trial", || {
        state(&node, &kept) == "running"
    })
    .await;
    // Several resyncs (1 s each): still the old container, no new app.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let id_trial = node
        .podman(&["inspect", "--format", "{{.Id}}", &kept])
        .trim()
        .to_owned();
    assert_eq!(id_trial, id_before, "recreated while the OS was on trial");
    assert_eq!(env_new(&node, &kept), "", "the changed manifest was applied on trial");
    assert_eq!(state(&node, &added), "", "the new app was installed on trial");

    // The commit: boot.json rewritten; the next resync plans normally.
    boot_status(false).write(&boot_json).expect("boot.json committed");
    until(60, "the changed manifest was not applied after the commit", || {
        state(&node, &kept) == "running" && env_new(&node, &kept) == "1"
    })
    .await;
    until(60, "the new app was not installed after the commit", || {
        state(&node, &added) == "running"
    })
    .await;
    let _ = stop_tx.send(());
    if let Err(e) = agent.await.expect("agent task") {
        panic!("the agent did not exit cleanly: {e:#}");
    }
}
