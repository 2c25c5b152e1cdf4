//! Waiting for connections to finish, counted in conntrack.

use std::time::{Duration, Instant};

use super::progress::{Progress, short};
use super::{ApplyError, Context};
use crate::backend::conntrack;
use crate::observe::ConntrackState;
use crate::spec::{Protocol, Service};

/// How often conntrack is read while draining.
const POLL: Duration = Duration::from_millis(500);

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Drained {
    /// No connection left.
    Empty,
    /// The timeout passed with this many connections left.
    TimedOut(u64),
}

/// Established TCP connections of `service` whose original destination is a
/// canonical port and whose reply comes from `reply_port(port)`: the old
/// version (reply from the canonical port) or the next one (from the temporary port).
pub(super) fn established(state: &ConntrackState, service: &Service, temporary: bool) -> u64 {
    service
        .ports
        .iter()
        .filter(|p| p.protocol == Protocol::Tcp)
        .map(|p| {
            let reply = match (&p.temp_port, temporary) {
                (Some(temp), true) => temp.value,
                _ => p.port.value,
            };
            state
                .flows
                .iter()
                .filter(|f| {
                    f.protocol == "tcp"
                        && f.orig_dport == p.port.value
                        && f.reply_sport == reply
                        && f.state == "ESTABLISHED"
                })
                .map(|f| f.count)
                .sum::<u64>()
        })
        .sum()
}

/// Polls conntrack until `count` reaches 0 or `timeout` passes.
pub(super) fn wait_drained(
    ctx: &Context,
    progress: &mut Progress,
    what: &str,
    timeout: Duration,
    count: impl Fn(&ConntrackState) -> u64,
) -> Result<Drained, ApplyError> {
    let started = Instant::now();
    loop {
        let state = conntrack::observe(ctx.netns)?;
        let left = count(&state);
        if left == 0 {
            progress.end_wait();
            return Ok(Drained::Empty);
        }
        let elapsed = started.elapsed();
        if elapsed >= timeout {
            progress.end_wait();
            return Ok(Drained::TimedOut(left));
        }
        progress.waiting(&format!(
            "{what}: {left} connection{} left, {} to go",
            if left == 1 { "" } else { "s" },
            short(timeout - elapsed)
        ));
        if ctx.interrupted() {
            progress.end_wait();
            return Err(ApplyError::Interrupted);
        }
        std::thread::sleep(POLL);
    }
}
