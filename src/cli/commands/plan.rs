//! `lessnat plan`: what would change, as text or JSON, optionally saved.

use std::path::Path;
use std::process::ExitCode;

use super::{exit_for, load_spec, print, print_json, session, stdout_style};
use crate::cli::args::GlobalArgs;
use crate::plan::render::render;
use crate::session::{Planned, read_snapshot};

/// `lessnat plan -f SPEC`: against the live host, or a snapshot (`observed`).
pub fn plan(
    global: &GlobalArgs,
    spec_path: &Path,
    out: Option<&Path>,
    json: bool,
    detailed_exitcode: bool,
    observed: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    let session = session(global);
    let spec = load_spec(global, spec_path)?;
    let node = session.node(Some(&spec))?;
    let planned = match observed {
        Some(path) => {
            let observed = read_snapshot(path, &node)?;
            Planned::new(spec, node, observed)
        }
        None => session.plan(spec, node)?,
    };
    if let Some(out) = out {
        planned.save(spec_path, out)?;
    }
    let changed = !planned.plan.is_empty();
    if json {
        print_json(&planned.plan)?;
    } else {
        print(render(&planned.plan, stdout_style(global)))?;
        if let Some(out) = out.filter(|_| changed) {
            print(format!(
                "\nSaved the plan to {}. To carry it out: lessnat apply {}\n",
                out.display(),
                out.display()
            ))?;
        }
    }
    Ok(exit_for(detailed_exitcode, changed))
}
