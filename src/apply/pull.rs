//! Pulling an image before the changes that create containers from it, with
//! a live line of its progress. Credentials are looked up here, at apply
//! time, from the Docker client config: they are never part of a plan.

use super::progress::Progress;
use super::{ApplyError, Context};
use crate::backend::docker::DockerError;
use crate::registry::{CredentialsError, ImageRef, ReferenceError, credentials_for};

/// An image could not be pulled; apply stopped there.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// The engine or the registry refused or failed.
    #[error("image {image} was not pulled; apply stopped before changing anything else")]
    Failed {
        /// The image.
        image: String,
        /// Why.
        source: DockerError,
    },
    /// The pull brought another digest than the plan was made for.
    #[error(
        "image {image}: the plan was made for digest {planned}, but the pull brought {}; \
         the tag moved since: run plan again",
        pulled.as_deref().unwrap_or("no digest")
    )]
    DigestMoved {
        /// The image.
        image: String,
        /// The digest in the plan.
        planned: String,
        /// The digest the engine reported.
        pulled: Option<String>,
    },
    /// The Docker client config could not be read.
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
    /// The reference is not one.
    #[error(transparent)]
    Reference(#[from] ReferenceError),
}

/// Pulls `image`; with `digest`, checks that the pull brought exactly it.
pub(super) fn pull(
    ctx: &Context,
    progress: &mut Progress,
    address: &str,
    image: &str,
    digest: Option<&str>,
) -> Result<(), ApplyError> {
    let parsed = ImageRef::parse(image).map_err(|e| Box::new(PullError::from(e)))?;
    let credentials =
        credentials_for(&parsed.registry).map_err(|e| Box::new(PullError::from(e)))?;
    progress.step(&format!(
        "{address}: pulling from {}{}",
        parsed.registry,
        match credentials {
            Some(_) => ", with credentials from the Docker client config",
            None => "",
        }
    ));
    let pulled = ctx
        .host
        .pull(image, &parsed, credentials.as_ref(), &mut |p| {
            progress.waiting(&format!("{address}: pulling: {p}"));
        })
        .map_err(|source| {
            Box::new(PullError::Failed {
                image: image.to_string(),
                source,
            })
        })?;
    if let Some(planned) = digest
        && pulled.digest() != Some(planned)
    {
        return Err(Box::new(PullError::DigestMoved {
            image: image.to_string(),
            planned: planned.to_string(),
            pulled: pulled.digest().map(str::to_string),
        })
        .into());
    }
    progress.step(&format!(
        "{address}: pulled ({pulled}{})",
        pulled
            .digest()
            .map(|d| format!(", {d}"))
            .unwrap_or_default()
    ));
    Ok(())
}
