//! Prometheus metrics, made from the reconcile record and the suspend flag:
//! as a textfile for node_exporter's textfile collector (`--metrics-file`,
//! written atomically after each run) or served over HTTP at `/metrics`
//! (`--metrics-addr`, loop mode, through the agent's HTTP endpoint
//! `agent/http.rs`; each scrape reads the state directory, so it is current
//! even right after `lessnat suspend`).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;

use super::record::{Record, RecordError, RecordFile};
use super::suspend::{SuspendError, SuspendFile};
use crate::agent::http::{self, PROMETHEUS_TEXT, ServeError};
use crate::error::chain;

/// Making or publishing the metrics failed.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The record could not be read.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// The suspend flag could not be read.
    #[error(transparent)]
    Suspend(#[from] SuspendError),
    /// The textfile could not be written.
    #[error("cannot write the metrics file {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        cause: std::io::Error,
    },
    /// The HTTP endpoint could not be set up.
    #[error(transparent)]
    Serve(#[from] ServeError),
}

/// A label value with `\`, `"` and newlines escaped.
fn label(value: &str) -> String {
    value
        .replace('\\', r"\\")
        .replace('"', r#"\""#)
        .replace('\n', r"\n")
}

/// Appends one metric family: help, type and samples (`labels` without braces).
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {value}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    }
}

/// The metrics in Prometheus' text format.
pub fn render(record: &Record, suspended: bool) -> String {
    let mut out = String::new();
    let one = |value: f64| vec![(String::new(), value)];
    family(
        &mut out,
        "lessnat_last_success_timestamp_seconds",
        "gauge",
        "When reconcile last brought the node to its commit (applied, or found in sync); 0 if never.",
        &one(record.last_success.map_or(0.0, |t| t.unix_seconds())),
    );
    let applied: Vec<(String, f64)> = record
        .applied
        .iter()
        .map(|a| (format!("commit=\"{}\"", label(&a.commit)), 1.0))
        .collect();
    family(
        &mut out,
        "lessnat_applied_commit_info",
        "gauge",
        "The commit the node was last brought to.",
        &applied,
    );
    let run = record.last_run.as_ref();
    let drift: Vec<(String, f64)> = run
        .and_then(|r| r.drift)
        .map(|d| (String::new(), d as f64))
        .into_iter()
        .collect();
    family(
        &mut out,
        "lessnat_drift_changes",
        "gauge",
        "Changes the node needs to match the fetched commit, as of the last run (absent when that run did not get as far as a plan).",
        &drift,
    );
    let apply: Vec<(String, f64)> = record
        .last_apply_seconds
        .map(|s| (String::new(), s))
        .into_iter()
        .collect();
    family(
        &mut out,
        "lessnat_apply_duration_seconds",
        "gauge",
        "How long the last apply that changed something took.",
        &apply,
    );
    let upgrades: Vec<(String, f64)> = record
        .upgrade_seconds
        .iter()
        .map(|(service, s)| (format!("service=\"{}\"", label(service)), *s))
        .collect();
    family(
        &mut out,
        "lessnat_upgrade_duration_seconds",
        "gauge",
        "How long the last staged upgrade of each service took.",
        &upgrades,
    );
    family(
        &mut out,
        "lessnat_rollbacks_total",
        "counter",
        "Upgrades rolled back (failed and undone, or found half done and undone).",
        &one(record.totals.rollbacks as f64),
    );
    family(
        &mut out,
        "lessnat_reconcile_failures_total",
        "counter",
        "Reconcile runs that failed (fetch, invalid spec, observe, plan conflicts, apply).",
        &one(record.totals.failures as f64),
    );
    family(
        &mut out,
        "lessnat_consecutive_failures",
        "gauge",
        "Reconcile runs that failed in a row; the back-off grows with it.",
        &one(f64::from(record.backoff.consecutive_failures)),
    );
    family(
        &mut out,
        "lessnat_spec_errors",
        "gauge",
        "Problems found in the spec at the last fetched commit (0: valid, or not read).",
        &one(run.map_or(0.0, |r| r.spec_errors as f64)),
    );
    family(
        &mut out,
        "lessnat_suspended",
        "gauge",
        "1 while reconcile is suspended on this node (lessnat suspend).",
        &one(if suspended { 1.0 } else { 0.0 }),
    );
    if let Some(run) = run {
        family(
            &mut out,
            "lessnat_last_run_timestamp_seconds",
            "gauge",
            "When the last reconcile run started.",
            &one(run.started.unix_seconds()),
        );
        let mut labels = format!("outcome=\"{}\"", run.outcome.as_str());
        if let Some(stage) = run.stage {
            let _ = write!(labels, ",stage=\"{}\"", stage.as_str());
        }
        family(
            &mut out,
            "lessnat_last_run_info",
            "gauge",
            "How the last reconcile run ended: applied, in-sync, planned, suspended, refused or failed (with the stage).",
            &[(labels, 1.0)],
        );
    }
    out
}

/// The metrics of the state directory, as they stand now.
pub fn gather(state_dir: &Path) -> Result<String, MetricsError> {
    let record = RecordFile::in_dir(state_dir).read()?;
    let suspended = SuspendFile::in_dir(state_dir).read()?.is_some();
    Ok(render(&record, suspended))
}

/// Writes the metrics of `state_dir` to `path`, atomically (node_exporter
/// never reads half a file).
pub fn write_textfile(state_dir: &Path, path: &Path) -> Result<(), MetricsError> {
    let text = gather(state_dir)?;
    crate::atomic_file::write(path, text.as_bytes(), crate::atomic_file::READABLE).map_err(
        |cause| MetricsError::Write {
            path: path.to_path_buf(),
            cause,
        },
    )
}

/// Serves the metrics of `state_dir` at `http://ADDR/metrics` from a
/// background thread; every connection is its own task, so a slow client
/// holds up no other scrape. Returns the address bound (useful with port 0).
pub fn serve(addr: SocketAddr, state_dir: PathBuf) -> Result<SocketAddr, MetricsError> {
    let router = Router::new()
        .route(
            "/metrics",
            get(move || {
                let answer = gather(&state_dir);
                async move {
                    match answer {
                        Ok(text) => http::text(StatusCode::OK, PROMETHEUS_TEXT, text),
                        Err(error) => http::text(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "text/plain; charset=utf-8",
                            format!("{}\n", chain(&error)),
                        ),
                    }
                }
            }),
        )
        .fallback(http::not_found);
    Ok(http::serve(addr, router)?)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::gitops::record::{Applied, Outcome, Run, Stage, Timestamp};
    use crate::plan::Summary;

    fn sample() -> Record {
        let at = Timestamp(std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        let mut record = Record {
            applied: Some(Applied {
                commit: "0123456789abcdef0123456789abcdef01234567".into(),
                at,
                summary: Summary::default(),
            }),
            last_success: Some(at),
            last_run: Some(Run {
                started: at,
                seconds: 0.5,
                commit: Some("f".repeat(40)),
                outcome: Outcome::Failed,
                stage: Some(Stage::Spec),
                planned: None,
                drift: None,
                changed_outside: 0,
                spec_errors: 2,
                error: Some("bad".into()),
            }),
            last_apply_seconds: Some(21.5),
            ..Record::default()
        };
        record.upgrade_seconds.insert("web".into(), 20.25);
        record.totals.failures = 3;
        record.totals.rollbacks = 1;
        record.backoff.consecutive_failures = 2;
        record
    }

    #[test]
    fn renders_every_metric() {
        let text = render(&sample(), true);
        for line in [
            "lessnat_last_success_timestamp_seconds 1700000000",
            "lessnat_applied_commit_info{commit=\"0123456789abcdef0123456789abcdef01234567\"} 1",
            "lessnat_apply_duration_seconds 21.5",
            "lessnat_upgrade_duration_seconds{service=\"web\"} 20.25",
            "lessnat_rollbacks_total 1",
            "lessnat_reconcile_failures_total 3",
            "lessnat_consecutive_failures 2",
            "lessnat_spec_errors 2",
            "lessnat_suspended 1",
            "lessnat_last_run_info{outcome=\"failed\",stage=\"spec\"} 1",
            "# TYPE lessnat_drift_changes gauge",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(
            !text.lines().any(|l| l.starts_with("lessnat_drift_changes")),
            "no drift sample when the run did not plan:\n{text}"
        );
        let empty = render(&Record::default(), false);
        assert!(empty.contains("lessnat_last_success_timestamp_seconds 0\n"));
        assert!(empty.contains("lessnat_suspended 0\n"));
        assert!(!empty.contains("lessnat_applied_commit_info{"));
    }

    #[test]
    fn labels_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), r#"a\"b\\c\nd"#);
    }

    #[test]
    fn serves_metrics_over_http() {
        let dir = tempfile::tempdir().expect("temp dir");
        RecordFile::in_dir(dir.path())
            .write(&sample())
            .expect("record");
        let addr = serve(
            "127.0.0.1:0".parse().expect("addr"),
            dir.path().to_path_buf(),
        )
        .expect("serve");
        let get = |path: &str| {
            let mut stream = TcpStream::connect(addr).expect("connect");
            write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").expect("send");
            let mut response = String::new();
            stream.read_to_string(&mut response).expect("read");
            response
        };
        let response = get("/metrics");
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert!(response.contains("lessnat_reconcile_failures_total 3\n"));
        assert!(response.contains("lessnat_suspended 0\n"));
        SuspendFile::in_dir(dir.path())
            .suspend(None)
            .expect("suspend");
        assert!(get("/metrics").contains("lessnat_suspended 1\n"));
        assert!(get("/").starts_with("HTTP/1.1 404"));
    }

    #[test]
    fn a_client_that_sends_nothing_blocks_no_scrape() {
        let dir = tempfile::tempdir().expect("temp dir");
        let addr = serve(
            "127.0.0.1:0".parse().expect("addr"),
            dir.path().to_path_buf(),
        )
        .expect("serve");
        let silent: Vec<TcpStream> = (0..3)
            .map(|_| TcpStream::connect(addr).expect("connect"))
            .collect();
        let mut half = TcpStream::connect(addr).expect("connect");
        write!(half, "GET /metrics HTTP/1.1\r\n").expect("half a request");
        let started = Instant::now();
        let mut stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        write!(
            stream,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .expect("send");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("read");
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert!(response.contains("lessnat_suspended 0\n"), "{response}");
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(4),
            "a scrape waited {took:?} behind clients that sent nothing"
        );
        drop((silent, half));
    }

    #[test]
    fn textfile_is_written_whole() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("textfile").join("lessnat.prom");
        write_textfile(dir.path(), &path).expect("write");
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.ends_with("lessnat_suspended 0\n"), "{text}");
    }
}
