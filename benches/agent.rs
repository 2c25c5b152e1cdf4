//! How fast `lessnat agent` reacts (issue 13): the time from a replica's
//! death to its removal from a load-balancer node's spread, and from the
//! deletion of lessnat's table to its restore.
//!
//! Replica deaths are timed twice, with the agent probing again in each run
//! (`--probe-again`, as before the run reused the health watch's round)
//! and without, so one run shows what the reuse saves.
//!
//! `cargo bench --bench agent` (as root, with Docker). The site is the one
//! the integration tests use (`tests/support/topology.rs`): two client
//! namespaces, two LB nodes, two workers with one replica each, every node
//! set up by its own `lessnat apply --node NAME --netns NS`; then the real
//! binary runs `lessnat agent` on the first LB node. Each trial:
//!
//! - **replica death → out of the spread**: `docker kill` of the second
//!   worker's replica, then the LB's `routed_dnat` chain is read every 5 ms
//!   until the replica's address is gone from it; afterwards the replica is
//!   started and re-wired (`docker start`, the worker's `lessnat apply`) and
//!   the next trial waits until the agent has it back in the spread;
//! - **table deleted → restored**: `nft delete table inet lessnat` in the LB
//!   namespace (1 s after the last restore), then the table is listed every
//!   5 ms until it is back whole (its `routed_dnat` chain present).
//!
//! Reported: p50, p99, min and max over N trials of each (default 20,
//! `LESSNAT_BENCH_TRIALS`). Everything it creates (namespaces, containers,
//! state) is removed at the end, also on failure. Results are recorded in
//! docs/benchmarks.md.

#[path = "../tests/support/mod.rs"]
mod support;

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use support::topology::{Node, Replica, Service, Topology};

/// How often the LB's table is read while waiting.
const POLL: Duration = Duration::from_millis(5);

/// How long a trial waits before it starts, so the agent has finished the
/// run its own last write woke it for (a run in progress delays the next).
const SETTLE: Duration = Duration::from_secs(1);

/// The longest anything measured may take before the benchmark gives up.
const GIVE_UP: Duration = Duration::from_secs(30);

/// The agent on an LB node; killed when dropped.
struct AgentProcess(Child);

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` (or --all-targets)
    // runs this binary without it, and must not run the benchmark.
    if !std::env::args().any(|a| a == "--bench") {
        println!("agent benchmark: run it with `cargo bench --bench agent`");
        return;
    }
    let name = "bench agent";
    if !support::root_with(name, &["nft", "sysctl", "docker"]) || !support::docker(name) {
        return;
    }
    let trials: usize = std::env::var("LESSNAT_BENCH_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
        .max(1);

    let image = support::image::test_image("v1");
    let topo = Topology::new(2);
    let replicas = (0..topo.workers.len()).map(|w| Replica::on(w, 5)).collect();
    let spec = topo.write_spec("bench", &[Service::new("bench", &image, replicas)]);
    topo.apply_all(&spec);
    let lb = &topo.lbs[0];
    let worker = &topo.workers[1];
    let victim = Topology::containers(worker)
        .into_iter()
        .next()
        .expect("the second worker's replica");
    let address = replica_address(&victim);

    // Before: every run probes the replicas again (`--probe-again`).
    let mut reprobed = {
        let _agent = start_agent(lb, &spec, &["--probe-again"], &address);
        removals(lb, worker, &spec, &victim, &address, trials)
    };
    let _agent = start_agent(lb, &spec, &[], &address);
    let mut reused = removals(lb, worker, &spec, &victim, &address, trials);

    let mut restores = Vec::new();
    for _ in 1..=trials {
        wait_until(|| spread(lb).contains(&address), "the table is whole");
        std::thread::sleep(SETTLE);
        let deleted = Instant::now();
        lb.ns.exec("nft", &["delete", "table", "inet", "lessnat"]);
        wait_until(|| !spread(lb).is_empty(), "the table is back");
        restores.push(deleted.elapsed());
    }

    println!();
    println!("| what | p50 | p99 | min | max | trials |");
    println!("| --- | --- | --- | --- | --- | --- |");
    row(
        "replica killed → out of the LB's spread, run probes again (before)",
        &mut reprobed,
    );
    row(
        "replica killed → out of the LB's spread, run reuses the watch's probes",
        &mut reused,
    );
    row("table deleted → restored", &mut restores);
}

/// Runs `lessnat agent` with `extra` arguments on `lb`, once it has the
/// replica at `address` in its spread.
fn start_agent(lb: &Node, spec: &Path, extra: &[&str], address: &Ipv4Addr) -> AgentProcess {
    let mut command = Topology::lessnat(lb, &["agent", "--interval", "60s"]);
    command
        .args(extra)
        .arg("-f")
        .arg(spec)
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let agent = AgentProcess(command.spawn().expect("lessnat agent"));
    wait_until(|| spread(lb).contains(address), "the agent runs");
    eprintln!("agent on {} {extra:?}", lb.name);
    agent
}

/// `trials` times: kill the replica `victim` at `address`, time until the
/// agent on `lb` takes it out of the spread, start and re-wire it again.
fn removals(
    lb: &Node,
    worker: &Node,
    spec: &Path,
    victim: &str,
    address: &Ipv4Addr,
    trials: usize,
) -> Vec<Duration> {
    let mut removals = Vec::new();
    for trial in 1..=trials {
        wait_until(
            || spread(lb).contains(address),
            "the replica is in the spread",
        );
        // Once the agent is idle again (the run after its own last write),
        // and between two health probes, wherever they fall.
        std::thread::sleep(SETTLE + Duration::from_millis(50 * (trial as u64 % 5)));
        let killed = Instant::now();
        support::run("docker", &["kill", victim]);
        wait_until(
            || !spread(lb).contains(address),
            "the replica leaves the spread",
        );
        removals.push(killed.elapsed());
        support::run("docker", &["start", victim]);
        Topology::apply(worker, spec);
    }
    removals
}

/// One table row of `samples`.
fn row(what: &str, samples: &mut [Duration]) {
    samples.sort();
    let at = |q: f64| {
        let index = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples[index.min(samples.len() - 1)]
    };
    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1000.0);
    println!(
        "| {what} | {} | {} | {} | {} | {} |",
        ms(at(0.5)),
        ms(at(0.99)),
        ms(samples[0]),
        ms(samples[samples.len() - 1]),
        samples.len()
    );
}

/// Polls `done` every [`POLL`] until it holds; panics after [`GIVE_UP`].
fn wait_until(mut done: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + GIVE_UP;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {GIVE_UP:?}");
        std::thread::sleep(POLL);
    }
}

/// The replica addresses in the LB's `routed_dnat` chain (empty when the
/// table or chain is missing).
fn spread(lb: &Node) -> Vec<Ipv4Addr> {
    let output = lb
        .ns
        .try_exec("nft", &["list", "chain", "inet", "lessnat", "routed_dnat"]);
    if !output.status.success() {
        return Vec::new();
    }
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.contains("dnat"))
        .flat_map(|line| {
            line.split(|c: char| !(c.is_ascii_digit() || c == '.'))
                .filter_map(|word| word.parse::<Ipv4Addr>().ok())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The address a routed replica container was made for.
fn replica_address(container: &str) -> Ipv4Addr {
    let output = support::run(
        "docker",
        &[
            "inspect",
            "--format",
            "{{index .Config.Labels \"io.lessnat.address\"}}",
            container,
        ],
    );
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("the address label of {container}: {e}"))
}
