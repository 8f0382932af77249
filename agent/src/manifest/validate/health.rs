//! The rules of an app's health check (`health:`).

use std::time::Duration;

use super::super::error::Problems;
use super::super::raw::RawHealth;
use super::super::{Health, Probe};
use super::{check_port, duration};

pub(super) fn validate_health(p: &mut Problems, h: &RawHealth) -> Option<Health> {
    let set = [h.http.is_some(), h.tcp.is_some(), h.exec.is_some()]
        .iter()
        .filter(|b| **b)
        .count();
    if set != 1 {
        p.missing(
            "health",
            format!("sets {set} probes; allowed: exactly one of http, tcp, exec"),
        );
        return None;
    }
    let probe = if let Some(http) = &h.http {
        let port = check_port(p, "health.http.port", http.port)?;
        let target = http.path.clone().unwrap_or_else(|| "/".to_owned());
        // A full URL is taken as written; a path gets the scheme added later.
        // Prepending twice once restarted an app fourteen times.
        if !(target.starts_with('/') || target.starts_with("http://") || target.starts_with("https://")) {
            p.bad(
                "health.http.path",
                &target,
                "allowed: a path starting with '/' or a full http:// or https:// URL",
            );
            return None;
        }
        Probe::Http { port, target }
    } else if let Some(tcp) = &h.tcp {
        Probe::Tcp {
            port: check_port(p, "health.tcp.port", tcp.port)?,
        }
    } else {
        let command = h.exec.clone().unwrap_or_default();
        if command.is_empty() {
            p.missing("health.exec", "must name a command to run");
            return None;
        }
        Probe::Exec { command }
    };
    let interval = opt_duration(p, "health.interval", &h.interval, 30);
    let timeout = opt_duration(p, "health.timeout", &h.timeout, 5);
    let start_period = opt_duration(p, "health.start_period", &h.start_period, 0);
    let retries = match h.retries {
        None => Some(3),
        Some(r @ 1..=100) => u32::try_from(r).ok(),
        Some(r) => {
            p.bad("health.retries", r, "allowed: a whole number from 1 to 100");
            None
        }
    };
    if let (Some(interval), Some(timeout)) = (interval, timeout) {
        if interval.is_zero() {
            p.bad(
                "health.interval",
                humantime::format_duration(interval),
                "must be longer than 0s",
            );
            return None;
        }
        if timeout.is_zero() || timeout > interval {
            p.bad(
                "health.timeout",
                humantime::format_duration(timeout),
                "allowed: longer than 0s and at most the interval",
            );
            return None;
        }
    }
    Some(Health {
        probe,
        interval: interval?,
        timeout: timeout?,
        retries: retries?,
        start_period: start_period?,
    })
}

fn opt_duration(p: &mut Problems, field: &str, value: &Option<String>, default_secs: u64) -> Option<Duration> {
    match value {
        None => Some(Duration::from_secs(default_secs)),
        Some(s) => duration(p, field, s),
    }
}
