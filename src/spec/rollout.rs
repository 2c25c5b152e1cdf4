//! A service's optional `upgrade.rollout` (`docs/cluster.md`, "Rollouts"):
//! how its workers take turns upgrading it across the site, through slots
//! in etcd, and its checks.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{HumanDuration, Located, NetworkMode, Service, Spec, Strategy};
use crate::diagnostic::{Diagnostic, Span};

/// A fleet rollout: how many nodes upgrade the service at once, and
/// whether a few go first on their own (the canary nodes). Needs the
/// spec's `cluster:`: nodes take their turn through slots in etcd.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rollout {
    /// How many nodes upgrade this service at the same time (each takes a
    /// slot in etcd for its upgrade). Default `1`. Not `upgrade.maxParallel`,
    /// which counts one node's replicas that upgrade together.
    #[serde(default = "one")]
    #[schemars(range(min = 1))]
    pub max_parallel: Located<u32>,
    /// The canary nodes: the first nodes to upgrade do so one at a time,
    /// and the others start only `hold` after the last of them finished.
    /// A canary node whose upgrade fails, or whose replica of the version
    /// turns unhealthy afterwards (while other nodes still wait to start
    /// it), marks the version bad: no other node starts it until the spec
    /// changes; the canary keeps running it. Without it, nodes start as
    /// slots are free (a failed upgrade on any node marks the version bad).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<Located<RolloutCanary>>,
}

/// The canary phase of a fleet rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RolloutCanary {
    /// How many nodes upgrade first, one at a time. Default `1`.
    #[serde(default = "one")]
    #[schemars(range(min = 1))]
    pub nodes: Located<u32>,
    /// How long the other nodes wait after the last canary node finished.
    /// Default `30s`.
    #[serde(default = "default_hold")]
    pub hold: Located<HumanDuration>,
}

fn one() -> Located<u32> {
    1.into()
}

fn default_hold() -> Located<HumanDuration> {
    HumanDuration::secs(30).into()
}

/// The problems of `service`'s `upgrade.rollout` in `spec`, each at its value.
pub(super) fn check(spec: &Spec, service: &Service) -> Vec<Diagnostic> {
    let Some(rollout) = &service.upgrade.rollout else {
        return Vec::new();
    };
    let mut found = Vec::new();
    let mut error = |span: Span, message: &str, help: &str| {
        found.push(Diagnostic::new(Some(span), message).with_help(help));
    };
    if spec.cluster.is_none() {
        error(
            rollout.span,
            "`rollout` needs the spec's `cluster:`",
            "nodes take rollout slots in etcd: add a `cluster:` block (docs/cluster.md), or remove `rollout`",
        );
    }
    if service.network != NetworkMode::Routed {
        error(
            rollout.span,
            "`rollout` is for routed services",
            "a host-mode service's node upgrades it on its own; remove `rollout`",
        );
    } else if service.upgrade.strategy == Strategy::StopStart {
        error(
            rollout.span,
            "`rollout` needs the redirect-drain strategy",
            "remove `rollout`, or use `strategy: redirect-drain`",
        );
    }
    if rollout.max_parallel.value == 0 {
        error(
            rollout.max_parallel.span,
            "`rollout.maxParallel` must be at least 1",
            "the number of nodes that upgrade this service at the same time, e.g. `2`",
        );
    }
    if let Some(canary) = &rollout.canary
        && canary.nodes.value == 0
    {
        error(
            canary.nodes.span,
            "`canary.nodes` must be at least 1",
            "the number of nodes that upgrade first, one at a time, e.g. `1`; remove `canary` for none",
        );
    }
    found
}
