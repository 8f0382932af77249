//! The data root: `/var/lib/archipelago` on a node, where the `ARCHY-DATA`
//! disk is mounted. Every path under it comes from [`DataRoot`], one
//! method per entry; `docs/data-root.md` gives each entry's owner, mode and
//! writer.
//!
//! The names directly under the root are declared once, in the table of
//! `top_level!`: the path methods are built on them, and the names an app
//! id may not take ([`DataRoot::RESERVED_NAMES`]) are that same table, so
//! an entry added there is reserved the moment it exists. To add an entry:
//! a row in the table if it needs a new top-level name, and a method below
//! (with a line in `docs/data-root.md`).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::manifest::AppId;

/// Where the data root is on a node (`--data`, `ARCHY_DATA`).
pub const DEFAULT_DATA_ROOT: &str = "/var/lib/archipelago";

/// Declares the names directly under the data root that belong to the
/// node, not to an app: one constant each, and [`DataRoot::RESERVED_NAMES`]
/// listing them all.
macro_rules! top_level {
    ($($(#[$doc:meta])* $name:ident = $value:literal,)*) => {
        impl DataRoot {
            $($(#[$doc])* const $name: &'static str = $value;)*
            /// Every name directly under the data root that is not an
            /// app's folder, in the table's (alphabetical) order: an app
            /// id may not take one, and an absolute volume may not lie in
            /// one.
            pub const RESERVED_NAMES: &'static [&'static str] = &[$(Self::$name),*];
        }
    };
}

top_level! {
    /// Dev mode's apps folder (`--dev` without `--apps`).
    APPS = "apps",
    /// The node's configuration: the registry list. The image may seed it.
    CONFIG = "config",
    /// Container storage, rootless and rootful (`/etc/containers/storage.conf`).
    CONTAINERS = "containers",
    /// Reserved since manifests were first checked; nothing uses it yet.
    IMAGES = "images",
    /// The node's secrets and each app's copies of them.
    SECRETS = "secrets",
    /// The login user's SSH files: `authorized_keys`.
    SSH = "ssh",
    /// What the agent remembers across restarts.
    STATE = "state",
    /// Reserved since manifests were first checked; nothing uses it yet.
    STORAGE = "storage",
    /// The OS's own files kept across boots (root's): the machine id, the
    /// SSH host key, the persistent journal.
    SYSTEM = "system",
}

/// The registry list's file name in `config/`.
pub const REGISTRIES_FILE: &str = "registries.json";
// File and folder names below the top level.
const AGENT_STATE_FILE: &str = "agent.json";
const WRITER_LOCK_FILE: &str = "agent.lock";
const IMAGES_LEDGER_FILE: &str = "images.json";
const HELD_DIR: &str = "held";
const UPGRADES_DIR: &str = "upgrades";
const JOURNAL_SUFFIX: &str = ".json";
const APP_SECRETS_DIR: &str = "apps";
const ROOTFUL_STORAGE_DIR: &str = "storage";
const ROOTLESS_STORAGE_DIR: &str = "rootless";
const MACHINE_ID_FILE: &str = "machine-id";
const OS_DOWNLOAD_FILE: &str = "os-download.raucb";
const SSH_HOST_KEYS_DIR: &str = "ssh";
const SSH_HOST_KEY_FILE: &str = "ssh_host_ed25519_key";
const SSH_HOST_KEY_PUB_FILE: &str = "ssh_host_ed25519_key.pub";
const JOURNAL_DIR: &str = "journal";
const AUTHORIZED_KEYS_FILE: &str = "authorized_keys";
const OS_DIR: &str = "os";
const OS_TRIAL_FILE: &str = "trial.json";
const OS_ROLLBACK_FILE: &str = "rollback.json";
const OS_STATE_SNAPSHOT_DIR: &str = "state-snapshot";
const OS_INCOMING_BUNDLE_FILE: &str = "incoming.raucb";
const OS_RAUC_STATUS_FILE: &str = "rauc.status";

/// A data root: the one way to name a path under it.
///
/// It deliberately does not deref to [`Path`]: a path under the root is
/// built by one of the methods here, never by joining names elsewhere.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DataRoot(PathBuf);

impl DataRoot {
    pub fn new(root: impl Into<PathBuf>) -> DataRoot {
        DataRoot(root.into())
    }

    /// The root itself: the mount point of the data disk.
    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn display(&self) -> std::path::Display<'_> {
        self.0.display()
    }

    fn top(&self, name: &'static str) -> PathBuf {
        self.0.join(name)
    }

    /// `<data>/<id>/`: an app's own data, owned by the app's user.
    pub fn app_dir(&self, app: &AppId) -> PathBuf {
        self.0.join(app.as_str())
    }

    /// The app folder `path` lies in: the name of its first component
    /// under the root, when that is a name an app id can take (not one of
    /// [`Self::RESERVED_NAMES`]). `None` for a path outside the root, the
    /// root itself, or the node's own folders.
    pub fn app_folder_of<'p>(&self, path: &'p Path) -> Option<&'p str> {
        path.strip_prefix(&self.0)
            .ok()
            .and_then(|rest| rest.components().next())
            .and_then(|c| c.as_os_str().to_str())
            .filter(|first| AppId::parse(first).is_some() && !Self::RESERVED_NAMES.contains(first))
    }

    /// `<data>/apps/`: dev mode's apps folder.
    pub fn dev_apps_dir(&self) -> PathBuf {
        self.top(Self::APPS)
    }

    /// `<data>/config/`: the node's configuration (0700).
    pub fn config_dir(&self) -> PathBuf {
        self.top(Self::CONFIG)
    }

    /// The folder the image may seed (its files are copied onto a data
    /// disk that lacks them): the configuration folder.
    pub fn seed_dir(&self) -> PathBuf {
        self.config_dir()
    }

    /// `<data>/config/registries.json` (0600): the registry list.
    pub fn registries(&self) -> PathBuf {
        self.config_dir().join(REGISTRIES_FILE)
    }

    /// `<data>/containers/`: container storage, given to the agent's user
    /// before any engine runs.
    pub fn containers_dir(&self) -> PathBuf {
        self.top(Self::CONTAINERS)
    }

    /// `<data>/containers/storage`: the rootful engine's `graphroot`.
    pub fn rootful_storage(&self) -> PathBuf {
        self.containers_dir().join(ROOTFUL_STORAGE_DIR)
    }

    /// `<data>/containers/rootless`: the rootless engine's
    /// `rootless_storage_path` (the node's default engine).
    pub fn rootless_storage(&self) -> PathBuf {
        self.containers_dir().join(ROOTLESS_STORAGE_DIR)
    }

    /// `<data>/secrets/` (0700): the node's canonical secrets.
    pub fn secrets_dir(&self) -> PathBuf {
        self.top(Self::SECRETS)
    }

    /// `<data>/secrets/<name>` (0600): a secret's canonical value.
    pub fn secret(&self, name: &str) -> PathBuf {
        self.secrets_dir().join(name)
    }

    /// `<data>/secrets/apps/<id>/<name>`: an app's own copy of a secret,
    /// owned by the app's user.
    pub fn app_secret(&self, app: &AppId, name: &str) -> PathBuf {
        self.secrets_dir().join(APP_SECRETS_DIR).join(app.as_str()).join(name)
    }

    /// `<data>/state/`: what the agent remembers across restarts.
    pub fn state_dir(&self) -> PathBuf {
        self.top(Self::STATE)
    }

    /// `<data>/state/agent.json` (0600): backoff, drift history, adoptions.
    pub fn agent_state(&self) -> PathBuf {
        self.state_dir().join(AGENT_STATE_FILE)
    }

    /// `<data>/state/agent.lock` (0600): the data root's one writer lock;
    /// `archy-agent boot` holds it for its life, an in-process command
    /// while it acts (`writer.rs`).
    pub fn writer_lock(&self) -> PathBuf {
        self.state_dir().join(WRITER_LOCK_FILE)
    }

    /// `<data>/state/images.json` (0644): the pre-pulled images' ledger.
    pub fn images_ledger(&self) -> PathBuf {
        self.state_dir().join(IMAGES_LEDGER_FILE)
    }

    /// `<data>/state/held/`: one marker per app its owner stopped.
    pub fn held_dir(&self) -> PathBuf {
        self.state_dir().join(HELD_DIR)
    }

    /// `<data>/state/held/<app>`: present while the owner wants `app`
    /// stopped. `app` is a loaded manifest's id.
    pub fn held_marker(&self, app: &str) -> PathBuf {
        self.held_dir().join(app)
    }

    /// `<data>/state/upgrades/` (0700): the journals of upgrades in flight.
    pub fn upgrades_dir(&self) -> PathBuf {
        self.state_dir().join(UPGRADES_DIR)
    }

    /// `<data>/state/upgrades/<app>.json` (0600): the journal of `app`'s
    /// upgrade in flight, one record per step; gone once it committed or
    /// rolled back. `app` is a loaded manifest's id.
    pub fn upgrade_journal(&self, app: &str) -> PathBuf {
        self.upgrades_dir().join(format!("{app}{JOURNAL_SUFFIX}"))
    }

    /// `<data>/system/` (root, 0755): the OS's own files kept across boots.
    pub fn system_dir(&self) -> PathBuf {
        self.top(Self::SYSTEM)
    }

    /// `<data>/state/os-download.raucb` (the agent's user, 0600): a bundle
    /// `os update URL` downloaded, before the root helper takes it.
    pub fn os_download(&self) -> PathBuf {
        self.state_dir().join(OS_DOWNLOAD_FILE)
    }

    /// `<data>/system/machine-id` (root, 0644): the node's `machine-id`,
    /// 32 hex digits, made once by the installer; the installed boot
    /// entries carry it as `systemd.machine_id=`.
    pub fn machine_id_file(&self) -> PathBuf {
        self.system_dir().join(MACHINE_ID_FILE)
    }

    /// `<data>/system/ssh/` (root, 0700): the SSH host key, made once.
    pub fn ssh_host_keys_dir(&self) -> PathBuf {
        self.system_dir().join(SSH_HOST_KEYS_DIR)
    }

    /// `<data>/system/ssh/ssh_host_ed25519_key` (root, 0600), and its
    /// `.pub`: the node's one SSH host key (sshd's `HostKey`).
    pub fn ssh_host_key_file(&self) -> PathBuf {
        self.ssh_host_keys_dir().join(SSH_HOST_KEY_FILE)
    }

    /// `<data>/system/ssh/ssh_host_ed25519_key.pub` (root, 0644): its
    /// public half.
    pub fn ssh_host_key_pub_file(&self) -> PathBuf {
        self.ssh_host_keys_dir().join(SSH_HOST_KEY_PUB_FILE)
    }

    /// `<data>/system/journal/` (root): bound on `/var/log/journal` by
    /// `data-disk`, the persistent journal.
    pub fn journal_dir(&self) -> PathBuf {
        self.system_dir().join(JOURNAL_DIR)
    }

    /// `<data>/system/os/` (root, 0700): the records of OS updates, kept
    /// across boots and releases (`os/records.rs`, `docs/updates.md`).
    pub fn os_dir(&self) -> PathBuf {
        self.system_dir().join(OS_DIR)
    }

    /// `<data>/system/os/trial.json` (root, 0600): the release on trial,
    /// from its install until its commit.
    pub fn os_trial(&self) -> PathBuf {
        self.os_dir().join(OS_TRIAL_FILE)
    }

    /// `<data>/system/os/rollback.json` (root, 0600): the last rollback.
    pub fn os_rollback(&self) -> PathBuf {
        self.os_dir().join(OS_ROLLBACK_FILE)
    }

    /// `<data>/system/os/state-snapshot/` (root, 0700): a copy of
    /// [`Self::state_dir`] taken before a release on trial first ran its
    /// agent; put back if the node rolls back.
    pub fn os_state_snapshot(&self) -> PathBuf {
        self.os_dir().join(OS_STATE_SNAPSHOT_DIR)
    }

    /// `<data>/system/os/incoming.raucb` (root, 0600): the update
    /// helper's copy of the bundle being installed.
    pub fn os_incoming_bundle(&self) -> PathBuf {
        self.os_dir().join(OS_INCOMING_BUNDLE_FILE)
    }

    /// `<data>/system/os/rauc.status` (root, 0600): RAUC's status file
    /// (`statusfile=` in the generated `system.conf`).
    pub fn os_rauc_status(&self) -> PathBuf {
        self.os_dir().join(OS_RAUC_STATUS_FILE)
    }

    /// `<data>/ssh/` (`archipelago`, 0700): the login user's SSH files.
    pub fn ssh_dir(&self) -> PathBuf {
        self.top(Self::SSH)
    }

    /// `<data>/ssh/authorized_keys` (`archipelago`, 0600): the keys that
    /// may log in as `archipelago` (sshd's `AuthorizedKeysFile`).
    pub fn authorized_keys_file(&self) -> PathBuf {
        self.ssh_dir().join(AUTHORIZED_KEYS_FILE)
    }

    /// The app a file in [`Self::upgrades_dir`] journals, from its name;
    /// `None` for anything else there (a temporary file).
    pub fn journaled_app(file_name: &str) -> Option<&str> {
        file_name
            .strip_suffix(JOURNAL_SUFFIX)
            .filter(|app| AppId::parse(app).is_some())
    }
}

impl Default for DataRoot {
    fn default() -> Self {
        DataRoot::new(DEFAULT_DATA_ROOT)
    }
}

impl From<PathBuf> for DataRoot {
    fn from(root: PathBuf) -> Self {
        DataRoot(root)
    }
}

impl From<&Path> for DataRoot {
    fn from(root: &Path) -> Self {
        DataRoot(root.to_path_buf())
    }
}

/// For clap (`--data`, `ARCHY_DATA`).
impl From<OsString> for DataRoot {
    fn from(root: OsString) -> Self {
        DataRoot(root.into())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn id(s: &str) -> AppId {
        AppId::parse(s).unwrap()
    }

    #[test]
    fn the_layout_is_the_documented_one() {
        let d = DataRoot::default();
        let p = |s: &str| PathBuf::from(s);
        assert_eq!(d.path(), Path::new("/var/lib/archipelago"));
        assert_eq!(d.app_dir(&id("bitcoin-core")), p("/var/lib/archipelago/bitcoin-core"));
        assert_eq!(d.dev_apps_dir(), p("/var/lib/archipelago/apps"));
        assert_eq!(d.config_dir(), p("/var/lib/archipelago/config"));
        assert_eq!(d.seed_dir(), p("/var/lib/archipelago/config"));
        assert_eq!(d.registries(), p("/var/lib/archipelago/config/registries.json"));
        assert_eq!(d.containers_dir(), p("/var/lib/archipelago/containers"));
        assert_eq!(d.rootful_storage(), p("/var/lib/archipelago/containers/storage"));
        assert_eq!(d.rootless_storage(), p("/var/lib/archipelago/containers/rootless"));
        assert_eq!(d.secrets_dir(), p("/var/lib/archipelago/secrets"));
        assert_eq!(d.secret("rpc"), p("/var/lib/archipelago/secrets/rpc"));
        assert_eq!(
            d.app_secret(&id("wallet"), "rpc"),
            p("/var/lib/archipelago/secrets/apps/wallet/rpc")
        );
        assert_eq!(d.state_dir(), p("/var/lib/archipelago/state"));
        assert_eq!(d.agent_state(), p("/var/lib/archipelago/state/agent.json"));
        assert_eq!(d.writer_lock(), p("/var/lib/archipelago/state/agent.lock"));
        assert_eq!(d.images_ledger(), p("/var/lib/archipelago/state/images.json"));
        assert_eq!(d.held_dir(), p("/var/lib/archipelago/state/held"));
        assert_eq!(d.held_marker("wallet"), p("/var/lib/archipelago/state/held/wallet"));
        assert_eq!(d.upgrades_dir(), p("/var/lib/archipelago/state/upgrades"));
        assert_eq!(
            d.upgrade_journal("wallet"),
            p("/var/lib/archipelago/state/upgrades/wallet.json")
        );
        assert_eq!(d.system_dir(), p("/var/lib/archipelago/system"));
        assert_eq!(d.machine_id_file(), p("/var/lib/archipelago/system/machine-id"));
        assert_eq!(d.ssh_host_keys_dir(), p("/var/lib/archipelago/system/ssh"));
        assert_eq!(
            d.ssh_host_key_file(),
            p("/var/lib/archipelago/system/ssh/ssh_host_ed25519_key")
        );
        assert_eq!(
            d.ssh_host_key_pub_file(),
            p("/var/lib/archipelago/system/ssh/ssh_host_ed25519_key.pub")
        );
        assert_eq!(d.journal_dir(), p("/var/lib/archipelago/system/journal"));
        assert_eq!(d.os_dir(), p("/var/lib/archipelago/system/os"));
        assert_eq!(d.os_trial(), p("/var/lib/archipelago/system/os/trial.json"));
        assert_eq!(d.os_rollback(), p("/var/lib/archipelago/system/os/rollback.json"));
        assert_eq!(
            d.os_state_snapshot(),
            p("/var/lib/archipelago/system/os/state-snapshot")
        );
        assert_eq!(
            d.os_incoming_bundle(),
            p("/var/lib/archipelago/system/os/incoming.raucb")
        );
        assert_eq!(d.os_rauc_status(), p("/var/lib/archipelago/system/os/rauc.status"));
        assert_eq!(d.ssh_dir(), p("/var/lib/archipelago/ssh"));
        assert_eq!(d.authorized_keys_file(), p("/var/lib/archipelago/ssh/authorized_keys"));
        assert_eq!(DataRoot::journaled_app("wallet.json"), Some("wallet"));
        assert_eq!(DataRoot::journaled_app(".wallet.json.1.2.tmp"), None);
    }

    /// Every path the node owns starts with a reserved name, so no app's
    /// folder can ever be one of them.
    #[test]
    fn every_node_path_lies_under_a_reserved_name() {
        let d = DataRoot::new("/d");
        let app = id("x");
        for path in [
            d.dev_apps_dir(),
            d.config_dir(),
            d.seed_dir(),
            d.registries(),
            d.containers_dir(),
            d.rootful_storage(),
            d.rootless_storage(),
            d.secrets_dir(),
            d.secret("s"),
            d.app_secret(&app, "s"),
            d.state_dir(),
            d.agent_state(),
            d.writer_lock(),
            d.images_ledger(),
            d.held_dir(),
            d.held_marker("x"),
            d.system_dir(),
            d.machine_id_file(),
            d.ssh_host_keys_dir(),
            d.ssh_host_key_file(),
            d.ssh_host_key_pub_file(),
            d.journal_dir(),
            d.os_dir(),
            d.os_trial(),
            d.os_rollback(),
            d.os_state_snapshot(),
            d.os_incoming_bundle(),
            d.os_rauc_status(),
            d.ssh_dir(),
            d.authorized_keys_file(),
        ] {
            let first = path.strip_prefix("/d").unwrap().components().next().unwrap();
            let first = first.as_os_str().to_str().unwrap();
            assert!(DataRoot::RESERVED_NAMES.contains(&first), "{}", path.display());
            assert_eq!(d.app_folder_of(&path), None, "{}", path.display());
        }
        assert_eq!(d.app_folder_of(&d.app_dir(&app).join("data")), Some("x"));
    }

    #[test]
    fn reserved_names_are_the_nodes_own_folders() {
        // The ones manifests first refused, and `ssh` and `system` (issue
        // 15); sorted, as the error message lists them.
        assert_eq!(
            DataRoot::RESERVED_NAMES,
            [
                "apps",
                "config",
                "containers",
                "images",
                "secrets",
                "ssh",
                "state",
                "storage",
                "system"
            ]
        );
        for name in DataRoot::RESERVED_NAMES {
            assert!(
                AppId::parse(name).is_some(),
                "{name} would be a valid id if not reserved"
            );
        }
    }

    #[test]
    fn app_folder_of_refuses_paths_outside_or_at_the_root() {
        let d = DataRoot::new("/var/lib/archipelago");
        assert_eq!(d.app_folder_of(Path::new("/var/lib/archipelago")), None);
        assert_eq!(d.app_folder_of(Path::new("/var/lib/archipelago2/x")), None);
        assert_eq!(d.app_folder_of(Path::new("/srv/x/y")), None);
        assert_eq!(d.app_folder_of(Path::new("/var/lib/archipelago/Not-An-App/x")), None);
        assert_eq!(
            d.app_folder_of(Path::new("/var/lib/archipelago/store-db/exports")),
            Some("store-db")
        );
    }

    /// The repository's root (the agent crate's parent).
    fn repo() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    fn read(rel: &str) -> String {
        std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("cannot read {rel}: {e}"))
    }

    /// Every file under `dir`, recursively, relative to `dir`.
    fn files_under(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut todo = vec![PathBuf::new()];
        while let Some(rel) = todo.pop() {
            for entry in std::fs::read_dir(dir.join(&rel)).unwrap() {
                let entry = entry.unwrap();
                let rel = rel.join(entry.file_name());
                if entry.file_type().unwrap().is_dir() {
                    todo.push(rel);
                } else {
                    out.push(rel);
                }
            }
        }
        out
    }

    /// `key = "value"` in an INI/TOML-like file, the value unquoted.
    fn setting<'t>(text: &'t str, key: &str) -> Option<&'t str> {
        text.lines().find_map(|line| {
            let (k, v) = line.split_once('=')?;
            (k.trim() == key).then(|| v.trim().trim_matches('"'))
        })
    }

    /// The data root's paths the files outside Rust may name.
    fn known_paths(d: &DataRoot) -> Vec<PathBuf> {
        vec![
            d.path().to_path_buf(),
            d.dev_apps_dir(),
            d.config_dir(),
            d.registries(),
            d.containers_dir(),
            d.rootful_storage(),
            d.rootless_storage(),
            d.secrets_dir(),
            d.state_dir(),
            d.agent_state(),
            d.writer_lock(),
            d.images_ledger(),
            d.held_dir(),
            d.upgrades_dir(),
            d.system_dir(),
            d.machine_id_file(),
            d.ssh_host_keys_dir(),
            d.ssh_host_key_file(),
            d.ssh_host_key_pub_file(),
            d.journal_dir(),
            d.os_dir(),
            d.os_trial(),
            d.os_rollback(),
            d.os_state_snapshot(),
            d.os_incoming_bundle(),
            d.os_rauc_status(),
            d.ssh_dir(),
            d.authorized_keys_file(),
        ]
    }

    /// Container storage and the units name the data root in files that
    /// are not Rust: they must name the paths `DataRoot` gives, or the
    /// engine would keep its images where the data disk is not.
    #[test]
    fn the_files_outside_rust_name_the_data_roots_paths() {
        let d = DataRoot::default();
        let storage = read("rootfs/overlay/etc/containers/storage.conf");
        assert_eq!(
            setting(&storage, "graphroot").map(PathBuf::from),
            Some(d.rootful_storage()),
            "storage.conf's graphroot"
        );
        assert_eq!(
            setting(&storage, "rootless_storage_path").map(PathBuf::from),
            Some(d.rootless_storage()),
            "storage.conf's rootless_storage_path"
        );
        let unit = read("rootfs/units/archy-data.service");
        let exec = setting(&unit, "ExecStart").expect("archy-data.service has an ExecStart");
        let words: Vec<&str> = exec.split_whitespace().collect();
        let data = words.windows(2).find(|w| w[0] == "--data").map(|w| Path::new(w[1]));
        assert_eq!(
            data,
            Some(d.path()),
            "archy-data.service mounts the disk at the data root: {exec}"
        );
    }

    /// Anywhere in `rootfs/`, `iso/` and the e2e overlay, a path under the default data
    /// root is one `DataRoot` knows, and the overlay puts files under the
    /// data root only in the seed folder (the mounted disk hides the rest).
    #[test]
    fn every_data_root_path_in_the_image_files_is_a_known_one() {
        let d = DataRoot::default();
        let known = known_paths(&d);
        let prefix = DEFAULT_DATA_ROOT;
        let mut seen = 0;
        // The node's image files, and the test image's (the e2e probe).
        for top in ["rootfs", "iso", "xtask/tests/fixtures/e2e/overlay"] {
            let dir = repo().join(top);
            for rel in files_under(&dir) {
                let shown = Path::new(top).join(&rel);
                let in_image = Path::new("/").join(rel.strip_prefix("overlay").unwrap_or(&rel));
                assert!(
                    !in_image.starts_with(prefix) || in_image.starts_with(d.seed_dir()),
                    "{}: the mounted data disk hides what the image has under the data root; \
                     only the seed folder {} is copied onto it",
                    shown.display(),
                    d.seed_dir().display()
                );
                let Ok(text) = std::fs::read_to_string(dir.join(&rel)) else {
                    continue;
                };
                for (at, _) in text.match_indices(prefix) {
                    let path: String = text[at..]
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '_' | '-'))
                        .collect();
                    let path = PathBuf::from(path.trim_end_matches(['.', '/']));
                    // The test probe may also read and write inside an
                    // app's own folder (the e2e app data kept across a
                    // reinstall); the node's own files never do.
                    let in_test_app = top.ends_with("e2e/overlay") && d.app_folder_of(&path).is_some();
                    assert!(
                        known.contains(&path) || in_test_app,
                        "{} names {}, which is not a path of DataRoot (agent/src/dataroot.rs): {:?}",
                        shown.display(),
                        path.display(),
                        known
                    );
                    seen += 1;
                }
            }
        }
        // storage.conf's two, the data unit's two, the probe's two, at least.
        assert!(
            seen >= 6,
            "only {seen} mentions of {prefix} found: is this the repository?"
        );
    }

    #[test]
    fn docs_describe_every_top_level_entry() {
        let doc = read("docs/data-root.md");
        for name in DataRoot::RESERVED_NAMES {
            assert!(
                doc.contains(&format!("`{name}/`")),
                "docs/data-root.md does not describe `{name}/`"
            );
        }
        // The manifest format lists the names an id may not take.
        let listed: Vec<String> = DataRoot::RESERVED_NAMES.iter().map(|n| format!("`{n}`")).collect();
        let listed = format!("({})", listed.join(", "));
        assert!(
            read("docs/manifest.md").contains(&listed),
            "docs/manifest.md's `id` row does not list {listed}"
        );
    }
}
