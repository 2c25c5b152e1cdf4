//! Events: one JSON object per line for each step of a run, for log shippers
//! and scripts. Every event has `time`, `node` (when known) and `event`; the
//! other fields depend on the event. Written to standard output
//! (`--events json`) and/or appended to a file (`--events-file PATH`). A run's
//! last event (`applied`, `in-sync`, `suspended`, `refused`, `failed`) comes
//! once the record, and so status and metrics, say the same.
//!
//! ```json
//! {"time":"2026-11-21T13:20:00Z","node":"web-1","event":"applied","commit":"3f1c…","summary":{"add":0,"change":0,"destroy":0,"upgrade":1},"seconds":21.4,"upgrades":{"web":20.9}}
//! ```

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::record::{Stage, Timestamp};
use crate::error::chain;
use crate::plan::Summary;

/// What happened.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    /// The repository was fetched.
    Fetched {
        /// Repository URL.
        repo: String,
        /// Full ref name.
        reference: String,
        /// The commit the ref points to.
        commit: String,
        /// The commit the node was last brought to, if any.
        applied: Option<String>,
    },
    /// The fetched commit is older than, or unrelated to, the applied one, and
    /// `--allow-rollback` lets it through.
    RollbackAllowed {
        /// The fetched commit.
        commit: String,
        /// The applied commit.
        applied: String,
        /// How they relate: `ancestor`, `diverged`, `unrelated` or `unknown`.
        relation: &'static str,
    },
    /// The fetched commit is not applied: it is not a descendant of the applied one.
    Refused {
        /// The fetched commit.
        commit: String,
        /// The applied commit.
        applied: String,
        /// How they relate: `ancestor`, `diverged`, `unrelated` or `unknown`.
        relation: &'static str,
        /// The message, with what to do.
        reason: String,
    },
    /// A plan was made.
    Planned {
        /// The commit planned for.
        commit: String,
        /// Number of changes.
        changes: usize,
        /// Changes by kind.
        summary: Summary,
        /// Objects lessnat owns that someone else changed.
        changed_outside: usize,
        /// Conflicts that block applying.
        conflicts: usize,
    },
    /// The node already matched the commit.
    InSync {
        /// The commit.
        commit: String,
    },
    /// The plan was carried out.
    Applied {
        /// The commit applied.
        commit: String,
        /// What was done.
        summary: Summary,
        /// How long applying took.
        seconds: f64,
        /// How long each staged upgrade took, by service.
        upgrades: BTreeMap<String, f64>,
    },
    /// Reconcile is suspended: drift is reported, nothing applied.
    Suspended {
        /// The commit planned for.
        commit: String,
        /// Changes that applying would make.
        changes: usize,
        /// Since when.
        since: Timestamp,
        /// Why, if given.
        reason: Option<String>,
    },
    /// The commit (or the fetch) failed before and its back-off has not passed: not tried.
    BackingOff {
        /// The commit; `None` when the fetch failed.
        commit: Option<String>,
        /// Failed runs in a row.
        consecutive_failures: u32,
        /// When it is tried again.
        retry_after: Option<Timestamp>,
    },
    /// The run failed. Failures at the `state` stage that keep a run from
    /// recording anything (another lessnat holds the lock, the record cannot
    /// be read) are reported here only, with `consecutive_failures` 0.
    Failed {
        /// Where it stopped.
        stage: Stage,
        /// The commit, if the fetch worked.
        commit: Option<String>,
        /// What went wrong (an invalid spec: every located problem).
        error: String,
        /// Failed runs in a row, this one included.
        consecutive_failures: u32,
        /// When the same commit is tried again.
        retry_after: Option<Timestamp>,
    },
}

/// One line: the event with its time and node.
#[derive(Serialize)]
struct Line<'a> {
    time: Timestamp,
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<&'a str>,
    #[serde(flatten)]
    event: &'a Event,
}

/// Opening the events file failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot open the events file {path} for appending")]
pub struct EventsError {
    /// The file.
    pub path: PathBuf,
    /// Why.
    #[source]
    pub cause: std::io::Error,
}

/// Where events go. Writing them never fails a run: a write error is logged.
#[derive(Default)]
pub struct Events {
    sinks: Vec<Box<dyn Write + Send>>,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events")
            .field("sinks", &self.sinks.len())
            .finish()
    }
}

impl Events {
    /// No sinks: events are dropped.
    pub fn none() -> Events {
        Events::default()
    }

    /// Also writes events to `sink` (standard output, say), one line each.
    pub fn with_writer(mut self, sink: Box<dyn Write + Send>) -> Events {
        self.sinks.push(sink);
        self
    }

    /// Also appends events to the file at `path`, created when missing.
    pub fn with_file(mut self, path: &Path) -> Result<Events, EventsError> {
        let file = File::options()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|cause| EventsError {
                path: path.to_path_buf(),
                cause,
            })?;
        self.sinks.push(Box::new(file));
        Ok(self)
    }

    /// Writes `event`, stamped with the time and `node`, to every sink.
    pub fn emit(&mut self, node: Option<&str>, event: &Event) {
        if self.sinks.is_empty() {
            return;
        }
        let line = Line {
            time: Timestamp::now(),
            node,
            event,
        };
        let mut text = match serde_json::to_string(&line) {
            Ok(text) => text,
            Err(error) => {
                tracing::warn!("cannot serialise an event: {}", chain(&error));
                return;
            }
        };
        text.push('\n');
        for sink in &mut self.sinks {
            // One write per line, so appenders sharing a file do not interleave.
            if let Err(error) = sink.write_all(text.as_bytes()).and_then(|()| sink.flush()) {
                tracing::warn!("cannot write an event: {}", chain(&error));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::captured::Captured;

    #[test]
    fn events_are_json_lines_with_time_node_and_kind() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("events.jsonl");
        let shared = Captured::default();
        let mut events = Events::none()
            .with_writer(Box::new(shared.clone()))
            .with_file(&path)
            .expect("file");
        events.emit(
            Some("web-1"),
            &Event::InSync {
                commit: "abc".into(),
            },
        );
        events.emit(
            None,
            &Event::Failed {
                stage: Stage::Fetch,
                commit: None,
                error: "no route".into(),
                consecutive_failures: 1,
                retry_after: None,
            },
        );
        let written = shared.text();
        assert_eq!(written, std::fs::read_to_string(&path).expect("file"));
        let lines: Vec<serde_json::Value> = written
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["event"], "in-sync");
        assert_eq!(lines[0]["node"], "web-1");
        assert_eq!(lines[0]["commit"], "abc");
        assert!(lines[0]["time"].as_str().is_some_and(|t| t.ends_with('Z')));
        assert_eq!(lines[1]["event"], "failed");
        assert_eq!(lines[1]["stage"], "fetch");
        assert!(lines[1].get("node").is_none());
    }
}
