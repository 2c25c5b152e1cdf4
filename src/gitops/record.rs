//! What `lessnat reconcile` remembers between runs, in
//! `<state-dir>/reconcile.json`: the last applied commit, the last run and its
//! outcome, the last error, the failure back-off, counters and durations.
//! `lessnat status` and the metrics are read from it. Written atomically, and
//! only by a run that holds the apply lock.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::fetch::Source;
use crate::plan::Summary;

/// The record's file name inside the state directory.
pub const RECORD_FILE: &str = "reconcile.json";
/// Version of the record format.
pub const RECORD_FORMAT: u32 = 1;

/// A point in time; stored and shown as RFC 3339 in UTC, to the second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp(pub SystemTime);

impl Timestamp {
    /// Now, cut to the second (as it is stored).
    pub fn now() -> Timestamp {
        let seconds = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Timestamp(UNIX_EPOCH + Duration::from_secs(seconds))
    }

    /// Seconds since the Unix epoch, as Prometheus wants timestamps.
    pub fn unix_seconds(self) -> f64 {
        self.0
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64())
    }

    /// This time plus `duration`.
    pub fn after(self, duration: Duration) -> Timestamp {
        Timestamp(self.0 + duration)
    }

    /// The first whole second at least `duration` from now. Stored times keep
    /// whole seconds only, so a deadline counted from [`Timestamp::now`] (cut
    /// to the second) could come up to a second early; this one never does.
    pub fn at_least(duration: Duration) -> Timestamp {
        let due = SystemTime::now() + duration;
        let since = due.duration_since(UNIX_EPOCH).unwrap_or_default();
        let seconds = since.as_secs() + u64::from(since.subsec_nanos() > 0);
        Timestamp(UNIX_EPOCH + Duration::from_secs(seconds))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_rfc3339_seconds(self.0))
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_rfc3339(&text)
            .map(Timestamp)
            .map_err(serde::de::Error::custom)
    }
}

/// Where a run stopped when it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    /// Reading or writing lessnat's own state.
    State,
    /// Fetching the repository.
    Fetch,
    /// Reading or checking the spec at the fetched commit.
    Spec,
    /// Reading the live host.
    Observe,
    /// Planning (conflicts that need a person).
    Plan,
    /// Carrying out the plan.
    Apply,
}

impl Stage {
    /// The stage's name, as in JSON and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::State => "state",
            Stage::Fetch => "fetch",
            Stage::Spec => "spec",
            Stage::Observe => "observe",
            Stage::Plan => "plan",
            Stage::Apply => "apply",
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Changes were applied.
    Applied,
    /// The node already matched the commit.
    InSync,
    /// `--plan-only`: drift was reported, nothing applied.
    Planned,
    /// Suspended: drift was reported, nothing applied.
    Suspended,
    /// The fetched commit is not a descendant of the last applied one.
    Refused,
    /// Something failed; see the error.
    Failed,
}

impl Outcome {
    /// The outcome's name, as in JSON and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::InSync => "in-sync",
            Outcome::Planned => "planned",
            Outcome::Suspended => "suspended",
            Outcome::Refused => "refused",
            Outcome::Failed => "failed",
        }
    }
}

/// The commit the node was last brought to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Applied {
    /// Full commit id.
    pub commit: String,
    /// When the run that applied it finished.
    pub at: Timestamp,
    /// What that run changed (all zero when the node already matched).
    pub summary: Summary,
}

/// One run of reconcile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Run {
    /// When it started.
    pub started: Timestamp,
    /// How long it took.
    pub seconds: f64,
    /// The commit fetched, if the fetch worked.
    pub commit: Option<String>,
    /// How it ended.
    pub outcome: Outcome,
    /// Where it stopped, when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<Stage>,
    /// What the plan held, when there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub planned: Option<Summary>,
    /// Changes still needed for the node to match the commit after the run
    /// (after an apply, from a fresh plan); `None` when not known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift: Option<usize>,
    /// Objects lessnat owns that someone else changed, seen by the plan.
    #[serde(default)]
    pub changed_outside: usize,
    /// Problems in the spec at the fetched commit (0 when it is valid or was not read).
    #[serde(default)]
    pub spec_errors: usize,
    /// What went wrong (failed or refused runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The last failure, kept after later runs succeed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastError {
    /// When the run that failed started.
    pub at: Timestamp,
    /// Where it stopped.
    pub stage: Stage,
    /// The commit it worked on, if the fetch worked.
    pub commit: Option<String>,
    /// The message (for an invalid spec, every located problem).
    pub message: String,
}

/// The failure back-off.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Backoff {
    /// Failed runs in a row.
    pub consecutive_failures: u32,
    /// The commit the last failed run worked on.
    pub failed_commit: Option<String>,
    /// Until when that commit is not tried again.
    pub retry_after: Option<Timestamp>,
}

impl Backoff {
    /// Whether a run at `now` should not try `commit` yet (`None`: the fetch
    /// itself): the last run failed on that very commit (or fetch), and the
    /// back-off has not passed. A new commit is always tried at once.
    pub fn holds(&self, commit: Option<&str>, now: Timestamp) -> bool {
        self.consecutive_failures > 0
            && self.failed_commit.as_deref() == commit
            && self.retry_after.is_some_and(|t| now < t)
    }
}

/// Counters since the state directory was made.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    /// Failed runs.
    pub failures: u64,
    /// Upgrades rolled back (failed and undone, or found in flight and undone).
    pub rollbacks: u64,
}

/// Everything reconcile remembers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Format version, [`RECORD_FORMAT`].
    pub format: u32,
    /// The node the runs were for.
    #[serde(default)]
    pub node: Option<String>,
    /// Where the spec came from in the last run.
    #[serde(default)]
    pub source: Option<Source>,
    /// The commit the node was last brought to.
    #[serde(default)]
    pub applied: Option<Applied>,
    /// The last run.
    #[serde(default)]
    pub last_run: Option<Run>,
    /// The last failure.
    #[serde(default)]
    pub last_error: Option<LastError>,
    /// When a run last brought the node to its commit (applied, or already in sync).
    #[serde(default)]
    pub last_success: Option<Timestamp>,
    /// The failure back-off.
    #[serde(default)]
    pub backoff: Backoff,
    /// Counters.
    #[serde(default)]
    pub totals: Totals,
    /// How long the last apply with changes took, in seconds.
    #[serde(default)]
    pub last_apply_seconds: Option<f64>,
    /// How long the last staged upgrade of each service took, in seconds.
    #[serde(default)]
    pub upgrade_seconds: BTreeMap<String, f64>,
}

impl Default for Record {
    fn default() -> Self {
        Record {
            format: RECORD_FORMAT,
            node: None,
            source: None,
            applied: None,
            last_run: None,
            last_error: None,
            last_success: None,
            backoff: Backoff::default(),
            totals: Totals::default(),
            last_apply_seconds: None,
            upgrade_seconds: BTreeMap::new(),
        }
    }
}

/// Reading or writing the record failed.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// File system trouble.
    #[error("reconcile record {path}")]
    Io {
        /// The record file.
        path: PathBuf,
        /// Why.
        #[source]
        cause: std::io::Error,
    },
    /// The file is not a record this lessnat can read.
    #[error(
        "reconcile record {path} cannot be read (if it is damaged, move it aside: the next run starts a new one, without the last applied commit)"
    )]
    Format {
        /// The record file.
        path: PathBuf,
        /// Why.
        #[source]
        cause: serde_json::Error,
    },
}

/// The record file of a state directory.
#[derive(Debug, Clone)]
pub struct RecordFile {
    path: PathBuf,
}

impl RecordFile {
    /// The record in `state_dir`.
    pub fn in_dir(state_dir: &Path) -> Self {
        RecordFile {
            path: state_dir.join(RECORD_FILE),
        }
    }

    /// Reads the record; a missing file is an empty record.
    pub fn read(&self) -> Result<Record, RecordError> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|cause| RecordError::Format {
                path: self.path.clone(),
                cause,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Record::default()),
            Err(cause) => Err(RecordError::Io {
                path: self.path.clone(),
                cause,
            }),
        }
    }

    /// Replaces the record, atomically and durably.
    pub fn write(&self, record: &Record) -> Result<(), RecordError> {
        let json = serde_json::to_vec_pretty(record).map_err(|cause| RecordError::Format {
            path: self.path.clone(),
            cause,
        })?;
        crate::atomic_file::write(&self.path, &json, crate::atomic_file::READABLE).map_err(
            |cause| RecordError::Io {
                path: self.path.clone(),
                cause,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_are_never_early() {
        let wait = Duration::from_millis(2_000);
        let before = SystemTime::now();
        let due = Timestamp::at_least(wait).0;
        assert!(
            due >= before + wait,
            "a deadline may be late by under a second, never early"
        );
        assert!(due < SystemTime::now() + wait + Duration::from_secs(1));
        assert_eq!(
            due.duration_since(UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .ok(),
            Some(0)
        );
    }

    #[test]
    fn missing_record_is_empty_and_writes_round_trip() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = RecordFile::in_dir(dir.path());
        assert_eq!(file.read().expect("empty"), Record::default());
        let at = Timestamp(UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        let record = Record {
            node: Some("web-1".into()),
            applied: Some(Applied {
                commit: "a".repeat(40),
                at,
                summary: Summary {
                    add: 1,
                    ..Summary::default()
                },
            }),
            last_error: Some(LastError {
                at,
                stage: Stage::Spec,
                commit: Some("b".repeat(40)),
                message: "spec.yaml@bbbbbbb:3:1: error: unknown field".into(),
            }),
            backoff: Backoff {
                consecutive_failures: 2,
                failed_commit: Some("b".repeat(40)),
                retry_after: Some(at.after(Duration::from_secs(240))),
            },
            upgrade_seconds: BTreeMap::from([("web".to_string(), 12.5)]),
            ..Record::default()
        };
        file.write(&record).expect("write");
        assert_eq!(file.read().expect("read back"), record);
        let text = std::fs::read_to_string(dir.path().join(RECORD_FILE)).expect("text");
        assert!(text.contains("\"2023-11-14T22:13:20Z\""), "{text}");
    }

    #[test]
    fn backoff_holds_only_the_failed_commit_until_its_time() {
        let now = Timestamp::now();
        let backoff = Backoff {
            consecutive_failures: 1,
            failed_commit: Some("abc".into()),
            retry_after: Some(now.after(Duration::from_secs(60))),
        };
        assert!(backoff.holds(Some("abc"), now));
        assert!(
            !backoff.holds(Some("def"), now),
            "a new commit is tried at once"
        );
        assert!(!backoff.holds(None, now), "the fetch worked last time");
        assert!(!backoff.holds(Some("abc"), now.after(Duration::from_secs(61))));
        assert!(!Backoff::default().holds(Some("abc"), now));
        let fetch_failed = Backoff {
            failed_commit: None,
            ..backoff
        };
        assert!(
            fetch_failed.holds(None, now),
            "a failed fetch backs off too"
        );
        assert!(!fetch_failed.holds(Some("abc"), now));
    }

    #[test]
    fn damaged_record_says_what_to_do() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join(RECORD_FILE), b"[").expect("write");
        let error = RecordFile::in_dir(dir.path()).read().expect_err("damaged");
        assert!(error.to_string().contains("move it aside"), "{error}");
        let cause = serde_json::from_slice::<Record>(b"[")
            .expect_err("not a record")
            .to_string();
        crate::error::assert_chain_once(&error, &[&cause, "move it aside"]);
    }
}
