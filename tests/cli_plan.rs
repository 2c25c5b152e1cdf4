//! `lessnat plan` and `lessnat show PLANFILE` through the real binary, against
//! observed-state snapshots (no privileges needed).

use std::path::PathBuf;
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn lessnat(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lessnat"))
        .args(args)
        .current_dir(root())
        .env_remove("LESSNAT_NODE")
        .output()
        .expect("run lessnat")
}

fn case(name: &str) -> (String, String) {
    (
        format!("testdata/plans/{name}/spec.yaml"),
        format!("testdata/plans/{name}/observed.json"),
    )
}

#[test]
fn detailed_exitcode_is_2_with_changes_and_0_without() {
    let (spec, observed) = case("fresh-install");
    let changed = lessnat(&[
        "plan",
        "-f",
        &spec,
        "--observed",
        &observed,
        "--detailed-exitcode",
    ]);
    assert_eq!(
        changed.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&changed.stderr)
    );
    let text = String::from_utf8_lossy(&changed.stdout);
    assert!(
        text.contains("Plan: 3 to add, 0 to change, 0 to destroy, 0 to upgrade."),
        "{text}"
    );
    assert!(
        text.contains("+ image.registry.example/web:2.1 will be pulled")
            || text.contains("# image.registry.example/web:2.1 will be pulled"),
        "{text}"
    );

    let (spec, observed) = case("no-changes");
    let same = lessnat(&[
        "plan",
        "-f",
        &spec,
        "--observed",
        &observed,
        "--detailed-exitcode",
    ]);
    assert_eq!(same.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&same.stdout).contains("No changes."));

    let plain = lessnat(&[
        "plan",
        "-f",
        &case("fresh-install").0,
        "--observed",
        &case("fresh-install").1,
    ]);
    assert_eq!(
        plain.status.code(),
        Some(0),
        "without --detailed-exitcode changes still exit 0"
    );
}

#[test]
fn json_plan_matches_the_golden_file() {
    let (spec, observed) = case("upgrade-image");
    let output = lessnat(&["plan", "-f", &spec, "--observed", &observed, "--json"]);
    assert!(output.status.success());
    let printed: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("JSON on stdout");
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("testdata/plans/upgrade-image/plan.json"))
            .expect("golden"),
    )
    .expect("golden JSON");
    assert_eq!(printed, golden);
    assert_eq!(printed["format"], lessnat::plan::PLAN_FORMAT);
    // The missing image is pulled first.
    assert_eq!(printed["changes"][0]["operation"]["op"], "pull-image");
    assert_eq!(
        printed["changes"][0]["operation"]["image"],
        "registry.example/web:2.1"
    );
    assert_eq!(printed["changes"][1]["action"], "upgrade");
    // The change carries what apply does, with the version it starts from.
    let operation = &printed["changes"][1]["operation"];
    assert_eq!(operation["op"], "upgrade");
    assert_eq!(operation["from"]["image"], "registry.example/web:2.0");
    assert_eq!(
        operation["workload"]["container"]["image"],
        "registry.example/web:2.1"
    );
}

#[test]
fn saved_plan_shows_the_same_plan() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("web.plan");
    let file = file.to_str().expect("utf-8 path");
    let (spec, observed) = case("in-flight-drain");
    let planned = lessnat(&[
        "plan",
        "-f",
        &spec,
        "--observed",
        &observed,
        "--out",
        file,
        "--no-color",
    ]);
    assert!(planned.status.success());
    let planned_text = String::from_utf8_lossy(&planned.stdout);
    assert!(
        planned_text.contains(&format!("Saved the plan to {file}")),
        "{planned_text}"
    );
    let shown = lessnat(&["show", file, "--no-color"]);
    assert!(shown.status.success());
    let shown_text = String::from_utf8_lossy(&shown.stdout);
    let golden = std::fs::read_to_string(root().join("testdata/plans/in-flight-drain/plan.txt"))
        .expect("golden");
    assert!(shown_text.ends_with(&golden), "{shown_text}");
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(file).expect("plan file")).expect("JSON");
    assert_eq!(
        saved["plan"]["fingerprint"]
            .as_str()
            .map(|f| f.starts_with("sha256:")),
        Some(true)
    );
    assert_eq!(saved["observed"]["node"], "web-1");

    // A plan file an older lessnat saved (format 1: no operations) is refused
    // with what to do, for show and apply alike.
    let mut old = saved.clone();
    old["format"] = serde_json::json!(1);
    std::fs::write(file, serde_json::to_vec(&old).expect("JSON")).expect("write old plan");
    for args in [vec!["show", file], vec!["apply", file, "--auto-approve"]] {
        let refused = lessnat(&args);
        assert_eq!(refused.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(
            stderr.contains("plan format 1")
                && stderr.contains("make the plan again with `lessnat plan --out`"),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn node_must_be_known_and_match_the_snapshot() {
    let (_, observed) = case("fresh-install");
    let many = lessnat(&[
        "plan",
        "-f",
        "examples/routed.yaml",
        "--observed",
        &observed,
    ]);
    assert_eq!(many.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&many.stderr).contains("--node NAME"));

    let unknown = lessnat(&[
        "plan",
        "-f",
        "examples/routed.yaml",
        "--node",
        "web-9",
        "--observed",
        &observed,
    ]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no node named `web-9`"));

    let other = lessnat(&[
        "plan",
        "-f",
        "examples/routed.yaml",
        "--node",
        "lb-1",
        "--observed",
        &observed,
    ]);
    assert_eq!(other.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&other.stderr).contains("was observed on node `web-1`"));
}

#[test]
fn invalid_spec_fails_plan_with_its_errors() {
    let output = lessnat(&[
        "plan",
        "-f",
        "testdata/invalid/unknown-node.yaml",
        "--observed",
        &case("fresh-install").1,
        "--no-color",
    ]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("unknown-node.yaml:7:11: error: no node named `web1`"),
        "{stderr}"
    );
    assert!(output.stdout.is_empty());
}

#[test]
fn a_plan_file_of_another_kind_is_refused() {
    let output = lessnat(&["show", "examples/host.yaml"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("is not a lessnat plan file"));
}
