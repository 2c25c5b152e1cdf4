//! The agent's cluster side, when the spec has `cluster:`
//! (`docs/cluster.md`). Two threads, both following what the last run
//! planned ([`ClusterShared::set_target`]):
//!
//! - registration (every node): keeps the node's lease and registrations in
//!   etcd (`cluster::registration::Registrar`); on workers, every
//!   `health.interval`, it lists the node's containers (so a `next` an
//!   upgrade starts in the middle of a run is registered as soon as it
//!   runs) and probes each routed replica with the service's check, and
//!   registers it with that health. On a clean stop it revokes the lease,
//!   so everything it registered goes at once.
//! - watch (load-balancer nodes): reads the replica registrations, the
//!   upgrades in flight and their acknowledgements (the whole prefix), then
//!   watches them, keeping [`ClusterShared::view`] current and waking the
//!   agent ([`Trigger::Cluster`]) on every change of them, so the run that
//!   follows moves the spreads (and acknowledges switches it has not yet
//!   acknowledged). When etcd cannot be read the view says so and the
//!   planner follows the node's own probes.
//!
//! Neither is in the data path: with etcd gone, runs go on and the tables
//! stay as they are.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::AgentError;
use super::container_events::sleep_unless_stopped;
use super::wake::{Trigger, Waker};
use crate::backend::docker::Docker;
use crate::backend::etcd::{Etcd, EtcdError, KeyChange, Watch};
use crate::cluster::config::{etcd_config, keys};
use crate::cluster::keys::{Keys, NodeRecord, ReplicaRecord};
use crate::cluster::registration::{
    Healths, Registrar, RunningReplica, Wanted, roles, running_replicas,
};
use crate::cluster::view::{self, now};
use crate::desired::routed::{load_balancer_role, replicas_of, worker_role};
use crate::error::chain;
use crate::model::{ClusterView, Observed, Probe};
use crate::netns::Netns;
use crate::observe::probe::probe_own_replicas;
use crate::spec::{Cluster, Spec};

/// How often the registration thread looks at its lease and targets.
const TICK: Duration = Duration::from_millis(100);

/// How long the threads wait when there is nothing to do (no cluster, not
/// a load-balancer node, before the first run).
const IDLE: Duration = Duration::from_millis(200);

/// How long the threads wait after etcd failed before trying again.
const RETRY: Duration = Duration::from_millis(500);

/// How long the watch waits for changes at a time (it looks at the stop
/// flag and the target in between).
const WATCH_WAIT: Duration = Duration::from_millis(200);

/// What the agent's last run planned: what the threads follow.
#[derive(Debug, Clone)]
struct Target {
    spec: Spec,
    node: String,
    commit: Option<String>,
}

/// How the agent's link to etcd is, for status and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    /// Whether the last call to etcd worked.
    pub up: bool,
    /// Since when etcd has been unreachable (seconds since the Unix epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unreachable_since: Option<u64>,
    /// Why, the last time it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The node's lease (hex), while it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<String>,
    /// How many keys the node has registered under its lease.
    pub registrations: usize,
    /// Load-balancer nodes: how many replica registrations the watch sees.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watched: Option<usize>,
}

/// What the cluster threads and the agent's loop share.
#[derive(Debug, Default)]
pub struct ClusterShared {
    target: Mutex<Option<Target>>,
    view: Mutex<Option<(Cluster, ClusterView)>>,
    link: Mutex<Link>,
}

impl ClusterShared {
    /// From now on, register and watch for `spec` on `node`, with the Git
    /// `commit` (if any).
    pub fn set_target(&self, spec: &Spec, node: &str, commit: Option<String>) {
        let target = Target {
            spec: spec.clone(),
            node: node.to_string(),
            commit,
        };
        *lock(&self.target) = Some(target);
    }

    /// The registrations a run of `spec` plans with: the watch's view when
    /// it was made for `spec`'s cluster; `None` otherwise (the run reads
    /// etcd itself, or has no cluster).
    pub fn view(&self, spec: &Spec) -> Option<ClusterView> {
        let cluster = spec.cluster.as_ref()?;
        lock(&self.view)
            .as_ref()
            .filter(|(watched, _)| watched == cluster)
            .map(|(_, view)| view.clone())
    }

    /// The link to etcd as last seen; `None` without a cluster.
    pub fn link(&self) -> Option<Link> {
        let has_cluster = lock(&self.target)
            .as_ref()
            .is_some_and(|t| t.spec.cluster.is_some());
        has_cluster.then(|| lock(&self.link).clone())
    }

    fn target(&self) -> Option<Target> {
        lock(&self.target).clone()
    }

    /// The spec and node the last run planned, if any.
    pub(super) fn target_spec(&self) -> Option<(Spec, String)> {
        self.target().map(|t| (t.spec, t.node))
    }

    fn update_link(&self, change: impl FnOnce(&mut Link)) -> bool {
        let mut link = lock(&self.link);
        let before = link.up;
        change(&mut link);
        before != link.up
    }

    fn failed(&self, error: &EtcdError) -> bool {
        let error = chain(error);
        self.update_link(|link| {
            link.up = false;
            link.unreachable_since.get_or_insert_with(now);
            link.error = Some(error);
        })
    }

    fn worked(&self) -> bool {
        self.update_link(|link| {
            link.up = true;
            link.unreachable_since = None;
            link.error = None;
        })
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Starts the registration thread (it runs until `stop` is set, then
/// revokes the lease).
pub fn spawn_registration(
    netns: Netns,
    shared: Arc<ClusterShared>,
    waker: Waker,
    stop: Arc<AtomicBool>,
) -> Result<JoinHandle<()>, AgentError> {
    std::thread::Builder::new()
        .name("lessnat-agent-register".into())
        .spawn(move || register(&netns, &shared, &waker, &stop))
        .map_err(AgentError::Thread)
}

/// Starts the watch thread (load-balancer nodes; idle elsewhere).
pub fn spawn_watch(
    shared: Arc<ClusterShared>,
    waker: Waker,
    stop: Arc<AtomicBool>,
) -> Result<JoinHandle<()>, AgentError> {
    std::thread::Builder::new()
        .name("lessnat-agent-watch".into())
        .spawn(move || watch(&shared, &waker, &stop))
        .map_err(AgentError::Thread)
}

/// On a load-balancer node that planned with current registrations (and so
/// probed nothing), the health of every replica address it balances as the
/// registrations say, in the form of probes (for status and metrics);
/// `None` otherwise.
pub fn registered_health(spec: &Spec, node: &str, observed: &Observed) -> Option<Vec<Probe>> {
    let view = observed.cluster.as_ref().filter(|v| v.is_current())?;
    if !observed.probes.is_empty() {
        return None;
    }
    let role = load_balancer_role(spec, node)?;
    let mut probes = Vec::new();
    for vip_port in &role.vip_ports {
        let service = &vip_port.service.name.value;
        for replica in replicas_of(spec, vip_port.service) {
            for address in [replica.pair.address, replica.pair.next_address] {
                let address = address.to_string();
                let healthy = view
                    .replicas
                    .iter()
                    .any(|r| &r.service == service && r.address == address && r.healthy);
                probes.push(Probe {
                    service: service.clone(),
                    address,
                    healthy,
                    detail: (!healthy).then(|| "not registered healthy".to_string()),
                });
            }
        }
    }
    probes.sort();
    probes.dedup();
    Some(probes)
}

fn register(netns: &Netns, shared: &ClusterShared, waker: &Waker, stop: &AtomicBool) {
    let mut registrar: Option<(Cluster, Registrar)> = None;
    let mut running: Vec<RunningReplica> = Vec::new();
    let mut docker: Option<Docker> = None;
    let mut probed: Option<Instant> = None;
    let mut healths = Healths::default();
    while !stop.load(Ordering::SeqCst) {
        let target = shared.target();
        let Some((target, cluster)) = target.and_then(|t| t.spec.cluster.clone().map(|c| (t, c)))
        else {
            if let Some((_, mut old)) = registrar.take() {
                let _ = old.revoke();
            }
            sleep_unless_stopped(stop, IDLE);
            continue;
        };
        if let Some((_, mut old)) = registrar.take_if(|(c, _)| *c != cluster) {
            // The old cluster may be gone: its lease then just expires.
            let _ = old.revoke();
        }
        if registrar.is_none() {
            match Registrar::new(&cluster) {
                Ok(new) => registrar = Some((cluster.clone(), new)),
                Err(error) => {
                    if shared.failed(&error) {
                        waker.wake(Trigger::Cluster, "etcd became unreachable");
                    }
                    sleep_unless_stopped(stop, RETRY);
                    continue;
                }
            }
        }
        let Some((_, current)) = registrar.as_mut() else {
            continue;
        };
        let due = worker_role(&target.spec, &target.node).is_some()
            && probed.is_none_or(|at| at.elapsed() >= own_probe_period(&target.spec, &target.node));
        if due {
            if docker.is_none() {
                docker = Docker::connect().ok();
            }
            // With the engine away, keep what ran (their probes say whether they answer).
            if let Some((containers, _)) =
                docker.as_ref().and_then(|d| d.observe(&target.node).ok())
            {
                running = running_replicas(&target.spec, &containers);
            }
            let addresses: Vec<(String, IpAddr)> = running
                .iter()
                .map(|r| (r.service.clone(), r.address))
                .collect();
            let probes = probe_own_replicas(&target.spec, &addresses, netns);
            healths.observe(&running, &probes, now());
            probed = Some(Instant::now());
        }
        let wanted = wanted(&target, &running, &healths);
        match current.step(&wanted) {
            Ok(answered) => {
                let (lease, count) = (
                    current.lease().map(|(id, _)| format!("{id:x}")),
                    current.published(),
                );
                // A step with nothing due asked etcd nothing: it must not
                // mark as reachable an etcd the watch just found gone.
                let back = answered && shared.worked();
                shared.update_link(|link| {
                    link.lease = lease;
                    link.registrations = count;
                });
                if back {
                    waker.wake(Trigger::Cluster, "etcd is reachable again");
                }
            }
            Err(error) => {
                tracing::debug!("registering in etcd: {}", chain(&error));
                if shared.failed(&error) {
                    waker.wake(Trigger::Cluster, "etcd became unreachable");
                }
                sleep_unless_stopped(stop, RETRY);
                continue;
            }
        }
        sleep_unless_stopped(stop, TICK);
    }
    if let Some(Err(error)) = registrar.map(|(_, mut registrar)| registrar.revoke()) {
        tracing::warn!(
            "could not revoke the node's lease (its registrations go when it expires): {}",
            chain(&error)
        );
    }
}

/// How often a worker probes its own replicas: the shortest
/// `health.interval` of the routed services it runs (100 ms at least).
fn own_probe_period(spec: &Spec, node: &str) -> Duration {
    spec.services
        .iter()
        .filter(|s| s.replicas.iter().any(|r| r.node.value == node))
        .map(|s| {
            s.health
                .as_ref()
                .map_or(Duration::from_secs(1), |h| h.interval.value.get())
        })
        .min()
        .unwrap_or(Duration::from_secs(1))
        .max(Duration::from_millis(100))
}

/// What `target`'s node registers: its record and its `running`
/// replicas, each with the health `healths` registers for it (unhealthy
/// before its first probe).
fn wanted(target: &Target, running: &[RunningReplica], healths: &Healths) -> Wanted {
    let replicas = running
        .iter()
        .map(|replica| {
            let health = healths.of(replica);
            let record = ReplicaRecord {
                node: target.node.clone(),
                replica: replica.replica,
                version: replica.version.clone(),
                slot: replica.slot,
                healthy: health.is_some_and(|h| h.healthy),
                since: health.map_or_else(now, |h| h.since),
            };
            (
                (replica.service.clone(), replica.address.to_string()),
                record,
            )
        })
        .collect();
    Wanted {
        node: target.node.clone(),
        record: NodeRecord {
            roles: roles(&target.spec, &target.node),
            commit: target.commit.clone(),
            spec_hash: spec_hash(&target.spec),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            // The registrar writes when it was granted the lease.
            since: 0,
        },
        replicas,
    }
}

/// `sha256:` and the hash of the spec's JSON form.
fn spec_hash(spec: &Spec) -> String {
    let json = serde_json::to_vec(spec).unwrap_or_default();
    let digest = Sha256::digest(&json);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// A watch of the replica registrations and the view it keeps.
struct Watching {
    cluster: Cluster,
    keys: Keys,
    watch: Watch,
    view: ClusterView,
}

fn watch(shared: &ClusterShared, waker: &Waker, stop: &AtomicBool) {
    let mut watching: Option<Watching> = None;
    while !stop.load(Ordering::SeqCst) {
        let cluster = shared.target().and_then(|t| {
            load_balancer_role(&t.spec, &t.node)?;
            t.spec.cluster.clone()
        });
        let Some(cluster) = cluster else {
            watching = None;
            *lock(&shared.view) = None;
            sleep_unless_stopped(stop, IDLE);
            continue;
        };
        if watching.as_ref().is_some_and(|w| w.cluster != cluster) {
            watching = None;
        }
        let Some(current) = watching.as_mut() else {
            match start_watch(&cluster) {
                Ok(started) => {
                    let count = started.view.replicas.len();
                    let changed = publish(shared, &cluster, &started.view);
                    shared.worked();
                    shared.update_link(|link| link.watched = Some(count));
                    if changed {
                        waker.wake(
                            Trigger::Cluster,
                            format!("read {count} replica registrations"),
                        );
                    }
                    watching = Some(started);
                }
                Err(error) => {
                    let since = lock(&shared.link).unreachable_since.unwrap_or_else(now);
                    let view = ClusterView::unreachable(chain(&error), since);
                    let changed = publish(shared, &cluster, &view);
                    shared.failed(&error);
                    if changed {
                        waker.wake(Trigger::Cluster, "etcd became unreachable");
                    }
                    sleep_unless_stopped(stop, RETRY);
                }
            }
            continue;
        };
        match current.watch.next(WATCH_WAIT) {
            Ok(None) => {}
            Ok(Some((revision, changes))) => {
                let changes: Vec<KeyChange> = changes
                    .into_iter()
                    .filter(|c| view::concerns(&current.keys, c))
                    .collect();
                if changes.is_empty() {
                    continue;
                }
                view::apply(&mut current.view, &current.keys, revision, &changes);
                let count = current.view.replicas.len();
                publish(shared, &cluster, &current.view);
                shared.update_link(|link| link.watched = Some(count));
                waker.wake(Trigger::Cluster, describe(&current.keys, &changes));
            }
            Err(error) => {
                // Read again and watch anew at once (another member answers).
                tracing::debug!("watching registrations: {}", chain(&error));
                watching = None;
            }
        }
    }
}

/// Reads the view of `cluster` and watches it from there.
fn start_watch(cluster: &Cluster) -> Result<Watching, EtcdError> {
    let etcd = Etcd::connect(&etcd_config(&cluster.etcd))?;
    let keys = keys(&cluster.etcd);
    let view = view::read(&etcd, &keys)?;
    let watch = etcd.watch_prefix(&view::watched(&keys), view.revision + 1)?;
    Ok(Watching {
        cluster: cluster.clone(),
        keys,
        watch,
        view,
    })
}

/// Makes `view` the one runs plan with; whether it differs from the last
/// one in what the planner reads (reachability, registrations, upgrades
/// and acknowledgements).
fn publish(shared: &ClusterShared, cluster: &Cluster, view: &ClusterView) -> bool {
    let mut current = lock(&shared.view);
    let changed = current.as_ref().is_none_or(|(c, v)| {
        c != cluster
            || v.is_current() != view.is_current()
            || v.replicas != view.replicas
            || v.upgrades != view.upgrades
            || v.acks != view.acks
    });
    *current = Some((cluster.clone(), view.clone()));
    changed
}

/// What changed, for people: `api 10.20.1.5 registered healthy`, `api
/// 10.20.1.5 deregistered`, `api 10.20.1.5 upgrade published`, `api
/// 10.20.1.5 acknowledged by lb-1`.
fn describe(keys: &Keys, changes: &[KeyChange]) -> String {
    let said: Vec<String> = changes
        .iter()
        .filter_map(|change| {
            let (key, put) = match change {
                KeyChange::Put(entry) => (entry.key.as_str(), Some(&entry.value)),
                KeyChange::Delete { key, .. } => (key.as_str(), None),
            };
            if let Some((service, address)) = keys.replica_of(key) {
                let what = match put {
                    Some(value) => match serde_json::from_slice::<ReplicaRecord>(value) {
                        Ok(r) if r.healthy => "registered healthy",
                        Ok(_) => "registered unhealthy",
                        Err(_) => "registered unreadable",
                    },
                    None => "deregistered",
                };
                return Some(format!("{service} {address} {what}"));
            }
            if let Some((service, from)) = keys.upgrade_of(key) {
                let what = if put.is_some() { "published" } else { "ended" };
                return Some(format!("{service} {from} upgrade {what}"));
            }
            let (service, from, node) = keys.ack_of(key)?;
            let what = if put.is_some() {
                "acknowledged by"
            } else {
                "acknowledgement deleted of"
            };
            Some(format!("{service} {from} {what} {node}"))
        })
        .collect();
    format!("registrations changed: {}", said.join(", "))
}
