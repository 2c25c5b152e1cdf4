//! What a load-balancer node plans with from etcd ([`ClusterView`]): the
//! replica registrations, the upgrades in flight and the acknowledgements
//! of their switches; read once (`plan`, `apply`), or kept current by a
//! watch of the whole prefix (the agent) from the changes etcd sends.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::backend::etcd::{Etcd, EtcdError, KeyChange, Snapshot};
use crate::error::chain;
use crate::model::{Acknowledgement, ClusterView, Registration, UpgradeInFlight};
use crate::spec::Cluster;

use super::config::{etcd_config, keys};
use super::keys::{AckRecord, Keys, ReplicaRecord, ReplicaSlot, UpgradeRecord};

/// Reads the view of `cluster` once; a view saying why when etcd cannot be
/// read (within the backend's timeouts).
pub fn read_once(cluster: &Cluster) -> ClusterView {
    let keys = keys(&cluster.etcd);
    Etcd::connect(&etcd_config(&cluster.etcd))
        .and_then(|etcd| read(&etcd, &keys))
        .unwrap_or_else(|error| ClusterView::unreachable(chain(&error), now()))
}

/// Reads the registrations, upgrades and acknowledgements under `keys`
/// (one read of the whole prefix).
pub fn read(etcd: &Etcd, keys: &Keys) -> Result<ClusterView, EtcdError> {
    Ok(view_of(keys, &etcd.get_prefix(&watched(keys))?))
}

/// What a view is read and watched from: the whole prefix (keys it does
/// not use are ignored).
pub fn watched(keys: &Keys) -> String {
    format!("{}/", keys.prefix())
}

/// The view of a read of [`watched`].
pub fn view_of(keys: &Keys, snapshot: &Snapshot) -> ClusterView {
    let mut view = ClusterView {
        revision: snapshot.revision,
        ..ClusterView::default()
    };
    for entry in &snapshot.entries {
        put(&mut view, keys, &entry.key, &entry.value);
    }
    view
}

/// Whether `change` touches what a view holds.
pub fn concerns(keys: &Keys, change: &KeyChange) -> bool {
    let key = match change {
        KeyChange::Put(entry) => &entry.key,
        KeyChange::Delete { key, .. } => key,
    };
    keys.replica_of(key).is_some() || keys.upgrade_of(key).is_some() || keys.ack_of(key).is_some()
}

/// Brings `view` up to `revision` with `changes` (from a watch).
pub fn apply(view: &mut ClusterView, keys: &Keys, revision: i64, changes: &[KeyChange]) {
    for change in changes {
        match change {
            KeyChange::Put(entry) => put(view, keys, &entry.key, &entry.value),
            KeyChange::Delete { key, .. } => forget(view, keys, key),
        }
    }
    view.revision = view.revision.max(revision);
}

/// Forgets what `key` held.
fn forget(view: &mut ClusterView, keys: &Keys, key: &str) {
    if let Some((service, address)) = keys.replica_of(key) {
        view.replicas
            .retain(|r| r.service != service || r.address != address);
    } else if let Some((service, from)) = keys.upgrade_of(key) {
        view.upgrades
            .retain(|u| u.service != service || u.from != from);
    } else if let Some((service, from, node)) = keys.ack_of(key) {
        view.acks
            .retain(|a| a.service != service || a.from != from || a.node != node);
    }
}

/// Notes the value at `key` (a value that does not parse, from a newer or
/// broken writer, is ignored).
fn put(view: &mut ClusterView, keys: &Keys, key: &str, value: &[u8]) {
    forget(view, keys, key);
    if let Some((service, address)) = keys.replica_of(key) {
        let Some(record) = parsed::<ReplicaRecord>(key, value) else {
            return;
        };
        view.replicas.push(Registration {
            service: service.to_string(),
            address: address.to_string(),
            node: record.node,
            replica: record.replica,
            version: record.version,
            next: record.slot == ReplicaSlot::Next,
            healthy: record.healthy,
        });
        view.replicas.sort();
    } else if let Some((service, from)) = keys.upgrade_of(key) {
        let Some(record) = parsed::<UpgradeRecord>(key, value) else {
            return;
        };
        view.upgrades.push(UpgradeInFlight {
            service: service.to_string(),
            from: from.to_string(),
            node: record.node,
            to: record.to,
            version: record.version,
            since: record.since,
        });
        view.upgrades.sort();
    } else if let Some((service, from, node)) = keys.ack_of(key) {
        let Some(record) = parsed::<AckRecord>(key, value) else {
            return;
        };
        view.acks.push(Acknowledgement {
            service: service.to_string(),
            from: from.to_string(),
            node: node.to_string(),
            to: record.to,
            version: record.version,
        });
        view.acks.sort();
    }
}

fn parsed<T: serde::de::DeserializeOwned>(key: &str, value: &[u8]) -> Option<T> {
    serde_json::from_slice(value)
        .inspect_err(|_| tracing::warn!("ignoring the value at {key}: not the record it should be"))
        .ok()
}

/// Now, in seconds since the Unix epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::etcd::Entry;

    fn record(healthy: bool) -> Vec<u8> {
        serde_json::to_vec(&ReplicaRecord {
            node: "web-1".into(),
            replica: 1,
            version: "sha256:aa".into(),
            slot: ReplicaSlot::Primary,
            healthy,
            since: 0,
        })
        .expect("serialises")
    }

    #[test]
    fn a_view_follows_puts_and_deletions() {
        let keys = Keys::new("/l");
        let key = keys.replica("api", "10.20.1.5");
        let snapshot = Snapshot {
            revision: 7,
            entries: vec![
                Entry {
                    key: key.clone(),
                    value: record(true),
                    lease: 1,
                    mod_revision: 5,
                },
                Entry {
                    key: keys.node("web-1"),
                    value: b"{}".to_vec(),
                    lease: 1,
                    mod_revision: 4,
                },
            ],
        };
        let mut view = view_of(&keys, &snapshot);
        assert_eq!(view.revision, 7);
        assert_eq!(view.replicas.len(), 1);
        assert!(view.replicas[0].healthy);
        let unhealthy = Entry {
            key: key.clone(),
            value: record(false),
            lease: 1,
            mod_revision: 8,
        };
        apply(&mut view, &keys, 8, &[KeyChange::Put(unhealthy)]);
        assert_eq!(view.replicas.len(), 1);
        assert!(!view.replicas[0].healthy);
        apply(
            &mut view,
            &keys,
            9,
            &[KeyChange::Delete { key, revision: 9 }],
        );
        assert!(view.replicas.is_empty());
        assert_eq!(view.revision, 9);
    }

    fn entry(key: String, value: Vec<u8>, revision: i64) -> Entry {
        Entry {
            key,
            value,
            lease: 0,
            mod_revision: revision,
        }
    }

    #[test]
    fn a_view_holds_upgrades_and_acknowledgements_and_ignores_other_keys() {
        let keys = Keys::new("/l");
        let upgrade = serde_json::to_vec(&UpgradeRecord {
            node: "web-1".into(),
            from: "10.20.1.5".into(),
            to: "10.20.1.6".into(),
            version: "sha256:bb".into(),
            since: 1,
        })
        .expect("serialises");
        let ack = |version: &str| {
            serde_json::to_vec(&AckRecord {
                to: "10.20.1.6".into(),
                version: version.into(),
                since: 2,
            })
            .expect("serialises")
        };
        let ack_key = keys.ack("api", "10.20.1.5", "lb-1");
        let upgrade_key = keys.upgrade("api", "10.20.1.5");
        let snapshot = Snapshot {
            revision: 3,
            entries: vec![
                entry(upgrade_key.clone(), upgrade, 2),
                entry(ack_key.clone(), ack("sha256:aa"), 3),
                entry("/l/rollouts/api/slot".into(), b"{}".to_vec(), 3),
            ],
        };
        let mut view = view_of(&keys, &snapshot);
        assert_eq!(view.upgrades.len(), 1);
        assert_eq!(view.upgrades[0].to, "10.20.1.6");
        assert_eq!(view.acks[0].version, "sha256:aa");
        let rewritten = KeyChange::Put(entry(ack_key.clone(), ack("sha256:bb"), 4));
        assert!(concerns(&keys, &rewritten));
        let other = KeyChange::Put(entry(keys.node("lb-1"), b"{}".to_vec(), 4));
        assert!(!concerns(&keys, &other));
        apply(&mut view, &keys, 4, &[rewritten]);
        assert_eq!(view.acks.len(), 1);
        assert_eq!(view.acks[0].version, "sha256:bb");
        let ended = [
            KeyChange::Delete {
                key: upgrade_key,
                revision: 5,
            },
            KeyChange::Delete {
                key: ack_key,
                revision: 5,
            },
        ];
        apply(&mut view, &keys, 5, &ended);
        assert!(view.upgrades.is_empty() && view.acks.is_empty());
    }
}
