//! The example systemd units are sandboxed: `systemd-analyze security`
//! (offline, on the unit files) rates each of them at most "OK", and they
//! name the capabilities lessnat needs. Skipped with a message where
//! `systemd-analyze` is missing.

use std::path::PathBuf;
use std::process::Command;

/// The highest exposure `systemd-analyze security` may report (10 is UNSAFE;
/// the units without a sandbox scored 9.6).
const MAX_EXPOSURE: f64 = 4.0;

fn unit(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("examples/systemd")
        .join(name)
}

/// The overall exposure of `name`, or `None` when systemd-analyze is missing.
fn exposure(name: &str) -> Option<f64> {
    let output = match Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(unit(name))
        .output()
    {
        Ok(output) => output,
        Err(error) => {
            eprintln!("SKIPPED: systemd-analyze is not available ({error})");
            return None;
        }
    };
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level for {name}:\n{text}"));
    let score = line
        .rsplit(':')
        .next()
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("no number in {line:?}"));
    Some(score)
}

#[test]
fn service_units_are_sandboxed() {
    for name in [
        "lessnat-apply.service",
        "lessnat-reconcile.service",
        "lessnat-agent.service",
    ] {
        let Some(score) = exposure(name) else {
            return;
        };
        assert!(
            score <= MAX_EXPOSURE,
            "{name}: exposure {score} is above {MAX_EXPOSURE}"
        );
        let text = std::fs::read_to_string(unit(name)).expect("unit file");
        for needed in [
            "CAP_NET_ADMIN",
            "CAP_SYS_ADMIN",
            "StateDirectoryMode=0700",
            "UMask=0077",
        ] {
            assert!(text.contains(needed), "{name} lacks {needed}");
        }
    }
}

#[test]
fn the_agent_unit_is_a_notify_service_that_always_restarts() {
    let text = std::fs::read_to_string(unit("lessnat-agent.service")).expect("unit file");
    for needed in [
        "Type=notify",
        "NotifyAccess=main",
        "Restart=always",
        "ExecStart=/usr/local/bin/lessnat agent -f",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(needed)),
            "lessnat-agent.service lacks {needed}"
        );
    }
}
