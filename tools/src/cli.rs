//! Command-line shape, in the style of ublksrv's `ublk`, rublk and kublk:
//! `ublk-fast [OPTIONS] <TARGET> [ARGS]` (or `ublk-fast add ...`), `list`, `del`, `features`.

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "ublk-fast", version, about = "A fast Linux ublk server", long_about = None)]
#[command(subcommand_value_name = "COMMAND|TARGET", disable_help_subcommand = true)]
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
        #[arg(short = 'n', long = "id")]
        id: Option<u32>,
        /// JSON array instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Stop and delete devices
    Del {
        /// The device to delete
        #[arg(short = 'n', long = "id", required_unless_present = "all", conflicts_with = "all")]
        id: Option<u32>,
        /// Every ublk device
        #[arg(short = 'a', long)]
        all: bool,
    },
    /// Start a new daemon for a device created with --recovery whose daemon died
    Recover {
        /// The device to take over
        #[arg(short = 'n', long = "id")]
        id: u32,
        /// Serve in the foreground
        #[arg(long)]
        foreground: bool,
    },
    /// Hand a --recovery device over: the kernel parks its I/O and this daemon exits; then
    /// `ublk-fast recover` starts the new one
    Quiesce {
        #[arg(short = 'n', long = "id")]
        id: u32,
        /// Give up if the I/O in flight has not drained by then
        #[arg(long, value_name = "MS", default_value_t = 10_000)]
        timeout_ms: u64,
    },
    /// Print the ublk driver's features
    Features {
        #[arg(long)]
        json: bool,
    },
    #[command(flatten)]
    Target(TargetCmd),
}

#[derive(Args, Debug, Default, Clone)]
pub struct AddOpts {
    /// CPUs for the queue threads, e.g. 0-7 or 0,2,4-5 (default: all online)
    #[arg(long, value_name = "LIST")]
    pub cpus: Option<String>,
    /// Hardware queues (default: the number of CPUs in --cpus)
    #[arg(short = 'q', long, value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub queues: Option<u16>,
    /// Queue depth [default: 128]
    #[arg(short = 'd', long, value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub depth: Option<u16>,
    /// Device id (default: the kernel picks)
    #[arg(short = 'n', long = "id", value_parser = clap::value_parser!(u32).range(0..=1_048_575))]
    pub id: Option<u32>,
    /// Serve in the foreground until SIGINT/SIGTERM, then delete the device
    #[arg(long)]
    pub foreground: bool,
    /// Serve requests from their own pages (UBLK_F_AUTO_BUF_REG, Linux 6.16+) [default: auto]
    #[arg(long, value_name = "MODE")]
    pub zero_copy: Option<ZeroCopyArg>,
    /// Let the device outlive this daemon: `ublk-fast recover` takes it over [MODE: requeue]
    #[arg(long, value_name = "MODE", num_args = 0..=1, default_missing_value = "requeue")]
    pub recovery: Option<RecoveryArg>,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics (e.g. 127.0.0.1:9633)
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<String>,
}

impl AddOpts {
    pub fn is_empty(&self) -> bool {
        self.cpus.is_none()
            && self.queues.is_none()
            && self.depth.is_none()
            && self.id.is_none()
            && !self.foreground
            && self.metrics.is_none()
            && self.zero_copy.is_none()
            && self.recovery.is_none()
    }

    /// `self` with any option `other` sets laid over it.
    pub fn merged(mut self, other: AddOpts) -> AddOpts {
        self.cpus = other.cpus.or(self.cpus);
        self.queues = other.queues.or(self.queues);
        self.depth = other.depth.or(self.depth);
        self.id = other.id.or(self.id);
        self.foreground |= other.foreground;
        self.metrics = other.metrics.or(self.metrics);
        self.zero_copy = other.zero_copy.or(self.zero_copy);
        self.recovery = other.recovery.or(self.recovery);
        self
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
    /// I/O in flight at the crash fails; new I/O waits for the next daemon
    Requeue,
    /// I/O in flight at the crash is reissued to the next daemon
    Reissue,
    /// I/O fails until the next daemon is there
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
    #[arg(long)]
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
}

impl TargetCmd {
    pub fn opts(&self) -> &AddOpts {
        match self {
            TargetCmd::Null(a) => &a.opts,
            TargetCmd::Loop(a) => &a.opts,
        }
    }
}
