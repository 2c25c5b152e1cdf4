//! The nftables table lessnat wants on a host-mode node, as a value of the same
//! type observation produces, so desired and observed compare with `==`.
//!
//! The table is always present with empty, hooked nat chains: conntrack then
//! tracks every flow from its first packet, so when a redirect appears, packets
//! of established flows are recognised as such and are not redirected. Each
//! chain holds one static rule per protocol,
//! `meta l4proto tcp fib daddr type local meta mark != PROBE redirect to :tcp dport map @redirect_tcp`;
//! an upgrade adds and removes only the map element `PORT : TEMP_PORT`, so the
//! packet path stays O(1) however many upgrades run.
//!
//! A canary (a share of new connections to the next version) is one rule per
//! port in each chain, after the static ones, for as long as it holds:
//! `fib daddr type local meta mark != PROBE tcp dport 8000 numgen random mod 100 < 5 redirect to :18000`.
//! A map cannot hold the share: nft 1.0's JSON cannot declare a map keyed by
//! a port and a `numgen` (its integer type has no size outside `typeof`).

use serde_json::{Value, json};

use crate::model::{
    NftChain, NftElement, NftHook, NftMap, NftRule, NftTable, Redirect, redirect_map_name,
};
use crate::ownership::{NFT_FAMILY, NFT_GUARD_TABLE, NFT_TABLE, PROBE_MARK};
use crate::spec::{Percent, Protocol, Service};

/// Hook priority of lessnat's nat chains: before Docker's nat chains (-100).
pub const NAT_PRIORITY: i32 = -110;

/// The comment that identifies the redirect rule for `protocol`.
pub fn redirect_rule_comment(protocol: Protocol) -> String {
    format!("lessnat redirect-{}", protocol.as_str())
}

const PROTOCOLS: [Protocol; 2] = [Protocol::Tcp, Protocol::Udp];

/// lessnat's table with nothing in it yet: the base routed-mode parts are added to.
pub fn empty_table() -> NftTable {
    NftTable {
        family: NFT_FAMILY.into(),
        name: NFT_TABLE.into(),
        comment: None,
        chains: Vec::new(),
        maps: Vec::new(),
    }
}

/// lessnat's host-mode table with `redirects` active.
pub fn host_table(redirects: &[Redirect]) -> NftTable {
    let maps = PROTOCOLS
        .iter()
        .map(|&protocol| NftMap {
            name: redirect_map_name(protocol),
            key: "inet_service".into(),
            data: Some("inet_service".into()),
            comment: None,
            elements: Vec::new(),
        })
        .collect();
    let chains = NAT_CHAINS
        .into_iter()
        .map(|hook| NftChain {
            name: hook.to_string(),
            hook: Some(NftHook {
                kind: "nat".into(),
                hook: hook.into(),
                priority: NAT_PRIORITY,
                policy: "accept".into(),
            }),
            rules: PROTOCOLS.iter().map(|&p| redirect_rule(p)).collect(),
        })
        .collect();
    let mut table = NftTable {
        family: NFT_FAMILY.into(),
        name: NFT_TABLE.into(),
        comment: None,
        chains,
        maps,
    };
    add_redirects(&mut table, redirects);
    table
}

/// The redirects an upgrade of `service` sets: each port with a temporary
/// port, to it.
pub fn service_redirects(service: &Service) -> Vec<Redirect> {
    service
        .ports
        .iter()
        .filter_map(|p| {
            Some(Redirect {
                protocol: p.protocol,
                port: p.port.value,
                temp_port: p.temp_port.as_ref()?.value,
            })
        })
        .collect()
}

/// Adds the map elements of `redirects` to `table` (one per canonical port:
/// an element with the same key is replaced), keeping each map sorted.
pub fn add_redirects(table: &mut NftTable, redirects: &[Redirect]) {
    for redirect in redirects {
        let name = redirect_map_name(redirect.protocol);
        let Some(map) = table.maps.iter_mut().find(|m| m.name == name) else {
            continue;
        };
        let key = json!(redirect.port);
        map.elements.retain(|e| e.key != key);
        map.elements.push(NftElement {
            key,
            value: json!(redirect.temp_port),
        });
        map.elements.sort_by_key(|e| e.key.as_u64());
    }
}

/// The chains every redirect and canary rule is in: connections from other
/// hosts, and from this one.
const NAT_CHAINS: [&str; 2] = ["prerouting", "output"];

/// The start of every canary rule's comment.
const CANARY_COMMENT: &str = "lessnat canary ";

/// The comment that identifies the canary rule of `redirect`'s port.
pub fn canary_rule_comment(redirect: &Redirect) -> String {
    format!(
        "{CANARY_COMMENT}{}/{}",
        redirect.port,
        redirect.protocol.as_str()
    )
}

/// The comments of the canary rules an upgrade of `service` may set.
pub fn canary_comments(service: &Service) -> Vec<String> {
    service_redirects(service)
        .iter()
        .map(canary_rule_comment)
        .collect()
}

/// The rules of a canary of `service` at `weight`, each with its chain:
/// `weight` of the new connections to each port go to its temporary port,
/// the others pass untouched.
pub fn canary_rules(service: &Service, weight: Percent) -> Vec<(String, NftRule)> {
    let rules: Vec<NftRule> = service_redirects(service)
        .iter()
        .map(|redirect| canary_rule(redirect, weight))
        .collect();
    NAT_CHAINS
        .into_iter()
        .flat_map(|chain| rules.iter().map(|rule| (chain.to_string(), rule.clone())))
        .collect()
}

fn canary_rule(redirect: &Redirect, weight: Percent) -> NftRule {
    let proto = redirect.protocol.as_str();
    NftRule {
        comment: Some(canary_rule_comment(redirect)),
        expr: vec![
            matches(
                "==",
                json!({"fib": {"result": "type", "flags": ["daddr"]}}),
                json!("local"),
            ),
            matches("!=", json!({"meta": {"key": "mark"}}), json!(PROBE_MARK)),
            matches(
                "==",
                json!({"payload": {"protocol": proto, "field": "dport"}}),
                json!(redirect.port),
            ),
            matches(
                "<",
                json!({"numgen": {"mode": "random", "mod": 100, "offset": 0}}),
                json!(weight.get()),
            ),
            json!({"redirect": {"port": redirect.temp_port}}),
        ],
    }
}

/// Appends `rules` (each with its chain) to `table`'s chains.
pub fn add_canary(table: &mut NftTable, rules: &[(String, NftRule)]) {
    for (chain, rule) in rules {
        if let Some(chain) = table.chains.iter_mut().find(|c| &c.name == chain) {
            chain.rules.push(rule.clone());
        }
    }
}

/// Removes the canary rules commented with one of `comments` from `table`.
pub fn remove_canary(table: &mut NftTable, comments: &[String]) {
    for chain in &mut table.chains {
        chain
            .rules
            .retain(|r| r.comment.as_ref().is_none_or(|c| !comments.contains(c)));
    }
}

/// The canary rules `table` carries whose comment is one of `comments`, each
/// with its chain.
pub fn canary_rules_in(table: &NftTable, comments: &[String]) -> Vec<(String, NftRule)> {
    table
        .chains
        .iter()
        .flat_map(|chain| {
            chain
                .rules
                .iter()
                .filter(|r| r.comment.as_ref().is_some_and(|c| comments.contains(c)))
                .map(|rule| (chain.name.clone(), rule.clone()))
        })
        .collect()
}

fn matches(op: &str, left: Value, right: Value) -> Value {
    json!({"match": {"op": op, "left": left, "right": right}})
}

fn redirect_rule(protocol: Protocol) -> NftRule {
    let proto = protocol.as_str();
    NftRule {
        comment: Some(redirect_rule_comment(protocol)),
        expr: vec![
            matches("==", json!({"meta": {"key": "l4proto"}}), json!(proto)),
            matches(
                "==",
                json!({"fib": {"result": "type", "flags": ["daddr"]}}),
                json!("local"),
            ),
            matches("!=", json!({"meta": {"key": "mark"}}), json!(PROBE_MARK)),
            json!({"redirect": {"port": {"map": {
                "key": {"payload": {"protocol": proto, "field": "dport"}},
                "data": format!("@{}", redirect_map_name(protocol)),
            }}}}),
        ],
    }
}

/// The guard table for `table` while an upgrade's redirect must hold: the
/// host-mode chains and maps with the redirects `table` carries, under the
/// guard's name (see `backend::nft::GuardTable`). A canary's rules are
/// left out: each nat chain a new connection passes would draw its share
/// again (5% in each of two tables is 9.75%), and without them the old
/// version serves, so nothing breaks while lessnat's table is restored.
pub fn guard_table(table: &NftTable) -> NftTable {
    NftTable {
        name: NFT_GUARD_TABLE.into(),
        ..host_table(&redirects_in(table))
    }
}

/// The redirects a table carries: the elements of its redirect maps.
pub fn redirects_in(table: &NftTable) -> Vec<Redirect> {
    let mut found = Vec::new();
    for protocol in PROTOCOLS {
        let Some(map) = table
            .maps
            .iter()
            .find(|m| m.name == redirect_map_name(protocol))
        else {
            continue;
        };
        for element in &map.elements {
            let port = element.key.as_u64().and_then(|p| u16::try_from(p).ok());
            let temp = element.value.as_u64().and_then(|p| u16::try_from(p).ok());
            if let (Some(port), Some(temp_port)) = (port, temp) {
                found.push(Redirect {
                    protocol,
                    port,
                    temp_port,
                });
            }
        }
    }
    found.sort();
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steady_state_has_hooked_chains_and_empty_maps() {
        let table = host_table(&[]);
        assert_eq!(table.chains.len(), 2);
        assert!(table.chains.iter().all(|c| {
            c.hook
                .as_ref()
                .is_some_and(|h| h.kind == "nat" && h.priority == -110)
        }));
        assert!(table.maps.iter().all(|m| m.elements.is_empty()));
        assert!(redirects_in(&table).is_empty());
    }

    #[test]
    fn redirects_round_trip_through_the_maps() {
        let redirects = vec![
            Redirect {
                protocol: Protocol::Tcp,
                port: 8000,
                temp_port: 18000,
            },
            Redirect {
                protocol: Protocol::Udp,
                port: 53,
                temp_port: 10053,
            },
        ];
        let table = host_table(&redirects);
        let mut expected = redirects.clone();
        expected.sort();
        assert_eq!(redirects_in(&table), expected);
        // Rules never change with redirects: only map elements do.
        assert_eq!(table.chains, host_table(&[]).chains);
    }
}
