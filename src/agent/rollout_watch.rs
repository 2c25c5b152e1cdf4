//! With the spec's `cluster:`, on a worker running a service with
//! `upgrade.rollout`: watches `{prefix}/rollouts/` and `{prefix}/replicas/`
//! and wakes the agent ([`Trigger::Cluster`]) when its turn may have come —
//! a slot freed, a node done (and again once a canary's `hold` has passed
//! after it) — or when another node's replica of such a service is
//! registered unhealthy (and again once it has been so long enough to mark
//! a canary's version bad), so a waiting upgrade starts, or its version is
//! marked bad, without waiting for the interval. The run that follows reads
//! the rollout keys itself and plans from them; this thread only wakes it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::AgentError;
use super::cluster::ClusterShared;
use super::container_events::sleep_unless_stopped;
use super::wake::{Trigger, Waker};
use crate::backend::etcd::{Etcd, EtcdError, KeyChange, Watch};
use crate::cluster::config::{etcd_config, keys};
use crate::cluster::keys::{Keys, ReplicaRecord, RolloutKey};
use crate::cluster::rollout::rolls_out_on;
use crate::error::chain;
use crate::plan::rollout::UNHEALTHY_FOR_SECS;
use crate::spec::{Cluster, Spec};

/// How long the thread waits when there is nothing to watch, or after etcd failed.
const IDLE: Duration = Duration::from_millis(500);

/// How long the watch waits for changes at a time.
const WATCH_WAIT: Duration = Duration::from_millis(200);

/// A second more than a hold (or a time registered unhealthy), so the run
/// comes after it has passed.
const MARGIN: Duration = Duration::from_secs(1);

/// Starts the thread (idle unless the node runs a service that rolls out).
pub fn spawn(
    shared: Arc<ClusterShared>,
    waker: Waker,
    stop: Arc<AtomicBool>,
) -> Result<JoinHandle<()>, AgentError> {
    std::thread::Builder::new()
        .name("lessnat-agent-rollouts".into())
        .spawn(move || watch(&shared, &waker, &stop))
        .map_err(AgentError::Thread)
}

fn watch(shared: &ClusterShared, waker: &Waker, stop: &AtomicBool) {
    let mut watching: Option<(Cluster, Keys, Watch)> = None;
    // Wake-ups due once a canary's hold (or an unhealthy replica's time) has passed.
    let mut due: Vec<(Instant, String)> = Vec::new();
    // Whether a watch broke: changes may have been missed meanwhile.
    let mut broke = false;
    while !stop.load(Ordering::SeqCst) {
        let target = shared
            .target_spec()
            .filter(|(spec, node)| rolls_out_on(spec, node));
        let Some((spec, node, cluster)) =
            target.and_then(|(s, n)| s.cluster.clone().map(|c| (s, n, c)))
        else {
            watching = None;
            sleep_unless_stopped(stop, IDLE);
            continue;
        };
        let now = Instant::now();
        for (_, why) in due.extract_if(.., |(at, _)| *at <= now) {
            waker.wake(Trigger::Cluster, why);
        }
        if watching.as_ref().is_some_and(|(c, _, _)| *c != cluster) {
            watching = None;
        }
        let Some((_, keys, current)) = watching.as_mut() else {
            match start(&cluster) {
                Ok((keys, watch)) => {
                    watching = Some((cluster, keys, watch));
                    if std::mem::take(&mut broke) {
                        waker.wake(Trigger::Cluster, "rollout keys watched again");
                    }
                }
                Err(error) => {
                    tracing::debug!("watching the rollout keys: {}", chain(&error));
                    sleep_unless_stopped(stop, IDLE);
                }
            }
            continue;
        };
        match current.next(WATCH_WAIT) {
            Ok(Some((_, changes))) => {
                for change in &changes {
                    if let Some((why, again)) = turn_may_come(&spec, &node, keys, change) {
                        if let Some((after, what)) = again {
                            due.push((Instant::now() + after + MARGIN, format!("{why}; {what}")));
                        }
                        waker.wake(Trigger::Cluster, why);
                    }
                }
            }
            Ok(None) => {}
            Err(error) => {
                tracing::debug!("watching the rollout keys: {}", chain(&error));
                watching = None;
                broke = true;
            }
        }
    }
}

/// Watches everything under the prefix of `cluster` from now on (the
/// rollout keys and the replicas' registrations; the rest is ignored).
fn start(cluster: &Cluster) -> Result<(Keys, Watch), EtcdError> {
    let etcd = Etcd::connect(&etcd_config(&cluster.etcd))?;
    let keys = keys(&cluster.etcd);
    let all = format!("{}/", keys.prefix());
    let read = etcd.get_prefix(&keys.rollouts())?;
    let watch = etcd.watch_prefix(&all, read.revision + 1)?;
    Ok((keys, watch))
}

/// Whether `change` may let a waiting upgrade of `spec` on `node` start, or
/// mark its version bad: why, for people, and how long after which to look
/// again, saying why (a canary's hold after a node is done; the time a
/// replica must be registered unhealthy).
fn turn_may_come(
    spec: &Spec,
    node: &str,
    keys: &Keys,
    change: &KeyChange,
) -> Option<(String, Option<(Duration, &'static str)>)> {
    let (key, put) = match change {
        KeyChange::Put(entry) => (entry.key.as_str(), true),
        KeyChange::Delete { key, .. } => (key.as_str(), false),
    };
    let service = |name: &str| spec.services.iter().find(|s| s.name.value == name);
    if let Some((name, address)) = keys.replica_of(key) {
        let KeyChange::Put(entry) = change else {
            return None;
        };
        let record: ReplicaRecord = serde_json::from_slice(&entry.value).ok()?;
        service(name)?.upgrade.rollout.as_ref()?;
        if record.healthy || record.node == node {
            return None;
        }
        return Some((
            format!(
                "rollout of {name}: {}'s replica {address} registered unhealthy",
                record.node
            ),
            Some((
                Duration::from_secs(UNHEALTHY_FOR_SECS),
                "long enough to mark a canary's version bad",
            )),
        ));
    }
    match keys.rollout_of(key)? {
        RolloutKey::Slot { service: name, n } if !put => {
            service(name)?;
            Some((format!("rollout of {name}: slot {n} freed"), None))
        }
        RolloutKey::Done {
            service: name,
            node: by,
            ..
        } if put => {
            let hold = service(name)?
                .upgrade
                .rollout
                .as_ref()?
                .canary
                .as_ref()
                .map(|c| (c.hold.value.get(), "its canary hold has passed"));
            Some((format!("rollout of {name}: {by} done"), hold))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::etcd::Entry;
    use crate::cluster::handshake::tests as handshake;
    use crate::cluster::keys::ReplicaSlot;

    /// A put of api's replica at 10.20.2.5 on `node`, `healthy` or not.
    fn registered(keys: &Keys, node: &str, healthy: bool) -> KeyChange {
        let record = ReplicaRecord {
            node: node.into(),
            replica: 1,
            version: "sha256:v2".into(),
            slot: ReplicaSlot::Primary,
            healthy,
            since: 1,
        };
        KeyChange::Put(Entry {
            key: keys.replica("api", "10.20.2.5"),
            value: serde_json::to_vec(&record).expect("serialises"),
            lease: 0,
            mod_revision: 1,
        })
    }

    #[test]
    fn another_nodes_replica_registered_unhealthy_wakes_now_and_once_it_would_be_marked() {
        let spec = handshake::spec(&handshake::example());
        let keys = Keys::new("/l");
        let (why, again) = turn_may_come(&spec, "web-1", &keys, &registered(&keys, "web-2", false))
            .expect("a wake-up");
        assert_eq!(
            why,
            "rollout of api: web-2's replica 10.20.2.5 registered unhealthy"
        );
        assert_eq!(
            again.map(|(after, _)| after),
            Some(Duration::from_secs(UNHEALTHY_FOR_SECS))
        );
        for quiet in [
            registered(&keys, "web-2", true),
            registered(&keys, "web-1", false),
        ] {
            assert_eq!(turn_may_come(&spec, "web-1", &keys, &quiet), None);
        }
    }
}
