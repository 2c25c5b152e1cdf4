//! The `lessnat-testserver` binary: the test server of `src/lib.rs`.

use std::process::ExitCode;

fn main() -> ExitCode {
    lessnat_testserver::run(std::env::args().skip(1))
}
