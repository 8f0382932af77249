//! `archy-agent os …`: the node's OS on its own disk.

use std::io::Write;
use std::os::fd::AsFd as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Subcommand;

use super::disks::{self, Survey};
use super::layout::gib;

#[derive(Debug, Subcommand)]
pub enum OsCommand {
    /// List the disks the installer may install onto (model, size, serial,
    /// what is on them), and the refused ones with the reason.
    Disks {
        /// Offer loop devices too (tests only: a node never installs onto one).
        #[arg(long, hide = true)]
        allow_loop_devices: bool,
    },
    /// Install Archipelago onto this machine's disk from the live medium: asks on the console,
    /// or unattended with --auto or a named disk. The last line always starts with
    /// "archipelago install: " (installed, nothing changed, or failed).
    Install {
        /// Read the mode from this kernel command line (/proc/cmdline): archipelago.install
        /// (questions), archipelago.install=auto, archipelago.install.disk=/dev/disk/by-id/….
        #[arg(long, value_name = "FILE")]
        cmdline: Option<PathBuf>,
        /// Install without questions onto the only blank or Archipelago disk.
        #[arg(long)]
        auto: bool,
        /// Install without questions onto this disk, by its stable name (/dev/disk/by-id/…).
        #[arg(long, value_name = "NAME")]
        disk: Option<String>,
        /// The live medium holding the release (release.json and live/).
        #[arg(long, value_name = "DIR", default_value = super::install::DEFAULT_SOURCE)]
        source: PathBuf,
        /// Offer loop devices too (tests only).
        #[arg(long, hide = true)]
        allow_loop_devices: bool,
        /// Read SSH keys from this partition instead of looking for ARCHY-CONF (tests only).
        #[arg(long, hide = true, value_name = "DEVICE")]
        conf_device: Option<PathBuf>,
        /// Leave GRUB out (tests only: a host kernel without vfat cannot mount the ESP).
        #[arg(long, hide = true)]
        skip_bootloader: bool,
    },
    /// On a boot from an installed disk (archipelago.slot= on the command line), check that the
    /// live system came from the slot partition live-media= names; otherwise panic the kernel
    /// (panic=10 restarts the machine).
    CheckMedium {
        /// The kernel command line to read (/proc/cmdline).
        #[arg(long, value_name = "FILE")]
        cmdline: PathBuf,
        /// Where live-boot mounted the medium.
        #[arg(long, hide = true, default_value = super::medium::MEDIUM_DIR)]
        medium: PathBuf,
        /// Say what would happen and exit 1 instead of panicking (tests only).
        #[arg(long, hide = true)]
        no_panic: bool,
    },
    /// A node's life around an OS update: boot-prepare, boot-check, mark-good, status,
    /// acknowledge (`life.rs`; run by `cli.rs` with the data root).
    #[command(flatten)]
    Life(super::life::LifeCommand),
    /// RAUC's custom bootloader backend (system.conf: bootloader=custom): get-primary,
    /// set-primary A|B, get-state A|B, set-state A|B good|bad, get-current, on the two-copy
    /// boot environment on the ESP (docs/disk-layout.md).
    RaucBackend {
        /// The boot environment's folder (the mounted ESP's grub/).
        #[arg(long, hide = true, value_name = "DIR", default_value = super::bootenv::ENV_DIR)]
        env_dir: PathBuf,
        /// The kernel command line naming the booted slot (rauc.slot=).
        #[arg(long, hide = true, value_name = "FILE", default_value = "/proc/cmdline")]
        cmdline: PathBuf,
        /// What RAUC asks.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Install a signed update bundle (a file or an https:// URL) into the other system slot, through
    /// the root helper: free space checked, signature, architecture, version and every file's hash
    /// verified before the slot is touched, the slot read back after. The next boot tries it
    /// (3 tries); it is kept once the node comes back healthy (docs/updates.md).
    Update {
        /// The bundle: a path, or an https:// URL (http:// only to a loopback address).
        #[arg(value_name = "FILE|URL")]
        source: String,
        /// Reboot (cleanly) once the bundle is installed.
        #[arg(long)]
        reboot: bool,
        /// Accept a bundle older than the booted release.
        #[arg(long)]
        allow_downgrade: bool,
        /// The OS helper's socket.
        #[arg(long, hide = true, value_name = "SOCKET", default_value = super::update::helper::SOCKET)]
        helper: PathBuf,
    },
    /// The root helper (archy-os@.service): serves one request on its stdin, a connection accepted
    /// by archy-os.socket (docs/updates.md).
    #[command(hide = true)]
    Helper {
        /// Where the handlers leave their refusals (tests only).
        #[arg(long, hide = true, value_name = "DIR", default_value = super::update::handlers::RUN_DIR)]
        run_dir: PathBuf,
        /// RAUC's system.conf (for the keyring `rauc info` checks with).
        #[arg(long, hide = true, value_name = "FILE", default_value = super::update::rauc_conf::SYSTEM_CONF)]
        rauc_conf: PathBuf,
        /// The booted release's release.json.
        #[arg(long, hide = true, value_name = "FILE", default_value_os_t = default_booted_release())]
        booted_release: PathBuf,
        /// Let any peer in (tests only: no archipelago group on the host).
        #[arg(long, hide = true)]
        any_peer: bool,
    },
    /// RAUC's pre-install handler: refuses a bundle whose release is for another architecture, older
    /// than the booted one (without the helper's one-time permission), or whose files differ from
    /// its release.json. Run by RAUC only.
    #[command(hide = true)]
    RaucPreInstall {
        #[command(flatten)]
        handler: HandlerArgs,
    },
    /// RAUC's post-install handler: the written slot, mounted read-only, holds the bundle's release
    /// intact. Run by RAUC only.
    #[command(hide = true)]
    RaucPostInstall {
        #[command(flatten)]
        handler: HandlerArgs,
    },
}

/// The handlers' options; the defaults are the node's.
#[derive(Debug, Clone, clap::Args)]
pub struct HandlerArgs {
    /// Where the refusal is written and the downgrade permission is looked for.
    #[arg(long, hide = true, value_name = "DIR", default_value = super::update::handlers::RUN_DIR)]
    run_dir: PathBuf,
    /// The booted release's release.json.
    #[arg(long, hide = true, value_name = "FILE", default_value_os_t = default_booted_release())]
    booted_release: PathBuf,
}

fn default_booted_release() -> PathBuf {
    std::path::Path::new(super::medium::MEDIUM_DIR).join(super::release::RELEASE_FILE)
}

impl HandlerArgs {
    fn options(&self) -> super::update::handlers::HandlerOptions {
        super::update::handlers::HandlerOptions {
            run_dir: self.run_dir.clone(),
            booted_release: self.booted_release.clone(),
            arch: super::release::ARCHITECTURE.to_owned(),
        }
    }
}

pub fn run(cmd: &OsCommand, global: &crate::cli::GlobalOpts, out: &mut impl Write) -> anyhow::Result<ExitCode> {
    let json = global.json;
    match cmd {
        OsCommand::Update {
            source,
            reboot,
            allow_downgrade,
            helper,
        } => super::update::run_update(&global.data, source, *allow_downgrade, *reboot, helper, json, out),
        OsCommand::Helper {
            run_dir,
            rauc_conf,
            booted_release,
            any_peer,
        } => {
            use super::update::helper;
            let mut cfg = helper::HelperConfig::node(global.data.clone());
            cfg.run_dir = run_dir.clone();
            cfg.system_conf = rauc_conf.clone();
            cfg.booted_release = booted_release.clone();
            cfg.control = global.control.clone();
            if *any_peer {
                cfg.group = None;
            }
            // systemd hands the accepted connection over as stdin.
            let conn = std::io::stdin()
                .as_fd()
                .try_clone_to_owned()
                .context("stdin is not a connection")?;
            helper::serve(&cfg, &std::os::unix::net::UnixStream::from(conn))?;
            Ok(ExitCode::SUCCESS)
        }
        OsCommand::RaucPreInstall { handler } => {
            let env = super::update::handlers::HandlerEnv::read(|k| std::env::var(k).ok());
            let opts = handler.options();
            match env.and_then(|env| super::update::handlers::pre_install(&opts, &env)) {
                Ok(_) => Ok(ExitCode::SUCCESS),
                Err(e) => {
                    eprintln!("archipelago: refused: {e}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        OsCommand::RaucPostInstall { handler } => {
            let env = super::update::handlers::HandlerEnv::read(|k| std::env::var(k).ok());
            let opts = handler.options();
            match env.and_then(|env| super::update::handlers::post_install(&opts, &env)) {
                Ok(_) => Ok(ExitCode::SUCCESS),
                Err(e) => {
                    eprintln!("archipelago: the written slot does not read back: {e}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        OsCommand::Disks { allow_loop_devices } => {
            let survey = disks::gather(*allow_loop_devices)?;
            print_disks(&survey, json, out)?;
            Ok(ExitCode::SUCCESS)
        }
        OsCommand::Install {
            cmdline,
            auto,
            disk,
            source,
            allow_loop_devices,
            conf_device,
            skip_bootloader,
        } => {
            let opts = super::install::Options {
                cmdline: cmdline.clone(),
                auto: *auto,
                disk: disk.clone(),
                source: source.clone(),
                allow_loop: *allow_loop_devices,
                conf_device: conf_device.clone(),
                skip_bootloader: *skip_bootloader,
            };
            let input = &mut std::io::stdin().lock();
            let (result, interactive) = match super::install::Mode::read(&opts) {
                Ok(mode) => (
                    super::install::install(&opts, &mode, input, out),
                    mode == super::install::Mode::Interactive,
                ),
                Err(e) => (Err(e), false),
            };
            // The last line, always, whatever happened before.
            let (line, code) = match &result {
                Ok(o @ super::install::Outcome::Installed { .. }) => (o.summary(), ExitCode::SUCCESS),
                Ok(o @ super::install::Outcome::NothingChanged(_)) => (o.summary(), ExitCode::from(2)),
                Err(e) => (super::install::failure_summary(e), ExitCode::FAILURE),
            };
            writeln!(out)?;
            writeln!(out, "{line}")?;
            out.flush()?;
            let terminal = std::io::IsTerminal::is_terminal(&std::io::stdin());
            super::install::wait_before_power_off(interactive && terminal, input, out)?;
            Ok(code)
        }
        OsCommand::Life(cmd) => super::life::run(cmd, &global.data, &global.control, json, out),
        OsCommand::RaucBackend { env_dir, cmdline, args } => {
            use super::bootenv::{rauc_backend, EnvStore};
            // Only get-current needs the booted slot: the others work
            // whatever else the command line holds.
            let booted = if args.first().map(String::as_str) == Some("get-current") {
                super::cmdline::read(cmdline)?.rauc_slot
            } else {
                None
            };
            let store = EnvStore::new(env_dir.clone());
            let text = rauc_backend(args, &store, booted)?;
            out.write_all(text.as_bytes())?;
            out.flush()?;
            Ok(ExitCode::SUCCESS)
        }
        OsCommand::CheckMedium {
            cmdline,
            medium,
            no_panic,
        } => {
            use super::medium::{self, MediumDecision};
            let cmd = super::cmdline::read(cmdline)?;
            let facts = medium::gather(&cmd, medium);
            match medium::decide(&cmd, &facts) {
                MediumDecision::NotInstalled => {
                    writeln!(
                        out,
                        "not a boot from an installed disk (no archipelago.slot=): nothing to check"
                    )?;
                    Ok(ExitCode::SUCCESS)
                }
                MediumDecision::Good { device } => {
                    writeln!(
                        out,
                        "{} is mounted from {}, as live-media= names",
                        medium.display(),
                        device.display()
                    )?;
                    Ok(ExitCode::SUCCESS)
                }
                MediumDecision::Panic(why) => {
                    if *no_panic {
                        eprintln!("archipelago: wrong boot medium: {why}; would panic the kernel (--no-panic)");
                        return Ok(ExitCode::FAILURE);
                    }
                    eprintln!("archipelago: wrong boot medium: {why}; panicking the kernel (panic=10 restarts)");
                    medium::panic_kernel()?;
                    Ok(ExitCode::FAILURE)
                }
            }
        }
    }
}

fn print_disks(survey: &Survey, json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    if json {
        serde_json::to_writer_pretty(&mut *out, &survey.offered).context("cannot write JSON")?;
        writeln!(out)?;
        return Ok(());
    }
    if survey.offered.is_empty() {
        writeln!(out, "no disk the installer may use")?;
    }
    for d in &survey.offered {
        let content = match d.content {
            disks::Content::Blank => "blank",
            disks::Content::Archipelago => "Archipelago (reinstall keeps its data)",
            disks::Content::Other => "holds other data",
        };
        writeln!(
            out,
            "{}  {}  {}  serial {}  {content}: {}",
            d.path.display(),
            gib(d.size),
            if d.model.is_empty() { "?" } else { &d.model },
            if d.serial.is_empty() { "?" } else { &d.serial },
            d.contents
        )?;
        for name in &d.stable_names {
            writeln!(out, "    {name}")?;
        }
        for r in &d.refused {
            writeln!(out, "    refused: {r}")?;
        }
    }
    for (path, why) in &survey.hidden {
        writeln!(out, "{} not offered: {why}", path.display())?;
    }
    Ok(())
}
