//! A queue's read-only view of the driver's I/O descriptor array (`mmap` of `/dev/ublkcN`).

use std::os::fd::RawFd;

use crate::error::{Error, Result};
use crate::uapi::*;

pub struct DescMap {
    ptr: *const ublksrv_io_desc,
    len: usize,
    depth: u16,
}

impl DescMap {
    pub fn new(cdev_fd: RawFd, q: u16, depth: u16) -> Result<Self> {
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
        let len = queue_desc_map_len(depth, page) as usize;
        let off = queue_desc_map_offset(q, page);
        // SAFETY: a fresh shared read-only mapping of the char device; the kernel validates the
        // offset and length. Nothing else aliases the returned range.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                cdev_fd,
                off as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::last_os("mmap descriptor array").queue(q));
        }
        Ok(DescMap { ptr: ptr as *const ublksrv_io_desc, len, depth })
    }

    pub fn read(&self, tag: u16) -> ublksrv_io_desc {
        assert!(tag < self.depth);
        // SAFETY: the mapping holds `depth` descriptors and tag < depth. The driver wrote this
        // one before completing the fetch whose CQE we just reaped, and does not touch it again
        // until we commit; volatile because the memory is shared with the kernel.
        unsafe { std::ptr::read_volatile(self.ptr.add(usize::from(tag))) }
    }
}

impl Drop for DescMap {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the range mmap returned; no reference into it outlives self.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}
