//! Networks: bridges with DNS between their containers.

use bollard::models::{Ipam, IpamConfig, NetworkCreateRequest};
use serde_json::Value;

use super::raw::encode;
use super::{Engine, EngineError, Result, LIBPOD_PREFIX};

/// The driver of the networks the agent creates: the only one with DNS.
const NETWORK_DRIVER: &str = "bridge";

/// What Podman's own API says of a network: the agent needs its DNS flag
/// and its subnets, which the Docker API does not report the same way.
struct NetworkFacts {
    dns: bool,
    subnets: Vec<String>,
}

impl Engine {
    /// Creates bridge network `name`, with DNS between its containers and,
    /// when `subnet` is given, that IPv4 subnet (CIDR), if there is none;
    /// true when it created it. An existing network with DNS off is
    /// `NetworkWithoutDns`: apps on it could not reach each other by name.
    /// An existing network without `subnet` among its subnets (one made
    /// before the subnet was fixed, or by hand) is kept as it is, since
    /// replacing it would stop every container on it, and a warning names
    /// both subnets: config files that allow the fixed subnet (bitcoind's
    /// `rpcallowip`) refuse its containers until the owner recreates it
    /// (docs/manifest.md, "Networks").
    pub async fn ensure_network(&self, name: &str, subnet: Option<&str>) -> Result<bool> {
        match self.network_facts(name).await {
            Ok(found) => return Self::existing(name, subnet, &found).map(|()| false),
            Err(EngineError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        // The Docker API's create turns DNS on for bridge networks.
        let request = NetworkCreateRequest {
            name: name.to_owned(),
            driver: Some(NETWORK_DRIVER.to_owned()),
            ipam: subnet.map(|s| Ipam {
                config: Some(vec![IpamConfig {
                    subnet: Some(s.to_owned()),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        match self.docker.create_network(request).await {
            Ok(created) => {
                if !created.warning.is_empty() {
                    tracing::warn!(network = name, warning = %created.warning, "engine warning on network create");
                }
                Ok(true)
            }
            Err(err) => match self.classify(|| format!("network {name}"))(err) {
                // Someone else created it in between: theirs must do.
                EngineError::Conflict { .. } => {
                    let found = self.network_facts(name).await?;
                    Self::existing(name, subnet, &found).map(|()| false)
                }
                other => Err(other),
            },
        }
    }

    /// Whether existing network `name` will do: it must resolve names; a
    /// subnet other than the wanted one is warned about (see
    /// [`Engine::ensure_network`]).
    fn existing(name: &str, subnet: Option<&str>, found: &NetworkFacts) -> Result<()> {
        if !found.dns {
            return Err(EngineError::NetworkWithoutDns {
                network: name.to_owned(),
            });
        }
        if let Some(wanted) = subnet.filter(|w| !found.subnets.iter().any(|s| s == w)) {
            tracing::warn!(
                network = name,
                wanted,
                found = %found.subnets.join(", "),
                "network {name} has subnet [{}], not {wanted}: config files that allow {wanted} (bitcoind's rpcallowip) \
                 refuse its containers; stop its apps and remove the network (`podman network rm {name}`) \
                 to have it made again with {wanted}",
                found.subnets.join(", ")
            );
        }
        Ok(())
    }

    /// Network `name`'s DNS flag and subnets. Only Podman's own API says
    /// whether it resolves container names (`dns_enabled`).
    async fn network_facts(&self, name: &str) -> Result<NetworkFacts> {
        let what = format!("network {name}");
        let value = self
            .raw
            .get_json(&format!("{LIBPOD_PREFIX}/networks/{}/json", encode(name)), &what)
            .await?;
        let subnets = value
            .get("subnets")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|s| s.get("subnet").and_then(Value::as_str).map(str::to_owned))
            .collect();
        Ok(NetworkFacts {
            dns: value.get("dns_enabled").and_then(Value::as_bool).unwrap_or(false),
            subnets,
        })
    }
}
