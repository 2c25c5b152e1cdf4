//! `lessnat agent` as the real binary, killed for real: in host mode under
//! load (Docker's host network, lessnat's real `inet lessnat` table, the
//! machine-wide host-network lock held), it restores a deleted table, a
//! `kill -9` of it drops no request and the next agent adopts the node with
//! no change, and it restarts a container someone killed. In a network
//! namespace of the test's own, a second agent refuses to start, naming the
//! first, while `lessnat apply` by hand still works. In routed mode
//! (`support::topology`: clients, two load-balancer nodes, two workers, each
//! a namespace), agents on the load-balancer nodes take a replica killed
//! under load out of the spread, and put it back once it answers again.
//!
//! Timings are printed, not asserted: the bounds here only keep a broken
//! agent from hanging the test (the measured numbers are in
//! `cargo bench --bench agent`).

mod support;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::git::{Upstream, has_git};
use support::image::test_image;
use support::load::{Load, LoadConfig, Report};
use support::process::Process;
use support::topology::{Replica, Service, Topology};

const LESSNAT: &str = env!("CARGO_BIN_EXE_lessnat");

/// The longest the test waits for anything the agent should do within a
/// second or two.
const BOUND: Duration = Duration::from_secs(10);

/// The longest a first converge (pulling nothing, one container) may take.
const FIRST_RUN: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// A host-mode node

static NEXT_NODE: AtomicU32 = AtomicU32::new(0);

/// One test's host-mode node: a spec with one service on a port of its own,
/// a state directory, and on the way out `lessnat destroy` and `docker rm -f`.
struct Node {
    name: String,
    port: u16,
    dir: tempfile::TempDir,
    _guard: support::HostNetworkGuard,
}

impl Node {
    /// `None` (skipped) without root, nft or Docker.
    fn new(test: &str) -> Option<Node> {
        if !support::root_with(test, &["nft"]) || !support::docker(test) {
            return None;
        }
        test_image("v1");
        let guard = support::host_network();
        let name = format!(
            "a{}x{}",
            std::process::id(),
            NEXT_NODE.fetch_add(1, Ordering::SeqCst)
        );
        let node = Node {
            name,
            port: support::free_port(),
            dir: tempfile::tempdir().expect("temp dir"),
            _guard: guard,
        };
        let temp = support::free_port();
        let spec = format!(
            "version: 1\n\
             nodes:\n  - name: {node}\n    address: 192.0.2.10\n\
             services:\n  - name: web\n    node: {node}\n    image: {image}\n    network: host\n    \
             command: [\"--listen\", \"127.0.0.1:{{port.http}}\"]\n    ports:\n      \
             - {{ name: http, port: {port}, protocol: tcp, tempPort: {temp} }}\n    health:\n      \
             http: {{ path: /healthz, port: http }}\n      interval: 200ms\n      timeout: 1s\n      \
             healthyAfter: 1\n      startTimeout: 15s\n    upgrade:\n      stopTimeout: 2s\n",
            node = node.name,
            image = test_image("v1"),
            port = node.port,
        );
        std::fs::write(node.spec(), spec).expect("write spec");
        eprintln!("{test}: node {}, port {}", node.name, node.port);
        Some(node)
    }

    fn spec(&self) -> PathBuf {
        self.dir.path().join("spec.yaml")
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn container(&self) -> String {
        format!("lessnat-web.{}", self.name)
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(LESSNAT);
        command
            .arg("--node")
            .arg(&self.name)
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--no-color")
            .args(args)
            .env_remove("LESSNAT_NODE")
            .env_remove("LESSNAT_STATE_DIR")
            .env_remove("NOTIFY_SOCKET");
        command
    }

    /// Starts an agent and waits until it is ready (its first run done).
    fn agent(&self) -> Process {
        let mut command = self.command(&[
            "agent",
            "--interval",
            "60s",
            "--metrics-addr",
            "127.0.0.1:0",
            "-f",
        ]);
        command.arg(self.spec());
        let mut agent = Process::spawn(command);
        agent.wait_line("Ready:", 1, FIRST_RUN);
        agent
    }

    /// Starts an agent following `url` (`spec.yaml` on `main`), running
    /// every `interval`; does not wait for it.
    fn repo_agent(&self, url: &str, interval: &str) -> Process {
        let command = self.command(&[
            "agent",
            "--interval",
            interval,
            "--metrics-addr",
            "127.0.0.1:0",
            "--repo",
            url,
            "--path",
            "spec.yaml",
        ]);
        Process::spawn(command)
    }

    fn status(&self) -> Value {
        let output = self
            .command(&["status", "--json"])
            .output()
            .expect("lessnat status");
        assert!(output.status.success(), "status: {output:?}");
        serde_json::from_slice(&output.stdout).expect("status JSON")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let destroy = self
            .command(&["destroy", "--auto-approve"])
            .stdin(Stdio::null())
            .output();
        if let Some(o) = destroy.as_ref().ok().filter(|o| !o.status.success()) {
            eprintln!(
                "cleanup: lessnat destroy --node {} failed: {}{}",
                self.name,
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        let _ = Command::new("docker")
            .args(["rm", "-f", &self.container()])
            .output();
    }
}

fn table_exists() -> bool {
    Command::new("nft")
        .args(["list", "table", "inet", "lessnat"])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn start_load(port: u16) -> Load {
    let load = Load::start(LoadConfig::new(port));
    load.wait_requests(32 * 20, BOUND).expect("the load runs");
    load
}

fn assert_no_failures(report: &Report, origin: Instant, what: &str) {
    let failed = report.failed();
    assert!(
        failed.is_empty(),
        "{what}: {} of {} requests failed: {}",
        failed.len(),
        report.samples.len(),
        report.summary(origin)
    );
}

/// The container's start time as Docker reports it, and whether it runs.
fn container_state(name: &str) -> (String, bool) {
    let output = support::run(
        "docker",
        &[
            "inspect",
            "--format",
            "{{.State.StartedAt}} {{.State.Running}}",
            name,
        ],
    );
    let text = String::from_utf8_lossy(&output.stdout);
    let mut words = text.split_whitespace();
    let started = words.next().unwrap_or_default().to_string();
    (started, words.next() == Some("true"))
}

// ---------------------------------------------------------------------------
// Tests

#[test]
fn agent_restores_a_deleted_table_under_load() {
    let Some(node) = Node::new("agent_restores_a_deleted_table_under_load") else {
        return;
    };
    let mut agent = node.agent();
    assert!(table_exists(), "the agent's first run made the table");
    let origin = Instant::now();
    let load = start_load(node.port);

    let deleted = Instant::now();
    support::run("nft", &["delete", "table", "inet", "lessnat"]);
    while !table_exists() {
        assert!(
            deleted.elapsed() < BOUND,
            "the table is still gone {BOUND:?} after its deletion:\n{}",
            agent.output()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let restored = Instant::now();
    let corrected = agent.wait_line("Drift corrected (table", 1, BOUND);
    load.wait_requests(32 * 20, BOUND).expect("the load runs");
    let report = load.stop();
    eprintln!(
        "table restored {:.3}s after its deletion (reported after {:.3}s); load: {}",
        (restored - deleted).as_secs_f64(),
        (corrected - deleted).as_secs_f64(),
        report.summary(origin)
    );
    assert_no_failures(&report, origin, "table deleted and restored under load");

    let metrics = agent.http_get("/metrics");
    assert!(
        metrics.starts_with("HTTP/1.1 200")
            && metrics.contains("lessnat_agent_drift_corrected_total{trigger=\"table\"} 1"),
        "/metrics counts the correction:\n{metrics}"
    );
    let healthz = agent.http_get("/healthz");
    assert!(healthz.starts_with("HTTP/1.1 200"), "/healthz:\n{healthz}");

    let status = node.status();
    let agent_view = &status["agent"];
    assert!(
        agent_view["running"]
            .as_str()
            .is_some_and(|r| r.contains("agent")),
        "status names the running agent: {agent_view}"
    );
    assert!(
        agent_view["drift_corrected"]["table"].as_u64() >= Some(1),
        "status counts the correction: {agent_view}"
    );
    let text = node.command(&["status"]).output().expect("status");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("(table)"), "{text}");
    assert!(text.contains("Drift corrected (table"), "{text}");

    let (status, output) = agent.end(nix::sys::signal::Signal::SIGTERM);
    assert!(
        status.success(),
        "the agent ends on SIGTERM: {status}\n{output}"
    );
    assert!(table_exists(), "a stopped agent leaves the table in place");
}

#[test]
fn kill_9_of_the_agent_drops_nothing_and_the_next_one_adopts() {
    let Some(node) = Node::new("kill_9_of_the_agent_drops_nothing_and_the_next_one_adopts") else {
        return;
    };
    let agent = node.agent();
    let origin = Instant::now();
    let load = start_load(node.port);
    let (status, output) = agent.end(nix::sys::signal::Signal::SIGKILL);
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "{output}"
    );
    load.wait_requests(32 * 20, BOUND)
        .expect("the load runs without the agent");
    let mut next = node.agent();
    next.wait_line("Adopted: the node already matches the spec", 1, BOUND);
    load.wait_requests(32 * 20, BOUND).expect("the load runs");
    let report = load.stop();
    eprintln!("load: {}", report.summary(origin));
    assert_no_failures(&report, origin, "kill -9 of the agent and a new one");
    let applied = next.lines_with("Converged");
    assert!(
        applied.is_empty(),
        "the new agent applied something: {applied:?}\n{}",
        next.output()
    );
}

#[test]
fn a_killed_container_is_restarted_by_the_agent() {
    let Some(node) = Node::new("a_killed_container_is_restarted_by_the_agent") else {
        return;
    };
    let mut agent = node.agent();
    let container = node.container();
    let (first_start, running) = container_state(&container);
    assert!(running, "{container} runs after the first run");

    let killed = Instant::now();
    support::run("docker", &["kill", &container]);
    let line = agent.wait_line("Drift corrected (container", 1, BOUND);
    eprintln!("corrected after {:.3}s", (line - killed).as_secs_f64());
    let (started, running) = container_state(&container);
    eprintln!(
        "{container} restarted {:.3}s after docker kill",
        killed.elapsed().as_secs_f64()
    );
    assert!(running, "{container} runs again:\n{}", agent.output());
    assert_ne!(started, first_start, "{container} was started again");
    let answer = support::load::request(0, node.port, "/", Duration::from_secs(5));
    assert!(answer.ok(), "the service answers again: {:?}", answer.error);
}

#[test]
fn a_second_agent_refuses_naming_the_first_and_apply_still_works() {
    let test = "a_second_agent_refuses_naming_the_first_and_apply_still_works";
    if !support::root_with(test, &["nft"]) || !support::docker(test) {
        return;
    }
    let netns = support::TestNetns::new("agent2");
    let dir = tempfile::tempdir().expect("temp dir");
    let spec = dir.path().join("spec.yaml");
    std::fs::write(
        &spec,
        "version: 1\nnodes:\n  - name: solo\n    address: 192.0.2.10\nservices: []\n",
    )
    .expect("write spec");
    let command = |args: &[&str]| {
        let mut command = Command::new(LESSNAT);
        command
            .arg("--netns")
            .arg(&netns.name)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--no-color")
            .args(args)
            .arg(&spec)
            .env_remove("LESSNAT_NODE")
            .env_remove("LESSNAT_STATE_DIR")
            .env_remove("NOTIFY_SOCKET");
        command
    };
    let mut first = Process::spawn(command(&["agent", "--interval", "60s", "-f"]));
    first.wait_line("Ready:", 1, FIRST_RUN);
    let second = command(&["agent", "-f"]).output().expect("second agent");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("another lessnat agent runs on this node")
            && stderr.contains(&format!("pid {}", first.pid())),
        "the second agent names the first: {stderr}"
    );
    let apply = command(&["apply", "--auto-approve", "-f"])
        .output()
        .expect("apply");
    assert!(
        apply.status.success(),
        "apply by hand while the agent runs: {}{}",
        String::from_utf8_lossy(&apply.stdout),
        String::from_utf8_lossy(&apply.stderr)
    );
    let (status, output) = first.end(nix::sys::signal::Signal::SIGTERM);
    assert!(status.success(), "{status}\n{output}");
}

/// The twin of `routed_dead_replica_leaves_the_spread_and_rejoins` in
/// `tests/routed.rs` with agents instead of applies on a timer: no request
/// that starts over 2 s after the kill fails (a dropped replica's unanswered
/// conntrack entries are deleted with the spread change), and the replica
/// rejoins once it answers again.
#[test]
fn agents_on_the_load_balancers_take_a_dead_replica_out_and_back() {
    let test = "agents_on_the_load_balancers_take_a_dead_replica_out_and_back";
    if !support::root_with(test, &["nft", "sysctl"]) || !support::docker(test) {
        return;
    }
    let site = Topology::new(2);
    let replicas = (0..2).map(|w| Replica::on(w, 5)).collect();
    let spec = site.write_spec("v1", &[Service::new("web", &test_image("v1"), replicas)]);
    site.apply_all(&spec);
    let worker = &site.workers[1];
    let containers = Topology::containers(worker);
    assert_eq!(containers.len(), 1, "containers: {containers:?}");
    let victim = &containers[0];
    let mut agents: Vec<Process> = site
        .lbs
        .iter()
        .map(|lb| {
            let mut command = Topology::lessnat(lb, &["agent", "--interval", "60s", "-f"]);
            command.arg(&spec).env_remove("NOTIFY_SOCKET");
            let mut agent = Process::spawn(command);
            agent.wait_line("Ready:", 1, FIRST_RUN);
            agent
        })
        .collect();

    let origin = Instant::now();
    // A connection to a dead replica is refused or never answered: a request
    // that takes over 1 s counts as failed.
    let loads = site.load(8, |config| LoadConfig {
        io_timeout: Duration::from_secs(1),
        ..config
    });
    for load in &loads {
        load.wait_requests(50, BOUND).expect("the load runs");
    }
    let killed = Instant::now();
    support::run("docker", &["kill", victim]);
    for (lb, agent) in site.lbs.iter().zip(&mut agents) {
        let out = agent.wait_line("Drift corrected (health", 1, BOUND);
        eprintln!(
            "{}: {victim} out of the spread {:.3}s after the kill",
            lb.name,
            (out - killed).as_secs_f64()
        );
    }
    std::thread::sleep(Duration::from_secs(4));
    support::run("docker", &["start", victim]);
    Topology::apply(worker, &spec);
    let rewired = Instant::now();
    for (lb, agent) in site.lbs.iter().zip(&mut agents) {
        let back = agent.wait_line("Drift corrected (health", 2, BOUND);
        eprintln!(
            "{}: {victim} back in the spread {:.3}s after its worker's apply",
            lb.name,
            (back.max(rewired) - rewired).as_secs_f64()
        );
    }
    for load in &loads {
        load.wait_requests(100, BOUND).expect("the load runs");
    }
    let report = Report::merged(loads.into_iter().map(Load::stop));
    let failed = report.failed();
    let late: Vec<_> = failed
        .iter()
        .filter(|s| s.start > killed + Duration::from_secs(2))
        .collect();
    eprintln!(
        "load: {}; failed: {} in all, {} later than 2 s after the kill",
        report.summary(origin),
        failed.len(),
        late.len()
    );
    let described: Vec<String> = late
        .iter()
        .map(|s| {
            format!(
                "client {} at +{:.2}s: {:?}",
                s.client,
                (s.start - killed).as_secs_f64(),
                s.error
            )
        })
        .collect();
    assert!(
        late.is_empty(),
        "requests failed later than 2 s after the kill (both LBs had taken {victim} out by then): {described:?}"
    );
    for agent in agents {
        let (status, output) = agent.end(nix::sys::signal::Signal::SIGTERM);
        assert!(status.success(), "{status}\n{output}");
    }
}

/// The agent following a Git repository: it applies the spec at the head,
/// a table deleted meanwhile is restored (re-planning the fetched commit), a
/// new commit is applied at the next interval, and status and metrics name
/// the commit. With the repository gone, the fetch fails, nothing stops, and
/// a deleted table is restored all the same.
#[test]
fn agent_follows_a_repository() {
    let test = "agent_follows_a_repository";
    if !has_git(test) {
        return;
    }
    let Some(node) = Node::new(test) else {
        return;
    };
    let upstream = Upstream::new();
    let spec = std::fs::read_to_string(node.spec()).expect("read spec");
    let first = upstream.commit(&spec, "first");
    let mut agent = node.repo_agent(&upstream.url(), "2s");
    agent.wait_line("Ready:", 1, FIRST_RUN);
    assert!(table_exists(), "the agent's first run made the table");
    assert!(container_state(&node.container()).1, "the service runs");
    assert_eq!(
        node.status()["agent"]["commit"].as_str(),
        Some(first.as_str()),
        "status names the commit"
    );
    let metrics = agent.http_get("/metrics");
    assert!(
        metrics.contains(&format!(
            "lessnat_applied_commit_info{{commit=\"{first}\"}} 1"
        )),
        "/metrics names the applied commit:\n{metrics}"
    );

    let deleted = Instant::now();
    support::run("nft", &["delete", "table", "inet", "lessnat"]);
    agent.wait_line("Drift corrected (table", 1, BOUND);
    assert!(table_exists(), "the table is back");
    eprintln!(
        "table restored and reported {:.3}s after its deletion",
        deleted.elapsed().as_secs_f64()
    );
    assert!(
        agent
            .lines_with("Re-planning the last fetched main")
            .iter()
            .any(|(at, _)| *at >= deleted),
        "the table event re-planned the fetched commit:\n{}",
        agent.output()
    );

    let (started, _) = container_state(&node.container());
    let second = upstream.commit(
        &spec.replace("stopTimeout: 2s", "stopTimeout: 3s"),
        "second",
    );
    assert_ne!(second, first, "the second commit differs");
    let pushed = Instant::now();
    while node.status()["agent"]["commit"].as_str() != Some(second.as_str())
        || node.status()["agent"]["last_run"]["outcome"].as_str() == Some("failed")
    {
        assert!(
            pushed.elapsed() < FIRST_RUN,
            "commit {second} not applied within {FIRST_RUN:?}:\n{}",
            agent.output()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "new commit reached the agent {:.3}s after the push (interval 2s); container started {started}",
        pushed.elapsed().as_secs_f64()
    );

    // The repository goes away: the interval's fetch fails, what runs keeps
    // running, and a deleted table is still restored from the fetched commit.
    let remote = upstream.dir.path().join("remote.git");
    std::fs::rename(&remote, upstream.dir.path().join("gone.git")).expect("hide the repository");
    agent.wait_line("Run failed (interval", 1, BOUND);
    assert!(
        container_state(&node.container()).1,
        "the service still runs"
    );
    assert!(table_exists(), "the table stays");
    let deleted = Instant::now();
    support::run("nft", &["delete", "table", "inet", "lessnat"]);
    agent.wait_line("Drift corrected (table", 2, BOUND);
    assert!(
        table_exists(),
        "the table is back while the repository is gone"
    );
    eprintln!(
        "repository gone: table restored and reported {:.3}s after its deletion",
        deleted.elapsed().as_secs_f64()
    );
    let (status, output) = agent.end(nix::sys::signal::Signal::SIGTERM);
    assert!(
        status.success(),
        "the agent ends on SIGTERM: {status}\n{output}"
    );
}

/// An agent whose repository cannot be reached at start says so, changes
/// nothing on the host, and converges once the repository is there.
#[test]
fn agent_waits_for_an_unreachable_repository() {
    let test = "agent_waits_for_an_unreachable_repository";
    if !has_git(test) {
        return;
    }
    let Some(node) = Node::new(test) else {
        return;
    };
    let upstream = Upstream::new();
    let missing = format!("file://{}", upstream.dir.path().join("later.git").display());
    let mut agent = node.repo_agent(&missing, "1s");
    agent.wait_line("Run failed (start", 1, FIRST_RUN);
    let exists = Command::new("docker")
        .args(["inspect", &node.container()])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(!exists, "nothing started while the repository is missing");
    let healthz = agent.http_get("/healthz");
    assert!(
        healthz.starts_with("HTTP/1.1 503") && healthz.contains("last run failed"),
        "/healthz says the fetch failed:\n{healthz}"
    );

    let spec = std::fs::read_to_string(node.spec()).expect("read spec");
    let head = upstream.commit(&spec, "first");
    upstream.git(&["clone", "--quiet", "--bare", "remote.git", "later.git"]);
    agent.wait_line(" applied in ", 1, FIRST_RUN);
    assert!(container_state(&node.container()).1, "the service runs");
    assert_eq!(
        node.status()["agent"]["commit"].as_str(),
        Some(head.as_str())
    );
    let (status, output) = agent.end(nix::sys::signal::Signal::SIGTERM);
    assert!(
        status.success(),
        "the agent ends on SIGTERM: {status}\n{output}"
    );
}

/// `-f` and `--repo` exclude each other, and `--repo` needs `--path`.
#[test]
fn agent_takes_one_spec_source() {
    let state = tempfile::tempdir().expect("state");
    for (args, expected) in [
        (
            &["-f", "spec.yaml", "--repo", "file:///x", "--path", "s.yaml"][..],
            "cannot be used with",
        ),
        (&["--repo", "file:///x"][..], "--path"),
        (&["--path", "s.yaml"][..], "--repo"),
        (&[][..], "--file"),
    ] {
        let output = Command::new(LESSNAT)
            .arg("--state-dir")
            .arg(state.path())
            .arg("agent")
            .args(args)
            .output()
            .expect("lessnat agent");
        let text = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success() && text.contains(expected),
            "{args:?}: {text}"
        );
    }
}
