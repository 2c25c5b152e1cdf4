//! The plan as text for people: Terraform's symbols (`+ ~ - -/+`), `>>` for
//! staged upgrades, field changes as `old -> new`, nft rule sets as line
//! diffs, and a summary line.

use std::fmt::Write as _;

use super::{Action, Change, Plan, Resource};
use crate::style::Style;

fn color(action: Action) -> &'static str {
    match action {
        Action::Create => "32",
        Action::Update => "33",
        Action::Replace => "35",
        Action::Destroy => "31",
        Action::Upgrade => "36",
    }
}

fn verb(change: &Change) -> &'static str {
    if let Resource::Image { .. } = change.resource {
        return "will be pulled";
    }
    match change.action {
        Action::Create => "will be created",
        Action::Update => "will be updated in place",
        Action::Replace => "will be replaced",
        Action::Destroy => "will be destroyed",
        Action::Upgrade => "will be upgraded in stages",
    }
}

/// Renders the whole plan.
pub fn render(plan: &Plan, style: Style) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "lessnat plan for node \"{}\"\n", plan.node);
    let bang = style.paint("33", "!");
    if !plan.drift.is_empty() {
        let _ = writeln!(out, "{}", style.paint("1", "Changed outside lessnat:"));
        for drift in &plan.drift {
            let _ = writeln!(out, "  {bang} {}: {}", drift.resource.address(), drift.what);
        }
        out.push('\n');
    }
    if !plan.conflicts.is_empty() {
        let _ = writeln!(
            out,
            "{}",
            style.paint("1", "Conflicts (apply refuses until they are resolved):")
        );
        for conflict in &plan.conflicts {
            let _ = writeln!(out, "  {} {conflict}", style.paint("31", "!"));
        }
        out.push('\n');
    }
    if !plan.warnings.is_empty() {
        let _ = writeln!(out, "{}", style.paint("1", "Warnings:"));
        for warning in &plan.warnings {
            let _ = writeln!(out, "  {bang} {warning}");
        }
        out.push('\n');
    }
    if !plan.load_balancing.is_empty() {
        let _ = writeln!(out, "{}", style.paint("1", "Load balancing:"));
        for line in &plan.load_balancing {
            let _ = writeln!(out, "  - {line}");
        }
        out.push('\n');
    }
    if !plan.rollouts.is_empty() {
        let _ = writeln!(out, "{}", style.paint("1", "Rollouts:"));
        for line in &plan.rollouts {
            let _ = writeln!(out, "  - {line}");
        }
        out.push('\n');
    }
    if plan.changes.is_empty() {
        let _ = writeln!(out, "No changes. Node \"{}\" matches the spec.", plan.node);
        return out;
    }
    let _ = writeln!(out, "lessnat will perform these actions:\n");
    for change in &plan.changes {
        render_change(&mut out, change, style);
    }
    let s = plan.summary();
    let _ = writeln!(
        out,
        "{} {} to add, {} to change, {} to destroy, {} to upgrade.",
        style.paint("1", "Plan:"),
        s.add,
        s.change,
        s.destroy,
        s.upgrade
    );
    out
}

fn render_change(out: &mut String, change: &Change, style: Style) {
    let address = change.resource.address();
    let _ = writeln!(out, "  # {address} {}: {}", verb(change), change.reason);
    let symbol = style.paint(color(change.action), change.action.symbol());
    let strategy = change
        .upgrade
        .as_ref()
        .map(|u| format!(" ({})", serde_plain(&u.strategy)))
        .unwrap_or_default();
    let _ = writeln!(out, "  {symbol} {}{strategy}", style.paint("1", &address));
    let width = change
        .fields
        .iter()
        .map(|f| f.name.len())
        .max()
        .unwrap_or(0);
    for field in &change.fields {
        let (mark, text) = match (&field.old, &field.new) {
            (None, Some(new)) => ("+", format!("{new}")),
            (Some(old), None) => ("-", format!("{old}")),
            (Some(old), Some(new)) if old == new => (" ", format!("{new}")),
            (Some(old), Some(new)) => ("~", format!("{old} -> {new}")),
            (None, None) => continue,
        };
        let mark = match mark {
            "+" => style.paint("32", mark),
            "-" => style.paint("31", mark),
            "~" => style.paint("33", mark),
            _ => mark.to_string(),
        };
        let _ = writeln!(out, "      {mark} {:width$} = {text}", field.name);
    }
    for line in &change.diff {
        let text = format!("{} {}", line.tag, line.text.replace('\t', "    "));
        let text = text.trim_end();
        let painted = match line.tag {
            '+' => style.paint("32", text),
            '-' => style.paint("31", text),
            _ => text.to_string(),
        };
        if painted.is_empty() {
            out.push('\n');
        } else {
            let _ = writeln!(out, "      {painted}");
        }
    }
    if let Some(upgrade) = &change.upgrade {
        if let Some(in_flight) = &upgrade.in_flight {
            let decision = in_flight.decision.verb();
            let _ = writeln!(
                out,
                "      in flight: stage {} done; {decision}: {}",
                in_flight.reached.as_str(),
                in_flight.why
            );
        }
        let width = upgrade
            .stages
            .iter()
            .map(|s| s.name.as_str().len())
            .max()
            .unwrap_or(0);
        // Wait lines start under the action: "done N. name  action".
        let indent = " ".repeat(6 + 4 + 1 + 3 + width + 2);
        for (index, stage) in upgrade.stages.iter().enumerate() {
            let status = if stage.done {
                style.paint("2", "done")
            } else {
                "    ".to_string()
            };
            let _ = writeln!(
                out,
                "      {status} {}. {:width$}  {}",
                index + 1,
                stage.name.as_str(),
                stage.action
            );
            let wait = match (&stage.wait, &stage.timeout) {
                (Some(wait), Some(timeout)) => Some(format!("wait: {wait} (timeout {timeout})")),
                (Some(wait), None) => Some(format!("wait: {wait}")),
                (None, Some(timeout)) => Some(format!("timeout {timeout}")),
                (None, None) => None,
            };
            if let Some(wait) = wait {
                let _ = writeln!(out, "{indent}{wait}");
            }
        }
    }
    out.push('\n');
}

/// The serde name of a unit enum value (`redirect-drain`).
fn serde_plain<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}
