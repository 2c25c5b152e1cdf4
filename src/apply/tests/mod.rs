//! Unit tests of apply's decisions against the in-memory [`FakeHost`]: each
//! plans a spec against the fake host as observed (as `lessnat apply` does),
//! applies the plan, and checks the host left behind and the order of the
//! changes made. No root, no Docker, no real drain waits.

mod batch;
mod canary;
mod routed;
mod routed_canary;
mod upgrade;

use super::fake::{FakeContainer, FakeHost};
use super::progress::Progress;
use super::{ApplyError, Context, apply_change};
use crate::journal::{Journal, JournalFile};
use crate::plan::operation::Operation;
use crate::plan::{Plan, Summary, plan};

/// Calls that do not change the host's traffic (reads, pulls, and the hold
/// on lessnat's table); [`Harness::changes`] leaves them out (conntrack reads stay: each
/// one is a drain poll).
const READS: [&str; 8] = [
    "hold table",
    "pull ",
    "state ",
    "probe ",
    "read flows to ",
    "list veths",
    "logs ",
    "exec ",
];

/// A fake host, the node it is, and a state directory for the journal.
struct Harness {
    fake: FakeHost,
    node: &'static str,
    state_dir: tempfile::TempDir,
}

impl Harness {
    /// An empty host for `node`.
    fn new(node: &'static str) -> Self {
        Harness {
            fake: FakeHost::new(),
            node,
            state_dir: tempfile::tempdir().expect("temporary state directory"),
        }
    }

    /// A host for `node` where `spec` was applied, its calls forgotten.
    fn installed(node: &'static str, spec: &str) -> Self {
        let harness = Harness::new(node);
        harness.apply(spec).expect("the first version installs");
        harness.fake.clear_calls();
        harness
    }

    /// Plans `spec` against the fake host as it is now.
    fn plan(&self, spec: &str) -> Plan {
        let spec = crate::spec::load_bytes("spec.yaml", spec.as_bytes())
            .unwrap_or_else(|r| panic!("{}", r.render(crate::style::Style::Plain)));
        plan(&spec, self.node, &self.fake.observed(self.node))
    }

    /// Plans `spec` and applies the plan.
    fn apply(&self, spec: &str) -> Result<(), ApplyError> {
        self.apply_plan(&self.plan(spec))
    }

    /// Applies `plan` to the fake host.
    fn apply_plan(&self, plan: &Plan) -> Result<(), ApplyError> {
        self.apply_summary(plan).map(drop)
    }

    /// Applies `plan` to the fake host and returns apply's summary.
    fn apply_summary(&self, plan: &Plan) -> Result<Summary, ApplyError> {
        let ctx = Context {
            node: self.node,
            host: &self.fake,
            journal: self.journal_file(),
            interrupt: &self.fake.interrupt,
        };
        let quiet = crate::report::text::Text::new(
            Box::new(std::io::sink()),
            Box::new(std::io::sink()),
            crate::style::Style::Plain,
            crate::report::text::Flavour::Log,
        );
        let mut progress = Progress::new(Box::new(quiet));
        let mut summary = plan.summary();
        for change in &plan.changes {
            summary.table_restores += apply_change(&ctx, &mut progress, change)?;
        }
        Ok(summary)
    }

    fn journal_file(&self) -> JournalFile {
        JournalFile::in_dir(self.state_dir.path())
    }

    /// The journal as apply left it.
    fn journal(&self) -> Journal {
        self.journal_file().read().expect("journal")
    }

    /// The calls that changed the host, and the conntrack reads, in order.
    fn changes(&self) -> Vec<String> {
        self.fake
            .calls()
            .into_iter()
            .filter(|call| !READS.iter().any(|read| call.starts_with(read)))
            .collect()
    }

    /// Asserts that `name` is the only container, runs `image` and has the
    /// restart policy of a healthy primary; returns it.
    fn assert_only(&self, name: &str, image: &str) -> FakeContainer {
        assert_eq!(self.fake.container_names(), [name]);
        let container = self.fake.container(name).expect("listed");
        assert_eq!(container.spec.image, image);
        assert!(container.running && container.kept_running, "{container:?}");
        container
    }

    /// Asserts that `first` was called, and before any call of `then`.
    fn assert_before(&self, first: &str, then: &str) {
        let calls = self.fake.calls();
        let at = |call: &str| calls.iter().position(|c| c == call);
        let first_at = at(first).unwrap_or_else(|| panic!("no {first:?} in {calls:#?}"));
        assert!(
            at(then).is_none_or(|then_at| first_at < then_at),
            "{first:?} comes after {then:?} in {calls:#?}"
        );
    }
}

/// Where `call` is in `calls` (the first time); fails when it is not there.
fn position(calls: &[String], call: &str) -> usize {
    calls
        .iter()
        .position(|c| c == call)
        .unwrap_or_else(|| panic!("no {call:?} in {calls:#?}"))
}

/// The operation of a plan that has exactly one change besides pulling
/// images (the fake engine lacks a new image until it is pulled).
fn only_operation(plan: &Plan) -> &Operation {
    let changes: Vec<&Operation> = plan
        .changes
        .iter()
        .map(|change| &change.operation)
        .filter(|operation| !matches!(operation, Operation::PullImage { .. }))
        .collect();
    match changes.as_slice() {
        [operation] => operation,
        operations => panic!("expected one change, got {operations:#?}"),
    }
}
