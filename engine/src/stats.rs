//! Per-queue counters: each queue thread is the only writer of its own cache-line-aligned block
//! (a plain load and a Relaxed store per update: no locked instruction), and readers take
//! snapshots. The blocks live in a shared mapping of `/run/ublk-fast/<id>.stats`, so `ublk-fast
//! list` and exporters read them from outside the daemon without asking it anything.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use memmap2::{MmapMut, MmapOptions};

use crate::error::{Error, Result};

/// Latency histogram bucket upper bounds in ns: 1-2.5-5 steps from 1 µs to 10 s.
pub const LAT_BOUNDS_NS: [u64; 22] = [
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];
const NB: usize = LAT_BOUNDS_NS.len();

/// The ops with their own latency histogram and error counter, in index order.
pub const OP_NAMES: [&str; 5] = ["read", "write", "flush", "discard", "write_zeroes"];

/// Index into [`OP_NAMES`] of a ublk op, if it has one.
pub fn op_index(op: u8) -> Option<usize> {
    use crate::uapi::*;
    match op {
        UBLK_IO_OP_READ => Some(0),
        UBLK_IO_OP_WRITE => Some(1),
        UBLK_IO_OP_FLUSH => Some(2),
        UBLK_IO_OP_DISCARD => Some(3),
        UBLK_IO_OP_WRITE_ZEROES => Some(4),
        _ => None,
    }
}

/// One op's latency histogram (non-cumulative buckets; readers accumulate) and errors.
#[repr(C)]
#[derive(Default, Debug)]
pub struct OpLatency {
    pub buckets: [AtomicU64; NB],
    /// Above the last bound.
    pub overflow: AtomicU64,
    pub sum_ns: AtomicU64,
    pub count: AtomicU64,
    pub errors: AtomicU64,
}
const OP_WORDS: usize = NB + 4;

impl OpLatency {
    /// Records one completion: a bounded search over 22 bounds, loads and Relaxed stores.
    #[inline]
    pub fn record(&self, ns: u64, failed: bool) {
        let i = LAT_BOUNDS_NS.partition_point(|&b| b < ns);
        QueueStats::bump(if i < NB { &self.buckets[i] } else { &self.overflow }, 1);
        QueueStats::bump(&self.sum_ns, ns);
        QueueStats::bump(&self.count, 1);
        if failed {
            QueueStats::bump(&self.errors, 1);
        }
    }
}

/// One queue's counters. Field order is the file format: see [`COUNTER_NAMES`].
#[repr(C, align(128))]
#[derive(Default, Debug)]
pub struct QueueStats {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub discards: AtomicU64,
    pub write_zeroes: AtomicU64,
    pub read_bytes: AtomicU64,
    pub written_bytes: AtomicU64,
    /// Writes the kernel flagged FUA.
    pub fua_writes: AtomicU64,
    /// Requests committed with a negative result.
    pub io_errors: AtomicU64,
    /// fdatasync operations issued to the backing store.
    pub backend_fsyncs: AtomicU64,
    /// Writes issued to the backing store with RWF_DSYNC.
    pub backend_dsync_writes: AtomicU64,
    /// `io_uring_enter` calls made by the queue loop.
    pub ring_enters: AtomicU64,
    /// Requests in flight (delivered, not yet committed).
    pub io_now: AtomicU64,
    /// SQEs queued on the ring (ublk commands and backend operations).
    pub sqes: AtomicU64,
    /// Time with at least one request in flight, measured per loop iteration.
    pub io_time_ns: AtomicU64,
    /// Zero-copy requests whose automatic buffer registration failed and were registered by us.
    pub zero_copy_fallbacks: AtomicU64,
    /// Completions that matched nothing in flight (stale or unknown): never applied, logged.
    pub unexpected_completions: AtomicU64,
    /// Remote targets: 1 while the queue's connection to its server is up, 0 while it is down.
    pub backend_connected: AtomicU64,
    /// Remote targets: connections re-established after a loss.
    pub backend_reconnects: AtomicU64,
    /// Remote targets: requests sent again on a new connection after one was lost.
    pub backend_resent: AtomicU64,
    /// Latency mode (counted on the first queue of each core, like `ring_enters`): time spent
    /// polling after busy turns, and the polls a completion ended (a sleep and wake-up saved)
    /// or that ran out.
    pub poll_ns: AtomicU64,
    pub poll_hits: AtomicU64,
    pub poll_misses: AtomicU64,
    /// Requests outstanding longer than the device's slow-I/O threshold (each counted once).
    pub slow_ios: AtomicU64,
    /// The age of the oldest request in flight (ns), as of the core's last check (every
    /// second); 0 when none.
    pub oldest_io_ns: AtomicU64,
    /// Per-op latency from the request's delivery to its commit, and errors.
    pub lat: [OpLatency; 5],
    /// Remote targets (nbd): each request's round trip to the server, from its last byte
    /// sent to its reply's arrival (errors: replies that carried one).
    pub backend_rtt: OpLatency,
}

/// Names of the plain counters in file order.
pub const COUNTER_NAMES: [&str; COUNTER_WORDS] = [
    "reads",
    "writes",
    "flushes",
    "discards",
    "write_zeroes",
    "read_bytes",
    "written_bytes",
    "fua_writes",
    "io_errors",
    "backend_fsyncs",
    "backend_dsync_writes",
    "ring_enters",
    "io_now",
    "sqes",
    "io_time_ns",
    "zero_copy_fallbacks",
    "unexpected_completions",
    "backend_connected",
    "backend_reconnects",
    "backend_resent",
    "poll_ns",
    "poll_hits",
    "poll_misses",
    "slow_ios",
    "oldest_io_ns",
];
const COUNTER_WORDS: usize = 25;

/// A point-in-time copy of one queue's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueSnapshot {
    pub counters: [u64; COUNTER_WORDS],
    pub ops: [OpSnapshot; 5],
    pub backend_rtt: OpSnapshot,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OpSnapshot {
    pub buckets: [u64; NB],
    pub overflow: u64,
    pub sum_ns: u64,
    pub count: u64,
    pub errors: u64,
}

impl OpSnapshot {
    fn absorb(&mut self, b: &OpSnapshot) {
        for (x, y) in self.buckets.iter_mut().zip(b.buckets.iter()) {
            *x = x.wrapping_add(*y);
        }
        self.overflow = self.overflow.wrapping_add(b.overflow);
        self.sum_ns = self.sum_ns.wrapping_add(b.sum_ns);
        self.count = self.count.wrapping_add(b.count);
        self.errors = self.errors.wrapping_add(b.errors);
    }

    /// From one [`OpLatency`]'s words, in file order.
    fn from_words(w: &[u64]) -> Self {
        let mut op = OpSnapshot::default();
        op.buckets.copy_from_slice(&w[..NB]);
        op.overflow = w[NB];
        op.sum_ns = w[NB + 1];
        op.count = w[NB + 2];
        op.errors = w[NB + 3];
        op
    }
}

impl QueueSnapshot {
    pub fn counter(&self, name: &str) -> u64 {
        COUNTER_NAMES.iter().position(|n| *n == name).map_or(0, |i| self.counters[i])
    }

    /// Adds another shard's counters of the same queue (the oldest request's age: the larger).
    fn absorb(&mut self, o: &QueueSnapshot) {
        for (i, (a, b)) in self.counters.iter_mut().zip(o.counters.iter()).enumerate() {
            *a = if COUNTER_NAMES[i] == "oldest_io_ns" { (*a).max(*b) } else { a.wrapping_add(*b) };
        }
        for (a, b) in self.ops.iter_mut().zip(o.ops.iter()) {
            a.absorb(b);
        }
        self.backend_rtt.absorb(&o.backend_rtt);
    }

    /// One snapshot per queue from rows in queue-major order, `shards` rows per queue.
    fn fold(rows: Vec<QueueSnapshot>, shards: usize) -> Vec<QueueSnapshot> {
        if shards <= 1 {
            return rows;
        }
        rows.chunks(shards)
            .map(|c| {
                let mut s = c[0].clone();
                for o in &c[1..] {
                    s.absorb(o);
                }
                s
            })
            .collect()
    }

    /// From the queue block's words, in file order.
    fn from_words(w: &[u64]) -> Self {
        let mut s = QueueSnapshot::default();
        s.counters.copy_from_slice(&w[..COUNTER_WORDS]);
        for (o, op) in s.ops.iter_mut().enumerate() {
            *op = OpSnapshot::from_words(&w[COUNTER_WORDS + o * OP_WORDS..]);
        }
        s.backend_rtt = OpSnapshot::from_words(&w[COUNTER_WORDS + 5 * OP_WORDS..]);
        s
    }
}

const BLOCK: usize = std::mem::size_of::<QueueStats>();
/// The file format's version is in the magic: v2 added `unexpected_completions`, v3 the
/// `backend_*` connection counters and the `poll_*` latency-mode counters, v4 `backend_rtt`.
const MAGIC: u64 = u64::from_le_bytes(*b"UBLKFST4");

impl QueueStats {
    /// Adds `n` to a counter this thread alone writes: no read-modify-write instruction.
    #[inline]
    pub fn bump(c: &AtomicU64, n: u64) {
        c.store(c.load(Relaxed).wrapping_add(n), Relaxed);
    }

    #[inline]
    pub fn drop_one(c: &AtomicU64) {
        c.store(c.load(Relaxed).wrapping_sub(1), Relaxed);
    }
}

/// A header block (magic, queue count) followed by one [`QueueStats`] per queue.
pub struct StatsRegion {
    map: MmapMut,
    queues: u16,
    /// Blocks per queue: one per core thread serving a share of its tags (PER_IO_DAEMON),
    /// each written by that thread alone.
    shards: u16,
}

// SAFETY: the mapping is only accessed through `&QueueStats`, whose fields are atomics.
unsafe impl Sync for StatsRegion {}
// SAFETY: as above; the mapping itself may move between threads.
unsafe impl Send for StatsRegion {}

impl StatsRegion {
    /// Backed by `path` (created or truncated) so other processes can read it, or anonymous.
    pub fn create(path: Option<&Path>, queues: u16) -> Result<Self> {
        Self::create_sharded(path, queues, 1)
    }

    /// As `create`, with `shards` blocks per queue (readers see their sums, per queue).
    pub fn create_sharded(path: Option<&Path>, queues: u16, shards: u16) -> Result<Self> {
        let shards = shards.max(1);
        let rows = usize::from(queues) * usize::from(shards);
        let len = BLOCK * (1 + rows);
        let mut map = match path {
            Some(p) => {
                // 0600, and never through a symlink someone planted at the path.
                let f = OpenOptions::new()
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(p)
                    .map_err(|e| Error::os("create stats file", e))?;
                f.set_len(len as u64).map_err(|e| Error::os("size stats file", e))?;
                // SAFETY: a shared mapping of a file we just created; other processes only read
                // it, and we only access it through atomics.
                unsafe { MmapOptions::new().len(len).map_mut(&f) }
                    .map_err(|e| Error::os("mmap stats file", e))?
            }
            None => {
                MmapOptions::new().len(len).map_anon().map_err(|e| Error::os("mmap stats", e))?
            }
        };
        map[..8].copy_from_slice(&MAGIC.to_le_bytes());
        map[8..10].copy_from_slice(&queues.to_le_bytes());
        map[10..12].copy_from_slice(&shards.to_le_bytes());
        Ok(StatsRegion { map, queues, shards })
    }

    pub fn queue(&self, q: u16) -> &QueueStats {
        self.shard(q, 0)
    }

    /// The block of queue `q`'s shard `k`.
    pub fn shard(&self, q: u16, k: u16) -> &QueueStats {
        assert!(q < self.queues && k < self.shards, "queue {q} shard {k} out of range");
        let row = usize::from(q) * usize::from(self.shards) + usize::from(k);
        let p = self.map.as_ptr().wrapping_add(BLOCK * (1 + row));
        // SAFETY: the block lies inside the mapping (row < queues x shards), is 128-byte
        // aligned (the mapping is page aligned and BLOCK is 128), and is zero-initialised
        // memory, a valid QueueStats (all atomics). It lives as long as `self`.
        unsafe { &*(p as *const QueueStats) }
    }

    pub fn queues(&self) -> u16 {
        self.queues
    }

    /// Snapshots every queue (atomic loads: the queues keep writing meanwhile).
    pub fn snapshot(&self) -> Vec<QueueSnapshot> {
        let rows = (0..self.queues)
            .flat_map(|q| (0..self.shards).map(move |k| (q, k)))
            .map(|(q, k)| {
                let p = self.shard(q, k) as *const QueueStats as *const AtomicU64;
                let words: Vec<u64> = (0..BLOCK / 8)
                    // SAFETY: QueueStats is repr(C) and made only of AtomicU64s (plus padding
                    // to BLOCK, zero-initialised mapping memory), so it is BLOCK/8 consecutive
                    // AtomicU64 inside the mapping.
                    .map(|i| unsafe { &*p.add(i) }.load(Relaxed))
                    .collect();
                QueueSnapshot::from_words(&words)
            })
            .collect();
        QueueSnapshot::fold(rows, usize::from(self.shards))
    }

    /// Reads a stats file written by a daemon: one snapshot per queue.
    pub fn read_file(path: &Path) -> Option<Vec<QueueSnapshot>> {
        let data = std::fs::read(path).ok()?;
        if data.len() < BLOCK || u64::from_le_bytes(data[..8].try_into().ok()?) != MAGIC {
            return None;
        }
        let queues = usize::from(u16::from_le_bytes(data[8..10].try_into().ok()?));
        // 0 in files written before shards existed.
        let shards = usize::from(u16::from_le_bytes(data[10..12].try_into().ok()?)).max(1);
        let nrows = queues * shards;
        if data.len() < BLOCK * (1 + nrows) {
            return None;
        }
        let rows = (0..nrows)
            .map(|q| {
                let base = BLOCK * (1 + q);
                let words: Vec<u64> = data[base..base + BLOCK]
                    .chunks_exact(8)
                    .map(|c| u64::from_ne_bytes(c.try_into().expect("8 bytes")))
                    .collect();
                QueueSnapshot::from_words(&words)
            })
            .collect();
        Some(QueueSnapshot::fold(rows, shards))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    #[test]
    fn layout_matches_the_names() {
        assert_eq!(BLOCK % 128, 0);
        assert_eq!(offset_of!(QueueStats, lat), COUNTER_WORDS * 8);
        assert_eq!(std::mem::size_of::<OpLatency>(), OP_WORDS * 8);
        assert_eq!(offset_of!(QueueStats, backend_rtt), (COUNTER_WORDS + 5 * OP_WORDS) * 8);
        const { assert!(BLOCK >= (COUNTER_WORDS + 6 * OP_WORDS) * 8) };
        assert_eq!(offset_of!(QueueStats, io_time_ns), 14 * 8);
        assert_eq!(offset_of!(QueueStats, reads), 0);
        assert_eq!(offset_of!(QueueStats, fua_writes), 7 * 8);
        assert_eq!(offset_of!(QueueStats, backend_fsyncs), 9 * 8);
        assert_eq!(offset_of!(QueueStats, io_now), 12 * 8);
        assert_eq!(COUNTER_NAMES[9], "backend_fsyncs");
    }

    #[test]
    fn file_round_trip() {
        let p = std::env::temp_dir().join(format!("ublk-fast-stats-{}", std::process::id()));
        let r = StatsRegion::create(Some(&p), 2).unwrap();
        QueueStats::bump(&r.queue(0).reads, 3);
        QueueStats::bump(&r.queue(1).backend_fsyncs, 5);
        QueueStats::bump(&r.queue(1).io_now, 2);
        QueueStats::drop_one(&r.queue(1).io_now);
        r.queue(1).lat[1].record(3_000, false);
        r.queue(1).lat[1].record(20_000_000_000, true);
        r.queue(0).backend_rtt.record(700_000, false);
        let rows = StatsRegion::read_file(&p).unwrap();
        assert_eq!(rows, r.snapshot());
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].counter("reads"), 3);
        assert_eq!(rows[1].counter("backend_fsyncs"), 5);
        assert_eq!(rows[1].counter("io_now"), 1);
        let w = &rows[1].ops[1];
        assert_eq!((w.buckets[2], w.overflow, w.count, w.errors), (1, 1, 2, 1));
        assert_eq!(w.sum_ns, 20_000_003_000);
        let rtt = &rows[0].backend_rtt;
        assert_eq!((rtt.buckets[9], rtt.count, rtt.sum_ns), (1, 1, 700_000));
        let _ = std::fs::remove_file(p);
    }
}

#[cfg(test)]
mod bucket_tests {
    use super::*;

    #[test]
    fn buckets_are_upper_bounds() {
        let h = OpLatency::default();
        for ns in [0, 1_000, 1_001, 10_000_000_000, 10_000_000_001] {
            h.record(ns, false);
        }
        let b: Vec<u64> = h.buckets.iter().map(|c| c.load(Relaxed)).collect();
        assert_eq!(b[0], 2, "0 and 1000 ns are <= 1 µs");
        assert_eq!(b[1], 1);
        assert_eq!(b[NB - 1], 1);
        assert_eq!(h.overflow.load(Relaxed), 1);
        assert!(LAT_BOUNDS_NS.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(op_index(crate::uapi::UBLK_IO_OP_WRITE_ZEROES), Some(4));
        assert_eq!(op_index(crate::uapi::UBLK_IO_OP_ZONE_OPEN), None);
    }
}
