//! Networks: bridges with DNS between their containers.

use bollard::models::NetworkCreateRequest;
use serde_json::Value;

use super::raw::encode;
use super::{Engine, EngineError, Result};

/// Podman's own API, for what the Docker API does not say (a network's
/// DNS flag). Podman 4.x serves it under any 4.x version.
const LIBPOD_PREFIX: &str = "/v4.0.0/libpod";
/// The driver of the networks the agent creates: the only one with DNS.
const NETWORK_DRIVER: &str = "bridge";

impl Engine {
    /// Creates bridge network `name`, with DNS between its containers, if
    /// there is none; true when it created it. An existing network with DNS
    /// off is `NetworkWithoutDns`: apps on it could not reach each other by
    /// name.
    pub async fn ensure_network(&self, name: &str) -> Result<bool> {
        match self.network_has_dns(name).await {
            Ok(true) => return Ok(false),
            Ok(false) => {
                return Err(EngineError::NetworkWithoutDns {
                    network: name.to_owned(),
                })
            }
            Err(EngineError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        // The Docker API's create turns DNS on for bridge networks.
        let request = NetworkCreateRequest {
            name: name.to_owned(),
            driver: Some(NETWORK_DRIVER.to_owned()),
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
                EngineError::Conflict { .. } => match self.network_has_dns(name).await? {
                    true => Ok(false),
                    false => Err(EngineError::NetworkWithoutDns {
                        network: name.to_owned(),
                    }),
                },
                other => Err(other),
            },
        }
    }

    /// Whether network `name` resolves container names. Only Podman's own
    /// API says so (`dns_enabled`).
    async fn network_has_dns(&self, name: &str) -> Result<bool> {
        let what = format!("network {name}");
        let value = self
            .raw
            .get_json(&format!("{LIBPOD_PREFIX}/networks/{}/json", encode(name)), &what)
            .await?;
        Ok(value.get("dns_enabled").and_then(Value::as_bool).unwrap_or(false))
    }
}
