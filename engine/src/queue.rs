//! One hardware queue: one thread, one io_uring carrying both the ublk commands and the
//! target's backend I/O.
//!
//! The loop: wait for completions → copy a bounded batch of CQEs out → advance each tag →
//! queue the resulting SQEs (backend I/O and COMMIT_AND_FETCH together) → one `io_uring_enter`
//! that submits them and waits for the next completions.
//!
//! With BATCH_IO the ublk commands go per queue instead of per tag (see `batch`): the tags of
//! new requests arrive through one multishot FETCH, and each iteration's results leave in one
//! COMMIT. The tag state machine and the targets are the same in both modes.

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring};

use crate::batch::{Batch, Committed, Data, MAX_TAGS_PER_CQE};
use crate::buf::IoBufs;
use crate::error::{Error, Result};
use crate::ring::{self, push_sqe, Enter, SqPoll};
use crate::stats::{op_index, QueueStats, StatsRegion};
use crate::tag::{Kind, Tag, TagState, UserData};
use crate::target::{Flow, QueueHandler, Request, Submit};
use crate::uapi::*;

/// Fixed-file index of `/dev/ublkcN` on every queue ring; backing files follow it.
pub const CDEV_FIXED: u32 = 0;

pub struct QueueConfig {
    pub dev_id: u32,
    pub q: u16,
    pub depth: u16,
    pub max_io_bytes: u32,
    pub cdev_fd: RawFd,
    /// Backing files, registered at fixed indexes 1.. in this order.
    pub files: Vec<RawFd>,
    /// An eventfd: readable means "stop once no backend I/O is in flight".
    pub stop_fd: RawFd,
    pub stats: Arc<StatsRegion>,
    /// UBLK_F_AUTO_BUF_REG is on: each request's pages are registered at the ring's fixed
    /// buffer index `tag` while it is served.
    pub zero_copy: bool,
    /// Create the ring with SQPOLL.
    pub sqpoll: Option<SqPoll>,
    /// UBLK_F_USER_COPY: the kernel does not copy; this queue moves request data between its
    /// buffers and the request's pages with reads and writes on `/dev/ublkcN`.
    pub user_copy: bool,
    /// UBLK_F_BATCH_IO: per-queue PREP/FETCH/COMMIT_IO_CMDS instead of per-tag commands.
    pub batch: bool,
}

/// Engine sub-ops (`Kind::Engine`): the stop event, and the manual buffer registration used
/// when the kernel could not auto-register a request's buffer.
const ENGINE_STOP: u8 = 0;
const ENGINE_REG: u8 = 1;
const ENGINE_UNREG: u8 = 2;
/// User copy: write data from the request's pages into the tag's buffer, before serving.
const ENGINE_COPY_IN: u8 = 3;
/// User copy: read data from the tag's buffer into the request's pages, before committing.
const ENGINE_COPY_OUT: u8 = 4;

/// Batch commands (`Kind::Ublk` in batch mode); a COMMIT's `tag` field is its array's index.
const BATCH_PREP: u8 = 1;
const BATCH_FETCH: u8 = 2;
const BATCH_COMMIT: u8 = 3;

/// The queue's read-only view of the driver's descriptor array for this queue.
struct DescMap {
    ptr: *const ublksrv_io_desc,
    len: usize,
    depth: u16,
}

impl DescMap {
    fn new(cdev_fd: RawFd, q: u16, depth: u16) -> Result<Self> {
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
        let len = queue_desc_map_len(depth, page) as usize;
        let off = queue_desc_map_offset(q, page);
        // SAFETY: a fresh shared read-only mapping of the char device; the kernel validates the
        // offset and length. Nothing else aliases the returned range.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                cdev_fd,
                off as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::last_os("mmap descriptor array").queue(q));
        }
        Ok(DescMap { ptr: ptr as *const ublksrv_io_desc, len, depth })
    }

    fn read(&self, tag: u16) -> ublksrv_io_desc {
        assert!(tag < self.depth);
        // SAFETY: the mapping holds `depth` descriptors and tag < depth. The driver wrote this
        // one before completing the fetch whose CQE we just reaped, and does not touch it again
        // until we commit; volatile because the memory is shared with the kernel.
        unsafe { std::ptr::read_volatile(self.ptr.add(usize::from(tag))) }
    }
}

impl Drop for DescMap {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the range mmap returned; no reference into it outlives self.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

/// The handler's view of the ring: stamps `user_data` and counts backend ops in flight.
struct Sq<'a> {
    ring: &'a mut IoUring,
    tags: &'a mut [Tag],
    backend_inflight: &'a mut usize,
    stats: &'a QueueStats,
}

impl Submit for Sq<'_> {
    unsafe fn push(&mut self, req: &Request, sub: u8, sqe: squeue::Entry) {
        let t = &mut self.tags[usize::from(req.tag)];
        t.issue();
        *self.backend_inflight += 1;
        let ud = UserData { tag: req.tag, kind: Kind::Target, sub, gen: t.gen };
        QueueStats::bump(&self.stats.sqes, 1);
        // SAFETY: the caller guarantees the SQE's buffers outlive its completion.
        unsafe { push_sqe(self.ring, &sqe.user_data(ud.encode())) };
    }

    fn stats(&self) -> &QueueStats {
        self.stats
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

/// How the queue ended.
#[derive(Debug, Default, Clone, Copy)]
pub struct QueueExit {
    pub requests: u64,
    pub aborted_tags: u16,
}

pub struct Queue {
    // Drop order matters: the ring goes first, cancelling every ublk command and backend op that
    // still points into the descriptor map and the buffers declared after it.
    ring: IoUring,
    enter: Enter,
    desc: DescMap,
    bufs: IoBufs,
    /// BATCH_IO element arrays and FETCH buffers (after the ring: the kernel may use them
    /// until the ring is gone).
    batch: Option<Batch>,
    handler: Box<dyn QueueHandler>,
    tags: Vec<Tag>,
    reqs: Vec<Request>,
    cqes: Vec<(u64, i32, u32)>,
    cfg: QueueConfig,
    live_tags: usize,
    backend_inflight: usize,
    stopping: bool,
    stop_buf: u64,
    requests: u64,
    /// When each tag's current request was delivered (ns, CLOCK_MONOTONIC).
    start_ns: Vec<u64>,
    /// The clock, read once per loop iteration: all completions of a batch share it.
    now_ns: u64,
    /// The tag's buffer was registered by us (auto registration fell back), so we unregister it
    /// before the commit.
    manual_reg: Vec<bool>,
    /// User copy: the result a READ commits once its data is copied out.
    copy_out_res: Vec<i32>,
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the local timespec (a vDSO call, no syscall).
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl Queue {
    /// Sets the queue up on the calling thread (the ring must be created by the thread that
    /// will submit on it: SINGLE_ISSUER, and ublk's one-daemon-task-per-queue rule).
    pub fn new(cfg: QueueConfig, handler: Box<dyn QueueHandler>) -> Result<Self> {
        let depth = cfg.depth;
        // Room for one ublk command plus a backend op per tag, with headroom for resubmits.
        let sq = (u32::from(depth) * 2).next_power_of_two();
        let cq = sq * 2;
        let ring = ring::build(sq, cq, cfg.sqpoll).map_err(|e| e.queue(cfg.q))?;
        let enter = Enter::new(&ring);
        let mut fds = Vec::with_capacity(1 + cfg.files.len());
        fds.push(cfg.cdev_fd);
        fds.extend_from_slice(&cfg.files);
        ring.submitter()
            .register_files(&fds)
            .map_err(|e| Error::os("register files", e).queue(cfg.q))?;
        let desc = DescMap::new(cfg.cdev_fd, cfg.q, depth).map_err(|e| e.dev(cfg.dev_id))?;
        // Zero copy never moves data through these buffers: leave them unlocked and untouched.
        let bufs =
            IoBufs::new(depth, cfg.max_io_bytes, !cfg.zero_copy).map_err(|e| e.queue(cfg.q))?;
        if cfg.zero_copy {
            // The table the driver registers each request's pages into (index = tag), and
            // where the queue registers them itself when that fails (index = depth + tag).
            ring.submitter()
                .register_buffers_sparse(2 * u32::from(depth))
                .map_err(|e| Error::os("register sparse buffer table", e).queue(cfg.q))?;
            occupy_zc_slots(&ring, &bufs, depth).map_err(|e| e.queue(cfg.q))?;
        } else {
            // SAFETY: the iovecs cover the tags' buffers in `bufs`, which the Queue owns and
            // drops after the ring (field order), so the registration never outlives them.
            unsafe { ring.submitter().register_buffers(&bufs.iovecs()) }.map_err(|e| {
                Error::os("register I/O buffers", e).queue(cfg.q).hint(
                    "registered buffers count against RLIMIT_MEMLOCK: raise it (ulimit -l) or lower --depth",
                )
            })?;
        }
        let batch = if cfg.batch {
            let data = match (cfg.zero_copy, cfg.user_copy) {
                (true, _) => Data::ZeroCopy,
                (_, true) => Data::UserCopy,
                _ => Data::Copy,
            };
            let addrs = if data == Data::Copy {
                (0..depth).map(|t| bufs.ptr(t) as u64).collect()
            } else {
                Vec::new()
            };
            Some(Batch::new(&ring, cfg.q, depth, data, addrs).map_err(|e| e.queue(cfg.q))?)
        } else {
            None
        };
        let reqs = (0..depth)
            .map(|tag| Request {
                tag,
                desc: ublksrv_io_desc::default(),
                buf: bufs.ptr(tag),
                buf_len: bufs.per_tag(),
                buf_index: cfg.zero_copy.then_some(tag),
                buf_reg: (!cfg.zero_copy).then_some(tag),
            })
            .collect();
        Ok(Queue {
            ring,
            enter,
            desc,
            bufs,
            batch,
            handler,
            tags: vec![Tag::new(); usize::from(depth)],
            reqs,
            cqes: Vec::with_capacity(cq as usize),
            cfg,
            live_tags: 0,
            backend_inflight: 0,
            stopping: false,
            stop_buf: 0,
            requests: 0,
            start_ns: vec![0; usize::from(depth)],
            manual_reg: vec![false; usize::from(depth)],
            copy_out_res: vec![0; usize::from(depth)],
            now_ns: monotonic_ns(),
        })
    }

    /// The ring's fd (for other queues to share its SQPOLL thread).
    pub fn ring_fd(&self) -> RawFd {
        use std::os::fd::AsRawFd;
        self.ring.as_raw_fd()
    }

    /// How the queue is set up, for the daemon's log.
    pub fn describe(&self) -> String {
        let b = &self.bufs;
        let bufs = if self.cfg.zero_copy {
            "zero copy (request pages registered per I/O)".to_string()
        } else {
            format!(
                "{} buffers {} MiB on {}{}, registered",
                if self.cfg.user_copy { "user copy" } else { "copy" },
                (b.per_tag() * usize::from(self.cfg.depth)) >> 20,
                b.backing().describe(),
                if b.locked() { ", locked" } else { "" }
            )
        };
        format!(
            "ring {}{}; {bufs}; {}",
            if self.cfg.sqpoll.is_some() { "SQPOLL" } else { "DEFER_TASKRUN" },
            if self.enter.registered() { ", ring fd registered" } else { "" },
            if self.batch.is_some() { "BATCH_IO commands" } else { "per-tag commands" },
        )
    }

    fn push_ublk(&mut self, tag: u16, op: u32, result: i32) {
        let zc = self.cfg.zero_copy;
        // Zero copy and user copy: the kernel copies nothing, so it gets no buffer address.
        let addr = if zc || self.cfg.user_copy { 0 } else { self.bufs.ptr(tag) as u64 };
        let cmd = ublksrv_io_cmd { q_id: self.cfg.q, tag, result, addr };
        let ud = UserData { tag, kind: Kind::Ublk, sub: 0, gen: 0 };
        QueueStats::bump(&self.cfg.stats.queue(self.cfg.q).sqes, 1);
        let mut b = opcode::UringCmd16::new(types::Fixed(CDEV_FIXED), op).cmd(cmd.to_bytes());
        if zc {
            // Where the driver registers the next request's pages: index = tag; on failure it
            // delivers the request with UBLK_IO_F_NEED_REG_BUF instead of failing it.
            let reg = ublk_auto_buf_reg {
                index: tag,
                flags: UBLK_AUTO_BUF_REG_FALLBACK,
                ..Default::default()
            };
            b = b.addr(Some(reg.to_sqe_addr()));
        }
        let sqe = b.build().user_data(ud.encode());
        // SAFETY: the command bytes are copied into the SQE; the buffer address it carries is
        // the tag's buffer, which lives in `self.bufs` and outlives the ring (drop order).
        unsafe { push_sqe(&mut self.ring, &sqe) };
    }

    /// REGISTER_IO_BUF / UNREGISTER_IO_BUF of the tag's request at fixed index depth + tag
    /// (index tag is where the automatic registration failed).
    fn push_buf_cmd(&mut self, tag: u16, sub: u8) {
        let op =
            if sub == ENGINE_REG { UBLK_U_IO_REGISTER_IO_BUF } else { UBLK_U_IO_UNREGISTER_IO_BUF };
        let index = u64::from(self.cfg.depth) + u64::from(tag);
        let cmd = ublksrv_io_cmd { q_id: self.cfg.q, tag, result: 0, addr: index };
        let gen = self.tags[usize::from(tag)].gen;
        let ud = UserData { tag, kind: Kind::Engine, sub, gen };
        let sqe = opcode::UringCmd16::new(types::Fixed(CDEV_FIXED), op)
            .cmd(cmd.to_bytes())
            .build()
            .user_data(ud.encode());
        QueueStats::bump(&self.cfg.stats.queue(self.cfg.q).sqes, 1);
        // SAFETY: the command is copied into the SQE and points at no memory of ours.
        unsafe { push_sqe(&mut self.ring, &sqe) };
    }

    /// User copy: moves `len` bytes between the tag's buffer and its request's pages through
    /// `/dev/ublkcN` (in for ENGINE_COPY_IN, out for ENGINE_COPY_OUT).
    fn push_user_copy(&mut self, tag: u16, sub: u8, len: u32) {
        let off = user_copy_offset(self.cfg.q, tag, 0);
        let buf = self.bufs.ptr(tag);
        let cdev = types::Fixed(CDEV_FIXED);
        let t = &mut self.tags[usize::from(tag)];
        t.issue();
        self.backend_inflight += 1;
        let ud = UserData { tag, kind: Kind::Engine, sub, gen: t.gen };
        // Plain READ/WRITE: the driver accepts only user-backed memory here (a fixed buffer's
        // bvec iterator gets EACCES).
        let sqe = if sub == ENGINE_COPY_IN {
            opcode::Read::new(cdev, buf, len).offset(off).build()
        } else {
            opcode::Write::new(cdev, buf, len).offset(off).build()
        };
        QueueStats::bump(&self.cfg.stats.queue(self.cfg.q).sqes, 1);
        // SAFETY: `buf..buf+len` is the tag's buffer (len <= max I/O size, checked by the
        // driver against the request), owned by `self.bufs`, which outlives the ring.
        unsafe { push_sqe(&mut self.ring, &sqe.user_data(ud.encode())) };
    }

    /// Runs the target's handler with the ring's submission side.
    fn handle(&mut self, f: impl FnOnce(&mut dyn QueueHandler, &mut dyn Submit) -> Flow) -> Flow {
        let mut sq = Sq {
            ring: &mut self.ring,
            tags: &mut self.tags,
            backend_inflight: &mut self.backend_inflight,
            stats: self.cfg.stats.queue(self.cfg.q),
        };
        f(self.handler.as_mut(), &mut sq)
    }

    fn start_request(&mut self, tag: u16) {
        let req = self.reqs[usize::from(tag)];
        let flow = self.handle(|h, io| h.start(&req, io));
        self.settle(tag, flow);
    }

    fn arm_stop(&mut self) {
        let ud = UserData { tag: 0, kind: Kind::Engine, sub: ENGINE_STOP, gen: 0 };
        let sqe = opcode::PollAdd::new(types::Fd(self.cfg.stop_fd), libc::POLLIN as u32)
            .build()
            .user_data(ud.encode());
        // SAFETY: poll references no memory of ours; the eventfd outlives the queue (owned by
        // the device, which joins this thread before closing it).
        unsafe { push_sqe(&mut self.ring, &sqe) };
    }

    /// Serves until every tag is aborted by the driver, or a stop is requested and no backend
    /// I/O is in flight.
    pub fn run(&mut self) -> Result<QueueExit> {
        if self.batch.is_some() {
            self.prep_batch()?;
        } else {
            for tag in 0..self.cfg.depth {
                self.tags[usize::from(tag)].fetch();
                self.push_ublk(tag, UBLK_U_IO_FETCH_REQ, 0);
            }
        }
        self.live_tags = usize::from(self.cfg.depth);
        self.arm_stop();
        loop {
            // A COMMIT completes while it is submitted: wait for one completion more than it,
            // or the wait returns at once for the COMMIT alone (an extra enter per turn at qd1).
            let want = 1 + u32::from(self.push_commits());
            let done = self.live_tags == 0 || self.stopping;
            if done && self.backend_inflight == 0 {
                // Hand the last commits to the kernel before the ring goes away.
                let _ = self.ring.submit();
                break;
            }
            let stats = self.cfg.stats.queue(self.cfg.q);
            QueueStats::bump(&stats.ring_enters, 1);
            match self.enter.submit_and_wait(&mut self.ring, want) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) => {}
                Err(e) => return Err(Error::os("io_uring_enter", e).queue(self.cfg.q)),
            }
            let now = monotonic_ns();
            if stats.io_now.load(std::sync::atomic::Ordering::Relaxed) > 0 {
                QueueStats::bump(&stats.io_time_ns, now.saturating_sub(self.now_ns));
            }
            self.now_ns = now;
            self.drain();
        }
        let aborted = self.tags.iter().filter(|t| t.state == TagState::Done).count();
        Ok(QueueExit { requests: self.requests, aborted_tags: aborted as u16 })
    }

    fn drain(&mut self) {
        self.cqes.clear();
        let cap = self.cqes.capacity();
        self.cqes.extend(
            self.ring.completion().take(cap).map(|c| (c.user_data(), c.result(), c.flags())),
        );
        for i in 0..self.cqes.len() {
            let (ud, res, flags) = self.cqes[i];
            self.dispatch(ud, res, flags);
        }
    }

    fn dispatch(&mut self, ud: u64, res: i32, flags: u32) {
        let Some(ud) = UserData::decode(ud) else {
            debug_assert!(false, "unknown user_data {ud:#x}");
            return;
        };
        let tag = ud.tag;
        match ud.kind {
            Kind::Engine if ud.sub == ENGINE_REG => {
                if !self.tags[usize::from(tag)].reap(ud.gen) {
                    debug_assert!(false, "stale buffer registration CQE for tag {tag}");
                    return;
                }
                self.backend_inflight -= 1;
                if res < 0 {
                    self.manual_reg[usize::from(tag)] = false;
                    self.reqs[usize::from(tag)].buf_index = Some(tag);
                    self.settle(tag, Flow::Done(res));
                } else {
                    self.start_request(tag);
                }
            }
            // The request completes once both the commit and this are done; a failure leaves
            // nothing we could undo.
            Kind::Engine if ud.sub == ENGINE_UNREG => {
                if res < 0 {
                    eprintln!(
                        "ublk-fast: dev {} queue {} tag {tag}: UNREGISTER_IO_BUF: {}",
                        self.cfg.dev_id,
                        self.cfg.q,
                        io::Error::from_raw_os_error(-res)
                    );
                }
            }
            Kind::Engine if ud.sub == ENGINE_COPY_IN || ud.sub == ENGINE_COPY_OUT => {
                if !self.tags[usize::from(tag)].reap(ud.gen) {
                    debug_assert!(false, "stale user-copy CQE for tag {tag}");
                    return;
                }
                self.backend_inflight -= 1;
                let want = if ud.sub == ENGINE_COPY_IN {
                    self.reqs[usize::from(tag)].bytes() as i32
                } else {
                    self.copy_out_res[usize::from(tag)]
                };
                let short = if res < 0 { res } else { -libc::EIO };
                match (ud.sub, res == want) {
                    (ENGINE_COPY_IN, true) => self.start_request(tag),
                    (ENGINE_COPY_IN, false) => self.settle(tag, Flow::Done(short)),
                    (_, true) => self.commit(tag, want),
                    (_, false) => self.commit(tag, short),
                }
            }
            Kind::Engine => {
                self.stopping = true;
                // Drain the eventfd so a later poll does not fire again at once.
                // SAFETY: reading 8 bytes into an 8-byte local from an eventfd we own.
                unsafe {
                    libc::read(self.cfg.stop_fd, &mut self.stop_buf as *mut u64 as *mut _, 8)
                };
            }
            Kind::Ublk if self.batch.is_some() => self.dispatch_batch(ud.sub, tag, res, flags),
            Kind::Ublk => {
                let t = &mut self.tags[usize::from(tag)];
                if t.state != TagState::Fetching {
                    debug_assert!(false, "ublk CQE for tag {tag} in {:?}", t.state);
                    return;
                }
                if res == UBLK_IO_RES_OK {
                    self.deliver(tag);
                } else {
                    if res != UBLK_IO_RES_ABORT {
                        eprintln!(
                            "ublk-fast: dev {} queue {} tag {tag}: fetch failed: {}",
                            self.cfg.dev_id,
                            self.cfg.q,
                            io::Error::from_raw_os_error(-res)
                        );
                    }
                    t.finish();
                    self.live_tags -= 1;
                }
            }
            Kind::Target => {
                if !self.tags[usize::from(tag)].reap(ud.gen) {
                    debug_assert!(false, "stale backend CQE for tag {tag}");
                    return;
                }
                self.backend_inflight -= 1;
                let req = self.reqs[usize::from(tag)];
                let flow = self.handle(|h, io| h.complete(&req, ud.sub, res, io));
                self.settle(tag, flow);
            }
        }
    }

    /// A request arrived for `tag` (Fetching): read its descriptor and start serving it.
    fn deliver(&mut self, tag: u16) {
        self.tags[usize::from(tag)].deliver();
        self.requests += 1;
        self.start_ns[usize::from(tag)] = self.now_ns;
        let desc = self.desc.read(tag);
        self.reqs[usize::from(tag)].desc = desc;
        let stats = self.cfg.stats.queue(self.cfg.q);
        QueueStats::bump(&stats.io_now, 1);
        let has_data = matches!(desc.op(), UBLK_IO_OP_READ | UBLK_IO_OP_WRITE);
        if self.cfg.zero_copy && has_data && desc.flags() & UBLK_IO_F_NEED_REG_BUF != 0 {
            // Auto registration failed: register it ourselves, then serve.
            QueueStats::bump(&stats.zero_copy_fallbacks, 1);
            self.manual_reg[usize::from(tag)] = true;
            self.reqs[usize::from(tag)].buf_index = Some(self.cfg.depth + tag);
            self.tags[usize::from(tag)].issue();
            self.backend_inflight += 1;
            self.push_buf_cmd(tag, ENGINE_REG);
        } else if self.cfg.user_copy && desc.op() == UBLK_IO_OP_WRITE {
            // Fetch the data to write into our buffer first.
            let len = self.reqs[usize::from(tag)].bytes() as u32;
            self.push_user_copy(tag, ENGINE_COPY_IN, len);
        } else {
            self.start_request(tag);
        }
    }

    /// Batch mode: PREP every tag (the driver completes it inline), then arm the FETCH.
    fn prep_batch(&mut self) -> Result<()> {
        let depth = self.cfg.depth;
        let Some(b) = self.batch.as_mut() else { return Ok(()) };
        let ud = UserData { tag: 0, kind: Kind::Ublk, sub: BATCH_PREP, gen: 0 };
        let sqe = b.prep(depth).user_data(ud.encode());
        QueueStats::bump(&self.cfg.stats.queue(self.cfg.q).sqes, 1);
        // SAFETY: the element array lives in `self.batch` and is not touched until the
        // completion reaped below.
        unsafe { push_sqe(&mut self.ring, &sqe) };
        let res = loop {
            match self.enter.submit_and_wait(&mut self.ring, 1) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) => continue,
                Err(e) => return Err(Error::os("io_uring_enter", e).queue(self.cfg.q)),
            }
            if let Some(c) = self.ring.completion().next() {
                break c.result();
            }
        };
        if res != 0 {
            return Err(
                Error::os("PREP_IO_CMDS", io::Error::from_raw_os_error(-res)).queue(self.cfg.q)
            );
        }
        for t in &mut self.tags {
            t.fetch();
        }
        self.arm_fetch();
        Ok(())
    }

    fn arm_fetch(&mut self) {
        let Some(b) = self.batch.as_ref() else { return };
        let ud = UserData { tag: 0, kind: Kind::Ublk, sub: BATCH_FETCH, gen: 0 };
        let sqe = b.fetch().user_data(ud.encode());
        QueueStats::bump(&self.cfg.stats.queue(self.cfg.q).sqes, 1);
        // SAFETY: the FETCH writes only into the provided buffers, which live in `self.batch`
        // and outlive the ring (field order).
        unsafe { push_sqe(&mut self.ring, &sqe) };
    }

    /// Batch mode: one COMMIT_IO_CMDS for the results staged since the last one. True if one
    /// was queued.
    fn push_commits(&mut self) -> bool {
        let Some(b) = self.batch.as_mut() else { return false };
        let Some((slot, sqe)) = b.commit() else { return false };
        let ud = UserData { tag: slot as u16, kind: Kind::Ublk, sub: BATCH_COMMIT, gen: 0 };
        QueueStats::bump(&self.cfg.stats.queue(self.cfg.q).sqes, 1);
        // SAFETY: the element array stays in `self.batch`, untouched, until the completion.
        unsafe { push_sqe(&mut self.ring, &sqe.user_data(ud.encode())) };
        true
    }

    fn dispatch_batch(&mut self, sub: u8, slot: u16, res: i32, flags: u32) {
        match sub {
            BATCH_FETCH => {
                let mut tags = [0u16; MAX_TAGS_PER_CQE];
                let n = self.batch.as_mut().map_or(0, |b| b.fetched(res, flags, &mut tags));
                for &tag in &tags[..n] {
                    match self.tags.get(usize::from(tag)).map(|t| t.state) {
                        Some(TagState::Fetching) => self.deliver(tag),
                        s => debug_assert!(false, "FETCH delivered tag {tag} in {s:?}"),
                    }
                }
                if io_uring::cqueue::more(flags) {
                    return;
                }
                if res == -libc::ENOBUFS || (res >= 0 && !self.stopping) {
                    // Out of buffers (or CQ space): the undelivered tags wait in the driver.
                    self.arm_fetch();
                    return;
                }
                if res != UBLK_IO_RES_ABORT {
                    eprintln!(
                        "ublk-fast: dev {} queue {}: FETCH_IO_CMDS failed: {}",
                        self.cfg.dev_id,
                        self.cfg.q,
                        io::Error::from_raw_os_error(-res)
                    );
                }
                // The queue is going away: every tag the driver held is aborted.
                for t in &mut self.tags {
                    if t.state == TagState::Fetching {
                        t.finish();
                    }
                }
                self.live_tags = 0;
            }
            BATCH_COMMIT => self.batch_committed(usize::from(slot), res),
            _ => debug_assert!(false, "unexpected batch completion {sub} res {res}"),
        }
    }

    /// A COMMIT completed. Elements the driver did not apply leave their tags with us: the
    /// refused one is lost (logged), the ones after it are committed again.
    fn batch_committed(&mut self, slot: usize, res: i32) {
        let Some(b) = self.batch.as_mut() else { return };
        let Committed::Stopped { at, errno } = b.committed(slot, res) else { return };
        let going_away = self.live_tags == 0;
        let mut i = at;
        while let Some((tag, result)) = b.element(slot, i) {
            if i == at || going_away {
                if !going_away {
                    let why = errno
                        .map_or("refused".into(), |e| io::Error::from_raw_os_error(e).to_string());
                    eprintln!(
                        "ublk-fast: dev {} queue {} tag {tag}: COMMIT_IO_CMDS: {why}",
                        self.cfg.dev_id, self.cfg.q
                    );
                }
                if self.tags[usize::from(tag)].state == TagState::Fetching {
                    self.tags[usize::from(tag)].finish();
                }
            } else {
                b.stage(tag, result);
            }
            i += 1;
        }
        b.release(slot);
    }

    /// Commits a finished request (and fetches the tag's next one).
    fn settle(&mut self, tag: u16, flow: Flow) {
        let t = &mut self.tags[usize::from(tag)];
        let res = match flow {
            Flow::Pending if t.inflight > 0 => return,
            Flow::Pending => {
                debug_assert!(false, "target left tag {tag} pending with nothing in flight");
                -libc::EIO
            }
            Flow::Done(_) if t.inflight > 0 => {
                debug_assert!(false, "target finished tag {tag} with I/O in flight");
                return;
            }
            Flow::Done(r) => r,
        };
        let read = self.reqs[usize::from(tag)].desc.op() == UBLK_IO_OP_READ;
        if self.cfg.user_copy && read && res > 0 {
            // Hand the data read to the request's pages, then commit.
            self.copy_out_res[usize::from(tag)] = res;
            self.push_user_copy(tag, ENGINE_COPY_OUT, res as u32);
            return;
        }
        self.commit(tag, res);
    }

    /// Records the finished request and commits it with `res` (and fetches the tag's next one).
    fn commit(&mut self, tag: u16, res: i32) {
        let t = &mut self.tags[usize::from(tag)];
        t.commit();
        let stats = self.cfg.stats.queue(self.cfg.q);
        QueueStats::drop_one(&stats.io_now);
        count_request(stats, &self.reqs[usize::from(tag)].desc);
        if res < 0 {
            QueueStats::bump(&stats.io_errors, 1);
        }
        if let Some(i) = op_index(self.reqs[usize::from(tag)].desc.op()) {
            let ns = self.now_ns.saturating_sub(self.start_ns[usize::from(tag)]);
            stats.lat[i].record(ns, res < 0);
        }
        if std::mem::take(&mut self.manual_reg[usize::from(tag)]) {
            // The request completes only once its buffer is unregistered too (in either
            // order; not linked, so a failed unregister cannot cancel the commit).
            self.push_buf_cmd(tag, ENGINE_UNREG);
            self.reqs[usize::from(tag)].buf_index = Some(tag);
        }
        match self.batch.as_mut() {
            Some(b) => b.stage(tag, res),
            None => self.push_ublk(tag, UBLK_U_IO_COMMIT_AND_FETCH_REQ, res),
        }
    }
}

/// Test hook: `UBLK_FAST_TEST_ZC_BUSY_SLOTS=N` fills the first N automatic-registration slots
/// of each zero-copy queue with a buffer of ours, so the driver's registration fails for tags
/// 0..N and their requests take the fallback path (NEED_REG_BUF, registered by the queue).
fn occupy_zc_slots(ring: &IoUring, bufs: &IoBufs, depth: u16) -> Result<()> {
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
    // ring (field order); zero copy never uses it otherwise.
    unsafe { ring.submitter().register_buffers_update(0, &iovs, None) }
        .map_err(|e| Error::os("occupy zero-copy slots (test hook)", e))
}
