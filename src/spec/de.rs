//! A serde deserializer over [`Node`] trees. Every error it raises carries the
//! position of the offending node, unknown fields are all collected (with the
//! closest valid name), and [`Located`] values learn where they came from.

use std::cell::RefCell;
use std::fmt;

use serde::de::value::{SeqDeserializer, StrDeserializer};
use serde::de::{self, DeserializeSeed, Error as _, IntoDeserializer, Visitor};

use super::located::LOCATED_MARKER;
use super::tree::{Node, Value};
use crate::diagnostic::{Diagnostic, Span, closest, one_of};

/// An error raised while turning a node into a typed value.
#[derive(Debug, Clone, PartialEq)]
pub struct DeError {
    span: Option<Span>,
    message: String,
    help: Option<String>,
}

impl DeError {
    fn at(mut self, span: Span) -> Self {
        self.span.get_or_insert(span);
        self
    }

    fn with_help(mut self, help: String) -> Self {
        self.help = Some(help);
        self
    }

    /// Converts the error to a diagnostic for the user.
    pub fn into_diagnostic(self) -> Diagnostic {
        let diagnostic = Diagnostic::new(self.span, self.message);
        match self.help {
            Some(help) => diagnostic.with_help(help),
            None => diagnostic,
        }
    }
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DeError {}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DeError {
            span: None,
            message: msg.to_string(),
            help: None,
        }
    }

    fn invalid_type(unexp: de::Unexpected, exp: &dyn de::Expected) -> Self {
        DeError::custom(format_args!("expected {exp}, found {}", unexpected(&unexp)))
    }

    fn invalid_value(unexp: de::Unexpected, exp: &dyn de::Expected) -> Self {
        DeError::custom(format_args!(
            "invalid value {}: expected {exp}",
            unexpected(&unexp)
        ))
    }

    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        let error = DeError::custom(format_args!("unknown value `{variant}`"));
        let mut help = format!("expected {}", one_of(expected));
        if let Some(near) = closest(variant, expected.iter().copied()) {
            help = format!("did you mean `{near}`? {help}");
        }
        error.with_help(help)
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        unknown_field(field, expected)
    }

    fn missing_field(field: &'static str) -> Self {
        DeError::custom(format_args!("missing field `{field}`"))
            .with_help(format!("add `{field}:` to this mapping"))
    }

    fn duplicate_field(field: &'static str) -> Self {
        DeError::custom(format_args!("duplicate key `{field}`"))
    }
}

fn unknown_field(field: &str, expected: &[&str]) -> DeError {
    let error = DeError::custom(format_args!("unknown field `{field}`"));
    let mut help = format!("valid fields here are {}", one_of(expected));
    if let Some(near) = closest(field, expected.iter().copied()) {
        help = format!("did you mean `{near}`? {help}");
    }
    error.with_help(help)
}

fn unexpected(unexp: &de::Unexpected) -> String {
    match unexp {
        de::Unexpected::Unsigned(n) => format!("integer `{n}`"),
        de::Unexpected::Signed(n) => format!("integer `{n}`"),
        de::Unexpected::Float(n) => format!("number `{n}`"),
        de::Unexpected::Str(s) => format!("string \"{s}\""),
        de::Unexpected::Bool(b) => format!("boolean `{b}`"),
        de::Unexpected::Unit => "nothing (null)".to_string(),
        de::Unexpected::Seq => "a list".to_string(),
        de::Unexpected::Map => "a mapping".to_string(),
        other => other.to_string(),
    }
}

/// Collects errors that do not stop deserialization (unknown fields).
#[derive(Debug, Default)]
pub struct Sink(RefCell<Vec<DeError>>);

impl Sink {
    fn push(&self, error: DeError) {
        self.0.borrow_mut().push(error);
    }

    /// Takes the collected errors.
    pub fn take(&self) -> Vec<DeError> {
        std::mem::take(&mut self.0.borrow_mut())
    }
}

/// Deserializes `T` from `node`, returning the first hard error and collecting
/// soft ones (unknown fields) into `sink`.
pub fn from_node<T: de::DeserializeOwned>(node: &Node, sink: &Sink) -> Result<T, DeError> {
    T::deserialize(NodeDeserializer { node, sink })
}

/// A deserializer reading one node of the tree.
#[derive(Clone, Copy)]
struct NodeDeserializer<'a> {
    node: &'a Node,
    sink: &'a Sink,
}

impl<'a> NodeDeserializer<'a> {
    fn child(&self, node: &'a Node) -> Self {
        NodeDeserializer {
            node,
            sink: self.sink,
        }
    }

    fn locate<T>(&self, result: Result<T, DeError>) -> Result<T, DeError> {
        result.map_err(|e| e.at(self.node.span))
    }

    fn type_error(&self, expected: &str) -> DeError {
        let found = self.node.value.describe();
        let error = DeError::custom(format_args!("expected {expected}, found {found}"));
        let hint = match (&self.node.value, expected) {
            (Value::Int(_) | Value::Float(_) | Value::Bool(_), "a string") => Some(format!(
                "quote the value to make it a string: \"{}\"",
                self.node.value.scalar_text().unwrap_or_default()
            )),
            (Value::Str(s), "an integer") if s.trim().parse::<i128>().is_ok() => {
                Some(format!("remove the quotes: {}", s.trim()))
            }
            _ => None,
        };
        match hint {
            Some(h) => error.with_help(h),
            None => error,
        }
        .at(self.node.span)
    }

    fn integer<T: TryFrom<i128>>(&self, min: i128, max: i128) -> Result<T, DeError> {
        match &self.node.value {
            Value::Int(i) => T::try_from(*i).map_err(|_| {
                DeError::custom(format_args!("{i} is out of range"))
                    .with_help(format!("expected a whole number from {min} to {max}"))
                    .at(self.node.span)
            }),
            _ => Err(self.type_error("an integer")),
        }
    }
}

macro_rules! integer_methods {
    ($($method:ident => $visit:ident: $ty:ty,)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
            let value: $ty = self.integer(<$ty>::MIN.into(), <$ty>::MAX.into())?;
            self.locate(visitor.$visit(value))
        }
    )*};
}

impl<'de> de::Deserializer<'de> for NodeDeserializer<'_> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let result = match &self.node.value {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::Int(i) => match i64::try_from(*i) {
                Ok(v) => visitor.visit_i64(v),
                Err(_) => visitor.visit_i128(*i),
            },
            Value::Float(f) => visitor.visit_f64(*f),
            Value::Str(s) => visitor.visit_str(s),
            Value::Seq(items) => visitor.visit_seq(SeqAccess {
                items: items.iter(),
                parent: self,
            }),
            Value::Map(entries) => visitor.visit_map(MapAccess {
                entries: entries.iter().enumerate(),
                all: entries,
                value: None,
                known: None,
                parent: self,
            }),
        };
        self.locate(result)
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.node.value {
            Value::Bool(b) => self.locate(visitor.visit_bool(b)),
            _ => Err(self.type_error("`true` or `false`")),
        }
    }

    integer_methods! {
        deserialize_i8 => visit_i8: i8,
        deserialize_i16 => visit_i16: i16,
        deserialize_i32 => visit_i32: i32,
        deserialize_i64 => visit_i64: i64,
        deserialize_u8 => visit_u8: u8,
        deserialize_u16 => visit_u16: u16,
        deserialize_u32 => visit_u32: u32,
        deserialize_u64 => visit_u64: u64,
    }

    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_f64(visitor)
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let value = match self.node.value {
            Value::Float(f) => f,
            // Integers widen to floats; precision loss past 2^53 is acceptable here.
            Value::Int(i) => i as f64,
            _ => return Err(self.type_error("a number")),
        };
        self.locate(visitor.visit_f64(value))
    }

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match &self.node.value {
            Value::Str(s) => self.locate(visitor.visit_str(s)),
            _ => Err(self.type_error("a string")),
        }
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.node.value {
            Value::Null => self.locate(visitor.visit_none()),
            _ => self.locate(visitor.visit_some(self)),
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.node.value {
            Value::Null => self.locate(visitor.visit_unit()),
            _ => Err(self.type_error("nothing (null)")),
        }
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        if name == LOCATED_MARKER {
            let span = self.node.span;
            let parts = [span.line, span.column, span.len];
            let access = LocatedAccess {
                span: Some(parts),
                value: Some(self),
            };
            return self.locate(visitor.visit_seq(access));
        }
        self.locate(visitor.visit_newtype_struct(self))
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match &self.node.value {
            Value::Seq(items) => self.locate(visitor.visit_seq(SeqAccess {
                items: items.iter(),
                parent: self,
            })),
            _ => Err(self.type_error("a list")),
        }
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match &self.node.value {
            Value::Map(entries) => self.locate(visitor.visit_map(MapAccess {
                entries: entries.iter().enumerate(),
                all: entries,
                value: None,
                known: None,
                parent: self,
            })),
            _ => Err(self.type_error("a mapping")),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        match &self.node.value {
            Value::Map(entries) => self.locate(visitor.visit_map(MapAccess {
                entries: entries.iter().enumerate(),
                all: entries,
                value: None,
                known: Some(fields),
                parent: self,
            })),
            _ => Err(self.type_error("a mapping")),
        }
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        match &self.node.value {
            Value::Str(s) => {
                let access: StrDeserializer<'_, DeError> = s.as_str().into_deserializer();
                self.locate(visitor.visit_enum(access))
            }
            _ => Err(self.type_error(&format!("one of {}", one_of(variants)))),
        }
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_unit()
    }
}

struct SeqAccess<'a> {
    items: std::slice::Iter<'a, Node>,
    parent: NodeDeserializer<'a>,
}

impl<'de> de::SeqAccess<'de> for SeqAccess<'_> {
    type Error = DeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DeError> {
        match self.items.next() {
            Some(item) => seed.deserialize(self.parent.child(item)).map(Some),
            None => Ok(None),
        }
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len())
    }
}

struct MapAccess<'a> {
    entries: std::iter::Enumerate<std::slice::Iter<'a, (Node, Node)>>,
    all: &'a [(Node, Node)],
    value: Option<&'a Node>,
    /// The fields of the struct being read; other keys are reported and skipped.
    known: Option<&'static [&'static str]>,
    parent: NodeDeserializer<'a>,
}

impl<'de> de::MapAccess<'de> for MapAccess<'_> {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        for (index, (key, value)) in self.entries.by_ref() {
            if self.all[..index].iter().any(|(k, _)| k.value == key.value) {
                continue; // a repeated key, reported with the tree; the first one counts
            }
            if let Some(known) = self.known {
                let name = key.value.scalar_text().unwrap_or_default();
                if !known.contains(&name.as_str()) {
                    self.parent
                        .sink
                        .push(unknown_field(&name, known).at(key.span));
                    continue;
                }
            }
            self.value = Some(value);
            let key_deserializer = self.parent.child(key);
            return key_deserializer
                .locate(seed.deserialize(key_deserializer))
                .map(Some);
        }
        Ok(None)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        let value = self
            .value
            .take()
            .ok_or_else(|| DeError::custom("value requested before key"))?;
        seed.deserialize(self.parent.child(value))
    }
}

/// Hands a [`Located`](super::located::Located) visitor its span, then its value.
struct LocatedAccess<'a> {
    span: Option<[u32; 3]>,
    value: Option<NodeDeserializer<'a>>,
}

impl<'de> de::SeqAccess<'de> for LocatedAccess<'_> {
    type Error = DeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DeError> {
        if let Some(parts) = self.span.take() {
            let span: SeqDeserializer<_, DeError> = SeqDeserializer::new(parts.into_iter());
            return seed.deserialize(span).map(Some);
        }
        match self.value.take() {
            Some(value) => seed.deserialize(value).map(Some),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::tree::parse;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        #[allow(dead_code)]
        name: String,
        #[allow(dead_code)]
        port: u16,
    }

    fn load(text: &str) -> (Result<Sample, DeError>, Vec<DeError>) {
        let tree = parse(text).expect("valid yaml");
        let sink = Sink::default();
        let result = from_node::<Sample>(&tree, &sink);
        (result, sink.take())
    }

    #[test]
    fn type_errors_point_at_the_value() {
        let (result, _) = load("name: web\nport: http\n");
        let error = result.expect_err("port is not a number");
        assert_eq!(error.message, "expected an integer, found string \"http\"");
        assert_eq!(error.span.map(|s| (s.line, s.column)), Some((2, 7)));
    }

    #[test]
    fn out_of_range_integers_are_reported() {
        let (result, _) = load("name: web\nport: 70000\n");
        let error = result.expect_err("port out of range");
        assert!(error.message.contains("out of range"), "{}", error.message);
    }

    #[test]
    fn all_unknown_fields_are_collected_with_suggestions() {
        let (result, soft) = load("name: web\nprot: 1\nport: 80\nnmae: x\n");
        assert!(result.is_ok());
        assert_eq!(soft.len(), 2);
        assert_eq!(soft[0].message, "unknown field `prot`");
        assert!(
            soft[0]
                .help
                .as_deref()
                .unwrap_or("")
                .starts_with("did you mean `port`?")
        );
        assert_eq!(soft[1].span.map(|s| s.line), Some(4));
    }

    #[test]
    fn missing_fields_point_at_the_mapping() {
        let (result, _) = load("name: web\n");
        let error = result.expect_err("port missing");
        assert_eq!(error.message, "missing field `port`");
        assert_eq!(error.span.map(|s| s.line), Some(1));
    }
}
