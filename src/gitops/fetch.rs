//! The node's mirror of the spec repository: a bare Git repository in
//! `<state-dir>/repo`, fetched incrementally with gix (no `git` binary needed,
//! no worktree: the spec is read from the object database at the fetched
//! commit). It also says how a fetched commit relates to the last applied one.
//!
//! Refs lessnat keeps there: `refs/lessnat/fetched` (the tip of `--ref` at the
//! last fetch) and `refs/lessnat/applied` (the last applied commit, so that no
//! `git gc` run by someone else prunes what the ancestry check needs).

use std::path::{Component, Path, PathBuf};
use std::sync::atomic::AtomicBool;

use gix::ObjectId;
use gix::remote::Direction;
use serde::{Deserialize, Serialize};

/// The local ref the fetched tip is written to.
pub const FETCHED_REF: &str = "refs/lessnat/fetched";
/// The local ref that keeps the last applied commit.
pub const APPLIED_REF: &str = "refs/lessnat/applied";

/// Something went wrong with the mirror or the fetch.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The mirror could not be created or opened.
    #[error(
        "the repository mirror {path} cannot be used (it is only a cache: move it aside and it is fetched anew)"
    )]
    Mirror {
        /// The mirror's directory.
        path: PathBuf,
        /// Why.
        #[source]
        cause: gix::Error,
    },
    /// The ref given is not a ref name lessnat can fetch.
    #[error(
        "`{reference}` is not a branch name or full ref: give a branch like `main`, or a full ref like `refs/tags/v3`"
    )]
    BadRef {
        /// The ref as given.
        reference: String,
    },
    /// The path given is not a path inside the repository.
    #[error(
        "`{path}` is not a file path inside the repository: give it relative to the repository's top, like `lessnat/spec.yaml`"
    )]
    BadPath {
        /// The path as given.
        path: String,
    },
    /// Fetching failed (network, authentication, not a repository...).
    #[error("fetching {reference} from {url} failed")]
    Fetch {
        /// The repository URL.
        url: String,
        /// The ref fetched.
        reference: String,
        /// Why.
        #[source]
        cause: gix::Error,
    },
    /// The remote has no such ref.
    #[error(
        "{url} has no {reference}; check --ref (branches are given by name, tags as refs/tags/NAME)"
    )]
    NoSuchRef {
        /// The repository URL.
        url: String,
        /// The ref looked for.
        reference: String,
    },
    /// The ref points to something that is not a commit.
    #[error("{reference} in {url} does not point to a commit ({id})")]
    NotACommit {
        /// The repository URL.
        url: String,
        /// The ref.
        reference: String,
        /// What it points to.
        id: String,
        /// Why peeling failed.
        #[source]
        cause: gix::Error,
    },
    /// The spec file is not in the commit.
    #[error("commit {commit} has no file {path}; check --path (relative to the repository's top)")]
    NoSuchFile {
        /// The commit.
        commit: String,
        /// The path looked for.
        path: String,
    },
    /// The path names a directory, a symbolic link or a submodule.
    #[error("{path} in commit {commit} is not a regular file ({kind})")]
    NotAFile {
        /// The commit.
        commit: String,
        /// The path.
        path: String,
        /// What it is instead.
        kind: &'static str,
    },
    /// Reading objects from the mirror failed.
    #[error("reading {what} from the repository mirror {path} failed")]
    Read {
        /// The mirror's directory.
        path: PathBuf,
        /// What was being read.
        what: String,
        /// Why.
        #[source]
        cause: gix::Error,
    },
}

/// Where the spec lives: repository URL, ref and path inside the repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    /// The repository URL (`https://`, `ssh://`, `git@host:path`, `file://`, or a local path).
    pub url: String,
    /// The full ref fetched, like `refs/heads/main`.
    pub reference: String,
    /// The spec file's path inside the repository, with `/` separators.
    pub path: String,
}

impl Source {
    /// Checks and normalises what the user gave: a branch name becomes
    /// `refs/heads/NAME`; the path must stay inside the repository.
    pub fn new(url: &str, reference: &str, path: &str) -> Result<Source, FetchError> {
        Ok(Source {
            url: url.to_string(),
            reference: full_ref(reference)?,
            path: repo_path(path)?,
        })
    }

    /// The ref as people say it: `main` for `refs/heads/main`.
    pub fn short_ref(&self) -> &str {
        self.reference
            .strip_prefix("refs/heads/")
            .unwrap_or(&self.reference)
    }

    /// `text` with the URL's password, if it has one
    /// (`https://user:TOKEN@host/...`), replaced by `***`: for everything
    /// lessnat prints, records or emits.
    pub fn redact(&self, text: &str) -> String {
        match password(&self.url) {
            Some(secret) if !secret.is_empty() => {
                let text = text.replace(&format!(":{secret}@"), ":***@");
                // A long secret is masked wherever it shows; a short one only
                // in the URL form, so that ordinary words stay intact.
                if secret.len() >= 8 {
                    text.replace(secret, "***")
                } else {
                    text
                }
            }
            _ => text.to_string(),
        }
    }

    /// The URL without its password, for messages and records.
    pub fn public_url(&self) -> String {
        self.redact(&self.url)
    }

    /// `URL@REF:PATH` without the password, for people.
    pub fn describe(&self) -> String {
        format!("{}@{}:{}", self.public_url(), self.short_ref(), self.path)
    }

    /// This source with the password taken out of the URL, fit to be recorded.
    pub fn redacted(&self) -> Source {
        Source {
            url: self.public_url(),
            ..self.clone()
        }
    }
}

/// The password in a URL's user information (`scheme://user:password@host`).
fn password(url: &str) -> Option<&str> {
    let rest = &url[url.find("://")? + 3..];
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    let user_info = &authority[..authority.rfind('@')?];
    user_info.split_once(':').map(|(_, secret)| secret)
}

/// `main` → `refs/heads/main`; `refs/...` as is. Rejects what cannot be a ref
/// name (and refspec syntax: globs, `:`, leading `+`).
fn full_ref(reference: &str) -> Result<String, FetchError> {
    let bad = || FetchError::BadRef {
        reference: reference.to_string(),
    };
    let invalid_char = |c: char| {
        c.is_ascii_control() || c.is_whitespace() || "~^:?*[\\".contains(c) || c == '\u{7f}'
    };
    if reference.is_empty()
        || reference.starts_with(['-', '+', '/'])
        || reference.ends_with(['/', '.'])
        || reference.ends_with(".lock")
        || reference.contains("..")
        || reference.contains("//")
        || reference.contains("@{")
        || reference.chars().any(invalid_char)
    {
        return Err(bad());
    }
    if reference.starts_with("refs/") {
        Ok(reference.to_string())
    } else {
        Ok(format!("refs/heads/{reference}"))
    }
}

/// A relative path without `.` or `..` parts, joined with `/`.
fn repo_path(path: &str) -> Result<String, FetchError> {
    let bad = || FetchError::BadPath {
        path: path.to_string(),
    };
    let mut parts = Vec::new();
    for component in Path::new(path).components() {
        match component {
            Component::Normal(part) => parts.push(part.to_str().ok_or_else(bad)?),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return Err(bad()),
        }
    }
    if parts.is_empty() {
        return Err(bad());
    }
    Ok(parts.join("/"))
}

/// How a fetched commit stands to the last applied one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relation {
    /// The same commit.
    Same,
    /// The fetched commit comes after the applied one: a normal step forward.
    Descendant,
    /// The fetched commit is older than the applied one (a stale mirror, a reverted push).
    Ancestor,
    /// Both have a common ancestor but neither contains the other: history was rewritten.
    Diverged,
    /// No common history at all (another repository?).
    Unrelated,
    /// The applied commit is not in the mirror (the mirror was replaced), so nothing can be said.
    Unknown,
}

impl Relation {
    /// The relation's name, as in events: `same`, `descendant`, `ancestor`...
    pub fn as_str(self) -> &'static str {
        match self {
            Relation::Same => "same",
            Relation::Descendant => "descendant",
            Relation::Ancestor => "ancestor",
            Relation::Diverged => "diverged",
            Relation::Unrelated => "unrelated",
            Relation::Unknown => "unknown",
        }
    }

    /// Whether applying the fetched commit moves the node forward (or keeps it where it is).
    pub fn is_forward(self) -> bool {
        matches!(self, Relation::Same | Relation::Descendant)
    }
}

/// The mirror of the spec repository.
pub struct Mirror {
    path: PathBuf,
    repo: gix::Repository,
}

impl std::fmt::Debug for Mirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mirror").field("path", &self.path).finish()
    }
}

impl Mirror {
    /// Opens the bare repository at `path`, creating it when missing. A new
    /// mirror is made in a temporary directory next to it and renamed into
    /// place, so an interrupted first run leaves no half-made repository.
    pub fn open_or_init(path: &Path) -> Result<Mirror, FetchError> {
        let mirror_error = |cause: gix::Error| FetchError::Mirror {
            path: path.to_path_buf(),
            cause,
        };
        let io_error = |e: std::io::Error| mirror_error(gix::Error::from_error(e));
        if !path.exists() {
            let parent = path.parent().unwrap_or(Path::new("."));
            std::fs::create_dir_all(parent).map_err(io_error)?;
            let temp = tempfile::Builder::new()
                .prefix(".repo-new")
                .tempdir_in(parent)
                .map_err(io_error)?;
            gix::init_bare(temp.path()).map_err(mirror_error)?;
            std::fs::rename(temp.path(), path).map_err(io_error)?;
            // The directory is now `path`; forgetting the temporary name leaves it there.
            let _ = temp.keep();
        }
        let mut repo = gix::open(path).map_err(mirror_error)?;
        repo.object_cache_size_if_unset(4 << 20);
        Ok(Mirror {
            path: path.to_path_buf(),
            repo,
        })
    }

    /// Fetches `source`'s ref (only that ref, no tags), moves
    /// [`FETCHED_REF`] to it and returns the commit it points to. Only objects
    /// the mirror lacks are transferred. `interrupt` stops the transfer.
    pub fn fetch(&self, source: &Source, interrupt: &AtomicBool) -> Result<ObjectId, FetchError> {
        let fetch_error = |cause: gix::Error| FetchError::Fetch {
            url: source.public_url(),
            reference: source.reference.clone(),
            cause,
        };
        let refspec = format!("+{}:{FETCHED_REF}", source.reference);
        let remote = self
            .repo
            .remote_at(source.url.as_str())
            .map_err(fetch_error)?
            .with_fetch_tags(gix::remote::fetch::Tags::None)
            .with_refspecs([refspec.as_str()], Direction::Fetch)
            .map_err(fetch_error)?;
        let prepared = remote
            .connect(Direction::Fetch)
            .map_err(fetch_error)?
            .prepare_fetch(gix::progress::Discard, Default::default())
            .map_err(fetch_error)?;
        let tip = prepared
            .ref_map()
            .mappings
            .iter()
            .find_map(|mapping| mapping.remote.as_id())
            .map(ToOwned::to_owned)
            .ok_or_else(|| FetchError::NoSuchRef {
                url: source.public_url(),
                reference: source.reference.clone(),
            })?;
        prepared
            .receive(gix::progress::Discard, interrupt)
            .map_err(fetch_error)?;
        let commit = self
            .repo
            .find_object(tip)
            .and_then(|object| object.peel_to_commit())
            .map_err(|e| FetchError::NotACommit {
                url: source.public_url(),
                reference: source.reference.clone(),
                id: tip.to_string(),
                cause: e,
            })?;
        Ok(commit.id)
    }

    /// The commit [`FETCHED_REF`] points to: what the last fetch brought,
    /// or `None` before the first.
    pub fn fetched(&self) -> Result<Option<ObjectId>, FetchError> {
        let reference =
            self.repo
                .try_find_reference(FETCHED_REF)
                .map_err(|e| FetchError::Mirror {
                    path: self.path.clone(),
                    cause: gix::Error::from_error(e),
                })?;
        let Some(mut reference) = reference else {
            return Ok(None);
        };
        let id = reference.peel_to_id().map_err(|e| FetchError::Mirror {
            path: self.path.clone(),
            cause: gix::Error::from_error(e),
        })?;
        Ok(Some(id.detach()))
    }

    /// The bytes of the file at `path` (as normalised by [`Source::new`]) in `commit`.
    pub fn read_file(&self, commit: ObjectId, path: &str) -> Result<Vec<u8>, FetchError> {
        let read_error = |what: String| {
            let mirror = self.path.clone();
            move |cause| FetchError::Read {
                path: mirror,
                what,
                cause,
            }
        };
        let tree = self
            .repo
            .find_commit(commit)
            .and_then(|c| c.tree())
            .map_err(read_error(format!("the tree of commit {commit}")))?;
        let entry = tree
            .lookup_entry_by_path(path)
            .map_err(read_error(format!("{path} in commit {commit}")))?
            .ok_or_else(|| FetchError::NoSuchFile {
                commit: commit.to_string(),
                path: path.to_string(),
            })?;
        let mode = entry.mode();
        let kind = if mode.is_tree() {
            Some("a directory")
        } else if mode.is_link() {
            Some("a symbolic link")
        } else if mode.is_commit() {
            Some("a submodule")
        } else {
            None
        };
        if let Some(kind) = kind {
            return Err(FetchError::NotAFile {
                commit: commit.to_string(),
                path: path.to_string(),
                kind,
            });
        }
        let object = entry
            .object()
            .map_err(read_error(format!("{path} in commit {commit}")))?;
        Ok(object.detach().data)
    }

    /// How `fetched` stands to `applied` (both full hexadecimal ids).
    pub fn relation(&self, applied: &str, fetched: ObjectId) -> Result<Relation, FetchError> {
        let Ok(applied) = ObjectId::from_hex(applied.as_bytes()) else {
            return Ok(Relation::Unknown);
        };
        if applied == fetched {
            return Ok(Relation::Same);
        }
        if !self.repo.has_object(applied) {
            return Ok(Relation::Unknown);
        }
        let base = self
            .repo
            .merge_base(fetched, applied)
            .map_err(|cause| FetchError::Read {
                path: self.path.clone(),
                what: format!("the common history of {fetched} and {applied}"),
                cause,
            })?;
        Ok(match base.map(|id| id.detach()) {
            None => Relation::Unrelated,
            Some(base) if base == applied => Relation::Descendant,
            Some(base) if base == fetched => Relation::Ancestor,
            Some(_) => Relation::Diverged,
        })
    }

    /// Points [`APPLIED_REF`] at `commit`, which keeps it (and its history) in the mirror.
    pub fn mark_applied(&self, commit: ObjectId) -> Result<(), FetchError> {
        self.repo
            .reference(
                APPLIED_REF,
                commit,
                gix::refs::transaction::PreviousValue::Any,
                "lessnat: applied",
            )
            .map(drop)
            .map_err(|cause| FetchError::Mirror {
                path: self.path.clone(),
                cause,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refs_are_completed_and_checked() {
        assert_eq!(full_ref("main").expect("branch"), "refs/heads/main");
        assert_eq!(
            full_ref("release/2.x").expect("branch"),
            "refs/heads/release/2.x"
        );
        assert_eq!(full_ref("refs/tags/v3").expect("tag"), "refs/tags/v3");
        for bad in [
            "", "+main", "main:x", "ma in", "a..b", "main/", "-x", "refs/*", "x.lock", "a@{1}",
        ] {
            assert!(full_ref(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn paths_stay_inside_the_repository() {
        assert_eq!(repo_path("spec.yaml").expect("plain"), "spec.yaml");
        assert_eq!(
            repo_path("./lessnat//spec.yaml").expect("normalised"),
            "lessnat/spec.yaml"
        );
        for bad in ["", ".", "/etc/spec.yaml", "../spec.yaml", "a/../../b"] {
            assert!(repo_path(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn passwords_in_urls_are_masked() {
        let source = Source::new(
            "https://deploy:glpat-0123456789@git.example.org/ops/spec.git",
            "main",
            "spec.yaml",
        )
        .expect("source");
        assert_eq!(
            source.public_url(),
            "https://deploy:***@git.example.org/ops/spec.git"
        );
        assert_eq!(
            source.redact("401 for token glpat-0123456789"),
            "401 for token ***"
        );
        assert_eq!(source.redacted().url, source.public_url());
        let short = Source::new("https://u:pw@host/r.git", "main", "s.yaml").expect("source");
        assert_eq!(short.public_url(), "https://u:***@host/r.git");
        assert_eq!(short.redact("pwd stays"), "pwd stays");
        for plain in [
            "https://host/r.git",
            "git@host:r.git",
            "ssh://git@host/r.git",
            "/srv/r.git",
        ] {
            let source = Source::new(plain, "main", "s.yaml").expect("source");
            assert_eq!(source.public_url(), plain);
        }
    }

    #[test]
    fn short_ref_drops_refs_heads() {
        let source = Source::new("file:///x", "main", "spec.yaml").expect("valid");
        assert_eq!(source.short_ref(), "main");
        let tag = Source::new("file:///x", "refs/tags/v1", "spec.yaml").expect("valid");
        assert_eq!(tag.short_ref(), "refs/tags/v1");
    }

    /// A work repository made with the git CLI, pushed to a bare one that is fetched from.
    struct Upstream {
        dir: tempfile::TempDir,
    }

    impl Upstream {
        fn new() -> Option<Upstream> {
            let dir = tempfile::tempdir().expect("temp dir");
            let upstream = Upstream { dir };
            if std::process::Command::new("git")
                .arg("--version")
                .output()
                .is_err()
            {
                eprintln!("SKIPPED: needs the git command");
                return None;
            }
            upstream.git(&["init", "--quiet", "--bare", "-b", "main", "remote.git"]);
            upstream.git(&["init", "--quiet", "-b", "main", "work"]);
            Some(upstream)
        }

        fn git(&self, args: &[&str]) -> String {
            let output = std::process::Command::new("git")
                .current_dir(self.dir.path())
                .args(["-c", "user.name=t", "-c", "user.email=t@example.org"])
                .args(args)
                .output()
                .expect("git");
            assert!(
                output.status.success(),
                "git {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            String::from_utf8_lossy(&output.stdout).trim().to_string()
        }

        /// Commits `text` as `path` on the work repository's current branch and returns the commit.
        fn commit(&self, path: &str, text: &str) -> String {
            let file = self.dir.path().join("work").join(path);
            std::fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");
            std::fs::write(file, text).expect("write");
            self.git(&["-C", "work", "add", "-A"]);
            self.git(&["-C", "work", "commit", "--quiet", "-m", text]);
            self.git(&["-C", "work", "rev-parse", "HEAD"])
        }

        fn push(&self, spec: &str) {
            self.git(&[
                "-C",
                "work",
                "push",
                "--quiet",
                "--force",
                "../remote.git",
                spec,
            ]);
        }

        fn url(&self) -> String {
            format!("file://{}", self.dir.path().join("remote.git").display())
        }
    }

    #[test]
    fn fetches_reads_and_relates_commits() {
        let Some(upstream) = Upstream::new() else {
            return;
        };
        let first = upstream.commit("lessnat/spec.yaml", "one");
        upstream.push("main");
        let state = tempfile::tempdir().expect("state");
        let mirror = Mirror::open_or_init(&state.path().join("repo")).expect("mirror");
        let source = Source::new(&upstream.url(), "main", "lessnat/spec.yaml").expect("source");
        let stop = AtomicBool::new(false);
        assert_eq!(mirror.fetched().expect("nothing fetched yet"), None);
        let fetched = mirror.fetch(&source, &stop).expect("fetch");
        assert_eq!(fetched.to_string(), first);
        assert_eq!(mirror.fetched().expect("fetched"), Some(fetched));
        assert_eq!(
            mirror.read_file(fetched, &source.path).expect("read"),
            b"one"
        );
        assert!(matches!(
            mirror.read_file(fetched, "nope.yaml"),
            Err(FetchError::NoSuchFile { .. })
        ));
        assert!(matches!(
            mirror.read_file(fetched, "lessnat"),
            Err(FetchError::NotAFile {
                kind: "a directory",
                ..
            })
        ));
        mirror.mark_applied(fetched).expect("mark");

        let second = upstream.commit("lessnat/spec.yaml", "two");
        upstream.push("main");
        let mirror = Mirror::open_or_init(&state.path().join("repo")).expect("reopen");
        assert_eq!(
            mirror.fetched().expect("reopened").map(|c| c.to_string()),
            Some(first.clone()),
            "the last fetch is remembered until the next"
        );
        let fetched = mirror.fetch(&source, &stop).expect("fetch again");
        assert_eq!(fetched.to_string(), second);
        assert_eq!(
            mirror.read_file(fetched, &source.path).expect("read"),
            b"two"
        );
        let id = |hex: &str| ObjectId::from_hex(hex.as_bytes()).expect("id");
        assert_eq!(
            mirror.relation(&first, fetched).expect("rel"),
            Relation::Descendant
        );
        assert_eq!(
            mirror.relation(&second, id(&first)).expect("rel"),
            Relation::Ancestor
        );
        assert_eq!(
            mirror.relation(&second, fetched).expect("rel"),
            Relation::Same
        );
        assert_eq!(
            mirror.relation(&"0".repeat(40), fetched).expect("rel"),
            Relation::Unknown
        );

        // A rewritten history: the branch is reset to `first` and gets another commit.
        upstream.git(&["-C", "work", "reset", "--quiet", "--hard", &first]);
        let rewritten = upstream.commit("lessnat/spec.yaml", "three");
        upstream.push("main");
        let fetched = mirror.fetch(&source, &stop).expect("fetch rewritten");
        assert_eq!(fetched.to_string(), rewritten);
        assert_eq!(
            mirror.relation(&second, fetched).expect("rel"),
            Relation::Diverged
        );

        // An unrelated history on another branch.
        upstream.git(&["-C", "work", "checkout", "--quiet", "--orphan", "other"]);
        let unrelated = upstream.commit("lessnat/spec.yaml", "four");
        upstream.push("other");
        let other = Source::new(&upstream.url(), "other", "lessnat/spec.yaml").expect("source");
        let fetched = mirror.fetch(&other, &stop).expect("fetch other");
        assert_eq!(fetched.to_string(), unrelated);
        assert_eq!(
            mirror.relation(&second, fetched).expect("rel"),
            Relation::Unrelated
        );

        let missing = Source::new(&upstream.url(), "gone", "spec.yaml").expect("source");
        let error = mirror.fetch(&missing, &stop).expect_err("no such branch");
        assert!(matches!(error, FetchError::NoSuchRef { .. }), "{error}");
    }

    #[test]
    fn a_missing_repository_is_a_fetch_error() {
        let state = tempfile::tempdir().expect("state");
        let mirror = Mirror::open_or_init(&state.path().join("repo")).expect("mirror");
        let url = format!("file://{}", state.path().join("nothing-here").display());
        let source = Source::new(&url, "main", "spec.yaml").expect("source");
        let error = mirror
            .fetch(&source, &AtomicBool::new(false))
            .expect_err("nothing to fetch from");
        assert!(matches!(error, FetchError::Fetch { .. }), "{error}");
        assert!(error.to_string().contains("nothing-here"), "{error}");
        let cause = std::error::Error::source(&error).expect("gix's cause");
        crate::error::assert_chain_once(&error, &[&cause.to_string()]);
    }
}
