//! Where a load-balancer node's plan learns whether a replica address
//! answers: with the spec's `cluster:` and registrations read from etcd, from
//! the registrations (a replica registered healthy at an address answers
//! there; any other address of the service does not); otherwise, and when
//! etcd could not be read, from the node's own probes, as without a cluster.

use std::net::IpAddr;

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

    /// Why a replica is out of the spread, for people.
    pub(super) fn silent(&self) -> &'static str {
        match self {
            Answers::Registered(_) => "not registered healthy at either address",
            Answers::Probed(_) => "neither address answers",
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
