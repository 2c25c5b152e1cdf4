//! Where a load-balancer node's plan learns whether a replica address
//! answers: with the spec's `cluster:` and registrations read from etcd, from
//! the registrations (a replica registered healthy at an address answers
//! there, unless an upgrade in flight moves new connections away from that
//! address; any other address of the service does not); otherwise, and when
//! etcd could not be read, from the node's own probes, as without a cluster.
//! And the acknowledgements of upgrades in flight that such a node owes.

use std::net::IpAddr;

use super::operation::{Operation, Switch};
use super::{Action, Change, FieldChange, Resource};
use crate::cluster::handshake::SwitchAck;
use crate::desired::routed::ReplicaAddresses;
use crate::model::{ClusterView, Observed};
use crate::spec::Spec;

/// What says whether a replica address answers.
#[derive(Debug, Clone, Copy)]
pub(super) enum Answers<'a> {
    /// The replicas registered in etcd.
    Registered(&'a ClusterView),
    /// The node's own probes.
    Probed(&'a Observed),
}

impl<'a> Answers<'a> {
    /// The source for planning `spec` against `observed`, and a warning when
    /// the spec has a cluster whose registrations could not be read.
    pub(super) fn of(spec: &Spec, observed: &'a Observed) -> (Answers<'a>, Option<String>) {
        if spec.cluster.is_none() {
            return (Answers::Probed(observed), None);
        }
        match &observed.cluster {
            Some(view) if view.is_current() => (Answers::Registered(view), None),
            Some(view) => (
                Answers::Probed(observed),
                Some(format!(
                    "etcd could not be read ({}): load balancing follows this node's own probes until it can",
                    view.unreachable.as_deref().unwrap_or("no answer")
                )),
            ),
            None => (
                Answers::Probed(observed),
                Some(
                    "the registrations in etcd were not read: load balancing follows this node's own probes"
                        .to_string(),
                ),
            ),
        }
    }

    /// Why `service`'s replica is out of the spread, for people; `leaving`
    /// is the address of it an upgrade in flight leaves (see
    /// [`Answers::leaving`]).
    pub(super) fn silent(&self, service: &str, leaving: Option<IpAddr>) -> String {
        match (self, leaving) {
            (Answers::Registered(_), Some(from)) if self.at(service, from) == Some(true) => {
                format!(
                    "registered healthy only at {from}, which an upgrade in flight is moving away from"
                )
            }
            (Answers::Registered(_), _) => "not registered healthy at either address".to_string(),
            (Answers::Probed(_), _) => "neither address answers".to_string(),
        }
    }

    /// By the registrations: the address of `service`'s replica at `pair`
    /// that an upgrade in flight moves new connections away from. Its
    /// worker published its ready (or promoted) next version, drains this
    /// address and removes it next: new connections must not go (back)
    /// there, even when the next version's registration flips meanwhile (a
    /// rollback withdraws the upgrade first).
    pub(super) fn leaving(&self, service: &str, pair: ReplicaAddresses) -> Option<IpAddr> {
        let Answers::Registered(view) = self else {
            return None;
        };
        view.upgrades.iter().find_map(|u| {
            let (from, to) = (u.from.parse().ok()?, u.to.parse().ok()?);
            (u.service == service && pair.contains(from) && pair.contains(to)).then_some(from)
        })
    }

    /// How a canary's promotion reaches this node, for people (the canary
    /// holds new connections at `at`).
    pub(super) fn promotion(&self, at: IpAddr) -> String {
        match self {
            Answers::Registered(_) => "the worker publishes its upgrade in etcd".to_string(),
            Answers::Probed(_) => format!("{at} stops answering this node's probes"),
        }
    }

    /// Why new connections left a promoted canary's old address, for people.
    pub(super) fn promoted(&self) -> &'static str {
        match self {
            Answers::Registered(_) => {
                "the canary was promoted: the worker published its upgrade in etcd"
            }
            Answers::Probed(_) => {
                "the canary was promoted: the old version stopped answering and the next one answers there"
            }
        }
    }

    /// Why a replica is back in the spread, for people.
    pub(super) fn back(&self) -> &'static str {
        match self {
            Answers::Registered(_) => "registered healthy again",
            Answers::Probed(_) => "it answers again",
        }
    }

    /// Whether `service`'s replica answers at `address`; `None` when nothing
    /// says (not probed).
    pub(super) fn at(&self, service: &str, address: IpAddr) -> Option<bool> {
        let address = address.to_string();
        match self {
            Answers::Registered(view) => Some(
                view.replicas
                    .iter()
                    .any(|r| r.service == service && r.address == address && r.healthy),
            ),
            Answers::Probed(observed) => observed
                .probes
                .iter()
                .find(|p| p.service == service && p.address == address)
                .map(|p| p.healthy),
        }
    }
}

/// Where a load-balancer node's planned table sends one replica's new
/// connections: the service, the replica's two addresses, the one chosen.
pub(super) struct Sends<'a> {
    /// The service.
    pub service: &'a str,
    /// The replica's addresses.
    pub pair: ReplicaAddresses,
    /// Where its new connections go.
    pub to: IpAddr,
}

/// With the spec's `cluster:` and a current view, on load-balancer node
/// `balancer`: an acknowledgement of every upgrade in flight whose switch
/// the planned table makes (`sends`: new connections go to its `to`, where
/// its version is registered healthy) and whose acknowledgement from this
/// node is missing or of another address or version; on any run, not only
/// the one that switches. `switches` acknowledge theirs already.
pub(super) fn owed_acknowledgements(
    spec: &Spec,
    balancer: &str,
    source: &Answers,
    sends: &[Sends],
    switches: &[Switch],
) -> Vec<Change> {
    let (Some(cluster), Answers::Registered(view)) = (spec.cluster.as_ref(), source) else {
        return Vec::new();
    };
    let mut owed = Vec::new();
    for upgrade in &view.upgrades {
        let (Ok(from), Ok(to)) = (upgrade.from.parse::<IpAddr>(), upgrade.to.parse::<IpAddr>())
        else {
            continue;
        };
        let switched = sends.iter().any(|s| {
            s.service == upgrade.service
                && s.pair.contains(from)
                && s.pair.contains(to)
                && s.to == to
        });
        let registered = view.replicas.iter().any(|r| {
            r.service == upgrade.service
                && r.address == upgrade.to
                && r.healthy
                && r.version == upgrade.version
        });
        let by_switch = switches.iter().any(|s| {
            s.service == upgrade.service && s.from == from && s.to == to && s.ack.is_some()
        });
        let found = view
            .acks
            .iter()
            .find(|a| a.service == upgrade.service && a.from == upgrade.from && a.node == balancer);
        let current = found.is_some_and(|a| a.to == upgrade.to && a.version == upgrade.version);
        if !switched || !registered || by_switch || current {
            continue;
        }
        let why = match found {
            None => "this node's acknowledgement is missing".to_string(),
            Some(a) => format!(
                "this node's acknowledgement is of {} at {}",
                a.to, a.version
            ),
        };
        let field = |name: &str, old: Option<&String>, new: &String| {
            (old != Some(new)).then(|| FieldChange {
                name: name.into(),
                old: old.map(|o| o.clone().into()),
                new: Some(new.clone().into()),
            })
        };
        owed.push(Change {
            action: Action::Create,
            resource: Resource::Acknowledgement {
                service: upgrade.service.clone(),
                from: upgrade.from.clone(),
                node: balancer.to_string(),
            },
            reason: format!(
                "{}'s upgrade in flight on {} waits for it: this node sends new connections to {to} instead of {from}, and {why}",
                upgrade.service, upgrade.node
            ),
            fields: [
                field("to", found.map(|a| &a.to), &upgrade.to),
                field("version", found.map(|a| &a.version), &upgrade.version),
            ]
            .into_iter()
            .flatten()
            .collect(),
            diff: Vec::new(),
            upgrade: None,
            operation: Operation::Acknowledge {
                service: upgrade.service.clone(),
                worker: upgrade.node.clone(),
                from,
                to,
                ack: SwitchAck {
                    etcd: cluster.etcd.value.clone(),
                    node: balancer.to_string(),
                    version: upgrade.version.clone(),
                },
            },
        });
    }
    owed
}
