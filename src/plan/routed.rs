//! Planning routed mode on one node: a worker's replicas and their wiring, a
//! load-balancer node's choice of replica addresses, and the policy routing,
//! VIPs and kernel settings either role needs.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, UNIX_EPOCH};

use super::host::{container_fields, create_primary, restart_if_stopped, workload};
use super::operation::Workload;
use super::operation::{Operation, Switch, Unanswered};
use super::{
    Action, Change, Decision, Drift, FieldChange, InFlight, Resource, Slots, Stage, StageName,
    Upgrade,
};
use crate::desired::routed::{
    LoadBalancerRole, ReplicaAddresses, replicas_of, replicas_on, version_tag,
};
use crate::desired::routed_table::{Dnat, LoadBalancerRules, down_in, spreads_in, versions_in};
use crate::desired::{DesiredContainer, replica_container};
use crate::model::{Container, IpRule, Observed, OwnedAddress, Route, Veth};
use crate::ownership::{Slot, replica_container_name, veth_name};
use crate::spec::{HumanDuration, OnDrainTimeout, Service, Spec, Strategy};

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
                    stages: upgrade_stages(on, service, at, next_for(&pair, at), false),
                }),
                operation: Operation::UpgradeReplica {
                    workload,
                    old_at: at,
                    next_at: next_for(&pair, at),
                    in_flight: None,
                    old_exists: true,
                    load_balancers: load_balancer_addresses(spec),
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
/// replicas, and are not client connections.
fn load_balancer_addresses(spec: &Spec) -> Vec<IpAddr> {
    spec.nodes
        .iter()
        .filter(|n| n.load_balancer.is_some())
        .map(|n| *n.address.value)
        .collect()
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
        Decision::Resume => upgrade_stages(on, service, old_at, next_at, true),
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
        },
    }
}

fn upgrade_stages(
    on: On,
    service: &Service,
    old_at: IpAddr,
    next_at: IpAddr,
    started: bool,
) -> Vec<Stage> {
    let name = &service.name.value;
    let start_timeout = service
        .health
        .as_ref()
        .map_or(HumanDuration::secs(60), |h| h.start_timeout.value);
    let on_timeout = match service.upgrade.on_drain_timeout {
        OnDrainTimeout::Proceed => "then remove it anyway",
        OnDrainTimeout::Rollback => "then roll back",
    };
    vec![
        Stage {
            name: StageName::StartNext,
            done: started,
            action: format!(
                "start {} at {next_at} and wire it in",
                on.name(name, Slot::Next)
            ),
            wait: Some("healthy".into()),
            timeout: Some(start_timeout),
        },
        Stage {
            name: StageName::Switch,
            done: false,
            action: format!(
                "load-balancer nodes send new connections to {next_at} once it answers (on their own next apply)"
            ),
            wait: Some(format!("at least {}", service.upgrade.switch_wait.value)),
            timeout: None,
        },
        Stage {
            name: StageName::Drain,
            done: false,
            action: format!("wait until no connection to {old_at} remains ({on_timeout})"),
            wait: Some("0 live connections to the old replica".into()),
            timeout: Some(service.upgrade.drain_timeout.value),
        },
        Stage {
            name: StageName::Finish,
            done: false,
            action: format!(
                "remove {}; {} becomes the primary at {next_at}",
                on.name(name, Slot::Primary),
                on.name(name, Slot::Next)
            ),
            wait: None,
            timeout: None,
        },
    ]
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
    /// Replicas the observed table already leaves out that stay out: state
    /// shown in the plan, not a change.
    pub kept_out: Vec<String>,
    /// VIP ports none of whose replicas answers (all are kept in the spread).
    pub warnings: Vec<String>,
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
}

/// Decides, for each replica a load-balancer node sends connections to, which
/// of its two addresses new connections go to:
///
/// - the address recorded in the table stays while its recorded version is the
///   spec's, unless it stops answering and the other answers (failover);
/// - when the spec's version differs (an upgrade on the worker), the other
///   address takes over as soon as it answers; with `stop-start` the worker
///   replaces the replica in place, so the address stays;
/// - with nothing recorded, `address` unless only `nextAddress` answers;
///
/// and whether it is in the spread: a replica neither of whose addresses
/// answers is left out (its recorded address stays in `routed_versions`),
/// unless no replica of the VIP port answers: then all stay in.
pub(super) fn load_balancing(
    spec: &Spec,
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
    let mut warnings = BTreeSet::new();
    for vip_port in &role.vip_ports {
        let service = vip_port.service;
        let name = &service.name.value;
        let answers = |address: IpAddr| {
            let address = address.to_string();
            observed
                .probes
                .iter()
                .find(|p| &p.service == name && p.address == address)
                .map(|p| p.healthy)
        };
        let healthy = |address: IpAddr| answers(address) == Some(true);
        let mut targets = Vec::new();
        let placed = replicas_of(spec, service);
        for replica in placed.iter().filter(|r| vip_port.reaches(r.pair.address)) {
            let pair = replica.pair;
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
                });
                continue;
            }
            let wanted = version_tag(&replica_container(service, replica).spec_hash());
            let current = [pair.address, pair.next_address]
                .into_iter()
                .find_map(|a| Some((a, *recorded.get(&a)?)));
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
                Some((at, _)) if other_answers(at) => (
                    pair.other(at),
                    wanted,
                    Some("the next version answers there"),
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
                });
            }
            chosen.insert(key, (address, tag));
            targets.push(Target {
                node,
                pair,
                address,
                down,
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
                        "{who} stays out of the spread: neither address answers{when}"
                    ));
                }
                (true, _) => {
                    spread.insert(format!("{who}: out of the spread: neither address answers"));
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
                    spread.insert(format!("{who}: back in the spread: it answers again{when}"));
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
    LoadBalancing {
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
        kept_out: kept_out.into_iter().collect(),
        warnings: warnings.into_iter().collect(),
    }
}

/// ` since TIME (for DURATION)`: when a replica left the spread, recorded at
/// `since`, and how long ago that was at `now`.
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
