//! The agent's freeze while an OS release is on trial, against the real
//! Podman service: with `boot.json` saying trial, a changed manifest is
//! not applied, a changed config template is not rendered (nor the app
//! restarted for it) and a new app is not installed, while a stopped
//! container is still started; once `boot.json` says committed, the next
//! resync applies all three.

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

fn started_at(node: &Node, name: &str) -> String {
    node.podman(&["inspect", "--format", "{{.State.StartedAt}}", name])
        .trim()
        .to_owned()
}

/// An app with one config file whose template says `version`.
fn with_conf(version: &str) -> String {
    format!(
        "{SERVE}volumes: [{{ source: data, target: /data }}]\n\
         files:\n  - path: data/app.conf\n    mode: \"0644\"\n    template: \"v={version}\\n\"\n"
    )
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
    let (kept, added, conf) = (app_id("trial-kept"), app_id("trial-new"), app_id("trial-conf"));
    node.app(&kept, &image, SERVE);
    node.app(&conf, &image, &with_conf("1"));
    let orch = node.orchestrator().await;
    orch.install(&kept).await.expect("install before the update");
    orch.install(&conf).await.expect("install before the update");
    let conf_file = node.data.join(&conf).join("data/app.conf");
    let read_conf = || std::fs::read_to_string(&conf_file).unwrap_or_default();
    assert_eq!(read_conf(), "v=1\n");
    let conf_started = started_at(&node, &conf);
    let id_before = node
        .podman(&["inspect", "--format", "{{.Id}}", &kept])
        .trim()
        .to_owned();
    // The new release's manifests: one app changed, one new.
    node.app(&kept, &image, &format!("{SERVE}env: {{ NEW: \"1\" }}\n"));
    node.app(&added, &image, SERVE);
    node.app(&conf, &image, &with_conf("2"));
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
    assert_eq!(read_conf(), "v=1\n", "the new release's template was rendered on trial");
    assert_eq!(
        started_at(&node, &conf),
        conf_started,
        "an app was restarted for a config change on trial"
    );

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
    until(
        60,
        "the new template was not rendered, the app restarted, after the commit",
        || read_conf() == "v=2\n" && state(&node, &conf) == "running" && started_at(&node, &conf) != conf_started,
    )
    .await;
    let _ = stop_tx.send(());
    if let Err(e) = agent.await.expect("agent task") {
        panic!("the agent did not exit cleanly: {e:#}");
    }
}
