//! The service's log: every line through the `log` facade (the engine logs with it too), with
//! a level and, unless the journal is the destination, a UTC timestamp. Under systemd
//! (`JOURNAL_STREAM` names our stderr) lines carry the journal's `<N>` priority prefix instead,
//! so `journalctl -p warning` works. In the background the destination is
//! `/run/ublk-fast/daemon.log`, rotated to `daemon.log.1` past 16 MiB.
//!
//! `UBLK_FAST_LOG=error|warn|info|debug` sets the level (default info).

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Mutex;

use log::{Level, LevelFilter, Log, Metadata, Record};

/// The log file is rotated past this size.
const MAX_LOG_BYTES: u64 = 16 << 20;

struct Logger {
    journal: bool,
    /// The file stderr points at (background service), for rotation.
    file: Mutex<Option<(PathBuf, u64)>>,
}

static LOGGER: Logger = Logger { journal: false, file: Mutex::new(None) };
static JOURNAL_LOGGER: Logger = Logger { journal: true, file: Mutex::new(None) };

/// Whether stderr is the systemd journal (`JOURNAL_STREAM=dev:inode` of our fd 2).
fn stderr_is_journal() -> bool {
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else { return false };
    let Some((dev, ino)) = v.to_str().and_then(|s| s.split_once(':')) else { return false };
    // SAFETY: libc::stat is plain data, valid when zeroed.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat on fd 2 writes into the local struct.
    if unsafe { libc::fstat(2, &mut st) } != 0 {
        return false;
    }
    dev.parse() == Ok(st.st_dev) && ino.parse() == Ok(st.st_ino)
}

/// Installs the logger (once; later calls do nothing).
pub fn init() {
    let level = match std::env::var("UBLK_FAST_LOG").as_deref() {
        Ok("error") => LevelFilter::Error,
        Ok("warn") => LevelFilter::Warn,
        Ok("debug") => LevelFilter::Debug,
        Ok("trace") => LevelFilter::Trace,
        _ => LevelFilter::Info,
    };
    let logger: &'static Logger = if stderr_is_journal() { &JOURNAL_LOGGER } else { &LOGGER };
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}

/// From now on stderr is `path` (opened by the caller): rotate it when it grows too big.
pub fn rotate_at(path: PathBuf) {
    let size = std::fs::metadata(&path).map_or(0, |m| m.len());
    *LOGGER.file.lock().unwrap_or_else(|e| e.into_inner()) = Some((path, size));
}

/// `2026-11-30T09:20:01.123Z`
fn timestamp() -> String {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the local timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    let secs = ts.tv_sec;
    // SAFETY: libc::tm is plain data, valid when zeroed.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: gmtime_r reads `secs` and writes into the local tm.
    unsafe { libc::gmtime_r(&secs, &mut tm) };
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
        ts.tv_nsec / 1_000_000
    )
}

/// The journal's priority of a level (sd-daemon.h).
fn priority(l: Level) -> u8 {
    match l {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

impl Log for Logger {
    fn enabled(&self, m: &Metadata) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let line = if self.journal {
            format!("<{}>{}\n", priority(r.level()), r.args())
        } else {
            format!("{} {:<5} ublk-fast: {}\n", timestamp(), r.level(), r.args())
        };
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let _ = std::io::stderr().write_all(line.as_bytes());
        if let Some((path, size)) = file.as_mut() {
            *size += line.len() as u64;
            if *size > MAX_LOG_BYTES {
                let old = path.with_extension("log.1");
                let _ = std::fs::rename(&*path, old);
                if let Ok(f) = std::fs::OpenOptions::new().create(true).append(true).open(&*path) {
                    // SAFETY: dup2 onto our own stderr; `f` closes its copy on drop.
                    unsafe { libc::dup2(f.as_raw_fd(), 2) };
                }
                *size = 0;
            }
        }
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_and_priorities_have_their_shape() {
        let t = timestamp();
        assert_eq!(t.len(), 24, "{t}");
        assert!(t.ends_with('Z') && t.as_bytes()[10] == b'T', "{t}");
        assert_eq!(priority(Level::Warn), 4);
        assert_eq!(priority(Level::Error), 3);
    }
}
