//! Waiting for a container to become ready, with lessnat's own probes (they
//! carry the probe mark, so they reach the port they name even while a
//! redirect is active).

use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::progress::{Progress, short};
use super::{ApplyError, Context};
use crate::health::{NetworkCheck, Timing, WaitError, probe_timeout, wait_healthy};
use crate::spec::{Health, Service};

/// How readiness is judged when the spec gives no `health` block.
const DEFAULT_TIMING: Timing = Timing {
    interval: Duration::from_millis(500),
    healthy_after: 1,
    start_timeout: Duration::from_secs(60),
};
/// Where a container is probed: on loopback at its temporary ports (host
/// mode's `next`) or canonical ports, or at its own address (routed mode).
#[derive(Debug, Clone, Copy)]
pub(super) struct ProbeAt {
    /// The address probed.
    pub ip: IpAddr,
    /// Whether the temporary ports are probed.
    pub temporary: bool,
}

impl ProbeAt {
    /// Host mode: loopback, on the temporary ports when `temporary`.
    pub fn loopback(temporary: bool) -> Self {
        ProbeAt {
            ip: IpAddr::from([127, 0, 0, 1]),
            temporary,
        }
    }
}

/// Time between two health checks of `service`.
pub(super) fn check_interval(service: &Service) -> Duration {
    service
        .health
        .as_ref()
        .map_or(DEFAULT_TIMING.interval, |h| h.interval.get())
}

/// Checks the health of `container` of `service` once, at `at`: passes, or
/// fails with the reason.
pub(super) fn probe(
    ctx: &Context,
    service: &Service,
    container: &str,
    at: ProbeAt,
) -> Result<(), String> {
    let timeout = probe_timeout(service);
    if let Some(check) = NetworkCheck::of(service, at.temporary) {
        return ctx.host.probe(&check, at.ip, timeout);
    }
    let exec = service.health.as_ref().and_then(|h| h.exec.as_ref());
    let Some(exec) = exec else {
        return Ok(()); // nothing to probe: no TCP port and no check
    };
    let command: Vec<String> = exec.iter().map(|c| c.value.clone()).collect();
    match ctx.host.exec(container, &command, timeout) {
        Ok(0) => Ok(()),
        Ok(code) => Err(format!("{command:?} exited with {code}")),
        Err(e) => Err(crate::error::chain(&e)),
    }
}

/// Waits until `container` of `service` passes its health check, failing when
/// it exits, when `startTimeout` passes, or when apply is interrupted.
pub(super) fn wait_ready(
    ctx: &Context,
    progress: &mut Progress,
    service: &Service,
    container: &str,
    at: ProbeAt,
) -> Result<(), ApplyError> {
    wait_ready_ticking(ctx, progress, service, container, at, |_| Ok(()))
}

/// [`wait_ready`], calling `tick` before each probe; a failed tick ends the
/// wait with its error.
pub(super) fn wait_ready_ticking(
    ctx: &Context,
    progress: &mut Progress,
    service: &Service,
    container: &str,
    at: ProbeAt,
    mut tick: impl FnMut(&mut Progress) -> Result<(), ApplyError>,
) -> Result<(), ApplyError> {
    let health: Option<&Health> = service.health.as_ref().map(|h| &h.value);
    let timing = match health {
        Some(h) => Timing {
            interval: h.interval.get(),
            healthy_after: h.healthy_after.value,
            start_timeout: h.start_timeout.get(),
        },
        None => DEFAULT_TIMING,
    };
    let started = Instant::now();
    let probe = || probe(ctx, service, container, at);
    let mut last_state = None;
    let mut failed = None;
    let alive = || {
        progress.waiting(&format!(
            "{container}: waiting until healthy ({} of {})",
            short(started.elapsed()),
            short(timing.start_timeout)
        ));
        if ctx.interrupted() {
            return false;
        }
        if let Err(error) = tick(progress) {
            failed = Some(error);
            return false;
        }
        match ctx.host.state(container) {
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
    if let Some(error) = failed {
        return Err(error);
    }
    match result {
        Ok(()) => Ok(()),
        Err(_) if ctx.interrupted() => Err(ApplyError::Interrupted),
        Err(WaitError::Exited) => Err(ApplyError::Exited {
            container: container.to_string(),
            code: last_state.and_then(|s| s.exit_code),
            logs: ctx.host.logs_tail(container, 20).unwrap_or_default(),
        }),
        Err(WaitError::Timeout { waited, last }) => Err(ApplyError::NotReady {
            container: container.to_string(),
            waited: short(waited),
            last,
        }),
    }
}
