//! The routing backend against a real kernel, inside throwaway network
//! namespaces: it reads lessnat's rules and routes, field by field, and
//! nothing else.

mod support;

use std::time::Instant;

use lessnat::backend::netlink;
use lessnat::observe::{IpRule, Route};
use support::{TestNetns, root_with};

fn rule(
    family: &str,
    priority: u32,
    fwmark: Option<u32>,
    fwmask: Option<u32>,
    table: u32,
) -> IpRule {
    IpRule {
        family: family.to_owned(),
        priority,
        source: None,
        fwmark,
        fwmask,
        table,
    }
}

fn route(table: u32, destination: &str, gateway: Option<&str>, device: Option<&str>) -> Route {
    Route {
        table,
        destination: destination.to_owned(),
        gateway: gateway.map(str::to_owned),
        device: device.map(str::to_owned),
    }
}

/// Everything `ip` shows about rules and routes, to prove observing changes nothing.
fn routing_snapshot(ns: &TestNetns) -> Vec<Vec<u8>> {
    [
        &["rule", "show"][..],
        &["-6", "rule", "show"],
        &["route", "show", "table", "all"],
        &["-6", "route", "show", "table", "all"],
    ]
    .iter()
    .map(|args| ns.exec("ip", args).stdout)
    .collect()
}

#[test]
fn observes_exactly_lessnats_rules_and_routes() {
    if !root_with("observes_exactly_lessnats_rules_and_routes", &[]) {
        return;
    }
    let ns = TestNetns::new("rt");
    let ip = |args: &str| {
        ns.exec("ip", &args.split_whitespace().collect::<Vec<_>>());
    };
    // A veth pair (both ends in the namespace) to route through; `dummy` is
    // not built into every kernel.
    ip("link add v0 type veth peer name v1");
    ip("link set v0 up");
    ip("link set v1 up");
    ip("addr add 10.20.1.2/24 dev v0");
    ip("-6 addr add fd00:20::2/64 dev v0 nodad");

    // lessnat's: priorities and tables in 27000..=27999.
    ip("rule add priority 27001 fwmark 1 lookup 27001");
    ip("-6 rule add priority 27002 fwmark 0x2/0xff lookup 27002");
    ip("rule add priority 27003 lookup main");
    ip("route add 10.20.1.0/24 dev v0 table 27001");
    ip("route add default via 10.20.1.1 table 27001");
    ip("route add 10.20.9.7/32 via 10.20.1.1 dev v0 table 27999");
    ip("-6 route add fd00:20::/64 dev v0 table 27002");
    ip("-6 route add default via fd00:20::1 dev v0 table 27002");

    // Foreign ones, including just outside both ends of the ranges.
    ip("rule add priority 100 fwmark 9 lookup 100");
    ip("rule add priority 26999 fwmark 9 lookup 27001");
    ip("rule add priority 28000 lookup 27001");
    ip("-6 rule add priority 28000 lookup 27002");
    ip("route add 10.30.0.0/16 dev v0 table 100");
    ip("route add 10.31.0.0/16 dev v0 table 26999");
    ip("route add 10.32.0.0/16 dev v0 table 28000");
    ip("route add 10.33.0.0/16 via 10.20.1.1");
    ip("-6 route add fd00:33::/64 dev v0 table 28000");

    let before = routing_snapshot(&ns);
    let started = Instant::now();
    let state = netlink::observe(&ns.netns()).expect("observe routing");
    eprintln!("routing observed in {:?}", started.elapsed());
    assert_eq!(
        routing_snapshot(&ns),
        before,
        "observing changed the routing state"
    );

    assert_eq!(
        state.rules,
        vec![
            rule("inet", 27001, Some(1), None, 27001),
            rule("inet", 27003, None, None, 254),
            rule("inet6", 27002, Some(2), Some(0xff), 27002),
        ]
    );
    assert_eq!(
        state.routes,
        vec![
            route(27001, "10.20.1.0/24", None, Some("v0")),
            route(27001, "default", Some("10.20.1.1"), Some("v0")),
            route(27002, "default", Some("fd00:20::1"), Some("v0")),
            route(27002, "fd00:20::/64", None, Some("v0")),
            route(27999, "10.20.9.7/32", Some("10.20.1.1"), Some("v0")),
        ]
    );
}

#[test]
fn an_empty_namespace_has_no_routing_state() {
    if !root_with("an_empty_namespace_has_no_routing_state", &[]) {
        return;
    }
    let ns = TestNetns::new("rt-empty");
    let state = netlink::observe(&ns.netns()).expect("observe routing");
    assert!(state.rules.is_empty(), "{:?}", state.rules);
    assert!(state.routes.is_empty(), "{:?}", state.routes);
}
