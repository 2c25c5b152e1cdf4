//! Reading the live host: each backend observes its part inside the chosen
//! network namespace, and the parts are put together into one [`Observed`].

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::backend::conntrack::{self, ConntrackError};
use crate::backend::docker::{Docker, DockerError};
use crate::backend::netlink::{self, NetlinkError};
use crate::backend::nft::{self, NftError};
use crate::backend::sysctl::{self, SysctlError};
use crate::backend::veth;
use crate::netns::Netns;
use crate::ownership::{IPV6_FORWARDING, ROUTED_SYSCTLS};
use crate::spec::Spec;

use super::drains::{Drains, draining, read_drains};
use super::images::{ImagesError, observe_images};
use super::probe::{RecentProbes, probe_replicas};
use crate::model::{ConntrackState, OBSERVED_FORMAT, Observed};

/// Observing the live host failed.
#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    /// Reading nftables failed.
    #[error("reading nftables")]
    Nft(#[from] NftError),
    /// Reading routing rules and routes failed.
    #[error("reading routing rules and routes")]
    Netlink(#[from] NetlinkError),
    /// Reading conntrack failed.
    #[error("reading conntrack")]
    Conntrack(#[from] ConntrackError),
    /// Reading kernel settings failed.
    #[error("reading kernel settings")]
    Sysctl(#[from] SysctlError),
    /// Talking to Docker failed.
    #[error("reading containers")]
    Docker(#[from] DockerError),
    /// The images the services use could not be observed.
    #[error(transparent)]
    Images(#[from] ImagesError),
}

/// Reads what lessnat owns on this host for `node`, inside `netns`. Containers
/// come from the Docker engine at `DOCKER_HOST` (or the default socket).
pub fn observe(node: &str, netns: &Netns) -> Result<Observed, ObserveError> {
    let docker = Docker::connect()?;
    observe_with(node, netns, &docker)
}

/// Like [`observe_with`], plus what only the spec can say where to look: a
/// load-balancer node's probes of its replicas' addresses, the images the
/// node's services use, and the registry digests of `pull: always` images.
/// The probes are `recent`'s when it has them for this spec (see
/// [`RecentProbes::for_plan`]); otherwise they run now, unless `probe` is
/// false (the registrations in etcd decide instead): then there are none.
pub fn observe_for(
    spec: &Spec,
    node: &str,
    netns: &Netns,
    docker: &Docker,
    recent: Option<&RecentProbes>,
    probe: bool,
) -> Result<Observed, ObserveError> {
    let mut observed = observe_reading(node, netns, docker, |observed| {
        draining(spec, node, observed)
    })?;
    (observed.images, observed.remote_digests) = observe_images(spec, node, docker)?;
    let reused = recent.and_then(|recent| recent.for_plan(spec, node, Instant::now()));
    let age = match reused {
        Some((probes, age)) => {
            observed.probes = probes.to_vec();
            age
        }
        None if probe => {
            observed.probes = probe_replicas(spec, node, netns);
            Duration::ZERO
        }
        None => Duration::ZERO,
    };
    if !observed.probes.is_empty() || !probe {
        observed.probed_at = SystemTime::now()
            .checked_sub(age)
            .and_then(|at| at.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_secs());
    }
    Ok(observed)
}

/// Like [`observe`], with a Docker client the caller already has. Without a
/// spec no service can be known to drain, so no conntrack entry is read
/// (the table's fill level is).
pub fn observe_with(node: &str, netns: &Netns, docker: &Docker) -> Result<Observed, ObserveError> {
    observe_reading(node, netns, docker, |_| Drains::default())
}

/// Observes the host, counting the connections that `drains` asks for once
/// the rest is known.
fn observe_reading(
    node: &str,
    netns: &Netns,
    docker: &Docker,
    drains: impl FnOnce(&Observed) -> Drains,
) -> Result<Observed, ObserveError> {
    let (nft, untracked) = nft::observe_ruleset(netns)?;
    let routing = netlink::observe(netns)?;
    let (containers, foreign_containers) = docker.observe(node)?;
    let veths = veth::observe(netns)?;
    let addresses = netlink::observe_addresses(netns)?;
    let mut sysctls = sysctl::read(netns, &ROUTED_SYSCTLS)?;
    sysctls.extend(sysctl::read_present(netns, &[IPV6_FORWARDING])?);
    let mut observed = Observed {
        format: OBSERVED_FORMAT,
        node: node.to_string(),
        nft,
        routing,
        containers,
        foreign_containers,
        conntrack: ConntrackState::default(),
        tcp_connections: None,
        warnings: Vec::new(),
        veths,
        addresses,
        sysctls,
        probes: Vec::new(),
        images: Vec::new(),
        remote_digests: Vec::new(),
        probed_at: None,
        cluster: None,
        rollouts: None,
    };
    (observed.conntrack, observed.tcp_connections) = read_drains(netns, &drains(&observed))?;
    let mut warnings = conntrack::warnings(&observed.conntrack);
    warnings.extend(untracked);
    warnings.sort();
    observed.warnings = warnings;
    Ok(observed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_docker_refusal_while_observing_is_printed_once() {
        let refused = DockerError::Request {
            host: "unix:///var/run/docker.sock".to_string(),
            what: "listing containers".to_string(),
            source: bollard::errors::Error::DockerResponseServerError {
                status_code: 500,
                message: "engine overloaded".to_string(),
            },
        };
        let observing = ObserveError::from(refused);
        let text = crate::error::chain(&observing);
        assert!(
            text.starts_with("reading containers: Docker engine at "),
            "{text}"
        );
        crate::error::assert_chain_once(&observing, &["engine overloaded"]);
    }
}
