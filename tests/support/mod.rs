//! Shared helpers for privileged integration tests: skipping (or failing under
//! `LESSNAT_REQUIRE_PRIVILEGED=1`) when root, tools or Docker are missing, and
//! network namespaces that are always removed.
#![allow(dead_code)] // each test binary uses a different part

pub mod cluster_site;
pub mod conntrack;
pub mod etcd;
pub mod forward;
pub mod git;
pub mod image;
pub mod load;
pub mod process;
pub mod registry;

use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use lessnat::demo::namespace::Namespace;
use lessnat::error::chain;

/// Whether missing privileges must fail the test instead of skipping it.
pub fn privileged_required() -> bool {
    std::env::var_os("LESSNAT_REQUIRE_PRIVILEGED").is_some_and(|v| v == "1")
}

fn skip_or_fail(test: &str, why: &str) -> bool {
    if privileged_required() {
        panic!("{test}: {why}, and LESSNAT_REQUIRE_PRIVILEGED=1");
    }
    eprintln!("SKIPPED {test}: {why} (set LESSNAT_REQUIRE_PRIVILEGED=1 to fail instead)");
    false
}

/// Whether `name` is an executable file on PATH (tools disagree on a version flag:
/// `ip --version` exits 255).
fn has_command(name: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|dir| {
        std::fs::metadata(dir.join(name))
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// True when the given commands are installed (no root needed).
pub fn commands(test: &str, commands: &[&str]) -> bool {
    match commands.iter().find(|c| !has_command(c)) {
        Some(missing) => skip_or_fail(test, &format!("needs the `{missing}` command")),
        None => true,
    }
}

/// True when the test may use root, network namespaces and the given commands.
pub fn root_with(test: &str, commands: &[&str]) -> bool {
    if !nix::unistd::geteuid().is_root() {
        return skip_or_fail(test, "needs root");
    }
    for command in ["ip"].iter().chain(commands) {
        if !has_command(command) {
            return skip_or_fail(test, &format!("needs the `{command}` command"));
        }
    }
    true
}

/// True when a Docker engine answers.
pub fn docker(test: &str) -> bool {
    let ok = Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    ok || skip_or_fail(test, "needs a running Docker engine")
}

/// Runs a command and panics with its output when it fails.
pub fn run(program: &str, args: &[&str]) -> Output {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A network namespace made for one test, deleted when dropped (also on
/// panic): lessnat's [`Namespace`] with commands that panic when they fail.
pub struct TestNetns {
    inner: Namespace,
}

impl std::ops::Deref for TestNetns {
    type Target = Namespace;
    fn deref(&self) -> &Namespace {
        &self.inner
    }
}

impl AsRef<Namespace> for TestNetns {
    fn as_ref(&self) -> &Namespace {
        &self.inner
    }
}

impl From<Namespace> for TestNetns {
    fn from(inner: Namespace) -> Self {
        TestNetns { inner }
    }
}

impl TestNetns {
    /// Creates a fresh namespace with loopback up.
    pub fn new(tag: &str) -> Self {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let name = format!("lnt-{tag}-{}-{n}", std::process::id());
        Namespace::add(&name)
            .map(TestNetns::from)
            .unwrap_or_else(|e| panic!("{}", chain(&e)))
    }

    /// Runs a command inside the namespace; panics when it fails.
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        self.inner
            .exec(program, args)
            .unwrap_or_else(|e| panic!("{}", chain(&e)))
    }

    /// Runs a command inside the namespace and returns its output whatever the status.
    pub fn try_exec(&self, program: &str, args: &[&str]) -> Output {
        self.inner
            .try_exec(program, args)
            .unwrap_or_else(|e| panic!("{}", chain(&e)))
    }

    /// Feeds an nft script to `nft -f -` inside the namespace.
    pub fn nft(&self, script: &str) {
        self.inner
            .nft(script)
            .unwrap_or_else(|e| panic!("{}\n{script}", chain(&e)));
    }
}

/// Serialises tests (and benchmarks) that use the host's network namespace:
/// host-mode containers listen there and lessnat's table there is shared, so
/// only one may upgrade at a time. The lock is machine-wide (a fixed path), so
/// it also holds across test binaries and checkouts; it is released on drop.
pub struct HostNetworkGuard {
    _file: std::fs::File,
}

/// Waits for exclusive use of the host network namespace.
pub fn host_network() -> HostNetworkGuard {
    let path = std::path::Path::new("/run/lock/lessnat-host-network.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    file.lock()
        .unwrap_or_else(|e| panic!("locking {}: {e}", path.display()));
    HostNetworkGuard { _file: file }
}

/// A port free for TCP and UDP on loopback, below the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`, 32768 and up by default): a port in that
/// range can be taken at any moment by some client socket's automatic source
/// port, and then a server cannot bind it.
pub fn free_port() -> u16 {
    static NEXT_PORT: AtomicU32 = AtomicU32::new(0);
    let seed = std::process::id() % 9_000;
    for _ in 0..9_000 {
        let offset = (seed + NEXT_PORT.fetch_add(1, Ordering::SeqCst)) % 9_000;
        let port = 20_000 + offset as u16;
        let tcp = std::net::TcpListener::bind(("127.0.0.1", port));
        let udp = std::net::UdpSocket::bind(("127.0.0.1", port));
        if tcp.is_ok() && udp.is_ok() {
            return port;
        }
    }
    panic!("no free port in 20000-28999")
}

/// A routed-mode site in network namespaces (`tests/routed.rs`, `benches/routed.rs`).
pub mod topology;
