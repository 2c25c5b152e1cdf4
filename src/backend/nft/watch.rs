//! Keeping lessnat's table in place while an upgrade's redirect must hold.
//!
//! [`reassert`] checks the table and writes it whole when part of it is
//! missing. [`TableWatch`] does the same from a thread the moment nftables
//! reports a deletion in `inet lessnat` (an `NFNLGRP_NFTABLES` event), so a
//! `flush ruleset` or `nft delete table inet lessnat` by someone else is
//! undone within milliseconds, during Docker calls and health waits too, not
//! at apply's next poll.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use netlink_packet_core::{NetlinkBuffer, NlasIterator};
use netlink_sys::{Socket, protocols::NETLINK_NETFILTER};
use nix::sys::socket::{setsockopt, sockopt};
use nix::sys::time::{TimeVal, TimeValLike};

use super::{NftError, apply_table, read_table};
use crate::model::NftTable;
use crate::netns::Netns;
use crate::ownership::NFT_TABLE;

/// The nfnetlink subsystem of nf_tables.
const NFNL_SUBSYS_NFTABLES: u16 = 10;
/// The multicast group nf_tables reports every committed change to.
const NFNLGRP_NFTABLES: u32 = 7;
/// `NFT_MSG_DELTABLE`, `DELCHAIN`, `DELRULE`, `DELSET`, `DELSETELEM`.
const DELETIONS: [u16; 5] = [2, 5, 8, 11, 14];
/// `NFPROTO_INET`: the family of lessnat's table.
const FAMILY_INET: u8 = 1;
/// The attribute naming the table of every deleted object (`NFTA_TABLE_NAME`,
/// `NFTA_CHAIN_TABLE`, `NFTA_RULE_TABLE`, `NFTA_SET_TABLE`,
/// `NFTA_SET_ELEM_LIST_TABLE` are all 1).
const ATTRIBUTE_TABLE: u16 = 1;
/// How often the watch thread looks whether it must end.
const STOP_CHECK_MS: i64 = 100;
/// Receive buffer of the event socket: a `flush ruleset` reports every object
/// of every table at once.
const EVENT_BUFFER: usize = 1 << 20;

/// Whether lessnat's table in `netns` still holds `wanted` (its chains as
/// they are, and every element of its maps); when not, writes `wanted` whole
/// in one transaction. Returns whether it wrote.
pub fn reassert(netns: &Netns, wanted: &NftTable) -> Result<bool, NftError> {
    if read_table(netns, NFT_TABLE)?.is_some_and(|found| found.holds(wanted)) {
        return Ok(false);
    }
    apply_table(netns, wanted)?;
    Ok(true)
}

/// What the watch did since it was last asked.
#[derive(Debug, Default)]
struct Tally {
    /// Times the table was written.
    restored: u32,
    /// The first failure of a background check or write.
    failed: Option<NftError>,
}

/// Shared by the watch thread and its owner; the lock also keeps their checks
/// from running at the same time.
#[derive(Debug)]
struct Shared {
    netns: Netns,
    wanted: NftTable,
    tally: Mutex<Tally>,
}

impl Shared {
    fn tally(&self) -> MutexGuard<'_, Tally> {
        self.tally.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Keeps lessnat's table holding a table until dropped: a thread listens to
/// nftables events in the namespace and [`reassert`]s the table whenever
/// something in `inet lessnat` is deleted.
#[derive(Debug)]
pub struct TableWatch {
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TableWatch {
    /// Starts watching `netns` for deletions in lessnat's table, keeping it
    /// holding `wanted`.
    pub fn start(netns: &Netns, wanted: &NftTable) -> Result<TableWatch, NftError> {
        let socket = netns.run(open_events)?.map_err(|source| NftError::Watch {
            netns: netns.to_string(),
            source,
        })?;
        let shared = Arc::new(Shared {
            netns: netns.clone(),
            wanted: wanted.clone(),
            tally: Mutex::default(),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("lessnat-table-watch".into())
            .spawn({
                let shared = Arc::clone(&shared);
                let stop = Arc::clone(&stop);
                move || watch(&socket, &shared, &stop)
            })
            .map_err(|source| NftError::Watch {
                netns: netns.to_string(),
                source,
            })?;
        Ok(TableWatch {
            shared,
            stop,
            thread: Some(thread),
        })
    }

    /// [`reassert`]s the table now and returns how many times it was written
    /// since the last call, by the watch thread or now. A failure of the
    /// watch thread is returned once, here.
    pub fn reassert(&self) -> Result<u32, NftError> {
        let mut tally = self.shared.tally();
        if let Some(error) = tally.failed.take() {
            return Err(error);
        }
        if reassert(&self.shared.netns, &self.shared.wanted)? {
            tally.restored += 1;
        }
        Ok(std::mem::take(&mut tally.restored))
    }
}

impl Drop for TableWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            // A panic in the thread has nothing left to report.
            let _ = thread.join();
        }
    }
}

/// A socket subscribed to nf_tables events in the calling thread's namespace,
/// whose reads time out so that the watch thread sees when to end.
pub(super) fn open_events() -> std::io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_NETFILTER)?;
    socket.bind_auto()?;
    socket.add_membership(NFNLGRP_NFTABLES)?;
    socket.set_rx_buf_sz(EVENT_BUFFER)?;
    setsockopt(
        &socket,
        sockopt::ReceiveTimeout,
        &TimeVal::milliseconds(STOP_CHECK_MS),
    )?;
    Ok(socket)
}

/// The watch thread: waits for events; after a batch that deletes something
/// in lessnat's table (or after lost events), reasserts the table.
fn watch(socket: &Socket, shared: &Shared, stop: &AtomicBool) {
    let mut buffer = vec![0; EVENT_BUFFER];
    while !stop.load(Ordering::SeqCst) {
        let mut touched = false;
        let mut flags = 0;
        // The first read waits (up to the timeout); the rest take what is queued.
        loop {
            match socket.recv(&mut &mut buffer[..], flags) {
                Ok(size) => touched |= deletes_in_own_table(buffer.get(..size).unwrap_or_default()),
                Err(error) => {
                    // ENOBUFS: events were lost, so look.
                    touched |= error.raw_os_error() == Some(nix::libc::ENOBUFS);
                    break;
                }
            }
            flags = nix::libc::MSG_DONTWAIT;
        }
        if touched {
            let mut tally = shared.tally();
            match reassert(&shared.netns, &shared.wanted) {
                Ok(wrote) => tally.restored += u32::from(wrote),
                Err(error) => {
                    tally.failed.get_or_insert(error);
                }
            }
        }
    }
}

/// Whether a datagram of nf_tables events deletes anything in `inet lessnat`.
fn deletes_in_own_table(datagram: &[u8]) -> bool {
    in_own_table(datagram, |kind| DELETIONS.contains(&kind))
}

/// Whether a datagram of nf_tables events adds, changes or deletes anything
/// in `inet lessnat`.
pub(super) fn changes_own_table(datagram: &[u8]) -> bool {
    in_own_table(datagram, |_| true)
}

/// Whether a datagram holds an nf_tables event of a kind `wanted` accepts
/// (`NFT_MSG_*`) about `inet lessnat`.
fn in_own_table(mut datagram: &[u8], wanted: impl Fn(u16) -> bool) -> bool {
    let mut found = false;
    while let Ok(message) = NetlinkBuffer::new_checked(datagram) {
        let length = message.length() as usize;
        let kind = message.message_type();
        let payload = message.payload();
        found |= kind >> 8 == NFNL_SUBSYS_NFTABLES
            && wanted(kind & 0xff)
            && payload.first() == Some(&FAMILY_INET)
            && names_own_table(payload.get(4..).unwrap_or_default());
        datagram = datagram
            .get(length.next_multiple_of(4).max(1)..)
            .unwrap_or_default();
    }
    found
}

/// Whether the attributes after an event's `nfgenmsg` name lessnat's table.
fn names_own_table(attributes: &[u8]) -> bool {
    NlasIterator::new(attributes).flatten().any(|attribute| {
        attribute.kind() & 0x3fff == ATTRIBUTE_TABLE
            && attribute.value().strip_suffix(b"\0") == Some(NFT_TABLE.as_bytes())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One nf_tables event of `kind` in `family` naming `table`.
    fn event(kind: u16, family: u8, table: &str) -> Vec<u8> {
        let mut name = table.as_bytes().to_vec();
        name.push(0);
        let attribute_length = 4 + name.len();
        let mut attribute = Vec::new();
        attribute.extend((attribute_length as u16).to_ne_bytes());
        attribute.extend(ATTRIBUTE_TABLE.to_ne_bytes());
        attribute.extend(name);
        attribute.resize(attribute_length.next_multiple_of(4), 0);
        let mut payload = vec![family, 0, 0, 0];
        payload.extend(attribute);
        let mut message = Vec::new();
        message.extend(((16 + payload.len()) as u32).to_ne_bytes());
        message.extend(((NFNL_SUBSYS_NFTABLES << 8) | kind).to_ne_bytes());
        message.extend([0; 10]);
        message.extend(payload);
        message
    }

    #[test]
    fn only_deletions_in_lessnat_table_count() {
        assert!(deletes_in_own_table(&event(2, FAMILY_INET, "lessnat")));
        assert!(deletes_in_own_table(&event(14, FAMILY_INET, "lessnat")));
        // A new table, another table, another family.
        assert!(!deletes_in_own_table(&event(0, FAMILY_INET, "lessnat")));
        assert!(!deletes_in_own_table(&event(2, FAMILY_INET, "filter")));
        assert!(!deletes_in_own_table(&event(2, 2, "lessnat")));
        assert!(!deletes_in_own_table(&event(2, FAMILY_INET, "lessnat2")));
        // Several messages in one datagram, as a `flush ruleset` sends them.
        let batch = [
            event(8, FAMILY_INET, "filter"),
            event(2, FAMILY_INET, "lessnat"),
        ]
        .concat();
        assert!(deletes_in_own_table(&batch));
        assert!(!deletes_in_own_table(&[1, 2, 3]));
        // Additions count as changes, in lessnat's table only.
        assert!(changes_own_table(&event(6, FAMILY_INET, "lessnat")));
        assert!(changes_own_table(&event(2, FAMILY_INET, "lessnat")));
        assert!(!changes_own_table(&event(6, FAMILY_INET, "filter")));
    }
}
