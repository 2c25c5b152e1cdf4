//! Host mode: canaries (a share of new connections to the next version for
//! a hold, then the redirect; or a rollback).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::time::Duration;

use super::super::canary::CANARY_FILE;
use super::super::fake::Health;
use super::upgrade::{
    NEXT, POLL, REDIRECT, REMOVE_NEXT, REMOVE_PREV, SET_ASIDE, START_NEXT, START_PRIMARY,
    UNREDIRECT, assert_in_flight, assert_new_version_serves, assert_old_version_serves, calls,
    connections, installed, rolled_back, web,
};
use super::{Harness, only_operation};
use crate::apply::ApplyError;
use crate::desired::host_table::canary_rule_comment;
use crate::model::{Redirect, nft_text::render_table};
use crate::plan::operation::Operation;
use crate::plan::{Decision, StageName};
use crate::spec::Protocol;

const KEEP: &str = "keep_running lessnat-web.a";
/// The split set: the canary rule of 8000/tcp, in each of the two nat chains.
const SPLIT: &str = "replace rules -lessnat canary 8000/tcp +2";
/// The split ended.
const UNSPLIT: &str = "replace rules -lessnat canary 8000/tcp +0";

/// Web at `image` with a canary of `canary` (the inside of a flow mapping).
fn with_canary(image: &str, canary: &str) -> String {
    web(image, &format!("drainTimeout: 1m, canary: {{{canary}}}"))
}

/// Asks the holding canary in `dir` to end, as `lessnat apply --promote` /
/// `--abort` does once it has checked that an apply holds one.
pub(super) fn ask(dir: &Path, verdict: &str) -> impl FnOnce() + 'static {
    let path = dir.join(CANARY_FILE);
    let request = format!("{verdict} {}\n", std::process::id());
    move || std::fs::write(path, request).expect("request written")
}

/// Whether lessnat's table carries a canary rule now.
fn split_in_table(h: &Harness) -> bool {
    h.fake
        .table()
        .is_some_and(|t| render_table(&t).contains("lessnat canary"))
}

/// Asserts that a canary was rolled back: its split ended, then the next
/// version's connections drained (two polls) before it went.
fn assert_split_rolled_back(h: &Harness) {
    assert_eq!(
        h.changes(),
        calls(&[
            &START_NEXT,
            &[SPLIT, UNSPLIT, UNREDIRECT],
            &[POLL; 2],
            &REMOVE_NEXT
        ])
    );
    assert!(!split_in_table(h));
    assert_old_version_serves(h);
}

#[test]
fn canary_holds_its_share_then_goes_on_as_an_upgrade() {
    let h = installed();
    h.fake
        .set_conntrack(vec![connections(1, 0), connections(0, 0)]);
    let spec = with_canary("web:2", "weight: 10%, hold: 1s");
    let plan = h.plan(&spec);
    let Operation::Upgrade {
        canary: Some(split),
        ..
    } = only_operation(&plan)
    else {
        panic!("expected an upgrade with a canary: {plan:#?}");
    };
    assert_eq!(split.weight.get(), 10);
    assert_eq!(split.rules.len(), 2, "one rule in each nat chain");
    let text = render_table(&split.table);
    assert!(
        text.contains("tcp dport 8000 numgen random mod 100 < 10 redirect to :18000"),
        "{text}"
    );
    h.apply_plan(&plan).expect("upgrades");
    assert_eq!(
        h.changes(),
        calls(&[
            &START_NEXT,
            &[SPLIT, REDIRECT, UNSPLIT],
            &[POLL; 2],
            &SET_ASIDE,
            &START_PRIMARY,
            &[KEEP, UNREDIRECT, POLL],
            &REMOVE_NEXT,
            &REMOVE_PREV,
        ])
    );
    // The split ends only once the redirect takes every new connection.
    h.assert_before(REDIRECT, UNSPLIT);
    assert!(
        h.fake.elapsed() >= Duration::from_secs(1),
        "held {:?}",
        h.fake.elapsed()
    );
    assert!(!split_in_table(&h));
    assert_new_version_serves(&h, &spec);
}

#[test]
fn the_journal_records_the_hold_while_it_lasts() {
    let h = installed();
    let journal = h.journal_file();
    let seen = std::rc::Rc::new(std::cell::RefCell::new(None));
    let record = seen.clone();
    h.fake.at_probe(4, move || {
        *record.borrow_mut() = journal
            .read()
            .expect("journal")
            .upgrades
            .get("web")
            .and_then(|u| u.canary.clone());
    });
    let spec = with_canary("web:2", "weight: 5%, hold: 1s");
    h.apply(&spec).expect("upgrades");
    let during = seen
        .borrow()
        .clone()
        .expect("a canary recorded in the hold");
    assert_eq!(during.weight, "5%");
    assert!(h.journal().upgrades.is_empty());
}

#[test]
fn next_unhealthy_during_the_hold_rolls_back_even_with_pause() {
    let h = installed();
    // One check to start, three passes in the hold, then failures.
    h.fake.set_health(NEXT, Health::Sickens { after: 4 });
    let spec = with_canary("web:2", "weight: 10%, hold: 1h, unhealthyAfter: 3")
        .replace("drainTimeout: 1m", "drainTimeout: 1m, onFailure: pause");
    h.fake
        .set_conntrack(vec![connections(5, 2), connections(5, 0)]);
    let cause = rolled_back(h.apply(&spec));
    assert!(cause.contains("failed 3 health checks in a row"), "{cause}");
    assert_split_rolled_back(&h);
    // The canary's own connections finished before it went; the old
    // version's were never touched.
    assert!(!split_in_table(&h));
    assert_old_version_serves(&h);
}

#[test]
fn abort_ends_the_hold_and_rolls_back() {
    let h = installed();
    h.fake.at_probe(3, ask(h.state_dir.path(), "abort"));
    h.fake
        .set_conntrack(vec![connections(5, 1), connections(5, 0)]);
    let result = h.apply(&with_canary("web:2", "weight: 10%, hold: 1h"));
    let cause = rolled_back(result);
    assert!(
        cause.contains("aborted by `lessnat apply --abort`"),
        "{cause}"
    );
    assert_split_rolled_back(&h);
    assert!(h.fake.elapsed() < Duration::from_secs(60));
    assert!(!h.state_dir.path().join(CANARY_FILE).exists(), "read once");
    assert_old_version_serves(&h);
}

#[test]
fn promote_ends_the_hold_early_and_the_upgrade_goes_on() {
    let h = installed();
    h.fake.at_probe(3, ask(h.state_dir.path(), "promote"));
    let spec = with_canary("web:2", "weight: 10%, hold: 1h");
    h.apply(&spec).expect("upgrades");
    assert!(
        h.fake.elapsed() < Duration::from_secs(60),
        "not held for 1h"
    );
    h.assert_before(SPLIT, REDIRECT);
    assert!(!h.state_dir.path().join(CANARY_FILE).exists(), "read once");
    assert_new_version_serves(&h, &spec);
}

#[test]
fn a_request_left_from_an_earlier_hold_is_ignored() {
    let h = installed();
    std::fs::write(h.state_dir.path().join(CANARY_FILE), "abort 1\n").expect("an old request");
    let spec = with_canary("web:2", "weight: 10%, hold: 1s");
    h.apply(&spec)
        .expect("upgrades: the old request is not this hold's");
    assert_new_version_serves(&h, &spec);
}

#[test]
fn interrupt_during_the_hold_rolls_back() {
    let h = installed();
    h.fake.interrupt_at_probe(3);
    let result = h.apply(&with_canary("web:2", "weight: 10%, hold: 1h"));
    assert!(
        matches!(&result, Err(ApplyError::RolledBack { cause, .. }) if matches!(**cause, ApplyError::Interrupted)),
        "{result:?}"
    );
    assert!(!split_in_table(&h));
    assert_old_version_serves(&h);
}

#[test]
fn an_apply_killed_in_the_hold_is_found_and_its_hold_starts_again() {
    let h = installed();
    let spec = with_canary("web:2", "weight: 10%, hold: 1s");
    h.fake.at_probe(3, || panic!("killed in the hold"));
    let killed = catch_unwind(AssertUnwindSafe(|| h.apply(&spec)));
    assert!(killed.is_err(), "the apply died");
    assert!(split_in_table(&h), "the split stays while nobody holds it");
    // The next plan finds the canary in flight and holds it again.
    let plan = h.plan(&spec);
    assert_in_flight(&plan, StageName::StartNext, Decision::Resume);
    let Operation::Upgrade {
        canary,
        split_found,
        ..
    } = only_operation(&plan)
    else {
        panic!("expected an upgrade: {plan:#?}");
    };
    assert!(canary.is_some() && *split_found, "{plan:#?}");
    // The table the plan writes keeps the split meanwhile.
    assert!(
        !plan
            .changes
            .iter()
            .any(|c| matches!(c.operation, Operation::WriteTable { .. })),
        "{plan:#?}"
    );
    h.fake.clear_calls();
    h.apply_plan(&plan).expect("resumes");
    h.assert_before(SPLIT, REDIRECT);
    assert_new_version_serves(&h, &spec);
}

#[test]
fn a_canary_found_when_the_spec_changed_is_rolled_back_with_its_split() {
    let h = installed();
    h.fake.at_probe(3, || panic!("killed in the hold"));
    let killed = catch_unwind(AssertUnwindSafe(|| {
        h.apply(&with_canary("web:2", "weight: 10%, hold: 1s"))
    }));
    assert!(killed.is_err());
    let plan = h.plan(&web("web:3", ""));
    assert_in_flight(&plan, StageName::StartNext, Decision::RollBack);
    h.fake.clear_calls();
    h.apply_plan(&plan).expect("rolls back");
    assert_eq!(
        h.changes(),
        calls(&[&[UNSPLIT, UNREDIRECT, POLL], &REMOVE_NEXT])
    );
    assert!(!split_in_table(&h));
    assert_old_version_serves(&h);
}

#[test]
fn canary_rule_comments_name_port_and_protocol() {
    let redirect = Redirect {
        protocol: Protocol::Udp,
        port: 53,
        temp_port: 10053,
    };
    assert_eq!(canary_rule_comment(&redirect), "lessnat canary 53/udp");
}

#[test]
fn next_that_exits_during_the_hold_rolls_back_at_the_next_check() {
    let h = installed();
    // One check to start, two in the hold, then it exits.
    h.fake.set_health(NEXT, Health::Dies { after: 3 });
    let result = h.apply(&with_canary(
        "web:2",
        "weight: 10%, hold: 1h, unhealthyAfter: 5",
    ));
    let cause = rolled_back(result);
    assert!(cause.contains("it is not running"), "{cause}");
    assert!(
        h.fake.elapsed() < Duration::from_secs(2),
        "{:?}",
        h.fake.elapsed()
    );
    assert!(!split_in_table(&h));
    assert_old_version_serves(&h);
}
