//! Image references as Docker reads them: `[REGISTRY/]REPOSITORY[:TAG][@DIGEST]`.
//!
//! The first path component is a registry host when it has a `.` or a `:`,
//! or is `localhost`; otherwise the image is on Docker Hub (`docker.io`), where
//! one-component names live under `library/`. Without tag or digest the tag
//! is `latest`.

/// Docker Hub's registry host, as references name it.
pub const DOCKER_HUB: &str = "docker.io";

/// An image reference taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// The registry host (and port), e.g. `registry.example:5000`; [`DOCKER_HUB`] by default.
    pub registry: String,
    /// The repository inside the registry, e.g. `team/web` (`library/nginx` on Docker Hub).
    pub repository: String,
    /// The tag; `latest` when the reference has neither tag nor digest.
    pub tag: Option<String>,
    /// The digest, e.g. `sha256:…`, when the reference pins one.
    pub digest: Option<String>,
}

/// A string that is not an image reference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid image reference \"{reference}\": {why}")]
pub struct ReferenceError {
    /// The reference as written.
    pub reference: String,
    /// What is wrong with it.
    pub why: &'static str,
}

impl ImageRef {
    /// Parses `reference`.
    pub fn parse(reference: &str) -> Result<ImageRef, ReferenceError> {
        let fail = |why| ReferenceError {
            reference: reference.to_string(),
            why,
        };
        let (name, digest) = match reference.split_once('@') {
            Some((name, digest)) => (name, Some(digest)),
            None => (reference, None),
        };
        if let Some(digest) = digest
            && !is_digest(digest)
        {
            return Err(fail("a digest is ALGORITHM:HEX, e.g. sha256:0123…"));
        }
        // A tag follows the last `:` after the last `/` (a `:` before it is a registry port).
        let last_part = name.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name[last_part..].rfind(':') {
            Some(i) => (&name[..last_part + i], Some(&name[last_part + i + 1..])),
            None => (name, None),
        };
        if let Some(tag) = tag
            && !is_tag(tag)
        {
            return Err(fail(
                "a tag is up to 128 letters, digits, `_`, `.` and `-`, not starting with `.` or `-`",
            ));
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => {
                (first.to_string(), rest.to_string())
            }
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        if registry.is_empty() || registry.contains(|c: char| c.is_whitespace() || c == '/') {
            return Err(fail("the registry host is empty or has spaces"));
        }
        if path.is_empty() || !path.split('/').all(is_path_component) {
            return Err(fail(
                "a repository is lowercase letters and digits in parts separated by `/`, \
                 joined inside a part by `.`, `_`, `__` or `-`",
            ));
        }
        let repository = if registry == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        let tag = match (tag, digest) {
            (None, None) => Some("latest".to_string()),
            (tag, _) => tag.map(str::to_string),
        };
        Ok(ImageRef {
            registry,
            repository,
            tag,
            digest: digest.map(str::to_string),
        })
    }

    /// The repository with its registry, as the engine's pull takes it and
    /// lists it in an image's digests: `registry.example/web`, `docker.io/library/nginx`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// What a pull asks for besides [`ImageRef::name`]: the digest when the
    /// reference pins one, else the tag.
    pub fn tag_or_digest(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }
}

fn is_digest(text: &str) -> bool {
    text.split_once(':').is_some_and(|(algorithm, hex)| {
        !algorithm.is_empty()
            && algorithm
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+.-_".contains(c))
            && hex.len() >= 32
            && hex.chars().all(|c| c.is_ascii_hexdigit())
    })
}

fn is_tag(tag: &str) -> bool {
    !tag.is_empty()
        && tag.len() <= 128
        && !tag.starts_with(['.', '-'])
        && tag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

fn is_path_component(part: &str) -> bool {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    let mut previous_separator = true;
    for c in part.chars() {
        if alnum(c) {
            previous_separator = false;
        } else if ".-_".contains(c) {
            // `__` and runs of `-` are allowed; other separators stand alone.
            if previous_separator && c == '.' {
                return false;
            }
            previous_separator = true;
        } else {
            return false;
        }
    }
    !part.is_empty()
        && part.chars().next().is_some_and(alnum)
        && part.chars().last().is_some_and(alnum)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(reference: &str) -> (String, String, Option<String>, Option<String>) {
        let r = ImageRef::parse(reference).unwrap_or_else(|e| panic!("{e}"));
        (r.registry, r.repository, r.tag, r.digest)
    }

    fn own(
        registry: &str,
        repository: &str,
        tag: Option<&str>,
        digest: Option<&str>,
    ) -> (String, String, Option<String>, Option<String>) {
        (
            registry.into(),
            repository.into(),
            tag.map(Into::into),
            digest.map(Into::into),
        )
    }

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn registry_repository_tag_and_digest() {
        assert_eq!(
            parts("nginx"),
            own("docker.io", "library/nginx", Some("latest"), None)
        );
        assert_eq!(
            parts("nginx:1.25"),
            own("docker.io", "library/nginx", Some("1.25"), None)
        );
        assert_eq!(
            parts("team/web:2"),
            own("docker.io", "team/web", Some("2"), None)
        );
        assert_eq!(
            parts("registry.example/web:2.1"),
            own("registry.example", "web", Some("2.1"), None)
        );
        assert_eq!(
            parts("127.0.0.1:5000/lessnat-testserver"),
            own("127.0.0.1:5000", "lessnat-testserver", Some("latest"), None)
        );
        assert_eq!(
            parts("localhost/a/b/c:x_y"),
            own("localhost", "a/b/c", Some("x_y"), None)
        );
        assert_eq!(
            parts(&format!("registry.example:443/web@{DIGEST}")),
            own("registry.example:443", "web", None, Some(DIGEST))
        );
        assert_eq!(
            parts(&format!("web:1@{DIGEST}")),
            own("docker.io", "library/web", Some("1"), Some(DIGEST))
        );
        let r = ImageRef::parse("127.0.0.1:5000/web:v2").expect("parses");
        assert_eq!(
            (r.name().as_str(), r.tag_or_digest()),
            ("127.0.0.1:5000/web", "v2")
        );
    }

    #[test]
    fn rejects_what_docker_rejects() {
        for bad in [
            "",
            "Web:1",
            "web:",
            "web:-x",
            "/web",
            "web/",
            "a//b",
            "web@sha256:zz",
            "web@md5",
            "re gistry.example/web",
            "web..x",
        ] {
            assert!(ImageRef::parse(bad).is_err(), "{bad:?} should be refused");
        }
        let err = ImageRef::parse("Web:1").expect_err("uppercase");
        assert!(
            err.to_string()
                .starts_with("invalid image reference \"Web:1\": "),
            "{err}"
        );
    }
}
