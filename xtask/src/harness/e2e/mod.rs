//! `cargo xtask e2e`: the node as it lives, in QEMU.
//!
//! Builds an ISO with a test app set (three apps from the loopback test
//! registries, pre-pulled into it: a `ui`, one with a dependency, one with a
//! secret and a data volume), makes an ext4 data disk labelled ARCHY-DATA,
//! and boots the ISO under TCG with no network device at all:
//!
//! 1. first boot: every app running and healthy, every image from the ISO,
//!    secrets 0600, netavark, rootless under `archipelago`;
//! 2. power off (every app stopped by `archy-apps.service`), boot again on
//!    the same disk: the same container IDs, nothing installed, no image
//!    imported; under SeaBIOS this boot then kills an app's process, and
//!    the agent restarts it.
//!
//! Both boots run under SeaBIOS and under OVMF (UEFI), each firmware with
//! a fresh disk, the two sequences side by side. The guest reports through a test-only
//! probe unit (`tests/fixtures/e2e/overlay`) that prints `ARCHY-E2E key
//! value` lines on the serial console and powers off; the host reads
//! instructions to it through QEMU's fw_cfg. Any failure names the step
//! and shows the guest's last console lines.

mod qemu;

pub use qemu::Firmware;
use qemu::{boot, make_disk, BootReport};

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use archy_agent::registry::{Registry, RegistryStore};
use xshell::Shell;

use crate::harness::test_env;
use crate::pipeline::flags::{self, BuildArgs};
use crate::pipeline::progress;
use crate::pipeline::{self, iso};
use crate::tools;

/// The apps of the test set; their images come from the test registries.
/// The stage name in progress lines.
const STAGE: &str = "e2e";
const API: &str = "e2e-api";
const UI: &str = "e2e-ui";
const WORKER: &str = "e2e-worker";
const APPS: &[&str] = &[API, UI, WORKER];
/// The app whose process the SeaBIOS second boot kills (the probe script
/// knows it too).
const KILLED: &str = API;

const OVERLAY: &str = "xtask/tests/fixtures/e2e/overlay";
const WORK_DIR: &str = "e2e";
const DISK_SIZE: &str = "3G";
const MARKER: &str = "ARCHY-E2E ";
/// The `SOURCE_DATE_EPOCH` of the build tests (xtask/tests/common/mod.rs).
const SHARED_EPOCH: &str = "1700000000";
/// Seconds one boot may take before it counts as hung (TCG is slow).
const DEFAULT_BOOT_TIMEOUT: u64 = 900;
/// How many console lines a failure shows.
const TAIL_LINES: usize = 40;

/// The guest: TCG (nested KVM hangs at kernel start on the build
/// machines), no network device, the ISO as a CD, the data disk on virtio,
/// the serial console to a file.
const QEMU_FLAGS: &[&str] = &[
    "-m",
    "2048",
    "-smp",
    "2",
    "-accel",
    "tcg",
    "-display",
    "none",
    "-monitor",
    "none",
    "-no-reboot",
    "-nic",
    "none",
    "-boot",
    "order=d",
];

#[derive(Debug, Clone, clap::Args)]
pub struct E2eArgs {
    /// Seconds one boot may take, power on to power off, before it counts as hung.
    #[arg(long, default_value_t = DEFAULT_BOOT_TIMEOUT)]
    pub boot_timeout: u64,
    /// Embed this agent binary instead of building one with `cargo build --release`.
    #[arg(long, value_name = "FILE")]
    pub agent: Option<PathBuf>,
    /// Boot under this firmware only (for iterating; the full check, and
    /// `cargo xtask test`, boot under both).
    #[arg(long, value_enum)]
    pub only: Option<Firmware>,
}

impl Default for E2eArgs {
    fn default() -> E2eArgs {
        E2eArgs {
            boot_timeout: DEFAULT_BOOT_TIMEOUT,
            agent: None,
            only: None,
        }
    }
}

/// `cargo xtask e2e`: starts the test registries, runs [`check`], tears down.
pub fn run(root: &Path, args: &E2eArgs) -> anyhow::Result<ExitCode> {
    flags::require_root("e2e")?;
    let sh = Shell::new().context("creating a shell")?;
    tools::ensure(&sh, tools::E2E_STAGE)?;
    let (mut env, vars) = test_env::start()?;
    let result = check(root, &vars, args);
    let problems = env.teardown();
    result?;
    if !problems.is_empty() {
        bail!("teardown was not clean:\n  {}", problems.join("\n  "));
    }
    Ok(ExitCode::SUCCESS)
}

/// The whole end-to-end run against test services described by `vars`
/// (the `ARCHY_TEST_*` variables of `cargo xtask test`).
pub fn check(root: &Path, vars: &BTreeMap<String, String>, args: &E2eArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let sh = Shell::new().context("creating a shell")?;
    tools::ensure(&sh, tools::E2E_STAGE)?;
    let var = |name: &str| {
        vars.get(name)
            .cloned()
            .with_context(|| format!("the test environment has no {name}"))
    };
    let work = flags::target_dir(root).join(WORK_DIR);
    if work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    }
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;

    progress::say(STAGE, "writing the test app set");
    let apps = work.join("apps");
    write_apps(&apps, &var("ARCHY_TEST_IMAGE")?, &var("ARCHY_TEST_IMAGE_V2")?)?;
    let registries = write_registries(&work.join("registry-list"), &var("ARCHY_TEST_REGISTRY")?)?;

    progress::say(STAGE, "pre-pulling the test images (cargo xtask images)");
    let images = work.join("images");
    pipeline::images::run(&pipeline::images::Args {
        manifests: apps.clone(),
        registries: Some(registries),
        out: images.clone(),
        cache: flags::target_dir(root).join("cache"),
        arch: pipeline::images::Arch::Amd64,
    })
    .context("e2e step `images`")?;

    progress::say(STAGE, "building the ISO (cargo xtask iso)");
    if std::env::var_os("SOURCE_DATE_EPOCH").is_none() {
        // The rootfs and ISO tests' epoch: one cached base serves them all.
        std::env::set_var("SOURCE_DATE_EPOCH", SHARED_EPOCH);
    }
    let menu = work.join("grub.cfg");
    write_file(&menu, &serial_first_menu(&read(&root.join(iso::GRUB_CFG))?)?)?;
    let iso_out = work.join("iso");
    iso::run(
        root,
        &iso::IsoArgs {
            build: BuildArgs {
                arch: flags::Arch::Amd64,
                manifests: apps,
                registries: None,
                no_images: false,
                out: Some(iso_out.clone()),
                agent: args.agent.clone(),
                no_cache: false,
                cache: None,
                images: Some(images),
                overlay: Some(root.join(OVERLAY)),
                boot_menu: Some(menu),
            },
            check_reproducible: false,
        },
    )
    .context("e2e step `iso`")?;
    let iso = find_iso(&iso_out)?;

    // The two firmware sequences share nothing but the ISO: they run side
    // by side (TCG is slow, and a guest rarely keeps both cores busy).
    let timeout = Duration::from_secs(args.boot_timeout);
    let sequences: Vec<_> = [Firmware::SeaBios, Firmware::Ovmf]
        .into_iter()
        .filter(|f| args.only.is_none_or(|only| only == *f))
        .map(|firmware| {
            let (work, iso) = (work.clone(), iso.clone());
            std::thread::spawn(move || sequence(&work, &iso, firmware, timeout))
        })
        .collect();
    let mut reports = Vec::new();
    let mut failures = Vec::new();
    for handle in sequences {
        match handle.join() {
            Ok(Ok(mut r)) => reports.append(&mut r),
            Ok(Err(e)) => failures.push(format!("{e:#}")),
            Err(_) => failures.push("an e2e sequence panicked".to_owned()),
        }
    }
    if !failures.is_empty() {
        bail!("{}", failures.join("\n\n"));
    }

    print_timeline(&reports);
    progress::say(
        STAGE,
        &format!(
            "passed: {} boots in {:.0} s; consoles in {}",
            reports.len(),
            started.elapsed().as_secs_f64(),
            work.display()
        ),
    );
    Ok(())
}

/// The milestones of each boot, then where its time went (systemd-analyze
/// inside the guest, the agent's log with times since kernel start). The
/// targets of issue 14 are shown beside the figures, not asserted: TCG on
/// a shared machine is too noisy for that.
fn print_timeline(reports: &[BootReport]) {
    let shown = |v: Option<f64>| v.map(|s| format!("{s:.1}")).unwrap_or_else(|| "-".to_owned());
    let ms = |r: &BootReport, key: &str| r.facts.get(key).cloned().unwrap_or_else(|| "-".to_owned());
    println!("\ne2e timeline (seconds after kernel start; TCG, no KVM):");
    println!(
        "{:<22} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6}",
        "boot", "systemd", "data disk", "user mgr", "podman", "agent", "ready", "healthy", "+ready", "wall"
    );
    for r in reports {
        let (ready, healthy) = r.timeline();
        let after_ready = ready.zip(healthy).map(|(a, b)| b - a);
        println!(
            "{:<22} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>5.0}s",
            r.step,
            shown(r.milestone("userspace")),
            shown(r.milestone("data-disk")),
            shown(r.milestone("user-manager")),
            shown(r.milestone("podman-socket")),
            shown(r.milestone("agent-start")),
            shown(ready),
            shown(healthy),
            shown(after_ready),
            r.wall.as_secs_f64()
        );
    }
    println!(
        "columns: systemd = first userspace unit; data disk = archy-data.service active; user mgr = \
         user@1000.service; podman = the user's podman.socket; agent = archy-agent started; ready = its \
         READY; healthy = its \"all N apps healthy\" line; +ready = healthy - ready.\n\
         targets (issue 14, not asserted): ready <= 65 s on a second boot, <= 80 s on a first; +ready <= 20 s."
    );
    for r in reports.iter().filter(|r| r.facts.contains_key("restart-ms")) {
        println!(
            "{}: {KILLED} killed -> running again {} ms (podman's StartedAt; {} ms as the probe's polling saw it); \
             a raw `podman start` of a like container: {} ms (target: kill -> running <= 3000 ms)",
            r.step,
            ms(r, "restart-started-ms"),
            ms(r, "restart-ms"),
            ms(r, "podman-start-ms"),
        );
    }
    for r in reports {
        println!("\n--- {}: where the time went ---", r.step);
        for name in ANALYSIS_BLOCKS {
            let lines = r.block(name);
            if lines.is_empty() {
                continue;
            }
            println!("[{name}]");
            for line in lines {
                println!("  {line}");
            }
        }
    }
}

/// The probe's output blocks, in the order they are printed.
const ANALYSIS_BLOCKS: &[&str] = &[
    "time",
    "critical-chain",
    "blame",
    "data-disk",
    "user-critical-chain",
    "user-blame",
    "agent-log",
];

/// Boots 1 and 2 on a fresh disk under `firmware`. Under SeaBIOS, boot 2
/// also kills an app once it has reported everything a second boot must
/// show: a third boot would add minutes under TCG and prove nothing more.
fn sequence(work: &Path, iso: &Path, firmware: Firmware, timeout: Duration) -> anyhow::Result<Vec<BootReport>> {
    let sh = Shell::new().context("creating a shell")?;
    let disk = work.join(format!("data-{}.img", firmware.name()));
    make_disk(&sh, &disk)?;
    let first = boot(work, iso, &disk, firmware, "first", "check", timeout)?;
    check_first_boot(&first)?;
    let kills = firmware == Firmware::SeaBios;
    let second = boot(
        work,
        iso,
        &disk,
        firmware,
        "second",
        if kills { "kill" } else { "check" },
        timeout,
    )?;
    check_second_boot(&first, &second)?;
    if kills {
        check_kill(&second)?;
    }
    Ok(vec![first, second])
}

fn check_first_boot(r: &BootReport) -> anyhow::Result<()> {
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

/// archy-apps.service stopped every app at power-off, each with its grace
/// period (it prints a line per app on the console), rather than leaving
/// them to the user manager's SIGTERM and SIGKILL.
fn check_graceful_shutdown(r: &BootReport) -> anyhow::Result<()> {
    let after_probe = r.console.split("ARCHY-E2E done").nth(1).unwrap_or_default();
    for app in APPS {
        let line = format!("{app}: stopped {} in ", container_name(app));
        r.check(after_probe.contains(&line), || {
            format!("at power-off, archy-apps.service did not report `{line}…`")
        })?;
    }
    Ok(())
}

fn check_second_boot(first: &BootReport, second: &BootReport) -> anyhow::Result<()> {
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
    r.check(r.fact("mode")? == "kill", || {
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

/// The product's boot menu with its serial-console entry as the default
/// and a short timeout: the guest has no screen.
fn serial_first_menu(menu: &str) -> anyhow::Result<String> {
    ensure!(
        menu.contains("set default=0") && menu.contains("set timeout=5"),
        "{} no longer has `set default=0` and `set timeout=5`; update the e2e's menu edit",
        iso::GRUB_CFG
    );
    ensure!(
        menu.contains("console=ttyS0"),
        "{} has no serial-console entry",
        iso::GRUB_CFG
    );
    // `quiet`: every kernel line costs time on an emulated serial port;
    // systemd's own status lines still show.
    Ok(menu
        .replacen("set default=0", "set default=1", 1)
        .replacen("set timeout=5", "set timeout=1", 1)
        .replace(
            "console=ttyS0,115200n8",
            "console=ttyS0,115200n8 quiet systemd.show_status=1",
        ))
}

fn write_apps(dir: &Path, image: &str, image_v2: &str) -> anyhow::Result<()> {
    // Busybox images: httpd serves a page, wget probes over archy-net by
    // name. The api reads its secret and writes its data folder as uid
    // 1000, which only works when ownership follows the rootless mapping.
    let manifests = [
        (
            API,
            format!(
                "id: {API}\nname: e2e api\nversion: \"1.0\"\nimage: {image}\nuser: \"1000:1000\"\n\
                 volumes: [{{ source: data, target: /data }}]\n\
                 secrets: [{{ name: e2e-token, kind: hex32 }}]\n\
                 secret_env: [{{ key: TOKEN, secret: e2e-token }}]\n\
                 command: [\"sh\", \"-c\", \"test -s $TOKEN_FILE && date > /data/started && mkdir -p /tmp/www && echo api > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www\"]\n\
                 health: {{ http: {{ port: 8080, path: / }}, interval: 10s, timeout: 10s, retries: 3 }}\n\
                 stop_grace_period: 5s\n"
            ),
        ),
        (
            UI,
            format!(
                "id: {UI}\nname: e2e ui\nversion: \"1.0\"\nkind: ui\nimage: {image_v2}\ndepends_on: [{API}]\n\
                 ports: [{{ host: 18080, container: 8080 }}]\n\
                 command: [\"sh\", \"-c\", \"mkdir -p /tmp/www && echo ui > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www\"]\n\
                 health: {{ exec: [\"wget\", \"-q\", \"-O\", \"/dev/null\", \"http://{API}:8080/\"], interval: 10s, timeout: 10s, retries: 3 }}\n\
                 stop_grace_period: 5s\n"
            ),
        ),
        (
            WORKER,
            format!(
                "id: {WORKER}\nname: e2e worker\nversion: \"1.0\"\nimage: {image}\n\
                 command: [\"httpd\", \"-f\", \"-p\", \"9000\", \"-h\", \"/tmp\"]\n\
                 health: {{ tcp: {{ port: 9000 }}, interval: 10s, timeout: 10s, retries: 3 }}\n\
                 stop_grace_period: 5s\n"
            ),
        ),
    ];
    for (id, text) in manifests {
        write_file(&dir.join(id).join("manifest.yml"), &text)?;
    }
    Ok(())
}

/// The container name the agent gives an app (docs/manifest.md).
fn container_name(app: &str) -> String {
    if app == UI {
        format!("archy-{app}")
    } else {
        app.to_owned()
    }
}

fn find_iso(dir: &Path) -> anyhow::Result<PathBuf> {
    fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "iso"))
        .with_context(|| format!("no ISO in {}", dir.display()))
}

fn read(path: &Path) -> anyhow::Result<String> {
    fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn write_file(path: &Path, text: &str) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// The test registry as the only entry of a registry list, written by the
/// agent's own store under `dir`; returns the file.
fn write_registries(dir: &Path, host: &str) -> anyhow::Result<PathBuf> {
    let url = format!("http://{host}");
    let registry = Registry::new(
        "test",
        url.parse().with_context(|| format!("the test registry {url}"))?,
        10,
    )
    .context("the test registry's entry")?;
    let mut store = RegistryStore::open(&archy_agent::dataroot::DataRoot::new(dir))
        .with_context(|| format!("opening a registry list in {}", dir.display()))?;
    store.add(registry).context("writing the test registry list")?;
    Ok(store.path().to_path_buf())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_test_registry_list_is_one_the_agent_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_registries(&dir.path().join("list"), "127.0.0.1:5000").unwrap();
        let store = RegistryStore::open_file(&path).unwrap();
        let [only] = store.registries() else {
            panic!("one registry expected: {:?}", store.registries());
        };
        assert_eq!(only.name, "test");
        assert_eq!(only.url.to_string(), "http://127.0.0.1:5000");
        assert_eq!(only.priority, 10);
    }

    #[test]
    fn the_menu_edit_boots_the_serial_entry_and_refuses_a_changed_menu() {
        let menu = read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(iso::GRUB_CFG)).unwrap();
        let edited = serial_first_menu(&menu).unwrap();
        assert!(edited.contains("set default=1") && edited.contains("set timeout=1"));
        assert!(serial_first_menu("set default=2\n").is_err());
    }
}
