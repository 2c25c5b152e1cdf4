//! The registrations as a load-balancer node plans with them
//! ([`ClusterView`]): read once (`plan`, `apply`), or kept current by a
//! watch (the agent, `watch.rs`) from the changes etcd sends.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::backend::etcd::{Etcd, EtcdError, KeyChange, Snapshot};
use crate::error::chain;
use crate::model::{ClusterView, Registration};
use crate::spec::Cluster;

use super::config::{etcd_config, keys};
use super::keys::{Keys, ReplicaRecord, ReplicaSlot};

/// Reads the registrations of `cluster` once; a view saying why when etcd
/// cannot be read (within the backend's timeouts).
pub fn read_once(cluster: &Cluster) -> ClusterView {
    let keys = keys(&cluster.etcd);
    Etcd::connect(&etcd_config(&cluster.etcd))
        .and_then(|etcd| read(&etcd, &keys))
        .unwrap_or_else(|error| ClusterView::unreachable(chain(&error), now()))
}

/// Reads every replica registration under `keys`.
pub fn read(etcd: &Etcd, keys: &Keys) -> Result<ClusterView, EtcdError> {
    Ok(view_of(keys, &etcd.get_prefix(&keys.replicas())?))
}

/// The view of a read of `{prefix}/replicas/`.
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

/// Brings `view` up to `revision` with `changes` (from a watch).
pub fn apply(view: &mut ClusterView, keys: &Keys, revision: i64, changes: &[KeyChange]) {
    for change in changes {
        match change {
            KeyChange::Put(entry) => put(view, keys, &entry.key, &entry.value),
            KeyChange::Delete { key, .. } => {
                if let Some((service, address)) = keys.replica_of(key) {
                    view.replicas
                        .retain(|r| r.service != service || r.address != address);
                }
            }
        }
    }
    view.revision = view.revision.max(revision);
}

/// Notes the registration at `key` (a value that is not a replica record,
/// from a newer or broken writer, is ignored).
fn put(view: &mut ClusterView, keys: &Keys, key: &str, value: &[u8]) {
    let Some((service, address)) = keys.replica_of(key) else {
        return;
    };
    view.replicas
        .retain(|r| r.service != service || r.address != address);
    let Ok(record) = serde_json::from_slice::<ReplicaRecord>(value) else {
        tracing::warn!("ignoring the registration at {key}: not a replica record");
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
}
