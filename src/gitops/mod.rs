//! GitOps: `lessnat reconcile` fetches the spec from a Git repository, plans
//! and applies it, records what it did, and reports through status, events and
//! metrics.
//!
//! | module | what it does |
//! | --- | --- |
//! | [`fetch`] | the repository mirror in `<state-dir>/repo`: fetch, read the spec at a commit, ancestry |
//! | [`reconcile`] | one run: fetch, check, plan, apply, record |
//! | [`schedule`] | runs once or in a loop, with jitter and the failure back-off |
//! | [`record`] | what runs remember in `<state-dir>/reconcile.json` |
//! | [`suspend`] | the suspend flag `<state-dir>/suspended` |
//! | [`status`] | `lessnat status`, from the record, the flag and the journal |
//! | [`events`] | JSON-lines events |
//! | [`metrics`] | Prometheus textfile and `/metrics` |

pub mod events;
pub mod fetch;
pub mod metrics;
pub mod reconcile;
pub mod record;
pub mod schedule;
pub mod status;
pub mod suspend;
