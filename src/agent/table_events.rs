//! The agent's nftables event source: a thread subscribed to the nf_tables
//! events of the node's namespace wakes the agent whenever something in
//! lessnat's table is added, changed or deleted (by anyone: lessnat's own
//! writes lead to a plan with no changes).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use super::AgentError;
use super::wake::{Trigger, Waker};
use crate::backend::nft::TableEvents;
use crate::netns::Netns;
use crate::ownership::{NFT_FAMILY, NFT_TABLE};

/// Subscribes now (so a failure is the caller's), then follows the events on
/// a thread until `stop` is set.
pub fn spawn(
    netns: &Netns,
    waker: Waker,
    stop: Arc<AtomicBool>,
) -> Result<JoinHandle<()>, AgentError> {
    let mut events = TableEvents::subscribe(netns).map_err(AgentError::TableEvents)?;
    std::thread::Builder::new()
        .name("lessnat-agent-nft".into())
        .spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                if events.next_batch() {
                    waker.wake(Trigger::Table, format!("{NFT_FAMILY} {NFT_TABLE} changed"));
                }
            }
        })
        .map_err(AgentError::Thread)
}
