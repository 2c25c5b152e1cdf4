//! How apply tells what it is doing: steps and waits go to the session's
//! [`Reporter`], which decides how to show them (a live line on a terminal,
//! plain lines in logs).

use std::time::Duration;

use crate::report::{Report, Reporter};

/// Where apply tells what it is doing; it holds the session's reporter.
pub struct Progress {
    reporter: Box<dyn Reporter + Send>,
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Progress").finish_non_exhaustive()
    }
}

impl Progress {
    /// Progress reported to `reporter`.
    pub fn new(reporter: Box<dyn Reporter + Send>) -> Self {
        Progress { reporter }
    }

    /// Passes any report on to the reporter.
    pub fn report(&mut self, report: &Report<'_>) {
        self.reporter.report(report);
    }

    /// Reports one step.
    pub fn step(&mut self, text: &str) {
        self.report(&Report::Step(text));
    }

    /// Reports the state of a wait; called often, shown in place or now and then.
    pub fn waiting(&mut self, text: &str) {
        self.report(&Report::Waiting(text));
    }

    /// Ends a wait's live line.
    pub fn end_wait(&mut self) {
        self.report(&Report::EndWait);
    }
}

/// A duration for people: `4m05s`, `12s`.
pub fn short(duration: Duration) -> String {
    let secs = duration.as_secs();
    if secs >= 60 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        format!("{secs}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_durations() {
        assert_eq!(short(Duration::from_secs(12)), "12s");
        assert_eq!(short(Duration::from_secs(245)), "4m05s");
    }
}
