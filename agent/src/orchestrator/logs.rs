//! An app's logs, bounded: a reply (the CLI's or the control socket's)
//! holds the last [`DEFAULT_LOG_TAIL`] lines unless asked for another
//! count, and never more than [`MAX_LOG_REPLY_BYTES`]; the whole log only
//! ever streams from the engine straight to a terminal
//! ([`Orchestrator::stream_logs`], `archy-agent logs APP --all|--follow`).

use std::fmt;

use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncWrite, AsyncWriteExt as _};

use super::{Orchestrator, Result};

/// Lines a logs reply holds when the caller names no count.
pub const DEFAULT_LOG_TAIL: usize = 1000;
/// The most log bytes one reply carries (16 MiB): a longer one keeps its
/// last lines within this and says it was cut.
pub const MAX_LOG_REPLY_BYTES: usize = 16 << 20;

/// An app's last log lines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogsReport {
    pub app: String,
    /// The line count asked of the engine.
    pub tail: usize,
    pub logs: String,
    /// Set when those lines were more than the reply may carry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cut: Option<LogCut>,
}

/// How a logs reply was cut: its first `dropped_bytes` left out, so that
/// it keeps within `limit_bytes`, starting at a whole line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogCut {
    pub limit_bytes: u64,
    pub dropped_bytes: u64,
}

impl fmt::Display for LogCut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cut to its last {} bytes ({} earlier bytes left out); `--all` streams the whole log",
            self.limit_bytes, self.dropped_bytes
        )
    }
}

impl Orchestrator {
    /// The last `tail` lines of `app`'s log ([`DEFAULT_LOG_TAIL`] when
    /// `None`), cut to this orchestrator's reply limit.
    pub(crate) async fn logs_report(&self, app: &str, tail: Option<usize>) -> Result<LogsReport> {
        let m = self.manifest(app)?;
        let spec = self.spec(&m).await?;
        let tail = tail.unwrap_or(DEFAULT_LOG_TAIL);
        let read = self
            .engine
            .logs_capped(&spec.name, Some(tail), self.log_reply_limit)
            .await
            .map_err(Self::not_installed(app, &spec.name))?;
        let cut = (read.dropped_bytes > 0).then_some(LogCut {
            limit_bytes: self.log_reply_limit as u64,
            dropped_bytes: read.dropped_bytes,
        });
        Ok(LogsReport {
            app: app.to_owned(),
            tail,
            logs: read.text,
            cut,
        })
    }

    /// Copies `app`'s log to `out` as the engine sends it, the last `tail`
    /// lines (`None`: the whole log), and with `follow` what it writes from
    /// then on, until it stops. Never held in memory and never sent through
    /// the control socket: reading takes no app lock, so the CLI does this
    /// over the engine itself.
    pub async fn stream_logs(
        &self,
        app: &str,
        tail: Option<usize>,
        follow: bool,
        out: &mut (impl AsyncWrite + Unpin),
    ) -> Result<()> {
        let m = self.manifest(app)?;
        let spec = self.spec(&m).await?;
        let mut chunks = std::pin::pin!(self.engine.log_stream(&spec.name, tail, follow));
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(Self::not_installed(app, &spec.name))?;
            out.write_all(&chunk).await.map_err(anyhow::Error::from)?;
            // A follower sees each line when it comes.
            out.flush().await.map_err(anyhow::Error::from)?;
        }
        Ok(())
    }

    /// The most log bytes one reply of this orchestrator carries.
    pub fn log_reply_limit(&self) -> usize {
        self.log_reply_limit
    }

    /// This orchestrator with another reply limit than
    /// [`MAX_LOG_REPLY_BYTES`] (tests: a cut without 16 MiB of logs).
    pub fn with_log_reply_limit(mut self, bytes: usize) -> Orchestrator {
        self.log_reply_limit = bytes;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_says_how_much_and_where_the_whole_log_is() {
        let cut = LogCut {
            limit_bytes: 16 << 20,
            dropped_bytes: 12,
        };
        assert_eq!(
            cut.to_string(),
            "cut to its last 16777216 bytes (12 earlier bytes left out); `--all` streams the whole log"
        );
    }

    #[test]
    fn the_defaults_are_a_thousand_lines_and_sixteen_mebibytes() {
        assert_eq!(DEFAULT_LOG_TAIL, 1000);
        assert_eq!(MAX_LOG_REPLY_BYTES, 16 * 1024 * 1024);
    }
}
