//! The JSON Schema of the spec (draft-07, for yaml-language-server and editors).

use schemars::generate::SchemaSettings;

use crate::spec::Spec;

/// The JSON Schema of the spec as pretty-printed JSON, ending in a newline.
pub fn spec_schema_json() -> Result<String, serde_json::Error> {
    let generator = SchemaSettings::draft07().for_deserialize().into_generator();
    let schema = generator.into_root_schema_for::<Spec>();
    let mut text = serde_json::to_string_pretty(&schema)?;
    text.push('\n');
    Ok(text)
}
