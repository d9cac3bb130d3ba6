//! The CLI's side of the control protocol: find the service (starting one where a device
//! command needs it), send one request, wait for its answer.

use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::proto::{self, Op, Request, Response, Status};
use crate::service::{socket_path, ServeOpts};
use crate::CliError;

/// How long the CLI waits for a service that said it exits to be gone.
const EXIT_WAIT: Duration = Duration::from_secs(60);

pub fn connect() -> Option<UnixStream> {
    UnixStream::connect(socket_path()).ok()
}

fn send(mut s: UnixStream, op: Op, fds: &[std::os::fd::RawFd]) -> Result<Response, CliError> {
    let _ = s.set_read_timeout(Some(proto::ANSWER_TIMEOUT));
    let _ = s.set_write_timeout(Some(proto::READ_TIMEOUT));
    proto::write_line_with_fds(&mut s, &Request { version: proto::VERSION, op }, fds)
        .map_err(|e| CliError::runtime(format!("control socket: {e}")))?;
    let line = proto::read_line(&mut s, proto::MAX_RESPONSE_BYTES).map_err(|e| {
        CliError::runtime(format!("control socket: no answer from the service: {e}"))
    })?;
    let resp: Response = serde_json::from_str(&line)
        .map_err(|e| CliError::runtime(format!("control socket: a bad answer: {e}")))?;
    if resp.exiting {
        wait_gone(resp.pid);
    }
    Ok(resp)
}

/// Sends `op` to the running service; `None` when no service answers.
pub fn call(op: Op) -> Option<Result<Response, CliError>> {
    connect().map(|s| send(s, op, &[]))
}

/// Sends `op` with open files for the service to use (a device's backing stores, opened here,
/// in the caller's mount namespace).
pub fn call_with_fds(op: Op, fds: &[std::os::fd::RawFd]) -> Option<Result<Response, CliError>> {
    connect().map(|s| send(s, op, fds))
}

/// The running service's status, if one answers.
pub fn status() -> Option<Status> {
    match call(Op::Status {})? {
        Ok(r) => r.status,
        Err(_) => None,
    }
}

/// Waits (bounded) until process `pid` is gone.
pub fn wait_gone(pid: i32) {
    let deadline = Instant::now() + EXIT_WAIT;
    while crate::admin::process_alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The running service's status, starting one with `opts` if none runs. The flag says
/// whether this call started it.
pub fn ensure(opts: &ServeOpts) -> Result<(Status, bool), CliError> {
    for _ in 0..3 {
        if let Some(s) = status() {
            return Ok((s, false));
        }
        let exe = std::env::current_exe()
            .map_err(|e| CliError::runtime(format!("cannot find this program: {e}")))?;
        let mut cmd = Command::new(exe);
        cmd.arg("serve")
            .arg("--cpus")
            .arg(crate::build::list_str(&opts.cpus))
            .arg("--exit-when-idle");
        if let Some(m) = &opts.metrics {
            cmd.arg("--metrics").arg(m);
        }
        if let Some(ms) = opts.sqpoll {
            cmd.arg(format!("--sqpoll={ms}"));
        }
        if let Some(c) = opts.sqpoll_cpu {
            cmd.arg("--sqpoll-cpu").arg(c.to_string());
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| CliError::runtime(format!("cannot start the service: {e}")))?;
        // `serve` exits once the service is READY, has failed, or did not report in time; the
        // service it forked keeps stderr open until it is ready, so read only what is there.
        let st = child
            .wait()
            .map_err(|e| CliError::runtime(format!("cannot start the service: {e}")))?;
        if st.success() {
            if let Some(s) = status() {
                return Ok((s, true));
            }
            continue;
        }
        let err = child.stderr.take().map(read_available).unwrap_or_default();
        let msg = err.lines().last().unwrap_or("").trim_start_matches("ublk-fast: error: ");
        if !msg.contains("already runs") {
            return Err(CliError { msg: msg.to_string(), code: st.code().unwrap_or(1) });
        }
        // Another command started one meanwhile: use it.
    }
    Err(CliError::runtime(
        "cannot reach the ublk-fast service (its control socket does not answer)",
    ))
}

/// Turns an answer into the CLI's outcome.
pub fn outcome(r: Response) -> Result<Response, CliError> {
    if r.ok {
        Ok(r)
    } else {
        Err(CliError {
            msg: r.error.unwrap_or_else(|| "the service refused".into()),
            code: r.exit_code.unwrap_or(1),
        })
    }
}

/// What `pipe` holds now, without waiting for its writers to close it.
fn read_available(pipe: std::process::ChildStderr) -> String {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl on a descriptor we own, setting O_NONBLOCK.
    unsafe {
        let fl = libc::fcntl(pipe.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(pipe.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
    let mut pipe = pipe;
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    while let Ok(n) = pipe.read(&mut chunk) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8_lossy(&out).into_owned()
}
