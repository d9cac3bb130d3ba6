//! The null target against the real driver: size, zeros, fio, list, del, foreground; and the
//! engine's latency mode (--poll-us, on a loop device so that data is verified).

mod common;

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn null_device_has_its_size_and_reads_zeros() {
    for mode in [
        "--zero-copy=auto",
        "--zero-copy=off",
        "--user-copy",
        "--batch-io",
        "--batch-io --zero-copy=off",
        "--batch-io --user-copy",
    ] {
        if !skip_mode(mode) {
            null_size_and_zeros(mode);
        }
    }
}

fn null_size_and_zeros(mode: &str) {
    let mut args = vec!["null", "--size", "1G", "-q", "1"];
    args.extend(mode.split_whitespace());
    let dev = Dev::add(&args);
    println!("{mode}: {}", dev.info()["setup"]);
    assert_eq!(sh(&format!("blockdev --getsize64 {}", dev.path)).trim(), "1073741824");
    // Dirty the tag buffers with a write first: null reads must still return zeros.
    sh(&format!("head -c 4M /dev/urandom | dd of={} bs=1M oflag=direct status=none", dev.path));
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&dev.path)
        .unwrap();
    let layout = std::alloc::Layout::from_size_align(1 << 20, 4096).unwrap();
    // SAFETY: non-zero layout; freed below.
    let p = unsafe { std::alloc::alloc_zeroed(layout) };
    // SAFETY: p points at 1 MiB we own.
    let buf = unsafe { std::slice::from_raw_parts_mut(p, 1 << 20) };
    buf.fill(0xa5);
    let mut total = 0;
    for _ in 0..8 {
        let n = f.read(buf).unwrap();
        assert_eq!(n, 1 << 20);
        assert!(buf.iter().all(|&b| b == 0), "null read returned non-zero bytes");
        total += n;
    }
    // SAFETY: allocated above with this layout.
    unsafe { std::alloc::dealloc(p, layout) };
    assert_eq!(total, 8 << 20);
    drop(f);
    dev.del();
}

#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn fio_on_null_with_one_and_two_queues() {
    for (q, zc, more) in [
        ("1", "auto", ""),
        ("2", "auto", ""),
        ("2", "off", ""),
        ("2", "auto", "--sqpoll"),
        ("2", "off", "--sqpoll"),
        ("2", "off", "--user-copy"),
        ("2", "auto", "--batch-io"),
        ("1", "off", "--batch-io --sqpoll"),
    ] {
        if skip_mode(more) {
            continue;
        }
        let mut args = vec!["null", "--size", "1G", "-q", q, "--zero-copy", zc];
        args.extend(more.split_whitespace());
        let dev = Dev::add(&args);
        let r = fio(&[
            "--name=null",
            &format!("--filename={}", dev.path),
            "--ioengine=io_uring",
            "--direct=1",
            "--rw=randrw",
            "--bs=4k",
            "--iodepth=32",
            "--numjobs=2",
            "--runtime=3",
            "--time_based",
            "--group_reporting",
        ]);
        let (ios, errs) = fio_totals(&r);
        println!("queues={q} zero-copy={zc} {more}: {ios} I/Os in 3 s");
        assert!(ios > 1000, "too few I/Os: {ios}");
        assert_eq!(errs, 0);
        // Big reads: /dev/zero may fill a zero-copy read in several goes.
        let big = fio(&[
            "--name=big",
            &format!("--filename={}", dev.path),
            "--ioengine=io_uring",
            "--direct=1",
            "--rw=read",
            "--bs=512k",
            "--iodepth=32",
            "--size=256M",
        ]);
        assert_eq!(fio_totals(&big), (512, 0), "512 KiB reads");
        assert!(dev.stat("reads") > 0 && dev.stat("writes") > 0);
        assert_eq!(dev.stat("io_errors"), 0);
        dev.del();
    }
}

#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn list_json_reports_the_device() {
    let dev = Dev::add(&["null", "--size", "512M", "-q", "2", "-d", "64", "-n", "5"]);
    assert_eq!(dev.id, 5);
    let v = dev.info();
    assert_eq!(v["id"], 5);
    assert_eq!(v["block_device"], "/dev/ublkb5");
    assert_eq!(v["char_device"], "/dev/ublkc5");
    assert_eq!(v["state"], "LIVE");
    assert_eq!(v["queues"], 2);
    assert_eq!(v["depth"], 64);
    assert_eq!(v["block_size"], 512);
    assert_eq!(v["size_bytes"], 512u64 << 20);
    assert_eq!(v["target"], "null");
    assert_eq!(v["args"][0], "--size=536870912");
    let flags: Vec<&str> =
        v["flags"].as_array().unwrap().iter().map(|f| f.as_str().unwrap()).collect();
    assert!(flags.contains(&"CMD_IOCTL_ENCODE"), "{flags:?}");
    let pid = v["pid"].as_i64().unwrap();
    assert!(daemons().contains(&(pid as i32)), "pid {pid} is not a running ublk-fast");
    // The two-line form (ublksrv's) names the same device, then its target.
    let table = stdout(&ublk(&["list"]));
    assert!(table.contains("dev id 5: nr_hw_queues 2 queue_depth 64 block size 512"), "{table}");
    assert!(table.contains(&format!("daemon pid {pid} flags 0x")), "{table}");
    assert!(table.contains("state LIVE\n") && table.contains("\ttarget null"), "{table}");
    dev.del();
}

#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn del_removes_device_and_daemon() {
    let dev = Dev::add(&["null", "--size", "64M"]);
    let pid = dev.info()["pid"].as_i64().unwrap() as i32;
    let path = dev.path.clone();
    let id = dev.id;
    dev.del();
    assert!(!std::path::Path::new(&path).exists());
    assert!(!dev_ids().contains(&id));
    assert!(!daemons().contains(&pid), "daemon {pid} survived del");
}

#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn foreground_serves_until_sigterm_then_removes_the_device() {
    require_driver();
    let before = dev_ids();
    let mut child = Command::new(bin())
        .args(["null", "--size", "128M", "--foreground"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let path = line.trim().to_string();
    assert!(path.starts_with("/dev/ublkb"), "foreground printed {path:?}");
    // It really serves: read through it.
    sh(&format!("dd if={path} of=/dev/null bs=64k count=16 iflag=direct status=none"));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(status.success(), "foreground exited {status}: {err}");
    assert!(wait_gone(&path), "{path} left behind");
    assert_eq!(dev_ids(), before);
}

#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn del_while_the_device_is_open_does_not_hang() {
    let mut dev = Dev::add(&["null", "--size", "64M"]);
    let f = std::fs::File::open(&dev.path).unwrap();
    let t = std::time::Instant::now();
    let o = ublk(&["del", "-n", &dev.id.to_string()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(t.elapsed() < std::time::Duration::from_secs(15), "del took {:?}", t.elapsed());
    drop(f);
    assert!(wait_gone(&dev.path), "{} still there after its last opener closed", dev.path);
    assert!(wait_gone(&format!("/sys/class/ublk-char/ublkc{}", dev.id)));
    dev.id = u32::MAX; // already deleted
}

#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn batch_io_is_honoured_or_refused() {
    if offers("BATCH_IO") {
        let dev = Dev::add(&["null", "--size", "64M", "-q", "2", "--batch-io"]);
        let setup = dev.info()["setup"].as_str().unwrap().to_string();
        assert!(setup.contains("BATCH_IO commands"), "{setup}");
        // One COMMIT per loop turn however many requests it finished: never more ublk
        // commands than requests (null writes have no backend I/O; its reads do).
        let (w0, q0) = (dev.stat("writes"), dev.stat("sqes"));
        let r = fio(&[
            "--name=batch",
            &format!("--filename={}", dev.path),
            "--ioengine=io_uring",
            "--direct=1",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--number_ios=4096",
        ]);
        assert_eq!(fio_totals(&r).1, 0);
        let (reqs, sqes) = (dev.stat("writes") - w0, dev.stat("sqes") - q0);
        println!(
            "--batch-io: {reqs} writes, {sqes} SQEs ({:.2} per request); {setup}",
            sqes as f64 / reqs as f64
        );
        assert!(reqs >= 4096);
        assert!(sqes <= reqs, "{sqes} SQEs for {reqs} requests");
        dev.del();
        let dev = Dev::add(&["null", "--size", "64M", "-q", "1"]);
        assert!(dev.info()["setup"].as_str().unwrap().contains("per-tag commands"));
        dev.del();
    } else {
        println!("this driver has no BATCH_IO: --batch-io must be refused");
        check_refused(&format!("{} null --batch-io", bin()), "does not offer BATCH_IO");
    }
}

#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn zero_copy_on_is_honoured_or_refused() {
    let offered = offers("AUTO_BUF_REG");
    if offered {
        let dev = Dev::add(&["null", "--size", "64M", "--zero-copy", "on"]);
        assert!(uses_zero_copy(&dev));
        dev.del();
        let dev = Dev::add(&["null", "--size", "64M", "--zero-copy", "off"]);
        assert!(!uses_zero_copy(&dev));
        dev.del();
    } else {
        println!("this driver has no AUTO_BUF_REG: --zero-copy on must be refused");
        check_refused(&format!("{} null --zero-copy on", bin()), "does not offer AUTO_BUF_REG");
    }
    check_refused(&format!("{} null --zero-copy maybe", bin()), "invalid value 'maybe'");
}

/// The service's CPU time so far (user + system), in clock ticks.
fn service_ticks() -> u64 {
    daemons()
        .iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .map(|s| {
            let f: Vec<&str> = s.rsplit(')').next().unwrap_or("").split_whitespace().collect();
            f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
                + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        })
        .sum()
}

/// Latency mode: with --poll-us the core reaps the next qd1 request without sleeping (polls
/// that a completion ended are counted), data stays right, and an idle device costs no CPU.
#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn poll_us_saves_wake_ups_and_costs_nothing_when_idle() {
    let img = "/tmp/ublk-fast-it-poll.img";
    sh(&format!("truncate -s 0 {img} && truncate -s 64M {img}"));
    let dev = Dev::add(&["loop", img, "--poll-us", "200", "-q", "1"]);
    let r = fio(&[
        "--name=poll",
        &format!("--filename={}", dev.path),
        "--ioengine=io_uring",
        "--direct=1",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=1",
        "--size=8M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
    ]);
    assert_eq!(fio_totals(&r).1, 0);
    let (hits, misses, ns) = (dev.stat("poll_hits"), dev.stat("poll_misses"), dev.stat("poll_ns"));
    println!("qd1 randwrite + verify: polls ended by a completion {hits}, ran out {misses}, {ns} ns polling");
    assert!(hits > 0, "no poll ever caught a request");
    // Idle: no request, so no busy turn, so no polling.
    let t0 = service_ticks();
    std::thread::sleep(Duration::from_secs(3));
    let idle = service_ticks() - t0;
    let after = dev.stat("poll_ns");
    println!("idle 3 s: service CPU {idle} ticks, polling {} ns more", after - ns);
    assert!(idle <= 10, "the idle service used {idle} ticks of CPU in 3 s");
    dev.del();
    let _ = std::fs::remove_file(img);
}
