//! The control plane: ublk control commands on `/dev/ublk-control`, one SQE128 `URING_CMD` each.
//!
//! Control commands are rare and synchronous: one is waited for at a time, for a bounded time.
//! The kernel reads and writes a command's buffer through a bounce buffer that the control
//! owns, so a command that outlives its wait (the kernel still working on it in its worker)
//! never writes into memory that went back to the caller: that bounce buffer is leaked.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use crate::error::{Error, Result};
use crate::uapi::*;

pub const CONTROL_PATH: &str = "/dev/ublk-control";

/// How long a control command may take in the kernel before its caller is told. STOP_DEV waits
/// for in-flight I/O (the service cancels backend I/O after its drain limit, 30 s), START_DEV
/// and END_USER_RECOVERY for every queue's fetches, QUIESCE_DEV for its own timeout (added).
/// `UBLK_FAST_CTRL_LIMIT_S` overrides it, for tests.
pub const COMMAND_LIMIT: Duration = Duration::from_secs(60);

/// Queries (GET_DEV_INFO, GET_PARAMS, GET_QUEUE_AFFINITY) wait behind a STOP_DEV that is
/// still draining (the driver holds the device's lock): `list` must not hang on such a device.
const QUERY_LIMIT: Duration = Duration::from_secs(5);

fn command_limit() -> Duration {
    crate::limits::from_env("UBLK_FAST_CTRL_LIMIT_S", COMMAND_LIMIT)
}

/// The largest buffer a command carries: GET_QUEUE_AFFINITY's 4096-CPU mask.
const PAYLOAD_MAX: usize = 512;

/// Room before the payload for the char device's path, which commands on an unprivileged
/// device carry first (`/dev/ublkc` and up to 20 digits).
const PATH_ROOM: usize = 32;

const BOUNCE_LEN: usize = PATH_ROOM + PAYLOAD_MAX;

/// An open `/dev/ublk-control` with its own small SQE128 ring.
pub struct Control {
    // Field order is drop order: the ring goes before the file it refers to.
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    file: File,
    /// What the kernel reads and writes for the command in flight (see the module comment).
    bounce: Box<[u8; BOUNCE_LEN]>,
    /// The user_data of the next command: a late completion of a command given up on is
    /// recognised and skipped.
    seq: u64,
    /// Commands given up on, still in the kernel: their bounce buffers are leaked.
    abandoned: u32,
    /// Every command on an existing device names its char device (`dev_path_len`): the
    /// caller lacks CAP_SYS_ADMIN, so only unprivileged devices (UBLK_F_UNPRIVILEGED_DEV)
    /// answer it, and the driver checks the caller's access to that node.
    unprivileged: bool,
    /// Unprivileged devices a privileged caller met (`dev_info` learns them): their commands
    /// carry the path too.
    path_devs: Vec<u32>,
}

/// Whether this process lacks CAP_SYS_ADMIN: it may only create and drive unprivileged
/// devices (UBLK_F_UNPRIVILEGED_DEV). Read once: every path and command asks it.
pub fn unprivileged() -> bool {
    const CAP_SYS_ADMIN: u32 = 21;
    static UNPRIVILEGED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *UNPRIVILEGED.get_or_init(|| !crate::device::has_capability(CAP_SYS_ADMIN))
}

/// Turns an io_uring setup failure into the reason a user can act on.
pub fn ring_setup_error(e: io::Error) -> Error {
    let disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    match (e.raw_os_error(), disabled.as_str()) {
        (Some(libc::EPERM), "2") => Error::os("io_uring_setup", e)
            .hint("io_uring is disabled: set sysctl kernel.io_uring_disabled=0"),
        (Some(libc::EPERM), "1") => Error::os("io_uring_setup", e).hint(
            "io_uring is restricted by kernel.io_uring_disabled=1: run as root or in the io_uring_group",
        ),
        (Some(libc::ENOSYS), _) => {
            Error::os("io_uring_setup", e).hint("this kernel has no io_uring")
        }
        (Some(libc::ENOMEM), _) => Error::os("io_uring_setup", e)
            .hint("raise RLIMIT_MEMLOCK (ulimit -l) or lower --depth"),
        _ => Error::os("io_uring_setup", e),
    }
}

/// Types the kernel may read and write as bytes: repr(C) integers and arrays of them, without
/// padding, for which every byte pattern is a valid value.
///
/// # Safety
/// Only for such types.
unsafe trait Plain: Sized {}
// SAFETY: integers and arrays of integers.
unsafe impl Plain for u64 {}
// SAFETY: as above.
unsafe impl Plain for [u64; 64] {}
// SAFETY: repr(C) structs of integers (uapi.rs; their layout is checked by its tests).
unsafe impl Plain for ublksrv_ctrl_dev_info {}
// SAFETY: as above.
unsafe impl Plain for ublk_params {}

/// `t`'s bytes, for the kernel to read or fill.
fn bytes_of<T: Plain>(t: &mut T) -> &mut [u8] {
    // SAFETY: `Plain` types have no padding and accept any bytes; the slice borrows `t`
    // mutably, so nothing else reads it meanwhile.
    unsafe { std::slice::from_raw_parts_mut((t as *mut T).cast::<u8>(), std::mem::size_of::<T>()) }
}

fn ctrl_cmd(dev_id: u32) -> ublksrv_ctrl_cmd {
    ublksrv_ctrl_cmd { dev_id, queue_id: u16::MAX, ..Default::default() }
}

/// GET_QUEUE_AFFINITY's header: the driver reads the queue from `data[0]`, not from `queue_id`
/// (which it ignores for this command), so a queue put there would get queue 0's CPUs.
fn affinity_cmd(dev_id: u32, q: u16) -> ublksrv_ctrl_cmd {
    let mut c = ctrl_cmd(dev_id);
    c.data[0] = u64::from(q);
    c
}

impl Control {
    pub fn open() -> Result<Self> {
        let file = OpenOptions::new().read(true).write(true).open(CONTROL_PATH).map_err(|e| {
            let hint = match e.raw_os_error() {
                Some(libc::ENOENT) => {
                    "the ublk driver is not loaded: run `modprobe ublk_drv` as root"
                }
                Some(libc::EACCES) | Some(libc::EPERM) => {
                    "run as root, or, for unprivileged devices, join /dev/ublk-control's group (dist/60-ublk-fast.rules)"
                }
                _ => "is the ublk driver (ublk_drv) loaded?",
            };
            Error::os("open /dev/ublk-control", e).hint(hint)
        })?;
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
            .build(4)
            .map_err(ring_setup_error)?;
        Ok(Control {
            ring,
            file,
            bounce: Box::new([0; BOUNCE_LEN]),
            seq: 0,
            abandoned: 0,
            unprivileged: unprivileged(),
            path_devs: Vec::new(),
        })
    }

    /// Whether commands on `dev_id` must name its char device.
    fn needs_path(&self, op: u32, dev_id: u32) -> bool {
        if op == UBLK_U_CMD_ADD_DEV || op == UBLK_U_CMD_GET_FEATURES {
            return false;
        }
        // GET_DEV_INFO2 always carries it, whatever the device.
        op == UBLK_U_CMD_GET_DEV_INFO2 || self.unprivileged || self.path_devs.contains(&dev_id)
    }

    /// Runs one command and returns its non-negative result; `buf` (at most 512 bytes) is what
    /// the command reads and writes. Gives up after COMMAND_LIMIT, saying which command on
    /// which device it waited for.
    fn run(
        &mut self,
        name: &'static str,
        op: u32,
        cmd: ublksrv_ctrl_cmd,
        buf: Option<&mut [u8]>,
    ) -> Result<i32> {
        self.run_for(name, op, cmd, buf, command_limit())
    }

    fn run_for(
        &mut self,
        name: &'static str,
        op: u32,
        mut cmd: ublksrv_ctrl_cmd,
        buf: Option<&mut [u8]>,
        limit: Duration,
    ) -> Result<i32> {
        let dev = cmd.dev_id;
        // The payload follows the device's path where the driver wants one; it skips the path
        // (addr += dev_path_len) once it has checked it.
        let at = if self.needs_path(op, dev) {
            let path = format!("/dev/ublkc{dev}");
            self.bounce[..path.len()].copy_from_slice(path.as_bytes());
            cmd.dev_path_len = path.len() as u16;
            path.len()
        } else {
            0
        };
        let len = buf.as_deref().map_or(0, |b| b.len());
        if len > PAYLOAD_MAX {
            return Err(Error::invalid(format!("{name}: a {len}-byte buffer")).dev(dev));
        }
        if let Some(b) = buf.as_deref() {
            self.bounce[at..at + len].copy_from_slice(b);
        }
        if at + len > 0 {
            cmd.addr = self.bounce.as_mut_ptr() as u64;
            cmd.len = (at + len) as u16;
        }
        let mut raw = [0u8; 80];
        // SAFETY: ublksrv_ctrl_cmd is repr(C), 32 bytes without padding; copying its bytes into
        // the 80-byte command area is a plain byte copy.
        let bytes: [u8; 32] = unsafe { std::mem::transmute(cmd) };
        raw[..32].copy_from_slice(&bytes);
        self.seq += 1;
        let seq = self.seq;
        let sqe = opcode::UringCmd80::new(types::Fd(self.file.as_raw_fd()), op)
            .cmd(raw)
            .build()
            .user_data(seq);
        // SAFETY: the buffer `cmd.addr` points at is `self.bounce`, which stays put until the
        // command's completion is seen below, or is leaked if we stop waiting for it first.
        unsafe {
            self.ring.submission().push(&sqe).map_err(|_| Error::exhausted("control ring full"))?;
        }
        let deadline = Instant::now() + limit;
        let res = loop {
            if let Some(res) = self.reap(seq) {
                break res;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.give_up(name, dev, limit));
            }
            match self.wait(left) {
                Ok(()) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::ETIME)) => {}
                Err(e) => return Err(Error::os(name, e).dev(dev)),
            }
        };
        if res < 0 {
            return Err(Error::errno(name, res).dev(dev));
        }
        if let Some(b) = buf {
            b.copy_from_slice(&self.bounce[at..at + len]);
        }
        Ok(res)
    }

    /// The result of command `seq` if it completed; late completions of abandoned commands are
    /// dropped on the way.
    fn reap(&mut self, seq: u64) -> Option<i32> {
        let mut found = None;
        for cqe in self.ring.completion() {
            if cqe.user_data() == seq {
                found = Some(cqe.result());
            } else {
                self.abandoned = self.abandoned.saturating_sub(1);
                log::info!(
                    "control command #{} finished late (result {}), after it was given up on",
                    cqe.user_data(),
                    cqe.result()
                );
            }
        }
        found
    }

    /// Submits and waits for a completion, for at most `left` where the kernel can bound a
    /// wait (IORING_FEAT_EXT_ARG, 5.11+); else without a bound.
    fn wait(&mut self, left: Duration) -> io::Result<()> {
        if !self.ring.params().is_feature_ext_arg() {
            return self.ring.submit_and_wait(1).map(|_| ());
        }
        let ts = types::Timespec::from(left);
        let args = types::SubmitArgs::new().timespec(&ts);
        self.ring.submitter().submit_with_args(1, &args).map(|_| ())
    }

    /// The command is still in the kernel: its bounce buffer is left to it for good.
    fn give_up(&mut self, name: &'static str, dev: u32, limit: Duration) -> Error {
        let old = std::mem::replace(&mut self.bounce, Box::new([0; BOUNCE_LEN]));
        // The kernel may still write into it when the command ends: never freed.
        std::mem::forget(old);
        self.abandoned += 1;
        Error::timeout(format!(
            "{name} on dev {dev} did not finish within {} s: the kernel is still waiting (for in-flight I/O, or for the queues to fetch); it is left running",
            limit.as_secs()
        ))
    }

    /// The driver's feature flags (GET_FEATURES), the only source of truth for what it can do.
    pub fn features(&mut self) -> Result<u64> {
        let mut feat = 0u64;
        let c = ctrl_cmd(u32::MAX);
        self.run("GET_FEATURES", UBLK_U_CMD_GET_FEATURES, c, Some(bytes_of(&mut feat)))
            .map_err(|e| e.hint("this ublk driver predates GET_FEATURES (Linux 6.5)"))?;
        Ok(feat)
    }

    /// ADD_DEV. `info.dev_id == u32::MAX` lets the kernel pick; the kernel's answer (id, flags
    /// it kept) is written back into `info`.
    pub fn add_dev(&mut self, info: &mut ublksrv_ctrl_dev_info) -> Result<()> {
        let c = ctrl_cmd(info.dev_id);
        self.run("ADD_DEV", UBLK_U_CMD_ADD_DEV, c, Some(bytes_of(info))).map_err(|e| {
            match e.raw_errno() {
                libc::EEXIST => e.hint("that device id is taken: pick another -n or leave it out"),
                _ => e,
            }
        })?;
        Ok(())
    }

    pub fn set_params(&mut self, dev_id: u32, params: &ublk_params) -> Result<()> {
        let mut p = *params;
        p.len = std::mem::size_of::<ublk_params>() as u32;
        let c = ctrl_cmd(dev_id);
        self.run("SET_PARAMS", UBLK_U_CMD_SET_PARAMS, c, Some(bytes_of(&mut p))).map(|_| ())
    }

    pub fn get_params(&mut self, dev_id: u32) -> Result<ublk_params> {
        let mut p = ublk_params {
            len: std::mem::size_of::<ublk_params>() as u32,
            types: UBLK_PARAM_TYPE_BASIC | UBLK_PARAM_TYPE_DISCARD | UBLK_PARAM_TYPE_DEVT,
            ..Default::default()
        };
        let c = ctrl_cmd(dev_id);
        let limit = QUERY_LIMIT.min(command_limit());
        self.run_for("GET_PARAMS", UBLK_U_CMD_GET_PARAMS, c, Some(bytes_of(&mut p)), limit)?;
        Ok(p)
    }

    /// START_DEV: blocks in the kernel until every queue has fetched every tag.
    pub fn start_dev(&mut self, dev_id: u32, daemon_pid: i32) -> Result<()> {
        let mut c = ctrl_cmd(dev_id);
        c.data[0] = daemon_pid as u64;
        self.run("START_DEV", UBLK_U_CMD_START_DEV, c, None).map(|_| ())
    }

    /// START_USER_RECOVERY: the device (QUIESCED or FAIL_IO, its old daemon gone) accepts a new
    /// daemon. EBUSY while the kernel has not yet noticed the old daemon's death.
    pub fn start_user_recovery(&mut self, dev_id: u32) -> Result<()> {
        self.run("START_USER_RECOVERY", UBLK_U_CMD_START_USER_RECOVERY, ctrl_cmd(dev_id), None)
            .map(|_| ())
    }

    /// END_USER_RECOVERY: every queue of the new daemon has fetched; the device is LIVE again.
    pub fn end_user_recovery(&mut self, dev_id: u32, daemon_pid: i32) -> Result<()> {
        let mut c = ctrl_cmd(dev_id);
        c.data[0] = daemon_pid as u64;
        self.run("END_USER_RECOVERY", UBLK_U_CMD_END_USER_RECOVERY, c, None).map(|_| ())
    }

    /// QUIESCE_DEV (UBLK_F_QUIESCE): waits up to `timeout_ms` (not 0: forever) until every queue
    /// has an idle tag, then aborts the daemon's fetches; once that daemon exits the device is
    /// QUIESCED and a new one can `recover` it. I/O waits meanwhile.
    pub fn quiesce_dev(&mut self, dev_id: u32, timeout_ms: u64) -> Result<()> {
        let mut c = ctrl_cmd(dev_id);
        c.data[0] = timeout_ms;
        // The kernel waits up to timeout_ms itself; ours is that plus the usual limit.
        let limit = command_limit() + Duration::from_millis(timeout_ms);
        self.run_for("QUIESCE_DEV", UBLK_U_CMD_QUIESCE_DEV, c, None, limit).map(|_| ())
    }

    /// UPDATE_SIZE (UBLK_F_UPDATE_SIZE, 6.16+): the device's capacity becomes `sectors`, while
    /// it serves and while it is open.
    pub fn update_size(&mut self, dev_id: u32, sectors: u64) -> Result<()> {
        let mut c = ctrl_cmd(dev_id);
        c.data[0] = sectors;
        self.run("UPDATE_SIZE", UBLK_U_CMD_UPDATE_SIZE, c, None).map(|_| ())
    }

    /// TRY_STOP_DEV (UBLK_F_SAFE_STOP_DEV): STOP_DEV only if nobody has the block device
    /// open; EBUSY otherwise, and nothing changes.
    pub fn try_stop_dev(&mut self, dev_id: u32) -> Result<()> {
        self.run("TRY_STOP_DEV", UBLK_U_CMD_TRY_STOP_DEV, ctrl_cmd(dev_id), None).map(|_| ())
    }

    pub fn stop_dev(&mut self, dev_id: u32) -> Result<()> {
        self.run("STOP_DEV", UBLK_U_CMD_STOP_DEV, ctrl_cmd(dev_id), None).map(|_| ())
    }

    /// DEL_DEV: returns once the device is gone, i.e. after its daemon closed `/dev/ublkcN`.
    pub fn del_dev(&mut self, dev_id: u32) -> Result<()> {
        self.run("DEL_DEV", UBLK_U_CMD_DEL_DEV, ctrl_cmd(dev_id), None).map(|_| ())
    }

    /// DEL_DEV_ASYNC (6.9+): removes the device without waiting for its last opener to close
    /// `/dev/ublkbN`; the kernel frees it then. Falls back to DEL_DEV on older drivers.
    pub fn del_dev_nowait(&mut self, dev_id: u32) -> Result<()> {
        match self.run("DEL_DEV_ASYNC", UBLK_U_CMD_DEL_DEV_ASYNC, ctrl_cmd(dev_id), None) {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_errno(), libc::EINVAL | libc::EOPNOTSUPP | libc::ENOTTY) => {
                self.del_dev(dev_id)
            }
            Err(e) => Err(e),
        }
    }

    pub fn dev_info(&mut self, dev_id: u32) -> Result<ublksrv_ctrl_dev_info> {
        let mut info = ublksrv_ctrl_dev_info::default();
        let c = ctrl_cmd(dev_id);
        let limit = QUERY_LIMIT.min(command_limit());
        let r = self.run_for(
            "GET_DEV_INFO",
            UBLK_U_CMD_GET_DEV_INFO,
            c,
            Some(bytes_of(&mut info)),
            limit,
        );
        match r {
            // A privileged caller asking about an unprivileged device without its path: ask
            // again the way that works for both kinds, and name the path from now on.
            Err(e) if e.raw_errno() == libc::EINVAL && !self.unprivileged => self.dev_info2(dev_id),
            r => r.map(|_| info),
        }
    }

    /// GET_DEV_INFO2: the char device's path goes with it, whatever kind the device is.
    pub fn dev_info2(&mut self, dev_id: u32) -> Result<ublksrv_ctrl_dev_info> {
        let mut info = ublksrv_ctrl_dev_info::default();
        let c = ctrl_cmd(dev_id);
        let limit = QUERY_LIMIT.min(command_limit());
        let buf = Some(bytes_of(&mut info));
        self.run_for("GET_DEV_INFO2", UBLK_U_CMD_GET_DEV_INFO2, c, buf, limit)?;
        if info.flags & UBLK_F_UNPRIVILEGED_DEV != 0 && !self.path_devs.contains(&dev_id) {
            self.path_devs.push(dev_id);
        }
        Ok(info)
    }

    /// The CPUs the block layer maps to queue `q` (GET_QUEUE_AFFINITY).
    pub fn queue_affinity(&mut self, dev_id: u32, q: u16) -> Result<Vec<usize>> {
        // 4096 CPUs; the kernel wants a multiple of sizeof(long) covering nr_cpu_ids.
        let mut mask = [0u64; 64];
        let c = affinity_cmd(dev_id, q);
        self.run("GET_QUEUE_AFFINITY", UBLK_U_CMD_GET_QUEUE_AFFINITY, c, Some(bytes_of(&mut mask)))
            .map_err(|e| e.queue(q))?;
        let mut cpus = Vec::new();
        for (w, word) in mask.iter().enumerate() {
            for b in 0..64 {
                if word & (1u64 << b) != 0 {
                    cpus.push(w * 64 + b);
                }
            }
        }
        Ok(cpus)
    }
}

/// Ids of the ublk devices that exist now, from `/sys/class/ublk-char`.
pub fn list_dev_ids() -> Vec<u32> {
    let mut ids: Vec<u32> = std::fs::read_dir("/sys/class/ublk-char")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str()?.strip_prefix("ublkc")?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    ids.sort_unstable();
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_buffer_fits_the_bounce_buffer() {
        assert!(std::mem::size_of::<ublk_params>() <= PAYLOAD_MAX);
        assert!(std::mem::size_of::<ublksrv_ctrl_dev_info>() <= PAYLOAD_MAX);
        assert_eq!(std::mem::size_of::<[u64; 64]>(), PAYLOAD_MAX);
        assert!(format!("/dev/ublkc{}", u32::MAX).len() <= PATH_ROOM);
        assert_eq!(bytes_of(&mut 0u64).len(), UBLK_FEATURES_LEN);
    }

    #[test]
    fn queue_affinity_names_the_queue_in_data0() {
        let c = affinity_cmd(7, 3);
        assert_eq!(c.dev_id, 7);
        assert_eq!(c.data[0], 3);
    }
}
