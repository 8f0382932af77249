//! `archy-agent os boot-check` (`archy-boot-check.service`, required by
//! `boot-complete.target`) and `os mark-good` (`archy-mark-good.service`,
//! after `boot-complete.target`): the commit of a release on trial.
//!
//! On a trial boot boot-check waits until the node is what it was before
//! the update: no failed system units, the data partition mounted
//! read-write, the agent's first pass done (`archy-agent.service` active:
//! it is `Type=notify` and says READY after its first pass), and every
//! app that was healthy before the update healthy again. Past the deadline
//! (15 min, `archipelago.trial_deadline=`) or at once with
//! `archipelago.test.unhealthy`, it appends the reason to `trial.json`'s
//! failures and fails: `FailureAction=reboot` reboots, GRUB counts the try,
//! and after the third the old release boots again (`boot.rs` finds the
//! rollback). On a committed boot it only reports.
//!
//! The verdict is pure ([`verdict`], the checks' results as data); the
//! gathering and the effects are thin.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::Value;

use super::boot::{self, EnvAccess};
use super::records::{self, BootStatus, SlotState, Trial, TrialFailure};
use crate::dataroot::DataRoot;

/// The check's own unit: its failure is not the node's.
pub const OWN_UNIT: &str = "archy-boot-check.service";
/// The agent's unit: active once its first pass is done.
pub const AGENT_UNIT: &str = "archy-agent.service";
/// Between two looks.
const POLL: Duration = Duration::from_secs(5);

/// One app as the agent's `container-list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppSeen {
    pub app: String,
    /// `running`, `exited`, … (the agent's state word).
    pub state: String,
    /// `healthy`, `starting`, `unhealthy`, or `None` (no health check).
    pub health: Option<String>,
}

impl AppSeen {
    fn healthy(&self) -> bool {
        self.state == "running" && self.health.as_deref().is_none_or(|h| h == "healthy")
    }
}

/// What one look at the node found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// Failed system units (the check's own left out).
    pub failed_units: Vec<String>,
    /// The data partition's mount: `Some(true)` read-write, `Some(false)`
    /// read-only, `None` not mounted.
    pub data_rw: Option<bool>,
    /// `systemctl is-active archy-agent.service`.
    pub agent: String,
    /// The agent's apps, or why they could not be listed.
    pub apps: Result<Vec<AppSeen>, String>,
}

/// What boot-check concludes from one look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Everything as before the update: commit.
    Pass,
    /// Not yet (what is missing).
    Wait(String),
    /// Failed (the reason recorded in trial.json).
    Fail(String),
}

/// The verdict on a trial boot, from one look (pure). `elapsed` against
/// `deadline`: past it, what is still missing is the failure.
pub fn verdict(
    seen: &Observed,
    healthy_before: &[String],
    test_unhealthy: bool,
    elapsed: Duration,
    deadline: Duration,
) -> Verdict {
    if test_unhealthy {
        return Verdict::Fail("archipelago.test.unhealthy is on the kernel command line".to_owned());
    }
    let missing = missing(seen, healthy_before);
    match missing {
        None => Verdict::Pass,
        Some(what) if elapsed >= deadline => Verdict::Fail(format!("not up within {} s: {what}", deadline.as_secs())),
        Some(what) => Verdict::Wait(what),
    }
}

/// What is still missing, as a person reads it; `None` when nothing is.
fn missing(seen: &Observed, healthy_before: &[String]) -> Option<String> {
    if !seen.failed_units.is_empty() {
        return Some(format!("failed units: {}", seen.failed_units.join(", ")));
    }
    match seen.data_rw {
        None => return Some("the data partition is not mounted".to_owned()),
        Some(false) => return Some("the data partition is mounted read-only".to_owned()),
        Some(true) => {}
    }
    if seen.agent != "active" {
        return Some(format!("{AGENT_UNIT} is {} (its first pass is not done)", seen.agent));
    }
    let apps = match &seen.apps {
        Ok(apps) => apps,
        Err(e) => return Some(format!("cannot list the apps: {e}")),
    };
    let not: Vec<String> = healthy_before
        .iter()
        .filter_map(|id| match apps.iter().find(|a| &a.app == id) {
            None => Some(format!("{id} (missing)")),
            Some(a) if !a.healthy() => Some(format!(
                "{id} ({}{})",
                a.state,
                a.health.as_deref().map(|h| format!(", {h}")).unwrap_or_default()
            )),
            Some(_) => None,
        })
        .collect();
    (!not.is_empty()).then(|| format!("apps healthy before the update are not healthy: {}", not.join(", ")))
}

/// Where boot-check and mark-good look (each overridable for tests).
#[derive(Debug, Clone)]
pub struct CheckPaths {
    pub cmdline: PathBuf,
    pub data: DataRoot,
    pub boot_json: PathBuf,
    pub control: PathBuf,
    pub issue: PathBuf,
    pub esp_dir: PathBuf,
}

fn failed_units() -> anyhow::Result<Vec<String>> {
    let out = Command::new("systemctl")
        .args(["list-units", "--state=failed", "--no-legend", "--plain", "--full"])
        .stdin(Stdio::null())
        .output()
        .context("cannot run systemctl (package systemd)")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|u| *u != OWN_UNIT)
        .map(str::to_owned)
        .collect())
}

/// The data root's mount: read-write, read-only, or not a mount.
pub fn data_mount(data: &Path) -> Option<bool> {
    let out = Command::new("findmnt")
        .args(["-n", "-o", "OPTIONS", "--mountpoint"])
        .arg(data)
        .stdin(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let opts = String::from_utf8_lossy(&out.stdout);
    Some(opts.trim().split(',').any(|o| o == "rw"))
}

fn agent_state() -> String {
    Command::new("systemctl")
        .args(["is-active", AGENT_UNIT])
        .stdin(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The agent's apps through its control socket (`container-list`).
pub async fn list_apps(control: &Path) -> Result<Vec<AppSeen>, String> {
    let client = crate::control::ControlClient::connect(control)
        .await
        .map_err(|e| format!("{e:#}"))?
        .ok_or_else(|| format!("no agent answers on {}", control.display()))?;
    let list = client
        .call("container-list", Value::Null)
        .await
        .map_err(|e| e.to_string())?;
    let apps = list.as_array().ok_or("container-list did not answer a list")?;
    Ok(apps
        .iter()
        .map(|a| AppSeen {
            app: a["app"].as_str().unwrap_or_default().to_owned(),
            state: a["state"].as_str().unwrap_or("unknown").to_owned(),
            health: a["health"].as_str().map(str::to_owned),
        })
        .collect())
}

async fn observe(paths: &CheckPaths) -> Observed {
    Observed {
        failed_units: failed_units().unwrap_or_else(|e| vec![format!("({e:#})")]),
        data_rw: data_mount(paths.data.path()),
        agent: agent_state(),
        apps: list_apps(&paths.control).await,
    }
}

/// boot-check. Returns `Ok(true)` when the boot passes (or is not on
/// trial), `Ok(false)` when it failed (recorded).
pub async fn boot_check(paths: &CheckPaths, out: &mut impl std::io::Write) -> anyhow::Result<bool> {
    let words = super::cmdline::read(&paths.cmdline)?;
    let Some(status) = BootStatus::read(&paths.boot_json)? else {
        writeln!(
            out,
            "no {}: not a boot from an installed disk; nothing to check",
            paths.boot_json.display()
        )?;
        return Ok(true);
    };
    if !status.trial {
        let seen = observe(paths).await;
        let note = missing(&seen, &[]).unwrap_or_else(|| "everything is up".to_owned());
        writeln!(out, "committed boot of slot {}: {note}", status.booted_slot)?;
        return Ok(true);
    }
    let trial = Trial::read(&paths.data.os_trial())?;
    let healthy_before = trial.as_ref().map(|t| t.healthy_before.clone()).unwrap_or_default();
    let deadline = Duration::from_secs(
        status
            .trial_deadline_secs
            .or(words.trial_deadline)
            .unwrap_or(boot::DEFAULT_TRIAL_DEADLINE_SECS),
    );
    let started = Instant::now();
    let mut last_said = String::new();
    loop {
        let seen = observe(paths).await;
        match verdict(
            &seen,
            &healthy_before,
            words.test_unhealthy,
            started.elapsed(),
            deadline,
        ) {
            Verdict::Pass => {
                writeln!(out, "trial boot of slot {} is up: ready to commit", status.booted_slot)?;
                return Ok(true);
            }
            Verdict::Wait(what) => {
                if what != last_said {
                    writeln!(out, "waiting: {what}")?;
                    out.flush()?;
                    last_said = what;
                }
                tokio::time::sleep(POLL).await;
            }
            Verdict::Fail(reason) => {
                let tries = status.slot(status.booted_slot).tries;
                record_failure(&paths.data, tries, &reason)?;
                writeln!(
                    out,
                    "trial boot of slot {} failed (try {tries}): {reason}",
                    status.booted_slot
                )?;
                return Ok(false);
            }
        }
    }
}

/// Appends a failed try to trial.json (made when missing, so the reason
/// is never lost).
pub fn record_failure(data: &DataRoot, try_n: u8, reason: &str) -> anyhow::Result<()> {
    let path = data.os_trial();
    let Some(mut trial) = Trial::read(&path)? else {
        tracing::warn!(path = %path.display(), "no trial record to add the failure to");
        return Ok(());
    };
    trial.failures.retain(|f| f.try_n != try_n);
    trial.failures.push(TrialFailure {
        try_n,
        reason: reason.to_owned(),
    });
    trial.write(&path)?;
    Ok(())
}

/// mark-good: commits the booted slot (the boot environment first: that
/// is the commit), then boot.json, then removes trial.json and the state
/// snapshot. Returns the journal line; `None` when there was no trial.
pub fn mark_good(paths: &CheckPaths, store: &impl EnvAccess) -> anyhow::Result<Option<String>> {
    let Some(mut status) = BootStatus::read(&paths.boot_json)? else {
        return Ok(None);
    };
    if !status.trial {
        return Ok(None);
    }
    let slot = status.booted_slot;
    store.commit(slot)?;
    status.trial = false;
    status.committed = true;
    status.trial_deadline_secs = None;
    let own = match slot {
        records::Slot::A => &mut status.a,
        records::Slot::B => &mut status.b,
    };
    own.state = SlotState::Good;
    own.tries = 0;
    status.write(&paths.boot_json)?;
    records::remove(&paths.data.os_trial())?;
    let snap = paths.data.os_state_snapshot();
    if snap.exists() {
        std::fs::remove_dir_all(&snap).with_context(|| format!("cannot remove {}", snap.display()))?;
    }
    boot::write_console(&paths.issue, boot::console_text(&status).as_deref())?;
    Ok(Some(format!(
        "committed {} in slot {slot}",
        status.booted_version.as_deref().unwrap_or("an unknown release")
    )))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn app(id: &str, state: &str, health: Option<&str>) -> AppSeen {
        AppSeen {
            app: id.into(),
            state: state.into(),
            health: health.map(str::to_owned),
        }
    }

    fn up() -> Observed {
        Observed {
            failed_units: vec![],
            data_rw: Some(true),
            agent: "active".into(),
            apps: Ok(vec![
                app("wallet", "running", Some("healthy")),
                app("web", "running", None),
            ]),
        }
    }

    const MIN: Duration = Duration::from_secs(60);
    const DEADLINE: Duration = Duration::from_secs(900);

    fn before() -> Vec<String> {
        vec!["wallet".into(), "web".into()]
    }

    #[test]
    fn a_node_like_before_passes() {
        assert_eq!(verdict(&up(), &before(), false, MIN, DEADLINE), Verdict::Pass);
        // An app not healthy before the update does not count.
        let mut seen = up();
        seen.apps = Ok(vec![
            app("wallet", "running", Some("healthy")),
            app("web", "exited", None),
        ]);
        assert_eq!(verdict(&seen, &["wallet".into()], false, MIN, DEADLINE), Verdict::Pass);
    }

    #[test]
    fn each_missing_condition_waits_then_fails_at_the_deadline() {
        type Change = Box<dyn Fn(&mut Observed)>;
        let cases: Vec<(Change, &str)> = vec![
            (
                Box::new(|o| o.failed_units = vec!["ssh.service".into()]),
                "failed units: ssh.service",
            ),
            (Box::new(|o| o.data_rw = None), "the data partition is not mounted"),
            (Box::new(|o| o.data_rw = Some(false)), "mounted read-only"),
            (
                Box::new(|o| o.agent = "activating".into()),
                "archy-agent.service is activating",
            ),
            (
                Box::new(|o| o.apps = Err("no agent".into())),
                "cannot list the apps: no agent",
            ),
            (
                Box::new(|o| o.apps = Ok(vec![app("web", "running", None)])),
                "wallet (missing)",
            ),
            (
                Box::new(|o| {
                    o.apps = Ok(vec![
                        app("wallet", "running", Some("unhealthy")),
                        app("web", "running", None),
                    ])
                }),
                "wallet (running, unhealthy)",
            ),
            (
                Box::new(|o| {
                    o.apps = Ok(vec![
                        app("wallet", "running", Some("starting")),
                        app("web", "running", None),
                    ])
                }),
                "wallet (running, starting)",
            ),
        ];
        for (change, says) in cases {
            let mut seen = up();
            change(&mut seen);
            match verdict(&seen, &before(), false, MIN, DEADLINE) {
                Verdict::Wait(w) => assert!(w.contains(says), "{w} / {says}"),
                v => panic!("{says}: {v:?}"),
            }
            match verdict(&seen, &before(), false, DEADLINE, DEADLINE) {
                Verdict::Fail(r) => assert!(r.starts_with("not up within 900 s: ") && r.contains(says), "{r}"),
                v => panic!("{says}: {v:?}"),
            }
        }
    }

    #[test]
    fn the_test_flag_fails_at_once() {
        assert_eq!(
            verdict(&up(), &before(), true, Duration::ZERO, DEADLINE),
            Verdict::Fail("archipelago.test.unhealthy is on the kernel command line".into())
        );
    }

    #[test]
    fn failures_are_appended_once_per_try() {
        let tmp = tempfile::tempdir().unwrap();
        let data = DataRoot::new(tmp.path());
        let t = Trial {
            format: records::FORMAT,
            from_version: "1".into(),
            to_version: "2".into(),
            to_slot: records::Slot::B,
            healthy_before: vec![],
            started_at: "t".into(),
            failures: vec![],
        };
        t.write(&data.os_trial()).unwrap();
        record_failure(&data, 1, "a").unwrap();
        record_failure(&data, 2, "b").unwrap();
        record_failure(&data, 2, "b again").unwrap();
        let t = Trial::read(&data.os_trial()).unwrap().unwrap();
        assert_eq!(t.rollback_reason(), "try 1: a; try 2: b again");
    }
}
