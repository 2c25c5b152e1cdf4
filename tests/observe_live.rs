//! `lessnat show` and `lessnat plan` through the real binary against a live
//! host: a network namespace holding lessnat's table, a foreign table, foreign
//! and lessnat-range routing, and Docker containers of every kind (lessnat's,
//! a foreign one using lessnat's names, an unrelated one, another node's).
//!
//! What is checked: the snapshot holds exactly what lessnat owns, the plan
//! never mentions anything else, and neither command changes anything at all.

mod support;

use std::path::Path;
use std::process::{Command, Output};

use lessnat::backend::nft::apply_table;
use lessnat::desired::desired_node;
use lessnat::desired::host_table::host_table;
use lessnat::model::Redirect;
use lessnat::model::{IpRule, Observed, Route};
use lessnat::ownership::{LABEL_PORTS, LABEL_SERVICE, LABEL_SPEC, Slot, container_name};
use lessnat::plan::{Action, Decision, Plan, Resource, StageName};
use lessnat::spec::{Protocol, load_file};
use serde_json::Value;
use support::TestNetns;
use support::image::test_image;

/// Containers this test made, removed by id when dropped (also on panic).
#[derive(Default)]
struct Made {
    ids: Vec<String>,
}

impl Made {
    /// `docker create ARGS`; the container is removed at the end.
    fn create(&mut self, args: &[&str]) -> String {
        let mut full = vec!["create"];
        full.extend_from_slice(args);
        let output = support::run("docker", &full);
        let id = String::from_utf8_lossy(&output.stdout).trim().to_string();
        assert!(!id.is_empty(), "docker create printed no id");
        self.ids.push(id.clone());
        id
    }
}

impl Drop for Made {
    fn drop(&mut self) {
        for id in &self.ids {
            let _ = Command::new("docker").args(["rm", "-f", id]).output();
        }
    }
}

/// Runs the lessnat binary.
fn lessnat(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lessnat"))
        .args(args)
        .env_remove("LESSNAT_NODE")
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        .output()
        .expect("run lessnat")
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs lessnat and insists on `code`, showing its output otherwise.
fn lessnat_ok(args: &[&str], code: i32) -> String {
    let output = lessnat(args);
    assert_eq!(
        output.status.code(),
        Some(code),
        "lessnat {args:?}\nstdout:\n{}\nstderr:\n{}",
        text(&output.stdout),
        text(&output.stderr)
    );
    text(&output.stdout)
}

/// A one-service host-mode spec for `node`, written to a temporary file.
fn spec_file(dir: &Path, node: &str, service: &str, image: &str) -> std::path::PathBuf {
    let path = dir.join("spec.yaml");
    let yaml = format!(
        "version: 1\n\
         nodes:\n  - name: {node}\n    address: 192.0.2.10\n\
         services:\n  - name: {service}\n    node: {node}\n    image: {image}\n    \
         command: [\"--listen\", \":{{port}}\"]\n    \
         ports:\n      - {{ name: http, port: 8000, tempPort: 18000 }}\n"
    );
    std::fs::write(&path, yaml).expect("write the spec");
    path
}

/// Every string in a JSON value, and every number as text, to search for
/// things that must never be there.
fn leaves(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::String(s) => out.push(s.clone()),
        Value::Number(n) => out.push(n.to_string()),
        Value::Array(items) => items.iter().for_each(|v| leaves(v, out)),
        Value::Object(map) => {
            for (key, v) in map {
                out.push(key.clone());
                leaves(v, out);
            }
        }
        Value::Bool(_) | Value::Null => {}
    }
}

/// What must stay byte-for-byte the same when lessnat only reads.
fn host_snapshot(ns: &TestNetns, containers: &[&str]) -> Vec<(String, String)> {
    let mut snapshot = Vec::new();
    let mut take = |what: &str, output: Output| {
        assert!(output.status.success(), "{what}: {}", text(&output.stderr));
        snapshot.push((what.to_string(), text(&output.stdout)));
    };
    take(
        "nft list table ip foreign",
        ns.exec("nft", &["list", "table", "ip", "foreign"]),
    );
    take(
        "nft list table inet lessnat",
        ns.exec("nft", &["list", "table", "inet", "lessnat"]),
    );
    take("nft list ruleset", ns.exec("nft", &["list", "ruleset"]));
    take("ip rule show", ns.exec("ip", &["rule", "show"]));
    take("ip -6 rule show", ns.exec("ip", &["-6", "rule", "show"]));
    take(
        "ip route show table all",
        ns.exec("ip", &["route", "show", "table", "all"]),
    );
    for id in containers {
        take(
            &format!("docker inspect {id}"),
            support::run("docker", &["inspect", id]),
        );
    }
    snapshot
}

fn assert_unchanged(before: &[(String, String)], after: &[(String, String)], doing: &str) {
    assert_eq!(before.len(), after.len());
    for ((what, old), (_, new)) in before.iter().zip(after) {
        assert_eq!(old, new, "{doing} changed `{what}`");
    }
}

#[test]
fn show_and_plan_see_only_what_lessnat_owns_and_change_nothing() {
    let test = "show_and_plan_see_only_what_lessnat_owns_and_change_nothing";
    if !support::root_with(test, &["nft"]) || !support::docker(test) {
        return;
    }
    let image = test_image("v1");
    let pid = std::process::id();
    let node = format!("lnt{pid}");
    let service = format!("web{pid}");
    let dir = tempfile::tempdir().expect("temporary directory");
    let spec_path = spec_file(dir.path(), &node, &service, &image);
    let spec = load_file(&spec_path).expect("the test spec is valid");
    let desired = desired_node(&spec, &node);
    let desired_hash = desired.services[0].1.spec_hash();

    // --- nftables and routing inside the namespace.
    let ns = TestNetns::new("obs");
    let redirect = Redirect {
        protocol: Protocol::Tcp,
        port: 8000,
        temp_port: 18000,
    };
    let table = host_table(&[redirect]);
    apply_table(&ns.netns(), &table).expect("apply lessnat's table");
    ns.nft(
        "table ip foreign { chain c { type filter hook input priority 0; tcp dport 9 drop; }; }",
    );
    let ip = |args: &str| {
        ns.exec("ip", &args.split_whitespace().collect::<Vec<_>>());
    };
    // A veth pair with both ends inside the namespace to route through: this
    // kernel has no `dummy` link type. No IPv6 link-local addresses: they would
    // appear (with their local routes) whenever duplicate address detection
    // finishes, and change the routing snapshot behind lessnat's back.
    ip("link add v0 type veth peer name v1");
    ip("link set v0 addrgenmode none");
    ip("link set v1 addrgenmode none");
    ip("link set v0 up");
    ip("link set v1 up");
    ip("rule add priority 100 lookup 100");
    ip("route add 10.98.0.0/24 dev v0 table 100");
    ip("rule add priority 27001 lookup 27001");
    ip("route add 10.99.0.0/24 dev v0 table 27001");

    // --- Containers. Labelled ones for this node, a foreign one holding one of
    // lessnat's names, an unrelated one, and a labelled one of another node.
    let mut made = Made::default();
    let primary_name = container_name(&service, &node, Slot::Primary);
    let next_name = container_name(&service, &node, Slot::Next);
    let prev_name = container_name(&service, &node, Slot::Prev);
    let other_node_name = container_name(&service, &format!("lnx{pid}"), Slot::Primary);
    let unrelated_name = format!("lnt{pid}-unrelated");
    let label_service = format!("{LABEL_SERVICE}={service}");
    let label_ports = format!("{LABEL_PORTS}=8000/tcp");
    let old_spec = format!("{LABEL_SPEC}=0123456789abcdef");
    let new_spec = format!("{LABEL_SPEC}={desired_hash}");
    let labelled = |name: &str, spec_label: &str, port: &str| -> Vec<String> {
        [
            "--name",
            name,
            "--network",
            "none",
            "--label",
            &label_service,
            "--label",
            spec_label,
            "--label",
            &label_ports,
            &image,
            "--listen",
            port,
        ]
        .map(str::to_string)
        .to_vec()
    };
    let primary = made.create(&strs(&labelled(&primary_name, &old_spec, ":8000")));
    support::run("docker", &["start", &primary]);
    let next = made.create(&strs(&labelled(&next_name, &new_spec, ":18000")));
    let other_node = made.create(&strs(&labelled(&other_node_name, &new_spec, ":8000")));
    let foreign = made.create(&["--name", &prev_name, "--network", "none", &image]);
    let unrelated = made.create(&["--name", &unrelated_name, "--network", "none", &image]);

    let all = [&primary, &next, &other_node, &foreign, &unrelated].map(String::as_str);
    let before = host_snapshot(&ns, &all);

    // --- lessnat show --json: the snapshot, field by field.
    let shown = lessnat_ok(&["show", "--json", "--netns", &ns.name, "--node", &node], 0);
    let observed: Observed = serde_json::from_str(&shown)
        .unwrap_or_else(|e| panic!("show --json is not an Observed ({e}):\n{shown}"));
    assert_eq!(observed.format, 1);
    assert_eq!(observed.node, node);
    assert_eq!(
        observed.nft.tables,
        vec![table.clone()],
        "lessnat's table, and only it"
    );
    let redirect_tcp = &observed.nft.tables[0].maps[0];
    assert_eq!(redirect_tcp.name, "redirect_tcp");
    assert_eq!(redirect_tcp.elements.len(), 1);
    assert_eq!(redirect_tcp.elements[0].key, serde_json::json!(8000));
    assert_eq!(redirect_tcp.elements[0].value, serde_json::json!(18000));
    assert_eq!(
        observed.routing.rules,
        vec![IpRule {
            family: "inet".into(),
            priority: 27001,
            source: None,
            fwmark: None,
            fwmask: None,
            table: 27001,
        }]
    );
    assert_eq!(
        observed.routing.routes,
        vec![Route {
            table: 27001,
            destination: "10.99.0.0/24".into(),
            gateway: None,
            device: Some("v0".into()),
        }]
    );

    assert_eq!(
        observed
            .containers
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>(),
        [primary_name.as_str(), next_name.as_str()],
        "this node's labelled containers, sorted by name"
    );
    let (p, n) = (&observed.containers[0], &observed.containers[1]);
    assert_eq!(
        (p.id.as_str(), p.service.as_str()),
        (primary.as_str(), service.as_str())
    );
    assert_eq!(p.slot, Slot::Primary);
    assert_eq!(p.state, "running");
    assert!(
        p.pid.is_some_and(|pid| pid > 1),
        "running primary has a pid: {p:?}"
    );
    assert_eq!(p.spec_hash, "0123456789abcdef");
    assert_eq!(p.image, image);
    assert_eq!(p.ports, vec!["8000/tcp"]);
    assert_eq!(p.health, None);
    assert_eq!(
        (n.id.as_str(), n.service.as_str()),
        (next.as_str(), service.as_str())
    );
    assert_eq!(n.slot, Slot::Next);
    assert_eq!(n.state, "created");
    assert_eq!(n.pid, None);
    assert_eq!(n.spec_hash, desired_hash);
    assert_eq!(n.image, image);

    assert_eq!(
        observed.foreign_containers.len(),
        1,
        "{:?}",
        observed.foreign_containers
    );
    assert_eq!(observed.foreign_containers[0].id, foreign);
    assert_eq!(observed.foreign_containers[0].name, prev_name);

    assert!(observed.conntrack.available, "{:?}", observed.conntrack);
    assert_eq!(observed.conntrack.unavailable_reason, None);
    assert!(observed.warnings.is_empty(), "{:?}", observed.warnings);
    for absent in [&unrelated, &unrelated_name, &other_node, &other_node_name] {
        assert!(
            !shown.contains(absent.as_str()),
            "show lists {absent}:\n{shown}"
        );
    }
    for absent in ["\"foreign\"", "ip foreign", "dport 9", "10.98.0.0"] {
        assert!(!shown.contains(absent), "show lists {absent}:\n{shown}");
    }

    // --- lessnat plan --json and --detailed-exitcode.
    let spec_arg = spec_path.to_string_lossy().into_owned();
    let common = ["-f", &spec_arg, "--netns", &ns.name, "--node", &node];
    let json = lessnat_ok(&[&["plan", "--json"][..], &common].concat(), 0);
    let detailed = lessnat(&[&["plan", "--detailed-exitcode"][..], &common].concat());
    assert_eq!(
        detailed.status.code(),
        Some(2),
        "changes: exit 2\n{}",
        text(&detailed.stderr)
    );
    let plan_text = text(&detailed.stdout);

    let value: Value = serde_json::from_str(&json).expect("plan --json is JSON");
    let mut strings = Vec::new();
    leaves(&value, &mut strings);
    for s in &strings {
        assert_ne!(s, "foreign", "the plan mentions the foreign table:\n{json}");
        for never in [
            "ip foreign",
            "dport 9",
            "10.98.0.0",
            unrelated.as_str(),
            &unrelated[..12],
            unrelated_name.as_str(),
            other_node.as_str(),
            other_node_name.as_str(),
        ] {
            assert!(
                !s.contains(never),
                "the plan mentions {never:?} in {s:?}:\n{json}"
            );
        }
    }
    for never in ["ip foreign", "dport 9", "10.98.0.0", "lnx", &unrelated_name] {
        assert!(
            !plan_text.contains(never),
            "the text plan mentions {never}:\n{plan_text}"
        );
    }

    let plan: Plan = serde_json::from_str(&json).expect("plan --json is a Plan");
    assert_eq!(plan.node, node);
    let addresses: Vec<(Action, String)> = plan
        .changes
        .iter()
        .map(|c| (c.action, c.resource.address()))
        .collect();
    assert_eq!(
        addresses,
        vec![
            (Action::Upgrade, format!("service.{service}")),
            (Action::Destroy, "ip_rule.inet.27001".to_string()),
            (Action::Destroy, "route.27001.10.99.0.0/24".to_string()),
        ],
        "the in-flight upgrade, then lessnat's leftover routing; the table is as it should be"
    );
    for change in &plan.changes {
        match &change.resource {
            Resource::IpRule { priority, .. } => assert_eq!(*priority, 27001),
            Resource::Route { table, .. } => assert_eq!(*table, 27001),
            Resource::NftTable { .. } => panic!("the table matches: {change:?}"),
            _ => {}
        }
    }
    let upgrade = plan.changes[0].upgrade.as_ref().expect("an upgrade");
    let in_flight = upgrade.in_flight.as_ref().expect("found in flight");
    assert_eq!(in_flight.reached, StageName::Redirect);
    assert_eq!(in_flight.decision, Decision::RollBack);
    assert_eq!(in_flight.why, "the next container is created");
    assert_eq!(
        upgrade.stages.iter().map(|s| s.name).collect::<Vec<_>>(),
        [StageName::Unredirect, StageName::RemoveNext]
    );
    assert_eq!(plan.conflicts.len(), 1, "{:?}", plan.conflicts);
    assert!(
        plan.conflicts[0].contains(&prev_name),
        "{:?}",
        plan.conflicts
    );
    assert!(plan.drift.is_empty(), "{:?}", plan.drift);
    assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);
    for expected in [
        format!(">> service.{service} (redirect-drain)"),
        "in flight: stage redirect done; roll back: the next container is created".to_string(),
        "- ip_rule.inet.27001".to_string(),
        "- route.27001.10.99.0.0/24".to_string(),
        "Plan: 0 to add, 0 to change, 2 to destroy, 1 to upgrade.".to_string(),
    ] {
        assert!(
            plan_text.contains(&expected),
            "no {expected:?} in:\n{plan_text}"
        );
    }

    // Reading changed nothing: not the foreign table, not lessnat's, not the
    // rules and routes, not a single container.
    let after = host_snapshot(&ns, &all);
    assert_unchanged(&before, &after, "show and plan");
}

#[test]
fn nothing_there_plans_a_fresh_install_and_creates_nothing() {
    let test = "nothing_there_plans_a_fresh_install_and_creates_nothing";
    if !support::root_with(test, &["nft"]) || !support::docker(test) {
        return;
    }
    let pid = std::process::id();
    // Not the other test's node: it runs at the same time on the same engine.
    let node = format!("lnt{pid}-fresh");
    let service = format!("web{pid}");
    let image = test_image("v1");
    let dir = tempfile::tempdir().expect("temporary directory");
    let spec_path = spec_file(dir.path(), &node, &service, &image);
    let spec_arg = spec_path.to_string_lossy().into_owned();
    let ns = TestNetns::new("fresh");
    let primary_name = container_name(&service, &node, Slot::Primary);
    let list_tables = || text(&ns.exec("nft", &["list", "tables"]).stdout);
    let containers_named = || {
        let output = support::run(
            "docker",
            &[
                "ps",
                "-a",
                "--filter",
                &format!("name={primary_name}"),
                "-q",
            ],
        );
        text(&output.stdout)
    };
    assert_eq!(list_tables(), "", "a new namespace has no tables");
    assert_eq!(containers_named(), "");

    let shown = lessnat_ok(&["show", "--json", "--netns", &ns.name, "--node", &node], 0);
    let observed: Observed = serde_json::from_str(&shown).expect("show --json");
    assert!(observed.nft.tables.is_empty(), "{observed:?}");
    assert!(observed.routing.rules.is_empty() && observed.routing.routes.is_empty());
    assert!(observed.containers.is_empty() && observed.foreign_containers.is_empty());

    let common = ["-f", &spec_arg, "--netns", &ns.name, "--node", &node];
    let plan_text = lessnat_ok(&[&["plan", "--detailed-exitcode"][..], &common].concat(), 2);
    for expected in [
        "+ nft_table.inet.lessnat".to_string(),
        format!("+ container.{primary_name}"),
        "Plan: 2 to add, 0 to change, 0 to destroy, 0 to upgrade.".to_string(),
    ] {
        assert!(
            plan_text.contains(&expected),
            "no {expected:?} in:\n{plan_text}"
        );
    }
    let table_at = plan_text
        .find("+ nft_table.inet.lessnat")
        .expect("table created");
    let container_at = plan_text.find("+ container.").expect("container created");
    assert!(
        table_at < container_at,
        "the table comes first:\n{plan_text}"
    );

    let json = lessnat_ok(&[&["plan", "--json"][..], &common].concat(), 0);
    let plan: Plan = serde_json::from_str(&json).expect("plan --json");
    assert_eq!(plan.summary().add, 2);
    assert!(
        plan.drift.is_empty() && plan.conflicts.is_empty(),
        "{plan:?}"
    );
    let table = plan.changes[0]
        .diff
        .iter()
        .map(|l| l.text.as_str())
        .collect::<Vec<_>>();
    assert!(
        plan.changes[0].diff.iter().all(|l| l.tag == '+')
            && table.contains(&"table inet lessnat {"),
        "the whole table is added: {table:#?}"
    );

    // Planning created nothing.
    assert_eq!(list_tables(), "");
    assert_eq!(containers_named(), "");
}
