//! Fleet rollouts (`docs/cluster.md`, "Rollouts"): a service's workers take
//! turns upgrading it through slots in etcd, canary nodes first, and a
//! failed upgrade marks its version bad so no other node starts it.
//!
//! [`read_once`] reads the rollout keys (and the replicas registered
//! unhealthy) for a worker's plan (the planner decides from them:
//! `plan/rollout.rs`). A planned upgrade carries its [`Turn`]; apply calls
//! [`Turn::take`] before it starts the next version (a slot taken
//! atomically, under a lease of its own, or none free), then [`Held::done`]
//! or [`Held::bad`] or [`Held::release`] when it ends. A planned
//! [`BadMark`] (a canary node's replica turned unhealthy) is written with
//! [`BadMark::write`], once.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::backend::etcd::{Etcd, EtcdError, Expect, KeepAlive, LeaseId, Snapshot};
use crate::error::chain;
use crate::model::{RolloutBad, RolloutDone, RolloutSlot, RolloutView, UnhealthyReplica};
use crate::spec::{Cluster, Etcd as EtcdSpec, Spec};

use super::config::{etcd_config, keys};
use super::keys::{BadRecord, DoneRecord, Keys, ReplicaRecord, RolloutKey, SlotRecord};
use super::view::now;

/// Whether `node` runs a replica of a service of `spec` with
/// `upgrade.rollout` (its plans read the rollout keys).
pub fn rolls_out_on(spec: &Spec, node: &str) -> bool {
    spec.services
        .iter()
        .any(|s| s.upgrade.rollout.is_some() && s.replicas.iter().any(|r| r.node.value == node))
}

/// Reads every rollout key of `cluster` once, and the replicas registered
/// unhealthy; a view saying why when etcd cannot be read (within the
/// backend's timeouts).
pub fn read_once(cluster: &Cluster) -> RolloutView {
    let keys = keys(&cluster.etcd);
    let read = |etcd: Etcd| -> Result<Snapshot, EtcdError> {
        let mut snapshot = etcd.get_prefix(&keys.rollouts())?;
        snapshot
            .entries
            .extend(etcd.get_prefix(&keys.replicas())?.entries);
        Ok(snapshot)
    };
    Etcd::connect(&etcd_config(&cluster.etcd))
        .and_then(read)
        .map(|snapshot| view_of(&keys, &snapshot, now()))
        .unwrap_or_else(|error| RolloutView::unreachable(chain(&error), now()))
}

/// The view of a read of `{prefix}/rollouts/` (and `{prefix}/replicas/`,
/// for the replicas registered unhealthy) made at `at` (values that do not
/// parse, from a newer or broken writer, are left out).
pub fn view_of(keys: &Keys, snapshot: &Snapshot, at: u64) -> RolloutView {
    let mut view = RolloutView {
        read_at: at,
        ..RolloutView::default()
    };
    for entry in &snapshot.entries {
        let value = entry.value.as_slice();
        if let Some((service, address)) = keys.replica_of(&entry.key) {
            if let Ok(record) = serde_json::from_slice::<ReplicaRecord>(value)
                && !record.healthy
            {
                view.unhealthy.push(UnhealthyReplica {
                    service: service.to_string(),
                    address: address.to_string(),
                    node: record.node,
                    version: record.version,
                    since: record.since,
                });
            }
            continue;
        }
        match keys.rollout_of(&entry.key) {
            Some(RolloutKey::Slot { service, n }) => {
                if let Ok(record) = serde_json::from_slice::<SlotRecord>(value) {
                    view.slots.push(RolloutSlot {
                        service: service.to_string(),
                        slot: n,
                        node: record.node,
                        version: record.version,
                        since: record.since,
                    });
                }
            }
            Some(RolloutKey::Done {
                service,
                version,
                node,
            }) => {
                if let Ok(record) = serde_json::from_slice::<DoneRecord>(value) {
                    view.done.push(RolloutDone {
                        service: service.to_string(),
                        version: version.to_string(),
                        node: node.to_string(),
                        since: record.since,
                    });
                }
            }
            Some(RolloutKey::Bad { service, version }) => {
                if let Ok(record) = serde_json::from_slice::<BadRecord>(value) {
                    view.bad.push(RolloutBad {
                        service: service.to_string(),
                        version: version.to_string(),
                        node: record.node,
                        reason: record.reason,
                        since: record.since,
                    });
                }
            }
            None => {}
        }
    }
    view.slots.sort();
    view.done.sort();
    view.bad.sort();
    view.unhealthy.sort();
    view
}

/// One service's rollout as `lessnat status --cluster` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceRollout {
    /// The service.
    pub service: String,
    /// Its slots held, by number.
    pub slots: Vec<RolloutSlot>,
    /// The nodes done with each version, by version (in the order they finished).
    pub done: BTreeMap<String, Vec<String>>,
    /// Its versions marked bad.
    pub bad: Vec<RolloutBad>,
}

/// `view` by service, for `lessnat status --cluster`.
pub fn by_service(view: &RolloutView) -> Vec<ServiceRollout> {
    let mut services: BTreeMap<String, ServiceRollout> = BTreeMap::new();
    fn of<'s>(
        services: &'s mut BTreeMap<String, ServiceRollout>,
        service: &str,
    ) -> &'s mut ServiceRollout {
        services
            .entry(service.to_string())
            .or_insert_with(|| ServiceRollout {
                service: service.to_string(),
                slots: Vec::new(),
                done: BTreeMap::new(),
                bad: Vec::new(),
            })
    }
    for slot in &view.slots {
        of(&mut services, &slot.service).slots.push(slot.clone());
    }
    let mut done: Vec<&RolloutDone> = view.done.iter().collect();
    done.sort_by_key(|d| (d.since, d.node.clone()));
    for d in done {
        of(&mut services, &d.service)
            .done
            .entry(d.version.clone())
            .or_default()
            .push(d.node.clone());
    }
    for bad in &view.bad {
        of(&mut services, &bad.service).bad.push(bad.clone());
    }
    services.into_values().collect()
}

/// A worker's turn in a service's rollout, as planned: the upgrade may
/// start once it holds one of the first `slots` slots.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Turn {
    /// Where etcd is.
    pub etcd: EtcdSpec,
    /// The service.
    pub service: String,
    /// The version it upgrades to (the service's rollout version).
    pub version: String,
    /// The worker.
    pub node: String,
    /// How many slots it may take from (1 in the canary phase, else
    /// `rollout.maxParallel`).
    pub slots: u32,
    /// Whether this upgrade is the node's last of the service in its plan:
    /// it writes `done` and frees the slot (an earlier one keeps the slot
    /// for the next, which takes it over).
    pub last: bool,
    /// An upgrade found in flight that resumes: it took its turn when it
    /// started, so it takes no slot and only records `done` or `bad`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resumed: bool,
    /// A canary node's turn: how many other nodes were done with the
    /// version when it was planned. The slot is taken only while that is
    /// still so: a canary that finished since would otherwise let this node
    /// start as another canary, without the hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_after: Option<u32>,
}

/// What [`Turn::take`] found.
#[derive(Debug)]
pub enum Taken {
    /// A slot is this upgrade's.
    Slot(Box<Held>),
    /// Every slot it may take is held by another node (named).
    Full(Vec<String>),
    /// The version was marked bad since the plan (by the node named).
    Bad(String),
    /// The version's canary phase moved on since the plan: this many other
    /// nodes are done with it now.
    Moved(u32),
}

impl Turn {
    /// Records that this node upgraded to the version (`done`).
    pub fn record_done(&self) -> Result<(), EtcdError> {
        let etcd = Etcd::connect(&etcd_config(&self.etcd))?;
        self.write_done(&etcd, &keys(&self.etcd))
    }

    /// Marks the version bad, with `reason`.
    pub fn record_bad(&self, reason: &str) -> Result<(), EtcdError> {
        let etcd = Etcd::connect(&etcd_config(&self.etcd))?;
        self.write_bad(&etcd, &keys(&self.etcd), reason)
    }

    fn write_done(&self, etcd: &Etcd, keys: &Keys) -> Result<(), EtcdError> {
        let key = keys.rollout_done(&self.service, &self.version, &self.node);
        etcd.put(&key, &to_json(&DoneRecord { since: now() }), None)
            .map(drop)
    }

    fn write_bad(&self, etcd: &Etcd, keys: &Keys, reason: &str) -> Result<(), EtcdError> {
        let record = BadRecord {
            node: self.node.clone(),
            reason: reason.to_string(),
            since: now(),
        };
        let key = keys.rollout_bad(&self.service, &self.version);
        etcd.put(&key, &to_json(&record), None).map(drop)
    }

    /// Takes a slot, atomically: grants a lease (the spec's `leaseTtl`,
    /// kept alive by a thread until the upgrade ends), then takes over a
    /// slot this node holds already (an earlier upgrade of the same apply,
    /// or an apply that died) or writes the first free one of the first
    /// `slots`, each in one transaction that writes only if the slot is as
    /// read and the version is not marked bad. The lease is revoked when
    /// no slot is taken.
    pub fn take(&self) -> Result<Taken, EtcdError> {
        let etcd = Etcd::connect(&etcd_config(&self.etcd))?;
        let keys = keys(&self.etcd);
        let ttl = self.etcd.lease_ttl.value.get();
        let read = etcd.get_prefix(&keys.rollout(&self.service))?;
        let bad = keys.rollout_bad(&self.service, &self.version);
        if let Some(entry) = read.entries.iter().find(|e| e.key == bad) {
            let by = serde_json::from_slice::<BadRecord>(&entry.value)
                .map_or_else(|_| "an unreadable record".to_string(), |r| r.node);
            return Ok(Taken::Bad(by));
        }
        let done_nodes = keys.rollout_done_nodes(&self.service, &self.version);
        if let Some(planned) = self.canary_after {
            let now = read
                .entries
                .iter()
                .filter_map(|e| e.key.strip_prefix(&done_nodes))
                .filter(|node| *node != self.node)
                .count();
            if now != planned as usize {
                return Ok(Taken::Moved(u32::try_from(now).unwrap_or(u32::MAX)));
            }
        }
        let lease = etcd.grant(ttl)?;
        let record = SlotRecord {
            node: self.node.clone(),
            version: self.version.clone(),
            since: now(),
        };
        let value = to_json(&record);
        let mut holders = Vec::new();
        let mut taken = None;
        let mut held = Vec::new();
        for entry in &read.entries {
            let Some(RolloutKey::Slot { n, .. }) = keys.rollout_of(&entry.key) else {
                continue;
            };
            held.push(n);
            let holder = serde_json::from_slice::<SlotRecord>(&entry.value)
                .map_or_else(|_| "an unreadable holder".to_string(), |r| r.node);
            if holder == self.node && taken.is_none() {
                let own = [
                    (entry.key.as_str(), Expect::ModRevision(entry.mod_revision)),
                    (bad.as_str(), Expect::Absent),
                ];
                if etcd.put_if(&entry.key, &value, Some(lease), &own)? {
                    taken = Some(n);
                }
            } else if n < self.slots {
                holders.push(format!("{holder} (slot {n})"));
            }
        }
        for n in (0..self.slots).filter(|n| !held.contains(n)) {
            if taken.is_some() {
                break;
            }
            let key = keys.rollout_slot(&self.service, n);
            let mut free = vec![
                (key.as_str(), Expect::Absent),
                (bad.as_str(), Expect::Absent),
            ];
            if self.canary_after.is_some() {
                free.push((done_nodes.as_str(), Expect::NothingNewUnder(read.revision)));
            }
            if etcd.put_if(&key, &value, Some(lease), &free)? {
                taken = Some(n);
            } else {
                holders.push(format!("slot {n}, taken since the read"));
            }
        }
        let Some(slot) = taken else {
            etcd.revoke(lease)?;
            return Ok(Taken::Full(holders));
        };
        let keeping = Arc::new(AtomicBool::new(true));
        keep_alive(etcd.clone(), lease, ttl / 3, Arc::clone(&keeping));
        Ok(Taken::Slot(Box::new(Held {
            etcd,
            keys,
            turn: self.clone(),
            lease,
            keeping,
            slot,
        })))
    }
}

/// A version to mark bad because a canary node's replica of it turned
/// unhealthy, as planned by a worker waiting to start it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BadMark {
    /// Where etcd is.
    pub etcd: EtcdSpec,
    /// The service.
    pub service: String,
    /// The version (the service's rollout version).
    pub version: String,
    /// The canary node whose replica turned unhealthy (the `bad` record's node).
    pub node: String,
    /// Why, naming the replica.
    pub reason: String,
}

impl BadMark {
    /// Writes `{version}/bad` in one transaction, only if it is absent
    /// (another worker may have marked it first); returns whether this
    /// call wrote it.
    pub fn write(&self) -> Result<bool, EtcdError> {
        let etcd = Etcd::connect(&etcd_config(&self.etcd))?;
        let key = keys(&self.etcd).rollout_bad(&self.service, &self.version);
        let record = BadRecord {
            node: self.node.clone(),
            reason: self.reason.clone(),
            since: now(),
        };
        etcd.put_if(&key, &to_json(&record), None, &[(&key, Expect::Absent)])
    }
}

/// A rollout slot this upgrade holds; its lease is kept alive until
/// [`Held::done`], [`Held::bad`] or [`Held::release`] (or drop).
pub struct Held {
    etcd: Etcd,
    keys: Keys,
    turn: Turn,
    lease: LeaseId,
    keeping: Arc<AtomicBool>,
    slot: u32,
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held")
            .field("turn", &self.turn)
            .field("slot", &self.slot)
            .finish_non_exhaustive()
    }
}

impl Held {
    /// The slot's number.
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// The upgrade finished. The node's last upgrade of the service in
    /// its plan writes `done` and frees the slot; an earlier one stops
    /// keeping its lease alive and leaves the slot to the next, which
    /// takes it over (or it frees itself within `leaseTtl`).
    pub fn done(self) -> Result<(), EtcdError> {
        self.keeping.store(false, Ordering::SeqCst);
        if !self.turn.last {
            return Ok(());
        }
        self.turn.write_done(&self.etcd, &self.keys)?;
        self.etcd.revoke(self.lease)
    }

    /// The upgrade failed because of its version: marks the version bad
    /// (with `reason`) and frees the slot.
    pub fn bad(self, reason: &str) -> Result<(), EtcdError> {
        self.keeping.store(false, Ordering::SeqCst);
        self.turn.write_bad(&self.etcd, &self.keys, reason)?;
        self.etcd.revoke(self.lease)
    }

    /// The upgrade ended for a reason that is not its version's (an
    /// interrupt, etcd, the drain): frees the slot, marks nothing.
    pub fn release(self) -> Result<(), EtcdError> {
        self.keeping.store(false, Ordering::SeqCst);
        self.etcd.revoke(self.lease)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.keeping.store(false, Ordering::SeqCst);
    }
}

/// Renews `lease` every `every` on a thread of its own while `keeping`
/// holds (an upgrade outlasts the TTL). A keep-alive stream that broke (its
/// member died, a ping went unanswered) is opened again at once: a slot
/// must not free itself while its upgrade runs.
fn keep_alive(etcd: Etcd, lease: LeaseId, every: Duration, keeping: Arc<AtomicBool>) {
    let renew = move || {
        let mut keeper: Option<KeepAlive> = None;
        let mut renewed = Instant::now();
        while keeping.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(50));
            if renewed.elapsed() < every {
                continue;
            }
            if keeper.is_none() {
                keeper = etcd.keep_alive(lease).ok();
            }
            match keeper.as_mut().map(KeepAlive::renew) {
                Some(Ok(_)) => renewed = Instant::now(),
                Some(Err(error @ EtcdError::LeaseGone { .. })) => {
                    tracing::warn!("the rollout slot's lease: {}", chain(&error));
                    return;
                }
                Some(Err(error)) => {
                    tracing::debug!("renewing the rollout slot's lease: {}", chain(&error));
                    keeper = None;
                }
                None => {}
            }
        }
    };
    if let Err(error) = std::thread::Builder::new()
        .name("lessnat-rollout-lease".into())
        .spawn(renew)
    {
        tracing::warn!("could not start keeping the rollout slot's lease alive: {error}");
    }
}

fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    // Plain structs of strings and numbers always serialise.
    serde_json::to_vec(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::etcd::Entry;
    use crate::cluster::keys::ReplicaSlot;

    fn entry(key: String, value: &impl Serialize) -> Entry {
        Entry {
            key,
            value: serde_json::to_vec(value).expect("serialises"),
            lease: 0,
            mod_revision: 1,
        }
    }

    #[test]
    fn a_read_of_the_rollout_keys_becomes_the_view() {
        let keys = Keys::new("/l");
        let snapshot = Snapshot {
            revision: 9,
            entries: vec![
                entry(
                    keys.rollout_slot("api", 0),
                    &SlotRecord {
                        node: "web-2".into(),
                        version: "v2".into(),
                        since: 5,
                    },
                ),
                entry(
                    keys.rollout_done("api", "v2", "web-1"),
                    &DoneRecord { since: 4 },
                ),
                entry(
                    keys.rollout_bad("api", "v1"),
                    &BadRecord {
                        node: "web-1".into(),
                        reason: "not healthy".into(),
                        since: 3,
                    },
                ),
                entry(keys.rollout_bad("api", "v0"), &"not a record"),
                entry(
                    keys.replica("api", "10.20.1.6"),
                    &ReplicaRecord {
                        node: "web-1".into(),
                        replica: 1,
                        version: "sha256:v2".into(),
                        slot: ReplicaSlot::Next,
                        healthy: false,
                        since: 8,
                    },
                ),
                entry(
                    keys.replica("api", "10.20.2.5"),
                    &ReplicaRecord {
                        node: "web-2".into(),
                        replica: 1,
                        version: "sha256:v1".into(),
                        slot: ReplicaSlot::Primary,
                        healthy: true,
                        since: 2,
                    },
                ),
            ],
        };
        let view = view_of(&keys, &snapshot, 10);
        assert_eq!(view.read_at, 10);
        assert_eq!(view.slots.len(), 1);
        assert_eq!(
            (view.slots[0].slot, view.slots[0].node.as_str()),
            (0, "web-2")
        );
        assert_eq!(view.done.len(), 1);
        assert_eq!(view.done[0].node, "web-1");
        assert_eq!(view.bad.len(), 1, "the unreadable one is left out");
        assert_eq!(view.bad[0].reason, "not healthy");
        assert_eq!(
            view.unhealthy,
            [UnhealthyReplica {
                service: "api".into(),
                address: "10.20.1.6".into(),
                node: "web-1".into(),
                version: "sha256:v2".into(),
                since: 8,
            }],
            "only the unhealthy replica"
        );
    }
}
