//! A routed canary (`upgrade.canary`, a share of new connections to the
//! next version) on a site with `cluster:`: a real three-member etcd on
//! loopback, the routed site in network namespaces (two clients, two
//! load-balancer nodes, one worker) with containers of the test server, and
//! `lessnat agent` as the real binary on every node.
//!
//! With a cluster the load-balancer nodes take health from the
//! registrations, not from their own probes, so the promotion cannot reach
//! them by dropping their probes of the old replica: it reaches them through
//! the upgrade the worker publishes once it promotes. The test checks that
//! the LBs stay on the old replica while the worker holds the canary, switch
//! once it promoted it, and that the upgrade ends with no failed request.
//!
//! Timings are printed, not asserted.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::cluster_site::{ClusterSite, load_through, names_in_spread, wait_output, wait_spread};
use support::image::test_image;
use support::load::Report;
use support::process::Process;
use support::topology::Node;

/// The longest the test waits for the upgrade's steps.
const BOUND: Duration = Duration::from_secs(60);

/// The worker's replica and where its upgrade moves it.
const OLD: &str = "10.20.1.5";
const NEW: &str = "10.20.1.6";

/// The canary: 10% of new connections for 4 s, then promoted by itself.
const CANARY: &str = "canary: { weight: 10%, hold: 4s, unhealthyAfter: 3 }";

/// Writes spec `name` running `image` with the canary; returns its path.
fn canary_spec(site: &ClusterSite, name: &str, image: &str) -> PathBuf {
    let spec = site.write_spec(name, image, None);
    let text = std::fs::read_to_string(&spec).expect("spec");
    let text = text.replacen("upgrade:\n", &format!("upgrade:\n      {CANARY}\n"), 1);
    std::fs::write(&spec, text).expect("write spec");
    spec
}

/// Waits until `worker`'s table carries the canary's split; when it did.
fn wait_split(worker: &Node) -> Instant {
    let deadline = Instant::now() + BOUND;
    loop {
        let table = worker
            .ns
            .try_exec("nft", &["list", "table", "inet", "lessnat"]);
        if String::from_utf8_lossy(&table.stdout).contains("numgen random mod 100 < 10 dnat") {
            return Instant::now();
        }
        assert!(Instant::now() < deadline, "the worker never set the split");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts every node's agent with `spec` (runs every 1 s without events).
fn agents(site: &ClusterSite, spec: &Path) -> Vec<Process> {
    site.site
        .workers
        .iter()
        .chain(&site.site.lbs)
        .map(|node| ClusterSite::agent(node, spec, "1s"))
        .collect()
}

#[test]
fn a_routed_canary_with_a_cluster_holds_then_the_lbs_follow_its_promotion() {
    let test = "a_routed_canary_with_a_cluster_holds_then_the_lbs_follow_its_promotion";
    let Some(site) = ClusterSite::new(test, 1, 2) else {
        return;
    };
    let spec = canary_spec(&site, "spec", &test_image("v1"));
    site.site.apply_all(&spec);
    let agents = agents(&site, &spec);
    let worker = &agents[0];
    for lb in &site.site.lbs {
        wait_spread(lb, OLD, true, BOUND);
    }
    let origin = Instant::now();
    let loads = [
        load_through(&site.site, 0, 4),
        load_through(&site.site, 1, 4),
    ];
    for load in &loads {
        load.wait_requests(50, BOUND).expect("the load runs");
    }
    let changed = Instant::now();
    canary_spec(&site, "spec", &test_image("v2"));
    let held = wait_split(&site.site.workers[0]);
    // While the worker holds, both addresses are registered healthy and
    // the LBs stay on the old one.
    std::thread::sleep(Duration::from_secs(2));
    let promoting = worker.lines_with("promoting").first().map(|(at, _)| *at);
    assert!(
        promoting.is_none(),
        "the 4 s hold ended within 2 s:\n{}",
        worker.output()
    );
    for lb in &site.site.lbs {
        assert!(
            names_in_spread(lb, OLD) && !names_in_spread(lb, NEW),
            "{} left the old replica during the hold",
            lb.name
        );
    }
    for lb in &site.site.lbs {
        wait_spread(lb, NEW, true, BOUND);
        wait_spread(lb, OLD, false, BOUND);
    }
    let switched = Instant::now();
    let (done, _) = wait_output(worker, &["Drift corrected (interval"], BOUND);
    eprintln!(
        "canary held {:.3}s after the spec changed; both LBs on the next version {:.3}s after; upgrade done {:.3}s after",
        (held - changed).as_secs_f64(),
        (switched - changed).as_secs_f64(),
        (done - changed).as_secs_f64()
    );
    let reports: Vec<Report> = loads
        .into_iter()
        .map(|load| {
            load.wait_requests(50, BOUND).expect("the load runs");
            load.stop()
        })
        .collect();
    let report = Report::merged(reports);
    let failed = report.failed();
    eprintln!(
        "load through both LBs: {}; failed: {}",
        report.summary(origin),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "requests failed: {failed:?}\nagents:\n{}",
        agents
            .iter()
            .map(|a| a.output_since(origin))
            .collect::<Vec<_>>()
            .join("\n----\n")
    );
    let versions = report.versions(|_| true);
    assert!(
        versions.get("v2").copied().unwrap_or(0) > 0,
        "no request reached v2: {versions:?}"
    );
}
