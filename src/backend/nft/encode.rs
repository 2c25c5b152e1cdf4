//! Encoding a desired table as an `nftables` crate [`Batch`]: the commands of
//! one `nft -j -f` transaction.

use std::borrow::Cow;

use nftables::batch::Batch;
use nftables::expr::Expression;
use nftables::schema::{Chain, Map, NfListObject, Rule, Set, SetType, SetTypeValue, Table};
use nftables::stmt::Statement;
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::NftError;
use crate::model::{NftChain, NftMap, NftRule, NftTable};
use crate::ownership::{NFT_FAMILY, NFT_TABLE};

/// lessnat's table, the only one these batches touch.
fn own_table() -> Table<'static> {
    Table {
        family: NfFamily::INet,
        name: NFT_TABLE.into(),
        handle: None,
    }
}

/// Commands that delete lessnat's table whether or not it exists: adding an
/// existing table is a no-op, so `add` then `delete` never fails for absence.
pub(super) fn delete_table() -> Batch<'static> {
    let mut batch = Batch::new();
    batch.add(NfListObject::Table(own_table()));
    batch.delete(NfListObject::Table(own_table()));
    batch
}

/// Commands that replace lessnat's table with `desired`, atomically.
pub(super) fn replace_table(desired: &NftTable) -> Result<Batch<'static>, NftError> {
    if desired.family != NFT_FAMILY || desired.name != NFT_TABLE {
        return Err(NftError::NotOwned {
            family: desired.family.clone(),
            name: desired.name.clone(),
        });
    }
    let mut batch = delete_table();
    batch.add(NfListObject::Table(own_table()));
    for map in &desired.maps {
        batch.add(encode_map(map)?);
    }
    for chain in &desired.chains {
        batch.add(NfListObject::Chain(encode_chain(chain)?));
    }
    for chain in &desired.chains {
        for (index, rule) in chain.rules.iter().enumerate() {
            batch.add(encode_rule(&chain.name, index, rule)?);
        }
    }
    Ok(batch)
}

/// Commands that delete the rules at `handles` (each with its chain) and
/// append `add` (each to its chain), in lessnat's table.
pub(super) fn replace_rules(
    handles: &[(String, u32)],
    add: &[(String, NftRule)],
) -> Result<Batch<'static>, NftError> {
    let mut batch = Batch::new();
    for (chain, handle) in handles {
        batch.delete(NfListObject::Rule(Rule {
            family: NfFamily::INet,
            table: NFT_TABLE.into(),
            chain: chain.clone().into(),
            handle: Some(*handle),
            ..Rule::default()
        }));
    }
    for (index, (chain, rule)) in add.iter().enumerate() {
        batch.add(encode_rule(chain, index, rule)?);
    }
    Ok(batch)
}

fn encode_rule(
    chain: &str,
    index: usize,
    rule: &NftRule,
) -> Result<NfListObject<'static>, NftError> {
    let expr = rule
        .expr
        .iter()
        .map(|statement| {
            convert::<Statement>(statement, || {
                format!("statement of rule {index} in chain {chain}")
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(NfListObject::Rule(Rule {
        family: NfFamily::INet,
        table: NFT_TABLE.into(),
        chain: chain.to_string().into(),
        expr: expr.into(),
        comment: rule.comment.clone().map(Cow::Owned),
        ..Rule::default()
    }))
}

fn encode_map(map: &NftMap) -> Result<NfListObject<'static>, NftError> {
    let what = || format!("set or map {}", map.name);
    let key = set_type(&map.key, what)?;
    let mut elements = Vec::with_capacity(map.elements.len());
    for element in &map.elements {
        let key = convert::<Expression>(&element.key, what)?;
        elements.push(match map.data {
            Some(_) => Expression::List(vec![key, convert(&element.value, what)?]),
            None => key,
        });
    }
    let elem = (!elements.is_empty()).then(|| Cow::Owned(elements));
    let comment = map.comment.clone().map(Cow::Owned);
    Ok(match &map.data {
        Some(data) => NfListObject::Map(Box::new(Map {
            family: NfFamily::INet,
            table: NFT_TABLE.into(),
            name: map.name.clone().into(),
            set_type: key,
            map: set_type(data, what)?,
            elem,
            comment,
            ..Map::default()
        })),
        None => NfListObject::Set(Box::new(Set {
            family: NfFamily::INet,
            table: NFT_TABLE.into(),
            name: map.name.clone().into(),
            set_type: key,
            elem,
            comment,
            ..Set::default()
        })),
    })
}

fn encode_chain(chain: &NftChain) -> Result<Chain<'static>, NftError> {
    let what = || format!("chain {}", chain.name);
    let mut encoded = Chain {
        family: NfFamily::INet,
        table: NFT_TABLE.into(),
        name: chain.name.clone().into(),
        ..Chain::default()
    };
    if let Some(hook) = &chain.hook {
        encoded._type = Some(convert::<NfChainType>(
            &Value::from(hook.kind.as_str()),
            what,
        )?);
        encoded.hook = Some(convert::<NfHook>(&Value::from(hook.hook.as_str()), what)?);
        encoded.prio = Some(hook.priority);
        encoded.policy = Some(convert::<NfChainPolicy>(
            &Value::from(hook.policy.as_str()),
            what,
        )?);
    }
    Ok(encoded)
}

/// A set's type as written in nft syntax (`inet_service`, or
/// `ipv4_addr . inet_service` for a concatenation).
fn set_type(name: &str, what: impl Fn() -> String) -> Result<SetTypeValue<'static>, NftError> {
    let parts = name
        .split(" . ")
        .map(|part| convert::<SetType>(&Value::from(part), &what))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(match <[SetType; 1]>::try_from(parts) {
        Ok([single]) => SetTypeValue::Single(single),
        Err(parts) => SetTypeValue::Concatenated(parts.into()),
    })
}

/// Reads one of our JSON values as an `nftables` crate type.
fn convert<T: DeserializeOwned>(value: &Value, what: impl Fn() -> String) -> Result<T, NftError> {
    T::deserialize(value).map_err(|source| NftError::Unsupported {
        what: what(),
        value: value.to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::host_table::host_table;
    use crate::model::Redirect;
    use crate::spec::Protocol;
    use serde_json::json;

    fn commands(batch: Batch) -> Value {
        serde_json::to_value(batch.to_nftables()).expect("serialises")
    }

    #[test]
    fn statements_survive_the_crate_types_unchanged() {
        // What we send must be exactly what we built, or desired != observed.
        for chain in host_table(&[]).chains {
            for rule in chain.rules {
                for statement in rule.expr {
                    let typed: Statement = convert(&statement, String::new).expect("known");
                    assert_eq!(serde_json::to_value(typed).expect("serialises"), statement);
                }
            }
        }
    }

    #[test]
    fn replace_is_add_delete_add_then_contents() {
        let table = host_table(&[Redirect {
            protocol: Protocol::Tcp,
            port: 8000,
            temp_port: 18000,
        }]);
        let json = commands(replace_table(&table).expect("encodes"));
        let commands = json["nftables"].as_array().expect("array");
        let verbs: Vec<String> = commands
            .iter()
            .map(|c| {
                let (verb, object) = c.as_object().and_then(|o| o.iter().next()).expect("cmd");
                let (kind, _) = object
                    .as_object()
                    .and_then(|o| o.iter().next())
                    .expect("obj");
                format!("{verb} {kind}")
            })
            .collect();
        assert_eq!(
            verbs,
            [
                "add table",
                "delete table",
                "add table",
                "add map",
                "add map",
                "add chain",
                "add chain",
                "add rule",
                "add rule",
                "add rule",
                "add rule"
            ]
        );
        assert_eq!(
            commands[3],
            json!({"add": {"map": {"family": "inet", "table": "lessnat", "name": "redirect_tcp",
                "type": "inet_service", "map": "inet_service", "elem": [[8000, 18000]]}}})
        );
        assert_eq!(
            commands[5],
            json!({"add": {"chain": {"family": "inet", "table": "lessnat", "name": "prerouting",
                "type": "nat", "hook": "prerouting", "prio": -110, "policy": "accept"}}})
        );
        assert_eq!(
            commands[7]["add"]["rule"]["comment"],
            "lessnat redirect-tcp"
        );
    }

    #[test]
    fn sets_and_concatenations_encode() {
        let mut table = host_table(&[]);
        table.maps = vec![NftMap {
            name: "s".into(),
            key: "ipv4_addr . inet_service".into(),
            data: None,
            comment: Some("c".into()),
            elements: vec![],
        }];
        table.chains.clear();
        let json = commands(replace_table(&table).expect("encodes"));
        assert_eq!(
            json["nftables"][3],
            json!({"add": {"set": {"family": "inet", "table": "lessnat", "name": "s",
                "type": ["ipv4_addr", "inet_service"], "comment": "c"}}})
        );
    }

    #[test]
    fn only_lessnat_table_is_written() {
        let mut table = host_table(&[]);
        table.name = "foreign".into();
        let error = replace_table(&table).expect_err("not ours");
        assert!(error.to_string().contains("inet foreign"), "{error}");
    }

    #[test]
    fn unknown_types_are_named() {
        let mut table = host_table(&[]);
        table.maps[0].data = Some("verdict".into());
        let error = replace_table(&table).expect_err("unsupported");
        let message = error.to_string();
        assert!(
            message.contains("map redirect_tcp") && message.contains("verdict"),
            "{message}"
        );
    }
}
