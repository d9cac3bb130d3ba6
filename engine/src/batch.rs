//! UBLK_F_BATCH_IO (Linux 7.0+): a queue talks to the driver per queue instead of per tag.
//!
//! - PREP_IO_CMDS hands the driver every tag once, at start.
//! - One multishot FETCH_IO_CMDS stays armed. The driver writes the tags of new requests, as
//!   packed u16s, into buffers this queue provides through an io_uring buffer ring: up to 128
//!   tags per completion.
//! - The requests finished during one loop iteration are committed together by one
//!   COMMIT_IO_CMDS. A committed tag comes back through the FETCH with its next request.
//!
//! The driver reads an element array when the command is issued, which under SQPOLL happens
//! after `io_uring_enter` returns: each array stays untouched until its completion.

use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::{opcode, squeue, types, IoUring};

use crate::error::{Error, Result};
use crate::mode::Data;
use crate::queue::Placement;
use crate::uapi::*;
/// The driver writes at most 128 tags per FETCH completion (`min(len, 256) / 2`).
pub const MAX_TAGS_PER_CQE: usize = 128;
const FETCH_BUF_BYTES: usize = MAX_TAGS_PER_CQE * 2;
/// Commit arrays: one is filled while the others may still be with the kernel.
const SLOTS: usize = 4;

/// io_uring UAPI values the io-uring crate does not export.
const IORING_URING_CMD_MULTISHOT: u32 = 1 << 1;
const IORING_CQE_F_BUFFER: u32 = 1 << 0;
/// Offset of the op-flags union (`uring_cmd_flags` for URING_CMD) in an SQE.
const SQE_OP_FLAGS: usize = 28;

/// The FETCH buffers: an io_uring buffer ring and the buffers it hands out, in one mapping
/// that only the kernel writes (tags) and this struct reads through raw pointers.
struct TagRing {
    base: *mut u8,
    len: usize,
    /// Bytes of the ring entries (page-rounded); the buffers follow.
    ring_bytes: usize,
    entries: u16,
    tail: u16,
    /// Its provided-buffer group on the ring (one per queue).
    group: u16,
}

impl TagRing {
    fn new(ring: &IoUring, depth: u16, group: u16) -> Result<TagRing> {
        // Every FETCH completion carries at least one tag and uses one buffer, and a tag is
        // delivered again only after it was committed, so `depth` buffers never run out
        // between two drains.
        let entries = depth.next_power_of_two();
        let ring_bytes = (usize::from(entries) * 16).next_multiple_of(4096);
        let len = ring_bytes + usize::from(entries) * FETCH_BUF_BYTES;
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::last_os("mmap FETCH buffer ring"));
        }
        let mut t = TagRing { base: p as *mut u8, len, ring_bytes, entries, tail: 0, group };
        for bid in 0..entries {
            t.provide(bid);
        }
        t.publish();
        // SAFETY: the ring entries and buffers live in `t`'s mapping, which the queue drops only
        // after the io_uring that the ring is registered with (field order in `Core`).
        unsafe { ring.submitter().register_buf_ring_with_flags(t.base as u64, entries, group, 0) }
            .map_err(|e| Error::os("register FETCH buffer ring", e))?;
        Ok(t)
    }

    fn buf(&self, bid: u16) -> *mut u8 {
        debug_assert!(bid < self.entries);
        // SAFETY: bid < entries, so the buffer lies inside the mapping.
        unsafe { self.base.add(self.ring_bytes + usize::from(bid) * FETCH_BUF_BYTES) }
    }

    /// Puts buffer `bid` back into the ring (seen by the kernel at the next `publish`).
    fn provide(&mut self, bid: u16) {
        let slot = usize::from(self.tail & (self.entries - 1));
        // SAFETY: slot < entries: the 16-byte `io_uring_buf` lies inside the ring part of the
        // mapping. Only addr, len and bid are written: entry 0's last u16 is the ring's tail.
        unsafe {
            let e = self.base.add(slot * 16);
            (e as *mut u64).write(self.buf(bid) as u64);
            (e.add(8) as *mut u32).write(FETCH_BUF_BYTES as u32);
            (e.add(12) as *mut u16).write(bid);
        }
        self.tail = self.tail.wrapping_add(1);
    }

    /// Publishes the entries written since the last call.
    fn publish(&self) {
        // SAFETY: the tail is the u16 at offset 14 of the (page-aligned) ring, which the kernel
        // reads with acquire semantics; the release store orders the entries before it.
        let tail = unsafe { AtomicU16::from_ptr(self.base.add(14) as *mut u16) };
        tail.store(self.tail, Ordering::Release);
    }

    /// Copies the `n` tags of buffer `bid` into `out` and gives the buffer back.
    fn take(&mut self, bid: u16, n: usize, out: &mut [u16; MAX_TAGS_PER_CQE]) -> usize {
        let n = n.min(MAX_TAGS_PER_CQE);
        if bid >= self.entries {
            debug_assert!(false, "FETCH completion names buffer {bid} of {}", self.entries);
            return 0;
        }
        // SAFETY: the kernel wrote these n <= 128 tags before posting the completion we reaped;
        // it cannot touch the buffer again until `provide` hands it back below.
        unsafe { std::ptr::copy_nonoverlapping(self.buf(bid) as *const u16, out.as_mut_ptr(), n) };
        self.provide(bid);
        self.publish();
        n
    }
}

impl Drop for TagRing {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what mmap returned; no pointer into it outlives self.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
    }
}

/// What a COMMIT's completion says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Committed {
    /// Every element was applied.
    All,
    /// Elements before `at` were applied; the driver refused element `at` (with `errno` when
    /// it was the first, otherwise the driver does not say why), and did not look at the rest.
    Stopped { at: usize, errno: Option<i32> },
}

/// A queue's BATCH_IO state: element arrays and FETCH buffers, allocated once.
pub struct Batch {
    q: u16,
    /// Fixed-file index of `/dev/ublkcN` on the ring.
    cdev: u32,
    /// Zero copy: tag t's pages are the ring's fixed buffer `buf_base + t`.
    buf_base: u16,
    flags: u16,
    elem_bytes: usize,
    /// Copy mode: the address of each tag's buffer (empty in the other modes).
    buf_addrs: Vec<u64>,
    fetch: TagRing,
    prep: Vec<u8>,
    /// Commits of the current loop iteration.
    staged: Vec<u8>,
    slots: [Vec<u8>; SLOTS],
    busy: [bool; SLOTS],
}

impl Batch {
    /// `buf_addrs`: each tag's buffer in copy mode (empty otherwise); `at`: the queue's share
    /// of the ring (its char device's fixed file, fixed buffers and FETCH buffer group).
    pub fn new(
        ring: &IoUring,
        q: u16,
        depth: u16,
        data: Data,
        buf_addrs: Vec<u64>,
        at: Placement,
    ) -> Result<Batch> {
        let (flags, elem_bytes) = match data {
            Data::ZeroCopy => (UBLK_BATCH_F_AUTO_BUF_REG_FALLBACK, 8),
            Data::UserCopy => (0, 8),
            Data::Copy => (UBLK_BATCH_F_HAS_BUF_ADDR, 16),
        };
        // The elements carry addresses exactly when `buf_addrs` is not empty (`push_elem`).
        let want = if data == Data::Copy { usize::from(depth) } else { 0 };
        assert_eq!(buf_addrs.len(), want, "buffer addresses are for copy mode, one per tag");
        let cap = usize::from(depth) * elem_bytes;
        Ok(Batch {
            q,
            cdev: at.file_base,
            buf_base: at.buf_base,
            flags,
            elem_bytes,
            buf_addrs,
            fetch: TagRing::new(ring, depth, at.bgid)?,
            prep: Vec::with_capacity(cap),
            staged: Vec::with_capacity(cap),
            slots: std::array::from_fn(|_| Vec::with_capacity(cap)),
            busy: [false; SLOTS],
        })
    }

    fn cmd(&self, op: u32, elems: &[u8]) -> squeue::Entry {
        let cmd = ublk_batch_io {
            q_id: self.q,
            flags: self.flags,
            nr_elem: (elems.len() / self.elem_bytes) as u16,
            elem_bytes: self.elem_bytes as u8,
            ..Default::default()
        };
        opcode::UringCmd16::new(types::Fixed(self.cdev), op)
            .cmd(cmd.to_bytes())
            .addr(Some(elems.as_ptr() as u64))
            .build()
    }

    /// PREP_IO_CMDS for tags `0..depth`. The array lives in `self` until the completion.
    pub fn prep(&mut self, depth: u16) -> squeue::Entry {
        self.prep.clear();
        for tag in 0..depth {
            push_elem(&mut self.prep, &self.buf_addrs, self.buf_base, tag, 0);
        }
        self.cmd(UBLK_U_IO_PREP_IO_CMDS, &self.prep)
    }

    /// The multishot FETCH_IO_CMDS, taking its buffers from the FETCH group.
    pub fn fetch(&self) -> squeue::Entry {
        let cmd = ublk_batch_io { q_id: self.q, elem_bytes: 2, ..Default::default() };
        let sqe = opcode::UringCmd16::new(types::Fixed(self.cdev), UBLK_U_IO_FETCH_IO_CMDS)
            .cmd(cmd.to_bytes())
            .build()
            .flags(squeue::Flags::BUFFER_SELECT);
        let mut raw = sqe_bytes(sqe);
        raw[SQE_OP_FLAGS..SQE_OP_FLAGS + 4]
            .copy_from_slice(&IORING_URING_CMD_MULTISHOT.to_ne_bytes());
        // buf_group shares the u16 at offset 40 with buf_index.
        raw[40..42].copy_from_slice(&self.fetch.group.to_ne_bytes());
        sqe_from_bytes(raw)
    }

    /// The tags a FETCH completion delivered, copied into `out`; its buffer is recycled.
    pub fn fetched(&mut self, res: i32, flags: u32, out: &mut [u16; MAX_TAGS_PER_CQE]) -> usize {
        if res <= 0 || flags & IORING_CQE_F_BUFFER == 0 {
            return 0;
        }
        self.fetch.take((flags >> 16) as u16, res as usize / 2, out)
    }

    /// Queues `tag`'s result for the next COMMIT_IO_CMDS.
    pub fn stage(&mut self, tag: u16, result: i32) {
        push_elem(&mut self.staged, &self.buf_addrs, self.buf_base, tag, result);
    }

    /// COMMIT_IO_CMDS of everything staged, in a free array (its index is returned with it), or
    /// `None` when nothing is staged or every array is still with the kernel (the staged results
    /// then wait for the next call).
    pub fn commit(&mut self) -> Option<(usize, squeue::Entry)> {
        if self.staged.is_empty() {
            return None;
        }
        let slot = self.busy.iter().position(|b| !b)?;
        self.busy[slot] = true;
        let s = &mut self.slots[slot];
        s.clear();
        s.extend_from_slice(&self.staged);
        self.staged.clear();
        Some((slot, self.cmd(UBLK_U_IO_COMMIT_IO_CMDS, &self.slots[slot])))
    }

    /// Whether any COMMIT is still with the kernel.
    pub fn commits_in_flight(&self) -> bool {
        self.busy.iter().any(|&b| b)
    }

    /// Reads a COMMIT's completion. On `Stopped`, the array stays busy until `release` so the
    /// caller can look at (and restage) the elements not applied.
    pub fn committed(&mut self, slot: usize, res: i32) -> Committed {
        let bytes = self.slots[slot].len();
        if res >= 0 && res as usize == bytes {
            self.busy[slot] = false;
            return Committed::All;
        }
        if res < 0 {
            Committed::Stopped { at: 0, errno: Some(-res) }
        } else {
            Committed::Stopped { at: res as usize / self.elem_bytes, errno: None }
        }
    }

    /// Tag and result of element `i` of commit array `slot`.
    pub fn element(&self, slot: usize, i: usize) -> Option<(u16, i32)> {
        let s = &self.slots[slot];
        let e = s.get(i * self.elem_bytes..i * self.elem_bytes + 8)?;
        let h = ublk_elem_header::from_bytes(e.try_into().ok()?);
        Some((h.tag, h.result))
    }

    /// Unregisters the FETCH buffer group from the ring (the queue is leaving it).
    pub fn unbind(&self, ring: &IoUring) -> Result<()> {
        ring.submitter()
            .unregister_buf_ring(self.fetch.group)
            .map_err(|e| Error::os("unregister FETCH buffer ring", e))
    }

    /// Frees commit array `slot` after a `Stopped` completion.
    pub fn release(&mut self, slot: usize) {
        self.busy[slot] = false;
    }
}

/// Appends one element. `buf_addrs` holds each tag's buffer in copy mode (the element then
/// carries it) and is empty otherwise.
fn push_elem(out: &mut Vec<u8>, buf_addrs: &[u64], buf_base: u16, tag: u16, result: i32) {
    let bytes = if buf_addrs.is_empty() { 8 } else { 16 };
    debug_assert!(out.len() + bytes <= out.capacity(), "more elements than tags");
    // The fixed-buffer index of zero copy is the queue's base + tag, as in the per-tag mode; the
    // batch COMMIT unregisters the index it names, so it must stay the same for a tag.
    let h = ublk_elem_header { tag, buf_index: buf_base.wrapping_add(tag), result };
    out.extend_from_slice(&h.to_bytes());
    if !buf_addrs.is_empty() {
        out.extend_from_slice(&buf_addrs[usize::from(tag)].to_ne_bytes());
    }
}

fn sqe_bytes(sqe: squeue::Entry) -> [u8; 64] {
    // SAFETY: squeue::Entry is repr(C) around the kernel's 64-byte io_uring_sqe, plain data
    // with every byte initialised (built from a zeroed SQE).
    unsafe { std::mem::transmute::<squeue::Entry, [u8; 64]>(sqe) }
}

fn sqe_from_bytes(raw: [u8; 64]) -> squeue::Entry {
    // SAFETY: any 64 bytes are a valid io_uring_sqe (plain integers and unions of them).
    unsafe { std::mem::transmute::<[u8; 64], squeue::Entry>(raw) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> Option<IoUring> {
        IoUring::new(8).ok()
    }

    fn at(bgid: u16) -> Placement {
        Placement { slot: 0, file_base: 3, buf_base: 16, bgid }
    }

    #[test]
    fn fetch_sqe_is_multishot_with_buffer_select() {
        let Some(r) = ring() else { return };
        let Ok(b) = Batch::new(&r, 1, 4, Data::ZeroCopy, Vec::new(), at(5)) else {
            println!("skipped: this kernel has no io_uring buffer rings");
            return;
        };
        let raw = sqe_bytes(b.fetch());
        assert_eq!(raw[0], 46, "IORING_OP_URING_CMD");
        assert_eq!(raw[1] & (1 << 5), 1 << 5, "IOSQE_BUFFER_SELECT");
        assert_eq!(u32::from_ne_bytes(raw[28..32].try_into().unwrap()), IORING_URING_CMD_MULTISHOT);
        assert_eq!(u16::from_ne_bytes(raw[40..42].try_into().unwrap()), 5, "the queue's group");
        assert_eq!(i32::from_ne_bytes(raw[4..8].try_into().unwrap()), 3, "its /dev/ublkcN");
        // cmd_op at 8, the ublk_batch_io at 48.
        assert_eq!(u32::from_ne_bytes(raw[8..12].try_into().unwrap()), UBLK_U_IO_FETCH_IO_CMDS);
        assert_eq!(&raw[48..50], &1u16.to_ne_bytes());
        assert_eq!(raw[54], 2, "elem_bytes of a FETCH is sizeof(u16)");
    }

    #[test]
    fn copy_elements_carry_the_buffer_address_and_partial_commits_are_read() {
        let Some(r) = ring() else { return };
        let addrs = vec![0x1000, 0x2000, 0x3000, 0x4000];
        let Ok(mut b) = Batch::new(&r, 0, 4, Data::Copy, addrs, at(0)) else { return };
        let raw = sqe_bytes(b.prep(4));
        assert_eq!(u16::from_ne_bytes(raw[50..52].try_into().unwrap()), UBLK_BATCH_F_HAS_BUF_ADDR);
        assert_eq!(u16::from_ne_bytes(raw[52..54].try_into().unwrap()), 4, "nr_elem");
        assert_eq!(raw[54], 16);
        assert_eq!(&b.prep[16 + 8..32], &0x2000u64.to_ne_bytes());

        assert!(b.commit().is_none(), "nothing staged");
        b.stage(2, 4096);
        b.stage(0, -5);
        let (slot, _) = b.commit().unwrap();
        assert!(b.commits_in_flight());
        assert_eq!(b.element(slot, 1), Some((0, -5)));
        assert_eq!(b.committed(slot, 16), Committed::Stopped { at: 1, errno: None });
        b.release(slot);
        b.stage(1, 0);
        let (slot, _) = b.commit().unwrap();
        assert_eq!(b.committed(slot, -16), Committed::Stopped { at: 0, errno: Some(16) });
        b.release(slot);
        b.stage(3, 1);
        let (slot, _) = b.commit().unwrap();
        assert_eq!(b.committed(slot, 16), Committed::All);
        assert!(!b.commits_in_flight());
    }

    #[test]
    fn staged_results_wait_while_every_array_is_busy() {
        let Some(r) = ring() else { return };
        let Ok(mut b) = Batch::new(&r, 0, 8, Data::UserCopy, Vec::new(), at(0)) else { return };
        let mut slots = Vec::new();
        for tag in 0..SLOTS as u16 {
            b.stage(tag, 0);
            slots.push(b.commit().unwrap().0);
        }
        b.stage(7, 0);
        assert!(b.commit().is_none(), "all arrays busy");
        assert_eq!(b.committed(slots[2], 8), Committed::All);
        let (slot, _) = b.commit().unwrap();
        assert_eq!(slot, slots[2]);
        assert_eq!(b.element(slot, 0), Some((7, 0)));
    }
}
