//! nft-syntax text for a table, as `nft list table` prints it, so `lessnat plan`
//! can show line diffs people can compare with the host. Statements lessnat
//! uses are rendered as nft does; anything else is shown as its compact JSON, so
//! nothing in the table is hidden. Map elements go one per line, for diffs.

use std::fmt::Write;

use serde_json::{Map, Value};

use crate::model::{NftChain, NftMap, NftTable};

/// The table as nft text, ending with a newline.
pub fn render_table(table: &NftTable) -> String {
    let mut blocks: Vec<String> = table.maps.iter().map(render_map).collect();
    blocks.extend(table.chains.iter().map(render_chain));
    let mut out = format!("table {} {} {{\n", table.family, table.name);
    if let Some(comment) = &table.comment {
        out += &format!("\tcomment {}\n", quoted(comment));
    }
    out += &blocks.join("\n");
    out += "}\n";
    out
}

fn render_map(map: &NftMap) -> String {
    let kind = if map.data.is_some() { "map" } else { "set" };
    let mut out = format!("\t{kind} {} {{\n\t\ttype {}", map.name, map.key);
    if let Some(data) = &map.data {
        out += &format!(" : {data}");
    }
    out += "\n";
    if let Some(comment) = &map.comment {
        out += &format!("\t\tcomment {}\n", quoted(comment));
    }
    let elements: Vec<String> = map
        .elements
        .iter()
        .map(|e| match map.data.as_deref() {
            Some("mark") => format!("{} : {}", literal(&e.key), operand(&e.value, Kind::Mark)),
            Some(_) => format!("{} : {}", literal(&e.key), literal(&e.value)),
            None => literal(&e.key),
        })
        .collect();
    if !elements.is_empty() {
        // nft's own layout when elements wrap: continuation lines line up
        // under the first element.
        out += &format!("\t\telements = {{ {} }}\n", elements.join(",\n\t\t\t     "));
    }
    out += "\t}\n";
    out
}

fn render_chain(chain: &NftChain) -> String {
    let mut out = format!("\tchain {} {{\n", chain.name);
    if let Some(hook) = &chain.hook {
        let _ = writeln!(
            out,
            "\t\ttype {} hook {} priority {}; policy {};",
            hook.kind, hook.hook, hook.priority, hook.policy
        );
    }
    for rule in &chain.rules {
        let mut words: Vec<String> = rule.expr.iter().map(statement).collect();
        if let Some(comment) = &rule.comment {
            words.push(format!("comment {}", quoted(comment)));
        }
        let _ = writeln!(out, "\t\t{}", words.join(" "));
    }
    out += "\t}\n";
    out
}

/// One statement; its compact JSON when it is not one we know.
fn statement(stmt: &Value) -> String {
    known_statement(stmt).unwrap_or_else(|| stmt.to_string())
}

fn known_statement(stmt: &Value) -> Option<String> {
    let (name, body) = single(stmt)?;
    match (name, body) {
        ("accept" | "drop" | "return" | "continue", Value::Null) => Some(name.to_string()),
        ("jump" | "goto", Value::Object(target)) => {
            Some(format!("{name} {}", target.get("target")?.as_str()?))
        }
        ("match", Value::Object(m)) => {
            let left = m.get("left")?;
            let op = m.get("op")?.as_str()?;
            let right = operand(m.get("right")?, Kind::of(left));
            let left = expression(left)?;
            Some(match op {
                // nft leaves the implicit operators out.
                "==" | "in" => format!("{left} {right}"),
                _ => format!("{left} {op} {right}"),
            })
        }
        ("counter", Value::Null) => Some("counter".to_string()),
        ("counter", Value::Object(c)) => Some(format!(
            "counter packets {} bytes {}",
            c.get("packets")?.as_u64()?,
            c.get("bytes")?.as_u64()?
        )),
        ("redirect", Value::Null) => Some("redirect".to_string()),
        ("redirect", Value::Object(nat)) if nat.keys().all(|k| k == "port") => Some(format!(
            "redirect to :{}",
            operand(nat.get("port")?, Kind::Plain)
        )),
        ("dnat", Value::Object(nat)) => dnat(nat),
        ("mangle", Value::Object(m)) => {
            let key = m.get("key")?;
            let value = operand(m.get("value")?, Kind::of(key));
            Some(format!("{} set {value}", expression(key)?))
        }
        _ => None,
    }
}

/// `dnat [ip|ip6] to ADDR[:PORT]`, or `dnat to :PORT`.
fn dnat(nat: &Map<String, Value>) -> Option<String> {
    if nat
        .keys()
        .any(|k| !matches!(k.as_str(), "family" | "addr" | "port"))
    {
        return None;
    }
    let mut out = "dnat".to_string();
    if let Some(family) = nat.get("family") {
        out += &format!(" {}", family.as_str()?);
    }
    out += " to ";
    if let Some(addr) = nat.get("addr") {
        let addr = operand(addr, Kind::Plain);
        let ipv6 = addr.contains(':') && !addr.contains(" map ");
        match (ipv6, nat.contains_key("port")) {
            (true, true) => out += &format!("[{addr}]"),
            _ => out += &addr,
        }
    }
    if let Some(port) = nat.get("port") {
        out += &format!(":{}", operand(port, Kind::Plain));
    }
    Some(out)
}

/// A value-producing expression on the left of a match: meta, fib, payload, ct.
fn expression(expr: &Value) -> Option<String> {
    let (name, body) = single(expr)?;
    let body = body.as_object()?;
    let field = |key: &str| body.get(key).and_then(Value::as_str);
    match name {
        "meta" => {
            let key = field("key")?;
            Some(match key {
                // Keys nft prints without the `meta` keyword.
                "iif" | "iifname" | "oif" | "oifname" | "iiftype" | "oiftype" | "iifgroup"
                | "oifgroup" => key.to_string(),
                _ => format!("meta {key}"),
            })
        }
        "fib" => {
            let flags = match body.get("flags")? {
                Value::String(flag) => flag.clone(),
                Value::Array(flags) => flags
                    .iter()
                    .map(|f| f.as_str())
                    .collect::<Option<Vec<_>>>()?
                    .join(" . "),
                _ => return None,
            };
            Some(format!("fib {flags} {}", field("result")?))
        }
        "payload" => Some(format!("{} {}", field("protocol")?, field("field")?)),
        "numgen" => {
            let mut out = format!(
                "numgen {} mod {}",
                field("mode")?,
                body.get("mod")?.as_u64()?
            );
            match body.get("offset").and_then(Value::as_u64) {
                Some(0) | None => {}
                Some(offset) => out += &format!(" offset {offset}"),
            }
            Some(out)
        }
        "ct" => {
            let mut out = "ct".to_string();
            if let Some(dir) = field("dir") {
                out += &format!(" {dir}");
            }
            Some(format!("{out} {}", field("key")?))
        }
        _ => None,
    }
}

/// What a match compares against, where nft prints values specially.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// `meta mark`, `ct mark`: hex.
    Mark,
    /// Interface names: quoted.
    Name,
    /// Anything else.
    Plain,
}

impl Kind {
    fn of(left: &Value) -> Kind {
        let key = ["meta", "ct"]
            .iter()
            .find_map(|kind| left.get(kind)?.get("key")?.as_str());
        match key {
            Some("mark") => Kind::Mark,
            Some("iifname" | "oifname") => Kind::Name,
            _ => Kind::Plain,
        }
    }
}

/// A value on the right of a match or in a statement argument.
fn operand(value: &Value, kind: Kind) -> String {
    match value {
        Value::Number(n) if kind == Kind::Mark => match n.as_u64() {
            Some(n) => format!("0x{n:08x}"),
            None => n.to_string(),
        },
        Value::String(name) if kind == Kind::Name => quoted(name),
        Value::Array(flags) => flags
            .iter()
            .map(|f| operand(f, kind))
            .collect::<Vec<_>>()
            .join(","),
        other => literal(other),
    }
}

/// An immediate, set, range, prefix, concatenation or map lookup; compact JSON
/// for anything else.
fn literal(value: &Value) -> String {
    known_value(value).unwrap_or_else(|| value.to_string())
}

fn known_value(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => return Some(s.clone()),
        Value::Number(n) => return Some(n.to_string()),
        Value::Bool(b) => return Some(b.to_string()),
        _ => {}
    }
    let (name, body) = single(v)?;
    match (name, body) {
        ("set", Value::Array(items)) => Some(format!(
            "{{ {} }}",
            items
                .iter()
                .map(|item| match item.as_array().map(Vec::as_slice) {
                    Some([key, data]) => format!("{} : {}", literal(key), literal(data)),
                    _ => literal(item),
                })
                .collect::<Vec<_>>()
                .join(", ")
        )),
        ("range", Value::Array(bounds)) if bounds.len() == 2 => {
            Some(format!("{}-{}", literal(&bounds[0]), literal(&bounds[1])))
        }
        ("prefix", Value::Object(p)) => Some(format!(
            "{}/{}",
            literal(p.get("addr")?),
            p.get("len")?.as_u64()?
        )),
        ("concat", Value::Array(parts)) => Some(
            parts
                .iter()
                .map(|p| expression(p).unwrap_or_else(|| literal(p)))
                .collect::<Vec<_>>()
                .join(" . "),
        ),
        ("map", Value::Object(m)) => {
            let key = m.get("key")?;
            let key = expression(key).unwrap_or_else(|| literal(key));
            Some(format!("{key} map {}", literal(m.get("data")?)))
        }
        _ => None,
    }
}

/// The only key of a one-key JSON object, and its value.
fn single(value: &Value) -> Option<(&str, &Value)> {
    let object = value.as_object()?;
    let mut entries = object.iter();
    let (name, body) = entries.next()?;
    entries.next().is_none().then_some((name.as_str(), body))
}

/// A string in double quotes, as nft writes comments.
fn quoted(text: &str) -> String {
    format!("\"{text}\"")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::host_table::host_table;
    use crate::model::Redirect;
    use crate::model::{NftElement, NftHook, NftRule};
    use crate::spec::Protocol;
    use serde_json::json;

    #[test]
    fn routed_rules_render_like_nft_list_table() {
        use crate::desired::routed_table::{
            Dnat, LoadBalancerRules, WorkerRules, add_load_balancer, add_worker,
        };
        use std::net::IpAddr;
        let ip = |text: &str| -> IpAddr { text.parse().expect("address") };
        let mut table = crate::desired::host_table::empty_table();
        add_load_balancer(
            &mut table,
            &LoadBalancerRules {
                id: 1,
                dnat: vec![
                    Dnat {
                        comment: "api/http".into(),
                        protocol: Protocol::Tcp,
                        vip: ip("203.0.113.10"),
                        vip_port: 80,
                        targets: vec![ip("10.20.1.5"), ip("10.20.2.5")],
                        port: 8080,
                    },
                    Dnat {
                        comment: "api/http/ipv6".into(),
                        protocol: Protocol::Tcp,
                        vip: ip("2001:db8:f::10"),
                        vip_port: 80,
                        targets: vec![ip("fd00:20:1::5")],
                        port: 8080,
                    },
                ],
                subnets: vec![
                    "10.20.1.0/24".parse().expect("subnet"),
                    "fd00:20:1::/64".parse().expect("subnet"),
                ],
                versions: vec![(ip("10.20.1.5"), 7), (ip("fd00:20:1::5"), 7)],
                down: Vec::new(),
            },
        );
        add_worker(
            &mut table,
            &WorkerRules {
                subnets: vec![
                    "10.20.1.0/24".parse().expect("subnet"),
                    "fd00:20:1::/64".parse().expect("subnet"),
                ],
                lb_ids: vec![1],
            },
        );
        let text = render_table(&table);
        // The lines as `nft list table` prints them (priorities in numbers).
        for line in [
            "ip daddr 203.0.113.10 tcp dport 80 dnat ip to numgen inc mod 2 map { 0 : 10.20.1.5, 1 : 10.20.2.5 }:8080 comment \"api/http\"",
            "ip6 daddr 2001:db8:f::10 tcp dport 80 dnat ip6 to [fd00:20:1::5]:8080 comment \"api/http/ipv6\"",
            "ct status dnat ip daddr 10.20.1.0/24 ip dscp set lephb",
            "ct status dnat ip6 daddr fd00:20:1::/64 ip6 dscp set lephb",
            "ip daddr 10.20.1.0/24 ct state new ip dscp lephb ct mark set 0x6c6e0001",
            "ip6 daddr fd00:20:1::/64 ct state new ip6 dscp lephb ct mark set 0x6c6e0001",
            "ct mark 0x6c6e0001 meta mark set 0x6c6e0001",
            "type ipv6_addr : mark",
        ] {
            assert!(
                text.contains(&format!("\t\t{line}\n")),
                "{line}\nnot in\n{text}"
            );
        }
    }

    #[test]
    fn host_table_renders_like_nft_list_table() {
        let table = host_table(&[
            Redirect {
                protocol: Protocol::Tcp,
                port: 8000,
                temp_port: 18000,
            },
            Redirect {
                protocol: Protocol::Tcp,
                port: 80,
                temp_port: 1080,
            },
        ]);
        assert_eq!(
            render_table(&table),
            "table inet lessnat {
\tmap redirect_tcp {
\t\ttype inet_service : inet_service
\t\telements = { 80 : 1080,
\t\t\t     8000 : 18000 }
\t}

\tmap redirect_udp {
\t\ttype inet_service : inet_service
\t}

\tchain prerouting {
\t\ttype nat hook prerouting priority -110; policy accept;
\t\tmeta l4proto tcp fib daddr type local meta mark != 0x00006c6e redirect to :tcp dport map @redirect_tcp comment \"lessnat redirect-tcp\"
\t\tmeta l4proto udp fib daddr type local meta mark != 0x00006c6e redirect to :udp dport map @redirect_udp comment \"lessnat redirect-udp\"
\t}

\tchain output {
\t\ttype nat hook output priority -110; policy accept;
\t\tmeta l4proto tcp fib daddr type local meta mark != 0x00006c6e redirect to :tcp dport map @redirect_tcp comment \"lessnat redirect-tcp\"
\t\tmeta l4proto udp fib daddr type local meta mark != 0x00006c6e redirect to :udp dport map @redirect_udp comment \"lessnat redirect-udp\"
\t}
}
"
        );
    }

    fn rule(expr: Vec<Value>) -> NftRule {
        NftRule {
            comment: None,
            expr,
        }
    }

    #[test]
    fn other_statements_render_as_nft_does() {
        let table = NftTable {
            family: "inet".into(),
            name: "t".into(),
            comment: Some("owned".into()),
            maps: vec![NftMap {
                name: "s".into(),
                key: "ipv4_addr".into(),
                data: None,
                comment: Some("a set".into()),
                elements: vec![NftElement {
                    key: json!("10.0.0.1"),
                    value: Value::Null,
                }],
            }],
            chains: vec![
                NftChain {
                    name: "c".into(),
                    hook: None,
                    rules: vec![
                        rule(vec![
                            json!({"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "lo"}}),
                            json!({"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}}),
                            json!({"counter": {"packets": 3, "bytes": 120}}),
                            json!({"accept": null}),
                        ]),
                        rule(vec![
                            json!({"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": {"prefix": {"addr": "10.0.0.0", "len": 8}}}}),
                            json!({"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": {"set": [22, {"range": [80, 90]}]}}}),
                            json!({"counter": null}),
                            json!({"drop": null}),
                        ]),
                        rule(vec![json!({"jump": {"target": "d"}})]),
                    ],
                },
                NftChain {
                    name: "n".into(),
                    hook: Some(NftHook {
                        kind: "nat".into(),
                        hook: "output".into(),
                        priority: -100,
                        policy: "accept".into(),
                    }),
                    rules: vec![
                        rule(vec![
                            json!({"match": {"op": "==", "left": {"ct": {"key": "mark"}}, "right": 16}}),
                            json!({"match": {"op": "==", "left": {"ct": {"key": "ip saddr", "dir": "original"}}, "right": "1.2.3.4"}}),
                            json!({"dnat": {"family": "ip", "addr": "10.0.0.1", "port": 80}}),
                        ]),
                        rule(vec![
                            json!({"dnat": {"family": "ip6", "addr": "::1", "port": 80}}),
                        ]),
                        rule(vec![json!({"dnat": {"family": "ip", "addr": "10.0.0.1"}})]),
                        rule(vec![
                            json!({"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 80}}),
                            json!({"redirect": {"port": 8080}}),
                        ]),
                        rule(vec![json!({"redirect": null})]),
                    ],
                },
            ],
        };
        assert_eq!(
            render_table(&table),
            "table inet t {
\tcomment \"owned\"
\tset s {
\t\ttype ipv4_addr
\t\tcomment \"a set\"
\t\telements = { 10.0.0.1 }
\t}

\tchain c {
\t\tiifname \"lo\" ct state established,related counter packets 3 bytes 120 accept
\t\tip saddr 10.0.0.0/8 tcp dport { 22, 80-90 } counter drop
\t\tjump d
\t}

\tchain n {
\t\ttype nat hook output priority -100; policy accept;
\t\tct mark 0x00000010 ct original ip saddr 1.2.3.4 dnat ip to 10.0.0.1:80
\t\tdnat ip6 to [::1]:80
\t\tdnat ip to 10.0.0.1
\t\ttcp dport 80 redirect to :8080
\t\tredirect
\t}
}
"
        );
    }

    #[test]
    fn unknown_expressions_show_their_json() {
        let numgen =
            json!({"match": {"op": "==", "left": {"jhash": {"mod": 2, "seed": 1}}, "right": 0}});
        let mangle = json!({"queue": {"num": 1}});
        let table = NftTable {
            family: "inet".into(),
            name: "t".into(),
            comment: None,
            maps: vec![],
            chains: vec![NftChain {
                name: "c".into(),
                hook: None,
                rules: vec![NftRule {
                    comment: Some("odd".into()),
                    expr: vec![
                        numgen.clone(),
                        mangle.clone(),
                        json!({"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": {"elem": {"val": "tcp"}}}}),
                    ],
                }],
            }],
        };
        // serde_json orders object keys one way or another depending on its
        // features; the rendering is its compact form, whatever that order.
        assert_eq!(
            render_table(&table),
            format!(
                "table inet t {{\n\tchain c {{\n\t\t{numgen} {mangle} meta l4proto {{\"elem\":{{\"val\":\"tcp\"}}}} comment \"odd\"\n\t}}\n}}\n"
            )
        );
        assert!(render_table(&table).contains(r#"{"queue":{"num":1}}"#));
    }

    #[test]
    fn an_empty_table_is_two_lines() {
        let table = NftTable {
            family: "inet".into(),
            name: "lessnat".into(),
            comment: None,
            maps: vec![],
            chains: vec![],
        };
        assert_eq!(render_table(&table), "table inet lessnat {\n}\n");
    }
}
