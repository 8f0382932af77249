//! The manifest corpus: every invalid case is refused for the reason it
//! states, cross-app cases are refused as a set, and the valid apps load
//! clean, in start order, with the expected container names.
//!
//! Layout under `tests/fixtures/`:
//!
//! - `invalid/<case>/manifest.yml`: one invalid app per folder. The folder
//!   name is the app id used inside (except where the case is about that
//!   rule). The first line is
//!   `# expect: <field path> | <substring of the error> [| located]`:
//!   loading the whole `invalid/` folder must give an error for that file
//!   whose `field` is the path and whose Display contains the substring;
//!   `located` also requires a line and column.
//! - `invalid-sets/<set>/<app>/manifest.yml` plus `<set>/expect.txt`: apps
//!   that are refused because of each other. `expect.txt` holds `#`
//!   comments and these lines:
//!   - `valid: <id>, <id>`: exactly the apps that load, in start order;
//!   - `error: <app folder> | <field path> | <substring of the error>`:
//!     an error that must be reported for that app's manifest.
//!
//!   Every app not listed as valid must have at least one `error:` line.
//! - `valid/<id>/...`: apps that load clean together.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use archy_agent::manifest::{
    load_dir, AppKind, ImageSource, LoadOptions, LoadReport, ManifestError, Naming, Probe, Protocol, SecretKind,
    VolumeSource, MANIFEST_FILE, MAX_MANIFEST_BYTES,
};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures")
}

/// Sub-folders of `dir`, sorted.
fn folders(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.is_dir())
        .collect();
    out.sort();
    out
}

/// Errors reported for `file`, printed for failure messages.
fn errors_for<'a>(report: &'a LoadReport, file: &Path) -> Vec<&'a ManifestError> {
    report.errors.iter().filter(|e| e.file == file).collect()
}

fn show(errors: &[&ManifestError]) -> String {
    errors.iter().map(|e| format!("\n    {e}")).collect()
}

struct Expect {
    field: String,
    says: String,
    located: bool,
}

/// Reads `# expect: field | substring [| located]` from a manifest's first line.
fn read_expect(file: &Path) -> Expect {
    let bytes = fs::read(file).unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
    let end = bytes.iter().position(|b| *b == b'\n').unwrap_or(bytes.len());
    let first = std::str::from_utf8(&bytes[..end]).expect("the expect line is UTF-8");
    let spec = first.strip_prefix("# expect: ").unwrap_or_else(|| {
        panic!(
            "{}: first line must be `# expect: <field> | <substring>`",
            file.display()
        )
    });
    let parts: Vec<&str> = spec.split(" | ").map(str::trim).collect();
    match parts.as_slice() {
        [field, says] => Expect {
            field: (*field).to_owned(),
            says: (*says).to_owned(),
            located: false,
        },
        [field, says, "located"] => Expect {
            field: (*field).to_owned(),
            says: (*says).to_owned(),
            located: true,
        },
        _ => panic!("{}: bad expect line {first:?}", file.display()),
    }
}

#[test]
fn every_invalid_case_is_refused_for_the_reason_it_states() {
    let dir = fixtures().join("invalid");
    let report = load_dir(&dir, &LoadOptions::default());
    let cases = folders(&dir);
    assert!(cases.len() >= 35, "only {} invalid cases", cases.len());

    assert!(
        report.apps.is_empty(),
        "invalid cases loaded as valid apps: {:?}",
        report.apps.iter().map(|m| m.id.as_str()).collect::<Vec<_>>()
    );

    let mut failures = Vec::new();
    for case in &cases {
        let file = case.join(MANIFEST_FILE);
        let expect = read_expect(&file);
        let errors = errors_for(&report, &file);
        let hit = errors.iter().any(|e| {
            e.field == expect.field && e.to_string().contains(&expect.says) && (!expect.located || e.location.is_some())
        });
        if !hit {
            failures.push(format!(
                "{}: expected an error on `{}` saying {:?}{}; got:{}",
                file.display(),
                expect.field,
                expect.says,
                if expect.located { " with a line and column" } else { "" },
                show(&errors)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Every error belongs to a case's manifest: nothing leaks across cases.
    let files: BTreeSet<PathBuf> = cases.iter().map(|c| c.join(MANIFEST_FILE)).collect();
    for e in &report.errors {
        assert!(files.contains(&e.file), "error for an unexpected file: {e}");
    }
}

#[test]
fn invalid_cases_are_independent_of_each_other() {
    // Each case on its own gives the same errors as inside the whole corpus,
    // so no case passes or fails because of another.
    let dir = fixtures().join("invalid");
    let all = load_dir(&dir, &LoadOptions::default());
    for case in folders(&dir) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let name = case.file_name().expect("folder name");
        let copy = tmp.path().join(name);
        fs::create_dir(&copy).expect("mkdir");
        fs::copy(case.join(MANIFEST_FILE), copy.join(MANIFEST_FILE)).expect("copy");
        let alone = load_dir(tmp.path(), &LoadOptions::default());
        assert!(alone.apps.is_empty(), "{} loads on its own", case.display());
        let strip = |errors: Vec<&ManifestError>| -> Vec<(String, Option<String>)> {
            errors.into_iter().map(|e| (e.field.clone(), e.value.clone())).collect()
        };
        assert_eq!(
            strip(errors_for(&alone, &copy.join(MANIFEST_FILE))),
            strip(errors_for(&all, &case.join(MANIFEST_FILE))),
            "{}",
            case.display()
        );
    }
}

#[test]
fn yaml_syntax_error_reports_line_and_column() {
    let file = fixtures().join("invalid/yaml-syntax").join(MANIFEST_FILE);
    let report = load_dir(&fixtures().join("invalid"), &LoadOptions::default());
    let errors = errors_for(&report, &file);
    assert_eq!(errors.len(), 1, "{}", show(&errors));
    // The `[` left open on line 6 is noticed where the next key starts.
    assert_eq!(errors[0].location, Some((7, 1)), "{}", errors[0]);
    assert!(errors[0].to_string().contains("manifest.yml:7:1: "), "{}", errors[0]);
}

#[test]
fn manifest_over_1_mib_is_refused_before_parsing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let app = tmp.path().join("too-big");
    fs::create_dir(&app).expect("mkdir");
    // A valid manifest followed by comments: only its size is wrong. The
    // padding also holds a tab and an alias, which would be refused if the
    // text were looked at.
    let mut text = String::from(
        "id: too-big\nname: too-big\nversion: \"1\"\nimage: docker.io/library/busybox@sha256:\
         c991fd3d8b19614fa7309525e8ccb6c0a87464f8bf6bd4dff1479b493f7308f2\n",
    );
    while text.len() as u64 <= MAX_MANIFEST_BYTES {
        text.push_str("# padding\tpadding *alias padding padding padding padding padding padding\n");
    }
    fs::write(app.join(MANIFEST_FILE), &text).expect("write");

    let report = load_dir(tmp.path(), &LoadOptions::default());
    assert!(report.apps.is_empty());
    assert_eq!(report.errors.len(), 1, "{:#?}", report.errors);
    let e = &report.errors[0];
    assert_eq!(e.file, app.join(MANIFEST_FILE));
    assert_eq!(e.field, ".");
    assert!(e.to_string().contains("larger than 1048576 bytes"), "{e}");
    assert!(e.to_string().contains("at most 1 MiB"), "{e}");
}

struct SetExpect {
    valid: Vec<String>,
    errors: Vec<(String, String, String)>,
}

fn read_set_expect(file: &Path) -> SetExpect {
    let text = fs::read_to_string(file).unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
    let mut valid = None;
    let mut errors = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(list) = line.strip_prefix("valid:") {
            let ids = list.split(',').map(str::trim).filter(|s| !s.is_empty());
            valid = Some(ids.map(str::to_owned).collect());
        } else if let Some(spec) = line.strip_prefix("error:") {
            let parts: Vec<&str> = spec.split(" | ").map(str::trim).collect();
            let [app, field, says] = parts.as_slice() else {
                panic!("{}: bad error line {line:?}", file.display());
            };
            errors.push(((*app).to_owned(), (*field).to_owned(), (*says).to_owned()));
        } else {
            panic!("{}: unknown line {line:?}", file.display());
        }
    }
    SetExpect {
        valid: valid.unwrap_or_else(|| panic!("{}: no `valid:` line", file.display())),
        errors,
    }
}

#[test]
fn invalid_sets_refuse_apps_because_of_each_other() {
    let sets = folders(&fixtures().join("invalid-sets"));
    let names: Vec<String> = sets
        .iter()
        .map(|s| s.file_name().expect("name").to_string_lossy().into_owned())
        .collect();
    for needed in ["port-conflict", "cycle", "invalid-dependency", "secret-kinds"] {
        assert!(names.iter().any(|n| n == needed), "missing set {needed}");
    }
    for set in sets {
        let expect = read_set_expect(&set.join("expect.txt"));
        let report = load_dir(&set, &LoadOptions::default());
        let ids: Vec<&str> = report.apps.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids, expect.valid, "{}: valid apps in start order", set.display());

        for (app, field, says) in &expect.errors {
            let file = set.join(app).join(MANIFEST_FILE);
            let errors = errors_for(&report, &file);
            assert!(
                errors.iter().any(|e| &e.field == field && e.to_string().contains(says)),
                "{}: expected an error on `{field}` saying {says:?}; got:{}",
                file.display(),
                show(&errors)
            );
        }
        for app in folders(&set) {
            let id = app.file_name().expect("name").to_string_lossy().into_owned();
            let refused = !expect.valid.contains(&id);
            let has_errors = !errors_for(&report, &app.join(MANIFEST_FILE)).is_empty();
            assert_eq!(
                refused,
                has_errors,
                "{}: refused apps and only they have errors",
                app.display()
            );
            if refused {
                assert!(
                    expect.errors.iter().any(|(a, _, _)| a == &id),
                    "{}: expect.txt says nothing about refused app {id}",
                    set.display()
                );
            }
        }
    }
}

#[test]
fn valid_apps_load_clean_in_start_order() {
    let dir = fixtures().join("valid");
    let report = load_dir(&dir, &LoadOptions::default());
    assert!(report.is_clean(), "{:#?}", report.errors);
    let ids: Vec<&str> = report.apps.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["store-db", "wallet", "wallet-ui"]);
}

#[test]
fn valid_apps_get_the_expected_container_names_and_dev_ports() {
    let report = load_dir(&fixtures().join("valid"), &LoadOptions::default());
    let names = |naming: Naming| -> Vec<String> { report.apps.iter().map(|m| naming.container_name(m)).collect() };
    assert_eq!(names(Naming::Prod), ["store-db", "archy-wallet-svc", "archy-wallet-ui"]);
    assert_eq!(
        names(Naming::dev()),
        ["store-db-dev", "archy-wallet-svc-dev", "archy-wallet-ui-dev"]
    );
    let wallet = report.get("wallet").expect("wallet loads");
    let dev_hosts: Vec<u16> = Naming::dev()
        .ports(wallet)
        .expect("fits")
        .iter()
        .map(|p| p.host)
        .collect();
    assert_eq!(dev_hosts, [28332, 28333]);
}

#[test]
fn full_manifest_keeps_every_field() {
    let dir = fixtures().join("valid");
    let report = load_dir(&dir, &LoadOptions::default());
    let m = report.get("wallet").expect("wallet loads");
    assert_eq!(m.name, "Wallet");
    assert_eq!(m.version, "0.10.10");
    assert_eq!(m.kind, AppKind::Service);
    assert_eq!(m.container_name.as_deref(), Some("archy-wallet-svc"));
    assert_eq!(
        m.depends_on.iter().map(|d| d.as_str()).collect::<Vec<_>>(),
        ["store-db"]
    );
    let image = m.pinned_image().expect("pinned");
    assert_eq!(image.registry(), "ghcr.io");
    assert_eq!(image.repository(), "example/wallet");
    assert_eq!(image.tag(), Some("v0.10.10"));
    assert_eq!(m.entrypoint.as_deref(), Some(&["/usr/bin/wallet".to_owned()][..]));
    assert_eq!(m.command.as_ref().map(Vec::len), Some(3));
    assert_eq!(m.user.as_deref(), Some("1000:1000"));
    assert_eq!(m.network, "archy-net");
    assert_eq!(m.ports[1].protocol, Protocol::Udp);
    assert_eq!(m.volumes[0].source, VolumeSource::AppData(PathBuf::from("data")));
    assert_eq!(
        m.volumes[1].source,
        VolumeSource::Absolute(PathBuf::from("/var/lib/archipelago/store-db/exports"))
    );
    assert!(m.volumes[1].read_only && !m.volumes[0].read_only);
    assert_eq!(m.env.get("RUST_LOG").map(String::as_str), Some("info"));
    assert_eq!(m.secret_env.len(), 2);
    assert_eq!(m.secrets[1].kind, SecretKind::Hex16);
    assert_eq!(m.memory, Some(2 << 30));
    assert_eq!(m.security.capabilities_add, ["NET_BIND_SERVICE", "DAC_OVERRIDE"]);
    assert!(!m.security.read_only_root && m.security.no_new_privileges);
    let health = m.health.as_ref().expect("health");
    assert_eq!(
        health.probe,
        Probe::Http {
            port: 8332,
            target: "/health".to_owned()
        }
    );
    assert_eq!(
        (health.interval.as_secs(), health.timeout.as_secs(), health.retries),
        (15, 3, 5)
    );
    assert_eq!(health.start_period.as_secs(), 60);
    assert_eq!(m.stop_grace_period.as_secs(), 120);
    assert_eq!(m.path, dir.join("wallet").join(MANIFEST_FILE));
}

#[test]
fn ui_app_builds_from_a_context_that_holds_its_containerfile() {
    let dir = fixtures().join("valid");
    let report = load_dir(&dir, &LoadOptions::default());
    let ui = report.get("wallet-ui").expect("wallet-ui loads");
    assert_eq!(ui.kind, AppKind::Ui, "kind comes from the -ui suffix");
    let ImageSource::Build { context, containerfile } = &ui.image else {
        panic!("wallet-ui builds its image: {:?}", ui.image);
    };
    assert_eq!(context, &dir.join("wallet-ui").join("ui"));
    assert!(
        context.join(containerfile).is_file(),
        "{}",
        context.join(containerfile).display()
    );
    assert!(matches!(ui.health.as_ref().map(|h| &h.probe), Some(Probe::Exec { .. })));
}
