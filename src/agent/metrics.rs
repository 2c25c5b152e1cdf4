//! The agent's Prometheus metrics (prometheus-client): its runs by trigger
//! and outcome, the drift it corrected, when and how long it last ran, the
//! health of each replica address a load-balancer node probes, and whether
//! it is suspended. Served at `/metrics` next to reconcile's (when the agent
//! follows a repository).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::cluster::Link;
use super::wake::Trigger;
use crate::model::Probe;

/// Labels of a run.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RunLabels {
    trigger: String,
    outcome: String,
}

/// Labels of a correction.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TriggerLabels {
    trigger: String,
}

/// Labels of a probed replica address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReplicaLabels {
    service: String,
    address: String,
}

/// The agent's metrics; cheap to update from the agent's loop while the HTTP
/// thread encodes them.
#[derive(Debug)]
pub struct AgentMetrics {
    registry: Registry,
    runs: Family<RunLabels, Counter>,
    drift_corrected: Family<TriggerLabels, Counter>,
    last_run: Gauge<f64, AtomicU64>,
    last_run_seconds: Gauge<f64, AtomicU64>,
    replica_healthy: Family<ReplicaLabels, Gauge>,
    suspended: Gauge,
    etcd_up: Gauge,
    registrations: Gauge,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        AgentMetrics::new()
    }
}

impl AgentMetrics {
    /// Every metric at zero.
    pub fn new() -> AgentMetrics {
        let mut registry = Registry::default();
        let runs = Family::<RunLabels, Counter>::default();
        registry.register(
            "lessnat_agent_runs",
            "Agent runs (observe, plan, apply when needed) by what woke the agent and how they ended",
            runs.clone(),
        );
        let drift_corrected = Family::<TriggerLabels, Counter>::default();
        registry.register(
            "lessnat_agent_drift_corrected",
            "Runs that found drift and applied a plan, by what woke the agent (table, container, health, interval, retry)",
            drift_corrected.clone(),
        );
        let last_run = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "lessnat_agent_last_run_timestamp_seconds",
            "When the agent's last run ended",
            last_run.clone(),
        );
        let last_run_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "lessnat_agent_last_run_duration_seconds",
            "How long the agent's last run took",
            last_run_seconds.clone(),
        );
        let replica_healthy = Family::<ReplicaLabels, Gauge>::default();
        registry.register(
            "lessnat_agent_replica_healthy",
            "1 when a replica address this load-balancer node probes answers, else 0",
            replica_healthy.clone(),
        );
        let suspended = Gauge::default();
        registry.register(
            "lessnat_agent_suspended",
            "1 while applies are suspended on this node (lessnat suspend, or an upgrade paused by onFailure: pause)",
            suspended.clone(),
        );
        let etcd_up = Gauge::default();
        registry.register(
            "lessnat_cluster_etcd_up",
            "With the spec's cluster: 1 while this node's agent reaches etcd, 0 while it cannot (serving goes on; registrations and watches pause)",
            etcd_up.clone(),
        );
        let registrations = Gauge::default();
        registry.register(
            "lessnat_cluster_registrations",
            "With the spec's cluster: how many keys (the node and its replicas) this node's agent keeps registered under its lease",
            registrations.clone(),
        );
        for trigger in Trigger::ALL {
            drop(drift_corrected.get_or_create(&TriggerLabels {
                trigger: trigger.as_str().to_string(),
            }));
        }
        AgentMetrics {
            registry,
            runs,
            drift_corrected,
            last_run,
            last_run_seconds,
            replica_healthy,
            suspended,
            etcd_up,
            registrations,
        }
    }

    /// Notes the link to etcd (`None`: no cluster, both gauges stay 0).
    pub fn cluster(&self, link: Option<&Link>) {
        let (up, count) = link.map_or((false, 0), |l| (l.up, l.registrations));
        self.etcd_up.set(i64::from(up));
        self.registrations
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// Counts a run woken by `trigger` that ended as `outcome`, at
    /// `ended_unix` after `seconds`; `corrected` when it applied drift.
    pub fn ran(
        &self,
        trigger: Trigger,
        outcome: &str,
        corrected: bool,
        ended_unix: f64,
        seconds: f64,
    ) {
        self.runs
            .get_or_create(&RunLabels {
                trigger: trigger.as_str().to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
        if corrected {
            self.drift_corrected
                .get_or_create(&TriggerLabels {
                    trigger: trigger.as_str().to_string(),
                })
                .inc();
        }
        self.last_run.set(ended_unix);
        self.last_run_seconds.set(seconds);
    }

    /// The health of each probed replica address, replacing what was there.
    pub fn probed(&self, probes: &[Probe]) {
        self.replica_healthy.clear();
        for probe in probes {
            self.replica_healthy
                .get_or_create(&ReplicaLabels {
                    service: probe.service.clone(),
                    address: probe.address.clone(),
                })
                .set(i64::from(probe.healthy));
        }
    }

    /// Whether applies are suspended.
    pub fn set_suspended(&self, suspended: bool) {
        self.suspended.set(i64::from(suspended));
    }

    /// The metrics in Prometheus' text format (without OpenMetrics' `# EOF`,
    /// so other families may follow).
    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            return String::new();
        }
        match out.strip_suffix("# EOF\n") {
            Some(body) => body.to_string(),
            None => out,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_runs_corrections_and_replicas() {
        let metrics = AgentMetrics::new();
        metrics.ran(Trigger::Table, "applied", true, 1_700_000_000.0, 0.25);
        metrics.ran(Trigger::Interval, "in-sync", false, 1_700_000_001.0, 0.5);
        metrics.probed(&[Probe {
            service: "web".into(),
            address: "10.1.0.2".into(),
            healthy: false,
            detail: None,
        }]);
        metrics.set_suspended(true);
        let text = metrics.render();
        for line in [
            "lessnat_agent_runs_total{trigger=\"table\",outcome=\"applied\"} 1",
            "lessnat_agent_drift_corrected_total{trigger=\"table\"} 1",
            "lessnat_agent_drift_corrected_total{trigger=\"health\"} 0",
            "lessnat_agent_last_run_duration_seconds 0.5",
            "lessnat_agent_replica_healthy{service=\"web\",address=\"10.1.0.2\"} 0",
            "lessnat_agent_suspended 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(!text.contains("# EOF"), "{text}");
    }
}
