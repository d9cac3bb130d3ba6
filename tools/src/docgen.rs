//! `ublk-fast generate man DIR` and `generate completions SHELL`: the man pages and shell
//! completions, generated from the CLI definition itself (clap_mangen, clap_complete), so they
//! never drift from what the program accepts. The main page gets the sections clap cannot know.

use std::io::Write;
use std::path::Path;

use clap::CommandFactory;

use crate::cli::Cli;
use crate::CliError;

const EXTRA: &str = r#".SH EXAMPLES
.TP
\fBublk\-fast \-\-cpus 0\-7 loop /dev/nvme0n1\fR
Serve a block device; prints /dev/ublkbN once it is LIVE (starting the node service if none runs).
.TP
\fBublk\-fast loop disk.img \-\-recovery=reissue \-q 2 \-d 64\fR
A device that outlives a crashed service: the next one takes it over without an I/O error.
.TP
\fBublk\-fast serve \-\-cpus 0\-3 \-\-metrics 127.0.0.1:9633 \-\-foreground\fR
Run the node service (as systemd's dist/ublk\-fast.service does).
.TP
\fBublk\-fast resize \-n 3 2G\fR; \fBublk\-fast del \-\-safe \-n 3\fR
Grow a device while it serves; delete it only if nobody has it open.
.TP
\fBublk\-fast list \-v\fR; \fBublk\-fast list \-\-json\fR
Every device: geometry, state, the serving process, each queue's CPU, counters.
.SH COMPATIBILITY
The spellings of ublksrv's \fBublk\fR, rublk and the kernel's kublk are accepted (not listed in
\-\-help): \fBadd \-t\fR TYPE \fB\-f\fR FILE, \fB\-\-number\fR N, \fB\-z\fR (zero copy),
\fB\-u\fR (user copy), \fB\-b\fR (batch commands), \fB\-r 0|1\fR with \fB\-i 0|1\fR (reissue) or
\fB\-e 0|1\fR (fail I/O), \fB\-\-buffered_io\fR, \fBdel \-a\fR, \fBlist \-a\fR, \fBlist \-v\fR.
\fBlist\fR prints their two\-line layout per device:
.nf
dev id N: nr_hw_queues Q queue_depth D block size B dev_capacity SECTORS
	max rq size BYTES daemon pid PID flags 0xFLAGS state STATE
.fi
followed by ublk\-fast's own lines (queues and their CPUs, target).
.SH FILES
.TP
/run/ublk\-fast/control.sock
The node service's control socket (0600, in a 0700 directory); see docs/control\-protocol.md.
.TP
/run/ublk\-fast/ID.json, /run/ublk\-fast/ID.stats
Each device's record (how it was created; a new service takes it over from it) and counters.
.TP
/run/ublk\-fast/daemon.log
The service's log when it runs in the background (rotated past 16 MiB).
.TP
/run/ublk\-fast/service.lock
Held by the one service of the host.
.TP
$XDG_RUNTIME_DIR/ublk\-fast/
The same files for a user who is not root: their own service, serving their own
unprivileged devices (UBLK_F_UNPRIVILEGED_DEV), out of every other user's reach.
.TP
dist/60\-ublk\-fast.rules (installed in /etc/udev/rules.d)
Opens /dev/ublk\-control to group \fBublk\fR and gives each unprivileged device's nodes to the
user who created it (through the hidden \fBudev\-owner\fR command).
.SH SIGNALS
.TP
SIGTERM, SIGINT
The service deletes devices without \-\-recovery once the driver drained their I/O, quiesces
\-\-recovery devices for the next service, and exits.
.TP
SIGHUP
Nothing is deleted; every device keeps serving.
.TP
SIGKILL
Devices without \-\-recovery fail their I/O; \-\-recovery devices wait for the next service,
which takes them over by itself.
.SH EXIT STATUS
0 on success; 1 when the system refused (the driver, a device, the service); 2 for a bad
command line. Every failure prints one line, "ublk\-fast: error: ...", and leaves no device or
process behind.
.SH ENVIRONMENT
UBLK_FAST_LOG=error|warn|info|debug (the service's log level); UBLK_FAST_RUN_DIR (instead of
/run/ublk\-fast).
"#;

/// Writes `ublk-fast.8` and one page per command into `dir`.
pub fn man(dir: &Path) -> Result<(), CliError> {
    let fail = |e: std::io::Error| CliError::runtime(format!("{}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(fail)?;
    let cmd = Cli::command();
    clap_mangen::generate_to(cmd.clone(), dir).map_err(fail)?;
    // The main page again, with the sections clap has no notion of.
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd).section("8").render(&mut page).map_err(fail)?;
    page.extend_from_slice(EXTRA.as_bytes());
    let main = dir.join("ublk-fast.8");
    std::fs::write(&main, page).map_err(fail)?;
    // generate_to named it ublk-fast.1: section 8 is where administration commands go.
    let _ = std::fs::remove_file(dir.join("ublk-fast.1"));
    println!("{}", main.display());
    Ok(())
}

pub fn completions(shell: clap_complete::Shell) -> Result<(), CliError> {
    let mut cmd = Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "ublk-fast", &mut out);
    std::io::stdout().write_all(&out).map_err(|e| CliError::runtime(format!("stdout: {e}")))
}
