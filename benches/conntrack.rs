//! Conntrack with a big table (issue 14): what a plan's read and a drain's
//! poll cost with 100k unrelated entries against an empty table (the plan's
//! read from the sockets, as lessnat does it, beside the kernel-filtered
//! conntrack dump it did before, the kernel's walk alone and the `conntrack`
//! command), what the socket read costs with many unrelated TIME_WAIT
//! sockets in another namespace (the kernel's TCP hash is shared), how soon
//! a drain sees the last old connection close, and how long the redirect
//! element takes to be written.
//!
//! Everything runs in network namespaces the benchmark creates (and always
//! deletes), as root; it needs `nft` and `conntrack`. `cargo bench --bench conntrack`.
//! Knobs: `LESSNAT_BENCH_CT_ENTRIES` (unrelated entries, default 100000),
//! `LESSNAT_BENCH_TW_SOCKETS` (unrelated TIME_WAIT sockets, default 100000),
//! `LESSNAT_BENCH_RUNS` (repetitions of each measurement, default 30).

#[path = "../tests/support/mod.rs"]
mod support;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use lessnat::backend::conntrack::{self, Interest};
use lessnat::backend::conntrack_watch::ConntrackWatch;
use lessnat::backend::nft::{apply_table, set_redirect};
use lessnat::desired::host_table::host_table;
use lessnat::model::{ConntrackState, Redirect};
use lessnat::netns::Netns;
use lessnat::observe::drains::{Drains, read_drains};
use lessnat::spec::Protocol;
use socket2::{Domain, SockAddr, Socket, Type};
use support::TestNetns;

/// The service's canonical port and the next version's temporary port.
const PORT: u16 = 8000;
const TEMP_PORT: u16 = 18000;
/// Open connections of the old version while the reads are timed.
const OPEN: usize = 10;
/// More interests than the backend reads with kernel filters: it dumps the
/// whole table once and filters it itself, as every read did before.
const WHOLE_TABLE: u16 = 40;

/// One way of reading what a drain or a plan counts: the service's open
/// connections it sees, when it counts them.
type Read<'a> = Box<dyn FnMut() -> Option<u64> + 'a>;

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` must not run it.
    if !std::env::args().any(|a| a == "--bench") {
        println!("conntrack benchmark: run it with `cargo bench --bench conntrack`");
        return;
    }
    if !support::root_with("bench conntrack", &["nft", "conntrack"]) {
        return;
    }
    let entries = env_number("LESSNAT_BENCH_CT_ENTRIES", 100_000);
    let time_wait = env_number("LESSNAT_BENCH_TW_SOCKETS", 100_000);
    let runs = env_number("LESSNAT_BENCH_RUNS", 30).max(2);
    let ns = TestNetns::new("bench-ct");
    // lessnat's own table: it makes conntrack track, and it is the table the
    // redirect goes into.
    apply_table(&ns.netns(), &host_table(&[])).expect("lessnat's table");
    // Where the unrelated TIME_WAIT sockets are made: nothing tracks there.
    let elsewhere = TestNetns::new("bench-tw");
    let netns = ns.netns();
    netns
        .run(|| run(&netns, &elsewhere.netns(), entries, time_wait, runs))
        .expect("run in the namespace");
}

fn run(netns: &Netns, elsewhere: &Netns, entries: usize, time_wait: usize, runs: usize) {
    let listener = TcpListener::bind(("127.0.0.1", PORT)).expect("bind the service port");
    let open = connect(&listener, OPEN);
    let plan = [Interest::ToPort {
        protocol: Protocol::Tcp,
        port: PORT,
        answered_from: None,
    }];
    let whole: Vec<Interest> = (0..WHOLE_TABLE)
        .map(|i| Interest::ToPort {
            protocol: Protocol::Tcp,
            port: PORT + i,
            answered_from: None,
        })
        .collect();
    // The unrelated entries are UDP: no TCP entry has this port.
    let nothing = [Interest::ToPort {
        protocol: Protocol::Tcp,
        port: 65_000,
        answered_from: None,
    }];
    let drain = [Interest::ToPort {
        protocol: Protocol::Tcp,
        port: PORT,
        answered_from: Some(PORT),
    }];
    // What a plan reads now: the sockets on both versions' ports.
    let sockets = Drains {
        interests: plan.to_vec(),
        local_ports: vec![PORT, TEMP_PORT],
    };

    let mut empty = Vec::new();
    let mut full = Vec::new();
    for (label, results) in [("empty", &mut empty), ("full", &mut full)] {
        if label == "full" {
            let filled = Instant::now();
            support::conntrack::fill_unrelated(entries);
            eprintln!(
                "filled {entries} unrelated entries in {:.0} ms",
                filled.elapsed().as_secs_f64() * 1000.0
            );
        }
        let mut watch = ConntrackWatch::open(netns, &drain).expect("watch");
        let table = conntrack::observe(netns, &[]).expect("sysctls").table_count;
        let reads: [(&str, Read<'_>); 7] = [
            (
                "plan: the sockets on both versions' ports (sock_diag, lessnat now)",
                Box::new(|| Some(socket_count(netns, &sockets))),
            ),
            (
                "plan before: the upgrading service's port (kernel-filtered conntrack dump)",
                Box::new(|| Some(open_count(&conntrack::observe(netns, &plan).expect("read")))),
            ),
            (
                "kernel walk alone: a kernel-filtered read that matches no entry",
                Box::new(|| {
                    let state = conntrack::observe(netns, &nothing).expect("read");
                    assert!(state.flows.is_empty(), "{state:?}");
                    Some(OPEN as u64)
                }),
            ),
            (
                "whole-table dump, filtered here (every read before)",
                Box::new(|| {
                    Some(open_count(
                        &conntrack::observe(netns, &whole).expect("read"),
                    ))
                }),
            ),
            (
                "drain poll: the watch's state (lookups by tuple)",
                Box::new(|| Some(open_count(&watch.state().expect("state")))),
            ),
            (
                "reference: `conntrack -L -p tcp --orig-port-dst 8000` (process)",
                Box::new(|| {
                    let listing =
                        conntrack_tool(&["-L", "-p", "tcp", "--orig-port-dst", &PORT.to_string()]);
                    Some(listing.matches("ESTABLISHED").count() as u64)
                }),
            ),
            (
                "reference: `conntrack -C` (process; the count only)",
                Box::new(|| {
                    conntrack_tool(&["-C"]);
                    None
                }),
            ),
        ];
        for (name, mut read) in reads {
            let mut times = Vec::new();
            for _ in 0..runs {
                let started = Instant::now();
                let count = read();
                times.push(started.elapsed());
                if let Some(count) = count {
                    assert_eq!(count, OPEN as u64, "{name}");
                }
            }
            results.push((name, table, median(&mut times)));
        }
    }
    println!("\nConntrack reads, median of {runs} (ms); {OPEN} open connections of the service");
    println!("| read | empty table | {entries} unrelated entries | extra | ratio |");
    println!("|---|---:|---:|---:|---:|");
    for ((name, empty_count, empty), (_, full_count, full)) in empty.iter().zip(&full) {
        println!(
            "| {name} | {} ({empty_count} entries) | {} ({full_count} entries) | {:+.2} | {:.2} |",
            ms(*empty),
            ms(*full),
            (full.as_secs_f64() - empty.as_secs_f64()) * 1000.0,
            full.as_secs_f64() / empty.as_secs_f64().max(1e-9),
        );
    }

    unrelated_time_wait(netns, elsewhere, time_wait, runs, &sockets, &plan, &full);
    drop(open);
    drain_end(netns, &listener, &drain, runs);
    redirect(netns, runs);
}

/// The plan's read, from the sockets and (before) from conntrack, once
/// `count` unrelated connections closed in another namespace left their
/// sockets in TIME_WAIT there: the kernel's hash of TCP sockets, which a
/// socket dump walks, is shared by all namespaces. `before` holds the
/// reads' medians without them (with the unrelated conntrack entries).
fn unrelated_time_wait(
    netns: &Netns,
    elsewhere: &Netns,
    count: usize,
    runs: usize,
    sockets: &Drains,
    plan: &[Interest],
    before: &[(&str, u64, Duration)],
) {
    let made = Instant::now();
    let (in_time_wait, tracked) = elsewhere
        .run(|| {
            let sockets = time_wait_sockets(count);
            let tracked = conntrack::observe(elsewhere, &[]).map_or(0, |s| s.table_count);
            (sockets, tracked)
        })
        .expect("run in the other namespace");
    let made = made.elapsed();
    eprintln!(
        "{in_time_wait} TIME_WAIT sockets in another namespace in {:.0} ms \
         (its conntrack table: {tracked} entries)",
        made.as_secs_f64() * 1000.0
    );
    let reads: [Read<'_>; 2] = [
        Box::new(|| Some(socket_count(netns, sockets))),
        Box::new(|| Some(open_count(&conntrack::observe(netns, plan).expect("read")))),
    ];
    println!(
        "\nThe plan's read with {in_time_wait} unrelated TIME_WAIT sockets in another \
         namespace, median of {runs} (ms); the unrelated conntrack entries are still there"
    );
    println!("| read | without them | with them | extra | ratio |");
    println!("|---|---:|---:|---:|---:|");
    for ((name, _, without), mut read) in before.iter().zip(reads) {
        let mut times = Vec::new();
        for _ in 0..runs {
            let started = Instant::now();
            assert_eq!(read(), Some(OPEN as u64), "{name}");
            times.push(started.elapsed());
        }
        let with = median(&mut times);
        println!(
            "| {name} | {} | {} | {:+.2} | {:.2} |",
            ms(*without),
            ms(with),
            (with.as_secs_f64() - without.as_secs_f64()) * 1000.0,
            with.as_secs_f64() / without.as_secs_f64().max(1e-9),
        );
    }
    assert!(
        made < Duration::from_secs(50),
        "the TIME_WAIT sockets (60 s) may have started to expire while they were made"
    );
}

/// Opens and closes `count` TCP connections on loopback in the calling
/// thread's namespace, the client closing first, so each leaves its socket
/// in TIME_WAIT (for 60 s); returns how many the namespace has. Each client
/// binds a source address and port of its own: a connection that let the
/// kernel pick its port would search past every port already in TIME_WAIT
/// towards the same server (minutes for 100k).
fn time_wait_sockets(count: usize) -> u64 {
    /// Source ports per source address (10000 and up).
    const PORTS: usize = 50_000;
    // None of them dropped for being one too many.
    std::fs::write("/proc/sys/net/ipv4/tcp_max_tw_buckets", "1000000").expect("max tw");
    let listener = TcpListener::bind(("127.0.0.1", 20_000)).expect("bind");
    let server = SockAddr::from(listener.local_addr().expect("address"));
    for i in 0..count {
        let host = u8::try_from(2 + i / PORTS).expect("a source address");
        let port = u16::try_from(10_000 + i % PORTS).expect("a source port");
        let source = SocketAddr::from(([127, 0, 0, host], port));
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        socket.bind(&source.into()).expect("bind the client");
        socket.connect(&server).expect("connect");
        let client = TcpStream::from(socket);
        let (server, _) = listener.accept().expect("accept");
        drop(client);
        drop(server);
    }
    // This thread's namespace: /proc/net is the process's (the main thread's).
    let sockstat = std::fs::read_to_string("/proc/thread-self/net/sockstat").expect("sockstat");
    sockstat
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.strip_prefix("TCP:")?.split_whitespace().collect();
            let at = fields.iter().position(|f| *f == "tw")?;
            fields.get(at + 1)?.parse().ok()
        })
        .expect("the TIME_WAIT count in /proc/net/sockstat")
}

/// The old version's established connections as a plan counts them now:
/// from the sockets on its port (the read also counts the temporary port's,
/// and reads the table's fill level).
fn socket_count(netns: &Netns, drains: &Drains) -> u64 {
    let (_, sockets) = read_drains(netns, drains).expect("read");
    let sockets = sockets.expect("sock_diag");
    sockets
        .iter()
        .find(|c| c.port == PORT)
        .map_or(0, |c| c.established)
}

/// From the moment the last old connection is closed to the moment a drain
/// counting with a watch sees none left; for connections older than the
/// watch (no events: the watch's lookups) and newer (events).
fn drain_end(netns: &Netns, listener: &TcpListener, drain: &[Interest], runs: usize) {
    println!("\nDrain end detection: last old connection closed → drain sees 0 (ms)");
    println!("| connections | p50 | p99 | max | runs |");
    println!("|---|---:|---:|---:|---:|");
    for older in [true, false] {
        let mut times = Vec::new();
        for _ in 0..runs {
            let mut open = Vec::new();
            if older {
                open = connect(listener, 3);
            }
            let mut watch = ConntrackWatch::open(netns, drain).expect("watch");
            if !older {
                open = connect(listener, 3);
            }
            assert_eq!(open_count(&watch.state().expect("state")), 3);
            // Some idle time, as in a real drain.
            std::thread::sleep(Duration::from_millis(30));
            open.clear();
            let closed = Instant::now();
            loop {
                watch.wait(Duration::from_millis(500)).expect("wait");
                if open_count(&watch.state().expect("state")) == 0 {
                    break;
                }
            }
            times.push(closed.elapsed());
        }
        times.sort();
        println!(
            "| {} | {} | {} | {} | {runs} |",
            if older {
                "older than the drain (no events: lookups every 20 ms)"
            } else {
                "newer than the drain (conntrack events)"
            },
            ms(percentile(&times, 50.0)),
            ms(percentile(&times, 99.0)),
            ms(times.last().copied().unwrap_or_default()),
        );
    }
}

/// The redirect element written, as the redirect stage writes it once the
/// next version passed its health check.
fn redirect(netns: &Netns, runs: usize) {
    let element = Redirect {
        protocol: Protocol::Tcp,
        port: PORT,
        temp_port: TEMP_PORT,
    };
    let mut times = Vec::new();
    for _ in 0..runs {
        let started = Instant::now();
        set_redirect(netns, &element, true).expect("redirect");
        times.push(started.elapsed());
        set_redirect(netns, &element, false).expect("unredirect");
    }
    times.sort();
    println!(
        "\nRedirect element written (nft::set_redirect: one nf_tables netlink batch), ms; \
         end to end from the probe: `cargo bench --bench upgrade`"
    );
    println!("| p50 | p99 | max | runs |");
    println!("|---:|---:|---:|---:|");
    println!(
        "| {} | {} | {} | {runs} |",
        ms(percentile(&times, 50.0)),
        ms(percentile(&times, 99.0)),
        ms(times.last().copied().unwrap_or_default())
    );
}

/// Runs the `conntrack` command in the calling thread's namespace; its
/// standard output.
fn conntrack_tool(args: &[&str]) -> String {
    let output = std::process::Command::new("conntrack")
        .args(args)
        .output()
        .expect("run conntrack");
    assert!(output.status.success(), "conntrack {args:?} failed");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn connect(listener: &TcpListener, n: usize) -> Vec<(TcpStream, TcpStream)> {
    (0..n)
        .map(|_| {
            let client = TcpStream::connect(("127.0.0.1", PORT)).expect("connect");
            let (server, _) = listener.accept().expect("accept");
            (client, server)
        })
        .collect()
}

/// Open connections to the service answered by it, as a drain counts them.
fn open_count(state: &ConntrackState) -> u64 {
    state
        .flows
        .iter()
        .filter(|f| f.protocol == "tcp" && f.orig_dport == PORT && f.reply_sport == PORT)
        .filter(|f| ["ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT"].contains(&f.state.as_str()))
        .map(|f| f.count)
        .sum()
}

fn median(times: &mut [Duration]) -> Duration {
    times.sort();
    times[times.len() / 2]
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}
