//! A YAML document read into a tree of nodes that remember where they stand in
//! the file, so that every later error can point at the offending text.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

use crate::diagnostic::{Diagnostic, Span};

/// A YAML value with its position.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// Where the value starts and how long its first token is.
    pub span: Span,
    /// The value itself.
    pub value: Value,
}

/// The shapes a YAML value can take.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `~`, `null` or nothing.
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// An integer.
    Int(i128),
    /// A floating-point number.
    Float(f64),
    /// A string.
    Str(String),
    /// A sequence.
    Seq(Vec<Node>),
    /// A mapping, in file order; repeated keys are kept so they can be reported.
    Map(Vec<(Node, Node)>),
}

impl Value {
    /// Describes the value for messages: ``integer `8000` ``, `a list`, ...
    pub fn describe(&self) -> String {
        match self {
            Value::Null => "nothing (null)".to_string(),
            Value::Bool(b) => format!("boolean `{b}`"),
            Value::Int(i) => format!("integer `{i}`"),
            Value::Float(f) => format!("number `{f}`"),
            Value::Str(s) => format!("string \"{s}\""),
            Value::Seq(_) => "a list".to_string(),
            Value::Map(_) => "a mapping".to_string(),
        }
    }

    /// The scalar as text, as it would read in the file; `None` for lists and mappings.
    pub fn scalar_text(&self) -> Option<String> {
        match self {
            Value::Null => Some(String::new()),
            Value::Bool(b) => Some(b.to_string()),
            Value::Int(i) => Some(i.to_string()),
            Value::Float(f) => Some(f.to_string()),
            Value::Str(s) => Some(s.clone()),
            Value::Seq(_) | Value::Map(_) => None,
        }
    }
}

fn span_of(location: &serde_saphyr::Location) -> Span {
    let len = u32::try_from(location.span().len()).unwrap_or(u32::MAX);
    Span::new(
        u32::try_from(location.line()).unwrap_or(u32::MAX),
        u32::try_from(location.column()).unwrap_or(u32::MAX),
        len,
    )
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let spanned = Spanned::<Value>::deserialize(deserializer)?;
        Ok(Node {
            span: span_of(&spanned.referenced),
            value: spanned.value,
        })
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ValueVisitor)
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Int(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Int(v.into()))
    }
    fn visit_i128<E>(self, v: i128) -> Result<Value, E> {
        Ok(Value::Int(v))
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value, E> {
        i128::try_from(v)
            .map(Value::Int)
            .map_err(|_| E::custom("integer too large"))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::Str(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::Str(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        Value::deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Node>()? {
            items.push(item);
        }
        Ok(Value::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<Node>()? {
            let value = map.next_value::<Node>()?;
            entries.push((key, value));
        }
        Ok(Value::Map(entries))
    }
}

/// Parses YAML text into a tree. Syntax errors come back as one located diagnostic.
pub fn parse(text: &str) -> Result<Node, Diagnostic> {
    let mut options = serde_saphyr::Options::default();
    options.duplicate_keys = serde_saphyr::DuplicateKeyPolicy::PassThrough;
    // YAML 1.2 core schema, as editors use: `yes`, `on` and `y` are strings.
    options.strict_booleans = true;
    serde_saphyr::from_str_with_options::<Node>(text, options).map_err(|error| {
        let span = error.location().map(|l| span_of(&l));
        Diagnostic::new(span, syntax_message(&error))
    })
}

fn syntax_message(error: &serde_saphyr::Error) -> String {
    let text = error.without_snippet().to_string();
    // serde-saphyr appends " at line L column C"; the location is shown separately.
    let text = match text.rfind(" at line ") {
        Some(at) => text[..at].to_string(),
        None => text,
    };
    format!("invalid YAML: {}", text.trim())
}

/// Reports every key that appears twice in one mapping, anywhere in the tree.
pub fn duplicate_keys(node: &Node, out: &mut Vec<Diagnostic>) {
    match &node.value {
        Value::Seq(items) => items.iter().for_each(|item| duplicate_keys(item, out)),
        Value::Map(entries) => {
            for (index, (key, value)) in entries.iter().enumerate() {
                let first = entries[..index].iter().find(|(k, _)| k.value == key.value);
                if let Some((first, _)) = first {
                    let name = key.value.scalar_text().unwrap_or_default();
                    out.push(
                        Diagnostic::new(Some(key.span), format!("duplicate key `{name}`"))
                            .with_help(format!(
                                "`{name}` is already set at line {}, column {}; keep one of them",
                                first.span.line, first.span.column
                            )),
                    );
                }
                duplicate_keys(value, out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_carry_positions() {
        let tree = parse("a: 1\nb:\n  - x\n  - {c: true}\n").expect("valid yaml");
        let Value::Map(entries) = &tree.value else {
            panic!("expected a map, got {tree:?}")
        };
        assert_eq!(entries[0].1.value, Value::Int(1));
        assert_eq!((entries[0].1.span.line, entries[0].1.span.column), (1, 4));
        let Value::Seq(items) = &entries[1].1.value else {
            panic!("expected a seq")
        };
        assert_eq!(items[0].value, Value::Str("x".into()));
        assert_eq!((items[0].span.line, items[0].span.column), (3, 5));
    }

    #[test]
    fn duplicate_keys_are_all_reported() {
        let tree = parse("a: 1\na: 2\nb: {c: 1, c: 2}\n").expect("valid yaml");
        let mut found = Vec::new();
        duplicate_keys(&tree, &mut found);
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].span.map(|s| s.line), Some(2));
        assert_eq!(found[1].span.map(|s| s.line), Some(3));
    }

    #[test]
    fn syntax_errors_are_located() {
        let error = parse("a: [1, 2\n").expect_err("unclosed flow sequence");
        assert!(error.span.is_some(), "{error:?}");
        assert!(
            error.message.starts_with("invalid YAML"),
            "{}",
            error.message
        );
    }
}
