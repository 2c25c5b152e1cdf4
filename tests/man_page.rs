//! `lessnat man`: a page mandoc finds nothing wrong with (`-T lint -W
//! warning`), dated, describing every command itself instead of pointing at
//! per-command pages that do not exist. Skipped with a message where mandoc
//! is missing (`.ci/run` installs it).

use std::io::Write;
use std::process::{Command, Stdio};

fn man_page() -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_lessnat"))
        .arg("man")
        .output()
        .expect("run lessnat man");
    assert!(output.status.success());
    String::from_utf8(output.stdout).expect("roff is UTF-8")
}

#[test]
fn the_man_page_is_dated_and_self_contained() {
    let page = man_page();
    let title = page
        .lines()
        .find(|l| l.starts_with(".TH"))
        .expect("a .TH line");
    let date = title.split_whitespace().nth(3).unwrap_or_default();
    assert!(
        date.len() == 10 && date.as_bytes()[4] == b'-' && date.as_bytes()[7] == b'-',
        "no YYYY-MM-DD date in {title:?}"
    );
    assert!(
        !page.contains("lessnat\\-validate(1)") && !page.contains("(1)\n"),
        "the page refers to per-command pages"
    );
    for command in ["validate", "plan", "apply", "destroy", "reconcile", "demo"] {
        assert!(
            page.contains(&format!("\\fBlessnat {command}\\fR")),
            "the page does not describe `lessnat {command}`"
        );
    }
    assert!(!page.contains("demo-server"), "hidden commands are listed");
}

#[test]
fn mandoc_finds_nothing_to_warn_about() {
    let page = man_page();
    let mandoc = Command::new("mandoc")
        .args(["-T", "lint", "-W", "warning"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let Ok(mut mandoc) = mandoc else {
        eprintln!("SKIPPED: mandoc is not installed");
        return;
    };
    mandoc
        .stdin
        .take()
        .expect("stdin")
        .write_all(page.as_bytes())
        .expect("write the page");
    let output = mandoc.wait_with_output().expect("mandoc");
    let said = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success() && said.trim().is_empty(), "{said}");
}
