//! What lessnat prints about itself: the spec's JSON Schema, shell
//! completions, the man page. Each is rendered whole, then written, so a
//! closed standard output is one failed write (clap_complete would panic).

use std::process::ExitCode;

use anyhow::Context;
use clap::CommandFactory;
use clap_complete::Shell;

use super::print;
use crate::cli::Cli;
use crate::schema::spec_schema_json;

/// `lessnat schema`.
pub fn schema() -> anyhow::Result<ExitCode> {
    print(spec_schema_json().context("serialising the JSON Schema")?)?;
    Ok(ExitCode::SUCCESS)
}

/// `lessnat completions SHELL`.
pub fn completions(shell: Shell) -> anyhow::Result<ExitCode> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "lessnat", &mut script);
    print(script)?;
    Ok(ExitCode::SUCCESS)
}

/// `lessnat man`.
pub fn man() -> anyhow::Result<ExitCode> {
    let mut page = Vec::new();
    clap_mangen::Man::new(Cli::command())
        .render(&mut page)
        .context("rendering the man page")?;
    print(page)?;
    Ok(ExitCode::SUCCESS)
}
