//! `lessnat reconcile` against a real Git repository on disk: a bare
//! repository and a work repository made with the git CLI in a temporary
//! directory, fetched over `file://`.
//!
//! Without privileges: an invalid spec, a fetch failure and an unrelated
//! history are recorded (status, metrics, events) and change nothing; bad
//! arguments are refused; the systemd units verify. With root and Docker: the
//! whole life of a host-mode service driven from Git (install, upgrade under
//! load with no failed request, invalid spec, failed upgrade rolled back,
//! suspend, refused and allowed rollback, plan-only), and the loop with its
//! `/metrics` endpoint and SIGTERM. Traffic goes only to 127.0.0.1.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lessnat::gitops::fetch::{Mirror, Source};
use lessnat::gitops::reconcile::REPO_DIR;
use lessnat::gitops::record::{Applied, Record, RecordFile, Timestamp};
use lessnat::plan::Summary;
use serde_json::Value;
use support::git::{Upstream, has_git};

const LESSNAT: &str = env!("CARGO_BIN_EXE_lessnat");

/// lessnat with its own state directory and node.
struct Lessnat {
    state: tempfile::TempDir,
    node: String,
    /// `--netns` for every command, if any.
    netns: Option<String>,
}

impl Lessnat {
    fn new(node: &str) -> Lessnat {
        Lessnat {
            state: tempfile::tempdir().expect("state dir"),
            node: node.to_string(),
            netns: None,
        }
    }

    /// For tests that must stop before the host is read: a namespace that
    /// does not exist, so a run that wrongly got as far as observing or
    /// applying fails instead of touching this host's network.
    fn off_host(node: &str) -> Lessnat {
        Lessnat {
            netns: Some("/nonexistent/lessnat-test-netns".to_string()),
            ..Lessnat::new(node)
        }
    }

    fn state_dir(&self) -> &Path {
        self.state.path()
    }

    fn metrics_path(&self) -> PathBuf {
        self.state_dir().join("metrics").join("lessnat.prom")
    }

    fn events_path(&self) -> PathBuf {
        self.state_dir().join("events.jsonl")
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(LESSNAT);
        command
            .args(["--no-color", "--node", &self.node, "--state-dir"])
            .arg(self.state_dir());
        if let Some(netns) = &self.netns {
            command.args(["--netns", netns]);
        }
        command
            .args(args)
            .env_remove("LESSNAT_NODE")
            .env_remove("LESSNAT_STATE_DIR");
        command
    }

    fn run(&self, args: &[&str]) -> Output {
        let started = Instant::now();
        let output = self.command(args).output().expect("running lessnat");
        eprintln!(
            "lessnat {} -> {:?} in {:.1}s\n{}{}",
            args.join(" "),
            output.status.code(),
            started.elapsed().as_secs_f64(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }

    /// `lessnat reconcile` once, with metrics and events files in the state directory.
    fn reconcile(&self, upstream: &Upstream, extra: &[&str]) -> Output {
        let url = upstream.url();
        let metrics = self.metrics_path();
        let events = self.events_path();
        let mut args = vec![
            "reconcile",
            "--repo",
            &url,
            "--path",
            "spec.yaml",
            "--metrics-file",
            metrics.to_str().expect("utf-8 path"),
            "--events-file",
            events.to_str().expect("utf-8 path"),
        ];
        args.extend_from_slice(extra);
        self.run(&args)
    }

    fn status_json(&self) -> Value {
        let output = self.run(&["status", "--json"]);
        assert!(output.status.success());
        serde_json::from_slice(&output.stdout).expect("status JSON")
    }

    fn metrics(&self) -> String {
        std::fs::read_to_string(self.metrics_path()).expect("metrics file")
    }

    fn events(&self) -> Vec<Value> {
        std::fs::read_to_string(self.events_path())
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).expect("an event is one JSON line"))
            .collect()
    }

    /// The event kinds since the `skip` first ones.
    fn event_kinds(&self, skip: usize) -> Vec<String> {
        self.events()
            .iter()
            .skip(skip)
            .map(|e| e["event"].as_str().unwrap_or_default().to_string())
            .collect()
    }
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Whether `metrics` has exactly the sample line `line`.
fn has_sample(metrics: &str, line: &str) -> bool {
    metrics.lines().any(|l| l == line)
}

/// The value of a sample without labels.
fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.parse().ok())
    })
}

/// A host-mode spec for one service `demo` on `node`, running the test server.
fn host_spec(node: &str, image: &str, port: u16, temp: u16, extra: &str) -> String {
    format!(
        r#"version: 1
nodes:
  - name: {node}
    address: 192.0.2.1
services:
  - name: demo
    node: {node}
    image: {image}
    network: host
    command: ["--listen", "127.0.0.1:{{port}}"{extra}]
    ports:
      - {{ name: http, port: {port}, tempPort: {temp} }}
    health:
      http: {{ path: /healthz }}
      interval: 200ms
      timeout: 1s
      healthyAfter: 1
      startTimeout: 5s
    upgrade:
      strategy: redirect-drain
      drainTimeout: 10s
      onDrainTimeout: proceed
      onFailure: rollback
"#
    )
}

/// A spec whose only node runs nothing.
fn empty_spec(node: &str) -> String {
    format!("version: 1\nnodes:\n  - name: {node}\n    address: 192.0.2.1\nservices: []\n")
}

/// `spec` with `tempPort` misspelt; returns it with the misspelling's line and column.
fn misspelt(spec: &str) -> (String, usize, usize) {
    let bad = spec.replace("tempPort", "tempPrt");
    let (line, column) = bad
        .lines()
        .enumerate()
        .find_map(|(i, l)| l.find("tempPrt").map(|c| (i + 1, c + 1)))
        .expect("the misspelling");
    (bad, line, column)
}

// ---------------------------------------------------------------------------
// Without privileges

/// An invalid spec at a new commit: reported with its location in the
/// output, status, metrics and events; nothing else happens (it fails before
/// the host is even read); the same commit then backs off.
#[test]
fn invalid_spec_is_reported_everywhere_and_backs_off() {
    if !has_git("invalid_spec_is_reported_everywhere_and_backs_off") {
        return;
    }
    let upstream = Upstream::new();
    let (bad, line, column) = misspelt(&host_spec("web-1", "web:1", 8000, 18000, ""));
    let commit = upstream.commit(&bad, "typo");
    let lessnat = Lessnat::off_host("web-1");

    let output = lessnat.reconcile(&upstream, &[]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    let located = format!(
        "spec.yaml@{}:{line}:{column}: error: unknown field `tempPrt`",
        &commit[..12]
    );
    assert!(text(&output).contains(&located), "{}", text(&output));
    assert!(
        text(&output).contains("nothing was changed"),
        "{}",
        text(&output)
    );

    let status = lessnat.status_json();
    assert_eq!(status["last_run"]["outcome"], "failed");
    assert_eq!(status["last_run"]["stage"], "spec");
    assert_eq!(status["last_run"]["commit"], commit.as_str());
    assert_eq!(status["last_run"]["spec_errors"], 1);
    assert!(
        status["last_error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(&located)),
        "{status:#}"
    );
    assert_eq!(status["applied"], Value::Null);
    assert_eq!(status["backoff"]["consecutive_failures"], 1);
    let plain = lessnat.run(&["status"]);
    assert!(text(&plain).contains("failed at spec"), "{}", text(&plain));
    assert!(text(&plain).contains(&located), "{}", text(&plain));

    let metrics = lessnat.metrics();
    for line in [
        "lessnat_reconcile_failures_total 1",
        "lessnat_consecutive_failures 1",
        "lessnat_spec_errors 1",
        "lessnat_suspended 0",
        "lessnat_last_success_timestamp_seconds 0",
        "lessnat_last_run_info{outcome=\"failed\",stage=\"spec\"} 1",
    ] {
        assert!(has_sample(&metrics, line), "missing {line:?} in\n{metrics}");
    }
    assert_eq!(lessnat.event_kinds(0), ["fetched", "failed"]);
    let failed = &lessnat.events()[1];
    assert_eq!(failed["stage"], "spec");
    assert!(
        failed["error"]
            .as_str()
            .is_some_and(|e| e.contains(&located))
    );

    // The same commit is not tried again before its back-off; nothing is recorded.
    let again = lessnat.reconcile(&upstream, &[]);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        text(&again).contains("Not trying commit"),
        "{}",
        text(&again)
    );
    assert_eq!(lessnat.event_kinds(2), ["fetched", "backing-off"]);
    assert_eq!(lessnat.status_json()["totals"]["failures"], 1);

    // `resume` ends the back-off: the commit is tried (and fails) again.
    let resume = lessnat.run(&["resume"]);
    assert!(
        text(&resume).contains("Ended the back-off after 1 failed runs"),
        "{}",
        text(&resume)
    );
    let third = lessnat.reconcile(&upstream, &[]);
    assert_eq!(third.status.code(), Some(1));
    assert_eq!(lessnat.event_kinds(4), ["fetched", "failed"]);
    assert_eq!(lessnat.status_json()["backoff"]["consecutive_failures"], 1);
    assert!(has_sample(
        &lessnat.metrics(),
        "lessnat_reconcile_failures_total 2"
    ));

    // --plan-only reports the same error with exit code 1.
    let plan_only = lessnat.reconcile(&upstream, &["--plan-only"]);
    assert_eq!(plan_only.status.code(), Some(1));
}

/// A repository that cannot be fetched: a failure at the fetch stage.
#[test]
fn fetch_failure_is_recorded() {
    let lessnat = Lessnat::off_host("web-1");
    let missing = lessnat.state_dir().join("no-such-repository");
    let url = format!("file://{}", missing.display());
    let output = lessnat.run(&["reconcile", "--repo", &url, "--path", "spec.yaml"]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(
        text(&output).contains("no-such-repository"),
        "{}",
        text(&output)
    );
    let status = lessnat.status_json();
    assert_eq!(status["last_run"]["stage"], "fetch");
    assert_eq!(status["last_run"]["commit"], Value::Null);
    let plain = text(&lessnat.run(&["status"]));
    assert!(plain.contains("failed at fetch"), "{plain}");
    assert!(plain.contains("drift        unknown"), "{plain}");
    // The fetch backs off too: the next run does not even try.
    let again = lessnat.run(&["reconcile", "--repo", &url, "--path", "spec.yaml"]);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        text(&again).contains("Not trying the fetch again"),
        "{}",
        text(&again)
    );
    assert_eq!(lessnat.status_json()["totals"]["failures"], 1);
}

/// A commit with no common history with the last applied one is refused,
/// whatever it holds, and the refusal says what to check.
#[test]
fn unrelated_history_is_refused() {
    if !has_git("unrelated_history_is_refused") {
        return;
    }
    let first = Upstream::new();
    let applied = first.commit(&empty_spec("web-1"), "first repository");
    let other = Upstream::new();
    let unrelated = other.commit(&empty_spec("web-1"), "another repository");
    let lessnat = Lessnat::off_host("web-1");

    // The node was brought to `applied` from the first repository: its mirror
    // holds that commit, and the record names it.
    let mirror = Mirror::open_or_init(&lessnat.state_dir().join(REPO_DIR)).expect("mirror");
    let source = Source::new(&first.url(), "main", "spec.yaml").expect("source");
    let fetched = mirror
        .fetch(&source, &AtomicBool::new(false))
        .expect("fetch the first repository");
    assert_eq!(fetched.to_string(), applied);
    let records = RecordFile::in_dir(lessnat.state_dir());
    let mut record: Record = records.read().expect("record");
    record.applied = Some(Applied {
        commit: applied.clone(),
        at: Timestamp::now(),
        summary: Summary::default(),
    });
    records.write(&record).expect("record");

    for extra in [&[][..], &["--plan-only"][..]] {
        let output = lessnat.reconcile(&other, extra);
        assert_eq!(output.status.code(), Some(1), "{}", text(&output));
        let message = text(&output);
        assert!(message.contains("shares no history"), "{message}");
        assert!(message.contains(&other.url()), "{message}");
        assert!(message.contains("--allow-rollback"), "{message}");
    }
    let status = lessnat.status_json();
    assert_eq!(status["last_run"]["outcome"], "refused");
    assert_eq!(status["last_run"]["commit"], unrelated.as_str());
    assert_eq!(status["applied"]["commit"], applied.as_str());
    let refused = lessnat
        .events()
        .into_iter()
        .rfind(|e| e["event"] == "refused")
        .expect("a refused event");
    assert_eq!(refused["relation"], "unrelated");
    assert!(has_sample(
        &lessnat.metrics(),
        "lessnat_last_run_info{outcome=\"refused\"} 1"
    ));
}

#[test]
fn bad_arguments_are_refused_with_a_reason() {
    let lessnat = Lessnat::off_host("web-1");
    let cases: [(&[&str], &str); 4] = [
        (&["--interval", "0s"], "--interval 0s is too short"),
        (&["--jitter", "5s"], "--interval"),
        (&["--metrics-addr", "127.0.0.1:0"], "--interval"),
        (&["--interval", "ten"], "invalid duration"),
    ];
    for (extra, expected) in cases {
        let mut args = vec![
            "reconcile",
            "--repo",
            "file:///nowhere",
            "--path",
            "spec.yaml",
        ];
        args.extend_from_slice(extra);
        let output = lessnat.run(&args);
        assert_eq!(output.status.code(), Some(1), "{extra:?}");
        assert!(
            text(&output).contains(expected),
            "{extra:?}: {}",
            text(&output)
        );
    }
    for (reference, path, expected) in [
        (
            "main",
            "../spec.yaml",
            "is not a file path inside the repository",
        ),
        ("ma in", "spec.yaml", "is not a branch name or full ref"),
    ] {
        let output = lessnat.run(&[
            "reconcile",
            "--repo",
            "file:///nowhere",
            "--ref",
            reference,
            "--path",
            path,
        ]);
        assert_eq!(output.status.code(), Some(1));
        assert!(text(&output).contains(expected), "{}", text(&output));
    }
    assert!(
        !lessnat.state_dir().join("reconcile.json").exists(),
        "refused arguments record nothing"
    );
}

/// The example units pass `systemd-analyze verify` (with ExecStart pointing at
/// the binary under test, since verify checks that it exists).
#[test]
fn systemd_units_verify() {
    let available = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !available {
        eprintln!("SKIPPED systemd_units_verify: systemd-analyze is not installed");
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/systemd");
    let mut units = Vec::new();
    for name in ["lessnat-reconcile.service", "lessnat-reconcile.timer"] {
        let unit = std::fs::read_to_string(examples.join(name)).expect("unit");
        let path = dir.path().join(name);
        std::fs::write(&path, unit.replace("/usr/local/bin/lessnat", LESSNAT)).expect("copy");
        units.push(path);
    }
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .args(&units)
        .output()
        .expect("systemd-analyze");
    let said = text(&output);
    assert!(output.status.success(), "{said}");
    assert!(
        !said.contains("lessnat-reconcile"),
        "warnings about the units:\n{said}"
    );
}

// ---------------------------------------------------------------------------
// With root and Docker

/// Removes everything lessnat made for a node, also when the test panics.
struct Destroy<'a> {
    lessnat: &'a Lessnat,
}

impl Drop for Destroy<'_> {
    fn drop(&mut self) {
        let output = self.lessnat.run(&["destroy", "--auto-approve"]);
        if !output.status.success() {
            eprintln!("destroy failed: {}", text(&output));
        }
        for slot in ["", ".next", ".prev"] {
            let name = format!("lessnat-demo.{}{slot}", self.lessnat.node);
            let _ = Command::new("docker").args(["rm", "-f", &name]).output();
        }
    }
}

/// `GET /` on 127.0.0.1:`port`: the version that answered.
fn get_version(port: u16) -> Result<String, String> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("send: {e}"))?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| format!("read: {e}"))?;
    if !response.starts_with("HTTP/1.1 200") {
        return Err(format!("answer: {:?}", response.lines().next()));
    }
    response
        .split("\r\n\r\n")
        .nth(1)
        .map(|body| body.trim().to_string())
        .ok_or_else(|| "no body".to_string())
}

/// Clients that keep opening connections to a port until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    versions: Arc<Mutex<std::collections::BTreeSet<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(port: u16, clients: usize) -> Load {
        let load = Load {
            stop: Arc::default(),
            ok: Arc::default(),
            failures: Arc::default(),
            versions: Arc::default(),
            threads: Vec::new(),
        };
        let threads = (0..clients)
            .map(|_| {
                let (stop, ok) = (load.stop.clone(), load.ok.clone());
                let (failures, versions) = (load.failures.clone(), load.versions.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        match get_version(port) {
                            Ok(version) => {
                                ok.fetch_add(1, Ordering::SeqCst);
                                versions.lock().expect("versions").insert(version);
                            }
                            Err(error) => failures.lock().expect("failures").push(error),
                        }
                        // Paced, so loopback's ephemeral ports never run out.
                        std::thread::sleep(Duration::from_millis(50));
                    }
                })
            })
            .collect();
        Load { threads, ..load }
    }

    /// Waits until every client has been answered at least once.
    fn wait_warm(&self, clients: u64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.ok.load(Ordering::SeqCst) < clients * 2 {
            assert!(Instant::now() < deadline, "the load never got going");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the clients; returns (answered, failures, versions seen).
    fn stop(self) -> (u64, Vec<String>, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        for thread in self.threads {
            thread.join().expect("load client");
        }
        let failures = self.failures.lock().expect("failures").clone();
        let versions = self
            .versions
            .lock()
            .expect("versions")
            .iter()
            .cloned()
            .collect();
        (self.ok.load(Ordering::SeqCst), failures, versions)
    }
}

fn container_id(name: &str) -> String {
    let output = Command::new("docker")
        .args(["inspect", "--format", "{{.Id}}", name])
        .output()
        .expect("docker inspect");
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// The whole life of a service driven from Git, on the host network.
#[test]
fn reconcile_drives_a_host_service_from_git() {
    const TEST: &str = "reconcile_drives_a_host_service_from_git";
    if !support::root_with(TEST, &["nft"]) || !support::docker(TEST) || !has_git(TEST) {
        return;
    }
    let (v1, v2) = (
        support::image::test_image("v1"),
        support::image::test_image("v2"),
    );
    let _host = support::host_network();
    let (port, temp) = (support::free_port(), support::free_port());
    let node = format!("rc{}", std::process::id());
    let lessnat = Lessnat::new(&node);
    let _destroy = Destroy { lessnat: &lessnat };
    let upstream = Upstream::new();
    let primary = format!("lessnat-demo.{node}");

    // 1. v1 is committed: reconcile installs it.
    let c1 = upstream.commit(&host_spec(&node, &v1, port, temp, ""), "v1");
    let output = lessnat.reconcile(&upstream, &[]);
    assert!(output.status.success(), "{}", text(&output));
    assert_eq!(get_version(port).as_deref(), Ok("v1"));
    assert_eq!(lessnat.status_json()["applied"]["commit"], c1.as_str());
    assert!(has_sample(
        &lessnat.metrics(),
        &format!("lessnat_applied_commit_info{{commit=\"{c1}\"}} 1")
    ));
    assert_eq!(lessnat.event_kinds(0), ["fetched", "planned", "applied"]);

    // 2. v2 is committed: reconcile upgrades it while 32 clients keep connecting.
    let c2 = upstream.commit(&host_spec(&node, &v2, port, temp, ""), "v2");
    let load = Load::start(port, 32);
    load.wait_warm(32);
    let output = lessnat.reconcile(&upstream, &[]);
    let (answered, failures, versions) = load.stop();
    assert!(output.status.success(), "{}", text(&output));
    assert!(
        failures.is_empty(),
        "{} of {} requests failed during the upgrade, e.g. {:?}",
        failures.len(),
        answered + failures.len() as u64,
        &failures[..failures.len().min(5)]
    );
    assert_eq!(versions, ["v1", "v2"], "both versions answered");
    eprintln!("{answered} requests during the upgrade, none failed");
    assert_eq!(get_version(port).as_deref(), Ok("v2"));
    let metrics = lessnat.metrics();
    assert!(has_sample(
        &metrics,
        &format!("lessnat_applied_commit_info{{commit=\"{c2}\"}} 1")
    ));
    assert!(has_sample(&metrics, "lessnat_drift_changes 0"), "{metrics}");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("lessnat_upgrade_duration_seconds{service=\"demo\"} ")),
        "{metrics}"
    );
    assert!(sample(&metrics, "lessnat_apply_duration_seconds").is_some_and(|s| s > 0.0));
    assert!(sample(&metrics, "lessnat_last_success_timestamp_seconds").is_some_and(|s| s > 0.0));
    let applied = lessnat
        .events()
        .into_iter()
        .next_back()
        .expect("applied event");
    assert_eq!(applied["event"], "applied");
    assert_eq!(applied["summary"]["upgrade"], 1);
    assert_eq!(applied["node"], node.as_str());
    let serving = container_id(&primary);

    // 3. An invalid spec is committed: nothing changes; the failure is in status and metrics.
    let (bad, line, column) = misspelt(&host_spec(&node, &v1, port, temp, ""));
    let c3 = upstream.commit(&bad, "typo");
    let output = lessnat.reconcile(&upstream, &[]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    let located = format!(
        "spec.yaml@{}:{line}:{column}: error: unknown field `tempPrt`",
        &c3[..12]
    );
    assert!(text(&output).contains(&located), "{}", text(&output));
    assert_eq!(
        container_id(&primary),
        serving,
        "the container was not touched"
    );
    assert_eq!(get_version(port).as_deref(), Ok("v2"));
    let status = lessnat.status_json();
    assert_eq!(status["applied"]["commit"], c2.as_str());
    assert_eq!(status["last_run"]["stage"], "spec");
    let metrics = lessnat.metrics();
    assert!(
        has_sample(&metrics, "lessnat_reconcile_failures_total 1"),
        "{metrics}"
    );
    assert!(has_sample(&metrics, "lessnat_spec_errors 1"), "{metrics}");

    // 4. A new commit is tried at once despite the back-off; its upgrade never
    //    gets healthy and is rolled back: v2 keeps serving.
    let _c4 = upstream.commit(
        &host_spec(&node, &v1, port, temp, ", \"--unhealthy\""),
        "unhealthy v1",
    );
    let output = lessnat.reconcile(&upstream, &[]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(text(&output).contains("rolled back"), "{}", text(&output));
    assert_eq!(get_version(port).as_deref(), Ok("v2"));
    let metrics = lessnat.metrics();
    assert!(
        has_sample(&metrics, "lessnat_rollbacks_total 1"),
        "{metrics}"
    );
    assert!(
        has_sample(&metrics, "lessnat_consecutive_failures 2"),
        "{metrics}"
    );
    assert!(has_sample(
        &metrics,
        "lessnat_last_run_info{outcome=\"failed\",stage=\"apply\"} 1"
    ));

    // 5. Suspended: drift is reported, nothing is applied.
    let suspend = lessnat.run(&["suspend", "--reason", "test"]);
    assert!(suspend.status.success());
    let _c5 = upstream.commit(
        &host_spec(&node, &v2, port, temp, ", \"--grace\", \"5000\""),
        "v2 with a shorter grace",
    );
    let before = lessnat.events().len();
    let output = lessnat.reconcile(&upstream, &[]);
    assert!(output.status.success(), "{}", text(&output));
    assert_eq!(
        lessnat.event_kinds(before),
        ["fetched", "planned", "suspended"]
    );
    assert_eq!(
        container_id(&primary),
        serving,
        "nothing applied while suspended"
    );
    let status = lessnat.status_json();
    assert_eq!(status["last_run"]["outcome"], "suspended");
    assert_eq!(status["last_run"]["drift"], 1);
    assert_eq!(status["suspended"]["reason"], "test");
    let metrics = lessnat.metrics();
    assert!(has_sample(&metrics, "lessnat_suspended 1"), "{metrics}");
    assert!(has_sample(&metrics, "lessnat_drift_changes 1"), "{metrics}");
    let resume = lessnat.run(&["resume"]);
    assert!(text(&resume).contains("resumed"), "{}", text(&resume));

    // 6. The branch goes back to v1's commit: an ancestor of the applied one, refused.
    upstream.reset_to(&c1);
    let output = lessnat.reconcile(&upstream, &[]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(
        text(&output).contains("older than the last applied commit"),
        "{}",
        text(&output)
    );
    assert_eq!(get_version(port).as_deref(), Ok("v2"));
    let status = lessnat.status_json();
    assert_eq!(status["last_run"]["outcome"], "refused");
    assert_eq!(status["applied"]["commit"], c2.as_str());
    let refused = lessnat.events().into_iter().next_back().expect("event");
    assert_eq!(refused["event"], "refused");
    assert_eq!(refused["relation"], "ancestor");

    // 7. With --allow-rollback it is applied.
    let output = lessnat.reconcile(&upstream, &["--allow-rollback"]);
    assert!(output.status.success(), "{}", text(&output));
    assert_eq!(get_version(port).as_deref(), Ok("v1"));
    assert_eq!(lessnat.status_json()["applied"]["commit"], c1.as_str());
    assert!(
        lessnat
            .event_kinds(0)
            .contains(&"rollback-allowed".to_string())
    );

    // 8. --plan-only: 0 without drift, 2 with, and nothing applied.
    let output = lessnat.reconcile(&upstream, &["--plan-only"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    upstream.commit(&host_spec(&node, &v2, port, temp, ""), "v2 again");
    let output = lessnat.reconcile(&upstream, &["--plan-only"]);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    assert_eq!(get_version(port).as_deref(), Ok("v1"));
}

/// Loop mode in a namespace of its own: runs every second, serves /metrics,
/// backs off after a failure, picks up the fix, stops on SIGTERM.
#[test]
fn reconcile_loop_serves_metrics_and_stops_on_sigterm() {
    const TEST: &str = "reconcile_loop_serves_metrics_and_stops_on_sigterm";
    if !support::root_with(TEST, &["nft"]) || !support::docker(TEST) || !has_git(TEST) {
        return;
    }
    let netns = support::TestNetns::new("rcl");
    let node = format!("rcloop{}", std::process::id());
    let lessnat = Lessnat::new(&node);
    let upstream = Upstream::new();
    let c1 = upstream.commit(&empty_spec(&node), "nothing to run");
    let metrics_port = support::free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let url = upstream.url();
    let mut child = lessnat
        .command(&[
            "--netns",
            &netns.name,
            "reconcile",
            "--repo",
            &url,
            "--path",
            "spec.yaml",
            "--interval",
            "1s",
            "--jitter",
            "100ms",
            "--events",
            "json",
            "--metrics-addr",
            &metrics_addr,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn lessnat reconcile");
    /// Kills the loop if the test fails before SIGTERM.
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = child.stdout.take().expect("stdout");
    let stderr = child.stderr.take().expect("stderr");
    let mut child = Reap(child);
    let (sender, events) = std::sync::mpsc::channel::<Value>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let event = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("stdout carries only events, got {line:?}: {e}"));
            if sender.send(event).is_err() {
                break;
            }
        }
    });
    let people = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = BufReader::new(stderr).read_to_string(&mut text);
        text
    });
    let next = |kind: &str| -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let event = events
                .recv_timeout(left)
                .unwrap_or_else(|e| panic!("no {kind} event: {e}"));
            if event["event"] == kind {
                return event;
            }
        }
    };
    let scrape = || {
        let mut stream = TcpStream::connect(("127.0.0.1", metrics_port)).expect("connect");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
            .expect("send");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("read");
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        response
    };

    let in_sync = next("in-sync");
    assert_eq!(in_sync["commit"], c1.as_str());
    assert!(has_sample(
        &scrape(),
        &format!("lessnat_applied_commit_info{{commit=\"{c1}\"}} 1")
    ));

    // An invalid commit fails; the loop backs off (2 × 1s), then takes the fix.
    upstream.commit("version: 1\nnodes: oops\n", "broken");
    let failed = next("failed");
    // The back-off is counted from the failure, not from after the scrapes below.
    let failed_at = Instant::now();
    assert_eq!(failed["stage"], "spec");
    let metrics = scrape();
    assert!(
        has_sample(&metrics, "lessnat_reconcile_failures_total 1"),
        "{metrics}"
    );
    assert!(
        has_sample(&metrics, "lessnat_consecutive_failures 1"),
        "{metrics}"
    );
    let c3 = upstream.commit(&empty_spec(&node), "fixed");
    let fixed = next("in-sync");
    assert_eq!(fixed["commit"], c3.as_str());
    assert!(
        failed_at.elapsed() >= Duration::from_millis(1500),
        "the loop waited for the back-off"
    );
    assert!(has_sample(&scrape(), "lessnat_consecutive_failures 0"));

    // /metrics reads the state directory: a suspension shows at once.
    assert!(lessnat.run(&["suspend"]).status.success());
    assert!(has_sample(&scrape(), "lessnat_suspended 1"));
    next("suspended");

    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.0.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the loop did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "exit status {status:?}");
    let said = people.join().expect("stderr reader");
    assert!(said.contains("Serving metrics at http://"), "{said}");
    assert!(said.contains("Reconciling every 1s"), "{said}");
}
