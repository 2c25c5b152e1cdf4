//! Telling systemd how the agent is doing (`Type=notify`): one datagram to
//! the socket in `$NOTIFY_SOCKET` per state. `READY=1` goes out after the
//! first converge, `STOPPING=1` when a signal ends the agent, `STATUS=` lines
//! say what it did last. Without `$NOTIFY_SOCKET` (not under systemd) nothing
//! is sent. The protocol is a datagram of `KEY=VALUE` lines, so a few lines
//! here do it; no crate needed.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The environment variable systemd names its notification socket in.
const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Sends `state` (newline-separated `KEY=VALUE` lines) to systemd. Returns
/// whether it was sent: `false` without `$NOTIFY_SOCKET`. A failure is
/// logged, never fatal: the agent works without systemd.
pub fn notify(state: &str) -> bool {
    let Some(path) = std::env::var_os(NOTIFY_SOCKET) else {
        return false;
    };
    let path = path.to_string_lossy().into_owned();
    let sent = address(&path).and_then(|addr| {
        let socket = UnixDatagram::unbound()?;
        socket.send_to_addr(state.as_bytes(), &addr)
    });
    match sent {
        Ok(_) => true,
        Err(error) => {
            tracing::warn!("telling systemd {state:?} through {path}: {error}");
            false
        }
    }
}

/// The socket address `$NOTIFY_SOCKET` names: a path, or an abstract name
/// after `@`.
fn address(value: &str) -> std::io::Result<SocketAddr> {
    match value.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
        None => SocketAddr::from_pathname(value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_a_datagram_to_a_path_and_an_abstract_socket() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).expect("bind");
        let sent = address(&path.display().to_string())
            .and_then(|addr| UnixDatagram::unbound()?.send_to_addr(b"READY=1", &addr));
        assert_eq!(sent.expect("sent"), 7);
        let mut buffer = [0; 64];
        let n = listener.recv(&mut buffer).expect("received");
        assert_eq!(&buffer[..n], b"READY=1");

        let name = format!("lessnat-test-{}", std::process::id());
        let abstract_listener = UnixDatagram::bind_addr(
            &SocketAddr::from_abstract_name(name.as_bytes()).expect("name"),
        )
        .expect("bind abstract");
        let addr = address(&format!("@{name}")).expect("abstract address");
        UnixDatagram::unbound()
            .expect("socket")
            .send_to_addr(b"STOPPING=1", &addr)
            .expect("sent");
        let n = abstract_listener.recv(&mut buffer).expect("received");
        assert_eq!(&buffer[..n], b"STOPPING=1");
    }
}
