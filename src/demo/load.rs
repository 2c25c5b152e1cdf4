//! A load generator for `lessnat demo` and the zero-downtime tests, against
//! the project's test server (`lessnat-testserver`, or `lessnat demo-server`)
//! on loopback: a pool of clients that each keep opening a fresh TCP
//! connection, sending one `GET /` with `Connection: close` and reading the
//! whole answer; and long-lived connections (`GET /hold?ms=N`) opened at a
//! chosen moment. Every request is recorded with when it started and ended,
//! whether it succeeded, and which version (`X-Version`) answered, so a test
//! can assert "no failure" and "which version served when".
//!
//! The pool can also send elsewhere than loopback (`LoadConfig::to`: any
//! address, e.g. a VIP), another path (`/peer`: the body is the client address
//! the server saw, kept in [`Sample::body`]), from inside a network namespace
//! (`LoadConfig::in_netns`: each client thread enters it before opening
//! sockets); [`request_in`] does the same for one request.
//!
//! Nothing here panics: a client that cannot start, enter its namespace or
//! connect is recorded as a failed [`Sample`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One request and what came of it.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Which client sent it (`long-lived` connections count from 1000).
    pub client: usize,
    /// Just before `connect`.
    pub start: Instant,
    /// When the answer was read to the end, or the request failed.
    pub end: Instant,
    /// The version that answered (`X-Version`, else the body's first line).
    pub version: Option<String>,
    /// Why the request failed; `None` for a complete `200` answer with a version.
    pub error: Option<String>,
    /// The answer's body without its trailing newline, when there was one
    /// (`/peer`: the client `ip:port` the server saw).
    pub body: Option<String>,
}

impl Sample {
    /// A request of `client` that failed before it could start (its thread
    /// could not be made, or could not enter its namespace).
    pub fn failed(client: usize, error: String) -> Sample {
        let now = Instant::now();
        Sample {
            client,
            start: now,
            end: now,
            version: None,
            error: Some(error),
            body: None,
        }
    }

    /// Whether the request got a complete `200` answer with a version.
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }

    /// From connect to the end of the answer.
    pub fn latency(&self) -> Duration {
        self.end - self.start
    }

    /// The client address in a `/peer` answer (the body `ip:port`).
    pub fn peer_ip(&self) -> Option<IpAddr> {
        let body = self.body.as_deref().filter(|_| self.ok())?;
        body.parse::<SocketAddr>().ok().map(|a| a.ip())
    }
}

/// How the client pool behaves.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// The loopback port to send to (unless `target` is set).
    pub port: u16,
    /// Where to send instead of 127.0.0.1:`port`.
    pub target: Option<SocketAddr>,
    /// The network namespace (a name under /run/netns, or a path) the clients
    /// run in; `None`: this process's.
    pub netns: Option<String>,
    /// The path each request asks for (`/` by default).
    pub path: String,
    /// The number of the first client (so that several pools in one test
    /// can be told apart in their samples).
    pub first_client: usize,
    /// Concurrent clients (threads), each with one connection at a time.
    pub clients: usize,
    /// Pause of each client between requests (keeps the conntrack table, which
    /// holds every closed connection for 2 minutes in TIME_WAIT, from filling up).
    pub pause: Duration,
    /// Each client stops after this many requests...
    pub max_requests_per_client: usize,
    /// ...or after this long, whichever comes first (or when stopped).
    pub max_duration: Duration,
    /// Connect, read and write timeout of one request.
    pub io_timeout: Duration,
}

impl LoadConfig {
    /// 32 clients, a request every ~30 ms each (about 1000 a second), at most
    /// 2 minutes.
    pub fn new(port: u16) -> Self {
        LoadConfig {
            port,
            target: None,
            netns: None,
            path: "/".to_string(),
            first_client: 0,
            clients: 32,
            pause: Duration::from_millis(30),
            max_requests_per_client: 20_000,
            max_duration: Duration::from_secs(120),
            io_timeout: Duration::from_secs(10),
        }
    }

    /// As [`LoadConfig::new`], sending to `target` instead of loopback.
    pub fn to(target: SocketAddr) -> Self {
        LoadConfig {
            target: Some(target),
            ..LoadConfig::new(target.port())
        }
    }

    /// The clients run inside the network namespace `netns` (a name under
    /// /run/netns, or a path).
    pub fn in_netns(self, netns: &str) -> Self {
        LoadConfig {
            netns: Some(netns.to_string()),
            ..self
        }
    }

    /// Each request asks for `path`.
    pub fn path(self, path: &str) -> Self {
        LoadConfig {
            path: path.to_string(),
            ..self
        }
    }

    /// Where the requests go.
    pub fn address(&self) -> SocketAddr {
        self.target.unwrap_or_else(|| loopback(self.port))
    }
}

/// Moves the calling thread into the network namespace `netns` (a name under
/// /run/netns, or a path): sockets it opens from now on live there. Other
/// threads are not affected.
pub fn enter_netns(netns: &str) -> std::io::Result<()> {
    let path = if netns.contains('/') {
        std::path::PathBuf::from(netns)
    } else {
        std::path::Path::new("/run/netns").join(netns)
    };
    let file = std::fs::File::open(&path)?;
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| std::io::Error::other(format!("setns {}: {e}", path.display())))
}

/// The client pool did not make the requests it was waited for.
#[derive(Debug, thiserror::Error)]
#[error("the load made only {done} of {target} requests in {timeout:?}")]
pub struct TooSlow {
    /// Requests made.
    pub done: usize,
    /// Requests waited for.
    pub target: usize,
    /// How long it was waited for.
    pub timeout: Duration,
}

/// A running client pool; [`Load::stop`] ends it and returns what it saw.
pub struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    clients: Vec<JoinHandle<Vec<Sample>>>,
    /// Clients whose thread could not be made.
    unstarted: Vec<Sample>,
    /// When the pool started.
    pub started: Instant,
}

impl Load {
    /// Starts the clients.
    pub fn start(config: LoadConfig) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let first = config.first_client;
        let mut unstarted = Vec::new();
        let clients = (first..first + config.clients)
            .filter_map(|client| {
                let stop = Arc::clone(&stop);
                let done = Arc::clone(&done);
                let config = config.clone();
                std::thread::Builder::new()
                    .name(format!("load-{client}"))
                    .spawn(move || {
                        if let Some(netns) = &config.netns
                            && let Err(e) = enter_netns(netns)
                        {
                            return vec![Sample::failed(client, format!("entering {netns}: {e}"))];
                        }
                        let deadline = started + config.max_duration;
                        let addr = config.address();
                        let mut samples = Vec::new();
                        while !stop.load(Ordering::SeqCst)
                            && samples.len() < config.max_requests_per_client
                            && Instant::now() < deadline
                        {
                            samples.push(request_to(client, addr, &config.path, config.io_timeout));
                            done.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(config.pause);
                        }
                        samples
                    })
                    .map_err(|e| {
                        unstarted.push(Sample::failed(client, format!("starting the client: {e}")));
                    })
                    .ok()
            })
            .collect();
        Load {
            stop,
            done,
            clients,
            unstarted,
            started,
        }
    }

    /// How many requests have ended so far.
    pub fn done(&self) -> usize {
        self.done.load(Ordering::SeqCst)
    }

    /// Waits until `n` more requests have ended, at most `timeout`.
    pub fn wait_requests(&self, n: usize, timeout: Duration) -> Result<(), TooSlow> {
        let target = self.done() + n;
        let deadline = Instant::now() + timeout;
        while self.done() < target {
            if Instant::now() >= deadline {
                return Err(TooSlow {
                    done: self.done(),
                    target,
                    timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Stops the clients and collects every request they made.
    pub fn stop(mut self) -> Report {
        self.stop.store(true, Ordering::SeqCst);
        let mut samples: Vec<Sample> = std::mem::take(&mut self.clients)
            .into_iter()
            .flat_map(|c| joined(c).unwrap_or_else(|failed| vec![failed]))
            .chain(std::mem::take(&mut self.unstarted))
            .collect();
        samples.sort_by_key(|s| s.start);
        Report { samples }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        // Also on a panic of the caller: the clients stop by themselves at their deadline, but
        // sooner is kinder to the next test.
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// What a finished client thread returned; a thread that panicked (nothing
/// here panics, so only a bug) counts as a failed request.
fn joined<T>(handle: JoinHandle<T>) -> Result<T, Sample> {
    let client = handle.thread().name().unwrap_or("a client").to_string();
    handle
        .join()
        .map_err(|_| Sample::failed(0, format!("{client} panicked")))
}

/// Long-lived connections, each holding one request open for a while.
pub struct LongLived {
    connections: Vec<JoinHandle<Sample>>,
    unstarted: Vec<Sample>,
}

/// Opens `n` connections now, each sending `GET /hold?ms=HOLD_MS`; returns once
/// every one of them is connected and its request is sent (so they are
/// established before anything the caller does next).
pub fn long_lived(port: u16, n: usize, hold_ms: u64) -> LongLived {
    open_long_lived(loopback(port), None, n, hold_ms, false)
}

/// Like [`long_lived`], to `addr` from inside the network namespace `netns`
/// (a name under /run/netns, or a path).
pub fn long_lived_in(netns: &str, addr: SocketAddr, n: usize, hold_ms: u64) -> LongLived {
    open_long_lived(addr, Some(netns), n, hold_ms, false)
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// Like [`long_lived`], but each client half-closes its connection (shuts
/// down its sending side) once the request is sent, as `nc -N`, many RPC
/// clients and uploads do: the connection is still open for the answer.
pub fn long_lived_half_closed(port: u16, n: usize, hold_ms: u64) -> LongLived {
    open_long_lived(loopback(port), None, n, hold_ms, true)
}

fn open_long_lived(
    addr: SocketAddr,
    netns: Option<&str>,
    n: usize,
    hold_ms: u64,
    half_close: bool,
) -> LongLived {
    let (sent_tx, sent_rx) = std::sync::mpsc::channel();
    let timeout = Duration::from_millis(hold_ms) + Duration::from_secs(30);
    let mut unstarted = Vec::new();
    let connections = (0..n)
        .filter_map(|i| {
            let sent = sent_tx.clone();
            let netns = netns.map(str::to_string);
            std::thread::Builder::new()
                .name(format!("long-lived-{i}"))
                .spawn(move || {
                    if let Some(netns) = netns
                        && let Err(e) = enter_netns(&netns)
                    {
                        return Sample::failed(1000 + i, format!("entering {netns}: {e}"));
                    }
                    let path = format!("/hold?ms={hold_ms}");
                    request_with(1000 + i, addr, &path, timeout, half_close, move || {
                        let _ = sent.send(());
                    })
                })
                .map_err(|e| {
                    unstarted.push(Sample::failed(
                        1000 + i,
                        format!("starting the client: {e}"),
                    ));
                })
                .ok()
        })
        .collect::<Vec<_>>();
    drop(sent_tx);
    // A client that fails before sending drops its sender without sending:
    // the loop ends early and the sample records the failure.
    for _ in 0..connections.len() {
        if sent_rx.recv_timeout(Duration::from_secs(10)).is_err() {
            break;
        }
    }
    LongLived {
        connections,
        unstarted,
    }
}

impl LongLived {
    /// Waits for every answer.
    pub fn wait(self) -> Vec<Sample> {
        self.connections
            .into_iter()
            .map(|c| joined(c).unwrap_or_else(|failed| failed))
            .chain(self.unstarted)
            .collect()
    }
}

/// One `GET path` on a fresh connection to 127.0.0.1:port.
pub fn request(client: usize, port: u16, path: &str, timeout: Duration) -> Sample {
    request_with(client, loopback(port), path, timeout, false, || {})
}

/// One `GET path` on a fresh connection to `addr`.
pub fn request_to(client: usize, addr: SocketAddr, path: &str, timeout: Duration) -> Sample {
    request_with(client, addr, path, timeout, false, || {})
}

/// One `GET path` to `addr` from inside the network namespace `netns` (a
/// name under /run/netns, or a path), on a thread of its own.
pub fn request_in(
    netns: &str,
    client: usize,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Sample {
    std::thread::scope(|scope| {
        let spawned = std::thread::Builder::new().spawn_scoped(scope, || {
            enter_netns(netns)
                .map(|()| request_to(client, addr, path, timeout))
                .unwrap_or_else(|e| Sample::failed(client, format!("entering {netns}: {e}")))
        });
        match spawned.map(|thread| thread.join()) {
            Ok(Ok(sample)) => sample,
            Ok(Err(_)) => Sample::failed(client, "the request thread panicked".to_string()),
            Err(e) => Sample::failed(client, format!("starting the request thread: {e}")),
        }
    })
}

fn request_with(
    client: usize,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
    half_close: bool,
    on_sent: impl FnOnce(),
) -> Sample {
    let start = Instant::now();
    let result = exchange(addr, path, timeout, half_close, on_sent);
    let end = Instant::now();
    match result {
        Ok((version, body)) => Sample {
            client,
            start,
            end,
            version: Some(version),
            error: None,
            body: Some(body),
        },
        Err((version, error)) => Sample {
            client,
            start,
            end,
            version,
            error: Some(error),
            body: None,
        },
    }
}

type Failure = (Option<String>, String);

fn exchange(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
    half_close: bool,
    on_sent: impl FnOnce(),
) -> Result<(String, String), Failure> {
    let fail = |what: &str, e: std::io::Error| (None, format!("{what}: {e}"));
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| fail("connect", e))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| fail("timeouts", e))?;
    let head = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(head.as_bytes())
        .map_err(|e| fail("write", e))?;
    if half_close {
        stream
            .shutdown(std::net::Shutdown::Write)
            .map_err(|e| fail("shutdown", e))?;
    }
    on_sent();
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .map_err(|e| fail("read", e))?;
    parse(&answer)
}

/// The version and body (without its trailing newline) of a complete `200`
/// answer, or why it is not one.
fn parse(answer: &[u8]) -> Result<(String, String), Failure> {
    let text = String::from_utf8_lossy(answer);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return Err((None, format!("incomplete answer ({} bytes)", answer.len())));
    };
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default();
    let mut version = None;
    let mut length = None;
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            match name.trim().to_ascii_lowercase().as_str() {
                "x-version" => version = Some(value.trim().to_string()),
                "content-length" => length = value.trim().parse::<usize>().ok(),
                _ => {}
            }
        }
    }
    let version = version.or_else(|| body.lines().next().map(str::to_string));
    if !status.starts_with("HTTP/1.1 200 ") {
        return Err((version, format!("status {status:?}")));
    }
    if length.is_some_and(|l| l != body.len()) {
        return Err((
            version,
            format!("body of {} bytes, Content-Length {length:?}", body.len()),
        ));
    }
    match version {
        Some(v) if !v.is_empty() => Ok((v, body.trim_end_matches('\n').to_string())),
        _ => Err((None, "no version in the answer".to_string())),
    }
}

/// Everything a client pool saw, sorted by start.
#[derive(Debug, Clone)]
pub struct Report {
    /// Every request.
    pub samples: Vec<Sample>,
}

impl Report {
    /// Several reports as one, sorted by start.
    pub fn merged(reports: impl IntoIterator<Item = Report>) -> Report {
        let mut samples: Vec<Sample> = reports.into_iter().flat_map(|r| r.samples).collect();
        samples.sort_by_key(|s| s.start);
        Report { samples }
    }

    /// Client addresses in the `/peer` answers of successful requests matching
    /// `pick`, with their counts (`"?"` for an answer that is no `ip:port`).
    pub fn peers(&self, pick: impl Fn(&Sample) -> bool) -> BTreeMap<String, usize> {
        let mut found = BTreeMap::new();
        for sample in self.samples.iter().filter(|s| s.ok() && pick(s)) {
            let peer = sample
                .peer_ip()
                .map_or_else(|| "?".to_string(), |ip| ip.to_string());
            *found.entry(peer).or_insert(0) += 1;
        }
        found
    }

    /// Requests that failed.
    pub fn failed(&self) -> Vec<&Sample> {
        self.samples.iter().filter(|s| !s.ok()).collect()
    }

    /// Versions that answered requests matching `pick`, with their counts.
    pub fn versions(&self, pick: impl Fn(&Sample) -> bool) -> BTreeMap<String, usize> {
        let mut found = BTreeMap::new();
        for sample in self.samples.iter().filter(|s| s.ok() && pick(s)) {
            if let Some(v) = &sample.version {
                *found.entry(v.clone()).or_insert(0) += 1;
            }
        }
        found
    }

    /// Versions of requests that ended before `t`.
    pub fn ended_before(&self, t: Instant) -> BTreeMap<String, usize> {
        self.versions(|s| s.end < t)
    }

    /// Versions of requests that started after `t`.
    pub fn started_after(&self, t: Instant) -> BTreeMap<String, usize> {
        self.versions(|s| s.start > t)
    }

    /// Requests that answered `version` although they started after a request
    /// answered by `newer` had ended: once new connections go to the new
    /// version, no later connection may reach the old one.
    pub fn old_after_new(&self, old: &str, newer: &str) -> Vec<&Sample> {
        let Some(first_new_end) = self
            .samples
            .iter()
            .filter(|s| s.ok() && s.version.as_deref() == Some(newer))
            .map(|s| s.end)
            .min()
        else {
            return Vec::new();
        };
        self.samples
            .iter()
            .filter(|s| s.ok() && s.start > first_new_end && s.version.as_deref() == Some(old))
            .collect()
    }

    /// The slowest request.
    pub fn max_latency(&self) -> Duration {
        self.samples
            .iter()
            .map(Sample::latency)
            .max()
            .unwrap_or_default()
    }

    /// One paragraph for logs and panic messages: counts, versions, latency,
    /// and the first failures with when they happened (relative to `origin`).
    pub fn summary(&self, origin: Instant) -> String {
        let failed = self.failed();
        let mut text = format!(
            "{} requests, {} failed, versions {:?}, max latency {:?}",
            self.samples.len(),
            failed.len(),
            self.versions(|_| true),
            self.max_latency()
        );
        for sample in failed.iter().take(10) {
            let _ = write!(
                text,
                "\n  client {} at +{:.3}s..+{:.3}s: {}",
                sample.client,
                sample.start.saturating_duration_since(origin).as_secs_f64(),
                sample.end.saturating_duration_since(origin).as_secs_f64(),
                sample.error.as_deref().unwrap_or("?")
            );
        }
        text
    }
}
