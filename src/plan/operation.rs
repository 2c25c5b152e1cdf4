//! What apply does for each change, as typed values decided at plan time.
//!
//! Terraform's rule: a change carries everything it needs, and apply never
//! re-decides. Each [`Operation`] holds the values apply writes (the table,
//! the rule, the address to wire a container in at) and, for upgrades, the
//! state they start from; `apply` has one short arm per variant and never
//! reads the spec or re-runs a planner decision.

use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::model::{Decision, InFlight};
use crate::cluster::handshake::{Handshake, SwitchAck};
use crate::cluster::rollout::{BadMark, Turn};
use crate::desired::DesiredContainer;
use crate::model::{IpRule, NftRule, NftTable, OwnedAddress, Route};
use crate::spec::{HumanDuration, Percent, Protocol, Service};

/// One service as apply starts it: its spec (health check, upgrade settings,
/// ports) and the container derived from it for this node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Workload {
    /// The service as the spec gives it.
    pub service: Service,
    /// The container it runs on this node.
    pub container: DesiredContainer,
}

/// The running version an upgrade starts from, for the journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeFrom {
    /// The old primary's spec hash.
    pub spec: String,
    /// The old primary's image.
    pub image: String,
}

/// A canary: the share of new connections the next version gets before all
/// do, for how long, and what ends it early.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CanarySplit {
    /// The share of new connections to the next version.
    pub weight: Percent,
    /// How long the split holds.
    pub hold: HumanDuration,
    /// Failed health checks in a row of the next version that abort it.
    pub unhealthy_after: u32,
    /// The rules that split, each with its chain.
    pub rules: Vec<(String, NftRule)>,
    /// lessnat's table while the split holds: the planned table plus
    /// `rules`. Written whole when someone else deletes part of it meanwhile.
    pub table: NftTable,
}

/// A routed canary on the worker: the split (the share of new connections
/// that reach each old replica sent on to its next one, for `hold`), then the
/// promotion (the load-balancer nodes' probes of each old replica dropped, so
/// they switch), both ended when the upgrade finishes or rolls back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaCanary {
    /// The share, the hold, what ends it, the split's rules and the table
    /// while it holds.
    pub split: CanarySplit,
    /// The rules that promote it, each with its chain.
    pub promote: Vec<(String, NftRule)>,
    /// lessnat's table once promoted: the planned table plus the split's
    /// and the promotion's rules.
    pub promoted_table: NftTable,
    /// The comments of every rule of the split and the promotion (what ends them).
    pub comments: Vec<String>,
    /// The promotion's rules were found: the hold is over, the upgrade goes
    /// on from the switch.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub promoted: bool,
}

/// A load-balancer node sends a replica's new connections to its other
/// address; after writing the table it waits, at most `wait`, until its own
/// connections to the old address are gone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Switch {
    /// The service.
    pub service: String,
    /// The replica's node.
    pub node: String,
    /// The address connections went to.
    pub from: IpAddr,
    /// The address they go to now.
    pub to: IpAddr,
    /// Why.
    pub why: String,
    /// How long this node waits for its connections to `from` (the service's `switchWait`).
    pub wait: HumanDuration,
    /// With the spec's `cluster:`: the acknowledgement this node writes in
    /// etcd once the table is written (the worker waits for it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack: Option<SwitchAck>,
}

impl std::fmt::Display for Switch {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(
            f,
            "{} on {}: new connections go to {} instead of {} ({})",
            self.service, self.node, self.to, self.from, self.why
        )
    }
}

/// Replicas a load-balancer node's table leaves out of a VIP port's spread
/// (neither address answers): after writing the table it deletes the
/// conntrack entries of connections to that VIP port that went to their
/// addresses and never got a reply, or were reset. Such an entry would keep
/// steering its client's retransmitted SYNs, and a new connection that
/// reuses its source port, to the dead replica until it expires (SYN_SENT:
/// 2 minutes). Other connections that got a reply are left alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unanswered {
    /// `SERVICE/PORT`.
    pub port: String,
    /// `tcp` or `udp`.
    pub protocol: Protocol,
    /// The VIP.
    pub vip: IpAddr,
    /// The port on the VIP.
    pub vip_port: u16,
    /// Both addresses of each replica left out.
    pub addresses: Vec<IpAddr>,
}

impl std::fmt::Display for Unanswered {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        let addresses: Vec<String> = self.addresses.iter().map(ToString::to_string).collect();
        write!(
            f,
            "{} ({}:{}): unanswered or reset connections to {}",
            self.port,
            self.vip,
            self.vip_port,
            addresses.join(", ")
        )
    }
}

/// One replica's part of a batch of routed upgrades.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaMove {
    /// The service at the version it goes to, with this replica's container.
    pub workload: Box<Workload>,
    /// Where the old version is wired in.
    pub old_at: IpAddr,
    /// Where the next version is (or will be) wired in.
    pub next_at: IpAddr,
    /// The upgrade found on the host, and whether it resumes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<InFlight>,
    /// Whether an old primary exists to switch away from and drain.
    pub old_exists: bool,
    /// With the spec's `cluster:`: the handshake that replaces the
    /// `switchWait` guess (`switchWait` stays the fallback when etcd
    /// cannot be reached).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handshake: Option<Box<Handshake>>,
}

/// What apply does for one change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Operation {
    /// Pull an image the engine lacks, with the Docker client config's
    /// credentials for its registry (never part of the plan).
    PullImage {
        /// The reference, as the spec names it.
        image: String,
        /// `pull: always`: the digest the tag had when planned; apply fails
        /// when the pull brings another (the tag moved again: plan again).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        digest: Option<String>,
    },
    /// Write lessnat's nftables table in one transaction (created, or
    /// replaced whole); then, on a load-balancer node, delete the unanswered
    /// connections to the replicas it leaves out of a spread, and wait for
    /// its own connections to each switched replica's old address.
    WriteTable {
        /// The table as it must be.
        table: NftTable,
        /// Replicas whose new connections this table moves.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        switches: Vec<Switch>,
        /// Replicas this table leaves out of a spread: their unanswered
        /// connections go once it is written.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        unanswered: Vec<Unanswered>,
    },
    /// Delete lessnat's nftables table.
    DeleteTable,
    /// Stop and remove a container.
    RemoveContainer {
        /// The container.
        name: String,
        /// How long it gets to stop before it is killed.
        stop_timeout: HumanDuration,
    },
    /// Host mode: create and start the primary and wait until it is healthy
    /// (`replace`: the old container is stopped and removed first).
    CreatePrimary {
        /// The service.
        workload: Box<Workload>,
        /// Remove the existing container first.
        replace: bool,
    },
    /// Start the stopped, current primary again and wait until it is healthy.
    StartPrimary {
        /// The service.
        workload: Box<Workload>,
    },
    /// Host mode: a redirect-drain upgrade, new or the rest of one in flight.
    Upgrade {
        /// The service at the version it goes to.
        workload: Box<Workload>,
        /// The upgrade found on the host, and whether it resumes or rolls back.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        in_flight: Option<InFlight>,
        /// The version it starts from (for the journal), when a primary runs.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<UpgradeFrom>,
        /// lessnat's table as it must be while this upgrade's redirect holds:
        /// the planned table plus the redirect's elements. Written whole when
        /// someone else deletes the table (or part of it) during the upgrade.
        /// Upgrades whose redirects the planned table holds already share it.
        #[serde(with = "shared_table")]
        redirected_table: Arc<NftTable>,
        /// The canary before the redirect, if the upgrade has one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        canary: Option<Box<CanarySplit>>,
        /// A canary's split was found in lessnat's table: the redirect, or
        /// the rollback, ends it.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        split_found: bool,
    },
    /// Host mode: stop the old primary, start the new one (downtime).
    StopStart {
        /// The service at the version it goes to.
        workload: Box<Workload>,
    },
    /// Routed mode: create the replica's primary, wired in at `address`.
    CreateReplica {
        /// The service.
        workload: Box<Workload>,
        /// Where it is wired in.
        address: IpAddr,
    },
    /// Routed mode: start the stopped primary and wire it in again at `address`.
    RestartReplica {
        /// The service.
        workload: Box<Workload>,
        /// Where it is wired in.
        address: IpAddr,
    },
    /// Routed mode: replace the primary in place at `address` (downtime).
    ReplaceReplica {
        /// The service.
        workload: Box<Workload>,
        /// Where the new one is wired in.
        address: IpAddr,
    },
    /// Routed mode: an upgrade across machines from `old_at` to `next_at`.
    UpgradeReplica {
        /// The service at the version it goes to.
        workload: Box<Workload>,
        /// Where the old version is wired in.
        old_at: IpAddr,
        /// Where the next version is (or will be) wired in.
        next_at: IpAddr,
        /// The upgrade found on the host, and whether it resumes or rolls back.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        in_flight: Option<InFlight>,
        /// Whether an old primary exists to switch away from and drain.
        old_exists: bool,
        /// Load-balancer node addresses (with `cluster:`, also the node side
        /// of the worker's veths): their probes are not client connections.
        load_balancers: Vec<IpAddr>,
        /// The canary before the switch, if the upgrade has one (or its
        /// rules were found and must end).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        canary: Option<Box<ReplicaCanary>>,
        /// With the spec's `cluster:`: the handshake that replaces the
        /// `switchWait` guess (`switchWait` stays the fallback when etcd
        /// cannot be reached).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        handshake: Option<Box<Handshake>>,
        /// With `upgrade.rollout`: the rollout slot apply takes before the
        /// next version starts (and frees when the upgrade ends).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rollout: Option<Box<Turn>>,
    },
    /// Routed mode: upgrades of several replicas of one service on this node
    /// at once (`maxParallel`): every next version starts, then one switch
    /// wait and one drain for all, then each old replica goes. A failure
    /// rolls back the whole batch.
    UpgradeReplicas {
        /// The replicas, in order.
        batch: Vec<ReplicaMove>,
        /// Load-balancer node addresses: their probes are not client connections.
        load_balancers: Vec<IpAddr>,
        /// The canary of the whole batch before the switch, if the upgrade
        /// has one (or its rules were found and must end).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        canary: Option<Box<ReplicaCanary>>,
        /// With `upgrade.rollout`: the rollout slot apply takes before the
        /// next versions start (and frees when the upgrade ends).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rollout: Option<Box<Turn>>,
    },
    /// Routed mode: wire a running container in again (its veth was lost).
    Wire {
        /// The service (the veth's alias names it).
        service: String,
        /// The container.
        container: String,
        /// Its address.
        address: IpAddr,
    },
    /// Remove a veth pair lessnat made.
    Unwire {
        /// The node-side interface.
        name: String,
    },
    /// Replace a policy routing rule: remove the one found, add the one wanted.
    Rule {
        /// The rule to remove.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        remove: Option<IpRule>,
        /// The rule to add.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        add: Option<IpRule>,
    },
    /// Replace a route: remove the one found, add the one wanted.
    Route {
        /// The route to remove.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        remove: Option<Route>,
        /// The route to add.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        add: Option<Route>,
    },
    /// Add an address lessnat owns (a VIP).
    AddAddress {
        /// The address and its interface.
        address: OwnedAddress,
    },
    /// Remove an address lessnat owns.
    RemoveAddress {
        /// The address and its interface.
        address: OwnedAddress,
    },
    /// Set a kernel setting.
    SetSysctl {
        /// Its key, e.g. `net.ipv4.ip_forward`.
        key: String,
        /// The value.
        value: String,
    },
    /// With the spec's `cluster:`, on a load-balancer node: acknowledge in
    /// etcd a routed upgrade in flight whose switch this node's table
    /// already makes (the worker waits for it), because this node's
    /// acknowledgement is missing or of another address or version: the
    /// run that switched could not write it (etcd out of reach), or it
    /// switched on its own probes.
    Acknowledge {
        /// The service.
        service: String,
        /// The upgrading worker.
        worker: String,
        /// The replica's old address.
        from: IpAddr,
        /// Where this node's table sends its new connections.
        to: IpAddr,
        /// What this node writes (the version registered at `to`).
        ack: SwitchAck,
    },
    /// With `upgrade.rollout`, on a worker waiting to start a version: mark
    /// the version bad in etcd (`{version}/bad`, only if absent) because a
    /// canary node's replica of it turned unhealthy.
    MarkRolloutBad {
        /// The version, the canary node and why.
        mark: Box<BadMark>,
    },
}

impl Operation {
    /// A routed upgrade of one replica (`UpgradeReplica`), as a member of a
    /// batch.
    pub fn replica_move(&self) -> Option<ReplicaMove> {
        match self {
            Operation::UpgradeReplica {
                workload,
                old_at,
                next_at,
                in_flight,
                old_exists,
                handshake,
                ..
            } => Some(ReplicaMove {
                workload: workload.clone(),
                old_at: *old_at,
                next_at: *next_at,
                in_flight: in_flight.clone(),
                old_exists: *old_exists,
                handshake: handshake.clone(),
            }),
            _ => None,
        }
    }

    /// The container this operation creates containers from, if it creates any:
    /// its image must be on the engine first. An upgrade in flight that rolls
    /// back creates nothing new.
    pub fn creates_from(&self) -> Option<&DesiredContainer> {
        let rolls_back =
            |f: &Option<InFlight>| f.as_ref().is_some_and(|f| f.decision == Decision::RollBack);
        match self {
            Operation::Upgrade {
                workload,
                in_flight,
                ..
            }
            | Operation::UpgradeReplica {
                workload,
                in_flight,
                ..
            } if !rolls_back(in_flight) => Some(&workload.container),
            Operation::UpgradeReplicas { batch, .. } => {
                batch.first().map(|member| &member.workload.container)
            }
            Operation::CreatePrimary { workload, .. }
            | Operation::StopStart { workload }
            | Operation::CreateReplica { workload, .. }
            | Operation::ReplaceReplica { workload, .. } => Some(&workload.container),
            _ => None,
        }
    }
}

/// (De)serialises a shared table as the table itself (serde's `rc` feature,
/// which would do the same, is off).
mod shared_table {
    use std::sync::Arc;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::model::NftTable;

    pub(super) fn serialize<S: Serializer>(
        table: &Arc<NftTable>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        table.as_ref().serialize(serializer)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Arc<NftTable>, D::Error> {
        NftTable::deserialize(deserializer).map(Arc::new)
    }
}
