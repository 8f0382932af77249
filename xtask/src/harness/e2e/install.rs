//! The install scenarios (issue 15): the ISO's unattended install onto a
//! blank disk, the installed disk booted alone under both firmwares and
//! reached over SSH, a reinstall that keeps the data partition, and an
//! install boot that must refuse every disk it is shown.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use xshell::{cmd, Shell};

use super::disks::{self, Edges, Table, GIB};
use super::live::{check_first_boot, check_second_boot};
use super::qemu::{boot, probe_boot, AfterTurn, BootReport, Disk, Firmware, Guest, Start};
use super::ssh::{self, Endpoint, TestKey};
use super::{progress, STAGE};

/// The node's disk: above the installer's 16 GiB minimum.
const TARGET_SIZE: u64 = 20 * GIB;
/// Below the installer's minimum: never eligible.
const SMALL_SIZE: u64 = GIB;
/// The line the installer ends with, always (then what happened).
const INSTALLER: &str = "archipelago install: ";
/// How long the host waits for sshd after the probe handed it the turn.
const SSH_PATIENCE: Duration = Duration::from_secs(120);

/// The installer's last line on the console, after its prefix.
fn installer_outcome(r: &BootReport) -> anyhow::Result<&str> {
    let outcome = r
        .console
        .lines()
        .filter_map(|l| l.split_once(INSTALLER).map(|(_, rest)| rest.trim()))
        .next_back();
    outcome.with_context(|| r.failure("the installer printed no `archipelago install: …` line"))
}

fn ensure_installed(r: &BootReport) -> anyhow::Result<()> {
    let outcome = installer_outcome(r)?;
    r.check(outcome.starts_with("installed "), || {
        format!("the installer did not install: `{INSTALLER}{outcome}`")
    })?;
    r.check(!r.facts.contains_key("mode"), || {
        "the e2e probe ran in install mode".into()
    })?;
    progress::say(STAGE, &format!("{}: {INSTALLER}{outcome}", r.step));
    Ok(())
}

/// The installed node a sequence leaves: its disk and the key that logs
/// into it.
pub(super) struct Installed {
    pub(super) disk: Disk,
    pub(super) key: TestKey,
}

/// The last boot of the install sequence (the disk again, after the
/// reinstall), when another sequence boots it: what that boot must show.
pub(super) struct LastBoot {
    second: BootReport,
    table: Table,
    first_key: String,
}

impl LastBoot {
    /// The same node, the same containers, nothing installed, pulled or
    /// imported, the host key kept across the reinstall.
    pub(super) fn check(&self, third: &BootReport) -> anyhow::Result<()> {
        check_second_boot(&self.second, third)?;
        check_installed_boot(third, &self.table)?;
        check_same_node(&self.second, third)?;
        third.check(third.fact("pulls")? == "0", || "the agent pulled an image".into())?;
        third.check(third.fact("host-key")? == self.first_key, || {
            format!(
                "the host key changed across the reinstall: {} then {}",
                self.first_key,
                third.fact("host-key").unwrap_or("-")
            )
        })
    }
}

/// What the install sequence boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Scope {
    /// The install alone.
    Install,
    /// Everything but the last boot, which the caller makes (with
    /// [`LastBoot::check`]).
    AllButLast,
    /// Everything.
    All,
}

/// The OVMF sequence: install, boot the disk under OVMF and under SeaBIOS
/// (each logging in over SSH), reinstall, boot the disk again; `scope`
/// says how much of it. Right after the install, `installed` gets a copy
/// of the fresh disk (`cp --sparse=always`) for the other sequence.
pub(super) fn sequence(
    work: &Path,
    iso: &Path,
    timeout: Duration,
    scope: Scope,
    installed: impl FnOnce(Installed),
) -> anyhow::Result<(Vec<BootReport>, Installed, Option<LastBoot>)> {
    let sh = Shell::new().context("creating a shell")?;
    let key = TestKey::generate(&sh, &work.join("ssh"))?;
    let target = Disk::new(work.join("node.img"), "archy-node");
    let conf = Disk::new(work.join("archy-conf.img"), "archy-conf");
    disks::blank(&target.path, TARGET_SIZE)?;
    disks::conf_disk(&sh, &conf.path, &key.public)?;

    // 1. The unattended install: a blank disk and the ARCHY-CONF stick.
    let install = boot(
        work,
        &Guest {
            name: "install".into(),
            firmware: Firmware::Ovmf,
            start: Start::Install(iso),
            disks: vec![target.clone(), conf],
            mode: "check".into(),
            ssh_port: None,
            rtc_base: None,
        },
        timeout,
        None,
    )?;
    ensure_installed(&install)?;
    let table = disks::table(&sh, &target.path)?;
    check_layout(&sh, &install, &target, &table)?;
    let copy = Disk::new(work.join("node-copy.img"), "archy-node");
    let (from, to) = (&target.path, &copy.path);
    cmd!(sh, "cp --sparse=always {from} {to}")
        .quiet()
        .run()
        .context("copying the installed disk")?;
    installed(Installed {
        disk: copy,
        key: key.clone(),
    });
    if scope == Scope::Install {
        return Ok((vec![install], Installed { disk: target, key }, None));
    }

    // 2. The disk alone, under each firmware: a node, reached over SSH.
    let disk_boot = |name: &str, firmware: Firmware, mode: &str, port: Option<u16>| Guest {
        name: name.to_owned(),
        firmware,
        start: Start::Disk,
        disks: vec![target.clone()],
        mode: mode.to_owned(),
        ssh_port: port,
        rtc_base: None,
    };
    let (first, first_key) = ssh_boot(
        work,
        &sh,
        &key,
        &disk_boot("disk-first", Firmware::Ovmf, "write-data+wait-host", None),
        timeout,
    )?;
    check_first_boot(&first)?;
    check_installed_boot(&first, &table)?;
    first.check(!first.fact("app-data")?.is_empty(), || {
        "the probe wrote no app data".into()
    })?;
    let (second, second_key) = ssh_boot(
        work,
        &sh,
        &key,
        &disk_boot("disk-second", Firmware::SeaBios, "wait-host", None),
        timeout,
    )?;
    check_second_boot(&first, &second)?;
    check_installed_boot(&second, &table)?;
    check_same_node(&first, &second)?;
    second.check(first_key == second_key, || {
        format!("the host key changed across a reboot: {first_key} then {second_key}")
    })?;

    // 3. Reinstall over the installed disk: the data partition is kept
    // byte for byte, and so is the table.
    let data = table
        .partitions
        .get(4)
        .context("the installed table has no fifth partition")?
        .bytes(table.sectorsize);
    let data_before = disks::content_sha256(&target.path, data.0, data.1)?;
    let reinstall = boot(
        work,
        &Guest {
            name: "reinstall".into(),
            firmware: Firmware::Ovmf,
            start: Start::Install(iso),
            disks: vec![target.clone()],
            mode: "check".into(),
            ssh_port: None,
            rtc_base: None,
        },
        timeout,
        None,
    )?;
    ensure_installed(&reinstall)?;
    let table_after = disks::table(&sh, &target.path)?;
    reinstall.check(same_partitions(&table, &table_after), || {
        format!("the reinstall changed the partition table:\n  before {table:?}\n  after  {table_after:?}")
    })?;
    let data_after = disks::content_sha256(&target.path, data.0, data.1)?;
    reinstall.check(data_before == data_after, || {
        "the reinstall changed the data partition's bytes".into()
    })?;

    // 4. The disk again: the same node, the same containers, nothing
    // installed, pulled or imported.
    let last = LastBoot {
        second,
        table,
        first_key,
    };
    let mut reports = vec![install, first, last.second.clone(), reinstall];
    if scope == Scope::AllButLast {
        return Ok((reports, Installed { disk: target, key }, Some(last)));
    }
    let third = probe_boot(
        work,
        &disk_boot("disk-third", Firmware::Ovmf, "check", Some(ssh::free_port()?)),
        timeout,
        None,
    )?;
    last.check(&third)?;
    reports.push(third);
    Ok((reports, Installed { disk: target, key }, None))
}

/// A disk boot whose probe hands the turn to the host: logs in over SSH
/// and checks what an owner's first login sees. Returns the report and
/// the host key fingerprint SSH saw.
fn ssh_boot(
    work: &Path,
    sh: &Shell,
    key: &TestKey,
    guest: &Guest<'_>,
    timeout: Duration,
) -> anyhow::Result<(BootReport, String)> {
    let port = ssh::free_port()?;
    let guest = Guest {
        ssh_port: Some(port),
        ..guest.clone()
    };
    let endpoint = Endpoint::new(port, key, &work.join("ssh"));
    let mut seen = None;
    let mut turn = |console: &str| -> anyhow::Result<AfterTurn> {
        seen = Some(host_turn(sh, &endpoint, console)?);
        Ok(AfterTurn::Continue)
    };
    let report = probe_boot(work, &guest, timeout, Some(&mut turn))?;
    let fingerprint = seen.with_context(|| report.failure("the probe never handed the turn to the host"))?;
    report.check(report.fact("host-done")?.starts_with("by archipelago"), || {
        format!(
            "the probe did not see the host's signal from the archipelago account: {:?}",
            report.fact("host-done").unwrap_or("-")
        )
    })?;
    report.check(report.fact("host-key")? == fingerprint, || {
        format!(
            "the data partition's host key {} is not the one SSH saw ({fingerprint})",
            report.fact("host-key").unwrap_or("-")
        )
    })?;
    progress::say(
        STAGE,
        &format!(
            "{}: ssh archipelago@ with the test key: ok; host key {fingerprint}",
            report.step
        ),
    );
    Ok((report, fingerprint))
}

/// The host's turn while the guest waits: the host key SSH sees is the
/// console's; the test key logs in as archipelago and its `archy-agent
/// list --json` shows every app; no password login, no root login. Then
/// the signal that lets the probe finish. Returns the host key's
/// fingerprint.
fn host_turn(sh: &Shell, endpoint: &Endpoint<'_>, console: &str) -> anyhow::Result<String> {
    let fingerprint = endpoint.scan(sh, SSH_PATIENCE)?;
    let shown = ssh::console_host_keys(console);
    ensure!(
        shown == [fingerprint.clone()],
        "the console showed the host keys {shown:?}; SSH sees {fingerprint}"
    );

    let list = endpoint.with_key(sh, ssh::USER, "archy-agent list --json")?;
    ensure!(
        list.ok,
        "`ssh archipelago@… archy-agent list --json` with the test key failed: {}{}",
        list.stdout.trim(),
        list.stderr.trim()
    );
    let apps = listed_apps(&list.stdout)?;
    for app in super::APPS {
        ensure!(
            apps.iter().any(|(a, state)| a == app && state == "running"),
            "`archy-agent list --json` over SSH does not show {app} running: {apps:?}"
        );
    }

    ssh::ensure_publickey_only(&endpoint.without_key(sh, ssh::USER)?, "a password login as archipelago")?;
    let root = endpoint.with_key(sh, "root", "true")?;
    ensure!(
        !root.ok && root.stderr.contains("Permission denied"),
        "a root login with the test key was not refused: ok={} {}",
        root.ok,
        root.stderr.trim()
    );

    let go = endpoint.with_key(sh, ssh::USER, &format!("touch {}", ssh::GO_FILE))?;
    ensure!(go.ok, "could not signal the probe over SSH: {}", go.stderr.trim());
    Ok(fingerprint)
}

/// `(app, state)` of each entry of `archy-agent list --json`.
fn listed_apps(json: &str) -> anyhow::Result<Vec<(String, String)>> {
    let value: serde_json::Value =
        serde_json::from_str(json.trim()).with_context(|| format!("`archy-agent list --json` printed {json:?}"))?;
    let entries = value
        .as_array()
        .with_context(|| format!("`archy-agent list --json` is not a list: {json}"))?;
    Ok(entries
        .iter()
        .map(|e| {
            let field = |k: &str| e.get(k).and_then(|v| v.as_str()).unwrap_or_default().to_owned();
            (field("app"), field("state"))
        })
        .collect())
}

/// What the installer wrote, read on the host: the issue's layout, the
/// file systems, and nothing else on the disk.
fn check_layout(sh: &Shell, r: &BootReport, target: &Disk, table: &Table) -> anyhow::Result<()> {
    let problems = disks::layout_problems(table, disks::size(&target.path)?);
    r.check(problems.is_empty(), || {
        format!(
            "the installed disk does not have the layout:\n  {}",
            problems.join("\n  ")
        )
    })?;
    let fs_at = |i: usize| disks::probe_fs(sh, &target.path, table.partitions[i].bytes(table.sectorsize).0);
    for (i, expected) in [(1, "TYPE=vfat"), (2, "TYPE=ext4"), (3, "TYPE=ext4"), (4, "TYPE=ext4")] {
        let found = fs_at(i)?;
        r.check(found.contains(expected), || {
            format!("partition {} holds {found:?}, not {expected}", i + 1)
        })?;
    }
    let data = fs_at(4)?;
    r.check(data.contains("LABEL=ARCHY-DATA"), || {
        format!("the data partition is {data:?}, not labelled ARCHY-DATA")
    })?;
    progress::say(
        STAGE,
        &format!(
            "{}: the installed table (sgdisk -p):\n{}",
            r.step,
            disks::print_table(sh, &target.path)?
        ),
    );
    Ok(())
}

/// An installed boot: from slot a of this disk, by PARTUUID, with the data
/// partition named on the command line and mounted, the machine-id and
/// journal from it.
fn check_installed_boot(r: &BootReport, table: &Table) -> anyhow::Result<()> {
    let uuid = |i: usize| table.partitions[i].uuid.to_lowercase();
    let cmdline = r.fact("cmdline")?.to_lowercase();
    for needed in [
        "archipelago.slot=a".to_owned(),
        format!("archipelago.data=partuuid={}", uuid(4)),
        format!("live-media=/dev/disk/by-partuuid/{}", uuid(2)),
    ] {
        r.check(cmdline.split_whitespace().any(|w| w == needed), || {
            format!("the kernel command line lacks `{needed}`: {cmdline}")
        })?;
    }
    r.check(r.fact("live-medium")? == "/dev/vda3", || {
        format!(
            "the live medium is {:?}, not slot a (/dev/vda3)",
            r.fact("live-medium").unwrap_or("-")
        )
    })?;
    r.check(r.fact("data-source")? == "/dev/vda5", || {
        format!(
            "the data root is {:?}, not the data partition (/dev/vda5)",
            r.fact("data-source").unwrap_or("-")
        )
    })?;
    let id = r.fact("machine-id")?;
    r.check(
        id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) && id == r.fact("data-machine-id")?,
        || {
            format!(
                "the machine-id {id:?} is not the data partition's {:?}",
                r.fact("data-machine-id").unwrap_or("-")
            )
        },
    )?;
    r.check(cmdline.contains(&format!("systemd.machine_id={id}")), || {
        format!("the command line does not carry the machine-id {id}: {cmdline}")
    })?;
    r.check(r.fact("journal-source")?.contains("/dev/vda5"), || {
        format!(
            "the journal is not on the data partition: {:?}",
            r.fact("journal-source").unwrap_or("-")
        )
    })?;
    r.check(r.fact("hostname")? == "archipelago", || {
        format!("the hostname is {:?}", r.fact("hostname").unwrap_or("-"))
    })?;
    r.check(r.fact("mdns-listening")? != "0", || {
        format!(
            "nothing answers mDNS (udp 5353): resolvectl mdns says {:?}",
            r.fact("mdns").unwrap_or("-")
        )
    })?;
    Ok(())
}

/// Two boots of one node: the same machine-id, host key and app data.
fn check_same_node(before: &BootReport, after: &BootReport) -> anyhow::Result<()> {
    for fact in ["machine-id", "host-key", "app-data"] {
        let (a, b) = (before.fact(fact)?, after.fact(fact)?);
        after.check(a == b, || format!("{fact} changed: {a:?} then {b:?}"))?;
    }
    Ok(())
}

/// Same disk id and partitions (start, size, type, PARTUUID, name).
fn same_partitions(a: &Table, b: &Table) -> bool {
    let key = |t: &Table| {
        t.partitions
            .iter()
            .map(|p| {
                (
                    p.start,
                    p.size,
                    p.kind.to_lowercase(),
                    p.uuid.to_lowercase(),
                    p.name.clone(),
                )
            })
            .collect::<Vec<_>>()
    };
    a.label == b.label && a.id.eq_ignore_ascii_case(&b.id) && key(a) == key(b)
}

/// The refusals (SeaBIOS), in one install boot from the ISO written to a
/// stick: two blank eligible disks and no `archipelago.install.disk`
/// (ambiguous), a 1 GiB blank disk (too small: were it eligible, it would
/// be a third candidate), a disk holding another system's file system
/// (never taken unnamed: it would be a candidate too), and the stick
/// itself (the boot medium: never offered). The installer changes
/// nothing, names exactly the two blank disks, and powers off; every
/// disk's first and last MiB are as they were.
pub(super) fn refusals(work: &Path, iso: &Path, timeout: Duration) -> anyhow::Result<Vec<BootReport>> {
    let sh = Shell::new().context("creating a shell")?;
    // In the guest's order (virtio disks are named in the order they are
    // attached; the stick comes last).
    let disks = [
        (Disk::new(work.join("blank-a.img"), "archy-blank-a"), "/dev/vda"),
        (Disk::new(work.join("blank-b.img"), "archy-blank-b"), "/dev/vdb"),
        (Disk::new(work.join("small.img"), "archy-small"), "/dev/vdc"),
        (Disk::new(work.join("foreign.img"), "archy-foreign"), "/dev/vdd"),
    ];
    disks::blank(&disks[0].0.path, TARGET_SIZE)?;
    disks::blank(&disks[1].0.path, TARGET_SIZE)?;
    disks::blank(&disks[2].0.path, SMALL_SIZE)?;
    disks::foreign_disk(&sh, &disks[3].0.path, TARGET_SIZE)?;
    let before = disks
        .iter()
        .map(|(d, _)| Edges::read(&d.path))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let report = boot(
        work,
        &Guest {
            name: "refusals".into(),
            firmware: Firmware::SeaBios,
            start: Start::InstallStick(iso),
            disks: disks.iter().map(|(d, _)| d.clone()).collect(),
            mode: "check".into(),
            ssh_port: None,
            rtc_base: None,
        },
        timeout,
        None,
    )?;
    let outcome = installer_outcome(&report)?;
    report.check(outcome.starts_with("nothing changed: "), || {
        format!("the installer did not refuse: `{INSTALLER}{outcome}`")
    })?;
    let candidates = candidates(outcome);
    report.check(candidates == [disks[0].1, disks[1].1], || {
        format!(
            "the installer should name exactly the two blank disks ({}, {}) as candidates, not {candidates:?}: `{outcome}`",
            disks[0].1, disks[1].1
        )
    })?;
    for ((disk, _), edges) in disks.iter().zip(&before) {
        if let Err(e) = disks::ensure_unchanged(&disk.path, edges, &disk.serial) {
            bail!(report.failure(&format!("{e:#}")));
        }
    }
    progress::say(
        STAGE,
        &format!("{}: {INSTALLER}{outcome}; no disk changed", report.step),
    );
    Ok(vec![report])
}

/// The device paths an unattended install found it could take, from its
/// refusal (`N disks could be installed onto (/dev/vda, /dev/vdb); …`).
fn candidates(outcome: &str) -> Vec<&str> {
    outcome
        .split_once(" could be installed onto (")
        .and_then(|(_, rest)| rest.split_once(')'))
        .map(|(list, _)| list.split(", ").map(str::trim).collect())
        .unwrap_or_default()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_listing_gives_each_apps_state() {
        let json = r#"[{"app":"e2e-api","container":"e2e-api","state":"running","health":"healthy"},
                       {"app":"e2e-ui","state":"exited"}]"#;
        assert_eq!(
            listed_apps(json).unwrap(),
            [
                ("e2e-api".to_owned(), "running".to_owned()),
                ("e2e-ui".to_owned(), "exited".to_owned())
            ]
        );
        assert!(listed_apps("{}").is_err());
        assert!(listed_apps("not json").is_err());
    }

    #[test]
    fn the_candidates_are_read_from_the_refusal() {
        assert_eq!(
            candidates(
                "nothing changed: 2 disks could be installed onto (/dev/vda, /dev/vdb); name one with \
                 archipelago.install.disk=/dev/disk/by-id/…"
            ),
            ["/dev/vda", "/dev/vdb"]
        );
        assert!(candidates("nothing changed: no disk is blank").is_empty());
    }
}
