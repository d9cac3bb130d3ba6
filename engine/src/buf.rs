//! Per-queue I/O buffers: one arena carved into one max-sized buffer per tag, allocated once
//! when the queue starts and never touched by the allocator again.
//!
//! The arena is 2 MiB hugetlb pages where the system has them reserved, else transparent huge
//! pages (`MADV_HUGEPAGE`) where enabled, else plain pages. When the buffers carry data (copy
//! mode) they are locked, so no I/O ever waits on a page fault.

use memmap2::{MmapMut, MmapOptions};

use crate::error::{Error, Result};

const HUGE_2M: usize = 2 << 20;

/// What the arena's memory is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    Hugetlb,
    Thp,
    Pages,
}

impl Backing {
    pub fn describe(self) -> &'static str {
        match self {
            Backing::Hugetlb => "2 MiB hugetlb pages",
            Backing::Thp => "transparent huge pages",
            Backing::Pages => "4 KiB pages (no hugetlb pages reserved, THP off)",
        }
    }
}

pub struct IoBufs {
    map: MmapMut,
    per_tag: usize,
    depth: u16,
    backing: Backing,
    locked: bool,
}

/// Rounds up to whole pages so every tag's buffer is page aligned (O_DIRECT needs it).
pub fn per_tag_len(max_io_bytes: u32) -> usize {
    (max_io_bytes as usize).div_ceil(4096) * 4096
}

/// Bytes of arena a queue needs (what is locked in copy mode).
pub fn arena_len(depth: u16, max_io_bytes: u32) -> usize {
    per_tag_len(max_io_bytes) * usize::from(depth)
}

fn thp_enabled() -> bool {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .is_ok_and(|s| s.contains("[always]") || s.contains("[madvise]"))
}

impl IoBufs {
    /// `lock`: the buffers will carry data; fault them in and lock them now.
    pub fn new(depth: u16, max_io_bytes: u32, lock: bool) -> Result<Self> {
        let per_tag = per_tag_len(max_io_bytes);
        let len = per_tag * usize::from(depth);
        // hugetlb only pays when buffers are used; its length must be whole huge pages (so the
        // unmap covers them all), and the mapping fails at once when the pool is short.
        let huge = lock
            .then(|| {
                MmapOptions::new().len(len.next_multiple_of(HUGE_2M)).huge(Some(21)).map_anon()
            })
            .and_then(|r| r.ok());
        let (map, backing) = match huge {
            Some(m) => (m, Backing::Hugetlb),
            None => {
                let m = MmapOptions::new()
                    .len(len)
                    .map_anon()
                    .map_err(|e| Error::os("mmap I/O buffers", e))?;
                let thp = m.advise(memmap2::Advice::HugePage).is_ok() && thp_enabled();
                (m, if thp { Backing::Thp } else { Backing::Pages })
            }
        };
        if lock {
            map.lock().map_err(|e| {
                Error::os("mlock I/O buffers", e).hint(format!(
                    "{} KiB must be locked per queue: raise RLIMIT_MEMLOCK (ulimit -l) or lower --depth",
                    len >> 10
                ))
            })?;
        }
        Ok(IoBufs { map, per_tag, depth, backing, locked: lock })
    }

    pub fn per_tag(&self) -> usize {
        self.per_tag
    }

    pub fn backing(&self) -> Backing {
        self.backing
    }

    pub fn locked(&self) -> bool {
        self.locked
    }

    /// The tag's buffer. Valid for as long as `self` lives.
    pub fn ptr(&self, tag: u16) -> *mut u8 {
        assert!(tag < self.depth, "tag {tag} out of range");
        // The mapping is at least `per_tag * depth` long and tag < depth, so this stays inside.
        self.map.as_ptr().wrapping_add(self.per_tag * usize::from(tag)) as *mut u8
    }

    /// One iovec per tag, for registering the buffers with a ring.
    pub fn iovecs(&self) -> Vec<libc::iovec> {
        (0..self.depth)
            .map(|t| libc::iovec {
                iov_base: self.ptr(t) as *mut libc::c_void,
                iov_len: self.per_tag,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_page_aligned_and_disjoint() {
        for lock in [false, true] {
            let b = IoBufs::new(4, 512 * 1024 + 1, lock).unwrap();
            assert_eq!(b.per_tag(), 516 * 1024);
            for t in 0..4 {
                assert_eq!(b.ptr(t) as usize % 4096, 0);
            }
            assert_eq!(b.ptr(1) as usize - b.ptr(0) as usize, b.per_tag());
            let iov = b.iovecs();
            assert_eq!(iov.len(), 4);
            assert_eq!(iov[3].iov_base as usize, b.ptr(3) as usize);
            // Every byte of every buffer is writable.
            // SAFETY: the arena holds 4 * per_tag bytes from ptr(0), owned by `b`.
            unsafe { std::ptr::write_bytes(b.ptr(0), 0x5a, 4 * b.per_tag()) };
        }
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn tag_past_depth_panics() {
        IoBufs::new(2, 4096, false).unwrap().ptr(2);
    }
}
