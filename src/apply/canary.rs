//! A canary's hold: a share of new connections goes to the next version (the
//! split is in lessnat's table, set by the upgrade), while apply waits for
//! `hold`, checking the next version's health at the service's interval. It
//! ends by itself when `hold` passes, early when someone runs `lessnat apply
//! --promote` or `--abort`, and with an error when the next version fails
//! `unhealthyAfter` checks in a row or exits.
//!
//! The request to end a hold early is a file, `<state-dir>/canary`, holding
//! `promote PID` or `abort PID`: the holding apply has the apply lock, so the
//! command that asks cannot take it. It checks that the apply recorded in the
//! journal as holding (by its process id) is the one holding the lock now,
//! writes the file for that process, and the holding apply reads and removes
//! it at its next check. A request for another process (one whose hold
//! ended, or that was killed in it) is removed unread.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::progress::{Progress, short};
use super::ready::{ProbeAt, check_interval, probe};
use super::{ApplyError, Context};
use crate::journal::{CanaryRecord, JournalError, JournalFile};
use crate::lock::{ApplyLock, LockError};
use crate::plan::operation::CanarySplit;
use crate::spec::Service;

/// The request file's name inside the state directory.
pub const CANARY_FILE: &str = "canary";

/// How someone asks a holding canary to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Go on with the upgrade now: all new connections to the next version.
    Promote,
    /// Roll the upgrade back now.
    Abort,
}

impl Verdict {
    fn as_str(self) -> &'static str {
        match self {
            Verdict::Promote => "promote",
            Verdict::Abort => "abort",
        }
    }
}

/// Asking a canary to end failed.
#[derive(Debug, thiserror::Error)]
pub enum CanaryError {
    /// The journal records no canary holding.
    #[error(
        "no canary is holding on this node, so there is nothing to {verb}; `lessnat status` shows the upgrades in flight"
    )]
    NoHold {
        /// `promote` or `abort`.
        verb: &'static str,
    },
    /// The journal records a hold, but no apply runs.
    #[error(
        "the canary of {service} is not holding: the apply that held it has stopped; `lessnat apply` starts its hold again (or rolls it back when the spec changed)"
    )]
    NotRunning {
        /// The service.
        service: String,
    },
    /// The journal records a hold by a process that no longer holds the lock.
    #[error(
        "the canary of {service} is not holding now: the apply that held it has stopped, and the one running now ({holder}) has not reached its hold; ask again once it holds"
    )]
    NotYet {
        /// The service.
        service: String,
        /// Who holds the lock, as recorded in it.
        holder: String,
    },
    /// The journal could not be read.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The apply lock could not be checked.
    #[error(transparent)]
    Lock(LockError),
    /// The request file could not be written, read or removed.
    #[error("canary request {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The request file of a state directory.
#[derive(Debug, Clone)]
struct RequestFile {
    path: PathBuf,
}

impl RequestFile {
    fn in_dir(state_dir: &Path) -> Self {
        RequestFile {
            path: state_dir.join(CANARY_FILE),
        }
    }

    fn io(&self) -> impl Fn(std::io::Error) -> CanaryError + '_ {
        |source| CanaryError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn write(&self, verdict: Verdict, pid: u32) -> Result<(), CanaryError> {
        let text = format!("{} {pid}\n", verdict.as_str());
        crate::atomic_file::write(&self.path, text.as_bytes(), crate::atomic_file::READABLE)
            .map_err(self.io())
    }

    /// The request to process `pid`, if there is one; a request is removed
    /// once read, also one for another process (or one that does not parse).
    fn take(&self, pid: u32) -> Result<Option<Verdict>, CanaryError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io()(e)),
        };
        self.clear()?;
        let mut words = text.split_whitespace();
        let verdict = match words.next() {
            Some("promote") => Verdict::Promote,
            Some("abort") => Verdict::Abort,
            _ => return Ok(None),
        };
        let to = words.next().and_then(|w| w.parse::<u32>().ok());
        Ok((to == Some(pid)).then_some(verdict))
    }

    fn clear(&self) -> Result<(), CanaryError> {
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(self.io()(e)),
            _ => Ok(()),
        }
    }
}

/// `lessnat apply --promote` / `--abort`: asks the apply holding a canary in
/// `state_dir` to end it. Returns the service whose canary was asked.
pub fn request(state_dir: &Path, verdict: Verdict) -> Result<String, CanaryError> {
    let journal = JournalFile::in_dir(state_dir).read()?;
    let (service, pid) = journal
        .upgrades
        .iter()
        .find_map(|(service, record)| Some((service.clone(), record.canary.as_ref()?.pid)))
        .ok_or(CanaryError::NoHold {
            verb: verdict.as_str(),
        })?;
    match ApplyLock::acquire(state_dir, &format!("lessnat apply --{}", verdict.as_str())) {
        Ok(_free) => Err(CanaryError::NotRunning { service }),
        Err(LockError::Held { holder, .. }) if holder_pid(&holder) == Some(pid) => {
            RequestFile::in_dir(state_dir).write(verdict, pid)?;
            Ok(service)
        }
        Err(LockError::Held { holder, .. }) => Err(CanaryError::NotYet { service, holder }),
        Err(error) => Err(CanaryError::Lock(error)),
    }
}

/// The process id in the lock's record of its holder, `pid N (...) since ...`.
fn holder_pid(holder: &str) -> Option<u32> {
    holder
        .strip_prefix("pid ")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// How a hold ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Held {
    /// `hold` passed with the next version healthy.
    Out,
    /// `lessnat apply --promote` ended it early.
    Promoted,
}

/// A next version a canary watches: its container and where it is probed.
pub(super) struct Watched {
    /// The container.
    pub container: String,
    /// Where its health check goes.
    pub at: ProbeAt,
}

/// Holds `split` for `service`: waits its `hold`, checking the health of
/// each of `nexts` each interval and `tick` (the table's hold) before each
/// check; any of them failing `unhealthyAfter` checks in a row (or not
/// running) ends it with an error.
pub(super) fn hold(
    ctx: &Context,
    progress: &mut Progress,
    service: &Service,
    nexts: &[Watched],
    split: &CanarySplit,
    mut tick: impl FnMut(&mut Progress) -> Result<(), ApplyError>,
) -> Result<Held, ApplyError> {
    let requests = RequestFile::in_dir(ctx.journal.dir());
    let pid = std::process::id();
    let name = &service.name.value;
    let hold = split.hold.get();
    let interval = check_interval(service).max(Duration::from_millis(100));
    let started = ctx.host.now();
    let names: Vec<&str> = nexts.iter().map(|n| n.container.as_str()).collect();
    let names = names.join(", ");
    let mut failures = vec![0; nexts.len()];
    let result = 'hold: loop {
        if ctx.interrupted() {
            break Err(ApplyError::Interrupted);
        }
        if let Err(error) = tick(progress) {
            break Err(error);
        }
        match requests.take(pid)? {
            Some(Verdict::Promote) => break Ok(Held::Promoted),
            Some(Verdict::Abort) => {
                break Err(ApplyError::CanaryAborted {
                    service: name.clone(),
                });
            }
            None => {}
        }
        for (next, failed) in nexts.iter().zip(&mut failures) {
            if !ctx.host.state(&next.container)?.is_some_and(|s| s.running) {
                break 'hold Err(ApplyError::CanaryUnhealthy {
                    container: next.container.clone(),
                    failures: *failed,
                    last: "it is not running".into(),
                });
            }
            match probe(ctx, service, &next.container, next.at) {
                Ok(()) => *failed = 0,
                Err(last) => {
                    *failed += 1;
                    if *failed >= split.unhealthy_after {
                        break 'hold Err(ApplyError::CanaryUnhealthy {
                            container: next.container.clone(),
                            failures: *failed,
                            last,
                        });
                    }
                }
            }
        }
        let elapsed = ctx.host.now().saturating_duration_since(started);
        if elapsed >= hold {
            break Ok(Held::Out);
        }
        let failing = failures.iter().copied().max().unwrap_or(0);
        progress.waiting(&format!(
            "{name}: canary: {} of new connections to {names}, {} of {} held{}; `lessnat apply --promote` or `--abort` ends it",
            split.weight,
            short(elapsed),
            short(hold),
            if failing > 0 {
                format!(", {failing} failed check(s) in a row")
            } else {
                String::new()
            }
        ));
        ctx.host.sleep(interval.min(hold - elapsed));
    };
    progress.end_wait();
    result
}

/// The journal's record of a canary holding now, for `lessnat apply
/// --promote` / `--abort` (which look for it) and `lessnat status`.
pub(super) fn holding(split: &CanarySplit) -> CanaryRecord {
    let until = std::time::SystemTime::now() + split.hold.get();
    CanaryRecord {
        weight: split.weight.to_string(),
        until: humantime::format_rfc3339_seconds(until).to_string(),
        pid: std::process::id(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_read_once_and_only_by_the_process_it_names() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = RequestFile::in_dir(dir.path());
        assert_eq!(file.take(7).expect("none"), None);
        file.write(Verdict::Promote, 7).expect("write");
        assert_eq!(file.take(7).expect("read"), Some(Verdict::Promote));
        assert_eq!(file.take(7).expect("gone"), None);
        file.write(Verdict::Abort, 8).expect("write");
        assert_eq!(file.take(7).expect("another's"), None);
        assert!(!dir.path().join(CANARY_FILE).exists(), "removed unread");
        std::fs::write(dir.path().join(CANARY_FILE), b"").expect("touch");
        assert_eq!(file.take(7).expect("empty"), None);
        assert_eq!(holder_pid("pid 42 (lessnat apply) since x"), Some(42));
    }

    #[test]
    fn asking_without_a_hold_says_so() {
        let dir = tempfile::tempdir().expect("temp dir");
        let error = request(dir.path(), Verdict::Promote).expect_err("no hold");
        assert!(
            error.to_string().contains("no canary is holding"),
            "{error}"
        );
        assert!(!dir.path().join(CANARY_FILE).exists());
    }

    #[test]
    fn asking_when_the_holding_apply_is_gone_says_so() {
        use crate::journal::{CanaryRecord, Journal, UpgradeRecord, now};
        let dir = tempfile::tempdir().expect("temp dir");
        let mut journal = Journal::default();
        journal.upgrades.insert(
            "web".into(),
            UpgradeRecord {
                strategy: crate::spec::Strategy::RedirectDrain,
                from_spec: "a".into(),
                from_image: "web:1".into(),
                to_spec: "b".into(),
                reached: Some(crate::plan::StageName::StartNext),
                rolling_back: false,
                started_at: now(),
                updated_at: now(),
                canary: Some(CanaryRecord {
                    weight: "5%".into(),
                    until: now(),
                    pid: std::process::id(),
                }),
            },
        );
        JournalFile::in_dir(dir.path())
            .write(&journal)
            .expect("journal");
        let error = request(dir.path(), Verdict::Abort).expect_err("no apply");
        assert!(error.to_string().contains("has stopped"), "{error}");
        assert!(!dir.path().join(CANARY_FILE).exists());
        let _held = ApplyLock::acquire(dir.path(), "test").expect("lock");
        assert_eq!(
            request(dir.path(), Verdict::Abort).expect("asked"),
            "web".to_string()
        );
        assert_eq!(
            RequestFile::in_dir(dir.path())
                .take(std::process::id())
                .expect("read"),
            Some(Verdict::Abort)
        );
    }
}
