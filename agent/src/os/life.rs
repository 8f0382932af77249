//! `archy-agent os boot-prepare | boot-check | mark-good | status |
//! acknowledge`: a node's life around an OS update (`docs/updates.md`,
//! "Trial, commit and rollback"). The work is in `boot.rs` (what a boot
//! is), `check.rs` (the commit) and `records.rs` (the files); this is the
//! command line over them, and `os status`'s view, which the agent's
//! control method `os.status` answers too.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Subcommand;

use super::boot::{self, Paths, Prepared};
use super::check::{self, CheckPaths};
use super::records::{BootStatus, Rollback, Slot, BOOT_JSON};
use crate::dataroot::DataRoot;

#[derive(Debug, Subcommand)]
pub enum LifeCommand {
    /// At boot from an installed disk (archy-os-prepare.service): mount the ESP, write RAUC's
    /// system.conf, find a trial, a commit or a rollback, write /run/archipelago/os/boot.json.
    BootPrepare {
        /// The kernel command line to read.
        #[arg(long, value_name = "FILE", default_value = "/proc/cmdline")]
        cmdline: PathBuf,
        /// Where the ESP is mounted (tests: already mounted there with --no-mount).
        #[arg(long, hide = true, default_value = boot::ESP_DIR)]
        esp_dir: PathBuf,
        /// Do not mount the ESP: it is mounted at --esp-dir (tests only).
        #[arg(long, hide = true)]
        no_mount: bool,
        #[arg(long, hide = true, default_value = BOOT_JSON)]
        boot_json: PathBuf,
        #[arg(long, hide = true, default_value = "/run/archipelago/os/system.conf")]
        system_conf: PathBuf,
        /// Where the booted release's live medium is mounted.
        #[arg(long, hide = true, default_value = super::medium::MEDIUM_DIR)]
        medium: PathBuf,
        #[arg(long, hide = true, default_value = boot::ISSUE_FILE)]
        issue: PathBuf,
        /// udev's /dev/disk (its by-partuuid/ links).
        #[arg(long, hide = true, default_value = crate::datadisk::DISK_DIR)]
        disk_dir: PathBuf,
    },
    /// Before boot-complete.target (archy-boot-check.service): on a trial boot, wait until the
    /// node is up as before the update (deadline 15 min); on failure record why and exit 1.
    BootCheck {
        #[arg(long, value_name = "FILE", default_value = "/proc/cmdline")]
        cmdline: PathBuf,
        #[arg(long, hide = true, default_value = BOOT_JSON)]
        boot_json: PathBuf,
    },
    /// After boot-complete.target (archy-mark-good.service): commit the release on trial.
    MarkGood {
        #[arg(long, hide = true, default_value = BOOT_JSON)]
        boot_json: PathBuf,
        #[arg(long, hide = true, default_value = boot::ESP_DIR)]
        esp_dir: PathBuf,
        #[arg(long, hide = true, default_value = boot::ISSUE_FILE)]
        issue: PathBuf,
    },
    /// Show the OS: the booted slot, each slot's release and state, the last rollback.
    Status {
        #[arg(long, hide = true, default_value = BOOT_JSON)]
        boot_json: PathBuf,
    },
    /// Acknowledge the last rollback: the console stops showing it (root, or the agent's
    /// user through the OS helper).
    Acknowledge {
        #[arg(long, hide = true, default_value = BOOT_JSON)]
        boot_json: PathBuf,
        #[arg(long, hide = true, default_value = boot::ISSUE_FILE)]
        issue: PathBuf,
        /// The OS helper's socket, for a user other than root.
        #[arg(long, hide = true, default_value = super::update::helper::SOCKET)]
        helper: PathBuf,
    },
}

/// The boot environment store boot-prepare and mark-good use (the ESP's
/// `grub/` folder).
fn env_store(grub_dir: PathBuf) -> super::bootenv::EnvStore {
    super::bootenv::EnvStore::new(grub_dir)
}

/// What `os status` and `os.status` show: boot.json, with the last
/// rollback from `rollback.json` when it is readable (root), which may be
/// newer than boot.json's copy (acknowledged since).
pub fn status(boot_json: &Path, data: &DataRoot) -> anyhow::Result<Option<BootStatus>> {
    let Some(mut s) = BootStatus::read(boot_json)? else {
        return Ok(None);
    };
    if let Ok(Some(r)) = Rollback::read(&data.os_rollback()) {
        s.last_rollback = Some(r);
    }
    Ok(Some(s))
}

/// `os status`'s text.
pub fn status_text(s: &BootStatus) -> String {
    let mut out = format!(
        "booted: slot {}, release {} ({})\n",
        s.booted_slot,
        s.booted_version.as_deref().unwrap_or("unknown"),
        if s.trial {
            "on trial: app changes wait for the commit"
        } else if s.committed {
            "committed"
        } else {
            "not committed"
        }
    );
    for slot in [Slot::A, Slot::B] {
        let st = s.slot(slot);
        out += &format!("slot {slot}: {}, {st}\n", st.version.as_deref().unwrap_or("no release"));
    }
    if let Some(secs) = s.trial_deadline_secs.filter(|_| s.trial) {
        out += &format!("trial deadline: {secs} s after boot\n");
    }
    if s.degraded {
        out += "degraded: the boot environment could not be read\n";
    }
    match &s.last_rollback {
        Some(r) => {
            out += &format!(
                "last rollback: {} (at {}, {})\n",
                r.message(),
                r.at,
                if r.acknowledged {
                    "acknowledged"
                } else {
                    "not acknowledged: archy-agent os acknowledge"
                }
            )
        }
        None => out += "last rollback: none\n",
    }
    out
}

/// Marks the last rollback acknowledged (rollback.json and boot.json) and
/// takes its console line away. Root; the OS helper's `acknowledge` request
/// runs it for the agent's user. Returns the rollback, `None` when there is none.
pub fn acknowledge(data: &DataRoot, boot_json: &Path, issue: &Path) -> anyhow::Result<Option<Rollback>> {
    let path = data.os_rollback();
    let Some(mut r) = Rollback::read(&path)? else {
        return Ok(None);
    };
    if !r.acknowledged {
        r.acknowledged = true;
        r.write(&path)?;
    }
    if let Some(mut s) = BootStatus::read(boot_json)? {
        s.last_rollback = Some(r.clone());
        s.write(boot_json)?;
        boot::write_console(issue, boot::console_text(&s).as_deref())?;
    } else {
        boot::write_console(issue, None)?;
    }
    Ok(Some(r))
}

/// Runs one of the commands. `data` is the data root; `control` the
/// agent's control socket (boot-check lists the apps through it).
pub fn run(
    cmd: &LifeCommand,
    data: &DataRoot,
    control: &Path,
    json: bool,
    out: &mut impl Write,
) -> anyhow::Result<ExitCode> {
    match cmd {
        LifeCommand::BootPrepare {
            cmdline,
            esp_dir,
            no_mount,
            boot_json,
            system_conf,
            medium,
            issue,
            disk_dir,
        } => {
            let paths = Paths {
                cmdline: cmdline.clone(),
                data: data.clone(),
                esp_dir: esp_dir.clone(),
                boot_json: boot_json.clone(),
                system_conf: system_conf.clone(),
                medium: medium.clone(),
                issue: issue.clone(),
                disk_dir: disk_dir.clone(),
                mount_esp: !no_mount,
            };
            match boot::prepare(&paths, env_store)? {
                Prepared::NotInstalled => writeln!(
                    out,
                    "not a boot from an installed disk (no rauc.slot=): nothing to prepare"
                )?,
                Prepared::Done(plan) => {
                    // The journal's line (stdout goes to the journal).
                    writeln!(out, "{}", plan.journal)?;
                    if json {
                        serde_json::to_writer_pretty(&mut *out, &plan.status)?;
                        writeln!(out)?;
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        LifeCommand::BootCheck { cmdline, boot_json } => {
            let paths = CheckPaths {
                cmdline: cmdline.clone(),
                data: data.clone(),
                boot_json: boot_json.clone(),
                control: control.to_owned(),
                issue: PathBuf::from(boot::ISSUE_FILE),
                esp_dir: PathBuf::from(boot::ESP_DIR),
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            let passed = rt.block_on(check::boot_check(&paths, out))?;
            Ok(if passed { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        LifeCommand::MarkGood {
            boot_json,
            esp_dir,
            issue,
        } => {
            let paths = CheckPaths {
                cmdline: PathBuf::from("/proc/cmdline"),
                data: data.clone(),
                boot_json: boot_json.clone(),
                control: control.to_owned(),
                issue: issue.clone(),
                esp_dir: esp_dir.clone(),
            };
            let store = env_store(esp_dir.join(super::grub::GRUB_DIR));
            match check::mark_good(&paths, &store)? {
                Some(line) => writeln!(out, "{line}")?,
                None => writeln!(out, "not on trial: nothing to commit")?,
            }
            Ok(ExitCode::SUCCESS)
        }
        LifeCommand::Status { boot_json } => {
            let s = status(boot_json, data)?;
            if json {
                serde_json::to_writer_pretty(&mut *out, &s)?;
                writeln!(out)?;
            } else {
                match &s {
                    Some(s) => write!(out, "{}", status_text(s))?,
                    None => writeln!(
                        out,
                        "no {}: not a boot from an installed disk (a live or dev system)",
                        boot_json.display()
                    )?,
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        LifeCommand::Acknowledge {
            boot_json,
            issue,
            helper,
        } => {
            // The records are root's: another user (the owner logged in
            // as archipelago) asks the OS helper, which runs this as root.
            if !rustix::process::geteuid().is_root() {
                let done = super::update::helper::call(
                    helper,
                    &super::update::helper::Request::Acknowledge {},
                    None,
                    &mut |_| {},
                )?;
                writeln!(out, "{}", done["said"].as_str().unwrap_or("acknowledged"))?;
                return Ok(ExitCode::SUCCESS);
            }
            match acknowledge(data, boot_json, issue)? {
                Some(r) => writeln!(out, "acknowledged: {}", r.message())?,
                None => writeln!(out, "no rollback to acknowledge")?,
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::cell::RefCell;

    use super::*;
    use crate::os::boot::EnvAccess;
    use crate::os::bootenv::BootEnv;
    use crate::os::records::{SlotState, SlotStatus, Trial, FORMAT};

    fn boot_status(trial: bool) -> BootStatus {
        BootStatus {
            format: FORMAT,
            booted_slot: Slot::B,
            booted_version: Some("2.0.0".into()),
            a: SlotStatus {
                version: Some("1.0.0".into()),
                state: SlotState::Good,
                tries: 0,
            },
            b: SlotStatus {
                version: Some("2.0.0".into()),
                state: if trial { SlotState::Trying } else { SlotState::Good },
                tries: u8::from(trial),
            },
            committed: !trial,
            trial,
            degraded: false,
            trial_deadline_secs: trial.then_some(900),
            last_rollback: None,
        }
    }

    struct FakeEnv(RefCell<Vec<String>>);

    impl EnvAccess for FakeEnv {
        fn read_env(&self) -> anyhow::Result<BootEnv> {
            anyhow::bail!("not used")
        }
        fn retire_trial(&self, slot: Slot) -> anyhow::Result<()> {
            self.0.borrow_mut().push(format!("retire {slot}"));
            Ok(())
        }
        fn commit(&self, slot: Slot) -> anyhow::Result<()> {
            self.0.borrow_mut().push(format!("commit {slot}"));
            Ok(())
        }
    }

    #[test]
    fn status_reads_as_the_docs_say() {
        let mut s = boot_status(true);
        let t = status_text(&s);
        assert!(t.contains("booted: slot B, release 2.0.0 (on trial"), "{t}");
        assert!(
            t.contains("slot A: 1.0.0, good") && t.contains("slot B: 2.0.0, trying 1 of 3"),
            "{t}"
        );
        assert!(t.contains("last rollback: none"), "{t}");
        s.last_rollback = Some(Rollback {
            format: FORMAT,
            from: "3.0.0".into(),
            to: "2.0.0".into(),
            reason: "x".into(),
            at: "t".into(),
            acknowledged: false,
        });
        assert!(status_text(&s).contains("last rollback: rolled back from 3.0.0 to 2.0.0: x (at t, not acknowledged"));
    }

    #[test]
    fn mark_good_commits_then_rewrites_boot_json_and_ends_the_trial() {
        let tmp = tempfile::tempdir().unwrap();
        let data = DataRoot::new(tmp.path().join("data"));
        let paths = CheckPaths {
            cmdline: tmp.path().join("cmdline"),
            data: data.clone(),
            boot_json: tmp.path().join("run/os/boot.json"),
            control: tmp.path().join("none.sock"),
            issue: tmp.path().join("issue.d/40-archipelago-os.issue"),
            esp_dir: tmp.path().join("esp"),
        };
        boot_status(true).write(&paths.boot_json).unwrap();
        Trial {
            format: FORMAT,
            from_version: "1.0.0".into(),
            to_version: "2.0.0".into(),
            to_slot: Slot::B,
            healthy_before: vec![],
            started_at: "t".into(),
            failures: vec![],
        }
        .write(&data.os_trial())
        .unwrap();
        boot::take_snapshot(&data, "B 2.0.0 t").unwrap();
        std::fs::create_dir_all(paths.issue.parent().unwrap()).unwrap();
        std::fs::write(&paths.issue, "trial line\n").unwrap();
        let env = FakeEnv(RefCell::new(vec![]));
        let line = check::mark_good(&paths, &env).unwrap();
        assert_eq!(line.as_deref(), Some("committed 2.0.0 in slot B"));
        assert_eq!(env.0.borrow().as_slice(), ["commit B"]);
        let s = BootStatus::read(&paths.boot_json).unwrap().unwrap();
        assert!(s.committed && !s.trial);
        assert_eq!(s.b.state, SlotState::Good);
        assert!(!data.os_trial().exists() && !data.os_state_snapshot().exists());
        assert!(!paths.issue.exists(), "the trial's console line is gone");
        // Once committed, again is nothing.
        assert_eq!(check::mark_good(&paths, &env).unwrap(), None);
        assert_eq!(env.0.borrow().len(), 1);
    }

    #[test]
    fn acknowledge_marks_the_rollback_and_removes_the_console_line() {
        let tmp = tempfile::tempdir().unwrap();
        let data = DataRoot::new(tmp.path().join("data"));
        let boot_json = tmp.path().join("boot.json");
        let issue = tmp.path().join("40.issue");
        assert!(acknowledge(&data, &boot_json, &issue).unwrap().is_none());
        let r = Rollback {
            format: FORMAT,
            from: "2.0.0".into(),
            to: "1.0.0".into(),
            reason: "x".into(),
            at: "t".into(),
            acknowledged: false,
        };
        r.write(&data.os_rollback()).unwrap();
        let mut s = boot_status(false);
        s.last_rollback = Some(r);
        s.write(&boot_json).unwrap();
        boot::write_console(&issue, boot::console_text(&s).as_deref()).unwrap();
        assert!(std::fs::read_to_string(&issue).unwrap().contains("rolled back"));
        let r = acknowledge(&data, &boot_json, &issue).unwrap().unwrap();
        assert!(r.acknowledged);
        assert!(Rollback::read(&data.os_rollback()).unwrap().unwrap().acknowledged);
        assert!(
            status(&boot_json, &data)
                .unwrap()
                .unwrap()
                .last_rollback
                .unwrap()
                .acknowledged
        );
        assert!(!issue.exists());
    }
}
