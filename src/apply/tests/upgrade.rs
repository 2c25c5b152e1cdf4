//! Host mode: redirect-drain upgrades (new, failed, paused, interrupted,
//! found in flight) and stop-start.

use super::super::fake::{At, Health};
use super::{Harness, only_operation};
use crate::apply::ApplyError;
use crate::model::{ConntrackState, FlowCount};
use crate::plan::operation::Operation;
use crate::plan::{Decision, Plan, StageName};

pub(super) const NODE: &str = "a";
pub(super) const PRIMARY: &str = "lessnat-web.a";
pub(super) const NEXT: &str = "lessnat-web.a.next";
pub(super) const PREV: &str = "lessnat-web.a.prev";

// The calls of each stage, as the fake host logs them.
pub(super) const START_NEXT: [&str; 2] = ["create lessnat-web.a.next", "start lessnat-web.a.next"];
pub(super) const REDIRECT: &str = "add redirect 8000/tcp -> 18000";
pub(super) const UNREDIRECT: &str = "remove redirect 8000/tcp -> 18000";
pub(super) const POLL: &str = "read conntrack";
/// Stop the old primary and keep it as prev.
pub(super) const SET_ASIDE: [&str; 2] = [
    "stop lessnat-web.a",
    "rename lessnat-web.a lessnat-web.a.prev",
];
/// Create and start the new primary.
pub(super) const START_PRIMARY: [&str; 2] = ["create lessnat-web.a", "start lessnat-web.a"];
pub(super) const KEEP: &str = "keep_running lessnat-web.a";
/// Rollback: the new primary goes, prev comes back and is kept running.
pub(super) const RESTORE: [&str; 5] = [
    "stop lessnat-web.a",
    "remove lessnat-web.a",
    "rename lessnat-web.a.prev lessnat-web.a",
    "start lessnat-web.a",
    "keep_running lessnat-web.a",
];
pub(super) const REMOVE_NEXT: [&str; 2] = ["stop lessnat-web.a.next", "remove lessnat-web.a.next"];
pub(super) const REMOVE_PREV: [&str; 2] = ["stop lessnat-web.a.prev", "remove lessnat-web.a.prev"];
/// Someone else deletes lessnat's table; apply writes it again.
pub(super) const DELETED: &str = "foreign: delete table";
pub(super) const RESTORED: &str = "restore table";

/// The calls of `runs`, one after the other.
pub(super) fn calls(runs: &[&[&str]]) -> Vec<String> {
    runs.concat().into_iter().map(str::to_string).collect()
}

/// The service `web` on node `a` at `image`, with `upgrade` settings (the
/// inside of a YAML flow mapping). Health checks every millisecond and gives
/// up after 50 ms; drains run on the fake host's virtual clock.
pub(super) fn web(image: &str, upgrade: &str) -> String {
    format!(
        r#"version: 1
nodes: [{{name: a, address: 192.0.2.1}}]
services:
  - name: web
    node: a
    image: {image}
    command: ["-listen=:{{port}}"]
    ports: [{{name: http, port: 8000, tempPort: 18000}}]
    health: {{tcp: {{}}, interval: 1ms, healthyAfter: 1, startTimeout: 50ms}}
    upgrade: {{{upgrade}}}
"#
    )
}

/// Conntrack with `old` open connections answered by the old version (from
/// port 8000) and `next` by the next one (from its temporary port 18000).
pub(super) fn connections(old: u64, next: u64) -> ConntrackState {
    let flow = |reply_sport, count| FlowCount {
        protocol: "tcp".into(),
        orig_dport: 8000,
        reply_sport,
        state: "ESTABLISHED".into(),
        count,
    };
    ConntrackState {
        available: true,
        flows: [flow(8000, old), flow(18000, next)]
            .into_iter()
            .filter(|f| f.count > 0)
            .collect(),
        ..ConntrackState::default()
    }
}

/// Web 1 installed and serving.
pub(super) fn installed() -> Harness {
    Harness::installed(NODE, &web("web:1", ""))
}

/// Asserts that the old version serves alone again, as a rollback leaves it.
pub(super) fn assert_old_version_serves(h: &Harness) {
    h.assert_only(PRIMARY, "web:1");
    assert!(h.fake.redirects().is_empty());
    assert!(h.journal().upgrades.is_empty(), "{:?}", h.journal());
}

/// Asserts that the new version serves alone, as a finished upgrade leaves it.
pub(super) fn assert_new_version_serves(h: &Harness, spec: &str) {
    let primary = h.assert_only(PRIMARY, "web:2");
    assert_eq!(primary.spec.command, ["-listen=:8000"]);
    assert!(h.fake.redirects().is_empty());
    assert!(h.journal().upgrades.is_empty(), "{:?}", h.journal());
    let left = h.plan(spec);
    assert!(left.changes.is_empty(), "nothing left to do: {left:#?}");
}

/// Asserts that `plan` finishes (`Resume`) or rolls back the upgrade found
/// after stage `reached`.
pub(super) fn assert_in_flight(plan: &Plan, reached: StageName, decision: Decision) {
    let found = match only_operation(plan) {
        Operation::Upgrade { in_flight, .. } => in_flight.as_ref(),
        other => panic!("expected an upgrade, got {other:#?}"),
    };
    assert!(
        found.is_some_and(|f| f.reached == reached && f.decision == decision),
        "{found:?}"
    );
}

/// The cause of a rolled-back upgrade.
pub(super) fn rolled_back(result: Result<(), ApplyError>) -> String {
    match result {
        Err(ApplyError::RolledBack { cause, .. }) => crate::error::chain(cause.as_ref()),
        other => panic!("expected a rollback, got {other:?}"),
    }
}

#[test]
fn upgrade_starts_next_redirects_drains_swaps_and_cleans_up() {
    let h = installed();
    // The old version's connections end after three reads, the next one's after two more.
    h.fake.set_conntrack(vec![
        connections(3, 0),
        connections(1, 1),
        connections(0, 2),
        connections(0, 1),
        connections(0, 0),
    ]);
    let spec = web("web:2", "drainTimeout: 1m");
    let plan = h.plan(&spec);
    assert!(
        matches!(
            only_operation(&plan),
            Operation::Upgrade {
                in_flight: None,
                from: Some(_),
                ..
            }
        ),
        "{plan:#?}"
    );
    h.apply_plan(&plan).expect("upgrades");
    assert_eq!(
        h.changes(),
        calls(&[
            &START_NEXT,
            &[REDIRECT],
            &[POLL; 3],
            &SET_ASIDE,
            &START_PRIMARY,
            &[KEEP, UNREDIRECT],
            &[POLL; 2],
            &REMOVE_NEXT,
            &REMOVE_PREV,
        ])
    );
    // Each version is healthy on its own port before traffic goes to it.
    h.assert_before("probe 127.0.0.1:18000", REDIRECT);
    h.assert_before("probe 127.0.0.1:8000", UNREDIRECT);
    assert_new_version_serves(&h, &spec);
}

#[test]
fn next_never_healthy_rolls_back_before_any_redirect() {
    let h = installed();
    let before = h.fake.container(PRIMARY);
    h.fake.set_health(NEXT, Health::Never);
    let cause = rolled_back(h.apply(&web("web:2", "")));
    assert!(cause.contains("was not healthy after"), "{cause}");
    assert_eq!(
        h.changes(),
        calls(&[&START_NEXT, &[UNREDIRECT, POLL], &REMOVE_NEXT])
    );
    assert_eq!(
        h.fake.container(PRIMARY),
        before,
        "the old primary is untouched"
    );
    assert_old_version_serves(&h);
}

#[test]
fn next_that_exits_while_waited_for_rolls_back_with_its_exit_code_and_logs() {
    let h = installed();
    h.fake.set_health(NEXT, Health::Exits { after: 2, code: 3 });
    let cause = rolled_back(h.apply(&web("web:2", "")));
    assert!(cause.contains("exited (code 3)"), "{cause}");
    assert!(
        cause.contains("lessnat-web.a.next exited with Some(3)"),
        "{cause}"
    );
    assert!(!h.changes().iter().any(|c| c == REDIRECT));
    assert_old_version_serves(&h);
}

#[test]
fn failed_create_of_next_rolls_back_and_leaves_nothing() {
    let h = installed();
    h.fake.fail("create lessnat-web.a.next", 1);
    let cause = rolled_back(h.apply(&web("web:2", "")));
    assert!(cause.contains("injected failure"), "{cause}");
    assert_eq!(h.changes(), [START_NEXT[0], UNREDIRECT]);
    assert_old_version_serves(&h);
}

#[test]
fn drain_timeout_with_rollback_removes_redirect_and_next() {
    let h = installed();
    let before = h.fake.container(PRIMARY);
    h.fake.set_conntrack(vec![connections(2, 0)]);
    let cause = rolled_back(h.apply(&web("web:2", "drainTimeout: 2s, onDrainTimeout: rollback")));
    assert!(
        cause.contains("2 connections still open after drainTimeout"),
        "{cause}"
    );
    assert_eq!(
        h.changes(),
        calls(&[
            &START_NEXT,
            &[REDIRECT],
            // Polls at 0, 0.5, 1, 1.5 and 2 s (virtual): then the timeout.
            &[POLL; 5],
            &[UNREDIRECT, POLL],
            &REMOVE_NEXT,
        ])
    );
    assert_eq!(
        h.fake.container(PRIMARY),
        before,
        "the old primary still serves"
    );
    assert_old_version_serves(&h);
}

#[test]
fn drain_timeout_with_proceed_goes_on() {
    let h = installed();
    h.fake.set_conntrack(vec![connections(2, 0)]);
    let spec = web("web:2", "drainTimeout: 2s, onDrainTimeout: proceed");
    h.apply(&spec).expect("proceeds after the drain timeout");
    assert_eq!(
        h.changes(),
        calls(&[
            &START_NEXT,
            &[REDIRECT],
            &[POLL; 5],
            &SET_ASIDE,
            &START_PRIMARY,
            &[KEEP, UNREDIRECT, POLL],
            &REMOVE_NEXT,
            &REMOVE_PREV,
        ])
    );
    assert_new_version_serves(&h, &spec);
}

#[test]
fn new_primary_never_healthy_at_swap_restores_prev() {
    let h = installed();
    // The primary made at the swap; the installed one keeps answering.
    h.fake.set_health(PRIMARY, Health::Never);
    let cause = rolled_back(h.apply(&web("web:2", "")));
    assert!(cause.contains("lessnat-web.a was not healthy"), "{cause}");
    assert_eq!(
        h.changes(),
        calls(&[
            &START_NEXT,
            &[REDIRECT, POLL],
            &SET_ASIDE,
            &START_PRIMARY,
            // Rollback: prev is back and healthy before the redirect goes.
            &RESTORE,
            &[UNREDIRECT, POLL],
            &REMOVE_NEXT,
        ])
    );
    assert_old_version_serves(&h);
}

#[test]
fn on_failure_pause_leaves_the_host_and_the_journal_as_they_are() {
    let h = installed();
    h.fake.set_health(PRIMARY, Health::Never);
    let result = h.apply(&web("web:2", "onFailure: pause"));
    assert!(
        matches!(result, Err(ApplyError::Paused { stage: "swap", .. })),
        "{result:?}"
    );
    assert_eq!(
        h.changes(),
        calls(&[&START_NEXT, &[REDIRECT, POLL], &SET_ASIDE, &START_PRIMARY]),
        "nothing changes after the failure"
    );
    assert_eq!(h.fake.container_names(), [PRIMARY, NEXT, PREV]);
    assert_eq!(
        h.fake.container(PRIMARY).expect("primary").spec.image,
        "web:2"
    );
    assert_eq!(h.fake.redirects().len(), 1, "the redirect stays");
    let journal = h.journal();
    let record = &journal.upgrades["web"];
    assert_eq!(record.reached, Some(StageName::Drain));
    assert!(!record.rolling_back);
    assert_eq!(record.from_image, "web:1");
}

#[test]
fn upgrade_found_after_swap_resumes_where_it_stopped() {
    let h = installed();
    // The unredirect fails once: apply stops after the swap (too late to roll back).
    h.fake.fail("remove redirect 8000/tcp -> 18000", 1);
    let spec = web("web:2", "");
    let result = h.apply(&spec);
    assert!(matches!(result, Err(ApplyError::Nft(_))), "{result:?}");
    assert_eq!(h.fake.container_names(), [PRIMARY, NEXT, PREV]);
    assert_eq!(h.journal().upgrades["web"].reached, Some(StageName::Swap));
    h.fake.clear_calls();

    let plan = h.plan(&spec);
    assert_in_flight(&plan, StageName::Swap, Decision::Resume);
    h.apply_plan(&plan).expect("resumes");
    assert_eq!(
        h.changes(),
        calls(&[&[KEEP, UNREDIRECT, POLL], &REMOVE_NEXT, &REMOVE_PREV])
    );
    h.assert_before("probe 127.0.0.1:8000", UNREDIRECT);
    assert_new_version_serves(&h, &spec);
}

#[test]
fn upgrade_found_after_redirect_checks_next_then_resumes() {
    let h = installed();
    // Paused in the drain: next runs, the redirect is in place.
    h.fake.set_conntrack(vec![connections(1, 0)]);
    let result = h.apply(&web(
        "web:2",
        "drainTimeout: 1s, onDrainTimeout: rollback, onFailure: pause",
    ));
    assert!(
        matches!(result, Err(ApplyError::Paused { stage: "drain", .. })),
        "{result:?}"
    );
    assert_eq!(
        h.journal().upgrades["web"].reached,
        Some(StageName::Redirect)
    );
    h.fake.set_conntrack(vec![connections(0, 0)]);
    h.fake.clear_calls();

    let spec = web("web:2", "");
    let plan = h.plan(&spec);
    assert_in_flight(&plan, StageName::Redirect, Decision::Resume);
    h.apply_plan(&plan).expect("resumes");
    assert_eq!(
        h.changes(),
        calls(&[
            &[POLL],
            &SET_ASIDE,
            &START_PRIMARY,
            &[KEEP, UNREDIRECT, POLL],
            &REMOVE_NEXT,
            &REMOVE_PREV,
        ])
    );
    // The next container is checked again before the drain goes on.
    h.assert_before("probe 127.0.0.1:18000", POLL);
    assert_new_version_serves(&h, &spec);
}

#[test]
fn upgrade_found_in_the_swap_rolls_back_when_the_spec_changed() {
    let h = installed();
    // Paused in the swap: the old primary is prev, no new primary yet.
    h.fake.fail("create lessnat-web.a", 1);
    let result = h.apply(&web("web:2", "onFailure: pause"));
    assert!(
        matches!(result, Err(ApplyError::Paused { stage: "swap", .. })),
        "{result:?}"
    );
    assert_eq!(h.fake.container_names(), [NEXT, PREV]);
    h.fake.clear_calls();

    let spec = web("web:3", "");
    let plan = h.plan(&spec);
    assert_in_flight(&plan, StageName::Drain, Decision::RollBack);
    h.apply_plan(&plan).expect("a planned rollback succeeds");
    assert_eq!(
        h.changes(),
        calls(&[&RESTORE[2..], &[UNREDIRECT, POLL], &REMOVE_NEXT])
    );
    assert_old_version_serves(&h);
    assert!(
        matches!(
            only_operation(&h.plan(&spec)),
            Operation::Upgrade {
                in_flight: None,
                ..
            }
        ),
        "then a new upgrade to web:3 is planned"
    );
}

#[test]
fn interrupt_during_drain_rolls_back_to_the_end() {
    let h = installed();
    // SIGINT arrives at the second poll; the next container's connections
    // take three more polls to end, and the rollback waits for them.
    h.fake.set_conntrack(vec![
        connections(1, 1),
        connections(1, 1),
        connections(0, 1),
        connections(0, 1),
        connections(0, 0),
    ]);
    h.fake.interrupt_at_read(2);
    let cause = rolled_back(h.apply(&web("web:2", "")));
    assert_eq!(cause, "interrupted");
    assert_eq!(
        h.changes(),
        calls(&[
            &START_NEXT,
            &[REDIRECT, POLL, POLL, UNREDIRECT],
            &[POLL; 3],
            &REMOVE_NEXT,
        ])
    );
    assert!(h.fake.interrupt.load(std::sync::atomic::Ordering::SeqCst));
    assert_old_version_serves(&h);
}

#[test]
fn stop_start_replaces_the_primary() {
    let h = installed();
    let spec = web("web:2", "strategy: stop-start");
    let plan = h.plan(&spec);
    assert!(
        matches!(only_operation(&plan), Operation::StopStart { .. }),
        "{plan:#?}"
    );
    h.apply_plan(&plan).expect("stop-start");
    assert_eq!(
        h.changes(),
        calls(&[&SET_ASIDE, &START_PRIMARY, &[KEEP], &REMOVE_PREV])
    );
    assert_new_version_serves(&h, &spec);
}

#[test]
fn stop_start_that_fails_restores_the_old_primary() {
    let h = installed();
    h.fake.set_health(PRIMARY, Health::Never);
    let cause = rolled_back(h.apply(&web("web:2", "strategy: stop-start")));
    assert!(cause.contains("not healthy"), "{cause}");
    assert_eq!(
        h.changes(),
        calls(&[&SET_ASIDE, &START_PRIMARY, &RESTORE, &[UNREDIRECT]])
    );
    assert_old_version_serves(&h);
}

#[test]
fn table_deleted_during_the_drain_is_restored_in_the_same_poll() {
    let h = installed();
    // Deleted at the second poll; two clients reach the old version directly
    // before the third, and the drain waits for them.
    h.fake.set_conntrack(vec![
        connections(2, 0),
        connections(1, 0),
        connections(3, 0),
        connections(0, 0),
    ]);
    h.fake.delete_table_at(At::ConntrackRead(2));
    let spec = web("web:2", "drainTimeout: 1m");
    let summary = h.apply_summary(&h.plan(&spec)).expect("upgrades");
    assert_eq!(summary.table_restores, 1);
    assert_eq!(
        h.changes(),
        calls(&[
            &START_NEXT,
            &[REDIRECT, POLL, POLL, DELETED, RESTORED, POLL, POLL],
            &SET_ASIDE,
            &START_PRIMARY,
            &[KEEP, UNREDIRECT, POLL],
            &REMOVE_NEXT,
            &REMOVE_PREV,
        ])
    );
    assert!(h.fake.has_table());
    assert_new_version_serves(&h, &spec);
}

#[test]
fn table_deleted_while_the_new_primary_starts_is_restored_before_the_next_probe() {
    let h = installed();
    // Probe 1: next. Probes 2-4: the new primary fails three times, then passes.
    h.fake.set_health(PRIMARY, Health::After(3));
    h.fake.delete_table_at(At::Probe(3));
    let spec = web("web:2", "");
    let summary = h.apply_summary(&h.plan(&spec)).expect("upgrades");
    assert_eq!(summary.table_restores, 1);
    assert_eq!(
        h.changes(),
        calls(&[
            &START_NEXT,
            &[REDIRECT, POLL],
            &SET_ASIDE,
            &START_PRIMARY,
            &[DELETED, RESTORED, KEEP, UNREDIRECT, POLL],
            &REMOVE_NEXT,
            &REMOVE_PREV,
        ])
    );
    // The redirect was back before the fourth probe: it is not answered
    // until the table is there again.
    let calls = h.fake.calls();
    let restored = calls.iter().position(|c| c == RESTORED).expect("restored");
    assert_eq!(
        calls[restored + 1..]
            .iter()
            .filter(|c| c.as_str() == "probe 127.0.0.1:8000")
            .count(),
        2,
        "{calls:#?}"
    );
    assert_new_version_serves(&h, &spec);
}

#[test]
fn rollback_restores_a_missing_redirect_before_it_drains_next() {
    let h = installed();
    // The new primary exits at its third probe (probe 4); the old one, back
    // from prev, passes at probe 5, when the table is deleted.
    h.fake
        .set_health(PRIMARY, Health::Exits { after: 2, code: 1 });
    h.fake.delete_table_at(At::Probe(5));
    let cause = rolled_back(h.apply(&web("web:2", "")));
    assert!(cause.contains("exited (code 1)"), "{cause}");
    assert_eq!(
        h.changes(),
        calls(&[
            &START_NEXT,
            &[REDIRECT, POLL],
            &SET_ASIDE,
            &START_PRIMARY,
            &RESTORE[..4],
            &[DELETED, RESTORE[4], RESTORED, UNREDIRECT, POLL],
            &REMOVE_NEXT,
        ])
    );
    assert!(h.fake.has_table());
    assert_old_version_serves(&h);
}

#[test]
fn removing_a_redirect_from_a_deleted_table_succeeds() {
    let h = installed();
    // Deleted while next starts, before the redirect: next never becomes
    // healthy, and the rollback removes the redirect from a table that is gone.
    h.fake.set_health(NEXT, Health::Never);
    h.fake.delete_table_at(At::Probe(1));
    let cause = rolled_back(h.apply(&web("web:2", "")));
    assert!(cause.contains("was not healthy after"), "{cause}");
    assert_eq!(
        h.changes(),
        calls(&[&START_NEXT, &[DELETED, UNREDIRECT, POLL], &REMOVE_NEXT])
    );
    assert!(!h.fake.has_table(), "not held before the redirect");
    assert_old_version_serves(&h);
}
