//! The control plane: ublk control commands on `/dev/ublk-control`, one SQE128 `URING_CMD` each.
//!
//! Control commands are rare and synchronous (one in flight, waited for), so the buffers they
//! point at live on the caller's stack for the whole command.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use crate::error::{Error, Result};
use crate::uapi::*;

pub const CONTROL_PATH: &str = "/dev/ublk-control";

/// An open `/dev/ublk-control` with its own small SQE128 ring.
pub struct Control {
    // Field order is drop order: the ring goes before the file it refers to.
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    file: File,
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
                    "ublk devices need root: run ublk-fast as root"
                }
                _ => "is the ublk driver (ublk_drv) loaded?",
            };
            Error::os("open /dev/ublk-control", e).hint(hint)
        })?;
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
            .build(4)
            .map_err(ring_setup_error)?;
        Ok(Control { ring, file })
    }

    /// Runs one command and returns its non-negative result.
    fn run(&mut self, name: &'static str, op: u32, cmd: ublksrv_ctrl_cmd) -> Result<i32> {
        let dev = cmd.dev_id;
        let mut raw = [0u8; 80];
        // SAFETY: ublksrv_ctrl_cmd is repr(C), 32 bytes without padding; copying its bytes into
        // the 80-byte command area is a plain byte copy.
        let bytes: [u8; 32] = unsafe { std::mem::transmute(cmd) };
        raw[..32].copy_from_slice(&bytes);
        let sqe = opcode::UringCmd80::new(types::Fd(self.file.as_raw_fd()), op).cmd(raw).build();
        // SAFETY: the buffer `cmd.addr` points at (if any) belongs to our caller's frame, which
        // outlives this call; we wait for the command's CQE before returning, so the kernel is
        // done with it by then.
        unsafe {
            self.ring.submission().push(&sqe).map_err(|_| Error::exhausted("control ring full"))?;
        }
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(Error::os(name, e).dev(dev)),
            }
        }
        let cqe = self
            .ring
            .completion()
            .next()
            .ok_or_else(|| Error::os(name, io::Error::from_raw_os_error(libc::EIO)).dev(dev))?;
        let res = cqe.result();
        if res < 0 {
            return Err(Error::errno(name, res).dev(dev));
        }
        Ok(res)
    }

    /// The driver's feature flags (GET_FEATURES), the only source of truth for what it can do.
    pub fn features(&mut self) -> Result<u64> {
        let mut feat = 0u64;
        let mut c = ctrl_cmd(u32::MAX);
        c.addr = &mut feat as *mut u64 as u64;
        c.len = UBLK_FEATURES_LEN as u16;
        self.run("GET_FEATURES", UBLK_U_CMD_GET_FEATURES, c)
            .map_err(|e| e.hint("this ublk driver predates GET_FEATURES (Linux 6.5)"))?;
        Ok(feat)
    }

    /// ADD_DEV. `info.dev_id == u32::MAX` lets the kernel pick; the kernel's answer (id, flags
    /// it kept) is written back into `info`.
    pub fn add_dev(&mut self, info: &mut ublksrv_ctrl_dev_info) -> Result<()> {
        let mut c = ctrl_cmd(info.dev_id);
        c.addr = info as *mut ublksrv_ctrl_dev_info as u64;
        c.len = std::mem::size_of::<ublksrv_ctrl_dev_info>() as u16;
        self.run("ADD_DEV", UBLK_U_CMD_ADD_DEV, c).map_err(|e| match e.raw_errno() {
            libc::EEXIST => e.hint("that device id is taken: pick another -n or leave it out"),
            _ => e,
        })?;
        Ok(())
    }

    pub fn set_params(&mut self, dev_id: u32, params: &ublk_params) -> Result<()> {
        let mut p = *params;
        p.len = std::mem::size_of::<ublk_params>() as u32;
        let mut c = ctrl_cmd(dev_id);
        c.addr = &mut p as *mut ublk_params as u64;
        c.len = p.len as u16;
        self.run("SET_PARAMS", UBLK_U_CMD_SET_PARAMS, c).map(|_| ())
    }

    pub fn get_params(&mut self, dev_id: u32) -> Result<ublk_params> {
        let mut p = ublk_params {
            len: std::mem::size_of::<ublk_params>() as u32,
            types: UBLK_PARAM_TYPE_BASIC | UBLK_PARAM_TYPE_DISCARD | UBLK_PARAM_TYPE_DEVT,
            ..Default::default()
        };
        let mut c = ctrl_cmd(dev_id);
        c.addr = &mut p as *mut ublk_params as u64;
        c.len = p.len as u16;
        self.run("GET_PARAMS", UBLK_U_CMD_GET_PARAMS, c)?;
        Ok(p)
    }

    /// START_DEV: blocks in the kernel until every queue has fetched every tag.
    pub fn start_dev(&mut self, dev_id: u32, daemon_pid: i32) -> Result<()> {
        let mut c = ctrl_cmd(dev_id);
        c.data[0] = daemon_pid as u64;
        self.run("START_DEV", UBLK_U_CMD_START_DEV, c).map(|_| ())
    }

    /// START_USER_RECOVERY: the device (QUIESCED or FAIL_IO, its old daemon gone) accepts a new
    /// daemon. EBUSY while the kernel has not yet noticed the old daemon's death.
    pub fn start_user_recovery(&mut self, dev_id: u32) -> Result<()> {
        self.run("START_USER_RECOVERY", UBLK_U_CMD_START_USER_RECOVERY, ctrl_cmd(dev_id))
            .map(|_| ())
    }

    /// END_USER_RECOVERY: every queue of the new daemon has fetched; the device is LIVE again.
    pub fn end_user_recovery(&mut self, dev_id: u32, daemon_pid: i32) -> Result<()> {
        let mut c = ctrl_cmd(dev_id);
        c.data[0] = daemon_pid as u64;
        self.run("END_USER_RECOVERY", UBLK_U_CMD_END_USER_RECOVERY, c).map(|_| ())
    }

    /// QUIESCE_DEV (UBLK_F_QUIESCE): waits up to `timeout_ms` (0: forever) until every queue
    /// has an idle tag, then aborts the daemon's fetches; once that daemon exits the device is
    /// QUIESCED and a new one can `recover` it. I/O waits meanwhile.
    pub fn quiesce_dev(&mut self, dev_id: u32, timeout_ms: u64) -> Result<()> {
        let mut c = ctrl_cmd(dev_id);
        c.data[0] = timeout_ms;
        self.run("QUIESCE_DEV", UBLK_U_CMD_QUIESCE_DEV, c).map(|_| ())
    }

    /// UPDATE_SIZE (UBLK_F_UPDATE_SIZE, 6.16+): the device's capacity becomes `sectors`, while
    /// it serves and while it is open.
    pub fn update_size(&mut self, dev_id: u32, sectors: u64) -> Result<()> {
        let mut c = ctrl_cmd(dev_id);
        c.data[0] = sectors;
        self.run("UPDATE_SIZE", UBLK_U_CMD_UPDATE_SIZE, c).map(|_| ())
    }

    /// TRY_STOP_DEV (UBLK_F_SAFE_STOP_DEV): STOP_DEV only if nobody has the block device
    /// open; EBUSY otherwise, and nothing changes.
    pub fn try_stop_dev(&mut self, dev_id: u32) -> Result<()> {
        self.run("TRY_STOP_DEV", UBLK_U_CMD_TRY_STOP_DEV, ctrl_cmd(dev_id)).map(|_| ())
    }

    pub fn stop_dev(&mut self, dev_id: u32) -> Result<()> {
        self.run("STOP_DEV", UBLK_U_CMD_STOP_DEV, ctrl_cmd(dev_id)).map(|_| ())
    }

    /// DEL_DEV: returns once the device is gone, i.e. after its daemon closed `/dev/ublkcN`.
    pub fn del_dev(&mut self, dev_id: u32) -> Result<()> {
        self.run("DEL_DEV", UBLK_U_CMD_DEL_DEV, ctrl_cmd(dev_id)).map(|_| ())
    }

    /// DEL_DEV_ASYNC (6.9+): removes the device without waiting for its last opener to close
    /// `/dev/ublkbN`; the kernel frees it then. Falls back to DEL_DEV on older drivers.
    pub fn del_dev_nowait(&mut self, dev_id: u32) -> Result<()> {
        match self.run("DEL_DEV_ASYNC", UBLK_U_CMD_DEL_DEV_ASYNC, ctrl_cmd(dev_id)) {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_errno(), libc::EINVAL | libc::EOPNOTSUPP | libc::ENOTTY) => {
                self.del_dev(dev_id)
            }
            Err(e) => Err(e),
        }
    }

    pub fn dev_info(&mut self, dev_id: u32) -> Result<ublksrv_ctrl_dev_info> {
        let mut info = ublksrv_ctrl_dev_info::default();
        let mut c = ctrl_cmd(dev_id);
        c.addr = &mut info as *mut ublksrv_ctrl_dev_info as u64;
        c.len = std::mem::size_of::<ublksrv_ctrl_dev_info>() as u16;
        self.run("GET_DEV_INFO", UBLK_U_CMD_GET_DEV_INFO, c)?;
        Ok(info)
    }

    /// The CPUs the block layer maps to queue `q` (GET_QUEUE_AFFINITY).
    pub fn queue_affinity(&mut self, dev_id: u32, q: u16) -> Result<Vec<usize>> {
        // 4096 CPUs; the kernel wants a multiple of sizeof(long) covering nr_cpu_ids.
        let mut mask = [0u64; 64];
        let mut c = affinity_cmd(dev_id, q);
        c.addr = mask.as_mut_ptr() as u64;
        c.len = std::mem::size_of_val(&mask) as u16;
        self.run("GET_QUEUE_AFFINITY", UBLK_U_CMD_GET_QUEUE_AFFINITY, c).map_err(|e| e.queue(q))?;
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
    fn queue_affinity_names_the_queue_in_data0() {
        let c = affinity_cmd(7, 3);
        assert_eq!(c.dev_id, 7);
        assert_eq!(c.data[0], 3);
    }
}
