//! Routed mode end to end: two clients, two load-balancer nodes sharing one
//! VIP and one or two workers, each a network namespace
//! (`support::topology`), each node driven by its own `lessnat apply --node
//! NAME --netns NS` as on separate machines, against one Docker engine.
//!
//! What is measured, not assumed: the client address every `/peer` answer
//! shows; which LB forwarded each reply (test-owned nft counters in the LB
//! namespaces); that no namespace has a SNAT or masquerade rule; the DSCP and
//! ECN bits UDP datagrams arrive at the worker with; requests dropped during
//! an upgrade v1 → v2 with load from both clients while LB applies run every
//! 0.3 s; what `plan` and `apply` make of a container restarted behind
//! lessnat's back; and, with LB applies on a 1 s timer, requests failing
//! after a replica is killed (by time since the kill) and its return to the
//! spread.
//!
//! The tests run one at a time (a lock in this binary): each builds its own
//! site and node names with a random tag, so they would not collide, but the
//! upgrade's timing is easier on two CPUs without a neighbour. On the way
//! out, also on panic, `lessnat destroy` runs on every node, the site's
//! containers are removed by name and the namespaces are deleted.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use support::image::test_image;
use support::load::{self, Load, LoadConfig, LongLived, Report};
use support::topology::{
    self, CLIENT_ADDRESSES, CLIENT_SUBNET, HTTP_PORT, Node, Replica, Service, Stack, Topology,
    client_of, show,
};

/// The service's name in every spec.
const SERVICE: &str = "web";
/// Client threads per client namespace.
const CLIENTS_PER_NAMESPACE: usize = 8;
/// Between two LB applies while a worker upgrades.
const LB_APPLY_EVERY: Duration = Duration::from_millis(300);
/// How long the connections held open across an upgrade's switch last: longer
/// than the next version's start plus `switchWait` (3 s), so the worker's
/// drain has to wait for them.
const HOLD_MS: u64 = 6000;

/// A site of `stack` for one test, with the test's lock held; `None`
/// (skipped) without root, nft or Docker.
struct Site {
    topo: Topology,
    _serial: MutexGuard<'static, ()>,
}

impl std::ops::Deref for Site {
    type Target = Topology;
    fn deref(&self) -> &Topology {
        &self.topo
    }
}

fn site_in(test: &str, workers: usize, stack: Stack) -> Option<Site> {
    static SERIAL: Mutex<()> = Mutex::new(());
    if !support::root_with(test, &["nft", "sysctl"]) || !support::docker(test) {
        return None;
    }
    // Build the images before taking the lock: nobody waits for a build.
    test_image("v1");
    test_image("v2");
    let serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let topo = Topology::new_stack(workers, stack);
    let names: Vec<&str> = topo.nodes().map(|n| n.name.as_str()).collect();
    eprintln!("{test}: nodes {}", names.join(", "));
    Some(Site {
        topo,
        _serial: serial,
    })
}

/// A site with the service at v1 applied on every node (workers first);
/// the spec's path.
fn installed(test: &str, workers: usize) -> Option<(Site, PathBuf)> {
    installed_with(test, workers, replicas)
}

/// [`installed`] with the service's `replicas`.
fn installed_with(
    test: &str,
    workers: usize,
    replicas: fn(&Topology) -> Vec<Replica>,
) -> Option<(Site, PathBuf)> {
    installed_in(test, workers, replicas, Stack::Ipv4)
}

/// [`installed_with`] on a site of `stack`.
fn installed_in(
    test: &str,
    workers: usize,
    replicas: fn(&Topology) -> Vec<Replica>,
    stack: Stack,
) -> Option<(Site, PathBuf)> {
    let site = site_in(test, workers, stack)?;
    if stack.has_ipv6() {
        site.strict_rpfilter6();
    }
    let service = Service::new(SERVICE, &test_image("v1"), replicas(&site));
    let spec = site.write_spec("v1", &[service]);
    site.apply_all(&spec);
    Some((site, spec))
}

/// One replica (`10.20.N.5`, next `10.20.N.6`) on each worker.
fn replicas(topo: &Topology) -> Vec<Replica> {
    (0..topo.workers.len()).map(|w| Replica::on(w, 5)).collect()
}

/// One replica (`fd00:20:N::5`, next `fd00:20:N::6`) on each worker.
fn replicas6(topo: &Topology) -> Vec<Replica> {
    (0..topo.workers.len())
        .map(|w| Replica::on6(w, 5))
        .collect()
}

/// One IPv4 and one IPv6 replica on each worker.
fn replicas_dual(topo: &Topology) -> Vec<Replica> {
    let mut all = replicas(topo);
    all.extend(replicas6(topo));
    all
}

/// The VIP addresses the site's spec serves (HTTP).
fn targets(topo: &Topology) -> Vec<SocketAddr> {
    match topo.stack {
        Stack::Ipv4 => vec![topology::vip()],
        Stack::Ipv6 => vec![topology::vip6()],
        Stack::Dual => vec![topology::vip(), topology::vip6()],
    }
}

/// The addresses client `client` reaches [`targets`] from.
fn client_addresses(topo: &Topology, client: usize) -> Vec<String> {
    let v4 = CLIENT_ADDRESSES[client].to_string();
    let v6 = topology::CLIENT_ADDRESSES6[client].to_string();
    match topo.stack {
        Stack::Ipv4 => vec![v4],
        Stack::Ipv6 => vec![v6],
        Stack::Dual => vec![v4, v6],
    }
}

/// A pool of client threads in each client namespace, asking the VIP for
/// `/peer` (each of the site's VIPs, on a dual-stack site).
fn client_load(topo: &Topology) -> Vec<Load> {
    targets(topo)
        .into_iter()
        .flat_map(|target| {
            topo.load_to(target, CLIENTS_PER_NAMESPACE, |config| LoadConfig {
                io_timeout: Duration::from_secs(5),
                ..config
            })
        })
        .collect()
}

/// Waits until each pool made `n` more requests.
fn wait_requests(loads: &[Load], n: usize) {
    for load in loads {
        load.wait_requests(n, Duration::from_secs(60))
            .expect("the load runs");
    }
}

fn stop(loads: Vec<Load>) -> Report {
    Report::merged(loads.into_iter().map(Load::stop))
}

/// No request failed (the summary counts them and shows the first ones).
fn assert_no_failures(report: &Report, origin: Instant, what: &str) {
    let summary = report.summary(origin);
    assert_eq!(report.failed().len(), 0, "{what}: {summary}");
}

/// Every successful `/peer` answer shows the real address of the client
/// that asked (each of its addresses answered, on a dual-stack site).
fn assert_real_client_addresses(topo: &Topology, report: &Report, what: &str) {
    for i in 0..CLIENT_ADDRESSES.len() {
        let peers = report.peers(|s| client_of(s) == i);
        let addresses = client_addresses(topo, i);
        assert!(
            addresses
                .iter()
                .all(|a| peers.get(a).is_some_and(|n| *n > 0)),
            "{what}: client {} ({addresses:?}) got no answer at each address: {peers:?}",
            i + 1
        );
        assert!(
            peers.keys().all(|p| addresses.contains(p)),
            "{what}: client addresses the server saw for client {} ({addresses:?}): {peers:?}",
            i + 1
        );
    }
}

/// `plan --detailed-exitcode` exits 0 on every node.
fn assert_converged(topo: &Topology, spec: &std::path::Path) {
    for node in topo.nodes() {
        let (code, output) = Topology::plan_exit(node, spec);
        assert_eq!(
            code,
            Some(0),
            "plan --detailed-exitcode on {} after apply:\n{output}",
            node.name
        );
    }
}

/// The veths in `worker`'s namespace other than its own link to the fabric:
/// the ones lessnat made for containers.
fn container_veths(worker: &Node) -> Vec<String> {
    let output = worker
        .ns
        .exec("ip", &["-j", "link", "show", "type", "veth"]);
    let links: serde_json::Value = serde_json::from_slice(&output.stdout).expect("ip -j link JSON");
    links
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["ifname"].as_str())
        .filter(|name| *name != "fab")
        .map(str::to_string)
        .collect()
}

/// Counts the connections `worker` receives from the fabric (SYNs to the
/// service's port), from zero, in a test-owned nft table.
fn count_syns(worker: &Node) {
    let _ = worker
        .ns
        .try_exec("nft", &["delete", "table", "inet", "lnt_syn"]);
    worker.ns.nft(&format!(
        "table inet lnt_syn {{\n  counter syn {{}}\n  chain prerouting {{\n    \
         type filter hook prerouting priority -400; policy accept;\n    \
         iifname \"fab\" tcp dport {HTTP_PORT} tcp flags & (syn | ack) == syn counter name syn\n  }}\n}}\n"
    ));
}

/// The connections `worker` received since [`count_syns`].
fn syns(worker: &Node) -> u64 {
    topology::nft_counters(&worker.ns, "inet", "lnt_syn")
        .get("syn")
        .copied()
        .unwrap_or(0)
}

/// Image and `io.lessnat.address` label of a container.
fn image_and_address(container: &str) -> (String, String) {
    let output = support::run(
        "docker",
        &[
            "inspect",
            "--format",
            "{{.Config.Image}} {{index .Config.Labels \"io.lessnat.address\"}}",
            container,
        ],
    );
    let text = String::from_utf8_lossy(&output.stdout).trim().to_string();
    let (image, address) = text.split_once(' ').unwrap_or((&text, ""));
    (image.to_string(), address.to_string())
}

/// `GET /` from client `client` through the VIP, retried for up to `within`;
/// the version that answered.
fn version_within(topo: &Topology, client: usize, within: Duration) -> String {
    version_at_within(topo, client, topology::vip(), within)
}

/// [`version_within`] through `target`.
fn version_at_within(
    topo: &Topology,
    client: usize,
    target: SocketAddr,
    within: Duration,
) -> String {
    let deadline = Instant::now() + within;
    loop {
        let sample = topo.request_to(client, target, "/");
        if sample.ok() {
            return sample.version.expect("a version");
        }
        assert!(
            Instant::now() < deadline,
            "client {} got no answer through {target} within {within:?}: {:?}",
            client + 1,
            sample.error
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

// ---------------------------------------------------------------------------
// Tests

/// Through the site's VIPs under load, with `spec` applied everywhere:
/// nothing to change, no failed request, the real client addresses at the
/// replicas, connections on both workers, each reply forwarded by the LB
/// that got its request, and no route from a worker to a client.
fn assert_paths(site: &Topology, spec: &std::path::Path) {
    assert_converged(site, spec);

    site.count_forwarded();
    for worker in &site.workers {
        count_syns(worker);
    }
    let origin = Instant::now();
    let loads = client_load(site);
    wait_requests(&loads, 400);
    let report = stop(loads);
    eprintln!("load: {}", report.summary(origin));
    assert_no_failures(&report, origin, "requests through the VIP");
    assert_real_client_addresses(site, &report, "requests through the VIP");

    // Both replicas served (numgen spreads new connections).
    for worker in &site.workers {
        assert!(
            syns(worker) > 0,
            "worker {} received no connection",
            worker.name
        );
    }

    // Each reply left through the LB that got the request: client i's
    // packets, both ways, only on LB i.
    for (lb, node) in site.lbs.iter().enumerate() {
        let counts = site.forwarded(lb);
        eprintln!("{}: forwarded {counts:?}", node.name);
        for client in 0..CLIENT_ADDRESSES.len() {
            let n = client + 1;
            let requests = report
                .samples
                .iter()
                .filter(|s| client_of(s) == client)
                .count() as u64;
            let from = counts.get(&format!("from_c{n}")).copied().unwrap_or(0);
            let to = counts.get(&format!("to_c{n}")).copied().unwrap_or(0);
            if client == lb {
                // At least a SYN-ACK and an answer per request.
                assert!(
                    from >= 2 * requests && to >= 2 * requests,
                    "{} should have forwarded client {n}'s {requests} requests and their replies: {counts:?}",
                    node.name
                );
            } else {
                assert_eq!(
                    (from, to),
                    (0, 0),
                    "{} forwarded packets of client {n}, which routes the VIP via the other LB: {counts:?}",
                    node.name
                );
            }
        }
    }

    // The workers cannot reach the clients except by the LBs' policy routes.
    for worker in &site.workers {
        for client in &site.clients {
            let addresses =
                std::iter::once(client.address.into()).chain(client.address6.map(Into::into));
            for address in addresses {
                assert!(
                    !topology::has_route(&worker.ns, address),
                    "worker {} has a route to client {address}",
                    worker.name
                );
            }
        }
    }
}

#[test]
fn routed_keeps_client_addresses_and_replies_return_through_the_same_lb() {
    let Some((site, spec)) = installed("routed_keeps_client_addresses", 2) else {
        return;
    };
    assert_paths(&site, &spec);

    // No source NAT anywhere; the check itself sees a masquerade rule.
    for ns in site.namespaces() {
        let found = topology::nat_statements(ns);
        assert!(
            found.is_empty(),
            "source NAT in namespace {}: {found:?}",
            ns.name
        );
    }
    site.masquerade(true);
    let seen = topology::nat_statements(&site.lbs[0].ns);
    site.masquerade(false);
    assert_eq!(
        seen.len(),
        1,
        "the SNAT check should see the test's own masquerade rule: {seen:?}"
    );
}

#[test]
fn routed_dscp_carries_the_lb_id_and_ecn_is_unchanged() {
    let Some((site, _spec)) = installed("routed_dscp_and_ecn", 1) else {
        return;
    };
    assert_dscp_and_ecn(&site, topology::vip_udp());
}

/// UDP datagrams from both clients to `target` with DSCP AF11 (10) and ECN
/// ECT(1) in IPv4's TOS or IPv6's traffic class: answered by v1 with the
/// client's real address, and counted at the workers with DSCP = the id of
/// the LB they came through and ECN still ECT(1).
fn assert_dscp_and_ecn(site: &Topology, target: SocketAddr) {
    const TOS: u8 = (10 << 2) | 0b01;
    const DATAGRAMS: usize = 20;
    for w in 0..site.workers.len() {
        site.count_udp_marks(w, target.is_ipv6());
    }
    for (i, client) in site.clients.iter().enumerate() {
        let answers = topology::udp_exchange(
            &client.ns.name,
            target,
            TOS,
            DATAGRAMS,
            Duration::from_secs(2),
        );
        let peer = match target {
            SocketAddr::V4(_) => client.address.to_string(),
            SocketAddr::V6(_) => format!("[{}]", client.address6.expect("an IPv6 client")),
        };
        let expected = format!("v1 {peer}:");
        assert!(
            answers
                .iter()
                .all(|a| a.as_deref().is_some_and(|a| a.starts_with(&expected))),
            "client {}: UDP answers should start with {expected:?}: {answers:?}",
            i + 1
        );
    }
    let mut marks: BTreeMap<String, u64> = BTreeMap::new();
    for w in 0..site.workers.len() {
        for (name, count) in site.udp_marks(w) {
            *marks.entry(name).or_default() += count;
        }
    }
    eprintln!("at the workers: {marks:?}");
    let n = DATAGRAMS as u64;
    assert_eq!(
        marks,
        BTreeMap::from([
            ("all_udp".to_string(), 2 * n),
            ("lb1_ect1".to_string(), n),
            ("lb2_ect1".to_string(), n),
        ]),
        "datagrams to {target} at the workers: all, and those with DSCP = the id of the LB they came through and ECN ECT(1)"
    );
}

/// Issue 15: an IPv6-only spec (node addresses, container subnets, VIP
/// and replicas in IPv6) on two LBs and two workers, with a strict IPv6
/// reverse-path filter on every node (`fib saddr . mark . iif oif missing
/// drop`): real IPv6 client addresses at the replicas, replies through the
/// receiving LB, nothing dropped by the filter (which does drop a spoofed
/// source), and the LB id in the traffic class's DSCP bits with ECN
/// untouched.
#[test]
fn routed_ipv6_keeps_client_addresses_through_a_strict_rpfilter() {
    let Some((site, spec)) = installed_in("routed_ipv6_paths", 2, replicas6, Stack::Ipv6) else {
        return;
    };
    let text = std::fs::read_to_string(&spec).expect("the spec");
    assert!(
        !text.contains("10.20.") && !text.contains("192.0.2.") && !text.contains("203.0.113."),
        "an IPv6-only spec:\n{text}"
    );
    assert_paths(&site, &spec);
    assert_no_rpfilter_drops(&site);

    // The filter is live: a source LB 1 cannot route back is dropped.
    let client = &site.clients[0].ns;
    client.exec(
        "ip",
        &["addr", "add", "2001:db8:9::1/128", "dev", "fab", "nodad"],
    );
    let spoofed = connect_from(&client.name, "[2001:db8:9::1]:0", topology::vip6());
    assert!(
        spoofed.is_err(),
        "a connection from a spoofed source was answered"
    );
    let drops = site.rpfilter6_drops();
    assert!(
        drops.get(&site.lbs[0].name).is_some_and(|n| *n > 0),
        "LB 1's reverse-path filter should have dropped the spoofed connection: {drops:?}"
    );

    assert_dscp_and_ecn(
        &site,
        SocketAddr::new(topology::VIP6.into(), topology::VIP_UDP_PORT),
    );
    assert_no_rpfilter_drops_but_lb1(&site);

    // Drift: someone deletes LB 1's IPv6 VIP and IPv6 rule; plan shows
    // both, apply restores them, and clients get through again.
    let lb = &site.lbs[0];
    lb.ns.exec(
        "ip",
        &["-6", "addr", "del", "2001:db8:f::10/128", "dev", "lo"],
    );
    lb.ns
        .exec("ip", &["-6", "rule", "del", "priority", "27000"]);
    let (code, output) = Topology::plan_exit(lb, &spec);
    assert_eq!(code, Some(2), "plan should see the drift:\n{output}");
    for resource in ["address.lo.2001:db8:f::10/128", "ip_rule.inet6.27000"] {
        assert!(output.contains(resource), "{resource} in:\n{output}");
    }
    Topology::apply(lb, &spec);
    assert_converged(&site, &spec);
    assert_eq!(
        version_at_within(&site, 0, topology::vip6(), Duration::from_secs(5)),
        "v1"
    );
}

/// A TCP connection in namespace `netns` from `source` to `target`, given
/// up after a second.
fn connect_from(netns: &str, source: &str, target: SocketAddr) -> std::io::Result<()> {
    let source: SocketAddr = source.parse().expect("a source address");
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                load::enter_netns(netns)?;
                let socket = socket2::Socket::new(
                    socket2::Domain::for_address(target),
                    socket2::Type::STREAM,
                    None,
                )?;
                socket.bind(&source.into())?;
                socket.connect_timeout(&target.into(), Duration::from_secs(1))
            })
            .join()
            .expect("the connecting thread")
    })
}

/// Only LB 1's filter dropped anything (the spoofed connection).
fn assert_no_rpfilter_drops_but_lb1(topo: &Topology) {
    let drops = topo.rpfilter6_drops();
    let others: Vec<_> = drops
        .iter()
        .filter(|(name, n)| **name != topo.lbs[0].name && **n > 0)
        .collect();
    assert!(others.is_empty(), "reverse-path drops: {drops:?}");
}

/// Issue 15: the upgrade under load of an IPv6-only site, with the strict
/// IPv6 reverse-path filter on every node: 0 failed requests, held
/// connections finish on v1.
#[test]
fn routed_ipv6_upgrade_under_load_drops_nothing() {
    upgrade_under_load_in(
        "routed_ipv6_upgrade",
        2,
        replicas6,
        Duration::ZERO,
        Stack::Ipv6,
        &[],
    );
}

/// Issue 15: a dual-stack site (nodes with `address6` and
/// `containerSubnet6`, ports with `vip6`), an IPv4 and an IPv6 replica on
/// each worker, load through both VIPs: real client addresses of both
/// families, then the upgrade under load with 0 failed requests.
#[test]
fn routed_dual_stack_serves_both_families_and_upgrades_without_loss() {
    let Some((site, spec)) = installed_in("routed_dual_stack_paths", 2, replicas_dual, Stack::Dual)
    else {
        return;
    };
    assert_paths(&site, &spec);
    assert_no_rpfilter_drops(&site);
    drop(site);
    upgrade_under_load_in(
        "routed_dual_stack_upgrade",
        2,
        replicas_dual,
        Duration::ZERO,
        Stack::Dual,
        &[],
    );
}

#[test]
fn routed_upgrade_under_load_drops_nothing() {
    upgrade_under_load("routed_upgrade_under_load", 2, replicas, Duration::ZERO);
}

/// Issue 15: two replicas on one worker (10.20.1.5 and 10.20.1.7, next
/// addresses .6 and .8), under load through both LBs: both get new
/// connections; then the upgrade v1 → v2 moves them one at a time with 0
/// failed requests, and connections held open across it finish on v1.
#[test]
fn routed_two_replicas_on_one_worker_share_the_load_and_upgrade_without_loss() {
    let two_on_one = |_: &Topology| vec![Replica::on(0, 5), Replica::on(0, 7)];
    let Some((site, spec)) = installed_with("routed_two_replicas_one_worker", 1, two_on_one) else {
        return;
    };
    let worker = &site.workers[0];
    let containers = Topology::containers(worker);
    assert_eq!(containers.len(), 2, "containers: {containers:?}");
    count_syns_by_address(worker, &["10.20.1.5", "10.20.1.7"]);
    let origin = Instant::now();
    let loads = client_load(&site);
    wait_requests(&loads, 400);
    let report = stop(loads);
    assert_no_failures(&report, origin, "requests to two replicas on one worker");
    let counts = topology::nft_counters(&worker.ns, "ip", "lnt_replicas");
    eprintln!("new connections per replica: {counts:?}");
    for (name, count) in &counts {
        assert!(
            *count > 0,
            "replica {name} received no connection: {counts:?}"
        );
    }
    assert_eq!(counts.len(), 2, "{counts:?}");
    assert_converged(&site, &spec);
    drop(site);

    upgrade_under_load(
        "routed_two_replicas_one_worker_upgrade",
        1,
        two_on_one,
        Duration::ZERO,
    );
}

/// Counts, on `worker`, the client connections (SYNs from the clients'
/// network) to each of `addresses`, in a test-owned nft table `ip
/// lnt_replicas` (counters named by the address).
fn count_syns_by_address(worker: &Node, addresses: &[&str]) {
    let mut script = String::from("table ip lnt_replicas {\n");
    for address in addresses {
        script.push_str(&format!("  counter c{} {{}}\n", address.replace('.', "_")));
    }
    script.push_str(
        "  chain prerouting {\n    type filter hook prerouting priority -400; policy accept;\n",
    );
    for address in addresses {
        script.push_str(&format!(
            "    iifname \"fab\" ip saddr {CLIENT_SUBNET} ip daddr {address} tcp dport {HTTP_PORT} \
             tcp flags & (syn | ack) == syn counter name c{}\n",
            address.replace('.', "_")
        ));
    }
    script.push_str("  }\n}\n");
    worker.ns.nft(&script);
}

/// docs/routed-mode.md, "an LB is down during the upgrade: the worker keeps
/// the old replica until `drainTimeout`": LB 2 starts applying only 12 s into
/// the upgrade (down, or on a slower timer), well after `switchWait` (3 s)
/// and the held connections (6 s). The worker must not remove the old
/// replica while LB 2 still sends it new connections.
#[test]
fn routed_upgrade_waits_for_a_load_balancer_that_applies_late() {
    upgrade_under_load(
        "routed_upgrade_late_lb",
        2,
        replicas,
        Duration::from_secs(12),
    );
}

/// Writes the spec of `service` named `name`, with `upgrade` (more
/// `upgrade:` settings, one per line, e.g. `maxParallel: 2`) added.
fn write_spec_with(site: &Topology, name: &str, service: &Service, upgrade: &[&str]) -> PathBuf {
    let path = site.write_spec(name, std::slice::from_ref(service));
    let mut text = std::fs::read_to_string(&path).expect("spec written");
    let settings: String = upgrade.iter().map(|s| format!("      {s}\n")).collect();
    text = text.replace(
        "      stopTimeout: 5s\n",
        &format!("      stopTimeout: 5s\n{settings}"),
    );
    std::fs::write(&path, text).expect("spec rewritten");
    path
}

/// Upgrades v1 → v2 of the `replicas` on `workers` workers under load from
/// both clients, with LB applies every 0.3 s; LB 2's start `lb2_late` into
/// the upgrade.
fn upgrade_under_load(
    test: &str,
    workers: usize,
    replicas: fn(&Topology) -> Vec<Replica>,
    lb2_late: Duration,
) {
    upgrade_under_load_in(test, workers, replicas, lb2_late, Stack::Ipv4, &[]);
}

/// [`upgrade_under_load`] on a site of `stack` (with a strict IPv6
/// reverse-path filter on every node when it has IPv6), load through each
/// of its VIPs; `upgrade`: more upgrade settings of the service. Returns
/// the workers' apply outputs.
fn upgrade_under_load_in(
    test: &str,
    workers: usize,
    replicas: fn(&Topology) -> Vec<Replica>,
    lb2_late: Duration,
    stack: Stack,
    upgrade: &[&str],
) -> Vec<std::process::Output> {
    let Some(site) = site_in(test, workers, stack) else {
        return Vec::new();
    };
    if stack.has_ipv6() {
        site.strict_rpfilter6();
    }
    let v1 = Service::new(SERVICE, &test_image("v1"), replicas(&site));
    let v2 = v1.with_image(&test_image("v2"));
    let spec1 = write_spec_with(&site, "v1", &v1, upgrade);
    let spec2 = write_spec_with(&site, "v2", &v2, upgrade);
    site.apply_all(&spec1);
    for client in 0..2 {
        for target in targets(&site) {
            assert_eq!(
                version_at_within(&site, client, target, Duration::from_secs(5)),
                "v1"
            );
        }
    }

    let origin = Instant::now();
    let loads = client_load(&site);
    wait_requests(&loads, 100);
    // Connections open across the switch: the old version must answer them
    // (the worker drains before it removes it).
    let long: Vec<_> = site
        .clients
        .iter()
        .flat_map(|c| targets(&site).into_iter().map(move |t| (c, t)))
        .map(|(c, target)| load::long_lived_in(&c.ns.name, target, 2, HOLD_MS))
        .collect();
    let upgrade_started = Instant::now();
    // Each worker upgrades with its own apply; each LB applies the new spec
    // every 0.3 s meanwhile, as a timer would.
    let workers_done = AtomicBool::new(false);
    let (worker_runs, lb_runs) = std::thread::scope(|scope| {
        let lb_loops: Vec<_> = site
            .lbs
            .iter()
            .enumerate()
            .map(|(i, lb)| {
                let (spec, done) = (&spec2, &workers_done);
                let late = if i == 1 { lb2_late } else { Duration::ZERO };
                scope.spawn(move || {
                    let mut runs = Vec::new();
                    while upgrade_started.elapsed() < late && !done.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    while !done.load(Ordering::SeqCst) {
                        let started = Instant::now();
                        let output = Topology::try_apply(lb, spec);
                        runs.push((started, started.elapsed(), output));
                        std::thread::sleep(LB_APPLY_EVERY);
                    }
                    runs
                })
            })
            .collect();
        let worker_applies: Vec<_> = site
            .workers
            .iter()
            .map(|worker| {
                let spec = &spec2;
                scope.spawn(move || Topology::try_apply(worker, spec))
            })
            .collect();
        let worker_runs: Vec<_> = worker_applies
            .into_iter()
            .map(|h| h.join().expect("worker apply thread"))
            .collect();
        workers_done.store(true, Ordering::SeqCst);
        let lb_runs: Vec<_> = lb_loops
            .into_iter()
            .map(|h| h.join().expect("LB apply loop"))
            .collect();
        (worker_runs, lb_runs)
    });
    let upgraded = Instant::now();
    for lb in &site.lbs {
        Topology::apply(lb, &spec2);
    }
    let settled = Instant::now();
    wait_requests(&loads, 100);
    let report = stop(loads);
    let long: Vec<_> = long.into_iter().flat_map(LongLived::wait).collect();
    eprintln!(
        "upgrade: workers done after {:.2}s; load: {}",
        (upgraded - upgrade_started).as_secs_f64(),
        report.summary(origin)
    );

    for (worker, run) in site.workers.iter().zip(&worker_runs) {
        eprintln!("--- apply on {} ---\n{}", worker.name, show(run));
        assert!(
            run.status.success(),
            "upgrade apply on {} failed:\n{}",
            worker.name,
            show(run)
        );
    }
    for (lb, runs) in site.lbs.iter().zip(&lb_runs) {
        let failed: Vec<_> = runs.iter().filter(|r| !r.2.status.success()).collect();
        let longest = runs.iter().map(|r| r.1).max().unwrap_or_default();
        eprintln!(
            "{}: {} applies during the upgrade, {} failed, the longest took {:.2}s",
            lb.name,
            runs.len(),
            failed.len(),
            longest.as_secs_f64()
        );
        if let Some((at, _, output)) = failed.first() {
            panic!(
                "an apply on {} failed {:.2}s into the upgrade:\n{}",
                lb.name,
                (*at - upgrade_started).as_secs_f64(),
                show(output)
            );
        }
    }

    assert_no_failures(&report, origin, "the upgrade under load");
    for sample in &long {
        assert!(
            sample.ok() && sample.version.as_deref() == Some("v1"),
            "a connection held open across the switch should be answered by v1: {sample:?}"
        );
        assert!(
            sample.end < upgraded,
            "the workers returned {:.2}s before a connection to the old version ended",
            (sample.end - upgraded).as_secs_f64()
        );
    }
    assert_real_client_addresses(&site, &report, "the upgrade under load");
    let only = |version: &str, answers: BTreeMap<String, usize>, what: &str| {
        assert!(
            answers.len() == 1 && answers.contains_key(version),
            "{what} should all come from {version}: {answers:?}"
        );
    };
    only(
        "v1",
        report.ended_before(upgrade_started),
        "answers before the upgrade",
    );
    let after = report.started_after(upgraded);
    only(
        "v2",
        after,
        "answers to requests started after the worker applies returned",
    );
    for client in 0..CLIENT_ADDRESSES.len() {
        let late = report.versions(|s| s.start > settled && client_of(s) == client);
        only(
            "v2",
            late,
            &format!("client {}'s answers after the LBs' last apply", client + 1),
        );
    }

    // Only the new version is left, each replica at the other address of
    // its pair.
    for (w, worker) in site.workers.iter().enumerate() {
        let mut wanted: Vec<String> = v1
            .replicas
            .iter()
            .filter(|r| r.worker == w)
            .map(|r| r.next_address.expect("nextAddress").to_string())
            .collect();
        let mut found = Vec::new();
        for container in Topology::containers(worker) {
            let (image, address) = image_and_address(&container);
            assert_eq!(image, v2.image, "image of {container}");
            found.push(address);
        }
        wanted.sort();
        found.sort();
        assert_eq!(
            found, wanted,
            "addresses of the containers of {} after the upgrade",
            worker.name
        );
    }
    assert_converged(&site, &spec2);
    if stack.has_ipv6() {
        assert_no_rpfilter_drops(&site);
    }
    worker_runs
}

/// The strict IPv6 reverse-path filter of every node dropped nothing.
fn assert_no_rpfilter_drops(topo: &Topology) {
    let drops = topo.rpfilter6_drops();
    assert!(
        drops.values().all(|n| *n == 0),
        "the strict IPv6 reverse-path filter dropped packets: {drops:?}"
    );
}

#[test]
fn routed_container_restarted_behind_lessnats_back_is_rewired() {
    let Some((site, spec)) = installed("routed_container_restart", 1) else {
        return;
    };
    let worker = &site.workers[0];
    for client in 0..2 {
        assert_eq!(version_within(&site, client, Duration::from_secs(5)), "v1");
    }
    let containers = Topology::containers(worker);
    assert_eq!(containers.len(), 1, "containers: {containers:?}");
    let veths = container_veths(worker);
    assert_eq!(veths.len(), 1, "container veths on the worker: {veths:?}");

    support::run("docker", &["restart", "--time", "1", &containers[0]]);
    // A new network namespace for the container: its veth went with the old one.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !container_veths(worker).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the container's veth is still there after docker restart: {:?}",
            container_veths(worker)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let cut = site.request(0, "/");
    assert!(
        !cut.ok(),
        "a request reached the container without its veth: {cut:?}"
    );

    let (code, output) = Topology::plan_exit(worker, &spec);
    assert_eq!(
        code,
        Some(2),
        "plan --detailed-exitcode on the worker should see the missing wiring:\n{output}"
    );
    Topology::apply(worker, &spec);
    assert_eq!(
        container_veths(worker).len(),
        1,
        "container veths after apply"
    );
    for client in 0..2 {
        assert_eq!(version_within(&site, client, Duration::from_secs(10)), "v1");
    }
    let report = {
        let loads = client_load(&site);
        wait_requests(&loads, 50);
        stop(loads)
    };
    assert_no_failures(
        &report,
        report.samples[0].start,
        "requests after the re-wiring",
    );
    assert_real_client_addresses(&site, &report, "requests after the re-wiring");
    for lb in &site.lbs {
        Topology::apply(lb, &spec);
    }
    assert_converged(&site, &spec);
}

/// One `lessnat apply` of an LB's timer: when it started, how long it took,
/// its output.
type TimedApply = (Instant, Duration, std::process::Output);

/// `lessnat apply` on every LB node every `LB_TIMER` (as a systemd timer
/// would) until `done`; each LB's runs.
fn lb_timers(site: &Site, spec: &std::path::Path, done: &AtomicBool) -> Vec<Vec<TimedApply>> {
    std::thread::scope(|scope| {
        let loops: Vec<_> = site
            .lbs
            .iter()
            .map(|lb| {
                scope.spawn(move || {
                    let mut runs = Vec::new();
                    while !done.load(Ordering::SeqCst) {
                        let started = Instant::now();
                        let output = Topology::try_apply(lb, spec);
                        runs.push((started, started.elapsed(), output));
                        while started.elapsed() < LB_TIMER && !done.load(Ordering::SeqCst) {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                    runs
                })
            })
            .collect();
        loops
            .into_iter()
            .map(|h| h.join().expect("LB apply loop"))
            .collect()
    })
}

/// Between two LB applies in the health test: a plain timer.
const LB_TIMER: Duration = Duration::from_secs(1);

/// Issue 13: a replica killed under load, with `lessnat apply` every 1 s
/// on each LB node (no agent): no request fails later than 2 s after the
/// kill, and the replica rejoins once it answers again. The LB apply that
/// leaves the replica out also deletes its conntrack entries of client
/// connections that never got an answer or were reset (measured at the
/// drop: 8 SYN_SENT entries per LB, the connects in flight at the kill):
/// until then a new connection that reused one of their source ports kept
/// going to the dead replica, and 1 run in 8 failed.
#[test]
fn routed_dead_replica_leaves_the_spread_and_rejoins() {
    dead_replica_leaves_the_spread("routed_dead_replica", replicas, Stack::Ipv4);
}

/// Issue 15: the same with an IPv6-only site (and the strict IPv6
/// reverse-path filter): the LB apply takes the dead IPv6 replica out of the
/// spread (`routed_down6`) and deletes its unanswered IPv6 connections.
#[test]
fn routed_ipv6_dead_replica_leaves_the_spread_and_rejoins() {
    dead_replica_leaves_the_spread("routed_ipv6_dead_replica", replicas6, Stack::Ipv6);
}

/// A replica on worker 2 killed under load with LB applies every 1 s, on a
/// site of `stack` with `replicas` (one per worker).
fn dead_replica_leaves_the_spread(
    test: &str,
    replicas: fn(&Topology) -> Vec<Replica>,
    stack: Stack,
) {
    let Some((site, spec)) = installed_in(test, 2, replicas, stack) else {
        return;
    };
    let worker = &site.workers[1];
    let containers = Topology::containers(worker);
    assert_eq!(containers.len(), 1, "containers: {containers:?}");
    let victim = &containers[0];

    let origin = Instant::now();
    // A connection to a dead replica is refused or, as often, never answered
    // (the worker's ICMP errors are rate limited) and would hang until the
    // replica is back: a request that takes over 1 s counts as failed.
    let loads: Vec<Load> = targets(&site)
        .into_iter()
        .flat_map(|target| {
            site.load_to(target, CLIENTS_PER_NAMESPACE, |config| LoadConfig {
                io_timeout: Duration::from_secs(1),
                ..config
            })
        })
        .collect();
    wait_requests(&loads, 50);
    let done = AtomicBool::new(false);
    let mut killed = origin;
    let mut restarted = origin;
    let mut rewired = origin;
    let runs = std::thread::scope(|scope| {
        let timers = scope.spawn(|| lb_timers(&site, &spec, &done));
        // Half-way between two applies.
        std::thread::sleep(Duration::from_millis(2500));
        killed = Instant::now();
        support::run("docker", &["kill", victim]);
        // Long enough for several applies with the replica dead.
        std::thread::sleep(Duration::from_secs(6));
        restarted = Instant::now();
        support::run("docker", &["start", victim]);
        Topology::apply(worker, &spec);
        rewired = Instant::now();
        count_syns(worker);
        let deadline = Instant::now() + Duration::from_secs(10);
        while syns(worker) == 0 {
            assert!(
                Instant::now() < deadline,
                "no connection reached {victim} within 10 s of its re-wiring"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!(
            "{victim} is back in the spread {:.2}s after its worker's apply",
            rewired.elapsed().as_secs_f64()
        );
        wait_requests(&loads, 100);
        done.store(true, Ordering::SeqCst);
        timers.join().expect("LB timers")
    });
    let report = stop(loads);
    eprintln!("load: {}", report.summary(origin));

    let failed = report.failed();
    let since = |s: &&load::Sample| (s.start.max(killed) - killed).as_secs_f64();
    let late: Vec<_> = failed
        .iter()
        .filter(|s| s.start > killed + Duration::from_secs(2))
        .collect();
    eprintln!(
        "failed requests: {} in all, {} before the kill, {} later than 2 s after it (the last {:.2}s after)",
        failed.len(),
        failed.iter().filter(|s| s.start < killed).count(),
        late.len(),
        failed.iter().map(since).fold(0.0, f64::max)
    );
    for sample in &late {
        eprintln!(
            "  late: client {} at +{:.2}s after the kill: {:?}",
            sample.client,
            since(sample),
            sample.error
        );
    }
    for (lb, runs) in site.lbs.iter().zip(&runs) {
        let dead: Vec<_> = runs
            .iter()
            .filter(|r| r.0 > killed && r.0 + r.1 < restarted)
            .collect();
        let longest = dead.iter().map(|r| r.1).max().unwrap_or_default();
        let before = runs.iter().filter(|r| r.0 < killed).map(|r| r.1).max();
        eprintln!(
            "{}: the longest apply before the kill took {:.3}s",
            lb.name,
            before.unwrap_or_default().as_secs_f64()
        );
        eprintln!(
            "{}: {} applies with {victim} dead, the longest took {:.3}s",
            lb.name,
            dead.len(),
            longest.as_secs_f64()
        );
        if let Some(out) = dead
            .iter()
            .find(|r| String::from_utf8_lossy(&r.2.stdout).contains("out of the spread"))
        {
            eprintln!(
                "--- {} apply {:.2}s..{:.2}s after the kill ---\n{}",
                lb.name,
                (out.0 - killed).as_secs_f64(),
                (out.0 + out.1 - killed).as_secs_f64(),
                show(&out.2)
            );
        }
        let last = dead.last().map(|r| String::from_utf8_lossy(&r.2.stdout));
        assert!(
            last.as_ref()
                .is_some_and(|out| out.contains("stays out of the spread")
                    && out.contains("since")
                    && out.contains("No changes")),
            "the last apply on {} with {victim} dead should have kept it out without a change:\n{}",
            lb.name,
            last.unwrap_or_default()
        );
        for (at, _, output) in runs {
            assert!(
                output.status.success(),
                "an apply on {} failed {:.2}s after the kill:\n{}",
                lb.name,
                (*at - killed).as_secs_f64(),
                show(output)
            );
        }
        assert!(
            longest < LB_TIMER,
            "an apply on {} took {longest:?} with a replica dead: longer than its timer",
            lb.name
        );
    }
    assert!(
        late.is_empty(),
        "requests failed later than 2 s after the kill: {}",
        report.summary(origin)
    );
    assert_real_client_addresses(&site, &report, "requests around the kill");
    for lb in &site.lbs {
        Topology::apply(lb, &spec);
    }
    assert_converged(&site, &spec);
}

/// Issue 15, `maxParallel: 2`: two replicas on one worker upgrade together
/// under load through both LBs: 0 failed requests, held connections finish
/// on v1, and the two next versions really overlapped: both started before
/// either old replica was removed (apply's output, in order).
#[test]
fn routed_max_parallel_upgrades_two_replicas_together_without_loss() {
    let two_on_one = |_: &Topology| vec![Replica::on(0, 5), Replica::on(0, 7)];
    let runs = upgrade_under_load_in(
        "routed_max_parallel",
        1,
        two_on_one,
        Duration::ZERO,
        Stack::Ipv4,
        &["maxParallel: 2"],
    );
    let Some(run) = runs.first() else {
        return;
    };
    let text = show(run);
    let line = |what: &str| {
        text.find(what)
            .unwrap_or_else(|| panic!("no {what:?} in the worker's apply:\n{text}"))
    };
    let second_started = line("creating and starting at 10.20.1.8");
    let first_removed = line("removing the old version at 10.20.1.5");
    assert!(
        line("creating and starting at 10.20.1.6") < first_removed
            && second_started < first_removed,
        "both next versions start before an old one goes:\n{text}"
    );
    assert_eq!(
        text.matches("load-balancer nodes switch new connections to 10.20.1.6, 10.20.1.8")
            .count()
            .min(1),
        1,
        "one switch wait for both:\n{text}"
    );
}

/// The routed canary's settings in the tests: 10% for up to 2 minutes (the
/// tests end it earlier with `--promote` or `--abort`).
const CANARY: &str = "canary: { weight: 10%, hold: 2m, unhealthyAfter: 3 }";

/// Whether the worker's table carries the canary's split (and, with
/// `promoted`, its promotion).
fn canary_rules(worker: &Node) -> (bool, bool) {
    let text = String::from_utf8_lossy(
        &worker
            .ns
            .try_exec("nft", &["list", "table", "inet", "lessnat"])
            .stdout,
    )
    .to_string();
    (
        text.contains("numgen random mod 100 < 10 dnat ip to"),
        text.contains("promoted\""),
    )
}

/// Waits until the worker's table carries the split (the worker holds).
fn wait_split(worker: &Node) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !canary_rules(worker).0 {
        assert!(Instant::now() < deadline, "the worker never set the split");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `lessnat apply --promote` / `--abort` on `worker`; panics when it fails.
fn ask_canary(worker: &Node, verdict: &str) {
    let output = topology::output_within(
        Topology::lessnat(worker, &["apply", &format!("--{verdict}")]),
        Duration::from_secs(30),
    );
    assert!(
        output.status.success(),
        "apply --{verdict}:\n{}",
        show(&output)
    );
}

/// What [`canary_under_load`] leaves: the site, the worker's apply output,
/// the load's report, when the worker's apply returned, the v2 spec.
struct CanaryRun {
    site: Site,
    run: std::process::Output,
    report: Report,
    returned: Instant,
    spec: PathBuf,
}

/// A routed canary under load from both clients, LB applies every 0.3 s:
/// v1 installed with a canary in its spec, the worker's apply of v2 started
/// in the background; `during` runs once the split is set, with the loads.
fn canary_under_load(
    test: &str,
    during: impl FnOnce(&Site, &[Load], &std::path::Path),
) -> Option<CanaryRun> {
    canary_of_under_load(test, vec![Replica::on(0, 5)], &[CANARY], during)
}

/// [`canary_under_load`] of `replicas` with the `upgrade` settings.
fn canary_of_under_load(
    test: &str,
    replicas: Vec<Replica>,
    upgrade: &[&str],
    during: impl FnOnce(&Site, &[Load], &std::path::Path),
) -> Option<CanaryRun> {
    let site = site_in(test, 1, Stack::Ipv4)?;
    let v1 = Service::new(SERVICE, &test_image("v1"), replicas);
    let v2 = v1.with_image(&test_image("v2"));
    let spec1 = write_spec_with(&site, "v1", &v1, upgrade);
    let spec2 = write_spec_with(&site, "v2", &v2, upgrade);
    site.apply_all(&spec1);
    let origin = Instant::now();
    let loads = client_load(&site);
    wait_requests(&loads, 100);
    let done = AtomicBool::new(false);
    let (run, returned) = std::thread::scope(|scope| {
        let lb_loops: Vec<_> = site
            .lbs
            .iter()
            .map(|lb| {
                let (spec, done) = (&spec2, &done);
                scope.spawn(move || {
                    while !done.load(Ordering::SeqCst) {
                        let output = Topology::try_apply(lb, spec);
                        // A test's own apply on this LB (one it kills
                        // mid-way) may hold the node's lock: refused, not failed.
                        let refused = String::from_utf8_lossy(&output.stderr)
                            .contains("another lessnat holds the lock");
                        assert!(
                            output.status.success() || refused,
                            "LB apply:\n{}",
                            show(&output)
                        );
                        std::thread::sleep(LB_APPLY_EVERY);
                    }
                })
            })
            .collect();
        let worker = &site.workers[0];
        let spec = &spec2;
        let apply = scope.spawn(move || {
            let output = Topology::try_apply(worker, spec);
            (output, Instant::now())
        });
        wait_split(worker);
        during(&site, &loads, &spec2);
        let (run, returned) = apply.join().expect("worker apply thread");
        done.store(true, Ordering::SeqCst);
        for lb_loop in lb_loops {
            lb_loop.join().expect("LB apply loop");
        }
        (run, returned)
    });
    for lb in &site.lbs {
        Topology::apply(lb, &spec2);
    }
    wait_requests(&loads, 200);
    let report = stop(loads);
    eprintln!("canary: {}", report.summary(origin));
    eprintln!("--- worker apply ---\n{}", show(&run));
    assert_no_failures(&report, origin, "the canary under load");
    assert_real_client_addresses(&site, &report, "the canary under load");
    Some(CanaryRun {
        site,
        run,
        report,
        returned,
        spec: spec2,
    })
}

/// Issue 15: a 10% routed canary over 10,000 new connections through both
/// LBs gets 8–12% of them; the worker's table deleted during the hold comes
/// back with the split; `lessnat apply --abort` ends it: 0 failed requests,
/// the next version gone, v1 alone answers afterwards.
#[test]
fn routed_canary_sends_its_share_and_aborts_without_loss() {
    let measured = std::cell::Cell::new((Instant::now(), Instant::now()));
    let Some(CanaryRun {
        site,
        run,
        report,
        returned,
        spec: spec2,
    }) = canary_under_load("routed_canary_abort", |site, loads, _| {
        let worker = &site.workers[0];
        let from = Instant::now();
        let before: usize = loads.iter().map(Load::done).sum();
        let deadline = Instant::now() + Duration::from_secs(120);
        while loads.iter().map(Load::done).sum::<usize>() < before + 10_000 {
            assert!(Instant::now() < deadline, "10,000 requests took too long");
            std::thread::sleep(Duration::from_millis(50));
        }
        measured.set((from, Instant::now()));
        // Someone deletes lessnat's table on the worker: the hold writes
        // it back with the split.
        worker
            .ns
            .exec("nft", &["delete", "table", "inet", "lessnat"]);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !canary_rules(worker).0 {
            assert!(Instant::now() < deadline, "the split did not come back");
            std::thread::sleep(Duration::from_millis(20));
        }
        wait_requests(loads, 200);
        ask_canary(worker, "abort");
    })
    else {
        return;
    };
    let (from, to) = measured.get();
    let versions = report.versions(|s| s.start >= from && s.end <= to);
    let total: usize = versions.values().sum();
    let share = 100.0 * versions.get("v2").copied().unwrap_or(0) as f64 / total as f64;
    eprintln!("canary share: {share:.2}% of {total} new connections ({versions:?})");
    assert!(total >= 9_000, "{versions:?}");
    assert!(
        (8.0..=12.0).contains(&share),
        "share {share:.2}%: {versions:?}"
    );
    assert!(!run.status.success(), "an aborted canary fails the apply");
    assert!(
        show(&run).contains("aborted by `lessnat apply --abort`"),
        "{}",
        show(&run)
    );
    assert!(
        show(&run).contains("restored it with the canary split"),
        "the hold restored the deleted table:\n{}",
        show(&run)
    );
    let worker = &site.workers[0];
    assert_eq!(
        Topology::containers(worker).len(),
        1,
        "the next version is gone"
    );
    assert_eq!(canary_rules(worker), (false, false), "the split ended");
    let after = report.started_after(returned);
    assert_eq!(after.keys().collect::<Vec<_>>(), ["v1"], "{after:?}");
    // The spec still says v2: the next apply would start the canary again.
    let (code, _) = Topology::plan_exit(worker, &spec2);
    assert_eq!(code, Some(2));
}

/// Issue 15: `lessnat apply --promote` during a routed canary's hold, under
/// load: the worker drops the LBs' probes of the old replica, they switch on
/// their next apply, the old replica drains and goes: the upgrade finishes
/// with 0 failed requests and only v2 answers afterwards. An LB apply killed
/// during the hold changes nothing.
#[test]
fn routed_canary_promoted_finishes_as_an_upgrade() {
    let Some(CanaryRun {
        site,
        run,
        report,
        returned,
        spec: spec2,
    }) = canary_under_load("routed_canary_promote", |site, loads, spec| {
        // An LB apply killed in the middle: its table is the one before
        // or after its one transaction.
        let mut killed = Topology::lessnat(&site.lbs[0], &["apply", "--auto-approve", "-f"])
            .arg(spec)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("LB apply");
        std::thread::sleep(Duration::from_millis(60));
        killed.kill().expect("kill -9 the LB apply");
        let _ = killed.wait();
        wait_requests(loads, 500);
        ask_canary(&site.workers[0], "promote");
    })
    else {
        return;
    };
    assert!(run.status.success(), "{}", show(&run));
    assert!(
        show(&run).contains("promoted by `lessnat apply --promote`"),
        "{}",
        show(&run)
    );
    let worker = &site.workers[0];
    assert_eq!(canary_rules(worker), (false, false), "the rules ended");
    let after = report.started_after(returned);
    assert_eq!(after.keys().collect::<Vec<_>>(), ["v2"], "{after:?}");
    let containers = Topology::containers(worker);
    assert_eq!(containers.len(), 1, "{containers:?}");
    assert_eq!(image_and_address(&containers[0]).1, "10.20.1.6");
    assert_converged(&site, &spec2);
}

/// Issue 15: `maxParallel: 2` with a canary: the two replicas on one worker
/// hold one canary together, and `lessnat apply --promote` promotes both;
/// under load, 0 failed requests, both end at their other address.
#[test]
fn routed_canary_of_a_batch_is_promoted_together() {
    let two_on_one = vec![Replica::on(0, 5), Replica::on(0, 7)];
    let Some(CanaryRun {
        site, run, spec, ..
    }) = canary_of_under_load(
        "routed_canary_batch",
        two_on_one,
        &["maxParallel: 2", CANARY],
        |site, loads, _| {
            wait_requests(loads, 300);
            ask_canary(&site.workers[0], "promote");
        },
    )
    else {
        return;
    };
    assert!(run.status.success(), "{}", show(&run));
    let text = show(&run);
    assert_eq!(
        text.matches("dropping load-balancer nodes' probes of 10.20.1.5, 10.20.1.7")
            .count(),
        1,
        "one promotion for both:\n{text}"
    );
    let worker = &site.workers[0];
    let mut addresses: Vec<String> = Topology::containers(worker)
        .iter()
        .map(|c| image_and_address(c).1)
        .collect();
    addresses.sort();
    assert_eq!(addresses, ["10.20.1.6", "10.20.1.8"]);
    assert_eq!(canary_rules(worker), (false, false));
    assert_converged(&site, &spec);
}
