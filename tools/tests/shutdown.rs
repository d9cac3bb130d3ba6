//! Removal under load: `del` and SIGTERM finish promptly with I/O in flight, the issuers get
//! errors instead of hanging, and nothing is left behind.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// fio at depth 256 on 2 jobs, random reads and writes, until the device goes away.
fn spawn_heavy_fio(path: &str) -> Child {
    spawn_fio(&[
        "--name=heavy",
        &format!("--filename={path}"),
        "--ioengine=io_uring",
        "--direct=1",
        "--rw=randrw",
        "--bs=4k",
        "--iodepth=256",
        "--numjobs=2",
        "--time_based",
        "--runtime=120",
    ])
}

/// Reads and writes device `id` has completed (its daemon's counters).
fn ios_done(id: &str) -> u64 {
    let o = ublk(&["list", "-n", id, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    let s = &v[0]["stats"];
    s["reads"].as_u64().unwrap_or(0) + s["writes"].as_u64().unwrap_or(0)
}

/// Waits until device `id` has done `n` I/Os (30 s at most); returns how many it did.
fn wait_busy(id: &str, n: u64) -> u64 {
    let t = Instant::now();
    loop {
        let done = ios_done(id);
        if done >= n || t.elapsed() > Duration::from_secs(30) {
            assert!(done >= n, "fio did only {done} I/Os in 30 s");
            return done;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits up to `limit` for fio to exit; it must fail (its device vanished), not hang.
fn expect_fio_failed(mut fio: Child, limit: Duration) -> Duration {
    let t = Instant::now();
    loop {
        if let Some(st) = fio.try_wait().unwrap() {
            assert!(!st.success(), "fio succeeded although its device was removed under it");
            return t.elapsed();
        }
        if t.elapsed() > limit {
            let _ = fio.kill();
            panic!("fio still running {limit:?} after its device was removed");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn del_under_depth_256_load_returns_fast_and_fails_the_io() {
    let f = "/tmp/ublk-fast-it-del-load.img";
    sh(&format!("rm -f {f} && truncate -s 256M {f}"));
    for (zc, more) in [("auto", ""), ("off", ""), ("auto", "--batch-io")] {
        if skip_mode(more) {
            continue;
        }
        let mut args = vec!["loop", f, "-q", "2", "-d", "256", "--zero-copy", zc];
        args.extend(more.split_whitespace());
        let dev = Dev::add(&args);
        let pid = dev.info()["pid"].as_i64().unwrap() as i32;
        let fio = spawn_heavy_fio(&dev.path);
        // Delete once the load is real: thousands of I/Os done, hundreds in flight.
        let busy = wait_busy(&dev.id.to_string(), 5000);
        let in_flight = dev.stat("io_now");
        let t = Instant::now();
        let o = ublk(&["del", "-n", &dev.id.to_string()]);
        let del_took = t.elapsed();
        assert!(o.status.success(), "del under load failed: {}", stderr(&o));
        assert!(del_took < Duration::from_secs(10), "del took {del_took:?}");
        let fio_took = expect_fio_failed(fio, Duration::from_secs(30));
        assert!(wait_gone(&dev.path), "{} still there", dev.path);
        let t = Instant::now();
        while daemons().contains(&pid) && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(!daemons().contains(&pid), "daemon {pid} still runs after del");
        assert!(!dev_ids().contains(&dev.id), "device {} still listed", dev.id);
        assert!(!std::path::Path::new(&format!("/run/ublk-fast/{}.json", dev.id)).exists());
        println!(
            "zero copy {zc} {more}: del after {busy} I/Os ({in_flight} in flight) returned in \
             {del_took:.1?}; fio failed {fio_took:.1?} later; daemon gone"
        );
        std::mem::forget(dev);
    }
    let _ = std::fs::remove_file(f);
}

#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn sigterm_under_load_removes_the_device_and_exits_0() {
    require_driver();
    let f = "/tmp/ublk-fast-it-term-load.img";
    sh(&format!("rm -f {f} && truncate -s 256M {f}"));
    let mut d = Command::new(bin())
        .args(["loop", f, "-q", "2", "-d", "256", "--foreground"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(d.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let path = line.trim().to_string();
    assert!(path.starts_with("/dev/ublkb"), "foreground printed {path:?}");
    let fio = spawn_heavy_fio(&path);
    let busy = wait_busy(path.trim_start_matches("/dev/ublkb"), 5000);
    let t = Instant::now();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
    let st = loop {
        if let Some(st) = d.try_wait().unwrap() {
            break st;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "daemon still running 10 s after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = t.elapsed();
    let err = d.wait_with_output().unwrap().stderr;
    assert!(st.success(), "exit {st} after SIGTERM: {}", String::from_utf8_lossy(&err));
    let fio_took = expect_fio_failed(fio, Duration::from_secs(30));
    assert!(wait_gone(&path), "{path} still there");
    println!(
        "SIGTERM after {busy} I/Os: exit 0 in {took:.1?}, device gone, fio failed {fio_took:.1?} later"
    );
    let _ = std::fs::remove_file(f);
}
