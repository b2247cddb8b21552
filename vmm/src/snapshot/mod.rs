//! Snapshots: the [`persist::Persist`] trait every stateful component implements, the
//! snapshot file format, and the aggregate state of a whole VM.

pub mod persist;

pub use persist::Persist;
