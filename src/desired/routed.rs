//! What routed mode wants of a node, derived from the spec alone (pure): the
//! node's roles (load balancer, worker), the addresses of each replica, the
//! policy routing rules and routes, the VIPs and the kernel settings. The
//! parts that also depend on what is observed (which address a load balancer
//! sends new connections to) are decided by the planner.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::model::{IpRule, OwnedAddress, Route, RoutingState};
use crate::ownership::{IPV6_FORWARDING, ROUTED_SYSCTLS, ROUTES_TABLE, lb_mark, reply_table};
use crate::spec::{NetworkMode, Node, Port, Replica, Service, Spec};

/// The two addresses a routed replica alternates between: each upgrade starts
/// the next version at the one the current version does not use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaAddresses {
    /// `address` from the spec.
    pub address: IpAddr,
    /// `nextAddress` from the spec, or the one lessnat chose.
    pub next_address: IpAddr,
}

impl ReplicaAddresses {
    /// The other address of the pair.
    pub fn other(&self, address: IpAddr) -> IpAddr {
        if address == self.address {
            self.next_address
        } else {
            self.address
        }
    }

    /// Whether `address` is one of the pair.
    pub fn contains(&self, address: IpAddr) -> bool {
        address == self.address || address == self.next_address
    }
}

/// One routed replica as the spec places it: an entry of `replicas`, or
/// one of the replicas an entry with `count` stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlacedReplica<'a> {
    /// The node that runs it.
    pub node: &'a str,
    /// Its number among the service's replicas on that node, from 1 in spec
    /// order: the first is `lessnat-SERVICE.NODE`, the others carry it in
    /// their container names.
    pub number: u32,
    /// Its two addresses.
    pub pair: ReplicaAddresses,
}

/// Every replica of `service`, in spec order, entries with `count`
/// expanded.
pub fn replicas_of<'a>(spec: &Spec, service: &'a Service) -> Vec<PlacedReplica<'a>> {
    let mut numbers: BTreeMap<&str, u32> = BTreeMap::new();
    let mut placed = Vec::new();
    for replica in &service.replicas {
        for pair in entry_pairs(spec, replica) {
            let number = numbers.entry(replica.node.value.as_str()).or_default();
            *number += 1;
            placed.push(PlacedReplica {
                node: &replica.node.value,
                number: *number,
                pair,
            });
        }
    }
    placed
}

/// The replicas of `service` on `node`, numbered as [`replicas_of`] numbers them.
pub fn replicas_on<'a>(spec: &Spec, service: &'a Service, node: &str) -> Vec<PlacedReplica<'a>> {
    replicas_of(spec, service)
        .into_iter()
        .filter(|r| r.node == node)
        .collect()
}

/// The address pairs one entry of `replicas` stands for: with `count`,
/// consecutive pairs from `address`; otherwise `address` and `nextAddress`
/// (or the address lessnat chose).
fn entry_pairs(spec: &Spec, replica: &Replica) -> Vec<ReplicaAddresses> {
    let address = **replica.address;
    if let Some(count) = &replica.count {
        return (0..count.value)
            .map_while(|k| {
                let first = offset(address, u128::from(k).checked_mul(2)?)?;
                Some(ReplicaAddresses {
                    address: first,
                    next_address: offset(first, 1)?,
                })
            })
            .collect();
    }
    let next_address = match &replica.next_address {
        Some(next) => Some(***next),
        None => chosen_next_address(spec, replica),
    };
    next_address
        .map(|next_address| ReplicaAddresses {
            address,
            next_address,
        })
        .into_iter()
        .collect()
}

/// `address` plus `by`, in its own family; `None` past the family's last
/// address.
pub fn offset(address: IpAddr, by: u128) -> Option<IpAddr> {
    match address {
        IpAddr::V4(v4) => {
            let by = u32::try_from(by).ok()?;
            u32::from(v4).checked_add(by).map(|a| IpAddr::V4(a.into()))
        }
        IpAddr::V6(v6) => u128::from(v6).checked_add(by).map(|a| IpAddr::V6(a.into())),
    }
}

/// Every address the spec names for a replica: `address` and `nextAddress`
/// of each entry, and every address of the pairs of each entry with `count`.
pub fn addresses_taken(spec: &Spec) -> Vec<IpAddr> {
    spec.services
        .iter()
        .flat_map(|s| &s.replicas)
        .flat_map(|r| match &r.count {
            Some(count) => (0..count.value.saturating_mul(2))
                .filter_map(|k| offset(**r.address, u128::from(k)))
                .collect::<Vec<_>>(),
            None => std::iter::once(&r.address)
                .chain(&r.next_address)
                .map(|a| ***a)
                .collect(),
        })
        .collect()
}

/// The next address lessnat chooses for an entry without `nextAddress` or
/// `count`: the highest host address of its node's subnet that the spec
/// names for no replica; the second such entry on that subnet (in spec
/// order) gets the second highest, and so on. Every node derives the same
/// choice from the same spec.
fn chosen_next_address(spec: &Spec, replica: &Replica) -> Option<IpAddr> {
    let subnet = subnet_of(spec, replica)?;
    let taken = addresses_taken(spec);
    let choosing: Vec<&Replica> = spec
        .services
        .iter()
        .flat_map(|s| &s.replicas)
        .filter(|r| r.count.is_none() && r.next_address.is_none())
        .filter(|r| subnet_of(spec, r) == Some(subnet))
        .collect();
    let rank = choosing.iter().position(|r| std::ptr::eq(*r, replica))?;
    subnet
        .hosts()
        .rev()
        .filter(|host| !taken.contains(host))
        .nth(rank)
}

/// The container subnet of `replica`'s node in its address's family.
fn subnet_of(spec: &Spec, replica: &Replica) -> Option<IpNet> {
    worker_subnets(spec.node(&replica.node)?)
        .into_iter()
        .find(|subnet| subnet.addr().is_ipv4() == replica.address.is_ipv4())
}

/// A load-balancer node's part: its id and the VIP ports it serves.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadBalancerRole<'a> {
    /// The id carried in DSCP (1..63).
    pub id: u8,
    /// The node's VIPs.
    pub vips: Vec<IpAddr>,
    /// The VIP ports of routed services on those VIPs.
    pub vip_ports: Vec<VipPort<'a>>,
    /// Every worker's container subnets, each with the worker's address of
    /// its family.
    pub workers: Vec<(IpNet, IpAddr)>,
}

/// One port of a routed service reached through a VIP.
#[derive(Debug, Clone, PartialEq)]
pub struct VipPort<'a> {
    /// The service.
    pub service: &'a Service,
    /// The port.
    pub port: &'a Port,
    /// The VIP.
    pub vip: IpAddr,
    /// The port on the VIP.
    pub vip_port: u16,
    /// `SERVICE/PORT` (`SERVICE/PORT/ipv6` for a port's `vip6`): the name
    /// of its spread in the table.
    pub comment: String,
}

impl VipPort<'_> {
    /// Whether `address` is of the VIP's family: the replicas it spreads
    /// over are those whose addresses are.
    pub fn reaches(&self, address: IpAddr) -> bool {
        address.is_ipv4() == self.vip.is_ipv4()
    }
}

/// A worker node's part: its container subnets and the load-balancer nodes
/// replies go back through.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerRole {
    /// The node's container subnets (one per address family).
    pub subnets: Vec<IpNet>,
    /// Every load-balancer node: id and address, one entry per address.
    pub load_balancers: Vec<(u8, IpAddr)>,
}

impl WorkerRole {
    /// The ids of the load-balancer nodes, each once.
    pub fn lb_ids(&self) -> Vec<u8> {
        let mut ids: Vec<u8> = self.load_balancers.iter().map(|(id, _)| *id).collect();
        ids.dedup();
        ids
    }
}

/// The load-balancer role of `node`, if it has one.
pub fn load_balancer_role<'a>(spec: &'a Spec, node: &str) -> Option<LoadBalancerRole<'a>> {
    let lb = spec.node(node)?.load_balancer.as_ref()?;
    let vips: Vec<IpAddr> = lb.vips.iter().map(|v| *v.value).collect();
    let vip_ports = spec
        .services
        .iter()
        .filter(|s| s.network == NetworkMode::Routed)
        .flat_map(|service| service.ports.iter().map(move |port| (service, port)))
        .flat_map(|(service, port)| {
            let comment = format!("{}/{}", service.name.value, port.name.value);
            let second = format!("{comment}/ipv6");
            [(&port.vip, comment), (&port.vip6, second)]
                .into_iter()
                .filter_map(|(vip, comment)| Some((*vip.as_ref()?.value, comment)))
                .filter(|(vip, _)| vips.contains(vip))
                .map(move |(vip, comment)| VipPort {
                    service,
                    port,
                    vip,
                    vip_port: port.vip_port.as_ref().map_or(port.port.value, |p| p.value),
                    comment,
                })
        })
        .collect();
    let workers = spec
        .nodes
        .iter()
        .filter(|n| n.name.value != node)
        .flat_map(|n| {
            worker_subnets(n)
                .into_iter()
                .filter_map(|subnet| Some((subnet, address_like(n, subnet.addr())?)))
        })
        .collect();
    Some(LoadBalancerRole {
        id: lb.id.value,
        vips,
        vip_ports,
        workers,
    })
}

/// The worker role of `node`: it has a container subnet and runs at least one
/// routed replica.
pub fn worker_role(spec: &Spec, node: &str) -> Option<WorkerRole> {
    let subnets = worker_subnets(spec.node(node)?);
    let runs_replicas = spec
        .services
        .iter()
        .flat_map(|s| &s.replicas)
        .any(|r| r.node.value == node);
    if subnets.is_empty() || !runs_replicas {
        return None;
    }
    let load_balancers = spec
        .nodes
        .iter()
        .flat_map(|n| {
            let id = n.load_balancer.as_ref().map(|lb| lb.id.value);
            node_addresses(n)
                .into_iter()
                .filter_map(move |address| Some((id?, address)))
        })
        .collect();
    Some(WorkerRole {
        subnets,
        load_balancers,
    })
}

/// A node's container subnets: `containerSubnet`, and `containerSubnet6`
/// when it has one.
pub fn worker_subnets(node: &Node) -> Vec<IpNet> {
    [&node.container_subnet, &node.container_subnet6]
        .into_iter()
        .filter_map(|subnet| Some(*subnet.as_ref()?.value))
        .collect()
}

/// A node's addresses: `address`, and `address6` when it has one.
pub fn node_addresses(node: &Node) -> Vec<IpAddr> {
    std::iter::once(*node.address.value)
        .chain(node.address6.as_ref().map(|a| *a.value))
        .collect()
}

/// The node's address of `like`'s family, if it has one.
pub fn address_like(node: &Node, like: IpAddr) -> Option<IpAddr> {
    node_addresses(node)
        .into_iter()
        .find(|a| a.is_ipv4() == like.is_ipv4())
}

/// The policy routing rules and routes `node` needs, sorted as observation
/// sorts them. The `/32` (`/128`) routes to wired containers are not
/// included: they belong to each container's wiring. Rule 27000 is there for
/// IPv4 as it always was, and for IPv6 when the node routes IPv6.
pub fn desired_routing(spec: &Spec, node: &str) -> RoutingState {
    let lb = load_balancer_role(spec, node);
    let worker = worker_role(spec, node);
    let mut state = RoutingState::default();
    if lb.is_none() && worker.is_none() {
        return state;
    }
    let subnets = lb
        .iter()
        .flat_map(|lb| lb.workers.iter().map(|(subnet, _)| subnet))
        .chain(worker.iter().flat_map(|w| &w.subnets));
    let ipv6 = subnets.into_iter().any(|s| !s.addr().is_ipv4());
    for family in ["inet", "inet6"].into_iter().take(if ipv6 { 2 } else { 1 }) {
        state.rules.push(IpRule {
            family: family.into(),
            priority: ROUTES_TABLE,
            source: None,
            fwmark: None,
            fwmask: None,
            table: ROUTES_TABLE,
        });
    }
    if let Some(lb) = &lb {
        for (subnet, via) in &lb.workers {
            state.routes.push(Route {
                table: ROUTES_TABLE,
                destination: subnet.to_string(),
                gateway: Some(via.to_string()),
                device: None,
            });
        }
    }
    if let Some(worker) = &worker {
        for (id, address) in &worker.load_balancers {
            let Some(subnet) = worker
                .subnets
                .iter()
                .find(|s| s.addr().is_ipv4() == address.is_ipv4())
            else {
                continue;
            };
            state.rules.push(IpRule {
                family: family(*address).into(),
                priority: reply_table(*id),
                source: Some(subnet.to_string()),
                fwmark: Some(lb_mark(*id)),
                fwmask: None,
                table: reply_table(*id),
            });
            state.routes.push(Route {
                table: reply_table(*id),
                destination: "default".into(),
                gateway: Some(address.to_string()),
                device: None,
            });
        }
    }
    state.rules.sort();
    state.routes.sort();
    state
}

/// The routing family of `address`: `inet` or `inet6`.
fn family(address: IpAddr) -> &'static str {
    match address {
        IpAddr::V4(_) => "inet",
        IpAddr::V6(_) => "inet6",
    }
}

/// The addresses lessnat puts on `node`: a load-balancer node's VIPs on `lo`
/// (`/32`, or `/128` for IPv6).
pub fn desired_addresses(spec: &Spec, node: &str) -> Vec<OwnedAddress> {
    let mut addresses: Vec<OwnedAddress> = load_balancer_role(spec, node)
        .map(|lb| {
            lb.vips
                .iter()
                .map(|vip| OwnedAddress {
                    device: "lo".into(),
                    address: IpNet::from(*vip).to_string(),
                })
                .collect()
        })
        .unwrap_or_default();
    addresses.sort();
    addresses.dedup();
    addresses
}

/// The kernel settings `node` needs: forwarding on load-balancer nodes and
/// workers (IPv6 forwarding too where the node routes IPv6: a worker with
/// an IPv6 subnet, a load-balancer node with an IPv6 VIP), `src_valid_mark`
/// on workers. IPv6 has no `rp_filter` or `src_valid_mark`: a reverse-path
/// rule in nftables (`fib saddr . mark . iif oif missing drop`) passes
/// because the reply rules are scoped `from SUBNET` (docs/routed-mode.md).
pub fn desired_sysctls(spec: &Spec, node: &str) -> BTreeMap<String, String> {
    let [forward, src_valid_mark] = ROUTED_SYSCTLS;
    let mut sysctls = BTreeMap::new();
    let worker = worker_role(spec, node);
    let lb = load_balancer_role(spec, node);
    if worker.is_some() || lb.is_some() {
        sysctls.insert(forward.to_string(), "1".to_string());
    }
    let ipv6 = worker
        .iter()
        .flat_map(|w| &w.subnets)
        .any(|s| !s.addr().is_ipv4())
        || lb.iter().flat_map(|lb| &lb.vips).any(|v| !v.is_ipv4());
    if ipv6 {
        sysctls.insert(IPV6_FORWARDING.to_string(), "1".to_string());
    }
    if worker.is_some() {
        sysctls.insert(src_valid_mark.to_string(), "1".to_string());
    }
    sysctls
}

/// The version tag a load-balancer node records for a replica address: the
/// first 32 bits of the replica container's spec hash.
pub fn version_tag(spec_hash: &str) -> u32 {
    spec_hash
        .get(..8)
        .and_then(|hex| u32::from_str_radix(hex, 16).ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::load_bytes;

    fn spec() -> Spec {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/routed.yaml"))
                .expect("example exists");
        load_bytes("routed.yaml", text.as_bytes())
            .unwrap_or_else(|r| panic!("{}", r.render(crate::style::Style::Plain)))
    }

    #[test]
    fn next_addresses_are_chosen_from_the_top_of_the_subnet() {
        let spec = spec();
        let api = &spec.services[0];
        let addresses = replicas_of(&spec, api)[0].pair;
        assert_eq!(addresses.address, IpAddr::from([10, 20, 1, 5]));
        assert_eq!(addresses.next_address, IpAddr::from([10, 20, 1, 254]));
        assert_eq!(addresses.other(addresses.next_address), addresses.address);
    }

    #[test]
    fn counts_expand_into_consecutive_pairs_and_defaults_differ() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/routed-replicas.yaml"
        ))
        .expect("example exists")
        .replace(
            "address: 10.20.2.5, nextAddress: 10.20.2.6",
            "address: 10.20.2.5",
        )
        .replace(
            "address: 10.20.2.7, nextAddress: 10.20.2.8",
            "address: 10.20.2.7",
        );
        let spec = load_bytes("routed-replicas.yaml", text.as_bytes())
            .unwrap_or_else(|r| panic!("{}", r.render(crate::style::Style::Plain)));
        let placed = replicas_of(&spec, &spec.services[0]);
        let on = |node: &str| -> Vec<(u32, String, String)> {
            placed
                .iter()
                .filter(|r| r.node == node)
                .map(|r| {
                    let pair = r.pair;
                    (
                        r.number,
                        pair.address.to_string(),
                        pair.next_address.to_string(),
                    )
                })
                .collect()
        };
        let web1 = on("web-1");
        assert_eq!(web1.len(), 8);
        assert_eq!(web1[0], (1, "10.20.1.10".into(), "10.20.1.11".into()));
        assert_eq!(web1[7], (8, "10.20.1.24".into(), "10.20.1.25".into()));
        assert_eq!(
            on("web-2"),
            [
                (1, "10.20.2.5".into(), "10.20.2.254".into()),
                (2, "10.20.2.7".into(), "10.20.2.253".into()),
            ],
            "each replica without nextAddress gets its own"
        );
    }

    #[test]
    fn dual_stack_replicas_expand_in_their_own_family() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/routed-dual-stack.yaml"
        ))
        .expect("example exists");
        let spec = load_bytes("routed-dual-stack.yaml", text.as_bytes())
            .unwrap_or_else(|r| panic!("{}", r.render(crate::style::Style::Plain)));
        let pairs: Vec<(String, String)> = replicas_on(&spec, &spec.services[0], "web-1")
            .iter()
            .map(|r| (r.pair.address.to_string(), r.pair.next_address.to_string()))
            .collect();
        assert_eq!(pairs.len(), 8);
        assert_eq!(pairs[3], ("10.20.1.16".into(), "10.20.1.17".into()));
        assert_eq!(pairs[4], ("fd00:20:1::10".into(), "fd00:20:1::11".into()));
        assert_eq!(pairs[7], ("fd00:20:1::16".into(), "fd00:20:1::17".into()));
        let web2 = replicas_on(&spec, &spec.services[0], "web-2");
        assert_eq!(
            web2[1].pair.next_address.to_string(),
            "fd00:20:2:0:ffff:ffff:ffff:ffff",
            "the highest address of the IPv6 subnet"
        );
        let lb = load_balancer_role(&spec, "lb-1").expect("lb-1 balances");
        let comments: Vec<&str> = lb.vip_ports.iter().map(|v| v.comment.as_str()).collect();
        assert_eq!(comments, ["api/http", "api/http/ipv6"]);
        assert_eq!(lb.workers.len(), 4, "two subnets of two workers");
        let worker = worker_role(&spec, "web-1").expect("web-1 works");
        assert_eq!(worker.subnets.len(), 2);
        assert_eq!(worker.lb_ids(), [1, 2]);
        assert_eq!(
            desired_sysctls(&spec, "web-1")
                .get(IPV6_FORWARDING)
                .map(String::as_str),
            Some("1")
        );
        assert_eq!(
            offset("255.255.255.255".parse().expect("address"), 1),
            None,
            "no address past the family's last"
        );
    }

    #[test]
    fn roles_follow_the_nodes() {
        let spec = spec();
        let lb = load_balancer_role(&spec, "lb-1").expect("lb-1 balances");
        assert_eq!(lb.id, 1);
        assert_eq!(lb.vip_ports.len(), 1);
        assert_eq!(lb.vip_ports[0].vip_port, 80);
        assert_eq!(lb.workers.len(), 2);
        assert!(worker_role(&spec, "lb-1").is_none());
        let worker = worker_role(&spec, "web-1").expect("web-1 works");
        assert_eq!(worker.load_balancers.len(), 2);
    }

    #[test]
    fn workers_route_replies_back_by_mark() {
        let spec = spec();
        let routing = desired_routing(&spec, "web-1");
        let marked: Vec<_> = routing
            .rules
            .iter()
            .filter(|r| r.fwmark.is_some())
            .collect();
        assert_eq!(marked.len(), 2);
        assert_eq!(marked[0].fwmark, Some(0x6c6e_0001));
        assert_eq!(marked[0].source.as_deref(), Some("10.20.1.0/24"));
        assert_eq!(routing.routes[0].gateway.as_deref(), Some("192.0.2.2"));
        assert_eq!(desired_sysctls(&spec, "web-1").len(), 2);
        assert_eq!(desired_sysctls(&spec, "lb-1").len(), 1);
        assert_eq!(
            desired_addresses(&spec, "lb-1")[0].address,
            "203.0.113.10/32"
        );
        assert!(desired_addresses(&spec, "web-1").is_empty());
    }

    #[test]
    fn version_tags_read_the_hash_prefix() {
        assert_eq!(version_tag("0000002aXYZ"), 42);
        assert_eq!(version_tag("zz"), 0);
    }
}
