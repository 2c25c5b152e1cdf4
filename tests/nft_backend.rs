//! The nft backend against a real kernel, inside network namespaces the tests
//! create: what is applied is what is observed, redirects move new connections
//! only, and nothing outside `inet lessnat` is touched.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lessnat::backend::nft::{
    GuardTable, NftError, TableWatch, apply_table, delete_table, observe, set_redirect,
};
use lessnat::desired::host_table::{guard_table, host_table};
use lessnat::model::Redirect;
use lessnat::model::{NftState, NftTable};
use lessnat::netns::Netns;
use lessnat::ownership::PROBE_MARK;
use lessnat::spec::Protocol;
use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, SockaddrStorage, connect, setsockopt, socket, sockopt,
};
use support::TestNetns;

const TIMEOUT: Duration = Duration::from_secs(5);

fn tcp(port: u16, temp_port: u16) -> Redirect {
    Redirect {
        protocol: Protocol::Tcp,
        port,
        temp_port,
    }
}

fn two_redirects() -> Vec<Redirect> {
    vec![
        tcp(8000, 18000),
        Redirect {
            protocol: Protocol::Udp,
            port: 53,
            temp_port: 10053,
        },
    ]
}

fn only(table: NftTable) -> NftState {
    NftState {
        tables: vec![table],
    }
}

fn list_tables(ns: &TestNetns) -> String {
    String::from_utf8_lossy(&ns.exec("nft", &["list", "tables"]).stdout).into_owned()
}

/// A TCP server on `ip`:`port` in a namespace that answers each line `L` with
/// `PORT L`, so a client can tell which listener it reached.
struct Server {
    listener: TcpListener,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(netns: &Netns, ip: IpAddr, port: u16) -> Self {
        let listener = netns
            .run(|| TcpListener::bind((ip, port)))
            .expect("enter namespace")
            .expect("bind");
        let accepting = listener.try_clone().expect("clone listener");
        let thread = std::thread::spawn(move || {
            // Ends when the listener is shut down.
            for stream in accepting.incoming() {
                let Ok(stream) = stream else { return };
                std::thread::spawn(move || answer(stream, port));
            }
        });
        Server {
            listener,
            thread: Some(thread),
        }
    }
}

fn answer(stream: TcpStream, port: u16) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { return };
        if writeln!(writer, "{port} {line}").is_err() {
            return;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // shutdown() on a listening socket wakes a thread blocked in accept().
        let _ =
            nix::sys::socket::shutdown(self.listener.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A TCP connection to `ip`:`port` made inside the namespace, with the socket
/// mark `mark` when given (as lessnat's health probes set it).
fn connect_to(netns: &Netns, ip: IpAddr, port: u16, mark: Option<u32>) -> BufReader<TcpStream> {
    let family = match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    let stream = netns
        .run(|| {
            let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
            if let Some(mark) = mark {
                setsockopt(&fd, sockopt::Mark, &mark)?;
            }
            connect(
                fd.as_raw_fd(),
                &SockaddrStorage::from(SocketAddr::new(ip, port)),
            )?;
            Ok::<_, nix::Error>(TcpStream::from(fd))
        })
        .expect("enter namespace")
        .expect("connect");
    stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    BufReader::new(stream)
}

/// Sends `line` and returns the answer, e.g. `8000 hello`.
fn ask(connection: &mut BufReader<TcpStream>, line: &str) -> String {
    writeln!(connection.get_mut(), "{line}").expect("send");
    let mut answer = String::new();
    connection.read_line(&mut answer).expect("answer");
    answer.trim_end().to_string()
}

#[test]
fn applied_table_is_observed_exactly() {
    if !support::root_with("applied_table_is_observed_exactly", &["nft"]) {
        return;
    }
    let ns = TestNetns::new("nft-rt");
    let netns = ns.netns();

    let steady = host_table(&[]);
    apply_table(&netns, &steady).expect("apply steady state");
    assert_eq!(observe(&netns).expect("observe"), only(steady.clone()));

    let upgrading = host_table(&two_redirects());
    apply_table(&netns, &upgrading).expect("apply redirects");
    assert_eq!(observe(&netns).expect("observe"), only(upgrading.clone()));

    // Applying again changes nothing: plans built on this are idempotent.
    apply_table(&netns, &upgrading).expect("apply again");
    assert_eq!(observe(&netns).expect("observe"), only(upgrading));

    apply_table(&netns, &steady).expect("back to steady state");
    assert_eq!(observe(&netns).expect("observe"), only(steady));

    delete_table(&netns).expect("delete");
    assert_eq!(observe(&netns).expect("observe"), NftState::default());
    assert_eq!(list_tables(&ns), "");
}

/// The redirect-drain path on `ip`: new connections move to the temporary
/// port, probes and established flows do not, and unredirecting moves new
/// connections back while flows stay where they started.
fn redirect_moves_new_connections_only(tag: &str, ip: IpAddr) {
    let ns = TestNetns::new(tag);
    let netns = ns.netns();
    // The steady state is in place before any connection, so conntrack
    // tracks every flow from its first packet.
    apply_table(&netns, &host_table(&[])).expect("steady state");
    let _old = Server::start(&netns, ip, 8000);
    let _next = Server::start(&netns, ip, 18000);
    let connect = |port, mark| connect_to(&netns, ip, port, mark);

    let mut before = connect(8000, None);
    assert_eq!(ask(&mut before, "hello"), "8000 hello");

    apply_table(&netns, &host_table(&[tcp(8000, 18000)])).expect("redirect");
    let mut during = connect(8000, None);
    assert_eq!(ask(&mut during, "new"), "18000 new");
    let mut probe = connect(8000, Some(PROBE_MARK));
    assert_eq!(ask(&mut probe, "probe"), "8000 probe");
    assert_eq!(ask(&mut before, "still there"), "8000 still there");
    // Other ports pass untouched.
    let mut other = connect(18000, None);
    assert_eq!(ask(&mut other, "direct"), "18000 direct");

    apply_table(&netns, &host_table(&[])).expect("unredirect");
    let mut after = connect(8000, None);
    assert_eq!(ask(&mut after, "back"), "8000 back");
    // Flows keep the side they started on, both ways.
    assert_eq!(ask(&mut before, "old flow"), "8000 old flow");
    assert_eq!(ask(&mut during, "redirected flow"), "18000 redirected flow");

    for connection in [before, during, probe, other, after] {
        let _ = connection.get_ref().shutdown(Shutdown::Both);
    }
    delete_table(&netns).expect("delete");
}

#[test]
fn redirect_moves_new_ipv4_connections_only() {
    if !support::root_with("redirect_moves_new_ipv4_connections_only", &["nft"]) {
        return;
    }
    redirect_moves_new_connections_only("nft-redir4", IpAddr::V4(Ipv4Addr::LOCALHOST));
}

#[test]
fn redirect_moves_new_ipv6_connections_only() {
    if !support::root_with("redirect_moves_new_ipv6_connections_only", &["nft"]) {
        return;
    }
    redirect_moves_new_connections_only("nft-redir6", IpAddr::V6(Ipv6Addr::LOCALHOST));
}

#[test]
fn redirect_applies_to_clients_on_other_hosts() {
    if !support::root_with("redirect_applies_to_clients_on_other_hosts", &["nft"]) {
        return;
    }
    // Two namespaces joined by a veth pair: traffic from the client takes the
    // prerouting chain of the server's namespace.
    let server = TestNetns::new("nft-srv");
    let client = TestNetns::new("nft-cli");
    server.exec(
        "ip",
        &[
            "link",
            "add",
            "lnt0",
            "type",
            "veth",
            "peer",
            "name",
            "lnt1",
            "netns",
            &client.name,
        ],
    );
    server.exec("ip", &["addr", "add", "10.77.0.1/24", "dev", "lnt0"]);
    server.exec("ip", &["link", "set", "lnt0", "up"]);
    client.exec("ip", &["addr", "add", "10.77.0.2/24", "dev", "lnt1"]);
    client.exec("ip", &["link", "set", "lnt1", "up"]);

    let netns = server.netns();
    let address = IpAddr::V4(Ipv4Addr::new(10, 77, 0, 1));
    apply_table(&netns, &host_table(&[])).expect("steady state");
    let _old = Server::start(&netns, address, 8000);
    let _next = Server::start(&netns, address, 18000);
    let connect = || connect_to(&client.netns(), address, 8000, None);

    let mut before = connect();
    assert_eq!(ask(&mut before, "hello"), "8000 hello");
    apply_table(&netns, &host_table(&[tcp(8000, 18000)])).expect("redirect");
    assert_eq!(ask(&mut connect(), "new"), "18000 new");
    assert_eq!(ask(&mut before, "still there"), "8000 still there");
    apply_table(&netns, &host_table(&[])).expect("unredirect");
    assert_eq!(ask(&mut connect(), "back"), "8000 back");

    let _ = before.get_ref().shutdown(Shutdown::Both);
    delete_table(&netns).expect("delete");
}

#[test]
fn foreign_tables_are_untouched_and_unseen() {
    if !support::root_with("foreign_tables_are_untouched_and_unseen", &["nft"]) {
        return;
    }
    let ns = TestNetns::new("nft-foreign");
    let netns = ns.netns();
    ns.nft(
        "table ip foreign { chain c { type filter hook input priority 0; tcp dport 9 drop; }; }",
    );
    let foreign = || ns.exec("nft", &["list", "table", "ip", "foreign"]).stdout;
    let before = foreign();

    apply_table(&netns, &host_table(&two_redirects())).expect("apply");
    let observed = observe(&netns).expect("observe");
    assert_eq!(observed, only(host_table(&two_redirects())));
    assert_eq!(foreign(), before);

    delete_table(&netns).expect("delete");
    assert_eq!(observe(&netns).expect("observe"), NftState::default());
    assert_eq!(foreign(), before);
    assert_eq!(list_tables(&ns), "table ip foreign\n");

    // A foreign table is never written, even when asked to.
    let mut not_ours = host_table(&[]);
    not_ours.family = "ip".into();
    not_ours.name = "foreign".into();
    let error = apply_table(&netns, &not_ours).expect_err("not ours");
    assert!(matches!(error, NftError::NotOwned { .. }), "{error}");
    assert_eq!(foreign(), before);
}

#[test]
fn hand_edits_show_up_as_drift() {
    if !support::root_with("hand_edits_show_up_as_drift", &["nft"]) {
        return;
    }
    let ns = TestNetns::new("nft-drift");
    let netns = ns.netns();
    apply_table(&netns, &host_table(&[])).expect("apply");

    let listing = ns.exec("nft", &["-a", "list", "chain", "inet", "lessnat", "output"]);
    let listing = String::from_utf8_lossy(&listing.stdout);
    let handle = listing
        .lines()
        .find(|line| line.contains("lessnat redirect-udp"))
        .and_then(|line| line.rsplit("# handle ").next())
        .expect("the udp rule has a handle")
        .trim()
        .to_string();
    ns.exec(
        "nft",
        &[
            "delete", "rule", "inet", "lessnat", "output", "handle", &handle,
        ],
    );

    let observed = observe(&netns).expect("observe");
    assert_ne!(observed, only(host_table(&[])));
    let output = &observed.tables[0].chains[1];
    assert_eq!(output.name, "output");
    assert_eq!(output.rules, host_table(&[]).chains[1].rules[..1]);

    // Applying repairs it.
    apply_table(&netns, &host_table(&[])).expect("repair");
    assert_eq!(observe(&netns).expect("observe"), only(host_table(&[])));
    delete_table(&netns).expect("delete");
}

#[test]
fn deleting_an_absent_table_is_fine() {
    if !support::root_with("deleting_an_absent_table_is_fine", &["nft"]) {
        return;
    }
    let ns = TestNetns::new("nft-absent");
    let netns = ns.netns();
    delete_table(&netns).expect("delete absent table");
    delete_table(&netns).expect("and again");
    assert_eq!(observe(&netns).expect("observe"), NftState::default());
    assert_eq!(list_tables(&ns), "");
}

#[test]
fn a_refused_transaction_changes_nothing_and_says_why() {
    if !support::root_with(
        "a_refused_transaction_changes_nothing_and_says_why",
        &["nft"],
    ) {
        return;
    }
    let ns = TestNetns::new("nft-refused");
    let netns = ns.netns();
    let upgrading = host_table(&[tcp(8000, 18000)]);
    apply_table(&netns, &upgrading).expect("apply");

    // A rule that looks up a map the table does not have.
    let mut broken = host_table(&[]);
    broken.maps.pop();
    let error = apply_table(&netns, &broken).expect_err("nft refuses");
    let message = error.to_string();
    assert!(matches!(error, NftError::Failed { .. }), "{message}");
    assert!(
        message.contains("nft -j -f -") && message.contains("No such file or directory"),
        "the error names the command and carries nft's stderr: {message}"
    );
    assert_eq!(observe(&netns).expect("observe"), only(upgrading));
    delete_table(&netns).expect("delete");
}

#[test]
fn redirect_elements_are_added_and_removed_alone() {
    if !support::root_with("redirect_elements_are_added_and_removed_alone", &["nft"]) {
        return;
    }
    let ns = TestNetns::new("elem");
    let netns = ns.netns();
    apply_table(&netns, &host_table(&[])).expect("steady state");
    let web = tcp(8000, 18000);
    let dns = Redirect {
        protocol: Protocol::Udp,
        port: 53,
        temp_port: 10053,
    };
    let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let _old = Server::start(&netns, ip, 8000);
    let _next = Server::start(&netns, ip, 18000);
    assert_eq!(ask(&mut connect_to(&netns, ip, 8000, None), "a"), "8000 a");
    set_redirect(&netns, &web, true).expect("add tcp");
    assert_eq!(
        ask(&mut connect_to(&netns, ip, 8000, None), "b"),
        "18000 b",
        "a new connection lands on the temporary port at once"
    );
    set_redirect(&netns, &dns, true).expect("add udp");
    set_redirect(&netns, &web, true).expect("adding again is fine");
    assert_eq!(
        observe(&netns).expect("observe"),
        only(host_table(&[web, dns]))
    );
    // The port is redirected elsewhere already: refused, nothing changes.
    let error = set_redirect(&netns, &tcp(8000, 28000), true).expect_err("a clash");
    assert!(
        matches!(&error, NftError::Element { source, .. } if source.raw_os_error() == Some(17)),
        "{error:?}"
    );
    assert_eq!(
        observe(&netns).expect("observe"),
        only(host_table(&[web, dns]))
    );
    set_redirect(&netns, &web, false).expect("remove tcp");
    assert_eq!(observe(&netns).expect("observe"), only(host_table(&[dns])));
    assert_eq!(ask(&mut connect_to(&netns, ip, 8000, None), "c"), "8000 c");
    set_redirect(&netns, &web, false).expect("removing an absent element is fine");
    set_redirect(&netns, &dns, false).expect("remove udp");
    assert_eq!(observe(&netns).expect("observe"), only(host_table(&[])));
}

#[test]
fn notrack_rules_are_reported() {
    if !support::root_with("notrack_rules_are_reported", &["nft"]) {
        return;
    }
    let ns = TestNetns::new("notrack");
    let netns = ns.netns();
    assert!(
        lessnat::backend::nft::observe_ruleset(&netns)
            .expect("scan")
            .1
            .is_empty()
    );
    ns.nft("table inet raw { chain pre { type filter hook prerouting priority -300; udp dport 53 notrack; }; }");
    let (state, warnings) = lessnat::backend::nft::observe_ruleset(&netns).expect("scan");
    assert!(
        state.tables.is_empty(),
        "only lessnat's table is read: {state:?}"
    );
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].starts_with("chain inet raw pre has notrack rules"),
        "{warnings:?}"
    );
}

#[test]
fn routed_parts_are_observed_exactly() {
    use lessnat::desired::routed_table::{
        Dnat, LoadBalancerRules, WorkerRules, add_load_balancer, add_worker, down_in, spreads_in,
        versions_in,
    };
    if !support::root_with("routed_parts_are_observed_exactly", &["nft"]) {
        return;
    }
    let ns = TestNetns::new("nft-routed");
    let netns = ns.netns();
    let ip = |text: &str| -> IpAddr { text.parse().expect("address") };
    let (a, b) = (ip("10.20.1.5"), ip("10.20.2.5"));
    // IPv6 replicas (issue 15): their own maps, `ip6` matches and DNAT.
    let (a6, b6) = (ip("fd00:20:1::5"), ip("fd00:20:2::ffff:ffff:ffff:ffff"));
    // Every LB id: DSCP values with and without nft names must read back alike.
    for id in [1, 2, 8, 46, 63] {
        let mut table = host_table(&[tcp(8000, 18000)]);
        add_load_balancer(
            &mut table,
            &LoadBalancerRules {
                id,
                dnat: vec![
                    Dnat {
                        comment: "api/http".into(),
                        protocol: Protocol::Tcp,
                        vip: ip("203.0.113.10"),
                        vip_port: 80,
                        targets: vec![a, b],
                        port: 8080,
                    },
                    Dnat {
                        comment: "api/dns".into(),
                        protocol: Protocol::Udp,
                        vip: ip("203.0.113.10"),
                        vip_port: 53,
                        targets: vec![b],
                        port: 5353,
                    },
                    Dnat {
                        comment: "api/http/ipv6".into(),
                        protocol: Protocol::Tcp,
                        vip: ip("2001:db8:f::10"),
                        vip_port: 80,
                        targets: vec![a6, b6],
                        port: 8080,
                    },
                    Dnat {
                        comment: "api/dns/ipv6".into(),
                        protocol: Protocol::Udp,
                        vip: ip("2001:db8:f::10"),
                        vip_port: 53,
                        targets: vec![b6],
                        port: 5353,
                    },
                ],
                subnets: vec![
                    "10.20.1.0/24".parse().expect("subnet"),
                    "10.20.2.0/24".parse().expect("subnet"),
                    "fd00:20:1::/64".parse().expect("subnet"),
                ],
                versions: vec![(b, 0xdead_beef), (a, 7), (b6, 9), (a6, 8)],
                down: vec![(a, 1_796_000_000), (a6, 1_796_000_001)],
            },
        );
        add_worker(
            &mut table,
            &WorkerRules {
                subnets: vec![
                    "10.20.1.0/24".parse().expect("subnet"),
                    "fd00:20:1::/64".parse().expect("subnet"),
                ],
                lb_ids: vec![id, 2],
            },
        );
        apply_table(&netns, &table).expect("apply routed parts");
        let observed = observe(&netns).expect("observe");
        assert_eq!(observed, only(table.clone()), "LB id {id}");
        assert_eq!(
            versions_in(&observed.tables[0]),
            vec![(a, 7), (b, 0xdead_beef), (a6, 8), (b6, 9)]
        );
        assert_eq!(
            down_in(&observed.tables[0]),
            vec![(a, 1_796_000_000), (a6, 1_796_000_001)]
        );
        assert_eq!(
            spreads_in(&observed.tables[0]),
            vec![
                ("api/http".into(), vec![a, b]),
                ("api/dns".into(), vec![b]),
                ("api/http/ipv6".into(), vec![a6, b6]),
                ("api/dns/ipv6".into(), vec![b6])
            ]
        );
    }
    let text = String::from_utf8_lossy(&ns.exec("nft", &["list", "ruleset"]).stdout).into_owned();
    assert!(text.contains("numgen inc mod 2 map"), "{text}");
    let json =
        String::from_utf8_lossy(&ns.exec("nft", &["-j", "list", "ruleset"]).stdout).into_owned();
    assert!(json.contains("\"dnat\""), "{json}");
    assert!(
        !json.contains("\"masquerade\"") && !json.contains("\"snat\""),
        "{json}"
    );
}

/// Waits until lessnat's table in `netns` is `wanted` again; returns how long
/// that took (observations are a few milliseconds apart).
fn wait_restored(netns: &Netns, wanted: &NftTable, since: Instant) -> Duration {
    loop {
        if observe(netns).expect("observe") == only(wanted.clone()) {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < TIMEOUT,
            "lessnat's table was not restored within {TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_held_table_is_restored_after_flush_ruleset_and_delete_table() {
    if !support::root_with("a_held_table_is_restored_after_flush_ruleset", &["nft"]) {
        return;
    }
    let ns = TestNetns::new("nft-hold");
    let netns = ns.netns();
    let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let wanted = host_table(&[tcp(8000, 18000)]);
    apply_table(&netns, &wanted).expect("the table with the redirect");
    let _old = Server::start(&netns, ip, 8000);
    let _next = Server::start(&netns, ip, 18000);
    let watch = TableWatch::start(&netns, &wanted).expect("watch");
    assert_eq!(watch.reassert().expect("reassert"), 0, "nothing to restore");

    // What `systemctl restart nftables` does: every table goes.
    ns.exec("nft", &["flush", "ruleset"]);
    let took = wait_restored(&netns, &wanted, Instant::now());
    eprintln!(
        "restored {:.1} ms after flush ruleset",
        took.as_secs_f64() * 1000.0
    );
    assert_eq!(ask(&mut connect_to(&netns, ip, 8000, None), "a"), "18000 a");

    ns.exec("nft", &["delete", "table", "inet", "lessnat"]);
    let took = wait_restored(&netns, &wanted, Instant::now());
    eprintln!(
        "restored {:.1} ms after delete table",
        took.as_secs_f64() * 1000.0
    );

    // Only the element goes: the table is written whole again too.
    set_redirect(&netns, &tcp(8000, 18000), false).expect("remove the element");
    wait_restored(&netns, &wanted, Instant::now());
    assert_eq!(
        watch.reassert().expect("reassert"),
        3,
        "each restore counted once"
    );
    assert_eq!(ask(&mut connect_to(&netns, ip, 8000, None), "b"), "18000 b");

    // Once the hold is dropped, a deletion stays.
    drop(watch);
    ns.exec("nft", &["flush", "ruleset"]);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(list_tables(&ns), "");
}

#[test]
fn removing_a_redirect_that_is_gone_succeeds() {
    if !support::root_with("removing_a_redirect_that_is_gone_succeeds", &["nft"]) {
        return;
    }
    let ns = TestNetns::new("nft-gone");
    let netns = ns.netns();
    apply_table(&netns, &host_table(&[])).expect("steady state");
    set_redirect(&netns, &tcp(8000, 18000), false).expect("no such element");
    ns.exec("nft", &["flush", "ruleset"]);
    set_redirect(&netns, &tcp(8000, 18000), false).expect("no such table");
    assert_eq!(list_tables(&ns), "", "removing creates nothing");
    let error = set_redirect(&netns, &tcp(8000, 18000), true).expect_err("no table to add to");
    assert!(matches!(error, NftError::Element { .. }), "{error:?}");
}

#[test]
fn a_guard_table_survives_flush_ruleset_and_goes_with_its_holder() {
    if !support::root_with("a_guard_table_survives_flush_ruleset", &["nft"]) {
        return;
    }
    let ns = TestNetns::new("nft-guard");
    let netns = ns.netns();
    let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let table = host_table(&[tcp(8000, 18000)]);
    apply_table(&netns, &table).expect("the table with the redirect");
    let _old = Server::start(&netns, ip, 8000);
    let _next = Server::start(&netns, ip, 18000);
    let guard = GuardTable::hold(&netns, &guard_table(&table)).expect("guard");

    // lessnat's table goes; the guard stays, and redirects with no gap.
    ns.exec("nft", &["flush", "ruleset"]);
    assert_eq!(list_tables(&ns), "table inet lessnat_guard\n");
    assert_eq!(ask(&mut connect_to(&netns, ip, 8000, None), "a"), "18000 a");
    let refused = ns.try_exec("nft", &["delete", "table", "inet", "lessnat_guard"]);
    assert!(!refused.status.success(), "only its owner may delete it");
    assert_eq!(list_tables(&ns), "table inet lessnat_guard\n");

    drop(guard);
    assert_eq!(list_tables(&ns), "", "the guard goes with its nft process");
    assert_eq!(ask(&mut connect_to(&netns, ip, 8000, None), "b"), "8000 b");
}
