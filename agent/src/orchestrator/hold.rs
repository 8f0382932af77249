//! The owner's hold on a stopped app: a marker file that the reconcile
//! loop respects (see [`super::HoldPolicy`]).

use std::fs;
use std::path::PathBuf;

use anyhow::Context as _;

use super::{Orchestrator, Result};

impl Orchestrator {
    /// `<data>/state/held/<app>`: present while the owner wants the app
    /// stopped. A file, so the CLI and the running agent agree on it.
    fn hold_marker(&self, app: &str) -> PathBuf {
        self.config.data_root.held_marker(app)
    }

    /// Whether the owner stopped `app` and reconcile must leave it so.
    pub fn is_held(&self, app: &str) -> bool {
        self.hold_marker(app).exists()
    }

    pub(super) fn set_held(&self, app: &str, held: bool) -> Result<()> {
        let marker = self.hold_marker(app);
        if held {
            let dir = marker.parent().context("the hold marker has a folder")?;
            fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            crate::fsutil::write_atomic(&marker, b"stopped by its owner\n", 0o644)
                .with_context(|| format!("cannot write {}", marker.display()))?;
        } else {
            match fs::remove_file(&marker) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(anyhow::Error::new(e)
                        .context(format!("cannot remove {}", marker.display()))
                        .into())
                }
            }
        }
        Ok(())
    }
}
