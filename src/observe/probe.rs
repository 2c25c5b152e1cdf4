//! Load-balancer nodes probe the replica addresses of the services they serve
//! (both addresses of each replica: the one in use and the one an upgrade
//! starts the next version at). A worker has no other way to tell them that a
//! next version is ready: it answers health checks at its own address. The
//! probes run in parallel, inside the node's network namespace, through the
//! routes lessnat set up to the workers, each for at most
//! [`LB_PROBE_TIMEOUT`], so an apply with a dead replica stays short.
//! A round that just ran (the agent's health watch) can stand in for a new
//! one: see [`RecentProbes`].

use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::desired::routed::{load_balancer_role, replicas_of};
use crate::error::chain;
use crate::health::{NetworkCheck, probe_timeout};
use crate::model::Probe;
use crate::netns::Netns;
use crate::spec::{Service, Spec};

/// The longest a load-balancer node's probe of one replica address waits
/// (shorter when the service's `health.timeout` is). A dead replica's address
/// often does not refuse but stays silent (a worker's ICMP errors are rate
/// limited, a dead host answers nothing); one apply waits for its probes,
/// and it must stay well inside a 1 s timer. A replica one hop away whose
/// health check takes longer than this counts as not answering.
pub const LB_PROBE_TIMEOUT: Duration = Duration::from_millis(300);

/// One replica address a load-balancer node probes, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ProbeTarget<'a> {
    service: &'a str,
    check: NetworkCheck<'a>,
    address: IpAddr,
    timeout: Duration,
}

/// What `node` probes for `spec`: every replica address of the routed
/// services it balances; empty when `node` is not a load-balancer node.
/// Services whose only check is an `exec` (or that have no TCP port) cannot
/// be probed from another host and are left out.
fn probe_targets<'a>(spec: &'a Spec, node: &str) -> Vec<ProbeTarget<'a>> {
    let Some(role) = load_balancer_role(spec, node) else {
        return Vec::new();
    };
    let mut services: Vec<&Service> = role.vip_ports.iter().map(|v| v.service).collect();
    services.dedup_by(|a, b| a.name.value == b.name.value);
    services
        .into_iter()
        .filter_map(|service| Some((service, NetworkCheck::of(service, false)?)))
        .flat_map(|(service, check)| {
            replicas_of(spec, service)
                .into_iter()
                .flat_map(move |replica| {
                    [replica.pair.address, replica.pair.next_address].map(|ip| ProbeTarget {
                        service: &service.name.value,
                        check: check.clone(),
                        address: ip,
                        timeout: probe_timeout(service).min(LB_PROBE_TIMEOUT),
                    })
                })
        })
        .collect()
}

/// Probes every replica address of the routed services `node` balances; empty
/// when `node` is not a load-balancer node. Services whose only check is an
/// `exec` (or that have no TCP port) cannot be probed from another host and
/// are left out: a load-balancer node then keeps sending their new
/// connections where it did.
pub fn probe_replicas(spec: &Spec, node: &str, netns: &Netns) -> Vec<Probe> {
    probe(&probe_targets(spec, node), netns)
}

/// Probes, from a worker, the replicas it runs at `addresses` (service and
/// address) with their services' checks, like a load-balancer node does
/// (each for at most [`LB_PROBE_TIMEOUT`]). Replicas whose service has no
/// network check (`exec` only) are left out.
pub fn probe_own_replicas(
    spec: &Spec,
    addresses: &[(String, IpAddr)],
    netns: &Netns,
) -> Vec<Probe> {
    let targets: Vec<ProbeTarget> = addresses
        .iter()
        .filter_map(|(name, address)| {
            let service = spec.services.iter().find(|s| s.name.value == *name)?;
            Some(ProbeTarget {
                service: &service.name.value,
                check: NetworkCheck::of(service, false)?,
                address: *address,
                timeout: probe_timeout(service).min(LB_PROBE_TIMEOUT),
            })
        })
        .collect();
    probe(&targets, netns)
}

/// Runs `targets` in parallel inside `netns`.
fn probe(targets: &[ProbeTarget], netns: &Netns) -> Vec<Probe> {
    let mut probes: Vec<Probe> = std::thread::scope(|scope| {
        let running: Vec<_> = targets
            .iter()
            .map(|target| {
                scope.spawn(move || {
                    let outcome = netns
                        .run(|| target.check.run(target.address, target.timeout))
                        .map_err(|e| chain(&e))
                        .and_then(|r| r.map_err(|e| chain(&e)));
                    Probe {
                        service: target.service.to_string(),
                        address: target.address.to_string(),
                        healthy: outcome.is_ok(),
                        detail: outcome.err(),
                    }
                })
            })
            .collect();
        running
            .into_iter()
            .filter_map(|handle| handle.join().ok())
            .collect()
    });
    probes.sort();
    probes
}

/// A round of [`probe_replicas`] that just ran (the agent's health watch),
/// which an observation may use instead of probing again: only while it is
/// younger than its `max_age` and was made for the same addresses and checks
/// as the spec being planned.
#[derive(Debug, Clone)]
pub struct RecentProbes {
    spec: Spec,
    node: String,
    probes: Vec<Probe>,
    finished: Instant,
    max_age: Duration,
}

impl RecentProbes {
    /// The `probes` of one round for `spec` on `node`, finished at
    /// `finished`, good for `max_age` after that.
    pub fn new(
        spec: Spec,
        node: String,
        probes: Vec<Probe>,
        finished: Instant,
        max_age: Duration,
    ) -> RecentProbes {
        RecentProbes {
            spec,
            node,
            probes,
            finished,
            max_age,
        }
    }

    /// The probes, and how long ago they finished, when they may stand in
    /// for probing `spec` on `node` at `now`; `None` when they are older
    /// than their `max_age` or the spec now asks for other probes.
    pub fn for_plan(&self, spec: &Spec, node: &str, now: Instant) -> Option<(&[Probe], Duration)> {
        let age = now.checked_duration_since(self.finished)?;
        let same = probe_targets(&self.spec, &self.node) == probe_targets(spec, node);
        (age <= self.max_age && same).then_some((&self.probes, age))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::load_bytes;

    fn load(text: &str) -> Spec {
        load_bytes("routed.yaml", text.as_bytes())
            .unwrap_or_else(|r| panic!("{}", r.render(crate::style::Style::Plain)))
    }

    fn example() -> String {
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/routed.yaml"))
            .expect("example exists")
    }

    fn round(spec: &Spec, finished: Instant) -> RecentProbes {
        let probes = probe_targets(spec, "lb-1")
            .iter()
            .map(|target| Probe {
                service: target.service.to_string(),
                address: target.address.to_string(),
                healthy: target.address.to_string() != "10.20.2.5",
                detail: None,
            })
            .collect();
        RecentProbes::new(
            spec.clone(),
            "lb-1".into(),
            probes,
            finished,
            Duration::from_millis(200),
        )
    }

    #[test]
    fn a_load_balancer_probes_both_addresses_of_each_replica() {
        let spec = load(&example());
        let addresses: Vec<String> = probe_targets(&spec, "lb-1")
            .iter()
            .map(|t| t.address.to_string())
            .collect();
        assert_eq!(
            addresses,
            ["10.20.1.5", "10.20.1.254", "10.20.2.5", "10.20.2.254"]
        );
        assert!(
            probe_targets(&spec, "web-1").is_empty(),
            "a worker probes none"
        );
    }

    #[test]
    fn a_fresh_round_for_the_same_probes_is_reused() {
        let spec = load(&example());
        let finished = Instant::now();
        let recent = round(&spec, finished);
        let (probes, age) = recent
            .for_plan(&spec, "lb-1", finished + Duration::from_millis(150))
            .expect("fresh and for the same spec");
        assert_eq!(age, Duration::from_millis(150));
        assert_eq!(probes.len(), 4);
        assert!(
            probes
                .iter()
                .any(|p| p.address == "10.20.2.5" && !p.healthy)
        );
        let edited = load(&example().replace("drainTimeout: 2m", "drainTimeout: 1m"));
        assert!(
            recent.for_plan(&edited, "lb-1", finished).is_some(),
            "an edit that changes no probe keeps the round"
        );
    }

    #[test]
    fn a_stale_round_or_one_for_other_probes_is_not_reused() {
        let spec = load(&example());
        let finished = Instant::now();
        let recent = round(&spec, finished);
        assert!(
            recent
                .for_plan(&spec, "lb-1", finished + Duration::from_millis(201))
                .is_none(),
            "older than one probe period"
        );
        assert!(
            recent.for_plan(&spec, "web-1", finished).is_none(),
            "a node that probes nothing"
        );
        let moved = load(&example().replace("10.20.2.5 }", "10.20.2.6 }"));
        assert!(
            recent.for_plan(&moved, "lb-1", finished).is_none(),
            "a replica at another address"
        );
        let other_check = load(&example().replace("path: /healthz", "path: /ready"));
        assert!(
            recent.for_plan(&other_check, "lb-1", finished).is_none(),
            "another health check"
        );
    }
}
