//! A queue's io_uring: built with the fastest setup flags the kernel accepts, and entered
//! through its registered ring fd, which saves the file-table lookup and reference count of
//! every `io_uring_enter`.

use std::io;
use std::os::fd::AsRawFd;

use io_uring::{squeue, IoUring};

use crate::ctrl::ring_setup_error;
use crate::error::Result;

/// io_uring UAPI values the io-uring crate does not export.
const IORING_REGISTER_RING_FDS: libc::c_uint = 20;
const IORING_ENTER_GETEVENTS: libc::c_uint = 1 << 0;
const IORING_ENTER_SQ_WAKEUP: libc::c_uint = 1 << 1;
const IORING_ENTER_REGISTERED_RING: libc::c_uint = 1 << 4;

/// `struct io_uring_rsrc_update`.
#[repr(C)]
struct RsrcUpdate {
    offset: u32,
    resv: u32,
    data: u64,
}

/// SQPOLL settings of a queue ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SqPoll {
    /// How long the SQ thread spins without work before it sleeps.
    pub idle_ms: u32,
    /// Pin the SQ thread to this CPU (`IORING_SETUP_SQ_AFF`).
    pub cpu: Option<u32>,
    /// Share the SQ thread of this ring (`IORING_SETUP_ATTACH_WQ`).
    pub attach_to: Option<i32>,
}

/// Builds a queue ring: SINGLE_ISSUER | DEFER_TASKRUN | COOP_TASKRUN where the kernel has them
/// (a plain ring before 6.1), or SQPOLL when asked.
pub fn build(sq: u32, cq: u32, sqpoll: Option<SqPoll>) -> Result<IoUring> {
    if let Some(p) = sqpoll {
        let mut b = IoUring::builder();
        b.setup_cqsize(cq).setup_sqpoll(p.idle_ms).setup_single_issuer();
        if let Some(cpu) = p.cpu {
            b.setup_sqpoll_cpu(cpu);
        }
        if let Some(fd) = p.attach_to {
            b.setup_attach_wq(fd);
        }
        return b.build(sq).map_err(ring_setup_error);
    }
    let fast = IoUring::builder()
        .setup_cqsize(cq)
        .setup_coop_taskrun()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(sq);
    match fast {
        Ok(r) => Ok(r),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            IoUring::builder().setup_cqsize(cq).build(sq).map_err(ring_setup_error)
        }
        Err(e) => Err(ring_setup_error(e)),
    }
}

/// How this thread enters its ring.
pub struct Enter {
    fd: libc::c_int,
    flags: libc::c_uint,
    sqpoll: bool,
}

impl Enter {
    /// Registers the ring's fd for the calling thread (ring fds are registered per task, so
    /// this runs on the thread that will enter); falls back to the plain fd before 5.18.
    pub fn new(ring: &IoUring) -> Enter {
        let raw = ring.as_raw_fd();
        let sqpoll = ring.params().is_setup_sqpoll();
        let mut up = RsrcUpdate { offset: u32::MAX, resv: 0, data: raw as u64 };
        // SAFETY: IORING_REGISTER_RING_FDS reads and writes back one io_uring_rsrc_update,
        // which `up` is, for the duration of the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_io_uring_register,
                raw,
                IORING_REGISTER_RING_FDS,
                &mut up as *mut RsrcUpdate,
                1,
            )
        };
        if r == 1 {
            Enter { fd: up.offset as libc::c_int, flags: IORING_ENTER_REGISTERED_RING, sqpoll }
        } else {
            Enter { fd: raw, flags: 0, sqpoll }
        }
    }

    pub fn registered(&self) -> bool {
        self.flags & IORING_ENTER_REGISTERED_RING != 0
    }

    /// Submits what is queued and waits for at least `want` completions: one syscall. With
    /// `want` 0 it returns at once, after running the ring's deferred completion work (so a
    /// poll sees every completion that is ready).
    pub fn submit_and_wait(&self, ring: &mut IoUring, want: u32) -> io::Result<usize> {
        let mut sq = ring.submission();
        sq.sync();
        let pending = sq.len() as libc::c_uint;
        let mut flags = self.flags;
        let to_submit = if self.sqpoll {
            // The SQ thread submits; wake it if it went to sleep (the fence orders our tail
            // store before reading its flag, as liburing does).
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            if sq.need_wakeup() {
                flags |= IORING_ENTER_SQ_WAKEUP;
            }
            0
        } else {
            pending
        };
        drop(sq);
        // GETEVENTS also with `want` 0: DEFER_TASKRUN posts completions only then.
        flags |= IORING_ENTER_GETEVENTS;
        // SAFETY: io_uring_enter on our own ring with no signal mask or extended argument;
        // every SQE it submits was pushed under Ring::push's contract.
        let r = unsafe {
            libc::syscall(
                libc::SYS_io_uring_enter,
                self.fd,
                to_submit,
                want,
                flags,
                std::ptr::null::<libc::c_void>(),
                0usize,
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as usize)
        }
    }
}

/// How often a push retries a full submission queue before it calls the ring broken (an
/// SQPOLL thread may need a moment to take entries; a plain ring frees them at once).
const PUSH_TRIES: u32 = 10_000;

/// A core's io_uring with the way its thread enters it. A failed submission is a value: the
/// first error is kept (`broken`) for the loop to end with, never a panic.
pub struct Ring {
    pub uring: IoUring,
    enter: Enter,
    broken: Option<io::Error>,
}

impl Ring {
    /// Builds the ring and registers its fd for the calling thread, which must be the thread
    /// that will submit on it (SINGLE_ISSUER, and ublk's one-task-per-queue rule).
    pub fn new(sq: u32, cq: u32, sqpoll: Option<SqPoll>) -> Result<Ring> {
        let uring = build(sq, cq, sqpoll)?;
        let enter = Enter::new(&uring);
        Ok(Ring { uring, enter, broken: None })
    }

    /// Queues one SQE, submitting first if the queue is full. False (and the ring is broken)
    /// if the kernel refuses to take entries.
    ///
    /// # Safety
    /// Whatever `sqe` points at must stay valid until its CQE is reaped.
    pub unsafe fn push(&mut self, sqe: &squeue::Entry) -> bool {
        for i in 0..PUSH_TRIES {
            // SAFETY: forwarded from the caller.
            if unsafe { self.uring.submission().push(sqe) }.is_ok() {
                return true;
            }
            match self.uring.submit() {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) => {}
                Err(e) => {
                    self.broken.get_or_insert(e);
                    return false;
                }
            }
            if i > 0 {
                std::thread::yield_now();
            }
        }
        self.broken.get_or_insert(io::Error::from_raw_os_error(libc::EBUSY));
        false
    }

    /// Submits what is queued and waits for at least `want` completions: one syscall.
    pub fn submit_and_wait(&mut self, want: u32) -> io::Result<usize> {
        self.enter.submit_and_wait(&mut self.uring, want)
    }

    /// The first error that kept an SQE off the ring, if any.
    pub fn broken(&self) -> Option<&io::Error> {
        self.broken.as_ref()
    }

    pub fn registered(&self) -> bool {
        self.enter.registered()
    }

    pub fn fd(&self) -> std::os::fd::RawFd {
        self.uring.as_raw_fd()
    }
}
