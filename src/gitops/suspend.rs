//! Suspending reconcile on a node: a flag file `<state-dir>/suspended` (when
//! and why) that `lessnat suspend` writes and `lessnat resume` removes. While
//! it exists, reconcile still fetches and plans, and reports drift, but applies
//! nothing. `lessnat apply` by hand is not affected. Resuming also ends a
//! failure back-off ([`end_backoff`]).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::record::{Backoff, RecordError, RecordFile, Timestamp};
use crate::lock::{ApplyLock, LockError};

/// The flag file's name inside the state directory.
pub const SUSPEND_FILE: &str = "suspended";

/// When and why reconcile was suspended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suspension {
    /// When `lessnat suspend` ran.
    pub since: Timestamp,
    /// Why, as given with `--reason`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Reading or changing the flag failed.
#[derive(Debug, thiserror::Error)]
pub enum SuspendError {
    /// File system trouble.
    #[error("suspend flag {path}")]
    Io {
        /// The flag file.
        path: PathBuf,
        /// Why.
        #[source]
        cause: std::io::Error,
    },
    /// The apply lock could not be taken to end the back-off.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// The record could not be updated to end the back-off.
    #[error(transparent)]
    Record(#[from] RecordError),
}

/// The suspend flag of a state directory.
#[derive(Debug, Clone)]
pub struct SuspendFile {
    path: PathBuf,
}

impl SuspendFile {
    /// The flag in `state_dir`.
    pub fn in_dir(state_dir: &Path) -> Self {
        SuspendFile {
            path: state_dir.join(SUSPEND_FILE),
        }
    }

    fn io(&self) -> impl Fn(std::io::Error) -> SuspendError + '_ {
        |cause| SuspendError::Io {
            path: self.path.clone(),
            cause,
        }
    }

    /// The suspension, if reconcile is suspended. A flag file that is not
    /// JSON (made by hand, say with `touch`) still suspends, since when it was
    /// last modified.
    pub fn read(&self) -> Result<Option<Suspension>, SuspendError> {
        match std::fs::read(&self.path) {
            Ok(bytes) => Ok(Some(match serde_json::from_slice(&bytes) {
                Ok(suspension) => suspension,
                Err(_) => Suspension {
                    since: Timestamp(
                        std::fs::metadata(&self.path)
                            .and_then(|m| m.modified())
                            .map_err(self.io())?,
                    ),
                    reason: None,
                },
            })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io()(e)),
        }
    }

    /// Suspends reconcile (again: the new reason and time replace the old).
    pub fn suspend(&self, reason: Option<String>) -> Result<Suspension, SuspendError> {
        let suspension = Suspension {
            since: Timestamp::now(),
            reason,
        };
        let json = serde_json::to_vec_pretty(&suspension)
            .map_err(|e| self.io()(std::io::Error::other(e)))?;
        crate::atomic_file::write(&self.path, &json, crate::atomic_file::READABLE)
            .map_err(self.io())?;
        Ok(suspension)
    }

    /// Lets reconcile apply again; returns whether it was suspended.
    pub fn resume(&self) -> Result<bool, SuspendError> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(self.io()(e)),
        }
    }
}

/// Ends a failure back-off, so the next run tries the failed commit at once;
/// returns how many failures in a row it had counted (0: there was none). The
/// record is changed under the apply lock (`what` says who holds it), so this
/// fails, saying who holds it, while a run is under way.
pub fn end_backoff(state_dir: &Path, what: &str) -> Result<u32, SuspendError> {
    let _lock = ApplyLock::acquire(state_dir, what)?;
    let file = RecordFile::in_dir(state_dir);
    let mut record = file.read()?;
    let failures = record.backoff.consecutive_failures;
    if record.backoff != Backoff::default() {
        record.backoff = Backoff::default();
        file.write(&record)?;
    }
    Ok(failures)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suspend_read_resume() {
        let dir = tempfile::tempdir().expect("temp dir");
        let flag = SuspendFile::in_dir(dir.path());
        assert_eq!(flag.read().expect("read"), None);
        let suspension = flag.suspend(Some("investigating".into())).expect("suspend");
        assert_eq!(flag.read().expect("read"), Some(suspension));

        let records = RecordFile::in_dir(dir.path());
        let mut record = records.read().expect("record");
        record.backoff = Backoff {
            consecutive_failures: 3,
            failed_commit: Some("abc".into()),
            retry_after: Some(Timestamp::now()),
        };
        records.write(&record).expect("write");

        assert!(flag.resume().expect("resume"), "was suspended");
        assert_eq!(flag.read().expect("read"), None);
        assert!(!flag.resume().expect("resume again"), "was not suspended");
        assert_eq!(end_backoff(dir.path(), "test").expect("end back-off"), 3);
        assert_eq!(records.read().expect("record").backoff, Backoff::default());
        assert_eq!(end_backoff(dir.path(), "test").expect("none left"), 0);
    }

    #[test]
    fn a_hand_made_flag_suspends() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join(SUSPEND_FILE), b"").expect("touch");
        let suspension = SuspendFile::in_dir(dir.path())
            .read()
            .expect("read")
            .expect("suspended");
        assert_eq!(suspension.reason, None);
    }

    #[test]
    fn ending_the_backoff_while_a_run_holds_the_lock_says_who() {
        let dir = tempfile::tempdir().expect("temp dir");
        let _held = ApplyLock::acquire(dir.path(), "lessnat reconcile").expect("lock");
        let error = end_backoff(dir.path(), "test").expect_err("lock held");
        assert!(error.to_string().contains("lessnat reconcile"), "{error}");
    }
}
