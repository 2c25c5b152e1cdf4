//! With the spec's `cluster:`, on a worker running a service with
//! `upgrade.rollout`: watches `{prefix}/rollouts/` and wakes the agent
//! ([`Trigger::Cluster`]) when its turn may have come — a slot freed, a
//! node done (and again once a canary's `hold` has passed after it) — so a
//! waiting upgrade starts without waiting for the interval. The run that follows reads the rollout keys itself and
//! plans from them; this thread only wakes it.

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
use crate::cluster::keys::{Keys, RolloutKey};
use crate::cluster::rollout::rolls_out_on;
use crate::error::chain;
use crate::spec::{Cluster, Spec};

/// How long the thread waits when there is nothing to watch, or after etcd failed.
const IDLE: Duration = Duration::from_millis(500);

/// How long the watch waits for changes at a time.
const WATCH_WAIT: Duration = Duration::from_millis(200);

/// A second more than a hold, so the run comes after it has passed.
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
    // Wake-ups due once a canary's hold has passed.
    let mut due: Vec<(Instant, String)> = Vec::new();
    // Whether a watch broke: changes may have been missed meanwhile.
    let mut broke = false;
    while !stop.load(Ordering::SeqCst) {
        let target = shared
            .target_spec()
            .filter(|(spec, node)| rolls_out_on(spec, node));
        let Some((spec, cluster)) = target.and_then(|(s, _)| s.cluster.clone().map(|c| (s, c)))
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
                    if let Some((why, hold)) = turn_may_come(&spec, keys, change) {
                        if let Some(hold) = hold {
                            due.push((
                                Instant::now() + hold + MARGIN,
                                format!("{why}; its canary hold has passed"),
                            ));
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

/// Watches `{prefix}/rollouts/` of `cluster` from now on.
fn start(cluster: &Cluster) -> Result<(Keys, Watch), EtcdError> {
    let etcd = Etcd::connect(&etcd_config(&cluster.etcd))?;
    let keys = keys(&cluster.etcd);
    let read = etcd.get_prefix(&keys.rollouts())?;
    let watch = etcd.watch_prefix(&keys.rollouts(), read.revision + 1)?;
    Ok((keys, watch))
}

/// Whether `change` may let a waiting upgrade of `spec` start: why, for
/// people, and the canary hold after which to look again (a node done).
fn turn_may_come(
    spec: &Spec,
    keys: &Keys,
    change: &KeyChange,
) -> Option<(String, Option<Duration>)> {
    let (key, put) = match change {
        KeyChange::Put(entry) => (entry.key.as_str(), true),
        KeyChange::Delete { key, .. } => (key.as_str(), false),
    };
    let service = |name: &str| spec.services.iter().find(|s| s.name.value == name);
    match keys.rollout_of(key)? {
        RolloutKey::Slot { service: name, n } if !put => {
            service(name)?;
            Some((format!("rollout of {name}: slot {n} freed"), None))
        }
        RolloutKey::Done {
            service: name,
            node,
            ..
        } if put => {
            let hold = service(name)?
                .upgrade
                .rollout
                .as_ref()?
                .canary
                .as_ref()
                .map(|c| c.hold.value.get());
            Some((format!("rollout of {name}: {node} done"), hold))
        }
        _ => None,
    }
}
