//! Observation: reads what lessnat owns on a live host into the
//! [`Observed`](crate::model::Observed) snapshot, through the backends,
//! inside the `--netns` namespace.

pub mod drains;
pub mod images;
pub mod live;
pub mod probe;
pub mod show;
