//! Routed mode on a worker: starting replicas wired in with a veth pair at
//! their own address, and upgrading them across machines (docs/routed-mode.md):
//! the next version starts at the replica's other address; load-balancer
//! nodes see it answer and switch new connections to it on their own applies;
//! this worker waits `switchWait`, then until its conntrack shows no live
//! connection to the old address, and only then removes the old replica.

use std::collections::HashSet;
use std::net::IpAddr;
use std::time::Duration;

use super::drain::{Drained, wait_until_drained};
use super::progress::{Progress, short};
use super::ready::{ProbeAt, wait_ready};
use super::{ApplyError, Context, container_spec};
use crate::backend::veth::Wiring;
use crate::desired::DesiredContainer;
use crate::ownership::{LABEL_ADDRESS, Slot, replica_container_name};
use crate::plan::operation::{Switch, Unanswered, Workload};
use crate::plan::{Decision, InFlight};
use crate::spec::{OnDrainTimeout, OnFailure, Service};

/// On a load-balancer node, after a table change that switched replicas:
/// waits until this node has no live connection left to each old address (up
/// to the service's `switchWait`) and says so. The worker removes the old
/// replica only once no load-balancer node sends it connections; this is each
/// load-balancer node's side of that, in its own output and exit status.
pub(super) fn report_drained(
    ctx: &Context,
    progress: &mut Progress,
    switches: &[Switch],
) -> Result<(), ApplyError> {
    for switch in switches {
        progress.step(&format!("{switch}"));
        // Bounded by switchWait, not drainTimeout: while this apply waits it
        // switches nothing else, and other workers give load-balancer nodes
        // switchWait to switch.
        let what = format!(
            "{}: connections through this node to {}",
            switch.service, switch.from
        );
        let from = switch.from;
        match wait_until_drained(ctx, progress, &what, switch.wait.get(), |_| {
            Ok(ctx.host.live_connections_to(from)?)
        })? {
            Drained::Empty => progress.step(&format!(
                "{}: drained on this node: no connection left to {}",
                switch.service, switch.from
            )),
            Drained::TimedOut(left) => progress.step(&format!(
                "{}: {left} connections to {} still open through this node after switchWait; they finish there, and the worker waits for them (up to drainTimeout)",
                switch.service, switch.from
            )),
        }
    }
    Ok(())
}

/// On a load-balancer node, after a table change that left replicas out of
/// a spread: deletes the conntrack entries of connections to that VIP port
/// that went to them and never got a reply or were reset, so no
/// retransmission or reused source port keeps going to a dead replica.
pub(super) fn forget_unanswered(
    ctx: &Context,
    progress: &mut Progress,
    unanswered: &[Unanswered],
) -> Result<(), ApplyError> {
    for flows in unanswered {
        let deleted = ctx.host.delete_unanswered(flows)?;
        progress.step(&format!(
            "{flows}: {deleted} deleted (other connections are left alone)"
        ));
    }
    Ok(())
}

/// Wires the running `container` of `service` in at `address` (a veth pair
/// into its network namespace).
pub(super) fn wire(
    ctx: &Context,
    progress: &mut Progress,
    service: &str,
    container: &str,
    address: IpAddr,
) -> Result<(), ApplyError> {
    let pid = ctx
        .host
        .state(container)?
        .and_then(|s| s.pid.filter(|_| s.running))
        .ok_or_else(|| ApplyError::NotRunning {
            container: container.to_string(),
        })?;
    progress.step(&format!("{container}: wiring in at {address} (veth pair)"));
    ctx.host.wire(&Wiring {
        service,
        address,
        pid,
    })?;
    Ok(())
}

/// Where a routed upgrade goes from and to, as planned.
pub(super) struct ReplicaUpgrade<'a> {
    /// Where the old version is wired in.
    pub old_at: IpAddr,
    /// Where the next version is (or will be) wired in.
    pub next_at: IpAddr,
    /// The upgrade found in flight, if any.
    pub in_flight: Option<&'a InFlight>,
    /// Whether an old primary exists.
    pub old_exists: bool,
    /// Load-balancer node addresses (their probes are not clients).
    pub load_balancers: &'a [IpAddr],
}

/// How long the old replica must see no new connection before it is removed.
const QUIET: Duration = Duration::from_secs(2);

/// How often the switch wait checks for an interrupt.
const POLL: Duration = Duration::from_millis(500);

/// One routed service's replica on this node.
pub(super) struct Replica<'a, 'c> {
    ctx: &'a Context<'c>,
    progress: &'a mut Progress,
    service: &'a Service,
    desired: &'a DesiredContainer,
}

impl<'a, 'c> Replica<'a, 'c> {
    /// The replica of `workload`'s service on this node.
    pub(super) fn new(
        ctx: &'a Context<'c>,
        progress: &'a mut Progress,
        workload: &'a Workload,
    ) -> Self {
        Replica {
            ctx,
            progress,
            service: &workload.service,
            desired: &workload.container,
        }
    }

    fn name(&self, slot: Slot) -> String {
        replica_container_name(
            &self.service.name,
            self.ctx.node,
            self.desired.replica_number(),
            slot,
        )
    }

    fn stop_timeout(&self) -> Duration {
        self.service.upgrade.stop_timeout.get()
    }

    /// Creates and starts the container for `slot` at `address`, wires it in
    /// and waits until it is healthy there. When it does not become healthy
    /// it is removed again, unless `onFailure` is `pause`.
    pub(super) fn start(&mut self, slot: Slot, address: IpAddr) -> Result<(), ApplyError> {
        let name = self.name(slot);
        self.progress
            .step(&format!("{name}: creating and starting at {address}"));
        let mut spec = container_spec(self.service, self.desired, self.ctx.node, slot)?;
        spec.labels
            .insert(LABEL_ADDRESS.to_string(), address.to_string());
        self.ctx.host.create(&spec)?;
        let started = self
            .ctx
            .host
            .start(&name)
            .map_err(ApplyError::from)
            .and_then(|()| self.wire(&name, address))
            .and_then(|()| self.wait_ready(&name, address));
        if let Err(error) = started {
            if self.service.upgrade.on_failure == OnFailure::Rollback {
                self.progress.step(&format!(
                    "{name}: not healthy; removing it so the next apply starts afresh"
                ));
                self.remove(&name)?;
            }
            return Err(error);
        }
        Ok(())
    }

    /// Creates the primary at `address`, wired in and healthy.
    pub(super) fn create(&mut self, address: IpAddr) -> Result<(), ApplyError> {
        self.start(Slot::Primary, address)?;
        self.ctx.host.keep_running(&self.name(Slot::Primary))?;
        Ok(())
    }

    /// Starts the stopped primary again, wires it in at `address` and waits
    /// until healthy.
    pub(super) fn restart(&mut self, address: IpAddr) -> Result<(), ApplyError> {
        let name = self.name(Slot::Primary);
        self.progress.step(&format!("{name}: starting"));
        self.ctx.host.start(&name)?;
        self.wire(&name, address)?;
        self.wait_ready(&name, address)?;
        self.ctx.host.keep_running(&name)?;
        Ok(())
    }

    /// Replaces the primary in place at `address` (stop-start, or a stopped
    /// container whose spec changed): the replica is down until the new one
    /// is healthy.
    pub(super) fn replace(&mut self, address: IpAddr) -> Result<(), ApplyError> {
        let name = self.name(Slot::Primary);
        self.progress
            .step(&format!("{name}: stopping and removing"));
        self.remove(&name)?;
        self.start(Slot::Primary, address)?;
        self.ctx.host.keep_running(&name)?;
        Ok(())
    }

    /// A zero-downtime upgrade, new or found in flight (see the module doc).
    pub(super) fn upgrade(&mut self, planned: &ReplicaUpgrade) -> Result<(), ApplyError> {
        let primary = self.name(Slot::Primary);
        let next = self.name(Slot::Next);
        let ReplicaUpgrade {
            old_at,
            next_at,
            in_flight,
            old_exists,
            load_balancers,
        } = *planned;
        match in_flight.map(|f| f.decision) {
            Some(Decision::RollBack) => {
                self.progress
                    .step(&format!("{next}: removing (rolling the upgrade back)"));
                return self.remove(&next);
            }
            Some(Decision::Resume) => {
                self.progress.step(&format!(
                    "{}: resuming the upgrade: checking {next} at {next_at}",
                    self.service.name
                ));
                let ready = if self.ctx.host.veths()?.iter().any(|v| {
                    v.service == self.service.name.value && v.address == next_at.to_string()
                }) {
                    Ok(())
                } else {
                    self.wire(&next, next_at)
                }
                .and_then(|()| self.wait_ready(&next, next_at));
                if let Err(error) = ready {
                    return self.fail("start-next", error);
                }
            }
            None => {
                if let Err(error) = self.start(Slot::Next, next_at) {
                    return self.fail("start-next", error);
                }
            }
        }
        if old_exists || in_flight.is_none() {
            if let Err(error) = self.wait_switch(next_at) {
                return self.fail("switch", error);
            }
            match self.wait_drained(old_at, load_balancers) {
                Ok(0) => {}
                Ok(left) if self.service.upgrade.on_drain_timeout == OnDrainTimeout::Rollback => {
                    return self.fail(
                        "drain",
                        ApplyError::DrainTimeout {
                            service: self.service.name.value.clone(),
                            left,
                        },
                    );
                }
                Ok(left) => self.progress.step(&format!(
                    "{primary}: drainTimeout passed with {left} connections open; they are cut now (onDrainTimeout: proceed)"
                )),
                Err(error) => return self.fail("drain", error),
            }
            self.progress
                .step(&format!("{primary}: removing the old version at {old_at}"));
            self.remove(&primary)?;
        }
        self.progress
            .step(&format!("{next}: becoming {primary} at {next_at}"));
        self.ctx.host.rename(&next, &primary)?;
        self.ctx.host.keep_running(&primary)?;
        Ok(())
    }

    /// Waits `switchWait`, so every load-balancer node can see the next
    /// replica answer and switch on its next apply.
    fn wait_switch(&mut self, next_at: IpAddr) -> Result<(), ApplyError> {
        let wait = self.service.upgrade.switch_wait.get();
        let host = self.ctx.host;
        let started = host.now();
        let elapsed = || host.now().saturating_duration_since(started);
        while elapsed() < wait {
            if self.ctx.interrupted() {
                self.progress.end_wait();
                return Err(ApplyError::Interrupted);
            }
            self.progress.waiting(&format!(
                "{}: load-balancer nodes switch new connections to {next_at}; {} to go",
                self.service.name,
                short(wait - elapsed().min(wait))
            ));
            host.sleep(POLL.min(wait - elapsed().min(wait)));
        }
        self.progress.end_wait();
        Ok(())
    }

    /// Waits until no live connection to `old_at` is left and no new one has
    /// come for [`QUIET`], or `drainTimeout` passes; returns how many were
    /// left. New connections mean a load-balancer node has not switched yet
    /// (it applies late): a drain that only waited for the count to touch 0
    /// could remove the old replica between two of them.
    fn wait_drained(&mut self, old_at: IpAddr, balancers: &[IpAddr]) -> Result<u64, ApplyError> {
        let timeout = self.service.upgrade.drain_timeout.get();
        let what = format!(
            "{}: connections to {old_at} (and {} without a new one)",
            self.service.name,
            short(QUIET)
        );
        let host = self.ctx.host;
        // Load-balancer nodes probe both addresses of each replica on every
        // apply; those probes come from their own addresses and are not clients.
        let mut seen: HashSet<u32> = HashSet::new();
        let mut first = true;
        let mut last_activity = host.now();
        let drained = wait_until_drained(self.ctx, self.progress, &what, timeout, |_| {
            let mut flows = host.flows_to(old_at)?;
            flows.retain(|f| f.source.is_none_or(|s| !balancers.contains(&s)));
            let live = flows.iter().filter(|f| f.live).count() as u64;
            let new = flows.iter().any(|f| !seen.contains(&f.id));
            seen.extend(flows.iter().map(|f| f.id));
            if live > 0 || (new && !first) {
                last_activity = host.now();
            }
            first = false;
            let quiet = host.now().saturating_duration_since(last_activity) >= QUIET;
            Ok(if live == 0 && !quiet { 1 } else { live })
        })?;
        Ok(match drained {
            Drained::Empty => 0,
            Drained::TimedOut(left) => left,
        })
    }

    /// A stage failed: roll back (remove the next replica: load-balancer nodes
    /// that switched to it fail over to the old one once it stops answering)
    /// or, with `onFailure: pause`, leave everything as it is.
    fn fail(&mut self, stage: &'static str, error: ApplyError) -> Result<(), ApplyError> {
        let service = self.service.name.value.clone();
        if self.service.upgrade.on_failure == OnFailure::Pause
            && !matches!(error, ApplyError::Interrupted)
        {
            return Err(ApplyError::Paused {
                service,
                stage,
                cause: Box::new(error),
            });
        }
        let next = self.name(Slot::Next);
        self.progress.step(&format!(
            "{next}: removing (rolling back after {stage} failed)"
        ));
        self.remove(&next)?;
        Err(ApplyError::RolledBack {
            service,
            cause: Box::new(error),
        })
    }

    fn wire(&mut self, name: &str, address: IpAddr) -> Result<(), ApplyError> {
        wire(
            self.ctx,
            self.progress,
            &self.service.name.value,
            name,
            address,
        )
    }

    fn wait_ready(&mut self, name: &str, address: IpAddr) -> Result<(), ApplyError> {
        wait_ready(
            self.ctx,
            self.progress,
            self.service,
            name,
            ProbeAt {
                ip: address,
                temporary: false,
            },
        )
    }

    /// Stops and removes `name`; its veth goes with its network namespace.
    fn remove(&mut self, name: &str) -> Result<(), ApplyError> {
        if self.ctx.host.state(name)?.is_none() {
            return Ok(());
        }
        self.ctx.host.stop(name, self.stop_timeout())?;
        self.ctx.host.remove(name)?;
        Ok(())
    }
}
