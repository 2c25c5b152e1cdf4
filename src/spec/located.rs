//! [`Located`]: a spec value together with where it was written, so semantic
//! checks can point at the exact text.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;
use std::ops::Deref;

use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::diagnostic::Span;

/// The newtype name through which the spec deserializer hands a [`Located`] its span.
pub(crate) const LOCATED_MARKER: &str = "__lessnat_located";

/// A value and the place in the spec file it was read from. Comparisons and
/// serialisation look at the value only.
#[derive(Clone)]
pub struct Located<T> {
    /// The value.
    pub value: T,
    /// Where it was written; unknown (line 0) for values not read from a file.
    pub span: Span,
}

impl<T> Located<T> {
    /// A value that was not read from a file.
    pub fn new(value: T) -> Self {
        Located {
            value,
            span: Span::default(),
        }
    }
}

impl<T: Default> Default for Located<T> {
    /// The default value, not read from a file.
    fn default() -> Self {
        Located::new(T::default())
    }
}

impl<T> From<T> for Located<T> {
    fn from(value: T) -> Self {
        Located::new(value)
    }
}

impl<T> Deref for Located<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T: fmt::Debug> fmt::Debug for Located<T> {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        self.value.fmt(f)
    }
}

impl<T: fmt::Display> fmt::Display for Located<T> {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        self.value.fmt(f)
    }
}

impl<T: PartialEq> PartialEq for Located<T> {
    fn eq(&self, other: &Self) -> bool {
        self.value == other.value
    }
}

impl<T: Eq> Eq for Located<T> {}

impl<T: PartialOrd> PartialOrd for Located<T> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        self.value.partial_cmp(&other.value)
    }
}

impl<T: Ord> Ord for Located<T> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.value.cmp(&other.value)
    }
}

impl<T: std::hash::Hash> std::hash::Hash for Located<T> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.value.hash(state)
    }
}

impl<T: Serialize> Serialize for Located<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.value.serialize(serializer)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Located<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_newtype_struct(LOCATED_MARKER, LocatedVisitor(PhantomData))
    }
}

struct LocatedVisitor<T>(PhantomData<T>);

impl<'de, T: Deserialize<'de>> Visitor<'de> for LocatedVisitor<T> {
    type Value = Located<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a value")
    }

    /// The spec deserializer sends `[line, column, len]` and then the value.
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Located<T>, A::Error> {
        let [line, column, len]: [u32; 3] = seq
            .next_element()?
            .ok_or_else(|| de::Error::custom("missing span"))?;
        let value = seq
            .next_element()?
            .ok_or_else(|| de::Error::custom("missing value"))?;
        Ok(Located {
            value,
            span: Span::new(line, column, len),
        })
    }

    /// Any other deserializer (JSON, say) just passes the value.
    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Located<T>, D::Error> {
        T::deserialize(d).map(Located::new)
    }
}

impl<T: JsonSchema> JsonSchema for Located<T> {
    fn inline_schema() -> bool {
        T::inline_schema()
    }

    fn schema_name() -> Cow<'static, str> {
        T::schema_name()
    }

    fn schema_id() -> Cow<'static, str> {
        T::schema_id()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        T::json_schema(generator)
    }
}
