//! Health probes run by lessnat itself. Every probe socket carries
//! [`PROBE_MARK`](crate::ownership::PROBE_MARK), which the redirect rules skip,
//! so during an upgrade a probe of port P reaches the process on P and is not
//! sent to the temporary port.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use crate::ownership::PROBE_MARK;
use crate::spec::{Located, Protocol as PortProtocol, Service};

/// How long one probe may take when the spec gives no `health` block.
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// A health check lessnat runs over the network: the service's `http` or
/// `tcp` check, or a TCP connect to its first TCP port when it has no
/// `health` block. `exec` checks run inside the container instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkCheck<'a> {
    /// `GET path` must answer 2xx.
    Http {
        /// The port.
        port: u16,
        /// The path.
        path: &'a str,
    },
    /// A TCP connection must be accepted.
    Tcp {
        /// The port.
        port: u16,
    },
}

impl<'a> NetworkCheck<'a> {
    /// The network check of `service`, on its temporary ports when
    /// `temporary` (host mode's `next` container). `None` for `exec` checks
    /// and for services without a TCP port to probe.
    pub fn of(service: &'a Service, temporary: bool) -> Option<NetworkCheck<'a>> {
        let health = service.health.as_ref().map(|h| &h.value);
        match health {
            Some(h) if h.http.is_some() => {
                let http = h.http.as_ref()?;
                Some(NetworkCheck::Http {
                    port: probe_port(service, http.port.as_ref(), temporary)?,
                    path: &http.path,
                })
            }
            Some(h) if h.tcp.is_some() => {
                let port = h.tcp.as_ref().and_then(|t| t.port.as_ref());
                Some(NetworkCheck::Tcp {
                    port: probe_port(service, port, temporary)?,
                })
            }
            Some(h) if h.exec.is_some() => None,
            _ => Some(NetworkCheck::Tcp {
                port: probe_port(service, None, temporary)?,
            }),
        }
    }

    /// Runs the check against `ip`.
    pub fn run(&self, ip: IpAddr, timeout: Duration) -> Result<(), ProbeError> {
        match *self {
            NetworkCheck::Http { port, path } => {
                probe_http(SocketAddr::new(ip, port), path, timeout)
            }
            NetworkCheck::Tcp { port } => probe_tcp(SocketAddr::new(ip, port), timeout),
        }
    }
}

/// How long one probe of `service` may take.
pub fn probe_timeout(service: &Service) -> Duration {
    service
        .health
        .as_ref()
        .map_or(DEFAULT_PROBE_TIMEOUT, |h| h.timeout.get())
}

/// The port number a probe of `port_name` (or of the first TCP port) uses:
/// the temporary port for the `next` container, the canonical one otherwise.
fn probe_port(
    service: &Service,
    port_name: Option<&Located<String>>,
    temporary: bool,
) -> Option<u16> {
    let port = match port_name {
        Some(name) => service.port(name)?,
        None => service
            .ports
            .iter()
            .find(|p| p.protocol == PortProtocol::Tcp)?,
    };
    Some(match (&port.temp_port, temporary) {
        (Some(temp), true) => temp.value,
        _ => port.port.value,
    })
}

/// A probe that did not pass.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The connection was refused, timed out or broke.
    #[error("{addr}")]
    Connect {
        /// Where.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The request could not be sent, or the answer not read.
    #[error("{addr}{path}")]
    Exchange {
        /// Where.
        addr: SocketAddr,
        /// The path probed.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// An HTTP answer that is not 2xx, or no HTTP answer at all.
    #[error("{addr}{path}: {answer}")]
    Http {
        /// Where.
        addr: SocketAddr,
        /// The path probed.
        path: String,
        /// What came back.
        answer: String,
    },
}

fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ProbeError> {
    let fail = |source| ProbeError::Connect { addr, source };
    let socket =
        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(fail)?;
    socket.set_mark(PROBE_MARK).map_err(fail)?;
    socket
        .connect_timeout(&addr.into(), timeout)
        .map_err(fail)?;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(timeout)).map_err(fail)?;
    stream.set_write_timeout(Some(timeout)).map_err(fail)?;
    Ok(stream)
}

/// Passes when `addr` accepts a TCP connection within `timeout`.
pub fn probe_tcp(addr: SocketAddr, timeout: Duration) -> Result<(), ProbeError> {
    connect(addr, timeout).map(drop)
}

/// Passes when `GET path` on `addr` answers with a 2xx status within `timeout`.
pub fn probe_http(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(), ProbeError> {
    let exchange = |source| ProbeError::Exchange {
        addr,
        path: path.to_string(),
        source,
    };
    let http = |answer| ProbeError::Http {
        addr,
        path: path.to_string(),
        answer,
    };
    let mut stream = connect(addr, timeout)?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: lessnat-probe\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).map_err(exchange)?;
    let mut head = [0u8; 64];
    let mut read = 0;
    while read < 12 {
        match stream.read(&mut head[read..]) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(e) => return Err(exchange(e)),
        }
    }
    // Read the rest (bounded): closing with unread data would reset the connection.
    let mut rest = [0u8; 4096];
    let mut drained = 0;
    while drained < 64 * 1024 {
        match stream.read(&mut rest) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
    let line = String::from_utf8_lossy(&head[..read]);
    let status = line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse::<u16>().ok());
    match status {
        Some(code) if (200..300).contains(&code) => Ok(()),
        Some(code) => Err(http(format!("status {code}"))),
        None => Err(http(format!(
            "not an HTTP answer: {:?}",
            line.lines().next().unwrap_or("")
        ))),
    }
}

/// How a wait for health ended, when it did not end healthy.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WaitError {
    /// The container stopped while lessnat waited.
    #[error("the container exited while lessnat waited for it to become healthy")]
    Exited,
    /// `startTimeout` passed.
    #[error("not healthy after {waited:?}; last probe: {last}")]
    Timeout {
        /// How long lessnat waited.
        waited: Duration,
        /// The last probe's failure.
        last: String,
    },
}

/// The timing of a health wait, from the spec's `health` block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Time between probes.
    pub interval: Duration,
    /// Consecutive passes needed.
    pub healthy_after: u32,
    /// How long to wait at most.
    pub start_timeout: Duration,
}

/// Probes until `healthy_after` consecutive passes, giving up when `alive`
/// says the container is gone or `start_timeout` passes.
pub fn wait_healthy(
    timing: Timing,
    mut probe: impl FnMut() -> Result<(), String>,
    mut alive: impl FnMut() -> bool,
) -> Result<(), WaitError> {
    let started = Instant::now();
    let mut passes = 0;
    let mut last = String::from("no probe ran");
    loop {
        if !alive() {
            return Err(WaitError::Exited);
        }
        match probe() {
            Ok(()) => {
                passes += 1;
                if passes >= timing.healthy_after {
                    return Ok(());
                }
            }
            Err(reason) => {
                passes = 0;
                last = reason;
            }
        }
        if started.elapsed() >= timing.start_timeout {
            return Err(WaitError::Timeout {
                waited: started.elapsed(),
                last,
            });
        }
        std::thread::sleep(timing.interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn serve_once(status: &'static str) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        std::thread::spawn(move || {
            if let Ok((mut stream, _)) = listener.accept() {
                let mut buf = [0u8; 512];
                let _ = stream.read(&mut buf);
                let _ = stream.write_all(
                    format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes(),
                );
            }
        });
        addr
    }

    fn needs_mark_privilege() -> bool {
        // SO_MARK needs CAP_NET_ADMIN.
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn http_probe_reads_the_status() {
        if !needs_mark_privilege() {
            eprintln!("SKIPPED http_probe_reads_the_status: SO_MARK needs root");
            return;
        }
        let second = Duration::from_secs(2);
        assert!(probe_http(serve_once("200 OK"), "/healthz", second).is_ok());
        let failed = probe_http(serve_once("503 Service Unavailable"), "/healthz", second)
            .expect_err("503 fails");
        assert!(
            failed.to_string().ends_with("/healthz: status 503"),
            "{failed}"
        );
    }

    #[test]
    fn tcp_probe_fails_on_a_closed_port() {
        if !needs_mark_privilege() {
            eprintln!("SKIPPED tcp_probe_fails_on_a_closed_port: SO_MARK needs root");
            return;
        }
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        assert!(probe_tcp(addr, Duration::from_secs(1)).is_ok());
        drop(listener);
        let refused = probe_tcp(addr, Duration::from_secs(1)).expect_err("closed");
        assert!(matches!(refused, ProbeError::Connect { .. }), "{refused}");
        let text = crate::error::chain(&refused);
        assert!(text.starts_with(&format!("{addr}: ")), "{text}");
        crate::error::assert_chain_once(&refused, &["refused"]);
    }

    #[test]
    fn wait_needs_consecutive_passes_and_stops_on_exit_or_timeout() {
        let timing = Timing {
            interval: Duration::from_millis(1),
            healthy_after: 2,
            start_timeout: Duration::from_secs(5),
        };
        let mut answers = vec![Ok(()), Err("x".to_string()), Ok(()), Ok(())].into_iter();
        let mut probes = 0;
        let result = wait_healthy(
            timing,
            || {
                probes += 1;
                answers.next().unwrap_or(Err("done".into()))
            },
            || true,
        );
        assert_eq!(result, Ok(()));
        assert_eq!(probes, 4, "a failure resets the count");

        assert_eq!(
            wait_healthy(timing, || Ok(()), || false),
            Err(WaitError::Exited)
        );

        let quick = Timing {
            start_timeout: Duration::from_millis(20),
            ..timing
        };
        let timed_out =
            wait_healthy(quick, || Err("refused".into()), || true).expect_err("times out");
        assert!(matches!(timed_out, WaitError::Timeout { ref last, .. } if last == "refused"));
    }
}
