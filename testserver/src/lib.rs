//! lessnat's test server: a tiny HTTP/1.1 server and UDP responder that says
//! which version it is. Integration tests and benchmarks run it (statically
//! linked, in `FROM scratch` images) as the service being upgraded, and
//! `lessnat demo` runs it as its demo app (`lessnat demo-server ARGS`, [`run`]).
//!
//! HTTP endpoints (every response carries `X-Version: TEXT`):
//! `GET /` → `TEXT`; `GET /healthz` → `ok` (503 with `--unhealthy`, or
//! while the file of `--unhealthy-file` exists);
//! `GET /peer` → the client's `ip:port`; `GET /hold?ms=N` → `TEXT` after N ms;
//! `GET /stream?chunks=N&ms=M` → N chunks M ms apart. UDP: each datagram is
//! answered with `TEXT <peer>`.
//!
//! On SIGTERM or SIGINT it stops taking new requests on open connections and
//! exits once no request is in progress (at most `--grace` ms later). It also
//! works as PID 1 in a container, where signals without a handler are dropped:
//! the signals are blocked and taken with `sigwait` instead.

mod http;

use std::fmt::Write as _;
use std::io::{self, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal};

use crate::http::{Request, parse_request, read_head};

const USAGE: &str = "\
usage: lessnat-testserver [--listen ADDR:PORT]... [--udp ADDR:PORT]...
                          [--version TEXT] [--unhealthy] [--unhealthy-file PATH]
                          [--grace MS]

  --listen ADDR:PORT  serve HTTP on this TCP address (repeatable); `:PORT`
                      means every address (IPv6 and IPv4, or IPv4 only)
  --udp ADDR:PORT     answer UDP datagrams on this address (repeatable)
  --version TEXT      the version to report (default `dev`)
  --unhealthy         /healthz answers 503
  --unhealthy-file PATH
                      /healthz answers 503 while PATH exists
  --grace MS          on SIGTERM, wait at most this long for requests in
                      progress (default 10000)

Each bound address is printed as `listening tcp|udp ADDR:PORT`.";

/// Where to bind: one address, or every address on a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bind {
    Exact(SocketAddr),
    Any(u16),
}

impl Bind {
    fn parse(text: &str) -> Result<Bind, String> {
        if let Some(port) = text.strip_prefix(':') {
            return port
                .parse()
                .map(Bind::Any)
                .map_err(|_| format!("bad port in {text:?}"));
        }
        text.parse()
            .map(Bind::Exact)
            .map_err(|_| format!("{text:?} is not ADDR:PORT or :PORT"))
    }

    /// The addresses to try, in order: for `:PORT`, IPv6 (which also takes
    /// IPv4 on Linux) first, then IPv4 where IPv6 is unavailable.
    fn candidates(self) -> Vec<SocketAddr> {
        match self {
            Bind::Exact(addr) => vec![addr],
            Bind::Any(port) => vec![
                SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port),
                SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
            ],
        }
    }

    fn bind<T>(self, f: impl Fn(SocketAddr) -> io::Result<T>) -> Result<T, String> {
        let mut last = None;
        for addr in self.candidates() {
            match f(addr) {
                Ok(socket) => return Ok(socket),
                Err(e) => last = Some(format!("{addr}: {e}")),
            }
        }
        Err(last.unwrap_or_default())
    }
}

#[derive(Debug, PartialEq)]
struct Config {
    listen: Vec<Bind>,
    udp: Vec<Bind>,
    version: String,
    healthy: bool,
    unhealthy_file: Option<PathBuf>,
    grace: Duration,
}

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Option<Config>, String> {
    let mut config = Config {
        listen: Vec::new(),
        udp: Vec::new(),
        version: "dev".to_string(),
        healthy: true,
        unhealthy_file: None,
        grace: Duration::from_secs(10),
    };
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--listen" => config.listen.push(Bind::parse(&value()?)?),
            "--udp" => config.udp.push(Bind::parse(&value()?)?),
            "--version" => config.version = value()?,
            "--unhealthy" => config.healthy = false,
            "--unhealthy-file" => config.unhealthy_file = Some(PathBuf::from(value()?)),
            "--grace" => {
                let ms = value()?;
                let ms = ms.parse().map_err(|_| format!("bad --grace {ms:?}"))?;
                config.grace = Duration::from_millis(ms);
            }
            "-h" | "--help" => return Ok(None),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if config.listen.is_empty() && config.udp.is_empty() {
        return Err("nothing to serve: give --listen or --udp".to_string());
    }
    Ok(Some(config))
}

/// State shared by all connections.
struct Server {
    version: String,
    healthy: bool,
    unhealthy_file: Option<PathBuf>,
    stopping: AtomicBool,
    in_flight: AtomicUsize,
}

impl Server {
    /// Whether `/healthz` answers `ok` now.
    fn healthy(&self) -> bool {
        self.healthy && !self.unhealthy_file.as_ref().is_some_and(|f| f.exists())
    }
}

/// Counts a request as in progress while it lives.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn new(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        InFlight(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Runs the server with command-line `args` (without the program name) until
/// SIGTERM or SIGINT; prints its usage for `--help`. Call it from a process's
/// main thread before any other thread starts: it blocks those signals.
pub fn run(args: impl IntoIterator<Item = String>) -> ExitCode {
    let config = match parse_args(args) {
        Ok(Some(config)) => config,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("lessnat-testserver: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    // Blocked before any thread starts, so every thread inherits the mask and
    // the signals wait for `sigwait` below.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    if let Err(e) = signals.thread_block() {
        eprintln!("lessnat-testserver: blocking signals: {e}");
        return ExitCode::FAILURE;
    }
    match serve(&config, &signals) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lessnat-testserver: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(config: &Config, signals: &SigSet) -> Result<(), String> {
    let server = Arc::new(Server {
        version: config.version.clone(),
        healthy: config.healthy,
        unhealthy_file: config.unhealthy_file.clone(),
        stopping: AtomicBool::new(false),
        in_flight: AtomicUsize::new(0),
    });
    let mut stdout = io::stdout();
    let mut announce = |kind: &str, addr: io::Result<SocketAddr>| {
        let addr = addr.map_err(|e| format!("local address: {e}"))?;
        writeln!(stdout, "listening {kind} {addr}")
            .and_then(|()| stdout.flush())
            .map_err(|e| format!("stdout: {e}"))
    };
    for bind in &config.listen {
        let listener = bind.bind(TcpListener::bind)?;
        announce("tcp", listener.local_addr())?;
        let server = Arc::clone(&server);
        thread::spawn(move || accept_loop(&server, &listener));
    }
    for bind in &config.udp {
        let socket = bind.bind(UdpSocket::bind)?;
        announce("udp", socket.local_addr())?;
        let version = config.version.clone();
        thread::spawn(move || udp_loop(&version, &socket));
    }
    let signal = signals.wait().map_err(|e| format!("sigwait: {e}"))?;
    server.stopping.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + config.grace;
    while server.in_flight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
    eprintln!("lessnat-testserver: {signal}, exiting");
    Ok(())
}

fn accept_loop(server: &Arc<Server>, listener: &TcpListener) {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                let server = Arc::clone(server);
                thread::spawn(move || {
                    // A failed read or write means the client went away.
                    let _ = serve_connection(&server, stream);
                });
            }
            // Out of file descriptors or a connection reset before accept: go on.
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn udp_loop(version: &str, socket: &UdpSocket) {
    let mut buf = [0u8; 65536];
    loop {
        if let Ok((_, peer)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(format!("{version} {}", show_peer(peer)).as_bytes(), peer);
        }
    }
}

/// A peer address with IPv4-mapped IPv6 addresses shown as plain IPv4.
fn show_peer(peer: SocketAddr) -> SocketAddr {
    SocketAddr::new(peer.ip().to_canonical(), peer.port())
}

fn serve_connection(server: &Server, stream: TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let peer = show_peer(stream.peer_addr()?);
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    while let Some(head) = read_head(&mut reader)? {
        let _in_flight = InFlight::new(&server.in_flight);
        let request = match parse_request(&head) {
            Ok(request) if !request.chunked => request,
            Ok(_) => {
                let reply = Reply::text(501, "chunked request bodies are not supported\n");
                return reply.send(server, &mut writer, false, false).map(drop);
            }
            Err(e) => {
                let reply = Reply::text(400, &format!("{e}\n"));
                return reply.send(server, &mut writer, false, false).map(drop);
            }
        };
        io::copy(
            &mut reader.by_ref().take(request.content_length),
            &mut io::sink(),
        )?;
        if !respond(server, &request, peer, &mut writer)? {
            return Ok(());
        }
    }
    Ok(())
}

/// A complete (non-streamed) response.
struct Reply {
    status: u16,
    body: String,
    extra: &'static str,
}

impl Reply {
    fn text(status: u16, body: &str) -> Reply {
        Reply {
            status,
            body: body.to_string(),
            extra: "",
        }
    }

    /// Sends the reply; returns whether the connection stays open.
    fn send(
        &self,
        server: &Server,
        out: &mut impl Write,
        keep_alive: bool,
        head_only: bool,
    ) -> io::Result<bool> {
        let (mut message, keep_alive) = head(server, self.status, keep_alive);
        let _ = write!(
            message,
            "{}Content-Length: {}\r\n\r\n",
            self.extra,
            self.body.len()
        );
        if !head_only {
            message.push_str(&self.body);
        }
        out.write_all(message.as_bytes())?;
        out.flush()?;
        Ok(keep_alive)
    }
}

/// The status line and the headers every response has, and whether the
/// connection stays open: as the client wants, unless the server is stopping
/// (decided when the response starts, so a request held across SIGTERM is
/// answered with `Connection: close`).
fn head(server: &Server, status: u16, keep_alive: bool) -> (String, bool) {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "",
    };
    let keep_alive = keep_alive && !server.stopping.load(Ordering::SeqCst);
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nX-Version: {}\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: {connection}\r\n",
        server.version
    );
    (head, keep_alive)
}

fn millis(request: &Request, key: &str) -> Result<u64, Reply> {
    match request.param(key) {
        None => Ok(0),
        Some(v) => v
            .parse()
            .map_err(|_| Reply::text(400, &format!("bad {key}={v:?}\n"))),
    }
}

/// Answers one request; returns whether the connection stays open.
fn respond(
    server: &Server,
    request: &Request,
    peer: SocketAddr,
    out: &mut TcpStream,
) -> io::Result<bool> {
    let keep_alive = request.keep_alive();
    let head_only = request.method == "HEAD";
    let version = format!("{}\n", server.version);
    let reply = match (request.method.as_str(), request.path.as_str()) {
        ("GET" | "HEAD", "/") => Reply::text(200, &version),
        ("GET" | "HEAD", "/healthz") if server.healthy() => Reply::text(200, "ok\n"),
        ("GET" | "HEAD", "/healthz") => Reply::text(503, "unhealthy\n"),
        ("GET" | "HEAD", "/peer") => Reply::text(200, &format!("{peer}\n")),
        ("GET" | "HEAD", "/hold") => match millis(request, "ms") {
            Ok(ms) => {
                thread::sleep(Duration::from_millis(ms));
                Reply::text(200, &version)
            }
            Err(reply) => reply,
        },
        ("GET" | "HEAD", "/stream") => match (millis(request, "chunks"), millis(request, "ms")) {
            (Ok(chunks), Ok(ms)) => {
                return stream(server, request, out, keep_alive, chunks, ms);
            }
            (Err(reply), _) | (_, Err(reply)) => reply,
        },
        (_, "/" | "/healthz" | "/peer" | "/hold" | "/stream") => Reply {
            extra: "Allow: GET, HEAD\r\n",
            ..Reply::text(405, "method not allowed\n")
        },
        _ => Reply::text(404, "not found\n"),
    };
    reply.send(server, out, keep_alive, head_only)
}

/// Sends `chunks` pieces `ms` apart: chunked for HTTP/1.1, until close for HTTP/1.0.
fn stream(
    server: &Server,
    request: &Request,
    out: &mut TcpStream,
    keep_alive: bool,
    chunks: u64,
    ms: u64,
) -> io::Result<bool> {
    let chunked = request.minor >= 1;
    let (mut message, keep_alive) = head(server, 200, keep_alive && chunked);
    if chunked {
        message.push_str("Transfer-Encoding: chunked\r\n");
    }
    message.push_str("\r\n");
    out.write_all(message.as_bytes())?;
    if request.method == "HEAD" {
        out.flush()?;
        return Ok(keep_alive);
    }
    for i in 0..chunks {
        if i > 0 {
            thread::sleep(Duration::from_millis(ms));
        }
        let piece = format!("{} {i}\n", server.version);
        if chunked {
            write!(out, "{:x}\r\n{piece}\r\n", piece.len())?;
        } else {
            out.write_all(piece.as_bytes())?;
        }
        out.flush()?;
    }
    if chunked {
        out.write_all(b"0\r\n\r\n")?;
        out.flush()?;
    } else {
        out.shutdown(std::net::Shutdown::Write)?;
    }
    Ok(keep_alive)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Result<Option<Config>, String> {
        parse_args(list.iter().map(|s| s.to_string()))
    }

    #[test]
    fn parses_listen_addresses() {
        assert_eq!(Bind::parse(":8000"), Ok(Bind::Any(8000)));
        assert_eq!(
            Bind::parse("127.0.0.1:80"),
            Ok(Bind::Exact("127.0.0.1:80".parse().unwrap()))
        );
        assert_eq!(
            Bind::parse("[::1]:0"),
            Ok(Bind::Exact("[::1]:0".parse().unwrap()))
        );
        assert!(Bind::parse(":http").is_err());
        assert!(Bind::parse("localhost:80").is_err());
        assert!(Bind::parse("127.0.0.1").is_err());
        assert_eq!(Bind::Any(5).candidates().len(), 2);
    }

    #[test]
    fn parses_arguments() {
        let config = args(&[
            "--listen",
            ":8000",
            "--listen",
            "127.0.0.1:9",
            "--udp",
            ":53",
            "--version",
            "v2",
            "--unhealthy",
            "--unhealthy-file",
            "/unhealthy",
            "--grace",
            "250",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(config.listen.len(), 2);
        assert_eq!(config.udp, vec![Bind::Any(53)]);
        assert_eq!(config.version, "v2");
        assert!(!config.healthy);
        assert_eq!(config.unhealthy_file, Some(PathBuf::from("/unhealthy")));
        assert_eq!(config.grace, Duration::from_millis(250));
        assert_eq!(args(&["--help"]), Ok(None));
        assert!(args(&[]).is_err());
        assert!(args(&["--listen"]).is_err());
        assert!(args(&["--listen", ":1", "--bogus"]).is_err());
    }

    #[test]
    fn health_fails_while_the_unhealthy_file_exists() {
        let file =
            std::env::temp_dir().join(format!("testserver-unhealthy-{}", std::process::id()));
        let server = Server {
            version: "v1".into(),
            healthy: true,
            unhealthy_file: Some(file.clone()),
            stopping: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
        };
        assert!(server.healthy());
        std::fs::write(&file, "").unwrap();
        assert!(!server.healthy());
        std::fs::remove_file(&file).unwrap();
        assert!(server.healthy());
    }

    #[test]
    fn shows_mapped_ipv4_peers_as_ipv4() {
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:4000".parse().unwrap();
        assert_eq!(show_peer(mapped).to_string(), "10.0.0.1:4000");
        let v6: SocketAddr = "[2001:db8::1]:4000".parse().unwrap();
        assert_eq!(show_peer(v6), v6);
    }
}
