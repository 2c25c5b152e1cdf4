//! `lessnat demo`: a zero-downtime upgrade, seen in one command, on any
//! machine with root and Docker. It builds its own images from this program
//! ([`image`]), installs a service with lessnat in a temporary state
//! directory ([`converge`]), upgrades it under load ([`load`]) with
//! `redirect-drain` and then with `stop-start` ([`host`]), prints what the
//! clients saw ([`report`]) and removes everything it made ([`cleanup`]).
//!
//! `lessnat demo --routed` ([`routed`]) does the same for routed mode in
//! network namespaces it makes ([`namespace`], [`topology`]): the client
//! addresses the replicas see, with lessnat and behind a masquerading load
//! balancer.

pub mod cleanup;
pub mod converge;
mod host;
pub mod image;
pub mod load;
pub mod namespace;
pub mod report;
mod routed;
pub mod server;
pub mod topology;

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::backend::docker::{Docker, DockerError};

use cleanup::Cleanup;
use converge::{ConvergeError, Stream};
use image::{ImageError, Images};

/// What `lessnat demo` was asked to do.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Leave the upgraded service running (host mode).
    pub keep: bool,
    /// Print the summary as JSON on standard output; everything else goes to
    /// standard error.
    pub json: bool,
    /// Routed mode in network namespaces instead of host mode.
    pub routed: bool,
}

/// The demo could not run, or was stopped.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// Not root.
    #[error(
        "lessnat demo needs root: it runs containers and changes nftables. Run it again as root (e.g. with sudo)"
    )]
    NotRoot,
    /// A command lessnat runs is missing.
    #[error(
        "lessnat demo needs the `{command}` command (on Debian or Ubuntu: apt-get install {package})"
    )]
    Missing {
        /// The command.
        command: &'static str,
        /// The Debian package that has it.
        package: &'static str,
    },
    /// No Docker engine answers.
    #[error(
        "lessnat demo needs a running Docker engine (at DOCKER_HOST, or /var/run/docker.sock); start it, e.g. `systemctl start docker`"
    )]
    NoDocker(#[source] DockerError),
    /// lessnat already manages this host.
    #[error(
        "this host already has lessnat's nftables table `inet lessnat` (lessnat manages services here, or an earlier run was interrupted); the demo does not share it. Run it on another machine"
    )]
    TableInUse,
    /// SIGINT or SIGTERM.
    #[error("interrupted; everything the demo made was removed")]
    Interrupted,
    /// A demo image could not be made.
    #[error("preparing the demo images")]
    Image(#[source] ImageError),
    /// lessnat failed on a demo node.
    #[error(transparent)]
    Converge(#[from] ConvergeError),
    /// The clients did not get going.
    #[error("the demo's clients")]
    Load(#[source] load::TooSlow),
    /// Setting something up failed.
    #[error("{what}")]
    Setup {
        /// What.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// A network namespace of the routed demo could not be made or changed.
    #[error("{what}")]
    Namespace {
        /// What the demo was doing.
        what: &'static str,
        /// Why.
        source: namespace::NamespaceError,
    },
    /// lessnat's table could not be read.
    #[error("reading nftables")]
    Nft(#[source] crate::backend::nft::NftError),
    /// The output could not be written.
    #[error("writing the demo's output")]
    Output(#[source] std::io::Error),
}

/// What the scenarios share.
pub(crate) struct Demo {
    interrupt: Arc<AtomicBool>,
    /// Where people's output goes.
    stream: Stream,
    out: Box<dyn Write + Send>,
    /// Whether the output is a terminal (live progress, colour).
    live: bool,
    options: Options,
}

impl Demo {
    /// Writes a line of the demo's own narration.
    fn say(&mut self, text: &str) -> Result<(), DemoError> {
        writeln!(self.out, "{text}")
            .and_then(|()| self.out.flush())
            .map_err(DemoError::Output)
    }

    /// Fails once SIGINT or SIGTERM came.
    fn check(&self) -> Result<(), DemoError> {
        if self.interrupt.load(Ordering::SeqCst) {
            Err(DemoError::Interrupted)
        } else {
            Ok(())
        }
    }

    /// Sleeps, waking up early for SIGINT or SIGTERM.
    fn pause(&self, duration: Duration) -> Result<(), DemoError> {
        let until = Instant::now() + duration;
        while Instant::now() < until {
            self.check()?;
            std::thread::sleep(Duration::from_millis(20));
        }
        self.check()
    }
}

/// Runs the demo the options ask for.
pub fn run(options: Options) -> Result<(), DemoError> {
    check_requirements(options.routed)?;
    // Said now, before anything is made; the sessions connect on their own.
    Docker::connect().map_err(DemoError::NoDocker)?;
    let interrupt = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, interrupt.clone()).map_err(|source| {
            DemoError::Setup {
                what: "installing signal handlers".to_string(),
                source,
            }
        })?;
    }
    // With --json, standard output carries only the summary; what people
    // read (the demo's narration, plans, apply's progress) goes to standard error.
    let stream = if options.json {
        Stream::Stderr
    } else {
        Stream::Stdout
    };
    let live = !options.json && std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut demo = Demo {
        interrupt,
        stream,
        out: stream.writer(),
        live,
        options,
    };
    let mut cleanup = Cleanup::new().map_err(|source| DemoError::Setup {
        what: "making a temporary state directory".to_string(),
        source,
    })?;
    let (result, made) = if options.routed {
        (
            routed::run(&mut demo, &mut cleanup).map(|s| shown(s.table(), &s)),
            "containers, images, network namespaces, state directory",
        )
    } else {
        (
            host::run(&mut demo, &mut cleanup).map(|s| shown(s.table(), &s)),
            "containers, images, nftables table, state directory",
        )
    };
    if !demo.options.keep || result.is_err() {
        demo.say(&format!("\nCleaning up: {made}."))?;
    }
    let problems = cleanup.finish();
    for problem in &problems {
        demo.say(&format!("  cleanup: {problem}"))?;
    }
    let (table, json) = match result {
        Err(_) if demo.interrupt.load(Ordering::SeqCst) => return Err(DemoError::Interrupted),
        Err(e) => return Err(e),
        Ok(done) => done,
    };
    demo.say(&format!("\n{table}"))?;
    if demo.options.json {
        writeln!(std::io::stdout(), "{json}").map_err(DemoError::Output)?;
    }
    Ok(())
}

/// A summary's table for people and its JSON for scripts.
fn shown(table: String, summary: &impl serde::Serialize) -> (String, String) {
    (
        table,
        serde_json::to_string_pretty(summary).unwrap_or_default(),
    )
}

/// Root, the `nft` command lessnat runs and, for the routed demo, `ip`,
/// which makes its namespaces (the Docker engine is checked next).
fn check_requirements(routed: bool) -> Result<(), DemoError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(DemoError::NotRoot);
    }
    let commands = [("nft", "nftables"), ("ip", "iproute2")];
    let needed = if routed {
        &commands[..]
    } else {
        &commands[..1]
    };
    match needed.iter().find(|(command, _)| !on_path(command)) {
        Some(&(command, package)) => Err(DemoError::Missing { command, package }),
        None => Ok(()),
    }
}

/// Whether `name` is an executable file on PATH.
fn on_path(name: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|dir| {
        std::fs::metadata(dir.join(name))
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// Builds the demo images unless they are up to date.
fn images(demo: &mut Demo) -> Result<(), DemoError> {
    demo.say("==> Building the demo images lessnat-demo:v1 and :v2 from this program (nothing is pulled)")?;
    let started = Instant::now();
    let built = Images::connect()
        .and_then(|images| images.ensure())
        .map_err(DemoError::Image)?;
    let how = if built { "built" } else { "up to date" };
    demo.say(&format!(
        "    {how} in {:.1}s",
        started.elapsed().as_secs_f64()
    ))?;
    demo.check()
}
