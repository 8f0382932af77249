//! Loopback OCI registries (Debian's `docker-registry`), each with its own
//! config file and storage, on a free port.
//!
//! The Debian package may run a default instance from its init script; we
//! never use it, and our ports are picked free so it cannot get in the way.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context as _;
use xshell::{cmd, Shell};

use crate::harness::podman::http_status;
use crate::harness::procs::{Service, STOP_GRACE};

const READY_TIMEOUT: Duration = Duration::from_secs(30);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
const PORT_ATTEMPTS: u32 = 3;

#[derive(Debug, Clone)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl Credentials {
    /// `user:password`, as skopeo and podman take them.
    pub fn joined(&self) -> String {
        format!("{}:{}", self.user, self.password)
    }
}

#[derive(Debug)]
pub struct Registry {
    pub name: String,
    /// `127.0.0.1:PORT`
    pub host: String,
    pub data_dir: PathBuf,
    pub auth: Option<Credentials>,
    pub service: Service,
}

impl Registry {
    /// Writes the config under `dir` and starts the registry; returns once
    /// `/v2/` answers (401 counts when `auth` is set).
    pub fn start(
        sh: &Shell,
        name: &str,
        dir: &Path,
        auth: Option<Credentials>,
        log: &Path,
    ) -> anyhow::Result<Registry> {
        let data_dir = dir.join("data");
        std::fs::create_dir_all(&data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
        let htpasswd = match &auth {
            Some(creds) => {
                let path = dir.join("htpasswd");
                let (user, password) = (&creds.user, &creds.password);
                // -B: bcrypt, the only scheme docker-registry accepts.
                let line = cmd!(sh, "htpasswd -Bbn {user} {password}")
                    .quiet()
                    .secret()
                    .read()
                    .with_context(|| format!("hashing the password of registry {name}"))?;
                std::fs::write(&path, format!("{line}\n")).with_context(|| format!("writing {}", path.display()))?;
                Some(path)
            }
            None => None,
        };
        let config = dir.join("config.yml");
        let mut attempt = 1;
        loop {
            let port = free_port().with_context(|| format!("picking a port for registry {name}"))?;
            let host = format!("127.0.0.1:{port}");
            std::fs::write(&config, config_yaml(&host, &data_dir, htpasswd.as_deref()))
                .with_context(|| format!("writing {}", config.display()))?;
            // An absolute config path also lets teardown find the process
            // by the run directory in its command line.
            let command: Command = cmd!(sh, "docker-registry serve {config}").into();
            let mut service = Service::spawn(&format!("registry {name}"), command, log)?;
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let accepted: &[u16] = if auth.is_some() { &[200, 401] } else { &[200] };
            let ready = service.wait_ready(&format!("GET /v2/ on {host}"), READY_TIMEOUT, || {
                probe_v2(addr).is_ok_and(|status| accepted.contains(&status))
            });
            match ready {
                Ok(()) => {
                    return Ok(Registry {
                        name: name.to_owned(),
                        host,
                        data_dir,
                        auth,
                        service,
                    })
                }
                // Another process took the port between our probe and the
                // registry's bind: pick another.
                Err(_) if attempt < PORT_ATTEMPTS && service.log_tail().contains("address already in use") => {
                    service.stop(STOP_GRACE)?;
                    attempt += 1;
                }
                Err(e) => {
                    service.stop(STOP_GRACE)?;
                    return Err(e);
                }
            }
        }
    }
}

/// A port that was free a moment ago: bind port 0 and let the kernel pick.
fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding 127.0.0.1:0")?;
    Ok(listener.local_addr().context("reading the bound address")?.port())
}

fn config_yaml(host: &str, data_dir: &Path, htpasswd: Option<&Path>) -> String {
    let mut yaml = format!(
        r#"version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {data}
  delete:
    enabled: true
http:
  addr: {host}
"#,
        data = data_dir.display()
    );
    if let Some(path) = htpasswd {
        yaml.push_str(&format!(
            "auth:\n  htpasswd:\n    realm: archy-test\n    path: {}\n",
            path.display()
        ));
    }
    yaml
}

fn probe_v2(addr: SocketAddr) -> anyhow::Result<u16> {
    let mut stream = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT)?;
    stream.set_read_timeout(Some(PROBE_TIMEOUT))?;
    stream.set_write_timeout(Some(PROBE_TIMEOUT))?;
    stream.write_all(format!("GET /v2/ HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    http_status(&answer).with_context(|| format!("not an HTTP answer: {answer}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_block_appears_only_with_a_password_file() {
        let plain = config_yaml("127.0.0.1:1", Path::new("/d"), None);
        assert!(!plain.contains("auth:"));
        assert!(plain.contains("addr: 127.0.0.1:1\n"));
        let auth = config_yaml("127.0.0.1:1", Path::new("/d"), Some(Path::new("/d/htpasswd")));
        assert!(auth.ends_with("auth:\n  htpasswd:\n    realm: archy-test\n    path: /d/htpasswd\n"));
    }
}
