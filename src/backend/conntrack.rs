//! Connection tracking over ctnetlink (`NETLINK_NETFILTER`): counts the
//! kernel's conntrack entries by protocol, ports and TCP state (what the drain
//! stages wait on) and deletes the entries that keep a UDP service's flows
//! where they should no longer go (UDP has nothing to drain).
//!
//! Every read names the entries it is about ([`Interest`]: a port, or the
//! address replies come from) and the kernel filters the table for them
//! (ctnetlink dump filters, `CTA_FILTER`, Linux 5.8+; on older kernels the
//! whole table is dumped and filtered here). The kernel still walks its
//! table, but the entries of everything else on the host are neither
//! copied nor parsed, so a read costs about the same with 100k unrelated
//! entries as with none. Answers are parsed one netlink message at a time:
//! only the aggregated counts (and, when deleting, the entries that match)
//! are kept.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use netlink_packet_core::{
    DecodeError, DefaultNla, NLA_F_NESTED, NLA_HEADER_SIZE, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NlaBuffer, NlasIterator, Parseable,
};
use netlink_packet_netfilter::conntrack::{
    ConntrackAttribute, ConntrackMessage, IPTuple, ProtoInfo, ProtoInfoTCP, ProtoTuple,
    Protocol as CtProtocol, Tuple,
};
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

use super::netlink_answer::{self, AnswerError};
use crate::error::chain;
use crate::model::{ConntrackState, FlowCount};
use crate::netns::{Netns, NetnsError};
use crate::spec::Protocol;

/// Where the per-namespace conntrack sysctls live.
const SYSCTL_DIR: &str = "/proc/sys/net/netfilter";
/// A table at least this full (in percent) makes drain counts unreliable.
pub const FULL_PERCENT: u64 = 90;

// Netfilter subsystem and ctnetlink constants the crate does not export
// (include/uapi/linux/netfilter/nfnetlink{,_conntrack}.h).
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_PROTOINFO: u16 = 4;
const CTA_ID: u16 = 12;
const CTA_ZONE: u16 = 18;
const CTA_FILTER: u16 = 25;
const CTA_FILTER_ORIG_FLAGS: u16 = 1;
const CTA_FILTER_REPLY_FLAGS: u16 = 2;
/// `CTA_FILTER_F_*` (`nf_internals.h`): which fields of a tuple a dump filter compares.
const FILTER_IP_SRC: u32 = 1 << 0;
const FILTER_PROTO_NUM: u32 = 1 << 3;
const FILTER_PROTO_SRC_PORT: u32 = 1 << 4;
const FILTER_PROTO_DST_PORT: u32 = 1 << 5;
/// Each filtered dump makes the kernel walk its whole hash table (all
/// namespaces' entries, and every bucket: ~8 ms for an empty table of 262144
/// buckets on a busy 2-CPU machine); a whole dump walks it once and copies
/// and parses this namespace's entries (~3 µs each). Filters pay off when
/// each extra walk saves at least this many entries' copying.
const ENTRIES_PER_WALK: u64 = 2_500;
/// More filtered dumps than this per read cost more than one whole dump in
/// any case.
const MAX_FILTERED_DUMPS: usize = 32;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
/// `IPS_SRC_NAT` and `IPS_DST_NAT` (`nf_conntrack_common.h`): the entry's
/// source or destination is rewritten. Unlike the `_DONE` bits, which every
/// entry that passed a nat hook has (null bindings included), they are set
/// only by a real rewrite: a redirect, or the kernel's answer to a clash.
const IPS_SRC_NAT: u32 = 1 << 4;
const IPS_DST_NAT: u32 = 1 << 5;
/// How often [`settle_udp_flows`] dumps the table again.
const SETTLE_INTERVAL: Duration = Duration::from_millis(40);
/// How long the table must stay free of misplaced entries: answers a server
/// still sends from its queue after a flow's entry went open new entries for
/// that long.
const SETTLE_QUIET: Duration = Duration::from_millis(200);
/// When [`settle_udp_flows`] stops even if misplaced entries keep coming back.
const SETTLE_LIMIT: Duration = Duration::from_secs(3);
/// The largest datagram a netlink dump sends is 32 KiB; leave room.
const RECEIVE_BUFFER: usize = 64 * 1024;

/// Reading or changing the conntrack table failed.
#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    /// The network namespace could not be entered.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// Conntrack is not usable there (module not loaded, ctnetlink missing).
    #[error("conntrack is not available in {netns}: {reason}")]
    Unavailable {
        /// Where.
        netns: String,
        /// Why, as [`ConntrackState::unavailable_reason`] reports it.
        reason: String,
    },
    /// A netlink or /proc operation failed.
    #[error("conntrack in {netns}: cannot {doing}")]
    Io {
        /// Where.
        netns: String,
        /// What lessnat was doing.
        doing: String,
        /// Why.
        source: io::Error,
    },
    /// The kernel's answer did not parse.
    #[error("conntrack in {netns}: cannot decode the kernel's answer")]
    Decode {
        /// Where.
        netns: String,
        /// Why.
        source: DecodeError,
    },
}

/// A failure inside the namespace thread, before it is placed in a namespace.
#[derive(Debug)]
pub(super) enum Fault {
    Unavailable(String),
    Io(String, io::Error),
    Decode(DecodeError),
}

impl Fault {
    pub(super) fn io(doing: impl Into<String>) -> impl FnOnce(io::Error) -> Fault {
        let doing = doing.into();
        move |source| Fault::Io(doing, source)
    }

    pub(super) fn within(self, netns: &Netns) -> ConntrackError {
        let netns = netns.to_string();
        match self {
            Fault::Unavailable(reason) => ConntrackError::Unavailable { netns, reason },
            Fault::Io(doing, source) => ConntrackError::Io {
                netns,
                doing,
                source,
            },
            Fault::Decode(source) => ConntrackError::Decode { netns, source },
        }
    }
}

/// Which conntrack entries a read or a watch is about. The kernel filters its
/// table for them, so unrelated entries cost (almost) nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Interest {
    /// Entries of `protocol` whose original destination port is `port` (what
    /// clients dialled), answered from port `answered_from` (the reply's
    /// source port: the canonical port, or the temporary one after a
    /// redirect) when given.
    ToPort {
        /// TCP or UDP.
        protocol: Protocol,
        /// The original destination port.
        port: u16,
        /// The reply's source port, if it matters.
        answered_from: Option<u16>,
    },
    /// Entries of `protocol` whose original source port is `port`: entries
    /// opened by what listens on `port` (a UDP server's answer).
    FromPort {
        /// TCP or UDP.
        protocol: Protocol,
        /// The original source port.
        port: u16,
    },
    /// Entries whose reply comes from `address` (a routed replica).
    ReplyFrom(IpAddr),
}

impl Interest {
    /// Whether `entry` is one this interest is about (what the kernel's
    /// filter keeps).
    pub(super) fn matches(&self, entry: &Entry<'_>) -> bool {
        match *self {
            Interest::ToPort {
                protocol,
                port,
                answered_from,
            } => {
                let orig = ports(&entry.orig);
                let reply = ports(&entry.reply);
                orig.is_some_and(|(p, _, dport)| p == ip_protocol(protocol) && dport == port)
                    && answered_from.is_none_or(|from| reply.is_some_and(|(_, s, _)| s == from))
            }
            Interest::FromPort { protocol, port } => ports(&entry.orig)
                .is_some_and(|(p, sport, _)| p == ip_protocol(protocol) && sport == port),
            Interest::ReplyFrom(address) => source_address(&entry.reply) == Some(address),
        }
    }

    /// The dump requests that make the kernel send exactly the entries of
    /// this interest: the tuple attributes and the `CTA_FILTER` attribute
    /// (encoded here: the crate cannot flag an attribute as nested, and the
    /// kernel insists). A filter needs an address family, so ports take one
    /// request per family.
    fn requests(&self) -> Vec<(NetfilterProtoFamily, Vec<ConntrackAttribute>, Vec<u8>)> {
        let proto = |protocol: Protocol, part: ProtoTuple| {
            vec![Tuple::Proto(vec![
                ProtoTuple::Protocol(match protocol {
                    Protocol::Tcp => CtProtocol::Tcp,
                    Protocol::Udp => CtProtocol::Udp,
                }),
                part,
            ])]
        };
        let both = |attributes: Vec<ConntrackAttribute>, filter: Vec<u8>| {
            [NetfilterProtoFamily::IPv4, NetfilterProtoFamily::IPv6]
                .into_iter()
                .map(|family| (family, attributes.clone(), filter.clone()))
                .collect()
        };
        match *self {
            Interest::ToPort {
                protocol,
                port,
                answered_from,
            } => {
                let mut attributes = vec![ConntrackAttribute::CtaTupleOrig(proto(
                    protocol,
                    ProtoTuple::DestinationPort(port),
                ))];
                let mut reply_flags = 0;
                if let Some(from) = answered_from {
                    attributes.push(ConntrackAttribute::CtaTupleReply(proto(
                        protocol,
                        ProtoTuple::SourcePort(from),
                    )));
                    reply_flags = FILTER_PROTO_NUM | FILTER_PROTO_SRC_PORT;
                }
                both(
                    attributes,
                    filter(FILTER_PROTO_NUM | FILTER_PROTO_DST_PORT, reply_flags),
                )
            }
            Interest::FromPort { protocol, port } => both(
                vec![ConntrackAttribute::CtaTupleOrig(proto(
                    protocol,
                    ProtoTuple::SourcePort(port),
                ))],
                filter(FILTER_PROTO_NUM | FILTER_PROTO_SRC_PORT, 0),
            ),
            Interest::ReplyFrom(address) => {
                let family = match address {
                    IpAddr::V4(_) => NetfilterProtoFamily::IPv4,
                    IpAddr::V6(_) => NetfilterProtoFamily::IPv6,
                };
                let reply = vec![Tuple::Ip(vec![IPTuple::SourceAddress(address)])];
                vec![(
                    family,
                    vec![ConntrackAttribute::CtaTupleReply(reply)],
                    filter(0, FILTER_IP_SRC),
                )]
            }
        }
    }
}

/// A `CTA_FILTER` attribute, header included: which fields of the original
/// and reply tuples given beside it the kernel compares.
fn filter(orig_flags: u32, reply_flags: u32) -> Vec<u8> {
    let mut value = Vec::new();
    for (kind, flags) in [
        (CTA_FILTER_ORIG_FLAGS, orig_flags),
        (CTA_FILTER_REPLY_FLAGS, reply_flags),
    ] {
        if flags != 0 {
            // An attribute header (length 8, kind) and a u32 in host order.
            value.extend_from_slice(&8u16.to_ne_bytes());
            value.extend_from_slice(&kind.to_ne_bytes());
            value.extend_from_slice(&flags.to_ne_bytes());
        }
    }
    let length = u16::try_from(NLA_HEADER_SIZE + value.len()).unwrap_or(u16::MAX);
    let mut attribute = Vec::with_capacity(NLA_HEADER_SIZE + value.len());
    attribute.extend_from_slice(&length.to_ne_bytes());
    attribute.extend_from_slice(&(CTA_FILTER | NLA_F_NESTED).to_ne_bytes());
    attribute.extend_from_slice(&value);
    attribute
}

fn ip_protocol(protocol: Protocol) -> u8 {
    match protocol {
        Protocol::Tcp => IPPROTO_TCP,
        Protocol::Udp => IPPROTO_UDP,
    }
}

/// Reads the conntrack table of `netns` for `interests`: entry counts by
/// protocol (TCP and UDP only), original destination port, reply source port
/// and TCP state, plus the table's fill level (read from its sysctls, never by
/// a dump). Without interests nothing is dumped. When conntrack cannot be used
/// there the result has `available: false` and the reason, not an error.
pub fn observe(netns: &Netns, interests: &[Interest]) -> Result<ConntrackState, ConntrackError> {
    match netns.run(|| observe_here(interests))? {
        Ok(state) => Ok(state),
        Err(Fault::Unavailable(reason)) => Ok(ConntrackState {
            available: false,
            unavailable_reason: Some(reason),
            ..ConntrackState::default()
        }),
        Err(fault) => Err(fault.within(netns)),
    }
}

/// What makes `state` unreliable for drain decisions, as sentences for the user.
pub fn warnings(state: &ConntrackState) -> Vec<String> {
    let mut warnings = Vec::new();
    if !state.available {
        let reason = state
            .unavailable_reason
            .as_deref()
            .unwrap_or("unknown reason");
        warnings.push(format!(
            "conntrack is not available ({reason}): lessnat cannot count the connections \
             an upgrade waits for, nor move UDP flows"
        ));
        return warnings;
    }
    if state.table_max > 0 && state.table_count * 100 >= state.table_max * FULL_PERCENT {
        let percent = state.table_count * 100 / state.table_max;
        warnings.push(format!(
            "the conntrack table is {percent}% full ({} of {} entries): the kernel drops \
             entries when it fills up, so drain counts may miss live connections; raise \
             net.netfilter.nf_conntrack_max (e.g. sysctl -w net.netfilter.nf_conntrack_max={})",
            state.table_count,
            state.table_max,
            state.table_max.saturating_mul(2),
        ));
    }
    warnings
}

/// One UDP port of a service whose flows lessnat moves, and where new flows
/// to it go now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpPort {
    /// The canonical port clients send to.
    pub port: u16,
    /// The next version's temporary port, if the service has one.
    pub temp_port: Option<u16>,
    /// Where lessnat's redirect sends new flows to `port` now (the temporary
    /// port), or `None` when no redirect is in place.
    pub redirected_to: Option<u16>,
}

impl UdpPort {
    /// Whether a UDP entry keeps a flow of this port where it should not go,
    /// or stands in the way of one going where it should:
    ///
    /// - a client's flow to `port` must be redirected (destination rewritten
    ///   to `redirected_to`, nothing else) while the redirect is in place, and
    ///   carry no NAT at all when it is not;
    /// - an entry opened by the answer of whatever listens on `port` (its
    ///   flow's entry was deleted while the answer was on its way) holds the
    ///   client's next datagrams in its reply direction, so it must go while
    ///   the redirect is in place;
    /// - an entry opened by the answer of the next version (on the temporary
    ///   port) must always go: while the redirect is in place, a client's next
    ///   datagram redirected there would need the same reply tuple, and the
    ///   kernel would resolve the clash by rewriting the client's source port.
    fn misplaced(&self, flow: &UdpFlow) -> bool {
        let nat = flow.status & (IPS_SRC_NAT | IPS_DST_NAT);
        if flow.orig_dport == self.port {
            return match self.redirected_to {
                Some(temp) => nat != IPS_DST_NAT || flow.reply_sport != temp,
                None => nat != 0,
            };
        }
        if flow.orig_sport == self.port {
            return self.redirected_to.is_some() || nat != 0;
        }
        [self.temp_port, self.redirected_to].contains(&Some(flow.orig_sport))
    }
}

impl UdpPort {
    /// The entries [`UdpPort::misplaced`] may pick: those to `port`, and
    /// those opened by an answer from `port` or from the temporary port.
    fn interests(&self) -> Vec<Interest> {
        let mut interests = vec![
            Interest::ToPort {
                protocol: Protocol::Udp,
                port: self.port,
                answered_from: None,
            },
            Interest::FromPort {
                protocol: Protocol::Udp,
                port: self.port,
            },
        ];
        for temp in [self.temp_port, self.redirected_to].into_iter().flatten() {
            interests.push(Interest::FromPort {
                protocol: Protocol::Udp,
                port: temp,
            });
        }
        interests
    }
}

/// What [`settle_udp_flows`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    /// Misplaced entries found (and deleted, unless they expired first), over
    /// all passes.
    pub deleted: u64,
    /// Whether the table stayed free of misplaced entries for the quiet
    /// period; `false` when the time limit came first.
    pub quiet: bool,
}

/// Moves the UDP flows of `ports` (IPv4 and IPv6) to where new flows go now:
/// deletes every misplaced entry (see [`UdpPort`]) so the flow's next
/// datagram is looked up afresh, and keeps looking every 40 ms until passes
/// over at least 200 ms have found none (misplaced entries still coming back
/// after 3 s end it). Entries that already go where they should are left
/// alone: deleting one while its answer is on the way would make that answer
/// open a misplaced entry. Entries of other ports, and TCP entries, are never
/// touched.
pub fn settle_udp_flows(netns: &Netns, ports: &[UdpPort]) -> Result<Settled, ConntrackError> {
    netns
        .run(|| settle_here(ports))?
        .map_err(|fault| fault.within(netns))
}

/// TCP states of a connection that is opening, open or closed by one side only
/// (it may still carry data); the rest (LAST_ACK, TIME_WAIT, CLOSE) are over.
pub(super) const LIVE_TCP_STATES: [u8; 6] = [
    1, // SYN_SENT
    2, // SYN_RECV
    3, // ESTABLISHED
    4, // FIN_WAIT
    5, // CLOSE_WAIT
    9, // SYN_SENT2
];

/// One conntrack entry whose reply comes from a given address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowTo {
    /// The kernel's id of the entry (`CTA_ID`): a new connection has a new id.
    pub id: u32,
    /// Whether it is a TCP connection that is opening, open or half-closed
    /// (one that may still carry data).
    pub live: bool,
    /// Who opened it: the original source address.
    pub source: Option<IpAddr>,
}

/// The conntrack entries (TCP, UDP and others, in every state, TIME_WAIT
/// included) whose reply comes from `address`: the connections a routed
/// replica at that address serves or served recently, whatever address the
/// client dialled (a VIP, DNAT'ed on a load-balancer node, or the replica).
/// Closed TCP connections stay in TIME_WAIT for minutes, so a connection that
/// was opened since the last call shows up as an id not seen before.
pub fn flows_to(netns: &Netns, address: IpAddr) -> Result<Vec<FlowTo>, ConntrackError> {
    netns
        .run(|| -> Result<Vec<FlowTo>, Fault> {
            let mut flows = Vec::new();
            let mut socket = Ctnetlink::open()?;
            socket.dump(&[Interest::ReplyFrom(address)], |entry| {
                let id = entry.kernel_id();
                let live = entry
                    .tcp_state
                    .is_some_and(|state| LIVE_TCP_STATES.contains(&state));
                flows.push(FlowTo {
                    id,
                    live,
                    source: source_address(&entry.orig),
                });
            })?;
            Ok(flows)
        })?
        .map_err(|fault| fault.within(netns))
}

/// Counts the live TCP connections (opening, open or half-closed) whose reply
/// comes from `address` (see [`flows_to`]).
pub fn live_connections_to(netns: &Netns, address: IpAddr) -> Result<u64, ConntrackError> {
    Ok(flows_to(netns, address)?.iter().filter(|f| f.live).count() as u64)
}

fn observe_here(interests: &[Interest]) -> Result<ConntrackState, Fault> {
    let table_count = read_sysctl("nf_conntrack_count")?;
    let table_max = read_sysctl("nf_conntrack_max")?;
    let mut keys = Vec::new();
    if !interests.is_empty() {
        let mut socket = Ctnetlink::open()?;
        socket.dump(interests, |entry| keys.extend(entry.flow_key()))?;
    }
    Ok(ConntrackState {
        available: true,
        unavailable_reason: None,
        flows: flow_counts(keys),
        table_count,
        table_max,
    })
}

fn settle_here(ports: &[UdpPort]) -> Result<Settled, Fault> {
    let mut socket = Ctnetlink::open()?;
    let started = Instant::now();
    // When the first pass of the current run of clean passes began.
    let mut clean_since = None;
    let mut deleted = 0;
    loop {
        let pass = Instant::now();
        let found = delete_misplaced(&mut socket, ports)?;
        deleted += found;
        if found > 0 {
            clean_since = None;
        } else if pass.duration_since(*clean_since.get_or_insert(pass)) >= SETTLE_QUIET {
            return Ok(Settled {
                deleted,
                quiet: true,
            });
        }
        // A run of clean passes is allowed to finish (a dump of a large
        // table takes a while); misplaced entries past the limit end it.
        if clean_since.is_none() && started.elapsed() >= SETTLE_LIMIT {
            return Ok(Settled {
                deleted,
                quiet: false,
            });
        }
        std::thread::sleep(SETTLE_INTERVAL);
    }
}

/// One pass of [`settle_udp_flows`]: returns how many misplaced entries the
/// dump showed. Entries opened by an answer go first, so that a flow whose
/// entry is deleted in the same pass never clashes with one of them.
fn delete_misplaced(socket: &mut Ctnetlink, ports: &[UdpPort]) -> Result<u64, Fault> {
    let interests: Vec<Interest> = ports.iter().flat_map(UdpPort::interests).collect();
    let mut doomed = Vec::new();
    socket.dump(&interests, |entry| {
        let Some(flow) = entry.udp_flow() else {
            return;
        };
        if let Some(port) = ports.iter().find(|p| p.misplaced(&flow)) {
            let client = flow.orig_dport == port.port;
            doomed.push((client, entry.delete_request()));
        }
    })?;
    doomed.sort_by_key(|(client, _)| *client);
    let found = doomed.len() as u64;
    for (_, (family, request)) in doomed {
        match socket.delete(family, request) {
            Ok(()) => {}
            // Expired (or replaced: the id no longer matches) since the dump.
            Err(Fault::Io(_, error)) if error.raw_os_error() == Some(nix::libc::ENOENT) => {}
            Err(fault) => return Err(fault),
        }
    }
    Ok(found)
}

/// Reads one counter from the namespace's conntrack sysctls. A missing file
/// means the conntrack module is not loaded.
fn read_sysctl(name: &str) -> Result<u64, Fault> {
    let path = Path::new(SYSCTL_DIR).join(name);
    let text = std::fs::read_to_string(&path).map_err(|error| {
        if error.kind() == io::ErrorKind::NotFound {
            Fault::Unavailable(format!(
                "{} does not exist (is the nf_conntrack module loaded?)",
                path.display()
            ))
        } else {
            Fault::Io(format!("read {}", path.display()), error)
        }
    })?;
    text.trim().parse().map_err(|_| {
        Fault::Io(
            format!("read {}", path.display()),
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("not a number: {:?}", text.trim()),
            ),
        )
    })
}

fn protocol_name(protocol: u8) -> &'static str {
    if protocol == IPPROTO_TCP {
        "tcp"
    } else {
        "udp"
    }
}

/// TCP conntrack state names as the `conntrack` tool prints them
/// (`enum tcp_conntrack` in the kernel).
fn tcp_state_name(state: u8) -> String {
    const NAMES: [&str; 10] = [
        "NONE",
        "SYN_SENT",
        "SYN_RECV",
        "ESTABLISHED",
        "FIN_WAIT",
        "CLOSE_WAIT",
        "LAST_ACK",
        "TIME_WAIT",
        "CLOSE",
        "SYN_SENT2",
    ];
    NAMES
        .get(usize::from(state))
        .map_or_else(|| format!("UNKNOWN({state})"), |name| (*name).to_owned())
}

/// One conntrack entry, with what lessnat reads from it.
pub(super) struct Entry<'a> {
    family: NetfilterProtoFamily,
    orig: Vec<Tuple>,
    reply: Vec<Tuple>,
    tcp_state: Option<u8>,
    status: u32,
    zone: Option<&'a [u8]>,
    id: Option<&'a [u8]>,
}

/// A conntrack entry a tracker follows (`backend::conntrack_watch`).
#[derive(Debug, Clone)]
pub(super) struct Tracked {
    /// Its address family.
    pub family: NetfilterProtoFamily,
    /// Its original tuple, to look it up by.
    pub orig: Vec<Tuple>,
    /// Its zone, if not the default one.
    pub zone: Option<Vec<u8>>,
    /// `(protocol, original destination port, reply source port, TCP state)`.
    pub key: (u8, u16, u16, Option<u8>),
}

/// Aggregates entry keys into the flow counts of a [`ConntrackState`].
pub(super) fn flow_counts(
    keys: impl IntoIterator<Item = (u8, u16, u16, Option<u8>)>,
) -> Vec<FlowCount> {
    let mut counts: HashMap<(u8, u16, u16, Option<u8>), u64> = HashMap::new();
    for key in keys {
        *counts.entry(key).or_default() += 1;
    }
    let mut flows: Vec<FlowCount> = counts
        .into_iter()
        .map(
            |((protocol, orig_dport, reply_sport, state), count)| FlowCount {
                protocol: protocol_name(protocol).to_owned(),
                orig_dport,
                reply_sport,
                state: state.map(tcp_state_name).unwrap_or_default(),
                count,
            },
        )
        .collect();
    flows.sort();
    flows
}

/// What [`UdpPort::misplaced`] reads of a UDP entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct UdpFlow {
    orig_sport: u16,
    orig_dport: u16,
    reply_sport: u16,
    /// `CTA_STATUS`: the `IPS_*` bits.
    status: u32,
}

impl<'a> Entry<'a> {
    /// Parses the payload of a ctnetlink entry message (nfgenmsg + attributes).
    /// Only the attributes lessnat needs are decoded.
    pub(super) fn parse(payload: &'a [u8]) -> Result<Self, DecodeError> {
        let header = NetfilterHeader::parse(payload)?;
        let attributes = payload.get(4..).unwrap_or_default();
        let mut entry = Entry {
            family: header.family,
            orig: Vec::new(),
            reply: Vec::new(),
            tcp_state: None,
            status: 0,
            zone: None,
            id: None,
        };
        for nla in NlasIterator::new(attributes) {
            let nla = nla?;
            match nla.kind() {
                CTA_TUPLE_ORIG | CTA_TUPLE_REPLY | CTA_PROTOINFO => {
                    match ConntrackAttribute::parse(&nla)? {
                        ConntrackAttribute::CtaTupleOrig(tuples) => entry.orig = tuples,
                        ConntrackAttribute::CtaTupleReply(tuples) => entry.reply = tuples,
                        ConntrackAttribute::CtaProtoInfo(infos) => {
                            entry.tcp_state = tcp_state(&infos);
                        }
                        _ => {}
                    }
                }
                CTA_STATUS => {
                    entry.status = value(nla)
                        .first_chunk::<4>()
                        .map_or(0, |bytes| u32::from_be_bytes(*bytes));
                }
                CTA_ZONE => entry.zone = Some(value(nla)),
                CTA_ID => entry.id = Some(value(nla)),
                _ => {}
            }
        }
        Ok(entry)
    }

    /// The kernel's id of the entry (`CTA_ID`; 0 when missing).
    pub(super) fn kernel_id(&self) -> u32 {
        self.id
            .and_then(|bytes| <[u8; 4]>::try_from(bytes).ok())
            .map_or(0, u32::from_be_bytes)
    }

    /// What a tracker keeps of the entry: enough to look it up again and to
    /// count it.
    pub(super) fn tracked(&self) -> Option<Tracked> {
        Some(Tracked {
            family: self.family,
            orig: self.orig.clone(),
            zone: self.zone.map(<[u8]>::to_vec),
            key: self.flow_key()?,
        })
    }

    /// Whether the entry may still carry data: a TCP connection opening, open
    /// or half-closed, or any UDP flow. `None` when an event did not say
    /// (it carried no TCP state).
    pub(super) fn live(&self) -> Option<bool> {
        let (protocol, _, _) = ports(&self.orig)?;
        if protocol != IPPROTO_TCP {
            return Some(true);
        }
        self.tcp_state.map(|state| LIVE_TCP_STATES.contains(&state))
    }

    /// `(protocol, original destination port, reply source port, TCP state)`
    /// for TCP and UDP entries; `None` for other protocols.
    fn flow_key(&self) -> Option<(u8, u16, u16, Option<u8>)> {
        let (protocol, _, orig_dport) = ports(&self.orig)?;
        if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP {
            return None;
        }
        let (_, reply_sport, _) = ports(&self.reply)?;
        let state = if protocol == IPPROTO_TCP {
            self.tcp_state
        } else {
            None
        };
        Some((protocol, orig_dport, reply_sport, state))
    }

    /// The ports and status of a UDP entry; `None` for other protocols.
    fn udp_flow(&self) -> Option<UdpFlow> {
        let (protocol, orig_sport, orig_dport) = ports(&self.orig)?;
        if protocol != IPPROTO_UDP {
            return None;
        }
        let (_, reply_sport, _) = ports(&self.reply)?;
        Some(UdpFlow {
            orig_sport,
            orig_dport,
            reply_sport,
            status: self.status,
        })
    }

    /// A delete request naming exactly this entry: its original tuple, zone
    /// and id (so a newer entry with the same tuple is left alone).
    fn delete_request(self) -> (NetfilterProtoFamily, ConntrackMessage) {
        let mut attributes = vec![ConntrackAttribute::CtaTupleOrig(self.orig)];
        for (kind, value) in [(CTA_ZONE, self.zone), (CTA_ID, self.id)] {
            if let Some(value) = value {
                attributes.push(ConntrackAttribute::Other(DefaultNla::new(
                    kind,
                    value.to_vec(),
                )));
            }
        }
        (self.family, ConntrackMessage::Delete(attributes))
    }
}

/// An attribute's value, borrowed from the received datagram.
fn value(nla: NlaBuffer<&[u8]>) -> &[u8] {
    let end = NLA_HEADER_SIZE + nla.value_length();
    nla.into_inner()
        .get(NLA_HEADER_SIZE..end)
        .unwrap_or_default()
}

/// The source address of a tuple.
fn source_address(tuples: &[Tuple]) -> Option<IpAddr> {
    tuples.iter().find_map(|tuple| match tuple {
        Tuple::Ip(parts) => parts.iter().find_map(|part| match part {
            IPTuple::SourceAddress(address) => Some(*address),
            _ => None,
        }),
        _ => None,
    })
}

/// `(protocol, source port, destination port)` of a tuple.
fn ports(tuples: &[Tuple]) -> Option<(u8, u16, u16)> {
    let (mut protocol, mut sport, mut dport) = (None, None, None);
    for tuple in tuples {
        if let Tuple::Proto(parts) = tuple {
            for part in parts {
                match part {
                    ProtoTuple::Protocol(p) => protocol = Some(u8::from(*p)),
                    ProtoTuple::SourcePort(port) => sport = Some(*port),
                    ProtoTuple::DestinationPort(port) => dport = Some(*port),
                    _ => {}
                }
            }
        }
    }
    Some((protocol?, sport?, dport?))
}

fn tcp_state(infos: &[ProtoInfo]) -> Option<u8> {
    infos.iter().find_map(|info| match info {
        ProtoInfo::TCP(parts) => parts.iter().find_map(|part| match part {
            ProtoInfoTCP::State(state) => Some(*state),
            _ => None,
        }),
        _ => None,
    })
}

/// A ctnetlink socket, opened in the calling thread's network namespace.
pub(super) struct Ctnetlink {
    socket: Socket,
    sequence: u32,
    buffer: Vec<u8>,
    /// Whether the kernel takes dump filters (until it refuses one).
    filters: bool,
    /// The namespace's entries when the socket was opened.
    entries: u64,
}

impl Ctnetlink {
    pub(super) fn open() -> Result<Self, Fault> {
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(|error| {
            if error.raw_os_error() == Some(nix::libc::EPROTONOSUPPORT) {
                Fault::Unavailable(format!("the kernel has no nfnetlink ({})", chain(&error)))
            } else {
                Fault::Io("open a netfilter netlink socket".into(), error)
            }
        })?;
        socket
            .bind_auto()
            .map_err(Fault::io("bind the netfilter netlink socket"))?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(Fault::io("connect the netfilter netlink socket"))?;
        Ok(Ctnetlink {
            socket,
            sequence: 0,
            buffer: vec![0; RECEIVE_BUFFER],
            filters: true,
            // Unknown: assume a big table.
            entries: read_sysctl("nf_conntrack_count").unwrap_or(u64::MAX),
        })
    }

    /// Hands each entry of `interests` (both families) to `each`, once: the
    /// kernel filters its table for each interest (one dump per interest and
    /// family), or, when that costs more (many interests, a small table; see
    /// [`ENTRIES_PER_WALK`]) or the kernel has no dump filters, the whole
    /// table is dumped and filtered here.
    pub(super) fn dump(
        &mut self,
        interests: &[Interest],
        mut each: impl FnMut(Entry<'_>),
    ) -> Result<(), Fault> {
        let mut interests = interests.to_vec();
        interests.sort();
        interests.dedup();
        let requests: Vec<_> = interests.iter().flat_map(Interest::requests).collect();
        let extra_walks = requests.len().saturating_sub(1) as u64;
        let worth = extra_walks.saturating_mul(ENTRIES_PER_WALK) < self.entries;
        if self.filters && worth && requests.len() <= MAX_FILTERED_DUMPS {
            // An entry that two interests match comes twice.
            let mut seen = HashSet::new();
            let mut delivered = 0;
            let mut filtered = Ok(());
            for (family, attributes, filter) in requests {
                filtered = self.dump_request(family, attributes, &filter, |entry| {
                    delivered += 1;
                    if interests.len() == 1 || seen.insert(entry.kernel_id()) {
                        each(entry);
                    }
                });
                if filtered.is_err() {
                    break;
                }
            }
            match filtered {
                // A kernel older than 5.8 refuses the filter before it sends
                // any entry.
                Err(Fault::Unavailable(_)) if delivered == 0 => self.filters = false,
                other => return other,
            }
        }
        self.dump_request(NetfilterProtoFamily::Unspec, Vec::new(), &[], |entry| {
            if interests.iter().any(|interest| interest.matches(&entry)) {
                each(entry);
            }
        })
    }

    /// One dump request (`attributes` and the encoded `filter` attribute
    /// filter it), handing each entry to `each`.
    fn dump_request(
        &mut self,
        family: NetfilterProtoFamily,
        attributes: Vec<ConntrackAttribute>,
        filter: &[u8],
        mut each: impl FnMut(Entry<'_>),
    ) -> Result<(), Fault> {
        let sequence = self
            .send_with(
                family,
                NLM_F_REQUEST | NLM_F_DUMP,
                ConntrackMessage::Get(attributes),
                filter,
            )
            .map_err(Fault::io("request a conntrack dump"))?;
        self.receive(sequence, "dump the conntrack table", |payload| {
            each(Entry::parse(payload)?);
            Ok(())
        })
        .map_err(|fault| match fault {
            Fault::Io(_, error) if is_unsupported(&error) => Fault::Unavailable(format!(
                "the kernel refused a conntrack dump ({}; is nf_conntrack_netlink loaded?)",
                chain(&error)
            )),
            fault => fault,
        })
    }

    /// Looks one entry up by its original tuple (and zone), in the kernel's
    /// hash: its id and TCP state, or `None` when it is gone.
    pub(super) fn get(
        &mut self,
        family: NetfilterProtoFamily,
        orig: &[Tuple],
        zone: Option<&[u8]>,
    ) -> Result<Option<(u32, Option<u8>)>, Fault> {
        let mut attributes = vec![ConntrackAttribute::CtaTupleOrig(orig.to_vec())];
        attributes.extend(
            zone.map(|zone| ConntrackAttribute::Other(DefaultNla::new(CTA_ZONE, zone.to_vec()))),
        );
        let sequence = self
            .send(
                family,
                NLM_F_REQUEST | NLM_F_ACK,
                ConntrackMessage::Get(attributes),
            )
            .map_err(Fault::io("look up a conntrack entry"))?;
        let mut found = None;
        match self.receive(sequence, "look up a conntrack entry", |payload| {
            let entry = Entry::parse(payload)?;
            found = Some((entry.kernel_id(), entry.tcp_state));
            Ok(())
        }) {
            Ok(()) => Ok(found),
            Err(Fault::Io(_, error)) if error.raw_os_error() == Some(nix::libc::ENOENT) => Ok(None),
            Err(fault) => Err(fault),
        }
    }

    /// Deletes one entry and waits for the kernel's acknowledgement.
    fn delete(
        &mut self,
        family: NetfilterProtoFamily,
        request: ConntrackMessage,
    ) -> Result<(), Fault> {
        let sequence = self
            .send(family, NLM_F_REQUEST | NLM_F_ACK, request)
            .map_err(Fault::io("request a conntrack delete"))?;
        self.receive(sequence, "delete a conntrack entry", |_| Ok(()))
    }

    fn send(
        &mut self,
        family: NetfilterProtoFamily,
        flags: u16,
        message: ConntrackMessage,
    ) -> io::Result<u32> {
        self.send_with(family, flags, message, &[])
    }

    /// Sends `message` with the already encoded attributes `extra` after its own.
    fn send_with(
        &mut self,
        family: NetfilterProtoFamily,
        flags: u16,
        message: ConntrackMessage,
        extra: &[u8],
    ) -> io::Result<u32> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.sequence;
        let mut packet = NetlinkMessage::new(
            header,
            NetlinkPayload::from(NetfilterMessage::new(
                NetfilterHeader::new(family, 0, 0),
                message,
            )),
        );
        packet.finalize();
        let mut bytes = vec![0; packet.buffer_len()];
        packet.serialize(&mut bytes);
        bytes.extend_from_slice(extra);
        let length = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        if let Some(header) = bytes.first_chunk_mut::<4>() {
            *header = length.to_ne_bytes();
        }
        self.socket.send(&bytes, 0)?;
        Ok(self.sequence)
    }

    /// Reads the answers to request `sequence` until the kernel says it is
    /// done (or acknowledges, or refuses), handing each ctnetlink message's
    /// payload to `each` as it arrives.
    fn receive(
        &mut self,
        sequence: u32,
        doing: &str,
        mut each: impl FnMut(&[u8]) -> Result<(), DecodeError>,
    ) -> Result<(), Fault> {
        netlink_answer::receive(&self.socket, &mut self.buffer, sequence, |kind, payload| {
            if is_ctnetlink_message(kind) {
                each(payload)
            } else {
                Ok(())
            }
        })
        .map_err(|error| match error {
            AnswerError::Io(error) => Fault::Io(doing.into(), error),
            AnswerError::Decode(error) => Fault::Decode(error),
        })
    }
}

/// Whether a netlink message type is a ctnetlink message (an entry, in a dump
/// or an event).
pub(super) fn is_ctnetlink_message(kind: u16) -> bool {
    kind >> 8 == NFNL_SUBSYS_CTNETLINK
}

/// Errors with which the kernel says ctnetlink is not there.
fn is_unsupported(error: &io::Error) -> bool {
    use nix::libc::{EAFNOSUPPORT, EINVAL, EOPNOTSUPP, EPROTONOSUPPORT};
    matches!(
        error.raw_os_error(),
        Some(EINVAL | EOPNOTSUPP | EPROTONOSUPPORT | EAFNOSUPPORT)
    )
}

/// `IPS_SEEN_REPLY` (`nf_conntrack_common.h`): the entry's reply direction
/// has carried a packet.
const IPS_SEEN_REPLY: u32 = 1 << 1;

/// TCP state `CLOSE`: the connection was reset.
const TCP_CLOSE: u8 = 8;

/// Deletes the entries of connections to `vip`:`vip_port` (`protocol`:
/// `tcp` or `udp`) that a load-balancer node sent to one of `replicas` and
/// that never saw a reply (a SYN_SENT, `[UNREPLIED]`) or were reset (TCP
/// `CLOSE`); returns how many it deleted. A load-balancer node that drops
/// dead replicas from a VIP port's spread calls this after the table
/// transaction: such an entry keeps its NAT binding (SYN_SENT for 2 minutes,
/// CLOSE for 10 s), and conntrack passes a SYN that matches it, a
/// retransmission or a new connection that reuses the same source port,
/// on to the dead address. Entries of connections that got an answer and
/// were not reset (established, closing, TIME_WAIT) are never touched, nor
/// entries of other VIP ports; an entry gone since the dump is fine.
pub fn delete_unanswered(
    netns: &Netns,
    protocol: &str,
    vip: IpAddr,
    vip_port: u16,
    replicas: &[IpAddr],
) -> Result<u64, ConntrackError> {
    netns
        .run(|| -> Result<u64, Fault> {
            let mut socket = Ctnetlink::open()?;
            let mut doomed = Vec::new();
            let interests: Vec<Interest> =
                replicas.iter().copied().map(Interest::ReplyFrom).collect();
            socket.dump(&interests, |entry| {
                let dialled = ports(&entry.orig).is_some_and(|(p, _, dport)| {
                    protocol_name(p) == protocol
                        && (p == IPPROTO_TCP || p == IPPROTO_UDP)
                        && dport == vip_port
                });
                let to_vip = entry.orig.iter().any(|tuple| match tuple {
                    Tuple::Ip(parts) => parts.contains(&IPTuple::DestinationAddress(vip)),
                    _ => false,
                });
                let dropped = source_address(&entry.reply).is_some_and(|a| replicas.contains(&a));
                let over = entry.status & IPS_SEEN_REPLY == 0 || entry.tcp_state == Some(TCP_CLOSE);
                if dialled && to_vip && dropped && over {
                    doomed.push(entry.delete_request());
                }
            })?;
            let mut deleted = 0;
            for (family, request) in doomed {
                match socket.delete(family, request) {
                    Ok(()) => deleted += 1,
                    // Expired since the dump.
                    Err(Fault::Io(_, error)) if error.raw_os_error() == Some(nix::libc::ENOENT) => {
                    }
                    Err(fault) => return Err(fault),
                }
            }
            Ok(deleted)
        })?
        .map_err(|fault| fault.within(netns))
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use netlink_packet_core::Emitable;
    use netlink_packet_netfilter::conntrack::{IPTuple, Protocol as CtProtocol};

    use super::*;

    fn tuple(protocol: CtProtocol, src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Vec<Tuple> {
        vec![
            Tuple::Ip(vec![
                IPTuple::SourceAddress(src),
                IPTuple::DestinationAddress(dst),
            ]),
            Tuple::Proto(vec![
                ProtoTuple::Protocol(protocol),
                ProtoTuple::SourcePort(sport),
                ProtoTuple::DestinationPort(dport),
            ]),
        ]
    }

    /// A ctnetlink entry message payload as the kernel sends it.
    fn payload(family: NetfilterProtoFamily, attributes: Vec<ConntrackAttribute>) -> Vec<u8> {
        let message = NetfilterMessage::new(
            NetfilterHeader::new(family, 0, 0),
            ConntrackMessage::New(attributes),
        );
        let mut bytes = vec![0; message.buffer_len()];
        message.emit(&mut bytes);
        bytes
    }

    #[test]
    fn a_redirected_tcp_entry_is_read_and_named_for_deletion() {
        let client = IpAddr::V6(Ipv6Addr::LOCALHOST);
        let orig = tuple(CtProtocol::Tcp, client, 40000, client, 8000);
        let zone = ConntrackAttribute::Other(DefaultNla::new(CTA_ZONE, vec![0, 7]));
        let id = ConntrackAttribute::Other(DefaultNla::new(CTA_ID, vec![1, 2, 3, 4]));
        let bytes = payload(
            NetfilterProtoFamily::IPv6,
            vec![
                ConntrackAttribute::CtaTupleOrig(orig.clone()),
                ConntrackAttribute::CtaTupleReply(tuple(
                    CtProtocol::Tcp,
                    client,
                    18000,
                    client,
                    40000,
                )),
                ConntrackAttribute::CtaTimeout(120),
                ConntrackAttribute::CtaProtoInfo(vec![ProtoInfo::TCP(vec![
                    ProtoInfoTCP::OriginalWindowScale(7),
                    ProtoInfoTCP::State(3),
                ])]),
                zone.clone(),
                id.clone(),
                ConntrackAttribute::CtaMark(0),
            ],
        );
        let entry = Entry::parse(&bytes).expect("parses");
        assert_eq!(entry.flow_key(), Some((IPPROTO_TCP, 8000, 18000, Some(3))));
        let (family, request) = entry.delete_request();
        assert_eq!(family, NetfilterProtoFamily::IPv6);
        assert_eq!(
            request,
            ConntrackMessage::Delete(vec![ConntrackAttribute::CtaTupleOrig(orig), zone, id])
        );
    }

    #[test]
    fn udp_entries_have_no_state_and_other_protocols_are_skipped() {
        let local = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let udp = payload(
            NetfilterProtoFamily::IPv4,
            vec![
                ConntrackAttribute::CtaTupleOrig(tuple(CtProtocol::Udp, local, 5000, local, 53)),
                ConntrackAttribute::CtaTupleReply(tuple(CtProtocol::Udp, local, 53, local, 5000)),
            ],
        );
        let entry = Entry::parse(&udp).expect("parses");
        assert_eq!(entry.flow_key(), Some((IPPROTO_UDP, 53, 53, None)));

        let sctp = payload(
            NetfilterProtoFamily::IPv4,
            vec![
                ConntrackAttribute::CtaTupleOrig(tuple(CtProtocol::Sctp, local, 5000, local, 9)),
                ConntrackAttribute::CtaTupleReply(tuple(CtProtocol::Sctp, local, 9, local, 5000)),
            ],
        );
        assert_eq!(Entry::parse(&sctp).expect("parses").flow_key(), None);
    }

    fn udp_flow(orig_sport: u16, orig_dport: u16, reply_sport: u16, status: u32) -> UdpFlow {
        UdpFlow {
            orig_sport,
            orig_dport,
            reply_sport,
            status,
        }
    }

    #[test]
    fn misplaced_udp_entries_depend_on_the_redirect() {
        let port = |redirected_to| UdpPort {
            port: 53,
            temp_port: Some(1053),
            redirected_to,
        };
        let (direct, redirected) = (port(None), port(Some(1053)));
        // Done bits alone (null bindings) are not NAT.
        let done = 1 << 7 | 1 << 8;
        let client_direct = udp_flow(5000, 53, 53, done);
        let client_redirected = udp_flow(5000, 53, 1053, IPS_DST_NAT | done);
        let client_rewritten = udp_flow(5000, 53, 1053, IPS_DST_NAT | IPS_SRC_NAT);
        let primary_answer = udp_flow(53, 5000, 5000, done);
        let next_answer = udp_flow(1053, 5000, 5000, done);
        let unrelated = udp_flow(5000, 54, 54, 0);
        for (flow, when_direct, when_redirected) in [
            (client_direct, false, true),
            (client_redirected, true, false),
            (client_rewritten, true, true),
            (primary_answer, false, true),
            (next_answer, true, true),
            (unrelated, false, false),
        ] {
            assert_eq!(direct.misplaced(&flow), when_direct, "direct: {flow:?}");
            assert_eq!(
                redirected.misplaced(&flow),
                when_redirected,
                "redirected: {flow:?}"
            );
        }
    }

    #[test]
    fn the_status_of_an_entry_is_read() {
        let local = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let bytes = payload(
            NetfilterProtoFamily::IPv4,
            vec![
                ConntrackAttribute::CtaTupleOrig(tuple(CtProtocol::Udp, local, 5000, local, 53)),
                ConntrackAttribute::CtaTupleReply(tuple(CtProtocol::Udp, local, 1053, local, 5000)),
                ConntrackAttribute::Other(DefaultNla::new(
                    CTA_STATUS,
                    (IPS_DST_NAT | 1 << 8).to_be_bytes().to_vec(),
                )),
            ],
        );
        let entry = Entry::parse(&bytes).expect("parses");
        assert_eq!(
            entry.udp_flow(),
            Some(udp_flow(5000, 53, 1053, IPS_DST_NAT | 1 << 8))
        );
    }

    #[test]
    fn dump_filters_are_nested_attributes_with_flags_in_host_order() {
        let bytes = filter(FILTER_PROTO_NUM | FILTER_PROTO_DST_PORT, 0);
        let mut expected = Vec::new();
        for half in [12u16, CTA_FILTER | NLA_F_NESTED, 8, CTA_FILTER_ORIG_FLAGS] {
            expected.extend_from_slice(&half.to_ne_bytes());
        }
        expected.extend_from_slice(&0x28u32.to_ne_bytes());
        assert_eq!(bytes, expected);
        assert_eq!(filter(1, 1).len(), 20, "both flag attributes");
    }

    #[test]
    fn truncated_entries_are_decode_errors() {
        assert!(Entry::parse(&[2, 0]).is_err());
        assert!(Entry::parse(&[2, 0, 0, 0, 200, 0, 1, 0]).is_err());
    }

    #[test]
    fn tcp_states_are_named_like_the_conntrack_tool() {
        assert_eq!(tcp_state_name(3), "ESTABLISHED");
        assert_eq!(tcp_state_name(7), "TIME_WAIT");
        assert_eq!(tcp_state_name(9), "SYN_SENT2");
        assert_eq!(tcp_state_name(42), "UNKNOWN(42)");
    }

    fn state(table_count: u64, table_max: u64) -> ConntrackState {
        ConntrackState {
            available: true,
            table_count,
            table_max,
            ..ConntrackState::default()
        }
    }

    #[test]
    fn a_nearly_full_table_is_reported_with_numbers_and_the_sysctl() {
        let warnings = warnings(&state(59_000, 65_536));
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        for needle in [
            "90% full",
            "59000 of 65536",
            "net.netfilter.nf_conntrack_max=131072",
        ] {
            assert!(
                warnings[0].contains(needle),
                "{needle} not in {}",
                warnings[0]
            );
        }
        assert!(super::warnings(&state(58_000, 65_536)).is_empty());
        assert!(super::warnings(&state(0, 0)).is_empty());
    }

    #[test]
    fn unavailable_conntrack_is_reported_with_its_reason() {
        let unavailable = ConntrackState {
            unavailable_reason: Some("no nf_conntrack".into()),
            ..ConntrackState::default()
        };
        let warnings = warnings(&unavailable);
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("no nf_conntrack"), "{}", warnings[0]);
    }

    #[test]
    fn observed_json_without_a_reason_still_loads() {
        let state: ConntrackState = serde_json::from_str(
            r#"{"available": true, "flows": [], "table_count": 1, "table_max": 2}"#,
        )
        .expect("loads");
        assert_eq!(state, self::state(1, 2));
        assert!(
            !serde_json::to_string(&state)
                .expect("json")
                .contains("unavailable_reason")
        );
    }
}
