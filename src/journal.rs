//! The journal: what live state cannot show about an apply in progress — the
//! previous spec of a service being upgraded, the stage reached, when it
//! started. Written atomically (temporary file, fsync, rename, fsync of the
//! directory) before and after each stage, so after a crash it is either the
//! old or the new version, never half of one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::plan::StageName;
use crate::spec::Strategy;

/// The journal file's name inside the state directory.
pub const JOURNAL_FILE: &str = "journal.json";
/// Version of the journal format.
pub const JOURNAL_FORMAT: u32 = 1;

/// Everything the journal records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Journal {
    /// Format version, [`JOURNAL_FORMAT`].
    pub format: u32,
    /// Upgrades in progress, by service.
    #[serde(default)]
    pub upgrades: BTreeMap<String, UpgradeRecord>,
}

impl Default for Journal {
    fn default() -> Self {
        Journal {
            format: JOURNAL_FORMAT,
            upgrades: BTreeMap::new(),
        }
    }
}

/// One upgrade in progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpgradeRecord {
    /// The strategy used.
    pub strategy: Strategy,
    /// Spec hash of the version being replaced.
    pub from_spec: String,
    /// Image of the version being replaced.
    pub from_image: String,
    /// Spec hash of the version being installed.
    pub to_spec: String,
    /// The last stage that completed, if any.
    pub reached: Option<StageName>,
    /// Whether the upgrade is being rolled back.
    pub rolling_back: bool,
    /// When the upgrade started (RFC 3339).
    pub started_at: String,
    /// When the record last changed (RFC 3339).
    pub updated_at: String,
    /// The canary holding now, while its apply waits in the hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanaryRecord>,
}

/// A canary holding: what `lessnat apply --promote` / `--abort` can end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CanaryRecord {
    /// The share of new connections the next version gets, e.g. `5%`.
    pub weight: String,
    /// When the hold ends by itself (RFC 3339).
    pub until: String,
    /// The process id of the apply holding it: requests to end it name it.
    pub pid: u32,
}

/// Reading or writing the journal failed.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// File system trouble.
    #[error("journal {path}")]
    Io {
        /// The journal file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a journal this lessnat can read.
    #[error(
        "journal {path} cannot be read (if it is damaged, move it aside: live state is still the truth)"
    )]
    Format {
        /// The journal file.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
}

/// The journal of a state directory.
#[derive(Debug, Clone)]
pub struct JournalFile {
    path: PathBuf,
}

impl JournalFile {
    /// The journal in `state_dir`.
    pub fn in_dir(state_dir: &Path) -> Self {
        JournalFile {
            path: state_dir.join(JOURNAL_FILE),
        }
    }

    /// The state directory the journal is in.
    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    /// Reads the journal; a missing file is an empty journal.
    pub fn read(&self) -> Result<Journal, JournalError> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| JournalError::Format {
                path: self.path.clone(),
                source,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Journal::default()),
            Err(source) => Err(JournalError::Io {
                path: self.path.clone(),
                source,
            }),
        }
    }

    /// Replaces the journal with `journal`, atomically and durably.
    pub fn write(&self, journal: &Journal) -> Result<(), JournalError> {
        let io = |source| JournalError::Io {
            path: self.path.clone(),
            source,
        };
        let json = serde_json::to_vec_pretty(journal).map_err(|source| JournalError::Format {
            path: self.path.clone(),
            source,
        })?;
        crate::atomic_file::write(&self.path, &json, crate::atomic_file::READABLE).map_err(io)?;
        Ok(())
    }
}

/// The current time as RFC 3339, for journal records.
pub fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_journal_is_empty_and_writes_round_trip() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = JournalFile::in_dir(&dir.path().join("state"));
        assert_eq!(file.read().expect("empty"), Journal::default());
        let mut journal = Journal::default();
        journal.upgrades.insert(
            "web".into(),
            UpgradeRecord {
                strategy: Strategy::RedirectDrain,
                from_spec: "aaaa".into(),
                from_image: "web:1".into(),
                to_spec: "bbbb".into(),
                reached: Some(StageName::Redirect),
                rolling_back: false,
                started_at: now(),
                updated_at: now(),
                canary: None,
            },
        );
        file.write(&journal).expect("write");
        assert_eq!(file.read().expect("read back"), journal);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("state"))
            .expect("dir")
            .collect();
        assert_eq!(leftovers.len(), 1, "no temporary files left behind");
    }

    #[test]
    fn damaged_journal_says_what_to_do() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join(JOURNAL_FILE), b"{ not json").expect("write");
        let error = JournalFile::in_dir(dir.path()).read().expect_err("damaged");
        assert!(error.to_string().contains("move it aside"), "{error}");
        let cause = serde_json::from_slice::<Journal>(b"{ not json")
            .expect_err("not JSON")
            .to_string();
        crate::error::assert_chain_once(&error, &[&cause, "move it aside"]);
    }

    #[test]
    fn an_unwritable_journal_names_the_file_and_the_cause_once() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (file, cause) = crate::error::file_in_the_way(dir.path());
        let error = JournalFile::in_dir(&file)
            .write(&Journal::default())
            .expect_err("a file is no directory");
        let path = file.join(JOURNAL_FILE).display().to_string();
        crate::error::assert_chain_once(&error, &[&path, &cause]);
    }
}
