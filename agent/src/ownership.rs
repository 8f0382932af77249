//! Who owns an app's files on the host.
//!
//! A manifest's `user` is a uid inside the container. A rootful engine
//! sees it as the same uid on the host. A rootless engine, the node's
//! default, maps it through the agent user's subordinate ids: container
//! uid 0 is the user itself and uid N ≥ 1 is `start + N - 1` of its
//! `/etc/subuid` range (likewise for gids). The agent runs as that user and
//! may not chown to a subordinate id itself; `podman unshare` may, because
//! it runs in the same user namespace as the containers.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{bail, Context as _};

use crate::appdir::AppDir;

const SUBUID: &str = "/etc/subuid";
const SUBGID: &str = "/etc/subgid";
const PASSWD: &str = "/etc/passwd";

/// A user's subordinate id range, as in `/etc/subuid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    pub start: u32,
    pub count: u32,
}

/// How container ids become host ids for this agent's engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ownership {
    /// The agent runs as root and so does the engine: ids are the same.
    Rootful,
    /// The agent runs as `uid:gid` with these subordinate ranges.
    Rootless {
        uid: u32,
        gid: u32,
        subuid: IdRange,
        subgid: IdRange,
    },
}

impl Ownership {
    /// The mapping of the running process, found once.
    pub fn current() -> anyhow::Result<&'static Ownership> {
        static CURRENT: OnceLock<Result<Ownership, String>> = OnceLock::new();
        CURRENT
            .get_or_init(|| Ownership::detect().map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|e| anyhow::anyhow!("{e}"))
    }

    fn detect() -> anyhow::Result<Ownership> {
        // `/proc/self` belongs to the process's effective ids.
        let me = fs::metadata("/proc/self").context("cannot read /proc/self to learn the agent's uid")?;
        let (uid, gid) = (me.uid(), me.gid());
        if uid == 0 {
            return Ok(Ownership::Rootful);
        }
        let passwd = read(PASSWD)?;
        let name = user_name(&passwd, uid);
        let subuid =
            find_range(&read(SUBUID)?, name.as_deref(), uid).with_context(|| no_range(SUBUID, uid, name.as_deref()))?;
        let subgid =
            find_range(&read(SUBGID)?, name.as_deref(), uid).with_context(|| no_range(SUBGID, uid, name.as_deref()))?;
        Ok(Ownership::Rootless {
            uid,
            gid,
            subuid,
            subgid,
        })
    }

    /// The host ids a container's `uid:gid` owns files as.
    pub fn host_ids(&self, uid: u32, gid: u32) -> anyhow::Result<(u32, u32)> {
        match self {
            Ownership::Rootful => Ok((uid, gid)),
            Ownership::Rootless {
                uid: me,
                gid: my_gid,
                subuid,
                subgid,
            } => Ok((map(uid, *me, *subuid, "uid")?, map(gid, *my_gid, *subgid, "gid")?)),
        }
    }

    /// The host ids and mode an app's file or folder gets for the
    /// container's `uid:gid` and the declared `mode`. Rootless, the group is
    /// the agent's own (gid 0 inside the container) with group read (and
    /// write and search on folders): the agent, which may not chown or
    /// chmod a file once it is the container's, can still compare, replace
    /// and create files in the app's folders.
    pub fn target(&self, uid: u32, gid: u32, mode: u32, dir: bool) -> anyhow::Result<Target> {
        Ok(match self {
            Ownership::Rootful => Target {
                uid,
                gid,
                mode,
                ns_gid: gid,
            },
            Ownership::Rootless { gid: my_gid, .. } => Target {
                uid: self.host_ids(uid, 0)?.0,
                gid: *my_gid,
                mode: mode | if dir { 0o070 } else { 0o040 },
                ns_gid: 0,
            },
        })
    }

    pub fn is_rootless(&self) -> bool {
        matches!(self, Ownership::Rootless { .. })
    }

    /// Gives `rel` below `dir` (empty: `dir` itself) to the container's
    /// `uid:gid`, keeping its mode bits (see [`Self::target`]). Everything
    /// happens on descriptors of the confined walk ([`AppDir`]).
    pub fn give_in(&self, dir: &AppDir, rel: &Path, uid: u32, gid: u32) -> anyhow::Result<()> {
        let stat = dir.stat(rel)?;
        let is_dir = rustix::fs::FileType::from_raw_mode(stat.st_mode) == rustix::fs::FileType::Directory;
        self.give_as_in(dir, rel, uid, &self.target(uid, gid, stat.st_mode & 0o7777, is_dir)?)
    }

    /// Sets the owner and mode of `rel` below `dir` to `target` where they
    /// differ, on a descriptor opened by the confined walk. Rootful, the
    /// agent does it itself. Rootless, the agent sets the mode of a file it
    /// still owns, and the rest runs inside the user namespace: `podman
    /// unshare` starts the agent's own binary (`confine-give`), which opens
    /// the app's folder and walks to `rel` the same confined way.
    pub fn give_as_in(&self, dir: &AppDir, rel: &Path, uid: u32, target: &Target) -> anyhow::Result<()> {
        let stat = dir.stat(rel)?;
        if (stat.st_uid, stat.st_gid, stat.st_mode & 0o7777) == (target.uid, target.gid, target.mode) {
            return Ok(());
        }
        let full = dir.path().join(rel);
        match self {
            Ownership::Rootful => dir
                .set_meta(rel, Some(target.mode), Some((target.uid, target.gid)))
                .with_context(|| format!("cannot give {} to uid {uid}", full.display())),
            Ownership::Rootless { .. } => {
                if stat.st_uid == self.own_uid() {
                    dir.set_meta(rel, Some(target.mode), None)
                        .with_context(|| format!("cannot set mode {:o} on {}", target.mode, full.display()))?;
                }
                let rel_to_root = dir.rel().join(rel);
                confine_give_in_namespace(dir.root(), &rel_to_root, uid, target.ns_gid, target.mode)
            }
        }
    }

    /// Gives an app's copy of a secret to the container's `uid`, read-only:
    /// mode 0400, or 0440 rootless (group: the agent, see [`Self::target`]).
    pub fn give_secret(&self, path: &Path, uid: u32, gid: u32) -> anyhow::Result<()> {
        let target = self.target(uid, gid, 0o400, false)?;
        self.give_as(path, uid, &target)
    }

    /// Sets `path`'s owner and mode to `target` where they differ. The mode
    /// is set first, while the agent may still own the file.
    pub fn give_as(&self, path: &Path, uid: u32, target: &Target) -> anyhow::Result<()> {
        let md = fs::symlink_metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
        if md.permissions().mode() & 0o7777 != target.mode && !md.file_type().is_symlink() {
            if self.is_rootless() && md.uid() != self.own_uid() {
                self.unshare(&["chmod", &format!("{:o}", target.mode)], path)?;
            } else {
                fs::set_permissions(path, fs::Permissions::from_mode(target.mode))
                    .with_context(|| format!("cannot set mode {:o} on {}", target.mode, path.display()))?;
            }
        }
        if (md.uid(), md.gid()) == (target.uid, target.gid) {
            return Ok(());
        }
        match self {
            Ownership::Rootful => std::os::unix::fs::lchown(path, Some(target.uid), Some(target.gid))
                .with_context(|| format!("cannot give {} to uid {uid}", path.display())),
            Ownership::Rootless { .. } => self.unshare(
                &["chown", "--no-dereference", &format!("{uid}:{}", target.ns_gid)],
                path,
            ),
        }
    }

    fn own_uid(&self) -> u32 {
        match self {
            Ownership::Rootful => 0,
            Ownership::Rootless { uid, .. } => *uid,
        }
    }

    /// Runs `args path` inside the rootless user namespace, where the
    /// containers' ids are ours to give.
    fn unshare(&self, args: &[&str], path: &Path) -> anyhow::Result<()> {
        let output = Command::new("podman")
            .arg("unshare")
            .args(args)
            .arg(path)
            .output()
            .context("cannot run `podman unshare` (package podman) to give files to a container user")?;
        if !output.status.success() {
            bail!(
                "podman unshare {} {}: {}",
                args.join(" "),
                path.display(),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(())
    }
}

/// Runs `archy-agent confine-give` under `podman unshare`: the confined
/// walk from the app's folder `root` to `rel`, then `fchmod` and `fchown` to
/// the container's `uid:gid` on the opened descriptor, inside the user
/// namespace where those ids are the agent's to give. A descriptor cannot
/// cross into `podman unshare`, so the walk itself does.
fn confine_give_in_namespace(root: &Path, rel: &Path, uid: u32, gid: u32, mode: u32) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot find the agent's own binary for `podman unshare`")?;
    let output = Command::new("podman")
        .arg("unshare")
        .arg(exe)
        .arg("confine-give")
        .arg("--app-dir")
        .arg(root)
        .arg("--path")
        .arg(rel)
        .args(["--uid", &uid.to_string(), "--gid", &gid.to_string()])
        .args(["--mode", &format!("{mode:o}")])
        .output()
        .context("cannot run `podman unshare` (package podman) to give files to a container user")?;
    if !output.status.success() {
        bail!(
            "podman unshare confine-give {}: {}",
            root.join(rel).display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// What `confine-give` does inside the user namespace: opens the app's
/// folder `root`, walks to `rel` without following anything, and sets
/// `mode` and `uid:gid` (namespace ids) on the descriptor.
pub fn confine_give(root: &Path, rel: &Path, uid: u32, gid: u32, mode: u32) -> anyhow::Result<()> {
    AppDir::open_root(root)?.set_meta(rel, Some(mode), Some((uid, gid)))?;
    Ok(())
}

/// What an app's file or folder should be on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
    /// The group inside the container's namespace (for `podman unshare`).
    ns_gid: u32,
}

fn read(path: &str) -> anyhow::Result<String> {
    fs::read_to_string(path).with_context(|| format!("cannot read {path}"))
}

fn no_range(file: &str, uid: u32, name: Option<&str>) -> String {
    format!(
        "the agent runs rootless as uid {uid}{} but {file} has no range for it; \
         rootless containers need one (usermod --add-subuids/--add-subgids)",
        name.map(|n| format!(" ({n})")).unwrap_or_default()
    )
}

/// The login name of `uid` in passwd text.
fn user_name(passwd: &str, uid: u32) -> Option<String> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let id = fields.nth(1)?;
        (id.parse() == Ok(uid)).then(|| name.to_owned())
    })
}

/// The first range of `name` (or of the numeric `uid`) in subuid/subgid text.
fn find_range(text: &str, name: Option<&str>, uid: u32) -> Option<IdRange> {
    let uid = uid.to_string();
    text.lines().find_map(|line| {
        let mut fields = line.trim().split(':');
        let owner = fields.next()?;
        if Some(owner) != name && owner != uid {
            return None;
        }
        let start = fields.next()?.parse().ok()?;
        let count = fields.next()?.parse().ok()?;
        Some(IdRange { start, count })
    })
}

fn map(id: u32, own: u32, range: IdRange, what: &str) -> anyhow::Result<u32> {
    if id == 0 {
        return Ok(own);
    }
    if id > range.count {
        bail!(
            "container {what} {id} is outside the rootless mapping: only 0 to {} are mapped (subordinate range {}:{})",
            range.count,
            range.start,
            range.count
        );
    }
    Ok(range.start + id - 1)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const PASSWD_TEXT: &str = "root:x:0:0:root:/root:/bin/bash\narchipelago:x:1000:1000::/home/archipelago:/bin/bash\n";

    fn rootless() -> Ownership {
        Ownership::Rootless {
            uid: 1000,
            gid: 1000,
            subuid: IdRange {
                start: 100_000,
                count: 65_536,
            },
            subgid: IdRange {
                start: 200_000,
                count: 65_536,
            },
        }
    }

    #[test]
    fn rootless_maps_root_to_the_user_and_others_into_the_subordinate_range() {
        let o = rootless();
        assert_eq!(o.host_ids(0, 0).unwrap(), (1000, 1000));
        assert_eq!(o.host_ids(1, 1).unwrap(), (100_000, 200_000));
        assert_eq!(o.host_ids(1000, 101).unwrap(), (100_999, 200_100));
        assert_eq!(o.host_ids(65_536, 65_536).unwrap(), (165_535, 265_535));
    }

    #[test]
    fn an_id_beyond_the_range_is_refused_with_the_range() {
        let err = rootless().host_ids(70_000, 0).unwrap_err().to_string();
        assert!(
            err.contains("container uid 70000") && err.contains("100000:65536"),
            "{err}"
        );
    }

    #[test]
    fn rootless_files_keep_the_agents_group_with_read_and_folders_with_write() {
        let o = rootless();
        let file = o.target(1000, 1000, 0o600, false).unwrap();
        assert_eq!((file.uid, file.gid, file.mode), (100_999, 1000, 0o640));
        let dir = o.target(1000, 1000, 0o750, true).unwrap();
        assert_eq!((dir.uid, dir.gid, dir.mode), (100_999, 1000, 0o770));
        let rootful = Ownership::Rootful.target(1000, 1001, 0o600, false).unwrap();
        assert_eq!((rootful.uid, rootful.gid, rootful.mode), (1000, 1001, 0o600));
    }

    #[test]
    fn rootful_keeps_ids() {
        assert_eq!(Ownership::Rootful.host_ids(1000, 1000).unwrap(), (1000, 1000));
    }

    #[test]
    fn ranges_are_found_by_name_or_by_uid() {
        let name = user_name(PASSWD_TEXT, 1000);
        assert_eq!(name.as_deref(), Some("archipelago"));
        let by_name = "other:1:5\narchipelago:100000:65536\n";
        assert_eq!(
            find_range(by_name, name.as_deref(), 1000),
            Some(IdRange {
                start: 100_000,
                count: 65_536
            })
        );
        assert_eq!(
            find_range("1000:300000:10\n", None, 1000),
            Some(IdRange {
                start: 300_000,
                count: 10
            })
        );
        assert_eq!(find_range("other:1:5\n", name.as_deref(), 1000), None);
        assert_eq!(user_name(PASSWD_TEXT, 4242), None);
    }
}
