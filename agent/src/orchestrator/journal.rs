//! The upgrade journal: an upgrade is a sequence of steps, each recorded in
//! `<data>/state/upgrades/<app>.json` (atomically, before the step runs),
//! so that an agent killed at any point finishes or undoes it at its next
//! start ([`recover_upgrades`]), before anything else acts.
//!
//! The rule is the health gate: the new container is kept only when the
//! journal says it passed it ([`Step::Commit`]); otherwise the previous
//! container (the backup) is restored under the app's name, with the config
//! files as they were before. The previous files are kept beside the new
//! ones (moved, never copied: bytes, mode and owner stay as they were)
//! until the upgrade commits. See docs/upgrades.md.

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::appdir::{AppDir, ConfineError};
use crate::dataroot::DataRoot;
use crate::engine::{Engine, EngineError};
use crate::fsutil;
use crate::manifest::AppId;

/// Suffix of a managed app's previous config file, kept beside the new one
/// while an upgrade runs; removed when it commits, put back on rollback.
pub const PRE_UPGRADE: &str = ".pre-upgrade";

/// The environment variable that names a fail-point (builds with the
/// `failpoints` feature only): `upgrade:<step>` aborts the process right
/// after that step is journaled.
pub const FAILPOINT_ENV: &str = "ARCHY_FAILPOINT";

/// One step of an upgrade, recorded before it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// The journal exists; nothing is changed yet.
    Begin,
    /// Stopping the old container.
    Stop,
    /// Renaming the old container to the backup's name.
    Rename,
    /// Moving the previous config files aside and rendering the new ones.
    Render,
    /// Creating the new container.
    Create,
    /// Starting it.
    Start,
    /// Waiting for it to pass its health gate.
    Health,
    /// It passed: removing the backup and the kept files. From here on a
    /// restart finishes the upgrade instead of undoing it.
    Commit,
}

impl Step {
    /// Every step, in order.
    pub const ALL: [Step; 8] = [
        Step::Begin,
        Step::Stop,
        Step::Rename,
        Step::Render,
        Step::Create,
        Step::Start,
        Step::Health,
        Step::Commit,
    ];

    /// The step's name, as in the journal and the fail-point.
    pub fn name(self) -> &'static str {
        match self {
            Step::Begin => "begin",
            Step::Stop => "stop",
            Step::Rename => "rename",
            Step::Render => "render",
            Step::Create => "create",
            Step::Start => "start",
            Step::Health => "health",
            Step::Commit => "commit",
        }
    }
}

/// A config file the upgrade renders anew.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournaledFile {
    /// As the manifest names it, relative to the app's data folder.
    pub rel: PathBuf,
    /// Where the previous file is kept (relative to the app's data folder,
    /// beside it) while the upgrade runs. `None`: there was no file, and a
    /// rollback removes the rendering.
    pub aside: Option<PathBuf>,
}

/// What an upgrade in flight has done, and what undoing it needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journal {
    pub app: String,
    /// The app's container name.
    pub container: String,
    /// The name the old container takes while the new one proves itself.
    pub backup: String,
    /// The old container's id: the one a rollback keeps.
    pub old_id: String,
    pub old_image_id: String,
    pub new_image_id: String,
    /// Converting an adopted container: the owner's own files stay beside
    /// the rendered ones (`.pre-archipelago`) after the commit.
    pub keep_aside: bool,
    pub files: Vec<JournaledFile>,
    /// The steps begun, in order.
    pub steps: Vec<Step>,
}

impl Journal {
    /// Records `step` (the whole journal, atomically, 0600: the kept file
    /// names are no secret, but the folder is the agent's alone), then runs
    /// the fail-point of that step, if one is set.
    pub fn record(&mut self, data_root: &DataRoot, step: Step) -> anyhow::Result<()> {
        self.steps.push(step);
        let path = data_root.upgrade_journal(&self.app);
        let bytes = serde_json::to_vec_pretty(self).context("cannot encode the upgrade journal")?;
        fsutil::ensure_private_dir(&data_root.upgrades_dir())
            .and_then(|()| fsutil::write_atomic(&path, &bytes, 0o600))
            .with_context(|| format!("{}: cannot write the upgrade journal {}", self.app, path.display()))?;
        tracing::debug!(app = self.app, step = step.name(), "upgrade step journaled");
        failpoint(step);
        Ok(())
    }

    /// Whether the new container passed its health gate.
    pub fn committed(&self) -> bool {
        self.steps.contains(&Step::Commit)
    }

    /// Reads `app`'s journal; `None` when no upgrade of it is in flight.
    pub fn load(data_root: &DataRoot, app: &str) -> anyhow::Result<Option<Journal>> {
        let path = data_root.upgrade_journal(app);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read the upgrade journal {}", path.display())),
        };
        let journal: Journal = serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "the upgrade journal {} is not valid JSON of a journal; fix or remove it by hand",
                path.display()
            )
        })?;
        if journal.app != app {
            anyhow::bail!(
                "the upgrade journal {} is for app {:?}, not {app:?}; fix or remove it by hand",
                path.display(),
                journal.app
            );
        }
        Ok(Some(journal))
    }

    /// Removes the journal: the upgrade is over.
    fn close(&self, data_root: &DataRoot) -> anyhow::Result<()> {
        let path = data_root.upgrade_journal(&self.app);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot remove the upgrade journal {}", path.display())),
        }
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .with_context(|| format!("cannot sync {}", dir.display()))?;
        }
        Ok(())
    }

    fn app_dir(&self, data_root: &DataRoot) -> anyhow::Result<Option<AppDir>> {
        let id = AppId::parse(&self.app)
            .with_context(|| format!("the upgrade journal names {:?}, which is no app id", self.app))?;
        Ok(AppDir::open(data_root, &id)?)
    }

    /// Moves each previous config file aside (never over an earlier copy),
    /// before the new ones are rendered. Journaled first ([`Step::Render`]).
    pub fn set_files_aside(&self, data_root: &DataRoot) -> anyhow::Result<()> {
        let Some(dir) = self.app_dir(data_root)? else {
            return Ok(());
        };
        for f in &self.files {
            let Some(aside) = &f.aside else { continue };
            dir.rename_file(&f.rel, aside.file_name().unwrap_or_default())
                .map_err(anyhow::Error::from)
                .with_context(|| {
                    format!(
                        "{}: cannot keep {} as {} (an earlier copy there is never replaced: move it away to upgrade the app)",
                        self.app,
                        f.rel.display(),
                        aside.display()
                    )
                })?;
            tracing::info!(app = self.app, file = %f.rel.display(), aside = %aside.display(), "previous config file kept aside");
        }
        Ok(())
    }

    /// Puts every previous config file back over the rendering (a file
    /// that did not exist before is removed), so the restored container
    /// reads what it read before. A file never moved is left as it is.
    pub fn restore_files(&self, data_root: &DataRoot) -> anyhow::Result<()> {
        let Some(dir) = self.app_dir(data_root)? else {
            return Ok(());
        };
        for f in &self.files {
            let restored = match &f.aside {
                Some(aside) => match dir.rename_file_over(aside, f.rel.file_name().unwrap_or_default()) {
                    Ok(()) => Ok(true),
                    Err(ConfineError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => Ok(false),
                    Err(e) => Err(e),
                },
                None => dir.remove_file(&f.rel),
            };
            let restored = restored
                .map_err(anyhow::Error::from)
                .with_context(|| format!("{}: cannot put {} back as it was", self.app, f.rel.display()))?;
            if restored {
                tracing::info!(app = self.app, file = %f.rel.display(), "config file restored as before the upgrade");
            }
        }
        Ok(())
    }

    /// After the commit: the kept previous files of a managed app go (an
    /// adopted app's own files stay, as `.pre-archipelago`).
    fn drop_kept_files(&self, data_root: &DataRoot) -> anyhow::Result<()> {
        if self.keep_aside {
            return Ok(());
        }
        let Some(dir) = self.app_dir(data_root)? else {
            return Ok(());
        };
        for aside in self.files.iter().filter_map(|f| f.aside.as_ref()) {
            dir.remove_file(aside)
                .map_err(anyhow::Error::from)
                .with_context(|| format!("{}: cannot remove {}", self.app, aside.display()))?;
        }
        Ok(())
    }

    /// Finishes the upgrade after its health gate: the backup and the kept
    /// files go, then the journal.
    pub async fn commit(&self, engine: &Engine, data_root: &DataRoot) -> anyhow::Result<()> {
        match engine.force_remove(&self.backup).await {
            Ok(()) | Err(EngineError::NotFound { .. }) => {}
            Err(e) => return Err(e).with_context(|| format!("{}: cannot remove the backup {}", self.app, self.backup)),
        }
        self.drop_kept_files(data_root)?;
        self.close(data_root)
    }

    /// Undoes the upgrade: whatever runs under the app's name that is not
    /// the old container is removed, the backup takes the name back, the
    /// config files are put back, and the old container is started. Then
    /// the journal goes. Data folders are never touched.
    pub async fn roll_back(&self, engine: &Engine, data_root: &DataRoot) -> anyhow::Result<()> {
        let app = &self.app;
        match engine.inspect(&self.container).await {
            Ok(info) if info.id == self.old_id => {}
            Ok(_) => engine
                .force_remove(&self.container)
                .await
                .or_else(ignore_not_found)
                .with_context(|| format!("{app}: cannot remove the new container {}", self.container))?,
            Err(EngineError::NotFound { .. }) => {}
            Err(e) => return Err(e).with_context(|| format!("{app}: cannot inspect {}", self.container)),
        }
        match engine.inspect(&self.backup).await {
            Ok(_) => engine
                .rename(&self.backup, &self.container)
                .await
                .with_context(|| format!("{app}: cannot rename the backup {} to {}", self.backup, self.container))?,
            Err(EngineError::NotFound { .. }) => {}
            Err(e) => return Err(e).with_context(|| format!("{app}: cannot inspect {}", self.backup)),
        }
        // The files before the start: the old container must read its own.
        self.restore_files(data_root)?;
        engine
            .start(&self.container)
            .await
            .with_context(|| format!("{app}: cannot start the restored container {}", self.container))?;
        self.close(data_root)
    }
}

fn ignore_not_found(e: EngineError) -> Result<(), EngineError> {
    match e {
        EngineError::NotFound { .. } => Ok(()),
        e => Err(e),
    }
}

/// The name a previous config file `rel` takes while an upgrade runs.
pub fn aside_of(rel: &Path, suffix: &str) -> PathBuf {
    let mut name: OsString = rel.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    rel.with_file_name(name)
}

/// How an interrupted upgrade ended at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Recovered {
    /// Its new container had passed its health gate: kept, backup removed.
    Finished,
    /// It had not: the previous container and config files are back.
    RolledBack,
}

/// One journal found at start, and what became of it.
#[derive(Debug, Clone)]
pub struct Recovery {
    pub app: String,
    /// The error leaves the journal in place: the next start tries again.
    pub outcome: Result<Recovered, String>,
}

/// Finishes or undoes `journal`'s upgrade (see the module's rule).
pub async fn recover(engine: &Engine, data_root: &DataRoot, journal: &Journal) -> anyhow::Result<Recovered> {
    let steps: Vec<_> = journal.steps.iter().map(|s| s.name()).collect();
    if journal.committed() {
        tracing::warn!(
            app = journal.app,
            ?steps,
            "finishing an interrupted upgrade: its new container passed its health gate"
        );
        journal.commit(engine, data_root).await?;
        Ok(Recovered::Finished)
    } else {
        tracing::warn!(
            app = journal.app,
            ?steps,
            "undoing an interrupted upgrade: its new container never passed its health gate"
        );
        journal.roll_back(engine, data_root).await?;
        Ok(Recovered::RolledBack)
    }
}

/// Finishes or undoes every upgrade journaled under `<data>/state/upgrades/`.
/// Called once at start, before anything else acts on a container (the
/// daemon, and a CLI command that works on the engine without one). A
/// journal that cannot be handled is logged and left for the next start.
pub async fn recover_upgrades(engine: &Engine, data_root: &DataRoot) -> Vec<Recovery> {
    let dir = data_root.upgrades_dir();
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            tracing::error!(dir = %dir.display(), error = %e, "cannot list the upgrade journals");
            return vec![Recovery {
                app: String::new(),
                outcome: Err(format!("cannot list {}: {e}", dir.display())),
            }];
        }
    };
    let mut apps: Vec<String> = entries
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(DataRoot::journaled_app)
                .map(str::to_owned)
        })
        .collect();
    apps.sort();
    let mut out = Vec::new();
    for app in apps {
        let outcome = async {
            match Journal::load(data_root, &app)? {
                Some(journal) => recover(engine, data_root, &journal).await.map(Some),
                None => Ok(None),
            }
        }
        .await;
        let outcome = match outcome {
            Ok(None) => continue,
            Ok(Some(r)) => {
                tracing::info!(app, outcome = ?r, "interrupted upgrade handled");
                Ok(r)
            }
            Err(e) => {
                let error = format!("{e:#}");
                tracing::error!(
                    app,
                    error,
                    "cannot finish or undo an interrupted upgrade; left for the next start"
                );
                Err(error)
            }
        };
        out.push(Recovery { app, outcome });
    }
    out
}

/// Aborts the process right after `step` was journaled when
/// [`FAILPOINT_ENV`] names it: for the tests of the recovery.
#[cfg(feature = "failpoints")]
fn failpoint(step: Step) {
    let Ok(wanted) = std::env::var(FAILPOINT_ENV) else {
        return;
    };
    if wanted.strip_prefix("upgrade:") == Some(step.name()) {
        eprintln!("{FAILPOINT_ENV}: upgrade:{} reached; aborting", step.name());
        std::process::abort();
    }
}

/// Without the `failpoints` feature there are none.
#[cfg(not(feature = "failpoints"))]
fn failpoint(_step: Step) {}

/// Whether this build has fail-points (never a release agent's).
pub const FAILPOINTS: bool = cfg!(feature = "failpoints");

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn journal() -> Journal {
        Journal {
            app: "wallet".to_owned(),
            container: "wallet".to_owned(),
            backup: "wallet-archy-backup".to_owned(),
            old_id: "old".to_owned(),
            old_image_id: "sha256:a".to_owned(),
            new_image_id: "sha256:b".to_owned(),
            keep_aside: false,
            files: vec![
                JournaledFile {
                    rel: PathBuf::from("conf/wallet.conf"),
                    aside: Some(aside_of(Path::new("conf/wallet.conf"), PRE_UPGRADE)),
                },
                JournaledFile {
                    rel: PathBuf::from("new.conf"),
                    aside: None,
                },
            ],
            steps: Vec::new(),
        }
    }

    #[test]
    fn each_step_is_recorded_atomically_and_read_back() {
        let tmp = tempfile::tempdir().unwrap();
        let root = DataRoot::new(tmp.path());
        let mut j = journal();
        assert_eq!(Journal::load(&root, "wallet").unwrap(), None);
        for step in Step::ALL {
            j.record(&root, step).unwrap();
            let back = Journal::load(&root, "wallet").unwrap().unwrap();
            assert_eq!(back, j);
            assert_eq!(back.steps.last(), Some(&step));
            assert_eq!(back.committed(), step == Step::Commit);
        }
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(root.upgrade_journal("wallet"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // Nothing but the journal in its folder: no temporary file left.
        let names: Vec<_> = std::fs::read_dir(root.upgrades_dir())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, vec![OsString::from("wallet.json")]);
        j.close(&root).unwrap();
        assert_eq!(Journal::load(&root, "wallet").unwrap(), None);
    }

    #[test]
    fn a_broken_journal_is_an_error_naming_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let root = DataRoot::new(tmp.path());
        std::fs::create_dir_all(root.upgrades_dir()).unwrap();
        std::fs::write(root.upgrade_journal("wallet"), b"{half").unwrap();
        let e = format!("{:#}", Journal::load(&root, "wallet").unwrap_err());
        assert!(e.contains("state/upgrades/wallet.json"), "{e}");
        assert!(e.contains("fix or remove it"), "{e}");
    }

    #[test]
    fn files_are_set_aside_then_put_back_byte_for_byte() {
        let tmp = tempfile::tempdir().unwrap();
        let root = DataRoot::new(tmp.path());
        let app = tmp.path().join("wallet");
        std::fs::create_dir_all(app.join("conf")).unwrap();
        std::fs::write(app.join("conf/wallet.conf"), b"old bytes").unwrap();
        let j = journal();
        j.set_files_aside(&root).unwrap();
        assert!(!app.join("conf/wallet.conf").exists());
        assert_eq!(
            std::fs::read(app.join("conf/wallet.conf.pre-upgrade")).unwrap(),
            b"old bytes"
        );
        // The new version's rendering.
        std::fs::write(app.join("conf/wallet.conf"), b"new bytes").unwrap();
        std::fs::write(app.join("new.conf"), b"new file").unwrap();
        j.restore_files(&root).unwrap();
        assert_eq!(std::fs::read(app.join("conf/wallet.conf")).unwrap(), b"old bytes");
        assert!(!app.join("conf/wallet.conf.pre-upgrade").exists());
        assert!(
            !app.join("new.conf").exists(),
            "a file the old version did not have goes"
        );
        // Restoring again (a second interrupted start) changes nothing.
        j.restore_files(&root).unwrap();
        assert_eq!(std::fs::read(app.join("conf/wallet.conf")).unwrap(), b"old bytes");
    }

    #[test]
    fn an_earlier_kept_copy_is_never_overwritten() {
        let tmp = tempfile::tempdir().unwrap();
        let root = DataRoot::new(tmp.path());
        let app = tmp.path().join("wallet");
        std::fs::create_dir_all(app.join("conf")).unwrap();
        std::fs::write(app.join("conf/wallet.conf"), b"current").unwrap();
        std::fs::write(app.join("conf/wallet.conf.pre-upgrade"), b"someone's").unwrap();
        let e = format!("{:#}", journal().set_files_aside(&root).unwrap_err());
        assert!(e.contains("wallet.conf.pre-upgrade"), "{e}");
        assert_eq!(
            std::fs::read(app.join("conf/wallet.conf.pre-upgrade")).unwrap(),
            b"someone's"
        );
        assert_eq!(std::fs::read(app.join("conf/wallet.conf")).unwrap(), b"current");
    }
}
