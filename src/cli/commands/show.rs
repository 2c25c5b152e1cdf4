//! `lessnat show`: what lessnat owns on this host, or a saved plan.

use std::path::Path;
use std::process::ExitCode;

use super::{print, print_json, session, stdout_style};
use crate::cli::args::GlobalArgs;
use crate::plan::render::render;
use crate::plan::saved::SavedPlan;

/// `lessnat show [PLANFILE]`.
pub fn show(global: &GlobalArgs, plan: Option<&Path>, json: bool) -> anyhow::Result<ExitCode> {
    let style = stdout_style(global);
    if let Some(path) = plan {
        let saved = SavedPlan::read(path)?;
        if json {
            print_json(&saved.plan)?;
        } else {
            print(format!(
                "Saved plan made from {} with lessnat {}\n\n{}",
                saved.spec_file,
                saved.lessnat_version,
                render(&saved.plan, style)
            ))?;
        }
    } else {
        let session = session(global);
        let observed = session.observe(None, &session.node(None)?)?;
        if json {
            print_json(&observed)?;
        } else {
            print(crate::observe::show::render(&observed, style))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
