//! The host's SSH client against a guest: a test key of the run's own,
//! the guest's port 22 forwarded to a free 127.0.0.1 port, and the
//! checks an owner's first login makes (issue 15, "Reaching the node
//! headless").

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use xshell::{cmd, Shell};

/// The account an owner logs in as.
pub(super) const USER: &str = "archipelago";
/// The file the probe waits for before it finishes (`wait-host`).
pub(super) const GO_FILE: &str = "/tmp/archy-e2e-go";

/// A key pair made for this run (ed25519, no passphrase).
#[derive(Debug, Clone)]
pub(super) struct TestKey {
    pub(super) private: PathBuf,
    pub(super) public: PathBuf,
}

impl TestKey {
    pub(super) fn generate(sh: &Shell, dir: &Path) -> anyhow::Result<TestKey> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let private = dir.join("id_ed25519");
        let _ = fs::remove_file(&private);
        let _ = fs::remove_file(private.with_extension("pub"));
        let no_passphrase = "";
        cmd!(
            sh,
            "ssh-keygen -q -t ed25519 -N {no_passphrase} -C archy-e2e-test-key -f {private}"
        )
        .quiet()
        .run()
        .context("making the test key")?;
        Ok(TestKey {
            public: private.with_extension("pub"),
            private,
        })
    }
}

/// A free TCP port on 127.0.0.1 (the OS picks it; it may be taken again
/// before QEMU binds it, which fails that boot loudly).
pub(super) fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port on 127.0.0.1")?;
    Ok(listener.local_addr().context("reading the free port")?.port())
}

/// One guest's SSH endpoint.
#[derive(Debug)]
pub(super) struct Endpoint<'a> {
    pub(super) port: u16,
    pub(super) key: &'a TestKey,
    /// Holds the guest's host key once [`Endpoint::scan`] read it: every
    /// login checks it strictly.
    known_hosts: PathBuf,
}

/// What a login attempt ended with.
#[derive(Debug)]
pub(super) struct Outcome {
    pub(super) ok: bool,
    pub(super) stdout: String,
    pub(super) stderr: String,
}

impl<'a> Endpoint<'a> {
    pub(super) fn new(port: u16, key: &'a TestKey, dir: &Path) -> Endpoint<'a> {
        Endpoint {
            port,
            key,
            known_hosts: dir.join(format!("known_hosts-{port}")),
        }
    }

    /// The guest's ed25519 host key as `ssh-keyscan` sees it, written to
    /// this endpoint's known_hosts; returns its fingerprint (`SHA256:…`).
    /// Tries for up to `patience` (sshd may still be starting).
    pub(super) fn scan(&self, sh: &Shell, patience: Duration) -> anyhow::Result<String> {
        let port = self.port.to_string();
        let deadline = Instant::now() + patience;
        let line = loop {
            let out = cmd!(sh, "ssh-keyscan -T 10 -t ed25519 -p {port} 127.0.0.1")
                .quiet()
                .ignore_status()
                .ignore_stderr()
                .read()
                .unwrap_or_default();
            if let Some(line) = out.lines().find(|l| l.contains(" ssh-ed25519 ")) {
                break line.to_owned();
            }
            if Instant::now() >= deadline {
                bail!(
                    "ssh-keyscan got no ed25519 host key from 127.0.0.1:{port} within {} s",
                    patience.as_secs()
                );
            }
            std::thread::sleep(Duration::from_secs(3));
        };
        fs::write(&self.known_hosts, format!("{line}\n"))
            .with_context(|| format!("writing {}", self.known_hosts.display()))?;
        let known_hosts = &self.known_hosts;
        let listed = cmd!(sh, "ssh-keygen -l -f {known_hosts}")
            .quiet()
            .read()
            .context("ssh-keygen -l of the scanned host key")?;
        fingerprint_of(&listed).with_context(|| format!("no fingerprint in ssh-keygen's {listed:?}"))
    }

    /// `ssh` as `user` running `command`, with only `options` beyond the
    /// fixed ones: batch mode (no prompt), no agent, no config file, the
    /// scanned host key checked strictly.
    pub(super) fn ssh(&self, sh: &Shell, user: &str, options: &[&str], command: &str) -> anyhow::Result<Outcome> {
        let port = self.port.to_string();
        let known_hosts = format!("UserKnownHostsFile={}", self.known_hosts.display());
        let target = format!("{user}@127.0.0.1");
        let out = cmd!(
            sh,
            "ssh -F /dev/null -p {port} -o BatchMode=yes -o StrictHostKeyChecking=yes -o {known_hosts}
                 -o GlobalKnownHostsFile=/dev/null -o IdentityAgent=none -o ConnectTimeout=30
                 {options...} {target} {command}"
        )
        .quiet()
        .ignore_status()
        .output()
        .context("running ssh")?;
        Ok(Outcome {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// The options that check the scanned host key strictly, for an ssh
    /// started by hand.
    pub(super) fn strict_options(&self) -> Vec<String> {
        vec![
            "-o".into(),
            "StrictHostKeyChecking=yes".into(),
            "-o".into(),
            format!("UserKnownHostsFile={}", self.known_hosts.display()),
            "-o".into(),
            "GlobalKnownHostsFile=/dev/null".into(),
            "-o".into(),
            "IdentityAgent=none".into(),
            "-o".into(),
            "ConnectTimeout=30".into(),
        ]
    }

    /// `ssh` with the test key and nothing else.
    pub(super) fn with_key(&self, sh: &Shell, user: &str, command: &str) -> anyhow::Result<Outcome> {
        let key = self.key.private.display().to_string();
        self.ssh(sh, user, &["-o", "IdentitiesOnly=yes", "-i", &key], command)
    }

    /// A password (or keyboard-interactive) login, no key: the server must
    /// refuse and offer public keys alone.
    pub(super) fn without_key(&self, sh: &Shell, user: &str) -> anyhow::Result<Outcome> {
        self.ssh(
            sh,
            user,
            &[
                "-o",
                "PubkeyAuthentication=no",
                "-o",
                "PreferredAuthentications=password,keyboard-interactive",
                "-o",
                "NumberOfPasswordPrompts=0",
            ],
            "true",
        )
    }
}

/// The `SHA256:…` token of a line (`ssh-keygen -l`'s, the console's).
pub(super) fn fingerprint_of(text: &str) -> Option<String> {
    text.split_whitespace()
        .find(|w| w.starts_with("SHA256:") && w.len() > "SHA256:".len())
        .map(|w| w.trim_end_matches([',', '.', ')']).to_owned())
}

/// Every host key fingerprint the console showed (`ssh host key:
/// SHA256:… (ED25519)`, the issue text agetty prints), deduplicated in
/// order.
pub(super) fn console_host_keys(console: &str) -> Vec<String> {
    let mut keys: Vec<String> = Vec::new();
    for line in console.lines() {
        if let Some((_, rest)) = line.split_once("ssh host key:") {
            if let Some(fp) = fingerprint_of(rest) {
                if !keys.contains(&fp) {
                    keys.push(fp);
                }
            }
        }
    }
    keys
}

/// Fails unless a refused login says the server offers public keys only.
pub(super) fn ensure_publickey_only(outcome: &Outcome, what: &str) -> anyhow::Result<()> {
    ensure!(!outcome.ok, "{what} was let in: {}", outcome.stdout.trim());
    ensure!(
        outcome.stderr.contains("Permission denied (publickey)"),
        "{what} was refused, but not as a server that offers public keys alone would: {}",
        outcome.stderr.trim()
    );
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_read_from_keygen_and_the_console() {
        assert_eq!(
            fingerprint_of("256 SHA256:abcDEF+/01 [127.0.0.1]:2222 (ED25519)").as_deref(),
            Some("SHA256:abcDEF+/01")
        );
        assert_eq!(fingerprint_of("no key here"), None);
        assert_eq!(fingerprint_of("SHA256: nothing"), None);
        let console = "noise\nssh archipelago@10.0.2.15\nssh host key: SHA256:AAA (ED25519)\n\
                       later\r\n\x1b[0mssh host key: SHA256:AAA (ED25519)\nssh host key: SHA256:BBB (ED25519)\n";
        assert_eq!(console_host_keys(console), ["SHA256:AAA", "SHA256:BBB"]);
    }

    #[test]
    fn only_a_publickey_refusal_passes() {
        let refused = |stderr: &str| Outcome {
            ok: false,
            stdout: String::new(),
            stderr: stderr.into(),
        };
        ensure_publickey_only(&refused("archipelago@127.0.0.1: Permission denied (publickey)."), "x").unwrap();
        assert!(ensure_publickey_only(&refused("Permission denied (publickey,password)."), "x").is_err());
        assert!(ensure_publickey_only(&refused("Connection refused"), "x").is_err());
        let let_in = Outcome {
            ok: true,
            stdout: "hello".into(),
            stderr: String::new(),
        };
        assert!(ensure_publickey_only(&let_in, "x").is_err());
    }
}
