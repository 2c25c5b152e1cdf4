//! The plan as a value: what will change on a node and why. It renders as
//! text for people and as versioned JSON for scripts (see `docs/plan-json.md`).

use serde::{Deserialize, Serialize};

use super::operation::Operation;
use crate::ownership::Slot;
use crate::spec::{HumanDuration, Strategy};

/// Version of the JSON plan format.
pub const PLAN_FORMAT: u32 = 2;

/// Everything `apply` would do on one node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Format version, [`PLAN_FORMAT`].
    pub format: u32,
    /// The node planned for.
    pub node: String,
    /// Fingerprint of the observed state the plan was made from.
    pub fingerprint: String,
    /// Objects lessnat owns that were changed by someone else.
    pub drift: Vec<Drift>,
    /// Things that block an apply until a person deals with them.
    pub conflicts: Vec<String>,
    /// The changes, in the order they will be applied.
    pub changes: Vec<Change>,
    /// Load-balancer state that is not a change: replicas the table already
    /// leaves out of the spread and that stay out, and replicas whose worker
    /// holds a canary (new connections stay on the old address).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub load_balancing: Vec<String>,
    /// Fleet rollouts: services whose upgrade waits its turn (a canary
    /// node or every slot busy, a canary's hold): not a change.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rollouts: Vec<String>,
    /// Warnings from observation (conntrack full, ...) and from load
    /// balancing (no replica of a VIP port answers).
    pub warnings: Vec<String>,
}

/// The kind of a change; its symbol is part of lessnat's output contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// `+` a new object.
    Create,
    /// `~` an object changed in place.
    Update,
    /// `-/+` an object removed and made anew (downtime for containers).
    Replace,
    /// `-` an object removed.
    Destroy,
    /// `>>` a staged, zero-downtime upgrade (or the rest of one in flight).
    Upgrade,
}

impl Action {
    /// The symbol shown in front of the change.
    pub fn symbol(self) -> &'static str {
        match self {
            Action::Create => "+",
            Action::Update => "~",
            Action::Replace => "-/+",
            Action::Destroy => "-",
            Action::Upgrade => ">>",
        }
    }
}

/// What a change is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Resource {
    /// An nftables table.
    NftTable {
        /// Family.
        family: String,
        /// Name.
        name: String,
    },
    /// One container of a service.
    Container {
        /// The service.
        service: String,
        /// Its role.
        slot: Slot,
        /// The container name.
        name: String,
    },
    /// A service as a whole (for upgrades).
    Service {
        /// The service.
        name: String,
    },
    /// A policy routing rule.
    IpRule {
        /// Family.
        family: String,
        /// Priority.
        priority: u32,
    },
    /// A route.
    Route {
        /// Table id.
        table: u32,
        /// Destination.
        destination: String,
    },
    /// The veth pair wiring a routed container in.
    Veth {
        /// The service.
        service: String,
        /// The container address it leads to.
        address: String,
        /// The node-side interface name.
        name: String,
    },
    /// An address lessnat puts on an interface (a VIP on `lo`).
    Address {
        /// The interface.
        device: String,
        /// The address, in CIDR form.
        address: String,
    },
    /// A kernel setting.
    Sysctl {
        /// Its key, e.g. `net.ipv4.ip_forward`.
        key: String,
    },
    /// An image on the engine.
    Image {
        /// The reference, as the spec names it.
        reference: String,
    },
    /// A load-balancer node's acknowledgement in etcd of a routed upgrade's
    /// switch (`{prefix}/acks/{service}/{from}/{node}`).
    Acknowledgement {
        /// The service.
        service: String,
        /// The replica's old address.
        from: String,
        /// The load-balancer node.
        node: String,
    },
    /// A version of a service marked bad in its fleet rollout
    /// (`{prefix}/rollouts/{service}/{version}/bad`).
    RolloutBad {
        /// The service.
        service: String,
        /// The version.
        version: String,
    },
}

impl Resource {
    /// A short address for the resource, like Terraform's: `container.lessnat-web`.
    pub fn address(&self) -> String {
        match self {
            Resource::NftTable { family, name } => format!("nft_table.{family}.{name}"),
            Resource::Container { name, .. } => format!("container.{name}"),
            Resource::Service { name } => format!("service.{name}"),
            Resource::IpRule { family, priority } => format!("ip_rule.{family}.{priority}"),
            Resource::Route { table, destination } => format!("route.{table}.{destination}"),
            Resource::Veth { name, .. } => format!("veth.{name}"),
            Resource::Address { device, address } => format!("address.{device}.{address}"),
            Resource::Sysctl { key } => format!("sysctl.{key}"),
            Resource::Image { reference } => format!("image.{reference}"),
            Resource::Acknowledgement {
                service,
                from,
                node,
            } => format!("ack.{service}.{from}.{node}"),
            Resource::RolloutBad { service, version } => {
                format!("rollout_bad.{service}.{version}")
            }
        }
    }
}

/// One change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    /// What kind of change.
    pub action: Action,
    /// What it changes.
    pub resource: Resource,
    /// Why, in a few words.
    pub reason: String,
    /// Field-level differences (`old -> new`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<FieldChange>,
    /// For nftables tables: a line diff of the rule set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub diff: Vec<DiffLine>,
    /// For upgrades: the stages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade: Option<Upgrade>,
    /// What apply does, with every value it needs.
    pub operation: Operation,
}

/// One field's old and new value (`None` = absent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldChange {
    /// Field name.
    pub name: String,
    /// Value now.
    pub old: Option<FieldValue>,
    /// Value after apply.
    pub new: Option<FieldValue>,
}

/// A field's value: text, or a list (a command's arguments).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum FieldValue {
    /// A single value.
    Text(String),
    /// A list of values, shown as one.
    List(Vec<String>),
}

impl From<String> for FieldValue {
    fn from(text: String) -> Self {
        FieldValue::Text(text)
    }
}

impl std::fmt::Display for FieldValue {
    /// Quoted as a string literal; a list as `["a", "b"]`.
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            FieldValue::Text(text) => write!(f, "{text:?}"),
            FieldValue::List(items) => write!(f, "{items:?}"),
        }
    }
}

/// One line of a text diff.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffLine {
    /// `+` added, `-` removed, ` ` unchanged.
    pub tag: char,
    /// The line.
    pub text: String,
}

/// A staged upgrade, new or in flight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Upgrade {
    /// The strategy.
    pub strategy: Strategy,
    /// For an upgrade already in flight: where it stands and what happens next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<InFlight>,
    /// The stages, in order.
    pub stages: Vec<Stage>,
}

/// An upgrade found half done on the host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InFlight {
    /// The last stage that completed.
    pub reached: StageName,
    /// Resume it or roll it back.
    pub decision: Decision,
    /// Why that decision.
    pub why: String,
}

/// What to do with an upgrade in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Decision {
    /// Carry on from the next stage.
    Resume,
    /// Undo the completed stages in reverse.
    RollBack,
}

impl Decision {
    /// The decision as a verb in output: `resume` or `roll back`.
    pub fn verb(self) -> &'static str {
        match self {
            Decision::Resume => "resume",
            Decision::RollBack => "roll back",
        }
    }
}

/// The stages of an upgrade (design §3) and of its rollback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StageName {
    /// Start the next version on the temporary ports and wait until healthy.
    StartNext,
    /// Send a share of new connections to the temporary ports and hold,
    /// watching the next version's health.
    Canary,
    /// Send new connections to the temporary ports.
    Redirect,
    /// Wait for the old version's connections to finish.
    Drain,
    /// Stop the old version (kept), start the new one on the canonical ports.
    Swap,
    /// Remove the redirect.
    Unredirect,
    /// Wait for connections on the temporary ports to finish.
    DrainNext,
    /// Remove the next and previous containers.
    Finish,
    /// Routed: load-balancer nodes switch new connections to the next replica.
    Switch,
    /// Stop-start: stop the old version.
    Stop,
    /// Stop-start: start the new version.
    Start,
    /// Rollback: stop the new primary and start the previous one again.
    Restore,
    /// Rollback: remove the next container.
    RemoveNext,
}

impl StageName {
    /// The stage's name in output.
    pub fn as_str(self) -> &'static str {
        match self {
            StageName::StartNext => "start-next",
            StageName::Canary => "canary",
            StageName::Redirect => "redirect",
            StageName::Drain => "drain",
            StageName::Swap => "swap",
            StageName::Unredirect => "unredirect",
            StageName::DrainNext => "drain-next",
            StageName::Finish => "finish",
            StageName::Switch => "switch",
            StageName::Stop => "stop",
            StageName::Start => "start",
            StageName::Restore => "restore",
            StageName::RemoveNext => "remove-next",
        }
    }
}

/// One stage of an upgrade.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stage {
    /// Which stage.
    pub name: StageName,
    /// Whether it already happened (in-flight upgrades).
    pub done: bool,
    /// What it does.
    pub action: String,
    /// What it waits for, if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<String>,
    /// How long it waits at most.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<HumanDuration>,
}

/// Object that lessnat owns and someone else changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drift {
    /// The object.
    pub resource: Resource,
    /// What changed.
    pub what: String,
}

/// Counts for the summary line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Summary {
    /// Objects created (replacements count here too).
    pub add: usize,
    /// Objects changed in place.
    pub change: usize,
    /// Objects destroyed (replacements count here too).
    pub destroy: usize,
    /// Staged upgrades.
    pub upgrade: usize,
    /// Times apply wrote lessnat's table again because someone else deleted
    /// it (or part of it) while an upgrade's redirect had to hold; 0 in a plan.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub table_restores: usize,
}

fn is_zero(count: &usize) -> bool {
    *count == 0
}

impl Plan {
    /// Whether applying the plan would change nothing.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// Whether the plan finishes or rolls back an upgrade found in flight. After
    /// applying such a plan, apply plans again: the spec may want more (a newer
    /// version than the one that was in flight).
    pub fn has_upgrade_in_flight(&self) -> bool {
        self.changes
            .iter()
            .any(|c| c.upgrade.as_ref().is_some_and(|u| u.in_flight.is_some()))
    }

    /// Counts changes by kind, as the summary line shows them.
    pub fn summary(&self) -> Summary {
        let mut summary = Summary::default();
        for change in &self.changes {
            match change.action {
                Action::Create => summary.add += 1,
                Action::Update => summary.change += 1,
                Action::Destroy => summary.destroy += 1,
                Action::Replace => {
                    summary.add += 1;
                    summary.destroy += 1;
                }
                Action::Upgrade => summary.upgrade += 1,
            }
        }
        summary
    }
}
