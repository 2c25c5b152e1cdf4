//! Routed mode on a worker: a replica created, replaced in place, upgraded
//! across addresses, and upgrades rolled back.

use std::net::IpAddr;

use super::super::fake::{FakeContainer, Health};
use super::{Harness, only_operation, position};
use crate::apply::ApplyError;
use crate::backend::conntrack::FlowTo;
use crate::ownership::LABEL_ADDRESS;
use crate::plan::operation::Operation;
use crate::plan::{Decision, InFlight};

pub(super) const NODE: &str = "w";
pub(super) const PRIMARY: &str = "lessnat-api.w";
pub(super) const NEXT: &str = "lessnat-api.w.next";
pub(super) const ADDRESS: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 20, 1, 5));

/// The routed service `api` with its replica on worker `w` at 10.20.1.5,
/// at `image` with `upgrade` settings (the inside of a YAML flow mapping).
pub(super) fn api(image: &str, upgrade: &str) -> String {
    format!(
        r#"version: 1
nodes:
  - {{name: lb, address: 192.0.2.2, loadBalancer: {{id: 1, vips: [203.0.113.10]}}}}
  - {{name: w, address: 192.0.2.10, containerSubnet: 10.20.1.0/24}}
services:
  - name: api
    image: {image}
    network: routed
    command: ["--listen", "0.0.0.0:{{port}}"]
    replicas: [{{node: w, address: 10.20.1.5}}]
    ports: [{{name: http, port: 8080, vip: 203.0.113.10, vipPort: 80}}]
    health: {{tcp: {{}}, interval: 1ms, healthyAfter: 1, startTimeout: 50ms}}
    upgrade: {{{upgrade}}}
"#
    )
}

/// Api 1 installed, wired in at 10.20.1.5.
pub(super) fn installed() -> Harness {
    Harness::installed(NODE, &api("api:1", ""))
}

/// The addresses the service's veths lead to.
pub(super) fn wired(h: &Harness) -> Vec<String> {
    h.fake
        .observed(NODE)
        .veths
        .into_iter()
        .map(|v| v.address)
        .collect()
}

/// Asserts that `image` serves alone as the primary, wired in at `address`.
pub(super) fn assert_serves(h: &Harness, image: &str, address: IpAddr) {
    let primary = h.assert_only(PRIMARY, image);
    assert_eq!(primary.spec.labels[LABEL_ADDRESS], address.to_string());
    assert_eq!(wired(h), [address.to_string()]);
}

/// Asserts that the only changes were the next replica started at `next`
/// and removed again, and that the old one, `before`, is untouched.
fn assert_next_removed(h: &Harness, next: IpAddr, before: Option<FakeContainer>) {
    assert_eq!(
        h.changes(),
        [
            "create lessnat-api.w.next",
            "start lessnat-api.w.next",
            format!("wire api at {next}").as_str(),
            "stop lessnat-api.w.next",
            "remove lessnat-api.w.next",
        ]
    );
    assert_eq!(
        h.fake.container(PRIMARY),
        before,
        "the old replica is untouched"
    );
    assert_serves(h, "api:1", ADDRESS);
}

/// Where the plan's upgrade starts the next replica.
fn next_at(operation: &Operation) -> IpAddr {
    match operation {
        Operation::UpgradeReplica { next_at, .. } => *next_at,
        other => panic!("expected a routed upgrade, got {other:#?}"),
    }
}

/// A client's connection to the old replica (`live`: open).
pub(super) fn client_connection(live: bool) -> FlowTo {
    FlowTo {
        id: 7,
        live,
        source: Some(IpAddr::from([198, 51, 100, 1])),
    }
}

#[test]
fn replica_is_created_wired_in_and_probed_at_its_address() {
    let h = Harness::new(NODE);
    let spec = api("api:1", "");
    h.apply(&spec).expect("creates");
    let changes = h.changes();
    let from = changes
        .iter()
        .position(|c| c == "create lessnat-api.w")
        .expect("created");
    assert_eq!(
        changes[from..],
        [
            "create lessnat-api.w",
            "start lessnat-api.w",
            "wire api at 10.20.1.5",
            "keep_running lessnat-api.w",
        ]
    );
    h.assert_before("wire api at 10.20.1.5", "probe 10.20.1.5:8080");
    h.assert_before("probe 10.20.1.5:8080", "keep_running lessnat-api.w");
    assert_serves(&h, "api:1", ADDRESS);
    assert!(h.plan(&spec).changes.is_empty(), "nothing left to do");
}

#[test]
fn stop_start_replaces_the_replica_in_place() {
    let h = installed();
    let plan = h.plan(&api("api:2", "strategy: stop-start"));
    assert!(
        matches!(only_operation(&plan), Operation::ReplaceReplica { address, .. } if *address == ADDRESS),
        "{plan:#?}"
    );
    h.apply_plan(&plan).expect("replaces");
    assert_eq!(
        h.changes(),
        [
            "stop lessnat-api.w",
            "remove lessnat-api.w",
            "create lessnat-api.w",
            "start lessnat-api.w",
            "wire api at 10.20.1.5",
            "keep_running lessnat-api.w",
        ]
    );
    assert_serves(&h, "api:2", ADDRESS);
}

#[test]
fn upgrade_moves_to_the_other_address_once_the_old_one_is_quiet() {
    let h = installed();
    // The client's connection to the old replica closes at the third read.
    h.fake.set_flows_to(
        ADDRESS,
        vec![
            vec![client_connection(true)],
            vec![client_connection(true)],
            vec![client_connection(false)],
        ],
    );
    let spec = api("api:2", "switchWait: 10s, drainTimeout: 1m");
    let plan = h.plan(&spec);
    let next = next_at(only_operation(&plan));
    h.apply_plan(&plan).expect("upgrades");
    assert_eq!(
        h.changes(),
        [
            "create lessnat-api.w.next",
            "start lessnat-api.w.next",
            format!("wire api at {next}").as_str(),
            "stop lessnat-api.w",
            "remove lessnat-api.w",
            "rename lessnat-api.w.next lessnat-api.w",
            "keep_running lessnat-api.w",
        ]
    );
    // switchWait (10 s), then polls every 0.5 s until 2 s have passed
    // since the connection was last seen open (at 10.5 s).
    assert_eq!(h.fake.elapsed(), std::time::Duration::from_millis(12_500));
    assert_serves(&h, "api:2", next);
    assert!(h.plan(&spec).changes.is_empty(), "nothing left to do");
}

#[test]
fn upgrade_whose_next_never_gets_healthy_removes_it() {
    let h = installed();
    let before = h.fake.container(PRIMARY);
    h.fake.set_health(NEXT, Health::Never);
    let plan = h.plan(&api("api:2", ""));
    let next = next_at(only_operation(&plan));
    let result = h.apply_plan(&plan);
    assert!(
        matches!(result, Err(ApplyError::RolledBack { .. })),
        "{result:?}"
    );
    assert_next_removed(&h, next, before);
}

#[test]
fn upgrade_whose_drain_times_out_with_rollback_removes_next() {
    let h = installed();
    let before = h.fake.container(PRIMARY);
    h.fake
        .set_flows_to(ADDRESS, vec![vec![client_connection(true)]]);
    let plan = h.plan(&api(
        "api:2",
        "switchWait: 1s, drainTimeout: 2s, onDrainTimeout: rollback",
    ));
    let next = next_at(only_operation(&plan));
    let result = h.apply_plan(&plan);
    assert!(
        matches!(&result, Err(ApplyError::RolledBack { cause, .. }) if crate::error::chain(cause.as_ref()).contains("1 connections still open")),
        "{result:?}"
    );
    assert_next_removed(&h, next, before);
}

/// Asserts that apply paused an upgrade whose next version never got healthy.
fn assert_paused_at_start_next(result: &Result<(), ApplyError>) {
    assert!(
        matches!(
            result,
            Err(ApplyError::Paused {
                stage: "start-next",
                ..
            })
        ),
        "{result:?}"
    );
}

#[test]
fn upgrade_found_in_flight_with_a_changed_spec_is_rolled_back() {
    let h = installed();
    h.fake.set_health(NEXT, Health::Never);
    let result = h.apply(&api("api:2", "onFailure: pause"));
    assert_paused_at_start_next(&result);
    assert_eq!(
        h.fake.container_names(),
        [PRIMARY, NEXT],
        "paused as it was"
    );
    h.fake.clear_calls();

    let plan = h.plan(&api("api:3", ""));
    assert!(
        matches!(
            only_operation(&plan),
            Operation::UpgradeReplica {
                in_flight: Some(InFlight {
                    decision: Decision::RollBack,
                    ..
                }),
                ..
            }
        ),
        "{plan:#?}"
    );
    h.apply_plan(&plan).expect("a planned rollback succeeds");
    assert_eq!(
        h.changes(),
        ["stop lessnat-api.w.next", "remove lessnat-api.w.next"]
    );
    assert_serves(&h, "api:1", ADDRESS);
}

/// Two replicas of `api` behind load-balancer node `lb`, one on each worker.
const TWO_WORKERS: &str = r#"version: 1
nodes:
  - {name: lb, address: 192.0.2.2, loadBalancer: {id: 1, vips: [203.0.113.10]}}
  - {name: w1, address: 192.0.2.10, containerSubnet: 10.20.1.0/24}
  - {name: w2, address: 192.0.2.11, containerSubnet: 10.20.2.0/24}
services:
  - name: api
    image: api:1
    network: routed
    replicas: [{node: w1, address: 10.20.1.5}, {node: w2, address: 10.20.2.5}]
    ports: [{name: http, port: 8080, vip: 203.0.113.10, vipPort: 80}]
    health: {tcp: {}}
"#;

/// Plans [`TWO_WORKERS`] on `lb` as observed with `w2`'s replica answering
/// (`w2_answers`) or not at either address, and applies the plan; returns
/// the calls that changed the host.
fn lb_apply(h: &Harness, w2_answers: bool) -> Vec<String> {
    let spec = crate::spec::load_bytes("spec.yaml", TWO_WORKERS.as_bytes())
        .unwrap_or_else(|r| panic!("{}", r.render(crate::style::Style::Plain)));
    let mut observed = h.fake.observed("lb");
    observed.probed_at = Some(1_796_000_000);
    for (address, healthy) in [
        ("10.20.1.5", true),
        ("10.20.1.254", false),
        ("10.20.2.5", w2_answers),
        ("10.20.2.254", false),
    ] {
        observed.probes.push(crate::model::Probe {
            service: "api".into(),
            address: address.into(),
            healthy,
            detail: None,
        });
    }
    h.fake.clear_calls();
    h.apply_plan(&crate::plan::plan(&spec, "lb", &observed))
        .expect("the load-balancer node applies");
    h.changes()
}

#[test]
fn a_replica_left_out_of_the_spread_loses_its_unanswered_connections_once() {
    let h = Harness::new("lb");
    let installed = lb_apply(&h, true);
    assert!(
        !installed.iter().any(|c| c.starts_with("delete unanswered")),
        "nothing is left out yet: {installed:#?}"
    );

    let dropped = lb_apply(&h, false);
    assert_eq!(
        dropped,
        [
            "write table",
            "delete unanswered api/http (203.0.113.10:80): unanswered or reset connections to 10.20.2.5, 10.20.2.254",
        ],
        "the table leaves it out first, then its unanswered connections go"
    );
    assert_eq!(
        lb_apply(&h, false),
        Vec::<String>::new(),
        "staying out changes nothing"
    );
    assert_eq!(
        lb_apply(&h, true),
        ["write table"],
        "rejoining deletes nothing"
    );
}

/// `api` with two replicas on worker `w` (10.20.1.5 and 10.20.1.7, next
/// addresses .6 and .8) at `image`.
pub(super) fn two_on_one_worker(image: &str) -> String {
    api(image, "switchWait: 1s, drainTimeout: 10s").replace(
        "replicas: [{node: w, address: 10.20.1.5}]",
        "replicas: [{node: w, address: 10.20.1.5, count: 2}]",
    )
}

#[test]
fn two_replicas_on_one_worker_each_have_their_containers_and_addresses() {
    let h = Harness::new(NODE);
    let spec = two_on_one_worker("api:1");
    h.apply(&spec).expect("creates both");
    assert_eq!(h.fake.container_names(), [PRIMARY, "lessnat-api.w.2"]);
    assert_eq!(wired(&h), ["10.20.1.5", "10.20.1.7"]);
    assert!(h.plan(&spec).changes.is_empty(), "nothing left to do");

    // An upgrade moves them one at a time, each to the other address of its pair.
    h.fake.clear_calls();
    let spec = two_on_one_worker("api:2");
    let plan = h.plan(&spec);
    let moves: Vec<(IpAddr, IpAddr)> = plan
        .changes
        .iter()
        .filter_map(|c| match &c.operation {
            Operation::UpgradeReplica {
                old_at, next_at, ..
            } => Some((*old_at, *next_at)),
            _ => None,
        })
        .collect();
    assert_eq!(
        moves,
        [
            (ADDRESS, IpAddr::from([10, 20, 1, 6])),
            (IpAddr::from([10, 20, 1, 7]), IpAddr::from([10, 20, 1, 8])),
        ]
    );
    h.apply_plan(&plan).expect("upgrades both");
    let changes = h.changes();
    let at = |call: &str| position(&changes, call);
    assert!(
        at("rename lessnat-api.w.next lessnat-api.w") < at("create lessnat-api.w.2.next"),
        "the second replica starts its next version once the first is done: {changes:#?}"
    );
    assert_eq!(h.fake.container_names(), [PRIMARY, "lessnat-api.w.2"]);
    assert_eq!(wired(&h), ["10.20.1.6", "10.20.1.8"]);
    assert!(h.plan(&spec).changes.is_empty(), "nothing left to do");

    // Down to one: the second replica goes.
    h.fake.clear_calls();
    let one = two_on_one_worker("api:2").replace("count: 2", "count: 1");
    h.apply(&one).expect("scales down");
    assert_eq!(
        h.changes(),
        ["stop lessnat-api.w.2", "remove lessnat-api.w.2"]
    );
    assert_eq!(h.fake.container_names(), [PRIMARY]);
}

#[test]
fn an_upgrade_paused_on_the_second_replica_resumes_only_that_one() {
    let h = Harness::installed(NODE, &two_on_one_worker("api:1"));
    h.fake.set_health("lessnat-api.w.2.next", Health::Never);
    let spec = two_on_one_worker("api:2")
        .replace("drainTimeout: 10s", "drainTimeout: 10s, onFailure: pause");
    let result = h.apply(&spec);
    assert_paused_at_start_next(&result);
    assert_eq!(
        h.fake.container_names(),
        [PRIMARY, "lessnat-api.w.2", "lessnat-api.w.2.next"],
        "the first replica finished; the second is paused with its next version"
    );

    let plan = h.plan(&spec);
    let upgrades: Vec<(String, Option<Decision>)> = plan
        .changes
        .iter()
        .filter_map(|c| match &c.operation {
            Operation::UpgradeReplica { in_flight, .. } => {
                Some((c.resource.address(), in_flight.as_ref().map(|f| f.decision)))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        upgrades,
        [("service.api[2]".to_string(), Some(Decision::Resume))],
        "{plan:#?}"
    );
}

/// Issue 15: the IPv6-only form of [`api`]: the replica at fd00:20:1::5, its
/// default next address the subnet's highest.
fn api6(image: &str) -> String {
    format!(
        r#"version: 1
nodes:
  - {{name: lb, address: "2001:db8:b::2", loadBalancer: {{id: 1, vips: ["2001:db8:f::10"]}}}}
  - {{name: w, address: "2001:db8:b::10", containerSubnet: "fd00:20:1::/64"}}
services:
  - name: api
    image: {image}
    network: routed
    command: ["--listen", ":{{port}}"]
    replicas: [{{node: w, address: "fd00:20:1::5"}}]
    ports: [{{name: http, port: 8080, vip: "2001:db8:f::10", vipPort: 80}}]
    health: {{tcp: {{}}, interval: 1ms, healthyAfter: 1, startTimeout: 50ms}}
    upgrade: {{switchWait: 10s, drainTimeout: 1m}}
"#
    )
}

#[test]
fn an_ipv6_replica_is_wired_in_and_upgraded_to_its_other_address_after_its_drain() {
    let h = Harness::new(NODE);
    h.apply(&api6("api:1")).expect("creates");
    let address: IpAddr = "fd00:20:1::5".parse().expect("address");
    h.assert_before("wire api at fd00:20:1::5", "probe [fd00:20:1::5]:8080");
    assert_serves(&h, "api:1", address);
    let routing = h.fake.observed(NODE).routing;
    assert!(
        routing
            .rules
            .iter()
            .any(|r| r.family == "inet6" && r.source.as_deref() == Some("fd00:20:1::/64")),
        "the IPv6 reply rule: {routing:#?}"
    );

    let client = FlowTo {
        source: Some("2001:db8:c::1".parse().expect("address")),
        ..client_connection(true)
    };
    let closed = FlowTo {
        live: false,
        ..client
    };
    h.fake
        .set_flows_to(address, vec![vec![client], vec![client], vec![closed]]);
    let spec = api6("api:2");
    let plan = h.plan(&spec);
    let next = next_at(only_operation(&plan));
    assert_eq!(next.to_string(), "fd00:20:1:0:ffff:ffff:ffff:ffff");
    h.apply_plan(&plan).expect("upgrades");
    assert_eq!(h.fake.elapsed(), std::time::Duration::from_millis(12_500));
    assert_serves(&h, "api:2", next);
    assert!(h.plan(&spec).changes.is_empty(), "nothing left to do");
}
