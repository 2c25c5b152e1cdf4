//! nftables: lessnat's own table, built as a value ([`ruleset`]), read from and
//! written to the host through `nft -j`.

pub mod ruleset;
pub mod text;
