//! Fleet rollouts in the plan of a worker (`docs/cluster.md`, "Rollouts"):
//! whether each new routed upgrade of a service with `upgrade.rollout` may
//! start now, decided from the rollout keys read from etcd
//! ([`RolloutView`]): a version marked bad never starts; canary nodes go one
//! at a time; the others wait `hold` after the last canary finished, then
//! start while a slot is free. An upgrade that may start carries its
//! [`Turn`] (apply takes the slot); one that may not is left out of the
//! plan, which says why. A canary node's replica of the version registered
//! unhealthy for [`UNHEALTHY_FOR_SECS`] makes the plan mark the version
//! bad instead ([`BadMark`]); registered unhealthy for less, the upgrade
//! waits.

use std::time::{Duration, UNIX_EPOCH};

use super::operation::Operation;
use super::{Action, Change, Decision, FieldChange, Resource};
use crate::cluster::rollout::{BadMark, Turn};
use crate::desired::{DesiredContainer, desired_node};
use crate::model::{Observed, RolloutDone, RolloutView, UnhealthyReplica};
use crate::spec::{Etcd, HumanDuration, Rollout, Service, Spec};

/// A service's version as its rollout counts it: the hash of what makes
/// its containers (image, command, environment, ports, digest), without a
/// replica's own address and number, so it is the same on every node.
pub fn rollout_version(container: &DesiredContainer) -> String {
    DesiredContainer {
        address: None,
        replica: None,
        ..container.clone()
    }
    .spec_hash()
}

/// How long (in the whole seconds registrations carry) a canary node's
/// replica must have been registered unhealthy before a waiting worker
/// marks its version bad: one lost probe is not a verdict.
pub const UNHEALTHY_FOR_SECS: u64 = 3;

/// What the rollout lets a node's upgrade of a service do now.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Verdict {
    /// Start, taking a slot as the turn says; `note` says how (for the
    /// change's reason).
    Start {
        /// The turn apply takes.
        turn: Box<Turn>,
        /// How this node takes part, for people.
        note: String,
    },
    /// Not now: why, for the plan's rollout lines.
    Wait(String),
    /// Not at all: why, for the plan's warnings.
    Refuse(String),
    /// Not at all, and mark the version bad: a canary node's replica of it
    /// turned unhealthy.
    Mark(Box<BadMark>),
}

/// What the rollouts did to a plan's changes: their lines and warnings.
#[derive(Debug, Default)]
pub(super) struct Gated {
    /// Services waiting their turn, for the plan's rollout lines.
    pub lines: Vec<String>,
    /// Versions that do not start (marked bad, etcd unread).
    pub warnings: Vec<String>,
}

/// Gives each new routed upgrade of a service with `upgrade.rollout` its
/// turn, or leaves it out of `changes` when the rollout says to wait or
/// refuses its version. An upgrade found in flight that resumes took its
/// turn when it started: it may take any slot again (apply resumes it
/// without one when none is free) and records `done` or `bad`; one that
/// rolls back is left as it is.
pub(super) fn gate(
    spec: &Spec,
    node: &str,
    observed: &Observed,
    changes: Vec<Change>,
) -> (Vec<Change>, Gated) {
    let mut gated = Gated::default();
    let mut kept = Vec::with_capacity(changes.len());
    let mut decided: Vec<(String, Verdict)> = Vec::new();
    for mut change in changes {
        let Operation::UpgradeReplica {
            workload,
            in_flight,
            rollout,
            ..
        } = &mut change.operation
        else {
            kept.push(change);
            continue;
        };
        let Some(settings) = &workload.service.upgrade.rollout else {
            kept.push(change);
            continue;
        };
        let name = workload.service.name.value.clone();
        if let Some(found) = in_flight {
            if found.decision == Decision::Resume {
                let version = rollout_version(&workload.container);
                // It takes a slot again if it can (apply: its own, or a free one).
                let slots = settings.max_parallel.value.max(1);
                *rollout = spec.cluster.as_ref().map(|cluster| {
                    let mut turn = new_turn(&cluster.etcd, node, &name, &version, slots, None);
                    turn.resumed = true;
                    turn
                });
            }
            kept.push(change);
            continue;
        }
        let verdict = match decided.iter().find(|(s, _)| *s == name) {
            Some((_, verdict)) => verdict.clone(),
            None => {
                let version = rollout_version(&workload.container);
                let verdict = verdict(
                    spec,
                    node,
                    &workload.service,
                    settings,
                    &version,
                    observed.rollouts.as_ref(),
                );
                match &verdict {
                    Verdict::Wait(line) => gated.lines.push(line.clone()),
                    Verdict::Refuse(warning) => gated.warnings.push(warning.clone()),
                    Verdict::Mark(mark) => {
                        gated.lines.push(format!(
                            "{name}: version {} does not start: this plan marks it bad: {}",
                            mark.version, mark.reason
                        ));
                        kept.push(mark_change(mark));
                    }
                    Verdict::Start { .. } => {}
                }
                decided.push((name, verdict.clone()));
                verdict
            }
        };
        if let Verdict::Start { turn, note } = verdict {
            *rollout = Some(turn);
            change.reason = format!("{}; {note}", change.reason);
            kept.push(change);
        }
    }
    (kept, gated)
}

/// Marks, for each service, the last change of `changes` that takes a
/// rollout turn: its apply writes `done` and frees the slot.
pub(super) fn mark_last(changes: &mut [Change]) {
    let mut seen: Vec<String> = Vec::new();
    for change in changes.iter_mut().rev() {
        let turn = match &mut change.operation {
            Operation::UpgradeReplica { rollout, .. }
            | Operation::UpgradeReplicas { rollout, .. } => rollout.as_deref_mut(),
            _ => None,
        };
        if let Some(turn) = turn {
            turn.last = !seen.contains(&turn.service);
            seen.push(turn.service.clone());
        }
    }
}

/// The verdict for `node`'s upgrade of `service` to `version` under
/// `settings`, from the rollout keys read (`None`: not read).
fn verdict(
    spec: &Spec,
    node: &str,
    service: &Service,
    settings: &Rollout,
    version: &str,
    view: Option<&RolloutView>,
) -> Verdict {
    let name = &service.name.value;
    let Some(cluster) = &spec.cluster else {
        return Verdict::Refuse(format!(
            "{name}: `rollout` needs the spec's `cluster:`; the upgrade to version {version} does not start"
        ));
    };
    let view = match view {
        Some(view) if view.unreachable.is_none() => view,
        Some(view) => {
            return Verdict::Refuse(format!(
                "etcd could not be read ({}): rollouts pause, so {name}'s upgrade to version {version} does not start until it can",
                view.unreachable.as_deref().unwrap_or("no answer")
            ));
        }
        None => {
            return Verdict::Refuse(format!(
                "the rollout keys in etcd were not read: {name}'s upgrade to version {version} does not start"
            ));
        }
    };
    if let Some(bad) = view
        .bad
        .iter()
        .find(|b| b.service == *name && b.version == version)
    {
        return Verdict::Refuse(format!(
            "version {version} of {name} was marked bad by {}: {}; change the spec to try again",
            bad.node, bad.reason
        ));
    }
    let max = settings.max_parallel.value.max(1);
    let turn = |slots: u32, canary_after: Option<u32>| {
        new_turn(&cluster.etcd, node, name, version, slots, canary_after)
    };
    let slots: Vec<_> = view.slots.iter().filter(|s| s.service == *name).collect();
    if let Some(own) = slots.iter().find(|s| s.node == node) {
        return Verdict::Start {
            turn: turn(max, None),
            note: format!("rollout: this node holds slot {} already", own.slot),
        };
    }
    let others: Vec<String> = slots
        .iter()
        .map(|s| {
            format!(
                "{} (slot {}, to version {} since {})",
                s.node,
                s.slot,
                s.version,
                at(s.since)
            )
        })
        .collect();
    let mut done: Vec<&RolloutDone> = view
        .done
        .iter()
        .filter(|d| d.service == *name && d.version == version && d.node != node)
        .collect();
    done.sort_by_key(|d| (d.since, d.node.clone()));
    if let Some(canary) = &settings.canary {
        let wanted = canary.nodes.value.max(1) as usize;
        let canaries = &done[..done.len().min(wanted)];
        let hold = canary.hold.value.get().as_secs();
        // Both times are whole seconds: one more, so the hold is never cut short.
        let until = (canaries.len() == wanted)
            .then(|| canaries.iter().map(|d| d.since).max().unwrap_or(0))
            .map(|finished| finished.saturating_add(hold).saturating_add(1));
        let canary_nodes: Vec<&str> = canaries.iter().map(|d| d.node.as_str()).collect();
        if let Some(verdict) = unhealthy_canary(spec, name, version, &canary_nodes, until, view) {
            return verdict;
        }
        if done.len() < wanted {
            if !others.is_empty() {
                return Verdict::Wait(format!(
                    "{name}: waits: version {version} is in its canary phase ({} of {wanted} canary nodes done) and canary nodes go one at a time: {} upgrading",
                    done.len(),
                    others.join(", ")
                ));
            }
            return Verdict::Start {
                turn: turn(1, Some(u32::try_from(done.len()).unwrap_or(u32::MAX))),
                note: format!(
                    "rollout: canary node {} of {wanted} for version {version}",
                    done.len() + 1
                ),
            };
        }
        let until = until.unwrap_or(0);
        if view.read_at < until {
            return Verdict::Wait(format!(
                "{name}: waits: version {version} passed its canary nodes ({}); the others start {} after the last finished, at {} (in {})",
                canary_nodes.join(", "),
                canary.hold.value,
                at(until),
                HumanDuration::secs(until - view.read_at)
            ));
        }
    }
    let held = slots.iter().filter(|s| s.slot < max).count();
    if held >= max as usize {
        return Verdict::Wait(format!(
            "{name}: waits: every rollout slot ({max}) is held: {}",
            others.join(", ")
        ));
    }
    Verdict::Start {
        turn: turn(max, None),
        note: format!(
            "rollout: takes one of {max} slots for version {version} ({} nodes done)",
            done.len()
        ),
    }
}

/// The verdict when a replica of `service` at `version` on one of the
/// canary nodes `canaries` (done with it) is registered unhealthy: marks
/// the version bad once it has been so for [`UNHEALTHY_FOR_SECS`], else
/// waits. `hold_until`: when the canary hold ends (`None`: canary nodes
/// are still to come). The registered version is the replica container's
/// spec hash, which this node computes from the spec for the canary node.
fn unhealthy_canary(
    spec: &Spec,
    service: &str,
    version: &str,
    canaries: &[&str],
    hold_until: Option<u64>,
    view: &RolloutView,
) -> Option<Verdict> {
    let of_version = |replica: &&UnhealthyReplica| {
        replica.service == service
            && canaries.contains(&replica.node.as_str())
            && desired_node(spec, &replica.node)
                .services
                .iter()
                .any(|(s, c)| s.name.value == service && c.spec_hash() == replica.version)
    };
    let unhealthy: Vec<&UnhealthyReplica> = view.unhealthy.iter().filter(of_version).collect();
    let settled =
        |r: &&&UnhealthyReplica| view.read_at >= r.since.saturating_add(UNHEALTHY_FOR_SECS);
    if let Some(replica) = unhealthy.iter().find(settled) {
        let Some(cluster) = &spec.cluster else {
            return None;
        };
        let when = match hold_until {
            Some(until) if replica.since >= until => {
                "after the canary hold, while the rollout went on"
            }
            _ => "during the canary hold",
        };
        return Some(Verdict::Mark(Box::new(BadMark {
            etcd: cluster.etcd.value.clone(),
            service: service.to_string(),
            version: version.to_string(),
            node: replica.node.clone(),
            reason: format!(
                "{}'s replica {} of version {version} turned unhealthy {when} (registered unhealthy since {})",
                replica.node,
                replica.address,
                at(replica.since)
            ),
        })));
    }
    unhealthy.first().map(|replica| {
        let by = replica.since.saturating_add(UNHEALTHY_FOR_SECS);
        Verdict::Wait(format!(
            "{service}: waits: canary node {}'s replica {} of version {version} is registered unhealthy since {}; if it still is at {}, the version is marked bad",
            replica.node,
            replica.address,
            at(replica.since),
            at(by)
        ))
    })
}

/// The change that marks `mark`'s version bad in etcd.
fn mark_change(mark: &BadMark) -> Change {
    let field = |name: &str, value: &str| FieldChange {
        name: name.into(),
        old: None,
        new: Some(value.to_string().into()),
    };
    Change {
        action: Action::Create,
        resource: Resource::RolloutBad {
            service: mark.service.clone(),
            version: mark.version.clone(),
        },
        reason: format!(
            "a canary node's replica of version {} turned unhealthy: no other node starts it",
            mark.version
        ),
        fields: vec![field("node", &mark.node), field("reason", &mark.reason)],
        diff: Vec::new(),
        upgrade: None,
        operation: Operation::MarkRolloutBad {
            mark: Box::new(mark.clone()),
        },
    }
}

/// `node`'s turn in the rollout of `service` to `version` from `slots`
/// slots, in the etcd of `etcd`; a canary node's after `canary_after` other
/// nodes were done.
fn new_turn(
    etcd: &Etcd,
    node: &str,
    service: &str,
    version: &str,
    slots: u32,
    canary_after: Option<u32>,
) -> Box<Turn> {
    Box::new(Turn {
        etcd: etcd.clone(),
        service: service.to_string(),
        version: version.to_string(),
        node: node.to_string(),
        slots,
        last: false,
        resumed: false,
        canary_after,
    })
}

/// `seconds` (since the Unix epoch) as a UTC time.
fn at(seconds: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(seconds)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::handshake::tests as handshake;
    use crate::model::{RolloutBad, RolloutSlot, UnhealthyReplica};
    use crate::plan::Plan;

    /// The example: api rolls out (maxParallel 1, one canary node, hold 5m).
    fn spec() -> Spec {
        handshake::spec(&handshake::example())
    }

    /// web-1 runs api at an older version; the rollout keys are `view`.
    fn plan_with(view: Option<RolloutView>) -> Plan {
        let observed = Observed {
            rollouts: view,
            ..handshake::running_old()
        };
        crate::plan::plan(&spec(), "web-1", &observed)
    }

    fn turn_of(plan: &Plan) -> Option<&Turn> {
        plan.changes.iter().find_map(|c| match &c.operation {
            Operation::UpgradeReplica { rollout, .. } => rollout.as_deref(),
            _ => None,
        })
    }

    /// Whether `plan` upgrades anything.
    fn upgrades(plan: &Plan) -> bool {
        plan.changes
            .iter()
            .any(|c| matches!(c.operation, Operation::UpgradeReplica { .. }))
    }

    /// The version web-1 upgrades to, and a view read at `read_at`.
    fn version_and_view(read_at: u64) -> (String, RolloutView) {
        let plan = plan_with(Some(RolloutView::default()));
        let version = turn_of(&plan).expect("a turn").version.clone();
        let view = RolloutView {
            read_at,
            ..RolloutView::default()
        };
        (version, view)
    }

    fn slot(node: &str, version: &str) -> RolloutSlot {
        RolloutSlot {
            service: "api".into(),
            slot: 0,
            node: node.into(),
            version: version.into(),
            since: 900,
        }
    }

    fn done(node: &str, version: &str, since: u64) -> RolloutDone {
        RolloutDone {
            service: "api".into(),
            version: version.into(),
            node: node.into(),
            since,
        }
    }

    #[test]
    fn the_version_is_the_same_on_every_node() {
        let spec = spec();
        let service = &spec.services[0];
        let on = |node: &str| {
            let desired = crate::desired::desired_node(&spec, node);
            let (_, container) = desired
                .services
                .into_iter()
                .find(|(s, _)| s.name == service.name)
                .expect("api runs there");
            (container.spec_hash(), rollout_version(&container))
        };
        let (web1, web2) = (on("web-1"), on("web-2"));
        assert_ne!(web1.0, web2.0, "each replica's own hash has its address");
        assert_eq!(web1.1, web2.1);
    }

    #[test]
    fn with_nothing_in_etcd_the_first_node_is_the_canary() {
        let plan = plan_with(Some(RolloutView::default()));
        let turn = turn_of(&plan).expect("the upgrade takes a turn");
        assert_eq!(turn.slots, 1, "canary nodes go one at a time");
        assert_eq!(
            turn.canary_after,
            Some(0),
            "its slot only while no node is done"
        );
        assert!(turn.last);
        assert_eq!(
            (turn.service.as_str(), turn.node.as_str()),
            ("api", "web-1")
        );
        assert!(
            plan.changes
                .iter()
                .any(|c| c.reason.contains("canary node 1 of 1"))
        );
        assert!(
            plan.rollouts.is_empty() && plan.warnings.is_empty(),
            "{plan:#?}"
        );
    }

    #[test]
    fn a_version_marked_bad_does_not_start() {
        let (version, mut view) = version_and_view(1000);
        view.bad.push(RolloutBad {
            service: "api".into(),
            version: version.clone(),
            node: "web-2".into(),
            reason: "lessnat-api.web-2.next was not healthy after 1m".into(),
            since: 950,
        });
        let plan = plan_with(Some(view));
        assert!(!upgrades(&plan), "{plan:#?}");
        assert_eq!(
            plan.warnings,
            [format!(
                "version {version} of api was marked bad by web-2: lessnat-api.web-2.next was not healthy after 1m; change the spec to try again"
            )]
        );
    }

    #[test]
    fn a_canary_node_upgrading_holds_the_others() {
        let (version, mut view) = version_and_view(1000);
        view.slots.push(slot("web-2", &version));
        let plan = plan_with(Some(view));
        assert!(!upgrades(&plan), "{plan:#?}");
        assert_eq!(plan.rollouts.len(), 1);
        assert!(
            plan.rollouts[0].contains("canary phase (0 of 1 canary nodes done)")
                && plan.rollouts[0].contains("web-2 (slot 0"),
            "{}",
            plan.rollouts[0]
        );
    }

    #[test]
    fn after_the_canary_the_others_wait_for_its_hold() {
        let (version, mut view) = version_and_view(1000);
        view.done.push(done("web-2", &version, 900));
        let plan = plan_with(Some(view.clone()));
        assert!(!upgrades(&plan), "{plan:#?}");
        assert!(
            plan.rollouts[0].contains("passed its canary nodes (web-2)")
                && plan.rollouts[0].contains("(in 3m21s)"),
            "{}",
            plan.rollouts[0]
        );
        // Once the hold has passed: every slot may be taken.
        view.read_at = 900 + 300 + 1;
        let plan = plan_with(Some(view));
        assert_eq!(turn_of(&plan).map(|t| t.slots), Some(1));
        assert!(plan.rollouts.is_empty());
    }

    #[test]
    fn every_slot_held_means_wait_naming_the_holders() {
        let (version, mut view) = version_and_view(10_000);
        view.done.push(done("web-3", &version, 100));
        view.slots.push(slot("web-2", &version));
        let plan = plan_with(Some(view));
        assert!(!upgrades(&plan), "{plan:#?}");
        assert!(
            plan.rollouts[0].contains("every rollout slot (1) is held: web-2 (slot 0"),
            "{}",
            plan.rollouts[0]
        );
    }

    #[test]
    fn a_slot_this_node_holds_is_its_own() {
        let (version, mut view) = version_and_view(1000);
        view.slots.push(slot("web-1", &version));
        let plan = plan_with(Some(view));
        assert!(turn_of(&plan).is_some(), "{plan:#?}");
    }

    #[test]
    fn an_upgrade_found_in_flight_resumes_without_a_slot_and_records_its_end() {
        let spec = spec();
        let desired = crate::desired::desired_node(&spec, "web-1");
        let (_, container) = desired.services.into_iter().next().expect("api");
        let mut observed = Observed {
            rollouts: Some(RolloutView::default()),
            ..handshake::running_old()
        };
        let mut next = observed.containers[0].clone();
        next.name = "lessnat-api.web-1.next".into();
        next.slot = crate::ownership::Slot::Next;
        next.spec_hash = container.spec_hash();
        next.address = Some("10.20.1.254".into());
        observed.containers.push(next);
        // Even with every slot held by another node.
        if let Some(view) = observed.rollouts.as_mut() {
            view.slots.push(slot("web-2", "other"));
        }
        let plan = crate::plan::plan(&spec, "web-1", &observed);
        let turn = turn_of(&plan).expect("the resumed upgrade records its end");
        assert!(turn.resumed && turn.last, "{turn:?}");
        assert_eq!(turn.version, rollout_version(&container));
        assert!(plan.rollouts.is_empty(), "{:?}", plan.rollouts);
    }

    /// web-2's replica of api at `version` registered unhealthy since `since`.
    fn unhealthy_on_web_2(version: &str, since: u64) -> UnhealthyReplica {
        UnhealthyReplica {
            service: "api".into(),
            address: "10.20.2.254".into(),
            node: "web-2".into(),
            version: version.into(),
            since,
        }
    }

    /// The spec hash web-2's replica of api has at the spec's version.
    fn web_2_hash() -> String {
        let spec = spec();
        let desired = desired_node(&spec, "web-2");
        desired.services[0].1.spec_hash()
    }

    /// web-1's plan read at `read_at`, web-2 the canary done at 900 with
    /// its replica of the version registered unhealthy since `since`; and
    /// the version.
    fn with_canary_unhealthy(read_at: u64, since: u64) -> (String, Plan) {
        let (version, mut view) = version_and_view(read_at);
        view.done.push(done("web-2", &version, 900));
        view.unhealthy
            .push(unhealthy_on_web_2(&web_2_hash(), since));
        (version, plan_with(Some(view)))
    }

    /// The marks of `plan`.
    fn marks(plan: &Plan) -> Vec<&BadMark> {
        plan.changes
            .iter()
            .filter_map(|c| match &c.operation {
                Operation::MarkRolloutBad { mark } => Some(mark.as_ref()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_canary_replica_unhealthy_for_a_moment_holds_the_others() {
        let (version, plan) = with_canary_unhealthy(1000, 999);
        assert!(!upgrades(&plan) && marks(&plan).is_empty(), "{plan:#?}");
        assert_eq!(
            plan.rollouts,
            [format!(
                "api: waits: canary node web-2's replica 10.20.2.254 of version {version} is registered unhealthy since 1970-01-01T00:16:39Z; if it still is at 1970-01-01T00:16:42Z, the version is marked bad"
            )]
        );
    }

    #[test]
    fn a_canary_replica_unhealthy_for_long_enough_marks_the_version_bad() {
        let (version, plan) = with_canary_unhealthy(1000, 1000 - UNHEALTHY_FOR_SECS);
        assert!(!upgrades(&plan), "{plan:#?}");
        let reason = format!(
            "web-2's replica 10.20.2.254 of version {version} turned unhealthy during the canary hold (registered unhealthy since 1970-01-01T00:16:37Z)"
        );
        assert_eq!(
            marks(&plan),
            [&BadMark {
                etcd: spec().cluster.expect("cluster").etcd.value,
                service: "api".into(),
                version: version.clone(),
                node: "web-2".into(),
                reason: reason.clone(),
            }]
        );
        assert_eq!(
            plan.rollouts,
            [format!(
                "api: version {version} does not start: this plan marks it bad: {reason}"
            )]
        );
        let text = crate::plan::render::render(&plan, crate::style::Style::Plain);
        assert!(
            text.contains(&format!(
                "# rollout_bad.api.{version} will be created: a canary node's replica of version {version} turned unhealthy: no other node starts it"
            )) && text.contains("+ node   = \"web-2\""),
            "{text}"
        );
        let json = serde_json::to_value(&plan).expect("JSON");
        let op = json["changes"]
            .as_array()
            .and_then(|changes| {
                changes
                    .iter()
                    .map(|c| &c["operation"])
                    .find(|o| o["op"] == "mark-rollout-bad")
            })
            .expect("the mark in the JSON plan");
        assert_eq!(op["mark"]["node"], "web-2", "{op:#}");
        let back: Plan = serde_json::from_value(json).expect("the plan reads back");
        assert_eq!(marks(&back), marks(&plan));
    }

    #[test]
    fn a_canary_replica_turning_unhealthy_after_the_hold_still_counts_until_this_node_is_done() {
        let (_, plan) = with_canary_unhealthy(2000, 1500);
        assert!(!upgrades(&plan), "{plan:#?}");
        assert!(
            marks(&plan)[0]
                .reason
                .contains("turned unhealthy after the canary hold, while the rollout went on"),
            "{plan:#?}"
        );
    }

    #[test]
    fn unhealthy_replicas_of_another_version_or_a_node_not_done_are_not_the_canarys() {
        let (version, mut view) = version_and_view(1000);
        view.done.push(done("web-2", &version, 900));
        // web-2's replica at its old version, and web-3's (done with nothing).
        view.unhealthy.push(unhealthy_on_web_2("sha256:old", 500));
        view.unhealthy.push(UnhealthyReplica {
            node: "web-3".into(),
            ..unhealthy_on_web_2(&web_2_hash(), 500)
        });
        let plan = plan_with(Some(view));
        assert!(marks(&plan).is_empty(), "{plan:#?}");
        assert!(
            plan.rollouts[0].contains("passed its canary nodes (web-2)"),
            "{:?}",
            plan.rollouts
        );
    }

    #[test]
    fn without_etcd_no_rollout_starts() {
        let view = RolloutView::unreachable("no answer within 2s".into(), 1000);
        let plan = plan_with(Some(view));
        assert!(!upgrades(&plan), "{plan:#?}");
        assert!(
            plan.warnings[0]
                .starts_with("etcd could not be read (no answer within 2s): rollouts pause"),
            "{:?}",
            plan.warnings
        );
        let plan = plan_with(None);
        assert!(!upgrades(&plan), "{plan:#?}");
    }
}
