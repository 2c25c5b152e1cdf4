//! Reports: what a [`Session`](crate::session::Session) does, as it happens —
//! each plan, each change starting and ending, progress lines, messages for
//! people, problems, and the final summary. A [`Reporter`] decides where they
//! go; the library never prints.
//!
//! | module | what it does |
//! | --- | --- |
//! | [`text`] | text for people on a writer: a live line on a terminal, plain log lines elsewhere |
//!
//! Reconcile's JSON events (`gitops::events`) keep their own vocabulary
//! (commits, stages, back-off); reconcile's reporter feeds them what the
//! session reports (how long each staged upgrade took, rollbacks).

pub mod text;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::apply::ApplyError;
use crate::plan::{Change, Plan, Summary};

/// One thing that happened.
#[derive(Debug, Clone, Copy)]
pub enum Report<'a> {
    /// A plan was made and is about to be carried out, or only shown.
    Plan(&'a Plan),
    /// A plan finished or rolled back an upgrade in flight, and the plan made
    /// after it (reported next) takes the node on to the current spec.
    NextRound,
    /// A change is about to be carried out.
    ChangeStarted(&'a Change),
    /// A change was carried out, or failed with `error`.
    ChangeEnded {
        /// The change.
        change: &'a Change,
        /// How long it took.
        took: Duration,
        /// Why it failed, if it did.
        error: Option<&'a ApplyError>,
    },
    /// A step of a change (one line).
    Step(&'a str),
    /// The state of a wait, reported often; shown in place or now and then.
    Waiting(&'a str),
    /// The current wait is over.
    EndWait,
    /// Every round was carried out: what was done in all.
    Applied(&'a Summary),
    /// A line for people.
    Message(&'a str),
    /// An error or a warning, for people (standard error on the command line).
    Problem(&'a str),
}

/// Where reports go. Reporting never fails: a reporter that cannot write
/// (a closed pipe) drops what it cannot write, so an apply is never stopped
/// half-way by its output.
pub trait Reporter {
    /// Takes one report.
    fn report(&mut self, report: &Report<'_>);
}

/// A reporter shared with its owner, who reads what it gathered once the
/// session is done with it.
impl<R: Reporter + ?Sized> Reporter for Arc<Mutex<R>> {
    fn report(&mut self, report: &Report<'_>) {
        self.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .report(report);
    }
}

/// A writer tests read back.
#[cfg(test)]
pub(crate) mod captured {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    /// Keeps what is written; clones share it.
    #[derive(Clone, Default)]
    pub(crate) struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Captured {
        /// Everything written so far.
        pub(crate) fn text(&self) -> String {
            String::from_utf8(self.0.lock().expect("lock").clone()).expect("utf-8")
        }
    }

    impl Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::Error::other("poisoned"))?
                .extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
