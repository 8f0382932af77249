//! From a [`ContainerSpec`] to the Docker API's create request, as Podman
//! 4.3 reads it.

use std::collections::HashMap;
use std::path::Path;

use bollard::models::{
    ContainerCreateBody, HostConfig, Mount, MountType, PortBinding, RestartPolicy, RestartPolicyNameEnum,
};

use super::error::EngineError;
use super::Result;
use crate::spec::ContainerSpec;

/// Every capability goes; the spec's `cap_add` come back.
const DROP_ALL: &str = "ALL";
const NO_NEW_PRIVILEGES: &str = "no-new-privileges";

/// The request body for `spec`. Pure: host paths are checked by
/// [`check_host_paths`].
pub(crate) fn create_body(spec: &ContainerSpec) -> Result<ContainerCreateBody> {
    for path in bind_paths(spec) {
        check_mount_text(spec, path)?;
    }
    let mut mounts: Vec<Mount> = spec
        .mounts
        .iter()
        .map(|m| bind(&m.host, &m.target, m.read_only))
        .collect();
    mounts.extend(spec.secrets.iter().map(|s| bind(&s.host, &s.target, true)));

    let mut port_bindings: HashMap<String, Option<Vec<PortBinding>>> = HashMap::new();
    let mut exposed = Vec::new();
    for p in &spec.ports {
        let key = format!("{}/{}", p.container, p.protocol);
        port_bindings
            .entry(key.clone())
            .or_default()
            .get_or_insert_with(Vec::new)
            .push(PortBinding {
                // No host address: every address of the node, loopback
                // included. Podman 4.3 turns an explicit "0.0.0.0" into a
                // DNAT rule for destination 0.0.0.0/32 only, which no
                // packet ever matches.
                host_ip: None,
                host_port: Some(p.host.to_string()),
            });
        if !exposed.contains(&key) {
            exposed.push(key);
        }
    }

    let memory = spec
        .memory
        .map(|m| {
            i64::try_from(m).map_err(|_| EngineError::InvalidSpec {
                container: spec.name.clone(),
                message: format!("memory limit {m} is too large"),
            })
        })
        .transpose()?;

    let host_config = HostConfig {
        network_mode: Some(spec.network.clone()),
        port_bindings: (!port_bindings.is_empty()).then_some(port_bindings),
        mounts: (!mounts.is_empty()).then_some(mounts),
        cap_drop: Some(vec![DROP_ALL.to_owned()]),
        cap_add: (!spec.cap_add.is_empty()).then(|| spec.cap_add.clone()),
        readonly_rootfs: Some(spec.read_only_root),
        security_opt: spec.no_new_privileges.then(|| vec![NO_NEW_PRIVILEGES.to_owned()]),
        memory,
        // The agent restarts apps itself, with backoff.
        restart_policy: Some(RestartPolicy {
            name: Some(RestartPolicyNameEnum::NO),
            maximum_retry_count: None,
        }),
        ..Default::default()
    };

    Ok(ContainerCreateBody {
        image: Some(spec.image.clone()),
        // Kept apart: an entrypoint given alone discards the image's CMD
        // (Docker's rule, which Podman follows), so folding one into the
        // other would change what runs.
        entrypoint: spec.entrypoint.clone(),
        cmd: spec.command.clone(),
        env: (!spec.env.is_empty()).then(|| spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
        user: spec.user.clone(),
        exposed_ports: (!exposed.is_empty()).then_some(exposed),
        labels: (!spec.labels.is_empty()).then(|| {
            spec.labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<HashMap<_, _>>()
        }),
        stop_timeout: Some(stop_timeout_secs(spec)),
        host_config: Some(host_config),
        ..Default::default()
    })
}

fn bind(host: &Path, target: &str, read_only: bool) -> Mount {
    Mount {
        typ: Some(MountType::BIND),
        source: Some(host.display().to_string()),
        target: Some(target.to_owned()),
        read_only: Some(read_only),
        ..Default::default()
    }
}

/// Whole seconds, rounded up: a grace of 1.5 s must not become 1 s.
fn stop_timeout_secs(spec: &ContainerSpec) -> i64 {
    let grace = spec.stop_grace_period;
    let secs = grace.as_secs() + u64::from(grace.subsec_nanos() > 0);
    i64::try_from(secs).unwrap_or(i64::MAX)
}

fn bind_paths(spec: &ContainerSpec) -> impl Iterator<Item = (&Path, &str)> {
    spec.mounts
        .iter()
        .map(|m| (m.host.as_path(), m.target.as_str()))
        .chain(spec.secrets.iter().map(|s| (s.host.as_path(), s.target.as_str())))
}

/// Podman turns each mount back into `type=bind,source=…,target=…` text,
/// so a comma would split a path into options.
fn check_mount_text(spec: &ContainerSpec, (host, target): (&Path, &str)) -> Result<()> {
    let host_text = host.to_str().ok_or_else(|| EngineError::InvalidSpec {
        container: spec.name.clone(),
        message: format!("mount source {} is not UTF-8", host.display()),
    })?;
    for (side, text) in [("source", host_text), ("target", target)] {
        if text.contains(',') || !text.starts_with('/') {
            return Err(EngineError::InvalidSpec {
                container: spec.name.clone(),
                message: format!("mount {side} {text:?} must be an absolute path without commas"),
            });
        }
    }
    Ok(())
}

/// Checks that every host path the container binds exists: Podman would
/// create a missing one as an empty root-owned folder, even where a
/// secret file belongs. Secrets must be files.
pub(crate) fn check_host_paths(spec: &ContainerSpec) -> Result<()> {
    let missing = |path: &Path| EngineError::HostPathMissing {
        container: spec.name.clone(),
        path: path.to_path_buf(),
    };
    for m in &spec.mounts {
        if std::fs::symlink_metadata(&m.host).is_err() {
            return Err(missing(&m.host));
        }
    }
    for s in &spec.secrets {
        match std::fs::metadata(&s.host) {
            Ok(meta) if meta.is_file() => {}
            Ok(_) => {
                return Err(EngineError::InvalidSpec {
                    container: spec.name.clone(),
                    message: format!("secret {} at {} is not a file", s.name, s.host.display()),
                })
            }
            Err(_) => return Err(missing(&s.host)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use super::*;
    use crate::manifest::{AppId, PortMapping, Protocol, SecretKind};
    use crate::spec::{Mount as SpecMount, SecretMount};

    fn spec() -> ContainerSpec {
        let app = AppId::parse("demo").expect("valid id");
        let mut s = ContainerSpec::for_image(app, "archy-demo", "reg/demo@sha256:abc".into());
        s.entrypoint = Some(vec!["/bin/sh".into()]);
        s.command = Some(vec!["-c".into(), "run".into()]);
        s.env.insert("B".into(), "2".into());
        s.env.insert("A".into(), "1".into());
        s.cap_add = vec!["NET_BIND_SERVICE".into()];
        s.memory = Some(64 << 20);
        s.user = Some("1000:1000".into());
        s.stop_grace_period = Duration::from_millis(1500);
        s.ports = vec![
            PortMapping {
                host: 18080,
                container: 80,
                protocol: Protocol::Tcp,
            },
            PortMapping {
                host: 18053,
                container: 53,
                protocol: Protocol::Udp,
            },
        ];
        s.mounts = vec![SpecMount {
            host: PathBuf::from("/data/demo/db"),
            target: "/var/lib/db".into(),
            read_only: false,
        }];
        s.secrets = vec![SecretMount {
            name: "token".into(),
            kind: SecretKind::Hex16,
            host: PathBuf::from("/data/secrets/apps/demo/token"),
            target: "/run/secrets/token".into(),
        }];
        s.update_labels("1.0");
        s
    }

    #[test]
    fn entrypoint_and_command_stay_separate_and_env_is_key_value() {
        let body = create_body(&spec()).expect("body");
        assert_eq!(body.entrypoint, Some(vec!["/bin/sh".to_owned()]));
        assert_eq!(body.cmd, Some(vec!["-c".to_owned(), "run".to_owned()]));
        assert_eq!(body.env, Some(vec!["A=1".to_owned(), "B=2".to_owned()]));
        assert_eq!(body.image.as_deref(), Some("reg/demo@sha256:abc"));
        assert_eq!(body.user.as_deref(), Some("1000:1000"));
        assert_eq!(body.stop_timeout, Some(2), "1.5 s rounds up");
    }

    #[test]
    fn no_entrypoint_or_command_leaves_the_images_own() {
        let mut s = spec();
        s.entrypoint = None;
        s.command = None;
        let body = create_body(&s).expect("body");
        assert_eq!(body.entrypoint, None);
        assert_eq!(body.cmd, None);
    }

    #[test]
    fn security_settings_drop_every_capability_and_never_restart() {
        let body = create_body(&spec()).expect("body");
        let host = body.host_config.expect("host config");
        assert_eq!(host.cap_drop, Some(vec!["ALL".to_owned()]));
        assert_eq!(host.cap_add, Some(vec!["NET_BIND_SERVICE".to_owned()]));
        assert_eq!(host.readonly_rootfs, Some(true));
        assert_eq!(host.security_opt, Some(vec!["no-new-privileges".to_owned()]));
        assert_eq!(host.memory, Some(64 << 20));
        assert_eq!(host.network_mode.as_deref(), Some("archy-net"));
        let policy = host.restart_policy.expect("a restart policy");
        assert_eq!(policy.name, Some(RestartPolicyNameEnum::NO));
    }

    #[test]
    fn ports_are_published_and_exposed_per_protocol() {
        let body = create_body(&spec()).expect("body");
        let mut exposed = body.exposed_ports.expect("exposed ports");
        exposed.sort();
        assert_eq!(exposed, ["53/udp", "80/tcp"]);
        let bindings = body.host_config.and_then(|h| h.port_bindings).expect("bindings");
        let tcp = bindings.get("80/tcp").cloned().flatten().expect("80/tcp");
        assert_eq!(tcp[0].host_port.as_deref(), Some("18080"));
        assert_eq!(
            tcp[0].host_ip, None,
            "an explicit 0.0.0.0 publishes nowhere on Podman 4.3"
        );
    }

    #[test]
    fn volumes_bind_with_their_flag_and_secrets_bind_read_only() {
        let body = create_body(&spec()).expect("body");
        let mounts = body.host_config.and_then(|h| h.mounts).expect("mounts");
        assert_eq!(mounts.len(), 2);
        assert_eq!(mounts[0].source.as_deref(), Some("/data/demo/db"));
        assert_eq!(mounts[0].read_only, Some(false));
        assert_eq!(mounts[1].target.as_deref(), Some("/run/secrets/token"));
        assert_eq!(mounts[1].read_only, Some(true));
        assert!(mounts.iter().all(|m| m.typ == Some(MountType::BIND)));
    }

    #[test]
    fn labels_carry_the_spec_hash() {
        let s = spec();
        let body = create_body(&s).expect("body");
        let labels = body.labels.expect("labels");
        assert_eq!(labels.get(crate::spec::LABEL_SPEC_HASH), Some(&s.hash()));
    }

    #[test]
    fn a_mount_path_with_a_comma_is_refused() {
        let mut s = spec();
        s.mounts[0].host = PathBuf::from("/data/a,b");
        let err = create_body(&s).expect_err("a comma");
        assert!(
            matches!(&err, EngineError::InvalidSpec { message, .. } if message.contains("a,b")),
            "{err:?}"
        );
    }

    #[test]
    fn missing_host_paths_are_named_and_a_secret_must_be_a_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut s = spec();
        s.mounts[0].host = dir.path().join("absent");
        s.secrets[0].host = dir.path().to_path_buf();
        let err = check_host_paths(&s).expect_err("missing mount");
        assert!(
            matches!(&err, EngineError::HostPathMissing { path, .. } if path.ends_with("absent")),
            "{err:?}"
        );
        s.mounts[0].host = dir.path().to_path_buf();
        let err = check_host_paths(&s).expect_err("a folder as secret");
        assert!(matches!(err, EngineError::InvalidSpec { .. }), "{err:?}");
        let file = dir.path().join("token");
        std::fs::write(&file, "x").expect("write");
        s.secrets[0].host = file;
        check_host_paths(&s).expect("all present");
    }
}
