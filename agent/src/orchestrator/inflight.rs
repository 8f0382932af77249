//! The reconcile actions running right now, one at most per app: the one
//! place that knows, read by the planner (never a second action for an app
//! with one in flight) and by `list` and `status` (what the app is waiting
//! for).
//!
//! An entry lives exactly as long as its [`InFlightGuard`]: the task that
//! carries out the action holds it, so an action that ends in any way
//! (done, failed, panicked, cancelled) leaves the set.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// One action in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InFlight {
    /// The action's name, as the pass report spells it (`install`, `restart`, …).
    pub action: String,
    pub since: Instant,
}

/// An action in flight, as `list` and `status` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InFlightStatus {
    pub action: String,
    /// How long it has been running.
    pub for_secs: u64,
}

impl InFlight {
    pub fn status(&self, now: Instant) -> InFlightStatus {
        InFlightStatus {
            action: self.action.clone(),
            for_secs: now.saturating_duration_since(self.since).as_secs(),
        }
    }
}

type Map = BTreeMap<String, InFlight>;

/// The set of apps with an action in flight.
#[derive(Debug, Default)]
pub struct InFlightSet {
    apps: Arc<Mutex<Map>>,
}

impl InFlightSet {
    fn map(&self) -> std::sync::MutexGuard<'_, Map> {
        // A poisoned map only means a thread panicked while holding it;
        // each insert and remove is whole.
        self.apps.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks `app` busy with `action` until the guard drops. `None` when
    /// it already has an action in flight: never two at once.
    pub fn begin(&self, app: &str, action: &str, now: Instant) -> Option<InFlightGuard> {
        let mut map = self.map();
        if map.contains_key(app) {
            return None;
        }
        map.insert(
            app.to_owned(),
            InFlight {
                action: action.to_owned(),
                since: now,
            },
        );
        Some(InFlightGuard {
            app: app.to_owned(),
            apps: self.apps.clone(),
        })
    }

    pub fn get(&self, app: &str) -> Option<InFlight> {
        self.map().get(app).cloned()
    }

    /// Every app with an action in flight, at one moment.
    pub fn snapshot(&self) -> Map {
        self.map().clone()
    }
}

/// Keeps one app in the set; dropping it takes the app out.
#[derive(Debug)]
pub struct InFlightGuard {
    app: String,
    apps: Arc<Mutex<Map>>,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.apps.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.app);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_action_per_app_and_the_guard_ends_it() {
        let set = InFlightSet::default();
        let now = Instant::now();
        let a = set.begin("a", "install", now).expect("a is free");
        assert!(
            set.begin("a", "start", now).is_none(),
            "a second action for a is refused"
        );
        let b = set.begin("b", "start", now).expect("b does not wait for a");
        assert_eq!(set.snapshot().len(), 2);
        assert_eq!(set.get("a").map(|f| f.action), Some("install".to_owned()));
        drop(a);
        assert!(set.get("a").is_none(), "a's guard dropped: a is free");
        assert!(set.get("b").is_some());
        drop(b);
        assert!(set.snapshot().is_empty());
    }

    #[tokio::test]
    async fn status_says_how_long() {
        let since = Instant::now();
        let f = InFlight {
            action: "install".to_owned(),
            since,
        };
        let s = f.status(since + std::time::Duration::from_secs(7));
        assert_eq!((s.action.as_str(), s.for_secs), ("install", 7));
    }
}
