//! Upgrade benchmark (issue 4): what clients see while lessnat upgrades a
//! host-mode service, and what lessnat costs in the steady state.
//!
//! `cargo bench --bench upgrade` (as root, with Docker). One run measures:
//!
//! 1. the same load through a redirect-drain upgrade v1 → v2 and through the
//!    stop-start baseline, twice each: a pool of client threads opening a new
//!    connection per request (`Connection: close`) from ~2 s before to ~2 s
//!    after the upgrade; requests, failures by cause, p50/p99 latency before,
//!    during and after, the upgrade's duration, its stage timeline, and the
//!    time from "next healthy" to "redirect active";
//! 2. steady-state throughput of the lessnat-managed service against the same
//!    image started by hand (`docker run --network host`), alternating, with
//!    lessnat's redirect maps checked empty.
//!
//! It uses the host network namespace and lessnat's real table there, under
//! the machine-wide host-network lock the integration tests take. Traffic goes
//! to 127.0.0.1 only. Everything it creates is removed at the end, also on
//! failure: `lessnat destroy` for its node and the by-hand container by name.
//! The lessnat binary is the one `cargo bench` builds (`target/release/lessnat`,
//! bench profile = release). Results are printed as Markdown tables; they are
//! recorded in docs/benchmarks.md.
//!
//! First, without Docker (root and `nft` only; `upgrade/cutover.rs`): next
//! healthy → redirect live, end to end, the element written over netlink
//! and by an `nft` process alternately.
//!
//! Environment: `LESSNAT_BENCH_CUTOVER_TRIALS` (trials of each cutover
//! writer, default 100), `LESSNAT_BENCH_PARTS` (`cutover`, `upgrades` or
//! both, comma-separated; default both), `LESSNAT_BENCH_CLIENTS` (client threads, default 32),
//! `LESSNAT_BENCH_ROUNDS` (repetitions, default 2), `LESSNAT_BENCH_CT_TRACE=1`
//! (during each redirect-drain apply, read conntrack back to back with
//! lessnat's own reader and print what the drain stages count, and how long
//! each read takes; it costs CPU, so it is off by default).

#[path = "../tests/support/mod.rs"]
mod support;

#[path = "upgrade/cutover.rs"]
mod cutover;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// The lessnat binary `cargo bench` built next to this benchmark.
const LESSNAT: &str = env!("CARGO_BIN_EXE_lessnat");
/// The service's name in the spec.
const SERVICE: &str = "bench";
/// Every request: a new connection, closed by the server after the response.
const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
/// Connect, write and read timeout of one request: slower counts as failed.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// A client waits this long after a failed request before the next one (a
/// refused connect takes microseconds; without a pause 32 threads would spin
/// and starve lessnat and Docker of the 2 CPUs).
const BACKOFF: Duration = Duration::from_millis(10);
/// Load before and after an upgrade.
const MARGIN: Duration = Duration::from_secs(2);
/// Length of one steady-state measurement, after its warm-up.
const STEADY: Duration = Duration::from_secs(5);
/// A steady-state measurement is taken in slices this long, alternating
/// between the two services (ABBA order), so that load from other jobs on the
/// machine falls on both alike.
const SLICE: Duration = Duration::from_secs(1);
/// Warm-up of each steady-state slice, not counted.
const WARMUP: Duration = Duration::from_millis(200);

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` (or --all-targets)
    // runs this binary without it, and must not run the benchmark.
    if !std::env::args().any(|a| a == "--bench") {
        println!("upgrade benchmark: run it with `cargo bench --bench upgrade`");
        return;
    }
    let parts = std::env::var("LESSNAT_BENCH_PARTS").unwrap_or_else(|_| "cutover,upgrades".into());
    if parts.split(',').any(|p| p.trim() == "cutover")
        && support::root_with("bench cutover", &["nft"])
    {
        cutover::run(env_number("LESSNAT_BENCH_CUTOVER_TRIALS", 100));
    }
    let name = "bench upgrade";
    if !parts.split(',').any(|p| p.trim() == "upgrades")
        || !support::root_with(name, &["nft", "docker"])
        || !support::docker(name)
    {
        return;
    }
    let clients = env_number("LESSNAT_BENCH_CLIENTS", 32);
    let rounds = env_number("LESSNAT_BENCH_ROUNDS", 2);

    eprintln!("waiting for the host-network lock (/run/lock/lessnat-host-network.lock)...");
    let _host = support::host_network();
    let v1 = support::image::test_image("v1");
    let v2 = support::image::test_image("v2");
    let bench = Bench::new(v1, v2);
    eprintln!(
        "lessnat: {LESSNAT}\nnode {}, port {}, tempPort {}, by-hand port {}, {clients} client threads, state dir {}",
        bench.node,
        bench.port,
        bench.temp_port,
        bench.hand_port,
        bench.state_dir.display()
    );

    let mut report = String::new();
    let _ = writeln!(
        report,
        "lessnat `{LESSNAT}`; {} CPUs; {clients} client threads, one connection per request; kernel {}\n",
        thread::available_parallelism().map_or(0, |n| n.get()),
        kernel()
    );

    // 2. Steady state, first: lessnat-managed v1 against v1 by hand.
    bench.destroy();
    bench.install(Strategy::RedirectDrain);
    let maps = bench.redirect_maps();
    bench.start_by_hand();
    let mut steady = Vec::new();
    for round in 1..=rounds {
        eprintln!(
            "steady state {round}: lessnat and by hand, {} s each in {} s slices",
            STEADY.as_secs(),
            SLICE.as_secs()
        );
        let [lessnat, by_hand] = steady_state(&[bench.port, bench.hand_port], clients);
        steady.push((round, "lessnat", lessnat));
        steady.push((round, "by hand", by_hand));
    }
    let nat = nat_check(bench.port);
    let maps = format!("{maps}; after the measurements: {}", bench.redirect_maps());
    bench.destroy();
    eprintln!("steady state: by hand, lessnat's table removed");
    let [no_table] = steady_state(&[bench.hand_port], clients);
    bench.remove_by_hand();

    // 1. Upgrades.
    let mut upgrades = Vec::new();
    for round in 1..=rounds {
        for strategy in [Strategy::RedirectDrain, Strategy::StopStart] {
            eprintln!("upgrade {round}: {}", strategy.name());
            upgrades.push((round, bench.upgrade_run(strategy, clients)));
        }
    }

    report_upgrades(&mut report, &upgrades);
    report_steady(&mut report, &steady, &no_table, &maps, &nat);
    println!("{report}");
}

fn env_number(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------
// The service under test and lessnat.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Strategy {
    RedirectDrain,
    StopStart,
}

impl Strategy {
    fn name(self) -> &'static str {
        match self {
            Strategy::RedirectDrain => "redirect-drain",
            Strategy::StopStart => "stop-start",
        }
    }
}

/// One benchmark's node, ports, files and containers; removes them when dropped.
struct Bench {
    node: String,
    port: u16,
    temp_port: u16,
    hand_port: u16,
    hand_name: String,
    v1: String,
    v2: String,
    work: tempfile::TempDir,
    state_dir: PathBuf,
}

impl Bench {
    fn new(v1: String, v2: String) -> Bench {
        let pid = std::process::id();
        let work = tempfile::Builder::new()
            .prefix("lessnat-bench-")
            .tempdir()
            .expect("temp dir");
        let state_dir = work.path().join("state");
        let mut taken = Vec::new();
        let mut port = || {
            let p = quiet_port(&taken);
            taken.push(p);
            p
        };
        Bench {
            node: format!("bench-{pid}"),
            port: port(),
            temp_port: port(),
            hand_port: port(),
            hand_name: format!("lessnat-bench-byhand-{pid}"),
            v1,
            v2,
            work,
            state_dir,
        }
    }

    fn container(&self, suffix: &str) -> String {
        format!("lessnat-{SERVICE}.{}{suffix}", self.node)
    }

    fn spec(&self, image: &str, strategy: Strategy) -> PathBuf {
        let text = format!(
            r#"version: 1
nodes:
  - name: {node}
    address: 127.0.0.1
services:
  - name: {SERVICE}
    node: {node}
    image: {image}
    network: host
    command: ["--listen", "127.0.0.1:{{port}}"]
    ports:
      - {{ name: http, port: {port}, protocol: tcp, tempPort: {temp} }}
    health:
      http: {{ path: /healthz }}
      interval: 100ms
      timeout: 1s
      healthyAfter: 2
      startTimeout: 30s
    upgrade:
      strategy: {strategy}
      drainTimeout: 30s
      stopTimeout: 10s
"#,
            node = self.node,
            port = self.port,
            temp = self.temp_port,
            strategy = strategy.name(),
        );
        let version = if image == self.v1 { "v1" } else { "v2" };
        let path = self
            .work
            .path()
            .join(format!("{}-{version}.yaml", strategy.name()));
        std::fs::write(&path, text).expect("writing the spec");
        path
    }

    fn lessnat(&self, args: &[&str]) -> Command {
        let mut command = Command::new(LESSNAT);
        command
            .args(["--node", &self.node, "--no-color", "--state-dir"])
            .arg(&self.state_dir)
            .args(args);
        command
    }

    fn apply(&self, spec: &Path) -> Output {
        self.lessnat(&["apply", "--auto-approve", "-f"])
            .arg(spec)
            .output()
            .expect("running lessnat apply")
    }

    /// A fresh lessnat-managed v1.
    fn install(&self, strategy: Strategy) {
        let output = self.apply(&self.spec(&self.v1, strategy));
        check(&output, "lessnat apply (install v1)");
        wait_serving(self.port, 1);
    }

    fn destroy(&self) {
        let output = self
            .lessnat(&["destroy", "--auto-approve"])
            .output()
            .expect("running lessnat destroy");
        check(&output, "lessnat destroy");
    }

    fn start_by_hand(&self) {
        let _ = docker(&["rm", "-f", &self.hand_name]);
        let listen = format!("127.0.0.1:{}", self.hand_port);
        let output = docker(&[
            "run",
            "-d",
            "--network",
            "host",
            "--name",
            &self.hand_name,
            &self.v1,
            "--listen",
            &listen,
        ]);
        check(&output, "docker run (by hand)");
        wait_serving(self.hand_port, 1);
    }

    fn remove_by_hand(&self) {
        check(&docker(&["rm", "-f", &self.hand_name]), "docker rm -f");
    }

    /// The elements of lessnat's redirect maps, as `map: [P:T, ...]`.
    fn redirect_maps(&self) -> String {
        ["redirect_tcp", "redirect_udp"]
            .iter()
            .map(|map| {
                let output = Command::new("nft")
                    .args(["-j", "list", "map", "inet", "lessnat", map])
                    .output()
                    .expect("running nft");
                check(&output, "nft list map");
                let json: serde_json::Value =
                    serde_json::from_slice(&output.stdout).expect("nft -j output");
                let elements = json["nftables"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|o| o["map"]["elem"].as_array())
                    .flatten()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>();
                format!("{map}: [{}]", elements.join(", "))
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn containers(&self) -> String {
        let filter = format!("name=lessnat-{SERVICE}.{}", self.node);
        let output = docker(&["ps", "-a", "--filter", &filter, "--format", "{{.Names}}"]);
        String::from_utf8_lossy(&output.stdout)
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Installs v1 with `strategy`, then upgrades it to v2 under load.
    fn upgrade_run(&self, strategy: Strategy, clients: usize) -> UpgradeRun {
        self.destroy();
        self.install(strategy);
        let spec = self.spec(&self.v2, strategy);
        let load_average = load_average();
        let monitor = Monitor::start();
        let epoch = Instant::now();
        let load = Load::start(self.port, clients, epoch);
        thread::sleep(MARGIN);

        let prober =
            (strategy == Strategy::RedirectDrain).then(|| NextProber::start(self.temp_port, epoch));
        let trace = (strategy == Strategy::RedirectDrain
            && std::env::var_os("LESSNAT_BENCH_CT_TRACE").is_some_and(|v| v == "1"))
        .then(|| CtTrace::start(self.port, self.temp_port, epoch));
        let apply_start = epoch.elapsed();
        let mut child = self
            .lessnat(&["apply", "--auto-approve", "-f"])
            .arg(&spec)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning lessnat apply");
        let lines = timestamped_lines(child.stdout.take().expect("stdout"), epoch);
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .expect("stderr")
            .read_to_string(&mut stderr)
            .expect("reading stderr");
        let status = child.wait().expect("waiting for lessnat apply");
        let apply_end = epoch.elapsed();
        let lines = lines.join().expect("stdout reader");
        let next_serving = prober.and_then(NextProber::stop);
        let established = trace.map(CtTrace::stop).unwrap_or_default();

        thread::sleep(MARGIN);
        let samples = load.stop();
        let load_end = epoch.elapsed();
        let elements = monitor.stop(epoch);
        let maps_after = self.redirect_maps();
        let containers_after = self.containers();
        let serving_after = version_at(self.port);
        assert!(
            status.success(),
            "lessnat apply (upgrade to v2, {}) failed: {status}\n{}\n{stderr}",
            strategy.name(),
            lines
                .iter()
                .map(|(_, l)| l.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        );
        self.destroy();
        UpgradeRun {
            strategy,
            load_average,
            established,
            samples,
            apply_start,
            apply_end,
            load_end,
            lines,
            elements,
            next_serving,
            maps_after,
            containers_after,
            serving_after,
            port: self.port,
        }
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", &self.hand_name]);
        let destroyed = self
            .lessnat(&["destroy", "--auto-approve"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !destroyed {
            eprintln!("lessnat destroy failed; removing the containers by name");
        }
        // Whatever destroy left (it failed, or an upgrade stopped half way).
        for suffix in ["", ".next", ".prev"] {
            let _ = docker(&["rm", "-f", &self.container(suffix)]);
        }
    }
}

/// A free loopback TCP port below the ephemeral range (32768+), not in
/// `taken`. Outside the ephemeral range, so that the client's own source ports
/// never take the port a container is about to bind (`free_port()` hands out
/// ephemeral ports).
fn quiet_port(taken: &[u16]) -> u16 {
    let offset = std::process::id() % 10_000;
    (0..10_000u32)
        .filter_map(|i| u16::try_from(20_000 + (offset + i * 7) % 10_000).ok())
        .find(|p| {
            !taken.contains(p)
                && TcpListener::bind((Ipv4Addr::LOCALHOST, *p)).is_ok()
                && TcpListener::bind((Ipv4Addr::UNSPECIFIED, *p)).is_ok()
        })
        .unwrap_or_else(support::free_port)
}

fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .output()
        .expect("running docker")
}

fn check(output: &Output, what: &str) {
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Waits until `port` answers with version `v{version}`.
fn wait_serving(port: u16, version: u8) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while version_at(port) != Some(version) {
        assert!(
            Instant::now() < deadline,
            "127.0.0.1:{port} does not answer v{version}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// The version answering on `port`, if any.
fn version_at(port: u16) -> Option<u8> {
    request(addr(port), &mut Vec::new()).ok()
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// Lines of `stream` with the time each arrived, read on a thread.
fn timestamped_lines(
    stream: impl Read + Send + 'static,
    epoch: Instant,
) -> JoinHandle<Vec<(Duration, String)>> {
    thread::spawn(move || {
        BufReader::new(stream)
            .lines()
            .map_while(Result::ok)
            .map(|line| (epoch.elapsed(), line))
            .collect()
    })
}

/// `nft monitor elements`: netlink events of map elements, timestamped as
/// they arrive (nft flushes each event).
struct Monitor {
    child: Child,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
    reader: Option<JoinHandle<()>>,
}

impl Monitor {
    fn start() -> Monitor {
        let mut child = Command::new("nft")
            .args(["monitor", "elements"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning nft monitor");
        let stdout = child.stdout.take().expect("stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        let reader = thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock()
                    .expect("monitor lines")
                    .push((Instant::now(), line));
            }
        });
        // Let it subscribe before anything happens.
        thread::sleep(Duration::from_millis(300));
        Monitor {
            child,
            lines,
            reader: Some(reader),
        }
    }

    /// The events of lessnat's redirect maps, relative to `epoch`.
    fn stop(mut self, epoch: Instant) -> Vec<(Duration, String)> {
        self.end();
        let lines = self.lines.lock().expect("monitor lines");
        lines
            .iter()
            .filter(|(_, l)| l.contains("inet lessnat redirect_"))
            .map(|(t, l)| (t.saturating_duration_since(epoch), l.clone()))
            .collect()
    }

    fn end(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.end();
    }
}

/// Polls the next version's temporary port directly (it is not redirected)
/// until it answers: when the next version really started serving.
struct NextProber {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Option<Duration>>,
}

impl NextProber {
    fn start(port: u16, epoch: Instant) -> NextProber {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            let mut buf = Vec::new();
            while !flag.load(Ordering::SeqCst) {
                let started = epoch.elapsed();
                if request(addr(port), &mut buf) == Ok(2) {
                    return Some(started);
                }
                thread::sleep(Duration::from_millis(5));
            }
            None
        });
        NextProber { stop, thread }
    }

    fn stop(self) -> Option<Duration> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("prober")
    }
}

/// One reading of the conntrack table, as lessnat's drain stages read it.
#[derive(Debug, Clone, Copy)]
struct CtReading {
    /// When the dump started.
    at: Duration,
    /// How long the dump took.
    took: Duration,
    /// Established flows to the port answered from the port (the old version
    /// until the swap, the new primary after it).
    old: u64,
    /// Established flows to the port answered from the temporary port.
    next: u64,
    /// Entries in the whole table.
    table: u64,
}

/// Reads conntrack back to back (50 ms apart) with lessnat's own reader,
/// counting what the drain stages count.
struct CtTrace {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<CtReading>>,
}

impl CtTrace {
    fn start(port: u16, temp_port: u16, epoch: Instant) -> CtTrace {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            let netns = lessnat::netns::Netns::default();
            let mut series = Vec::new();
            while !flag.load(Ordering::SeqCst) {
                let at = epoch.elapsed();
                let port_of_service = [lessnat::backend::conntrack::Interest::ToPort {
                    protocol: lessnat::spec::Protocol::Tcp,
                    port,
                    answered_from: None,
                }];
                let Ok(state) = lessnat::backend::conntrack::observe(&netns, &port_of_service)
                else {
                    break;
                };
                let count = |reply: u16| {
                    state
                        .flows
                        .iter()
                        .filter(|f| {
                            f.protocol == "tcp"
                                && f.orig_dport == port
                                && f.reply_sport == reply
                                && f.state == "ESTABLISHED"
                        })
                        .map(|f| f.count)
                        .sum()
                };
                series.push(CtReading {
                    at,
                    took: epoch.elapsed() - at,
                    old: count(port),
                    next: count(temp_port),
                    table: state.table_count,
                });
                thread::sleep(Duration::from_millis(50));
            }
            series
        });
        CtTrace { stop, thread }
    }

    fn stop(self) -> Vec<CtReading> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("conntrack trace")
    }
}

// ---------------------------------------------------------------------------
// Load.

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Failure {
    /// Connecting failed.
    Connect(io::ErrorKind),
    /// Sending the request or reading the response failed.
    Exchange(io::ErrorKind),
    /// The connection closed without a response.
    Empty,
    /// A response other than 200.
    Status(u16),
}

impl Failure {
    fn describe(self) -> String {
        let kind = |k: io::ErrorKind| match k {
            io::ErrorKind::ConnectionRefused => "refused".to_string(),
            io::ErrorKind::ConnectionReset => "reset".to_string(),
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => "timeout".to_string(),
            other => format!("{other:?}"),
        };
        match self {
            Failure::Connect(k) => format!("connect {}", kind(k)),
            Failure::Exchange(k) => format!("request {}", kind(k)),
            Failure::Empty => "closed without response".to_string(),
            Failure::Status(s) => format!("status {s}"),
        }
    }
}

/// One request: when it started (since the run's epoch), how long it took,
/// and the version that answered or why it failed.
#[derive(Debug, Clone, Copy)]
struct Sample {
    start: Duration,
    latency: Duration,
    outcome: Result<u8, Failure>,
}

/// One HTTP request on a new connection; the answering version (`v2` → 2, 0
/// when unknown).
fn request(addr: SocketAddr, buf: &mut Vec<u8>) -> Result<u8, Failure> {
    let mut stream =
        TcpStream::connect_timeout(&addr, IO_TIMEOUT).map_err(|e| Failure::Connect(e.kind()))?;
    let exchange = |e: io::Error| Failure::Exchange(e.kind());
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .map_err(exchange)?;
    stream
        .set_write_timeout(Some(IO_TIMEOUT))
        .map_err(exchange)?;
    stream.write_all(REQUEST).map_err(exchange)?;
    buf.clear();
    stream.read_to_end(buf).map_err(exchange)?;
    if buf.is_empty() {
        return Err(Failure::Empty);
    }
    let status = buf
        .get(9..12)
        .and_then(|s| std::str::from_utf8(s).ok())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    if !buf.starts_with(b"HTTP/1.1 ") || status != 200 {
        return Err(Failure::Status(status));
    }
    let marker = b"\r\nX-Version: v";
    let version = buf
        .windows(marker.len())
        .position(|w| w == marker)
        .and_then(|i| buf.get(i + marker.len()))
        .map_or(0, |d| d.wrapping_sub(b'0'));
    Ok(version)
}

/// Client threads, each sending requests back to back until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Vec<Sample>>>,
}

impl Load {
    fn start(port: u16, clients: usize, epoch: Instant) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..clients)
            .map(|_| {
                let stop = Arc::clone(&stop);
                thread::spawn(move || {
                    let target = addr(port);
                    let mut samples = Vec::with_capacity(64 * 1024);
                    let mut buf = Vec::with_capacity(512);
                    while !stop.load(Ordering::Relaxed) {
                        let start = epoch.elapsed();
                        let outcome = request(target, &mut buf);
                        let latency = epoch.elapsed() - start;
                        samples.push(Sample {
                            start,
                            latency,
                            outcome,
                        });
                        if outcome.is_err() {
                            thread::sleep(BACKOFF);
                        }
                    }
                    samples
                })
            })
            .collect();
        Load { stop, threads }
    }

    fn stop(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::SeqCst);
        let mut all: Vec<Sample> = self
            .threads
            .into_iter()
            .flat_map(|t| t.join().expect("client thread"))
            .collect();
        all.sort_by_key(|s| s.start);
        all
    }
}

/// Requests, failures and latency of the samples that started in a window.
#[derive(Debug, Default)]
struct Stats {
    seconds: f64,
    ok: usize,
    failed: BTreeMap<Failure, usize>,
    versions: BTreeMap<u8, usize>,
    p50: Duration,
    p99: Duration,
    max: Duration,
    /// 1-minute load average when the measurement started.
    load: f64,
}

impl Stats {
    fn of(samples: &[Sample], from: Duration, to: Duration) -> Stats {
        let window = samples.iter().filter(|s| s.start >= from && s.start < to);
        Stats::over(window, (to - from).as_secs_f64())
    }

    fn over<'a>(samples: impl Iterator<Item = &'a Sample>, seconds: f64) -> Stats {
        let mut stats = Stats {
            seconds,
            ..Stats::default()
        };
        let mut latencies = Vec::new();
        for s in samples {
            match s.outcome {
                Ok(version) => {
                    stats.ok += 1;
                    *stats.versions.entry(version).or_default() += 1;
                    latencies.push(s.latency);
                }
                Err(failure) => *stats.failed.entry(failure).or_default() += 1,
            }
        }
        latencies.sort_unstable();
        stats.p50 = percentile(&latencies, 50.0);
        stats.p99 = percentile(&latencies, 99.0);
        stats.max = latencies.last().copied().unwrap_or_default();
        stats
    }

    fn failures(&self) -> usize {
        self.failed.values().sum()
    }

    fn requests(&self) -> usize {
        self.ok + self.failures()
    }

    fn rate(&self) -> f64 {
        self.ok as f64 / self.seconds
    }

    fn failure_text(&self) -> String {
        if self.failed.is_empty() {
            return "0".to_string();
        }
        let parts: Vec<String> = self
            .failed
            .iter()
            .map(|(f, n)| format!("{n} {}", f.describe()))
            .collect();
        format!("{} ({})", self.failures(), parts.join(", "))
    }

    fn version_text(&self) -> String {
        self.versions
            .iter()
            .map(|(v, n)| format!("v{v}: {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
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

/// Steady-state load on each of `ports`: STEADY each, in SLICEs taken in
/// ABBA order (A B, B A, A B...), each after a WARMUP that is not counted.
fn steady_state<const N: usize>(ports: &[u16; N], clients: usize) -> [Stats; N] {
    let load_average = load_average();
    let slices = (STEADY.as_millis() / SLICE.as_millis()) as usize;
    let mut samples: [Vec<Sample>; N] = std::array::from_fn(|_| Vec::new());
    for slice in 0..slices {
        for k in 0..N {
            let i = if slice % 2 == 0 { k } else { N - 1 - k };
            let epoch = Instant::now();
            let load = Load::start(ports[i], clients, epoch);
            thread::sleep(WARMUP + SLICE);
            let taken = load.stop();
            samples[i].extend(
                taken
                    .into_iter()
                    .filter(|s| s.start >= WARMUP && s.start < WARMUP + SLICE),
            );
        }
    }
    let seconds = (SLICE * slices as u32).as_secs_f64();
    samples.map(|s| Stats {
        load: load_average,
        ..Stats::over(s.iter(), seconds)
    })
}

/// The 1-minute load average.
fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Counts the conntrack entries of TCP flows to `port` (they stay for
/// minutes in TIME_WAIT) and those that were NATed: a reply source port other
/// than `port`. Needs the `conntrack` command.
fn nat_check(port: u16) -> String {
    let port_arg = port.to_string();
    let output = Command::new("conntrack")
        .args(["-L", "-p", "tcp", "--orig-port-dst", &port_arg])
        .output();
    let Some(output) = output.ok().filter(|o| o.status.success()) else {
        return "not checked (no `conntrack` command)".to_string();
    };
    let text = String::from_utf8_lossy(&output.stdout);
    let (mut total, mut natted) = (0, 0);
    for line in text.lines() {
        let sports: Vec<&str> = line
            .split_whitespace()
            .filter_map(|w| w.strip_prefix("sport="))
            .collect();
        if let [_, reply] = sports.as_slice() {
            total += 1;
            if *reply != port_arg {
                natted += 1;
            }
        }
    }
    format!("{total} flows, {natted} NATed (reply from a port other than {port})")
}

// ---------------------------------------------------------------------------
// Results.

struct UpgradeRun {
    strategy: Strategy,
    /// With `LESSNAT_BENCH_CT_TRACE=1`: established flows to the port, answered
    /// by the old version (reply from the port) and by the next one (from the
    /// temporary port).
    established: Vec<CtReading>,
    /// 1-minute load average when the run started.
    load_average: f64,
    samples: Vec<Sample>,
    apply_start: Duration,
    apply_end: Duration,
    load_end: Duration,
    /// lessnat apply's stdout, timestamped on arrival.
    lines: Vec<(Duration, String)>,
    /// `nft monitor` events of the redirect maps.
    elements: Vec<(Duration, String)>,
    /// When the next version first answered on its temporary port.
    next_serving: Option<Duration>,
    maps_after: String,
    containers_after: String,
    serving_after: Option<u8>,
    port: u16,
}

impl UpgradeRun {
    fn line_at(&self, needle: &str) -> Option<Duration> {
        self.lines
            .iter()
            .find(|(_, l)| l.contains(needle))
            .map(|(t, _)| *t)
    }

    fn element(&self, verb: &str) -> Option<Duration> {
        let needle = format!(
            "{verb} element inet lessnat redirect_tcp {{ {} :",
            self.port
        );
        self.elements
            .iter()
            .find(|(_, l)| l.starts_with(&needle))
            .map(|(t, _)| *t)
    }

    fn stage(&self, n: u32) -> Option<Duration> {
        self.line_at(&format!(": stage {n}/7 "))
    }

    /// The upgrade proper: from the first progress line about the service to
    /// the end of the apply.
    fn upgrade_span(&self) -> Option<(Duration, Duration)> {
        let first = self
            .lines
            .iter()
            .find(|(_, l)| l.starts_with(&format!("{SERVICE}: ")))
            .map(|(t, _)| *t)?;
        let last = self.line_at("Apply complete!").unwrap_or(self.apply_end);
        Some((first, last))
    }

    /// From the start of the first failed request to the end of the last one.
    fn outage(&self) -> Option<Duration> {
        let mut failed = self.samples.iter().filter(|s| s.outcome.is_err());
        let first = failed.next()?.start;
        let end = failed.map(|s| s.start + s.latency).max().unwrap_or(first);
        Some(end.saturating_sub(first))
    }

    /// The stage (progress line) that was current at `t`.
    fn stage_at(&self, t: Duration) -> String {
        let current = self
            .lines
            .iter()
            .rfind(|(at, l)| *at <= t && l.starts_with(&format!("{SERVICE}: ")));
        match current {
            Some((_, l)) => l.trim_start_matches(&format!("{SERVICE}: ")).to_string(),
            None if t < self.apply_start => "before the apply".to_string(),
            None => "apply: planning".to_string(),
        }
    }
}

fn rel(t: Duration, origin: Duration) -> String {
    let ms = t.as_secs_f64() * 1000.0 - origin.as_secs_f64() * 1000.0;
    format!("{ms:+.1}")
}

fn span(a: Option<Duration>, b: Option<Duration>) -> String {
    match (a, b) {
        (Some(a), Some(b)) => format!("{:.1}", (b.as_secs_f64() - a.as_secs_f64()) * 1000.0),
        _ => "n/a".to_string(),
    }
}

fn report_upgrades(out: &mut String, runs: &[(usize, UpgradeRun)]) {
    let _ = writeln!(out, "### Requests through an upgrade v1 → v2\n");
    let _ = writeln!(
        out,
        "Windows: *before* = load start → apply start (~{} s), *during* = `lessnat apply` running \
         (plan + upgrade), *after* = apply exit → load end (~{} s). Latency of successful requests, \
         by start time.\n",
        MARGIN.as_secs(),
        MARGIN.as_secs()
    );
    let _ = writeln!(
        out,
        "| run | strategy | requests | failed | outage (ms) | p50 / p99 before (ms) | p50 / p99 during (ms) | max during (ms) | p50 / p99 after (ms) | apply (s) | upgrade (s) | load |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (round, run) in runs {
        let all = Stats::of(&run.samples, Duration::ZERO, run.load_end);
        let before = Stats::of(&run.samples, Duration::ZERO, run.apply_start);
        let during = Stats::of(&run.samples, run.apply_start, run.apply_end);
        let after = Stats::of(&run.samples, run.apply_end, run.load_end);
        let upgrade = run.upgrade_span().map_or("n/a".to_string(), |(a, b)| {
            format!("{:.2}", (b - a).as_secs_f64())
        });
        let _ = writeln!(
            out,
            "| {round} | {} | {} | {} | {} | {} / {} | {} / {} | {} | {} / {} | {:.2} | {upgrade} | {:.1} |",
            run.strategy.name(),
            all.requests(),
            all.failure_text(),
            run.outage().map_or("none".to_string(), ms),
            ms(before.p50),
            ms(before.p99),
            ms(during.p50),
            ms(during.p99),
            ms(during.max),
            ms(after.p50),
            ms(after.p99),
            (run.apply_end - run.apply_start).as_secs_f64(),
            run.load_average,
        );
    }
    let _ = writeln!(
        out,
        "\n*outage* = start of the first failed request to the end of the last one; *apply* = the `lessnat apply` \
         process, spawn to exit; *upgrade* = its first progress line about the service to `Apply complete!`; \
         *load* = the machine's 1-minute load average when the run started.\n"
    );

    let _ = writeln!(out, "Responses by version and failures, per window:\n");
    let _ = writeln!(
        out,
        "| run | strategy | window | ok | by version | failed |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    for (round, run) in runs {
        for (window, from, to) in [
            ("before", Duration::ZERO, run.apply_start),
            ("during", run.apply_start, run.apply_end),
            ("after", run.apply_end, run.load_end),
        ] {
            let s = Stats::of(&run.samples, from, to);
            let _ = writeln!(
                out,
                "| {round} | {} | {window} | {} | {} | {} |",
                run.strategy.name(),
                s.ok,
                s.version_text(),
                s.failure_text()
            );
        }
    }

    let _ = writeln!(out, "\n### Failures in time\n");
    for (round, run) in runs {
        let failures: Vec<&Sample> = run.samples.iter().filter(|s| s.outcome.is_err()).collect();
        let ok = |v: u8| run.samples.iter().filter(move |s| s.outcome == Ok(v));
        let last_v1 = ok(1).map(|s| s.start + s.latency).max();
        let first_v2 = ok(2).map(|s| s.start).min();
        let _ = write!(out, "- run {round} {}: ", run.strategy.name());
        match (failures.first(), failures.last()) {
            (Some(first), Some(last)) => {
                let _ = writeln!(
                    out,
                    "{} failed requests, started from {} ms to {} ms after the apply started \
                     (first during \"{}\", last during \"{}\"); last v1 response ends at {} ms, \
                     first v2 request starts at {} ms",
                    failures.len(),
                    rel(first.start, run.apply_start),
                    rel(last.start, run.apply_start),
                    run.stage_at(first.start),
                    run.stage_at(last.start),
                    last_v1.map_or("n/a".into(), |t| rel(t, run.apply_start)),
                    first_v2.map_or("n/a".into(), |t| rel(t, run.apply_start)),
                );
            }
            _ => {
                let _ = writeln!(
                    out,
                    "no failed request; last v1 response ends at {} ms, first v2 request starts at {} ms after the apply started",
                    last_v1.map_or("n/a".into(), |t| rel(t, run.apply_start)),
                    first_v2.map_or("n/a".into(), |t| rel(t, run.apply_start)),
                );
            }
        }
        let _ = writeln!(
            out,
            "  - after the upgrade: serving v{}; redirect maps {}; containers: {}",
            run.serving_after.map_or("?".into(), |v| v.to_string()),
            run.maps_after,
            run.containers_after
        );
    }

    let _ = writeln!(out, "\n### Redirect-drain stage timeline\n");
    let _ = writeln!(
        out,
        "Milliseconds after `lessnat apply` was spawned at which each progress line reached the benchmark \
         (stdout is line-buffered; lines are timestamped by a reader thread as they arrive).\n"
    );
    let rd: Vec<&(usize, UpgradeRun)> = runs
        .iter()
        .filter(|(_, r)| r.strategy == Strategy::RedirectDrain)
        .collect();
    let _ = write!(out, "| stage line |");
    for (round, _) in &rd {
        let _ = write!(out, " run {round} |");
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "|---|{}", "---|".repeat(rd.len()));
    let names = [
        "start-next",
        "redirect",
        "drain",
        "swap",
        "unredirect",
        "drain-next",
        "finish",
    ];
    for (i, name) in names.iter().enumerate() {
        let _ = write!(out, "| stage {}/7 {name} |", i + 1);
        for (_, run) in &rd {
            let t = run.stage(i as u32 + 1);
            let _ = write!(
                out,
                " {} |",
                t.map_or("n/a".into(), |t| rel(t, run.apply_start))
            );
        }
        let _ = writeln!(out);
    }
    let _ = write!(out, "| Apply complete! |");
    for (_, run) in &rd {
        let t = run.line_at("Apply complete!");
        let _ = write!(
            out,
            " {} |",
            t.map_or("n/a".into(), |t| rel(t, run.apply_start))
        );
    }
    let _ = writeln!(out);

    let _ = writeln!(out, "\n### Next healthy → redirect active\n");
    let _ = writeln!(
        out,
        "| run | next answers on tempPort → stage 2 line (health policy) | stage 2 line → element in kernel (`nft monitor`) | element → stage 3 line | stage 2 line → stage 3 line | stage 2 line → first v2 request | unredirect line → element deleted |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    for (round, run) in &rd {
        let s2 = run.stage(2);
        let s3 = run.stage(3);
        let added = run.element("add");
        let deleted = run.element("delete");
        let first_v2 = run
            .samples
            .iter()
            .filter(|s| s.outcome == Ok(2))
            .map(|s| s.start)
            .min();
        let _ = writeln!(
            out,
            "| {round} | {} | {} | {} | {} | {} | {} |",
            span(run.next_serving, s2),
            span(s2, added),
            span(added, s3),
            span(s2, s3),
            span(s2, first_v2),
            span(run.stage(5), deleted),
        );
    }
    let _ = writeln!(out, "\n(milliseconds)\n");

    let _ = writeln!(out, "### Apply transcripts\n");
    let _ = writeln!(
        out,
        "Progress lines about the service, with their arrival in ms after the apply started \
         (a wait is reported when it starts, then every 5 s).\n"
    );
    for (round, run) in runs {
        let _ = writeln!(out, "run {round} {}:\n```", run.strategy.name());
        for (t, line) in &run.lines {
            if line.trim_start().starts_with(&format!("{SERVICE}: ")) {
                let _ = writeln!(out, "{:>9} {line}", rel(*t, run.apply_start));
            }
        }
        if !run.established.is_empty() {
            let _ = writeln!(
                out,
                "conntrack reads (start ms, read ms: established from port / from tempPort, table entries):"
            );
            for r in &run.established {
                let _ = writeln!(
                    out,
                    "{:>9} {:>6.1}: {}/{} {}",
                    rel(r.at, run.apply_start),
                    r.took.as_secs_f64() * 1000.0,
                    r.old,
                    r.next,
                    r.table
                );
            }
        }
        let _ = writeln!(out, "```\n");
    }
}

fn report_steady(
    out: &mut String,
    steady: &[(usize, &str, Stats)],
    no_table: &Stats,
    maps: &str,
    nat: &str,
) {
    let _ = writeln!(out, "### Steady state\n");
    let _ = writeln!(
        out,
        "{} s per service and round, in {} s slices that alternate between the two services (ABBA), each \
         after {} ms of warm-up that is not counted; the lessnat-managed v1 and v1 by hand run side by side. \
         *load* is the machine's 1-minute load average when the round started (other jobs share the machine). \
         The last row is measured after `lessnat destroy`, alone, not interleaved.\n\n\
         - lessnat's redirect maps in steady state: {maps}\n\
         - conntrack entries of the lessnat-managed port after its measurements: {nat}\n",
        STEADY.as_secs(),
        SLICE.as_secs(),
        WARMUP.as_millis()
    );
    let _ = writeln!(
        out,
        "| round | service | requests/s | p50 (ms) | p99 (ms) | failed | load |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    for (round, who, s) in steady {
        let _ = writeln!(
            out,
            "| {round} | {who} | {:.0} | {} | {} | {} | {:.1} |",
            s.rate(),
            ms(s.p50),
            ms(s.p99),
            s.failure_text(),
            s.load
        );
    }
    let _ = writeln!(
        out,
        "| – | by hand, lessnat's table removed | {:.0} | {} | {} | {} | {:.1} |",
        no_table.rate(),
        ms(no_table.p50),
        ms(no_table.p99),
        no_table.failure_text(),
        no_table.load
    );
    let _ = writeln!(out, "\nRatio lessnat / by hand, per round:\n");
    let rounds: Vec<usize> = {
        let mut r: Vec<usize> = steady.iter().map(|(r, _, _)| *r).collect();
        r.dedup();
        r
    };
    for round in rounds {
        let find = |who: &str| {
            steady
                .iter()
                .find(|(r, w, _)| *r == round && *w == who)
                .map(|(_, _, s)| s)
        };
        if let (Some(l), Some(h)) = (find("lessnat"), find("by hand")) {
            let _ = writeln!(
                out,
                "- round {round}: requests/s {:.3}, p50 {:.3}, p99 {:.3}",
                l.rate() / h.rate(),
                l.p50.as_secs_f64() / h.p50.as_secs_f64(),
                l.p99.as_secs_f64() / h.p99.as_secs_f64()
            );
        }
    }
}
