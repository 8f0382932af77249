//! The table `bench` and `bench-iso` share: rows of measured figures beside
//! their baselines and targets, as text and as a markdown report.

use xshell::{cmd, Shell};

use crate::harness::procs::capture;

// --- The table

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unit {
    Bytes,
    Millis,
    Percent,
    Seconds,
}

impl Unit {
    fn format(self, value: f64) -> String {
        match self {
            Unit::Bytes => format!("{:.1} MB", value / 1e6),
            Unit::Millis if value >= 1000.0 => format!("{:.2} s", value / 1000.0),
            Unit::Millis => format!("{value:.1} ms"),
            Unit::Percent => format!("{value:.2} %"),
            // As the build stages print their times.
            Unit::Seconds => crate::pipeline::progress::human_duration(value),
        }
    }
}

/// One figure of the table. `max` is in `unit`; `max_ratio` bounds
/// measured / baseline.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    pub(crate) figure: String,
    pub(crate) unit: Unit,
    pub(crate) measured: Option<f64>,
    pub(crate) baseline: Option<f64>,
    pub(crate) baseline_what: String,
    pub(crate) max: Option<f64>,
    pub(crate) max_ratio: Option<f64>,
    /// Why the figure could not be measured.
    pub(crate) failure: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    Met,
    /// The bounds it broke.
    Missed(Vec<String>),
    /// Informational: no target.
    NoTarget,
    NotMeasured,
}

impl Row {
    pub(crate) fn failed(figure: &str, why: String) -> Row {
        Row {
            figure: figure.to_owned(),
            unit: Unit::Millis,
            measured: None,
            baseline: None,
            baseline_what: String::new(),
            max: None,
            max_ratio: None,
            failure: Some(why),
        }
    }

    pub(crate) fn ratio(&self) -> Option<f64> {
        match (self.measured, self.baseline) {
            (Some(m), Some(b)) if b > 0.0 => Some(m / b),
            _ => None,
        }
    }

    fn target(&self) -> String {
        let mut parts = Vec::new();
        if let Some(max) = self.max {
            parts.push(format!("≤ {}", self.unit.format(max)));
        }
        if let Some(r) = self.max_ratio {
            parts.push(format!("≤ {r}× baseline"));
        }
        if parts.is_empty() {
            "—".into()
        } else {
            parts.join(", ")
        }
    }

    pub(crate) fn verdict(&self) -> Verdict {
        let Some(measured) = self.measured else {
            return Verdict::NotMeasured;
        };
        if self.max.is_none() && self.max_ratio.is_none() {
            return Verdict::NoTarget;
        }
        let mut missed = Vec::new();
        if let Some(max) = self.max.filter(|max| measured > *max) {
            missed.push(format!("{} > {}", self.unit.format(measured), self.unit.format(max)));
        }
        if let Some(max_ratio) = self.max_ratio {
            match self.ratio() {
                Some(r) if r > max_ratio => missed.push(format!("{r:.2}× > {max_ratio}× baseline")),
                Some(_) => {}
                None => missed.push("no baseline to compare with".into()),
            }
        }
        if missed.is_empty() {
            Verdict::Met
        } else {
            Verdict::Missed(missed)
        }
    }

    fn cells(&self) -> [String; 6] {
        let value = |v: Option<f64>| v.map_or_else(|| "—".to_owned(), |v| self.unit.format(v));
        let verdict = match self.verdict() {
            Verdict::Met => "yes".to_owned(),
            Verdict::Missed(_) => "**NO**".to_owned(),
            Verdict::NoTarget => "—".to_owned(),
            Verdict::NotMeasured => "not measured".to_owned(),
        };
        [
            self.figure.clone(),
            value(self.measured),
            value(self.baseline),
            self.ratio().map_or_else(|| "—".to_owned(), |r| format!("{r:.2}×")),
            self.target(),
            verdict,
        ]
    }
}

const HEADER: [&str; 6] = ["figure", "measured", "baseline", "ratio", "target", "ok?"];

pub(crate) fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

pub(crate) fn render_text(rows: &[Row]) -> String {
    let cells: Vec<[String; 6]> = rows.iter().map(Row::cells).collect();
    let mut widths = HEADER.map(|h| h.chars().count());
    for row in &cells {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| -> String {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c}{}", " ".repeat(w - c.chars().count())))
            .collect();
        padded.join("  ").trim_end().to_owned()
    };
    let mut out = line(&HEADER.map(str::to_owned));
    for row in &cells {
        out.push('\n');
        out.push_str(&line(row));
    }
    out
}

pub(crate) fn render_markdown(rows: &[Row], facts: &str) -> String {
    let mut out = format!("{facts}\n\n| {} |\n|", HEADER.join(" | "));
    out.push_str(&" --- |".repeat(HEADER.len()));
    for row in rows {
        out.push_str(&format!("\n| {} |", row.cells().join(" | ")));
    }
    out.push_str("\n\nBaselines, measured in the same run:\n");
    for row in rows.iter().filter(|r| !r.baseline_what.is_empty()) {
        out.push_str(&format!("\n- {}: {}", row.figure, row.baseline_what));
    }
    let missed = missed_targets(rows);
    if !missed.is_empty() {
        out.push_str("\n\nMissed:\n");
        for m in &missed {
            out.push_str(&format!("\n- {m}"));
        }
    }
    out.push('\n');
    out
}

/// The last lines of a bench: every target met, or which were not.
pub(crate) fn print_missed(rows: &[Row]) {
    let missed = missed_targets(rows);
    if missed.is_empty() {
        println!("every target is met");
    } else {
        println!("TARGETS MISSED:");
        for line in &missed {
            println!("  {line}");
        }
    }
}

/// One line per figure that missed its target or was not measured.
pub(super) fn missed_targets(rows: &[Row]) -> Vec<String> {
    rows.iter()
        .filter_map(|r| match r.verdict() {
            Verdict::Missed(why) => Some(format!("{}: {}", r.figure, why.join("; "))),
            Verdict::NotMeasured => Some(format!(
                "{}: not measured ({})",
                r.figure,
                r.failure.as_deref().and_then(|f| f.lines().next()).unwrap_or("")
            )),
            Verdict::Met | Verdict::NoTarget => None,
        })
        .collect()
}

/// `Measured <date> on <cpu>, N CPUs, X GB RAM, Linux …`.
pub(crate) fn measured_on(sh: &Shell) -> String {
    let date_format = "+%Y-%m-%d %H:%M UTC";
    let date =
        capture(cmd!(sh, "date -u {date_format}")).map_or_else(|e| format!("(date: {e:#})"), |d| d.trim().to_owned());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or_else(
            || "unknown memory".into(),
            |kib| format!("{:.1} GB RAM", kib * 1024.0 / 1e9),
        );
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".into(), |k| k.trim().to_owned());
    format!("Measured {date} on {cpu}, {cpus} CPUs, {memory}, Linux {kernel}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(measured: f64, baseline: f64, max: Option<f64>, max_ratio: Option<f64>) -> Row {
        Row {
            figure: "pass".into(),
            unit: Unit::Millis,
            measured: Some(measured),
            baseline: Some(baseline),
            baseline_what: "raw GET".into(),
            max,
            max_ratio,
            failure: None,
        }
    }

    #[test]
    fn median_of_odd_and_even_counts_and_of_nothing() {
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn a_row_meets_its_target_only_within_every_bound() {
        assert_eq!(row(30.0, 12.0, Some(150.0), Some(3.0)).verdict(), Verdict::Met);
        assert_eq!(
            row(40.0, 10.0, Some(150.0), Some(3.0)).verdict(),
            Verdict::Missed(vec!["4.00× > 3× baseline".into()])
        );
        assert_eq!(
            row(1500.0, 100.0, Some(1000.0), None).verdict(),
            Verdict::Missed(vec!["1.50 s > 1.00 s".into()])
        );
        assert_eq!(row(1.0, 0.0, None, None).verdict(), Verdict::NoTarget);
        assert_eq!(Row::failed("x", "boom".into()).verdict(), Verdict::NotMeasured);
    }

    #[test]
    fn cells_format_values_ratio_and_target() {
        let cells = row(24.0, 8.0, Some(150.0), Some(3.0)).cells();
        assert_eq!(
            cells,
            ["pass", "24.0 ms", "8.0 ms", "3.00×", "≤ 150.0 ms, ≤ 3× baseline", "yes"].map(String::from)
        );
        let bytes = Row {
            unit: Unit::Bytes,
            ..row(7_340_032.0, 32_969_312.0, Some(10e6), None)
        };
        assert_eq!(
            bytes.cells()[1..].to_vec(),
            ["7.3 MB", "33.0 MB", "0.22×", "≤ 10.0 MB", "yes"]
        );
    }

    #[test]
    fn text_table_aligns_columns_and_markdown_lists_misses() {
        let rows = [
            row(24.0, 8.0, Some(150.0), None),
            row(2000.0, 100.0, Some(1000.0), None),
        ];
        let text = render_text(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        let col = |l: &str| l.find("measured").or_else(|| l.find("24.0")).or_else(|| l.find("2.00"));
        assert_eq!(col(lines[0]), col(lines[1]));
        assert_eq!(col(lines[1]), col(lines[2]));

        let md = render_markdown(&rows, "Measured today.");
        assert!(md.starts_with("Measured today.\n\n| figure | measured | baseline | ratio | target | ok? |\n| --- |"));
        assert!(md.contains("| pass | 2.00 s | 100.0 ms | 20.00× | ≤ 1.00 s | **NO** |"));
        assert!(md.contains("Missed:\n\n- pass: 2.00 s > 1.00 s"));
        assert!(md.contains("- pass: raw GET"));
    }
}
