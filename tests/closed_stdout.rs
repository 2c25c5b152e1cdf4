//! A closed standard output (`lessnat … | head -1`) ends lessnat quietly with
//! exit 0, whatever the command was writing, and however far it got.
//!
//! Standard output is a pipe of one page, so outputs longer than that are
//! still being written when the reader goes away; each command also runs
//! with the reader gone before it starts, so every write of it fails.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use nix::fcntl::{FcntlArg, OFlag, fcntl};

/// Runs per command: the reader closes at a different point of the output each time.
const RUNS: usize = 25;

/// The pipe's size: the smallest Linux allows.
const PIPE_BYTES: i32 = 4096;

/// A pipe of [`PIPE_BYTES`]: its reading and writing ends.
fn small_pipe() -> (File, OwnedFd) {
    // Close-on-exec, so lessnat does not inherit the reading end and keep the pipe open.
    let (reader, writer) = nix::unistd::pipe2(OFlag::O_CLOEXEC).expect("pipe");
    fcntl(&reader, FcntlArg::F_SETPIPE_SZ(PIPE_BYTES)).expect("F_SETPIPE_SZ");
    (File::from(reader), writer)
}

/// Starts `lessnat args` with `stdout` as its standard output; `reading`
/// gets the reading end before lessnat is waited for.
fn lessnat(args: &[&str], stdout: OwnedFd, reading: impl FnOnce()) -> Output {
    let child = Command::new(env!("CARGO_BIN_EXE_lessnat"))
        .args(args)
        .current_dir(PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .env_remove("LESSNAT_NODE")
        .stdin(Stdio::null())
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn lessnat");
    reading();
    child.wait_with_output().expect("wait for lessnat")
}

/// Checks that lessnat exited 0 and said nothing on standard error.
fn assert_quiet(args: &[&str], how: &str, output: &Output) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(0),
        "lessnat {args:?} {how}: {stderr}"
    );
    assert!(
        stderr.is_empty(),
        "lessnat {args:?} {how} wrote to stderr: {stderr}"
    );
}

/// Runs `lessnat args` with its standard output closed after one line, and
/// closed from the start; it must end quietly every time.
fn closes_quietly(args: &[&str]) {
    for run in 0..RUNS {
        let (reader, writer) = small_pipe();
        let output = lessnat(args, writer, || {
            let mut reader = BufReader::new(reader);
            let mut first = String::new();
            reader.read_line(&mut first).expect("read the first line");
            assert!(!first.is_empty(), "lessnat {args:?} printed nothing");
        });
        assert_quiet(args, &format!("closed after one line (run {run})"), &output);
    }
    let (reader, writer) = small_pipe();
    drop(reader);
    let output = lessnat(args, writer, || {});
    assert_quiet(args, "closed from the start", &output);
}

#[test]
fn completions() {
    closes_quietly(&["completions", "fish"]);
}

#[test]
fn man_page() {
    closes_quietly(&["man"]);
}

#[test]
fn schema() {
    closes_quietly(&["schema"]);
}

#[test]
fn plan_json() {
    closes_quietly(&[
        "plan",
        "--json",
        "-f",
        "testdata/plans/fresh-install/spec.yaml",
        "--observed",
        "testdata/plans/fresh-install/observed.json",
    ]);
}
