//! Network namespaces: run work inside one (`--netns NAME|PATH`) from a thread
//! that `setns()`s first, so sockets it opens and processes it spawns (such as
//! `nft`) live in that namespace while the rest of lessnat stays where it is.

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::sched::{CloneFlags, setns};

/// Where named network namespaces live (as `ip netns add` makes them).
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// The network namespace lessnat works in.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Netns {
    /// The namespace lessnat was started in.
    #[default]
    Current,
    /// A namespace file, e.g. `/run/netns/lb-1` or `/proc/1234/ns/net`.
    Path(PathBuf),
}

/// Entering a network namespace failed.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The namespace file could not be opened.
    #[error("cannot open network namespace {path}")]
    Open {
        /// The namespace file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `setns()` refused (usually: not root).
    #[error(
        "cannot enter network namespace {path} (lessnat needs root, or CAP_SYS_ADMIN, for --netns)"
    )]
    Enter {
        /// The namespace file.
        path: PathBuf,
        /// Why.
        source: nix::Error,
    },
    /// The worker thread panicked.
    #[error("the worker thread for network namespace {path} panicked")]
    Panicked {
        /// The namespace file.
        path: PathBuf,
    },
}

impl Netns {
    /// Reads a `--netns` argument: a value containing `/` is a path, anything
    /// else the name of a namespace under [`NETNS_RUN_DIR`].
    pub fn from_arg(arg: &str) -> Self {
        if arg.contains('/') {
            Netns::Path(PathBuf::from(arg))
        } else {
            Netns::Path(Path::new(NETNS_RUN_DIR).join(arg))
        }
    }

    /// Runs `work` inside this namespace and returns its result. For
    /// [`Netns::Current`] it runs on the calling thread.
    pub fn run<T: Send>(&self, work: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
        let path = match self {
            Netns::Current => return Ok(work()),
            Netns::Path(path) => path,
        };
        let file = File::open(path).map_err(|source| NetnsError::Open {
            path: path.clone(),
            source,
        })?;
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    setns(&file, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
                        path: path.clone(),
                        source,
                    })?;
                    Ok(work())
                })
                .join()
                .map_err(|_| NetnsError::Panicked { path: path.clone() })?
        })
    }
}

impl std::fmt::Display for Netns {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            Netns::Current => f.write_str("the current network namespace"),
            Netns::Path(path) => write!(f, "network namespace {}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_paths() {
        assert_eq!(
            Netns::from_arg("lb-1"),
            Netns::Path("/run/netns/lb-1".into())
        );
        assert_eq!(
            Netns::from_arg("/proc/1/ns/net"),
            Netns::Path("/proc/1/ns/net".into())
        );
    }

    #[test]
    fn current_runs_inline() {
        assert_eq!(Netns::Current.run(|| 7).expect("runs"), 7);
    }

    #[test]
    fn missing_namespace_is_a_clear_error() {
        let error = Netns::from_arg("lessnat-no-such-ns")
            .run(|| ())
            .expect_err("no such namespace");
        assert!(
            error.to_string().contains("/run/netns/lessnat-no-such-ns"),
            "{error}"
        );
        let cause = std::io::Error::from_raw_os_error(2).to_string();
        crate::error::assert_chain_once(&error, &["/run/netns/lessnat-no-such-ns", &cause]);
    }
}
