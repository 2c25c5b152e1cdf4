//! Makes one demo node match a spec: observe, plan, print the plan, apply,
//! as `lessnat apply --auto-approve` does.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use crate::apply::progress::Progress;
use crate::apply::{ApplyError, Context};
use crate::backend::docker::Docker;
use crate::journal::JournalFile;
use crate::lock::{ApplyLock, LockError};
use crate::netns::Netns;
use crate::observe::live::{ObserveError, observe_for};
use crate::plan::render::render;
use crate::plan::{Summary, plan};
use crate::style::Style;

/// A lessnat node the demo made: its name in the spec, its network
/// namespace and its own state directory.
#[derive(Debug, Clone)]
pub struct Node {
    /// The node's name in the spec.
    pub name: String,
    /// Where it lives.
    pub netns: Netns,
    /// Its `--state-dir`.
    pub state_dir: PathBuf,
}

impl From<&super::topology::Node> for Node {
    fn from(node: &super::topology::Node) -> Node {
        Node {
            name: node.name.clone(),
            netns: node.ns.as_ref().netns(),
            state_dir: node.state_dir.clone(),
        }
    }
}

/// Converging a node failed.
#[derive(Debug, thiserror::Error)]
pub enum ConvergeError {
    /// The demo wrote a spec lessnat rejects (a bug of the demo).
    #[error("the demo's spec is not valid:\n{0}")]
    Spec(String),
    /// The state directory's lock is held.
    #[error("locking the demo's state directory")]
    Lock(#[source] LockError),
    /// Reading the host failed.
    #[error("reading the live host")]
    Observe(#[source] ObserveError),
    /// The plan has conflicts.
    #[error("the plan on {node} has conflicts: {}", conflicts.join("; "))]
    Conflicts {
        /// The node.
        node: String,
        /// The conflicts.
        conflicts: Vec<String>,
    },
    /// Applying failed.
    #[error("applying on {node}")]
    Apply {
        /// The node.
        node: String,
        /// Why.
        source: Box<ApplyError>,
    },
    /// The plan could not be printed.
    #[error("printing the plan")]
    Output(#[source] std::io::Error),
}

/// Makes `node` match `spec` (YAML text), printing the plan to `out` and
/// apply's progress to standard output (live when `live`). Stops early,
/// rolling back an upgrade, when `interrupt` is set.
pub fn converge(
    docker: &Docker,
    interrupt: &AtomicBool,
    node: &Node,
    spec: &str,
    out: &mut dyn Write,
    live: bool,
) -> Result<Summary, ConvergeError> {
    let _lock = ApplyLock::acquire(&node.state_dir, "lessnat demo").map_err(ConvergeError::Lock)?;
    let spec = crate::spec::load_bytes("demo.yaml", spec.as_bytes())
        .map_err(|report| ConvergeError::Spec(report.render(Style::Plain)))?;
    let observed =
        observe_for(&spec, &node.name, &node.netns, docker).map_err(ConvergeError::Observe)?;
    let plan = plan(&spec, &node.name, &observed);
    let style = if live { Style::Color } else { Style::Plain };
    out.write_all(render(&plan, style).as_bytes())
        .and_then(|()| out.flush())
        .map_err(ConvergeError::Output)?;
    if !plan.conflicts.is_empty() {
        return Err(ConvergeError::Conflicts {
            node: node.name.clone(),
            conflicts: plan.conflicts.clone(),
        });
    }
    let context = Context {
        node: &node.name,
        host: &crate::apply::LiveHost {
            netns: &node.netns,
            docker,
        },
        journal: JournalFile::in_dir(&node.state_dir),
        interrupt,
    };
    let mut progress = Progress::new(live);
    crate::apply::apply(&context, &mut progress, &plan).map_err(|source| ConvergeError::Apply {
        node: node.name.clone(),
        source: Box::new(source),
    })
}
