//! Apply: carry out a plan on the host, change by change, through the
//! backends. Staged upgrades are journaled stage by stage and roll back on
//! failure; everything else is a single step that is safe to repeat.

mod drain;
pub mod progress;
mod ready;
mod routed;
pub mod stale;
mod upgrade;

use std::sync::atomic::{AtomicBool, Ordering};

use crate::backend::conntrack::ConntrackError;
use crate::backend::docker::{Docker, DockerError};
use crate::backend::netlink::{self, NetlinkError};
use crate::backend::nft::{self, NftError};
use crate::backend::sysctl::{self, SysctlError};
use crate::backend::veth;
use crate::desired::desired_node;
use crate::journal::{JournalError, JournalFile};
use crate::model::Observed;
use crate::netns::{Netns, NetnsError};
use crate::ownership::Slot;
use crate::plan::{Action, Change, Plan, Resource, Summary, desired_table};
use crate::spec::{NetworkMode, OnFailure, PlaceholderError, Spec};
use progress::Progress;
use ready::{ProbeAt, wait_ready};
use upgrade::Upgrade;

/// Everything apply works with.
pub struct Context<'a> {
    /// The spec being applied.
    pub spec: &'a Spec,
    /// The node this host is.
    pub node: &'a str,
    /// The network namespace to work in.
    pub netns: &'a Netns,
    /// The Docker engine.
    pub docker: &'a Docker,
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
    #[error("service {service}: {source}")]
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
    /// The upgrade failed and was rolled back: the old version serves.
    #[error(
        "service {service}: the upgrade was rolled back; the previous version serves. Cause: {cause}"
    )]
    RolledBack {
        /// The service.
        service: String,
        /// What went wrong.
        cause: String,
    },
    /// The upgrade failed and `onFailure` is `pause`: the host is left as it is.
    #[error(
        "service {service}: stage {stage} failed and onFailure is pause: the host is left as it is for inspection; `lessnat plan` shows how to resume or roll back. Cause: {cause}"
    )]
    Paused {
        /// The service.
        service: String,
        /// The stage that failed.
        stage: &'static str,
        /// What went wrong.
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
    /// The plan holds a change this build cannot carry out.
    #[error("cannot apply {what} yet")]
    Unsupported {
        /// What.
        what: String,
    },
}

/// Carries out `plan` (made from `observed`) and returns what was done.
pub fn apply(
    ctx: &Context,
    progress: &mut Progress,
    plan: &Plan,
    observed: &Observed,
) -> Result<Summary, ApplyError> {
    for change in &plan.changes {
        if ctx.interrupted() {
            return Err(ApplyError::Interrupted);
        }
        apply_change(ctx, progress, change, observed)?;
    }
    Ok(plan.summary())
}

fn apply_change(
    ctx: &Context,
    progress: &mut Progress,
    change: &Change,
    observed: &Observed,
) -> Result<(), ApplyError> {
    let address = change.resource.address();
    let desired = desired_node(ctx.spec, ctx.node);
    let service_named = |name: &str| desired.services.iter().find(|(s, _)| s.name.value == name);
    if let Resource::Container { service, .. } | Resource::Service { name: service } =
        &change.resource
        && change.action != Action::Destroy
        && let Some((spec, container)) = service_named(service)
        && spec.network == NetworkMode::Routed
    {
        let Some(mut replica) = routed::Replica::new(ctx, progress, spec, container) else {
            return Err(ApplyError::Unsupported {
                what: format!("{address}: service {service} has no replica on this node"),
            });
        };
        return match (&change.resource, change.action) {
            (Resource::Container { .. }, Action::Create) => replica.create(),
            (Resource::Container { .. }, Action::Update) => replica.restart(observed),
            (Resource::Container { .. }, Action::Replace)
            | (Resource::Service { .. }, Action::Replace) => replica.replace(observed),
            (Resource::Service { .. }, Action::Upgrade) => replica.upgrade(
                observed,
                change.upgrade.as_ref().and_then(|u| u.in_flight.as_ref()),
            ),
            _ => Err(ApplyError::Unsupported {
                what: format!("{} {address}", change.action.symbol()),
            }),
        };
    }
    match (&change.resource, change.action) {
        (Resource::NftTable { .. }, Action::Create | Action::Update) => {
            progress.step(&format!(
                "{address}: writing lessnat's table (one transaction)"
            ));
            match desired_table(ctx.spec, ctx.node, observed) {
                Some(table) => nft::apply_table(ctx.netns, &table)?,
                None => nft::delete_table(ctx.netns)?,
            }
            routed::report_drained(ctx, progress, observed)?;
        }
        (Resource::NftTable { .. }, Action::Destroy) => {
            progress.step(&format!("{address}: deleting lessnat's table"));
            nft::delete_table(ctx.netns)?;
        }
        (Resource::Container { name, .. }, Action::Destroy) => {
            progress.step(&format!("{address}: stopping and removing"));
            ctx.docker.stop(name, std::time::Duration::from_secs(10))?;
            ctx.docker.remove(name)?;
        }
        (
            Resource::Container {
                service,
                slot: Slot::Primary,
                name,
            },
            action @ (Action::Create | Action::Update | Action::Replace),
        ) => {
            let Some((spec, container)) = service_named(service) else {
                return Err(ApplyError::Unsupported {
                    what: format!("{address}: service {service} is not on this node"),
                });
            };
            let stop_timeout = spec.upgrade.stop_timeout.get();
            if action == Action::Replace {
                progress.step(&format!("{address}: removing the old container"));
                ctx.docker.stop(name, stop_timeout)?;
                ctx.docker.remove(name)?;
            }
            if action == Action::Update {
                progress.step(&format!("{address}: starting"));
            } else {
                progress.step(&format!("{address}: creating and starting"));
                let create = container
                    .container_spec(ctx.node, Slot::Primary, stop_timeout)
                    .map_err(|source| ApplyError::Placeholder {
                        service: service.clone(),
                        source,
                    })?;
                ctx.docker.create(&create)?;
            }
            ctx.docker.start(name)?;
            if let Err(error) = wait_ready(ctx, progress, spec, name, ProbeAt::loopback(false)) {
                if spec.upgrade.on_failure == OnFailure::Rollback && action != Action::Update {
                    progress.step(&format!(
                        "{address}: not healthy; removing it so the next apply starts afresh"
                    ));
                    ctx.docker.stop(name, stop_timeout)?;
                    ctx.docker.remove(name)?;
                }
                return Err(error);
            }
            ctx.docker.keep_running(name)?;
        }
        (Resource::Service { name }, Action::Upgrade | Action::Replace) => {
            let Some((spec, container)) = service_named(name) else {
                return Err(ApplyError::Unsupported {
                    what: format!("{address}: service {name} is not on this node"),
                });
            };
            let in_flight = change.upgrade.as_ref().and_then(|u| u.in_flight.as_ref());
            let old = observed
                .containers
                .iter()
                .find(|c| &c.service == name && c.slot == Slot::Primary);
            let from = old.map(|c| (c.spec_hash.as_str(), c.image.as_str()));
            let mut upgrade = Upgrade::new(ctx, progress, spec, container);
            if change.action == Action::Replace {
                upgrade.stop_start()?;
            } else {
                upgrade.run(in_flight, from)?;
            }
        }
        (Resource::Veth { service, .. }, Action::Create | Action::Update) => {
            progress.step(&format!("{address}: wiring the container in again"));
            let Some((spec, container)) = service_named(service) else {
                return Err(ApplyError::Unsupported {
                    what: format!("{address}: service {service} is not on this node"),
                });
            };
            match routed::Replica::new(ctx, progress, spec, container) {
                Some(mut replica) => replica.rewire(observed)?,
                None => {
                    return Err(ApplyError::Unsupported {
                        what: format!("{address}: service {service} has no replica on this node"),
                    });
                }
            }
        }
        (Resource::Veth { name, .. }, Action::Destroy) => {
            progress.step(&format!("{address}: removing"));
            veth::unwire(ctx.netns, name)?;
        }
        (Resource::IpRule { family, priority }, action) => {
            let found = observed
                .routing
                .rules
                .iter()
                .find(|r| &r.family == family && r.priority == *priority);
            if let (Some(found), Action::Replace | Action::Destroy) = (found, action) {
                progress.step(&format!("{address}: removing"));
                netlink::delete_rule(ctx.netns, found)?;
            }
            if matches!(action, Action::Create | Action::Replace | Action::Update) {
                let routing = crate::desired::routed::desired_routing(ctx.spec, ctx.node);
                if let Some(rule) = routing
                    .rules
                    .iter()
                    .find(|r| &r.family == family && r.priority == *priority)
                {
                    progress.step(&format!("{address}: adding"));
                    netlink::add_rule(ctx.netns, rule)?;
                }
            }
        }
        (Resource::Route { table, destination }, action) => {
            let same =
                |r: &&crate::model::Route| r.table == *table && &r.destination == destination;
            if let (Some(found), Action::Replace | Action::Destroy) =
                (observed.routing.routes.iter().find(same), action)
            {
                progress.step(&format!("{address}: removing"));
                netlink::delete_route(ctx.netns, found)?;
            }
            if matches!(action, Action::Create | Action::Replace | Action::Update) {
                let routing = crate::desired::routed::desired_routing(ctx.spec, ctx.node);
                if let Some(route) = routing.routes.iter().find(same) {
                    progress.step(&format!("{address}: adding"));
                    netlink::add_route(ctx.netns, route)?;
                }
            }
        }
        (
            Resource::Address {
                device,
                address: ip,
            },
            action,
        ) => {
            let owned = crate::model::OwnedAddress {
                device: device.clone(),
                address: ip.clone(),
            };
            if action == Action::Destroy {
                progress.step(&format!("{address}: removing"));
                netlink::delete_address(ctx.netns, &owned)?;
            } else {
                progress.step(&format!("{address}: adding"));
                netlink::add_address(ctx.netns, &owned)?;
            }
        }
        (Resource::Sysctl { key }, Action::Update) => {
            if let Some(value) =
                crate::desired::routed::desired_sysctls(ctx.spec, ctx.node).get(key)
            {
                progress.step(&format!("{address}: setting {value}"));
                sysctl::write(ctx.netns, key, value)?;
            }
        }
        _ => {
            return Err(ApplyError::Unsupported {
                what: format!("{} {address}", change.action.symbol()),
            });
        }
    }
    Ok(())
}
