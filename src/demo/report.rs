//! What the demo measured, as a side-by-side table for people and as JSON
//! for scripts.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use super::load::{Report, Sample};

/// What clients saw during one upgrade.
#[derive(Debug, Clone, Serialize)]
pub struct Upgrade {
    /// Requests on fresh connections, from before to after the upgrade.
    pub requests: usize,
    /// Those that failed (refused, reset, timed out, incomplete).
    pub failed: usize,
    /// Long-lived connections opened before the upgrade.
    pub long_lived: usize,
    /// Those answered completely by the version that accepted them.
    pub long_lived_ok: usize,
    /// How long the apply took.
    pub upgrade_seconds: f64,
    /// The 99th percentile latency of the requests, in milliseconds.
    pub p99_ms: f64,
}

impl Upgrade {
    /// The figures of `load` (fresh connections) and `long_lived` (opened
    /// while `accepted_by` served) around an upgrade that took `took`.
    pub fn measure(
        load: &Report,
        long_lived: &[Sample],
        accepted_by: &str,
        took: Duration,
    ) -> Upgrade {
        Upgrade {
            requests: load.samples.len(),
            failed: load.failed().len(),
            long_lived: long_lived.len(),
            long_lived_ok: long_lived
                .iter()
                .filter(|s| s.ok() && s.version.as_deref() == Some(accepted_by))
                .count(),
            upgrade_seconds: round(took.as_secs_f64(), 100.0),
            p99_ms: p99_ms(&load.samples),
        }
    }
}

/// The host-mode demo's result: the same load through both strategies.
#[derive(Debug, Clone, Serialize)]
pub struct HostSummary {
    /// v1 → v2 with `redirect-drain`.
    pub redirect_drain: Upgrade,
    /// v2 → v1 with `stop-start`.
    pub stop_start: Upgrade,
}

impl HostSummary {
    /// The side-by-side table and what it means.
    pub fn table(&self) -> String {
        let (rd, ss) = (&self.redirect_drain, &self.stop_start);
        let rows = [
            ("requests", rd.requests.to_string(), ss.requests.to_string()),
            (
                "failed requests",
                rd.failed.to_string(),
                ss.failed.to_string(),
            ),
            (
                "long-lived finished on their version",
                format!("{} of {}", rd.long_lived_ok, rd.long_lived),
                format!("{} of {}", ss.long_lived_ok, ss.long_lived),
            ),
            (
                "upgrade time",
                format!("{:.1} s", rd.upgrade_seconds),
                format!("{:.1} s", ss.upgrade_seconds),
            ),
            (
                "p99 latency",
                format!("{:.1} ms", rd.p99_ms),
                format!("{:.1} ms", ss.p99_ms),
            ),
        ];
        let mut text = table(&["", "redirect-drain (v1→v2)", "stop-start (v2→v1)"], &rows);
        let _ = writeln!(
            text,
            "\nredirect-drain moved new connections to the next version before the old one stopped, \
             so {} of {} requests failed; stop-start left a gap with nothing listening, where {} of {} failed.",
            rd.failed, rd.requests, ss.failed, ss.requests
        );
        text
    }
}

/// What the replicas saw of one kind of load balancing, under the same load.
#[derive(Debug, Clone, Serialize)]
pub struct Seen {
    /// Requests on fresh connections.
    pub requests: usize,
    /// Those that failed (refused, reset, timed out, incomplete).
    pub failed: usize,
    /// Share (0 to 1) of the answered requests whose replica saw the
    /// address of the client that sent it.
    pub real_client_share: f64,
    /// Every client address the replicas saw.
    pub addresses_seen: Vec<String>,
    /// The 99th percentile latency of the requests, in milliseconds.
    pub p99_ms: f64,
}

impl Seen {
    /// The figures of `load` (`/peer` requests), where `real` says whether a
    /// replica saw the real client address.
    pub fn measure(load: &Report, real: impl Fn(&Sample) -> bool) -> Seen {
        let answered: Vec<&Sample> = load.samples.iter().filter(|s| s.ok()).collect();
        let real = answered.iter().filter(|s| real(s)).count();
        Seen {
            requests: load.samples.len(),
            failed: load.samples.len() - answered.len(),
            real_client_share: round(real as f64 / answered.len().max(1) as f64, 1000.0),
            addresses_seen: load.peers(|_| true).into_keys().collect(),
            p99_ms: p99_ms(&load.samples),
        }
    }
}

/// The routed demo's result: lessnat against a masquerading load balancer.
#[derive(Debug, Clone, Serialize)]
pub struct RoutedSummary {
    /// lessnat's routed mode: DNAT on the LBs, replies routed back.
    pub routed: Seen,
    /// The same with a `masquerade` rule on the LBs.
    pub masquerade: Seen,
}

impl RoutedSummary {
    /// The side-by-side table and what it means.
    pub fn table(&self) -> String {
        let (r, m) = (&self.routed, &self.masquerade);
        let share = |seen: &Seen| format!("{:.0} %", seen.real_client_share * 100.0);
        let rows = [
            ("requests", r.requests.to_string(), m.requests.to_string()),
            (
                "failed requests",
                r.failed.to_string(),
                m.failed.to_string(),
            ),
            ("replica saw the real client address", share(r), share(m)),
            (
                "p99 latency",
                format!("{:.1} ms", r.p99_ms),
                format!("{:.1} ms", m.p99_ms),
            ),
        ];
        let mut text = table(&["", "lessnat routed", "masquerading LB"], &rows);
        let _ = writeln!(
            text,
            "\nWith lessnat the replicas saw the clients' own addresses ({}) and each reply went back \
             through the load balancer that received the request; behind a masquerading load balancer \
             they saw only the load balancers' addresses ({}).",
            r.addresses_seen.join(", "),
            m.addresses_seen.join(", ")
        );
        text
    }
}

/// A plain text table, columns padded to their widest cell.
fn table(head: &[&str; 3], rows: &[(&str, String, String)]) -> String {
    let mut widths = head.map(|h| h.chars().count());
    for (label, a, b) in rows {
        for (i, cell) in [*label, a.as_str(), b.as_str()].iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: [&str; 3]| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            let pad = widths[i] - cell.chars().count();
            if i == 0 {
                let _ = write!(text, "  {cell}{}", " ".repeat(pad));
            } else {
                let _ = write!(text, "  {}{cell}", " ".repeat(pad));
            }
        }
        text.trim_end().to_string() + "\n"
    };
    let mut text = line(*head);
    let rule = widths.map(|w| "-".repeat(w));
    text.push_str(&line([&rule[0], &rule[1], &rule[2]]));
    for (label, a, b) in rows {
        text.push_str(&line([label, a, b]));
    }
    text
}

/// The 99th percentile latency of `samples`, in milliseconds.
fn p99_ms(samples: &[Sample]) -> f64 {
    let mut latencies: Vec<Duration> = samples.iter().map(Sample::latency).collect();
    latencies.sort();
    round(percentile(&latencies, 0.99).as_secs_f64() * 1000.0, 10.0)
}

/// The `p` quantile (0..=1) of sorted durations.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn round(value: f64, scale: f64) -> f64 {
    (value * scale).round() / scale
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let ms: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&ms, 0.99), Duration::from_millis(99));
        assert_eq!(percentile(&ms, 0.5), Duration::from_millis(50));
        assert_eq!(percentile(&[], 0.99), Duration::ZERO);
    }

    #[test]
    fn tables_align() {
        let text = table(
            &["", "a", "b"],
            &[("requests", "1200".to_string(), "3".to_string())],
        );
        assert_eq!(
            text,
            "               a  b\n  --------  ----  -\n  requests  1200  3\n"
        );
    }
}
