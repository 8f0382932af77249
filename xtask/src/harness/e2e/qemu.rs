//! One QEMU boot of the ISO (TCG, no network, SeaBIOS or OVMF) with a data
//! disk, and what its probe printed on the serial console.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use xshell::{cmd, Shell};

use super::{progress, DISK_SIZE, MARKER, QEMU_FLAGS, STAGE, TAIL_LINES};
use crate::tools;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Firmware {
    #[value(name = "seabios")]
    SeaBios,
    Ovmf,
}

impl Firmware {
    pub(super) fn name(self) -> &'static str {
        match self {
            Firmware::SeaBios => "seabios",
            Firmware::Ovmf => "ovmf",
        }
    }
}

/// What one boot reported: the probe's facts and the console.
#[derive(Debug)]
pub(super) struct BootReport {
    pub(super) step: String,
    pub(super) facts: BTreeMap<String, String>,
    pub(super) console: String,
    pub(super) wall: Duration,
}

impl BootReport {
    pub(super) fn fact(&self, key: &str) -> anyhow::Result<&str> {
        self.facts
            .get(key)
            .map(String::as_str)
            .with_context(|| self.failure(&format!("the guest never reported `{key}`")))
    }

    /// The message of a failed step: what, and the guest's last lines.
    pub(super) fn failure(&self, what: &str) -> String {
        format!(
            "e2e step `{}`: {what}\n--- last {TAIL_LINES} console lines ---\n{}",
            self.step,
            tail(&self.console, TAIL_LINES)
        )
    }

    pub(super) fn check(&self, ok: bool, what: impl FnOnce() -> String) -> anyhow::Result<()> {
        if ok {
            Ok(())
        } else {
            bail!(self.failure(&what()))
        }
    }

    /// Container name → ID, as `podman ps -a` listed them.
    pub(super) fn containers(&self) -> anyhow::Result<BTreeMap<String, String>> {
        Ok(self
            .fact("containers")?
            .split_whitespace()
            .filter_map(|pair| pair.split_once('='))
            .map(|(name, id)| (name.to_owned(), id.to_owned()))
            .collect())
    }

    /// Seconds after kernel start: the agent's READY, and all apps healthy
    /// (the agent's own console line).
    pub(super) fn timeline(&self) -> (Option<f64>, Option<f64>) {
        let ready = self
            .facts
            .get("agent-ready-s")
            .and_then(|us| us.parse::<f64>().ok())
            .map(|us| us / 1e6);
        let healthy = self.console.lines().find_map(|l| {
            let rest = l.split("archipelago: all ").nth(1)?;
            let (_, after) = rest.split_once(" apps healthy ")?;
            after.split_whitespace().next()?.parse::<f64>().ok()
        });
        (ready, healthy)
    }

    /// A milestone the probe reported as `ms-<name>` (microseconds since
    /// kernel start, from systemd), in seconds; `None` when missing or 0
    /// (the unit never became active).
    pub(super) fn milestone(&self, name: &str) -> Option<f64> {
        let us = self.facts.get(&format!("ms-{name}"))?.parse::<f64>().ok()?;
        (us > 0.0).then_some(us / 1e6)
    }

    /// The lines of an output block the probe printed as
    /// `ARCHY-E2E-BLOCK <name>| <line>`, in order.
    pub(super) fn block(&self, name: &str) -> Vec<&str> {
        let prefix = format!("{BLOCK_MARKER}{name}| ");
        self.console
            .lines()
            .filter_map(|l| l.split_once(prefix.as_str()).map(|(_, rest)| rest))
            .collect()
    }
}

/// Marks a line of a multi-line block the probe prints (systemd-analyze,
/// the agent's log); not a fact line (no space after the marker's name).
pub(super) const BLOCK_MARKER: &str = "ARCHY-E2E-BLOCK ";

/// Boots the ISO once with `disk`, telling the probe `mode`, and returns
/// what it reported. Fails when the guest hangs or stops without `done`.
pub(super) fn boot(
    work: &Path,
    iso: &Path,
    disk: &Path,
    firmware: Firmware,
    which: &str,
    mode: &str,
    timeout: Duration,
) -> anyhow::Result<BootReport> {
    let step = format!("{which} boot ({})", firmware.name());
    progress::say(STAGE, &format!("{step}: booting (up to {} s)", timeout.as_secs()));
    let console = work.join(format!("console-{which}-{}.log", firmware.name()));
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(QEMU_FLAGS)
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-cdrom")
        .arg(iso)
        .arg("-drive")
        .arg(format!("file={},format=raw,if=virtio", disk.display()))
        .arg("-fw_cfg")
        .arg(format!("name=opt/archipelago/e2e,string={mode}"));
    if firmware == Firmware::Ovmf {
        let vars = work.join(format!("ovmf-vars-{which}.fd"));
        fs::copy(tools::OVMF_VARS, &vars).with_context(|| format!("copying {}", tools::OVMF_VARS))?;
        cmd.arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=0,readonly=on,file={}",
                tools::OVMF_CODE
            ))
            .arg("-drive")
            .arg(format!("if=pflash,format=raw,unit=1,file={}", vars.display()));
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let started = Instant::now();
    let child = cmd
        .spawn()
        .context("cannot start qemu-system-x86_64 (package qemu-system-x86)")?;
    let outcome = wait(child, timeout);
    let console_text = fs::read(&console)
        .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
        .unwrap_or_default();
    let report = BootReport {
        step: step.clone(),
        facts: parse_facts(&console_text),
        console: console_text,
        wall: started.elapsed(),
    };
    match outcome {
        Ok(()) => {}
        Err(e) => bail!(report.failure(&format!("{e:#}"))),
    }
    report.check(report.facts.contains_key("done"), || {
        "the guest powered off before the probe finished".into()
    })?;
    progress::say(STAGE, &format!("{step}: done in {:.0} s", report.wall.as_secs_f64()));
    Ok(report)
}

/// Waits for QEMU to exit (the guest powers itself off), killing it after
/// `timeout`.
pub(super) fn wait(mut child: Child, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().context("waiting for qemu")? {
            if status.success() {
                return Ok(());
            }
            let mut stderr = String::new();
            if let Some(mut pipe) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
            }
            bail!("qemu exited with {status}: {}", stderr.trim());
        }
        if Instant::now() >= deadline {
            // Best effort: the error that matters is the hang.
            let _ = child.kill();
            let _ = child.wait();
            bail!("the guest did not power off within {} s", timeout.as_secs());
        }
        crate::harness::procs::bail_if_interrupted().inspect_err(|_| {
            let _ = child.kill();
        })?;
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `ARCHY-E2E key value` lines; a later line wins.
pub(super) fn parse_facts(console: &str) -> BTreeMap<String, String> {
    console
        .lines()
        .filter_map(|l| l.split_once(MARKER).map(|(_, rest)| rest))
        .map(|rest| match rest.split_once(' ') {
            Some((k, v)) => (k.trim().to_owned(), v.trim().to_owned()),
            None => (rest.trim().to_owned(), String::new()),
        })
        .collect()
}

pub(super) fn make_disk(sh: &Shell, disk: &Path) -> anyhow::Result<()> {
    let _ = fs::remove_file(disk);
    cmd!(sh, "truncate -s {DISK_SIZE} {disk}").quiet().run()?;
    cmd!(sh, "mkfs.ext4 -q -F -L ARCHY-DATA {disk}").quiet().run()?;
    Ok(())
}

pub(super) fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn facts_are_read_from_marked_console_lines() {
        let console =
            "boot noise\n[  OK  ] Started x\nARCHY-E2E healthy yes\nARCHY-E2E containers a=1 b=2\nARCHY-E2E done\n";
        let facts = parse_facts(console);
        assert_eq!(facts["healthy"], "yes");
        assert_eq!(facts["containers"], "a=1 b=2");
        assert_eq!(facts["done"], "");
        assert_eq!(facts.len(), 3);
    }

    #[test]
    fn the_timeline_reads_ready_and_the_agents_all_healthy_line() {
        let report = BootReport {
            step: "first boot (seabios)".into(),
            facts: parse_facts("ARCHY-E2E agent-ready-s 41500000\n"),
            console: "archipelago: all 3 apps healthy 57.3 s after kernel start\n".into(),
            wall: Duration::from_secs(90),
        };
        assert_eq!(report.timeline(), (Some(41.5), Some(57.3)));
    }

    #[test]
    fn milestones_and_blocks_are_read_from_the_console() {
        let console = "ARCHY-E2E ms-data-disk 12500000\nARCHY-E2E ms-podman-service 0\n\
                       ARCHY-E2E-BLOCK blame| 5.1s archy-agent.service\nnoise\n\
                       ARCHY-E2E-BLOCK time| Startup finished\nARCHY-E2E-BLOCK blame| 1.0s x.service\n";
        let report = BootReport {
            step: "first boot (seabios)".into(),
            facts: parse_facts(console),
            console: console.into(),
            wall: Duration::from_secs(90),
        };
        assert_eq!(report.milestone("data-disk"), Some(12.5));
        assert_eq!(report.milestone("podman-service"), None);
        assert_eq!(report.milestone("user-manager"), None);
        assert_eq!(report.block("blame"), ["5.1s archy-agent.service", "1.0s x.service"]);
        assert!(!report.facts.keys().any(|k| k.contains("BLOCK")), "{:?}", report.facts);
    }

    #[test]
    fn a_failure_names_the_step_and_shows_the_last_console_lines() {
        let console: String = (0..100).map(|i| format!("line {i}\n")).collect();
        let report = BootReport {
            step: "second boot (ovmf)".into(),
            facts: BTreeMap::new(),
            console,
            wall: Duration::ZERO,
        };
        let message = report.fact("healthy").unwrap_err().to_string();
        assert!(message.contains("e2e step `second boot (ovmf)`"), "{message}");
        assert!(message.contains("line 99") && message.contains("line 60"), "{message}");
        assert!(!message.contains("line 59\n"), "{message}");
    }
}
