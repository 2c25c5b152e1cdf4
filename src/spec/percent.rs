//! Percentages for the spec: `5%`, a whole number from 1 to 99.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A share of new connections, written `5%`: a whole number from 1 to 99
/// (0 would send nothing, 100 everything; neither is a canary).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Percent(u8);

/// Why a percentage did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid share \"{text}\": {reason}")]
pub struct PercentError {
    text: String,
    reason: &'static str,
}

impl Percent {
    /// The number before the `%`.
    pub fn get(self) -> u8 {
        self.0
    }
}

impl FromStr for Percent {
    type Err = PercentError;

    fn from_str(text: &str) -> Result<Self, PercentError> {
        let error = |reason| PercentError {
            text: text.to_string(),
            reason,
        };
        let number = text
            .strip_suffix('%')
            .ok_or_else(|| error("it must end with `%`"))?;
        if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
            return Err(error("it must be a whole number followed by `%`"));
        }
        match number.parse::<u8>() {
            Ok(n @ 1..=99) => Ok(Percent(n)),
            _ => Err(error("it must be from 1% to 99%")),
        }
    }
}

impl fmt::Display for Percent {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}%", self.0)
    }
}

impl Serialize for Percent {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(|e: PercentError| {
            serde::de::Error::custom(format_args!(
                "{}; write a share like `5%`",
                crate::error::chain(&e)
            ))
        })
    }
}

impl JsonSchema for Percent {
    fn schema_name() -> Cow<'static, str> {
        "Percent".into()
    }

    /// Inlined at each field, as durations are, so the field's description shows.
    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": "^[1-9][0-9]?%$",
            "description": "A share from 1% to 99%, e.g. `5%`.",
            "examples": ["5%", "10%"]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_whole_shares_from_1_to_99() {
        for (text, n) in [("1%", 1), ("5%", 5), ("99%", 99)] {
            let parsed: Percent = text.parse().expect(text);
            assert_eq!(parsed.get(), n);
            assert_eq!(parsed.to_string(), text);
        }
    }

    #[test]
    fn rejects_other_text() {
        for text in [
            "", "5", "%", "0%", "100%", "5.5%", "-5%", " 5%", "5 %", "300%",
        ] {
            assert!(
                text.parse::<Percent>().is_err(),
                "{text:?} should not parse"
            );
        }
    }
}
