//! Waiting for a container to become ready, with lessnat's own probes (they
//! carry the probe mark, so they reach the port they name even while a
//! redirect is active).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use super::progress::{Progress, short};
use super::{ApplyError, Context};
use crate::health::{Timing, WaitError, probe_http, probe_tcp, wait_healthy};
use crate::spec::{Health, Located, Protocol, Service};

/// How readiness is judged when the spec gives no `health` block.
const DEFAULT_TIMING: Timing = Timing {
    interval: Duration::from_millis(500),
    healthy_after: 1,
    start_timeout: Duration::from_secs(60),
};
/// How long one default probe may take.
const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// The port number a probe of `port_name` (or of the first TCP port) uses:
/// the temporary port for the `next` container, the canonical one otherwise.
fn probe_port(
    service: &Service,
    port_name: Option<&Located<String>>,
    temporary: bool,
) -> Option<u16> {
    let port = match port_name {
        Some(name) => service.port(name)?,
        None => service.ports.iter().find(|p| p.protocol == Protocol::Tcp)?,
    };
    Some(match (&port.temp_port, temporary) {
        (Some(temp), true) => temp.value,
        _ => port.port.value,
    })
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// Waits until `container` of `service` passes its health check, failing when
/// it exits, when `startTimeout` passes, or when apply is interrupted.
pub(super) fn wait_ready(
    ctx: &Context,
    progress: &mut Progress,
    service: &Service,
    container: &str,
    temporary: bool,
) -> Result<(), ApplyError> {
    let health: Option<&Health> = service.health.as_ref().map(|h| &h.value);
    let (timing, probe_timeout) = match health {
        Some(h) => (
            Timing {
                interval: h.interval.get(),
                healthy_after: h.healthy_after.value,
                start_timeout: h.start_timeout.get(),
            },
            h.timeout.get(),
        ),
        None => (DEFAULT_TIMING, DEFAULT_PROBE_TIMEOUT),
    };
    let started = Instant::now();
    let netns = ctx.netns;
    let probe = || -> Result<(), String> {
        let tcp = |port: Option<u16>| match port {
            Some(port) => netns
                .run(|| probe_tcp(loopback(port), probe_timeout))
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string()),
            None => Ok(()),
        };
        match health {
            Some(h) if h.http.is_some() => {
                let http = h.http.as_ref().ok_or("no http check")?;
                let port = probe_port(service, http.port.as_ref(), temporary)
                    .ok_or("no TCP port to probe")?;
                netns
                    .run(|| probe_http(loopback(port), &http.path, probe_timeout))
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())
            }
            Some(h) if h.tcp.is_some() => {
                let port = h.tcp.as_ref().and_then(|t| t.port.as_ref());
                tcp(probe_port(service, port, temporary))
            }
            Some(h) if h.exec.is_some() => {
                let command: Vec<String> =
                    h.exec.iter().flatten().map(|c| c.value.clone()).collect();
                match ctx.docker.exec(container, &command, probe_timeout) {
                    Ok(0) => Ok(()),
                    Ok(code) => Err(format!("{command:?} exited with {code}")),
                    Err(e) => Err(e.to_string()),
                }
            }
            _ => tcp(probe_port(service, None, temporary)),
        }
    };
    let mut last_state = None;
    let alive = || {
        progress.waiting(&format!(
            "{container}: waiting until healthy ({} of {})",
            short(started.elapsed()),
            short(timing.start_timeout)
        ));
        if ctx.interrupted() {
            return false;
        }
        match ctx.docker.state(container) {
            Ok(Some(status)) => {
                let running = status.running;
                last_state = Some(status);
                running
            }
            _ => false,
        }
    };
    let result = wait_healthy(timing, probe, alive);
    progress.end_wait();
    match result {
        Ok(()) => Ok(()),
        Err(_) if ctx.interrupted() => Err(ApplyError::Interrupted),
        Err(WaitError::Exited) => Err(ApplyError::Exited {
            container: container.to_string(),
            code: last_state.and_then(|s| s.exit_code),
            logs: ctx.docker.logs_tail(container, 20).unwrap_or_default(),
        }),
        Err(WaitError::Timeout { waited, last }) => Err(ApplyError::NotReady {
            container: container.to_string(),
            waited: short(waited),
            last,
        }),
    }
}
