//! `{port}` and `{port.NAME}` placeholders in commands and environment values.

/// A placeholder that cannot be filled in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlaceholderError {
    /// `{port.NAME}` names no port of the service.
    #[error("placeholder `{{port.{name}}}` names no port of this service")]
    UnknownPort {
        /// The name used.
        name: String,
    },
    /// `{port}` is used but the service has several ports (or none).
    #[error("placeholder `{{port}}` is ambiguous: this service has {count} ports")]
    Ambiguous {
        /// How many ports the service has.
        count: usize,
    },
    /// `{port.` without a closing brace, or with an empty name.
    #[error("placeholder `{text}` is malformed; write `{{port}}` or `{{port.NAME}}`")]
    Malformed {
        /// The text from `{port` on.
        text: String,
    },
}

/// Replaces each `{port}` and `{port.NAME}` in `template` with the port number
/// `lookup` gives for it (`None` for plain `{port}`). `{{` stands for a literal `{`;
/// braces that do not start with `{port` are left as they are.
pub fn render_placeholders(
    template: &str,
    lookup: impl Fn(Option<&str>) -> Result<u16, PlaceholderError>,
) -> Result<String, PlaceholderError> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let tail = &rest[open..];
        if let Some(after) = tail.strip_prefix("{{") {
            out.push('{');
            rest = after;
        } else if let Some(after) = tail.strip_prefix("{port}") {
            out.push_str(&lookup(None)?.to_string());
            rest = after;
        } else if let Some(after) = tail.strip_prefix("{port.") {
            let malformed = || PlaceholderError::Malformed {
                text: tail.chars().take(24).collect(),
            };
            let close = after.find('}').ok_or_else(malformed)?;
            let name = &after[..close];
            if name.is_empty() || name.contains('{') {
                return Err(malformed());
            }
            out.push_str(&lookup(Some(name))?.to_string());
            rest = &after[close + 1..];
        } else {
            out.push('{');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(name: Option<&str>) -> Result<u16, PlaceholderError> {
        match name {
            None => Ok(8000),
            Some("admin") => Ok(9000),
            Some(other) => Err(PlaceholderError::UnknownPort { name: other.into() }),
        }
    }

    #[test]
    fn fills_in_ports() {
        assert_eq!(
            render_placeholders("-listen=:{port} -admin=:{port.admin}", lookup),
            Ok("-listen=:8000 -admin=:9000".to_string())
        );
    }

    #[test]
    fn leaves_other_braces_alone_and_unescapes() {
        assert_eq!(
            render_placeholders(r#"{"a": 1} {{port}"#, lookup),
            Ok(r#"{"a": 1} {port}"#.to_string())
        );
    }

    #[test]
    fn reports_unknown_and_malformed() {
        assert_eq!(
            render_placeholders("{port.web}", lookup),
            Err(PlaceholderError::UnknownPort { name: "web".into() })
        );
        assert!(matches!(
            render_placeholders("x{port.admin", lookup),
            Err(PlaceholderError::Malformed { .. })
        ));
        assert!(matches!(
            render_placeholders("{port.}", lookup),
            Err(PlaceholderError::Malformed { .. })
        ));
    }
}
