//! `fault`: another target (null or loop) with injected faults, to exercise the error paths of
//! everything above the device: every Nth request of a chosen op is delayed, failed, or both.
//!
//! Counting is per queue (each queue thread owns its counter, no shared state), so with one
//! queue "every Nth" is exact.

use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Duration;

use io_uring::{opcode, types};
use ublk_fast_engine::target::{
    Flow, QueueHandler, Request, Submit, Target, TargetParams, WRAPPER_SUB_OPS,
};
use ublk_fast_engine::uapi::*;
use ublk_fast_engine::Result;

/// The sub-op of the delay timer: a wrapper's, above every inner target's sub-op.
const DELAY: u8 = WRAPPER_SUB_OPS;

/// What to inject.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultSpec {
    /// `UBLK_IO_OP_*` to pick requests from; `None` picks from all.
    pub op: Option<u8>,
    /// Every Nth matching request (1: all of them).
    pub every: u64,
    /// Fail the picked request with this errno.
    pub errno: Option<i32>,
    /// Hold the picked request this long before serving (or failing) it.
    pub delay: Duration,
}

impl FaultSpec {
    fn matches(&self, op: u8) -> bool {
        self.op.is_none_or(|o| o == op)
    }
}

pub struct FaultTarget {
    inner: Arc<dyn Target>,
    spec: FaultSpec,
}

impl FaultTarget {
    pub fn new(inner: Arc<dyn Target>, spec: FaultSpec) -> Self {
        assert!(spec.every > 0, "every must be at least 1");
        FaultTarget { inner, spec }
    }
}

/// The name `--op` takes for a `UBLK_IO_OP_*`.
pub fn op_name(op: u8) -> &'static str {
    match op {
        UBLK_IO_OP_READ => "read",
        UBLK_IO_OP_WRITE => "write",
        UBLK_IO_OP_FLUSH => "flush",
        UBLK_IO_OP_DISCARD => "discard",
        UBLK_IO_OP_WRITE_ZEROES => "write-zeroes",
        _ => "other",
    }
}

impl Target for FaultTarget {
    fn name(&self) -> &'static str {
        "fault"
    }

    fn args(&self) -> Vec<String> {
        let s = &self.spec;
        let mut a =
            vec![format!("--op={}", s.op.map_or("any", op_name)), format!("--every={}", s.every)];
        if let Some(e) = s.errno {
            a.push(match e {
                libc::EIO => "--fail=eio".to_string(),
                libc::ENOSPC => "--fail=enospc".to_string(),
                libc::ETIMEDOUT => "--fail=etimedout".to_string(),
                libc::ENODATA => "--fail=enodata".to_string(),
                e => format!("--fail=errno{e}"),
            });
        }
        if !s.delay.is_zero() {
            a.push(format!("--delay-ms={}", s.delay.as_millis()));
        }
        a.push(self.inner.name().to_string());
        a.extend(self.inner.args());
        a
    }

    fn params(&self) -> TargetParams {
        self.inner.params()
    }

    fn backing(&self) -> Option<String> {
        self.inner.backing()
    }

    fn supports_zero_copy(&self) -> bool {
        self.inner.supports_zero_copy()
    }

    fn files(&self) -> Vec<RawFd> {
        self.inner.files()
    }

    fn check_resize(&self, bytes: u64) -> Result<()> {
        self.inner.check_resize(bytes)
    }

    fn queue_handler(&self, q: u16, depth: u16) -> Result<Box<dyn QueueHandler>> {
        Ok(Box::new(FaultQueue {
            inner: self.inner.queue_handler(q, depth)?,
            spec: self.spec.clone(),
            seen: 0,
            delay: Box::new(types::Timespec::from(self.spec.delay)),
            delayed: vec![None; usize::from(depth)],
        }))
    }
}

struct FaultQueue {
    inner: Box<dyn QueueHandler>,
    spec: FaultSpec,
    /// Matching requests seen on this queue.
    seen: u64,
    /// The timer's timespec, at a stable address (the kernel reads it when the SQE is issued).
    delay: Box<types::Timespec>,
    /// The requests being delayed (to cancel their timers when the device must drain).
    delayed: Vec<Option<Request>>,
}

impl FaultQueue {
    /// Counts a request of `op`: whether it is one to inject into.
    fn picks(&mut self, op: u8) -> bool {
        if !self.spec.matches(op) {
            return false;
        }
        self.seen += 1;
        self.seen.is_multiple_of(self.spec.every)
    }
}

impl QueueHandler for FaultQueue {
    fn start(&mut self, req: &Request, io: &mut dyn Submit) -> Flow {
        if !self.picks(req.desc.op()) {
            return self.inner.start(req, io);
        }
        if !self.spec.delay.is_zero() {
            let sqe = opcode::Timeout::new(&*self.delay as *const types::Timespec).build();
            // SAFETY: the timespec is owned by this handler, which its core drops only after
            // its ring, and is never moved (boxed).
            unsafe { io.push(req, DELAY, sqe) };
            if let Some(d) = self.delayed.get_mut(usize::from(req.tag)) {
                *d = Some(*req);
            }
            return Flow::Pending;
        }
        match self.spec.errno {
            Some(e) => Flow::Done(-e),
            None => self.inner.start(req, io),
        }
    }

    fn complete(&mut self, req: &Request, sub: u8, res: i32, io: &mut dyn Submit) -> Flow {
        if sub < WRAPPER_SUB_OPS {
            return self.inner.complete(req, sub, res, io);
        }
        debug_assert_eq!(sub, DELAY);
        if let Some(d) = self.delayed.get_mut(usize::from(req.tag)) {
            *d = None;
        }
        // The timer expired (-ETIME) or was cancelled at shutdown: either way, go on.
        match self.spec.errno {
            Some(e) => Flow::Done(-e),
            None => self.inner.start(req, io),
        }
    }

    fn begin(&mut self, io: &mut dyn Submit) {
        self.inner.begin(io);
    }

    fn complete_queue(&mut self, token: u16, sub: u8, res: i32, flags: u32, io: &mut dyn Submit) {
        // Our own (timer removals) are at WRAPPER_SUB_OPS and above: nothing to do.
        if sub < WRAPPER_SUB_OPS {
            self.inner.complete_queue(token, sub, res, flags, io);
        }
    }

    /// The delays end now (their requests go on as after the delay), and the inner target
    /// cancels its own operations.
    fn cancel(&mut self, io: &mut dyn Submit) {
        for r in self.delayed.iter().flatten() {
            let ud = io.request_user_data(r, DELAY);
            // SAFETY: a timeout removal references no memory.
            unsafe { io.push_queue(0, WRAPPER_SUB_OPS, opcode::TimeoutRemove::new(ud).build()) };
        }
        self.inner.cancel(io);
    }

    fn end(&mut self, io: &mut dyn Submit) {
        self.inner.end(io);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_every_nth_of_its_op() {
        let s = FaultSpec {
            op: Some(UBLK_IO_OP_WRITE),
            every: 3,
            errno: Some(libc::EIO),
            delay: Duration::ZERO,
        };
        let mut q = FaultQueue {
            inner: Box::new(Nothing),
            spec: s.clone(),
            seen: 0,
            delay: Box::new(types::Timespec::new()),
            delayed: Vec::new(),
        };
        let mut picked = Vec::new();
        for n in 1..=9 {
            assert!(!q.picks(UBLK_IO_OP_READ), "a read counted");
            if q.picks(UBLK_IO_OP_WRITE) {
                picked.push(n);
            }
        }
        assert_eq!(picked, [3, 6, 9]);
        q.spec = FaultSpec { op: None, every: 1, ..s };
        assert!(q.picks(UBLK_IO_OP_FLUSH) && q.picks(UBLK_IO_OP_READ));
    }

    struct Nothing;
    impl QueueHandler for Nothing {
        fn start(&mut self, _: &Request, _: &mut dyn Submit) -> Flow {
            Flow::Done(0)
        }
        fn complete(&mut self, _: &Request, _: u8, _: i32, _: &mut dyn Submit) -> Flow {
            Flow::Done(0)
        }
    }
}
