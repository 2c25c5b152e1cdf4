//! Following the live conntrack entries of a drain without reading the table
//! again: one filtered read when the watch opens, then conntrack events
//! (ctnetlink's new, update and destroy multicast groups) and lookups of the
//! followed entries by their tuples (the kernel's hash: each costs the same
//! with 100k other entries as with none).
//!
//! Any read of the table makes the kernel walk all of it (every namespace's
//! entries share one hash table: ~0.4 µs per entry on a busy 2-CPU machine,
//! even when a dump filter drops them all), so a drain that read the table
//! at each poll would grow with the host. A watch reads it once; after that
//! its cost grows only with the connections it follows.
//!
//! Events alone would not do:
//!
//! - the kernel sends events only for entries that carry its event extension:
//!   with `net.netfilter.nf_conntrack_events = 2` (the default), an entry made
//!   while no process listened for events has none, so connections older than
//!   the watch close without a word. The watch looks its entries up every
//!   [`CHECK`] for them;
//! - when the socket's receive buffer overflows, the kernel drops events and
//!   says so (`ENOBUFS`): [`Wake::Lost`], and the watch reads the table again
//!   (resync).
//!
//! Connections that start after the watch opened always have the extension
//! (a listener exists), so their arrival is an event.

use std::collections::HashMap;
use std::io;
use std::time::{Duration, Instant};

use netlink_packet_core::{NLM_F_CREATE, NetlinkBuffer};
use netlink_sys::{Socket, protocols::NETLINK_NETFILTER};
use nix::sys::socket::{setsockopt, sockopt::ReceiveTimeout};
use nix::sys::time::TimeVal;

use super::conntrack::{
    ConntrackError, Ctnetlink, Entry, Fault, Interest, Tracked, flow_counts, is_ctnetlink_message,
};
use crate::model::ConntrackState;
use crate::netns::Netns;

/// `NFNLGRP_CONNTRACK_NEW`, `_UPDATE` and `_DESTROY` (`nfnetlink_compat.h`
/// numbering, as `add_membership` takes it).
const GROUPS: [u32; 3] = [1, 2, 3];
/// `IPCTNL_MSG_CT_DELETE`: the message type of a destroy event.
const CT_DELETE: u16 = 2;
/// Receive buffer: a burst of events while the drain reads must fit (an
/// event is ~200–300 bytes).
const RECEIVE_BUFFER: usize = 4 << 20;
/// The largest event datagram.
const DATAGRAM: usize = 64 * 1024;
/// How often a wait looks its entries up (for those that send no events), at
/// most: with many entries, lookups take at most a fifth of the time.
pub const CHECK: Duration = Duration::from_millis(20);

/// Why [`ConntrackWatch::wait`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// An event changed the followed entries (one came, closed or went).
    Event,
    /// A lookup found a followed entry closed or gone (no event came: it
    /// predates every listener).
    Seen,
    /// Events were lost (the receive buffer overflowed); the table was read
    /// again.
    Lost,
    /// The timeout passed without a change.
    Quiet,
}

/// The live entries (TCP connections opening, open or half-closed; UDP
/// flows) of some [`Interest`]s in a namespace, followed as they change.
pub struct ConntrackWatch {
    events: Socket,
    reader: Ctnetlink,
    interests: Vec<Interest>,
    /// The live entries, by kernel id.
    live: HashMap<u32, Tracked>,
    /// Whether `live` changed since the last wake.
    changed: bool,
    /// Times events were lost and the table read again.
    resyncs: u64,
    buffer: Vec<u8>,
    netns: Netns,
}

impl ConntrackWatch {
    /// Subscribes to the conntrack events of `netns`, then reads the live
    /// entries of `interests` (filtered by the kernel).
    pub fn open(netns: &Netns, interests: &[Interest]) -> Result<Self, ConntrackError> {
        Self::with_receive_buffer(netns, interests, RECEIVE_BUFFER)
    }

    /// [`ConntrackWatch::open`] with a receive buffer of `bytes` (the kernel
    /// doubles it and applies its minimum): a small one loses events sooner.
    pub fn with_receive_buffer(
        netns: &Netns,
        interests: &[Interest],
        bytes: usize,
    ) -> Result<Self, ConntrackError> {
        let (events, reader) = netns
            .run(|| -> Result<(Socket, Ctnetlink), Fault> {
                let subscribe = || -> io::Result<Socket> {
                    let mut socket = Socket::new(NETLINK_NETFILTER)?;
                    socket.bind_auto()?;
                    socket.set_rx_buf_sz(bytes)?;
                    for group in GROUPS {
                        socket.add_membership(group)?;
                    }
                    Ok(socket)
                };
                let events = subscribe().map_err(Fault::io("subscribe to conntrack events"))?;
                Ok((events, Ctnetlink::open()?))
            })?
            .map_err(|fault| fault.within(netns))?;
        let mut watch = ConntrackWatch {
            events,
            reader,
            interests: interests.to_vec(),
            live: HashMap::new(),
            changed: false,
            resyncs: 0,
            buffer: vec![0; DATAGRAM],
            netns: netns.clone(),
        };
        watch.resync()?;
        Ok(watch)
    }

    /// The live entries now, counted as [`crate::backend::conntrack::observe`]
    /// counts them (without the table's fill level): the events that came
    /// are applied and every entry is looked up.
    pub fn state(&mut self) -> Result<ConntrackState, ConntrackError> {
        while self.receive(None)? != Received::Nothing {}
        self.check()?;
        self.changed = false;
        Ok(ConntrackState {
            available: true,
            unavailable_reason: None,
            flows: flow_counts(self.live.values().map(|tracked| tracked.key)),
            table_count: 0,
            table_max: 0,
        })
    }

    /// How many times events were lost and the table read again.
    pub fn resyncs(&self) -> u64 {
        self.resyncs
    }

    /// Waits up to `timeout` until the live entries change: an event about
    /// one of them, a lookup that finds one closed or gone (every
    /// [`CHECK`]), or lost events. Events about other entries are dropped.
    pub fn wait(&mut self, timeout: Duration) -> Result<Wake, ConntrackError> {
        let deadline = Instant::now() + timeout;
        let mut next_check = Instant::now() + CHECK;
        loop {
            let now = Instant::now();
            if now >= next_check {
                self.check()?;
                if std::mem::take(&mut self.changed) {
                    return Ok(Wake::Seen);
                }
                // Many connections make a look take long: keep it at most a
                // fifth of the time.
                next_check = Instant::now() + CHECK.max(now.elapsed() * 4);
            }
            let left = deadline.saturating_duration_since(now);
            if left.is_zero() {
                return Ok(Wake::Quiet);
            }
            let pause = left.min(next_check.saturating_duration_since(now));
            if self.receive(Some(pause))? == Received::Lost {
                return Ok(Wake::Lost);
            }
            if std::mem::take(&mut self.changed) {
                // Apply the rest of a burst before waking the caller.
                while self.receive(None)? != Received::Nothing {}
                self.changed = false;
                return Ok(Wake::Event);
            }
        }
    }

    /// Reads the live entries of the interests from the table.
    fn resync(&mut self) -> Result<(), ConntrackError> {
        let mut live = HashMap::new();
        self.reader
            .dump(&self.interests, |entry| {
                if entry.live() == Some(true) {
                    live.extend(entry.tracked().map(|t| (entry.kernel_id(), t)));
                }
            })
            .map_err(|fault| fault.within(&self.netns))?;
        self.live = live;
        self.changed = true;
        Ok(())
    }

    /// Looks every followed entry up: gone, replaced (another id) or closed
    /// ones are dropped.
    fn check(&mut self) -> Result<(), ConntrackError> {
        let mut dropped = Vec::new();
        for (id, tracked) in &mut self.live {
            let found = self
                .reader
                .get(tracked.family, &tracked.orig, tracked.zone.as_deref())
                .map_err(|fault| fault.within(&self.netns))?;
            match found {
                Some((now, state)) if now == *id => {
                    let (protocol, dport, sport, _) = tracked.key;
                    if state.is_some_and(|s| !super::conntrack::LIVE_TCP_STATES.contains(&s)) {
                        dropped.push(*id);
                    } else if state.is_some() && state != tracked.key.3 {
                        tracked.key = (protocol, dport, sport, state);
                    }
                }
                _ => dropped.push(*id),
            }
        }
        for id in dropped {
            self.live.remove(&id);
            self.changed = true;
        }
        Ok(())
    }

    /// Applies one event (`created`: of a new entry) to the followed entries.
    fn apply(&mut self, kind: u16, created: bool, entry: &Entry<'_>) {
        if !self.interests.iter().any(|i| i.matches(entry)) {
            return;
        }
        let id = entry.kernel_id();
        let live = if kind & 0xff == CT_DELETE {
            false
        } else {
            // An update without a TCP state leaves a followed entry as it
            // is; a new entry without one is opening.
            entry
                .live()
                .unwrap_or(created || self.live.contains_key(&id))
        };
        if live {
            if let Some(tracked) = entry.tracked() {
                self.changed |= self.live.get(&id).is_none_or(|t| t.key != tracked.key);
                self.live.insert(id, tracked);
            }
        } else if self.live.remove(&id).is_some() {
            self.changed = true;
        }
    }

    /// Reads one datagram of events, waiting up to `wait` for it (`None`:
    /// not at all), and applies them. Lost events make the watch read the
    /// table again.
    fn receive(&mut self, wait: Option<Duration>) -> Result<Received, ConntrackError> {
        let flags = match wait {
            Some(wait) => {
                // A zero timeout would mean "forever".
                let wait = wait.max(Duration::from_micros(1));
                let timeval = TimeVal::new(
                    i64::try_from(wait.as_secs()).unwrap_or(i64::MAX),
                    i64::from(wait.subsec_micros()),
                );
                setsockopt(&self.events, ReceiveTimeout, &timeval)
                    .map_err(|errno| self.io("wait for conntrack events", errno.into()))?;
                0
            }
            None => nix::libc::MSG_DONTWAIT,
        };
        let mut buffer = std::mem::take(&mut self.buffer);
        let received = self
            .events
            .recv(&mut &mut buffer[..], flags | nix::libc::MSG_TRUNC);
        let result = match received {
            // A truncated datagram lost events as surely as an overflow.
            Ok(size) if size > buffer.len() => self.lost(),
            Ok(size) => self.apply_all(&buffer[..size]),
            Err(error) => match error.raw_os_error() {
                Some(nix::libc::ENOBUFS) => self.lost(),
                Some(nix::libc::EAGAIN | nix::libc::EINTR) => Ok(Received::Nothing),
                _ => Err(self.io("read conntrack events", error)),
            },
        };
        self.buffer = buffer;
        result
    }

    fn apply_all(&mut self, mut rest: &[u8]) -> Result<Received, ConntrackError> {
        while !rest.is_empty() {
            let Ok(message) = NetlinkBuffer::new_checked(rest) else {
                return self.lost();
            };
            let length = message.length() as usize;
            rest = rest.get(length.next_multiple_of(4)..).unwrap_or_default();
            let kind = message.message_type();
            if !is_ctnetlink_message(kind) {
                continue;
            }
            let created = message.flags() & NLM_F_CREATE != 0;
            match Entry::parse(message.payload()) {
                Ok(entry) => self.apply(kind, created, &entry),
                // An event that does not parse might have been about a
                // followed entry.
                Err(_) => return self.lost(),
            }
        }
        Ok(Received::Events)
    }

    fn lost(&mut self) -> Result<Received, ConntrackError> {
        self.resyncs += 1;
        self.resync()?;
        Ok(Received::Lost)
    }

    fn io(&self, doing: &str, source: io::Error) -> ConntrackError {
        ConntrackError::Io {
            netns: self.netns.to_string(),
            doing: doing.to_owned(),
            source,
        }
    }
}

/// What one receive got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Received {
    /// A datagram of events (applied).
    Events,
    /// The kernel dropped events; the table was read again.
    Lost,
    /// Nothing came in time.
    Nothing,
}
