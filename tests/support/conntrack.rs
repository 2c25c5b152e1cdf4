//! Filling a namespace's conntrack table with entries that have nothing to do
//! with what a test or benchmark counts: one short UDP flow per datagram,
//! each to its own port (the kernel makes an entry per flow, ~100k in well
//! under a second), kept for ten minutes instead of UDP's 30 s.

use std::net::UdpSocket;

/// Ports the unrelated flows go to: 1 up to this many per source socket.
const PORTS_PER_SOURCE: usize = 50_000;
/// Where the sources listen: above every destination, so no datagram is the
/// reply of another's flow.
const FIRST_SOURCE: u16 = 64_001;

/// Adds `entries` unrelated UDP entries to the conntrack table of the calling
/// thread's network namespace (which must track, e.g. with a `ct` rule).
pub fn fill_unrelated(entries: usize) {
    std::fs::write("/proc/sys/net/netfilter/nf_conntrack_udp_timeout", "600")
        .expect("keep UDP entries for 10 minutes");
    let mut left = entries;
    let mut source = FIRST_SOURCE;
    while left > 0 {
        let socket = UdpSocket::bind(("127.0.0.1", source)).expect("bind a source");
        let count = left.min(PORTS_PER_SOURCE);
        for port in 1..=count {
            let port = u16::try_from(port).expect("a port");
            socket.send_to(b"x", ("127.0.0.1", port)).expect("send");
        }
        left -= count;
        source += 1;
    }
}
