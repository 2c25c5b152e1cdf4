//! lessnat: run and upgrade services on your own hosts with no load balancer and
//! no NAT in the steady state.
//!
//! The pipeline is spec → observe → plan → apply; see `docs/architecture.md`.
//! This crate holds the library; `main.rs` is a thin command-line front.

pub mod agent;
pub mod apply;
pub mod atomic_file;
pub mod backend;
pub mod cli;
pub mod cluster;
pub mod demo;
pub mod desired;
pub mod diagnostic;
pub mod error;
pub mod gitops;
pub mod health;
pub mod journal;
pub mod lock;
pub mod model;
pub mod netns;
pub mod observe;
pub mod ownership;
pub mod plan;
pub mod redact;
pub mod registry;
pub mod report;
pub mod schema;
pub mod session;
pub mod spec;
pub mod style;
