//! Checks inside the finished tree: Debian 12's own files, netavark from
//! Debian's package, and the configuration the agent needs.

use std::fs;
use std::path::Path;

use anyhow::{bail, Context as _};
use xshell::{cmd, Shell};

use super::{
    timers, BOOKWORM_NETAVARK_SERIES, CONSOLE_ISSUE_FILE, CONSOLE_ISSUE_LINK, CONTAINERS_CONF, DEBIAN_VERSION_PREFIX,
    NETAVARK_PACKAGE, NETAVARK_PATH, NODE_AGENT_PATH, NODE_USER, RELEASE, SLIM_FLAGS, SSH_HOST_KEYS_DIR,
    SSH_HOST_KEY_PREFIX, TIMERS_ALLOW_FILE, USER_PASSWORD_FIELD, VERIFIED_PACKAGES,
};
use crate::harness::procs::capture;

/// The checks that prove the rootfs is Debian 12's, runs netavark from
/// Debian's package, can run the agent, carries no SSH host key, lets the
/// node user in with a key, shows the console text, and enables only the
/// timers `rootfs/timers.allow` (under `root`) allows.
pub fn verify(sh: &Shell, root: &Path, tree: &Path) -> anyhow::Result<()> {
    let debian_version = fs::read_to_string(tree.join("etc/debian_version")).context("reading etc/debian_version")?;
    if !debian_version.starts_with(DEBIAN_VERSION_PREFIX) {
        bail!(
            "the rootfs is Debian {}, not Debian 12 ({RELEASE})",
            debian_version.trim()
        );
    }
    let owner = capture(cmd!(sh, "chroot {tree} dpkg-query -S {NETAVARK_PATH}"))
        .with_context(|| format!("no package of the rootfs owns {NETAVARK_PATH}"))?;
    if owner.trim() != format!("{NETAVARK_PACKAGE}: {NETAVARK_PATH}") {
        bail!(
            "{NETAVARK_PATH} belongs to {:?}, not to the {NETAVARK_PACKAGE} package",
            owner.trim()
        );
    }
    let format = "-f=${Version}";
    let version = capture(cmd!(sh, "chroot {tree} dpkg-query -W {format} {NETAVARK_PACKAGE}"))?;
    if !version.starts_with(BOOKWORM_NETAVARK_SERIES) || version.contains("bpo") {
        bail!(
            "netavark in the rootfs is {version}, not bookworm's {BOOKWORM_NETAVARK_SERIES}x: it must come from Debian 12 itself"
        );
    }
    // Exit status 1 with a list when anything differs, including the
    // files left out on purpose; those are filtered below.
    let verify = cmd!(sh, "chroot {tree} dpkg --verify {VERIFIED_PACKAGES...}")
        .quiet()
        .ignore_status()
        .output()
        .context("running dpkg --verify in the rootfs")?;
    let stdout = String::from_utf8_lossy(&verify.stdout);
    if !verify.status.success() && stdout.trim().is_empty() {
        bail!(
            "dpkg --verify of the container packages failed ({}): {}",
            verify.status,
            String::from_utf8_lossy(&verify.stderr).trim()
        );
    }
    let changed = changed_files(&stdout);
    if !changed.is_empty() {
        bail!(
            "files of Debian's container packages differ from what the packages installed:\n{}",
            changed.join("\n")
        );
    }
    let conf_path = tree.join(CONTAINERS_CONF);
    let conf = fs::read_to_string(&conf_path).with_context(|| format!("reading {}", conf_path.display()))?;
    if toml_value(&conf, "network", "network_backend").as_deref() != Some("\"netavark\"") {
        bail!("{CONTAINERS_CONF} does not set network_backend = \"netavark\" in [network]");
    }
    capture(cmd!(sh, "chroot {tree} /{NODE_AGENT_PATH} --help")).context("the agent does not run inside the rootfs")?;

    let keys = ssh_host_keys(tree)?;
    if !keys.is_empty() {
        bail!(
            "the rootfs carries SSH host keys ({}): every node would share them; each node makes its own on its data disk",
            keys.join(", ")
        );
    }
    let shadow = fs::read_to_string(tree.join("etc/shadow")).context("reading etc/shadow")?;
    match password_field(&shadow, NODE_USER) {
        Some(USER_PASSWORD_FIELD) => {}
        other => bail!(
            "etc/shadow gives {NODE_USER} the password field {other:?}, not {USER_PASSWORD_FIELD:?}: \
             sshd without PAM refuses a key login to an account whose field starts with `!`"
        ),
    }
    let link = tree.join(CONSOLE_ISSUE_LINK.trim_start_matches('/'));
    let target = fs::read_link(&link).with_context(|| format!("{CONSOLE_ISSUE_LINK} is not a symlink"))?;
    if target != Path::new(CONSOLE_ISSUE_FILE) {
        bail!(
            "{CONSOLE_ISSUE_LINK} points at {}, not at {CONSOLE_ISSUE_FILE}: the console would not show the node's addresses",
            target.display()
        );
    }

    let allow_path = root.join(TIMERS_ALLOW_FILE);
    let allow = fs::read_to_string(&allow_path).with_context(|| format!("reading {}", allow_path.display()))?;
    timers::check(tree, &allow, TIMERS_ALLOW_FILE)?;
    Ok(())
}

/// The tree's RAUC keyring is there and is exactly the signing
/// certificate: the node trusts the key its release was signed with.
pub fn verify_keyring(tree: &Path, cert: &Path) -> anyhow::Result<()> {
    let keyring = tree.join(super::KEYRING_PATH);
    let installed = fs::read(&keyring).with_context(|| {
        format!(
            "the rootfs has no RAUC keyring /{}: a node could not verify any update",
            super::KEYRING_PATH
        )
    })?;
    let expected = fs::read(cert).with_context(|| format!("reading the signing certificate {}", cert.display()))?;
    if installed != expected {
        bail!(
            "the rootfs's RAUC keyring /{} is not the signing certificate {}: the node would refuse this release's own bundles",
            super::KEYRING_PATH,
            cert.display()
        );
    }
    Ok(())
}

/// The files of `etc/ssh` in `tree` whose name says they are host keys.
pub(super) fn ssh_host_keys(tree: &Path) -> anyhow::Result<Vec<String>> {
    let dir = tree.join(SSH_HOST_KEYS_DIR);
    let mut keys = Vec::new();
    let Ok(entries) = fs::read_dir(&dir) else {
        return Ok(keys);
    };
    for entry in entries {
        let name = entry
            .with_context(|| format!("reading {}", dir.display()))?
            .file_name()
            .to_string_lossy()
            .into_owned();
        if name.starts_with(SSH_HOST_KEY_PREFIX) {
            keys.push(format!("/{SSH_HOST_KEYS_DIR}/{name}"));
        }
    }
    keys.sort();
    Ok(keys)
}

/// The password field of `user` in a shadow file.
pub(super) fn password_field<'a>(shadow: &'a str, user: &str) -> Option<&'a str> {
    shadow.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next() == Some(user)).then(|| fields.next()).flatten()
    })
}

/// The lines of `dpkg --verify` output that are real changes: files left
/// out on purpose (docs, man pages: the path-exclude options) are not.
pub(super) fn changed_files(verify_output: &str) -> Vec<String> {
    let excluded: Vec<&str> = SLIM_FLAGS
        .iter()
        .filter_map(|f| f.strip_prefix("--dpkgopt=path-exclude="))
        .filter_map(|p| p.strip_suffix("/*"))
        .collect();
    verify_output
        .lines()
        .filter(|line| !line.trim().is_empty())
        .filter(|line| {
            let mut words = line.split_whitespace();
            let missing = words.next() == Some("missing");
            let path = words.last().unwrap_or("");
            let left_out = excluded
                .iter()
                .any(|dir| path == *dir || path.strip_prefix(dir).is_some_and(|rest| rest.starts_with('/')));
            !(missing && left_out)
        })
        .map(str::to_owned)
        .collect()
}

/// The raw value of `key` in `[table]` of a simple TOML file.
pub fn toml_value(text: &str, table: &str, key: &str) -> Option<String> {
    let mut current = String::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = name.trim().to_owned();
        } else if current == table {
            if let Some((k, v)) = line.split_once('=') {
                if k.trim() == key {
                    return Some(v.trim().to_owned());
                }
            }
        }
    }
    None
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::OVERLAY_DIR;
    use super::*;

    #[test]
    fn the_keyring_must_be_the_signing_certificate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tree = dir.path().join("tree");
        let cert = dir.path().join("cert.pem");
        fs::write(&cert, "-----BEGIN CERTIFICATE-----\nA\n").expect("write");
        let e = verify_keyring(&tree, &cert).expect_err("no keyring").to_string();
        assert!(e.contains("has no RAUC keyring /etc/rauc/keyring.pem"), "{e}");
        fs::create_dir_all(tree.join("etc/rauc")).expect("mkdir");
        fs::write(
            tree.join(super::super::KEYRING_PATH),
            "-----BEGIN CERTIFICATE-----\nB\n",
        )
        .expect("write");
        let e = verify_keyring(&tree, &cert).expect_err("another cert").to_string();
        assert!(e.contains("is not the signing certificate"), "{e}");
        fs::copy(&cert, tree.join(super::super::KEYRING_PATH)).expect("copy");
        verify_keyring(&tree, &cert).expect("the same cert");
    }

    #[test]
    fn the_overlay_sets_netavark_storage_and_subids() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let overlay = root.join(OVERLAY_DIR);
        let conf = fs::read_to_string(overlay.join(CONTAINERS_CONF)).unwrap();
        assert_eq!(
            toml_value(&conf, "network", "network_backend").as_deref(),
            Some("\"netavark\"")
        );
        assert_eq!(toml_value(&conf, "engine", "exit_command_delay").as_deref(), Some("5"));
        assert_eq!(
            toml_value(&conf, "engine", "runtime"),
            None,
            "the node keeps Debian's crun"
        );
        let storage = fs::read_to_string(overlay.join("etc/containers/storage.conf")).unwrap();
        let graphroot = toml_value(&storage, "storage", "graphroot").unwrap();
        assert!(graphroot.starts_with("\"/var/lib/archipelago/"), "{graphroot}");
        for file in ["etc/subuid", "etc/subgid"] {
            assert_eq!(
                fs::read_to_string(overlay.join(file)).unwrap(),
                "archipelago:100000:65536\n"
            );
        }
    }

    #[test]
    fn dpkg_verify_ignores_only_the_files_left_out_on_purpose() {
        let output = "missing     /usr/share/man/man1/podman.1.gz\n\
                      missing     /usr/share/man/man1\n\
                      missing     /usr/share/doc/crun/README.md.gz\n\
                      missing     /usr/lib/podman/rootlessport\n\
                      ??5??????   /usr/lib/podman/netavark\n\
                      ??5?????? c /etc/containers/registries.conf\n\
                      missing     /usr/share/documentation\n";
        assert_eq!(
            changed_files(output),
            [
                "missing     /usr/lib/podman/rootlessport",
                "??5??????   /usr/lib/podman/netavark",
                "??5?????? c /etc/containers/registries.conf",
                "missing     /usr/share/documentation",
            ]
        );
    }

    #[test]
    fn host_keys_and_password_fields_are_found() {
        let dir = tempfile::tempdir().unwrap();
        assert!(ssh_host_keys(dir.path()).unwrap().is_empty(), "no etc/ssh at all");
        let ssh = dir.path().join(SSH_HOST_KEYS_DIR);
        fs::create_dir_all(ssh.join("sshd_config.d")).unwrap();
        fs::write(ssh.join("sshd_config"), "").unwrap();
        fs::write(ssh.join("moduli"), "").unwrap();
        assert!(ssh_host_keys(dir.path()).unwrap().is_empty());
        fs::write(ssh.join("ssh_host_rsa_key.pub"), "").unwrap();
        fs::write(ssh.join("ssh_host_ed25519_key"), "").unwrap();
        assert_eq!(
            ssh_host_keys(dir.path()).unwrap(),
            ["/etc/ssh/ssh_host_ed25519_key", "/etc/ssh/ssh_host_rsa_key.pub"]
        );

        let shadow = "root:*:20000:0:99999:7:::\narchipelago-x:!:1::::::\narchipelago:!:20000:0:99999:7:::\n";
        assert_eq!(password_field(shadow, "archipelago"), Some("!"));
        assert_eq!(password_field(shadow, "root"), Some("*"));
        assert_eq!(password_field(shadow, "nobody"), None);
    }

    #[test]
    fn the_overlay_links_the_console_text_into_etc_issue_d() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let link = root.join(OVERLAY_DIR).join(CONSOLE_ISSUE_LINK.trim_start_matches('/'));
        assert_eq!(fs::read_link(link).unwrap(), Path::new(CONSOLE_ISSUE_FILE));
    }

    #[test]
    fn toml_values_are_found_in_their_table_only() {
        let text = "[engine]\nnetwork_backend = \"cni\"\n[network]\n# network_backend = \"x\"\nnetwork_backend = \"netavark\" # here\n";
        assert_eq!(
            toml_value(text, "network", "network_backend").as_deref(),
            Some("\"netavark\"")
        );
        assert_eq!(
            toml_value(text, "engine", "network_backend").as_deref(),
            Some("\"cni\"")
        );
        assert_eq!(toml_value(text, "storage", "network_backend"), None);
    }
}
