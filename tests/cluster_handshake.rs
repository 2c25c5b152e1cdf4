//! The upgrade handshake end to end: a real three-member etcd on loopback,
//! the routed site in network namespaces (two clients, two load-balancer
//! nodes, one worker) with containers of the test server, and `lessnat
//! agent` as the real binary on every node (`support::cluster_site`):
//!
//! - a routed upgrade under load through one LB while the other LB's agent
//!   runs with no client traffic: no request fails, and the old replica is
//!   removed only once both LBs have acknowledged the switch (the
//!   acknowledgements' keys were written before Docker destroyed it);
//! - an LB cut off from etcd (a TCP forwarder of the test's own between its
//!   agent and etcd) while it switches, on its own probes, acknowledges on
//!   a later run once it can reach etcd again, before its lease expires;
//! - an LB cut off for longer than its lease: the worker goes on once the
//!   lease expired; back, the LB's spread no longer names the removed
//!   replica and no request through it fails;
//! - the etcd leader killed while the worker waits for the second LB's
//!   acknowledgement: the upgrade completes on the other members, and no
//!   request through either LB fails.
//!
//! Timings are printed, not asserted.

mod support;

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use support::cluster_site::{
    ClusterSite, KeyClock, load_through, member_address, names_in_spread, wait_etcd_up,
    wait_output, wait_spread,
};
use support::forward::Forwarder;
use support::image::test_image;
use support::load::{Load, Report};
use support::process::Process;
use support::topology::{Node, Topology, output_within, show};

/// The longest the test waits for anything that should take a few seconds.
const BOUND: Duration = Duration::from_secs(30);

/// The worker's replica and where its upgrade moves it.
const OLD: &str = "10.20.1.5";
const NEW: &str = "10.20.1.6";

/// Stops `load` and asserts that none of its requests failed; its report.
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

/// The ID of container `name`.
fn container_id(name: &str) -> String {
    let output = support::run("docker", &["inspect", "--format", "{{.Id}}", name]);
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// When Docker destroyed container `id` (between `since` and now).
fn destroyed_at(id: &str, since: SystemTime) -> Option<SystemTime> {
    let seconds = |t: SystemTime| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let output = support::run(
        "docker",
        &[
            "events",
            "--since",
            &seconds(since).to_string(),
            "--until",
            &(seconds(SystemTime::now()) + 1).to_string(),
            "--filter",
            &format!("container={id}"),
            "--filter",
            "event=destroy",
            "--format",
            "{{.TimeNano}}",
        ],
    );
    let nanos: u64 = String::from_utf8_lossy(&output.stdout)
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()?;
    Some(UNIX_EPOCH + Duration::from_nanos(nanos))
}

/// The names in a worker's `acknowledged by …; lease expired: …` line.
fn handshake_line(acknowledged: &[&str], expired: &[&str]) -> String {
    let list = |names: &[&str]| {
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        }
    };
    format!(
        "acknowledged by {}; lease expired: {}",
        list(acknowledged),
        list(expired)
    )
}

/// Sorted names of `nodes`.
fn sorted<'a>(nodes: impl IntoIterator<Item = &'a Node>) -> Vec<&'a str> {
    let mut names: Vec<&str> = nodes.into_iter().map(|n| n.name.as_str()).collect();
    names.sort_unstable();
    names
}

/// Starts the agents: the worker's every second (it picks the spec change
/// up), each LB's with its spec.
fn agents(site: &ClusterSite, worker_spec: &Path, lb_specs: [&Path; 2]) -> (Process, Vec<Process>) {
    let worker = ClusterSite::agent(&site.site.workers[0], worker_spec, "1s");
    let lbs = site
        .site
        .lbs
        .iter()
        .zip(lb_specs)
        .map(|(lb, spec)| ClusterSite::agent(lb, spec, "1s"))
        .collect();
    for lb in &site.site.lbs {
        wait_spread(lb, OLD, true, BOUND);
    }
    (worker, lbs)
}

#[test]
fn the_old_replica_goes_only_after_both_lbs_acknowledged_with_one_lb_idle() {
    let test = "the_old_replica_goes_only_after_both_lbs_acknowledged_with_one_lb_idle";
    let Some(site) = ClusterSite::new(test, 1, 2) else {
        return;
    };
    let spec = site.write_spec("spec", &test_image("v1"), None);
    site.site.apply_all(&spec);
    let (worker, lbs) = agents(&site, &spec, [&spec, &spec]);
    let keys = site.keys();
    assert!(
        site.wait_key(&keys.replica("web", OLD), true, BOUND),
        "{}",
        worker.output()
    );
    let clock = KeyClock::start(site.client(), format!("{}/", site.prefix));
    let old = container_id(&format!("lessnat-web.{}", site.site.workers[0].name));
    let origin = Instant::now();
    // Clients through the first LB only: the second is idle.
    let busy = load_through(&site.site, 0, 8);
    busy.wait_requests(50, BOUND).expect("the load runs");
    let changed = SystemTime::now();
    let started = Instant::now();
    site.write_spec("spec", &test_image("v2"), None);
    let (_, line) = wait_output(
        &worker,
        &[
            "every live load-balancer node switched to",
            &handshake_line(&sorted(&site.site.lbs), &[]),
        ],
        Duration::from_secs(90),
    );
    eprintln!("worker: {line}");
    wait_output(&worker, &["removing the old version at", OLD], BOUND);
    let deadline = Instant::now() + BOUND;
    let destroyed = loop {
        if let Some(at) = destroyed_at(&old, changed) {
            break at;
        }
        assert!(Instant::now() < deadline, "{old} never destroyed");
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!(
        "upgrade: old replica destroyed {:.3}s after the spec changed",
        destroyed
            .duration_since(changed)
            .unwrap_or_default()
            .as_secs_f64()
    );
    for lb in &site.site.lbs {
        let (_, acked) = clock
            .first(&keys.ack("web", OLD, &lb.name), true)
            .unwrap_or_else(|| panic!("{} never acknowledged", lb.name));
        assert!(
            acked < destroyed,
            "{} acknowledged after the old replica was destroyed",
            lb.name
        );
        eprintln!(
            "{}: acknowledged {:.3}s before the old replica was destroyed, {:.3}s after the spec changed",
            lb.name,
            destroyed
                .duration_since(acked)
                .unwrap_or_default()
                .as_secs_f64(),
            acked
                .duration_since(changed)
                .unwrap_or_default()
                .as_secs_f64()
        );
        wait_spread(lb, NEW, true, BOUND);
        assert!(!names_in_spread(lb, OLD), "{}", lb.name);
    }
    eprintln!(
        "upgrade done {:.3}s after the spec changed",
        started.elapsed().as_secs_f64()
    );
    no_failures(busy, origin, "the busy LB during the upgrade");
    drop(lbs);
    drop(worker);
}

/// A site whose second LB reaches etcd through a forwarder; its spec file
/// is its own (`lb2.yaml`), the others share `spec.yaml`. The worker's
/// upgrade to v2 has started: `spec.yaml` says v2, `lb2.yaml` still v1, so
/// the second LB has not switched, and the worker has published the
/// upgrade and waits for both LBs.
struct Behind {
    // Fields drop in order: the agents end before the site is destroyed.
    worker: Process,
    lbs: Vec<Process>,
    busy: Load,
    origin: Instant,
    forwarder: Forwarder,
    lb2_spec: std::path::PathBuf,
    site: ClusterSite,
}

impl Behind {
    fn start(test: &str, lease_ttl: u64) -> Option<Behind> {
        let site = ClusterSite::new(test, 1, lease_ttl)?;
        let forwarder = Forwarder::start(member_address(&site.etcd, 0));
        let spec = site.write_spec("spec", &test_image("v1"), None);
        let lb2_spec = site.write_spec("lb2", &test_image("v1"), Some(&[forwarder.url()]));
        site.site.apply_all(&spec);
        let (worker, lbs) = agents(&site, &spec, [&spec, &lb2_spec]);
        let registered = site.wait_key(&site.keys().replica("web", OLD), true, BOUND);
        assert!(registered, "{}", worker.output());
        // The worker waits for the LBs registered when it publishes.
        for (lb, agent) in site.site.lbs.iter().zip(&lbs) {
            let live = site.wait_key(&site.keys().node(&lb.name), true, BOUND);
            assert!(live, "{} not registered:\n{}", lb.name, agent.output());
        }
        let origin = Instant::now();
        let busy = load_through(&site.site, 0, 8);
        busy.wait_requests(50, BOUND).expect("the load runs");
        site.write_spec("spec", &test_image("v2"), None);
        // The first LB may have acknowledged before the worker published
        // (it switches once the next version is registered): the second,
        // still on v1, is waited for.
        let (_, line) = wait_output(
            &worker,
            &[
                "load-balancer nodes to acknowledge: ",
                &site.site.lbs[1].name,
            ],
            Duration::from_secs(90),
        );
        eprintln!("worker: {line}");
        let lb1 = &site.site.lbs[0].name;
        let acked = site.wait_key(&site.keys().ack("web", OLD, lb1), true, BOUND);
        assert!(acked, "{}", lbs[0].output());
        assert!(
            names_in_spread(&site.site.lbs[1], OLD),
            "lb2 switched early"
        );
        upgrade_in_status(&site, &spec);
        Some(Behind {
            site,
            forwarder,
            lb2_spec,
            worker,
            lbs,
            busy,
            origin,
        })
    }

    fn lb2(&self) -> &Node {
        &self.site.site.lbs[1]
    }

    /// Cuts the second LB off from etcd, waits until its agent knows, then
    /// gives it the v2 spec; returns when the cut began.
    fn cut_and_catch_up(&self) -> Instant {
        let cut = Instant::now();
        self.forwarder.cut();
        wait_etcd_up(BOUND, &self.lbs[1], self.lb2(), false);
        eprintln!(
            "{}: etcd unreachable {:.3}s after the cut",
            self.lb2().name,
            cut.elapsed().as_secs_f64()
        );
        let endpoints = [self.forwarder.url()];
        let written = self
            .site
            .write_spec("lb2", &test_image("v2"), Some(&endpoints));
        assert_eq!(written, self.lb2_spec);
        cut
    }
}

/// `status --cluster` shows the upgrade in flight: acknowledged by the
/// first LB, pending on the second.
fn upgrade_in_status(site: &ClusterSite, spec: &Path) {
    let (lb1, lb2) = (&site.site.lbs[0].name, &site.site.lbs[1].name);
    let status = |json: bool| {
        let mut args = vec!["status", "--cluster", "--spec"];
        if json {
            args.insert(2, "--json");
        }
        let mut command = Topology::lessnat(&site.site.lbs[0], &args);
        command.arg(spec);
        let output = output_within(command, BOUND);
        assert!(output.status.success(), "{}", show(&output));
        output.stdout
    };
    let json: Value = serde_json::from_slice(&status(true)).expect("status JSON");
    let upgrade = &json["upgrades"][0];
    assert_eq!(upgrade["service"], "web", "{json:#}");
    assert_eq!(upgrade["worker"], site.site.workers[0].name.as_str());
    assert_eq!(
        (upgrade["from"].as_str(), upgrade["to"].as_str()),
        (Some(OLD), Some(NEW))
    );
    assert_eq!(
        upgrade["acknowledged"],
        serde_json::json!([lb1]),
        "{json:#}"
    );
    assert_eq!(upgrade["pending"], serde_json::json!([lb2]), "{json:#}");
    let text = String::from_utf8_lossy(&status(false)).into_owned();
    let line = format!("{OLD} -> {NEW}");
    let pending = format!("acknowledged by {lb1}; pending: {lb2}");
    assert!(text.contains(&line) && text.contains(&pending), "{text}");
    eprintln!(
        "status --cluster: {}",
        text.lines()
            .find(|l| l.contains(&pending))
            .unwrap_or_default()
            .trim()
    );
}

#[test]
fn an_lb_that_switched_while_cut_off_acknowledges_once_it_reaches_etcd_again() {
    let test = "an_lb_that_switched_while_cut_off_acknowledges_once_it_reaches_etcd_again";
    // A lease that outlives the cut: the worker must wait for the LB's
    // acknowledgement, not for its lease to expire.
    let Some(behind) = Behind::start(test, 15) else {
        return;
    };
    let keys = behind.site.keys();
    let lb2 = behind.lb2().name.clone();
    behind.cut_and_catch_up();
    // Cut off, it plans with its own probes: it switches, and cannot
    // acknowledge.
    wait_spread(behind.lb2(), NEW, true, BOUND);
    assert!(
        behind.lbs[1].lines_with("acknowledged in etcd").is_empty(),
        "acknowledged while cut off:\n{}",
        behind.lbs[1].output()
    );
    let restored = Instant::now();
    behind.forwarder.restore();
    let acked = behind
        .site
        .wait_key(&keys.ack("web", OLD, &lb2), true, BOUND);
    assert!(acked, "{}", behind.lbs[1].output());
    eprintln!(
        "{lb2}: acknowledged {:.3}s after it could reach etcd again",
        restored.elapsed().as_secs_f64()
    );
    let (_, line) = wait_output(
        &behind.lbs[1],
        &[
            "acknowledged in etcd: this node sends new connections to",
            NEW,
        ],
        BOUND,
    );
    eprintln!("{lb2}: {line}");
    let names = sorted(&behind.site.site.lbs);
    let (_, line) = wait_output(
        &behind.worker,
        &[
            "every live load-balancer node switched to",
            &handshake_line(&names, &[]),
        ],
        BOUND,
    );
    eprintln!("worker: {line}");
    wait_output(&behind.worker, &["removing the old version at", OLD], BOUND);
    no_failures(behind.busy, behind.origin, "the first LB");
}

#[test]
fn an_lb_cut_off_past_its_lease_lets_the_worker_go_on_and_converges_when_it_returns() {
    let test = "an_lb_cut_off_past_its_lease_lets_the_worker_go_on_and_converges_when_it_returns";
    let Some(behind) = Behind::start(test, 2) else {
        return;
    };
    let keys = behind.site.keys();
    let (lb1, lb2) = (
        behind.site.site.lbs[0].name.clone(),
        behind.lb2().name.clone(),
    );
    let clock = KeyClock::start(behind.site.client(), format!("{}/", behind.site.prefix));
    let cut = behind.cut_and_catch_up();
    let (went_on, line) = wait_output(
        &behind.worker,
        &[
            "every live load-balancer node switched to",
            &handshake_line(&[&lb1], &[&lb2]),
        ],
        BOUND,
    );
    eprintln!("worker: {line}");
    // The worker counts a node as expired only once its key is deleted;
    // the test's own watch saw that deletion too (the two watches see it
    // a few milliseconds apart, in either order).
    let (expired, _) = clock
        .first(&keys.node(&lb2), false)
        .expect("the cut-off LB's node key was deleted");
    let after = |a: Instant, b: Instant| {
        a.checked_duration_since(b)
            .map_or_else(|| -b.duration_since(a).as_secs_f64(), |d| d.as_secs_f64())
    };
    eprintln!(
        "{lb2}: lease expired {:.3}s after the cut; the worker went on {:.3}s after that",
        after(expired, cut),
        after(went_on, expired)
    );
    wait_output(&behind.worker, &["removing the old version at", OLD], BOUND);
    wait_output(&behind.worker, &["becoming", NEW], BOUND);
    let restored = Instant::now();
    behind.forwarder.restore();
    wait_etcd_up(BOUND, &behind.lbs[1], behind.lb2(), true);
    let back = behind.site.wait_key(&keys.node(&lb2), true, BOUND);
    assert!(
        back,
        "{lb2} not registered again:\n{}",
        behind.lbs[1].output()
    );
    wait_spread(behind.lb2(), NEW, true, BOUND);
    assert!(
        !names_in_spread(behind.lb2(), OLD),
        "{lb2} still sends to the removed replica"
    );
    eprintln!(
        "{lb2}: registered again {:.3}s after it could reach etcd",
        restored.elapsed().as_secs_f64()
    );
    let origin = Instant::now();
    let through = load_through(&behind.site.site, 1, 8);
    through.wait_requests(200, BOUND).expect("the load runs");
    no_failures(through, origin, "the LB that came back");
    assert!(!names_in_spread(behind.lb2(), OLD));
    no_failures(behind.busy, behind.origin, "the first LB");
}

#[test]
fn the_upgrade_completes_without_loss_when_the_etcd_leader_dies_mid_handshake() {
    let test = "the_upgrade_completes_without_loss_when_the_etcd_leader_dies_mid_handshake";
    let Some(mut site) = ClusterSite::new(test, 1, 2) else {
        return;
    };
    // The second LB has a spec file of its own, still on v1 once the
    // worker's says v2: the worker publishes and waits for it.
    let spec = site.write_spec("spec", &test_image("v1"), None);
    let lb2_spec = site.write_spec("lb2", &test_image("v1"), None);
    site.site.apply_all(&spec);
    let (worker, lbs) = agents(&site, &spec, [&spec, &lb2_spec]);
    let keys = site.keys();
    assert!(
        site.wait_key(&keys.replica("web", OLD), true, BOUND),
        "{}",
        worker.output()
    );
    for (lb, agent) in site.site.lbs.iter().zip(&lbs) {
        let live = site.wait_key(&keys.node(&lb.name), true, BOUND);
        assert!(live, "{} not registered:\n{}", lb.name, agent.output());
    }
    let origin = Instant::now();
    let loads: Vec<Load> = (0..2).map(|c| load_through(&site.site, c, 4)).collect();
    for load in &loads {
        load.wait_requests(50, BOUND).expect("the load runs");
    }
    site.write_spec("spec", &test_image("v2"), None);
    let lb2 = site.site.lbs[1].name.clone();
    wait_output(
        &worker,
        &["load-balancer nodes to acknowledge: ", &lb2],
        Duration::from_secs(90),
    );
    let leader = site.etcd.leader().expect("etcd has a leader");
    let killed = Instant::now();
    site.etcd.kill(leader);
    eprintln!("killed the etcd leader (member {leader}) while the worker waits for {lb2}");
    site.write_spec("lb2", &test_image("v2"), None);
    let names = sorted(&site.site.lbs);
    let (_, line) = wait_output(
        &worker,
        &[
            "every live load-balancer node switched to",
            &handshake_line(&names, &[]),
        ],
        Duration::from_secs(60),
    );
    eprintln!(
        "worker, {:.3}s after the kill: {line}",
        killed.elapsed().as_secs_f64()
    );
    wait_output(&worker, &["removing the old version at", OLD], BOUND);
    wait_output(&worker, &["becoming", NEW], BOUND);
    eprintln!(
        "upgrade done {:.3}s after the kill",
        killed.elapsed().as_secs_f64()
    );
    for lb in &site.site.lbs {
        wait_spread(lb, NEW, true, BOUND);
        assert!(
            !names_in_spread(lb, OLD),
            "{} still sends to {OLD}",
            lb.name
        );
    }
    for (index, load) in loads.into_iter().enumerate() {
        no_failures(load, origin, &site.site.lbs[index].name.clone());
    }
    drop(lbs);
    drop(worker);
}
