//! A fingerprint of observed state, saved with a plan so that applying it later
//! can tell whether the host changed in between. Conntrack counts, process ids
//! and warnings change all the time and are left out.

use serde::Serialize;
use sha2::{Digest, Sha256};

use std::collections::BTreeMap;

use crate::model::{
    Container, ForeignContainer, NftState, Observed, OwnedAddress, RoutingState, Veth,
};

#[derive(Serialize)]
struct Stable<'a> {
    node: &'a str,
    nft: &'a NftState,
    routing: &'a RoutingState,
    containers: Vec<StableContainer<'a>>,
    foreign: &'a [ForeignContainer],
    #[serde(skip_serializing_if = "<[Veth]>::is_empty")]
    veths: &'a [Veth],
    #[serde(skip_serializing_if = "<[OwnedAddress]>::is_empty")]
    addresses: &'a [OwnedAddress],
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    sysctls: &'a BTreeMap<String, String>,
    /// Which replica addresses answered (not why the others did not).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    healthy: Vec<(&'a str, bool)>,
}

#[derive(Serialize)]
struct StableContainer<'a> {
    id: &'a str,
    name: &'a str,
    spec_hash: &'a str,
    image: &'a str,
    state: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    address: Option<&'a str>,
}

impl<'a> From<&'a Container> for StableContainer<'a> {
    fn from(c: &'a Container) -> Self {
        StableContainer {
            id: &c.id,
            name: &c.name,
            spec_hash: &c.spec_hash,
            image: &c.image,
            state: &c.state,
            address: c.address.as_deref(),
        }
    }
}

/// The fingerprint of `observed`: `sha256:` and 64 hex digits.
pub fn fingerprint(observed: &Observed) -> String {
    let stable = Stable {
        node: &observed.node,
        nft: &observed.nft,
        routing: &observed.routing,
        containers: observed
            .containers
            .iter()
            .map(StableContainer::from)
            .collect(),
        foreign: &observed.foreign_containers,
        veths: &observed.veths,
        addresses: &observed.addresses,
        sysctls: &observed.sysctls,
        healthy: observed
            .probes
            .iter()
            .map(|p| (p.address.as_str(), p.healthy))
            .collect(),
    };
    let bytes = serde_json::to_vec(&stable).unwrap_or_default();
    let digest = Sha256::digest(&bytes);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}
