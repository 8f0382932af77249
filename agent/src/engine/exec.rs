//! Running a command in a container and reading how it ended.

use std::time::Duration;

use bollard::exec::{StartExecOptions, StartExecResults};
use bollard::models::ExecConfig;
use futures_util::StreamExt as _;

use super::{Engine, EngineError, Result};

/// Output an exec keeps; the rest is read and dropped, so that a chatty
/// command cannot exhaust the agent's memory.
const MAX_EXEC_OUTPUT: usize = 1 << 20;
/// Between polls for an exec's exit code, which Podman may set a moment
/// after the output ends.
const EXEC_POLL: Duration = Duration::from_millis(50);

/// What a command run in a container printed, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub exit_code: i64,
    /// stdout and stderr interleaved as they came, lossily decoded, cut
    /// after 1 MiB.
    pub output: String,
}

impl Engine {
    /// Runs `cmd` in the running container and waits for it, at most
    /// `timeout` (`ExecTimeout`; the process may live on, as the API cannot
    /// kill it).
    pub async fn exec(&self, name: &str, cmd: &[String], timeout: Duration) -> Result<ExecOutput> {
        tokio::time::timeout(timeout, self.exec_to_end(name, cmd))
            .await
            .map_err(|_| EngineError::ExecTimeout {
                container: name.to_owned(),
                timeout,
            })?
    }

    async fn exec_to_end(&self, name: &str, cmd: &[String]) -> Result<ExecOutput> {
        let what = || format!("container {name}");
        let config = ExecConfig {
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            cmd: Some(cmd.to_vec()),
            ..Default::default()
        };
        let created = self
            .docker
            .create_exec(name, config)
            .await
            .map_err(self.classify(what))?;
        let options = StartExecOptions {
            detach: false,
            tty: false,
            output_capacity: None,
        };
        let started = self
            .docker
            .start_exec(&created.id, Some(options))
            .await
            .map_err(self.classify(what))?;
        let mut output = Vec::new();
        if let StartExecResults::Attached { output: mut chunks, .. } = started {
            while let Some(chunk) = chunks.next().await {
                let chunk = chunk.map_err(self.classify(what))?.into_bytes();
                let room = MAX_EXEC_OUTPUT.saturating_sub(output.len());
                output.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
        }
        // The caller's timeout bounds this wait.
        loop {
            let inspected = match self.docker.inspect_exec(&created.id).await {
                Ok(inspected) => inspected,
                Err(err) => {
                    return Err(match self.classify(what)(err) {
                        // Podman removes an ended exec session after
                        // containers.conf's exit_command_delay.
                        EngineError::NotFound { .. } => EngineError::Api {
                            status: 404,
                            message: format!(
                                "the exec session in container {name} was removed before its exit code was read \
                                 (is exit_command_delay 0 in containers.conf?)"
                            ),
                        },
                        other => other,
                    });
                }
            };
            match (inspected.running, inspected.exit_code) {
                (Some(true), _) | (_, None) => tokio::time::sleep(EXEC_POLL).await,
                (_, Some(exit_code)) => {
                    return Ok(ExecOutput {
                        exit_code,
                        output: String::from_utf8_lossy(&output).into_owned(),
                    })
                }
            }
        }
    }
}
