//! The planner: a pure function from the spec and the observed state of a node
//! to a [`Plan`]. No I/O happens here; everything it needs is in [`Observed`].

mod cluster;
mod fingerprint;
mod host;
mod model;
pub mod operation;
mod pull;
pub mod render;
pub mod rollout;
mod routed;
pub mod saved;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

pub use fingerprint::fingerprint;
pub use model::{
    Action, Change, Decision, DiffLine, Drift, FieldChange, FieldValue, InFlight, PLAN_FORMAT,
    Plan, Resource, Stage, StageName, Summary, Upgrade,
};

use crate::desired::desired_node;
use crate::desired::host_table::{
    add_canary, canary_comments, canary_rules_in, empty_table, host_table, redirects_in,
};
use crate::desired::routed::{
    desired_addresses, desired_routing, desired_sysctls, load_balancer_role, worker_role,
};
use crate::desired::routed_table::{WorkerRules, add_canary_chain, add_load_balancer, add_worker};
use crate::model::Redirect;
use crate::model::{Container, NftTable, Observed};
use crate::ownership::{NFT_FAMILY, NFT_TABLE, Slot, parse_container_name, replica_container_name};
use crate::spec::{HumanDuration, NetworkMode, Service, Spec};

use operation::{Operation, Switch, Unanswered};

/// What a load-balancer node's table write moves besides the table: the
/// replicas it switches, and the unanswered connections to the replicas it
/// leaves out of a spread.
struct Moves {
    switches: Vec<Switch>,
    unanswered: Vec<Unanswered>,
}

/// Plans what `apply` must do so that `node` matches `spec`, given what was observed there.
pub fn plan(spec: &Spec, node: &str, observed: &Observed) -> Plan {
    let mut desired = desired_node(spec, node);
    pull::pin_digests(&mut desired, observed);
    let mut planner = Planner {
        observed,
        drift: Vec::new(),
        conflicts: Vec::new(),
        first: Vec::new(),
        changes: Vec::new(),
        last: Vec::new(),
    };
    let observed_table = own_table(observed);
    let wanted_table = desired_table(spec, node, observed);
    let redirects = host::index_redirects(observed_table.map(redirects_in).unwrap_or_default());
    let slots = slots_by_service(observed);
    let shared = Arc::new(wanted_table.clone().unwrap_or_else(|| host_table(&[])));
    let shared_redirects: HashSet<Redirect> = redirects_in(&shared).into_iter().collect();

    for (service, container) in &desired.services {
        let replica = container.replica_number();
        planner.foreign_name_conflicts(&service.name, node, replica);
        let mine = slots
            .get(&(service.name.value.as_str(), replica))
            .cloned()
            .unwrap_or_default();
        match service.network {
            NetworkMode::Host => {
                let found = host::redirects_of(service, &redirects);
                let split = observed_table
                    .is_some_and(|t| !canary_rules_in(t, &canary_comments(service)).is_empty());
                let table = host::ServiceTable {
                    found: &found,
                    shared: &shared,
                    shared_redirects: &shared_redirects,
                    split,
                };
                let change = host::plan_service(
                    node,
                    service,
                    container,
                    &mine,
                    &table,
                    observed,
                    &mut planner.drift,
                );
                planner.changes.extend(change);
            }
            NetworkMode::Routed => planner.changes.extend(routed::plan_replica(
                spec,
                node,
                service,
                container,
                &mine,
                observed,
                &mut planner.drift,
            )),
        }
    }
    let (changes, gated) =
        rollout::gate(spec, node, observed, std::mem::take(&mut planner.changes));
    planner.changes = routed::batch_upgrades(node, changes);
    rollout::mark_last(&mut planner.changes);
    routed::attach_canaries(
        &mut planner.changes,
        spec,
        wanted_table.as_ref(),
        observed_table,
    );
    planner.changes.extend(routed::stale_veths(observed));
    planner.orphan_containers(
        &desired
            .services
            .iter()
            .map(|(s, c)| (s.name.value.as_str(), c.replica_number()))
            .collect(),
    );
    let balancing = load_balancer_role(spec, node)
        .map(|role| routed::load_balancing(spec, node, &role, observed));
    let (switches, spread, unanswered, kept_out, balancing_warnings, acknowledgements) = balancing
        .map(|b| {
            (
                b.switches,
                b.spread,
                b.unanswered,
                b.kept_out,
                b.warnings,
                b.acknowledgements,
            )
        })
        .unwrap_or_default();
    planner.table(
        observed_table,
        wanted_table,
        Moves {
            switches,
            unanswered,
        },
        &spread,
    );
    // After the table: what they acknowledge is what it sends.
    planner.first.extend(acknowledgements);
    let routing = desired_routing(spec, node);
    let wiring = routed::plan_wiring(
        &routing.rules,
        &routing.routes,
        &desired_addresses(spec, node),
        &desired_sysctls(spec, node),
        observed,
    );
    // Once lessnat has set this node up, anything of its wiring missing or
    // different was changed by someone else.
    let set_up = observed_table.is_some() || !observed.containers.is_empty();
    if set_up {
        planner
            .drift
            .extend(wiring.first.iter().map(|change| Drift {
                resource: change.resource.clone(),
                what: match change.action {
                    Action::Create => "missing".into(),
                    _ => "changed".into(),
                },
            }));
    }
    planner.first.splice(0..0, wiring.first);
    planner.last.extend(wiring.last);

    let Planner {
        drift,
        conflicts,
        first,
        changes,
        last,
        ..
    } = planner;
    let mut warnings = observed.warnings.clone();
    warnings.extend(balancing_warnings);
    warnings.extend(gated.warnings);
    warnings.sort();
    let pulls = pull::pulls(&changes, observed);
    Plan {
        format: PLAN_FORMAT,
        node: node.to_string(),
        fingerprint: fingerprint(observed),
        drift,
        conflicts,
        changes: pulls
            .into_iter()
            .chain(first)
            .chain(changes)
            .chain(last)
            .collect(),
        load_balancing: kept_out,
        rollouts: gated.lines,
        warnings,
    }
}

/// lessnat's table as observed, if present.
fn own_table(observed: &Observed) -> Option<&NftTable> {
    observed
        .nft
        .tables
        .iter()
        .find(|t| t.family == NFT_FAMILY && t.name == NFT_TABLE)
}

/// The nftables table `node` should have, given what is observed: none when
/// it runs no host-mode service and has no routed role. Host mode's part keeps
/// the redirects of upgrades in flight (their stages add and remove them); a
/// load-balancer node's part sends new connections where
/// [`routed::load_balancing`] decides from the probes.
pub fn desired_table(spec: &Spec, node: &str, observed: &Observed) -> Option<NftTable> {
    let desired = desired_node(spec, node);
    let balancer = load_balancer_role(spec, node);
    let worker = worker_role(spec, node);
    if !desired.needs_host_table() && balancer.is_none() && worker.is_none() {
        return None;
    }
    let found = own_table(observed);
    let mut table = if desired.needs_host_table() {
        let slots = slots_by_service(observed);
        let redirects = host::index_redirects(found.map(redirects_in).unwrap_or_default());
        let in_flight: Vec<&Service> = desired
            .services
            .iter()
            .map(|(s, _)| *s)
            .filter(|s| s.network == NetworkMode::Host)
            .filter(|s| {
                slots
                    .get(&(s.name.value.as_str(), 1))
                    .is_some_and(|slots| slots.next.is_some())
            })
            .collect();
        let kept: Vec<Redirect> = in_flight
            .iter()
            .flat_map(|s| host::redirects_of(s, &redirects))
            .collect();
        let mut table = host_table(&kept);
        // A canary holding keeps its split until its upgrade ends it.
        for service in &in_flight {
            let comments = canary_comments(service);
            add_canary(
                &mut table,
                &found
                    .map(|t| canary_rules_in(t, &comments))
                    .unwrap_or_default(),
            );
        }
        table
    } else {
        empty_table()
    };
    if let Some(role) = &balancer {
        let balancing = routed::load_balancing(spec, node, role, observed);
        add_load_balancer(&mut table, &balancing.rules);
    }
    if let Some(worker) = &worker {
        add_worker(
            &mut table,
            &WorkerRules {
                subnets: worker.subnets.clone(),
                lb_ids: worker.lb_ids(),
            },
        );
        if routed::canary_chain_needed(spec, node) {
            add_canary_chain(&mut table);
            let kept = found
                .map(|t| routed::kept_canary_rules(spec, observed, t))
                .unwrap_or_default();
            add_canary(&mut table, &kept);
        }
    }
    Some(table)
}

/// The containers of each service on the node (of each routed replica:
/// service and replica number), by slot.
fn slots_by_service(observed: &Observed) -> HashMap<(&str, u32), Slots<'_>> {
    let mut all: HashMap<(&str, u32), Slots> = HashMap::new();
    for container in &observed.containers {
        let slots = all
            .entry((container.service.as_str(), replica_number(container)))
            .or_default();
        let place = match container.slot {
            Slot::Primary => &mut slots.primary,
            Slot::Next => &mut slots.next,
            Slot::Prev => &mut slots.prev,
        };
        *place = Some(container);
    }
    all
}

/// The routed replica number a container's name carries (1 when none).
fn replica_number(container: &Container) -> u32 {
    parse_container_name(&container.name).map_or(1, |name| name.replica)
}

/// The containers one service has on the node, by slot.
#[derive(Debug, Default, Clone)]
pub(crate) struct Slots<'a> {
    pub primary: Option<&'a Container>,
    pub next: Option<&'a Container>,
    pub prev: Option<&'a Container>,
}

/// How long a container whose service left the spec gets to stop when it
/// carries no recorded `stopTimeout` (made by an older lessnat): Docker's default.
const UNRECORDED_STOP_TIMEOUT: HumanDuration = HumanDuration::secs(10);

struct Planner<'a> {
    observed: &'a Observed,
    drift: Vec<Drift>,
    conflicts: Vec<String>,
    /// Changes that must come before services start (the nft table: conntrack must be tracking first).
    first: Vec<Change>,
    changes: Vec<Change>,
    /// Changes that come after services are gone (table removal).
    last: Vec<Change>,
}

impl<'a> Planner<'a> {
    fn foreign_name_conflicts(&mut self, service: &str, node: &str, replica: u32) {
        for slot in Slot::ALL {
            let name = replica_container_name(service, node, replica, slot);
            if self
                .observed
                .foreign_containers
                .iter()
                .any(|f| f.name == name)
            {
                self.conflicts.push(format!(
                    "container \"{name}\" exists but is not lessnat's (it has no io.lessnat.service label); \
                     lessnat will not touch it: rename or remove it before apply"
                ));
            }
        }
    }

    fn orphan_containers(&mut self, wanted: &BTreeSet<(&str, u32)>) {
        for container in &self.observed.containers {
            let replica = replica_number(container);
            if wanted.contains(&(container.service.as_str(), replica)) {
                continue;
            }
            let reason = if wanted.iter().any(|(s, _)| *s == container.service) {
                "the spec runs fewer replicas of the service on this node"
            } else {
                "the service is no longer in the spec for this node"
            };
            self.changes.push(Change {
                action: Action::Destroy,
                resource: Resource::Container {
                    service: container.service.clone(),
                    slot: container.slot,
                    name: container.name.clone(),
                },
                reason: reason.into(),
                fields: vec![FieldChange {
                    name: "image".into(),
                    old: Some(container.image.clone().into()),
                    new: None,
                }],
                diff: Vec::new(),
                upgrade: None,
                operation: Operation::RemoveContainer {
                    name: container.name.clone(),
                    stop_timeout: container.stop_timeout.unwrap_or(UNRECORDED_STOP_TIMEOUT),
                },
            });
        }
    }

    fn table(
        &mut self,
        observed: Option<&NftTable>,
        desired: Option<NftTable>,
        moves: Moves,
        spread: &[String],
    ) {
        let Moves {
            switches,
            unanswered,
        } = moves;
        let balancing: Vec<String> = switches
            .iter()
            .map(ToString::to_string)
            .chain(spread.iter().cloned())
            .collect();
        let resource = Resource::NftTable {
            family: NFT_FAMILY.into(),
            name: NFT_TABLE.into(),
        };
        match (desired, observed) {
            (None, None) => {}
            (Some(desired), None) => {
                let diff = host::table_diff(None, Some(&desired));
                if !self.observed.containers.is_empty() {
                    self.drift.push(Drift {
                        resource: resource.clone(),
                        what: "the table was deleted".into(),
                    });
                }
                self.first.push(Change {
                    action: Action::Create,
                    resource,
                    reason: if !balancing.is_empty() {
                        format!(
                            "routed mode: load balancing without SNAT, replies marked by load-balancer; {}",
                            balancing.join("; ")
                        )
                    } else if desired.chains.iter().any(|c| c.name.starts_with("routed_")) {
                        "routed mode: load balancing without SNAT, replies marked by load-balancer".into()
                    } else {
                        "hooked nat chains keep conntrack tracking every flow; upgrades add redirects to its maps".into()
                    },
                    fields: Vec::new(),
                    diff,
                    upgrade: None,
                    operation: Operation::WriteTable {
                        table: desired,
                        switches,
                        unanswered,
                    },
                });
            }
            (Some(desired), Some(found)) if *found == desired => {}
            (Some(desired), Some(found)) if !balancing.is_empty() => {
                self.first.push(Change {
                    action: Action::Update,
                    resource,
                    reason: format!("load balancing: {}", balancing.join("; ")),
                    fields: Vec::new(),
                    diff: host::table_diff(Some(found), Some(&desired)),
                    upgrade: None,
                    operation: Operation::WriteTable {
                        table: desired,
                        switches,
                        unanswered,
                    },
                });
            }
            (Some(desired), Some(found)) => {
                self.drift.push(Drift {
                    resource: resource.clone(),
                    what: "rules, chains or maps were changed".into(),
                });
                self.first.push(Change {
                    action: Action::Update,
                    resource,
                    reason: "restore lessnat's table (one nft transaction)".into(),
                    fields: Vec::new(),
                    diff: host::table_diff(Some(found), Some(&desired)),
                    upgrade: None,
                    operation: Operation::WriteTable {
                        table: desired,
                        switches,
                        unanswered,
                    },
                });
            }
            (None, Some(found)) => self.last.push(Change {
                action: Action::Destroy,
                resource,
                reason: "no host-mode service or routed role on this node".into(),
                fields: Vec::new(),
                diff: host::table_diff(Some(found), None),
                upgrade: None,
                operation: Operation::DeleteTable,
            }),
        }
    }
}
