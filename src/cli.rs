//! The command-line interface: argument parsing and the commands' output.
//! Exit codes are a contract: 0 success, 1 error or invalid input.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, CommandFactory, Parser, Subcommand};
use clap_complete::Shell;

use crate::schema::spec_schema_json;
use crate::spec::load_file;
use crate::style::Style;

/// Run and upgrade services on your own hosts, with no load balancer and no NAT in the steady state.
#[derive(Debug, Parser)]
#[command(name = "lessnat", version, about, long_about = None, propagate_version = true)]
#[command(
    after_help = "Docs: README.md. Specs are YAML; `lessnat schema` prints their JSON Schema for editors."
)]
pub struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

/// Options every command takes.
#[derive(Debug, Args)]
struct GlobalArgs {
    /// Never colour the output (also when NO_COLOR is set, or output is not a terminal).
    #[arg(long, global = true)]
    no_color: bool,
    /// Log what lessnat does to stderr: -v info, -vv debug, -vvv trace (RUST_LOG overrides).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check spec files: YAML syntax, fields, and the rules between them.
    ///
    /// Every problem is reported as FILE:LINE:COLUMN with the offending text.
    /// Exits 0 when all files are valid, 1 otherwise.
    Validate {
        /// Spec files to check.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// Print the spec's JSON Schema (draft-07), for editor validation and completion.
    Schema,
    /// Print a shell completion script.
    Completions {
        /// The shell to complete for.
        shell: Shell,
    },
    /// Print the man page (roff), e.g. `lessnat man | man -l -`.
    Man,
}

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
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
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

/// Whether output to a stream may be coloured: not with `--no-color`, not when
/// `NO_COLOR` is set to anything non-empty, and only on a terminal.
fn style_for(global: &GlobalArgs, is_terminal: bool) -> Style {
    let no_color_env = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    if global.no_color || no_color_env || !is_terminal {
        Style::Plain
    } else {
        Style::Color
    }
}

fn run(cli: &Cli) -> anyhow::Result<ExitCode> {
    let mut stdout = std::io::stdout().lock();
    match &cli.command {
        Command::Validate { files } => {
            let style = style_for(&cli.global, std::io::stderr().is_terminal());
            let mut all_valid = true;
            for file in files {
                match load_file(file) {
                    Ok(spec) => writeln!(
                        stdout,
                        "{}: valid ({} nodes, {} services)",
                        file.display(),
                        spec.nodes.len(),
                        spec.services.len()
                    )?,
                    Err(report) => {
                        all_valid = false;
                        eprint!("{}", report.render(style));
                    }
                }
            }
            Ok(if all_valid {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Schema => {
            stdout.write_all(
                spec_schema_json()
                    .context("serialising the JSON Schema")?
                    .as_bytes(),
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "lessnat", &mut stdout);
            Ok(ExitCode::SUCCESS)
        }
        Command::Man => {
            clap_mangen::Man::new(Cli::command())
                .render(&mut stdout)
                .context("rendering the man page")?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
