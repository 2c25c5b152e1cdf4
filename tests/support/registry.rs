//! A real image registry for tests: Debian's `docker-registry` (distribution
//! 2.8), started as this test's own process on a free loopback port (the
//! engine allows plain HTTP to 127.0.0.0/8), with a config file, a storage
//! directory and, for basic auth, a bcrypt htpasswd file (`htpasswd -B`, from
//! `apache2-utils`) in a temporary directory. Dropping it ends the process by
//! its PID and removes the registry-tagged image names the test pushed or
//! pulled (never the base test images).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A user name and password for a registry with basic auth.
pub const USER: &str = "lessnat-test";

/// A running registry, ended when dropped (also on panic).
pub struct Registry {
    /// `127.0.0.1:PORT`.
    pub host: String,
    /// The directory with its config, storage and the Docker client configs.
    dir: tempfile::TempDir,
    /// The password, with basic auth.
    password: Option<String>,
    child: Option<Child>,
    /// Registry-tagged names to remove from the engine at the end.
    names: Vec<String>,
}

impl Registry {
    /// Starts a registry; with `password`, it asks for basic auth as [`USER`].
    pub fn start(password: Option<&str>) -> Registry {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = super::free_port();
        let host = format!("127.0.0.1:{port}");
        let mut config = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: {host}\n",
            dir.path().join("data").display()
        );
        if let Some(password) = password {
            let htpasswd = super::run("htpasswd", &["-Bbn", USER, password]);
            let path = dir.path().join("htpasswd");
            std::fs::write(&path, &htpasswd.stdout).expect("write htpasswd");
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: lessnat-test\n    path: {}\n",
                path.display()
            ));
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).expect("write registry config");
        let log = std::fs::File::create(dir.path().join("registry.log")).expect("log file");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting docker-registry: {e}"));
        let mut registry = Registry {
            host,
            dir,
            password: password.map(str::to_string),
            child: Some(child),
            names: Vec::new(),
        };
        registry.wait_ready();
        registry
    }

    /// Waits until `GET /v2/` answers (200, or 401 with auth).
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(mut stream) = TcpStream::connect(&self.host) {
                let request = format!("GET /v2/ HTTP/1.0\r\nHost: {}\r\n\r\n", self.host);
                let mut answer = String::new();
                if stream.write_all(request.as_bytes()).is_ok()
                    && stream.read_to_string(&mut answer).is_ok()
                    && answer.starts_with("HTTP/1.")
                {
                    return;
                }
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("docker-registry ended ({status}):\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("docker-registry did not answer within 20s:\n{}", self.log());
    }

    /// What the registry logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// The registry's reference for `name:tag`.
    pub fn reference(&self, name: &str, tag: &str) -> String {
        format!("{}/{name}:{tag}", self.host)
    }

    /// A Docker client config directory with this registry's login (written
    /// once), or an empty one without auth.
    pub fn docker_config(&self) -> PathBuf {
        let dir = self.dir.path().join("docker-config");
        if !dir.exists() {
            std::fs::create_dir_all(&dir).expect("docker config dir");
            let auths = match &self.password {
                Some(password) => {
                    use base64::Engine as _;
                    let auth = base64::engine::general_purpose::STANDARD
                        .encode(format!("{USER}:{password}"));
                    format!(r#"{{"auths": {{"{}": {{"auth": "{auth}"}}}}}}"#, self.host)
                }
                None => r#"{"auths": {}}"#.to_string(),
            };
            std::fs::write(dir.join("config.json"), auths).expect("write docker config");
        }
        dir
    }

    /// An empty Docker client config directory: no credentials for anyone.
    pub fn no_credentials(&self) -> PathBuf {
        let dir = self.dir.path().join("no-credentials");
        std::fs::create_dir_all(&dir).expect("empty docker config dir");
        dir
    }

    /// Tags the local `image` as `name:tag` here, pushes it (with the login,
    /// if any), removes the registry-tagged name from the engine again, and
    /// returns the digest the registry stored.
    pub fn push(&mut self, image: &str, name: &str, tag: &str) -> String {
        let reference = self.reference(name, tag);
        self.forget(&reference);
        super::run("docker", &["tag", image, &reference]);
        let config = self.docker_config();
        let config = config.to_str().expect("utf-8 path");
        let pushed = super::run("docker", &["--config", config, "push", &reference]);
        super::run("docker", &["rmi", &reference]);
        let text = String::from_utf8_lossy(&pushed.stdout);
        text.split_whitespace()
            .skip_while(|w| *w != "digest:")
            .nth(1)
            .unwrap_or_else(|| panic!("no digest in `docker push` output:\n{text}"))
            .to_string()
    }

    /// Removes `reference` from the engine at the end too.
    pub fn forget(&mut self, reference: &str) {
        if !self.names.iter().any(|n| n == reference) {
            self.names.push(reference.to_string());
        }
    }

    /// Ends the registry process now (it is gone for the rest of the test).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The directory the registry keeps its files in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
        // Tags, then the digests the engine keeps for this registry's
        // repositories (a tag that moved leaves `REPO@sha256:…` behind).
        let mut names = self.names.clone();
        if let Ok(listed) = Command::new("docker")
            .args([
                "images",
                "--digests",
                "--format",
                "{{.Repository}}@{{.Digest}}",
            ])
            .output()
        {
            let prefix = format!("{}/", self.host);
            names.extend(
                String::from_utf8_lossy(&listed.stdout)
                    .lines()
                    .filter(|l| l.starts_with(&prefix) && !l.ends_with("@<none>"))
                    .map(str::to_string),
            );
        }
        for name in &names {
            let _ = Command::new("docker").args(["rmi", name]).output();
        }
    }
}
