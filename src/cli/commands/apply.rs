//! `lessnat apply` and `lessnat destroy`: show the plan, confirm, carry it out.

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;

use super::{load_spec, print, session};
use crate::apply::canary::{self, Verdict};
use crate::cli::args::GlobalArgs;
use crate::report::Report;
use crate::session::{Planned, Session};

/// `lessnat apply PLANFILE` or `lessnat apply -f SPEC`.
pub fn apply(
    global: &GlobalArgs,
    plan: Option<&Path>,
    spec: Option<&Path>,
    auto_approve: bool,
) -> anyhow::Result<ExitCode> {
    let mut session = session(global);
    let _lock = session.lock()?;
    let planned = match plan {
        Some(path) => session.saved_plan(path)?,
        None => {
            let path = spec.context("give a spec with -f SPEC, or a saved plan file")?;
            let spec = load_spec(global, path)?;
            let node = session.node(Some(&spec))?;
            session.plan(spec, node)?
        }
    };
    carry_out(&mut session, planned, auto_approve, "perform these actions")
}

/// `lessnat apply --promote` / `--abort`: asks the apply holding a canary
/// on this node to end it; that apply carries on (or rolls back) and says so.
pub fn end_canary(global: &GlobalArgs, verdict: Verdict) -> anyhow::Result<ExitCode> {
    let service = canary::request(&global.state_dir, verdict)?;
    let what = match verdict {
        Verdict::Promote => "promote it: all new connections go to the new version",
        Verdict::Abort => "abort it: the upgrade rolls back",
    };
    print(format!(
        "Asked the apply holding the canary of {service} to {what}. That apply says when it has.\n"
    ))?;
    Ok(ExitCode::SUCCESS)
}

/// `lessnat destroy [-f SPEC]`.
pub fn destroy(
    global: &GlobalArgs,
    spec: Option<&Path>,
    auto_approve: bool,
) -> anyhow::Result<ExitCode> {
    let mut session = session(global);
    let _lock = session.lock()?;
    let spec = spec.map(|path| load_spec(global, path)).transpose()?;
    let node = session.node(spec.as_ref())?;
    let planned = session.plan_removal(node)?;
    carry_out(
        &mut session,
        planned,
        auto_approve,
        "destroy everything lessnat owns",
    )
}

/// Shows the plan and, once confirmed (a saved plan was confirmed when it
/// was made), carries it out.
fn carry_out(
    session: &mut Session,
    mut planned: Planned,
    auto_approve: bool,
    what: &str,
) -> anyhow::Result<ExitCode> {
    session.report(&Report::Plan(&planned.plan));
    if planned.plan.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    planned.applicable()?;
    if !planned.saved && !confirm(&planned.node, auto_approve, what)? {
        print("Apply cancelled.\n")?;
        return Ok(ExitCode::FAILURE);
    }
    session.apply(&mut planned)?;
    Ok(ExitCode::SUCCESS)
}

/// Asks on the terminal whether to go on; without a terminal, refuses.
fn confirm(node: &str, auto_approve: bool, what: &str) -> anyhow::Result<bool> {
    if auto_approve {
        return Ok(true);
    }
    anyhow::ensure!(
        std::io::stdin().is_terminal(),
        "not applying without confirmation: standard input is not a terminal. Review the plan, then run again \
         with --auto-approve, or save it with `lessnat plan --out FILE` and run `lessnat apply FILE`"
    );
    print(format!(
        "\nDo you want to {what} on node \"{node}\"? Only 'yes' is accepted: "
    ))?;
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    Ok(answer.trim() == "yes")
}
