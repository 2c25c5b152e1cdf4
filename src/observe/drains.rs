//! Which connections an observation counts: those of the services that can
//! be draining. The planner shows their established connections in an
//! upgrade's stages (the old version's and the next one's); nothing else in
//! a plan needs them, so a node where no service upgrades has neither its
//! sockets nor its conntrack table read (the table's fill level still comes
//! from the sysctls).
//!
//! They are host-mode services: their containers share the node's network
//! namespace, so their connections are TCP sockets there, on the service's
//! port (the old version) or the temporary port (the next one, behind the
//! redirect). They are counted from those sockets (sock_diag), whose cost
//! does not grow with the conntrack table; where sock_diag is unavailable,
//! from conntrack entries to the service's port, by the port they are
//! answered from.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::backend::conntrack::{self, ConntrackError, Interest};
use crate::backend::sock_diag;
use crate::desired::desired_node;
use crate::desired::host_table::redirects_in;
use crate::error::chain;
use crate::model::{ConntrackState, Container, Observed, PortConnections};
use crate::netns::Netns;
use crate::ownership::Slot;
use crate::spec::{NetworkMode, Protocol, Spec};

/// The connections of the services that can be draining, in both sources.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Drains {
    /// The conntrack entries they are counted from without sock_diag: TCP to
    /// each of their ports.
    pub interests: Vec<Interest>,
    /// The local ports of their sockets: each TCP port and its temporary port.
    pub local_ports: Vec<u16>,
}

/// Set once sock_diag failed in this process: the warning is given once.
static SOCK_DIAG_WARNED: AtomicBool = AtomicBool::new(false);

/// Reads what `drains` asks for in `netns`: the established connections from
/// the sockets (sock_diag), and from conntrack where sock_diag fails (a
/// warning, once per process); the table's fill level in any case.
pub fn read_drains(
    netns: &Netns,
    drains: &Drains,
) -> Result<(ConntrackState, Option<Vec<PortConnections>>), ConntrackError> {
    if !drains.local_ports.is_empty() {
        match sock_diag::established(netns, &drains.local_ports) {
            Ok(counts) => return Ok((conntrack::observe(netns, &[])?, Some(counts))),
            Err(error) => {
                if !SOCK_DIAG_WARNED.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "counting connections from conntrack instead of sockets: {}",
                        chain(&error)
                    );
                }
            }
        }
    }
    Ok((conntrack::observe(netns, &drains.interests)?, None))
}

/// The connections of `node`'s host-mode services that are upgrading or
/// about to: a `next` or `prev` container exists, the primary was made from
/// another spec, or a redirect of one of its ports is in place.
pub fn draining(spec: &Spec, node: &str, observed: &Observed) -> Drains {
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
    let mut drains = Drains::default();
    for (service, desired) in desired_node(spec, node).services {
        if service.network != NetworkMode::Host {
            continue;
        }
        let tcp: Vec<_> = service
            .ports
            .iter()
            .filter(|p| p.protocol == Protocol::Tcp)
            .collect();
        let ports: Vec<u16> = tcp.iter().map(|p| p.port.value).collect();
        let hash = desired.spec_hash();
        let upgrading = containers
            .get(service.name.value.as_str())
            .into_iter()
            .flatten()
            .any(|c| c.slot != Slot::Primary || c.spec_hash != hash)
            || ports.iter().any(|port| redirected.contains(port));
        if upgrading {
            drains.local_ports.extend(
                tcp.iter()
                    .flat_map(|p| [Some(p.port.value), p.temp_port.as_ref().map(|t| t.value)])
                    .flatten(),
            );
            drains
                .interests
                .extend(ports.into_iter().map(|port| Interest::ToPort {
                    protocol: Protocol::Tcp,
                    port,
                    answered_from: None,
                }));
        }
    }
    drains.local_ports.sort_unstable();
    drains.local_ports.dedup();
    drains
}
