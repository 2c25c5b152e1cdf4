//! The agent's loop: start the event sources and the HTTP endpoint, converge
//! once, tell systemd it is ready, then wait for the next wake-up (an event,
//! or the interval) and converge again, until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;

use super::backoff::{CrashLoops, after_failures};
use super::cluster::{self, ClusterShared};
use super::health_watch::{self, HealthShared};
use super::http::{self, PROMETHEUS_TEXT};
use super::metrics::AgentMetrics;
use super::notify::notify;
use super::state::{AgentState, Outcome, Run, StateFile};
use super::wake::{Trigger, Wake, Waker};
use super::{AgentError, container_events, rollout_watch, table_events};
use crate::apply::ApplyError;
use crate::backend::nft::reassert;
use crate::error::chain;
use crate::gitops::metrics::gather;
use crate::gitops::reconcile::{Fetch, Ran, Reconciler};
use crate::gitops::record::{Outcome as GitopsOutcome, Stage, Timestamp};
use crate::gitops::suspend::SuspendFile;
use crate::lock::{AGENT_LOCK_FILE, ApplyLock, LockError};
use crate::model::NftTable;
use crate::ownership::{NFT_FAMILY, NFT_TABLE};
use crate::report::Report;
use crate::session::{Planned, Session, SessionError};
use crate::spec::load_file;
use crate::style::Style;

/// How soon a run that found the apply lock held is tried again.
const BUSY_RETRY: Duration = Duration::from_secs(1);

/// The base of the back-off after failed runs.
const FAILURE_BACKOFF_BASE: Duration = Duration::from_secs(1);

/// How often the loop looks at the interrupt flag while it waits.
const SIGNAL_CHECK: Duration = Duration::from_millis(200);

/// Where the agent's runs take the spec from.
pub enum SpecSource {
    /// A spec file, read again at every run.
    File(PathBuf),
    /// A Git repository: each run is a reconcile run (fetch, check the
    /// commit, read the spec at it, plan, apply, record). Runs woken by an
    /// event re-plan the last fetched commit; the interval fetches.
    Repo(Box<Reconciler>),
}

impl SpecSource {
    /// Where the spec comes from, for people.
    fn describe(&self) -> String {
        match self {
            SpecSource::File(path) => path.display().to_string(),
            SpecSource::Repo(reconciler) => reconciler.source().describe(),
        }
    }
}

impl std::fmt::Debug for SpecSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// What the agent is set up with.
#[derive(Debug)]
pub struct Settings {
    /// Where the spec comes from.
    pub source: SpecSource,
    /// The node this is (chosen once, at the start).
    pub node: String,
    /// How long apart runs are without events.
    pub interval: Duration,
    /// Where to serve `/metrics` and `/healthz`.
    pub listen: Option<SocketAddr>,
    /// Whether a run plans with the health watch's last round of probes
    /// when it is fresh, instead of probing again (off only to measure).
    pub reuse_probes: bool,
}

/// What `/healthz` says: `None` before the first run, then whether the last
/// run failed (and why).
type Healthz = Arc<Mutex<Option<Result<(), String>>>>;

/// A running agent; see the module documentation of `agent`.
pub struct Agent {
    settings: Settings,
    session: Session,
    state: AgentState,
    state_file: StateFile,
    metrics: Arc<AgentMetrics>,
    health: Arc<HealthShared>,
    cluster: Arc<ClusterShared>,
    healthz: Healthz,
    wakes: Receiver<Wake>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    crash_loops: CrashLoops,
    failures: u32,
    /// The last run failed only to fetch (`--repo`): the interval paces
    /// fetches, and event runs go on with the last fetched commit, so such a
    /// failure holds no run back.
    fetch_failed: bool,
    /// lessnat's table as the last run that planned no change found it: what
    /// a run woken by a table event writes back at once, before it observes.
    settled_table: Option<NftTable>,
    _lock: ApplyLock,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// Takes the agent lock (refused, naming the holder, when another agent
    /// has it), catches SIGINT and SIGTERM, starts the event sources and the
    /// HTTP endpoint. Returns the agent and the address it serves on.
    pub fn start(
        mut settings: Settings,
        mut session: Session,
    ) -> Result<(Agent, Option<SocketAddr>), AgentError> {
        let state_dir = session.settings().state_dir.clone();
        let lock = ApplyLock::acquire_file(&state_dir, AGENT_LOCK_FILE, &session.settings().holder)
            .map_err(|error| match error {
                LockError::Held { holder, .. } => AgentError::Running { holder },
                other => AgentError::Lock(other),
            })?;
        session
            .catch_signals()
            .map_err(|error| AgentError::Session(Box::new(error)))?;
        let (sender, wakes) = std::sync::mpsc::channel();
        let waker = Waker::new(sender);
        let stop = Arc::new(AtomicBool::new(false));
        let health = Arc::new(HealthShared::default());
        let cluster = Arc::new(ClusterShared::default());
        let netns = session.settings().netns.clone();
        let threads = vec![
            table_events::spawn(&netns, waker.clone(), Arc::clone(&stop))?,
            container_events::spawn(settings.node.clone(), waker.clone(), Arc::clone(&stop))?,
            health_watch::spawn(
                netns.clone(),
                Arc::clone(&health),
                waker.clone(),
                Arc::clone(&stop),
            )?,
            cluster::spawn_registration(
                netns,
                Arc::clone(&cluster),
                waker.clone(),
                Arc::clone(&stop),
            )?,
            cluster::spawn_watch(Arc::clone(&cluster), waker.clone(), Arc::clone(&stop))?,
            rollout_watch::spawn(Arc::clone(&cluster), waker, Arc::clone(&stop))?,
        ];
        let metrics = Arc::new(AgentMetrics::new());
        let healthz: Healthz = Arc::default();
        let bound = match settings.listen {
            Some(addr) => {
                let record_dir =
                    matches!(settings.source, SpecSource::Repo(_)).then(|| state_dir.clone());
                Some(http::serve(addr, router(&metrics, &healthz, record_dir))?)
            }
            None => None,
        };
        if let SpecSource::Repo(reconciler) = &mut settings.source {
            reconciler
                .catch_signals()
                .map_err(|error| AgentError::Session(Box::new(error)))?;
            // Reconcile runs plan with the watch's view, as `-f` runs do.
            let views = Arc::clone(&cluster);
            reconciler.use_cluster_views(Box::new(move |spec| views.view(spec)));
        }
        let state = AgentState::new(settings.source.describe(), settings.interval.as_secs_f64());
        let agent = Agent {
            settings,
            state,
            state_file: StateFile::in_dir(&state_dir),
            metrics,
            health,
            cluster,
            healthz,
            wakes,
            stop,
            threads,
            crash_loops: CrashLoops::default(),
            failures: 0,
            fetch_failed: false,
            settled_table: None,
            session,
            _lock: lock,
        };
        Ok((agent, bound))
    }

    /// Runs until SIGINT or SIGTERM: a run now, `READY=1` to systemd, then a
    /// run at each wake-up.
    pub fn run(mut self) -> Result<(), AgentError> {
        let mut pending = Some(Wake::new(Trigger::Start, "the agent started"));
        let mut due = Instant::now();
        let mut not_before = Instant::now();
        let mut next_interval = Instant::now() + self.settings.interval;
        let mut ready = false;
        while !self.session.interrupted() {
            let now = Instant::now();
            if let Some(wake) = pending.take_if(|_| now >= due) {
                let outcome = self.converge(&wake)?;
                next_interval = Instant::now() + self.settings.interval;
                not_before = Instant::now() + after_failures(FAILURE_BACKOFF_BASE, self.failures);
                if outcome == Outcome::Busy {
                    pending = Some(Wake::new(
                        Trigger::Retry,
                        format!("after waiting for the apply lock ({})", wake.detail),
                    ));
                    due = Instant::now() + BUSY_RETRY;
                }
                if !ready {
                    ready = true;
                    notify("READY=1\nSTATUS=converged once; watching");
                    self.say(
                        "Ready: converged once; watching nftables, Docker and replica health.",
                    );
                }
                continue;
            }
            let deadline = if pending.is_some() {
                due
            } else {
                next_interval
            };
            let wait = deadline.saturating_duration_since(now).min(SIGNAL_CHECK);
            match self.wakes.recv_timeout(wait) {
                Ok(wake) => {
                    let mut wakes = vec![wake];
                    wakes.extend(self.wakes.try_iter());
                    for wake in wakes {
                        let hold = wake.died.as_deref().map_or(Duration::ZERO, |name| {
                            self.crash_loops.died(name, Instant::now())
                        });
                        let at = (Instant::now() + hold).max(not_before);
                        due = if pending.is_some() { due.max(at) } else { at };
                        pending = Some(match pending.take() {
                            Some(earlier) => earlier.merge(wake),
                            None => wake,
                        });
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    if pending.is_none() && Instant::now() >= next_interval {
                        pending = Some(Wake::new(
                            Trigger::Interval,
                            format!("every {:?}", self.settings.interval),
                        ));
                        due = not_before;
                    }
                }
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        notify("STOPPING=1");
        self.say("Stopping: what lessnat made keeps running.");
        Ok(())
    }

    /// One run for `wake`: noted in the state file, the metrics, `/healthz`
    /// and the log.
    fn converge(&mut self, wake: &Wake) -> Result<Outcome, AgentError> {
        let started = Instant::now();
        self.fetch_failed = false;
        let result = self.converge_once(wake);
        let seconds = started.elapsed().as_secs_f64();
        let (outcome, changes, error) = match result {
            Ok((outcome, changes)) => (outcome, changes, None),
            Err((outcome, message)) => (outcome, 0, Some(message)),
        };
        self.failures = match outcome {
            Outcome::Failed if self.fetch_failed => self.failures,
            Outcome::Failed => self.failures.saturating_add(1),
            _ => 0,
        };
        let corrected = outcome == Outcome::Applied && wake.trigger != Trigger::Start;
        self.metrics.ran(
            wake.trigger,
            outcome.as_str(),
            corrected,
            Timestamp::now().unix_seconds(),
            seconds,
        );
        let line = match (outcome, &error) {
            (Outcome::Applied, _) if corrected => Some(format!(
                "Drift corrected ({}: {}): {changes} {} applied in {seconds:.2}s.",
                wake.trigger.as_str(),
                wake.detail,
                if changes == 1 { "change" } else { "changes" }
            )),
            (Outcome::Applied, _) => Some(format!(
                "Converged ({}): {changes} changes applied in {seconds:.2}s.",
                wake.detail
            )),
            (Outcome::Failed, Some(error)) => Some(format!(
                "Run failed ({}: {}): {error}",
                wake.trigger.as_str(),
                wake.detail
            )),
            (Outcome::Suspended, _) => Some(format!(
                "Suspended: {changes} changes planned, none applied (lessnat resume ends it)."
            )),
            (Outcome::Busy, Some(error)) => Some(format!("Waiting: {error}")),
            (Outcome::InSync, _) if wake.trigger == Trigger::Start => {
                Some("Adopted: the node already matches the spec (no changes).".to_string())
            }
            (Outcome::InSync, _) if wake.trigger == Trigger::Health => Some(format!(
                "Health changed ({}): the spread already matches.",
                wake.detail
            )),
            _ => None,
        };
        if let Some(line) = line {
            if outcome == Outcome::Failed {
                self.session.report(&Report::Problem(&line));
            } else {
                self.say(&line);
            }
            self.state.event(line);
        }
        *self.healthz.lock().unwrap_or_else(PoisonError::into_inner) = Some(match &error {
            Some(error) if outcome == Outcome::Failed => Err(error.clone()),
            _ => Ok(()),
        });
        self.state.cluster = self.cluster.link();
        self.state.ran(Run {
            at: Timestamp::now(),
            trigger: wake.trigger,
            detail: wake.detail.clone(),
            seconds,
            outcome,
            changes,
            error,
        });
        notify(&format!(
            "STATUS=last run {} ({}), {} runs",
            outcome.as_str(),
            wake.trigger.as_str(),
            self.state.runs
        ));
        let written = self.state_file.write(&self.state);
        // After the state file: whoever reads a gauge then `lessnat status`
        // finds the same link there.
        self.metrics.cluster(self.state.cluster.as_ref());
        written?;
        Ok(outcome)
    }

    /// Under the apply lock: when `table_changed`, writes back the settled
    /// table if it no longer holds; then observes, plans and applies when
    /// the plan has changes (unless suspended). Returns how it ended and the
    /// changes, or why not ([`Outcome::Busy`] when another lessnat holds the
    /// apply lock, [`Outcome::Failed`]).
    fn converge_once(&mut self, wake: &Wake) -> Result<(Outcome, usize), (Outcome, String)> {
        let lock = match self.session.lock() {
            Ok(lock) => lock,
            Err(SessionError::Lock(LockError::Held { holder, .. })) => {
                return Err((
                    Outcome::Busy,
                    format!("another lessnat holds the apply lock: {holder}"),
                ));
            }
            Err(error) => return Err((Outcome::Failed, chain(&error))),
        };
        let restored = match (wake.table_changed, &self.settled_table) {
            (true, Some(table)) => reassert(&self.session.settings().netns, table)
                .map_err(|error| (Outcome::Failed, chain(&error)))?,
            _ => false,
        };
        if restored {
            self.say(
                "Restored lessnat's table as it last was when converged; now checking the rest.",
            );
        }
        let ran = match &mut self.settings.source {
            SpecSource::File(spec_file) => {
                let spec_file = spec_file.clone();
                self.plan_and_apply(&spec_file)
                    .map_err(|message| (Outcome::Failed, message))
            }
            SpecSource::Repo(reconciler) => {
                // The reconcile run takes the apply lock itself.
                drop(lock);
                let ran = reconciler.run_with(match wake.trigger {
                    Trigger::Start | Trigger::Interval => Fetch::Remote,
                    _ => Fetch::LastFetched,
                });
                self.reconciled(ran)
            }
        };
        match ran {
            Ok((Outcome::InSync, _)) if restored => Ok((Outcome::Applied, 1)),
            Ok((outcome, changes)) => Ok((outcome, changes + usize::from(restored))),
            Err(error) => Err(error),
        }
    }

    /// Notes what a reconcile run did (a run that fetches at the start and
    /// on the interval, else one that re-plans the last fetched commit).
    /// Returns how it ended and the changes, or why not.
    fn reconciled(&mut self, ran: Ran) -> Result<(Outcome, usize), (Outcome, String)> {
        self.state.commit.clone_from(&ran.commit);
        self.fetch_failed = ran.stage == Some(Stage::Fetch);
        let state_dir = self.session.settings().state_dir.clone();
        let suspended = SuspendFile::in_dir(&state_dir)
            .read()
            .map_err(|e| (Outcome::Failed, chain(&e)))?
            .is_some();
        self.metrics.set_suspended(suspended);
        self.settled_table = None;
        if ran.busy {
            return Err((Outcome::Busy, ran.error.unwrap_or_default()));
        }
        if let Some(planned) = &ran.planned {
            self.state.node = Some(planned.node.clone());
            self.noted(planned);
            if ran.outcome == Some(GitopsOutcome::InSync) {
                self.settled_table = own_table(planned);
            }
        }
        let error = ran.error.unwrap_or_default();
        match ran.outcome {
            Some(GitopsOutcome::Applied) => Ok((Outcome::Applied, ran.changes)),
            Some(GitopsOutcome::InSync) => Ok((Outcome::InSync, 0)),
            Some(GitopsOutcome::Suspended) => Ok((Outcome::Suspended, ran.changes)),
            Some(GitopsOutcome::Refused) => Err((Outcome::Failed, format!("refused: {error}"))),
            Some(GitopsOutcome::Failed | GitopsOutcome::Planned) | None => {
                Err((Outcome::Failed, error))
            }
        }
    }

    /// Notes what a run planned: the replicas to watch, the spreads and
    /// their health in the state file and the metrics.
    fn noted(&mut self, planned: &Planned) {
        let probes = &planned.observed.probes;
        self.health.set_target(&planned.spec, &planned.node, probes);
        let registered =
            cluster::registered_health(&planned.spec, &planned.node, &planned.observed);
        let probes = registered.as_deref().unwrap_or(probes);
        self.cluster
            .set_target(&planned.spec, &planned.node, self.state.commit.clone());
        self.state.note_spreads(&planned.observed, probes);
        self.metrics.probed(probes);
    }

    /// [`Agent::converge_once`] under the apply lock; an error is its message.
    fn plan_and_apply(&mut self, spec_file: &Path) -> Result<(Outcome, usize), String> {
        let spec = load_file(spec_file).map_err(|report| {
            format!(
                "{} is not a valid spec:\n{}",
                spec_file.display(),
                report.render(Style::Plain)
            )
        })?;
        let node = self.session.node(Some(&spec)).map_err(|e| chain(&e))?;
        if node != self.settings.node {
            return Err(format!(
                "the spec now makes this host node `{node}`, but the agent started as node `{}`: restart the agent",
                self.settings.node
            ));
        }
        self.state.node = Some(node.clone());
        let recent = self
            .settings
            .reuse_probes
            .then(|| self.health.recent())
            .flatten();
        let view = self.cluster.view(&spec);
        let mut planned = self
            .session
            .plan_with_cluster(spec, node, recent.as_ref(), view)
            .map_err(|e| chain(&e))?;
        self.noted(&planned);
        let state_dir = self.session.settings().state_dir.clone();
        let suspended = SuspendFile::in_dir(&state_dir)
            .read()
            .map_err(|e| chain(&e))?
            .is_some();
        self.metrics.set_suspended(suspended);
        let changes = planned.plan.changes.len();
        self.settled_table = None;
        if planned.plan.is_empty() {
            self.settled_table = own_table(&planned);
            return Ok((Outcome::InSync, 0));
        }
        self.session.report(&Report::Plan(&planned.plan));
        if suspended {
            return Ok((Outcome::Suspended, changes));
        }
        match self.session.apply(&mut planned) {
            Ok(_) => Ok((Outcome::Applied, changes)),
            Err(SessionError::Apply(error @ ApplyError::Paused { .. })) => {
                let message = chain(&error);
                SuspendFile::in_dir(&state_dir)
                    .suspend(Some(format!("lessnat agent: {message}")))
                    .map_err(|e| chain(&e))?;
                self.metrics.set_suspended(true);
                Err(format!(
                    "{message}; the agent suspended applies until `lessnat resume`"
                ))
            }
            Err(error) => Err(chain(&error)),
        }
    }

    /// Says `text` to people (the log).
    pub fn say(&mut self, text: &str) {
        self.session.report(&Report::Message(text));
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for thread in self.threads.drain(..) {
            // A panicked thread has nothing left to report.
            let _ = thread.join();
        }
    }
}

/// lessnat's table as `planned` observed it.
fn own_table(planned: &Planned) -> Option<NftTable> {
    planned
        .observed
        .nft
        .tables
        .iter()
        .find(|t| t.family == NFT_FAMILY && t.name == NFT_TABLE)
        .cloned()
}

/// The agent's HTTP endpoints: `/metrics` and `/healthz`. With
/// `record_dir` (`--repo`), `/metrics` also carries reconcile's metrics from
/// the record there (the applied commit among them).
fn router(metrics: &Arc<AgentMetrics>, healthz: &Healthz, record_dir: Option<PathBuf>) -> Router {
    let metrics = Arc::clone(metrics);
    let healthz = Arc::clone(healthz);
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = Arc::clone(&metrics);
                let record_dir = record_dir.clone();
                async move {
                    let mut text = metrics.render();
                    // A record that cannot be read shows as missing reconcile metrics.
                    if let Some(more) = record_dir.and_then(|dir| gather(&dir).ok()) {
                        text.push_str(&more);
                    }
                    http::text(StatusCode::OK, PROMETHEUS_TEXT, text)
                }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let answer = healthz
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone();
                async move {
                    let (status, body) = match answer {
                        None => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "starting: no run yet\n".to_string(),
                        ),
                        Some(Ok(())) => (StatusCode::OK, "ok\n".to_string()),
                        Some(Err(error)) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("last run failed: {error}\n"),
                        ),
                    };
                    http::text(status, "text/plain; charset=utf-8", body)
                }
            }),
        )
        .fallback(http::not_found)
}
