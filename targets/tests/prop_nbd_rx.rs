//! Property test (inputs fuzzed) of the NBD reply-stream parser: byte streams of random bytes
//! and of plausible replies (right and wrong handles, every chunk type, offsets anywhere),
//! fed in random chunkings, never panic it, never make it write outside a request's buffer,
//! and its replies only ever name tags that were awaiting one.

use proptest::prelude::*;
use ublk_fast_targets::nbd::rx::{Awaiting, Book, Next, Rx};
use ublk_fast_targets::nbd::wire;

/// `cases` runs, no regression files written into the tree.
fn cfg(cases: u32) -> ProptestConfig {
    ProptestConfig { failure_persistence: None, ..ProptestConfig::with_cases(cases) }
}

const DEPTH: u16 = 4;
/// Bytes before and after each request's buffer that the parser must never touch.
const GUARD: usize = 64;
const FILL: u8 = 0xa5;

#[derive(Clone, Copy, Debug)]
struct Req {
    handle: u64,
    read: bool,
    offset: u64,
    len: u32,
}

/// The requests of one connection; records replies and any that name a tag not awaiting.
struct Reqs {
    reqs: Vec<Option<Req>>,
    bufs: Vec<Vec<u8>>,
    replies: Vec<(u16, i32)>,
    wrong: Vec<String>,
}

impl Reqs {
    fn new(reqs: Vec<Option<Req>>) -> Reqs {
        let bufs = reqs
            .iter()
            .map(|r| vec![FILL; GUARD + r.map_or(0, |r| r.len as usize) + GUARD])
            .collect();
        Reqs { reqs, bufs, replies: Vec::new(), wrong: Vec::new() }
    }

    /// Whether `[p, p + len)` lies inside an awaiting request's buffer.
    fn inside(&self, p: *mut u8, len: usize) -> bool {
        self.reqs.iter().zip(&self.bufs).any(|(r, b)| {
            r.is_some_and(|r| {
                let (lo, p) = (b.as_ptr() as usize + GUARD, p as usize);
                p >= lo && p + len <= lo + r.len as usize
            })
        })
    }
}

impl Book for Reqs {
    fn awaiting(&self, handle: u64) -> Option<Awaiting> {
        let tag = (handle & 0xffff) as u16;
        let r = self.reqs.get(usize::from(tag)).copied().flatten()?;
        (r.handle | u64::from(tag) == handle).then(|| Awaiting {
            tag,
            read: r.read,
            offset: r.offset,
            len: r.len,
            // SAFETY: the buffer is GUARD + len + GUARD bytes.
            buf: unsafe { self.bufs[usize::from(tag)].as_ptr().add(GUARD) as *mut u8 },
            fixed: None,
            ok: if r.read { r.len as i32 } else { 0 },
        })
    }

    fn reply(&mut self, tag: u16, res: i32) {
        match self.reqs.get_mut(usize::from(tag)) {
            Some(slot @ Some(_)) => {
                let r = slot.take().unwrap();
                let ok = if r.read { r.len as i32 } else { 0 };
                if res != ok && !(-4095..0).contains(&res) {
                    self.wrong.push(format!("tag {tag}: result {res}"));
                }
            }
            _ => self.wrong.push(format!("reply for tag {tag}, which was not awaiting")),
        }
        self.replies.push((tag, res));
    }
}

/// Feeds `stream` in pieces whose sizes cycle through `steps`, following Direct requests,
/// until the stream ends or the parser reports a protocol error.
fn feed(rx: &mut Rx, book: &mut Reqs, stream: &[u8], steps: &[usize]) -> Result<(), String> {
    let mut at = 0;
    let mut i = 0;
    let mut next = rx.parse(book).map_err(|e| e.to_string())?;
    while at < stream.len() {
        let step = steps[i % steps.len()];
        i += 1;
        match next {
            Next::Staging => {
                let (p, free) = rx.space();
                assert!(free > 0, "no room in the staging buffer");
                let n = step.min(free).min(stream.len() - at);
                // SAFETY: `space` says `p` has `free` bytes.
                unsafe { std::ptr::copy_nonoverlapping(stream[at..].as_ptr(), p, n) };
                rx.filled(n);
                at += n;
            }
            Next::Direct { at: p, len, .. } => {
                assert!(len > 0 && book.inside(p, len), "Direct {len} bytes outside the request");
                let n = step.min(len).min(stream.len() - at);
                // SAFETY: checked just above to lie inside a request's buffer.
                unsafe { std::ptr::copy_nonoverlapping(stream[at..].as_ptr(), p, n) };
                rx.direct_done(book, n);
                at += n;
            }
        }
        next = rx.parse(book).map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn simple(error: u32, handle: u64) -> Vec<u8> {
    let mut v = wire::SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend(error.to_be_bytes());
    v.extend(handle.to_be_bytes());
    v
}

fn chunk(flags: u16, kind: u16, handle: u64, length: u32, body: &[u8]) -> Vec<u8> {
    let mut v = wire::STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend(flags.to_be_bytes());
    v.extend(kind.to_be_bytes());
    v.extend(handle.to_be_bytes());
    v.extend(length.to_be_bytes());
    v.extend(body);
    v
}

fn req() -> impl Strategy<Value = Option<Req>> {
    let len = prop_oneof![0u32..64, 4096u32..(40 << 10)];
    let offset = prop_oneof![Just(0), 0u64..(1 << 20), Just(u64::MAX - 16), any::<u64>()];
    prop::option::weighted(0.8, (any::<u32>(), any::<bool>(), offset, len)).prop_map(|r| {
        r.map(|(hi, read, offset, len)| Req { handle: u64::from(hi) << 16, read, offset, len })
    })
}

/// One piece of a stream: random bytes, or a reply (to `slot`'s request, or to a handle
/// nobody awaits) whose numbers are right, off by a little, or anything.
#[derive(Clone, Debug)]
enum Piece {
    Bytes(Vec<u8>),
    Simple { slot: u16, bad_handle: bool, error: u32, data: u32 },
    Chunk { slot: u16, bad_handle: bool, flags: u16, kind: u16, off: u64, len: u32, body: u32 },
}

fn piece() -> impl Strategy<Value = Piece> {
    let kind = prop_oneof![
        Just(wire::REPLY_TYPE_NONE),
        Just(wire::REPLY_TYPE_OFFSET_DATA),
        Just(wire::REPLY_TYPE_OFFSET_HOLE),
        Just(wire::REPLY_TYPE_BLOCK_STATUS),
        Just(wire::REPLY_TYPE_ERROR),
        Just(wire::REPLY_TYPE_ERROR_OFFSET),
        any::<u16>(),
    ];
    // Relative to the request's offset; the far ones wrap around.
    let off = prop_oneof![
        2 => 0u64..(48 << 10),
        1 => any::<u64>(),
        2 => (1u64..64).prop_map(|d| 0u64.wrapping_sub(d)),
    ];
    let error = prop_oneof![Just(0u32), Just(wire::NBD_ENOSPC), any::<u32>()];
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(Piece::Bytes),
        3 => (0..DEPTH, prop::bool::weighted(0.1), error, 0u32..(48 << 10)).prop_map(
            |(slot, bad_handle, error, data)| Piece::Simple { slot, bad_handle, error, data }
        ),
        4 => (0..DEPTH, prop::bool::weighted(0.1), 0u16..4, kind, off, 0u32..(48 << 10), 0u32..256)
            .prop_map(|(slot, bad_handle, flags, kind, off, len, body)| {
                Piece::Chunk { slot, bad_handle, flags, kind, off, len, body }
            }),
    ]
}

/// The bytes of `p` against the requests `reqs`.
fn render(p: &Piece, reqs: &[Option<Req>], out: &mut Vec<u8>) {
    let handle = |slot: u16, bad: bool| {
        let h = reqs[usize::from(slot)].map_or(u64::from(slot), |r| r.handle | u64::from(slot));
        if bad {
            h ^ 0x1_0000
        } else {
            h
        }
    };
    match *p {
        Piece::Bytes(ref b) => out.extend(b),
        Piece::Simple { slot, bad_handle, error, data } => {
            out.extend(simple(error, handle(slot, bad_handle)));
            // A successful read's data, mostly of the right length.
            let len = reqs[usize::from(slot)].filter(|r| r.read).map_or(0, |r| r.len);
            let n = if error == 0 && data % 4 != 0 { len } else { data % 4096 };
            out.extend((0..n).map(|i| i as u8));
        }
        Piece::Chunk { slot, bad_handle, flags, kind, off, len, body } => {
            let h = handle(slot, bad_handle);
            let base = reqs[usize::from(slot)].map_or(0, |r| r.offset);
            let at = base.wrapping_add(off);
            let b: Vec<u8> = match kind {
                wire::REPLY_TYPE_OFFSET_DATA => {
                    let mut b = at.to_be_bytes().to_vec();
                    b.extend((0..len.min(48 << 10)).map(|i| i as u8));
                    b
                }
                wire::REPLY_TYPE_OFFSET_HOLE => {
                    let mut b = at.to_be_bytes().to_vec();
                    b.extend(len.to_be_bytes());
                    b
                }
                _ => (0..body).map(|i| i as u8).collect(),
            };
            // Usually the true length; sometimes a wrong one.
            let length = if body % 8 == 0 { body.wrapping_mul(len) } else { b.len() as u32 };
            out.extend(chunk(flags, kind, h, length, &b));
        }
    }
}

fn check(reqs: Vec<Option<Req>>, stream: &[u8], steps: &[usize]) -> Result<(), TestCaseError> {
    let awaiting: Vec<bool> = reqs.iter().map(Option::is_some).collect();
    let mut book = Reqs::new(reqs);
    let mut rx = Rx::new(DEPTH, false);
    if let Err(e) = feed(&mut rx, &mut book, stream, steps) {
        prop_assert!(!e.is_empty() && !e.contains(['\n', '\r']), "error not one line: {:?}", e);
    }
    prop_assert!(book.wrong.is_empty(), "{:?}", book.wrong);
    for &(tag, _) in &book.replies {
        prop_assert!(awaiting[usize::from(tag)], "reply for tag {}, never awaiting", tag);
    }
    for (i, b) in book.bufs.iter().enumerate() {
        let end = b.len() - GUARD;
        let untouched = b[..GUARD].iter().chain(&b[end..]).all(|&x| x == FILL);
        prop_assert!(untouched, "tag {}: written outside its buffer", i);
    }
    Ok(())
}

fn steps() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(prop_oneof![1usize..8, 8usize..4096, Just(1 << 20)], 1..6)
}

/// Found by `plausible_replies`: an offset near 2^64 wrapped the bounds check, and the data
/// (or the hole's zeroes) landed before the request's buffer.
#[test]
fn offsets_that_wrap_are_refused() {
    let read = Req { handle: 0x7_0000, read: true, offset: 0, len: 16 };
    let mut data = (u64::MAX - 7).to_be_bytes().to_vec();
    data.extend([1u8; 16]);
    let mut hole = u64::MAX.to_be_bytes().to_vec();
    hole.extend(2u32.to_be_bytes());
    for (kind, body) in [(wire::REPLY_TYPE_OFFSET_DATA, data), (wire::REPLY_TYPE_OFFSET_HOLE, hole)]
    {
        let s = chunk(wire::REPLY_FLAG_DONE, kind, 0x7_0000, body.len() as u32, &body);
        let mut book = Reqs::new(vec![Some(read), None, None, None]);
        let mut rx = Rx::new(DEPTH, false);
        let e = feed(&mut rx, &mut book, &s, &[1 << 20]).expect_err("a wrapped offset accepted");
        assert!(e.contains("outside the read"), "{e}");
        assert!(book.replies.is_empty() && book.bufs[0].iter().all(|&x| x == FILL));
    }
}

proptest! {
    #![proptest_config(cfg(2000))]

    #[test]
    fn random_bytes(
        reqs in prop::collection::vec(req(), DEPTH as usize),
        stream in prop::collection::vec(any::<u8>(), 0..2048),
        steps in steps(),
    ) {
        check(reqs, &stream, &steps)?;
    }

    #[test]
    fn plausible_replies(
        reqs in prop::collection::vec(req(), DEPTH as usize),
        pieces in prop::collection::vec(piece(), 1..8),
        steps in steps(),
    ) {
        let mut stream = Vec::new();
        for p in &pieces {
            render(p, &reqs, &mut stream);
        }
        check(reqs, &stream, &steps)?;
    }
}
