//! `lessnat status`: what reconcile and the agent last did on this node, put
//! together from the state directory: the record (last applied commit, last
//! run, drift, last error, back-off), the suspend flag, the journal (upgrades
//! in flight), and the agent's state (`agent.json`) with whether an agent
//! holds the agent lock now.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use serde::Serialize;

use super::fetch::Source;
use super::record::{
    Applied, Backoff, LastError, Outcome, RecordError, RecordFile, Run, Timestamp, Totals,
};
use super::suspend::{SuspendError, SuspendFile, Suspension};
use crate::agent::state::{AgentState, StateError, StateFile};
use crate::cluster::keys::{ReplicaSlot, Role};
use crate::cluster::rollout::ServiceRollout;
use crate::cluster::status::{ClusterStatus, ReplicaStatus, UpgradeStatus};
use crate::journal::{JournalError, JournalFile, UpgradeRecord};
use crate::lock::{AGENT_LOCK_FILE, holder};
use crate::plan::Summary;
use crate::spec::Strategy;
use crate::style::Style;

/// Gathering the status failed.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// The record could not be read.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// The suspend flag could not be read.
    #[error(transparent)]
    Suspend(#[from] SuspendError),
    /// The journal could not be read.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The agent's state could not be read.
    #[error(transparent)]
    Agent(#[from] StateError),
}

/// The agent's view of the node, and whether it runs now.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AgentView {
    /// Who holds the agent lock now (`pid N (command line) since T`); `None`
    /// when no agent runs.
    pub running: Option<String>,
    /// What the agent (the running one, or the last one) wrote.
    #[serde(flatten)]
    pub state: AgentState,
}

/// An upgrade in flight, from the journal.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InFlight {
    /// The service being upgraded.
    pub service: String,
    /// What the journal says about it.
    #[serde(flatten)]
    pub upgrade: UpgradeRecord,
}

/// Everything `lessnat status` shows; its JSON form is `status --json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Status {
    /// The state directory read.
    pub state_dir: PathBuf,
    /// The node reconcile ran for.
    pub node: Option<String>,
    /// Where the spec came from in the last run.
    pub source: Option<Source>,
    /// The commit the node was last brought to.
    pub applied: Option<Applied>,
    /// The last run.
    pub last_run: Option<Run>,
    /// The last failure (kept after later runs succeed).
    pub last_error: Option<LastError>,
    /// When a run last brought the node to its commit.
    pub last_success: Option<Timestamp>,
    /// Set while reconcile is suspended.
    pub suspended: Option<Suspension>,
    /// The failure back-off.
    pub backoff: Backoff,
    /// Counters.
    pub totals: Totals,
    /// Upgrades in flight, from the journal.
    pub in_flight: Vec<InFlight>,
    /// The agent's view, when an agent ever ran with this state directory.
    pub agent: Option<AgentView>,
}

impl Status {
    /// Reads the status of `state_dir`.
    pub fn gather(state_dir: &Path) -> Result<Status, StatusError> {
        let record = RecordFile::in_dir(state_dir).read()?;
        let suspended = SuspendFile::in_dir(state_dir).read()?;
        let journal = JournalFile::in_dir(state_dir).read()?;
        let agent = StateFile::in_dir(state_dir).read()?.map(|state| AgentView {
            running: holder(state_dir, AGENT_LOCK_FILE),
            state,
        });
        Ok(Status {
            state_dir: state_dir.to_path_buf(),
            node: record.node,
            source: record.source,
            applied: record.applied,
            last_run: record.last_run,
            last_error: record.last_error,
            last_success: record.last_success,
            suspended,
            backoff: record.backoff,
            totals: record.totals,
            in_flight: journal
                .upgrades
                .into_iter()
                .map(|(service, upgrade)| InFlight { service, upgrade })
                .collect(),
            agent,
        })
    }

    /// The status for people.
    pub fn render(&self, style: Style) -> String {
        let mut out = String::new();
        let node = self
            .node
            .as_deref()
            .map_or(String::new(), |n| format!(" of node \"{n}\""));
        let _ = writeln!(
            out,
            "{}",
            style.paint(
                "1",
                &format!(
                    "lessnat reconcile status{node} (state in {})",
                    self.state_dir.display()
                )
            )
        );
        out.push('\n');
        let row = |out: &mut String, name: &str, value: &str| {
            let _ = writeln!(out, "  {name:<12} {value}");
        };
        if self.last_run.is_none() && self.agent.is_none() {
            row(
                &mut out,
                "runs",
                "none yet: `lessnat reconcile` has not run with this state directory",
            );
        }
        if let Some(source) = &self.source {
            let reference = source
                .reference
                .strip_prefix("refs/heads/")
                .map_or(source.reference.clone(), |b| format!("branch {b}"));
            row(
                &mut out,
                "source",
                &format!("{}, {reference}, file {}", source.url, source.path),
            );
        }
        if self.last_run.is_some() || self.applied.is_some() {
            let applied = self
                .applied
                .as_ref()
                .map_or("nothing yet".to_string(), |a| {
                    format!(
                        "{} at {} ({})",
                        short(&a.commit),
                        a.at,
                        summary_text(&a.summary)
                    )
                });
            row(&mut out, "applied", &applied);
        }
        if let Some(run) = &self.last_run {
            let commit = run
                .commit
                .as_deref()
                .map_or(String::new(), |c| format!(", commit {}", short(c)));
            let outcome = match (run.outcome, run.stage) {
                (Outcome::Failed, Some(stage)) => {
                    style.paint("1;31", &format!("failed at {}", stage.as_str()))
                }
                (Outcome::Failed | Outcome::Refused, _) => {
                    style.paint("1;31", run.outcome.as_str())
                }
                (Outcome::Suspended, _) => style.paint("1;33", run.outcome.as_str()),
                _ => style.paint("32", run.outcome.as_str()),
            };
            row(
                &mut out,
                "last run",
                &format!("{}, {:.1}s: {outcome}{commit}", run.started, run.seconds),
            );
            let drift = match run.drift {
                Some(0) => "none: the node matches the commit".to_string(),
                Some(n) => {
                    let planned = run
                        .planned
                        .map_or(String::new(), |s| format!(" ({})", summary_text(&s)));
                    format!("{n} {}{planned}", plural(n, "change", "changes"))
                }
                None => "unknown: the last run did not get as far as a plan".to_string(),
            };
            row(&mut out, "drift", &drift);
            if run.changed_outside > 0 {
                row(
                    &mut out,
                    "",
                    &format!(
                        "{} of lessnat's objects changed outside lessnat",
                        run.changed_outside
                    ),
                );
            }
        }
        if let Some(success) = self.last_success {
            row(&mut out, "last success", &success.to_string());
        }
        let suspended = match &self.suspended {
            None => "no".to_string(),
            Some(s) => style.paint(
                "1;33",
                &format!(
                    "since {}{}: drift is reported, nothing applied; `lessnat resume` ends it",
                    s.since,
                    s.reason
                        .as_deref()
                        .map_or(String::new(), |r| format!(" ({r})"))
                ),
            ),
        };
        row(&mut out, "suspended", &suspended);
        let backoff = &self.backoff;
        let failures = if backoff.consecutive_failures == 0 {
            format!("none in a row, {} in total", self.totals.failures)
        } else {
            let retry = match (&backoff.failed_commit, backoff.retry_after) {
                (Some(commit), Some(t)) => format!(
                    "; commit {} is not tried again before {t} (a new commit is tried at once; `lessnat resume` ends the back-off)",
                    short(commit)
                ),
                _ => String::new(),
            };
            format!(
                "{} in a row, {} in total{retry}",
                backoff.consecutive_failures, self.totals.failures
            )
        };
        row(&mut out, "failures", &failures);
        row(&mut out, "rollbacks", &self.totals.rollbacks.to_string());
        if self.in_flight.is_empty() {
            row(&mut out, "in flight", "no upgrade");
        }
        for (i, f) in self.in_flight.iter().enumerate() {
            let reached = f.upgrade.reached.map_or("not started".to_string(), |s| {
                format!("reached {}", s.as_str())
            });
            let rolling_back = if f.upgrade.rolling_back {
                ", rolling back"
            } else {
                ""
            };
            row(
                &mut out,
                if i == 0 { "in flight" } else { "" },
                &style.paint(
                    "1;33",
                    &format!(
                        "{}: {} upgrade from {}, {reached}{rolling_back}, since {}",
                        f.service,
                        match f.upgrade.strategy {
                            Strategy::RedirectDrain => "redirect-drain",
                            Strategy::StopStart => "stop-start",
                        },
                        f.upgrade.from_image,
                        f.upgrade.started_at
                    ),
                ),
            );
        }
        if let Some(error) = &self.last_error {
            let commit = error
                .commit
                .as_deref()
                .map_or(String::new(), |c| format!(", commit {}", short(c)));
            let resolved = if self.last_success.is_some_and(|success| success > error.at) {
                "; a later run succeeded"
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "\nLast error ({}, at {}{commit}{resolved}):",
                error.at,
                error.stage.as_str()
            );
            for line in error.message.trim_end().lines() {
                let _ = writeln!(out, "  {line}");
            }
        }
        if let Some(agent) = &self.agent {
            out.push('\n');
            out.push_str(&agent.state.render(agent.running.as_deref(), style));
        }
        out
    }
}

/// The first 12 characters of a commit id.
pub fn short(commit: &str) -> &str {
    commit.get(..12).unwrap_or(commit)
}

fn plural<'a>(n: usize, one: &'a str, many: &'a str) -> &'a str {
    if n == 1 { one } else { many }
}

/// `1 added, 0 changed, 0 destroyed, 1 upgraded`.
pub fn summary_text(summary: &Summary) -> String {
    format!(
        "{} added, {} changed, {} destroyed, {} upgraded",
        summary.add, summary.change, summary.destroy, summary.upgrade
    )
}

/// `lessnat status --cluster` for people: each registered node with its
/// roles, commit, lease and replicas, then upgrades in flight and rollout
/// slots as stored.
pub fn render_cluster(status: &ClusterStatus, style: Style) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}",
        style.paint(
            "1",
            &format!(
                "lessnat cluster {} (etcd revision {}): {} nodes registered",
                status.prefix,
                status.revision,
                status.nodes.len()
            )
        )
    );
    for node in &status.nodes {
        out.push('\n');
        let roles: Vec<&str> = node
            .record
            .roles
            .iter()
            .map(|r| match r {
                Role::LoadBalancer => "load balancer",
                Role::Worker => "worker",
                Role::Host => "host",
            })
            .collect();
        let _ = writeln!(
            out,
            "  {} ({})",
            style.paint("1", &node.name),
            if roles.is_empty() {
                "no role".to_string()
            } else {
                roles.join(", ")
            }
        );
        let commit = node.record.commit.as_deref().unwrap_or("none (spec file)");
        let _ = writeln!(
            out,
            "    {:<10} {commit}, spec {}",
            "commit",
            short_hash(&node.record.spec_hash)
        );
        let ttl = match (node.ttl_left_seconds, node.ttl_seconds) {
            (Some(left), Some(ttl)) => format!("{left}s of {ttl}s left"),
            _ => style.paint("1;31", "expired"),
        };
        let _ = writeln!(
            out,
            "    {:<10} {} for {}s, {ttl}; agent {}",
            "lease", node.lease, node.lease_age_seconds, node.record.agent_version
        );
        for replica in &node.replicas {
            out.push_str(&replica_line(replica, style));
        }
    }
    if !status.orphans.is_empty() {
        out.push('\n');
        let _ = writeln!(out, "  replicas of nodes without a record:");
        for replica in &status.orphans {
            out.push_str(&replica_line(replica, style));
        }
    }
    out.push('\n');
    out.push_str(&render_upgrades(&status.upgrades));
    out.push_str(&render_rollouts(&status.rollouts, style));
    out
}

/// The fleet rollouts of `status --cluster`: per service, who holds its
/// slots, who is done with which version, which versions are bad.
fn render_rollouts(rollouts: &[ServiceRollout], style: Style) -> String {
    let mut out = String::new();
    if rollouts.is_empty() {
        let _ = writeln!(out, "  {:<12} none", "rollouts");
    }
    let at = |since: u64| Timestamp(UNIX_EPOCH + Duration::from_secs(since));
    for rollout in rollouts {
        let service = style.paint("1", &rollout.service);
        let _ = writeln!(out, "  {:<12} {service}", "rollout");
        if rollout.slots.is_empty() {
            let _ = writeln!(out, "    {:<10} none held", "slots");
        }
        for slot in &rollout.slots {
            let _ = writeln!(
                out,
                "    {:<10} {}: {} upgrading to {} since {}",
                "slot",
                slot.slot,
                slot.node,
                slot.version,
                at(slot.since)
            );
        }
        for (version, nodes) in &rollout.done {
            let _ = writeln!(out, "    {:<10} {version}: {}", "done", nodes.join(", "));
        }
        for bad in &rollout.bad {
            let _ = writeln!(
                out,
                "    {:<10} {}: marked by {} at {}: {}",
                "bad",
                style.paint("1;31", &bad.version),
                bad.node,
                at(bad.since),
                bad.reason
            );
        }
    }
    out
}

/// The upgrades in flight of `status --cluster`, one line each: the
/// replica's move, its version, since when, and which live load-balancer
/// nodes acknowledged it and which are still to.
fn render_upgrades(upgrades: &[UpgradeStatus]) -> String {
    let name = "upgrades";
    if upgrades.is_empty() {
        return format!("  {name:<12} none\n");
    }
    let list = |names: &[String]| match names {
        [] => "none".to_string(),
        names => names.join(", "),
    };
    let mut out = String::new();
    for upgrade in upgrades {
        let _ = writeln!(
            out,
            "  {name:<12} {} on {}: {} -> {}, version {}, since {}; acknowledged by {}; pending: {}",
            upgrade.service,
            upgrade.worker,
            upgrade.from,
            upgrade.to,
            short_hash(&upgrade.version),
            Timestamp(UNIX_EPOCH + Duration::from_secs(upgrade.since)),
            list(&upgrade.acknowledged),
            list(&upgrade.pending)
        );
    }
    out
}

fn replica_line(replica: &ReplicaStatus, style: Style) -> String {
    let record = &replica.record;
    let health = if record.healthy {
        style.paint("32", "healthy")
    } else {
        style.paint("1;31", "unhealthy")
    };
    let slot = match record.slot {
        ReplicaSlot::Primary => "primary",
        ReplicaSlot::Next => "next",
    };
    format!(
        "    {:<10} {} {} (replica {}, {slot}, version {}), {health} since {}\n",
        "replica",
        replica.service,
        replica.address,
        record.replica,
        short_hash(&record.version),
        Timestamp(UNIX_EPOCH + Duration::from_secs(record.since))
    )
}

/// The first 12 hex digits of a `sha256:` hash.
fn short_hash(hash: &str) -> &str {
    short(hash.strip_prefix("sha256:").unwrap_or(hash))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gitops::record::{Record, Stage};
    use crate::journal::Journal;
    use crate::plan::StageName;

    #[test]
    fn a_fresh_state_directory() {
        let dir = tempfile::tempdir().expect("temp dir");
        let status = Status::gather(dir.path()).expect("status");
        let text = status.render(Style::Plain);
        assert!(text.contains("has not run"), "{text}");
        assert!(text.contains("suspended    no"), "{text}");
        assert!(text.contains("in flight    no upgrade"), "{text}");
    }

    #[test]
    fn shows_applied_commit_failure_drift_suspension_and_upgrades_in_flight() {
        let dir = tempfile::tempdir().expect("temp dir");
        let at = Timestamp::now();
        let record = Record {
            node: Some("web-1".into()),
            source: Some(Source {
                url: "file:///srv/spec.git".into(),
                reference: "refs/heads/main".into(),
                path: "spec.yaml".into(),
            }),
            applied: Some(Applied {
                commit: "0123456789abcdef0123456789abcdef01234567".into(),
                at,
                summary: Summary {
                    upgrade: 1,
                    ..Summary::default()
                },
            }),
            last_run: Some(Run {
                started: at,
                seconds: 0.25,
                commit: Some("fedcba9876543210fedcba9876543210fedcba98".into()),
                outcome: Outcome::Failed,
                stage: Some(Stage::Spec),
                planned: None,
                drift: None,
                changed_outside: 0,
                spec_errors: 1,
                error: Some("spec.yaml@fedcba987654:3:1: error: unknown field `x`".into()),
            }),
            last_error: Some(LastError {
                at,
                stage: Stage::Spec,
                commit: Some("fedcba9876543210fedcba9876543210fedcba98".into()),
                message: "spec.yaml@fedcba987654:3:1: error: unknown field `x`".into(),
            }),
            backoff: Backoff {
                consecutive_failures: 1,
                failed_commit: Some("fedcba9876543210fedcba9876543210fedcba98".into()),
                retry_after: Some(at.after(std::time::Duration::from_secs(120))),
            },
            totals: Totals {
                failures: 1,
                rollbacks: 0,
            },
            ..Record::default()
        };
        RecordFile::in_dir(dir.path())
            .write(&record)
            .expect("record");
        SuspendFile::in_dir(dir.path())
            .suspend(Some("disk full".into()))
            .expect("suspend");
        let mut journal = Journal::default();
        journal.upgrades.insert(
            "web".into(),
            UpgradeRecord {
                strategy: Strategy::RedirectDrain,
                from_spec: "aaaa".into(),
                from_image: "web:1".into(),
                to_spec: "bbbb".into(),
                reached: Some(StageName::Drain),
                rolling_back: false,
                started_at: at.to_string(),
                updated_at: at.to_string(),
                canary: None,
            },
        );
        JournalFile::in_dir(dir.path())
            .write(&journal)
            .expect("journal");

        let status = Status::gather(dir.path()).expect("status");
        let text = status.render(Style::Plain);
        for expected in [
            "lessnat reconcile status of node \"web-1\"",
            "source       file:///srv/spec.git, branch main, file spec.yaml",
            "applied      0123456789ab at ",
            "0 destroyed, 1 upgraded)",
            "failed at spec, commit fedcba987654",
            "drift        unknown",
            "(disk full)",
            "failures     1 in a row, 1 in total; commit fedcba987654 is not tried again before",
            "in flight    web: redirect-drain upgrade from web:1, reached drain, since",
            "spec.yaml@fedcba987654:3:1: error: unknown field `x`",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
        let json = serde_json::to_value(&status).expect("json");
        assert_eq!(
            json["applied"]["commit"],
            "0123456789abcdef0123456789abcdef01234567"
        );
        assert_eq!(json["last_run"]["outcome"], "failed");
        assert_eq!(json["last_run"]["stage"], "spec");
        assert_eq!(json["suspended"]["reason"], "disk full");
        assert_eq!(json["in_flight"][0]["service"], "web");
        assert_eq!(json["in_flight"][0]["reached"], "drain");
        assert_eq!(json["backoff"]["consecutive_failures"], 1);
    }
}
