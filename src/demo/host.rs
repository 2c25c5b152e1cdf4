//! The host-mode demo: a service on a loopback port, upgraded v1 → v2 with
//! `redirect-drain` and back with `stop-start`, each under the same load.
//!
//! It works in the host network namespace (host-mode containers listen
//! there), with a node name, container names and ports of its own, and a
//! state directory in a temporary directory. It waits for the machine-wide
//! lock the integration tests take for the host namespace, and refuses to
//! run where lessnat's table already exists.

use std::fs::File;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use crate::backend::nft;
use crate::netns::Netns;

use super::cleanup::Cleanup;
use super::converge::{Node, converge};
use super::image::tag;
use super::load::{Load, LoadConfig, long_lived};
use super::report::{HostSummary, Upgrade};
use super::{Demo, DemoError};

/// The lock the integration tests and benchmarks hold while they use the
/// host network namespace (`tests/support::host_network`).
const HOST_NETWORK_LOCK: &str = "/run/lock/lessnat-host-network.lock";
/// The demo service's name in the spec.
const SERVICE: &str = "demo";
/// Client threads opening fresh connections.
const CLIENTS: usize = 16;
/// Long-lived connections opened before each upgrade...
const LONG_LIVED: usize = 4;
/// ...each answered after this long.
const HOLD: Duration = Duration::from_secs(3);
/// Load before and after each upgrade.
const MARGIN: Duration = Duration::from_secs(1);

/// The upgrade strategies the demo compares, as the spec names them.
const REDIRECT_DRAIN: &str = "redirect-drain";
const STOP_START: &str = "stop-start";

/// The demo service on its node.
struct Service {
    node: Node,
    port: u16,
    temp_port: u16,
}

impl Service {
    /// The spec running `version` of the demo image, upgraded with `strategy`.
    fn spec(&self, version: &str, strategy: &str) -> String {
        format!(
            "version: 1
nodes:
  - name: {node}
    address: 127.0.0.1
services:
  - name: {SERVICE}
    node: {node}
    image: {image}
    network: host
    command: [\"--listen\", \"127.0.0.1:{{port}}\"]
    ports:
      - {{ name: http, port: {port}, protocol: tcp, tempPort: {temp} }}
    health:
      http: {{ path: /healthz }}
      interval: 100ms
      timeout: 1s
      healthyAfter: 2
      startTimeout: 30s
    upgrade:
      strategy: {strategy}
      drainTimeout: 20s
      stopTimeout: 10s
",
            node = self.node.name,
            image = tag(version),
            port = self.port,
            temp = self.temp_port,
        )
    }
}

/// Runs the host-mode demo; what it makes is recorded in `cleanup`.
pub(super) fn run(demo: &mut Demo, cleanup: &mut Cleanup) -> Result<HostSummary, DemoError> {
    let _host = host_network(demo)?;
    let host = Netns::default();
    let table_exists = nft::observe(&host)
        .map(|state| !state.tables.is_empty())
        .map_err(DemoError::Nft)?;
    if table_exists {
        return Err(DemoError::TableInUse);
    }
    super::images(demo)?;
    let (port, temp_port) = free_ports()?;
    let name = format!("demo-{}", std::process::id());
    let node = Node {
        state_dir: cleanup.dir().join(&name),
        name,
        netns: host,
    };
    cleanup.host_node(node.clone(), true);
    let service = Service {
        node,
        port,
        temp_port,
    };

    demo.say(&format!(
        "\n==> Installing v1 on 127.0.0.1:{port} (node {}, state in {})\n",
        service.node.name,
        service.node.state_dir.display()
    ))?;
    apply(demo, &service, "v1", REDIRECT_DRAIN)?;

    let redirect_drain = upgrade(demo, &service, "v1", "v2", REDIRECT_DRAIN)?;
    let stop_start = upgrade(demo, &service, "v2", "v1", STOP_START)?;

    if demo.options.keep {
        demo.say("\n==> --keep: upgrading back to v2, which stays running\n")?;
        apply(demo, &service, "v2", REDIRECT_DRAIN)?;
        keep(demo, cleanup, &service)?;
    }
    Ok(HostSummary {
        redirect_drain,
        stop_start,
    })
}

/// Converges the demo node to `version` with `strategy`.
fn apply(
    demo: &mut Demo,
    service: &Service,
    version: &str,
    strategy: &str,
) -> Result<(), DemoError> {
    converge(
        &demo.interrupt,
        &service.node,
        &service.spec(version, strategy),
        demo.stream,
        demo.live,
    )?;
    demo.check()
}

/// One upgrade from `from` to `to` under load: fresh connections from
/// [`MARGIN`] before to [`MARGIN`] after, and long-lived ones opened first.
fn upgrade(
    demo: &mut Demo,
    service: &Service,
    from: &str,
    to: &str,
    strategy: &str,
) -> Result<Upgrade, DemoError> {
    demo.say(&format!(
        "\n==> Upgrading {from} → {to} with {strategy} while {CLIENTS} clients keep connecting and {LONG_LIVED} long-lived requests are open\n"
    ))?;
    let load = Load::start(LoadConfig {
        clients: CLIENTS,
        pause: Duration::from_millis(10),
        io_timeout: Duration::from_secs(2),
        max_duration: Duration::from_secs(90),
        ..LoadConfig::new(service.port)
    });
    load.wait_requests(CLIENTS, Duration::from_secs(10))
        .map_err(DemoError::Load)?;
    demo.pause(MARGIN)?;
    let held = long_lived(
        service.port,
        LONG_LIVED,
        u64::try_from(HOLD.as_millis()).unwrap_or(u64::MAX),
    );
    let started = Instant::now();
    let applied = apply(demo, service, to, strategy);
    let took = started.elapsed();
    let after = applied.and_then(|()| demo.pause(MARGIN));
    let report = load.stop();
    let held = held.wait();
    after?;
    Ok(Upgrade::measure(&report, &held, from, took))
}

/// Leaves the service running and says how to look at it and remove it.
fn keep(demo: &mut Demo, cleanup: &mut Cleanup, service: &Service) -> Result<(), DemoError> {
    cleanup.keep();
    let spec = service.node.state_dir.join("demo.yaml");
    std::fs::write(&spec, service.spec("v2", REDIRECT_DRAIN)).map_err(|source| {
        DemoError::Setup {
            what: format!("writing {}", spec.display()),
            source,
        }
    })?;
    let common = format!(
        "--state-dir {} --node {}",
        service.node.state_dir.display(),
        service.node.name
    );
    demo.say(&format!(
        "\nv2 keeps running on 127.0.0.1:{port} (curl http://127.0.0.1:{port}/). To play with it:\n\
         \n  lessnat plan -f {spec} {common}\
         \n  lessnat show {common}\
         \n  lessnat destroy --auto-approve {common}\
         \n  docker image rm {v2} {v1}\n",
        port = service.port,
        spec = spec.display(),
        v2 = tag("v2"),
        v1 = tag("v1"),
    ))
}

/// Waits for the machine-wide lock on the host network namespace (or for
/// SIGINT or SIGTERM).
fn host_network(demo: &mut Demo) -> Result<File, DemoError> {
    let setup = |source| DemoError::Setup {
        what: format!("locking {HOST_NETWORK_LOCK}"),
        source,
    };
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(HOST_NETWORK_LOCK)
        .map_err(setup)?;
    let mut said = false;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) => {}
            Err(std::fs::TryLockError::Error(source)) => return Err(setup(source)),
        }
        if !std::mem::replace(&mut said, true) {
            demo.say(
                "Waiting for another lessnat demo or test that uses the host network to finish...",
            )?;
        }
        demo.pause(Duration::from_millis(200))?;
    }
}

/// Two TCP ports free on every address, below the kernel's ephemeral range
/// (a port in that range can be taken at any moment by a client socket).
fn free_ports() -> Result<(u16, u16), DemoError> {
    let seed = u16::try_from(std::process::id() % 4000).unwrap_or(0);
    let mut free = (0..4000u16)
        .map(|i| 24_000 + (seed + i) % 4000)
        .filter(|&port| TcpListener::bind(("0.0.0.0", port)).is_ok());
    match (free.next(), free.next()) {
        (Some(port), Some(temp)) => Ok((port, temp)),
        _ => Err(DemoError::Setup {
            what: "finding two free TCP ports in 24000-27999".to_string(),
            source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
        }),
    }
}
