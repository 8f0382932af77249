//! Stopping every app when the node shuts down (`archy-agent shutdown`, the
//! `ExecStop` of `archy-apps.service`).
//!
//! Without it, systemd's user manager sends SIGTERM to every container's
//! scope and SIGKILL 90 s later, whatever the app's `stop_grace_period`: a
//! bitcoind still flushing its chainstate is killed, and a container whose
//! PID 1 has no SIGTERM handler (the kernel drops the signal for a PID
//! namespace's init) holds the whole shutdown for those 90 s. Here each app
//! gets `podman stop` with its own grace period, and only once every app
//! that depends on it is down, the reverse of the start order.
//!
//! An app whose manifest has become invalid is stopped too, found by its
//! container's app label, with the stop timeout the container has.
//!
//! No hold marker is written: the next boot starts every app again, as
//! after a power loss. Adoption is unaffected: a stopped container keeps
//! its id and is started, never recreated.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use futures_util::future::join_all;

use super::{Orchestrator, OrchestratorError, Result};
use crate::engine::{ContainerStatus, EngineError};
use crate::manifest::Manifest;
use crate::spec::LABEL_APP;

/// A leftover container's grace when it reports no stop timeout: the
/// manifests' default.
const DEFAULT_GRACE: Duration = Duration::from_secs(30);

/// What the shutdown did to one app.
#[derive(Debug)]
pub struct StopOutcome {
    pub app: String,
    pub container: String,
    pub result: Result<Stopped>,
}

/// An app the shutdown found and stopped (or found already down).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// Stopped (or already stopped) within its grace period, or killed at
    /// its end.
    Down { took: Duration },
    /// It has no container: nothing to stop.
    NotInstalled,
}

impl Orchestrator {
    /// Stops every app's container with its grace period, dependents
    /// before what they depend on, apps of one wave side by side. One
    /// app's failure never keeps the others running.
    pub async fn shutdown(&self) -> Vec<StopOutcome> {
        let mut outcomes = Vec::new();
        for wave in stop_waves(&self.manifests()) {
            outcomes.extend(join_all(wave.iter().map(|m| self.stop_for_shutdown(m))).await);
        }
        outcomes.extend(self.stop_unlisted(&outcomes).await);
        outcomes
    }

    /// Stops the running containers of apps whose manifest is there but
    /// invalid now (an edit gone wrong), found by their app label, each
    /// with the stop timeout it was created with: their data deserves the
    /// same care as any app's. Only apps of this apps folder: an engine may
    /// serve other agents too (tests share one).
    async fn stop_unlisted(&self, done: &[StopOutcome]) -> Vec<StopOutcome> {
        let invalid: BTreeSet<String> = self
            .report()
            .errors
            .iter()
            .filter_map(|e| e.file.parent()?.file_name()?.to_str().map(str::to_owned))
            .collect();
        if invalid.is_empty() {
            return Vec::new();
        }
        let containers = match self.engine.list().await {
            // One the engine cannot describe cannot be stopped with care either.
            Ok(listing) => listing.containers,
            Err(e) => {
                return vec![StopOutcome {
                    app: "(apps without a valid manifest)".to_owned(),
                    container: String::new(),
                    result: Err(OrchestratorError::Engine {
                        app: "(apps without a valid manifest)".to_owned(),
                        source: e,
                    }),
                }]
            }
        };
        let leftovers: Vec<(String, String)> = containers
            .into_iter()
            .filter(|c| c.status == ContainerStatus::Running)
            .filter(|c| !done.iter().any(|o| o.container == c.name))
            .filter_map(|c| c.labels.get(LABEL_APP).map(|app| (app.clone(), c.name)))
            .filter(|(app, _)| invalid.contains(app))
            .collect();
        join_all(leftovers.into_iter().map(|(app, name)| async move {
            let started = Instant::now();
            let stopped = match self.engine.inspect(&name).await {
                Ok(info) => {
                    self.engine
                        .stop(&name, info.stop_timeout.unwrap_or(DEFAULT_GRACE))
                        .await
                }
                Err(e) => Err(e),
            };
            let result = stop_result(&app, stopped, started);
            StopOutcome {
                app,
                container: name,
                result,
            }
        }))
        .await
    }

    async fn stop_for_shutdown(&self, m: &Manifest) -> StopOutcome {
        let app = m.id.to_string();
        let spec = match self.spec(m).await {
            Ok(spec) => spec,
            Err(e) => {
                return StopOutcome {
                    container: String::new(),
                    app,
                    result: Err(e),
                }
            }
        };
        // An operation of a CLI still in flight finishes first.
        let _guard = self.locks.lock(&app).await;
        let started = Instant::now();
        let stopped = self.engine.stop(&spec.name, spec.stop_grace_period).await;
        let result = stop_result(&app, stopped, started);
        StopOutcome {
            app,
            container: spec.name,
            result,
        }
    }
}

/// What one stop, begun at `started`, did to `app`: a container that is
/// not there had nothing to stop.
fn stop_result(app: &str, stopped: Result<(), EngineError>, started: Instant) -> Result<Stopped> {
    match stopped {
        Ok(()) => Ok(Stopped::Down {
            took: started.elapsed(),
        }),
        Err(EngineError::NotFound { .. }) => Ok(Stopped::NotInstalled),
        Err(e) => Err(OrchestratorError::Engine {
            app: app.to_owned(),
            source: e,
        }),
    }
}

/// Groups `apps` (in start order) into waves to stop one after the other:
/// an app's wave comes after the waves of every app that depends on it.
/// Apps caught in a dependency cycle (start order puts them last) are
/// stopped with the first wave that reaches them rather than never.
pub fn stop_waves(apps: &[Manifest]) -> Vec<Vec<Manifest>> {
    // Walking the start order backwards, every dependent of an app comes
    // before it (cycles aside), so its wave is already known.
    let mut wave_of: Vec<usize> = vec![0; apps.len()];
    for i in (0..apps.len()).rev() {
        wave_of[i] = apps
            .iter()
            .enumerate()
            .skip(i + 1)
            .filter(|(_, other)| other.depends_on.contains(&apps[i].id))
            .map(|(j, _)| wave_of[j] + 1)
            .max()
            .unwrap_or(0);
    }
    let count = wave_of.iter().max().map_or(0, |w| w + 1);
    let mut waves: Vec<Vec<Manifest>> = vec![Vec::new(); count];
    for (app, wave) in apps.iter().zip(wave_of) {
        waves[wave].push(app.clone());
    }
    waves
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::start_order;

    use crate::manifest::test_app as app;

    fn ids(waves: &[Vec<Manifest>]) -> Vec<Vec<String>> {
        waves
            .iter()
            .map(|w| w.iter().map(|m| m.id.to_string()).collect())
            .collect()
    }

    #[test]
    fn dependents_stop_in_a_wave_before_what_they_depend_on() {
        let apps = start_order(&[
            app("bitcoin-core", &[]),
            app("electrs", &["bitcoin-core"]),
            app("lnd", &["bitcoin-core"]),
            app("lnd-ui", &["lnd"]),
            app("electrs-ui", &["electrs"]),
            app("notes", &[]),
        ]);
        assert_eq!(
            ids(&stop_waves(&apps)),
            vec![
                vec!["notes", "electrs-ui", "lnd-ui"],
                vec!["electrs", "lnd"],
                vec!["bitcoin-core"]
            ]
        );
    }

    #[test]
    fn a_chain_stops_one_app_per_wave_from_its_end() {
        let apps = start_order(&[app("a", &[]), app("b", &["a"]), app("c", &["b"])]);
        assert_eq!(ids(&stop_waves(&apps)), vec![vec!["c"], vec!["b"], vec!["a"]]);
    }

    #[test]
    fn apps_in_a_cycle_are_still_stopped() {
        let apps = start_order(&[app("x", &["y"]), app("y", &["x"]), app("z", &[])]);
        let waves = ids(&stop_waves(&apps));
        let mut all: Vec<String> = waves.into_iter().flatten().collect();
        all.sort();
        assert_eq!(all, vec!["x", "y", "z"]);
    }

    #[test]
    fn no_apps_no_waves() {
        assert!(stop_waves(&[]).is_empty());
    }
}
