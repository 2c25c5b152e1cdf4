//! The command-line interface: argument parsing and the commands' output.
//! Exit codes are a contract: 0 success, 1 error or invalid input.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, CommandFactory, Parser, Subcommand};
use clap_complete::Shell;

use crate::backend::docker::Docker;
use crate::gitops::events::Events;
use crate::gitops::fetch::Source;
use crate::gitops::reconcile::{Reconciler, Settings};
use crate::gitops::record::Outcome;
use crate::gitops::schedule::{SINGLE_RUN_BACKOFF_BASE, run_loop};
use crate::gitops::status::Status;
use crate::gitops::suspend::{SuspendError, SuspendFile, end_backoff};
use crate::model::Observed;
use crate::netns::Netns;
use crate::plan::saved::{SAVED_PLAN_FORMAT, SavedPlan};
use crate::plan::{plan, render::render};
use crate::schema::spec_schema_json;
use crate::spec::{HumanDuration, Spec, load_file};
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
    /// Where apply keeps its lock and journal (and reconcile its repository mirror and record).
    #[arg(
        long,
        global = true,
        env = "LESSNAT_STATE_DIR",
        default_value = "/var/lib/lessnat",
        value_name = "DIR"
    )]
    state_dir: PathBuf,
}

/// Where observed state comes from.
#[derive(Debug, Args)]
struct ObserveArgs {
    /// Plan against a snapshot saved by `lessnat show --json` instead of the live host.
    #[arg(long, value_name = "FILE")]
    observed: Option<PathBuf>,
}

/// Options of `lessnat reconcile`.
#[derive(Debug, Args)]
struct ReconcileArgs {
    /// The Git repository holding the spec: https://, ssh://, git@host:path, file://, or a path.
    #[arg(long, value_name = "URL")]
    repo: String,
    /// The branch to follow (or a full ref, like refs/tags/v3).
    #[arg(long = "ref", value_name = "BRANCH", default_value = "main")]
    reference: String,
    /// The spec file's path inside the repository.
    #[arg(long, value_name = "FILE")]
    path: String,
    /// Only plan and report drift, never apply: exit 0 without drift, 2 with, 1 on error.
    #[arg(long)]
    plan_only: bool,
    /// Apply the fetched commit even when it is not a descendant of the last
    /// applied one (older, rewritten or unrelated history). Use it once, by hand.
    #[arg(long)]
    allow_rollback: bool,
    /// Run in a loop, this long apart (e.g. 60s, 5m); without it, run once.
    /// After n failures in a row the wait is interval × 2^n, at most 10 × interval.
    #[arg(long, value_name = "DURATION")]
    interval: Option<HumanDuration>,
    /// Add a random delay of up to this much to each wait, so nodes spread out.
    #[arg(
        long,
        value_name = "DURATION",
        requires = "interval",
        default_value = "0s"
    )]
    jitter: HumanDuration,
    /// Print events as JSON lines on standard output (what people read moves to standard error).
    #[arg(long, value_name = "FORMAT")]
    events: Option<EventsFormat>,
    /// Append events as JSON lines to this file.
    #[arg(long, value_name = "PATH")]
    events_file: Option<PathBuf>,
    /// Write Prometheus metrics to this file after each run (for node_exporter's textfile collector).
    #[arg(long, value_name = "PATH")]
    metrics_file: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics (loop mode), e.g. 127.0.0.1:9824.
    #[arg(long, value_name = "ADDR", requires = "interval")]
    metrics_addr: Option<std::net::SocketAddr>,
}

/// Formats of `reconcile --events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum EventsFormat {
    /// One JSON object per line.
    Json,
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
    /// Make this node match the spec: plan, confirm, carry out.
    ///
    /// Upgrades run in stages (start next, redirect, drain, swap, unredirect,
    /// drain next, finish) and roll back on failure. With PLANFILE, applies a
    /// plan saved by `plan --out` and refuses it if the host changed since.
    Apply {
        /// A plan saved with `lessnat plan --out FILE`.
        #[arg(
            value_name = "PLANFILE",
            conflicts_with = "spec",
            required_unless_present = "spec"
        )]
        plan: Option<PathBuf>,
        /// The spec file: plan and apply in one go.
        #[arg(short = 'f', long = "file", value_name = "SPEC")]
        spec: Option<PathBuf>,
        /// Apply without asking for confirmation (needed when not on a terminal).
        #[arg(long)]
        auto_approve: bool,
    },
    /// Remove what lessnat owns on this node: its containers and its nftables
    /// table. Nothing else is touched.
    Destroy {
        /// Destroy without asking for confirmation (needed when not on a terminal).
        #[arg(long)]
        auto_approve: bool,
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
    /// Fetch the spec from a Git repository and make this node match it (GitOps).
    ///
    /// Fetches --ref of --repo into the state directory (incrementally; the
    /// mirror is <state-dir>/repo), reads --path at the fetched commit, plans
    /// and applies. Runs once (cron, systemd timers), or in a loop with
    /// --interval. A commit older than the last applied one is refused (see
    /// --allow-rollback); a commit that failed is not tried again until its
    /// back-off passes; `lessnat suspend` stops applying. Exits 0 when the node
    /// matches the commit (or reconcile is suspended), 1 otherwise; with
    /// --plan-only, 0 no drift, 2 drift, 1 error. `lessnat status` shows the
    /// last run.
    Reconcile(ReconcileArgs),
    /// Show what reconcile last did on this node.
    ///
    /// The applied commit, the last run and its drift, the last error, the
    /// failure back-off, and an upgrade in flight (from the journal).
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop reconcile from applying on this node.
    ///
    /// Runs still fetch, plan and report drift. `lessnat apply` by hand is not
    /// affected. `lessnat resume` ends it.
    Suspend {
        /// Why, shown by `lessnat status` (who, which ticket...).
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
    },
    /// Let reconcile apply again.
    ///
    /// Ends `lessnat suspend`, and a failure back-off: the next run tries at once.
    Resume,
    /// Print the spec's JSON Schema (draft-07), for editor validation and completion.
    Schema,
    /// Print a shell completion script.
    Completions {
        /// The shell to complete for.
        shell: Shell,
    },
    /// Print the man page (roff), e.g. `lessnat man | man -l -`.
    Man,
    /// See a zero-downtime upgrade under load, next to a stop-start one.
    ///
    /// Needs root and Docker, nothing else: builds its demo images from this
    /// program, installs a service on a loopback port with its own state
    /// directory, upgrades it under load, prints what the clients saw and
    /// removes everything it made (also on Ctrl-C).
    Demo {
        /// Leave the upgraded service running and print how to inspect and remove it.
        #[arg(long)]
        keep: bool,
        /// Print the summary as JSON on standard output (the rest goes to standard error).
        #[arg(long)]
        json: bool,
        /// Routed mode instead: in network namespaces it makes (two clients, two
        /// load balancers, two workers), the client addresses the replicas see,
        /// next to a masquerading load balancer.
        #[arg(long, conflicts_with = "keep")]
        routed: bool,
    },
    /// The demo app inside the demo images (see `lessnat demo`).
    #[command(hide = true)]
    DemoServer {
        /// The test server's arguments, after `--`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
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
fn observe(
    global: &GlobalArgs,
    args: &ObserveArgs,
    spec: &Spec,
    node: &str,
) -> anyhow::Result<Observed> {
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
    let docker = crate::backend::docker::Docker::connect()?;
    crate::observe::live::observe_for(spec, node, &netns(global), &docker)
        .context("reading the live host")
}

/// The command line, for the lock file's record of who holds it.
fn command_line() -> String {
    std::env::args().collect::<Vec<_>>().join(" ")
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
    print!("\nDo you want to {what} on node \"{node}\"? Only 'yes' is accepted: ");
    std::io::stdout().flush()?;
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    Ok(answer.trim() == "yes")
}

/// A plan to carry out, with what it was made from.
struct Planned {
    spec: Spec,
    node: String,
    observed: Observed,
    plan: crate::plan::Plan,
    saved: bool,
}

/// Plans anew from a spec, or reads a saved plan and checks it is not stale.
fn planned(
    global: &GlobalArgs,
    docker: &Docker,
    spec_path: Option<&std::path::Path>,
    plan_path: Option<&std::path::Path>,
) -> anyhow::Result<Planned> {
    if let Some(path) = plan_path {
        let saved = SavedPlan::read(path)?;
        let node = saved.plan.node.clone();
        let now = crate::observe::live::observe_for(&saved.spec, &node, &netns(global), docker)
            .context("reading the live host")?;
        let changed = crate::apply::stale::changes_since(&saved.observed, &now);
        if !changed.is_empty() {
            anyhow::bail!(
                "the plan in {} is stale: the host changed since it was made:\n  - {}\nMake a new plan: lessnat plan -f {} --out {}",
                path.display(),
                changed.join("\n  - "),
                saved.spec_file,
                path.display()
            );
        }
        return Ok(Planned {
            spec: saved.spec,
            node,
            observed: now,
            plan: saved.plan,
            saved: true,
        });
    }
    let spec_path = spec_path.context("give a spec with -f SPEC, or a saved plan file")?;
    let spec = load_spec(global, spec_path)?;
    let node = pick_node(global, &spec)?;
    let observed = crate::observe::live::observe_for(&spec, &node, &netns(global), docker)
        .context("reading the live host")?;
    let plan = plan(&spec, &node, &observed);
    Ok(Planned {
        spec,
        node,
        observed,
        plan,
        saved: false,
    })
}

/// Carries out a plan, then plans again: once more when the plan finished or
/// rolled back an upgrade in flight (an upgrade to the current spec may come
/// next: after a rollback, or when the spec changed after an interrupted
/// upgrade had already swapped, so it was finished to the older spec).
fn carry_out(
    global: &GlobalArgs,
    docker: &Docker,
    mut planned: Planned,
    auto_approve: bool,
    verb: &str,
) -> anyhow::Result<ExitCode> {
    let style = style_for(global, std::io::stdout().is_terminal());
    print!("{}", render(&planned.plan, style));
    if planned.plan.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    anyhow::ensure!(
        planned.plan.conflicts.is_empty(),
        "not applying: resolve the conflicts listed above first"
    );
    if !planned.saved && !confirm(&planned.node, auto_approve, verb)? {
        println!("Apply cancelled.");
        return Ok(ExitCode::FAILURE);
    }
    let interrupt = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, interrupt.clone())
            .context("installing signal handlers")?;
    }
    let netns = netns(global);
    let mut progress = crate::apply::progress::Progress::new(std::io::stdout().is_terminal());
    let mut total = crate::plan::Summary::default();
    for _round in 0..3 {
        let ctx = crate::apply::Context {
            node: &planned.node,
            host: &crate::apply::LiveHost {
                netns: &netns,
                docker,
            },
            journal: crate::journal::JournalFile::in_dir(&global.state_dir),
            interrupt: &interrupt,
        };
        let done =
            crate::apply::apply(&ctx, &mut progress, &planned.plan).context("apply failed")?;
        total.add += done.add;
        total.change += done.change;
        total.destroy += done.destroy;
        total.upgrade += done.upgrade;
        if !planned.plan.has_upgrade_in_flight() {
            break;
        }
        planned.observed =
            crate::observe::live::observe_for(&planned.spec, &planned.node, &netns, docker)
                .context("reading the live host")?;
        planned.plan = plan(&planned.spec, &planned.node, &planned.observed);
        if planned.plan.is_empty() {
            break;
        }
        println!("\nThe upgrade in flight is followed by the upgrade to the current spec:\n");
        print!("{}", render(&planned.plan, style));
    }
    println!(
        "\nApply complete! Resources: {} added, {} changed, {} destroyed, {} upgraded.",
        total.add, total.change, total.destroy, total.upgrade
    );
    Ok(ExitCode::SUCCESS)
}

fn run(cli: &Cli) -> anyhow::Result<ExitCode> {
    let mut stdout = std::io::stdout().lock();
    match &cli.command {
        Command::Apply {
            plan: plan_path,
            spec,
            auto_approve,
        } => {
            drop(stdout);
            let _lock = crate::lock::ApplyLock::acquire(&cli.global.state_dir, &command_line())?;
            let docker = Docker::connect()?;
            let planned = planned(&cli.global, &docker, spec.as_deref(), plan_path.as_deref())?;
            carry_out(
                &cli.global,
                &docker,
                planned,
                *auto_approve,
                "perform these actions",
            )
        }
        Command::Destroy { auto_approve } => {
            drop(stdout);
            let _lock = crate::lock::ApplyLock::acquire(&cli.global.state_dir, &command_line())?;
            let docker = Docker::connect()?;
            let node = match &cli.global.node {
                Some(node) => node.clone(),
                None => nix::unistd::gethostname()?
                    .into_string()
                    .unwrap_or_default(),
            };
            let empty = Spec {
                version: crate::spec::SPEC_VERSION.into(),
                nodes: Vec::new(),
                services: Vec::new(),
            };
            let observed = crate::observe::live::observe_with(&node, &netns(&cli.global), &docker)
                .context("reading the live host")?;
            let plan = plan(&empty, &node, &observed);
            let planned = Planned {
                spec: empty,
                node,
                observed,
                plan,
                saved: false,
            };
            carry_out(
                &cli.global,
                &docker,
                planned,
                *auto_approve,
                "destroy everything lessnat owns",
            )
        }
        Command::Plan {
            spec: spec_path,
            out,
            json,
            detailed_exitcode,
            observe: observe_args,
        } => {
            let spec = load_spec(&cli.global, spec_path)?;
            let node = pick_node(&cli.global, &spec)?;
            let observed = observe(&cli.global, observe_args, &spec, &node)?;
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
        Command::Reconcile(args) => {
            drop(stdout);
            reconcile(&cli.global, args)
        }
        Command::Status { json } => {
            let status = Status::gather(&cli.global.state_dir)?;
            if *json {
                serde_json::to_writer_pretty(&mut stdout, &status)?;
                writeln!(stdout)?;
            } else {
                stdout.write_all(status.render(stdout_style(&cli.global)).as_bytes())?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Suspend { reason } => {
            SuspendFile::in_dir(&cli.global.state_dir).suspend(reason.clone())?;
            writeln!(
                stdout,
                "Reconcile is suspended (state {}): runs still fetch, plan and report drift, but apply nothing until `lessnat resume`.",
                cli.global.state_dir.display()
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Resume => {
            let state_dir = &cli.global.state_dir;
            if SuspendFile::in_dir(state_dir).resume()? {
                writeln!(stdout, "Reconcile is resumed: the next run applies.")?;
            } else {
                writeln!(stdout, "Reconcile was not suspended.")?;
            }
            match end_backoff(state_dir, &command_line()) {
                Ok(0) => {}
                Ok(failures) => writeln!(
                    stdout,
                    "Ended the back-off after {failures} failed runs in a row: the next run tries at once."
                )?,
                Err(SuspendError::Lock(error)) => {
                    writeln!(stdout, "The failure back-off is left as it is: {error}")?
                }
                Err(error) => return Err(error.into()),
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
        Command::Demo { keep, json, routed } => {
            drop(stdout);
            let options = crate::demo::Options {
                keep: *keep,
                json: *json,
                routed: *routed,
            };
            crate::demo::run(options)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::DemoServer { args } => Ok(crate::demo::server::serve(args)),
        Command::Man => {
            clap_mangen::Man::new(Cli::command())
                .render(&mut stdout)
                .context("rendering the man page")?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `lessnat reconcile`: once, or in a loop until SIGINT or SIGTERM.
fn reconcile(global: &GlobalArgs, args: &ReconcileArgs) -> anyhow::Result<ExitCode> {
    let source = Source::new(&args.repo, &args.reference, &args.path)?;
    if let Some(interval) = args.interval {
        anyhow::ensure!(
            interval.get() >= std::time::Duration::from_secs(1),
            "--interval {interval} is too short: give at least 1s (e.g. 60s or 5m)"
        );
    }
    let mut events = Events::none();
    if args.events == Some(EventsFormat::Json) {
        // Standard output carries only the events from here on; the plan and
        // progress, which apply prints to standard output, go to standard error.
        let events_out =
            nix::unistd::dup(std::io::stdout()).context("duplicating standard output")?;
        nix::unistd::dup2_stdout(std::io::stderr())
            .context("sending output for people to standard error")?;
        events = events.with_writer(Box::new(std::fs::File::from(events_out)));
    }
    if let Some(path) = &args.events_file {
        events = events.with_file(path)?;
    }
    let docker = Docker::connect()?;
    let interrupt = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, interrupt.clone())
            .context("installing signal handlers")?;
    }
    let settings = Settings {
        source,
        state_dir: global.state_dir.clone(),
        netns: netns(global),
        plan_only: args.plan_only,
        allow_rollback: args.allow_rollback,
        backoff_base: args
            .interval
            .map_or(SINGLE_RUN_BACKOFF_BASE, HumanDuration::get),
        metrics_file: args.metrics_file.clone(),
        holder: command_line(),
        node: global.node.clone(),
        style: stdout_style(global),
    };
    let node_of = Box::new(|spec: &Spec| pick_node(global, spec).map_err(|e| format!("{e:#}")));
    let mut reconciler = Reconciler::new(
        settings,
        &docker,
        node_of,
        events,
        Box::new(std::io::stdout()),
        &interrupt,
    );
    let Some(interval) = args.interval else {
        let ran = reconciler.run();
        return Ok(match (args.plan_only, ran.outcome) {
            (true, Some(Outcome::Planned)) => exit_for(true, ran.changes > 0),
            (false, Some(Outcome::Applied | Outcome::InSync | Outcome::Suspended)) => {
                ExitCode::SUCCESS
            }
            _ => ExitCode::FAILURE,
        });
    };
    if let Some(addr) = args.metrics_addr {
        let bound = crate::gitops::metrics::serve(addr, global.state_dir.clone())?;
        println!("Serving metrics at http://{bound}/metrics");
    }
    println!(
        "Reconciling every {interval}{} until SIGINT or SIGTERM.",
        if args.jitter.get().is_zero() {
            String::new()
        } else {
            format!(" (plus up to {})", args.jitter)
        }
    );
    run_loop(
        &mut reconciler,
        interval.get(),
        args.jitter.get(),
        &interrupt,
    );
    Ok(ExitCode::SUCCESS)
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
