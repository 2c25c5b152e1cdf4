//! The routed demo (`lessnat demo --routed`): a site of network namespaces
//! ([`topology`](super::topology): two clients, two load-balancer nodes
//! sharing a VIP, two workers), a routed service with one replica per
//! worker installed by lessnat on every node (workers first, each node with
//! its own state directory, as on separate machines), then the same load
//! from both clients through both LBs twice: as lessnat set it up, and with
//! the masquerade rule load balancers usually have. The demo app answers
//! `/peer` with the client address it sees.

use std::time::Duration;

use super::cleanup::Cleanup;
use super::converge::{Node, Stream, converge};
use super::image::tag;
use super::load::{Load, LoadConfig, Report};
use super::report::{RoutedSummary, Seen};
use super::topology::{self, Replica, Service, Site, VIP};
use super::{Demo, DemoError};

/// The demo service's name in the spec.
const SERVICE: &str = "demo";
/// Client threads in each client namespace, each opening a fresh connection
/// per request.
const CLIENTS: usize = 8;
/// How long each side is measured.
const MEASURE: Duration = Duration::from_secs(3);

/// Runs the routed demo; the site it makes is handed to `cleanup`.
pub(super) fn run(demo: &mut Demo, cleanup: &mut Cleanup) -> Result<RoutedSummary, DemoError> {
    super::images(demo)?;
    let site_tag = format!("demo-{}", std::process::id());
    demo.say(&format!(
        "\n==> Making network namespaces lessnat-{site_tag}-*: 2 clients, 2 load balancers sharing the VIP {VIP}, 2 workers"
    ))?;
    let site = Site::build("lessnat-", &site_tag, 2, &cleanup.dir()).map_err(|source| {
        DemoError::Namespace {
            what: "making the demo's network namespaces",
            source,
        }
    })?;
    let site = cleanup.site(site);
    demo.check()?;

    let replicas = (0..site.workers.len()).map(|w| Replica::on(w, 5)).collect();
    let spec = site.spec(&[Service::new(SERVICE, &tag("v1"), replicas)]);
    demo.say(
        "\n==> Installing v1 with lessnat on each node (workers first), each with its own state\n",
    )?;
    for node in site.workers.iter().chain(&site.lbs) {
        let summary = converge(
            &demo.interrupt,
            &Node::from(node),
            &spec,
            Stream::Nowhere,
            demo.live,
        )?;
        let role = match node.lb_id {
            Some(id) => format!("load balancer {id}"),
            None => format!("worker, containers in {}", node.subnet.unwrap_or_default()),
        };
        demo.say(&format!(
            "    {} ({role}): {} added",
            node.name, summary.add
        ))?;
        demo.check()?;
    }

    demo.say(&format!(
        "\n==> lessnat: {CLIENTS} clients in each client namespace connect to the VIP for {}s",
        MEASURE.as_secs()
    ))?;
    let routed = measure(demo, site)?;
    demo.say(&format!(
        "\n==> A masquerading load balancer: the same, with one nft `masquerade` rule on each LB (table ip {})",
        topology::MASQUERADE_TABLE
    ))?;
    masquerade(site, true)?;
    let masqueraded = measure(demo, site)?;
    masquerade(site, false)?;
    Ok(RoutedSummary {
        routed,
        masquerade: masqueraded,
    })
}

/// Load from both client namespaces for [`MEASURE`]: what it saw.
fn measure(demo: &mut Demo, site: &Site) -> Result<Seen, DemoError> {
    let loads = site.load(CLIENTS, |config| LoadConfig {
        pause: Duration::from_millis(10),
        io_timeout: Duration::from_secs(2),
        max_duration: Duration::from_secs(60),
        ..config
    });
    for load in &loads {
        load.wait_requests(CLIENTS, Duration::from_secs(10))
            .map_err(DemoError::Load)?;
    }
    demo.pause(MEASURE)?;
    let report = Report::merged(loads.into_iter().map(Load::stop));
    Ok(Seen::measure(&report, topology::saw_real_client))
}

/// Adds or removes the masquerade rule on the LBs.
fn masquerade(site: &Site, on: bool) -> Result<(), DemoError> {
    site.masquerade(on).map_err(|source| DemoError::Namespace {
        what: "changing the masquerade rule on the load balancers",
        source,
    })
}
