//! The spec files shipped with lessnat, checked through the real binary:
//! examples are valid (for lessnat and for the JSON Schema), every invalid spec
//! in `testdata/invalid/` fails with exactly the message in its `.err` file, and
//! the committed JSON Schema is the one lessnat generates.
//!
//! Set `LESSNAT_BLESS=1` to rewrite the expected files from the current output
//! (then review the diff before committing).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn lessnat(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lessnat"))
        .args(args)
        .current_dir(root())
        .env_remove("NO_COLOR")
        .output()
        .expect("run lessnat")
}

fn blessing() -> bool {
    std::env::var_os("LESSNAT_BLESS").is_some_and(|v| v == "1")
}

/// Compares `actual` with the file at `expected`, or rewrites the file when blessing.
fn assert_golden(expected: &Path, actual: &str) {
    if blessing() {
        std::fs::write(expected, actual).expect("write golden file");
        return;
    }
    let want = std::fs::read_to_string(expected).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with LESSNAT_BLESS=1 to create it)",
            expected.display()
        )
    });
    assert!(
        want == actual,
        "{} differs from the output:\n--- expected\n{want}\n--- actual\n{actual}",
        expected.display()
    );
}

fn files_in(dir: &str, extension: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join(dir))
        .expect("read dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == extension))
        .collect();
    files.sort();
    files
}

fn relative(path: &Path) -> String {
    path.strip_prefix(root())
        .expect("inside the repo")
        .display()
        .to_string()
}

#[test]
fn every_invalid_spec_fails_with_its_expected_message() {
    let specs = files_in("testdata/invalid", "yaml");
    assert!(
        specs.len() >= 25,
        "the catalogue should hold at least 25 specs, has {}",
        specs.len()
    );
    for spec in specs {
        let name = relative(&spec);
        let output = lessnat(&["validate", "--no-color", &name]);
        assert_eq!(output.status.code(), Some(1), "{name} should be invalid");
        assert!(output.stdout.is_empty(), "{name}: nothing on stdout");
        let stderr = String::from_utf8(output.stderr).expect("utf-8 stderr");
        assert_golden(&spec.with_extension("err"), &stderr);
    }
}

#[test]
fn every_expected_message_has_its_spec() {
    for expected in files_in("testdata/invalid", "err") {
        assert!(
            expected.with_extension("yaml").exists(),
            "{} has no spec",
            expected.display()
        );
    }
}

#[test]
fn examples_are_valid() {
    let examples = files_in("examples", "yaml");
    assert!(examples.len() >= 3);
    let mut args = vec!["validate".to_string()];
    args.extend(examples.iter().map(|p| relative(p)));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let output = lessnat(&args);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        stdout.lines().filter(|l| l.contains(": valid (")).count(),
        examples.len()
    );
}

#[test]
fn examples_start_with_the_schema_modeline() {
    for example in files_in("examples", "yaml") {
        let text = std::fs::read_to_string(&example).expect("read example");
        assert_eq!(
            text.lines().next(),
            Some("# yaml-language-server: $schema=../schemas/lessnat.schema.json"),
            "{}",
            example.display()
        );
    }
}

fn yaml_to_json(text: &str) -> serde_json::Value {
    let mut options = serde_saphyr::Options::default();
    options.strict_booleans = true;
    serde_saphyr::from_str_with_options(text, options).expect("example parses as YAML")
}

fn committed_schema() -> serde_json::Value {
    let text =
        std::fs::read_to_string(root().join("schemas/lessnat.schema.json")).expect("read schema");
    serde_json::from_str(&text).expect("schema is JSON")
}

#[test]
fn examples_pass_the_json_schema() {
    let validator = jsonschema::draft7::new(&committed_schema()).expect("schema compiles");
    for example in files_in("examples", "yaml") {
        let text = std::fs::read_to_string(&example).expect("read example");
        let instance = yaml_to_json(&text);
        let errors: Vec<String> = validator
            .iter_errors(&instance)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{}: {errors:#?}", example.display());
    }
}

#[test]
fn json_schema_rejects_what_lessnat_rejects_structurally() {
    let validator = jsonschema::draft7::new(&committed_schema()).expect("schema compiles");
    for name in [
        "unknown-field-typos",
        "enum-protocol",
        "wrong-type-port",
        "lb-id-out-of-range",
        "missing-image",
    ] {
        let path = root().join(format!("testdata/invalid/{name}.yaml"));
        let text = std::fs::read_to_string(&path).expect("read spec");
        assert!(
            !validator.is_valid(&yaml_to_json(&text)),
            "the schema should reject {name}"
        );
    }
}

#[test]
fn committed_schema_is_current() {
    let output = lessnat(&["schema"]);
    assert!(output.status.success());
    let generated = String::from_utf8(output.stdout).expect("utf-8 schema");
    let generated_json: serde_json::Value =
        serde_json::from_str(&generated).expect("schema is JSON");
    assert_eq!(
        generated_json["$schema"], "http://json-schema.org/draft-07/schema#",
        "editors need draft-07"
    );
    assert_golden(&root().join("schemas/lessnat.schema.json"), &generated);
}

#[test]
fn oversized_spec_is_refused() {
    let dir = std::env::temp_dir().join(format!("lessnat-big-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("big.yaml");
    let mut text = String::from("version: 1\nnodes: []\nservices: []\n");
    text.push_str(&"# padding\n".repeat(lessnat::spec::MAX_SPEC_BYTES / 10 + 1));
    std::fs::write(&path, &text).expect("write big spec");
    let output = lessnat(&["validate", "--no-color", path.to_str().expect("utf-8 path")]);
    std::fs::remove_dir_all(&dir).expect("clean up");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("specs are limited to 1048576 bytes"),
        "{stderr}"
    );
}

#[test]
fn usage_errors_exit_1_and_help_exits_0() {
    let bad = lessnat(&["validate"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("FILE"));
    let help = lessnat(&["--help"]);
    assert_eq!(help.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&help.stdout).contains("validate"));
    let version = lessnat(&["--version"]);
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("lessnat {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn completions_and_man_page_are_generated() {
    let bash = lessnat(&["completions", "bash"]);
    assert!(bash.status.success());
    assert!(String::from_utf8_lossy(&bash.stdout).contains("_lessnat"));
    let man = lessnat(&["man"]);
    assert!(man.status.success());
    assert!(String::from_utf8_lossy(&man.stdout).contains(".TH LESSNAT 1"));
}

/// Every duration field shows its own description on hover in editors: the
/// duration schema is inlined with the field's description, not a shared
/// `$ref` whose description yaml-language-server would show instead.
#[test]
fn duration_fields_carry_their_own_descriptions() {
    fn walk(path: &str, schema: &serde_json::Value, found: &mut Vec<(String, String)>) {
        let Some(object) = schema.as_object() else {
            return;
        };
        if let Some(properties) = object.get("properties").and_then(|p| p.as_object()) {
            for (name, property) in properties {
                let is_duration = property["pattern"]
                    .as_str()
                    .is_some_and(|p| p.contains("ms|s|m|h"));
                if is_duration {
                    let description = property["description"].as_str().unwrap_or_default();
                    found.push((format!("{path}.{name}"), description.to_string()));
                }
            }
        }
        for (key, value) in object {
            walk(&format!("{path}/{key}"), value, found);
        }
    }
    let schema = committed_schema();
    assert!(
        !schema.to_string().contains("#/definitions/Duration"),
        "durations are referenced, not inlined"
    );
    let mut found = Vec::new();
    walk("", &schema, &mut found);
    let names: Vec<&str> = found.iter().map(|(path, _)| path.as_str()).collect();
    for expected in [
        "drainTimeout",
        "stopTimeout",
        "switchWait",
        "startTimeout",
        "interval",
    ] {
        assert!(
            names.iter().any(|n| n.ends_with(&format!(".{expected}"))),
            "no duration field {expected} in {names:?}"
        );
    }
    let mut descriptions = std::collections::BTreeSet::new();
    for (path, description) in &found {
        assert!(
            !description.is_empty() && !description.starts_with("A duration"),
            "{path} shows {description:?} instead of its own description"
        );
        descriptions.insert(description.as_str());
    }
    assert_eq!(
        descriptions.len(),
        found.len(),
        "two duration fields share a description: {found:?}"
    );
}

/// A valid spec whose host-mode tempPort lies in this host's ephemeral port
/// range is accepted with a warning on standard error that points at it.
#[test]
fn ports_in_the_ephemeral_range_are_warned_about() {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .unwrap_or_else(|_| "32768 60999".to_string());
    let low: u16 = range
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .expect("a port range");
    let inside = low + 1;
    let dir = tempfile::tempdir().expect("temp dir");
    let spec = dir.path().join("spec.yaml");
    std::fs::write(
        &spec,
        format!(
            "version: 1\nnodes: [{{name: a, address: 192.0.2.1}}]\nservices:\n  - name: web\n    node: a\n    image: web:1\n    ports: [{{name: http, port: 80, tempPort: {inside}}}]\n"
        ),
    )
    .expect("write spec");
    let output = lessnat(&["validate", spec.to_str().expect("utf-8 path")]);
    assert!(output.status.success(), "a warning is not an error");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!(
            "spec.yaml:7:46: warning: tempPort {inside} lies in this host's ephemeral port range"
        )),
        "{stderr}"
    );
    assert!(stderr.contains("1 warning"), "{stderr}");
}
