//! Docker: the containers lessnat owns, read through the engine API (bollard).
//!
//! lessnat recognises its containers by the [`LABEL_SERVICE`] label and takes
//! their role from the name ([`parse_container_name`]). Containers without the
//! label whose names start with `lessnat-` are reported as foreign, so the
//! planner never tries to take their names; nothing else is read.
//!
//! bollard is async; [`Docker`] keeps the API synchronous with a current-thread
//! tokio runtime of its own.

use std::collections::HashMap;

use bollard::errors::Error as ApiError;
use bollard::models::{ContainerInspectResponse, ContainerSummary, HealthStatusEnum};
use bollard::query_parameters::ListContainersOptions;
use futures_util::{StreamExt, stream};
use tokio::runtime::Runtime;

use crate::observe::{Container, ForeignContainer};
use crate::ownership::{
    ContainerName, LABEL_PORTS, LABEL_SERVICE, LABEL_SPEC, parse_container_name,
};

/// Where the engine is when `DOCKER_HOST` is unset or empty.
pub const DEFAULT_HOST: &str = "unix:///var/run/docker.sock";

/// The start of every container name lessnat uses.
const NAME_PREFIX: &str = "lessnat-";

/// How many containers are inspected at once while observing.
const INSPECT_CONCURRENCY: usize = 32;

/// Talking to the Docker engine failed.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    /// The runtime that drives the client could not start.
    #[error("cannot start the Docker client's runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// The client cannot be set up for this address: an unsupported scheme,
    /// or a socket file that does not exist.
    #[error(
        "cannot connect to the Docker engine at {host}: {source} (is the engine running? \
         DOCKER_HOST takes unix:///PATH, tcp://HOST:PORT or http://HOST:PORT)"
    )]
    Host {
        /// The engine address.
        host: String,
        /// Why.
        source: ApiError,
    },
    /// The engine did not answer the version request that picks the API version.
    #[error(
        "cannot reach the Docker engine at {host} to negotiate the API version: {source} \
         (is the engine running, and may this user open its socket? lessnat speaks API \
         {client} and steps down to an older engine's, e.g. 1.41 for Debian's Docker 20.10)"
    )]
    Connect {
        /// The engine address.
        host: String,
        /// The newest API version this client speaks.
        client: String,
        /// Why.
        source: ApiError,
    },
    /// A request to the engine failed.
    #[error("Docker engine at {host}: {what}: {source}")]
    Request {
        /// The engine address.
        host: String,
        /// What was asked, e.g. `listing containers labelled io.lessnat.service`.
        what: String,
        /// Why.
        source: ApiError,
    },
}

/// A connection to one Docker engine.
#[derive(Debug)]
pub struct Docker {
    client: bollard::Docker,
    runtime: Runtime,
    host: String,
}

impl Docker {
    /// Connects to the engine named by `DOCKER_HOST` (default [`DEFAULT_HOST`])
    /// and settles on the newest API version both sides speak.
    pub fn connect() -> Result<Docker, DockerError> {
        let host = std::env::var("DOCKER_HOST")
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| DEFAULT_HOST.to_string());
        Docker::connect_to(&host)
    }

    /// Connects to the engine at `host` (`unix:///PATH`, `tcp://HOST:PORT` or
    /// `http://HOST:PORT`) and settles on the newest API version both sides speak.
    pub fn connect_to(host: &str) -> Result<Docker, DockerError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(DockerError::Runtime)?;
        let client = {
            let _context = runtime.enter();
            bollard::Docker::connect_with_host(host)
        }
        .map_err(|source| DockerError::Host {
            host: host.to_string(),
            source,
        })?;
        let client_version = client.client_version().to_string();
        let client = runtime
            .block_on(client.negotiate_version())
            .map_err(|source| DockerError::Connect {
                host: host.to_string(),
                client: client_version,
                source,
            })?;
        Ok(Docker {
            client,
            runtime,
            host: host.to_string(),
        })
    }

    /// The engine address this client talks to.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The API version in use after negotiation, e.g. `1.41`.
    pub fn api_version(&self) -> String {
        self.client.client_version().to_string()
    }

    /// Reads lessnat's containers for `node` (any state; containers of other
    /// nodes sharing this engine are left out) and the foreign containers that
    /// hold names lessnat uses, each sorted by name.
    ///
    /// Two list requests find them; only containers with a process (running,
    /// paused, restarting) are inspected, for their pid and health. The image
    /// is the one `docker ps` shows: the reference the container was created
    /// from, or the image id when that reference now names another image.
    /// A labelled container whose name is not lessnat's is skipped with a
    /// warning; one whose name belongs to another service is reported as
    /// foreign, so that name is not reused.
    pub fn observe(
        &self,
        node: &str,
    ) -> Result<(Vec<Container>, Vec<ForeignContainer>), DockerError> {
        self.runtime.block_on(self.observe_async(node))
    }

    async fn observe_async(
        &self,
        node: &str,
    ) -> Result<(Vec<Container>, Vec<ForeignContainer>), DockerError> {
        let labelled = self.list("label", LABEL_SERVICE).await?;
        let named = self.list("name", NAME_PREFIX).await?;

        let mut containers = Vec::new();
        let mut foreign = Vec::new();
        for summary in &labelled {
            match classify(summary, node) {
                Classified::Ours(container) => containers.push(container),
                Classified::Foreign(container) => foreign.push(container),
                Classified::Skip => {}
            }
        }
        foreign.extend(
            named
                .iter()
                .filter(|s| label(s, LABEL_SERVICE).is_none())
                .filter_map(|s| {
                    let name = name_of(s)?;
                    name.starts_with(NAME_PREFIX).then(|| ForeignContainer {
                        id: s.id.clone().unwrap_or_default(),
                        name: name.to_string(),
                    })
                }),
        );

        let wanted: Vec<(usize, String)> = containers
            .iter()
            .enumerate()
            .filter(|(_, c)| has_process(&c.state))
            .map(|(i, c)| (i, c.id.clone()))
            .collect();
        let inspected: Vec<_> = stream::iter(wanted)
            .map(|(i, id)| async move {
                let result = self.client.inspect_container(&id, None).await;
                (i, result)
            })
            .buffer_unordered(INSPECT_CONCURRENCY)
            .collect()
            .await;
        let mut gone = vec![false; containers.len()];
        for (i, result) in inspected {
            match result {
                Ok(details) => apply_inspect(&mut containers[i], &details),
                // Removed between the list and the inspect: it no longer exists.
                Err(ApiError::DockerResponseServerError {
                    status_code: 404, ..
                }) => gone[i] = true,
                Err(source) => {
                    return Err(self.request_error(
                        format!("inspecting container {}", containers[i].name),
                        source,
                    ));
                }
            }
        }
        let mut gone = gone.into_iter();
        containers.retain(|_| !gone.next().unwrap_or(false));

        containers.sort_by(|a, b| a.name.cmp(&b.name));
        foreign.sort_by(|a, b| a.name.cmp(&b.name));
        Ok((containers, foreign))
    }

    /// Lists containers in any state matching one engine-side filter.
    async fn list(&self, filter: &str, value: &str) -> Result<Vec<ContainerSummary>, DockerError> {
        let options = ListContainersOptions {
            all: true,
            filters: Some(HashMap::from([(
                filter.to_string(),
                vec![value.to_string()],
            )])),
            ..Default::default()
        };
        self.client
            .list_containers(Some(options))
            .await
            .map_err(|source| {
                self.request_error(format!("listing containers with {filter} {value}"), source)
            })
    }

    fn request_error(&self, what: String, source: ApiError) -> DockerError {
        DockerError::Request {
            host: self.host.clone(),
            what,
            source,
        }
    }
}

/// What a labelled container turns out to be.
enum Classified {
    Ours(Container),
    Foreign(ForeignContainer),
    Skip,
}

fn classify(summary: &ContainerSummary, node: &str) -> Classified {
    let (Some(id), Some(name)) = (summary.id.as_deref(), name_of(summary)) else {
        return Classified::Skip;
    };
    let service = label(summary, LABEL_SERVICE).unwrap_or_default();
    let Some(ContainerName {
        service: named_service,
        node: named_node,
        slot,
    }) = parse_container_name(name)
    else {
        tracing::warn!(
            container = name,
            "container is labelled {LABEL_SERVICE}={service} but its name is not lessnat's \
             (lessnat-SERVICE.NODE, then .next or .prev); ignoring it"
        );
        return Classified::Skip;
    };
    if named_node != node {
        return Classified::Skip; // another node's, sharing this engine
    }
    if named_service != service {
        tracing::warn!(
            container = name,
            "container is labelled {LABEL_SERVICE}={service} but named for service \
             {named_service}; treating it as foreign"
        );
        return Classified::Foreign(ForeignContainer {
            id: id.to_string(),
            name: name.to_string(),
        });
    }
    Classified::Ours(Container {
        id: id.to_string(),
        name: name.to_string(),
        service: service.to_string(),
        slot,
        spec_hash: label(summary, LABEL_SPEC).unwrap_or_default().to_string(),
        ports: label(summary, LABEL_PORTS)
            .map(|ports| {
                ports
                    .split(',')
                    .filter(|p| !p.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default(),
        image: summary.image.clone().unwrap_or_default(),
        state: summary
            .state
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        health: None,
        pid: None,
    })
}

/// The container's own name, without Docker's leading `/`. Names with more
/// slashes are aliases from legacy links.
fn name_of(summary: &ContainerSummary) -> Option<&str> {
    summary
        .names
        .as_ref()?
        .iter()
        .filter_map(|n| n.strip_prefix('/'))
        .find(|n| !n.contains('/'))
}

fn label<'a>(summary: &'a ContainerSummary, key: &str) -> Option<&'a str> {
    summary.labels.as_ref()?.get(key).map(String::as_str)
}

/// Whether a container in this state may have a process, hence a pid.
fn has_process(state: &str) -> bool {
    matches!(state, "running" | "paused" | "restarting")
}

/// Takes the fresher state, the pid and the health status from an inspect.
fn apply_inspect(container: &mut Container, details: &ContainerInspectResponse) {
    let Some(state) = &details.state else {
        return;
    };
    if let Some(status) = &state.status {
        container.state = status.to_string();
    }
    container.pid = state
        .pid
        .and_then(|pid| u32::try_from(pid).ok())
        .filter(|&pid| pid > 0);
    container.health = state
        .health
        .as_ref()
        .and_then(|h| h.status)
        .filter(|s| !matches!(s, HealthStatusEnum::EMPTY | HealthStatusEnum::NONE))
        .map(|s| s.to_string());
}

#[cfg(test)]
mod tests {
    use bollard::models::{
        ContainerState, ContainerStateStatusEnum, ContainerSummaryStateEnum, Health,
    };

    use super::*;
    use crate::ownership::Slot;

    fn summary(name: &str, labels: &[(&str, &str)]) -> ContainerSummary {
        ContainerSummary {
            id: Some(format!("id-{name}")),
            names: Some(vec![format!("/{name}")]),
            image: Some("img:1".into()),
            state: Some(ContainerSummaryStateEnum::RUNNING),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn classifies_labelled_containers() {
        let ours = summary(
            "lessnat-web.n.next",
            &[
                (LABEL_SERVICE, "web"),
                (LABEL_SPEC, "abc"),
                (LABEL_PORTS, "8000/tcp,53/udp"),
            ],
        );
        let Classified::Ours(c) = classify(&ours, "n") else {
            panic!("not ours");
        };
        assert_eq!(
            (c.id.as_str(), c.name.as_str(), c.service.as_str()),
            ("id-lessnat-web.n.next", "lessnat-web.n.next", "web")
        );
        assert_eq!(c.slot, Slot::Next);
        assert_eq!((c.spec_hash.as_str(), c.image.as_str()), ("abc", "img:1"));
        assert_eq!(c.state, "running");
        assert_eq!(c.ports, vec!["8000/tcp", "53/udp"]);

        let odd_name = summary("lessnat-web.n.old", &[(LABEL_SERVICE, "web")]);
        assert!(matches!(classify(&odd_name, "n"), Classified::Skip));
        let other_node = summary("lessnat-web.m", &[(LABEL_SERVICE, "web")]);
        assert!(matches!(classify(&other_node, "n"), Classified::Skip));
        let other_service = summary("lessnat-api.n", &[(LABEL_SERVICE, "web")]);
        assert!(
            matches!(classify(&other_service, "n"), Classified::Foreign(f) if f.name == "lessnat-api.n")
        );
    }

    #[test]
    fn connect_failure_explains_api_negotiation() {
        // A socket that accepts connections and closes them without a word.
        let dir = std::env::temp_dir().join(format!("lessnat-docker-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("mute.sock");
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                drop(stream);
            }
        });
        let host = format!("unix://{}", path.display());
        let err = Docker::connect_to(&host).unwrap_err();
        let _ = std::fs::remove_dir_all(&dir);
        let text = err.to_string();
        assert!(matches!(err, DockerError::Connect { .. }), "{err:?}");
        for part in [host.as_str(), "negotiate the API version", "1.41"] {
            assert!(text.contains(part), "{text}");
        }

        for host in ["unix:///nonexistent/docker.sock", "ssh://somewhere"] {
            let err = Docker::connect_to(host).unwrap_err();
            assert!(matches!(err, DockerError::Host { .. }), "{err:?}");
            assert!(err.to_string().contains(host), "{err}");
        }
    }

    #[test]
    fn picks_the_name_that_is_not_a_link_alias() {
        let mut s = summary("x", &[]);
        s.names = Some(vec!["/other/alias".into(), "/lessnat-web".into()]);
        assert_eq!(name_of(&s), Some("lessnat-web"));
        s.names = None;
        assert_eq!(name_of(&s), None);
    }

    #[test]
    fn inspect_fills_pid_health_and_state() {
        let Classified::Ours(mut c) =
            classify(&summary("lessnat-web.n", &[(LABEL_SERVICE, "web")]), "n")
        else {
            panic!("not ours");
        };
        let details = |pid, health| ContainerInspectResponse {
            state: Some(ContainerState {
                status: Some(ContainerStateStatusEnum::PAUSED),
                pid: Some(pid),
                health: Some(Health {
                    status: Some(health),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        apply_inspect(&mut c, &details(42, HealthStatusEnum::HEALTHY));
        assert_eq!(c.state, "paused");
        assert_eq!(c.pid, Some(42));
        assert_eq!(c.health.as_deref(), Some("healthy"));
        apply_inspect(&mut c, &details(0, HealthStatusEnum::NONE));
        assert_eq!((c.pid, c.health), (None, None));
    }
}
