//! Per-queue counters: each queue thread is the only writer of its own cache-line-aligned block
//! (a plain load and a Relaxed store per update: no locked instruction), and readers take
//! snapshots. The blocks live in a shared mapping of `/run/ublk-fast/<id>.stats`, so `ublk-fast
//! list` and exporters read them from outside the daemon without asking it anything.

use std::fs::OpenOptions;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use memmap2::{MmapMut, MmapOptions};

use crate::error::{Error, Result};

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
    reserved: [AtomicU64; 3],
}

/// Names of the counters in file order (the reserved tail is not listed).
pub const COUNTER_NAMES: [&str; 13] = [
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
];

const BLOCK: usize = std::mem::size_of::<QueueStats>();
const MAGIC: u64 = u64::from_le_bytes(*b"UBLKFST1");

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
}

// SAFETY: the mapping is only accessed through `&QueueStats`, whose fields are atomics.
unsafe impl Sync for StatsRegion {}
// SAFETY: as above; the mapping itself may move between threads.
unsafe impl Send for StatsRegion {}

impl StatsRegion {
    /// Backed by `path` (created or truncated) so other processes can read it, or anonymous.
    pub fn create(path: Option<&Path>, queues: u16) -> Result<Self> {
        let len = BLOCK * (1 + usize::from(queues));
        let mut map = match path {
            Some(p) => {
                let f = OpenOptions::new()
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
        Ok(StatsRegion { map, queues })
    }

    pub fn queue(&self, q: u16) -> &QueueStats {
        assert!(q < self.queues, "queue {q} out of range");
        let p = self.map.as_ptr().wrapping_add(BLOCK * (1 + usize::from(q)));
        // SAFETY: the block lies inside the mapping (q < queues), is 128-byte aligned (the
        // mapping is page aligned and BLOCK is 128), and is zero-initialised memory, a valid
        // QueueStats (all atomics). It lives as long as `self`.
        unsafe { &*(p as *const QueueStats) }
    }

    /// Reads a stats file written by a daemon: one row of counters per queue.
    pub fn read_file(path: &Path) -> Option<Vec<[u64; 13]>> {
        let data = std::fs::read(path).ok()?;
        if data.len() < BLOCK || u64::from_le_bytes(data[..8].try_into().ok()?) != MAGIC {
            return None;
        }
        let queues = usize::from(u16::from_le_bytes(data[8..10].try_into().ok()?));
        if data.len() < BLOCK * (1 + queues) {
            return None;
        }
        let rows = (0..queues)
            .map(|q| {
                let base = BLOCK * (1 + q);
                std::array::from_fn(|i| {
                    let o = base + 8 * i;
                    u64::from_ne_bytes(data[o..o + 8].try_into().expect("8 bytes"))
                })
            })
            .collect();
        Some(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    #[test]
    fn layout_matches_the_names() {
        assert_eq!(BLOCK, 128);
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
        let rows = StatsRegion::read_file(&p).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0][0], 3);
        assert_eq!(rows[1][9], 5);
        assert_eq!(rows[1][12], 1);
        let _ = std::fs::remove_file(p);
    }
}
