//! A node's registrations: what it registers (its record, and on workers
//! each routed replica it runs with its health by the worker's own probe),
//! and the [`Registrar`] that keeps them in etcd under one lease
//! ([`KeptLease`]). A new lease (after etcd was lost for longer than the
//! TTL), or the same one kept alive again after a renewal went unanswered,
//! gets everything written again; revoking the lease (a clean stop)
//! removes it all at once.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::backend::etcd::{Etcd, EtcdError, LeaseId};
use crate::desired::routed::{load_balancer_role, worker_role};
use crate::model::{Container, Probe};
use crate::ownership::Slot;
use crate::spec::{Cluster, NetworkMode, Spec};

use super::config::{etcd_config, keys, lease_ttl};
use super::keys::{Keys, NodeRecord, ReplicaRecord, ReplicaSlot, Role};
use super::lease::{KeptLease, Renewals};

/// A routed replica a worker runs: a running primary or next container
/// wired in at an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningReplica {
    /// The service.
    pub service: String,
    /// The address it is wired in at.
    pub address: IpAddr,
    /// Its number among the service's replicas on the node.
    pub replica: u32,
    /// Primary or next.
    pub slot: ReplicaSlot,
    /// The container's spec hash.
    pub version: String,
}

/// The roles `node` has in `spec`.
pub fn roles(spec: &Spec, node: &str) -> Vec<Role> {
    let mut roles = Vec::new();
    if load_balancer_role(spec, node).is_some() {
        roles.push(Role::LoadBalancer);
    }
    if worker_role(spec, node).is_some() {
        roles.push(Role::Worker);
    }
    let hosts = spec.services.iter().any(|s| {
        s.network == NetworkMode::Host && s.node.as_ref().is_some_and(|n| n.value == node)
    });
    if hosts {
        roles.push(Role::Host);
    }
    roles
}

/// The routed replicas among a node's `containers`: running primary and
/// next containers of routed services of `spec` that carry an address.
pub fn running_replicas(spec: &Spec, containers: &[Container]) -> Vec<RunningReplica> {
    let routed = |name: &str| {
        spec.services
            .iter()
            .any(|s| s.name.value == name && s.network == NetworkMode::Routed)
    };
    let mut running: Vec<RunningReplica> = containers
        .iter()
        .filter(|c| c.state == "running" && routed(&c.service))
        .filter_map(|c| {
            let slot = match c.slot {
                Slot::Primary => ReplicaSlot::Primary,
                Slot::Next => ReplicaSlot::Next,
                Slot::Prev => return None,
            };
            let name = crate::ownership::parse_container_name(&c.name)?;
            Some(RunningReplica {
                service: c.service.clone(),
                address: c.address.as_deref()?.parse().ok()?,
                replica: name.replica,
                slot,
                version: c.spec_hash.clone(),
            })
        })
        .collect();
    running.sort_by(|a, b| (&a.service, a.address).cmp(&(&b.service, b.address)));
    running
}

/// Whether a running replica's probe passed (true too when its service
/// has no network check, `exec` only, and it runs).
fn passed(replica: &RunningReplica, probes: &[Probe]) -> bool {
    let address = replica.address.to_string();
    probes
        .iter()
        .find(|p| p.service == replica.service && p.address == address)
        .is_none_or(|p| p.healthy)
}

/// How many probes in a row must fail before a replica registered healthy
/// is registered unhealthy: one probe that times out on a loaded worker
/// would otherwise move every load-balancer node's spread (and, during an
/// upgrade, make them fail back to the old address being removed).
pub const UNHEALTHY_AFTER: u32 = 2;

/// One replica's registered health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegisteredHealth {
    /// What is registered.
    pub healthy: bool,
    /// Since when (seconds since the Unix epoch).
    pub since: u64,
    /// Probes failed in a row while registered healthy.
    failed: u32,
}

/// The health a worker registers for each replica it runs, from its rounds
/// of probes: healthy at the first probe that passes, unhealthy from the
/// first probe of a replica that has not passed yet or after
/// [`UNHEALTHY_AFTER`] failed probes in a row.
#[derive(Debug, Clone, Default)]
pub struct Healths {
    by_replica: BTreeMap<(String, IpAddr), RegisteredHealth>,
}

impl Healths {
    /// Takes in one round of `probes` of the `running` replicas at `now`
    /// (seconds since the Unix epoch); replicas no longer running are
    /// forgotten.
    pub fn observe(&mut self, running: &[RunningReplica], probes: &[Probe], now: u64) {
        let mut next = BTreeMap::new();
        for replica in running {
            let key = (replica.service.clone(), replica.address);
            let ok = passed(replica, probes);
            let health = match self.by_replica.get(&key) {
                Some(was) if ok && was.healthy => RegisteredHealth { failed: 0, ..*was },
                Some(was) if !ok && was.healthy && was.failed + 1 < UNHEALTHY_AFTER => {
                    RegisteredHealth {
                        failed: was.failed + 1,
                        ..*was
                    }
                }
                Some(was) if ok == was.healthy => *was,
                _ => RegisteredHealth {
                    healthy: ok,
                    since: now,
                    failed: 0,
                },
            };
            next.insert(key, health);
        }
        self.by_replica = next;
    }

    /// `replica`'s registered health; `None` before its first probe.
    pub fn of(&self, replica: &RunningReplica) -> Option<RegisteredHealth> {
        self.by_replica
            .get(&(replica.service.clone(), replica.address))
            .copied()
    }
}

/// Everything one node registers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// The node.
    pub node: String,
    /// Its record (`since` is the registrar's: when the lease was granted).
    pub record: NodeRecord,
    /// Its replicas' records, by service and address.
    pub replicas: BTreeMap<(String, String), ReplicaRecord>,
}

/// Keeps one node's registrations in etcd under one lease.
#[derive(Debug)]
pub struct Registrar {
    etcd: Etcd,
    keys: Keys,
    ttl: Duration,
    lease: Option<Kept>,
    /// What is written under the current lease, by key.
    published: BTreeMap<String, Vec<u8>>,
}

/// A lease being kept alive.
#[derive(Debug)]
struct Kept {
    lease: KeptLease,
    granted: Instant,
    /// When it was granted, in seconds since the Unix epoch: the node
    /// record's `since`.
    granted_unix: u64,
    /// When its renewals were last answered, as of the last step.
    answered: Option<Instant>,
}

impl Registrar {
    /// A registrar for the etcd of `cluster` (no lease yet).
    pub fn new(cluster: &Cluster) -> Result<Registrar, EtcdError> {
        Ok(Registrar {
            etcd: Etcd::connect(&etcd_config(&cluster.etcd))?,
            keys: keys(&cluster.etcd),
            ttl: lease_ttl(&cluster.etcd),
            lease: None,
            published: BTreeMap::new(),
        })
    }

    /// The lease the registrations live under, and when it was granted.
    pub fn lease(&self) -> Option<(LeaseId, Instant)> {
        self.lease.as_ref().map(|k| (k.lease.id(), k.granted))
    }

    /// How many keys are written under the lease.
    pub fn published(&self) -> usize {
        self.published.len()
    }

    /// Makes etcd hold `wanted` under a live lease: grants one when there is
    /// none (or it expired), writes what changed and deletes what is no
    /// longer wanted (in one transaction). The lease is renewed on a thread
    /// of its own ([`KeptLease`]); once a renewal went unanswered, nothing
    /// is written until etcd answers whether the lease is still there: if
    /// it is, it is kept alive again and everything written again (writes
    /// that timed out meanwhile may or may not have landed). The node
    /// record's `since` is when the lease was granted. Returns whether etcd
    /// answered a call (a renewal counts): a step with nothing due makes
    /// none, and says nothing of whether etcd is reachable.
    pub fn step(&mut self, wanted: &Wanted) -> Result<bool, EtcdError> {
        let mut answered = false;
        let mut expired = false;
        if let Some(kept) = self.lease.as_mut() {
            let renewed = kept.lease.answered();
            answered = renewed > kept.answered;
            kept.answered = renewed;
            match kept.lease.renewals() {
                Renewals::Answered => {}
                Renewals::Gone => expired = true,
                Renewals::Unanswered => {
                    let id = kept.lease.id();
                    match self.etcd.lease_left(id)? {
                        Some(_) => {
                            let keeper = self.etcd.keep_alive(id)?;
                            kept.lease = KeptLease::start(keeper, self.ttl / 3)?;
                            self.published.clear();
                        }
                        None => expired = true,
                    }
                    answered = true;
                }
            }
        }
        if expired {
            self.lease = None;
            self.published.clear();
        }
        let (lease, since) = match &self.lease {
            Some(kept) => (kept.lease.id(), kept.granted_unix),
            None => {
                let lease = self.etcd.grant(self.ttl)?;
                let keeper = self.etcd.keep_alive(lease)?;
                let kept = KeptLease::start(keeper, self.ttl / 3)?;
                self.lease = Some(Kept {
                    answered: kept.answered(),
                    lease: kept,
                    granted: Instant::now(),
                    granted_unix: super::view::now(),
                });
                self.published.clear();
                answered = true;
                (lease, super::view::now())
            }
        };
        let mut values: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let record = NodeRecord {
            since,
            ..wanted.record.clone()
        };
        values.insert(self.keys.node(&wanted.node), to_json(&record));
        for ((service, address), record) in &wanted.replicas {
            values.insert(self.keys.replica(service, address), to_json(record));
        }
        let gone: Vec<String> = self
            .published
            .keys()
            .filter(|k| !values.contains_key(*k))
            .cloned()
            .collect();
        let changed: Vec<(String, Vec<u8>)> = values
            .into_iter()
            .filter(|(key, value)| self.published.get(key) != Some(value))
            .collect();
        if !gone.is_empty() || !changed.is_empty() {
            // One round trip for all of them: a slow link must not outlast
            // the lease between two renewals.
            self.etcd.write_all(&changed, &gone, Some(lease))?;
            for key in gone {
                self.published.remove(&key);
            }
            self.published.extend(changed);
            answered = true;
        }
        Ok(answered)
    }

    /// Revokes the lease: every registration goes at once.
    pub fn revoke(&mut self) -> Result<(), EtcdError> {
        self.published.clear();
        match self.lease.take() {
            Some(kept) => self.etcd.revoke(kept.lease.id()),
            None => Ok(()),
        }
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // Plain structs of strings and numbers always serialise.
    serde_json::to_vec(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Spec {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/cluster.yaml"
        ))
        .expect("example");
        crate::spec::load_bytes("cluster.yaml", text.as_bytes()).expect("valid")
    }

    fn container(name: &str, slot: Slot, state: &str, address: &str) -> Container {
        Container {
            id: name.into(),
            name: name.into(),
            service: "api".into(),
            slot,
            spec_hash: "sha256:aa".into(),
            image: "registry.example/api:7".into(),
            ports: Vec::new(),
            state: state.into(),
            health: None,
            pid: None,
            address: Some(address.into()),
            stop_timeout: None,
            digest: None,
        }
    }

    fn probe(address: &str, healthy: bool) -> Probe {
        Probe {
            service: "api".into(),
            address: address.into(),
            healthy,
            detail: None,
        }
    }

    fn replica(address: &str) -> RunningReplica {
        RunningReplica {
            service: "api".into(),
            address: address.parse().expect("address"),
            replica: 0,
            slot: ReplicaSlot::Primary,
            version: "sha256:aa".into(),
        }
    }

    #[test]
    fn a_replica_is_registered_unhealthy_after_failed_probes_in_a_row() {
        let (a, b) = (replica("10.20.1.5"), replica("10.20.1.6"));
        let running = [a.clone(), b.clone()];
        let mut healths = Healths::default();
        assert_eq!(healths.of(&a), None, "before the first round");
        healths.observe(
            &running,
            &[probe("10.20.1.5", true), probe("10.20.1.6", false)],
            10,
        );
        let registered = |h: &Healths, r: &RunningReplica| h.of(r).map(|h| (h.healthy, h.since));
        assert_eq!(registered(&healths, &a), Some((true, 10)));
        assert_eq!(
            registered(&healths, &b),
            Some((false, 10)),
            "a replica that never passed is unhealthy at once"
        );
        // One failed probe is not enough; a pass in between starts again.
        for (now, ok) in [(11, false), (12, true), (13, false)] {
            healths.observe(
                &running,
                &[probe("10.20.1.5", ok), probe("10.20.1.6", false)],
                now,
            );
            assert_eq!(registered(&healths, &a), Some((true, 10)), "at {now}");
        }
        let failing = [probe("10.20.1.5", false), probe("10.20.1.6", true)];
        healths.observe(&running, &failing, 14);
        assert_eq!(
            registered(&healths, &a),
            Some((false, 14)),
            "{UNHEALTHY_AFTER} failures in a row"
        );
        assert_eq!(
            registered(&healths, &b),
            Some((true, 14)),
            "healthy at the first pass"
        );
        healths.observe(&running, &failing, 15);
        assert_eq!(registered(&healths, &a), Some((false, 14)), "since stays");
        healths.observe(std::slice::from_ref(&b), &failing, 16);
        assert_eq!(healths.of(&a), None, "gone when it no longer runs");
    }

    #[test]
    fn a_worker_registers_its_running_primaries_and_nexts() {
        let spec = spec();
        assert_eq!(roles(&spec, "lb-1"), [Role::LoadBalancer]);
        assert_eq!(roles(&spec, "web-1"), [Role::Worker]);
        let containers = vec![
            container("lessnat-api.web-1", Slot::Primary, "running", "10.20.1.5"),
            container(
                "lessnat-api.web-1.next",
                Slot::Next,
                "running",
                "10.20.1.254",
            ),
            container("lessnat-api.web-1.prev", Slot::Prev, "running", "10.20.1.6"),
            container("lessnat-api.web-1.2", Slot::Primary, "exited", "10.20.1.7"),
        ];
        let running = running_replicas(&spec, &containers);
        let found: Vec<(String, ReplicaSlot)> = running
            .iter()
            .map(|r| (r.address.to_string(), r.slot))
            .collect();
        assert_eq!(
            found,
            [
                ("10.20.1.5".to_string(), ReplicaSlot::Primary),
                ("10.20.1.254".to_string(), ReplicaSlot::Next)
            ]
        );
        assert!(!passed(&running[0], &[probe("10.20.1.5", false)]));
        assert!(passed(&running[0], &[]), "not probed: it runs");
    }
}
