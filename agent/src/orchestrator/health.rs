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
                let (ok, detail) = http_get(&url, timeout).await;
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
                let (ok, detail) = match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
                    Ok(Ok(_)) => (true, "connected".to_owned()),
                    Ok(Err(e)) => (false, format!("connect failed: {e}")),
                    Err(_) => (false, format!("no connection within {timeout:?}")),
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
