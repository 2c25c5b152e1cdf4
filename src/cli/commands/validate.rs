//! `lessnat validate`: check spec files.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use super::{print, print_error, style_for, warn_about};
use crate::cli::args::GlobalArgs;
use crate::spec::load_file;

/// `lessnat validate FILE...`: 0 when all are valid, 1 otherwise.
pub fn validate(global: &GlobalArgs, files: &[PathBuf]) -> anyhow::Result<ExitCode> {
    let style = style_for(global, std::io::stderr().is_terminal());
    let mut all_valid = true;
    for file in files {
        match load_file(file) {
            Ok(spec) => {
                warn_about(global, file, &spec);
                print(format!(
                    "{}: valid ({} nodes, {} services)\n",
                    file.display(),
                    spec.nodes.len(),
                    spec.services.len()
                ))?
            }
            Err(report) => {
                all_valid = false;
                print_error(&report.render(style));
            }
        }
    }
    Ok(if all_valid {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
