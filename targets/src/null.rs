//! `null`: completes every request at once; reads return zeros, writes are dropped.

use ublk_fast_engine::target::{Flow, QueueHandler, Request, Submit, Target, TargetParams};
use ublk_fast_engine::uapi::*;
use ublk_fast_engine::Result;

pub struct NullTarget {
    pub size_bytes: u64,
}

impl NullTarget {
    pub const DEFAULT_SIZE: u64 = 256 << 30;
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

    fn queue_handler(&self, _q: u16, depth: u16) -> Result<Box<dyn QueueHandler>> {
        Ok(Box::new(NullQueue { dirty: vec![false; usize::from(depth)] }))
    }
}

/// Tracks which tag buffers hold write data, so reads zero only what a write dirtied.
struct NullQueue {
    dirty: Vec<bool>,
}

impl QueueHandler for NullQueue {
    fn start(&mut self, req: &Request, _io: &mut dyn Submit) -> Flow {
        let tag = usize::from(req.tag);
        let len = req.bytes();
        match req.desc.op() {
            UBLK_IO_OP_READ => {
                if len > req.buf_len {
                    return Flow::Done(-libc::EINVAL);
                }
                if self.dirty[tag] {
                    // SAFETY: the tag's buffer is `buf_len` bytes, ours while the request is
                    // being served (the kernel copies out of it only after the commit).
                    unsafe { std::ptr::write_bytes(req.buf, 0, req.buf_len) };
                    self.dirty[tag] = false;
                }
                Flow::Done(len as i32)
            }
            UBLK_IO_OP_WRITE => {
                self.dirty[tag] = true;
                Flow::Done(len as i32)
            }
            UBLK_IO_OP_FLUSH | UBLK_IO_OP_DISCARD | UBLK_IO_OP_WRITE_ZEROES => Flow::Done(0),
            _ => Flow::Done(-libc::EOPNOTSUPP),
        }
    }

    fn complete(&mut self, _req: &Request, _sub: u8, _res: i32, _io: &mut dyn Submit) -> Flow {
        // Issues no backend I/O, so there is nothing to complete.
        Flow::Done(-libc::EIO)
    }
}
