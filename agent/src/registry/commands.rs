//! `archy-agent registry …`: what each subcommand does and prints. The
//! argument parsing stays in `cli.rs`; this takes plain values and writers
//! so that it can be tested without a process.

use std::io::{Read, Write};
use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Context as _};

use super::{Credentials, Prober, Registry, RegistryStore, RegistryUrl};
use crate::cli::write_table;

/// A password longer than this on stdin is a mistake (a file piped in).
const MAX_PASSWORD_BYTES: u64 = 64 * 1024;

/// What `registry add` was given.
#[derive(Debug, Clone)]
pub struct AddArgs {
    pub name: String,
    pub url: String,
    pub priority: i32,
    /// With `password_stdin`: the password is read from `stdin`.
    pub username: Option<String>,
    pub password_stdin: bool,
}

/// `registry list`: the registries in the order they are tried, with
/// `auth: yes/no` and never the login itself.
pub fn list(data_root: &Path, json: bool, out: &mut impl Write) -> anyhow::Result<ExitCode> {
    let store = RegistryStore::open(data_root)?;
    let summaries: Vec<_> = store.registries().iter().map(Registry::summary).collect();
    if json {
        serde_json::to_writer_pretty(&mut *out, &summaries).context("cannot write the registry list as JSON")?;
        writeln!(out)?;
    } else if summaries.is_empty() {
        writeln!(out, "no registries configured in {}", store.path().display())?;
    } else {
        let rows: Vec<[String; 4]> = summaries
            .iter()
            .map(|s| {
                [
                    s.name.clone(),
                    s.url.clone(),
                    s.priority.to_string(),
                    yes_no(s.auth).to_owned(),
                ]
            })
            .collect();
        write_table(out, ["NAME", "URL", "PRIORITY", "AUTH"], &rows)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `registry add`: checks everything, reads the password from `stdin` when
/// asked to, and writes the list.
pub fn add(
    data_root: &Path,
    args: &AddArgs,
    stdin: &mut impl Read,
    json: bool,
    out: &mut impl Write,
) -> anyhow::Result<ExitCode> {
    let url: RegistryUrl = args.url.parse()?;
    let mut registry = Registry::new(&args.name, url, args.priority)?;
    match (&args.username, args.password_stdin) {
        (Some(username), true) => {
            let password = read_password(stdin)?;
            registry = registry.with_credentials(Credentials::new(username.as_str(), password)?);
        }
        (None, false) => {}
        (Some(_), false) => bail!("--username needs --password-stdin: the password is read from standard input"),
        (None, true) => bail!("--password-stdin needs --username"),
    }
    let summary = registry.summary();
    let mut store = RegistryStore::open(data_root)?;
    store.add(registry)?;
    if json {
        serde_json::to_writer_pretty(&mut *out, &summary).context("cannot write the registry as JSON")?;
        writeln!(out)?;
    } else {
        writeln!(
            out,
            "added registry {} ({}, priority {}, auth: {})",
            summary.name,
            summary.url,
            summary.priority,
            yes_no(summary.auth)
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `registry remove`: an unknown name is an error.
pub fn remove(data_root: &Path, name: &str, json: bool, out: &mut impl Write) -> anyhow::Result<ExitCode> {
    let mut store = RegistryStore::open(data_root)?;
    let removed = store.remove(name)?.summary();
    if json {
        serde_json::to_writer_pretty(&mut *out, &removed).context("cannot write the registry as JSON")?;
        writeln!(out)?;
    } else {
        writeln!(out, "removed registry {} ({})", removed.name, removed.url)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `registry test [NAME]`: probes one or every registry; fails when any is
/// unreachable, refuses its login or answers like no registry.
pub fn test(data_root: &Path, name: Option<&str>, json: bool, out: &mut impl Write) -> anyhow::Result<ExitCode> {
    let store = RegistryStore::open(data_root)?;
    let targets: Vec<Registry> = match name {
        Some(name) => vec![store
            .get(name)
            .cloned()
            .ok_or_else(|| super::StoreError::UnknownName(name.to_owned()))?],
        None => store.registries().to_vec(),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime for registry probes")?;
    let prober = Prober::new()?;
    let reports = runtime.block_on(prober.probe_all(&targets));
    if json {
        serde_json::to_writer_pretty(&mut *out, &reports).context("cannot write the probe reports as JSON")?;
        writeln!(out)?;
    } else if reports.is_empty() {
        writeln!(out, "no registries configured in {}", store.path().display())?;
    } else {
        let dash = || "-".to_owned();
        let rows: Vec<[String; 7]> = reports
            .iter()
            .map(|r| {
                [
                    r.name.clone(),
                    r.url.clone(),
                    yes_no(r.reachable).to_owned(),
                    r.status.map_or_else(dash, |s| s.to_string()),
                    r.auth.map_or_else(dash, |a| a.as_str().to_owned()),
                    r.latency_ms.map_or_else(dash, |ms| format!("{ms}ms")),
                    r.error.clone().unwrap_or_default(),
                ]
            })
            .collect();
        write_table(
            out,
            ["NAME", "URL", "REACHABLE", "STATUS", "AUTH", "LATENCY", "ERROR"],
            &rows,
        )?;
    }
    Ok(if reports.iter().all(|r| r.is_ok()) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The password as piped in: everything on `stdin`, less one trailing
/// newline (`echo` and here-strings add one).
pub fn read_password(stdin: &mut impl Read) -> anyhow::Result<String> {
    let mut text = String::new();
    stdin
        .take(MAX_PASSWORD_BYTES + 1)
        .read_to_string(&mut text)
        .context("cannot read the password from standard input")?;
    if text.len() as u64 > MAX_PASSWORD_BYTES {
        bail!("the password on standard input is longer than {MAX_PASSWORD_BYTES} bytes");
    }
    let password = text
        .strip_suffix("\r\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(&text);
    if password.is_empty() {
        bail!("no password on standard input (--password-stdin)");
    }
    Ok(password.to_owned())
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "hunter2-not-in-output";

    fn args(username: Option<&str>, password_stdin: bool) -> AddArgs {
        AddArgs {
            name: "lan".into(),
            url: "https://mirror.lan:5000".into(),
            priority: 10,
            username: username.map(str::to_owned),
            password_stdin,
        }
    }

    #[test]
    fn one_trailing_newline_is_trimmed_from_the_password() {
        let read = |s: &str| read_password(&mut s.as_bytes()).map_err(|e| e.to_string());
        assert_eq!(read("pw\n").as_deref(), Ok("pw"));
        assert_eq!(read("pw\r\n").as_deref(), Ok("pw"));
        assert_eq!(read("pw\n\n").as_deref(), Ok("pw\n"));
        assert_eq!(read(" pw ").as_deref(), Ok(" pw "));
        assert!(read("\n").expect_err("empty").contains("no password"));
        assert!(read("").is_err());
    }

    #[test]
    fn add_then_list_shows_auth_but_never_the_password() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut out = Vec::new();
        add(
            dir.path(),
            &args(Some("me"), true),
            &mut format!("{SECRET}\n").as_bytes(),
            false,
            &mut out,
        )
        .expect("added");
        for json in [false, true] {
            list(dir.path(), json, &mut out).expect("listed");
        }
        let text = String::from_utf8(out).expect("utf-8");
        assert!(!text.contains(SECRET), "{text}");
        assert!(text.contains("auth: yes"), "{text}");
        assert!(text.contains("\"auth\": true"), "{text}");
        let stored = RegistryStore::open(dir.path()).expect("opens");
        assert_eq!(
            stored
                .get("lan")
                .and_then(|r| r.credentials.as_ref())
                .map(Credentials::password),
            Some(SECRET)
        );
    }

    #[test]
    fn a_username_without_password_stdin_is_refused_and_nothing_is_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = add(
            dir.path(),
            &args(Some("me"), false),
            &mut "pw".as_bytes(),
            false,
            &mut Vec::new(),
        )
        .expect_err("refused");
        assert!(err.to_string().contains("--password-stdin"), "{err}");
        assert!(!RegistryStore::file_path(dir.path()).exists());
    }

    #[test]
    fn testing_an_unknown_name_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = test(dir.path(), Some("ghost"), false, &mut Vec::new()).expect_err("unknown");
        assert_eq!(err.to_string(), "no registry named `ghost`");
    }
}
