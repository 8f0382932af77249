//! The engine's API by hand (nothing between the bench and the socket), its
//! time stamps, and what `/proc` says about a process.

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context as _};
use serde_json::Value;
use xshell::{cmd, Shell};

use super::{file_size, HTTP_TIMEOUT};
use crate::harness::podman::http_status;
use crate::harness::procs::capture;

/// Parses the engine's `StartedAt` (`2026-11-26T21:35:13.155781398Z`, or
/// with a `±HH:MM` offset).
pub(super) fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let (date, time) = text.split_once('T')?;
    let (clock, offset) = match time.strip_suffix('Z') {
        Some(clock) => (clock, 0),
        None => {
            let at = time.rfind(['+', '-'])?;
            let (clock, zone) = time.split_at(at);
            let sign = if zone.starts_with('-') { -1 } else { 1 };
            let (h, m) = zone[1..].split_once(':')?;
            (
                clock,
                sign * (h.parse::<i64>().ok()? * 3600 + m.parse::<i64>().ok()? * 60),
            )
        }
    };
    // humantime reads UTC (`Z`) only, and nothing before 1970.
    let local = humantime::parse_rfc3339(&format!("{date}T{clock}Z")).ok()?;
    let shift = Duration::from_secs(offset.unsigned_abs());
    let utc = if offset >= 0 {
        local.checked_sub(shift)
    } else {
        local.checked_add(shift)
    };
    utc.filter(|t| *t >= SystemTime::UNIX_EPOCH)
}

// --- The engine's API, by hand: nothing between the bench and the socket.

/// One HTTP/1.1 request on the engine's unix socket (`Connection: close`);
/// the status and the body, de-chunked.
pub(super) fn request(socket: &Path, method: &str, path: &str) -> anyhow::Result<(u16, Vec<u8>)> {
    request_with_body(socket, method, path, None)
}

/// [`request`] with a file as the body (`Content-Length`, streamed).
pub(super) fn request_with_body(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&Path>,
) -> anyhow::Result<(u16, Vec<u8>)> {
    let mut stream =
        UnixStream::connect(socket).with_context(|| format!("connecting to the engine at {}", socket.display()))?;
    stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
    stream.set_write_timeout(Some(HTTP_TIMEOUT))?;
    let file = match body {
        Some(p) => Some((
            File::open(p).with_context(|| format!("opening {}", p.display()))?,
            file_size(p)?,
        )),
        None => None,
    };
    let length = file.as_ref().map_or(0, |(_, len)| *len);
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: podman\r\nConnection: close\r\nContent-Type: application/x-tar\r\nContent-Length: {length}\r\n\r\n"
    );
    stream
        .write_all(head.as_bytes())
        .with_context(|| format!("sending {method} {path}"))?;
    if let Some((mut file, _)) = file {
        std::io::copy(&mut file, &mut stream).with_context(|| format!("sending the body of {method} {path}"))?;
    }
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .with_context(|| format!("reading the answer to {method} {path}"))?;
    parse_response(&raw).with_context(|| format!("the answer to {method} {path}"))
}

pub(super) fn get_json(socket: &Path, path: &str) -> anyhow::Result<Value> {
    let (status, body) = request(socket, "GET", path)?;
    if status != 200 {
        bail!("GET {path} answered {status}: {}", String::from_utf8_lossy(&body));
    }
    serde_json::from_slice(&body).with_context(|| format!("the answer to GET {path} is not JSON"))
}

/// A POST that must succeed (2xx; 304 means already in that state).
pub(super) fn post(socket: &Path, path: &str) -> anyhow::Result<()> {
    let (status, body) = request(socket, "POST", path)?;
    if !(200..300).contains(&status) && status != 304 {
        bail!("POST {path} answered {status}: {}", String::from_utf8_lossy(&body));
    }
    Ok(())
}

pub(super) fn parse_response(raw: &[u8]) -> anyhow::Result<(u16, Vec<u8>)> {
    let end = find(raw, b"\r\n\r\n").context("no end of the headers")?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let status = http_status(&head).with_context(|| format!("not an HTTP answer: {head}"))?;
    let chunked = head.lines().skip(1).any(|line| {
        line.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("transfer-encoding") && value.trim().eq_ignore_ascii_case("chunked")
        })
    });
    let body = &raw[end + 4..];
    Ok((status, if chunked { dechunk(body)? } else { body.to_vec() }))
}

pub(super) fn dechunk(mut body: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = find(body, b"\r\n").context("a chunk size line without its end")?;
        let line = String::from_utf8_lossy(&body[..line_end]);
        let hex = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(hex, 16).with_context(|| format!("chunk size {hex:?} is not hex"))?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if body.len() < size + 2 {
            bail!("a chunk of {size} bytes is cut short");
        }
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}

pub(super) fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

// --- /proc

/// CPU time and resident memory of one process, from /proc.
pub(super) struct ProcSample {
    pub(super) ticks: u64,
    pub(super) rss_bytes: f64,
}

impl ProcSample {
    pub(super) fn read(pid: u32) -> anyhow::Result<ProcSample> {
        let stat_path = format!("/proc/{pid}/stat");
        let stat = std::fs::read_to_string(&stat_path).with_context(|| format!("reading {stat_path}"))?;
        let status_path = format!("/proc/{pid}/status");
        let status = std::fs::read_to_string(&status_path).with_context(|| format!("reading {status_path}"))?;
        Ok(ProcSample {
            ticks: cpu_ticks(&stat).with_context(|| format!("no utime and stime in {stat_path}"))?,
            rss_bytes: vm_rss_kib(&status).with_context(|| format!("no VmRSS in {status_path}"))? as f64 * 1024.0,
        })
    }
}

pub(super) struct Usage {
    pub(super) rss_bytes: f64,
    pub(super) cpu_percent: f64,
}

impl Usage {
    /// RSS at the end; CPU as a percentage of one core over `elapsed`.
    pub(super) fn between(before: &ProcSample, after: &ProcSample, elapsed: Duration, clk_tck: f64) -> Usage {
        let cpu_secs = after.ticks.saturating_sub(before.ticks) as f64 / clk_tck;
        Usage {
            rss_bytes: after.rss_bytes,
            cpu_percent: 100.0 * cpu_secs / elapsed.as_secs_f64().max(f64::EPSILON),
        }
    }
}

/// utime + stime (fields 14 and 15) of a `/proc/<pid>/stat` line; the
/// command name in parentheses may hold spaces, so count after the last ')'.
pub(super) fn cpu_ticks(stat: &str) -> Option<u64> {
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

pub(super) fn vm_rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

pub(super) fn clock_ticks(sh: &Shell) -> anyhow::Result<f64> {
    let text = capture(cmd!(sh, "getconf CLK_TCK")).context("reading CLK_TCK")?;
    let ticks: f64 = text
        .trim()
        .parse()
        .with_context(|| format!("getconf CLK_TCK printed {text:?}"))?;
    if ticks <= 0.0 {
        bail!("getconf CLK_TCK printed {ticks}");
    }
    Ok(ticks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_timestamps_parse_with_nanoseconds_and_offsets() {
        let at = |s: &str| {
            parse_rfc3339(s)
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map(|d| (d.as_secs(), d.subsec_nanos()))
        };
        assert_eq!(at("1970-01-01T00:00:00Z"), Some((0, 0)));
        assert_eq!(at("2000-03-01T00:00:00Z"), Some((951_868_800, 0)));
        assert_eq!(at("2026-11-26T21:35:13.155781398Z"), Some((1_795_728_913, 155_781_398)));
        assert_eq!(at("2026-11-26T22:35:13.5+01:00"), Some((1_795_728_913, 500_000_000)));
        assert_eq!(at("2026-11-26T21:35:13-00:30"), Some((1_795_730_713, 0)));
        assert_eq!(at("0001-01-01T00:00:00Z"), None, "before 1970: podman's zero time");
        assert_eq!(at("yesterday"), None);
    }

    #[test]
    fn proc_fields_are_read_after_the_command_name() {
        let stat = "4242 (tokio (worker) 1) S 1 4242 4242 0 -1 4194560 100 0 0 0 37 5 0 0 20 0 9 0 123 456 789";
        assert_eq!(cpu_ticks(stat), Some(42));
        assert_eq!(cpu_ticks("garbage"), None);
        assert_eq!(vm_rss_kib("Name:\tx\nVmRSS:\t   9876 kB\n"), Some(9876));
        assert_eq!(vm_rss_kib("Name:\tx\n"), None);
    }

    #[test]
    fn chunked_answers_are_joined_and_plain_ones_kept() {
        let raw =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n[1,2\r\n2;x=y\r\n,3\r\n1\r\n]\r\n0\r\n\r\n";
        assert_eq!(parse_response(raw).expect("parses"), (200, b"[1,2,3]".to_vec()));
        let plain = b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(parse_response(plain).expect("parses"), (204, Vec::new()));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n9\r\nabc").is_err());
    }
}
