//! Docker: the containers lessnat owns, read through the engine API (bollard).
//!
//! lessnat recognises its containers by the [`LABEL_SERVICE`] label and takes
//! their role from the name ([`parse_container_name`]). Containers without the
//! label whose names start with `lessnat-` are reported as foreign, so the
//! planner never tries to take their names; nothing else is read.
//!
//! It also runs the container lifecycle an upgrade needs: [`Docker::create`]
//! from a [`ContainerSpec`], [`Docker::start`], [`Docker::stop`],
//! [`Docker::rename`] (a container changes slot by changing name),
//! [`Docker::remove`], and what health waits use: [`Docker::state`],
//! [`Docker::logs_tail`] and [`Docker::exec`]; and for images (`docker/image.rs`)
//! [`Docker::image`], [`Docker::remote_digest`] and [`Docker::pull`].
//!
//! bollard is async; [`Docker`] keeps the API synchronous with a current-thread
//! tokio runtime of its own.

mod events;
mod image;

pub use events::ContainerEvent;
pub use image::PullProgress;

use std::collections::HashMap;
use std::time::Duration;

use bollard::errors::Error as ApiError;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerStateStatusEnum, ContainerSummary,
    ContainerUpdateBody, HealthStatusEnum, HostConfig, RestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptions, ListContainersOptions, LogsOptions, RemoveContainerOptions,
    RenameContainerOptions, StopContainerOptions,
};
use futures_util::{StreamExt, TryStreamExt, stream};
use tokio::runtime::Runtime;

use crate::model::{Container, ContainerSpec, ForeignContainer};
use crate::ownership::{
    ContainerName, LABEL_ADDRESS, LABEL_DIGEST, LABEL_PORTS, LABEL_SERVICE, LABEL_SPEC,
    LABEL_STOP_TIMEOUT, parse_container_name,
};

/// Where the engine is when `DOCKER_HOST` is unset or empty.
pub const DEFAULT_HOST: &str = "unix:///var/run/docker.sock";

/// The start of every container name lessnat uses.
const NAME_PREFIX: &str = "lessnat-";

/// How many containers are inspected at once while observing.
const INSPECT_CONCURRENCY: usize = 32;

/// How long a stop request may take beyond its timeout: the engine answers
/// once the container has stopped, after the SIGKILL when the timeout ran out.
const STOP_MARGIN: Duration = Duration::from_secs(60);

/// How often an exec whose output has ended is inspected for its exit code.
const EXEC_POLL: Duration = Duration::from_millis(10);

/// How much of an exec's output is kept for the debug log.
const EXEC_OUTPUT_KEPT: usize = 4096;

/// Talking to the Docker engine failed.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    /// The runtime that drives the client could not start.
    #[error("cannot start the Docker client's runtime")]
    Runtime(#[source] std::io::Error),
    /// The client cannot be set up for this address: an unsupported scheme,
    /// or a socket file that does not exist.
    #[error(
        "cannot connect to the Docker engine at {host} (is the engine running? \
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
        "cannot reach the Docker engine at {host} to negotiate the API version \
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
    #[error("Docker engine at {host}: {what}")]
    Request {
        /// The engine address.
        host: String,
        /// What was asked, e.g. `listing containers labelled io.lessnat.service`.
        what: String,
        /// Why.
        source: ApiError,
    },
    /// A command run with [`Docker::exec`] did not exit within its timeout.
    #[error(
        "Docker engine at {host}: running {command:?} in container {container}: no exit within \
         {timeout:?}; {}",
        if *.killed { "the command was killed" } else { "the command may still be running" }
    )]
    ExecTimeout {
        /// The engine address.
        host: String,
        /// The container, as the caller named it.
        container: String,
        /// The command.
        command: Vec<String>,
        /// The timeout.
        timeout: Duration,
        /// Whether lessnat killed the command's process (the engine API
        /// cannot stop an exec; see [`Docker::exec`]).
        killed: bool,
    },
}

/// What [`Docker::state`] reports about a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContainerStatus {
    /// Whether its process runs (a paused container counts as running).
    pub running: bool,
    /// The exit code once the container has exited; `None` while it runs and
    /// when it was created but never started.
    pub exit_code: Option<i64>,
    /// The host pid of its main process while it runs.
    pub pid: Option<u32>,
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
        // One list: every container lessnat makes is named `lessnat-…`, so
        // the name filter finds lessnat's containers (by their label) and
        // the foreign ones that use its names. A labelled container named
        // otherwise is not lessnat's to manage and is not seen.
        let named = self.list("name", NAME_PREFIX).await?;

        let mut containers = Vec::new();
        let mut foreign = Vec::new();
        for summary in &named {
            if label(summary, LABEL_SERVICE).is_some() {
                match classify(summary, node) {
                    Classified::Ours(container) => containers.push(*container),
                    Classified::Foreign(container) => foreign.push(container),
                    Classified::Skip => {}
                }
            } else if let Some(name) = name_of(summary).filter(|n| n.starts_with(NAME_PREFIX)) {
                foreign.push(ForeignContainer {
                    id: summary.id.clone().unwrap_or_default(),
                    name: name.to_string(),
                });
            }
        }

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

    /// Creates a container (it is not started) and returns its id.
    ///
    /// Fails when the name is taken or the image is not present on the
    /// engine: nothing is pulled here (plans pull missing images first).
    pub fn create(&self, spec: &ContainerSpec) -> Result<String, DockerError> {
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            cmd: (!spec.command.is_empty()).then(|| spec.command.clone()),
            env: (!spec.env.is_empty()).then(|| {
                spec.env
                    .iter()
                    .map(|(key, value)| format!("{key}={value}"))
                    .collect()
            }),
            labels: Some(
                spec.labels
                    .iter()
                    .map(|(key, value)| (key.clone(), value.clone()))
                    .collect(),
            ),
            stop_timeout: Some(whole_seconds(spec.stop_timeout)),
            host_config: Some(HostConfig {
                network_mode: Some(spec.network.as_str().to_string()),
                restart_policy: Some(RestartPolicy {
                    name: Some(RestartPolicyNameEnum::NO),
                    maximum_retry_count: None,
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let options = CreateContainerOptions {
            name: Some(spec.name.clone()),
            ..Default::default()
        };
        let created = self
            .runtime
            .block_on(self.client.create_container(Some(options), body))
            .map_err(|source| {
                self.request_error(
                    format!("creating container {} from image {}", spec.name, spec.image),
                    source,
                )
            })?;
        for warning in &created.warnings {
            tracing::warn!(container = spec.name, "Docker engine: {warning}");
        }
        Ok(created.id)
    }

    /// Starts a container. Starting a running container is not an error.
    pub fn start(&self, id_or_name: &str) -> Result<(), DockerError> {
        self.runtime
            .block_on(self.client.start_container(id_or_name, None))
            .map_err(|source| {
                self.request_error(format!("starting container {id_or_name}"), source)
            })
    }

    /// Stops a container: its stop signal (SIGTERM unless the image sets
    /// another `STOPSIGNAL`), then SIGKILL when it is still running after
    /// `timeout` (rounded up to whole seconds, as the engine counts them).
    /// Returns once it has stopped. Stopping a container that does not run is
    /// not an error; stopping one that does not exist is.
    pub fn stop(&self, id_or_name: &str, timeout: Duration) -> Result<(), DockerError> {
        let options = StopContainerOptions {
            t: Some(i32::try_from(whole_seconds(timeout)).unwrap_or(i32::MAX)),
            signal: None,
        };
        // The engine answers when the container has stopped, which may take
        // longer than the client's usual request timeout.
        let patient = timeout.saturating_add(STOP_MARGIN);
        let client = self
            .client
            .clone()
            .with_timeout(patient.max(self.client.timeout()));
        self.runtime
            .block_on(client.stop_container(id_or_name, Some(options)))
            .map_err(|source| {
                self.request_error(format!("stopping container {id_or_name}"), source)
            })
    }

    /// Removes a container, killing it first if it runs. Removing a container
    /// that does not exist is not an error. Its anonymous volumes are kept,
    /// as `docker rm` keeps them: they may hold data nobody else can reach.
    pub fn remove(&self, id_or_name: &str) -> Result<(), DockerError> {
        let options = RemoveContainerOptions {
            force: true,
            ..Default::default()
        };
        match self
            .runtime
            .block_on(self.client.remove_container(id_or_name, Some(options)))
        {
            Ok(()) => Ok(()),
            Err(source) if is_not_found(&source) => Ok(()),
            Err(source) => {
                Err(self.request_error(format!("removing container {id_or_name}"), source))
            }
        }
    }

    /// Renames a container: how it changes slot (`lessnat-web.n` becomes
    /// `lessnat-web.n.prev`). Fails when `new_name` is taken.
    pub fn rename(&self, id_or_name: &str, new_name: &str) -> Result<(), DockerError> {
        let options = RenameContainerOptions {
            name: new_name.to_string(),
        };
        self.runtime
            .block_on(self.client.rename_container(id_or_name, options))
            .map_err(|source| {
                self.request_error(
                    format!("renaming container {id_or_name} to {new_name}"),
                    source,
                )
            })
    }

    /// Sets the restart policy of a healthy primary to `unless-stopped`, so the
    /// engine starts it again after a reboot or an engine restart. A container
    /// that lessnat stops later (to keep it as `prev`) stays stopped: Docker
    /// does not restart containers that were stopped on purpose.
    pub fn keep_running(&self, id_or_name: &str) -> Result<(), DockerError> {
        let body = ContainerUpdateBody {
            restart_policy: Some(RestartPolicy {
                name: Some(RestartPolicyNameEnum::UNLESS_STOPPED),
                maximum_retry_count: None,
            }),
            ..Default::default()
        };
        self.runtime
            .block_on(self.client.update_container(id_or_name, body))
            .map_err(|source| {
                self.request_error(
                    format!("setting the restart policy of {id_or_name}"),
                    source,
                )
            })
    }

    /// Whether a container runs, its exit code once it has exited, and its
    /// pid; `None` when it does not exist.
    pub fn state(&self, id_or_name: &str) -> Result<Option<ContainerStatus>, DockerError> {
        match self
            .runtime
            .block_on(self.client.inspect_container(id_or_name, None))
        {
            Ok(details) => Ok(Some(status_of(&details))),
            Err(source) if is_not_found(&source) => Ok(None),
            Err(source) => {
                Err(self.request_error(format!("inspecting container {id_or_name}"), source))
            }
        }
    }

    /// The last `lines` lines the container wrote to stdout and stderr,
    /// interleaved as they were written (invalid UTF-8 replaced), for error
    /// messages about a container that died.
    pub fn logs_tail(&self, id_or_name: &str, lines: usize) -> Result<String, DockerError> {
        let options = LogsOptions {
            stdout: true,
            stderr: true,
            tail: lines.to_string(),
            ..Default::default()
        };
        let bytes = self
            .runtime
            .block_on(self.client.logs(id_or_name, Some(options)).try_fold(
                Vec::new(),
                |mut bytes, chunk| {
                    bytes.extend_from_slice(chunk.as_ref());
                    async move { Ok(bytes) }
                },
            ))
            .map_err(|source| {
                self.request_error(
                    format!("reading the logs of container {id_or_name}"),
                    source,
                )
            })?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Runs `command` in a running container (no shell: the first word is the
    /// program) and returns its exit code, for `health.exec` checks.
    ///
    /// A program that cannot be started (missing, not executable) is not an
    /// error: the engine reports exit code 126, as `docker exec` does, with
    /// its reason in the command's output (logged at debug level). A container
    /// that does not run is an error.
    ///
    /// When the command has not exited within `timeout`, this fails with
    /// [`DockerError::ExecTimeout`]. The engine API cannot stop an exec, so
    /// lessnat kills the command's process (SIGKILL) itself, by its pid; only
    /// when the engine is on this host (a `unix://` socket) and the process's
    /// `/proc/PID/cgroup` names the container, so no other process is ever
    /// signalled. Whether it did is in the error.
    pub fn exec(
        &self,
        id_or_name: &str,
        command: &[String],
        timeout: Duration,
    ) -> Result<i64, DockerError> {
        self.runtime
            .block_on(self.exec_async(id_or_name, command, timeout))
    }

    async fn exec_async(
        &self,
        container: &str,
        command: &[String],
        timeout: Duration,
    ) -> Result<i64, DockerError> {
        let now = tokio::time::Instant::now();
        // A timeout too large for the clock is as good as none.
        let deadline = now
            .checked_add(timeout)
            .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600));
        let what = || format!("running {command:?} in container {container}");
        let timed_out = |killed| DockerError::ExecTimeout {
            host: self.host.clone(),
            container: container.to_string(),
            command: command.to_vec(),
            timeout,
            killed,
        };
        let config = CreateExecOptions {
            cmd: Some(command.to_vec()),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            ..Default::default()
        };
        let exec_id =
            match tokio::time::timeout_at(deadline, self.client.create_exec(container, config))
                .await
            {
                Ok(created) => {
                    created
                        .map_err(|source| self.request_error(what(), source))?
                        .id
                }
                // Created perhaps, but not started: nothing runs.
                Err(_) => return Err(timed_out(false)),
            };
        match tokio::time::timeout_at(deadline, self.finish_exec(container, &exec_id)).await {
            Ok(finished) => finished.map_err(|source| self.request_error(what(), source)),
            Err(_) => Err(timed_out(self.kill_exec(&exec_id).await)),
        }
    }

    /// Starts a created exec, reads its output to the end and waits for its
    /// exit code.
    async fn finish_exec(&self, container: &str, exec_id: &str) -> Result<i64, ApiError> {
        let options = StartExecOptions {
            detach: false,
            tty: false,
            output_capacity: None,
        };
        let mut output = Vec::new();
        if let StartExecResults::Attached {
            output: mut stream, ..
        } = self.client.start_exec(exec_id, Some(options)).await?
        {
            while let Some(chunk) = stream.next().await {
                let chunk = chunk?;
                let room = EXEC_OUTPUT_KEPT.saturating_sub(output.len());
                output.extend(chunk.as_ref().iter().take(room));
            }
        }
        // The output ends when the process closes it; the engine records the
        // exit code a moment later.
        loop {
            let inspected = self.client.inspect_exec(exec_id).await?;
            if inspected.running != Some(true)
                && let Some(code) = inspected.exit_code
            {
                tracing::debug!(
                    container,
                    exit_code = code,
                    output = %String::from_utf8_lossy(&output),
                    "exec finished"
                );
                return Ok(code);
            }
            tokio::time::sleep(EXEC_POLL).await;
        }
    }

    /// Kills the process of an exec that outlived its timeout; see
    /// [`Docker::exec`] for when it may. Returns whether it was killed.
    async fn kill_exec(&self, exec_id: &str) -> bool {
        if !self.host.starts_with("unix://") {
            return false;
        }
        let Ok(inspected) = self.client.inspect_exec(exec_id).await else {
            return false;
        };
        let (Some(true), Some(pid), Some(container_id)) =
            (inspected.running, inspected.pid, inspected.container_id)
        else {
            return false;
        };
        let Some(pid) = i32::try_from(pid).ok().filter(|&pid| pid > 0) else {
            return false;
        };
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        if container_id.is_empty() || !cgroup.contains(&container_id) {
            tracing::warn!(
                pid,
                container = container_id,
                "not killing the timed-out exec: its pid is not in the container's cgroup here"
            );
            return false;
        }
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .is_ok()
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

/// A duration in whole seconds, rounded up, as the engine takes stop timeouts.
fn whole_seconds(duration: Duration) -> i64 {
    let seconds = duration
        .as_secs()
        .saturating_add(u64::from(duration.subsec_nanos() > 0));
    i64::try_from(seconds).unwrap_or(i64::MAX)
}

/// Whether the engine answered 404: no such container.
fn is_not_found(error: &ApiError) -> bool {
    matches!(
        error,
        ApiError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// The state an inspect reports, as [`Docker::state`] returns it.
fn status_of(details: &ContainerInspectResponse) -> ContainerStatus {
    let state = details.state.as_ref();
    let running = state.and_then(|s| s.running).unwrap_or(false);
    let ended = state.and_then(|s| s.status).is_some_and(|s| {
        matches!(
            s,
            ContainerStateStatusEnum::EXITED | ContainerStateStatusEnum::DEAD
        )
    });
    ContainerStatus {
        running,
        exit_code: state
            .and_then(|s| s.exit_code)
            .filter(|_| ended && !running),
        pid: state
            .and_then(|s| s.pid)
            .and_then(|pid| u32::try_from(pid).ok())
            .filter(|&pid| pid > 0 && running),
    }
}

/// What a labelled container turns out to be.
enum Classified {
    Ours(Box<Container>),
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
        ..
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
    Classified::Ours(Box::new(Container {
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
        address: label(summary, LABEL_ADDRESS).map(str::to_string),
        stop_timeout: label(summary, LABEL_STOP_TIMEOUT).and_then(|t| t.parse().ok()),
        digest: label(summary, LABEL_DIGEST).map(str::to_string),
    }))
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
            if let DockerError::Host { source, .. } = &err {
                let cause = source.to_string();
                crate::error::assert_chain_once(&err, &["is the engine running?", &cause]);
            }
        }
    }

    #[test]
    fn an_engine_refusal_is_printed_once() {
        let error = DockerError::Request {
            host: DEFAULT_HOST.to_string(),
            what: "creating container lessnat-web.a.next".to_string(),
            source: ApiError::DockerResponseServerError {
                status_code: 404,
                message: "No such image: web:2".to_string(),
            },
        };
        assert_eq!(
            crate::error::chain(&error),
            "Docker engine at unix:///var/run/docker.sock: creating container \
             lessnat-web.a.next: Docker responded with status code 404: No such image: web:2"
        );
        crate::error::assert_chain_once(&error, &["No such image: web:2"]);
    }

    #[test]
    fn stop_timeouts_round_up_to_seconds() {
        assert_eq!(whole_seconds(Duration::ZERO), 0);
        assert_eq!(whole_seconds(Duration::from_millis(1)), 1);
        assert_eq!(whole_seconds(Duration::from_secs(7)), 7);
        assert_eq!(whole_seconds(Duration::from_millis(7001)), 8);
        assert_eq!(whole_seconds(Duration::MAX), i64::MAX);
    }

    #[test]
    fn status_from_inspect() {
        let details = |status, running, exit_code, pid| ContainerInspectResponse {
            state: Some(ContainerState {
                status: Some(status),
                running: Some(running),
                exit_code: Some(exit_code),
                pid: Some(pid),
                ..Default::default()
            }),
            ..Default::default()
        };
        let status = |running, exit_code, pid| ContainerStatus {
            running,
            exit_code,
            pid,
        };
        use ContainerStateStatusEnum::*;
        assert_eq!(
            status_of(&details(CREATED, false, 0, 0)),
            status(false, None, None)
        );
        assert_eq!(
            status_of(&details(RUNNING, true, 0, 42)),
            status(true, None, Some(42))
        );
        assert_eq!(
            status_of(&details(PAUSED, true, 0, 42)),
            status(true, None, Some(42))
        );
        assert_eq!(
            status_of(&details(EXITED, false, 2, 0)),
            status(false, Some(2), None)
        );
        assert_eq!(
            status_of(&details(DEAD, false, 137, 0)),
            status(false, Some(137), None)
        );
        assert_eq!(
            status_of(&ContainerInspectResponse::default()),
            status(false, None, None)
        );
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
