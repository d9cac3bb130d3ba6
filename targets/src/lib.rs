//! ublk-fast targets, one module each.

pub mod loop_target;
pub mod null;

pub use loop_target::{LoopOptions, LoopTarget};
pub use null::NullTarget;
