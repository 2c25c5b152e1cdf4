//! Human-readable durations for the spec: `500ms`, `10s`, `5m`, `1h`, `1m30s`.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration written as numbers with units `ms`, `s`, `m` or `h`, e.g. `1m30s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HumanDuration(pub Duration);

/// Why a duration did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration \"{text}\": {reason}")]
pub struct DurationError {
    text: String,
    reason: &'static str,
}

impl HumanDuration {
    /// `n` seconds.
    pub const fn secs(n: u64) -> Self {
        HumanDuration(Duration::from_secs(n))
    }

    /// The wrapped [`Duration`].
    pub fn get(self) -> Duration {
        self.0
    }
}

impl FromStr for HumanDuration {
    type Err = DurationError;

    fn from_str(text: &str) -> Result<Self, DurationError> {
        let error = |reason| DurationError {
            text: text.to_string(),
            reason,
        };
        if text.is_empty() {
            return Err(error("it is empty"));
        }
        let mut total = Duration::ZERO;
        let mut rest = text;
        while !rest.is_empty() {
            let digits = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            if digits == 0 {
                return Err(error("each part must start with a number"));
            }
            let number: u64 = rest[..digits]
                .parse()
                .map_err(|_| error("number too large"))?;
            rest = &rest[digits..];
            let unit_len = rest
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(rest.len());
            let part = match &rest[..unit_len] {
                "ms" => Duration::from_millis(number),
                "s" => Duration::from_secs(number),
                "m" => Duration::from_secs(number.saturating_mul(60)),
                "h" => Duration::from_secs(number.saturating_mul(3600)),
                "" => return Err(error("a unit is missing (ms, s, m or h)")),
                _ => return Err(error("units are ms, s, m or h")),
            };
            rest = &rest[unit_len..];
            total = total.checked_add(part).ok_or_else(|| error("too long"))?;
        }
        Ok(HumanDuration(total))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let millis = self.0.as_millis();
        if millis == 0 {
            return f.write_str("0s");
        }
        let (h, rest) = (millis / 3_600_000, millis % 3_600_000);
        let (m, rest) = (rest / 60_000, rest % 60_000);
        let (s, ms) = (rest / 1000, rest % 1000);
        for (n, unit) in [(h, "h"), (m, "m"), (s, "s"), (ms, "ms")] {
            if n > 0 {
                write!(f, "{n}{unit}")?;
            }
        }
        Ok(())
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(|e: DurationError| {
            serde::de::Error::custom(format_args!(
                "{}; write a duration like `500ms`, `10s`, `5m` or `1m30s`",
                crate::error::chain(&e)
            ))
        })
    }
}

impl JsonSchema for HumanDuration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    /// Inlined at each field, so the field's own description is the one
    /// editors show on hover (yaml-language-server shows a `$ref`'s
    /// description instead of its sibling's).
    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": "^([0-9]+(ms|s|m|h))+$",
            "description": "A duration: numbers with units ms, s, m or h, e.g. `500ms`, `10s`, `5m`, `1m30s`.",
            "examples": ["500ms", "10s", "5m"]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_compounds() {
        let cases = [
            ("500ms", 500),
            ("1s", 1000),
            ("5m", 300_000),
            ("1h", 3_600_000),
            ("1m30s", 90_000),
            ("0s", 0),
        ];
        for (text, millis) in cases {
            let parsed: HumanDuration = text.parse().expect(text);
            assert_eq!(parsed.0.as_millis(), millis, "{text}");
        }
    }

    #[test]
    fn rejects_malformed_text() {
        for text in ["", "5", "ms", "5 s", "5sec", "1.5s", "-1s", "s5"] {
            assert!(
                text.parse::<HumanDuration>().is_err(),
                "{text:?} should not parse"
            );
        }
    }

    #[test]
    fn display_round_trips() {
        for text in ["500ms", "1s", "5m", "1h", "1m30s", "1h2m3s4ms"] {
            let parsed: HumanDuration = text.parse().expect(text);
            assert_eq!(parsed.to_string(), text);
        }
    }
}
