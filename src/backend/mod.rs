//! Backends: the only code that reads or changes the host. Each one can work
//! inside a network namespace ([`crate::netns::Netns`]).

pub mod docker;
pub mod nft;
