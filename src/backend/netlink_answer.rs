//! Reading the answer to one netlink request (a dump, a lookup, a change):
//! its messages one datagram at a time, until the kernel's `NLMSG_DONE` or
//! `NLMSG_ERROR` ends it. Shared by the ctnetlink and sock_diag readers.

use std::io;

use netlink_packet_core::{DecodeError, NLMSG_DONE, NLMSG_ERROR, NetlinkBuffer};
use netlink_sys::Socket;

/// Why an answer could not be read.
#[derive(Debug)]
pub(super) enum AnswerError {
    /// Receiving failed, or the kernel refused the request (its errno).
    Io(io::Error),
    /// A message did not parse.
    Decode(DecodeError),
}

/// Reads the answer to request `sequence` on `socket` into `buffer`, handing
/// each of its messages (type and payload) to `each` as it arrives; messages
/// of other requests are skipped.
pub(super) fn receive(
    socket: &Socket,
    buffer: &mut [u8],
    sequence: u32,
    mut each: impl FnMut(u16, &[u8]) -> Result<(), DecodeError>,
) -> Result<(), AnswerError> {
    loop {
        let size = socket
            .recv(&mut &mut buffer[..], nix::libc::MSG_TRUNC)
            .map_err(AnswerError::Io)?;
        if size > buffer.len() {
            return Err(AnswerError::Io(io::Error::other(format!(
                "netlink datagram of {size} bytes truncated"
            ))));
        }
        let mut rest = &buffer[..size];
        while !rest.is_empty() {
            let message = NetlinkBuffer::new_checked(rest).map_err(AnswerError::Decode)?;
            let length = message.length() as usize;
            rest = rest.get(length.next_multiple_of(4)..).unwrap_or_default();
            if message.sequence_number() != sequence {
                continue;
            }
            match message.message_type() {
                NLMSG_ERROR | NLMSG_DONE => {
                    return status(message.payload()).map_err(AnswerError::Io);
                }
                kind => each(kind, message.payload()).map_err(AnswerError::Decode)?,
            }
        }
    }
}

/// The status code that ends an answer (`NLMSG_ERROR`, or `NLMSG_DONE` of a
/// dump): 0 is success, otherwise a negated errno.
fn status(payload: &[u8]) -> io::Result<()> {
    let code = payload
        .first_chunk::<4>()
        .map_or(0, |bytes| i32::from_ne_bytes(*bytes));
    if code == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(code.saturating_neg()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_status_codes() {
        assert!(status(&0i32.to_ne_bytes()).is_ok());
        assert!(status(&[]).is_ok());
        let error = status(&(-nix::libc::ENOENT).to_ne_bytes()).expect_err("an error");
        assert_eq!(error.raw_os_error(), Some(nix::libc::ENOENT));
    }
}
