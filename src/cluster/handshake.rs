//! The upgrade handshake (`docs/cluster.md`, "Upgrade handshake"): a
//! worker's routed upgrade publishes its ready next version and waits until
//! every load-balancer node alive when it published has acknowledged the
//! switch to it (or its lease expired), instead of waiting `switchWait` and
//! hoping; a load-balancer node acknowledges once its table sending new
//! connections there is written.
//!
//! The worker's side is [`Handshake::publish`] then [`Published::wait`]
//! (one bounded step at a time, so apply can show progress and stop on an
//! interrupt), then [`Published::finish`]. The load-balancer node's side is
//! [`SwitchAck::acknowledge`]. What each writes is decided at plan time and
//! carried in the operations; these calls only read and write etcd.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::backend::etcd::{Etcd, EtcdError, KeepAlive, KeyChange, LeaseId, Watch};
use crate::spec::Etcd as EtcdSpec;

use super::config::{etcd_config, keys};
use super::keys::{AckRecord, Keys, NodeRecord, ReplicaRecord, ReplicaSlot, Role, UpgradeRecord};
use super::view::now;

/// A worker's routed upgrade, as planned with the spec's `cluster:`: what
/// it publishes once its next version is healthy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Handshake {
    /// Where etcd is.
    pub etcd: EtcdSpec,
    /// The service.
    pub service: String,
    /// The worker.
    pub node: String,
    /// The replica's old address.
    pub from: IpAddr,
    /// The next version's address.
    pub to: IpAddr,
    /// The next version: its container's spec hash.
    pub version: String,
}

/// A load-balancer node's acknowledgement of one switch, as planned: the
/// node and the version registered at the switch's new address.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SwitchAck {
    /// Where etcd is.
    pub etcd: EtcdSpec,
    /// The load-balancer node acknowledging.
    pub node: String,
    /// The version registered at the address switched to.
    pub version: String,
}

impl SwitchAck {
    /// Writes the acknowledgement that this node's table sends `service`'s
    /// new connections from `from` to `to` (call it once the table is live).
    pub fn acknowledge(&self, service: &str, from: IpAddr, to: IpAddr) -> Result<(), EtcdError> {
        let etcd = Etcd::connect(&etcd_config(&self.etcd))?;
        let record = AckRecord {
            to: to.to_string(),
            version: self.version.clone(),
            since: now(),
        };
        let key = keys(&self.etcd).ack(service, &from.to_string(), &self.node);
        etcd.put(&key, &to_json(&record), None).map(drop)
    }
}

/// Where a published handshake stands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Standing {
    /// Load-balancer nodes that acknowledged the switch to this version.
    pub acknowledged: BTreeSet<String>,
    /// Load-balancer nodes whose lease ended before they acknowledged.
    pub expired: BTreeSet<String>,
    /// Load-balancer nodes still to acknowledge.
    pub waiting: BTreeSet<String>,
}

impl Standing {
    /// Whether no load-balancer node is left to wait for.
    pub fn done(&self) -> bool {
        self.waiting.is_empty()
    }
}

/// An upgrade published in etcd: its lease is kept alive by a thread of
/// its own until [`Published::finish`] or [`Published::abandon`] (or drop).
pub struct Published {
    etcd: Etcd,
    keys: Keys,
    handshake: Handshake,
    lease: LeaseId,
    keeping: Arc<AtomicBool>,
    watch: Watch,
    standing: Standing,
    acks: BTreeSet<String>,
}

impl std::fmt::Debug for Published {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Published")
            .field("handshake", &self.handshake)
            .field("standing", &self.standing)
            .finish_non_exhaustive()
    }
}

impl Handshake {
    /// Publishes the upgrade and registers the next version healthy at its
    /// address (the worker's agent registers it only after this apply),
    /// both under a lease of its own (the spec's `leaseTtl`, kept alive
    /// until the upgrade ends); then reads the registered load-balancer
    /// nodes and the acknowledgements already written, and watches for more
    /// and for nodes whose lease ends.
    pub fn publish(&self, replica: u32) -> Result<Published, EtcdError> {
        let etcd = Etcd::connect(&etcd_config(&self.etcd))?;
        let keys = keys(&self.etcd);
        let ttl = self.etcd.lease_ttl.value.get();
        let lease = etcd.grant(ttl)?;
        let keeper = etcd.keep_alive(lease)?;
        // Kept alive from here: on a slow link the calls below may take
        // longer than the lease. Until `published` owns the flag, a failure
        // stops the renewals (the keys then go with the lease).
        let keeping = Arc::new(AtomicBool::new(true));
        keep(keeper, ttl / 3, Arc::clone(&keeping));
        let stop_keeping = |error: EtcdError| {
            keeping.store(false, Ordering::SeqCst);
            error
        };
        let record = UpgradeRecord {
            node: self.node.clone(),
            from: self.from.to_string(),
            to: self.to.to_string(),
            version: self.version.clone(),
            since: now(),
        };
        let from = self.from.to_string();
        let next = ReplicaRecord {
            node: self.node.clone(),
            replica,
            version: self.version.clone(),
            slot: ReplicaSlot::Next,
            healthy: true,
            since: now(),
        };
        let both = [
            (
                keys.replica(&self.service, &self.to.to_string()),
                to_json(&next),
            ),
            (keys.upgrade(&self.service, &from), to_json(&record)),
        ];
        etcd.write_all(&both, &[], Some(lease))
            .map_err(stop_keeping)?;
        let snapshot = etcd
            .get_prefix(&format!("{}/", keys.prefix()))
            .map_err(stop_keeping)?;
        let watch = etcd
            .watch_prefix(&format!("{}/", keys.prefix()), snapshot.revision + 1)
            .map_err(stop_keeping)?;
        let mut published = Published {
            watch,
            etcd,
            keys,
            handshake: self.clone(),
            lease,
            keeping,
            standing: Standing::default(),
            acks: BTreeSet::new(),
        };
        for entry in &snapshot.entries {
            if let Some(node) = published.keys.node_of(&entry.key) {
                let balances = serde_json::from_slice::<NodeRecord>(&entry.value)
                    .is_ok_and(|r| r.roles.contains(&Role::LoadBalancer));
                if balances {
                    published.standing.waiting.insert(node.to_string());
                }
            }
        }
        for entry in &snapshot.entries {
            published.note_put(&entry.key, &entry.value);
        }
        Ok(published)
    }
}

impl Published {
    /// Where the handshake stands.
    pub fn standing(&self) -> &Standing {
        &self.standing
    }

    /// Waits up to `step` for changes and returns where the handshake
    /// stands then. A watch that broke (its member died) is started again
    /// from a fresh read; an error means etcd could not be read either.
    pub fn wait(&mut self, step: Duration) -> Result<&Standing, EtcdError> {
        if self.standing.done() {
            return Ok(&self.standing);
        }
        let next = match self.watch.next(step) {
            Ok(next) => next,
            Err(error) => {
                tracing::debug!(
                    "the handshake's watch broke: {}",
                    crate::error::chain(&error)
                );
                self.watch_again()?;
                return Ok(&self.standing);
            }
        };
        if let Some((_, changes)) = next {
            for change in changes {
                match change {
                    KeyChange::Put(entry) => self.note_put(&entry.key, &entry.value),
                    KeyChange::Delete { key, .. } => self.note_delete(&key),
                }
            }
        }
        Ok(&self.standing)
    }

    /// The old replica is drained and about to be removed: deletes its
    /// registration first. The worker's agent deregisters it only after it
    /// saw the container go (a round of its probes, and a round trip to
    /// etcd): meanwhile a load-balancer node given the next spec would take
    /// the old address, still registered healthy, for that spec's next
    /// version and send new connections to a removed replica.
    pub fn deregister_old(&self) -> Result<(), EtcdError> {
        let from = self.handshake.from.to_string();
        self.etcd
            .delete(&self.keys.replica(&self.handshake.service, &from))
            .map(drop)
    }

    /// The upgrade is done: deletes its key and the acknowledgements it saw
    /// and stops keeping its lease alive. The next version's registration
    /// stays until the lease expires: the worker's agent registers it
    /// (under the node's lease) once the apply ends.
    pub fn finish(self) -> Result<(), EtcdError> {
        self.keeping.store(false, Ordering::SeqCst);
        for key in &self.acks {
            self.etcd.delete(key)?;
        }
        let from = self.handshake.from.to_string();
        self.etcd
            .delete(&self.keys.upgrade(&self.handshake.service, &from))
            .map(drop)
    }

    /// The upgrade was rolled back: revokes the lease, so the upgrade key
    /// and the next version's registration go at once.
    pub fn abandon(self) -> Result<(), EtcdError> {
        self.keeping.store(false, Ordering::SeqCst);
        self.etcd.revoke(self.lease)
    }

    /// Reads `{prefix}/` again (nodes gone meanwhile count as expired,
    /// acknowledgements written meanwhile count) and watches from there.
    fn watch_again(&mut self) -> Result<(), EtcdError> {
        let prefix = format!("{}/", self.keys.prefix());
        let snapshot = self.etcd.get_prefix(&prefix)?;
        let live: BTreeSet<&str> = snapshot
            .entries
            .iter()
            .filter_map(|e| self.keys.node_of(&e.key))
            .collect();
        let gone: Vec<String> = self
            .standing
            .waiting
            .iter()
            .filter(|n| !live.contains(n.as_str()))
            .cloned()
            .collect();
        for node in gone {
            self.standing.waiting.remove(&node);
            self.standing.expired.insert(node);
        }
        for entry in &snapshot.entries {
            self.note_put(&entry.key, &entry.value);
        }
        self.watch = self.etcd.watch_prefix(&prefix, snapshot.revision + 1)?;
        Ok(())
    }

    fn note_put(&mut self, key: &str, value: &[u8]) {
        let acks = self
            .keys
            .acks_of(&self.handshake.service, &self.handshake.from.to_string());
        let Some(node) = key.strip_prefix(&acks) else {
            return;
        };
        self.acks.insert(key.to_string());
        let Ok(ack) = serde_json::from_slice::<AckRecord>(value) else {
            return;
        };
        // Only the switch to this version counts: an acknowledgement of an
        // earlier spec's upgrade of the same replica does not.
        if ack.to == self.handshake.to.to_string() && ack.version == self.handshake.version {
            self.standing.waiting.remove(node);
            self.standing.expired.remove(node);
            self.standing.acknowledged.insert(node.to_string());
        }
    }

    fn note_delete(&mut self, key: &str) {
        if let Some(node) = self.keys.node_of(key)
            && self.standing.waiting.remove(node)
        {
            self.standing.expired.insert(node.to_string());
        }
    }
}

impl Drop for Published {
    fn drop(&mut self) {
        self.keeping.store(false, Ordering::SeqCst);
    }
}

/// Renews `keeper`'s lease every `every` while `keeping` holds, on a thread
/// of its own (the worker's drain may outlast the lease's TTL).
fn keep(mut keeper: KeepAlive, every: Duration, keeping: Arc<AtomicBool>) {
    let renew = move || {
        let mut renewed = Instant::now();
        while keeping.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(50));
            if renewed.elapsed() >= every {
                if let Err(error) = keeper.renew() {
                    tracing::warn!(
                        "keeping the upgrade's lease alive: {}",
                        crate::error::chain(&error)
                    );
                }
                renewed = Instant::now();
            }
        }
    };
    if let Err(error) = std::thread::Builder::new()
        .name("lessnat-upgrade-lease".into())
        .spawn(renew)
    {
        tracing::warn!("could not start keeping the upgrade's lease alive: {error}");
    }
}

fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    // Plain structs of strings and numbers always serialise.
    serde_json::to_vec(value).unwrap_or_default()
}

#[cfg(test)]
pub(crate) mod tests {
    use crate::model::{Container, Observed};
    use crate::ownership::Slot;
    use crate::plan::operation::Operation;
    use crate::spec::Spec;

    pub(crate) fn spec(text: &str) -> Spec {
        crate::spec::load_bytes("cluster.yaml", text.as_bytes()).expect("valid")
    }

    pub(crate) fn example() -> String {
        std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/cluster.yaml"
        ))
        .expect("example")
    }

    /// web-1 runs api's replica at 10.20.1.5 at an older version.
    pub(crate) fn running_old() -> Observed {
        Observed {
            containers: vec![Container {
                id: "c1".into(),
                name: "lessnat-api.web-1".into(),
                service: "api".into(),
                slot: Slot::Primary,
                spec_hash: "sha256:old".into(),
                image: "registry.example/api:6".into(),
                ports: Vec::new(),
                state: "running".into(),
                health: None,
                pid: Some(1),
                address: Some("10.20.1.5".into()),
                stop_timeout: None,
                digest: None,
            }],
            // The example rolls api out: nothing in etcd yet, web-1 may go.
            rollouts: Some(crate::model::RolloutView::default()),
            ..Observed::default()
        }
    }

    /// The planned upgrade's handshake, and the version it upgrades to.
    fn upgrade_of(spec: &Spec) -> (Option<Box<super::Handshake>>, String) {
        crate::plan::plan(spec, "web-1", &running_old())
            .changes
            .into_iter()
            .find_map(|c| match c.operation {
                Operation::UpgradeReplica {
                    handshake,
                    workload,
                    ..
                } => Some((handshake, workload.container.spec_hash())),
                _ => None,
            })
            .expect("an upgrade is planned")
    }

    #[test]
    fn a_routed_upgrade_with_a_cluster_carries_its_handshake_and_without_none() {
        let with = spec(&example());
        let (handshake, version) = upgrade_of(&with);
        let handshake = handshake.expect("a handshake");
        assert_eq!(handshake.service, "api");
        assert_eq!(handshake.node, "web-1");
        assert_eq!(handshake.from.to_string(), "10.20.1.5");
        assert_ne!(handshake.to, handshake.from);
        assert_eq!(handshake.version, version);
        assert_eq!(handshake.etcd.prefix.value, "/lessnat/site-1");
        let text = example();
        let start = text.find("cluster:").expect("cluster block");
        let end = text.find("nodes:").expect("nodes");
        // Its rollout needs the cluster too (it ends the file).
        let rollout = text.find("      # Fleet rollout").unwrap_or(text.len());
        let without = spec(&format!("{}{}", &text[..start], &text[end..rollout]));
        assert_eq!(upgrade_of(&without).0, None);
    }
}
