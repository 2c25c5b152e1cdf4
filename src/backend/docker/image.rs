//! Images: what the engine has ([`Docker::image`]), the digest a tag has in
//! its registry without pulling ([`Docker::remote_digest`], the engine's
//! distribution endpoint), and pulls with progress ([`Docker::pull`]).
//! Credentials go to the engine in the request's `X-Registry-Auth` header only.

use std::collections::BTreeMap;

use bollard::auth::DockerCredentials;
use bollard::models::CreateImageInfo;
use bollard::query_parameters::CreateImageOptions;
use futures_util::StreamExt;

use super::{Docker, DockerError, is_not_found};
use crate::model::Image;
use crate::registry::{Credentials, ImageRef};

/// How far a pull has come, summed over its layers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PullProgress {
    /// Each layer's bytes downloaded and size (0 while unknown), by layer id.
    layers: BTreeMap<String, (u64, u64, bool)>,
    /// The digest the engine reported at the end (`Digest: sha256:…`).
    digest: Option<String>,
}

impl PullProgress {
    /// Takes in one message of the engine's pull stream.
    fn update(&mut self, info: &CreateImageInfo) {
        let status = info.status.as_deref().unwrap_or_default();
        if let Some(digest) = status.strip_prefix("Digest: ") {
            self.digest = Some(digest.trim().to_string());
            return;
        }
        let Some(id) = info.id.as_deref() else {
            return;
        };
        if status.starts_with("Pulling from") {
            return;
        }
        let layer = self.layers.entry(id.to_string()).or_default();
        if let Some(detail) = &info.progress_detail
            && status == "Downloading"
        {
            let current = detail.current.and_then(|c| u64::try_from(c).ok());
            let total = detail.total.and_then(|t| u64::try_from(t).ok());
            layer.0 = current.unwrap_or(layer.0);
            layer.1 = total.unwrap_or(layer.1);
        }
        if matches!(
            status,
            "Download complete" | "Pull complete" | "Already exists" | "Extracting"
        ) {
            layer.0 = layer.1;
            layer.2 = true;
        }
    }

    /// The digest the pull ended with, when the engine said.
    pub fn digest(&self) -> Option<&str> {
        self.digest.as_deref()
    }
}

impl std::fmt::Display for PullProgress {
    /// `2/5 layers, 12.3 of 40.1 MB`, or `no layers to download`.
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        if self.layers.is_empty() {
            return write!(f, "no layers to download");
        }
        let done = self.layers.values().filter(|l| l.2).count();
        let (got, total) = self
            .layers
            .values()
            .fold((0u64, 0u64), |(g, t), l| (g + l.0, t + l.1));
        let mb = |bytes: u64| bytes as f64 / 1e6;
        write!(
            f,
            "{done}/{} layers, {:.1} of {:.1} MB",
            self.layers.len(),
            mb(got),
            mb(total)
        )
    }
}

/// What the engine is given to authenticate to the registry.
fn engine_credentials(credentials: Option<&Credentials>) -> Option<DockerCredentials> {
    credentials.map(|c| DockerCredentials {
        username: Some(c.username.clone()),
        password: Some(c.password.clone()),
        serveraddress: Some(c.server.clone()),
        ..Default::default()
    })
}

/// How a request to a registry authenticates, for messages (never the credentials).
fn as_whom(image: &ImageRef, credentials: Option<&Credentials>) -> String {
    match credentials {
        Some(_) => format!(
            "registry {}, with credentials from the Docker client config",
            image.registry
        ),
        None => format!(
            "registry {}, without credentials: the Docker client config has none for it",
            image.registry
        ),
    }
}

impl Docker {
    /// The image the engine has under `reference`, or `None`.
    pub fn image(&self, reference: &str) -> Result<Option<Image>, DockerError> {
        match self.runtime.block_on(self.client.inspect_image(reference)) {
            Ok(details) => Ok(Some(Image {
                reference: reference.to_string(),
                id: details.id.unwrap_or_default(),
                digests: details.repo_digests.unwrap_or_default(),
            })),
            Err(source) if is_not_found(&source) => Ok(None),
            Err(source) => Err(self.request_error(format!("inspecting image {reference}"), source)),
        }
    }

    /// The digest `reference`'s tag has in its registry now, asked by the
    /// engine without pulling.
    pub fn remote_digest(
        &self,
        reference: &str,
        image: &ImageRef,
        credentials: Option<&Credentials>,
    ) -> Result<String, DockerError> {
        let found = self
            .runtime
            .block_on(
                self.client
                    .inspect_registry_image(reference, engine_credentials(credentials)),
            )
            .map_err(|source| {
                self.request_error(
                    format!(
                        "asking for the digest of image {reference} ({})",
                        as_whom(image, credentials)
                    ),
                    source,
                )
            })?;
        Ok(found.descriptor.digest.unwrap_or_default())
    }

    /// Pulls `reference` (taken apart as `image`), calling `on_progress` with
    /// each update, and returns the final progress (with the digest the engine
    /// reported).
    pub fn pull(
        &self,
        reference: &str,
        image: &ImageRef,
        credentials: Option<&Credentials>,
        mut on_progress: impl FnMut(&PullProgress),
    ) -> Result<PullProgress, DockerError> {
        let options = CreateImageOptions {
            from_image: Some(image.name()),
            tag: Some(image.tag_or_digest().to_string()),
            ..Default::default()
        };
        let mut stream =
            self.client
                .create_image(Some(options), None, engine_credentials(credentials));
        let mut progress = PullProgress::default();
        let failed = self.runtime.block_on(async {
            while let Some(message) = stream.next().await {
                match message {
                    Ok(info) => {
                        progress.update(&info);
                        on_progress(&progress);
                    }
                    Err(source) => return Some(source),
                }
            }
            None
        });
        match failed {
            None => Ok(progress),
            Some(source) => Err(self.request_error(
                format!(
                    "pulling image {reference} ({})",
                    as_whom(image, credentials)
                ),
                source,
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use bollard::models::ProgressDetail;

    use super::*;

    fn info(id: Option<&str>, status: &str, progress: Option<(i64, i64)>) -> CreateImageInfo {
        CreateImageInfo {
            id: id.map(str::to_string),
            status: Some(status.to_string()),
            progress_detail: progress.map(|(current, total)| ProgressDetail {
                current: Some(current),
                total: Some(total),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn sums_layers_and_takes_the_digest() {
        let mut p = PullProgress::default();
        assert_eq!(p.to_string(), "no layers to download");
        p.update(&info(Some("v2"), "Pulling from lessnat-testserver", None));
        p.update(&info(Some("a"), "Pulling fs layer", None));
        p.update(&info(Some("b"), "Already exists", None));
        p.update(&info(
            Some("a"),
            "Downloading",
            Some((1_000_000, 4_000_000)),
        ));
        assert_eq!(p.to_string(), "1/2 layers, 1.0 of 4.0 MB");
        p.update(&info(Some("a"), "Download complete", None));
        p.update(&info(Some("a"), "Pull complete", None));
        assert_eq!(p.digest(), None);
        p.update(&info(None, "Digest: sha256:abc", None));
        p.update(&info(None, "Status: Downloaded newer image for x:v2", None));
        assert_eq!(p.to_string(), "2/2 layers, 4.0 of 4.0 MB");
        assert_eq!(p.digest(), Some("sha256:abc"));
    }
}
