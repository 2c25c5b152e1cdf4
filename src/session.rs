//! A session: everything lessnat needs to work on one node — the network
//! namespace, the Docker client (connected on first use), the state directory
//! with its apply lock and journal, the interrupt flag — and what it does
//! there: choose the node, observe, plan, check saved plans, and carry plans
//! out round after round. What happens is told to a [`Reporter`]; errors are
//! returned, never printed. The command line and `reconcile` are its callers.

use std::cell::OnceCell;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::apply::progress::Progress;
use crate::apply::stale::changes_since;
use crate::apply::{self, ApplyError};
use crate::backend::docker::{Docker, DockerError};
use crate::cluster::rollout;
use crate::cluster::view::read_once;
use crate::desired::routed::load_balancer_role;
use crate::journal::JournalFile;
use crate::lock::{ApplyLock, LockError};
use crate::model::{ClusterView, Observed};
use crate::netns::Netns;
use crate::observe::live::{ObserveError, observe_for, observe_with};
use crate::observe::probe::RecentProbes;
use crate::plan::saved::{SAVED_PLAN_FORMAT, SavedPlan, SavedPlanError};
use crate::plan::{Plan, Summary, plan};
use crate::report::{Report, Reporter};
use crate::spec::{SPEC_VERSION, Spec};

/// How many times a plan is carried out and made again, at most, when each
/// one finished or rolled back an upgrade in flight.
pub const MAX_ROUNDS: usize = 3;

/// What a session is set up with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The node named by the user (`--node`), if any.
    pub node: Option<String>,
    /// The network namespace to work in.
    pub netns: Netns,
    /// Where the apply lock and the journal live.
    pub state_dir: PathBuf,
    /// Who this is, for the lock file (the command line).
    pub holder: String,
}

/// A session's work failed.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// `--node` names no node of the spec.
    #[error("the spec has no node named `{node}`; its nodes are {nodes}")]
    NoSuchNode {
        /// The name given.
        node: String,
        /// The spec's nodes, for people.
        nodes: String,
    },
    /// The spec has several nodes and none is named like this host.
    #[error(
        "the spec has {count} nodes and none is named like this host (`{host}`); say which one this is with --node NAME (or LESSNAT_NODE)"
    )]
    NoNodeForHost {
        /// How many nodes the spec has.
        count: usize,
        /// This host's name.
        host: String,
    },
    /// The apply lock is held or unusable.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// The Docker engine cannot be reached.
    #[error(transparent)]
    Docker(#[from] DockerError),
    /// Reading the live host failed.
    #[error("reading the live host")]
    Observe(#[source] ObserveError),
    /// An observed-state snapshot could not be read.
    #[error("reading {}", path.display())]
    ReadSnapshot {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file is not an observed-state snapshot.
    #[error("{} is not an observed-state snapshot", path.display())]
    NotSnapshot {
        /// The file.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
    /// A snapshot was taken on another node.
    #[error("{} was observed on node `{observed}`, not `{node}`", path.display())]
    SnapshotOfOtherNode {
        /// The file.
        path: PathBuf,
        /// The node it was taken on.
        observed: String,
        /// The node planned for.
        node: String,
    },
    /// A saved plan could not be read.
    #[error(transparent)]
    SavedPlan(#[from] SavedPlanError),
    /// A plan could not be saved.
    #[error("saving the plan to {}", path.display())]
    SavePlan {
        /// The file.
        path: PathBuf,
        /// Why.
        source: SavedPlanError,
    },
    /// The host changed since a saved plan was made.
    #[error(
        "the plan in {} is stale: the host changed since it was made:\n  - {}\nMake a new plan: lessnat plan -f {spec_file} --out {}",
        path.display(),
        changes.join("\n  - "),
        path.display()
    )]
    Stale {
        /// The plan file.
        path: PathBuf,
        /// What changed.
        changes: Vec<String>,
        /// The spec file the plan was made from.
        spec_file: String,
    },
    /// The plan has conflicts, so it is not applied.
    #[error("not applying: resolve the conflicts listed above first")]
    Conflicts(Vec<String>),
    /// SIGINT and SIGTERM could not be caught.
    #[error("installing signal handlers")]
    Signals(#[source] std::io::Error),
    /// Carrying out a change failed.
    #[error("apply failed")]
    Apply(#[source] ApplyError),
}

/// A plan with what it was made from.
#[derive(Debug, Clone)]
pub struct Planned {
    /// The spec.
    pub spec: Spec,
    /// The node planned for.
    pub node: String,
    /// The observed state the plan was made against.
    pub observed: Observed,
    /// The plan.
    pub plan: Plan,
    /// Whether it was read from a plan file (so it was confirmed when made).
    pub saved: bool,
}

impl Planned {
    /// Plans `spec` for `node` against `observed`.
    pub fn new(spec: Spec, node: String, observed: Observed) -> Planned {
        let plan = plan(&spec, &node, &observed);
        Planned {
            spec,
            node,
            observed,
            plan,
            saved: false,
        }
    }

    /// Plans again, against `observed`.
    fn against(&mut self, observed: Observed) {
        self.plan = plan(&self.spec, &self.node, &observed);
        self.observed = observed;
    }

    /// Refuses a plan with conflicts: a person must resolve them first.
    pub fn applicable(&self) -> Result<(), SessionError> {
        if self.plan.conflicts.is_empty() {
            Ok(())
        } else {
            Err(SessionError::Conflicts(self.plan.conflicts.clone()))
        }
    }

    /// Saves the plan to `path` for `lessnat apply FILE`, noting the spec
    /// file it was made from.
    pub fn save(&self, spec_file: &Path, path: &Path) -> Result<(), SessionError> {
        let saved = SavedPlan {
            format: SAVED_PLAN_FORMAT,
            lessnat_version: env!("CARGO_PKG_VERSION").to_string(),
            spec_file: spec_file.display().to_string(),
            spec: self.spec.clone(),
            observed: self.observed.clone(),
            plan: self.plan.clone(),
        };
        saved.write(path).map_err(|source| SessionError::SavePlan {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Work on one node. See the module documentation.
pub struct Session {
    settings: Settings,
    docker: OnceCell<Docker>,
    interrupt: Arc<AtomicBool>,
    catching_signals: bool,
    progress: Progress,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("settings", &self.settings)
            .field("interrupted", &self.interrupted())
            .finish_non_exhaustive()
    }
}

impl Session {
    /// A session with `settings`, reporting to `reporter`. Nothing is
    /// connected or taken yet.
    pub fn new(settings: Settings, reporter: Box<dyn Reporter + Send>) -> Session {
        Session {
            settings,
            docker: OnceCell::new(),
            interrupt: Arc::new(AtomicBool::new(false)),
            catching_signals: false,
            progress: Progress::new(reporter),
        }
    }

    /// The same session sharing `interrupt` with its caller instead of its
    /// own flag: the caller's SIGINT/SIGTERM handling stops it too.
    pub fn with_interrupt(mut self, interrupt: Arc<AtomicBool>) -> Session {
        self.interrupt = interrupt;
        self
    }

    /// What the session was set up with.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Reports `report` to the session's reporter.
    pub fn report(&mut self, report: &Report<'_>) {
        self.progress.report(report);
    }

    /// Which node this host is: `--node` (which must be one of the spec's),
    /// else the spec's only node, else the node named like this host. Without
    /// a spec: `--node`, else this host's name.
    pub fn node(&self, spec: Option<&Spec>) -> Result<String, SessionError> {
        let Some(spec) = spec else {
            return Ok(self.settings.node.clone().unwrap_or_else(hostname));
        };
        let names: Vec<&str> = spec.nodes.iter().map(|n| n.name.value.as_str()).collect();
        if let Some(node) = &self.settings.node {
            if names.contains(&node.as_str()) {
                return Ok(node.clone());
            }
            return Err(SessionError::NoSuchNode {
                node: node.clone(),
                nodes: crate::diagnostic::one_of(&names),
            });
        }
        if let [only] = names.as_slice() {
            return Ok(only.to_string());
        }
        let host = hostname();
        if names.contains(&host.as_str()) {
            return Ok(host);
        }
        Err(SessionError::NoNodeForHost {
            count: names.len(),
            host,
        })
    }

    /// Takes the apply lock of the state directory; released when dropped.
    pub fn lock(&self) -> Result<ApplyLock, SessionError> {
        Ok(ApplyLock::acquire(
            &self.settings.state_dir,
            &self.settings.holder,
        )?)
    }

    /// The Docker client, connected on first use.
    pub fn docker(&self) -> Result<&Docker, SessionError> {
        connect(&self.docker)
    }

    /// Reads what lessnat owns on the live host for `node`; with the spec,
    /// also what only the spec says where to look (a load balancer's probes).
    pub fn observe(&self, spec: Option<&Spec>, node: &str) -> Result<Observed, SessionError> {
        self.observe_with_probes(spec, node, None)
    }

    /// Like [`Session::observe`], with probes that just ran standing in for
    /// new ones when they fit the spec (see [`RecentProbes::for_plan`]).
    fn observe_with_probes(
        &self,
        spec: Option<&Spec>,
        node: &str,
        recent: Option<&RecentProbes>,
    ) -> Result<Observed, SessionError> {
        self.observe_sourced(spec, node, recent, None)
    }

    /// Like [`Session::observe_with_probes`], with the registrations `view`
    /// (when given) instead of reading them from etcd once.
    fn observe_sourced(
        &self,
        spec: Option<&Spec>,
        node: &str,
        recent: Option<&RecentProbes>,
        view: Option<ClusterView>,
    ) -> Result<Observed, SessionError> {
        let docker = self.docker()?;
        let netns = &self.settings.netns;
        // Registrations the agent keeps current stand in for probes.
        let probe = !view.as_ref().is_some_and(ClusterView::is_current);
        let mut observed = match spec {
            Some(spec) => observe_for(spec, node, netns, docker, recent, probe),
            None => observe_with(node, netns, docker),
        }
        .map_err(SessionError::Observe)?;
        // Only a load-balancer node plans with the registrations.
        if let Some(cluster) = spec
            .filter(|spec| load_balancer_role(spec, node).is_some())
            .and_then(|spec| spec.cluster.as_ref())
        {
            observed.cluster = Some(view.unwrap_or_else(|| read_once(cluster)));
        }
        // A worker with a service that rolls out reads the rollout keys.
        if let Some(cluster) = spec
            .filter(|spec| rollout::rolls_out_on(spec, node))
            .and_then(|spec| spec.cluster.as_ref())
        {
            observed.rollouts = Some(rollout::read_once(cluster));
        }
        Ok(observed)
    }

    /// Observes the live host and plans `spec` for `node` against it.
    pub fn plan(&self, spec: Spec, node: String) -> Result<Planned, SessionError> {
        self.plan_with_probes(spec, node, None)
    }

    /// Like [`Session::plan`], with the probes of `recent` instead of new
    /// ones when they are fresh and for the same addresses (the agent's
    /// health watch just ran them).
    pub fn plan_with_probes(
        &self,
        spec: Spec,
        node: String,
        recent: Option<&RecentProbes>,
    ) -> Result<Planned, SessionError> {
        self.plan_with_cluster(spec, node, recent, None)
    }

    /// Like [`Session::plan_with_probes`], with the registrations `cluster`
    /// the agent keeps (instead of reading them from etcd once).
    pub fn plan_with_cluster(
        &self,
        spec: Spec,
        node: String,
        recent: Option<&RecentProbes>,
        cluster: Option<ClusterView>,
    ) -> Result<Planned, SessionError> {
        let observed = self.observe_sourced(Some(&spec), &node, recent, cluster)?;
        Ok(Planned::new(spec, node, observed))
    }

    /// Plans removing everything lessnat owns on `node` (`lessnat destroy`).
    pub fn plan_removal(&self, node: String) -> Result<Planned, SessionError> {
        let observed = self.observe(None, &node)?;
        let nothing = Spec {
            version: SPEC_VERSION.into(),
            nodes: Vec::new(),
            services: Vec::new(),
            cluster: None,
        };
        Ok(Planned::new(nothing, node, observed))
    }

    /// Reads the plan saved in `path`, and refuses it when the host changed
    /// since it was made.
    pub fn saved_plan(&self, path: &Path) -> Result<Planned, SessionError> {
        let saved = SavedPlan::read(path)?;
        let node = saved.plan.node.clone();
        let now = self.observe(Some(&saved.spec), &node)?;
        let changes = changes_since(&saved.observed, &now);
        if !changes.is_empty() {
            return Err(SessionError::Stale {
                path: path.to_path_buf(),
                changes,
                spec_file: saved.spec_file,
            });
        }
        Ok(Planned {
            spec: saved.spec,
            node,
            observed: now,
            plan: saved.plan,
            saved: true,
        })
    }

    /// From now on, SIGINT and SIGTERM set the interrupt flag instead of
    /// ending the process: waits stop and an upgrade under way rolls back.
    pub fn catch_signals(&mut self) -> Result<(), SessionError> {
        if self.catching_signals {
            return Ok(());
        }
        for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register(signal, Arc::clone(&self.interrupt))
                .map_err(SessionError::Signals)?;
        }
        self.catching_signals = true;
        Ok(())
    }

    /// The interrupt flag, for work the caller does between the session's.
    pub fn interrupt(&self) -> &AtomicBool {
        &self.interrupt
    }

    /// Whether SIGINT or SIGTERM arrived (after [`Session::catch_signals`]).
    pub fn interrupted(&self) -> bool {
        self.interrupt.load(Ordering::SeqCst)
    }

    /// Carries out `planned` (whose plan the caller has reported), catching
    /// signals; refuses a plan with conflicts, does nothing for an empty one. When the plan finished or rolled back an upgrade in flight,
    /// the host is observed and planned again and that plan carried out too
    /// (an upgrade to the current spec may come next), up to [`MAX_ROUNDS`]
    /// rounds. Returns what was done in all; afterwards `planned` holds the
    /// last plan made.
    pub fn apply(&mut self, planned: &mut Planned) -> Result<Summary, SessionError> {
        planned.applicable()?;
        if planned.plan.is_empty() {
            return Ok(Summary::default());
        }
        self.catch_signals()?;
        let mut total = Summary::default();
        for _round in 0..MAX_ROUNDS {
            add(&mut total, self.apply_round(planned)?);
            if !planned.plan.has_upgrade_in_flight() {
                break;
            }
            let observed = self.observe(Some(&planned.spec), &planned.node)?;
            planned.against(observed);
            if planned.plan.is_empty() {
                break;
            }
            self.report(&Report::NextRound);
            self.report(&Report::Plan(&planned.plan));
        }
        self.report(&Report::Applied(&total));
        Ok(total)
    }

    /// Carries out one plan, change by change, reporting each one's start and end.
    fn apply_round(&mut self, planned: &Planned) -> Result<Summary, SessionError> {
        let host = apply::LiveHost {
            netns: &self.settings.netns,
            docker: connect(&self.docker)?,
        };
        let ctx = apply::Context {
            node: &planned.node,
            host: &host,
            journal: JournalFile::in_dir(&self.settings.state_dir),
            interrupt: &self.interrupt,
        };
        let mut summary = planned.plan.summary();
        for change in &planned.plan.changes {
            self.progress.report(&Report::ChangeStarted(change));
            let started = Instant::now();
            let result = apply::apply_change(&ctx, &mut self.progress, change);
            self.progress.report(&Report::ChangeEnded {
                change,
                took: started.elapsed(),
                error: result.as_ref().err(),
            });
            summary.table_restores += result.map_err(SessionError::Apply)?;
        }
        Ok(summary)
    }
}

/// Reads an observed-state snapshot saved by `lessnat show --json`, which
/// must have been taken on `node`.
pub fn read_snapshot(path: &Path, node: &str) -> Result<Observed, SessionError> {
    let text = std::fs::read_to_string(path).map_err(|source| SessionError::ReadSnapshot {
        path: path.to_path_buf(),
        source,
    })?;
    let observed: Observed =
        serde_json::from_str(&text).map_err(|source| SessionError::NotSnapshot {
            path: path.to_path_buf(),
            source,
        })?;
    if observed.node != node {
        return Err(SessionError::SnapshotOfOtherNode {
            path: path.to_path_buf(),
            observed: observed.node,
            node: node.to_string(),
        });
    }
    Ok(observed)
}

/// The Docker client in `cell`, connected on first use.
fn connect(cell: &OnceCell<Docker>) -> Result<&Docker, SessionError> {
    if let Some(docker) = cell.get() {
        return Ok(docker);
    }
    let docker = Docker::connect()?;
    Ok(cell.get_or_init(|| docker))
}

/// This host's name; empty when it cannot be read.
fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default()
}

fn add(total: &mut Summary, done: Summary) {
    total.add += done.add;
    total.change += done.change;
    total.destroy += done.destroy;
    total.upgrade += done.upgrade;
    total.table_restores += done.table_restores;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::captured::Captured;
    use crate::report::text::{Flavour, Text};
    use crate::style::Style;

    fn session(node: Option<&str>) -> (Session, Captured) {
        let out = Captured::default();
        let settings = Settings {
            node: node.map(str::to_string),
            netns: Netns::Current,
            state_dir: PathBuf::from("/nonexistent"),
            holder: "test".into(),
        };
        let text = Text::new(
            Box::new(out.clone()),
            Box::new(out.clone()),
            Style::Plain,
            Flavour::Log,
        );
        (Session::new(settings, Box::new(text)), out)
    }

    fn spec(nodes: &[&str]) -> Spec {
        let nodes: String = nodes
            .iter()
            .zip(1..)
            .map(|(n, i)| format!("  - name: {n}\n    address: 192.0.2.{i}\n"))
            .collect();
        let yaml = format!("version: 1\nnodes:\n{nodes}services: []\n");
        crate::spec::load_bytes("spec.yaml", yaml.as_bytes()).expect("a valid spec")
    }

    #[test]
    fn the_node_is_the_one_named_or_the_only_one() {
        let (named, _) = session(Some("b"));
        assert_eq!(named.node(Some(&spec(&["a", "b"]))).expect("node"), "b");
        assert_eq!(named.node(None).expect("node"), "b");
        let (unnamed, _) = session(None);
        assert_eq!(unnamed.node(Some(&spec(&["a"]))).expect("node"), "a");
        assert_eq!(unnamed.node(None).expect("node"), hostname());
    }

    #[test]
    fn a_node_that_cannot_be_chosen_says_why() {
        let (named, _) = session(Some("c"));
        let error = named.node(Some(&spec(&["a", "b"]))).expect_err("no node c");
        assert!(matches!(error, SessionError::NoSuchNode { .. }), "{error}");
        assert!(error.to_string().contains("no node named `c`"), "{error}");
        let (unnamed, _) = session(None);
        let error = unnamed
            .node(Some(&spec(&["not-this-host-1", "not-this-host-2"])))
            .expect_err("no node like the host");
        assert!(error.to_string().contains("--node NAME"), "{error}");
    }

    #[test]
    fn an_empty_plan_changes_and_reports_nothing_and_conflicts_are_refused() {
        let (mut session, out) = session(Some("a"));
        let observed = Observed {
            node: "a".into(),
            ..Observed::default()
        };
        let mut planned = Planned::new(spec(&["a"]), "a".into(), observed);
        assert!(planned.plan.is_empty());
        assert_eq!(
            session.apply(&mut planned).expect("nothing to do"),
            Summary::default()
        );
        assert_eq!(out.text(), "");
        planned
            .plan
            .conflicts
            .push("a foreign container is named lessnat-web".into());
        let error = session.apply(&mut planned).expect_err("conflicts");
        assert!(matches!(error, SessionError::Conflicts(_)), "{error}");
    }

    #[test]
    fn a_snapshot_of_another_node_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("observed.json");
        let observed = Observed {
            node: "a".into(),
            ..Observed::default()
        };
        std::fs::write(&path, serde_json::to_vec(&observed).expect("json")).expect("write");
        assert_eq!(read_snapshot(&path, "a").expect("snapshot").node, "a");
        let error = read_snapshot(&path, "b").expect_err("other node");
        assert!(
            error.to_string().contains("observed on node `a`, not `b`"),
            "{error}"
        );
    }
}
