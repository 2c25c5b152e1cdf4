//! Makes one demo node match a spec through a [`Session`], as `lessnat apply
//! --auto-approve` does: the plan and apply's progress go to the demo's
//! output stream.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use crate::netns::Netns;
use crate::plan::Summary;
use crate::report::Report;
use crate::report::text::{Flavour, Text};
use crate::session::{Session, SessionError, Settings};
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

/// Where the demo's output for people goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error (with `--json`, standard output carries only the summary).
    Stderr,
    /// Nowhere (cleanup works quietly).
    Nowhere,
}

impl Stream {
    /// A writer to this stream.
    pub fn writer(self) -> Box<dyn Write + Send> {
        match self {
            Stream::Stdout => Box::new(std::io::stdout()),
            Stream::Stderr => Box::new(std::io::stderr()),
            Stream::Nowhere => Box::new(std::io::sink()),
        }
    }
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
    /// Locking, observing, planning or applying failed.
    #[error("converging {node}")]
    Session {
        /// The node.
        node: String,
        /// Why.
        source: Box<SessionError>,
    },
}

/// Makes `node` match `spec` (YAML text), reporting the plan and apply's
/// progress on `stream` (a live line when `live`). Stops early, rolling back
/// an upgrade, when `interrupt` is set.
pub fn converge(
    interrupt: &Arc<AtomicBool>,
    node: &Node,
    spec: &str,
    stream: Stream,
    live: bool,
) -> Result<Summary, ConvergeError> {
    let spec = crate::spec::load_bytes("demo.yaml", spec.as_bytes())
        .map_err(|report| ConvergeError::Spec(report.render(Style::Plain)))?;
    let failed = |source| ConvergeError::Session {
        node: node.name.clone(),
        source: Box::new(source),
    };
    let settings = Settings {
        node: Some(node.name.clone()),
        netns: node.netns.clone(),
        state_dir: node.state_dir.clone(),
        holder: "lessnat demo".to_string(),
    };
    let style = if live { Style::Color } else { Style::Plain };
    let reporter = Text::new(
        stream.writer(),
        stream.writer(),
        style,
        Flavour::for_terminal(live),
    );
    let mut session = Session::new(settings, Box::new(reporter)).with_interrupt(interrupt.clone());
    let _lock = session.lock().map_err(failed)?;
    let mut planned = session.plan(spec, node.name.clone()).map_err(failed)?;
    session.report(&Report::Plan(&planned.plan));
    session.apply(&mut planned).map_err(failed)
}
