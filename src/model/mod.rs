//! The host model: the values lessnat reads from a host and writes to it —
//! its nftables table, policy routing rules and routes, containers, veths,
//! addresses, conntrack counts — and [`Observed`], the snapshot of one node.
//! Observation, the planner, apply and the backends all speak these types.
//! The snapshot serialises to JSON so the planner can be tested on fixtures
//! (`testdata/plans/*/observed.json`) without touching a host.

mod cluster;
pub mod nft_text;
mod rollout;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use cluster::{Acknowledgement, ClusterView, Registration, UpgradeInFlight};
pub use rollout::{RolloutBad, RolloutDone, RolloutSlot, RolloutView, UnhealthyReplica};

use crate::ownership::Slot;
use crate::spec::{HumanDuration, Protocol};

/// Version of the observed-state JSON format.
pub const OBSERVED_FORMAT: u32 = 1;

/// Everything lessnat owns on one node, as found there.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Observed {
    /// Format version, [`OBSERVED_FORMAT`].
    pub format: u32,
    /// The node this was observed on.
    pub node: String,
    /// lessnat's nftables tables (other tables are not read).
    pub nft: NftState,
    /// Policy routing rules and routes in lessnat's ranges.
    pub routing: RoutingState,
    /// Containers labelled as lessnat's.
    pub containers: Vec<Container>,
    /// Containers *not* labelled as lessnat's whose names lessnat would use.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub foreign_containers: Vec<ForeignContainer>,
    /// Routed mode: veth pairs lessnat made to wire containers in.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub veths: Vec<Veth>,
    /// Routed mode: addresses lessnat added (VIPs on `lo`), by their label.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<OwnedAddress>,
    /// Kernel settings routed mode depends on (see [`ROUTED_SYSCTLS`](crate::ownership::ROUTED_SYSCTLS)), by key.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sysctls: BTreeMap<String, String>,
    /// Routed mode, load-balancer nodes: whether each replica address answers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub probes: Vec<Probe>,
    /// The images the node's services use that the engine has (found by the
    /// reference the spec gives); an image not listed must be pulled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<Image>,
    /// Services with `pull: always`: the digest each image's tag has in its
    /// registry now, asked without pulling.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote_digests: Vec<RemoteDigest>,
    /// When the probes ran, in seconds since the Unix epoch: the time a
    /// replica that leaves the spread is recorded with. Not part of the
    /// fingerprint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probed_at: Option<u64>,
    /// With the spec's `cluster:`: the replicas registered in etcd, the
    /// upgrades in flight and their acknowledgements, or why etcd could not
    /// be read. Not part of the fingerprint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterView>,
    /// With a service of the node's that has `upgrade.rollout`: the site's
    /// rollout slots, done nodes and bad versions in etcd, or why etcd
    /// could not be read. Not part of the fingerprint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollouts: Option<RolloutView>,
    /// Connection tracking counts.
    pub conntrack: ConntrackState,
    /// Established TCP connections of the services that can be draining,
    /// counted from the node's sockets (sock_diag) by local port: every port
    /// read is listed, zeros included. Absent when those counts come from
    /// `conntrack` instead (sock_diag unavailable, nothing draining, or a
    /// snapshot from before this field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_connections: Option<Vec<PortConnections>>,
    /// Things the observers noticed that make the picture less reliable.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// lessnat's nftables tables.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NftState {
    /// The tables, by family and name.
    pub tables: Vec<NftTable>,
}

/// One nftables table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NftTable {
    /// `inet`, `ip`, `ip6`, ...
    pub family: String,
    /// Table name.
    pub name: String,
    /// The table's comment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// Chains, in the order nft lists them.
    pub chains: Vec<NftChain>,
    /// Maps (and sets), in the order nft lists them.
    pub maps: Vec<NftMap>,
}

impl NftTable {
    /// Whether this table still does what `wanted` does: every chain of
    /// `wanted` is here exactly as wanted, and every element of its maps is in
    /// the map of the same name (elements added since are allowed).
    pub fn holds(&self, wanted: &NftTable) -> bool {
        wanted
            .chains
            .iter()
            .all(|chain| self.chains.contains(chain))
            && wanted.maps.iter().all(|map| {
                self.maps.iter().any(|found| {
                    found.name == map.name
                        && map.elements.iter().all(|e| found.elements.contains(e))
                })
            })
    }
}

/// One chain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NftChain {
    /// Chain name.
    pub name: String,
    /// The hook of a base chain; `None` for a regular chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook: Option<NftHook>,
    /// Rules, in order.
    pub rules: Vec<NftRule>,
}

/// Where a base chain hooks into the packet path.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NftHook {
    /// `nat`, `filter` or `route`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `prerouting`, `output`, `forward`, ...
    pub hook: String,
    /// Numeric priority.
    pub priority: i32,
    /// `accept` or `drop`.
    pub policy: String,
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NftRule {
    /// The rule's comment; lessnat identifies its rules by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// The rule's statements in nftables JSON, as `nft -j` reports them.
    pub expr: Vec<serde_json::Value>,
}

/// One map or set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NftMap {
    /// Map name.
    pub name: String,
    /// Key type, e.g. `inet_service`.
    pub key: String,
    /// Value type for maps, e.g. `inet_service`; `None` for sets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// The map's comment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// Elements, sorted by key.
    pub elements: Vec<NftElement>,
}

/// One map element `key : value` (sets: value is `null`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NftElement {
    /// The key in nftables JSON, e.g. `8000`.
    pub key: serde_json::Value,
    /// The value in nftables JSON, e.g. `18000`.
    #[serde(default)]
    pub value: serde_json::Value,
}

/// Policy routing state in lessnat's ranges.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingState {
    /// `ip rule`s whose priority is in [`RULE_PRIORITIES`](crate::ownership::RULE_PRIORITIES).
    pub rules: Vec<IpRule>,
    /// Routes in tables of [`ROUTE_TABLES`](crate::ownership::ROUTE_TABLES).
    pub routes: Vec<Route>,
}

/// One policy routing rule.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpRule {
    /// `inet` or `inet6`.
    pub family: String,
    /// Rule priority.
    pub priority: u32,
    /// Source prefix matched (`from`), in CIDR form; `None` for `from all`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Firewall mark matched, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fwmark: Option<u32>,
    /// Mask applied to the mark, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fwmask: Option<u32>,
    /// Routing table looked up.
    pub table: u32,
}

/// One route.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Routing table id.
    pub table: u32,
    /// Destination in CIDR form; `default` for the default route.
    pub destination: String,
    /// Next hop, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Output interface, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

/// A container labelled as lessnat's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Container {
    /// Docker container id.
    pub id: String,
    /// Container name, without Docker's leading `/`.
    pub name: String,
    /// The service (from the `io.lessnat.service` label).
    pub service: String,
    /// The container's role, from its name.
    pub slot: Slot,
    /// Hash of the service spec it was made from (`io.lessnat.spec` label).
    pub spec_hash: String,
    /// Image reference it was created from.
    pub image: String,
    /// Canonical ports (`io.lessnat.ports` label), e.g. `["8000/tcp"]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
    /// Docker state: `created`, `running`, `paused`, `restarting`, `exited`, `dead`.
    pub state: String,
    /// Docker's health status, when the image defines a health check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<String>,
    /// Main process id, when running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Routed mode: the address it is wired in at (`io.lessnat.address` label).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// The service's `stopTimeout` when it was made (`io.lessnat.stop-timeout`
    /// label); absent on containers made before lessnat recorded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_timeout: Option<HumanDuration>,
    /// The registry digest of the image it was made from (`io.lessnat.digest`
    /// label), recorded for services with `pull: always`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

/// An image the engine has.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Image {
    /// The reference, as the spec names it.
    pub reference: String,
    /// The engine's image id.
    pub id: String,
    /// The registry digests it is known by, as the engine lists them:
    /// `registry.example/web@sha256:…` (none for an image built locally).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub digests: Vec<String>,
}

impl Image {
    /// Whether the engine knows this image by `digest` (`sha256:…`).
    pub fn has_digest(&self, digest: &str) -> bool {
        self.digests
            .iter()
            .any(|d| d.rsplit_once('@').is_some_and(|(_, found)| found == digest))
    }
}

/// The digest an image's tag has in its registry.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteDigest {
    /// The reference, as the spec names it.
    pub reference: String,
    /// The digest of the manifest the tag points at, `sha256:…`.
    pub digest: String,
}

/// The node side of a veth pair that wires a routed container in. The pair
/// exists only while the container's network namespace does: a container that
/// stops or restarts loses it, and the next apply wires it in again.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Veth {
    /// Interface name on the node ([`veth_name`](crate::ownership::veth_name)).
    pub name: String,
    /// The service, from the interface alias.
    pub service: String,
    /// The container address it leads to, from the interface alias.
    pub address: String,
    /// Whether the node side is up.
    pub up: bool,
}

/// An address lessnat put on an interface, recognised by its label
/// ([`ADDRESS_LABEL_SUFFIX`](crate::ownership::ADDRESS_LABEL_SUFFIX)).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OwnedAddress {
    /// Interface name, e.g. `lo`.
    pub device: String,
    /// Address in CIDR form, e.g. `203.0.113.10/32`.
    pub address: String,
}

/// Whether a replica address answered the service's health check, probed from
/// a load-balancer node through the routes lessnat set up.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Probe {
    /// The service.
    pub service: String,
    /// The address probed.
    pub address: String,
    /// Whether the check passed.
    pub healthy: bool,
    /// Why it failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// A container lessnat does not own but whose name it would use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForeignContainer {
    /// Docker container id.
    pub id: String,
    /// Container name.
    pub name: String,
}

/// Connection tracking as seen on the node.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConntrackState {
    /// Whether conntrack could be read at all.
    pub available: bool,
    /// Why conntrack could not be read, when `available` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unavailable_reason: Option<String>,
    /// Entries counted by protocol, ports and state (only non-zero counts).
    pub flows: Vec<FlowCount>,
    /// Entries in the table (`nf_conntrack_count`).
    pub table_count: u64,
    /// Table size limit (`nf_conntrack_max`).
    pub table_max: u64,
}

/// How many conntrack entries share a protocol, ports and state.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowCount {
    /// `tcp` or `udp`.
    pub protocol: String,
    /// Destination port of the original direction (what the client dialled).
    pub orig_dport: u16,
    /// Source port of the reply direction (what actually answers; differs after a redirect).
    pub reply_sport: u16,
    /// TCP state (`ESTABLISHED`, `TIME_WAIT`, ...); empty for UDP.
    pub state: String,
    /// Number of entries.
    pub count: u64,
}

/// Established TCP connections whose socket's local port is `port`: the
/// connections a version listening there serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortConnections {
    /// The local port (a service's port, or the temporary port behind a redirect).
    pub port: u16,
    /// Sockets in state `ESTABLISHED` on it.
    pub established: u64,
}

/// New connections to `port` are sent to `temp_port` on the same host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Redirect {
    /// `tcp` or `udp`.
    pub protocol: Protocol,
    /// The canonical port.
    pub port: u16,
    /// The temporary port the next version listens on.
    pub temp_port: u16,
}

/// The name of the redirect map for `protocol`.
pub fn redirect_map_name(protocol: Protocol) -> String {
    format!("redirect_{}", protocol.as_str())
}

/// Orders element keys: numbers numerically, anything else by its JSON text,
/// numbers first.
pub fn compare_keys(a: &Value, b: &Value) -> std::cmp::Ordering {
    match (a.as_u64(), b.as_u64()) {
        (Some(a), Some(b)) => a.cmp(&b),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => a.to_string().cmp(&b.to_string()),
    }
}

/// How a container is attached to the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ContainerNetwork {
    /// The host's network namespace (host mode): the service binds the node's
    /// ports itself.
    Host,
    /// Docker's `none` network, loopback only (routed mode): lessnat wires the
    /// container in itself, with a veth pair, once it has started.
    None,
}

impl ContainerNetwork {
    /// The engine's name for this network mode: `host` or `none`.
    pub fn as_str(self) -> &'static str {
        match self {
            ContainerNetwork::Host => "host",
            ContainerNetwork::None => "none",
        }
    }
}

/// Everything lessnat sets when it creates a container.
///
/// The restart policy is `no` at creation: lessnat decides when a container runs.
/// A container that dies while lessnat waits for it to turn healthy must stay
/// dead, so the wait sees it exit and rolls back, instead of the engine
/// restarting it behind lessnat's back; and a stopped `prev` container must
/// not be revived when the engine restarts, where in host mode it would
/// compete with the primary for the service's ports. Once a primary is healthy,
/// [`Docker::keep_running`] lets the engine bring it back after a reboot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerSpec {
    /// The container name, e.g. `lessnat-web.web-1.next`.
    pub name: String,
    /// The image reference. It must already be present on the engine: creating
    /// a container never pulls (a plan's `pull-image` changes come first).
    pub image: String,
    /// The command (the arguments given to the image's entrypoint); empty
    /// keeps the image's own `CMD`.
    pub command: Vec<String>,
    /// Environment variables, added to the image's.
    pub env: BTreeMap<String, String>,
    /// Labels, added to the image's.
    pub labels: BTreeMap<String, String>,
    /// The network mode.
    pub network: ContainerNetwork,
    /// How long the engine waits after the stop signal before it kills the
    /// container, when it stops the container itself (`docker stop` without
    /// `--time`, engine shutdown). The engine counts whole seconds, so this
    /// is rounded up.
    pub stop_timeout: Duration,
}
