//! Turns a [`RawManifest`] into a [`Manifest`], checking every rule that a
//! single manifest can check on its own. Every problem is collected.

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use super::error::Problems;
use super::raw::{RawFile, RawHealth, RawManifest};
use super::template::{self, template_key};
use super::{
    AppId, AppKind, ConfigFile, Health, ImageSource, Manifest, PinnedImage, PortMapping, Probe, Protocol, SecretEnv,
    SecretKind, SecretSpec, Security, VolumeMount, VolumeSource, DEFAULT_NETWORK,
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
            let app_folder = cx.data_root.app_folder_of(path);
            if !has_no_dotdot(path) || app_folder.is_none() {
                p.bad(
                    format!("volumes[{i}].source"),
                    &v.source,
                    format!(
                        "absolute sources must lie inside an app's folder under the data root {} \
                         (not {}) and may not contain '..'",
                        cx.data_root.display(),
                        DataRoot::RESERVED_NAMES.join(", ")
                    ),
                );
                None
            } else {
                Some(VolumeSource::Absolute(path.to_path_buf()))
            }
        } else if v.source.is_empty() || !relative_without_dotdot(&v.source) {
            p.bad(
                format!("volumes[{i}].source"),
                &v.source,
                "allowed: a name (kept under <data root>/<id>/) or an absolute path inside the data root; '..' is not allowed",
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

    let files = validate_files(&mut p, &raw.files, &raw.id, &depends_on, &volumes, &secrets);

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

/// File modes a config file may have: readable by its owner, maybe its
/// group and others, writable by its owner at most, never executable.
const FILE_MODES: &[u32] = &[0o400, 0o440, 0o444, 0o600, 0o640, 0o644];

fn validate_files(
    p: &mut Problems,
    raw: &[RawFile],
    id: &str,
    depends_on: &[AppId],
    volumes: &[VolumeMount],
    secrets: &[SecretSpec],
) -> Vec<ConfigFile> {
    let app_volumes: Vec<&Path> = volumes
        .iter()
        .filter_map(|v| match &v.source {
            VolumeSource::AppData(rel) => Some(rel.as_path()),
            VolumeSource::Absolute(_) => None,
        })
        .collect();
    let containers: Vec<String> = std::iter::once(id)
        .chain(depends_on.iter().map(AppId::as_str))
        .map(template_key)
        .collect();
    let mut files: Vec<ConfigFile> = Vec::new();
    for (i, f) in raw.iter().enumerate() {
        let path = Path::new(&f.path);
        // Only inside a volume does the container see the file; the
        // volume folder itself is not a file.
        let path_ok = relative_without_dotdot(&f.path)
            && app_volumes
                .iter()
                .any(|v| path.starts_with(v) && path.components().count() > v.components().count());
        if !path_ok {
            let names: Vec<String> = app_volumes.iter().map(|v| v.display().to_string()).collect();
            p.bad(
                format!("files[{i}].path"),
                &f.path,
                format!(
                    "allowed: a relative path without '..' inside one of this app's named volumes [{}], \
                     such as data/app.conf",
                    names.join(", ")
                ),
            );
        } else if files.iter().any(|x| x.path == path) {
            p.bad(format!("files[{i}].path"), &f.path, "is rendered twice");
        }
        let uses = match template::check(&f.template, secrets, &containers) {
            Ok(uses) => Some(uses),
            Err(problem) => {
                p.bad(format!("files[{i}].template"), problem.value, problem.problem);
                None
            }
        };
        let with_secrets = uses.as_ref().is_some_and(|u| !u.is_empty());
        let mode = match f.mode.as_deref() {
            None => Some(0o600),
            Some(text) => {
                let parsed = u32::from_str_radix(text, 8).ok().filter(|m| FILE_MODES.contains(m));
                if parsed.is_none() {
                    p.bad(
                        format!("files[{i}].mode"),
                        text,
                        "allowed: an octal mode in quotes, one of \"0600\", \"0640\", \"0644\", \"0400\", \"0440\", \"0444\"",
                    );
                }
                parsed
            }
        };
        if let (Some(m), true) = (mode, with_secrets) {
            if m & 0o004 != 0 {
                p.bad(
                    format!("files[{i}].mode"),
                    format!("{m:04o}"),
                    "the file holds secrets: allowed: \"0600\", \"0640\", \"0400\", \"0440\" (not readable by others)",
                );
            }
        }
        if let (true, Some(mode), Some(secrets)) = (path_ok, mode, uses) {
            files.push(ConfigFile {
                path: path.to_path_buf(),
                mode,
                template: f.template.clone(),
                secrets,
            });
        }
    }
    files
}

fn validate_health(p: &mut Problems, h: &RawHealth) -> Option<Health> {
    let set = [h.http.is_some(), h.tcp.is_some(), h.exec.is_some()]
        .iter()
        .filter(|b| **b)
        .count();
    if set != 1 {
        p.missing(
            "health",
            format!("sets {set} probes; allowed: exactly one of http, tcp, exec"),
        );
        return None;
    }
    let probe = if let Some(http) = &h.http {
        let port = check_port(p, "health.http.port", http.port)?;
        let target = http.path.clone().unwrap_or_else(|| "/".to_owned());
        // A full URL is taken as written; a path gets the scheme added later.
        // Prepending twice once restarted an app fourteen times.
        if !(target.starts_with('/') || target.starts_with("http://") || target.starts_with("https://")) {
            p.bad(
                "health.http.path",
                &target,
                "allowed: a path starting with '/' or a full http:// or https:// URL",
            );
            return None;
        }
        Probe::Http { port, target }
    } else if let Some(tcp) = &h.tcp {
        Probe::Tcp {
            port: check_port(p, "health.tcp.port", tcp.port)?,
        }
    } else {
        let command = h.exec.clone().unwrap_or_default();
        if command.is_empty() {
            p.missing("health.exec", "must name a command to run");
            return None;
        }
        Probe::Exec { command }
    };
    let interval = opt_duration(p, "health.interval", &h.interval, 30);
    let timeout = opt_duration(p, "health.timeout", &h.timeout, 5);
    let start_period = opt_duration(p, "health.start_period", &h.start_period, 0);
    let retries = match h.retries {
        None => Some(3),
        Some(r @ 1..=100) => u32::try_from(r).ok(),
        Some(r) => {
            p.bad("health.retries", r, "allowed: a whole number from 1 to 100");
            None
        }
    };
    if let (Some(interval), Some(timeout)) = (interval, timeout) {
        if interval.is_zero() {
            p.bad(
                "health.interval",
                humantime::format_duration(interval),
                "must be longer than 0s",
            );
            return None;
        }
        if timeout.is_zero() || timeout > interval {
            p.bad(
                "health.timeout",
                humantime::format_duration(timeout),
                "allowed: longer than 0s and at most the interval",
            );
            return None;
        }
    }
    Some(Health {
        probe,
        interval: interval?,
        timeout: timeout?,
        retries: retries?,
        start_period: start_period?,
    })
}

fn opt_duration(p: &mut Problems, field: &str, value: &Option<String>, default_secs: u64) -> Option<Duration> {
    match value {
        None => Some(Duration::from_secs(default_secs)),
        Some(s) => duration(p, field, s),
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
mod tests {
    use super::super::load::parse;
    use super::super::ManifestError;
    use super::*;
    use crate::dataroot::DEFAULT_DATA_ROOT;

    const IMG: &str =
        "docker.io/library/busybox:1.36@sha256:c991fd3d8b19614fa7309525e8ccb6c0a87464f8bf6bd4dff1479b493f7308f2";

    /// A manifest for app `app` with the required fields and an image, plus `extra`.
    fn app(extra: &str) -> String {
        format!("id: app\nname: App\nversion: \"1.0\"\nimage: {IMG}\n{extra}")
    }

    /// Like [`app`] but without `image`, for the image/build rules.
    fn bare(extra: &str) -> String {
        format!("id: app\nname: App\nversion: \"1.0\"\n{extra}")
    }

    /// Parses and validates `yaml` as `/apps/<folder>/manifest.yml`.
    fn check_in(folder: &Path, data_root: &str, yaml: &str) -> Result<Manifest, Vec<ManifestError>> {
        let file = folder.join("manifest.yml");
        let raw = parse(&file, yaml).map_err(|e| vec![e])?;
        validate(
            raw,
            &Context {
                file: &file,
                app_dir: folder,
                data_root: &DataRoot::new(data_root),
            },
        )
    }

    fn check(yaml: &str) -> Result<Manifest, Vec<ManifestError>> {
        check_in(Path::new("/apps/app"), DEFAULT_DATA_ROOT, yaml)
    }

    fn ok(yaml: &str) -> Manifest {
        check(yaml).unwrap_or_else(|errs| panic!("expected a valid manifest, got {errs:#?}\n{yaml}"))
    }

    /// The error on `field`; fails when the manifest is valid or has none there.
    fn err_on(result: Result<Manifest, Vec<ManifestError>>, field: &str) -> ManifestError {
        match result {
            Ok(m) => panic!("expected an error on {field}, but the manifest is valid: {m:#?}"),
            Err(errs) => errs
                .iter()
                .find(|e| e.field == field)
                .cloned()
                .unwrap_or_else(|| panic!("no error on {field}; errors: {errs:#?}")),
        }
    }

    /// Asserts an error on `field` with `value` whose text contains `says`.
    fn assert_refused(yaml: &str, field: &str, value: Option<&str>, says: &str) {
        let e = err_on(check(yaml), field);
        assert_eq!(e.value.as_deref(), value, "value of {e}");
        assert!(e.problem.contains(says), "{e:?} should say {says:?}");
        assert!(e.to_string().contains(field), "{e} should name {field}");
        assert_eq!(e.file, Path::new("/apps/app/manifest.yml"), "{e}");
    }

    // ---- id, name, version -------------------------------------------------

    #[test]
    fn minimal_manifest_is_valid_and_keeps_its_fields() {
        let m = ok(&app(""));
        assert_eq!(m.id.as_str(), "app");
        assert_eq!(m.name, "App");
        assert_eq!(m.version, "1.0");
        assert_eq!(m.path, Path::new("/apps/app/manifest.yml"));
        assert_eq!(m.pinned_image().map(|p| p.to_string()).as_deref(), Some(IMG));
    }

    #[test]
    fn id_with_uppercase_is_refused_with_the_rule() {
        let yaml = format!("id: MyApp\nname: x\nversion: \"1\"\nimage: {IMG}\n");
        let e = err_on(check_in(Path::new("/apps/MyApp"), DEFAULT_DATA_ROOT, &yaml), "id");
        assert_eq!(e.value.as_deref(), Some("MyApp"));
        assert!(e.problem.contains("lowercase letters, digits and '-'"), "{e}");
    }

    #[test]
    fn id_with_characters_outside_the_rule_is_refused() {
        for bad in ["my_app", "my.app", "my app", "app!", "-app"] {
            let yaml = format!("id: \"{bad}\"\nname: x\nversion: \"1\"\nimage: {IMG}\n");
            let e = err_on(check_in(&Path::new("/apps").join(bad), DEFAULT_DATA_ROOT, &yaml), "id");
            assert_eq!(e.value.as_deref(), Some(bad));
            assert!(e.problem.contains("starting with a letter"), "{e}");
        }
    }

    #[test]
    fn id_starting_with_a_digit_is_refused() {
        let yaml = format!("id: \"1app\"\nname: x\nversion: \"1\"\nimage: {IMG}\n");
        let e = err_on(check_in(Path::new("/apps/1app"), DEFAULT_DATA_ROOT, &yaml), "id");
        assert_eq!(e.value.as_deref(), Some("1app"));
        assert!(e.problem.contains("starting with a letter"), "{e}");
    }

    #[test]
    fn id_of_63_characters_is_the_longest_allowed() {
        let id63 = format!("a{}", "b".repeat(62));
        let id64 = format!("a{}", "b".repeat(63));
        for (id, valid) in [(&id63, true), (&id64, false)] {
            let yaml = format!("id: {id}\nname: x\nversion: \"1\"\nimage: {IMG}\n");
            let result = check_in(&Path::new("/apps").join(id), DEFAULT_DATA_ROOT, &yaml);
            assert_eq!(result.is_ok(), valid, "{} characters", id.len());
            if !valid {
                let e = err_on(result, "id");
                assert!(e.problem.contains("at most 63 characters"), "{e}");
                assert_eq!(e.value.as_deref(), Some(id.as_str()));
            }
        }
    }

    #[test]
    fn id_must_equal_the_folder_name() {
        let e = err_on(check_in(Path::new("/apps/other"), DEFAULT_DATA_ROOT, &app("")), "id");
        assert_eq!(e.value.as_deref(), Some("app"));
        assert!(e.problem.contains("must equal the app's folder name \"other\""), "{e}");
    }

    #[test]
    fn empty_name_is_refused() {
        assert_refused(
            &format!("id: app\nname: \" \"\nversion: \"1\"\nimage: {IMG}\n"),
            "name",
            Some(" "),
            "must not be empty",
        );
    }

    #[test]
    fn empty_version_is_refused() {
        assert_refused(
            &format!("id: app\nname: App\nversion: \"\"\nimage: {IMG}\n"),
            "version",
            Some(""),
            "must not be empty",
        );
    }

    // ---- kind and container_name ---------------------------------------------

    #[test]
    fn kind_defaults_to_ui_when_the_id_ends_with_dash_ui() {
        let yaml = format!("id: wallet-ui\nname: x\nversion: \"1\"\nimage: {IMG}\n");
        let m = check_in(Path::new("/apps/wallet-ui"), DEFAULT_DATA_ROOT, &yaml).expect("valid");
        assert_eq!(m.kind, AppKind::Ui);
    }

    #[test]
    fn kind_defaults_to_service_otherwise() {
        assert_eq!(ok(&app("")).kind, AppKind::Service);
        // "-ui" must be a suffix, not just anywhere in the id.
        let yaml = format!("id: ui-gateway\nname: x\nversion: \"1\"\nimage: {IMG}\n");
        let m = check_in(Path::new("/apps/ui-gateway"), DEFAULT_DATA_ROOT, &yaml).expect("valid");
        assert_eq!(m.kind, AppKind::Service);
    }

    #[test]
    fn explicit_kind_wins_over_the_id_suffix() {
        let yaml = format!("id: admin-ui\nname: x\nversion: \"1\"\nkind: service\nimage: {IMG}\n");
        let m = check_in(Path::new("/apps/admin-ui"), DEFAULT_DATA_ROOT, &yaml).expect("valid");
        assert_eq!(m.kind, AppKind::Service);
        assert_eq!(ok(&app("kind: ui\n")).kind, AppKind::Ui);
    }

    #[test]
    fn unknown_kind_is_refused_listing_the_kinds() {
        assert_refused(&app("kind: daemon\n"), "kind", Some("daemon"), "allowed: service, ui");
    }

    #[test]
    fn container_name_is_kept_when_valid_and_refused_when_not() {
        assert_eq!(
            ok(&app("container_name: bitcoin\n")).container_name.as_deref(),
            Some("bitcoin")
        );
        assert_refused(
            &app("container_name: \"-bad name\"\n"),
            "container_name",
            Some("-bad name"),
            "starting with a letter or digit",
        );
    }

    // ---- depends_on ------------------------------------------------------------

    #[test]
    fn depends_on_keeps_ids_in_order() {
        let m = ok(&app("depends_on: [db, cache]\n"));
        let deps: Vec<&str> = m.depends_on.iter().map(AppId::as_str).collect();
        assert_eq!(deps, ["db", "cache"]);
    }

    #[test]
    fn depends_on_entry_that_is_not_an_id_is_refused() {
        assert_refused(
            &app("depends_on: [db, Bad_Dep]\n"),
            "depends_on[1]",
            Some("Bad_Dep"),
            "allowed: an app id",
        );
    }

    #[test]
    fn depends_on_listing_an_app_twice_is_refused() {
        assert_refused(
            &app("depends_on: [db, db]\n"),
            "depends_on[1]",
            Some("db"),
            "listed twice",
        );
    }

    // ---- image and build ---------------------------------------------------------

    #[test]
    fn image_with_a_tag_alone_is_refused() {
        assert_refused(
            &bare("image: docker.io/library/nginx:1.27\n"),
            "image",
            Some("docker.io/library/nginx:1.27"),
            "not pinned by digest",
        );
    }

    #[test]
    fn image_with_a_malformed_digest_is_refused() {
        assert_refused(
            &bare("image: nginx@sha256:abc123\n"),
            "image",
            Some("nginx@sha256:abc123"),
            "64 lowercase hex",
        );
    }

    #[test]
    fn image_and_build_together_are_refused() {
        assert_refused(
            &bare(&format!("image: {IMG}\nbuild: {{ context: . }}\n")),
            "image",
            None,
            "both set; allowed: exactly one",
        );
    }

    #[test]
    fn neither_image_nor_build_is_refused() {
        assert_refused(&bare(""), "image", None, "neither `image` nor `build`");
    }

    #[test]
    fn build_context_resolves_inside_the_app_folder_with_a_default_containerfile() {
        let m = ok(&bare("build: { context: ui }\n"));
        assert_eq!(
            m.image,
            ImageSource::Build {
                context: PathBuf::from("/apps/app/ui"),
                containerfile: PathBuf::from("Containerfile"),
            }
        );
        assert_eq!(m.pinned_image(), None);
    }

    #[test]
    fn build_context_leaving_the_app_folder_is_refused() {
        assert_refused(
            &bare("build: { context: ../other }\n"),
            "build.context",
            Some("../other"),
            "stays inside the app's folder",
        );
        assert_refused(
            &bare("build: { context: ui/../.. }\n"),
            "build.context",
            Some("ui/../.."),
            "stays inside the app's folder",
        );
    }

    #[test]
    fn absolute_build_context_is_refused() {
        assert_refused(
            &bare("build: { context: /srv/src }\n"),
            "build.context",
            Some("/srv/src"),
            "must be a relative path",
        );
    }

    #[cfg(unix)]
    #[test]
    fn build_context_symlinked_out_of_the_app_folder_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let folder = tmp.path().join("app");
        std::fs::create_dir_all(folder.join("inside")).expect("mkdir");
        std::os::unix::fs::symlink(tmp.path(), folder.join("escape")).expect("symlink");
        let e = err_on(
            check_in(&folder, DEFAULT_DATA_ROOT, &bare("build: { context: escape }\n")),
            "build.context",
        );
        assert_eq!(e.value.as_deref(), Some("escape"));
        let m = check_in(&folder, DEFAULT_DATA_ROOT, &bare("build: { context: inside }\n")).expect("valid");
        assert!(matches!(m.image, ImageSource::Build { ref context, .. } if context == &folder.join("inside")));
    }

    #[test]
    fn containerfile_outside_the_context_is_refused() {
        assert_refused(
            &bare("build: { context: ., containerfile: ../Containerfile }\n"),
            "build.containerfile",
            Some("../Containerfile"),
            "relative path inside the build context",
        );
        assert_refused(
            &bare("build: { context: ., containerfile: /etc/passwd }\n"),
            "build.containerfile",
            Some("/etc/passwd"),
            "relative path inside the build context",
        );
    }

    // ---- entrypoint, command, user, network ---------------------------------------

    #[test]
    fn entrypoint_and_command_are_kept_apart() {
        let m = ok(&app("entrypoint: [electrs]\ncommand: [\"--conf\", /etc/e.toml]\n"));
        assert_eq!(m.entrypoint, Some(vec!["electrs".to_owned()]));
        assert_eq!(m.command, Some(vec!["--conf".to_owned(), "/etc/e.toml".to_owned()]));
        let only_command = ok(&app("command: [run]\n"));
        assert_eq!(only_command.entrypoint, None);
        assert_eq!(only_command.command, Some(vec!["run".to_owned()]));
    }

    #[test]
    fn empty_entrypoint_is_refused_but_empty_command_is_kept() {
        assert_refused(&app("entrypoint: []\n"), "entrypoint", None, "must not be empty");
        assert_eq!(ok(&app("command: []\n")).command, Some(vec![]));
    }

    #[test]
    fn numeric_user_and_uid_gid_are_accepted() {
        assert_eq!(ok(&app("user: \"1000:1000\"\n")).user.as_deref(), Some("1000:1000"));
        assert_eq!(ok(&app("user: \"1000\"\n")).user.as_deref(), Some("1000"));
    }

    #[test]
    fn non_numeric_user_is_refused() {
        assert_refused(&app("user: bitcoin\n"), "user", Some("bitcoin"), "\"1000:1000\"");
        assert_refused(&app("user: \"1000:staff\"\n"), "user", Some("1000:staff"), "UID:GID");
    }

    #[test]
    fn network_defaults_to_archy_net() {
        assert_eq!(ok(&app("")).network, "archy-net");
        assert_eq!(ok(&app("network: lan\n")).network, "lan");
    }

    #[test]
    fn invalid_network_name_is_refused() {
        assert_refused(&app("network: \"my net\"\n"), "network", Some("my net"), "allowed:");
    }

    // ---- ports ------------------------------------------------------------------

    #[test]
    fn ports_keep_host_container_and_protocol_with_tcp_by_default() {
        let m = ok(&app(
            "ports: [{ host: 8080, container: 80 }, { host: 65535, container: 1, protocol: udp }]\n",
        ));
        assert_eq!(
            m.ports,
            [
                PortMapping {
                    host: 8080,
                    container: 80,
                    protocol: Protocol::Tcp
                },
                PortMapping {
                    host: 65535,
                    container: 1,
                    protocol: Protocol::Udp
                },
            ]
        );
    }

    #[test]
    fn port_zero_is_refused() {
        assert_refused(
            &app("ports: [{ host: 0, container: 80 }]\n"),
            "ports[0].host",
            Some("0"),
            "from 1 to 65535",
        );
    }

    #[test]
    fn port_above_65535_is_refused() {
        assert_refused(
            &app("ports: [{ host: 8080, container: 80 }, { host: 8081, container: 70000 }]\n"),
            "ports[1].container",
            Some("70000"),
            "from 1 to 65535",
        );
    }

    #[test]
    fn negative_port_is_refused() {
        assert_refused(
            &app("ports: [{ host: -80, container: 80 }]\n"),
            "ports[0].host",
            Some("-80"),
            "from 1 to 65535",
        );
    }

    #[test]
    fn unknown_protocol_is_refused() {
        assert_refused(
            &app("ports: [{ host: 8080, container: 80, protocol: sctp }]\n"),
            "ports[0].protocol",
            Some("sctp"),
            "allowed: tcp, udp",
        );
    }

    #[test]
    fn same_host_port_twice_in_one_app_is_refused_but_tcp_and_udp_may_share() {
        assert_refused(
            &app("ports: [{ host: 8080, container: 80 }, { host: 8080, container: 81 }]\n"),
            "ports[1].host",
            Some("8080"),
            "published twice",
        );
        let m = ok(&app(
            "ports: [{ host: 53, container: 53 }, { host: 53, container: 53, protocol: udp }]\n",
        ));
        assert_eq!(m.ports.len(), 2);
    }

    // ---- volumes ------------------------------------------------------------------

    #[test]
    fn volume_sources_are_app_data_names_or_absolute_inside_the_data_root() {
        let m = ok(&app(
            "volumes:\n  - { source: data, target: /data }\n  - { source: /var/lib/archipelago/other/x, target: /x, read_only: true }\n",
        ));
        assert_eq!(
            m.volumes,
            [
                VolumeMount {
                    source: VolumeSource::AppData(PathBuf::from("data")),
                    target: "/data".to_owned(),
                    read_only: false,
                },
                VolumeMount {
                    source: VolumeSource::Absolute(PathBuf::from("/var/lib/archipelago/other/x")),
                    target: "/x".to_owned(),
                    read_only: true,
                },
            ]
        );
    }

    #[test]
    fn volume_source_with_dotdot_is_refused() {
        assert_refused(
            &app("volumes: [{ source: ../other/data, target: /data }]\n"),
            "volumes[0].source",
            Some("../other/data"),
            "'..' is not allowed",
        );
        assert_refused(
            &app("volumes: [{ source: /var/lib/archipelago/../../etc, target: /data }]\n"),
            "volumes[0].source",
            Some("/var/lib/archipelago/../../etc"),
            "may not contain '..'",
        );
    }

    #[test]
    fn absolute_volume_source_outside_the_data_root_is_refused() {
        for outside in [
            "/etc",
            "/var/lib/archipelago2/x",
            "/var/lib/archipelago",
            "/var/lib/archipelago/secrets",
            "/var/lib/archipelago/state/x",
            "/var/lib/archipelago/Not-An-App/x",
        ] {
            let e = err_on(
                check(&app(&format!(
                    "volumes: [{{ source: \"{outside}\", target: /data }}]\n"
                ))),
                "volumes[0].source",
            );
            assert_eq!(e.value.as_deref(), Some(outside));
            assert!(
                e.problem
                    .contains("inside an app's folder under the data root /var/lib/archipelago"),
                "{e}"
            );
        }
    }

    #[test]
    fn data_root_is_configurable() {
        let yaml = app("volumes: [{ source: /srv/archy/app/db, target: /db }]\n");
        assert!(check_in(Path::new("/apps/app"), "/srv/archy", &yaml).is_ok());
        let e = err_on(check(&yaml), "volumes[0].source");
        assert_eq!(e.value.as_deref(), Some("/srv/archy/app/db"));
    }

    #[test]
    fn relative_volume_target_is_refused() {
        assert_refused(
            &app("volumes: [{ source: data, target: data }]\n"),
            "volumes[0].target",
            Some("data"),
            "an absolute path in the container",
        );
    }

    #[test]
    fn volume_target_mounted_twice_is_refused() {
        assert_refused(
            &app("volumes: [{ source: a, target: /data }, { source: b, target: /data/ }]\n"),
            "volumes[1].target",
            Some("/data/"),
            "mounted twice",
        );
    }

    // ---- env, secrets -------------------------------------------------------------

    #[test]
    fn env_is_kept_as_a_map() {
        let m = ok(&app("env: { RUST_LOG: info, _X1: \"\" }\n"));
        assert_eq!(m.env.get("RUST_LOG").map(String::as_str), Some("info"));
        assert_eq!(m.env.get("_X1").map(String::as_str), Some(""));
    }

    #[test]
    fn env_key_outside_the_rule_is_refused() {
        assert_refused(
            &app("env: { \"BAD-KEY\": x }\n"),
            "env.BAD-KEY",
            Some("BAD-KEY"),
            "letters, digits and '_'",
        );
        assert_refused(
            &app("env: { \"1X\": x }\n"),
            "env.1X",
            Some("1X"),
            "not starting with a digit",
        );
    }

    #[test]
    fn secret_kinds_are_hex16_and_hex32() {
        let m = ok(&app("secrets: [{ name: a, kind: hex16 }, { name: b, kind: hex32 }]\n"));
        assert_eq!(
            m.secrets,
            [
                SecretSpec {
                    name: "a".to_owned(),
                    kind: SecretKind::Hex16
                },
                SecretSpec {
                    name: "b".to_owned(),
                    kind: SecretKind::Hex32
                },
            ]
        );
    }

    #[test]
    fn unknown_secret_kind_is_refused() {
        assert_refused(
            &app("secrets: [{ name: a, kind: base64 }]\n"),
            "secrets[0].kind",
            Some("base64"),
            "allowed: hex16, hex32",
        );
    }

    #[test]
    fn secret_declared_twice_or_badly_named_is_refused() {
        assert_refused(
            &app("secrets: [{ name: a, kind: hex16 }, { name: a, kind: hex16 }]\n"),
            "secrets[1].name",
            Some("a"),
            "declared twice",
        );
        assert_refused(
            &app("secrets: [{ name: Rpc_Pass, kind: hex16 }]\n"),
            "secrets[0].name",
            Some("Rpc_Pass"),
            "lowercase letters",
        );
    }

    #[test]
    fn secret_env_maps_a_variable_to_a_declared_secret() {
        let m = ok(&app(
            "secrets: [{ name: rpc, kind: hex32 }]\nsecret_env: [{ key: RPC_PASSWORD, secret: rpc }]\n",
        ));
        assert_eq!(
            m.secret_env,
            [SecretEnv {
                key: "RPC_PASSWORD".to_owned(),
                secret: "rpc".to_owned()
            }]
        );
    }

    #[test]
    fn secret_env_naming_an_undeclared_secret_is_refused() {
        assert_refused(
            &app("secrets: [{ name: rpc, kind: hex32 }]\nsecret_env: [{ key: PASS, secret: other }]\n"),
            "secret_env[0].secret",
            Some("other"),
            "not declared in `secrets`; declared: [rpc]",
        );
    }

    #[test]
    fn secret_env_key_also_in_env_is_refused() {
        assert_refused(
            &app("env: { PASS: x }\nsecrets: [{ name: rpc, kind: hex32 }]\nsecret_env: [{ key: PASS, secret: rpc }]\n"),
            "secret_env[0].key",
            Some("PASS"),
            "also set in `env`",
        );
    }

    #[test]
    fn secret_env_key_set_twice_is_refused() {
        assert_refused(
            &app("secrets: [{ name: a, kind: hex32 }, { name: b, kind: hex16 }]\nsecret_env: [{ key: PASS, secret: a }, { key: PASS, secret: b }]\n"),
            "secret_env[1].key",
            Some("PASS"),
            "set twice",
        );
    }

    #[test]
    fn secret_env_key_outside_the_rule_is_refused() {
        assert_refused(
            &app("secrets: [{ name: a, kind: hex32 }]\nsecret_env: [{ key: \"A-B\", secret: a }]\n"),
            "secret_env[0].key",
            Some("A-B"),
            "letters, digits and '_'",
        );
    }

    // ---- resources, security --------------------------------------------------------

    #[test]
    fn memory_is_parsed_to_bytes() {
        assert_eq!(ok(&app("resources: { memory: 2Gi }\n")).memory, Some(2 << 30));
        assert_eq!(ok(&app("")).memory, None);
    }

    #[test]
    fn bad_memory_is_refused() {
        assert_refused(
            &app("resources: { memory: 2GB }\n"),
            "resources.memory",
            Some("2GB"),
            "such as 512Mi or 2Gi",
        );
        assert_refused(
            &app("resources: { memory: 1Mi }\n"),
            "resources.memory",
            Some("1Mi"),
            "at least 6Mi",
        );
    }

    #[test]
    fn security_defaults_are_read_only_root_and_no_new_privileges() {
        assert_eq!(
            ok(&app("")).security,
            Security {
                capabilities_add: vec![],
                read_only_root: true,
                no_new_privileges: true
            }
        );
        // A security block that sets neither keeps both on.
        let s = ok(&app("security: { capabilities_add: [CHOWN] }\n")).security;
        assert!(s.read_only_root && s.no_new_privileges);
        let off = ok(&app("security: { read_only_root: false, no_new_privileges: false }\n")).security;
        assert!(!off.read_only_root && !off.no_new_privileges);
    }

    #[test]
    fn capability_names_are_upper_cased_without_cap_prefix_and_deduplicated() {
        let m = ok(&app(
            "security: { capabilities_add: [cap_net_bind_service, CAP_CHOWN, Dac_Override, NET_BIND_SERVICE] }\n",
        ));
        assert_eq!(
            m.security.capabilities_add,
            ["NET_BIND_SERVICE", "CHOWN", "DAC_OVERRIDE"]
        );
    }

    #[test]
    fn unknown_capability_is_refused() {
        assert_refused(
            &app("security: { capabilities_add: [CHOWN, CAP_FLY] }\n"),
            "security.capabilities_add[1]",
            Some("CAP_FLY"),
            "Linux capability name",
        );
        assert_refused(
            &app("security: { capabilities_add: [ALL] }\n"),
            "security.capabilities_add[0]",
            Some("ALL"),
            "Linux capability name",
        );
    }

    // ---- health, stop_grace_period ------------------------------------------------

    #[test]
    fn health_defaults_are_30s_interval_5s_timeout_3_retries_no_start_period() {
        let h = ok(&app("health: { tcp: { port: 5432 } }\n")).health.expect("health");
        assert_eq!(
            h,
            Health {
                probe: Probe::Tcp { port: 5432 },
                interval: Duration::from_secs(30),
                timeout: Duration::from_secs(5),
                retries: 3,
                start_period: Duration::ZERO,
            }
        );
        assert_eq!(ok(&app("")).health, None);
    }

    #[test]
    fn health_fields_are_parsed() {
        let h = ok(&app(
            "health:\n  exec: [pg_isready, -q]\n  interval: 1m30s\n  timeout: 10s\n  retries: 100\n  start_period: 2m\n",
        ))
        .health
        .expect("health");
        assert_eq!(
            h.probe,
            Probe::Exec {
                command: vec!["pg_isready".to_owned(), "-q".to_owned()]
            }
        );
        assert_eq!(h.interval, Duration::from_secs(90));
        assert_eq!(h.timeout, Duration::from_secs(10));
        assert_eq!(h.retries, 100);
        assert_eq!(h.start_period, Duration::from_secs(120));
    }

    #[test]
    fn http_probe_path_defaults_to_slash_and_full_urls_are_kept() {
        let probe = |yaml: &str| ok(&app(yaml)).health.expect("health").probe;
        assert_eq!(
            probe("health: { http: { port: 80 } }\n"),
            Probe::Http {
                port: 80,
                target: "/".to_owned()
            }
        );
        assert_eq!(
            probe("health: { http: { port: 80, path: \"http://localhost:80/ping\" } }\n"),
            Probe::Http {
                port: 80,
                target: "http://localhost:80/ping".to_owned()
            }
        );
    }

    #[test]
    fn health_with_two_probes_is_refused() {
        assert_refused(
            &app("health: { tcp: { port: 1 }, exec: [true] }\n"),
            "health",
            None,
            "sets 2 probes; allowed: exactly one of http, tcp, exec",
        );
    }

    #[test]
    fn health_with_no_probe_is_refused() {
        assert_refused(
            &app("health: { interval: 10s }\n"),
            "health",
            None,
            "sets 0 probes; allowed: exactly one",
        );
    }

    #[test]
    fn empty_exec_probe_is_refused() {
        assert_refused(
            &app("health: { exec: [] }\n"),
            "health.exec",
            None,
            "must name a command",
        );
    }

    #[test]
    fn http_probe_path_without_slash_or_scheme_is_refused() {
        assert_refused(
            &app("health: { http: { port: 80, path: health } }\n"),
            "health.http.path",
            Some("health"),
            "starting with '/'",
        );
    }

    #[test]
    fn probe_port_out_of_range_is_refused() {
        assert_refused(
            &app("health: { http: { port: 0 } }\n"),
            "health.http.port",
            Some("0"),
            "from 1 to 65535",
        );
        assert_refused(
            &app("health: { tcp: { port: 65536 } }\n"),
            "health.tcp.port",
            Some("65536"),
            "from 1 to 65535",
        );
    }

    #[test]
    fn bad_duration_is_refused() {
        assert_refused(
            &app("health: { tcp: { port: 1 }, interval: soon }\n"),
            "health.interval",
            Some("soon"),
            "such as 30s, 5m or 1m30s",
        );
        assert_refused(
            &app("health: { tcp: { port: 1 }, start_period: 30 }\n"),
            "health.start_period",
            Some("30"),
            "duration",
        );
        assert_refused(
            &app("stop_grace_period: 25h\n"),
            "stop_grace_period",
            Some("25h"),
            "up to 24h",
        );
    }

    #[test]
    fn retries_outside_1_to_100_are_refused() {
        for bad in ["0", "101", "-1"] {
            assert_refused(
                &app(&format!("health: {{ tcp: {{ port: 1 }}, retries: {bad} }}\n")),
                "health.retries",
                Some(bad),
                "from 1 to 100",
            );
        }
    }

    #[test]
    fn zero_interval_and_timeout_longer_than_interval_are_refused() {
        assert_refused(
            &app("health: { tcp: { port: 1 }, interval: 0s }\n"),
            "health.interval",
            Some("0s"),
            "longer than 0s",
        );
        assert_refused(
            &app("health: { tcp: { port: 1 }, interval: 10s, timeout: 20s }\n"),
            "health.timeout",
            Some("20s"),
            "at most the interval",
        );
    }

    #[test]
    fn stop_grace_period_defaults_to_30s() {
        assert_eq!(ok(&app("")).stop_grace_period, Duration::from_secs(30));
        assert_eq!(
            ok(&app("stop_grace_period: 2m\n")).stop_grace_period,
            Duration::from_secs(120)
        );
    }

    // ---- files ----------------------------------------------------------------

    /// An app with a `data` volume, a secret `pw` and `files` as given.
    fn with_files(files: &str) -> String {
        app(&format!(
            "volumes: [{{ source: data, target: /data }}]\nsecrets: [{{ name: rpc-pw, kind: hex32 }}]\nfiles:\n{files}"
        ))
    }

    #[test]
    fn files_keep_path_mode_template_and_the_secrets_they_read() {
        let m = ok(&with_files(
            "  - { path: data/a.conf, template: \"pw={{ secrets.rpc_pw }}\" }\n  - { path: data/sub/b.conf, mode: \"0644\", template: \"{{ facts.container }}\" }\n",
        ));
        assert_eq!(m.files.len(), 2);
        assert_eq!(
            (m.files[0].path.as_path(), m.files[0].mode),
            (Path::new("data/a.conf"), 0o600)
        );
        assert_eq!(m.files[0].secrets, ["rpc-pw"]);
        assert_eq!((m.files[1].mode, m.files[1].secrets.len()), (0o644, 0));
    }

    #[test]
    fn file_paths_must_lie_inside_a_named_volume() {
        for bad in ["../x.conf", "/etc/x.conf", "other/x.conf", "data", "data/../x"] {
            assert_refused(
                &with_files(&format!("  - {{ path: \"{bad}\", template: x }}\n")),
                "files[0].path",
                Some(bad),
                "inside one of this app's named volumes [data]",
            );
        }
        assert_refused(
            &with_files("  - { path: data/a, template: x }\n  - { path: data/a, template: y }\n"),
            "files[1].path",
            Some("data/a"),
            "rendered twice",
        );
    }

    #[test]
    fn a_template_naming_an_unknown_secret_or_fact_is_refused() {
        assert_refused(
            &with_files("  - { path: data/a, template: \"{{ secrets.rpc_password }}\" }\n"),
            "files[0].template",
            Some("secrets.rpc_password"),
            "unknown secret (declare it in `secrets`); allowed: [secrets.rpc_pw]",
        );
        assert_refused(
            &with_files("  - { path: data/a, template: \"{{ facts.ip }}\" }\n"),
            "files[0].template",
            Some("facts.ip"),
            "unknown fact; allowed: [facts.app, facts.container",
        );
    }

    #[test]
    fn facts_name_the_containers_of_dependencies_only() {
        let yaml = with_files("  - { path: data/a, template: \"{{ facts.containers.store_db }}\" }\n");
        assert_refused(
            &yaml,
            "files[0].template",
            Some("facts.containers.store_db"),
            "unknown fact",
        );
        ok(&format!("{yaml}depends_on: [store-db]\n"));
    }

    #[test]
    fn a_file_holding_secrets_may_not_be_readable_by_others_and_modes_are_a_short_list() {
        assert_refused(
            &with_files("  - { path: data/a, mode: \"0644\", template: \"{{ secrets.rpc_pw }}\" }\n"),
            "files[0].mode",
            Some("0644"),
            "holds secrets",
        );
        assert_refused(
            &with_files("  - { path: data/a, mode: \"0755\", template: x }\n"),
            "files[0].mode",
            Some("0755"),
            "one of \"0600\"",
        );
    }

    #[test]
    fn every_problem_in_one_manifest_is_reported() {
        let errs = check(&app(
            "kind: daemon\nuser: root\nports: [{ host: 0, container: 80 }]\nresources: { memory: lots }\n",
        ))
        .expect_err("invalid");
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["kind", "user", "ports[0].host", "resources.memory"]);
        assert!(errs.iter().all(|e| e.file == Path::new("/apps/app/manifest.yml")));
    }

    #[test]
    fn memory_sizes_parse_with_binary_and_decimal_suffixes() {
        assert_eq!(parse_memory("2Gi"), Some(2 << 30));
        assert_eq!(parse_memory("512Mi"), Some(512 << 20));
        assert_eq!(parse_memory("1G"), Some(1_000_000_000));
        assert_eq!(parse_memory("4096"), Some(4096));
        assert_eq!(parse_memory("2GB"), None);
        assert_eq!(parse_memory("Gi"), None);
        assert_eq!(parse_memory("99999999999999Gi"), None);
    }

    #[test]
    fn users_are_numeric() {
        assert!(valid_user("1000"));
        assert!(valid_user("1000:1000"));
        assert!(!valid_user("bitcoin"));
        assert!(!valid_user("1000:"));
    }

    #[test]
    fn relative_paths_may_not_climb() {
        assert!(relative_without_dotdot("ui"));
        assert!(relative_without_dotdot("./ui/sub"));
        assert!(!relative_without_dotdot("../other"));
        assert!(!relative_without_dotdot("ui/../../x"));
        assert!(!relative_without_dotdot("/abs"));
    }
}
