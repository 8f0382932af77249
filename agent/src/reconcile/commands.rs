//! `archy-agent boot`, `reconcile --once` and `adopt --dry-run`.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::signal::unix::{signal, SignalKind};

use super::daemon::{self, AgentConfig};
use super::pass::{PassReport, Reconciler};
use super::plan::{Action, Decision};
use crate::cli::write_table;
use crate::engine::Engine;
use crate::manifest::Naming;
use crate::orchestrator::{Orchestrator, OrchestratorConfig};

/// Runs the agent until SIGTERM or SIGINT. The pass in flight finishes
/// first; containers keep running.
pub fn boot(config: AgentConfig) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async {
        let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: finishing the pass in flight"),
                _ = int.recv() => tracing::info!("SIGINT: finishing the pass in flight"),
            }
        };
        // Kept open for the life of the agent; the control socket sends here.
        let (_requests_tx, requests) = tokio::sync::mpsc::channel(8);
        daemon::run(config, requests, shutdown).await
    })?;
    Ok(ExitCode::SUCCESS)
}

async fn reconciler(config: &AgentConfig, dry_run: bool) -> anyhow::Result<Reconciler> {
    let engine = Engine::connect(&config.engine).await?;
    // A dry run touches nothing; a pass acts only once every interrupted
    // upgrade is finished or undone.
    if !dry_run {
        crate::orchestrator::recover_upgrades(&engine, &config.data_root).await;
    }
    let orch = Arc::new(Orchestrator::new(
        engine,
        OrchestratorConfig {
            apps_dir: config.apps_dir.clone(),
            data_root: config.data_root.clone(),
            images_dir: config.images_dir.clone(),
            naming: config.naming,
        },
    ));
    Ok(if dry_run {
        Reconciler::dry_run(orch)
    } else {
        Reconciler::new(orch)
    }
    .with_os_boot_status(config.os_boot_status.clone()))
}

fn decision_text(d: &Decision) -> String {
    match d {
        Decision::Act(a) => match a {
            Action::Install => "install".to_owned(),
            Action::Start => "start".to_owned(),
            Action::Unpause => "unpause".to_owned(),
            Action::Restart { reason } | Action::RestartUnhealthy { reason } => format!("restart: {reason}"),
            Action::Recreate { reason } => format!("recreate: {reason}"),
            Action::Rebuild { state } => format!("rebuild: stuck {state}"),
            Action::Adopt { container_id } => format!("adopt {}", container_id.get(..12).unwrap_or(container_id)),
        },
        Decision::Wait(w) => serde_json::to_value(w)
            .ok()
            .and_then(|v| {
                let o = v.as_object()?.clone();
                let reason = o.get("reason")?.as_str()?.to_owned();
                let rest: Vec<String> = o
                    .iter()
                    .filter(|(k, _)| *k != "reason")
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                Some(if rest.is_empty() {
                    reason
                } else {
                    format!("{reason} ({})", rest.join(", "))
                })
            })
            .unwrap_or_default(),
    }
}

fn print_report(report: &PassReport, json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    if json {
        serde_json::to_writer_pretty(&mut *out, report).context("cannot write JSON")?;
        writeln!(out)?;
        return Ok(());
    }
    if let Some(e) = &report.error {
        writeln!(out, "pass could not run: {e}")?;
        return Ok(());
    }
    let rows: Vec<[String; 4]> = report
        .apps
        .iter()
        .map(|a| {
            [
                a.app.clone(),
                a.observed.clone(),
                match (&a.decision, &a.reason) {
                    (Decision::Act(Action::Start), Some(why)) => format!("start: {why}"),
                    (decision, _) => decision_text(decision),
                },
                a.error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    write_table(out, ["APP", "FOUND", "DECISION", "ERROR"], &rows)?;
    for name in &report.unmatched {
        writeln!(out, "left alone (no manifest): {name}")?;
    }
    for e in &report.manifest_errors {
        writeln!(out, "invalid manifest: {e}")?;
    }
    writeln!(out, "pass took {} ms", report.duration_ms)?;
    Ok(())
}

/// One pass, printed. Fails when the pass could not run or any app failed.
/// Refused while an agent runs on the data root (it reconciles on its own;
/// two writers would race), and run under its writer lock otherwise.
pub fn reconcile_once(config: AgentConfig, json: bool) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let report = runtime.block_on(async {
        let _writer = crate::writer::acquire(&config.data_root, "reconcile --once", crate::writer::WAIT)
            .await
            .map_err(|e| match e {
                e @ crate::writer::WriterError::AgentRuns { .. } => anyhow::Error::new(e)
                    .context("reconcile --once is refused while the agent runs: it reconciles on its own"),
                e => e.into(),
            })?;
        anyhow::Ok(reconciler(&config, false).await?.pass().await)
    })?;
    print_report(&report, json, &mut std::io::stdout().lock())?;
    let failed = report.error.is_some() || report.apps.iter().any(|a| a.error.is_some());
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

/// What adoption would claim, and what it would leave alone. Touches
/// nothing: no container, no state file.
pub fn adopt_dry_run(config: AgentConfig, json: bool) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let mut report = runtime.block_on(async { anyhow::Ok(reconciler(&config, true).await?.pass().await) })?;
    report
        .apps
        .retain(|a| matches!(a.decision, Decision::Act(Action::Adopt { .. })));
    print_report(&report, json, &mut std::io::stdout().lock())?;
    Ok(if report.error.is_some() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Default periodic resync.
pub const DEFAULT_RESYNC: Duration = Duration::from_secs(30);

/// The agent configuration from the global options.
pub fn config(
    engine: &std::path::Path,
    apps_dir: &std::path::Path,
    data_root: &crate::dataroot::DataRoot,
    images_dir: &std::path::Path,
    naming: Naming,
    resync: Duration,
    control: Option<&std::path::Path>,
) -> AgentConfig {
    AgentConfig {
        engine: engine.to_path_buf(),
        apps_dir: apps_dir.to_path_buf(),
        data_root: data_root.clone(),
        images_dir: images_dir.to_path_buf(),
        naming,
        resync,
        control: control.map(std::path::Path::to_path_buf),
        os_boot_status: std::path::PathBuf::from(crate::os::records::BOOT_JSON),
    }
}
