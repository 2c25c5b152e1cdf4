//! Cluster coordination end to end: a real three-member etcd on loopback
//! (`support::etcd`), the routed site in network namespaces
//! (`support::topology`: two clients, two load-balancer nodes, two workers)
//! with containers of the test server, and `lessnat agent` as the real
//! binary on every node. Workers register their replicas with the health
//! their own probes find; the load-balancer agents watch and move their
//! spreads (read back from each LB's nftables):
//!
//! - a replica paused (`docker pause`) is registered unhealthy and leaves
//!   both spreads, and comes back when unpaused; the same after the etcd
//!   leader is killed (registrations and watches go on);
//! - a worker's agent killed with `kill -9`: its registrations vanish within
//!   the lease TTL and both LBs drop its replica; started again, it is back;
//! - agents stopped cleanly revoke their leases: nothing stays registered;
//! - every etcd member killed under load: the LBs keep serving with no
//!   failed request, say so in status and metrics, and converge again when
//!   etcd is back;
//! - a routed upgrade run by the workers' agents under load: the LBs switch
//!   when the `next` replicas are registered, no request fails, and the
//!   drain ends by itself (the workers' own probes are not clients).
//!
//! Timings are printed, not asserted.

mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use lessnat::backend::etcd::KeyChange;
use serde_json::Value;
use support::cluster_site::{ClusterSite, KeyClock, wait_etcd_up};
use support::image::test_image;
use support::load::{Load, LoadConfig, Report};
use support::process::Process;
use support::topology::{Node, Topology, output_within, show};

/// The longest the test waits for anything that should take a second or
/// two (a lease TTL of 2 s included).
const BOUND: Duration = Duration::from_secs(15);

/// The replica on the second worker: the one the test takes out.
const VICTIM: &str = "10.20.2.5";

/// The replica on the first worker.
const STAYS: &str = "10.20.1.5";

/// A site with etcd, a spec with a `cluster:` block (lease TTL 2 s), both
/// workers' replicas applied by hand, and a watch of the test's own on the
/// replica registrations.
struct Cluster {
    base: ClusterSite,
    spec: PathBuf,
    clock: KeyClock,
}

impl Cluster {
    /// `None` (skipped) without root, the tools or Docker.
    fn new(test: &str) -> Option<Cluster> {
        let base = ClusterSite::new(test, 2, 2)?;
        let spec = base.write_spec("spec", &test_image("v1"), None);
        base.site.apply_all(&spec);
        let clock = KeyClock::start(base.client(), base.keys().replicas());
        Some(Cluster { base, spec, clock })
    }

    /// Writes the spec (`spec.yaml`) with the service's `image`.
    fn write_spec(&self, image: &str) {
        self.base.write_spec("spec", image, None);
    }

    /// The first change of the victim's registration to `healthy` (a
    /// deletion counts as unhealthy) that the test's watch saw after `after`.
    fn registered(&self, healthy: bool, after: Instant) -> Option<Instant> {
        let key = self.base.keys().replica("web", VICTIM);
        self.clock.first_after(&key, after, |change| match change {
            KeyChange::Put(entry) => {
                serde_json::from_slice::<Value>(&entry.value).is_ok_and(|v| v["healthy"] == true)
                    == healthy
            }
            KeyChange::Delete { .. } => !healthy,
        })
    }

    /// Starts the agent of `node` and waits until it is ready.
    fn agent(&self, node: &Node) -> Process {
        self.agent_every(node, "60s")
    }

    /// Starts the agent of `node`, running every `interval` without events,
    /// and waits until it is ready.
    fn agent_every(&self, node: &Node, interval: &str) -> Process {
        ClusterSite::agent(node, &self.spec, interval)
    }

    /// `lessnat status --cluster --json` (from the first LB's view of the CLI).
    fn status(&self) -> Value {
        let mut command = Topology::lessnat(
            &self.base.site.lbs[0],
            &["status", "--cluster", "--json", "--spec"],
        );
        command.arg(&self.spec);
        let output = output_within(command, BOUND);
        assert!(
            output.status.success(),
            "status --cluster:\n{}",
            show(&output)
        );
        serde_json::from_slice(&output.stdout).expect("status JSON")
    }

    /// Waits until `status --cluster` has `nodes` nodes and `healthy`
    /// healthy replicas.
    fn wait_registered(&self, nodes: usize, healthy: usize) -> Value {
        let deadline = Instant::now() + BOUND;
        loop {
            let status = self.status();
            let listed = status["nodes"].as_array().map_or(0, Vec::len);
            let up = status["nodes"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|n| n["replicas"].as_array().into_iter().flatten())
                .filter(|r| r["healthy"] == Value::Bool(true))
                .count();
            if listed == nodes && up == healthy {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "expected {nodes} nodes and {healthy} healthy replicas registered:\n{status:#}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Whether `lb`'s spread (its `routed_dnat` chain) sends to `address`.
fn in_spread(lb: &Node, address: &str) -> bool {
    let output = lb
        .ns
        .exec("nft", &["list", "chain", "inet", "lessnat", "routed_dnat"]);
    String::from_utf8_lossy(&output.stdout).contains(address)
}

/// Waits until every LB's spread has (`want`) or lacks `address`; returns
/// how long after `since` the last one got there.
fn wait_spreads(lbs: &[Node], address: &str, want: bool, since: Instant) -> Duration {
    let deadline = Instant::now() + BOUND;
    let mut done = vec![None; lbs.len()];
    while done.iter().any(Option::is_none) {
        for (lb, done) in lbs.iter().zip(&mut done) {
            if done.is_none() && in_spread(lb, address) == want {
                *done = Some(since.elapsed());
            }
        }
        assert!(
            Instant::now() < deadline,
            "{address} {} the spreads within {BOUND:?}",
            if want {
                "did not come back into"
            } else {
                "did not leave"
            }
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    done.into_iter().flatten().max().unwrap_or_default()
}

/// The run times the agent printed for runs woken by the cluster trigger
/// that applied a change (`Drift corrected (cluster: …) … in 0.08s`).
fn cluster_run_seconds(agent: &Process) -> Vec<f64> {
    agent
        .lines_with("Drift corrected (cluster:")
        .iter()
        .filter_map(|(_, line)| {
            let seconds = line.rsplit(" in ").next()?.trim_end_matches("s.");
            seconds.parse().ok()
        })
        .collect()
}

fn container_of(worker: &Node) -> String {
    let containers = Topology::containers(worker);
    assert_eq!(containers.len(), 1, "containers: {containers:?}");
    containers[0].clone()
}

/// Pauses the victim's container, waits for both LBs to drop it, unpauses
/// it and waits for it to come back; prints how long each took.
fn pause_and_unpause(cluster: &Cluster, what: &str) {
    let victim = container_of(&cluster.base.site.workers[1]);
    let paused = Instant::now();
    support::run("docker", &["pause", &victim]);
    let out = wait_spreads(&cluster.base.site.lbs, VICTIM, false, paused);
    let registered_out = cluster.registered(false, paused);
    assert!(
        cluster.base.site.lbs.iter().all(|lb| in_spread(lb, STAYS)),
        "the healthy replica stays in"
    );
    // `lessnat status` on an LB shows it out, unhealthy by its registration.
    let deadline = Instant::now() + BOUND;
    loop {
        let status = lb_status(&cluster.base.site.lbs[0]);
        let replicas = &status["agent"]["spreads"][0]["replicas"];
        let shown_out =
            replicas.as_array().into_iter().flatten().any(|r| {
                r["address"] == VICTIM && r["in_spread"] == false && r["healthy"] == false
            });
        if shown_out {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "status does not show {VICTIM} out: {status:#}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let unpaused = Instant::now();
    support::run("docker", &["unpause", &victim]);
    let back = wait_spreads(&cluster.base.site.lbs, VICTIM, true, unpaused);
    let registered_back = cluster.registered(true, unpaused);
    let after = |registered: Option<Instant>, since: Instant, took: Duration| {
        registered.map_or("?".to_string(), |at| {
            format!(
                "{:.3}",
                (since + took).saturating_duration_since(at).as_secs_f64()
            )
        })
    };
    eprintln!(
        "{what}: registration change to both spreads changed: out {}s, back {}s",
        after(registered_out, paused, out),
        after(registered_back, unpaused, back)
    );
    eprintln!(
        "{what}: paused replica out of both spreads {:.3}s after the pause, back {:.3}s after the unpause",
        out.as_secs_f64(),
        back.as_secs_f64()
    );
}

#[test]
fn registrations_move_the_spreads_through_pauses_a_killed_leader_and_a_killed_agent() {
    let test = "registrations_move_the_spreads_through_pauses_a_killed_leader_and_a_killed_agent";
    let Some(mut cluster) = Cluster::new(test) else {
        return;
    };
    let mut workers: Vec<Process> = cluster
        .base
        .site
        .workers
        .iter()
        .map(|w| cluster.agent(w))
        .collect();
    let mut lbs: Vec<Process> = cluster
        .base
        .site
        .lbs
        .iter()
        .map(|lb| cluster.agent(lb))
        .collect();
    let status = cluster.wait_registered(4, 2);
    eprintln!("registered: {status:#}");
    wait_spreads(&cluster.base.site.lbs, VICTIM, true, Instant::now());
    wait_spreads(&cluster.base.site.lbs, STAYS, true, Instant::now());
    assert!(
        cluster
            .base
            .site
            .lbs
            .iter()
            .all(|lb| in_spread(lb, VICTIM) && in_spread(lb, STAYS))
    );

    // A replica that stops answering its worker's probe.
    pause_and_unpause(&cluster, "pause");

    // The etcd leader killed: registrations and watches go on.
    let leader = cluster.base.etcd.leader().expect("a leader");
    cluster.base.etcd.kill(leader);
    eprintln!("killed etcd member {leader}, the leader");
    pause_and_unpause(&cluster, "pause with the etcd leader killed");
    cluster.base.etcd.restart(leader);

    // A worker's agent killed: its lease expires, its replica leaves.
    let killed = Instant::now();
    let (_, output) = workers.remove(1).end(nix::sys::signal::Signal::SIGKILL);
    let out = wait_spreads(&cluster.base.site.lbs, VICTIM, false, killed);
    eprintln!(
        "kill -9 of a worker's agent: its replica out of both spreads {:.3}s after the kill (lease TTL 2s)",
        out.as_secs_f64()
    );
    assert!(!output.contains("panicked"), "{output}");
    cluster.wait_registered(3, 1);
    let restarted = Instant::now();
    workers.insert(1, cluster.agent(&cluster.base.site.workers[1]));
    let back = wait_spreads(&cluster.base.site.lbs, VICTIM, true, restarted);
    eprintln!(
        "the worker's agent started again: its replica back {:.3}s after the start",
        back.as_secs_f64()
    );

    // How long the LB agents' runs woken by registration changes took.
    for (lb, agent) in cluster.base.site.lbs.iter().zip(&lbs) {
        let seconds = cluster_run_seconds(agent);
        eprintln!(
            "{}: runs that moved the spread after a registration change took {seconds:?} s",
            lb.name
        );
        assert!(seconds.len() >= 4, "{}:\n{}", lb.name, agent.output());
    }
    let text = {
        let mut command = Topology::lessnat(
            &cluster.base.site.lbs[0],
            &["status", "--cluster", "--spec"],
        );
        command.arg(&cluster.spec);
        show(&output_within(command, BOUND))
    };
    eprintln!("{text}");
    assert!(text.contains("4 nodes registered"), "{text}");

    // Stopped cleanly, every agent revokes its lease.
    for agent in workers.drain(..).chain(lbs.drain(..)) {
        let (status, output) = agent.end(nix::sys::signal::Signal::SIGTERM);
        assert!(status.success(), "{status}\n{output}");
    }
    let status = cluster.status();
    assert_eq!(status["nodes"], Value::Array(Vec::new()), "{status:#}");
}

#[test]
fn an_lb_cut_off_from_etcd_keeps_serving_and_converges_when_it_returns() {
    let test = "an_lb_cut_off_from_etcd_keeps_serving_and_converges_when_it_returns";
    let Some(mut cluster) = Cluster::new(test) else {
        return;
    };
    let workers: Vec<Process> = cluster
        .base
        .site
        .workers
        .iter()
        .map(|w| cluster.agent(w))
        .collect();
    let lbs: Vec<Process> = cluster
        .base
        .site
        .lbs
        .iter()
        .map(|lb| cluster.agent(lb))
        .collect();
    cluster.wait_registered(4, 2);
    let origin = Instant::now();
    let loads = start_load(&cluster.base.site);
    let cut = Instant::now();
    cluster.base.etcd.kill_all();
    for (lb, agent) in cluster.base.site.lbs.iter().zip(&lbs) {
        wait_etcd_up(BOUND, agent, lb, false);
        eprintln!(
            "{}: lessnat_cluster_etcd_up 0 {:.3}s after etcd died",
            lb.name,
            cut.elapsed().as_secs_f64()
        );
        let status = lb_status(lb);
        assert_eq!(
            status["agent"]["cluster"]["up"],
            Value::Bool(false),
            "{status:#}"
        );
        assert!(
            status["agent"]["cluster"]["unreachable_since"].is_u64(),
            "{status:#}"
        );
    }
    let text = {
        let command = Topology::lessnat(&cluster.base.site.lbs[0], &["status"]);
        show(&output_within(command, BOUND))
    };
    assert!(text.contains("unreachable since"), "{text}");
    std::thread::sleep(Duration::from_secs(3));
    for load in &loads {
        load.wait_requests(100, BOUND).expect("the load runs");
    }
    assert!(
        cluster
            .base
            .site
            .lbs
            .iter()
            .all(|lb| in_spread(lb, VICTIM) && in_spread(lb, STAYS))
    );
    let restored = Instant::now();
    cluster.base.etcd.restart_all();
    for (lb, agent) in cluster.base.site.lbs.iter().zip(&lbs) {
        wait_etcd_up(BOUND, agent, lb, true);
        eprintln!(
            "{}: etcd reachable again {:.3}s after its members restarted",
            lb.name,
            restored.elapsed().as_secs_f64()
        );
    }
    cluster.wait_registered(4, 2);
    finish_load(
        loads,
        origin,
        "outage",
        &workers.iter().chain(&lbs).collect::<Vec<_>>(),
    );
    // Converged: a replica paused now leaves the spreads as before.
    pause_and_unpause(&cluster, "pause after etcd came back");
    drop(workers);
    drop(lbs);
}

/// Load from both clients through the VIP (a request counts as failed
/// after 1 s), running once each has had 50 answers.
fn start_load(site: &Topology) -> Vec<Load> {
    let loads = site.load(8, |config| LoadConfig {
        io_timeout: Duration::from_secs(1),
        ..config
    });
    for load in &loads {
        load.wait_requests(50, BOUND).expect("the load runs");
    }
    loads
}

/// Stops `loads` after 100 more answers each, prints the report and
/// asserts that no request failed through `what`; when one did, shows the
/// `agents`' output on the load's clock.
fn finish_load(loads: Vec<Load>, origin: Instant, what: &str, agents: &[&Process]) {
    for load in &loads {
        load.wait_requests(100, BOUND).expect("the load runs");
    }
    let report = Report::merged(loads.into_iter().map(Load::stop));
    let failed = report.failed();
    eprintln!(
        "load through the {what}: {}; failed: {}",
        report.summary(origin),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "requests failed through the {what}: {failed:?}\nagents:\n{}",
        agents
            .iter()
            .map(|a| a.output_since(origin))
            .collect::<Vec<_>>()
            .join("\n----\n")
    );
}

/// `lessnat status --json` on `lb`.
fn lb_status(lb: &Node) -> Value {
    let command = Topology::lessnat(lb, &["status", "--json"]);
    let output = output_within(command, BOUND);
    assert!(output.status.success(), "{}", show(&output));
    serde_json::from_slice(&output.stdout).expect("status JSON")
}

/// A routed upgrade of both workers' replicas, run by the workers' agents
/// while the LB agents follow the registrations: the `next` replicas are
/// registered as soon as they run and answer, the LBs switch to them, and no
/// request fails under load.
#[test]
fn a_routed_upgrade_run_by_agents_follows_the_registrations_without_loss() {
    let test = "a_routed_upgrade_run_by_agents_follows_the_registrations_without_loss";
    let Some(cluster) = Cluster::new(test) else {
        return;
    };
    let workers: Vec<Process> = cluster
        .base
        .site
        .workers
        .iter()
        .map(|w| cluster.agent_every(w, "1s"))
        .collect();
    let lbs: Vec<Process> = cluster
        .base
        .site
        .lbs
        .iter()
        .map(|lb| cluster.agent(lb))
        .collect();
    cluster.wait_registered(4, 2);
    wait_spreads(&cluster.base.site.lbs, VICTIM, true, Instant::now());
    let origin = Instant::now();
    let loads = start_load(&cluster.base.site);
    let started = Instant::now();
    cluster.write_spec(&test_image("v2"));
    // Both replicas move to their other addresses (.6), new version.
    let moved = wait_spreads(&cluster.base.site.lbs, "10.20.2.6", true, started);
    wait_spreads(&cluster.base.site.lbs, "10.20.1.6", true, started);
    eprintln!(
        "both LBs send new connections to the next replicas {:.3}s after the spec changed",
        moved.as_secs_f64()
    );
    for agent in &workers {
        let deadline = Instant::now() + Duration::from_secs(90);
        while agent.lines_with("Drift corrected (interval").is_empty() {
            assert!(
                Instant::now() < deadline,
                "the worker's agent did not finish the upgrade:\n{}",
                agent.output()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    cluster.wait_registered(4, 2);
    let took = started.elapsed();
    eprintln!(
        "upgrade done {:.3}s after the spec changed",
        took.as_secs_f64()
    );
    // The drain ends by itself (drainTimeout is 30s): the workers' own
    // registration probes of the old replica are not counted as clients.
    assert!(
        took < Duration::from_secs(25),
        "the upgrade took {took:?}: the drain waited for its timeout; workers:\n{}",
        workers
            .iter()
            .map(Process::output)
            .collect::<Vec<_>>()
            .join("\n----\n")
    );
    finish_load(
        loads,
        origin,
        "upgrade",
        &workers.iter().chain(&lbs).collect::<Vec<_>>(),
    );
    drop(workers);
    drop(lbs);
}
