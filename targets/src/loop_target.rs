//! `loop`: serves a regular file or a block device, O_DIRECT by default, on the queue's own ring.
//!
//! READ/WRITE go to the backing fd through io_uring; a short transfer is resumed for the rest,
//! never reported as done. FLUSH is an fdatasync; a FUA write is written with RWF_DSYNC.
//! DISCARD punches a hole (files) or, on block devices, is the io_uring block command
//! BLOCK_URING_CMD_DISCARD (Linux 6.12+) on the queue's ring, never a synchronous ioctl (a long
//! discard would stall every request of the queue); where the kernel lacks the command, the
//! request fails with EOPNOTSUPP (discard is advisory) rather than blocking. WRITE_ZEROES is a
//! fallocate ZERO_RANGE, or a hole when the request allows unmapping. With `--metadata-size`
//! each READ/WRITE also reads/writes its metadata in the metadata file (`loop_meta`), beside
//! the data and in parallel with it; such a device offers no discard.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use io_uring::{opcode, squeue, types};
use ublk_fast_engine::stats::QueueStats;
use ublk_fast_engine::target::{
    DiscardLimits, Flow, Integrity, QueueHandler, Request, Submit, Target, TargetParams,
};

use crate::loop_meta::{MetaSpec, MetaStore};
use ublk_fast_engine::uapi::*;
use ublk_fast_engine::{Error, Result};

// linux/fs.h block ioctls (x86_64, arm64 and the other "generic" ioctl layouts).
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKSSZGET: libc::c_ulong = 0x1268;
const BLKPBSZGET: libc::c_ulong = 0x127b;
/// linux/blkdev.h: io_uring's block-device command (`_IO(0x12, 0)`): discard `addr3` bytes
/// from offset `addr`.
pub(crate) const BLOCK_URING_CMD_DISCARD: u32 = 0x1200;

/// A BLOCK_URING_CMD_DISCARD of `len` bytes at `offset` on `file`, issued from io_uring's
/// worker (IOSQE_ASYNC). Issued inline, the kernel marks a one-bio discard REQ_NOWAIT, and a
/// device without nowait support (device-mapper targets such as dm-delay or dm-flakey) fails
/// it with EOPNOTSUPP instead of retrying: the discard would be lost, not deferred. A worker
/// may block, the core thread still does not. Discards are rare; the hand-off costs little.
pub(crate) fn blk_discard_sqe(file: types::Fixed, offset: u64, len: u64) -> squeue::Entry {
    let mut cmd = [0u8; 16];
    // The command area starts where `addr3` is: the length in bytes.
    cmd[..8].copy_from_slice(&len.to_ne_bytes());
    opcode::UringCmd16::new(file, BLOCK_URING_CMD_DISCARD)
        .addr(Some(offset))
        .cmd(cmd)
        .build()
        .flags(squeue::Flags::ASYNC)
}

#[derive(Clone, Debug, Default)]
pub struct LoopOptions {
    pub buffered: bool,
    pub read_only: bool,
    /// Logical block size override.
    pub block_size: Option<u32>,
    pub discard: bool,
}

pub struct LoopTarget {
    file: File,
    path: PathBuf,
    is_blkdev: bool,
    size: u64,
    logical_block: u32,
    physical_block: u32,
    opts: LoopOptions,
    meta: Option<MetaStore>,
}

/// `--block-size` must be a logical block size the kernel takes.
fn check_block_size(path: &Path, opts: &LoopOptions) -> Result<()> {
    match opts.block_size {
        Some(bs) if !bs.is_power_of_two() || !(512..=4096).contains(&bs) => {
            Err(invalid(path, format!("--block-size {bs}: must be 512, 1024, 2048 or 4096")))
        }
        _ => Ok(()),
    }
}

fn invalid(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::invalid(format!("loop {}: {what}", path.display()))
}

fn ioctl_u64(f: &File, req: libc::c_ulong) -> io::Result<u64> {
    let mut v: u64 = 0;
    // SAFETY: the request writes one u64 into `v`, which lives across the call.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), req, &mut v as *mut u64) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

fn ioctl_u32(f: &File, req: libc::c_ulong) -> io::Result<u32> {
    let mut v: libc::c_int = 0;
    // SAFETY: the request writes one int into `v`, which lives across the call.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), req, &mut v as *mut libc::c_int) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v as u32)
}

/// Reads one block at offset 0 the way the queues will (O_DIRECT, aligned buffer), so a
/// backing store that accepts O_DIRECT at open but not in practice is caught now.
fn probe_direct_read(f: &File, len: usize) -> io::Result<()> {
    let layout = std::alloc::Layout::from_size_align(len, 4096).expect("valid layout");
    // SAFETY: layout has a non-zero size.
    let buf = unsafe { std::alloc::alloc(layout) };
    if buf.is_null() {
        return Err(io::Error::from_raw_os_error(libc::ENOMEM));
    }
    // SAFETY: buf is `len` bytes we own until the dealloc below.
    let r = unsafe { libc::pread(f.as_raw_fd(), buf as *mut libc::c_void, len, 0) };
    let err = io::Error::last_os_error();
    // SAFETY: allocated above with the same layout.
    unsafe { std::alloc::dealloc(buf, layout) };
    if r < 0 {
        return Err(err);
    }
    Ok(())
}

impl LoopTarget {
    /// Opens and checks the backing store; every refusal is one line naming the fix.
    pub fn open(path: &Path, opts: &LoopOptions) -> Result<Self> {
        check_block_size(path, opts)?;
        let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => invalid(path, "no such file or block device"),
            io::ErrorKind::PermissionDenied => invalid(path, "permission denied"),
            _ => invalid(path, e),
        })?;
        let ft = meta.file_type();
        if ft.is_dir() {
            return Err(invalid(path, "is a directory: give a regular file or a block device"));
        }
        let is_blkdev = ft.is_block_device();
        if !ft.is_file() && !is_blkdev {
            return Err(invalid(path, "is neither a regular file nor a block device"));
        }
        let mut flags = libc::O_CLOEXEC;
        if !opts.buffered {
            flags |= libc::O_DIRECT;
        }
        if is_blkdev && !opts.read_only {
            // Refuse a block device that is mounted or held exclusively by someone else.
            flags |= libc::O_EXCL;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!opts.read_only)
            .custom_flags(flags)
            .open(path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EACCES) | Some(libc::EPERM) => invalid(path, "permission denied"),
                Some(libc::EROFS) => invalid(path, "is on a read-only filesystem: add --read-only"),
                Some(libc::EBUSY) => {
                    invalid(path, "is busy (mounted or held by another user of the device)")
                }
                Some(libc::EINVAL) if !opts.buffered => invalid(
                    path,
                    "the filesystem refuses O_DIRECT: add --buffered to serve it through the page cache",
                ),
                _ => invalid(path, e),
            })?;
        Self::adopt(file, path, opts)
    }

    /// Whether the backing store is a block device (not a regular file).
    pub fn is_blkdev(&self) -> bool {
        self.is_blkdev
    }

    /// Serves `file`, already opened as `open` opens `path` (by the CLI, in the caller's mount
    /// namespace, and handed to the service over its socket): the same checks, the same lock.
    pub fn adopt(file: File, path: &Path, opts: &LoopOptions) -> Result<Self> {
        check_block_size(path, opts)?;
        let meta = file.metadata().map_err(|e| invalid(path, e))?;
        let ft = meta.file_type();
        let is_blkdev = ft.is_block_device();
        if !ft.is_file() && !is_blkdev {
            return Err(invalid(path, "is neither a regular file nor a block device"));
        }
        // SAFETY: fcntl(F_GETFL) on a descriptor we own reads its status flags.
        let fl = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        let writable = fl >= 0 && fl & libc::O_ACCMODE == libc::O_RDWR;
        if writable == opts.read_only || (fl & libc::O_DIRECT != 0) == opts.buffered {
            return Err(invalid(
                path,
                "was handed over opened with other flags than its options say",
            ));
        }
        // One read-write server per backing store: two would corrupt each other's data.
        let lock = if opts.read_only { libc::LOCK_SH } else { libc::LOCK_EX };
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), lock | libc::LOCK_NB) } != 0 {
            return Err(invalid(
                path,
                "is already in use by another ublk-fast device (`ublk-fast list` shows it)",
            ));
        }
        let (size, mut logical, physical) = if is_blkdev {
            let size = ioctl_u64(&file, BLKGETSIZE64)
                .map_err(|e| invalid(path, format!("BLKGETSIZE64: {e}")))?;
            let l = ioctl_u32(&file, BLKSSZGET)
                .map_err(|e| invalid(path, format!("BLKSSZGET: {e}")))?;
            let p = ioctl_u32(&file, BLKPBSZGET)
                .map_err(|e| invalid(path, format!("BLKPBSZGET: {e}")))?;
            (size, l, p.max(l))
        } else {
            (meta.len(), 512, 4096)
        };
        if let Some(bs) = opts.block_size {
            if bs < logical {
                return Err(invalid(
                    path,
                    format!("--block-size {bs} is below the device's {logical}"),
                ));
            }
            logical = bs;
        }
        let physical = physical.max(logical);
        if size == 0 {
            return Err(invalid(
                path,
                "is empty: give it a size first (e.g. `truncate -s 1G FILE`)",
            ));
        }
        if size % u64::from(logical) != 0 {
            return Err(invalid(
                path,
                format!("size {size} is not a multiple of the {logical}-byte block size: resize it or pick --block-size"),
            ));
        }
        if !opts.buffered {
            probe_direct_read(&file, logical as usize).map_err(|e| match e.raw_os_error() {
                Some(libc::EINVAL) => invalid(
                    path,
                    format!("{logical}-byte O_DIRECT reads fail (EINVAL): try --block-size 4096, or --buffered"),
                ),
                _ => invalid(path, format!("test read failed: {e}")),
            })?;
        }
        Ok(LoopTarget {
            file,
            path: path.to_path_buf(),
            is_blkdev,
            size,
            logical_block: logical,
            physical_block: physical,
            opts: opts.clone(),
            meta: None,
        })
    }

    /// Adds per-sector metadata (`--metadata-size`), kept in `path` (`file` if the CLI opened
    /// it already).
    pub fn with_metadata(
        mut self,
        file: Option<File>,
        path: &Path,
        spec: MetaSpec,
    ) -> Result<Self> {
        let store = match file {
            Some(f) => MetaStore::adopt(f, path, spec, self.size, self.logical_block)?,
            None => {
                MetaStore::open(path, spec, self.size, self.logical_block, self.opts.read_only)?
            }
        };
        self.meta = Some(store);
        Ok(self)
    }

    /// Discard limits: a block device's own, a file's from its filesystem block.
    fn discard_limits(&self) -> Option<DiscardLimits> {
        // A discarded range would read back as zeros with its old metadata, which no longer
        // matches: a device with metadata offers no discard (write-zeroes the kernel then does
        // with ordinary writes, metadata included).
        if !self.opts.discard || self.opts.read_only || self.meta.is_some() {
            return None;
        }
        let all = u32::MAX >> 9;
        if self.is_blkdev {
            // SAFETY: fstat into a local struct.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: valid fd and out-pointer.
            unsafe { libc::fstat(self.file.as_raw_fd(), &mut st) };
            let q = format!(
                "/sys/dev/block/{}:{}/queue",
                libc::major(st.st_rdev),
                libc::minor(st.st_rdev)
            );
            let read = |n: &str| -> u64 {
                std::fs::read_to_string(format!("{q}/{n}"))
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(0)
            };
            let max_discard = (read("discard_max_bytes") >> 9).min(u64::from(all)) as u32;
            let max_wz = (read("write_zeroes_max_bytes") >> 9).min(u64::from(all)) as u32;
            let gran = (read("discard_granularity") as u32).max(self.logical_block);
            Some(DiscardLimits {
                granularity: gran,
                max_discard_sectors: max_discard,
                // Without hardware write-zeroes the kernel's zeroout writes zeros itself.
                max_write_zeroes_sectors: if max_wz > 0 { max_wz } else { all },
            })
        } else {
            Some(DiscardLimits {
                granularity: self.physical_block,
                max_discard_sectors: all,
                max_write_zeroes_sectors: all,
            })
        }
    }
}

impl Target for LoopTarget {
    fn name(&self) -> &'static str {
        "loop"
    }

    fn args(&self) -> Vec<String> {
        let mut a = vec![self.path.display().to_string()];
        if self.opts.buffered {
            a.push("--buffered".into());
        }
        if self.opts.read_only {
            a.push("--read-only".into());
        }
        if let Some(bs) = self.opts.block_size {
            a.push(format!("--block-size={bs}"));
        }
        if !self.opts.discard {
            a.push("--no-discard".into());
        }
        if let Some(m) = &self.meta {
            a.extend(m.args());
        }
        a
    }

    fn backing(&self) -> Option<String> {
        Some(self.path.display().to_string())
    }

    /// The backing store must hold the new size now (a file is not grown behind the user's
    /// back).
    fn check_resize(&self, bytes: u64) -> Result<()> {
        let have = if self.is_blkdev {
            ioctl_u64(&self.file, BLKGETSIZE64).map_err(|e| invalid(&self.path, e))?
        } else {
            self.file.metadata().map_err(|e| invalid(&self.path, e))?.len()
        };
        if have < bytes {
            return Err(invalid(
                &self.path,
                format!("is {have} bytes, smaller than {bytes}: grow it first (e.g. truncate -s)"),
            ));
        }
        if !bytes.is_multiple_of(u64::from(self.logical_block)) {
            return Err(invalid(
                &self.path,
                format!("{bytes} is not a multiple of the {}-byte block size", self.logical_block),
            ));
        }
        Ok(())
    }

    fn params(&self) -> TargetParams {
        let mut attrs = UBLK_ATTR_VOLATILE_CACHE | UBLK_ATTR_FUA;
        if self.opts.read_only {
            attrs |= UBLK_ATTR_READ_ONLY;
        }
        TargetParams {
            size_bytes: self.size,
            logical_block: self.logical_block,
            physical_block: self.physical_block,
            attrs,
            discard: self.discard_limits(),
        }
    }

    fn files(&self) -> Vec<RawFd> {
        let mut f = vec![self.file.as_raw_fd()];
        f.extend(self.meta.as_ref().map(|m| m.file.as_raw_fd()));
        f
    }

    fn spreads_tags(&self) -> bool {
        true
    }
    fn supports_zero_copy(&self) -> bool {
        true
    }

    fn integrity(&self) -> Option<Integrity> {
        self.meta.as_ref().map(|m| m.integrity)
    }

    fn queue_handler(&self, _q: u16, depth: u16) -> Result<Box<dyn QueueHandler>> {
        Ok(Box::new(LoopQueue {
            meta: self.integrity(),
            tags: vec![TagState::default(); usize::from(depth)],
            is_blkdev: self.is_blkdev,
            no_blk_discard: false,
            fixed_file: None,
            read_only: self.opts.read_only,
        }))
    }
}

/// Sub-op bytes carried in `user_data`, so a completion knows what it completes.
mod sub {
    pub const RW: u8 = 0;
    pub const FLUSH: u8 = 1;
    pub const PUNCH: u8 = 2;
    pub const ZERO_RANGE: u8 = 3;
    pub const BLK_DISCARD: u8 = 4;
    /// The request's metadata (read, write or fsync of the metadata file).
    pub const META: u8 = 5;
}

/// What a loop queue remembers of one tag's request between its completions.
#[derive(Clone, Copy, Default)]
struct TagState {
    /// Bytes already transferred for the current READ/WRITE.
    done: u32,
    /// With metadata: its operation is in flight; the first error of the two halves; the data
    /// half's result once it finished first.
    meta_busy: bool,
    meta_err: i32,
    data_res: Option<i32>,
}

struct LoopQueue {
    /// The device's metadata layout, if it has metadata.
    meta: Option<Integrity>,
    /// Indexed by tag.
    tags: Vec<TagState>,
    is_blkdev: bool,
    /// The kernel refused BLOCK_URING_CMD_DISCARD once (older than 6.12): discards fail fast.
    no_blk_discard: bool,
    /// The backing file's fixed-file index on the ring (known from the first request).
    fixed_file: Option<u32>,
    read_only: bool,
}

impl LoopQueue {
    /// Queues the rest of a READ/WRITE: from the tag's `done` to the end of the request.
    fn push_rw(&mut self, req: &Request, io: &mut dyn Submit) {
        let done = self.tags[usize::from(req.tag)].done;
        let len = req.bytes() as u32 - done;
        let off = req.offset() + u64::from(done);
        let fua = req.desc.op() == UBLK_IO_OP_WRITE && req.desc.flags() & UBLK_IO_F_FUA != 0;
        let rw_flags = if fua { libc::RWF_DSYNC } else { 0 };
        if fua {
            QueueStats::bump(&io.stats().backend_dsync_writes, 1);
        }
        let read = req.desc.op() == UBLK_IO_OP_READ;
        // Where the data is: zero copy, the request's pages as fixed buffer `idx` addressed
        // from 0; copy mode, the tag's buffer, registered as fixed buffer `idx` when buf_reg.
        let (at, fixed) = match (req.buf_index, req.buf_reg) {
            (Some(idx), _) => (done as usize as *mut u8, Some(idx)),
            (None, reg) => (req.buf.wrapping_add(done as usize), reg),
        };
        let sqe = match (fixed, read) {
            (Some(idx), true) => {
                opcode::ReadFixed::new(req.file(0), at, len, idx).offset(off).build()
            }
            (Some(idx), false) => opcode::WriteFixed::new(req.file(0), at, len, idx)
                .offset(off)
                .rw_flags(rw_flags)
                .build(),
            (None, true) => opcode::Read::new(req.file(0), at, len).offset(off).build(),
            (None, false) => {
                opcode::Write::new(req.file(0), at, len).offset(off).rw_flags(rw_flags).build()
            }
        };
        // SAFETY: copy mode: `at..at+len` lies inside the tag's buffer (bytes() <= buf_len was
        // checked when the request started), which the engine keeps alive (and registered, with
        // buf_reg) and unused until we commit. Zero copy: the fixed buffer is the request's
        // pages, registered by the driver until the commit, and `done..done+len` lies inside
        // the request.
        unsafe { io.push(req, sub::RW, sqe) };
    }

    fn push_fallocate(&mut self, req: &Request, which: u8, io: &mut dyn Submit) {
        let mode = match which {
            sub::ZERO_RANGE => libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            _ => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        };
        let sqe = opcode::Fallocate::new(req.file(0), req.bytes() as u64)
            .offset(req.offset())
            .mode(mode)
            .build();
        // SAFETY: fallocate references no memory.
        unsafe { io.push(req, which, sqe) };
    }

    /// The request's metadata half: its read or write in the metadata file, or that file's
    /// fsync for a FLUSH. It runs next to the data half; the request ends when both have.
    fn push_meta(&mut self, req: &Request, io: &mut dyn Submit) {
        let Some(m) = self.meta else { return };
        let t = usize::from(req.tag);
        let op = req.desc.op();
        let sqe = match op {
            UBLK_IO_OP_FLUSH => {
                opcode::Fsync::new(req.file(1)).flags(types::FsyncFlags::DATASYNC).build()
            }
            UBLK_IO_OP_READ | UBLK_IO_OP_WRITE if req.meta_len > 0 => {
                let off = m.bytes_for(req.offset());
                let len = req.meta_len as u32;
                if op == UBLK_IO_OP_READ {
                    opcode::Read::new(req.file(1), req.meta, len).offset(off).build()
                } else {
                    let fua = req.desc.flags() & UBLK_IO_F_FUA != 0;
                    opcode::Write::new(req.file(1), req.meta, len)
                        .offset(off)
                        .rw_flags(if fua { libc::RWF_DSYNC } else { 0 })
                        .build()
                }
            }
            _ => return,
        };
        self.tags[t].meta_busy = true;
        // SAFETY: `req.meta..+meta_len` is the tag's metadata buffer, which the engine keeps
        // alive and untouched until the request is committed; an fsync references no memory.
        unsafe { io.push(req, sub::META, sqe) };
    }

    /// Ends the data half with `flow`; the request ends once its metadata half has too.
    fn join(&mut self, tag: u16, flow: Flow) -> Flow {
        let t = usize::from(tag);
        match flow {
            Flow::Done(r) if self.tags[t].meta_busy => {
                self.tags[t].data_res = Some(r);
                Flow::Pending
            }
            Flow::Done(r) if r >= 0 && self.tags[t].meta_err < 0 => {
                Flow::Done(self.tags[t].meta_err)
            }
            f => f,
        }
    }

    /// The metadata half finished.
    fn meta_done(&mut self, req: &Request, res: i32) -> Flow {
        let t = usize::from(req.tag);
        self.tags[t].meta_busy = false;
        let want = if req.desc.op() == UBLK_IO_OP_FLUSH { 0 } else { req.meta_len as i32 };
        if res != want {
            self.tags[t].meta_err = if res < 0 { res } else { -libc::EIO };
        }
        match self.tags[t].data_res.take() {
            Some(r) => self.join(req.tag, Flow::Done(r)),
            // The data half is still in flight.
            None => Flow::Pending,
        }
    }

    /// BLOCK_URING_CMD_DISCARD: the discard runs in the block layer, its completion comes
    /// back on the ring like any I/O.
    fn push_blk_discard(&mut self, req: &Request, io: &mut dyn Submit) {
        let sqe = blk_discard_sqe(req.file(0), req.offset(), req.bytes() as u64);
        // SAFETY: the command references no memory.
        unsafe { io.push(req, sub::BLK_DISCARD, sqe) };
    }
}

impl QueueHandler for LoopQueue {
    fn start(&mut self, req: &Request, io: &mut dyn Submit) -> Flow {
        if self.meta.is_some() {
            let t = &mut self.tags[usize::from(req.tag)];
            (t.meta_busy, t.meta_err, t.data_res) = (false, 0, None);
        }
        let flow = self.start_data(req, io);
        if flow == Flow::Pending && self.meta.is_some() {
            self.push_meta(req, io);
        }
        flow
    }

    fn complete(&mut self, req: &Request, sub: u8, res: i32, io: &mut dyn Submit) -> Flow {
        if sub == sub::META {
            return self.meta_done(req, res);
        }
        let flow = self.complete_data(req, sub, res, io);
        self.join(req.tag, flow)
    }

    /// Every operation on the backing file (this queue's fixed-file slot) is cancelled; each
    /// completes with ECANCELED, which fails its request.
    fn cancel(&mut self, io: &mut dyn Submit) {
        let Some(f) = self.fixed_file else { return };
        let sqe =
            opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fixed(f)).all()).build();
        // SAFETY: a cancellation references no memory.
        unsafe { io.push_queue(0, 0, sqe) };
        if self.meta.is_some() {
            let sqe =
                opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fixed(f + 1)).all())
                    .build();
            // SAFETY: as above.
            unsafe { io.push_queue(0, 0, sqe) };
        }
    }
}

impl LoopQueue {
    fn start_data(&mut self, req: &Request, io: &mut dyn Submit) -> Flow {
        self.fixed_file = Some(req.first_file);
        let op = req.desc.op();
        let writes = matches!(op, UBLK_IO_OP_WRITE | UBLK_IO_OP_DISCARD | UBLK_IO_OP_WRITE_ZEROES);
        if writes && self.read_only {
            return Flow::Done(-libc::EROFS);
        }
        match op {
            UBLK_IO_OP_READ | UBLK_IO_OP_WRITE => {
                if req.bytes() > req.buf_len || req.bytes() == 0 {
                    return Flow::Done(-libc::EINVAL);
                }
                self.tags[usize::from(req.tag)].done = 0;
                self.push_rw(req, io);
                Flow::Pending
            }
            UBLK_IO_OP_FLUSH => {
                let sqe =
                    opcode::Fsync::new(req.file(0)).flags(types::FsyncFlags::DATASYNC).build();
                QueueStats::bump(&io.stats().backend_fsyncs, 1);
                // SAFETY: fsync references no memory.
                unsafe { io.push(req, sub::FLUSH, sqe) };
                Flow::Pending
            }
            UBLK_IO_OP_DISCARD if self.is_blkdev && self.no_blk_discard => {
                Flow::Done(-libc::EOPNOTSUPP)
            }
            UBLK_IO_OP_DISCARD if self.is_blkdev => {
                self.push_blk_discard(req, io);
                Flow::Pending
            }
            UBLK_IO_OP_DISCARD => {
                self.push_fallocate(req, sub::PUNCH, io);
                Flow::Pending
            }
            UBLK_IO_OP_WRITE_ZEROES => {
                // NOUNMAP: the range must stay allocated; otherwise a hole reads back zeros too.
                let which = if req.desc.flags() & UBLK_IO_F_NOUNMAP != 0 || self.is_blkdev {
                    sub::ZERO_RANGE
                } else {
                    sub::PUNCH
                };
                self.push_fallocate(req, which, io);
                Flow::Pending
            }
            _ => Flow::Done(-libc::EOPNOTSUPP),
        }
    }

    fn complete_data(&mut self, req: &Request, sub: u8, res: i32, io: &mut dyn Submit) -> Flow {
        match sub {
            sub::RW => {
                if res < 0 {
                    return Flow::Done(res);
                }
                if res == 0 {
                    // End of file inside the device: the backing store shrank under us.
                    return Flow::Done(-libc::EIO);
                }
                let tag = usize::from(req.tag);
                self.tags[tag].done += res as u32;
                if (self.tags[tag].done as usize) < req.bytes() {
                    self.push_rw(req, io);
                    return Flow::Pending;
                }
                Flow::Done(req.bytes() as i32)
            }
            // A kernel without the block command (before 6.12) says so on every try: stop.
            sub::BLK_DISCARD
                if matches!(-res, libc::EOPNOTSUPP | libc::ENOTTY | libc::EINVAL)
                    && !self.no_blk_discard =>
            {
                self.no_blk_discard = true;
                log::warn!(
                    "loop: this kernel has no BLOCK_URING_CMD_DISCARD (Linux 6.12+): discards on this queue fail with EOPNOTSUPP instead of blocking it"
                );
                Flow::Done(-libc::EOPNOTSUPP)
            }
            // Filesystems without ZERO_RANGE (tmpfs): a hole reads back as zeros as well.
            sub::ZERO_RANGE if res == -libc::EOPNOTSUPP && !self.is_blkdev => {
                self.push_fallocate(req, sub::PUNCH, io);
                Flow::Pending
            }
            _ => Flow::Done(res.min(0)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpfile(len: u64) -> PathBuf {
        let p = std::env::temp_dir().join(format!(
            "ublk-fast-loop-{}-{len}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let f = File::create(&p).unwrap();
        f.set_len(len).unwrap();
        p
    }

    fn buffered() -> LoopOptions {
        LoopOptions { buffered: true, discard: true, ..Default::default() }
    }

    #[test]
    fn ioctl_numbers() {
        // _IOR(0x12, 114, size_t), _IO(0x12, 104), _IO(0x12, 123), _IO(0x12, 119)
        assert_eq!(BLKGETSIZE64, (2 << 30) | (8 << 16) | (0x12 << 8) | 114);
        assert_eq!(BLKSSZGET, (0x12 << 8) | 104);
        assert_eq!(BLKPBSZGET, (0x12 << 8) | 123);
        assert_eq!(BLOCK_URING_CMD_DISCARD, 0x12 << 8);
    }

    #[test]
    fn rejects_bad_backing_stores() {
        let msg = |p: &Path, o: &LoopOptions| LoopTarget::open(p, o).err().unwrap().to_string();
        assert!(msg(Path::new("/nonexistent/x"), &buffered()).contains("no such file"));
        assert!(msg(&std::env::temp_dir(), &buffered()).contains("is a directory"));
        let empty = tmpfile(0);
        assert!(msg(&empty, &buffered()).contains("is empty"));
        let odd = tmpfile(4096 + 100);
        assert!(msg(&odd, &buffered()).contains("not a multiple"));
        let ok = tmpfile(1 << 20);
        let bad_bs = LoopOptions { block_size: Some(1000), ..buffered() };
        assert!(msg(&ok, &bad_bs).contains("--block-size 1000"));
        for p in [empty, odd, ok] {
            let _ = std::fs::remove_file(p);
        }
    }

    #[test]
    fn second_writer_is_refused_and_params_are_right() {
        let p = tmpfile(8 << 20);
        let t = LoopTarget::open(&p, &buffered()).unwrap();
        let e = LoopTarget::open(&p, &buffered()).err().unwrap().to_string();
        assert!(e.contains("already in use"), "{e}");
        let params = t.params();
        assert_eq!(params.size_bytes, 8 << 20);
        assert_eq!((params.logical_block, params.physical_block), (512, 4096));
        assert_ne!(params.attrs & UBLK_ATTR_VOLATILE_CACHE, 0);
        assert_ne!(params.attrs & UBLK_ATTR_FUA, 0);
        assert!(params.discard.is_some());
        drop(t);
        let ro = LoopTarget::open(&p, &LoopOptions { read_only: true, ..buffered() }).unwrap();
        assert_ne!(ro.params().attrs & UBLK_ATTR_READ_ONLY, 0);
        assert!(ro.params().discard.is_none());
        let _ = std::fs::remove_file(p);
    }
}
