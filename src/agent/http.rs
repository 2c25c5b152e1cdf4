//! lessnat's HTTP endpoints (`/metrics`, `/healthz`): an axum router served
//! on a thread of its own with a tokio runtime. Every connection is its own
//! task, so a client that connects and sends nothing, or reads slowly, holds
//! up no other scrape.

use std::net::SocketAddr;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::error::chain;

/// The content type of Prometheus' text format.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The endpoint could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot serve HTTP on {addr}")]
pub struct ServeError {
    /// The address asked for.
    pub addr: SocketAddr,
    /// Why.
    #[source]
    pub cause: std::io::Error,
}

/// Binds `addr` (now, so a taken port is the caller's error) and serves
/// `router` there from a background thread for the rest of the process.
/// Returns the address bound (useful with port 0).
pub fn serve(addr: SocketAddr, router: Router) -> Result<SocketAddr, ServeError> {
    let fail = |cause| ServeError { addr, cause };
    let listener = std::net::TcpListener::bind(addr).map_err(fail)?;
    let bound = listener.local_addr().map_err(fail)?;
    listener.set_nonblocking(true).map_err(fail)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(fail)?;
    std::thread::Builder::new()
        .name("lessnat-http".into())
        .spawn(move || {
            runtime.block_on(async move {
                let served = match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => axum::serve(listener, router).await,
                    Err(error) => Err(error),
                };
                if let Err(error) = served {
                    tracing::warn!("HTTP endpoint {bound}: {}", chain(&error));
                }
            });
        })
        .map_err(fail)?;
    Ok(bound)
}

/// A plain-text response, after which the connection is closed: scrapes
/// are seconds apart, and a client that reads to the end of the stream (as
/// simple scrapers do) gets its end.
pub fn text(status: StatusCode, content_type: &'static str, body: String) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONNECTION, "close"),
        ],
        body,
    )
        .into_response()
}

/// The answer to any path lessnat does not serve.
pub async fn not_found() -> Response {
    text(
        StatusCode::NOT_FOUND,
        "text/plain; charset=utf-8",
        "lessnat serves /metrics and /healthz\n".to_string(),
    )
}
