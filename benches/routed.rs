//! Routed mode against the usual alternative, load balancers that masquerade
//! (issue 5): what the service sees of its clients, and what it costs.
//!
//! `cargo bench --bench routed` (as root, with Docker). The site is the one
//! the integration tests use (`tests/support/topology.rs`): two client
//! namespaces, two LB nodes sharing the VIP, two workers with one replica
//! each, every node set up by its own `lessnat apply --node NAME --netns NS`.
//! Then, in one run, alternating (ABBA by round, so load from other jobs on
//! the machine falls on both alike):
//!
//! - **routed**: lessnat's routed mode as applied: DNAT on the LBs, no SNAT,
//!   replies back through the LB that got the request;
//! - **masquerade**: the same, plus a test-owned `masquerade` of everything
//!   the LBs forward to the container subnets (nat postrouting): the
//!   baseline of an LB that hides its clients.
//!
//! Each measurement: K client threads (half in each client namespace) open
//! a new connection per request to the VIP (`GET /peer`, `Connection:
//! close`, no pause) for a warm-up and then T seconds; counted are the
//! requests that started and ended within the T seconds. Reported: requests
//! per second, failures, p50/p99 latency, and the share of answers whose
//! `/peer` (the client address the server saw) is the real client's.
//!
//! Environment: `LESSNAT_BENCH_CLIENTS` (K, default 16),
//! `LESSNAT_BENCH_SECONDS` (T, default 5), `LESSNAT_BENCH_ROUNDS` (default
//! 3). Everything it creates (namespaces, containers, state) is removed at
//! the end, also on failure. Results are recorded in docs/benchmarks.md.

#[path = "../tests/support/mod.rs"]
mod support;

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use support::load::{Load, LoadConfig, Report};
use support::topology::{self, Replica, Service, Topology};

/// Connections before the counted window, not counted.
const WARMUP: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Routed,
    Masquerade,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Routed => "routed",
            Mode::Masquerade => "masquerade",
        }
    }
}

/// One measurement.
struct Measurement {
    mode: Mode,
    round: usize,
    /// Requests that started and ended within the window.
    requests: usize,
    failed: usize,
    /// Successful requests whose `/peer` showed the real client address.
    real_client: usize,
    per_second: f64,
    p50: Duration,
    p99: Duration,
    /// SNAT/masquerade rules found on the LBs during the measurement.
    nat_rules: usize,
    /// Conntrack entries in the busier LB namespace at the end (closed
    /// connections stay for 2 minutes in TIME_WAIT; a full table drops SYNs).
    lb_conntrack: u64,
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` (or --all-targets)
    // runs this binary without it, and must not run the benchmark.
    if !std::env::args().any(|a| a == "--bench") {
        println!("routed benchmark: run it with `cargo bench --bench routed`");
        return;
    }
    let name = "bench routed";
    if !support::root_with(name, &["nft", "sysctl", "docker"]) || !support::docker(name) {
        return;
    }
    let clients = env_number("LESSNAT_BENCH_CLIENTS", 16).max(2);
    let seconds = env_number("LESSNAT_BENCH_SECONDS", 5).max(1);
    let rounds = env_number("LESSNAT_BENCH_ROUNDS", 3).max(1);
    let window = Duration::from_secs(u64::try_from(seconds).unwrap_or(5));

    let image = support::image::test_image("v1");
    let load_before = load_average();
    let topo = Topology::new(2);
    let replicas = (0..topo.workers.len()).map(|w| Replica::on(w, 5)).collect();
    let spec = topo.write_spec("bench", &[Service::new("bench", &image, replicas)]);
    let applied = Instant::now();
    topo.apply_all(&spec);
    eprintln!(
        "lessnat applied on {} nodes in {:.1}s; {clients} client threads, {seconds} s per measurement, {rounds} rounds",
        topo.nodes().count(),
        applied.elapsed().as_secs_f64()
    );

    let mut measurements = Vec::new();
    for round in 1..=rounds {
        let order = if round % 2 == 1 {
            [Mode::Routed, Mode::Masquerade]
        } else {
            [Mode::Masquerade, Mode::Routed]
        };
        for mode in order {
            topo.masquerade(mode == Mode::Masquerade);
            let measurement = measure(&topo, mode, round, clients, window);
            eprintln!(
                "round {round} {}: {:.0} requests/s, {} failed, real client {}/{}",
                mode.name(),
                measurement.per_second,
                measurement.failed,
                measurement.real_client,
                measurement.requests - measurement.failed
            );
            measurements.push(measurement);
        }
    }
    topo.masquerade(false);
    drop(topo);

    let mut report = String::new();
    let _ = writeln!(
        report,
        "lessnat `{}`; {} CPUs; kernel {}; load average {load_before:.1} before, {:.1} after; \
         {clients} client threads ({} per client namespace), one connection per request, {seconds} s per measurement after {} ms warm-up; \
         nf_conntrack_max {}\n",
        env!("CARGO_BIN_EXE_lessnat"),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel(),
        load_average(),
        clients / 2,
        WARMUP.as_millis(),
        std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_max")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    );
    summary(&mut report, &measurements);
    all_runs(&mut report, &measurements);
    println!("{report}");
}

/// Runs the load from both client namespaces for the warm-up and `window`.
fn measure(
    topo: &Topology,
    mode: Mode,
    round: usize,
    clients: usize,
    window: Duration,
) -> Measurement {
    let nat_rules = topo
        .lbs
        .iter()
        .map(|lb| topology::nat_statements(&lb.ns).len())
        .sum();
    let started = Instant::now();
    let loads = topo.load(clients / 2, |config| LoadConfig {
        pause: Duration::ZERO,
        max_requests_per_client: usize::MAX,
        max_duration: WARMUP + window + Duration::from_secs(1),
        io_timeout: Duration::from_secs(2),
        ..config
    });
    std::thread::sleep(WARMUP + window);
    let report = Report::merged(loads.into_iter().map(Load::stop));
    let lb_conntrack = topo
        .lbs
        .iter()
        .map(|lb| {
            let output = lb
                .ns
                .exec("sysctl", &["-n", "net.netfilter.nf_conntrack_count"]);
            let text = String::from_utf8_lossy(&output.stdout);
            text.trim().parse::<u64>().unwrap_or(0)
        })
        .max()
        .unwrap_or(0);
    let (from, to) = (started + WARMUP, started + WARMUP + window);
    let counted: Vec<_> = report
        .samples
        .iter()
        .filter(|s| s.start >= from && s.end <= to)
        .collect();
    let failed = counted.iter().filter(|s| !s.ok()).count();
    let real_client = counted
        .iter()
        .filter(|s| topology::saw_real_client(s))
        .count();
    let mut latencies: Vec<Duration> = counted
        .iter()
        .filter(|s| s.ok())
        .map(|s| s.latency())
        .collect();
    latencies.sort();
    Measurement {
        mode,
        round,
        requests: counted.len(),
        failed,
        real_client,
        per_second: (counted.len() - failed) as f64 / window.as_secs_f64(),
        p50: percentile(&latencies, 50.0),
        p99: percentile(&latencies, 99.0),
        nat_rules,
        lb_conntrack,
    }
}

/// One number of a measurement.
type Value = dyn Fn(&Measurement) -> f64;

/// Medians over the rounds, by mode, and the ratio routed / masquerade.
fn summary(report: &mut String, measurements: &[Measurement]) {
    let median_of = |mode: Mode, value: &Value| {
        let mut values: Vec<f64> = measurements
            .iter()
            .filter(|m| m.mode == mode)
            .map(value)
            .collect();
        values.sort_by(f64::total_cmp);
        values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let share = |mode: Mode| {
        let (real, ok) = measurements
            .iter()
            .filter(|m| m.mode == mode)
            .fold((0, 0), |(r, o), m| {
                (r + m.real_client, o + m.requests - m.failed)
            });
        100.0 * real as f64 / ok.max(1) as f64
    };
    let failed = |mode: Mode| -> usize {
        measurements
            .iter()
            .filter(|m| m.mode == mode)
            .map(|m| m.failed)
            .sum()
    };
    let rows: [(&str, &Value, usize); 3] = [
        ("requests/s", &|m| m.per_second, 0),
        ("p50 latency, ms", &|m| m.p50.as_secs_f64() * 1000.0, 2),
        ("p99 latency, ms", &|m| m.p99.as_secs_f64() * 1000.0, 2),
    ];
    let _ = writeln!(
        report,
        "| median of the rounds | routed | masquerade | routed / masquerade |\n|---|---:|---:|---:|"
    );
    for (label, value, digits) in rows {
        let (routed, masq) = (
            median_of(Mode::Routed, value),
            median_of(Mode::Masquerade, value),
        );
        let _ = writeln!(
            report,
            "| {label} | {routed:.digits$} | {masq:.digits$} | {:.3} |",
            routed / masq
        );
    }
    let _ = writeln!(
        report,
        "| answers showing the real client address | {:.1}% | {:.1}% | |\n| failed requests (all rounds) | {} | {} | |\n",
        share(Mode::Routed),
        share(Mode::Masquerade),
        failed(Mode::Routed),
        failed(Mode::Masquerade)
    );
}

fn all_runs(report: &mut String, measurements: &[Measurement]) {
    let _ = writeln!(
        report,
        "| round | mode | SNAT rules on the LBs | requests | failed | requests/s | real client address | p50 ms | p99 ms | LB conntrack entries |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for m in measurements {
        let ok = m.requests - m.failed;
        let _ = writeln!(
            report,
            "| {} | {} | {} | {} | {} | {:.0} | {}/{} | {:.2} | {:.2} | {} |",
            m.round,
            m.mode.name(),
            m.nat_rules,
            m.requests,
            m.failed,
            m.per_second,
            m.real_client,
            ok,
            m.p50.as_secs_f64() * 1000.0,
            m.p99.as_secs_f64() * 1000.0,
            m.lb_conntrack
        );
    }
}

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}
