//! The `archy-agent` command line.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use crate::control::{self, AppBackend, ControlClient};
use crate::dataroot::{DataRoot, DEFAULT_DATA_ROOT};
use crate::engine::Engine;
use crate::images;
use crate::manifest::{self, LoadOptions, Naming};
use crate::orchestrator::commands::AppOp;
use crate::orchestrator::{self, Orchestrator, OrchestratorConfig, OrchestratorError, DEFAULT_LOG_TAIL};
use crate::reconcile::{self, commands::DEFAULT_RESYNC};
use crate::registry::{self, commands::RegistryOp};
use crate::writer;

/// Root's engine API socket (rootful Podman).
pub const ROOTFUL_ENGINE_SOCKET: &str = "/run/podman/podman.sock";
/// Default location of the installed app manifests.
pub const DEFAULT_APPS_DIR: &str = "/opt/archipelago/apps";

#[derive(Debug, Parser)]
#[command(name = "archy-agent", version, about = "Archipelago node agent")]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalOpts,
    #[command(subcommand)]
    pub command: Command,
}

/// Options accepted before or after the subcommand.
#[derive(Debug, Clone, Args)]
pub struct GlobalOpts {
    /// Folder of app folders, each with a manifest.yml [default: /opt/archipelago/apps, or <data>/apps with --dev].
    #[arg(long, global = true, env = "ARCHY_APPS")]
    pub apps: Option<PathBuf>,
    /// Data root: app data, secrets and agent state.
    #[arg(long, global = true, env = "ARCHY_DATA", default_value = DEFAULT_DATA_ROOT)]
    pub data: DataRoot,
    /// Engine API socket (Podman's Docker-compatible API) [default: root's /run/podman/podman.sock, for
    /// any other user its own rootless /run/user/<uid>/podman/podman.sock].
    #[arg(long, global = true, env = "ARCHY_ENGINE", default_value_os_t = default_engine_socket(), hide_default_value = true)]
    pub engine: PathBuf,
    /// The agent's control socket: app and registry commands go through a running agent there, else run in-process.
    #[arg(long, global = true, env = "ARCHY_CONTROL", default_value = control::DEFAULT_CONTROL_SOCKET)]
    pub control: PathBuf,
    /// Dev mode: container names end in -dev and host ports are offset.
    #[arg(long, global = true)]
    pub dev: bool,
    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// Folder of pre-pulled image archives and their images.lock.json.
    #[arg(long, global = true, env = "ARCHY_IMAGES", default_value = images::DEFAULT_IMAGES_DIR)]
    pub images: PathBuf,
    /// The OS boot status file: while it says an OS release is on trial, reconcile installs and
    /// recreates no app.
    #[arg(long, global = true, env = "ARCHY_OS_BOOT_STATUS", default_value = crate::os::records::BOOT_JSON)]
    pub os_boot_status: PathBuf,
}

/// The engine socket a user's commands reach without `--engine` or
/// `ARCHY_ENGINE`: root's rootful Podman for uid 0, else the user's own
/// rootless Podman (its `podman.socket`), so that `archipelago` on the node
/// reaches the apps' engine with no flags.
pub fn default_engine_socket_for(uid: u32) -> PathBuf {
    if uid == 0 {
        PathBuf::from(ROOTFUL_ENGINE_SOCKET)
    } else {
        PathBuf::from(format!("/run/user/{uid}/podman/podman.sock"))
    }
}

/// [`default_engine_socket_for`] the running process's effective uid
/// (`/proc/self` belongs to it); root's when that cannot be read.
fn default_engine_socket() -> PathBuf {
    use std::os::unix::fs::MetadataExt as _;
    let uid = std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(0);
    default_engine_socket_for(uid)
}

impl GlobalOpts {
    /// The apps folder in force: the option, else dev's `<data>/apps`, else
    /// the production default.
    pub fn apps_dir(&self) -> PathBuf {
        match (&self.apps, self.dev) {
            (Some(dir), _) => dir.clone(),
            (None, true) => self.data.dev_apps_dir(),
            (None, false) => PathBuf::from(DEFAULT_APPS_DIR),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check every manifest in the apps folder and print what loaded and every error.
    Validate,
    /// Get an app's image (pull by digest or build), create its container and start it.
    Install {
        /// The app id (required unless --manifest is given).
        #[arg(required_unless_present = "manifest")]
        app: Option<String>,
        /// Install from this manifest file instead (dev mode only).
        #[arg(long, conflicts_with = "app")]
        manifest: Option<PathBuf>,
    },
    /// Start an installed app.
    Start { app: String },
    /// Stop an app, giving it its stop grace period.
    Stop { app: String },
    /// Stop and start an app.
    Restart { app: String },
    /// Remove an app's container; its data and secrets are kept.
    Remove { app: String },
    /// Replace an app's container with one from its current manifest, rolling back on failure.
    Upgrade { app: String },
    /// Show an app's state, health and versions (exit status 3 when not running).
    Status { app: String },
    /// Probe an app's health now (exit status 3 when not healthy).
    Health { app: String },
    /// Run the agent: reconcile on engine events and a periodic resync until SIGTERM.
    Boot {
        /// Seconds between level-triggered resyncs.
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
        resync: u64,
    },
    /// Run one reconcile pass now and print its report.
    Reconcile {
        /// Exactly one pass (required: the loop is `boot`).
        #[arg(long, required = true)]
        once: bool,
    },
    /// Show which existing containers adoption would claim, touching nothing.
    Adopt {
        /// Plan only (required: adoption itself happens in every pass).
        #[arg(long, required = true)]
        dry_run: bool,
    },
    /// Show every app's status.
    List,
    /// Print an app's last log lines (1000 unless --tail; at most 16 MiB, said when cut).
    Logs {
        app: String,
        /// Only the last N lines [default: 1000].
        #[arg(long, conflicts_with = "all")]
        tail: Option<usize>,
        /// The whole log, streamed from the engine to stdout.
        #[arg(long)]
        all: bool,
        /// Keep printing what the app writes until it stops (streamed from the engine).
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Stop every app with its stop grace period, dependents first, for a system shutdown
    /// (archy-apps.service). Refused while the agent runs: it would start them again.
    Shutdown,
    /// Manage the registries images are pulled from, in priority order.
    #[command(subcommand)]
    Registry(RegistryCommand),
    /// Work with the pre-pulled image folder (--images).
    #[command(subcommand)]
    Images(ImagesCommand),
    /// The node's own OS on its own disk: which disks the installer may use.
    #[command(subcommand)]
    Os(crate::os::commands::OsCommand),
    /// Reach the node headless: the SSH host key, the authorized keys, the console text.
    #[command(subcommand)]
    Ssh(crate::ssh::SshCommand),
    /// Probe an address from this process's network namespace (the agent runs it inside the
    /// rootless engine's namespace); prints the detail, exit status 1 when it fails.
    #[command(hide = true)]
    ProbeNet {
        #[arg(long, conflicts_with = "tcp", required_unless_present = "tcp")]
        http: Option<String>,
        #[arg(long)]
        tcp: Option<std::net::SocketAddr>,
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
    /// Set the mode and owner of a path below an app's folder through the confined walk (no
    /// symlink followed); the agent runs it under `podman unshare`, where the container's ids
    /// are its to give.
    #[command(hide = true)]
    ConfineGive {
        /// The app's folder, `<data>/<id>`.
        #[arg(long)]
        app_dir: PathBuf,
        /// The path below it.
        #[arg(long)]
        path: PathBuf,
        #[arg(long)]
        uid: u32,
        #[arg(long)]
        gid: u32,
        /// Octal.
        #[arg(long, value_parser = parse_octal_mode)]
        mode: u32,
    },
    /// Mount the data partition at the data root (--data): the one archipelago.data=PARTUUID=…
    /// names, else the one ARCHY-DATA partition not on an installed node's disk (none of two);
    /// keep the journal on it. Format a blank disk only when the kernel command line names it
    /// by a stable name (archipelago.format=/dev/disk/by-id/…, /dev/disk/by-path/… or
    /// PARTUUID=…); warn when there is none.
    /// Run as root at boot, before the agent.
    DataDisk {
        /// Give the data root to this uid:gid (the agent's user).
        #[arg(long, value_parser = parse_owner)]
        owner: Option<(u32, u32)>,
        /// The kernel command line to read.
        #[arg(long, default_value = "/proc/cmdline")]
        cmdline: PathBuf,
        /// The data disk's file system label (tests use their own).
        #[arg(long, default_value = crate::datadisk::LABEL, hide = true)]
        label: String,
        /// Seconds to wait for the disk to appear.
        #[arg(long, default_value_t = crate::datadisk::DEVICE_WAIT.as_secs(), hide = true)]
        wait_secs: u64,
        /// Where the stable names' links are (tests on machines without udev make their own).
        #[arg(long, default_value = crate::datadisk::DISK_DIR, hide = true)]
        disk_dir: PathBuf,
        /// Where <data>/system/journal is bound (tests on machines without systemd use their own).
        #[arg(long, default_value = crate::datadisk::JOURNAL_DIR, hide = true)]
        journal_dir: PathBuf,
    },
}

pub(crate) fn parse_owner(text: &str) -> Result<(u32, u32), String> {
    let allowed = "allowed: UID:GID in numbers, e.g. 1000:1000";
    let (u, g) = text.split_once(':').ok_or_else(|| format!("{text:?}: {allowed}"))?;
    match (u.parse(), g.parse()) {
        (Ok(u), Ok(g)) => Ok((u, g)),
        _ => Err(format!("{text:?}: {allowed}")),
    }
}

/// `archy-agent images …`; the folder is `--images`, its format docs/images.md.
#[derive(Debug, Subcommand)]
pub enum ImagesCommand {
    /// Import every archive whose image the engine's store lacks (exit status 1 when any is skipped).
    Import,
}

/// `archy-agent registry …`; the list lives in `<data>/config/registries.json`.
#[derive(Debug, Subcommand)]
pub enum RegistryCommand {
    /// List the registries in the order they are tried; never shows a password.
    List,
    /// Add a registry: a mirror, a fallback, or a login for an image's own registry.
    Add {
        /// A name for the entry: lowercase letters, digits, '.', '_' and '-'.
        name: String,
        /// `https://host[:port]`; `http://` only for loopback hosts.
        url: String,
        /// Lower is tried first; an image's own registry counts as 100.
        #[arg(long, default_value_t = registry::DEFAULT_PRIORITY, allow_negative_numbers = true)]
        priority: i32,
        /// Login name; the password is read from standard input.
        #[arg(long, requires = "password_stdin")]
        username: Option<String>,
        /// Read the password from standard input (one trailing newline is dropped).
        #[arg(long, requires = "username")]
        password_stdin: bool,
    },
    /// Remove a registry by name.
    Remove { name: String },
    /// Check reachability, login and latency of one registry or all of them.
    Test { name: Option<String> },
}

/// Runs the command line and maps the outcome to an exit status. Errors
/// print their whole chain of causes.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(matches!(cli.command, Command::Boot { .. }));
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Structured logs. The agent (`boot`) logs at info to stdout, which
/// journald keeps; one-shot commands log warnings to stderr so stdout stays
/// theirs. `RUST_LOG` overrides either.
fn init_tracing(daemon: bool) {
    let default = if daemon { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(false);
    // Colours only for a person at a terminal: journald would keep the
    // escape codes.
    use std::io::IsTerminal as _;
    if daemon {
        builder
            .with_ansi(std::io::stdout().is_terminal())
            .with_writer(std::io::stdout)
            .init();
    } else {
        builder
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .init();
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Validate => validate(&cli.global),
        Command::Registry(cmd) => registry_command(cmd, &cli.global),
        Command::Boot { resync } => reconcile::commands::boot(agent_config(
            &cli.global,
            Duration::from_secs(resync),
            Some(&cli.global.control),
        )),
        Command::Reconcile { .. } => {
            reconcile::commands::reconcile_once(agent_config(&cli.global, DEFAULT_RESYNC, None), cli.global.json)
        }
        Command::Adopt { .. } => {
            reconcile::commands::adopt_dry_run(agent_config(&cli.global, DEFAULT_RESYNC, None), cli.global.json)
        }
        // Refused before the engine is reached: the answer must not
        // depend on whether it is up.
        Command::Install { manifest: Some(_), .. } if !cli.global.dev => Err(OrchestratorError::DevOnly.into()),
        Command::Images(cmd) => images_command(cmd, &cli.global),
        Command::Os(cmd) => crate::os::commands::run(&cmd, &cli.global, &mut std::io::stdout().lock()),
        Command::Ssh(cmd) => crate::ssh::run(cmd, &cli.global.data, cli.global.apps_dir(), cli.global.json),
        Command::ProbeNet { http, tcp, timeout_ms } => {
            let probe = match (http, tcp) {
                (Some(url), _) => crate::orchestrator::NetProbe::Http(url),
                (None, Some(addr)) => crate::orchestrator::NetProbe::Tcp(addr),
                (None, None) => anyhow::bail!("probe-net needs --http URL or --tcp ADDR"),
            };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            let (ok, detail) = runtime.block_on(probe.run(Duration::from_millis(timeout_ms)));
            println!("{detail}");
            Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::ConfineGive {
            app_dir,
            path,
            uid,
            gid,
            mode,
        } => {
            crate::ownership::confine_give(&app_dir, &path, uid, gid, mode)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::DataDisk {
            owner,
            cmdline,
            label,
            wait_secs,
            disk_dir,
            journal_dir,
        } => {
            crate::datadisk::run(&crate::datadisk::Options {
                mountpoint: cli.global.data.path().to_path_buf(),
                label,
                wait: Duration::from_secs(wait_secs),
                owner,
                cmdline,
                disk_dir,
                journal_dir,
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Shutdown => shutdown(&cli.global),
        Command::Logs { app, tail, all, follow } if all || follow => stream_logs(
            &cli.global,
            &app,
            if all {
                None
            } else {
                Some(tail.unwrap_or(DEFAULT_LOG_TAIL))
            },
            follow,
        ),
        Command::Install {
            app: None,
            manifest: Some(path),
        } => with_orchestrator(&cli.global, Some("install"), |orch, global| {
            Box::pin(async move {
                let r = orch.install_from_path(&path).await?;
                orchestrator::commands::print_install(&r, global.json, &mut std::io::stdout().lock())?;
                Ok(ExitCode::SUCCESS)
            })
        }),
        command => {
            let op = match command {
                Command::Install { app, .. } => AppOp::Install(app.unwrap_or_default()),
                Command::Start { app } => AppOp::Start(app),
                Command::Stop { app } => AppOp::Stop(app),
                Command::Restart { app } => AppOp::Restart(app),
                Command::Remove { app } => AppOp::Remove(app),
                Command::Upgrade { app } => AppOp::Upgrade(app),
                Command::Status { app } => AppOp::Status(app),
                Command::Health { app } => AppOp::Health(app),
                Command::List => AppOp::List,
                Command::Logs { app, tail, .. } => AppOp::Logs { app, tail },
                Command::Validate
                | Command::Registry(_)
                | Command::Boot { .. }
                | Command::Reconcile { .. }
                | Command::Adopt { .. }
                | Command::Images(_)
                | Command::Os(_)
                | Command::Ssh(_)
                | Command::DataDisk { .. }
                | Command::Shutdown
                | Command::ProbeNet { .. }
                | Command::ConfineGive { .. } => unreachable!("handled above"),
            };
            let writes = op.writes();
            with_orchestrator(&cli.global, writes, |orch, global| {
                Box::pin(async move {
                    let mut out = Vec::new();
                    let code = orchestrator::commands::run(orch, op, global.json, &mut out).await;
                    std::io::stdout().lock().write_all(&out)?;
                    code
                })
            })
        }
    }
}

/// `archy-agent shutdown`: stops every app over the engine itself, one
/// line per app; exit status 1 when any could not be stopped.
fn shutdown(global: &GlobalOpts) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async {
        if ControlClient::connect(&global.control).await?.is_some() {
            anyhow::bail!(
                "the agent is running (its control socket {} answers): stop archy-agent.service first, \
                 or it would start the apps again",
                global.control.display()
            );
        }
        // No agent answers: this command is the data root's writer while it
        // stops the apps (refused if an agent holds the lock after all).
        let _writer = writer::acquire(&global.data, "shutdown", writer::WAIT).await?;
        let config = orchestrator_config(global);
        let engine = Engine::connect(&global.engine).await?;
        orchestrator::recover_upgrades(&engine, &global.data).await;
        let outcomes = Orchestrator::new(engine, config).shutdown().await;
        let mut out = Vec::new();
        let failed = orchestrator::commands::print_shutdown(&outcomes, global.json, &mut out)?;
        std::io::stdout().lock().write_all(&out)?;
        Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
    })
}

/// `archy-agent logs APP --all|--follow`: the log straight from the
/// engine to stdout, never through the agent's control socket (reading
/// takes no app lock), so however long it is it is never held whole.
fn stream_logs(global: &GlobalOpts, app: &str, tail: Option<usize>, follow: bool) -> anyhow::Result<ExitCode> {
    if global.json {
        anyhow::bail!("logs --all and --follow stream the log as it is: they have no --json form");
    }
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async {
        let config = orchestrator_config(global);
        let engine = Engine::connect(&global.engine).await?;
        let orch = Orchestrator::new(engine, config);
        orch.stream_logs(app, tail, follow, &mut tokio::io::stdout()).await?;
        Ok(ExitCode::SUCCESS)
    })
}

type OrchFuture<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<ExitCode>> + 'a>>;

/// Runs `f` on a fresh runtime with the running agent's orchestrator when
/// one answers on `--control` (so its per-app locks apply), else with one
/// of our own over the engine, for the mode in force: under the data
/// root's writer lock when the command changes anything (`writes` names it;
/// see [`control::route`]).
fn with_orchestrator(
    global: &GlobalOpts,
    writes: Option<&str>,
    f: impl for<'a> FnOnce(&'a AppBackend, &'a GlobalOpts) -> OrchFuture<'a>,
) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async {
        let config = orchestrator_config(global);
        let backend = AppBackend::open(&global.control, &global.engine, config, writes).await?;
        f(&backend, global).await
    })
}

/// Runs a `registry` subcommand through the running agent when one answers
/// on `--control`, else on the list under `--data`.
fn registry_command(cmd: RegistryCommand, global: &GlobalOpts) -> anyhow::Result<ExitCode> {
    let writes = match &cmd {
        RegistryCommand::Add { .. } => Some("registry add"),
        RegistryCommand::Remove { .. } => Some("registry remove"),
        RegistryCommand::List | RegistryCommand::Test { .. } => None,
    };
    let op = match cmd {
        RegistryCommand::List => RegistryOp::List,
        RegistryCommand::Add {
            name,
            url,
            priority,
            username,
            password_stdin,
        } => RegistryOp::Add(registry::commands::AddArgs {
            name,
            url,
            priority,
            username,
            password_stdin,
        }),
        RegistryCommand::Remove { name } => RegistryOp::Remove(name),
        RegistryCommand::Test { name } => RegistryOp::Test(name),
    };
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async {
        let (ops, _writer) = control::registry_backend(&global.control, &global.data, writes).await?;
        let (stdin, out) = (&mut std::io::stdin().lock(), &mut std::io::stdout().lock());
        registry::commands::run(ops.as_ref(), op, stdin, global.json, out).await
    })
}

fn images_command(cmd: ImagesCommand, global: &GlobalOpts) -> anyhow::Result<ExitCode> {
    match cmd {
        ImagesCommand::Import => {
            let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
            let report = runtime.block_on(async {
                // The agent imports at its own start: refused while it runs.
                let _writer = writer::acquire(&global.data, "images import", writer::WAIT).await?;
                let engine = Engine::connect(&global.engine).await?;
                anyhow::Ok(images::import_all(&engine, &global.images, &global.data).await)
            })?;
            images::commands::print_import(&report, global.json, &mut std::io::stdout().lock())
        }
    }
}

fn agent_config(
    global: &GlobalOpts,
    resync: Duration,
    control: Option<&std::path::Path>,
) -> reconcile::daemon::AgentConfig {
    reconcile::daemon::AgentConfig {
        os_boot_status: global.os_boot_status.clone(),
        ..reconcile::commands::config(
            &global.engine,
            &global.apps_dir(),
            &global.data,
            &global.images,
            naming(global),
            resync,
            control,
        )
    }
}

/// The orchestrator's config from the options in force. The apps folder
/// already follows the mode (see `apps_dir`), so one constructor serves
/// prod and dev.
fn orchestrator_config(global: &GlobalOpts) -> OrchestratorConfig {
    OrchestratorConfig {
        apps_dir: global.apps_dir(),
        data_root: global.data.clone(),
        naming: naming(global),
        images_dir: global.images.clone(),
    }
}

fn naming(global: &GlobalOpts) -> Naming {
    if global.dev {
        Naming::dev()
    } else {
        Naming::Prod
    }
}

fn validate(global: &GlobalOpts) -> anyhow::Result<ExitCode> {
    let opts = LoadOptions {
        data_root: global.data.clone(),
    };
    let mut report = manifest::load_dir(&global.apps_dir(), &opts);
    let naming = naming(global);
    // Dev mode shifts host ports; an app whose ports would pass 65535 is
    // as unusable as an invalid one.
    let mut dev_errors = Vec::new();
    report.apps.retain(|m| match naming.ports(m) {
        Ok(_) => true,
        Err(e) => {
            dev_errors.push(manifest::ManifestError::new(&m.path, "ports", e.to_string()));
            false
        }
    });
    report.errors.extend(dev_errors);
    let mut out = std::io::stdout().lock();
    if global.json {
        serde_json::to_writer_pretty(&mut out, &report).context("cannot write the report as JSON")?;
        writeln!(out)?;
    } else {
        let rows: Vec<[String; 4]> = report
            .apps
            .iter()
            .map(|m| {
                let image = match &m.image {
                    manifest::ImageSource::Pinned(p) => p.to_string(),
                    manifest::ImageSource::Build { context, .. } => format!("build: {}", context.display()),
                };
                [m.id.to_string(), naming.container_name(m), image, m.kind.to_string()]
            })
            .collect();
        write_table(&mut out, ["ID", "CONTAINER", "IMAGE", "KIND"], &rows)?;
        writeln!(out)?;
        writeln!(
            out,
            "{} app(s) valid, {} error(s) in {}",
            report.apps.len(),
            report.errors.len(),
            global.apps_dir().display()
        )?;
        for e in &report.errors {
            writeln!(out, "error: {e}")?;
        }
    }
    Ok(if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Writes left-aligned columns separated by two spaces.
pub fn write_table<const N: usize>(
    out: &mut impl Write,
    header: [&str; N],
    rows: &[[String; N]],
) -> std::io::Result<()> {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |out: &mut dyn Write, cells: Vec<&str>| -> std::io::Result<()> {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == N {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        writeln!(out, "{}", s.trim_end())
    };
    line(out, header.to_vec())?;
    for row in rows {
        line(out, row.iter().map(String::as_str).collect())?;
    }
    Ok(())
}

/// A file mode in octal, as `chmod` takes it.
fn parse_octal_mode(text: &str) -> Result<u32, String> {
    u32::from_str_radix(text, 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| format!("{text:?} is not an octal file mode (0 to 7777)"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_default_engine_is_roots_for_root_and_the_users_own_for_anyone_else() {
        assert_eq!(default_engine_socket_for(0), PathBuf::from("/run/podman/podman.sock"));
        assert_eq!(
            default_engine_socket_for(1000),
            PathBuf::from("/run/user/1000/podman/podman.sock")
        );
        assert_eq!(
            default_engine_socket_for(4242),
            PathBuf::from("/run/user/4242/podman/podman.sock")
        );
    }

    #[test]
    fn the_engine_option_wins_over_the_default() {
        let cli = Cli::try_parse_from(["archy-agent", "list", "--engine", "/tmp/x.sock"]).unwrap();
        assert_eq!(cli.global.engine, PathBuf::from("/tmp/x.sock"));
    }
}
