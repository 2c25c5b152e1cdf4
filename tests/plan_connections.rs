//! The connection counts a plan shows for a host-mode upgrade, read from a
//! real kernel (issue 14): the old version's established connections on the
//! service's port and the next version's behind the redirect, counted from
//! the sockets (sock_diag) with 100k unrelated conntrack entries in the
//! table, and the same counts from conntrack, the fallback. Root and `nft`;
//! everything happens in a network namespace the test makes. The containers
//! are those of the `in-flight-drain` golden case (old and next running,
//! the redirect in place); the connections are real sockets.

mod support;

use std::io::ErrorKind;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use lessnat::backend::conntrack;
use lessnat::backend::nft::{apply_table, observe_ruleset, set_redirect};
use lessnat::desired::host_table::host_table;
use lessnat::model::{Observed, PortConnections, Redirect};
use lessnat::observe::drains::{draining, read_drains};
use lessnat::plan::{plan, render::render};
use lessnat::spec::{Protocol, Spec, load_bytes};
use lessnat::style::Style;
use support::{TestNetns, root_with};

const PORT: u16 = 8000;
const TEMP_PORT: u16 = 18000;

fn case(file: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/plans/in-flight-drain")
        .join(file);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Accepts one connection within a few seconds (a connection the redirect
/// failed to send here would otherwise hang the test).
fn accept(listener: &TcpListener) -> TcpStream {
    listener.set_nonblocking(true).expect("nonblocking");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match listener.accept() {
            Ok((stream, _)) => return stream,
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept on {:?}: {e}", listener.local_addr()),
        }
    }
}

/// `n` connections to `to`, accepted on `on`: (client, server) pairs.
fn connect(to: SocketAddr, on: &TcpListener, n: usize) -> Vec<(TcpStream, TcpStream)> {
    (0..n)
        .map(|_| {
            let client = TcpStream::connect(to).expect("connect");
            (client, accept(on))
        })
        .collect()
}

/// The plan's text for `observed`, and the numbers in its drain stages'
/// "(now N)": the old version's, then the next one's.
fn drain_counts(spec: &Spec, observed: &Observed) -> (String, Vec<String>) {
    let text = render(&plan(spec, &observed.node, observed), Style::Plain);
    let counts = text
        .match_indices("no established connections left (now ")
        .map(|(at, prefix)| {
            let rest = &text[at + prefix.len()..];
            rest[..rest.find(')').expect("closing parenthesis")].to_string()
        })
        .collect();
    (text, counts)
}

#[test]
fn a_plan_counts_exactly_both_versions_connections_among_100k_unrelated_entries() {
    if !root_with(
        "a_plan_counts_exactly_both_versions_connections_among_100k_unrelated_entries",
        &["nft"],
    ) {
        return;
    }
    let spec = load_bytes("spec.yaml", &case("spec.yaml")).expect("the case's spec");
    let mut observed: Observed =
        serde_json::from_slice(&case("observed.json")).expect("the case's observation");
    let ns = TestNetns::new("plan-conns");
    let netns = ns.netns();
    // lessnat's own table: it makes conntrack track and holds the redirect.
    apply_table(&netns, &host_table(&[])).expect("lessnat's table");
    netns
        .run(|| {
            support::conntrack::fill_unrelated(100_000);
            let old = TcpListener::bind(("127.0.0.1", PORT)).expect("bind the old version");
            let old6 = TcpListener::bind(("::1", PORT)).expect("bind the old version, IPv6");
            let next = TcpListener::bind(("127.0.0.1", TEMP_PORT)).expect("bind the next version");
            let to_port = SocketAddr::from(([127, 0, 0, 1], PORT));
            // The old version's: 3 over IPv4, 1 over IPv6.
            let mut open = connect(to_port, &old, 3);
            open.extend(connect(
                SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, PORT)),
                &old6,
                1,
            ));
            // Not established: closed (TIME_WAIT), and half-closed by the
            // client (the server's socket in CLOSE_WAIT).
            drop(connect(to_port, &old, 2));
            let half = connect(to_port, &old, 1);
            half[0].0.shutdown(Shutdown::Write).expect("half-close");
            let redirect = Redirect {
                protocol: Protocol::Tcp,
                port: PORT,
                temp_port: TEMP_PORT,
            };
            set_redirect(&netns, &redirect, true).expect("the redirect");
            // The next version's: dialled to the service's port, redirected.
            // (Their client sides are sockets in the namespace too, on
            // ephemeral ports: counted for neither version.)
            let mut redirected = connect(to_port, &next, 5);

            observed.nft = observe_ruleset(&netns).expect("nft").0;
            let drains = draining(&spec, &observed.node, &observed);
            assert_eq!(drains.local_ports, vec![PORT, TEMP_PORT]);

            let (state, sockets) = read_drains(&netns, &drains).expect("read");
            assert!(
                state.table_count >= 100_000,
                "the unrelated entries are there: {}",
                state.table_count
            );
            assert_eq!(
                sockets,
                Some(vec![
                    PortConnections {
                        port: PORT,
                        established: 4
                    },
                    PortConnections {
                        port: TEMP_PORT,
                        established: 5
                    },
                ]),
                "counted from the sockets"
            );
            observed.conntrack = state;
            observed.tcp_connections = sockets;
            let (text, counts) = drain_counts(&spec, &observed);
            assert_eq!(counts, ["4", "5"], "{text}");

            // The fallback, conntrack, counts the same connections.
            observed.conntrack = conntrack::observe(&netns, &drains.interests).expect("conntrack");
            observed.tcp_connections = None;
            let (text, counts) = drain_counts(&spec, &observed);
            assert_eq!(counts, ["4", "5"], "{text}");

            // Once they close, neither version has any.
            open.clear();
            redirected.clear();
            let (state, sockets) = read_drains(&netns, &drains).expect("read");
            observed.conntrack = state;
            observed.tcp_connections = sockets;
            let (text, counts) = drain_counts(&spec, &observed);
            assert_eq!(counts, ["0", "0"], "{text}");
            drop(half);
        })
        .expect("run in the namespace");
}
