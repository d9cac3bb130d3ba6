//! What a target (null, loop, ...) gives the engine: its device parameters, its backing files,
//! and a per-queue handler that serves requests on the queue's own ring.

use std::os::fd::RawFd;

use io_uring::{squeue, types};

use crate::error::Result;
use crate::stats::QueueStats;
use crate::uapi::ublksrv_io_desc;

/// Block-device parameters a target asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetParams {
    pub size_bytes: u64,
    pub logical_block: u32,
    pub physical_block: u32,
    /// `UBLK_ATTR_*`.
    pub attrs: u32,
    /// Discard / write-zeroes limits; `None` turns both off.
    pub discard: Option<DiscardLimits>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiscardLimits {
    pub granularity: u32,
    pub max_discard_sectors: u32,
    pub max_write_zeroes_sectors: u32,
}

/// The outcome of serving a request so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// Finished: commit this result (bytes done, or `-errno`).
    Done(i32),
    /// Backend operations are in flight; the target hears of each completion.
    Pending,
    /// The handler keeps the request with no operation of its own in flight (it waits on a
    /// queue-level one, e.g. a reply on a socket) and ends it later with [`Submit::finish`].
    Held,
}

/// One request as the queue handler sees it.
#[derive(Clone, Copy, Debug)]
pub struct Request {
    pub tag: u16,
    pub desc: ublksrv_io_desc,
    /// The tag's I/O buffer (copy mode): the kernel copies write data into it before delivering
    /// the request and copies read data out of it after the commit.
    pub buf: *mut u8,
    pub buf_len: usize,
    /// Zero copy: the request's own pages are the ring's fixed buffer at this index, addressed
    /// from 0; backend I/O must use READ_FIXED/WRITE_FIXED on it, and `buf` is not used.
    pub buf_index: Option<u16>,
    /// Copy mode: `buf` is registered as the ring's fixed buffer at this index, so backend I/O
    /// can use READ_FIXED/WRITE_FIXED with `buf` as the address (no page pinning per I/O).
    pub buf_reg: Option<u16>,
    /// Fixed-file index of the target's first file ([`Target::files`]) on this queue's ring;
    /// the others follow it. Several queues share a ring, each with its own range.
    pub first_file: u32,
}

impl Request {
    pub fn bytes(&self) -> usize {
        self.desc.nr_sectors as usize * 512
    }
    pub fn offset(&self) -> u64 {
        self.desc.start_sector * 512
    }

    /// The target's file `i` (in [`Target::files`] order) as the ring's fixed file.
    pub fn file(&self, i: u32) -> types::Fixed {
        types::Fixed(self.first_file + i)
    }
}

/// Sub-op bytes from this value up belong to a target that wraps another (`fault`): the inner
/// target's own sub-ops stay below it, so the wrapper can tell its completions from the
/// inner target's.
pub const WRAPPER_SUB_OPS: u8 = 0x80;

/// How a handler queues SQEs on its ring: the engine stamps `user_data` (tag, sub-op,
/// generation) and counts them in flight.
pub trait Submit {
    /// Queues `sqe` for `req`; `sub` is a byte the target gets back with the completion
    /// (below [`WRAPPER_SUB_OPS`] unless the target wraps another).
    ///
    /// # Safety
    /// Every buffer `sqe` points at must stay valid until its completion is delivered to
    /// [`QueueHandler::complete`]. The tag's own buffer (`Request::buf`) does.
    unsafe fn push(&mut self, req: &Request, sub: u8, sqe: squeue::Entry);
    /// The queue's counters, for the target's backend operations.
    fn stats(&self) -> &QueueStats;
    /// Queues `sqe` for the queue as a whole, not one request (a socket's receive, a timer):
    /// its completion goes to [`QueueHandler::complete_queue`] with `token` and `sub`.
    ///
    /// # Safety
    /// Every buffer `sqe` points at must stay valid until that completion; the handler's own
    /// (boxed, so unmoving) fields and the tags' buffers do.
    unsafe fn push_queue(&mut self, token: u16, sub: u8, sqe: squeue::Entry);
    /// The `user_data` of the handler's queue-level operation (`token`, `sub`), to cancel it
    /// (ASYNC_CANCEL, TIMEOUT_REMOVE pushed with [`Submit::push_queue`]).
    fn queue_user_data(&self, token: u16, sub: u8) -> u64;
    /// Ends a request the handler holds ([`Flow::Held`]) with `res` (bytes done or `-errno`).
    /// A tag that is not held is ignored and counted as unexpected.
    fn finish(&mut self, tag: u16, res: i32);
    /// The core's clock for this loop turn (ns, CLOCK_MONOTONIC).
    fn now_ns(&self) -> u64;
    /// The `user_data` of the request's current backend operation `sub` (pushed with
    /// [`Submit::push`]), to cancel it.
    fn request_user_data(&self, req: &Request, sub: u8) -> u64;
}

/// Serves one queue's requests. Lives on (and only on) that queue's thread.
pub trait QueueHandler {
    fn start(&mut self, req: &Request, io: &mut dyn Submit) -> Flow;
    /// One of the SQEs this handler pushed for `req` completed with `res`.
    fn complete(&mut self, req: &Request, sub: u8, res: i32, io: &mut dyn Submit) -> Flow;
    /// The queue was handed to the driver: queue-level operations may start.
    fn begin(&mut self, io: &mut dyn Submit) {
        let _ = io;
    }
    /// One of the SQEs pushed with [`Submit::push_queue`] completed (`flags`: the CQE's).
    fn complete_queue(&mut self, token: u16, sub: u8, res: i32, flags: u32, io: &mut dyn Submit) {
        let _ = (token, sub, res, flags, io);
    }
    /// The queue is ending (a stop was asked for, or the driver aborted every tag): every
    /// queue-level operation must complete soon (shut its socket down, cancel its timer).
    /// Requests still held are given up: the driver requeues or fails them once the queue's
    /// ring is gone. Called once.
    fn end(&mut self, io: &mut dyn Submit) {
        let _ = io;
    }
    /// The device's I/O did not drain in time (the service is ending): cancel the backend
    /// operations in flight so their requests complete (with an error) instead of holding the
    /// device. Cancellations go through [`Submit::push_queue`]; their completions come to
    /// `complete_queue`. Operations that cannot be cancelled finish in their own time.
    fn cancel(&mut self, io: &mut dyn Submit) {
        let _ = io;
    }
}

pub trait Target: Send + Sync {
    /// `null`, `loop`, ...
    fn name(&self) -> &'static str;
    /// The target's arguments, for `list`.
    fn args(&self) -> Vec<String>;
    fn params(&self) -> TargetParams;
    /// The backing store's path, if the target has one (for labels and `list`).
    fn backing(&self) -> Option<String> {
        None
    }
    /// Whether the queue handler can serve a request whose data is the ring's fixed buffer
    /// `Request::buf_index` (zero copy) instead of `Request::buf`.
    fn supports_zero_copy(&self) -> bool {
        false
    }
    /// Backing files, registered on each queue's ring right after its `/dev/ublkcN`
    /// (`Request::file`).
    fn files(&self) -> Vec<RawFd> {
        Vec::new()
    }
    /// The most queues the target can serve (e.g. one per connection its server allows).
    fn max_queues(&self) -> u16 {
        u16::MAX
    }
    /// The largest request the backend takes, if it has a limit.
    fn max_io_bytes(&self) -> Option<u32> {
        None
    }
    fn queue_handler(&self, q: u16, depth: u16) -> Result<Box<dyn QueueHandler>>;
    /// Whether the device may become `bytes` long (`resize`); the error says why not.
    fn check_resize(&self, bytes: u64) -> Result<()> {
        let _ = bytes;
        Ok(())
    }
}
