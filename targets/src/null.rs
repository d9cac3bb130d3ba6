//! `null`: completes every request at once; reads return zeros, writes are dropped.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{opcode, types};
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

const ZERO: types::Fixed = types::Fixed(1);

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

    fn supports_zero_copy(&self) -> bool {
        true
    }

    fn queue_handler(&self, _q: u16, depth: u16) -> Result<Box<dyn QueueHandler>> {
        Ok(Box::new(NullQueue { dirty: vec![0; usize::from(depth)] }))
    }
}

/// Copy mode: how many leading bytes of each tag's buffer a write dirtied since they were last
/// zeroed, so a read zeroes only those (not the whole 512 KiB buffer).
struct NullQueue {
    dirty: Vec<usize>,
}

impl QueueHandler for NullQueue {
    fn start(&mut self, req: &Request, io: &mut dyn Submit) -> Flow {
        let tag = usize::from(req.tag);
        let len = req.bytes();
        match req.desc.op() {
            UBLK_IO_OP_READ if req.buf_index.is_some() => {
                // Zero copy: the reader's pages are the fixed buffer; zero them in the kernel.
                let idx = req.buf_index.unwrap_or_default();
                let sqe =
                    opcode::ReadFixed::new(ZERO, std::ptr::null_mut(), len as u32, idx).build();
                // SAFETY: the fixed buffer is the request's pages, registered by the driver
                // until we commit; the read covers exactly the request.
                unsafe { io.push(req, 0, sqe) };
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

    fn complete(&mut self, req: &Request, _sub: u8, res: i32, _io: &mut dyn Submit) -> Flow {
        // Only the zero-copy read from /dev/zero gets here; /dev/zero never reads short.
        if res < 0 {
            return Flow::Done(res);
        }
        if res as usize != req.bytes() {
            return Flow::Done(-libc::EIO);
        }
        Flow::Done(res)
    }
}
