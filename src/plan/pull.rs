//! Images: which ones must be pulled before the changes that create
//! containers from them, and for `pull: always` services, the registry digest
//! their containers must be made from.
//!
//! Pulls come first in a plan, before the table and any container changes, so
//! a pull that fails (a tag that does not exist, a registry that is down or
//! refuses the login) stops apply before anything on the host changed.

use super::operation::Operation;
use super::{Action, Change, FieldChange, Resource};
use crate::desired::DesiredNode;
use crate::model::Observed;
use crate::spec::PullPolicy;

/// Sets, on each `pull: always` service's container, the digest its tag has
/// in the registry (from observation). The digest is part of the container's
/// hash, so a tag that moved makes the running container out of date.
pub(super) fn pin_digests(desired: &mut DesiredNode, observed: &Observed) {
    for (service, container) in &mut desired.services {
        if service.pull.value == PullPolicy::Always {
            container.digest = observed
                .remote_digests
                .iter()
                .find(|r| r.reference == container.image)
                .map(|r| r.digest.clone());
        }
    }
}

/// A pull for each image that `changes` create containers from and the
/// engine lacks (or has at another digest than the one planned), in the order
/// the changes need them.
pub(super) fn pulls(changes: &[Change], observed: &Observed) -> Vec<Change> {
    let mut pulls: Vec<Change> = Vec::new();
    for container in changes.iter().filter_map(|c| c.operation.creates_from()) {
        let image = &container.image;
        let digest = container.digest.as_deref();
        let present = observed
            .images
            .iter()
            .find(|i| &i.reference == image)
            .is_some_and(|found| digest.is_none_or(|d| found.has_digest(d)));
        let planned = pulls.iter().any(|p| {
            matches!(&p.operation, Operation::PullImage { image: planned, .. } if planned == image)
        });
        if present || planned {
            continue;
        }
        pulls.push(Change {
            action: Action::Create,
            resource: Resource::Image {
                reference: image.clone(),
            },
            reason: match digest {
                Some(_) => {
                    "pull: always, and the tag points at an image the engine does not have".into()
                }
                None => "the engine does not have it".into(),
            },
            fields: digest
                .map(|d| FieldChange {
                    name: "digest".into(),
                    old: None,
                    new: Some(d.to_string().into()),
                })
                .into_iter()
                .collect(),
            diff: Vec::new(),
            upgrade: None,
            operation: Operation::PullImage {
                image: image.clone(),
                digest: digest.map(str::to_string),
            },
        });
    }
    pulls
}
