//! Output styling: colour on a terminal, plain text everywhere else.

/// Plain text or ANSI colours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// Plain text, for files, pipes and `--no-color`.
    Plain,
    /// ANSI colours, for a terminal.
    Color,
}

impl Style {
    /// `text` in the ANSI style `code` (e.g. `1;31`), or as it is when plain.
    pub fn paint(self, code: &str, text: &str) -> String {
        match self {
            Style::Plain => text.to_string(),
            Style::Color => format!("\x1b[{code}m{text}\x1b[0m"),
        }
    }
}
