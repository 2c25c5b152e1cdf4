//! Routed mode, `maxParallel`: a node's replicas of a service upgraded in
//! batches that start, switch and drain together; a failure rolls the whole
//! batch back.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use super::super::fake::Health;
use super::routed::{NODE, PRIMARY, client_connection, two_on_one_worker, wired};
use super::{Harness, position};
use crate::apply::ApplyError;
use crate::plan::operation::Operation;

/// `api` with `count` replicas on worker `w` from 10.20.1.5 at `image`,
/// upgraded `max` at a time.
fn replicas(image: &str, count: u32, max: u32) -> String {
    two_on_one_worker(image)
        .replace("count: 2", &format!("count: {count}"))
        .replace(
            "drainTimeout: 10s",
            &format!("drainTimeout: 10s, maxParallel: {max}"),
        )
}

/// The replicas each upgrade change of `plan` moves, as their old addresses.
fn batches(plan: &crate::plan::Plan) -> Vec<Vec<IpAddr>> {
    plan.changes
        .iter()
        .filter_map(|c| match &c.operation {
            Operation::UpgradeReplica { old_at, .. } => Some(vec![*old_at]),
            Operation::UpgradeReplicas { batch, .. } => {
                Some(batch.iter().map(|m| m.old_at).collect())
            }
            _ => None,
        })
        .collect()
}

#[test]
fn max_parallel_groups_a_nodes_replicas_into_batches_in_order() {
    let h = Harness::installed(NODE, &replicas("api:1", 3, 2));
    let plan = h.plan(&replicas("api:2", 3, 2));
    let at = |last: u8| IpAddr::V4(Ipv4Addr::new(10, 20, 1, last));
    assert_eq!(batches(&plan), [vec![at(5), at(7)], vec![at(9)]]);
    let batch = plan
        .changes
        .iter()
        .find(|c| matches!(c.operation, Operation::UpgradeReplicas { .. }))
        .expect("a batch");
    assert_eq!(batch.resource.address(), "service.api[1,2]");
    assert!(
        batch.reason.contains(
            "2 replicas at once (maxParallel 2): 10.20.1.5 to 10.20.1.6, 10.20.1.7 to 10.20.1.8"
        ),
        "{}",
        batch.reason
    );

    let one_at_a_time = h.plan(&replicas("api:2", 3, 1));
    assert_eq!(
        batches(&one_at_a_time),
        [vec![at(5)], vec![at(7)], vec![at(9)]]
    );
}

#[test]
fn a_batch_starts_every_next_version_then_switches_and_drains_them_together() {
    let h = Harness::installed(NODE, &replicas("api:1", 2, 2));
    for old in [5, 7] {
        // Each old replica has a client connection that closes at its third read.
        h.fake.set_flows_to(
            IpAddr::V4(Ipv4Addr::new(10, 20, 1, old)),
            vec![
                vec![client_connection(true)],
                vec![client_connection(true)],
                vec![client_connection(false)],
            ],
        );
    }
    let spec = replicas("api:2", 2, 2);
    h.apply(&spec).expect("upgrades both");
    let changes = h.fake.calls();
    let at = |call: &str| position(&changes, call);
    assert!(
        at("wire api at 10.20.1.8") < at("read flows to 10.20.1.5"),
        "both next versions run before the drain: {changes:#?}"
    );
    assert!(
        at("read flows to 10.20.1.7") < at("stop lessnat-api.w"),
        "both drain before either old one goes: {changes:#?}"
    );
    // One switchWait (1 s) and one drain for both: polls every 0.5 s until
    // 2 s after the connections were last seen open (at 1.5 s).
    assert_eq!(h.fake.elapsed(), Duration::from_millis(3_500));
    assert_eq!(h.fake.container_names(), [PRIMARY, "lessnat-api.w.2"]);
    assert_eq!(wired(&h), ["10.20.1.6", "10.20.1.8"]);
    assert!(h.plan(&spec).changes.is_empty(), "nothing left to do");
}

#[test]
fn a_failure_in_a_batch_rolls_back_every_replica_of_it() {
    let h = Harness::installed(NODE, &replicas("api:1", 2, 2));
    h.fake.set_health("lessnat-api.w.2.next", Health::Never);
    let result = h.apply(&replicas("api:2", 2, 2));
    assert!(
        matches!(result, Err(ApplyError::RolledBack { .. })),
        "{result:?}"
    );
    let changes = h.changes();
    assert!(
        changes.contains(&"remove lessnat-api.w.next".to_string()),
        "the first replica's next version goes too: {changes:#?}"
    );
    assert!(
        !changes.iter().any(|c| c.starts_with("rename")),
        "{changes:#?}"
    );
    assert_eq!(h.fake.container_names(), [PRIMARY, "lessnat-api.w.2"]);
    assert_eq!(wired(&h), ["10.20.1.5", "10.20.1.7"], "the old ones serve");
}

#[test]
fn a_batch_found_in_flight_resumes_together() {
    let h = Harness::installed(NODE, &replicas("api:1", 2, 2));
    // Paused with both next versions started: the second is not healthy
    // within its startTimeout; it is once the run is paused (a count of
    // checks would depend on how many the loaded machine fits in the
    // timeout).
    h.fake.set_health("lessnat-api.w.2.next", Health::Never);
    let spec =
        replicas("api:2", 2, 2).replace("maxParallel: 2", "maxParallel: 2, onFailure: pause");
    let paused = h.apply(&spec);
    assert!(
        matches!(paused, Err(ApplyError::Paused { .. })),
        "{paused:?}"
    );
    h.fake
        .rescript_health("lessnat-api.w.2.next", Health::After(0));
    let plan = h.plan(&spec);
    assert_eq!(
        batches(&plan),
        [vec![
            Ipv4Addr::new(10, 20, 1, 5),
            Ipv4Addr::new(10, 20, 1, 7)
        ]]
    );
    h.apply_plan(&plan).expect("resumes both");
    assert_eq!(wired(&h), ["10.20.1.6", "10.20.1.8"]);
    assert!(h.plan(&spec).changes.is_empty(), "nothing left to do");
}
