//! The routed-mode parts of lessnat's table, as values in the form `nft -j`
//! lists them (so desired and observed compare with `==`).
//!
//! Load-balancer node:
//! - chain `routed_dnat` (nat prerouting, dstnat): one rule per VIP port,
//!   `ip daddr VIP tcp dport VP dnat ip to numgen inc mod N map { 0 : A, ... } : PORT`,
//!   an even spread over the replicas that answer; no masquerade anywhere;
//! - chain `routed_dscp` (filter forward): `ct status dnat ip daddr SUBNET ip dscp set ID`
//!   per worker subnet: only the six DSCP bits change, ECN is untouched;
//! - map `routed_versions` (`ipv4_addr : mark`): the address each replica's
//!   new connections go to, with the version it was chosen for. The planner
//!   reads it back to tell a finished switch from one still to make;
//! - map `routed_down` (`ipv4_addr : mark`, only while it has elements): the
//!   replicas left out of the spread because neither address answers, with
//!   the time (seconds since the Unix epoch) they left it.
//!
//! Worker node, chain `routed_mark` (filter prerouting, mangle), per LB id:
//! `ip daddr SUBNET ct state new ip dscp ID ct mark set MARK` and
//! `ct mark MARK meta mark set MARK`, so replies (and, with `src_valid_mark`,
//! reverse-path checks) use that LB's routing table. While the spec gives a
//! routed service of the worker a canary, the chain `routed_canary` (nat
//! prerouting) too, empty but during a canary's hold: then it sends a share
//! of the new connections that reach the old replica to the next one
//! ([`canary_split_rule`]), and once the canary is promoted, `routed_mark`
//! drops the load-balancer nodes' new connections (their probes) to the old
//! replica ([`canary_promote_rule`]), which is how they learn to switch.
//!
//! IPv6 uses the same rules with `ip6` (`ip6 dscp` is the traffic class's
//! DSCP part, ECN untouched again, `dnat ip6 to`), and its own maps,
//! `routed_versions6` and `routed_down6` (`ipv6_addr : mark`): nft 1.0's
//! JSON has no map keyed by either family. A node with only IPv6 replicas
//! has no `routed_versions`.

use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::{Value, json};

use crate::model::compare_keys;
use crate::model::{NftChain, NftElement, NftHook, NftMap, NftRule, NftTable};
use crate::ownership::lb_mark;
use crate::spec::{Percent, Protocol};

/// Name of the map recording where each replica's new connections go
/// (IPv4 replicas; [`VERSIONS_MAP_V6`] holds the IPv6 ones).
pub const VERSIONS_MAP: &str = "routed_versions";

/// [`VERSIONS_MAP`] for IPv6 replicas.
pub const VERSIONS_MAP_V6: &str = "routed_versions6";

/// Name of the map recording since when each replica out of the spread is
/// out (IPv4 replicas; [`DOWN_MAP_V6`] holds the IPv6 ones).
pub const DOWN_MAP: &str = "routed_down";

/// [`DOWN_MAP`] for IPv6 replicas.
pub const DOWN_MAP_V6: &str = "routed_down6";

/// One VIP port and the replica addresses its new connections are spread over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dnat {
    /// `SERVICE/PORT`, the rule's comment.
    pub comment: String,
    /// `tcp` or `udp`.
    pub protocol: Protocol,
    /// The VIP.
    pub vip: IpAddr,
    /// The port on the VIP.
    pub vip_port: u16,
    /// The replica addresses, in spec order.
    pub targets: Vec<IpAddr>,
    /// The port the replicas listen on.
    pub port: u16,
}

/// A load-balancer node's chains and map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadBalancerRules {
    /// The node's id, written into DSCP.
    pub id: u8,
    /// The DNAT rules.
    pub dnat: Vec<Dnat>,
    /// Every worker's container subnet.
    pub subnets: Vec<IpNet>,
    /// Address → version tag of the replica addresses in use.
    pub versions: Vec<(IpAddr, u32)>,
    /// Address → when it left the spread (seconds since the Unix epoch) of
    /// the replicas out of it.
    pub down: Vec<(IpAddr, u32)>,
}

/// A worker node's chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerRules {
    /// The node's container subnets (one per address family).
    pub subnets: Vec<IpNet>,
    /// The ids of every load-balancer node.
    pub lb_ids: Vec<u8>,
}

/// Adds the load-balancer parts to `table`.
pub fn add_load_balancer(table: &mut NftTable, rules: &LoadBalancerRules) {
    let (v4, v6): (Vec<_>, Vec<_>) = rules.versions.iter().partition(|(a, _)| a.is_ipv4());
    // The IPv4 map is there as it always was, unless the node only has
    // IPv6 replicas.
    if !v4.is_empty() || v6.is_empty() {
        table.maps.push(address_marks(VERSIONS_MAP, false, &v4));
    }
    if !v6.is_empty() {
        table.maps.push(address_marks(VERSIONS_MAP_V6, true, &v6));
    }
    let (v4, v6): (Vec<_>, Vec<_>) = rules.down.iter().partition(|(a, _)| a.is_ipv4());
    if !v4.is_empty() {
        table.maps.push(address_marks(DOWN_MAP, false, &v4));
    }
    if !v6.is_empty() {
        table.maps.push(address_marks(DOWN_MAP_V6, true, &v6));
    }
    table.chains.push(NftChain {
        name: "routed_dnat".into(),
        hook: Some(hook("nat", "prerouting", -100)),
        rules: rules.dnat.iter().map(dnat_rule).collect(),
    });
    table.chains.push(NftChain {
        name: "routed_dscp".into(),
        hook: Some(hook("filter", "forward", 0)),
        rules: rules
            .subnets
            .iter()
            .map(|subnet| NftRule {
                comment: None,
                expr: vec![
                    matches("in", json!({"ct": {"key": "status"}}), json!("dnat")),
                    matches("==", ip(subnet.addr(), "daddr"), prefix(subnet)),
                    json!({"mangle": {"key": ip(subnet.addr(), "dscp"), "value": dscp(rules.id)}}),
                ],
            })
            .collect(),
    });
}

/// Adds the worker chain to `table`.
pub fn add_worker(table: &mut NftTable, rules: &WorkerRules) {
    let mut marks = Vec::new();
    for &id in &rules.lb_ids {
        let mark = lb_mark(id);
        for subnet in &rules.subnets {
            marks.push(NftRule {
                comment: None,
                expr: vec![
                    matches("==", ip(subnet.addr(), "daddr"), prefix(subnet)),
                    matches("in", json!({"ct": {"key": "state"}}), json!("new")),
                    matches("==", ip(subnet.addr(), "dscp"), dscp(id)),
                    json!({"mangle": {"key": {"ct": {"key": "mark"}}, "value": mark}}),
                ],
            });
        }
        marks.push(NftRule {
            comment: None,
            expr: vec![
                matches("==", json!({"ct": {"key": "mark"}}), json!(mark)),
                json!({"mangle": {"key": {"meta": {"key": "mark"}}, "value": mark}}),
            ],
        });
    }
    table.chains.push(NftChain {
        name: "routed_mark".into(),
        hook: Some(hook("filter", "prerouting", -150)),
        rules: marks,
    });
}

/// The worker chain a routed canary's split is in.
pub const CANARY_CHAIN: &str = "routed_canary";

/// Adds the (empty) chain of routed canaries' splits to a worker's `table`.
pub fn add_canary_chain(table: &mut NftTable) {
    table.chains.push(NftChain {
        name: CANARY_CHAIN.into(),
        hook: Some(hook("nat", "prerouting", -100)),
        rules: Vec::new(),
    });
}

/// The comment of the split rule of `service`'s canary at the old replica `old`.
pub fn canary_split_comment(service: &str, old: IpAddr) -> String {
    format!("lessnat canary {service} {old}")
}

/// The comment of the rule that promotes `service`'s canary at the old replica `old`.
pub fn canary_promote_comment(service: &str, old: IpAddr) -> String {
    format!("lessnat canary {service} {old} promoted")
}

/// A canary's split on the worker, with its chain: `weight` of the new
/// connections that reach the old replica at `old` go to the next one at
/// `next` (same port), except those of the load-balancer nodes themselves
/// (`balancers`, those of `old`'s family: their probes must reach the
/// address they probe).
pub fn canary_split_rule(
    service: &str,
    old: IpAddr,
    next: IpAddr,
    weight: Percent,
    balancers: &[IpAddr],
) -> (String, NftRule) {
    let mut expr = vec![matches("==", ip(old, "daddr"), json!(old.to_string()))];
    if let Some(from) = one_or_set(old, balancers) {
        expr.push(matches("!=", ip(old, "saddr"), from));
    }
    expr.push(matches(
        "<",
        json!({"numgen": {"mode": "random", "mod": 100, "offset": 0}}),
        json!(weight.get()),
    ));
    expr.push(json!({"dnat": {"family": protocol(next), "addr": next.to_string()}}));
    (
        CANARY_CHAIN.to_string(),
        NftRule {
            comment: Some(canary_split_comment(service, old)),
            expr,
        },
    )
}

/// A promoted canary's signal to the load-balancer nodes, with its chain:
/// their new connections (probes) to the old replica at `old` are dropped,
/// so they see it silent while the next one answers, and switch. Clients'
/// connections pass. `None` without load-balancer nodes.
pub fn canary_promote_rule(
    service: &str,
    old: IpAddr,
    balancers: &[IpAddr],
) -> Option<(String, NftRule)> {
    let from = one_or_set(old, balancers)?;
    Some((
        "routed_mark".to_string(),
        NftRule {
            comment: Some(canary_promote_comment(service, old)),
            expr: vec![
                matches("==", ip(old, "saddr"), from),
                matches("==", ip(old, "daddr"), json!(old.to_string())),
                matches("in", json!({"ct": {"key": "state"}}), json!("new")),
                json!({"drop": null}),
            ],
        },
    ))
}

/// The `addresses` of `like`'s family as `nft -j` lists a match's right
/// side: one address alone, several as a sorted set; `None` when there are
/// none.
fn one_or_set(like: IpAddr, addresses: &[IpAddr]) -> Option<Value> {
    let mut sorted: Vec<IpAddr> = addresses
        .iter()
        .copied()
        .filter(|a| a.is_ipv6() == like.is_ipv6())
        .collect();
    sorted.sort();
    sorted.dedup();
    match sorted.as_slice() {
        [] => None,
        [one] => Some(json!(one.to_string())),
        all => Some(json!({"set": all.iter().map(ToString::to_string).collect::<Vec<_>>()})),
    }
}

/// An `ipv4_addr : mark` (or `ipv6_addr : mark`) map named `name` with
/// `entries`.
fn address_marks(name: &str, ipv6: bool, entries: &[&(IpAddr, u32)]) -> NftMap {
    let mut elements: Vec<NftElement> = entries
        .iter()
        .map(|(address, mark)| NftElement {
            key: json!(address.to_string()),
            value: json!(mark),
        })
        .collect();
    elements.sort_by(|a, b| compare_keys(&a.key, &b.key));
    NftMap {
        name: name.into(),
        key: if ipv6 { "ipv6_addr" } else { "ipv4_addr" }.into(),
        data: Some("mark".into()),
        comment: None,
        elements,
    }
}

/// The address → version tag entries of a table's versions map.
pub fn versions_in(table: &NftTable) -> Vec<(IpAddr, u32)> {
    let mut found = address_marks_in(table, VERSIONS_MAP);
    found.extend(address_marks_in(table, VERSIONS_MAP_V6));
    found
}

/// The address → time left entries of a table's map of replicas out of the
/// spread.
pub fn down_in(table: &NftTable) -> Vec<(IpAddr, u32)> {
    let mut found = address_marks_in(table, DOWN_MAP);
    found.extend(address_marks_in(table, DOWN_MAP_V6));
    found
}

/// The entries of the address → mark map `name` of a table.
fn address_marks_in(table: &NftTable, name: &str) -> Vec<(IpAddr, u32)> {
    table
        .maps
        .iter()
        .filter(|m| m.name == name)
        .flat_map(|m| &m.elements)
        .filter_map(|e| {
            let address = e.key.as_str()?.parse().ok()?;
            let tag = u32::try_from(e.value.as_u64()?).ok()?;
            Some((address, tag))
        })
        .collect()
}

/// The replica addresses each `routed_dnat` rule of a table spreads new
/// connections over, by the rule's comment (`SERVICE/PORT`).
pub fn spreads_in(table: &NftTable) -> Vec<(String, Vec<IpAddr>)> {
    table
        .chains
        .iter()
        .filter(|c| c.name == "routed_dnat")
        .flat_map(|c| &c.rules)
        .filter_map(|rule| {
            let addr = rule.expr.iter().find_map(|e| e.get("dnat"))?.get("addr")?;
            let targets = match addr.as_str() {
                Some(one) => vec![one.parse().ok()?],
                None => addr
                    .pointer("/map/data/set")?
                    .as_array()?
                    .iter()
                    .filter_map(|entry| entry.get(1)?.as_str()?.parse().ok())
                    .collect(),
            };
            Some((rule.comment.clone()?, targets))
        })
        .collect()
}

fn dnat_rule(dnat: &Dnat) -> NftRule {
    let proto = dnat.protocol.as_str();
    let addr = match dnat.targets.as_slice() {
        [one] => json!(one.to_string()),
        targets => {
            let entries: Vec<Value> = targets
                .iter()
                .enumerate()
                .map(|(i, a)| json!([i, a.to_string()]))
                .collect();
            json!({"map": {
                "key": {"numgen": {"mode": "inc", "mod": targets.len(), "offset": 0}},
                "data": {"set": entries},
            }})
        }
    };
    NftRule {
        comment: Some(dnat.comment.clone()),
        expr: vec![
            matches("==", ip(dnat.vip, "daddr"), json!(dnat.vip.to_string())),
            matches(
                "==",
                json!({"payload": {"protocol": proto, "field": "dport"}}),
                json!(dnat.vip_port),
            ),
            json!({"dnat": {"family": protocol(dnat.vip), "addr": addr, "port": dnat.port}}),
        ],
    }
}

fn hook(kind: &str, hook: &str, priority: i32) -> NftHook {
    NftHook {
        kind: kind.into(),
        hook: hook.into(),
        priority,
        policy: "accept".into(),
    }
}

fn matches(op: &str, left: Value, right: Value) -> Value {
    json!({"match": {"op": op, "left": left, "right": right}})
}

/// The nft protocol of `address`'s family: `ip` or `ip6`.
fn protocol(address: IpAddr) -> &'static str {
    match address {
        IpAddr::V4(_) => "ip",
        IpAddr::V6(_) => "ip6",
    }
}

/// The header field `field` of `address`'s family.
fn ip(address: IpAddr, field: &str) -> Value {
    json!({"payload": {"protocol": protocol(address), "field": field}})
}

fn prefix(subnet: &IpNet) -> Value {
    json!({"prefix": {"addr": subnet.network().to_string(), "len": subnet.prefix_len()}})
}

/// A DSCP value as `nft -j` lists it: its symbolic name when it has one.
fn dscp(value: u8) -> Value {
    let name = match value {
        0x01 => "lephb",
        0x08 => "cs1",
        0x0a => "af11",
        0x0c => "af12",
        0x0e => "af13",
        0x10 => "cs2",
        0x12 => "af21",
        0x14 => "af22",
        0x16 => "af23",
        0x18 => "cs3",
        0x1a => "af31",
        0x1c => "af32",
        0x1e => "af33",
        0x20 => "cs4",
        0x22 => "af41",
        0x24 => "af42",
        0x26 => "af43",
        0x28 => "cs5",
        0x2c => "va",
        0x2e => "ef",
        0x30 => "cs6",
        0x38 => "cs7",
        _ => return json!(value),
    };
    json!(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipv4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::from([a, b, c, d])
    }

    #[test]
    fn one_target_needs_no_spread() {
        let mut dnat = Dnat {
            comment: "api/http".into(),
            protocol: Protocol::Tcp,
            vip: ipv4(203, 0, 113, 10),
            vip_port: 80,
            targets: vec![ipv4(10, 20, 1, 5)],
            port: 8080,
        };
        let rule = dnat_rule(&dnat);
        assert_eq!(rule.expr[2]["dnat"]["addr"], json!("10.20.1.5"));
        dnat.targets.push(ipv4(10, 20, 2, 5));
        let rule = dnat_rule(&dnat);
        assert_eq!(
            rule.expr[2]["dnat"]["addr"]["map"]["key"]["numgen"]["mod"],
            json!(2)
        );
    }

    #[test]
    fn dscp_values_use_nft_names() {
        assert_eq!(dscp(1), json!("lephb"));
        assert_eq!(dscp(2), json!(2));
        assert_eq!(dscp(46), json!("ef"));
    }

    #[test]
    fn versions_read_back() {
        let mut table = crate::desired::host_table::empty_table();
        add_load_balancer(
            &mut table,
            &LoadBalancerRules {
                id: 1,
                dnat: Vec::new(),
                subnets: Vec::new(),
                versions: vec![(ipv4(10, 20, 1, 5), 7)],
                down: vec![(ipv4(10, 20, 2, 5), 1_796_000_000)],
            },
        );
        assert_eq!(versions_in(&table), vec![(ipv4(10, 20, 1, 5), 7)]);
        assert_eq!(down_in(&table), vec![(ipv4(10, 20, 2, 5), 1_796_000_000)]);
    }

    #[test]
    fn spreads_read_back() {
        let one = ipv4(10, 20, 1, 5);
        let two = ipv4(10, 20, 2, 5);
        let mut table = crate::desired::host_table::empty_table();
        let dnat = |comment: &str, targets: Vec<IpAddr>| Dnat {
            comment: comment.into(),
            protocol: Protocol::Tcp,
            vip: ipv4(203, 0, 113, 10),
            vip_port: 80,
            targets,
            port: 8080,
        };
        add_load_balancer(
            &mut table,
            &LoadBalancerRules {
                id: 1,
                dnat: vec![dnat("api/http", vec![one, two]), dnat("api/alt", vec![two])],
                subnets: Vec::new(),
                versions: Vec::new(),
                down: Vec::new(),
            },
        );
        assert_eq!(
            spreads_in(&table),
            vec![
                ("api/http".into(), vec![one, two]),
                ("api/alt".into(), vec![two])
            ]
        );
    }

    #[test]
    fn canary_rules_use_the_old_replicas_family() {
        let old: IpAddr = "fd00:20:1::5".parse().expect("address");
        let next: IpAddr = "fd00:20:1::6".parse().expect("address");
        let balancers = [ipv4(192, 0, 2, 2), "2001:db8::2".parse().expect("address")];
        let weight = "10%".parse().expect("weight");
        let (chain, split) = canary_split_rule("api", old, next, weight, &balancers);
        assert_eq!(chain, CANARY_CHAIN);
        assert_eq!(
            split.expr[1],
            matches("!=", ip(old, "saddr"), json!("2001:db8::2")),
            "only the load-balancer nodes' IPv6 addresses"
        );
        assert_eq!(
            split.expr[3],
            json!({"dnat": {"family": "ip6", "addr": "fd00:20:1::6"}})
        );
        let (chain, promote) = canary_promote_rule("api", old, &balancers).expect("a rule");
        assert_eq!(chain, "routed_mark");
        assert_eq!(
            promote.comment.as_deref(),
            Some("lessnat canary api fd00:20:1::5 promoted")
        );
        assert_eq!(canary_promote_rule("api", old, &[ipv4(192, 0, 2, 2)]), None);
    }
}
