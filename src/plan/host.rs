//! Planning one host-mode service: create, restart, replace, a new staged
//! upgrade, or the rest of one found in flight.

use super::operation::{CanarySplit, Operation, UpgradeFrom, Workload};
use super::{
    Action, Change, Decision, DiffLine, Drift, FieldChange, FieldValue, InFlight, Resource, Slots,
    Stage, StageName, Upgrade,
};
use crate::desired::DesiredContainer;
use crate::desired::host_table::{
    add_canary, add_redirects, canary_comments, canary_rules, remove_canary, service_redirects,
};
use crate::model::Redirect;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::model::{Container, NftTable, Observed};
use crate::ownership::{Slot, container_name};
use crate::spec::{HumanDuration, OnDrainTimeout, Protocol, Service, Strategy};

/// Redirects found in the table, by protocol and canonical port (the map key,
/// so there is at most one per pair).
pub(super) type RedirectIndex = HashMap<(Protocol, u16), Redirect>;

/// Indexes the redirects found in a table.
pub(super) fn index_redirects(redirects: Vec<Redirect>) -> RedirectIndex {
    redirects
        .into_iter()
        .map(|r| ((r.protocol, r.port), r))
        .collect()
}

/// The redirects in the table that are `service`'s: its ports, to its temp ports.
pub(super) fn redirects_of(service: &Service, index: &RedirectIndex) -> Vec<Redirect> {
    service
        .ports
        .iter()
        .filter_map(|p| {
            let found = index.get(&(p.protocol, p.port.value))?;
            (Some(found.temp_port) == p.temp_port.as_ref().map(|t| t.value)).then_some(*found)
        })
        .collect()
}

/// lessnat's table as one host-mode service's plan sees it: the service's
/// redirects found in it, and the table the plan wants.
pub(super) struct ServiceTable<'a> {
    /// The service's redirects found in the observed table.
    pub found: &'a [Redirect],
    /// The table the plan wants (lessnat's host table when the node needs
    /// none), shared by the upgrades whose redirect it already holds.
    pub shared: &'a Arc<NftTable>,
    /// The redirects in `shared`.
    pub shared_redirects: &'a HashSet<Redirect>,
    /// Whether the service's canary rules are in the observed table (a
    /// canary was holding).
    pub split: bool,
}

impl ServiceTable<'_> {
    /// The planned table plus `service`'s redirect elements: what an upgrade
    /// restores when the table is deleted while its redirect must hold. The
    /// shared planned table itself when it has them and no split of the
    /// service (which it keeps only when one was found), so that a node with
    /// many upgrades in flight plans in linear time.
    fn redirected(&self, service: &Service) -> Arc<NftTable> {
        let own = service_redirects(service);
        if !self.split && own.iter().all(|r| self.shared_redirects.contains(r)) {
            return Arc::clone(self.shared);
        }
        let mut table = self.without_split(service);
        add_redirects(&mut table, &own);
        Arc::new(table)
    }

    /// The planned table without `service`'s canary split (the planned
    /// table keeps one found holding until its upgrade ends it).
    fn without_split(&self, service: &Service) -> NftTable {
        let mut table = NftTable::clone(self.shared);
        remove_canary(&mut table, &canary_comments(service));
        table
    }

    /// The canary of `service`'s upgrade, if it has one: its rules, and the
    /// planned table with them.
    fn canary(&self, service: &Service) -> Option<Box<CanarySplit>> {
        let canary = &service.upgrade.canary.as_ref()?.value;
        let rules = canary_rules(service, canary.weight.value);
        let mut table = self.without_split(service);
        add_canary(&mut table, &rules);
        Some(Box::new(CanarySplit {
            weight: canary.weight.value,
            hold: canary.hold.value,
            unhealthy_after: canary.unhealthy_after.value,
            rules,
            table,
        }))
    }
}

fn container_resource(service: &str, node: &str, slot: Slot) -> Resource {
    Resource::Container {
        service: service.to_string(),
        slot,
        name: container_name(service, node, slot),
    }
}

/// The service and its container, as operations carry them.
pub(super) fn workload(service: &Service, container: &DesiredContainer) -> Box<Workload> {
    Box::new(Workload {
        service: service.clone(),
        container: container.clone(),
    })
}

/// A change that creates the primary container, carried out by `operation`.
pub(super) fn create_primary(
    resource: Resource,
    container: &DesiredContainer,
    operation: Operation,
) -> Change {
    let mut fields = vec![
        FieldChange {
            name: "image".into(),
            old: None,
            new: Some(container.image.clone().into()),
        },
        FieldChange {
            name: "spec".into(),
            old: None,
            new: Some(container.spec_hash().into()),
        },
        FieldChange {
            name: "ports".into(),
            old: None,
            new: Some(ports_text(container).into()),
        },
    ];
    if let Ok(command) = container.command_for(false)
        && !command.is_empty()
    {
        fields.push(FieldChange {
            name: "command".into(),
            old: None,
            new: Some(FieldValue::List(command)),
        });
    }
    if let Some(address) = &container.address {
        fields.push(FieldChange {
            name: "address".into(),
            old: None,
            new: Some(address.clone().into()),
        });
    }
    Change {
        action: Action::Create,
        resource,
        reason: "not running yet".into(),
        fields,
        diff: Vec::new(),
        upgrade: None,
        operation,
    }
}

fn ports_text(container: &DesiredContainer) -> String {
    container.port_labels().join(", ")
}

/// The field changes between a running container and the desired one.
pub(super) fn container_fields(
    found: &Container,
    container: &DesiredContainer,
) -> Vec<FieldChange> {
    let mut fields = Vec::new();
    if found.image != container.image {
        fields.push(FieldChange {
            name: "image".into(),
            old: Some(found.image.clone().into()),
            new: Some(container.image.clone().into()),
        });
    }
    if container.digest.is_some() && found.digest != container.digest {
        fields.push(FieldChange {
            name: "digest".into(),
            old: found.digest.clone().map(Into::into),
            new: container.digest.clone().map(Into::into),
        });
    }
    let ports = container.port_labels();
    if !found.ports.is_empty() && found.ports != ports {
        fields.push(FieldChange {
            name: "ports".into(),
            old: Some(found.ports.join(", ").into()),
            new: Some(ports.join(", ").into()),
        });
    }
    fields.push(FieldChange {
        name: "spec".into(),
        old: Some(found.spec_hash.clone().into()),
        new: Some(container.spec_hash().into()),
    });
    fields
}

/// A current container that is not running: drift, and a start by `operation`.
pub(super) fn restart_if_stopped(
    found: &Container,
    resource: Resource,
    drift: &mut Vec<Drift>,
    operation: Operation,
) -> Option<Change> {
    if found.state == "running" {
        return None;
    }
    drift.push(Drift {
        resource: resource.clone(),
        what: format!("the container is {}; lessnat left it running", found.state),
    });
    Some(Change {
        action: Action::Update,
        resource,
        reason: "start the stopped container".into(),
        fields: vec![FieldChange {
            name: "state".into(),
            old: Some(found.state.clone().into()),
            new: Some(FieldValue::Text("running".into())),
        }],
        diff: Vec::new(),
        upgrade: None,
        operation,
    })
}

/// Plans one host-mode service.
pub(super) fn plan_service(
    node: &str,
    service: &Service,
    container: &DesiredContainer,
    mine: &Slots,
    table: &ServiceTable,
    observed: &Observed,
    drift: &mut Vec<Drift>,
) -> Option<Change> {
    let name = &service.name.value;
    let hash = container.spec_hash();
    if mine.next.is_some() || mine.prev.is_some() {
        return Some(in_flight(node, service, container, mine, table, observed));
    }
    if !table.found.is_empty() {
        // A redirect with no next container behind it: left over, or made by hand.
        drift.push(Drift {
            resource: container_resource(name, node, Slot::Next),
            what: "a redirect exists but the next container is gone".into(),
        });
    }
    let resource = container_resource(name, node, Slot::Primary);
    let workload = workload(service, container);
    let Some(primary) = mine.primary else {
        let create = Operation::CreatePrimary {
            workload,
            replace: false,
        };
        return Some(create_primary(resource, container, create));
    };
    if primary.spec_hash == hash {
        return restart_if_stopped(
            primary,
            resource,
            drift,
            Operation::StartPrimary { workload },
        );
    }
    let replace = |workload| Operation::CreatePrimary {
        workload,
        replace: true,
    };
    let fields = container_fields(primary, container);
    if primary.state != "running" {
        return Some(Change {
            action: Action::Replace,
            resource,
            reason: format!(
                "the spec changed and the container is {}: nothing to drain",
                primary.state
            ),
            fields,
            diff: Vec::new(),
            upgrade: None,
            operation: replace(workload),
        });
    }
    if !primary.ports.is_empty() && primary.ports != container.port_labels() {
        return Some(Change {
            action: Action::Replace,
            resource,
            reason: "the ports changed: clients must move to the new ports, so there is nothing to redirect".into(),
            fields,
            diff: Vec::new(),
            upgrade: None,
            operation: replace(workload),
        });
    }
    match service.upgrade.strategy {
        Strategy::StopStart => Some(Change {
            action: Action::Replace,
            resource: Resource::Service { name: name.clone() },
            reason: "stop-start upgrade: the service is down between stop and healthy".into(),
            fields,
            diff: Vec::new(),
            upgrade: Some(Upgrade {
                strategy: Strategy::StopStart,
                in_flight: None,
                stages: stop_start_stages(node, service),
            }),
            operation: Operation::StopStart { workload },
        }),
        Strategy::RedirectDrain => Some(Change {
            action: Action::Upgrade,
            resource: Resource::Service { name: name.clone() },
            reason: "the spec changed: zero-downtime upgrade".into(),
            fields,
            diff: Vec::new(),
            upgrade: Some(Upgrade {
                strategy: Strategy::RedirectDrain,
                in_flight: None,
                stages: upgrade_stages(node, service, observed, None),
            }),
            operation: Operation::Upgrade {
                workload,
                in_flight: None,
                from: Some(upgrade_from(primary)),
                redirected_table: table.redirected(service),
                canary: table.canary(service),
                split_found: table.split,
            },
        }),
    }
}

/// The running version an upgrade starts from.
fn upgrade_from(primary: &Container) -> UpgradeFrom {
    UpgradeFrom {
        spec: primary.spec_hash.clone(),
        image: primary.image.clone(),
    }
}

/// Where an upgrade found on the host stands, from live state alone.
fn reached(mine: &Slots, redirects: &[Redirect]) -> StageName {
    let redirected = !redirects.is_empty();
    match (
        mine.prev.is_some(),
        mine.primary.is_some(),
        mine.next.is_some(),
    ) {
        (true, false, _) => StageName::Drain, // swap began: old stopped, new primary not made yet
        (true, true, true) if redirected => StageName::Swap,
        (true, true, true) => StageName::Unredirect,
        (true, true, false) => StageName::DrainNext,
        (false, _, _) if redirected => StageName::Redirect,
        (false, _, _) => StageName::StartNext,
    }
}

fn in_flight(
    node: &str,
    service: &Service,
    container: &DesiredContainer,
    mine: &Slots,
    table: &ServiceTable,
    observed: &Observed,
) -> Change {
    let name = &service.name.value;
    let hash = container.spec_hash();
    let reached = reached(mine, table.found);
    let next_ok = mine.next.is_none_or(|n| n.state == "running");
    let next_current = mine.next.is_none_or(|n| n.spec_hash == hash);
    let (decision, why) = if reached >= StageName::Swap {
        let why = if next_current {
            "the new version already serves the canonical ports"
        } else {
            "the new version already serves the canonical ports; the spec changed again, so the next plan upgrades once more"
        };
        (Decision::Resume, why.to_string())
    } else if !next_ok {
        let state = mine.next.map(|n| n.state.as_str()).unwrap_or("gone");
        (Decision::RollBack, format!("the next container is {state}"))
    } else if !next_current {
        (
            Decision::RollBack,
            "the spec changed since this upgrade started".to_string(),
        )
    } else if table.split {
        (
            Decision::Resume,
            "the next container is running and current; a canary was holding: its hold starts again".to_string(),
        )
    } else {
        (
            Decision::Resume,
            "the next container is running and current".to_string(),
        )
    };
    let stages = match decision {
        Decision::Resume => upgrade_stages(node, service, observed, Some(reached)),
        Decision::RollBack => rollback_stages(node, service, reached, table.split),
    };
    // A canary found holding starts its hold again; one that has ended
    // (the redirect is set) is not run again.
    let canary = match decision {
        Decision::Resume if reached < StageName::Redirect => table.canary(service),
        _ => None,
    };
    let mut fields = Vec::new();
    if let (Some(old), Some(new)) = (mine.primary.or(mine.prev), mine.next)
        && old.image != new.image
    {
        fields.push(FieldChange {
            name: "image".into(),
            old: Some(old.image.clone().into()),
            new: Some(new.image.clone().into()),
        });
    }
    let verb = decision.verb();
    let in_flight = InFlight {
        reached,
        decision,
        why,
    };
    Change {
        action: Action::Upgrade,
        resource: Resource::Service { name: name.clone() },
        reason: format!(
            "{verb} the upgrade in flight, stopped after stage {}",
            reached.as_str()
        ),
        fields,
        diff: Vec::new(),
        upgrade: Some(Upgrade {
            strategy: Strategy::RedirectDrain,
            in_flight: Some(in_flight.clone()),
            stages,
        }),
        operation: Operation::Upgrade {
            workload: workload(service, container),
            in_flight: Some(in_flight),
            from: mine.primary.map(upgrade_from),
            redirected_table: table.redirected(service),
            canary,
            split_found: table.split,
        },
    }
}

fn port_list(service: &Service, temporary: bool) -> String {
    let ports: Vec<String> = service
        .ports
        .iter()
        .map(|p| {
            let number = if temporary {
                p.temp_port.as_ref().map_or(p.port.value, |t| t.value)
            } else {
                p.port.value
            };
            format!("{number}/{}", p.protocol.as_str())
        })
        .collect();
    ports.join(", ")
}

fn redirect_list(service: &Service) -> String {
    let pairs: Vec<String> = service
        .ports
        .iter()
        .filter_map(|p| {
            let temp = p.temp_port.as_ref()?;
            Some(format!(
                "{}/{} -> {}",
                p.port.value,
                p.protocol.as_str(),
                temp.value
            ))
        })
        .collect();
    pairs.join(", ")
}

/// Established connections to `dport` answered from `sport`: counted from
/// the sockets on local port `sport` when the observation has them (TCP),
/// else from conntrack.
fn established(observed: &Observed, protocol: Protocol, dport: u16, sport: u16) -> u64 {
    if protocol == Protocol::Tcp
        && let Some(port) = (observed.tcp_connections.iter().flatten()).find(|c| c.port == sport)
    {
        return port.established;
    }
    observed
        .conntrack
        .flows
        .iter()
        .filter(|f| {
            f.protocol == protocol.as_str() && f.orig_dport == dport && f.reply_sport == sport
        })
        .filter(|f| protocol == Protocol::Udp || f.state == "ESTABLISHED")
        .map(|f| f.count)
        .sum()
}

fn udp_note(service: &Service) -> Option<String> {
    let udp: Vec<String> = service
        .ports
        .iter()
        .filter(|p| p.protocol == Protocol::Udp)
        .map(|p| format!("{}/udp", p.port.value))
        .collect();
    (!udp.is_empty()).then(|| {
        format!(
            "; UDP has no connections to drain: conntrack entries of {} are deleted so flows move",
            udp.join(", ")
        )
    })
}

fn stage(
    name: StageName,
    done: bool,
    action: String,
    wait: Option<String>,
    timeout: Option<HumanDuration>,
) -> Stage {
    Stage {
        name,
        done,
        action,
        wait,
        timeout,
    }
}

fn upgrade_stages(
    node: &str,
    service: &Service,
    observed: &Observed,
    reached: Option<StageName>,
) -> Vec<Stage> {
    let name = &service.name.value;
    let health = service.health.as_ref().map(|h| h.start_timeout.value);
    let start_timeout = health.unwrap_or(HumanDuration::secs(60));
    let drain_timeout = service.upgrade.drain_timeout.value;
    let done = |s: StageName| reached.is_some_and(|r| s <= r);
    let tcp = |temporary: bool| -> u64 {
        service
            .ports
            .iter()
            .filter(|p| p.protocol == Protocol::Tcp)
            .map(|p| {
                let temp = p.temp_port.as_ref().map_or(p.port.value, |t| t.value);
                let sport = if temporary { temp } else { p.port.value };
                established(observed, Protocol::Tcp, p.port.value, sport)
            })
            .sum()
    };
    let on_timeout = match service.upgrade.on_drain_timeout {
        OnDrainTimeout::Proceed => "then proceed",
        OnDrainTimeout::Rollback => "then roll back",
    };
    let udp = udp_note(service).unwrap_or_default();
    let count = |n: u64| {
        if observed.conntrack.available || observed.tcp_connections.is_some() {
            format!(" (now {n})")
        } else {
            String::new()
        }
    };
    let next = container_name(name, node, Slot::Next);
    let canary = service.upgrade.canary.as_ref().map(|canary| {
        stage(
            StageName::Canary,
            done(StageName::Canary),
            format!(
                "send {} of new connections {} to \"{next}\", the rest to \"{}\" (one nft transaction)",
                canary.weight.value,
                redirect_list(service),
                container_name(name, node, Slot::Primary),
            ),
            Some(format!(
                "hold {} while \"{next}\" stays healthy ({} failed checks in a row roll back); `lessnat apply --promote` or `--abort` ends it early",
                canary.hold.value, canary.unhealthy_after.value
            )),
            Some(canary.hold.value),
        )
    });
    let mut stages = vec![stage(
        StageName::StartNext,
        done(StageName::StartNext),
        format!(
            "start \"{next}\" with the new spec on {}",
            port_list(service, true)
        ),
        Some("healthy".into()),
        Some(start_timeout),
    )];
    stages.extend(canary);
    stages.extend([
        stage(
            StageName::Redirect,
            done(StageName::Redirect),
            format!(
                "send new connections {} (one nft transaction){udp}",
                redirect_list(service)
            ),
            None,
            None,
        ),
        stage(
            StageName::Drain,
            done(StageName::Drain),
            format!(
                "let the old container finish its connections on {}",
                port_list(service, false)
            ),
            Some(format!(
                "no established connections left{}, {on_timeout}",
                count(tcp(false))
            )),
            Some(drain_timeout),
        ),
        stage(
            StageName::Swap,
            done(StageName::Swap),
            format!(
                "stop \"{}\" (kept as \"{}\"), start the new spec on {}",
                container_name(name, node, Slot::Primary),
                container_name(name, node, Slot::Prev),
                port_list(service, false)
            ),
            Some("healthy".into()),
            Some(start_timeout),
        ),
        stage(
            StageName::Unredirect,
            done(StageName::Unredirect),
            format!("remove the redirect (one nft transaction){udp}"),
            None,
            None,
        ),
        stage(
            StageName::DrainNext,
            done(StageName::DrainNext),
            format!(
                "let \"{}\" finish its connections on {}",
                container_name(name, node, Slot::Next),
                port_list(service, true)
            ),
            Some(format!(
                "no established connections left{}",
                count(tcp(true))
            )),
            Some(drain_timeout),
        ),
        stage(
            StageName::Finish,
            false,
            format!(
                "remove \"{}\" and \"{}\"",
                container_name(name, node, Slot::Next),
                container_name(name, node, Slot::Prev)
            ),
            None,
            None,
        ),
    ]);
    stages
}

fn rollback_stages(node: &str, service: &Service, reached: StageName, split: bool) -> Vec<Stage> {
    let name = &service.name.value;
    let mut stages = Vec::new();
    if reached >= StageName::Drain {
        stages.push(stage(
            StageName::Restore,
            false,
            format!(
                "start \"{}\" again as \"{}\"",
                container_name(name, node, Slot::Prev),
                container_name(name, node, Slot::Primary)
            ),
            Some("healthy".into()),
            service.health.as_ref().map(|h| h.start_timeout.value),
        ));
    }
    if reached >= StageName::Redirect {
        stages.push(stage(
            StageName::Unredirect,
            false,
            "remove the redirect (one nft transaction)".into(),
            None,
            None,
        ));
    } else if split {
        stages.push(stage(
            StageName::Unredirect,
            false,
            "remove the canary split (one nft transaction)".into(),
            None,
            None,
        ));
    }
    stages.push(stage(
        StageName::RemoveNext,
        false,
        format!(
            "stop and remove \"{}\"",
            container_name(name, node, Slot::Next)
        ),
        None,
        None,
    ));
    stages
}

fn stop_start_stages(node: &str, service: &Service) -> Vec<Stage> {
    let name = &service.name.value;
    vec![
        stage(
            StageName::Stop,
            false,
            format!(
                "stop and remove \"{}\" (the service is down from here)",
                container_name(name, node, Slot::Primary)
            ),
            None,
            Some(service.upgrade.stop_timeout.value),
        ),
        stage(
            StageName::Start,
            false,
            format!("start the new spec on {}", port_list(service, false)),
            Some("healthy".into()),
            service.health.as_ref().map(|h| h.start_timeout.value),
        ),
    ]
}

/// A line diff between two tables' nft text (either may be absent). When both
/// exist, only the changed lines and three lines around them are kept, with
/// `...` between distant hunks.
pub(super) fn table_diff(old: Option<&NftTable>, new: Option<&NftTable>) -> Vec<DiffLine> {
    let context = old.is_some() && new.is_some();
    let old = old
        .map(crate::model::nft_text::render_table)
        .unwrap_or_default();
    let new = new
        .map(crate::model::nft_text::render_table)
        .unwrap_or_default();
    let diff = similar::TextDiff::from_lines(&old, &new);
    let line = |change: similar::Change<&str>| DiffLine {
        tag: match change.tag() {
            similar::ChangeTag::Delete => '-',
            similar::ChangeTag::Insert => '+',
            similar::ChangeTag::Equal => ' ',
        },
        text: change.value().trim_end_matches('\n').to_string(),
    };
    if !context {
        return diff.iter_all_changes().map(line).collect();
    }
    let mut lines = Vec::new();
    for (index, group) in diff.grouped_ops(3).iter().enumerate() {
        if index > 0 {
            lines.push(DiffLine {
                tag: ' ',
                text: "...".into(),
            });
        }
        for op in group {
            lines.extend(diff.iter_changes(op).map(line));
        }
    }
    lines
}
