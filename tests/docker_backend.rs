//! The Docker backend against a real engine, and the test server every later
//! integration test runs (its HTTP and UDP behaviour, and its shutdown).

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lessnat::backend::docker::Docker;
use lessnat::model::Container;
use lessnat::ownership::{LABEL_PORTS, LABEL_SERVICE, LABEL_SPEC, Slot, container_name};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use support::image::{test_image, testserver_binary};

/// Containers this test made, removed by id when dropped (also on panic).
#[derive(Default)]
struct Made {
    ids: Vec<String>,
}

impl Made {
    /// `docker create ARGS` (split at whitespace); the container is removed at the end.
    fn create(&mut self, args: &str) -> String {
        let mut full = vec!["create"];
        full.extend(args.split_whitespace());
        let output = support::run("docker", &full);
        let id = String::from_utf8_lossy(&output.stdout).trim().to_string();
        assert!(!id.is_empty(), "docker create printed no id");
        self.ids.push(id.clone());
        id
    }
}

impl Drop for Made {
    fn drop(&mut self) {
        for id in &self.ids {
            let _ = Command::new("docker").args(["rm", "-f", id]).output();
        }
    }
}

fn ours<'a>(containers: &'a [Container], name: &str) -> &'a Container {
    containers
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("{name} not observed in {containers:#?}"))
}

#[test]
fn observe_reports_own_and_foreign_containers() {
    if !support::docker("observe_reports_own_and_foreign_containers") {
        return;
    }
    let image = test_image("v1");
    let pid = std::process::id();
    let service = format!("lntest{pid}");
    let node = "test";
    let primary_name = container_name(&service, node, Slot::Primary);
    let next_name = container_name(&service, node, Slot::Next);
    let other_node_name = container_name(&service, "elsewhere", Slot::Primary);
    let foreign_name = format!("lessnat-{service}x");
    let unrelated_name = format!("lntest{pid}-unrelated");

    let mut made = Made::default();
    let labels = |spec: &str| {
        format!(
            "--label {LABEL_SERVICE}={service} --label {LABEL_SPEC}={spec} --label {LABEL_PORTS}=8000/tcp"
        )
    };
    // The image has no shell, so this CMD-SHELL health check always fails:
    // the container turns `unhealthy` after one probe, which is what the
    // health mapping is checked against.
    let primary = made.create(&format!(
        "--name {primary_name} --network none {} \
         --health-cmd true --health-interval 200ms --health-retries 1 {image} --listen :8000",
        labels("spec-1")
    ));
    support::run("docker", &["start", &primary]);
    let next = made.create(&format!(
        "--name {next_name} --network none {} {image} --listen :18000",
        labels("spec-2")
    ));
    let other_node = made.create(&format!(
        "--name {other_node_name} --network none {} {image} --listen :8000",
        labels("spec-1")
    ));
    let foreign = made.create(&format!(
        "--name {foreign_name} --network none {image} --listen :8000"
    ));
    let unrelated = made.create(&format!(
        "--name {unrelated_name} --network none {image} --listen :8000"
    ));

    let docker = Docker::connect().unwrap_or_else(|e| panic!("{e}"));
    let server_api = support::run("docker", &["version", "--format", "{{.Server.APIVersion}}"]);
    let server_api = String::from_utf8_lossy(&server_api.stdout)
        .trim()
        .to_string();
    let as_pair = |v: &str| -> (u32, u32) {
        let (major, minor) = v
            .split_once('.')
            .unwrap_or_else(|| panic!("API version {v}"));
        (major.parse().unwrap(), minor.parse().unwrap())
    };
    assert!(
        as_pair(&docker.api_version()) <= as_pair(&server_api),
        "client speaks API {} to an engine of API {server_api}",
        docker.api_version()
    );

    // Observe until the first health probe has failed.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (containers, foreigners) = loop {
        let (containers, foreigners) = docker.observe(node).unwrap_or_else(|e| panic!("{e}"));
        let health = ours(&containers, &primary_name).health.clone();
        if health.as_deref() == Some("unhealthy") {
            break (containers, foreigners);
        }
        assert!(
            Instant::now() < deadline,
            "{primary_name} never turned unhealthy (health {health:?})"
        );
        std::thread::sleep(Duration::from_millis(100));
    };

    assert!(
        containers.windows(2).all(|w| w[0].name <= w[1].name),
        "not sorted"
    );
    assert!(
        foreigners.windows(2).all(|w| w[0].name <= w[1].name),
        "not sorted"
    );
    let mine: Vec<&Container> = containers.iter().filter(|c| c.service == service).collect();
    assert_eq!(mine.len(), 2, "{mine:#?}");

    let p = ours(&containers, &primary_name);
    assert_eq!(p.id, primary);
    assert_eq!(p.slot, Slot::Primary);
    assert_eq!(p.spec_hash, "spec-1");
    assert_eq!(p.image, image);
    assert_eq!(p.state, "running");
    assert_eq!(p.ports, vec!["8000/tcp"]);
    let process = p.pid.expect("a running container has a pid");
    let cmdline = std::fs::read(format!("/proc/{process}/cmdline")).unwrap_or_default();
    assert!(
        String::from_utf8_lossy(&cmdline).contains("lessnat-testserver"),
        "pid {process} is not the test server"
    );

    let n = ours(&containers, &next_name);
    assert_eq!(n.id, next);
    assert_eq!(n.slot, Slot::Next);
    assert_eq!(n.spec_hash, "spec-2");
    assert_eq!(n.image, image);
    assert_eq!(n.state, "created");
    assert_eq!((n.pid, n.health.as_deref()), (None, None));

    let f: Vec<_> = foreigners
        .iter()
        .filter(|f| f.name == foreign_name)
        .collect();
    assert_eq!(f.len(), 1, "{foreigners:#?}");
    assert_eq!(f[0].id, foreign);
    assert!(!containers.iter().any(|c| c.id == foreign));
    assert!(!containers.iter().any(|c| c.id == unrelated));
    assert!(
        !containers.iter().any(|c| c.id == other_node),
        "another node's container is not this node's"
    );
    assert!(
        !foreigners.iter().any(|f| f.id == other_node),
        "nor is it foreign"
    );
    assert!(!foreigners.iter().any(|f| f.id == unrelated));

    // As PID 1 the server must handle SIGTERM itself, or `docker stop` waits
    // for its timeout and then kills it.
    let started = Instant::now();
    support::run("docker", &["stop", "--time", "20", &primary]);
    let stopped_in = started.elapsed();
    assert!(
        stopped_in < Duration::from_secs(5),
        "docker stop took {stopped_in:?}"
    );
    let exit = support::run(
        "docker",
        &["inspect", "--format", "{{.State.ExitCode}}", &primary],
    );
    assert_eq!(String::from_utf8_lossy(&exit.stdout).trim(), "0");

    let (containers, _) = docker.observe(node).unwrap_or_else(|e| panic!("{e}"));
    let p = ours(&containers, &primary_name);
    assert_eq!(p.state, "exited");
    assert_eq!((p.pid, p.health.as_deref()), (None, None));
}

/// The test server as a child process on loopback ports it picks itself;
/// killed (by its pid) when dropped.
struct TestServer {
    child: Child,
    tcp: SocketAddr,
    udp: SocketAddr,
}

impl TestServer {
    fn start(extra: &[&str]) -> TestServer {
        let mut child = Command::new(testserver_binary())
            .args(["--listen", "127.0.0.1:0", "--udp", "127.0.0.1:0"])
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the test server");
        let stdout = child.stdout.take().expect("stdout");
        let mut server = TestServer {
            child,
            tcp: "0.0.0.0:0".parse().unwrap(),
            udp: "0.0.0.0:0".parse().unwrap(),
        };
        for line in BufReader::new(stdout).lines().take(2) {
            let line = line.expect("read the server's stdout");
            match line.split_whitespace().collect::<Vec<_>>()[..] {
                ["listening", "tcp", addr] => server.tcp = addr.parse().unwrap(),
                ["listening", "udp", addr] => server.udp = addr.parse().unwrap(),
                _ => panic!("unexpected line {line:?}"),
            }
        }
        assert!(
            server.tcp.port() != 0 && server.udp.port() != 0,
            "no addresses printed"
        );
        server
    }

    fn connect(&self) -> BufReader<TcpStream> {
        let stream = TcpStream::connect(self.tcp).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        BufReader::new(stream)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
    /// Body pieces: one for a `Content-Length` body, one per chunk otherwise.
    pieces: Vec<(Instant, String)>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn line(conn: &mut BufReader<TcpStream>) -> String {
    let mut line = String::new();
    conn.read_line(&mut line).expect("read a line");
    assert!(
        line.ends_with("\r\n"),
        "line {line:?} is not CRLF-terminated"
    );
    line.truncate(line.len() - 2);
    line
}

fn request(conn: &mut BufReader<TcpStream>, target: &str, extra: &str) -> Response {
    write!(
        conn.get_mut(),
        "GET {target} HTTP/1.1\r\nHost: test\r\n{extra}\r\n"
    )
    .unwrap();
    let status_line = line(conn);
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("status line {status_line:?}"));
    let mut headers = Vec::new();
    loop {
        let header = line(conn);
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':').expect("header");
        headers.push((name.to_string(), value.trim().to_string()));
    }
    let mut response = Response {
        status,
        headers,
        body: String::new(),
        pieces: Vec::new(),
    };
    let read = |conn: &mut BufReader<TcpStream>, n: usize| {
        let mut buf = vec![0; n];
        conn.read_exact(&mut buf).expect("read the body");
        String::from_utf8(buf).expect("UTF-8 body")
    };
    if response.header("transfer-encoding") == Some("chunked") {
        loop {
            let size = usize::from_str_radix(&line(conn), 16).expect("chunk size");
            if size == 0 {
                assert_eq!(line(conn), "", "no trailers expected");
                break;
            }
            let piece = read(conn, size);
            assert_eq!(line(conn), "");
            response.pieces.push((Instant::now(), piece));
        }
    } else {
        let length = response.header("content-length").expect("Content-Length");
        let piece = read(conn, length.parse().expect("length"));
        response.pieces.push((Instant::now(), piece));
    }
    response.body = response.pieces.iter().map(|(_, p)| p.as_str()).collect();
    response
}

#[test]
fn testserver_answers_http_and_udp() {
    let server = TestServer::start(&["--version", "v1"]);
    let mut conn = server.connect();
    let local = conn.get_ref().local_addr().unwrap();

    // Several requests on one keep-alive connection.
    let root = request(&mut conn, "/", "");
    assert_eq!((root.status, root.body.as_str()), (200, "v1\n"));
    assert_eq!(root.header("x-version"), Some("v1"));
    assert_eq!(root.header("connection"), Some("keep-alive"));
    let health = request(&mut conn, "/healthz", "");
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
    let peer = request(&mut conn, "/peer", "");
    assert_eq!(peer.body, format!("{local}\n"));
    assert_eq!(peer.header("x-version"), Some("v1"));

    let started = Instant::now();
    let hold = request(&mut conn, "/hold?ms=300", "");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!((hold.status, hold.body.as_str()), (200, "v1\n"));

    let started = Instant::now();
    let stream = request(&mut conn, "/stream?chunks=3&ms=100", "");
    assert_eq!(stream.status, 200);
    assert_eq!(stream.header("x-version"), Some("v1"));
    let pieces: Vec<&str> = stream.pieces.iter().map(|(_, p)| p.as_str()).collect();
    assert_eq!(pieces, ["v1 0\n", "v1 1\n", "v1 2\n"]);
    assert!(
        stream.pieces[0].0 - started < Duration::from_millis(90),
        "first chunk late"
    );
    assert!(stream.pieces[2].0 - stream.pieces[0].0 >= Duration::from_millis(200));

    let missing = request(&mut conn, "/nope", "Connection: close\r\n");
    assert_eq!(missing.status, 404);
    assert_eq!(missing.header("connection"), Some("close"));
    let mut rest = Vec::new();
    conn.read_to_end(&mut rest)
        .expect("the server closes after Connection: close");
    assert!(rest.is_empty());

    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    udp.send_to(b"ping", server.udp).unwrap();
    let mut buf = [0; 256];
    let (n, from) = udp.recv_from(&mut buf).expect("UDP reply");
    assert_eq!(from, server.udp);
    assert_eq!(
        std::str::from_utf8(&buf[..n]).unwrap(),
        format!("v1 {}", udp.local_addr().unwrap())
    );
}

#[test]
fn testserver_reports_unhealthy_when_told() {
    let server = TestServer::start(&["--version", "v2", "--unhealthy"]);
    let mut conn = server.connect();
    let health = request(&mut conn, "/healthz", "");
    assert_eq!(health.status, 503);
    assert_eq!(health.header("x-version"), Some("v2"));
    assert_eq!(request(&mut conn, "/", "").body, "v2\n");
}

#[test]
fn testserver_finishes_requests_in_progress_on_sigterm() {
    let mut server = TestServer::start(&["--version", "v1"]);
    let mut conn = server.connect();
    let held = std::thread::spawn(move || request(&mut conn, "/hold?ms=500", ""));
    std::thread::sleep(Duration::from_millis(150));
    let pid = Pid::from_raw(i32::try_from(server.child.id()).unwrap());
    let signalled = Instant::now();
    kill(pid, Signal::SIGTERM).expect("SIGTERM the server");
    let held = held.join().expect("the held request");
    assert_eq!((held.status, held.body.as_str()), (200, "v1\n"));
    assert_eq!(held.header("connection"), Some("close"));
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(3),
            "still running after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "exit status {status}");
}
