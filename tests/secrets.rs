//! Nothing lessnat writes holds a credential in clear: a token planted in
//! `reconcile --repo https://user:TOKEN@...` appears in no output stream,
//! no event, no metric and no file under the state directory, which only
//! root can read. (The fetch goes to a closed port on loopback and fails;
//! the failure is recorded everywhere a success would be.)

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

const TOKEN: &str = "planted-S3CRET-token-5f2a";

fn lessnat(state: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lessnat"))
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .env_remove("LESSNAT_STATE_DIR")
        .output()
        .expect("run lessnat")
}

/// Every file below `dir`, with its contents.
fn files(dir: &Path, found: &mut Vec<(String, Vec<u8>)>) {
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            files(&path, found);
        } else {
            found.push((
                path.display().to_string(),
                std::fs::read(&path).unwrap_or_default(),
            ));
        }
    }
}

#[test]
fn a_token_in_the_repository_url_is_written_nowhere() {
    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().join("state");
    let events = dir.path().join("events.jsonl");
    let metrics = dir.path().join("lessnat.prom");
    let repo = format!("https://deploy:{TOKEN}@127.0.0.1:9/ops/spec.git");
    let run = lessnat(
        &state,
        &[
            "reconcile",
            "--repo",
            &repo,
            "--path",
            "spec.yaml",
            "--events",
            "json",
            "--events-file",
            events.to_str().expect("utf-8"),
            "--metrics-file",
            metrics.to_str().expect("utf-8"),
        ],
    );
    assert_eq!(run.status.code(), Some(1), "the fetch cannot succeed");
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("deploy:***@127.0.0.1"), "{stderr}");
    let status = lessnat(&state, &["status", "--json"]);
    let mut written = vec![
        ("reconcile stdout".to_string(), run.stdout),
        ("reconcile stderr".to_string(), run.stderr),
        ("status stdout".to_string(), status.stdout),
        ("status stderr".to_string(), status.stderr),
        (
            "events".to_string(),
            std::fs::read(&events).expect("events were written"),
        ),
        (
            "metrics".to_string(),
            std::fs::read(&metrics).expect("metrics were written"),
        ),
    ];
    files(&state, &mut written);
    assert!(
        written.iter().any(|(name, _)| name.ends_with("/lock")),
        "the lock file is among the files checked"
    );
    for (name, bytes) in &written {
        assert!(
            !String::from_utf8_lossy(bytes).contains(TOKEN),
            "{name} holds the token in clear"
        );
    }
    let mode = std::fs::metadata(&state)
        .expect("state dir")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700, "the state directory is {mode:o}");
}
