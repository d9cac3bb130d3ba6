//! A core: one pinned thread and one io_uring serving every queue given to it, of any number of
//! devices. The ring carries the ublk commands and the backend I/O of all of them; its
//! fixed-file table, fixed-buffer table, provided-buffer groups and `user_data` space are
//! partitioned among the queues (`Placement`), handed out when a queue arrives and taken back
//! when it leaves.
//!
//! The loop: queue each batch queue's staged COMMIT → one `io_uring_enter` that submits
//! everything and waits → copy a bounded batch of CQEs out → dispatch each to its queue (no
//! recursion: handlers only queue SQEs) → let finished queues go → repeat. New queues arrive
//! through the core's mailbox, whose eventfd the ring polls: adding or removing a device never
//! pauses the others.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use io_uring::{opcode, types};

use crate::alloc::RangeAlloc;
use crate::error::{Error, Result};
use crate::op::{Op, UserData};
use crate::queue::{Placement, Queue, QueueConfig, QueueExit};
use crate::ratelimit::RateLimit;
use crate::ring::{Ring, SqPoll};
use crate::stats::QueueStats;
use crate::target::Target;

/// The kernel's limit on a ring's fixed-buffer table (`IORING_MAX_REG_BUFFERS`); every queue on
/// the ring shares it, and AUTO_BUF_REG indexes are 16 bits.
pub const MAX_BUFFER_SLOTS: u32 = 1 << 14;
/// Fixed-file slots of a core ring at most: each queue takes its `/dev/ublkcN` and its
/// target's files. The kernel bounds a table by RLIMIT_NOFILE, so a ring gets fewer where the
/// limit is lower (the service raises its soft limit to the hard one first).
pub const FILE_SLOTS: u32 = 4096;

/// The fixed-file slots a ring can have under this process's RLIMIT_NOFILE, leaving room
/// for ordinary descriptors.
fn file_slots() -> u32 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the local struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 64;
    }
    (lim.rlim_cur.saturating_sub(256) as u32).clamp(64, FILE_SLOTS)
}
/// Queues one core serves at most (`user_data` and buffer-group space).
pub const MAX_QUEUES: usize = 4096;
/// SQ entries of a core ring; a full SQ is submitted on the spot, so this bounds no depth.
const SQ_ENTRIES: u32 = 4096;
/// CQ entries: room for every command and backend op of 8192 tags in flight at once; beyond
/// that the kernel keeps overflowing CQEs (IORING_FEAT_NODROP) until we reap.
const CQ_ENTRIES: u32 = 16384;

/// What the service asks of a core.
pub enum CoreCmd {
    /// Set a queue up on this core and hand its tags to the driver; the reply carries how it
    /// was set up, once the driver has every tag (batch: once PREP completed), or the error.
    Add { cfg: QueueConfig, target: Arc<dyn Target>, reply: mpsc::Sender<Result<String>> },
    /// Cancel the backend operations in flight of every queue of device `dev` (its I/O did not
    /// drain in time).
    Cancel { dev: u32 },
}

/// A core's mailbox: commands in, and the eventfd its ring polls to hear of them.
pub struct Mailbox {
    cmds: Mutex<Vec<CoreCmd>>,
    wake: OwnedFd,
    stop: AtomicBool,
}

impl Mailbox {
    fn new() -> Result<Mailbox> {
        // SAFETY: eventfd has no memory-safety preconditions.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(Error::last_os("eventfd"));
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let wake = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Mailbox { cmds: Mutex::new(Vec::new()), wake, stop: AtomicBool::new(false) })
    }

    fn kick(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a local into an eventfd we own.
        unsafe { libc::write(self.wake.as_raw_fd(), &one as *const u64 as *const libc::c_void, 8) };
    }

    pub fn send(&self, cmd: CoreCmd) {
        self.cmds.lock().unwrap_or_else(|e| e.into_inner()).push(cmd);
        self.kick();
    }

    /// Ends the core once no backend I/O is in flight; its ring goes with it, and the driver
    /// treats every device still on it as one whose server died.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.kick();
    }
}

/// A queue that left its core: its device was stopped, deleted or quiesced (every tag aborted
/// by the driver), a ring command failed, or the core ended.
#[derive(Debug)]
pub struct Gone {
    pub dev_id: u32,
    pub q: u16,
    pub exit: QueueExit,
    /// Why, when it was not the driver ending the device.
    pub error: Option<String>,
}

/// Where cores report queues that left; the service waits here for a device's queues.
#[derive(Default)]
pub struct Departures {
    gone: Mutex<Vec<Gone>>,
    cv: Condvar,
}

impl Departures {
    fn push(&self, g: Gone) {
        self.gone.lock().unwrap_or_else(|e| e.into_inner()).push(g);
        self.cv.notify_all();
    }

    /// Waits until `queues` queues of device `dev` have left (bounded by `timeout`), and takes
    /// their reports. On timeout, the ones that did leave are kept for a later call.
    pub fn wait(&self, dev: u32, queues: usize, timeout: Duration) -> Result<Vec<Gone>> {
        let deadline = Instant::now() + timeout;
        let mut g = self.gone.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if g.iter().filter(|x| x.dev_id == dev).count() >= queues {
                let (mine, rest): (Vec<Gone>, Vec<Gone>) =
                    std::mem::take(&mut *g).into_iter().partition(|x| x.dev_id == dev);
                *g = rest;
                return Ok(mine);
            }
            let now = Instant::now();
            if now >= deadline {
                let left = g.iter().filter(|x| x.dev_id == dev).count();
                return Err(Error::timeout(format!(
                    "device {dev}: only {left} of its {queues} queues ended within {timeout:?}"
                )));
            }
            g = self.cv.wait_timeout(g, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Takes every report left: queues of devices nobody waits for (the device went away on
    /// its own: deleted from outside, or failed). The service calls it under the same lock as
    /// its waits, so it never takes a report a wait is about to claim.
    pub fn take_all(&self) -> Vec<Gone> {
        std::mem::take(&mut *self.gone.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

pub struct CoreConfig {
    /// The CPU this core's thread is pinned to; names it in errors and logs.
    pub cpu: usize,
    pub sqpoll: Option<SqPoll>,
}

/// A queue on the core, with what it holds of the ring's tables.
struct Seat {
    queue: Queue,
    files: (u32, u32),
    bufs: (u32, u32),
    /// Batch: the add's reply waits for PREP's completion.
    reply: Option<mpsc::Sender<Result<String>>>,
}

pub struct Core {
    // Drop order matters: the ring goes first, cancelling every ublk command and backend op
    // that still points into the queues' descriptor maps and buffers.
    ring: Ring,
    seats: Vec<Option<Seat>>,
    files: RangeAlloc,
    bufs: RangeAlloc,
    cfg: CoreConfig,
    mailbox: Arc<Mailbox>,
    departures: Arc<Departures>,
    cqes: Vec<(u64, i32, u32)>,
    wake_buf: u64,
    stopping: bool,
    /// The clock, read once per loop turn: all completions of a turn share it.
    now_ns: u64,
    /// Bounds the core's own log lines (unexpected completions).
    log_budget: RateLimit,
    /// Latency mode: the last turn dispatched completions (polling only follows busy turns).
    turn_busy: bool,
    /// Polls in a row that ran out; past `POLL_PROBE` only every `POLL_PROBE`th busy turn polls.
    poll_misses: u32,
    turns: u32,
    /// The longest poll its seated queues ask for (µs), kept as seats come and go so that no
    /// loop turn walks the seats for it.
    poll_us: u32,
    /// The once-a-second timer's timespec (boxed: the kernel reads it when the SQE is issued).
    tick: Box<types::Timespec>,
    /// Adds waiting for their answer, and whether a queue may be winding down: the loop turn
    /// walks the seats for either only when there is one, not once per turn for every queue.
    awaiting_adds: usize,
    check_release: bool,
}

/// After this many polls in a row that found nothing, poll on one busy turn in this many.
const POLL_PROBE: u32 = 8;

pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the local timespec (a vDSO call, no syscall).
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl Core {
    /// Builds the ring and its empty tables on the calling thread (the thread that will serve
    /// it: SINGLE_ISSUER, and each ublk I/O slot is bound to the task that fetched it).
    fn new(cfg: CoreConfig, mailbox: Arc<Mailbox>, departures: Arc<Departures>) -> Result<Core> {
        let ring = Ring::new(SQ_ENTRIES, CQ_ENTRIES, cfg.sqpoll)?;
        let file_slots = file_slots();
        ring.uring
            .submitter()
            .register_files_sparse(file_slots)
            .map_err(|e| Error::os("register sparse file table", e))?;
        ring.uring
            .submitter()
            .register_buffers_sparse(MAX_BUFFER_SLOTS)
            .map_err(|e| Error::os("register sparse buffer table", e))?;
        let mut core = Core {
            ring,
            seats: Vec::new(),
            files: RangeAlloc::new(file_slots),
            bufs: RangeAlloc::new(MAX_BUFFER_SLOTS),
            cfg,
            mailbox,
            departures,
            cqes: Vec::with_capacity(CQ_ENTRIES as usize),
            wake_buf: 0,
            stopping: false,
            now_ns: monotonic_ns(),
            log_budget: RateLimit::default(),
            turn_busy: false,
            poll_misses: 0,
            turns: 0,
            poll_us: 0,
            tick: Box::new(types::Timespec::new().sec(1)),
            awaiting_adds: 0,
            check_release: false,
        };
        core.arm_wake();
        core.arm_tick();
        Ok(core)
    }

    /// The slow-I/O check's timer: once a second, so a core waiting on a stuck backend still
    /// looks at its requests' ages.
    fn arm_tick(&mut self) {
        let ud = UserData::new(u16::MAX, 0, Op::Tick, 0);
        let sqe = opcode::Timeout::new(&*self.tick).build().user_data(ud.encode());
        // SAFETY: the timespec is boxed in the Core, which drops its ring first.
        unsafe { self.ring.push(&sqe) };
    }

    fn tick(&mut self) {
        let now = monotonic_ns();
        for s in self.seats.iter_mut().flatten() {
            s.queue.check_slow(now);
        }
        if !self.stopping {
            self.arm_tick();
        }
    }

    fn arm_wake(&mut self) {
        let ud = UserData::new(u16::MAX, 0, Op::Wake, 0);
        let sqe =
            opcode::PollAdd::new(types::Fd(self.mailbox.wake.as_raw_fd()), libc::POLLIN as u32)
                .build()
                .user_data(ud.encode());
        // SAFETY: poll references no memory of ours; the eventfd lives in the mailbox, which
        // this core holds for as long as its ring.
        unsafe { self.ring.push(&sqe) };
    }

    /// Sets a queue up in a free seat and hands its tags to the driver.
    fn add(&mut self, cfg: QueueConfig, target: &Arc<dyn Target>) -> Result<usize> {
        let slot = match self.seats.iter().position(Option::is_none) {
            Some(s) => s,
            None if self.seats.len() < MAX_QUEUES => {
                self.seats.push(None);
                self.seats.len() - 1
            }
            None => {
                return Err(Error::exhausted(format!(
                    "CPU {} serves {MAX_QUEUES} queues already: add CPUs to the service",
                    self.cfg.cpu
                )))
            }
        };
        let nfiles = 1 + cfg.files.len() as u32;
        let nbufs = cfg.mode.buffer_slots(cfg.owned_tags());
        let files = self.files.take(nfiles).ok_or_else(|| {
            Error::exhausted(format!("CPU {}: its ring's file table is full", self.cfg.cpu))
        })?;
        let Some(bufs) = self.bufs.take(nbufs) else {
            self.files.give(files, nfiles);
            return Err(Error::exhausted(format!(
                "CPU {}: its ring's fixed-buffer table ({MAX_BUFFER_SLOTS} slots, shared by \
                 every queue on it) has no {nbufs} free slots: lower --depth or use other --cpus",
                self.cfg.cpu
            )));
        };
        let at = Placement {
            slot: slot as u16,
            file_base: files,
            buf_base: bufs as u16,
            bgid: slot as u16,
        };
        let q = cfg.q;
        let handler = target.queue_handler(cfg.q, cfg.depth);
        let queue = handler.and_then(|h| Queue::new(cfg, at, h, &self.ring));
        let mut queue = match queue {
            Ok(qu) => qu,
            Err(e) => {
                self.clear_tables((files, nfiles), (bufs, nbufs));
                return Err(e.queue(q));
            }
        };
        queue.start(&mut self.ring);
        self.seats[slot] =
            Some(Seat { queue, files: (files, nfiles), bufs: (bufs, nbufs), reply: None });
        self.seats_changed();
        Ok(slot)
    }

    /// Takes a leaving queue's ranges back: its files and buffers are unregistered first, so
    /// nothing of it stays reachable through the ring.
    fn clear_tables(&mut self, files: (u32, u32), bufs: (u32, u32)) {
        let none = vec![-1; files.1 as usize];
        let _ = self.ring.uring.submitter().register_files_update(files.0, &none);
        let empty =
            vec![libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; bufs.1 as usize];
        // SAFETY: empty iovecs register nothing: they clear the slots.
        let _ =
            unsafe { self.ring.uring.submitter().register_buffers_update(bufs.0, &empty, None) };
        self.files.give(files.0, files.1);
        self.bufs.give(bufs.0, bufs.1);
    }

    /// Reads the mailbox: new queues, or the stop.
    fn read_mailbox(&mut self) {
        // SAFETY: reading 8 bytes into an 8-byte field from the eventfd the mailbox owns.
        unsafe {
            libc::read(self.mailbox.wake.as_raw_fd(), &mut self.wake_buf as *mut u64 as *mut _, 8)
        };
        if self.mailbox.stop.load(Ordering::Acquire) && !self.stopping {
            self.stopping = true;
            self.check_release = true;
            for s in self.seats.iter_mut().flatten() {
                s.queue.stop(&mut self.ring);
            }
        }
        let cmds =
            std::mem::take(&mut *self.mailbox.cmds.lock().unwrap_or_else(|e| e.into_inner()));
        for cmd in cmds {
            match cmd {
                CoreCmd::Add { cfg, target, reply } => {
                    if self.stopping {
                        let _ = reply.send(Err(Error::failed("the service is stopping")));
                        continue;
                    }
                    match self.add(cfg, &target) {
                        Ok(slot) => {
                            if let Some(s) = self.seats[slot].as_mut() {
                                s.reply = Some(reply);
                                self.awaiting_adds += 1;
                            }
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    }
                }
                CoreCmd::Cancel { dev } => {
                    for s in self.seats.iter_mut().flatten() {
                        if s.queue.id().0 == dev {
                            s.queue.cancel_backend(&mut self.ring);
                        }
                    }
                }
            }
        }
        if !self.stopping {
            self.arm_wake();
        }
    }

    /// Answers adds whose queue is ready (per-tag at once, batch once PREP completed); a
    /// refused PREP fails the add and the queue leaves.
    fn answer_adds(&mut self) {
        if self.awaiting_adds == 0 {
            return;
        }
        let describe = |q: &Queue| self_describe(&self.ring, self.cfg.sqpoll.is_some(), q);
        let mut failed = Vec::new();
        for (slot, seat) in self.seats.iter_mut().enumerate() {
            let Some(s) = seat else { continue };
            let Some(res) = s.queue.prepped() else { continue };
            if let Some(reply) = s.reply.take() {
                self.awaiting_adds = self.awaiting_adds.saturating_sub(1);
                if res == 0 {
                    let _ = reply.send(Ok(describe(&s.queue)));
                } else {
                    let _ = reply.send(Err(Error::errno("PREP_IO_CMDS", res)));
                    failed.push(slot);
                }
            }
        }
        for slot in failed {
            if let Some(s) = self.seats[slot].as_mut() {
                s.queue.stop(&mut self.ring);
                self.check_release = true;
            }
        }
    }

    fn seats_changed(&mut self) {
        self.poll_us = self.seats.iter().flatten().map(|s| s.queue.poll_us()).max().unwrap_or(0);
    }

    /// Lets every queue go that has nothing left in flight on the ring.
    fn release_finished(&mut self) {
        if !self.check_release {
            return;
        }
        for slot in 0..self.seats.len() {
            let done = self.seats[slot].as_ref().is_some_and(|s| s.queue.removable());
            if !done {
                continue;
            }
            if let Some(s) = self.seats[slot].take() {
                self.clear_tables(s.files, s.bufs);
                if let Some(reply) = s.reply {
                    self.awaiting_adds = self.awaiting_adds.saturating_sub(1);
                    let _ = reply.send(Err(Error::failed("the queue ended during setup")));
                }
                let (dev_id, q) = s.queue.id();
                let exit = s.queue.exit();
                let io = s.queue.unbind_buf_group(&self.ring);
                drop(s.queue);
                if let Err(e) = io {
                    log::warn!("CPU {}: dev {dev_id} queue {q}: {e}", self.cfg.cpu);
                }
                self.departures.push(Gone { dev_id, q, exit, error: None });
                self.seats_changed();
            }
        }
        // Keep looking while a queue still drains.
        self.check_release = self.seats.iter().flatten().any(|s| s.queue.winding_down());
    }

    fn check_ring(&self) -> Result<()> {
        match self.ring.broken() {
            None => Ok(()),
            Some(e) => Err(Error::os(
                "queue an SQE",
                io::Error::from_raw_os_error(e.raw_os_error().unwrap_or(libc::EIO)),
            )),
        }
    }

    /// One `io_uring_enter`: submits what is queued and waits for `want` completions.
    fn enter(&mut self, want: u32) -> Result<()> {
        if let Some(s) = self.seats.iter().flatten().next() {
            QueueStats::bump(&s.queue.stats().ring_enters, 1);
        }
        match self.ring.submit_and_wait(want) {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)) =>
            {
                Ok(())
            }
            Err(e) => Err(Error::os("io_uring_enter", e)),
        }
    }

    /// Serves until stopped (through the mailbox) and every queue is finished.
    fn run(&mut self) -> Result<()> {
        loop {
            // A COMMIT completes while it is submitted: wait for one completion more than
            // each, or the wait returns at once for the COMMITs alone.
            let mut want = 1;
            for s in self.seats.iter_mut().flatten() {
                want += u32::from(s.queue.push_commits(&mut self.ring));
            }
            if self.stopping && self.seats.iter().flatten().all(|s| s.queue.finished()) {
                // Hand the last commits to the kernel before the ring goes away.
                let _ = self.ring.uring.submit();
                return Ok(());
            }
            self.check_ring()?;
            match self.poll_window() {
                Some(ns) if self.poll(ns)? => {}
                _ => self.enter(want)?,
            }
            let now = monotonic_ns();
            for s in self.seats.iter().flatten() {
                let st = s.queue.stats();
                if st.io_now.load(Ordering::Relaxed) > 0 {
                    QueueStats::bump(&st.io_time_ns, now.saturating_sub(self.now_ns));
                }
            }
            self.now_ns = now;
            self.drain();
            self.answer_adds();
            self.release_finished();
        }
    }

    /// Latency mode: how long to poll before this turn's sleep, if at all. Only after a busy
    /// turn, only while a seated queue asks for it, and rarely once polls keep running out.
    fn poll_window(&mut self) -> Option<u64> {
        if !self.turn_busy || self.stopping {
            return None;
        }
        let us = self.poll_us;
        if us == 0 {
            return None;
        }
        self.turns = self.turns.wrapping_add(1);
        if self.poll_misses >= POLL_PROBE && !self.turns.is_multiple_of(POLL_PROBE) {
            return None;
        }
        Some(u64::from(us) * 1000)
    }

    /// Submits, then reaps without sleeping for up to `ns`: true if a completion arrived (the
    /// wake-up a sleep would have cost is saved), false if the window ran out.
    fn poll(&mut self, ns: u64) -> Result<bool> {
        let t0 = monotonic_ns();
        let mut now = t0;
        let hit = loop {
            // Counted with the other enters: a poll is an io_uring_enter too.
            self.enter(0)?;
            if !self.ring.uring.completion().is_empty() {
                break true;
            }
            now = monotonic_ns();
            if now.saturating_sub(t0) >= ns {
                break false;
            }
            std::hint::spin_loop();
        };
        if let Some(s) = self.seats.iter().flatten().next() {
            let st = s.queue.stats();
            QueueStats::bump(&st.poll_ns, now.saturating_sub(t0));
            QueueStats::bump(if hit { &st.poll_hits } else { &st.poll_misses }, 1);
        }
        self.poll_misses = if hit { 0 } else { self.poll_misses.saturating_add(1) };
        Ok(hit)
    }

    /// Copies a bounded batch of CQEs out of the ring, then dispatches each.
    fn drain(&mut self) {
        self.cqes.clear();
        let cap = self.cqes.capacity();
        self.cqes.extend(
            self.ring.uring.completion().take(cap).map(|c| (c.user_data(), c.result(), c.flags())),
        );
        let wake = UserData::new(u16::MAX, 0, Op::Wake, 0).encode();
        let tick = UserData::new(u16::MAX, 0, Op::Tick, 0).encode();
        self.turn_busy = self.cqes.iter().any(|c| c.0 != wake && c.0 != tick);
        for i in 0..self.cqes.len() {
            let (raw, res, flags) = self.cqes[i];
            self.dispatch(raw, res, flags);
        }
    }

    fn dispatch(&mut self, raw: u64, res: i32, flags: u32) {
        let Some(ud) = UserData::decode(raw) else {
            return self.unexpected(raw, res, None);
        };
        if ud.op == Op::Wake {
            return self.read_mailbox();
        }
        if ud.op == Op::Tick {
            return self.tick();
        }
        let now = self.now_ns;
        let Some(Some(s)) = self.seats.get_mut(usize::from(ud.queue)) else {
            return self.unexpected(raw, res, None);
        };
        if !s.queue.complete(&mut self.ring, ud, res, flags, now) {
            self.unexpected(raw, res, Some(usize::from(ud.queue)));
        } else if s.queue.winding_down() {
            self.check_release = true;
        }
    }

    /// A completion that matches nothing in flight: never applied, always logged and counted.
    fn unexpected(&mut self, raw: u64, res: i32, slot: Option<usize>) {
        let seat = slot.and_then(|i| self.seats.get(i)).and_then(Option::as_ref);
        if let Some(s) = seat.or(self.seats.iter().flatten().next()) {
            QueueStats::bump(&s.queue.stats().unexpected_completions, 1);
        }
        if let Some(dropped) = self.log_budget.admit(self.now_ns) {
            log::warn!(
                "CPU {}: unexpected completion user_data {raw:#x} result {res} ({dropped} similar lines dropped before)",
                self.cfg.cpu
            );
        }
    }

    /// Every queue still seated leaves with the core: their reports, to be given once the
    /// ring is gone.
    fn abandon(&mut self, why: Option<String>) -> Vec<Gone> {
        let mut out = Vec::new();
        for s in self.seats.iter_mut().flatten() {
            if let Some(reply) = s.reply.take() {
                let _ = reply.send(Err(Error::failed("the core stopped during setup")));
            }
            let (dev_id, q) = s.queue.id();
            out.push(Gone { dev_id, q, exit: s.queue.exit(), error: why.clone() });
        }
        out
    }
}

fn self_describe(ring: &Ring, sqpoll: bool, q: &Queue) -> String {
    format!(
        "ring {}{}; {}",
        if sqpoll { "SQPOLL" } else { "DEFER_TASKRUN" },
        if ring.registered() { ", ring fd registered" } else { "" },
        q.describe()
    )
}

/// A running core thread.
struct CoreThread {
    cpu: usize,
    mailbox: Arc<Mailbox>,
    handle: Option<std::thread::JoinHandle<()>>,
}

/// One core per CPU of the service: where every device's queues are served.
pub struct CorePool {
    cores: Vec<CoreThread>,
    departures: Arc<Departures>,
}

/// How long a core may take to set a queue up and have the driver take its tags.
const ADD_TIMEOUT: Duration = Duration::from_secs(30);

impl CorePool {
    /// Starts one pinned core thread per CPU; with SQPOLL the rings share the first one's SQ
    /// thread. Returns once every ring is up.
    pub fn start(cpus: &[usize], sqpoll: Option<SqPoll>) -> Result<CorePool> {
        let departures = Arc::new(Departures::default());
        let mut pool = CorePool { cores: Vec::new(), departures };
        let mut sqpoll = sqpoll;
        for &cpu in cpus {
            let mailbox = Arc::new(Mailbox::new()?);
            let (tx, rx) = mpsc::channel::<Result<RawFd>>();
            let cfg = CoreConfig { cpu, sqpoll };
            let (mb, dep) = (Arc::clone(&mailbox), Arc::clone(&pool.departures));
            let handle = std::thread::Builder::new()
                .name(format!("ublk-core{cpu}"))
                .spawn(move || core_main(cfg, mb, dep, tx))
                .map_err(|e| Error::os("spawn core thread", e))?;
            pool.cores.push(CoreThread { cpu, mailbox, handle: Some(handle) });
            let fd = rx.recv_timeout(ADD_TIMEOUT).map_err(|_| {
                Error::timeout(format!("CPU {cpu}: the core thread did not start"))
            })??;
            if let Some(p) = sqpoll.as_mut() {
                // The other rings attach to the first one's SQ thread.
                p.attach_to.get_or_insert(fd);
            }
        }
        Ok(pool)
    }

    pub fn cpus(&self) -> Vec<usize> {
        self.cores.iter().map(|c| c.cpu).collect()
    }

    pub fn departures(&self) -> &Departures {
        &self.departures
    }

    /// Seats a queue on the core of `cpu` and waits until the driver has its tags.
    pub fn add_queue(
        &self,
        cpu: usize,
        cfg: QueueConfig,
        target: Arc<dyn Target>,
    ) -> Result<String> {
        let Some(core) = self.cores.iter().find(|c| c.cpu == cpu) else {
            return Err(Error::invalid(format!("CPU {cpu} is not one of the service's CPUs")));
        };
        if core.handle.as_ref().is_none_or(|h| h.is_finished()) {
            return Err(Error::failed(format!("CPU {cpu}: its core thread has ended")));
        }
        let q = cfg.q;
        let (tx, rx) = mpsc::channel();
        core.mailbox.send(CoreCmd::Add { cfg, target, reply: tx });
        rx.recv_timeout(ADD_TIMEOUT).map_err(|_| {
            Error::timeout(format!(
                "queue {q}: CPU {cpu}'s core did not set it up within {ADD_TIMEOUT:?}"
            ))
        })?
    }

    /// Asks every core to cancel the backend operations of device `dev`'s queues.
    pub fn cancel_backend(&self, dev: u32) {
        (self.canceller(dev))();
    }

    /// [`CorePool::cancel_backend`] for another thread (a drain watchdog).
    pub fn canceller(&self, dev: u32) -> impl FnOnce() + Send + 'static {
        let boxes: Vec<Arc<Mailbox>> = self.cores.iter().map(|c| Arc::clone(&c.mailbox)).collect();
        move || {
            for b in boxes {
                b.send(CoreCmd::Cancel { dev });
            }
        }
    }

    /// Stops every core (each ends once no backend I/O is in flight) and joins them.
    pub fn shutdown(&mut self) {
        for c in &self.cores {
            c.mailbox.stop();
        }
        for c in &mut self.cores {
            if let Some(h) = c.handle.take() {
                let _ = h.join();
            }
        }
    }
}

impl Drop for CorePool {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// PR_SET_IO_FLUSHER (linux/prctl.h, 5.6+); not exported by the libc crate.
const PR_SET_IO_FLUSHER: libc::c_int = 57;

fn core_main(
    cfg: CoreConfig,
    mailbox: Arc<Mailbox>,
    departures: Arc<Departures>,
    ready: mpsc::Sender<Result<RawFd>>,
) {
    let cpu = cfg.cpu;
    let setup = || -> Result<Core> {
        crate::cpus::pin_current_thread(cpu).map_err(|e| Error::os("sched_setaffinity", e))?;
        // Lets the core thread allocate memory while the block layer writes back through us.
        // SAFETY: prctl with integer arguments only. Failure (no CAP_SYS_RESOURCE) is harmless.
        unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) };
        Core::new(cfg, mailbox, departures)
    };
    let mut core = match setup() {
        Ok(c) => {
            let _ = ready.send(Ok(c.ring.fd()));
            c
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    drop(ready);
    let r = core.run();
    let why = r.err().map(|e| {
        let m = format!("CPU {cpu}: core stopped: {e}");
        log::error!("{m}");
        m
    });
    let gone = core.abandon(why);
    let departures = Arc::clone(&core.departures);
    // The ring (and with it every command of every device on it) goes first, then the queues.
    drop(core);
    for g in gone {
        departures.push(g);
    }
}
