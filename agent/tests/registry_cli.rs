//! `archy-agent registry list|add|remove`, run as the built binary against
//! a data root of its own. Needs no service: `registry test` against real
//! registries is in `registry_live.rs`.

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Output, Stdio};

const PASSWORD: &str = "correct-horse-battery-staple";

/// The binary with `--data <data>` and no ARCHY_* settings inherited.
fn agent(data: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_archy-agent"));
    for var in ["ARCHY_APPS", "ARCHY_DATA", "ARCHY_ENGINE"] {
        cmd.env_remove(var);
    }
    cmd.arg("--data").arg(data);
    cmd
}

struct Run {
    out: Output,
    stdout: String,
    stderr: String,
}

fn run(mut cmd: Command, stdin: &str) -> Run {
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("the archy-agent binary starts");
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(stdin.as_bytes())
        .expect("stdin takes the input");
    let out = child.wait_with_output().expect("the archy-agent binary runs");
    Run {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        out,
    }
}

fn ok(run: &Run) {
    assert!(
        run.out.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        run.out.status,
        run.stdout,
        run.stderr
    );
}

fn failed(run: &Run) {
    assert!(
        !run.out.status.success(),
        "expected a failure\nstdout:\n{}\nstderr:\n{}",
        run.stdout,
        run.stderr
    );
}

fn registry(data: &Path, args: &[&str], stdin: &str) -> Run {
    let mut cmd = agent(data);
    cmd.arg("registry").args(args);
    run(cmd, stdin)
}

/// The table rows, split on whitespace, without the header.
fn rows(stdout: &str) -> Vec<Vec<String>> {
    stdout
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect()
}

#[test]
fn add_with_a_password_on_stdin_then_list_shows_auth_but_never_the_password() {
    let data = tempfile::tempdir().expect("tempdir");
    let added = registry(
        data.path(),
        &[
            "add",
            "lan",
            "https://mirror.lan:5000",
            "--priority",
            "10",
            "--username",
            "node",
            "--password-stdin",
        ],
        &format!("{PASSWORD}\n"),
    );
    ok(&added);
    ok(&registry(
        data.path(),
        &["add", "fallback", "http://127.0.0.1:5999", "--priority", "200"],
        "",
    ));

    let table = registry(data.path(), &["list"], "");
    ok(&table);
    let header: Vec<&str> = table
        .stdout
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(header, ["NAME", "URL", "PRIORITY", "AUTH"]);
    assert_eq!(
        rows(&table.stdout),
        [
            ["lan", "https://mirror.lan:5000", "10", "yes"],
            ["fallback", "http://127.0.0.1:5999", "200", "no"],
        ]
    );

    let json = registry(data.path(), &["list", "--json"], "");
    ok(&json);
    let parsed: serde_json::Value = serde_json::from_str(&json.stdout).expect("list --json is JSON");
    assert_eq!(
        parsed,
        serde_json::json!([
            { "name": "lan", "url": "https://mirror.lan:5000", "priority": 10, "auth": true },
            { "name": "fallback", "url": "http://127.0.0.1:5999", "priority": 200, "auth": false },
        ])
    );

    for run in [&added, &table, &json] {
        assert!(
            !run.stdout.contains(PASSWORD) && !run.stderr.contains(PASSWORD),
            "{}{}",
            run.stdout,
            run.stderr
        );
        assert!(
            !run.stdout.contains("node"),
            "the username is not shown either: {}",
            run.stdout
        );
    }

    // The password is kept, without the newline, in a private file.
    let file = data.path().join("config").join("registries.json");
    let stored: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).expect("file")).expect("JSON");
    assert_eq!(stored["registries"][0]["auth"]["password"], PASSWORD);
    let mode = std::fs::metadata(&file).expect("file").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{mode:o}");
}

#[test]
fn remove_takes_the_entry_out_and_an_unknown_name_fails() {
    let data = tempfile::tempdir().expect("tempdir");
    ok(&registry(data.path(), &["add", "a", "https://a.example"], ""));
    ok(&registry(data.path(), &["add", "b", "https://b.example"], ""));

    let removed = registry(data.path(), &["remove", "a"], "");
    ok(&removed);
    assert_eq!(removed.stdout.trim(), "removed registry a (https://a.example)");
    let left = registry(data.path(), &["list"], "");
    assert_eq!(rows(&left.stdout), [["b", "https://b.example", "50", "no"]]);

    let unknown = registry(data.path(), &["remove", "a"], "");
    failed(&unknown);
    assert_eq!(unknown.stderr.trim(), "error: no registry named `a`");
}

#[test]
fn adding_a_name_twice_fails_and_keeps_the_first() {
    let data = tempfile::tempdir().expect("tempdir");
    ok(&registry(data.path(), &["add", "lan", "https://mirror.lan"], ""));
    let again = registry(data.path(), &["add", "lan", "https://other.lan"], "");
    failed(&again);
    assert!(
        again.stderr.contains("a registry named `lan` already exists"),
        "{}",
        again.stderr
    );
    let list = registry(data.path(), &["list"], "");
    assert_eq!(rows(&list.stdout), [["lan", "https://mirror.lan", "50", "no"]]);
}

#[test]
fn plain_http_off_loopback_is_refused_with_the_url_and_what_is_allowed() {
    let data = tempfile::tempdir().expect("tempdir");
    let refused = registry(data.path(), &["add", "lan", "http://10.0.0.1:5000"], "");
    failed(&refused);
    for part in ["http://10.0.0.1:5000", "https://host[:port]", "loopback"] {
        assert!(refused.stderr.contains(part), "missing {part:?} in {}", refused.stderr);
    }
    assert!(!data.path().join("config").exists(), "nothing is written");
}

#[test]
fn a_url_with_a_login_is_refused_and_no_output_holds_the_password() {
    const URL_PASSWORD: &str = "hunter2-in-the-url-77";
    let data = tempfile::tempdir().expect("tempdir");
    let urls = [
        format!("https://me:{URL_PASSWORD}@mirror.lan:5000"),
        format!("https://me:{URL_PASSWORD}@mirror.lan:5000/v2"),
        format!("http://me:{URL_PASSWORD}@10.0.0.1:5000"),
        format!("me:{URL_PASSWORD}@mirror.lan"),
    ];
    for url in &urls {
        for json in [false, true] {
            let mut cmd = agent(data.path());
            // Every log line the CLI can print, on stderr.
            cmd.env("RUST_LOG", "trace");
            if json {
                cmd.arg("--json");
            }
            cmd.args(["registry", "add", "lan", url, "--username", "me", "--password-stdin"]);
            let refused = run(cmd, &format!("{PASSWORD}\n"));
            failed(&refused);
            for text in [&refused.stdout, &refused.stderr] {
                assert!(!text.contains(URL_PASSWORD), "{url}: the password leaked:\n{text}");
                assert!(!text.contains(PASSWORD), "{url}: the password leaked:\n{text}");
            }
            assert!(refused.stderr.contains("<hidden>@"), "{url}: {}", refused.stderr);
        }
    }
    let refused = registry(data.path(), &["add", "lan", &urls[0]], "");
    assert!(
        refused.stderr.contains("https://<hidden>@mirror.lan:5000"),
        "{}",
        refused.stderr
    );
    assert!(refused.stderr.contains("--password-stdin"), "{}", refused.stderr);
    assert!(!data.path().join("config").exists(), "nothing is written");
}

#[test]
fn a_username_without_password_stdin_is_refused() {
    let data = tempfile::tempdir().expect("tempdir");
    let refused = registry(
        data.path(),
        &["add", "lan", "https://mirror.lan", "--username", "me"],
        "",
    );
    failed(&refused);
    assert!(refused.stderr.contains("--password-stdin"), "{}", refused.stderr);
    assert!(!data.path().join("config").exists(), "nothing is written");
}

#[test]
fn a_corrupt_list_is_reported_with_its_path_and_left_alone() {
    let data = tempfile::tempdir().expect("tempdir");
    let config = data.path().join("config");
    std::fs::create_dir(&config).expect("mkdir");
    let file = config.join("registries.json");
    std::fs::write(&file, "{ not json").expect("write");
    for args in [&["list"][..], &["add", "a", "https://a.example"]] {
        let run = registry(data.path(), args, "");
        failed(&run);
        assert!(run.stderr.contains(&file.display().to_string()), "{}", run.stderr);
    }
    assert_eq!(std::fs::read_to_string(&file).expect("still there"), "{ not json");
}
