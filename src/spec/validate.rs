//! Semantic checks: rules a spec must follow beyond its shape. Every problem is
//! reported, each at the value that causes it.

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;

use super::{
    Canary, Health, Located, NetworkMode, Node, PlaceholderError, Protocol, PullPolicy, Replica,
    SPEC_VERSION, Service, Spec, Strategy, render_placeholders,
};
use crate::desired::routed::{node_addresses, offset, worker_subnets};
use crate::diagnostic::{Diagnostic, Span, closest, one_of};
use crate::error::chain;
use crate::registry::ImageRef;

/// The longest name lessnat accepts for nodes, services and ports (container
/// names are built from them).
pub const MAX_NAME_LEN: usize = 40;

/// The most replicas one entry of `replicas` may stand for (`count`): an
/// IPv6 subnet would hold billions, which lessnat would list one by one.
pub const MAX_COUNT: u32 = 1024;

/// Checks every rule and returns all problems found, in no particular order.
pub fn validate(spec: &Spec) -> Vec<Diagnostic> {
    let mut check = Checker::default();
    check.version(spec);
    check.nodes(spec);
    check.services(spec);
    check.node_ports(spec);
    check.vip_ports(spec);
    check.routed_families(spec);
    if let Some(cluster) = &spec.cluster {
        check.found.extend(super::cluster::check(cluster));
    }
    check.found
}

#[derive(Default)]
struct Checker {
    found: Vec<Diagnostic>,
}

fn error(span: Span, message: impl Into<String>) -> Diagnostic {
    Diagnostic::new(Some(span), message)
}

/// Every address one entry of `replicas` names, with where to point at it:
/// `address` and `nextAddress`, and with `count` the other addresses of its
/// pairs (pointed at by the count).
fn replica_entry_addresses(replica: &Replica) -> Vec<(IpAddr, Span)> {
    let mut addresses: Vec<(IpAddr, Span)> = std::iter::once(&replica.address)
        .chain(&replica.next_address)
        .map(|a| (***a, a.span))
        .collect();
    if let Some(count) = &replica.count {
        let extra = (1..count.value.min(MAX_COUNT).saturating_mul(2))
            .filter_map(|k| offset(**replica.address, u128::from(k)))
            .map(|a| (a, count.span));
        addresses.extend(extra);
    }
    addresses
}

/// The last address of the pairs of an entry with `count`.
fn last_of_count(replica: &Replica) -> Option<IpAddr> {
    let span = replica
        .count
        .as_ref()?
        .value
        .checked_mul(2)?
        .checked_sub(1)?;
    offset(**replica.address, u128::from(span))
}

/// `IPv4` or `IPv6`.
fn family(address: IpAddr) -> &'static str {
    if address.is_ipv4() { "IPv4" } else { "IPv6" }
}

/// Whether `address` is a host address of `subnet`: inside it, and not an
/// IPv4 subnet's broadcast address.
fn is_host_of(subnet: &IpNet, address: IpAddr) -> bool {
    match subnet {
        IpNet::V4(net) => subnet.contains(&address) && address != IpAddr::V4(net.broadcast()),
        IpNet::V6(_) => subnet.contains(&address),
    }
}

fn at(span: Span) -> String {
    format!("line {}, column {}", span.line, span.column)
}

impl Checker {
    fn push(&mut self, diagnostic: Diagnostic) {
        self.found.push(diagnostic);
    }

    fn version(&mut self, spec: &Spec) {
        if *spec.version != SPEC_VERSION {
            self.push(
                error(
                    spec.version.span,
                    format!("unsupported spec version {}", *spec.version),
                )
                .with_help(format!("this lessnat reads `version: {SPEC_VERSION}`")),
            );
        }
    }

    fn name(&mut self, what: &str, name: &Located<String>) {
        if !is_valid_name(name) {
            self.push(
                error(name.span, format!("invalid {what} name \"{}\"", name.value)).with_help(format!(
                    "use lowercase letters, digits and `-`, starting and ending with a letter or digit, at most {MAX_NAME_LEN} characters"
                )),
            );
        }
    }

    fn unique<'a>(&mut self, what: &str, names: impl IntoIterator<Item = &'a Located<String>>) {
        let mut seen: HashMap<&str, Span> = HashMap::new();
        for name in names {
            if let Some(first) = seen.get(name.value.as_str()) {
                self.push(
                    error(name.span, format!("duplicate {what} name `{}`", name.value)).with_help(
                        format!("`{}` is already defined at {}", name.value, at(*first)),
                    ),
                );
            } else {
                seen.insert(&name.value, name.span);
            }
        }
    }

    fn nodes(&mut self, spec: &Spec) {
        for node in &spec.nodes {
            self.name("node", &node.name);
        }
        self.unique("node", spec.nodes.iter().map(|n| &n.name));

        let mut addresses: HashMap<IpAddr, &Node> = HashMap::new();
        let mut lb_ids: HashMap<u8, &Node> = HashMap::new();
        for (index, node) in spec.nodes.iter().enumerate() {
            self.node_families(node);
            for address in std::iter::once(&node.address).chain(&node.address6) {
                if let Some(first) = addresses.insert(***address, node) {
                    self.push(
                        error(
                            address.span,
                            format!("address {} is used by two nodes", **address),
                        )
                        .with_help(format!("node `{}` already has it", first.name.value)),
                    );
                }
            }
            for subnet in [&node.container_subnet, &node.container_subnet6]
                .into_iter()
                .flatten()
            {
                for other in &spec.nodes[..index] {
                    for other_subnet in worker_subnets(other) {
                        if subnet.contains(&other_subnet.network())
                            || other_subnet.contains(&subnet.network())
                        {
                            self.push(
                                error(
                                    subnet.span,
                                    format!(
                                        "container subnet {} overlaps {other_subnet} of node `{}`",
                                        subnet.value, other.name.value
                                    ),
                                )
                                .with_help("give each node a subnet of its own"),
                            );
                        }
                    }
                }
            }
            let Some(lb) = &node.load_balancer else {
                continue;
            };
            if !(1..=63).contains(&*lb.id) {
                self.push(
                    error(
                        lb.id.span,
                        format!("load-balancer id {} is out of range", *lb.id),
                    )
                    .with_help("ids go from 1 to 63: the id is carried in the 6 DSCP bits"),
                );
            } else if let Some(first) = lb_ids.insert(*lb.id, node) {
                self.push(
                    error(
                        lb.id.span,
                        format!("load-balancer id {} is used twice", *lb.id),
                    )
                    .with_help(format!(
                        "node `{}` already has id {}; give each load balancer its own",
                        first.name.value, *lb.id
                    )),
                );
            }
        }
    }

    /// A node's second-family fields: `address6` and `containerSubnet6`
    /// are IPv6 and go with an IPv4 `address` and `containerSubnet`.
    fn node_families(&mut self, node: &Node) {
        if let Some(address6) = &node.address6 {
            if !address6.is_ipv6() {
                self.push(
                    error(
                        address6.span,
                        format!("`address6` {} is not IPv6", **address6),
                    )
                    .with_help("write the node's IPv6 address here, its IPv4 one in `address`"),
                );
            } else if node.address.is_ipv6() {
                self.push(
                    error(address6.span, "`address6` with an IPv6 `address`")
                        .with_help("`address6` is the IPv6 address of a node whose `address` is IPv4; remove it"),
                );
            }
        }
        if let Some(subnet6) = &node.container_subnet6 {
            let first_is_v4 = node
                .container_subnet
                .as_ref()
                .is_some_and(|s| s.addr().is_ipv4());
            if subnet6.addr().is_ipv4() {
                self.push(
                    error(
                        subnet6.span,
                        format!("`containerSubnet6` {} is not IPv6", subnet6.value),
                    )
                    .with_help(
                        "write the IPv6 container subnet here, the IPv4 one in `containerSubnet`",
                    ),
                );
            } else if !first_is_v4 {
                self.push(
                    error(
                        subnet6.span,
                        "`containerSubnet6` needs an IPv4 `containerSubnet`",
                    )
                    .with_help(
                        "a node with only IPv6 containers writes its subnet in `containerSubnet`",
                    ),
                );
            }
        }
    }

    /// Every node that routes a family (a worker's container subnet, a
    /// load-balancer node's VIP) has an address of that family, and so has
    /// every load-balancer node, for the workers' replies.
    fn routed_families(&mut self, spec: &Spec) {
        let routed = |v4: bool| {
            spec.nodes.iter().any(|n| {
                worker_subnets(n).iter().any(|s| s.addr().is_ipv4() == v4)
                    && spec
                        .services
                        .iter()
                        .flat_map(|s| &s.replicas)
                        .any(|r| r.node.value == n.name.value && r.address.is_ipv4() == v4)
            })
        };
        for v4 in [true, false] {
            if !routed(v4) {
                continue;
            }
            let wanted = if v4 { "IPv4" } else { "IPv6" };
            for node in &spec.nodes {
                let has = node_addresses(node).iter().any(|a| a.is_ipv4() == v4);
                let needs = node.load_balancer.is_some()
                    || worker_subnets(node)
                        .iter()
                        .any(|s| s.addr().is_ipv4() == v4);
                if needs && !has {
                    self.push(
                        error(
                            node.address.span,
                            format!("node `{}` has no {wanted} address, and routed replicas use {wanted}", node.name.value),
                        )
                        .with_help(if v4 {
                            "load-balancer nodes and workers route each family through the nodes' addresses of that family; give the node an IPv4 `address`"
                        } else {
                            "load-balancer nodes and workers route each family through the nodes' addresses of that family; add `address6`"
                        }),
                    );
                }
            }
        }
    }

    fn services(&mut self, spec: &Spec) {
        for service in &spec.services {
            self.name("service", &service.name);
            for port in &service.ports {
                self.name("port", &port.name);
            }
            self.unique("port", service.ports.iter().map(|p| &p.name));
            self.service(spec, service);
        }
        self.unique("service", spec.services.iter().map(|s| &s.name));

        let mut replica_addresses: HashMap<IpAddr, (&str, Span)> = HashMap::new();
        for service in &spec.services {
            let addresses = service.replicas.iter().flat_map(replica_entry_addresses);
            for (address, span) in addresses {
                if let Some((owner, first)) =
                    replica_addresses.insert(address, (&service.name, span))
                {
                    self.push(
                        error(span, format!("replica address {address} is used twice")).with_help(
                            format!("service `{owner}` already uses it at {}", at(first)),
                        ),
                    );
                }
            }
        }
    }

    fn service(&mut self, spec: &Spec, service: &Service) {
        let name = &service.name;
        match ImageRef::parse(&service.image.value) {
            Err(invalid) => self.push(
                error(
                    service.image.span,
                    format!("invalid image reference \"{}\"", service.image.value),
                )
                .with_help(format!(
                    "{}; write an image like `registry.example/web:2.1`",
                    invalid.why
                )),
            ),
            Ok(image) if image.digest.is_some() && service.pull.value == PullPolicy::Always => {
                self.push(
                    error(
                        service.pull.span,
                        "`pull: always` with an image pinned by digest: there is no tag to follow",
                    )
                    .with_help("remove `@sha256:…` from the image, or `pull: always`"),
                );
            }
            Ok(_) => {}
        }
        if service.ports.is_empty() {
            self.push(
                error(name.span, format!("service `{}` has no ports", name.value)).with_help(
                    "add at least one entry to `ports`, e.g. `- { name: http, port: 8000 }`",
                ),
            );
        }
        match service.network {
            NetworkMode::Host => self.host_service(spec, service),
            NetworkMode::Routed => self.routed_service(spec, service),
        }
        for port in &service.ports {
            if *port.port == 0 {
                self.push(
                    error(port.port.span, "port 0 is not a port")
                        .with_help("ports go from 1 to 65535"),
                );
            }
            if let Some(temp) = &port.temp_port {
                if temp.value == 0 {
                    self.push(
                        error(temp.span, "port 0 is not a port")
                            .with_help("ports go from 1 to 65535"),
                    );
                } else if temp.value == port.port.value {
                    self.push(
                        error(
                            temp.span,
                            format!("tempPort {} is the same as port", temp.value),
                        )
                        .with_help("the temporary port must be a different, free port"),
                    );
                }
            }
        }
        if let Some(health) = &service.health {
            self.health(service, health);
        }
        if let Some(canary) = &service.upgrade.canary {
            self.canary(service, canary);
        }
        self.max_parallel(service);
        self.found.extend(super::rollout::check(spec, service));
        self.placeholders(service);
    }

    /// A canary splits a redirect-drain upgrade's new connections.
    fn canary(&mut self, service: &Service, canary: &Located<Canary>) {
        if service.upgrade.strategy == Strategy::StopStart {
            self.push(
                error(canary.span, "a canary needs the redirect-drain strategy")
                    .with_help("remove `canary`, or use `strategy: redirect-drain`"),
            );
        }
        if canary.hold.get().is_zero() {
            self.push(
                error(
                    canary.hold.span,
                    "a canary hold of 0s sends nothing to the canary",
                )
                .with_help("hold it for a while, e.g. `hold: 5m`"),
            );
        }
        if canary.unhealthy_after.value == 0 {
            self.push(
                error(
                    canary.unhealthy_after.span,
                    "`unhealthyAfter` must be at least 1",
                )
                .with_help(
                    "the number of failed health checks in a row that abort the canary, e.g. `3`",
                ),
            );
        }
    }

    /// `maxParallel` counts a node's routed replicas that upgrade together.
    fn max_parallel(&mut self, service: &Service) {
        let max = &service.upgrade.max_parallel;
        if max.value == 0 {
            self.push(
                error(max.span, "`maxParallel` must be at least 1").with_help(
                    "the number of a node's replicas that upgrade at the same time, e.g. `2`",
                ),
            );
        } else if max.value > 1 && service.network == NetworkMode::Host {
            self.push(
                error(max.span, "`maxParallel` is for routed services")
                    .with_help("a host-mode service runs one container; remove `maxParallel`"),
            );
        }
    }

    /// Reports a reference to a node that does not exist; returns whether it was missing.
    fn node_missing(&mut self, spec: &Spec, reference: &Located<String>) -> bool {
        if spec.node(reference).is_some() {
            return false;
        }
        let names: Vec<&str> = spec.nodes.iter().map(|n| n.name.value.as_str()).collect();
        let help = match closest(reference, names.iter().copied()) {
            Some(near) => format!("did you mean `{near}`? nodes are {}", one_of(&names)),
            None if names.is_empty() => "define it under `nodes`".to_string(),
            None => format!("nodes are {}", one_of(&names)),
        };
        self.push(
            error(
                reference.span,
                format!("no node named `{}`", reference.value),
            )
            .with_help(help),
        );
        true
    }

    fn host_service(&mut self, spec: &Spec, service: &Service) {
        match &service.node {
            Some(node) => {
                self.node_missing(spec, node);
            }
            None => self.push(
                error(
                    service.name.span,
                    format!("host-mode service `{}` has no `node`", service.name.value),
                )
                .with_help("add `node: NAME`, or set `network: routed` and list `replicas`"),
            ),
        }
        if let Some(replica) = service.replicas.first() {
            self.push(
                error(replica.node.span, "`replicas` is for routed services").with_help(
                    "a host-mode service runs on its `node`; set `network: routed` to run replicas",
                ),
            );
        }
        for port in &service.ports {
            for (vip, key) in [(&port.vip, "vip"), (&port.vip6, "vip6")] {
                if let Some(vip) = vip {
                    self.push(
                        error(vip.span, format!("`{key}` is for routed services"))
                            .with_help("remove it, or set `network: routed`"),
                    );
                }
            }
            if let Some(vip_port) = &port.vip_port {
                self.push(
                    error(vip_port.span, "`vipPort` is for routed services")
                        .with_help("remove it, or set `network: routed`"),
                );
            }
            if service.upgrade.strategy == Strategy::RedirectDrain && port.temp_port.is_none() {
                self.push(
                    error(
                        port.name.span,
                        format!(
                            "port `{}` needs a `tempPort` for the redirect-drain upgrade",
                            port.name.value
                        ),
                    )
                    .with_help(
                        "add `tempPort: <a free port>`, or set `upgrade: { strategy: stop-start }`",
                    ),
                );
            }
        }
    }

    fn routed_service(&mut self, spec: &Spec, service: &Service) {
        if let Some(node) = &service.node {
            self.push(
                error(node.span, "`node` is for host-mode services").with_help(
                    "a routed service lists its `replicas`, each with a `node` and an `address`",
                ),
            );
        }
        if service.replicas.is_empty() {
            self.push(
                error(
                    service.name.span,
                    format!("routed service `{}` has no replicas", service.name.value),
                )
                .with_help("add `replicas: [ { node: NAME, address: IP } ]`"),
            );
        }
        for replica in &service.replicas {
            self.replica_count(replica);
            if self.node_missing(spec, &replica.node) {
                continue;
            }
            let Some(node) = spec.node(&replica.node) else {
                continue;
            };
            let subnets = worker_subnets(node);
            if subnets.is_empty() {
                self.push(
                    error(replica.node.span, format!("node `{}` has no `containerSubnet`", node.name.value))
                        .with_help("routed replicas take their address from their node's `containerSubnet`; add one to the node"),
                );
                continue;
            }
            let first = **replica.address;
            let Some(subnet) = subnets
                .iter()
                .find(|s| s.addr().is_ipv4() == first.is_ipv4())
            else {
                self.push(
                    error(
                        replica.address.span,
                        format!(
                            "address {first} is {}, and node `{}` has no {} container subnet",
                            family(first),
                            node.name.value,
                            family(first)
                        ),
                    )
                    .with_help(if first.is_ipv4() {
                        "pick an address in the node's `containerSubnet`"
                    } else {
                        "pick an address in the node's `containerSubnet`, or give the node `containerSubnet6`"
                    }),
                );
                continue;
            };
            if let (Some(count), Some(last)) = (&replica.count, last_of_count(replica))
                && !is_host_of(subnet, last)
            {
                self.push(
                    error(
                        count.span,
                        format!(
                            "{} replicas from {first} need addresses up to {last}, past the last host address of {subnet} of node `{}`",
                            count.value, node.name.value
                        ),
                    )
                    .with_help("each replica takes two consecutive addresses; lower `count` or start `address` lower"),
                );
            }
            for address in std::iter::once(&replica.address).chain(&replica.next_address) {
                if address.is_ipv4() != first.is_ipv4() {
                    self.push(
                        error(
                            address.span,
                            format!(
                                "nextAddress {} is {}, and address {first} is {}",
                                **address,
                                family(***address),
                                family(first)
                            ),
                        )
                        .with_help("a replica's two addresses are of one family (for dual stack, list a replica of each family)"),
                    );
                } else if !subnet.contains(&***address) {
                    self.push(
                        error(
                            address.span,
                            format!(
                                "address {} is outside {subnet} of node `{}`",
                                **address, node.name.value
                            ),
                        )
                        .with_help("pick an address inside the node's container subnet"),
                    );
                }
            }
        }
        for port in &service.ports {
            if let Some(temp) = &port.temp_port {
                self.push(
                    error(temp.span, "`tempPort` is for host-mode services")
                        .with_help("a routed upgrade gives the next replica its own address; remove `tempPort`"),
                );
            }
            if let Some(vip6) = &port.vip6 {
                if !vip6.is_ipv6() {
                    self.push(
                        error(vip6.span, format!("`vip6` {} is not IPv6", **vip6))
                            .with_help("write the port's IPv6 VIP here, its IPv4 one in `vip`"),
                    );
                } else if port.vip.as_ref().is_none_or(|v| v.is_ipv6()) {
                    self.push(
                        error(vip6.span, "`vip6` needs an IPv4 `vip`")
                            .with_help("a port with only an IPv6 VIP writes it in `vip`"),
                    );
                }
            }
            for vip in [&port.vip, &port.vip6].into_iter().flatten() {
                let served = spec
                    .nodes
                    .iter()
                    .filter_map(|n| n.load_balancer.as_ref())
                    .any(|lb| lb.vips.iter().any(|v| v.value == vip.value));
                if !served {
                    self.push(
                        error(
                            vip.span,
                            format!("no load-balancer node serves VIP {}", vip.value),
                        )
                        .with_help("add it to the `loadBalancer.vips` of a node"),
                    );
                }
                let reached = service
                    .replicas
                    .iter()
                    .any(|r| r.address.is_ipv4() == vip.is_ipv4());
                if !reached && !service.replicas.is_empty() {
                    self.push(
                        error(
                            vip.span,
                            format!(
                                "VIP {} is {}, and service `{}` has no {} replica",
                                vip.value,
                                family(*vip.value),
                                service.name.value,
                                family(*vip.value)
                            ),
                        )
                        .with_help("a VIP spreads over the replicas of its own family; add one, or use a VIP of the replicas' family"),
                    );
                }
            }
        }
    }

    /// `count`: at least 1, and not with `nextAddress`.
    fn replica_count(&mut self, replica: &Replica) {
        let Some(count) = &replica.count else {
            return;
        };
        if count.value == 0 {
            self.push(
                error(count.span, "`count` must be at least 1")
                    .with_help("remove the entry to run no replica on this node"),
            );
        }
        if count.value > MAX_COUNT {
            self.push(
                error(count.span, format!("`count` {} is more than {MAX_COUNT}", count.value))
                    .with_help(format!("one entry stands for at most {MAX_COUNT} replicas; split it into entries with their own `address`")),
            );
        }
        if let Some(next) = &replica.next_address {
            self.push(
                error(next.span, "`nextAddress` cannot be used with `count`")
                    .with_help("with `count`, each replica alternates between two consecutive addresses from `address`; remove `nextAddress`"),
            );
        }
    }

    fn health(&mut self, service: &Service, health: &Located<Health>) {
        let kinds = [
            health.http.is_some(),
            health.tcp.is_some(),
            health.exec.is_some(),
        ];
        if kinds.iter().filter(|k| **k).count() != 1 {
            self.push(
                error(
                    health.span,
                    "health needs exactly one of `http`, `tcp` or `exec`",
                )
                .with_help(
                    "e.g. `http: { path: /healthz }`, `tcp: {}` or `exec: [\"/app\", \"check\"]`",
                ),
            );
        }
        let probed = health
            .http
            .as_ref()
            .map(|h| &h.port)
            .or(health.tcp.as_ref().map(|t| &t.port));
        match probed {
            Some(Some(port_name)) => match service.port(port_name) {
                None => {
                    let names: Vec<&str> = service
                        .ports
                        .iter()
                        .map(|p| p.name.value.as_str())
                        .collect();
                    self.push(
                        error(
                            port_name.span,
                            format!(
                                "health check names no port of `{}`: `{}`",
                                service.name.value, port_name.value
                            ),
                        )
                        .with_help(format!("ports are {}", one_of(&names))),
                    );
                }
                Some(port) if port.protocol != Protocol::Tcp => self.push(
                    error(
                        port_name.span,
                        format!(
                            "port `{}` is UDP; http and tcp checks need a TCP port",
                            port_name.value
                        ),
                    )
                    .with_help("name a TCP port, or use an `exec` check"),
                ),
                Some(_) => {}
            },
            Some(None) if !service.ports.iter().any(|p| p.protocol == Protocol::Tcp) => self.push(
                error(
                    health.span,
                    format!("service `{}` has no TCP port to probe", service.name.value),
                )
                .with_help("use an `exec` check for UDP services"),
            ),
            _ => {}
        }
        if let Some(exec) = &health.exec
            && exec.is_empty()
        {
            self.push(
                error(health.span, "`exec` health check has no command")
                    .with_help("e.g. `exec: [\"/app\", \"check\"]`"),
            );
        }
        if health.interval.get().is_zero() {
            self.push(
                error(health.interval.span, "interval must be longer than 0")
                    .with_help("e.g. `interval: 1s`"),
            );
        }
        if health.timeout.get().is_zero() {
            self.push(
                error(health.timeout.span, "timeout must be longer than 0")
                    .with_help("e.g. `timeout: 1s`"),
            );
        }
        if *health.healthy_after == 0 {
            self.push(error(
                health.healthy_after.span,
                "healthyAfter must be at least 1",
            ));
        }
    }

    fn placeholders(&mut self, service: &Service) {
        let lookup =
            |name: Option<&str>| match name {
                None if service.ports.len() == 1 => Ok(*service.ports[0].port),
                None => Err(PlaceholderError::Ambiguous {
                    count: service.ports.len(),
                }),
                Some(name) => service.port(name).map(|p| *p.port).ok_or_else(|| {
                    PlaceholderError::UnknownPort {
                        name: name.to_string(),
                    }
                }),
            };
        let names: Vec<&str> = service
            .ports
            .iter()
            .map(|p| p.name.value.as_str())
            .collect();
        let templates = service.command.iter().chain(service.env.values());
        for template in templates {
            if let Err(problem) = render_placeholders(template, lookup) {
                let help = match &problem {
                    PlaceholderError::Ambiguous { .. } | PlaceholderError::UnknownPort { .. } => {
                        format!("ports are {}; write `{{port.NAME}}`", one_of(&names))
                    }
                    PlaceholderError::Malformed { .. } => {
                        "write `{{` for a literal `{`".to_string()
                    }
                };
                self.push(error(template.span, chain(&problem)).with_help(help));
            }
        }
        for key in service.env.keys() {
            let valid = key
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                self.push(
                    error(
                        key.span,
                        format!("invalid environment variable name \"{}\"", key.value),
                    )
                    .with_help("use letters, digits and `_`, not starting with a digit"),
                );
            }
        }
    }

    /// Two host-mode services, or a temporary port, on the same node port.
    fn node_ports(&mut self, spec: &Spec) {
        struct Use<'a> {
            service: &'a str,
            port: &'a str,
            temporary: bool,
            span: Span,
        }
        let mut used: HashMap<(&str, Protocol, u16), Use> = HashMap::new();
        let canonical = spec
            .services
            .iter()
            .flat_map(|s| s.ports.iter().map(move |p| (s, p, &p.port, false)));
        let temporary = spec.services.iter().flat_map(|s| {
            s.ports
                .iter()
                .filter_map(move |p| p.temp_port.as_ref().map(|t| (s, p, t, true)))
        });
        for (service, port, number, is_temp) in canonical.chain(temporary) {
            let (NetworkMode::Host, Some(node)) = (service.network, &service.node) else {
                continue;
            };
            let key = (node.value.as_str(), port.protocol, number.value);
            let this = Use {
                service: &service.name,
                port: &port.name,
                temporary: is_temp,
                span: number.span,
            };
            let Some(first) = used.get(&key) else {
                used.insert(key, this);
                continue;
            };
            if first.service == this.service && first.port == this.port {
                continue; // tempPort == port, reported with the service
            }
            let role = |u: &Use| {
                if u.temporary {
                    "temporary port"
                } else {
                    "port"
                }
            };
            let message = if this.temporary && !first.temporary {
                format!(
                    "tempPort {}/{} is the canonical port of `{}` (port `{}`) on node `{}`",
                    number.value,
                    port.protocol.as_str(),
                    first.service,
                    first.port,
                    node.value
                )
            } else {
                format!(
                    "{}/{} on node `{}` is already the {} of `{}` (port `{}`)",
                    number.value,
                    port.protocol.as_str(),
                    node.value,
                    role(first),
                    first.service,
                    first.port
                )
            };
            self.push(error(this.span, message).with_help(format!(
                "pick a free port; the other one is at {}",
                at(first.span)
            )));
        }
    }

    /// Two routed services on the same VIP, port and protocol.
    fn vip_ports(&mut self, spec: &Spec) {
        let mut used: HashMap<(IpAddr, Protocol, u16), (&str, Span)> = HashMap::new();
        for service in spec
            .services
            .iter()
            .filter(|s| s.network == NetworkMode::Routed)
        {
            for (port, vip) in service
                .ports
                .iter()
                .flat_map(|p| [&p.vip, &p.vip6].into_iter().flatten().map(move |v| (p, v)))
            {
                let (number, span) = match &port.vip_port {
                    Some(p) => (p.value, p.span),
                    None => (port.port.value, port.port.span),
                };
                if let Some((owner, first)) =
                    used.insert((*vip.value, port.protocol, number), (&service.name, span))
                {
                    self.push(
                        error(
                            span,
                            format!(
                                "{}/{} is already served by `{owner}`",
                                std::net::SocketAddr::new(*vip.value, number),
                                port.protocol.as_str()
                            ),
                        )
                        .with_help(format!(
                            "pick another vipPort or VIP; the other one is at {}",
                            at(first)
                        )),
                    );
                }
            }
        }
    }
}

/// Whether `name` can be used for a node, service or port: `[a-z0-9-]`, not
/// starting or ending with `-`, at most [`MAX_NAME_LEN`] characters.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["web", "web-1", "a", "0x"] {
            assert!(is_valid_name(ok), "{ok}");
        }
        for bad in ["", "Web", "web_1", "-web", "web-", "w eb", &"a".repeat(41)] {
            assert!(!is_valid_name(bad), "{bad}");
        }
    }
}
