//! `lessnat demo` through the binary, as root with Docker: its JSON summary
//! (redirect-drain: no failed request among at least 1,000; every
//! long-lived connection finished on the version that accepted it), and
//! nothing left behind, after a full run and after SIGINT during the upgrade.
//! The same for `lessnat demo --routed` (no failed request among at least
//! 500, every replica saw the real client address with lessnat and none
//! behind the masquerading load balancer; no namespace left).
//!
//! The runs share the demo images (and the host-mode ones lessnat's table in
//! the host namespace), so they run one at a time (a lock in this binary).

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::topology::{output_within, show};

const LESSNAT: &str = env!("CARGO_BIN_EXE_lessnat");
/// A demo run takes about a minute; more on a busy machine.
const TIMEOUT: Duration = Duration::from_secs(300);

fn demo() -> Command {
    let mut command = Command::new(LESSNAT);
    command.arg("demo");
    command
}

/// Whether the root and Docker the demo needs are here (else the test skips,
/// or fails under `LESSNAT_REQUIRE_PRIVILEGED=1`); the lock that keeps demo
/// runs apart.
fn privileged(test: &str) -> Option<MutexGuard<'static, ()>> {
    static SERIAL: Mutex<()> = Mutex::new(());
    if !support::root_with(test, &["nft", "docker"]) || !support::docker(test) {
        return None;
    }
    Some(SERIAL.lock().unwrap_or_else(PoisonError::into_inner))
}

/// Runs `lessnat demo ARGS` to the end; asserts it succeeded; its JSON
/// summary and its output.
fn json_run(args: &[&str]) -> (Value, Output) {
    let mut command = demo();
    command.args(args);
    let started = Instant::now();
    let output = output_within(command, TIMEOUT);
    eprintln!(
        "lessnat demo {} took {:.1}s",
        args.join(" "),
        started.elapsed().as_secs_f64()
    );
    assert!(output.status.success(), "{}", show(&output));
    let summary = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("JSON summary: {e}\n{}", show(&output)));
    (summary, output)
}

/// Asserts that nothing shared of the demo run by process `pid` is left:
/// containers of its nodes (named `demo-PID` or `ROLE-demo-PID`), the demo
/// images, the state directories of `nodes`.
fn assert_no_containers_images_or_state(pid: u32, nodes: &[String]) {
    let containers = support::run(
        "docker",
        &[
            "ps",
            "-a",
            "--filter",
            "label=io.lessnat.service",
            "--format",
            "{{.Names}}",
        ],
    );
    let node = format!("demo-{pid}");
    let left: Vec<String> = String::from_utf8_lossy(&containers.stdout)
        .lines()
        .filter(|name| {
            name.split('.')
                .nth(1)
                .is_some_and(|n| n == node || n.ends_with(&format!("-{node}")))
        })
        .map(str::to_string)
        .collect();
    assert!(left.is_empty(), "containers left: {left:?}");
    let images = support::run("docker", &["images", "-q", "lessnat-demo"]);
    assert!(
        images.stdout.is_empty(),
        "demo images left: {}",
        String::from_utf8_lossy(&images.stdout)
    );
    let state_dirs: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .expect("the temporary directory")
        .filter_map(Result::ok)
        .filter(|entry| nodes.iter().any(|node| entry.path().join(node).exists()))
        .collect();
    assert!(state_dirs.is_empty(), "state left: {state_dirs:?}");
}

/// Asserts that nothing of the host-mode demo run by process `pid` is left:
/// its containers, the demo images, lessnat's table, its state directory.
fn assert_nothing_left(pid: u32) {
    assert_no_containers_images_or_state(pid, &[format!("demo-{pid}")]);
    // Another user of the host namespace could make the table right after the
    // demo: look while holding the lock they take.
    let _host = support::host_network();
    let table = Command::new("nft")
        .args(["list", "table", "inet", "lessnat"])
        .output()
        .expect("nft");
    assert!(
        !table.status.success(),
        "lessnat's table is left:\n{}",
        String::from_utf8_lossy(&table.stdout)
    );
}

#[test]
fn demo_reports_no_failure_and_cleans_up_also_on_sigint() {
    let Some(_serial) = privileged("demo_reports_no_failure_and_cleans_up_also_on_sigint") else {
        return;
    };

    // A full run, with --json.
    let (summary, output) = json_run(&["--json"]);
    let rd = &summary["redirect_drain"];
    assert_eq!(rd["failed"], 0, "{summary:#}");
    assert!(rd["requests"].as_u64().unwrap() >= 1000, "{summary:#}");
    assert!(rd["long_lived"].as_u64().unwrap() > 0, "{summary:#}");
    assert_eq!(rd["long_lived_ok"], rd["long_lived"], "{summary:#}");
    assert!(rd["upgrade_seconds"].as_f64().unwrap() > 0.0, "{summary:#}");
    assert!(summary["stop_start"]["requests"].as_u64().unwrap() > 0);
    eprintln!("{summary:#}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("stage 2/7 redirect"), "{}", show(&output));
    // The child's pid is not known through output_within: find its node in the output.
    let pid = stderr
        .split("(node demo-")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no node name in the output:\n{}", show(&output)));
    assert_nothing_left(pid);

    // SIGINT during the redirect-drain upgrade.
    let pid = interrupted(&[], "stage 1/7 start-next");
    assert_nothing_left(pid);
}

/// Runs `lessnat demo ARGS`, sends it SIGINT half a second after it printed
/// a line containing `marker`, and asserts that it says it was interrupted
/// and cleaned up, and exits 1; returns its pid.
fn interrupted(args: &[&str], marker: &str) -> u32 {
    let mut child = demo()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("lessnat demo");
    let pid = child.id();
    let stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut seen = Vec::new();
    let mut lines = stdout.lines();
    for line in lines.by_ref() {
        let line = line.expect("a line of output");
        seen.push(line.clone());
        if line.contains(marker) {
            break;
        }
    }
    assert!(
        seen.last().is_some_and(|l| l.contains(marker)),
        "no line with {marker:?}:\n{}",
        seen.join("\n")
    );
    std::thread::sleep(Duration::from_millis(500));
    let pid_t = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("a pid"));
    nix::sys::signal::kill(pid_t, nix::sys::signal::Signal::SIGINT).expect("SIGINT");
    let rest = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>());
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("lessnat demo did not end after SIGINT");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    let _ = std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr);
    seen.extend(rest.join().expect("the output reader"));
    let output = format!("{}\n--- stderr ---\n{stderr}", seen.join("\n"));
    assert_eq!(status.code(), Some(1), "{output}");
    assert!(stderr.contains("interrupted"), "{output}");
    assert!(output.contains("Cleaning up"), "{output}");
    pid
}

#[test]
fn routed_demo_shows_real_client_addresses_and_cleans_up_also_on_sigint() {
    let Some(_serial) = privileged("routed_demo_shows_real_client_addresses") else {
        return;
    };
    let (summary, output) = json_run(&["--routed", "--json"]);
    eprintln!("{summary:#}");
    let routed = &summary["routed"];
    assert_eq!(routed["failed"], 0, "{summary:#}");
    assert!(routed["requests"].as_u64().unwrap() >= 500, "{summary:#}");
    assert_eq!(routed["real_client_share"], 1.0, "{summary:#}");
    assert_eq!(
        summary["masquerade"]["real_client_share"], 0.0,
        "{summary:#}"
    );
    // The child's pid is not known through output_within: find it in the
    // namespaces' names.
    let stderr = String::from_utf8_lossy(&output.stderr);
    let pid = stderr
        .split("namespaces lessnat-demo-")
        .nth(1)
        .and_then(|rest| rest.split('-').next())
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no namespace names in the output:\n{}", show(&output)));
    assert_routed_nothing_left(pid);

    // SIGINT while the clients send through lessnat.
    let pid = interrupted(&["--routed"], "==> lessnat:");
    assert_routed_nothing_left(pid);
}

/// Asserts that nothing of the routed demo run by process `pid` is left:
/// its namespaces, containers, the demo images, its nodes' state.
fn assert_routed_nothing_left(pid: u32) {
    let nodes: Vec<String> = ["lb1", "lb2", "w1", "w2"]
        .iter()
        .map(|role| format!("{role}-demo-{pid}"))
        .collect();
    assert_no_containers_images_or_state(pid, &nodes);
    let namespaces = support::run("ip", &["netns", "list"]);
    let prefix = format!("lessnat-demo-{pid}-");
    let left: Vec<String> = String::from_utf8_lossy(&namespaces.stdout)
        .lines()
        .filter(|line| line.starts_with(&prefix))
        .map(str::to_string)
        .collect();
    assert!(left.is_empty(), "namespaces left: {left:?}");
}
