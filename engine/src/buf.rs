//! Per-queue I/O buffers: one anonymous mapping carved into one max-sized buffer per tag,
//! allocated once when the queue starts and never touched by the allocator again.

use memmap2::{MmapMut, MmapOptions};

use crate::error::{Error, Result};

pub struct IoBufs {
    map: MmapMut,
    per_tag: usize,
    depth: u16,
}

/// Rounds up to whole pages so every tag's buffer is page aligned (O_DIRECT needs it).
pub fn per_tag_len(max_io_bytes: u32) -> usize {
    (max_io_bytes as usize).div_ceil(4096) * 4096
}

impl IoBufs {
    pub fn new(depth: u16, max_io_bytes: u32) -> Result<Self> {
        let per_tag = per_tag_len(max_io_bytes);
        let len = per_tag * usize::from(depth);
        let map =
            MmapOptions::new().len(len).map_anon().map_err(|e| Error::os("mmap I/O buffers", e))?;
        // Transparent huge pages where the kernel allows: fewer TLB misses on big I/O.
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage);
        Ok(IoBufs { map, per_tag, depth })
    }

    pub fn per_tag(&self) -> usize {
        self.per_tag
    }

    /// The tag's buffer. Valid for as long as `self` lives.
    pub fn ptr(&self, tag: u16) -> *mut u8 {
        assert!(tag < self.depth, "tag {tag} out of range");
        // The mapping is `per_tag * depth` long and tag < depth, so this stays inside it.
        self.map.as_ptr().wrapping_add(self.per_tag * usize::from(tag)) as *mut u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_page_aligned_and_disjoint() {
        let b = IoBufs::new(4, 512 * 1024 + 1).unwrap();
        assert_eq!(b.per_tag(), 516 * 1024);
        for t in 0..4 {
            assert_eq!(b.ptr(t) as usize % 4096, 0);
        }
        assert_eq!(b.ptr(1) as usize - b.ptr(0) as usize, b.per_tag());
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn tag_past_depth_panics() {
        IoBufs::new(2, 4096).unwrap().ptr(2);
    }
}
