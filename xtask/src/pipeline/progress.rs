//! Progress output: every stage says its name, what it is doing, and how
//! long it took; sizes and durations in the units people read.

use std::fs;
use std::io::Write as _;
use std::path::Path;
use std::time::Instant;

use anyhow::Context as _;

use crate::pipeline::report::StageRecord;

/// Stage timing and progress lines: every stage says its name, what it is
/// doing, and how long it took.
#[derive(Debug)]
pub struct Progress {
    started: Instant,
    pub stages: Vec<StageRecord>,
}

/// What a finished stage reports besides its time.
#[derive(Debug, Default)]
pub struct StageOutput {
    pub bytes: Option<u64>,
    pub note: String,
}

impl Progress {
    pub fn new() -> Progress {
        Progress {
            started: Instant::now(),
            stages: Vec::new(),
        }
    }

    pub fn elapsed_seconds(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Runs one stage and records it.
    pub fn stage<T>(
        &mut self,
        name: &str,
        what: &str,
        body: impl FnOnce() -> anyhow::Result<(T, StageOutput)>,
    ) -> anyhow::Result<T> {
        say(name, what);
        let started = Instant::now();
        let result = body();
        let seconds = started.elapsed().as_secs_f64();
        match result {
            Ok((value, out)) => {
                let size = out
                    .bytes
                    .map(|b| format!(", output {}", human_size(b)))
                    .unwrap_or_default();
                let note = if out.note.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", out.note)
                };
                say(name, &format!("done in {}{size}{note}", human_duration(seconds)));
                self.stages.push(StageRecord {
                    name: name.to_owned(),
                    seconds: (seconds * 10.0).round() / 10.0,
                    output_bytes: out.bytes,
                    note: out.note,
                });
                Ok(value)
            }
            Err(e) => {
                say(name, &format!("failed after {}", human_duration(seconds)));
                Err(e)
            }
        }
    }
}

/// One progress line of a stage.
pub fn say(stage: &str, what: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "xtask: [{stage}] {what}");
}

pub fn human_size(bytes: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    if bytes >= 1024 * 1024 {
        format!("{:.1} MiB", bytes as f64 / MIB)
    } else {
        format!("{bytes} bytes")
    }
}

pub fn human_duration(seconds: f64) -> String {
    if seconds < 60.0 {
        format!("{seconds:.1}s")
    } else {
        let whole = seconds.round() as u64;
        format!("{}m{:02}s", whole / 60, whole % 60)
    }
}

/// Bytes of regular files under `dir` (hard links once), like `du -b`.
pub fn tree_size(dir: &Path) -> anyhow::Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))? {
            let entry = entry.with_context(|| format!("listing {}", d.display()))?;
            let meta = entry
                .metadata()
                .with_context(|| format!("reading {}", entry.path().display()))?;
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.is_file() && (meta.nlink() == 1 || seen.insert((meta.dev(), meta.ino()))) {
                total += meta.len();
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(human_duration(3.25), "3.2s");
        assert_eq!(human_duration(125.0), "2m05s");
        assert_eq!(human_size(512), "512 bytes");
        assert_eq!(human_size(3 * 1024 * 1024 + 512 * 1024), "3.5 MiB");
    }
}
