//! One queue's NBD connection, served on the queue's own ring: requests are held by the
//! handler ([`Flow::Held`]) from the moment they are queued for sending until their reply
//! arrives. One send (or send chain) and one receive are in flight at a time; sends are
//! gathered (headers and write data in one SENDMSG), so the stream is never interleaved.
//!
//! Zero copy: the requests' pages are fixed buffers of the ring, which only ring operations
//! can reach. A write's data goes out with WRITE_FIXED on the socket, linked behind a WRITEV
//! of the headers before it (a short one fails the link, and the rest is sent again from
//! where the stream stopped); a read's data comes in with READ_FIXED (see `rx`).
//!
//! When the connection drops, every request not yet answered is kept; the handler reconnects
//! on the ring (CONNECT and the handshake as ring operations, each bounded by a linked
//! timeout), with backoff, and sends them again in their original order. Past the reconnect
//! timeout, pending requests fail with EIO and new ones fail at once until the server is back.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use io_uring::{opcode, squeue, types};
use ublk_fast_engine::stats::QueueStats;
use ublk_fast_engine::target::{Flow, QueueHandler, Request, Submit};
use ublk_fast_engine::uapi::*;

use super::handshake::{Handshake, Step};
use super::rx::{Awaiting, Book, Next, Rx};
use super::wire;
use super::Shared;

/// Sub-op bytes of the queue-level operations (the token is always 0: one connection).
mod sub {
    pub const RECV: u8 = 1;
    /// A receive straight into a request's buffer.
    pub const RECV_DIRECT: u8 = 8;
    pub const SEND: u8 = 2;
    pub const CONNECT: u8 = 3;
    pub const HS_SEND: u8 = 4;
    pub const HS_RECV: u8 = 5;
    pub const TIMER: u8 = 6;
    /// The linked timeout of a connect or handshake step.
    pub const LINK_TIMEOUT: u8 = 7;
    /// TIMEOUT_REMOVE of the timer.
    pub const CANCEL: u8 = 9;
}

/// The tag value of the queue's own requests (the FLUSH and DISC of a clean end).
const OWN: u16 = u16::MAX;
/// How long a clean end waits for the server's answer to its FLUSH.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Most iovecs one send chain gathers (a header and maybe data per request).
const MAX_IOV: usize = 64;
/// Most operations one send chain links: SENDMSGs, and zero copy's WRITE_FIXEDs between them.
const MAX_TX_OPS: usize = 8;

/// One operation of a send chain.
#[derive(Clone, Copy)]
enum TxOp {
    /// SENDMSG (alone) or WRITEV (in a chain) of `iov[at..at + len]`.
    Msg { at: usize, len: usize },
    /// WRITE_FIXED of `len` bytes at offset `at` of the fixed buffer `idx`.
    Fixed { at: usize, len: usize, idx: u16 },
}
/// Bounds each connect and handshake step.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Not the handler's (or already answered).
    Idle,
    /// Waiting in the send queue (or partly sent).
    Queued,
    /// Sent whole; its reply has not come yet.
    Sent,
}

#[derive(Clone, Copy)]
struct Slot {
    req: Request,
    phase: Phase,
    /// The NBD handle of the current send: tag | sequence << 16.
    handle: u64,
    /// Send order, for resending in the original order.
    seq: u64,
    hdr: [u8; wire::REQUEST_LEN],
    /// Payload bytes that follow the header (writes).
    data: u32,
    ok: i32,
    /// When its last byte went out on the current connection (the core's turn time, ns);
    /// 0: not yet. Its reply then times the server's round trip.
    sent_ns: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Drain {
    No,
    /// Our FLUSH is queued or sent; its reply is awaited.
    Flush,
    /// Our DISC is queued or sent; the socket is shut once it is out.
    Disc,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Conn {
    Up,
    /// Lost: waiting for the last send/receive to come back before closing the socket.
    Closing,
    /// Waiting for the backoff timer.
    Waiting,
    /// A connect or handshake step is in flight.
    Connecting,
}

pub struct NbdQueue {
    shared: Arc<Shared>,
    q: u16,
    slots: Box<[Slot]>,
    /// Tags waiting to be sent, in order (bounded: each tag at most once).
    txq: std::collections::VecDeque<u16>,
    /// Bytes of the head of `txq` already sent.
    tx_off: usize,
    /// Operations of the send chain in flight.
    tx_ops: usize,
    iov: Box<[libc::iovec; MAX_IOV]>,
    msg: Box<libc::msghdr>,
    rx: Rx,
    rx_busy: bool,
    sock: Option<OwnedFd>,
    conn: Conn,
    seq: u64,
    /// When the connection was lost (ns), while it is not up.
    down_since: u64,
    /// Past the reconnect timeout: requests fail at once until the server is back.
    failing: bool,
    attempts: u32,
    hs: Option<Handshake>,
    hs_buf: Box<[u8]>,
    hs_len: usize,
    /// Queue-level operations of the reconnect path in flight (connect, steps, timeouts).
    rc_ops: u32,
    /// The current connect/handshake step failed (its CQE or its timeout's).
    step_failed: bool,
    timer: Box<types::Timespec>,
    /// The timer (backoff or drain) is in flight; and its removal.
    timer_busy: bool,
    cancel_busy: bool,
    step_timeout: Box<types::Timespec>,
    ended: bool,
    /// A clean end in progress: FLUSH (answered), then DISC (not answered), then close.
    drain: Drain,
    /// The header of the queue's own request (FLUSH or DISC), and its handle.
    own_hdr: [u8; wire::REQUEST_LEN],
    own_handle: u64,
    /// Scratch for resending in order (allocated once).
    order: Vec<u16>,
    /// Requests the lost connection had (partly) sent: sent again on the next one.
    resend: usize,
    /// The device must drain now (the service ends): pending requests fail, no reconnect.
    cancelled: bool,
}

impl NbdQueue {
    /// `zero_copy`: requests carry their pages as fixed buffers (`Request::buf_index`).
    pub fn new(
        shared: Arc<Shared>,
        q: u16,
        depth: u16,
        sock: OwnedFd,
        zero_copy: bool,
    ) -> NbdQueue {
        let blank = Slot {
            req: Request {
                tag: 0,
                desc: ublksrv_io_desc::default(),
                buf: std::ptr::null_mut(),
                buf_len: 0,
                buf_index: None,
                buf_reg: None,
                first_file: 0,
                meta: std::ptr::null_mut(),
                meta_len: 0,
            },
            phase: Phase::Idle,
            handle: 0,
            seq: 0,
            hdr: [0; wire::REQUEST_LEN],
            data: 0,
            ok: 0,
            sent_ns: 0,
        };
        let iov0 = libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 };
        // SAFETY: msghdr is plain old data; all-zero is its empty value.
        let msg: libc::msghdr = unsafe { std::mem::zeroed() };
        NbdQueue {
            shared,
            q,
            slots: vec![blank; usize::from(depth)].into_boxed_slice(),
            txq: std::collections::VecDeque::with_capacity(usize::from(depth)),
            tx_off: 0,
            tx_ops: 0,
            iov: Box::new([iov0; MAX_IOV]),
            msg: Box::new(msg),
            rx: Rx::new(depth, zero_copy),
            rx_busy: false,
            sock: Some(sock),
            conn: Conn::Up,
            seq: 0,
            down_since: 0,
            failing: false,
            attempts: 0,
            hs: None,
            hs_buf: vec![0u8; 64 << 10].into_boxed_slice(),
            hs_len: 0,
            rc_ops: 0,
            step_failed: false,
            timer: Box::new(types::Timespec::new()),
            timer_busy: false,
            cancel_busy: false,
            step_timeout: Box::new(types::Timespec::from(STEP_TIMEOUT)),
            ended: false,
            drain: Drain::No,
            own_hdr: [0; wire::REQUEST_LEN],
            own_handle: 0,
            order: Vec::with_capacity(usize::from(depth)),
            resend: 0,
            cancelled: false,
        }
    }

    fn fd(&self) -> types::Fd {
        types::Fd(self.sock.as_ref().map_or(-1, |s| s.as_raw_fd()))
    }

    fn push(&mut self, io: &mut dyn Submit, sub: u8, sqe: squeue::Entry) {
        // SAFETY: every buffer the queue's SQEs point at is a field of this handler (boxed,
        // so it never moves, and dropped only after the ring) or a held request's buffer,
        // which the engine keeps until we finish the request.
        unsafe { io.push_queue(0, sub, sqe) };
    }

    /// The NBD command for a ublk request, or the errno to end it with at once.
    fn command(&self, req: &Request) -> Result<(u16, u16, u32), i32> {
        let info = &self.shared.info;
        let op = req.desc.op();
        let flags = req.desc.flags();
        let writes = matches!(op, UBLK_IO_OP_WRITE | UBLK_IO_OP_DISCARD | UBLK_IO_OP_WRITE_ZEROES);
        if writes && info.flags & wire::FLAG_READ_ONLY != 0 {
            return Err(libc::EROFS);
        }
        let has = |f: u16| info.flags & f != 0;
        Ok(match op {
            _ if matches!(op, UBLK_IO_OP_READ | UBLK_IO_OP_WRITE) && req.bytes() > req.buf_len => {
                return Err(libc::EINVAL)
            }
            UBLK_IO_OP_READ => (wire::CMD_READ, 0, 0),
            UBLK_IO_OP_WRITE => {
                let fua = flags & UBLK_IO_F_FUA != 0 && has(wire::FLAG_SEND_FUA);
                (wire::CMD_WRITE, if fua { wire::CMD_FLAG_FUA } else { 0 }, req.bytes() as u32)
            }
            UBLK_IO_OP_FLUSH if has(wire::FLAG_SEND_FLUSH) => (wire::CMD_FLUSH, 0, 0),
            // No volatile cache was advertised: nothing to flush.
            UBLK_IO_OP_FLUSH => return Err(0),
            UBLK_IO_OP_DISCARD if has(wire::FLAG_SEND_TRIM) => (wire::CMD_TRIM, 0, 0),
            UBLK_IO_OP_WRITE_ZEROES if has(wire::FLAG_SEND_WRITE_ZEROES) => {
                let keep = flags & UBLK_IO_F_NOUNMAP != 0;
                (wire::CMD_WRITE_ZEROES, if keep { wire::CMD_FLAG_NO_HOLE } else { 0 }, 0)
            }
            _ => return Err(libc::EOPNOTSUPP),
        })
    }

    /// Gives the head of the send queue to the socket: one SENDMSG of as many requests
    /// (header, then data) as fit; zero copy, a chain of WRITEVs (headers) and WRITE_FIXEDs
    /// (each write's data), linked so they go out in order.
    fn kick_tx(&mut self, io: &mut dyn Submit) {
        if self.tx_ops > 0 || self.conn != Conn::Up || self.txq.is_empty() || self.stopped() {
            return;
        }
        let mut ops = [TxOp::Msg { at: 0, len: 0 }; MAX_TX_OPS];
        let mut nops = 0;
        // iovecs `msg_start..n` belong to the gathering operation not yet closed.
        let mut n = 0;
        let mut msg_start = 0;
        let mut skip = self.tx_off;
        'gather: for &tag in self.txq.iter() {
            let (hdr, data, buf, fixed) = if tag == OWN {
                (self.own_hdr.as_ptr(), 0, std::ptr::null_mut(), None)
            } else {
                let s = &self.slots[usize::from(tag)];
                (s.hdr.as_ptr(), s.data as usize, s.req.buf, s.req.buf_index)
            };
            for (part, len) in [(0, wire::REQUEST_LEN), (1, data)] {
                if len == 0 {
                    continue;
                }
                if skip >= len {
                    skip -= len;
                    continue;
                }
                let (from, left) = (skip, len - skip);
                match (part, fixed) {
                    (1, Some(idx)) => {
                        let open = usize::from(n > msg_start);
                        if nops + open + 1 > MAX_TX_OPS {
                            break 'gather;
                        }
                        if open == 1 {
                            ops[nops] = TxOp::Msg { at: msg_start, len: n - msg_start };
                            nops += 1;
                            msg_start = n;
                        }
                        ops[nops] = TxOp::Fixed { at: from, len: left, idx };
                        nops += 1;
                    }
                    _ => {
                        // A new gathering operation needs a place in the chain.
                        if n == MAX_IOV || (n == msg_start && nops == MAX_TX_OPS) {
                            break 'gather;
                        }
                        let base = if part == 0 { hdr } else { buf as *const u8 };
                        self.iov[n] = libc::iovec {
                            iov_base: base.wrapping_add(from) as *mut libc::c_void,
                            iov_len: left,
                        };
                        n += 1;
                    }
                }
                skip = 0;
            }
        }
        if n > msg_start {
            ops[nops] = TxOp::Msg { at: msg_start, len: n - msg_start };
            nops += 1;
        }
        let fd = self.fd();
        for (i, op) in ops[..nops].iter().enumerate() {
            let sqe = match *op {
                // Alone (always so in copy mode): a SENDMSG, whose short send we resume.
                TxOp::Msg { at, len } if nops == 1 => {
                    self.msg.msg_iov = self.iov[at..].as_mut_ptr();
                    self.msg.msg_iovlen = len as _;
                    opcode::SendMsg::new(fd, &*self.msg).flags(libc::MSG_NOSIGNAL as u32).build()
                }
                // In a chain: WRITEV, because a short one fails the link, where a short
                // SENDMSG succeeds and the next operation would send past a gap in the stream.
                // (SENDMSG with MSG_WAITALL was tried: on 7.3, against qemu-nbd, the stream
                // came out misframed: the server read data where a header belonged.)
                TxOp::Msg { at, len } => {
                    opcode::Writev::new(fd, self.iov[at..].as_ptr(), len as u32).build()
                }
                // Zero copy: the fixed buffer is addressed from 0, so the offset is the address.
                TxOp::Fixed { at, len, idx } => {
                    opcode::WriteFixed::new(fd, at as *const u8, len as u32, idx).build()
                }
            };
            let sqe = if i + 1 < nops { sqe.flags(squeue::Flags::IO_LINK) } else { sqe };
            self.tx_ops += 1;
            self.push(io, sub::SEND, sqe);
        }
    }

    /// `n` bytes of the send queue went out (seen at `now`).
    fn sent(&mut self, mut n: usize, now: u64) {
        while n > 0 {
            let Some(&tag) = self.txq.front() else { break };
            if tag == OWN {
                let left = wire::REQUEST_LEN - self.tx_off;
                if n < left {
                    self.tx_off += n;
                    return;
                }
                n -= left;
                self.tx_off = 0;
                self.txq.pop_front();
                continue;
            }
            let s = &mut self.slots[usize::from(tag)];
            let len = s.hdr.len() + s.data as usize;
            let left = len - self.tx_off;
            if n < left {
                self.tx_off += n;
                return;
            }
            n -= left;
            self.tx_off = 0;
            self.txq.pop_front();
            // Its reply may have come first (the CQEs of one turn are not ordered).
            if s.phase == Phase::Queued {
                s.phase = Phase::Sent;
                s.sent_ns = now;
            }
        }
    }

    fn arm_rx(&mut self, io: &mut dyn Submit) {
        if self.rx_busy || self.conn != Conn::Up || self.stopped() {
            return;
        }
        let mut own = self.own_handle;
        let parsed = {
            let mut book = Answers { slots: &mut self.slots, io: &mut *io, own: &mut own };
            self.rx.parse(&mut book)
        };
        let own_answered = own != self.own_handle;
        self.own_handle = own;
        if own_answered {
            return self.disconnect(io);
        }
        let next = match parsed {
            Ok(n) => n,
            Err(e) => return self.lose(io, &format!("protocol error: {e}")),
        };
        let (sqe, which) = match next {
            Next::Staging => {
                let (p, len) = self.rx.space();
                (opcode::Recv::new(self.fd(), p, len as u32).build(), sub::RECV)
            }
            Next::Direct { at, len, fixed: None } => (
                opcode::Recv::new(self.fd(), at, len as u32).flags(libc::MSG_WAITALL).build(),
                sub::RECV_DIRECT,
            ),
            // Zero copy: a read of the socket into the request's pages (a read has no
            // MSG_WAITALL: a short one is resumed).
            Next::Direct { at, len, fixed: Some(idx) } => {
                (opcode::ReadFixed::new(self.fd(), at, len as u32, idx).build(), sub::RECV_DIRECT)
            }
        };
        self.rx_busy = true;
        self.push(io, which, sqe);
    }

    /// The connection is unusable: shut it so the send and receive in flight come back, then
    /// close it and reconnect.
    fn lose(&mut self, io: &mut dyn Submit, why: &str) {
        if self.conn != Conn::Up {
            return;
        }
        io.stats().backend_connected.store(0, std::sync::atomic::Ordering::Relaxed);
        let pending = self.slots.iter().filter(|s| s.phase != Phase::Idle).count();
        if !self.ended {
            log::warn!(
                "nbd {} queue {}: connection lost ({why}); {pending} requests kept, reconnecting",
                self.shared.uri.text,
                self.q
            );
        }
        self.conn = Conn::Closing;
        self.down_since = io.now_ns();
        if let Some(s) = &self.sock {
            // SAFETY: shutdown on a socket we own; no memory is passed.
            unsafe { libc::shutdown(s.as_raw_fd(), libc::SHUT_RDWR) };
        }
        self.maybe_closed(io);
    }

    /// While reconnecting (no socket operation of a request in flight): fail what waits.
    fn maybe_closed_now(&mut self, io: &mut dyn Submit) {
        for s in self.slots.iter_mut().filter(|s| s.phase != Phase::Idle) {
            s.phase = Phase::Idle;
            io.finish(s.req.tag, -libc::EIO);
        }
        self.txq.clear();
        self.tx_off = 0;
    }

    /// Once nothing is in flight on the lost socket: close it, requeue what was not answered
    /// in its original order, and start reconnecting.
    fn maybe_closed(&mut self, io: &mut dyn Submit) {
        if self.conn != Conn::Closing || self.tx_ops > 0 || self.rx_busy {
            return;
        }
        self.resend = self.slots.iter().filter(|s| s.phase == Phase::Sent).count()
            + usize::from(self.tx_off > 0);
        self.sock = None;
        self.rx.reset();
        self.txq.clear();
        self.tx_off = 0;
        self.order.clear();
        for (t, s) in self.slots.iter_mut().enumerate() {
            if s.phase != Phase::Idle {
                s.phase = Phase::Queued;
                s.sent_ns = 0;
                self.order.push(t as u16);
            }
        }
        let slots = &self.slots;
        self.order.sort_unstable_by_key(|&t| slots[usize::from(t)].seq);
        for &t in &self.order {
            self.txq.push_back(t);
        }
        if self.cancelled {
            // Nothing is in flight on the socket any more: the buffers are ours to give back.
            for s in self.slots.iter_mut().filter(|s| s.phase != Phase::Idle) {
                s.phase = Phase::Idle;
                io.finish(s.req.tag, -libc::EIO);
            }
            self.txq.clear();
        }
        if self.ended || self.cancelled {
            return self.shut(io);
        }
        self.attempts = 0;
        self.connect(io);
    }

    /// Starts one reconnect attempt: a fresh socket, CONNECT bounded by a linked timeout.
    fn connect(&mut self, io: &mut dyn Submit) {
        self.check_deadline(io);
        let sock = match super::uri::new_socket(&self.shared.addr) {
            Ok(s) => s,
            Err(e) => {
                log::warn!("nbd {}: {e}", self.shared.uri.text);
                return self.backoff(io);
            }
        };
        self.sock = Some(sock);
        self.conn = Conn::Connecting;
        self.step_failed = false;
        self.hs = Some(Handshake::new(
            &self.shared.uri.export,
            self.shared.info.structured,
            &self.shared.uri.text,
        ));
        let a = &self.shared.addr;
        let sqe = opcode::Connect::new(self.fd(), a.as_ptr(), a.len())
            .build()
            .flags(squeue::Flags::IO_LINK);
        self.push_step(io, sub::CONNECT, sqe);
    }

    fn push_step(&mut self, io: &mut dyn Submit, which: u8, sqe: squeue::Entry) {
        self.rc_ops += 2;
        self.push(io, which, sqe.flags(squeue::Flags::IO_LINK));
        let t = opcode::LinkTimeout::new(&*self.step_timeout).build();
        self.push(io, sub::LINK_TIMEOUT, t);
    }

    /// The next handshake step, or the end of the handshake.
    fn handshake(&mut self, io: &mut dyn Submit) {
        let Some(hs) = self.hs.as_ref() else { return };
        match hs.step() {
            Step::Send(bytes) => {
                let n = bytes.len().min(self.hs_buf.len());
                self.hs_buf[..n].copy_from_slice(&bytes[..n]);
                self.hs_len = n;
                let sqe = opcode::Send::new(self.fd(), self.hs_buf.as_ptr(), n as u32)
                    .flags(libc::MSG_NOSIGNAL | libc::MSG_WAITALL)
                    .build();
                self.push_step(io, sub::HS_SEND, sqe);
            }
            Step::Recv(n) => {
                if n > self.hs_buf.len() {
                    return self.attempt_failed(io, "handshake reply too long");
                }
                self.hs_len = n;
                let sqe = opcode::Recv::new(self.fd(), self.hs_buf.as_mut_ptr(), n as u32)
                    .flags(libc::MSG_WAITALL)
                    .build();
                self.push_step(io, sub::HS_RECV, sqe);
            }
            Step::Done(info) => {
                let was = &self.shared.info;
                if info.size != was.size || (info.flags ^ was.flags) & wire::FLAG_READ_ONLY != 0 {
                    let why = format!(
                        "the export changed (size {} -> {}, flags {:#x} -> {:#x})",
                        was.size, info.size, was.flags, info.flags
                    );
                    return self.attempt_failed(io, &why);
                }
                self.hs = None;
                self.up(io);
            }
        }
    }

    fn up(&mut self, io: &mut dyn Submit) {
        let resent = std::mem::take(&mut self.resend).min(self.txq.len());
        let st = io.stats();
        QueueStats::bump(&st.backend_reconnects, 1);
        QueueStats::bump(&st.backend_resent, resent as u64);
        st.backend_connected.store(1, std::sync::atomic::Ordering::Relaxed);
        let secs = io.now_ns().saturating_sub(self.down_since) as f64 / 1e9;
        log::info!(
            "nbd {} queue {}: reconnected after {secs:.1} s; sending {resent} requests again",
            self.shared.uri.text,
            self.q
        );
        self.conn = Conn::Up;
        self.failing = false;
        self.attempts = 0;
        self.kick_tx(io);
        self.arm_rx(io);
    }

    /// A connect or handshake step failed: close the socket, wait, try again.
    fn attempt_failed(&mut self, io: &mut dyn Submit, why: &str) {
        self.step_failed = true;
        if self.attempts == 0 || self.attempts.is_power_of_two() {
            log::info!(
                "nbd {} queue {}: reconnect attempt {}: {why}",
                self.shared.uri.text,
                self.q,
                self.attempts + 1
            );
        }
        if let Some(s) = &self.sock {
            // SAFETY: shutdown on a socket we own; no memory is passed.
            unsafe { libc::shutdown(s.as_raw_fd(), libc::SHUT_RDWR) };
        }
        self.maybe_retry(io);
    }

    /// Once the failed attempt's operations are all back: the backoff timer.
    fn maybe_retry(&mut self, io: &mut dyn Submit) {
        if self.rc_ops > 0 || self.conn != Conn::Connecting {
            return;
        }
        self.sock = None;
        self.hs = None;
        if self.ended {
            return;
        }
        self.backoff(io);
    }

    fn backoff(&mut self, io: &mut dyn Submit) {
        self.check_deadline(io);
        let shift = self.attempts.min(5);
        let d = (BACKOFF_MIN * (1 << shift)).min(BACKOFF_MAX);
        self.attempts += 1;
        *self.timer = types::Timespec::from(d);
        self.conn = Conn::Waiting;
        let sqe = opcode::Timeout::new(&*self.timer).build();
        self.timer_busy = true;
        self.push(io, sub::TIMER, sqe);
    }

    /// Past the reconnect timeout: fail what waits, and fail new requests at once.
    fn check_deadline(&mut self, io: &mut dyn Submit) {
        if self.failing {
            return;
        }
        let limit = self.shared.reconnect_timeout.as_nanos() as u64;
        if io.now_ns().saturating_sub(self.down_since) < limit {
            return;
        }
        self.failing = true;
        let mut failed = 0;
        for s in self.slots.iter_mut() {
            if s.phase != Phase::Idle {
                s.phase = Phase::Idle;
                io.finish(s.req.tag, -libc::EIO);
                failed += 1;
            }
        }
        self.txq.clear();
        self.tx_off = 0;
        log::error!(
            "nbd {} queue {}: no server for {} s: {failed} requests failed with EIO; new ones fail until it is back",
            self.shared.uri.text,
            self.q,
            self.shared.reconnect_timeout.as_secs()
        );
    }

    /// Whether the queue ended and is not draining: nothing more is sent or received.
    fn stopped(&self) -> bool {
        self.ended && self.drain == Drain::No
    }

    /// Queues the queue's own FLUSH or DISC (header only).
    fn own_request(&mut self, cmd: u16) {
        self.seq += 1;
        let handle = u64::from(OWN) | (self.seq << 16);
        wire::encode_request(&mut self.own_hdr, 0, cmd, handle, 0, 0);
        // Only a FLUSH is answered.
        self.own_handle = if cmd == wire::CMD_FLUSH { handle } else { 0 };
        self.txq.push_back(OWN);
    }

    /// The FLUSH was answered (or there was none): DISC, then close once it is out.
    fn disconnect(&mut self, io: &mut dyn Submit) {
        self.own_request(wire::CMD_DISC);
        self.drain = Drain::Disc;
        self.kick_tx(io);
    }

    /// Shuts the socket (whatever is in flight on it comes back at once) and removes the
    /// timer, so the queue can go.
    fn shut(&mut self, io: &mut dyn Submit) {
        self.drain = Drain::No;
        if let Some(s) = &self.sock {
            // SAFETY: shutdown on a socket we own; no memory is passed.
            unsafe { libc::shutdown(s.as_raw_fd(), libc::SHUT_RDWR) };
        }
        if self.timer_busy && !self.cancel_busy {
            self.cancel_busy = true;
            let ud = io.queue_user_data(0, sub::TIMER);
            self.push(io, sub::CANCEL, opcode::TimeoutRemove::new(ud).build());
        }
    }

    fn step_done(&mut self, io: &mut dyn Submit, which: u8, res: i32) {
        if self.step_failed || self.ended {
            return self.maybe_retry(io);
        }
        let r: Result<(), String> = match which {
            sub::CONNECT if res == 0 => Ok(()),
            sub::HS_SEND if res as usize == self.hs_len => {
                self.hs.as_mut().map_or(Ok(()), |h| h.sent().map_err(|e| e.to_string()))
            }
            sub::HS_RECV if res as usize == self.hs_len => {
                let n = self.hs_len;
                match self.hs.as_mut() {
                    Some(h) => h.received(&self.hs_buf[..n]).map_err(|e| e.to_string()),
                    None => Ok(()),
                }
            }
            _ if res < 0 => Err(std::io::Error::from_raw_os_error(-res).to_string()),
            _ => Err("the server closed the connection".to_string()),
        };
        match r {
            Ok(()) => {
                // Its linked timeout must come back first (it is cancelled, not yet reaped):
                // the next step waits for it so only one step is ever in flight.
                if self.rc_ops == 0 {
                    self.handshake(io);
                }
            }
            Err(e) => self.attempt_failed(io, &e),
        }
    }
}

/// Why a socket operation that returned `res` (0 or `-errno`) ended the connection.
fn failure(res: i32, on_zero: &str) -> String {
    if res == 0 {
        on_zero.to_string()
    } else {
        std::io::Error::from_raw_os_error(-res).to_string()
    }
}

/// The parser's view of the handler's requests.
struct Answers<'a> {
    slots: &'a mut [Slot],
    io: &'a mut dyn Submit,
    /// The handle of the queue's own FLUSH awaiting its reply (0: none); set to 0 when
    /// answered.
    own: &'a mut u64,
}

impl Book for Answers<'_> {
    fn awaiting(&self, handle: u64) -> Option<Awaiting> {
        let tag = (handle & 0xffff) as u16;
        if tag == OWN {
            return (*self.own != 0 && handle == *self.own).then_some(Awaiting {
                tag,
                read: false,
                offset: 0,
                len: 0,
                buf: std::ptr::null_mut(),
                fixed: None,
                ok: 0,
            });
        }
        let s = self.slots.get(usize::from(tag))?;
        (s.phase != Phase::Idle && s.handle == handle).then(|| Awaiting {
            tag,
            read: s.req.desc.op() == UBLK_IO_OP_READ,
            offset: s.req.offset(),
            len: s.req.bytes() as u32,
            buf: if s.req.buf_index.is_some() { std::ptr::null_mut() } else { s.req.buf },
            fixed: s.req.buf_index,
            ok: s.ok,
        })
    }

    fn reply(&mut self, tag: u16, res: i32) {
        if tag == OWN {
            *self.own = 0;
            return;
        }
        if let Some(s) = self.slots.get_mut(usize::from(tag)) {
            if s.phase != Phase::Idle && s.sent_ns != 0 {
                let rtt = self.io.now_ns().saturating_sub(s.sent_ns);
                self.io.stats().backend_rtt.record(rtt, res < 0);
            }
            s.phase = Phase::Idle;
            self.io.finish(tag, res);
        }
    }
}

impl QueueHandler for NbdQueue {
    fn start(&mut self, req: &Request, io: &mut dyn Submit) -> Flow {
        let (cmd, flags, data) = match self.command(req) {
            Ok(c) => c,
            Err(e) => return Flow::Done(-e),
        };
        if self.failing || self.ended {
            return Flow::Done(-libc::EIO);
        }
        self.seq += 1;
        let tag = req.tag;
        let handle = u64::from(tag) | (self.seq << 16);
        let s = &mut self.slots[usize::from(tag)];
        s.req = *req;
        s.phase = Phase::Queued;
        s.handle = handle;
        s.seq = self.seq;
        s.sent_ns = 0;
        s.data = data;
        s.ok = if matches!(cmd, wire::CMD_READ | wire::CMD_WRITE) { req.bytes() as i32 } else { 0 };
        let (off, len) = if cmd == wire::CMD_FLUSH { (0, 0) } else { (req.offset(), req.bytes()) };
        wire::encode_request(&mut s.hdr, flags, cmd, handle, off, len as u32);
        self.txq.push_back(tag);
        self.kick_tx(io);
        Flow::Held
    }

    fn complete(&mut self, _req: &Request, _sub: u8, _res: i32, _io: &mut dyn Submit) -> Flow {
        // Nothing is ever pushed per request.
        Flow::Done(-libc::EIO)
    }

    fn begin(&mut self, io: &mut dyn Submit) {
        io.stats().backend_connected.store(1, std::sync::atomic::Ordering::Relaxed);
        self.arm_rx(io);
    }

    fn complete_queue(
        &mut self,
        _token: u16,
        which: u8,
        res: i32,
        _flags: u32,
        io: &mut dyn Submit,
    ) {
        match which {
            sub::SEND => {
                self.tx_ops -= 1;
                if self.conn != Conn::Up {
                    return self.maybe_closed(io);
                }
                if res == -libc::ECANCELED {
                    // An earlier operation of its chain was short: the rest goes out again.
                } else if res <= 0 {
                    return self.lose(io, &failure(res, "the send made no progress"));
                } else {
                    self.sent(res as usize, io.now_ns());
                }
                if self.tx_ops > 0 {
                    return;
                }
                if self.drain == Drain::Disc && self.txq.is_empty() {
                    return self.shut(io);
                }
                self.kick_tx(io);
            }
            sub::RECV | sub::RECV_DIRECT => {
                self.rx_busy = false;
                if self.conn != Conn::Up {
                    return self.maybe_closed(io);
                }
                if res <= 0 {
                    return self.lose(io, &failure(res, "the server closed the connection"));
                }
                if which == sub::RECV_DIRECT {
                    let mut own = self.own_handle;
                    let mut book = Answers { slots: &mut self.slots, io: &mut *io, own: &mut own };
                    self.rx.direct_done(&mut book, res as usize);
                } else {
                    self.rx.filled(res as usize);
                }
                self.arm_rx(io);
            }
            sub::CONNECT | sub::HS_SEND | sub::HS_RECV => {
                self.rc_ops -= 1;
                self.step_done(io, which, res);
            }
            sub::LINK_TIMEOUT => {
                self.rc_ops -= 1;
                if res == -libc::ETIME {
                    // The step ran out of time: its operation comes back cancelled.
                    self.step_failed = true;
                }
                if self.step_failed {
                    self.maybe_retry(io);
                } else if self.rc_ops == 0 {
                    self.handshake(io);
                }
            }
            sub::TIMER => {
                self.timer_busy = false;
                if self.drain != Drain::No {
                    // The server did not answer our FLUSH in time: close anyway.
                    return self.shut(io);
                }
                if self.ended {
                    return;
                }
                self.connect(io);
            }
            sub::CANCEL => self.cancel_busy = false,
            _ => {}
        }
    }

    /// The service ends and this device did not drain: close the connection; once its send
    /// and receive are back, every pending request fails with EIO.
    fn cancel(&mut self, io: &mut dyn Submit) {
        self.cancelled = true;
        self.failing = true;
        if self.conn == Conn::Up {
            return self.lose(io, "the service ends and the device must drain");
        }
        // Not connected: nothing of theirs is in flight.
        self.maybe_closed_now(io);
    }

    fn end(&mut self, io: &mut dyn Submit) {
        self.ended = true;
        let idle = self.txq.is_empty() && self.slots.iter().all(|s| s.phase == Phase::Idle);
        if self.conn != Conn::Up || !idle {
            // Requests still held are given up (the driver requeues them): close now.
            return self.shut(io);
        }
        // A clean end, as a disk flushes its cache when it goes: FLUSH (if the server has a
        // cache), then DISC, then close; bounded by a timer.
        if self.shared.info.flags & wire::FLAG_SEND_FLUSH != 0 {
            self.own_request(wire::CMD_FLUSH);
            self.drain = Drain::Flush;
            *self.timer = types::Timespec::from(DRAIN_TIMEOUT);
            self.timer_busy = true;
            let sqe = opcode::Timeout::new(&*self.timer).build();
            self.push(io, sub::TIMER, sqe);
            self.kick_tx(io);
        } else {
            self.disconnect(io);
        }
    }
}
