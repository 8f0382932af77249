//! The base layer: Debian 12 from mmdebstrap, cached as a tarball under a key
//! over everything it is made from (packages, mirrors, flags, overlay, epoch).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};
use xshell::{cmd, Shell};

use super::{
    short, BasePolicy, CACHE_FORMAT, CACHE_KEEP, DPKG_STATUS_MEMBER, ENABLE_HOOK, MIRRORS, MMDEBSTRAP_FLAGS,
    OVERLAY_DIR, PACKAGES_FILE, RELEASE, SLIM_FLAGS, SSH_HOST_KEYS_HOOK, TREE_TAR_FLAGS, USER_HOOK,
};
use crate::harness::procs::capture;
use crate::pipeline::flags::{Arch, Epoch};
use crate::pipeline::layers::{sha256_file, sha256_hex, Layer};
use crate::pipeline::progress;
use crate::pipeline::report::Package;

/// Everything the base layer is made from, and its cache key.
#[derive(Debug)]
pub struct BaseSpec {
    pub arch: Arch,
    pub packages: Vec<String>,
    pub packages_txt_sha256: String,
    pub overlay: Layer,
    pub overlay_digest: String,
    pub epoch: Epoch,
    pub key: String,
}

/// What the cache key is computed over: no host paths, no times except an
/// explicit SOURCE_DATE_EPOCH.
#[derive(Serialize)]
pub(super) struct KeyInputs<'a> {
    format: u32,
    release: &'a str,
    arch: &'a str,
    packages: &'a [String],
    overlay: &'a str,
    mirrors: &'a [&'a str],
    mmdebstrap: Vec<String>,
    source_date_epoch: Option<u64>,
}

impl BaseSpec {
    pub fn load(root: &Path, arch: Arch, epoch: Epoch) -> anyhow::Result<BaseSpec> {
        let path = root.join(PACKAGES_FILE);
        let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let packages = parse_package_list(&text).with_context(|| format!("in {}", path.display()))?;
        let mut overlay = Layer::new();
        overlay.add_tree("", &root.join(OVERLAY_DIR))?;
        let overlay_digest = overlay.digest()?;
        Ok(BaseSpec::new(
            arch,
            packages,
            sha256_hex(text.as_bytes()),
            overlay,
            overlay_digest,
            epoch,
        ))
    }

    fn new(
        arch: Arch,
        packages: Vec<String>,
        packages_txt_sha256: String,
        overlay: Layer,
        overlay_digest: String,
        epoch: Epoch,
    ) -> BaseSpec {
        let mut spec = BaseSpec {
            arch,
            packages,
            packages_txt_sha256,
            overlay,
            overlay_digest,
            epoch,
            key: String::new(),
        };
        let inputs = KeyInputs {
            format: CACHE_FORMAT,
            release: RELEASE,
            arch: arch.debian_name(),
            packages: &spec.packages,
            overlay: &spec.overlay_digest,
            mirrors: MIRRORS,
            mmdebstrap: spec.keyed_args(),
            source_date_epoch: epoch.explicit_seconds(),
        };
        // Serialising plain strings and numbers cannot fail.
        let json = serde_json::to_vec(&inputs).unwrap_or_default();
        spec.key = sha256_hex(&json);
        spec
    }

    /// mmdebstrap's arguments with host paths replaced by placeholders:
    /// the part that decides what the base contains.
    pub fn keyed_args(&self) -> Vec<String> {
        self.args(Path::new("<overlay.tar>"), None, Path::new("<output.tar>"))
    }

    fn args(&self, overlay_tar: &Path, debs: Option<&Path>, output: &Path) -> Vec<String> {
        let mut args: Vec<String> = MMDEBSTRAP_FLAGS
            .iter()
            .chain(SLIM_FLAGS)
            .map(|f| (*f).to_owned())
            .collect();
        args.push(format!("--architectures={}", self.arch.debian_name()));
        args.push(format!("--include={}", self.packages.join(",")));
        args.extend(debs.map(debs_setup_hooks).into_iter().flatten());
        args.push(format!("--customize-hook={USER_HOOK}"));
        args.push(format!("--customize-hook=tar-in {} /", overlay_tar.display()));
        args.push(format!("--customize-hook={ENABLE_HOOK}"));
        args.push(format!("--customize-hook={SSH_HOST_KEYS_HOOK}"));
        args.extend(debs.map(debs_sync_out_hook));
        args.extend(release_and_mirrors(output));
        args
    }
}

/// mmdebstrap's setup hooks that put the downloads kept in `debs` where
/// apt looks first, so that a rebuild downloads only what changed.
pub fn debs_setup_hooks(debs: &Path) -> [String; 2] {
    [
        r#"--setup-hook=mkdir -p "$1"/var/cache/apt/archives/"#.to_owned(),
        format!("--setup-hook=sync-in {} /var/cache/apt/archives/", debs.display()),
    ]
}

/// The customize hook that copies this build's downloads back to `debs`
/// (it needs `--skip=essential/unlink`).
pub fn debs_sync_out_hook(debs: &Path) -> String {
    format!("--customize-hook=sync-out /var/cache/apt/archives {}", debs.display())
}

/// mmdebstrap's last arguments: the release, the output and the mirrors.
pub fn release_and_mirrors(output: &Path) -> Vec<String> {
    let mut args = vec![RELEASE.to_owned(), output.display().to_string()];
    args.extend(MIRRORS.iter().map(|m| (*m).to_owned()));
    args
}

/// One package name per line; `#` starts a comment.
pub fn parse_package_list(text: &str) -> anyhow::Result<Vec<String>> {
    let mut packages = BTreeSet::new();
    let mut problems = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let name = line.split('#').next().unwrap_or("").trim();
        if name.is_empty() {
            continue;
        }
        let valid = name.len() >= 2
            && name.as_bytes()[0].is_ascii_alphanumeric()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b));
        if !valid {
            problems.push(format!(
                "line {}: {name:?} is not a Debian package name (lowercase letters, digits, + - .)",
                n + 1
            ));
        } else if !packages.insert(name.to_owned()) {
            problems.push(format!("line {}: {name} is listed twice", n + 1));
        }
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("; "));
    }
    if packages.is_empty() {
        bail!("the package list is empty");
    }
    Ok(packages.into_iter().collect())
}

/// A base tarball and its installed packages.
#[derive(Debug)]
pub struct Base {
    pub tar: PathBuf,
    pub sha256: String,
    pub packages: Vec<Package>,
    pub from_cache: bool,
}

/// The sidecar of a cached base tarball.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct CacheMeta {
    key: String,
    sha256: String,
    packages: Vec<Package>,
}

/// One mmdebstrap tarball kept in the cache: `<cache>/<prefix>-<key>.tar`,
/// its sidecar `.json`, and its downloads in `<cache>/<debs>`.
#[derive(Debug, Clone, Copy)]
pub struct CachedTarball<'a> {
    /// The progress lines' stage name.
    pub stage: &'a str,
    /// What the cache files' names start with.
    pub prefix: &'a str,
    /// A sha256 over everything that decides the tarball's contents.
    pub key: &'a str,
    /// `SOURCE_DATE_EPOCH` for mmdebstrap, when the build is to be reproducible.
    pub epoch: Option<u64>,
    /// The download cache's folder name inside the cache folder: each
    /// tarball has its own, since each run prunes what it did not install.
    pub debs: &'a str,
    /// How many tarballs of this prefix are kept.
    pub keep: usize,
}

impl CachedTarball<'_> {
    fn name(&self) -> String {
        format!("{}-{}", self.prefix, short(self.key))
    }

    /// The tarball from the cache or from mmdebstrap, built in `work`
    /// (emptied first, on the cache's file system). `args` gets `work`, the
    /// download cache and the output path, may write inputs into `work`, and
    /// gives mmdebstrap's arguments.
    pub fn obtain(
        &self,
        sh: &Shell,
        cache_dir: &Path,
        work: &Path,
        policy: BasePolicy,
        args: impl FnOnce(&Path, &Path, &Path) -> anyhow::Result<Vec<String>>,
    ) -> anyhow::Result<Base> {
        fs::create_dir_all(cache_dir).with_context(|| format!("creating {}", cache_dir.display()))?;
        let name = self.name();
        let cached_tar = cache_dir.join(format!("{name}.tar"));
        let cached_meta = cache_dir.join(format!("{name}.json"));
        if policy == BasePolicy::Cached {
            if let Some(meta) = read_meta(&cached_meta, self.key) {
                if cached_tar.is_file() {
                    progress::say(self.stage, &format!("using the cached {}", cached_tar.display()));
                    // Mark it used, for pruning.
                    if let Ok(f) = fs::File::options().write(true).open(&cached_tar) {
                        let _ = f.set_modified(std::time::SystemTime::now());
                    }
                    return Ok(Base {
                        tar: cached_tar,
                        sha256: meta.sha256,
                        packages: meta.packages,
                        from_cache: true,
                    });
                }
            }
            progress::say(self.stage, &format!("nothing cached for key {}", short(self.key)));
        }

        if work.exists() {
            fs::remove_dir_all(work).with_context(|| format!("removing {}", work.display()))?;
        }
        fs::create_dir_all(work).with_context(|| format!("creating {}", work.display()))?;
        let debs = cache_dir.join(self.debs);
        fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
        let tmp = work.join("tmp");
        fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let output = work.join("base.tar");
        let args = args(work, &debs, &output)?;
        progress::say(
            self.stage,
            &format!("mmdebstrap {RELEASE} (downloads go to {})", debs.display()),
        );
        let mut mmdebstrap = cmd!(sh, "mmdebstrap {args...}").env("TMPDIR", &tmp);
        mmdebstrap = match self.epoch {
            Some(seconds) => mmdebstrap.env("SOURCE_DATE_EPOCH", seconds.to_string()),
            None => mmdebstrap.env_remove("SOURCE_DATE_EPOCH"),
        };
        mmdebstrap.run().context("mmdebstrap failed (see its output above)")?;

        let status = capture(cmd!(sh, "tar -xOf {output} {DPKG_STATUS_MEMBER}"))
            .context("reading the dpkg status of the new tarball")?;
        let packages = parse_dpkg_status(&status);
        prune_debs(&debs, &packages);
        let sha256 = sha256_file(&output)?;
        let meta = CacheMeta {
            key: self.key.to_owned(),
            sha256: sha256.clone(),
            packages: packages.clone(),
        };
        if policy == BasePolicy::Fresh {
            let tar = work.join(format!("{name}.tar"));
            fs::rename(&output, &tar).with_context(|| format!("moving the tarball to {}", tar.display()))?;
            return Ok(Base {
                tar,
                sha256,
                packages,
                from_cache: false,
            });
        }
        // Tarball first, then the sidecar that makes it a cache hit.
        let _ = fs::remove_file(&cached_meta);
        fs::rename(&output, &cached_tar)
            .or_else(|_| fs::copy(&output, &cached_tar).map(|_| ()))
            .with_context(|| format!("storing the tarball as {}", cached_tar.display()))?;
        let text = serde_json::to_string_pretty(&meta).context("serialising the cache metadata")?;
        fs::write(&cached_meta, text).with_context(|| format!("writing {}", cached_meta.display()))?;
        fs::remove_dir_all(work).with_context(|| format!("removing {}", work.display()))?;
        self.prune(cache_dir);
        Ok(Base {
            tar: cached_tar,
            sha256,
            packages,
            from_cache: false,
        })
    }

    /// Keeps the `keep` most recently used tarballs of this prefix.
    fn prune(&self, dir: &Path) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        let prefix = format!("{}-", self.prefix);
        let mut tars: Vec<(std::time::SystemTime, PathBuf)> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_prefix(&prefix))
                    .and_then(|n| n.strip_suffix(".tar"))
                    .is_some_and(|key| key.bytes().all(|b| b.is_ascii_hexdigit()))
            })
            .filter_map(|p| Some((fs::metadata(&p).ok()?.modified().ok()?, p)))
            .collect();
        tars.sort_by_key(|t| std::cmp::Reverse(t.0));
        for (_, tar) in tars.into_iter().skip(self.keep) {
            progress::say(self.stage, &format!("pruning the old cached {}", tar.display()));
            let _ = fs::remove_file(tar.with_extension("json"));
            let _ = fs::remove_file(&tar);
        }
    }
}

pub(super) fn obtain_base(
    sh: &Shell,
    spec: &BaseSpec,
    cache_dir: &Path,
    tree: &Path,
    policy: BasePolicy,
) -> anyhow::Result<Base> {
    let job = CachedTarball {
        stage: "rootfs-base",
        prefix: "rootfs",
        key: &spec.key,
        epoch: spec.epoch.explicit_seconds(),
        debs: "debs",
        keep: CACHE_KEEP,
    };
    progress::say(
        "rootfs-base",
        &format!("the base has {} packages and their dependencies", spec.packages.len()),
    );
    // Built next to the tree (same file system), then moved into the cache.
    job.obtain(
        sh,
        cache_dir,
        &tree.with_extension("base"),
        policy,
        |work, debs, output| {
            let overlay_tar = work.join("overlay.tar");
            let file = fs::File::create(&overlay_tar).with_context(|| format!("creating {}", overlay_tar.display()))?;
            spec.overlay
                .write_tar(std::io::BufWriter::new(file), spec.epoch.seconds)
                .and_then(|mut w| std::io::Write::flush(&mut w).context("writing the overlay tar"))?;
            Ok(spec.args(&overlay_tar, Some(debs), output))
        },
    )
}

pub(super) fn read_meta(path: &Path, key: &str) -> Option<CacheMeta> {
    let text = fs::read_to_string(path).ok()?;
    let meta: CacheMeta = serde_json::from_str(&text).ok()?;
    (meta.key == key).then_some(meta)
}

/// Keeps only the downloads of what is installed now.
pub(super) fn prune_debs(dir: &Path, installed: &[Package]) {
    let wanted: BTreeSet<String> = installed
        .iter()
        .map(|p| format!("{}_{}_{}.deb", p.name, p.version.replace(':', "%3a"), p.arch))
        .collect();
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".deb") && !wanted.contains(&name) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Installed packages from a dpkg status file, sorted by name.
pub fn parse_dpkg_status(text: &str) -> Vec<Package> {
    let mut packages = Vec::new();
    for stanza in text.split("\n\n") {
        let mut fields: BTreeMap<&str, &str> = BTreeMap::new();
        for line in stanza.lines() {
            if line.starts_with(' ') || line.starts_with('\t') {
                continue;
            }
            if let Some((k, v)) = line.split_once(':') {
                fields.insert(k, v.trim());
            }
        }
        let installed = fields
            .get("Status")
            .is_some_and(|s| s.split_whitespace().last() == Some("installed"));
        if let (true, Some(name), Some(version)) = (installed, fields.get("Package"), fields.get("Version")) {
            packages.push(Package {
                name: (*name).to_owned(),
                version: (*version).to_owned(),
                arch: fields.get("Architecture").copied().unwrap_or("").to_owned(),
            });
        }
    }
    packages.sort();
    packages
}

pub(super) fn unpack(sh: &Shell, tar: &Path, tree: &Path) -> anyhow::Result<()> {
    if tree.exists() {
        fs::remove_dir_all(tree).with_context(|| format!("removing the old tree {}", tree.display()))?;
    }
    fs::create_dir_all(tree).with_context(|| format!("creating {}", tree.display()))?;
    progress::say(
        "rootfs",
        &format!("unpacking {} into {}", tar.display(), tree.display()),
    );
    capture(cmd!(sh, "tar {TREE_TAR_FLAGS...} -xpf {tar} -C {tree}"))
        .with_context(|| format!("unpacking {}", tar.display()))?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::{flags, FILE_MODE};
    use super::*;

    fn spec(packages: &[&str], overlay: &[(&str, &str)], epoch: Option<u64>) -> BaseSpec {
        let mut layer = Layer::new();
        for (path, text) in overlay {
            layer.add_bytes(path, text.as_bytes().to_vec(), FILE_MODE).unwrap();
        }
        let digest = layer.digest().unwrap();
        let epoch = match epoch {
            Some(seconds) => Epoch {
                seconds,
                explicit: true,
            },
            None => Epoch {
                seconds: flags::now_seconds(),
                explicit: false,
            },
        };
        BaseSpec::new(
            Arch::Amd64,
            packages.iter().map(|p| (*p).to_owned()).collect(),
            String::new(),
            layer,
            digest,
            epoch,
        )
    }

    #[test]
    fn the_cache_key_covers_packages_overlay_and_an_explicit_epoch() {
        let base = spec(&["podman"], &[("etc/hostname", "a\n")], None);
        // The build time alone does not change the key.
        assert_eq!(base.key, spec(&["podman"], &[("etc/hostname", "a\n")], None).key);
        assert_eq!(base.key.len(), 64);
        assert_ne!(
            base.key,
            spec(&["podman", "crun"], &[("etc/hostname", "a\n")], None).key
        );
        assert_ne!(base.key, spec(&["podman"], &[("etc/hostname", "b\n")], None).key);
        assert_ne!(base.key, spec(&["podman"], &[("etc/hostname", "a\n")], Some(1)).key);
        assert_eq!(spec(&["podman"], &[], Some(7)).key, spec(&["podman"], &[], Some(7)).key);
    }

    #[test]
    fn keyed_args_name_no_host_path() {
        let s = spec(&["netavark", "podman"], &[], None);
        let args = s.keyed_args();
        assert!(args.contains(&"--include=netavark,podman".to_owned()));
        assert!(args.contains(&"--variant=minbase".to_owned()));
        assert!(args.iter().any(|a| a.contains("useradd --uid 1000")));
        assert!(args.contains(&"--customize-hook=tar-in <overlay.tar> /".to_owned()));
        assert!(
            !args.iter().any(|a| a.contains("sync-in")),
            "the download cache is not part of the key"
        );
        let real = s.args(
            Path::new("/x/overlay.tar"),
            Some(Path::new("/c/debs")),
            Path::new("/o.tar"),
        );
        assert!(real.contains(&"--setup-hook=sync-in /c/debs /var/cache/apt/archives/".to_owned()));
        // Hooks run in order: the user first, then the overlay's subuid
        // and subgid replace what useradd wrote.
        let user = real.iter().position(|a| a.contains("useradd")).unwrap();
        let overlay = real.iter().position(|a| a.contains("tar-in")).unwrap();
        assert!(user < overlay);
        assert_eq!(real[real.len() - 5], "bookworm");
        assert_eq!(real[real.len() - 4], "/o.tar");
    }

    #[test]
    fn package_lists_are_parsed_sorted_and_checked() {
        let list = parse_package_list("# boot\nsystemd\n\npodman   # engine\nlinux-image-amd64\n").unwrap();
        assert_eq!(list, ["linux-image-amd64", "podman", "systemd"]);
        let err = parse_package_list("podman\nPodman\npodman\n").unwrap_err().to_string();
        assert!(err.contains("line 2: \"Podman\" is not a Debian package name"), "{err}");
        assert!(err.contains("line 3: podman is listed twice"), "{err}");
        assert!(parse_package_list("# nothing\n").is_err());
    }

    #[test]
    fn the_real_package_list_has_what_the_node_needs() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let text = fs::read_to_string(root.join(PACKAGES_FILE)).unwrap();
        let list = parse_package_list(&text).unwrap();
        for needed in [
            "systemd",
            "linux-image-amd64",
            "live-boot",
            "podman",
            "netavark",
            "aardvark-dns",
            "crun",
            "conmon",
            "uidmap",
            "slirp4netns",
            // The installer's tools and the node's SSH (issue 15).
            "fdisk",
            "dosfstools",
            "grub-pc-bin",
            "grub-efi-amd64-bin",
            "grub2-common",
            "openssh-server",
            // OS updates (issue 16).
            "rauc",
            "rauc-service",
            "squashfs-tools",
        ] {
            assert!(
                list.iter().any(|p| p == needed),
                "{needed} is missing from {PACKAGES_FILE}"
            );
        }
    }

    #[test]
    fn dpkg_status_gives_installed_packages_only() {
        let status = "Package: netavark\nStatus: install ok installed\nPriority: optional\nArchitecture: amd64\nVersion: 1.4.0-3\nDescription: x\n multi-line: not a field\n\n\
                      Package: gone\nStatus: deinstall ok config-files\nArchitecture: amd64\nVersion: 1\n\n\
                      Package: base-files\nStatus: install ok installed\nArchitecture: amd64\nVersion: 12.4+deb12u11\n";
        let packages = parse_dpkg_status(status);
        let names: Vec<(&str, &str)> = packages.iter().map(|p| (p.name.as_str(), p.version.as_str())).collect();
        assert_eq!(names, [("base-files", "12.4+deb12u11"), ("netavark", "1.4.0-3")]);
    }
}
