//! The conntrack backend against a real kernel, inside throwaway network
//! namespaces: loopback traffic made by the test is counted by protocol, ports
//! and state, and UDP flows are deleted by port.

mod support;

use std::net::{TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use lessnat::backend::conntrack;
use lessnat::model::{ConntrackState, FlowCount};
use lessnat::netns::Netns;
use lessnat::spec::Protocol;
use support::{TestNetns, root_with};

/// Makes conntrack track in the namespace. Hooked nat chains alone do not: the
/// kernel turns tracking on in a namespace only for a rule that needs it (a
/// `ct` match, `redirect`, `dnat`, ...), hence the counter.
const TRACK: &str = "table inet t {
    chain c { type nat hook output priority -110; ct state new counter; }
    chain p { type nat hook prerouting priority -110; ct state new counter; }
}";

/// A namespace where conntrack is tracking.
fn tracking_netns(tag: &str) -> TestNetns {
    let ns = TestNetns::new(tag);
    ns.nft(TRACK);
    ns
}

fn flow(protocol: &str, orig_dport: u16, reply_sport: u16, state: &str, count: u64) -> FlowCount {
    FlowCount {
        protocol: protocol.to_owned(),
        orig_dport,
        reply_sport,
        state: state.to_owned(),
        count,
    }
}

/// The flows of `protocol` to `orig_dport`.
fn flows_to(state: &ConntrackState, protocol: &str, orig_dport: u16) -> Vec<FlowCount> {
    state
        .flows
        .iter()
        .filter(|f| f.protocol == protocol && f.orig_dport == orig_dport)
        .cloned()
        .collect()
}

fn observe(netns: &Netns) -> ConntrackState {
    let state = conntrack::observe(netns).expect("observe conntrack");
    assert!(state.available, "conntrack unavailable: {state:?}");
    state
}

/// Opens `n` connections to `address` and accepts them; both ends stay open.
fn connect(listener: &TcpListener, address: &str, n: usize) -> Vec<(TcpStream, TcpStream)> {
    (0..n)
        .map(|_| {
            let client = TcpStream::connect(address).expect("connect");
            let (server, _) = listener.accept().expect("accept");
            (client, server)
        })
        .collect()
}

#[test]
fn tcp_connections_are_counted_by_state() {
    if !root_with("tcp_connections_are_counted_by_state", &["nft"]) {
        return;
    }
    let ns = tracking_netns("ct-tcp");
    let netns = ns.netns();
    netns
        .run(|| {
            let v4 = TcpListener::bind("127.0.0.1:8000").expect("bind 127.0.0.1:8000");
            let mut open = connect(&v4, "127.0.0.1:8000", 5);
            let state = observe(&netns);
            assert_eq!(
                flows_to(&state, "tcp", 8000),
                vec![flow("tcp", 8000, 8000, "ESTABLISHED", 5)]
            );
            assert!(state.table_count >= 5, "{state:?}");
            assert!(state.table_max > 0, "{state:?}");
            assert!(conntrack::warnings(&state).is_empty());

            // IPv6 entries are counted with the IPv4 ones.
            let v6 = TcpListener::bind("[::1]:8000").expect("bind [::1]:8000");
            open.extend(connect(&v6, "[::1]:8000", 3));
            assert_eq!(
                flows_to(&observe(&netns), "tcp", 8000),
                vec![flow("tcp", 8000, 8000, "ESTABLISHED", 8)]
            );

            // Closed connections leave ESTABLISHED (for TIME_WAIT and the like).
            for (client, server) in open {
                drop(client);
                drop(server);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            let closed = loop {
                let flows = flows_to(&observe(&netns), "tcp", 8000);
                if flows.iter().all(|f| f.state != "ESTABLISHED") || Instant::now() > deadline {
                    break flows;
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            eprintln!("after close: {closed:?}");
            assert!(
                closed.iter().all(|f| f.state != "ESTABLISHED"),
                "{closed:?}"
            );
            assert_eq!(closed.iter().map(|f| f.count).sum::<u64>(), 8, "{closed:?}");
            assert!(closed.iter().any(|f| f.state == "TIME_WAIT"), "{closed:?}");
        })
        .expect("run in the namespace");
}

#[test]
fn redirected_connections_show_the_port_that_answers() {
    if !root_with(
        "redirected_connections_show_the_port_that_answers",
        &["nft"],
    ) {
        return;
    }
    let ns = tracking_netns("ct-redir");
    ns.nft(
        "table inet r {
            chain o { type nat hook output priority -100; tcp dport 8000 redirect to :18000; }
        }",
    );
    let netns = ns.netns();
    netns
        .run(|| {
            let v4 = TcpListener::bind("127.0.0.1:18000").expect("bind 127.0.0.1:18000");
            let v6 = TcpListener::bind("[::1]:18000").expect("bind [::1]:18000");
            let _open = [
                connect(&v4, "127.0.0.1:8000", 1),
                connect(&v6, "[::1]:8000", 1),
            ];
            let state = observe(&netns);
            assert_eq!(
                flows_to(&state, "tcp", 8000),
                vec![flow("tcp", 8000, 18000, "ESTABLISHED", 2)]
            );
            assert_eq!(flows_to(&state, "tcp", 18000), vec![]);
        })
        .expect("run in the namespace");
}

#[test]
fn udp_flows_are_counted_and_deleted_by_port() {
    if !root_with("udp_flows_are_counted_and_deleted_by_port", &["nft"]) {
        return;
    }
    let ns = tracking_netns("ct-udp");
    let netns = ns.netns();
    netns
        .run(|| {
            let _server4 = UdpSocket::bind("127.0.0.1:5353").expect("bind 127.0.0.1:5353");
            let _server6 = UdpSocket::bind("[::1]:5353").expect("bind [::1]:5353");
            let send = |local: &str, to: &str| {
                let socket = UdpSocket::bind(local).expect("bind client");
                socket.send_to(b"q", to).expect("send");
                socket
            };
            let _clients: Vec<UdpSocket> = (0..3)
                .map(|_| send("127.0.0.1:0", "127.0.0.1:5353"))
                .chain((0..2).map(|_| send("[::1]:0", "[::1]:5353")))
                .chain([send("127.0.0.1:0", "127.0.0.1:5354")])
                .collect();
            // A TCP flow on the same port number is not UDP's to delete.
            let tcp = TcpListener::bind("127.0.0.1:5353").expect("bind tcp 5353");
            let _open = connect(&tcp, "127.0.0.1:5353", 1);

            let state = observe(&netns);
            assert_eq!(
                flows_to(&state, "udp", 5353),
                vec![flow("udp", 5353, 5353, "", 5)]
            );
            assert_eq!(
                flows_to(&state, "udp", 5354),
                vec![flow("udp", 5354, 5354, "", 1)]
            );

            let deleted =
                conntrack::delete_flows(&netns, Protocol::Udp, 5353).expect("delete flows");
            assert_eq!(deleted, 5);

            let state = observe(&netns);
            assert_eq!(flows_to(&state, "udp", 5353), vec![]);
            assert_eq!(
                flows_to(&state, "udp", 5354),
                vec![flow("udp", 5354, 5354, "", 1)]
            );
            assert_eq!(
                flows_to(&state, "tcp", 5353),
                vec![flow("tcp", 5353, 5353, "ESTABLISHED", 1)]
            );
            assert_eq!(
                conntrack::delete_flows(&netns, Protocol::Udp, 5353).expect("delete again"),
                0
            );
        })
        .expect("run in the namespace");
}

#[test]
fn a_large_table_is_dumped_quickly() {
    if !root_with("a_large_table_is_dumped_quickly", &["nft"]) {
        return;
    }
    let ns = tracking_netns("ct-many");
    let netns = ns.netns();
    netns
        .run(|| {
            // Stay well below the table limit, which is smaller on small machines.
            let limit = observe(&netns).table_max;
            let per_socket = (limit / 4).min(50_000) as u16;
            // Source ports above the destinations, so no datagram is the
            // reply of another's flow.
            let sockets = [
                UdpSocket::bind("127.0.0.1:65001").expect("bind"),
                UdpSocket::bind("127.0.0.1:65002").expect("bind"),
            ];
            for port in 1..=per_socket {
                for socket in &sockets {
                    socket.send_to(b"x", ("127.0.0.1", port)).expect("send");
                }
            }
            let entries = 2 * u64::from(per_socket);

            let started = Instant::now();
            let state = observe(&netns);
            let took = started.elapsed();
            eprintln!("dumped {} entries in {took:?}", state.table_count);
            let udp: u64 = state
                .flows
                .iter()
                .filter(|f| f.protocol == "udp")
                .map(|f| f.count)
                .sum();
            assert_eq!(udp, entries);
            assert_eq!(state.flows.len() as u64, entries / 2);
            assert!(took < Duration::from_secs(10), "dump took {took:?}");

            let started = Instant::now();
            assert_eq!(
                conntrack::delete_flows(&netns, Protocol::Udp, 7).expect("delete"),
                2
            );
            eprintln!("deleted 2 of {entries} entries in {:?}", started.elapsed());
        })
        .expect("run in the namespace");
}
