//! Turns a [`RawManifest`] into a [`Manifest`], checking every rule that a
//! single manifest can check on its own. Every problem is collected.

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use super::error::Problems;
use super::raw::RawManifest;
use super::{
    AppId, AppKind, ImageSource, Manifest, PinnedImage, PortMapping, Protocol, SecretEnv, SecretKind, SecretSpec,
    Security, VolumeMount, VolumeSource, DEFAULT_NETWORK,
};
use crate::dataroot::DataRoot;

const ID_RULE: &str = "lowercase letters, digits and '-', starting with a letter, at most 63 characters";
const NAME_RULE: &str = "letters, digits, '_', '.' and '-', starting with a letter or digit, at most 63 characters";
const PORT_RULE: &str = "a port number from 1 to 65535";
/// Below this podman refuses to start a container at all.
const MIN_MEMORY: u64 = 6 * 1024 * 1024;

/// Linux capabilities a manifest may keep (see capabilities(7)).
const CAPABILITIES: &[&str] = &[
    "AUDIT_CONTROL",
    "AUDIT_READ",
    "AUDIT_WRITE",
    "BLOCK_SUSPEND",
    "BPF",
    "CHECKPOINT_RESTORE",
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "IPC_LOCK",
    "IPC_OWNER",
    "KILL",
    "LEASE",
    "LINUX_IMMUTABLE",
    "MAC_ADMIN",
    "MAC_OVERRIDE",
    "MKNOD",
    "NET_ADMIN",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_RAW",
    "PERFMON",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_CHROOT",
    "SYS_MODULE",
    "SYS_NICE",
    "SYS_PACCT",
    "SYS_PTRACE",
    "SYS_RAWIO",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "SYSLOG",
    "WAKE_ALARM",
];

mod files;
mod health;

use files::validate_files;
use health::validate_health;

pub(crate) struct Context<'a> {
    pub file: &'a Path,
    /// The app's folder (the manifest's parent).
    pub app_dir: &'a Path,
    pub data_root: &'a DataRoot,
}

pub(crate) fn validate(raw: RawManifest, cx: &Context<'_>) -> Result<Manifest, Vec<super::ManifestError>> {
    let mut p = Problems::new(cx.file.to_path_buf());

    let id = AppId::parse(&raw.id).filter(|_| !DataRoot::RESERVED_NAMES.contains(&raw.id.as_str()));
    if id.is_none() {
        p.bad(
            "id",
            &raw.id,
            format!(
                "allowed: {ID_RULE}, and none of {}",
                DataRoot::RESERVED_NAMES.join(", ")
            ),
        );
    }
    let folder = cx.app_dir.file_name().map(|f| f.to_string_lossy().into_owned());
    if id.is_some() && folder.as_deref() != Some(raw.id.as_str()) {
        p.bad(
            "id",
            &raw.id,
            format!("must equal the app's folder name {:?}", folder.unwrap_or_default()),
        );
    }
    if raw.name.trim().is_empty() {
        p.bad("name", &raw.name, "must not be empty");
    }
    if raw.version.trim().is_empty() {
        p.bad("version", &raw.version, "must not be empty");
    }

    let kind = match raw.kind.as_deref() {
        None if raw.id.ends_with("-ui") => AppKind::Ui,
        None | Some("service") => AppKind::Service,
        Some("ui") => AppKind::Ui,
        Some(other) => {
            p.bad("kind", other, "allowed: service, ui");
            AppKind::Service
        }
    };

    if let Some(name) = &raw.container_name {
        if !valid_container_name(name) {
            p.bad("container_name", name, format!("allowed: {NAME_RULE}"));
        }
    }

    let mut depends_on = Vec::new();
    for (i, dep) in raw.depends_on.iter().enumerate() {
        match AppId::parse(dep) {
            Some(d) if depends_on.contains(&d) => p.bad(format!("depends_on[{i}]"), dep, "is listed twice"),
            Some(d) => depends_on.push(d),
            None => p.bad(
                format!("depends_on[{i}]"),
                dep,
                format!("allowed: an app id ({ID_RULE})"),
            ),
        }
    }

    let image = match (&raw.image, &raw.build) {
        (Some(_), Some(_)) => {
            p.missing(
                "image",
                "`image` and `build` are both set; allowed: exactly one of them",
            );
            None
        }
        (None, None) => {
            p.missing(
                "image",
                "neither `image` nor `build` is set; allowed: exactly one of them",
            );
            None
        }
        (Some(image), None) => match image.parse::<PinnedImage>() {
            Ok(pinned) => Some(ImageSource::Pinned(pinned)),
            Err(e) => {
                p.bad("image", image, e.to_string());
                None
            }
        },
        (None, Some(build)) => {
            let context = inside(cx.app_dir, &build.context);
            let containerfile = build.containerfile.as_deref().unwrap_or("Containerfile");
            if context.is_none() {
                p.bad(
                    "build.context",
                    &build.context,
                    "must be a relative path that stays inside the app's folder",
                );
            }
            let file_ok = relative_without_dotdot(containerfile);
            if !file_ok {
                p.bad(
                    "build.containerfile",
                    containerfile,
                    "must be a relative path inside the build context",
                );
            }
            match context {
                Some(context) if file_ok => Some(ImageSource::Build {
                    context,
                    containerfile: PathBuf::from(containerfile),
                }),
                _ => None,
            }
        }
    };

    for (field, list) in [("entrypoint", &raw.entrypoint), ("command", &raw.command)] {
        if let Some(list) = list {
            if field == "entrypoint" && list.is_empty() {
                p.missing(
                    field,
                    "must not be empty; leave it out to keep the image's own entrypoint",
                );
            }
        }
    }

    if let Some(user) = &raw.user {
        if !valid_user(user) {
            p.bad(
                "user",
                user,
                "allowed: a numeric UID or UID:GID, such as \"1000:1000\" (data ownership follows it)",
            );
        }
    }

    let network = raw.network.clone().unwrap_or_else(|| DEFAULT_NETWORK.to_owned());
    if !valid_container_name(&network) {
        p.bad("network", &network, format!("allowed: {NAME_RULE}"));
    }

    let mut ports = Vec::new();
    let mut seen_ports = BTreeSet::new();
    for (i, port) in raw.ports.iter().enumerate() {
        let host = check_port(&mut p, &format!("ports[{i}].host"), port.host);
        let container = check_port(&mut p, &format!("ports[{i}].container"), port.container);
        let protocol = match port.protocol.as_deref() {
            None | Some("tcp") => Protocol::Tcp,
            Some("udp") => Protocol::Udp,
            Some(other) => {
                p.bad(format!("ports[{i}].protocol"), other, "allowed: tcp, udp");
                Protocol::Tcp
            }
        };
        if let (Some(host), Some(container)) = (host, container) {
            if !seen_ports.insert((host, protocol)) {
                p.bad(format!("ports[{i}].host"), host, "is published twice by this app");
            }
            ports.push(PortMapping {
                host,
                container,
                protocol,
            });
        }
    }

    let mut volumes = Vec::new();
    let mut targets = BTreeSet::new();
    for (i, v) in raw.volumes.iter().enumerate() {
        let source = if v.source.starts_with('/') {
            let path = Path::new(&v.source);
            // The first component under the data root must be an app's
            // folder: the agent's own state, secrets and container storage
            // live beside them and must never be mounted into an app.
            // Exactly `<data root>/<app>/<name>`: every folder on the way
            // is the agent's, which no container can write, so no
            // container can swap one for a symlink before Podman mounts it.
            let app_folder = cx.data_root.app_folder_of(path);
            let depth_ok = path
                .strip_prefix(cx.data_root.path())
                .is_ok_and(|rest| rest.components().count() == 2 && one_name(rest.components().nth(1)));
            if !has_no_dotdot(path) || app_folder.is_none() || !depth_ok {
                p.bad(
                    format!("volumes[{i}].source"),
                    &v.source,
                    format!(
                        "absolute sources must lie inside an app's folder under the data root {}, \
                         as {}/<app>/<name> (one folder directly in the app's folder; not {}) \
                         and may not contain '..'",
                        cx.data_root.display(),
                        cx.data_root.display(),
                        DataRoot::RESERVED_NAMES.join(", ")
                    ),
                );
                None
            } else {
                Some(VolumeSource::Absolute(path.to_path_buf()))
            }
        } else if !relative_without_dotdot(&v.source) || !is_one_name(&v.source) {
            p.bad(
                format!("volumes[{i}].source"),
                &v.source,
                "allowed: a folder name without '/' (kept as <data root>/<id>/<name>) or an absolute path \
                 <data root>/<app>/<name>; '..' is not allowed",
            );
            None
        } else {
            Some(VolumeSource::AppData(PathBuf::from(&v.source)))
        };
        let target_ok = v.target.starts_with('/') && has_no_dotdot(Path::new(&v.target));
        if !target_ok {
            p.bad(
                format!("volumes[{i}].target"),
                &v.target,
                "allowed: an absolute path in the container without '..'",
            );
        } else if !targets.insert(v.target.trim_end_matches('/').to_owned()) {
            p.bad(format!("volumes[{i}].target"), &v.target, "is mounted twice");
        }
        if let (Some(source), true) = (source, target_ok) {
            volumes.push(VolumeMount {
                source,
                target: v.target.clone(),
                read_only: v.read_only,
            });
        }
    }

    for key in raw.env.keys() {
        if !valid_env_key(key) {
            p.bad(
                format!("env.{key}"),
                key,
                "allowed: a variable name of letters, digits and '_', not starting with a digit",
            );
        }
    }

    let mut secrets = Vec::new();
    for (i, s) in raw.secrets.iter().enumerate() {
        let kind = match s.kind.as_str() {
            "hex16" => Some(SecretKind::Hex16),
            "hex32" => Some(SecretKind::Hex32),
            other => {
                p.bad(format!("secrets[{i}].kind"), other, "allowed: hex16, hex32");
                None
            }
        };
        if AppId::parse(&s.name).is_none() {
            p.bad(format!("secrets[{i}].name"), &s.name, format!("allowed: {ID_RULE}"));
        } else if secrets.iter().any(|x: &SecretSpec| x.name == s.name) {
            p.bad(format!("secrets[{i}].name"), &s.name, "is declared twice");
        } else if let Some(kind) = kind {
            secrets.push(SecretSpec {
                name: s.name.clone(),
                kind,
            });
        }
    }

    let mut secret_env = Vec::new();
    for (i, e) in raw.secret_env.iter().enumerate() {
        if !valid_env_key(&e.key) {
            p.bad(
                format!("secret_env[{i}].key"),
                &e.key,
                "allowed: a variable name of letters, digits and '_', not starting with a digit",
            );
        } else if raw.env.contains_key(&e.key) {
            p.bad(
                format!("secret_env[{i}].key"),
                &e.key,
                "is also set in `env`; a variable has one source",
            );
        } else if raw.secret_env[..i].iter().any(|x| x.key == e.key) {
            p.bad(
                format!("secret_env[{i}].key"),
                &e.key,
                "is set twice in `secret_env`; a variable has one source",
            );
        }
        if !raw.secrets.iter().any(|s| s.name == e.secret) {
            let declared: Vec<&str> = raw.secrets.iter().map(|s| s.name.as_str()).collect();
            p.bad(
                format!("secret_env[{i}].secret"),
                &e.secret,
                format!("is not declared in `secrets`; declared: [{}]", declared.join(", ")),
            );
        }
        secret_env.push(SecretEnv {
            key: e.key.clone(),
            secret: e.secret.clone(),
        });
    }

    let memory = raw
        .resources
        .as_ref()
        .and_then(|r| r.memory.as_ref())
        .and_then(|m| match parse_memory(m) {
            Some(bytes) if bytes >= MIN_MEMORY => Some(bytes),
            _ => {
                p.bad(
                    "resources.memory",
                    m,
                    "allowed: a size of at least 6Mi, such as 512Mi or 2Gi (suffixes Ki, Mi, Gi, K, M, G)",
                );
                None
            }
        });

    let mut security = Security::default();
    if let Some(s) = &raw.security {
        for (i, cap) in s.capabilities_add.iter().enumerate() {
            let upper = cap.to_ascii_uppercase();
            let name = upper.strip_prefix("CAP_").unwrap_or(&upper);
            if CAPABILITIES.contains(&name) {
                if !security.capabilities_add.iter().any(|c| c == name) {
                    security.capabilities_add.push(name.to_owned());
                }
            } else {
                p.bad(
                    format!("security.capabilities_add[{i}]"),
                    cap,
                    "allowed: a Linux capability name such as NET_BIND_SERVICE or DAC_OVERRIDE",
                );
            }
        }
        security.read_only_root = s.read_only_root.unwrap_or(true);
        security.no_new_privileges = s.no_new_privileges.unwrap_or(true);
    }

    let health = raw.health.as_ref().and_then(|h| validate_health(&mut p, h));

    let stop_grace_period = raw
        .stop_grace_period
        .as_ref()
        .map_or(Some(Duration::from_secs(30)), |s| {
            duration(&mut p, "stop_grace_period", s)
        });

    let files = validate_files(&mut p, &raw.files, &raw.id, &network, &depends_on, &volumes, &secrets);

    match (id, image, stop_grace_period) {
        (Some(id), Some(image), Some(stop_grace_period)) if p.errors.is_empty() => Ok(Manifest {
            id,
            name: raw.name,
            version: raw.version,
            kind,
            container_name: raw.container_name,
            depends_on,
            image,
            entrypoint: raw.entrypoint,
            command: raw.command,
            user: raw.user,
            network,
            ports,
            volumes,
            env: raw.env,
            secret_env,
            secrets,
            memory,
            security,
            health,
            stop_grace_period,
            files,
            path: cx.file.to_path_buf(),
        }),
        _ => Err(p.errors),
    }
}

fn duration(p: &mut Problems, field: &str, s: &str) -> Option<Duration> {
    match humantime::parse_duration(s) {
        Ok(d) if d <= Duration::from_secs(24 * 3600) => Some(d),
        _ => {
            p.bad(field, s, "allowed: a duration up to 24h such as 30s, 5m or 1m30s");
            None
        }
    }
}

fn check_port(p: &mut Problems, field: &str, value: i64) -> Option<u16> {
    match u16::try_from(value) {
        Ok(port) if port > 0 => Some(port),
        _ => {
            p.bad(field, value, format!("allowed: {PORT_RULE}"));
            None
        }
    }
}

pub(crate) fn valid_container_name(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

fn valid_user(s: &str) -> bool {
    let numeric = |x: &str| !x.is_empty() && x.len() <= 10 && x.bytes().all(|b| b.is_ascii_digit());
    match s.split_once(':') {
        Some((u, g)) => numeric(u) && numeric(g),
        None => numeric(s),
    }
}

fn valid_env_key(s: &str) -> bool {
    !s.is_empty() && !s.as_bytes()[0].is_ascii_digit() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// `Some(name)` for one plain name (not `.`, `..` or `/`).
fn one_name(c: Option<Component<'_>>) -> bool {
    matches!(c, Some(Component::Normal(_)))
}

/// A volume's relative source: exactly one plain folder name, so its
/// parent is the app's folder, which no container can write.
fn is_one_name(s: &str) -> bool {
    let mut parts = Path::new(s).components();
    one_name(parts.next()) && parts.next().is_none() && !s.ends_with('/')
}

fn has_no_dotdot(path: &Path) -> bool {
    !path.components().any(|c| c == Component::ParentDir)
}

fn relative_without_dotdot(s: &str) -> bool {
    let path = Path::new(s);
    path.is_relative()
        && path
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

/// Resolves `rel` against `dir` when it stays inside `dir`, symlinks included.
fn inside(dir: &Path, rel: &str) -> Option<PathBuf> {
    if !relative_without_dotdot(rel) {
        return None;
    }
    let joined = dir.join(rel);
    // A symlink could still point outside; when the context exists, check
    // where it really is.
    match (joined.canonicalize(), dir.canonicalize()) {
        (Ok(real), Ok(base)) if !real.starts_with(&base) => None,
        _ => Some(joined),
    }
}

/// `2Gi`, `512Mi`, `64Ki`, `1G`, `500M`, `100K` or a plain byte count.
pub(crate) fn parse_memory(s: &str) -> Option<u64> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit {
        "" => 1,
        "K" => 1000,
        "M" => 1000 * 1000,
        "G" => 1000 * 1000 * 1000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
