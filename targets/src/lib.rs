//! ublk-fast targets, one module each.

pub mod fault;
pub mod loop_meta;
pub mod loop_target;
pub mod nbd;
pub mod null;
pub mod stripe;

pub use fault::{FaultSpec, FaultTarget};
pub use loop_meta::MetaSpec;
pub use loop_target::{LoopOptions, LoopTarget};
pub use nbd::{NbdOptions, NbdTarget};
pub use null::NullTarget;
pub use stripe::StripeTarget;
