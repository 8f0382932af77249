//! `archy-agent os …`: the node's OS on its own disk.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Subcommand;

use super::disks::{self, Survey};
use super::layout::gib;

#[derive(Debug, Subcommand)]
pub enum OsCommand {
    /// List the disks the installer may install onto (model, size, serial,
    /// what is on them), and the refused ones with the reason.
    Disks {
        /// Offer loop devices too (tests only: a node never installs onto one).
        #[arg(long, hide = true)]
        allow_loop_devices: bool,
    },
}

pub fn run(cmd: &OsCommand, json: bool, out: &mut impl Write) -> anyhow::Result<ExitCode> {
    match cmd {
        OsCommand::Disks { allow_loop_devices } => {
            let survey = disks::gather(*allow_loop_devices)?;
            print_disks(&survey, json, out)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_disks(survey: &Survey, json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    if json {
        serde_json::to_writer_pretty(&mut *out, &survey.offered).context("cannot write JSON")?;
        writeln!(out)?;
        return Ok(());
    }
    if survey.offered.is_empty() {
        writeln!(out, "no disk the installer may use")?;
    }
    for d in &survey.offered {
        let content = match d.content {
            disks::Content::Blank => "blank",
            disks::Content::Archipelago => "Archipelago (reinstall keeps its data)",
            disks::Content::Other => "holds other data",
        };
        writeln!(
            out,
            "{}  {}  {}  serial {}  {content}: {}",
            d.path.display(),
            gib(d.size),
            if d.model.is_empty() { "?" } else { &d.model },
            if d.serial.is_empty() { "?" } else { &d.serial },
            d.contents
        )?;
        for name in &d.stable_names {
            writeln!(out, "    {name}")?;
        }
        for r in &d.refused {
            writeln!(out, "    refused: {r}")?;
        }
    }
    for (path, why) in &survey.hidden {
        writeln!(out, "{} not offered: {why}", path.display())?;
    }
    Ok(())
}
