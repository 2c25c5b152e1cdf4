//! The command line's arguments (clap derive). Their doc comments are the help text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use clap_complete::Shell;

use crate::spec::HumanDuration;

/// Run and upgrade services on your own hosts, with no load balancer and no NAT in the steady state.
#[derive(Debug, Parser)]
#[command(name = "lessnat", version, about, long_about = None, propagate_version = true)]
#[command(
    after_help = "Docs: README.md. Specs are YAML; `lessnat schema` prints their JSON Schema for editors."
)]
pub struct Cli {
    #[command(flatten)]
    pub(crate) global: GlobalArgs,
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// Options every command takes.
#[derive(Debug, Args)]
pub(crate) struct GlobalArgs {
    /// Never colour the output (also when NO_COLOR is set, or output is not a terminal).
    #[arg(long, global = true)]
    pub(crate) no_color: bool,
    /// Log what lessnat does to stderr: -v info, -vv debug, -vvv trace (RUST_LOG overrides).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub(crate) verbose: u8,
    /// The node of the spec this host is. Defaults to the spec's only node, or
    /// the node named like this host.
    #[arg(long, global = true, env = "LESSNAT_NODE", value_name = "NAME")]
    pub(crate) node: Option<String>,
    /// Work inside this network namespace: a name under /run/netns, or a path.
    #[arg(long, global = true, value_name = "NAME|PATH")]
    pub(crate) netns: Option<String>,
    /// Where apply keeps its lock and journal (and reconcile its repository mirror and record).
    #[arg(
        long,
        global = true,
        env = "LESSNAT_STATE_DIR",
        default_value = "/var/lib/lessnat",
        value_name = "DIR"
    )]
    pub(crate) state_dir: PathBuf,
}

/// Where observed state comes from.
#[derive(Debug, Args)]
pub(crate) struct ObserveArgs {
    /// Plan against a snapshot saved by `lessnat show --json` instead of the live host.
    #[arg(long, value_name = "FILE")]
    pub(crate) observed: Option<PathBuf>,
}

/// Options of `lessnat reconcile`.
#[derive(Debug, Args)]
pub(crate) struct ReconcileArgs {
    /// The Git repository holding the spec: https://, ssh://, git@host:path, file://, or a path.
    #[arg(long, value_name = "URL")]
    pub(crate) repo: String,
    /// The branch to follow (or a full ref, like refs/tags/v3).
    #[arg(long = "ref", value_name = "BRANCH", default_value = "main")]
    pub(crate) reference: String,
    /// The spec file's path inside the repository.
    #[arg(long, value_name = "FILE")]
    pub(crate) path: String,
    /// Only plan and report drift, never apply: exit 0 without drift, 2 with, 1 on error.
    #[arg(long)]
    pub(crate) plan_only: bool,
    /// Apply the fetched commit even when it is not a descendant of the last
    /// applied one (older, rewritten or unrelated history). Use it once, by hand.
    #[arg(long)]
    pub(crate) allow_rollback: bool,
    /// Run in a loop, this long apart (e.g. 60s, 5m); without it, run once.
    /// After n failures in a row the wait is interval × 2^n, at most 10 × interval.
    #[arg(long, value_name = "DURATION")]
    pub(crate) interval: Option<HumanDuration>,
    /// Add a random delay of up to this much to each wait, so nodes spread out.
    #[arg(
        long,
        value_name = "DURATION",
        requires = "interval",
        default_value = "0s"
    )]
    pub(crate) jitter: HumanDuration,
    /// Print events as JSON lines on standard output (what people read moves to standard error).
    #[arg(long, value_name = "FORMAT")]
    pub(crate) events: Option<EventsFormat>,
    /// Append events as JSON lines to this file.
    #[arg(long, value_name = "PATH")]
    pub(crate) events_file: Option<PathBuf>,
    /// Write Prometheus metrics to this file after each run (for node_exporter's textfile collector).
    #[arg(long, value_name = "PATH")]
    pub(crate) metrics_file: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics (loop mode), e.g. 127.0.0.1:9824.
    #[arg(long, value_name = "ADDR", requires = "interval")]
    pub(crate) metrics_addr: Option<std::net::SocketAddr>,
}

/// Options of `lessnat agent`.
#[derive(Debug, Args)]
pub(crate) struct AgentArgs {
    /// The spec file (read again at every run, so edits apply at the next one).
    #[arg(
        short = 'f',
        long = "file",
        value_name = "SPEC",
        required_unless_present = "repo",
        conflicts_with = "repo"
    )]
    pub(crate) spec: Option<PathBuf>,
    /// Follow a Git repository instead, as `lessnat reconcile` does: fetch at
    /// start and each interval; events re-plan the last fetched commit.
    #[arg(long, value_name = "URL", requires = "path")]
    pub(crate) repo: Option<String>,
    /// With --repo: the branch to follow (or a full ref, like refs/tags/v3).
    #[arg(
        long = "ref",
        value_name = "BRANCH",
        default_value = "main",
        requires = "repo"
    )]
    pub(crate) reference: String,
    /// With --repo: the spec file's path inside the repository.
    #[arg(long, value_name = "FILE", requires = "repo")]
    pub(crate) path: Option<String>,
    /// With --repo: apply a fetched commit that is not a descendant of the
    /// last applied one. Use it once, by hand.
    #[arg(long, requires = "repo")]
    pub(crate) allow_rollback: bool,
    /// With --repo: append reconcile's events as JSON lines to this file.
    #[arg(long, value_name = "PATH", requires = "repo")]
    pub(crate) events_file: Option<PathBuf>,
    /// With --repo: write reconcile's Prometheus metrics to this file after each run.
    #[arg(long, value_name = "PATH", requires = "repo")]
    pub(crate) metrics_file: Option<PathBuf>,
    /// Run this long apart when no event comes (e.g. 30s, 5m).
    #[arg(long, value_name = "DURATION", default_value = "30s")]
    pub(crate) interval: HumanDuration,
    /// Serve Prometheus metrics at http://ADDR/metrics and readiness at /healthz, e.g. 127.0.0.1:9824.
    #[arg(long, value_name = "ADDR")]
    pub(crate) metrics_addr: Option<std::net::SocketAddr>,
    /// Probe the replicas again in every run instead of using the health
    /// watch's fresh round (for measuring what the reuse saves).
    #[arg(long, hide = true)]
    pub(crate) probe_again: bool,
}

/// Formats of `reconcile --events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum EventsFormat {
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
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
            required_unless_present_any = ["spec", "promote", "abort"]
        )]
        plan: Option<PathBuf>,
        /// The spec file: plan and apply in one go.
        #[arg(short = 'f', long = "file", value_name = "SPEC")]
        spec: Option<PathBuf>,
        /// Apply without asking for confirmation (needed when not on a terminal).
        #[arg(long)]
        auto_approve: bool,
        /// End the canary an apply on this node is holding now and go on with
        /// its upgrade: all new connections to the new version.
        #[arg(long, conflicts_with_all = ["plan", "spec", "abort", "auto_approve"])]
        promote: bool,
        /// End the canary an apply on this node is holding now and roll its
        /// upgrade back; connections the canary has finish first.
        #[arg(long, conflicts_with_all = ["plan", "spec", "auto_approve"])]
        abort: bool,
    },
    /// Remove what lessnat owns on this node: its containers, its nftables
    /// table, its rules, routes, veths and VIPs. Nothing else is touched.
    Destroy {
        /// The spec file, to pick this node as `apply -f SPEC` does (--node, the
        /// spec's only node, or the node named like this host). Without it:
        /// --node, or the host name.
        #[arg(short = 'f', long = "file", value_name = "SPEC")]
        spec: Option<PathBuf>,
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
    /// Keep this node converged: run plan and apply on an interval and at once on events.
    ///
    /// One long-running process per node (systemd: examples/systemd/lessnat-agent.service,
    /// Type=notify). Between runs it reacts to lessnat's nftables table being
    /// deleted or edited (netlink events), to lessnat's containers dying
    /// (Docker events; a crash loop backs off), and on load-balancer nodes to
    /// a replica changing health (probed every `health.interval`). It takes
    /// the apply lock for each run, so `lessnat apply` by hand waits its turn;
    /// `lessnat suspend` stops it from applying. A second agent on the node
    /// refuses to start. Killing it stops no traffic; started again, it adopts
    /// what runs. `lessnat status` shows its view.
    Agent(AgentArgs),
    /// Show what reconcile and the agent last did on this node.
    ///
    /// The applied commit, the last run and its drift, the last error, the
    /// failure back-off, and an upgrade in flight (from the journal); when an
    /// agent runs (or ran) here, its last runs, the drift it corrected, a
    /// load-balancer node's spreads with each replica's health, and recent events.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Show the whole site as etcd holds it instead: every registered
        /// node (roles, commit, lease), its replicas and their health,
        /// upgrades in flight and rollout slots. Needs `--spec`.
        #[arg(long, requires = "spec")]
        cluster: bool,
        /// The spec whose `cluster:` block says where etcd is (with `--cluster`).
        #[arg(long, value_name = "FILE")]
        spec: Option<PathBuf>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
