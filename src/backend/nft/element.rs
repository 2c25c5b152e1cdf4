//! One redirect map element written or deleted over nf_tables netlink,
//! without an `nft` process: the redirect stage's cutover, where an `nft`
//! start-up is most of the time (and all of its tail under load).
//!
//! The element is sent as one nfnetlink batch (`NFNL_MSG_BATCH_BEGIN`, one
//! `NFT_MSG_NEWSETELEM` or `NFT_MSG_DELSETELEM`, `NFNL_MSG_BATCH_END`): the
//! kernel commits it as one transaction, as `nft -f` does. It is exactly the
//! element `nft add element inet lessnat redirect_tcp { P : T }` makes (a
//! 2-byte key and value, network order, no flags, no comment), so `nft -j
//! list` shows it as the table lessnat writes whole has it. The messages are
//! encoded here: `netlink-packet-netfilter` has no nf_tables messages, and
//! three messages of a few attributes do not need a C library (`libnftnl`).

use std::io;

use netlink_packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST, NLMSG_ERROR, NetlinkBuffer};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};
use nix::sys::socket::{setsockopt, sockopt};
use nix::sys::time::{TimeVal, TimeValLike};

use crate::model::{Redirect, redirect_map_name};
use crate::ownership::NFT_TABLE;

/// The nfnetlink subsystem of nf_tables.
const NFNL_SUBSYS_NFTABLES: u16 = 10;
/// `NFNL_MSG_BATCH_BEGIN` and `NFNL_MSG_BATCH_END`.
const BATCH_BEGIN: u16 = 0x10;
const BATCH_END: u16 = 0x11;
/// `NFT_MSG_NEWSETELEM` and `NFT_MSG_DELSETELEM`.
const NEW_ELEMENT: u16 = 12;
const DELETE_ELEMENT: u16 = 14;
/// `NFPROTO_INET`: the family of lessnat's table.
const FAMILY_INET: u8 = 1;
/// `NFTA_SET_ELEM_LIST_TABLE`, `_SET`, `_ELEMENTS`.
const LIST_TABLE: u16 = 1;
const LIST_SET: u16 = 2;
const LIST_ELEMENTS: u16 = 3;
/// `NFTA_LIST_ELEM`.
const LIST_ELEMENT: u16 = 1;
/// `NFTA_SET_ELEM_KEY`, `NFTA_SET_ELEM_DATA`.
const ELEMENT_KEY: u16 = 1;
const ELEMENT_DATA: u16 = 2;
/// `NFTA_DATA_VALUE`.
const DATA_VALUE: u16 = 1;
/// `NLA_F_NESTED`.
const NESTED: u16 = 0x8000;
/// How long to wait for the kernel's answer before giving up.
const ANSWER_TIMEOUT_MS: i64 = 5_000;

/// Adds (`present`) or deletes the element of `redirect` in lessnat's
/// redirect map, in one transaction, in the calling thread's network
/// namespace. Deleting an absent element (or one whose map or table is gone)
/// succeeds; adding one whose port is already redirected elsewhere fails
/// (`EEXIST`), as `nft add element` does.
pub(super) fn set(redirect: &Redirect, present: bool) -> io::Result<()> {
    let mut socket = Socket::new(NETLINK_NETFILTER)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    setsockopt(
        &socket,
        sockopt::ReceiveTimeout,
        &TimeVal::milliseconds(ANSWER_TIMEOUT_MS),
    )?;
    // Sequence numbers only need to tell this batch's messages apart on a
    // socket of its own.
    let batch = encode(redirect, present, 1);
    socket.send(&batch, 0)?;
    match wait_ack(&socket, 2) {
        Err(error) if !present && error.raw_os_error() == Some(nix::libc::ENOENT) => Ok(()),
        result => result,
    }
}

/// The batch: begin (sequence `first`), the element message (`first + 1`,
/// acknowledged), end (`first + 2`).
fn encode(redirect: &Redirect, present: bool, first: u32) -> Vec<u8> {
    let mut element = Vec::new();
    nested(&mut element, ELEMENT_KEY, |key| {
        attribute(key, DATA_VALUE, &redirect.port.to_be_bytes());
    });
    if present {
        nested(&mut element, ELEMENT_DATA, |data| {
            attribute(data, DATA_VALUE, &redirect.temp_port.to_be_bytes());
        });
    }
    let mut attributes = Vec::new();
    attribute(&mut attributes, LIST_TABLE, &c_string(NFT_TABLE));
    attribute(
        &mut attributes,
        LIST_SET,
        &c_string(&redirect_map_name(redirect.protocol)),
    );
    nested(&mut attributes, LIST_ELEMENTS, |list| {
        attribute(list, LIST_ELEMENT | NESTED, &element);
    });
    let (kind, flags) = if present {
        (NEW_ELEMENT, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK)
    } else {
        (DELETE_ELEMENT, NLM_F_REQUEST | NLM_F_ACK)
    };
    let mut batch = Vec::new();
    // The batch messages name the subsystem in `res_id`, big-endian.
    message(
        &mut batch,
        BATCH_BEGIN,
        NLM_F_REQUEST,
        first,
        0,
        NFNL_SUBSYS_NFTABLES,
        &[],
    );
    message(
        &mut batch,
        (NFNL_SUBSYS_NFTABLES << 8) | kind,
        flags,
        first + 1,
        FAMILY_INET,
        0,
        &attributes,
    );
    message(
        &mut batch,
        BATCH_END,
        NLM_F_REQUEST,
        first + 2,
        0,
        NFNL_SUBSYS_NFTABLES,
        &[],
    );
    batch
}

/// Appends one netlink message with an `nfgenmsg` header.
fn message(
    out: &mut Vec<u8>,
    kind: u16,
    flags: u16,
    sequence: u32,
    family: u8,
    resource: u16,
    attributes: &[u8],
) {
    let length = 16 + 4 + attributes.len();
    out.extend(u32::try_from(length).unwrap_or(u32::MAX).to_ne_bytes());
    out.extend(kind.to_ne_bytes());
    out.extend(flags.to_ne_bytes());
    out.extend(sequence.to_ne_bytes());
    out.extend(0u32.to_ne_bytes());
    out.push(family);
    out.push(0);
    out.extend(resource.to_be_bytes());
    out.extend(attributes);
}

/// Appends one attribute, padded to 4 bytes.
fn attribute(out: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let length = 4 + value.len();
    out.extend(u16::try_from(length).unwrap_or(u16::MAX).to_ne_bytes());
    out.extend(kind.to_ne_bytes());
    out.extend(value);
    out.resize(out.len().next_multiple_of(4), 0);
}

/// Appends a nested attribute whose content `fill` writes.
fn nested(out: &mut Vec<u8>, kind: u16, fill: impl FnOnce(&mut Vec<u8>)) {
    let mut inner = Vec::new();
    fill(&mut inner);
    attribute(out, kind | NESTED, &inner);
}

fn c_string(text: &str) -> Vec<u8> {
    let mut bytes = text.as_bytes().to_vec();
    bytes.push(0);
    bytes
}

/// Reads answers until the kernel acknowledges message `sequence` or refuses
/// any message of the batch (a refusal of the batch itself comes with the
/// sequence of its begin message).
fn wait_ack(socket: &Socket, sequence: u32) -> io::Result<()> {
    let mut buffer = vec![0; 8192];
    loop {
        let size = socket.recv(&mut &mut buffer[..], 0)?;
        let mut rest = buffer.get(..size).unwrap_or_default();
        while let Ok(message) = NetlinkBuffer::new_checked(rest) {
            let length = message.length() as usize;
            if message.message_type() == NLMSG_ERROR {
                let code = message
                    .payload()
                    .first_chunk::<4>()
                    .map_or(0, |bytes| i32::from_ne_bytes(*bytes));
                if code != 0 {
                    return Err(io::Error::from_raw_os_error(code.saturating_neg()));
                }
                if message.sequence_number() == sequence {
                    return Ok(());
                }
            }
            rest = rest
                .get(length.next_multiple_of(4).max(1)..)
                .unwrap_or_default();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Protocol;

    #[test]
    fn the_batch_is_begin_element_end() {
        let redirect = Redirect {
            protocol: Protocol::Tcp,
            port: 8000,
            temp_port: 18000,
        };
        let batch = encode(&redirect, true, 7);
        let mut kinds = Vec::new();
        let mut rest = &batch[..];
        while let Ok(message) = NetlinkBuffer::new_checked(rest) {
            kinds.push((message.message_type(), message.sequence_number()));
            rest = &rest[message.length() as usize..];
        }
        assert_eq!(kinds, [(0x10, 7), (0x0a0c, 8), (0x11, 9)]);
        let find = |needle: &[u8]| batch.windows(needle.len()).any(|w| w == needle);
        assert!(find(b"lessnat\0"));
        assert!(find(b"redirect_tcp\0"));
        // The key and the value, network order, each in a 6-byte NFTA_DATA_VALUE.
        assert!(find(&[6, 0, 1, 0, 0x1f, 0x40]));
        assert!(find(&[6, 0, 1, 0, 0x46, 0x50]));
        let deleting = encode(&redirect, false, 1);
        assert!(!deleting.windows(2).any(|w| w == [0x46, 0x50]), "no value");
    }
}
