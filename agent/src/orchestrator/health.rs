//! The agent's own health probes. Podman's healthchecks need systemd
//! timers, which not every host runs, so the agent probes for itself.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::engine::{ContainerInfo, Engine};
use crate::manifest::{PortMapping, Probe};

/// The outcome of one probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeResult {
    pub ok: bool,
    /// What was probed: a URL, an address or a command.
    pub target: String,
    /// Why it failed, or the HTTP status / exit code when it passed.
    pub detail: String,
    pub elapsed_ms: u64,
}

/// Where a container's port is reachable from the agent: the published host
/// port on loopback when there is one, else the container's address on its
/// network.
pub fn probe_address(port: u16, ports: &[PortMapping], info: &ContainerInfo, network: &str) -> Option<SocketAddr> {
    if let Some(p) = ports.iter().find(|p| p.container == port) {
        return Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), p.host));
    }
    let ip = info.ips.get(network).or_else(|| info.ips.values().next())?;
    Some(SocketAddr::new(*ip, port))
}

/// The URL an http probe requests. A target that already is a URL is used
/// as written: prepending a second `http://` once made every probe fail.
pub fn http_url(target: &str, addr: SocketAddr) -> String {
    if target.starts_with("http://") || target.starts_with("https://") {
        target.to_owned()
    } else {
        format!("http://{addr}{target}")
    }
}

/// Runs `probe` once against the container described by `info`.
pub async fn run_probe(
    engine: &Engine,
    probe: &Probe,
    timeout: Duration,
    ports: &[PortMapping],
    network: &str,
    info: &ContainerInfo,
) -> ProbeResult {
    let started = Instant::now();
    let (ok, target, detail) = match probe {
        Probe::Http { port, target } => match probe_address(*port, ports, info, network) {
            None => (
                false,
                target.clone(),
                "the container has no address to probe".to_owned(),
            ),
            Some(addr) => {
                let url = http_url(target, addr);
                let (ok, detail) = if in_rootless_netns(addr) {
                    via_rootless_netns(&NetProbe::Http(url.clone()), timeout).await
                } else {
                    http_get(&url, timeout).await
                };
                (ok, url, detail)
            }
        },
        Probe::Tcp { port } => match probe_address(*port, ports, info, network) {
            None => (
                false,
                format!("port {port}"),
                "the container has no address to probe".to_owned(),
            ),
            Some(addr) => {
                let (ok, detail) = if in_rootless_netns(addr) {
                    via_rootless_netns(&NetProbe::Tcp(addr), timeout).await
                } else {
                    tcp_connect(addr, timeout).await
                };
                (ok, addr.to_string(), detail)
            }
        },
        Probe::Exec { command } => {
            let (ok, detail) = match engine.exec(&info.name, command, timeout).await {
                Ok(out) if out.exit_code == 0 => (true, "exit code 0".to_owned()),
                Ok(out) => (
                    false,
                    format!("exit code {}: {}", out.exit_code, last_line(&out.output)),
                ),
                Err(e) => (false, format!("{e:#}")),
            };
            (ok, command.join(" "), detail)
        }
    };
    ProbeResult {
        ok,
        target,
        detail,
        elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    }
}

/// A network probe, as `archy-agent probe-net` takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetProbe {
    Http(String),
    Tcp(SocketAddr),
}

impl NetProbe {
    /// Runs the probe from this process's network namespace.
    pub async fn run(&self, timeout: Duration) -> (bool, String) {
        match self {
            NetProbe::Http(url) => http_get(url, timeout).await,
            NetProbe::Tcp(addr) => tcp_connect(*addr, timeout).await,
        }
    }

    fn args(&self) -> [String; 2] {
        match self {
            NetProbe::Http(url) => ["--http".to_owned(), url.clone()],
            NetProbe::Tcp(addr) => ["--tcp".to_owned(), addr.to_string()],
        }
    }
}

/// A rootless engine keeps its networks in a namespace of its own: a
/// container's address there is unreachable from the agent, while a
/// published port on loopback is.
fn in_rootless_netns(addr: SocketAddr) -> bool {
    !addr.ip().is_loopback()
        && matches!(
            crate::ownership::Ownership::current(),
            Ok(crate::ownership::Ownership::Rootless { .. })
        )
}

/// Runs the probe inside the rootless network namespace: the agent's own
/// binary (`probe-net`) under `podman unshare --rootless-netns`.
async fn via_rootless_netns(probe: &NetProbe, timeout: Duration) -> (bool, String) {
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => return (false, format!("cannot find the agent's own binary: {e}")),
    };
    let mut cmd = tokio::process::Command::new("podman");
    cmd.args(["unshare", "--rootless-netns"])
        .arg(exe)
        .arg("probe-net")
        .args(probe.args())
        .arg("--timeout-ms")
        .arg(timeout.as_millis().to_string())
        .kill_on_drop(true);
    // The namespace takes a moment to enter; the probe's own timeout
    // bounds the rest.
    match tokio::time::timeout(timeout + Duration::from_secs(10), cmd.output()).await {
        Ok(Ok(out)) => {
            let detail = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            let detail = if detail.is_empty() {
                format!(
                    "podman unshare --rootless-netns: {}",
                    last_line(&String::from_utf8_lossy(&out.stderr))
                )
            } else {
                detail
            };
            (out.status.success(), detail)
        }
        Ok(Err(e)) => (false, format!("cannot run podman unshare --rootless-netns: {e}")),
        Err(_) => (
            false,
            format!("no answer within {timeout:?} (podman unshare --rootless-netns)"),
        ),
    }
}

async fn tcp_connect(addr: SocketAddr, timeout: Duration) -> (bool, String) {
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => (true, "connected".to_owned()),
        Ok(Err(e)) => (false, format!("connect failed: {e}")),
        Err(_) => (false, format!("no connection within {timeout:?}")),
    }
}

fn last_line(s: &str) -> &str {
    s.trim_end().lines().last().unwrap_or("")
}

async fn http_get(url: &str, timeout: Duration) -> (bool, String) {
    let client = match reqwest::Client::builder().timeout(timeout).build() {
        Ok(c) => c,
        Err(e) => return (false, format!("cannot build an http client: {e}")),
    };
    match client.get(url).send().await {
        Ok(resp) if resp.status().is_success() || resp.status().is_redirection() => {
            (true, format!("HTTP {}", resp.status().as_u16()))
        }
        Ok(resp) => (false, format!("HTTP {}", resp.status().as_u16())),
        Err(e) => (false, format!("request failed: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_gets_the_address_and_a_full_url_is_kept() {
        let addr: SocketAddr = "10.88.0.5:3000".parse().expect("addr");
        assert_eq!(http_url("/health", addr), "http://10.88.0.5:3000/health");
        assert_eq!(
            http_url("http://electrs:3000/health", addr),
            "http://electrs:3000/health"
        );
        assert_eq!(http_url("https://x/y", addr), "https://x/y");
    }
}
