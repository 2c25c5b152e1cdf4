//! The agent's Docker event source: a thread follows the engine's `die` and
//! `start` events of lessnat's containers of its node (an engine may hold
//! other nodes' containers too) and wakes the agent for each. When
//! the stream breaks (the engine restarted), it connects again a second later
//! and wakes the agent once, since events may have been missed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use super::AgentError;
use super::wake::{Trigger, Waker};
use crate::backend::docker::{ContainerEvent, Docker};
use crate::error::chain;
use crate::ownership::parse_container_name;

/// How long the thread waits before connecting again.
const RECONNECT: Duration = Duration::from_secs(1);

/// Follows the container events of `node` on a thread until `stop` is set.
pub fn spawn(
    node: String,
    waker: Waker,
    stop: Arc<AtomicBool>,
) -> Result<JoinHandle<()>, AgentError> {
    std::thread::Builder::new()
        .name("lessnat-agent-docker".into())
        .spawn(move || follow(&node, &waker, &stop))
        .map_err(AgentError::Thread)
}

fn follow(node: &str, waker: &Waker, stop: &AtomicBool) {
    let mut reconnecting = false;
    while !stop.load(Ordering::SeqCst) {
        let result = Docker::connect().and_then(|docker| {
            if reconnecting {
                waker.wake(Trigger::Container, "the Docker engine's events are back");
            }
            docker.follow_container_events(stop, |event| {
                if parse_container_name(&event.name).is_some_and(|name| name.node == node) {
                    wake_for(waker, event);
                }
            })
        });
        if let Err(error) = result {
            tracing::warn!("Docker events: {}; connecting again", chain(&error));
            reconnecting = true;
            sleep_unless_stopped(stop, RECONNECT);
        }
    }
}

fn wake_for(waker: &Waker, event: ContainerEvent) {
    if event.action == "die" {
        waker.died(&event.name);
    } else {
        waker.wake(
            Trigger::Container,
            format!("container {} {}", event.name, event.action),
        );
    }
}

/// Sleeps `duration`, in short steps, returning early once `stop` is set.
pub(super) fn sleep_unless_stopped(stop: &AtomicBool, duration: Duration) {
    let step = Duration::from_millis(50);
    let mut left = duration;
    while !left.is_zero() && !stop.load(Ordering::SeqCst) {
        let now = left.min(step);
        std::thread::sleep(now);
        left -= now;
    }
}
