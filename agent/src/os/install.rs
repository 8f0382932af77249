//! `archy-agent os install`: the installer (`docs/disk-layout.md`).
//!
//! In order, and nothing is written before the partition table:
//! 1. the mode: the kernel command line (`--cmdline`, `cmdline.rs`) or
//!    the flags; unattended when asked (`auto`) or when a disk is named;
//! 2. the source release, verified against its own `release.json`;
//! 3. the disk: the survey (`disks.rs`), then the owner's typed answer
//!    (the dialogue, [`ask`]) or the unattended choice (`disks::choose`),
//!    made into a `partition::Consent`;
//! 4. what goes onto the data partition (fresh install: a new machine-id,
//!    the `ARCHY-CONF` stick's or the pasted keys) or what is read from
//!    it (reinstall: its machine-id, through a read-only mount);
//! 5. then the writes: table and file systems, slot A, the data
//!    partition (fresh only), GRUB and its files on the ESP.
//!
//! The last line printed always starts with [`SUMMARY_PREFIX`].

use std::io::{BufRead, Write};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

use super::cmdline::{self, InstallMode};
use super::disks::{self, Content, Offered, Survey};
use super::grub::{self, BootConfig, PartUuid};
use super::layout::{self, gib, Found, Part};
use super::machine_id::MachineId;
use super::partition::{self, Consent, Plan};
use super::release::{Release, RELEASE_FILE};
use super::slot;
use crate::dataroot::DataRoot;
use crate::mount::Mounted;
use crate::ssh::conf::{self, Strictness, CONF_LABEL};
use crate::ssh::keys::PublicKey;

/// The start of the installer's last line, which tests and people look for.
pub const SUMMARY_PREFIX: &str = "archipelago install: ";
/// Where live-boot mounts the ISO.
pub const DEFAULT_SOURCE: &str = "/run/live/medium";
/// The `archipelago` user's ids in the image (rootfs/): the owner of its
/// `ssh/` folder on the data partition.
pub const ARCHIPELAGO_UID: u32 = 1000;
pub const ARCHIPELAGO_GID: u32 = 1000;
/// What the owner types to erase a kept data partition.
pub const ERASE_ANSWER: &str = "erase data";

/// The installer's flags.
#[derive(Debug, Clone)]
pub struct Options {
    /// The kernel command line to read the mode from (`/proc/cmdline`).
    pub cmdline: Option<PathBuf>,
    pub auto: bool,
    /// A disk's stable name.
    pub disk: Option<String>,
    /// The live medium holding the release.
    pub source: PathBuf,
    /// Offer loop devices and take `/dev/loopN` as a name (tests only).
    pub allow_loop: bool,
    /// Read keys from this partition instead of looking for the label
    /// (tests only: other tests' loop devices carry the label too).
    pub conf_device: Option<PathBuf>,
    /// Leave GRUB out (tests only: a host whose kernel lacks vfat cannot
    /// mount the ESP).
    pub skip_bootloader: bool,
}

/// Fresh install or reinstall keeping data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Fresh,
    Reinstall,
}

/// How an install that did not fail ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Installed {
        version: String,
        disk: PathBuf,
        kind: Kind,
        detail: String,
    },
    NothingChanged(String),
}

impl Outcome {
    /// The last line.
    pub fn summary(&self) -> String {
        match self {
            Outcome::Installed {
                version,
                disk,
                kind,
                detail,
            } => {
                let kind = match kind {
                    Kind::Fresh => "fresh install",
                    Kind::Reinstall => "reinstall, data partition kept",
                };
                format!(
                    "{SUMMARY_PREFIX}installed {version} on {} ({kind}; {detail})",
                    disk.display()
                )
            }
            Outcome::NothingChanged(why) => format!("{SUMMARY_PREFIX}nothing changed: {why}"),
        }
    }
}

/// The last line of a failed install.
pub fn failure_summary(e: &anyhow::Error) -> String {
    let why = format!("{e:#}").replace('\n', " ");
    format!("{SUMMARY_PREFIX}failed: {why}")
}

/// The disk and the owner's (or the unattended rules') yes.
struct Decision {
    disk: Offered,
    consent: Consent,
    /// The key pasted at the prompt.
    pasted_key: Option<PublicKey>,
}

/// What the installer was asked to do (step 1), from the flags and the
/// kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// No install asked for: why.
    NotAsked(String),
    /// No questions: `auto`, or a disk named by its stable name.
    Unattended { named: Option<String> },
    /// The dialogue on the console.
    Interactive,
}

impl Mode {
    /// Reads `opts.cmdline` (if given) and the flags.
    pub fn read(opts: &Options) -> anyhow::Result<Mode> {
        let cmd = match &opts.cmdline {
            Some(file) => cmdline::read(file)?,
            None => cmdline::Cmdline::default(),
        };
        Ok(Mode::of(opts, &cmd))
    }

    fn of(opts: &Options, cmd: &cmdline::Cmdline) -> Mode {
        let named = opts.disk.clone().or_else(|| cmd.install_disk.clone());
        let asked = opts.cmdline.is_none() || cmd.install.is_some() || opts.auto || opts.disk.is_some();
        if !asked {
            return Mode::NotAsked(format!(
                "the kernel command line ({}) does not ask for an install (archipelago.install)",
                opts.cmdline.as_deref().unwrap_or(Path::new("?")).display()
            ));
        }
        if opts.auto || cmd.install == Some(InstallMode::Auto) || named.is_some() {
            Mode::Unattended { named }
        } else {
            Mode::Interactive
        }
    }
}

/// Runs the installer in `mode` ([`Mode::read`]). `Err` is a failure; the
/// caller prints [`failure_summary`].
pub fn install(opts: &Options, mode: &Mode, input: &mut impl BufRead, out: &mut impl Write) -> anyhow::Result<Outcome> {
    // 1. The mode.
    let (unattended, named) = match mode {
        Mode::NotAsked(why) => return Ok(Outcome::NothingChanged(why.clone())),
        Mode::Unattended { named } => (true, named.clone()),
        Mode::Interactive => (false, None),
    };

    // 2. The source, verified before anything else.
    let release_file = opts.source.join(RELEASE_FILE);
    writeln!(out, "Checking the release on {} ...", opts.source.display())?;
    out.flush()?;
    let release = Release::read(&release_file)?;
    release.require_native(&release_file)?;
    release.verify(&opts.source).with_context(|| {
        format!(
            "the release on {} is damaged; nothing was written",
            opts.source.display()
        )
    })?;
    let release_bytes = release.size(&opts.source)?;
    writeln!(out, "Release {} ({}) is intact.", release.version, gib(release_bytes))?;

    // 3. The disk.
    let survey = disks::gather(opts.allow_loop)?;
    let decision = if unattended {
        match decide_unattended(&survey, named.as_deref(), opts.allow_loop, release_bytes)? {
            Ok(d) => d,
            Err(why) => return Ok(Outcome::NothingChanged(why)),
        }
    } else {
        match ask(&survey, release_bytes, input, out)? {
            Ok(d) => d,
            Err(why) => return Ok(Outcome::NothingChanged(why)),
        }
    };
    let disk = decision.consent.disk().to_owned();
    let kind = match decision.consent.plan() {
        Plan::Fresh(_) => Kind::Fresh,
        Plan::Reinstall => Kind::Reinstall,
    };

    // 4. What the data partition gets, or gives.
    let mut notes = Vec::new();
    let (machine_id, keys) = match kind {
        Kind::Fresh => {
            let mut keys = conf_keys(opts, out)?;
            keys.extend(decision.pasted_key.clone());
            (MachineId::random()?, keys)
        }
        Kind::Reinstall => {
            let parts = partition::read_layout(&disk)?.with_context(|| {
                format!(
                    "{}: no longer holds the Archipelago layout; nothing was written",
                    disk.display()
                )
            })?;
            let (id, note) = kept_machine_id(Path::new(&parts[4].node))?;
            notes.extend(note);
            (id, Vec::new())
        }
    };

    // 5. The writes.
    writeln!(
        out,
        "Installing {} onto {} ({}, {}, serial {}; {}) ...",
        release.version,
        disk.display(),
        gib(decision.disk.size),
        or_unknown(&decision.disk.model),
        or_unknown(&decision.disk.serial),
        match kind {
            Kind::Fresh => "everything on it is replaced",
            Kind::Reinstall => "its data partition is kept",
        }
    )?;
    out.flush()?;
    let parts = partition::write(&decision.consent)?;
    writeln!(
        out,
        "Partitions and file systems written; copying the release into slot A ..."
    )?;
    out.flush()?;
    slot::write_release(&opts.source, &release, Path::new(&parts[2].node))?;
    if kind == Kind::Fresh {
        let authorized = write_data(Path::new(&parts[4].node), &machine_id, &keys)?;
        notes.push(match authorized {
            0 => "no SSH key: add one with an ARCHY-CONF stick".to_owned(),
            1 => "1 SSH key".to_owned(),
            n => format!("{n} SSH keys"),
        });
    }
    let boot = boot_config(&parts, &machine_id)?;
    if opts.skip_bootloader {
        notes.push("GRUB not installed (--skip-bootloader)".to_owned());
    } else {
        writeln!(out, "Installing GRUB for BIOS and UEFI ...")?;
        out.flush()?;
        let esp = Mounted::with(Path::new(&parts[1].node), "vfat", "rw")?;
        grub::install(&esp.dir, &disk, &boot)?;
        esp.unmount()?;
    }
    let _ = std::process::Command::new("sync").status();
    let mut detail = vec![format!("slot A, machine-id {machine_id}")];
    detail.extend(notes);
    Ok(Outcome::Installed {
        version: release.version,
        disk,
        kind,
        detail: detail.join("; "),
    })
}

/// What `grub.cfg` names, from the disk's partitions.
fn boot_config(parts: &[Found; 5], machine_id: &MachineId) -> anyhow::Result<BootConfig> {
    let uuid = |p: Part| {
        let found = &parts[(p.number() - 1) as usize];
        PartUuid::parse(&found.partuuid).with_context(|| format!("{}'s PARTUUID", found.node))
    };
    Ok(BootConfig {
        esp: uuid(Part::Esp)?,
        slot_a: uuid(Part::SlotA)?,
        slot_b: uuid(Part::SlotB)?,
        data: uuid(Part::Data)?,
        machine_id: machine_id.clone(),
    })
}

/// Whether `given` may name a disk: a stable name, or (tests) a loop device.
fn stable_enough(given: &str, allow_loop: bool) -> bool {
    given.starts_with("/dev/disk/by-id/")
        || given.starts_with("/dev/disk/by-path/")
        || (allow_loop && given.starts_with("/dev/loop"))
}

/// The unattended rules: the named disk, or the only blank or Archipelago
/// disk. `Ok(Err(why))` when nothing may be done.
fn decide_unattended(
    survey: &Survey,
    named: Option<&str>,
    allow_loop: bool,
    release_bytes: u64,
) -> anyhow::Result<Result<Decision, String>> {
    let resolved = match named {
        Some(given) => {
            if !stable_enough(given, allow_loop) {
                return Ok(Err(format!(
                    "archipelago.install.disk={given} is not a stable name; allowed: /dev/disk/by-id/… or /dev/disk/by-path/…"
                )));
            }
            match std::fs::canonicalize(given) {
                Ok(device) => Some((given, device)),
                Err(_) => return Ok(Err(format!("{given} is no disk this machine has"))),
            }
        }
        None => None,
    };
    let chosen = match disks::choose(
        &survey.offered,
        &survey.hidden,
        resolved.as_ref().map(|(g, d)| (*g, d.as_path())),
    ) {
        Ok(d) => d.clone(),
        Err(e) => return Ok(Err(e.to_string())),
    };
    let layout = match layout::plan(chosen.size, release_bytes) {
        Ok(l) => l,
        Err(e) => return Ok(Err(format!("{}: {e}", chosen.path.display()))),
    };
    let consent = if resolved.is_some() {
        Consent::named(&chosen.path, chosen.content, layout)
    } else {
        match Consent::unattended(&chosen.path, chosen.content, layout) {
            Ok(c) => c,
            Err(e) => return Ok(Err(e.to_string())),
        }
    };
    Ok(Ok(Decision {
        disk: chosen,
        consent,
        pasted_key: None,
    }))
}

/// What the owner reads after the last line of an interactive install.
pub const POWER_OFF_PROMPT: &str = "Remove the installation stick, then press Enter to power off: ";

/// After the last line: an interactive install on a terminal waits for
/// the owner to remove the stick and press Enter (the unit powers off when
/// the installer exits, and the stick must not boot the installer again);
/// `waits` is false for unattended installs and input that is no
/// terminal, which end at once.
pub fn wait_before_power_off(waits: bool, input: &mut impl BufRead, out: &mut impl Write) -> anyhow::Result<()> {
    if !waits {
        return Ok(());
    }
    write!(out, "{POWER_OFF_PROMPT}")?;
    out.flush()?;
    read_answer(input)?;
    writeln!(out, "Powering off.")?;
    out.flush()?;
    Ok(())
}

/// One line from the owner, trimmed; `None` at the end of input.
fn read_answer(input: &mut impl BufRead) -> anyhow::Result<Option<String>> {
    let mut line = String::new();
    let n = input.read_line(&mut line).context("cannot read the console")?;
    Ok((n > 0).then(|| line.trim().to_owned()))
}

fn describe(d: &Offered) -> String {
    let content = match d.content {
        Content::Blank => "blank",
        Content::Archipelago => "holds Archipelago",
        Content::Other => "holds other data",
    };
    format!(
        "{}  {}  {}  serial {}  {content}: {}",
        d.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        gib(d.size),
        or_unknown(&d.model),
        or_unknown(&d.serial),
        d.contents
    )
}

fn or_unknown(s: &str) -> &str {
    if s.is_empty() {
        "?"
    } else {
        s
    }
}

/// The dialogue on the console: the list, the typed name, the second
/// confirmation to erase a kept data partition, the optional key.
/// `Ok(Err(why))` when the owner stopped or nothing can be installed.
pub(crate) fn ask_disk(
    survey: &Survey,
    release_bytes: u64,
    input: &mut impl BufRead,
    out: &mut impl Write,
) -> anyhow::Result<Result<(Offered, Consent), String>> {
    writeln!(out)?;
    writeln!(out, "Disks:")?;
    for d in &survey.offered {
        writeln!(out, "  {}", describe(d))?;
        for r in &d.refused {
            writeln!(out, "      refused: {r}")?;
        }
    }
    for (path, why) in &survey.hidden {
        writeln!(out, "  ({} is not offered: {why})", path.display())?;
    }
    if !survey.offered.iter().any(|d| d.refused.is_empty()) {
        return Ok(Err("no disk this installer may use".to_owned()));
    }
    let disk = loop {
        write!(
            out,
            "Type the name of the disk to install onto (for example {}), or press Enter to stop: ",
            survey
                .offered
                .iter()
                .find(|d| d.refused.is_empty())
                .and_then(|d| d.path.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        )?;
        out.flush()?;
        let Some(typed) = read_answer(input)? else {
            return Ok(Err("the console closed before a disk was chosen".to_owned()));
        };
        if typed.is_empty() {
            return Ok(Err("no disk was chosen".to_owned()));
        }
        let is = |p: &Path| p.file_name().is_some_and(|n| n == typed.as_str()) || p == Path::new(&typed);
        if let Some(d) = survey.offered.iter().find(|d| is(&d.path)) {
            if d.refused.is_empty() {
                break (d.clone(), typed);
            }
            let why: Vec<String> = d.refused.iter().map(ToString::to_string).collect();
            writeln!(out, "{} is refused: {}", d.path.display(), why.join("; "))?;
        } else if let Some((p, why)) = survey.hidden.iter().find(|(p, _)| is(p)) {
            writeln!(out, "{} is not offered: {why}", p.display())?;
        } else {
            writeln!(out, "There is no disk {typed:?} in the list.")?;
        }
    };
    let (disk, typed) = disk;
    let layout = match layout::plan(disk.size, release_bytes) {
        Ok(l) => l,
        Err(e) => return Ok(Err(format!("{}: {e}", disk.path.display()))),
    };
    let holds = disk.content == Content::Archipelago;
    let (plan, wipe) = if holds {
        write!(
            out,
            "{} holds Archipelago: it is reinstalled and its data partition is kept as it is.\n\
             To erase the data partition too (every app's data), type \"{ERASE_ANSWER}\"; press Enter to keep it: ",
            disk.path.display()
        )?;
        out.flush()?;
        let answer = read_answer(input)?.unwrap_or_default();
        if answer == ERASE_ANSWER {
            writeln!(out, "The data partition will be erased.")?;
            (Plan::Fresh(layout), true)
        } else {
            writeln!(out, "The data partition is kept.")?;
            (Plan::Reinstall, false)
        }
    } else {
        writeln!(
            out,
            "Everything on {} is replaced: {}.",
            disk.path.display(),
            disk.contents
        )?;
        (Plan::Fresh(layout), false)
    };
    match Consent::typed(&disk.path, plan, holds, &typed, wipe) {
        Ok(c) => Ok(Ok((disk, c))),
        Err(e) => Ok(Err(e.to_string())),
    }
}

/// Asks for one SSH public key (optional), until one the node accepts
/// (`ssh::keys`, as `ssh add-key` does) or nothing.
pub(crate) fn ask_key(input: &mut impl BufRead, out: &mut impl Write) -> anyhow::Result<Option<PublicKey>> {
    loop {
        write!(
            out,
            "Paste an SSH public key for the archipelago user (one line, for example ssh-ed25519 AAAA… you@laptop),\n\
             or press Enter to skip: "
        )?;
        out.flush()?;
        let Some(line) = read_answer(input)? else {
            return Ok(None);
        };
        if line.is_empty() {
            return Ok(None);
        }
        match PublicKey::parse(&line) {
            Ok(key) => {
                writeln!(out, "Key accepted: {key}.")?;
                return Ok(Some(key));
            }
            Err(e) => writeln!(out, "the pasted key: {e}; try again.")?,
        }
    }
}

fn ask(
    survey: &Survey,
    release_bytes: u64,
    input: &mut impl BufRead,
    out: &mut impl Write,
) -> anyhow::Result<Result<Decision, String>> {
    let (disk, consent) = match ask_disk(survey, release_bytes, input, out)? {
        Ok(x) => x,
        Err(why) => return Ok(Err(why)),
    };
    let pasted_key = match consent.plan() {
        Plan::Fresh(_) => ask_key(input, out)?,
        Plan::Reinstall => {
            writeln!(out, "The node's SSH keys are kept with its data.")?;
            None
        }
    };
    Ok(Ok(Decision {
        disk,
        consent,
        pasted_key,
    }))
}

/// The keys of the `ARCHY-CONF` stick, if one is present, read
/// [`Strictness::Strict`]ly: two sticks, an unreadable one or a refused
/// line fail the install before anything is written.
fn conf_keys(opts: &Options, out: &mut impl Write) -> anyhow::Result<Vec<PublicKey>> {
    let devices = match &opts.conf_device {
        Some(d) => vec![d.clone()],
        None => conf::devices(CONF_LABEL, Strictness::Strict)?,
    };
    let Some(device) = devices.first() else {
        return Ok(Vec::new());
    };
    let Some(found) = conf::read(device, CONF_LABEL, Strictness::Strict)? else {
        writeln!(
            out,
            "{} ({CONF_LABEL}) holds no {}: no SSH key from it.",
            device.display(),
            conf::CONF_KEYS_FILE
        )?;
        return Ok(Vec::new());
    };
    writeln!(
        out,
        "{}: {} SSH key(s) for the archipelago user.",
        found.shown,
        found.keys.len()
    )?;
    Ok(found.keys.into_iter().map(|(_, k)| k).collect())
}

/// The machine-id kept on the data partition `node`, read through a
/// read-only mount that replays no journal (the partition stays byte for
/// byte). Missing or unreadable: a new one, not written there (the data
/// partition is never written on a reinstall), and a note saying so.
fn kept_machine_id(node: &Path) -> anyhow::Result<(MachineId, Option<String>)> {
    let mounted = Mounted::with(node, "ext4", "ro,noload")?;
    let file = DataRoot::new(&mounted.dir).machine_id_file();
    let read = std::fs::read_to_string(&file);
    mounted.unmount()?;
    let why = match read {
        Ok(text) => match MachineId::parse(&text) {
            Ok(id) => return Ok((id, None)),
            Err(e) => e.to_string(),
        },
        Err(e) => e.to_string(),
    };
    Ok((
        MachineId::random()?,
        Some(format!(
            "the data partition has no usable system/machine-id ({why}): a new one, not written there"
        )),
    ))
}

/// A fresh data partition's first files: the machine-id, and the keys
/// through `ssh::authorize` (the `archipelago` user's `ssh/` folder and
/// file, as `ssh add-key` makes them). Returns how many keys were
/// authorized (the same key twice counts once).
fn write_data(node: &Path, machine_id: &MachineId, keys: &[PublicKey]) -> anyhow::Result<usize> {
    let mounted = Mounted::with(node, "ext4", "rw")?;
    let data = DataRoot::new(&mounted.dir);
    let system = data.system_dir();
    std::fs::create_dir_all(&system).with_context(|| format!("cannot create {}", system.display()))?;
    std::fs::set_permissions(&system, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("cannot set the mode of {}", system.display()))?;
    let id_file = data.machine_id_file();
    crate::fsutil::write_atomic(&id_file, &machine_id.file_bytes(), 0o444)
        .with_context(|| format!("cannot write {}", id_file.display()))?;
    let authorized = if keys.is_empty() {
        0
    } else {
        crate::ssh::authorize(&data, Some((ARCHIPELAGO_UID, ARCHIPELAGO_GID)), keys)?
            .iter()
            .filter(|(_, added)| *added)
            .count()
    };
    mounted.unmount()?;
    Ok(authorized)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::os::disks::{Hidden, Refused};
    use crate::os::layout::GIB;

    fn offered(name: &str, content: Content, refused: Vec<Refused>) -> Offered {
        Offered {
            path: PathBuf::from(format!("/dev/{name}")),
            stable_names: vec![format!("/dev/disk/by-id/virtio-{name}")],
            size: 20 * GIB,
            model: "QEMU HARDDISK".into(),
            serial: format!("s-{name}"),
            contents: "nothing recognised".into(),
            content,
            refused,
        }
    }

    fn dialogue(survey: &Survey, answers: &str) -> (Result<(Offered, Consent), String>, String) {
        let mut out = Vec::new();
        let r = ask_disk(survey, 0, &mut answers.as_bytes(), &mut out).unwrap();
        (r, String::from_utf8(out).unwrap())
    }

    #[test]
    fn the_owner_types_an_offered_unrefused_disk() {
        let survey = Survey {
            offered: vec![
                offered("vda", Content::Blank, vec![]),
                offered("vdb", Content::Other, vec![Refused::Mounted(vec!["/srv".into()])]),
            ],
            hidden: vec![(PathBuf::from("/dev/sr0"), Hidden::BootMedium)],
        };
        let (r, out) = dialogue(&survey, "sr0\nvdb\nvdz\n/dev/vda\n");
        assert!(
            out.contains("vda  20.0 GiB  QEMU HARDDISK  serial s-vda  blank"),
            "{out}"
        );
        assert!(
            out.contains("/dev/sr0 is not offered: it is the medium the installer booted from"),
            "{out}"
        );
        assert!(out.contains("/dev/vdb is refused: it is mounted: /srv"), "{out}");
        assert!(out.contains("There is no disk \"vdz\""), "{out}");
        let (disk, consent) = r.unwrap();
        assert_eq!(disk.path, PathBuf::from("/dev/vda"));
        assert!(matches!(consent.plan(), Plan::Fresh(_)));
        // Enter, or the end of input, stops with nothing chosen.
        assert_eq!(dialogue(&survey, "\n").0.unwrap_err(), "no disk was chosen");
        assert!(dialogue(&survey, "").0.unwrap_err().contains("console closed"));
    }

    #[test]
    fn erasing_a_kept_data_partition_needs_the_exact_words() {
        let survey = Survey {
            offered: vec![offered("vda", Content::Archipelago, vec![])],
            hidden: vec![],
        };
        for (answers, erase) in [("vda\n\n", false), ("vda\nyes\n", false), ("vda\nerase data\n", true)] {
            let (r, _) = dialogue(&survey, answers);
            let (_, consent) = r.unwrap();
            assert_eq!(matches!(consent.plan(), Plan::Fresh(_)), erase, "{answers:?}");
        }
        let nothing = Survey {
            offered: vec![offered(
                "vda",
                Content::Blank,
                vec![Refused::Member(vec!["/dev/vda1".into()])],
            )],
            hidden: vec![],
        };
        assert_eq!(
            dialogue(&nothing, "vda\n").0.unwrap_err(),
            "no disk this installer may use"
        );
    }

    #[test]
    fn a_pasted_key_is_checked_and_optional() {
        let mut out = Vec::new();
        assert_eq!(ask_key(&mut "not a key\n\n".as_bytes(), &mut out).unwrap(), None);
        assert!(
            String::from_utf8_lossy(&out).contains("the pasted key: \"not\" is not a key type"),
            "{}",
            String::from_utf8_lossy(&out)
        );
    }

    #[test]
    fn the_mode_comes_from_the_flags_and_the_kernel_command_line() {
        let opts = Options {
            cmdline: Some(PathBuf::from("/proc/cmdline")),
            auto: false,
            disk: None,
            source: PathBuf::from(DEFAULT_SOURCE),
            allow_loop: false,
            conf_device: None,
            skip_bootloader: false,
        };
        let cmd = |text: &str| cmdline::parse(text, Path::new("/proc/cmdline")).unwrap();
        assert!(matches!(Mode::of(&opts, &cmd("boot=live quiet")), Mode::NotAsked(_)));
        assert_eq!(Mode::of(&opts, &cmd("archipelago.install")), Mode::Interactive);
        assert_eq!(
            Mode::of(&opts, &cmd("archipelago.install=auto")),
            Mode::Unattended { named: None }
        );
        let by_id = "/dev/disk/by-id/ata-X";
        assert_eq!(
            Mode::of(
                &opts,
                &cmd(&format!("archipelago.install archipelago.install.disk={by_id}"))
            ),
            Mode::Unattended {
                named: Some(by_id.to_owned())
            }
        );
        let no_cmdline = Options {
            cmdline: None,
            ..opts.clone()
        };
        assert_eq!(Mode::of(&no_cmdline, &cmd("")), Mode::Interactive);
        let auto = Options { auto: true, ..opts };
        assert_eq!(Mode::of(&auto, &cmd("")), Mode::Unattended { named: None });
    }

    #[test]
    fn an_interactive_install_waits_for_enter_before_powering_off() {
        // Interactive on a terminal: the prompt after the last line, then
        // one line read (Enter), and nothing more.
        let mut input = "\nnext\n".as_bytes();
        let mut out = Vec::new();
        wait_before_power_off(true, &mut input, &mut out).unwrap();
        let shown = String::from_utf8(out).unwrap();
        assert_eq!(shown, format!("{POWER_OFF_PROMPT}Powering off.\n"));
        assert_eq!(input, b"next\n", "only the Enter is read");
        // The console closed: it powers off all the same.
        let mut out = Vec::new();
        wait_before_power_off(true, &mut "".as_bytes(), &mut out).unwrap();
        assert!(String::from_utf8(out).unwrap().starts_with(POWER_OFF_PROMPT));
        // Unattended (or no terminal): nothing said, nothing read.
        let mut input = "\n".as_bytes();
        let mut out = Vec::new();
        wait_before_power_off(false, &mut input, &mut out).unwrap();
        assert!(out.is_empty());
        assert_eq!(input, b"\n");
    }

    #[test]
    fn the_last_line_says_what_happened() {
        let o = Outcome::Installed {
            version: "0.2.0".into(),
            disk: PathBuf::from("/dev/vda"),
            kind: Kind::Reinstall,
            detail: "slot A".into(),
        };
        assert_eq!(
            o.summary(),
            "archipelago install: installed 0.2.0 on /dev/vda (reinstall, data partition kept; slot A)"
        );
        let e = anyhow::anyhow!("line one\nline two").context("cannot install");
        assert_eq!(
            failure_summary(&e),
            "archipelago install: failed: cannot install: line one line two"
        );
        assert!(stable_enough("/dev/disk/by-id/ata-X", false));
        assert!(!stable_enough("/dev/sda", false));
        assert!(!stable_enough("/dev/loop3", false));
        assert!(stable_enough("/dev/loop3", true));
    }
}
