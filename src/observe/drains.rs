//! Which conntrack entries an observation reads: those of the services that
//! can be draining. The planner shows their connection counts in an
//! upgrade's stages; nothing else in a plan needs conntrack, so a node where
//! no service upgrades has its conntrack table left unread (its fill level
//! still comes from the sysctls).

use std::collections::{BTreeSet, HashMap};

use crate::backend::conntrack::Interest;
use crate::desired::desired_node;
use crate::desired::host_table::redirects_in;
use crate::model::{Container, Observed};
use crate::ownership::Slot;
use crate::spec::{NetworkMode, Protocol, Spec};

/// The TCP ports (to either version) of `node`'s host-mode services that are
/// upgrading or about to: a `next` or `prev` container exists, the primary was
/// made from another spec, or a redirect of one of its ports is in place.
pub fn drain_interests(spec: &Spec, node: &str, observed: &Observed) -> Vec<Interest> {
    let redirected: BTreeSet<u16> = observed
        .nft
        .tables
        .iter()
        .flat_map(redirects_in)
        .map(|redirect| redirect.port)
        .collect();
    let mut containers: HashMap<&str, Vec<&Container>> = HashMap::new();
    for container in &observed.containers {
        containers
            .entry(container.service.as_str())
            .or_default()
            .push(container);
    }
    let mut interests = Vec::new();
    for (service, desired) in desired_node(spec, node).services {
        if service.network != NetworkMode::Host {
            continue;
        }
        let ports: Vec<u16> = service
            .ports
            .iter()
            .filter(|p| p.protocol == Protocol::Tcp)
            .map(|p| p.port.value)
            .collect();
        let hash = desired.spec_hash();
        let upgrading = containers
            .get(service.name.value.as_str())
            .into_iter()
            .flatten()
            .any(|c| c.slot != Slot::Primary || c.spec_hash != hash)
            || ports.iter().any(|port| redirected.contains(port));
        if upgrading {
            interests.extend(ports.into_iter().map(|port| Interest::ToPort {
                protocol: Protocol::Tcp,
                port,
                answered_from: None,
            }));
        }
    }
    interests
}
