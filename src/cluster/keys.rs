//! The key layout in etcd and the JSON values stored there, in one place
//! (`docs/cluster.md`, "Keys"). Every key lives under the spec's
//! `cluster.etcd.prefix` (default `/lessnat`):
//!
//! | key | value | written by | lease |
//! | --- | --- | --- | --- |
//! | `{prefix}/nodes/{node}` | [`NodeRecord`] | every node's agent | the node's |
//! | `{prefix}/replicas/{service}/{address}` | [`ReplicaRecord`] | the worker running it | the node's |
//! | `{prefix}/upgrades/{service}/{from}` | [`UpgradeRecord`] | the upgrading worker's apply | its own |
//! | `{prefix}/acks/{service}/{from}/{node}` | [`AckRecord`] | load-balancer node `node`'s apply | none (the worker deletes them) |
//! | `{prefix}/rollouts/{service}/slots/{n}` | [`SlotRecord`] | the upgrading worker's apply (`n` < `rollout.maxParallel`) | its own |
//! | `{prefix}/rollouts/{service}/{version}/done/{node}` | [`DoneRecord`] | worker `node`'s apply, once upgraded | none |
//! | `{prefix}/rollouts/{service}/{version}/bad` | [`BadRecord`] | the apply whose upgrade to `version` failed | none |
//!
//! Nothing else is written under the prefix.

use serde::{Deserialize, Serialize};

/// Where a site's keys live: its prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// The keys under `prefix` (no trailing `/`).
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.trim_end_matches('/').to_string(),
        }
    }

    /// The site's prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Where every node registers: `{prefix}/nodes/`.
    pub fn nodes(&self) -> String {
        format!("{}/nodes/", self.prefix)
    }

    /// Node `node`'s registration.
    pub fn node(&self, node: &str) -> String {
        format!("{}{node}", self.nodes())
    }

    /// Where every replica registers: `{prefix}/replicas/`.
    pub fn replicas(&self) -> String {
        format!("{}/replicas/", self.prefix)
    }

    /// The registration of `service`'s replica serving at `address`.
    pub fn replica(&self, service: &str, address: &str) -> String {
        format!("{}{service}/{address}", self.replicas())
    }

    /// The node a key of [`Keys::node`] names.
    pub fn node_of<'k>(&self, key: &'k str) -> Option<&'k str> {
        let node = key.strip_prefix(&self.nodes())?;
        (!node.is_empty() && !node.contains('/')).then_some(node)
    }

    /// The service and address a key of [`Keys::replica`] names.
    pub fn replica_of<'k>(&self, key: &'k str) -> Option<(&'k str, &'k str)> {
        let rest = key.strip_prefix(&self.replicas())?;
        let (service, address) = rest.split_once('/')?;
        (!service.is_empty() && !address.is_empty() && !address.contains('/'))
            .then_some((service, address))
    }

    // The upgrade handshake (`docs/cluster.md`, "Upgrade handshake").

    /// Where workers publish their upgrades in flight: `{prefix}/upgrades/`.
    pub fn upgrades(&self) -> String {
        format!("{}/upgrades/", self.prefix)
    }

    /// The upgrade of `service`'s replica serving at `from` (its old address).
    pub fn upgrade(&self, service: &str, from: &str) -> String {
        format!("{}{service}/{from}", self.upgrades())
    }

    /// Where load-balancer nodes acknowledge switches: `{prefix}/acks/`.
    pub fn acks(&self) -> String {
        format!("{}/acks/", self.prefix)
    }

    /// Every acknowledgement of a switch of `service`'s replica away from `from`.
    pub fn acks_of(&self, service: &str, from: &str) -> String {
        format!("{}{service}/{from}/", self.acks())
    }

    /// Load-balancer node `node`'s acknowledgement of a switch of
    /// `service`'s replica away from `from`.
    pub fn ack(&self, service: &str, from: &str, node: &str) -> String {
        format!("{}{node}", self.acks_of(service, from))
    }

    /// The service and old address a key of [`Keys::upgrade`] names.
    pub fn upgrade_of<'k>(&self, key: &'k str) -> Option<(&'k str, &'k str)> {
        let rest = key.strip_prefix(&self.upgrades())?;
        let (service, from) = rest.split_once('/')?;
        (!service.is_empty() && !from.is_empty() && !from.contains('/')).then_some((service, from))
    }

    /// The service, old address and load-balancer node a key of
    /// [`Keys::ack`] names.
    pub fn ack_of<'k>(&self, key: &'k str) -> Option<(&'k str, &'k str, &'k str)> {
        let rest = key.strip_prefix(&self.acks())?;
        let mut parts = rest.split('/');
        let (service, from, node) = (parts.next()?, parts.next()?, parts.next()?);
        let named = [service, from, node].iter().all(|p| !p.is_empty());
        (named && parts.next().is_none()).then_some((service, from, node))
    }

    // Fleet rollouts (`docs/cluster.md`, "Rollouts").

    /// Where every rollout lives: `{prefix}/rollouts/`.
    pub fn rollouts(&self) -> String {
        format!("{}/rollouts/", self.prefix)
    }

    /// Every rollout key of `service`: `{prefix}/rollouts/{service}/`.
    pub fn rollout(&self, service: &str) -> String {
        format!("{}{service}/", self.rollouts())
    }

    /// `service`'s rollout slots: `{prefix}/rollouts/{service}/slots/`.
    pub fn rollout_slots(&self, service: &str) -> String {
        format!("{}slots/", self.rollout(service))
    }

    /// `service`'s rollout slot `n`.
    pub fn rollout_slot(&self, service: &str, n: u32) -> String {
        format!("{}{n}", self.rollout_slots(service))
    }

    /// Every node that has upgraded `service` to `version`:
    /// `{prefix}/rollouts/{service}/{version}/done/`.
    pub fn rollout_done_nodes(&self, service: &str, version: &str) -> String {
        format!("{}{version}/done/", self.rollout(service))
    }

    /// Node `node` has upgraded `service` to `version`.
    pub fn rollout_done(&self, service: &str, version: &str, node: &str) -> String {
        format!("{}{node}", self.rollout_done_nodes(service, version))
    }

    /// `service`'s `version` is marked bad.
    pub fn rollout_bad(&self, service: &str, version: &str) -> String {
        format!("{}{version}/bad", self.rollout(service))
    }

    /// What a key under [`Keys::rollouts`] names.
    pub fn rollout_of<'k>(&self, key: &'k str) -> Option<RolloutKey<'k>> {
        let rest = key.strip_prefix(&self.rollouts())?;
        let parts: Vec<&str> = rest.split('/').collect();
        if parts.iter().any(|p| p.is_empty()) {
            return None;
        }
        match parts[..] {
            [service, "slots", n] => Some(RolloutKey::Slot {
                service,
                n: n.parse().ok()?,
            }),
            [service, version, "done", node] => Some(RolloutKey::Done {
                service,
                version,
                node,
            }),
            [service, version, "bad"] => Some(RolloutKey::Bad { service, version }),
            _ => None,
        }
    }
}

/// A key of a fleet rollout, as [`Keys::rollout_of`] reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloutKey<'k> {
    /// `{prefix}/rollouts/{service}/slots/{n}`.
    Slot {
        /// The service.
        service: &'k str,
        /// The slot's number.
        n: u32,
    },
    /// `{prefix}/rollouts/{service}/{version}/done/{node}`.
    Done {
        /// The service.
        service: &'k str,
        /// The version.
        version: &'k str,
        /// The node that upgraded.
        node: &'k str,
    },
    /// `{prefix}/rollouts/{service}/{version}/bad`.
    Bad {
        /// The service.
        service: &'k str,
        /// The version.
        version: &'k str,
    },
}

/// `{prefix}/rollouts/{service}/slots/{n}`: a worker upgrading `service`,
/// under a lease of its apply (a dead worker frees the slot within the TTL).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SlotRecord {
    /// The worker.
    pub node: String,
    /// The version it upgrades to (the service's rollout version).
    pub version: String,
    /// When it took the slot (seconds since the Unix epoch).
    pub since: u64,
}

/// `{prefix}/rollouts/{service}/{version}/done/{node}`: `node` upgraded
/// `service` to `version` (not leased).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DoneRecord {
    /// When its upgrade finished (seconds since the Unix epoch).
    pub since: u64,
}

/// `{prefix}/rollouts/{service}/{version}/bad`: an upgrade to `version`
/// failed; no node starts it again (not leased).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BadRecord {
    /// The worker whose upgrade failed.
    pub node: String,
    /// Why.
    pub reason: String,
    /// When (seconds since the Unix epoch).
    pub since: u64,
}

/// `{prefix}/upgrades/{service}/{from}`: a worker's routed upgrade whose
/// next version is ready, under a lease of the worker's apply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpgradeRecord {
    /// The worker.
    pub node: String,
    /// The replica's old address: new connections leave it.
    pub from: String,
    /// The next version's address: new connections go there.
    pub to: String,
    /// The next version: its container's spec hash.
    pub version: String,
    /// When it was published (seconds since the Unix epoch).
    pub since: u64,
}

/// `{prefix}/acks/{service}/{from}/{node}`: load-balancer node `node`'s
/// table sends the replica's new connections to `to`, at `version`
/// (not leased: the worker deletes the acknowledgements when its upgrade ends).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AckRecord {
    /// Where new connections go now.
    pub to: String,
    /// The version registered at `to` when the table was planned.
    pub version: String,
    /// When the table was written (seconds since the Unix epoch).
    pub since: u64,
}

/// What a node is in the site, as registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// It balances routed services (`loadBalancer`).
    LoadBalancer,
    /// It runs routed replicas (`containerSubnet`).
    Worker,
    /// It runs host-mode services.
    Host,
}

/// `{prefix}/nodes/{node}`: a node whose agent is alive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRecord {
    /// The node's roles in the spec.
    pub roles: Vec<Role>,
    /// The Git commit of the spec it last planned (`agent --repo`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// The hash of the spec it last planned (`sha256:…` of the file's bytes).
    pub spec_hash: String,
    /// The lessnat version of its agent.
    pub agent_version: String,
    /// When its lease was granted (seconds since the Unix epoch).
    pub since: u64,
}

/// Which of a replica's containers serves at a registered address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReplicaSlot {
    /// The replica's primary container.
    Primary,
    /// The next version an upgrade started.
    Next,
}

/// `{prefix}/replicas/{service}/{address}`: a replica a worker runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaRecord {
    /// The worker it runs on.
    pub node: String,
    /// Its number among the service's replicas on that node (1 for the first).
    pub replica: u32,
    /// Its version: the container's spec hash (the `io.lessnat.spec` label).
    pub version: String,
    /// Primary or the next version of an upgrade.
    pub slot: ReplicaSlot,
    /// Whether the worker's own health probe passes.
    pub healthy: bool,
    /// Since when it has been registered with this health (seconds since the Unix epoch).
    pub since: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_what_they_register_and_read_back() {
        let keys = Keys::new("/sites/paris/");
        assert_eq!(keys.node("lb-1"), "/sites/paris/nodes/lb-1");
        assert_eq!(
            keys.replica("api", "10.20.1.5"),
            "/sites/paris/replicas/api/10.20.1.5"
        );
        assert_eq!(keys.node_of("/sites/paris/nodes/lb-1"), Some("lb-1"));
        assert_eq!(keys.node_of("/sites/paris/nodes/"), None);
        assert_eq!(
            keys.replica_of("/sites/paris/replicas/api/10.20.1.5"),
            Some(("api", "10.20.1.5"))
        );
        assert_eq!(keys.replica_of("/sites/paris/replicas/api"), None);
        assert_eq!(
            keys.rollout_of(&keys.rollout_slot("api", 1)),
            Some(RolloutKey::Slot {
                service: "api",
                n: 1
            })
        );
        assert_eq!(
            keys.rollout_of(&keys.rollout_done("api", "0123abcd", "web-1")),
            Some(RolloutKey::Done {
                service: "api",
                version: "0123abcd",
                node: "web-1"
            })
        );
        assert_eq!(
            keys.rollout_of("/sites/paris/rollouts/api/0123abcd/bad"),
            Some(RolloutKey::Bad {
                service: "api",
                version: "0123abcd"
            })
        );
        assert_eq!(keys.rollout_of("/sites/paris/rollouts/api/slots/x"), None);
        assert_eq!(keys.rollout_of("/sites/paris/rollouts/api//bad"), None);
        assert_eq!(keys.replica_of("/sites/lyon/replicas/api/10.20.1.5"), None);
        assert_eq!(
            keys.upgrade_of(&keys.upgrade("api", "10.20.1.5")),
            Some(("api", "10.20.1.5"))
        );
        assert_eq!(
            keys.ack_of(&keys.ack("api", "10.20.1.5", "lb-1")),
            Some(("api", "10.20.1.5", "lb-1"))
        );
        assert_eq!(keys.ack_of("/sites/paris/acks/api/10.20.1.5/"), None);
        assert_eq!(keys.upgrade_of("/sites/paris/upgrades/api"), None);
    }

    #[test]
    fn values_are_camel_case_json() {
        let record = ReplicaRecord {
            node: "web-1".into(),
            replica: 1,
            version: "sha256:ab".into(),
            slot: ReplicaSlot::Next,
            healthy: true,
            since: 1_790_000_000,
        };
        let json = serde_json::to_string(&record).expect("serialises");
        assert_eq!(
            json,
            r#"{"node":"web-1","replica":1,"version":"sha256:ab","slot":"next","healthy":true,"since":1790000000}"#
        );
        assert_eq!(
            serde_json::from_str::<ReplicaRecord>(&json).ok(),
            Some(record)
        );
    }
}
