//! `ublk-fast serve`: the node service. One process serves every device of the host: one
//! pinned core thread and ring per CPU of `--cpus` (the engine's `CorePool`), plus the main
//! thread (signals, devices that went away on their own), the control socket's thread and,
//! with `--metrics`, the exporter's thread, whatever the number of devices.
//!
//! Device commands (`ublk-fast TARGET`, `del`, `quiesce`, `recover`, `shutdown`) reach it over
//! `/run/ublk-fast/control.sock` (`proto`). A service started by a device command (not by
//! `serve`) exits once it serves no device; one started by `serve` stays.
//!
//! Crash and upgrade: every device has a record (`record`). A new service takes over every
//! recorded `--recovery` device the last one left (QUIESCED or FAIL_IO) and deletes the others
//! it left behind. SIGTERM deletes devices without `--recovery` (after the driver drained their
//! I/O) and quiesces the `--recovery` ones for the next service; SIGHUP deletes nothing.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use ublk_fast_engine::core::CorePool;
use ublk_fast_engine::ctrl::{list_dev_ids, Control};
use ublk_fast_engine::device::{Device, Unremoved};
use ublk_fast_engine::ring::SqPoll;
use ublk_fast_engine::target::Target;
use ublk_fast_engine::uapi::*;

use crate::cli::{Cli, Command};
use crate::metrics::{DeviceMeta, Exporter};
use crate::proto::{self, Op, Request, Response, Status};
use crate::record::{self, Record};
use crate::{admin, build, CliError};

/// What `serve` was started with.
#[derive(Clone, Debug)]
pub struct ServeOpts {
    pub cpus: Vec<usize>,
    pub metrics: Option<String>,
    pub sqpoll: Option<u32>,
    pub sqpoll_cpu: Option<u32>,
    /// Started by a device command: exit once no device is served.
    pub exit_when_idle: bool,
    /// Written to /proc/self/oom_score_adj at start.
    pub oom_score_adj: i32,
}

/// The OOM killer should pick almost anything before the process serving every device.
pub const DEFAULT_OOM_SCORE_ADJ: i32 = -900;

/// How long an idle auto-started service waits for its first device before it exits.
const IDLE_GRACE: Duration = Duration::from_secs(30);
/// How long a new service waits for an exiting one to let go of the lock.
const LOCK_WAIT: Duration = Duration::from_secs(15);
/// How long QUIESCE_DEV may wait for a device's I/O at SIGTERM.
const SHUTDOWN_QUIESCE_MS: u64 = 30_000;
pub fn socket_path() -> PathBuf {
    record::run_dir().join("control.sock")
}

fn lock_path() -> PathBuf {
    record::run_dir().join("service.lock")
}

fn log(msg: impl AsRef<str>) {
    log::info!("{}", msg.as_ref());
}

fn warn(msg: impl AsRef<str>) {
    log::warn!("{}", msg.as_ref());
}

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

/// Blocks the signals the service takes in this thread and every thread it spawns afterwards,
/// so they are only ever taken synchronously by `wait_signal` on the main thread.
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

/// Tells systemd (Type=notify) the service is ready, where it asked to be told.
fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let Ok(sock) = UnixDatagram::unbound() else { return };
    let bytes = path.as_encoded_bytes();
    let r = if let Some(name) = bytes.strip_prefix(b"@") {
        // An abstract socket address.
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
    } else {
        sock.send_to(state.as_bytes(), Path::new(&path))
    };
    if let Err(e) = r {
        warn(format!("cannot notify systemd: {e}"));
    }
}

/// The pid written in the lock file by the service holding it.
pub fn lock_holder() -> Option<i32> {
    std::fs::read_to_string(lock_path()).ok()?.trim().parse().ok()
}

/// Takes the one-service-per-host lock, waiting for an exiting service to let go of it; a
/// service that still answers on its socket is running, and the caller is told its pid.
fn take_lock() -> Result<File, CliError> {
    let dir = record::run_dir();
    std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)))
        .map_err(|e| CliError::runtime(format!("{}: {e}", dir.display())))?;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(lock_path())
        .map_err(|e| CliError::runtime(format!("{}: {e}", lock_path().display())))?;
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            let me = std::process::id();
            f.set_len(0)
                .and_then(|()| (&f).write_all(format!("{me}\n").as_bytes()))
                .map_err(|e| CliError::runtime(format!("{}: {e}", lock_path().display())))?;
            return Ok(f);
        }
        let pid = lock_holder().unwrap_or(-1);
        if UnixStream::connect(socket_path()).is_ok() || Instant::now() > deadline {
            return Err(CliError::runtime(format!(
                "a ublk-fast service already runs (pid {pid}): add devices to it, or stop it with `ublk-fast shutdown`"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One served device.
struct Served {
    dev: Device,
    target: Arc<dyn Target>,
    rec: Record,
}

/// The service's state, shared by the main thread and the control thread (control path only:
/// no I/O ever waits on it).
struct Node {
    pool: CorePool,
    devices: BTreeMap<u32, Served>,
    /// Deleted devices whose STOP_DEV outlived its wait, until their queues leave (reap).
    stopping: BTreeMap<u32, Box<Device>>,
    exporter: Option<Arc<Exporter>>,
    opts: ServeOpts,
    /// When the last device went (for an auto-started service's grace period).
    idle_since: Instant,
}

/// Why the service ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ending {
    /// SIGTERM/SIGINT: delete plain devices, hand `--recovery` ones over.
    Signal,
    /// `ublk-fast shutdown`: delete every device.
    Shutdown,
    /// No device left to serve (auto-started service).
    Idle,
}

impl Node {
    fn status(&self) -> Status {
        let threads = std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count());
        Status {
            pid: std::process::id() as i32,
            cpus: self.opts.cpus.clone(),
            metrics: self.opts.metrics.clone(),
            sqpoll: self.opts.sqpoll,
            sqpoll_cpu: self.opts.sqpoll_cpu,
            devices: self.devices.keys().copied().collect(),
            threads,
        }
    }

    fn idle(&self) -> bool {
        self.opts.exit_when_idle && self.devices.is_empty() && self.stopping.is_empty()
    }

    fn publish(&self) {
        if let Some(x) = &self.exporter {
            x.set(self.devices.values().map(meta).collect());
        }
    }

    /// Creates a device from its command line, with the backing files the caller opened (a
    /// path of the caller's mount namespace may not be one of the service's).
    fn add(
        &mut self,
        argv: Vec<String>,
        cwd: &Path,
        files: Vec<std::fs::File>,
    ) -> Result<Response, CliError> {
        let (opts, target_cmd) = parse_device_argv(&argv).map_err(CliError::usage)?;
        let cfg = build::device_config(&opts, &self.opts.cpus)?;
        let target = build::target_with(&target_cmd, cwd, files, opts.zero_copy_on())?;
        // The record is written as soon as the kernel knows the device (not once it serves):
        // a crash in between then leaves a device the next service finds and deals with
        // (takes over with --recovery, deletes without), never an unrecorded one.
        let mut recorded = None;
        let created = Device::create(&cfg, Arc::clone(&target), &self.pool, &mut |id| {
            let rec = Record {
                queues: cfg.queues,
                depth: cfg.depth,
                setup: "being created".into(),
                ..record_of(id, target.as_ref(), argv.clone(), cwd)
            };
            if let Err(e) = rec.save() {
                warn(format!("cannot write {}: {e}", record::path(id).display()));
            }
            recorded = Some(id);
            if std::env::var_os("UBLK_FAST_TEST_CRASH_AFTER_ADD").is_some() {
                // Test hook: a crash between ADD_DEV and the device serving.
                std::process::abort();
            }
        });
        let dev = match created {
            Ok(d) => d,
            Err(e) => {
                // Nothing is left of the device: nor of its record.
                if let Some(id) = recorded {
                    Record::remove(id);
                }
                return Err(CliError::runtime(e.to_string()));
            }
        };
        let id = dev.id();
        let notices = dev.notices.clone();
        self.serve(dev, target, argv, cwd);
        Ok(Response { id: Some(id), notices, ..Response::ok() })
    }

    /// Records and publishes a device that now serves.
    fn serve(&mut self, dev: Device, target: Arc<dyn Target>, argv: Vec<String>, cwd: &Path) {
        let id = dev.id();
        let rec = Record {
            queues: dev.info.nr_hw_queues,
            depth: dev.info.queue_depth,
            queue_cpus: dev.queue_cpus.clone(),
            tag_cpus: dev.tag_cpus.clone(),
            queue_affinity: dev.queue_affinity.clone(),
            setup: dev.setup.clone(),
            ..record_of(id, target.as_ref(), argv, cwd)
        };
        if let Err(e) = rec.save() {
            warn(format!("cannot write {}: {e}", record::path(id).display()));
        }
        let spread = dev.tag_cpus.iter().any(|c| c.len() > 1);
        log(format!(
            "dev {id}: {} queues x depth {}, max I/O {} KiB, on CPUs {}{}: {}",
            dev.info.nr_hw_queues,
            dev.info.queue_depth,
            dev.info.max_io_buf_bytes >> 10,
            build::list_str(&dev.queue_cpus),
            if spread {
                format!(" (tags spread over CPUs {})", build::list_str(&dev.tag_cpus.concat()))
            } else {
                String::new()
            },
            dev.setup
        ));
        self.devices.insert(id, Served { dev, target, rec });
        self.publish();
    }

    /// Stops and deletes one device (any ublk device: one this service does not serve is
    /// stopped and deleted directly).
    fn del(&mut self, id: u32) -> Result<(), CliError> {
        match self.devices.remove(&id) {
            Some(s) => {
                self.publish();
                self.went();
                match s.dev.remove(&self.pool) {
                    Ok(()) => {
                        Record::remove(id);
                        log(format!("dev {id}: deleted"));
                        Ok(())
                    }
                    Err(Unremoved { error, stopping: Some(dev) }) => {
                        // Its record stays until the late stop ends (reap).
                        self.stopping.insert(id, dev);
                        Err(CliError::runtime(format!(
                            "{error}; the device is deleted once its I/O completes"
                        )))
                    }
                    Err(Unremoved { error, stopping: None }) => {
                        Record::remove(id);
                        warn(format!("dev {id}: deleted, with an error: {error}"));
                        Err(CliError::runtime(error.to_string()))
                    }
                }
            }
            None => admin::del_one(&mut Control::open()?, id),
        }
    }

    /// `del --safe`: only if nobody has the device open; otherwise nothing changes.
    fn del_if_unused(&mut self, id: u32) -> Result<(), CliError> {
        let Some(s) = self.devices.remove(&id) else {
            return Err(CliError::runtime(format!(
                "device {id} is not served by this service: `del --safe` needs its server"
            )));
        };
        let Served { dev, target, rec } = s;
        match dev.remove_if_unused(&self.pool) {
            Ok(()) => {
                Record::remove(id);
                self.publish();
                self.went();
                log(format!("dev {id}: deleted (it was not open)"));
                Ok(())
            }
            Err(b) => {
                let (dev, e) = *b;
                self.devices.insert(id, Served { dev, target, rec });
                Err(match e.raw_errno() {
                    libc::EBUSY => CliError::runtime(format!(
                        "device {id} is open (a mounted filesystem or a program holds /dev/ublkb{id}): not deleted; close it, or leave out --safe"
                    )),
                    _ => CliError::runtime(e.to_string()),
                })
            }
        }
    }

    /// `resize`: the target must be able to hold the new size; then the kernel's capacity.
    fn resize(&mut self, id: u32, bytes: u64) -> Result<(), CliError> {
        let Some(s) = self.devices.get_mut(&id) else {
            return Err(CliError::runtime(format!("device {id} is not served by this service")));
        };
        let bs = s.target.params().logical_block as u64;
        if bytes == 0 || !bytes.is_multiple_of(bs) {
            return Err(CliError::usage(format!(
                "resize: {bytes} bytes is not a non-zero multiple of the device's {bs}-byte blocks"
            )));
        }
        s.target.check_resize(bytes).map_err(|e| CliError::runtime(format!("resize: {e}")))?;
        s.dev.resize(bytes).map_err(|e| CliError::runtime(e.to_string()))?;
        log(format!("dev {id}: resized to {bytes} bytes"));
        Ok(())
    }

    fn went(&mut self) {
        if self.devices.is_empty() {
            self.idle_since = Instant::now();
        }
    }

    fn quiesce(&mut self, id: u32, timeout_ms: u64) -> Result<(), CliError> {
        if !(1..=crate::cli::QUIESCE_MAX_MS).contains(&timeout_ms) {
            // 0 would let the kernel wait forever; longer than the client waits for an answer.
            return Err(CliError::usage(format!(
                "quiesce: timeout_ms {timeout_ms} is out of range: give 1 to {}",
                crate::cli::QUIESCE_MAX_MS
            )));
        }
        let Some(s) = self.devices.get_mut(&id) else {
            let mut c = Control::open()?;
            admin::dev_info(&mut c, id)?;
            return Err(CliError::runtime(format!(
                "device {id} is not served by this service (pid {})",
                std::process::id()
            )));
        };
        let flags = s.dev.info.flags;
        if flags & UBLK_F_QUIESCE == 0 {
            return Err(CliError::runtime(format!(
                "device {id} cannot be quiesced: create it with --recovery (on a driver offering QUIESCE)"
            )));
        }
        if flags & UBLK_F_BATCH_IO != 0 {
            // The driver does not wait for a batch device's in-flight I/O on QUIESCE_DEV (its
            // idle wait returns at once for BATCH_IO): in our tests some writes in flight then
            // failed with EIO. A crash hand-over loses nothing with --recovery=reissue.
            return Err(CliError::runtime(format!(
                "device {id} uses --batch-io, whose in-flight I/O this driver does not drain on quiesce: \
                 to hand it over, kill -9 {} (the service) and run `ublk-fast recover -n {id}` \
                 (with --recovery=reissue nothing is lost)",
                std::process::id()
            )));
        }
        s.dev.quiesce(&self.pool, timeout_ms).map_err(|e| match e.raw_errno() {
            libc::EBUSY => CliError::runtime(format!(
                "device {id}: I/O did not drain within {timeout_ms} ms; nothing changed, try again"
            )),
            _ => CliError::runtime(e.to_string()),
        })?;
        // Its record stays: `recover` (here, or in the next service) takes it back.
        self.devices.remove(&id);
        self.publish();
        self.went();
        log(format!("dev {id}: quiesced, waiting for `ublk-fast recover -n {id}`"));
        Ok(())
    }

    /// Takes device `id` over from its record.
    /// (A device this service already serves is a success: the service took every recorded
    /// device over when it started; the CLI refuses a LIVE device before asking.)
    fn recover(&mut self, id: u32) -> Result<Response, CliError> {
        if self.devices.contains_key(&id) {
            return Ok(Response { id: Some(id), ..Response::ok() });
        }
        let mut c = Control::open()?;
        let info = admin::dev_info(&mut c, id)?;
        if info.state == UBLK_S_DEV_LIVE && admin::process_alive(info.ublksrv_pid) {
            return Err(CliError::runtime(format!(
                "device {id} is LIVE: process {} still serves it (to hand it over, run `ublk-fast quiesce -n {id}` in its service first)",
                info.ublksrv_pid
            )));
        }
        let path = record::path(id);
        let rec = Record::load(id).ok_or_else(|| {
            CliError::runtime(format!(
                "device {id}: no usable record at {} (missing or corrupt): it cannot be recovered",
                path.display()
            ))
        })?;
        let bad = |m: String| CliError::runtime(format!("device {id}: {}: {m}", path.display()));
        if !record::owned_by_us(id) {
            return Err(bad("not a file of this service's user: it is not trusted".into()));
        }
        if let (Some(was), false) = (rec.backing_id, rec.backing.is_empty()) {
            let now = record::BackingId::of(&rec.backing);
            if now.as_ref().ok() != Some(&was) {
                return Err(bad(format!(
                    "its backing store {} is no longer the one it was created on ({}): not taken over",
                    rec.backing,
                    match now {
                        Ok(n) if (n.dev, n.ino) != (was.dev, was.ino) => "another file".to_string(),
                        Ok(n) => format!("size {} instead of {}", n.size, was.size),
                        Err(e) => e.to_string(),
                    }
                )));
            }
        }
        let (opts, target_cmd) = parse_device_argv(&rec.argv).map_err(bad)?;
        // The device's --cpus may not all be this service's: then it takes all of them.
        let cfg = build::device_config(&opts, &self.opts.cpus).or_else(|e| {
            log(format!("dev {id}: {}: serving it on every CPU of the service", e.msg));
            let any = crate::cli::AddOpts { cpus: None, ..opts.clone() };
            build::device_config(&any, &self.opts.cpus).map_err(|e| bad(e.msg))
        })?;
        let cwd = PathBuf::from(&rec.cwd);
        let target =
            build::target(&target_cmd, &cwd, opts.zero_copy_on()).map_err(|e| bad(e.msg))?;
        let dev = Device::recover(&cfg, Arc::clone(&target), id, &self.pool)
            .map_err(|e| CliError::runtime(e.to_string()))?;
        self.serve(dev, target, rec.argv, &cwd);
        Ok(Response { id: Some(id), ..Response::ok() })
    }

    /// At start: takes over every recorded `--recovery` device the last service left, and
    /// deletes the devices without it that it left behind (their I/O has nobody to serve it).
    fn take_over_records(&mut self) {
        let Ok(mut c) = Control::open() else { return };
        let live: Vec<u32> = list_dev_ids();
        for id in record::recorded_ids() {
            let Some(rec) = Record::load(id) else {
                log(format!("record {}: unreadable, left alone", record::path(id).display()));
                continue;
            };
            if !live.contains(&id) {
                Record::remove(id);
                continue;
            }
            let Ok(info) = c.dev_info(id) else { continue };
            if rec.pid == std::process::id() as i32 || admin::process_alive(info.ublksrv_pid) {
                continue;
            }
            if info.state == UBLK_S_DEV_DEAD && !admin::process_alive(rec.pid) {
                // Its service died while creating it: it never served, nobody has its data.
                log(format!(
                    "dev {id}: its service (pid {}) died while creating it: deleting it",
                    rec.pid
                ));
                let _ = admin::del_one(&mut c, id);
                Record::remove(id);
                continue;
            }
            if info.flags & UBLK_F_USER_RECOVERY != 0 {
                match self.recover(id) {
                    Ok(_) => log(format!("dev {id}: taken over from the previous service")),
                    Err(e) => warn(format!("dev {id}: cannot take it over: {}", e.msg)),
                }
            } else {
                log(format!(
                    "dev {id}: its service (pid {}) died and it has no --recovery: deleting it",
                    rec.pid
                ));
                let _ = admin::del_one(&mut c, id);
            }
        }
    }

    /// Devices whose queues left their cores on their own: stopped or deleted from outside,
    /// or a queue failed. Their end of `/dev/ublkcN` closes so the driver can finish.
    fn reap(&mut self) {
        let gone = self.pool.departures().take_all();
        if gone.is_empty() {
            return;
        }
        let mut ids: Vec<u32> = gone.iter().map(|g| g.dev_id).collect();
        ids.sort_unstable();
        ids.dedup();
        for id in ids {
            if let Some(dev) = self.stopping.remove(&id) {
                match dev.finish_stop() {
                    Ok(()) => log(format!("dev {id}: its late stop ended: deleted")),
                    Err(e) => warn(format!("dev {id}: its late stop ended; deleting it: {e}")),
                }
                Record::remove(id);
                continue;
            }
            let failed = gone.iter().find(|g| g.dev_id == id).and_then(|g| g.error.clone());
            let Some(mut s) = self.devices.remove(&id) else { continue };
            match &failed {
                Some(why) => warn(format!("dev {id}: failed ({why}): deleting it")),
                None => log(format!("dev {id}: stopped from outside the service")),
            }
            s.dev.release(failed.is_some());
            if failed.is_some() || !s.dev.awaits_recovery() {
                Record::remove_if_owned(id, s.rec.pid);
            }
        }
        self.publish();
        self.went();
    }

    /// The service ends: devices go as `why` says, then the cores.
    fn end(&mut self, why: Ending) {
        let ids: Vec<u32> = self.devices.keys().copied().collect();
        for id in ids {
            let Some(mut s) = self.devices.remove(&id) else { continue };
            let flags = s.dev.info.flags;
            let keep = why == Ending::Signal && flags & UBLK_F_USER_RECOVERY != 0;
            if !keep {
                if let Err(u) = s.dev.remove(&self.pool) {
                    log(format!("dev {id}: {}", u.error));
                    // Still stopping: the kernel ends it when this process's rings close.
                    std::mem::forget(u.stopping);
                }
                Record::remove(id);
                log(format!("dev {id}: deleted"));
                continue;
            }
            if flags & UBLK_F_BATCH_IO != 0 || flags & UBLK_F_QUIESCE == 0 {
                // The driver cannot quiesce it: it is handed over the way a crash would (the
                // rings close with the process), with its I/O reissued or requeued.
                log(format!("dev {id}: left for the next service (as after a crash)"));
                std::mem::forget(s.dev);
                continue;
            }
            match s.dev.quiesce(&self.pool, SHUTDOWN_QUIESCE_MS) {
                Ok(()) => log(format!("dev {id}: quiesced for the next service")),
                Err(e) => log(format!("dev {id}: quiesce: {e}; left as after a crash")),
            }
        }
        self.publish();
        self.pool.shutdown();
    }
}

/// What this service records of device `id` served by `target`, before its geometry is known.
fn record_of(id: u32, target: &dyn Target, argv: Vec<String>, cwd: &Path) -> Record {
    Record {
        id,
        pid: std::process::id() as i32,
        target: target.name().to_string(),
        args: target.args(),
        backing: target.backing().unwrap_or_default(),
        queues: 0,
        depth: 0,
        queue_cpus: Vec::new(),
        tag_cpus: Vec::new(),
        queue_affinity: Vec::new(),
        argv,
        cwd: cwd.to_string_lossy().into_owned(),
        setup: String::new(),
        backing_id: target.backing().and_then(|p| record::BackingId::of(&p).ok()),
    }
}

/// The device options and target of a device command line (without the program name).
fn parse_device_argv(
    argv: &[String],
) -> Result<(crate::cli::AddOpts, crate::cli::TargetCmd), String> {
    let cli =
        Cli::try_parse_from(std::iter::once("ublk-fast".to_string()).chain(argv.iter().cloned()))
            .map_err(|e| crate::one_line(&e))?;
    match cli.cmd {
        Command::Target(t) => Ok((crate::creation_opts(cli.add, None, &t)?, t)),
        Command::Add { opts, target } => {
            Ok((crate::creation_opts(cli.add, Some(opts), &target)?, target))
        }
        _ => Err("the command line names no target".into()),
    }
}

fn meta(s: &Served) -> DeviceMeta {
    DeviceMeta {
        id: s.dev.id(),
        target: s.rec.target.clone(),
        backing: s.rec.backing.clone(),
        queues: s.dev.info.nr_hw_queues,
        depth: s.dev.info.queue_depth,
        zero_copy: if s.dev.mode.zero_copy() { "on" } else { "off" },
        cpus: s.dev.queue_cpus.clone(),
        stats: s.dev.stats.clone().expect("a served device publishes counters"),
    }
}

/// Answers one request (`files`: the descriptors it carried, for an add).
fn handle(
    node: &Mutex<Node>,
    req: Request,
    files: Vec<std::fs::File>,
) -> (Response, Option<Ending>) {
    let mut n = node.lock().unwrap_or_else(|e| e.into_inner());
    let fail = |e: CliError| Response::err(e.msg, e.code);
    // Only a request about devices can leave an auto-started service with none to serve.
    let about_devices = !matches!(req.op, Op::Status {});
    let resp = match req.op {
        Op::Add { argv, cwd } => n.add(argv, Path::new(&cwd), files).unwrap_or_else(fail),
        Op::Del { id: Some(id), all: false, safe: true, .. } => {
            n.del_if_unused(id).map(|()| Response::ok()).unwrap_or_else(fail)
        }
        Op::Del { id: Some(id), all: false, safe: false, .. } => {
            n.del(id).map(|()| Response::ok()).unwrap_or_else(fail)
        }
        Op::Del { id: None, all: true, safe: false, all_servers } => {
            let mut first = None;
            for id in list_dev_ids() {
                if !all_servers && !n.devices.contains_key(&id) && Record::load(id).is_none() {
                    log(format!("del --all: device {id} is not ublk-fast's: left (--all-servers deletes it)"));
                    continue;
                }
                if let Err(e) = n.del(id) {
                    warn(format!("del --all: {}", e.msg));
                    first.get_or_insert(e);
                }
            }
            first.map_or_else(Response::ok, fail)
        }
        Op::Del { .. } => Response::err("del takes an id or all (not both; --safe with an id)", 2),
        Op::Resize { id, bytes } => {
            n.resize(id, bytes).map(|()| Response::ok()).unwrap_or_else(fail)
        }
        Op::Quiesce { id, timeout_ms } => {
            n.quiesce(id, timeout_ms).map(|()| Response::ok()).unwrap_or_else(fail)
        }
        Op::Recover { id } => n.recover(id).unwrap_or_else(fail),
        Op::Status {} => Response { status: Some(n.status()), ..Response::ok() },
        Op::Shutdown {} => return (Response::ok(), Some(Ending::Shutdown)),
    };
    let ending = (about_devices && n.idle()).then_some(Ending::Idle);
    (resp, ending)
}

/// The control socket's thread: one connection at a time, one request each.
fn control_loop(
    listener: UnixListener,
    node: Arc<Mutex<Node>>,
    ending: Arc<Mutex<Option<Ending>>>,
    stop: Arc<AtomicBool>,
) {
    for conn in listener.incoming() {
        if stop.load(Ordering::Acquire) {
            break;
        }
        let Ok(mut s) = conn else { continue };
        let _ = s.set_read_timeout(Some(proto::READ_TIMEOUT));
        let _ = s.set_write_timeout(Some(proto::READ_TIMEOUT));
        let (mut resp, end) = match proto::read_line_with_fds(&mut s, proto::MAX_REQUEST_BYTES)
            .and_then(|(l, fds)| Ok((proto::parse_request(&l)?, fds)))
        {
            Ok((req, fds)) => {
                handle(&node, req, fds.into_iter().map(std::fs::File::from).collect())
            }
            Err(e) => (Response::err(format!("control request refused: {e}"), 2), None),
        };
        if let Some(end) = end {
            // Stop taking requests before answering: a client that hears `exiting` and
            // starts a new service must not reach this one.
            let _ = std::fs::remove_file(socket_path());
            stop.store(true, Ordering::Release);
            *ending.lock().unwrap_or_else(|e| e.into_inner()) = Some(end);
            resp.exiting = true;
        }
        resp.pid = std::process::id() as i32;
        let _ = proto::write_line(&mut s, &resp);
        if stop.load(Ordering::Acquire) {
            break;
        }
    }
}

/// Runs the service in this process until it ends. `ready` hears "READY" (or "FAILED why")
/// once it serves; `first` is a device request (add or recover) to carry out then: the device's
/// path is printed, or the service ends with its error.
fn run(opts: ServeOpts, mut ready: Option<File>, first: Option<Op>) -> Result<(), CliError> {
    let report = |ready: &mut Option<File>, line: &str| {
        if let Some(p) = ready {
            let _ = p.write_all(format!("{}\n", line.replace('\n', " ")).as_bytes());
        }
    };
    crate::logging::init();
    let r = start(&opts);
    let (node, listener, exporter) = match r {
        Ok(x) => x,
        Err(e) => {
            report(&mut ready, &format!("FAILED {}", e.msg));
            return Err(e);
        }
    };
    let taken_over = node.devices.len();
    let node = Arc::new(Mutex::new(node));
    let ending = Arc::new(Mutex::new(None::<Ending>));
    let stop = Arc::new(AtomicBool::new(false));
    if let Some((l, x)) = exporter {
        crate::metrics::spawn(l, x);
    }
    let control = {
        let (node, ending, stop) = (Arc::clone(&node), Arc::clone(&ending), Arc::clone(&stop));
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || control_loop(listener, node, ending, stop))
            .map_err(|e| CliError::runtime(format!("spawn control thread: {e}")))?
    };
    sd_notify(&format!("READY=1\nMAINPID={}", std::process::id()));
    if let Some(op) = first {
        let (resp, _) = handle(&node, Request { version: proto::VERSION, op }, Vec::new());
        for n in &resp.notices {
            eprintln!("ublk-fast: notice: {n}");
        }
        match resp.id {
            Some(id) if resp.ok => {
                println!("/dev/ublkb{id}");
                let _ = std::io::stdout().flush();
            }
            _ => {
                let msg = resp.error.unwrap_or_default();
                finish(&node, &stop, Ending::Idle);
                let _ = control.join();
                return Err(CliError { msg, code: resp.exit_code.unwrap_or(1) });
            }
        }
    }
    if let Some(s) = std::env::var("UBLK_FAST_TEST_HOLD_READY_S").ok().and_then(|v| v.parse().ok())
    {
        // Test hook: a service slow to take its devices over.
        std::thread::sleep(Duration::from_secs(s));
    }
    report(&mut ready, "READY");
    if ready.take().is_some() {
        detach_stdio();
    }
    log(format!(
        "serving on CPUs {} (pid {}, {taken_over} device(s) taken over)",
        build::list_str(&opts.cpus),
        std::process::id(),
    ));
    let why = loop {
        if let Some(sig) = wait_signal(Duration::from_millis(100)) {
            if sig == libc::SIGHUP {
                log("SIGHUP: nothing to do, every device keeps serving");
                continue;
            }
            break Ending::Signal;
        }
        if let Some(e) = *ending.lock().unwrap_or_else(|e| e.into_inner()) {
            break e;
        }
        let mut n = node.lock().unwrap_or_else(|e| e.into_inner());
        n.reap();
        if n.idle() && n.idle_since.elapsed() > IDLE_GRACE {
            break Ending::Idle;
        }
    };
    log(format!("ending ({why:?})"));
    finish(&node, &stop, why);
    let _ = control.join();
    Ok(())
}

/// Stops the control thread (if it still runs) and ends the node.
fn finish(node: &Mutex<Node>, stop: &AtomicBool, why: Ending) {
    stop.store(true, Ordering::Release);
    // Wakes the control thread out of accept(), then nobody finds the socket any more.
    let _ = UnixStream::connect(socket_path());
    let _ = std::fs::remove_file(socket_path());
    node.lock().unwrap_or_else(|e| e.into_inner()).end(why);
}

type Started = (Node, UnixListener, Option<(TcpListener, Arc<Exporter>)>);

/// Everything before the service answers: lock, mount namespace, cores, metrics, take-over,
/// control socket.
fn start(opts: &ServeOpts) -> Result<Started, CliError> {
    block_signals();
    // Before any thread exists, so they all inherit the private namespace.
    // A user's own service needs neither: its user cannot mount its devices (mount needs
    // root), and may not lower its OOM score.
    let privileged = record::privileged();
    if privileged {
        if let Some(w) = crate::mountns::isolate() {
            warn(w);
        }
    }
    raise_nofile();
    if privileged || opts.oom_score_adj >= 0 {
        if let Err(e) = std::fs::write("/proc/self/oom_score_adj", opts.oom_score_adj.to_string()) {
            warn(format!("cannot set oom_score_adj {}: {e}", opts.oom_score_adj));
        }
    }
    let lock = take_lock()?;
    // Held (and locked) for the life of the process.
    std::mem::forget(lock);
    let metrics = opts.metrics.as_deref().map(crate::metrics::bind).transpose()?;
    let sqpoll =
        opts.sqpoll.map(|idle_ms| SqPoll { idle_ms, cpu: opts.sqpoll_cpu, attach_to: None });
    let pool = CorePool::start(&opts.cpus, sqpoll).map_err(|e| CliError::runtime(e.to_string()))?;
    let exporter = metrics.map(|l| (l, Arc::new(Exporter::default())));
    let mut node = Node {
        pool,
        devices: BTreeMap::new(),
        stopping: BTreeMap::new(),
        exporter: exporter.as_ref().map(|(_, x)| Arc::clone(x)),
        opts: opts.clone(),
        idle_since: Instant::now(),
    };
    node.take_over_records();
    let path = socket_path();
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)
        .map_err(|e| CliError::runtime(format!("{}: cannot listen: {e}", path.display())))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| CliError::runtime(format!("{}: {e}", path.display())))?;
    Ok((node, listener, exporter))
}

/// Raises the soft RLIMIT_NOFILE to the hard one (at most 65536): every core ring's
/// fixed-file table is bounded by it, and a node serves many devices.
fn raise_nofile() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write the local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max.min(65536).max(lim.rlim_cur);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Points stdin/stdout at /dev/null and stderr at the service log, so that nothing waiting on
/// the caller's terminal or pipe is held open by the service.
fn detach_stdio() {
    let log = record::run_dir().join("daemon.log");
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
            let fd = libc::open(
                p.as_ptr(),
                libc::O_WRONLY
                    | libc::O_CREAT
                    | libc::O_APPEND
                    | libc::O_NOFOLLOW
                    | libc::O_CLOEXEC,
                0o600,
            );
            if fd >= 0 {
                libc::dup2(fd, 2);
                libc::close(fd);
            }
        }
    }
    crate::logging::rotate_at(log);
}

/// `serve --foreground`, or a foreground device command that starts the service.
pub fn run_foreground(opts: ServeOpts, first: Option<Op>) -> Result<(), CliError> {
    run(opts, None, first)
}

/// How long a starting service may take to report READY: it takes every recorded device over
/// first, each control command of which is itself bounded.
const READY_WAIT: Duration = Duration::from_secs(300);

/// The lines the starting service `pid` writes on `rd` until it closes it, each waited for at
/// most until READY_WAIT from now; past that, an error that says what was waited for (the
/// service keeps starting).
fn ready_lines(rd: File, pid: i32) -> Result<Vec<String>, CliError> {
    // UBLK_FAST_READY_WAIT_S overrides it, for tests.
    let wait = ublk_fast_engine::limits::from_env("UBLK_FAST_READY_WAIT_S", READY_WAIT);
    let deadline = Instant::now() + wait;
    let mut buf = Vec::new();
    let mut rd = rd;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut p = libc::pollfd { fd: rd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: polls one descriptor we own, described by a local pollfd.
        let n = unsafe { libc::poll(&mut p, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if n == 0 {
            return Err(CliError::runtime(format!(
                "the service (pid {pid}) did not report READY within {} s; it is still taking devices over (see its log)",
                wait.as_secs()
            )));
        }
        if n < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(CliError::runtime(format!("poll: {}", std::io::Error::last_os_error())));
        }
        let mut chunk = [0u8; 512];
        match std::io::Read::read(&mut rd, &mut chunk) {
            Ok(0) => break,
            Ok(k) => {
                buf.extend_from_slice(&chunk[..k]);
                // READY ends the wait as soon as it arrives.
                if buf.split(|&b| b == b'\n').any(|l| l == b"READY") {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(CliError::runtime(format!("read from the service: {e}"))),
        }
    }
    Ok(String::from_utf8_lossy(&buf).lines().map(str::to_string).collect())
}

/// Forks the service; returns once it serves (or failed, with its reason).
pub fn run_background(opts: ServeOpts) -> Result<i32, CliError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(CliError::runtime(format!("pipe: {}", std::io::Error::last_os_error())));
    }
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: the process is single-threaded here (no thread exists yet), so the child may run
    // arbitrary code after fork.
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
        // A failure before READY went to the parent through the pipe; later ones are logged.
        let code = match run(opts, Some(pipe), None) {
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
    for line in ready_lines(rd, pid)? {
        if line == "READY" {
            return Ok(pid);
        }
        if let Some(m) = line.strip_prefix("FAILED ") {
            let mut status = 0;
            // SAFETY: waiting for our own child; status is a local.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            return Err(CliError::runtime(m.to_string()));
        }
    }
    let mut status = 0;
    // SAFETY: waiting for our own child; status is a local.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    Err(CliError::runtime(format!("the service died while starting (wait status {status:#x})")))
}
