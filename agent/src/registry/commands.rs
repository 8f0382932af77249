//! `archy-agent registry …`: what each subcommand does and prints. The
//! argument parsing stays in `cli.rs`; this takes plain values and writers
//! so that it can be tested without a process.
//!
//! The work itself is in data-returning functions ([`listing`],
//! [`add_registry`], [`remove_registry`], [`test_registries`]) that the
//! control socket calls too; [`run`] prints what a [`RegistryOps`] backend
//! returns, in-process ([`LocalRegistries`]) or through a running agent.

use std::fmt;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{
    Credentials, ProbeReport, ProbeSetupError, Prober, Registry, RegistryError, RegistryStore, RegistrySummary,
    RegistryUrl, StoreError,
};
use crate::cli::write_table;
use crate::dataroot::DataRoot;

/// A password longer than this on stdin is a mistake (a file piped in).
const MAX_PASSWORD_BYTES: u64 = 64 * 1024;

/// What `registry add` was given on the command line.
#[derive(Debug, Clone)]
pub struct AddArgs {
    pub name: String,
    pub url: String,
    pub priority: i32,
    /// With `password_stdin`: the password is read from `stdin`.
    pub username: Option<String>,
    pub password_stdin: bool,
}

/// One `registry` subcommand.
#[derive(Debug, Clone)]
pub enum RegistryOp {
    List,
    Add(AddArgs),
    Remove(String),
    Test(Option<String>),
}

/// A registry to add, login included. `Debug` hides the password, and
/// any login written into the url.
#[derive(Clone, PartialEq, Eq)]
pub struct NewRegistry {
    pub name: String,
    pub url: String,
    pub priority: i32,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl fmt::Debug for NewRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewRegistry")
            .field("name", &self.name)
            .field("url", &super::redact_userinfo(&self.url))
            .field("priority", &self.priority)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<hidden>"))
            .finish()
    }
}

/// The registry list and the file it lives in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryListing {
    pub file: PathBuf,
    /// In the order they are tried.
    pub registries: Vec<RegistrySummary>,
}

/// `registry test`'s probe reports and the file the list lives in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestResults {
    pub file: PathBuf,
    pub reports: Vec<ProbeReport>,
}

/// Why a registry cannot be added.
#[derive(Debug, thiserror::Error)]
pub enum AddError {
    #[error(transparent)]
    Invalid(#[from] RegistryError),
    #[error("a registry username needs a password")]
    MissingPassword,
    #[error("a registry password needs a username")]
    MissingUsername,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why registries cannot be tested.
#[derive(Debug, thiserror::Error)]
pub enum TestError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Setup(#[from] ProbeSetupError),
}

/// The registries in the order they are tried; summaries only, never a
/// login.
pub fn listing(data_root: &DataRoot) -> Result<RegistryListing, StoreError> {
    let store = RegistryStore::open(data_root)?;
    Ok(RegistryListing {
        file: store.path().to_owned(),
        registries: store.registries().iter().map(Registry::summary).collect(),
    })
}

/// Checks everything and adds the registry to the list.
pub fn add_registry(data_root: &DataRoot, new: NewRegistry) -> Result<RegistrySummary, AddError> {
    let url: RegistryUrl = new.url.parse().map_err(RegistryError::BadUrl)?;
    let mut registry = Registry::new(&new.name, url, new.priority)?;
    match (new.username, new.password) {
        (Some(username), Some(password)) => {
            registry = registry.with_credentials(Credentials::new(username, password)?);
        }
        (None, None) => {}
        (Some(_), None) => return Err(AddError::MissingPassword),
        (None, Some(_)) => return Err(AddError::MissingUsername),
    }
    let summary = registry.summary();
    RegistryStore::open(data_root)?.add(registry)?;
    Ok(summary)
}

/// Removes a registry by name; an unknown name is an error.
pub fn remove_registry(data_root: &DataRoot, name: &str) -> Result<RegistrySummary, StoreError> {
    Ok(RegistryStore::open(data_root)?.remove(name)?.summary())
}

/// Probes one registry, or every one when `name` is `None`.
pub async fn test_registries(data_root: &DataRoot, name: Option<&str>) -> Result<TestResults, TestError> {
    let store = RegistryStore::open(data_root)?;
    let targets: Vec<Registry> = match name {
        Some(name) => vec![store
            .get(name)
            .cloned()
            .ok_or_else(|| StoreError::UnknownName(name.to_owned()))?],
        None => store.registries().to_vec(),
    };
    let reports = Prober::new()?.probe_all(&targets).await;
    Ok(TestResults {
        file: store.path().to_owned(),
        reports,
    })
}

/// Where `registry` subcommands get their data: this process, or a running
/// agent over its control socket.
#[async_trait]
pub trait RegistryOps: Send + Sync {
    async fn list(&self) -> anyhow::Result<RegistryListing>;
    async fn add(&self, new: NewRegistry) -> anyhow::Result<RegistrySummary>;
    async fn remove(&self, name: &str) -> anyhow::Result<RegistrySummary>;
    async fn test(&self, name: Option<&str>) -> anyhow::Result<TestResults>;
}

/// The registry list under a data root, read and written by this process.
#[derive(Debug, Clone)]
pub struct LocalRegistries {
    pub data_root: DataRoot,
}

#[async_trait]
impl RegistryOps for LocalRegistries {
    async fn list(&self) -> anyhow::Result<RegistryListing> {
        Ok(listing(&self.data_root)?)
    }

    async fn add(&self, new: NewRegistry) -> anyhow::Result<RegistrySummary> {
        Ok(add_registry(&self.data_root, new)?)
    }

    async fn remove(&self, name: &str) -> anyhow::Result<RegistrySummary> {
        Ok(remove_registry(&self.data_root, name)?)
    }

    async fn test(&self, name: Option<&str>) -> anyhow::Result<TestResults> {
        Ok(test_registries(&self.data_root, name).await?)
    }
}

/// Runs `op` against `ops` and prints the outcome. `registry add` reads the
/// password from `stdin` here, on the caller's side, when asked to.
pub async fn run(
    ops: &dyn RegistryOps,
    op: RegistryOp,
    stdin: &mut impl Read,
    json: bool,
    out: &mut impl Write,
) -> anyhow::Result<ExitCode> {
    match op {
        RegistryOp::List => print_listing(&ops.list().await?, json, out)?,
        RegistryOp::Add(args) => {
            let password = match (&args.username, args.password_stdin) {
                (Some(_), true) => Some(read_password(stdin)?),
                (None, false) => None,
                (Some(_), false) => {
                    bail!("--username needs --password-stdin: the password is read from standard input")
                }
                (None, true) => bail!("--password-stdin needs --username"),
            };
            let added = ops
                .add(NewRegistry {
                    name: args.name,
                    url: args.url,
                    priority: args.priority,
                    username: args.username,
                    password,
                })
                .await?;
            print_added(&added, json, out)?;
        }
        RegistryOp::Remove(name) => print_removed(&ops.remove(&name).await?, json, out)?,
        RegistryOp::Test(name) => return print_tests(&ops.test(name.as_deref()).await?, json, out),
    }
    Ok(ExitCode::SUCCESS)
}

/// `registry list`: a table with `auth: yes/no`, or the summaries as JSON.
pub fn print_listing(listing: &RegistryListing, json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    if json {
        serde_json::to_writer_pretty(&mut *out, &listing.registries)
            .context("cannot write the registry list as JSON")?;
        writeln!(out)?;
    } else if listing.registries.is_empty() {
        writeln!(out, "no registries configured in {}", listing.file.display())?;
    } else {
        let rows: Vec<[String; 4]> = listing
            .registries
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
    Ok(())
}

pub fn print_added(summary: &RegistrySummary, json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    if json {
        serde_json::to_writer_pretty(&mut *out, summary).context("cannot write the registry as JSON")?;
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
    Ok(())
}

pub fn print_removed(removed: &RegistrySummary, json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    if json {
        serde_json::to_writer_pretty(&mut *out, removed).context("cannot write the registry as JSON")?;
        writeln!(out)?;
    } else {
        writeln!(out, "removed registry {} ({})", removed.name, removed.url)?;
    }
    Ok(())
}

/// `registry test`: fails when any registry is unreachable, refuses its
/// login or answers like no registry.
pub fn print_tests(results: &TestResults, json: bool, out: &mut impl Write) -> anyhow::Result<ExitCode> {
    let reports = &results.reports;
    if json {
        serde_json::to_writer_pretty(&mut *out, reports).context("cannot write the probe reports as JSON")?;
        writeln!(out)?;
    } else if reports.is_empty() {
        writeln!(out, "no registries configured in {}", results.file.display())?;
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
    use std::path::Path;

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

    /// Runs `op` in-process on a data root, as the CLI does without an agent.
    fn run_local(data: &Path, op: RegistryOp, stdin: &str, json: bool, out: &mut Vec<u8>) -> anyhow::Result<ExitCode> {
        let ops = LocalRegistries {
            data_root: DataRoot::new(data),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(run(&ops, op, &mut stdin.as_bytes(), json, out))
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
        run_local(
            dir.path(),
            RegistryOp::Add(args(Some("me"), true)),
            &format!("{SECRET}\n"),
            false,
            &mut out,
        )
        .expect("added");
        for json in [false, true] {
            run_local(dir.path(), RegistryOp::List, "", json, &mut out).expect("listed");
        }
        let text = String::from_utf8(out).expect("utf-8");
        assert!(!text.contains(SECRET), "{text}");
        assert!(text.contains("auth: yes"), "{text}");
        assert!(text.contains("\"auth\": true"), "{text}");
        let stored = RegistryStore::open(&DataRoot::new(dir.path())).expect("opens");
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
        let err = run_local(
            dir.path(),
            RegistryOp::Add(args(Some("me"), false)),
            "pw",
            false,
            &mut Vec::new(),
        )
        .expect_err("refused");
        assert!(err.to_string().contains("--password-stdin"), "{err}");
        assert!(!DataRoot::new(dir.path()).registries().exists());
    }

    #[test]
    fn half_a_login_is_refused_by_add_registry_and_nothing_is_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let new = |username: Option<&str>, password: Option<&str>| NewRegistry {
            name: "lan".into(),
            url: "https://mirror.lan:5000".into(),
            priority: 10,
            username: username.map(str::to_owned),
            password: password.map(str::to_owned),
        };
        let err = add_registry(&DataRoot::new(dir.path()), new(Some("me"), None)).expect_err("no password");
        assert!(matches!(err, AddError::MissingPassword), "{err:?}");
        let err = add_registry(&DataRoot::new(dir.path()), new(None, Some(SECRET))).expect_err("no username");
        assert!(matches!(err, AddError::MissingUsername), "{err:?}");
        assert!(!format!("{err:?} {err}").contains(SECRET));
        assert!(!DataRoot::new(dir.path()).registries().exists());
    }

    #[test]
    fn an_empty_listing_names_its_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut out = Vec::new();
        run_local(dir.path(), RegistryOp::List, "", false, &mut out).expect("listed");
        let text = String::from_utf8(out).expect("utf-8");
        assert!(text.starts_with("no registries configured in "), "{text}");
        assert!(text.contains("registries.json"), "{text}");
    }

    #[test]
    fn testing_an_unknown_name_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = run_local(
            dir.path(),
            RegistryOp::Test(Some("ghost".into())),
            "",
            false,
            &mut Vec::new(),
        )
        .expect_err("unknown");
        assert_eq!(err.to_string(), "no registry named `ghost`");
    }
}
