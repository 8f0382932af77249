//! One QEMU boot (TCG, SeaBIOS or OVMF): of the ISO's live or install
//! entry, or of an installed disk, with virtio disks that carry serials
//! and optionally a restricted user-mode network with an SSH port
//! forward; and what its probe printed on the serial console.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use super::{progress, MARKER, QEMU_FLAGS, STAGE, TAIL_LINES};
use crate::tools;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Firmware {
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
#[derive(Debug, Clone)]
pub(super) struct BootReport {
    pub(super) step: String,
    pub(super) facts: BTreeMap<String, String>,
    pub(super) console: String,
    /// When QEMU started, and how long it ran.
    pub(super) started: Instant,
    pub(super) wall: Duration,
    /// How the boot ended (the timeline shows it).
    pub(super) ending: Ending,
}

/// How a boot ended, as the console (or the host) saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ending {
    /// The guest powered itself off (`reboot: Power down`).
    PoweredOff,
    /// The guest restarted itself (`reboot: Restarting system`); QEMU
    /// runs with `-no-reboot`, so the next boot is a new QEMU process.
    Rebooted,
    /// The kernel panicked (and `panic=N` restarted it).
    Panicked,
    /// The host killed QEMU: a power cut.
    PowerCut,
    /// QEMU exited without the kernel saying why (GRUB or the firmware
    /// reset the machine).
    Exited,
}

impl Ending {
    /// How the boot whose console this is ended, unless the host cut it.
    pub(super) fn of(console: &str, cut: bool) -> Ending {
        if cut {
            Ending::PowerCut
        } else if console.contains("Kernel panic - not syncing") {
            Ending::Panicked
        } else if console.contains("reboot: Power down") {
            Ending::PoweredOff
        } else if console.contains("reboot: Restarting system") {
            Ending::Rebooted
        } else {
            Ending::Exited
        }
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            Ending::PoweredOff => "powered off",
            Ending::Rebooted => "rebooted",
            Ending::Panicked => "kernel panic",
            Ending::PowerCut => "power cut",
            Ending::Exited => "reset",
        }
    }
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

/// The probe's line that hands the turn to the host (`wait-host`): the
/// guest keeps running until the host says it is done.
const HOST_TURN: &str = "ARCHY-E2E host-turn";

/// The SMBIOS system serial number that makes the e2e's boot menu start
/// its install entry (`super::e2e_menu`); GRUB reads it with `smbios`.
pub(super) const INSTALL_SERIAL: &str = "archy-e2e-install";

/// What the host does while the probe waits for it (`wait-host`), given
/// the console so far; it may end with cutting the guest's power.
pub(super) type HostTurn<'a> = &'a mut dyn FnMut(&str) -> anyhow::Result<AfterTurn>;

/// What happens to the guest after the host's turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AfterTurn {
    /// It runs on (the probe finishes, or the guest reboots itself).
    Continue,
    /// QEMU is killed at once: a power cut.
    PowerCut,
}

/// The serial of the ISO attached as a stick (`Start::InstallStick`).
pub(super) const STICK_SERIAL: &str = "archy-stick";

/// One disk image on virtio; the guest names it
/// `/dev/disk/by-id/virtio-<serial>`.
#[derive(Debug, Clone)]
pub(super) struct Disk {
    pub(super) path: PathBuf,
    pub(super) serial: String,
    /// Attached read-only (QEMU refuses the guest's writes).
    pub(super) read_only: bool,
}

impl Disk {
    pub(super) fn new(path: PathBuf, serial: &str) -> Disk {
        Disk {
            path,
            serial: serial.to_owned(),
            read_only: false,
        }
    }

    /// A disk the guest may read but never write (the update bundles).
    pub(super) fn read_only(path: PathBuf, serial: &str) -> Disk {
        Disk {
            read_only: true,
            ..Disk::new(path, serial)
        }
    }
}

/// What the guest starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Start<'a> {
    /// The ISO's default entry: the live system (serial console).
    Live(&'a Path),
    /// The ISO's install entry, unattended (`archipelago.install=auto`),
    /// from a CD.
    Install(&'a Path),
    /// The same from the ISO written to a USB stick: a read-only virtio
    /// disk (serial [`STICK_SERIAL`]) attached after the others.
    InstallStick(&'a Path),
    /// The first disk, no ISO: an installed node.
    Disk,
}

/// One guest: its firmware, what it starts from, its disks (in order;
/// under `Start::Disk` the first one boots), the probe's instruction and
/// an optional SSH port forward.
#[derive(Debug, Clone)]
pub(super) struct Guest<'a> {
    /// Short and file-safe: names the console log.
    pub(super) name: String,
    pub(super) firmware: Firmware,
    pub(super) start: Start<'a>,
    pub(super) disks: Vec<Disk>,
    /// The probe's instruction (fw_cfg `opt/archipelago/e2e`): words
    /// joined by `+` (`kill`, `write-data`, `wait-host`).
    pub(super) mode: String,
    /// `127.0.0.1:<port>` on the host forwards to the guest's port 22.
    pub(super) ssh_port: Option<u16>,
    /// The guest's clock at power on (`-rtc base=…`), when not the host's.
    pub(super) rtc_base: Option<&'static str>,
}

impl Guest<'_> {
    pub(super) fn step(&self) -> String {
        format!("{} ({})", self.name, self.firmware.name())
    }

    pub(super) fn console(&self, work: &Path) -> PathBuf {
        work.join(format!("console-{}-{}.log", self.name, self.firmware.name()))
    }

    /// QEMU's arguments beyond `QEMU_FLAGS`.
    fn args(&self, work: &Path) -> anyhow::Result<Vec<String>> {
        let mut args = vec![
            "-serial".to_owned(),
            format!("file:{}", self.console(work).display()),
            "-fw_cfg".to_owned(),
            format!("name=opt/archipelago/e2e,string={}", self.mode),
        ];
        // Boot order by `bootindex` (SeaBIOS and OVMF both follow it): the
        // ISO first when there is one, else the first disk.
        let iso = match self.start {
            Start::Live(iso) | Start::Install(iso) | Start::InstallStick(iso) => Some(iso),
            Start::Disk => None,
        };
        if let Start::Live(iso) | Start::Install(iso) = self.start {
            args.extend([
                "-drive".to_owned(),
                format!(
                    "file={},if=none,id=cd0,media=cdrom,readonly=on,format=raw",
                    iso.display()
                ),
                "-device".to_owned(),
                "ide-cd,drive=cd0,bootindex=0".to_owned(),
            ]);
        }
        if let Start::Install(_) | Start::InstallStick(_) = self.start {
            args.extend(["-smbios".to_owned(), format!("type=1,serial={INSTALL_SERIAL}")]);
        }
        let first_disk = usize::from(iso.is_some());
        for (i, disk) in self.disks.iter().enumerate() {
            args.extend([
                "-drive".to_owned(),
                format!(
                    "file={},if=none,id=d{i},format=raw,cache=unsafe{}",
                    disk.path.display(),
                    if disk.read_only { ",readonly=on" } else { "" }
                ),
                "-device".to_owned(),
                format!(
                    "virtio-blk-pci,drive=d{i},serial={},bootindex={}",
                    disk.serial,
                    first_disk + i
                ),
            ]);
        }
        if let Start::InstallStick(iso) = self.start {
            // Read-only: the other sequence boots the same file.
            args.extend([
                "-drive".to_owned(),
                format!("file={},if=none,id=stick,format=raw,readonly=on", iso.display()),
                "-device".to_owned(),
                format!("virtio-blk-pci,drive=stick,serial={STICK_SERIAL},bootindex=0"),
            ]);
        }
        match self.ssh_port {
            // restrict=on: the guest reaches nothing outside QEMU. No
            // option ROM: the firmware has nothing to boot over the network.
            Some(port) => args.extend([
                "-netdev".to_owned(),
                format!("user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:22"),
                "-device".to_owned(),
                "virtio-net-pci,netdev=n0,romfile=".to_owned(),
            ]),
            None => args.extend(["-nic".to_owned(), "none".to_owned()]),
        }
        if let Some(base) = self.rtc_base {
            args.extend(["-rtc".to_owned(), format!("base={base}")]);
        }
        if self.firmware == Firmware::Ovmf {
            // A fresh, empty variable store at every boot: an installed
            // disk must boot with empty NVRAM (the removable path).
            let vars = work.join(format!("ovmf-vars-{}.fd", self.name));
            fs::copy(tools::OVMF_VARS, &vars).with_context(|| format!("copying {}", tools::OVMF_VARS))?;
            args.extend([
                "-drive".to_owned(),
                format!("if=pflash,format=raw,unit=0,readonly=on,file={}", tools::OVMF_CODE),
                "-drive".to_owned(),
                format!("if=pflash,format=raw,unit=1,file={}", vars.display()),
            ]);
        }
        Ok(args)
    }
}

/// Boots `guest` until it powers itself off and returns what its console
/// showed. When the probe hands the turn to the host (`wait-host`),
/// `host_turn` runs while the guest waits; an error there stops the guest
/// and fails the boot. A guest that does not power off within `timeout`
/// fails the boot. Whether the probe finished is the caller's to check.
pub(super) fn boot(
    work: &Path,
    guest: &Guest<'_>,
    timeout: Duration,
    mut host_turn: Option<HostTurn<'_>>,
) -> anyhow::Result<BootReport> {
    let step = guest.step();
    progress::say(STAGE, &format!("{step}: booting (up to {} s)", timeout.as_secs()));
    let console = guest.console(work);
    let _ = fs::remove_file(&console);
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(QEMU_FLAGS).args(guest.args(work)?);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let started = Instant::now();
    let child = cmd
        .spawn()
        .context("cannot start qemu-system-x86_64 (package qemu-system-x86)")?;
    let outcome = wait(child, timeout, || {
        let Some(turn) = host_turn.as_mut() else {
            return Ok(AfterTurn::Continue);
        };
        let text = read_console(&console);
        if !text.contains(HOST_TURN) {
            return Ok(AfterTurn::Continue);
        }
        progress::say(STAGE, &format!("{step}: the guest waits; the host's turn"));
        let result = turn(&text);
        host_turn = None;
        result
    });
    let console_text = read_console(&console);
    let cut = matches!(outcome, Ok(AfterTurn::PowerCut));
    let report = BootReport {
        step: step.clone(),
        facts: parse_facts(&console_text),
        ending: Ending::of(&console_text, cut),
        console: console_text,
        started,
        wall: started.elapsed(),
    };
    if let Err(e) = outcome {
        bail!(report.failure(&format!("{e:#}")));
    }
    progress::say(
        STAGE,
        &format!(
            "{step}: {} after {:.0} s",
            report.ending.name(),
            report.wall.as_secs_f64()
        ),
    );
    Ok(report)
}

/// [`boot`] of a guest whose probe runs: fails unless it finished.
pub(super) fn probe_boot(
    work: &Path,
    guest: &Guest<'_>,
    timeout: Duration,
    host_turn: Option<HostTurn<'_>>,
) -> anyhow::Result<BootReport> {
    let report = boot(work, guest, timeout, host_turn)?;
    report.check(report.facts.contains_key("done"), || {
        "the guest powered off before the probe finished".into()
    })?;
    Ok(report)
}

fn read_console(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
        .unwrap_or_default()
}

/// Waits for QEMU to exit (the guest powers itself off), calling `tick`
/// every half second meanwhile; kills it after `timeout` or when `tick`
/// fails, and when `tick` asks for a power cut (then returns
/// `AfterTurn::PowerCut`).
fn wait(
    mut child: Child,
    timeout: Duration,
    mut tick: impl FnMut() -> anyhow::Result<AfterTurn>,
) -> anyhow::Result<AfterTurn> {
    let deadline = Instant::now() + timeout;
    let stop = |child: &mut Child| {
        // Best effort: the error that matters is the one that stops it.
        let _ = child.kill();
        let _ = child.wait();
    };
    loop {
        if let Some(status) = child.try_wait().context("waiting for qemu")? {
            if status.success() {
                return Ok(AfterTurn::Continue);
            }
            let mut stderr = String::new();
            if let Some(mut pipe) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
            }
            bail!("qemu exited with {status}: {}", stderr.trim());
        }
        if Instant::now() >= deadline {
            stop(&mut child);
            bail!("the guest did not power off within {} s", timeout.as_secs());
        }
        match crate::harness::procs::bail_if_interrupted().and_then(|()| tick()) {
            Ok(AfterTurn::Continue) => {}
            Ok(AfterTurn::PowerCut) => {
                // SIGKILL: QEMU stops at once, nothing is flushed.
                stop(&mut child);
                return Ok(AfterTurn::PowerCut);
            }
            Err(e) => {
                stop(&mut child);
                return Err(e);
            }
        }
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
            started: Instant::now(),
            wall: Duration::from_secs(90),
            ending: Ending::PoweredOff,
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
            started: Instant::now(),
            wall: Duration::from_secs(90),
            ending: Ending::PoweredOff,
        };
        assert_eq!(report.milestone("data-disk"), Some(12.5));
        assert_eq!(report.milestone("podman-service"), None);
        assert_eq!(report.milestone("user-manager"), None);
        assert_eq!(report.block("blame"), ["5.1s archy-agent.service", "1.0s x.service"]);
        assert!(!report.facts.keys().any(|k| k.contains("BLOCK")), "{:?}", report.facts);
    }

    #[test]
    fn a_boot_ends_as_its_console_says_unless_the_host_cut_it() {
        let panic =
            "[    3.1] Kernel panic - not syncing: VFS: Unable to mount root fs\n[    3.2] Rebooting in 10 seconds..\n";
        assert_eq!(Ending::of(panic, false), Ending::Panicked);
        assert_eq!(
            Ending::of("x\n[  90.0] reboot: Power down\n", false),
            Ending::PoweredOff
        );
        assert_eq!(
            Ending::of("[  80.0] reboot: Restarting system\n", false),
            Ending::Rebooted
        );
        assert_eq!(Ending::of("GRUB loading\n", false), Ending::Exited);
        assert_eq!(Ending::of("[  90.0] reboot: Power down\n", true), Ending::PowerCut);
    }

    #[test]
    fn a_failure_names_the_step_and_shows_the_last_console_lines() {
        let console: String = (0..100).map(|i| format!("line {i}\n")).collect();
        let report = BootReport {
            step: "second boot (ovmf)".into(),
            facts: BTreeMap::new(),
            console,
            started: Instant::now(),
            wall: Duration::ZERO,
            ending: Ending::PoweredOff,
        };
        let message = report.fact("healthy").unwrap_err().to_string();
        assert!(message.contains("e2e step `second boot (ovmf)`"), "{message}");
        assert!(message.contains("line 99") && message.contains("line 60"), "{message}");
        assert!(!message.contains("line 59\n"), "{message}");
    }
}
