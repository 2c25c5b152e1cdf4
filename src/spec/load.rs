//! Loading a spec file: size and encoding checks, YAML parsing, typed
//! deserialization and semantic validation, with every problem collected.

use std::path::Path;

use super::de::{DeError, Sink, from_node};
use super::tree::{self, Value};
use super::validate::validate;
use super::{Node, Service, Spec};
use crate::diagnostic::{Diagnostic, Report};
use crate::error::chain;

/// The largest spec file lessnat reads (1 MiB); larger files are refused.
pub const MAX_SPEC_BYTES: usize = 1 << 20;

/// Reads and checks the spec at `path`. Errors come back as a [`Report`] naming the file.
pub fn load_file(path: &Path) -> Result<Spec, Report> {
    let file = path.display().to_string();
    match std::fs::read(path) {
        Ok(bytes) => load_bytes(&file, &bytes),
        Err(error) => Err(Report {
            file,
            source: String::new(),
            diagnostics: vec![Diagnostic::new(
                None,
                format!("cannot read the file: {}", chain(&error)),
            )],
        }),
    }
}

/// Checks the spec in `bytes`; `file` names it in messages.
pub fn load_bytes(file: &str, bytes: &[u8]) -> Result<Spec, Report> {
    let fail = |source: String, diagnostics: Vec<Diagnostic>| {
        let mut report = Report {
            file: file.to_string(),
            source,
            diagnostics,
        };
        report.normalize();
        Err(report)
    };
    if bytes.len() > MAX_SPEC_BYTES {
        let message = format!(
            "the file is {} bytes; specs are limited to {MAX_SPEC_BYTES} bytes",
            bytes.len()
        );
        return fail(
            String::new(),
            vec![
                Diagnostic::new(None, message)
                    .with_help("split it, or check that this is the right file"),
            ],
        );
    }
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => text,
        Err(error) => {
            let prefix = &bytes[..error.valid_up_to()];
            let line = prefix.iter().filter(|b| **b == b'\n').count() + 1;
            let message = format!(
                "the file is not UTF-8 text (invalid byte 0x{:02x} at line {line}, byte {})",
                bytes[error.valid_up_to()],
                error.valid_up_to()
            );
            return fail(
                String::new(),
                vec![Diagnostic::new(None, message).with_help("save the file as UTF-8")],
            );
        }
    };
    let source = text.to_string();
    let root = match tree::parse(text) {
        Ok(root) => root,
        Err(diagnostic) => return fail(source, vec![diagnostic]),
    };
    if root.value == Value::Null {
        return fail(
            source,
            vec![Diagnostic::new(None, "the spec is empty").with_help(
                "a spec starts with `version: 1`, then `nodes:` and `services:`; see examples/",
            )],
        );
    }

    let mut diagnostics = Vec::new();
    tree::duplicate_keys(&root, &mut diagnostics);
    let sink = Sink::default();
    let mut hard: Vec<DeError> = Vec::new();
    // Read list items one by one first, so a mistake in one service does not hide
    // mistakes in the next; then the whole document for its top-level fields.
    if let Value::Map(entries) = &root.value {
        for (key, value) in entries {
            let Value::Seq(items) = &value.value else {
                continue;
            };
            for item in items {
                let result = match key.value.scalar_text().as_deref() {
                    Some("nodes") => from_node::<Node>(item, &sink).map(drop),
                    Some("services") => from_node::<Service>(item, &sink).map(drop),
                    _ => Ok(()),
                };
                hard.extend(result.err());
            }
        }
    }
    let parsed = if hard.is_empty() {
        let result = from_node::<Spec>(&root, &sink);
        result.map_err(|e| hard.push(e)).ok()
    } else {
        None
    };
    diagnostics.extend(
        hard.into_iter()
            .chain(sink.take())
            .map(DeError::into_diagnostic),
    );
    let spec = match parsed {
        Some(spec) if diagnostics.is_empty() => spec,
        _ => return fail(source, diagnostics),
    };
    let problems = validate(&spec);
    if problems.is_empty() {
        Ok(spec)
    } else {
        fail(source, problems)
    }
}
