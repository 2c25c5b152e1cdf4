//! The command-line interface: argument parsing and the commands' output.
//! Exit codes are a contract: 0 success, 1 error or invalid input.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, CommandFactory, Parser, Subcommand};
use clap_complete::Shell;

use crate::netns::Netns;
use crate::observe::Observed;
use crate::plan::saved::{SAVED_PLAN_FORMAT, SavedPlan};
use crate::plan::{plan, render::render};
use crate::schema::spec_schema_json;
use crate::spec::{Spec, load_file};
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
    /// The node of the spec this host is. Defaults to the spec's only node, or
    /// the node named like this host.
    #[arg(long, global = true, env = "LESSNAT_NODE", value_name = "NAME")]
    node: Option<String>,
    /// Work inside this network namespace: a name under /run/netns, or a path.
    #[arg(long, global = true, value_name = "NAME|PATH")]
    netns: Option<String>,
}

/// Where observed state comes from.
#[derive(Debug, Args)]
struct ObserveArgs {
    /// Plan against a snapshot saved by `lessnat show --json` instead of the live host.
    #[arg(long, value_name = "FILE")]
    observed: Option<PathBuf>,
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
    /// Show what would change on this node to match the spec.
    ///
    /// Reads the live host (lessnat's nftables table, its routing rules and
    /// routes, its containers, conntrack), compares it with the spec and prints
    /// the changes: + create, ~ update in place, -/+ replace, - destroy,
    /// >> staged upgrade. Changes nothing.
    Plan {
        /// The spec file.
        #[arg(short = 'f', long = "file", value_name = "SPEC")]
        spec: PathBuf,
        /// Save the plan to FILE, for `lessnat apply FILE` (Terraform's -out).
        #[arg(short = 'o', long = "out", value_name = "FILE")]
        out: Option<PathBuf>,
        /// Print the plan as JSON (format described in docs/plan-json.md).
        #[arg(long)]
        json: bool,
        /// Exit 0 when there are no changes, 2 when there are, 1 on error.
        #[arg(long)]
        detailed_exitcode: bool,
        #[command(flatten)]
        observe: ObserveArgs,
    },
    /// Show what lessnat owns on this host, or a saved plan.
    Show {
        /// A plan file saved with `plan --out`; without it, the live host.
        #[arg(value_name = "PLANFILE")]
        plan: Option<PathBuf>,
        /// Print JSON: the observed snapshot (usable with `plan --observed`), or the plan.
        #[arg(long)]
        json: bool,
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

/// The exit code of `plan --detailed-exitcode` when there are changes.
const EXIT_CHANGES: u8 = 2;

fn stdout_style(global: &GlobalArgs) -> Style {
    style_for(global, std::io::stdout().is_terminal())
}

/// Loads a spec, printing its problems and failing when it is invalid.
fn load_spec(global: &GlobalArgs, path: &std::path::Path) -> anyhow::Result<Spec> {
    load_file(path).map_err(|report| {
        eprint!(
            "{}",
            report.render(style_for(global, std::io::stderr().is_terminal()))
        );
        anyhow::anyhow!("{} is not a valid spec", path.display())
    })
}

/// Which node of the spec this host is.
fn pick_node(global: &GlobalArgs, spec: &Spec) -> anyhow::Result<String> {
    let names: Vec<&str> = spec.nodes.iter().map(|n| n.name.value.as_str()).collect();
    if let Some(node) = &global.node {
        anyhow::ensure!(
            names.contains(&node.as_str()),
            "the spec has no node named `{node}`; its nodes are {}",
            crate::diagnostic::one_of(&names)
        );
        return Ok(node.clone());
    }
    if let [only] = names.as_slice() {
        return Ok(only.to_string());
    }
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    if names.contains(&host.as_str()) {
        return Ok(host);
    }
    anyhow::bail!(
        "the spec has {} nodes and none is named like this host (`{host}`); say which one this is with --node NAME (or LESSNAT_NODE)",
        names.len()
    )
}

fn netns(global: &GlobalArgs) -> Netns {
    global
        .netns
        .as_deref()
        .map(Netns::from_arg)
        .unwrap_or_default()
}

/// Observed state: from a snapshot file, or read from the live host.
fn observe(global: &GlobalArgs, args: &ObserveArgs, node: &str) -> anyhow::Result<Observed> {
    if let Some(path) = &args.observed {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let observed: Observed = serde_json::from_str(&text)
            .with_context(|| format!("{} is not an observed-state snapshot", path.display()))?;
        anyhow::ensure!(
            observed.node == node,
            "{} was observed on node `{}`, not `{node}`",
            path.display(),
            observed.node
        );
        return Ok(observed);
    }
    crate::observe::live::observe(node, &netns(global)).context("reading the live host")
}

fn run(cli: &Cli) -> anyhow::Result<ExitCode> {
    let mut stdout = std::io::stdout().lock();
    match &cli.command {
        Command::Plan {
            spec: spec_path,
            out,
            json,
            detailed_exitcode,
            observe: observe_args,
        } => {
            let spec = load_spec(&cli.global, spec_path)?;
            let node = pick_node(&cli.global, &spec)?;
            let observed = observe(&cli.global, observe_args, &node)?;
            let plan = plan(&spec, &node, &observed);
            let changed = !plan.is_empty();
            if *json {
                serde_json::to_writer_pretty(&mut stdout, &plan)?;
                writeln!(stdout)?;
            } else {
                stdout.write_all(render(&plan, stdout_style(&cli.global)).as_bytes())?;
            }
            if let Some(out) = out {
                let saved = SavedPlan {
                    format: SAVED_PLAN_FORMAT,
                    lessnat_version: env!("CARGO_PKG_VERSION").to_string(),
                    spec_file: spec_path.display().to_string(),
                    spec,
                    observed,
                    plan,
                };
                saved
                    .write(out)
                    .with_context(|| format!("saving the plan to {}", out.display()))?;
                if !*json && changed {
                    writeln!(
                        stdout,
                        "\nSaved the plan to {}. To carry it out: lessnat apply {}",
                        out.display(),
                        out.display()
                    )?;
                }
            }
            Ok(exit_for(*detailed_exitcode, changed))
        }
        Command::Show {
            plan: Some(path),
            json,
        } => {
            let saved = SavedPlan::read(path)?;
            if *json {
                serde_json::to_writer_pretty(&mut stdout, &saved.plan)?;
                writeln!(stdout)?;
            } else {
                writeln!(
                    stdout,
                    "Saved plan made from {} with lessnat {}\n",
                    saved.spec_file, saved.lessnat_version
                )?;
                stdout.write_all(render(&saved.plan, stdout_style(&cli.global)).as_bytes())?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Show { plan: None, json } => {
            let node = match &cli.global.node {
                Some(node) => node.clone(),
                None => nix::unistd::gethostname()?
                    .into_string()
                    .unwrap_or_default(),
            };
            let observed = crate::observe::live::observe(&node, &netns(&cli.global))
                .context("reading the live host")?;
            if *json {
                serde_json::to_writer_pretty(&mut stdout, &observed)?;
                writeln!(stdout)?;
            } else {
                stdout.write_all(
                    crate::observe::show::render(&observed, stdout_style(&cli.global)).as_bytes(),
                )?;
            }
            Ok(ExitCode::SUCCESS)
        }
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

fn exit_for(detailed: bool, changed: bool) -> ExitCode {
    if detailed && changed {
        ExitCode::from(EXIT_CHANGES)
    } else {
        ExitCode::SUCCESS
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
