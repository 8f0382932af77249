//! One writer per data root (ARCHITECTURE.md): an exclusive `flock` on
//! `<data>/state/agent.lock`.
//!
//! `archy-agent boot` holds it for its whole life. A command that changes
//! apps either goes through the running agent's control socket (the agent
//! is the writer) or takes the lock and acts in-process; `reconcile --once`
//! and `shutdown` take it too, and are refused while an agent holds it. The
//! kernel drops the lock when its holder exits, however it exits, so a
//! killed holder never leaves the data root locked.
//!
//! The holder writes who it is (pid and command) into the file, for the
//! messages of the ones that wait; the lock itself is only the `flock`.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read as _, Seek as _, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::fs::{flock, FlockOperation};
use serde::{Deserialize, Serialize};

use crate::dataroot::DataRoot;

/// The command `archy-agent boot` writes into the lock file.
pub const AGENT_COMMAND: &str = "boot";
/// How long a command waits while another command holds the lock
/// in-process (an install may pull for minutes) before it gives up.
pub const WAIT: Duration = Duration::from_secs(600);
/// How often a waiting command looks again.
pub const POLL: Duration = Duration::from_millis(200);

/// Who holds the lock, as it wrote itself into the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub pid: u32,
    /// The `archy-agent` subcommand: [`AGENT_COMMAND`] for the agent.
    pub command: String,
}

impl Holder {
    /// The running agent, not a one-shot command.
    pub fn is_agent(&self) -> bool {
        self.command == AGENT_COMMAND
    }
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {} (`archy-agent {}`)", self.pid, self.command)
    }
}

/// `holder`, or "another process" when it did not say (yet).
fn who(holder: Option<&Holder>) -> String {
    holder.map_or_else(|| "another process".to_owned(), Holder::to_string)
}

#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    #[error("cannot open the data root's lock file {}: {source}{}", path.display(), hint(source))]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot lock the data root's lock file {}: {source}", path.display())]
    Lock { path: PathBuf, source: io::Error },
    /// An agent holds the lock: acting beside it would race its passes.
    #[error(
        "an agent is already running on the data root {}: {holder} holds its lock file {}",
        root.display(),
        path.display()
    )]
    AgentRuns {
        root: PathBuf,
        path: PathBuf,
        holder: Holder,
    },
    /// Another command held the lock for all of [`WAIT`].
    #[error(
        "the data root {} is busy: {} has held its lock file {} for {} s; try again when it is done",
        root.display(),
        who(holder.as_ref()),
        path.display(),
        waited.as_secs()
    )]
    Busy {
        root: PathBuf,
        path: PathBuf,
        holder: Option<Holder>,
        waited: Duration,
    },
}

fn hint(e: &io::Error) -> &'static str {
    if e.kind() == io::ErrorKind::PermissionDenied {
        " (run as root or as the agent's user)"
    } else {
        ""
    }
}

/// The data root's writer lock, held until dropped.
#[derive(Debug)]
pub struct WriterLock {
    /// The lock lives as long as this open file.
    _file: File,
    path: PathBuf,
}

impl WriterLock {
    /// Takes the lock if it is free, for `command` (written into the file).
    /// `Ok(None)` when another process holds it.
    pub fn try_acquire(data: &DataRoot, command: &str) -> Result<Option<WriterLock>, WriterError> {
        let path = data.writer_lock();
        let open = |e| WriterError::Open {
            path: path.clone(),
            source: e,
        };
        std::fs::create_dir_all(data.state_dir()).map_err(open)?;
        // 0600: a process that can open the file can hold the lock, and so
        // keep the agent from starting.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(open)?;
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(e) if e == rustix::io::Errno::WOULDBLOCK => return Ok(None),
            Err(e) => return Err(WriterError::Lock { path, source: e.into() }),
        }
        let me = Holder {
            pid: std::process::id(),
            command: command.to_owned(),
        };
        // Only for the messages of those who wait: a failure here leaves
        // the lock held and says so.
        let written = serde_json::to_vec(&me).map_err(io::Error::other).and_then(|json| {
            file.set_len(0)?;
            file.rewind()?;
            file.write_all(&json)
        });
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), error = %e, "cannot write who holds the lock");
        }
        Ok(Some(WriterLock { _file: file, path }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Who holds the lock, as it wrote itself in. `None` when the file is
/// missing, unreadable or not (yet) written.
pub fn holder(data: &DataRoot) -> Option<Holder> {
    let mut text = String::new();
    File::open(data.writer_lock()).ok()?.read_to_string(&mut text).ok()?;
    serde_json::from_str(&text).ok()
}

/// The lock for `command`, which acts on the data root itself (`boot`,
/// `reconcile --once`, `shutdown`): refused at once while an agent holds
/// it, waited for (up to `wait`) while another command does.
pub async fn acquire(data: &DataRoot, command: &str, wait: Duration) -> Result<WriterLock, WriterError> {
    let started = tokio::time::Instant::now();
    let mut told = false;
    loop {
        if let Some(lock) = WriterLock::try_acquire(data, command)? {
            return Ok(lock);
        }
        let holder = holder(data);
        if let Some(agent) = holder.as_ref().filter(|h| h.is_agent()) {
            return Err(WriterError::AgentRuns {
                root: data.path().to_owned(),
                path: data.writer_lock(),
                holder: agent.clone(),
            });
        }
        if started.elapsed() >= wait {
            return Err(busy(data, holder, started.elapsed()));
        }
        if !told {
            tracing::warn!(lock = %data.writer_lock().display(), "waiting for {} to finish", who(holder.as_ref()));
            told = true;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The error for a lock still held after `waited`.
pub fn busy(data: &DataRoot, holder: Option<Holder>, waited: Duration) -> WriterError {
    WriterError::Busy {
        root: data.path().to_owned(),
        path: data.writer_lock(),
        holder,
        waited,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time_and_the_lock_goes_with_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let data = DataRoot::new(tmp.path().join("data"));
        let first = WriterLock::try_acquire(&data, "install").unwrap().expect("free");
        assert_eq!(first.path(), data.writer_lock());
        // A second open file description, even in this process, is refused.
        assert!(WriterLock::try_acquire(&data, "stop").unwrap().is_none());
        assert_eq!(
            holder(&data),
            Some(Holder {
                pid: std::process::id(),
                command: "install".to_owned()
            })
        );
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(data.writer_lock()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        drop(first);
        let second = WriterLock::try_acquire(&data, AGENT_COMMAND)
            .unwrap()
            .expect("free again");
        assert!(
            holder(&data).unwrap().is_agent(),
            "the new holder replaced the old one's record"
        );
        drop(second);
    }

    #[tokio::test]
    async fn acquire_refuses_an_agent_at_once_and_waits_out_a_command() {
        let tmp = tempfile::tempdir().unwrap();
        let data = DataRoot::new(tmp.path());
        let agent = WriterLock::try_acquire(&data, AGENT_COMMAND).unwrap().unwrap();
        let refused = acquire(&data, "reconcile --once", WAIT).await.unwrap_err();
        let text = refused.to_string();
        assert!(matches!(refused, WriterError::AgentRuns { .. }), "{text}");
        assert!(
            text.contains(&data.writer_lock().display().to_string()) && text.contains("archy-agent boot"),
            "{text}"
        );
        drop(agent);

        let command = WriterLock::try_acquire(&data, "install").unwrap().unwrap();
        let busy = acquire(&data, "boot", Duration::ZERO).await.unwrap_err();
        assert!(
            busy.to_string().contains("`archy-agent install`") && busy.to_string().contains("is busy"),
            "{busy}"
        );
        let waiter = tokio::spawn({
            let data = data.clone();
            async move { acquire(&data, "boot", WAIT).await }
        });
        tokio::time::sleep(POLL * 2).await;
        assert!(!waiter.is_finished(), "it waits while a command holds the lock");
        drop(command);
        let lock = waiter.await.unwrap().expect("taken once the command is done");
        assert!(holder(&data).unwrap().is_agent());
        drop(lock);
    }
}
