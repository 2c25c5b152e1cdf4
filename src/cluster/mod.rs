//! Cluster coordination through etcd (`docs/cluster.md`): what the agents
//! of a site share while they are alive.
//!
//! | file | what it does |
//! | --- | --- |
//! | `keys.rs` | the key layout and the JSON values stored under it |
//! | `config.rs` | the spec's `cluster:` block as the etcd backend's settings |
//! | `lease.rs` | a node's lease renewed on a thread of its own, which stops renewing at the first renewal etcd does not answer in time |
//! | `handshake.rs` | the upgrade handshake: a worker publishes its ready next version and waits for every live load-balancer node's acknowledgement |
//! | `rollout.rs` | fleet rollouts: the rollout keys a worker plans with, and the slot its upgrade takes and frees (marking the version done or bad) |
//! | `registration.rs` | what a node registers (its record, its running replicas and their health) and the `Registrar` keeping it under a lease |
//! | `status.rs` | `lessnat status --cluster`: every registered node, its lease, replicas, and the upgrade and rollout keys |
//! | `view.rs` | the registrations a load-balancer node plans with, read once or kept by a watch |

pub mod config;
pub mod handshake;
pub mod keys;
pub mod lease;
pub mod registration;
pub mod rollout;
pub mod status;
pub mod view;
