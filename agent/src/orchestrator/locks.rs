//! One async mutex per app, created on first use.
//!
//! Every mutating operation holds its app's lock, so two operations on one
//! app never interleave, while operations on different apps run side by
//! side. Finding an app's lock takes only a read lock on the map; the
//! write lock is taken once per app, the first time.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use tokio::sync::{Mutex, OwnedMutexGuard};

#[derive(Debug, Default)]
pub struct AppLocks {
    locks: RwLock<HashMap<String, Arc<Mutex<()>>>>,
}

impl AppLocks {
    fn lock_for(&self, app: &str) -> Arc<Mutex<()>> {
        // A poisoned map only means another thread panicked while holding
        // it; the map itself is still consistent (inserts are atomic).
        if let Some(lock) = self.locks.read().unwrap_or_else(|p| p.into_inner()).get(app) {
            return lock.clone();
        }
        let mut map = self.locks.write().unwrap_or_else(|p| p.into_inner());
        map.entry(app.to_owned()).or_default().clone()
    }

    /// Waits for `app`'s lock.
    pub async fn lock(&self, app: &str) -> OwnedMutexGuard<()> {
        self.lock_for(app).lock_owned().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn same_app_shares_one_lock_and_other_apps_do_not_wait() {
        let locks = AppLocks::default();
        let held = locks.lock("a").await;
        assert!(locks.lock_for("a").try_lock().is_err(), "a is held");
        assert!(locks.lock_for("b").try_lock().is_ok(), "b is free");
        drop(held);
        assert!(locks.lock_for("a").try_lock().is_ok(), "a is released");
    }
}
