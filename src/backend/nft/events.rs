//! Notice of changes to lessnat's table as they happen: a subscription to the
//! nf_tables events of a namespace (`NFNLGRP_NFTABLES`), which reports every
//! committed transaction, so nothing polls. The agent wakes on them to put
//! back a table someone deleted or edited.

use netlink_sys::Socket;

use super::NftError;
use super::watch::{changes_own_table, open_events};
use crate::netns::Netns;

/// Receive buffer for one read: a `flush ruleset` reports every object of
/// every table at once.
const READ_BUFFER: usize = 1 << 20;

/// A subscription to nf_tables events in one namespace.
#[derive(Debug)]
pub struct TableEvents {
    socket: Socket,
    buffer: Vec<u8>,
}

impl TableEvents {
    /// Subscribes to the nf_tables events of `netns`.
    pub fn subscribe(netns: &Netns) -> Result<TableEvents, NftError> {
        let socket = netns.run(open_events)?.map_err(|source| NftError::Watch {
            netns: netns.to_string(),
            source,
        })?;
        Ok(TableEvents {
            socket,
            buffer: vec![0; READ_BUFFER],
        })
    }

    /// Waits up to a tenth of a second for events, then takes whatever else
    /// is queued; returns whether any of them added, changed or deleted
    /// something in lessnat's table (or events were lost, so it may have).
    pub fn next_batch(&mut self) -> bool {
        let mut touched = false;
        let mut flags = 0;
        loop {
            match self.socket.recv(&mut &mut self.buffer[..], flags) {
                Ok(size) => {
                    touched |= changes_own_table(self.buffer.get(..size).unwrap_or_default());
                }
                Err(error) => {
                    touched |= error.raw_os_error() == Some(nix::libc::ENOBUFS);
                    break;
                }
            }
            flags = nix::libc::MSG_DONTWAIT;
        }
        touched
    }
}
