//! The conntrack backend against a real kernel, inside throwaway network
//! namespaces: loopback traffic made by the test is counted by protocol, ports
//! and state, and UDP flows move with lessnat's redirect: only misplaced
//! entries are deleted, and no client's source port is ever rewritten.

mod support;

use std::net::{TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use lessnat::backend::conntrack::{self, Interest, Settled, UdpPort};
use lessnat::backend::conntrack_watch::{ConntrackWatch, Wake};
use lessnat::backend::nft::{apply_table, set_redirect};
use lessnat::desired::host_table::host_table;
use lessnat::model::{ConntrackState, FlowCount, Redirect};
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

/// The entries of `ports` (TCP and UDP), as the kernel filters them.
fn observe(netns: &Netns, ports: &[u16]) -> ConntrackState {
    let interests: Vec<Interest> = ports
        .iter()
        .flat_map(|&port| {
            [Protocol::Tcp, Protocol::Udp].map(|protocol| Interest::ToPort {
                protocol,
                port,
                answered_from: None,
            })
        })
        .collect();
    let state = conntrack::observe(netns, &interests).expect("observe conntrack");
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
            let state = observe(&netns, &[8000]);
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
                flows_to(&observe(&netns, &[8000]), "tcp", 8000),
                vec![flow("tcp", 8000, 8000, "ESTABLISHED", 8)]
            );

            // Closed connections leave ESTABLISHED (for TIME_WAIT and the like).
            for (client, server) in open {
                drop(client);
                drop(server);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            let closed = loop {
                let flows = flows_to(&observe(&netns, &[8000]), "tcp", 8000);
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
            let state = observe(&netns, &[8000, 18000]);
            assert_eq!(
                flows_to(&state, "tcp", 8000),
                vec![flow("tcp", 8000, 18000, "ESTABLISHED", 2)]
            );
            assert_eq!(flows_to(&state, "tcp", 18000), vec![]);
        })
        .expect("run in the namespace");
}

/// The service port and temporary port of the UDP tests.
const PORT: u16 = 5353;
const TEMP_PORT: u16 = 15353;

/// A namespace with lessnat's own table (no redirect yet): it makes conntrack
/// track, and its redirect rules are the ones an upgrade uses.
fn lessnat_netns(tag: &str) -> TestNetns {
    let ns = TestNetns::new(tag);
    apply_table(&ns.netns(), &host_table(&[])).expect("lessnat's table");
    ns
}

fn udp_redirect(present: bool, netns: &Netns) {
    let redirect = Redirect {
        protocol: Protocol::Udp,
        port: PORT,
        temp_port: TEMP_PORT,
    };
    set_redirect(netns, &redirect, present).expect("set the redirect");
}

/// Settles the service's UDP flows, redirected to the temporary port or not;
/// they must settle (no misplaced entry coming back). Returns how many
/// entries were deleted.
fn settle(netns: &Netns, redirected: bool) -> u64 {
    let port = UdpPort {
        port: PORT,
        temp_port: Some(TEMP_PORT),
        redirected_to: redirected.then_some(TEMP_PORT),
    };
    let settled = conntrack::settle_udp_flows(netns, &[port]).expect("settle");
    assert!(settled.quiet, "{settled:?}");
    settled.deleted
}

fn bind_udp(address: &str) -> UdpSocket {
    let socket = UdpSocket::bind(address).unwrap_or_else(|e| panic!("bind {address}: {e}"));
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    socket
}

/// A client connected to `server`'s port on its loopback address.
fn client_of(server: &UdpSocket) -> UdpSocket {
    let to = server.local_addr().expect("server address");
    let local = if to.is_ipv4() {
        "127.0.0.1:0"
    } else {
        "[::1]:0"
    };
    let client = bind_udp(local);
    client.connect((to.ip(), PORT)).expect("connect");
    client
}

/// `client` asks; `server` must receive it from the client's own address
/// (no source port rewritten) and answers; the client gets the answer.
fn ask(client: &UdpSocket, server: &UdpSocket) {
    client.send(b"q").expect("send");
    let mut buf = [0u8; 64];
    let (_, from) = server.recv_from(&mut buf).expect("the server receives");
    assert_eq!(
        from,
        client.local_addr().expect("client address"),
        "the server must see the client's own address and port"
    );
    server.send_to(b"a", from).expect("answer");
    client.recv(&mut buf).expect("the client gets the answer");
}

/// UDP entries with a NAT status (source or destination rewritten), as the
/// `conntrack` tool lists them.
fn nat_entries(ns: &TestNetns) -> String {
    let output = ns.try_exec("conntrack", &["-L", "-p", "udp", "--any-nat"]);
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn udp_flows_move_with_the_redirect_and_keep_their_source_port() {
    if !root_with(
        "udp_flows_move_with_the_redirect_and_keep_their_source_port",
        &["nft", "conntrack"],
    ) {
        return;
    }
    let ns = lessnat_netns("ct-udp");
    let netns = ns.netns();
    netns
        .run(|| {
            let primary = [bind_udp("127.0.0.1:5353"), bind_udp("[::1]:5353")];
            let next = [bind_udp("127.0.0.1:15353"), bind_udp("[::1]:15353")];
            // Three IPv4 clients, two IPv6 ones.
            let clients: Vec<(UdpSocket, usize)> = [0, 0, 0, 1, 1]
                .into_iter()
                .map(|family| (client_of(&primary[family]), family))
                .collect();
            let other_server = bind_udp("127.0.0.1:5354");
            let other = bind_udp("127.0.0.1:0");
            other.connect("127.0.0.1:5354").expect("connect");
            // A TCP flow on the same port number is not UDP's to delete.
            let tcp = TcpListener::bind("127.0.0.1:5353").expect("bind tcp 5353");
            let _open = connect(&tcp, "127.0.0.1:5353", 1);

            for (client, family) in &clients {
                ask(client, &primary[*family]);
            }
            ask(&other, &other_server);
            let state = observe(&netns, &[PORT, 5354]);
            assert_eq!(
                flows_to(&state, "udp", PORT),
                vec![flow("udp", PORT, PORT, "", 5)]
            );
            assert_eq!(
                settle(&netns, false),
                0,
                "flows that go where they should are left alone"
            );

            // A late answer of a next version (an earlier upgrade rolled
            // back) opens an entry the other way round: from the temporary
            // port to a client.
            let (first, _) = &clients[0];
            next[0]
                .send_to(b"late", first.local_addr().expect("address"))
                .expect("late answer");

            udp_redirect(true, &netns);
            assert_eq!(
                settle(&netns, true),
                6,
                "the five flows to the primary and the late answer's entry"
            );
            for (client, family) in &clients {
                ask(client, &next[*family]);
            }
            ask(&other, &other_server);
            let state = observe(&netns, &[PORT, 5354]);
            assert_eq!(
                flows_to(&state, "udp", PORT),
                vec![flow("udp", PORT, TEMP_PORT, "", 5)]
            );
            assert_eq!(
                flows_to(&state, "tcp", PORT),
                vec![flow("tcp", PORT, PORT, "ESTABLISHED", 1)]
            );
            assert_eq!(settle(&netns, true), 0, "redirected flows are left alone");
            let nat = nat_entries(&ns);
            assert_eq!(nat.lines().count(), 5, "only the redirects:\n{nat}");
            assert!(
                nat.lines()
                    .all(|l| l.contains(&format!("sport={TEMP_PORT} "))),
                "only redirects, no source port rewritten:\n{nat}"
            );

            udp_redirect(false, &netns);
            assert_eq!(settle(&netns, false), 5, "the five redirected flows");
            for (client, family) in &clients {
                ask(client, &primary[*family]);
            }
            let state = observe(&netns, &[PORT, 5354]);
            assert_eq!(
                flows_to(&state, "udp", PORT),
                vec![flow("udp", PORT, PORT, "", 5)]
            );
            assert_eq!(
                flows_to(&state, "udp", 5354),
                vec![flow("udp", 5354, 5354, "", 1)]
            );
            assert_eq!(
                flows_to(&state, "tcp", PORT),
                vec![flow("tcp", PORT, PORT, "ESTABLISHED", 1)]
            );
            assert_eq!(nat_entries(&ns), "", "no NAT left after the unredirect");
        })
        .expect("run in the namespace");
}

/// The kernel behaviour behind issue 11: while a redirect is in place, an
/// entry opened by the next version's answer to a client (after the flow's
/// entry was deleted) holds the reply tuple the client's next redirected
/// datagram needs, and the kernel resolves the clash by rewriting the
/// client's source port: the server sees another port than the client's.
/// `settle_udp_flows` deletes such entries (the test above).
#[test]
fn a_late_answer_of_the_next_version_makes_the_kernel_rewrite_the_client_port() {
    if !root_with(
        "a_late_answer_of_the_next_version_makes_the_kernel_rewrite_the_client_port",
        &["nft", "conntrack"],
    ) {
        return;
    }
    let ns = lessnat_netns("ct-clash");
    let netns = ns.netns();
    netns
        .run(|| {
            let next = bind_udp("127.0.0.1:15353");
            let client = bind_udp("127.0.0.1:0");
            client.connect(("127.0.0.1", PORT)).expect("connect");
            let port = client.local_addr().expect("address").port();
            next.send_to(b"late", ("127.0.0.1", port))
                .expect("late answer");
            udp_redirect(true, &netns);
            client.send(b"q").expect("send");
            let mut buf = [0u8; 64];
            let (_, from) = next.recv_from(&mut buf).expect("next receives");
            assert_ne!(
                from.port(),
                port,
                "the kernel rewrote the source port of the redirected datagram"
            );
            let nat = ns.try_exec("conntrack", &["-L", "-p", "udp", "--src-nat"]);
            let nat = String::from_utf8_lossy(&nat.stdout).into_owned();
            assert!(
                nat.contains(&format!("sport={port} dport={PORT} "))
                    && nat.contains(&format!("dport={} ", from.port())),
                "conntrack lists the rewrite as source NAT:\n{nat}"
            );
        })
        .expect("run in the namespace");
}

#[test]
fn a_large_table_is_read_quickly() {
    if !root_with("a_large_table_is_read_quickly", &["nft"]) {
        return;
    }
    let ns = tracking_netns("ct-many");
    let netns = ns.netns();
    netns
        .run(|| {
            // Stay well below the table limit, which is smaller on small machines.
            let limit = observe(&netns, &[]).table_max;
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
            let state = observe(&netns, &[7, 9]);
            let took = started.elapsed();
            eprintln!("read 2 ports of {} entries in {took:?}", state.table_count);
            assert!(state.table_count >= entries, "{state:?}");
            assert_eq!(
                state.flows,
                vec![flow("udp", 7, 7, "", 2), flow("udp", 9, 9, "", 2)],
                "exactly the entries of the ports asked for"
            );
            assert!(took < Duration::from_secs(10), "read took {took:?}");

            // As if port 7 were redirected to 8: both flows are misplaced.
            let started = Instant::now();
            let moved = [UdpPort {
                port: 7,
                temp_port: Some(8),
                redirected_to: Some(8),
            }];
            assert_eq!(
                conntrack::settle_udp_flows(&netns, &moved).expect("settle"),
                Settled {
                    deleted: 2,
                    quiet: true
                }
            );
            eprintln!(
                "moved 2 of {entries} entries (and looked until quiet) in {:?}",
                started.elapsed()
            );
        })
        .expect("run in the namespace");
}

/// The old version's open connections to port 8000 (answered from 8000), as
/// a drain counts them.
fn open_to_8000(state: &ConntrackState) -> u64 {
    state
        .flows
        .iter()
        .filter(|f| f.protocol == "tcp" && f.orig_dport == 8000 && f.reply_sport == 8000)
        .filter(|f| ["ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT"].contains(&f.state.as_str()))
        .map(|f| f.count)
        .sum()
}

const OLD_VERSION: [Interest; 1] = [Interest::ToPort {
    protocol: Protocol::Tcp,
    port: 8000,
    answered_from: Some(8000),
}];

/// Waits on `watch` until the drain count is `want` (at most 20 wakes of up
/// to 500 ms: a drain's poll); returns how the first wake came.
fn wait_for(watch: &mut ConntrackWatch, want: u64) -> Wake {
    let mut first = None;
    for _ in 0..20 {
        let wake = watch.wait(Duration::from_millis(500)).expect("wait");
        first.get_or_insert(wake);
        if open_to_8000(&watch.state().expect("state")) == want {
            return first.unwrap_or(wake);
        }
    }
    panic!("the count never reached {want}");
}

#[test]
fn a_drain_counts_exactly_its_connections_among_100k_unrelated_entries() {
    if !root_with(
        "a_drain_counts_exactly_its_connections_among_100k_unrelated_entries",
        &["nft"],
    ) {
        return;
    }
    let ns = tracking_netns("ct-drain");
    let netns = ns.netns();
    netns
        .run(|| {
            support::conntrack::fill_unrelated(100_000);
            let old = TcpListener::bind("127.0.0.1:8000").expect("bind 8000");
            let other = TcpListener::bind("127.0.0.1:8001").expect("bind 8001");
            let mut open = connect(&old, "127.0.0.1:8000", 5);
            let _others = connect(&other, "127.0.0.1:8001", 3);
            // Closed before the drain: TIME_WAIT, not counted.
            drop(connect(&old, "127.0.0.1:8000", 2));

            let mut watch = ConntrackWatch::open(&netns, &OLD_VERSION).expect("watch");
            let state = watch.state().expect("state");
            assert_eq!(open_to_8000(&state), 5, "{state:?}");
            assert!(
                observe(&netns, &[]).table_count >= 100_000,
                "the unrelated entries are there"
            );

            // These connections predate the watch: no event tells of their
            // end (nf_conntrack_events=2), the watch's lookups do.
            open.truncate(3);
            assert_eq!(wait_for(&mut watch, 3), Wake::Seen);
            open.clear();
            wait_for(&mut watch, 0);
            assert_eq!(
                watch.state().expect("state").flows,
                vec![],
                "nothing live is left"
            );
        })
        .expect("run in the namespace");
}

#[test]
fn connections_newer_than_the_watch_end_it_by_their_events() {
    if !root_with(
        "connections_newer_than_the_watch_end_it_by_their_events",
        &["nft"],
    ) {
        return;
    }
    let ns = tracking_netns("ct-events");
    let netns = ns.netns();
    netns
        .run(|| {
            let old = TcpListener::bind("127.0.0.1:8000").expect("bind 8000");
            let mut watch = ConntrackWatch::open(&netns, &OLD_VERSION).expect("watch");
            // They came while the watch listened: the kernel sends their events.
            let mut open = connect(&old, "127.0.0.1:8000", 2);
            assert_eq!(wait_for(&mut watch, 2), Wake::Event);
            open.pop();
            assert_eq!(wait_for(&mut watch, 1), Wake::Event);
            open.clear();
            assert_eq!(
                wait_for(&mut watch, 0),
                Wake::Event,
                "the last connection's close ends the drain"
            );
            assert_eq!(watch.resyncs(), 0);
        })
        .expect("run in the namespace");
}

#[test]
fn lost_events_make_the_watch_read_the_table_again() {
    if !root_with("lost_events_make_the_watch_read_the_table_again", &["nft"]) {
        return;
    }
    let ns = tracking_netns("ct-enobufs");
    let netns = ns.netns();
    netns
        .run(|| {
            let old = TcpListener::bind("127.0.0.1:8000").expect("bind 8000");
            // The smallest buffer the kernel allows: a few events fill it.
            let mut watch =
                ConntrackWatch::with_receive_buffer(&netns, &OLD_VERSION, 1).expect("watch");
            let mut open = connect(&old, "127.0.0.1:8000", 4);
            // A burst of events about other entries overflows it, and the
            // close of one connection is lost with them.
            support::conntrack::fill_unrelated(5_000);
            open.pop();
            assert_eq!(
                watch.wait(Duration::from_secs(5)).expect("wait"),
                Wake::Lost
            );
            assert!(watch.resyncs() >= 1);
            assert_eq!(open_to_8000(&watch.state().expect("state")), 3);
            open.clear();
            wait_for(&mut watch, 0);
        })
        .expect("run in the namespace");
}

#[test]
fn entries_deleted_by_someone_else_during_a_drain_leave_its_count() {
    if !root_with(
        "entries_deleted_by_someone_else_during_a_drain_leave_its_count",
        &["nft", "conntrack"],
    ) {
        return;
    }
    let ns = tracking_netns("ct-deleted");
    let netns = ns.netns();
    netns
        .run(|| {
            let old = TcpListener::bind("127.0.0.1:8000").expect("bind 8000");
            let before = connect(&old, "127.0.0.1:8000", 2);
            let mut watch = ConntrackWatch::open(&netns, &OLD_VERSION).expect("watch");
            let after = connect(&old, "127.0.0.1:8000", 2);
            assert_eq!(wait_for(&mut watch, 4), Wake::Event);
            // Someone deletes the service's entries (the connections stay
            // open but idle, so the kernel makes no new ones).
            ns.exec("conntrack", &["-D", "-p", "tcp", "--dport", "8000"]);
            wait_for(&mut watch, 0);
            drop((before, after));
        })
        .expect("run in the namespace");
}
