//! The load generator, shared with `lessnat demo`: see `lessnat::demo::load`.

pub use lessnat::demo::load::*;
