//! The planner: a pure function from the spec and the observed state of a node
//! to a [`Plan`]. No I/O happens here; everything it needs is in [`Observed`].

mod fingerprint;
mod host;
mod model;
pub mod render;
pub mod saved;

use std::collections::{BTreeSet, HashMap};

pub use fingerprint::fingerprint;
pub use model::{
    Action, Change, Decision, DiffLine, Drift, FieldChange, InFlight, PLAN_FORMAT, Plan, Resource,
    Stage, StageName, Summary, Upgrade,
};

use crate::backend::nft::ruleset::{Redirect, host_table, redirects_in};
use crate::desired::{DesiredContainer, desired_node};
use crate::observe::{Container, NftTable, Observed};
use crate::ownership::{NFT_FAMILY, NFT_TABLE, Slot, container_name};
use crate::spec::{NetworkMode, Service, Spec};

/// Plans what `apply` must do so that `node` matches `spec`, given what was observed there.
pub fn plan(spec: &Spec, node: &str, observed: &Observed) -> Plan {
    let desired = desired_node(spec, node);
    let mut planner = Planner {
        observed,
        drift: Vec::new(),
        conflicts: Vec::new(),
        first: Vec::new(),
        changes: Vec::new(),
        last: Vec::new(),
    };
    let observed_table = own_table(observed);
    let redirects = host::index_redirects(observed_table.map(redirects_in).unwrap_or_default());
    let slots = slots_by_service(observed);

    for (service, container) in &desired.services {
        planner.foreign_name_conflicts(&service.name, node);
        let mine = slots
            .get(service.name.value.as_str())
            .cloned()
            .unwrap_or_default();
        match service.network {
            NetworkMode::Host => {
                let redirects = host::redirects_of(service, &redirects);
                let change = host::plan_service(
                    node,
                    service,
                    container,
                    &mine,
                    &redirects,
                    observed,
                    &mut planner.drift,
                );
                planner.changes.extend(change);
            }
            NetworkMode::Routed => planner.routed_service(node, service, container, &mine),
        }
    }
    planner.orphan_containers(
        &desired
            .services
            .iter()
            .map(|(s, _)| s.name.value.as_str())
            .collect(),
    );
    planner.host_table(observed_table, desired_table(spec, node, observed));
    planner.routing();

    let Planner {
        drift,
        conflicts,
        first,
        changes,
        last,
        ..
    } = planner;
    let mut warnings = observed.warnings.clone();
    warnings.sort();
    Plan {
        format: PLAN_FORMAT,
        node: node.to_string(),
        fingerprint: fingerprint(observed),
        drift,
        conflicts,
        changes: first.into_iter().chain(changes).chain(last).collect(),
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

/// The nftables table `node` should have, given what is observed: none when no
/// host-mode service runs there; otherwise lessnat's table, keeping the
/// redirects of upgrades in flight (their stages add and remove them).
pub fn desired_table(spec: &Spec, node: &str, observed: &Observed) -> Option<NftTable> {
    let desired = desired_node(spec, node);
    if !desired.needs_host_table() {
        return None;
    }
    let slots = slots_by_service(observed);
    let found = host::index_redirects(own_table(observed).map(redirects_in).unwrap_or_default());
    let kept: Vec<Redirect> = desired
        .services
        .iter()
        .filter(|(s, _)| s.network == NetworkMode::Host)
        .filter(|(s, _)| {
            slots
                .get(s.name.value.as_str())
                .is_some_and(|slots| slots.next.is_some())
        })
        .flat_map(|(s, _)| host::redirects_of(s, &found))
        .collect();
    Some(host_table(&kept))
}

/// The containers of each service on the node, by slot.
fn slots_by_service(observed: &Observed) -> HashMap<&str, Slots<'_>> {
    let mut all: HashMap<&str, Slots> = HashMap::new();
    for container in &observed.containers {
        let slots = all.entry(container.service.as_str()).or_default();
        let place = match container.slot {
            Slot::Primary => &mut slots.primary,
            Slot::Next => &mut slots.next,
            Slot::Prev => &mut slots.prev,
        };
        *place = Some(container);
    }
    all
}

/// The containers one service has on the node, by slot.
#[derive(Debug, Default, Clone)]
pub(crate) struct Slots<'a> {
    pub primary: Option<&'a Container>,
    pub next: Option<&'a Container>,
    pub prev: Option<&'a Container>,
}

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
    fn foreign_name_conflicts(&mut self, service: &str, node: &str) {
        for slot in Slot::ALL {
            let name = container_name(service, node, slot);
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

    /// Routed replicas: created, replaced or started. Staged routed upgrades
    /// (load-balancer map switching) come with routed mode's apply.
    fn routed_service(
        &mut self,
        node: &str,
        service: &Service,
        container: &DesiredContainer,
        mine: &Slots,
    ) {
        let hash = container.spec_hash();
        let name = container_name(&service.name, node, Slot::Primary);
        let resource = Resource::Container {
            service: service.name.value.clone(),
            slot: Slot::Primary,
            name,
        };
        match mine.primary {
            None => self.changes.push(host::create_primary(resource, container)),
            Some(found) if found.spec_hash != hash => self.changes.push(Change {
                action: Action::Replace,
                resource,
                reason: "the replica's spec changed".into(),
                fields: host::container_fields(found, container),
                diff: Vec::new(),
                upgrade: None,
            }),
            Some(found) => {
                self.changes
                    .extend(host::restart_if_stopped(found, resource, &mut self.drift))
            }
        }
    }

    fn orphan_containers(&mut self, wanted: &BTreeSet<&str>) {
        for container in &self.observed.containers {
            if wanted.contains(container.service.as_str()) {
                continue;
            }
            self.changes.push(Change {
                action: Action::Destroy,
                resource: Resource::Container {
                    service: container.service.clone(),
                    slot: container.slot,
                    name: container.name.clone(),
                },
                reason: "the service is no longer in the spec for this node".into(),
                fields: vec![FieldChange {
                    name: "image".into(),
                    old: Some(container.image.clone()),
                    new: None,
                }],
                diff: Vec::new(),
                upgrade: None,
            });
        }
    }

    fn host_table(&mut self, observed: Option<&NftTable>, desired: Option<NftTable>) {
        let resource = Resource::NftTable {
            family: NFT_FAMILY.into(),
            name: NFT_TABLE.into(),
        };
        match (desired, observed) {
            (None, None) => {}
            (Some(desired), None) => {
                if !self.observed.containers.is_empty() {
                    self.drift.push(Drift {
                        resource: resource.clone(),
                        what: "the table was deleted".into(),
                    });
                }
                self.first.push(Change {
                    action: Action::Create,
                    resource,
                    reason: "hooked nat chains keep conntrack tracking every flow; upgrades add redirects to its maps".into(),
                    fields: Vec::new(),
                    diff: host::table_diff(None, Some(&desired)),
                    upgrade: None,
                });
            }
            (Some(desired), Some(found)) if *found == desired => {}
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
                });
            }
            (None, Some(found)) => self.last.push(Change {
                action: Action::Destroy,
                resource,
                reason: "no host-mode service runs on this node".into(),
                fields: Vec::new(),
                diff: host::table_diff(Some(found), None),
                upgrade: None,
            }),
        }
    }

    /// Rules and routes in lessnat's ranges; host-mode nodes need none, and
    /// routed mode's wiring comes with its apply, so all found are removed.
    fn routing(&mut self) {
        for rule in &self.observed.routing.rules {
            self.last.push(Change {
                action: Action::Destroy,
                resource: Resource::IpRule {
                    family: rule.family.clone(),
                    priority: rule.priority,
                },
                reason: "not in the spec for this node".into(),
                fields: vec![FieldChange {
                    name: "table".into(),
                    old: Some(rule.table.to_string()),
                    new: None,
                }],
                diff: Vec::new(),
                upgrade: None,
            });
        }
        for route in &self.observed.routing.routes {
            self.last.push(Change {
                action: Action::Destroy,
                resource: Resource::Route {
                    table: route.table,
                    destination: route.destination.clone(),
                },
                reason: "not in the spec for this node".into(),
                fields: route
                    .gateway
                    .iter()
                    .map(|g| FieldChange {
                        name: "via".into(),
                        old: Some(g.clone()),
                        new: None,
                    })
                    .collect(),
                diff: Vec::new(),
                upgrade: None,
            });
        }
    }
}
