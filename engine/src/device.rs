//! A device's life on the server side: ADD_DEV → SET_PARAMS → its queues are seated on the
//! service's cores and fetch every tag → START_DEV → serve → STOP_DEV → the queues leave their
//! cores → DEL_DEV.
//!
//! Until [`Device::create`] returns, any failure removes what was created: no half-made device
//! is ever left behind.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::buf::arena_len;
use crate::core::CorePool;
use crate::cpus::place_queues;
use crate::ctrl::Control;
use crate::error::{Error, Result};
use crate::mode::{Commands, Data, Mode};
use crate::queue::QueueConfig;
use crate::stats::StatsRegion;
use crate::target::{Integrity, Target, TargetParams};
use crate::uapi::*;

/// What the user asked for, independent of the target.
#[derive(Clone, Debug)]
pub struct DeviceConfig {
    /// `None`: the kernel picks the id.
    pub dev_id: Option<u32>,
    pub queues: u16,
    pub depth: u16,
    /// CPUs the queue threads may run on.
    pub cpus: Vec<usize>,
    pub max_io_bytes: u32,
    /// Where to publish the counters (`<dir>/<id>.stats`); `None` keeps them private.
    pub stats_dir: Option<PathBuf>,
    pub zero_copy: ZeroCopy,
    /// What the kernel does with I/O when this daemon dies, until `recover` starts another.
    pub recovery: Recovery,
    /// UBLK_F_USER_COPY: the server copies request data itself through `/dev/ublkcN`.
    pub user_copy: bool,
    /// UBLK_F_BATCH_IO: per-queue batch commands instead of per-tag FETCH/COMMIT_AND_FETCH.
    pub batch: bool,
    /// UBLK_F_NO_AUTO_PART_SCAN: the kernel does not look for partitions when it starts.
    pub no_part_scan: bool,
    /// Spread each queue's tags over several cores where PER_IO_DAEMON allows (off: each
    /// queue on one core; on 2 vCPUs spreading measured slower, bench/results/*-spread.md).
    pub spread_tags: bool,
    /// Latency mode: the cores serving the device poll this long (µs) after a busy loop turn
    /// before they sleep (0: off). A core polls as long as its longest-polling queue asks.
    pub poll_us: u32,
    /// Requests outstanding longer than this (ms) are logged once and counted (0: never).
    pub slow_io_ms: u32,
}

/// Decides the engine mode from what was asked, the driver's features and the target.
pub fn resolve_mode(cfg: &DeviceConfig, features: u64, target_zero_copy: bool) -> Result<Mode> {
    let data = if cfg.user_copy {
        if cfg.zero_copy == ZeroCopy::On {
            return Err(Error::invalid(
                "--user-copy and --zero-copy=on are two ways to move the data: pick one",
            ));
        }
        if features & UBLK_F_USER_COPY == 0 {
            return Err(Error::unsupported(
                "--user-copy: this kernel's ublk driver does not offer USER_COPY (Linux 6.5+)",
            ));
        }
        Data::UserCopy
    } else if cfg.zero_copy.resolve(features, target_zero_copy)? {
        Data::ZeroCopy
    } else {
        Data::Copy
    };
    let commands = if cfg.batch {
        if features & UBLK_F_BATCH_IO == 0 {
            return Err(Error::unsupported(
                "--batch-io: this kernel's ublk driver does not offer BATCH_IO (Linux 7.0+); leave the option out",
            ));
        }
        if cfg.depth < 2 {
            // Its per-queue event FIFO (a kfifo of `depth` tags) must hold at least two: the
            // driver refuses ADD_DEV with EINVAL otherwise.
            return Err(Error::invalid(
                "--batch-io needs --depth 2 or more: the driver's BATCH_IO event queue cannot be one tag deep",
            ));
        }
        Commands::Batch
    } else {
        Commands::PerTag
    };
    Ok(Mode { data, commands })
}

/// `--recovery`: the device outlives its daemon (UBLK_F_USER_RECOVERY*).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Recovery {
    /// The daemon's death ends the device.
    #[default]
    None,
    /// I/O in flight at the crash fails; new I/O waits for the next daemon.
    Requeue,
    /// I/O in flight at the crash is reissued to the next daemon; new I/O waits.
    Reissue,
    /// I/O fails until the next daemon is there.
    FailIo,
}

impl Recovery {
    pub fn flags(self) -> u64 {
        match self {
            Recovery::None => 0,
            Recovery::Requeue => UBLK_F_USER_RECOVERY,
            Recovery::Reissue => UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE,
            Recovery::FailIo => UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_FAIL_IO,
        }
    }
}

/// `--zero-copy`: serve requests from their own pages (UBLK_F_AUTO_BUF_REG, Linux 6.16+).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ZeroCopy {
    /// On when the driver offers it and the target can use it.
    #[default]
    Auto,
    /// On, or an error if it cannot be.
    On,
    Off,
}

impl ZeroCopy {
    /// Decides from the driver's features and the target's ability.
    pub fn resolve(self, features: u64, target_can: bool) -> Result<bool> {
        let offered = features & UBLK_F_AUTO_BUF_REG != 0;
        match self {
            ZeroCopy::Off => Ok(false),
            ZeroCopy::Auto => Ok(offered && target_can),
            ZeroCopy::On if !offered => Err(Error::unsupported(
                "--zero-copy on: this kernel's ublk driver does not offer AUTO_BUF_REG (Linux 6.16+); use --zero-copy auto or off",
            )),
            ZeroCopy::On if !target_can => Err(Error::unsupported(
                "--zero-copy on: this target cannot serve from the request's pages; use --zero-copy off",
            )),
            ZeroCopy::On => Ok(true),
        }
    }
}

impl DeviceConfig {
    pub const DEFAULT_MAX_IO_BYTES: u32 = 512 * 1024;

    /// This configuration with the geometry the kernel granted (ADD_DEV writes it back, and
    /// GET_DEV_INFO reports it): it may have fewer queues than asked (at most one per possible
    /// CPU), and rounds the maximum I/O size to whole pages.
    pub fn granted(&self, info: &ublksrv_ctrl_dev_info) -> DeviceConfig {
        DeviceConfig {
            queues: info.nr_hw_queues,
            depth: info.queue_depth,
            max_io_bytes: info.max_io_buf_bytes,
            ..self.clone()
        }
    }
}

/// Bytes of copy buffer a queue may lock before deep queues get smaller per-tag buffers.
const COPY_ARENA_BUDGET: u64 = 128 << 20;
/// The smallest per-tag buffer a deep queue gets (larger requests are split by the kernel).
const COPY_MIN_IO_BYTES: u32 = 16 << 10;

/// The maximum I/O size for a copy-mode queue of `depth` tags: `asked` while depth x asked fits
/// the per-queue budget (depth <= 256 at 512 KiB), else the largest power of two that does,
/// but not under 16 KiB. Without it depth 4096 would lock 2 GiB per queue; with it, 128 MiB.
pub fn copy_max_io_bytes(asked: u32, depth: u16) -> u32 {
    let fits = COPY_ARENA_BUDGET / u64::from(depth.max(1));
    if u64::from(asked) <= fits {
        return asked;
    }
    let pow2 = 1u64 << (63 - fits.leading_zeros());
    (pow2 as u32).clamp(COPY_MIN_IO_BYTES.min(asked), asked)
}

/// One line for each way the kernel's geometry differs from what was asked.
fn granted_notices(asked: &DeviceConfig, got: &DeviceConfig) -> Vec<String> {
    let mut out = Vec::new();
    if got.queues != asked.queues {
        let possible = std::fs::read_to_string("/sys/devices/system/cpu/possible")
            .ok()
            .and_then(|s| crate::cpus::parse_cpu_list(&s).ok())
            .map_or(0, |c| c.len());
        out.push(format!(
            "-q {}: this machine has {possible} CPUs, the device has {} queues (the driver gives \
             at most one queue per CPU)",
            asked.queues, got.queues
        ));
    }
    if got.depth != asked.depth {
        out.push(format!("-d {}: the driver granted queue depth {}", asked.depth, got.depth));
    }
    if got.max_io_bytes != asked.max_io_bytes {
        out.push(format!(
            "maximum I/O size: asked {} KiB, the driver granted {} KiB",
            asked.max_io_bytes >> 10,
            got.max_io_bytes >> 10
        ));
    }
    out
}

/// Converts a target's parameters into the driver's.
pub fn ublk_params(p: &TargetParams, max_io_bytes: u32) -> ublk_params {
    let mut out = ublk_params {
        types: UBLK_PARAM_TYPE_BASIC,
        basic: ublk_param_basic {
            attrs: p.attrs,
            logical_bs_shift: p.logical_block.trailing_zeros() as u8,
            physical_bs_shift: p.physical_block.trailing_zeros() as u8,
            io_opt_shift: p.physical_block.trailing_zeros() as u8,
            io_min_shift: p.logical_block.trailing_zeros() as u8,
            max_sectors: max_io_bytes >> 9,
            chunk_sectors: 0,
            dev_sectors: p.size_bytes >> 9,
            virt_boundary_mask: 0,
        },
        ..Default::default()
    };
    if let Some(d) = p.discard {
        out.types |= UBLK_PARAM_TYPE_DISCARD;
        out.discard = ublk_param_discard {
            discard_alignment: 0,
            discard_granularity: d.granularity,
            max_discard_sectors: d.max_discard_sectors,
            max_write_zeroes_sectors: d.max_write_zeroes_sectors,
            max_discard_segments: 1,
            reserved0: 0,
        };
    }
    out
}

/// The driver's integrity parameters for `i`.
pub fn integrity_params(i: &Integrity) -> ublk_param_integrity {
    ublk_param_integrity {
        flags: i.flags,
        max_integrity_segments: 0,
        interval_exp: i.interval_exp,
        metadata_size: i.metadata_size,
        pi_offset: i.pi_offset,
        csum_type: i.csum,
        tag_size: i.tag_size,
        ..Default::default()
    }
}

/// A device served by the service's cores.
pub struct Device {
    ctrl: Control,
    pub info: ublksrv_ctrl_dev_info,
    pub features: u64,
    /// The CPU of the core serving each queue.
    pub queue_cpus: Vec<usize>,
    /// The CPUs whose cores serve each queue's tags (UBLK_F_PER_IO_DAEMON), `queue_cpus`'s
    /// first: tag t of queue q is served on `tag_cpus[q][t % len]`. One CPU each otherwise.
    pub tag_cpus: Vec<Vec<usize>>,
    /// The kernel's CPUs for each queue (GET_QUEUE_AFFINITY).
    pub queue_affinity: Vec<Vec<usize>>,
    pub stats: Option<Arc<StatsRegion>>,
    /// How request data moves and how the queues talk to the driver.
    pub mode: Mode,
    /// `/dev/ublkcN`, closed once every queue has left its core (the driver frees the device,
    /// or marks it QUIESCED, only after that).
    cdev: Option<File>,
    /// Queues seated on cores (each leaves with a report in the pool's departures).
    seated: usize,
    /// How the queues are set up (ring flags, buffers), for the log and `list`.
    pub setup: String,
    /// Where the kernel granted less than was asked (queues, depth, I/O size), one line each.
    pub notices: Vec<String>,
    /// STOP_DEV outlived its wait (backend I/O the cores could not cancel): the kernel still
    /// stops the device; `finish_stop` deletes it once its queues have left.
    stop_pending: bool,
}

/// A `remove` that could not finish.
pub struct Unremoved {
    pub error: Error,
    /// The device, when it is still stopping: give it to `finish_stop` once its queues have
    /// left their cores (they report in the pool's departures).
    pub stopping: Option<Box<Device>>,
}

/// How long a device being stopped may keep requests in flight before its backend operations
/// are cancelled (`UBLK_FAST_DRAIN_LIMIT_S` overrides it, for tests).
const DRAIN_LIMIT: Duration = Duration::from_secs(30);

fn drain_limit() -> Duration {
    crate::limits::from_env("UBLK_FAST_DRAIN_LIMIT_S", DRAIN_LIMIT)
}

/// How long a device's queues may take to leave their cores once the driver ended them.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(30);

/// After QUIESCE_DEV, how long the queues get before the driver is asked again (see
/// `Device::quiesce_and_wait`).
const REQUIESCE_EVERY: Duration = Duration::from_millis(500);

/// PER_IO_DAEMON: the CPUs serving each queue's tags, its own core (`primary`) first, then
/// the device's CPUs in the queue's kernel affinity that are no queue's own core and not yet
/// given to another queue, at most `depth` in all. A device with fewer queues than CPUs is
/// so served by all of them (one queue: every one of its CPUs), and no CPU gets two queues'
/// extra shares.
fn spread_tags(
    cpus: &[usize],
    affinity: &[Vec<usize>],
    primary: &[usize],
    depth: u16,
) -> Vec<Vec<usize>> {
    let mut given: Vec<usize> = primary.to_vec();
    affinity
        .iter()
        .zip(primary)
        .map(|(aff, &own)| {
            let mut v = vec![own];
            for &c in cpus {
                if v.len() >= usize::from(depth) {
                    break;
                }
                if aff.contains(&c) && !given.contains(&c) {
                    given.push(c);
                    v.push(c);
                }
            }
            v
        })
        .collect()
}

/// Waits (10 s at most) until this process may read and write `/dev/ublkcN`: for an
/// unprivileged device, until udev has given the node to its owner.
fn wait_for_access(id: u32) -> Result<()> {
    let path =
        std::ffi::CString::new(format!("/dev/ublkc{id}")).map_err(|_| Error::invalid("path"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    // SAFETY: access only reads the NUL-terminated path.
    while unsafe { libc::access(path.as_ptr(), libc::R_OK | libc::W_OK) } != 0 {
        if Instant::now() > deadline {
            return Err(Error::invalid(format!(
                "/dev/ublkc{id} was not given to you within 10 s: udev must run with dist/60-ublk-fast.rules installed"
            ))
            .dev(id));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Opens `/dev/ublkcN`, waiting briefly for devtmpfs/udev to create the node (an
/// unprivileged device's hand-over to its owner was waited for by `wait_for_access`).
fn open_cdev(id: u32) -> Result<File> {
    let path = format!("/dev/ublkc{id}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => return Ok(f),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(Error::os("open /dev/ublkcN", e).dev(id)),
        }
    }
}

impl Device {
    /// Creates, configures and starts a device served by `target` on `pool`'s cores.
    /// `on_added` hears the id as soon as the kernel assigned it. On failure nothing is left:
    /// the device is stopped and deleted.
    pub fn create(
        cfg: &DeviceConfig,
        target: Arc<dyn Target>,
        pool: &CorePool,
        on_added: &mut dyn FnMut(u32),
    ) -> Result<Device> {
        let mut ctrl = Control::open()?;
        let features = ctrl.features()?;
        let integrity = target.integrity();
        let unprivileged = crate::ctrl::unprivileged();
        if unprivileged {
            check_unprivileged(cfg, features, integrity.is_some())?;
        }
        let mode = match integrity {
            // The driver refuses zero copy for unprivileged devices (check_unprivileged said
            // so where it was asked for).
            None if unprivileged => {
                let copy = DeviceConfig { zero_copy: ZeroCopy::Off, ..cfg.clone() };
                resolve_mode(&copy, features, false)?
            }
            None => resolve_mode(cfg, features, target.supports_zero_copy())?,
            Some(_) => {
                if features & UBLK_F_INTEGRITY == 0 {
                    return Err(Error::unsupported(
                        "--metadata-size: this kernel's ublk driver does not offer INTEGRITY (Linux 7.0+ built with CONFIG_BLK_DEV_INTEGRITY); leave it out",
                    ));
                }
                if cfg.zero_copy == ZeroCopy::On {
                    return Err(Error::invalid(
                        "--metadata-size moves data by user copy: leave --zero-copy=on out",
                    ));
                }
                // The driver hands metadata over only by user copy.
                let uc = DeviceConfig { user_copy: true, ..cfg.clone() };
                resolve_mode(&uc, features, false)?
            }
        };
        // Copy modes lock depth x max I/O per queue: deep queues get smaller buffers.
        let mut asked = DeviceConfig {
            max_io_bytes: if mode.uses_arena() {
                copy_max_io_bytes(cfg.max_io_bytes, cfg.depth)
            } else {
                cfg.max_io_bytes
            },
            ..cfg.clone()
        };
        // What the target's backend can take.
        let mut target_notices = Vec::new();
        if asked.queues > target.max_queues() {
            target_notices.push(format!(
                "-q {}: the {} target serves at most {} queues here, the device has {}",
                asked.queues,
                target.name(),
                target.max_queues(),
                target.max_queues()
            ));
            asked.queues = target.max_queues().max(1);
        }
        if let Some(m) = target.max_io_bytes() {
            asked.max_io_bytes = asked.max_io_bytes.min(m.max(4096));
        }
        if mode.uses_arena() {
            if unprivileged {
                // Its user cannot raise RLIMIT_MEMLOCK: smaller requests instead of a refusal.
                if let Some(n) = fit_memlock(&mut asked) {
                    target_notices.push(n);
                }
            }
            check_memlock(&asked)?;
        }
        // UPDATE_SIZE where offered: `resize` works on every device.
        let mut flags =
            ((UBLK_F_CMD_IOCTL_ENCODE | UBLK_F_UPDATE_SIZE) & features) | mode.flags(features);
        if unprivileged {
            flags |= UBLK_F_UNPRIVILEGED_DEV;
        }
        if cfg.no_part_scan {
            if features & UBLK_F_NO_AUTO_PART_SCAN == 0 {
                return Err(Error::unsupported(
                    "--no-part-scan: this kernel's ublk driver does not offer NO_AUTO_PART_SCAN (Linux 7.0+)",
                ));
            }
            flags |= UBLK_F_NO_AUTO_PART_SCAN;
        }
        let want = cfg.recovery.flags();
        if want & !features != 0 {
            return Err(Error::unsupported(format!(
                "--recovery: this kernel's ublk driver does not offer {}",
                feature_names(want & !features).join(", ")
            )));
        }
        if integrity.is_some() {
            flags |= UBLK_F_INTEGRITY;
        }
        flags |= want;
        if want != 0 {
            // Lets an operator hand the device to a new service without an I/O error.
            flags |= UBLK_F_QUIESCE & features;
        }
        let mut info = ublksrv_ctrl_dev_info {
            nr_hw_queues: asked.queues,
            queue_depth: asked.depth,
            max_io_buf_bytes: asked.max_io_bytes,
            dev_id: cfg.dev_id.unwrap_or(u32::MAX),
            flags,
            ..Default::default()
        };
        ctrl.add_dev(&mut info)?;
        on_added(info.dev_id);
        if unprivileged {
            // The driver checks every later command against our access to the char node,
            // which udev gives us a moment after ADD_DEV.
            if let Err(e) = wait_for_access(info.dev_id) {
                let mut dev = Device::new(ctrl, info, features, mode);
                dev.teardown(pool);
                return Err(e);
            }
        }
        // From here on the kernel's answer is the geometry, not what was asked.
        let granted = asked.granted(&info);
        let mut dev = Device::new(ctrl, info, features, mode);
        dev.notices = target_notices;
        dev.notices.extend(granted_notices(&asked, &granted));
        let mut params = ublk_params(&target.params(), granted.max_io_bytes);
        if let Some(i) = integrity {
            if dev.info.flags & UBLK_F_INTEGRITY == 0 {
                // ADD_DEV drops what the kernel was built without.
                dev.teardown(pool);
                return Err(Error::unsupported(
                    "--metadata-size: this kernel was built without block integrity (CONFIG_BLK_DEV_INTEGRITY); leave it out",
                ));
            }
            params.types |= UBLK_PARAM_TYPE_INTEGRITY;
            params.integrity = integrity_params(&i);
        }
        let r = dev
            .ctrl
            .set_params(dev.info.dev_id, &params)
            .and_then(|()| dev.bring_up(&granted, target, pool, false));
        match r {
            Ok(()) => Ok(dev),
            Err(e) => {
                dev.teardown(pool);
                Err(e)
            }
        }
    }

    /// Takes over device `id`, whose server died or handed it over (QUIESCED or FAIL_IO):
    /// START_USER_RECOVERY, the queues fetch every tag on `pool`'s cores, END_USER_RECOVERY.
    /// On failure the device is left as it was (its data is the user's), never deleted.
    pub fn recover(
        cfg: &DeviceConfig,
        target: Arc<dyn Target>,
        id: u32,
        pool: &CorePool,
    ) -> Result<Device> {
        let mut ctrl = Control::open()?;
        let features = ctrl.features()?;
        let info = ctrl.dev_info(id)?;
        if info.flags & UBLK_F_USER_RECOVERY == 0 {
            return Err(Error::invalid(format!(
                "device {id} was not created with --recovery: it cannot be taken over"
            )));
        }
        if info.state == UBLK_S_DEV_LIVE {
            // The kernel may not have noticed the old server's death yet: wait a little.
            let deadline = Instant::now() + Duration::from_secs(10);
            while ctrl.dev_info(id)?.state == UBLK_S_DEV_LIVE {
                if Instant::now() > deadline {
                    return Err(Error::invalid(format!(
                        "device {id} is LIVE: its server still serves it (stop it first)"
                    )));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        // EBUSY until the old server's files are closed.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match ctrl.start_user_recovery(id) {
                Ok(()) => break,
                Err(e) if e.raw_errno() == libc::EBUSY && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(e),
            }
        }
        // The kernel's geometry and mode win over the saved configuration.
        let mode = Mode::from_flags(info.flags);
        let cfg = cfg.granted(&info);
        if mode.uses_arena() {
            check_memlock(&cfg)?;
        }
        let mut dev = Device::new(ctrl, info, features, mode);
        match dev.bring_up(&cfg, target, pool, true) {
            Ok(()) => Ok(dev),
            Err(e) => {
                // Leave it for another try: its queues leave the cores, the file closes, and
                // the kernel keeps the device waiting (QUIESCED).
                dev.let_go(pool);
                Err(e)
            }
        }
    }

    /// A device known to the kernel, before its queues exist.
    fn new(ctrl: Control, info: ublksrv_ctrl_dev_info, features: u64, mode: Mode) -> Self {
        Device {
            ctrl,
            info,
            features,
            queue_cpus: Vec::new(),
            tag_cpus: Vec::new(),
            queue_affinity: Vec::new(),
            stats: None,
            mode,
            cdev: None,
            seated: 0,
            setup: String::new(),
            notices: Vec::new(),
            stop_pending: false,
        }
    }

    /// Whether the kernel still has this device and will hold it for a new server
    /// (`--recovery`): then its record must survive.
    pub fn awaits_recovery(&mut self) -> bool {
        let id = self.info.dev_id;
        self.ctrl.dev_info(id).is_ok_and(|i| i.flags & UBLK_F_USER_RECOVERY != 0)
    }

    pub fn id(&self) -> u32 {
        self.info.dev_id
    }

    /// Opens `/dev/ublkcN`, seats every queue on its core (each fetches every tag), then
    /// START_DEV, or END_USER_RECOVERY when taking over a device.
    fn bring_up(
        &mut self,
        cfg: &DeviceConfig,
        target: Arc<dyn Target>,
        pool: &CorePool,
        recovering: bool,
    ) -> Result<()> {
        let id = self.info.dev_id;
        let cdev = open_cdev(id)?;
        let cdev_fd = cdev.as_raw_fd();
        self.cdev = Some(cdev);
        let mut affinity = Vec::with_capacity(usize::from(cfg.queues));
        for q in 0..cfg.queues {
            affinity.push(self.ctrl.queue_affinity(id, q)?);
        }
        self.queue_cpus = place_queues(&cfg.cpus, &affinity);
        // Spread a queue's tags over more cores only where the driver binds each tag to the
        // thread that fetched it, the commands are per tag, and the target allows it.
        let spread = self.features & UBLK_F_PER_IO_DAEMON != 0
            && !self.mode.batch()
            && target.spreads_tags()
            && cfg.spread_tags;
        self.tag_cpus = if spread {
            spread_tags(&cfg.cpus, &affinity, &self.queue_cpus, cfg.depth)
        } else {
            self.queue_cpus.iter().map(|&c| vec![c]).collect()
        };
        self.queue_affinity = affinity;
        let stats_path = cfg.stats_dir.as_ref().map(|d| d.join(format!("{id}.stats")));
        if let Some(d) = &cfg.stats_dir {
            std::fs::create_dir_all(d).map_err(|e| Error::os("create stats dir", e))?;
        }
        let shards = self.tag_cpus.iter().map(Vec::len).max().unwrap_or(1) as u16;
        let stats =
            Arc::new(StatsRegion::create_sharded(stats_path.as_deref(), cfg.queues, shards)?);
        self.stats = Some(Arc::clone(&stats));
        for (q, k) in (0..cfg.queues)
            .flat_map(|q| (0..self.tag_cpus[usize::from(q)].len() as u16).map(move |k| (q, k)))
        {
            let qcfg = QueueConfig {
                dev_id: id,
                q,
                depth: cfg.depth,
                max_io_bytes: cfg.max_io_bytes,
                cdev_fd,
                files: target.files(),
                stats: Arc::clone(&stats),
                mode: self.mode,
                poll_us: cfg.poll_us,
                slow_io_ms: cfg.slow_io_ms,
                integrity: target.integrity().filter(|_| self.info.flags & UBLK_F_INTEGRITY != 0),
                shard: k,
                shards: self.tag_cpus[usize::from(q)].len() as u16,
            };
            let cpu = self.tag_cpus[usize::from(q)][usize::from(k)];
            let setup = pool.add_queue(cpu, qcfg, Arc::clone(&target)).map_err(|e| e.dev(id))?;
            self.seated += 1;
            if self.setup.is_empty() {
                self.setup = setup;
            }
        }
        // SAFETY: getpid has no preconditions.
        let pid = unsafe { libc::getpid() };
        if recovering {
            self.ctrl.end_user_recovery(id, pid)?;
        } else {
            self.ctrl.start_dev(id, pid)?;
        }
        self.info = self.ctrl.dev_info(id)?;
        Ok(())
    }

    /// Waits until every seated queue has left its core, then closes `/dev/ublkcN`. Returns
    /// the first error a queue left with.
    fn wait_left(&mut self, pool: &CorePool) -> Result<()> {
        let id = self.info.dev_id;
        let gone = pool.departures().wait(id, self.seated, LEAVE_TIMEOUT);
        self.left(gone)
    }

    /// The queues left (or the wait for them ended): closes `/dev/ublkcN`; the first error a
    /// queue left with, if any.
    fn left(&mut self, gone: Result<Vec<crate::core::Gone>>) -> Result<()> {
        self.seated = 0;
        self.cdev = None;
        let gone = gone?;
        match gone.into_iter().find_map(|g| g.error) {
            Some(e) => Err(Error::failed(e)),
            None => Ok(()),
        }
    }

    /// Lets the device's queues go after a failed take-over: stopping the queues without
    /// stopping the device needs the driver's help, which only QUIESCE_DEV gives.
    fn let_go(&mut self, pool: &CorePool) {
        if self.seated > 0 {
            let _ = self.quiesce_and_wait(pool, 1000);
        }
        self.cdev = None;
    }

    /// STOP_DEV (the driver waits for the I/O in flight, which the cores finish, then aborts
    /// the fetches), the queues leave their cores, `/dev/ublkcN` closes, DEL_DEV.
    fn teardown(&mut self, pool: &CorePool) -> Option<Error> {
        let id = self.info.dev_id;
        let mut err = None;
        // STOP_DEV waits for the requests in flight: a stuck backend (a hung file system, a
        // vanished server, an injected delay) must not hold it forever. Past the drain limit
        // the cores cancel the device's backend operations, which fails those requests.
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watch = {
            let done = Arc::clone(&done);
            let cancel = pool.canceller(id);
            let limit = drain_limit();
            std::thread::Builder::new().name("drain-watch".into()).spawn(move || {
                let t = Instant::now();
                while !done.load(std::sync::atomic::Ordering::Acquire) {
                    if t.elapsed() >= limit {
                        log::warn!(
                            "dev {id}: I/O still in flight after {} s of stopping: cancelling its backend operations (those requests fail)",
                            limit.as_secs()
                        );
                        cancel();
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        };
        if let Err(e) = self.ctrl.stop_dev(id) {
            if e.kind() == Some(crate::error::Kind::Timeout) {
                // The kernel still works on it; waiting for the queues or deleting (which
                // stops first, behind the same lock) would hang here too.
                done.store(true, std::sync::atomic::Ordering::Release);
                self.stop_pending = true;
                log::warn!("{e}; dev {id} is deleted once its I/O completes");
                return Some(e);
            }
            // ENODEV/ENOENT: somebody (ublk-fast del) removed it already.
            if !matches!(e.raw_errno(), libc::ENODEV | libc::ENOENT) {
                err = Some(e);
            }
        }
        if let Err(e) = self.wait_left(pool) {
            err.get_or_insert(e);
        }
        done.store(true, std::sync::atomic::Ordering::Release);
        if let Ok(w) = watch {
            let _ = w.join();
        }
        // Not the waiting DEL_DEV: an application holding /dev/ublkbN open must not be able to
        // hang the service.
        if let Err(e) = self.ctrl.del_dev_nowait(id) {
            if !matches!(e.raw_errno(), libc::ENODEV | libc::ENOENT) {
                err.get_or_insert(e);
            }
        }
        err
    }

    /// `del --safe`: stops the device only if nobody has it open (TRY_STOP_DEV), then deletes
    /// it. While it is open, EBUSY and nothing changed: the device is given back.
    pub fn remove_if_unused(
        mut self,
        pool: &CorePool,
    ) -> std::result::Result<(), Box<(Self, Error)>> {
        let id = self.info.dev_id;
        if self.info.flags & UBLK_F_SAFE_STOP_DEV == 0 {
            let e = Error::unsupported(
                "del --safe: this kernel's ublk driver does not offer SAFE_STOP_DEV",
            );
            return Err(Box::new((self, e)));
        }
        if let Err(e) = self.ctrl.try_stop_dev(id) {
            return Err(Box::new((self, e)));
        }
        match self.teardown(pool) {
            Some(e) => Err(Box::new((self, e))),
            None => Ok(()),
        }
    }

    /// `resize`: the device's capacity becomes `bytes` (UPDATE_SIZE), while it serves.
    pub fn resize(&mut self, bytes: u64) -> Result<()> {
        if self.info.flags & UBLK_F_UPDATE_SIZE == 0 {
            return Err(Error::unsupported(
                "resize: this kernel's ublk driver does not offer UPDATE_SIZE (Linux 6.16+)",
            ));
        }
        self.ctrl.update_size(self.info.dev_id, bytes >> 9)
    }

    /// Stops and deletes the device.
    pub fn remove(mut self, pool: &CorePool) -> std::result::Result<(), Unremoved> {
        match self.teardown(pool) {
            Some(error) if self.stop_pending => {
                Err(Unremoved { error, stopping: Some(Box::new(self)) })
            }
            Some(error) => Err(Unremoved { error, stopping: None }),
            None => Ok(()),
        }
    }

    /// The late end of a `remove` whose STOP_DEV outlived its wait: the queues have left
    /// (their departures were taken); close `/dev/ublkcN` and delete the device.
    pub fn finish_stop(mut self) -> Result<()> {
        self.seated = 0;
        self.cdev = None;
        match self.ctrl.del_dev_nowait(self.info.dev_id) {
            Err(e) if !matches!(e.raw_errno(), libc::ENODEV | libc::ENOENT) => Err(e),
            _ => Ok(()),
        }
    }

    /// Hands the device over (UBLK_F_QUIESCE): the driver parks new I/O, waits up to
    /// `timeout_ms` for an idle tag on every queue, and aborts the fetches; once the queues
    /// left and `/dev/ublkcN` is closed the device is QUIESCED, for `recover` (here or in a
    /// new service). On EBUSY (I/O did not drain) nothing changed: the device still serves.
    pub fn quiesce(&mut self, pool: &CorePool, timeout_ms: u64) -> Result<()> {
        self.quiesce_and_wait(pool, timeout_ms)
    }

    /// QUIESCE_DEV, then waits for the queues to leave their cores, asking again every
    /// 500 ms. In the driver's code the abort pass skips a tag whose request is being served;
    /// the fetch it re-arms on commit is aborted only by the server's ring exiting, which a
    /// shared core ring never does. New requests are requeued while the device is quiesced, so
    /// that fetch stays idle and a second pass aborts it. (Not reproduced on the 7.3 guest; a
    /// CI run saw one queue of a device under load not end within 30 s of one QUIESCE_DEV.)
    fn quiesce_and_wait(&mut self, pool: &CorePool, timeout_ms: u64) -> Result<()> {
        let id = self.info.dev_id;
        self.ctrl.quiesce_dev(id, timeout_ms)?;
        let deadline = Instant::now() + LEAVE_TIMEOUT;
        let mut asked = 1;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let step = left.min(REQUIESCE_EVERY);
            match pool.departures().wait(id, self.seated, step) {
                Ok(gone) => {
                    if asked > 1 {
                        log::info!("dev {id}: its queues ended after QUIESCE_DEV no. {asked}");
                    }
                    return self.left(Ok(gone));
                }
                Err(_) if step < left => {
                    asked += 1;
                    if let Err(e) = self.ctrl.quiesce_dev(id, timeout_ms) {
                        log::warn!("dev {id}: QUIESCE_DEV asked again: {e}");
                    }
                }
                Err(_) => {
                    return self.left(Err(Error::timeout(format!(
                        "device {id}: its queues did not all end within {LEAVE_TIMEOUT:?} of \
                         QUIESCE_DEV (asked {asked} times)"
                    ))));
                }
            }
        }
    }

    /// The device's queues left on their own (it was stopped or deleted from outside, or a
    /// queue failed): close our end so a pending DEL_DEV can finish. Deletes the device only
    /// if a queue failed.
    pub fn release(&mut self, failed: bool) {
        self.seated = 0;
        self.cdev = None;
        if failed {
            // A queue failed on its own rather than being stopped: nothing serves this device
            // any more, so remove it instead of leaving it to hang its users.
            let id = self.info.dev_id;
            let _ = self.ctrl.stop_dev(id);
            let _ = self.ctrl.del_dev_nowait(id);
        }
    }
}

/// Without CAP_IPC_LOCK, the locked and registered copy buffers count against RLIMIT_MEMLOCK:
/// check before creating anything, and name the limit needed.
/// The RLIMIT_MEMLOCK this process's locked copy buffers must fit, in bytes; `None` when
/// nothing bounds them (CAP_IPC_LOCK, an infinite limit, or one that cannot be read).
fn memlock_limit() -> Option<u64> {
    if has_cap_ipc_lock() {
        return None;
    }
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the local struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } != 0
        || lim.rlim_cur == libc::RLIM_INFINITY
    {
        return None;
    }
    Some(lim.rlim_cur)
}

fn check_memlock(cfg: &DeviceConfig) -> Result<()> {
    let need = arena_len(cfg.depth, cfg.max_io_bytes) as u64 * u64::from(cfg.queues);
    let Some(limit) = memlock_limit() else { return Ok(()) };
    if limit < need {
        return Err(Error::exhausted(format!(
            "RLIMIT_MEMLOCK is {} KiB but {} queues x depth {} of copy buffers need {} KiB locked: \
             raise it (ulimit -l {}, or LimitMEMLOCK= for a service), lower --depth/--queues, or use \
             --zero-copy",
            limit >> 10,
            cfg.queues,
            cfg.depth,
            need >> 10,
            need.div_ceil(1024)
        )));
    }
    Ok(())
}

/// What an unprivileged device cannot have (the driver refuses it, or drops it in silence):
/// said before anything is created.
fn check_unprivileged(cfg: &DeviceConfig, features: u64, integrity: bool) -> Result<()> {
    if features & UBLK_F_UNPRIVILEGED_DEV == 0 {
        return Err(Error::unsupported(
            "this kernel's ublk driver does not offer UNPRIVILEGED_DEV: run as root",
        ));
    }
    let refused = if cfg.zero_copy == ZeroCopy::On {
        Some("--zero-copy=on")
    } else if cfg.user_copy {
        Some("--user-copy")
    } else if integrity {
        Some("--metadata-size (it moves metadata by user copy)")
    } else if cfg.recovery != Recovery::None {
        Some("--recovery")
    } else {
        None
    };
    match refused {
        Some(what) => Err(Error::invalid(format!(
            "{what}: the ublk driver allows it only for devices created by root; leave it out or run as root"
        ))),
        None => Ok(()),
    }
}

/// Shrinks the maximum request size until the copy buffers of `cfg`'s queues fit what this
/// process may still lock (RLIMIT_MEMLOCK less what it has pinned already: io_uring charges
/// registered buffers there). A notice when it did; `check_memlock` refuses what cannot fit.
fn fit_memlock(cfg: &mut DeviceConfig) -> Option<String> {
    let limit = memlock_limit()?;
    let pinned = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let kb = s.lines().find_map(|l| l.strip_prefix("VmPin:"))?.trim().strip_suffix("kB")?;
            kb.trim().parse::<u64>().ok()
        })
        .unwrap_or(0)
        << 10;
    let left = limit.saturating_sub(pinned);
    let asked = cfg.max_io_bytes;
    while arena_len(cfg.depth, cfg.max_io_bytes) as u64 * u64::from(cfg.queues) > left
        && cfg.max_io_bytes > 4096
    {
        cfg.max_io_bytes /= 2;
    }
    (cfg.max_io_bytes != asked).then(|| {
        format!(
            "requests are at most {} KiB: RLIMIT_MEMLOCK leaves {} KiB for {} queues x depth {} of copy buffers (raise LimitMEMLOCK= or ulimit -l for larger ones)",
            cfg.max_io_bytes >> 10,
            left >> 10,
            cfg.queues,
            cfg.depth
        )
    })
}

/// Whether this process may lock memory without limit (CAP_IPC_LOCK in its effective set).
fn has_cap_ipc_lock() -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    has_capability(CAP_IPC_LOCK)
}

/// Whether capability number `cap` is in this process's effective set.
pub(crate) fn has_capability(cap: u32) -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let hex = s.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim().to_string();
            u64::from_str_radix(&hex, 16).ok()
        })
        .is_some_and(|caps| caps & (1u64 << cap) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_buffers_shrink_only_for_deep_queues() {
        let max = DeviceConfig::DEFAULT_MAX_IO_BYTES;
        assert_eq!(copy_max_io_bytes(max, 1), max);
        assert_eq!(copy_max_io_bytes(max, 128), max);
        assert_eq!(copy_max_io_bytes(max, 256), max);
        assert_eq!(copy_max_io_bytes(max, 512), 256 << 10);
        assert_eq!(copy_max_io_bytes(max, 1024), 128 << 10);
        assert_eq!(copy_max_io_bytes(max, 4096), 32 << 10);
        assert_eq!(copy_max_io_bytes(4096, 4096), 4096);
    }

    #[test]
    fn tags_spread_over_the_cpus_no_queue_has() {
        // One queue on four CPUs: all four serve it.
        let all = vec![0, 1, 2, 3];
        assert_eq!(
            spread_tags(&all, std::slice::from_ref(&all), &[2], 128),
            vec![vec![2, 0, 1, 3]]
        );
        // Two queues, each with two CPUs of its own: each gets its second.
        let aff = vec![vec![0, 1], vec![2, 3]];
        assert_eq!(spread_tags(&all, &aff, &[0, 2], 128), vec![vec![0, 1], vec![2, 3]]);
        // As many queues as CPUs: nothing to spread.
        let aff: Vec<Vec<usize>> = all.iter().map(|&c| vec![c]).collect();
        assert_eq!(spread_tags(&all, &aff, &all, 128), aff);
        // Never more shards than tags; only the device's CPUs.
        assert_eq!(spread_tags(&[0, 1, 2], std::slice::from_ref(&all), &[0], 2), vec![vec![0, 1]]);
        assert_eq!(spread_tags(&[1], std::slice::from_ref(&all), &[1], 128), vec![vec![1]]);
    }

    #[test]
    fn geometry_is_the_kernels() {
        let asked = DeviceConfig {
            dev_id: None,
            queues: 4,
            depth: 128,
            cpus: vec![0, 1],
            max_io_bytes: 512 << 10,
            stats_dir: None,
            zero_copy: ZeroCopy::Auto,
            recovery: Recovery::None,
            user_copy: false,
            batch: false,
            no_part_scan: false,
            spread_tags: false,
            poll_us: 0,
            slow_io_ms: 5000,
        };
        let info = ublksrv_ctrl_dev_info {
            nr_hw_queues: 2,
            queue_depth: 128,
            max_io_buf_bytes: 512 << 10,
            ..Default::default()
        };
        let got = asked.granted(&info);
        assert_eq!((got.queues, got.depth, got.max_io_bytes), (2, 128, 512 << 10));
        let n = granted_notices(&asked, &got);
        assert_eq!(n.len(), 1, "{n:?}");
        assert!(n[0].starts_with("-q 4: this machine has "), "{}", n[0]);
        assert!(n[0].contains("the device has 2 queues"), "{}", n[0]);
    }
}
