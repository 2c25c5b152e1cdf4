//! A named network namespace made for a demo, test or benchmark (as `ip netns
//! add` makes it, under /run/netns, so `--netns NAME` works), with loopback
//! up, deleted when dropped; and commands run inside it (`ip netns exec`).

use std::io::Write;
use std::process::{Command, Output, Stdio};

use crate::backend::sysctl::{self, SysctlError};
use crate::netns::Netns;

/// Making a namespace, or running something in it, failed.
#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    /// A command could not be started.
    #[error("running `{command}` (is iproute2 installed?)")]
    Spawn {
        /// The command line.
        command: String,
        /// Why.
        source: std::io::Error,
    },
    /// A command ran and failed; what it printed is its own report, not a
    /// Rust error, so it is part of this message.
    #[error("`{command}` failed: {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// What it printed on standard error.
        stderr: String,
    },
    /// A kernel setting could not be written.
    #[error("setting up network namespace {namespace}")]
    Sysctl {
        /// The namespace.
        namespace: String,
        /// Why.
        source: SysctlError,
    },
}

/// A network namespace this process made; deleted on drop.
#[derive(Debug)]
pub struct Namespace {
    /// Its name under /run/netns.
    pub name: String,
}

impl Namespace {
    /// Makes the namespace `name` and brings its loopback up.
    pub fn add(name: &str) -> Result<Namespace, NamespaceError> {
        checked(Command::new("ip").args(["netns", "add", name]))?;
        // From here on, dropping it deletes it, also when the next step fails.
        let namespace = Namespace {
            name: name.to_string(),
        };
        namespace.exec("ip", &["link", "set", "lo", "up"])?;
        Ok(namespace)
    }

    /// The namespace as lessnat's backends take it.
    pub fn netns(&self) -> Netns {
        Netns::from_arg(&self.name)
    }

    /// Runs `program ARGS` inside the namespace; fails when it exits non-zero.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<Output, NamespaceError> {
        checked(&mut self.command(program, args))
    }

    /// Runs `program ARGS` inside the namespace; its output whatever the status.
    pub fn try_exec(&self, program: &str, args: &[&str]) -> Result<Output, NamespaceError> {
        let mut command = self.command(program, args);
        command.output().map_err(|source| NamespaceError::Spawn {
            command: line(&command),
            source,
        })
    }

    /// Feeds an nft script to `nft -f -` inside the namespace.
    pub fn nft(&self, script: &str) -> Result<(), NamespaceError> {
        let mut command = self.command("nft", &["-f", "-"]);
        let what = line(&command);
        let spawned = |source| NamespaceError::Spawn {
            command: what.clone(),
            source,
        };
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawned)?;
        let written = child
            .stdin
            .take()
            .map_or(Ok(()), |mut stdin| stdin.write_all(script.as_bytes()));
        let output = child.wait_with_output().map_err(spawned)?;
        written.map_err(spawned)?;
        succeeded(&command, output).map(drop)
    }

    /// Sets the kernel setting `key` (e.g. `net.ipv4.ip_forward`) inside the
    /// namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<(), NamespaceError> {
        sysctl::write(&self.netns(), key, value).map_err(|source| NamespaceError::Sysctl {
            namespace: self.name.clone(),
            source,
        })
    }

    fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.name, program])
            .args(args);
        command
    }
}

impl AsRef<Namespace> for Namespace {
    fn as_ref(&self) -> &Namespace {
        self
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .output();
    }
}

/// Runs `command`; fails when it cannot start or exits non-zero.
fn checked(command: &mut Command) -> Result<Output, NamespaceError> {
    let output = command.output().map_err(|source| NamespaceError::Spawn {
        command: line(command),
        source,
    })?;
    succeeded(command, output)
}

/// `output` of `command` when it exited 0.
fn succeeded(command: &Command, output: Output) -> Result<Output, NamespaceError> {
    if output.status.success() {
        Ok(output)
    } else {
        Err(NamespaceError::Failed {
            command: line(command),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

/// `command` as a shell line, for messages.
fn line(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|part| part.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}
