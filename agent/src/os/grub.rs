//! GRUB on the installed disk (`docs/disk-layout.md`): the `grub.cfg` the
//! installer writes once (pure, [`render_cfg`]), which counts boots in the
//! two-copy boot environment beside it (`os::bootenv`, written first by
//! `EnvStore::init`), and installing
//! GRUB for BIOS and UEFI onto the ESP ([`install`], `grub-install` from
//! Debian's `grub-pc-bin` and `grub-efi-amd64-bin` in the rootfs).
//!
//! OS updates never rewrite GRUB or `grub.cfg`: it names only this
//! disk's PARTUUIDs and the machine's id, and takes the slot order from
//! the boot environment beside it.
//!
//! Debian 12's GRUB (2.06) has no `search --part-uuid`, so `grub.cfg`
//! finds the slots on the disk its own ESP lies on: the disk part of
//! `$root` (`hd0,gpt2` → `hd0`), partition `gpt3` or `gpt4`, and checks
//! each slot's PARTUUID with `probe --part-uuid` before booting it.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context as _};

use super::bootenv::{self, EnvStore, SlotName};
use super::machine_id::MachineId;
use crate::mount::run;

/// `grub.cfg`'s name in `<esp>/grub/`.
pub const CFG_FILE: &str = "grub.cfg";
/// GRUB's folder on the ESP (`--boot-directory=<esp>` makes it).
pub const GRUB_DIR: &str = "grub";

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
    /// The ESP's: `archipelago.esp=PARTUUID=` on the kernel line, where
    /// Linux finds the boot environment.
    pub esp: PartUuid,
    pub slot_a: PartUuid,
    pub slot_b: PartUuid,
    pub data: PartUuid,
    pub machine_id: MachineId,
}

/// The kernel command line of a slot's entry (after the kernel's path).
pub fn kernel_args(cfg: &BootConfig, slot: char, slot_uuid: &PartUuid) -> String {
    format!(
        "boot=live live-media=/dev/disk/by-partuuid/{uuid} live-media-path=/live \
         archipelago.slot={slot} rauc.slot={upper} archipelago.data=PARTUUID={data} \
         archipelago.esp=PARTUUID={esp} \
         systemd.machine_id={id} panic=10 quiet console=tty0 console=ttyS0,115200n8",
        uuid = slot_uuid.as_str(),
        esp = cfg.esp.as_str(),
        upper = slot.to_ascii_uppercase(),
        data = cfg.data.as_str(),
        id = cfg.machine_id.as_str(),
    )
}

/// The installed disk's `grub.cfg`: boot counting over the two copies
/// of the boot environment (`os::bootenv`, `docs/disk-layout.md`). Never
/// waits for a key (1 s menu, fallback entries by number, a last entry
/// that restarts); shown on the screen and on the first serial port when
/// there is one.
///
/// Entries: 0 slot A, 1 slot B, 2 slot A degraded, 3 slot B degraded
/// (`archipelago.degraded=1`: the environment could not be used), 4
/// restart. `bootenv::grub_boot` is this file's logic, pure; the tests
/// run both against each other.
pub fn render_cfg(cfg: &BootConfig) -> String {
    let vars = bootenv::var_names();
    let var_list = vars.join(" ");
    let mut out = String::from(
        r#"# Archipelago's boot menu, written once by the installer
# (archy-agent os install). OS updates never rewrite it: it names this
# disk's partitions by PARTUUID, and the slot to boot comes from the boot
# environment beside it, two copies bootenv.0 and bootenv.1
# (docs/disk-layout.md, "Boot counting").
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
"#,
    );
    // Each copy alone: its variables reset, loaded (only ours), checked
    // against the values bootenv.rs allows, kept as archy_<copy>_<VAR>.
    for i in 0..2 {
        out.push_str(&format!("\n# Copy {i}: {}\n", bootenv::COPIES[i]));
        for v in &vars {
            out.push_str(&format!("unset {v}\n"));
        }
        out.push_str(&format!(
            "set archy_v{i}=0\nif [ -s \"$prefix/{file}\" ]; then\n    if load_env --file \"$prefix/{file}\" {var_list}; then\n        set archy_v{i}=1\n    fi\nfi\n",
            file = bootenv::COPIES[i],
        ));
        for (v, allowed) in bootenv::VARIABLES {
            out.push_str(&format!(
                "if ! regexp '^({})$' \"${v}\"; then set archy_v{i}=0; fi\n",
                allowed.join("|")
            ));
        }
        out.push_str(&format!(
            "if [ \"$ARCHY_END\" != \"$ARCHY_SEQ\" ]; then set archy_v{i}=0; fi\n"
        ));
        for v in &vars {
            out.push_str(&format!("set archy_{i}_{v}=\"${v}\"\n"));
        }
    }
    out.push_str(
        r#"
# The newer valid copy (copy 1 is newer iff its ARCHY_SEQ is copy 0's
# plus 1 mod 3; GRUB has no arithmetic), or the only valid one. A change
# is saved into the other copy (archy_save), never over the one read.
set archy_use=""
if [ "$archy_v0" = 1 ]; then
    set archy_use=0
    if [ "$archy_v1" = 1 ]; then
        if [ "$archy_0_ARCHY_SEQ" = 0 ]; then set archy_n=1
        elif [ "$archy_0_ARCHY_SEQ" = 1 ]; then set archy_n=2
        else set archy_n=0
        fi
        if [ "$archy_1_ARCHY_SEQ" = "$archy_n" ]; then set archy_use=1; fi
    fi
elif [ "$archy_v1" = 1 ]; then
    set archy_use=1
fi
"#,
    );
    for (i, other) in [(0, 1), (1, 0)] {
        out.push_str(&format!(
            "{kw} [ \"$archy_use\" = {i} ]; then\n    set archy_save={other}\n",
            kw = if i == 0 { "if" } else { "elif" }
        ));
        for v in &vars {
            out.push_str(&format!("    set {v}=\"$archy_{i}_{v}\"\n"));
        }
    }
    out.push_str("fi\n");
    out.push_str(
        r#"
# The first slot in ORDER that is ok. One on trial is counted: TRY 0->1,
# 1->2, 2->3 and booted; at 3 it is set not ok (its TRIAL stays 1) and the
# next one is considered. A committed one (TRIAL 0) boots uncounted.
set archy_pick=""
set archy_changed=0
if [ -n "$archy_use" ]; then
    for archy_s in $ORDER; do
        if [ -z "$archy_pick" ]; then
"#,
    );
    for s in ["A", "B"] {
        out.push_str(&format!(
            r#"            if [ "$archy_s" = {s} ]; then
                if [ "${s}_OK" = 1 ]; then
                    if [ "${s}_TRIAL" = 1 ]; then
                        set archy_changed=1
                        if [ "${s}_TRY" = 0 ]; then set {s}_TRY=1; set archy_pick={s}
                        elif [ "${s}_TRY" = 1 ]; then set {s}_TRY=2; set archy_pick={s}
                        elif [ "${s}_TRY" = 2 ]; then set {s}_TRY=3; set archy_pick={s}
                        else set {s}_OK=0
                        fi
                    else
                        set archy_pick={s}
                    fi
                fi
            fi
"#
        ));
    }
    out.push_str(&format!(
        r#"        fi
    done
fi

# A change is saved before booting: into the older (or unreadable) copy
# with ARCHY_SEQ one more; if GRUB cannot write that file (missing, no
# GRUB block in it), into the copy read, in place. If neither takes it,
# a trial is not booted uncounted: COMMITTED boots degraded.
if [ "$archy_changed" = 1 ]; then
    if [ "$ARCHY_SEQ" = 0 ]; then set ARCHY_SEQ=1
    elif [ "$ARCHY_SEQ" = 1 ]; then set ARCHY_SEQ=2
    else set ARCHY_SEQ=0
    fi
    set ARCHY_END="$ARCHY_SEQ"
    if save_env --file "$prefix/bootenv.$archy_save" {var_list}; then
        echo "Archipelago: boot environment saved in bootenv.$archy_save"
    elif save_env --file "$prefix/bootenv.$archy_use" {var_list}; then
        echo "Archipelago: boot environment saved in bootenv.$archy_use"
    else
        echo "Archipelago: the boot environment cannot be saved: degraded boot"
        set archy_pick=""
    fi
fi

# No slot: COMMITTED (A when no copy is valid), degraded, then the other.
set archy_first=A
if [ -n "$archy_use" ]; then
    if [ "$COMMITTED" = B ]; then set archy_first=B; fi
fi
# By number (0 A, 1 B, 2 A degraded, 3 B degraded, 4 restart): GRUB 2.06
# does not follow a fallback given by entry id.
if [ "$archy_pick" = A ]; then
    set default=0
    if [ "$B_OK" = 1 ]; then set fallback="1 4"; else set fallback="3 4"; fi
elif [ "$archy_pick" = B ]; then
    set default=1
    if [ "$A_OK" = 1 ]; then set fallback="0 4"; else set fallback="2 4"; fi
elif [ "$archy_first" = B ]; then
    set default=3
    set fallback="2 4"
else
    set default=2
    set fallback="3 4"
fi
"#
    ));
    let slots = [
        (SlotName::A, super::layout::Part::SlotA.number(), &cfg.slot_a),
        (SlotName::B, super::layout::Part::SlotB.number(), &cfg.slot_b),
    ];
    for degraded in [false, true] {
        for (slot, gpt, uuid) in slots {
            let (title, id, extra, say) = if degraded {
                (
                    format!("Archipelago, slot {slot}, degraded"),
                    format!("{}-degraded", slot.lower()),
                    " archipelago.degraded=1",
                    format!(
                        "\n    echo \"Archipelago: DEGRADED boot of slot {slot}: no slot is marked good, or the boot environment cannot be read\""
                    ),
                )
            } else {
                (
                    format!("Archipelago, slot {slot}"),
                    slot.lower().to_string(),
                    "",
                    String::new(),
                )
            };
            out.push_str(&format!(
                r#"
# Slot {slot}: partition {gpt} of the disk this ESP is on ($root is
# hd0,gpt2: GRUB 2.06's search cannot find a PARTUUID), checked by
# PARTUUID. A release's live/bootargs (a GRUB block, ARCHY_ARGS only)
# adds its own kernel words.
menuentry "{title}" --id {id} {{{say}
    regexp --set=1:archy_disk '^[(]?([^,()]+),' "$root"
    set archy_part="${{archy_disk}},gpt{gpt}"
    probe --set=archy_found --part-uuid "$archy_part"
    if [ "$archy_found" = "{uuid}" ]; then
        unset {bootargs}
        if [ -f "($archy_part)/live/bootargs" ]; then
            load_env --file "($archy_part)/live/bootargs" {bootargs}
        fi
        linux ($archy_part)/live/vmlinuz {args}{extra} ${bootargs}
        initrd ($archy_part)/live/initrd.img
    else
        echo "Archipelago: partition $archy_part has PARTUUID '$archy_found', not {uuid}: slot {slot} is not booted"
    fi
}}
"#,
                uuid = uuid.as_str(),
                args = kernel_args(cfg, slot.lower(), uuid),
                bootargs = bootenv::BOOTARGS_VAR,
            ));
        }
    }
    out.push_str(
        r#"
# Nothing booted: say so and restart, never wait for a key.
menuentry "Archipelago: no slot boots, restarting in 30 s" --id restart {
    echo "Archipelago: no system slot could be booted; restarting in 30 s"
    sleep 30
    reboot
}
"#,
    );
    out
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
    EnvStore::new(grub_dir.clone())
        .init()
        .with_context(|| format!("cannot write the boot environment in {}", grub_dir.display()))?;
    for needed in [
        "EFI/BOOT/BOOTX64.EFI",
        "grub/i386-pc/core.img",
        "grub/grub.cfg",
        "grub/bootenv.0",
        "grub/bootenv.1",
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
            esp: PartUuid::parse("eeeeeeee-2222-4222-8222-222222222222").unwrap(),
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
             archipelago.esp=PARTUUID=eeeeeeee-2222-4222-8222-222222222222 \
             systemd.machine_id=0123456789abcdef0123456789abcdef panic=10 quiet console=tty0 console=ttyS0,115200n8";
        assert!(text.contains(&format!("{a} $ARCHY_ARGS\n")), "{text}");
        assert!(
            text.contains(&format!("{a} archipelago.degraded=1 $ARCHY_ARGS\n")),
            "{text}"
        );
        assert!(text.contains("live-media=/dev/disk/by-partuuid/bbbbbbbb-2222-4222-8222-222222222222 live-media-path=/live archipelago.slot=b rauc.slot=B"), "{text}");
        assert!(text.contains("set archy_part=\"${archy_disk},gpt3\""), "{text}");
        assert!(text.contains("set archy_part=\"${archy_disk},gpt4\""), "{text}");
        assert!(text.contains("if [ \"$archy_found\" = \"aaaaaaaa-1111-4111-8111-111111111111\" ]"));
        assert!(text.contains("initrd ($archy_part)/live/initrd.img"));
        assert!(text.contains("load_env --file \"($archy_part)/live/bootargs\" ARCHY_ARGS\n"));
        assert_eq!(text.matches("menuentry ").count(), 5);
        assert_eq!(text.matches("archipelago.degraded=1").count(), 2);
        assert!(text.contains("--id b-degraded {\n    echo \"Archipelago: DEGRADED boot of slot B: "));
    }

    #[test]
    fn never_waits_and_shows_on_serial_and_screen() {
        let text = render_cfg(&cfg());
        assert!(text.contains("set timeout=1\n"));
        assert!(!text.contains("timeout=-1"));
        assert!(text.contains("terminal_output console serial"));
        // The numbers are the entries' order (bootenv::Entry::number).
        let ids: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("menuentry "))
            .filter_map(|l| l.split("--id ").nth(1))
            .collect();
        assert_eq!(ids, ["a {", "b {", "a-degraded {", "b-degraded {", "restart {"]);
        assert!(text.contains("--id restart {\n    echo"));
        assert!(text.contains("reboot\n}"));
    }

    #[test]
    fn both_copies_are_read_with_only_their_own_variables_and_saved_to_the_other() {
        let text = render_cfg(&cfg());
        let vars = "ARCHY_SEQ ORDER A_OK A_TRIAL A_TRY B_OK B_TRIAL B_TRY COMMITTED ARCHY_END";
        assert!(text.contains(&format!("load_env --file \"$prefix/bootenv.0\" {vars}; then\n")));
        assert!(text.contains(&format!("load_env --file \"$prefix/bootenv.1\" {vars}; then\n")));
        assert!(text.contains(&format!("save_env --file \"$prefix/bootenv.$archy_save\" {vars};")));
        assert!(text.contains("if ! regexp '^(A B|B A)$' \"$ORDER\"; then set archy_v1=0; fi"));
        assert!(text.contains("if ! regexp '^(0|1|2|3)$' \"$B_TRY\"; then set archy_v0=0; fi"));
        // Reset before each load.
        assert_eq!(text.matches("unset COMMITTED\n").count(), 2);
        assert!(!text.contains("grubenv"));
    }

    /// GRUB's own parser accepts it (grub-script-check, package grub-common).
    #[test]
    fn grub_script_check_accepts_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("grub.cfg");
        std::fs::write(&file, render_cfg(&cfg())).unwrap();
        let out = Command::new("grub-script-check").arg(&file).output();
        match out {
            Ok(out) => assert!(
                out.status.success(),
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
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
