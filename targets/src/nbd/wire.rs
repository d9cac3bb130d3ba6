//! NBD transmission phase on the wire: request encoding, reply header and chunk payload
//! decoding, and the protocol's error numbers. Allocation-free; every decoder takes the bytes
//! it was given and returns `Ok(None)` or an error rather than reading past them.
//!
//! Values are from the NBD protocol document (doc/proto.md, "Transmission" and "Values").

use std::fmt;

use ublk_fast_engine::error::Error;

// ---- Magic numbers ----

pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Only sent after `NBD_OPT_EXTENDED_HEADERS`, which this client never negotiates.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

// ---- Request types (`NBD_CMD_*`) ----

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// ---- Command flags (`NBD_CMD_FLAG_*`) ----

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// ---- Transmission flags (`NBD_FLAG_*`, sent with the export's size) ----

pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_RESIZE: u16 = 1 << 9;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// ---- Structured reply flags and chunk types ----

pub const REPLY_FLAG_DONE: u16 = 1 << 0;

pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

// ---- Error values (`NBD_E*`) ----

pub const NBD_EPERM: u32 = 1;
pub const NBD_EIO: u32 = 5;
pub const NBD_ENOMEM: u32 = 12;
pub const NBD_EINVAL: u32 = 22;
pub const NBD_ENOSPC: u32 = 28;
pub const NBD_EOVERFLOW: u32 = 75;
pub const NBD_ENOTSUP: u32 = 95;
pub const NBD_ESHUTDOWN: u32 = 108;

// ---- Sizes ----

pub const REQUEST_LEN: usize = 28;
pub const SIMPLE_REPLY_LEN: usize = 16;
pub const CHUNK_HEADER_LEN: usize = 20;
/// Payload of an `OFFSET_HOLE` chunk: offset u64 + hole size u32.
pub const HOLE_PAYLOAD_LEN: usize = 12;
/// Leading offset of an `OFFSET_DATA` chunk's payload; the data follows it.
pub const DATA_OFFSET_LEN: usize = 8;
/// The longest error message a server may put in an error chunk.
pub const MAX_ERROR_MESSAGE: usize = 4096;

/// Encodes one request header (big endian). A WRITE's `len` data bytes follow it on the wire.
pub fn encode_request(
    out: &mut [u8; REQUEST_LEN],
    flags: u16,
    cmd: u16,
    handle: u64,
    offset: u64,
    len: u32,
) {
    out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&cmd.to_be_bytes());
    out[8..16].copy_from_slice(&handle.to_be_bytes());
    out[16..24].copy_from_slice(&offset.to_be_bytes());
    out[24..28].copy_from_slice(&len.to_be_bytes());
}

/// The command's spec name, for messages.
pub fn cmd_name(cmd: u16) -> &'static str {
    match cmd {
        CMD_READ => "NBD_CMD_READ",
        CMD_WRITE => "NBD_CMD_WRITE",
        CMD_DISC => "NBD_CMD_DISC",
        CMD_FLUSH => "NBD_CMD_FLUSH",
        CMD_TRIM => "NBD_CMD_TRIM",
        CMD_CACHE => "NBD_CMD_CACHE",
        CMD_WRITE_ZEROES => "NBD_CMD_WRITE_ZEROES",
        CMD_BLOCK_STATUS => "NBD_CMD_BLOCK_STATUS",
        _ => "unknown NBD command",
    }
}

/// The positive errno for an NBD error value; 0 stays 0. The spec says to treat an unknown
/// value as `NBD_EINVAL`.
pub fn errno_of(nbd_error: u32) -> i32 {
    match nbd_error {
        0 => 0,
        NBD_EPERM => libc::EPERM,
        NBD_EIO => libc::EIO,
        NBD_ENOMEM => libc::ENOMEM,
        NBD_EINVAL => libc::EINVAL,
        NBD_ENOSPC => libc::ENOSPC,
        NBD_EOVERFLOW => libc::EOVERFLOW,
        NBD_ENOTSUP => libc::EOPNOTSUPP,
        NBD_ESHUTDOWN => libc::ESHUTDOWN,
        _ => libc::EINVAL,
    }
}

/// The error value's spec name, for messages.
pub fn error_name(nbd_error: u32) -> &'static str {
    match nbd_error {
        0 => "no error",
        NBD_EPERM => "NBD_EPERM",
        NBD_EIO => "NBD_EIO",
        NBD_ENOMEM => "NBD_ENOMEM",
        NBD_EINVAL => "NBD_EINVAL",
        NBD_ENOSPC => "NBD_ENOSPC",
        NBD_EOVERFLOW => "NBD_EOVERFLOW",
        NBD_ENOTSUP => "NBD_ENOTSUP",
        NBD_ESHUTDOWN => "NBD_ESHUTDOWN",
        _ => "unknown NBD error",
    }
}

/// A server stream that does not follow the protocol. Each variant says what was wrong; after
/// any of them the connection is out of sync and must be dropped (a hard disconnect).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireError {
    /// A reply began with a magic that is neither the simple nor the structured one.
    BadMagic(u32),
    /// A chunk payload's length does not fit its type (`what` names the type).
    BadLength { what: &'static str, len: usize },
    /// An `OFFSET_HOLE` chunk of size 0.
    EmptyHole,
    /// An error chunk whose message length runs past its payload.
    MessageTooLong { msg_len: usize, room: usize },
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            WireError::BadMagic(EXTENDED_REPLY_MAGIC) => write!(
                f,
                "NBD server sent an extended-header reply (magic {EXTENDED_REPLY_MAGIC:#010x}) \
                 that was never negotiated; the connection is out of sync"
            ),
            WireError::BadMagic(m) => write!(
                f,
                "NBD server sent a reply with bad magic {m:#010x} (expected \
                 {SIMPLE_REPLY_MAGIC:#010x} or {STRUCTURED_REPLY_MAGIC:#010x}); \
                 the connection is out of sync"
            ),
            WireError::BadLength { what, len } => {
                write!(f, "NBD server sent a {what} chunk with an invalid payload length {len}")
            }
            WireError::EmptyHole => {
                write!(f, "NBD server sent a NBD_REPLY_TYPE_OFFSET_HOLE chunk of size 0")
            }
            WireError::MessageTooLong { msg_len, room } => write!(
                f,
                "NBD server sent an error chunk whose message length {msg_len} exceeds the \
                 {room} bytes its payload has room for"
            ),
        }
    }
}

impl std::error::Error for WireError {}

impl From<WireError> for Error {
    fn from(e: WireError) -> Error {
        Error::failed(e.to_string())
    }
}

/// A reply header: a whole simple reply, or the header of one structured reply chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple { error: u32, handle: u64 },
    Chunk { flags: u16, kind: u16, handle: u64, length: u32 },
}

impl ReplyHeader {
    /// Bytes the header takes on the wire: [`SIMPLE_REPLY_LEN`] or [`CHUNK_HEADER_LEN`].
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        match self {
            ReplyHeader::Simple { .. } => SIMPLE_REPLY_LEN,
            ReplyHeader::Chunk { .. } => CHUNK_HEADER_LEN,
        }
    }

    /// The request's handle (the spec's "cookie") this reply is for.
    pub fn handle(&self) -> u64 {
        match *self {
            ReplyHeader::Simple { handle, .. } | ReplyHeader::Chunk { handle, .. } => handle,
        }
    }

    /// The last message of its reply: every simple reply, and a chunk with `REPLY_FLAG_DONE`.
    pub fn is_done(&self) -> bool {
        match *self {
            ReplyHeader::Simple { .. } => true,
            ReplyHeader::Chunk { flags, .. } => flags & REPLY_FLAG_DONE != 0,
        }
    }
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

/// Decodes the reply header at the start of `buf`. `Ok(None)`: `buf` is too short to tell
/// (under 4 bytes) or to hold the whole header (16 bytes simple, 20 structured); read more.
/// A bad magic is an error: the stream is out of sync.
pub fn parse_reply_header(buf: &[u8]) -> Result<Option<ReplyHeader>, WireError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    match be32(buf, 0) {
        SIMPLE_REPLY_MAGIC => {
            if buf.len() < SIMPLE_REPLY_LEN {
                return Ok(None);
            }
            Ok(Some(ReplyHeader::Simple { error: be32(buf, 4), handle: be64(buf, 8) }))
        }
        STRUCTURED_REPLY_MAGIC => {
            if buf.len() < CHUNK_HEADER_LEN {
                return Ok(None);
            }
            Ok(Some(ReplyHeader::Chunk {
                flags: be16(buf, 4),
                kind: be16(buf, 6),
                handle: be64(buf, 8),
                length: be32(buf, 16),
            }))
        }
        m => Err(WireError::BadMagic(m)),
    }
}

/// Whether a chunk type is an error chunk (bit 15 set), known or not.
pub fn is_error_chunk(kind: u16) -> bool {
    kind & (1 << 15) != 0
}

/// The payload of an error chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ErrorChunk<'a> {
    /// The NBD error value (see [`errno_of`]).
    pub error: u32,
    /// The server's message for humans, possibly empty; not checked for UTF-8.
    pub message: &'a [u8],
    /// Where the error happened (`NBD_REPLY_TYPE_ERROR_OFFSET` only).
    pub offset: Option<u64>,
}

impl ErrorChunk<'_> {
    /// The message as one printable line: lossy UTF-8, control characters as spaces, trimmed,
    /// at most 200 characters.
    pub fn message_line(&self) -> String {
        one_line(self.message, 200)
    }
}

/// Decodes an error chunk's payload (`kind` has bit 15 set): error u32, message length u16,
/// message, then for `NBD_REPLY_TYPE_ERROR_OFFSET` an offset u64. Unknown error types decode
/// like `NBD_REPLY_TYPE_ERROR` (the spec: their fields start the same way).
pub fn parse_error_chunk(kind: u16, payload: &[u8]) -> Result<ErrorChunk<'_>, WireError> {
    let (what, tail) = match kind {
        REPLY_TYPE_ERROR_OFFSET => ("NBD_REPLY_TYPE_ERROR_OFFSET", 8),
        REPLY_TYPE_ERROR => ("NBD_REPLY_TYPE_ERROR", 0),
        _ => ("unknown error", 0),
    };
    if payload.len() < 6 + tail {
        return Err(WireError::BadLength { what, len: payload.len() });
    }
    let error = be32(payload, 0);
    let msg_len = usize::from(be16(payload, 4));
    let room = payload.len() - 6 - tail;
    if msg_len > room {
        return Err(WireError::MessageTooLong { msg_len, room });
    }
    let message = &payload[6..6 + msg_len];
    let offset =
        if kind == REPLY_TYPE_ERROR_OFFSET { Some(be64(payload, 6 + msg_len)) } else { None };
    Ok(ErrorChunk { error, message, offset })
}

/// Decodes an `NBD_REPLY_TYPE_OFFSET_HOLE` payload: (offset, hole size). It must be exactly
/// 12 bytes and the size nonzero.
pub fn parse_hole(payload: &[u8]) -> Result<(u64, u32), WireError> {
    if payload.len() != HOLE_PAYLOAD_LEN {
        return Err(WireError::BadLength {
            what: "NBD_REPLY_TYPE_OFFSET_HOLE",
            len: payload.len(),
        });
    }
    let size = be32(payload, 8);
    if size == 0 {
        return Err(WireError::EmptyHole);
    }
    Ok((be64(payload, 0), size))
}

/// The export offset that leads an `NBD_REPLY_TYPE_OFFSET_DATA` payload; `payload` may be just
/// those 8 bytes (the data that follows is not looked at).
pub fn parse_data_offset(payload: &[u8]) -> Result<u64, WireError> {
    if payload.len() < DATA_OFFSET_LEN {
        return Err(WireError::BadLength {
            what: "NBD_REPLY_TYPE_OFFSET_DATA",
            len: payload.len(),
        });
    }
    Ok(be64(payload, 0))
}

/// Checks an `OFFSET_DATA` chunk's header length: the offset plus at least one data byte.
/// Returns the number of data bytes.
pub fn data_len(chunk_length: u32) -> Result<u32, WireError> {
    if (chunk_length as usize) <= DATA_OFFSET_LEN {
        return Err(WireError::BadLength {
            what: "NBD_REPLY_TYPE_OFFSET_DATA",
            len: chunk_length as usize,
        });
    }
    Ok(chunk_length - DATA_OFFSET_LEN as u32)
}

/// Server-supplied text as one printable line: lossy UTF-8, control characters as spaces,
/// trimmed, cut to `max` characters (with "..." when cut).
pub fn one_line(bytes: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let cleaned: String =
        text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect::<String>();
    let trimmed = cleaned.trim();
    if trimmed.chars().count() <= max {
        return trimmed.to_string();
    }
    let mut out: String = trimmed.chars().take(max).collect();
    out.push_str("...");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nbd_wire_request_layout() {
        let mut b = [0u8; REQUEST_LEN];
        encode_request(&mut b, CMD_FLAG_FUA, CMD_WRITE, 0x0102_0304_0506_0708, 1 << 40, 4096);
        assert_eq!(
            b,
            [
                0x25, 0x60, 0x95, 0x13, 0, 1, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 1, 0, 0, 0, 0, 0,
                0, 0, 0x10, 0
            ]
        );
    }

    #[test]
    fn nbd_wire_flag_values_match_spec() {
        assert_eq!(FLAG_SEND_FAST_ZERO, 0x800);
        assert_eq!(FLAG_CAN_MULTI_CONN, 0x100);
        assert_eq!(FLAG_SEND_CACHE, 0x400);
        assert_eq!(CMD_FLAG_FAST_ZERO, 16);
        assert_eq!(REPLY_TYPE_ERROR, 32769);
        assert_eq!(REPLY_TYPE_ERROR_OFFSET, 32770);
    }

    fn simple(error: u32, handle: u64) -> Vec<u8> {
        let mut v = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&error.to_be_bytes());
        v.extend_from_slice(&handle.to_be_bytes());
        v
    }

    fn chunk(flags: u16, kind: u16, handle: u64, length: u32) -> Vec<u8> {
        let mut v = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&handle.to_be_bytes());
        v.extend_from_slice(&length.to_be_bytes());
        v
    }

    #[test]
    fn nbd_wire_reply_headers_parse_and_need_whole_header() {
        let s = simple(NBD_EIO, 77);
        assert_eq!(s.len(), SIMPLE_REPLY_LEN);
        let h = parse_reply_header(&s).unwrap().unwrap();
        assert_eq!(h, ReplyHeader::Simple { error: 5, handle: 77 });
        assert_eq!((h.len(), h.handle(), h.is_done()), (16, 77, true));
        for n in 0..s.len() {
            assert_eq!(parse_reply_header(&s[..n]), Ok(None), "simple prefix {n}");
        }

        let mut c = chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, u64::MAX, 4104);
        assert_eq!(c.len(), CHUNK_HEADER_LEN);
        let h = parse_reply_header(&c).unwrap().unwrap();
        assert_eq!(h, ReplyHeader::Chunk { flags: 1, kind: 1, handle: u64::MAX, length: 4104 });
        assert_eq!((h.len(), h.is_done()), (20, true));
        for n in 0..c.len() {
            assert_eq!(parse_reply_header(&c[..n]), Ok(None), "chunk prefix {n}");
        }
        // Trailing bytes (the payload, the next reply) are not looked at.
        c.extend_from_slice(&[0xff; 40]);
        assert_eq!(parse_reply_header(&c).unwrap().unwrap().len(), 20);
    }

    #[test]
    fn nbd_wire_bad_magic_is_an_error() {
        let e = parse_reply_header(&[0xde, 0xad, 0xbe, 0xef]).unwrap_err();
        assert_eq!(e, WireError::BadMagic(0xdead_beef));
        let msg = e.to_string();
        assert!(msg.contains("0xdeadbeef") && !msg.contains('\n'), "{msg}");
        let e = parse_reply_header(&EXTENDED_REPLY_MAGIC.to_be_bytes()).unwrap_err();
        assert!(e.to_string().contains("extended"), "{e}");
        let err: Error = e.into();
        assert_eq!(err.raw_errno(), libc::EIO);
    }

    #[test]
    fn nbd_wire_error_chunks() {
        let mut p = NBD_ENOSPC.to_be_bytes().to_vec();
        p.extend_from_slice(&5u16.to_be_bytes());
        p.extend_from_slice(b"full\n");
        let e = parse_error_chunk(REPLY_TYPE_ERROR, &p).unwrap();
        assert_eq!((e.error, e.message, e.offset), (28, &b"full\n"[..], None));
        assert_eq!(e.message_line(), "full");
        assert_eq!(errno_of(e.error), libc::ENOSPC);

        // ERROR_OFFSET: the offset follows the message.
        let mut q = p.clone();
        q.extend_from_slice(&4096u64.to_be_bytes());
        let e = parse_error_chunk(REPLY_TYPE_ERROR_OFFSET, &q).unwrap();
        assert_eq!(e.offset, Some(4096));
        // ... and is missing here.
        assert!(parse_error_chunk(REPLY_TYPE_ERROR_OFFSET, &p).is_err());

        // Message length past the payload, truncated payloads: errors, never panics.
        let mut bad = p.clone();
        bad[4..6].copy_from_slice(&100u16.to_be_bytes());
        assert_eq!(
            parse_error_chunk(REPLY_TYPE_ERROR, &bad),
            Err(WireError::MessageTooLong { msg_len: 100, room: 5 })
        );
        for n in 0..6 {
            assert!(parse_error_chunk(REPLY_TYPE_ERROR, &p[..n]).is_err());
        }
        // Unknown error types decode like ERROR.
        assert_eq!(parse_error_chunk(0x8123, &p).unwrap().error, 28);
        assert!(is_error_chunk(0x8123) && !is_error_chunk(REPLY_TYPE_OFFSET_DATA));
    }

    #[test]
    fn nbd_wire_hole_and_data_payloads() {
        let mut h = 8192u64.to_be_bytes().to_vec();
        h.extend_from_slice(&512u32.to_be_bytes());
        assert_eq!(parse_hole(&h), Ok((8192, 512)));
        assert!(parse_hole(&h[..11]).is_err());
        let mut long = h.clone();
        long.push(0);
        assert!(parse_hole(&long).is_err());
        h[8..12].copy_from_slice(&0u32.to_be_bytes());
        assert_eq!(parse_hole(&h), Err(WireError::EmptyHole));

        assert_eq!(parse_data_offset(&8192u64.to_be_bytes()), Ok(8192));
        assert!(parse_data_offset(&[0; 7]).is_err());
        assert_eq!(data_len(8 + 4096), Ok(4096));
        assert!(data_len(8).is_err() && data_len(0).is_err());
    }

    #[test]
    fn nbd_wire_errno_mapping() {
        let table = [
            (NBD_EPERM, libc::EPERM),
            (NBD_EIO, libc::EIO),
            (NBD_ENOMEM, libc::ENOMEM),
            (NBD_EINVAL, libc::EINVAL),
            (NBD_ENOSPC, libc::ENOSPC),
            (NBD_EOVERFLOW, libc::EOVERFLOW),
            (NBD_ENOTSUP, libc::EOPNOTSUPP),
            (NBD_ESHUTDOWN, libc::ESHUTDOWN),
            (0, 0),
            (2, libc::EINVAL),
            (u32::MAX, libc::EINVAL),
        ];
        for (nbd, errno) in table {
            assert_eq!(errno_of(nbd), errno, "NBD error {nbd}");
        }
        assert_eq!(error_name(NBD_ENOTSUP), "NBD_ENOTSUP");
        assert_eq!(cmd_name(CMD_WRITE_ZEROES), "NBD_CMD_WRITE_ZEROES");
    }

    #[test]
    fn nbd_wire_one_line_cleans_server_text() {
        assert_eq!(one_line(b"  a\nb\r\n", 200), "a b");
        assert_eq!(one_line(&[0xff, b'x'], 200), "\u{fffd}x");
        assert_eq!(one_line(b"abcdef", 3), "abc...");
        assert_eq!(one_line(b"", 3), "");
    }
}
