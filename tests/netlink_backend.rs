//! The routing backend against a real kernel, inside throwaway network
//! namespaces: it reads lessnat's rules, routes and labelled addresses, field
//! by field, and nothing else; what it writes reads back equal, writes are
//! idempotent, and deletes remove exactly what they name.

mod support;

use std::time::Instant;

use lessnat::backend::netlink;
use lessnat::model::{IpRule, OwnedAddress, Route};
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

fn from(source: &str, rule: IpRule) -> IpRule {
    IpRule {
        source: Some(source.to_owned()),
        ..rule
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
    ip("rule add priority 27004 from 10.20.1.0/24 fwmark 1 lookup 27001");
    ip("-6 rule add priority 27005 from fd00:20::/64 lookup 27002");
    ip("route add 10.20.1.0/24 dev v0 table 27001");
    ip("route add default via 10.20.1.1 table 27001");
    ip("route add 10.20.9.7/32 via 10.20.1.1 dev v0 table 27999");
    ip("route add 10.20.9.8/32 via 192.0.2.1 dev v0 onlink table 27999");
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
            from("10.20.1.0/24", rule("inet", 27004, Some(1), None, 27001)),
            rule("inet6", 27002, Some(2), Some(0xff), 27002),
            from("fd00:20::/64", rule("inet6", 27005, None, None, 27002)),
        ]
    );
    // A gateway route's device is the kernel's choice unless it is `onlink`.
    assert_eq!(
        state.routes,
        vec![
            route(27001, "10.20.1.0/24", None, Some("v0")),
            route(27001, "default", Some("10.20.1.1"), None),
            route(27002, "default", Some("fd00:20::1"), None),
            route(27002, "fd00:20::/64", None, Some("v0")),
            route(27999, "10.20.9.7/32", Some("10.20.1.1"), None),
            route(27999, "10.20.9.8/32", Some("192.0.2.1"), Some("v0")),
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

/// A namespace with a veth pair `v0`/`v1` (both ends inside), `v0` at
/// 10.20.1.2/24 and fd00:20::2/64.
fn routed_netns(tag: &str) -> TestNetns {
    let ns = TestNetns::new(tag);
    for args in [
        "link add v0 type veth peer name v1",
        "link set v0 up",
        "link set v1 up",
        "addr add 10.20.1.2/24 dev v0",
        "-6 addr add fd00:20::2/64 dev v0 nodad",
    ] {
        ns.exec("ip", &args.split_whitespace().collect::<Vec<_>>());
    }
    ns
}

fn ip_text(ns: &TestNetns, args: &str) -> String {
    let output = ns.exec("ip", &args.split_whitespace().collect::<Vec<_>>());
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn rules_written_read_back_equal_and_delete_exactly() {
    if !root_with("rules_written_read_back_equal_and_delete_exactly", &[]) {
        return;
    }
    let ns = routed_netns("rules");
    let netns = ns.netns();
    let mut rules = vec![
        rule("inet", 27000, None, None, 27000),
        from(
            "10.20.1.0/24",
            rule("inet", 27001, Some(0x6c6e_0001), None, 27001),
        ),
        rule("inet", 27002, Some(2), Some(0xff), 27002),
        rule("inet", 27003, None, None, 254),
        from("fd00:20::/64", rule("inet6", 27001, Some(1), None, 27001)),
    ];
    for rule in &rules {
        netlink::add_rule(&netns, rule).expect("add rule");
    }
    // Adding again changes nothing.
    for rule in &rules {
        netlink::add_rule(&netns, rule).expect("add rule again");
    }
    rules.sort();
    assert_eq!(netlink::observe(&netns).expect("observe").rules, rules);

    // What `ip` shows: the table id above 255 and the source, once each.
    let shown = ip_text(&ns, "rule show");
    assert_eq!(
        shown
            .matches("27001:\tfrom 10.20.1.0/24 fwmark 0x6c6e0001 lookup 27001")
            .count(),
        1,
        "{shown}"
    );
    assert!(shown.contains("27003:\tfrom all lookup main"), "{shown}");

    // A delete names one rule exactly: a similar one (same priority and
    // table, no source, no mark) is not there, and nothing is removed.
    netlink::delete_rule(&netns, &rule("inet", 27001, None, None, 27001)).expect("absent");
    netlink::delete_rule(&netns, &rule("inet", 27002, Some(2), None, 27002)).expect("absent");
    assert_eq!(netlink::observe(&netns).expect("observe").rules, rules);

    for rule in &rules {
        netlink::delete_rule(&netns, rule).expect("delete rule");
        netlink::delete_rule(&netns, rule).expect("delete an absent rule");
    }
    assert!(netlink::observe(&netns).expect("observe").rules.is_empty());
    assert!(!ip_text(&ns, "rule show").contains("2700"));
}

#[test]
fn routes_written_read_back_equal_and_delete_exactly() {
    if !root_with("routes_written_read_back_equal_and_delete_exactly", &[]) {
        return;
    }
    let ns = routed_netns("routes");
    let netns = ns.netns();
    let mut routes = vec![
        // A worker's container /32 and an LB node's subnet via a worker.
        route(27000, "10.20.1.5/32", None, Some("v0")),
        route(27000, "10.20.2.0/24", Some("10.20.1.10"), None),
        // Replies to an LB node, and an onlink gateway.
        route(27001, "default", Some("10.20.1.1"), None),
        route(27002, "default", Some("169.254.1.1"), Some("v0")),
        route(27000, "fd00:30::/64", Some("fd00:20::1"), None),
        route(27000, "fd00:31::/64", None, Some("v0")),
    ];
    for route in &routes {
        netlink::add_route(&netns, route).expect("add route");
    }
    for route in &routes {
        netlink::add_route(&netns, route).expect("add route again");
    }
    routes.sort();
    assert_eq!(netlink::observe(&netns).expect("observe").routes, routes);
    let shown = ip_text(&ns, "route show table 27000");
    assert!(
        shown.contains("10.20.1.5 dev v0 proto static scope link"),
        "{shown}"
    );
    assert!(
        ip_text(&ns, "route show table 27002")
            .contains("default via 169.254.1.1 dev v0 proto static onlink"),
        "onlink"
    );

    // Adding a route to a destination that has one replaces it.
    let moved = route(27001, "default", Some("10.20.1.9"), None);
    netlink::add_route(&netns, &moved).expect("replace the default route");
    let observed = netlink::observe(&netns).expect("observe").routes;
    assert!(observed.contains(&moved), "{observed:?}");
    assert!(!observed.contains(&route(27001, "default", Some("10.20.1.1"), None)));
    routes.retain(|r| r.table != 27001);
    routes.push(moved);
    routes.sort();

    // Deletes that name no route there remove nothing, even when a route to
    // the same destination is there (the kernel would take it as a match).
    for absent in [
        route(27000, "10.20.2.0/24", None, Some("v0")),
        route(27000, "10.20.2.0/24", Some("10.20.1.11"), None),
        route(27000, "10.20.1.5/32", None, Some("v1")),
        route(27000, "10.20.1.5/32", None, Some("no-such-dev")),
        route(27003, "default", Some("10.20.1.1"), None),
    ] {
        netlink::delete_route(&netns, &absent).expect("delete an absent route");
    }
    assert_eq!(netlink::observe(&netns).expect("observe").routes, routes);

    for route in &routes {
        netlink::delete_route(&netns, route).expect("delete route");
        netlink::delete_route(&netns, route).expect("delete it again");
    }
    assert!(netlink::observe(&netns).expect("observe").routes.is_empty());
}

#[test]
fn malformed_or_foreign_routes_and_rules_are_refused_before_the_kernel() {
    // No namespace is entered for these, so this needs no privileges.
    let netns = lessnat::netns::Netns::from_arg("lessnat-no-such-ns");
    for (bad, why) in [
        (route(254, "10.0.0.0/8", Some("10.0.0.1"), None), "outside"),
        (route(27000, "10.20.1.5/24", None, Some("v0")), "host bits"),
        (route(27000, "10.20.1.5", None, Some("v0")), "CIDR"),
        (route(27000, "0.0.0.0/0", Some("10.0.0.1"), None), "default"),
        (
            route(27000, "10.20.1.0/24", None, None),
            "gateway, a device",
        ),
        (
            route(27000, "fd00::/64", Some("10.0.0.1"), None),
            "families",
        ),
    ] {
        let error = netlink::add_route(&netns, &bad).expect_err("invalid");
        assert!(error.to_string().contains(why), "{bad:?}: {error}");
        let error = netlink::delete_route(&netns, &bad).expect_err("invalid");
        assert!(error.to_string().contains(why), "{bad:?}: {error}");
    }
    for (bad, why) in [
        (rule("inet", 100, None, None, 27001), "outside"),
        (rule("ip", 27001, None, None, 27001), "neither inet"),
        (rule("inet", 27001, None, Some(0xff), 27001), "fwmask needs"),
        (
            from("fd00::/64", rule("inet", 27001, None, None, 27001)),
            "not inet",
        ),
        (
            from("10.20.1.1/24", rule("inet", 27001, None, None, 27001)),
            "host bits",
        ),
    ] {
        let error = netlink::add_rule(&netns, &bad).expect_err("invalid");
        assert!(error.to_string().contains(why), "{bad:?}: {error}");
    }
}

fn owned(device: &str, address: &str) -> OwnedAddress {
    OwnedAddress {
        device: device.to_owned(),
        address: address.to_owned(),
    }
}

/// Issue 15: IPv6 VIPs have no label: lessnat's carry its address protocol
/// (`proto 108`) and skip duplicate address detection; someone else's IPv6
/// address, even the same one, is neither seen, taken over nor deleted.
#[test]
fn ipv6_addresses_are_lessnats_by_their_protocol() {
    if !root_with("ipv6_addresses_are_lessnats_by_their_protocol", &[]) {
        return;
    }
    let ns = routed_netns("addr6");
    let netns = ns.netns();
    ns.exec("ip", &["addr", "add", "2001:db8:f::20/128", "dev", "lo"]);
    assert_eq!(netlink::observe_addresses(&netns).expect("observe"), vec![]);

    let vip = owned("lo", "2001:db8:f::10/128");
    netlink::add_address(&netns, &vip).expect("add address");
    netlink::add_address(&netns, &vip).expect("add it again");
    assert_eq!(
        netlink::observe_addresses(&netns).expect("observe"),
        vec![vip.clone()]
    );
    let shown = ip_text(&ns, "-6 addr show dev lo");
    let line = shown
        .lines()
        .find(|l| l.contains("2001:db8:f::10/128"))
        .unwrap_or_else(|| panic!("{shown}"));
    // (This `ip` does not print the protocol; observation above read it.)
    assert!(!line.contains("tentative"), "{shown}");

    let foreign = owned("lo", "2001:db8:f::20/128");
    let error = netlink::add_address(&netns, &foreign).expect_err("someone else's");
    assert!(
        lessnat::error::chain(&error).contains("without lessnat's label"),
        "{error}"
    );
    netlink::delete_address(&netns, &foreign).expect("not lessnat's: nothing to do");
    assert!(ip_text(&ns, "-6 addr show dev lo").contains("2001:db8:f::20/128"));

    netlink::delete_address(&netns, &vip).expect("delete address");
    netlink::delete_address(&netns, &vip).expect("delete it again");
    assert_eq!(netlink::observe_addresses(&netns).expect("observe"), vec![]);
}

#[test]
fn labelled_addresses_are_lessnats_and_only_those() {
    if !root_with("labelled_addresses_are_lessnats_and_only_those", &[]) {
        return;
    }
    let ns = routed_netns("addr");
    let netns = ns.netns();
    // Someone else's addresses, labelled or not, on lo and v0.
    ns.exec("ip", &["addr", "add", "203.0.113.20/32", "dev", "lo"]);
    ns.exec(
        "ip",
        &[
            "addr",
            "add",
            "203.0.113.21/32",
            "dev",
            "lo",
            "label",
            "lo:other",
        ],
    );
    assert_eq!(netlink::observe_addresses(&netns).expect("observe"), vec![]);

    let vips = [
        owned("lo", "203.0.113.10/32"),
        owned("lo", "203.0.113.11/32"),
        owned("v0", "198.51.100.7/24"),
    ];
    for vip in vips.iter().rev() {
        netlink::add_address(&netns, vip).expect("add address");
        netlink::add_address(&netns, vip).expect("add it again");
    }
    assert_eq!(
        netlink::observe_addresses(&netns).expect("observe"),
        vips.to_vec()
    );
    let shown = ip_text(&ns, "-4 addr show dev lo");
    assert!(
        shown.contains("inet 203.0.113.10/32 scope global lo:lessnat"),
        "{shown}"
    );

    // Someone else's address is not taken over, nor deleted.
    let foreign = owned("lo", "203.0.113.20/32");
    let error = netlink::add_address(&netns, &foreign).expect_err("someone else's");
    let text = lessnat::error::chain(&error);
    assert!(text.contains("without lessnat's label"), "{text}");
    netlink::delete_address(&netns, &foreign).expect("not lessnat's: nothing to do");
    assert!(ip_text(&ns, "-4 addr show dev lo").contains("203.0.113.20/32"));

    for vip in &vips {
        netlink::delete_address(&netns, vip).expect("delete address");
        netlink::delete_address(&netns, vip).expect("delete it again");
    }
    netlink::delete_address(&netns, &owned("nodev", "203.0.113.10/32"))
        .expect("no such device: nothing to do");
    assert_eq!(netlink::observe_addresses(&netns).expect("observe"), vec![]);
    let error = netlink::add_address(&netns, &owned("nodev", "203.0.113.10/32"))
        .expect_err("no such device");
    assert!(error.to_string().contains("nodev"), "{error}");
    let error = netlink::add_address(&netns, &owned("enp0s31f6", "203.0.113.10/32"))
        .expect_err("label too long");
    assert!(error.to_string().contains("15 bytes"), "{error}");
}
