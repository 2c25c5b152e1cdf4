//! When runs happen. Once (cron, systemd timers), or in a loop: a run, then a
//! wait of `--interval` plus a random part of `--jitter` (so nodes fetching
//! from one server spread out). After a failure the wait is the back-off:
//! interval × 2^n for n failures in a row, at most 10 × interval.

use std::hash::BuildHasher;
use std::time::{Duration, Instant, SystemTime};

use super::reconcile::{Ran, Reconciler};

/// The back-off base of single runs (cron, timers), which have no interval:
/// a failed commit is not tried again for 2, 4, 8, then 10 minutes.
pub const SINGLE_RUN_BACKOFF_BASE: Duration = Duration::from_secs(60);

/// The longest back-off, in multiples of the base.
pub const MAX_BACKOFF_FACTOR: u32 = 10;

/// How long a failed commit waits after `failures` failures in a row:
/// base × 2^failures, at most [`MAX_BACKOFF_FACTOR`] × base.
pub fn backoff_delay(base: Duration, failures: u32) -> Duration {
    let factor = 2u32
        .checked_pow(failures)
        .map_or(MAX_BACKOFF_FACTOR, |f| f.min(MAX_BACKOFF_FACTOR));
    base.saturating_mul(factor)
}

/// A random duration from zero to `max`. The randomness comes from std's
/// per-process random hash keys: plenty to spread nodes, no extra crate.
pub fn jitter(max: Duration) -> Duration {
    let nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
    if nanos == 0 {
        return Duration::ZERO;
    }
    let random = std::collections::hash_map::RandomState::new().hash_one(Instant::now());
    Duration::from_nanos(random % nanos.saturating_add(1))
}

/// How long to wait after `ran` before the next run: until its back-off
/// ends, if it has one still ahead, else the interval.
pub fn wait_after(ran: &Ran, interval: Duration, now: SystemTime) -> Duration {
    ran.retry_after
        .and_then(|t| t.0.duration_since(now).ok())
        .filter(|wait| !wait.is_zero())
        .unwrap_or(interval)
}

/// Runs `reconciler` until it is interrupted (SIGINT, SIGTERM): a run, then
/// the wait ([`wait_after`] plus [`jitter`]), cut short by the interrupt.
pub fn run_loop(reconciler: &mut Reconciler, interval: Duration, max_jitter: Duration) {
    while !reconciler.interrupted() {
        let ran = reconciler.run();
        let wait = wait_after(&ran, interval, SystemTime::now()) + jitter(max_jitter);
        let until = Instant::now() + wait;
        while !reconciler.interrupted() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(left.min(Duration::from_millis(200)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gitops::record::{Outcome, Timestamp};

    #[test]
    fn backoff_doubles_up_to_ten_times_the_base() {
        let base = Duration::from_secs(60);
        let minutes: Vec<u64> = (1..=6)
            .map(|n| backoff_delay(base, n).as_secs() / 60)
            .collect();
        assert_eq!(minutes, [2, 4, 8, 10, 10, 10]);
        assert_eq!(backoff_delay(base, u32::MAX), base * 10);
    }

    #[test]
    fn jitter_stays_within_its_bound() {
        assert_eq!(jitter(Duration::ZERO), Duration::ZERO);
        let max = Duration::from_millis(50);
        assert!((0..100).all(|_| jitter(max) <= max));
        let samples: std::collections::BTreeSet<_> = (0..20).map(|_| jitter(max)).collect();
        assert!(samples.len() > 1, "jitter varies");
    }

    #[test]
    fn waits_for_the_backoff_after_a_failure() {
        let now = SystemTime::now();
        let interval = Duration::from_secs(60);
        let ok = Ran {
            outcome: Some(Outcome::Applied),
            changes: 0,
            retry_after: None,
            commit: None,
            error: None,
            stage: None,
            busy: false,
            planned: None,
        };
        assert_eq!(wait_after(&ok, interval, now), interval);
        let failed = Ran {
            outcome: Some(Outcome::Failed),
            changes: 0,
            retry_after: Some(Timestamp(now + Duration::from_secs(240))),
            commit: None,
            error: None,
            stage: None,
            busy: false,
            planned: None,
        };
        assert_eq!(wait_after(&failed, interval, now), Duration::from_secs(240));
        let past = Ran {
            retry_after: Some(Timestamp(now - Duration::from_secs(1))),
            ..failed
        };
        assert_eq!(
            wait_after(&past, interval, now),
            interval,
            "never a hot loop"
        );
    }
}
