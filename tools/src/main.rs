//! `ublk-fast`: create, list and delete ublk devices served by this process.

mod admin;
mod cli;
mod daemon;
mod metrics;
mod mountns;
mod record;
mod size;

use std::sync::Arc;
use std::time::Duration;

use clap::error::ErrorKind;
use clap::Parser;
use ublk_fast_engine::cpus::{online_cpus, parse_cpu_list};
use ublk_fast_engine::ctrl::CONTROL_PATH;
use ublk_fast_engine::device::DeviceConfig;
use ublk_fast_engine::ring::SqPoll;
use ublk_fast_engine::target::Target;
use ublk_fast_engine::uapi::UBLK_S_DEV_LIVE;
use ublk_fast_targets::{FaultSpec, FaultTarget, LoopOptions, LoopTarget, NullTarget};

use cli::{AddOpts, Cli, Command, FaultArgs, InnerTarget, LoopArgs, NullArgs, TargetCmd};

/// A one-line message and the exit status that goes with it.
#[derive(Debug)]
pub struct CliError {
    pub msg: String,
    pub code: i32,
}

impl CliError {
    /// The user asked for something that cannot be: exit 2.
    pub fn usage(msg: impl Into<String>) -> Self {
        CliError { msg: msg.into(), code: 2 }
    }
    /// The system refused: exit 1.
    pub fn runtime(msg: impl Into<String>) -> Self {
        CliError { msg: msg.into(), code: 1 }
    }
}

impl From<ublk_fast_engine::Error> for CliError {
    fn from(e: ublk_fast_engine::Error) -> Self {
        CliError::runtime(e.to_string())
    }
}

/// What must hold before any command talks to the driver, checked in the order a user fixes it.
fn preflight() -> Result<(), CliError> {
    if !std::path::Path::new(CONTROL_PATH).exists() {
        return Err(CliError::runtime(format!(
            "{CONTROL_PATH} not found: the ublk driver is not loaded (run `modprobe ublk_drv` as root)"
        )));
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(CliError::runtime(
            "must run as root: ublk devices are managed through /dev/ublk-control (try sudo)",
        ));
    }
    if let Ok(s) = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled") {
        if s.trim() == "2" {
            return Err(CliError::runtime(
                "io_uring is disabled (kernel.io_uring_disabled=2): ublk needs it; run `sysctl kernel.io_uring_disabled=0`",
            ));
        }
    }
    Ok(())
}

fn null_target(a: &NullArgs) -> Result<Arc<dyn Target>, CliError> {
    let size =
        size::parse_size(&a.size).map_err(|m| CliError::usage(format!("null --size: {m}")))?;
    if size == 0 || size % 512 != 0 {
        return Err(CliError::usage(format!(
            "null --size {}: must be a non-zero multiple of 512 bytes",
            a.size
        )));
    }
    Ok(Arc::new(NullTarget::new(size)?))
}

fn loop_target(a: &LoopArgs) -> Result<Arc<dyn Target>, CliError> {
    let opts = LoopOptions {
        buffered: a.buffered,
        read_only: a.read_only,
        block_size: a.block_size,
        discard: !a.no_discard,
    };
    let t = LoopTarget::open(&a.path, &opts).map_err(|e| CliError::usage(e.to_string()))?;
    Ok(Arc::new(t))
}

fn fault_target(f: &FaultArgs) -> Result<Arc<dyn Target>, CliError> {
    if f.fail.is_none() && f.delay_ms.is_none() {
        return Err(CliError::usage(
            "fault: nothing to inject: give --fail[=ERRNO] and/or --delay-ms MS",
        ));
    }
    let inner = match &f.inner {
        InnerTarget::Null(a) => null_target(a)?,
        InnerTarget::Loop(a) => loop_target(a)?,
    };
    let spec = FaultSpec {
        op: f.op.ublk_op(),
        every: f.every,
        errno: f.fail.map(|e| e.errno()),
        delay: Duration::from_millis(f.delay_ms.unwrap_or(0)),
    };
    Ok(Arc::new(FaultTarget::new(inner, spec)))
}

fn build_target(t: &TargetCmd) -> Result<Arc<dyn Target>, CliError> {
    match t {
        TargetCmd::Null(a) => null_target(a),
        TargetCmd::Loop(a) => loop_target(a),
        TargetCmd::Fault(f) => fault_target(f),
    }
}

/// Creates a device (`start` = Create) or takes one over (`Recover`), from the options and
/// target of the command line `argv` (kept in the device's record for a later `recover`).
fn add(
    opts: AddOpts,
    target: TargetCmd,
    start: daemon::Start,
    argv: Vec<String>,
) -> Result<(), CliError> {
    preflight()?;
    let online = online_cpus()?;
    let cpus = match &opts.cpus {
        None => online.clone(),
        Some(s) => {
            let cpus =
                parse_cpu_list(s).map_err(|m| CliError::usage(format!("--cpus {s}: {m}")))?;
            let offline: Vec<String> =
                cpus.iter().filter(|c| !online.contains(c)).map(|c| c.to_string()).collect();
            if !offline.is_empty() {
                let on =
                    std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap_or_default();
                return Err(CliError::usage(format!(
                    "--cpus {s}: CPU {} is not online (online CPUs: {})",
                    offline.join(","),
                    on.trim()
                )));
            }
            cpus
        }
    };
    if opts.sqpoll_cpu.is_some() && opts.sqpoll.is_none() {
        return Err(CliError::usage("--sqpoll-cpu needs --sqpoll"));
    }
    if let Some(c) = opts.sqpoll_cpu {
        if !online.contains(&(c as usize)) {
            return Err(CliError::usage(format!("--sqpoll-cpu {c}: CPU {c} is not online")));
        }
    }
    let sqpoll =
        opts.sqpoll.map(|idle_ms| SqPoll { idle_ms, cpu: opts.sqpoll_cpu, attach_to: None });
    let queues = opts.queues.unwrap_or(cpus.len().min(4096) as u16);
    let depth = opts.depth.unwrap_or(128);
    let metrics = opts.metrics.as_deref().map(metrics::bind).transpose()?;
    let target = build_target(&target)?;
    let cfg = DeviceConfig {
        dev_id: opts.id,
        queues,
        depth,
        cpus,
        max_io_bytes: DeviceConfig::DEFAULT_MAX_IO_BYTES,
        stats_dir: Some(record::run_dir()),
        zero_copy: opts.zero_copy.unwrap_or_default().into(),
        recovery: opts.recovery.map(Into::into).unwrap_or_default(),
        sqpoll,
        user_copy: opts.user_copy,
        batch: opts.batch_io,
    };
    let run = daemon::Run { cfg, target, metrics, start, argv };
    if opts.foreground {
        daemon::run_foreground(run)
    } else {
        daemon::run_background(run)
    }
}

/// The creation options from every place they may stand: before the command, after `add`, after
/// the target name (and after `fault`'s inner target).
fn creation_opts(
    top: AddOpts,
    after_add: Option<AddOpts>,
    t: &TargetCmd,
) -> Result<AddOpts, String> {
    top.merged(after_add.unwrap_or_default())?.merged(t.opts()?)
}

/// `recover -n ID`: rebuilds the device's target from its record and takes the device over.
fn recover(id: u32, foreground: bool) -> Result<(), CliError> {
    let info = admin::dev_info(&mut ublk_fast_engine::ctrl::Control::open()?, id)?;
    // A LIVE device whose daemon is alive is served: refuse before touching its files (the
    // old daemon holds their locks). A dead daemon the kernel has not noticed yet is fine.
    if info.state == UBLK_S_DEV_LIVE && admin::process_alive(info.ublksrv_pid) {
        return Err(CliError::runtime(format!(
            "device {id} is LIVE: daemon {} still serves it (to replace it, run `ublk-fast quiesce -n {id}` first)",
            info.ublksrv_pid
        )));
    }
    let path = record::path(id);
    let rec = record::Record::load(id).ok_or_else(|| {
        CliError::runtime(format!(
            "device {id}: no usable record at {} (missing or corrupt): it cannot be recovered",
            path.display()
        ))
    })?;
    let argv = std::iter::once("ublk-fast".to_string()).chain(rec.argv.iter().cloned());
    let cli = Cli::try_parse_from(argv).map_err(|_| {
        CliError::runtime(format!(
            "device {id}: the command line in {} does not parse",
            path.display()
        ))
    })?;
    let bad = |m: String| CliError::runtime(format!("device {id}: {}: {m}", path.display()));
    let (opts, target) = match cli.cmd {
        Command::Target(t) => (creation_opts(cli.add, None, &t).map_err(bad)?, t),
        Command::Add { opts, target } => {
            (creation_opts(cli.add, Some(opts), &target).map_err(bad)?, target)
        }
        _ => {
            return Err(CliError::runtime(format!(
                "device {id}: {} names no target",
                path.display()
            )))
        }
    };
    let opts = AddOpts { id: Some(id), foreground, ..opts };
    add(opts, target, daemon::Start::Recover(id), rec.argv)
}

fn run(cli: Cli, argv: Vec<String>) -> Result<(), CliError> {
    let only_for_add = |cmd: &str| {
        CliError::usage(format!(
            "--cpus/--queues/--depth/--id/--foreground/--metrics/--zero-copy/--user-copy/--batch-io/--recovery/--sqpoll create devices; they do not apply to `{cmd}`"
        ))
    };
    // Commands that only look at or act on existing devices take no creation options.
    let existing = match &cli.cmd {
        Command::Target(_) | Command::Add { .. } => None,
        Command::Quiesce { .. } => Some("quiesce"),
        Command::Recover { .. } => Some("recover"),
        Command::List { .. } => Some("list"),
        Command::Del { .. } => Some("del"),
        Command::Features { .. } => Some("features"),
    };
    if let Some(cmd) = existing {
        if !cli.add.is_empty() {
            return Err(only_for_add(cmd));
        }
        preflight()?;
    }
    match cli.cmd {
        Command::Target(t) => {
            let opts = creation_opts(cli.add, None, &t).map_err(CliError::usage)?;
            add(opts, t, daemon::Start::Create, argv)
        }
        Command::Add { opts, target } => {
            let opts = creation_opts(cli.add, Some(opts), &target).map_err(CliError::usage)?;
            add(opts, target, daemon::Start::Create, argv)
        }
        Command::Quiesce { id, timeout_ms } => admin::quiesce(id, timeout_ms),
        Command::Recover { id, foreground } => recover(id, foreground),
        Command::List { id, json } => admin::list(id, json),
        Command::Del { id, all } => admin::del(id, all),
        Command::Features { json } => admin::features(json),
    }
}

/// clap's errors span several lines; users get one, with where to look next.
fn one_line(e: &clap::Error) -> String {
    // The message is the first paragraph (some kinds continue it on indented lines).
    let rendered = e.render().to_string();
    let para: Vec<&str> =
        rendered.lines().take_while(|l| !l.trim().is_empty()).map(str::trim).collect();
    let joined = para.join(" ");
    let first = joined.trim_start_matches("error: ");
    // `--recovery reissue`: an optional value must be attached with `=`.
    let argv: Vec<String> = std::env::args().collect();
    let optional = ["--recovery", "--sqpoll", "--fail"];
    let attached = argv
        .windows(2)
        .find(|w| optional.contains(&w[0].as_str()) && first.contains(&format!("'{}'", w[1])));
    match (e.kind(), attached) {
        (ErrorKind::InvalidSubcommand | ErrorKind::UnknownArgument, Some(w)) => format!(
            "`{} {}`: write `{}={}` (the value of {} is optional, so it needs `=`)",
            w[0], w[1], w[0], w[1], w[0]
        ),
        (ErrorKind::InvalidSubcommand, None) => format!(
            "{first}: targets are `null`, `loop` and `fault`, commands `add`, `list`, `del`, `features`"
        ),
        _ => format!("{first} (see `ublk-fast --help`)"),
    }
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = e.print();
            std::process::exit(0);
        }
        Err(e) if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            std::process::exit(2);
        }
        Err(e) => {
            eprintln!("ublk-fast: error: {}", one_line(&e));
            std::process::exit(2);
        }
    };
    if let Err(e) = run(cli, std::env::args().skip(1).collect()) {
        eprintln!("ublk-fast: error: {}", e.msg);
        std::process::exit(e.code);
    }
}
