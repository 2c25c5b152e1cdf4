//! Fleet rollouts end to end (`docs/cluster.md`, "Rollouts"): a real
//! three-member etcd on loopback (`support::etcd`), the routed site in
//! network namespaces (`support::topology`: two clients, two load-balancer
//! nodes, two workers) with containers of the test server, and `lessnat
//! agent` as the real binary on every node, under load from both clients.
//! The service rolls out one node at a time, one canary node first:
//!
//! - a version whose health check never passes (the test server with
//!   `--unhealthy`): exactly one worker (the canary) starts it, rolls back
//!   (its old replica keeps serving) and marks it bad in etcd; the other
//!   worker never creates a container of it, and its plan says the version
//!   is bad;
//! - the next, good version: the canary upgrades first, the other worker
//!   takes the slot only after the canary is done and its hold has passed;
//! - no request fails through either.
//!
//! And a canary whose version is healthy at first and turns unhealthy during
//! its hold (the test server's `--unhealthy-file`, the file copied into the
//! canary's container once it is done): the other worker, waiting for the
//! hold, marks the version bad in etcd, naming the canary's replica, and
//! never creates a container of it; the canary keeps running it (out of the
//! spreads); no request fails.
//!
//! And without Docker: taking a slot is atomic (three workers at once, one
//! slot), a version marked bad gets none, a node takes over the slot it
//! holds, and a slot no longer kept alive frees itself.
//!
//! Timings are printed, not asserted (the hold is a lower bound).

mod support;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lessnat::backend::etcd::{Etcd, Expect, KeyChange, Snapshot};
use lessnat::cluster::config::etcd_config;
use lessnat::cluster::keys::{BadRecord, Keys, RolloutKey, SlotRecord};
use lessnat::cluster::rollout::{Held, Taken, Turn};
use serde_json::Value;
use support::cluster_site::{ClusterSite, load_through};
use support::etcd::EtcdCluster;
use support::image::test_image;
use support::load::{Load, Report};
use support::process::Process;
use support::topology::{Node, Topology, output_within, show};

/// The longest the test waits for something that takes a few seconds.
const BOUND: Duration = Duration::from_secs(60);

/// The canary's hold in the spec.
const HOLD: Duration = Duration::from_secs(4);

/// The canary's hold when the test turns the canary unhealthy during it:
/// long enough for the canary's registration and the other worker's mark
/// (a few seconds) to come well before it ends, even on a loaded machine.
const LONG_HOLD: Duration = Duration::from_secs(30);

/// The file whose existence makes the test server's health check fail.
const UNHEALTHY_FILE: &str = "/unhealthy";

/// What the service's health check does at a version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Health {
    /// Passes.
    Passes,
    /// Never passes.
    Fails,
    /// Passes until [`UNHEALTHY_FILE`] exists in the container.
    FailsOnceTheFileExists,
}

/// The site with etcd (`ClusterSite`, lease TTL 2 s) and the spec's path.
struct Site {
    cluster: ClusterSite,
    spec: PathBuf,
}

impl Site {
    /// `None` (skipped) without root, the tools or Docker.
    fn new(test: &str) -> Option<Site> {
        let mut cluster = ClusterSite::new(test, 2, 2)?;
        cluster.etcd.wait_healthy();
        let mut site = Site {
            cluster,
            spec: PathBuf::new(),
        };
        site.spec = site.write_spec(&test_image("v1"), Health::Passes, HOLD);
        site.cluster.site.apply_all(&site.spec);
        Some(site)
    }

    /// Writes the spec with the service's `image` (its health check as
    /// `health` says) and a rollout of one node at a time after one canary
    /// node held for `hold`; returns its path.
    fn write_spec(&self, image: &str, health: Health, hold: Duration) -> PathBuf {
        let spec = self.cluster.write_spec("spec", image, None);
        let text = std::fs::read_to_string(&spec).expect("spec");
        let rollout = format!(
            "      stopTimeout: 5s\n      rollout: {{ maxParallel: 1, canary: {{ nodes: 1, hold: {}s }} }}\n",
            hold.as_secs()
        );
        let mut text = text
            .replacen("      stopTimeout: 5s\n", &rollout, 1)
            .replacen("startTimeout: 20s", "startTimeout: 6s", 1);
        let flag = match health {
            Health::Passes => String::new(),
            Health::Fails => "\"--unhealthy\", ".to_string(),
            Health::FailsOnceTheFileExists => {
                format!("\"--unhealthy-file\", \"{UNHEALTHY_FILE}\", ")
            }
        };
        text = text.replacen("\"--udp\"", &format!("{flag}\"--udp\""), 1);
        assert!(text.contains("rollout:"), "{text}");
        std::fs::write(&spec, text).expect("write spec");
        spec
    }

    /// Waits until the rollout keys satisfy `done`; the last read.
    fn wait_rollouts(&self, what: &str, done: impl Fn(&Keys, &Snapshot) -> bool) -> Snapshot {
        let (etcd, keys) = (self.cluster.client(), self.cluster.keys());
        let deadline = Instant::now() + BOUND;
        loop {
            if let Ok(read) = etcd.get_prefix(&keys.rollouts())
                && done(&keys, &read)
            {
                return read;
            }
            assert!(Instant::now() < deadline, "{what} within {BOUND:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts the agents (the workers' every 1 s, the LBs' every 60 s) and
    /// load from both clients, and waits until the load runs.
    fn run(&self) -> Running {
        let agents = |nodes: &[Node], interval: &str| -> Vec<Process> {
            let agent = |node| ClusterSite::agent(node, &self.spec, interval);
            nodes.iter().map(agent).collect()
        };
        let mut agents_started = agents(&self.cluster.site.workers, "1s");
        agents_started.extend(agents(&self.cluster.site.lbs, "60s"));
        let origin = Instant::now();
        let running = Running {
            agents: agents_started,
            loads: (0..2)
                .map(|client| load_through(&self.cluster.site, client, 8))
                .collect(),
            origin,
        };
        for load in &running.loads {
            load.wait_requests(50, BOUND).expect("the load runs");
        }
        running
    }

    /// The worker named `canary`, and the other one.
    fn canary_and_other(&self, canary: &str) -> (&Node, &Node) {
        let workers = &self.cluster.site.workers;
        match workers.iter().position(|w| w.name == canary) {
            Some(0) => (&workers[0], &workers[1]),
            Some(_) => (&workers[1], &workers[0]),
            None => panic!("{canary} is not a worker"),
        }
    }

    /// The plan of `node` (`lessnat plan`), as text.
    fn plan(&self, node: &Node) -> String {
        Topology::plan_exit(node, &self.spec).1
    }
}

/// The agents of every node and the load from both clients.
struct Running {
    agents: Vec<Process>,
    loads: Vec<Load>,
    origin: Instant,
}

impl Running {
    /// Stops the load once it ran a little longer, and the agents; asserts
    /// no request through `what` failed and no agent panicked.
    fn stop(self, what: &str) {
        for load in &self.loads {
            load.wait_requests(100, BOUND).expect("the load runs");
        }
        let report = Report::merged(self.loads.into_iter().map(Load::stop));
        eprintln!("load through {what}: {}", report.summary(self.origin));
        assert!(report.failed().is_empty(), "{:?}", report.failed());
        for agent in self.agents {
            let (_, output) = agent.end(nix::sys::signal::Signal::SIGTERM);
            assert!(!output.contains("panicked"), "{output}");
        }
    }
}

/// The `bad` record in `read` (there must be one).
fn bad_of(keys: &Keys, read: &Snapshot) -> BadRecord {
    read.entries
        .iter()
        .find(|e| matches!(keys.rollout_of(&e.key), Some(RolloutKey::Bad { .. })))
        .and_then(|e| serde_json::from_slice(&e.value).ok())
        .expect("a bad record")
}

/// The rollout keys of kind `kind` (`"slot"`, `"done"`, `"bad"`) in `read`.
fn count(keys: &Keys, read: &Snapshot, kind: &str) -> usize {
    read.entries
        .iter()
        .filter(|e| {
            matches!(
                (keys.rollout_of(&e.key), kind),
                (Some(RolloutKey::Slot { .. }), "slot")
                    | (Some(RolloutKey::Done { .. }), "done")
                    | (Some(RolloutKey::Bad { .. }), "bad")
            )
        })
        .count()
}

/// When a node first took a slot, and when it was first done.
type Taking = (Option<Instant>, Option<Instant>);

/// Every change to the rollout keys, with the instant it was seen.
struct RolloutClock {
    seen: Arc<Mutex<Vec<(Instant, KeyChange)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RolloutClock {
    fn start(etcd: Etcd, keys: Keys) -> RolloutClock {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut revision = etcd.get_prefix(&keys.rollouts()).expect("read").revision;
        let (into, stopped) = (Arc::clone(&seen), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            let mut watch = None;
            while !stopped.load(Ordering::SeqCst) {
                // A broken watch starts again after the last revision seen.
                let Some(current) = watch.as_mut() else {
                    watch = etcd.watch_prefix(&keys.rollouts(), revision + 1).ok();
                    continue;
                };
                match current.next(Duration::from_millis(100)) {
                    Ok(Some((at_revision, changes))) => {
                        let at = Instant::now();
                        revision = revision.max(at_revision);
                        let mut seen = into.lock().expect("clock");
                        seen.extend(changes.into_iter().map(|c| (at, c)));
                    }
                    Ok(None) => {}
                    Err(error) => {
                        eprintln!("the test's watch of the rollout keys broke: {error}");
                        watch = None;
                    }
                }
            }
        });
        RolloutClock {
            seen,
            stop,
            thread: Some(thread),
        }
    }

    /// When `node` first took a slot, and when it was first done.
    fn turn_of(&self, keys: &Keys, node: &str) -> Taking {
        let seen = self.seen.lock().expect("clock");
        let first = |wanted: &dyn Fn(&KeyChange) -> bool| {
            seen.iter().find(|(_, c)| wanted(c)).map(|(at, _)| *at)
        };
        let took = first(&|c| match c {
            KeyChange::Put(e) => {
                matches!(keys.rollout_of(&e.key), Some(RolloutKey::Slot { .. }))
                    && serde_json::from_slice::<SlotRecord>(&e.value).is_ok_and(|r| r.node == node)
            }
            KeyChange::Delete { .. } => false,
        });
        let done = first(&|c| match c {
            KeyChange::Put(e) => matches!(
                keys.rollout_of(&e.key),
                Some(RolloutKey::Done { node: n, .. }) if n == node
            ),
            KeyChange::Delete { .. } => false,
        });
        (took, done)
    }
}

impl Drop for RolloutClock {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Names of the containers created from `image` since `since` (Unix
/// seconds) until now, of the nodes `nodes`.
fn created_from(image: &str, since: u64, nodes: &[&Node]) -> Vec<String> {
    let until = (unix_now() + 1).to_string();
    let output = support::run(
        "docker",
        &[
            "events",
            "--since",
            &since.to_string(),
            "--until",
            &until,
            "--filter",
            "event=create",
            "--filter",
            &format!("image={image}"),
            "--format",
            "{{.Actor.Attributes.name}}",
        ],
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|name| nodes.iter().any(|n| name.contains(&format!(".{}", n.name))))
        .map(str::to_string)
        .collect()
}

/// The images of `worker`'s containers, by name.
fn images(worker: &Node) -> Vec<(String, String)> {
    Topology::containers(worker)
        .into_iter()
        .map(|name| {
            let output = support::run("docker", &["inspect", "-f", "{{.Config.Image}}", &name]);
            let image = String::from_utf8_lossy(&output.stdout).trim().to_string();
            (name, image)
        })
        .collect()
}

#[test]
fn a_canary_that_never_becomes_healthy_marks_its_version_bad_and_the_next_one_rolls_out_canary_first()
 {
    let test = "a_canary_that_never_becomes_healthy_marks_its_version_bad";
    let Some(site) = Site::new(test) else {
        return;
    };
    let keys = site.cluster.keys();
    let running = site.run();
    let started = unix_now();
    let bad_image = test_image("v2");
    let good_image = test_image("v3");

    // A version whose health check never passes.
    site.write_spec(&bad_image, Health::Fails, HOLD);
    let read = site.wait_rollouts("the version marked bad", |keys, read| {
        count(keys, read, "bad") == 1 && count(keys, read, "slot") == 0
    });
    let bad = bad_of(&keys, &read);
    eprintln!(
        "marked bad by {} {:.1}s after the spec changed: {}",
        bad.node,
        running.origin.elapsed().as_secs_f64(),
        bad.reason
    );
    assert_eq!(count(&keys, &read, "done"), 0, "nobody is done with it");
    let (canary, other) = site.canary_and_other(&bad.node);
    assert!(bad.reason.contains("not healthy"), "{}", bad.reason);
    // The other worker's plan says why it does not start the version.
    let plan = site.plan(other);
    assert!(
        plan.contains(&format!("was marked bad by {}", canary.name))
            && plan.contains("change the spec to try again"),
        "{plan}"
    );
    // A few more runs of both agents: still nothing of the bad version.
    std::thread::sleep(Duration::from_secs(3));
    let bad_created = created_from(&bad_image, started, &[canary, other]);
    assert_eq!(bad_created.len(), 1, "{bad_created:?}");
    assert!(
        bad_created[0].contains(&canary.name) && bad_created[0].ends_with(".next"),
        "{bad_created:?}"
    );
    // The canary's old replica serves on.
    for worker in [canary, other] {
        let found = images(worker);
        assert_eq!(found.len(), 1, "{}: {found:?}", worker.name);
        assert_eq!(found[0].1, test_image("v1"), "{}: {found:?}", worker.name);
    }

    // A good version: the canary first, the other after the hold.
    let clock = RolloutClock::start(site.cluster.client(), keys.clone());
    let good_at = Instant::now();
    site.write_spec(&good_image, Health::Passes, HOLD);
    site.wait_rollouts("both workers done with the good version", |keys, read| {
        count(keys, read, "done") == 2 && count(keys, read, "slot") == 0
    });
    eprintln!(
        "both workers upgraded {:.1}s after the spec changed",
        good_at.elapsed().as_secs_f64()
    );
    // Each worker's turn (when it took a slot, when it was done), in order.
    let mut turns: Vec<(&str, Taking)> = site
        .cluster
        .site
        .workers
        .iter()
        .map(|w| (w.name.as_str(), clock.turn_of(&keys, &w.name)))
        .collect();
    turns.sort_by_key(|(_, (took, _))| *took);
    let [
        (first, (Some(_), Some(first_done))),
        (second, (Some(second_took), _)),
    ] = turns[..]
    else {
        panic!(
            "a slot or done not seen: {turns:?}; seen: {:#?}",
            clock.seen.lock().expect("clock")
        );
    };
    let gap = second_took.saturating_duration_since(first_done);
    eprintln!(
        "the second worker took the slot {:.1}s after the canary was done (hold {HOLD:?})",
        gap.as_secs_f64()
    );
    assert!(
        second_took > first_done && gap + Duration::from_millis(500) >= HOLD,
        "the second worker started {gap:?} after the canary was done, hold {HOLD:?}"
    );
    assert!(
        created_from(&bad_image, started, &[other]).is_empty(),
        "the other worker created a container of the bad version"
    );
    for worker in &site.cluster.site.workers {
        let found = images(worker);
        assert_eq!(found.len(), 1, "{}: {found:?}", worker.name);
        assert_eq!(found[0].1, good_image, "{}: {found:?}", worker.name);
    }

    // `status --cluster` shows the rollout.
    let mut command = Topology::lessnat(
        &site.cluster.site.lbs[0],
        &["status", "--cluster", "--json", "--spec"],
    );
    command.arg(&site.spec);
    let output = output_within(command, BOUND);
    assert!(output.status.success(), "{}", show(&output));
    let status: Value = serde_json::from_slice(&output.stdout).expect("status JSON");
    let rollout = &status["rollouts"][0];
    assert_eq!(rollout["service"], "web", "{status:#}");
    assert_eq!(rollout["bad"][0]["node"], Value::from(bad.node.clone()));
    let done: Vec<(&String, &Value)> = rollout["done"]
        .as_object()
        .expect("done by version")
        .iter()
        .collect();
    assert_eq!(done.len(), 1, "{rollout:#}");
    let (version, nodes) = done[0];
    assert_eq!(nodes, &serde_json::json!([first, second]), "{rollout:#}");

    let mut command = Topology::lessnat(
        &site.cluster.site.lbs[0],
        &["status", "--cluster", "--spec"],
    );
    command.arg(&site.spec);
    let text = show(&output_within(command, BOUND));
    eprintln!("{text}");
    let marked = format!("marked by {}", bad.node);
    let both = format!("done       {version}: {first}, {second}");
    assert!(
        text.contains("rollout      web") && text.contains(&marked) && text.contains(&both),
        "{text}"
    );
    drop(clock);
    running.stop("the rollouts");
}

#[test]
fn a_canary_that_turns_unhealthy_during_its_hold_marks_its_version_bad_and_the_other_worker_never_starts_it()
 {
    let test = "a_canary_that_turns_unhealthy_during_its_hold";
    let Some(site) = Site::new(test) else {
        return;
    };
    let keys = site.cluster.keys();
    // A tag of its own: the version must have `--unhealthy-file`.
    let image = test_image("v2-unhealthy-file");
    // The same path: the agents start with the long hold.
    site.write_spec(&test_image("v1"), Health::Passes, LONG_HOLD);
    let running = site.run();
    let started = unix_now();

    // A version that is healthy until the test says otherwise.
    let changed = Instant::now();
    site.write_spec(&image, Health::FailsOnceTheFileExists, LONG_HOLD);
    let read = site.wait_rollouts("the canary done (or the version bad)", |keys, read| {
        count(keys, read, "done") == 1 || count(keys, read, "bad") == 1
    });
    let done_at = Instant::now();
    assert_eq!(
        (count(&keys, &read, "done"), count(&keys, &read, "bad")),
        (1, 0),
        "the canary's upgrade succeeded: {:?}",
        read.entries
            .iter()
            .map(|e| (&e.key, String::from_utf8_lossy(&e.value)))
            .collect::<Vec<_>>()
    );
    let canary_name = read
        .entries
        .iter()
        .find_map(|e| match keys.rollout_of(&e.key) {
            Some(RolloutKey::Done { node, .. }) => Some(node.to_string()),
            _ => None,
        })
        .expect("a done key");
    let (canary, other) = site.canary_and_other(&canary_name);
    eprintln!(
        "{} done {:.1}s after the spec changed",
        canary.name,
        changed.elapsed().as_secs_f64()
    );
    // The canary's replica of the version turns unhealthy, during its hold.
    let found = images(canary);
    let upgraded: Vec<&String> = found
        .iter()
        .filter(|(_, i)| *i == image)
        .map(|(name, _)| name)
        .collect();
    assert_eq!(upgraded.len(), 1, "{}: {found:?}", canary.name);
    let empty = tempfile::NamedTempFile::new().expect("an empty file");
    let into = format!("{}:{UNHEALTHY_FILE}", upgraded[0]);
    support::run("docker", &["cp", &empty.path().to_string_lossy(), &into]);
    let unhealthy_at = Instant::now();

    let read = site.wait_rollouts("the version marked bad", |keys, read| {
        count(keys, read, "bad") == 1
    });
    let marked_at = Instant::now();
    let bad = bad_of(&keys, &read);
    eprintln!(
        "marked bad {:.1}s after the canary's replica turned unhealthy ({:.1}s after it was done, hold {LONG_HOLD:?}): {}",
        marked_at.duration_since(unhealthy_at).as_secs_f64(),
        marked_at.duration_since(done_at).as_secs_f64(),
        bad.reason
    );
    assert_eq!(bad.node, canary.name, "{}", bad.reason);
    assert!(
        bad.reason
            .starts_with(&format!("{}'s replica ", canary.name))
            && bad
                .reason
                .contains("turned unhealthy during the canary hold"),
        "{}",
        bad.reason
    );
    assert!(
        marked_at.duration_since(done_at) < LONG_HOLD,
        "marked before the hold ended"
    );
    assert_eq!(count(&keys, &read, "done"), 1, "only the canary is done");
    // The other worker's plan says why it does not start the version.
    let plan = site.plan(other);
    assert!(
        plan.contains(&format!("was marked bad by {}", canary.name))
            && plan.contains("turned unhealthy during the canary hold"),
        "{plan}"
    );
    // Past the hold, and a few more runs of both agents: the other worker
    // never created a container of the version; the canary keeps it.
    let past_hold =
        (done_at + LONG_HOLD + Duration::from_secs(3)).saturating_duration_since(Instant::now());
    std::thread::sleep(past_hold);
    let read = site.wait_rollouts("the rollout keys read", |_, _| true);
    assert_eq!(
        (count(&keys, &read, "slot"), count(&keys, &read, "done")),
        (0, 1),
        "no other node took a slot or finished"
    );
    let created = created_from(&image, started, &[canary, other]);
    assert!(
        created.iter().all(|name| name.contains(&canary.name)) && !created.is_empty(),
        "{created:?}"
    );
    let found = images(other);
    assert_eq!(found.len(), 1, "{}: {found:?}", other.name);
    assert_eq!(found[0].1, test_image("v1"), "{}: {found:?}", other.name);
    let found = images(canary);
    assert_eq!(found.len(), 1, "{}: {found:?}", canary.name);
    assert_eq!(found[0].1, image, "{}: {found:?}", canary.name);

    running.stop("the canary's hold");
}

/// A turn of `node` in the rollout of `api` to `version`, from one slot.
fn turn(etcd: &EtcdCluster, prefix: &str, node: &str, version: &str, last: bool) -> Turn {
    Turn {
        etcd: etcd.etcd_spec(prefix),
        service: "api".into(),
        version: version.into(),
        node: node.into(),
        slots: 1,
        last,
        resumed: false,
        canary_after: None,
    }
}

/// The slot `turn` takes (it must get one).
fn slot(turn: Turn) -> Box<Held> {
    match turn.take() {
        Ok(Taken::Slot(held)) => held,
        other => panic!("{} got no slot: {other:?}", turn.node),
    }
}

/// Who holds slot 0 of `api` now, if anyone.
fn holder(etcd: &Etcd, keys: &Keys) -> Option<String> {
    let read = etcd.get_prefix(&keys.rollout_slot("api", 0)).expect("read");
    let entry = read.entries.first()?;
    serde_json::from_slice::<SlotRecord>(&entry.value)
        .ok()
        .map(|r| r.node)
}

/// Slots against a real etcd, without Docker: three workers taking the one
/// slot at once get it once; a version marked bad gives no slot; a node
/// takes over the slot it holds, and a slot left behind frees itself
/// within the lease TTL.
#[test]
fn taking_a_slot_is_atomic_and_a_bad_version_gets_none() {
    let test = "taking_a_slot_is_atomic";
    if !support::commands(test, &["etcd"]) {
        return;
    }
    let mut cluster = EtcdCluster::start(3);
    cluster.wait_healthy();
    let prefix = format!("/lessnat-test-slots-{}", std::process::id());
    let etcd = Etcd::connect(&etcd_config(&cluster.etcd_spec(&prefix))).expect("client");
    let keys = Keys::new(&prefix);

    // Three at once: one slot, two told it is taken.
    let barrier = std::sync::Barrier::new(3);
    let taken: Vec<Taken> = std::thread::scope(|scope| {
        let threads: Vec<_> = ["web-1", "web-2", "web-3"]
            .into_iter()
            .map(|node| {
                let (turn, barrier) = (turn(&cluster, &prefix, node, "v2", true), &barrier);
                scope.spawn(move || {
                    barrier.wait();
                    turn.take().expect("take")
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("taker"))
            .collect()
    });
    let (mut held, full): (Vec<Taken>, Vec<Taken>) =
        taken.into_iter().partition(|t| matches!(t, Taken::Slot(_)));
    assert_eq!((held.len(), full.len()), (1, 2), "{held:?} {full:?}");
    let Some(Taken::Slot(first)) = held.pop() else {
        unreachable!()
    };
    let winner = holder(&etcd, &keys).expect("the slot is held");
    first.done().expect("done");
    assert_eq!(holder(&etcd, &keys), None, "done frees the slot");
    let done = etcd
        .get_prefix(&keys.rollout_done("api", "v2", &winner))
        .expect("read");
    assert_eq!(done.entries.len(), 1, "done is written");

    // A failed upgrade marks the version bad: nobody gets a slot for it.
    let second = slot(turn(&cluster, &prefix, "web-2", "v3", true));
    second.bad("not healthy").expect("bad");
    assert_eq!(holder(&etcd, &keys), None, "bad frees the slot");
    match turn(&cluster, &prefix, "web-3", "v3", true).take() {
        Ok(Taken::Bad(by)) => assert_eq!(by, "web-2"),
        other => panic!("a slot for a bad version: {other:?}"),
    }

    // A node's first batch keeps the slot for its next one, which takes
    // it over; another node meanwhile finds it taken.
    let batch = slot(turn(&cluster, &prefix, "web-1", "v4", false));
    batch.done().expect("not the last batch");
    assert_eq!(holder(&etcd, &keys).as_deref(), Some("web-1"));
    assert!(matches!(
        turn(&cluster, &prefix, "web-2", "v4", true).take(),
        Ok(Taken::Full(_))
    ));
    let again = slot(turn(&cluster, &prefix, "web-1", "v4", false));
    // Not kept alive any more (as when its apply dies): it frees itself.
    again.done().expect("not the last batch");
    let deadline = Instant::now() + Duration::from_secs(10);
    while holder(&etcd, &keys).is_some() {
        assert!(Instant::now() < deadline, "the slot outlived its lease");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Two canary turns planned while no node was done: the first takes the
    // slot and finishes; the second, taken after that, does not start
    // (it would skip the hold).
    let canary = |node: &str| Turn {
        canary_after: Some(0),
        ..turn(&cluster, &prefix, node, "v5", true)
    };
    slot(canary("web-1")).done().expect("done");
    match canary("web-2").take() {
        Ok(Taken::Moved(done)) => assert_eq!(done, 1),
        other => panic!("a second canary started after the first finished: {other:?}"),
    }
    assert_eq!(holder(&etcd, &keys), None);
    // What guards the window between that read and the slot's transaction:
    // nothing new under the done prefix since the read's revision.
    let done_nodes = keys.rollout_done_nodes("api", "v6");
    let read = etcd.get_prefix(&done_nodes).expect("read");
    let guarded = |revision| {
        let expect = [(done_nodes.as_str(), Expect::NothingNewUnder(revision))];
        etcd.put_if(&format!("{prefix}/guarded"), b"x", None, &expect)
            .expect("txn")
    };
    assert!(guarded(read.revision), "an empty prefix has nothing new");
    etcd.put(&keys.rollout_done("api", "v6", "web-1"), b"{}", None)
        .expect("put");
    assert!(!guarded(read.revision), "a key created since the read");
    let now = etcd.get_prefix(&done_nodes).expect("read").revision;
    assert!(guarded(now), "nothing created since the second read");
}
