//! Cluster coordination when etcd is slow rather than gone: a real
//! three-member etcd on loopback, the routed site in network namespaces
//! (two clients, two load-balancer nodes, two workers) with containers of
//! the test server, and `lessnat agent` as the real binary on every node
//! (`support::cluster_site`). A node reaches etcd through a TCP forwarder
//! of the test's own (`support::forward`) that adds latency or stalls:
//!
//! - latency well above the client's timeouts on one LB's link, a stall
//!   (connections accepted, nothing passed on) on the other's, under load
//!   through both: no request fails, both agents' runs keep completing,
//!   metrics and `lessnat status` say etcd is unreachable, and the stalled
//!   LB follows its own probes (a replica deregistered meanwhile stays in
//!   its spread: it still answers);
//! - then a latency just below the timeouts: both LBs read the
//!   registrations again and leave the deregistered replica out, keep etcd
//!   reachable, and follow a registration made under that latency;
//! - a worker whose link is slow, just in time, upgrades by the handshake;
//!   too slow, from the moment its spec changes, it falls back to
//!   `switchWait` (its lease expires meanwhile, so the LBs drop its
//!   replicas and the other worker's serve); no request fails through
//!   either LB, and once the link is fast the LBs take its new replica in.
//!
//! - a worker `kill -9`ed (its agent, and the apply it runs in-process)
//!   while it holds the rollout slot and its upgrade is in flight: the slot
//!   frees itself within `leaseTtl`; its agent started again resumes the
//!   upgrade found in flight without taking another slot and records
//!   `done`; the other worker upgrades too (possibly at the same time: it
//!   may take the freed slot before the resumed upgrade ends, printed); no
//!   request through either LB fails.
//!
//! Timings are printed; the bounds asserted are generous.

mod support;

use std::time::{Duration, Instant};

use lessnat::backend::etcd::{REQUEST_TIMEOUT, Snapshot};
use lessnat::cluster::keys::{Keys, RolloutKey, SlotRecord};
use serde_json::Value;
use support::cluster_site::{
    ClusterSite, load_through, member_address, names_in_spread, wait_etcd_up, wait_output_after,
    wait_spread,
};
use support::forward::Forwarder;
use support::image::test_image;
use support::load::{Load, Report};
use support::process::Process;
use support::topology::{Node, Topology, output_within, show};

/// The longest the test waits for anything that should take a few seconds.
const BOUND: Duration = Duration::from_secs(30);

/// The workers' replicas.
const FIRST: &str = "10.20.1.5";
const SECOND: &str = "10.20.2.5";

/// One-way latency well above the client's timeouts (2 s a call, 2 s a
/// connection, 2 s a ping's answer): a round trip takes 6 s.
const SLOW: Duration = Duration::from_secs(3);

/// One-way latency just below them: a round trip takes 1.4 s.
const SLOW_BUT_IN_TIME: Duration = Duration::from_millis(700);

/// The value of the metric line starting with `name` (the sum over its
/// labels) in the agent's `/metrics`.
fn metric(agent: &Process, name: &str) -> f64 {
    agent
        .http_get("/metrics")
        .lines()
        .filter(|line| line.starts_with(name))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// How many runs the agent finished, whatever their trigger and outcome.
fn runs(agent: &Process) -> f64 {
    metric(agent, "lessnat_agent_runs_total")
}

/// `lessnat status --json` on `node`.
fn status(node: &Node) -> Value {
    let output = output_within(Topology::lessnat(node, &["status", "--json"]), BOUND);
    assert!(output.status.success(), "{}", show(&output));
    serde_json::from_slice(&output.stdout).expect("status JSON")
}

/// Stops `load` and asserts that none of its requests failed.
fn no_failures(load: Load, origin: Instant, what: &str) -> Report {
    load.wait_requests(50, BOUND).expect("the load runs");
    let report = load.stop();
    let failed = report.failed();
    eprintln!(
        "load through {what}: {}; failed: {}",
        report.summary(origin),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "requests failed through {what}: {failed:?}"
    );
    report
}

/// Waits until `address` is in (`want`) or out of both LBs' spreads; how
/// long that took.
fn wait_spreads(site: &ClusterSite, address: &str, want: bool) -> Duration {
    let started = Instant::now();
    for lb in &site.site.lbs {
        wait_spread(lb, address, want, BOUND);
    }
    started.elapsed()
}

/// Waits until both LBs and both replicas are registered and in both
/// spreads, then starts load through each LB (4 clients each); when it
/// started, and the loads, each running.
fn registered_and_loaded(site: &ClusterSite) -> (Instant, Vec<Load>) {
    let keys = site.keys();
    for lb in &site.site.lbs {
        let live = site.wait_key(&keys.node(&lb.name), true, BOUND);
        assert!(live, "{} not registered", lb.name);
    }
    for address in [FIRST, SECOND] {
        assert!(site.wait_key(&keys.replica("web", address), true, BOUND));
        wait_spreads(site, address, true);
    }
    let origin = Instant::now();
    let loads: Vec<Load> = (0..2).map(|c| load_through(&site.site, c, 4)).collect();
    for load in &loads {
        load.wait_requests(50, BOUND).expect("the load runs");
    }
    (origin, loads)
}

#[test]
fn slow_etcd_links_leave_serving_and_runs_alone_and_the_lbs_converge_once_in_time() {
    let test = "slow_etcd_links_leave_serving_and_runs_alone_and_the_lbs_converge_once_in_time";
    let Some(site) = ClusterSite::new(test, 2, 3) else {
        return;
    };
    let links: Vec<Forwarder> = (0..2)
        .map(|member| Forwarder::start(member_address(&site.etcd, member)))
        .collect();
    let spec = site.write_spec("spec", &test_image("v1"), None);
    site.site.apply_all(&spec);
    let workers: Vec<Process> = site
        .site
        .workers
        .iter()
        .map(|worker| ClusterSite::agent(worker, &spec, "1s"))
        .collect();
    let lbs: Vec<Process> = site
        .site
        .lbs
        .iter()
        .zip(&links)
        .map(|(lb, link)| {
            let own = site.write_spec(&lb.name, &test_image("v1"), Some(&[link.url()]));
            ClusterSite::agent(lb, &own, "1s")
        })
        .collect();
    let keys = site.keys();
    let (origin, loads) = registered_and_loaded(&site);

    // Too slow: one link with latency, the other stalled.
    let slowed = Instant::now();
    links[0].delay(SLOW);
    links[1].stall();
    for ((lb, agent), how) in site.site.lbs.iter().zip(&lbs).zip(["slow", "stalled"]) {
        wait_etcd_up(BOUND, agent, lb, false);
        eprintln!(
            "{} ({how}): lessnat_cluster_etcd_up 0 {:.3}s after the link slowed",
            lb.name,
            slowed.elapsed().as_secs_f64()
        );
        // `status` shows what the agent's last run recorded: a run later.
        let deadline = Instant::now() + BOUND;
        while status(lb)["agent"]["cluster"]["up"] != false {
            assert!(Instant::now() < deadline, "{:#}", status(lb));
            std::thread::sleep(Duration::from_millis(200));
        }
        let text = show(&output_within(Topology::lessnat(lb, &["status"]), BOUND));
        assert!(text.contains("unreachable since"), "{text}");
    }
    // The second worker's agent stops cleanly: its lease is revoked, so its
    // replica is no longer registered; it still runs and answers.
    let mut workers = workers.into_iter();
    let (first_worker, second_worker) =
        (workers.next().expect("two"), workers.next().expect("two"));
    let (stopped, _) = second_worker.end(nix::sys::signal::Signal::SIGTERM);
    assert!(stopped.success(), "the second worker's agent: {stopped}");
    assert!(site.wait_key(&keys.replica("web", SECOND), false, BOUND));
    // Runs go on: every agent finishes runs on its interval.
    let before: Vec<f64> = lbs.iter().map(runs).collect();
    let watched = Duration::from_secs(6);
    std::thread::sleep(watched);
    for ((lb, agent), before) in site.site.lbs.iter().zip(&lbs).zip(before) {
        let done = runs(agent) - before;
        let last = metric(agent, "lessnat_agent_last_run_duration_seconds");
        eprintln!(
            "{}: {done} runs in {watched:?} while etcd was too slow; the last took {last:.3}s",
            lb.name
        );
        assert!(done >= 3.0, "{}: {done} runs:\n{}", lb.name, agent.output());
        assert!(
            last < REQUEST_TIMEOUT.as_secs_f64() * 2.0,
            "{}: the last run took {last}s",
            lb.name
        );
        assert_eq!(metric(agent, "lessnat_cluster_etcd_up"), 0.0, "{}", lb.name);
    }
    // The stalled LB hears nothing: on its own probes, the deregistered
    // replica (it answers) stays. The slow one's watch may still deliver
    // the deletion, late, until its connection's ping times out.
    wait_spread(&site.site.lbs[1], SECOND, true, Duration::ZERO);
    eprintln!(
        "{} (slow): the deregistered replica {} its spread",
        site.site.lbs[0].name,
        if names_in_spread(&site.site.lbs[0], SECOND) {
            "still in"
        } else {
            "already out of"
        }
    );

    // In time, barely: both links get a latency just below the timeouts.
    let eased = Instant::now();
    for link in &links {
        link.delay(SLOW_BUT_IN_TIME);
    }
    for (lb, agent) in site.site.lbs.iter().zip(&lbs) {
        wait_etcd_up(BOUND, agent, lb, true);
        eprintln!(
            "{}: etcd reachable {:.3}s after the latency went down to {SLOW_BUT_IN_TIME:?}",
            lb.name,
            eased.elapsed().as_secs_f64()
        );
    }
    wait_spreads(&site, SECOND, false);
    eprintln!(
        "both LBs left the deregistered replica out {:.3}s after the latency went down",
        eased.elapsed().as_secs_f64()
    );
    for lb in &site.site.lbs {
        assert!(
            site.wait_key(&keys.node(&lb.name), true, BOUND),
            "{}",
            lb.name
        );
    }
    // Under that latency, a registration reaches the LBs, and etcd stays
    // reachable for them throughout.
    let restarted = Instant::now();
    let second_worker = ClusterSite::agent(&site.site.workers[1], &spec, "1s");
    let mut back = None;
    while back.is_none() || restarted.elapsed() < Duration::from_secs(10) {
        for (lb, agent) in site.site.lbs.iter().zip(&lbs) {
            assert_eq!(
                metric(agent, "lessnat_cluster_etcd_up"),
                1.0,
                "{}: etcd unreachable under {SLOW_BUT_IN_TIME:?} of latency:\n{}",
                lb.name,
                agent.output()
            );
        }
        let both = site.site.lbs.iter().all(|lb| names_in_spread(lb, SECOND));
        if both && back.is_none() {
            back = Some(restarted.elapsed());
        }
        assert!(
            restarted.elapsed() < BOUND,
            "{SECOND} never back in both spreads"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "both LBs sent new connections to the replica registered again {:.3}s after its agent started (its first run included)",
        back.unwrap_or_default().as_secs_f64()
    );
    for link in &links {
        link.delay(Duration::ZERO);
    }
    for (index, load) in loads.into_iter().enumerate() {
        no_failures(load, origin, &site.site.lbs[index].name.clone());
    }
    drop(second_worker);
    drop(first_worker);
    drop(lbs);
    drop(links);
}

/// Every line of the agents' output, by when it came (from `origin`).
fn timeline(agents: &[(&str, &Process)], origin: Instant) -> String {
    let mut lines: Vec<(Instant, String)> = agents
        .iter()
        .flat_map(|(name, agent)| {
            agent
                .lines_with("")
                .into_iter()
                .map(move |(at, line)| (at, format!("{name}: {line}")))
        })
        .collect();
    lines.sort();
    lines
        .into_iter()
        .map(|(at, line)| {
            let t = at
                .checked_duration_since(origin)
                .map_or(0.0, |d| d.as_secs_f64());
            format!("+{t:.3} {line}")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn a_worker_upgrades_without_loss_over_a_slow_etcd_link_by_handshake_or_switch_wait() {
    let test = "a_worker_upgrades_without_loss_over_a_slow_etcd_link_by_handshake_or_switch_wait";
    let Some(site) = ClusterSite::new(test, 2, 3) else {
        return;
    };
    // The first worker reaches etcd through the forwarder; everyone else
    // directly, with its own spec file that follows the same versions.
    let link = Forwarder::start(member_address(&site.etcd, 0));
    let specs = |version: &str| {
        let shared = site.write_spec("spec", &test_image(version), None);
        let slow = site.write_spec("slow", &test_image(version), Some(&[link.url()]));
        (shared, slow)
    };
    let (spec, slow_spec) = specs("v1");
    site.site.apply_all(&spec);
    let (worker1, worker2) = (&site.site.workers[0], &site.site.workers[1]);
    let slow_worker = ClusterSite::agent(worker1, &slow_spec, "1s");
    let other_worker = ClusterSite::agent(worker2, &spec, "1s");
    let lbs: Vec<Process> = site
        .site
        .lbs
        .iter()
        .map(|lb| ClusterSite::agent(lb, &spec, "1s"))
        .collect();
    let keys = site.keys();
    let (origin, loads) = registered_and_loaded(&site);
    let lb_names = {
        let mut names: Vec<&str> = site.site.lbs.iter().map(|lb| lb.name.as_str()).collect();
        names.sort_unstable();
        names.join(", ")
    };

    // Slow, in time: the handshake works, only slower.
    link.delay(SLOW_BUT_IN_TIME);
    std::thread::sleep(2 * SLOW_BUT_IN_TIME);
    let changed = Instant::now();
    specs("v2");
    let (acked, line) = wait_output_after(
        &slow_worker,
        Some(changed),
        &[
            "every live load-balancer node switched to 10.20.1.6",
            &format!("acknowledged by {lb_names}; lease expired: none"),
        ],
        Duration::from_secs(60),
    );
    eprintln!(
        "{} ({SLOW_BUT_IN_TIME:?} each way): {:.3}s after the spec changed: {line}",
        worker1.name,
        acked.duration_since(changed).as_secs_f64()
    );
    let (removed, _) = wait_output_after(
        &slow_worker,
        Some(changed),
        &["removing the old version at", FIRST],
        BOUND,
    );
    let took = removed.duration_since(changed);
    eprintln!(
        "{}: upgrade by handshake, old replica removed {:.3}s after the spec changed",
        worker1.name,
        took.as_secs_f64()
    );
    // Well within drainTimeout (30 s), which bounds a handshake that hangs.
    assert!(took < Duration::from_secs(25), "{took:?}");
    assert!(
        slow_worker
            .lines_with("falling back to switchWait")
            .is_empty(),
        "the handshake fell back under {SLOW_BUT_IN_TIME:?}:\n{}",
        slow_worker.output()
    );
    wait_output_after(
        &other_worker,
        Some(changed),
        &["removing the old version at", SECOND],
        BOUND,
    );
    for address in ["10.20.1.6", "10.20.2.6"] {
        wait_spreads(&site, address, true);
    }
    for address in [FIRST, SECOND] {
        wait_spreads(&site, address, false);
    }

    // Too slow, from the moment the spec changes: the worker's calls time
    // out, so it falls back to switchWait; its lease expires meanwhile and
    // the LBs drop its replicas (the other worker's serve).
    let changed = Instant::now();
    link.delay(SLOW);
    specs("v3");
    let (fell_back, line) = wait_output_after(
        &slow_worker,
        Some(changed),
        &["web: etcd cannot be reached", "falling back to switchWait"],
        Duration::from_secs(60),
    );
    eprintln!(
        "{} ({SLOW:?} each way): {:.3}s after the spec changed: {line}",
        worker1.name,
        fell_back.duration_since(changed).as_secs_f64()
    );
    let (removed, _) = wait_output_after(
        &slow_worker,
        Some(changed),
        &["removing the old version at", "10.20.1.6"],
        BOUND,
    );
    let took = removed.duration_since(changed);
    eprintln!(
        "{}: upgrade on switchWait, old replica removed {:.3}s after the spec changed",
        worker1.name,
        took.as_secs_f64()
    );
    // A start, the calls that time out (2 s each), switchWait (3 s) and the
    // drain's 2 s of quiet, with room to spare.
    assert!(took < Duration::from_secs(20), "{took:?}");
    wait_output_after(
        &other_worker,
        Some(changed),
        &["removing the old version at", "10.20.2.6"],
        BOUND,
    );
    let worker_key = keys.node(&worker1.name);
    assert!(
        site.wait_key(&worker_key, false, BOUND),
        "{}'s lease never expired",
        worker1.name
    );
    // Back to a fast link: the worker registers its new replica again and
    // the LBs take it in.
    let restored = Instant::now();
    link.delay(Duration::ZERO);
    wait_spreads(&site, FIRST, true);
    eprintln!(
        "{}: its new replica in both spreads {:.3}s after the link was fast again",
        worker1.name,
        restored.elapsed().as_secs_f64()
    );
    wait_spreads(&site, SECOND, true);
    for address in ["10.20.1.6", "10.20.2.6"] {
        wait_spreads(&site, address, false);
    }
    let mut all: Vec<(&str, &Process)> = vec![
        (worker1.name.as_str(), &slow_worker),
        (worker2.name.as_str(), &other_worker),
    ];
    all.extend(site.site.lbs.iter().map(|lb| lb.name.as_str()).zip(&lbs));
    eprintln!("{}", timeline(&all, origin));
    for (index, load) in loads.into_iter().enumerate() {
        no_failures(load, origin, &site.site.lbs[index].name.clone());
    }
    drop(lbs);
    drop(other_worker);
    drop(slow_worker);
    drop(link);
}

/// The rollout keys of `web` now: each slot's holder, and the nodes done.
fn rollout(site: &ClusterSite, keys: &Keys) -> (Vec<String>, Vec<String>) {
    let read: Snapshot = site
        .client()
        .get_prefix(&keys.rollouts())
        .expect("read the rollouts");
    let (mut slots, mut done) = (Vec::new(), Vec::new());
    for entry in &read.entries {
        match keys.rollout_of(&entry.key) {
            Some(RolloutKey::Slot { .. }) => {
                let record: SlotRecord = serde_json::from_slice(&entry.value).expect("a slot");
                slots.push(record.node);
            }
            Some(RolloutKey::Done { node, .. }) => done.push(node.to_string()),
            _ => {}
        }
    }
    (slots, done)
}

/// Waits until the rollout keys satisfy `want`; how long that took, and
/// the last read.
fn wait_rollout(
    site: &ClusterSite,
    keys: &Keys,
    what: &str,
    want: impl Fn(&[String], &[String]) -> bool,
) -> (Duration, (Vec<String>, Vec<String>)) {
    let started = Instant::now();
    loop {
        let read = rollout(site, keys);
        if want(&read.0, &read.1) {
            return (started.elapsed(), read);
        }
        assert!(started.elapsed() < BOUND * 2, "{what}: {read:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_worker_killed_mid_rollout_frees_its_slot_and_resumes_its_upgrade_when_back() {
    let test = "a_worker_killed_mid_rollout_frees_its_slot_and_resumes_its_upgrade_when_back";
    let lease_ttl = 3;
    let Some(mut site) = ClusterSite::new(test, 2, lease_ttl) else {
        return;
    };
    site.etcd.wait_healthy();
    // One node at a time, one canary node held for 2 s.
    let write = |version: &str| {
        let spec = site.write_spec("spec", &test_image(version), None);
        let text = std::fs::read_to_string(&spec).expect("spec").replacen(
            "      stopTimeout: 5s\n",
            "      stopTimeout: 5s\n      rollout: { maxParallel: 1, canary: { nodes: 1, hold: 2s } }\n",
            1,
        );
        assert!(text.contains("rollout:"), "{text}");
        std::fs::write(&spec, text).expect("write spec");
        spec
    };
    let spec = write("v1");
    site.site.apply_all(&spec);
    let mut workers: Vec<Option<Process>> = site
        .site
        .workers
        .iter()
        .map(|w| Some(ClusterSite::agent(w, &spec, "1s")))
        .collect();
    let lbs: Vec<Process> = site
        .site
        .lbs
        .iter()
        .map(|lb| ClusterSite::agent(lb, &spec, "1s"))
        .collect();
    let keys = site.keys();
    let (origin, loads) = registered_and_loaded(&site);
    let changed = Instant::now();
    write("v2");
    let (_, (slots, _)) = wait_rollout(&site, &keys, "a slot taken", |slots, _| !slots.is_empty());
    let holder = site
        .site
        .workers
        .iter()
        .position(|w| w.name == slots[0])
        .expect("a worker holds the slot");
    let (victim, other) = (&site.site.workers[holder], &site.site.workers[1 - holder]);
    // In flight: its next version published, the drain under way.
    let agent = workers[holder].as_ref().expect("running");
    wait_output_after(agent, Some(changed), &["web: published"], BOUND);
    let killed = Instant::now();
    let (status, _) = workers[holder]
        .take()
        .expect("running")
        .end(nix::sys::signal::Signal::SIGKILL);
    assert!(!status.success());
    eprintln!(
        "{}: killed with the slot held and its upgrade published, {:.3}s after the spec changed",
        victim.name,
        killed.duration_since(changed).as_secs_f64()
    );
    let (freed, read) = wait_rollout(&site, &keys, "the slot freed", |slots, _| {
        !slots.contains(&victim.name)
    });
    eprintln!(
        "{}: its slot freed {:.3}s after the kill (leaseTtl {lease_ttl}s); rollout then: {read:?}",
        victim.name,
        freed.as_secs_f64()
    );
    assert!(freed <= Duration::from_secs(lease_ttl + 1), "{freed:?}");
    let restarted = Instant::now();
    workers[holder] = Some(ClusterSite::agent(victim, &spec, "1s"));
    let agent = workers[holder].as_ref().expect("running");
    let (_, line) = wait_output_after(agent, None, &["resuming the upgrade"], BOUND);
    eprintln!("{}: {line}", victim.name);
    let (_, read) = wait_rollout(&site, &keys, "the resumed upgrade done", |_, done| {
        done.contains(&victim.name)
    });
    eprintln!(
        "{}: done {:.3}s after its agent started again; rollout then: {read:?}",
        victim.name,
        restarted.elapsed().as_secs_f64()
    );
    // The resumed upgrade takes a slot again when one is free; the other
    // worker, woken when the slot freed, may have taken it meanwhile, as
    // the canary, and upgraded at the same time: the resumed one then goes
    // on without a slot and says so.
    eprintln!(
        "{}: {}",
        other.name,
        if read.0.contains(&other.name) || read.1.contains(&other.name) {
            "took the freed slot before the resumed upgrade was done (both upgraded at once)"
        } else {
            "had not taken the slot when the resumed upgrade was done"
        }
    );
    assert!(
        agent.lines_with("does not start").is_empty()
            && (!agent
                .lines_with("resumes without a rollout slot")
                .is_empty()
                || !agent
                    .lines_with("again for the upgrade to version")
                    .is_empty()),
        "the resumed upgrade waited for a slot, or did not say how it went on:\n{}",
        agent.output()
    );
    let (_, read) = wait_rollout(&site, &keys, "both done", |slots, done| {
        slots.is_empty() && done.len() == 2
    });
    eprintln!(
        "{}: done too {:.3}s after the spec changed; rollout: {read:?}",
        other.name,
        changed.elapsed().as_secs_f64()
    );
    for address in ["10.20.1.6", "10.20.2.6"] {
        wait_spreads(&site, address, true);
    }
    for address in [FIRST, SECOND] {
        wait_spreads(&site, address, false);
    }
    let mut all: Vec<(&str, &Process)> = site
        .site
        .workers
        .iter()
        .map(|w| w.name.as_str())
        .zip(workers.iter().flatten())
        .collect();
    all.extend(site.site.lbs.iter().map(|lb| lb.name.as_str()).zip(&lbs));
    eprintln!("{}", timeline(&all, origin));
    for (index, load) in loads.into_iter().enumerate() {
        no_failures(load, origin, &site.site.lbs[index].name.clone());
    }
    drop(lbs);
    drop(workers);
}
