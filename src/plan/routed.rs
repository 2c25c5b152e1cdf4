//! Planning routed mode on one node: a worker's replicas and their wiring, a
//! load-balancer node's choice of replica addresses, and the policy routing,
//! VIPs and kernel settings either role needs.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, UNIX_EPOCH};

use super::cluster::{Answers, Sends, owed_acknowledgements};
use super::host::{container_fields, create_primary, restart_if_stopped, workload};
use super::operation::Workload;
use super::operation::{CanarySplit, Operation, ReplicaCanary, ReplicaMove, Switch, Unanswered};
use super::{
    Action, Change, Decision, Drift, FieldChange, InFlight, Resource, Slots, Stage, StageName,
    Upgrade,
};
use crate::cluster::handshake::{Handshake, SwitchAck};
use crate::desired::host_table::{add_canary, canary_rules_in, remove_canary};
use crate::desired::routed::{
    LoadBalancerRole, ReplicaAddresses, replicas_of, replicas_on, version_tag,
};
use crate::desired::routed_table::{
    Dnat, LoadBalancerRules, canary_promote_comment, canary_promote_rule, canary_split_comment,
    canary_split_rule, down_in, spreads_in, versions_in,
};
use crate::desired::{DesiredContainer, replica_container};
use crate::model::{Container, IpRule, NftRule, NftTable, Observed, OwnedAddress, Route, Veth};
use crate::ownership::{
    Slot, VETH_GATEWAY, VETH_GATEWAY_V6, parse_container_name, replica_container_name, veth_name,
};
use crate::spec::{HumanDuration, NetworkMode, OnDrainTimeout, Service, Spec, Strategy};

/// A routed replica's place: its node and its number there.
#[derive(Clone, Copy)]
struct On<'a> {
    node: &'a str,
    number: u32,
}

impl On<'_> {
    /// The replica's container in `slot`.
    fn name(self, service: &str, slot: Slot) -> String {
        replica_container_name(service, self.node, self.number, slot)
    }

    /// The replica as the resource an upgrade changes: `service.NAME`, and
    /// `service.NAME[N]` for the node's replica number N beyond the first.
    fn service(self, service: &str) -> Resource {
        let name = match self.number {
            1 => service.to_string(),
            n => format!("{service}[{n}]"),
        };
        Resource::Service { name }
    }
}

fn resource(service: &str, on: On, slot: Slot) -> Resource {
    Resource::Container {
        service: service.to_string(),
        slot,
        name: on.name(service, slot),
    }
}

fn veth_resource(service: &str, address: IpAddr) -> Resource {
    let address = address.to_string();
    Resource::Veth {
        service: service.to_string(),
        name: veth_name(service, &address),
        address,
    }
}

/// The address a routed container is wired in at, from its label.
fn wired_at(container: &Container) -> Option<IpAddr> {
    container.address.as_deref()?.parse().ok()
}

/// Where a replica stays when it is replaced in place: at `old`, unless the
/// spec moved it to other addresses.
fn same_or_address(pair: &ReplicaAddresses, old: IpAddr) -> IpAddr {
    if pair.contains(old) {
        old
    } else {
        pair.address
    }
}

/// Where an upgrade starts the next version when the current one is at
/// `old`: the pair's other address; `address` when `old` is not one of the
/// pair (the spec changed the replica's addresses).
fn next_for(pair: &ReplicaAddresses, old: IpAddr) -> IpAddr {
    if pair.contains(old) {
        pair.other(old)
    } else {
        pair.address
    }
}

/// The veth found for `service`'s container at `address`.
fn veth_of<'a>(observed: &'a Observed, service: &str, address: IpAddr) -> Option<&'a Veth> {
    let address = address.to_string();
    observed
        .veths
        .iter()
        .find(|v| v.service == service && v.address == address)
}

/// Plans the replica of a routed `service` that runs on `node`.
pub(super) fn plan_replica(
    spec: &Spec,
    node: &str,
    service: &Service,
    container: &DesiredContainer,
    mine: &Slots,
    observed: &Observed,
    drift: &mut Vec<Drift>,
) -> Vec<Change> {
    let name = &service.name.value;
    let number = container.replica_number();
    let Some(pair) = replicas_on(spec, service, node)
        .iter()
        .find(|r| r.number == number)
        .map(|r| r.pair)
    else {
        return Vec::new();
    };
    let on = On { node, number };
    let hash = container.spec_hash();
    let workload = workload(service, container);
    if let Some(next) = mine.next {
        return vec![in_flight(
            spec, on, service, workload, &pair, mine, next, &hash,
        )];
    }
    let Some(primary) = mine.primary else {
        let operation = Operation::CreateReplica {
            workload,
            address: pair.address,
        };
        let mut create = create_primary(resource(name, on, Slot::Primary), container, operation);
        create.reason = format!("wired in at {} with a veth pair", pair.address);
        return vec![create];
    };
    let at = wired_at(primary).unwrap_or(pair.address);
    let replace = |workload| Operation::ReplaceReplica {
        workload,
        address: same_or_address(&pair, at),
    };
    if primary.spec_hash != hash {
        let fields = container_fields(primary, container);
        if primary.state != "running" {
            return vec![Change {
                action: Action::Replace,
                resource: resource(name, on, Slot::Primary),
                reason: format!(
                    "the spec changed and the container is {}: nothing to drain",
                    primary.state
                ),
                fields,
                diff: Vec::new(),
                upgrade: None,
                operation: replace(workload),
            }];
        }
        return vec![match service.upgrade.strategy {
            Strategy::StopStart => Change {
                action: Action::Replace,
                resource: on.service(name),
                reason: format!(
                    "stop-start upgrade at {at}: the replica is down between stop and healthy"
                ),
                fields,
                diff: Vec::new(),
                upgrade: Some(Upgrade {
                    strategy: Strategy::StopStart,
                    in_flight: None,
                    stages: stop_start_stages(on, service, same_or_address(&pair, at)),
                }),
                operation: replace(workload),
            },
            Strategy::RedirectDrain => Change {
                action: Action::Upgrade,
                resource: on.service(name),
                reason: format!(
                    "the spec changed: zero-downtime upgrade from {at} to {}",
                    next_for(&pair, at)
                ),
                fields,
                diff: Vec::new(),
                upgrade: Some(Upgrade {
                    strategy: Strategy::RedirectDrain,
                    in_flight: None,
                    stages: upgrade_stages(
                        service,
                        &[Move {
                            on,
                            old_at: at,
                            next_at: next_for(&pair, at),
                        }],
                        false,
                    ),
                }),
                operation: Operation::UpgradeReplica {
                    workload,
                    old_at: at,
                    next_at: next_for(&pair, at),
                    in_flight: None,
                    old_exists: true,
                    load_balancers: load_balancer_addresses(spec),
                    canary: None,
                    handshake: handshake(spec, on, service, at, next_for(&pair, at), &hash),
                    rollout: None,
                },
            },
        }];
    }
    let restart = Operation::RestartReplica {
        workload,
        address: at,
    };
    if let Some(start) =
        restart_if_stopped(primary, resource(name, on, Slot::Primary), drift, restart)
    {
        return vec![start];
    }
    match veth_of(observed, name, at) {
        Some(veth) if veth.up => Vec::new(),
        found => {
            let what = if found.is_some() {
                "the veth is down"
            } else {
                "the container has no veth (restarted or re-created by Docker?)"
            };
            drift.push(Drift {
                resource: veth_resource(name, at),
                what: what.into(),
            });
            vec![Change {
                action: Action::Create,
                resource: veth_resource(name, at),
                reason: format!("wire {} in again at {at}", primary.name),
                fields: Vec::new(),
                diff: Vec::new(),
                upgrade: None,
                operation: Operation::Wire {
                    service: name.clone(),
                    container: primary.name.clone(),
                    address: at,
                },
            }]
        }
    }
}

/// The addresses of the spec's load-balancer nodes: their probes reach
/// replicas, and are not client connections. With `cluster:`, also the node
/// side of the worker's veths, where its own probes (for its registrations)
/// come from.
fn load_balancer_addresses(spec: &Spec) -> Vec<IpAddr> {
    let mut addresses: Vec<IpAddr> = spec
        .nodes
        .iter()
        .filter(|n| n.load_balancer.is_some())
        .flat_map(|n| {
            std::iter::once(*n.address.value).chain(n.address6.as_ref().map(|a| *a.value))
        })
        .collect();
    if spec.cluster.is_some() {
        addresses.extend([IpAddr::V4(VETH_GATEWAY), IpAddr::V6(VETH_GATEWAY_V6)]);
    }
    addresses
}

/// A routed upgrade found with its `next` container.
#[allow(clippy::too_many_arguments)]
fn in_flight(
    spec: &Spec,
    on: On,
    service: &Service,
    workload: Box<Workload>,
    pair: &ReplicaAddresses,
    mine: &Slots,
    next: &Container,
    hash: &str,
) -> Change {
    let name = &service.name.value;
    let old_at = mine.primary.and_then(wired_at).unwrap_or(pair.address);
    let next_at = wired_at(next).unwrap_or_else(|| next_for(pair, old_at));
    let (decision, why) = if next.spec_hash != hash {
        (
            Decision::RollBack,
            "the spec changed since this upgrade started".to_string(),
        )
    } else if next.state != "running" {
        (
            Decision::RollBack,
            format!("the next container is {}", next.state),
        )
    } else if mine.primary.is_none() {
        (
            Decision::Resume,
            "the old replica is gone: the next one becomes the primary".to_string(),
        )
    } else {
        (
            Decision::Resume,
            "the next container is running and current".to_string(),
        )
    };
    let stages = match decision {
        Decision::Resume => upgrade_stages(
            service,
            &[Move {
                on,
                old_at,
                next_at,
            }],
            true,
        ),
        Decision::RollBack => vec![Stage {
            name: StageName::RemoveNext,
            done: false,
            action: format!(
                "remove {} (load-balancer nodes that switched to {next_at} switch back when it stops answering)",
                on.name(name, Slot::Next)
            ),
            wait: None,
            timeout: None,
        }],
    };
    let verb = decision.verb();
    let handshake = match decision {
        Decision::Resume if mine.primary.is_some() => {
            handshake(spec, on, service, old_at, next_at, hash)
        }
        _ => None,
    };
    let in_flight = InFlight {
        reached: StageName::StartNext,
        decision,
        why,
    };
    Change {
        action: Action::Upgrade,
        resource: on.service(name),
        reason: format!("{verb} the routed upgrade in flight"),
        fields: Vec::new(),
        diff: Vec::new(),
        upgrade: Some(Upgrade {
            strategy: Strategy::RedirectDrain,
            in_flight: Some(in_flight.clone()),
            stages,
        }),
        operation: Operation::UpgradeReplica {
            workload,
            old_at,
            next_at,
            in_flight: Some(in_flight),
            old_exists: mine.primary.is_some(),
            load_balancers: load_balancer_addresses(spec),
            canary: None,
            handshake,
            rollout: None,
        },
    }
}

/// One replica an upgrade moves: where, and from and to which address.
#[derive(Clone, Copy)]
struct Move<'a> {
    on: On<'a>,
    old_at: IpAddr,
    next_at: IpAddr,
}

/// `text` of each of `moves`, joined with `separator`.
fn each(moves: &[Move], separator: &str, text: impl Fn(&Move) -> String) -> String {
    moves.iter().map(text).collect::<Vec<_>>().join(separator)
}

/// The stages of an upgrade of `moves` (one replica, or a batch of them
/// that upgrade together).
/// With the spec's `cluster:`, the handshake of an upgrade of `service`'s
/// replica on `on` from `from` to `to` at `version`.
fn handshake(
    spec: &Spec,
    on: On,
    service: &Service,
    from: IpAddr,
    to: IpAddr,
    version: &str,
) -> Option<Box<Handshake>> {
    let cluster = spec.cluster.as_ref()?;
    Some(Box::new(Handshake {
        etcd: cluster.etcd.value.clone(),
        service: service.name.value.clone(),
        node: on.node.to_string(),
        from,
        to,
        version: version.to_string(),
    }))
}

fn upgrade_stages(service: &Service, moves: &[Move], started: bool) -> Vec<Stage> {
    let name = &service.name.value;
    let start_timeout = service
        .health
        .as_ref()
        .map_or(HumanDuration::secs(60), |h| h.start_timeout.value);
    let them = if moves.len() > 1 { "them" } else { "it" };
    let on_timeout = match service.upgrade.on_drain_timeout {
        OnDrainTimeout::Proceed => format!("then remove {them} anyway"),
        OnDrainTimeout::Rollback => "then roll back".to_string(),
    };
    let nexts = each(moves, ", ", |m| m.next_at.to_string());
    let olds = each(moves, ", ", |m| m.old_at.to_string());
    let mut stages = vec![Stage {
        name: StageName::StartNext,
        done: started,
        action: format!(
            "start {} and wire {them} in",
            each(moves, ", ", |m| format!(
                "{} at {}",
                m.on.name(name, Slot::Next),
                m.next_at
            ))
        ),
        wait: Some("healthy".into()),
        timeout: Some(start_timeout),
    }];
    let switch = match &service.upgrade.canary {
        Some(canary) => {
            stages.push(Stage {
                name: StageName::Canary,
                done: false,
                action: format!(
                    "send {} of the new connections that reach {olds} to {nexts} (this node's table; load-balancer nodes keep sending to {olds})",
                    canary.weight.value
                ),
                wait: Some(format!(
                    "hold {} while {nexts} {} healthy ({} failed checks in a row roll back); `lessnat apply --promote` or `--abort` ends it early",
                    canary.hold.value,
                    if moves.len() > 1 { "stay" } else { "stays" },
                    canary.unhealthy_after.value
                )),
                timeout: Some(canary.hold.value),
            });
            format!(
                "promote: drop load-balancer nodes' probes of {olds}, so they send new connections to {nexts} (on their own next apply)"
            )
        }
        None => format!(
            "load-balancer nodes send new connections to {nexts} once {} (on their own next apply)",
            if moves.len() > 1 {
                "each answers"
            } else {
                "it answers"
            }
        ),
    };
    stages.push(Stage {
        name: StageName::Switch,
        done: false,
        action: switch,
        wait: Some(format!("at least {}", service.upgrade.switch_wait.value)),
        timeout: None,
    });
    stages.extend([
        Stage {
            name: StageName::Drain,
            done: false,
            action: format!("wait until no connection to {olds} remains ({on_timeout})"),
            wait: Some(
                if moves.len() > 1 {
                    "0 live connections to the old replicas"
                } else {
                    "0 live connections to the old replica"
                }
                .into(),
            ),
            timeout: Some(service.upgrade.drain_timeout.value),
        },
        Stage {
            name: StageName::Finish,
            done: false,
            action: each(moves, "; ", |m| {
                format!(
                    "remove {}; {} becomes the primary at {}",
                    m.on.name(name, Slot::Primary),
                    m.on.name(name, Slot::Next),
                    m.next_at
                )
            }),
            wait: None,
            timeout: None,
        },
    ]);
    stages
}

/// Merges the upgrades of a routed service's replicas on `node` into
/// batches of its `maxParallel`, in replica order: each batch is one change
/// whose replicas start, switch and drain together. Upgrades found in
/// flight that roll back stay on their own.
pub(super) fn batch_upgrades(node: &str, changes: Vec<Change>) -> Vec<Change> {
    let mut slots: Vec<Vec<Change>> = Vec::new();
    // Per service, the slot of its open batch.
    let mut open: BTreeMap<String, usize> = BTreeMap::new();
    for change in changes {
        let Some(member) = batchable(&change) else {
            slots.push(vec![change]);
            continue;
        };
        let service = member.workload.service.name.value.clone();
        let max = member.workload.service.upgrade.max_parallel.value as usize;
        match open.get(&service) {
            Some(&at) if slots[at].len() < max => slots[at].push(change),
            _ => {
                open.insert(service, slots.len());
                slots.push(vec![change]);
            }
        }
    }
    slots
        .into_iter()
        .filter_map(|mut slot| match slot.len() {
            1 => slot.pop(),
            _ => batch_change(node, slot),
        })
        .collect()
}

/// The replica an upgrade change moves, if it can join a batch: an upgrade
/// that starts, or one in flight that resumes.
fn batchable(change: &Change) -> Option<ReplicaMove> {
    change.operation.replica_move().filter(|m| {
        m.in_flight
            .as_ref()
            .is_none_or(|f| f.decision == Decision::Resume)
    })
}

/// The one change that upgrades the replicas of `changes` together.
fn batch_change(node: &str, changes: Vec<Change>) -> Option<Change> {
    let batch: Vec<ReplicaMove> = changes.iter().filter_map(batchable).collect();
    let load_balancers = match &changes.first()?.operation {
        Operation::UpgradeReplica { load_balancers, .. } => load_balancers.clone(),
        _ => Vec::new(),
    };
    // The batch takes the rollout turn its new upgrades were given (one
    // that takes a slot before one of an upgrade found in flight).
    let mut turns: Vec<_> = changes
        .iter()
        .filter_map(|c| match &c.operation {
            Operation::UpgradeReplica { rollout, .. } => rollout.clone(),
            _ => None,
        })
        .collect();
    turns.sort_by_key(|t| t.resumed);
    let rollout = turns.into_iter().next();
    let service = batch.first()?.workload.service.clone();
    let name = &service.name.value;
    let moves: Vec<Move> = batch
        .iter()
        .map(|m| Move {
            on: On {
                node,
                number: m.workload.container.replica_number(),
            },
            old_at: m.old_at,
            next_at: m.next_at,
        })
        .collect();
    let numbers: Vec<String> = moves.iter().map(|m| m.on.number.to_string()).collect();
    let mut fields: Vec<FieldChange> = Vec::new();
    for field in changes.iter().flat_map(|c| &c.fields) {
        if !fields.contains(field) {
            fields.push(field.clone());
        }
    }
    Some(Change {
        action: Action::Upgrade,
        resource: Resource::Service {
            name: format!("{name}[{}]", numbers.join(",")),
        },
        reason: format!(
            "{} replicas at once (maxParallel {}): {}",
            batch.len(),
            service.upgrade.max_parallel.value,
            each(&moves, ", ", |m| format!("{} to {}", m.old_at, m.next_at))
        ),
        fields,
        diff: Vec::new(),
        upgrade: Some(Upgrade {
            strategy: Strategy::RedirectDrain,
            in_flight: batch.iter().find_map(|m| m.in_flight.clone()),
            stages: upgrade_stages(
                &service,
                &moves,
                batch.iter().all(|m| m.in_flight.is_some()),
            ),
        }),
        operation: Operation::UpgradeReplicas {
            batch,
            load_balancers,
            canary: None,
            rollout,
        },
    })
}

fn stop_start_stages(on: On, service: &Service, at: IpAddr) -> Vec<Stage> {
    let primary = on.name(&service.name, Slot::Primary);
    vec![
        Stage {
            name: StageName::Stop,
            done: false,
            action: format!("stop and remove {primary}"),
            wait: None,
            timeout: Some(service.upgrade.stop_timeout.value),
        },
        Stage {
            name: StageName::Start,
            done: false,
            action: format!("start the new version at {at} and wire it in"),
            wait: Some("healthy".into()),
            timeout: None,
        },
    ]
}

/// Whether `node`'s table needs the chain of routed canaries' splits: the
/// spec gives a canary to a routed service with a replica there.
pub(super) fn canary_chain_needed(spec: &Spec, node: &str) -> bool {
    spec.services.iter().any(|s| {
        s.network == NetworkMode::Routed
            && s.upgrade.canary.is_some()
            && s.replicas.iter().any(|r| r.node.value == node)
    })
}

/// The comments of a canary's rules for the old replica at `old`.
fn canary_comments(service: &str, old: IpAddr) -> [String; 2] {
    [
        canary_split_comment(service, old),
        canary_promote_comment(service, old),
    ]
}

/// The rules of routed canaries found in `found` that stay while their
/// upgrade is in flight (a `next` container runs beside the old primary)
/// and the spec still gives the service a canary: the upgrade ends them.
pub(super) fn kept_canary_rules(
    spec: &Spec,
    observed: &Observed,
    found: &NftTable,
) -> Vec<(String, NftRule)> {
    let mut comments = Vec::new();
    for next in observed.containers.iter().filter(|c| c.slot == Slot::Next) {
        let canary = spec
            .services
            .iter()
            .any(|s| s.name.value == next.service && s.upgrade.canary.is_some());
        let number = replica_number_of(&next.name);
        let old = observed
            .containers
            .iter()
            .filter(|c| c.slot == Slot::Primary && c.service == next.service)
            .find(|c| replica_number_of(&c.name) == number)
            .and_then(wired_at);
        if let (true, Some(old)) = (canary, old) {
            comments.extend(canary_comments(&next.service, old));
        }
    }
    canary_rules_in(found, &comments)
}

fn replica_number_of(name: &str) -> u32 {
    parse_container_name(name).map_or(1, |n| n.replica)
}

/// Gives each routed upgrade of a service with a canary its canary: the
/// split's and the promotion's rules for its replicas, and the tables to
/// hold meanwhile (`planned`, the table the plan writes, plus them).
/// `found`: lessnat's table as observed (promotion rules found there mean
/// the hold is over).
pub(super) fn attach_canaries(
    changes: &mut [Change],
    spec: &Spec,
    planned: Option<&NftTable>,
    found: Option<&NftTable>,
) {
    let balancers = load_balancer_addresses(spec);
    for change in changes {
        let (service, moves, slot): (&Service, Vec<(IpAddr, IpAddr)>, _) =
            match &mut change.operation {
                Operation::UpgradeReplica {
                    workload,
                    old_at,
                    next_at,
                    canary,
                    ..
                } => (&workload.service, vec![(*old_at, *next_at)], canary),
                Operation::UpgradeReplicas { batch, canary, .. } => match batch.first() {
                    Some(first) => (
                        &first.workload.service,
                        batch.iter().map(|m| (m.old_at, m.next_at)).collect(),
                        canary,
                    ),
                    None => continue,
                },
                _ => continue,
            };
        let (Some(settings), Some(planned)) = (&service.upgrade.canary, planned) else {
            continue;
        };
        let name = &service.name.value;
        let comments: Vec<String> = moves
            .iter()
            .flat_map(|(old, _)| canary_comments(name, *old))
            .collect();
        let split: Vec<(String, NftRule)> = moves
            .iter()
            .map(|(old, next)| {
                canary_split_rule(name, *old, *next, settings.weight.value, &balancers)
            })
            .collect();
        let promote: Vec<(String, NftRule)> = moves
            .iter()
            .filter_map(|(old, _)| canary_promote_rule(name, *old, &balancers))
            .collect();
        let promote_comments: Vec<String> = moves
            .iter()
            .map(|(old, _)| canary_promote_comment(name, *old))
            .collect();
        let promoted = found.is_some_and(|t| !canary_rules_in(t, &promote_comments).is_empty());
        let mut base = planned.clone();
        remove_canary(&mut base, &comments);
        let mut split_table = base.clone();
        add_canary(&mut split_table, &split);
        let mut promoted_table = split_table.clone();
        add_canary(&mut promoted_table, &promote);
        *slot = Some(Box::new(ReplicaCanary {
            split: CanarySplit {
                weight: settings.weight.value,
                hold: settings.hold.value,
                unhealthy_after: settings.unhealthy_after.value,
                rules: split,
                table: split_table,
            },
            promote,
            promoted_table,
            comments,
            promoted,
        }));
        if let Some(stage) = change
            .upgrade
            .as_mut()
            .and_then(|u| u.stages.iter_mut().find(|s| s.name == StageName::Canary))
        {
            stage.done = promoted;
        }
    }
}

/// Veths that lead to no running container of ours at their address: left
/// over, or made by hand.
pub(super) fn stale_veths(observed: &Observed) -> Vec<Change> {
    observed
        .veths
        .iter()
        .filter(|veth| {
            !observed.containers.iter().any(|c| {
                c.service == veth.service
                    && c.state == "running"
                    && c.address.as_deref() == Some(veth.address.as_str())
            })
        })
        .map(|veth| Change {
            action: Action::Destroy,
            resource: Resource::Veth {
                service: veth.service.clone(),
                address: veth.address.clone(),
                name: veth.name.clone(),
            },
            reason: "no running container of lessnat's is wired in at its address".into(),
            fields: Vec::new(),
            diff: Vec::new(),
            upgrade: None,
            operation: Operation::Unwire {
                name: veth.name.clone(),
            },
        })
        .collect()
}

/// What a load-balancer node's table should hold, and the switches of replica
/// addresses that makes.
pub struct LoadBalancing {
    /// The rules.
    pub rules: LoadBalancerRules,
    /// The replicas whose new connections move.
    pub switches: Vec<Switch>,
    /// Replicas that leave or rejoin the spread, for the table change's reason.
    pub spread: Vec<String>,
    /// The connections to delete once the table leaves replicas out.
    pub unanswered: Vec<Unanswered>,
    /// Replicas the observed table already leaves out that stay out, and
    /// replicas whose worker holds a canary: state shown in the plan, not a
    /// change.
    pub kept_out: Vec<String>,
    /// VIP ports none of whose replicas answers (all are kept in the spread).
    pub warnings: Vec<String>,
    /// With the spec's `cluster:`: acknowledgements of upgrades in flight
    /// this node owes beyond its `switches`' (to write once the table is).
    pub acknowledgements: Vec<Change>,
}

/// One replica of a VIP port as a load-balancer node sends to it.
struct Target<'a> {
    /// The node it runs on.
    node: &'a str,
    /// Its two addresses.
    pair: ReplicaAddresses,
    /// The address its new connections go to.
    address: IpAddr,
    /// Neither of its addresses answered its probe.
    down: bool,
    /// The address of it an upgrade in flight leaves, where it takes no
    /// new connections from this node.
    leaving: Option<IpAddr>,
}

/// Decides, for each replica a load-balancer node sends connections to, which
/// of its two addresses new connections go to:
///
/// - the address recorded in the table stays while its recorded version is the
///   spec's, unless it stops answering and the other answers (failover);
///   with the spec's `cluster:`, the old address of an upgrade in flight
///   does not answer (no failing back to a replica being drained and
///   removed; a canary's promotion), except for a node whose spec is
///   behind and still sends there;
/// - when the spec's version differs (an upgrade on the worker), the other
///   address takes over as soon as it answers; with `stop-start` the worker
///   replaces the replica in place, so the address stays; with a canary, it
///   takes over only once the recorded address stops answering (the worker
///   holds the canary, then promotes it by dropping this node's probes);
/// - with nothing recorded, `address` unless only `nextAddress` answers;
///
/// and whether it is in the spread: a replica neither of whose addresses
/// answers is left out (its recorded address stays in `routed_versions`),
/// unless no replica of the VIP port answers: then all stay in.
pub(super) fn load_balancing(
    spec: &Spec,
    balancer: &str,
    role: &LoadBalancerRole,
    observed: &Observed,
) -> LoadBalancing {
    let found = super::own_table(observed);
    let recorded: BTreeMap<IpAddr, u32> = found
        .map(versions_in)
        .unwrap_or_default()
        .into_iter()
        .collect();
    let spreads: BTreeMap<String, Vec<IpAddr>> = found
        .map(spreads_in)
        .unwrap_or_default()
        .into_iter()
        .collect();
    let down_since: BTreeMap<IpAddr, u32> =
        found.map(down_in).unwrap_or_default().into_iter().collect();
    let now = observed.probed_at.and_then(|t| u32::try_from(t).ok());
    let mut down = BTreeMap::new();
    let mut chosen: BTreeMap<(String, IpAddr), (IpAddr, u32)> = BTreeMap::new();
    let mut switches = Vec::new();
    let mut dnat = Vec::new();
    let mut spread = BTreeSet::new();
    let mut unanswered = Vec::new();
    let mut kept_out = BTreeSet::new();
    let mut canaries = BTreeSet::new();
    let mut warnings = BTreeSet::new();
    let (source, unread) = Answers::of(spec, observed);
    warnings.extend(unread);
    let mut sends = Vec::new();
    for vip_port in &role.vip_ports {
        let service = vip_port.service;
        let name = &service.name.value;
        let canary = service.upgrade.canary.is_some();
        let mut targets = Vec::new();
        let placed = replicas_of(spec, service);
        for replica in placed.iter().filter(|r| vip_port.reaches(r.pair.address)) {
            let pair = replica.pair;
            let current = [pair.address, pair.next_address]
                .into_iter()
                .find_map(|a| Some((a, *recorded.get(&a)?)));
            let wanted = version_tag(&replica_container(service, replica).spec_hash());
            // The address an upgrade in flight leaves does not answer (the
            // worker published its ready next version: a canary's
            // promotion reaches this node that way), except for a node
            // whose spec is behind and still sends there.
            let leaving = source
                .leaving(name, pair)
                .filter(|from| current != Some((*from, wanted)));
            let answers = |address: IpAddr| match leaving {
                Some(from) if from == address => Some(false),
                _ => source.at(name, address),
            };
            let healthy = |address: IpAddr| answers(address) == Some(true);
            // Only a replica probed at both addresses can be known to be down.
            let down =
                answers(pair.address) == Some(false) && answers(pair.next_address) == Some(false);
            let node = replica.node;
            let key = (name.clone(), pair.address);
            if let Some((address, _)) = chosen.get(&key) {
                targets.push(Target {
                    node,
                    pair,
                    address: *address,
                    down,
                    leaving,
                });
                continue;
            }
            let other_answers = |a: IpAddr| healthy(pair.other(a));
            let (address, tag, why) = match current {
                None if healthy(pair.address) || !healthy(pair.next_address) => {
                    (pair.address, wanted, None)
                }
                None => (pair.next_address, wanted, None),
                Some((at, tag)) if tag == wanted => {
                    if !healthy(at) && other_answers(at) {
                        let why = "it stopped answering and the other address answers";
                        (pair.other(at), tag, Some(why))
                    } else {
                        (at, tag, None)
                    }
                }
                Some((at, _)) if service.upgrade.strategy == Strategy::StopStart => {
                    (at, wanted, None)
                }
                Some((at, tag)) if canary && other_answers(at) && healthy(at) => {
                    canaries.insert(format!(
                        "{name} on {node} ({at}): canary: new connections stay here while the worker sends a share of them on to {}; they move there once the worker promotes it ({})",
                        pair.other(at),
                        source.promotion(at)
                    ));
                    (at, tag, None)
                }
                Some((at, _)) if other_answers(at) => (
                    pair.other(at),
                    wanted,
                    Some(if canary {
                        source.promoted()
                    } else {
                        "the next version answers there"
                    }),
                ),
                Some((at, tag)) => (at, tag, None),
            };
            if let (Some(why), Some((from, _))) = (why, current) {
                switches.push(Switch {
                    service: name.clone(),
                    node: node.to_string(),
                    from,
                    to: address,
                    why: why.to_string(),
                    wait: service.upgrade.switch_wait.value,
                    ack: switch_ack(spec, balancer, &source, name, address),
                });
            }
            chosen.insert(key, (address, tag));
            sends.push(Sends {
                service: name,
                pair,
                to: address,
            });
            targets.push(Target {
                node,
                pair,
                address,
                down,
                leaving,
            });
        }
        let comment = vip_port.comment.clone();
        let all_down = targets.iter().all(|t| t.down);
        if all_down && !targets.is_empty() {
            warnings.insert(format!(
                "no replica of {comment} ({}) answers its health check: all {} stay in the spread \
                 (a replica that may be recovering beats a certain refusal); new connections fail until one answers",
                std::net::SocketAddr::new(vip_port.vip, vip_port.vip_port),
                targets.len()
            ));
        }
        let before = spreads.get(&comment);
        let mut dropped = Vec::new();
        for target in &targets {
            let out = target.down && !all_down;
            let was_in = before.map(|b| b.iter().any(|a| target.pair.contains(*a)));
            let who = format!("{name} on {} ({})", target.node, target.address);
            let since = down_since.get(&target.address).copied();
            if let (true, Some(since)) = (out, since.or(now)) {
                down.insert(target.address, since);
            }
            match (out, was_in) {
                (true, Some(false)) => {
                    let when = since.map(|s| out_since(s, now)).unwrap_or_default();
                    kept_out.insert(format!(
                        "{who} stays out of the spread: {}{when}",
                        source.silent(name, target.leaving)
                    ));
                }
                (true, _) => {
                    spread.insert(format!(
                        "{who}: out of the spread: {}",
                        source.silent(name, target.leaving)
                    ));
                    dropped.extend([target.pair.address, target.pair.next_address]);
                }
                (false, Some(false)) if target.down => {
                    spread.insert(format!(
                        "{who}: back in the spread: no replica answers, so all are kept"
                    ));
                }
                (false, Some(false)) => {
                    let when = since
                        .map(|s| format!(", out{}", out_since(s, now)))
                        .unwrap_or_default();
                    spread.insert(format!(
                        "{who}: back in the spread: {}{when}",
                        source.back()
                    ));
                }
                (false, _) => {}
            }
        }
        if !dropped.is_empty() {
            unanswered.push(Unanswered {
                port: comment.clone(),
                protocol: vip_port.port.protocol,
                vip: vip_port.vip,
                vip_port: vip_port.vip_port,
                addresses: dropped,
            });
        }
        dnat.push(Dnat {
            comment,
            protocol: vip_port.port.protocol,
            vip: vip_port.vip,
            vip_port: vip_port.vip_port,
            targets: targets
                .iter()
                .filter(|t| all_down || !t.down)
                .map(|t| t.address)
                .collect(),
            port: vip_port.port.port.value,
        });
    }
    let acknowledgements = owed_acknowledgements(spec, balancer, &source, &sends, &switches);
    LoadBalancing {
        acknowledgements,
        rules: LoadBalancerRules {
            id: role.id,
            dnat,
            subnets: role.workers.iter().map(|(subnet, _)| *subnet).collect(),
            versions: chosen.into_values().collect(),
            down: down.into_iter().collect(),
        },
        switches,
        spread: spread.into_iter().collect(),
        unanswered,
        kept_out: kept_out.into_iter().chain(canaries).collect(),
        warnings: warnings.into_iter().collect(),
    }
}

/// ` since TIME (for DURATION)`: when a replica left the spread, recorded at
/// `since`, and how long ago that was at `now`.
/// With the spec's `cluster:` and the registrations read: the
/// acknowledgement load-balancer node `balancer` writes once its table
/// sends `service`'s new connections to `to`, with the version registered
/// there (the worker waits for that version only).
fn switch_ack(
    spec: &Spec,
    balancer: &str,
    source: &Answers,
    service: &str,
    to: IpAddr,
) -> Option<SwitchAck> {
    let cluster = spec.cluster.as_ref()?;
    let Answers::Registered(view) = source else {
        return None;
    };
    let to = to.to_string();
    let registered = view
        .replicas
        .iter()
        .find(|r| r.service == service && r.address == to && r.healthy)?;
    Some(SwitchAck {
        etcd: cluster.etcd.value.clone(),
        node: balancer.to_string(),
        version: registered.version.clone(),
    })
}

fn out_since(since: u32, now: Option<u32>) -> String {
    let at = humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(since.into()));
    match now.and_then(|now| now.checked_sub(since)) {
        Some(seconds) => format!(" since {at} (for {})", HumanDuration::secs(seconds.into())),
        None => format!(" since {at}"),
    }
}

/// Whether a route is IPv6: by its destination, else by its gateway
/// (`default` without a gateway is IPv4, as for `ip route`).
fn is_ipv6_route(route: &Route) -> bool {
    let destination = route
        .destination
        .parse::<ipnet::IpNet>()
        .ok()
        .map(|n| n.addr());
    let gateway = route
        .gateway
        .as_deref()
        .and_then(|g| g.parse::<IpAddr>().ok());
    destination.or(gateway).is_some_and(|a| a.is_ipv6())
}

/// Whether two routes are the same route (perhaps with other gateways):
/// same table, destination and family; the IPv4 and IPv6 default routes of
/// one table are two.
fn same_route(a: &Route, b: &Route) -> bool {
    a.table == b.table && a.destination == b.destination && is_ipv6_route(a) == is_ipv6_route(b)
}

/// A route as a resource in plans: `route.TABLE.DESTINATION`, an IPv6
/// default route's destination shown as `::/0`.
fn route_resource(route: &Route) -> Resource {
    let destination = if route.destination == "default" && is_ipv6_route(route) {
        "::/0".to_string()
    } else {
        route.destination.clone()
    };
    Resource::Route {
        table: route.table,
        destination,
    }
}

/// Creates, replaces and removes rules, routes, addresses and kernel settings
/// so the node matches `desired`. Routes to wired containers belong to their
/// veths and are left alone.
pub(super) struct Wiring {
    /// Changes to make before containers start.
    pub first: Vec<Change>,
    /// Removals, after containers are gone.
    pub last: Vec<Change>,
}

/// Plans the node's policy routing, VIPs and kernel settings.
pub(super) fn plan_wiring(
    rules: &[IpRule],
    routes: &[Route],
    addresses: &[OwnedAddress],
    sysctls: &BTreeMap<String, String>,
    observed: &Observed,
) -> Wiring {
    let mut wiring = Wiring {
        first: Vec::new(),
        last: Vec::new(),
    };
    let change = |action, resource, reason: &str, fields, operation| Change {
        action,
        resource,
        reason: reason.into(),
        fields,
        diff: Vec::new(),
        upgrade: None,
        operation,
    };
    let field = |name: &str, old: Option<String>, new: Option<String>| FieldChange {
        name: name.into(),
        old: old.map(Into::into),
        new: new.map(Into::into),
    };
    let describe_rule = |r: &IpRule| {
        let mut text = String::new();
        if let Some(source) = &r.source {
            text.push_str(&format!("from {source} "));
        }
        if let Some(mark) = r.fwmark {
            text.push_str(&format!("fwmark {mark:#x} "));
        }
        text.push_str(&format!("lookup {}", r.table));
        text
    };
    for rule in rules {
        let resource = Resource::IpRule {
            family: rule.family.clone(),
            priority: rule.priority,
        };
        let found = observed
            .routing
            .rules
            .iter()
            .find(|r| r.family == rule.family && r.priority == rule.priority);
        match found {
            Some(found) if found == rule => {}
            found => {
                let action = if found.is_some() {
                    Action::Replace
                } else {
                    Action::Create
                };
                wiring.first.push(change(
                    action,
                    resource,
                    "routed mode's policy routing",
                    vec![field(
                        "rule",
                        found.map(describe_rule),
                        Some(describe_rule(rule)),
                    )],
                    Operation::Rule {
                        remove: found.cloned(),
                        add: Some(rule.clone()),
                    },
                ));
            }
        }
    }
    for found in &observed.routing.rules {
        if !rules
            .iter()
            .any(|r| r.family == found.family && r.priority == found.priority)
        {
            wiring.last.push(change(
                Action::Destroy,
                Resource::IpRule {
                    family: found.family.clone(),
                    priority: found.priority,
                },
                "not in the spec for this node",
                vec![field("rule", Some(describe_rule(found)), None)],
                Operation::Rule {
                    remove: Some(found.clone()),
                    add: None,
                },
            ));
        }
    }
    let describe_route = |r: &Route| match (&r.gateway, &r.device) {
        (Some(gateway), _) => format!("via {gateway}"),
        (None, Some(device)) => format!("dev {device}"),
        (None, None) => "unreachable".into(),
    };
    for route in routes {
        let found = observed
            .routing
            .routes
            .iter()
            .find(|r| same_route(r, route));
        if found == Some(route) {
            continue;
        }
        wiring.first.push(change(
            if found.is_some() {
                Action::Replace
            } else {
                Action::Create
            },
            route_resource(route),
            "routed mode's routes",
            vec![field(
                "route",
                found.map(describe_route),
                Some(describe_route(route)),
            )],
            Operation::Route {
                remove: found.cloned(),
                add: Some(route.clone()),
            },
        ));
    }
    for found in &observed.routing.routes {
        let wired = found
            .device
            .as_ref()
            .is_some_and(|d| observed.veths.iter().any(|v| &v.name == d));
        let wanted = routes.iter().any(|r| same_route(r, found));
        if !wired && !wanted {
            wiring.last.push(change(
                Action::Destroy,
                route_resource(found),
                "not in the spec for this node",
                vec![field("route", Some(describe_route(found)), None)],
                Operation::Route {
                    remove: Some(found.clone()),
                    add: None,
                },
            ));
        }
    }
    for address in addresses {
        if !observed.addresses.contains(address) {
            wiring.first.push(change(
                Action::Create,
                Resource::Address {
                    device: address.device.clone(),
                    address: address.address.clone(),
                },
                "a VIP this load-balancer node serves",
                Vec::new(),
                Operation::AddAddress {
                    address: address.clone(),
                },
            ));
        }
    }
    for found in &observed.addresses {
        if !addresses.contains(found) {
            wiring.last.push(change(
                Action::Destroy,
                Resource::Address {
                    device: found.device.clone(),
                    address: found.address.clone(),
                },
                "not a VIP of this node in the spec",
                Vec::new(),
                Operation::RemoveAddress {
                    address: found.clone(),
                },
            ));
        }
    }
    for (key, value) in sysctls {
        let found = observed.sysctls.get(key);
        if found != Some(value) {
            wiring.first.push(change(
                Action::Update,
                Resource::Sysctl { key: key.clone() },
                "routed mode needs it",
                vec![field("value", found.cloned(), Some(value.clone()))],
                Operation::SetSysctl {
                    key: key.clone(),
                    value: value.clone(),
                },
            ));
        }
    }
    wiring
}
