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
    #[serde(default)]
    pub files: Vec<RawFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFile {
    pub path: String,
    pub mode: Option<String>,
    pub template: String,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn unknown_field<T: serde::de::DeserializeOwned + std::fmt::Debug>(yaml: &str, field: &str) {
        let err = serde_yaml::from_str::<T>(yaml).expect_err("unknown field must be refused");
        assert!(
            err.to_string().contains(&format!("unknown field `{field}`")),
            "{yaml}: {err}"
        );
    }

    #[test]
    fn every_structure_refuses_unknown_fields() {
        unknown_field::<RawBuild>("{ context: ., dockerfile: x }", "dockerfile");
        unknown_field::<RawPort>("{ host: 1, container: 1, hostt: 2 }", "hostt");
        unknown_field::<RawVolume>("{ source: a, target: /a, mode: ro }", "mode");
        unknown_field::<RawSecretEnv>("{ key: A, secret: a, default: x }", "default");
        unknown_field::<RawSecret>("{ name: a, kind: hex16, size: 3 }", "size");
        unknown_field::<RawResources>("{ memory: 1Gi, cpus: 2 }", "cpus");
        unknown_field::<RawSecurity>("{ privileged: true }", "privileged");
        unknown_field::<RawHealth>("{ tcp: { port: 1 }, grpc: x }", "grpc");
        unknown_field::<RawHttpProbe>("{ port: 1, pathh: / }", "pathh");
        unknown_field::<RawTcpProbe>("{ port: 1, host: x }", "host");
        unknown_field::<RawFile>("{ path: a, template: x, owner: root }", "owner");
        unknown_field::<RawManifest>("{ id: a, name: a, version: '1', restart: always }", "restart");
    }

    #[test]
    fn ports_are_read_wide_so_validation_can_name_the_bad_value() {
        let p: RawPort = serde_yaml::from_str("{ host: -1, container: 70000 }").expect("wide ints");
        assert_eq!((p.host, p.container, p.protocol), (-1, 70000, None));
    }

    #[test]
    fn optional_lists_and_maps_default_to_empty() {
        let m: RawManifest = serde_yaml::from_str("{ id: a, name: a, version: '1' }").expect("minimal");
        assert!(m.depends_on.is_empty() && m.ports.is_empty() && m.volumes.is_empty());
        assert!(m.env.is_empty() && m.secret_env.is_empty() && m.secrets.is_empty());
        assert!(m.image.is_none() && m.build.is_none() && m.health.is_none());
        let v: RawVolume = serde_yaml::from_str("{ source: a, target: /a }").expect("volume");
        assert!(!v.read_only);
    }
}
