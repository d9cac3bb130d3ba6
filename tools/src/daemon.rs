//! Creating a device and serving it: in the foreground until SIGINT/SIGTERM, or as a background
//! daemon whose parent returns once the device is LIVE (printing `/dev/ublkbN`) or failed.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::fd::FromRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ublk_fast_engine::ctrl::Control;
use ublk_fast_engine::device::{Device, DeviceConfig};
use ublk_fast_engine::target::Target;

use crate::metrics::DeviceMeta;
use crate::record::{self, Record};
use crate::CliError;

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        set
    }
}

/// Blocks the stop signals in this thread and every thread it spawns afterwards, so they are
/// only ever taken synchronously by `wait_signal` on the main thread.
fn block_signals() {
    let set = signal_set();
    // SAFETY: `set` is initialised; the old mask is not needed.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

fn wait_signal(timeout: Duration) -> Option<i32> {
    let set = signal_set();
    let ts = libc::timespec { tv_sec: 0, tv_nsec: timeout.as_nanos().min(999_999_999) as i64 };
    // SAFETY: `set` and `ts` are valid for the call; no siginfo is requested.
    let r = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) };
    (r > 0).then_some(r)
}

/// Messages from the daemon child to the waiting parent, one line each.
enum Report<'a> {
    Added(u32),
    /// The kernel granted less than was asked (printed by the waiting parent).
    Notice(&'a str),
    Live(u32),
    Failed(&'a str),
}

fn report(pipe: &mut Option<File>, r: Report) {
    if let Some(p) = pipe {
        let line = match r {
            Report::Added(id) => format!("ADDED {id}\n"),
            Report::Notice(m) => format!("NOTICE {}\n", m.replace('\n', " ")),
            Report::Live(id) => format!("LIVE {id}\n"),
            Report::Failed(m) => format!("FAILED {}\n", m.replace('\n', " ")),
        };
        let _ = p.write_all(line.as_bytes());
    }
}

/// Points stdin/stdout at /dev/null and stderr at the daemon log, so that nothing waiting on the
/// caller's terminal or pipe is held open by the daemon.
fn detach_stdio() {
    let log = record::run_dir().join("daemon.log");
    let _ = std::fs::create_dir_all(record::run_dir());
    // SAFETY: open/dup2/close on descriptors this process owns; paths are NUL-terminated.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            libc::dup2(null, 0);
            libc::dup2(null, 1);
            libc::dup2(null, 2);
            libc::close(null);
        }
        if let Ok(p) = std::ffi::CString::new(log.as_os_str().as_encoded_bytes()) {
            let fd = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND, 0o644);
            if fd >= 0 {
                libc::dup2(fd, 2);
                libc::close(fd);
            }
        }
    }
}

/// How the daemon gets its device.
#[derive(Clone, Copy, Debug)]
pub enum Start {
    Create,
    /// Take over this device, whose daemon died (`recover`).
    Recover(u32),
}

/// Everything a daemon needs.
pub struct Run {
    pub cfg: DeviceConfig,
    pub target: Arc<dyn Target>,
    pub metrics: Option<TcpListener>,
    pub start: Start,
    /// The creating command line, kept in the record for `recover`.
    pub argv: Vec<String>,
}

/// Creates (or takes over) the device and serves it until a stop signal (then removes it) or
/// until it is stopped from outside (then releases it).
fn serve(run: Run, mut pipe: Option<File>) -> Result<(), CliError> {
    let Run { cfg, target, metrics, start, argv } = run;
    let cfg = &cfg;
    block_signals();
    // Before any queue thread exists, so they all inherit the private namespace.
    if let Some(w) = crate::mountns::isolate() {
        eprintln!("ublk-fast: warning: {w}");
    }
    let dev = match start {
        Start::Create => {
            Device::create(cfg, Arc::clone(&target), &mut |id| report(&mut pipe, Report::Added(id)))
        }
        // Never report ADDED: a failed takeover must leave the device alone, not delete it.
        Start::Recover(id) => Device::recover(cfg, Arc::clone(&target), id),
    };
    let dev = match dev {
        Ok(d) => d,
        Err(e) => {
            let msg = e.to_string();
            report(&mut pipe, Report::Failed(&msg));
            return Err(CliError::runtime(msg));
        }
    };
    let id = dev.id();
    for n in &dev.notices {
        if pipe.is_some() {
            report(&mut pipe, Report::Notice(n));
        } else {
            eprintln!("ublk-fast: notice: {n}");
        }
    }
    let rec = Record {
        id,
        // SAFETY: getpid has no preconditions.
        pid: unsafe { libc::getpid() },
        target: target.name().to_string(),
        args: target.args(),
        queues: dev.info.nr_hw_queues,
        depth: dev.info.queue_depth,
        queue_cpus: dev.queue_cpus.clone(),
        queue_affinity: dev.queue_affinity.clone(),
        argv,
        setup: dev.setup.clone(),
    };
    if let Err(e) = rec.save() {
        eprintln!("ublk-fast: warning: cannot write {}: {e}", record::path(id).display());
    }
    if let (Some(l), Some(stats)) = (metrics, dev.stats.clone()) {
        let meta = DeviceMeta {
            device: format!("ublkb{id}"),
            target: target.name().to_string(),
            backing: target.backing().unwrap_or_default(),
            queues: dev.info.nr_hw_queues,
            depth: dev.info.queue_depth,
            zero_copy: if dev.mode.zero_copy() { "on" } else { "off" },
            stats,
        };
        crate::metrics::spawn(l, vec![meta]);
    }
    if pipe.is_some() {
        report(&mut pipe, Report::Live(id));
        detach_stdio();
        drop(pipe.take());
        // Into the daemon log.
        eprintln!(
            "ublk-fast: dev {id}: {} queues x depth {}, max I/O {} KiB: {}",
            dev.info.nr_hw_queues,
            dev.info.queue_depth,
            dev.info.max_io_buf_bytes >> 10,
            dev.setup
        );
    } else {
        println!("/dev/ublkb{id}");
        let _ = std::io::stdout().flush();
    }
    loop {
        if wait_signal(Duration::from_millis(100)).is_some() {
            let r = dev.remove();
            Record::remove(id);
            return r.map_err(|e| CliError::runtime(e.to_string()));
        }
        if dev.any_queue_ended() {
            // Stopped or deleted from outside (`ublk-fast del`): let go so DEL_DEV can finish.
            let mut dev = dev;
            let r = dev.release();
            // Quiesced (or crashed queues) with --recovery: the record is what `recover` needs.
            if r.is_err() || !dev.awaits_recovery() {
                Record::remove_if_owned(id, rec.pid);
            }
            return r.map_err(|e| CliError::runtime(e.to_string()));
        }
    }
}

pub fn run_foreground(run: Run) -> Result<(), CliError> {
    serve(run, None)
}

/// Forks a daemon that creates and serves the device; returns once it is LIVE or failed.
pub fn run_background(run: Run) -> Result<(), CliError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(CliError::runtime(format!("pipe: {}", std::io::Error::last_os_error())));
    }
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: the process is single-threaded here (no queue thread exists yet), so the child
    // may run arbitrary code after fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(CliError::runtime(format!("fork: {}", std::io::Error::last_os_error())));
    }
    if pid == 0 {
        // SAFETY: closing our copy of the read end; the write end becomes the child's File.
        let pipe = unsafe {
            libc::close(fds[0]);
            libc::setsid();
            File::from_raw_fd(fds[1])
        };
        let code = match serve(run, Some(pipe)) {
            Ok(()) => 0,
            Err(e) => e.code,
        };
        std::process::exit(code);
    }
    // SAFETY: closing the parent's copy of the write end; the read end becomes our File.
    let rd = unsafe {
        libc::close(fds[1]);
        File::from_raw_fd(fds[0])
    };
    drop(run);
    let (mut added, mut live, mut failed) = (None, None, None);
    for line in BufReader::new(rd).lines().map_while(Result::ok) {
        match line.split_once(' ') {
            Some(("ADDED", id)) => added = id.parse::<u32>().ok(),
            Some(("NOTICE", m)) => eprintln!("ublk-fast: notice: {m}"),
            Some(("LIVE", id)) => live = id.parse::<u32>().ok(),
            Some(("FAILED", m)) => failed = Some(m.to_string()),
            _ => {}
        }
    }
    if let Some(id) = live {
        let path = format!("/dev/ublkb{id}");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !Path::new(&path).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        println!("{path}");
        return Ok(());
    }
    // The child cleans up after itself when it fails; if it died instead, remove its device.
    let mut status = 0;
    // SAFETY: waiting for our own child; status is a local.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    if let (None, Some(id)) = (&failed, added) {
        if let Ok(mut c) = Control::open() {
            let _ = c.stop_dev(id);
            let _ = c.del_dev(id);
        }
        Record::remove(id);
    }
    Err(CliError::runtime(failed.unwrap_or_else(|| {
        format!("the daemon died while creating the device (wait status {status:#x})")
    })))
}
