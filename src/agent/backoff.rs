//! How long the agent holds back before converging again, so it does not
//! fight a failure: after failed runs (base × 2^n, at most
//! [`MAX_BACKOFF`]), and for a container that keeps dying (a crash loop:
//! from its third death within [`CRASH_WINDOW`], 1 s × 2^n, at most
//! [`MAX_BACKOFF`]).

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// The longest the agent holds back.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Deaths of one container within this window count toward a crash loop.
pub const CRASH_WINDOW: Duration = Duration::from_secs(60);

/// Deaths within the window that are restarted at once.
const FREE_RESTARTS: usize = 2;

/// The wait after `failures` failed runs in a row: none after none, then
/// `base` × 2^(failures − 1), at most [`MAX_BACKOFF`].
pub fn after_failures(base: Duration, failures: u32) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    let factor = 2u32.saturating_pow(failures - 1);
    base.saturating_mul(factor).min(MAX_BACKOFF)
}

/// Recent deaths of each container.
#[derive(Debug, Default)]
pub struct CrashLoops {
    deaths: BTreeMap<String, VecDeque<Instant>>,
}

impl CrashLoops {
    /// Notes that `name` died at `now`; returns how long to wait before
    /// restarting it.
    pub fn died(&mut self, name: &str, now: Instant) -> Duration {
        let deaths = self.deaths.entry(name.to_string()).or_default();
        deaths.retain(|t| now.saturating_duration_since(*t) < CRASH_WINDOW);
        deaths.push_back(now);
        match deaths.len().checked_sub(FREE_RESTARTS + 1) {
            None => Duration::ZERO,
            Some(extra) => {
                let factor = 2u32.saturating_pow(u32::try_from(extra).unwrap_or(u32::MAX));
                Duration::from_secs(1)
                    .saturating_mul(factor)
                    .min(MAX_BACKOFF)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_double_the_wait_up_to_the_cap() {
        let base = Duration::from_secs(1);
        let waits: Vec<u64> = (0..9).map(|n| after_failures(base, n).as_secs()).collect();
        assert_eq!(waits, [0, 1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(after_failures(base, u32::MAX), MAX_BACKOFF);
    }

    #[test]
    fn a_container_that_keeps_dying_waits_longer_each_time() {
        let mut loops = CrashLoops::default();
        let start = Instant::now();
        let waits: Vec<u64> = (0..6)
            .map(|i| {
                loops
                    .died("lessnat-web", start + Duration::from_secs(i))
                    .as_secs()
            })
            .collect();
        assert_eq!(waits, [0, 0, 1, 2, 4, 8]);
        assert_eq!(
            loops.died("lessnat-db", start).as_secs(),
            0,
            "each container counts its own deaths"
        );
        let later = start + CRASH_WINDOW + Duration::from_secs(10);
        assert_eq!(
            loops.died("lessnat-web", later).as_secs(),
            0,
            "old deaths are forgotten"
        );
    }
}
