//! Routed mode on a worker: starting replicas wired in with a veth pair at
//! their own address, and upgrading them across machines (docs/routed-mode.md):
//! the next version starts at the replica's other address; load-balancer
//! nodes see it answer and switch new connections to it on their own applies;
//! this worker waits `switchWait`, then until its conntrack shows no live
//! connection to the old address, and only then removes the old replica.
//! Several replicas of a service may do this together (`maxParallel`), and a
//! canary may come first: this worker sends a share of the new connections
//! that reach each old replica on to its next one for the hold, then drops
//! the load-balancer nodes' probes of the old replicas so they switch.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use super::canary::{self, Held};
use super::drain::{Drained, wait_until_drained};
use super::hold::RedirectHold;
use super::progress::{Progress, short};
use super::ready::{ProbeAt, wait_ready};
use super::{ApplyError, Context, container_spec};
use crate::backend::conntrack::FlowTo;
use crate::backend::etcd::EtcdError;
use crate::backend::veth::Wiring;
use crate::cluster::handshake::{Handshake, Published, SwitchAck};
use crate::desired::DesiredContainer;
use crate::error::chain;
use crate::journal::{CanaryRecord, UpgradeRecord, now};
use crate::ownership::{LABEL_ADDRESS, Slot, replica_container_name};
use crate::plan::operation::{ReplicaCanary, ReplicaMove, Switch, Unanswered, Workload};
use crate::plan::{Decision, StageName};
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
    // The table is live: acknowledge every switch first (workers wait for
    // these), then wait for this node's own connections.
    for switch in switches {
        if let Some(ack) = &switch.ack {
            acknowledge(progress, &switch.service, switch.from, switch.to, ack);
        }
    }
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

/// On a load-balancer node whose table sends `service`'s new connections
/// from `from` to `to`: writes `ack` in etcd and says so. A write that
/// fails is said, not an error: serving does not depend on etcd, and a
/// later run acknowledges again while the upgrade is in flight.
pub(super) fn acknowledge(
    progress: &mut Progress,
    service: &str,
    from: IpAddr,
    to: IpAddr,
    ack: &SwitchAck,
) {
    match ack.acknowledge(service, from, to) {
        Ok(()) => progress.step(&format!(
            "{service}: acknowledged in etcd: this node sends new connections to {to} ({})",
            short_version(&ack.version)
        )),
        Err(error) => progress.step(&format!(
            "{service}: could not acknowledge the switch to {to} in etcd ({}); a later run acknowledges it while the upgrade is in flight, else the worker goes on once this node's lease expires, or rolls back after drainTimeout",
            chain(&error)
        )),
    }
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

/// Whether load-balancer nodes switch away from a replica's old version and
/// it drains (not when a resumed upgrade finds the old one gone).
fn switches(member: &ReplicaMove) -> bool {
    member.old_exists || member.in_flight.is_none()
}

/// Upgrades `members`, replicas of one service on this node, together (see
/// [`Batch`]), with the canary the plan gives them; `load_balancers` are the
/// load-balancer nodes' addresses. Returns how many times lessnat's table
/// was written again because someone else deleted it meanwhile.
pub(super) fn upgrade(
    ctx: &Context,
    progress: &mut Progress,
    members: &[ReplicaMove],
    load_balancers: &[IpAddr],
    canary: Option<&ReplicaCanary>,
) -> Result<usize, ApplyError> {
    let Some(first) = members.first() else {
        return Ok(0);
    };
    let service = &first.workload.service;
    let mut batch = Batch {
        ctx,
        progress,
        service,
        members,
        load_balancers,
        canary,
        hold: RedirectHold::canary(service, None),
        rules: if canary.is_some() {
            CanaryRules::Unknown
        } else {
            CanaryRules::Ended
        },
        restores: 0,
    };
    let result = batch.run();
    let restores = batch.restores + batch.hold.restores();
    result.map(|()| restores)
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

/// Routed upgrades of one or more replicas of a service on this node, new
/// or found in flight (see the module doc): every next version starts, then
/// one switch wait and one drain for all of them, then each old replica is
/// removed and its next one takes its name. A failure rolls the whole batch
/// back (or, with `onFailure: pause`, leaves it).
struct Batch<'a, 'c> {
    ctx: &'a Context<'c>,
    progress: &'a mut Progress,
    service: &'a Service,
    members: &'a [ReplicaMove],
    /// Load-balancer node addresses (their probes are not clients).
    load_balancers: &'a [IpAddr],
    /// The canary before the switch, if any.
    canary: Option<&'a ReplicaCanary>,
    /// The hold on lessnat's table while the canary's rules must stay.
    hold: RedirectHold<'a>,
    /// Where the canary's rules stand.
    rules: CanaryRules,
    /// Times lessnat's table was written again by holds that ended.
    restores: usize,
}

/// Which of a canary's rules may be in lessnat's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CanaryRules {
    /// None: no canary, or its rules were ended.
    Ended,
    /// Maybe the split or the promotion (an upgrade with a canary that has
    /// not set them yet, or one found in flight).
    Unknown,
    /// The split: the next replicas have connections only the split sent.
    Split,
    /// The promotion: load-balancer nodes switch to the next replicas.
    Promoted,
}

impl<'a, 'c> Batch<'a, 'c> {
    fn replica(&mut self, member: &'a ReplicaMove) -> Replica<'_, 'c> {
        Replica {
            ctx: self.ctx,
            progress: &mut *self.progress,
            service: self.service,
            desired: &member.workload.container,
        }
    }

    fn name(&self, member: &ReplicaMove, slot: Slot) -> String {
        replica_container_name(
            &self.service.name,
            self.ctx.node,
            member.workload.container.replica_number(),
            slot,
        )
    }

    /// Runs the upgrade.
    fn run(&mut self) -> Result<(), ApplyError> {
        let members = self.members;
        if members.iter().any(|m| {
            m.in_flight
                .as_ref()
                .is_some_and(|f| f.decision == Decision::RollBack)
        }) {
            self.end_canary()?;
        }
        let mut moving: Vec<&ReplicaMove> = Vec::new();
        for member in members {
            let next = self.name(member, Slot::Next);
            match member.in_flight.as_ref().map(|f| f.decision) {
                Some(Decision::RollBack) => {
                    self.progress
                        .step(&format!("{next}: removing (rolling the upgrade back)"));
                    self.replica(member).remove(&next)?;
                    continue;
                }
                Some(Decision::Resume) => {
                    if let Err(error) = self.resume(member) {
                        return self.fail("start-next", error);
                    }
                }
                None => {
                    if let Err(error) = self.replica(member).start(Slot::Next, member.next_at) {
                        return self.fail("start-next", error);
                    }
                }
            }
            moving.push(member);
        }
        let switching: Vec<&ReplicaMove> = moving.iter().copied().filter(|m| switches(m)).collect();
        let mut finishing: Vec<Published> = Vec::new();
        if !switching.is_empty() {
            let nexts: Vec<IpAddr> = switching.iter().map(|m| m.next_at).collect();
            let olds: Vec<IpAddr> = switching.iter().map(|m| m.old_at).collect();
            if let Some(canary) = self.canary
                && let Err(error) = self.run_canary(&switching, canary)
            {
                return self.fail("canary", error);
            }
            let mut published = Vec::new();
            let handshakes: Vec<(&Handshake, u32)> = switching
                .iter()
                .filter_map(|m| {
                    let number = m.workload.container.replica_number();
                    m.handshake.as_deref().map(|h| (h, number))
                })
                .collect();
            let switched = if handshakes.len() == switching.len() {
                self.wait_acknowledged(&handshakes, &mut published)
            } else {
                self.wait_switch(&nexts, self.service.upgrade.switch_wait.get())
            };
            if let Err(error) = switched {
                self.abandon(published);
                return self.fail("switch", error);
            }
            match self.wait_drained(&olds) {
                Ok(0) => {}
                Ok(left) if self.service.upgrade.on_drain_timeout == OnDrainTimeout::Rollback => {
                    // The old replica takes new connections again: load-balancer
                    // nodes may fail back to it once the upgrade's key is gone.
                    self.abandon(std::mem::take(&mut published));
                    return self.fail(
                        "drain",
                        ApplyError::DrainTimeout {
                            service: self.service.name.value.clone(),
                            left,
                        },
                    );
                }
                Ok(left) => self.progress.step(&format!(
                    "{}: drainTimeout passed with {left} connections open; they are cut now (onDrainTimeout: proceed)",
                    self.service.name
                )),
                Err(error) => {
                    self.abandon(std::mem::take(&mut published));
                    return self.fail("drain", error);
                }
            }
            for published in &published {
                if let Err(error) = published.deregister_old() {
                    self.progress.step(&format!(
                        "{}: could not deregister the old version from etcd ({}); the worker's agent does once it is removed",
                        self.service.name,
                        chain(&error)
                    ));
                }
            }
            finishing = published;
            for member in &switching {
                let primary = self.name(member, Slot::Primary);
                self.progress.step(&format!(
                    "{primary}: removing the old version at {}",
                    member.old_at
                ));
                self.replica(member).remove(&primary)?;
            }
        }
        for member in moving {
            let (primary, next) = (
                self.name(member, Slot::Primary),
                self.name(member, Slot::Next),
            );
            self.progress
                .step(&format!("{next}: becoming {primary} at {}", member.next_at));
            self.ctx.host.rename(&next, &primary)?;
            self.ctx.host.keep_running(&primary)?;
        }
        for published in finishing {
            if let Err(error) = published.finish() {
                self.progress.step(&format!(
                    "{}: could not remove the upgrade's keys from etcd ({}); they go when its lease expires",
                    self.service.name,
                    chain(&error)
                ));
            }
        }
        self.end_canary()
    }

    /// The canary: sets the split and holds it while every next replica
    /// stays healthy (unless the plan found it promoted already), then
    /// promotes it: the load-balancer nodes' probes of the old replicas are
    /// dropped, so each switches on its next apply.
    fn run_canary(
        &mut self,
        switching: &[&ReplicaMove],
        canary: &'a ReplicaCanary,
    ) -> Result<(), ApplyError> {
        let name = self.service.name.value.clone();
        let host = self.ctx.host;
        if !canary.promoted {
            // Journaled first: whoever sees the split can ask to end it.
            self.journal_hold(switching, Some(canary::holding(&canary.split)))?;
            host.replace_rules(&canary.comments, &canary.split.rules)?;
            self.rules = CanaryRules::Split;
            self.hold = RedirectHold::canary(self.service, Some(&canary.split.table));
            self.hold.take(host, self.progress)?;
            let watched: Vec<canary::Watched> = switching
                .iter()
                .map(|m| canary::Watched {
                    container: self.name(m, Slot::Next),
                    at: ProbeAt {
                        ip: m.next_at,
                        temporary: false,
                    },
                })
                .collect();
            let hold = &mut self.hold;
            let held = canary::hold(
                self.ctx,
                self.progress,
                self.service,
                &watched,
                &canary.split,
                |p| hold.check(p),
            );
            self.journal_hold(switching, None)?;
            match held? {
                Held::Out => self.progress.step(&format!(
                    "{name}: canary: the next version stayed healthy for {}; promoting",
                    canary.split.hold
                )),
                Held::Promoted => self.progress.step(&format!(
                    "{name}: canary: promoted by `lessnat apply --promote`"
                )),
            }
            self.hold.release(self.progress)?;
        }
        let olds: Vec<IpAddr> = switching.iter().map(|m| m.old_at).collect();
        self.progress.step(&format!(
            "{name}: dropping load-balancer nodes' probes of {} so they switch (one nft transaction)",
            addresses(&olds)
        ));
        let rules: Vec<_> = canary
            .split
            .rules
            .iter()
            .chain(&canary.promote)
            .cloned()
            .collect();
        host.replace_rules(&canary.comments, &rules)?;
        self.rules = CanaryRules::Promoted;
        self.restores += self.hold.restores();
        self.hold = RedirectHold::canary(self.service, Some(&canary.promoted_table));
        self.hold.take(host, self.progress)
    }

    /// Ends the canary's split and promotion (their rules, whether or not
    /// they are there), when the upgrade has a canary.
    fn end_canary(&mut self) -> Result<(), ApplyError> {
        let Some(canary) = self.canary else {
            return Ok(());
        };
        if self.rules == CanaryRules::Ended {
            return Ok(());
        }
        self.hold.release(self.progress)?;
        self.ctx.host.replace_rules(&canary.comments, &[])?;
        self.rules = CanaryRules::Ended;
        Ok(())
    }

    /// Records the canary holding for the replicas of `switching` (`None`:
    /// it holds no more), for `lessnat apply --promote` / `--abort` and
    /// `lessnat status`: a routed upgrade has no other journal record.
    fn journal_hold(
        &self,
        switching: &[&ReplicaMove],
        canary: Option<CanaryRecord>,
    ) -> Result<(), ApplyError> {
        let file = &self.ctx.journal;
        let mut journal = file.read()?;
        let key = self.service.name.value.clone();
        match (canary, switching.first()) {
            (Some(canary), Some(first)) => {
                journal.upgrades.insert(
                    key,
                    UpgradeRecord {
                        strategy: self.service.upgrade.strategy,
                        from_spec: String::new(),
                        from_image: String::new(),
                        to_spec: first.workload.container.spec_hash(),
                        reached: Some(StageName::StartNext),
                        rolling_back: false,
                        started_at: now(),
                        updated_at: now(),
                        canary: Some(canary),
                    },
                );
            }
            _ => {
                journal.upgrades.remove(&key);
            }
        }
        file.write(&journal)?;
        Ok(())
    }

    /// An upgrade found in flight that resumes: its next replica is wired in
    /// (again, when its veth was lost) and healthy.
    fn resume(&mut self, member: &'a ReplicaMove) -> Result<(), ApplyError> {
        let next = self.name(member, Slot::Next);
        self.progress.step(&format!(
            "{}: resuming the upgrade: checking {next} at {}",
            self.service.name, member.next_at
        ));
        let at = member.next_at.to_string();
        let wired = self
            .ctx
            .host
            .veths()?
            .iter()
            .any(|v| v.service == self.service.name.value && v.address == at);
        let mut replica = self.replica(member);
        if !wired {
            replica.wire(&next, member.next_at)?;
        }
        replica.wait_ready(&next, member.next_at)
    }

    /// Rolled-back upgrades' keys leave etcd at once (else with their lease).
    fn abandon(&mut self, published: Vec<Published>) {
        for published in published {
            if let Err(error) = published.abandon() {
                self.progress.step(&format!(
                    "{}: could not remove the upgrade's keys from etcd ({}); they go when its lease expires",
                    self.service.name,
                    chain(&error)
                ));
            }
        }
    }

    /// Publishes each ready next version (with its replica's number) in
    /// etcd (into `published`) and
    /// waits until every load-balancer node alive then acknowledged the
    /// switch to it, or its lease expired (up to `drainTimeout`); when etcd
    /// cannot be reached, waits what is left of `switchWait` instead, and
    /// says so.
    fn wait_acknowledged(
        &mut self,
        handshakes: &[(&Handshake, u32)],
        published: &mut Vec<Published>,
    ) -> Result<(), ApplyError> {
        let host = self.ctx.host;
        let started = host.now();
        let elapsed = || host.now().saturating_duration_since(started);
        let switch_wait = self.service.upgrade.switch_wait.get();
        let nexts: Vec<IpAddr> = handshakes.iter().map(|(h, _)| h.to).collect();
        let fallback = |this: &mut Self, error: &EtcdError| {
            this.progress.end_wait();
            this.progress.step(&format!(
                "{}: etcd cannot be reached ({}); falling back to switchWait",
                this.service.name,
                chain(error)
            ));
            this.wait_switch(&nexts, switch_wait.saturating_sub(elapsed()))
        };
        for &(handshake, number) in handshakes {
            match handshake.publish(number) {
                Ok(one) => {
                    self.progress.step(&format!(
                        "{}: published {} ({}) in etcd; load-balancer nodes to acknowledge: {}",
                        self.service.name,
                        handshake.to,
                        short_version(&handshake.version),
                        names(&one.standing().waiting)
                    ));
                    published.push(one);
                }
                Err(error) => return fallback(self, &error),
            }
        }
        let timeout = self.service.upgrade.drain_timeout.get();
        for index in 0..published.len() {
            loop {
                let standing = match published[index].wait(POLL) {
                    Ok(standing) => standing.clone(),
                    Err(error) => return fallback(self, &error),
                };
                let to = handshakes[index].0.to;
                if standing.done() {
                    self.progress.end_wait();
                    self.progress.step(&format!(
                        "{}: every live load-balancer node switched to {to}: acknowledged by {}; lease expired: {}",
                        self.service.name,
                        names(&standing.acknowledged),
                        names(&standing.expired)
                    ));
                    break;
                }
                if self.ctx.interrupted() {
                    self.progress.end_wait();
                    return Err(ApplyError::Interrupted);
                }
                if elapsed() >= timeout {
                    self.progress.end_wait();
                    return Err(ApplyError::Unacknowledged {
                        service: self.service.name.value.clone(),
                        waiting: names(&standing.waiting),
                    });
                }
                self.hold.check(self.progress)?;
                self.progress.waiting(&format!(
                    "{}: waiting for {} to acknowledge {to} (or their leases to expire)",
                    self.service.name,
                    names(&standing.waiting)
                ));
            }
        }
        Ok(())
    }

    /// Waits `wait` (`switchWait`), so every load-balancer node can see the
    /// next replicas at `nexts` answer and switch on its next apply.
    fn wait_switch(&mut self, nexts: &[IpAddr], wait: Duration) -> Result<(), ApplyError> {
        let host = self.ctx.host;
        let started = host.now();
        let elapsed = || host.now().saturating_duration_since(started);
        let nexts = addresses(nexts);
        while elapsed() < wait {
            if self.ctx.interrupted() {
                self.progress.end_wait();
                return Err(ApplyError::Interrupted);
            }
            self.hold.check(self.progress)?;
            self.progress.waiting(&format!(
                "{}: load-balancer nodes switch new connections to {nexts}; {} to go",
                self.service.name,
                short(wait - elapsed().min(wait))
            ));
            host.sleep(POLL.min(wait - elapsed().min(wait)));
        }
        self.progress.end_wait();
        Ok(())
    }

    /// Waits until no live connection to any of `olds` is left and none of
    /// them has had a new one for [`QUIET`], or `drainTimeout` passes;
    /// returns how many were left. New connections mean a load-balancer
    /// node has not switched yet (it applies late): a drain that only waited
    /// for the count to touch 0 could remove the old replica between two of
    /// them.
    fn wait_drained(&mut self, olds: &[IpAddr]) -> Result<u64, ApplyError> {
        self.wait_drained_in(self.ctx, olds)
    }

    /// [`Batch::wait_drained`] in `ctx` (a rollback's, which no interrupt
    /// stops).
    fn wait_drained_in(&mut self, ctx: &Context, olds: &[IpAddr]) -> Result<u64, ApplyError> {
        let balancers = self.load_balancers;
        let timeout = self.service.upgrade.drain_timeout.get();
        let what = format!(
            "{}: connections to {} (and {} without a new one)",
            self.service.name,
            addresses(olds),
            short(QUIET)
        );
        let host = self.ctx.host;
        // Load-balancer nodes probe both addresses of each replica on every
        // apply; those probes come from their own addresses and are not clients.
        let mut watched: Vec<(IpAddr, Quiet)> =
            olds.iter().map(|&a| (a, Quiet::new(host.now()))).collect();
        let hold = &mut self.hold;
        let drained = wait_until_drained(ctx, self.progress, &what, timeout, |p| {
            hold.check(p)?;
            let mut left = 0;
            for (old, quiet) in &mut watched {
                let mut flows = host.flows_to(*old)?;
                flows.retain(|f| f.source.is_none_or(|s| !balancers.contains(&s)));
                left += quiet.left(&flows, host.now());
            }
            Ok(left)
        })?;
        Ok(match drained {
            Drained::Empty => 0,
            Drained::TimedOut(left) => left,
        })
    }

    /// A stage failed: roll back (remove every next replica of the batch:
    /// load-balancer nodes that switched to one fail over to its old one
    /// once it stops answering) or, with `onFailure: pause`, leave
    /// everything as it is.
    fn fail(&mut self, stage: &'static str, error: ApplyError) -> Result<(), ApplyError> {
        let service = self.service.name.value.clone();
        // A canary that fails or is aborted always rolls back: deciding
        // that is what it is for.
        let canary = matches!(
            error,
            ApplyError::CanaryUnhealthy { .. } | ApplyError::CanaryAborted { .. }
        );
        if self.service.upgrade.on_failure == OnFailure::Pause
            && !matches!(error, ApplyError::Interrupted)
            && !canary
        {
            return Err(ApplyError::Paused {
                service,
                stage,
                cause: Box::new(error),
            });
        }
        let split = self.rules == CanaryRules::Split;
        self.end_canary()?;
        if split {
            // New connections stop going to the next replicas (load-balancer
            // nodes never switched to them); the ones the split sent them
            // finish there before they go.
            // No interrupt stops this wait (one often starts the
            // rollback): it is bounded by drainTimeout, and stopping half
            // way would leave the next replicas behind.
            let calm = AtomicBool::new(false);
            let ctx = Context {
                node: self.ctx.node,
                host: self.ctx.host,
                journal: self.ctx.journal.clone(),
                interrupt: &calm,
            };
            let nexts: Vec<IpAddr> = self.members.iter().map(|m| m.next_at).collect();
            let left = self.wait_drained_in(&ctx, &nexts)?;
            if left > 0 {
                self.progress.step(&format!(
                    "{service}: drainTimeout passed with {left} connections open to the next version; they are cut now"
                ));
            }
        }
        for member in self.members {
            let next = self.name(member, Slot::Next);
            if self.ctx.host.state(&next)?.is_none() {
                continue;
            }
            self.progress.step(&format!(
                "{next}: removing (rolling back after {stage} failed)"
            ));
            self.replica(member).remove(&next)?;
        }
        Err(ApplyError::RolledBack {
            service,
            cause: Box::new(error),
        })
    }
}

/// `addresses` as `a, b`.
fn addresses(addresses: &[IpAddr]) -> String {
    addresses
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// One old address's drain: the connections seen so far, and when one was
/// last live or new.
struct Quiet {
    seen: HashSet<u32>,
    first: bool,
    last_activity: Instant,
}

impl Quiet {
    fn new(now: Instant) -> Self {
        Quiet {
            seen: HashSet::new(),
            first: true,
            last_activity: now,
        }
    }

    /// What is left of the drain given `flows` at `now`: the live
    /// connections, or 1 while it has not been quiet for [`QUIET`].
    fn left(&mut self, flows: &[FlowTo], now: Instant) -> u64 {
        let live = flows.iter().filter(|f| f.live).count() as u64;
        let new = flows.iter().any(|f| !self.seen.contains(&f.id));
        self.seen.extend(flows.iter().map(|f| f.id));
        if live > 0 || (new && !self.first) {
            self.last_activity = now;
        }
        self.first = false;
        let quiet = now.saturating_duration_since(self.last_activity) >= QUIET;
        if live == 0 && !quiet { 1 } else { live }
    }
}

/// `names` as a list, `none` when empty.
fn names(names: &std::collections::BTreeSet<String>) -> String {
    if names.is_empty() {
        return "none".to_string();
    }
    names.iter().cloned().collect::<Vec<_>>().join(", ")
}

/// A version (`sha256:…`) shortened for output.
fn short_version(version: &str) -> &str {
    version.get(..19).unwrap_or(version)
}
