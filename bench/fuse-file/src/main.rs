//! fuse-file: a benchmark baseline. One FUSE filesystem holding one regular file, `disk`,
//! whose reads and writes go straight to a backing file opened with O_DIRECT (positional
//! I/O from 4096-aligned buffers). Files are opened with FOPEN_DIRECT_IO, so the kernel's
//! page cache is bypassed on the FUSE side too. Several threads serve the connection, each
//! with its own /dev/fuse fd (FUSE_DEV_IOC_CLONE, fuser's `clone_fd`).
//!
//!   fuse-file --backing FILE --mountpoint DIR [--threads N]
//!
//! Runs in the foreground until SIGINT or SIGTERM, then unmounts (or until unmounted). Requests whose offset or
//! length is not a multiple of 4096 cannot use O_DIRECT portably; they are served through a
//! second, buffered descriptor of the same file and counted (reported at exit).

use std::cell::RefCell;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request, Session, SessionACL,
    WriteFlags,
};

/// Alignment of buffers, offsets and lengths for O_DIRECT.
const ALIGN: usize = 4096;
const DISK_INO: INodeNo = INodeNo(2);
const DISK_NAME: &str = "disk";
const TTL: Duration = Duration::from_secs(60);
/// Background requests the kernel may have in flight (async direct I/O from the loop driver
/// is background work); fuser's default is 16, which would cap the queue depth.
const MAX_BACKGROUND: u16 = 256;

struct FuseFile {
    /// The backing file, O_DIRECT.
    direct: File,
    /// The same file without O_DIRECT, for requests that are not aligned.
    buffered: File,
    /// Requests served through `buffered`.
    unaligned: Arc<AtomicU64>,
    uid: u32,
    gid: u32,
}

thread_local! {
    /// Each serving thread's I/O buffer: over-allocated by ALIGN so that an aligned window
    /// of any requested length fits.
    static BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on a 4096-aligned, zero-initialised-once slice of `len` bytes of this thread's
/// buffer.
fn with_aligned<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    BUF.with(|b| {
        let mut b = b.borrow_mut();
        if b.len() < len + ALIGN {
            b.resize(len + ALIGN, 0);
        }
        let off = b.as_ptr().align_offset(ALIGN);
        f(&mut b[off..off + len])
    })
}

fn aligned(offset: u64, len: usize) -> bool {
    offset % ALIGN as u64 == 0 && len % ALIGN == 0
}

impl FuseFile {
    fn attr(&self, ino: INodeNo) -> io::Result<FileAttr> {
        let (kind, perm, nlink, size, blocks, mtime) = if ino == DISK_INO {
            let m = self.direct.metadata()?;
            let mtime = m.modified().unwrap_or(UNIX_EPOCH);
            (FileType::RegularFile, 0o600, 1, m.len(), m.blocks(), mtime)
        } else {
            (FileType::Directory, 0o755, 2, 0, 0, UNIX_EPOCH)
        };
        Ok(FileAttr {
            ino,
            size,
            blocks,
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: ALIGN as u32,
            flags: 0,
        })
    }

    /// The descriptor for an I/O at `offset` of `len` bytes: O_DIRECT when aligned.
    fn file_for(&self, offset: u64, len: usize) -> &File {
        if aligned(offset, len) {
            &self.direct
        } else {
            self.unaligned.fetch_add(1, Ordering::Relaxed);
            &self.buffered
        }
    }
}

/// Reads into `buf` until it is full or the file ends; returns the bytes read.
fn read_full(f: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

impl Filesystem for FuseFile {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Let the kernel send direct I/O from async submitters (the loop driver) as several
        // requests in flight at once instead of one at a time.
        if config.add_capabilities(InitFlags::FUSE_ASYNC_DIO).is_err() {
            eprintln!("fuse-file: the kernel does not offer FUSE_ASYNC_DIO");
        }
        let _ = config.set_max_background(MAX_BACKGROUND);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent != INodeNo::ROOT || name != DISK_NAME {
            return reply.error(Errno::ENOENT);
        }
        match self.attr(DISK_INO) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e.into()),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino != INodeNo::ROOT && ino != DISK_INO {
            return reply.error(Errno::ENOENT);
        }
        match self.attr(ino) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e.into()),
        }
    }

    /// Only no-op changes succeed (the file's size is the backing file's, fixed).
    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let a = match self.attr(ino) {
            Ok(a) => a,
            Err(e) => return reply.error(e.into()),
        };
        if mode.is_some() || uid.is_some() || gid.is_some() || size.is_some_and(|s| s != a.size) {
            return reply.error(Errno::EPERM);
        }
        reply.attr(&TTL, &a);
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino != DISK_INO {
            return reply.error(Errno::EISDIR);
        }
        reply.opened(
            FileHandle(0),
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
        );
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let len = size as usize;
        let f = self.file_for(offset, len);
        with_aligned(len, |buf| match read_full(f, buf, offset) {
            Ok(n) => reply.data(&buf[..n]),
            Err(e) => reply.error(e.into()),
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let f = self.file_for(offset, data.len());
        // `data` sits in fuser's request buffer behind the headers, not aligned: copy it.
        let res = with_aligned(data.len(), |buf| {
            buf.copy_from_slice(data);
            f.write_all_at(buf, offset)
        });
        match res {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e.into()),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        // The buffered descriptor may hold dirty pages; syncing either descriptor syncs the
        // file (the page cache is per file, not per descriptor).
        let res = if datasync { self.direct.sync_data() } else { self.direct.sync_all() };
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e.into()),
        }
    }

    /// Passed through, so that the loop driver's discards and write-zeroes reach the file.
    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let (Ok(off), Ok(len)) = (i64::try_from(offset), i64::try_from(length)) else {
            return reply.error(Errno::EINVAL);
        };
        // SAFETY: fallocate takes no pointers; the fd is owned by `self.direct` and open.
        let r = unsafe { libc::fallocate(self.direct.as_raw_fd(), mode, off, len) };
        if r == 0 {
            reply.ok();
        } else {
            reply.error(io::Error::last_os_error().into());
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (INodeNo::ROOT, FileType::Directory, "."),
            (INodeNo::ROOT, FileType::Directory, ".."),
            (DISK_INO, FileType::RegularFile, DISK_NAME),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

struct Args {
    backing: PathBuf,
    mountpoint: PathBuf,
    threads: usize,
}

const USAGE: &str = "usage: fuse-file --backing FILE --mountpoint DIR [--threads N]";

fn parse_args() -> Result<Args, String> {
    let mut backing = None;
    let mut mountpoint = None;
    let mut threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut it = std::env::args_os().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or(format!("{} needs a value", a.to_string_lossy()));
        match a.to_str() {
            Some("--backing") => backing = Some(PathBuf::from(value()?)),
            Some("--mountpoint") => mountpoint = Some(PathBuf::from(value()?)),
            Some("--threads") => {
                threads = value()?
                    .to_str()
                    .and_then(|s| s.parse().ok())
                    .filter(|&n| n > 0)
                    .ok_or("--threads needs a positive number")?
            }
            Some("-h" | "--help") => return Err(USAGE.into()),
            _ => return Err(format!("unknown argument {}", a.to_string_lossy())),
        }
    }
    Ok(Args {
        backing: backing.ok_or("--backing is required")?,
        mountpoint: mountpoint.ok_or("--mountpoint is required")?,
        threads,
    })
}

/// SIGINT and SIGTERM, blocked in the calling thread (and so in every thread it starts
/// afterwards) so that `wait_for_signal` receives them.
fn block_signals() -> io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before any other use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable sigset_t for all three calls.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
    }
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(set)
}

fn wait_for_signal(set: &libc::sigset_t) -> io::Result<i32> {
    let mut sig = 0;
    // SAFETY: `set` is an initialised sigset_t and `sig` a valid int to write to.
    let r = unsafe { libc::sigwait(set, &mut sig) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(sig)
}

fn run(args: Args) -> io::Result<()> {
    let open = |flags| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(flags)
            .open(&args.backing)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", args.backing.display())))
    };
    let direct = open(libc::O_DIRECT)?;
    let buffered = open(0)?;
    let unaligned = Arc::new(AtomicU64::new(0));
    // SAFETY: getuid and getgid cannot fail and touch no memory.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let fs = FuseFile { direct, buffered, unaligned: unaligned.clone(), uid, gid };

    let set = block_signals()?;
    let mut config = Config::default();
    config.mount_options =
        vec![MountOption::FSName("fuse-file".into()), MountOption::Subtype("fuse-file".into())];
    config.acl = SessionACL::Owner;
    config.n_threads = Some(args.threads);
    config.clone_fd = true;
    // Mounts and completes the INIT handshake; the file is usable once the session runs.
    let mut session = Session::new(fs, &args.mountpoint, &config).map_err(|e| {
        io::Error::new(e.kind(), format!("mount on {}: {e}", args.mountpoint.display()))
    })?;
    let mut unmounter = session.unmount_callable();
    let ended = Arc::new(AtomicBool::new(false));
    let server = {
        let ended = ended.clone();
        thread::Builder::new().name("fuse-session".into()).spawn(move || {
            let res = session.run();
            // Unmounted from outside, or failed: wake the main thread so that the process ends.
            ended.store(true, Ordering::SeqCst);
            // SAFETY: kill with our own pid and a valid signal number touches no memory.
            unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
            res
        })?
    };
    eprintln!(
        "fuse-file: serving {} as {} with {} threads",
        args.backing.display(),
        args.mountpoint.join(DISK_NAME).display(),
        args.threads
    );
    let sig = wait_for_signal(&set)?;
    let res = if ended.load(Ordering::SeqCst) {
        eprintln!("fuse-file: the session ended (unmounted from outside?)");
        Ok(())
    } else {
        eprintln!("fuse-file: signal {sig}, unmounting");
        unmounter.unmount().map_err(|e| io::Error::new(e.kind(), format!("unmount: {e}")))
    };
    // If unmounting failed (busy: a loop device still holds the file), return without joining;
    // the kernel aborts the connection once the process's /dev/fuse descriptors close.
    let res = res.and_then(|()| {
        server.join().map_err(|_| io::Error::other("the session thread panicked")).and_then(|r| r)
    });
    let n = unaligned.load(Ordering::Relaxed);
    if n > 0 {
        eprintln!(
            "fuse-file: {n} requests were not {ALIGN}-aligned and went through the page cache"
        );
    }
    res
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("fuse-file: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fuse-file: {e}");
            ExitCode::FAILURE
        }
    }
}
