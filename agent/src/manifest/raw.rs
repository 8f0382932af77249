//! The manifest exactly as written: serde structures that refuse unknown
//! fields. Nothing here is trusted; `validate` turns it into a [`Manifest`].
//!
//! Numbers that have a range (ports) are read wide (`i64`) so that
//! validation can name the bad value instead of serde's generic overflow.
//!
//! [`Manifest`]: super::Manifest

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawManifest {
    pub id: String,
    pub name: String,
    pub version: String,
    pub kind: Option<String>,
    pub container_name: Option<String>,
    #[serde(default)]
    pub depends_on: Vec<String>,
    pub image: Option<String>,
    pub build: Option<RawBuild>,
    pub entrypoint: Option<Vec<String>>,
    pub command: Option<Vec<String>>,
    pub user: Option<String>,
    pub network: Option<String>,
    #[serde(default)]
    pub ports: Vec<RawPort>,
    #[serde(default)]
    pub volumes: Vec<RawVolume>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub secret_env: Vec<RawSecretEnv>,
    #[serde(default)]
    pub secrets: Vec<RawSecret>,
    pub resources: Option<RawResources>,
    pub security: Option<RawSecurity>,
    pub health: Option<RawHealth>,
    pub stop_grace_period: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBuild {
    pub context: String,
    pub containerfile: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPort {
    pub host: i64,
    pub container: i64,
    pub protocol: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVolume {
    pub source: String,
    pub target: String,
    #[serde(default)]
    pub read_only: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSecretEnv {
    pub key: String,
    pub secret: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSecret {
    pub name: String,
    pub kind: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawResources {
    pub memory: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSecurity {
    #[serde(default)]
    pub capabilities_add: Vec<String>,
    pub read_only_root: Option<bool>,
    pub no_new_privileges: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    pub http: Option<RawHttpProbe>,
    pub tcp: Option<RawTcpProbe>,
    pub exec: Option<Vec<String>>,
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub retries: Option<i64>,
    pub start_period: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttpProbe {
    pub port: i64,
    pub path: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTcpProbe {
    pub port: i64,
}
