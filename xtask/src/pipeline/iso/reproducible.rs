//! `--check-reproducible`: two builds with one epoch, the second on a fresh
//! base rootfs, give the same ISO byte for byte and the same update bundle
//! payload (`rootfs.tar`; the bundle's signature carries its signing time),
//! or the error says why: the Debian archive changed, or the first file
//! that differs.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use xshell::Shell;

use super::{build_iso, remove_work, Output, CHECK_DIR};
use crate::pipeline::flags::{BuildArgs, Epoch};
use crate::pipeline::layers::{sha256_file, sorted_names};
use crate::pipeline::rootfs::BasePolicy;

/// `--check-reproducible`: two builds with the same epoch, the second on a
/// fresh base rootfs, must give the same ISO byte for byte.
pub(super) fn check(
    root: &Path,
    sh: &Shell,
    args: &BuildArgs,
    mut epoch: Epoch,
    out: &Path,
) -> anyhow::Result<ExitCode> {
    if !epoch.explicit {
        eprintln!(
            "xtask: SOURCE_DATE_EPOCH is not set; both builds use {} (the start of this run)",
            epoch.seconds
        );
        epoch.explicit = true;
    }
    eprintln!("xtask: reproducibility check, build 1 of 2");
    let first = build_iso(root, sh, args, epoch, out, BasePolicy::from_args(args))?;
    eprintln!("xtask: reproducibility check, build 2 of 2 (a fresh base rootfs from mmdebstrap)");
    let second_out = out.join(CHECK_DIR);
    let second = build_iso(root, sh, args, epoch, &second_out, BasePolicy::Fresh)?;
    if first.sha256 == second.sha256 {
        if first.bundle_payload_sha256 != second.bundle_payload_sha256 {
            bail!(
                "not reproducible: the ISOs are identical but the payloads (rootfs.tar) of the bundles {} and {} differ \
                 (sha256 {} and {})",
                first.bundle.display(),
                second.bundle.display(),
                first.bundle_payload_sha256,
                second.bundle_payload_sha256
            );
        }
        println!(
            "reproducible: both ISOs are byte-identical (sha256 {}), and so are the bundles' payloads (rootfs.tar sha256 {})",
            first.sha256, first.bundle_payload_sha256
        );
        remove_work(&first.work)?;
        fs::remove_dir_all(&second_out).with_context(|| format!("removing {}", second_out.display()))?;
        return Ok(ExitCode::SUCCESS);
    }
    let why = explain_difference(&first, &second)?;
    bail!(
        "not reproducible: {} and {} differ: {why}\nthe work folders {} and {} are kept for inspection",
        first.iso.display(),
        second.iso.display(),
        first.work.display(),
        second.work.display()
    );
}

/// Why two ISOs differ: the Debian archive, or the first differing file.
fn explain_difference(first: &Output, second: &Output) -> anyhow::Result<String> {
    if first.packages != second.packages {
        let changed: Vec<String> = first
            .packages
            .iter()
            .filter(|p| !second.packages.contains(p))
            .map(|p| {
                let other = second.packages.iter().find(|q| q.name == p.name);
                format!(
                    "{} {} -> {}",
                    p.name,
                    p.version,
                    other.map_or("(absent)", |q| q.version.as_str())
                )
            })
            .collect();
        return Ok(format!(
            "Debian's archive changed between the builds (run again): {}",
            changed.join(", ")
        ));
    }
    let staging = |o: &Output| o.work.join("iso");
    let Some(diff) = first_difference(&staging(first), &staging(second))? else {
        return Ok(format!(
            "every file on the ISOs is identical, so xorriso's own structures differ (sizes {} and {})",
            first.size, second.size
        ));
    };
    if diff.path != Path::new("live/filesystem.squashfs") {
        return Ok(format!("the first differing file is /{}", diff));
    }
    let tree = |o: &Output| o.work.join("rootfs");
    Ok(match first_difference(&tree(first), &tree(second))? {
        Some(inner) => format!("the first differing file is /live/filesystem.squashfs, and in it /{inner}"),
        None => "the first differing file is /live/filesystem.squashfs, but the rootfs trees are identical \
                 (mksquashfs wrote them differently)"
            .to_owned(),
    })
}

/// The first difference between two trees, in path order.
#[derive(Debug, PartialEq, Eq)]
pub struct Difference {
    pub path: PathBuf,
    pub what: String,
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.path.display(), self.what)
    }
}

/// Compares kind, mode, owner, link target and content, depth first in
/// name order; times are left out (the image stamps them all anyway).
pub fn first_difference(a: &Path, b: &Path) -> anyhow::Result<Option<Difference>> {
    compare_dirs(a, b, Path::new(""))
}

fn compare_dirs(a: &Path, b: &Path, rel: &Path) -> anyhow::Result<Option<Difference>> {
    use std::os::unix::fs::MetadataExt as _;
    let names_a = sorted_names(&a.join(rel))?;
    let names_b = sorted_names(&b.join(rel))?;
    let mut all: Vec<&std::ffi::OsString> = names_a.iter().chain(names_b.iter()).collect();
    all.sort();
    all.dedup();
    for name in all {
        let path = rel.join(name);
        let diff = |what: String| {
            Ok(Some(Difference {
                path: path.clone(),
                what,
            }))
        };
        let (ma, mb) = match (fs::symlink_metadata(a.join(&path)), fs::symlink_metadata(b.join(&path))) {
            (Ok(ma), Ok(mb)) => (ma, mb),
            (Ok(_), Err(_)) => return diff("only in the first build".into()),
            (Err(_), Ok(_)) => return diff("only in the second build".into()),
            (Err(e), Err(_)) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        if ma.file_type() != mb.file_type() {
            return diff("a different kind of file".into());
        }
        if ma.mode() != mb.mode() {
            return diff(format!("mode {:o} vs {:o}", ma.mode() & 0o7777, mb.mode() & 0o7777));
        }
        if (ma.uid(), ma.gid()) != (mb.uid(), mb.gid()) {
            return diff(format!("owner {}:{} vs {}:{}", ma.uid(), ma.gid(), mb.uid(), mb.gid()));
        }
        if ma.file_type().is_symlink() {
            let (ta, tb) = (fs::read_link(a.join(&path))?, fs::read_link(b.join(&path))?);
            if ta != tb {
                return diff(format!("link to {} vs {}", ta.display(), tb.display()));
            }
        } else if ma.is_dir() {
            if let Some(d) = compare_dirs(a, b, &path)? {
                return Ok(Some(d));
            }
        } else if ma.is_file() {
            if ma.len() != mb.len() {
                return diff(format!("{} vs {} bytes", ma.len(), mb.len()));
            }
            if sha256_file(&a.join(&path))? != sha256_file(&b.join(&path))? {
                return diff("different content".into());
            }
        } else if ma.rdev() != mb.rdev() {
            return diff("a different device".into());
        }
    }
    Ok(None)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::os::unix::fs::{symlink, PermissionsExt as _};

    use super::*;

    fn tree(dir: &Path) {
        fs::create_dir_all(dir.join("etc/a")).unwrap();
        fs::write(dir.join("etc/a/one"), "1").unwrap();
        fs::write(dir.join("etc/two"), "2").unwrap();
        fs::write(dir.join("z"), "z").unwrap();
        symlink("two", dir.join("etc/link")).unwrap();
    }

    #[test]
    fn tree_comparison_names_the_first_differing_file() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        tree(a.path());
        tree(b.path());
        assert_eq!(first_difference(a.path(), b.path()).unwrap(), None);

        fs::write(b.path().join("z"), "Z").unwrap();
        fs::write(b.path().join("etc/two"), "3").unwrap();
        let d = first_difference(a.path(), b.path()).unwrap().unwrap();
        assert_eq!(d.path, Path::new("etc/two"));
        assert_eq!(d.what, "different content");

        fs::write(b.path().join("etc/two"), "2").unwrap();
        fs::set_permissions(b.path().join("etc/a/one"), fs::Permissions::from_mode(0o600)).unwrap();
        let d = first_difference(a.path(), b.path()).unwrap().unwrap();
        assert_eq!(d.to_string(), "etc/a/one (mode 644 vs 600)");

        fs::remove_file(b.path().join("etc/a/one")).unwrap();
        let d = first_difference(a.path(), b.path()).unwrap().unwrap();
        assert_eq!(d.to_string(), "etc/a/one (only in the first build)");
    }

    fn output(work: &Path, netavark: &str) -> Output {
        for sub in ["iso/live", "iso/boot/grub", "rootfs/etc"] {
            fs::create_dir_all(work.join(sub)).unwrap();
        }
        fs::write(work.join("iso/boot/grub/grub.cfg"), "menuentry").unwrap();
        fs::write(work.join("iso/live/filesystem.squashfs"), "squashfs").unwrap();
        fs::write(work.join("rootfs/etc/hostname"), "archipelago").unwrap();
        Output {
            iso: work.join("a.iso"),
            size: 1,
            sha256: String::new(),
            bundle: work.join("a.raucb"),
            bundle_payload_sha256: String::new(),
            work: work.to_path_buf(),
            packages: vec![crate::pipeline::report::Package {
                name: "netavark".into(),
                version: netavark.into(),
                arch: "amd64".into(),
            }],
            stages: Vec::new(),
            total_seconds: 0.0,
        }
    }

    #[test]
    fn a_reproducibility_failure_names_the_archive_change_or_the_first_differing_file() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let first = output(a.path(), "1.4.0-3");
        let why = explain_difference(&first, &output(b.path(), "1.4.0-4")).unwrap();
        assert_eq!(
            why,
            "Debian's archive changed between the builds (run again): netavark 1.4.0-3 -> 1.4.0-4"
        );

        let second = output(b.path(), "1.4.0-3");
        assert!(explain_difference(&first, &second)
            .unwrap()
            .starts_with("every file on the ISOs is identical"));

        // A file inside the squashfs: named by its path in the rootfs.
        fs::write(b.path().join("iso/live/filesystem.squashfs"), "squashfS").unwrap();
        fs::write(b.path().join("rootfs/etc/hostname"), "archipelagO").unwrap();
        assert_eq!(
            explain_difference(&first, &second).unwrap(),
            "the first differing file is /live/filesystem.squashfs, and in it /etc/hostname (different content)"
        );

        // A file on the ISO itself comes first in path order.
        fs::write(b.path().join("iso/boot/grub/grub.cfg"), "menuentrY").unwrap();
        assert_eq!(
            explain_difference(&first, &second).unwrap(),
            "the first differing file is /boot/grub/grub.cfg (different content)"
        );
    }

    #[test]
    fn tree_comparison_sees_link_targets() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        tree(a.path());
        tree(b.path());
        fs::remove_file(b.path().join("etc/link")).unwrap();
        symlink("a/one", b.path().join("etc/link")).unwrap();
        let d = first_difference(a.path(), b.path()).unwrap().unwrap();
        assert_eq!(d.to_string(), "etc/link (link to two vs a/one)");
    }
}
