//! Diagnostics: located error messages rendered as `FILE:LINE:COLUMN: message`
//! with the source line and a caret under the offending text.

use std::fmt::Write as _;

use crate::style::Style;

/// A position in a source file: 1-based line and column (in characters), and
/// the character offset and length of the text it covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Span {
    /// 1-based line number.
    pub line: u32,
    /// 1-based column, counted in characters.
    pub column: u32,
    /// Number of characters the span covers on its first line (at least 1 when rendered).
    pub len: u32,
}

impl Span {
    /// A span at `line:column` covering `len` characters.
    pub fn new(line: u32, column: u32, len: u32) -> Self {
        Span { line, column, len }
    }

    /// Whether this span points somewhere in the file (line 0 means "unknown").
    pub fn is_known(&self) -> bool {
        self.line > 0
    }
}

/// How bad a diagnostic is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Severity {
    /// The spec is rejected.
    #[default]
    Error,
    /// The spec is accepted, but something in it is likely to bite.
    Warning,
}

/// One problem found in a spec file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// Where the problem is; `None` for problems with the whole file.
    pub span: Option<Span>,
    /// Error or warning.
    pub severity: Severity,
    /// What is wrong.
    pub message: String,
    /// What would be right, when lessnat can tell.
    pub help: Option<String>,
}

impl Diagnostic {
    /// A diagnostic at `span` saying `message`.
    pub fn new(span: Option<Span>, message: impl Into<String>) -> Self {
        Diagnostic {
            span: span.filter(Span::is_known),
            severity: Severity::Error,
            message: message.into(),
            help: None,
        }
    }

    /// A warning at `span` saying `message`.
    pub fn warning(span: Option<Span>, message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Warning,
            ..Diagnostic::new(span, message)
        }
    }

    /// The same diagnostic with a hint on how to fix it.
    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
}

/// All problems found in one file, with the file's text so they can be shown in context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The file name as the user gave it.
    pub file: String,
    /// The file's text (empty when it could not be read as text).
    pub source: String,
    /// The problems, in file order.
    pub diagnostics: Vec<Diagnostic>,
}

impl Report {
    /// Sorts diagnostics by position (file-level ones first) and drops exact repeats.
    pub fn normalize(&mut self) {
        self.diagnostics
            .sort_by(|a, b| (a.span, &a.message).cmp(&(b.span, &b.message)));
        self.diagnostics.dedup();
    }

    /// Renders every diagnostic, each followed by its source line and caret.
    pub fn render(&self, style: Style) -> String {
        let mut out = String::new();
        let lines: Vec<&str> = self.source.lines().collect();
        for diagnostic in &self.diagnostics {
            render_one(&mut out, &self.file, &lines, diagnostic, style);
        }
        let count = |severity| {
            self.diagnostics
                .iter()
                .filter(|d| d.severity == severity)
                .count()
        };
        let plural = |n: usize, word: &str| format!("{n} {word}{}", if n == 1 { "" } else { "s" });
        let (errors, warnings) = (count(Severity::Error), count(Severity::Warning));
        let summary = match (errors, warnings) {
            (_, 0) => format!("{} found", plural(errors, "error")),
            (0, _) => plural(warnings, "warning"),
            _ => format!(
                "{} found, {}",
                plural(errors, "error"),
                plural(warnings, "warning")
            ),
        };
        let _ = writeln!(out, "{}: {summary}", self.file);
        out
    }
}

fn render_one(out: &mut String, file: &str, lines: &[&str], d: &Diagnostic, style: Style) {
    let (color, word) = match d.severity {
        Severity::Error => ("1;31", "error"),
        Severity::Warning => ("1;33", "warning"),
    };
    let error = style.paint(color, word);
    let Some(span) = d.span else {
        let _ = writeln!(out, "{file}: {error}: {}", style.paint("1", &d.message));
        if let Some(help) = &d.help {
            let _ = writeln!(out, "  = help: {help}");
        }
        out.push('\n');
        return;
    };
    let _ = writeln!(
        out,
        "{file}:{}:{}: {error}: {}",
        span.line,
        span.column,
        style.paint("1", &d.message)
    );
    let number = span.line.to_string();
    let gutter = " ".repeat(number.len());
    let bar = style.paint("34", "|");
    if let Some(text) = lines.get(span.line as usize - 1) {
        let text = text.trim_end_matches('\r');
        let width = text.chars().count();
        let start = (span.column as usize).saturating_sub(1).min(width);
        let len = (span.len as usize).clamp(1, (width - start).max(1));
        let _ = writeln!(out, "{gutter} {bar}");
        let _ = writeln!(out, "{} {bar} {text}", style.paint("34", &number));
        let pad: String = text
            .chars()
            .take(start)
            .map(|c| if c == '\t' { '\t' } else { ' ' })
            .collect();
        let carets = style.paint(color, &"^".repeat(len));
        let _ = writeln!(out, "{gutter} {bar} {pad}{carets}");
    }
    if let Some(help) = &d.help {
        let _ = writeln!(out, "{gutter} = help: {help}");
    }
    out.push('\n');
}

/// The closest name to `given` among `candidates`, if one is close enough to be a likely typo.
/// A candidate is close when at most a third of its characters (and at least
/// one) must be added, removed, changed or swapped to reach it.
pub fn closest<'a>(given: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let given = given.to_lowercase();
    candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(&given, &c.to_lowercase()), c))
        .filter(|(distance, c)| *distance <= (c.chars().count() / 3).max(1))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, c)| c)
}

/// Formats names as a list for messages: `` `a`, `b` or `c` ``.
pub fn one_of(names: &[&str]) -> String {
    match names {
        [] => "nothing".to_string(),
        [one] => format!("`{one}`"),
        [init @ .., last] => {
            let head: Vec<String> = init.iter().map(|n| format!("`{n}`")).collect();
            format!("{} or `{last}`", head.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_caret_under_span() {
        let report = Report {
            file: "a.yaml".into(),
            source: "version: 1\nnodes: 3\n".into(),
            diagnostics: vec![
                Diagnostic::new(Some(Span::new(2, 8, 1)), "expected a list")
                    .with_help("use `- name: ...`"),
            ],
        };
        let text = report.render(Style::Plain);
        assert_eq!(
            text,
            "a.yaml:2:8: error: expected a list\n  |\n2 | nodes: 3\n  |        ^\n  = help: use `- name: ...`\n\na.yaml: 1 error found\n"
        );
    }

    #[test]
    fn closest_finds_typos_only() {
        assert_eq!(
            closest("protocl", ["name", "protocol", "port"]),
            Some("protocol")
        );
        assert_eq!(closest("tpc", ["tcp", "udp"]), Some("tcp"));
        assert_eq!(closest("Host", ["host", "routed"]), Some("host"));
        assert_eq!(closest("zzz", ["name", "protocol"]), None);
    }

    #[test]
    fn one_of_lists_names() {
        assert_eq!(one_of(&["tcp", "udp"]), "`tcp` or `udp`");
        assert_eq!(one_of(&["a", "b", "c"]), "`a`, `b` or `c`");
    }
}
