//! Routed mode: canaries. The worker splits the new connections that reach
//! the old replica (a share on to the next one) for the hold, then promotes
//! the canary by dropping the load-balancer nodes' probes of the old replica
//! (they switch on their own next apply), or ends the split and drains the
//! next replica before it goes. Load-balancer nodes keep sending to the old
//! replica while it answers their probes.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use super::super::fake::{At, Health};
use super::canary::ask;
use super::routed::{ADDRESS, NEXT, NODE, PRIMARY, api, assert_serves, client_connection};
use super::{Harness, only_operation, position};
use crate::apply::ApplyError;
use crate::model::nft_text::render_table;
use crate::plan::StageName;
use crate::plan::operation::Operation;

const NEXT_AT: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 20, 1, 254));
/// The split set.
const SPLIT: &str =
    "replace rules -lessnat canary api 10.20.1.5 -lessnat canary api 10.20.1.5 promoted +1";
/// The split and the promotion set.
const PROMOTE: &str =
    "replace rules -lessnat canary api 10.20.1.5 -lessnat canary api 10.20.1.5 promoted +2";
/// Both ended.
const END: &str =
    "replace rules -lessnat canary api 10.20.1.5 -lessnat canary api 10.20.1.5 promoted +0";

/// Api at `image` with a canary of `canary` (the inside of a flow mapping).
fn with_canary(image: &str, canary: &str) -> String {
    api(
        image,
        &format!("switchWait: 1s, drainTimeout: 10s, canary: {{{canary}}}"),
    )
}

/// Api 1 installed with a canary in its spec (so its table has the chain).
fn installed() -> Harness {
    Harness::installed(NODE, &with_canary("api:1", "weight: 10%, hold: 1s"))
}

/// lessnat's table on the fake host, as `nft list` prints it.
fn table_text(h: &Harness) -> String {
    h.fake.table().map(|t| render_table(&t)).unwrap_or_default()
}

#[test]
fn the_split_holds_then_the_canary_is_promoted_by_silencing_the_old_replica_for_lbs() {
    let h = installed();
    let spec = with_canary("api:2", "weight: 10%, hold: 3s");
    let plan = h.plan(&spec);
    let Operation::UpgradeReplica {
        canary: Some(canary),
        ..
    } = only_operation(&plan)
    else {
        panic!("expected a routed upgrade with a canary: {plan:#?}");
    };
    let split = render_table(&canary.split.table);
    assert!(
        split.contains("ip daddr 10.20.1.5 ip saddr != 192.0.2.2 numgen random mod 100 < 10 dnat ip to 10.20.1.254"),
        "{split}"
    );
    let promoted = render_table(&canary.promoted_table);
    assert!(
        promoted.contains("ip saddr 192.0.2.2 ip daddr 10.20.1.5 ct state new drop"),
        "{promoted}"
    );
    let stages: Vec<StageName> = plan
        .changes
        .iter()
        .flat_map(|c| c.upgrade.iter().flat_map(|u| &u.stages))
        .map(|s| s.name)
        .collect();
    assert_eq!(
        stages,
        [
            StageName::StartNext,
            StageName::Canary,
            StageName::Switch,
            StageName::Drain,
            StageName::Finish
        ]
    );

    h.apply_plan(&plan).expect("upgrades");
    let changes: Vec<String> = h
        .changes()
        .into_iter()
        .filter(|c| !c.starts_with("read flows"))
        .collect();
    assert_eq!(
        changes,
        [
            "create lessnat-api.w.next",
            "start lessnat-api.w.next",
            "wire api at 10.20.1.254",
            SPLIT,
            PROMOTE,
            "stop lessnat-api.w",
            "remove lessnat-api.w",
            "rename lessnat-api.w.next lessnat-api.w",
            "keep_running lessnat-api.w",
            END,
        ]
    );
    // The hold (3 s), switchWait (1 s), then 2 s without a connection.
    assert!(
        h.fake.elapsed() >= Duration::from_secs(6),
        "{:?}",
        h.fake.elapsed()
    );
    assert!(!table_text(&h).contains("lessnat canary"), "rules ended");
    assert_serves(&h, "api:2", NEXT_AT);
    assert!(h.journal().upgrades.is_empty(), "the hold is forgotten");
    assert!(h.plan(&spec).changes.is_empty(), "nothing left to do");
}

#[test]
fn an_aborted_canary_ends_the_split_drains_the_next_replica_and_removes_it() {
    let h = installed();
    let before = h.fake.container(PRIMARY);
    // The next replica has a connection the split sent it; it closes at the third read.
    h.fake.set_flows_to(
        NEXT_AT,
        vec![
            vec![client_connection(true)],
            vec![client_connection(true)],
            vec![client_connection(false)],
        ],
    );
    h.fake.at_probe(4, ask(h.state_dir.path(), "abort"));
    let result = h.apply(&with_canary("api:2", "weight: 10%, hold: 1m"));
    assert!(
        matches!(&result, Err(ApplyError::RolledBack { cause, .. }) if matches!(**cause, ApplyError::CanaryAborted { .. })),
        "{result:?}"
    );
    let changes = h.fake.calls();
    let at = |call: &str| position(&changes, call);
    assert!(at(SPLIT) < at(END), "{changes:#?}");
    assert!(at(END) < at("read flows to 10.20.1.254"), "{changes:#?}");
    assert!(
        at("read flows to 10.20.1.254") < at("stop lessnat-api.w.next"),
        "the next replica drains before it goes: {changes:#?}"
    );
    assert!(!changes.contains(&PROMOTE.to_string()), "{changes:#?}");
    assert_eq!(
        h.fake.container(PRIMARY),
        before,
        "the old one is untouched"
    );
    assert_serves(&h, "api:1", ADDRESS);
    assert!(!table_text(&h).contains("lessnat canary"));
    assert!(h.journal().upgrades.is_empty());
}

#[test]
fn a_canary_that_sickens_rolls_back_even_with_on_failure_pause() {
    let h = installed();
    h.fake.set_health(NEXT, Health::Sickens { after: 2 });
    let result = h.apply(
        &with_canary("api:2", "weight: 10%, hold: 1m, unhealthyAfter: 2")
            .replace("switchWait: 1s", "switchWait: 1s, onFailure: pause"),
    );
    assert!(
        matches!(&result, Err(ApplyError::RolledBack { cause, .. }) if matches!(**cause, ApplyError::CanaryUnhealthy { .. })),
        "{result:?}"
    );
    assert_eq!(h.fake.container_names(), [PRIMARY]);
    assert_serves(&h, "api:1", ADDRESS);
}

#[test]
fn promote_requested_ends_the_hold_early() {
    let h = installed();
    h.fake.at_probe(4, ask(h.state_dir.path(), "promote"));
    h.apply(&with_canary("api:2", "weight: 10%, hold: 1h"))
        .expect("promoted");
    assert!(
        h.fake.elapsed() < Duration::from_secs(60),
        "{:?}",
        h.fake.elapsed()
    );
    assert_serves(&h, "api:2", NEXT_AT);
}

#[test]
fn the_table_deleted_during_the_hold_is_restored_with_the_split() {
    let h = installed();
    h.fake.delete_table_at(At::Probe(4));
    let spec = with_canary("api:2", "weight: 10%, hold: 2s");
    let plan = h.plan(&spec);
    let summary = h.apply_summary(&plan).expect("upgrades");
    assert!(summary.table_restores >= 1, "{summary:?}");
    let calls = h.fake.calls();
    let deleted = calls
        .iter()
        .position(|c| c == "foreign: delete table")
        .expect("deleted");
    assert!(
        calls[deleted..]
            .iter()
            .any(|c| c.starts_with("restore table")),
        "written back: {calls:#?}"
    );
    assert_serves(&h, "api:2", NEXT_AT);
}

#[test]
fn a_canary_found_promoted_goes_on_from_the_switch() {
    let h = installed();
    let spec = with_canary("api:2", "weight: 10%, hold: 2s");
    // The old replica cannot be stopped: the apply fails after the
    // promotion, leaving both replicas and the promotion's rules.
    h.fake.fail("stop lessnat-api.w", 1);
    let failed = h.apply(&spec);
    assert!(failed.is_err(), "{failed:?}");
    assert!(table_text(&h).contains("promoted"), "{}", table_text(&h));

    let plan = h.plan(&spec);
    let Operation::UpgradeReplica {
        canary: Some(canary),
        in_flight: Some(_),
        ..
    } = only_operation(&plan)
    else {
        panic!("expected the upgrade in flight with its canary: {plan:#?}");
    };
    assert!(canary.promoted, "{plan:#?}");
    h.fake.clear_calls();
    let started = h.fake.elapsed();
    h.apply_plan(&plan).expect("resumes");
    assert!(
        !h.changes().contains(&SPLIT.to_string()),
        "no second hold: {:#?}",
        h.changes()
    );
    assert!(h.fake.elapsed() - started < Duration::from_secs(5));
    assert!(!table_text(&h).contains("lessnat canary"));
    assert_serves(&h, "api:2", NEXT_AT);
}

/// Plans `spec` on load-balancer node `lb` as observed with the replica
/// answering at 10.20.1.5 (`old`) and 10.20.1.254 (`next`).
fn lb_plan(h: &Harness, spec: &str, old: bool, next: bool) -> crate::plan::Plan {
    let spec = crate::spec::load_bytes("spec.yaml", spec.as_bytes())
        .unwrap_or_else(|r| panic!("{}", r.render(crate::style::Style::Plain)));
    let mut observed = h.fake.observed("lb");
    observed.probed_at = Some(1_796_000_000);
    for (address, healthy) in [("10.20.1.5", old), ("10.20.1.254", next)] {
        observed.probes.push(crate::model::Probe {
            service: "api".into(),
            address: address.into(),
            healthy,
            detail: None,
        });
    }
    crate::plan::plan(&spec, "lb", &observed)
}

#[test]
fn load_balancers_stay_on_the_old_replica_until_the_worker_silences_it() {
    let h = Harness::new("lb");
    let v1 = with_canary("api:1", "weight: 10%, hold: 1m");
    h.apply_plan(&lb_plan(&h, &v1, true, false))
        .expect("the load-balancer node applies");
    let v2 = with_canary("api:2", "weight: 10%, hold: 1m");

    let holding = lb_plan(&h, &v2, true, true);
    assert!(holding.changes.is_empty(), "{holding:#?}");
    assert_eq!(
        holding.load_balancing,
        [
            "api on w (10.20.1.5): canary: new connections stay here while the worker sends a share of them on to 10.20.1.254; they move there once the worker promotes it (10.20.1.5 stops answering this node's probes)"
        ]
    );

    let promoted = lb_plan(&h, &v2, false, true);
    let Some(Operation::WriteTable { switches, .. }) =
        promoted.changes.first().map(|c| &c.operation)
    else {
        panic!("expected a switch: {promoted:#?}");
    };
    assert_eq!(
        switches.iter().map(ToString::to_string).collect::<Vec<_>>(),
        [
            "api on w: new connections go to 10.20.1.254 instead of 10.20.1.5 (the canary was promoted: the old version stopped answering and the next one answers there)"
        ]
    );

    // Without a canary the next version takes over as soon as it answers.
    let plain = lb_plan(&h, &api("api:2", ""), true, true);
    assert!(
        matches!(plain.changes.first().map(|c| &c.operation), Some(Operation::WriteTable { switches, .. }) if switches.len() == 1),
        "{plain:#?}"
    );
}

#[test]
fn a_batch_holds_one_canary_for_all_its_replicas() {
    let spec = |image: &str| {
        super::routed::two_on_one_worker(image).replace(
            "drainTimeout: 10s",
            "drainTimeout: 10s, maxParallel: 2, canary: {weight: 10%, hold: 2s}",
        )
    };
    let h = Harness::installed(NODE, &spec("api:1"));
    let plan = h.plan(&spec("api:2"));
    let Operation::UpgradeReplicas {
        batch,
        canary: Some(canary),
        ..
    } = only_operation(&plan)
    else {
        panic!("expected a batch with a canary: {plan:#?}");
    };
    assert_eq!(batch.len(), 2);
    let split = render_table(&canary.split.table);
    for (old, next) in [("10.20.1.5", "10.20.1.6"), ("10.20.1.7", "10.20.1.8")] {
        assert!(
            split.contains(&format!(
                "ip daddr {old} ip saddr != 192.0.2.2 numgen random mod 100 < 10 dnat ip to {next}"
            )),
            "{split}"
        );
    }
    assert_eq!(canary.promote.len(), 2);
    h.apply_plan(&plan).expect("upgrades both");
    let replaced: Vec<String> = h
        .changes()
        .into_iter()
        .filter(|c| c.starts_with("replace rules"))
        .map(|c| c.rsplit(' ').next().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        replaced,
        ["+2", "+4", "+0"],
        "one split, one promotion, one end"
    );
    assert_eq!(super::routed::wired(&h), ["10.20.1.6", "10.20.1.8"]);
    assert!(!table_text(&h).contains("lessnat canary"));
}

#[test]
fn an_interrupt_during_the_hold_rolls_back_after_the_canarys_connections() {
    let h = installed();
    // The split sent the next replica a connection; it closes at the third read.
    h.fake.set_flows_to(
        NEXT_AT,
        vec![
            vec![client_connection(true)],
            vec![client_connection(true)],
            vec![client_connection(false)],
        ],
    );
    h.fake.interrupt_at_probe(4);
    let result = h.apply(&with_canary("api:2", "weight: 10%, hold: 1m"));
    assert!(
        matches!(&result, Err(ApplyError::RolledBack { cause, .. }) if matches!(**cause, ApplyError::Interrupted)),
        "{result:?}"
    );
    let calls = h.fake.calls();
    assert!(
        position(&calls, END) < position(&calls, "stop lessnat-api.w.next"),
        "{calls:#?}"
    );
    assert!(
        calls
            .iter()
            .filter(|c| *c == "read flows to 10.20.1.254")
            .count()
            >= 3,
        "the rollback waited for the connection: {calls:#?}"
    );
    assert_serves(&h, "api:1", ADDRESS);
}
