//! A real etcd cluster for tests: three members of Debian's `etcd` (3.4)
//! started as this test's own processes on free loopback ports, with their
//! data directories in a temporary directory. Members can be killed (by PID)
//! and started again; dropping the cluster kills every member it started,
//! by PID, and removes the data directories.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One member: its name, ports and process (while it runs).
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    /// Plain HTTP `/health` (`--listen-metrics-urls`), also with TLS.
    metrics_port: u16,
    tls: bool,
    child: Option<Child>,
}

impl Member {
    fn client_url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }
}

/// A running etcd cluster, killed when dropped (also on panic).
pub struct EtcdCluster {
    dir: tempfile::TempDir,
    token: String,
    members: Vec<Member>,
    tls: Option<TlsFiles>,
}

/// PEM files a TLS cluster was made with (in its temporary directory).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA that signed the server and client certificates.
    pub ca: PathBuf,
    /// A client certificate and its key.
    pub cert: PathBuf,
    /// The client key.
    pub key: PathBuf,
}

impl EtcdCluster {
    /// Starts `size` members and waits until the cluster has a leader.
    pub fn start(size: usize) -> EtcdCluster {
        EtcdCluster::start_with(size, false)
    }

    /// Starts `size` members that serve clients over TLS only and ask for
    /// client certificates (a CA, server and client certificates made with
    /// `openssl`); waits until they are healthy.
    pub fn start_tls(size: usize) -> EtcdCluster {
        EtcdCluster::start_with(size, true)
    }

    /// The TLS files of a cluster started with [`EtcdCluster::start_tls`].
    pub fn tls(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    fn start_with(size: usize, tls: bool) -> EtcdCluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let files = tls.then(|| make_certificates(dir.path()));
        let members = (1..=size)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: super::free_port(),
                peer_port: super::free_port(),
                metrics_port: super::free_port(),
                tls,
                child: None,
            })
            .collect();
        let mut cluster = EtcdCluster {
            token: format!("lessnat-test-{}-{}", std::process::id(), super::free_port()),
            dir,
            members,
            tls: files,
        };
        for index in 0..size {
            cluster.spawn(index);
        }
        cluster.wait_healthy();
        cluster
    }

    /// Starts member `index` (0-based) with its data directory (new or kept).
    fn spawn(&mut self, index: usize) {
        let initial: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect();
        let member = &self.members[index];
        let data = self.dir.path().join(&member.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(index))
            .expect("etcd log file");
        let mut command = Command::new("etcd");
        if self.tls.is_some() {
            let dir = self.dir.path();
            command
                .arg("--cert-file")
                .arg(dir.join("server.pem"))
                .arg("--key-file")
                .arg(dir.join("server.key"))
                .arg("--trusted-ca-file")
                .arg(dir.join("ca.pem"))
                .arg("--client-cert-auth");
        }
        let metrics = format!("http://127.0.0.1:{}", member.metrics_port);
        let child = command
            .args(["--listen-metrics-urls", &metrics])
            .args(["--name", &member.name])
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen-client-urls", &member.client_url()])
            .args(["--advertise-client-urls", &member.client_url()])
            .args(["--listen-peer-urls", &member.peer_url()])
            .args(["--initial-advertise-peer-urls", &member.peer_url()])
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &self.token])
            // Fast elections, so a killed leader is replaced within a second.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("etcd log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting etcd: {e}"));
        self.members[index].child = Some(child);
    }

    fn log_path(&self, index: usize) -> PathBuf {
        self.dir
            .path()
            .join(format!("{}.log", self.members[index].name))
    }

    /// Every member's log, for a failing test's message.
    pub fn logs(&self) -> String {
        (0..self.members.len())
            .map(|i| {
                let text = std::fs::read_to_string(self.log_path(i)).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(20).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!("--- {}\n{}", self.members[i].name, tail.join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Every member's client URL (running or not).
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::client_url).collect()
    }

    /// The spec's `cluster.etcd` for this cluster (plain HTTP) under
    /// `prefix`, with a lease TTL of 2 s.
    pub fn etcd_spec(&self, prefix: &str) -> lessnat::spec::Etcd {
        lessnat::spec::Etcd {
            endpoints: self.endpoints().into_iter().map(Into::into).collect(),
            prefix: prefix.to_string().into(),
            tls: None,
            lease_ttl: lessnat::spec::HumanDuration::secs(2).into(),
        }
    }

    /// The client URL of member `index`.
    pub fn endpoint(&self, index: usize) -> String {
        self.members[index].client_url()
    }

    /// Waits until every running member says it is healthy and one leads.
    pub fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let running: Vec<usize> = (0..self.members.len())
                .filter(|i| self.members[*i].child.is_some())
                .collect();
            let healthy = running.iter().all(|i| {
                http(self.members[*i].metrics_port, "GET", "/health", "")
                    .is_some_and(|body| body.contains(r#""health":"true""#))
            });
            // A TLS cluster's status is not read over plain HTTP: healthy
            // members have a leader.
            if healthy && (self.tls.is_some() || self.leader().is_some()) {
                return;
            }
            for (i, member) in self.members.iter_mut().enumerate() {
                if let Some(status) = member
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten())
                {
                    panic!("etcd member {i} ended ({status}):\n{}", self.logs());
                }
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not become healthy within 30s:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The index of the member that leads now, as a running member sees it
    /// (`/v3/maintenance/status`: its own id and the leader's).
    pub fn leader(&self) -> Option<usize> {
        let mut ids = Vec::new();
        let mut leader = None;
        for (index, member) in self.members.iter().enumerate() {
            if member.child.is_none() {
                continue;
            }
            let body = http(member.client_port, "POST", "/v3/maintenance/status", "{}")?;
            let status: serde_json::Value = serde_json::from_str(&body).ok()?;
            let id = status["header"]["member_id"].as_str()?.to_string();
            let said = status["leader"].as_str()?.to_string();
            ids.push((id, index));
            leader = leader.or(Some(said)).filter(|l| *l != "0");
        }
        let leader = leader?;
        ids.into_iter()
            .find(|(id, _)| *id == leader)
            .map(|(_, i)| i)
    }

    /// Kills member `index` (SIGKILL, by its PID).
    pub fn kill(&mut self, index: usize) {
        if let Some(mut child) = self.members[index].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills every member.
    pub fn kill_all(&mut self) {
        for index in 0..self.members.len() {
            self.kill(index);
        }
    }

    /// Starts member `index` again with its data and waits until the
    /// running members are healthy.
    pub fn restart(&mut self, index: usize) {
        assert!(self.members[index].child.is_none(), "member {index} runs");
        self.spawn(index);
        self.wait_healthy();
    }

    /// Starts every member that is not running, then waits until healthy.
    pub fn restart_all(&mut self) {
        for index in 0..self.members.len() {
            if self.members[index].child.is_none() {
                self.spawn(index);
            }
        }
        self.wait_healthy();
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate in
/// `dir` (`ca.pem`, `server.pem`/`server.key`, `client.pem`/`client.key`).
fn make_certificates(dir: &std::path::Path) -> TlsFiles {
    let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let openssl = |args: &[&str]| {
        super::run("openssl", args);
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=lessnat-test-ca",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout",
        &path("ca.key"),
        "-out",
        &path("ca.pem"),
    ]);
    for (name, usage) in [("server", "serverAuth"), ("client", "clientAuth")] {
        let ext = path(&format!("{name}.ext"));
        std::fs::write(
            &ext,
            format!(
                "subjectAltName=IP:127.0.0.1\nextendedKeyUsage={usage}\nbasicConstraints=CA:FALSE\n"
            ),
        )
        .expect("extensions file");
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            &format!("/CN=lessnat-test-{name}"),
            "-keyout",
            &path(&format!("{name}.key")),
            "-out",
            &path(&format!("{name}.csr")),
        ]);
        openssl(&[
            "x509",
            "-req",
            "-days",
            "1",
            "-in",
            &path(&format!("{name}.csr")),
            "-CA",
            &path("ca.pem"),
            "-CAkey",
            &path("ca.key"),
            "-CAcreateserial",
            "-extfile",
            &ext,
            "-out",
            &path(&format!("{name}.pem")),
        ]);
    }
    TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join("client.pem"),
        key: dir.join("client.key"),
    }
}

/// One HTTP/1.0 request to `127.0.0.1:port`; the body of a 200 answer.
fn http(port: u16, method: &str, path: &str, body: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let request = format!(
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    let (head, body) = answer.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.0 200")
        .then(|| body.to_string())
        .or_else(|| head.starts_with("HTTP/1.1 200").then(|| body.to_string()))
}
