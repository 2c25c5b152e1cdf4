//! One reconcile run: take the apply lock, fetch, check the fetched commit
//! against the last applied one, read and check the spec at that commit, plan
//! against the live host, apply (unless suspended or `--plan-only`), and
//! record what happened. Each step emits an event; a failure at any step
//! changes nothing on the host that the step had not already changed, and is
//! recorded with its stage and message.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::events::{Event, Events};
use super::fetch::{Mirror, Relation, Source};
use super::record::{
    Applied, Backoff, LastError, Outcome, Record, RecordFile, Run, Stage, Timestamp,
};
use super::schedule::backoff_delay;
use super::status::short;
use super::suspend::SuspendFile;
use crate::apply::ApplyError;
use crate::error::chain;
use crate::lock::LockError;
use crate::model::ClusterView;
use crate::plan::{Action, Change, Decision, Resource, Summary, plan};
use crate::report::{Report, Reporter};
use crate::session::{self, Planned, Session, SessionError};
use crate::spec::{Spec, load_bytes};
use crate::style::Style;

/// The mirror's directory name inside the state directory.
pub const REPO_DIR: &str = "repo";

/// What a reconciler is set up with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where the spec lives.
    pub source: Source,
    /// Only plan and report drift; never apply.
    pub plan_only: bool,
    /// Apply a commit that is not a descendant of the last applied one.
    pub allow_rollback: bool,
    /// The failure back-off's base: after n failures in a row the failed commit
    /// is not tried again for base × 2^n (at most 10 × base).
    pub backoff_base: Duration,
    /// Where to write the Prometheus textfile after each run.
    pub metrics_file: Option<PathBuf>,
}

/// Whether a run fetches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetch {
    /// Fetch the ref and go on with the commit it points to.
    Remote,
    /// Go on with the commit the last fetch brought (fetch only when there
    /// was none yet): for runs woken by something on the host, not in Git.
    LastFetched,
}

/// How a run ended.
#[derive(Debug)]
pub struct Ran {
    /// How it ended; `None` when nothing was tried: another lessnat held the
    /// lock, or the commit failed before and its back-off has not passed.
    pub outcome: Option<Outcome>,
    /// Changes the plan held (0 without a plan).
    pub changes: usize,
    /// After a failure, or while backing off: when the same commit is tried again.
    pub retry_after: Option<Timestamp>,
    /// The commit the run went on with, once fetched.
    pub commit: Option<String>,
    /// Why it failed or was refused, or why nothing was tried.
    pub error: Option<String>,
    /// Where it failed.
    pub stage: Option<Stage>,
    /// Nothing was tried because another lessnat held the apply lock.
    pub busy: bool,
    /// The run's last plan (spec, node, what it observed), when it got that far.
    pub planned: Option<Box<Planned>>,
}

/// Runs reconcile, once per call of [`Reconciler::run`], in one [`Session`]
/// (its state directory also holds the record, the suspend flag and the mirror).
pub struct Reconciler {
    settings: Settings,
    session: Session,
    clock: Arc<Mutex<UpgradeClock>>,
    events: Events,
    cluster_views: Option<ClusterViews>,
}

/// What the etcd view a run of a spec plans with comes from, when someone
/// keeps one (the agent's watch); `None` from it: the run reads etcd once.
pub type ClusterViews = Box<dyn Fn(&Spec) -> Option<ClusterView> + Send>;

/// Passes the session's reports on to people, and notes how long each staged
/// upgrade took and each rollback, for the record and the `applied` event.
struct UpgradeClock {
    people: Box<dyn Reporter + Send>,
    upgrade_seconds: Vec<(String, f64)>,
    rollbacks: u64,
}

impl Reporter for UpgradeClock {
    fn report(&mut self, report: &Report<'_>) {
        if let Report::ChangeEnded {
            change,
            took,
            error,
        } = *report
        {
            if rolls_back_in_flight(change) || matches!(error, Some(ApplyError::RolledBack { .. }))
            {
                self.rollbacks += 1;
            } else if let (None, Some(_), Resource::Service { name }) =
                (error, &change.upgrade, &change.resource)
            {
                self.upgrade_seconds
                    .push((name.clone(), took.as_secs_f64()));
            }
        }
        self.people.report(report);
    }
}

/// Why a run stopped.
struct Failure {
    stage: Stage,
    message: String,
}

impl Failure {
    fn new(stage: Stage, error: &dyn std::error::Error) -> Failure {
        Failure {
            stage,
            message: chain(error),
        }
    }
}

/// How the steps of a run ended, before it is recorded.
enum Step {
    /// Record the run with this outcome, then emit the event (if any), so
    /// whoever reacts to it finds the record, status and metrics up to date.
    Done(Outcome, Option<Event>),
    /// The failed commit's back-off holds: nothing tried, nothing recorded.
    BackingOff(Option<Timestamp>),
}

/// What a run learned on the way, for the record.
#[derive(Default)]
struct Notes {
    node: Option<String>,
    commit: Option<String>,
    planned: Option<Summary>,
    drift: Option<usize>,
    changed_outside: usize,
    spec_errors: usize,
    refusal: Option<String>,
    applied: Summary,
    apply_seconds: Option<f64>,
    upgrade_seconds: Vec<(String, f64)>,
    rollbacks: u64,
    last_plan: Option<Box<Planned>>,
}

impl Reconciler {
    /// A reconciler working in a session set up with `session`; people read
    /// `people` (the plan, progress, messages, problems).
    pub fn new(
        settings: Settings,
        session: session::Settings,
        people: Box<dyn Reporter + Send>,
        events: Events,
    ) -> Reconciler {
        let clock = Arc::new(Mutex::new(UpgradeClock {
            people,
            upgrade_seconds: Vec::new(),
            rollbacks: 0,
        }));
        Reconciler {
            settings,
            session: Session::new(session, Box::new(Arc::clone(&clock))),
            clock,
            events,
            cluster_views: None,
        }
    }

    /// From now on runs plan with the etcd view `views` gives for their
    /// spec (the agent's watch keeps it current), instead of reading etcd
    /// once per run.
    pub fn use_cluster_views(&mut self, views: ClusterViews) {
        self.cluster_views = Some(views);
    }

    /// From now on SIGINT and SIGTERM stop a fetch, roll back an upgrade
    /// under way, and end [`run_loop`](super::schedule::run_loop).
    pub fn catch_signals(&mut self) -> Result<(), SessionError> {
        self.session.catch_signals()
    }

    /// Where the spec comes from.
    pub fn source(&self) -> &Source {
        &self.settings.source
    }

    /// Whether SIGINT or SIGTERM arrived.
    pub fn interrupted(&self) -> bool {
        self.session.interrupted()
    }

    /// Writes a line for people.
    pub fn say(&mut self, text: &str) {
        self.session.report(&Report::Message(text));
    }

    /// Writes an error or a warning for people.
    fn complain(&mut self, text: &str) {
        self.session.report(&Report::Problem(text));
    }

    /// One run that fetches; see [`Reconciler::run_with`].
    pub fn run(&mut self) -> Ran {
        self.run_with(Fetch::Remote)
    }

    /// One run. Every problem is written to `out` and reported as an event,
    /// and recorded, unless it keeps the run from recording anything: another
    /// lessnat holds the lock, or the record cannot be read.
    pub fn run_with(&mut self, fetch: Fetch) -> Ran {
        let started = Timestamp::now();
        let clock = Instant::now();
        let state_dir = self.session.settings().state_dir.clone();
        let nothing_tried = |retry_after, error: Option<String>, busy| Ran {
            outcome: None,
            changes: 0,
            retry_after,
            commit: None,
            error,
            stage: None,
            busy,
            planned: None,
        };
        let _lock = match self.session.lock() {
            Ok(lock) => lock,
            Err(error) => {
                let busy = matches!(error, SessionError::Lock(LockError::Held { .. }));
                let message = self.unrecorded(&error);
                return nothing_tried(None, Some(message), busy);
            }
        };
        let records = RecordFile::in_dir(&state_dir);
        let mut record = match records.read() {
            Ok(record) => record,
            Err(error) => {
                let message = self.unrecorded(&error);
                return nothing_tried(None, Some(message), false);
            }
        };
        let mut notes = Notes {
            node: self
                .session
                .settings()
                .node
                .clone()
                .or_else(|| record.node.clone()),
            ..Notes::default()
        };
        let step = self.steps(&record, fetch, &mut notes);
        let now = Timestamp::now();
        let mut run = Run {
            started,
            seconds: clock.elapsed().as_secs_f64(),
            commit: notes.commit.clone(),
            outcome: Outcome::Failed,
            stage: None,
            planned: notes.planned,
            drift: notes.drift,
            changed_outside: notes.changed_outside,
            spec_errors: notes.spec_errors,
            error: None,
        };
        let last_event;
        match step {
            Ok(Step::BackingOff(retry_after)) => {
                let why = retry_after.map_or(String::new(), |t| format!(" until {t}"));
                let error = format!("backing off after failures{why}");
                return nothing_tried(retry_after, Some(error), false);
            }
            Ok(Step::Done(outcome, event)) => {
                last_event = event;
                run.outcome = outcome;
                run.error = notes.refusal.clone();
                if matches!(outcome, Outcome::Applied | Outcome::InSync) {
                    if let Some(commit) = &notes.commit {
                        record.applied = Some(Applied {
                            commit: commit.clone(),
                            at: now,
                            summary: notes.applied,
                        });
                    }
                    record.last_success = Some(now);
                    record.backoff = Backoff::default();
                }
            }
            Err(failure) => {
                let failures = record.backoff.consecutive_failures.saturating_add(1);
                let retry_after =
                    Timestamp::at_least(backoff_delay(self.settings.backoff_base, failures));
                record.backoff = Backoff {
                    consecutive_failures: failures,
                    failed_commit: notes.commit.clone(),
                    retry_after: Some(retry_after),
                };
                record.totals.failures += 1;
                record.last_error = Some(LastError {
                    at: started,
                    stage: failure.stage,
                    commit: notes.commit.clone(),
                    message: failure.message.clone(),
                });
                run.stage = Some(failure.stage);
                run.error = Some(failure.message.clone());
                self.complain(&format!(
                    "error ({} stage): {}\nFailed {failures} {} in a row; {} is not tried again before {retry_after}.",
                    failure.stage.as_str(),
                    failure.message.trim_end(),
                    if failures == 1 { "time" } else { "times" },
                    notes
                        .commit
                        .as_deref()
                        .map_or("the fetch".to_string(), |c| format!("commit {}", short(c))),
                ));
                last_event = Some(Event::Failed {
                    stage: failure.stage,
                    commit: notes.commit.clone(),
                    error: failure.message,
                    consecutive_failures: failures,
                    retry_after: Some(retry_after),
                });
            }
        }
        record.totals.rollbacks += notes.rollbacks;
        if let Some(seconds) = notes.apply_seconds {
            record.last_apply_seconds = Some(seconds);
        }
        record
            .upgrade_seconds
            .extend(notes.upgrade_seconds.drain(..));
        record.node = notes.node.clone();
        record.source = Some(self.settings.source.redacted());
        let ran = Ran {
            outcome: Some(run.outcome),
            changes: run.drift.unwrap_or(0),
            retry_after: match run.outcome {
                Outcome::Failed => record.backoff.retry_after,
                _ => None,
            },
            commit: run.commit.clone(),
            error: run.error.clone(),
            stage: run.stage,
            busy: false,
            planned: notes.last_plan.take(),
        };
        record.last_run = Some(run);
        if let Err(error) = records.write(&record) {
            self.complain(&format!("error: {}", chain(&error)));
        }
        if let Some(path) = self.settings.metrics_file.clone()
            && let Err(error) = super::metrics::write_textfile(&state_dir, &path)
        {
            self.complain(&format!("error: {}", chain(&error)));
        }
        if let Some(event) = last_event {
            self.emit(&notes, &event);
        }
        ran
    }

    /// Reports a problem with lessnat's own state that keeps the run from
    /// recording anything; returns its message.
    fn unrecorded(&mut self, error: &dyn std::error::Error) -> String {
        let message = chain(error);
        self.complain(&format!("not reconciling now: {message}"));
        let node = self.session.settings().node.clone();
        self.events.emit(
            node.as_deref(),
            &Event::Failed {
                stage: Stage::State,
                commit: None,
                error: message.clone(),
                consecutive_failures: 0,
                retry_after: None,
            },
        );
        message
    }

    fn emit(&mut self, notes: &Notes, event: &Event) {
        self.events.emit(notes.node.as_deref(), event);
    }

    fn steps(&mut self, record: &Record, fetch: Fetch, notes: &mut Notes) -> Result<Step, Failure> {
        let source = self.settings.source.clone();
        let state_dir = self.session.settings().state_dir.clone();
        let suspension = SuspendFile::in_dir(&state_dir)
            .read()
            .map_err(|e| Failure::new(Stage::State, &e))?;
        let applying = !self.settings.plan_only && suspension.is_none();
        let mirror = Mirror::open_or_init(&state_dir.join(REPO_DIR))
            .map_err(|e| Failure::new(Stage::Fetch, &e))?;
        let last_fetched = match fetch {
            Fetch::Remote => None,
            Fetch::LastFetched => mirror
                .fetched()
                .map_err(|e| Failure::new(Stage::Fetch, &e))?,
        };
        if last_fetched.is_none() && applying && record.backoff.holds(None, Timestamp::now()) {
            return Ok(self.back_off(&record.backoff, None, notes));
        }
        let fetched_now = last_fetched.is_none();
        let commit = match last_fetched {
            Some(commit) => commit,
            None => mirror
                .fetch(&source, self.session.interrupt())
                .map_err(|e| Failure {
                    stage: Stage::Fetch,
                    message: source.redact(&chain(&e)),
                })?,
        };
        let commit_hex = commit.to_string();
        notes.commit = Some(commit_hex.clone());
        let applied = record.applied.as_ref().map(|a| a.commit.clone());
        self.say(&format!(
            "{} {} from {}: commit {}{}",
            if fetched_now {
                "Fetched"
            } else {
                "Re-planning the last fetched"
            },
            source.short_ref(),
            source.public_url(),
            short(&commit_hex),
            match &applied {
                Some(a) if *a == commit_hex => " (applied already)".to_string(),
                Some(a) => format!(" (last applied: {})", short(a)),
                None => " (nothing applied yet)".to_string(),
            }
        ));
        if fetched_now {
            self.emit(
                notes,
                &Event::Fetched {
                    repo: source.public_url(),
                    reference: source.reference.clone(),
                    commit: commit_hex.clone(),
                    applied: applied.clone(),
                },
            );
        }

        if applying && record.backoff.holds(Some(&commit_hex), Timestamp::now()) {
            return Ok(self.back_off(&record.backoff, Some(commit_hex), notes));
        }

        if let Some(applied) = &applied {
            let relation = mirror
                .relation(applied, commit)
                .map_err(|e| Failure::new(Stage::Fetch, &e))?;
            if !relation.is_forward() {
                if self.settings.allow_rollback {
                    self.say(&format!(
                        "Commit {} is not a descendant of the last applied commit {} ({}); applying it anyway (--allow-rollback).",
                        short(&commit_hex),
                        short(applied),
                        relation.as_str()
                    ));
                    self.emit(
                        notes,
                        &Event::RollbackAllowed {
                            commit: commit_hex.clone(),
                            applied: applied.clone(),
                            relation: relation.as_str(),
                        },
                    );
                } else {
                    let reason = refusal(relation, &commit_hex, applied, &source);
                    self.say(&format!("Refused: {reason}"));
                    notes.refusal = Some(reason.clone());
                    let event = Event::Refused {
                        commit: commit_hex,
                        applied: applied.clone(),
                        relation: relation.as_str(),
                        reason,
                    };
                    return Ok(Step::Done(Outcome::Refused, Some(event)));
                }
            }
        }

        let bytes = mirror
            .read_file(commit, &source.path)
            .map_err(|e| Failure::new(Stage::Spec, &e))?;
        let name = format!("{}@{}", source.path, short(&commit_hex));
        let spec = load_bytes(&name, &bytes).map_err(|report| {
            notes.spec_errors = report.diagnostics.len();
            Failure {
                stage: Stage::Spec,
                message: format!(
                    "the spec at commit {} is not valid; nothing was changed:\n{}",
                    short(&commit_hex),
                    report.render(Style::Plain)
                ),
            }
        })?;
        let node = self
            .session
            .node(Some(&spec))
            .map_err(|e| Failure::new(Stage::Spec, &e))?;
        notes.node = Some(node.clone());

        let view = self.cluster_views.as_ref().and_then(|views| views(&spec));
        let planned = self
            .session
            .plan_with_cluster(spec, node, None, view)
            .map_err(failure)?;
        let plan = &planned.plan;
        notes.planned = Some(plan.summary());
        notes.drift = Some(plan.changes.len());
        notes.changed_outside = plan.drift.len();
        self.session.report(&Report::Plan(plan));
        self.emit(
            notes,
            &Event::Planned {
                commit: commit_hex.clone(),
                changes: plan.changes.len(),
                summary: plan.summary(),
                changed_outside: plan.drift.len(),
                conflicts: plan.conflicts.len(),
            },
        );
        if self.settings.plan_only {
            notes.last_plan = Some(Box::new(planned));
            return Ok(Step::Done(Outcome::Planned, None));
        }
        if let Some(suspension) = suspension {
            self.say(&format!(
                "\nReconcile is suspended on this node (since {}{}): nothing applied. `lessnat resume` ends it.",
                suspension.since,
                suspension
                    .reason
                    .as_deref()
                    .map_or(String::new(), |r| format!(": {r}"))
            ));
            let event = Event::Suspended {
                commit: commit_hex,
                changes: plan.changes.len(),
                since: suspension.since,
                reason: suspension.reason,
            };
            notes.last_plan = Some(Box::new(planned));
            return Ok(Step::Done(Outcome::Suspended, Some(event)));
        }
        let outcome = if plan.is_empty() && plan.conflicts.is_empty() {
            notes.last_plan = Some(Box::new(planned));
            Outcome::InSync
        } else {
            self.apply(planned, notes)?;
            Outcome::Applied
        };
        if let Err(error) = mirror.mark_applied(commit) {
            self.complain(&format!("warning: {}", chain(&error)));
        }
        let event = match outcome {
            Outcome::Applied => Event::Applied {
                commit: commit_hex,
                summary: notes.applied,
                seconds: notes.apply_seconds.unwrap_or_default(),
                upgrades: notes.upgrade_seconds.iter().cloned().collect(),
            },
            _ => Event::InSync { commit: commit_hex },
        };
        Ok(Step::Done(outcome, Some(event)))
    }

    /// Says that `commit` (`None`: the fetch) is not tried again yet.
    fn back_off(&mut self, backoff: &Backoff, commit: Option<String>, notes: &Notes) -> Step {
        let what = commit
            .as_deref()
            .map_or("the fetch".to_string(), |c| format!("commit {}", short(c)));
        let when = backoff
            .retry_after
            .map_or(String::new(), |t| format!(" before {t}"));
        self.say(&format!(
            "Not trying {what} again{when}: it failed {} {} in a row (back-off). A new commit is tried at once; `lessnat resume` ends the back-off.",
            backoff.consecutive_failures,
            if backoff.consecutive_failures == 1 { "time" } else { "times" },
        ));
        self.emit(
            notes,
            &Event::BackingOff {
                commit,
                consecutive_failures: backoff.consecutive_failures,
                retry_after: backoff.retry_after,
            },
        );
        Step::BackingOff(backoff.retry_after)
    }

    /// Carries out `planned` in the session (which plans again after an
    /// upgrade in flight), then plans once more to record the drift left.
    fn apply(&mut self, mut planned: Planned, notes: &mut Notes) -> Result<(), Failure> {
        let clock = Instant::now();
        let applied = self.session.apply(&mut planned);
        {
            let mut upgrades = self.clock.lock().unwrap_or_else(PoisonError::into_inner);
            notes.upgrade_seconds.append(&mut upgrades.upgrade_seconds);
            notes.rollbacks += std::mem::take(&mut upgrades.rollbacks);
        }
        notes.applied = applied.map_err(failure)?;
        notes.apply_seconds = Some(clock.elapsed().as_secs_f64());
        let after = self
            .session
            .observe(Some(&planned.spec), &planned.node)
            .map_err(failure)?;
        let left = plan(&planned.spec, &planned.node, &after).changes.len();
        notes.last_plan = Some(Box::new(Planned {
            observed: after,
            ..planned
        }));
        notes.drift = Some(left);
        if left > 0 {
            self.complain(&format!(
                "warning: a fresh plan still has {left} changes; the next run takes them on"
            ));
        }
        Ok(())
    }
}

/// Where a session's error stops a run, and what it says.
fn failure(error: SessionError) -> Failure {
    match error {
        SessionError::Apply(error) => Failure::new(Stage::Apply, &error),
        SessionError::Observe(error) => Failure::new(Stage::Observe, &error),
        SessionError::Conflicts(conflicts) => Failure {
            stage: Stage::Plan,
            message: format!(
                "not applying: resolve these conflicts first:\n  - {}",
                conflicts.join("\n  - ")
            ),
        },
        // Connecting to Docker, to read the host.
        other => Failure::new(Stage::Observe, &other),
    }
}

/// Whether `change` rolls back an upgrade found in flight.
fn rolls_back_in_flight(change: &Change) -> bool {
    change.action == Action::Upgrade
        && change
            .upgrade
            .as_ref()
            .and_then(|u| u.in_flight.as_ref())
            .is_some_and(|f| f.decision == Decision::RollBack)
}

/// Why a commit that does not move the node forward is not applied, and what to do.
fn refusal(relation: Relation, commit: &str, applied: &str, source: &Source) -> String {
    let (commit, applied) = (short(commit), short(applied));
    let how = "If that is what you want, run once with --allow-rollback";
    match relation {
        Relation::Ancestor => format!(
            "commit {commit} at {} is older than the last applied commit {applied} (it is one of its ancestors): \
             a stale mirror or a branch reset must not roll the node back. \
             {how}, or better, commit the old spec again on top.",
            source.short_ref()
        ),
        Relation::Diverged => format!(
            "commit {commit} at {} is not a descendant of the last applied commit {applied}: the branch's history \
             was rewritten (a force-push?), and applying it would undo commits the node runs. {how}.",
            source.short_ref()
        ),
        Relation::Unrelated => format!(
            "commit {commit} shares no history with the last applied commit {applied}: is --repo {} \
             (--ref {}) the right repository? If it replaced the old one on purpose, run once with --allow-rollback.",
            source.public_url(),
            source.short_ref()
        ),
        Relation::Unknown | Relation::Same | Relation::Descendant => format!(
            "the last applied commit {applied} is not in the repository mirror (was it replaced?), so lessnat \
             cannot tell whether commit {commit} is older. {how}."
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_say_what_happened_and_what_to_do() {
        let source = Source::new("file:///srv/spec.git", "main", "spec.yaml").expect("source");
        let (new, old) = ("a".repeat(40), "b".repeat(40));
        let ancestor = refusal(Relation::Ancestor, &new, &old, &source);
        assert!(
            ancestor.contains("older than the last applied commit bbbbbbbbbbbb"),
            "{ancestor}"
        );
        assert!(ancestor.contains("--allow-rollback"), "{ancestor}");
        let unrelated = refusal(Relation::Unrelated, &new, &old, &source);
        assert!(unrelated.contains("shares no history"), "{unrelated}");
        assert!(unrelated.contains("file:///srv/spec.git"), "{unrelated}");
        let diverged = refusal(Relation::Diverged, &new, &old, &source);
        assert!(diverged.contains("rewritten"), "{diverged}");
        let unknown = refusal(Relation::Unknown, &new, &old, &source);
        assert!(
            unknown.contains("not in the repository mirror"),
            "{unknown}"
        );
    }
}
