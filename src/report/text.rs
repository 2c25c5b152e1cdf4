//! Text for people: plans rendered, one line per step, and for long waits a
//! live line on a terminal (rewritten in place) or a plain line every few
//! seconds otherwise (cron, systemd, CI logs).

use std::io::Write;
use std::time::{Duration, Instant};

use super::{Report, Reporter};
use crate::gitops::status::summary_text;
use crate::plan::render::render;
use crate::style::Style;

/// How often a wait is reported when output is not a terminal.
const PLAIN_EVERY: Duration = Duration::from_secs(5);

/// How waits are shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    /// A terminal: the state of a wait rewrites one live line.
    Terminal,
    /// Logs: the state of a wait is a plain line now and then.
    Log,
}

impl Flavour {
    /// [`Flavour::Terminal`] when the output is a terminal, else [`Flavour::Log`].
    pub fn for_terminal(is_terminal: bool) -> Flavour {
        if is_terminal {
            Flavour::Terminal
        } else {
            Flavour::Log
        }
    }
}

/// Writes reports as text: everything to `out`, except problems, to `err`.
pub struct Text {
    out: Box<dyn Write + Send>,
    err: Box<dyn Write + Send>,
    style: Style,
    flavour: Flavour,
    last_plain: Option<Instant>,
    showing_live: bool,
    out_closed: bool,
}

impl std::fmt::Debug for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Text")
            .field("style", &self.style)
            .field("flavour", &self.flavour)
            .finish_non_exhaustive()
    }
}

impl Text {
    /// A reporter writing to `out` (plans, progress, messages) and `err`
    /// (problems), plans in `style`, waits as `flavour` says.
    pub fn new(
        out: Box<dyn Write + Send>,
        err: Box<dyn Write + Send>,
        style: Style,
        flavour: Flavour,
    ) -> Text {
        Text {
            out,
            err,
            style,
            flavour,
            last_plain: None,
            showing_live: false,
            out_closed: false,
        }
    }

    /// Writes `text` to `out`; after a write fails (a closed pipe), writes nothing more there.
    fn write(&mut self, text: &str) {
        if self.out_closed {
            return;
        }
        if let Err(error) = self
            .out
            .write_all(text.as_bytes())
            .and_then(|()| self.out.flush())
        {
            tracing::debug!("output for people is closed: {error}");
            self.out_closed = true;
        }
    }

    fn end_wait(&mut self) {
        if self.showing_live {
            self.write("\n");
            self.showing_live = false;
        }
        self.last_plain = None;
    }
}

impl Reporter for Text {
    fn report(&mut self, report: &Report<'_>) {
        match report {
            Report::Waiting(text) => match self.flavour {
                Flavour::Terminal => {
                    self.write(&format!("\r\x1b[2K  {text}"));
                    self.showing_live = true;
                }
                Flavour::Log if self.last_plain.is_none_or(|t| t.elapsed() >= PLAIN_EVERY) => {
                    self.write(&format!("  {text}\n"));
                    self.last_plain = Some(Instant::now());
                }
                Flavour::Log => {}
            },
            Report::EndWait => self.end_wait(),
            Report::ChangeStarted(_) | Report::ChangeEnded { .. } => {}
            Report::Problem(text) => {
                self.end_wait();
                if let Err(error) = writeln!(self.err, "{text}") {
                    tracing::debug!("cannot write a problem to standard error: {error}");
                }
            }
            Report::Plan(plan) => {
                self.end_wait();
                let rendered = render(plan, self.style);
                self.write(&rendered);
            }
            Report::NextRound => {
                self.end_wait();
                self.write(
                    "\nThe upgrade in flight is followed by the upgrade to the current spec:\n\n",
                );
            }
            Report::Step(text) | Report::Message(text) => {
                self.end_wait();
                self.write(&format!("{text}\n"));
            }
            Report::Applied(summary) => {
                self.end_wait();
                let line = format!("\nApply complete! Resources: {}.\n", summary_text(summary));
                self.write(&line);
                if summary.table_restores > 0 {
                    self.write(&format!(
                        "lessnat's table was deleted by someone else during the upgrade and restored {} time(s); find out what reloads the ruleset.\n",
                        summary.table_restores
                    ));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::captured::Captured;

    /// A writer whose reader has gone.
    struct Closed;

    impl Write for Closed {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
    }

    fn text(flavour: Flavour) -> (Text, Captured, Captured) {
        let (out, err) = (Captured::default(), Captured::default());
        let reporter = Text::new(
            Box::new(out.clone()),
            Box::new(err.clone()),
            Style::Plain,
            flavour,
        );
        (reporter, out, err)
    }

    #[test]
    fn a_terminal_rewrites_the_live_line_and_ends_it_before_the_next_step() {
        let (mut reporter, out, err) = text(Flavour::Terminal);
        reporter.report(&Report::Waiting("1 left"));
        reporter.report(&Report::Waiting("0 left"));
        reporter.report(&Report::Step("done"));
        reporter.report(&Report::Problem("warning: slow"));
        assert_eq!(out.text(), "\r\x1b[2K  1 left\r\x1b[2K  0 left\ndone\n");
        assert_eq!(err.text(), "warning: slow\n");
    }

    #[test]
    fn logs_get_a_wait_now_and_then() {
        let (mut reporter, out, _) = text(Flavour::Log);
        reporter.report(&Report::Waiting("3 left"));
        reporter.report(&Report::Waiting("2 left"));
        reporter.report(&Report::EndWait);
        reporter.report(&Report::Waiting("1 left"));
        reporter.report(&Report::Applied(&crate::plan::Summary {
            upgrade: 1,
            ..Default::default()
        }));
        assert_eq!(
            out.text(),
            "  3 left\n  1 left\n\nApply complete! Resources: 0 added, 0 changed, 0 destroyed, 1 upgraded.\n"
        );
    }

    #[test]
    fn a_closed_output_is_not_an_error() {
        let err = Captured::default();
        let mut reporter = Text::new(
            Box::new(Closed),
            Box::new(err.clone()),
            Style::Plain,
            Flavour::Log,
        );
        reporter.report(&Report::Step("one"));
        reporter.report(&Report::Step("two"));
        reporter.report(&Report::Problem("error: boom"));
        assert_eq!(err.text(), "error: boom\n");
    }
}
