//! The routed-mode site of `lessnat::demo::topology` for tests and
//! benchmarks that run the `lessnat` binary once per node, as on separate
//! machines: namespaces that panic when a command fails ([`TestNetns`]),
//! node names with a random tag (tests share one Docker engine), state
//! directories in a temporary directory, and test-only probes (nft counters,
//! UDP with chosen TOS bits). On drop, also on panic, `lessnat destroy` runs
//! for every node and the containers of its nodes are removed, then the
//! namespaces are deleted.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use lessnat::demo::topology::{self, Site};
use serde_json::Value;

#[allow(unused_imports)] // each test binary uses a different part
pub use lessnat::demo::topology::{
    CLIENT_ADDRESSES, CLIENT_ADDRESSES6, CLIENT_SUBNET, CLIENT_SUBNET6, CLIENT_THREADS, HTTP_PORT,
    LB_ADDRESSES, LB_FRONT_ADDRESSES, Replica, Service, Stack, UDP_PORT, VIP, VIP_PORT,
    VIP_UDP_PORT, VIP6, WORKER_ADDRESSES, WORKER_SUBNETS, client_of, saw_real_client, vip, vip_udp,
    vip6,
};

use super::TestNetns;
use super::load::{Sample, enter_netns};

/// A client namespace.
pub type Client = topology::Client<TestNetns>;
/// A lessnat node in its namespace.
pub type Node = topology::Node<TestNetns>;

/// How long one `lessnat` run may take before it is killed.
pub const LESSNAT_TIMEOUT: Duration = Duration::from_secs(120);

/// The whole site (see `lessnat::demo::topology`), with the tests' helpers.
pub struct Topology {
    site: Site<TestNetns>,
    dir: tempfile::TempDir,
}

impl std::ops::Deref for Topology {
    type Target = Site<TestNetns>;
    fn deref(&self) -> &Site<TestNetns> {
        &self.site
    }
}

/// A short random tag: node names (and so container names) of one topology
/// differ from every other test's.
fn random_tag() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    format!("{:06x}", hasher.finish() & 0xff_ffff)
}

/// Runs `command`, killing it after `timeout`; its output whatever the status.
pub fn output_within(mut command: Command, timeout: Duration) -> Output {
    let what = format!("{command:?}");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    // Read both pipes on threads so a chatty child never blocks.
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stdout, &mut buf);
        buf
    });
    let err = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stderr, &mut buf);
        buf
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let status = child.wait().expect("wait");
            let mut stderr = err.join().unwrap_or_default();
            stderr.extend_from_slice(format!("\n(killed after {timeout:?}: {what})").as_bytes());
            return Output {
                status,
                stdout: out.join().unwrap_or_default(),
                stderr,
            };
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// Stdout and stderr of `output`, for messages.
pub fn show(output: &Output) -> String {
    format!(
        "exit: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

impl Topology {
    /// Builds the site with `workers` workers (1 or 2). Needs root and `ip`
    /// (check with `support::root_with` first).
    pub fn new(workers: usize) -> Topology {
        Topology::new_stack(workers, Stack::Ipv4)
    }

    /// [`Topology::new`] with the address families of `stack`.
    pub fn new_stack(workers: usize, stack: Stack) -> Topology {
        assert!((1..=2).contains(&workers), "1 or 2 workers, not {workers}");
        let dir = tempfile::tempdir().expect("temp dir");
        let site = Site::build_stack("lnt-", &random_tag(), workers, dir.path(), stack)
            .unwrap_or_else(|e| panic!("building the site: {}", lessnat::error::chain(&e)));
        Topology { site, dir }
    }

    /// Writes the spec for `services` to a file named `name` in the
    /// topology's directory; returns its path.
    pub fn write_spec(&self, name: &str, services: &[Service]) -> PathBuf {
        let path = self.dir.path().join(format!("{name}.yaml"));
        std::fs::write(&path, self.spec(services))
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path
    }

    /// `lessnat --node N --netns NS --state-dir D --no-color ARGS` for `node`.
    pub fn lessnat(node: &Node, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_lessnat"));
        let netns = ["--node", &node.name, "--netns", &node.ns.name];
        command.args(netns).arg("--state-dir").arg(&node.state_dir);
        command.arg("--no-color").args(args);
        for inherited in [
            "LESSNAT_TEST_KILL_AFTER",
            "LESSNAT_NODE",
            "LESSNAT_STATE_DIR",
        ] {
            command.env_remove(inherited);
        }
        command
    }

    /// `lessnat apply --auto-approve -f SPEC` on `node`; its output, whatever
    /// the status.
    pub fn try_apply(node: &Node, spec: &Path) -> Output {
        let mut command = Topology::lessnat(node, &["apply", "--auto-approve", "-f"]);
        command.arg(spec);
        output_within(command, LESSNAT_TIMEOUT)
    }

    /// `lessnat apply --auto-approve -f SPEC` on `node`; panics when it fails.
    pub fn apply(node: &Node, spec: &Path) -> Output {
        let output = Topology::try_apply(node, spec);
        assert!(
            output.status.success(),
            "lessnat apply on {} failed:\n{}",
            node.name,
            show(&output)
        );
        output
    }

    /// Applies `spec` on every worker, then on every LB.
    pub fn apply_all(&self, spec: &Path) {
        for node in self.workers.iter().chain(&self.lbs) {
            Topology::apply(node, spec);
        }
    }

    /// `lessnat plan --detailed-exitcode -f SPEC` on `node`: the exit code and output.
    pub fn plan_exit(node: &Node, spec: &Path) -> (Option<i32>, String) {
        let mut command = Topology::lessnat(node, &["plan", "--detailed-exitcode", "-f"]);
        command.arg(spec);
        let output = output_within(command, LESSNAT_TIMEOUT);
        (output.status.code(), show(&output))
    }

    /// Names of the containers of `worker` (any state), sorted: those whose
    /// name is `lessnat-SERVICE.NODE` with an optional slot.
    pub fn containers(worker: &Node) -> Vec<String> {
        let output = Command::new("docker")
            .args(["ps", "-a", "--format", "{{.Names}}"])
            .output()
            .expect("docker ps");
        let mut names: Vec<String> = String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter(|name| {
                let mut parts = name.split('.');
                name.starts_with("lessnat-") && parts.nth(1) == Some(worker.name.as_str())
            })
            .map(str::to_string)
            .collect();
        names.sort();
        names
    }

    /// An HTTP `/peer` request from client `client` to the VIP.
    pub fn request(&self, client: usize, path: &str) -> Sample {
        self.request_to(client, vip(), path)
    }

    /// An HTTP request from client `client` to `target` (such as [`vip6`]).
    pub fn request_to(&self, client: usize, target: SocketAddr, path: &str) -> Sample {
        super::load::request_in(
            &self.clients[client].ns.name,
            client,
            target,
            path,
            Duration::from_secs(5),
        )
    }

    /// A strict reverse-path filter for IPv6 on every LB and worker, the
    /// nftables form of `rp_filter=1` (IPv6 has no `rp_filter`): a packet
    /// whose source is not routed back out of the interface it came in on,
    /// looked up with its mark, is dropped and counted (test-owned table
    /// `ip6 lnt_rpf`, counter `dropped`). It runs after lessnat's
    /// `routed_mark` (priority -150), as the kernel's IPv4 check runs
    /// after every prerouting hook.
    pub fn strict_rpfilter6(&self) {
        for node in self.nodes() {
            let _ = node
                .ns
                .try_exec("nft", &["delete", "table", "ip6", "lnt_rpf"]);
            node.ns.nft(
                "table ip6 lnt_rpf {\n  counter dropped {}\n  chain prerouting {\n    \
                 type filter hook prerouting priority -100; policy accept;\n    \
                 icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept\n    \
                 fib saddr . mark . iif oif missing counter name dropped drop\n  }\n}\n",
            );
        }
    }

    /// The packets [`Topology::strict_rpfilter6`] dropped on each node, by name.
    pub fn rpfilter6_drops(&self) -> BTreeMap<String, u64> {
        self.nodes()
            .map(|node| {
                let dropped = nft_counters(&node.ns, "ip6", "lnt_rpf")
                    .get("dropped")
                    .copied()
                    .unwrap_or(0);
                (node.name.clone(), dropped)
            })
            .collect()
    }

    /// Counts, in each LB's forward hook, packets from and to each client,
    /// at its IPv4 and (on sites with IPv6) IPv6 address (test-owned table
    /// `inet lnt_paths`, named counters `from_c1`, `to_c1`, `from_c2`,
    /// `to_c2`; only replies go to clients). Resets the counters when called
    /// again.
    pub fn count_forwarded(&self) {
        for lb in &self.lbs {
            let _ = lb
                .ns
                .try_exec("nft", &["delete", "table", "inet", "lnt_paths"]);
            let mut script = String::from("table inet lnt_paths {\n");
            for (i, client) in self.clients.iter().enumerate() {
                let n = i + 1;
                let _ = writeln!(script, "  counter from_c{n} {{}}\n  counter to_c{n} {{}}");
                let mut rules = format!(
                    "ip saddr {0} counter name from_c{n}; ip daddr {0} counter name to_c{n};",
                    client.address
                );
                if let Some(address6) = client.address6 {
                    let _ = write!(
                        rules,
                        " ip6 saddr {address6} counter name from_c{n}; ip6 daddr {address6} counter name to_c{n};"
                    );
                }
                let _ = writeln!(script, "  chain count_{n} {{ {rules} }}");
            }
            script.push_str(
                "  chain forward { type filter hook forward priority -300; policy accept; \
                 jump count_1; jump count_2; }\n}\n",
            );
            lb.ns.nft(&script);
        }
    }

    /// The counters [`Topology::count_forwarded`] installed on LB `lb`.
    pub fn forwarded(&self, lb: usize) -> BTreeMap<String, u64> {
        nft_counters(&self.lbs[lb].ns, "inet", "lnt_paths")
    }

    /// Counts, in worker `worker`'s prerouting hook (before anything of
    /// lessnat's), the UDP datagrams arriving from the back network for the
    /// containers' UDP port: all of them (`all_udp`), and those with DSCP = LB
    /// *n*'s id and ECN ECT(1) (`lbN_ect1`). Test-owned table `ip lnt_ecn`;
    /// resets the counters when called again. With `ipv6`, the same of
    /// IPv6 datagrams (`ip6 dscp`, `ip6 ecn`).
    pub fn count_udp_marks(&self, worker: usize, ipv6: bool) {
        let ns = &self.workers[worker].ns;
        let _ = ns.try_exec("nft", &["delete", "table", "inet", "lnt_ecn"]);
        let ip = if ipv6 { "ip6" } else { "ip" };
        let mut script = String::from(
            "table inet lnt_ecn {\n  counter all_udp {}\n  counter lb1_ect1 {}\n  counter lb2_ect1 {}\n  \
             chain prerouting {\n    type filter hook prerouting priority -400; policy accept;\n",
        );
        let _ = writeln!(
            script,
            "    iifname \"fab\" meta nfproto {} udp dport {UDP_PORT} counter name all_udp",
            if ipv6 { "ipv6" } else { "ipv4" }
        );
        for lb in &self.lbs {
            let id = lb.lb_id.expect("an LB has an id");
            let _ = writeln!(
                script,
                "    iifname \"fab\" udp dport {UDP_PORT} {ip} dscp {id} {ip} ecn ect1 counter name lb{id}_ect1"
            );
        }
        script.push_str("  }\n}\n");
        ns.nft(&script);
    }

    /// The counters [`Topology::count_udp_marks`] installed on worker `worker`.
    pub fn udp_marks(&self, worker: usize) -> BTreeMap<String, u64> {
        nft_counters(&self.workers[worker].ns, "inet", "lnt_ecn")
    }

    /// Adds (or with `on == false` removes) the masquerading baseline on
    /// every LB (`Site::masquerade`); panics when nft fails.
    pub fn masquerade(&self, on: bool) {
        self.site
            .masquerade(on)
            .unwrap_or_else(|e| panic!("masquerade: {}", lessnat::error::chain(&e)));
    }

    /// Runs `lessnat destroy` on every node and removes every container of
    /// the site's workers that is left.
    pub fn clean_up(&self) {
        for node in self.nodes() {
            let command = Topology::lessnat(node, &["destroy", "--auto-approve"]);
            let output = output_within(command, LESSNAT_TIMEOUT);
            if !output.status.success() {
                eprintln!(
                    "cleanup: lessnat destroy --node {} failed:\n{}",
                    node.name,
                    show(&output)
                );
            }
        }
        let names: Vec<String> = self.workers.iter().flat_map(Topology::containers).collect();
        if !names.is_empty() {
            let _ = Command::new("docker")
                .args(["rm", "-f"])
                .args(&names)
                .output();
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.clean_up();
        // The namespaces go when the fields drop, the fabric last.
    }
}

/// `nft -j list ruleset` in `ns`.
pub fn ruleset(ns: &TestNetns) -> Value {
    let output = ns.exec("nft", &["-j", "list", "ruleset"]);
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("nft JSON in {}: {e}", ns.name))
}

/// Every rule in `ns` with a `snat` or `masquerade` statement, as JSON text.
pub fn nat_statements(ns: &TestNetns) -> Vec<String> {
    fn has_source_nat(value: &Value) -> bool {
        match value {
            Value::Object(map) => map
                .iter()
                .any(|(k, v)| k == "snat" || k == "masquerade" || has_source_nat(v)),
            Value::Array(items) => items.iter().any(has_source_nat),
            _ => false,
        }
    }
    let ruleset = ruleset(ns);
    ruleset["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|item| item.get("rule"))
        .filter(|rule| has_source_nat(&rule["expr"]))
        .map(Value::to_string)
        .collect()
}

/// Packet counts of the named counters of table `family name` in `ns`.
pub fn nft_counters(ns: &TestNetns, family: &str, table: &str) -> BTreeMap<String, u64> {
    let output = ns.exec("nft", &["-j", "list", "counters", "table", family, table]);
    let json: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("nft counters JSON in {}: {e}", ns.name));
    json["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|item| item.get("counter"))
        .filter_map(|c| Some((c["name"].as_str()?.to_string(), c["packets"].as_u64()?)))
        .collect()
}

/// Whether `ns` has a route to `destination` (`ip route get`, no mark).
pub fn has_route(ns: &TestNetns, destination: IpAddr) -> bool {
    ns.try_exec("ip", &["route", "get", &destination.to_string()])
        .status
        .success()
}

/// Sends `count` UDP datagrams from one socket in `netns` to `target` with
/// IP_TOS (IPV6_TCLASS for an IPv6 target) `tos`, waiting up to `timeout` for an answer to each; returns the
/// answers (the test server's `VERSION PEER`), in order, `None` for a lost one.
pub fn udp_exchange(
    netns: &str,
    target: SocketAddr,
    tos: u8,
    count: usize,
    timeout: Duration,
) -> Vec<Option<String>> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                enter_netns(netns).unwrap_or_else(|e| panic!("entering {netns}: {e}"));
                let any = if target.is_ipv4() {
                    "0.0.0.0:0"
                } else {
                    "[::]:0"
                };
                let socket = UdpSocket::bind(any).expect("bind a UDP socket");
                let sock = socket2::SockRef::from(&socket);
                if target.is_ipv4() {
                    sock.set_tos_v4(u32::from(tos)).expect("IP_TOS");
                } else {
                    sock.set_tclass_v6(u32::from(tos)).expect("IPV6_TCLASS");
                }
                socket.set_read_timeout(Some(timeout)).expect("timeout");
                let mut buf = [0u8; 512];
                (0..count)
                    .map(|i| {
                        socket
                            .send_to(format!("ping {i}").as_bytes(), target)
                            .expect("send a datagram");
                        socket
                            .recv(&mut buf)
                            .ok()
                            .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
                    })
                    .collect()
            })
            .join()
            .expect("the UDP thread panicked")
    })
}
