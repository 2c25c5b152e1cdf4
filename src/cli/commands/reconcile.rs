//! `lessnat reconcile`: once, or in a loop until SIGINT or SIGTERM.

use std::process::ExitCode;

use super::{exit_for, people, session_settings};
use crate::cli::args::{EventsFormat, GlobalArgs, ReconcileArgs};
use crate::gitops::events::Events;
use crate::gitops::fetch::Source;
use crate::gitops::reconcile::{Reconciler, Settings};
use crate::gitops::record::Outcome;
use crate::gitops::schedule::{SINGLE_RUN_BACKOFF_BASE, run_loop};
use crate::spec::HumanDuration;

/// `lessnat reconcile`. With `--events json` standard output carries only the
/// events, and what people read goes to standard error.
pub fn reconcile(global: &GlobalArgs, args: &ReconcileArgs) -> anyhow::Result<ExitCode> {
    let source = Source::new(&args.repo, &args.reference, &args.path)?;
    if let Some(interval) = args.interval {
        anyhow::ensure!(
            interval.get() >= std::time::Duration::from_secs(1),
            "--interval {interval} is too short: give at least 1s (e.g. 60s or 5m)"
        );
    }
    let events_on_stdout = args.events == Some(EventsFormat::Json);
    let mut events = Events::none();
    if events_on_stdout {
        events = events.with_writer(Box::new(std::io::stdout()));
    }
    if let Some(path) = &args.events_file {
        events = events.with_file(path)?;
    }
    let settings = Settings {
        source,
        plan_only: args.plan_only,
        allow_rollback: args.allow_rollback,
        backoff_base: args
            .interval
            .map_or(SINGLE_RUN_BACKOFF_BASE, HumanDuration::get),
        metrics_file: args.metrics_file.clone(),
    };
    let people = Box::new(people(global, events_on_stdout));
    let mut reconciler = Reconciler::new(settings, session_settings(global), people, events);
    reconciler.catch_signals()?;
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
        reconciler.say(&format!("Serving metrics at http://{bound}/metrics"));
    }
    let jitter = args.jitter;
    reconciler.say(&format!(
        "Reconciling every {interval}{} until SIGINT or SIGTERM.",
        if jitter.get().is_zero() {
            String::new()
        } else {
            format!(" (plus up to {jitter})")
        }
    ));
    run_loop(&mut reconciler, interval.get(), jitter.get());
    Ok(ExitCode::SUCCESS)
}
