//! A routed-mode site made of network namespaces, for `lessnat demo
//! --routed`, the routed tests and the routed benchmark, where every node is
//! driven by its own lessnat, as on separate machines.
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
//! A site of [`Stack::Ipv6`] or [`Stack::Dual`] also numbers every network
//! in IPv6 (clients `2001:db8:c::1`/`::2`, LBs `2001:db8:c::11`/`::12` in
//! front and `2001:db8:b::2`/`::3` behind, workers `2001:db8:b::10`/`::11`
//! with `fd00:20:1::/64` and `fd00:20:2::/64`, the VIP `2001:db8:f::10`),
//! its addresses without duplicate address detection so they work at once;
//! the IPv6 spec uses only those. IPv6 has no `rp_filter`: its strict
//! reverse-path filter is a test's to add, in nftables.
//!
//! Every namespace is made under /run/netns (so `--netns NAME` works) and
//! deleted when the site drops, the fabric last; whoever ran lessnat on the
//! nodes removes what it made first. The host namespace is never touched:
//! veths are made inside the namespaces.
//!
//! A site holds its namespaces as `N`: [`Namespace`] itself, or a caller's
//! wrapper around it (the tests' panicking one).

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};

use super::load::{Load, LoadConfig, Sample};
use super::namespace::{Namespace, NamespaceError};

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
/// The IPv6 VIP both load balancers serve, on sites with IPv6.
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xf, 0, 0, 0, 0, 0x10);
/// The clients' IPv6 network.
pub const CLIENT_SUBNET6: &str = "2001:db8:c::/64";
/// The clients' IPv6 addresses.
pub const CLIENT_ADDRESSES6: [Ipv6Addr; 2] = [
    Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 1),
    Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 2),
];
/// The LBs' IPv6 addresses on the clients' network.
pub const LB_FRONT_ADDRESSES6: [Ipv6Addr; 2] = [
    Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 0x11),
    Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 0x12),
];
/// The LBs' IPv6 node addresses (back network).
pub const LB_ADDRESSES6: [Ipv6Addr; 2] = [
    Ipv6Addr::new(0x2001, 0xdb8, 0xb, 0, 0, 0, 0, 2),
    Ipv6Addr::new(0x2001, 0xdb8, 0xb, 0, 0, 0, 0, 3),
];
/// The workers' IPv6 node addresses (back network).
pub const WORKER_ADDRESSES6: [Ipv6Addr; 2] = [
    Ipv6Addr::new(0x2001, 0xdb8, 0xb, 0, 0, 0, 0, 0x10),
    Ipv6Addr::new(0x2001, 0xdb8, 0xb, 0, 0, 0, 0, 0x11),
];
/// The workers' IPv6 container subnets.
pub const WORKER_SUBNETS6: [&str; 2] = ["fd00:20:1::/64", "fd00:20:2::/64"];
/// The nft table (`ip` family) of [`Site::masquerade`].
pub const MASQUERADE_TABLE: &str = "lnt_masq";
/// Load threads of one client namespace are numbered in a range this long.
pub const CLIENT_THREADS: usize = 1000;

/// The address families of a site and of the specs it writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stack {
    /// IPv4 only.
    Ipv4,
    /// Networks in both families; specs in IPv6 only.
    Ipv6,
    /// Networks and specs in both families.
    Dual,
}

impl Stack {
    /// Whether the site numbers its networks in IPv6 too.
    pub fn has_ipv6(self) -> bool {
        self != Stack::Ipv4
    }
}

/// A client namespace.
pub struct Client<N = Namespace> {
    /// Its namespace.
    pub ns: N,
    /// Its address.
    pub address: Ipv4Addr,
    /// Its IPv6 address, on sites with IPv6.
    pub address6: Option<Ipv6Addr>,
}

/// A lessnat node: an LB or a worker, each in its own namespace with its own
/// state directory.
pub struct Node<N = Namespace> {
    /// The node's name in the spec (with the site's tag).
    pub name: String,
    /// Its namespace.
    pub ns: N,
    /// The node address (back network).
    pub address: Ipv4Addr,
    /// Its IPv6 address (back network), on sites with IPv6.
    pub address6: Option<Ipv6Addr>,
    /// The load-balancer id, for LBs.
    pub lb_id: Option<u8>,
    /// The container subnet, for workers.
    pub subnet: Option<&'static str>,
    /// The IPv6 container subnet, for workers on sites with IPv6.
    pub subnet6: Option<&'static str>,
    /// Its `--state-dir`.
    pub state_dir: PathBuf,
}

/// One routed replica in a spec.
#[derive(Debug, Clone)]
pub struct Replica {
    /// Index of the worker in [`Site::workers`].
    pub worker: usize,
    /// Its address.
    pub address: IpAddr,
    /// Where an upgrade starts the new version (`nextAddress`), if declared.
    pub next_address: Option<IpAddr>,
}

impl Replica {
    /// Replica `host` (the last byte, e.g. 5 → 10.20.1.5) on worker
    /// `worker`, with `nextAddress` at `host + 1`.
    pub fn on(worker: usize, host: u8) -> Replica {
        let base = u8::try_from(worker + 1).unwrap_or(u8::MAX); // worker 0 → 10.20.1.x
        Replica {
            worker,
            address: Ipv4Addr::new(10, 20, base, host).into(),
            next_address: Some(Ipv4Addr::new(10, 20, base, host.saturating_add(1)).into()),
        }
    }

    /// IPv6 replica `host` (e.g. 5 → fd00:20:1::5) on worker `worker`, with
    /// `nextAddress` at `host + 1`.
    pub fn on6(worker: usize, host: u16) -> Replica {
        let base = u16::try_from(worker + 1).unwrap_or(u16::MAX); // worker 0 → fd00:20:1::x
        let at = |host| Ipv6Addr::new(0xfd00, 0x20, base, 0, 0, 0, 0, host).into();
        Replica {
            worker,
            address: at(host),
            next_address: Some(at(host.saturating_add(1))),
        }
    }
}

/// A routed service in a spec: the project's test server (or the demo app,
/// which is the same program), HTTP on 8080 (VIP port 80) and UDP on 5353
/// (VIP port 53).
#[derive(Debug, Clone)]
pub struct Service {
    /// The service name.
    pub name: String,
    /// The image.
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

/// The whole site; see the module documentation. Fields drop in order, so
/// the fabric, which holds the other end of every veth, goes last.
pub struct Site<N = Namespace> {
    /// The two clients.
    pub clients: Vec<Client<N>>,
    /// The two LB nodes (ids 1 and 2).
    pub lbs: Vec<Node<N>>,
    /// One or two workers.
    pub workers: Vec<Node<N>>,
    /// The address families of its networks and specs.
    pub stack: Stack,
    /// The namespace holding the two bridges.
    pub fabric: N,
}

impl<N: From<Namespace> + AsRef<Namespace>> Site<N> {
    /// Builds the site with `workers` workers (at most 2). Namespaces are
    /// named `PREFIX TAG-ROLE` (e.g. `lessnat-demo-42-lb1`), nodes `ROLE-TAG`
    /// (e.g. `lb1-demo-42`), each with its state directory under
    /// `state_root`. Needs root and `ip`. On failure, what was made is
    /// removed.
    pub fn build(
        prefix: &str,
        tag: &str,
        workers: usize,
        state_root: &Path,
    ) -> Result<Site<N>, NamespaceError> {
        Site::build_stack(prefix, tag, workers, state_root, Stack::Ipv4)
    }

    /// [`Site::build`] with the address families of `stack`.
    pub fn build_stack(
        prefix: &str,
        tag: &str,
        workers: usize,
        state_root: &Path,
        stack: Stack,
    ) -> Result<Site<N>, NamespaceError> {
        let ipv6 = stack.has_ipv6();
        // `nodad`: usable at once, no tentative addresses.
        let add6 = |ns: &Namespace, address: Ipv6Addr, dev: &str| {
            ns.exec(
                "ip",
                &["addr", "add", &format!("{address}/64"), "dev", dev, "nodad"],
            )
        };
        let namespace = |role: &str| Namespace::add(&format!("{prefix}{tag}-{role}"));
        let node =
            |ns: Namespace, role: &str, address: Ipv4Addr| -> Result<Node<N>, NamespaceError> {
                // A new namespace copies the host's setting (1 where Docker
                // runs); turning it on is lessnat's job.
                ns.sysctl("net.ipv4.ip_forward", "0")?;
                if ipv6 {
                    ns.sysctl("net.ipv6.conf.all.forwarding", "0")?;
                }
                let name = format!("{role}-{tag}");
                Ok(Node {
                    state_dir: state_root.join(&name),
                    name,
                    ns: N::from(ns),
                    address,
                    address6: None,
                    lb_id: None,
                    subnet: None,
                    subnet6: None,
                })
            };
        // Made first, deleted last: every veth has its bridge end in here.
        let fabric = namespace("fab")?;
        for bridge in ["front", "back"] {
            fabric.exec("ip", &["link", "add", bridge, "type", "bridge"])?;
            fabric.exec("ip", &["link", "set", bridge, "up"])?;
        }
        let mut site = Site {
            clients: Vec::new(),
            lbs: Vec::new(),
            workers: Vec::new(),
            stack,
            fabric: N::from(fabric),
        };
        for (i, address) in CLIENT_ADDRESSES.into_iter().enumerate() {
            let role = format!("c{}", i + 1);
            let ns = namespace(&role)?;
            site.cable(&ns, "fab", &role, "front")?;
            ns.exec(
                "ip",
                &["addr", "add", &format!("{address}/24"), "dev", "fab"],
            )?;
            ns.exec("ip", &["link", "set", "fab", "up"])?;
            let via = LB_FRONT_ADDRESSES[i].to_string();
            ns.exec("ip", &["route", "add", &format!("{VIP}/32"), "via", &via])?;
            let address6 = ipv6.then_some(CLIENT_ADDRESSES6[i]);
            if let Some(address6) = address6 {
                add6(&ns, address6, "fab")?;
                let via = LB_FRONT_ADDRESSES6[i].to_string();
                ns.exec("ip", &["route", "add", &format!("{VIP6}/128"), "via", &via])?;
            }
            site.clients.push(Client {
                ns: N::from(ns),
                address,
                address6,
            });
        }
        for (i, id) in (1..=2u8).enumerate() {
            let role = format!("lb{id}");
            let ns = namespace(&role)?;
            site.cable(&ns, "front", &format!("{role}f"), "front")?;
            site.cable(&ns, "back", &format!("{role}b"), "back")?;
            let front = format!("{}/24", LB_FRONT_ADDRESSES[i]);
            let back = format!("{}/24", LB_ADDRESSES[i]);
            ns.exec("ip", &["addr", "add", &front, "dev", "front"])?;
            ns.exec("ip", &["addr", "add", &back, "dev", "back"])?;
            if ipv6 {
                add6(&ns, LB_FRONT_ADDRESSES6[i], "front")?;
                add6(&ns, LB_ADDRESSES6[i], "back")?;
            }
            ns.exec("ip", &["link", "set", "front", "up"])?;
            ns.exec("ip", &["link", "set", "back", "up"])?;
            let lb = node(ns, &role, LB_ADDRESSES[i])?;
            site.lbs.push(Node {
                lb_id: Some(id),
                address6: ipv6.then_some(LB_ADDRESSES6[i]),
                ..lb
            });
        }
        for (i, (address, subnet)) in WORKER_ADDRESSES
            .into_iter()
            .zip(WORKER_SUBNETS)
            .take(workers)
            .enumerate()
        {
            let role = format!("w{}", i + 1);
            let ns = namespace(&role)?;
            site.cable(&ns, "fab", &role, "back")?;
            ns.exec(
                "ip",
                &["addr", "add", &format!("{address}/24"), "dev", "fab"],
            )?;
            for scope in ["all", "default", "fab"] {
                ns.sysctl(&format!("net.ipv4.conf.{scope}.rp_filter"), "1")?;
            }
            if ipv6 {
                add6(&ns, WORKER_ADDRESSES6[i], "fab")?;
            }
            ns.exec("ip", &["link", "set", "fab", "up"])?;
            let worker = node(ns, &role, address)?;
            site.workers.push(Node {
                subnet: Some(subnet),
                address6: ipv6.then_some(WORKER_ADDRESSES6[i]),
                subnet6: ipv6.then_some(WORKER_SUBNETS6[i]),
                ..worker
            });
        }
        Ok(site)
    }

    /// A veth from `ns` (named `inside` there) to `bridge` in the fabric
    /// (named `port` there). No IPv6 on either end unless the site has
    /// IPv6: its link-local addresses and router solicitations are noise
    /// here.
    fn cable(
        &self,
        ns: &Namespace,
        inside: &str,
        port: &str,
        bridge: &str,
    ) -> Result<(), NamespaceError> {
        let fabric = self.fabric.as_ref();
        fabric.exec(
            "ip",
            &[
                "link", "add", port, "type", "veth", "peer", "name", inside, "netns", &ns.name,
            ],
        )?;
        for (space, name) in [(fabric, port), (ns, inside)] {
            if self.stack.has_ipv6() {
                space.sysctl(&format!("net.ipv6.conf.{name}.accept_dad"), "0")?;
            } else {
                // A kernel without IPv6 has nothing to turn off.
                let _ = space.sysctl(&format!("net.ipv6.conf.{name}.disable_ipv6"), "1");
            }
        }
        fabric.exec("ip", &["link", "set", port, "master", bridge, "up"])?;
        Ok(())
    }

    /// Every namespace of the site.
    pub fn namespaces(&self) -> Vec<&N> {
        let mut all: Vec<&N> = self.clients.iter().map(|c| &c.ns).collect();
        all.extend(self.nodes().map(|n| &n.ns));
        all.push(&self.fabric);
        all
    }

    /// Every lessnat node, LBs first.
    pub fn nodes(&self) -> impl Iterator<Item = &Node<N>> {
        self.lbs.iter().chain(&self.workers)
    }

    /// The spec for `services` on this site's nodes, in the site's address
    /// families: node addresses, subnets and VIPs of an IPv6 site are IPv6;
    /// a dual-stack site gives nodes `address6` and `containerSubnet6`,
    /// ports `vip6`. Replicas are as the services list them.
    pub fn spec(&self, services: &[Service]) -> String {
        let (vips, vip, vip6) = match self.stack {
            Stack::Ipv4 => (VIP.to_string(), VIP.to_string(), None),
            Stack::Ipv6 => (VIP6.to_string(), VIP6.to_string(), None),
            Stack::Dual => (format!("{VIP}, \"{VIP6}\""), VIP.to_string(), Some(VIP6)),
        };
        let mut yaml = String::from("version: 1\nnodes:\n");
        for node in self.nodes() {
            let subnet6 = node.subnet6.unwrap_or_default();
            let mut role = match (node.lb_id, node.subnet, self.stack) {
                (Some(id), _, _) => format!("loadBalancer: {{ id: {id}, vips: [{vips}] }}"),
                (None, _, Stack::Ipv6) => format!("containerSubnet: \"{subnet6}\""),
                (None, subnet, _) => format!("containerSubnet: {}", subnet.unwrap_or_default()),
            };
            let address = match (self.stack, node.address6) {
                (Stack::Ipv6, Some(address6)) => format!("\"{address6}\""),
                _ => node.address.to_string(),
            };
            if let (Stack::Dual, Some(address6)) = (self.stack, node.address6) {
                let _ = write!(role, "\n    address6: \"{address6}\"");
                if node.lb_id.is_none() {
                    let _ = write!(role, "\n    containerSubnet6: \"{subnet6}\"");
                }
            }
            let _ = writeln!(
                yaml,
                "  - name: {}\n    address: {address}\n    {role}",
                node.name
            );
        }
        // `:PORT` is every address of both families.
        let any = if self.stack == Stack::Ipv4 {
            "0.0.0.0"
        } else {
            ""
        };
        yaml.push_str("services:\n");
        for service in services {
            let _ = write!(
                yaml,
                "  - name: {}\n    image: {}\n    network: routed\n    \
                 command: [\"--listen\", \"{any}:{{port.http}}\", \"--udp\", \"{any}:{{port.dns}}\"]\n    \
                 replicas:\n",
                service.name, service.image
            );
            for replica in &service.replicas {
                let node = self
                    .workers
                    .get(replica.worker)
                    .map_or("", |w| w.name.as_str());
                let _ = write!(
                    yaml,
                    "      - {{ node: {node}, address: \"{}\"",
                    replica.address
                );
                if let Some(next) = replica.next_address {
                    let _ = write!(yaml, ", nextAddress: \"{next}\"");
                }
                yaml.push_str(" }\n");
            }
            let second = vip6.map(|v| format!(", vip6: \"{v}\"")).unwrap_or_default();
            let _ = write!(
                yaml,
                "    ports:\n      \
                 - {{ name: http, port: {HTTP_PORT}, protocol: tcp, vip: \"{vip}\"{second}, vipPort: {VIP_PORT} }}\n      \
                 - {{ name: dns, port: {UDP_PORT}, protocol: udp, vip: \"{vip}\"{second}, vipPort: {VIP_UDP_PORT} }}\n    \
                 health:\n      http: {{ path: /healthz, port: http }}\n      interval: 200ms\n      \
                 timeout: 1s\n      healthyAfter: 1\n      startTimeout: 20s\n    \
                 upgrade:\n      drainTimeout: {}\n      switchWait: {}\n      stopTimeout: 5s\n",
                service.drain_timeout, service.switch_wait
            );
        }
        yaml
    }

    /// Adds (or with `on == false` removes) a masquerade of everything
    /// forwarded to the container subnets on every LB, in the table
    /// `ip` [`MASQUERADE_TABLE`]: the baseline of a load balancer that hides
    /// its clients, what users do without lessnat.
    pub fn masquerade(&self, on: bool) -> Result<(), NamespaceError> {
        for lb in &self.lbs {
            let ns = lb.ns.as_ref();
            ns.try_exec("nft", &["delete", "table", "ip", MASQUERADE_TABLE])?;
            if on {
                let subnets = WORKER_SUBNETS.join(", ");
                ns.nft(&format!(
                    "table ip {MASQUERADE_TABLE} {{\n  chain postrouting {{\n    \
                     type nat hook postrouting priority 100; policy accept;\n    \
                     ip daddr {{ {subnets} }} masquerade\n  }}\n}}\n"
                ))?;
            }
        }
        Ok(())
    }

    /// Starts a pool of `threads` client threads in each client namespace,
    /// asking the VIP for `/peer`, as `adjust` configures it; client *i*'s
    /// threads are numbered from *i* × [`CLIENT_THREADS`] (see [`client_of`]).
    pub fn load(&self, threads: usize, adjust: impl Fn(LoadConfig) -> LoadConfig) -> Vec<Load> {
        self.load_to(vip(), threads, adjust)
    }

    /// [`Site::load`] to `target` (such as [`vip6`]).
    pub fn load_to(
        &self,
        target: SocketAddr,
        threads: usize,
        adjust: impl Fn(LoadConfig) -> LoadConfig,
    ) -> Vec<Load> {
        self.clients
            .iter()
            .enumerate()
            .map(|(i, client)| {
                let config = LoadConfig {
                    clients: threads,
                    first_client: i * CLIENT_THREADS,
                    ..LoadConfig::to(target)
                        .in_netns(&client.ns.as_ref().name)
                        .path("/peer")
                };
                Load::start(adjust(config))
            })
            .collect()
    }
}

/// The index of the client namespace a sample of [`Site::load`] came from.
pub fn client_of(sample: &Sample) -> usize {
    sample.client / CLIENT_THREADS
}

/// Whether the replica that answered `sample` (a `/peer` request of
/// [`Site::load`]) saw the real address of the client that sent it.
pub fn saw_real_client(sample: &Sample) -> bool {
    let client = client_of(sample);
    let real = [
        CLIENT_ADDRESSES.get(client).copied().map(IpAddr::from),
        CLIENT_ADDRESSES6.get(client).copied().map(IpAddr::from),
    ];
    sample.peer_ip().is_some_and(|ip| real.contains(&Some(ip)))
}

/// The VIP's HTTP address.
pub fn vip() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(VIP, VIP_PORT))
}

/// The IPv6 VIP's HTTP address.
pub fn vip6() -> SocketAddr {
    SocketAddr::new(VIP6.into(), VIP_PORT)
}

/// The VIP's UDP address.
pub fn vip_udp() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(VIP, VIP_UDP_PORT))
}
