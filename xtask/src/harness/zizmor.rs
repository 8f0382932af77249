//! zizmor, the GitHub Actions linter, over `.github/workflows`: a step of
//! `cargo xtask test` that fails the run on any high-severity finding.
//!
//! The workflows hold the release key and publish releases, so they keep
//! the project's supply-chain standard (actions pinned by commit SHA, a
//! read-only token, no cache in the release workflow, no credentials left by
//! checkout); zizmor checks that mechanically. It comes from PyPI at a pinned
//! version and hash into `target/zizmor/` (`pytool.rs`) and runs with
//! `--offline`: its online audits (known-vulnerable action versions, tags
//! that moved) would make the result depend on the network and on
//! GitHub's rate limits. Findings below high are counted and printed, not
//! fatal. `# zizmor: ignore[...]` comments in a workflow are honoured, so
//! any waiver is written next to what it waives.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context as _};
use serde::Deserialize;

use crate::harness::pytool::PyTool;

/// The pinned zizmor: a single static binary in a wheel, no dependencies.
/// The hash is the manylinux x86_64 wheel's (the build machines are amd64).
pub const ZIZMOR: PyTool = PyTool {
    name: "zizmor",
    requirements: "zizmor==1.32.0 \
                   --hash=sha256:84a6acb975accc13408786a2bd274b572537ca19c933ebbc13e78f3988562071\n",
    bin: "zizmor",
};

/// The folder zizmor audits, relative to the project root.
pub const WORKFLOWS_DIR: &str = ".github/workflows";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Unknown,
    Informational,
    Low,
    Medium,
    High,
}

impl Severity {
    fn parse(s: &str) -> Severity {
        match s {
            "Informational" => Severity::Informational,
            "Low" => Severity::Low,
            "Medium" => Severity::Medium,
            "High" => Severity::High,
            _ => Severity::Unknown,
        }
    }
}

/// One finding, as much of it as the verdict needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// The audit, e.g. `unpinned-uses`.
    pub ident: String,
    pub severity: Severity,
    /// Waived by a `# zizmor: ignore[...]` comment or the configuration.
    pub ignored: bool,
}

#[derive(Deserialize)]
struct RawFinding {
    ident: String,
    determinations: RawDeterminations,
    #[serde(default)]
    ignored: bool,
}

#[derive(Deserialize)]
struct RawDeterminations {
    severity: String,
}

/// Reads zizmor's `--format json` (v1) output: a list of findings.
pub fn parse_findings(json: &str) -> anyhow::Result<Vec<Finding>> {
    let raw: Vec<RawFinding> =
        serde_json::from_str(json).context("reading zizmor's JSON output (a list of findings, format v1)")?;
    Ok(raw
        .into_iter()
        .map(|f| Finding {
            ident: f.ident,
            severity: Severity::parse(&f.determinations.severity),
            ignored: f.ignored,
        })
        .collect())
}

/// What the findings come to: counts of the ones not waived, by severity,
/// and the audits of the fatal (high) ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdict {
    pub high: Vec<String>,
    pub medium: usize,
    pub low: usize,
    pub informational: usize,
    pub unknown: usize,
    pub ignored: usize,
}

impl Verdict {
    pub fn of(findings: &[Finding]) -> Verdict {
        let mut v = Verdict::default();
        for f in findings {
            if f.ignored {
                v.ignored += 1;
                continue;
            }
            match f.severity {
                Severity::High => v.high.push(f.ident.clone()),
                Severity::Medium => v.medium += 1,
                Severity::Low => v.low += 1,
                Severity::Informational => v.informational += 1,
                Severity::Unknown => v.unknown += 1,
            }
        }
        v
    }

    pub fn passes(&self) -> bool {
        self.high.is_empty()
    }

    pub fn summary(&self) -> String {
        format!(
            "{} high, {} medium, {} low, {} informational, {} of unknown severity, {} waived by ignore comments",
            self.high.len(),
            self.medium,
            self.low,
            self.informational,
            self.unknown,
            self.ignored
        )
    }
}

fn zizmor_cmd(bin: &Path, dir: &Path, format: &str) -> Command {
    let mut command = Command::new(bin);
    command
        .args(["--offline", "--no-progress", "--color", "never", "--no-exit-codes"])
        .args(["--format", format])
        .arg(dir)
        // Nothing online, so no token either.
        .env_remove("GH_TOKEN")
        .env_remove("GITHUB_TOKEN")
        .env_remove("ZIZMOR_GITHUB_TOKEN");
    command
}

/// Audits `dir` (installing zizmor first when needed): the verdict, or an
/// error holding zizmor's own report of the high-severity findings.
pub fn check_dir(root: &Path, dir: &Path) -> anyhow::Result<Verdict> {
    let bin = ZIZMOR.ensure(root)?;
    let out = zizmor_cmd(&bin, dir, "json")
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "zizmor could not audit {} ({}):\n{}",
            dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let findings = parse_findings(&String::from_utf8_lossy(&out.stdout))?;
    let verdict = Verdict::of(&findings);
    if verdict.passes() {
        return Ok(verdict);
    }
    let mut plain = zizmor_cmd(&bin, dir, "plain");
    plain.args(["--min-severity", "high"]);
    let report = plain.output().with_context(|| format!("running {}", bin.display()))?;
    bail!(
        "zizmor found {} high-severity problem(s) in {} ({}): {}\n{}",
        verdict.high.len(),
        dir.display(),
        verdict.high.join(", "),
        verdict.summary(),
        String::from_utf8_lossy(&report.stdout).trim_end()
    );
}

/// The step of `cargo xtask test`: the project's own workflows.
pub fn check(root: &Path) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let dir = root.join(WORKFLOWS_DIR);
    let verdict = check_dir(root, &dir)?;
    eprintln!(
        "xtask: zizmor (offline) on {WORKFLOWS_DIR}: no high-severity finding ({}) in {:.1}s",
        verdict.summary(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Trimmed from zizmor 1.32.0's `--format json` over a workflow with an
    /// unpinned action and a checkout that keeps its credentials.
    const SAMPLE: &str = r#"[
      {"ident": "artipacked", "desc": "credential persistence through GitHub Actions artifacts",
       "determinations": {"confidence": "Low", "severity": "Medium", "persona": "Regular"},
       "locations": [], "ignored": false, "fixes": []},
      {"ident": "unpinned-uses", "desc": "unpinned action reference",
       "determinations": {"confidence": "High", "severity": "High", "persona": "Regular"},
       "locations": [], "ignored": false, "fixes": []},
      {"ident": "cache-poisoning", "desc": "runtime artifacts potentially vulnerable to a cache poisoning attack",
       "determinations": {"confidence": "Low", "severity": "High", "persona": "Regular"},
       "locations": [], "ignored": true, "fixes": []},
      {"ident": "superfluous-actions", "desc": "action functionality is already included by the runner",
       "determinations": {"confidence": "High", "severity": "Informational", "persona": "Regular"},
       "locations": [], "ignored": false, "fixes": []}
    ]"#;

    #[test]
    fn a_high_finding_fails_and_a_waived_one_does_not() {
        let findings = parse_findings(SAMPLE).unwrap();
        assert_eq!(findings.len(), 4);
        let verdict = Verdict::of(&findings);
        assert!(!verdict.passes());
        assert_eq!(verdict.high, ["unpinned-uses"]);
        assert_eq!(verdict.medium, 1);
        assert_eq!(verdict.informational, 1);
        assert_eq!(verdict.ignored, 1);
        assert!(verdict
            .summary()
            .starts_with("1 high, 1 medium, 0 low, 1 informational"));
    }

    #[test]
    fn no_findings_pass_and_anything_but_a_list_is_an_error() {
        assert!(Verdict::of(&parse_findings("[]").unwrap()).passes());
        let only_medium = SAMPLE.replace(r#""severity": "High""#, r#""severity": "Medium""#);
        assert!(Verdict::of(&parse_findings(&only_medium).unwrap()).passes());
        let err = parse_findings("No findings to report").unwrap_err();
        assert!(format!("{err:#}").contains("zizmor's JSON output"), "{err:#}");
    }

    fn project_root() -> &'static Path {
        Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
    }

    /// The real zizmor (installed into target/zizmor when missing) on the
    /// project's workflows: nothing high.
    #[test]
    fn the_project_workflows_have_no_high_finding() {
        let root = project_root();
        let verdict = check_dir(root, &root.join(WORKFLOWS_DIR)).unwrap();
        assert!(verdict.passes(), "{verdict:?}");
    }

    /// The real zizmor on a workflow with an action pinned by tag: the run
    /// fails, and the error carries zizmor's own report naming the audit.
    #[test]
    fn an_unpinned_action_fails_with_zizmors_report() {
        let tmp = tempfile::tempdir().unwrap();
        // zizmor collects workflows from a folder named .github/workflows.
        let dir = tmp.path().join(".github/workflows");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("bad.yml"),
            "name: bad\non: [push]\npermissions: {}\njobs:\n  x:\n    runs-on: ubuntu-latest\n    steps:\n      \
             - uses: actions/checkout@v4\n        with:\n          persist-credentials: false\n",
        )
        .unwrap();
        let err = check_dir(project_root(), &dir).unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("high-severity"), "{text}");
        assert!(text.contains("unpinned-uses"), "{text}");
        assert!(
            text.contains("actions/checkout@v4"),
            "zizmor's plain report is quoted: {text}"
        );
    }
}
