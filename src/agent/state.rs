//! The agent's view of its node, kept in `<state-dir>/agent.json` (written
//! atomically after every run and health change) for `lessnat status`: who
//! runs it, its last run and last change, the drift it corrected, the spreads
//! of a load-balancer node with each replica's health, and recent events.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::cluster::Link;
use super::wake::Trigger;
use crate::desired::routed_table::{down_in, spreads_in};
use crate::gitops::record::Timestamp;
use crate::model::{Observed, Probe};
use crate::ownership::{NFT_FAMILY, NFT_TABLE};
use crate::style::Style;

/// The state file's name inside the state directory.
pub const STATE_FILE: &str = "agent.json";

/// How many events the state keeps.
pub const RECENT_EVENTS: usize = 20;

/// Reading or writing the state file failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The file could not be read or written.
    #[error("cannot use the agent's state file {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        cause: std::io::Error,
    },
    /// The file is not the agent's state.
    #[error("{path} is not the agent's state; remove it (the agent writes it again)")]
    Format {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        cause: serde_json::Error,
    },
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// The plan had no changes.
    InSync,
    /// A plan was carried out.
    Applied,
    /// Applies are suspended: the plan was only reported.
    Suspended,
    /// Another lessnat held the apply lock; the run is tried again shortly.
    Busy,
    /// The run failed.
    Failed,
}

impl Outcome {
    /// The name in metrics, JSON and status.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::InSync => "in-sync",
            Outcome::Applied => "applied",
            Outcome::Suspended => "suspended",
            Outcome::Busy => "busy",
            Outcome::Failed => "failed",
        }
    }
}

/// One run of the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Run {
    /// When it ended.
    pub at: Timestamp,
    /// What woke the agent.
    pub trigger: Trigger,
    /// What happened, for people.
    pub detail: String,
    /// How long it took.
    pub seconds: f64,
    /// How it ended.
    pub outcome: Outcome,
    /// Changes in its plan.
    pub changes: usize,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One replica address of a spread.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Replica {
    /// The address new connections are sent to.
    pub address: IpAddr,
    /// Whether new connections go there now.
    pub in_spread: bool,
    /// Whether it answered its last probe (unknown when not probed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy: Option<bool>,
    /// Why the probe failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Where a load-balancer node sends new connections of one VIP port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    /// `SERVICE/PORT`.
    pub port: String,
    /// Its replicas.
    pub replicas: Vec<Replica>,
}

/// Something the agent noticed or did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// When.
    pub at: Timestamp,
    /// What, for people.
    pub message: String,
}

/// What `agent.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentState {
    /// The agent's process id.
    pub pid: u32,
    /// When it started.
    pub started: Timestamp,
    /// The node it keeps converged.
    pub node: Option<String>,
    /// Where its spec comes from.
    pub spec: String,
    /// The commit its last run went on with (`--repo`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// How often it runs without events, in seconds.
    pub interval_seconds: f64,
    /// Its last run.
    pub last_run: Option<Run>,
    /// Its last run that applied changes.
    pub last_change: Option<Run>,
    /// Runs that found drift and applied a plan, by what woke the agent.
    pub drift_corrected: BTreeMap<Trigger, u64>,
    /// Runs in all.
    pub runs: u64,
    /// Runs that failed.
    pub failures: u64,
    /// A load-balancer node's spreads, with each replica's health.
    pub spreads: Vec<Spread>,
    /// Recent events, oldest first.
    pub events: VecDeque<Event>,
    /// With the spec's `cluster:`: the agent's link to etcd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<Link>,
}

impl AgentState {
    /// A fresh state for this process.
    pub fn new(spec: String, interval_seconds: f64) -> AgentState {
        AgentState {
            pid: std::process::id(),
            started: Timestamp::now(),
            node: None,
            spec,
            commit: None,
            interval_seconds,
            last_run: None,
            last_change: None,
            drift_corrected: BTreeMap::new(),
            runs: 0,
            failures: 0,
            spreads: Vec::new(),
            events: VecDeque::new(),
            cluster: None,
        }
    }

    /// Notes `message` as a recent event.
    pub fn event(&mut self, message: String) {
        if self.events.len() == RECENT_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(Event {
            at: Timestamp::now(),
            message,
        });
    }

    /// Notes a run.
    pub fn ran(&mut self, run: Run) {
        self.runs += 1;
        match run.outcome {
            Outcome::Failed => self.failures += 1,
            Outcome::Applied => {
                if run.trigger != Trigger::Start {
                    *self.drift_corrected.entry(run.trigger).or_default() += 1;
                }
                self.last_change = Some(run.clone());
            }
            Outcome::InSync | Outcome::Suspended | Outcome::Busy => {}
        }
        self.last_run = Some(run);
    }

    /// The spreads in lessnat's table as observed, with the health of each
    /// replica from `probes` (the latest ones).
    pub fn note_spreads(&mut self, observed: &Observed, probes: &[Probe]) {
        let Some(table) = observed
            .nft
            .tables
            .iter()
            .find(|t| t.family == NFT_FAMILY && t.name == NFT_TABLE)
        else {
            self.spreads.clear();
            return;
        };
        let down: Vec<IpAddr> = down_in(table).into_iter().map(|(a, _)| a).collect();
        self.spreads = spreads_in(table)
            .into_iter()
            .map(|(port, addresses)| {
                let service = port.split('/').next().unwrap_or_default();
                let out = probes
                    .iter()
                    .filter(|p| p.service == service)
                    .filter_map(|p| p.address.parse::<IpAddr>().ok())
                    .filter(|a| down.contains(a) && !addresses.contains(a));
                let mut all: Vec<(IpAddr, bool)> = addresses.iter().map(|a| (*a, true)).collect();
                all.extend(out.map(|a| (a, false)));
                all.dedup();
                let replicas = all
                    .into_iter()
                    .map(|(address, in_spread)| {
                        let probe = probes
                            .iter()
                            .find(|p| p.service == service && p.address == address.to_string());
                        Replica {
                            address,
                            in_spread,
                            healthy: probe.map(|p| p.healthy),
                            detail: probe.and_then(|p| p.detail.clone()),
                        }
                    })
                    .collect();
                Spread { port, replicas }
            })
            .collect();
    }

    /// The agent's part of `lessnat status`, for people; `running` says
    /// whether an agent holds the agent lock now (and who).
    pub fn render(&self, running: Option<&str>, style: Style) -> String {
        let mut out = String::new();
        let row = |out: &mut String, name: &str, value: &str| {
            let _ = writeln!(out, "  {name:<12} {value}");
        };
        let node = self
            .node
            .as_deref()
            .map_or(String::new(), |n| format!(" of node \"{n}\""));
        let _ = writeln!(out, "{}", style.paint("1", &format!("lessnat agent{node}")));
        out.push('\n');
        let agent = match running {
            Some(holder) => style.paint("32", &format!("running: {holder}")),
            None => style.paint(
                "1;31",
                &format!(
                    "not running (pid {} last, started {})",
                    self.pid, self.started
                ),
            ),
        };
        row(&mut out, "agent", &agent);
        row(
            &mut out,
            "spec",
            &format!(
                "{}, every {}s and on events",
                self.spec, self.interval_seconds
            ),
        );
        if let Some(commit) = &self.commit {
            row(&mut out, "commit", commit);
        }
        let describe = |run: &Run| {
            let error = run
                .error
                .as_deref()
                .map_or(String::new(), |e| format!(": {e}"));
            format!(
                "{}, {:.2}s, {} ({}: {}), {} {}{error}",
                run.at,
                run.seconds,
                run.outcome.as_str(),
                run.trigger.as_str(),
                run.detail,
                run.changes,
                if run.changes == 1 {
                    "change"
                } else {
                    "changes"
                },
            )
        };
        match &self.last_run {
            Some(run) => row(&mut out, "last run", &describe(run)),
            None => row(&mut out, "last run", "none yet"),
        }
        if let Some(run) = &self.last_change {
            row(&mut out, "last change", &describe(run));
        }
        let corrected: Vec<String> = self
            .drift_corrected
            .iter()
            .map(|(trigger, n)| format!("{n} ({})", trigger.as_str()))
            .collect();
        row(
            &mut out,
            "corrected",
            &if corrected.is_empty() {
                "no drift yet".to_string()
            } else {
                corrected.join(", ")
            },
        );
        row(
            &mut out,
            "runs",
            &format!("{} ({} failed)", self.runs, self.failures),
        );
        if let Some(link) = &self.cluster {
            row(&mut out, "etcd", &link_line(link, style));
        }
        for spread in &self.spreads {
            let replicas: Vec<String> = spread
                .replicas
                .iter()
                .map(|r| {
                    let health = match r.healthy {
                        Some(true) => style.paint("32", "healthy"),
                        Some(false) => style.paint("1;31", "not answering"),
                        None => "not probed".to_string(),
                    };
                    let place = if r.in_spread { "in" } else { "out" };
                    format!("{} {place} ({health})", r.address)
                })
                .collect();
            row(
                &mut out,
                "spread",
                &format!("{}: {}", spread.port, replicas.join(", ")),
            );
        }
        if !self.events.is_empty() {
            out.push('\n');
            let _ = writeln!(out, "  recent events:");
            for event in &self.events {
                let _ = writeln!(out, "    {} {}", event.at, event.message);
            }
        }
        out
    }
}

/// The `etcd` row of status: reachable (with the lease and registrations)
/// or unreachable since when and why.
fn link_line(link: &Link, style: Style) -> String {
    if link.up {
        let lease = link
            .lease
            .as_deref()
            .map_or(String::new(), |l| format!(", lease {l}"));
        let watched = link.watched.map_or(String::new(), |n| {
            format!(", watching {n} replica registrations")
        });
        return style.paint(
            "32",
            &format!(
                "reachable{lease}, {} keys registered{watched}",
                link.registrations
            ),
        );
    }
    let since = link.unreachable_since.map_or(String::new(), |s| {
        format!(" since {}", Timestamp(UNIX_EPOCH + Duration::from_secs(s)))
    });
    let error = link
        .error
        .as_deref()
        .map_or(String::new(), |e| format!(": {e}"));
    style.paint(
        "1;31",
        &format!("unreachable{since}{error} (serving goes on; registrations and watches resume when it is back)"),
    )
}

/// The state file of a state directory.
#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    /// The state file in `state_dir`.
    pub fn in_dir(state_dir: &Path) -> StateFile {
        StateFile {
            path: state_dir.join(STATE_FILE),
        }
    }

    /// Reads the state; `None` when no agent ever ran here.
    pub fn read(&self) -> Result<Option<AgentState>, StateError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(cause) => {
                return Err(StateError::Io {
                    path: self.path.clone(),
                    cause,
                });
            }
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|cause| StateError::Format {
                path: self.path.clone(),
                cause,
            })
    }

    /// Writes `state` atomically.
    pub fn write(&self, state: &AgentState) -> Result<(), StateError> {
        let json = serde_json::to_vec_pretty(state).map_err(|cause| StateError::Format {
            path: self.path.clone(),
            cause,
        })?;
        crate::atomic_file::write(&self.path, &json, crate::atomic_file::PRIVATE).map_err(|cause| {
            StateError::Io {
                path: self.path.clone(),
                cause,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(trigger: Trigger, outcome: Outcome) -> Run {
        Run {
            at: Timestamp::now(),
            trigger,
            detail: "inet lessnat changed".into(),
            seconds: 0.2,
            outcome,
            changes: usize::from(outcome == Outcome::Applied),
            error: None,
        }
    }

    #[test]
    fn counts_corrections_by_trigger_and_keeps_recent_events() {
        let mut state = AgentState::new("spec.yaml".into(), 30.0);
        state.ran(run(Trigger::Start, Outcome::Applied));
        state.ran(run(Trigger::Table, Outcome::Applied));
        state.ran(run(Trigger::Table, Outcome::InSync));
        state.ran(run(Trigger::Container, Outcome::Failed));
        assert_eq!(state.drift_corrected, BTreeMap::from([(Trigger::Table, 1)]));
        assert_eq!((state.runs, state.failures), (4, 1));
        assert_eq!(
            state.last_change.as_ref().map(|r| r.trigger),
            Some(Trigger::Table)
        );
        for i in 0..RECENT_EVENTS + 5 {
            state.event(format!("event {i}"));
        }
        assert_eq!(state.events.len(), RECENT_EVENTS);
        assert_eq!(
            state.events.front().map(|e| e.message.as_str()),
            Some("event 5")
        );
        let text = state.render(Some("pid 1 (lessnat agent)"), Style::Plain);
        assert!(text.contains("corrected    1 (table)"), "{text}");
        assert!(text.contains("running: pid 1"), "{text}");
    }

    #[test]
    fn round_trips_through_its_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = StateFile::in_dir(dir.path());
        assert_eq!(file.read().expect("no file"), None);
        let mut state = AgentState::new("spec.yaml".into(), 30.0);
        state.ran(run(Trigger::Health, Outcome::Applied));
        state.spreads.push(Spread {
            port: "web/80".into(),
            replicas: vec![Replica {
                address: IpAddr::from([10, 1, 0, 2]),
                in_spread: false,
                healthy: Some(false),
                detail: Some("connection refused".into()),
            }],
        });
        file.write(&state).expect("write");
        assert_eq!(file.read().expect("read"), Some(state));
    }
}
