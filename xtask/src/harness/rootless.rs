//! A rootless Podman API service, as the node runs it: `podman system
//! service` as an unprivileged user of its own (`archy-test-rootless`, with
//! a subordinate id range), so that the agent's rootless branches (owners
//! through `podman unshare`, group-readable files, probes through the
//! rootless network namespace) are tested here and not only in the QEMU
//! boots.
//!
//! The user's `HOME` and `XDG_RUNTIME_DIR` are folders of this run, so its
//! `~/.config/containers` (configuration, registries, storage) is ours and
//! any `podman` the user runs with that environment, such as the agent's
//! `podman unshare`, sees the service's storage. What the machine needs
//! (see `/work/shared/notes/machine.md`): `newuidmap` and `slirp4netns`
//! (Debian's `uidmap`, `slirp4netns`), `/dev/net/tun` open to everyone, and
//! `/` a shared mount (the rootless network namespace's runtime folder is
//! mounted through it; `/` alone, not recursively: the mounts below keep
//! their propagation). [`HostChanges`] records what it changed in the run
//! folder and puts it back at teardown.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context as _};
use nix::unistd::User;
use serde::{Deserialize, Serialize};
use xshell::{cmd, Cmd, Shell};

use crate::harness::procs::{self, capture, Service};

/// The unprivileged user the rootless service runs as. Made once on a
/// machine and kept: user accounts and their subordinate ranges are cheap,
/// and a second run finds it.
pub const USER: &str = "archy-test-rootless";
const TUN: &str = "/dev/net/tun";
const TUN_MODE: u32 = 0o666;
const HOST_CHANGES_FILE: &str = "host-changes.json";
const READY_TIMEOUT: Duration = Duration::from_secs(90);
const RESET_ATTEMPTS: u32 = 3;

/// The paths of the rootless Podman, all below `base` (owned by [`USER`]).
#[derive(Debug, Clone)]
pub struct RootlessPodman {
    pub base: PathBuf,
    pub home: PathBuf,
    pub runtime_dir: PathBuf,
    pub root: PathBuf,
    pub runroot: PathBuf,
    pub socket: PathBuf,
    /// A folder the user owns, where tests make their nodes.
    pub work: PathBuf,
    pub user: RootlessUser,
}

/// [`USER`]'s ids and subordinate ranges (`start:count`).
#[derive(Debug, Clone)]
pub struct RootlessUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub subuid: (u32, u32),
    pub subgid: (u32, u32),
}

impl RootlessPodman {
    pub fn at(dir: &Path, user: RootlessUser) -> RootlessPodman {
        let base = dir.join("rootless");
        RootlessPodman {
            home: base.join("home"),
            runtime_dir: base.join("run"),
            root: base.join("storage"),
            runroot: base.join("runroot"),
            socket: base.join("podman.sock"),
            work: base.join("work"),
            base,
            user,
        }
    }

    /// The folders and `~/.config/containers` files, all the user's.
    pub fn write_config(&self, insecure_registries: &[String]) -> anyhow::Result<()> {
        let config = self.home.join(".config/containers");
        for dir in [&self.base, &config, &self.runtime_dir, &self.work] {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        write(&config.join("containers.conf"), CONTAINERS_CONF)?;
        write(&config.join("storage.conf"), &self.storage_conf_text())?;
        write(
            &config.join("registries.conf"),
            &crate::harness::podman::registries_conf_text(insecure_registries),
        )?;
        let sh = Shell::new().context("creating a shell")?;
        let owner = format!("{}:{}", self.user.uid, self.user.gid);
        let base = &self.base;
        capture(cmd!(sh, "chown -R {owner} {base}"))
            .with_context(|| format!("giving {} to {USER}", self.base.display()))?;
        // Podman insists that the runtime folder is the user's alone.
        std::fs::set_permissions(&self.runtime_dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("setting mode 0700 on {}", self.runtime_dir.display()))?;
        Ok(())
    }

    fn storage_conf_text(&self) -> String {
        // vfs: /dev/fuse is 0600 on these machines, so fuse-overlayfs is out,
        // and naming it keeps the driver the same on every machine.
        format!(
            "[storage]\ndriver = \"vfs\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
            self.root.display(),
            self.runroot.display()
        )
    }

    /// Global flags that point the podman CLI at this storage (the same
    /// as storage.conf says, spelled out for the tests).
    pub fn global_args(&self) -> Vec<String> {
        vec![
            "--root".into(),
            self.root.display().to_string(),
            "--runroot".into(),
            self.runroot.display().to_string(),
        ]
    }

    /// The environment the user's podman runs with.
    pub fn env(&self) -> [(&'static str, &Path); 2] {
        [
            ("HOME", self.home.as_path()),
            ("XDG_RUNTIME_DIR", self.runtime_dir.as_path()),
        ]
    }

    /// `runuser -u USER -- env HOME=… XDG_RUNTIME_DIR=… podman <flags>`.
    /// Its working folder is the user's, so podman can stat it.
    pub fn cmd<'a>(&self, sh: &'a Shell) -> Cmd<'a> {
        let envs: Vec<String> = self.env().iter().map(|(k, v)| format!("{k}={}", v.display())).collect();
        let args = self.global_args();
        let name = &self.user.name;
        let cwd = &self.base;
        cmd!(sh, "runuser -u {name} -- env --chdir={cwd} {envs...} podman {args...}")
    }

    pub fn start_service(&self, sh: &Shell, log: &Path) -> anyhow::Result<Service> {
        let uri = format!("unix://{}", self.socket.display());
        let command: Command = self.cmd(sh).args(["system", "service", "--time=0"]).arg(&uri).into();
        let mut service = Service::spawn("rootless podman api service", command, log)?;
        let socket = self.socket.clone();
        service.wait_ready(&format!("GET /_ping on {}", socket.display()), READY_TIMEOUT, || {
            crate::harness::podman::ping(&socket).is_ok()
        })?;
        Ok(service)
    }

    /// The variables the tests read (`agent/tests/common/mod.rs`).
    pub fn vars(&self) -> BTreeMap<String, String> {
        let path = |p: &Path| p.display().to_string();
        let u = &self.user;
        BTreeMap::from([
            ("ARCHY_TEST_ROOTLESS_ENGINE".into(), path(&self.socket)),
            ("ARCHY_TEST_ROOTLESS_USER".into(), u.name.clone()),
            ("ARCHY_TEST_ROOTLESS_UID".into(), u.uid.to_string()),
            ("ARCHY_TEST_ROOTLESS_GID".into(), u.gid.to_string()),
            (
                "ARCHY_TEST_ROOTLESS_SUBUID".into(),
                format!("{}:{}", u.subuid.0, u.subuid.1),
            ),
            (
                "ARCHY_TEST_ROOTLESS_SUBGID".into(),
                format!("{}:{}", u.subgid.0, u.subgid.1),
            ),
            ("ARCHY_TEST_ROOTLESS_HOME".into(), path(&self.home)),
            ("ARCHY_TEST_ROOTLESS_RUNTIME_DIR".into(), path(&self.runtime_dir)),
            ("ARCHY_TEST_ROOTLESS_WORK".into(), path(&self.work)),
            ("ARCHY_TEST_ROOTLESS_PODMAN_ARGS".into(), self.global_args().join(" ")),
        ])
    }

    /// Removes every container, stops nothing else (the service is the
    /// caller's), and resets the storage; returns what failed.
    pub fn clean(&self, sh: &Shell) -> Vec<String> {
        let mut problems = Vec::new();
        if !self.home.exists() {
            return problems;
        }
        if let Err(e) = capture(self.cmd(sh).args(crate::harness::podman::REMOVE_ALL_CONTAINERS)) {
            problems.push(format!("{e:#}"));
        }
        problems
    }

    /// After the service stopped: resets the storage and ends the user's
    /// pause process (which holds the user namespace).
    pub fn reset(&self, sh: &Shell) -> Vec<String> {
        let mut problems = Vec::new();
        if !self.home.exists() {
            return problems;
        }
        let mut last = None;
        for attempt in 0..RESET_ATTEMPTS {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(300));
            }
            match capture(self.cmd(sh).args(crate::harness::podman::RESET_STORAGE)) {
                Ok(_) => {
                    last = None;
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        if let Some(e) = last {
            problems.push(format!("{e:#}"));
        }
        let pause = self.runtime_dir.join("libpod/tmp/pause.pid");
        if let Some(pid) = std::fs::read_to_string(&pause)
            .ok()
            .and_then(|t| t.trim().parse::<i32>().ok())
        {
            if procs::pid_alive(pid) && owned_by(pid, self.user.uid) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
        problems
    }
}

/// Whether process `pid` runs as `uid`.
fn owned_by(pid: i32, uid: u32) -> bool {
    std::fs::metadata(format!("/proc/{pid}")).is_ok_and(|m| m.uid() == uid)
}

const CONTAINERS_CONF: &str = r#"[containers]
default_ulimits = []
log_driver = "k8s-file"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
exit_command_delay = 1
"#;

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Makes [`USER`] unless it exists, and reads its ids and ranges. `useradd`
/// gives a new user a subordinate range of its own (`SUB_UID_MIN` …
/// in `/etc/login.defs`).
pub fn ensure_user(sh: &Shell) -> anyhow::Result<RootlessUser> {
    if User::from_name(USER)
        .context("looking up the rootless test user")?
        .is_none()
    {
        eprintln!("xtask: creating the unprivileged user {USER} for the rootless Podman service");
        capture(cmd!(
            sh,
            "useradd --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin {USER}"
        ))
        .with_context(|| format!("creating the user {USER}"))?;
    }
    read_user()
}

/// [`USER`]'s ids and ranges; fails when it or its ranges are missing.
pub fn read_user() -> anyhow::Result<RootlessUser> {
    let user = User::from_name(USER)
        .context("looking up the rootless test user")?
        .with_context(|| format!("{USER} does not exist after useradd"))?;
    let range = |file: &str| -> anyhow::Result<(u32, u32)> {
        let text = std::fs::read_to_string(file).with_context(|| format!("reading {file}"))?;
        find_range(&text, USER, user.uid.as_raw()).with_context(|| {
            format!(
                "{file} gives {USER} no subordinate range; add one with \
                 `usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {USER}`"
            )
        })
    };
    Ok(RootlessUser {
        name: USER.to_owned(),
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
        subuid: range("/etc/subuid")?,
        subgid: range("/etc/subgid")?,
    })
}

/// The first `name:start:count` (or `uid:start:count`) line of a subid file.
fn find_range(text: &str, name: &str, uid: u32) -> Option<(u32, u32)> {
    text.lines().find_map(|line| {
        let mut parts = line.trim().split(':');
        let who = parts.next()?;
        if who != name && who.parse::<u32>().ok() != Some(uid) {
            return None;
        }
        let start = parts.next()?.parse().ok()?;
        let count = parts.next()?.parse().ok()?;
        Some((start, count))
    })
}

/// What the rootless service needs changed on the machine, as it was
/// before: written to the run folder before the change, so that teardown
/// (also a later run's, after a kill) can put it back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostChanges {
    /// `/dev/net/tun`'s mode before, when we changed it.
    pub tun_mode: Option<u32>,
    /// `/`'s propagation before (`private` or `slave`), when we made it
    /// shared.
    pub root_propagation: Option<String>,
}

impl HostChanges {
    /// Changes what needs changing, recording it in `dir` first. When
    /// another live run made the same changes, takes its record of the
    /// machine as it was over (the machine as we find it is not that).
    pub fn apply(sh: &Shell, dir: &Path) -> anyhow::Result<HostChanges> {
        let record = match others_record(dir) {
            Some(theirs) => theirs,
            None => {
                let tun = std::fs::metadata(TUN).with_context(|| format!("reading {TUN}"))?;
                let tun_mode = tun.permissions().mode() & 0o7777;
                let table = std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
                HostChanges {
                    tun_mode: (tun_mode != TUN_MODE).then_some(tun_mode),
                    root_propagation: root_propagation(&table)?,
                }
            }
        };
        let path = dir.join(HOST_CHANGES_FILE);
        let text = serde_json::to_string_pretty(&record).context("serialising the host changes")?;
        write(&path, &text)?;
        std::fs::set_permissions(TUN, std::fs::Permissions::from_mode(TUN_MODE))
            .with_context(|| format!("setting mode {TUN_MODE:o} on {TUN} (slirp4netns opens it as the user)"))?;
        capture(cmd!(sh, "mount --make-shared /"))
            .context("making / a shared mount (the rootless network namespace mounts through it)")?;
        Ok(record)
    }

    /// Puts back what the record in `dir` says we changed, unless another
    /// live run still needs it (it then puts it back itself). Returns what
    /// failed.
    pub fn restore(sh: &Shell, dir: &Path) -> Vec<String> {
        let path = dir.join(HOST_CHANGES_FILE);
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Vec::new();
        };
        let mut problems = Vec::new();
        let record: HostChanges = match serde_json::from_str(&text) {
            Ok(r) => r,
            Err(e) => return vec![format!("{}: {e}; /dev/net/tun and / left as they are", path.display())],
        };
        if others_record(dir).is_some() {
            eprintln!("xtask: another test run still uses the rootless service's host settings; it restores them");
        } else {
            if let Some(mode) = record.tun_mode {
                if let Err(e) = std::fs::set_permissions(TUN, std::fs::Permissions::from_mode(mode)) {
                    problems.push(format!("restoring mode {mode:o} on {TUN}: {e}"));
                }
            }
            if let Some(propagation) = &record.root_propagation {
                let flag = format!("--make-{propagation}");
                if let Err(e) = capture(cmd!(sh, "mount {flag} /")) {
                    problems.push(format!("restoring the propagation of /: {e:#}"));
                }
            }
        }
        if let Err(e) = std::fs::remove_file(&path) {
            problems.push(format!("removing {}: {e}", path.display()));
        }
        problems
    }
}

/// The record of another live `cargo xtask test` run, if any.
fn others_record(ours: &Path) -> Option<HostChanges> {
    let tmp = ours.parent()?;
    let prefix = crate::harness::test_env::DIR_PREFIX;
    std::fs::read_dir(tmp).ok()?.filter_map(Result::ok).find_map(|entry| {
        let path = entry.path();
        if path == ours {
            return None;
        }
        let pid: i32 = entry.file_name().to_str()?.strip_prefix(prefix)?.parse().ok()?;
        if !procs::pid_alive(pid) {
            return None;
        }
        let text = std::fs::read_to_string(path.join(HOST_CHANGES_FILE)).ok()?;
        serde_json::from_str(&text).ok()
    })
}

/// `/`'s propagation in a mountinfo table when it is not shared:
/// `private` or `slave`. The last line for `/` is the mount on top.
fn root_propagation(table: &str) -> anyhow::Result<Option<String>> {
    let line = table
        .lines()
        .rev()
        .find(|l| l.split(' ').nth(4) == Some("/"))
        .context("/proc/self/mountinfo has no line for /")?;
    let fields: Vec<&str> = line.split(' ').collect();
    let sep = fields.iter().position(|f| *f == "-").unwrap_or(fields.len());
    let optional = &fields[6.min(sep)..sep];
    Ok(if optional.iter().any(|f| f.starts_with("shared:")) {
        None
    } else if optional.iter().any(|f| f.starts_with("master:")) {
        Some("slave".to_owned())
    } else {
        Some("private".to_owned())
    })
}

/// Fails unless `/dev/net/tun` exists: slirp4netns, the rootless
/// network, needs it.
pub fn check_host() -> anyhow::Result<()> {
    if !Path::new(TUN).exists() {
        bail!("{TUN} does not exist: rootless Podman's slirp4netns needs it (load the tun module)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subid_ranges_are_found_by_name_or_uid() {
        let text = "other:100000:65536\narchy-test-rootless:165536:65536\n1005:300000:10\n";
        assert_eq!(find_range(text, USER, 1001), Some((165536, 65536)));
        assert_eq!(find_range(text, "nobody-here", 1005), Some((300000, 10)));
        assert_eq!(find_range(text, "nobody-here", 7), None);
    }

    #[test]
    fn the_propagation_of_the_top_root_mount_is_read() {
        let private = "22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n23 22 0:5 / /dev rw - devtmpfs udev rw\n";
        assert_eq!(root_propagation(private).ok().flatten().as_deref(), Some("private"));
        let slave = "22 1 8:1 / / rw master:3 - ext4 /dev/sda1 rw\n";
        assert_eq!(root_propagation(slave).ok().flatten().as_deref(), Some("slave"));
        let shared_on_top = format!("{private}30 22 0:9 / / rw shared:4 - tmpfs t rw\n");
        assert_eq!(root_propagation(&shared_on_top).ok().flatten(), None);
        assert!(root_propagation("23 22 0:5 / /dev rw - devtmpfs udev rw\n").is_err());
    }
}
