//! What a node knows of its etcd cluster (`docs/cluster.md`): the replicas
//! registered there when it last read, or why it could not read. Part of
//! [`Observed`](super::Observed) when the spec has `cluster:`; not part of
//! the fingerprint (registrations come and go like probe results).

use serde::{Deserialize, Serialize};

/// The registrations a node read from etcd, or why it could not.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterView {
    /// Why etcd could not be read; `None` when the registrations are current.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unreachable: Option<String>,
    /// Since when it has been unreachable (seconds since the Unix epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unreachable_since: Option<u64>,
    /// The etcd revision the registrations are at.
    #[serde(default)]
    pub revision: i64,
    /// Every registered replica, by service and address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<Registration>,
    /// Routed upgrades in flight (`{prefix}/upgrades/`), by service and old address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upgrades: Vec<UpgradeInFlight>,
    /// Load-balancer nodes' acknowledgements of their switches
    /// (`{prefix}/acks/`), by service, old address and node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub acks: Vec<Acknowledgement>,
}

impl ClusterView {
    /// A view of an etcd that could not be read, saying why and since when.
    pub fn unreachable(why: String, since: u64) -> ClusterView {
        ClusterView {
            unreachable: Some(why),
            unreachable_since: Some(since),
            ..ClusterView::default()
        }
    }

    /// Whether the registrations are current (etcd was read).
    pub fn is_current(&self) -> bool {
        self.unreachable.is_none()
    }
}

/// One replica registered by its worker.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    /// The service.
    pub service: String,
    /// The address it serves at.
    pub address: String,
    /// The worker it runs on.
    pub node: String,
    /// Its number among the service's replicas on that node.
    pub replica: u32,
    /// The container's spec hash.
    pub version: String,
    /// Whether it is the next version of an upgrade (else the primary).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub next: bool,
    /// Whether the worker's own health check passes.
    pub healthy: bool,
}

/// A worker's routed upgrade whose next version is ready, as published.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpgradeInFlight {
    /// The service.
    pub service: String,
    /// The replica's old address: new connections leave it.
    pub from: String,
    /// The worker.
    pub node: String,
    /// The next version's address: new connections go there.
    pub to: String,
    /// The next version: its container's spec hash.
    pub version: String,
    /// When it was published (seconds since the Unix epoch).
    pub since: u64,
}

/// A load-balancer node's acknowledgement that its table sends a replica's
/// new connections to `to`, at `version`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Acknowledgement {
    /// The service.
    pub service: String,
    /// The replica's old address.
    pub from: String,
    /// The load-balancer node.
    pub node: String,
    /// Where its new connections go.
    pub to: String,
    /// The version registered at `to` when its table was planned.
    pub version: String,
}
