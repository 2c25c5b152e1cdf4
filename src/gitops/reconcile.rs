//! One reconcile run: take the apply lock, fetch, check the fetched commit
//! against the last applied one, read and check the spec at that commit, plan
//! against the live host, apply (unless suspended or `--plan-only`), and
//! record what happened. Each step emits an event; a failure at any step
//! changes nothing on the host that the step had not already changed, and is
//! recorded with its stage and message.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use super::describe;
use super::events::{Event, Events};
use super::fetch::{Mirror, Relation, Source};
use super::record::{
    Applied, Backoff, LastError, Outcome, Record, RecordFile, Run, Stage, Timestamp,
};
use super::schedule::backoff_delay;
use super::status::{short, summary_text};
use super::suspend::SuspendFile;
use crate::apply::progress::Progress;
use crate::apply::{self, ApplyError};
use crate::backend::docker::Docker;
use crate::journal::JournalFile;
use crate::lock::ApplyLock;
use crate::netns::Netns;
use crate::observe::live::observe_for;
use crate::plan::{Action, Decision, Plan, Resource, Summary, plan, render::render};
use crate::spec::{Spec, load_bytes};
use crate::style::Style;

/// The mirror's directory name inside the state directory.
pub const REPO_DIR: &str = "repo";

/// What a reconciler is set up with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where the spec lives.
    pub source: Source,
    /// The state directory: lock, journal, record, suspend flag, mirror.
    pub state_dir: PathBuf,
    /// The network namespace to work in.
    pub netns: Netns,
    /// Only plan and report drift; never apply.
    pub plan_only: bool,
    /// Apply a commit that is not a descendant of the last applied one.
    pub allow_rollback: bool,
    /// The failure back-off's base: after n failures in a row the failed commit
    /// is not tried again for base × 2^n (at most 10 × base).
    pub backoff_base: Duration,
    /// Where to write the Prometheus textfile after each run.
    pub metrics_file: Option<PathBuf>,
    /// Who this is, for the lock file (the command line).
    pub holder: String,
    /// The node given on the command line, if any: names the node in events
    /// and the record until the spec says which node this is.
    pub node: Option<String>,
    /// Style of the plan and messages for people.
    pub style: Style,
}

/// Which node of a spec this host is; `Err` says why none fits.
pub type NodeOf<'a> = Box<dyn Fn(&Spec) -> Result<String, String> + 'a>;

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Ran {
    /// How it ended; `None` when nothing was tried: another lessnat held the
    /// lock, or the commit failed before and its back-off has not passed.
    pub outcome: Option<Outcome>,
    /// Changes the plan held (0 without a plan).
    pub changes: usize,
    /// After a failure, or while backing off: when the same commit is tried again.
    pub retry_after: Option<Timestamp>,
}

/// Runs reconcile, once per call of [`Reconciler::run`].
pub struct Reconciler<'a> {
    settings: Settings,
    docker: &'a Docker,
    node_of: NodeOf<'a>,
    events: Events,
    out: Box<dyn Write + 'a>,
    interrupt: &'a AtomicBool,
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
            message: describe(error),
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
}

impl<'a> Reconciler<'a> {
    /// A reconciler. `node_of` picks this host's node in a spec; people read
    /// `out` (the plan, progress, messages); `interrupt` (SIGINT, SIGTERM)
    /// stops a fetch and rolls back an upgrade under way.
    pub fn new(
        settings: Settings,
        docker: &'a Docker,
        node_of: NodeOf<'a>,
        events: Events,
        out: Box<dyn Write + 'a>,
        interrupt: &'a AtomicBool,
    ) -> Reconciler<'a> {
        Reconciler {
            settings,
            docker,
            node_of,
            events,
            out,
            interrupt,
        }
    }

    /// One run. Every problem is written to `out` and reported as an event,
    /// and recorded, unless it keeps the run from recording anything: another
    /// lessnat holds the lock, or the record cannot be read.
    pub fn run(&mut self) -> Ran {
        let started = Timestamp::now();
        let clock = Instant::now();
        let state_dir = self.settings.state_dir.clone();
        let nothing_tried = |retry_after| Ran {
            outcome: None,
            changes: 0,
            retry_after,
        };
        let _lock = match ApplyLock::acquire(&state_dir, &self.settings.holder) {
            Ok(lock) => lock,
            Err(error) => {
                self.unrecorded(&error);
                return nothing_tried(None);
            }
        };
        let records = RecordFile::in_dir(&state_dir);
        let mut record = match records.read() {
            Ok(record) => record,
            Err(error) => {
                self.unrecorded(&error);
                return nothing_tried(None);
            }
        };
        let mut notes = Notes {
            node: self.settings.node.clone().or_else(|| record.node.clone()),
            ..Notes::default()
        };
        let step = self.steps(&record, &mut notes);
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
            Ok(Step::BackingOff(retry_after)) => return nothing_tried(retry_after),
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
                self.say(&format!(
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
        };
        record.last_run = Some(run);
        if let Err(error) = records.write(&record) {
            self.say(&format!("error: {}", describe(&error)));
        }
        if let Some(path) = &self.settings.metrics_file
            && let Err(error) = super::metrics::write_textfile(&state_dir, path)
        {
            self.say(&format!("error: {}", describe(&error)));
        }
        if let Some(event) = last_event {
            self.emit(&notes, &event);
        }
        ran
    }

    /// Reports a problem with lessnat's own state that keeps the run from
    /// recording anything.
    fn unrecorded(&mut self, error: &dyn std::error::Error) {
        let message = describe(error);
        self.say(&format!("not reconciling now: {message}"));
        let node = self.settings.node.clone();
        self.events.emit(
            node.as_deref(),
            &Event::Failed {
                stage: Stage::State,
                commit: None,
                error: message,
                consecutive_failures: 0,
                retry_after: None,
            },
        );
    }

    /// Writes a line for people; a broken pipe does not stop the run.
    fn say(&mut self, text: &str) {
        let _ = writeln!(self.out, "{text}");
    }

    fn emit(&mut self, notes: &Notes, event: &Event) {
        self.events.emit(notes.node.as_deref(), event);
    }

    fn steps(&mut self, record: &Record, notes: &mut Notes) -> Result<Step, Failure> {
        let source = self.settings.source.clone();
        let state_dir = self.settings.state_dir.clone();
        let suspension = SuspendFile::in_dir(&state_dir)
            .read()
            .map_err(|e| Failure::new(Stage::State, &e))?;
        let applying = !self.settings.plan_only && suspension.is_none();
        if applying && record.backoff.holds(None, Timestamp::now()) {
            return Ok(self.back_off(&record.backoff, None, notes));
        }
        let mirror = Mirror::open_or_init(&state_dir.join(REPO_DIR))
            .map_err(|e| Failure::new(Stage::Fetch, &e))?;
        let commit = mirror.fetch(&source, self.interrupt).map_err(|e| Failure {
            stage: Stage::Fetch,
            message: source.redact(&describe(&e)),
        })?;
        let commit_hex = commit.to_string();
        notes.commit = Some(commit_hex.clone());
        let applied = record.applied.as_ref().map(|a| a.commit.clone());
        self.say(&format!(
            "Fetched {} from {}: commit {}{}",
            source.short_ref(),
            source.public_url(),
            short(&commit_hex),
            match &applied {
                Some(a) if *a == commit_hex => " (applied already)".to_string(),
                Some(a) => format!(" (last applied: {})", short(a)),
                None => " (nothing applied yet)".to_string(),
            }
        ));
        self.emit(
            notes,
            &Event::Fetched {
                repo: source.public_url(),
                reference: source.reference.clone(),
                commit: commit_hex.clone(),
                applied: applied.clone(),
            },
        );

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
        let node = (self.node_of)(&spec).map_err(|message| Failure {
            stage: Stage::Spec,
            message,
        })?;
        notes.node = Some(node.clone());

        let observed = observe_for(&spec, &node, &self.settings.netns, self.docker)
            .map_err(|e| Failure::new(Stage::Observe, &e))?;
        let plan = plan(&spec, &node, &observed);
        notes.planned = Some(plan.summary());
        notes.drift = Some(plan.changes.len());
        notes.changed_outside = plan.drift.len();
        let rendered = render(&plan, self.settings.style);
        let _ = write!(self.out, "{rendered}");
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
            return Ok(Step::Done(Outcome::Suspended, Some(event)));
        }
        if !plan.conflicts.is_empty() {
            return Err(Failure {
                stage: Stage::Plan,
                message: format!(
                    "not applying: resolve these conflicts first:\n  - {}",
                    plan.conflicts.join("\n  - ")
                ),
            });
        }
        let outcome = if plan.is_empty() {
            Outcome::InSync
        } else {
            self.apply(&spec, &node, plan, notes)?;
            Outcome::Applied
        };
        if let Err(error) = mirror.mark_applied(commit) {
            self.say(&format!("warning: {}", describe(&error)));
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

    /// Carries out `plan` change by change (timing each staged upgrade), then,
    /// as `lessnat apply` does, plans again when an upgrade found in flight was
    /// rolled back; finally plans once more to record the drift left.
    fn apply(
        &mut self,
        spec: &Spec,
        node: &str,
        mut plan: Plan,
        notes: &mut Notes,
    ) -> Result<(), Failure> {
        let netns = self.settings.netns.clone();
        let journal = JournalFile::in_dir(&self.settings.state_dir);
        let mut progress = Progress::new(std::io::stdout().is_terminal());
        let clock = Instant::now();
        let reobserve = |docker: &Docker| {
            observe_for(spec, node, &netns, docker).map_err(|e| Failure::new(Stage::Observe, &e))
        };
        for _round in 0..3 {
            let ctx = apply::Context {
                node,
                host: &apply::LiveHost {
                    netns: &netns,
                    docker: self.docker,
                },
                journal: journal.clone(),
                interrupt: self.interrupt,
            };
            for change in &plan.changes {
                let single = Plan {
                    format: plan.format,
                    node: plan.node.clone(),
                    fingerprint: plan.fingerprint.clone(),
                    drift: Vec::new(),
                    conflicts: Vec::new(),
                    changes: vec![change.clone()],
                    warnings: Vec::new(),
                };
                let started = Instant::now();
                let rolls_back = rolls_back_in_flight(change);
                match apply::apply(&ctx, &mut progress, &single) {
                    Ok(done) => {
                        notes.applied.add += done.add;
                        notes.applied.change += done.change;
                        notes.applied.destroy += done.destroy;
                        notes.applied.upgrade += done.upgrade;
                        if rolls_back {
                            notes.rollbacks += 1;
                        } else if let (Some(_), Resource::Service { name }) =
                            (&change.upgrade, &change.resource)
                        {
                            notes
                                .upgrade_seconds
                                .push((name.clone(), started.elapsed().as_secs_f64()));
                        }
                    }
                    Err(error) => {
                        if rolls_back || matches!(error, ApplyError::RolledBack { .. }) {
                            notes.rollbacks += 1;
                        }
                        return Err(Failure::new(Stage::Apply, &error));
                    }
                }
            }
            if !plan.has_upgrade_in_flight() {
                break;
            }
            let observed = reobserve(self.docker)?;
            plan = crate::plan::plan(spec, node, &observed);
            if plan.is_empty() {
                break;
            }
            let rendered = render(&plan, self.settings.style);
            self.say("\nThe upgrade in flight is followed by the upgrade to the current spec:\n");
            let _ = write!(self.out, "{rendered}");
        }
        notes.apply_seconds = Some(clock.elapsed().as_secs_f64());
        self.say(&format!(
            "\nApply complete! Resources: {}.",
            summary_text(&notes.applied)
        ));
        let after = reobserve(self.docker)?;
        let left = crate::plan::plan(spec, node, &after).changes.len();
        notes.drift = Some(left);
        if left > 0 {
            self.say(&format!(
                "warning: a fresh plan still has {left} changes; the next run takes them on"
            ));
        }
        Ok(())
    }
}

/// Whether `change` rolls back an upgrade found in flight.
fn rolls_back_in_flight(change: &crate::plan::Change) -> bool {
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
