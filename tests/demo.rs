//! `lessnat demo` through the binary, as root with Docker: its JSON summary
//! (redirect-drain: no failed request among at least 1,000; every
//! long-lived connection finished on the version that accepted it), and
//! nothing left behind, after a full run and after SIGINT during the upgrade.
//!
//! Both runs are in one test: they share the demo images and lessnat's table
//! in the host namespace, so they must not overlap.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
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

/// Asserts that nothing of the demo run by process `pid` is left: its
/// containers, the demo images, lessnat's table, its state directory.
fn assert_nothing_left(pid: u32) {
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
    let node = format!(".demo-{pid}");
    let left: Vec<String> = String::from_utf8_lossy(&containers.stdout)
        .lines()
        .filter(|name| name.contains(&node))
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
        .filter(|entry| entry.path().join(format!("demo-{pid}")).exists())
        .collect();
    assert!(state_dirs.is_empty(), "state left: {state_dirs:?}");
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
    let name = "demo_reports_no_failure_and_cleans_up_also_on_sigint";
    if !support::root_with(name, &["nft", "docker"]) || !support::docker(name) {
        return;
    }

    // A full run, with --json.
    let mut command = demo();
    command.arg("--json");
    let started = Instant::now();
    let output = output_within(command, TIMEOUT);
    eprintln!(
        "lessnat demo --json took {:.1}s",
        started.elapsed().as_secs_f64()
    );
    assert!(output.status.success(), "{}", show(&output));
    let summary: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("JSON summary: {e}\n{}", show(&output)));
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
    let mut child = demo()
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
        if line.contains("stage 1/7 start-next") {
            break;
        }
    }
    assert!(
        seen.last().is_some_and(|l| l.contains("start-next")),
        "the upgrade did not start:\n{}",
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
    assert_nothing_left(pid);
}
