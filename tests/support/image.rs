//! The project's own test images. Nothing can be pulled on the test machines,
//! so the images are `FROM scratch` with the test server (`testserver/`) built
//! as a static binary, one image per version: `lessnat-testserver:v1`, `:v2`...
//!
//! Several test binaries may ask at once: the build runs under a file lock in
//! `target/`, and an image is rebuilt only when the label that records what it
//! was built from (binary and Dockerfile) differs.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock, PoisonError};

/// Repository name of the test images.
pub const REPOSITORY: &str = "lessnat-testserver";
/// Image label holding the hash of the binary and Dockerfile an image was built from.
pub const BUILD_LABEL: &str = "io.lessnat.test.build";

/// The cargo target directory of this workspace.
fn target_dir() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    }
}

/// Holds the cross-process build lock while alive.
fn build_lock() -> File {
    let dir = target_dir();
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    let path = dir.join("lessnat-testserver.lock");
    let file = File::create(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    file.lock()
        .unwrap_or_else(|e| panic!("locking {}: {e}", path.display()));
    file
}

/// The static test server binary, built once per process (`cargo build` is a
/// quick no-op when it is up to date). It has its own target directory, so it
/// never waits for the lock of the build that runs the tests.
pub fn testserver_binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            let _lock = build_lock();
            let triple = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
            let target_dir = target_dir().join("testserver-static");
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
            let started = std::time::Instant::now();
            let output = Command::new(&cargo)
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .args(["build", "--release", "--quiet", "-p", "lessnat-testserver"])
                .args(["--target", &triple, "--target-dir"])
                .arg(&target_dir)
                .env_remove("CARGO_ENCODED_RUSTFLAGS")
                .env("RUSTFLAGS", "-C target-feature=+crt-static")
                .output()
                .unwrap_or_else(|e| panic!("running {cargo}: {e}"));
            assert!(
                output.status.success(),
                "building the static test server failed:\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
            eprintln!(
                "static lessnat-testserver ready in {:.1}s",
                started.elapsed().as_secs_f64()
            );
            target_dir
                .join(triple)
                .join("release")
                .join("lessnat-testserver")
        })
        .clone()
}

/// FNV-1a, 64 bits: enough to tell builds apart.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    parts
        .iter()
        .flat_map(|part| part.iter())
        .fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        })
}

fn docker(args: &[&str]) -> std::process::Output {
    Command::new("docker")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("docker {args:?}: {e}"))
}

/// The id and build label of an existing image, if there is one.
fn existing(tag: &str) -> Option<(String, String)> {
    let format = format!("{{{{.Id}}}} {{{{index .Config.Labels \"{BUILD_LABEL}\"}}}}");
    let output = docker(&["image", "inspect", "--format", &format, tag]);
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let (id, label) = text.trim().split_once(' ').unwrap_or((text.trim(), ""));
    Some((id.to_string(), label.to_string()))
}

/// The test image for `version` (letters, digits, `.`, `_`, `-`), built if
/// missing or stale; returns its reference, e.g. `lessnat-testserver:v1`. The
/// server in it reports `version` (`--version` is its entrypoint); give the
/// container `--listen`/`--udp` arguments as its command.
pub fn test_image(version: &str) -> String {
    assert!(
        !version.is_empty()
            && version.len() <= 64
            && version
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')),
        "test image version {version:?} must be letters, digits, '.', '_' or '-'"
    );
    static READY: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    let tag = format!("{REPOSITORY}:{version}");
    let mut ready = READY.lock().unwrap_or_else(PoisonError::into_inner);
    if ready.contains(version) {
        return tag;
    }
    let binary = testserver_binary();
    let bytes = fs::read(&binary).unwrap_or_else(|e| panic!("reading {}: {e}", binary.display()));
    let recipe = format!(
        "FROM scratch\nCOPY lessnat-testserver /\n\
         ENTRYPOINT [\"/lessnat-testserver\", \"--version\", \"{version}\"]\n"
    );
    let build = format!("{:016x}", fnv1a(&[&bytes, recipe.as_bytes()]));
    let dockerfile = format!("{recipe}LABEL {BUILD_LABEL}={build}\n");

    let _lock = build_lock();
    let old = existing(&tag);
    if old.as_ref().is_some_and(|(_, label)| *label == build) {
        ready.insert(version.to_string());
        return tag;
    }
    let context = target_dir()
        .join("testserver-image")
        .join(format!("{}-{version}", std::process::id()));
    fs::create_dir_all(&context).unwrap_or_else(|e| panic!("creating {}: {e}", context.display()));
    fs::copy(&binary, context.join("lessnat-testserver"))
        .unwrap_or_else(|e| panic!("copying the test server: {e}"));
    fs::write(context.join("Dockerfile"), dockerfile)
        .unwrap_or_else(|e| panic!("writing the Dockerfile: {e}"));
    let context_arg = context.to_string_lossy();
    let started = std::time::Instant::now();
    let output = docker(&["build", "--quiet", "--tag", &tag, &context_arg]);
    let _ = fs::remove_dir_all(&context);
    assert!(
        output.status.success(),
        "docker build {tag} failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("built {tag} in {:.1}s", started.elapsed().as_secs_f64());
    // The stale image this helper built before, now untagged; still in use by
    // a container, it stays.
    if let Some((old_id, old_label)) = old
        && !old_label.is_empty()
        && existing(&tag).is_some_and(|(id, _)| id != old_id)
    {
        let _ = docker(&["image", "rm", &old_id]);
    }
    ready.insert(version.to_string());
    tag
}
