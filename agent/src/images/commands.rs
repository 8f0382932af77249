//! `archy-agent images …`: what each subcommand prints. The argument
//! parsing stays in `cli.rs`.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context as _;

use super::{ImportReport, Outcome};
use crate::cli::write_table;

/// Prints an import report as a table (APP / OUTCOME / DETAIL) and a
/// summary, or as JSON. Exit status 1 when any entry was skipped or the
/// lock was unusable: the rest was still imported.
pub fn print_import(report: &ImportReport, json: bool, out: &mut impl Write) -> anyhow::Result<ExitCode> {
    if json {
        serde_json::to_writer_pretty(&mut *out, report).context("cannot write the import report as JSON")?;
        writeln!(out)?;
    } else {
        if !report.entries.is_empty() {
            let rows: Vec<[String; 3]> = report
                .entries
                .iter()
                .map(|e| {
                    let detail = match &e.outcome {
                        Outcome::AlreadyPresent => format!("in the store as {}", e.config_digest),
                        Outcome::Imported { ms } => format!("{} in {ms} ms", e.config_digest),
                        Outcome::Skipped { reason } => reason.clone(),
                    };
                    [e.app.clone(), e.outcome.name().replace('_', " "), detail]
                })
                .collect();
            write_table(out, ["APP", "OUTCOME", "DETAIL"], &rows)?;
            writeln!(out)?;
        }
        writeln!(
            out,
            "{} imported, {} already present, {} skipped from {}",
            report.imported(),
            report.already_present(),
            report.skipped(),
            report.dir.display()
        )?;
        for note in &report.notes {
            writeln!(out, "note: {note}")?;
        }
        if let Some(e) = &report.error {
            writeln!(out, "error: {e}")?;
        }
    }
    Ok(if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::EntryOutcome;
    use crate::manifest::Digest;

    fn report() -> ImportReport {
        let entry = |app: &str, outcome| EntryOutcome {
            app: app.to_owned(),
            reference: format!("localhost/archipelago/{app}:1"),
            config_digest: Digest::of(app.as_bytes()),
            outcome,
        };
        ImportReport {
            dir: "/imgs".into(),
            entries: vec![
                entry("alpha", Outcome::AlreadyPresent),
                entry("beta", Outcome::Imported { ms: 12 }),
                entry(
                    "gamma",
                    Outcome::Skipped {
                        reason: "archive sha256 x does not match".into(),
                    },
                ),
            ],
            notes: vec!["something to know".into()],
            error: None,
        }
    }

    #[test]
    fn the_table_has_one_row_per_entry_and_a_summary_and_skips_fail_the_exit_status() {
        let mut out = Vec::new();
        let code = print_import(&report(), false, &mut out).expect("print");
        let text = String::from_utf8(out).expect("utf8");
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("APP") && lines[0].contains("OUTCOME") && lines[0].ends_with("DETAIL"));
        assert!(
            lines[1].starts_with("alpha") && lines[1].contains("already present"),
            "{text}"
        );
        assert!(
            lines[2].contains("imported") && lines[2].ends_with("in 12 ms"),
            "{text}"
        );
        assert!(
            lines[3].contains("skipped") && lines[3].ends_with("does not match"),
            "{text}"
        );
        assert!(
            text.contains("1 imported, 1 already present, 1 skipped from /imgs"),
            "{text}"
        );
        assert!(text.contains("note: something to know"), "{text}");
        assert_eq!(code, ExitCode::FAILURE);
    }

    #[test]
    fn json_flattens_each_outcome_into_its_entry() {
        let mut out = Vec::new();
        let mut clean = report();
        clean.entries.pop();
        let code = print_import(&clean, true, &mut out).expect("print");
        let value: serde_json::Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(value["entries"][0]["outcome"], "already_present");
        assert_eq!(value["entries"][1]["outcome"], "imported");
        assert_eq!(value["entries"][1]["ms"], 12);
        assert_eq!(value["entries"][1]["app"], "beta");
        assert_eq!(code, ExitCode::SUCCESS);
    }
}
