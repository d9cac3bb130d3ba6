//! The node service's control protocol (`docs/control-protocol.md`): one JSON request line,
//! one JSON response line, over the Unix socket `/run/ublk-fast/control.sock`. Versioned;
//! requests over `MAX_REQUEST_BYTES`, or that do not parse, get an error reply and change
//! nothing.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The protocol version this build speaks; a request with another is refused.
pub const VERSION: u32 = 1;
/// A request line longer than this is refused unread.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// A response line longer than this is refused by the client (a `list` of thousands of
/// devices fits).
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;
/// How long either side waits for the other's line; device creation and removal can take a
/// while (the driver drains I/O), so the client waits longer for the answer.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Op {
    /// Create a device from a command line (as `ublk-fast` takes it, without the program
    /// name); relative paths in it are relative to `cwd`.
    Add { argv: Vec<String>, cwd: String },
    /// Stop and delete a device, or every ublk device (`all`); with `safe`, only if nobody has
    /// the device open.
    Del {
        #[serde(default)]
        id: Option<u32>,
        #[serde(default)]
        all: bool,
        #[serde(default)]
        safe: bool,
        /// With `all`: also devices of other ublk servers (without it, only ublk-fast's own:
        /// served here or recorded).
        #[serde(default)]
        all_servers: bool,
    },
    /// Change a device's size (bytes) while it serves.
    Resize { id: u32, bytes: u64 },
    /// Hand a `--recovery` device over: the driver parks its I/O and the service lets it go.
    Quiesce { id: u32, timeout_ms: u64 },
    /// Take a device over (its server died, or it was quiesced) from its record.
    Recover { id: u32 },
    /// What the service is: pid, CPUs, options, devices.
    Status {},
    /// Delete every device and stop the service.
    Shutdown {},
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub version: u32,
    #[serde(flatten)]
    pub op: Op,
}

/// The service's description of itself (`status`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct Status {
    pub pid: i32,
    pub cpus: Vec<usize>,
    pub metrics: Option<String>,
    pub sqpoll: Option<u32>,
    pub sqpoll_cpu: Option<u32>,
    /// Devices served now.
    pub devices: Vec<u32>,
    /// Threads of the process (core threads plus the control threads).
    pub threads: usize,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct Response {
    pub version: u32,
    pub ok: bool,
    /// One line saying what went wrong and what to do (when `!ok`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The exit status the CLI should end with (when `!ok`): 2 bad request, 1 refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// add / recover: the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u32>,
    /// Lines to show the user (where the kernel granted less than asked, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notices: Vec<String>,
    /// status
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// The service exits after this answer (it serves no device any more and was started
    /// for them): the CLI waits for `pid` to be gone.
    #[serde(default)]
    pub exiting: bool,
    #[serde(default)]
    pub pid: i32,
}

impl Response {
    pub fn ok() -> Response {
        Response { version: VERSION, ok: true, ..Default::default() }
    }

    pub fn err(msg: impl Into<String>, exit_code: i32) -> Response {
        Response {
            version: VERSION,
            ok: false,
            error: Some(msg.into()),
            exit_code: Some(exit_code),
            ..Default::default()
        }
    }
}

/// Reads one `\n`-terminated line of at most `max` bytes (without the newline), all of it
/// within the socket's read timeout: a peer trickling bytes cannot hold the reader longer.
pub fn read_line(s: &mut UnixStream, max: usize) -> Result<String, String> {
    String::from_utf8(read_line_bytes(s, max)?).map_err(|_| "line is not UTF-8".into())
}

/// `read_line`'s bytes, before they are checked for UTF-8.
fn read_line_bytes(s: &mut UnixStream, max: usize) -> Result<Vec<u8>, String> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let limit = s.read_timeout().ok().flatten();
    let deadline = limit.map(|l| std::time::Instant::now() + l);
    loop {
        if let Some(d) = deadline {
            let left = d.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(format!("no full line within {:?}", limit.unwrap_or_default()));
            }
            let _ = s.set_read_timeout(Some(left));
        }
        let n = s.read(&mut chunk).map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("the peer closed the connection before a full line".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.iter().position(|&b| b == b'\n') {
            if i > max {
                return Err(format!("line longer than {max} bytes"));
            }
            buf.truncate(i);
            return Ok(buf);
        }
        if buf.len() > max {
            return Err(format!("line longer than {max} bytes"));
        }
    }
}

pub fn write_line(s: &mut UnixStream, v: &impl Serialize) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(v).map_err(std::io::Error::other)?;
    line.push(b'\n');
    s.write_all(&line)
}

/// Parses a request line: the version must match, the fields must be known.
pub fn parse_request(line: &str) -> Result<Request, String> {
    let v: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("not a JSON request: {e}"))?;
    let serde_json::Value::Object(mut fields) = v else {
        return Err("the request is not a JSON object".into());
    };
    match fields.remove("version").and_then(|x| x.as_u64()) {
        Some(n) if n == u64::from(VERSION) => {}
        Some(n) => {
            return Err(format!("protocol version {n} is not spoken here (this is {VERSION})"))
        }
        None => return Err("the request has no numeric \"version\"".into()),
    }
    // What is left is the operation, whose fields are checked strictly.
    // serde names an unknown op or field as sent: its control characters escaped, the message
    // stays one line.
    let op = serde_json::from_value(serde_json::Value::Object(fields)).map_err(|e| {
        let esc = |c: char| -> String {
            if c.is_control() {
                c.escape_default().collect()
            } else {
                c.into()
            }
        };
        let e: String = e.to_string().chars().map(esc).collect();
        format!("bad request: {e}")
    })?;
    Ok(Request { version: VERSION, op })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_bad_ones_are_refused() {
        let r = Request {
            version: VERSION,
            op: Op::Del { id: Some(3), all: false, safe: false, all_servers: false },
        };
        let line = serde_json::to_string(&r).unwrap();
        assert_eq!(
            line,
            r#"{"version":1,"op":"del","id":3,"all":false,"safe":false,"all_servers":false}"#
        );
        assert_eq!(parse_request(&line), Ok(r));
        assert_eq!(parse_request(r#"{"version":1,"op":"status"}"#).unwrap().op, Op::Status {});
        for bad in [
            "",
            "nonsense",
            "{}",
            r#"{"version":2,"op":"status"}"#,
            r#"{"version":1,"op":"explode"}"#,
            r#"{"version":1,"op":"del","id":"x"}"#,
            r#"{"version":1,"op":"quiesce","id":1}"#,
            r#"{"version":1,"op":"status","extra":1}"#,
            "[1,2,3]",
        ] {
            assert!(parse_request(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn a_trickled_line_is_cut_off_at_the_deadline() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        b.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        let writer = std::thread::spawn(move || {
            // 3 s of one byte every 100 ms: without the deadline the read would last that long.
            for _ in 0..30 {
                if a.write_all(b"x").is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let t = std::time::Instant::now();
        assert!(read_line(&mut b, 1000).is_err());
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        drop(b);
        writer.join().unwrap();
    }

    #[test]
    fn lines_are_bounded() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        a.write_all(&[b'x'; 100]).unwrap();
        a.write_all(b"\n").unwrap();
        assert_eq!(read_line(&mut b, 50), Err("line longer than 50 bytes".into()));
        let (mut a, mut b) = UnixStream::pair().unwrap();
        a.write_all(b"{\"a\":1}\nrest").unwrap();
        assert_eq!(read_line(&mut b, 50).as_deref(), Ok("{\"a\":1}"));
        drop(a);
        assert!(read_line(&mut b, 50).is_err(), "no newline before EOF");
    }
}

/// Backing files a request may carry (SCM_RIGHTS) at most.
pub const MAX_FDS: usize = 8;

/// Room for a cmsg header and MAX_FDS descriptors (CMSG_SPACE, with room to spare).
const CMSG_BYTES: usize = 128;

/// Writes one line carrying `fds` as SCM_RIGHTS: the CLI hands the service the backing files it
/// opened, so the service needs no path of the caller's mount namespace.
pub fn write_line_with_fds(
    s: &mut UnixStream,
    v: &impl Serialize,
    fds: &[std::os::fd::RawFd],
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    if fds.is_empty() {
        return write_line(s, v);
    }
    assert!(fds.len() <= MAX_FDS, "at most {MAX_FDS} descriptors");
    let mut line = serde_json::to_vec(v).map_err(std::io::Error::other)?;
    line.push(b'\n');
    let mut iov =
        libc::iovec { iov_base: line.as_mut_ptr() as *mut libc::c_void, iov_len: line.len() };
    let mut cbuf = [0u64; CMSG_BYTES / 8];
    let fd_bytes = std::mem::size_of_val(fds) as u32;
    // SAFETY: msghdr is plain data; every pointer set below points into locals that outlive the
    // sendmsg call, and CMSG_* only compute offsets inside `cbuf`, which is large and aligned
    // enough for one header and MAX_FDS descriptors.
    let sent = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = libc::CMSG_SPACE(fd_bytes) as usize;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(fd_bytes) as usize;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c) as *mut i32, fds.len());
        libc::sendmsg(s.as_raw_fd(), &msg, libc::MSG_NOSIGNAL)
    };
    if sent < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // The descriptors went with the first byte; the rest of a long line follows plainly.
    s.write_all(&line[sent as usize..])
}

/// Reads one line like `read_line`, and the descriptors it carried (SCM_RIGHTS), owned.
pub fn read_line_with_fds(
    s: &mut UnixStream,
    max: usize,
) -> Result<(String, Vec<std::os::fd::OwnedFd>), String> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let mut first = [0u8; 4096];
    let mut cbuf = [0u64; CMSG_BYTES / 8];
    let mut iov =
        libc::iovec { iov_base: first.as_mut_ptr() as *mut libc::c_void, iov_len: first.len() };
    let mut fds = Vec::new();
    // SAFETY: as in write_line_with_fds: the msghdr points into locals that outlive recvmsg;
    // the kernel writes at most msg_controllen bytes of control data, and the CMSG_* walk stays
    // inside them. Each descriptor received is new and ours (MSG_CMSG_CLOEXEC).
    let n = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = CMSG_BYTES;
        let n = libc::recvmsg(s.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
        if n >= 0 {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let bytes = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                    let p = libc::CMSG_DATA(c) as *const i32;
                    for i in 0..bytes / 4 {
                        fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(p.add(i))));
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
            if msg.msg_flags & libc::MSG_CTRUNC != 0 {
                return Err(format!("more than {MAX_FDS} descriptors"));
            }
        }
        n
    };
    if n < 0 {
        return Err(format!("read: {}", std::io::Error::last_os_error()));
    }
    if fds.len() > MAX_FDS {
        return Err(format!("more than {MAX_FDS} descriptors"));
    }
    let n = n as usize;
    if let Some(i) = first[..n].iter().position(|&b| b == b'\n') {
        if i > max {
            return Err(format!("line longer than {max} bytes"));
        }
        return String::from_utf8(first[..i].to_vec())
            .map(|l| (l, fds))
            .map_err(|_| "line is not UTF-8".into());
    }
    if n == 0 {
        return Err("the peer closed the connection before a full line".into());
    }
    // The rest of a long line: plain reads, bounded as read_line's. Checked for UTF-8 whole: a
    // character may straddle the two parts.
    let mut line = first[..n].to_vec();
    line.extend(read_line_bytes(s, max.saturating_sub(n))?);
    let line = String::from_utf8(line).map_err(|_| "line is not UTF-8")?;
    Ok((line, fds))
}

#[cfg(test)]
mod fd_tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom};
    use std::os::fd::AsRawFd;

    #[test]
    fn descriptors_travel_with_the_line() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let path = std::env::temp_dir().join(format!("ublk-fast-fdpass-{}", std::process::id()));
        std::fs::write(&path, b"backing").unwrap();
        let f = std::fs::File::open(&path).unwrap();
        let long = "x".repeat(10_000);
        write_line_with_fds(&mut a, &serde_json::json!({ "v": long }), &[f.as_raw_fd()]).unwrap();
        drop(f);
        let _ = std::fs::remove_file(&path);
        let (line, fds) = read_line_with_fds(&mut b, MAX_REQUEST_BYTES).unwrap();
        assert!(line.len() > 10_000 && line.ends_with('}'), "{}", line.len());
        assert_eq!(fds.len(), 1);
        // The same open file, though its name is gone.
        let mut got = std::fs::File::from(fds.into_iter().next().unwrap());
        got.seek(SeekFrom::Start(0)).unwrap();
        let mut s = String::new();
        got.read_to_string(&mut s).unwrap();
        assert_eq!(s, "backing");
    }
}

#[cfg(test)]
mod prop_tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::Value;

    fn cfg(cases: u32) -> ProptestConfig {
        ProptestConfig { failure_persistence: None, ..ProptestConfig::with_cases(cases) }
    }

    fn one_line(input: &impl std::fmt::Debug, e: &str) {
        assert!(!e.is_empty() && !e.contains(['\n', '\r']), "{input:?}: {e:?}");
    }

    /// A parse is a request of this version, or one line saying why not.
    fn check_line(line: &str) {
        match parse_request(line) {
            Ok(r) => assert_eq!(r.version, VERSION),
            Err(e) => one_line(&line, &e),
        }
    }

    /// `bytes` sent down a socket (`req` as the CLI sends it, with a file when `fd`), read as
    /// the service reads a request.
    fn over_socket(bytes: Vec<u8>, req: Option<Request>, fd: bool) -> Result<String, String> {
        use std::os::fd::AsRawFd;
        let (mut a, mut b) = UnixStream::pair().unwrap();
        b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let w = std::thread::spawn(move || {
            let null = std::fs::File::open("/dev/null").unwrap();
            let fds = if fd { vec![null.as_raw_fd()] } else { vec![] };
            let _ = match req {
                Some(r) => write_line_with_fds(&mut a, &r, &fds),
                None => a.write_all(&bytes),
            };
        });
        let r = read_line_with_fds(&mut b, MAX_REQUEST_BYTES).map(|(l, _)| l);
        drop(b);
        w.join().unwrap();
        r
    }

    /// Found by the properties below: an op or field named with a control character made a
    /// multi-line error; a long line with a character across the first read's end was "not
    /// UTF-8".
    #[test]
    fn regressions() {
        for line in [r#"{"version":1,"op":"a\nb"}"#, r#"{"version":1,"op":"status","\r":1}"#] {
            one_line(&line, &parse_request(line).unwrap_err());
        }
        let argv = vec!["é".repeat(3000)];
        let req = Request { version: VERSION, op: Op::Add { argv, cwd: "/".into() } };
        let line = over_socket(Vec::new(), Some(req.clone()), false).unwrap();
        assert_eq!(parse_request(&line), Ok(req));
    }

    fn name() -> impl Strategy<Value = String> {
        const KNOWN: &[&str] = &[
            "version",
            "op",
            "id",
            "all",
            "safe",
            "all_servers",
            "argv",
            "cwd",
            "bytes",
            "timeout_ms",
            "add",
            "del",
            "resize",
            "quiesce",
            "recover",
            "status",
            "shutdown",
        ];
        prop_oneof![3 => prop::sample::select(KNOWN).prop_map(String::from), 1 => ".{0,8}"]
    }

    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            name().prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                prop::collection::vec((name(), inner), 0..4)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    /// Objects that look like requests: known fields more often than not, values of any type.
    fn request_like() -> impl Strategy<Value = String> {
        let version = prop_oneof![Just(Value::from(1)), json()];
        let op = prop_oneof![name().prop_map(Value::from), json()];
        (version, op, prop::collection::vec((name(), json()), 0..4)).prop_map(|(v, op, rest)| {
            let mut m = serde_json::Map::new();
            m.insert("version".into(), v);
            m.insert("op".into(), op);
            m.extend(rest);
            Value::Object(m).to_string()
        })
    }

    fn op() -> impl Strategy<Value = Op> {
        let text = || "(.|[é€𝄞])*";
        prop_oneof![
            (prop::collection::vec(text(), 0..6), text())
                .prop_map(|(argv, cwd)| Op::Add { argv, cwd }),
            (prop::option::of(any::<u32>()), any::<[bool; 3]>())
                .prop_map(|(id, [all, safe, s])| { Op::Del { id, all, safe, all_servers: s } }),
            (any::<u32>(), any::<u64>()).prop_map(|(id, bytes)| Op::Resize { id, bytes }),
            (any::<u32>(), any::<u64>())
                .prop_map(|(id, timeout_ms)| Op::Quiesce { id, timeout_ms }),
            any::<u32>().prop_map(|id| Op::Recover { id }),
            Just(Op::Status {}),
            Just(Op::Shutdown {}),
        ]
    }

    proptest! {
        #![proptest_config(cfg(1000))]

        #[test]
        fn arbitrary_lines(s in any::<String>()) {
            check_line(&s);
        }

        #[test]
        fn request_like_lines(s in request_like()) {
            check_line(&s);
        }

        #[test]
        fn deep_nesting_and_huge_numbers(
            depth in 0usize..20_000,
            digits in 1usize..400,
            obj in any::<bool>(),
        ) {
            let (open, close) = if obj { (r#"{"a":"#, "}") } else { ("[", "]") };
            let nested = format!("{}1{}", open.repeat(depth), close.repeat(depth));
            check_line(&format!(r#"{{"version":1,"op":"add","argv":{nested},"cwd":"/"}}"#));
            let huge = "9".repeat(digits);
            check_line(&format!(r#"{{"version":{huge},"op":"status"}}"#));
            check_line(&format!(r#"{{"version":1,"op":"resize","id":{huge},"bytes":-{huge}}}"#));
        }

        /// What the CLI sends is what the service reads.
        #[test]
        fn requests_round_trip(op in op()) {
            let req = Request { version: VERSION, op };
            let line = serde_json::to_string(&req).unwrap();
            prop_assert_eq!(parse_request(&line), Ok(req));
        }
    }

    proptest! {
        #![proptest_config(cfg(256))]

        /// Any bytes down the socket (lines up to past the limit): a line to parse, or one
        /// line saying why not.
        #[test]
        fn arbitrary_bytes_over_the_socket(
            mut bytes in prop::collection::vec(any::<u8>(), 0..9000),
            newline_at in prop::option::of(any::<prop::sample::Index>()),
            long in prop::option::of(MAX_REQUEST_BYTES - 8..MAX_REQUEST_BYTES + 8),
        ) {
            if let Some(n) = long {
                bytes.resize(n, b'x');
            }
            if let Some(i) = newline_at {
                let i = i.index(bytes.len() + 1);
                bytes.insert(i, b'\n');
            }
            match over_socket(bytes.clone(), None, false) {
                Ok(line) => check_line(&line),
                Err(e) => one_line(&bytes.len(), &e),
            }
        }

        /// A request whose line is long and not ASCII arrives whole, with or without a file.
        #[test]
        fn requests_round_trip_over_the_socket(
            argv in prop::collection::vec("[a-zé€𝄞]{0,3000}", 1..4),
            fd in any::<bool>(),
        ) {
            let req = Request { version: VERSION, op: Op::Add { argv, cwd: "/".into() } };
            let got = over_socket(Vec::new(), Some(req.clone()), fd)
                .map_err(|e| TestCaseError::fail(format!("read: {e}")))?;
            prop_assert_eq!(parse_request(&got), Ok(req));
        }
    }
}
