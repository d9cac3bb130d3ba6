//! A core: one pinned thread and one io_uring serving every queue given to it. The ring carries
//! the ublk commands and the backend I/O of all of them; its fixed-file table, fixed-buffer
//! table, provided-buffer groups and `user_data` space are partitioned among the queues
//! (`Placement`).
//!
//! The loop: queue each batch queue's staged COMMIT → one `io_uring_enter` that submits
//! everything and waits → copy a bounded batch of CQEs out → dispatch each to its queue (no
//! recursion: handlers only queue SQEs) → repeat, until every queue has finished.

use std::io;
use std::os::fd::RawFd;

use io_uring::{opcode, types};

use crate::error::{Error, Result};
use crate::op::{Op, UserData};
use crate::queue::{Placement, Queue, QueueConfig, QueueExit};
use crate::ring::{Ring, SqPoll};
use crate::stats::QueueStats;
use crate::target::QueueHandler;

/// The kernel's limit on a ring's fixed-buffer table (`IORING_MAX_REG_BUFFERS`); every queue on
/// the ring shares it, and AUTO_BUF_REG indexes are 16 bits.
pub const MAX_BUFFER_SLOTS: u32 = 1 << 14;
/// io_uring's limit on SQ entries (`IORING_MAX_ENTRIES`).
const MAX_SQ_ENTRIES: u32 = 1 << 15;

pub struct CoreConfig {
    /// Names the core in errors and logs.
    pub cpu: usize,
    pub sqpoll: Option<SqPoll>,
    /// An eventfd: readable means "stop every queue once no backend I/O is in flight".
    pub wake_fd: RawFd,
}

pub struct Core {
    // Drop order matters: the ring goes first, cancelling every ublk command and backend op
    // that still points into the queues' descriptor maps and buffers.
    ring: Ring,
    queues: Vec<Queue>,
    cfg: CoreConfig,
    cqes: Vec<(u64, i32, u32)>,
    wake_buf: u64,
    stopping: bool,
    /// The clock, read once per loop turn: all completions of a turn share it.
    now_ns: u64,
}

pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the local timespec (a vDSO call, no syscall).
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl Core {
    /// Builds the ring on the calling thread (the thread that will serve it: SINGLE_ISSUER, and
    /// each ublk I/O slot is bound to the task that fetched it) and sets every queue up on it.
    pub fn new(cfg: CoreConfig, queues: Vec<(QueueConfig, Box<dyn QueueHandler>)>) -> Result<Core> {
        let depth: u32 = queues.iter().map(|(c, _)| u32::from(c.depth)).sum();
        let files: u32 = queues.iter().map(|(c, _)| 1 + c.files.len() as u32).sum();
        let bufs: u32 = queues.iter().map(|(c, _)| c.mode.buffer_slots(c.depth)).sum();
        if bufs > MAX_BUFFER_SLOTS {
            return Err(Error::Invalid(format!(
                "CPU {}: its queues need {bufs} fixed-buffer slots, more than one ring has \
                 ({MAX_BUFFER_SLOTS}): lower --depth or spread the queues over more --cpus",
                cfg.cpu
            )));
        }
        // Room for one ublk command plus a backend op per tag, with headroom for resubmits.
        let sq = (2 * depth).next_power_of_two().min(MAX_SQ_ENTRIES);
        let cq = sq * 2;
        let ring = Ring::new(sq, cq, cfg.sqpoll)?;
        ring.uring
            .submitter()
            .register_files_sparse(files)
            .map_err(|e| Error::os("register sparse file table", e))?;
        ring.uring
            .submitter()
            .register_buffers_sparse(bufs)
            .map_err(|e| Error::os("register sparse buffer table", e))?;
        let mut placed = Vec::with_capacity(queues.len());
        let (mut file_base, mut buf_base) = (0u32, 0u32);
        for (slot, (qc, handler)) in queues.into_iter().enumerate() {
            let at = Placement {
                slot: slot as u16,
                file_base,
                buf_base: buf_base as u16,
                bgid: slot as u16,
            };
            file_base += 1 + qc.files.len() as u32;
            buf_base += qc.mode.buffer_slots(qc.depth);
            let q = qc.q;
            placed.push(Queue::new(qc, at, handler, &ring).map_err(|e| e.queue(q))?);
        }
        Ok(Core {
            ring,
            queues: placed,
            cfg,
            cqes: Vec::with_capacity(cq as usize),
            wake_buf: 0,
            stopping: false,
            now_ns: monotonic_ns(),
        })
    }

    /// The ring's fd (for other cores to share its SQPOLL thread).
    pub fn ring_fd(&self) -> RawFd {
        self.ring.fd()
    }

    /// How the core is set up, for the daemon's log.
    pub fn describe(&self) -> String {
        format!(
            "ring {}{}, {} queue(s); {}",
            if self.cfg.sqpoll.is_some() { "SQPOLL" } else { "DEFER_TASKRUN" },
            if self.ring.registered() { ", ring fd registered" } else { "" },
            self.queues.len(),
            self.queues.first().map_or(String::new(), Queue::describe),
        )
    }

    /// Hands every queue's tags to the driver and waits until each batch queue's PREP has
    /// completed (the driver completes it inline), so a refused PREP fails the setup instead
    /// of leaving START_DEV waiting forever.
    pub fn start(&mut self) -> Result<()> {
        for q in &mut self.queues {
            q.start(&mut self.ring);
        }
        self.arm_wake();
        for _ in 0..100 {
            let pending = self.queues.iter().any(|q| q.prepped().is_none());
            if !pending {
                break;
            }
            self.enter(1)?;
            self.drain();
        }
        for q in &self.queues {
            match q.prepped() {
                Some(0) => {}
                Some(res) => return Err(Error::errno("PREP_IO_CMDS", res)),
                None => return Err(Error::errno("PREP_IO_CMDS (no completion)", -libc::ETIMEDOUT)),
            }
        }
        self.check_ring()
    }

    fn arm_wake(&mut self) {
        let ud = UserData::new(u16::MAX, 0, Op::Wake, 0);
        let sqe = opcode::PollAdd::new(types::Fd(self.cfg.wake_fd), libc::POLLIN as u32)
            .build()
            .user_data(ud.encode());
        // SAFETY: poll references no memory of ours; the eventfd outlives the core (owned by
        // the device, which joins this thread before closing it).
        unsafe { self.ring.push(&sqe) };
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
        if let Some(q) = self.queues.first() {
            QueueStats::bump(&q.stats().ring_enters, 1);
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

    /// Serves until every queue has finished: all its tags aborted by the driver, or a stop
    /// asked for and no backend I/O in flight.
    pub fn run(&mut self) -> Result<QueueExit> {
        loop {
            // A COMMIT completes while it is submitted: wait for one completion more than
            // each, or the wait returns at once for the COMMITs alone.
            let mut want = 1;
            for q in &mut self.queues {
                want += u32::from(q.push_commits(&mut self.ring));
            }
            if self.queues.iter().all(Queue::finished) {
                // Hand the last commits to the kernel before the ring goes away.
                let _ = self.ring.uring.submit();
                break;
            }
            self.check_ring()?;
            self.enter(want)?;
            let now = monotonic_ns();
            for q in &self.queues {
                let s = q.stats();
                if s.io_now.load(std::sync::atomic::Ordering::Relaxed) > 0 {
                    QueueStats::bump(&s.io_time_ns, now.saturating_sub(self.now_ns));
                }
            }
            self.now_ns = now;
            self.drain();
        }
        let mut total = QueueExit::default();
        for q in &self.queues {
            let x = q.exit();
            total.requests += x.requests;
            total.aborted_tags += x.aborted_tags;
        }
        Ok(total)
    }

    /// Copies a bounded batch of CQEs out of the ring, then dispatches each.
    fn drain(&mut self) {
        self.cqes.clear();
        let cap = self.cqes.capacity();
        self.cqes.extend(
            self.ring.uring.completion().take(cap).map(|c| (c.user_data(), c.result(), c.flags())),
        );
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
            self.stopping = true;
            for q in &mut self.queues {
                q.stop();
            }
            // Drain the eventfd so a later poll does not fire again at once.
            // SAFETY: reading 8 bytes into an 8-byte field from an eventfd we own.
            unsafe { libc::read(self.cfg.wake_fd, &mut self.wake_buf as *mut u64 as *mut _, 8) };
            return;
        }
        let now = self.now_ns;
        let Some(q) = self.queues.get_mut(usize::from(ud.queue)) else {
            return self.unexpected(raw, res, None);
        };
        if !q.complete(&mut self.ring, ud, res, flags, now) {
            self.unexpected(raw, res, Some(usize::from(ud.queue)));
        }
    }

    /// A completion that matches nothing in flight: never applied, always logged and counted.
    fn unexpected(&self, raw: u64, res: i32, queue: Option<usize>) {
        let q = queue.and_then(|i| self.queues.get(i)).or(self.queues.first());
        if let Some(q) = q {
            QueueStats::bump(&q.stats().unexpected_completions, 1);
        }
        eprintln!(
            "ublk-fast: CPU {}: unexpected completion user_data {raw:#x} result {res}{}",
            self.cfg.cpu,
            if self.stopping { " (stopping)" } else { "" }
        );
    }
}
