//! The fault target: injected errors reach the issuer with their errno, the device stays usable,
//! and the counters and metrics count them.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// One 4k O_DIRECT read or write at block `blk` through dd: Ok, or dd's error line.
fn dd_block(dev: &Dev, write: bool, blk: u64, src: &str) -> Result<(), String> {
    let cmd = if write {
        format!(
            "dd if={src} of={} bs=4k count=1 skip={blk} seek={blk} oflag=direct conv=notrunc status=none",
            dev.path
        )
    } else {
        format!("dd if={} of=/dev/null bs=4k count=1 skip={blk} iflag=direct status=none", dev.path)
    };
    let o = sh_any(&cmd);
    if o.status.success() {
        Ok(())
    } else {
        Err(stderr(&o).trim().to_string())
    }
}

#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn every_nth_read_fails_with_eio_and_the_device_stays_usable() {
    for zc in ["auto", "off"] {
        let port = if zc == "auto" { 9651 } else { 9652 };
        let addr = format!("127.0.0.1:{port}");
        let dev = Dev::add(&[
            "fault",
            "--op",
            "read",
            "--every",
            "4",
            "--fail",
            "null",
            "--size",
            "64M",
            "-q",
            "1",
            "--zero-copy",
            zc,
            "--metrics",
            &addr,
        ]);
        // The kernel's partition scan and udev read the device first; let them finish, and
        // count from where they left the counter.
        let _ = sh_any("udevadm settle");
        let errors_before = dev.stat("io_errors");
        let mut failed = Vec::new();
        for blk in 1..=16 {
            if let Err(e) = dd_block(&dev, false, blk, "") {
                assert!(e.contains("Input/output error"), "read {blk}: {e}");
                failed.push(blk);
            }
            // Writes are not counted and never fail.
            dd_block(&dev, true, blk, "/dev/zero").unwrap();
        }
        assert_eq!(failed.len(), 4, "zero copy {zc}: failed reads {failed:?}");
        assert!(failed.windows(2).all(|w| w[1] - w[0] == 4), "not every 4th: {failed:?}");
        let errors = dev.stat("io_errors");
        assert_eq!(errors - errors_before, 4);
        let m = http_get(&addr, "/metrics");
        let line = m
            .lines()
            .find(|l| l.starts_with("ublk_fast_io_errors_total{") && l.contains("op=\"read\""))
            .unwrap_or_else(|| panic!("no read errors family in:\n{m}"));
        assert!(line.ends_with(&format!(" {errors}")), "metrics: {line}, counters: {errors}");
        println!("zero copy {zc}: reads {failed:?} failed with EIO; metrics: {line}");
        dev.del();
    }
}

#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn failed_writes_report_their_errno_and_leave_the_rest_written() {
    let f = "/tmp/ublk-fast-it-fault-enospc.img";
    let src = "/tmp/ublk-fast-it-fault-src";
    sh(&format!("rm -f {f} && truncate -s 16M {f} && head -c 64K /dev/urandom > {src}"));
    let dev = Dev::add(&[
        "fault",
        "--op",
        "write",
        "--every",
        "3",
        "--fail=enospc",
        "loop",
        f,
        "-q",
        "1",
    ]);
    let mut failed = Vec::new();
    for blk in 0..12 {
        if let Err(e) = dd_block(&dev, true, blk, src) {
            assert!(e.contains("No space left on device"), "write {blk}: {e}");
            failed.push(blk);
        }
    }
    assert_eq!(failed, [2, 5, 8, 11]);
    // Reads are untouched; the written blocks hold the data, the failed ones zeros.
    for blk in 0..12u64 {
        let want = if failed.contains(&blk) {
            "cmp -n 4096 /dev/zero -".to_string()
        } else {
            format!("cmp -n 4096 -i {}:0 {src} -", blk * 4096)
        };
        sh(&format!(
            "dd if={} bs=4k count=1 skip={blk} iflag=direct status=none | {want}",
            dev.path
        ));
    }
    dev.del();
    sh(&format!("cmp -n 8192 {src} {f}"));
    println!("writes 2, 5, 8, 11 failed with ENOSPC; the other 8 landed, byte for byte");
    let _ = std::fs::remove_file(f);
    let _ = std::fs::remove_file(src);
}

#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn delayed_writes_are_slow_but_correct() {
    let f = "/tmp/ublk-fast-it-fault-delay.img";
    sh(&format!("rm -f {f} && truncate -s 16M {f}"));
    let dev = Dev::add(&[
        "fault",
        "--op",
        "write",
        "--every",
        "2",
        "--delay-ms",
        "300",
        "loop",
        f,
        "-q",
        "1",
    ]);
    let t = Instant::now();
    let r = fio(&[
        "--name=delay",
        &format!("--filename={}", dev.path),
        "--ioengine=io_uring",
        "--direct=1",
        "--rw=write",
        "--bs=4k",
        "--iodepth=1",
        "--size=40k",
        "--verify=crc32c",
        "--verify_fatal=1",
    ]);
    let took = t.elapsed();
    assert_eq!(fio_totals(&r).1, 0);
    // 10 sequential writes at depth 1, every second one held 300 ms.
    assert!(took >= Duration::from_millis(1500), "10 writes took only {took:?}");
    let lat = &r["jobs"][0]["write"]["clat_ns"];
    let max_ms = lat["max"].as_f64().unwrap() / 1e6;
    assert!(max_ms >= 300.0, "slowest write {max_ms:.1} ms");
    assert_eq!(dev.stat("io_errors"), 0);
    println!("10 writes, 5 held 300 ms: {took:.1?} in all, slowest {max_ms:.0} ms, data verified");
    dev.del();
    let _ = std::fs::remove_file(f);
}
