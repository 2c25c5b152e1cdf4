//! The spec: what a lessnat user writes in YAML. Every field's doc comment
//! becomes its description in the JSON Schema, shown as hover text in editors.

mod address;
mod cluster;
mod de;
mod duration;
mod load;
mod located;
mod percent;
mod placeholder;
mod rollout;
mod tree;
mod validate;
mod warnings;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub use address::{Address, Subnet};
pub use cluster::{Cluster, Etcd, EtcdTls, MAX_LEASE_TTL, MIN_LEASE_TTL};
pub use duration::{DurationError, HumanDuration};
pub use load::{MAX_SPEC_BYTES, load_bytes, load_file};
pub use located::Located;
pub use percent::{Percent, PercentError};
pub use placeholder::{PlaceholderError, render_placeholders};
pub use rollout::{Rollout, RolloutCanary};
pub use warnings::{DEFAULT_EPHEMERAL_PORTS, ephemeral_port_warnings, parse_port_range};

/// The spec format version this build of lessnat reads.
pub const SPEC_VERSION: u32 = 1;

/// A lessnat spec: the nodes of a site and the services that run on them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(title = "lessnat spec")]
pub struct Spec {
    /// Version of the spec format. Always `1`.
    #[schemars(range(min = 1, max = 1))]
    pub version: Located<u32>,
    /// The hosts lessnat manages: workers that run services, and load-balancer nodes.
    #[serde(default)]
    pub nodes: Vec<Node>,
    /// The services to run.
    #[serde(default)]
    pub services: Vec<Service>,
    /// Cluster coordination through etcd (optional): agents register their
    /// nodes and healthy replicas, load-balancer nodes follow the
    /// registrations. Without it, every node decides from its own probes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<Cluster>,
}

/// A host managed by lessnat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Node {
    /// Name of the node, as given to `--node`: lowercase letters, digits and `-`.
    #[schemars(regex(pattern = r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$"), length(max = 40))]
    pub name: Located<String>,
    /// The node's address on the data-centre network.
    pub address: Located<Address>,
    /// Routed mode, dual stack: the node's IPv6 address when `address` is
    /// IPv4 (load-balancer nodes route `containerSubnet6` via it, workers
    /// send IPv6 replies back to it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address6: Option<Located<Address>>,
    /// Routed mode: the subnet container addresses on this node live in, e.g. `10.20.1.0/24`
    /// or `fd00:20:1::/64`. Load-balancer nodes route it via `address`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_subnet: Option<Located<Subnet>>,
    /// Routed mode, dual stack: the node's IPv6 container subnet when
    /// `containerSubnet` is IPv4, e.g. `fd00:20:1::/64`. Replicas whose
    /// address is in it are IPv6 replicas (each replica has one address
    /// family; a dual-stack service lists replicas of both).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_subnet6: Option<Located<Subnet>>,
    /// Makes this node a load balancer for routed services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
}

/// Load-balancer settings of a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancer {
    /// Identifier of this load balancer, 1 to 63. It is carried in the DSCP bits of
    /// forwarded packets so that workers send replies back through the same node.
    #[schemars(range(min = 1, max = 63))]
    pub id: Located<u8>,
    /// Virtual IP addresses this node accepts traffic on for routed services.
    #[serde(default)]
    pub vips: Vec<Located<Address>>,
}

/// How a service's containers are attached to the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum NetworkMode {
    /// The container shares the node's network (Docker `--network host`) and listens
    /// on the node's ports. Upgrades redirect new connections to a temporary port.
    #[default]
    Host,
    /// Each replica gets its own address from its node's `containerSubnet`, reached
    /// through load-balancer nodes by routing, keeping real client addresses.
    Routed,
}

/// A service: one container image, run in host mode on one node or in routed mode as replicas.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    /// Name of the service: lowercase letters, digits and `-`; used in container names.
    #[schemars(regex(pattern = r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$"), length(max = 40))]
    pub name: Located<String>,
    /// `host` (default) or `routed`.
    #[serde(default)]
    pub network: NetworkMode,
    /// Host mode: the node the service runs on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<Located<String>>,
    /// Routed mode: one entry per replica, each on a node with a `containerSubnet`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<Replica>,
    /// The container image, e.g. `registry.example/web:2.1`. Changing it triggers an upgrade.
    /// Credentials for its registry come from the Docker client config
    /// (`DOCKER_CONFIG` or `~/.docker/config.json`).
    pub image: Located<String>,
    /// When the image is pulled: `missing` (default) pulls it only when the
    /// engine lacks it; `always` asks the registry for the tag's current digest
    /// at every `plan` (without pulling) and upgrades when it moved.
    #[serde(default, skip_serializing_if = "PullPolicy::is_missing")]
    pub pull: Located<PullPolicy>,
    /// Command and arguments; the image's default when omitted. `{port}` stands for the
    /// port the container must listen on (the canonical port, or the temporary port
    /// during an upgrade); `{port.NAME}` for a named port when there are several.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<Located<String>>,
    /// Environment variables. Values may use `{port}` and `{port.NAME}` like `command`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<Located<String>, Located<String>>,
    /// The ports the service listens on. At least one.
    pub ports: Vec<Port>,
    /// How lessnat decides that a container is ready. Without it, a container is
    /// ready when it runs and, if the service has a TCP port, its first TCP port
    /// accepts connections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Located<Health>>,
    /// How a new image or setting is rolled out.
    #[serde(default)]
    pub upgrade: Upgrade,
}

/// When lessnat pulls a service's image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum PullPolicy {
    /// Pull only when the engine does not have the image.
    #[default]
    Missing,
    /// Ask the registry for the tag's digest at every plan; pull and upgrade when it moved.
    Always,
}

impl PullPolicy {
    /// Whether this is the default, `missing` (it is then left out of plans' JSON).
    pub fn is_missing(policy: &Located<PullPolicy>) -> bool {
        policy.value == PullPolicy::Missing
    }
}

/// A routed-mode replica, or with `count` several replicas on one node. A
/// node may run several replicas of a service (several entries, or a count).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Replica {
    /// The node that runs this replica; it needs a `containerSubnet`.
    pub node: Located<String>,
    /// The replica's own address, inside its node's `containerSubnet`. With
    /// `count`, the first address of the first replica's pair.
    pub address: Located<Address>,
    /// The address an upgrade starts the next version at, inside the node's
    /// `containerSubnet`. Versions alternate between `address` and
    /// `nextAddress`. Default: the highest address of the subnet that no
    /// replica in the spec uses (each replica gets its own). Not with `count`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_address: Option<Located<Address>>,
    /// Runs this many replicas on the node, each with its own pair of
    /// consecutive addresses from `address` on: with `address: 10.20.1.10`
    /// and `count: 3`, the pairs are .10/.11, .12/.13 and .14/.15 (versions
    /// alternate within each pair). Raising the count adds pairs and leaves
    /// the others where they are. At most 1024.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub count: Option<Located<u32>>,
}

/// Transport protocol of a port.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    Serialize,
    Deserialize,
    JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP (default).
    #[default]
    Tcp,
    /// UDP. UDP has no connections to drain: at redirect and unredirect lessnat
    /// deletes the service's UDP conntrack entries so flows move at once.
    Udp,
}

impl Protocol {
    /// The protocol's name as written in specs and nftables.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// A port a service listens on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Port {
    /// Name of the port, used in `{port.NAME}` and `health.http.port`.
    #[schemars(regex(pattern = r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$"), length(max = 40))]
    pub name: Located<String>,
    /// The canonical port clients connect to.
    #[schemars(range(min = 1))]
    pub port: Located<u16>,
    /// `tcp` (default) or `udp`.
    #[serde(default)]
    pub protocol: Protocol,
    /// Host mode, `redirect-drain` upgrades: the port the next version listens on while
    /// new connections are redirected to it. Must be free on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub temp_port: Option<Located<u16>>,
    /// Routed mode: a virtual IP of a load-balancer node that serves this port
    /// (IPv4 or IPv6); it spreads new connections over the replicas of its
    /// address family.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip: Option<Located<Address>>,
    /// Routed mode, dual stack: the port's IPv6 VIP when `vip` is IPv4; it
    /// spreads over the service's IPv6 replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip6: Option<Located<Address>>,
    /// Routed mode: the port on the VIP; defaults to `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub vip_port: Option<Located<u16>>,
}

/// Readiness check run by lessnat itself. Give exactly one of `http`, `tcp` or `exec`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("oneOf" = [
    {"required": ["http"]},
    {"required": ["tcp"]},
    {"required": ["exec"]}
]))]
pub struct Health {
    /// An HTTP GET that must answer 2xx.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpCheck>,
    /// A TCP connection that must be accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpCheck>,
    /// A command run inside the container that must exit 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<Vec<Located<String>>>,
    /// Time between checks. Default `1s`.
    #[serde(default = "default_interval")]
    pub interval: Located<HumanDuration>,
    /// Time one check may take. Default `1s`.
    #[serde(default = "default_timeout")]
    pub timeout: Located<HumanDuration>,
    /// Consecutive passing checks before the container counts as healthy. Default `2`.
    #[serde(default = "default_healthy_after")]
    #[schemars(range(min = 1))]
    pub healthy_after: Located<u32>,
    /// How long a new container may take to become healthy before the upgrade fails. Default `60s`.
    #[serde(default = "default_start_timeout")]
    pub start_timeout: Located<HumanDuration>,
}

fn default_interval() -> Located<HumanDuration> {
    HumanDuration::secs(1).into()
}

fn default_timeout() -> Located<HumanDuration> {
    HumanDuration::secs(1).into()
}

fn default_healthy_after() -> Located<u32> {
    2.into()
}

fn default_start_timeout() -> Located<HumanDuration> {
    HumanDuration::secs(60).into()
}

/// HTTP health check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpCheck {
    /// Request path, e.g. `/healthz`.
    pub path: Located<String>,
    /// Name of the TCP port to probe; the service's first TCP port when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<Located<String>>,
}

/// TCP health check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpCheck {
    /// Name of the TCP port to probe; the service's first TCP port when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<Located<String>>,
}

/// How a service is upgraded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Upgrade {
    /// `redirect-drain` (default, zero downtime) or `stop-start` (stops the old
    /// container before starting the new one: downtime).
    #[serde(default)]
    pub strategy: Strategy,
    /// How long to wait for the old version's connections to finish. Default `5m`.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: Located<HumanDuration>,
    /// What to do when connections remain after `drainTimeout`: `proceed` (default;
    /// they are cut when the old container stops) or `rollback`.
    #[serde(default)]
    pub on_drain_timeout: OnDrainTimeout,
    /// What to do when a stage fails: `rollback` (default) or `pause` (leave the
    /// host as it is for inspection; `lessnat plan` shows how to go on).
    #[serde(default)]
    pub on_failure: OnFailure,
    /// How long a container gets between SIGTERM and SIGKILL when it is stopped. Default `10s`.
    #[serde(default = "default_stop_timeout")]
    pub stop_timeout: Located<HumanDuration>,
    /// Routed mode: once the next replica is healthy, how long the worker
    /// waits at least before it counts the old replica's connections, so every
    /// load-balancer node can switch new connections first (each switches on
    /// its own next apply: run them more often than this). Default `30s`.
    #[serde(default = "default_switch_wait")]
    pub switch_wait: Located<HumanDuration>,
    /// Redirect-drain: before all new connections go to the new version,
    /// send it only a share of them for a while, watching its health (see
    /// [`Canary`]). In routed mode the worker splits the new connections
    /// that reach each old replica; load-balancer nodes switch once it
    /// promotes the canary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<Located<Canary>>,
    /// Routed mode: how many replicas of the service on one node upgrade at
    /// the same time (their next versions start, load-balancer nodes switch
    /// them, and they drain together). Default `1`: one after the other.
    #[serde(default = "default_max_parallel", skip_serializing_if = "is_one")]
    #[schemars(range(min = 1))]
    pub max_parallel: Located<u32>,
    /// Routed mode, with the spec's `cluster:`: how the service's workers
    /// take turns upgrading it (slots in etcd), canary nodes first (see
    /// [`Rollout`]). Without it, each worker upgrades on its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Located<Rollout>>,
}

fn default_max_parallel() -> Located<u32> {
    1.into()
}

/// Whether `value` is the default `maxParallel`, 1 (left out of plans' JSON).
fn is_one(value: &Located<u32>) -> bool {
    value.value == 1
}

/// A canary: once the new version is healthy, `weight` of the new
/// connections go to it and the rest to the old version, for `hold`. If its
/// health check fails `unhealthyAfter` times in a row, the upgrade is rolled
/// back; when `hold` ends, it goes on as usual. `lessnat apply --promote` and
/// `lessnat apply --abort` end the hold early. Established connections never
/// move.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Canary {
    /// The share of new connections the new version gets, `1%` to `99%`.
    pub weight: Located<Percent>,
    /// How long the split holds before the upgrade goes on, e.g. `5m`.
    pub hold: Located<HumanDuration>,
    /// Failed health checks in a row of the new version that abort the
    /// canary (the upgrade is rolled back). Default `3`.
    #[serde(default = "default_unhealthy_after")]
    #[schemars(range(min = 1))]
    pub unhealthy_after: Located<u32>,
}

fn default_unhealthy_after() -> Located<u32> {
    3.into()
}

impl Default for Upgrade {
    fn default() -> Self {
        Upgrade {
            strategy: Strategy::default(),
            drain_timeout: default_drain_timeout(),
            on_drain_timeout: OnDrainTimeout::default(),
            on_failure: OnFailure::default(),
            stop_timeout: default_stop_timeout(),
            switch_wait: default_switch_wait(),
            canary: None,
            max_parallel: default_max_parallel(),
            rollout: None,
        }
    }
}

fn default_drain_timeout() -> Located<HumanDuration> {
    HumanDuration::secs(300).into()
}

fn default_stop_timeout() -> Located<HumanDuration> {
    HumanDuration::secs(10).into()
}

fn default_switch_wait() -> Located<HumanDuration> {
    HumanDuration::secs(30).into()
}

/// Upgrade strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Start the next version beside the old one, redirect new connections to it,
    /// drain the old one, swap, remove the redirect. No dropped connections.
    #[default]
    RedirectDrain,
    /// Stop the old version, then start the new one. Simple, with downtime.
    StopStart,
}

/// What to do when connections remain after the drain timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum OnDrainTimeout {
    /// Go on; remaining connections are cut when the old container stops.
    #[default]
    Proceed,
    /// Undo the upgrade and keep the old version.
    Rollback,
}

/// What to do when an upgrade stage fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum OnFailure {
    /// Undo completed stages in reverse, leaving the old version serving.
    #[default]
    Rollback,
    /// Stop where it failed and leave the state for inspection.
    Pause,
}

impl Spec {
    /// The node called `name`.
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name.value == name)
    }
}

impl Service {
    /// The service's port called `name`.
    pub fn port(&self, name: &str) -> Option<&Port> {
        self.ports.iter().find(|p| p.name.value == name)
    }
}
