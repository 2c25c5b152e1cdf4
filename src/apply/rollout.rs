//! A routed upgrade's turn in its service's fleet rollout
//! (`docs/cluster.md`, "Rollouts"): the slot the plan's [`Turn`] says to
//! take is taken before anything changes; when every slot was taken
//! since the plan, or etcd cannot be reached, the upgrade does not start
//! (the next run tries again) and the apply goes on. Once the upgrade ends
//! the slot is freed: with `done` written when it succeeded, with the
//! version marked bad when it failed because of the version. A planned
//! [`BadMark`] (a canary node's replica turned unhealthy) is written as
//! planned.

use super::ApplyError;
use super::progress::Progress;
use crate::cluster::rollout::{BadMark, Held, Taken, Turn};
use crate::error::chain;

/// Runs `upgrade` in `turn` (or at once without a rollout); returns what
/// it returns, or `Ok(0)` when its turn has not come.
pub(super) fn in_turn(
    progress: &mut Progress,
    turn: Option<&Turn>,
    upgrade: impl FnOnce(&mut Progress) -> Result<usize, ApplyError>,
) -> Result<usize, ApplyError> {
    let Some(turn) = turn else {
        return upgrade(progress);
    };
    let service = &turn.service;
    if turn.resumed {
        return resumed(progress, turn, upgrade);
    }
    let held = match turn.take() {
        Ok(Taken::Slot(held)) => {
            progress.step(&format!(
                "{service}: took rollout slot {} for version {} in etcd",
                held.slot(),
                turn.version
            ));
            held
        }
        Ok(Taken::Full(holders)) => {
            progress.step(&format!(
                "{service}: every rollout slot was taken since the plan ({}): the upgrade to version {} does not start; the next run tries again",
                holders.join(", "),
                turn.version
            ));
            return Ok(0);
        }
        Ok(Taken::Moved(done)) => {
            progress.step(&format!(
                "{service}: the canary phase of version {} moved on since the plan ({done} other nodes done now): the upgrade does not start; the next run decides again",
                turn.version
            ));
            return Ok(0);
        }
        Ok(Taken::Bad(by)) => {
            progress.step(&format!(
                "{service}: version {} was marked bad by {by} since the plan: the upgrade does not start; change the spec to try again",
                turn.version
            ));
            return Ok(0);
        }
        Err(error) => {
            progress.step(&format!(
                "{service}: could not take a rollout slot in etcd ({}): the upgrade to version {} does not start (rollouts pause while etcd cannot be reached); the next run tries again",
                chain(&error),
                turn.version
            ));
            return Ok(0);
        }
    };
    let result = upgrade(progress);
    end_in_slot(progress, turn, held, &result);
    result
}

/// Frees `held` once `turn`'s upgrade ended with `result`: with `done`
/// written when it succeeded, with the version marked bad when it failed
/// because of the version.
fn end_in_slot(
    progress: &mut Progress,
    turn: &Turn,
    held: Box<Held>,
    result: &Result<usize, ApplyError>,
) {
    let (ended, said) = match result {
        Ok(_) if turn.last => (held.done(), "done: the slot is free"),
        Ok(_) => (held.done(), "the slot passes to this node's next upgrade"),
        Err(error) => match version_failure(error) {
            Some(reason) => (
                held.bad(&reason),
                "the version is marked bad: no other node starts it",
            ),
            None => (
                held.release(),
                "failed, not because of the version: the slot is free",
            ),
        },
    };
    let service = &turn.service;
    match ended {
        Ok(()) => progress.step(&format!("{service}: rollout of version {}: {said}", turn.version)),
        Err(error) => progress.step(&format!(
            "{service}: could not record the rollout's end in etcd ({}); the slot frees itself when its lease expires",
            chain(&error)
        )),
    }
}

/// An upgrade found in flight that resumes (it took its turn when it
/// started, and must end either way): takes a slot again when it can (its
/// own, if its lease has not expired, or a free one), so that other nodes
/// wait for it; else resumes without one and says so. Then records `done`
/// (the node's last upgrade of the service) or `bad`.
fn resumed(
    progress: &mut Progress,
    turn: &Turn,
    upgrade: impl FnOnce(&mut Progress) -> Result<usize, ApplyError>,
) -> Result<usize, ApplyError> {
    let service = &turn.service;
    let without = match turn.take() {
        Ok(Taken::Slot(held)) => {
            progress.step(&format!(
                "{service}: took rollout slot {} again for the upgrade to version {} found in flight",
                held.slot(),
                turn.version
            ));
            let result = upgrade(progress);
            end_in_slot(progress, turn, held, &result);
            return result;
        }
        Ok(Taken::Full(holders)) => format!(
            "every rollout slot is held ({}), so more nodes than `maxParallel` may be upgrading {service} now",
            holders.join(", ")
        ),
        Ok(Taken::Bad(by)) => format!("version {} was marked bad by {by}", turn.version),
        Ok(Taken::Moved(done)) => format!("{done} other nodes are done with it"),
        Err(error) => format!("etcd: {}", chain(&error)),
    };
    progress.step(&format!(
        "{service}: the upgrade to version {} found in flight resumes without a rollout slot ({without})",
        turn.version
    ));
    let result = upgrade(progress);
    let recorded = match &result {
        Ok(_) if turn.last => Some((turn.record_done(), "done")),
        Ok(_) => None,
        Err(error) => version_failure(error).map(|reason| {
            (
                turn.record_bad(&reason),
                "the version is marked bad: no other node starts it",
            )
        }),
    };
    match recorded {
        Some((Ok(()), said)) => progress.step(&format!(
            "{service}: rollout of version {} (resumed): {said}",
            turn.version
        )),
        Some((Err(error), _)) => progress.step(&format!(
            "{service}: could not record the rollout's end in etcd ({})",
            chain(&error)
        )),
        None => {}
    }
    result
}

/// Marks the version of `mark` bad in etcd, unless it is marked already.
/// An etcd out of reach fails nothing: the version does not start on this
/// node anyway, and the next run plans the mark again.
pub(super) fn mark_bad(progress: &mut Progress, mark: &BadMark) {
    let BadMark {
        service, version, ..
    } = mark;
    let said = match mark.write() {
        Ok(true) => format!(
            "{service}: version {version} marked bad in etcd: no node starts it until the spec changes"
        ),
        Ok(false) => format!(
            "{service}: version {version} was marked bad already (by another node since the plan)"
        ),
        Err(error) => format!(
            "{service}: could not mark version {version} bad in etcd ({}); it does not start here, and the next run marks it",
            chain(&error)
        ),
    };
    progress.step(&said);
}

/// When `error` says the new version itself failed (not healthy in time,
/// exited, an unhealthy or aborted canary), why, for the `bad` mark.
fn version_failure(error: &ApplyError) -> Option<String> {
    let cause = match error {
        ApplyError::RolledBack { cause, .. } | ApplyError::Paused { cause, .. } => cause.as_ref(),
        other => other,
    };
    matches!(
        cause,
        ApplyError::NotReady { .. }
            | ApplyError::Exited { .. }
            | ApplyError::CanaryUnhealthy { .. }
            | ApplyError::CanaryAborted { .. }
    )
    .then(|| chain(cause))
}
