//! Decoding `nft -j list ...` output into the observed-state types.
//!
//! We decode the JSON ourselves rather than through `nftables::schema`. Its
//! statement and expression types are an incomplete model of nft's: one
//! statement it does not know (a rule added by hand with, say, an `xt` match)
//! fails the whole listing. And the statements it does know would reach us
//! re-serialised through its types (flags are `HashSet`s, so their order is
//! lost) instead of exactly as nft reported them. Observation must show
//! lessnat's table as it is, hand edits included, so rule statements stay plain
//! JSON values and only the few object fields we model are typed here.

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::chain;
use crate::model::compare_keys;
use crate::model::{NftChain, NftElement, NftHook, NftMap, NftRule, NftTable};

/// The top-level document `nft -j` prints.
#[derive(Deserialize)]
struct Listing {
    nftables: Vec<serde_json::Map<String, Value>>,
}

/// A chain as `nft -j list table` reports it.
#[derive(Deserialize)]
struct ListedChain {
    name: String,
    #[serde(rename = "type")]
    kind: Option<String>,
    hook: Option<String>,
    prio: Option<i32>,
    policy: Option<String>,
}

/// A rule as `nft -j list table` reports it.
#[derive(Deserialize)]
struct ListedRule {
    chain: String,
    comment: Option<String>,
    #[serde(default)]
    expr: Vec<Value>,
}

/// A rule's handle, as `nft -j list table` reports every rule.
#[derive(Deserialize)]
struct HandledRule {
    chain: String,
    handle: u32,
    comment: Option<String>,
}

/// The chain and handle of each rule whose comment is one of `comments`, from
/// `nft -j list table` output.
pub(super) fn rule_handles(json: &str, comments: &[String]) -> Result<Vec<(String, u32)>, String> {
    let listing = parse(json)?;
    Ok(objects::<HandledRule>(&listing, &["rule"])?
        .into_iter()
        .filter(|r| r.comment.as_ref().is_some_and(|c| comments.contains(c)))
        .map(|r| (r.chain, r.handle))
        .collect())
}

/// A set or map as `nft -j list table` reports it.
#[derive(Deserialize)]
struct ListedSet {
    name: String,
    #[serde(rename = "type")]
    key: Value,
    map: Option<Value>,
    comment: Option<String>,
    #[serde(default)]
    elem: Vec<Value>,
}

/// The objects of the given kinds in a listing, in the order nft printed them.
fn objects<T: DeserializeOwned>(listing: &Listing, kinds: &[&str]) -> Result<Vec<T>, String> {
    listing
        .nftables
        .iter()
        .flat_map(|object| {
            kinds
                .iter()
                .filter_map(|&kind| Some((kind, object.get(kind)?)))
        })
        .map(|(kind, value)| {
            T::deserialize(value).map_err(|e| format!("a {kind} object: {}", chain(&e)))
        })
        .collect()
}

fn parse(json: &str) -> Result<Listing, String> {
    serde_json::from_str(json).map_err(|e| chain(&e))
}

/// A rule's place, as `nft -j list ruleset` reports every rule.
#[derive(Deserialize)]
struct PlacedRule {
    family: String,
    table: String,
    chain: String,
    #[serde(default)]
    expr: Vec<Value>,
}

/// What one `nft -j list ruleset` shows: the table `family name` (`None`
/// when absent) and, for every rule anywhere with a `notrack` statement, its
/// `family table chain`, without repeats.
pub(super) fn ruleset(
    family: &str,
    name: &str,
    json: &str,
) -> Result<(Option<NftTable>, Vec<String>), String> {
    let listing = parse(json)?;
    let notrack = notrack_chains(&listing)?;
    let own = Listing {
        nftables: listing
            .nftables
            .into_iter()
            .filter(|object| in_table(object, family, name))
            .collect(),
    };
    let present = own
        .nftables
        .iter()
        .any(|object| object.contains_key("table"));
    let table = present.then(|| table_in(family, name, &own)).transpose()?;
    Ok((table, notrack))
}

/// Whether a listed object is the table `family name` or part of it.
fn in_table(object: &serde_json::Map<String, Value>, family: &str, name: &str) -> bool {
    object.iter().any(|(kind, value)| {
        let field = if kind == "table" { "name" } else { "table" };
        value.get("family").and_then(Value::as_str) == Some(family)
            && value.get(field).and_then(Value::as_str) == Some(name)
    })
}

fn notrack_chains(listing: &Listing) -> Result<Vec<String>, String> {
    let mut found: Vec<String> = objects::<PlacedRule>(listing, &["rule"])?
        .into_iter()
        .filter(|rule| {
            rule.expr
                .iter()
                .any(|statement| statement.get("notrack").is_some())
        })
        .map(|rule| format!("{} {} {}", rule.family, rule.table, rule.chain))
        .collect();
    found.dedup();
    Ok(found)
}

/// The table `family name` from `nft -j list table family name` output.
pub(super) fn table(family: &str, name: &str, json: &str) -> Result<NftTable, String> {
    table_in(family, name, &parse(json)?)
}

/// The table `family name` from a listing of its objects only.
fn table_in(family: &str, name: &str, listing: &Listing) -> Result<NftTable, String> {
    let rules = objects::<ListedRule>(listing, &["rule"])?;
    let chains = objects::<ListedChain>(listing, &["chain"])?
        .into_iter()
        .map(|chain| decode_chain(chain, &rules))
        .collect();
    let maps = objects::<ListedSet>(listing, &["set", "map"])?
        .into_iter()
        .map(decode_set)
        .collect();
    Ok(NftTable {
        family: family.to_string(),
        name: name.to_string(),
        // nft 1.0.6 does not report a table's comment in JSON.
        comment: None,
        chains,
        maps,
    })
}

/// A chain with its rules, picked from all of the table's rules (nft lists
/// every chain first, then every rule).
fn decode_chain(chain: ListedChain, rules: &[ListedRule]) -> NftChain {
    let hook = match (chain.kind, chain.hook) {
        (Some(kind), Some(hook)) => Some(NftHook {
            kind,
            hook,
            priority: chain.prio.unwrap_or(0),
            policy: chain.policy.unwrap_or_else(|| "accept".to_string()),
        }),
        _ => None,
    };
    NftChain {
        hook,
        rules: rules
            .iter()
            .filter(|r| r.chain == chain.name)
            .map(|r| NftRule {
                comment: r.comment.clone(),
                expr: r.expr.clone(),
            })
            .collect(),
        name: chain.name,
    }
}

fn decode_set(set: ListedSet) -> NftMap {
    let is_map = set.map.is_some();
    let mut elements: Vec<NftElement> = set
        .elem
        .into_iter()
        .map(|elem| match elem {
            // A map element is `[key, value]`.
            Value::Array(pair) if is_map && pair.len() == 2 => {
                let mut pair = pair.into_iter();
                NftElement {
                    key: pair.next().unwrap_or_default(),
                    value: pair.next().unwrap_or_default(),
                }
            }
            key => NftElement {
                key,
                value: Value::Null,
            },
        })
        .collect();
    elements.sort_by(|a, b| compare_keys(&a.key, &b.key));
    NftMap {
        name: set.name,
        key: type_name(&set.key),
        data: set.map.as_ref().map(type_name),
        comment: set.comment,
        elements,
    }
}

/// A set's type as nft writes it: `inet_service`, or `ipv4_addr . inet_service`
/// for a concatenation (which JSON reports as an array).
fn type_name(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts.iter().map(type_name).collect::<Vec<_>>().join(" . "),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_ruleset_listing_gives_the_table_and_the_notrack_chains() {
        let json = json!({"nftables": [
            {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
            {"table": {"family": "ip", "name": "lessnat", "handle": 1}},
            {"chain": {"family": "ip", "table": "lessnat", "name": "pre", "handle": 2}},
            {"rule": {"family": "ip", "table": "lessnat", "chain": "pre", "handle": 3, "expr": [{"notrack": null}]}},
            {"table": {"family": "inet", "name": "lessnat", "handle": 4}},
            {"chain": {"family": "inet", "table": "lessnat", "name": "out", "handle": 5}},
            {"rule": {"family": "inet", "table": "lessnat", "chain": "out", "handle": 6, "expr": [{"accept": null}]}},
            {"table": {"family": "inet", "name": "other", "handle": 7}},
            {"chain": {"family": "inet", "table": "other", "name": "out", "handle": 8}},
            {"rule": {"family": "inet", "table": "other", "chain": "out", "handle": 9, "expr": [{"drop": null}]}}
        ]})
        .to_string();
        let (table, notrack) = ruleset("inet", "lessnat", &json).expect("decodes");
        let table = table.expect("the table is there");
        assert_eq!(table.chains.len(), 1);
        assert_eq!(
            table.chains[0].rules,
            [NftRule {
                comment: None,
                expr: vec![json!({"accept": null})],
            }],
            "only the rules of inet lessnat"
        );
        assert_eq!(notrack, ["ip lessnat pre"]);
        let (absent, _) = ruleset("inet", "missing", &json).expect("decodes");
        assert_eq!(absent, None);
    }

    #[test]
    fn chains_rules_and_maps_decode_as_nft_reports_them() {
        // Shaped like nft 1.0.6 output: chains first, then rules, elements unsorted.
        let json = json!({"nftables": [
            {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
            {"table": {"family": "inet", "name": "lessnat", "handle": 1}},
            {"set": {"family": "inet", "name": "s", "table": "lessnat", "type": ["ipv4_addr", "inet_service"], "handle": 2,
                     "elem": [{"concat": ["10.0.0.1", 80]}]}},
            {"map": {"family": "inet", "name": "m", "table": "lessnat", "type": "inet_service", "handle": 3,
                     "map": "inet_service", "comment": "c", "elem": [[8000, 18000], [80, 1080]]}},
            {"chain": {"family": "inet", "table": "lessnat", "name": "out", "handle": 4,
                       "type": "nat", "hook": "output", "prio": -110, "policy": "accept"}},
            {"chain": {"family": "inet", "table": "lessnat", "name": "helper", "handle": 5}},
            {"rule": {"family": "inet", "table": "lessnat", "chain": "helper", "handle": 6, "expr": [{"accept": null}]}},
            {"rule": {"family": "inet", "table": "lessnat", "chain": "out", "handle": 7, "comment": "x",
                      "expr": [{"counter": {"packets": 0, "bytes": 0}}]}},
            {"rule": {"family": "inet", "table": "lessnat", "chain": "out", "handle": 8}}
        ]});
        let table = table("inet", "lessnat", &json.to_string()).expect("decodes");
        assert_eq!(
            table,
            NftTable {
                family: "inet".into(),
                name: "lessnat".into(),
                comment: None,
                chains: vec![
                    NftChain {
                        name: "out".into(),
                        hook: Some(NftHook {
                            kind: "nat".into(),
                            hook: "output".into(),
                            priority: -110,
                            policy: "accept".into(),
                        }),
                        rules: vec![
                            NftRule {
                                comment: Some("x".into()),
                                expr: vec![json!({"counter": {"packets": 0, "bytes": 0}})],
                            },
                            NftRule {
                                comment: None,
                                expr: vec![],
                            },
                        ],
                    },
                    NftChain {
                        name: "helper".into(),
                        hook: None,
                        rules: vec![NftRule {
                            comment: None,
                            expr: vec![json!({"accept": null})],
                        }],
                    },
                ],
                maps: vec![
                    NftMap {
                        name: "s".into(),
                        key: "ipv4_addr . inet_service".into(),
                        data: None,
                        comment: None,
                        elements: vec![NftElement {
                            key: json!({"concat": ["10.0.0.1", 80]}),
                            value: Value::Null,
                        }],
                    },
                    NftMap {
                        name: "m".into(),
                        key: "inet_service".into(),
                        data: Some("inet_service".into()),
                        comment: Some("c".into()),
                        elements: vec![
                            NftElement {
                                key: json!(80),
                                value: json!(1080),
                            },
                            NftElement {
                                key: json!(8000),
                                value: json!(18000),
                            },
                        ],
                    },
                ],
            }
        );
    }

    #[test]
    fn malformed_output_is_an_error() {
        assert!(ruleset("inet", "lessnat", "not json").is_err());
        let bad_chain = r#"{"nftables": [{"chain": {"prio": "high"}}]}"#;
        let error = table("inet", "lessnat", bad_chain).expect_err("bad chain");
        assert!(error.contains("a chain object"), "{error}");
    }
}
