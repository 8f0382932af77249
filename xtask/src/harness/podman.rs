//! A private Podman: its own configuration, storage, network config and API
//! socket inside the run's directory, so that tests never touch (or see)
//! the machine's own containers and images.

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context as _;
use xshell::{cmd, Cmd, Shell};

use crate::harness::procs::Service;

const READY_TIMEOUT: Duration = Duration::from_secs(60);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// `--time=0`: the service must not exit when idle between tests.
const SERVICE_ARGS: &[&str] = &["system", "service", "--time=0"];
/// `--time 0`: test containers get no stop grace at teardown.
pub const REMOVE_ALL_CONTAINERS: &[&str] = &["rm", "--all", "--force", "--time", "0"];
pub const RESET_STORAGE: &[&str] = &["system", "reset", "--force"];

/// Paths of one private Podman, all below `base`.
#[derive(Debug, Clone)]
pub struct Podman {
    pub base: PathBuf,
    pub root: PathBuf,
    pub runroot: PathBuf,
    pub network_config_dir: PathBuf,
    pub tmp_dir: PathBuf,
    pub socket: PathBuf,
    pub containers_conf: PathBuf,
    pub registries_conf: PathBuf,
    pub storage_conf: PathBuf,
}

impl Podman {
    pub fn at(base: &Path) -> Podman {
        let p = base.join("podman");
        Podman {
            base: p.clone(),
            root: p.join("root"),
            runroot: p.join("run"),
            network_config_dir: p.join("net"),
            tmp_dir: p.join("tmp"),
            socket: base.join("podman.sock"),
            containers_conf: p.join("containers.conf"),
            registries_conf: p.join("registries.conf"),
            storage_conf: p.join("storage.conf"),
        }
    }

    /// Writes containers.conf, storage.conf and a registries.conf that lets
    /// the Docker-compatible pull talk plain HTTP to `insecure_registries`
    /// (that API has no tls-verify switch).
    pub fn write_config(&self, insecure_registries: &[String]) -> anyhow::Result<()> {
        for dir in [&self.base, &self.network_config_dir, &self.tmp_dir] {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        write(&self.containers_conf, &self.containers_conf_text())?;
        write(&self.storage_conf, &self.storage_conf_text())?;
        write(&self.registries_conf, &registries_conf_text(insecure_registries))?;
        Ok(())
    }

    fn containers_conf_text(&self) -> String {
        // default_ulimits: setting any rlimit fails without CAP_SYS_RESOURCE.
        // runtime: crun fails on hybrid cgroups here. cgroupfs and a file
        // event log: PID 1 is not systemd. tmp_dir: the default /run/libpod
        // is shared with the machine's podman, and `system reset` deletes it.
        format!(
            r#"[containers]
default_ulimits = []
log_driver = "k8s-file"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
# Exec sessions (health probes) keep a conmon waiting this many seconds
# before cleaning up; the default 5 minutes outlives a test run.
exit_command_delay = 1
tmp_dir = "{tmp}"
"#,
            tmp = self.tmp_dir.display()
        )
    }

    fn storage_conf_text(&self) -> String {
        // A storage.conf of our own so that mount_program or other options
        // in the machine's /etc/containers/storage.conf do not apply.
        format!(
            r#"[storage]
driver = "overlay"
graphroot = "{root}"
runroot = "{runroot}"
"#,
            root = self.root.display(),
            runroot = self.runroot.display()
        )
    }

    /// Global flags that point the podman CLI at this storage.
    pub fn global_args(&self) -> Vec<String> {
        vec![
            "--root".into(),
            self.root.display().to_string(),
            "--runroot".into(),
            self.runroot.display().to_string(),
            "--network-config-dir".into(),
            self.network_config_dir.display().to_string(),
        ]
    }

    pub fn env(&self) -> [(&'static str, &Path); 3] {
        [
            ("CONTAINERS_CONF", self.containers_conf.as_path()),
            ("CONTAINERS_REGISTRIES_CONF", self.registries_conf.as_path()),
            ("CONTAINERS_STORAGE_CONF", self.storage_conf.as_path()),
        ]
    }

    /// `podman <global flags>` with this Podman's environment; add the rest.
    pub fn cmd<'a>(&self, sh: &'a Shell) -> Cmd<'a> {
        let args = self.global_args();
        let mut c = cmd!(sh, "podman {args...}");
        for (key, path) in self.env() {
            c = c.env(key, path);
        }
        c
    }

    /// Starts `podman system service` on the socket and waits until it answers.
    pub fn start_service(&self, sh: &Shell, log: &Path) -> anyhow::Result<Service> {
        let uri = format!("unix://{}", self.socket.display());
        let command: Command = self.cmd(sh).args(SERVICE_ARGS).arg(&uri).into();
        let mut service = Service::spawn("podman api service", command, log)?;
        let socket = self.socket.clone();
        service.wait_ready(&format!("GET /_ping on {}", socket.display()), READY_TIMEOUT, || {
            ping(&socket).is_ok()
        })?;
        Ok(service)
    }
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

pub fn registries_conf_text(insecure: &[String]) -> String {
    // No search registries: a short name must never reach Docker Hub.
    let mut text = String::from("unqualified-search-registries = []\n");
    for location in insecure {
        text.push_str(&format!("\n[[registry]]\nlocation = \"{location}\"\ninsecure = true\n"));
    }
    text
}

/// One `GET /_ping` over the socket; Ok when the answer is 200.
pub fn ping(socket: &Path) -> anyhow::Result<()> {
    let mut stream = UnixStream::connect(socket).with_context(|| format!("connecting to {}", socket.display()))?;
    stream.set_read_timeout(Some(PROBE_TIMEOUT))?;
    stream.set_write_timeout(Some(PROBE_TIMEOUT))?;
    stream.write_all(b"GET /_ping HTTP/1.0\r\nHost: podman\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    anyhow::ensure!(http_status(&answer) == Some(200), "unexpected answer: {answer}");
    Ok(())
}

/// The status code of an HTTP/1.x response's first line.
pub fn http_status(response: &str) -> Option<u16> {
    let line = response.lines().next()?;
    let mut parts = line.split(' ');
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    parts.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registries_conf_marks_each_loopback_registry_insecure() {
        let text = registries_conf_text(&["127.0.0.1:5000".into(), "127.0.0.1:5001".into()]);
        assert!(text.starts_with("unqualified-search-registries = []\n"));
        assert_eq!(text.matches("insecure = true").count(), 2);
        assert!(text.contains("location = \"127.0.0.1:5001\""));
    }

    #[test]
    fn http_status_reads_the_status_line_only() {
        assert_eq!(http_status("HTTP/1.1 401 Unauthorized\r\n\r\n"), Some(401));
        assert_eq!(http_status("HTTP/1.0 200 OK\r\n"), Some(200));
        assert_eq!(http_status("SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(http_status(""), None);
    }
}
