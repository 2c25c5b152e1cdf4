//! The exclusive apply lock: one `apply` per state directory at a time. The
//! lock is an `flock` on a file, so it is released when the holder exits, even
//! by `kill -9`; the file records who holds it, for the message a second apply
//! prints. The agent holds a second lock of the same kind, [`AGENT_LOCK_FILE`],
//! for its whole life (one agent per node), and the apply lock only while it
//! plans and applies.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use nix::fcntl::{Flock, FlockArg};

/// The lock file's name inside the state directory.
pub const LOCK_FILE: &str = "lock";

/// The agent's lock file inside the state directory.
pub const AGENT_LOCK_FILE: &str = "agent.lock";

/// Taking the lock failed.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it.
    #[error(
        "another lessnat holds the lock {path}: {holder}; wait for it to finish (or, if it is stuck, stop that process)"
    )]
    Held {
        /// The lock file.
        path: PathBuf,
        /// Who holds it, as they recorded it.
        holder: String,
    },
    /// The lock file could not be opened or written.
    #[error("cannot use the lock file {path}")]
    Io {
        /// The lock file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// A held lock; released when dropped.
#[derive(Debug)]
pub struct ApplyLock {
    _lock: Flock<File>,
}

impl ApplyLock {
    /// Takes the lock in `state_dir` (created if missing, readable by root
    /// only) without waiting. `what` describes the holder, e.g. `lessnat
    /// apply -f spec.yaml`; credentials in URLs in it are masked before it is
    /// recorded.
    pub fn acquire(state_dir: &Path, what: &str) -> Result<ApplyLock, LockError> {
        ApplyLock::acquire_file(state_dir, LOCK_FILE, what)
    }

    /// Takes the lock file `name` in `state_dir`, like [`ApplyLock::acquire`].
    pub fn acquire_file(state_dir: &Path, name: &str, what: &str) -> Result<ApplyLock, LockError> {
        let path = state_dir.join(name);
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(io)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let holder = if holder.is_empty() {
                    "a process that has not said who it is".to_string()
                } else {
                    holder.to_string()
                };
                return Err(LockError::Held { path, holder });
            }
            Err((_, errno)) => return Err(io(std::io::Error::from(errno))),
        };
        let since = humantime::format_rfc3339_seconds(SystemTime::now());
        let what = crate::redact::url_credentials(what);
        let record = format!("pid {} ({what}) since {since}\n", std::process::id());
        let file: &mut File = &mut lock;
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        file.write_all(record.as_bytes()).map_err(io)?;
        file.sync_all().map_err(io)?;
        Ok(ApplyLock { _lock: lock })
    }
}

/// Who holds the lock file `name` in `state_dir`, as they recorded it;
/// `None` when nobody does (or the file cannot be read).
pub fn holder(state_dir: &Path, name: &str) -> Option<String> {
    let file = File::open(state_dir.join(name)).ok()?;
    match Flock::lock(file, FlockArg::LockSharedNonblock) {
        Ok(_free) => None,
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut holder = String::new();
            file.read_to_string(&mut holder).ok()?;
            Some(holder.trim().to_string())
        }
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_told_who_has_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let first = ApplyLock::acquire(dir.path(), "lessnat apply -f a.yaml").expect("first lock");
        let error = ApplyLock::acquire(dir.path(), "lessnat apply -f b.yaml")
            .expect_err("second is refused");
        let message = error.to_string();
        assert!(
            message.contains(&format!("pid {}", std::process::id())),
            "{message}"
        );
        assert!(message.contains("lessnat apply -f a.yaml"), "{message}");
        drop(first);
        ApplyLock::acquire(dir.path(), "lessnat apply -f b.yaml").expect("free again after drop");
    }

    #[test]
    fn the_agent_lock_is_its_own_and_tells_its_holder() {
        let dir = tempfile::tempdir().expect("temp dir");
        assert_eq!(holder(dir.path(), AGENT_LOCK_FILE), None);
        let agent = ApplyLock::acquire_file(dir.path(), AGENT_LOCK_FILE, "lessnat agent -f a.yaml")
            .expect("agent lock");
        let apply =
            ApplyLock::acquire(dir.path(), "lessnat apply").expect("apply lock is separate");
        let held = holder(dir.path(), AGENT_LOCK_FILE).expect("held");
        assert!(held.contains("lessnat agent -f a.yaml"), "{held}");
        drop((agent, apply));
        assert_eq!(holder(dir.path(), AGENT_LOCK_FILE), None);
    }

    #[test]
    fn a_state_dir_that_is_a_file_gives_the_cause_once() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (file, cause) = crate::error::file_in_the_way(dir.path());
        let error = ApplyLock::acquire(&file, "lessnat apply").expect_err("not a directory");
        let path = file.join(LOCK_FILE).display().to_string();
        crate::error::assert_chain_once(&error, &[&path, &cause]);
    }
}
