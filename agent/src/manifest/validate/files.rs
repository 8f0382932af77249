//! The rules of an app's config files (`files:`).

use std::path::Path;

use super::super::error::Problems;
use super::super::raw::RawFile;
use super::super::template::{self, template_key};
use super::super::{AppId, ConfigFile, SecretSpec, VolumeMount, VolumeSource};
use super::relative_without_dotdot;

/// File modes a config file may have: readable by its owner, maybe its
/// group and others, writable by its owner at most, never executable.
const FILE_MODES: &[u32] = &[0o400, 0o440, 0o444, 0o600, 0o640, 0o644];

pub(super) fn validate_files(
    p: &mut Problems,
    raw: &[RawFile],
    id: &str,
    network: &str,
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
        let uses = match template::check(&f.template, network, secrets, &containers) {
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
