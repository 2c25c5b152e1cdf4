//! Staged upgrades: redirect-drain (design §3) with rollback, and stop-start.
//! Each completed stage is journaled; rollback reads live state, so it works
//! the same after a crash as after a failure.

use std::sync::atomic::AtomicBool;
use std::time::Duration;

use super::canary::{self, Held};
use super::drain::{Arrivals, Drained, wait_drained, wait_established};
use super::hold::RedirectHold;
use super::progress::Progress;
use super::ready::{ProbeAt, wait_ready, wait_ready_ticking};
use super::{ApplyError, Context, container_spec};
use crate::backend::conntrack::UdpPort;
use crate::desired::DesiredContainer;
use crate::desired::host_table::{canary_comments, service_redirects};
use crate::journal::{CanaryRecord, UpgradeRecord, now};
use crate::model::NftTable;
use crate::ownership::{Slot, container_name};
use crate::plan::operation::{CanarySplit, UpgradeFrom};
use crate::plan::{Decision, InFlight, StageName};
use crate::spec::{OnDrainTimeout, OnFailure, Protocol, Service};

/// The stages of a redirect-drain upgrade, in order (the canary only when
/// the upgrade has one).
const STAGES: [StageName; 8] = [
    StageName::StartNext,
    StageName::Canary,
    StageName::Redirect,
    StageName::Drain,
    StageName::Swap,
    StageName::Unredirect,
    StageName::DrainNext,
    StageName::Finish,
];

/// Test hook: `LESSNAT_TEST_KILL_AFTER=STAGE` makes apply kill itself with
/// SIGKILL right after STAGE is journaled, to test crash recovery.
const KILL_AFTER: &str = "LESSNAT_TEST_KILL_AFTER";

/// One service's upgrade.
pub(super) struct Upgrade<'a, 'c> {
    ctx: &'a Context<'c>,
    progress: &'a mut Progress,
    service: &'a Service,
    desired: &'a DesiredContainer,
    primary: String,
    next: String,
    prev: String,
    hold: RedirectHold<'a>,
    canary: Option<&'a CanarySplit>,
    canary_hold: RedirectHold<'a>,
    /// Whether a canary's split may be in lessnat's table: this upgrade has
    /// a canary, or the plan found one.
    may_split: bool,
}

impl<'a, 'c> Upgrade<'a, 'c> {
    /// The upgrade of `service` to `desired`; `redirected_table` is
    /// lessnat's table while its redirect holds (`None`: a stop-start).
    pub(super) fn new(
        ctx: &'a Context<'c>,
        progress: &'a mut Progress,
        service: &'a Service,
        desired: &'a DesiredContainer,
        redirected_table: Option<&'a NftTable>,
    ) -> Self {
        let name = |slot| container_name(&service.name, ctx.node, slot);
        Upgrade {
            primary: name(Slot::Primary),
            next: name(Slot::Next),
            prev: name(Slot::Prev),
            hold: RedirectHold::new(service, redirected_table),
            canary: None,
            canary_hold: RedirectHold::canary(service, None),
            may_split: false,
            ctx,
            progress,
            service,
            desired,
        }
    }

    /// The same upgrade with a canary before its redirect; `split_found`:
    /// the plan found a canary's split in lessnat's table.
    pub(super) fn with_canary(
        mut self,
        canary: Option<&'a CanarySplit>,
        split_found: bool,
    ) -> Self {
        self.canary_hold = RedirectHold::canary(self.service, canary.map(|c| &c.table));
        self.canary = canary;
        self.may_split = canary.is_some() || split_found;
        self
    }

    /// The stages this upgrade runs, in order.
    fn stages(&self) -> Vec<StageName> {
        STAGES
            .into_iter()
            .filter(|s| *s != StageName::Canary || self.canary.is_some())
            .collect()
    }

    fn stop_timeout(&self) -> Duration {
        self.service.upgrade.stop_timeout.get()
    }

    /// Times lessnat's table was written again because someone else deleted
    /// it while the redirect had to hold.
    pub(super) fn restores(&self) -> usize {
        self.hold.restores()
    }

    /// Takes the hold on the redirect (see [`RedirectHold`]) and checks it now.
    fn hold_redirect(&mut self) -> Result<(), ApplyError> {
        self.hold.take(self.ctx.host, self.progress)
    }

    /// Waits until `container` is healthy; while the redirect is held, it is
    /// checked before each probe.
    fn wait_ready_holding(&mut self, container: &str, at: ProbeAt) -> Result<(), ApplyError> {
        let hold = &mut self.hold;
        wait_ready_ticking(self.ctx, self.progress, self.service, container, at, |p| {
            hold.check(p)
        })
    }

    fn exists(&self, name: &str) -> Result<bool, ApplyError> {
        Ok(self.ctx.host.state(name)?.is_some())
    }

    fn journal(
        &self,
        reached: Option<StageName>,
        rolling_back: bool,
        from: Option<&UpgradeFrom>,
    ) -> Result<(), ApplyError> {
        let file = &self.ctx.journal;
        let mut journal = file.read()?;
        let name = self.service.name.value.clone();
        let record = journal
            .upgrades
            .entry(name)
            .or_insert_with(|| UpgradeRecord {
                strategy: self.service.upgrade.strategy,
                from_spec: from.map(|f| f.spec.clone()).unwrap_or_default(),
                from_image: from.map(|f| f.image.clone()).unwrap_or_default(),
                to_spec: self.desired.spec_hash(),
                reached: None,
                rolling_back: false,
                started_at: now(),
                updated_at: now(),
                canary: None,
            });
        record.reached = reached;
        record.rolling_back = rolling_back;
        record.updated_at = now();
        file.write(&journal)?;
        Ok(())
    }

    /// Records the canary holding (`None`: none holds), for `lessnat apply
    /// --promote` / `--abort` and `lessnat status`.
    fn journal_canary(&self, canary: Option<CanaryRecord>) -> Result<(), ApplyError> {
        let mut journal = self.ctx.journal.read()?;
        if let Some(record) = journal.upgrades.get_mut(&self.service.name.value) {
            record.canary = canary;
            record.updated_at = now();
            self.ctx.journal.write(&journal)?;
        }
        Ok(())
    }

    /// Ends a canary's split (its rules, whether or not they are there):
    /// new connections go where the redirect says.
    fn end_split(&mut self) -> Result<(), ApplyError> {
        if !self.may_split {
            return Ok(());
        }
        self.canary_hold.release(self.progress)?;
        self.ctx
            .host
            .replace_rules(&canary_comments(self.service), &[])?;
        Ok(())
    }

    /// The canary stage: sets the split, holds it while the next version
    /// stays healthy, and records it in the journal meanwhile.
    fn run_canary(&mut self, split: &CanarySplit) -> Result<(), ApplyError> {
        let name = self.service.name.value.clone();
        // Journaled first: whoever sees the split can ask to end it.
        self.journal_canary(Some(canary::holding(split)))?;
        self.ctx
            .host
            .replace_rules(&canary_comments(self.service), &split.rules)?;
        self.canary_hold.take(self.ctx.host, self.progress)?;
        let next = self.next.clone();
        let hold = &mut self.canary_hold;
        let watched = [canary::Watched {
            container: next.clone(),
            at: ProbeAt::loopback(true),
        }];
        let held = canary::hold(
            self.ctx,
            self.progress,
            self.service,
            &watched,
            split,
            |p| hold.check(p),
        );
        self.journal_canary(None)?;
        match held? {
            Held::Out => self.progress.step(&format!(
                "{name}: canary: {next} stayed healthy for {}; promoting",
                split.hold
            )),
            Held::Promoted => self.progress.step(&format!(
                "{name}: canary: promoted by `lessnat apply --promote`"
            )),
        }
        Ok(())
    }

    fn forget(&self) -> Result<(), ApplyError> {
        let mut journal = self.ctx.journal.read()?;
        journal.upgrades.remove(&self.service.name.value);
        self.ctx.journal.write(&journal)?;
        Ok(())
    }

    fn create(&mut self, slot: Slot) -> Result<(), ApplyError> {
        let spec = container_spec(self.service, self.desired, self.ctx.node, slot)?;
        self.ctx.host.create(&spec)?;
        self.ctx.host.start(&spec.name)?;
        Ok(())
    }

    /// Stops and removes `name`; nothing to do when it is gone already (an
    /// apply that crashed inside finish may have removed it).
    fn remove(&self, name: &str) -> Result<(), ApplyError> {
        if !self.exists(name)? {
            return Ok(());
        }
        self.ctx.host.stop(name, self.stop_timeout())?;
        self.ctx.host.remove(name)?;
        Ok(())
    }

    /// Moves UDP flows of the service's ports: UDP cannot drain, so the
    /// conntrack entries that keep a flow where it should no longer go (or
    /// would make the kernel rewrite its client's source port) are deleted,
    /// until none has come back for a while, and the next datagram of each
    /// flow is matched afresh: redirected to the temporary port while
    /// `redirected`, to the canonical port once not.
    fn move_udp_flows(&self, redirected: bool) -> Result<(), ApplyError> {
        let ports: Vec<UdpPort> = self
            .service
            .ports
            .iter()
            .filter(|p| p.protocol == Protocol::Udp)
            .map(|p| {
                let temp_port = p.temp_port.as_ref().map(|t| t.value);
                UdpPort {
                    port: p.port.value,
                    temp_port,
                    redirected_to: temp_port.filter(|_| redirected),
                }
            })
            .collect();
        if !ports.is_empty() {
            self.ctx.host.settle_udp_flows(&ports)?;
        }
        Ok(())
    }

    fn set_redirects(&self, present: bool) -> Result<(), ApplyError> {
        for redirect in service_redirects(self.service) {
            self.ctx.host.set_redirect(&redirect, present)?;
        }
        self.move_udp_flows(present)
    }

    /// Runs the upgrade: a new one, or the rest (or the planned rollback) of one
    /// in flight. A planned rollback succeeds when the old version serves again;
    /// a new upgrade to the current spec is then planned afresh.
    pub(super) fn run(
        &mut self,
        in_flight: Option<&InFlight>,
        from: Option<&UpgradeFrom>,
    ) -> Result<(), ApplyError> {
        match in_flight {
            None => {
                self.journal(None, false, from)?;
                self.forward(None)
            }
            Some(InFlight {
                reached,
                decision: Decision::Resume,
                ..
            }) => {
                self.progress.step(&format!(
                    "{}: resuming the upgrade after stage {}",
                    self.service.name,
                    reached.as_str()
                ));
                self.journal(Some(*reached), false, from)?;
                // Live state cannot show whether the health wait of start-next
                // or of the swap ended: an apply killed during it leaves the
                // same host as one killed after it.
                let mut after = *reached;
                if after < StageName::Swap {
                    // Check the next container again before traffic goes (or
                    // keeps going) to it.
                    self.progress.step(&format!(
                        "{}: checking that {} is healthy before going on",
                        self.service.name, self.next
                    ));
                    let next = self.next.clone();
                    // After the redirect, traffic goes to it already: the
                    // redirect must hold.
                    let held = if after >= StageName::Redirect {
                        self.hold_redirect()
                    } else {
                        Ok(())
                    };
                    let checked =
                        held.and_then(|()| self.wait_ready_holding(&next, ProbeAt::loopback(true)));
                    if let Err(error) = checked {
                        return self.fail(StageName::StartNext, error);
                    }
                } else if after == StageName::Swap {
                    // Run the swap again (it only does what is missing, then
                    // waits until the new primary is healthy) before the
                    // redirect goes.
                    after = StageName::Drain;
                }
                self.forward(Some(after))
            }
            Some(InFlight {
                reached,
                decision: Decision::RollBack,
                why,
            }) => {
                self.progress.step(&format!(
                    "{}: rolling back the upgrade in flight ({why})",
                    self.service.name
                ));
                self.journal(Some(*reached), true, from)?;
                self.rollback()
            }
        }
    }

    fn forward(&mut self, mut reached: Option<StageName>) -> Result<(), ApplyError> {
        let stages = self.stages();
        let todo: Vec<StageName> = stages
            .iter()
            .copied()
            .filter(|s| reached.is_none_or(|r| *s > r))
            .collect();
        for stage in todo {
            let number = stages.iter().position(|s| *s == stage).map_or(0, |i| i + 1);
            self.progress.step(&format!(
                "{}: stage {number}/{} {}",
                self.service.name,
                stages.len(),
                stage.as_str()
            ));
            match self.stage(stage) {
                Ok(()) => {
                    reached = Some(stage);
                    if stage == StageName::Finish {
                        self.forget()?;
                    } else {
                        self.journal(reached, false, None)?;
                    }
                    kill_if_asked(stage);
                }
                Err(error) if stage <= StageName::Swap => return self.fail(stage, error),
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }

    /// A stage before the new version serves the canonical ports failed.
    fn fail(&mut self, stage: StageName, error: ApplyError) -> Result<(), ApplyError> {
        let service = self.service.name.value.clone();
        // A canary that fails or is aborted always rolls back: deciding
        // that is what it is for.
        let canary = matches!(
            error,
            ApplyError::CanaryUnhealthy { .. } | ApplyError::CanaryAborted { .. }
        );
        if self.service.upgrade.on_failure == OnFailure::Pause && !canary {
            return Err(ApplyError::Paused {
                service,
                stage: stage.as_str(),
                cause: Box::new(error),
            });
        }
        self.progress.step(&format!(
            "{service}: stage {} failed: {}; rolling back",
            stage.as_str(),
            crate::error::chain(&error)
        ));
        self.journal(None, true, None)?;
        self.rollback()?;
        Err(ApplyError::RolledBack {
            service,
            cause: Box::new(error),
        })
    }

    fn stage(&mut self, stage: StageName) -> Result<(), ApplyError> {
        match stage {
            StageName::StartNext => {
                if self.exists(&self.next)? {
                    self.remove(&self.next.clone())?;
                }
                self.create(Slot::Next)?;
                let next = self.next.clone();
                self.wait_ready_holding(&next, ProbeAt::loopback(true))
            }
            StageName::Canary => match self.canary {
                Some(split) => self.run_canary(split),
                None => Ok(()),
            },
            StageName::Redirect => {
                self.set_redirects(true)?;
                // Only now does a canary's split end: the redirect takes
                // every new connection, so none meets a gap.
                self.end_split()?;
                self.hold_redirect()
            }
            StageName::Drain => {
                self.hold_redirect()?;
                let what = format!("{}: draining {}", self.service.name, self.primary);
                let timeout = self.service.upgrade.drain_timeout.get();
                let (ctx, service, primary) = (self.ctx, self.service, &self.primary);
                let hold = &mut self.hold;
                let mut arrivals = Arrivals::default();
                match wait_established(
                    ctx,
                    self.progress,
                    &what,
                    timeout,
                    service,
                    false,
                    |progress, left| {
                        hold.check(progress)?;
                        if let Some(total) = arrivals.note(left) {
                            progress.step(&format!(
                            "{}: {total} new connection{} reached {primary} directly since the redirect was set (it was missing); the drain waits for them too",
                            service.name,
                            if total == 1 { "" } else { "s" }
                        ));
                        }
                        Ok(())
                    },
                )? {
                    Drained::Empty => Ok(()),
                    Drained::TimedOut(left) => match self.service.upgrade.on_drain_timeout {
                        OnDrainTimeout::Proceed => {
                            self.progress.step(&format!("{what}: {left} connections still open after the drain timeout; proceeding"));
                            Ok(())
                        }
                        OnDrainTimeout::Rollback => Err(ApplyError::DrainTimeout {
                            service: self.service.name.value.clone(),
                            left,
                        }),
                    },
                }
            }
            StageName::Swap => {
                // Once the old primary stops, the redirect is all that serves.
                self.hold_redirect()?;
                if self.exists(&self.primary)? && !self.exists(&self.prev)? {
                    self.ctx.host.stop(&self.primary, self.stop_timeout())?;
                    self.ctx.host.rename(&self.primary, &self.prev)?;
                }
                match self.ctx.host.state(&self.primary)? {
                    None => self.create(Slot::Primary)?,
                    // Created but not started, or stopped, by an apply that crashed.
                    Some(state) if !state.running => self.ctx.host.start(&self.primary)?,
                    Some(_) => {}
                }
                let primary = self.primary.clone();
                self.wait_ready_holding(&primary, ProbeAt::loopback(false))?;
                Ok(self.ctx.host.keep_running(&primary)?)
            }
            StageName::Unredirect => {
                self.hold.release(self.progress)?;
                self.set_redirects(false)
            }
            StageName::DrainNext => {
                let what = format!("{}: draining {}", self.service.name, self.next);
                let timeout = self.service.upgrade.drain_timeout.get();
                let service = self.service;
                if let Drained::TimedOut(left) =
                    wait_drained(self.ctx, self.progress, &what, timeout, service, true)?
                {
                    self.progress.step(&format!(
                        "{what}: {left} connections still open after the drain timeout; proceeding"
                    ));
                }
                Ok(())
            }
            StageName::Finish => {
                self.remove(&self.next.clone())?;
                self.remove(&self.prev.clone())
            }
            other => Err(ApplyError::Unsupported {
                what: format!("stage {} in a redirect-drain upgrade", other.as_str()),
            }),
        }
    }

    /// Puts the old version back, from whatever state the host is in: the
    /// previous container restored if it was swapped out, redirects removed,
    /// the next container removed.
    ///
    /// A rollback is not interrupted by SIGINT or SIGTERM (they are what
    /// often starts it): its waits are bounded by `startTimeout` and
    /// `drainTimeout`, and stopping half way would leave the redirect and the
    /// next container behind.
    fn rollback(&mut self) -> Result<(), ApplyError> {
        let calm = AtomicBool::new(false);
        let ctx = Context {
            node: self.ctx.node,
            host: self.ctx.host,
            journal: self.ctx.journal.clone(),
            interrupt: &calm,
        };
        if self.exists(&self.prev)? {
            // Until the old version serves the canonical ports again, new
            // connections go to next: the redirect must hold.
            self.hold_redirect()?;
            self.progress.step(&format!(
                "{}: rollback: restoring {}",
                self.service.name, self.prev
            ));
            if self.exists(&self.primary)? {
                self.remove(&self.primary.clone())?;
            }
            self.ctx.host.rename(&self.prev, &self.primary)?;
            self.ctx.host.start(&self.primary)?;
            let primary = self.primary.clone();
            let hold = &mut self.hold;
            wait_ready_ticking(
                &ctx,
                self.progress,
                self.service,
                &primary,
                ProbeAt::loopback(false),
                |p| hold.check(p),
            )?;
            self.ctx.host.keep_running(&primary)?;
        }
        self.hold.release(self.progress)?;
        self.progress.step(&format!(
            "{}: rollback: removing the redirect",
            self.service.name
        ));
        self.end_split()?;
        self.set_redirects(false)?;
        if self.exists(&self.next)? {
            // Connections the redirect sent to the next container finish
            // first, as in drain-next: removing it would cut them.
            let what = format!("{}: rollback: draining {}", self.service.name, self.next);
            let timeout = self.service.upgrade.drain_timeout.get();
            let service = self.service;
            if let Drained::TimedOut(left) =
                wait_drained(&ctx, self.progress, &what, timeout, service, true)?
            {
                self.progress.step(&format!(
                    "{what}: {left} connections still open after the drain timeout; proceeding"
                ));
            }
            self.progress.step(&format!(
                "{}: rollback: removing {}",
                self.service.name, self.next
            ));
            self.remove(&self.next.clone())?;
        }
        self.forget()
    }

    /// A stop-start upgrade: the old container is stopped (kept until the new
    /// one is healthy, then removed; restored if it never is).
    pub(super) fn stop_start(&mut self) -> Result<(), ApplyError> {
        let service = self.service.name.value.clone();
        self.progress
            .step(&format!("{service}: stop-start: stopping {}", self.primary));
        if self.exists(&self.prev)? {
            self.remove(&self.prev.clone())?;
        }
        self.ctx.host.stop(&self.primary, self.stop_timeout())?;
        self.ctx.host.rename(&self.primary, &self.prev)?;
        self.progress
            .step(&format!("{service}: stop-start: starting the new version"));
        let started = self.create(Slot::Primary).and_then(|()| {
            let primary = self.primary.clone();
            wait_ready(
                self.ctx,
                self.progress,
                self.service,
                &primary,
                ProbeAt::loopback(false),
            )?;
            Ok(self.ctx.host.keep_running(&primary)?)
        });
        match started {
            Ok(()) => self.remove(&self.prev.clone()),
            Err(error) if self.service.upgrade.on_failure == OnFailure::Pause => {
                Err(ApplyError::Paused {
                    service,
                    stage: "start",
                    cause: Box::new(error),
                })
            }
            Err(error) => {
                self.progress.step(&format!(
                    "{service}: the new version failed: {}; restoring the old one",
                    crate::error::chain(&error)
                ));
                self.rollback()?;
                Err(ApplyError::RolledBack {
                    service,
                    cause: Box::new(error),
                })
            }
        }
    }
}

fn kill_if_asked(stage: StageName) {
    if std::env::var(KILL_AFTER).is_ok_and(|s| s == stage.as_str()) {
        let _ = nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::Signal::SIGKILL);
    }
}
