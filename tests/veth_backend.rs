//! Routed-mode plumbing against a real kernel: wiring a "container" (a
//! process of the test's own, in a namespace of its own) to a node namespace
//! with a veth pair, real TCP traffic through it, unwiring, re-wiring a stale
//! pair, failures that leave nothing behind; and kernel settings read and
//! written per namespace.

mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use lessnat::backend::veth::{self, Wiring};
use lessnat::backend::{netlink, sysctl};
use lessnat::model::{IpRule, Route, Veth};
use lessnat::netns::Netns;
use lessnat::ownership::{ROUTED_SYSCTLS, ROUTES_TABLE, VETH_GATEWAY, veth_name};
use serde_json::Value;
use support::{TestNetns, root_with};

/// A process inside a namespace, standing in for a container's main
/// process; killed (by its own PID) when dropped.
struct Container {
    ns: TestNetns,
    child: Child,
}

impl Container {
    fn start(tag: &str) -> Self {
        let ns = TestNetns::new(tag);
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "sleep", "600"])
            .spawn()
            .expect("spawn the container process");
        let container = Container { ns, child };
        // `ip netns exec` enters the namespace, then becomes `sleep`: wait
        // until it is in, or the wiring would land in this test's namespace.
        let inode = |path: String| std::fs::metadata(path).map(|m| (m.dev(), m.ino())).ok();
        let wanted = inode(format!("/run/netns/{}", container.ns.name));
        let started = Instant::now();
        while inode(format!("/proc/{}/ns/net", container.pid())) != wanted {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the container process never entered its namespace"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        container
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `ip -j ARGS` inside the container's namespace.
    fn ip_json(&self, args: &str) -> Value {
        let mut full = vec!["-j"];
        full.extend(args.split_whitespace());
        let output = self.ns.exec("ip", &full);
        serde_json::from_slice(&output.stdout).expect("ip -j prints JSON")
    }

    /// The names of the interfaces in the container's namespace.
    fn links(&self) -> Vec<String> {
        let links = self.ip_json("link show");
        links
            .as_array()
            .expect("a list of links")
            .iter()
            .filter_map(|link| link["ifname"].as_str().map(str::to_owned))
            .collect()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const ADDRESS: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 20, 1, 5));

fn wiring(container: &Container) -> Wiring<'static> {
    Wiring {
        service: "web",
        address: ADDRESS,
        pid: container.pid(),
    }
}

fn expected_veth() -> Veth {
    Veth {
        name: veth_name("web", &ADDRESS.to_string()),
        service: "web".into(),
        address: ADDRESS.to_string(),
        up: true,
    }
}

/// Node: the rule that makes its lookups use lessnat's plain routes table.
fn route_through_lessnats_table(node: &Netns) {
    let rule = IpRule {
        family: "inet".into(),
        priority: ROUTES_TABLE,
        source: None,
        fwmark: None,
        fwmask: None,
        table: ROUTES_TABLE,
    };
    netlink::add_rule(node, &rule).expect("add the routes table's rule");
}

/// Connects from the node to the container at `ADDRESS:8080` and returns the
/// client address the container saw, after a short exchange both ways.
fn connect_through(node: &TestNetns, container: &Container) -> SocketAddr {
    connect_to(node, container, ADDRESS)
}

/// [`connect_through`] to `address`.
fn connect_to(node: &TestNetns, container: &Container, address: IpAddr) -> SocketAddr {
    // A socket stays in the namespace it was made in, whichever thread uses it.
    let listener = container
        .ns
        .netns()
        .run(|| TcpListener::bind((address, 8080)))
        .expect("enter the container")
        .expect("listen in the container");
    let server = std::thread::spawn(move || {
        let (mut stream, peer) = listener.accept().expect("accept");
        let mut hello = [0; 5];
        stream.read_exact(&mut hello).expect("read");
        assert_eq!(&hello, b"hello");
        stream.write_all(b"world").expect("write");
        peer
    });
    let mut client = node
        .netns()
        .run(|| TcpStream::connect_timeout(&(address, 8080).into(), Duration::from_secs(5)))
        .expect("enter the node")
        .expect("connect from the node to the container");
    client.write_all(b"hello").expect("write");
    let mut world = [0; 5];
    client.read_exact(&mut world).expect("read the reply");
    assert_eq!(&world, b"world");
    server.join().expect("the server thread")
}

#[test]
fn a_wired_container_is_reachable_from_the_node() {
    if !root_with("a_wired_container_is_reachable_from_the_node", &["sleep"]) {
        return;
    }
    let node = TestNetns::new("node");
    let container = Container::start("ctr");
    let netns = node.netns();

    let veth = veth::wire(&netns, &wiring(&container)).expect("wire");
    assert_eq!(veth, expected_veth());
    assert_eq!(veth::observe(&netns).expect("observe"), vec![veth.clone()]);

    // Node side: the gateway address and the /32 route in lessnat's table.
    let routes = netlink::observe(&netns).expect("observe routing").routes;
    assert_eq!(
        routes,
        vec![Route {
            table: ROUTES_TABLE,
            destination: format!("{ADDRESS}/32"),
            gateway: None,
            device: Some(veth.name.clone()),
        }]
    );
    let shown = node.exec("ip", &["-4", "addr", "show", "dev", &veth.name]);
    assert!(
        String::from_utf8_lossy(&shown.stdout).contains(&format!("inet {VETH_GATEWAY}/32")),
        "{shown:?}"
    );

    // Container side: eth0 with the address, lo and eth0 up, the routes.
    assert_eq!(container.links(), vec!["lo", "eth0"]);
    let addresses = container.ip_json("-4 addr show dev eth0");
    let address = &addresses[0]["addr_info"][0];
    assert_eq!(
        (address["local"].as_str(), address["prefixlen"].as_u64()),
        (Some("10.20.1.5"), Some(32))
    );
    for device in ["lo", "eth0"] {
        let link = container.ip_json(&format!("link show dev {device}"));
        let flags = link[0]["flags"].as_array().expect("flags");
        assert!(flags.iter().any(|f| f == "UP"), "{device}: {link}");
    }
    let routes = container.ip_json("route show");
    let default = routes
        .as_array()
        .expect("routes")
        .iter()
        .find(|route| route["dst"] == "default")
        .unwrap_or_else(|| panic!("no default route: {routes}"));
    assert_eq!(default["gateway"], "169.254.1.1", "{default}");
    assert_eq!(default["dev"], "eth0", "{default}");
    assert!(
        routes.as_array().expect("routes").iter().any(|route| {
            route["dst"] == "169.254.1.1" && route["dev"] == "eth0" && route["scope"] == "link"
        }),
        "{routes}"
    );

    // Real traffic: the container sees the node side's gateway address.
    route_through_lessnats_table(&netns);
    let peer = connect_through(&node, &container);
    assert_eq!(peer.ip(), VETH_GATEWAY);

    veth::unwire(&netns, &veth.name).expect("unwire");
    assert_eq!(veth::observe(&netns).expect("observe"), vec![]);
    assert_eq!(container.links(), vec!["lo"]);
    assert!(netlink::observe(&netns).expect("observe").routes.is_empty());
    veth::unwire(&netns, &veth.name).expect("unwiring an absent veth is fine");
}

/// Issue 15: an IPv6 container, `fd00:20:1::5/128` with `default via
/// fe80::1 dev eth0`, the node side `fe80::1/64` and the `/128` route; both
/// usable at once (no duplicate address detection), with real traffic.
#[test]
fn an_ipv6_container_is_wired_and_reachable_at_once() {
    if !root_with(
        "an_ipv6_container_is_wired_and_reachable_at_once",
        &["sleep"],
    ) {
        return;
    }
    let node = TestNetns::new("node6");
    let container = Container::start("ctr6");
    let netns = node.netns();
    let address: IpAddr = "fd00:20:1::5".parse().expect("address");
    // The node's own address, the source of its connections.
    node.exec("ip", &["link", "set", "lo", "up"]);
    node.exec(
        "ip",
        &["addr", "add", "2001:db8::1/128", "dev", "lo", "nodad"],
    );

    let veth = veth::wire(
        &netns,
        &Wiring {
            address,
            ..wiring(&container)
        },
    )
    .expect("wire");
    assert_eq!(veth.address, "fd00:20:1::5");
    let routes = netlink::observe(&netns).expect("observe routing").routes;
    assert_eq!(
        routes,
        vec![Route {
            table: ROUTES_TABLE,
            destination: "fd00:20:1::5/128".into(),
            gateway: None,
            device: Some(veth.name.clone()),
        }]
    );
    let shown = node.exec("ip", &["-6", "addr", "show", "dev", &veth.name]);
    let shown = String::from_utf8_lossy(&shown.stdout).into_owned();
    let gateway = shown
        .lines()
        .find(|line| line.contains("inet6 fe80::1/64"))
        .unwrap_or_else(|| panic!("no fe80::1/64 on the node side: {shown}"));
    assert!(!gateway.contains("tentative"), "usable at once: {shown}");
    let addresses = container.ip_json("-6 addr show dev eth0");
    let own = addresses[0]["addr_info"]
        .as_array()
        .expect("addresses")
        .iter()
        .find(|a| a["local"] == "fd00:20:1::5")
        .unwrap_or_else(|| panic!("no fd00:20:1::5 on eth0: {addresses}"))
        .clone();
    assert_eq!(own["prefixlen"], 128, "{own}");
    assert!(own.get("tentative").is_none(), "usable at once: {own}");
    let routes = container.ip_json("-6 route show");
    assert!(
        routes.as_array().expect("routes").iter().any(|route| {
            route["dst"] == "default" && route["gateway"] == "fe80::1" && route["dev"] == "eth0"
        }),
        "{routes}"
    );

    netlink::add_rule(
        &netns,
        &IpRule {
            family: "inet6".into(),
            priority: ROUTES_TABLE,
            source: None,
            fwmark: None,
            fwmask: None,
            table: ROUTES_TABLE,
        },
    )
    .expect("add the routes table's IPv6 rule");
    let peer = connect_to(&node, &container, address);
    assert_eq!(peer.ip(), "2001:db8::1".parse::<IpAddr>().expect("address"));

    veth::unwire(&netns, &veth.name).expect("unwire");
    assert_eq!(container.links(), vec!["lo"]);
}

#[test]
fn wiring_again_replaces_a_stale_pair() {
    if !root_with("wiring_again_replaces_a_stale_pair", &["sleep"]) {
        return;
    }
    let node = TestNetns::new("node2");
    let container = Container::start("ctr2");
    let netns = node.netns();
    let index = |name: &str| {
        let output = node.exec("cat", &[&format!("/sys/class/net/{name}/ifindex")]);
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    };

    let first = veth::wire(&netns, &wiring(&container)).expect("wire");
    let first_index = index(&first.name);
    // A stale pair: the node side is down, as after someone's meddling.
    node.exec("ip", &["link", "set", &first.name, "down"]);
    assert_eq!(
        veth::observe(&netns).expect("observe"),
        vec![Veth {
            up: false,
            ..first.clone()
        }]
    );

    let second = veth::wire(&netns, &wiring(&container)).expect("wire again");
    assert_eq!(second, first);
    assert_ne!(index(&second.name), first_index, "a new pair");
    assert_eq!(veth::observe(&netns).expect("observe"), vec![second]);
    assert_eq!(container.links(), vec!["lo", "eth0"]);
    route_through_lessnats_table(&netns);
    assert_eq!(connect_through(&node, &container).ip(), VETH_GATEWAY);
}

#[test]
fn a_failed_wiring_leaves_nothing_behind() {
    if !root_with("a_failed_wiring_leaves_nothing_behind", &["sleep"]) {
        return;
    }
    let node = TestNetns::new("node3");
    let container = Container::start("ctr3");
    let netns = node.netns();
    let nothing_left = || {
        assert_eq!(veth::observe(&netns).expect("observe"), vec![]);
        let links = node.exec("ip", &["-o", "link", "show"]);
        let links = String::from_utf8_lossy(&links.stdout).into_owned();
        assert_eq!(links.lines().count(), 1, "only lo on the node: {links}");
        assert!(netlink::observe(&netns).expect("observe").routes.is_empty());
        assert_eq!(container.links(), vec!["lo"]);
    };

    // No such process: nothing is made (and a stale pair is gone).
    veth::wire(&netns, &wiring(&container)).expect("wire");
    let gone = Wiring {
        pid: i32::MAX as u32 - 1,
        ..wiring(&container)
    };
    let error = veth::wire(&netns, &gone).expect_err("no such process");
    let message = error.to_string();
    assert!(message.contains("at 10.20.1.5"), "{message}");
    assert!(
        message.contains("open the container's network namespace"),
        "{message}"
    );
    nothing_left();

    // A step after the pair exists fails (the kernel refuses an alias this
    // long): the pair is deleted again, on both sides.
    let long = "s".repeat(300);
    let refused = Wiring {
        service: &long,
        address: IpAddr::V4(Ipv4Addr::new(10, 20, 1, 6)),
        pid: container.pid(),
    };
    let error = veth::wire(&netns, &refused).expect_err("alias too long");
    let message = error.to_string();
    assert!(message.contains("at 10.20.1.6"), "{message}");
    assert!(message.contains("set the alias"), "{message}");
    nothing_left();

    // A process on the node's own network (host networking): refused, and
    // nothing there changes.
    let error = veth::wire(&container.ns.netns(), &wiring(&container)).expect_err("same netns");
    let text = lessnat::error::chain(&error);
    assert!(text.contains("node's own network"), "{text}");
    nothing_left();
    assert_eq!(container.ip_json("route show"), Value::Array(vec![]));

    // An eth0 already in the container: the pair cannot be made.
    container.ns.exec(
        "ip",
        &["link", "add", "eth0", "type", "veth", "peer", "name", "x0"],
    );
    let error = veth::wire(&netns, &wiring(&container)).expect_err("eth0 exists");
    assert!(
        error.to_string().contains("create the veth pair"),
        "{error}"
    );
    assert_eq!(veth::observe(&netns).expect("observe"), vec![]);
}

#[test]
fn sysctls_are_per_namespace() {
    if !root_with("sysctls_are_per_namespace", &["sysctl"]) {
        return;
    }
    let node = TestNetns::new("sysctl");
    let netns = node.netns();
    let host = sysctl::read(&Netns::Current, &ROUTED_SYSCTLS).expect("read the host's");

    let values = sysctl::read(&netns, &ROUTED_SYSCTLS).expect("read");
    assert_eq!(values.keys().map(String::as_str).collect::<Vec<_>>(), {
        let mut keys = ROUTED_SYSCTLS.to_vec();
        keys.sort();
        keys
    });
    for value in ["1", "0"] {
        for key in ROUTED_SYSCTLS {
            sysctl::write(&netns, key, value).expect("write");
        }
        let values = sysctl::read(&netns, &ROUTED_SYSCTLS).expect("read back");
        assert!(values.values().all(|v| v == value), "{values:?}");
        let shown = node.exec("sysctl", &["-n", "net.ipv4.ip_forward"]);
        assert_eq!(String::from_utf8_lossy(&shown.stdout).trim(), value);
        assert_eq!(
            sysctl::read(&Netns::Current, &ROUTED_SYSCTLS).expect("read the host's"),
            host,
            "the host's values changed"
        );
    }

    let error = sysctl::read(&netns, &["net.ipv4.ip_forward", "net.ipv4.no_such_key"])
        .expect_err("missing key");
    assert!(
        error.to_string().contains("net.ipv4.no_such_key"),
        "{error}"
    );
    let error = sysctl::write(&netns, "net.ipv4.no_such_key", "1").expect_err("missing key");
    assert!(
        error.to_string().contains("net.ipv4.no_such_key"),
        "{error}"
    );
}
