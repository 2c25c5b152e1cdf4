//! The error convention, and [`chain`], the one way an error becomes text.
//!
//! - A message describes its own level only: what lessnat was doing, and what
//!   to do about it when this level knows (the hint stays where the knowledge
//!   is). It never includes its cause: no `{source}`, no `{0}` of a wrapped
//!   error, no cause's text copied into a `String` field.
//! - The cause is returned by `source()`: a field named `source`, or one marked
//!   `#[source]` or `#[from]`. A pure wrapper is `#[error(transparent)]`.
//! - Whoever shows an error or keeps it as text (the binary's last words, a
//!   record's `last_error`, an event, a probe result) uses [`chain`]: every
//!   level once, outermost first, joined by `: `. `to_string()` alone would
//!   lose the causes.
//!
//! So `cannot enter network namespace /run/netns/x (lessnat needs root, or
//! CAP_SYS_ADMIN, for --netns)` with its cause `EPERM: Operation not
//! permitted` prints as both, once each, joined by `: `.

use std::error::Error;

/// `error` and its causes on one line, `outer: inner: innermost`. A cause
/// whose text is already there is left out: some libraries' messages include
/// their own source, and each cause is printed once.
pub fn chain(error: &dyn Error) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(cause) = next {
        let part = cause.to_string();
        if !part.is_empty() && !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        next = cause.source();
    }
    text
}

/// Asserts that each of `parts` occurs exactly once in the [`chain`] of
/// `error`, for tests of the convention: a cause printed once, a hint kept.
#[cfg(test)]
pub(crate) fn assert_chain_once(error: &dyn Error, parts: &[&str]) {
    let text = chain(error);
    for part in parts {
        assert_eq!(text.matches(part).count(), 1, "{part:?} once in: {text}");
    }
}

/// A plain file in `dir` where lessnat wants a directory, and what the
/// system says when a directory is made there.
#[cfg(test)]
pub(crate) fn file_in_the_way(dir: &std::path::Path) -> (std::path::PathBuf, String) {
    let file = dir.join("file");
    std::fs::write(&file, b"").expect("write");
    let cause = std::fs::create_dir_all(&file).expect_err("a file");
    (file, cause.to_string())
}

#[cfg(test)]
mod tests {
    use super::chain;

    /// An error level with an optional cause.
    #[derive(Debug, thiserror::Error)]
    #[error("{message}")]
    struct Level {
        message: &'static str,
        #[source]
        cause: Option<Box<Level>>,
    }

    fn level(message: &'static str, cause: Option<Level>) -> Level {
        Level {
            message,
            cause: cause.map(Box::new),
        }
    }

    #[test]
    fn joins_every_level_once() {
        let error = level("outer", Some(level("middle", Some(level("inner", None)))));
        assert_eq!(chain(&error), "outer: middle: inner");
    }

    #[test]
    fn leaves_out_a_cause_a_message_already_holds() {
        // As a library whose message includes its source would build it.
        let error = level(
            "request failed: connection refused",
            Some(level("connection refused", None)),
        );
        assert_eq!(chain(&error), "request failed: connection refused");
    }
}
