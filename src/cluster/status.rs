//! `lessnat status --cluster`: the site as etcd holds it now — every
//! registered node (roles, commit, agent version, its lease's age and time
//! left) with its replicas and their health, and the keys of upgrades in
//! flight and rollout slots (`{prefix}/upgrades/`, `{prefix}/rollouts/`).
//! One read of the whole prefix and one lease look-up per node, each within
//! the backend's timeouts.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::backend::etcd::{Etcd, EtcdError};
use crate::spec::Cluster;

use super::config::{etcd_config, keys};
use super::keys::{NodeRecord, ReplicaRecord};
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
    /// Upgrades in flight (`{prefix}/upgrades/…`), as stored.
    pub upgrades: Vec<RawKey>,
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

/// A key shown as stored (JSON when it parses, else text).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RawKey {
    /// The key below the prefix.
    pub key: String,
    /// The value.
    pub value: serde_json::Value,
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
        for entry in &snapshot.entries {
            let below = entry.key.strip_prefix(&prefix).unwrap_or(&entry.key);
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
            } else if below.starts_with("upgrades/") {
                upgrades.push(raw(below, &entry.value));
            }
        }
        let now = now();
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

fn raw(key: &str, value: &[u8]) -> RawKey {
    RawKey {
        key: key.to_string(),
        value: serde_json::from_slice(value)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(value).into())),
    }
}
