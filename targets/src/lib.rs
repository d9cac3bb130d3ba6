//! ublk-fast targets, one module each.

pub mod null;

pub use null::NullTarget;
