//! Crash-loop backoff, kubelet's rule: the first restart after 10 s, then
//! doubling up to 5 minutes; ten minutes of running resets it. Podman 4.3
//! has no backoff of its own (restart=always restarted a crashing
//! container about 140 times in 15 s).

use std::time::Duration;

/// Delay before the first restart.
pub const INITIAL: Duration = Duration::from_secs(10);
/// The longest delay.
pub const MAX: Duration = Duration::from_secs(300);
/// Running this long forgives every earlier failure.
pub const RESET_AFTER: Duration = Duration::from_secs(600);

/// The delay before restart number `failures` (1 for the first).
pub fn delay(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    INITIAL.saturating_mul(1u32 << doublings).min(MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_starts_at_ten_seconds_doubles_and_caps_at_five_minutes() {
        let secs: Vec<u64> = (1..=8).map(|n| delay(n).as_secs()).collect();
        assert_eq!(secs, [10, 20, 40, 80, 160, 300, 300, 300]);
        assert_eq!(delay(0), INITIAL, "no failure yet still waits the initial delay");
        assert_eq!(delay(u32::MAX), MAX);
    }
}
