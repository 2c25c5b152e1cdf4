//! Placeholder text rendering until the nft backend lands (replaced at merge).

use crate::observe::NftTable;

/// Renders a table as text.
pub fn render_table(table: &NftTable) -> String {
    serde_json::to_string_pretty(table).unwrap_or_default()
}
