//! `lessnat show`: what lessnat owns on a host, for a person.

use std::fmt::Write as _;

use crate::model::Observed;
use crate::style::Style;

/// Renders the observed state as a short report.
pub fn render(observed: &Observed, style: Style) -> String {
    let mut out = String::new();
    let title = |out: &mut String, text: &str| {
        let _ = writeln!(out, "{}", style.paint("1", text));
    };
    if !observed.node.is_empty() {
        let _ = writeln!(out, "Node \"{}\"\n", observed.node);
    }
    title(&mut out, "Containers:");
    if observed.containers.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for c in &observed.containers {
        let id: String = c.id.chars().take(12).collect();
        let health = c
            .health
            .as_deref()
            .map(|h| format!(", {h}"))
            .unwrap_or_default();
        let address = c
            .address
            .as_deref()
            .map(|a| format!("  at {a}"))
            .unwrap_or_default();
        let digest = c
            .digest
            .as_deref()
            .map(|d| format!("  digest {d}"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  {:<28} {:<7} {}{health}  {}  spec {}  id {id}{address}{digest}",
            c.name,
            c.slot.as_str(),
            c.state,
            c.image,
            c.spec_hash
        );
    }
    for f in &observed.foreign_containers {
        let _ = writeln!(out, "  {:<28} not lessnat's (no label); left alone", f.name);
    }
    out.push('\n');
    title(&mut out, "nftables:");
    if observed.nft.tables.is_empty() {
        let _ = writeln!(out, "  (no lessnat table)");
    }
    for table in &observed.nft.tables {
        let redirects: Vec<String> = table
            .maps
            .iter()
            .flat_map(|m| {
                m.elements
                    .iter()
                    .map(move |e| format!("{} {} -> {}", m.name, e.key, e.value))
            })
            .collect();
        let _ = writeln!(
            out,
            "  table {} {}: {} chains, {} rules, redirects: {}",
            table.family,
            table.name,
            table.chains.len(),
            table.chains.iter().map(|c| c.rules.len()).sum::<usize>(),
            if redirects.is_empty() {
                "none".to_string()
            } else {
                redirects.join(", ")
            }
        );
    }
    out.push('\n');
    title(&mut out, "Routing (lessnat's priorities and tables):");
    if observed.routing.rules.is_empty() && observed.routing.routes.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for rule in &observed.routing.rules {
        let mark = rule
            .fwmark
            .map(|m| format!(" fwmark {m:#x}"))
            .unwrap_or_default();
        let from = rule
            .source
            .as_deref()
            .map(|s| format!(" from {s}"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  rule {} priority {}{from}{mark} lookup {}",
            rule.family, rule.priority, rule.table
        );
    }
    for route in &observed.routing.routes {
        let via = route
            .gateway
            .as_deref()
            .map(|g| format!(" via {g}"))
            .unwrap_or_default();
        let dev = route
            .device
            .as_deref()
            .map(|d| format!(" dev {d}"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  route {}{via}{dev} table {}",
            route.destination, route.table
        );
    }
    // The kernel settings are read on every node; they matter where routed
    // mode is set up.
    let routed = !(observed.veths.is_empty()
        && observed.addresses.is_empty()
        && observed.routing.rules.is_empty());
    if routed {
        out.push('\n');
        title(&mut out, "Routed wiring:");
        for veth in &observed.veths {
            let state = if veth.up { "up" } else { "down" };
            let _ = writeln!(
                out,
                "  veth {} -> {} at {} ({state})",
                veth.name, veth.service, veth.address
            );
        }
        for address in &observed.addresses {
            let _ = writeln!(out, "  address {} on {}", address.address, address.device);
        }
        for (key, value) in &observed.sysctls {
            let _ = writeln!(out, "  {key} = {value}");
        }
    }
    if !observed.probes.is_empty() {
        out.push('\n');
        title(&mut out, "Replica probes (from this load-balancer node):");
        for probe in &observed.probes {
            let outcome = match &probe.detail {
                _ if probe.healthy => "answers".to_string(),
                Some(detail) => format!("does not answer: {detail}"),
                None => "does not answer".to_string(),
            };
            let _ = writeln!(out, "  {} at {}: {outcome}", probe.service, probe.address);
        }
    }
    out.push('\n');
    title(&mut out, "Conntrack:");
    if observed.conntrack.available {
        let _ = writeln!(
            out,
            "  {} of {} entries in use",
            observed.conntrack.table_count, observed.conntrack.table_max
        );
    } else {
        let _ = writeln!(out, "  not available");
    }
    for warning in &observed.warnings {
        let _ = writeln!(out, "  {} {warning}", style.paint("33", "!"));
    }
    out
}
