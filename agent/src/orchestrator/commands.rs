//! `archy-agent install|start|stop|restart|remove|upgrade|status|health|list|logs`:
//! what each prints. Argument parsing stays in `cli.rs`.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context as _;
use serde::Serialize;

use super::{AppState, AppStatus, ContainerOrchestrator, HealthState, InstallReport, StopOutcome, Stopped};
use crate::cli::write_table;

/// One app operation from the command line.
#[derive(Debug, Clone)]
pub enum AppOp {
    Install(String),
    Start(String),
    Stop(String),
    Restart(String),
    Remove(String),
    Upgrade(String),
    Status(String),
    Health(String),
    List,
    Logs { app: String, tail: Option<usize> },
}

impl AppOp {
    /// The subcommand's name when it changes anything (it then runs through
    /// the agent or under the data root's writer lock); `None` when it only
    /// reads.
    pub fn writes(&self) -> Option<&'static str> {
        match self {
            AppOp::Install(_) => Some("install"),
            AppOp::Start(_) => Some("start"),
            AppOp::Stop(_) => Some("stop"),
            AppOp::Restart(_) => Some("restart"),
            AppOp::Remove(_) => Some("remove"),
            AppOp::Upgrade(_) => Some("upgrade"),
            AppOp::Status(_) | AppOp::Health(_) | AppOp::List | AppOp::Logs { .. } => None,
        }
    }
}

fn json_line(out: &mut impl Write, value: &impl Serialize) -> anyhow::Result<()> {
    serde_json::to_writer_pretty(&mut *out, value).context("cannot write JSON")?;
    writeln!(out)?;
    Ok(())
}

/// What the agent is busy with (the same for every app), once.
fn print_agent_note(list: &[AppStatus], out: &mut impl Write) -> anyhow::Result<()> {
    if let Some(note) = list.iter().find_map(|s| s.agent.as_deref()) {
        writeln!(out, "agent: {note}")?;
    }
    Ok(())
}

fn status_rows(list: &[AppStatus]) -> Vec<[String; 6]> {
    list.iter()
        .map(|s| {
            let state = match s.health {
                Some(h) => format!("{}/{h}", s.state),
                None => match (s.state, s.exit_code) {
                    (AppState::Stopped | AppState::Killed | AppState::Crashed, Some(code)) => {
                        format!("{} (exit {code})", s.state)
                    }
                    _ => s.state.to_string(),
                },
            };
            // What the agent is doing about it, when it is doing something.
            let state = match &s.in_flight {
                Some(f) => format!("{state}; {} in flight {} s", f.action, f.for_secs),
                None => state,
            };
            [
                s.app.clone(),
                s.container.clone(),
                state,
                s.version.clone(),
                s.running_version.clone().unwrap_or_else(|| "-".to_owned()),
                if s.update_available || s.drifted { "yes" } else { "" }.to_owned(),
            ]
        })
        .collect()
}

/// Below a status table: each app the engine cannot describe, with its
/// error, and why the reconcile loop last restarted each app.
fn print_notes(list: &[AppStatus], out: &mut impl Write) -> anyhow::Result<()> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for s in list {
        if let Some(e) = &s.error {
            writeln!(out, "{}: the engine cannot describe its container: {e}", s.app)?;
        }
        if let Some(r) = &s.last_restart {
            let ago = humantime::format_duration(std::time::Duration::from_secs(now.saturating_sub(r.at)));
            let failed = if r.ok { "" } else { " (failed)" };
            writeln!(out, "{}: last restarted {ago} ago{failed}: {}", s.app, r.reason)?;
        }
    }
    Ok(())
}

/// Below a status table: what differs for each adopted app that drifted,
/// and how its owner converts it.
fn print_differences(list: &[AppStatus], out: &mut impl Write) -> anyhow::Result<()> {
    for s in list.iter().filter(|s| !s.differences.is_empty()) {
        writeln!(
            out,
            "{}: adopted, left as it is; differs from its manifest ({}); `archy-agent upgrade {}` converts it",
            s.app,
            s.differences.join("; "),
            s.app
        )?;
    }
    Ok(())
}

/// Prints an install's outcome: its pull attempts, and whether a container
/// was created or was already there. Shared by `install APP` and
/// `install --manifest PATH`.
pub fn print_install(r: &InstallReport, json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    if json {
        return json_line(out, r);
    }
    for a in &r.attempts {
        writeln!(out, "pull: {a}")?;
    }
    let what = if r.created { "installed" } else { "already installed" };
    writeln!(out, "{}: {what} as {} (image {})", r.app, r.container, r.image_id)?;
    Ok(())
}

/// Prints what `archy-agent shutdown` did, a line per app, each error
/// with its whole chain. Returns whether any app could not be stopped.
pub fn print_shutdown(outcomes: &[StopOutcome], json: bool, out: &mut impl Write) -> anyhow::Result<bool> {
    let mut failed = false;
    for o in outcomes {
        let (state, took, error) = match &o.result {
            Ok(Stopped::Down { took }) => ("stopped", Some(took.as_secs_f64()), None),
            Ok(Stopped::NotInstalled) => ("not-installed", None, None),
            Err(e) => {
                failed = true;
                ("failed", None, Some(crate::error_chain(e)))
            }
        };
        if json {
            json_line(
                out,
                &serde_json::json!({ "app": o.app, "container": o.container, "state": state, "took_s": took, "error": error }),
            )?;
        } else {
            match (took, error) {
                (Some(t), _) => writeln!(out, "{}: stopped {} in {t:.1} s", o.app, o.container)?,
                (None, Some(e)) => writeln!(out, "{}: could not stop {}: {e}", o.app, o.container)?,
                (None, None) => writeln!(out, "{}: not installed, nothing to stop", o.app)?,
            }
        }
    }
    Ok(failed)
}

/// Runs `op` and prints its result. Returns a failing exit status when
/// the app is not healthy (`health`) or not running (`status`), so
/// scripts can branch on it.
pub async fn run(
    orch: &dyn ContainerOrchestrator,
    op: AppOp,
    json: bool,
    out: &mut (impl Write + Send),
) -> anyhow::Result<ExitCode> {
    const STATUS_HEADER: [&str; 6] = ["APP", "CONTAINER", "STATE", "VERSION", "RUNNING", "UPDATE"];
    match op {
        AppOp::Install(app) => {
            let r = orch.install(&app).await?;
            print_install(&r, json, out)?;
        }
        AppOp::Upgrade(app) => {
            let r = orch.upgrade(&app).await?;
            if json {
                json_line(out, &r)?;
            } else {
                for a in &r.attempts {
                    writeln!(out, "pull: {a}")?;
                }
                for k in &r.kept_aside {
                    writeln!(out, "{}: kept your own {k} beside the rendered file", r.app)?;
                }
                if r.replaced {
                    writeln!(out, "{}: upgraded {} to image {}", r.app, r.container, r.to_image_id)?;
                } else {
                    writeln!(out, "{}: {} already matches its manifest", r.app, r.container)?;
                }
            }
        }
        AppOp::Start(ref app) | AppOp::Stop(ref app) | AppOp::Restart(ref app) | AppOp::Remove(ref app) => {
            let done = match &op {
                AppOp::Start(_) => orch.start(app).await.map(|()| "started"),
                AppOp::Stop(_) => orch.stop(app).await.map(|()| "stopped"),
                AppOp::Restart(_) => orch.restart(app).await.map(|()| "restarted"),
                _ => orch.remove(app).await.map(|()| "removed (data kept)"),
            }?;
            let s = orch.status(app).await?;
            if json {
                json_line(out, &s)?;
            } else {
                writeln!(out, "{app}: {done}; now {}", s.state)?;
            }
        }
        AppOp::Status(app) => {
            let s = orch.status(&app).await?;
            let running = s.state == AppState::Running;
            if json {
                json_line(out, &s)?;
            } else {
                write_table(out, STATUS_HEADER, &status_rows(std::slice::from_ref(&s)))?;
                print_differences(std::slice::from_ref(&s), out)?;
                print_agent_note(std::slice::from_ref(&s), out)?;
                print_notes(std::slice::from_ref(&s), out)?;
            }
            if !running {
                return Ok(ExitCode::from(3));
            }
        }
        AppOp::List => {
            let list = orch.list().await?;
            if json {
                json_line(out, &list)?;
            } else {
                write_table(out, STATUS_HEADER, &status_rows(&list))?;
                print_differences(&list, out)?;
                print_agent_note(&list, out)?;
                print_notes(&list, out)?;
            }
        }
        AppOp::Health(app) => {
            let h = orch.health(&app).await?;
            if json {
                json_line(out, &h)?;
            } else {
                // Only a running app is probed: without a health, a stopped
                // one may still declare a check.
                let health = match (h.health, h.state) {
                    (Some(x), _) => x.to_string(),
                    (None, AppState::Running) => "no health check".to_owned(),
                    (None, _) => "not probed: not running".to_owned(),
                };
                writeln!(out, "{}: {} ({health})", h.app, h.state)?;
                if let Some(p) = &h.probe {
                    writeln!(out, "probe {}: {} in {} ms", p.target, p.detail, p.elapsed_ms)?;
                }
            }
            let ok = h.state == AppState::Running && matches!(h.health, None | Some(HealthState::Healthy));
            if !ok {
                return Ok(ExitCode::from(3));
            }
        }
        AppOp::Logs { app, tail } => {
            let r = orch.logs(&app, tail).await?;
            if json {
                json_line(out, &r)?;
            } else {
                out.write_all(r.logs.as_bytes())?;
                if let Some(cut) = &r.cut {
                    // Beside the log, not in it: stdout stays the log alone.
                    eprintln!("archy-agent: the log of {app} was {cut}");
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
