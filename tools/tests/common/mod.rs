//! Helpers for the integration tests. They run against the real ublk driver (inside the VM of
//! `tools/vm/run.sh`, or directly on a host that has `ublk_drv`) and are `#[ignore]`d in a plain
//! `cargo test` on a host without it: `tools/test.sh` runs them with `--ignored`.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const NEEDS_UBLK: &str = "needs the ublk driver: run through tools/test.sh";

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ublk-fast")
}

/// Loads ublk_drv if needed; the driver is a hard requirement of these tests.
pub fn require_driver() {
    if !Path::new("/dev/ublk-control").exists() {
        let _ = Command::new("modprobe").arg("ublk_drv").status();
    }
    assert!(
        Path::new("/dev/ublk-control").exists(),
        "no /dev/ublk-control: these tests need ublk_drv (run them through tools/test.sh)"
    );
}

/// Whether the driver offers a feature, by its short name (`BATCH_IO`, as in `features --json`).
pub fn offers(feature: &str) -> bool {
    require_driver();
    let v: serde_json::Value =
        serde_json::from_slice(&ublk(&["features", "--json"]).stdout).expect("features --json");
    v["names"].as_array().expect("names").iter().any(|n| n == feature)
}

/// Says that the calling test cannot run here and why; `tools/it.sh` counts it as skipped
/// (the test returns right after).
pub fn skip(reason: &str) {
    println!("SKIP: {reason}");
}

/// True (and says so) when a mode needs a driver feature this kernel lacks: the caller skips
/// that mode instead of failing or passing it.
pub fn skip_mode(mode: &str) -> bool {
    if mode.contains("--batch-io") && !offers("BATCH_IO") {
        println!("SKIP {mode}: this ublk driver does not offer BATCH_IO (Linux 7.0+)");
        return true;
    }
    false
}

pub fn ublk(args: &[&str]) -> Output {
    Command::new(bin()).args(args).stdin(Stdio::null()).output().expect("run ublk-fast")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs a shell command; panics with its output if it fails.
pub fn sh(cmd: &str) -> String {
    let o = Command::new("bash").arg("-c").arg(cmd).output().expect("run bash");
    assert!(o.status.success(), "`{cmd}` failed ({}):\n{}{}", o.status, stdout(&o), stderr(&o));
    stdout(&o)
}

/// Runs a shell command and returns its full output, whatever its status.
pub fn sh_any(cmd: &str) -> Output {
    Command::new("bash").arg("-c").arg(cmd).output().expect("run bash")
}

/// A device created by `ublk-fast`, deleted on drop.
pub struct Dev {
    pub id: u32,
    pub path: String,
}

impl Dev {
    pub fn add(args: &[&str]) -> Dev {
        Dev::add_with_env(args, &[])
    }

    /// `add` with extra environment variables for the daemon (test hooks).
    pub fn add_with_env(args: &[&str], env: &[(&str, &str)]) -> Dev {
        require_driver();
        let o = Command::new(bin())
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .output()
            .expect("run ublk-fast");
        assert!(o.status.success(), "ublk-fast {args:?} failed: {}", stderr(&o));
        let path = stdout(&o).trim().to_string();
        let id = path
            .strip_prefix("/dev/ublkb")
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("unexpected output {path:?}"));
        assert!(Path::new(&path).exists(), "{path} missing after add");
        Dev { id, path }
    }

    pub fn info(&self) -> serde_json::Value {
        let o = ublk(&["list", "-n", &self.id.to_string(), "--json"]);
        assert!(o.status.success(), "list failed: {}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("list --json is JSON");
        v[0].clone()
    }

    pub fn stat(&self, name: &str) -> u64 {
        self.info()["stats"][name].as_u64().unwrap_or_else(|| panic!("no stat {name}"))
    }

    /// Deletes the device and checks it is really gone.
    pub fn del(mut self) {
        let o = ublk(&["del", "-n", &self.id.to_string()]);
        assert!(o.status.success(), "del failed: {}", stderr(&o));
        assert!(wait_gone(&self.path), "{} still there after del", self.path);
        self.id = u32::MAX;
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        if self.id != u32::MAX {
            let _ = ublk(&["del", "-n", &self.id.to_string()]);
        }
    }
}

pub fn wait_gone(path: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(path).exists() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Ids of the ublk devices that exist.
pub fn dev_ids() -> Vec<u32> {
    let mut v: Vec<u32> = std::fs::read_dir("/sys/class/ublk-char")
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("ublkc")?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort_unstable();
    v
}

/// PIDs of running ublk-fast processes (daemons).
pub fn daemons() -> Vec<i32> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm")) {
            if comm.trim() == "ublk-fast" {
                v.push(pid);
            }
        }
    }
    v
}

/// Runs fio with `args` (plus JSON output) and returns its parsed report; fio must succeed.
pub fn fio(args: &[&str]) -> serde_json::Value {
    let o = Command::new("fio")
        .args(args)
        .args(["--output-format=json", "--eta=never"])
        .output()
        .expect("run fio");
    let out = stdout(&o);
    assert!(o.status.success(), "fio {args:?} failed ({}):\n{out}\n{}", o.status, stderr(&o));
    fio_report(&out).expect("fio printed no JSON report")
}

/// Starts fio with `args` (plus JSON output) in the background, its output piped.
pub fn spawn_fio(args: &[&str]) -> std::process::Child {
    Command::new("fio")
        .args(args)
        .args(["--output-format=json", "--eta=never"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run fio")
}

/// fio's JSON report in its stdout (fio may print warnings before it).
pub fn fio_report(out: &str) -> Option<serde_json::Value> {
    serde_json::from_str(&out[out.find('{')?..]).ok()
}

/// Total I/Os and errors over all jobs of a fio report.
pub fn fio_totals(v: &serde_json::Value) -> (u64, u64) {
    let mut ios = 0;
    let mut errs = 0;
    for j in v["jobs"].as_array().expect("jobs") {
        for d in ["read", "write"] {
            ios += j[d]["total_ios"].as_u64().unwrap_or(0);
        }
        errs += j["error"].as_u64().unwrap_or(0);
    }
    (ios, errs)
}

/// Runs `cmd` (a full command line, run by bash) and checks the failure contract.
pub fn check_refused(cmd: &str, expect: &str) {
    let devs = dev_ids();
    let procs = daemons();
    let o = sh_any(cmd);
    let err = stderr(&o);
    assert!(!o.status.success(), "`{cmd}` succeeded; stdout: {}", stdout(&o));
    assert!(!err.contains("panicked"), "`{cmd}` panicked: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "`{cmd}`: not one line:\n{err}");
    assert!(err.starts_with("ublk-fast: error: "), "`{cmd}`: {err}");
    assert!(err.contains(expect), "`{cmd}`: expected {expect:?} in: {err}");
    assert_eq!(dev_ids(), devs, "`{cmd}` left a device behind");
    assert_eq!(daemons(), procs, "`{cmd}` left a process behind");
    println!("ok: {cmd}\n    -> {}", err.trim_end());
}

/// Whether the device was created with UBLK_F_AUTO_BUF_REG (zero copy).
pub fn uses_zero_copy(dev: &Dev) -> bool {
    dev.info()["flags"].as_array().unwrap().iter().any(|f| f == "AUTO_BUF_REG")
}

/// GET over HTTP/1.0; the body if the answer is 200, `None` on any failure.
pub fn try_get(addr: &str, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    head.split(' ').nth(1).filter(|c| *c == "200")?;
    Some(body.to_string())
}

pub fn http_get(addr: &str, path: &str) -> String {
    try_get(addr, path).unwrap_or_else(|| panic!("GET http://{addr}{path} failed"))
}

/// Waits until the device's state (as `list` reports it) is `want`; panics after `limit`.
pub fn wait_state(dev: &Dev, want: &str, limit: Duration) {
    let t = Instant::now();
    loop {
        let s = dev.info()["state"].as_str().unwrap_or("").to_string();
        if s == want {
            println!("state {want} after {:.1?}", t.elapsed());
            return;
        }
        assert!(t.elapsed() < limit, "state {s}, wanted {want} within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The crash job: random writes of crc32c-stamped 4k blocks over `size` of `path`; its verify
/// state lives in `dir`. The writer and the verifier must describe the same job.
pub fn crash_job(path: &str, dir: &str, size: &str) -> Vec<String> {
    let mut a =
        vec!["--name=crash".to_string(), format!("--filename={path}"), format!("--aux-path={dir}")];
    a.extend(
        ["--ioengine=io_uring", "--direct=1", "--rw=randwrite", "--bs=4k", "--iodepth=16"]
            .into_iter()
            .chain([&format!("--size={size}") as &str, "--verify=crc32c"])
            .map(String::from),
    );
    a
}

/// Reads back every block the writing fio had acknowledged when it exited (its saved verify
/// state) and checks its crc32c; returns the bytes verified.
pub fn verify_acknowledged(path: &str, dir: &str, size: &str) -> u64 {
    let mut args = crash_job(path, dir, size);
    args.extend(["--verify_only", "--verify_state_load=1", "--verify_fatal=1"].map(String::from));
    let v = fio(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(fio_totals(&v).1, 0, "verify of the acknowledged writes found errors");
    v["jobs"][0]["read"]["io_bytes"].as_u64().unwrap()
}
