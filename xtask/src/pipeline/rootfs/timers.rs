//! The timers a rootfs enables, against the allow list `rootfs/timers.allow`:
//! a node is an appliance whose OS is replaced whole, so a timer that
//! expects a mutable Debian (apt's daily runs, dpkg's backups) must not
//! come in unnoticed with a package.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use anyhow::{bail, Context as _};

/// Where units are enabled: `<dir>/<target>.wants/` (and `.requires/`,
/// `.upholds/`) symlinks, for the system manager and for every user's
/// manager. `lib/` is `usr/lib/` on a merged-/usr tree; both are read in
/// case it is not.
const SYSTEM_DIRS: &[&str] = &["etc/systemd/system", "usr/lib/systemd/system", "lib/systemd/system"];
const USER_DIRS: &[&str] = &["etc/systemd/user", "usr/lib/systemd/user", "lib/systemd/user"];
const DEPENDENCY_SUFFIXES: &[&str] = &[".wants", ".requires", ".upholds"];
const TIMER_SUFFIX: &str = ".timer";

/// Which service manager runs a timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    System,
    User,
}

impl Scope {
    fn dirs(self) -> &'static [&'static str] {
        match self {
            Scope::System => SYSTEM_DIRS,
            Scope::User => USER_DIRS,
        }
    }
}

/// One timer enabled in a tree, with the first symlink found that enables it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnabledTimer {
    pub unit: String,
    pub scope: Scope,
    /// The enabling symlink, relative to the tree.
    pub link: String,
}

/// The allow list: one timer unit name per line, `#` starts a comment.
/// A line names the timer for both the system's and the users' managers.
pub fn parse_allow_list(text: &str) -> anyhow::Result<Vec<String>> {
    let mut names = Vec::new();
    let mut problems = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let name = line.split('#').next().unwrap_or("").trim();
        if name.is_empty() {
            continue;
        }
        if !is_timer_name(name) {
            problems.push(format!(
                "line {}: {name:?} is not a timer unit name (letters, digits, `:-_.@\\`, ending in .timer)",
                n + 1
            ));
        } else if names.iter().any(|n| n == name) {
            problems.push(format!("line {}: {name} is listed twice", n + 1));
        } else {
            names.push(name.to_owned());
        }
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("; "));
    }
    Ok(names)
}

fn is_timer_name(name: &str) -> bool {
    name.len() > TIMER_SUFFIX.len()
        && name.ends_with(TIMER_SUFFIX)
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b":-_.@\\".contains(&b))
}

/// Every timer enabled in `tree`, sorted by scope and name: a `.timer`
/// entry of a `.wants`/`.requires`/`.upholds` folder in the unit folders,
/// unless the unit is masked (a unit file that is a symlink to /dev/null
/// or empty) in a folder of the same scope.
pub fn enabled_timers(tree: &Path) -> anyhow::Result<Vec<EnabledTimer>> {
    let mut found: BTreeMap<(Scope, String), String> = BTreeMap::new();
    for scope in [Scope::System, Scope::User] {
        for dir in scope.dirs() {
            let path = tree.join(dir);
            let Ok(entries) = fs::read_dir(&path) else {
                continue;
            };
            let mut folders: Vec<String> = Vec::new();
            for entry in entries {
                let entry = entry.with_context(|| format!("reading {}", path.display()))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if DEPENDENCY_SUFFIXES.iter().any(|s| name.ends_with(s)) {
                    folders.push(name);
                }
            }
            folders.sort();
            for folder in folders {
                let wants = path.join(&folder);
                let mut units: Vec<String> = fs::read_dir(&wants)
                    .with_context(|| format!("reading {}", wants.display()))?
                    .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                    .collect::<Result<_, _>>()
                    .with_context(|| format!("reading {}", wants.display()))?;
                units.sort();
                for unit in units.into_iter().filter(|u| u.ends_with(TIMER_SUFFIX)) {
                    found
                        .entry((scope, unit.clone()))
                        .or_insert_with(|| format!("{dir}/{folder}/{unit}"));
                }
            }
        }
    }
    let mut timers = Vec::new();
    for ((scope, unit), link) in found {
        if !is_masked(tree, scope, &unit)? {
            timers.push(EnabledTimer { unit, scope, link });
        }
    }
    Ok(timers)
}

/// Masked: a unit file of that name in one of the scope's folders that is
/// a symlink to /dev/null or an empty file (what `systemctl mask` makes).
fn is_masked(tree: &Path, scope: Scope, unit: &str) -> anyhow::Result<bool> {
    for dir in scope.dirs() {
        let path = tree.join(dir).join(unit);
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.file_type().is_symlink() {
            let target = fs::read_link(&path).with_context(|| format!("reading the link {}", path.display()))?;
            if target == Path::new("/dev/null") {
                return Ok(true);
            }
        } else if meta.is_file() && meta.len() == 0 {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Fails, naming each timer and the allow list's file, when `tree` enables
/// a timer that `allow_text` (read from `allow_file`) does not list.
pub fn check(tree: &Path, allow_text: &str, allow_file: &str) -> anyhow::Result<Vec<EnabledTimer>> {
    let allowed = parse_allow_list(allow_text).with_context(|| format!("in {allow_file}"))?;
    let timers = enabled_timers(tree)?;
    let unexpected: Vec<String> = timers
        .iter()
        .filter(|t| !allowed.contains(&t.unit))
        .map(|t| {
            let scope = match t.scope {
                Scope::System => "the system's",
                Scope::User => "every user's",
            };
            format!("{} (enabled for {scope} systemd by /{})", t.unit, t.link)
        })
        .collect();
    if !unexpected.is_empty() {
        bail!(
            "the rootfs enables timer{} that {allow_file} does not allow: {}. A node's OS is replaced \
             whole by updates: mask a timer that expects a mutable Debian (xtask's \
             APPLIANCE_MASKED_UNITS), or add it to {allow_file} with the reason it runs on a node",
            if unexpected.len() == 1 { "" } else { "s" },
            unexpected.join("; ")
        );
    }
    Ok(timers)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn link(tree: &Path, path: &str, target: &str) {
        let path = tree.join(path);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        symlink(target, path).unwrap();
    }

    fn names(timers: &[EnabledTimer]) -> Vec<(Scope, &str)> {
        timers.iter().map(|t| (t.scope, t.unit.as_str())).collect()
    }

    /// A tree as Debian leaves it: timers enabled by packages in /etc,
    /// static ones in /usr/lib, a user timer, a masked one.
    fn debian_like_tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path();
        link(
            tree,
            "etc/systemd/system/timers.target.wants/apt-daily.timer",
            "/lib/systemd/system/apt-daily.timer",
        );
        link(
            tree,
            "etc/systemd/system/timers.target.wants/fstrim.timer",
            "/lib/systemd/system/fstrim.timer",
        );
        link(
            tree,
            "usr/lib/systemd/system/timers.target.wants/systemd-tmpfiles-clean.timer",
            "../systemd-tmpfiles-clean.timer",
        );
        // Not a timer: never listed.
        link(
            tree,
            "etc/systemd/system/multi-user.target.wants/ssh.service",
            "/lib/systemd/system/ssh.service",
        );
        link(
            tree,
            "etc/systemd/user/timers.target.wants/podman-auto-update.timer",
            "/usr/lib/systemd/user/podman-auto-update.timer",
        );
        link(tree, "etc/systemd/system/podman-auto-update.timer", "/dev/null");
        // The same timer enabled twice is listed once, with the first link.
        link(
            tree,
            "etc/systemd/system/basic.target.wants/fstrim.timer",
            "/lib/systemd/system/fstrim.timer",
        );
        dir
    }

    #[test]
    fn enabled_timers_are_listed_per_scope_without_masked_ones() {
        let dir = debian_like_tree();
        let tree = dir.path();
        let timers = enabled_timers(tree).unwrap();
        assert_eq!(
            names(&timers),
            [
                (Scope::System, "apt-daily.timer"),
                (Scope::System, "fstrim.timer"),
                (Scope::System, "systemd-tmpfiles-clean.timer"),
                // Masked for the system manager only: the user's is still on.
                (Scope::User, "podman-auto-update.timer"),
            ]
        );
        assert_eq!(
            timers[1].link, "etc/systemd/system/basic.target.wants/fstrim.timer",
            "the first folder in name order"
        );

        // Masked the two ways systemctl does it, in /etc or /usr/lib.
        link(tree, "etc/systemd/system/apt-daily.timer", "/dev/null");
        fs::write(tree.join("usr/lib/systemd/system/fstrim.timer"), "").unwrap();
        link(tree, "usr/lib/systemd/user/podman-auto-update.timer", "/dev/null");
        assert_eq!(
            names(&enabled_timers(tree).unwrap()),
            [(Scope::System, "systemd-tmpfiles-clean.timer")]
        );
        // A unit file with content is not a mask.
        fs::write(
            tree.join("etc/systemd/system/systemd-tmpfiles-clean.timer"),
            "[Timer]\n",
        )
        .unwrap();
        assert_eq!(enabled_timers(tree).unwrap().len(), 1);
    }

    #[test]
    fn a_timer_not_on_the_list_fails_the_check_naming_it_and_the_list() {
        let dir = debian_like_tree();
        let tree = dir.path();
        let allow = "# comment\nfstrim.timer  # weekly TRIM\nsystemd-tmpfiles-clean.timer\npodman-auto-update.timer\n";
        let err = check(tree, allow, "rootfs/timers.allow").unwrap_err().to_string();
        assert!(err.contains("apt-daily.timer (enabled for the system's systemd by /etc/systemd/system/timers.target.wants/apt-daily.timer)"), "{err}");
        assert!(err.contains("rootfs/timers.allow does not allow"), "{err}");
        assert!(!err.contains("fstrim"), "{err}");

        link(tree, "etc/systemd/system/apt-daily.timer", "/dev/null");
        let ok = check(tree, allow, "rootfs/timers.allow").unwrap();
        assert_eq!(ok.len(), 3);

        let err = check(tree, "fstrim.timer\nsystemd-tmpfiles-clean.timer\n", "x.allow")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("podman-auto-update.timer (enabled for every user's systemd"),
            "{err}"
        );
    }

    #[test]
    fn allow_lists_are_checked() {
        assert_eq!(
            parse_allow_list("a.timer\n\n# x\nb@c.timer # why\n").unwrap(),
            ["a.timer", "b@c.timer"]
        );
        let err = parse_allow_list("a.service\na.timer\na.timer\n.timer\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 1: \"a.service\" is not a timer unit name"), "{err}");
        assert!(err.contains("line 3: a.timer is listed twice"), "{err}");
        assert!(err.contains("line 4: \".timer\""), "{err}");
    }

    #[test]
    fn the_real_allow_list_parses_and_allows_no_masked_timer() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let text = fs::read_to_string(root.join(super::super::TIMERS_ALLOW_FILE)).unwrap();
        let allowed = parse_allow_list(&text).unwrap();
        for masked in super::super::APPLIANCE_MASKED_UNITS {
            assert!(
                !allowed.iter().any(|a| a == masked),
                "{masked} is both masked and allowed"
            );
        }
        for needed in ["apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer"] {
            assert!(
                super::super::APPLIANCE_MASKED_UNITS.contains(&needed),
                "{needed} is not masked"
            );
        }
    }
}
