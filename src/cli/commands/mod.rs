//! One function per command, and what they share: the session, the reporter
//! for people, loading a spec, writing to standard output.

pub mod agent;
pub mod apply;
pub mod generated;
pub mod plan;
pub mod reconcile;
pub mod show;
pub mod state;
pub mod validate;

use std::io::{ErrorKind, IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;

use super::args::GlobalArgs;
use crate::backend::sysctl;
use crate::diagnostic::Report;
use crate::netns::Netns;
use crate::report::text::{Flavour, Text};
use crate::session::{self, Session};
use crate::spec::{
    DEFAULT_EPHEMERAL_PORTS, Spec, ephemeral_port_warnings, load_file, parse_port_range,
};
use crate::style::Style;

/// The exit code of `plan --detailed-exitcode` (and `reconcile --plan-only`)
/// when there are changes.
const EXIT_CHANGES: u8 = 2;

/// Standard output was closed by its reader: not an error, lessnat ends quietly.
#[derive(Debug, thiserror::Error)]
#[error("standard output is closed")]
pub struct StdoutClosed;

/// Writes `text` to standard output.
fn print(text: impl AsRef<[u8]>) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_ref())
        .and_then(|()| stdout.flush())
    {
        Err(error) if error.kind() == ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        result => Ok(result?),
    }
}

/// Writes `value` to standard output as pretty JSON.
fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    print(text)
}

/// Writes `text` to standard error; a closed standard error is ignored.
fn print_error(text: &str) {
    let _ = std::io::stderr().write_all(text.as_bytes());
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

fn stdout_style(global: &GlobalArgs) -> Style {
    style_for(global, std::io::stdout().is_terminal())
}

/// What people read: on standard output, or on standard error when standard
/// output carries something else (reconcile's events); problems on standard error.
fn people(global: &GlobalArgs, on_stderr: bool) -> Text {
    let (out, is_terminal): (Box<dyn Write + Send>, bool) = if on_stderr {
        (Box::new(std::io::stderr()), std::io::stderr().is_terminal())
    } else {
        (Box::new(std::io::stdout()), std::io::stdout().is_terminal())
    };
    Text::new(
        out,
        Box::new(std::io::stderr()),
        style_for(global, is_terminal),
        Flavour::for_terminal(is_terminal),
    )
}

/// The session's settings from the global options.
fn session_settings(global: &GlobalArgs) -> session::Settings {
    session::Settings {
        node: global.node.clone(),
        netns: netns(global),
        state_dir: global.state_dir.clone(),
        holder: std::env::args().collect::<Vec<_>>().join(" "),
    }
}

/// A session reporting to people on standard output.
fn session(global: &GlobalArgs) -> Session {
    Session::new(session_settings(global), Box::new(people(global, false)))
}

/// The namespace `--netns` names, or lessnat's own.
fn netns(global: &GlobalArgs) -> Netns {
    global
        .netns
        .as_deref()
        .map(Netns::from_arg)
        .unwrap_or_default()
}

/// Loads a spec, printing its problems and failing when it is invalid, and
/// printing its warnings when it is valid.
fn load_spec(global: &GlobalArgs, path: &Path) -> anyhow::Result<Spec> {
    let spec = load_file(path).map_err(|report| {
        print_error(&report.render(style_for(global, std::io::stderr().is_terminal())));
        anyhow::anyhow!("{} is not a valid spec", path.display())
    })?;
    warn_about(global, path, &spec);
    Ok(spec)
}

/// The sysctl holding the range of local ports outgoing connections take.
const EPHEMERAL_PORTS_SYSCTL: &str = "net.ipv4.ip_local_port_range";

/// Prints, on standard error, what in the valid spec at `path` is likely to
/// bite on this host: host-mode ports in the ephemeral port range of the
/// namespace lessnat works in (Linux's default range when it cannot be read).
fn warn_about(global: &GlobalArgs, path: &Path, spec: &Spec) {
    let range = sysctl::read(&netns(global), &[EPHEMERAL_PORTS_SYSCTL])
        .ok()
        .and_then(|values| parse_port_range(values.get(EPHEMERAL_PORTS_SYSCTL)?))
        .unwrap_or(DEFAULT_EPHEMERAL_PORTS);
    let diagnostics = ephemeral_port_warnings(spec, &range);
    if diagnostics.is_empty() {
        return;
    }
    let report = Report {
        file: path.display().to_string(),
        source: std::fs::read_to_string(path).unwrap_or_default(),
        diagnostics,
    };
    print_error(&report.render(style_for(global, std::io::stderr().is_terminal())));
}

/// 2 when asked for (`detailed`) and something changed, else 0.
fn exit_for(detailed: bool, changed: bool) -> ExitCode {
    if detailed && changed {
        ExitCode::from(EXIT_CHANGES)
    } else {
        ExitCode::SUCCESS
    }
}
