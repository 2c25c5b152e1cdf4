//! What a worker knows of its site's fleet rollouts (`docs/cluster.md`,
//! "Rollouts"): who holds each service's rollout slots, which nodes have
//! upgraded to which version, which versions are marked bad, which replicas
//! are registered unhealthy, as read from etcd once per plan, or why it
//! could not be read. Part of
//! [`Observed`](super::Observed) when a service of the node has
//! `upgrade.rollout`; not part of the fingerprint.

use serde::{Deserialize, Serialize};

/// The rollout keys a worker read, or why it could not.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutView {
    /// Why etcd could not be read; `None` when the rest is current.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unreachable: Option<String>,
    /// When it was read (seconds since the Unix epoch): the planner's "now"
    /// for a canary's hold.
    pub read_at: u64,
    /// Every slot held, by service and number.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub slots: Vec<RolloutSlot>,
    /// Every node done with a version, by service, version and node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub done: Vec<RolloutDone>,
    /// Every version marked bad, by service and version.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bad: Vec<RolloutBad>,
    /// Every replica registered unhealthy (`{prefix}/replicas/`), by
    /// service and address: a canary node's makes its version bad.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unhealthy: Vec<UnhealthyReplica>,
}

impl RolloutView {
    /// A view of an etcd that could not be read at `at`, saying why.
    pub fn unreachable(why: String, at: u64) -> RolloutView {
        RolloutView {
            unreachable: Some(why),
            read_at: at,
            ..RolloutView::default()
        }
    }
}

/// A rollout slot and the worker holding it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutSlot {
    /// The service.
    pub service: String,
    /// The slot's number.
    pub slot: u32,
    /// The worker holding it.
    pub node: String,
    /// The version it upgrades to.
    pub version: String,
    /// Since when (seconds since the Unix epoch).
    pub since: u64,
}

/// A node that upgraded a service to a version.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutDone {
    /// The service.
    pub service: String,
    /// The version.
    pub version: String,
    /// The node.
    pub node: String,
    /// When its upgrade finished (seconds since the Unix epoch).
    pub since: u64,
}

/// A version of a service marked bad.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutBad {
    /// The service.
    pub service: String,
    /// The version.
    pub version: String,
    /// The worker whose upgrade failed.
    pub node: String,
    /// Why.
    pub reason: String,
    /// When (seconds since the Unix epoch).
    pub since: u64,
}

/// A replica its worker registered unhealthy (from the worker's own probes).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnhealthyReplica {
    /// The service.
    pub service: String,
    /// The address it serves at.
    pub address: String,
    /// The worker it runs on.
    pub node: String,
    /// Its container's spec hash.
    pub version: String,
    /// Since when it has been registered unhealthy (seconds since the
    /// Unix epoch, the worker's clock).
    pub since: u64,
}
