//! `archy-agent ssh prepare`: run as root at every boot before sshd
//! (`archy-ssh.service`). Makes the host key once, imports the keys of an
//! `ARCHY-CONF` stick, writes the console text and asks agetty to reprint.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _};

use super::conf::{self, Strictness, CONF_KEYS_FILE};
use super::console::{self, UiApp};
use super::keys::PublicKey;
use super::store::{self, Locked};
use crate::dataroot::DataRoot;
use crate::manifest::{self, LoadOptions};

/// Where agetty (util-linux 2.35 and later) reads extra console text.
pub const DEFAULT_ISSUE_FILE: &str = "/run/issue.d/50-archipelago.issue";

#[derive(Debug, Clone)]
pub struct Options {
    pub data: DataRoot,
    /// Who `ssh/` belongs to; the data root's owner when `None`.
    pub owner: Option<(u32, u32)>,
    pub issue: PathBuf,
    pub conf_label: String,
    /// The apps folder, for the console's UI addresses.
    pub apps_dir: PathBuf,
}

/// To stderr, which the unit sends to the journal and the console.
fn say(message: &str) {
    eprintln!("archipelago: {message}");
}

/// Every step runs; the host key is the one that fails the command (sshd
/// cannot start without it). A failed import is said and leaves the keys
/// already there.
pub fn run(opts: &Options) -> anyhow::Result<()> {
    let host_key = ensure_host_key(&opts.data);
    if let Err(e) = &host_key {
        say(&format!("ssh host key: {e:#}"));
    }
    if let Err(e) = import_conf_keys(&opts.data, opts.owner, &opts.conf_label) {
        say(&format!(
            "no keys imported from {}: {e:#}; the authorized keys already there are kept",
            opts.conf_label
        ));
    }
    let report = manifest::load_dir(
        &opts.apps_dir,
        &LoadOptions {
            data_root: opts.data.clone(),
        },
    );
    let mut problems = Vec::new();
    if !report.errors.is_empty() {
        for e in &report.errors {
            say(&format!("app manifest: {e}"));
        }
        problems.push(format!(
            "{} app manifest problem(s) in {}: run `archy-agent validate`",
            report.errors.len(),
            opts.apps_dir.display()
        ));
    }
    let apps: Vec<UiApp> = console::ui_apps(&report);
    let why = host_key.as_ref().map_err(|e| format!("{e:#}"));
    let text = console::issue_text(why.as_ref().copied().map_err(String::as_str), &apps, &problems);
    write_issue(&opts.issue, &text)?;
    reload_agetty();
    host_key.map(|key| say(&format!("ssh host key: {} ({})", key.fingerprint(), key.label())))
}

/// Makes `<data>/system/ssh/ssh_host_ed25519_key` if it is missing, never
/// otherwise; (re)writes its `.pub` from it when that is missing or
/// differs. Returns the public key.
pub fn ensure_host_key(data: &DataRoot) -> anyhow::Result<PublicKey> {
    let system = data.system_dir();
    fs::create_dir_all(&system).with_context(|| format!("cannot create {}", system.display()))?;
    let dir = data.ssh_host_keys_dir();
    crate::fsutil::ensure_private_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let key = data.ssh_host_key_file();
    let public = data.ssh_host_key_pub_file();
    match fs::symlink_metadata(&key) {
        Ok(md) if md.is_file() => {
            if md.permissions().mode() & 0o777 != 0o600 {
                fs::set_permissions(&key, fs::Permissions::from_mode(0o600))
                    .with_context(|| format!("cannot set the mode of {}", key.display()))?;
            }
        }
        Ok(_) => bail!(
            "{} is not a regular file; refusing to replace it (remove it by hand to make a new host key)",
            key.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => generate(&key, &public)?,
        Err(e) => return Err(e).with_context(|| format!("cannot stat {}", key.display())),
    }
    // The public half, from the private key itself.
    let out = Command::new("ssh-keygen")
        .arg("-y")
        .arg("-f")
        .arg(&key)
        .stdin(Stdio::null())
        .output()
        .context("cannot run ssh-keygen (package openssh-client)")?;
    if !out.status.success() {
        bail!(
            "ssh-keygen -y -f {} failed ({}): {}; the key is kept as it is",
            key.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let derived = String::from_utf8_lossy(&out.stdout);
    let derived = PublicKey::parse(derived.trim()).with_context(|| format!("the public half of {}", key.display()))?;
    let on_disk = store::read_text(&public)
        .ok()
        .flatten()
        .and_then(|t| PublicKey::parse(t.trim()).ok());
    if !on_disk.is_some_and(|k| k.same_key(&derived)) {
        crate::fsutil::write_atomic(&public, format!("{}\n", derived.line()).as_bytes(), 0o644)
            .with_context(|| format!("cannot write {}", public.display()))?;
    }
    Ok(derived)
}

/// A new ed25519 key, made under temporary names and moved into place, the
/// private key last: a crash leaves no half key at the real name.
fn generate(key: &Path, public: &Path) -> anyhow::Result<()> {
    let dir = key.parent().context("the host key has no folder")?;
    let tmp = dir.join(format!(".new-host-key.{}", std::process::id()));
    let tmp_pub = dir.join(format!(".new-host-key.{}.pub", std::process::id()));
    for leftover in [&tmp, &tmp_pub] {
        let _ = fs::remove_file(leftover);
    }
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "archipelago"])
        .arg("-f")
        .arg(&tmp)
        .stdin(Stdio::null())
        .output()
        .context("cannot run ssh-keygen (package openssh-client)")?;
    if !out.status.success() {
        bail!(
            "ssh-keygen -t ed25519 failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot set the mode of {}", tmp.display()))?;
    fs::rename(&tmp_pub, public).with_context(|| format!("cannot move the new key to {}", public.display()))?;
    fs::rename(&tmp, key).with_context(|| format!("cannot move the new key to {}", key.display()))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync {}", dir.display()))?;
    say(&format!("made this node's ssh host key {}", key.display()));
    Ok(())
}

/// Imports the keys of every partition labelled `conf_label` into the
/// `authorized_keys` of `data` ([`conf::Strictness::Lenient`]: a stick
/// that cannot be read and each refused line are said and skipped), and
/// gives the file and its folder to `owner` (default: the data root's
/// owner). Each key is logged by fingerprint, each refused line by number
/// and reason.
pub fn import_conf_keys(data: &DataRoot, owner: Option<(u32, u32)>, conf_label: &str) -> anyhow::Result<()> {
    let owner = store::owner_or_data_roots(data, owner)?;
    let locked = Locked::open(data, owner)?;
    locked.fix_file()?;
    let devices = conf::devices(conf_label, Strictness::Lenient)?;
    if devices.is_empty() {
        say(&format!("no partition labelled {conf_label}: no keys to import"));
        return Ok(());
    }
    let mut file = locked.read()?;
    let mut changed = false;
    for device in &devices {
        let found = match conf::read(device, conf_label, Strictness::Lenient) {
            Ok(Some(found)) => found,
            Ok(None) => {
                say(&format!(
                    "{conf_label} ({}) holds no {CONF_KEYS_FILE} at its top",
                    device.display()
                ));
                continue;
            }
            Err(e) => {
                say(&format!("{conf_label} ({}): {e:#}", device.display()));
                continue;
            }
        };
        for line in &found.refused {
            say(&format!("{} {line}: not imported", found.shown));
        }
        for (number, key) in &found.keys {
            if file.add(key) {
                changed = true;
                say(&format!("{} line {number}: imported {key}", found.shown));
            } else {
                say(&format!("{} line {number}: already authorized: {key}", found.shown));
            }
        }
    }
    if changed {
        locked.write(&file)?;
        say(&format!("{} updated", locked.path().display()));
    }
    Ok(())
}

fn write_issue(path: &Path, text: &str) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    crate::fsutil::write_atomic(path, text.as_bytes(), 0o644)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Asks the running agettys to print their prompt again with the new text.
fn reload_agetty() {
    match Command::new("agetty").arg("--reload").stdin(Stdio::null()).output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => say(&format!(
            "agetty --reload failed ({}): {}; the console shows the new text at its next prompt",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => say(&format!(
            "cannot run agetty --reload ({e}); the console shows the new text at its next prompt"
        )),
    }
}
