//! The demo app: the project's test server (`lessnat-testserver`), run by
//! `lessnat demo-server ARGS` inside the demo images. It answers `GET /` with
//! its version, `/healthz`, `/peer` (the client address it sees) and
//! `/hold?ms=N` (answers after N ms: a long-lived connection), and on SIGTERM
//! finishes the requests in progress before it exits.

use std::process::ExitCode;

/// Serves until SIGTERM or SIGINT; `args` as `lessnat-testserver` takes them
/// (`--version TEXT --listen ADDR:PORT ...`).
pub fn serve(args: &[String]) -> ExitCode {
    lessnat_testserver::run(args.iter().cloned())
}
