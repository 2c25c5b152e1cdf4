//! How soon load-balancer agents follow a replica registration (issue 16:
//! "LB nodes watch the registrations and update spreads within 200 ms of a
//! change, no polling").
//!
//! The site of `tests/cluster.rs` (`tests/support/cluster_site.rs`): a real
//! three-member etcd on loopback, the routed site in network namespaces (two
//! LB nodes, two workers with one replica each of the test server, in
//! Docker), a spec with a `cluster:` block (`leaseTtl: 2s`), and the real
//! binary running `lessnat agent --interval 60s` on every node (so only
//! events make the agents act). Each trial, after a pause of 1 s plus a
//! varying 0–160 ms (so the change falls anywhere in the workers' 200 ms
//! rounds):
//!
//! - **out**: `docker pause` of the second worker's replica; the worker's
//!   agent deregisters it (or registers it unhealthy) at its next round.
//!   Timed: from the moment a watch of the benchmark's own (on the replica
//!   registrations, `support::cluster_site::KeyClock`) saw that change to the
//!   moment **both** LBs' `routed_dnat` chains no longer name the replica
//!   (`nft list chain`, run from a thread in each LB's namespace, every
//!   5 ms after the last read ended);
//!   and end to end, from the `docker pause`;
//! - **back**: `docker unpause`; timed likewise until both chains name it
//!   again, from the registration saying healthy and from the unpause.
//!
//! Also reported, from the LB agents' own lines (`Drift corrected (cluster:
//! …) … in 0.08s`, read with the instant each was printed): how long after
//! the benchmark's watch saw the change each LB's run started, and how long
//! the run took; so the table shows what the time goes to.
//!
//! `cargo bench --bench cluster_spread` (as root, with Docker and `etcd`).
//! Reported: p50, p99, min and max over N trials (default 20,
//! `LESSNAT_BENCH_TRIALS`). Everything it creates (etcd members, namespaces,
//! containers, state) is removed at the end, also on failure. Results are in
//! docs/benchmarks.md.

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use lessnat::backend::etcd::KeyChange;
use lessnat::cluster::keys::ReplicaRecord;
use lessnat::netns::Netns;
use support::cluster_site::{ClusterSite, KeyClock, names_in_spread};
use support::process::Process;
use support::topology::{Node, Topology};

/// The replica on the second worker: the one each trial pauses.
const VICTIM: &str = "10.20.2.5";

/// The replica on the first worker, which stays in.
const STAYS: &str = "10.20.1.5";

/// How long each LB's poll sleeps between two reads of its chain.
const POLL: Duration = Duration::from_millis(5);

/// The pause before each change, so every agent has finished the runs the
/// last change (and its own table writes) woke it for.
const SETTLE: Duration = Duration::from_secs(1);

/// The longest anything measured may take before the benchmark gives up.
const GIVE_UP: Duration = Duration::from_secs(30);

/// The site's lease TTL in seconds (as in `tests/cluster.rs`).
const LEASE_TTL: u64 = 2;

/// A paused container, unpaused when dropped (also on panic), so the
/// site's clean-up finds it as it made it.
struct Paused<'a>(Option<&'a str>);

impl<'a> Paused<'a> {
    fn pause(container: &'a str) -> Paused<'a> {
        support::run("docker", &["pause", container]);
        Paused(Some(container))
    }

    fn unpause(mut self) {
        if let Some(container) = self.0.take() {
            support::run("docker", &["unpause", container]);
        }
    }
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        if let Some(container) = self.0.take() {
            let _ = Command::new("docker").args(["unpause", container]).output();
        }
    }
}

/// One direction's samples, in milliseconds (some may be negative: the
/// agents' watches can see a change a little before the benchmark's).
#[derive(Default)]
struct Samples {
    /// Registration change (the benchmark's watch) → both spreads changed.
    registered: Vec<f64>,
    /// `docker pause`/`unpause` → both spreads changed.
    end_to_end: Vec<f64>,
    /// `docker pause`/`unpause` → the registration change.
    worker: Vec<f64>,
    /// Registration change → an LB's run started (one per LB and trial).
    wake: Vec<f64>,
    /// An LB's run (one per LB and trial).
    run: Vec<f64>,
    /// What woke the LBs' runs that moved the spreads (trigger: detail).
    triggers: Vec<String>,
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// `later - earlier` in milliseconds, negative when `later` is earlier.
fn signed_ms(later: Instant, earlier: Instant) -> f64 {
    match later.checked_duration_since(earlier) {
        Some(after) => ms(after),
        None => -ms(earlier.duration_since(later)),
    }
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` (or --all-targets)
    // runs this binary without it, and must not run the benchmark.
    if !std::env::args().any(|a| a == "--bench") {
        println!("cluster spread benchmark: run it with `cargo bench --bench cluster_spread`");
        return;
    }
    let trials: usize = std::env::var("LESSNAT_BENCH_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
        .max(1);
    let Some(site) = ClusterSite::new("bench cluster_spread", 2, LEASE_TTL) else {
        return;
    };
    let spec = site.write_spec("spec", &support::image::test_image("v1"), None);
    site.site.apply_all(&spec);
    let victim_key = site.keys().replica("web", VICTIM);
    let clock = KeyClock::start(site.client(), site.keys().replicas());
    let workers: Vec<Process> = site
        .site
        .workers
        .iter()
        .map(|w| ClusterSite::agent(w, &spec, "60s"))
        .collect();
    let lbs: Vec<Process> = site
        .site
        .lbs
        .iter()
        .map(|lb| ClusterSite::agent(lb, &spec, "60s"))
        .collect();
    let victim = Topology::containers(&site.site.workers[1])
        .into_iter()
        .next()
        .expect("the second worker's replica");
    for address in [VICTIM, STAYS] {
        both_spreads(&site.site.lbs, address, true);
    }
    // How long one read of a chain takes: what a poll adds at most, with POLL.
    let reads: Vec<f64> = in_lb(&site.site.lbs[0], || {
        (0..20)
            .map(|_| {
                let started = Instant::now();
                assert_eq!(chain_names(VICTIM), Some(true), "the chain reads");
                ms(started.elapsed())
            })
            .collect()
    });

    let healthy = |change: &KeyChange| match change {
        KeyChange::Put(entry) => {
            serde_json::from_slice::<ReplicaRecord>(&entry.value).is_ok_and(|r| r.healthy)
        }
        KeyChange::Delete { .. } => false,
    };
    let (mut out, mut back) = (Samples::default(), Samples::default());
    for trial in 0..trials {
        let offset = Duration::from_millis(40 * (trial as u64 % 5));
        std::thread::sleep(SETTLE + offset);
        let paused_at = Instant::now();
        let paused = Paused::pause(&victim);
        let left = both_spreads(&site.site.lbs, VICTIM, false);
        out.note(&clock, &victim_key, &lbs, paused_at, left, |c| !healthy(c));
        assert!(
            site.site.lbs.iter().all(|lb| names_in_spread(lb, STAYS)),
            "the healthy replica stays in"
        );

        std::thread::sleep(SETTLE + offset);
        let unpaused_at = Instant::now();
        paused.unpause();
        let returned = both_spreads(&site.site.lbs, VICTIM, true);
        back.note(&clock, &victim_key, &lbs, unpaused_at, returned, healthy);
        eprintln!(
            "trial {}: registration → both spreads: out {:.0} ms, back {:.0} ms",
            trial + 1,
            out.registered[trial],
            back.registered[trial]
        );
    }
    for agent in workers.iter().chain(&lbs) {
        assert!(!agent.output().contains("panicked"), "{}", agent.output());
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();

    println!();
    println!(
        "registration change -> both LBs' spreads, {trials} trials, load average {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!();
    println!("| what | p50 | p99 | min | max | samples |");
    println!("| --- | --- | --- | --- | --- | --- |");
    row("one read of an LB's chain (`nft list chain`)", &reads);
    row(
        "registration gone/unhealthy → out of both spreads",
        &out.registered,
    );
    row(
        "registration healthy → back in both spreads",
        &back.registered,
    );
    row("`docker pause` → out of both spreads", &out.end_to_end);
    row("`docker unpause` → back in both spreads", &back.end_to_end);
    row(
        "`docker pause` → registration changed (worker)",
        &out.worker,
    );
    row(
        "`docker unpause` → registration changed (worker)",
        &back.worker,
    );
    row("out: registration → LB run starts (each LB)", &out.wake);
    row("out: LB run (each LB)", &out.run);
    row("back: registration → LB run starts (each LB)", &back.wake);
    row("back: LB run (each LB)", &back.run);
    for (what, samples) in [("out", &out), ("back", &back)] {
        let mut triggers = samples.triggers.clone();
        triggers.sort();
        triggers.dedup();
        println!("\n{what}: the LB runs that moved the spreads were woken by:");
        for wake in triggers {
            println!("- {wake}");
        }
    }
}

impl Samples {
    /// Notes one trial's change, made at `acted` (the pause or unpause),
    /// seen in both spreads at `changed`; the registration change is the
    /// first of `key` since `acted` that `matching` accepts.
    fn note(
        &mut self,
        clock: &KeyClock,
        key: &str,
        lbs: &[Process],
        acted: Instant,
        changed: Instant,
        matching: impl Fn(&KeyChange) -> bool,
    ) {
        let registered = clock
            .first_after(key, acted, matching)
            .expect("the benchmark's watch saw the registration change");
        self.registered.push(signed_ms(changed, registered));
        self.end_to_end.push(ms(changed - acted));
        self.worker.push(signed_ms(registered, acted));
        for agent in lbs {
            let (at, line) = first_run_since(agent, acted);
            let seconds: f64 = line
                .rsplit(" in ")
                .next()
                .and_then(|s| s.trim_end_matches("s.").parse().ok())
                .unwrap_or_else(|| panic!("a run time in {line:?}"));
            let started = at - Duration::from_secs_f64(seconds);
            self.wake.push(signed_ms(started, registered));
            self.run.push(seconds * 1e3);
            let wake = line
                .trim_start_matches("Drift corrected (")
                .split("): ")
                .next()
                .unwrap_or_default();
            self.triggers.push(wake.to_string());
        }
    }
}

/// The first run of `agent` that changed its node and printed so (the
/// instant it was read, the line) since `since`, waited for up to
/// [`GIVE_UP`].
fn first_run_since(agent: &Process, since: Instant) -> (Instant, String) {
    let deadline = Instant::now() + GIVE_UP;
    loop {
        if let Some(found) = agent
            .lines_with("Drift corrected (")
            .into_iter()
            .find(|(at, _)| *at >= since)
        {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "no run moved the spread within {GIVE_UP:?}:\n{}",
            agent.output()
        );
        std::thread::sleep(POLL);
    }
}

/// Reads every LB's `routed_dnat` chain (one thread per LB, every
/// [`POLL`]) until each names `address` (`want`) or not; returns when
/// the last one was seen to.
fn both_spreads(lbs: &[Node], address: &str, want: bool) -> Instant {
    std::thread::scope(|scope| {
        let polls: Vec<_> = lbs
            .iter()
            .map(|lb| {
                scope.spawn(move || {
                    in_lb(lb, || {
                        let deadline = Instant::now() + GIVE_UP;
                        while chain_names(address) != Some(want) {
                            assert!(
                                Instant::now() < deadline,
                                "{}: {address} {} its spread within {GIVE_UP:?}",
                                lb.name,
                                if want { "not in" } else { "still in" }
                            );
                            std::thread::sleep(POLL);
                        }
                        Instant::now()
                    })
                })
            })
            .collect();
        polls
            .into_iter()
            .map(|poll| poll.join().expect("an LB's poll"))
            .max()
            .expect("LB nodes")
    })
}

/// Runs `work` on a thread inside `lb`'s network namespace, so the `nft`
/// it starts reads that namespace's tables without `ip netns exec` (one
/// process per read, not two).
fn in_lb<T: Send>(lb: &Node, work: impl FnOnce() -> T + Send) -> T {
    Netns::from_arg(&lb.ns.name)
        .run(work)
        .unwrap_or_else(|e| panic!("{}: {}", lb.name, lessnat::error::chain(&e)))
}

/// Whether the `routed_dnat` chain of the namespace the calling thread is
/// in names `address`; `None` when it cannot be read.
fn chain_names(address: &str) -> Option<bool> {
    let output = Command::new("nft")
        .args(["list", "chain", "inet", "lessnat", "routed_dnat"])
        .output()
        .ok()
        .filter(|output| output.status.success())?;
    Some(String::from_utf8_lossy(&output.stdout).contains(address))
}

/// One table row of `samples` (milliseconds).
fn row(what: &str, samples: &[f64]) {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let at = |q: f64| {
        let index = ((sorted.len() as f64 - 1.0) * q).round() as usize;
        sorted[index.min(sorted.len() - 1)]
    };
    println!(
        "| {what} | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {} |",
        at(0.5),
        at(0.99),
        sorted[0],
        sorted[sorted.len() - 1],
        sorted.len()
    );
}
