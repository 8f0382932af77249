//! The live scenario: the ISO's live entry with a data disk, booted twice
//! (first boot; adoption across a reboot and a killed app's restart).

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use xshell::Shell;

use super::disks;
use super::qemu::{probe_boot, BootReport, Disk, Firmware, Guest, Start};
use super::{container_name, progress, APPS, KILLED, STAGE};

/// The live scenario under `firmware`: boots 1 and 2 of the ISO's live
/// entry on a fresh data disk. Boot 2 also kills an app once it has
/// reported everything a second boot must show: a third boot would add
/// minutes under TCG and prove nothing more.
pub(super) fn sequence(
    work: &Path,
    iso: &Path,
    firmware: Firmware,
    timeout: Duration,
) -> anyhow::Result<Vec<BootReport>> {
    let sh = Shell::new().context("creating a shell")?;
    let disk = Disk::new(work.join(format!("data-{}.img", firmware.name())), "archy-data");
    disks::data_disk(&sh, &disk.path)?;
    let guest = |name: &str, mode: &str| Guest {
        name: name.to_owned(),
        firmware,
        start: Start::Live(iso),
        disks: vec![disk.clone()],
        mode: mode.to_owned(),
        ssh_port: None,
        rtc_base: None,
    };
    let first = probe_boot(work, &guest("live-first", "check"), timeout, None)?;
    check_first_boot(&first)?;
    let second = probe_boot(work, &guest("live-second", "kill"), timeout, None)?;
    check_second_boot(&first, &second)?;
    check_kill(&second)?;
    Ok(vec![first, second])
}

pub(super) fn check_first_boot(r: &BootReport) -> anyhow::Result<()> {
    r.check(r.fact("healthy")? == "yes", || {
        "not every app became running and healthy".into()
    })?;
    let containers = r.containers()?;
    for app in APPS {
        let name = container_name(app);
        r.check(containers.contains_key(&name), || {
            format!("container {name} is missing: {containers:?}")
        })?;
    }
    r.check(r.fact("agent-user")? == "archipelago", || {
        "the agent does not run as archipelago".into()
    })?;
    r.check(r.fact("rootless")? == "true", || "podman is not rootless".into())?;
    r.check(r.fact("network-backend")? == "netavark", || {
        "the network backend is not netavark".into()
    })?;
    r.check(r.fact("data-mount")?.contains("ARCHY-DATA"), || {
        "/var/lib/archipelago is not the ARCHY-DATA disk".into()
    })?;
    let secrets = r.fact("secrets")?;
    r.check(
        !secrets.is_empty() && secrets.split_whitespace().all(|s| s.starts_with("600:")),
        || format!("secrets are not all mode 0600: {secrets:?}"),
    )?;
    r.check(r.fact("pulls")? == "0", || "the agent pulled an image".into())?;
    check_graceful_shutdown(r)?;
    // One lock entry per app; two apps share an image.
    let imported = r.fact("agent-images")?;
    r.check(
        imported.contains("imported=2") && imported.contains("already_present=1") && imported.contains("skipped=0"),
        || format!("both images should come from the ISO, once each: {imported:?}"),
    )?;
    Ok(())
}

/// archy-apps.service stopped every app at power-off (or at the reboot an
/// update asked for), each with its grace period (it prints a line per app
/// on the console), rather than leaving them to the user manager's SIGTERM
/// and SIGKILL.
fn check_graceful_shutdown(r: &BootReport) -> anyhow::Result<()> {
    // After the probe finished, or, in a boot the host's turn rebooted
    // (`os update --reboot`), after the turn began.
    let console = &r.console;
    let after_probe = console
        .rfind("ARCHY-E2E done")
        .or_else(|| console.rfind("ARCHY-E2E host-turn"))
        .map_or("", |at| &console[at..]);
    for app in APPS {
        let line = format!("{app}: stopped {} in ", container_name(app));
        r.check(after_probe.contains(&line), || {
            format!("at power-off, archy-apps.service did not report `{line}…`")
        })?;
    }
    Ok(())
}

pub(super) fn check_second_boot(first: &BootReport, second: &BootReport) -> anyhow::Result<()> {
    second.check(second.fact("healthy")? == "yes", || {
        "not every app became running and healthy again".into()
    })?;
    let (before, after) = (first.containers()?, second.containers()?);
    second.check(before == after, || {
        format!("containers changed across the reboot:\n  before {before:?}\n  after  {after:?}")
    })?;
    check_graceful_shutdown(second)?;
    second.check(second.fact("installs")? == "0", || {
        "the agent installed an app again".into()
    })?;
    let imported = second.fact("agent-images")?;
    second.check(
        imported.contains("imported=0") && imported.contains("already_present=3"),
        || format!("the second boot should import nothing: {imported:?}"),
    )?;
    Ok(())
}

fn check_kill(r: &BootReport) -> anyhow::Result<()> {
    r.check(r.fact("mode")?.split('+').any(|w| w == "kill"), || {
        "the guest did not get the kill instruction".into()
    })?;
    r.check(r.fact("restarted")? == "yes", || {
        format!("the agent did not restart {KILLED} after its process was killed")
    })?;
    progress::say(
        STAGE,
        &format!("{}: {KILLED} killed, restarted in {} ms", r.step, r.fact("restart-ms")?),
    );
    Ok(())
}
