//! `archy-agent registry test` against the real loopback registries that
//! `cargo xtask test` starts: one plain, one with htpasswd basic auth.
//!
//! These tests fail, never skip, when the services are missing.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use std::io::Write as _;

use archy_agent::registry::{AuthOutcome, Credentials, Prober, Registry};

/// The coordinates `cargo xtask test` exports.
struct Env {
    /// `127.0.0.1:PORT`, no auth.
    registry: String,
    /// `127.0.0.1:PORT`, basic auth.
    auth_registry: String,
    user: String,
    password: String,
}

fn var(name: &str) -> String {
    match std::env::var(name) {
        Ok(value) if !value.is_empty() => value,
        _ => panic!(
            "{name} is not set: run the integration tests through `cargo xtask test`, which starts the registries they need"
        ),
    }
}

fn env() -> Env {
    Env {
        registry: var("ARCHY_TEST_REGISTRY"),
        auth_registry: var("ARCHY_TEST_AUTH_REGISTRY"),
        user: var("ARCHY_TEST_AUTH_USER"),
        password: var("ARCHY_TEST_AUTH_PASSWORD"),
    }
}

fn agent(data: &Path, args: &[&str], stdin: &str) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_archy-agent"));
    for var in ["ARCHY_APPS", "ARCHY_DATA", "ARCHY_ENGINE"] {
        cmd.env_remove(var);
    }
    cmd.arg("--data").arg(data).arg("registry").args(args);
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("the archy-agent binary starts");
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(stdin.as_bytes())
        .expect("stdin takes the input");
    child.wait_with_output().expect("the archy-agent binary runs")
}

fn add(data: &Path, name: &str, host: &str, login: Option<(&str, &str)>) {
    let url = format!("http://{host}");
    let out = match login {
        Some((user, password)) => agent(
            data,
            &["add", name, &url, "--username", user, "--password-stdin"],
            &format!("{password}\n"),
        ),
        None => agent(data, &["add", name, &url], ""),
    };
    assert!(
        out.status.success(),
        "add {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `registry test NAME --json`: the one report and whether the command
/// succeeded.
fn test(data: &Path, name: &str) -> (serde_json::Value, bool, String) {
    let out = agent(data, &["test", name, "--json"], "");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let reports: serde_json::Value =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("test --json is JSON ({e}):\n{stdout}\n{stderr}"));
    assert_eq!(reports.as_array().map(Vec::len), Some(1), "{reports}");
    (reports[0].clone(), out.status.success(), stdout + &stderr)
}

#[test]
fn the_plain_registry_is_reachable_and_ok() {
    let env = env();
    let data = tempfile::tempdir().expect("tempdir");
    add(data.path(), "plain", &env.registry, None);
    let (report, success, _) = test(data.path(), "plain");
    assert_eq!(report["reachable"], true, "{report}");
    assert_eq!(report["status"], 200, "{report}");
    assert_eq!(report["auth"], "ok", "{report}");
    assert!(report["latency_ms"].as_u64().is_some_and(|ms| ms < 5000), "{report}");
    assert!(success);
}

#[test]
fn the_auth_registry_without_a_login_reports_required() {
    let env = env();
    let data = tempfile::tempdir().expect("tempdir");
    add(data.path(), "auth", &env.auth_registry, None);
    let (report, success, _) = test(data.path(), "auth");
    assert_eq!(report["reachable"], true, "{report}");
    assert_eq!(report["status"], 401, "{report}");
    assert_eq!(report["auth"], "required", "{report}");
    assert!(success, "required alone does not fail the command");
}

#[test]
fn the_auth_registry_with_the_right_login_reports_ok() {
    let env = env();
    let data = tempfile::tempdir().expect("tempdir");
    add(
        data.path(),
        "auth",
        &env.auth_registry,
        Some((&env.user, &env.password)),
    );
    let (report, success, output) = test(data.path(), "auth");
    assert_eq!(report["auth"], "ok", "{report}");
    assert_eq!(report["status"], 200, "{report}");
    assert!(success);
    assert!(!output.contains(&env.password), "{output}");
}

#[test]
fn the_auth_registry_with_a_wrong_login_reports_refused_and_fails() {
    let env = env();
    let data = tempfile::tempdir().expect("tempdir");
    let wrong = format!("{}-wrong", env.password);
    add(data.path(), "auth", &env.auth_registry, Some((&env.user, &wrong)));
    let (report, success, output) = test(data.path(), "auth");
    assert_eq!(report["reachable"], true, "{report}");
    assert_eq!(report["auth"], "refused", "{report}");
    assert_eq!(report["status"], 401, "{report}");
    assert!(!success, "a refused login fails the command");
    assert!(!output.contains(&wrong), "{output}");
}

#[test]
fn an_unused_loopback_port_is_unreachable_and_fails() {
    // Make sure the registries are there, so this cannot pass for the
    // wrong reason on a machine without them.
    let env = env();
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let data = tempfile::tempdir().expect("tempdir");
    add(data.path(), "gone", &format!("127.0.0.1:{port}"), None);
    add(data.path(), "plain", &env.registry, None);
    let (report, success, _) = test(data.path(), "gone");
    assert_eq!(report["reachable"], false, "{report}");
    assert_eq!(report["auth"], serde_json::Value::Null, "{report}");
    let error = report["error"].as_str().unwrap_or_default();
    assert!(error.contains("Connection refused"), "{report}");
    assert!(!success);

    // Testing all of them: the table names both, the command still fails.
    let out = agent(data.path(), &["test"], "");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{table}");
    let line = |name: &str| {
        table
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no row for {name}:\n{table}"))
            .split_whitespace()
            .take(5)
            .collect::<Vec<_>>()
    };
    assert_eq!(line("gone")[2..], ["no", "-", "-"]);
    assert_eq!(line("plain")[2..], ["yes", "200", "ok"]);
}

#[tokio::test]
async fn the_library_probe_gives_the_same_verdicts_as_the_command() {
    let env = env();
    let url = |host: &str| format!("http://{host}").parse().expect("loopback url");
    let login = Credentials::new(env.user.as_str(), env.password.as_str()).expect("valid login");
    let registries = [
        Registry::new("plain", url(&env.registry), 1).expect("name"),
        Registry::new("auth", url(&env.auth_registry), 2).expect("name"),
        Registry::new("auth-login", url(&env.auth_registry), 3)
            .expect("name")
            .with_credentials(login),
    ];
    let reports = Prober::new().expect("client").probe_all(&registries).await;
    let outcomes: Vec<_> = reports.iter().map(|r| (r.name.as_str(), r.auth)).collect();
    assert_eq!(
        outcomes,
        [
            ("plain", Some(AuthOutcome::Ok)),
            ("auth", Some(AuthOutcome::Required)),
            ("auth-login", Some(AuthOutcome::Ok)),
        ]
    );
}
