//! Apply: carry out a plan on the host, change by change, through the
//! backends. Staged upgrades are journaled stage by stage and roll back on
//! failure; everything else is a single step that is safe to repeat.

pub mod canary;
mod drain;
#[cfg(test)]
mod fake;
mod hold;
mod host;
mod primary;
pub mod progress;
mod pull;
mod ready;
mod rollout;
mod routed;
pub mod stale;
#[cfg(test)]
mod tests;
mod upgrade;

use std::sync::atomic::{AtomicBool, Ordering};

use crate::backend::conntrack::ConntrackError;
use crate::backend::docker::DockerError;
use crate::backend::netlink::NetlinkError;
use crate::backend::nft::NftError;
use crate::backend::sysctl::SysctlError;
use crate::desired::DesiredContainer;
use crate::journal::{JournalError, JournalFile};
use crate::model::ContainerSpec;
use crate::netns::NetnsError;
use crate::ownership::Slot;
use crate::plan::Change;
use crate::plan::operation::{Operation, ReplicaMove};
use crate::spec::{PlaceholderError, Service};
pub use host::{Host, LiveHost, TableHold};
use progress::Progress;
use upgrade::Upgrade;

/// Everything apply works with.
pub struct Context<'a> {
    /// The node this host is.
    pub node: &'a str,
    /// The host it changes.
    pub host: &'a dyn Host,
    /// The journal of the state directory.
    pub journal: JournalFile,
    /// Set by SIGINT/SIGTERM: waits stop and the current upgrade rolls back.
    pub interrupt: &'a AtomicBool,
}

impl Context<'_> {
    fn interrupted(&self) -> bool {
        self.interrupt.load(Ordering::SeqCst)
    }
}

/// Applying failed; the message says what state the host was left in.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// Docker refused or failed.
    #[error(transparent)]
    Docker(#[from] DockerError),
    /// nftables refused or failed.
    #[error(transparent)]
    Nft(#[from] NftError),
    /// Conntrack could not be read or changed.
    #[error(transparent)]
    Conntrack(#[from] ConntrackError),
    /// The network namespace could not be entered.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// The journal could not be read or written.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// A command or environment template could not be filled in.
    #[error("service {service}")]
    Placeholder {
        /// The service.
        service: String,
        /// Why.
        source: PlaceholderError,
    },
    /// A container did not become healthy in time.
    #[error("{container} was not healthy after {waited}; last probe: {last}")]
    NotReady {
        /// The container.
        container: String,
        /// How long lessnat waited.
        waited: String,
        /// The last probe's failure.
        last: String,
    },
    /// A container exited while lessnat waited for it.
    #[error("{container} exited (code {}) while lessnat waited for it to become healthy; its last log lines:\n{logs}", code.map_or("unknown".to_string(), |c| c.to_string()))]
    Exited {
        /// The container.
        container: String,
        /// Its exit code.
        code: Option<i64>,
        /// Its last log lines.
        logs: String,
    },
    /// Connections remained after the drain timeout and `onDrainTimeout` is `rollback`.
    #[error(
        "service {service}: {left} connections still open after drainTimeout (onDrainTimeout: rollback)"
    )]
    DrainTimeout {
        /// The service.
        service: String,
        /// Connections left.
        left: u64,
    },
    /// SIGINT or SIGTERM arrived.
    #[error("interrupted")]
    Interrupted,
    /// Load-balancer nodes with a live lease did not acknowledge a routed
    /// upgrade's switch in etcd within `drainTimeout`.
    #[error(
        "service {service}: load-balancer nodes {waiting} did not acknowledge the switch to the next version within drainTimeout while their leases lived; check their agents (`lessnat status --cluster`)"
    )]
    Unacknowledged {
        /// The service.
        service: String,
        /// The nodes still waited for.
        waiting: String,
    },
    /// The upgrade failed and was rolled back: the old version serves.
    #[error("service {service}: the upgrade was rolled back; the previous version serves")]
    RolledBack {
        /// The service.
        service: String,
        /// What went wrong.
        #[source]
        cause: Box<ApplyError>,
    },
    /// The upgrade failed and `onFailure` is `pause`: the host is left as it is.
    #[error(
        "service {service}: stage {stage} failed and onFailure is pause: the host is left as it is for inspection; `lessnat plan` shows how to resume or roll back"
    )]
    Paused {
        /// The service.
        service: String,
        /// The stage that failed.
        stage: &'static str,
        /// What went wrong.
        #[source]
        cause: Box<ApplyError>,
    },
    /// Routing rules, routes, addresses or veths could not be changed.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// A kernel setting could not be changed.
    #[error(transparent)]
    Sysctl(#[from] SysctlError),
    /// A container lessnat had to wire in was not running.
    #[error(
        "{container} is not running, so it cannot be wired in; `docker logs {container}` may say why"
    )]
    NotRunning {
        /// The container.
        container: String,
    },
    /// An image could not be pulled.
    #[error(transparent)]
    Pull(#[from] Box<pull::PullError>),
    /// A canary's next version failed its health checks (or exited) during
    /// the hold.
    #[error(
        "the canary {container} failed {failures} health checks in a row during its hold; last: {last}"
    )]
    CanaryUnhealthy {
        /// The next container.
        container: String,
        /// Failed checks in a row.
        failures: u32,
        /// Why the last one failed.
        last: String,
    },
    /// `lessnat apply --abort` ended a canary.
    #[error("service {service}: the canary was aborted by `lessnat apply --abort`")]
    CanaryAborted {
        /// The service.
        service: String,
    },
    /// A request to end a canary could not be read.
    #[error(transparent)]
    Canary(#[from] canary::CanaryError),
    /// The plan holds a change this build cannot carry out.
    #[error("cannot apply {what} yet")]
    Unsupported {
        /// What.
        what: String,
    },
}

/// The container `container` (of `service`) needs on `node` in `slot`, with
/// the service's stop timeout.
fn container_spec(
    service: &Service,
    container: &DesiredContainer,
    node: &str,
    slot: Slot,
) -> Result<ContainerSpec, ApplyError> {
    container
        .container_spec(node, slot, service.upgrade.stop_timeout.get())
        .map_err(|source| ApplyError::Placeholder {
            service: service.name.value.clone(),
            source,
        })
}

/// Carries out one change's operation exactly as planned (one short arm per
/// operation); refuses to start once SIGINT or SIGTERM came. Returns how many
/// times lessnat's table was restored on the way (see [`Summary::table_restores`](crate::plan::Summary::table_restores)).
pub fn apply_change(
    ctx: &Context,
    progress: &mut Progress,
    change: &Change,
) -> Result<usize, ApplyError> {
    if ctx.interrupted() {
        return Err(ApplyError::Interrupted);
    }
    let address = change.resource.address();
    match &change.operation {
        Operation::PullImage { image, digest } => {
            pull::pull(ctx, progress, &address, image, digest.as_deref())?;
        }
        Operation::WriteTable {
            table,
            switches,
            unanswered,
        } => {
            progress.step(&format!(
                "{address}: writing lessnat's table (one transaction)"
            ));
            ctx.host.apply_table(table)?;
            routed::forget_unanswered(ctx, progress, unanswered)?;
            routed::report_drained(ctx, progress, switches)?;
        }
        Operation::Acknowledge {
            service,
            worker,
            from,
            to,
            ack,
        } => {
            progress.step(&format!(
                "{address}: {worker}'s upgrade of {service} waits for this node's acknowledgement"
            ));
            routed::acknowledge(progress, service, *from, *to, ack);
        }
        Operation::MarkRolloutBad { mark } => {
            progress.step(&format!(
                "{address}: marking version {} of {} bad in etcd",
                mark.version, mark.service
            ));
            rollout::mark_bad(progress, mark);
        }
        Operation::DeleteTable => {
            progress.step(&format!("{address}: deleting lessnat's table"));
            ctx.host.delete_table()?;
        }
        Operation::RemoveContainer { name, stop_timeout } => {
            progress.step(&format!("{address}: stopping and removing"));
            ctx.host.stop(name, stop_timeout.get())?;
            ctx.host.remove(name)?;
        }
        Operation::CreatePrimary { workload, replace } => {
            primary::create(ctx, progress, &address, workload, *replace)?;
        }
        Operation::StartPrimary { workload } => {
            primary::start(ctx, progress, &address, workload)?;
        }
        Operation::Upgrade {
            workload,
            in_flight,
            from,
            redirected_table,
            canary,
            split_found,
        } => {
            let mut upgrade = Upgrade::new(
                ctx,
                progress,
                &workload.service,
                &workload.container,
                Some(redirected_table.as_ref()),
            )
            .with_canary(canary.as_deref(), *split_found);
            let result = upgrade.run(in_flight.as_ref(), from.as_ref());
            return result.map(|()| upgrade.restores());
        }
        Operation::StopStart { workload } => {
            Upgrade::new(ctx, progress, &workload.service, &workload.container, None)
                .stop_start()?;
        }
        Operation::CreateReplica { workload, address } => {
            routed::Replica::new(ctx, progress, workload).create(*address)?;
        }
        Operation::RestartReplica { workload, address } => {
            routed::Replica::new(ctx, progress, workload).restart(*address)?;
        }
        Operation::ReplaceReplica { workload, address } => {
            routed::Replica::new(ctx, progress, workload).replace(*address)?;
        }
        Operation::UpgradeReplica {
            load_balancers,
            canary,
            rollout,
            ..
        } => {
            let members: Vec<ReplicaMove> = change.operation.replica_move().into_iter().collect();
            return rollout::in_turn(progress, rollout.as_deref(), |progress| {
                routed::upgrade(ctx, progress, &members, load_balancers, canary.as_deref())
            });
        }
        Operation::UpgradeReplicas {
            batch,
            load_balancers,
            canary,
            rollout,
        } => {
            return rollout::in_turn(progress, rollout.as_deref(), |progress| {
                routed::upgrade(ctx, progress, batch, load_balancers, canary.as_deref())
            });
        }
        Operation::Wire {
            service,
            container,
            address: at,
        } => {
            progress.step(&format!("{address}: wiring the container in again"));
            routed::wire(ctx, progress, service, container, *at)?;
        }
        Operation::Unwire { name } => {
            progress.step(&format!("{address}: removing"));
            ctx.host.unwire(name)?;
        }
        Operation::Rule { remove, add } => {
            if let Some(rule) = remove {
                progress.step(&format!("{address}: removing"));
                ctx.host.delete_rule(rule)?;
            }
            if let Some(rule) = add {
                progress.step(&format!("{address}: adding"));
                ctx.host.add_rule(rule)?;
            }
        }
        Operation::Route { remove, add } => {
            if let Some(route) = remove {
                progress.step(&format!("{address}: removing"));
                ctx.host.delete_route(route)?;
            }
            if let Some(route) = add {
                progress.step(&format!("{address}: adding"));
                ctx.host.add_route(route)?;
            }
        }
        Operation::AddAddress { address: owned } => {
            progress.step(&format!("{address}: adding"));
            ctx.host.add_address(owned)?;
        }
        Operation::RemoveAddress { address: owned } => {
            progress.step(&format!("{address}: removing"));
            ctx.host.delete_address(owned)?;
        }
        Operation::SetSysctl { key, value } => {
            progress.step(&format!("{address}: setting {value}"));
            ctx.host.write_sysctl(key, value)?;
        }
    }
    Ok(0)
}
