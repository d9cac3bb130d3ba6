//! `null`: completes every request at once; reads return zeros, writes are dropped.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::opcode;
use ublk_fast_engine::target::{Flow, QueueHandler, Request, Submit, Target, TargetParams};
use ublk_fast_engine::uapi::*;
use ublk_fast_engine::{Error, Result};

pub struct NullTarget {
    size_bytes: u64,
    /// Zero copy fills read requests' own pages from /dev/zero (fixed file 1).
    zero: File,
}

impl NullTarget {
    pub const DEFAULT_SIZE: u64 = 256 << 30;

    pub fn new(size_bytes: u64) -> Result<Self> {
        let zero = File::open("/dev/zero").map_err(|e| Error::os("open /dev/zero", e))?;
        Ok(NullTarget { size_bytes, zero })
    }
}

impl Target for NullTarget {
    fn name(&self) -> &'static str {
        "null"
    }

    fn args(&self) -> Vec<String> {
        vec![format!("--size={}", self.size_bytes)]
    }

    fn params(&self) -> TargetParams {
        TargetParams {
            size_bytes: self.size_bytes,
            logical_block: 512,
            physical_block: 4096,
            attrs: 0,
            discard: Some(ublk_fast_engine::target::DiscardLimits {
                granularity: 4096,
                max_discard_sectors: u32::MAX >> 9,
                max_write_zeroes_sectors: u32::MAX >> 9,
            }),
        }
    }

    fn files(&self) -> Vec<RawFd> {
        vec![self.zero.as_raw_fd()]
    }

    fn spreads_tags(&self) -> bool {
        true
    }
    fn supports_zero_copy(&self) -> bool {
        true
    }

    fn queue_handler(&self, _q: u16, depth: u16) -> Result<Box<dyn QueueHandler>> {
        Ok(Box::new(NullQueue {
            dirty: vec![0; usize::from(depth)],
            zeroed: vec![0; usize::from(depth)],
        }))
    }
}

/// Copy mode: how many leading bytes of each tag's buffer a write dirtied since they were last
/// zeroed, so a read zeroes only those (not the whole 512 KiB buffer).
struct NullQueue {
    dirty: Vec<usize>,
    /// Zero copy: bytes of each tag's read already filled from /dev/zero.
    zeroed: Vec<u32>,
}

impl NullQueue {
    /// Zero copy: fills the rest of the read request's pages (the fixed buffer at `idx`,
    /// addressed from 0) from /dev/zero.
    fn push_zero(&mut self, req: &Request, idx: u16, io: &mut dyn Submit) {
        let done = self.zeroed[usize::from(req.tag)];
        let len = req.bytes() as u32 - done;
        let sqe = opcode::ReadFixed::new(req.file(0), done as usize as *mut u8, len, idx).build();
        // SAFETY: the fixed buffer is the request's pages, registered by the driver until we
        // commit; `done..done+len` lies inside the request.
        unsafe { io.push(req, 0, sqe) };
    }
}

impl QueueHandler for NullQueue {
    fn start(&mut self, req: &Request, io: &mut dyn Submit) -> Flow {
        let tag = usize::from(req.tag);
        let len = req.bytes();
        match req.desc.op() {
            UBLK_IO_OP_READ if req.buf_index.is_some() => {
                // Zero copy: the reader's pages are the fixed buffer; zero them in the kernel.
                self.zeroed[tag] = 0;
                self.push_zero(req, req.buf_index.unwrap_or_default(), io);
                Flow::Pending
            }
            UBLK_IO_OP_READ => {
                if len > req.buf_len {
                    return Flow::Done(-libc::EINVAL);
                }
                let dirty = std::mem::take(&mut self.dirty[tag]);
                if dirty > 0 {
                    // SAFETY: dirty <= buf_len bytes of the tag's buffer, ours while the request
                    // is being served (the kernel copies out of it only after the commit).
                    unsafe { std::ptr::write_bytes(req.buf, 0, dirty) };
                }
                Flow::Done(len as i32)
            }
            UBLK_IO_OP_WRITE => {
                self.dirty[tag] = self.dirty[tag].max(len.min(req.buf_len));
                Flow::Done(len as i32)
            }
            UBLK_IO_OP_FLUSH | UBLK_IO_OP_DISCARD | UBLK_IO_OP_WRITE_ZEROES => Flow::Done(0),
            _ => Flow::Done(-libc::EOPNOTSUPP),
        }
    }

    fn complete(&mut self, req: &Request, _sub: u8, res: i32, io: &mut dyn Submit) -> Flow {
        // Only the zero-copy read from /dev/zero gets here. It can come back short: /dev/zero
        // stops early under a non-blocking read when the task should reschedule (often on an
        // SQPOLL thread), so go on from where it stopped.
        if res <= 0 {
            return Flow::Done(if res == 0 { -libc::EIO } else { res });
        }
        let tag = usize::from(req.tag);
        self.zeroed[tag] += res as u32;
        if (self.zeroed[tag] as usize) < req.bytes() {
            self.push_zero(req, req.buf_index.unwrap_or_default(), io);
            return Flow::Pending;
        }
        Flow::Done(req.bytes() as i32)
    }
}
