//! What the agent remembers across restarts: backoff, drift history and
//! adoptions, in `<data>/state/agent.json`.
//!
//! The engine stays the source of truth: this file only carries what the
//! engine cannot tell (how often an app failed, which containers were
//! claimed). A corrupt file is moved aside with a warning and the agent
//! starts from what the engine shows.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::plan::{AppMemory, Restarted};
use crate::dataroot::DataRoot;
use crate::fsutil;
use crate::manifest::AppId;
use crate::orchestrator::LastRestart;

const VERSION: u32 = 1;

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    apps: BTreeMap<String, AppRecord>,
}

#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct AppRecord {
    #[serde(default)]
    failures: u32,
    /// Unix seconds.
    #[serde(default)]
    next_try: Option<u64>,
    /// Unix seconds.
    #[serde(default)]
    drift_recreates: Vec<u64>,
    #[serde(default)]
    drift_loop_hash: Option<String>,
    #[serde(default)]
    adopted: Option<String>,
    /// Config files rewritten that the running container has not read yet.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    config_changed: Vec<String>,
    /// The last action taken and why (absent in files older than it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_restart: Option<LastRestart>,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Instant <-> wall clock, anchored at one moment taken together.
struct Anchor {
    instant: Instant,
    wall: SystemTime,
}

impl Anchor {
    fn now() -> Anchor {
        Anchor {
            instant: Instant::now(),
            wall: SystemTime::now(),
        }
    }

    fn unix_of(&self, t: Instant) -> u64 {
        let wall = if t >= self.instant {
            self.wall + (t - self.instant)
        } else {
            self.wall - (self.instant - t)
        };
        unix(wall)
    }

    fn instant_of(&self, secs: u64) -> Instant {
        let wall = UNIX_EPOCH + Duration::from_secs(secs);
        match wall.duration_since(self.wall) {
            Ok(ahead) => self.instant + ahead,
            Err(e) => self.instant.checked_sub(e.duration()).unwrap_or(self.instant),
        }
    }

    /// A remembered event: never after now. One that reads as later comes
    /// from a clock that went back since (a dead RTC battery, a boot
    /// before the network set the time): it happened at the latest now.
    fn past_of(&self, secs: u64) -> Instant {
        self.instant_of(secs).min(self.instant)
    }

    /// A remembered next try after `failures` failures: never further
    /// than the backoff it was set for, whatever the clock did since.
    fn next_try_of(&self, secs: u64, failures: u32) -> Instant {
        self.instant_of(secs)
            .min(self.instant + super::backoff::delay(failures))
    }
}

/// The state file's bytes read as this agent reads them.
fn parse(bytes: &[u8]) -> Result<StateFile, String> {
    let file = serde_json::from_slice::<StateFile>(bytes).map_err(|e| e.to_string())?;
    if file.version == VERSION {
        Ok(file)
    } else {
        Err(format!("unknown version {}", file.version))
    }
}

/// Whether `bytes` are a state file this agent reads (what [`load`] would
/// otherwise move aside), and why not.
pub fn check(bytes: &[u8]) -> Result<(), String> {
    parse(bytes).map(drop)
}

/// The last restart of each app, by app id, as `list` and `status` show
/// it. Read only: a file that is missing or cannot be read gives none
/// (the reconcile loop, its writer, deals with a corrupt one).
pub fn last_restarts(data_root: &DataRoot) -> BTreeMap<String, LastRestart> {
    let Ok(bytes) = std::fs::read(data_root.agent_state()) else {
        return BTreeMap::new();
    };
    match serde_json::from_slice::<StateFile>(&bytes) {
        Ok(file) => file
            .apps
            .into_iter()
            .filter_map(|(app, r)| Some((app, r.last_restart?)))
            .collect(),
        Err(_) => BTreeMap::new(),
    }
}

/// Loads the remembered state. A missing file is an empty state; a file
/// that cannot be read as state is moved aside and reported, never fatal.
pub fn load(data_root: &DataRoot) -> BTreeMap<AppId, AppMemory> {
    let path = data_root.agent_state();
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return BTreeMap::new(),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the agent state; starting from the engine");
            return BTreeMap::new();
        }
    };
    let file = match parse(&bytes) {
        Ok(f) => f,
        Err(error) => {
            match fsutil::move_aside(&path) {
                Ok(aside) => tracing::warn!(
                    path = %path.display(), aside = %aside.display(), error,
                    "agent state is corrupt; moved aside, rebuilding from the engine"
                ),
                Err(e) => tracing::warn!(
                    path = %path.display(), error, move_error = %e,
                    "agent state is corrupt and could not be moved aside; rebuilding from the engine"
                ),
            }
            return BTreeMap::new();
        }
    };
    let anchor = Anchor::now();
    file.apps
        .into_iter()
        .filter_map(|(app, r)| {
            let id = AppId::parse(&app)?;
            Some((
                id,
                AppMemory {
                    failures: r.failures,
                    next_try: r.next_try.map(|s| anchor.next_try_of(s, r.failures)),
                    drift_recreates: r.drift_recreates.iter().map(|s| anchor.past_of(*s)).collect(),
                    drift_loop_hash: r.drift_loop_hash,
                    adopted: r.adopted,
                    config_changed: r.config_changed,
                    last_restart: r.last_restart.map(|l| Restarted {
                        reason: l.reason,
                        ok: l.ok,
                        at: anchor.past_of(l.at),
                    }),
                    ..AppMemory::default()
                },
            ))
        })
        .collect()
}

/// Writes the state atomically (temp file, fsync, rename, fsync folder).
pub fn save(data_root: &DataRoot, memory: &BTreeMap<AppId, AppMemory>) -> anyhow::Result<()> {
    let anchor = Anchor::now();
    let file = StateFile {
        version: VERSION,
        apps: memory
            .iter()
            .map(|(app, m)| {
                (
                    app.to_string(),
                    AppRecord {
                        failures: m.failures,
                        next_try: m.next_try.map(|t| anchor.unix_of(t)),
                        drift_recreates: m.drift_recreates.iter().map(|t| anchor.unix_of(*t)).collect(),
                        drift_loop_hash: m.drift_loop_hash.clone(),
                        adopted: m.adopted.clone(),
                        config_changed: m.config_changed.clone(),
                        last_restart: m.last_restart.as_ref().map(|l| LastRestart {
                            reason: l.reason.clone(),
                            ok: l.ok,
                            at: anchor.unix_of(l.at),
                        }),
                    },
                )
            })
            .filter(|(_, r)| *r != AppRecord::default())
            .collect(),
    };
    let path = data_root.agent_state();
    let bytes = serde_json::to_vec_pretty(&file).context("cannot encode the agent state")?;
    fsutil::write_atomic(&path, &bytes, 0o600).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn state_round_trips_failures_adoptions_drift_loops_and_pending_restarts() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let app = AppId::parse("electrs").expect("id");
        let mem = AppMemory {
            failures: 3,
            next_try: Some(Instant::now() + Duration::from_secs(40)),
            drift_loop_hash: Some("abc".to_owned()),
            adopted: Some("c0ffee".to_owned()),
            config_changed: vec!["data/app.conf".to_owned()],
            ..AppMemory::default()
        };
        save(
            &DataRoot::new(tmp.path()),
            &BTreeMap::from([(app.clone(), mem.clone())]),
        )
        .expect("save");
        let loaded = load(&DataRoot::new(tmp.path()));
        let got = &loaded[&app];
        assert_eq!(
            (got.failures, &got.drift_loop_hash, &got.adopted),
            (3, &mem.drift_loop_hash, &mem.adopted)
        );
        assert_eq!(
            got.config_changed,
            ["data/app.conf"],
            "a pending restart survives the agent"
        );
        let left = got.next_try.expect("next try") - Instant::now();
        assert!(
            left > Duration::from_secs(35) && left <= Duration::from_secs(41),
            "{left:?}"
        );
    }

    #[test]
    fn a_clock_that_went_back_never_stretches_a_backoff_or_moves_events_into_the_future() {
        // Written when the clock read 200 days later than now (a node
        // whose clock is wrong at this boot): a backoff that would wait
        // 200 days, events that read as still to come.
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = DataRoot::new(tmp.path()).agent_state();
        std::fs::create_dir_all(path.parent().expect("dir")).expect("mkdir");
        let later = unix(SystemTime::now()) + 200 * 86_400;
        std::fs::write(
            &path,
            format!(
                r#"{{"version": 1, "apps": {{"electrs": {{"failures": 1, "next_try": {}, "drift_recreates": [{later}],
                "drift_loop_hash": null, "adopted": null,
                "last_restart": {{"reason": "exited 137", "ok": false, "at": {later}}}}}}}}}"#,
                later + 10
            ),
        )
        .expect("write");
        let before = Instant::now();
        let loaded = load(&DataRoot::new(tmp.path()));
        let got = &loaded[&AppId::parse("electrs").expect("id")];
        let wait = got
            .next_try
            .expect("next try")
            .saturating_duration_since(Instant::now());
        assert!(wait <= crate::reconcile::backoff::MAX, "waits {wait:?}");
        assert!(got.drift_recreates.iter().all(|t| *t <= Instant::now()));
        let at = got.last_restart.as_ref().expect("last restart").at;
        assert!(
            at >= before && at <= Instant::now(),
            "the restart reads as now at the latest"
        );
    }

    #[test]
    fn a_corrupt_state_file_is_moved_aside_and_the_state_starts_empty() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = DataRoot::new(tmp.path()).agent_state();
        std::fs::create_dir_all(path.parent().expect("dir")).expect("mkdir");
        std::fs::write(&path, b"{\"version\": 1, \"apps\": {\"x\": {\"failures\": \"many\"").expect("write");
        assert!(load(&DataRoot::new(tmp.path())).is_empty());
        assert!(!path.exists(), "moved aside");
        let aside: Vec<_> = std::fs::read_dir(path.parent().expect("dir"))
            .expect("ls")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("agent.json.corrupt-"))
            .collect();
        assert_eq!(aside.len(), 1, "the corrupt bytes are kept for a person to look at");
    }

    #[tokio::test]
    async fn the_last_restart_round_trips_and_a_file_from_before_it_still_loads() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = DataRoot::new(tmp.path());
        let path = root.agent_state();
        std::fs::create_dir_all(path.parent().expect("dir")).expect("mkdir");
        // Written by the agent before it kept the last restart.
        std::fs::write(
            &path,
            br#"{"version": 1, "apps": {"electrs": {"failures": 2, "next_try": null, "drift_recreates": [], "drift_loop_hash": null, "adopted": null}}}"#,
        )
        .expect("write");
        let app = AppId::parse("electrs").expect("id");
        let mut memory = load(&root);
        assert_eq!(memory[&app].failures, 2, "an older file loads");
        assert!(path.exists(), "and is not moved aside");
        assert!(last_restarts(&root).is_empty());

        let wall = unix(SystemTime::now());
        memory.get_mut(&app).expect("loaded").last_restart = Some(Restarted {
            reason: "unhealthy: 3 failed probes".to_owned(),
            ok: true,
            at: Instant::now(),
        });
        save(&root, &memory).expect("save");
        let shown = &last_restarts(&root)["electrs"];
        assert_eq!((shown.reason.as_str(), shown.ok), ("unhealthy: 3 failed probes", true));
        assert!(shown.at.abs_diff(wall) <= 2, "{} vs {wall}", shown.at);
        let loaded = load(&root);
        assert_eq!(
            loaded[&app].last_restart.as_ref().map(|l| l.reason.as_str()),
            Some("unhealthy: 3 failed probes")
        );
    }
}
