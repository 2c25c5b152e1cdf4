//! Backends: the only code that reads or changes the host. Each one can work
//! inside a network namespace ([`crate::netns::Netns`]).

pub mod conntrack;
pub mod conntrack_watch;
pub mod docker;
pub mod etcd;
pub mod netlink;
mod netlink_answer;
pub mod nft;
pub mod sock_diag;
pub mod sysctl;
pub mod veth;
