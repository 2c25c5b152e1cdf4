//! Established TCP connections counted from the sockets themselves, over
//! sock_diag (`NETLINK_SOCK_DIAG`, the inet_diag dumps `ss` reads): what a
//! plan shows of a host-mode service's connections while it upgrades. The
//! old version's connections are its sockets on the service's port, the next
//! version's (behind the redirect) its sockets on the temporary port.
//!
//! The kernel filters the dump: a state mask (`ESTABLISHED` only) and a
//! bytecode program on the local port, so only the sockets counted are
//! copied. It still walks its TCP hash of established sockets, which all
//! namespaces share (their `TIME_WAIT` sockets included), once per address
//! family; unlike a conntrack dump it never walks the conntrack table, so
//! its cost does not grow with conntrack entries (UDP flows, forwarded
//! flows, other namespaces' connections).

use std::collections::BTreeMap;
use std::io;

use netlink_packet_core::{
    DecodeError, NLA_HEADER_SIZE, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    Parseable,
};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_packet_sock_diag::constants::{
    AF_INET, AF_INET6, IPPROTO_TCP, SOCK_DIAG_BY_FAMILY, TCP_ESTABLISHED,
};
use netlink_packet_sock_diag::inet::{
    ExtensionFlags, InetRequest, InetResponseHeader, SocketId, StateFlags,
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

use super::netlink_answer::{self, AnswerError};
use crate::model::PortConnections;
use crate::netns::{Netns, NetnsError};

/// `INET_DIAG_REQ_BYTECODE` (`inet_diag.h`): the request attribute holding
/// the filter program.
const INET_DIAG_REQ_BYTECODE: u16 = 1;
/// Bytecode operations (`INET_DIAG_BC_*`): jump, and local port ≥ / ≤ the
/// value in the next operation's `no` field. (Older than `S_EQ`, which
/// needs Linux 4.17.)
const BC_JMP: u8 = 1;
const BC_S_GE: u8 = 2;
const BC_S_LE: u8 = 3;
/// One bytecode operation (`struct inet_diag_bc_op`): code, yes, no.
const OP: usize = 4;
/// The program matching one port: `S_GE port` and `S_LE port`, each
/// followed by the operation carrying the port, then a jump.
const PORT_PROGRAM: usize = 5 * OP;
/// Ports per dump: the program's jumps are 16-bit offsets.
const PORTS_PER_DUMP: usize = 1_000;
/// The largest datagram a dump sends is 32 KiB; leave room.
const RECEIVE_BUFFER: usize = 64 * 1024;

/// Counting sockets over sock_diag failed.
#[derive(Debug, thiserror::Error)]
pub enum SockDiagError {
    /// The network namespace could not be entered.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// A netlink operation failed (or the kernel has no inet_diag).
    #[error("sock_diag in {netns}: cannot {doing}")]
    Io {
        /// Where.
        netns: String,
        /// What lessnat was doing.
        doing: &'static str,
        /// Why.
        source: io::Error,
    },
    /// The kernel's answer did not parse.
    #[error("sock_diag in {netns}: cannot decode the kernel's answer")]
    Decode {
        /// Where.
        netns: String,
        /// Why.
        source: DecodeError,
    },
}

/// A failure inside the namespace thread, before it is placed in a namespace.
enum Fault {
    Io(&'static str, io::Error),
    Decode(DecodeError),
}

impl Fault {
    fn within(self, netns: &Netns) -> SockDiagError {
        let netns = netns.to_string();
        match self {
            Fault::Io(doing, source) => SockDiagError::Io {
                netns,
                doing,
                source,
            },
            Fault::Decode(source) => SockDiagError::Decode { netns, source },
        }
    }
}

/// Counts the TCP sockets of `netns` in state `ESTABLISHED` whose local port
/// is one of `ports` (IPv4 and IPv6, IPv4-mapped included): each port once,
/// in order, zeros included. Listening sockets and the client side of
/// connections (an ephemeral local port) are not counted.
pub fn established(netns: &Netns, ports: &[u16]) -> Result<Vec<PortConnections>, SockDiagError> {
    let mut counts: BTreeMap<u16, u64> = ports.iter().map(|&port| (port, 0)).collect();
    if counts.is_empty() {
        return Ok(Vec::new());
    }
    let wanted: Vec<u16> = counts.keys().copied().collect();
    netns
        .run(|| count_here(&wanted, &mut counts))?
        .map_err(|fault| fault.within(netns))?;
    Ok(counts
        .into_iter()
        .map(|(port, established)| PortConnections { port, established })
        .collect())
}

fn count_here(ports: &[u16], counts: &mut BTreeMap<u16, u64>) -> Result<(), Fault> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)
        .map_err(|error| Fault::Io("open a sock_diag netlink socket", error))?;
    socket
        .bind_auto()
        .map_err(|error| Fault::Io("bind the sock_diag netlink socket", error))?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(|error| Fault::Io("connect the sock_diag netlink socket", error))?;
    let mut buffer = vec![0; RECEIVE_BUFFER];
    let mut sequence = 0u32;
    for chunk in ports.chunks(PORTS_PER_DUMP) {
        let program = local_port_program(chunk);
        for family in [AF_INET, AF_INET6] {
            sequence = sequence.wrapping_add(1);
            send_dump(&socket, family, &program, sequence)
                .map_err(|error| Fault::Io("request a socket dump", error))?;
            netlink_answer::receive(&socket, &mut buffer, sequence, |kind, payload| {
                if kind != SOCK_DIAG_BY_FAMILY {
                    return Ok(());
                }
                let header = InetResponseHeader::parse(payload)?;
                // The kernel filtered for both; checked again all the same.
                if header.state == TCP_ESTABLISHED
                    && let Some(count) = counts.get_mut(&header.socket_id.source_port)
                {
                    *count += 1;
                }
                Ok(())
            })
            .map_err(|error| match error {
                AnswerError::Io(error) => Fault::Io("dump sockets", error),
                AnswerError::Decode(error) => Fault::Decode(error),
            })?;
        }
    }
    Ok(())
}

/// Sends a dump request for `family`'s TCP sockets in state `ESTABLISHED`
/// that `program` accepts. The crate has no request attributes: the
/// bytecode attribute is appended to its encoding here.
fn send_dump(socket: &Socket, family: u8, program: &[u8], sequence: u32) -> io::Result<()> {
    let socket_id = if family == AF_INET {
        SocketId::new_v4()
    } else {
        SocketId::new_v6()
    };
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = sequence;
    let mut packet = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::ESTABLISHED,
            socket_id,
        })
        .into(),
    );
    packet.finalize();
    let mut bytes = vec![0; packet.buffer_len()];
    packet.serialize(&mut bytes);
    let attribute_length = u16::try_from(NLA_HEADER_SIZE + program.len())
        .map_err(|_| io::Error::other("socket filter program too long"))?;
    bytes.extend_from_slice(&attribute_length.to_ne_bytes());
    bytes.extend_from_slice(&INET_DIAG_REQ_BYTECODE.to_ne_bytes());
    bytes.extend_from_slice(program);
    let length = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    if let Some(header) = bytes.first_chunk_mut::<4>() {
        *header = length.to_ne_bytes();
    }
    socket.send(&bytes, 0)?;
    Ok(())
}

/// An inet_diag bytecode program that accepts a socket whose local port is
/// one of `ports` (at most [`PORTS_PER_DUMP`]).
///
/// Each operation jumps forward by `yes` bytes when its condition holds and
/// by `no` bytes when not; landing exactly on the end accepts, jumping past
/// it rejects, and the kernel accepts only programs whose `no` targets lie on
/// the chain of `yes` steps. So each port's test falls through to a jump to
/// the end (accept) and fails over that jump to the next port's test; the
/// last port's failures jump past the end.
fn local_port_program(ports: &[u16]) -> Vec<u8> {
    let total = ports.len() * PORT_PROGRAM - OP;
    let mut program = Vec::with_capacity(total);
    let op = |program: &mut Vec<u8>, code: u8, yes: usize, no: usize| {
        program.push(code);
        program.push(u8::try_from(yes).unwrap_or(u8::MAX));
        let no = u16::try_from(no).unwrap_or(u16::MAX);
        program.extend_from_slice(&no.to_ne_bytes());
    };
    for (i, &port) in ports.iter().enumerate() {
        let start = i * PORT_PROGRAM;
        // Where a failed test goes: past this port's jump (the next port's
        // test), or past the end for the last port.
        let fail = start + PORT_PROGRAM;
        op(&mut program, BC_S_GE, 2 * OP, fail - start);
        op(&mut program, 0, 0, usize::from(port));
        op(&mut program, BC_S_LE, 2 * OP, fail - (start + 2 * OP));
        op(&mut program, 0, 0, usize::from(port));
        if i + 1 < ports.len() {
            let jump = start + 4 * OP;
            // A jump always takes `no`: to the end, accepting.
            op(&mut program, BC_JMP, OP, total - jump);
        }
    }
    program
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `program` on a socket with local port `port` as the kernel does
    /// (`inet_diag_bc_run`).
    fn accepts(program: &[u8], port: u16) -> bool {
        let mut at = 0usize;
        let len = program.len();
        while at < len {
            let code = program[at];
            let yes = usize::from(program[at + 1]);
            let no = usize::from(u16::from_ne_bytes([program[at + 2], program[at + 3]]));
            let value = || u16::from_ne_bytes([program[at + 6], program[at + 7]]);
            let holds = match code {
                BC_JMP => false,
                BC_S_GE => port >= value(),
                BC_S_LE => port <= value(),
                other => panic!("unexpected operation {other}"),
            };
            at += if holds { yes } else { no };
        }
        at == len
    }

    /// What the kernel checks before it runs a program
    /// (`inet_diag_bc_audit`): every jump lands inside, at the end, or just
    /// past it, on an operation reached by the `yes` chain.
    fn audit(program: &[u8]) {
        let len = program.len();
        let mut chain = vec![0usize];
        let mut at = 0;
        while at < len {
            at += usize::from(program[at + 1]);
            chain.push(at);
        }
        assert_eq!(at, len, "the yes chain ends exactly at the end");
        at = 0;
        while at < len {
            let yes = usize::from(program[at + 1]);
            let no = usize::from(u16::from_ne_bytes([program[at + 2], program[at + 3]]));
            let min = if program[at] == BC_JMP { OP } else { 2 * OP };
            assert!(yes >= min && yes % 4 == 0, "yes {yes} at {at}");
            assert!(
                no >= min && no % 4 == 0 && no <= len - at + 4,
                "no {no} at {at}"
            );
            if at + no < len {
                assert!(chain.contains(&(at + no)), "no at {at} lands off the chain");
            }
            at += yes;
        }
    }

    #[test]
    fn the_program_accepts_exactly_its_ports() {
        for ports in [
            vec![8000],
            vec![8000, 18000],
            vec![1, 443, 8000, 18000, 65535],
        ] {
            let program = local_port_program(&ports);
            audit(&program);
            for port in [
                0, 1, 2, 442, 443, 444, 7999, 8000, 8001, 18000, 65534, 65535,
            ] {
                assert_eq!(
                    accepts(&program, port),
                    ports.contains(&port),
                    "port {port} with {ports:?}"
                );
            }
        }
    }

    #[test]
    fn the_longest_program_fits_its_jumps() {
        let ports: Vec<u16> = (1..=u16::try_from(PORTS_PER_DUMP).unwrap()).collect();
        let program = local_port_program(&ports);
        assert!(program.len() + NLA_HEADER_SIZE <= usize::from(u16::MAX));
        audit(&program);
        assert!(accepts(&program, 1) && accepts(&program, 1000) && !accepts(&program, 1001));
    }

    #[test]
    fn no_ports_reads_nothing() {
        let counts = established(&Netns::Path("/nonexistent/netns".into()), &[]);
        assert!(counts.expect("nothing to read").is_empty());
    }
}
