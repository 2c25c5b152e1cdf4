//! `lessnat agent`: one long-running process per node that keeps the node
//! converged between runs. It runs the session's observe, plan and apply on
//! an interval, and at once when something changes:
//!
//! | file | what wakes it |
//! | --- | --- |
//! | `table_events.rs` | nf_tables events in lessnat's table (deleted, edited) |
//! | `container_events.rs` | Docker `die`/`start` events of lessnat's containers |
//! | `health_watch.rs` | a replica address of a load-balancer node changing health |
//! | `cluster.rs` | with `cluster:`, the replica registrations in etcd changing (load-balancer nodes); it also keeps the node's own registrations |
//! | `rollout_watch.rs` | with `cluster:`, on a worker with a service that rolls out: a rollout slot freed, a node done (and its canary hold passed) |
//!
//! The loop (`run.rs`) coalesces wake-ups, holds back after failures and for
//! crash loops (`backoff.rs`), takes the apply lock for each run (so a
//! `lessnat apply` by hand waits its turn, and the agent waits for it), and
//! records what it did in `agent.json` (`state.rs`, read by `lessnat
//! status`), in Prometheus metrics (`metrics.rs`, served with `/healthz` by
//! `http.rs`) and to systemd (`notify.rs`). The agent holds the agent lock
//! for its whole life: one agent per node. It is never in the data path:
//! killed, nothing it made stops forwarding; started, it adopts what runs.

pub mod backoff;
pub mod cluster;
pub mod container_events;
pub mod health_watch;
pub mod http;
pub mod metrics;
pub mod notify;
pub mod rollout_watch;
mod run;
pub mod state;
pub mod table_events;
pub mod wake;

pub use run::{Agent, Settings, SpecSource};

use crate::backend::nft::NftError;
use crate::lock::LockError;
use crate::session::SessionError;

/// The agent could not start or keep running.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Another agent runs with this state directory.
    #[error(
        "another lessnat agent runs on this node: {holder}; stop it first (systemctl stop lessnat-agent), or give this one its own --state-dir"
    )]
    Running {
        /// Who holds the agent lock, as they recorded it.
        holder: String,
    },
    /// The agent lock could not be used.
    #[error(transparent)]
    Lock(LockError),
    /// The nf_tables events could not be subscribed to.
    #[error("watching lessnat's nftables table")]
    TableEvents(#[source] NftError),
    /// A thread could not be started.
    #[error("starting one of the agent's threads")]
    Thread(#[source] std::io::Error),
    /// The HTTP endpoint could not be set up.
    #[error(transparent)]
    Serve(#[from] http::ServeError),
    /// The agent's state file could not be written.
    #[error(transparent)]
    State(#[from] state::StateError),
    /// The session could not be set up.
    #[error(transparent)]
    Session(Box<SessionError>),
}
