//! OS updates (`docs/updates.md`): a signed RAUC bundle written into the
//! other system slot, kept only if the node comes back healthy (`os boot-check`
//! and `os mark-good`, `os/check.rs`, commit it).
//!
//! The agent runs as `archipelago` and never talks to RAUC (its D-Bus
//! policy lets only root call it): `os update` hands the bundle, as an
//! open file, to the root helper (`helper.rs`, `archy-os.socket`), which
//! checks the space, stages a root-only copy and runs `rauc install`.
//! RAUC checks the signature and runs our handlers (`handlers.rs`: the
//! release's architecture, version and file hashes before the slot is
//! touched, the written slot read back after). `rauc_conf.rs` renders
//! RAUC's system.conf at boot; `fetch.rs` downloads a bundle given as a URL.

pub mod fetch;
pub mod handlers;
pub mod helper;
pub mod rauc_conf;

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;

use crate::dataroot::DataRoot;

/// Whether `source` names a URL rather than a file.
pub fn is_url(source: &str) -> bool {
    source.starts_with("https://") || source.starts_with("http://")
}

/// Runs an update through the helper at `socket`: downloads a URL first
/// (as this user, into `DataRoot::os_download()`), passes the open bundle,
/// relays progress to `progress`. The helper's final result.
pub fn update_via_helper(
    data: &DataRoot,
    source: &str,
    allow_downgrade: bool,
    socket: &Path,
    progress: &mut dyn FnMut(&str),
) -> anyhow::Result<serde_json::Value> {
    let downloaded = is_url(source).then(|| data.os_download());
    let path = match &downloaded {
        Some(to) => {
            fetch::download(source, to, progress)?;
            to.clone()
        }
        None => Path::new(source).to_path_buf(),
    };
    let result = std::fs::File::open(&path)
        .with_context(|| format!("cannot open the bundle {}", path.display()))
        .and_then(|file| {
            helper::call(
                socket,
                &helper::Request::Update { allow_downgrade },
                Some(&file),
                progress,
            )
        });
    if let Some(to) = &downloaded {
        let _ = std::fs::remove_file(to);
    }
    result
}

/// `archy-agent os update FILE|URL [--reboot] [--allow-downgrade]`.
pub fn run_update(
    data: &DataRoot,
    source: &str,
    allow_downgrade: bool,
    reboot: bool,
    socket: &Path,
    json: bool,
    out: &mut impl Write,
) -> anyhow::Result<ExitCode> {
    let mut progress = |line: &str| {
        // With --json, stdout carries the result only.
        if json {
            eprintln!("{line}");
        } else {
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    };
    let result = update_via_helper(data, source, allow_downgrade, socket, &mut progress);
    let value = match result {
        Ok(v) => v,
        Err(e) => {
            eprintln!("archipelago os update: {e:#}");
            return Ok(ExitCode::FAILURE);
        }
    };
    if json {
        serde_json::to_writer_pretty(&mut *out, &value)?;
        writeln!(out)?;
    } else {
        writeln!(
            out,
            "installed {} into slot {}: {}",
            value["installed"].as_str().unwrap_or("?"),
            value["slot"].as_str().unwrap_or("?"),
            if reboot {
                "rebooting now to try it"
            } else {
                "reboot to try it (archy-agent os update --reboot, or reboot the node)"
            }
        )?;
    }
    out.flush()?;
    if reboot {
        helper::call(socket, &helper::Request::Reboot {}, None, &mut |_| {})?;
    }
    Ok(ExitCode::SUCCESS)
}
