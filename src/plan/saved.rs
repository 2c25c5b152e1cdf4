//! Saved plans (`lessnat plan --out FILE`): the plan together with the spec it
//! was made from and the observed state it was made against, so `apply` can
//! carry out exactly that plan, and refuse when the host changed since.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::Plan;
use crate::model::Observed;
use crate::spec::Spec;

/// Version of the saved-plan file format.
pub const SAVED_PLAN_FORMAT: u32 = 2;

/// The contents of a saved plan file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedPlan {
    /// Format version, [`SAVED_PLAN_FORMAT`].
    pub format: u32,
    /// The lessnat version that wrote it.
    pub lessnat_version: String,
    /// The spec file the plan was made from, as given.
    pub spec_file: String,
    /// The spec itself.
    pub spec: Spec,
    /// What was observed (its fingerprint is `plan.fingerprint`).
    pub observed: Observed,
    /// The plan.
    pub plan: Plan,
}

/// Reading or writing a saved plan failed.
#[derive(Debug, thiserror::Error)]
pub enum SavedPlanError {
    /// The file could not be read or written.
    #[error("plan file {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a saved plan of a format this lessnat reads.
    #[error("{path} is not a lessnat plan file")]
    Format {
        /// The file.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
    /// The file is a plan of another format version.
    #[error(
        "{path} was saved in plan format {found}; this lessnat reads format {SAVED_PLAN_FORMAT}: make the plan again with `lessnat plan --out`"
    )]
    Version {
        /// The file.
        path: PathBuf,
        /// Its format.
        found: u32,
    },
}

impl SavedPlan {
    /// Writes the plan to `path` atomically (a temporary file renamed into place).
    pub fn write(&self, path: &Path) -> Result<(), SavedPlanError> {
        let io = |source| SavedPlanError::Io {
            path: path.to_path_buf(),
            source,
        };
        let json = serde_json::to_vec_pretty(self).map_err(|source| SavedPlanError::Format {
            path: path.to_path_buf(),
            source,
        })?;
        let mut text = json;
        text.push(b'\n');
        crate::atomic_file::write(path, &text, crate::atomic_file::PRIVATE).map_err(io)?;
        Ok(())
    }

    /// Reads a saved plan.
    pub fn read(path: &Path) -> Result<SavedPlan, SavedPlanError> {
        let text = std::fs::read(path).map_err(|source| SavedPlanError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let header: serde_json::Value =
            serde_json::from_slice(&text).map_err(|source| SavedPlanError::Format {
                path: path.to_path_buf(),
                source,
            })?;
        let found = header
            .get("format")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        if found != u64::from(SAVED_PLAN_FORMAT) {
            return Err(SavedPlanError::Version {
                path: path.to_path_buf(),
                found: found as u32,
            });
        }
        serde_json::from_value(header).map_err(|source| SavedPlanError::Format {
            path: path.to_path_buf(),
            source,
        })
    }
}
