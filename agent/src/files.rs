//! Config files (`files` in a manifest): rendered from their templates with
//! the app's secrets and the node's facts, written into the app's data
//! folder atomically, and only when their bytes changed.
//!
//! Install renders them before the container is created; every reconcile
//! pass renders them again, and an app whose files changed is restarted
//! (the planner decides that from what the pass found). A secret rotated on
//! disk therefore reaches every app whose config holds it.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};

use crate::appdir::{AppDir, ConfineError, Entry};
use crate::dataroot::DataRoot;
use crate::manifest::template::{self, template_key, Facts};
use crate::manifest::{Manifest, Naming};
use crate::ownership::Ownership;
use crate::secrets::{ensure_secret, read_secret};

/// The kernel's host name, for `facts.hostname`.
const HOSTNAME_FILE: &str = "/proc/sys/kernel/hostname";

/// How a rendered file differs from what is on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Same bytes, mode and owner.
    None,
    /// Same bytes; the mode or owner is to be set again. No restart needed.
    Metadata,
    /// New bytes (or no file yet): written, and the app restarted.
    Content,
}

/// One config file, rendered and compared with the disk.
#[derive(Debug, Clone)]
pub struct Rendered {
    /// As the manifest names it, relative to the app's data folder.
    pub rel: PathBuf,
    pub path: PathBuf,
    bytes: Vec<u8>,
    mode: u32,
    owner: Option<(u32, u32)>,
    pub change: Change,
}

/// The facts `m`'s templates see.
pub fn facts(m: &Manifest, all: &[Manifest], naming: &Naming) -> anyhow::Result<Facts> {
    let hostname = fs::read_to_string(HOSTNAME_FILE)
        .with_context(|| format!("cannot read the host name from {HOSTNAME_FILE}"))?
        .trim()
        .to_owned();
    let containers = std::iter::once(m)
        .chain(all.iter().filter(|a| m.depends_on.contains(&a.id)))
        .map(|a| (template_key(a.id.as_str()), naming.container_name(a)))
        .collect();
    Ok(Facts {
        app: m.id.to_string(),
        container: naming.container_name(m),
        network: m.network.clone(),
        network_subnet: crate::manifest::network_subnet(&m.network).map(str::to_owned),
        dev: matches!(naming, Naming::Dev { .. }),
        hostname,
        containers,
    })
}

/// Renders every file of `m` and compares it with the disk. With
/// `generate`, secrets not there yet are generated (as install does);
/// without it, a missing secret is an error and nothing is written.
pub fn render_app(
    data_root: &DataRoot,
    m: &Manifest,
    all: &[Manifest],
    naming: &Naming,
    generate: bool,
) -> anyhow::Result<Vec<Rendered>> {
    if m.files.is_empty() {
        return Ok(Vec::new());
    }
    let facts = facts(m, all, naming)?;
    let app_dir = data_root.app_dir(&m.id);
    let app = AppDir::open(data_root, &m.id)?;
    let owner = m.owner();
    let mut out = Vec::new();
    for (i, file) in m.files.iter().enumerate() {
        let mut values = std::collections::BTreeMap::new();
        for name in &file.secrets {
            let spec = m
                .secrets
                .iter()
                .find(|s| &s.name == name)
                .with_context(|| format!("{}: files[{i}] reads secret {name}, which it does not declare", m.id))?;
            let path = if generate {
                ensure_secret(data_root, spec)?
            } else {
                data_root.secret(name)
            };
            values.insert(name.clone(), read_secret(&path)?);
        }
        let text = template::render(&file.template, &values, &facts)
            .map_err(|e| anyhow::anyhow!("{}: files[{i}] ({}): the template {e}", m.id, file.path.display()))?;
        let path = app_dir.join(&file.path);
        // What the file must be on the host: rootless, the container's
        // uid through the mapping, the agent's group (see `Ownership`).
        let (mode, host_owner) = match owner {
            Some((uid, gid)) => {
                let t = Ownership::current()?.target(uid, gid, file.mode, false)?;
                (t.mode, Some((t.uid, t.gid)))
            }
            None => (file.mode, None),
        };
        let change = compare(app.as_ref(), &file.path, text.as_bytes(), mode, host_owner)
            .with_context(|| format!("{}: cannot compare {} with its template", m.id, path.display()))?;
        out.push(Rendered {
            rel: file.path.clone(),
            path,
            bytes: text.into_bytes(),
            mode: file.mode,
            owner,
            change,
        });
    }
    Ok(out)
}

/// What writing `bytes` with `mode` and `owner` to `rel` below the app's
/// folder would change, looked at through the confined walk. A symlink or
/// anything but a plain file there counts as a change: the write replaces
/// it, never follows it. A symlinked folder on the way is an error.
fn compare(
    app: Option<&AppDir>,
    rel: &Path,
    bytes: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> anyhow::Result<Change> {
    let Some(app) = app else {
        return Ok(Change::Content);
    };
    let (parent, name) = split(rel)?;
    let dir = match app.dir(parent) {
        Ok(dir) => dir,
        Err(ConfineError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => return Ok(Change::Content),
        Err(e) => return Err(e.into()),
    };
    // Larger than the rendering: it differs, and is not read.
    let Entry::File { stat, bytes: on_disk } = dir.read(name, bytes.len() as u64)? else {
        return Ok(Change::Content);
    };
    if on_disk != bytes {
        return Ok(Change::Content);
    }
    let owner_ok = owner.is_none_or(|(uid, gid)| stat.st_uid == uid && stat.st_gid == gid);
    if stat.st_mode & 0o7777 != mode || !owner_ok {
        return Ok(Change::Metadata);
    }
    Ok(Change::None)
}

/// A file's folder and name, as the manifest names it (validated: plain
/// names only; the confined walk refuses anything else anyway).
fn split(rel: &Path) -> anyhow::Result<(&Path, &Path)> {
    match (rel.parent(), rel.file_name()) {
        (Some(parent), Some(name)) => Ok((parent, Path::new(name))),
        _ => bail!("{} is not a file path below the app's folder", rel.display()),
    }
}

/// Opens (making what is missing) the folder of `rel` below the app's
/// folder, through the confined walk: a symlink on the way is refused, and
/// each folder made is given to the app's user.
fn confined_parent<'r>(app: &AppDir, rel: &'r Path, owner: Option<(u32, u32)>) -> anyhow::Result<(AppDir, &'r Path)> {
    let (parent, name) = split(rel)?;
    let dir = app.ensure_dir(parent, |made| match owner {
        Some((uid, gid)) => Ownership::current()?.give_in(made, Path::new(""), uid, gid),
        None => Ok(()),
    })?;
    Ok((dir, name))
}

/// Writes what `render_app` found changed: new bytes atomically, with mode
/// and owner set before the file takes its name; a changed mode or owner
/// alone is set in place, on a descriptor. All of it through the app's
/// [`AppDir`].
pub fn apply(data_root: &DataRoot, m: &Manifest, rendered: &[Rendered]) -> anyhow::Result<()> {
    if rendered.iter().all(|r| r.change == Change::None) {
        return Ok(());
    }
    let app = AppDir::create(data_root, &m.id)?;
    let ownership = Ownership::current()?;
    for r in rendered {
        let result = (|| -> anyhow::Result<()> {
            match r.change {
                Change::None => {}
                // Rootless, the agent may not chmod a file the container
                // owns: it writes the file anew instead.
                Change::Content | Change::Metadata if ownership.is_rootless() && r.owner.is_some() => {
                    let (dir, name) = confined_parent(&app, &r.rel, r.owner)?;
                    let (uid, gid) = r.owner.context("checked above")?;
                    let target = ownership.target(uid, gid, r.mode, false)?;
                    dir.write_atomic(name, &r.bytes, target.mode, None)?;
                    ownership.give_as_in(&dir, name, uid, &target)?;
                    tracing::info!(app = %m.id, file = %r.rel.display(), "config file rendered");
                }
                Change::Content => {
                    let (dir, name) = confined_parent(&app, &r.rel, r.owner)?;
                    dir.write_atomic(name, &r.bytes, r.mode, r.owner)?;
                    tracing::info!(app = %m.id, file = %r.rel.display(), "config file rendered");
                }
                Change::Metadata => {
                    let (dir, name) = confined_parent(&app, &r.rel, r.owner)?;
                    dir.set_meta(name, Some(r.mode), r.owner)?;
                }
            }
            Ok(())
        })();
        result.with_context(|| format!("{}: cannot write {}", m.id, r.path.display()))?;
    }
    Ok(())
}

/// Renders and writes `m`'s files, generating missing secrets. Returns the
/// files whose bytes changed, as the manifest names them.
pub fn sync(data_root: &DataRoot, m: &Manifest, all: &[Manifest], naming: &Naming) -> anyhow::Result<Vec<String>> {
    let rendered = render_app(data_root, m, all, naming, true)?;
    apply(data_root, m, &rendered)?;
    Ok(changed(&rendered))
}

/// The files whose bytes change, as the manifest names them.
pub fn changed(rendered: &[Rendered]) -> Vec<String> {
    rendered
        .iter()
        .filter(|r| r.change == Change::Content)
        .map(|r| r.rel.display().to_string())
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::os::unix::fs::{symlink, PermissionsExt};

    use super::*;
    use crate::manifest::{load_file, LoadOptions};

    const IMG: &str =
        "docker.io/library/busybox:1.36@sha256:c991fd3d8b19614fa7309525e8ccb6c0a87464f8bf6bd4dff1479b493f7308f2";

    /// Loads an app `conf` with one file, `data/app.conf`, from `template`.
    fn app(tmp: &Path, template: &str) -> Manifest {
        let dir = tmp.join("apps").join("conf");
        fs::create_dir_all(&dir).unwrap();
        let yaml = format!(
            "id: conf\nname: conf\nversion: \"1\"\nimage: {IMG}\nvolumes: [{{ source: data, target: /data }}]\n\
             secrets: [{{ name: pw, kind: hex16 }}]\nfiles:\n  - path: data/app.conf\n    template: {template:?}\n"
        );
        fs::write(dir.join("manifest.yml"), yaml).unwrap();
        let opts = LoadOptions {
            data_root: DataRoot::new(tmp.join("data")),
        };
        load_file(&dir.join("manifest.yml"), &opts).unwrap()
    }

    #[test]
    fn a_file_is_written_once_and_rewritten_only_when_its_secret_changes() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let m = app(tmp.path(), "pw={{ secrets.pw }}\n");
        let all = [m.clone()];
        assert_eq!(
            sync(&DataRoot::new(&data), &m, &all, &Naming::Prod).unwrap(),
            ["data/app.conf"]
        );
        let path = data.join("conf/data/app.conf");
        let first = fs::read_to_string(&path).unwrap();
        let secret = read_secret(&DataRoot::new(&data).secret("pw")).unwrap();
        assert_eq!(first, format!("pw={secret}\n"));
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o7777, 0o600);
        let mtime = fs::metadata(&path).unwrap().modified().unwrap();

        assert!(
            sync(&DataRoot::new(&data), &m, &all, &Naming::Prod).unwrap().is_empty(),
            "unchanged"
        );
        assert_eq!(fs::metadata(&path).unwrap().modified().unwrap(), mtime, "not touched");

        fs::write(DataRoot::new(&data).secret("pw"), "0123456789abcdef0123456789abcdef").unwrap();
        assert_eq!(
            sync(&DataRoot::new(&data), &m, &all, &Naming::Prod).unwrap(),
            ["data/app.conf"]
        );
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            "pw=0123456789abcdef0123456789abcdef\n"
        );
    }

    #[test]
    fn a_changed_mode_is_set_again_without_counting_as_a_change() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let m = app(tmp.path(), "static\n");
        sync(&DataRoot::new(&data), &m, std::slice::from_ref(&m), &Naming::Prod).unwrap();
        let path = data.join("conf/data/app.conf");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).unwrap();
        assert!(sync(&DataRoot::new(&data), &m, std::slice::from_ref(&m), &Naming::Prod)
            .unwrap()
            .is_empty());
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o7777, 0o600);
    }

    #[test]
    fn a_symlinked_folder_inside_the_volume_is_never_written_through() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let outside = tmp.path().join("outside");
        fs::create_dir_all(&outside).unwrap();
        fs::create_dir_all(data.join("conf")).unwrap();
        // The container replaced its volume folder with a link out.
        symlink(&outside, data.join("conf/data")).unwrap();
        let m = app(tmp.path(), "static\n");
        let err = sync(&DataRoot::new(&data), &m, std::slice::from_ref(&m), &Naming::Prod).unwrap_err();
        assert!(
            format!("{err:#}").contains(&format!("{} is a symlink", data.join("conf/data").display())),
            "{err:#}"
        );
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0, "nothing written outside");
    }

    #[test]
    fn a_symlink_in_place_of_the_file_is_replaced_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let target = tmp.path().join("victim");
        fs::write(&target, "keep").unwrap();
        fs::create_dir_all(data.join("conf/data")).unwrap();
        symlink(&target, data.join("conf/data/app.conf")).unwrap();
        let m = app(tmp.path(), "static\n");
        assert_eq!(
            sync(&DataRoot::new(&data), &m, std::slice::from_ref(&m), &Naming::Prod).unwrap(),
            ["data/app.conf"]
        );
        assert_eq!(fs::read_to_string(&target).unwrap(), "keep");
        let path = data.join("conf/data/app.conf");
        assert!(fs::symlink_metadata(&path).unwrap().is_file());
        assert_eq!(fs::read_to_string(&path).unwrap(), "static\n");
    }

    #[test]
    fn without_generate_a_missing_secret_is_an_error_and_nothing_is_written() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let m = app(tmp.path(), "pw={{ secrets.pw }}\n");
        assert!(render_app(
            &DataRoot::new(&data),
            &m,
            std::slice::from_ref(&m),
            &Naming::Prod,
            false
        )
        .is_err());
        assert!(!DataRoot::new(&data).secret("pw").exists());
        assert!(!data.join("conf/data/app.conf").exists());
    }

    #[test]
    fn facts_name_the_dev_container_of_the_app_and_its_dependencies() {
        let tmp = tempfile::tempdir().unwrap();
        let m = app(tmp.path(), "{{ facts.container }}\n");
        let f = facts(&m, std::slice::from_ref(&m), &Naming::dev()).unwrap();
        assert_eq!(f.container, "conf-dev");
        assert_eq!(f.containers.get("conf").map(String::as_str), Some("conf-dev"));
        assert!(f.dev);
        assert!(!f.hostname.is_empty());
    }
}
