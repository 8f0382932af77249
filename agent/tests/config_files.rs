//! Config files against the real Podman service: rendered before the
//! first start, re-rendered by every reconcile pass, and an app restarted
//! exactly when its rendered config changed.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::time::Duration;

use archy_agent::orchestrator::ContainerOrchestrator;
use archy_agent::reconcile::pass::{PassReport, Reconciler};
use archy_agent::reconcile::plan::{Action, Decision, Wait};
use common::node::{app_id, Node};

/// Copies the config the process saw when it started to /data/seen, then
/// waits for SIGTERM.
const READS_CONFIG_AT_START: &str = "command: [\"sh\", \"-c\", \"cat /data/app.conf > /data/seen; trap 'exit 0' TERM; while true; do sleep 1; done\"]\n";

fn decision<'a>(report: &'a PassReport, app: &str) -> &'a Decision {
    let a = report
        .apps
        .iter()
        .find(|a| a.app == app)
        .unwrap_or_else(|| panic!("{app} in {report:#?}"));
    assert_eq!(a.error, None, "{app}: {report:#?}");
    &a.decision
}

/// (container id, StartedAt) as the podman CLI sees them.
fn run_of(node: &Node, container: &str) -> (String, String) {
    let out = node.podman(&["inspect", "--format", "{{.Id}} {{.State.StartedAt}}", container]);
    let (id, started) = out
        .trim()
        .split_once(' ')
        .unwrap_or_else(|| panic!("inspect {container}: {out:?}"));
    (id.to_owned(), started.to_owned())
}

/// Waits until the process of `app` has copied what it read at its start,
/// and checks that it is `want`.
async fn assert_seen(node: &Node, app: &str, want: &str) {
    let path = node.data.join(app).join("data/seen");
    let got = common::eventually(Duration::from_secs(10), || {
        let text = fs::read_to_string(&path).unwrap_or_default();
        async move { (text == want).then_some(text) }
    })
    .await;
    assert_eq!(
        got.as_deref(),
        Some(want),
        "{app} started with {:?}",
        fs::read_to_string(&path).ok()
    );
}

fn mtime(path: &std::path::Path) -> std::time::SystemTime {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[tokio::test]
async fn a_rotated_secret_rewrites_the_configs_that_use_it_and_restarts_only_those_apps() {
    let node = Node::new();
    let image = node.env.image.to_string();
    let (core, client, other) = (app_id("cfgcore"), app_id("cfgclient"), app_id("cfgother"));
    let key = |id: &str| id.replace('-', "_");
    // `core` keeps only a hash of the shared password, like bitcoind.
    node.app(
        &core,
        &image,
        &format!(
            "{READS_CONFIG_AT_START}user: \"1000:1000\"\nvolumes: [{{ source: data, target: /data }}]\n\
             secrets: [{{ name: shared-pw, kind: hex32 }}, {{ name: core-salt, kind: hex16 }}]\n\
             files:\n  - path: data/app.conf\n    template: |\n      \
             rpcauth={{{{ rpcauth(\"archy\", secrets.shared_pw, secrets.core_salt) }}}}\n"
        ),
    );
    // `client` reads the password itself and reaches `core` by name.
    node.app(
        &client,
        &image,
        &format!(
            "{READS_CONFIG_AT_START}user: \"1000:1000\"\ndepends_on: [{core}]\nvolumes: [{{ source: data, target: /data }}]\n\
             secrets: [{{ name: shared-pw, kind: hex32 }}]\n\
             files:\n  - path: data/app.conf\n    template: |\n      \
             host={{{{ facts.containers.{} }}}}\n      password={{{{ secrets.shared_pw }}}}\n",
            key(&core)
        ),
    );
    // `other` has a config without the secret: it must be left alone.
    node.app(
        &other,
        &image,
        &format!(
            "{READS_CONFIG_AT_START}volumes: [{{ source: data, target: /data }}]\n\
             files:\n  - path: data/app.conf\n    mode: \"0644\"\n    template: \"name={{{{ facts.container }}}}\\n\"\n"
        ),
    );
    let orch = Arc::new(node.orchestrator().await);
    let conf = |id: &str| node.data.join(id).join("data/app.conf");

    // The first pass installs every app, each with its file rendered
    // before its container first started.
    let mut reconciler = Reconciler::new(orch.clone());
    let first = reconciler.pass().await;
    assert_eq!(decision(&first, &core), &Decision::Act(Action::Install));
    let second = reconciler.pass().await;
    for app in [&client, &other] {
        let d = decision(&second, app);
        assert!(
            matches!(d, Decision::Act(Action::Install) | Decision::Wait(Wait::Ok)),
            "{app}: {d:?}"
        );
    }
    let password = fs::read_to_string(node.data.join("secrets/shared-pw")).expect("generated");
    let client_conf = fs::read_to_string(conf(&client)).expect("rendered");
    assert_eq!(client_conf, format!("host={core}\npassword={password}\n"));
    // The first start already saw the files.
    assert_seen(&node, &client, &client_conf).await;
    let core_conf = fs::read_to_string(conf(&core)).expect("rendered");
    assert!(core_conf.starts_with("rpcauth=archy:"), "{core_conf}");
    assert_seen(&node, &core, &core_conf).await;
    assert_seen(&node, &other, &format!("name={other}\n")).await;
    // Owned by the declared uid, readable by it alone.
    let meta = fs::metadata(conf(&client)).expect("meta");
    assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o7777), (1000, 1000, 0o600));
    assert_eq!(fs::metadata(conf(&other)).expect("meta").mode() & 0o7777, 0o644);

    // Unchanged: passes leave the files and the containers alone.
    let before: Vec<_> = [&core, &client, &other]
        .iter()
        .map(|a| (mtime(&conf(a)), run_of(&node, a)))
        .collect();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for _ in 0..2 {
        let report = reconciler.pass().await;
        for app in [&core, &client, &other] {
            assert_eq!(decision(&report, app), &Decision::Wait(Wait::Ok), "{app}");
        }
    }
    let after: Vec<_> = [&core, &client, &other]
        .iter()
        .map(|a| (mtime(&conf(a)), run_of(&node, a)))
        .collect();
    assert_eq!(after, before, "no file rewritten, no container restarted");

    // The shared secret is rotated on disk.
    let rotated = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    fs::write(node.data.join("secrets/shared-pw"), rotated).expect("rotate");
    let report = reconciler.pass().await;
    for app in [&core, &client] {
        assert_eq!(
            decision(&report, app),
            &Decision::Act(Action::Restart {
                reason: "config changed: data/app.conf, /run/secrets/shared-pw".to_owned()
            }),
            "{app}"
        );
    }
    assert_eq!(decision(&report, &other), &Decision::Wait(Wait::Ok));
    let client_conf = fs::read_to_string(conf(&client)).expect("rendered");
    assert_eq!(client_conf, format!("host={core}\npassword={rotated}\n"));
    // The restarted processes read the new files.
    assert_seen(&node, &client, &client_conf).await;
    let new_core_conf = fs::read_to_string(conf(&core)).expect("rendered");
    assert_ne!(new_core_conf, core_conf, "the rpcauth line follows the password");
    assert_seen(&node, &core, &new_core_conf).await;
    for (i, app) in [&core, &client].into_iter().enumerate() {
        let (id, started) = run_of(&node, app);
        assert_eq!(id, before[i].1 .0, "{app}: restarted, not recreated");
        assert_ne!(started, before[i].1 .1, "{app}: a new run");
    }
    assert_eq!(run_of(&node, &other), before[2].1, "{other} was not restarted");
    assert_eq!(mtime(&conf(&other)), before[2].0, "{other}'s file was not rewritten");

    // The restart is done: the next pass leaves everything alone.
    let report = reconciler.pass().await;
    for app in [&core, &client, &other] {
        assert_eq!(decision(&report, app), &Decision::Wait(Wait::Ok), "{app}");
    }
    let state = fs::read_to_string(node.data.join("state/agent.json")).expect("state");
    assert!(!state.contains("config_changed"), "no restart pending: {state}");
}

#[tokio::test]
async fn a_dry_run_writes_nothing_and_start_or_install_make_the_app_read_its_new_config() {
    let node = Node::new();
    let image = node.env.image.to_string();
    let app = app_id("cfgpending");
    node.app(
        &app,
        &image,
        &format!(
            "{READS_CONFIG_AT_START}volumes: [{{ source: data, target: /data }}]\n\
             secrets: [{{ name: pw, kind: hex16 }}]\n\
             files:\n  - path: data/app.conf\n    template: \"pw={{{{ secrets.pw }}}}\\n\"\n"
        ),
    );
    let orch = Arc::new(node.orchestrator().await);
    orch.install(&app).await.expect("install");
    let run = run_of(&node, &app);
    fs::write(node.data.join("secrets/pw"), "ffeeddccbbaa99887766554433221100").expect("rotate");
    // A dry run (adopt --dry-run, reconcile reports) plans the restart but
    // writes nothing and restarts nothing.
    let dry = Reconciler::dry_run(orch.clone()).pass().await;
    assert!(matches!(decision(&dry, &app), Decision::Act(Action::Restart { .. })));
    assert!(!fs::read_to_string(node.data.join(&app).join("data/app.conf"))
        .expect("conf")
        .contains("ffeedd"));
    // The owner stops the app: the file follows the secret but the app
    // stays stopped; starting it later reads the new file.
    orch.stop(&app).await.expect("stop");
    let report = Reconciler::new(orch.clone()).pass().await;
    assert_eq!(decision(&report, &app), &Decision::Wait(Wait::Held));
    orch.start(&app).await.expect("start");
    assert_seen(&node, &app, "pw=ffeeddccbbaa99887766554433221100\n").await;
    assert_eq!(run_of(&node, &app).0, run.0, "the same container");
    // `start` or `install` of a running app whose files they rewrite
    // restart it: no later pass would see the change.
    fs::write(node.data.join("secrets/pw"), "0123456789abcdef0123456789abcdef").expect("rotate");
    let running = run_of(&node, &app);
    orch.start(&app).await.expect("start a running app");
    assert_seen(&node, &app, "pw=0123456789abcdef0123456789abcdef\n").await;
    assert_ne!(run_of(&node, &app).1, running.1, "restarted");
    fs::write(node.data.join("secrets/pw"), "00000000000000001111111111111111").expect("rotate");
    orch.install(&app).await.expect("install a running app");
    assert_seen(&node, &app, "pw=00000000000000001111111111111111\n").await;
    let report = Reconciler::new(orch.clone()).pass().await;
    assert_eq!(
        decision(&report, &app),
        &Decision::Wait(Wait::Ok),
        "nothing left to restart"
    );
}

/// Prints the secret behind `PASS_FILE` as the process saw it at start to
/// /data/seen, then waits for SIGTERM.
const READS_SECRET_AT_START: &str = "command: [\"sh\", \"-c\", \"cat \\\"$PASS_FILE\\\" > /data/seen; trap 'exit 0' TERM; while true; do sleep 1; done\"]\n";

#[tokio::test]
async fn a_rotated_secret_reaches_the_secret_env_copy_the_container_sees() {
    let node = Node::new();
    let image = node.env.image.to_string();
    let app = app_id("secenv");
    node.app(
        &app,
        &image,
        &format!(
            "{READS_SECRET_AT_START}user: \"1000:1000\"\nvolumes: [{{ source: data, target: /data }}]\n\
             secrets: [{{ name: pw, kind: hex16 }}]\nsecret_env: [{{ key: PASS, secret: pw }}]\n"
        ),
    );
    let orch = Arc::new(node.orchestrator().await);
    let mut reconciler = Reconciler::new(orch.clone());
    assert_eq!(
        decision(&reconciler.pass().await, &app),
        &Decision::Act(Action::Install)
    );
    let first = fs::read_to_string(node.data.join("secrets/pw")).expect("generated");
    assert_seen(&node, &app, &first).await;
    let in_container = || node.podman(&["exec", &app, "cat", "/run/secrets/pw"]);
    assert_eq!(in_container(), first);
    let run = run_of(&node, &app);
    assert_eq!(decision(&reconciler.pass().await, &app), &Decision::Wait(Wait::Ok));

    // Rotated on disk (by rename, as an editor or a restore would).
    let rotated = "0123456789abcdef0123456789abcdef";
    let tmp = node.data.join("secrets/.pw.new");
    fs::write(&tmp, format!("{rotated}\n")).expect("write");
    fs::rename(&tmp, node.data.join("secrets/pw")).expect("rotate");
    let report = reconciler.pass().await;
    assert_eq!(
        decision(&report, &app),
        &Decision::Act(Action::Restart {
            reason: "config changed: /run/secrets/pw".to_owned()
        })
    );
    assert_eq!(in_container(), rotated, "the container sees the new bytes");
    assert_seen(&node, &app, rotated).await;
    let copy = node.data.join(format!("secrets/apps/{app}/pw"));
    let meta = fs::metadata(&copy).expect("copy");
    assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o7777), (1000, 1000, 0o400));
    assert_eq!(run_of(&node, &app).0, run.0, "restarted, not recreated");

    // Done: the next pass leaves it alone.
    assert_eq!(decision(&reconciler.pass().await, &app), &Decision::Wait(Wait::Ok));
    assert_eq!(in_container(), rotated);
}
