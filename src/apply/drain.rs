//! Waiting for connections to finish, counted in conntrack: only the entries
//! of the service's ports are read (the kernel filters them), and a host-mode
//! drain is woken as soon as one of them changes (see
//! `backend::conntrack_watch`), so it ends as the last connection closes.

use std::cell::RefCell;
use std::time::Duration;

use super::progress::{Progress, short};
use super::{ApplyError, Context};
use crate::backend::conntrack::Interest;
use crate::model::ConntrackState;
use crate::spec::{Protocol, Service};

/// How often a drain counts, at the latest (a watched drain counts again as
/// soon as its watch wakes).
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
    answering(service, temporary)
        .map(|(port, reply)| {
            state
                .flows
                .iter()
                .filter(|f| {
                    f.protocol == "tcp"
                        && f.orig_dport == port
                        && f.reply_sport == reply
                        && OPEN_STATES.contains(&f.state.as_str())
                })
                .map(|f| f.count)
                .sum::<u64>()
        })
        .sum()
}

/// The conntrack entries [`established`] counts: TCP to each canonical port,
/// answered from it (the old version) or from the temporary port (`temporary`).
pub(super) fn interests(service: &Service, temporary: bool) -> Vec<Interest> {
    answering(service, temporary)
        .map(|(port, reply)| Interest::ToPort {
            protocol: Protocol::Tcp,
            port,
            answered_from: Some(reply),
        })
        .collect()
}

/// Each TCP port of `service` with the port its connections are answered
/// from: itself, or the temporary port (`temporary`).
fn answering(service: &Service, temporary: bool) -> impl Iterator<Item = (u16, u16)> + '_ {
    service
        .ports
        .iter()
        .filter(|p| p.protocol == Protocol::Tcp)
        .map(move |p| match (&p.temp_port, temporary) {
            (Some(temp), true) => (p.port.value, temp.value),
            _ => (p.port.value, p.port.value),
        })
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

/// Waits until `service` has no [`established`] connection left (to the
/// next version when `temporary`) or `timeout` passes.
pub(super) fn wait_drained(
    ctx: &Context,
    progress: &mut Progress,
    what: &str,
    timeout: Duration,
    service: &Service,
    temporary: bool,
) -> Result<Drained, ApplyError> {
    wait_established(ctx, progress, what, timeout, service, temporary, |_, _| {
        Ok(())
    })
}

/// [`wait_drained`], calling `each` with every count (it may report, or fail
/// the wait). The entries are followed by a conntrack watch: read once, then
/// counted again as soon as one of them changes (at the latest after
/// [`POLL`]), so the wait ends as the last connection closes.
pub(super) fn wait_established(
    ctx: &Context,
    progress: &mut Progress,
    what: &str,
    timeout: Duration,
    service: &Service,
    temporary: bool,
    mut each: impl FnMut(&mut Progress, u64) -> Result<(), ApplyError>,
) -> Result<Drained, ApplyError> {
    let watch = RefCell::new(ctx.host.watch_conntrack(&interests(service, temporary))?);
    drain_loop(
        ctx,
        progress,
        what,
        timeout,
        |progress| {
            let left = established(&watch.borrow_mut().state()?, service, temporary);
            each(progress, left)?;
            Ok(left)
        },
        |left| Ok(watch.borrow_mut().wait(POLL.min(left))?),
    )
}

/// Calls `count` every [`POLL`] until it returns 0 or `timeout` passes,
/// showing how many connections are left (`count` may report on progress too).
pub(super) fn wait_until_drained(
    ctx: &Context,
    progress: &mut Progress,
    what: &str,
    timeout: Duration,
    count: impl FnMut(&mut Progress) -> Result<u64, ApplyError>,
) -> Result<Drained, ApplyError> {
    drain_loop(ctx, progress, what, timeout, count, |_| {
        ctx.host.sleep(POLL);
        Ok(())
    })
}

/// Counts until none is left or `timeout` passes; between two counts,
/// `pause` (given the time left) waits.
fn drain_loop(
    ctx: &Context,
    progress: &mut Progress,
    what: &str,
    timeout: Duration,
    mut count: impl FnMut(&mut Progress) -> Result<u64, ApplyError>,
    mut pause: impl FnMut(Duration) -> Result<(), ApplyError>,
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
        pause(timeout - elapsed)?;
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
