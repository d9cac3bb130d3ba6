//! `ublk-fast`: the node service (`serve`) and the commands that create, list, hand over and
//! delete the ublk devices it serves.

mod admin;
mod build;
mod cli;
mod client;
mod compat;
mod docgen;
mod http;
mod logging;
mod metrics;
mod mountns;
mod proto;
mod record;
mod service;
mod size;

use std::time::{Duration, Instant};

use clap::error::ErrorKind;
use clap::Parser;
use ublk_fast_engine::cpus::online_cpus;
use ublk_fast_engine::ctrl::CONTROL_PATH;

use cli::{AddOpts, Cli, Command, ServeArgs, TargetCmd};
use service::ServeOpts;

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
    if !record::privileged() {
        // Unprivileged devices: /dev/ublk-control must be open to this user (its group).
        // SAFETY: access only reads the NUL-terminated path (CONTROL_PATH's).
        if unsafe { libc::access(c"/dev/ublk-control".as_ptr(), libc::R_OK | libc::W_OK) } != 0 {
            return Err(CliError::runtime(format!(
                "{CONTROL_PATH} is not open to you: run as root, or, for devices of your own, install dist/60-ublk-fast.rules and join its group (`usermod -aG ublk USER`)"
            )));
        }
        if std::env::var_os("UBLK_FAST_RUN_DIR").is_none()
            && std::env::var_os("XDG_RUNTIME_DIR").is_none()
        {
            return Err(CliError::runtime(
                "XDG_RUNTIME_DIR is not set: an unprivileged service keeps its socket and records there; log in through a session that sets it (or set it to a directory only you can use)",
            ));
        }
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

/// The service options a device command starts the service with, from its creation options.
fn serve_opts_for(opts: &AddOpts, online: &[usize]) -> Result<ServeOpts, CliError> {
    let cpus = build::cpus(opts.cpus.as_deref(), online, "online")?;
    serve_opts(cpus, opts.metrics.clone(), opts.sqpoll, opts.sqpoll_cpu, online, true)
}

fn serve_opts(
    cpus: Vec<usize>,
    metrics: Option<String>,
    sqpoll: Option<u32>,
    sqpoll_cpu: Option<u32>,
    online: &[usize],
    exit_when_idle: bool,
) -> Result<ServeOpts, CliError> {
    if sqpoll_cpu.is_some() && sqpoll.is_none() {
        return Err(CliError::usage("--sqpoll-cpu needs --sqpoll"));
    }
    if let Some(c) = sqpoll_cpu {
        if !online.contains(&(c as usize)) {
            return Err(CliError::usage(format!("--sqpoll-cpu {c}: CPU {c} is not online")));
        }
    }
    if let Some(m) = &metrics {
        metrics::parse_addr(m)?;
    }
    Ok(ServeOpts {
        cpus,
        metrics,
        sqpoll,
        sqpoll_cpu,
        exit_when_idle,
        oom_score_adj: service::DEFAULT_OOM_SCORE_ADJ,
    })
}

/// Prints the device's path once its node exists (udev may lag behind the kernel).
fn print_dev(id: u32) {
    let path = format!("/dev/ublkb{id}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !std::path::Path::new(&path).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    println!("{path}");
}

fn print_notices(r: &proto::Response) {
    for n in &r.notices {
        eprintln!("ublk-fast: notice: {n}");
    }
}

/// Creates a device in the service (starting one if none runs), from the options and target
/// of the command line `argv` (kept in the device's record for a later take-over).
fn add(opts: AddOpts, target: TargetCmd, argv: Vec<String>) -> Result<(), CliError> {
    preflight()?;
    let online = online_cpus()?;
    let serve = serve_opts_for(&opts, &online)?;
    let cwd = std::env::current_dir()
        .map_err(|e| CliError::runtime(format!("current directory: {e}")))?;
    // Refuse a target that cannot be opened before anything starts; the files it opened go to
    // the service with the request (it serves from its own mount namespace).
    let opened = build::precheck(&target, &cwd)?;
    let op = proto::Op::Add { argv, cwd: cwd.to_string_lossy().into_owned() };
    if opts.foreground {
        if let Some(st) = client::status() {
            return Err(CliError::usage(format!(
                "a ublk-fast service already runs (pid {}): --foreground starts one; leave it out to add the device to that service",
                st.pid
            )));
        }
        drop(opened);
        return service::run_foreground(serve, Some(op));
    }
    let (st, started) = client::ensure(&serve)?;
    if !started {
        if opts.metrics.is_some() && opts.metrics != st.metrics {
            return Err(CliError::usage(format!(
                "the service (pid {}) serves metrics at {}: --metrics applies when a command starts the service (`ublk-fast shutdown` first)",
                st.pid,
                st.metrics.as_deref().unwrap_or("no address")
            )));
        }
        if opts.sqpoll.is_some() && (opts.sqpoll != st.sqpoll || opts.sqpoll_cpu != st.sqpoll_cpu) {
            return Err(CliError::usage(format!(
                "the service (pid {}) runs {}: --sqpoll applies when a command starts the service (`ublk-fast shutdown` first)",
                st.pid,
                st.sqpoll.map_or("without SQPOLL".into(), |ms| format!("with --sqpoll={ms}"))
            )));
        }
    }
    let fds = opened.as_ref().map(|t| t.files()).unwrap_or_default();
    let r = client::call_with_fds(op, &fds)
        .unwrap_or_else(|| Err(CliError::runtime("the service went away before the request")))?;
    drop(opened);
    print_notices(&r);
    let r = client::outcome(r)?;
    print_dev(r.id.unwrap_or_default());
    Ok(())
}

/// The creation options from every place they may stand: before the command, after `add`, after
/// the target name (and after `fault`'s inner target).
pub(crate) fn creation_opts(
    top: AddOpts,
    after_add: Option<AddOpts>,
    t: &TargetCmd,
) -> Result<AddOpts, String> {
    top.merged(after_add.unwrap_or_default())?.merged(t.opts()?)?.normalized()
}

/// `recover -n ID`: the service (started if none runs, which takes every recorded device over
/// by itself) takes the device over from its record.
fn recover(id: u32, foreground: bool) -> Result<(), CliError> {
    // What can be refused from the kernel's view alone is refused before a service starts.
    let info = admin::dev_info(&mut ublk_fast_engine::ctrl::Control::open()?, id)?;
    if info.flags & ublk_fast_engine::uapi::UBLK_F_USER_RECOVERY == 0 {
        return Err(CliError::runtime(format!(
            "device {id} was not created with --recovery: it cannot be taken over"
        )));
    }
    if info.state == ublk_fast_engine::uapi::UBLK_S_DEV_LIVE
        && admin::process_alive(info.ublksrv_pid)
    {
        return Err(CliError::runtime(format!(
            "device {id} is LIVE: process {} serves it (to hand it over, run `ublk-fast quiesce -n {id}` first)",
            info.ublksrv_pid
        )));
    }
    let online = online_cpus()?;
    let serve = serve_opts(online.clone(), None, None, None, &online, true)?;
    let op = proto::Op::Recover { id };
    if foreground {
        if let Some(st) = client::status() {
            return Err(CliError::usage(format!(
                "a ublk-fast service already runs (pid {}): leave --foreground out",
                st.pid
            )));
        }
        return service::run_foreground(serve, Some(op));
    }
    client::ensure(&serve)?;
    let r = client::call(op)
        .unwrap_or_else(|| Err(CliError::runtime("the service went away before the request")))?;
    let r = client::outcome(r)?;
    print_dev(r.id.unwrap_or(id));
    Ok(())
}

/// `serve`: starts the node service (in the background unless --foreground).
fn serve(a: ServeArgs) -> Result<(), CliError> {
    preflight()?;
    let online = online_cpus()?;
    let cpus = build::cpus(a.cpus.as_deref(), &online, "online")?;
    let mut opts = serve_opts(cpus, a.metrics, a.sqpoll, a.sqpoll_cpu, &online, a.exit_when_idle)?;
    if let Some(adj) = a.oom_score_adj {
        opts.oom_score_adj = adj;
    }
    if a.foreground {
        return service::run_foreground(opts, None);
    }
    if let Some(st) = client::status() {
        return Err(CliError::runtime(format!(
            "a ublk-fast service already runs (pid {}): add devices to it, or stop it with `ublk-fast shutdown`",
            st.pid
        )));
    }
    let cpus = build::list_str(&opts.cpus);
    let pid = service::run_background(opts)?;
    eprintln!("ublk-fast: service pid {pid} serves on CPUs {cpus}");
    Ok(())
}

/// Sends a request to the service; `none` is what to do when none runs.
fn via_service(op: proto::Op, none: impl FnOnce() -> Result<(), CliError>) -> Result<(), CliError> {
    match client::call(op) {
        Some(r) => client::outcome(r?).map(|_| ()),
        None => none(),
    }
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
        Command::Serve(_) => Some("serve"),
        Command::Shutdown => Some("shutdown"),
        Command::Resize { .. } => Some("resize"),
        Command::Generate(_) => Some("generate"),
        Command::UdevOwner { .. } => Some("udev-owner"),
    };
    if let Some(cmd) = existing {
        if !cli.add.is_empty() {
            return Err(only_for_add(cmd));
        }
        if cmd != "serve" && cmd != "generate" {
            preflight()?;
        }
    }
    match cli.cmd {
        Command::Target(t) => {
            let opts = creation_opts(cli.add, None, &t).map_err(CliError::usage)?;
            add(opts, t, argv)
        }
        Command::Add { opts, target } => {
            let opts = creation_opts(cli.add, Some(opts), &target).map_err(CliError::usage)?;
            add(opts, target, argv)
        }
        Command::Quiesce { id, timeout_ms } => {
            via_service(proto::Op::Quiesce { id, timeout_ms }, || {
                admin::dev_info(&mut ublk_fast_engine::ctrl::Control::open()?, id)?;
                Err(CliError::runtime(format!(
                    "device {id}: no ublk-fast service runs, so none serves it: nothing to quiesce"
                )))
            })
        }
        Command::Recover { id, foreground } => recover(id, foreground),
        Command::List { id, json, verbose, all: _ } => admin::list(id, json, verbose),
        Command::Del { id, all, safe, all_servers } => {
            via_service(proto::Op::Del { id, all, safe, all_servers }, || {
                if safe {
                    return Err(CliError::runtime(
                        "del --safe: no ublk-fast service runs, so none serves the device",
                    ));
                }
                admin::del(id, all, all_servers)
            })
        }
        Command::Resize { id, size } => {
            let bytes = size::parse_size(&size)
                .map_err(|m| CliError::usage(format!("resize {size}: {m}")))?;
            via_service(proto::Op::Resize { id, bytes }, || {
                admin::dev_info(&mut ublk_fast_engine::ctrl::Control::open()?, id)?;
                Err(CliError::runtime(format!(
                    "device {id}: no ublk-fast service runs, so none serves it: nothing to resize"
                )))
            })
        }
        Command::Features { json } => admin::features(json),
        Command::Serve(a) => serve(a),
        Command::Generate(cli::Generate::Man { dir }) => docgen::man(&dir),
        Command::Generate(cli::Generate::Completions { shell }) => docgen::completions(shell),
        Command::UdevOwner { name } => admin::udev_owner(&name),
        Command::Shutdown => via_service(proto::Op::Shutdown {}, || {
            eprintln!("ublk-fast: no service runs");
            Ok(())
        }),
    }
}

/// clap's errors span several lines; users get one, with where to look next.
pub(crate) fn one_line(e: &clap::Error) -> String {
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
            "{first}: targets are `null`, `loop` and `fault`, commands `add`, `list`, `del`, `resize`, `quiesce`, `recover`, `features`, `serve`, `shutdown`, `help`"
        ),
        _ => format!("{first} (see `ublk-fast --help`)"),
    }
}

fn main() {
    let args = compat::rewrite(std::env::args().collect());
    let cli = match Cli::try_parse_from(&args) {
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
    if let Err(e) = run(cli, args.into_iter().skip(1).collect()) {
        eprintln!("ublk-fast: error: {}", e.msg);
        std::process::exit(e.code);
    }
}
