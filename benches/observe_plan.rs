//! How long `lessnat plan` takes to read a host and plan, by number of
//! services on one node, beside the raw read a shell script would do.
//!
//! `cargo bench --bench observe_plan` (release build). Needs root, `nft`, `ip`
//! and a Docker engine; skips with a message otherwise. Everything happens in
//! a network namespace made for the run; every container it creates carries
//! the label `io.lessnat.test.bench` and is removed at the end (and leftovers
//! of an interrupted run are removed at the start).
//!
//! Knobs (environment):
//! - `LESSNAT_BENCH_SIZES`: services per live run, default `10,100,1000,5000`;
//! - `LESSNAT_BENCH_RUNS`: timed runs per measurement, default 9 (median and
//!   min); the script's read, which takes ~40 s per run at 1,000 containers,
//!   runs at most 5 times;
//! - `LESSNAT_BENCH_CONTAINERS`: most containers to create (C), default 1000:
//!   services beyond C have no container;
//! - `LESSNAT_BENCH_PLANNER_SIZES`: sizes of the planner-alone part, default
//!   `1000,2000,4000,6000` (a spec is at most 1 MiB: about 7,000 services).
//!
//! Live part, per size N: a spec with N host-mode services on node `bench`
//! (port 10000+i, tempPort 40000+i); lessnat's table with N redirects (every
//! service mid-upgrade); a created (not started) `.next` container for the
//! first min(N, C) services. Measured, interleaved run by run: `observe_with`,
//! `plan` and `render`, together and each; the raw read as processes (`nft -j list
//! table inet lessnat` in the namespace, then `docker ps -a --filter
//! label=io.lessnat.service --format '{{json .}}' --size=false`); each observer
//! alone; the `lessnat plan` binary end to end; and apart, the script's read
//! (the same `docker ps` without `--size=false`, which has the engine compute
//! every container's size) and spec loading.
//!
//! Planner-alone part (no root or Docker needed): `plan` and `render` on
//! made-up observed state with a container for every service, to see how the
//! pure part grows beyond C.

#[path = "../tests/support/mod.rs"]
mod support;

use std::fmt::Write as _;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use lessnat::backend::docker::Docker;
use lessnat::backend::nft::{apply_table, delete_table};
use lessnat::backend::{conntrack, netlink, nft};
use lessnat::desired::desired_node;
use lessnat::desired::host_table::host_table;
use lessnat::model::Redirect;
use lessnat::model::{Container, OBSERVED_FORMAT, Observed};
use lessnat::netns::Netns;
use lessnat::observe::live::observe_with;
use lessnat::ownership::{LABEL_PORTS, LABEL_SERVICE, LABEL_SPEC, Slot, container_name};
use lessnat::plan::render::render;
use lessnat::plan::{fingerprint, plan};
use lessnat::spec::{Protocol, Spec, load_bytes};
use lessnat::style::Style;
use support::TestNetns;
use support::image::test_image;

const NODE: &str = "bench";
/// Marks the containers this benchmark creates (and may remove).
const BENCH_LABEL: &str = "io.lessnat.test.bench";
/// Above this many containers the script's `docker ps` (which has the engine
/// compute every container's size, ~40 ms each here) is not timed: it would
/// take minutes per run.
const SCRIPT_MAX_CONTAINERS: usize = 1_000;
/// The script's read runs at most this many times per size.
const SCRIPT_RUNS: usize = 5;
/// `docker create` processes run at once.
const CREATE_WORKERS: usize = 8;

fn env_list(name: &str, default: &[usize]) -> Vec<usize> {
    match std::env::var(name) {
        Ok(text) if !text.trim().is_empty() => text
            .split(',')
            .map(|n| {
                n.trim()
                    .replace('_', "")
                    .parse()
                    .unwrap_or_else(|e| panic!("{name}: {n:?} is not a number: {e}"))
            })
            .collect(),
        _ => default.to_vec(),
    }
}

fn env_number(name: &str, default: usize) -> usize {
    env_list(name, &[default])[0]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Median and minimum of some timings.
#[derive(Clone, Copy, Default)]
struct Stat {
    median: Duration,
    min: Duration,
}

impl Stat {
    fn of(mut samples: Vec<Duration>) -> Stat {
        samples.sort();
        let n = samples.len();
        let median = if n % 2 == 1 {
            samples[n / 2]
        } else {
            (samples[n / 2 - 1] + samples[n / 2]) / 2
        };
        Stat {
            median,
            min: samples[0],
        }
    }

    fn ms(self) -> String {
        format!("{:.1} ({:.1})", ms(self.median), ms(self.min))
    }
}

/// The spec: `n` host-mode services on node `bench`.
fn spec_yaml(n: usize, image: &str) -> String {
    let mut yaml =
        format!("version: 1\nnodes:\n  - {{name: {NODE}, address: 192.0.2.10}}\nservices:\n");
    for i in 0..n {
        let _ = writeln!(
            yaml,
            "  - {{name: s{i}, node: {NODE}, image: \"{image}\", command: [\"--listen\", \":{{port}}\"], \
             ports: [{{name: http, port: {}, tempPort: {}}}]}}",
            10_000 + i,
            40_000 + i
        );
    }
    yaml
}

fn load(yaml: &str) -> Spec {
    load_bytes("bench.yaml", yaml.as_bytes())
        .unwrap_or_else(|report| panic!("{}", report.render(Style::Plain)))
}

fn redirects(n: usize) -> Vec<Redirect> {
    (0..n)
        .map(|i| Redirect {
            protocol: Protocol::Tcp,
            port: u16::try_from(10_000 + i).expect("port fits"),
            temp_port: u16::try_from(40_000 + i).expect("temp port fits"),
        })
        .collect()
}

/// The benchmark's containers, removed (in batches) when dropped, also on panic.
struct Containers {
    ids: Mutex<Vec<String>>,
    image: String,
    /// The desired spec hash of each service, by index.
    hashes: Vec<String>,
}

impl Containers {
    fn len(&self) -> usize {
        self.ids.lock().expect("ids lock").len()
    }

    /// Creates `.next` containers (created, not started) for services
    /// `len()..count`, several `docker create` at once. Returns how long it took.
    fn grow_to(&self, count: usize) -> Duration {
        let start = self.len();
        if count <= start {
            return Duration::ZERO;
        }
        let next = AtomicUsize::new(start);
        let failures = Mutex::new(Vec::new());
        let started = Instant::now();
        std::thread::scope(|scope| {
            for _ in 0..CREATE_WORKERS {
                scope.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        if i >= count {
                            break;
                        }
                        match self.create(i) {
                            Ok(id) => self.ids.lock().expect("ids lock").push(id),
                            Err(e) => failures.lock().expect("failures lock").push(e),
                        }
                    }
                });
            }
        });
        let failures = failures.into_inner().expect("failures lock");
        assert!(failures.is_empty(), "docker create failed: {failures:#?}");
        started.elapsed()
    }

    fn create(&self, i: usize) -> Result<String, String> {
        let service = format!("s{i}");
        let output = Command::new("docker")
            .args(["create", "--network", "none", "--name"])
            .arg(container_name(&service, NODE, Slot::Next))
            .args(["--label", &format!("{BENCH_LABEL}=1")])
            .args(["--label", &format!("{LABEL_SERVICE}={service}")])
            .args(["--label", &format!("{LABEL_SPEC}={}", self.hashes[i])])
            .args(["--label", &format!("{LABEL_PORTS}={}/tcp", 10_000 + i)])
            .arg(&self.image)
            .args(["--listen", &format!(":{}", 40_000 + i)])
            .output()
            .map_err(|e| format!("docker create: {e}"))?;
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).into_owned());
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    }
}

/// `docker rm -f` in batches.
fn remove_containers(ids: &[String]) -> Duration {
    let started = Instant::now();
    for batch in ids.chunks(200) {
        let _ = Command::new("docker")
            .args(["rm", "-f"])
            .args(batch)
            .stdout(Stdio::null())
            .output();
    }
    started.elapsed()
}

impl Drop for Containers {
    fn drop(&mut self) {
        let ids = std::mem::take(&mut *self.ids.lock().unwrap_or_else(|e| e.into_inner()));
        if ids.is_empty() {
            return;
        }
        let took = remove_containers(&ids);
        eprintln!(
            "removed {} containers in {:.1}s",
            ids.len(),
            took.as_secs_f64()
        );
    }
}

/// Containers an interrupted earlier run left behind.
fn remove_leftovers() {
    let output = support::run(
        "docker",
        &["ps", "-aq", "--filter", &format!("label={BENCH_LABEL}")],
    );
    let ids: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect();
    if !ids.is_empty() {
        eprintln!("removing {} containers left by an earlier run", ids.len());
        remove_containers(&ids);
    }
}

/// The raw read, as processes: nft in the namespace (spawned from a thread
/// that entered it, as lessnat does), then the Docker CLI. With `sized`, the
/// exact command a script would write, `--format '{{json .}}'`: the template
/// uses every field, `.Size` too, so the CLI asks the engine to compute each
/// container's disk usage (see docs/benchmarks.md); without it, the same with
/// `--size=false`, which lists the same containers.
fn raw_read(netns: &Netns, sized: bool) -> (Duration, Duration, usize) {
    let started = Instant::now();
    let nft = netns
        .run(|| {
            Command::new("nft")
                .args(["-j", "list", "table", "inet", "lessnat"])
                .output()
        })
        .expect("enter the namespace")
        .expect("run nft");
    assert!(
        nft.status.success(),
        "nft -j list table inet lessnat failed"
    );
    let nft_took = started.elapsed();
    let started = Instant::now();
    let mut command = Command::new("docker");
    command
        .args(["ps", "-a", "--filter"])
        .arg(format!("label={LABEL_SERVICE}"))
        .args(["--format", "{{json .}}"]);
    if !sized {
        command.arg("--size=false");
    }
    let docker = command.output().expect("run docker ps");
    assert!(docker.status.success(), "docker ps failed");
    let lines = docker.stdout.iter().filter(|&&b| b == b'\n').count();
    (nft_took, started.elapsed(), lines)
}

/// Samples of one size, by what was timed.
#[derive(Default)]
struct Timings {
    observe: Vec<Duration>,
    plan: Vec<Duration>,
    render: Vec<Duration>,
    total: Vec<Duration>,
    raw: Vec<Duration>,
    raw_nft: Vec<Duration>,
    raw_docker: Vec<Duration>,
    nft: Vec<Duration>,
    routing: Vec<Duration>,
    conntrack: Vec<Duration>,
    docker: Vec<Duration>,
    cli: Vec<Duration>,
}

/// One size's results.
struct Row {
    n: usize,
    containers: usize,
    load: Stat,
    observe: Stat,
    plan: Stat,
    render: Stat,
    total: Stat,
    raw: Stat,
    raw_nft: Stat,
    raw_docker: Stat,
    /// `None` above [`SCRIPT_MAX_CONTAINERS`].
    script: Option<Stat>,
    nft: Stat,
    routing: Stat,
    conntrack: Stat,
    docker: Stat,
    cli: Stat,
    changes: usize,
    text_bytes: usize,
}

fn time<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let started = Instant::now();
    let value = f();
    (value, started.elapsed())
}

fn measure(
    n: usize,
    runs: usize,
    ns: &TestNetns,
    docker: &Docker,
    containers: &Containers,
    image: &str,
    max_containers: usize,
) -> Row {
    let netns = ns.netns();
    let yaml = spec_yaml(n, image);
    let loads: Vec<Duration> = (0..runs).map(|_| time(|| load(&yaml)).1).collect();
    let spec = load(&yaml);
    let spec_dir = tempfile::tempdir().expect("temporary directory");
    let spec_path = spec_dir.path().join("bench.yaml");
    std::fs::write(&spec_path, &yaml).expect("write the spec");

    let ((), applied) =
        time(|| apply_table(&netns, &host_table(&redirects(n))).expect("apply lessnat's table"));
    eprintln!(
        "  N={n}: table with {n} redirects applied in {:.1} ms",
        ms(applied)
    );
    let want = n.min(max_containers);
    let before = containers.len();
    let took = containers.grow_to(want);
    if took > Duration::ZERO {
        eprintln!(
            "  N={n}: containers now {want}, created in {:.1}s ({:.1} ms each, {CREATE_WORKERS} at once)",
            took.as_secs_f64(),
            ms(took) / (want - before).max(1) as f64
        );
        // Let the engine finish what the creates left it to do before timing.
        std::thread::sleep(Duration::from_secs(5));
    }

    // Warm-up, and a check that the benchmark sees what it set up.
    let observed = observe_with(NODE, &netns, docker).expect("observe");
    assert_eq!(observed.nft.tables.len(), 1);
    assert_eq!(observed.nft.tables[0].maps[0].elements.len(), n);
    assert_eq!(observed.containers.len(), want, "observed containers");
    let warm = plan(&spec, NODE, &observed);
    assert!(warm.changes.len() >= n, "one change per service at least");
    let _ = render(&warm, Style::Plain);

    // One run does everything once, so a burst of load elsewhere on the
    // machine hits lessnat and the raw read alike.
    let spec_arg = spec_path.to_string_lossy().into_owned();
    let mut t = Timings::default();
    let mut changes = 0;
    let mut text_bytes = 0;
    for _ in 0..runs {
        let started = Instant::now();
        let (observed, observe_took) =
            time(|| observe_with(NODE, &netns, docker).expect("observe"));
        let (planned, plan_took) = time(|| plan(&spec, NODE, &observed));
        let (text, render_took) = time(|| render(&planned, Style::Plain));
        t.total.push(started.elapsed());
        t.observe.push(observe_took);
        t.plan.push(plan_took);
        t.render.push(render_took);
        changes = planned.changes.len();
        text_bytes = text.len();

        let (nft_took, docker_took, lines) = raw_read(&netns, false);
        assert!(
            lines >= want,
            "docker ps lists {lines} lines, fewer than {want}"
        );
        t.raw_nft.push(nft_took);
        t.raw_docker.push(docker_took);
        t.raw.push(nft_took + docker_took);

        t.nft.push(time(|| nft::observe(&netns).expect("nft")).1);
        t.routing
            .push(time(|| netlink::observe(&netns).expect("routing")).1);
        t.conntrack
            .push(time(|| conntrack::observe(&netns, &[]).expect("conntrack")).1);
        t.docker
            .push(time(|| docker.observe(NODE).expect("docker")).1);

        let (output, took) = time(|| {
            Command::new(env!("CARGO_BIN_EXE_lessnat"))
                .args(["plan", "-f", &spec_arg, "--netns", &ns.name, "--node", NODE])
                .env("NO_COLOR", "1")
                .output()
                .expect("run lessnat plan")
        });
        assert!(
            output.status.success(),
            "lessnat plan failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        t.cli.push(took);
    }
    let script_runs = runs.min(SCRIPT_RUNS);
    let script = (want <= SCRIPT_MAX_CONTAINERS).then(|| {
        Stat::of(
            (0..script_runs)
                .map(|_| {
                    let (nft_took, docker_took, lines) = raw_read(&netns, true);
                    assert!(
                        lines >= want,
                        "docker ps lists {lines} lines, fewer than {want}"
                    );
                    nft_took + docker_took
                })
                .collect(),
        )
    });

    Row {
        n,
        containers: want,
        load: Stat::of(loads),
        observe: Stat::of(t.observe),
        plan: Stat::of(t.plan),
        render: Stat::of(t.render),
        total: Stat::of(t.total),
        raw: Stat::of(t.raw),
        raw_nft: Stat::of(t.raw_nft),
        raw_docker: Stat::of(t.raw_docker),
        script,
        nft: Stat::of(t.nft),
        routing: Stat::of(t.routing),
        conntrack: Stat::of(t.conntrack),
        docker: Stat::of(t.docker),
        cli: Stat::of(t.cli),
        changes,
        text_bytes,
    }
}

/// Prints a Markdown table, columns right-aligned.
fn table(header: &[&str], rows: &[Vec<String>]) {
    let widths: Vec<usize> = header
        .iter()
        .enumerate()
        .map(|(i, h)| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([h.chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<String>| {
        let cells: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, &w)| format!("{c:>w$}"))
            .collect();
        println!("| {} |", cells.join(" | "));
    };
    line(header.iter().map(|h| h.to_string()).collect());
    println!(
        "|{}|",
        widths
            .iter()
            .map(|&w| format!("{}:", "-".repeat(w + 1)))
            .collect::<Vec<_>>()
            .join("|")
    );
    for row in rows {
        line(row.clone());
    }
}

fn report(rows: &[Row], runs: usize) {
    println!();
    println!(
        "observe + plan + render vs the raw read, one node; ms, median (min) of {runs} runs \
         ({} for the script)",
        runs.min(SCRIPT_RUNS)
    );
    println!();
    table(
        &[
            "N",
            "containers",
            "observe",
            "plan",
            "render",
            "total",
            "raw",
            "total/raw",
            "µs/service",
            "script",
            "total/script",
        ],
        &rows
            .iter()
            .map(|r| {
                vec![
                    r.n.to_string(),
                    r.containers.to_string(),
                    r.observe.ms(),
                    r.plan.ms(),
                    r.render.ms(),
                    r.total.ms(),
                    r.raw.ms(),
                    format!("{:.2}", ms(r.total.median) / ms(r.raw.median)),
                    format!("{:.1}", ms(r.total.median) * 1e3 / r.n as f64),
                    r.script.map_or("-".into(), Stat::ms),
                    r.script.map_or("-".into(), |script| {
                        format!("{:.3}", ms(r.total.median) / ms(script.median))
                    }),
                ]
            })
            .collect::<Vec<_>>(),
    );
    println!();
    println!(
        "raw = `nft -j list table inet lessnat` + `docker ps -a --filter label=io.lessnat.service \
         --format '{{{{json .}}}}' --size=false`; script = the same without --size=false (the \
         CLI then asks the engine for every container's size); ratios of medians"
    );

    println!();
    println!("where the time goes: ms, median (min)");
    println!();
    table(
        &[
            "N",
            "load spec",
            "nft",
            "routing",
            "conntrack",
            "docker",
            "raw nft",
            "raw docker",
            "CLI plan",
            "changes",
            "text KiB",
        ],
        &rows
            .iter()
            .map(|r| {
                vec![
                    r.n.to_string(),
                    r.load.ms(),
                    r.nft.ms(),
                    r.routing.ms(),
                    r.conntrack.ms(),
                    r.docker.ms(),
                    r.raw_nft.ms(),
                    r.raw_docker.ms(),
                    r.cli.ms(),
                    r.changes.to_string(),
                    (r.text_bytes / 1024).to_string(),
                ]
            })
            .collect::<Vec<_>>(),
    );

    if rows.len() < 2 {
        return;
    }
    println!();
    println!("growth: cost of each added service between sizes, µs per service (medians)");
    println!();
    table(
        &[
            "from → to",
            "observe",
            "nft",
            "docker",
            "plan",
            "render",
            "total",
            "raw",
            "load spec",
        ],
        &rows
            .windows(2)
            .map(|pair| {
                let (a, b) = (&pair[0], &pair[1]);
                let added = (b.n - a.n) as f64;
                let slope = |f: fn(&Row) -> Stat| {
                    format!("{:.1}", (ms(f(b).median) - ms(f(a).median)) * 1e3 / added)
                };
                vec![
                    format!("{} → {}", a.n, b.n),
                    slope(|r| r.observe),
                    slope(|r| r.nft),
                    slope(|r| r.docker),
                    slope(|r| r.plan),
                    slope(|r| r.render),
                    slope(|r| r.total),
                    slope(|r| r.raw),
                    slope(|r| r.load),
                ]
            })
            .collect::<Vec<_>>(),
    );
    if let [.., a, b] = rows {
        let per = |r: &Row, f: fn(&Row) -> Stat| ms(f(r).median) / r.n as f64;
        let growth = |f: fn(&Row) -> Stat| per(b, f) / per(a, f);
        println!();
        println!(
            "per-service time from N={} to N={}: total ×{:.2}, observe ×{:.2}, plan ×{:.2}, \
             render ×{:.2}, load spec ×{:.2} (1.00 = linear, below = fixed costs amortised, \
             above = superlinear)",
            a.n,
            b.n,
            growth(|r| r.total),
            growth(|r| r.observe),
            growth(|r| r.plan),
            growth(|r| r.render),
            growth(|r| r.load),
        );
    }
}

/// The planner alone on made-up observed state (no I/O), at sizes the live
/// part cannot reach in reasonable time (every service with a container), to
/// see how the pure part grows. Two shapes: the steady state (each service's
/// primary running and current, no redirects: "No changes") and every service
/// mid-upgrade (a created `.next` container and a redirect each).
fn planner_alone(sizes: &[usize], runs: usize, image: &str) {
    let mut rows = Vec::new();
    let mut previous: Option<(usize, f64, f64)> = None;
    let mut points = Vec::new();
    for &n in sizes {
        let spec = load(&spec_yaml(n, image));
        let desired = desired_node(&spec, NODE);
        let container = |i: usize, slot: Slot, state: &str| Container {
            id: format!("{i:012x}"),
            name: container_name(&format!("s{i}"), NODE, slot),
            service: format!("s{i}"),
            slot,
            spec_hash: desired.services[i].1.spec_hash(),
            image: image.to_string(),
            ports: vec![format!("{}/tcp", 10_000 + i)],
            state: state.to_string(),
            health: None,
            pid: (state == "running").then_some(1000),
            address: None,
            stop_timeout: None,
            digest: None,
        };
        let observed = |slot: Slot, state: &str, redirected: usize| Observed {
            format: OBSERVED_FORMAT,
            node: NODE.to_string(),
            nft: lessnat::model::NftState {
                tables: vec![host_table(&redirects(redirected))],
            },
            containers: (0..n).map(|i| container(i, slot, state)).collect(),
            ..Observed::default()
        };
        let steady = observed(Slot::Primary, "running", 0);
        let upgrading = observed(Slot::Next, "created", n);
        let fastest = |observed: &Observed| {
            let plans: Vec<Duration> = (0..runs)
                .map(|_| time(|| plan(&spec, NODE, observed)).1)
                .collect();
            ms(Stat::of(plans).min)
        };
        assert!(
            plan(&spec, NODE, &steady).is_empty(),
            "steady state plans nothing"
        );
        let (steady_ms, upgrading_ms) = (fastest(&steady), fastest(&upgrading));
        let fingerprint_ms = ms(Stat::of(
            (0..runs)
                .map(|_| time(|| fingerprint(&upgrading)).1)
                .collect(),
        )
        .min);
        let planned = plan(&spec, NODE, &upgrading);
        let render_ms = ms(Stat::of(
            (0..runs)
                .map(|_| time(|| render(&planned, Style::Plain)).1)
                .collect(),
        )
        .min);
        let slope = |a: f64, b: f64, from: usize| (b - a) * 1e3 / (n - from) as f64;
        let (steady_slope, upgrading_slope) = match previous {
            Some((from, a, b)) => (
                format!("{:.1}", slope(a, steady_ms, from)),
                format!("{:.1}", slope(b, upgrading_ms, from)),
            ),
            None => ("".into(), "".into()),
        };
        previous = Some((n, steady_ms, upgrading_ms));
        points.push((n as f64, steady_ms, upgrading_ms));
        rows.push(vec![
            n.to_string(),
            format!("{steady_ms:.1}"),
            format!("{:.2}", steady_ms * 1e3 / n as f64),
            steady_slope,
            format!("{upgrading_ms:.1}"),
            format!("{:.2}", upgrading_ms * 1e3 / n as f64),
            upgrading_slope,
            format!("{fingerprint_ms:.1}"),
            format!("{render_ms:.1}"),
            format!("{:.2}", render_ms * 1e3 / n as f64),
        ]);
    }
    println!();
    println!(
        "the planner alone on made-up observed state, N containers (no I/O); ms, fastest of {runs} runs \
         (CPU-bound: the minimum is the least disturbed by other work)"
    );
    println!();
    table(
        &[
            "N",
            "steady plan",
            "µs/service",
            "µs/added service",
            "mid-upgrade plan",
            "µs/service",
            "µs/added service",
            "fingerprint",
            "render",
            "µs/service",
        ],
        &rows,
    );
    if points.len() >= 2 {
        let steady: Vec<(f64, f64)> = points.iter().map(|&(n, s, _)| (n, s)).collect();
        let upgrading: Vec<(f64, f64)> = points.iter().map(|&(n, _, u)| (n, u)).collect();
        let (a, b) = fit_quadratic(&steady);
        let (c, d) = fit_quadratic(&upgrading);
        println!();
        println!(
            "least-squares fit of plan time = a·N + b·N²: steady a = {a:.2} µs, b = {b:.2} ns; \
             mid-upgrade a = {c:.2} µs, b = {d:.2} ns (b = 0 would be linear; b·N is the \
             quadratic part of the per-service time)"
        );
    }
}

/// Fits `time = a·N + b·N²` by least squares over (N, ms) points; returns
/// `a` in µs per service and `b` in ns per service².
fn fit_quadratic(points: &[(f64, f64)]) -> (f64, f64) {
    let sum = |f: &dyn Fn(f64, f64) -> f64| points.iter().map(|&(n, t)| f(n, t)).sum::<f64>();
    let (n2, n3, n4) = (
        sum(&|n, _| n.powi(2)),
        sum(&|n, _| n.powi(3)),
        sum(&|n, _| n.powi(4)),
    );
    let (tn, tn2) = (sum(&|n, t| t * n), sum(&|n, t| t * n * n));
    let det = n2 * n4 - n3 * n3;
    if det == 0.0 {
        return (0.0, 0.0);
    }
    let a = (tn * n4 - tn2 * n3) / det;
    let b = (n2 * tn2 - n3 * tn) / det;
    (a * 1e3, b * 1e6)
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this too: do
    // nothing then unless asked.
    if !std::env::args().any(|a| a == "--bench") {
        println!("observe_plan: run with `cargo bench --bench observe_plan`");
        return;
    }
    let runs = env_number("LESSNAT_BENCH_RUNS", 9).max(1);
    eprintln!("observe_plan: load average at start {}", load_average());
    let name = "observe_plan (live part)";
    if support::root_with(name, &["nft"]) && support::docker(name) {
        live(runs);
    }
    let sizes = env_list("LESSNAT_BENCH_PLANNER_SIZES", &[1_000, 2_000, 4_000, 6_000]);
    check_sizes("LESSNAT_BENCH_PLANNER_SIZES", &sizes);
    planner_alone(&sizes, runs, &format!("{}:v1", support::image::REPOSITORY));
    println!();
    println!("load average at the end: {}", load_average());
}

/// `/proc/loadavg`'s first three fields: other work on the machine skews timings.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "unknown".into())
}

/// Sizes must grow, and ports 10000+i and 40000+i must fit.
fn check_sizes(name: &str, sizes: &[usize]) {
    assert!(
        sizes.windows(2).all(|w| w[0] < w[1]) && sizes.iter().all(|&n| (1..=25_000).contains(&n)),
        "{name} must grow, each within 1..=25000 (ports 10000+i and 40000+i)"
    );
}

/// The live measurements: a namespace, lessnat's table, containers.
fn live(runs: usize) {
    let sizes = env_list("LESSNAT_BENCH_SIZES", &[10, 100, 1_000, 5_000]);
    check_sizes("LESSNAT_BENCH_SIZES", &sizes);
    let max_containers = env_number("LESSNAT_BENCH_CONTAINERS", 1_000);
    let largest = sizes.last().copied().unwrap_or(0);

    remove_leftovers();
    let image = test_image("v1");
    let biggest = load(&spec_yaml(largest, &image));
    let hashes: Vec<String> = desired_node(&biggest, NODE)
        .services
        .iter()
        .map(|(_, c)| c.spec_hash())
        .collect();
    let containers = Containers {
        ids: Mutex::new(Vec::new()),
        image: image.clone(),
        hashes,
    };
    let docker = Docker::connect().expect("connect to Docker");
    let ns = TestNetns::new("bench");
    eprintln!(
        "observe_plan: sizes {sizes:?}, {runs} runs each, at most {max_containers} containers, \
         namespace {}, Docker API {}",
        ns.name,
        docker.api_version()
    );

    let rows: Vec<Row> = sizes
        .iter()
        .map(|&n| measure(n, runs, &ns, &docker, &containers, &image, max_containers))
        .collect();
    report(&rows, runs);

    let _ = delete_table(&ns.netns());
    // `containers` and `ns` are removed when dropped.
}
