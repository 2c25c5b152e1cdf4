//! Progress output during apply: one line per step, and for long waits a live
//! line on a terminal (rewritten in place) or a plain line every few seconds
//! otherwise (cron, systemd, CI logs).

use std::io::Write;
use std::time::{Duration, Instant};

/// How often a wait is reported when output is not a terminal.
const PLAIN_EVERY: Duration = Duration::from_secs(5);

/// Where apply tells the user what it is doing.
#[derive(Debug)]
pub struct Progress {
    live: bool,
    last_plain: Option<Instant>,
    showing_live: bool,
}

impl Progress {
    /// Progress for a terminal (`live`) or for logs.
    pub fn new(live: bool) -> Self {
        Progress {
            live,
            last_plain: None,
            showing_live: false,
        }
    }

    /// Reports one step.
    pub fn step(&mut self, text: &str) {
        self.end_wait();
        println!("{text}");
    }

    /// Reports the state of a wait; called often, shown in place or now and then.
    pub fn waiting(&mut self, text: &str) {
        if self.live {
            print!("\r\x1b[2K  {text}");
            let _ = std::io::stdout().flush();
            self.showing_live = true;
        } else if self.last_plain.is_none_or(|t| t.elapsed() >= PLAIN_EVERY) {
            println!("  {text}");
            self.last_plain = Some(Instant::now());
        }
    }

    /// Ends a wait's live line.
    pub fn end_wait(&mut self) {
        if self.showing_live {
            println!();
            self.showing_live = false;
        }
        self.last_plain = None;
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
