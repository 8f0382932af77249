//! Retrying what the boot import skipped. An archive can fail for a
//! reason that passes (the engine refused it for a while, the file was
//! unreadable until a disk settled or an owner put it back): each skipped
//! entry is tried again on a later reconcile pass, with the crash-loop
//! backoff (10 s doubling to 5 minutes), until it is in the store or gone
//! from the lock. The lock is read afresh for every retry, so a fixed
//! folder is seen.

use std::collections::BTreeMap;

use tokio::time::Instant;

use super::{import_entry, load_lock, EntryOutcome, ImportReport, Outcome};
use crate::dataroot::DataRoot;
use crate::engine::Engine;
use crate::manifest::Digest;
use crate::reconcile::backoff;

/// The entries still to import, each with its failures so far and when
/// it may be tried next.
#[derive(Debug)]
pub struct ImportRetry {
    dir: std::path::PathBuf,
    data_root: DataRoot,
    /// By (app, config digest), as the lock names an entry.
    pending: BTreeMap<(String, Digest), Pending>,
    /// The lock itself could not be used at boot: retry the whole folder.
    whole_folder: Option<Pending>,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    failures: u32,
    next: Instant,
}

impl Pending {
    fn first(now: Instant) -> Pending {
        Pending {
            failures: 1,
            next: now + backoff::delay(1),
        }
    }

    fn failed_again(&mut self, now: Instant) {
        self.failures = self.failures.saturating_add(1);
        self.next = now + backoff::delay(self.failures);
    }
}

impl ImportRetry {
    /// What `report` (the boot import's) left to do, the first retry due
    /// one backoff step after `now`.
    pub fn from_report(report: &ImportReport, data_root: &DataRoot, now: Instant) -> ImportRetry {
        let pending = report
            .entries
            .iter()
            .filter(|e| matches!(e.outcome, Outcome::Skipped { .. }))
            .map(|e| ((e.app.clone(), e.config_digest.clone()), Pending::first(now)))
            .collect();
        ImportRetry {
            dir: report.dir.clone(),
            data_root: data_root.clone(),
            pending,
            whole_folder: report.error.is_some().then(|| Pending::first(now)),
        }
    }

    /// Nothing left to retry.
    pub fn is_done(&self) -> bool {
        self.pending.is_empty() && self.whole_folder.is_none()
    }

    /// When the next retry is due, if any is left.
    pub fn next_due(&self) -> Option<Instant> {
        self.pending.values().chain(&self.whole_folder).map(|p| p.next).min()
    }

    /// Retries every entry whose backoff has ended by `now`: imported (or
    /// found in the store) ones are done and recorded in the ledger, failed
    /// ones wait longer. Returns what was tried; cheap when nothing is due.
    pub async fn retry_due(&mut self, engine: &Engine, now: Instant) -> Vec<EntryOutcome> {
        if self.next_due().is_none_or(|due| due > now) {
            return Vec::new();
        }
        if let Some(whole) = &mut self.whole_folder {
            if whole.next > now {
                return Vec::new();
            }
            // The lock was unusable at boot: a fresh import decides all.
            let report = super::import_all(engine, &self.dir, &self.data_root).await;
            if report.error.is_some() {
                whole.failed_again(now);
                return report.entries;
            }
            let mut fresh = ImportRetry::from_report(&report, &self.data_root, now);
            fresh.whole_folder = None;
            *self = fresh;
            return report.entries;
        }
        let lock = match load_lock(&self.dir) {
            Ok(lock) => lock,
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %crate::error_chain(&e), "image lock unusable; import retried later");
                for p in self.pending.values_mut().filter(|p| p.next <= now) {
                    p.failed_again(now);
                }
                return Vec::new();
            }
        };
        let mut tried = Vec::new();
        let due: Vec<(String, Digest)> = self
            .pending
            .iter()
            .filter(|(_, p)| p.next <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            let Some(entry) = lock.images.iter().find(|e| e.app == key.0 && e.config_digest == key.1) else {
                tracing::info!(app = %key.0, config_digest = %key.1, "no longer in the image lock; not retried");
                self.pending.remove(&key);
                continue;
            };
            let outcome = import_entry(engine, &self.dir, &self.data_root, &lock, entry).await;
            match &outcome.outcome {
                Outcome::Skipped { reason } => {
                    if let Some(p) = self.pending.get_mut(&key) {
                        p.failed_again(now);
                        tracing::warn!(app = %entry.app, reason, failures = p.failures, retry_in_s = backoff::delay(p.failures).as_secs(), "image archive still not imported");
                    }
                }
                Outcome::Imported { .. } | Outcome::AlreadyPresent => {
                    tracing::info!(app = %entry.app, config_digest = %entry.config_digest, outcome = outcome.outcome.name(), "image archive imported on retry");
                    self.pending.remove(&key);
                }
            }
            tried.push(outcome);
        }
        tried
    }
}
