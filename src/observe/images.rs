//! The images a node's services use: which ones the engine has, and for
//! services with `pull: always`, the digest each tag has in its registry now
//! (asked through the engine, with the Docker client config's credentials,
//! without pulling).

use crate::backend::docker::{Docker, DockerError};
use crate::desired::desired_node;
use crate::model::{Image, RemoteDigest};
use crate::registry::{CredentialsError, ImageRef, ReferenceError, credentials_for};
use crate::spec::{PullPolicy, Spec};

/// The images could not be observed.
#[derive(Debug, thiserror::Error)]
pub enum ImagesError {
    /// The engine could not say which images it has.
    #[error("reading images")]
    Engine(#[source] Box<DockerError>),
    /// A `pull: always` image's registry did not tell its digest.
    #[error(
        "service {service} has `pull: always`, so plan asks the registry for the digest of its \
         image; nothing was changed (is the tag right, the registry up, and the login in the \
         Docker client config?)"
    )]
    RemoteDigest {
        /// The service.
        service: String,
        /// Why.
        source: Box<DockerError>,
    },
    /// The Docker client config could not be read.
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
    /// An image reference is not one (the spec's validation refuses these).
    #[error(transparent)]
    Reference(#[from] ReferenceError),
}

/// What the engine has of `node`'s images, and the registry digests of the
/// `pull: always` ones, each sorted by reference.
pub fn observe_images(
    spec: &Spec,
    node: &str,
    docker: &Docker,
) -> Result<(Vec<Image>, Vec<RemoteDigest>), ImagesError> {
    let desired = desired_node(spec, node);
    let mut images = Vec::new();
    let mut remote = Vec::new();
    for (service, container) in &desired.services {
        let reference = &container.image;
        if !images.iter().any(|i: &Image| &i.reference == reference)
            && let Some(image) = docker
                .image(reference)
                .map_err(|e| ImagesError::Engine(Box::new(e)))?
        {
            images.push(image);
        }
        if service.pull.value == PullPolicy::Always
            && !remote
                .iter()
                .any(|r: &RemoteDigest| &r.reference == reference)
        {
            let parsed = ImageRef::parse(reference)?;
            let credentials = credentials_for(&parsed.registry)?;
            let digest = docker
                .remote_digest(reference, &parsed, credentials.as_ref())
                .map_err(|source| ImagesError::RemoteDigest {
                    service: service.name.value.clone(),
                    source: Box::new(source),
                })?;
            remote.push(RemoteDigest {
                reference: reference.clone(),
                digest,
            });
        }
    }
    images.sort();
    remote.sort();
    Ok((images, remote))
}
