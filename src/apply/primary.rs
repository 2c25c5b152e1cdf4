//! A host-mode service's primary container outside upgrades: created (or
//! replaced, with downtime) and started, then waited for until healthy.

use super::progress::Progress;
use super::ready::{ProbeAt, wait_ready};
use super::{ApplyError, Context, container_spec};
use crate::ownership::Slot;
use crate::plan::operation::Workload;
use crate::spec::OnFailure;

/// Creates and starts the primary of `workload` (`replace`: stops and
/// removes the existing one first) and waits until it is healthy. When it
/// never is, it is removed again (unless `onFailure` is `pause`), so the next
/// apply starts afresh.
pub(super) fn create(
    ctx: &Context,
    progress: &mut Progress,
    address: &str,
    workload: &Workload,
    replace: bool,
) -> Result<(), ApplyError> {
    let Workload { service, container } = workload;
    let stop_timeout = service.upgrade.stop_timeout.get();
    let create = container_spec(service, container, ctx.node, Slot::Primary)?;
    let name = &create.name;
    if replace {
        progress.step(&format!("{address}: removing the old container"));
        ctx.host.stop(name, stop_timeout)?;
        ctx.host.remove(name)?;
    }
    progress.step(&format!("{address}: creating and starting"));
    ctx.host.create(&create)?;
    ctx.host.start(name)?;
    if let Err(error) = wait_ready(ctx, progress, service, name, ProbeAt::loopback(false)) {
        if service.upgrade.on_failure == OnFailure::Rollback {
            progress.step(&format!(
                "{address}: not healthy; removing it so the next apply starts afresh"
            ));
            ctx.host.stop(name, stop_timeout)?;
            ctx.host.remove(name)?;
        }
        return Err(error);
    }
    ctx.host.keep_running(name)?;
    Ok(())
}

/// Starts the stopped, current primary of `workload` again and waits until
/// it is healthy.
pub(super) fn start(
    ctx: &Context,
    progress: &mut Progress,
    address: &str,
    workload: &Workload,
) -> Result<(), ApplyError> {
    let name = crate::ownership::container_name(&workload.service.name, ctx.node, Slot::Primary);
    progress.step(&format!("{address}: starting"));
    ctx.host.start(&name)?;
    wait_ready(
        ctx,
        progress,
        &workload.service,
        &name,
        ProbeAt::loopback(false),
    )?;
    ctx.host.keep_running(&name)?;
    Ok(())
}
