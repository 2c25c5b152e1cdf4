//! `lessnat agent`: keeps the node converged until SIGINT or SIGTERM.

use std::process::ExitCode;

use super::{load_spec, people, session_settings};
use crate::agent::{Agent, Settings, SpecSource};
use crate::cli::args::{AgentArgs, GlobalArgs};
use crate::gitops::events::Events;
use crate::gitops::fetch::Source;
use crate::gitops::reconcile::{self, Reconciler};
use crate::session::Session;

/// The shortest interval: runs also come on events, so a shorter one only
/// costs observations.
const MIN_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// `lessnat agent -f SPEC | --repo URL --path FILE`. A spec file is checked
/// once before anything starts, so a typo fails at once instead of in the
/// first run; a repository is only reached in the first run, whose failure
/// (say, the server is down) the agent reports and retries, changing nothing.
pub fn agent(global: &GlobalArgs, args: &AgentArgs) -> anyhow::Result<ExitCode> {
    let interval = args.interval;
    anyhow::ensure!(
        interval.get() >= MIN_INTERVAL,
        "--interval {interval} is too short: give at least 1s (events wake the agent in between)"
    );
    let session = Session::new(session_settings(global), Box::new(people(global, false)));
    let (source, node) = match (&args.spec, &args.repo, &args.path) {
        (Some(file), _, _) => {
            let spec = load_spec(global, file)?;
            (SpecSource::File(file.clone()), session.node(Some(&spec))?)
        }
        (None, Some(repo), Some(path)) => {
            let mut events = Events::none();
            if let Some(path) = &args.events_file {
                events = events.with_file(path)?;
            }
            let settings = reconcile::Settings {
                source: Source::new(repo, &args.reference, path)?,
                plan_only: false,
                allow_rollback: args.allow_rollback,
                // The agent backs off after failures itself (as with -f).
                backoff_base: std::time::Duration::ZERO,
                metrics_file: args.metrics_file.clone(),
            };
            let people = Box::new(people(global, false));
            let reconciler = Reconciler::new(settings, session_settings(global), people, events);
            // The spec is not read yet: the node is --node or the host name.
            let node = session.node(None)?;
            (SpecSource::Repo(Box::new(reconciler)), node)
        }
        _ => anyhow::bail!("give a spec: -f SPEC, or --repo URL --path FILE"),
    };
    let described = format!("{source:?}");
    let settings = Settings {
        source,
        node,
        interval: interval.get(),
        listen: args.metrics_addr,
        reuse_probes: !args.probe_again,
    };
    let (mut agent, bound) = Agent::start(settings, session)?;
    if let Some(bound) = bound {
        agent.say(&format!(
            "Serving metrics at http://{bound}/metrics and readiness at http://{bound}/healthz"
        ));
    }
    agent.say(&format!(
        "Agent for {described} every {interval} and on events, until SIGINT or SIGTERM."
    ));
    agent.run()?;
    Ok(ExitCode::SUCCESS)
}
