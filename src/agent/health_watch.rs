//! The agent's health source on load-balancer nodes: a thread probes every
//! replica address of the routed services the node balances, every
//! `health.interval` (the shortest of those services), and wakes the agent
//! when any address changes from answering to not or back, so a dead replica
//! leaves the spread within one interval plus one probe and one transaction.
//! The run it wakes plans with the round that found the change
//! ([`HealthShared::recent`]) instead of probing again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::AgentError;
use super::container_events::sleep_unless_stopped;
use super::wake::{Trigger, Waker};
use crate::desired::routed::load_balancer_role;
use crate::model::Probe;
use crate::netns::Netns;
use crate::observe::probe::{RecentProbes, probe_replicas};
use crate::spec::Spec;

/// How long the thread waits when the node balances nothing (the spec may
/// change), or before the agent's first run.
const IDLE: Duration = Duration::from_millis(200);

/// The shortest probe period: a spec asking for less gets this.
const MIN_PERIOD: Duration = Duration::from_millis(100);

/// What the thread probes for: the spec the agent last loaded and the node.
#[derive(Debug, Default)]
pub struct HealthShared {
    target: Mutex<Option<(Spec, String)>>,
    probes: Mutex<Vec<Probe>>,
    recent: Mutex<Option<RecentProbes>>,
}

impl HealthShared {
    /// From now on, probe for `spec` on `node`, and look for changes from
    /// `probes` (what the agent's last run planned with).
    pub fn set_target(&self, spec: &Spec, node: &str, probes: &[Probe]) {
        *self.target.lock().unwrap_or_else(PoisonError::into_inner) =
            Some((spec.clone(), node.to_string()));
        *self.probes.lock().unwrap_or_else(PoisonError::into_inner) = probes.to_vec();
    }

    /// The last round of probes, good for one probe period after it
    /// finished; `None` before the first.
    pub fn recent(&self) -> Option<RecentProbes> {
        self.recent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn target(&self) -> Option<(Spec, String)> {
        self.target
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// How often `node` probes its replicas: the shortest `health.interval` of
/// the routed services it balances (1 s for a service without health
/// settings); `None` when it balances none.
pub fn probe_period(spec: &Spec, node: &str) -> Option<Duration> {
    let role = load_balancer_role(spec, node)?;
    role.vip_ports
        .iter()
        .map(|v| {
            v.service
                .health
                .as_ref()
                .map_or(Duration::from_secs(1), |h| h.interval.value.get())
        })
        .min()
        .map(|period| period.max(MIN_PERIOD))
}

/// Probes on a thread until `stop` is set.
pub fn spawn(
    netns: Netns,
    shared: Arc<HealthShared>,
    waker: Waker,
    stop: Arc<AtomicBool>,
) -> Result<JoinHandle<()>, AgentError> {
    std::thread::Builder::new()
        .name("lessnat-agent-health".into())
        .spawn(move || watch(&netns, &shared, &waker, &stop))
        .map_err(AgentError::Thread)
}

fn watch(netns: &Netns, shared: &HealthShared, waker: &Waker, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        let Some((spec, node)) = shared.target() else {
            sleep_unless_stopped(stop, IDLE);
            continue;
        };
        let Some(period) = probe_period(&spec, &node) else {
            sleep_unless_stopped(stop, IDLE);
            continue;
        };
        let probes = probe_replicas(&spec, &node, netns);
        *shared.recent.lock().unwrap_or_else(PoisonError::into_inner) = Some(RecentProbes::new(
            spec,
            node,
            probes.clone(),
            Instant::now(),
            period,
        ));
        tracing::debug!(
            "probed {} replica addresses, {} answering; next in {period:?}",
            probes.len(),
            probes.iter().filter(|p| p.healthy).count()
        );
        let before = std::mem::replace(
            &mut *shared.probes.lock().unwrap_or_else(PoisonError::into_inner),
            probes.clone(),
        );
        if let Some(flip) = first_flip(&before, &probes) {
            waker.wake(Trigger::Health, flip);
        }
        sleep_unless_stopped(stop, period);
    }
}

/// The first address whose health differs between two rounds of probes, for
/// people; `None` when none does (or there was no earlier round).
fn first_flip(before: &[Probe], now: &[Probe]) -> Option<String> {
    now.iter().find_map(|probe| {
        let earlier = before
            .iter()
            .find(|b| b.service == probe.service && b.address == probe.address)?;
        (earlier.healthy != probe.healthy).then(|| {
            format!(
                "{} replica {} {}",
                probe.service,
                probe.address,
                if probe.healthy {
                    "answers again"
                } else {
                    "stopped answering"
                }
            )
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(address: &str, healthy: bool) -> Probe {
        Probe {
            service: "web".into(),
            address: address.into(),
            healthy,
            detail: None,
        }
    }

    #[test]
    fn a_flip_is_a_change_of_one_address() {
        let before = [probe("10.0.0.1", true), probe("10.0.0.2", false)];
        assert_eq!(first_flip(&[], &before), None, "no earlier round");
        assert_eq!(first_flip(&before, &before), None);
        let now = [probe("10.0.0.1", false), probe("10.0.0.2", false)];
        assert_eq!(
            first_flip(&before, &now).as_deref(),
            Some("web replica 10.0.0.1 stopped answering")
        );
        assert_eq!(
            first_flip(&now, &before).as_deref(),
            Some("web replica 10.0.0.1 answers again")
        );
    }
}
