//! The container lifecycle of the Docker backend against a real engine:
//! create from the spec, start, stop, rename, remove, state, logs and exec,
//! with the project's own test image. Only loopback traffic; every container
//! made here is removed by id at the end, also when a test fails.

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use lessnat::backend::docker::{ContainerStatus, Docker, DockerError};
use lessnat::desired::desired_node;
use lessnat::error::chain;
use lessnat::model::{ContainerNetwork, ContainerSpec};
use lessnat::ownership::{LABEL_PORTS, LABEL_SERVICE, LABEL_SPEC, Slot, container_name};
use lessnat::spec::{HumanDuration, load_bytes};
use lessnat::style::Style;

use support::image::test_image;

/// Containers a test made, removed by id with the docker CLI when dropped
/// (also on panic), whatever the code under test did.
#[derive(Default)]
struct Made {
    ids: Vec<String>,
}

impl Made {
    /// Creates a container through the backend and remembers its id.
    fn create(&mut self, docker: &Docker, spec: &ContainerSpec) -> String {
        let started = Instant::now();
        let id = docker
            .create(spec)
            .unwrap_or_else(|e| panic!("create {}: {e}", spec.name));
        eprintln!("create {}: {:?}", spec.name, started.elapsed());
        self.ids.push(id.clone());
        id
    }
}

impl Drop for Made {
    fn drop(&mut self) {
        for id in &self.ids {
            let _ = Command::new("docker").args(["rm", "-f", id]).output();
        }
    }
}

fn connect() -> Docker {
    Docker::connect().unwrap_or_else(|e| panic!("{e}"))
}

/// Two distinct free loopback ports: bound at once, then released.
fn free_ports() -> (u16, u16) {
    let a = TcpListener::bind("127.0.0.1:0").expect("bind");
    let b = TcpListener::bind("127.0.0.1:0").expect("bind");
    let ports = (
        a.local_addr().expect("addr").port(),
        b.local_addr().expect("addr").port(),
    );
    drop((a, b));
    ports
}

/// `docker inspect --format FORMAT ID`, trimmed.
fn inspect(id: &str, format: &str) -> String {
    let output = support::run("docker", &["inspect", "--format", format, id]);
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// `GET /` on a loopback port, retried until the server listens (10 s at most).
fn get_root(port: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut stream = loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(stream) => break stream,
            Err(e) => {
                assert!(Instant::now() < deadline, "127.0.0.1:{port}: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        stream,
        "GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

/// Waits until the container is no longer running (10 s at most).
fn wait_exited(docker: &Docker, id: &str) -> ContainerStatus {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = docker
            .state(id)
            .unwrap_or_else(|e| panic!("{e}"))
            .expect("the container exists");
        if !status.running && status.exit_code.is_some() {
            return status;
        }
        assert!(Instant::now() < deadline, "{id} still running: {status:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A host-mode `next` container made from a spec, from creation to removal.
#[test]
fn next_container_lifecycle() {
    if !support::docker("next_container_lifecycle") {
        return;
    }
    let image = test_image("v1");
    let pid = std::process::id();
    let service = format!("lnlife{pid}");
    let node = "lifecycle";
    let (port, temp_port) = free_ports();
    let text = format!(
        "version: 1\n\
         nodes: [{{name: {node}, address: 192.0.2.1}}]\n\
         services:\n  \
           - name: {service}\n    \
             node: {node}\n    \
             image: {image}\n    \
             network: host\n    \
             command: [\"--listen\", \"127.0.0.1:{{port}}\"]\n    \
             env: {{ PORT: \"{{port.http}}\", MODE: test }}\n    \
             ports: [{{name: http, port: {port}, tempPort: {temp_port}}}]\n"
    );
    let spec = load_bytes("lifecycle.yaml", text.as_bytes())
        .unwrap_or_else(|r| panic!("{}", r.render(Style::Plain)));
    let desired = desired_node(&spec, node);
    let (_, container) = &desired.services[0];
    let spec = container
        .container_spec(node, Slot::Next, Duration::from_secs(7))
        .expect("fills");
    let next_name = container_name(&service, node, Slot::Next);
    let prev_name = container_name(&service, node, Slot::Prev);
    assert_eq!(spec.name, next_name);
    assert_eq!(
        spec.command,
        ["--listen", &format!("127.0.0.1:{temp_port}")]
    );
    assert_eq!(spec.network, ContainerNetwork::Host);

    let docker = connect();
    let mut made = Made::default();
    let id = made.create(&docker, &spec);

    // What the engine was told.
    assert_eq!(inspect(&id, "{{.HostConfig.NetworkMode}}"), "host");
    assert_eq!(inspect(&id, "{{.HostConfig.RestartPolicy.Name}}"), "no");
    assert_eq!(inspect(&id, "{{.Config.StopTimeout}}"), "7");
    assert_eq!(
        inspect(&id, "{{json .Config.Cmd}}"),
        format!("[\"--listen\",\"127.0.0.1:{temp_port}\"]")
    );
    let env = inspect(&id, "{{json .Config.Env}}");
    assert!(
        env.contains(&format!("\"PORT={temp_port}\"")) && env.contains("\"MODE=test\""),
        "{env}"
    );
    let created = docker.state(&id).expect("state").expect("exists");
    assert_eq!(
        created,
        ContainerStatus {
            running: false,
            exit_code: None,
            pid: None
        }
    );

    let started = Instant::now();
    docker.start(&id).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("start: {:?}", started.elapsed());
    assert_eq!(get_root(temp_port), "v1\n");
    eprintln!("start until serving: {:?}", started.elapsed());
    docker
        .start(&next_name)
        .expect("starting a running container is fine");

    let running = docker.state(&next_name).expect("state").expect("exists");
    assert!(
        running.running && running.exit_code.is_none(),
        "{running:?}"
    );
    let process = running.pid.expect("a running container has a pid");
    let cmdline = std::fs::read(format!("/proc/{process}/cmdline")).unwrap_or_default();
    assert!(
        String::from_utf8_lossy(&cmdline).contains("lessnat-testserver"),
        "pid {process} is not the test server"
    );

    let (containers, _) = docker.observe(node).unwrap_or_else(|e| panic!("{e}"));
    let observed: Vec<_> = containers.iter().filter(|c| c.service == service).collect();
    assert_eq!(observed.len(), 1, "{containers:#?}");
    let c = observed[0];
    assert_eq!(
        (c.id.as_str(), c.name.as_str()),
        (id.as_str(), next_name.as_str())
    );
    assert_eq!(c.slot, Slot::Next);
    assert_eq!(c.spec_hash, container.spec_hash());
    assert_eq!(c.ports, [format!("{port}/tcp")]);
    assert_eq!(c.state, "running");
    assert_eq!(c.image, image);
    // The stop timeout is recorded, so removal can use it after the spec forgot the service.
    assert_eq!(c.stop_timeout, Some(HumanDuration::secs(7)));
    let labels = inspect(&id, "{{json .Config.Labels}}");
    for (key, value) in [
        (LABEL_SERVICE, service.clone()),
        (LABEL_SPEC, container.spec_hash()),
        (LABEL_PORTS, format!("{port}/tcp")),
    ] {
        assert!(
            labels.contains(&format!("\"{key}\":\"{value}\"")),
            "{labels}"
        );
    }

    // Created with restart policy `no`; a healthy primary is kept running by the engine.
    assert_eq!(inspect(&id, "{{.HostConfig.RestartPolicy.Name}}"), "no");
    docker.keep_running(&id).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        inspect(&id, "{{.HostConfig.RestartPolicy.Name}}"),
        "unless-stopped"
    );

    // The server takes SIGTERM and exits at once, long before the timeout.
    let started = Instant::now();
    docker
        .stop(&id, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}"));
    let stopped_in = started.elapsed();
    eprintln!("stop: {stopped_in:?}");
    assert!(
        stopped_in < Duration::from_secs(5),
        "stop took {stopped_in:?}"
    );
    let stopped = docker.state(&id).expect("state").expect("exists");
    assert_eq!(
        stopped,
        ContainerStatus {
            running: false,
            exit_code: Some(0),
            pid: None
        }
    );
    docker
        .stop(&id, Duration::from_secs(20))
        .expect("stopping a stopped container is fine");

    docker
        .rename(&id, &prev_name)
        .unwrap_or_else(|e| panic!("{e}"));
    let (containers, _) = docker.observe(node).unwrap_or_else(|e| panic!("{e}"));
    let observed: Vec<_> = containers.iter().filter(|c| c.service == service).collect();
    assert_eq!(observed.len(), 1, "{containers:#?}");
    assert_eq!(
        (
            observed[0].name.as_str(),
            observed[0].slot,
            observed[0].state.as_str()
        ),
        (prev_name.as_str(), Slot::Prev, "exited")
    );
    assert_eq!(docker.state(&next_name).expect("state"), None);

    let started = Instant::now();
    docker.remove(&prev_name).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("remove: {:?}", started.elapsed());
    assert_eq!(docker.state(&id).expect("state"), None);
    docker
        .remove(&id)
        .expect("removing a removed container is fine");
    docker
        .remove(&prev_name)
        .expect("removing by a name nobody holds is fine");

    // Errors name the container.
    let err = docker.start(&next_name).expect_err("no such container");
    assert!(err.to_string().contains(&next_name), "{err}");
    let err = docker
        .stop(&next_name, Duration::from_secs(1))
        .expect_err("no such container");
    assert!(err.to_string().contains(&next_name), "{err}");
    let err = docker
        .rename(&next_name, &prev_name)
        .expect_err("no such container");
    assert!(err.to_string().contains(&next_name), "{err}");
}

/// A container that exits at once: the state and the logs tell why.
#[test]
fn container_that_exits_at_once() {
    if !support::docker("container_that_exits_at_once") {
        return;
    }
    let image = test_image("v1");
    let name = format!("lessnat-lnexit{}.lifecycle", std::process::id());
    let spec = ContainerSpec {
        name: name.clone(),
        image,
        command: vec!["--listen".into(), "bad-address".into()],
        env: Default::default(),
        labels: Default::default(),
        network: ContainerNetwork::None,
        stop_timeout: Duration::from_millis(1500),
    };
    let docker = connect();
    let mut made = Made::default();
    let id = made.create(&docker, &spec);
    assert_eq!(inspect(&id, "{{.HostConfig.NetworkMode}}"), "none");
    assert_eq!(inspect(&id, "{{.Config.StopTimeout}}"), "2", "rounded up");
    // No labels of lessnat's (the image's own build label stays).
    let labels = inspect(&id, "{{json .Config.Labels}}");
    assert!(!labels.contains("io.lessnat.service"), "{labels}");

    docker.start(&name).unwrap_or_else(|e| panic!("{e}"));
    let status = wait_exited(&docker, &id);
    // The test server exits with 2 on bad arguments.
    assert_eq!(
        status,
        ContainerStatus {
            running: false,
            exit_code: Some(2),
            pid: None
        }
    );

    let logs = docker
        .logs_tail(&name, 50)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        logs.contains("lessnat-testserver: \"bad-address\" is not ADDR:PORT or :PORT"),
        "{logs}"
    );
    // Only the last line: the end of the usage text after the error.
    let last = docker.logs_tail(&name, 1).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        last,
        "Each bound address is printed as `listening tcp|udp ADDR:PORT`.\n"
    );
    assert_eq!(docker.logs_tail(&name, 0).expect("logs"), "");

    let err = docker
        .logs_tail(&format!("{name}-missing"), 5)
        .expect_err("no such container");
    assert!(
        err.to_string().contains(&format!("{name}-missing")),
        "{err}"
    );

    // Creating never pulls: an image that is not here is an error.
    let missing = ContainerSpec {
        name: format!("{name}.next"),
        image: "lessnat-testserver:no-such-version".into(),
        ..spec.clone()
    };
    let err = docker.create(&missing).expect_err("no such image");
    let text = chain(&err);
    assert!(
        text.contains(&missing.name) && text.matches("No such image").count() == 1,
        "the container and the engine's answer, once: {text}"
    );
    // Nor can a name be taken twice.
    let err = docker.create(&spec).expect_err("name in use");
    assert!(err.to_string().contains(&name), "{err}");

    docker.remove(&id).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(docker.state(&id).expect("state"), None);
}

/// Processes in a container, as `docker top` lists them (header left out).
fn processes(id: &str) -> Vec<String> {
    let output = support::run("docker", &["top", id]);
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .skip(1)
        .map(str::to_string)
        .collect()
}

/// Commands run in a container: exit codes, a missing program, the timeout.
#[test]
fn exec_runs_commands_with_a_timeout() {
    if !support::docker("exec_runs_commands_with_a_timeout") {
        return;
    }
    let image = test_image("v1");
    let name = format!("lessnat-lnexec{}.lifecycle", std::process::id());
    let spec = ContainerSpec {
        name: name.clone(),
        image,
        command: vec!["--listen".into(), "127.0.0.1:8000".into()],
        env: Default::default(),
        labels: Default::default(),
        network: ContainerNetwork::None,
        stop_timeout: Duration::from_secs(5),
    };
    let docker = connect();
    let mut made = Made::default();
    let id = made.create(&docker, &spec);
    let command = |words: &[&str]| -> Vec<String> { words.iter().map(|w| w.to_string()).collect() };
    let quick = Duration::from_secs(10);

    let err = docker
        .exec(&name, &command(&["/lessnat-testserver", "--help"]), quick)
        .expect_err("the container does not run yet");
    assert!(
        matches!(err, DockerError::Request { .. }) && err.to_string().contains(&name),
        "{err}"
    );

    docker.start(&id).unwrap_or_else(|e| panic!("{e}"));
    let started = Instant::now();
    let code = docker
        .exec(&name, &command(&["/lessnat-testserver", "--help"]), quick)
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("exec --help: {:?}", started.elapsed());
    assert_eq!(code, 0);
    let code = docker
        .exec(&id, &command(&["/lessnat-testserver", "--bogus"]), quick)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(code, 2, "the test server's exit code for bad arguments");
    // A program that does not exist is no error: the engine reports 126, as
    // `docker exec` does ("OCI runtime exec failed: ... no such file").
    let code = docker
        .exec(&id, &command(&["/no-such-program"]), quick)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(code, 126);

    // A command that never exits (a second server, on another port of the
    // container's own loopback) is killed at the timeout.
    let before = processes(&id).len();
    let started = Instant::now();
    let err = docker
        .exec(
            &id,
            &command(&["/lessnat-testserver", "--listen", "127.0.0.1:8001"]),
            Duration::from_millis(500),
        )
        .expect_err("the server does not exit");
    let took = started.elapsed();
    eprintln!("exec timeout 500ms: {took:?}");
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(3),
        "took {took:?}"
    );
    assert!(
        matches!(
            &err,
            DockerError::ExecTimeout {
                killed: true,
                timeout,
                ..
            } if *timeout == Duration::from_millis(500)
        ),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains(&id) && text.contains("500ms") && text.contains("killed"),
        "{text}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while processes(&id).len() > before {
        assert!(
            Instant::now() < deadline,
            "the timed-out command still runs: {:?}",
            processes(&id)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(processes(&id).len(), 1, "only the server is left");
    let running = docker.state(&id).expect("state").expect("exists");
    assert!(running.running, "the container itself runs on");

    docker.remove(&id).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(docker.state(&name).expect("state"), None);
}

/// A container that outlives its stop timeout is killed: a held request keeps
/// the test server from exiting, and a sub-second timeout counts as a second.
#[test]
fn stop_kills_after_the_timeout() {
    if !support::docker("stop_kills_after_the_timeout") {
        return;
    }
    let image = test_image("v1");
    let (port, _) = free_ports();
    let name = format!("lessnat-lnkill{}.lifecycle", std::process::id());
    let spec = ContainerSpec {
        name: name.clone(),
        image,
        command: vec!["--listen".into(), format!("127.0.0.1:{port}")],
        env: Default::default(),
        labels: Default::default(),
        network: ContainerNetwork::Host,
        stop_timeout: Duration::from_secs(30),
    };
    let docker = connect();
    let mut made = Made::default();
    let id = made.create(&docker, &spec);
    docker.start(&id).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(get_root(port), "v1\n");

    let mut held = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(held, "GET /hold?ms=60000 HTTP/1.1\r\nHost: test\r\n\r\n").expect("send");
    std::thread::sleep(Duration::from_millis(200)); // the request is in progress

    let started = Instant::now();
    docker
        .stop(&id, Duration::from_millis(300))
        .unwrap_or_else(|e| panic!("{e}"));
    let took = started.elapsed();
    eprintln!("stop with a request held, timeout 300ms: {took:?}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "took {took:?}: the timeout is rounded up to 1s, then SIGKILL"
    );
    let status = docker.state(&id).expect("state").expect("exists");
    assert_eq!(
        status,
        ContainerStatus {
            running: false,
            exit_code: Some(137),
            pid: None
        },
        "killed by SIGKILL"
    );
    docker.remove(&id).unwrap_or_else(|e| panic!("{e}"));
}
