//! Load-balancer nodes probe the replica addresses of the services they serve
//! (both addresses of each replica: the one in use and the one an upgrade
//! starts the next version at). A worker has no other way to tell them that a
//! next version is ready: it answers health checks at its own address. The
//! probes run in parallel, inside the node's network namespace, through the
//! routes lessnat set up to the workers, each for at most
//! [`LB_PROBE_TIMEOUT`], so an apply with a dead replica stays short.

use std::net::IpAddr;
use std::time::Duration;

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

/// Probes every replica address of the routed services `node` balances; empty
/// when `node` is not a load-balancer node. Services whose only check is an
/// `exec` (or that have no TCP port) cannot be probed from another host and
/// are left out: a load-balancer node then keeps sending their new
/// connections where it did.
pub fn probe_replicas(spec: &Spec, node: &str, netns: &Netns) -> Vec<Probe> {
    let Some(role) = load_balancer_role(spec, node) else {
        return Vec::new();
    };
    let mut services: Vec<&Service> = role.vip_ports.iter().map(|v| v.service).collect();
    services.dedup_by(|a, b| a.name.value == b.name.value);
    let targets: Vec<(&Service, NetworkCheck, IpAddr)> = services
        .into_iter()
        .filter_map(|service| Some((service, NetworkCheck::of(service, false)?)))
        .flat_map(|(service, check)| {
            replicas_of(spec, service)
                .into_iter()
                .flat_map(move |replica| {
                    [replica.pair.address, replica.pair.next_address]
                        .map(|ip| (service, check.clone(), IpAddr::V4(ip)))
                })
        })
        .collect();
    let mut probes: Vec<Probe> = std::thread::scope(|scope| {
        let running: Vec<_> = targets
            .iter()
            .map(|(service, check, ip)| {
                scope.spawn(move || {
                    let outcome = netns
                        .run(|| check.run(*ip, probe_timeout(service).min(LB_PROBE_TIMEOUT)))
                        .map_err(|e| chain(&e))
                        .and_then(|r| r.map_err(|e| chain(&e)));
                    Probe {
                        service: service.name.value.clone(),
                        address: ip.to_string(),
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
