//! The engine's event stream, for lessnat's containers only: the agent learns
//! the moment one of them dies or starts, instead of at its next run.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bollard::query_parameters::EventsOptions;
use futures_util::StreamExt;

use super::{Docker, DockerError};
use crate::ownership::LABEL_SERVICE;

/// How often a quiet stream looks whether it must end.
const STOP_CHECK: Duration = Duration::from_millis(200);

/// Something that happened to one of lessnat's containers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerEvent {
    /// The container's name.
    pub name: String,
    /// What happened: `die` or `start`.
    pub action: String,
}

impl Docker {
    /// Follows the engine's `die` and `start` events of containers labelled
    /// [`LABEL_SERVICE`], calling `on_event` for each, until `stop` is set
    /// (returns `Ok`) or the stream breaks, e.g. because the engine restarted
    /// (returns the error; the caller connects again).
    pub fn follow_container_events(
        &self,
        stop: &AtomicBool,
        mut on_event: impl FnMut(ContainerEvent),
    ) -> Result<(), DockerError> {
        let filters = HashMap::from([
            ("type".to_string(), vec!["container".to_string()]),
            ("label".to_string(), vec![LABEL_SERVICE.to_string()]),
            (
                "event".to_string(),
                vec!["die".to_string(), "start".to_string()],
            ),
        ]);
        let options = EventsOptions {
            filters: Some(filters),
            ..EventsOptions::default()
        };
        let what = || format!("following events of containers labelled {LABEL_SERVICE}");
        self.runtime.block_on(async {
            let mut stream = self.client.events(Some(options));
            while !stop.load(Ordering::SeqCst) {
                let Ok(next) = tokio::time::timeout(STOP_CHECK, stream.next()).await else {
                    continue;
                };
                let message = match next {
                    Some(Ok(message)) => message,
                    Some(Err(source)) => return Err(self.request_error(what(), source)),
                    None => {
                        return Err(self.request_error(
                            what(),
                            bollard::errors::Error::IOError {
                                err: std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
                            },
                        ));
                    }
                };
                let name = message
                    .actor
                    .and_then(|actor| actor.attributes)
                    .and_then(|mut attributes| attributes.remove("name"));
                if let (Some(name), Some(action)) = (name, message.action) {
                    on_event(ContainerEvent { name, action });
                }
            }
            Ok(())
        })
    }
}
