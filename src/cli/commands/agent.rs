//! `lessnat agent`: keeps the node converged until SIGINT or SIGTERM.

use std::process::ExitCode;

use super::{load_spec, people, session_settings};
use crate::agent::{Agent, Settings};
use crate::cli::args::{AgentArgs, GlobalArgs};
use crate::session::Session;

/// The shortest interval: runs also come on events, so a shorter one only
/// costs observations.
const MIN_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// `lessnat agent -f SPEC`. The spec is checked once before anything starts,
/// so a typo fails at once instead of in the first run.
pub fn agent(global: &GlobalArgs, args: &AgentArgs) -> anyhow::Result<ExitCode> {
    let interval = args.interval;
    anyhow::ensure!(
        interval.get() >= MIN_INTERVAL,
        "--interval {interval} is too short: give at least 1s (events wake the agent in between)"
    );
    let spec = load_spec(global, &args.spec)?;
    let session = Session::new(session_settings(global), Box::new(people(global, false)));
    let node = session.node(Some(&spec))?;
    let settings = Settings {
        spec_file: args.spec.clone(),
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
        "Agent for {} every {interval} and on events, until SIGINT or SIGTERM.",
        args.spec.display()
    ));
    agent.run()?;
    Ok(ExitCode::SUCCESS)
}
