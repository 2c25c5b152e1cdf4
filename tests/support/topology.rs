//! A routed-mode site made of network namespaces, for tests and benchmarks
//! that run `lessnat` once per node, as on separate machines.
//!
//! ```text
//!   client 1 198.51.100.1 ─┐  front 198.51.100.0/24   ┌─ lb 1 .11 ─┐   back 192.0.2.0/24   ┌─ worker 1 .10 (10.20.1.0/24)
//!   client 2 198.51.100.2 ─┘  (bridge in "fabric")   └─ lb 2 .12 ─┘   (bridge in "fabric")  └─ worker 2 .11 (10.20.2.0/24)
//!                                                       192.0.2.2/.3
//! ```
//!
//! Client 1 routes the VIP 203.0.113.10 via LB 1, client 2 via LB 2. Workers
//! only know the back network: they have no route to the clients, so a reply
//! can only leave through an LB by policy routing; reverse-path filtering is
//! strict on them (`rp_filter=1`, all and default). Nothing else is set up on
//! the nodes, and IP forwarding is off on them: forwarding, the VIP, routes
//! to container subnets and the rest are lessnat's job.
//!
//! Every namespace is made under /run/netns (so `--netns NAME` works) and
//! deleted on drop, also on panic, after `lessnat destroy` has run for every
//! node and the containers of its nodes (named after node names that carry a
//! random tag, as tests share one Docker engine) have been removed. The host
//! namespace is never touched: veths are made inside the namespaces.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::TestNetns;
use super::load::{Load, LoadConfig, Sample, enter_netns};

/// The VIP both load balancers serve.
pub const VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// The VIP's TCP (HTTP) port.
pub const VIP_PORT: u16 = 80;
/// The VIP's UDP port.
pub const VIP_UDP_PORT: u16 = 53;
/// The containers' HTTP port.
pub const HTTP_PORT: u16 = 8080;
/// The containers' UDP port.
pub const UDP_PORT: u16 = 5353;
/// The clients' network.
pub const CLIENT_SUBNET: &str = "198.51.100.0/24";
/// The clients' addresses; client *i* routes the VIP via LB *i*.
pub const CLIENT_ADDRESSES: [Ipv4Addr; 2] = [
    Ipv4Addr::new(198, 51, 100, 1),
    Ipv4Addr::new(198, 51, 100, 2),
];
/// The LBs' addresses on the clients' network.
pub const LB_FRONT_ADDRESSES: [Ipv4Addr; 2] = [
    Ipv4Addr::new(198, 51, 100, 11),
    Ipv4Addr::new(198, 51, 100, 12),
];
/// The LBs' node addresses (back network); LB *i* has id *i + 1*.
pub const LB_ADDRESSES: [Ipv4Addr; 2] = [Ipv4Addr::new(192, 0, 2, 2), Ipv4Addr::new(192, 0, 2, 3)];
/// The workers' node addresses (back network).
pub const WORKER_ADDRESSES: [Ipv4Addr; 2] =
    [Ipv4Addr::new(192, 0, 2, 10), Ipv4Addr::new(192, 0, 2, 11)];
/// The workers' container subnets.
pub const WORKER_SUBNETS: [&str; 2] = ["10.20.1.0/24", "10.20.2.0/24"];
/// Every container subnet, as an nft set.
pub const CONTAINER_SUBNETS_NFT: &str = "{ 10.20.1.0/24, 10.20.2.0/24 }";

/// How long one `lessnat` run may take before it is killed.
pub const LESSNAT_TIMEOUT: Duration = Duration::from_secs(120);

/// A client namespace.
pub struct Client {
    /// Its namespace.
    pub ns: TestNetns,
    /// Its address.
    pub address: Ipv4Addr,
}

/// A lessnat node: an LB or a worker, each in its own namespace with its own
/// state directory.
pub struct Node {
    /// The node's name in the spec (with the topology's tag).
    pub name: String,
    /// Its namespace.
    pub ns: TestNetns,
    /// The node address (back network).
    pub address: Ipv4Addr,
    /// The load-balancer id, for LBs.
    pub lb_id: Option<u8>,
    /// The container subnet, for workers.
    pub subnet: Option<&'static str>,
    /// Its `--state-dir`.
    pub state_dir: PathBuf,
}

/// One routed replica in a spec.
#[derive(Debug, Clone)]
pub struct Replica {
    /// Index of the worker in [`Topology::workers`].
    pub worker: usize,
    /// Its address.
    pub address: Ipv4Addr,
    /// Where an upgrade starts the new version (`nextAddress`), if declared.
    pub next_address: Option<Ipv4Addr>,
}

impl Replica {
    /// Replica `host` (the last byte, e.g. 5 → 10.20.1.5) on worker
    /// `worker`, with `nextAddress` at `host + 1`.
    pub fn on(worker: usize, host: u8) -> Replica {
        let base = WORKER_ADDRESSES[worker].octets()[3] - 9; // worker 1 → 10.20.1.x
        Replica {
            worker,
            address: Ipv4Addr::new(10, 20, base, host),
            next_address: Some(Ipv4Addr::new(10, 20, base, host + 1)),
        }
    }
}

/// A routed service in a spec: the test server, HTTP on 8080 (VIP port 80)
/// and UDP on 5353 (VIP port 53).
#[derive(Debug, Clone)]
pub struct Service {
    /// The service name.
    pub name: String,
    /// The image (`support::image::test_image(..)`).
    pub image: String,
    /// Its replicas.
    pub replicas: Vec<Replica>,
    /// `upgrade.drainTimeout`.
    pub drain_timeout: &'static str,
    /// `upgrade.switchWait`: how long a worker gives the LBs to switch to
    /// the next replica before it counts the old one's connections.
    pub switch_wait: &'static str,
}

impl Service {
    /// `name` with `image` and `replicas`.
    pub fn new(name: &str, image: &str, replicas: Vec<Replica>) -> Service {
        Service {
            name: name.to_string(),
            image: image.to_string(),
            replicas,
            drain_timeout: "30s",
            switch_wait: "3s",
        }
    }

    /// The same service with another image.
    pub fn with_image(&self, image: &str) -> Service {
        Service {
            image: image.to_string(),
            ..self.clone()
        }
    }
}

/// The whole site; see the module documentation.
pub struct Topology {
    /// The random tag in every node name.
    pub tag: String,
    /// The two clients.
    pub clients: Vec<Client>,
    /// The two LB nodes (ids 1 and 2).
    pub lbs: Vec<Node>,
    /// One or two workers.
    pub workers: Vec<Node>,
    /// The namespace holding the two bridges.
    pub fabric: TestNetns,
    dir: tempfile::TempDir,
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
        assert!((1..=2).contains(&workers), "1 or 2 workers, not {workers}");
        let tag = random_tag();
        let dir = tempfile::tempdir().expect("temp dir");
        // Made first, deleted last: every veth has its bridge end in here.
        let fabric = TestNetns::new(&format!("{tag}-fab"));
        fabric.exec("ip", &["link", "add", "front", "type", "bridge"]);
        fabric.exec("ip", &["link", "add", "back", "type", "bridge"]);
        for bridge in ["front", "back"] {
            fabric.exec("ip", &["link", "set", bridge, "up"]);
        }
        let mut topology = Topology {
            tag: tag.clone(),
            clients: Vec::new(),
            lbs: Vec::new(),
            workers: Vec::new(),
            fabric,
            dir,
        };
        for (i, address) in CLIENT_ADDRESSES.into_iter().enumerate() {
            let ns = TestNetns::new(&format!("{tag}-c{}", i + 1));
            topology.cable(&ns, "fab", &format!("c{}", i + 1), "front");
            ns.exec(
                "ip",
                &["addr", "add", &format!("{address}/24"), "dev", "fab"],
            );
            ns.exec("ip", &["link", "set", "fab", "up"]);
            let via = LB_FRONT_ADDRESSES[i].to_string();
            ns.exec("ip", &["route", "add", &format!("{VIP}/32"), "via", &via]);
            topology.clients.push(Client { ns, address });
        }
        for i in 0..2 {
            let n = i + 1;
            let ns = TestNetns::new(&format!("{tag}-lb{n}"));
            topology.cable(&ns, "front", &format!("lb{n}f"), "front");
            topology.cable(&ns, "back", &format!("lb{n}b"), "back");
            let front = format!("{}/24", LB_FRONT_ADDRESSES[i]);
            let back = format!("{}/24", LB_ADDRESSES[i]);
            ns.exec("ip", &["addr", "add", &front, "dev", "front"]);
            ns.exec("ip", &["addr", "add", &back, "dev", "back"]);
            ns.exec("ip", &["link", "set", "front", "up"]);
            ns.exec("ip", &["link", "set", "back", "up"]);
            let id = u8::try_from(n).expect("lb id");
            let node = topology.node(ns, format!("lb{n}-{tag}"), LB_ADDRESSES[i]);
            topology.lbs.push(Node {
                lb_id: Some(id),
                ..node
            });
        }
        for i in 0..workers {
            let n = i + 1;
            let ns = TestNetns::new(&format!("{tag}-w{n}"));
            topology.cable(&ns, "fab", &format!("w{n}"), "back");
            let address = format!("{}/24", WORKER_ADDRESSES[i]);
            ns.exec("ip", &["addr", "add", &address, "dev", "fab"]);
            for scope in ["all", "default", "fab"] {
                ns.exec(
                    "sysctl",
                    &["-qw", &format!("net.ipv4.conf.{scope}.rp_filter=1")],
                );
            }
            ns.exec("ip", &["link", "set", "fab", "up"]);
            let node = topology.node(ns, format!("w{n}-{tag}"), WORKER_ADDRESSES[i]);
            topology.workers.push(Node {
                subnet: Some(WORKER_SUBNETS[i]),
                ..node
            });
        }
        topology
    }

    /// A lessnat node in `ns`, with IP forwarding off (a new namespace
    /// copies the host's setting, 1 where Docker runs; turning it on is
    /// lessnat's job) and a state directory of its own.
    fn node(&self, ns: TestNetns, name: String, address: Ipv4Addr) -> Node {
        ns.exec("sysctl", &["-qw", "net.ipv4.ip_forward=0"]);
        Node {
            state_dir: self.dir.path().join(&name),
            name,
            ns,
            address,
            lb_id: None,
            subnet: None,
        }
    }

    /// A veth from `ns` (named `inside` there) to `bridge` in the fabric
    /// (named `port` there). No IPv6 on either end: its link-local
    /// addresses and router solicitations are noise here.
    fn cable(&self, ns: &TestNetns, inside: &str, port: &str, bridge: &str) {
        let fabric = &self.fabric;
        fabric.exec(
            "ip",
            &[
                "link", "add", port, "type", "veth", "peer", "name", inside, "netns", &ns.name,
            ],
        );
        for (space, name) in [(fabric, port), (ns, inside)] {
            let key = format!("net.ipv6.conf.{name}.disable_ipv6=1");
            let _ = space.try_exec("sysctl", &["-qw", &key]);
        }
        fabric.exec("ip", &["link", "set", port, "master", bridge, "up"]);
    }

    /// Every namespace of the site.
    pub fn namespaces(&self) -> Vec<&TestNetns> {
        let mut all: Vec<&TestNetns> = self.clients.iter().map(|c| &c.ns).collect();
        all.extend(self.lbs.iter().chain(&self.workers).map(|n| &n.ns));
        all.push(&self.fabric);
        all
    }

    /// Every lessnat node, LBs first.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.lbs.iter().chain(&self.workers)
    }

    /// The spec for `services` on this site's nodes.
    pub fn spec(&self, services: &[Service]) -> String {
        let mut yaml = String::from("version: 1\nnodes:\n");
        for node in self.nodes() {
            let role = match (node.lb_id, node.subnet) {
                (Some(id), _) => format!("loadBalancer: {{ id: {id}, vips: [{VIP}] }}"),
                (None, Some(subnet)) => format!("containerSubnet: {subnet}"),
                (None, None) => unreachable!("a node is an LB or a worker"),
            };
            let _ = writeln!(
                yaml,
                "  - name: {}\n    address: {}\n    {role}",
                node.name, node.address
            );
        }
        yaml.push_str("services:\n");
        for service in services {
            let _ = write!(
                yaml,
                "  - name: {}\n    image: {}\n    network: routed\n    \
                 command: [\"--listen\", \"0.0.0.0:{{port.http}}\", \"--udp\", \"0.0.0.0:{{port.dns}}\"]\n    \
                 replicas:\n",
                service.name, service.image
            );
            for replica in &service.replicas {
                let node = &self.workers[replica.worker].name;
                let _ = write!(
                    yaml,
                    "      - {{ node: {node}, address: {}",
                    replica.address
                );
                if let Some(next) = replica.next_address {
                    let _ = write!(yaml, ", nextAddress: {next}");
                }
                yaml.push_str(" }\n");
            }
            let _ = write!(
                yaml,
                "    ports:\n      \
                 - {{ name: http, port: {HTTP_PORT}, protocol: tcp, vip: {VIP}, vipPort: {VIP_PORT} }}\n      \
                 - {{ name: dns, port: {UDP_PORT}, protocol: udp, vip: {VIP}, vipPort: {VIP_UDP_PORT} }}\n    \
                 health:\n      http: {{ path: /healthz, port: http }}\n      interval: 200ms\n      \
                 timeout: 1s\n      healthyAfter: 1\n      startTimeout: 20s\n    \
                 upgrade:\n      drainTimeout: {}\n      switchWait: {}\n      stopTimeout: 5s\n",
                service.drain_timeout, service.switch_wait
            );
        }
        yaml
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
        super::load::request_in(
            &self.clients[client].ns.name,
            client,
            vip(),
            path,
            Duration::from_secs(5),
        )
    }

    /// Starts a pool of `threads` client threads in each client namespace,
    /// asking the VIP for `/peer`, as `adjust` configures it; client *i*'s
    /// threads are numbered from *i* × [`CLIENT_THREADS`] (see [`client_of`]).
    pub fn load(&self, threads: usize, adjust: impl Fn(LoadConfig) -> LoadConfig) -> Vec<Load> {
        self.clients
            .iter()
            .enumerate()
            .map(|(i, client)| {
                let config = LoadConfig {
                    clients: threads,
                    first_client: i * CLIENT_THREADS,
                    ..LoadConfig::to(vip())
                        .in_netns(&client.ns.name)
                        .path("/peer")
                };
                Load::start(adjust(config))
            })
            .collect()
    }

    /// Counts, in each LB's forward hook, packets from and to each client
    /// (test-owned table `ip lnt_paths`, named counters `from_c1`, `to_c1`,
    /// `from_c2`, `to_c2`; only replies go to clients). Resets the counters
    /// when called again.
    pub fn count_forwarded(&self) {
        for lb in &self.lbs {
            let _ = lb
                .ns
                .try_exec("nft", &["delete", "table", "ip", "lnt_paths"]);
            let mut script = String::from("table ip lnt_paths {\n");
            for (i, client) in CLIENT_ADDRESSES.iter().enumerate() {
                let n = i + 1;
                let _ = writeln!(script, "  counter from_c{n} {{}}\n  counter to_c{n} {{}}");
                let _ = writeln!(
                    script,
                    "  chain count_{n} {{ ip saddr {client} counter name from_c{n}; ip daddr {client} counter name to_c{n}; }}"
                );
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
        nft_counters(&self.lbs[lb].ns, "ip", "lnt_paths")
    }

    /// Counts, in worker `worker`'s prerouting hook (before anything of
    /// lessnat's), the UDP datagrams arriving from the back network for the
    /// containers' UDP port: all of them (`all_udp`), and those with DSCP = LB
    /// *n*'s id and ECN ECT(1) (`lbN_ect1`). Test-owned table `ip lnt_ecn`;
    /// resets the counters when called again.
    pub fn count_udp_marks(&self, worker: usize) {
        let ns = &self.workers[worker].ns;
        let _ = ns.try_exec("nft", &["delete", "table", "ip", "lnt_ecn"]);
        let mut script = String::from(
            "table ip lnt_ecn {\n  counter all_udp {}\n  counter lb1_ect1 {}\n  counter lb2_ect1 {}\n  \
             chain prerouting {\n    type filter hook prerouting priority -400; policy accept;\n",
        );
        let _ = writeln!(
            script,
            "    iifname \"fab\" udp dport {UDP_PORT} counter name all_udp"
        );
        for lb in &self.lbs {
            let id = lb.lb_id.expect("an LB has an id");
            let _ = writeln!(
                script,
                "    iifname \"fab\" udp dport {UDP_PORT} ip dscp {id} ip ecn ect1 counter name lb{id}_ect1"
            );
        }
        script.push_str("  }\n}\n");
        ns.nft(&script);
    }

    /// The counters [`Topology::count_udp_marks`] installed on worker `worker`.
    pub fn udp_marks(&self, worker: usize) -> BTreeMap<String, u64> {
        nft_counters(&self.workers[worker].ns, "ip", "lnt_ecn")
    }

    /// Adds (or with `on == false` removes) a test-owned masquerade of
    /// everything forwarded to the container subnets on every LB: the
    /// baseline "LB with SNAT" (table `ip lnt_masq`).
    pub fn masquerade(&self, on: bool) {
        for lb in &self.lbs {
            let _ = lb
                .ns
                .try_exec("nft", &["delete", "table", "ip", "lnt_masq"]);
            if on {
                lb.ns.nft(&format!(
                    "table ip lnt_masq {{\n  chain postrouting {{\n    \
                     type nat hook postrouting priority 100; policy accept;\n    \
                     ip daddr {CONTAINER_SUBNETS_NFT} masquerade\n  }}\n}}\n"
                ));
            }
        }
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

/// Load threads of one client namespace are numbered in a range this long.
pub const CLIENT_THREADS: usize = 1000;

/// The index of the client namespace a sample of [`Topology::load`] came from.
pub fn client_of(sample: &Sample) -> usize {
    sample.client / CLIENT_THREADS
}

/// The VIP's HTTP address.
pub fn vip() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(VIP, VIP_PORT))
}

/// The VIP's UDP address.
pub fn vip_udp() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(VIP, VIP_UDP_PORT))
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
pub fn has_route(ns: &TestNetns, destination: Ipv4Addr) -> bool {
    ns.try_exec("ip", &["route", "get", &destination.to_string()])
        .status
        .success()
}

/// Sends `count` UDP datagrams from one socket in `netns` to `target` with
/// IP_TOS `tos`, waiting up to `timeout` for an answer to each; returns the
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
                let socket = UdpSocket::bind("0.0.0.0:0").expect("bind a UDP socket");
                socket2::SockRef::from(&socket)
                    .set_tos_v4(u32::from(tos))
                    .expect("IP_TOS");
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
