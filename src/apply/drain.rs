//! Waiting for connections to finish, counted in conntrack.

use std::time::Duration;

use super::progress::{Progress, short};
use super::{ApplyError, Context};
use crate::model::ConntrackState;
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

/// Conntrack TCP states of a connection that may still carry data: open, or
/// closed by one side only. A client that half-closes its connection once its
/// request is sent (`nc -N`, many RPC clients, uploads) still waits for the
/// answer, and its connection shows as FIN_WAIT, then CLOSE_WAIT. LAST_ACK,
/// TIME_WAIT and CLOSE are over: both sides have closed.
const OPEN_STATES: [&str; 3] = ["ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT"];

/// Open TCP connections (see [`OPEN_STATES`]) of `service` whose original
/// destination is a canonical port and whose reply comes from `reply_port(port)`:
/// the old version (reply from the canonical port) or the next one (from the
/// temporary port).
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
                        && OPEN_STATES.contains(&f.state.as_str())
                })
                .map(|f| f.count)
                .sum::<u64>()
        })
        .sum()
}

/// Connections that reached the old version after the redirect was set: with
/// the redirect in place its count only falls, so each rise between two polls
/// is new connections that came while the redirect was missing (at least that
/// many: one that ended in the same interval hides one that came).
#[derive(Debug, Default)]
pub(super) struct Arrivals {
    last: Option<u64>,
    total: u64,
}

impl Arrivals {
    /// Notes the old version's count at one poll; returns the new total when
    /// it rose.
    pub fn note(&mut self, count: u64) -> Option<u64> {
        let rose = self.last.is_some_and(|last| count > last);
        if let (true, Some(last)) = (rose, self.last) {
            self.total += count - last;
        }
        self.last = Some(count);
        rose.then_some(self.total)
    }
}

/// Polls conntrack until `count` reaches 0 or `timeout` passes.
pub(super) fn wait_drained(
    ctx: &Context,
    progress: &mut Progress,
    what: &str,
    timeout: Duration,
    count: impl Fn(&ConntrackState) -> u64,
) -> Result<Drained, ApplyError> {
    wait_until_drained(ctx, progress, what, timeout, |_| {
        Ok(count(&ctx.host.conntrack()?))
    })
}

/// Calls `count` every [`POLL`] until it returns 0 or `timeout` passes,
/// showing how many connections are left (`count` may report on progress too).
pub(super) fn wait_until_drained(
    ctx: &Context,
    progress: &mut Progress,
    what: &str,
    timeout: Duration,
    mut count: impl FnMut(&mut Progress) -> Result<u64, ApplyError>,
) -> Result<Drained, ApplyError> {
    let started = ctx.host.now();
    loop {
        let left = count(progress)?;
        if left == 0 {
            progress.end_wait();
            return Ok(Drained::Empty);
        }
        let elapsed = ctx.host.now().saturating_duration_since(started);
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
        ctx.host.sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::FlowCount;

    #[test]
    fn arrivals_are_the_rises_between_polls() {
        let mut arrivals = Arrivals::default();
        let noted: Vec<Option<u64>> = [5, 3, 3, 6, 2, 4, 0]
            .into_iter()
            .map(|count| arrivals.note(count))
            .collect();
        assert_eq!(noted, [None, None, None, Some(3), None, Some(5), None]);
    }

    #[test]
    fn counts_connections_that_may_still_carry_data() {
        let text = "version: 1\nnodes: [{name: a, address: 192.0.2.1}]\nservices:\n  - name: web\n    node: a\n    image: web:1\n    ports: [{name: http, port: 8000, tempPort: 18000}]\n";
        let spec = crate::spec::load_bytes("t.yaml", text.as_bytes()).expect("valid spec");
        let flow = |reply_sport: u16, state: &str| FlowCount {
            protocol: "tcp".into(),
            orig_dport: 8000,
            reply_sport,
            state: state.into(),
            count: 1,
        };
        let states = [
            "SYN_SENT",
            "ESTABLISHED",
            "FIN_WAIT",
            "CLOSE_WAIT",
            "LAST_ACK",
            "TIME_WAIT",
            "CLOSE",
        ];
        let state = ConntrackState {
            available: true,
            flows: states
                .iter()
                .map(|s| flow(8000, s))
                .chain([flow(18000, "ESTABLISHED")])
                .collect(),
            ..ConntrackState::default()
        };
        let web = &spec.services[0];
        // ESTABLISHED, and half-closed FIN_WAIT and CLOSE_WAIT; not the rest.
        assert_eq!(established(&state, web, false), 3);
        assert_eq!(established(&state, web, true), 1);
    }
}
