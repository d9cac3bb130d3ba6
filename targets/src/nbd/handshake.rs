//! The fixed-newstyle NBD client handshake (doc/proto.md, "Handshake" and "Values"), as a
//! sans-IO state machine: [`Handshake::step`] says what to send or how many bytes to receive
//! next, and [`Handshake::sent`] / [`Handshake::received`] move it on. Any transport can drive
//! it: [`connect_blocking`] does with plain blocking socket calls; an io_uring SEND/RECV loop
//! can do the same.
//!
//! The client sends `NBD_OPT_STRUCTURED_REPLY` (when asked; a refusal just means simple
//! replies), then `NBD_OPT_GO` with an `NBD_INFO_BLOCK_SIZE` request, and falls back to
//! `NBD_OPT_EXPORT_NAME` when the server does not know `NBD_OPT_GO`. Every length the server
//! sends is bounded before anything is allocated for it.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use ublk_fast_engine::error::{Error, Result};

use super::uri::{new_socket, NbdUri, SockAddr, MAX_EXPORT_NAME};
use super::wire::{one_line, FLAG_HAS_FLAGS};

// ---- Magic numbers ----

/// "NBDMAGIC", the first 8 bytes from every NBD server.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle servers send it after NBDMAGIC; clients lead each option with it.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// The oldstyle handshake's second magic (not supported).
pub const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Leads each option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

// ---- Handshake flags (server) and client flags ----

pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// ---- Options ----

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;

// ---- Option replies ----

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR + 1;
pub const REP_ERR_POLICY: u32 = REP_ERR + 2;
pub const REP_ERR_INVALID: u32 = REP_ERR + 3;
pub const REP_ERR_PLATFORM: u32 = REP_ERR + 4;
pub const REP_ERR_TLS_REQD: u32 = REP_ERR + 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR + 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR + 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_ERR + 8;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR + 9;

// ---- NBD_REP_INFO types ----

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---- Sizes and bounds ----

/// NBDMAGIC + IHAVEOPT + handshake flags.
pub const GREETING_LEN: usize = 18;
/// Reply magic u64 + option u32 + reply type u32 + length u32.
pub const OPT_REPLY_HEADER_LEN: usize = 20;
/// The longest option reply payload accepted (the longest the spec defines is a 4 KiB string).
pub const MAX_OPT_REPLY_PAYLOAD: usize = 64 * 1024;
/// The most replies accepted to one option (a handful are expected).
pub const MAX_OPT_REPLIES: u32 = 64;
/// `NBD_OPT_EXPORT_NAME`'s reply: size u64 + transmission flags u16 (+ 124 zeroes unless
/// `NO_ZEROES` was agreed).
const EXPORT_NAME_REPLY_LEN: usize = 10;
const EXPORT_NAME_ZEROES: usize = 124;

/// Block size constraints when the server states none (the spec's defaults).
pub const DEFAULT_MIN_BLOCK: u32 = 1;
pub const DEFAULT_PREF_BLOCK: u32 = 4096;
pub const DEFAULT_MAX_BLOCK: u32 = 32 << 20;

/// What the handshake agreed on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// Bytes; never 0.
    pub size: u64,
    /// Transmission flags (`wire::FLAG_*`); `FLAG_HAS_FLAGS` is always set.
    pub flags: u16,
    pub min_block: u32,
    pub pref_block: u32,
    pub max_block: u32,
    /// Structured replies were negotiated.
    pub structured: bool,
}

impl ExportInfo {
    /// Whether a transmission flag (`wire::FLAG_*`) is set.
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag == flag
    }
}

/// What the transport must do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Step<'a> {
    /// Send all of these bytes, then call [`Handshake::sent`].
    Send(&'a [u8]),
    /// Receive exactly this many more bytes (never 0), then pass them to
    /// [`Handshake::received`].
    Recv(usize),
    /// Transmission phase: the socket now carries requests and replies.
    Done(ExportInfo),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Greeting,
    Sending,
    OptReplyHeader,
    OptReplyPayload { kind: u32, len: usize },
    ExportNameReply,
    Done(ExportInfo),
}

/// One client handshake. After an error from [`Handshake::sent`] or [`Handshake::received`]
/// the handshake is over: `step` keeps returning the step that failed and every later call is
/// an error; send [`Handshake::abort_request`] if it has one, then close the socket.
pub struct Handshake {
    export: String,
    want_structured: bool,
    ctx: String,
    state: State,
    out: Vec<u8>,
    /// The option in flight (0 before the first).
    opt: u32,
    no_zeroes: bool,
    structured: bool,
    /// From `NBD_INFO_EXPORT`: size and transmission flags.
    export_info: Option<(u64, u16)>,
    /// From `NBD_INFO_BLOCK_SIZE`: min, preferred, max.
    block: Option<(u32, u32, u32)>,
    replies: u32,
    /// The last error, once there was one; the handshake does nothing more.
    failed: Option<String>,
    /// The failure left the option haggling in step, so `NBD_OPT_ABORT` may be sent.
    can_abort: bool,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// The spec's name of an option, for messages.
pub fn opt_name(opt: u32) -> &'static str {
    match opt {
        OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        OPT_ABORT => "NBD_OPT_ABORT",
        OPT_LIST => "NBD_OPT_LIST",
        OPT_STARTTLS => "NBD_OPT_STARTTLS",
        OPT_INFO => "NBD_OPT_INFO",
        OPT_GO => "NBD_OPT_GO",
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        _ => "an unknown option",
    }
}

/// The spec's name of an option reply type, for messages.
pub fn rep_name(kind: u32) -> String {
    let name = match kind {
        REP_ACK => "NBD_REP_ACK",
        REP_SERVER => "NBD_REP_SERVER",
        REP_INFO => "NBD_REP_INFO",
        REP_META_CONTEXT => "NBD_REP_META_CONTEXT",
        REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP",
        REP_ERR_POLICY => "NBD_REP_ERR_POLICY",
        REP_ERR_INVALID => "NBD_REP_ERR_INVALID",
        REP_ERR_PLATFORM => "NBD_REP_ERR_PLATFORM",
        REP_ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD",
        REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN",
        REP_ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN",
        REP_ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        REP_ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG",
        k if k & REP_ERR != 0 => return format!("error reply {:#x}", k),
        k => return format!("reply type {k}"),
    };
    name.to_string()
}

fn push_option(out: &mut Vec<u8>, opt: u32, data: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

impl Handshake {
    /// `export`: the export name to ask for; `want_structured`: try to negotiate structured
    /// replies; `ctx`: what every message starts with (the URI).
    pub fn new(export: &str, want_structured: bool, ctx: &str) -> Handshake {
        Handshake {
            export: export.to_string(),
            want_structured,
            ctx: ctx.to_string(),
            state: State::Greeting,
            out: Vec::new(),
            opt: 0,
            no_zeroes: false,
            structured: false,
            export_info: None,
            block: None,
            replies: 0,
            failed: None,
            can_abort: false,
        }
    }

    pub fn step(&self) -> Step<'_> {
        match self.state {
            State::Greeting => Step::Recv(GREETING_LEN),
            State::Sending => Step::Send(&self.out),
            State::OptReplyHeader => Step::Recv(OPT_REPLY_HEADER_LEN),
            State::OptReplyPayload { len, .. } => Step::Recv(len),
            State::ExportNameReply => Step::Recv(self.export_name_reply_len()),
            State::Done(info) => Step::Done(info),
        }
    }

    /// What the handshake is doing, for transport messages ("while ...").
    pub fn phase(&self) -> String {
        match self.state {
            State::Greeting => "waiting for the server's greeting".to_string(),
            State::Sending if self.opt == 0 => "sending the client flags".to_string(),
            State::Sending => format!("sending {}", opt_name(self.opt)),
            State::OptReplyHeader | State::OptReplyPayload { .. } => {
                format!("waiting for the reply to {}", opt_name(self.opt))
            }
            State::ExportNameReply => format!(
                "waiting for the reply to NBD_OPT_EXPORT_NAME; a server that lacks NBD_OPT_GO \
                 closes the connection here when it has no export {:?}",
                self.export
            ),
            State::Done(_) => "in the transmission phase".to_string(),
        }
    }

    /// After a failure that left the option haggling in step (the server refused an option):
    /// the `NBD_OPT_ABORT` the spec asks a client to send before it closes the socket.
    /// Best effort; no reply needs to be read.
    pub fn abort_request(&self) -> Option<[u8; 16]> {
        if self.failed.is_none() || !self.can_abort {
            return None;
        }
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&OPT_ABORT.to_be_bytes());
        Some(b)
    }

    /// The whole buffer of the last `Step::Send` went out.
    pub fn sent(&mut self) -> Result<()> {
        self.check_usable()?;
        if self.state != State::Sending {
            return Err(Error::invalid(format!(
                "{}: NBD handshake: sent() called while {}",
                self.ctx,
                self.phase()
            )));
        }
        self.out.clear();
        self.replies = 0;
        self.state = if self.opt == OPT_EXPORT_NAME {
            State::ExportNameReply
        } else {
            State::OptReplyHeader
        };
        Ok(())
    }

    /// Exactly the bytes the last `Step::Recv(n)` asked for arrived.
    pub fn received(&mut self, bytes: &[u8]) -> Result<()> {
        self.check_usable()?;
        let want = match self.step() {
            Step::Recv(n) => n,
            _ => {
                return Err(Error::invalid(format!(
                    "{}: NBD handshake: received() called while {}",
                    self.ctx,
                    self.phase()
                )))
            }
        };
        if bytes.len() != want {
            return Err(Error::invalid(format!(
                "{}: NBD handshake: received {} bytes where {want} were asked for",
                self.ctx,
                bytes.len()
            )));
        }
        let r = match self.state {
            State::Greeting => self.on_greeting(bytes),
            State::OptReplyHeader => self.on_reply_header(bytes),
            State::OptReplyPayload { kind, .. } => self.on_reply(kind, bytes),
            State::ExportNameReply => {
                let (size, flags) = (be64(bytes, 0), be16(bytes, 8));
                self.finish(size, flags)
            }
            State::Sending | State::Done(_) => Ok(()),
        };
        if let Err(e) = &r {
            self.failed = Some(e.to_string());
        }
        r
    }

    fn check_usable(&self) -> Result<()> {
        match &self.failed {
            Some(msg) => Err(Error::invalid(format!("NBD handshake used after it failed ({msg})"))),
            None => Ok(()),
        }
    }

    fn export_name_reply_len(&self) -> usize {
        if self.no_zeroes {
            EXPORT_NAME_REPLY_LEN
        } else {
            EXPORT_NAME_REPLY_LEN + EXPORT_NAME_ZEROES
        }
    }

    /// A server that breaks the protocol: no soft disconnect is owed.
    fn protocol(&self, what: impl std::fmt::Display) -> Error {
        Error::failed(format!("{}: the NBD server broke the protocol: {what}", self.ctx))
    }

    fn on_greeting(&mut self, b: &[u8]) -> Result<()> {
        let (magic, second, hflags) = (be64(b, 0), be64(b, 8), be16(b, 16));
        if magic != NBDMAGIC {
            return Err(Error::failed(format!(
                "{}: not an NBD server: it greeted with \"{}\" instead of \"NBDMAGIC\"",
                self.ctx,
                b[..8].escape_ascii()
            )));
        }
        if second == CLISERV_MAGIC {
            return Err(Error::unsupported(format!(
                "{}: the server speaks the oldstyle NBD handshake, which has no export names and \
                 is not supported; run the server in newstyle mode",
                self.ctx
            )));
        }
        if second != IHAVEOPT {
            return Err(self
                .protocol(format!("its greeting's second magic is {second:#018x}, not IHAVEOPT")));
        }
        if hflags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(Error::unsupported(format!(
                "{}: the NBD server does not offer the fixed newstyle handshake (handshake flags \
                 {hflags:#06x}); it is too old, use a newer NBD server",
                self.ctx
            )));
        }
        if self.export.len() > MAX_EXPORT_NAME || self.export.contains('\0') {
            return Err(Error::invalid(format!(
                "{}: the export name must be at most {MAX_EXPORT_NAME} bytes without NUL",
                self.ctx
            )));
        }
        self.no_zeroes = hflags & FLAG_NO_ZEROES != 0;
        let mut cflags = FLAG_C_FIXED_NEWSTYLE;
        if self.no_zeroes {
            cflags |= FLAG_C_NO_ZEROES;
        }
        // The client flags have no reply: they go out with the first option.
        self.out.clear();
        self.out.extend_from_slice(&cflags.to_be_bytes());
        if self.want_structured {
            self.opt = OPT_STRUCTURED_REPLY;
            push_option(&mut self.out, OPT_STRUCTURED_REPLY, &[]);
            self.state = State::Sending;
        } else {
            self.send_go();
        }
        Ok(())
    }

    fn send_go(&mut self) {
        let name = self.export.as_bytes();
        let mut data = Vec::with_capacity(4 + name.len() + 4);
        data.extend_from_slice(&(name.len() as u32).to_be_bytes());
        data.extend_from_slice(name);
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        self.opt = OPT_GO;
        push_option(&mut self.out, OPT_GO, &data);
        self.state = State::Sending;
    }

    fn send_export_name(&mut self) {
        self.out.clear();
        self.opt = OPT_EXPORT_NAME;
        let name = self.export.clone();
        push_option(&mut self.out, OPT_EXPORT_NAME, name.as_bytes());
        self.state = State::Sending;
    }

    fn on_reply_header(&mut self, b: &[u8]) -> Result<()> {
        let (magic, opt, kind, len) = (be64(b, 0), be32(b, 8), be32(b, 12), be32(b, 16));
        if magic != OPT_REPLY_MAGIC {
            return Err(self.protocol(format!(
                "bad option reply magic {magic:#x} in reply to {}",
                opt_name(self.opt)
            )));
        }
        if opt != self.opt {
            return Err(self.protocol(format!(
                "it replied to option {opt} while {} was asked",
                opt_name(self.opt)
            )));
        }
        let len = len as usize;
        if len > MAX_OPT_REPLY_PAYLOAD {
            return Err(self.protocol(format!(
                "its {} to {} is {len} bytes long (at most {MAX_OPT_REPLY_PAYLOAD} accepted)",
                rep_name(kind),
                opt_name(self.opt)
            )));
        }
        self.replies += 1;
        if self.replies > MAX_OPT_REPLIES {
            return Err(self.protocol(format!(
                "more than {MAX_OPT_REPLIES} replies to {}",
                opt_name(self.opt)
            )));
        }
        if len == 0 {
            self.state = State::OptReplyHeader;
            self.on_reply(kind, &[])
        } else {
            self.state = State::OptReplyPayload { kind, len };
            Ok(())
        }
    }

    fn on_reply(&mut self, kind: u32, payload: &[u8]) -> Result<()> {
        self.state = State::OptReplyHeader;
        match (self.opt, kind) {
            (OPT_STRUCTURED_REPLY, REP_ACK) => {
                self.structured = true;
                self.send_go();
                Ok(())
            }
            (OPT_STRUCTURED_REPLY, REP_ERR_TLS_REQD | REP_ERR_SHUTDOWN) => {
                Err(self.refused(kind, payload))
            }
            (OPT_STRUCTURED_REPLY, k) if k & REP_ERR != 0 => {
                // Not supported or not allowed: simple replies it is.
                self.structured = false;
                self.send_go();
                Ok(())
            }
            (OPT_GO, REP_INFO) => self.on_info(payload),
            (OPT_GO, REP_ACK) => match self.export_info {
                Some((size, flags)) => self.finish(size, flags),
                None => {
                    Err(self.protocol("it accepted NBD_OPT_GO without sending NBD_INFO_EXPORT"))
                }
            },
            (OPT_GO, REP_ERR_UNSUP) => {
                // An old server: the spec's fallback, which cannot report errors.
                self.export_info = None;
                self.block = None;
                self.send_export_name();
                Ok(())
            }
            (OPT_GO, k) if k & REP_ERR != 0 => Err(self.refused(k, payload)),
            (opt, k) => Err(self.protocol(format!(
                "unexpected {} in reply to {}",
                rep_name(k),
                opt_name(opt)
            ))),
        }
    }

    fn on_info(&mut self, p: &[u8]) -> Result<()> {
        if p.len() < 2 {
            return Err(self.protocol(format!("an NBD_REP_INFO of {} bytes", p.len())));
        }
        match be16(p, 0) {
            INFO_EXPORT => {
                if p.len() != 12 {
                    return Err(self.protocol(format!(
                        "an NBD_INFO_EXPORT of {} bytes (must be 12)",
                        p.len()
                    )));
                }
                self.export_info = Some((be64(p, 2), be16(p, 10)));
            }
            INFO_BLOCK_SIZE => {
                if p.len() != 14 {
                    return Err(self.protocol(format!(
                        "an NBD_INFO_BLOCK_SIZE of {} bytes (must be 14)",
                        p.len()
                    )));
                }
                self.block = Some((be32(p, 2), be32(p, 6), be32(p, 10)));
            }
            // NBD_INFO_NAME, NBD_INFO_DESCRIPTION and anything newer: not needed.
            _ => {}
        }
        Ok(())
    }

    /// An error reply the client answers with a soft disconnect.
    fn refused(&mut self, kind: u32, payload: &[u8]) -> Error {
        self.can_abort = true;
        let msg = one_line(payload, 200);
        let name = rep_name(kind);
        let detail = if msg.is_empty() { name } else { format!("{name}: {msg}") };
        let (ctx, export) = (&self.ctx, &self.export);
        match kind {
            REP_ERR_UNKNOWN => {
                Error::invalid(format!("{ctx}: the server has no export {export:?} ({detail})"))
            }
            REP_ERR_TLS_REQD => Error::unsupported(format!(
                "{ctx}: the server requires TLS, which is not supported ({detail}); serve the \
                 export without TLS"
            )),
            REP_ERR_POLICY => Error::invalid(format!(
                "{ctx}: the server's policy refuses export {export:?} ({detail})"
            )),
            REP_ERR_SHUTDOWN => Error::failed(format!(
                "{ctx}: the server is shutting down ({detail}); retry when it is back"
            )),
            REP_ERR_TOO_BIG => Error::invalid(format!(
                "{ctx}: the server refused export {export:?} as too big ({detail})"
            )),
            _ => Error::failed(format!(
                "{ctx}: the server refused {} for export {export:?} ({detail})",
                opt_name(self.opt)
            )),
        }
    }

    fn finish(&mut self, size: u64, flags: u16) -> Result<()> {
        if flags & FLAG_HAS_FLAGS == 0 {
            return Err(
                self.protocol(format!("transmission flags {flags:#06x} lack NBD_FLAG_HAS_FLAGS"))
            );
        }
        if size == 0 {
            return Err(Error::invalid(format!(
                "{}: export {:?} is empty (size 0); give it a size on the server",
                self.ctx, self.export
            )));
        }
        let (min, pref, max) =
            self.block.unwrap_or((DEFAULT_MIN_BLOCK, DEFAULT_PREF_BLOCK, DEFAULT_MAX_BLOCK));
        if !min.is_power_of_two()
            || min > 65536
            || !pref.is_power_of_two()
            || pref < min
            || max < pref
        {
            return Err(self.protocol(format!(
                "invalid block sizes: minimum {min}, preferred {pref}, maximum {max} (minimum \
                 and preferred must be powers of two, minimum <= 64 KiB, minimum <= preferred \
                 <= maximum)"
            )));
        }
        self.state = State::Done(ExportInfo {
            size,
            flags,
            min_block: min,
            pref_block: pref,
            max_block: max,
            structured: self.structured,
        });
        Ok(())
    }
}

// ---- The blocking driver ----

fn secs(d: Duration) -> String {
    format!("{} s", d.as_secs_f64())
}

fn set_nonblocking(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    // SAFETY: fcntl(F_GETFL) on a valid fd takes no pointers.
    let fl = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if fl < 0 {
        return Err(io::Error::last_os_error());
    }
    let fl = if on { fl | libc::O_NONBLOCK } else { fl & !libc::O_NONBLOCK };
    // SAFETY: fcntl(F_SETFL) on a valid fd takes no pointers.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Connects `fd` to `addr`, waiting until `deadline`; the socket is blocking again after.
fn connect_until(fd: BorrowedFd<'_>, addr: &SockAddr, deadline: Instant) -> io::Result<()> {
    set_nonblocking(fd, true)?;
    let r = connect_nonblocking(fd, addr, deadline);
    set_nonblocking(fd, false)?;
    r
}

fn connect_nonblocking(fd: BorrowedFd<'_>, addr: &SockAddr, deadline: Instant) -> io::Result<()> {
    loop {
        // SAFETY: `addr` points at a sockaddr of `addr.len()` bytes that lives across the call.
        let rc = unsafe { libc::connect(fd.as_raw_fd(), addr.as_ptr(), addr.len()) };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINPROGRESS) | Some(libc::EINTR) => return wait_connected(fd, deadline),
            // A Unix socket whose listen backlog is full: try again until the deadline.
            Some(libc::EAGAIN) => {
                if Instant::now() >= deadline {
                    return Err(io::ErrorKind::TimedOut.into());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            _ => return Err(e),
        }
    }
}

fn wait_connected(fd: BorrowedFd<'_>, deadline: Instant) -> io::Result<()> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
        // SAFETY: one pollfd that lives across the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if rc == 0 {
            continue;
        }
        let mut err: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: SO_ERROR writes one c_int into `err`, `len` says so; both live across it.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                &mut err as *mut libc::c_int as *mut libc::c_void,
                &mut len,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        return if err == 0 { Ok(()) } else { Err(io::Error::from_raw_os_error(err)) };
    }
}

/// SO_RCVTIMEO and SO_SNDTIMEO; a zero duration means no timeout.
fn set_timeouts(fd: BorrowedFd<'_>, t: Duration) -> io::Result<()> {
    // A nonzero timeout under 1 µs would read as "none".
    let t = if t.is_zero() { t } else { t.max(Duration::from_millis(1)) };
    let tv = libc::timeval {
        tv_sec: t.as_secs().min(i32::MAX as u64) as libc::time_t,
        tv_usec: t.subsec_micros() as libc::suseconds_t,
    };
    for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        // SAFETY: the option reads one timeval from `tv`, which lives across the call.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn send_all(fd: BorrowedFd<'_>, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: sends from `buf`, valid for buf.len() bytes; MSG_NOSIGNAL: no SIGPIPE.
        let n = unsafe {
            libc::send(
                fd.as_raw_fd(),
                buf.as_ptr() as *const libc::c_void,
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        buf = &buf[(n as usize).min(buf.len())..];
    }
    Ok(())
}

fn recv_exact(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        let rest = &mut buf[got..];
        // SAFETY: receives into `rest`, valid and writable for rest.len() bytes.
        let n = unsafe {
            libc::recv(fd.as_raw_fd(), rest.as_mut_ptr() as *mut libc::c_void, rest.len(), 0)
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        got += n as usize;
    }
    Ok(())
}

/// Connects to `uri`'s server and runs the handshake, all within `timeout`. The socket comes
/// back blocking with no send/receive timeouts, in the transmission phase.
pub fn connect_blocking(
    uri: &NbdUri,
    timeout: Duration,
    want_structured: bool,
) -> Result<(OwnedFd, ExportInfo)> {
    let ctx = &uri.text;
    let now = Instant::now();
    // A timeout too large for Instant is as good as none.
    let deadline =
        now.checked_add(timeout).unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86400));
    let addr = uri.addr.resolve().map_err(|e| match e {
        Error::Msg { kind, msg } => Error::Msg { kind, msg: format!("{ctx}: {msg}") },
        e => e,
    })?;
    let fd = new_socket(&addr)?;
    if let Err(e) = connect_until(fd.as_fd(), &addr, deadline) {
        return Err(connect_error(ctx, &addr, timeout, e));
    }

    let mut hs = Handshake::new(&uri.export, want_structured, ctx);
    let mut buf = Vec::new();
    let r = (|| loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let io_err = |hs: &Handshake, e: io::Error| io_error(ctx, &addr, timeout, hs, e);
        if left.is_zero() {
            return Err(io_err(&hs, io::ErrorKind::TimedOut.into()));
        }
        match hs.step() {
            Step::Done(info) => return Ok(info),
            Step::Send(out) => {
                let r = set_timeouts(fd.as_fd(), left).and_then(|_| send_all(fd.as_fd(), out));
                r.map_err(|e| io_err(&hs, e))?;
                hs.sent()?;
            }
            Step::Recv(n) => {
                buf.resize(n, 0);
                let r =
                    set_timeouts(fd.as_fd(), left).and_then(|_| recv_exact(fd.as_fd(), &mut buf));
                r.map_err(|e| io_err(&hs, e))?;
                hs.received(&buf)?;
            }
        }
    })();
    let info = match r {
        Ok(info) => info,
        Err(e) => {
            if let Some(abort) = hs.abort_request() {
                let _ = send_all(fd.as_fd(), &abort);
            }
            return Err(e);
        }
    };
    set_timeouts(fd.as_fd(), Duration::ZERO).map_err(|e| {
        Error::os("setsockopt(SO_RCVTIMEO)", e).hint("clearing the handshake's timeout")
    })?;
    Ok((fd, info))
}

fn connect_error(ctx: &str, addr: &SockAddr, timeout: Duration, e: io::Error) -> Error {
    if e.kind() == io::ErrorKind::TimedOut {
        return Error::timeout(format!(
            "{ctx}: cannot connect to {addr}: no answer within {} (is the host reachable?)",
            secs(timeout)
        ));
    }
    let hint = match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => " (is the NBD server running?)",
        Some(libc::ENOENT) => " (no such socket; is the NBD server running?)",
        Some(libc::EACCES) | Some(libc::EPERM) => " (check the socket's permissions)",
        Some(libc::ENETUNREACH) | Some(libc::EHOSTUNREACH) => " (check the address and routes)",
        _ => "",
    };
    Error::failed(format!("{ctx}: cannot connect to {addr}: {e}{hint}"))
}

fn io_error(ctx: &str, addr: &SockAddr, timeout: Duration, hs: &Handshake, e: io::Error) -> Error {
    let phase = hs.phase();
    match e.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Error::timeout(format!(
            "{ctx}: no answer within {} during the NBD handshake ({phase}); is {addr} an NBD \
             server?",
            secs(timeout)
        )),
        io::ErrorKind::UnexpectedEof => Error::failed(format!(
            "{ctx}: the server closed the connection during the NBD handshake ({phase})"
        )),
        _ => Error::failed(format!("{ctx}: NBD handshake with {addr} failed: {e} ({phase})")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::wire::*;

    const CTX: &str = "nbd+unix:///disk?socket=s";

    fn greeting(hflags: u16) -> Vec<u8> {
        let mut v = NBDMAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&hflags.to_be_bytes());
        v
    }

    fn reply(opt: u32, kind: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&opt.to_be_bytes());
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    fn info_export(size: u64, flags: u16) -> Vec<u8> {
        let mut p = INFO_EXPORT.to_be_bytes().to_vec();
        p.extend_from_slice(&size.to_be_bytes());
        p.extend_from_slice(&flags.to_be_bytes());
        reply(OPT_GO, REP_INFO, &p)
    }

    fn info_block(min: u32, pref: u32, max: u32) -> Vec<u8> {
        let mut p = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for v in [min, pref, max] {
            p.extend_from_slice(&v.to_be_bytes());
        }
        reply(OPT_GO, REP_INFO, &p)
    }

    const FLAGS: u16 = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_CAN_MULTI_CONN;

    /// A well-behaved modern server: structured replies, block sizes, an extra info it
    /// does not need to understand.
    fn good_stream() -> Vec<u8> {
        let mut s = greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        s.extend(reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
        let mut name = INFO_NAME.to_be_bytes().to_vec();
        name.extend_from_slice(b"disk");
        s.extend(reply(OPT_GO, REP_INFO, &name));
        s.extend(info_export(64 << 20, FLAGS));
        s.extend(info_block(512, 4096, 1 << 20));
        s.extend(reply(OPT_GO, REP_ACK, &[]));
        s
    }

    /// Drives `hs` against canned server bytes; returns the outcome and what the client sent.
    /// Running out of server bytes is an error, as EOF would be.
    fn drive(hs: &mut Handshake, mut server: &[u8]) -> (Result<ExportInfo>, Vec<u8>) {
        let mut sent = Vec::new();
        for _ in 0..10_000 {
            let r = match hs.step() {
                Step::Done(info) => return (Ok(info), sent),
                Step::Send(b) => {
                    sent.extend_from_slice(b);
                    hs.sent()
                }
                Step::Recv(n) => {
                    assert!(n > 0 && n <= MAX_OPT_REPLY_PAYLOAD + EXPORT_NAME_ZEROES + 10);
                    if server.len() < n {
                        return (Err(Error::failed("EOF")), sent);
                    }
                    let (now, rest) = server.split_at(n);
                    server = rest;
                    hs.received(now)
                }
            };
            if let Err(e) = r {
                return (Err(e), sent);
            }
        }
        panic!("handshake did not finish");
    }

    fn run(want_structured: bool, server: &[u8]) -> (Result<ExportInfo>, Vec<u8>, Handshake) {
        let mut hs = Handshake::new("disk", want_structured, CTX);
        let (r, sent) = drive(&mut hs, server);
        (r, sent, hs)
    }

    fn go_request(name: &str) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        let mut v = Vec::new();
        push_option(&mut v, OPT_GO, &d);
        v
    }

    fn err_of(r: Result<ExportInfo>) -> String {
        let e = r.expect_err("the handshake should fail").to_string();
        assert!(!e.contains('\n'), "{e}");
        assert!(e.starts_with(CTX) || e.starts_with("EOF"), "{e}");
        e
    }

    #[test]
    fn nbd_handshake_structured_with_block_sizes() {
        let (r, sent, _) = run(true, &good_stream());
        let info = r.unwrap();
        assert_eq!(
            info,
            ExportInfo {
                size: 64 << 20,
                flags: FLAGS,
                min_block: 512,
                pref_block: 4096,
                max_block: 1 << 20,
                structured: true
            }
        );
        assert!(info.has(FLAG_CAN_MULTI_CONN) && !info.has(FLAG_READ_ONLY));
        // Client flags (fixed newstyle + no zeroes), STRUCTURED_REPLY, then GO.
        let mut want = 3u32.to_be_bytes().to_vec();
        push_option(&mut want, OPT_STRUCTURED_REPLY, &[]);
        want.extend(go_request("disk"));
        assert_eq!(sent, want);
    }

    #[test]
    fn nbd_handshake_simple_replies_and_default_block_sizes() {
        // Structured replies refused (not fatal); no NBD_INFO_BLOCK_SIZE; no NO_ZEROES.
        let mut s = greeting(FLAG_FIXED_NEWSTYLE);
        s.extend(reply(OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, b"nope"));
        s.extend(info_export(1 << 30, FLAG_HAS_FLAGS | FLAG_READ_ONLY));
        s.extend(reply(OPT_GO, REP_ACK, &[]));
        let (r, sent, _) = run(true, &s);
        let info = r.unwrap();
        assert!(!info.structured && info.has(FLAG_READ_ONLY));
        assert_eq!((info.min_block, info.pref_block, info.max_block), (1, 4096, 32 << 20));
        assert_eq!(&sent[..4], &1u32.to_be_bytes());

        // Not asked for: straight to GO.
        let mut s = greeting(FLAG_FIXED_NEWSTYLE);
        s.extend(info_export(4096, FLAG_HAS_FLAGS));
        s.extend(reply(OPT_GO, REP_ACK, &[]));
        let (r, sent, _) = run(false, &s);
        assert!(!r.unwrap().structured);
        let mut want = 1u32.to_be_bytes().to_vec();
        want.extend(go_request("disk"));
        assert_eq!(sent, want);
    }

    #[test]
    fn nbd_handshake_export_name_fallback() {
        for no_zeroes in [false, true] {
            let hflags = FLAG_FIXED_NEWSTYLE | if no_zeroes { FLAG_NO_ZEROES } else { 0 };
            let mut s = greeting(hflags);
            s.extend(reply(OPT_GO, REP_ERR_UNSUP, &[]));
            s.extend_from_slice(&(8u64 << 20).to_be_bytes());
            s.extend_from_slice(&(FLAG_HAS_FLAGS | FLAG_SEND_TRIM).to_be_bytes());
            if !no_zeroes {
                s.extend_from_slice(&[0; 124]);
            }
            let (r, sent, hs) = run(false, &s);
            let info = r.unwrap();
            assert_eq!(info.size, 8 << 20);
            assert!(info.has(FLAG_SEND_TRIM));
            assert_eq!(info.min_block, DEFAULT_MIN_BLOCK);
            let mut tail = Vec::new();
            push_option(&mut tail, OPT_EXPORT_NAME, b"disk");
            assert!(sent.ends_with(&tail));
            assert_eq!(hs.phase(), "in the transmission phase");
        }
        // The fallback's reply never comes: the phase says why that may be.
        let mut s = greeting(FLAG_FIXED_NEWSTYLE);
        s.extend(reply(OPT_GO, REP_ERR_UNSUP, &[]));
        let (r, _, hs) = run(false, &s);
        assert!(r.is_err());
        assert!(hs.phase().contains("no export \"disk\""), "{}", hs.phase());
    }

    #[test]
    fn nbd_handshake_unknown_export_and_other_refusals() {
        let mut s = greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        s.extend(reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
        s.extend(reply(OPT_GO, REP_ERR_UNKNOWN, b"export 'disk' not found\n"));
        let (r, _, hs) = run(true, &s);
        let e = err_of(r);
        assert_eq!(
            e,
            format!(
                "{CTX}: the server has no export \"disk\" (NBD_REP_ERR_UNKNOWN: export 'disk' \
                 not found)"
            )
        );
        let mut abort = IHAVEOPT.to_be_bytes().to_vec();
        abort.extend_from_slice(&OPT_ABORT.to_be_bytes());
        abort.extend_from_slice(&0u32.to_be_bytes());
        assert_eq!(hs.abort_request().map(|a| a.to_vec()), Some(abort));

        let cases: &[(u32, &str)] = &[
            (REP_ERR_TLS_REQD, "requires TLS"),
            (REP_ERR_POLICY, "policy refuses export \"disk\" (NBD_REP_ERR_POLICY"),
            (REP_ERR_SHUTDOWN, "shutting down"),
            (REP_ERR_TOO_BIG, "too big"),
            (REP_ERR_INVALID, "refused NBD_OPT_GO for export \"disk\" (NBD_REP_ERR_INVALID)"),
            (REP_ERR + 77, "error reply 0x8000004d"),
        ];
        for (kind, want) in cases {
            let mut s = greeting(FLAG_FIXED_NEWSTYLE);
            s.extend(reply(OPT_GO, *kind, &[]));
            let e = err_of(run(false, &s).0);
            assert!(e.contains(want), "{e:?} lacks {want:?}");
        }
        // TLS required already at STRUCTURED_REPLY: fatal there.
        let mut s = greeting(FLAG_FIXED_NEWSTYLE);
        s.extend(reply(OPT_STRUCTURED_REPLY, REP_ERR_TLS_REQD, b"TLS first"));
        let (r, _, hs) = run(true, &s);
        let r = r.unwrap_err();
        assert_eq!(r.raw_errno(), libc::EOPNOTSUPP);
        assert!(r.to_string().contains("TLS first"));
        assert!(hs.abort_request().is_some());
        // Long, multi-line server messages stay one bounded line.
        let mut s = greeting(FLAG_FIXED_NEWSTYLE);
        s.extend(reply(OPT_GO, REP_ERR_UNKNOWN, "x\n".repeat(3000).as_bytes()));
        let e = err_of(run(false, &s).0);
        assert!(e.len() < 400, "{e}");
    }

    #[test]
    fn nbd_handshake_refuses_old_and_foreign_servers() {
        let e = err_of(run(true, &greeting(0)).0);
        assert!(e.contains("fixed newstyle"), "{e}");

        let mut old = NBDMAGIC.to_be_bytes().to_vec();
        old.extend_from_slice(&CLISERV_MAGIC.to_be_bytes());
        old.extend_from_slice(&[0; 8 + 4 + 124]);
        let (r, _, hs) = run(true, &old);
        assert!(err_of(r).contains("oldstyle"));
        assert!(hs.abort_request().is_none());

        let e = err_of(run(true, b"SSH-2.0-OpenSSH_9.2\r\n").0);
        assert!(e.contains("not an NBD server") && e.contains("SSH-2.0-"), "{e}");
        let e = err_of(run(true, b"HTTP/1.1 400 Bad Request\r\n\r\n").0);
        assert!(e.contains("not an NBD server"), "{e}");
    }

    #[test]
    fn nbd_handshake_rejects_garbage_replies() {
        let pre = |structured_ack: bool| {
            let mut s = greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
            if structured_ack {
                s.extend(reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
            }
            s
        };
        let ack = reply(OPT_GO, REP_ACK, &[]);
        let mut bad_magic = reply(OPT_GO, REP_ACK, &[]);
        bad_magic[0] ^= 0x40;
        let mut huge = reply(OPT_GO, REP_INFO, &[]);
        huge[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
        let mut short_info = INFO_EXPORT.to_be_bytes().to_vec();
        short_info.extend_from_slice(&[0; 9]);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (bad_magic, "bad option reply magic"),
            (reply(OPT_LIST, REP_ACK, &[]), "replied to option 3"),
            (huge, "4294967295 bytes long"),
            (reply(OPT_GO, REP_INFO, &short_info), "NBD_INFO_EXPORT of 11 bytes"),
            (reply(OPT_GO, REP_INFO, &[0]), "NBD_REP_INFO of 1 bytes"),
            ([info_block(512, 4096, 1 << 20), ack.clone()].concat(), "without sending NBD_INFO"),
            ([info_export(0, FLAG_HAS_FLAGS), ack.clone()].concat(), "is empty"),
            ([info_export(4096, 0), ack.clone()].concat(), "NBD_FLAG_HAS_FLAGS"),
            (
                [info_export(4096, 1), info_block(3, 4096, 1 << 20), ack.clone()].concat(),
                "minimum 3",
            ),
            (
                [info_export(4096, 1), info_block(512, 256, 1 << 20), ack.clone()].concat(),
                "preferred 256",
            ),
            (
                [info_export(4096, 1), info_block(1 << 17, 1 << 17, 1 << 20), ack.clone()].concat(),
                "minimum 131072",
            ),
            (
                [info_export(4096, 1), info_block(512, 4096, 1024), ack.clone()].concat(),
                "maximum 1024",
            ),
            (reply(OPT_GO, REP_SERVER, b"\0\0\0\0"), "unexpected NBD_REP_SERVER"),
            (info_export(4096, 1).repeat(65), "more than 64 replies"),
        ];
        for (tail, want) in cases {
            let mut s = pre(true);
            s.extend(&tail);
            let (r, _, hs) = run(true, &s);
            let e = err_of(r);
            assert!(e.contains(want), "{e:?} lacks {want:?}");
            assert!(hs.abort_request().is_none(), "{want}");
        }
        // A reply of an unexpected type to STRUCTURED_REPLY.
        let mut s = pre(false);
        s.extend(reply(OPT_STRUCTURED_REPLY, REP_INFO, &[0, 0]));
        assert!(err_of(run(true, &s).0).contains("unexpected NBD_REP_INFO"));
    }

    #[test]
    fn nbd_handshake_api_misuse_is_an_error() {
        let mut hs = Handshake::new("disk", true, CTX);
        assert!(hs.sent().is_err());
        assert!(hs.received(&[0; 3]).is_err());
        let mut hs = Handshake::new("disk", true, CTX);
        hs.received(&greeting(FLAG_FIXED_NEWSTYLE)).unwrap();
        assert!(matches!(hs.step(), Step::Send(_)));
        assert!(hs.received(&[0; 20]).is_err());
        // After a failure everything is refused.
        let mut hs = Handshake::new("disk", true, CTX);
        assert!(hs.received(&[0; GREETING_LEN]).is_err());
        let e = hs.received(&[0; GREETING_LEN]).unwrap_err().to_string();
        assert!(e.contains("after it failed"), "{e}");
        // An export name the protocol cannot carry.
        let mut hs = Handshake::new(&"x".repeat(MAX_EXPORT_NAME + 1), true, CTX);
        assert!(hs.received(&greeting(FLAG_FIXED_NEWSTYLE)).is_err());
    }

    /// Truncations, bit flips and random streams: an error or a sane result, never a panic.
    #[test]
    fn nbd_handshake_fuzz_never_panics() {
        let good = good_stream();
        for n in 0..good.len() {
            assert!(run(true, &good[..n]).0.is_err(), "truncated at {n}");
        }
        for i in 0..good.len() {
            for bit in 0..8 {
                let mut s = good.clone();
                s[i] ^= 1 << bit;
                if let (Ok(info), _, _) = run(true, &s) {
                    assert!(info.size > 0 && info.flags & FLAG_HAS_FLAGS != 0);
                    assert!(info.min_block.is_power_of_two() && info.min_block <= info.pref_block);
                }
            }
        }
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..2000 {
            let len = (next() % 300) as usize;
            let mut s: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            // Often start with a valid greeting so the option code gets garbage too.
            if next() % 2 == 0 {
                s.splice(0..0, greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
                if next() % 2 == 0 {
                    let at = GREETING_LEN.min(s.len());
                    s.splice(at..at, OPT_REPLY_MAGIC.to_be_bytes());
                }
            }
            let _ = run(next() % 2 == 0, &s);
        }
    }

    // ---- connect_blocking: failures without a server ----

    fn temp_dir(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "ublk-nbd-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    struct TempDir(std::path::PathBuf);

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn unix_uri(sock: &std::path::Path, export: &str) -> NbdUri {
        NbdUri::parse(&format!("nbd+unix:///{export}?socket={}", sock.display())).unwrap()
    }

    #[test]
    fn nbd_connect_errors_are_one_line() {
        // Nobody listens on the Unix path.
        let dir = temp_dir("noserver");
        let uri = unix_uri(&dir.0.join("none.sock"), "x");
        let e = connect_blocking(&uri, Duration::from_secs(1), true).unwrap_err().to_string();
        assert!(e.starts_with(&uri.text) && e.contains("cannot connect to"), "{e}");
        assert!(e.contains("is the NBD server running?") && !e.contains('\n'), "{e}");
        assert!(connect_blocking(&uri, Duration::MAX, true).is_err());

        // TCP: a port nobody listens on.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let uri = NbdUri::parse(&format!("nbd://127.0.0.1:{port}/x")).unwrap();
        let e = connect_blocking(&uri, Duration::from_secs(1), true).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "nbd://127.0.0.1:{port}/x: cannot connect to 127.0.0.1:{port}: Connection \
                 refused (os error 111) (is the NBD server running?)"
            )
        );

        // A listener that never speaks: the handshake times out.
        let sock = dir.0.join("mute.sock");
        let _mute = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let t0 = Instant::now();
        let e =
            connect_blocking(&unix_uri(&sock, "x"), Duration::from_millis(300), true).unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(3));
        assert_eq!(e.raw_errno(), libc::ETIMEDOUT);
        let e = e.to_string();
        assert!(e.contains("no answer within 0.3 s") && e.contains("greeting"), "{e}");

        // A server that hangs up at once.
        let sock = dir.0.join("hangup.sock");
        let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let t = std::thread::spawn(move || drop(l.accept()));
        let e = connect_blocking(&unix_uri(&sock, "x"), Duration::from_secs(5), true)
            .unwrap_err()
            .to_string();
        t.join().unwrap();
        assert!(e.contains("closed the connection"), "{e}");
    }

    /// A scripted server on a socketpair-like Unix listener: drives connect_blocking end to
    /// end (timeouts cleared, abort sent after a refusal).
    #[test]
    fn nbd_connect_blocking_against_scripted_server() {
        use std::io::{Read, Write};
        let dir = temp_dir("scripted");
        let sock = dir.0.join("s.sock");
        let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let t = std::thread::spawn(move || {
            // 1st connection: unknown export, then expect NBD_OPT_ABORT.
            let (mut c, _) = l.accept().unwrap();
            c.write_all(&greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)).unwrap();
            let mut b = [0u8; 4 + 16];
            c.read_exact(&mut b).unwrap();
            c.write_all(&reply(OPT_STRUCTURED_REPLY, REP_ACK, &[])).unwrap();
            let mut b = vec![0u8; go_request("nope").len()];
            c.read_exact(&mut b).unwrap();
            assert_eq!(b, go_request("nope"));
            c.write_all(&reply(OPT_GO, REP_ERR_UNKNOWN, b"no such export")).unwrap();
            let mut abort = [0u8; 16];
            c.read_exact(&mut abort).unwrap();
            assert_eq!(be32(&abort, 8), OPT_ABORT);
            // 2nd connection: success.
            let (mut c, _) = l.accept().unwrap();
            let mut s = good_stream();
            s.splice(0..GREETING_LEN, greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
            c.write_all(&s).unwrap();
            let mut rest = vec![0u8; 4 + 16 + go_request("disk").len()];
            c.read_exact(&mut rest).unwrap();
            c
        });
        let e = connect_blocking(&unix_uri(&sock, "nope"), Duration::from_secs(5), true)
            .unwrap_err()
            .to_string();
        assert!(e.ends_with("no export \"nope\" (NBD_REP_ERR_UNKNOWN: no such export)"), "{e}");
        let (fd, info) =
            connect_blocking(&unix_uri(&sock, "disk"), Duration::from_secs(5), true).unwrap();
        assert_eq!((info.size, info.structured, info.min_block), (64 << 20, true, 512));
        let _server_side = t.join().unwrap();
        let s = std::os::unix::net::UnixStream::from(fd);
        assert_eq!(s.read_timeout().unwrap(), None);
        assert_eq!(s.write_timeout().unwrap(), None);
    }

    // ---- Real servers: nbdkit and qemu-nbd, when installed ----

    mod real {
        use super::*;
        use std::io::{Read, Write};
        use std::path::{Path, PathBuf};
        use std::process::{Child, Command, Stdio};

        /// A server child process, killed and reaped on drop (before its directory goes).
        struct Server {
            child: Child,
            what: &'static str,
            dir: TempDir,
        }

        impl Drop for Server {
            fn drop(&mut self) {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }

        impl Server {
            /// Starts `prog args`, its stderr to a file in `dir`. `None` (after printing
            /// SKIP) when the program is not installed.
            fn spawn(
                what: &'static str,
                prog: &str,
                args: &[&str],
                dir: TempDir,
            ) -> Option<Server> {
                let log = std::fs::File::create(dir.0.join("server.log")).unwrap();
                let child = Command::new(prog)
                    .args(args)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::from(log))
                    .spawn();
                match child {
                    Ok(child) => Some(Server { child, what, dir }),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        eprintln!("SKIP: {prog} is not installed ({what} test)");
                        None
                    }
                    Err(e) => panic!("cannot start {prog}: {e}"),
                }
            }

            fn log(&self) -> String {
                std::fs::read_to_string(self.dir.0.join("server.log")).unwrap_or_default()
            }

            /// connect_blocking, retried while the server is still starting (bounded).
            fn connect(&mut self, uri: &NbdUri, structured: bool) -> Result<(OwnedFd, ExportInfo)> {
                let t0 = Instant::now();
                loop {
                    match connect_blocking(uri, Duration::from_secs(5), structured) {
                        Err(e)
                            if e.to_string().contains("cannot connect")
                                && t0.elapsed() < Duration::from_secs(15) =>
                        {
                            if let Some(st) = self.child.try_wait().unwrap() {
                                panic!(
                                    "{} exited ({st}) before serving: {}",
                                    self.what,
                                    self.log()
                                );
                            }
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        r => return r,
                    }
                }
            }
        }

        fn have(prog: &str, args: &[&str]) -> bool {
            match Command::new(prog).args(args).stdout(Stdio::null()).stderr(Stdio::null()).status()
            {
                Ok(st) if st.success() => true,
                Ok(_) => {
                    eprintln!("SKIP: `{prog} {}` failed", args.join(" "));
                    false
                }
                Err(_) => {
                    eprintln!("SKIP: {prog} is not installed");
                    false
                }
            }
        }

        #[derive(Debug, Default)]
        struct ReplyStats {
            error: u32,
            message: String,
            simple: bool,
            data_chunks: u32,
            hole_chunks: u32,
        }

        fn read_exact<S: Read>(s: &mut S, b: &mut [u8]) {
            s.read_exact(b).unwrap_or_else(|e| panic!("reading a reply: {e}"));
        }

        /// Reads one whole reply for `handle` with the wire decoders, feeding them the header
        /// bytes a piece at a time as a non-blocking reader would. `dst`: where a READ's data
        /// goes, with the request's offset.
        fn read_reply<S: Read>(
            s: &mut S,
            handle: u64,
            structured: bool,
            mut dst: Option<(u64, &mut [u8])>,
        ) -> ReplyStats {
            let mut st = ReplyStats::default();
            loop {
                let mut hdr = [0u8; CHUNK_HEADER_LEN];
                read_exact(s, &mut hdr[..4]);
                assert_eq!(parse_reply_header(&hdr[..4]), Ok(None));
                read_exact(s, &mut hdr[4..SIMPLE_REPLY_LEN]);
                let h = match parse_reply_header(&hdr[..SIMPLE_REPLY_LEN]).unwrap() {
                    Some(h) => h,
                    None => {
                        read_exact(s, &mut hdr[SIMPLE_REPLY_LEN..]);
                        parse_reply_header(&hdr).unwrap().expect("a whole chunk header")
                    }
                };
                assert_eq!(h.handle(), handle);
                match h {
                    ReplyHeader::Simple { error, .. } => {
                        assert!(!structured || dst.is_none(), "simple reply to a structured READ");
                        st.simple = true;
                        st.error = error;
                        if let (0, Some((_, buf))) = (error, dst.as_mut()) {
                            read_exact(s, buf);
                        }
                        return st;
                    }
                    ReplyHeader::Chunk { kind, length, .. } => {
                        assert!(structured, "chunk without structured replies");
                        match kind {
                            REPLY_TYPE_NONE => assert_eq!(length, 0),
                            REPLY_TYPE_OFFSET_DATA => {
                                let n = data_len(length).unwrap() as usize;
                                let mut o = [0u8; DATA_OFFSET_LEN];
                                read_exact(s, &mut o);
                                let off = parse_data_offset(&o).unwrap();
                                let (base, buf) = dst.as_mut().expect("data for a READ");
                                let at = (off - *base) as usize;
                                read_exact(s, &mut buf[at..at + n]);
                                st.data_chunks += 1;
                            }
                            REPLY_TYPE_OFFSET_HOLE => {
                                let mut p = [0u8; HOLE_PAYLOAD_LEN];
                                assert_eq!(length as usize, p.len());
                                read_exact(s, &mut p);
                                let (off, size) = parse_hole(&p).unwrap();
                                let (base, buf) = dst.as_mut().expect("a hole for a READ");
                                let at = (off - *base) as usize;
                                buf[at..at + size as usize].fill(0);
                                st.hole_chunks += 1;
                            }
                            k if is_error_chunk(k) => {
                                assert!(length as usize <= MAX_ERROR_MESSAGE + 14);
                                let mut p = vec![0u8; length as usize];
                                read_exact(s, &mut p);
                                let e = parse_error_chunk(k, &p).unwrap();
                                st.error = e.error;
                                st.message = e.message_line();
                            }
                            k => panic!("unexpected chunk type {k}"),
                        }
                        if h.is_done() {
                            return st;
                        }
                    }
                }
            }
        }

        fn request<S: Write>(s: &mut S, flags: u16, cmd: u16, handle: u64, off: u64, len: u32) {
            let mut h = [0u8; REQUEST_LEN];
            encode_request(&mut h, flags, cmd, handle, off, len);
            s.write_all(&h).unwrap();
        }

        /// WRITE, FLUSH, READ (spanning unwritten blocks), an out-of-range READ, DISC.
        fn io_roundtrip<S: Read + Write>(what: &str, s: &mut S, info: &ExportInfo) {
            let structured = info.structured;
            let bs = 4096u64.max(u64::from(info.min_block));
            assert!(info.size >= 8 * bs && u64::from(info.max_block) >= 3 * bs);
            let data: Vec<u8> = (0..bs).map(|i| (i * 7 + 3) as u8).collect();

            let fua = if info.has(FLAG_SEND_FUA) { CMD_FLAG_FUA } else { 0 };
            request(s, fua, CMD_WRITE, 0x1111, 3 * bs, bs as u32);
            s.write_all(&data).unwrap();
            let st = read_reply(s, 0x1111, structured, None);
            assert_eq!(st.error, 0, "{what}: WRITE failed: {st:?}");

            if info.has(FLAG_SEND_FLUSH) {
                request(s, 0, CMD_FLUSH, 0x2222, 0, 0);
                assert_eq!(read_reply(s, 0x2222, structured, None).error, 0, "{what}: FLUSH");
            }

            let mut buf = vec![0xaau8; 3 * bs as usize];
            request(s, 0, CMD_READ, 0x3333, 2 * bs, buf.len() as u32);
            let st = read_reply(s, 0x3333, structured, Some((2 * bs, &mut buf)));
            assert_eq!(st.error, 0, "{what}: READ failed: {st:?}");
            let bs = bs as usize;
            assert!(buf[..bs].iter().all(|&b| b == 0), "{what}: unwritten block 2 not zero");
            assert_eq!(&buf[bs..2 * bs], &data[..], "{what}: block 3 differs");
            assert!(buf[2 * bs..].iter().all(|&b| b == 0), "{what}: unwritten block 4 not zero");
            eprintln!("{what}: READ reply {st:?}");

            // A READ past the end: the server's error, as a simple reply or an error chunk.
            request(s, 0, CMD_READ, 0x4444, info.size - bs as u64, 2 * bs as u32);
            let mut sink = vec![0u8; 2 * bs];
            let st = read_reply(s, 0x4444, structured, Some((info.size - bs as u64, &mut sink)));
            assert_ne!(st.error, 0, "{what}: a READ past the end succeeded");
            eprintln!(
                "{what}: READ past the end: {} ({}) {:?}",
                error_name(st.error),
                io::Error::from_raw_os_error(errno_of(st.error)),
                st.message
            );

            request(s, 0, CMD_DISC, 0x5555, 0, 0);
        }

        fn show(what: &str, info: &ExportInfo) {
            let names = [
                (FLAG_READ_ONLY, "READ_ONLY"),
                (FLAG_SEND_FLUSH, "FLUSH"),
                (FLAG_SEND_FUA, "FUA"),
                (FLAG_ROTATIONAL, "ROTATIONAL"),
                (FLAG_SEND_TRIM, "TRIM"),
                (FLAG_SEND_WRITE_ZEROES, "WRITE_ZEROES"),
                (FLAG_SEND_DF, "DF"),
                (FLAG_CAN_MULTI_CONN, "MULTI_CONN"),
                (FLAG_SEND_RESIZE, "RESIZE"),
                (FLAG_SEND_CACHE, "CACHE"),
                (FLAG_SEND_FAST_ZERO, "FAST_ZERO"),
            ];
            let set: Vec<&str> =
                names.iter().filter(|(f, _)| info.has(*f)).map(|(_, n)| *n).collect();
            eprintln!("{what}: {info:?} flags {:#06x} = {}", info.flags, set.join(" "));
        }

        fn check_sane(what: &str, info: &ExportInfo, size: u64) {
            show(what, info);
            assert_eq!(info.size, size, "{what}");
            assert!(info.has(FLAG_HAS_FLAGS) && !info.has(FLAG_READ_ONLY), "{what}");
            assert!(info.min_block.is_power_of_two() && info.min_block <= 4096, "{what}");
            assert!(info.pref_block >= info.min_block && info.max_block >= info.pref_block);
        }

        fn unix_stream(fd: OwnedFd) -> std::os::unix::net::UnixStream {
            let s = std::os::unix::net::UnixStream::from(fd);
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s
        }

        fn unknown_export(what: &str, server: &mut Server, sock: &Path) {
            let uri = unix_uri(sock, "no-such-export");
            let e = server.connect(&uri, true).map(|_| ()).unwrap_err().to_string();
            eprintln!("{what}: unknown export: {e}");
            assert!(!e.contains('\n'), "{e}");
            assert!(
                e.starts_with(&format!(
                    "{}: the server has no export \"no-such-export\" (NBD_REP_ERR_UNKNOWN",
                    uri.text
                )),
                "{e}"
            );
        }

        #[test]
        fn nbd_real_nbdkit_memory() {
            if !have("nbdkit", &["--dump-plugin", "memory"]) {
                return;
            }
            let dir = temp_dir("nbdkit");
            let sock: PathBuf = dir.0.join("nbd.sock");
            let s = sock.to_str().unwrap().to_string();
            let args = ["-f", "--exit-with-parent", "-U", &s, "-e", "exp", "memory", "64M"];
            let Some(mut server) = Server::spawn("nbdkit memory", "nbdkit", &args, dir) else {
                return;
            };
            for structured in [true, false] {
                let (fd, info) = server.connect(&unix_uri(&sock, "exp"), structured).unwrap();
                assert_eq!(info.structured, structured);
                check_sane("nbdkit memory", &info, 64 << 20);
                io_roundtrip("nbdkit memory", &mut unix_stream(fd), &info);
            }
        }

        #[test]
        fn nbd_real_nbdkit_unknown_export() {
            if !have("nbdkit", &["--dump-plugin", "memory"]) {
                return;
            }
            let dir = temp_dir("nbdkit-strict");
            let sock: PathBuf = dir.0.join("nbd.sock");
            let s = sock.to_str().unwrap().to_string();
            let args = [
                "-f",
                "--exit-with-parent",
                "-U",
                &s,
                "--filter=exportname",
                "memory",
                "1M",
                "exportname-strict=true",
                "exportname=exp",
            ];
            let Some(mut server) = Server::spawn("nbdkit exportname", "nbdkit", &args, dir) else {
                return;
            };
            unknown_export("nbdkit (exportname-strict)", &mut server, &sock);
            let (_fd, info) = server.connect(&unix_uri(&sock, "exp"), true).unwrap();
            assert_eq!(info.size, 1 << 20);
        }

        #[test]
        fn nbd_real_nbdkit_tcp() {
            if !have("nbdkit", &["--dump-plugin", "memory"]) {
                return;
            }
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let port = l.local_addr().unwrap().port().to_string();
            drop(l);
            let dir = temp_dir("nbdkit-tcp");
            let args =
                ["-f", "--exit-with-parent", "-i", "127.0.0.1", "-p", &port, "memory", "16M"];
            let Some(mut server) = Server::spawn("nbdkit tcp", "nbdkit", &args, dir) else {
                return;
            };
            let uri = NbdUri::parse(&format!("nbd://127.0.0.1:{port}")).unwrap();
            let (fd, info) = server.connect(&uri, true).unwrap();
            check_sane("nbdkit tcp", &info, 16 << 20);
            let mut s = std::net::TcpStream::from(fd);
            assert!(s.nodelay().unwrap());
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            io_roundtrip("nbdkit tcp", &mut s, &info);
        }

        #[test]
        fn nbd_real_qemu_nbd() {
            if !have("qemu-nbd", &["--version"]) {
                return;
            }
            let dir = temp_dir("qemu-nbd");
            let sock: PathBuf = dir.0.join("nbd.sock");
            let img = dir.0.join("disk.img");
            std::fs::File::create(&img).unwrap().set_len(16 << 20).unwrap();
            let (s, i) = (sock.to_str().unwrap().to_string(), img.to_str().unwrap().to_string());
            let args = ["-k", &s, "-x", "exp", "-f", "raw", "-t", "--shared=8", &i];
            let Some(mut server) = Server::spawn("qemu-nbd", "qemu-nbd", &args, dir) else {
                return;
            };
            for structured in [true, false] {
                let (fd, info) = server.connect(&unix_uri(&sock, "exp"), structured).unwrap();
                assert_eq!(info.structured, structured);
                check_sane("qemu-nbd", &info, 16 << 20);
                io_roundtrip("qemu-nbd", &mut unix_stream(fd), &info);
            }
            unknown_export("qemu-nbd", &mut server, &sock);
            // The data really reached the file.
            let mut f = std::fs::File::open(&img).unwrap();
            let mut b = vec![0u8; 4096];
            std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(3 * 4096)).unwrap();
            f.read_exact(&mut b).unwrap();
            assert_eq!(b[1], 10);
        }
    }
}
