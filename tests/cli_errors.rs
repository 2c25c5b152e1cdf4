//! Errors through the real binary (no privileges needed): the last line
//! names each cause once, joined by `: `, and keeps the hint saying what to do.

use std::path::Path;
use std::process::Command;

use lessnat::gitops::record::RECORD_FILE;
use lessnat::journal::JOURNAL_FILE;

/// Runs lessnat with `args`; returns its exit code and standard error.
fn lessnat(args: &[&str]) -> (Option<i32>, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_lessnat"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("LESSNAT_STATE_DIR")
        .env_remove("LESSNAT_NODE")
        .output()
        .expect("run lessnat");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn assert_once(stderr: &str, part: &str) {
    assert_eq!(
        stderr.matches(part).count(),
        1,
        "{part:?} once in: {stderr}"
    );
}

/// What serde_json says about `text` (the cause lessnat must print once).
fn json_cause(text: &str) -> String {
    serde_json::from_str::<serde_json::Value>(text)
        .expect_err("not JSON")
        .to_string()
}

fn path_text(path: &Path) -> String {
    path.display().to_string()
}

#[test]
fn a_damaged_journal_is_named_with_its_cause_once_and_what_to_do() {
    let dir = tempfile::tempdir().expect("temp dir");
    let journal = dir.path().join(JOURNAL_FILE);
    std::fs::write(&journal, "{ not json").expect("write");
    let (code, stderr) = lessnat(&["status", "--state-dir", &path_text(dir.path())]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.starts_with("error: journal "), "{stderr}");
    assert_once(&stderr, &path_text(&journal));
    assert_once(&stderr, "move it aside");
    assert_once(&stderr, &json_cause("{ not json"));
}

#[test]
fn a_state_dir_that_is_a_file_gives_the_cause_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("state");
    std::fs::write(&file, "").expect("write");
    let (code, stderr) = lessnat(&["status", "--state-dir", &path_text(&file)]);
    assert_eq!(code, Some(1), "{stderr}");
    let cause = std::fs::read(file.join(RECORD_FILE))
        .expect_err("not a directory")
        .to_string();
    assert_once(&stderr, &path_text(&file.join(RECORD_FILE)));
    assert_once(&stderr, &cause);
}

#[test]
fn an_observed_file_that_is_not_json_gives_the_cause_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let observed = dir.path().join("observed.json");
    std::fs::write(&observed, "not json").expect("write");
    let (code, stderr) = lessnat(&[
        "plan",
        "-f",
        "testdata/plans/fresh-install/spec.yaml",
        "--observed",
        &path_text(&observed),
    ]);
    assert_eq!(code, Some(1), "{stderr}");
    assert_once(&stderr, &path_text(&observed));
    assert_once(&stderr, &json_cause("not json"));
}
