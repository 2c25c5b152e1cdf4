//! A node's lease kept alive on a thread of its own: renewed a third of its
//! TTL after the last renewal was sent, whatever its owner is doing
//! meanwhile (probing, writing over a slow link), and never blindly: at the
//! first renewal etcd does not answer in time it stops renewing, until its
//! owner has asked etcd whether the lease is still there.
//!
//! A renewal that times out may still reach etcd later and keep the lease
//! alive; renewing on would keep alive, for as long as the link stays that
//! slow, registrations written from what the node saw before, and let
//! writes still on their way land under them after what they describe has
//! changed. Stopped, the lease expires a TTL after the last renewal that
//! reached etcd, and late writes under it are refused.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::backend::etcd::{EtcdError, KeepAlive, LeaseId};

/// How often the renewing thread looks whether it is due or stopped.
const LOOK: Duration = Duration::from_millis(50);

/// Where a kept lease stands, by its renewals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewals {
    /// Every renewal so far was answered.
    Answered,
    /// A renewal went unanswered (or failed): renewing stopped.
    Unanswered,
    /// etcd answered that the lease is gone: renewing stopped.
    Gone,
}

/// What the renewing thread and the owner share.
#[derive(Debug)]
struct Shared {
    renewals: Renewals,
    /// When the last renewal was answered.
    answered: Option<Instant>,
}

/// A lease renewed on its own thread until it is dropped or a renewal goes
/// unanswered.
#[derive(Debug)]
pub struct KeptLease {
    id: LeaseId,
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
}

impl KeptLease {
    /// Renews `keeper`'s lease every `every` (a third of its TTL) on a
    /// thread of its own.
    pub fn start(keeper: KeepAlive, every: Duration) -> Result<KeptLease, EtcdError> {
        let kept = KeptLease {
            id: keeper.lease(),
            shared: Arc::new(Mutex::new(Shared {
                renewals: Renewals::Answered,
                answered: Some(Instant::now()),
            })),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let (shared, stop) = (Arc::clone(&kept.shared), Arc::clone(&kept.stop));
        std::thread::Builder::new()
            .name("lessnat-node-lease".into())
            .spawn(move || renew(keeper, every, &shared, &stop))
            .map_err(|source| EtcdError::KeeperThread {
                id: kept.id,
                source,
            })?;
        Ok(kept)
    }

    /// The lease.
    pub fn id(&self) -> LeaseId {
        self.id
    }

    /// Where its renewals stand.
    pub fn renewals(&self) -> Renewals {
        self.shared
            .lock()
            .map_or(Renewals::Unanswered, |s| s.renewals)
    }

    /// When a renewal was last answered.
    pub fn answered(&self) -> Option<Instant> {
        self.shared.lock().ok().and_then(|s| s.answered)
    }
}

impl Drop for KeptLease {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The renewing thread: one renewal at a time, each `every` after the one
/// before was sent, until `stop` or a renewal that is not answered (a
/// stream broken with its member too: the owner keeps the lease alive
/// anew, through any member, once etcd answered that it is still there).
fn renew(mut keeper: KeepAlive, every: Duration, shared: &Mutex<Shared>, stop: &AtomicBool) {
    let mut sent = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        if sent.elapsed() < every {
            std::thread::sleep(LOOK.min(every - sent.elapsed()));
            continue;
        }
        sent = Instant::now();
        let outcome = keeper.renew_once();
        let Ok(mut shared) = shared.lock() else {
            return;
        };
        match outcome {
            Ok(_) => shared.answered = Some(Instant::now()),
            Err(EtcdError::LeaseGone { .. }) => {
                shared.renewals = Renewals::Gone;
                return;
            }
            Err(error) => {
                tracing::debug!(
                    "renewing the node's lease went unanswered; renewing stops until etcd answers: {}",
                    crate::error::chain(&error)
                );
                shared.renewals = Renewals::Unanswered;
                return;
            }
        }
    }
}
