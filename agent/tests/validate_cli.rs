//! `archy-agent validate`, run as the built binary against the fixtures.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use archy_agent::manifest::{load_dir, LoadOptions};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures")
}

/// The binary with no ARCHY_* settings inherited from the caller.
fn agent() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_archy-agent"));
    for var in ["ARCHY_APPS", "ARCHY_DATA", "ARCHY_ENGINE"] {
        cmd.env_remove(var);
    }
    cmd
}

fn run(cmd: &mut Command) -> (Output, String) {
    let out = cmd.output().expect("the archy-agent binary runs");
    let stdout = String::from_utf8(out.stdout.clone()).expect("stdout is UTF-8");
    (out, stdout)
}

/// The table row (split on whitespace) whose first cell is `id`.
fn row<'a>(stdout: &'a str, id: &str) -> Vec<&'a str> {
    stdout
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cells| cells.first() == Some(&id))
        .unwrap_or_else(|| panic!("no row for {id} in:\n{stdout}"))
}

fn assert_valid_table(out: &Output, stdout: &str, dev: bool) {
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let header: Vec<&str> = stdout.lines().next().expect("header").split_whitespace().collect();
    assert_eq!(header, ["ID", "CONTAINER", "IMAGE", "KIND"]);
    let sfx = if dev { "-dev" } else { "" };
    assert_eq!(
        row(stdout, "store-db"),
        [
            "store-db",
            &format!("store-db{sfx}"),
            "docker.io/library/postgres:16.4@sha256:061fced86838b54d645ae7a7fa572763ee892f26cccd2baed6eeb66c8943b301",
            "service",
        ]
    );
    assert_eq!(
        row(stdout, "wallet"),
        [
            "wallet",
            &format!("archy-wallet-svc{sfx}"),
            "ghcr.io/example/wallet:v0.10.10@sha256:c991fd3d8b19614fa7309525e8ccb6c0a87464f8bf6bd4dff1479b493f7308f2",
            "service",
        ]
    );
    let ui = stdout
        .lines()
        .find(|l| l.starts_with("wallet-ui "))
        .unwrap_or_else(|| panic!("no row for wallet-ui in:\n{stdout}"));
    let context = fixtures().join("valid").join("wallet-ui").join("ui");
    assert!(ui.contains(&format!(" archy-wallet-ui{sfx} ")), "{ui}");
    assert!(ui.contains(&format!(" build: {} ", context.display())), "{ui}");
    assert!(ui.ends_with(" ui"), "{ui}");
    assert!(stdout.contains("3 app(s) valid, 0 error(s)"), "{stdout}");
    assert!(!stdout.contains("error:"), "{stdout}");
}

#[test]
fn validate_lists_valid_apps_with_apps_after_the_subcommand() {
    let (out, stdout) = run(agent().arg("validate").arg("--apps").arg(fixtures().join("valid")));
    assert_valid_table(&out, &stdout, false);
}

#[test]
fn validate_accepts_apps_before_the_subcommand() {
    let (out, stdout) = run(agent().arg("--apps").arg(fixtures().join("valid")).arg("validate"));
    assert_valid_table(&out, &stdout, false);
}

#[test]
fn validate_reads_the_apps_folder_from_archy_apps() {
    let (out, stdout) = run(agent().arg("validate").env("ARCHY_APPS", fixtures().join("valid")));
    assert_valid_table(&out, &stdout, false);
}

#[test]
fn apps_flag_wins_over_archy_apps() {
    let (out, stdout) = run(agent()
        .env("ARCHY_APPS", fixtures().join("invalid"))
        .args(["validate", "--apps"])
        .arg(fixtures().join("valid")));
    assert_valid_table(&out, &stdout, false);
}

#[test]
fn validate_in_dev_mode_names_containers_with_dev() {
    let (out, stdout) = run(agent()
        .args(["validate", "--dev", "--apps"])
        .arg(fixtures().join("valid")));
    assert_valid_table(&out, &stdout, true);
}

#[test]
fn validate_in_dev_mode_refuses_a_host_port_pushed_past_65535() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("high");
    std::fs::create_dir(&dir).expect("mkdir");
    std::fs::write(
        dir.join("manifest.yml"),
        format!(
            "id: high\nname: High\nversion: \"1\"\nimage: x@sha256:{}\nports: [{{ host: 60000, container: 80 }}]\n",
            "a".repeat(64)
        ),
    )
    .expect("write manifest");
    let (prod, _) = run(agent().arg("validate").arg("--apps").arg(tmp.path()));
    assert!(prod.status.success(), "the manifest itself is valid");
    let (dev, stdout) = run(agent().args(["validate", "--dev", "--apps"]).arg(tmp.path()));
    assert!(!dev.status.success(), "{stdout}");
    assert!(
        stdout.contains("host port 60000 plus the dev offset 10000 is 70000"),
        "{stdout}"
    );
}

#[test]
fn validate_fails_on_the_invalid_corpus_printing_every_error_with_file_and_field() {
    let dir = fixtures().join("invalid");
    let (out, stdout) = run(agent().arg("validate").arg("--apps").arg(&dir));
    assert!(!out.status.success(), "{stdout}");
    assert_eq!(out.status.code(), Some(1));

    let report = load_dir(&dir, &LoadOptions::default());
    assert!(report.errors.len() >= 35);
    assert!(
        stdout.contains(&format!("0 app(s) valid, {} error(s)", report.errors.len())),
        "{stdout}"
    );
    let printed: Vec<&str> = stdout.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(printed.len(), report.errors.len(), "{stdout}");
    for e in &report.errors {
        let line = format!("error: {e}");
        assert!(printed.contains(&line.as_str()), "missing {line:?} in:\n{stdout}");
        let file = e.file.display().to_string();
        assert!(line.starts_with(&format!("error: {file}")), "{line}");
        assert!(line.contains(&format!(": {}", e.field)), "{line}");
    }
    // Spot-check one line completely.
    let port = dir.join("port-too-big").join("manifest.yml");
    assert!(
        stdout.contains(&format!(
            "error: {}: ports[0].container = \"70000\": allowed: a port number from 1 to 65535",
            port.display()
        )),
        "{stdout}"
    );
    // A template's misspelt secret is refused here, not found on a node.
    let secret = dir.join("files-unknown-secret").join("manifest.yml");
    assert!(
        stdout.contains(&format!(
            "error: {}: files[0].template = \"secrets.rpc_passwd\": names an unknown secret \
             (declare it in `secrets`); allowed: [secrets.rpc_password]",
            secret.display()
        )),
        "{stdout}"
    );
}

#[test]
fn validate_applies_the_data_root_option() {
    // The full app mounts a path under /var/lib/archipelago; under another
    // data root that is outside and refused.
    let (out, stdout) = run(agent()
        .args(["validate", "--data", "/srv/archy", "--apps"])
        .arg(fixtures().join("valid")));
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.contains("volumes[1].source = \"/var/lib/archipelago/store-db/exports\""),
        "{stdout}"
    );
    assert!(stdout.contains("under the data root /srv/archy"), "{stdout}");
}

#[test]
fn validate_reports_a_missing_apps_folder() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (out, stdout) = run(agent().arg("validate").arg("--apps").arg(tmp.path().join("nope")));
    assert!(!out.status.success());
    assert!(stdout.contains("cannot read the apps folder"), "{stdout}");
}

#[test]
fn validate_json_lists_apps_in_start_order() {
    let (out, stdout) = run(agent()
        .args(["validate", "--json", "--apps"])
        .arg(fixtures().join("valid")));
    assert!(out.status.success(), "{stdout}");
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("--json prints JSON");
    let ids: Vec<&str> = v["apps"]
        .as_array()
        .expect("apps is a list")
        .iter()
        .map(|a| a["id"].as_str().expect("id is a string"))
        .collect();
    assert_eq!(ids, ["store-db", "wallet", "wallet-ui"]);
    assert_eq!(v["errors"].as_array().map(Vec::len), Some(0));
    let wallet = &v["apps"][1];
    assert_eq!(wallet["kind"], "service");
    assert_eq!(wallet["container_name"], "archy-wallet-svc");
    assert_eq!(wallet["ports"][0]["host"], 18332);
    assert_eq!(wallet["stop_grace_period"], "2m");
    assert_eq!(v["apps"][2]["kind"], "ui");
}

#[test]
fn validate_json_on_the_invalid_corpus_lists_every_error() {
    let dir = fixtures().join("invalid");
    let (out, stdout) = run(agent().args(["--json", "validate", "--apps"]).arg(&dir));
    assert!(!out.status.success());
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("--json prints JSON");
    assert_eq!(v["apps"].as_array().map(Vec::len), Some(0));
    let errors = v["errors"].as_array().expect("errors is a list");
    let report = load_dir(&dir, &LoadOptions::default());
    assert_eq!(errors.len(), report.errors.len());
    for e in errors {
        assert!(e["file"].as_str().is_some_and(|f| f.ends_with("manifest.yml")), "{e}");
        assert!(e["field"].as_str().is_some_and(|f| !f.is_empty()), "{e}");
        assert!(e["problem"].as_str().is_some_and(|p| !p.is_empty()), "{e}");
    }
    let syntax = errors
        .iter()
        .find(|e| e["file"].as_str().is_some_and(|f| f.contains("yaml-syntax")))
        .expect("the syntax error is listed");
    assert_eq!(syntax["location"], serde_json::json!([7, 1]));
    let port = errors
        .iter()
        .find(|e| e["field"] == "ports[0].container")
        .expect("the port error is listed");
    assert_eq!(port["value"], "70000");
}
