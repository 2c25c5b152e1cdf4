//! Golden tests of the planner: each `testdata/plans/<case>/` holds a spec, an
//! observed-state fixture, and the expected plan as text and JSON.
//!
//! `LESSNAT_BLESS=1 cargo test --test plan_golden` rewrites the expected plans.
//! The observed fixtures are inputs; they were written by
//! `cargo test --test plan_golden -- --ignored write_observed_fixtures`, which
//! builds them from the cases below (rerun it when the table shape changes).

use std::path::{Path, PathBuf};

use lessnat::desired::desired_node;
use lessnat::desired::host_table::{add_canary, canary_rules, host_table};
use lessnat::desired::routed::{desired_addresses, desired_routing, desired_sysctls};
use lessnat::model::Redirect;
use lessnat::model::{
    ConntrackState, Container, FlowCount, ForeignContainer, IpRule, NftTable, OBSERVED_FORMAT,
    Observed, Route,
};
use lessnat::model::{Image, Probe, RemoteDigest, Veth};
use lessnat::ownership::{Slot, container_name, replica_container_name, veth_name};
use lessnat::plan::{desired_table, plan, render::render};
use lessnat::spec::{HumanDuration, Protocol, Spec, load_bytes};
use lessnat::style::Style;

fn cases_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/plans")
}

fn load_spec(path: &Path) -> Spec {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    load_bytes(&path.display().to_string(), &bytes)
        .unwrap_or_else(|r| panic!("{}", r.render(Style::Plain)))
}

fn assert_golden(path: &Path, actual: &str) {
    if std::env::var_os("LESSNAT_BLESS").is_some_and(|v| v == "1") {
        std::fs::write(path, actual).expect("write golden file");
        return;
    }
    let expected = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e} (LESSNAT_BLESS=1 creates it)", path.display()));
    assert!(
        expected == actual,
        "{} differs:\n--- expected\n{expected}\n--- actual\n{actual}",
        path.display()
    );
}

#[test]
fn plans_match_their_golden_files() {
    let mut cases: Vec<PathBuf> = std::fs::read_dir(cases_dir())
        .expect("read testdata/plans")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    assert!(
        cases.len() >= 15,
        "expected at least 15 plan cases, found {}",
        cases.len()
    );
    for case in cases {
        let spec = load_spec(&case.join("spec.yaml"));
        let observed_text =
            std::fs::read_to_string(case.join("observed.json")).expect("observed.json");
        let observed: Observed =
            serde_json::from_str(&observed_text).expect("observed.json parses");
        let made = plan(&spec, &observed.node, &observed);
        assert_eq!(
            made,
            plan(&spec, &observed.node, &observed),
            "planning is deterministic"
        );
        assert_golden(&case.join("plan.txt"), &render(&made, Style::Plain));
        let json = serde_json::to_string_pretty(&made).expect("plan serialises") + "\n";
        assert_golden(&case.join("plan.json"), &json);
        let back: lessnat::plan::Plan = serde_json::from_str(&json).expect("plan JSON reads back");
        assert_eq!(back, made, "{}: JSON round trip", case.display());
    }
}

// ---- fixture construction (inputs) ----

struct Fixture<'a> {
    node: &'a str,
    observed: Observed,
}

impl<'a> Fixture<'a> {
    fn new(node: &'a str) -> Self {
        let observed = Observed {
            format: OBSERVED_FORMAT,
            node: node.to_string(),
            conntrack: ConntrackState {
                available: true,
                unavailable_reason: None,
                flows: Vec::new(),
                table_count: 0,
                table_max: 262_144,
            },
            ..Observed::default()
        };
        Fixture { node, observed }
    }

    fn table(mut self, redirects: &[Redirect]) -> Self {
        self.observed.nft.tables.push(host_table(redirects));
        self
    }

    fn raw_table(mut self, table: NftTable) -> Self {
        self.observed.nft.tables.push(table);
        self
    }

    /// A container of `service` made from `from` (a spec: the current one or an older one).
    fn container(self, from: &Spec, service: &str, slot: Slot, state: &str) -> Self {
        self.container_at(from, service, slot, state, None)
    }

    /// Like [`Fixture::container`], made from the image at `digest` (`pull: always`).
    fn container_at(
        mut self,
        from: &Spec,
        service: &str,
        slot: Slot,
        state: &str,
        digest: Option<&str>,
    ) -> Self {
        let mut desired = desired_node(from, self.node);
        let (spec, c) = desired
            .services
            .iter_mut()
            .find(|(s, _)| s.name.value == service)
            .expect("service on node");
        c.digest = digest.map(str::to_string);
        let n = self.observed.containers.len() + 1;
        self.observed.containers.push(Container {
            id: format!("{n:0>12}"),
            name: container_name(service, self.node, slot),
            service: service.to_string(),
            slot,
            spec_hash: c.spec_hash(),
            image: c.image.clone(),
            ports: c.port_labels(),
            state: state.to_string(),
            health: None,
            pid: (state == "running").then_some(1000 + n as u32),
            address: c.address.clone(),
            stop_timeout: Some(spec.upgrade.stop_timeout.value),
            digest: c.digest.clone(),
        });
        self.observed.containers.sort_by(|a, b| a.name.cmp(&b.name));
        self
    }

    /// Every replica of routed `service` that `from` puts on this node, as
    /// running primaries.
    fn replicas(mut self, from: &Spec, service: &str) -> Self {
        let desired = desired_node(from, self.node);
        for (spec, c) in desired
            .services
            .iter()
            .filter(|(s, _)| s.name.value == service)
        {
            let n = self.observed.containers.len() + 1;
            self.observed.containers.push(Container {
                id: format!("{n:0>12}"),
                name: replica_container_name(service, self.node, c.replica_number(), Slot::Primary),
                service: service.to_string(),
                slot: Slot::Primary,
                spec_hash: c.spec_hash(),
                image: c.image.clone(),
                ports: c.port_labels(),
                state: "running".into(),
                health: None,
                pid: Some(1000 + n as u32),
                address: c.address.clone(),
                stop_timeout: Some(spec.upgrade.stop_timeout.value),
                digest: None,
            });
        }
        self.observed.containers.sort_by(|a, b| a.name.cmp(&b.name));
        self
    }

    fn flows(
        mut self,
        protocol: &str,
        orig_dport: u16,
        reply_sport: u16,
        state: &str,
        count: u64,
    ) -> Self {
        self.observed.conntrack.flows.push(FlowCount {
            protocol: protocol.into(),
            orig_dport,
            reply_sport,
            state: state.into(),
            count,
        });
        self.observed.conntrack.table_count += count;
        self
    }

    /// Everything routed mode sets up for `spec` on this node, as if applied:
    /// rules, routes, VIPs, kernel settings, lessnat's table, and a veth for
    /// each running routed container.
    fn routed_in_place(mut self, spec: &Spec) -> Self {
        self.observed.routing = desired_routing(spec, self.node);
        self.observed.addresses = desired_addresses(spec, self.node);
        self.observed.sysctls = desired_sysctls(spec, self.node);
        self.observed.nft.tables = desired_table(spec, self.node, &self.observed)
            .into_iter()
            .collect();
        for c in &self.observed.containers {
            if let (Some(address), "running") = (&c.address, c.state.as_str()) {
                self.observed.veths.push(Veth {
                    name: veth_name(&c.service, address),
                    service: c.service.clone(),
                    address: address.clone(),
                    up: true,
                });
            }
        }
        self.observed.veths.sort();
        self
    }

    /// Load-balancer probes: `healthy` addresses answered, the others did not.
    fn probes(mut self, service: &str, healthy: &[&str], unhealthy: &[&str]) -> Self {
        for (list, ok) in [(healthy, true), (unhealthy, false)] {
            for address in list {
                self.observed.probes.push(Probe {
                    service: service.into(),
                    address: (*address).into(),
                    healthy: ok,
                    detail: (!ok).then(|| format!("{address}:8080: connection refused")),
                });
            }
        }
        self.observed.probes.sort();
        self
    }

    /// The engine has `reference`, known in its registry by `digests`.
    fn image(mut self, reference: &str, digests: &[&str]) -> Self {
        let repository = reference.rsplit_once(':').map_or(reference, |(r, _)| r);
        self.observed.images.retain(|i| i.reference != reference);
        self.observed.images.push(Image {
            reference: reference.to_string(),
            id: format!("sha256:{:0>64}", self.observed.images.len() + 1),
            digests: digests
                .iter()
                .map(|d| format!("{repository}@{d}"))
                .collect(),
        });
        self.observed.images.sort();
        self
    }

    /// `pull: always`: the registry says `reference`'s tag is at `digest`.
    fn remote(mut self, reference: &str, digest: &str) -> Self {
        self.observed.remote_digests.push(RemoteDigest {
            reference: reference.to_string(),
            digest: digest.to_string(),
        });
        self
    }

    /// Writes the fixture; the engine has the images of its containers.
    fn write(mut self, case: &str) {
        let containers: Vec<(String, Option<String>)> = self
            .observed
            .containers
            .iter()
            .map(|c| (c.image.clone(), c.digest.clone()))
            .collect();
        for (image, digest) in containers {
            if !self.observed.images.iter().any(|i| i.reference == image) {
                let digests: Vec<&str> = digest.as_deref().into_iter().collect();
                self = self.image(&image, &digests);
            }
        }
        let dir = cases_dir().join(case);
        std::fs::create_dir_all(&dir).expect("case dir");
        let text = serde_json::to_string_pretty(&self.observed).expect("serialise") + "\n";
        std::fs::write(dir.join("observed.json"), text).expect("write observed.json");
    }
}

fn spec_text(case: &str) -> String {
    std::fs::read_to_string(cases_dir().join(case).join("spec.yaml")).expect("spec.yaml")
}

fn spec_from(text: &str) -> Spec {
    load_bytes("fixture.yaml", text.as_bytes())
        .unwrap_or_else(|r| panic!("{}", r.render(Style::Plain)))
}

const TCP_8000: Redirect = Redirect {
    protocol: Protocol::Tcp,
    port: 8000,
    temp_port: 18000,
};

#[test]
#[ignore = "writes the observed.json fixtures; run by hand when their shape changes"]
fn write_observed_fixtures() {
    // Host mode, one service.
    let host = spec_text("fresh-install");
    let current = spec_from(&host);
    let older = spec_from(&host.replace("web:2.1", "web:2.0"));
    let other = spec_from(&host.replace("web:2.1", "web:2.2"));

    Fixture::new("web-1").write("fresh-install");
    Fixture::new("web-1").write("empty-host");
    Fixture::new("web-1")
        .table(&[])
        .container(&current, "web", Slot::Primary, "running")
        .write("no-changes");
    Fixture::new("web-1")
        .table(&[])
        .container(&older, "web", Slot::Primary, "running")
        .flows("tcp", 8000, 8000, "ESTABLISHED", 4)
        .write("upgrade-image");
    // A canary: the same upgrade with a split first; and one found holding
    // (its rules in the table, no redirect), whose hold starts again.
    let canary = spec_from(&spec_text("in-flight-canary"));
    Fixture::new("web-1")
        .table(&[])
        .container(&older, "web", Slot::Primary, "running")
        .flows("tcp", 8000, 8000, "ESTABLISHED", 4)
        .write("canary-upgrade");
    let mut split = host_table(&[]);
    add_canary(
        &mut split,
        &canary_rules(&canary.services[0], "10%".parse().expect("a share")),
    );
    Fixture::new("web-1")
        .raw_table(split)
        .container(&older, "web", Slot::Primary, "running")
        .container(&canary, "web", Slot::Next, "running")
        .flows("tcp", 8000, 8000, "ESTABLISHED", 9)
        .flows("tcp", 8000, 18000, "ESTABLISHED", 1)
        .write("in-flight-canary");
    Fixture::new("web-1")
        .table(&[])
        .container(&older, "web", Slot::Primary, "running")
        .container(&current, "web", Slot::Next, "running")
        .write("in-flight-start-next");
    Fixture::new("web-1")
        .table(&[TCP_8000])
        .container(&older, "web", Slot::Primary, "running")
        .container(&current, "web", Slot::Next, "running")
        .flows("tcp", 8000, 8000, "ESTABLISHED", 3)
        .flows("tcp", 8000, 8000, "TIME_WAIT", 40)
        .flows("tcp", 8000, 18000, "ESTABLISHED", 12)
        .write("in-flight-drain");
    Fixture::new("web-1")
        .table(&[TCP_8000])
        .container(&older, "web", Slot::Prev, "exited")
        .container(&current, "web", Slot::Next, "running")
        .write("in-flight-swap-started");
    Fixture::new("web-1")
        .table(&[TCP_8000])
        .container(&older, "web", Slot::Prev, "exited")
        .container(&current, "web", Slot::Primary, "running")
        .container(&current, "web", Slot::Next, "running")
        .write("in-flight-swapped");
    Fixture::new("web-1")
        .table(&[])
        .container(&older, "web", Slot::Prev, "exited")
        .container(&current, "web", Slot::Primary, "running")
        .container(&current, "web", Slot::Next, "running")
        .flows("tcp", 8000, 18000, "ESTABLISHED", 2)
        .write("in-flight-unredirected");
    Fixture::new("web-1")
        .table(&[])
        .container(&older, "web", Slot::Prev, "exited")
        .container(&current, "web", Slot::Primary, "running")
        .write("in-flight-finish");
    Fixture::new("web-1")
        .table(&[TCP_8000])
        .container(&older, "web", Slot::Primary, "running")
        .container(&current, "web", Slot::Next, "exited")
        .write("in-flight-next-died");
    Fixture::new("web-1")
        .table(&[TCP_8000])
        .container(&older, "web", Slot::Primary, "running")
        .container(&other, "web", Slot::Next, "running")
        .write("in-flight-spec-changed");
    Fixture::new("web-1")
        .table(&[TCP_8000])
        .container(&current, "web", Slot::Primary, "running")
        .write("drift-leftover-redirect");
    Fixture::new("web-1")
        .table(&[])
        .container(&current, "web", Slot::Primary, "exited")
        .write("drift-container-stopped");
    let mut broken = host_table(&[]);
    broken.chains[0].rules.remove(0);
    Fixture::new("web-1")
        .raw_table(broken)
        .container(&current, "web", Slot::Primary, "running")
        .write("drift-rule-deleted");
    let mut foreign = Fixture::new("web-1");
    foreign.observed.foreign_containers.push(ForeignContainer {
        id: "f00000000001".into(),
        name: "lessnat-web".into(),
    });
    foreign.write("drift-foreign-container");
    let mut alien =
        Fixture::new("web-1")
            .table(&[])
            .container(&current, "web", Slot::Primary, "running");
    alien.observed.nft.tables.push(NftTable {
        family: "ip".into(),
        name: "filter".into(),
        comment: None,
        chains: Vec::new(),
        maps: Vec::new(),
    });
    alien.write("foreign-table-ignored");
    let moved = spec_from(
        &spec_text("port-change")
            .replace("port: 8080", "port: 8000")
            .replace("tempPort: 18080", "tempPort: 18000"),
    );
    Fixture::new("web-1")
        .table(&[])
        .container(&moved, "web", Slot::Primary, "running")
        .write("port-change");
    let stop_start = spec_text("stop-start-upgrade");
    let stop_start_old = spec_from(&stop_start.replace("web:2.1", "web:2.0"));
    Fixture::new("web-1")
        .table(&[])
        .container(&stop_start_old, "web", Slot::Primary, "running")
        .write("stop-start-upgrade");

    // A service removed from the spec: its container and (no host service left) the table go.
    let removed_from = spec_from(&host);
    let mut removed =
        Fixture::new("web-1")
            .table(&[])
            .container(&removed_from, "web", Slot::Primary, "running");
    // Its recorded stopTimeout is what removal waits (the spec has no word on it any more).
    removed.observed.containers[0].stop_timeout = Some(HumanDuration::secs(45));
    removed.observed.routing.rules.push(IpRule {
        family: "inet".into(),
        priority: 27001,
        source: None,
        fwmark: Some(1),
        fwmask: None,
        table: 27001,
    });
    removed.observed.routing.routes.push(Route {
        table: 27001,
        destination: "default".into(),
        gateway: Some("192.0.2.2".into()),
        device: None,
    });
    removed.write("service-removed");

    // UDP: an upgrade shows that flows are moved by deleting conntrack entries.
    let udp = spec_text("udp-upgrade");
    let udp_old = spec_from(&udp.replace("resolver:1.4", "resolver:1.3"));
    Fixture::new("dns-1")
        .table(&[])
        .container(&udp_old, "resolver", Slot::Primary, "running")
        .flows("udp", 53, 53, "", 17)
        .write("udp-upgrade");

    // Routed: this node's replica moved address, another service's replica left the node.
    let routed = spec_text("routed-replicas");
    let routed_before = spec_from(&routed.replace("10.20.1.6", "10.20.1.5").replace(
        "- { node: web-2, address: 10.20.2.7 }",
        "- { node: web-1, address: 10.20.1.7 }",
    ));
    Fixture::new("web-1")
        .container(&routed_before, "api", Slot::Primary, "running")
        .container(&routed_before, "search", Slot::Primary, "running")
        .routed_in_place(&routed_before)
        .write("routed-replicas");

    // Routed, load-balancer node, nothing set up yet: VIP, routes, table.
    let example =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/routed.yaml"))
            .expect("examples/routed.yaml");
    let routed_v7 = spec_from(&example);
    Fixture::new("lb-1")
        .probes(
            "api",
            &["10.20.1.5", "10.20.2.5"],
            &["10.20.1.254", "10.20.2.254"],
        )
        .write("routed-lb-fresh");

    // Routed, load-balancer node, an upgrade under way on the workers: web-1's
    // next version answers at 10.20.1.254 (switch), web-2's does not yet (stay).
    let mut switching = Fixture::new("lb-1")
        .probes(
            "api",
            &["10.20.1.5", "10.20.2.5"],
            &["10.20.1.254", "10.20.2.254"],
        )
        .routed_in_place(&routed_v7);
    switching.observed.probes.clear();
    switching
        .probes(
            "api",
            &["10.20.1.5", "10.20.1.254", "10.20.2.5"],
            &["10.20.2.254"],
        )
        .write("routed-lb-switch");

    // Routed, load-balancer node, health: web-2's replica answers at neither
    // address (killed): it leaves the spread; once the table leaves it out it
    // stays out (a line in the plan, no change); when it answers again it
    // rejoins. When no replica answers, all stay in, with a warning.
    let serving = &["10.20.1.5", "10.20.2.5"];
    let spare = &["10.20.1.254", "10.20.2.254"];
    let web_2_down = &["10.20.1.254", "10.20.2.5", "10.20.2.254"];
    // The table in place was written from probes at `LEFT_AT`; the plan's
    // probes ran 3m12s later.
    const LEFT_AT: u64 = 1_796_000_000;
    let balanced = |healthy: &[&str], unhealthy: &[&str]| {
        let mut lb = Fixture::new("lb-1");
        lb.observed.probed_at = Some(LEFT_AT);
        let mut lb = lb
            .probes("api", healthy, unhealthy)
            .routed_in_place(&routed_v7);
        lb.observed.probes.clear();
        lb.observed.probed_at = Some(LEFT_AT + 192);
        lb
    };
    balanced(serving, spare)
        .probes("api", &["10.20.1.5"], web_2_down)
        .write("routed-lb-replica-down");
    balanced(&["10.20.1.5"], web_2_down)
        .probes("api", &["10.20.1.5"], web_2_down)
        .write("routed-lb-replica-stays-out");
    balanced(&["10.20.1.5"], web_2_down)
        .probes("api", serving, spare)
        .write("routed-lb-replica-back");
    balanced(serving, spare)
        .probes(
            "api",
            &[],
            &["10.20.1.5", "10.20.1.254", "10.20.2.5", "10.20.2.254"],
        )
        .write("routed-lb-all-down");

    // Routed worker: the container is current and running but lost its veth
    // (Docker restarted it): wire it in again.
    let mut rewire = Fixture::new("web-1")
        .container(&routed_v7, "api", Slot::Primary, "running")
        .routed_in_place(&routed_v7);
    rewire.observed.veths.clear();
    rewire.write("routed-rewire");

    // Routed worker: someone deleted a reply rule and turned src_valid_mark off.
    let mut drifted = Fixture::new("web-1")
        .container(&routed_v7, "api", Slot::Primary, "running")
        .routed_in_place(&routed_v7);
    drifted
        .observed
        .routing
        .rules
        .retain(|r| r.priority != 27002);
    drifted
        .observed
        .sysctls
        .insert("net.ipv4.conf.all.src_valid_mark".into(), "0".into());
    drifted.write("routed-drift");

    // Routed worker with a canary and `maxParallel: 2`: four replicas of the
    // previous version run; the upgrade goes in two batches of two.
    let canary_v7 = spec_from(&spec_text("routed-canary-batch").replace("api:8", "api:7"));
    Fixture::new("web-1")
        .replicas(&canary_v7, "api")
        .routed_in_place(&canary_v7)
        .write("routed-canary-batch");

    // Routed, load-balancer node, the worker holds a canary: replica 1's next
    // version answers at 10.20.1.11 while the old one still answers at
    // 10.20.1.10 (stay: a line in the plan, no change); replica 2's old
    // version stopped answering this node's probes (the worker promoted it:
    // switch).
    let mut holding = Fixture::new("lb-1")
        .probes(
            "api",
            &["10.20.1.10", "10.20.1.12", "10.20.1.14", "10.20.1.16"],
            &["10.20.1.11", "10.20.1.13", "10.20.1.15", "10.20.1.17"],
        )
        .routed_in_place(&canary_v7);
    holding.observed.probes.clear();
    holding
        .probes(
            "api",
            &[
                "10.20.1.10",
                "10.20.1.11",
                "10.20.1.13",
                "10.20.1.14",
                "10.20.1.16",
            ],
            &["10.20.1.12", "10.20.1.15", "10.20.1.17"],
        )
        .write("routed-lb-canary-holding");

    // Conntrack nearly full: a warning.
    let mut full =
        Fixture::new("web-1")
            .table(&[])
            .container(&current, "web", Slot::Primary, "running");
    full.observed.conntrack.table_count = 255_000;
    full.observed.warnings.push("conntrack table is 97% full (255000 of 262144): new flows may be dropped and drain counts are unreliable; raise net.netfilter.nf_conntrack_max".into());
    full.write("warning-conntrack-full");

    // `pull: always`: the registry's tag moved from the digest the running
    // container was made from; the engine has only the old one.
    let always = spec_from(&spec_text("pull-always-digest-moved"));
    let old = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    let new = "sha256:2222222222222222222222222222222222222222222222222222222222222222";
    Fixture::new("web-1")
        .table(&[])
        .container_at(&always, "web", Slot::Primary, "running", Some(old))
        .remote("registry.example/web:2.1", new)
        .write("pull-always-digest-moved");
}
