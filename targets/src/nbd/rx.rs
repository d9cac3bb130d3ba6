//! The reply stream of one NBD connection, parsed without doing I/O: bytes come in (into a
//! staging buffer, or straight into a request's buffer), replies go out to the [`Book`] of
//! requests awaiting them. Simple and structured replies, in any order, matched by handle.
//!
//! Read data lands in the tag's buffer: what arrived with the headers is copied out of the
//! staging buffer; a large remainder is received straight into the tag's buffer
//! ([`Next::Direct`]), so big reads are not copied twice.
//!
//! Zero copy (`exact`): the request's pages are a fixed buffer of the ring, which no code of
//! ours can write to. So every byte of read data is received straight into it, and receives
//! into the staging buffer stop where the header (or chunk field) being parsed ends. Only
//! simple replies are asked for then: a structured hole would have to be zeroed in pages we
//! cannot touch.

use std::fmt;

use super::wire::{self, ReplyHeader};

/// Staging buffer size: holds many small replies at once, and any chunk body we parse whole.
pub const STAGING: usize = 64 << 10;
/// Structured chunk bodies parsed whole (errors, holes) are at most this long.
const MAX_BODY: usize = 4096 + 64;
/// Below this, the rest of a read's data is received into the staging buffer and copied (one
/// receive may then bring the next replies too); from this size up, straight into the tag's.
const DIRECT_MIN: usize = 16 << 10;

/// A request awaiting its reply, as the parser needs it.
#[derive(Clone, Copy, Debug)]
pub struct Awaiting {
    pub tag: u16,
    pub read: bool,
    /// The request's device offset and length (reads: where data chunks may land).
    pub offset: u64,
    pub len: u32,
    /// The tag's buffer (`len` bytes at least); zero copy: null, the base of `fixed`.
    pub buf: *mut u8,
    /// Zero copy: the ring's fixed buffer that holds the request's pages (addressed from 0).
    pub fixed: Option<u16>,
    /// The result a success commits (bytes for reads and writes, 0 for the others).
    pub ok: i32,
}

/// The requests of a connection, as the parser sees them.
pub trait Book {
    /// The request `handle` names, if one with that handle awaits its reply.
    fn awaiting(&self, handle: u64) -> Option<Awaiting>;
    /// Its reply is complete: `res` bytes done, or `-errno`.
    fn reply(&mut self, tag: u16, res: i32);
}

/// What the stream needs next.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// More bytes into the staging buffer: [`Rx::space`], then [`Rx::filled`].
    Staging,
    /// `len` bytes straight into a request's buffer at `at` (zero copy: at that offset of the
    /// ring's fixed buffer `fixed`), then [`Rx::direct_done`].
    Direct { at: *mut u8, len: usize, fixed: Option<u16> },
}

/// The server broke the protocol: the connection cannot be trusted any more.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError(pub String);

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Between replies: the next bytes are a reply header.
    Header,
    /// Read data for `tag`: `left` bytes into its buffer at `dst`; then `finish` ends it.
    Data { tag: u16, dst: usize, left: usize, finish: Option<i32> },
    /// A structured OFFSET_DATA chunk: its 8-byte offset comes first.
    DataOffset { req: u16, flags: u16, len: usize },
    /// A structured chunk whose whole body is parsed from the staging buffer.
    Body { tag: u16, flags: u16, kind: u16, len: usize },
    /// Bytes to drop (a chunk type we do not use).
    Skip { tag: u16, flags: u16, left: usize },
}

pub struct Rx {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    state: State,
    /// Structured replies: the first error chunk of each tag's current reply (0: none).
    errors: Box<[i32]>,
    /// Requests of the reply being parsed (structured: the chunks name it again each time).
    current: Option<Awaiting>,
    /// Zero copy: never receive past the end of what is being parsed (module comment).
    exact: bool,
}

impl Rx {
    pub fn new(depth: u16, exact: bool) -> Rx {
        Rx {
            exact,
            buf: vec![0u8; STAGING].into_boxed_slice(),
            start: 0,
            end: 0,
            state: State::Header,
            errors: vec![0; usize::from(depth)].into_boxed_slice(),
            current: None,
        }
    }

    /// Forgets everything (the connection was lost; its replies will never come).
    pub fn reset(&mut self) {
        self.start = 0;
        self.end = 0;
        self.state = State::Header;
        self.errors.fill(0);
        self.current = None;
    }

    /// Where the next receive into the staging buffer goes (never empty).
    pub fn space(&mut self) -> (*mut u8, usize) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() || self.buf.len() - self.start < MAX_BODY {
            // Keep a partial header or body contiguous with what comes next.
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let free = self.buf.len() - self.end;
        let len = if self.exact { free.min(self.needed()) } else { free };
        (self.buf[self.end..].as_mut_ptr(), len)
    }

    /// Exact mode: how many more bytes end the header, chunk field or body being parsed (at
    /// least 1). Read data is never staged then.
    fn needed(&self) -> usize {
        let avail = self.avail();
        let want = match self.state {
            State::Header => {
                let b = &self.buf[self.start..self.end];
                let chunk = b.len() >= 4
                    && u32::from_be_bytes([b[0], b[1], b[2], b[3]]) == wire::STRUCTURED_REPLY_MAGIC;
                if chunk {
                    wire::CHUNK_HEADER_LEN
                } else {
                    wire::SIMPLE_REPLY_LEN
                }
            }
            State::DataOffset { .. } => 8,
            State::Body { len, .. } => len,
            State::Skip { left, .. } => left,
            State::Data { .. } => 0,
        };
        want.saturating_sub(avail).max(1)
    }

    /// `n` bytes arrived where [`Rx::space`] pointed.
    pub fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// `n` bytes arrived where [`Next::Direct`] pointed.
    pub fn direct_done(&mut self, book: &mut dyn Book, n: usize) {
        if let State::Data { tag, dst, left, finish } = self.state {
            let n = n.min(left);
            self.state = State::Data { tag, dst: dst + n, left: left - n, finish };
            if n == left {
                self.end_data(book, tag, finish);
            }
        }
    }

    fn avail(&self) -> usize {
        self.end - self.start
    }

    /// Parses what the staging buffer holds; says what it needs next.
    pub fn parse(&mut self, book: &mut dyn Book) -> Result<Next, ProtocolError> {
        loop {
            match self.state {
                State::Header => {
                    let h = match wire::parse_reply_header(&self.buf[self.start..self.end]) {
                        Ok(Some(h)) => h,
                        Ok(None) => return Ok(Next::Staging),
                        Err(e) => return Err(ProtocolError(e.to_string())),
                    };
                    self.start += h.len();
                    self.header(book, h)?;
                }
                State::Data { tag, dst, left, finish } => {
                    let n = left.min(self.avail());
                    if n > 0 && self.exact {
                        // Receives stop at each header's end: this cannot happen.
                        return Err(ProtocolError(
                            "read data in the staging buffer in zero-copy mode".into(),
                        ));
                    }
                    if n > 0 {
                        let a = self.current.filter(|a| a.tag == tag);
                        if let Some(a) = a {
                            debug_assert!(dst + n <= a.len as usize);
                            // SAFETY: `dst + n <= len` was checked against the request when
                            // the data state was entered; the tag's buffer is `len` bytes or
                            // more and stays the request's until we report its reply.
                            unsafe {
                                std::ptr::copy_nonoverlapping(
                                    self.buf[self.start..].as_ptr(),
                                    a.buf.add(dst),
                                    n,
                                )
                            };
                        }
                        self.start += n;
                    }
                    if n == left {
                        self.end_data(book, tag, finish);
                        continue;
                    }
                    self.state = State::Data { tag, dst: dst + n, left: left - n, finish };
                    let left = left - n;
                    if left >= DIRECT_MIN || self.exact {
                        if let Some(a) = self.current.filter(|a| a.tag == tag) {
                            // In bounds (as above); only an address (zero copy: an offset from
                            // the null base of the fixed buffer) is formed here.
                            let at = a.buf.wrapping_add(dst + n);
                            return Ok(Next::Direct { at, len: left, fixed: a.fixed });
                        }
                    }
                    return Ok(Next::Staging);
                }
                State::DataOffset { req, flags, len } => {
                    if self.avail() < 8 {
                        return Ok(Next::Staging);
                    }
                    let off = u64::from_be_bytes(take8(&self.buf[self.start..]));
                    self.start += 8;
                    let a = self.current.filter(|a| a.tag == req).ok_or_else(|| {
                        ProtocolError("data chunk for a request that is not a read".into())
                    })?;
                    let dlen = len - 8;
                    // Checked: a server's offset near 2^64 must not wrap `r + dlen` into range.
                    let rel = off.checked_sub(a.offset).filter(|r| {
                        r.checked_add(dlen as u64).is_some_and(|e| e <= u64::from(a.len))
                    });
                    let Some(rel) = rel else {
                        return Err(ProtocolError(format!(
                            "data chunk at {off}+{dlen} outside the read of {}+{}",
                            a.offset, a.len
                        )));
                    };
                    let done = flags & wire::REPLY_FLAG_DONE != 0;
                    let finish = done.then(|| self.result(req, a.ok));
                    self.state = State::Data { tag: req, dst: rel as usize, left: dlen, finish };
                }
                State::Body { tag, flags, kind, len } => {
                    if self.avail() < len {
                        return Ok(Next::Staging);
                    }
                    let body = &self.buf[self.start..self.start + len];
                    let r = chunk_body(&mut self.errors, self.current, tag, kind, body);
                    self.start += len;
                    r?;
                    self.state = State::Header;
                    if flags & wire::REPLY_FLAG_DONE != 0 {
                        self.end_reply(book, tag);
                    }
                }
                State::Skip { tag, flags, left } => {
                    let n = left.min(self.avail());
                    self.start += n;
                    if n < left {
                        self.state = State::Skip { tag, flags, left: left - n };
                        return Ok(Next::Staging);
                    }
                    self.state = State::Header;
                    if flags & wire::REPLY_FLAG_DONE != 0 {
                        self.end_reply(book, tag);
                    }
                }
            }
        }
    }

    fn header(&mut self, book: &mut dyn Book, h: ReplyHeader) -> Result<(), ProtocolError> {
        let handle = match h {
            ReplyHeader::Simple { handle, .. } | ReplyHeader::Chunk { handle, .. } => handle,
        };
        let a = book.awaiting(handle).ok_or_else(|| {
            ProtocolError(format!("reply for handle {handle:#x}, which no request awaits"))
        })?;
        // Chunks of different replies may interleave: each header names its request again.
        self.current = Some(a);
        match h {
            ReplyHeader::Simple { error, .. } => {
                if error != 0 {
                    self.state = State::Header;
                    self.current = None;
                    book.reply(a.tag, -wire::errno_of(error));
                } else if a.read {
                    self.state = State::Data {
                        tag: a.tag,
                        dst: 0,
                        left: a.len as usize,
                        finish: Some(a.ok),
                    };
                } else {
                    self.state = State::Header;
                    self.current = None;
                    book.reply(a.tag, a.ok);
                }
            }
            ReplyHeader::Chunk { .. } if self.exact => {
                return Err(ProtocolError(
                    "a structured reply, which zero-copy mode did not ask for".into(),
                ));
            }
            ReplyHeader::Chunk { flags, kind, length, .. } => {
                let len = length as usize;
                let tag = a.tag;
                self.state = match kind {
                    wire::REPLY_TYPE_OFFSET_DATA if a.read && len >= 8 => {
                        State::DataOffset { req: tag, flags, len }
                    }
                    wire::REPLY_TYPE_NONE if len == 0 => State::Skip { tag, flags, left: 0 },
                    wire::REPLY_TYPE_OFFSET_HOLE
                    | wire::REPLY_TYPE_ERROR
                    | wire::REPLY_TYPE_ERROR_OFFSET
                        if len <= MAX_BODY =>
                    {
                        State::Body { tag, flags, kind, len }
                    }
                    k if wire::is_error_chunk(k) && len <= MAX_BODY => {
                        State::Body { tag, flags, kind: k, len }
                    }
                    wire::REPLY_TYPE_OFFSET_DATA
                    | wire::REPLY_TYPE_NONE
                    | wire::REPLY_TYPE_OFFSET_HOLE
                    | wire::REPLY_TYPE_ERROR
                    | wire::REPLY_TYPE_ERROR_OFFSET => {
                        return Err(ProtocolError(format!(
                            "structured chunk type {kind} of {len} bytes does not fit its request"
                        )))
                    }
                    // Unknown (or block status) chunks: skipped.
                    _ => State::Skip { tag, flags, left: len },
                };
            }
        }
        Ok(())
    }

    fn result(&self, tag: u16, ok: i32) -> i32 {
        match self.errors[usize::from(tag)] {
            0 => ok,
            e => e,
        }
    }

    fn end_data(&mut self, book: &mut dyn Book, tag: u16, finish: Option<i32>) {
        self.state = State::Header;
        if let Some(res) = finish {
            self.current = None;
            self.errors[usize::from(tag)] = 0;
            book.reply(tag, res);
        }
    }

    fn end_reply(&mut self, book: &mut dyn Book, tag: u16) {
        let ok = self.current.filter(|a| a.tag == tag).map_or(0, |a| a.ok);
        let res = self.result(tag, ok);
        self.current = None;
        self.errors[usize::from(tag)] = 0;
        book.reply(tag, res);
    }
}

/// A whole chunk body: a hole is zeroed in the buffer, an error remembered in `errors`.
fn chunk_body(
    errors: &mut [i32],
    current: Option<Awaiting>,
    tag: u16,
    kind: u16,
    body: &[u8],
) -> Result<(), ProtocolError> {
    let a = current.filter(|a| a.tag == tag);
    if kind == wire::REPLY_TYPE_OFFSET_HOLE {
        let a = a
            .filter(|a| a.read && body.len() == 12)
            .ok_or_else(|| ProtocolError("hole chunk that does not fit its request".into()))?;
        let off = u64::from_be_bytes(take8(body));
        let len = u32::from_be_bytes([body[8], body[9], body[10], body[11]]);
        let rel = off
            .checked_sub(a.offset)
            .filter(|r| r.checked_add(u64::from(len)).is_some_and(|e| e <= u64::from(a.len)))
            .ok_or_else(|| {
                ProtocolError(format!(
                    "hole at {off}+{len} outside the read of {}+{}",
                    a.offset, a.len
                ))
            })?;
        // SAFETY: `rel + len <= a.len` (checked above); the tag's buffer holds `a.len`
        // bytes and is the request's until we report its reply.
        unsafe { std::ptr::write_bytes(a.buf.add(rel as usize), 0, len as usize) };
        return Ok(());
    }
    // Every error chunk starts with its error number.
    let e = if body.len() >= 4 {
        u32::from_be_bytes([body[0], body[1], body[2], body[3]])
    } else {
        wire::NBD_EIO
    };
    let slot = &mut errors[usize::from(tag)];
    if *slot == 0 {
        *slot = -wire::errno_of(if e == 0 { wire::NBD_EIO } else { e });
    }
    Ok(())
}

fn take8(b: &[u8]) -> [u8; 8] {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Requests by tag, with buffers; records replies.
    struct Reqs {
        bufs: Vec<Vec<u8>>,
        live: Vec<Option<(u64, bool, u64)>>,
        replies: Vec<(u16, i32)>,
        /// Zero copy: tag i's buffer is "fixed buffer" i, reached only through Direct.
        fixed: bool,
    }

    impl Reqs {
        fn new() -> Reqs {
            Reqs {
                bufs: vec![vec![0xee; 64 << 10]; 4],
                live: vec![None; 4],
                replies: vec![],
                fixed: false,
            }
        }
    }

    impl Book for Reqs {
        fn awaiting(&self, handle: u64) -> Option<Awaiting> {
            let tag = (handle & 0xffff) as u16;
            let (h, read, offset) = self.live.get(usize::from(tag)).copied().flatten()?;
            (h == handle).then(|| Awaiting {
                tag,
                read,
                offset,
                len: 64 << 10,
                buf: if self.fixed {
                    std::ptr::null_mut()
                } else {
                    self.bufs[usize::from(tag)].as_ptr() as *mut u8
                },
                fixed: self.fixed.then_some(tag),
                ok: if read { 64 << 10 } else { 0 },
            })
        }
        fn reply(&mut self, tag: u16, res: i32) {
            self.live[usize::from(tag)] = None;
            self.replies.push((tag, res));
        }
    }

    fn simple(error: u32, handle: u64) -> Vec<u8> {
        let mut v = 0x6744_6698u32.to_be_bytes().to_vec();
        v.extend(error.to_be_bytes());
        v.extend(handle.to_be_bytes());
        v
    }

    fn chunk(flags: u16, kind: u16, handle: u64, body: &[u8]) -> Vec<u8> {
        let mut v = 0x668e_33efu32.to_be_bytes().to_vec();
        v.extend(flags.to_be_bytes());
        v.extend(kind.to_be_bytes());
        v.extend(handle.to_be_bytes());
        v.extend((body.len() as u32).to_be_bytes());
        v.extend(body);
        v
    }

    /// Feeds `stream` in pieces of `step` bytes, following Direct requests.
    fn feed(rx: &mut Rx, book: &mut Reqs, stream: &[u8], step: usize) -> Result<(), ProtocolError> {
        let mut at = 0;
        let mut next = rx.parse(book)?;
        while at < stream.len() {
            match next {
                Next::Staging => {
                    let (p, free) = rx.space();
                    // Zero copy: no receive may run past a header into read data.
                    assert!(!book.fixed || free <= wire::CHUNK_HEADER_LEN, "staged {free}");
                    let n = step.min(free).min(stream.len() - at);
                    // SAFETY: test: `p` has `free` bytes.
                    unsafe { std::ptr::copy_nonoverlapping(stream[at..].as_ptr(), p, n) };
                    rx.filled(n);
                    at += n;
                }
                Next::Direct { at: off, len, fixed: Some(i) } => {
                    let n = step.min(len).min(stream.len() - at);
                    let dst = &mut book.bufs[usize::from(i)][off as usize..off as usize + n];
                    dst.copy_from_slice(&stream[at..at + n]);
                    rx.direct_done(book, n);
                    at += n;
                }
                Next::Direct { at: p, len, fixed: None } => {
                    let n = step.min(len).min(stream.len() - at);
                    // SAFETY: test: `p` has `len` bytes.
                    unsafe { std::ptr::copy_nonoverlapping(stream[at..].as_ptr(), p, n) };
                    rx.direct_done(book, n);
                    at += n;
                }
            }
            next = rx.parse(book)?;
        }
        Ok(())
    }

    #[test]
    fn simple_replies_in_any_order_with_read_data() {
        for step in [1, 7, 4096, 1 << 20] {
            let mut b = Reqs::new();
            b.live[0] = Some((0x1_0000, true, 0));
            b.live[1] = Some((0x2_0001, false, 0));
            b.live[2] = Some((0x3_0002, true, 4096));
            let data: Vec<u8> = (0..64 << 10).map(|i| (i % 251) as u8).collect();
            let mut s = simple(0, 0x2_0001);
            s.extend(simple(0, 0x3_0002));
            s.extend(&data);
            s.extend(simple(5, 0x1_0000));
            let mut rx = Rx::new(4, false);
            feed(&mut rx, &mut b, &s, step).unwrap();
            assert_eq!(b.replies, [(1, 0), (2, 64 << 10), (0, -libc::EIO)], "step {step}");
            assert_eq!(b.bufs[2], data);
        }
    }

    #[test]
    fn zero_copy_receives_stop_at_each_header_and_data_goes_to_the_fixed_buffer() {
        for step in [1, 7, 4096, 1 << 20] {
            let mut b = Reqs::new();
            b.fixed = true;
            b.live[0] = Some((0x1_0000, true, 0));
            b.live[1] = Some((0x2_0001, false, 0));
            b.live[2] = Some((0x3_0002, true, 4096));
            let data: Vec<u8> = (0..64 << 10).map(|i| (i % 251) as u8).collect();
            let mut s = simple(0, 0x2_0001);
            s.extend(simple(0, 0x3_0002));
            s.extend(&data);
            s.extend(simple(0, 0x1_0000));
            s.extend(data.iter().rev());
            let mut rx = Rx::new(4, true);
            feed(&mut rx, &mut b, &s, step).unwrap();
            assert_eq!(b.replies, [(1, 0), (2, 64 << 10), (0, 64 << 10)], "step {step}");
            assert_eq!(b.bufs[2], data);
            assert!(b.bufs[0].iter().eq(data.iter().rev()));
        }
        // A structured reply was not asked for: refused, nothing applied.
        let mut b = Reqs::new();
        b.fixed = true;
        b.live[0] = Some((0x1_0000, true, 0));
        let mut rx = Rx::new(4, true);
        let s = chunk(wire::REPLY_FLAG_DONE, wire::REPLY_TYPE_NONE, 0x1_0000, &[]);
        assert!(feed(&mut rx, &mut b, &s, 64).is_err());
        assert!(b.replies.is_empty());
    }

    #[test]
    fn structured_chunks_data_holes_and_errors() {
        for step in [3, 100, 1 << 20] {
            let mut b = Reqs::new();
            b.live[0] = Some((0x10_0000, true, 1 << 20));
            b.live[1] = Some((0x11_0001, true, 0));
            let mut s = Vec::new();
            // Tag 0: second half as data, first half as a hole, then done.
            let mut body = ((1u64 << 20) + (32 << 10)).to_be_bytes().to_vec();
            body.extend(vec![7u8; 32 << 10]);
            s.extend(chunk(0, wire::REPLY_TYPE_OFFSET_DATA, 0x10_0000, &body));
            let mut hole = (1u64 << 20).to_be_bytes().to_vec();
            hole.extend((32u32 << 10).to_be_bytes());
            s.extend(chunk(0, wire::REPLY_TYPE_OFFSET_HOLE, 0x10_0000, &hole));
            s.extend(chunk(wire::REPLY_FLAG_DONE, wire::REPLY_TYPE_NONE, 0x10_0000, &[]));
            // Tag 1: an error chunk, done.
            let mut err = 28u32.to_be_bytes().to_vec();
            err.extend(4u16.to_be_bytes());
            err.extend(b"full");
            s.extend(chunk(wire::REPLY_FLAG_DONE, wire::REPLY_TYPE_ERROR, 0x11_0001, &err));
            let mut rx = Rx::new(4, false);
            feed(&mut rx, &mut b, &s, step).unwrap();
            assert_eq!(b.replies, [(0, 64 << 10), (1, -libc::ENOSPC)], "step {step}");
            assert!(b.bufs[0][..32 << 10].iter().all(|&x| x == 0));
            assert!(b.bufs[0][32 << 10..].iter().all(|&x| x == 7));
        }
    }

    #[test]
    fn protocol_errors_are_reported_not_applied() {
        let mut b = Reqs::new();
        b.live[0] = Some((0x1_0000, true, 0));
        let mut rx = Rx::new(4, false);
        // Unknown handle.
        assert!(feed(&mut rx, &mut b, &simple(0, 0x9_0000), 64).is_err());
        // Data outside the request.
        let mut rx = Rx::new(4, false);
        let mut body = (1u64 << 30).to_be_bytes().to_vec();
        body.extend([0u8; 16]);
        let s = chunk(0, wire::REPLY_TYPE_OFFSET_DATA, 0x1_0000, &body);
        assert!(feed(&mut rx, &mut b, &s, 64).is_err());
        // Bad magic.
        let mut rx = Rx::new(4, false);
        assert!(feed(&mut rx, &mut b, &[0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0], 64).is_err());
        assert!(b.replies.is_empty());
    }
}
