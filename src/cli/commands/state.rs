//! `lessnat status`, `suspend` and `resume`: reconcile's state on this node.

use std::path::Path;
use std::process::ExitCode;

use super::{load_spec, print, print_json, stdout_style};
use crate::cli::args::GlobalArgs;
use crate::cluster::status::ClusterStatus;
use crate::gitops::status::{Status, render_cluster};
use crate::gitops::suspend::{SuspendError, SuspendFile, end_backoff};

/// `lessnat status`.
pub fn status(global: &GlobalArgs, json: bool) -> anyhow::Result<ExitCode> {
    let status = Status::gather(&global.state_dir)?;
    if json {
        print_json(&status)?;
    } else {
        print(status.render(stdout_style(global)))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `lessnat status --cluster --spec FILE`: the site as etcd holds it.
pub fn cluster_status(global: &GlobalArgs, spec: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let spec = load_spec(global, spec)?;
    let Some(cluster) = &spec.cluster else {
        anyhow::bail!(
            "the spec has no `cluster:` block: without etcd there is no cluster status; `lessnat status` shows this node's"
        );
    };
    let status = ClusterStatus::read(cluster)?;
    if json {
        print_json(&status)?;
    } else {
        print(render_cluster(&status, stdout_style(global)))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `lessnat suspend`.
pub fn suspend(global: &GlobalArgs, reason: Option<String>) -> anyhow::Result<ExitCode> {
    SuspendFile::in_dir(&global.state_dir).suspend(reason)?;
    print(format!(
        "Reconcile is suspended (state {}): runs still fetch, plan and report drift, but apply nothing until `lessnat resume`.\n",
        global.state_dir.display()
    ))?;
    Ok(ExitCode::SUCCESS)
}

/// `lessnat resume`: ends the suspension and the failure back-off.
pub fn resume(global: &GlobalArgs) -> anyhow::Result<ExitCode> {
    let state_dir = &global.state_dir;
    if SuspendFile::in_dir(state_dir).resume()? {
        print("Reconcile is resumed: the next run applies.\n")?;
    } else {
        print("Reconcile was not suspended.\n")?;
    }
    let holder = super::session_settings(global).holder;
    match end_backoff(state_dir, &holder) {
        Ok(0) => {}
        Ok(failures) => print(format!(
            "Ended the back-off after {failures} failed runs in a row: the next run tries at once.\n"
        ))?,
        Err(SuspendError::Lock(error)) => {
            print(format!("The failure back-off is left as it is: {error}\n"))?
        }
        Err(error) => return Err(error.into()),
    }
    Ok(ExitCode::SUCCESS)
}
