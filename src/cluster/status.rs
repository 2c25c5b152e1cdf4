//! `lessnat status --cluster`: the site as etcd holds it now — every
//! registered node (roles, commit, agent version, its lease's age and time
//! left) with its replicas and their health, the upgrades in flight with
//! the live load-balancer nodes that acknowledged them and those still to
//! (`{prefix}/upgrades/`, `{prefix}/acks/`), and each service's fleet
//! rollout: slot holders, nodes done per version, versions marked bad
//! (`{prefix}/rollouts/`).
//! One read of the whole prefix and one lease look-up per node, each within
//! the backend's timeouts.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::backend::etcd::{Etcd, EtcdError};
use crate::spec::Cluster;

use super::config::{etcd_config, keys};
use super::keys::{AckRecord, Keys, NodeRecord, ReplicaRecord, Role, UpgradeRecord};
use super::rollout::{ServiceRollout, by_service, view_of};
use super::view::now;

/// The site as etcd holds it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClusterStatus {
    /// The key prefix read.
    pub prefix: String,
    /// The revision read.
    pub revision: i64,
    /// Every registered node, by name.
    pub nodes: Vec<NodeStatus>,
    /// Replicas registered by a node whose own record is missing.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub orphans: Vec<ReplicaStatus>,
    /// Upgrades in flight (`{prefix}/upgrades/…`) and their acknowledgements.
    pub upgrades: Vec<UpgradeStatus>,
    /// Fleet rollouts (`{prefix}/rollouts/…`), by service: who holds the
    /// slots, who is done with which version, which versions are bad.
    pub rollouts: Vec<ServiceRollout>,
}

/// One registered node.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeStatus {
    /// The node.
    pub name: String,
    /// What it registered.
    #[serde(flatten)]
    pub record: NodeRecord,
    /// Its lease (hex).
    pub lease: String,
    /// Seconds since it registered under this lease.
    pub lease_age_seconds: u64,
    /// Seconds the lease has left (renewed by the agent every third of its TTL).
    pub ttl_left_seconds: Option<u64>,
    /// The lease's TTL in seconds.
    pub ttl_seconds: Option<u64>,
    /// Its replicas.
    pub replicas: Vec<ReplicaStatus>,
}

/// One registered replica.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplicaStatus {
    /// The service.
    pub service: String,
    /// The address it serves at.
    pub address: String,
    /// What its worker registered.
    #[serde(flatten)]
    pub record: ReplicaRecord,
}

/// A worker's routed upgrade in flight and where its handshake stands.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UpgradeStatus {
    /// The service.
    pub service: String,
    /// The upgrading worker.
    pub worker: String,
    /// The replica's old address.
    pub from: String,
    /// The next version's address.
    pub to: String,
    /// The next version (its container's spec hash).
    pub version: String,
    /// When it was published (seconds since the Unix epoch).
    pub since: u64,
    /// Live load-balancer nodes that acknowledged this switch (its `to` and `version`).
    pub acknowledged: Vec<String>,
    /// Live load-balancer nodes still to acknowledge it (none, or another
    /// address or version, acknowledged).
    pub pending: Vec<String>,
}

impl ClusterStatus {
    /// Reads the site of `cluster` from etcd.
    pub fn read(cluster: &Cluster) -> Result<ClusterStatus, EtcdError> {
        let etcd = Etcd::connect(&etcd_config(&cluster.etcd))?;
        let keys = keys(&cluster.etcd);
        let prefix = format!("{}/", keys.prefix());
        let snapshot = etcd.get_prefix(&prefix)?;
        let mut nodes = BTreeMap::new();
        let mut replicas: Vec<ReplicaStatus> = Vec::new();
        let mut upgrades = Vec::new();
        let mut acks = Vec::new();
        for entry in &snapshot.entries {
            if let Some(node) = keys.node_of(&entry.key) {
                if let Ok(record) = serde_json::from_slice::<NodeRecord>(&entry.value) {
                    nodes.insert(node.to_string(), (record, entry.lease));
                }
            } else if let Some((service, address)) = keys.replica_of(&entry.key) {
                if let Ok(record) = serde_json::from_slice::<ReplicaRecord>(&entry.value) {
                    replicas.push(ReplicaStatus {
                        service: service.to_string(),
                        address: address.to_string(),
                        record,
                    });
                }
            } else if let Some((service, from)) = keys.upgrade_of(&entry.key) {
                if let Ok(record) = serde_json::from_slice::<UpgradeRecord>(&entry.value) {
                    upgrades.push((service.to_string(), from.to_string(), record));
                }
            } else if keys.ack_of(&entry.key).is_some()
                && let Ok(record) = serde_json::from_slice::<AckRecord>(&entry.value)
            {
                acks.push((entry.key.clone(), record));
            }
        }
        let now = now();
        let balancers: Vec<&str> = nodes
            .iter()
            .filter(|(_, (record, _))| record.roles.contains(&Role::LoadBalancer))
            .map(|(name, _)| name.as_str())
            .collect();
        let upgrades = upgrades
            .into_iter()
            .map(|(service, from, record)| {
                handshake(&keys, &balancers, &acks, service, from, record)
            })
            .collect();
        let mut listed = BTreeSet::new();
        let mut statuses = Vec::new();
        for (name, (record, lease)) in nodes {
            let ttl = etcd.lease_left(lease)?;
            let mine: Vec<ReplicaStatus> = replicas
                .iter()
                .filter(|r| r.record.node == name)
                .cloned()
                .collect();
            listed.insert(name.clone());
            statuses.push(NodeStatus {
                lease: format!("{lease:x}"),
                lease_age_seconds: now.saturating_sub(record.since),
                ttl_left_seconds: ttl.map(|(left, _)| left.as_secs()),
                ttl_seconds: ttl.map(|(_, granted)| granted.as_secs()),
                name,
                record,
                replicas: mine,
            });
        }
        let orphans = replicas
            .into_iter()
            .filter(|r| !listed.contains(&r.record.node))
            .collect();
        Ok(ClusterStatus {
            prefix: keys.prefix().to_string(),
            revision: snapshot.revision,
            nodes: statuses,
            orphans,
            upgrades,
            rollouts: by_service(&view_of(&keys, &snapshot, now)),
        })
    }
}

/// The upgrade of `service`'s replica at `from` and where its handshake
/// stands with the live `balancers`, from the acknowledgements (`acks`, by key).
fn handshake(
    keys: &Keys,
    balancers: &[&str],
    acks: &[(String, AckRecord)],
    service: String,
    from: String,
    record: UpgradeRecord,
) -> UpgradeStatus {
    let (acknowledged, pending) = balancers.iter().partition::<Vec<&str>, _>(|node| {
        let key = keys.ack(&service, &from, node);
        acks.iter()
            .any(|(k, ack)| *k == key && ack.to == record.to && ack.version == record.version)
    });
    let names = |list: Vec<&str>| list.into_iter().map(str::to_string).collect();
    UpgradeStatus {
        service,
        worker: record.node,
        from,
        to: record.to,
        version: record.version,
        since: record.since,
        acknowledged: names(acknowledged),
        pending: names(pending),
    }
}
