//! The command line: arguments ([`args`]), one function per command
//! (`commands`), and [`main`], which chooses the writers: results to standard
//! output, errors to standard error. Exit codes are a contract: 0 success, 1
//! error or invalid input (`plan --detailed-exitcode` and `reconcile
//! --plan-only`: 2 for changes). A closed standard output (`lessnat … | head`)
//! ends lessnat quietly with 0, as it ends ripgrep.

pub mod args;
mod commands;

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use clap::Parser;

use crate::apply::canary::Verdict;
pub use args::Cli;
use args::Command;

/// Parses the command line, runs the command, and returns the process exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return if error.use_stderr() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    init_logging(cli.global.verbose);
    match run(&cli) {
        Ok(code) => code,
        Err(error) if error.is::<commands::StdoutClosed>() => ExitCode::SUCCESS,
        Err(error) => {
            let _ = writeln!(
                std::io::stderr(),
                "error: {}",
                crate::error::chain(error.as_ref())
            );
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<ExitCode> {
    let global = &cli.global;
    match &cli.command {
        Command::Validate { files } => commands::validate::validate(global, files),
        Command::Plan {
            spec,
            out,
            json,
            detailed_exitcode,
            observe,
        } => commands::plan::plan(
            global,
            spec,
            out.as_deref(),
            *json,
            *detailed_exitcode,
            observe.observed.as_deref(),
        ),
        Command::Apply { promote: true, .. } => {
            commands::apply::end_canary(global, Verdict::Promote)
        }
        Command::Apply { abort: true, .. } => commands::apply::end_canary(global, Verdict::Abort),
        Command::Apply {
            plan,
            spec,
            auto_approve,
            ..
        } => commands::apply::apply(global, plan.as_deref(), spec.as_deref(), *auto_approve),
        Command::Destroy { spec, auto_approve } => {
            commands::apply::destroy(global, spec.as_deref(), *auto_approve)
        }
        Command::Show { plan, json } => commands::show::show(global, plan.as_deref(), *json),
        Command::Reconcile(args) => commands::reconcile::reconcile(global, args),
        Command::Agent(args) => commands::agent::agent(global, args),
        Command::Status {
            json,
            cluster: true,
            spec: Some(spec),
        } => commands::state::cluster_status(global, spec, *json),
        Command::Status { json, .. } => commands::state::status(global, *json),
        Command::Suspend { reason } => commands::state::suspend(global, reason.clone()),
        Command::Resume => commands::state::resume(global),
        Command::Schema => commands::generated::schema(),
        Command::Completions { shell } => commands::generated::completions(*shell),
        Command::Man => commands::generated::man(),
        Command::Demo { keep, json, routed } => {
            crate::demo::run(crate::demo::Options {
                keep: *keep,
                json: *json,
                routed: *routed,
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::DemoServer { args } => Ok(crate::demo::server::serve(args)),
    }
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("lessnat={level}")));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}
