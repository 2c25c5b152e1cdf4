//! Registry credentials from the Docker client's config, as `docker login`
//! writes them: `$DOCKER_CONFIG/config.json`, or `~/.docker/config.json`.
//!
//! An `auths` entry is matched by the registry host of the image (the key may
//! be a URL: `https://127.0.0.1:5000/v2/` matches `127.0.0.1:5000`; Docker Hub
//! images match `https://index.docker.io/v1/`, `index.docker.io`,
//! `registry-1.docker.io` and `docker.io`). It holds `auth` (base64 of
//! `user:password`) or `username` and `password`.
//!
//! Credentials are only handed to the engine with a request: they are never
//! printed, logged, put in a plan or an error ([`Credentials`]' `Debug` hides them).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Deserialize;

use super::reference::DOCKER_HUB;

/// Host names Docker Hub's credentials may be stored under.
const DOCKER_HUB_KEYS: [&str; 4] = [
    "index.docker.io",
    "docker.io",
    "registry-1.docker.io",
    "https://index.docker.io/v1/",
];

/// A user name and password for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The registry they are for, as the config names it.
    pub server: String,
    /// The user name.
    pub username: String,
    /// The password or token.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    /// Names the registry and the user, never the password.
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("server", &self.server)
            .field("username", &self.username)
            .field("password", &"<hidden>")
            .finish()
    }
}

/// The Docker client config could not be read. Messages name the file and the
/// registry, never a credential.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// The file exists but cannot be read.
    #[error("cannot read the Docker client config {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a Docker client config.
    #[error("the Docker client config {} is not valid JSON of the expected shape", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
    /// An `auths` entry's `auth` is not base64 of `user:password`.
    #[error(
        "the Docker client config {}: the `auth` of \"{server}\" is not base64 of USER:PASSWORD \
         (run `docker login {server}` again)",
        path.display()
    )]
    BadAuth {
        /// The file.
        path: PathBuf,
        /// The entry's key.
        server: String,
    },
}

#[derive(Deserialize)]
struct Config {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
}

#[derive(Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// The Docker client config directory: `DOCKER_CONFIG`, else `~/.docker`.
pub fn config_dir() -> Option<PathBuf> {
    match std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        Some(dir) => Some(PathBuf::from(dir)),
        None => std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .map(|home| PathBuf::from(home).join(".docker")),
    }
}

/// The credentials the Docker client config holds for `registry` (a host as
/// [`ImageRef::registry`](super::ImageRef::registry) gives it), if any. No
/// config file means no credentials.
pub fn credentials_for(registry: &str) -> Result<Option<Credentials>, CredentialsError> {
    match config_dir() {
        Some(dir) => credentials_in(&dir, registry),
        None => Ok(None),
    }
}

/// Like [`credentials_for`], from the config in `dir`.
pub fn credentials_in(dir: &Path, registry: &str) -> Result<Option<Credentials>, CredentialsError> {
    let path = dir.join("config.json");
    let text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(CredentialsError::Read { path, source }),
    };
    let config: Config =
        serde_json::from_slice(&text).map_err(|source| CredentialsError::Parse {
            path: path.clone(),
            source,
        })?;
    let Some((server, entry)) = config
        .auths
        .iter()
        .find(|(key, _)| matches_registry(key, registry))
    else {
        return Ok(None);
    };
    let bad = || CredentialsError::BadAuth {
        path: path.clone(),
        server: server.clone(),
    };
    let (username, password) = match (&entry.auth, &entry.username, &entry.password) {
        (Some(auth), _, _) if !auth.is_empty() => {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|_| bad())?;
            let text = String::from_utf8(decoded).map_err(|_| bad())?;
            let (user, password) = text.split_once(':').ok_or_else(bad)?;
            (user.to_string(), password.to_string())
        }
        (_, Some(user), Some(password)) => (user.clone(), password.clone()),
        _ => return Ok(None),
    };
    Ok(Some(Credentials {
        server: server.clone(),
        username,
        password,
    }))
}

/// Whether an `auths` key (a host, or a URL with a path) is `registry`'s.
fn matches_registry(key: &str, registry: &str) -> bool {
    let host = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = host.split('/').next().unwrap_or(host);
    if registry == DOCKER_HUB {
        DOCKER_HUB_KEYS.contains(&key) || DOCKER_HUB_KEYS.contains(&host)
    } else {
        host == registry
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("config.json"), json).expect("write config");
        dir
    }

    fn found(dir: &tempfile::TempDir, registry: &str) -> Option<(String, String, String)> {
        credentials_in(dir.path(), registry)
            .expect("reads")
            .map(|c| (c.server, c.username, c.password))
    }

    fn own(server: &str, user: &str, password: &str) -> Option<(String, String, String)> {
        Some((server.into(), user.into(), password.into()))
    }

    #[test]
    fn auth_field_and_username_password() {
        // "alice:s3cr:et" — the password may contain a colon.
        let dir = config(
            r#"{"auths": {
                "127.0.0.1:5000": {"auth": "YWxpY2U6czNjcjpldA=="},
                "https://registry.example/v2/": {"username": "bob", "password": "hunter2"},
                "empty.example": {}
            }, "credsStore": "desktop"}"#,
        );
        assert_eq!(
            found(&dir, "127.0.0.1:5000"),
            own("127.0.0.1:5000", "alice", "s3cr:et")
        );
        assert_eq!(
            found(&dir, "registry.example"),
            own("https://registry.example/v2/", "bob", "hunter2")
        );
        assert_eq!(found(&dir, "empty.example"), None);
        assert_eq!(
            found(&dir, "127.0.0.1:5001"),
            None,
            "the port is part of the host"
        );
        assert_eq!(found(&dir, "example"), None);
    }

    #[test]
    fn docker_hub_default() {
        let dir = config(r#"{"auths": {"https://index.docker.io/v1/": {"auth": "dTpw"}}}"#);
        assert_eq!(
            found(&dir, DOCKER_HUB),
            own("https://index.docker.io/v1/", "u", "p")
        );
        assert_eq!(found(&dir, "index.docker.io.evil.example"), None);
        let dir = config(r#"{"auths": {"docker.io": {"username": "u", "password": "p"}}}"#);
        assert_eq!(found(&dir, DOCKER_HUB), own("docker.io", "u", "p"));
    }

    #[test]
    fn no_file_no_credentials_and_errors_hide_values() {
        let empty = tempfile::tempdir().expect("temp dir");
        assert_eq!(found(&empty, "127.0.0.1:5000"), None);

        let dir = config(r#"{"auths": {"r.example": {"auth": "not base64 TOPSECRET"}}}"#);
        let err = credentials_in(dir.path(), "r.example").expect_err("bad auth");
        let text = crate::error::chain(&err);
        assert!(
            text.contains("r.example") && text.contains("docker login"),
            "{text}"
        );
        assert!(!text.contains("TOPSECRET"), "{text}");

        let dir = config("{not json");
        let err = credentials_in(dir.path(), "r.example").expect_err("bad json");
        assert!(matches!(err, CredentialsError::Parse { .. }), "{err:?}");

        let creds = Credentials {
            server: "s".into(),
            username: "u".into(),
            password: "TOPSECRET".into(),
        };
        assert!(!format!("{creds:?}").contains("TOPSECRET"));
    }
}
