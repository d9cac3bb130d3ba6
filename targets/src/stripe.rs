//! `stripe`: RAID-0 over 2 to 8 files or block devices. The device is cut into chunks of
//! `--chunk` bytes dealt out in turn: chunk `i` lives on member `i % N` at offset
//! `(i / N) * chunk` (the layout of rublk's and ublksrv's stripe targets, and of md RAID-0 with
//! one zone). A request is split at chunk boundaries into one backend operation per piece, all
//! in flight at once on the queue's ring; a short piece is resumed for its remainder. FLUSH is
//! an fdatasync of every member; FUA writes use RWF_DSYNC. DISCARD and WRITE_ZEROES are split
//! the same way: a punched hole in a file member (it reads back as zeros), and on a block
//! device the io_uring discard command or a zeroing fallocate.
//!
//! Each member is opened as the loop target opens its backing store (O_DIRECT checked,
//! `flock`ed, block devices `O_EXCL`).

use std::os::fd::RawFd;
use std::path::Path;

use io_uring::{opcode, types};
use ublk_fast_engine::target::{Flow, QueueHandler, Request, Submit, Target, TargetParams};
use ublk_fast_engine::uapi::*;
use ublk_fast_engine::{Error, Result};

use crate::loop_target::{blk_discard_sqe, LoopOptions, LoopTarget};

pub const MIN_MEMBERS: usize = 2;
pub const MAX_MEMBERS: usize = 8;
pub const DEFAULT_CHUNK: u32 = 64 << 10;

pub struct StripeTarget {
    members: Vec<LoopTarget>,
    chunk: u32,
    size: u64,
    logical_block: u32,
    physical_block: u32,
    opts: LoopOptions,
}

impl StripeTarget {
    /// Opens every member; `given` are the members already opened by the CLI, in order.
    pub fn open(
        paths: &[&Path],
        chunk: u32,
        opts: &LoopOptions,
        given: &mut dyn FnMut() -> Option<std::fs::File>,
    ) -> Result<StripeTarget> {
        if !(MIN_MEMBERS..=MAX_MEMBERS).contains(&paths.len()) {
            return Err(Error::invalid(format!(
                "stripe: {} member(s) given: give {MIN_MEMBERS} to {MAX_MEMBERS} files or block devices",
                paths.len()
            )));
        }
        if !chunk.is_power_of_two() || !(4096..=(1 << 20)).contains(&chunk) {
            return Err(Error::invalid(format!(
                "stripe --chunk {chunk}: must be a power of two from 4K to 1M"
            )));
        }
        let mut members = Vec::with_capacity(paths.len());
        for p in paths {
            let m = match given() {
                Some(f) => LoopTarget::adopt(f, p, opts)?,
                None => LoopTarget::open(p, opts)?,
            };
            members.push(m);
        }
        let params: Vec<TargetParams> = members.iter().map(|m| m.params()).collect();
        let logical_block = params.iter().map(|p| p.logical_block).max().unwrap_or(512);
        let physical_block = params.iter().map(|p| p.physical_block).max().unwrap_or(4096);
        if chunk < logical_block {
            return Err(Error::invalid(format!(
                "stripe --chunk {chunk}: smaller than a member's {logical_block}-byte block"
            )));
        }
        // Whole stripes of the smallest member.
        let per_member = params.iter().map(|p| p.size_bytes).min().unwrap_or(0);
        let chunks_each = per_member / u64::from(chunk);
        if chunks_each == 0 {
            return Err(Error::invalid(format!(
                "stripe: a member holds less than one {chunk}-byte chunk: give larger members or a smaller --chunk"
            )));
        }
        let size = chunks_each * u64::from(chunk) * members.len() as u64;
        Ok(StripeTarget { members, chunk, size, logical_block, physical_block, opts: opts.clone() })
    }

    pub fn members(&self) -> usize {
        self.members.len()
    }
}

impl Target for StripeTarget {
    fn name(&self) -> &'static str {
        "stripe"
    }

    fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = self.members.iter().filter_map(|m| m.backing()).collect();
        a.push(format!("--chunk={}", self.chunk));
        if self.opts.buffered {
            a.push("--buffered".into());
        }
        a
    }

    fn backing(&self) -> Option<String> {
        let names: Vec<String> = self.members.iter().filter_map(|m| m.backing()).collect();
        Some(names.join(","))
    }

    fn params(&self) -> TargetParams {
        TargetParams {
            size_bytes: self.size,
            logical_block: self.logical_block,
            physical_block: self.physical_block,
            attrs: UBLK_ATTR_VOLATILE_CACHE | UBLK_ATTR_FUA,
            // As many chunks as a read or write may span: the pieces fit the sub-op byte.
            discard: Some(ublk_fast_engine::target::DiscardLimits {
                granularity: self.chunk,
                max_discard_sectors: (self.chunk * PIECES_PER_IO) >> 9,
                max_write_zeroes_sectors: (self.chunk * PIECES_PER_IO) >> 9,
            }),
        }
    }

    fn files(&self) -> Vec<RawFd> {
        self.members.iter().flat_map(|m| m.files()).collect()
    }

    fn spreads_tags(&self) -> bool {
        true
    }
    fn supports_zero_copy(&self) -> bool {
        true
    }

    fn max_io_bytes(&self) -> Option<u32> {
        Some(self.chunk.saturating_mul(PIECES_PER_IO))
    }

    fn check_resize(&self, _bytes: u64) -> Result<()> {
        Err(Error::invalid("stripe: resize is not supported (the layout depends on the size)"))
    }

    fn queue_handler(&self, _q: u16, depth: u16) -> Result<Box<dyn QueueHandler>> {
        let max_pieces = PIECES_PER_IO as usize + 1;
        Ok(Box::new(StripeQueue {
            blkdev: self.members.iter().map(|m| m.is_blkdev()).collect(),
            members: self.members.len() as u64,
            chunk: u64::from(self.chunk),
            done: vec![0; usize::from(depth) * max_pieces],
            max_pieces,
            tags: vec![StripeTag::default(); usize::from(depth)],
        }))
    }
}

/// Requests span at most this many chunks (plus one for an unaligned start): the device's
/// maximum I/O size is capped to it, so a request's pieces fit the sub-op byte.
const PIECES_PER_IO: u32 = 64;

/// Sub-op bytes: pieces of a READ/WRITE are 0..=FLUSH-1; the fsyncs of a FLUSH are FLUSH.
const FLUSH: u8 = 0x7f;

struct StripeQueue {
    /// Which members are block devices (discard and zeroing differ from files).
    blkdev: Vec<bool>,
    members: u64,
    chunk: u64,
    /// Bytes done of each piece of each tag's current request (`max_pieces` per tag).
    done: Vec<u32>,
    max_pieces: usize,
    /// Indexed by tag.
    tags: Vec<StripeTag>,
}

/// One tag's request: its operations still in flight, and its first error (0: none).
#[derive(Clone, Copy, Default)]
struct StripeTag {
    left: u16,
    err: i32,
}

/// One piece of a request: where it lies on its member and in the request's buffer.
struct Piece {
    member: u32,
    member_off: u64,
    buf_off: u64,
    len: u64,
}

impl StripeQueue {
    /// Piece `k` of the request (the part of its `k`th chunk it covers).
    fn piece(&self, req: &Request, k: u64) -> Piece {
        let off = req.offset();
        let end = off + req.bytes() as u64;
        let first = off / self.chunk;
        let c = first + k;
        let start = (c * self.chunk).max(off);
        let stop = ((c + 1) * self.chunk).min(end);
        Piece {
            member: (c % self.members) as u32,
            member_off: (c / self.members) * self.chunk + (start - c * self.chunk),
            buf_off: start - off,
            len: stop - start,
        }
    }

    fn pieces(&self, req: &Request) -> u64 {
        let off = req.offset();
        let end = off + req.bytes() as u64;
        (end - 1) / self.chunk - off / self.chunk + 1
    }

    /// DISCARD / WRITE_ZEROES of piece `k`: no data moves.
    fn push_trim(&mut self, req: &Request, k: u64, io: &mut dyn Submit) {
        let p = self.piece(req, k);
        let f = req.file(p.member);
        let discard = req.desc.op() == UBLK_IO_OP_DISCARD;
        let sqe = if self.blkdev[p.member as usize] && discard {
            blk_discard_sqe(f, p.member_off, p.len)
        } else {
            let mode = if self.blkdev[p.member as usize] {
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
            } else {
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
            };
            opcode::Fallocate::new(f, p.len).offset(p.member_off).mode(mode).build()
        };
        self.tags[usize::from(req.tag)].left += 1;
        // SAFETY: neither command references memory.
        unsafe { io.push(req, k as u8, sqe) };
    }

    fn push_piece(&mut self, req: &Request, k: u64, io: &mut dyn Submit) {
        let p = self.piece(req, k);
        let done = u64::from(self.done[usize::from(req.tag) * self.max_pieces + k as usize]);
        let len = (p.len - done) as u32;
        let off = p.member_off + done;
        let fua = req.desc.op() == UBLK_IO_OP_WRITE && req.desc.flags() & UBLK_IO_F_FUA != 0;
        let rw_flags = if fua { libc::RWF_DSYNC } else { 0 };
        let read = req.desc.op() == UBLK_IO_OP_READ;
        let at_buf = (p.buf_off + done) as usize;
        let (at, fixed) = match (req.buf_index, req.buf_reg) {
            (Some(idx), _) => (at_buf as *mut u8, Some(idx)),
            (None, reg) => (req.buf.wrapping_add(at_buf), reg),
        };
        let f = req.file(p.member);
        let sqe = match (fixed, read) {
            (Some(idx), true) => opcode::ReadFixed::new(f, at, len, idx).offset(off).build(),
            (Some(idx), false) => {
                opcode::WriteFixed::new(f, at, len, idx).offset(off).rw_flags(rw_flags).build()
            }
            (None, true) => opcode::Read::new(f, at, len).offset(off).build(),
            (None, false) => opcode::Write::new(f, at, len).offset(off).rw_flags(rw_flags).build(),
        };
        self.tags[usize::from(req.tag)].left += 1;
        // SAFETY: `at..at+len` lies inside the request's data (buf_off + done + len <= bytes,
        // checked against the buffer when the request started): the tag's buffer, kept by the
        // engine until we finish, or (zero copy) the request's pages, registered until commit.
        unsafe { io.push(req, k as u8, sqe) };
    }
}

impl QueueHandler for StripeQueue {
    fn start(&mut self, req: &Request, io: &mut dyn Submit) -> Flow {
        match req.desc.op() {
            UBLK_IO_OP_READ | UBLK_IO_OP_WRITE => {
                if req.bytes() == 0 || req.bytes() > req.buf_len {
                    return Flow::Done(-libc::EINVAL);
                }
                let n = self.pieces(req);
                if n as usize > self.max_pieces || n >= u64::from(FLUSH) {
                    return Flow::Done(-libc::EINVAL);
                }
                let base = usize::from(req.tag) * self.max_pieces;
                self.done[base..base + n as usize].fill(0);
                self.tags[usize::from(req.tag)].err = 0;
                for k in 0..n {
                    self.push_piece(req, k, io);
                }
                Flow::Pending
            }
            UBLK_IO_OP_FLUSH => {
                self.tags[usize::from(req.tag)].err = 0;
                for m in 0..self.members as u32 {
                    self.tags[usize::from(req.tag)].left += 1;
                    let sqe =
                        opcode::Fsync::new(req.file(m)).flags(types::FsyncFlags::DATASYNC).build();
                    // SAFETY: fsync references no memory.
                    unsafe { io.push(req, FLUSH, sqe) };
                }
                Flow::Pending
            }
            UBLK_IO_OP_DISCARD | UBLK_IO_OP_WRITE_ZEROES => {
                let n = self.pieces(req);
                if req.bytes() == 0 || n as usize > self.max_pieces || n >= u64::from(FLUSH) {
                    return Flow::Done(-libc::EINVAL);
                }
                self.tags[usize::from(req.tag)].err = 0;
                for k in 0..n {
                    self.push_trim(req, k, io);
                }
                Flow::Pending
            }
            _ => Flow::Done(-libc::EOPNOTSUPP),
        }
    }

    fn complete(&mut self, req: &Request, sub: u8, res: i32, io: &mut dyn Submit) -> Flow {
        let t = usize::from(req.tag);
        self.tags[t].left -= 1;
        let rw = matches!(req.desc.op(), UBLK_IO_OP_READ | UBLK_IO_OP_WRITE);
        // A fallocate or discard returns 0; a read or write of 0 bytes is EOF.
        if res < 0 || (res == 0 && rw) {
            // A failed piece fails the request (EOF inside the device: the member shrank).
            if self.tags[t].err == 0 {
                self.tags[t].err = if res == 0 { -libc::EIO } else { res };
            }
        } else if sub != FLUSH && rw {
            let k = u64::from(sub);
            let len = self.piece(req, k).len;
            let d = &mut self.done[t * self.max_pieces + k as usize];
            *d += res as u32;
            if u64::from(*d) < len && self.tags[t].err == 0 {
                self.push_piece(req, k, io);
            }
        }
        if self.tags[t].left > 0 {
            return Flow::Pending;
        }
        match self.tags[t].err {
            0 if matches!(req.desc.op(), UBLK_IO_OP_READ | UBLK_IO_OP_WRITE) => {
                Flow::Done(req.bytes() as i32)
            }
            0 => Flow::Done(0),
            e => Flow::Done(e),
        }
    }
}
