//! The ublk-fast engine: ublk UAPI bindings, the control plane, and the per-queue io_uring
//! engine that serves requests for a [`target::Target`].

pub mod alloc;
pub mod batch;
pub mod buf;
pub mod core;
pub mod cpus;
pub mod ctrl;
pub mod desc;
pub mod device;
pub mod error;
pub mod limits;
pub mod mode;
pub mod op;
pub mod queue;
pub mod ratelimit;
pub mod ring;
pub mod stats;
pub mod tag;
pub mod target;
pub mod uapi;

pub use error::{Error, Result};
