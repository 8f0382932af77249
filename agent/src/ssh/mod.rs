//! `archy-agent ssh …`: reaching the node headless (docs/ssh.md).
//!
//! `keys.rs` parses and checks `authorized_keys` lines and computes
//! fingerprints (pure); `console.rs` is the console text (pure);
//! `store.rs` reads and replaces the node's `authorized_keys` under a
//! lock; `conf.rs` finds, mounts and reads the `ARCHY-CONF` stick (for
//! `prepare` and the installer); `prepare.rs` is the boot step (host key, `ARCHY-CONF` import,
//! console text). `add-key`, `list-keys` and `remove-key` run as the
//! `archipelago` user on the node.

pub mod conf;
pub mod console;
pub mod keys;
pub mod prepare;
pub mod store;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use clap::Subcommand;

use crate::dataroot::DataRoot;
use keys::{normalize_fingerprint, Line, PublicKey};
use store::{KeyFile, Locked};

#[derive(Debug, Subcommand)]
pub enum SshCommand {
    /// At boot, as root, before sshd: make the host key once, import the keys of an ARCHY-CONF
    /// stick, write the console text and ask agetty to show it.
    Prepare {
        /// Give `<data>/ssh/` and its authorized_keys to this uid:gid [default: the data root's owner].
        #[arg(long, value_parser = crate::cli::parse_owner)]
        owner: Option<(u32, u32)>,
        /// The console text file agetty shows.
        #[arg(long, default_value = prepare::DEFAULT_ISSUE_FILE)]
        issue: PathBuf,
        /// The label of the partitions keys are imported from (tests use their own).
        #[arg(long, default_value = conf::CONF_LABEL, hide = true)]
        conf_label: String,
    },
    /// Authorize a public key to log in as archipelago: the key as written in a .pub file
    /// (`ssh-ed25519 AAAA… comment`), or --file with one key per line.
    AddKey {
        /// The key's words (quoted or not).
        #[arg(required_unless_present = "file", conflicts_with = "file")]
        key: Vec<String>,
        /// A file of keys (a .pub file or an authorized_keys); `-` reads standard input.
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// List the keys that may log in (fingerprint, type, comment).
    ListKeys,
    /// Remove a key by its fingerprint (as list-keys shows it, with or without `SHA256:`).
    RemoveKey {
        fingerprint: String,
        /// Allow removing the last key (no SSH login is possible after that).
        #[arg(long)]
        last: bool,
    },
}

/// Adds every key of `text` (one per line, as in a `.pub` or
/// `authorized_keys` file; `shown` names it in errors) to the node's
/// `authorized_keys`, giving the file and its folder to `owner` (default:
/// the data root's owner). Any line the node does not accept adds nothing.
/// Returns each key and whether it was new. For `add-key`.
pub fn add_keys(
    data: &DataRoot,
    owner: Option<(u32, u32)>,
    text: &str,
    shown: &str,
) -> anyhow::Result<Vec<(PublicKey, bool)>> {
    let given: Vec<PublicKey> = store::parse_strict(text, shown)?
        .into_iter()
        .filter_map(|l| match l {
            Line::Key(k) => Some(k),
            Line::Other(_) => None,
        })
        .collect();
    if given.is_empty() {
        bail!("{shown} holds no key; a key is `TYPE BASE64 [COMMENT]`, as in a .pub file");
    }
    authorize(data, owner, &given)
}

/// Adds `keys` (already parsed) to the node's `authorized_keys`, under its
/// lock, giving the file and its folder to `owner` (default: the data
/// root's owner); a key already there (whatever its comment) is not added
/// twice. Returns each key and whether it was new. For [`add_keys`], and
/// for the installer (the stick's keys and the pasted one, onto the data
/// partition it made).
pub fn authorize(
    data: &DataRoot,
    owner: Option<(u32, u32)>,
    keys: &[PublicKey],
) -> anyhow::Result<Vec<(PublicKey, bool)>> {
    let locked = Locked::open(data, store::owner_or_data_roots(data, owner)?)?;
    let mut file = locked.read()?;
    let mut out = Vec::new();
    for key in keys.iter().cloned() {
        let added = file.add(&key);
        out.push((key, added));
    }
    if out.iter().any(|(_, added)| *added) {
        locked.write(&file)?;
    }
    Ok(out)
}

/// Runs an `ssh` subcommand on the data root `data`.
pub fn run(cmd: SshCommand, data: &DataRoot, apps_dir: PathBuf, json: bool) -> anyhow::Result<ExitCode> {
    let out = &mut std::io::stdout().lock();
    match cmd {
        SshCommand::Prepare {
            owner,
            issue,
            conf_label,
        } => {
            prepare::run(&prepare::Options {
                data: data.clone(),
                owner,
                issue,
                conf_label,
                apps_dir,
            })?;
        }
        SshCommand::AddKey { key, file } => {
            let (text, shown) = match &file {
                Some(path) if path.as_os_str() == "-" => {
                    let mut text = String::new();
                    std::io::Read::read_to_string(&mut std::io::stdin().lock(), &mut text)
                        .context("cannot read keys from standard input")?;
                    (text, "standard input".to_owned())
                }
                Some(path) => (
                    store::read_text(path)?.with_context(|| format!("{} does not exist", path.display()))?,
                    path.display().to_string(),
                ),
                None => (key.join(" "), "the key given".to_owned()),
            };
            for (key, added) in add_keys(data, None, &text, &shown)? {
                if added {
                    writeln!(out, "added {key}")?;
                } else {
                    writeln!(out, "already authorized: {key}")?;
                }
            }
        }
        SshCommand::ListKeys => {
            let file = KeyFile::read(&data.authorized_keys_file())?;
            if json {
                let keys: Vec<serde_json::Value> = file
                    .keys()
                    .map(|k| {
                        serde_json::json!({
                            "fingerprint": k.fingerprint(),
                            "type": k.label(),
                            "comment": k.comment(),
                        })
                    })
                    .collect();
                serde_json::to_writer_pretty(&mut *out, &keys).context("cannot write the keys as JSON")?;
                writeln!(out)?;
            } else {
                let rows: Vec<[String; 3]> = file
                    .keys()
                    .map(|k| [k.fingerprint(), k.label().to_owned(), k.comment().to_owned()])
                    .collect();
                crate::cli::write_table(out, ["FINGERPRINT", "TYPE", "COMMENT"], &rows)?;
            }
        }
        SshCommand::RemoveKey { fingerprint, last } => {
            let wanted = normalize_fingerprint(&fingerprint);
            let locked = Locked::open(data, store::owner_or_data_roots(data, None)?)?;
            let mut file = locked.read()?;
            let removed = file.remove(&wanted);
            if removed.is_empty() {
                let present: Vec<String> = file.keys().map(|k| k.fingerprint()).collect();
                bail!(
                    "no key in {} has the fingerprint {wanted}; the keys there: {}",
                    locked.path().display(),
                    if present.is_empty() {
                        "none".to_owned()
                    } else {
                        present.join(", ")
                    }
                );
            }
            if file.keys().next().is_none() && !last {
                bail!(
                    "{wanted} is the last key in {}: without it nobody can log in over SSH. \
                     Add another key first, or pass --last to remove it anyway",
                    locked.path().display()
                );
            }
            locked.write(&file)?;
            for key in removed {
                writeln!(out, "removed {key}")?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
