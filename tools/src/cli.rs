//! Command-line shape, in the style of ublksrv's `ublk`, rublk and kublk:
//! `ublk-fast [OPTIONS] <TARGET> [ARGS]` (or `ublk-fast add ...`), `list`, `del`, `features`.

use clap::{Args, Parser, Subcommand};

/// The longest `quiesce --timeout-ms`: the kernel's wait, plus the service's own bound on the
/// command, stays within what a client waits for an answer.
pub const QUIESCE_MAX_MS: u64 = 60_000;

#[derive(Parser, Debug)]
#[command(name = "ublk-fast", version, about = "A fast Linux ublk server", long_about = None)]
#[command(subcommand_value_name = "COMMAND|TARGET")]
pub struct Cli {
    #[command(flatten)]
    pub add: AddOpts,
    #[command(subcommand)]
    pub cmd: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a device (the same as naming the target directly)
    Add {
        #[command(flatten)]
        opts: AddOpts,
        #[command(subcommand)]
        target: TargetCmd,
    },
    /// List ublk devices
    List {
        /// Only this device
        #[arg(short = 'n', long = "id", alias = "number")]
        id: Option<u32>,
        /// JSON array instead of the two-line layout
        #[arg(long)]
        json: bool,
        /// Also each queue's CPUs, the flags' names and the counters
        #[arg(short = 'v', long)]
        verbose: bool,
        /// Every device (what `list` shows anyway; ublksrv's spelling)
        #[arg(short = 'a', long = "all", hide = true)]
        all: bool,
    },
    /// Stop and delete devices
    Del {
        /// The device to delete
        #[arg(
            short = 'n',
            long = "id",
            alias = "number",
            required_unless_present = "all",
            conflicts_with = "all"
        )]
        id: Option<u32>,
        /// Every ublk device
        #[arg(short = 'a', long)]
        all: bool,
        /// Only if nobody has it open (no mounted filesystem, no program holding it)
        #[arg(long)]
        safe: bool,
        /// With --all: also the devices of other ublk servers
        #[arg(long, requires = "all")]
        all_servers: bool,
    },
    /// Change a device's size while it serves (UBLK_F_UPDATE_SIZE); `loop` needs its backing
    /// store to hold the new size first
    Resize {
        #[arg(short = 'n', long = "id", alias = "number")]
        id: u32,
        /// The new size, e.g. 2G
        size: String,
    },
    /// Take over a device created with --recovery whose service died or that was quiesced
    Recover {
        /// The device to take over
        #[arg(short = 'n', long = "id")]
        id: u32,
        /// Serve in the foreground
        #[arg(long)]
        foreground: bool,
    },
    /// Hand a --recovery device over: the kernel parks its I/O and the service lets it go; then
    /// `ublk-fast recover` takes it back (here or in the next service)
    Quiesce {
        #[arg(short = 'n', long = "id")]
        id: u32,
        /// Give up if the I/O in flight has not drained by then (1 ms to 1 minute)
        #[arg(long, value_name = "MS", default_value_t = 10_000,
              value_parser = clap::value_parser!(u64).range(1..=QUIESCE_MAX_MS))]
        timeout_ms: u64,
    },
    /// Print the ublk driver's features
    Features {
        #[arg(long)]
        json: bool,
    },
    /// Run the node service: one pinned thread and ring per CPU, serving every device (device
    /// commands start one when none runs)
    Serve(ServeArgs),
    /// Delete every device and stop the service
    Shutdown,
    /// Write the man pages (into DIR) or a shell's completions (to stdout)
    #[command(hide = true, subcommand)]
    Generate(Generate),
    /// For udev (dist/60-ublk-fast.rules): print "UID GID" of the user who created the
    /// unprivileged device behind node NAME (ublkcN, ublkbN, ublkbNpM); exit 1 for a device
    /// created by root
    #[command(hide = true, name = "udev-owner")]
    UdevOwner {
        /// The kernel's name of the node (udev's %k)
        name: String,
    },
    #[command(flatten)]
    Target(TargetCmd),
}

#[derive(Subcommand, Debug)]
pub enum Generate {
    /// ublk-fast.8 and one page per command
    Man { dir: std::path::PathBuf },
    /// Completions for bash, zsh, fish, elvish or powershell
    Completions { shell: clap_complete::Shell },
}

#[derive(Args, Debug, Default, Clone)]
pub struct ServeArgs {
    /// CPUs to serve on, one core thread each, e.g. 0-7 (default: all online)
    #[arg(long, value_name = "LIST")]
    pub cpus: Option<String>,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics (e.g. 127.0.0.1:9633)
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<String>,
    /// Stay in the foreground (systemd: Type=notify) until SIGTERM
    #[arg(long)]
    pub foreground: bool,
    /// A kernel thread polls the core rings (shared by all) and sleeps after IDLE_MS without
    /// work [IDLE_MS: 1000]
    #[arg(long, value_name = "IDLE_MS", num_args = 0..=1, default_missing_value = "1000",
          require_equals = true,
          value_parser = clap::value_parser!(u32).range(1..=60_000))]
    pub sqpoll: Option<u32>,
    /// Pin the --sqpoll thread to this CPU
    #[arg(long, value_name = "CPU", requires = "sqpoll")]
    pub sqpoll_cpu: Option<u32>,
    /// Exit once no device is served (how device commands start the service)
    #[arg(long, hide = true)]
    pub exit_when_idle: bool,
    /// The service's /proc/self/oom_score_adj: killing it takes every device down [default: -900]
    #[arg(long, value_name = "N", allow_hyphen_values = true,
          value_parser = clap::value_parser!(i32).range(-1000..=1000))]
    pub oom_score_adj: Option<i32>,
}

#[derive(Args, Debug, Default, Clone)]
pub struct AddOpts {
    /// CPUs whose core threads serve the device's queues, e.g. 0-7 or 0,2,4-5 (default: all
    /// of the service's; a command that starts the service starts it on these)
    #[arg(long, value_name = "LIST")]
    pub cpus: Option<String>,
    /// Hardware queues (default: the number of CPUs in --cpus)
    #[arg(short = 'q', long, value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub queues: Option<u16>,
    /// Queue depth [default: 128]
    #[arg(short = 'd', long, value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub depth: Option<u16>,
    /// Device id (default: the kernel picks)
    #[arg(short = 'n', long = "id", alias = "number",
          value_parser = clap::value_parser!(u32).range(0..=1_048_575))]
    pub id: Option<u32>,
    /// Start the service in the foreground with this device; on SIGINT/SIGTERM delete it
    #[arg(long)]
    pub foreground: bool,
    /// Serve requests from their own pages (UBLK_F_AUTO_BUF_REG, Linux 6.16+) [default: auto]
    #[arg(long, value_name = "MODE")]
    pub zero_copy: Option<ZeroCopyArg>,
    /// Let the device outlive its service: the next one takes it over [MODE: requeue]
    #[arg(long, value_name = "MODE", num_args = 0..=1, default_missing_value = "requeue",
          require_equals = true)]
    pub recovery: Option<RecoveryArg>,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics (when this command starts the
    /// service)
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<String>,
    /// A kernel thread polls the core rings and sleeps after IDLE_MS without work (when this
    /// command starts the service) [IDLE_MS: 1000]
    #[arg(long, value_name = "IDLE_MS", num_args = 0..=1, default_missing_value = "1000",
          require_equals = true,
          value_parser = clap::value_parser!(u32).range(1..=60_000))]
    pub sqpoll: Option<u32>,
    /// Move request data with reads and writes on /dev/ublkcN (UBLK_F_USER_COPY, Linux 6.5+)
    /// instead of letting the driver copy it
    #[arg(long, short_alias = 'u')]
    pub user_copy: bool,
    /// Talk to the driver with per-queue batch commands (UBLK_F_BATCH_IO, Linux 7.0+): one
    /// multishot fetch per queue and one commit per loop turn instead of one command per I/O
    #[arg(long, short_alias = 'b')]
    pub batch_io: bool,
    /// The kernel does not scan the device for partitions when it starts
    /// (UBLK_F_NO_AUTO_PART_SCAN)
    #[arg(long)]
    pub no_part_scan: bool,
    /// Serve each queue's tags on several cores: a device with fewer queues than CPUs spreads
    /// a queue's tags over the CPUs of its kernel affinity that serve no other queue
    /// (UBLK_F_PER_IO_DAEMON, Linux 6.16+; null, loop and stripe; not with --batch-io)
    #[arg(long)]
    pub spread_tags: bool,
    /// ublksrv/kublk's `-z`: --zero-copy=on
    #[arg(short = 'z', hide = true)]
    pub z: bool,
    /// ublksrv's `-r 0|1`: recovery off/on (requeue unless -i 1 or -e 1)
    #[arg(short = 'r', hide = true, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub r: Option<u8>,
    /// ublksrv's `-i 0|1`: with -r 1, reissue in-flight I/O
    #[arg(short = 'i', hide = true, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub i: Option<u8>,
    /// ublksrv's `-e 0|1`: with -r 1, fail I/O while no server runs
    #[arg(short = 'e', hide = true, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub e: Option<u8>,
    /// Pin the --sqpoll thread to this CPU (needs --sqpoll, which may stand on either side of
    /// the target name, so the pair is checked once the options are merged)
    #[arg(long, value_name = "CPU")]
    pub sqpoll_cpu: Option<u32>,
    /// Latency mode: after a busy loop turn, the cores serving the device keep reaping for up
    /// to this many µs before they sleep, so a request arriving then costs no wake-up
    #[arg(long, value_name = "US", value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub poll_us: Option<u32>,
    /// Log (once each) and count requests outstanding longer than this many ms [default: 5000;
    /// 0: never]
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u32).range(0..=3_600_000))]
    pub slow_io_ms: Option<u32>,
}

impl AddOpts {
    /// `--zero-copy on` (or `-z`): asked for, not merely allowed.
    pub fn zero_copy_on(&self) -> bool {
        self.zero_copy == Some(ZeroCopyArg::On)
    }

    pub fn is_empty(&self) -> bool {
        self.cpus.is_none()
            && self.queues.is_none()
            && self.depth.is_none()
            && self.id.is_none()
            && !self.foreground
            && self.metrics.is_none()
            && self.zero_copy.is_none()
            && self.recovery.is_none()
            && self.sqpoll.is_none()
            && !self.user_copy
            && !self.batch_io
            && self.sqpoll_cpu.is_none()
            && self.poll_us.is_none()
            && self.slow_io_ms.is_none()
            && !self.z
            && !self.no_part_scan
            && !self.spread_tags
            && self.r.is_none()
            && self.i.is_none()
            && self.e.is_none()
    }

    /// `self` with the options `other` sets laid over it; an option set in both places to
    /// different values is a conflict, named in the error.
    pub fn merged(self, other: AddOpts) -> Result<AddOpts, String> {
        fn one<T: PartialEq + std::fmt::Debug>(
            name: &str,
            a: Option<T>,
            b: Option<T>,
        ) -> Result<Option<T>, String> {
            match (a, b) {
                (Some(a), Some(b)) if a != b => {
                    let show = |v: &T| format!("{v:?}").trim_matches('"').to_lowercase();
                    Err(format!(
                        "{name} is given twice, as {} and {}: give it once",
                        show(&a),
                        show(&b)
                    ))
                }
                (a, b) => Ok(b.or(a)),
            }
        }
        Ok(AddOpts {
            cpus: one("--cpus", self.cpus, other.cpus)?,
            queues: one("--queues", self.queues, other.queues)?,
            depth: one("--depth", self.depth, other.depth)?,
            id: one("--id", self.id, other.id)?,
            foreground: self.foreground || other.foreground,
            user_copy: self.user_copy || other.user_copy,
            batch_io: self.batch_io || other.batch_io,
            metrics: one("--metrics", self.metrics, other.metrics)?,
            zero_copy: one("--zero-copy", self.zero_copy, other.zero_copy)?,
            recovery: one("--recovery", self.recovery, other.recovery)?,
            sqpoll: one("--sqpoll", self.sqpoll, other.sqpoll)?,
            sqpoll_cpu: one("--sqpoll-cpu", self.sqpoll_cpu, other.sqpoll_cpu)?,
            poll_us: one("--poll-us", self.poll_us, other.poll_us)?,
            slow_io_ms: one("--slow-io-ms", self.slow_io_ms, other.slow_io_ms)?,
            z: self.z || other.z,
            no_part_scan: self.no_part_scan || other.no_part_scan,
            spread_tags: self.spread_tags || other.spread_tags,
            r: one("-r", self.r, other.r)?,
            i: one("-i", self.i, other.i)?,
            e: one("-e", self.e, other.e)?,
        })
    }

    /// Other servers' spellings (`-z`, `-r 1 -i 1`, ...) turned into ours, once every place
    /// the options may stand has been merged; a clash with ours is named.
    pub fn normalized(mut self) -> Result<AddOpts, String> {
        if std::mem::take(&mut self.z) {
            if self.zero_copy.is_some_and(|z| z != ZeroCopyArg::On) {
                return Err("-z means --zero-copy=on: give one of them".into());
            }
            self.zero_copy = Some(ZeroCopyArg::On);
        }
        let (r, i, e) = (self.r.take(), self.i.take(), self.e.take());
        if (i.is_some() || e.is_some()) && r.is_none() {
            return Err("-i and -e qualify -r 1 (recovery): give -r 1 too".into());
        }
        if let Some(r) = r {
            if self.recovery.is_some() {
                return Err("-r and --recovery say the same thing: give one of them".into());
            }
            self.recovery = match (r, i, e) {
                (0, _, _) => None,
                (_, Some(1), Some(1)) => {
                    return Err("-i 1 (reissue) and -e 1 (fail I/O) exclude each other".into())
                }
                (_, Some(1), _) => Some(RecoveryArg::Reissue),
                (_, _, Some(1)) => Some(RecoveryArg::FailIo),
                _ => Some(RecoveryArg::Requeue),
            };
        }
        Ok(self)
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ZeroCopyArg {
    /// On when the kernel offers it
    #[default]
    Auto,
    /// On, or an error
    On,
    /// Copy through the server's buffers
    Off,
}

impl From<ZeroCopyArg> for ublk_fast_engine::device::ZeroCopy {
    fn from(z: ZeroCopyArg) -> Self {
        match z {
            ZeroCopyArg::Auto => Self::Auto,
            ZeroCopyArg::On => Self::On,
            ZeroCopyArg::Off => Self::Off,
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecoveryArg {
    /// I/O in flight at the crash fails; new I/O waits for the next service
    Requeue,
    /// I/O in flight at the crash is reissued to the next service
    Reissue,
    /// I/O fails until the next service is there
    FailIo,
}

impl From<RecoveryArg> for ublk_fast_engine::device::Recovery {
    fn from(r: RecoveryArg) -> Self {
        match r {
            RecoveryArg::Requeue => Self::Requeue,
            RecoveryArg::Reissue => Self::Reissue,
            RecoveryArg::FailIo => Self::FailIo,
        }
    }
}

/// Device options may come before or after the target name: `ublk-fast -q 2 null` and
/// `ublk-fast null -q 2` mean the same.
#[derive(Subcommand, Debug, Clone)]
pub enum TargetCmd {
    /// Complete every I/O at once; reads return zeros
    Null(NullArgs),
    /// Serve a file or block device
    Loop(LoopArgs),
    /// Another target with injected faults: fail and/or delay every Nth request of an op
    Fault(FaultArgs),
    /// Serve an export of an NBD server (nbdkit, qemu-nbd, ...) over TCP or a Unix socket
    Nbd(NbdArgs),
    /// Stripe (RAID-0) over 2 to 8 files or block devices
    Stripe(StripeArgs),
}

/// The targets `fault` can wrap.
#[derive(Subcommand, Debug, Clone)]
pub enum InnerTarget {
    /// Complete every I/O at once; reads return zeros
    Null(NullArgs),
    /// Serve a file or block device
    Loop(LoopArgs),
}

#[derive(Args, Debug, Clone)]
pub struct FaultArgs {
    #[command(flatten)]
    pub opts: AddOpts,
    /// Which requests to count
    #[arg(long, value_enum, default_value = "any")]
    pub op: FaultOp,
    /// Inject into every Nth request of --op (counted per queue)
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000_000))]
    pub every: u64,
    /// Fail the request with this error [ERRNO: eio]
    #[arg(long, value_name = "ERRNO", num_args = 0..=1, default_missing_value = "eio",
          require_equals = true)]
    pub fail: Option<FaultErrno>,
    /// Hold the request this long first
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub delay_ms: Option<u64>,
    #[command(subcommand)]
    pub inner: InnerTarget,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultOp {
    Any,
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
}

impl FaultOp {
    pub fn ublk_op(self) -> Option<u8> {
        use ublk_fast_engine::uapi::*;
        match self {
            FaultOp::Any => None,
            FaultOp::Read => Some(UBLK_IO_OP_READ),
            FaultOp::Write => Some(UBLK_IO_OP_WRITE),
            FaultOp::Flush => Some(UBLK_IO_OP_FLUSH),
            FaultOp::Discard => Some(UBLK_IO_OP_DISCARD),
            FaultOp::WriteZeroes => Some(UBLK_IO_OP_WRITE_ZEROES),
        }
    }
}

/// The errors a block device can report distinctly (each maps to its own blk_status).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultErrno {
    /// I/O error
    Eio,
    /// No space left (BLK_STS_NOSPC)
    Enospc,
    /// Timed out (BLK_STS_TIMEOUT)
    Etimedout,
    /// Medium error (BLK_STS_MEDIUM)
    Enodata,
}

impl FaultErrno {
    pub fn errno(self) -> i32 {
        match self {
            FaultErrno::Eio => libc::EIO,
            FaultErrno::Enospc => libc::ENOSPC,
            FaultErrno::Etimedout => libc::ETIMEDOUT,
            FaultErrno::Enodata => libc::ENODATA,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct NullArgs {
    #[command(flatten)]
    pub opts: AddOpts,
    /// Device size, e.g. 1G, 512M
    #[arg(long, default_value = "256G")]
    pub size: String,
}

#[derive(Args, Debug, Clone)]
pub struct LoopArgs {
    #[command(flatten)]
    pub opts: AddOpts,
    /// Backing file or block device
    pub path: std::path::PathBuf,
    /// Use the page cache instead of O_DIRECT
    #[arg(long, alias = "buffered_io")]
    pub buffered: bool,
    /// Export the device read-only
    #[arg(long)]
    pub read_only: bool,
    /// Logical block size in bytes (default: the device's, or 512 for files)
    #[arg(long, value_name = "BYTES")]
    pub block_size: Option<u32>,
    /// Do not advertise discard / write-zeroes
    #[arg(long)]
    pub no_discard: bool,
    /// Per-block metadata bytes (UBLK_F_INTEGRITY, Linux 7.0+), kept in --metadata-file; the
    /// device then moves data by user copy and offers no discard
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u8).range(1..))]
    pub metadata_size: Option<u8>,
    /// Where the metadata lives (default: the backing file's path + ".meta"; a new or empty
    /// file is filled with the 0xFF escape pattern)
    #[arg(long, value_name = "PATH", requires = "metadata_size")]
    pub metadata_file: Option<std::path::PathBuf>,
    /// Protection information in the metadata, generated and checked by the kernel
    #[arg(long, value_enum, default_value_t = PiKind::None, requires = "metadata_size")]
    pub pi: PiKind,
    /// Where the PI tuple sits inside each block's metadata
    #[arg(long, value_name = "BYTES", default_value_t = 0, requires = "metadata_size")]
    pub pi_offset: u8,
    /// Type 1 protection: the reference tag carries the block number
    #[arg(long, requires = "metadata_size")]
    pub pi_reftag: bool,
}

/// `--pi`: the checksum of the protection information.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PiKind {
    /// Metadata without protection information (nothing checked)
    None,
    /// IP checksum (8-byte tuple)
    Ip,
    /// T10 DIF CRC16 (8-byte tuple)
    T10dif,
    /// NVMe CRC64 (16-byte tuple)
    Nvme,
}

impl PiKind {
    /// `LBMD_PI_CSUM_*`.
    pub fn csum(self) -> u8 {
        use ublk_fast_engine::uapi::*;
        match self {
            PiKind::None => LBMD_PI_CSUM_NONE,
            PiKind::Ip => LBMD_PI_CSUM_IP,
            PiKind::T10dif => LBMD_PI_CSUM_CRC16_T10DIF,
            PiKind::Nvme => LBMD_PI_CSUM_CRC64_NVME,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct StripeArgs {
    #[command(flatten)]
    pub opts: AddOpts,
    /// The members: 2 to 8 files or block devices (chunk i lives on member i % N)
    #[arg(required = true, num_args = 1..)]
    pub paths: Vec<std::path::PathBuf>,
    /// Chunk size: a power of two from 4K to 1M
    #[arg(long, default_value = "64K")]
    pub chunk: String,
    /// Use the page cache instead of O_DIRECT
    #[arg(long)]
    pub buffered: bool,
}

#[derive(Args, Debug, Clone)]
pub struct NbdArgs {
    #[command(flatten)]
    pub opts: AddOpts,
    /// The export: nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH
    pub uri: String,
    /// At most this many connections (one per queue; servers without CAN_MULTI_CONN get one)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub connections: Option<u16>,
    /// After losing the server, fail pending I/O with EIO after this many seconds
    #[arg(long, value_name = "SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub reconnect_timeout: u64,
}

impl TargetCmd {
    /// The device options given after the target name (and, for `fault`, after the inner one).
    pub fn opts(&self) -> Result<AddOpts, String> {
        match self {
            TargetCmd::Null(a) => Ok(a.opts.clone()),
            TargetCmd::Nbd(a) => Ok(a.opts.clone()),
            TargetCmd::Stripe(a) => Ok(a.opts.clone()),
            TargetCmd::Loop(a) => Ok(a.opts.clone()),
            TargetCmd::Fault(f) => f.opts.clone().merged(match &f.inner {
                InnerTarget::Null(a) => a.opts.clone(),
                InnerTarget::Loop(a) => a.opts.clone(),
            }),
        }
    }
}
