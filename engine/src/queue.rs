//! One ublk queue, served on a core's ring (`core`): its tags, the driver's descriptor array,
//! its buffers, the target's handler and, with BATCH_IO, its batch command state.
//!
//! A request's life: the fetch completes (per-tag: the tag's own command; batch: the tag
//! arrives through the queue's multishot FETCH) → the descriptor is read and the target starts
//! serving (maybe with backend SQEs on the same ring) → once it is done the result is committed
//! (per-tag: COMMIT_AND_FETCH_REQ, which also fetches the next request; batch: staged into the
//! loop turn's one COMMIT_IO_CMDS). Nothing here allocates, locks or does an atomic
//! read-modify-write per request.

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

use io_uring::{opcode, squeue, types};

use crate::batch::{Batch, Committed, MAX_TAGS_PER_CQE};
use crate::buf::IoBufs;
use crate::desc::DescMap;
use crate::error::{Error, Result};
use crate::mode::{Data, Mode};
use crate::op::{Op, UserData};
use crate::ratelimit::RateLimit;
use crate::ring::Ring;
use crate::stats::{op_index, QueueStats, StatsRegion};
use crate::tag::{Tag, TagState};
use crate::target::{Flow, Integrity, QueueHandler, Request, Submit};
use crate::uapi::*;

pub struct QueueConfig {
    pub dev_id: u32,
    pub q: u16,
    pub depth: u16,
    pub max_io_bytes: u32,
    pub cdev_fd: RawFd,
    /// The target's backing files, registered right after `/dev/ublkcN` in this order.
    pub files: Vec<RawFd>,
    pub stats: Arc<StatsRegion>,
    pub mode: Mode,
    /// Latency mode: how long the core polls after a busy turn (µs; 0: off).
    pub poll_us: u32,
    /// A request outstanding longer than this (ms) is logged once and counted (0: never).
    pub slow_io_ms: u32,
    /// Per-sector metadata (user copy only): each tag gets a buffer for its request's.
    pub integrity: Option<Integrity>,
    /// This queue object serves shard `shard` of `shards` (UBLK_F_PER_IO_DAEMON): the tags
    /// `t` with `t % shards == shard`, each bound by the driver to this core thread. 0 of 1:
    /// every tag.
    pub shard: u16,
    pub shards: u16,
}

impl QueueConfig {
    /// How many of the queue's tags this shard owns.
    pub fn owned_tags(&self) -> u16 {
        (self.depth - self.shard).div_ceil(self.shards)
    }

    pub fn owns(&self, tag: u16) -> bool {
        tag % self.shards == self.shard
    }

    /// An owned tag's index among the shard's buffers and fixed-buffer slots.
    pub fn local(&self, tag: u16) -> u16 {
        tag / self.shards
    }
}

/// Where a queue's share of its core ring's tables lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    /// The queue's index among the ring's queues (`UserData::queue`).
    pub slot: u16,
    /// Fixed-file index of `/dev/ublkcN`; the target's files follow it.
    pub file_base: u32,
    /// First fixed-buffer index of the queue's range (`Mode::buffer_slots` long).
    pub buf_base: u16,
    /// Provided-buffer group of the queue's FETCH buffers (batch).
    pub bgid: u16,
}

/// Everything about one tag, in one place.
struct Slot {
    tag: Tag,
    req: Request,
    /// When the current request was delivered (ns, CLOCK_MONOTONIC).
    start_ns: u64,
    /// Its pages were registered by us (the driver's automatic registration fell back), so we
    /// unregister them next to the commit.
    manual_reg: bool,
    /// User copy: the result a READ commits once its data is copied out.
    copy_out_res: i32,
    /// User copy: copies (data, metadata) still in flight, and the first one's failure.
    copies: u8,
    copy_err: i32,
    /// The handler holds the request ([`Flow::Held`]) until it calls `Submit::finish`.
    held: bool,
    /// The current request was reported slow.
    slow: bool,
}

fn op_name(op: u8) -> &'static str {
    match op {
        UBLK_IO_OP_READ => "READ",
        UBLK_IO_OP_WRITE => "WRITE",
        UBLK_IO_OP_FLUSH => "FLUSH",
        UBLK_IO_OP_DISCARD => "DISCARD",
        UBLK_IO_OP_WRITE_ZEROES => "WRITE_ZEROES",
        _ => "op",
    }
}

/// Counts a committed request by op.
fn count_request(s: &QueueStats, d: &ublksrv_io_desc) {
    let bytes = u64::from(d.nr_sectors) * 512;
    match d.op() {
        UBLK_IO_OP_READ => {
            QueueStats::bump(&s.reads, 1);
            QueueStats::bump(&s.read_bytes, bytes);
        }
        UBLK_IO_OP_WRITE => {
            QueueStats::bump(&s.writes, 1);
            QueueStats::bump(&s.written_bytes, bytes);
            if d.flags() & UBLK_IO_F_FUA != 0 {
                QueueStats::bump(&s.fua_writes, 1);
            }
        }
        UBLK_IO_OP_FLUSH => QueueStats::bump(&s.flushes, 1),
        UBLK_IO_OP_DISCARD => QueueStats::bump(&s.discards, 1),
        UBLK_IO_OP_WRITE_ZEROES => QueueStats::bump(&s.write_zeroes, 1),
        _ => {}
    }
}

/// How a queue ended.
#[derive(Debug, Default, Clone, Copy)]
pub struct QueueExit {
    pub requests: u64,
    pub aborted_tags: u16,
}

/// The handler's view of the ring: stamps `user_data` and counts backend ops in flight.
struct Sq<'a> {
    ring: &'a mut Ring,
    slots: &'a mut [Slot],
    backend_inflight: &'a mut usize,
    queue_ops: &'a mut usize,
    /// Held requests the handler finished during this call, settled right after it.
    finished: &'a mut Vec<(u16, i32)>,
    stats: &'a QueueStats,
    queue: u16,
    now_ns: u64,
}

impl Submit for Sq<'_> {
    unsafe fn push(&mut self, req: &Request, sub: u8, sqe: squeue::Entry) {
        let t = &mut self.slots[usize::from(req.tag)].tag;
        t.issue();
        *self.backend_inflight += 1;
        let ud = UserData::new(self.queue, req.tag, Op::Target(sub), t.gen);
        QueueStats::bump(&self.stats.sqes, 1);
        // SAFETY: the caller guarantees the SQE's buffers outlive its completion. A refused
        // push breaks the ring, which ends the core's loop with that error.
        unsafe { self.ring.push(&sqe.user_data(ud.encode())) };
    }

    fn stats(&self) -> &QueueStats {
        self.stats
    }

    unsafe fn push_queue(&mut self, token: u16, sub: u8, sqe: squeue::Entry) {
        *self.queue_ops += 1;
        let ud = UserData::new(self.queue, token, Op::Queue(sub), 0);
        QueueStats::bump(&self.stats.sqes, 1);
        // SAFETY: the caller guarantees the SQE's buffers outlive its completion.
        unsafe { self.ring.push(&sqe.user_data(ud.encode())) };
    }

    fn request_user_data(&self, req: &Request, sub: u8) -> u64 {
        let gen = self.slots.get(usize::from(req.tag)).map_or(0, |s| s.tag.gen);
        UserData::new(self.queue, req.tag, Op::Target(sub), gen).encode()
    }

    fn queue_user_data(&self, token: u16, sub: u8) -> u64 {
        UserData::new(self.queue, token, Op::Queue(sub), 0).encode()
    }

    fn finish(&mut self, tag: u16, res: i32) {
        let held = self
            .slots
            .get_mut(usize::from(tag))
            .filter(|s| s.held && s.tag.state == TagState::Serving && s.tag.inflight == 0);
        match held {
            // Bounded: a tag is held at most once, and the list holds `depth`.
            Some(s) if self.finished.len() < self.finished.capacity() => {
                s.held = false;
                self.finished.push((tag, res));
            }
            _ => QueueStats::bump(&self.stats.unexpected_completions, 1),
        }
    }

    fn now_ns(&self) -> u64 {
        self.now_ns
    }
}

pub struct Queue {
    cfg: QueueConfig,
    at: Placement,
    desc: DescMap,
    /// The tags' buffers (registered with the ring in the copy modes).
    bufs: IoBufs,
    /// BATCH_IO element arrays and FETCH buffers.
    batch: Option<Batch>,
    handler: Box<dyn QueueHandler>,
    slots: Vec<Slot>,
    /// Tags the driver has not aborted yet.
    live_tags: usize,
    backend_inflight: usize,
    /// The handler's queue-level operations in flight (`Submit::push_queue`).
    queue_ops: usize,
    /// See `Sq::finished`; allocated once, `depth` long.
    finished_held: Vec<(u16, i32)>,
    /// The handler was told the queue is ending.
    ended: bool,
    /// UNREGISTER_IO_BUF commands in flight (they outlive their request's commit).
    unreg_inflight: usize,
    stopping: bool,
    requests: u64,
    /// Batch: the PREP_IO_CMDS result, once it completed.
    prepped: Option<i32>,
    /// The core's clock for the completions being dispatched (read once per loop turn).
    now_ns: u64,
    /// Bounds this queue's log lines (errors can come with every request).
    log_budget: RateLimit,
    /// Integrity: every tag's metadata buffer (`meta_per_tag` bytes each), allocated once;
    /// the slots' requests point into it (kept only to own the memory).
    _meta: Box<[u8]>,
    meta_per_tag: usize,
}

impl Queue {
    /// Sets the queue up on its core's ring (on the core's thread): registers its files and
    /// buffers at its placement, maps the descriptor array, and prepares the batch state.
    pub fn new(
        cfg: QueueConfig,
        at: Placement,
        handler: Box<dyn QueueHandler>,
        ring: &Ring,
    ) -> Result<Queue> {
        let q = cfg.q;
        let depth = cfg.depth;
        let owned = cfg.owned_tags();
        let mut fds = Vec::with_capacity(1 + cfg.files.len());
        fds.push(cfg.cdev_fd);
        fds.extend_from_slice(&cfg.files);
        ring.uring
            .submitter()
            .register_files_update(at.file_base, &fds)
            .map_err(|e| Error::os("register files", e).queue(q))?;
        let desc = DescMap::new(cfg.cdev_fd, q, depth).map_err(|e| e.dev(cfg.dev_id))?;
        // Zero copy never moves data through these buffers: leave them unlocked and untouched.
        let bufs =
            IoBufs::new(owned, cfg.max_io_bytes, cfg.mode.uses_arena()).map_err(|e| e.queue(q))?;
        if cfg.mode.zero_copy() {
            occupy_zc_slots(ring, &bufs, at.buf_base, owned).map_err(|e| e.queue(q))?;
        } else {
            // SAFETY: the iovecs cover the tags' buffers in `bufs`, which the Queue owns; the
            // core drops its ring (and with it the registration) before its queues.
            unsafe {
                ring.uring.submitter().register_buffers_update(
                    u32::from(at.buf_base),
                    &bufs.iovecs(),
                    None,
                )
            }
            .map_err(|e| {
                Error::os("register I/O buffers", e).queue(q).hint(
                    "registered buffers count against RLIMIT_MEMLOCK: raise it (ulimit -l) or lower --depth",
                )
            })?;
        }
        let batch = if cfg.mode.batch() {
            let addrs = if cfg.mode.data == Data::Copy {
                (0..depth).map(|t| bufs.ptr(t) as u64).collect()
            } else {
                Vec::new()
            };
            let b = Batch::new(&ring.uring, q, depth, cfg.mode.data, addrs, at)
                .map_err(|e| e.queue(q))?;
            Some(b)
        } else {
            None
        };
        let zc = cfg.mode.zero_copy();
        let meta_per_tag =
            cfg.integrity.map_or(0, |i| i.bytes_for(u64::from(cfg.max_io_bytes)) as usize);
        let mut meta = vec![0u8; meta_per_tag * usize::from(depth)].into_boxed_slice();
        let meta_base = meta.as_mut_ptr();
        // Every tag has a slot (they are small, and indexed by tag); only the owned ones have
        // a buffer, and are ever fetched.
        let slots = (0..depth)
            .map(|tag| Slot {
                tag: Tag::new(),
                req: Request {
                    tag,
                    desc: ublksrv_io_desc::default(),
                    buf: if cfg.owns(tag) {
                        bufs.ptr(cfg.local(tag))
                    } else {
                        std::ptr::null_mut()
                    },
                    buf_len: bufs.per_tag(),
                    buf_index: zc.then_some(at.buf_base + cfg.local(tag)),
                    buf_reg: (!zc).then_some(at.buf_base + cfg.local(tag)),
                    first_file: at.file_base + 1,
                    // A boxed slice's elements stay where they are when the box moves.
                    meta: meta_base.wrapping_add(usize::from(tag) * meta_per_tag),
                    meta_len: 0,
                },
                start_ns: 0,
                manual_reg: false,
                copy_out_res: 0,
                copies: 0,
                copy_err: 0,
                held: false,
                slow: false,
            })
            .collect();
        Ok(Queue {
            cfg,
            at,
            desc,
            bufs,
            batch,
            handler,
            slots,
            live_tags: 0,
            backend_inflight: 0,
            queue_ops: 0,
            finished_held: Vec::with_capacity(usize::from(depth)),
            ended: false,
            unreg_inflight: 0,
            stopping: false,
            requests: 0,
            prepped: None,
            now_ns: 0,
            log_budget: RateLimit::default(),
            _meta: meta,
            meta_per_tag,
        })
    }

    /// How the queue is set up, for the log and `list`.
    pub fn describe(&self) -> String {
        let b = &self.bufs;
        let bufs = if self.cfg.mode.zero_copy() {
            "request pages registered per I/O".to_string()
        } else {
            format!(
                "buffers {} MiB on {}{}, registered",
                (b.per_tag() * usize::from(self.cfg.owned_tags())) >> 20,
                b.backing().describe(),
                if b.locked() { ", locked" } else { "" }
            )
        };
        format!("{}; {bufs}", self.cfg.mode.describe())
    }

    pub fn stats(&self) -> &QueueStats {
        self.cfg.stats.shard(self.cfg.q, self.cfg.shard)
    }

    pub fn exit(&self) -> QueueExit {
        let aborted = self.slots.iter().filter(|s| s.tag.state == TagState::Done).count();
        QueueExit { requests: self.requests, aborted_tags: aborted as u16 }
    }

    /// Whether the queue has nothing left to do: every tag aborted by the driver, or a stop
    /// was asked for; and no backend I/O in flight (its buffers must not be reused under it).
    pub fn finished(&self) -> bool {
        (self.live_tags == 0 || self.stopping) && self.backend_inflight == 0 && self.queue_ops == 0
    }

    /// Whether nothing of this queue is left in flight on the ring: every tag aborted by the
    /// driver, no backend op, COMMIT or buffer command pending. Its resources may then go, and
    /// its `user_data` slot can be reused without a late completion landing in a new queue.
    pub fn removable(&self) -> bool {
        self.live_tags == 0
            && self.backend_inflight == 0
            && self.queue_ops == 0
            && self.unreg_inflight == 0
            && self.batch.as_ref().is_none_or(|b| !b.commits_in_flight())
    }

    /// Stopping, or every tag ended: the queue may soon be removable (the core then checks).
    pub fn winding_down(&self) -> bool {
        self.stopping || self.live_tags == 0
    }

    pub fn poll_us(&self) -> u32 {
        self.cfg.poll_us
    }

    /// The core's once-a-second check: publishes the oldest request's age, and logs (once
    /// each, rate-limited) and counts the requests outstanding past the slow-I/O threshold.
    /// They are not failed: in zero copy their pages are the backend's until it is done.
    pub fn check_slow(&mut self, now_ns: u64) {
        self.now_ns = now_ns;
        let limit = u64::from(self.cfg.slow_io_ms) * 1_000_000;
        let mut oldest = 0;
        for t in 0..self.slots.len() {
            let s = &self.slots[t];
            if s.tag.state != TagState::Serving {
                continue;
            }
            let age = now_ns.saturating_sub(s.start_ns);
            oldest = oldest.max(age);
            if limit == 0 || age < limit || s.slow {
                continue;
            }
            self.slots[t].slow = true;
            QueueStats::bump(&self.stats().slow_ios, 1);
            let d = self.slots[t].req.desc;
            let op = op_name(d.op());
            let msg = format!(
                "slow I/O: {op} of {} bytes at offset {} outstanding for {} ms (--slow-io-ms {})",
                u64::from(d.nr_sectors) * 512,
                d.start_sector * 512,
                age / 1_000_000,
                self.cfg.slow_io_ms
            );
            self.warn(Some(t as u16), &msg);
        }
        self.stats().oldest_io_ns.store(oldest, std::sync::atomic::Ordering::Relaxed);
    }

    /// (device, queue), for reports.
    pub fn id(&self) -> (u32, u16) {
        (self.cfg.dev_id, self.cfg.q)
    }

    /// Batch: gives the FETCH buffer group back to the ring before the queue is dropped.
    pub fn unbind_buf_group(&self, ring: &Ring) -> Result<()> {
        match &self.batch {
            Some(b) => b.unbind(&ring.uring),
            None => Ok(()),
        }
    }

    pub fn stop(&mut self, ring: &mut Ring) {
        self.stopping = true;
        self.end_handler(ring);
    }

    /// The device's I/O did not drain in time: the handler cancels its backend operations.
    pub fn cancel_backend(&mut self, ring: &mut Ring) {
        self.handle(ring, |h, io| {
            h.cancel(io);
            Flow::Pending
        });
    }

    /// Tells the handler once that the queue is ending, so its queue-level operations finish.
    fn end_handler(&mut self, ring: &mut Ring) {
        if !self.ended && (self.stopping || self.live_tags == 0) {
            self.ended = true;
            self.handle(ring, |h, io| {
                h.end(io);
                Flow::Pending
            });
        }
    }

    /// Batch: the PREP_IO_CMDS result (`None` until it completed; always `Some(0)` per-tag).
    pub fn prepped(&self) -> Option<i32> {
        if self.batch.is_some() {
            self.prepped
        } else {
            Some(0)
        }
    }

    fn ud(&self, tag: u16, op: Op, gen: u16) -> UserData {
        UserData::new(self.at.slot, tag, op, gen)
    }

    /// Queues one SQE of the engine's own, counted.
    ///
    /// # Safety
    /// As [`Ring::push`]: whatever `sqe` points at stays valid until its completion.
    unsafe fn push(&self, ring: &mut Ring, sqe: &squeue::Entry) {
        QueueStats::bump(&self.stats().sqes, 1);
        // SAFETY: forwarded from the caller.
        unsafe { ring.push(sqe) };
    }

    /// Hands every tag to the driver: one FETCH_REQ per tag, or one PREP_IO_CMDS (whose
    /// completion arms the FETCH).
    pub fn start(&mut self, ring: &mut Ring) {
        self.live_tags = usize::from(self.cfg.owned_tags());
        self.handle(ring, |h, io| {
            h.begin(io);
            Flow::Pending
        });
        if let Some(b) = self.batch.as_mut() {
            let sqe = b.prep(self.cfg.depth);
            let ud = self.ud(0, Op::BatchPrep, 0);
            // SAFETY: the element array lives in `self.batch` and is not touched until the
            // completion.
            unsafe { self.push(ring, &sqe.user_data(ud.encode())) };
            return;
        }
        for tag in (self.cfg.shard..self.cfg.depth).step_by(usize::from(self.cfg.shards)) {
            self.slots[usize::from(tag)].tag.fetch();
            self.push_ublk(ring, tag, UBLK_U_IO_FETCH_REQ, 0);
        }
    }

    fn push_ublk(&mut self, ring: &mut Ring, tag: u16, op: u32, result: i32) {
        let zc = self.cfg.mode.zero_copy();
        // Zero copy and user copy: the kernel copies nothing, so it gets no buffer address.
        let addr = if self.cfg.mode.data == Data::Copy {
            self.bufs.ptr(self.cfg.local(tag)) as u64
        } else {
            0
        };
        let cmd = ublksrv_io_cmd { q_id: self.cfg.q, tag, result, addr };
        let mut b =
            opcode::UringCmd16::new(types::Fixed(self.at.file_base), op).cmd(cmd.to_bytes());
        if zc {
            // Where the driver registers the next request's pages; on failure it delivers the
            // request with UBLK_IO_F_NEED_REG_BUF instead of failing it.
            let reg = ublk_auto_buf_reg {
                index: self.at.buf_base + self.cfg.local(tag),
                flags: UBLK_AUTO_BUF_REG_FALLBACK,
                ..Default::default()
            };
            b = b.addr(Some(reg.to_sqe_addr()));
        }
        let sqe = b.build().user_data(self.ud(tag, Op::Fetch, 0).encode());
        // SAFETY: the command bytes are copied into the SQE; the buffer address it carries is
        // the tag's buffer, which lives in `self.bufs` and outlives the ring.
        unsafe { self.push(ring, &sqe) };
    }

    /// REGISTER_IO_BUF / UNREGISTER_IO_BUF of the tag's request at the fallback index (the
    /// upper half of the queue's range; the lower half is where the automatic one failed).
    fn push_buf_cmd(&mut self, ring: &mut Ring, tag: u16, op: Op) {
        let cmd_op =
            if op == Op::RegBuf { UBLK_U_IO_REGISTER_IO_BUF } else { UBLK_U_IO_UNREGISTER_IO_BUF };
        let index = self.fallback_index(tag);
        let cmd = ublksrv_io_cmd { q_id: self.cfg.q, tag, result: 0, addr: u64::from(index) };
        let gen = self.slots[usize::from(tag)].tag.gen;
        let sqe = opcode::UringCmd16::new(types::Fixed(self.at.file_base), cmd_op)
            .cmd(cmd.to_bytes())
            .build()
            .user_data(self.ud(tag, op, gen).encode());
        // SAFETY: the command is copied into the SQE and points at no memory of ours.
        unsafe { self.push(ring, &sqe) };
    }

    fn fallback_index(&self, tag: u16) -> u16 {
        self.at.buf_base + self.cfg.owned_tags() + self.cfg.local(tag)
    }

    /// User copy: moves `len` bytes through `/dev/ublkcN` between the request and the tag's
    /// buffers: its data (CopyIn, CopyOut: the I/O buffer) or its metadata (MetaIn, MetaOut:
    /// the metadata buffer, at the offset with UBLKSRV_IO_INTEGRITY_FLAG).
    fn push_user_copy(&mut self, ring: &mut Ring, tag: u16, op: Op, len: u32) {
        let meta = matches!(op, Op::MetaIn | Op::MetaOut);
        let off =
            user_copy_offset(self.cfg.q, tag, 0) | if meta { UBLKSRV_IO_INTEGRITY_FLAG } else { 0 };
        let buf = if meta {
            self.slots[usize::from(tag)].req.meta
        } else {
            self.bufs.ptr(self.cfg.local(tag))
        };
        let cdev = types::Fixed(self.at.file_base);
        let t = &mut self.slots[usize::from(tag)].tag;
        t.issue();
        self.backend_inflight += 1;
        let ud = UserData::new(self.at.slot, tag, op, t.gen);
        // Plain READ/WRITE: the driver accepts only user-backed memory here (a fixed buffer's
        // bvec iterator gets EACCES).
        let sqe = if matches!(op, Op::CopyIn | Op::MetaIn) {
            opcode::Read::new(cdev, buf, len).offset(off).build()
        } else {
            opcode::Write::new(cdev, buf, len).offset(off).build()
        };
        // SAFETY: `buf..buf+len` is the tag's I/O buffer (len <= max I/O size, checked by the
        // driver against the request), owned by `self.bufs`, or lies in its metadata buffer
        // (len <= meta_per_tag, checked at delivery), owned by `self._meta`; both outlive the
        // ring.
        unsafe { self.push(ring, &sqe.user_data(ud.encode())) };
    }

    /// User copy: starts a request's copies (its data, and its metadata if it has any).
    fn push_copies(&mut self, ring: &mut Ring, tag: u16, inbound: bool, len: u32) {
        let s = &mut self.slots[usize::from(tag)];
        let meta = s.req.meta_len as u32;
        s.copies = 1 + u8::from(meta > 0);
        s.copy_err = 0;
        let (data_op, meta_op) =
            if inbound { (Op::CopyIn, Op::MetaIn) } else { (Op::CopyOut, Op::MetaOut) };
        self.push_user_copy(ring, tag, data_op, len);
        if meta > 0 {
            self.push_user_copy(ring, tag, meta_op, meta);
        }
    }

    /// Runs the target's handler with the ring's submission side.
    fn handle(
        &mut self,
        ring: &mut Ring,
        f: impl FnOnce(&mut dyn QueueHandler, &mut dyn Submit) -> Flow,
    ) -> Flow {
        let stats = self.cfg.stats.shard(self.cfg.q, self.cfg.shard);
        let mut sq = Sq {
            ring: &mut *ring,
            slots: &mut self.slots,
            backend_inflight: &mut self.backend_inflight,
            queue_ops: &mut self.queue_ops,
            finished: &mut self.finished_held,
            stats,
            queue: self.at.slot,
            now_ns: self.now_ns,
        };
        let flow = f(self.handler.as_mut(), &mut sq);
        self.settle_finished(ring);
        flow
    }

    /// Commits the held requests the handler finished in its last call.
    fn settle_finished(&mut self, ring: &mut Ring) {
        let mut i = 0;
        // Settling may run the handler again (never for a held tag): take one at a time.
        while i < self.finished_held.len() {
            let (tag, res) = self.finished_held[i];
            i += 1;
            self.settle(ring, tag, Flow::Done(res));
        }
        self.finished_held.clear();
    }

    fn start_request(&mut self, ring: &mut Ring, tag: u16) {
        let req = self.slots[usize::from(tag)].req;
        let flow = self.handle(ring, |h, io| h.start(&req, io));
        self.settle(ring, tag, flow);
    }

    /// Dispatches one of this queue's completions. False if it makes no sense (logged by the
    /// caller): a stale or unknown completion is never applied.
    pub fn complete(
        &mut self,
        ring: &mut Ring,
        ud: UserData,
        res: i32,
        flags: u32,
        now_ns: u64,
    ) -> bool {
        self.now_ns = now_ns;
        let tag = ud.tag;
        if usize::from(tag) >= self.slots.len() && !matches!(ud.op, Op::BatchCommit | Op::Queue(_))
        {
            return false;
        }
        match ud.op {
            Op::Fetch => {
                if self.slots[usize::from(tag)].tag.state != TagState::Fetching {
                    return false;
                }
                if res == UBLK_IO_RES_OK {
                    self.deliver(ring, tag);
                } else {
                    if res != UBLK_IO_RES_ABORT {
                        self.log(Some(tag), "fetch failed", res);
                    }
                    self.slots[usize::from(tag)].tag.finish();
                    self.live_tags -= 1;
                }
            }
            Op::Target(sub) => {
                if !self.slots[usize::from(tag)].tag.reap(ud.gen) {
                    return false;
                }
                self.backend_inflight -= 1;
                let req = self.slots[usize::from(tag)].req;
                let flow = self.handle(ring, |h, io| h.complete(&req, sub, res, io));
                self.settle(ring, tag, flow);
            }
            Op::RegBuf => {
                if !self.slots[usize::from(tag)].tag.reap(ud.gen) {
                    return false;
                }
                self.backend_inflight -= 1;
                if res < 0 {
                    let s = &mut self.slots[usize::from(tag)];
                    s.manual_reg = false;
                    s.req.buf_index = Some(self.at.buf_base + self.cfg.local(tag));
                    self.settle(ring, tag, Flow::Done(res));
                } else {
                    self.start_request(ring, tag);
                }
            }
            // The request completes once both the commit and this are done; a failure leaves
            // nothing we could undo.
            Op::UnregBuf => {
                self.unreg_inflight = self.unreg_inflight.saturating_sub(1);
                if res < 0 {
                    self.log(Some(tag), "UNREGISTER_IO_BUF", res);
                }
            }
            Op::CopyIn | Op::CopyOut | Op::MetaIn | Op::MetaOut => {
                if !self.slots[usize::from(tag)].tag.reap(ud.gen) {
                    return false;
                }
                self.backend_inflight -= 1;
                let s = &mut self.slots[usize::from(tag)];
                let want = match ud.op {
                    Op::CopyIn => s.req.bytes() as i32,
                    Op::CopyOut => s.copy_out_res,
                    _ => s.req.meta_len as i32,
                };
                if res != want && s.copy_err == 0 {
                    s.copy_err = if res < 0 { res } else { -libc::EIO };
                }
                s.copies = s.copies.saturating_sub(1);
                if s.copies > 0 {
                    return true;
                }
                let (err, done) = (s.copy_err, s.copy_out_res);
                match (matches!(ud.op, Op::CopyIn | Op::MetaIn), err) {
                    (true, 0) => self.start_request(ring, tag),
                    (true, e) => self.settle(ring, tag, Flow::Done(e)),
                    (false, 0) => self.commit(ring, tag, done),
                    (false, e) => self.commit(ring, tag, e),
                }
            }
            Op::BatchPrep => {
                self.prepped = Some(res);
                if res != 0 {
                    self.log(None, "PREP_IO_CMDS", res);
                    self.live_tags = 0;
                    return true;
                }
                for s in &mut self.slots {
                    s.tag.fetch();
                }
                self.arm_fetch(ring);
            }
            Op::BatchFetch => self.fetched(ring, res, flags),
            Op::BatchCommit => self.batch_committed(usize::from(tag), res),
            Op::Queue(sub) => {
                if self.queue_ops == 0 {
                    return false;
                }
                self.queue_ops -= 1;
                self.handle(ring, |h, io| {
                    h.complete_queue(tag, sub, res, flags, io);
                    Flow::Pending
                });
            }
            Op::Wake | Op::Tick => return false,
        }
        self.end_handler(ring);
        true
    }

    /// Logs a failed command of this queue (rate-limited), with its device, queue and tag.
    fn log(&mut self, tag: Option<u16>, what: &str, res: i32) {
        let err = io::Error::from_raw_os_error(-res);
        self.warn(tag, &format!("{what}: {err}"));
    }

    fn warn(&mut self, tag: Option<u16>, msg: &str) {
        let Some(dropped) = self.log_budget.admit(self.now_ns) else { return };
        let tag = tag.map_or(String::new(), |t| format!(" tag {t}"));
        let more =
            if dropped > 0 { format!(" ({dropped} similar lines dropped)") } else { String::new() };
        log::warn!("dev {} queue {}{tag}: {msg}{more}", self.cfg.dev_id, self.cfg.q);
    }

    /// A request arrived for `tag` (Fetching): read its descriptor and start serving it.
    fn deliver(&mut self, ring: &mut Ring, tag: u16) {
        let desc = self.desc.read(tag);
        let s = &mut self.slots[usize::from(tag)];
        s.tag.deliver();
        s.start_ns = self.now_ns;
        s.slow = false;
        s.req.desc = desc;
        self.requests += 1;
        let stats = self.cfg.stats.shard(self.cfg.q, self.cfg.shard);
        QueueStats::bump(&stats.io_now, 1);
        let has_data = matches!(desc.op(), UBLK_IO_OP_READ | UBLK_IO_OP_WRITE);
        let meta = match self.cfg.integrity {
            Some(i) if has_data && desc.flags() & UBLK_IO_F_INTEGRITY != 0 => {
                i.bytes_for(u64::from(desc.nr_sectors) * 512) as usize
            }
            _ => 0,
        };
        let s = &mut self.slots[usize::from(tag)];
        s.req.meta_len = meta;
        if meta > self.meta_per_tag {
            // Larger than the device's maximum I/O allows: the driver would not send it.
            self.warn(Some(tag), "a request's metadata exceeds its buffer");
            return self.settle(ring, tag, Flow::Done(-libc::EIO));
        }
        if self.cfg.mode.zero_copy() && has_data && desc.flags() & UBLK_IO_F_NEED_REG_BUF != 0 {
            // Auto registration failed: register it ourselves, then serve.
            QueueStats::bump(&stats.zero_copy_fallbacks, 1);
            let index = self.fallback_index(tag);
            let s = &mut self.slots[usize::from(tag)];
            s.manual_reg = true;
            s.req.buf_index = Some(index);
            s.tag.issue();
            self.backend_inflight += 1;
            self.push_buf_cmd(ring, tag, Op::RegBuf);
        } else if self.cfg.mode.user_copy() && desc.op() == UBLK_IO_OP_WRITE {
            // Fetch the data to write (and its metadata) into our buffers first.
            let len = s.req.bytes() as u32;
            self.push_copies(ring, tag, true, len);
        } else {
            self.start_request(ring, tag);
        }
    }

    fn arm_fetch(&mut self, ring: &mut Ring) {
        let Some(b) = self.batch.as_ref() else { return };
        let sqe = b.fetch().user_data(self.ud(0, Op::BatchFetch, 0).encode());
        // SAFETY: the FETCH writes only into the provided buffers, which live in `self.batch`
        // and outlive the ring.
        unsafe { self.push(ring, &sqe) };
    }

    /// Batch mode: one COMMIT_IO_CMDS for the results staged since the last one. True if one
    /// was queued.
    pub fn push_commits(&mut self, ring: &mut Ring) -> bool {
        let Some(b) = self.batch.as_mut() else { return false };
        let Some((slot, sqe)) = b.commit() else { return false };
        let ud = self.ud(slot as u16, Op::BatchCommit, 0);
        // SAFETY: the element array stays in `self.batch`, untouched, until the completion.
        unsafe { self.push(ring, &sqe.user_data(ud.encode())) };
        true
    }

    fn fetched(&mut self, ring: &mut Ring, res: i32, flags: u32) {
        let mut tags = [0u16; MAX_TAGS_PER_CQE];
        let n = self.batch.as_mut().map_or(0, |b| b.fetched(res, flags, &mut tags));
        for &tag in &tags[..n] {
            match self.slots.get(usize::from(tag)).map(|s| s.tag.state) {
                Some(TagState::Fetching) => self.deliver(ring, tag),
                s => self.log_unexpected(&format!("FETCH delivered tag {tag} in {s:?}")),
            }
        }
        if io_uring::cqueue::more(flags) {
            return;
        }
        if res == -libc::ENOBUFS || (res >= 0 && !self.stopping) {
            // Out of buffers (or CQ space): the undelivered tags wait in the driver.
            self.arm_fetch(ring);
            return;
        }
        if res != UBLK_IO_RES_ABORT {
            self.log(None, "FETCH_IO_CMDS failed", res);
        }
        // The queue is going away: every tag the driver held is aborted.
        for s in &mut self.slots {
            if s.tag.state == TagState::Fetching {
                s.tag.finish();
            }
        }
        self.live_tags = 0;
    }

    fn log_unexpected(&mut self, what: &str) {
        QueueStats::bump(&self.stats().unexpected_completions, 1);
        self.warn(None, what);
    }

    /// A COMMIT completed. Elements the driver did not apply leave their tags with us: the
    /// refused one is lost (logged), the ones after it are committed again.
    fn batch_committed(&mut self, slot: usize, res: i32) {
        let going_away = self.live_tags == 0;
        let Some(b) = self.batch.as_mut() else { return };
        let Committed::Stopped { at, errno } = b.committed(slot, res) else { return };
        let mut i = at;
        while let Some((tag, result)) = b.element(slot, i) {
            if i == at || going_away {
                if !going_away {
                    let why = errno
                        .map_or("refused".into(), |e| io::Error::from_raw_os_error(e).to_string());
                    if let Some(dropped) = self.log_budget.admit(self.now_ns) {
                        log::warn!(
                            "dev {} queue {} tag {tag}: COMMIT_IO_CMDS: {why} ({dropped} similar lines dropped before)",
                            self.cfg.dev_id,
                            self.cfg.q
                        );
                    }
                }
                let t = &mut self.slots[usize::from(tag)].tag;
                if t.state == TagState::Fetching {
                    t.finish();
                }
            } else {
                b.stage(tag, result);
            }
            i += 1;
        }
        b.release(slot);
    }

    /// Commits a finished request (and fetches the tag's next one).
    fn settle(&mut self, ring: &mut Ring, tag: u16, flow: Flow) {
        let s = &mut self.slots[usize::from(tag)];
        let res = match flow {
            Flow::Held => {
                s.held = true;
                return;
            }
            Flow::Pending if s.tag.inflight > 0 => return,
            Flow::Pending => {
                debug_assert!(false, "target left tag {tag} pending with nothing in flight");
                -libc::EIO
            }
            Flow::Done(_) if s.tag.inflight > 0 => {
                debug_assert!(false, "target finished tag {tag} with I/O in flight");
                return;
            }
            Flow::Done(r) => r,
        };
        let read = s.req.desc.op() == UBLK_IO_OP_READ;
        if self.cfg.mode.user_copy() && read && res > 0 {
            // Hand the data read to the request's pages, then commit.
            s.copy_out_res = res;
            self.push_copies(ring, tag, false, res as u32);
            return;
        }
        self.commit(ring, tag, res);
    }

    /// Records the finished request and commits it with `res` (and fetches the tag's next one).
    fn commit(&mut self, ring: &mut Ring, tag: u16, res: i32) {
        let stats = self.cfg.stats.shard(self.cfg.q, self.cfg.shard);
        let s = &mut self.slots[usize::from(tag)];
        s.tag.commit();
        QueueStats::drop_one(&stats.io_now);
        count_request(stats, &s.req.desc);
        if res < 0 {
            QueueStats::bump(&stats.io_errors, 1);
        }
        if let Some(i) = op_index(s.req.desc.op()) {
            stats.lat[i].record(self.now_ns.saturating_sub(s.start_ns), res < 0);
        }
        if std::mem::take(&mut s.manual_reg) {
            // The request completes only once its buffer is unregistered too (in either
            // order; not linked, so a failed unregister cannot cancel the commit).
            s.req.buf_index = Some(self.at.buf_base + self.cfg.local(tag));
            self.unreg_inflight += 1;
            self.push_buf_cmd(ring, tag, Op::UnregBuf);
        }
        match self.batch.as_mut() {
            Some(b) => b.stage(tag, res),
            None => self.push_ublk(ring, tag, UBLK_U_IO_COMMIT_AND_FETCH_REQ, res),
        }
    }
}

/// Test hook: `UBLK_FAST_TEST_ZC_BUSY_SLOTS=N` fills the first N automatic-registration slots
/// of each zero-copy queue with a buffer of ours, so the driver's registration fails for tags
/// 0..N and their requests take the fallback path (NEED_REG_BUF, registered by the queue).
fn occupy_zc_slots(ring: &Ring, bufs: &IoBufs, base: u16, depth: u16) -> Result<()> {
    let n = std::env::var("UBLK_FAST_TEST_ZC_BUSY_SLOTS")
        .ok()
        .and_then(|v| v.parse::<u16>().ok())
        .unwrap_or(0)
        .min(depth);
    if n == 0 {
        return Ok(());
    }
    let iov = libc::iovec { iov_base: bufs.ptr(0) as *mut libc::c_void, iov_len: 4096 };
    let iovs = vec![iov; usize::from(n)];
    // SAFETY: the first page of tag 0's buffer, owned by the queue's `bufs`, which outlives the
    // ring; zero copy never uses it otherwise.
    unsafe { ring.uring.submitter().register_buffers_update(u32::from(base), &iovs, None) }
        .map_err(|e| Error::os("occupy zero-copy slots (test hook)", e))
}
