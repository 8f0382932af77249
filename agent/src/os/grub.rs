//! GRUB on the installed disk (`docs/disk-layout.md`): the `grub.cfg` the
//! installer writes once (pure, [`render_cfg`]), the environment block
//! that selects the slot ([`write_env`], `grub-editenv`), and installing
//! GRUB for BIOS and UEFI onto the ESP ([`install`], `grub-install` from
//! Debian's `grub-pc-bin` and `grub-efi-amd64-bin` in the rootfs).
//!
//! OS updates never rewrite GRUB or `grub.cfg`: it names only this
//! disk's PARTUUIDs and the machine's id, and takes the slot order from
//! the environment block beside it.
//!
//! Debian 12's GRUB (2.06) has no `search --part-uuid`, so `grub.cfg`
//! finds the slots on the disk its own ESP lies on: the disk part of
//! `$root` (`hd0,gpt2` → `hd0`), partition `gpt3` or `gpt4`, and checks
//! each slot's PARTUUID with `probe --part-uuid` before booting it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _};

use super::machine_id::MachineId;
use crate::mount::run;

/// The environment block's file name, beside `grub.cfg` in `<esp>/grub/`.
pub const ENV_FILE: &str = "grubenv";
/// `grub.cfg`'s name in `<esp>/grub/`.
pub const CFG_FILE: &str = "grub.cfg";
/// GRUB's folder on the ESP (`--boot-directory=<esp>` makes it).
pub const GRUB_DIR: &str = "grub";

/// The variables of RAUC's GRUB backend and their values on a fresh
/// install: slot A first and good, slot B empty. `grub.cfg` boots the
/// first slot in `ORDER` whose `<X>_OK` is 1, else A. The `_TRY`
/// counters are for boot counting (issue 16); nothing reads them yet.
pub const ENV_DEFAULTS: [(&str, &str); 5] = [
    ("ORDER", "A B"),
    ("A_OK", "1"),
    ("A_TRY", "0"),
    ("B_OK", "0"),
    ("B_TRY", "0"),
];

/// A GPT partition's unique GUID, lower case (`/dev/disk/by-partuuid/`'s
/// spelling and GRUB's `probe --part-uuid`'s).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartUuid(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not a GPT partition GUID (8-4-4-4-12 hex digits)")]
pub struct BadPartUuid {
    pub value: String,
}

impl PartUuid {
    pub fn parse(value: &str) -> Result<PartUuid, BadPartUuid> {
        let lower = value.to_ascii_lowercase();
        let groups: Vec<&str> = lower.split('-').collect();
        let lens: Vec<usize> = groups.iter().map(|g| g.len()).collect();
        let hex = groups.iter().all(|g| g.chars().all(|c| c.is_ascii_hexdigit()));
        if lens == [8, 4, 4, 4, 12] && hex {
            Ok(PartUuid(lower))
        } else {
            Err(BadPartUuid {
                value: value.to_owned(),
            })
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What the installed `grub.cfg` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootConfig {
    pub slot_a: PartUuid,
    pub slot_b: PartUuid,
    pub data: PartUuid,
    pub machine_id: MachineId,
}

/// One slot's letter, GPT partition number and PARTUUID.
struct Slot<'a> {
    lower: char,
    upper: char,
    gpt: u32,
    uuid: &'a PartUuid,
}

/// The kernel command line of a slot's entry (after the kernel's path).
pub fn kernel_args(cfg: &BootConfig, slot: char, slot_uuid: &PartUuid) -> String {
    format!(
        "boot=live live-media=/dev/disk/by-partuuid/{uuid} live-media-path=/live \
         archipelago.slot={slot} rauc.slot={upper} archipelago.data=PARTUUID={data} \
         systemd.machine_id={id} panic=10 quiet console=tty0 console=ttyS0,115200n8",
        uuid = slot_uuid.as_str(),
        upper = slot.to_ascii_uppercase(),
        data = cfg.data.as_str(),
        id = cfg.machine_id.as_str(),
    )
}

/// The installed disk's `grub.cfg`. Never waits for a key (1 s menu,
/// fallback entries, a last entry that restarts); shown on the screen
/// and on the first serial port when there is one.
pub fn render_cfg(cfg: &BootConfig) -> String {
    let mut out = String::from(
        r#"# Archipelago's boot menu, written once by the installer
# (archy-agent os install). OS updates never rewrite it: it names this
# disk's partitions by PARTUUID, and the slot to boot comes from the
# environment block grubenv beside it (docs/disk-layout.md).
set timeout=1
set timeout_style=menu
if serial --unit=0 --speed=115200 --word=8 --parity=no --stop=1; then
    terminal_input console serial
    terminal_output console serial
fi
insmod part_gpt
insmod ext2
insmod regexp
insmod probe
insmod loadenv
insmod test

set ORDER="A B"
set A_OK=1
set A_TRY=0
set B_OK=0
set B_TRY=0
if [ -s "$prefix/grubenv" ]; then
    load_env --file "$prefix/grubenv" ORDER A_OK A_TRY B_OK B_TRY
fi

# The first slot in ORDER that is good, else A.
set archy_pick=""
for archy_slot in $ORDER; do
    if [ -z "$archy_pick" ]; then
        if [ "$archy_slot" = "A" ]; then
            if [ "$A_OK" = "1" ]; then set archy_pick=a; fi
        fi
        if [ "$archy_slot" = "B" ]; then
            if [ "$B_OK" = "1" ]; then set archy_pick=b; fi
        fi
    fi
done
# By number (0: slot A, 1: slot B, 2: restart): GRUB 2.06 does not
# follow a fallback given by entry id.
if [ "$archy_pick" = "b" ]; then
    set default=1
    set fallback="0 2"
else
    set default=0
    set fallback="2"
fi
"#,
    );
    let slots = [
        Slot {
            lower: 'a',
            upper: 'A',
            gpt: super::layout::Part::SlotA.number(),
            uuid: &cfg.slot_a,
        },
        Slot {
            lower: 'b',
            upper: 'B',
            gpt: super::layout::Part::SlotB.number(),
            uuid: &cfg.slot_b,
        },
    ];
    for s in &slots {
        out.push_str(&format!(
            r#"
# Slot {upper}: partition {gpt} of the disk this ESP is on ($root is
# hd0,gpt2: GRUB 2.06's search cannot find a PARTUUID), checked by PARTUUID.
menuentry "Archipelago, slot {upper}" --id {lower} {{
    regexp --set=1:archy_disk '^[(]?([^,()]+),' "$root"
    set archy_part="${{archy_disk}},gpt{gpt}"
    probe --set=archy_found --part-uuid "$archy_part"
    if [ "$archy_found" = "{uuid}" ]; then
        linux ($archy_part)/live/vmlinuz {args}
        initrd ($archy_part)/live/initrd.img
    else
        echo "Archipelago: partition $archy_part has PARTUUID '$archy_found', not {uuid}: slot {upper} is not booted"
    fi
}}
"#,
            upper = s.upper,
            lower = s.lower,
            gpt = s.gpt,
            uuid = s.uuid.as_str(),
            args = kernel_args(cfg, s.lower, s.uuid),
        ));
    }
    out.push_str(
        r#"
# Neither slot booted: say so and restart, never wait for a key.
menuentry "Archipelago: no slot boots, restarting in 30 s" --id restart {
    echo "Archipelago: no system slot could be booted; restarting in 30 s"
    sleep 30
    reboot
}
"#,
    );
    out
}

/// Writes the environment block `<grub_dir>/grubenv` anew with
/// [`ENV_DEFAULTS`] (`grub-editenv`, package grub-common).
pub fn write_env(grub_dir: &Path) -> anyhow::Result<PathBuf> {
    let file = grub_dir.join(ENV_FILE);
    if file.exists() {
        std::fs::remove_file(&file).with_context(|| format!("cannot remove the old {}", file.display()))?;
    }
    run(
        Command::new("grub-editenv").arg(&file).arg("create"),
        "grub-editenv create",
        "grub-common",
    )?;
    let mut set = Command::new("grub-editenv");
    set.arg(&file).arg("set");
    for (name, value) in ENV_DEFAULTS {
        set.arg(format!("{name}={value}"));
    }
    run(&mut set, "grub-editenv set", "grub-common")?;
    Ok(file)
}

/// The two `grub-install` runs onto an ESP mounted at `esp` of `disk`:
/// BIOS (core image into the BIOS boot partition, its prefix the ESP's
/// `grub/`) and UEFI at the removable path `EFI/BOOT/BOOTX64.EFI`, no
/// NVRAM entry, no Secure Boot image (Debian's grub-install picks the
/// signed one when the running system booted with Secure Boot and
/// grub-efi-amd64-signed is installed; the image has neither, and the
/// flag makes it certain). Both read `<esp>/grub/grub.cfg`.
pub fn install_commands(esp: &Path, disk: &Path) -> [Vec<String>; 2] {
    let esp = esp.display().to_string();
    [
        vec![
            "grub-install".into(),
            "--target=i386-pc".into(),
            format!("--boot-directory={esp}"),
            "--modules=part_gpt fat".into(),
            disk.display().to_string(),
        ],
        vec![
            "grub-install".into(),
            "--target=x86_64-efi".into(),
            format!("--efi-directory={esp}"),
            format!("--boot-directory={esp}"),
            "--removable".into(),
            "--no-nvram".into(),
            "--no-uefi-secure-boot".into(),
            "--modules=part_gpt fat".into(),
        ],
    ]
}

/// Writes a file on the ESP: a temporary file, synced, renamed over the
/// target, the folder synced. No mode is set: FAT has none to keep, and
/// the kernel refuses a chmod that changes the read or execute bits.
fn write_on_fat(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("new");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    };
    write().with_context(|| format!("cannot write {}", path.display()))
}

/// Installs GRUB onto the ESP mounted at `esp` and writes its `grub.cfg`
/// and environment block.
pub fn install(esp: &Path, disk: &Path, cfg: &BootConfig) -> anyhow::Result<()> {
    for argv in install_commands(esp, disk) {
        let (program, args) = argv.split_first().context("an empty command")?;
        let what = argv.join(" ");
        run(
            Command::new(program).args(args),
            &what,
            "grub-pc-bin, grub-efi-amd64-bin",
        )?;
    }
    let grub_dir = esp.join(GRUB_DIR);
    write_on_fat(&grub_dir.join(CFG_FILE), render_cfg(cfg).as_bytes())?;
    write_env(&grub_dir)?;
    for needed in [
        "EFI/BOOT/BOOTX64.EFI",
        "grub/i386-pc/core.img",
        "grub/grub.cfg",
        "grub/grubenv",
    ] {
        if !esp.join(needed).is_file() {
            bail!("grub-install left no {needed} on the ESP");
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn cfg() -> BootConfig {
        BootConfig {
            slot_a: PartUuid::parse("AAAAAAAA-1111-4111-8111-111111111111").unwrap(),
            slot_b: PartUuid::parse("bbbbbbbb-2222-4222-8222-222222222222").unwrap(),
            data: PartUuid::parse("dddddddd-5555-4555-8555-555555555555").unwrap(),
            machine_id: MachineId::parse("0123456789abcdef0123456789abcdef").unwrap(),
        }
    }

    #[test]
    fn each_slot_boots_its_own_partuuid_with_the_contract_command_line() {
        let text = render_cfg(&cfg());
        let a = "linux ($archy_part)/live/vmlinuz boot=live \
             live-media=/dev/disk/by-partuuid/aaaaaaaa-1111-4111-8111-111111111111 live-media-path=/live \
             archipelago.slot=a rauc.slot=A archipelago.data=PARTUUID=dddddddd-5555-4555-8555-555555555555 \
             systemd.machine_id=0123456789abcdef0123456789abcdef panic=10 quiet console=tty0 console=ttyS0,115200n8";
        assert!(text.contains(a), "{text}");
        assert!(text.contains("live-media=/dev/disk/by-partuuid/bbbbbbbb-2222-4222-8222-222222222222 live-media-path=/live archipelago.slot=b rauc.slot=B"), "{text}");
        assert!(text.contains("set archy_part=\"${archy_disk},gpt3\""), "{text}");
        assert!(text.contains("set archy_part=\"${archy_disk},gpt4\""), "{text}");
        assert!(text.contains("if [ \"$archy_found\" = \"aaaaaaaa-1111-4111-8111-111111111111\" ]"));
        assert!(text.contains("initrd ($archy_part)/live/initrd.img"));
        assert_eq!(text.matches("menuentry ").count(), 3);
    }

    #[test]
    fn never_waits_and_shows_on_serial_and_screen() {
        let text = render_cfg(&cfg());
        assert!(text.contains("set timeout=1\n"));
        assert!(!text.contains("timeout=-1"));
        assert!(text.contains("terminal_output console serial"));
        assert!(text.contains("set default=1\n    set fallback=\"0 2\""));
        assert!(text.contains("set default=0\n    set fallback=\"2\""));
        // The numbers are the entries' order.
        let ids: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("menuentry "))
            .filter_map(|l| l.split("--id ").nth(1))
            .collect();
        assert_eq!(ids, ["a {", "b {", "restart {"]);
        assert!(text.contains("--id restart {\n    echo"));
        assert!(text.contains("reboot\n}"));
        // Only the environment block's own variables are loaded from it.
        assert!(text.contains("load_env --file \"$prefix/grubenv\" ORDER A_OK A_TRY B_OK B_TRY"));
    }

    /// GRUB's own parser accepts it (grub-script-check, package grub-common).
    #[test]
    fn grub_script_check_accepts_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("grub.cfg");
        std::fs::write(&file, render_cfg(&cfg())).unwrap();
        let out = Command::new("grub-script-check").arg(&file).output();
        match out {
            Ok(out) => assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr)),
            Err(e) => panic!("grub-script-check (package grub-common): {e}"),
        }
    }

    #[test]
    fn partuuids_are_checked_and_lower_cased() {
        assert_eq!(
            PartUuid::parse("AB12CD34-0000-4000-8000-00000000000F")
                .unwrap()
                .as_str(),
            "ab12cd34-0000-4000-8000-00000000000f"
        );
        for bad in [
            "",
            "ab-5",
            "zzzzzzzz-1111-4111-8111-111111111111",
            "aaaaaaaa11114111-8111-111111111111\" ; reboot",
        ] {
            assert!(PartUuid::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_environment_block_holds_the_slot_order() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(ENV_FILE), b"old").unwrap();
        let file = write_env(dir.path()).unwrap();
        assert_eq!(std::fs::metadata(&file).unwrap().len(), 1024, "GRUB's block is 1 KiB");
        let out = Command::new("grub-editenv").arg(&file).arg("list").output().unwrap();
        let listed = String::from_utf8_lossy(&out.stdout);
        assert_eq!(listed, "ORDER=A B\nA_OK=1\nA_TRY=0\nB_OK=0\nB_TRY=0\n");
    }

    #[test]
    fn grub_install_runs_for_bios_and_removable_uefi() {
        let [bios, efi] = install_commands(Path::new("/tmp/esp"), Path::new("/dev/vda"));
        assert_eq!(bios.last().map(String::as_str), Some("/dev/vda"));
        assert!(bios.contains(&"--boot-directory=/tmp/esp".to_owned()));
        assert!(efi.contains(&"--removable".to_owned()));
        assert!(efi.contains(&"--no-nvram".to_owned()));
        assert!(efi.contains(&"--no-uefi-secure-boot".to_owned()));
        assert!(efi.contains(&"--efi-directory=/tmp/esp".to_owned()));
    }
}
