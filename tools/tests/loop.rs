//! The loop target's contract: every byte right, every durability request honoured.
//! Backing files live on the guest's tmpfs /tmp (O_DIRECT capable since Linux 6.6); the block
//! device backend is a kernel loop device over such a file.

mod common;

use std::path::Path;

use common::*;

/// A backing file of `size` bytes filled from `src` (/dev/zero or /dev/urandom).
fn backing(name: &str, size_mb: u64, src: &str) -> String {
    let p = format!("/tmp/ublk-fast-it-{name}.img");
    sh(&format!("dd if={src} of={p} bs=1M count={size_mb} status=none"));
    p
}

fn rm(p: &str) {
    let _ = std::fs::remove_file(p);
}

/// A kernel loop device (direct I/O) over `file`, detached on drop.
struct KLoop(String);

impl KLoop {
    fn new(file: &str) -> KLoop {
        let _ = sh_any("modprobe loop");
        KLoop(sh(&format!("losetup --direct-io=on -f --show {file}")).trim().to_string())
    }
}

impl Drop for KLoop {
    fn drop(&mut self) {
        let _ = sh_any(&format!("losetup -d {}", self.0));
    }
}

/// fio random writes + crc32c verify: 4k, 64k, 1M and a mixed split, at depths 1, 32, 128.
fn fio_verify_matrix(dev: &str) -> u64 {
    let jobfile = format!("/tmp/verify-{}.fio", dev.replace('/', "_"));
    let mut job = format!(
        "[global]\nfilename={dev}\nioengine=io_uring\ndirect=1\nrw=randwrite\nverify=crc32c\n\
         do_verify=1\nverify_fatal=1\nstonewall\n"
    );
    for (bs, size) in [
        ("bs=4k", "4M"),
        ("bs=64k", "16M"),
        ("bs=1M", "32M"),
        ("bssplit=4k/40:16k/30:64k/20:1M/10", "16M"),
    ] {
        for qd in [1, 32, 128] {
            job += &format!(
                "[{}-qd{qd}]\n{bs}\nsize={size}\niodepth={qd}\n",
                bs.replace(['=', '/', ':'], "_")
            );
        }
    }
    std::fs::write(&jobfile, job).unwrap();
    let r = fio(&[&jobfile]);
    rm(&jobfile);
    let (ios, errs) = fio_totals(&r);
    assert_eq!(errs, 0);
    assert_eq!(r["jobs"].as_array().unwrap().len(), 12);
    ios
}

/// When the driver cannot register a request's pages (here: its slot is taken by a test hook),
/// the queue registers them itself and serves the request with no error and no copy.
#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn zero_copy_fallback_registers_the_buffer_itself() {
    if !offers("AUTO_BUF_REG") || !offers("ZERO_COPY") {
        skip("this ublk driver lacks AUTO_BUF_REG or ZERO_COPY (REGISTER_IO_BUF)");
        return;
    }
    let f = backing("zc-fallback", 128, "/dev/zero");
    for more in ["", "--batch-io"] {
        if skip_mode(more) {
            continue;
        }
        let mut args = vec!["loop", &f, "-q", "1", "-d", "16", "--zero-copy", "on"];
        args.extend(more.split_whitespace());
        // Tags 0..4 of 16 can never be registered by the driver.
        let dev = Dev::add_with_env(&args, &[("UBLK_FAST_TEST_ZC_BUSY_SLOTS", "4")]);
        let ios = fio_verify_matrix(&dev.path);
        let fallbacks = dev.stat("zero_copy_fallbacks");
        println!("zero copy {more}: {ios} I/Os verified, {fallbacks} served by the fallback");
        assert!(fallbacks > 100, "only {fallbacks} fallbacks");
        assert_eq!(dev.stat("io_errors"), 0);
        dev.del();
    }
    rm(&f);
}

#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn fio_verify_on_a_file_backend() {
    let f = backing("fio-file", 128, "/dev/zero");
    for (q, zc, more) in [
        ("1", "auto", ""),
        ("2", "auto", ""),
        ("2", "off", ""),
        ("2", "auto", "--sqpoll"),
        ("1", "off", "--sqpoll=50"),
        ("2", "off", "--user-copy"),
        ("2", "auto", "--batch-io"),
        ("1", "off", "--batch-io"),
        ("2", "off", "--batch-io --user-copy"),
        ("2", "auto", "--batch-io --sqpoll"),
    ] {
        if skip_mode(more) {
            continue;
        }
        let mut args = vec!["loop", &f, "-q", q, "--zero-copy", zc];
        args.extend(more.split_whitespace());
        let dev = Dev::add(&args);
        let setup = dev.info()["setup"].as_str().unwrap().to_string();
        assert_eq!(setup.contains("SQPOLL"), more.contains("sqpoll"), "{setup}");
        assert_eq!(setup.contains("user copy"), more.contains("user-copy"), "{setup}");
        assert_eq!(setup.contains("BATCH_IO"), more.contains("batch-io"), "{setup}");
        let ios = fio_verify_matrix(&dev.path);
        println!("file backend, queues={q}, {more}: {ios} I/Os verified, 12 jobs; {setup}");
        assert_eq!(dev.stat("io_errors"), 0);
        dev.del();
    }
    rm(&f);
}

#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn fio_verify_on_a_block_device_backend() {
    let f = backing("fio-blk", 128, "/dev/zero");
    let kl = KLoop::new(&f);
    for (q, zc) in [("1", "auto"), ("2", "off")] {
        let dev = Dev::add(&["loop", &kl.0, "-q", q, "--zero-copy", zc]);
        let info = dev.info();
        assert_eq!(info["size_bytes"], 128u64 << 20);
        let zc = if uses_zero_copy(&dev) { "on" } else { "off" };
        let ios = fio_verify_matrix(&dev.path);
        println!(
            "block backend {}, queues={q}, zero copy {zc}: {ios} I/Os verified, 12 jobs",
            kl.0
        );
        dev.del();
    }
    drop(kl);
    rm(&f);
}

#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn bytes_written_through_the_device_are_the_bytes_in_the_file_and_back() {
    let f = backing("identity", 64, "/dev/zero");
    let pat = "/tmp/ublk-fast-it-pattern";
    sh(&format!("head -c 24M /dev/urandom > {pat}"));
    // Through the device into the file, at an odd 4 KiB-aligned offset.
    let dev = Dev::add(&["loop", &f]);
    sh(&format!(
        "dd if={pat} of={} bs=64k seek=151552 oflag=direct,seek_bytes status=none conv=notrunc",
        dev.path
    ));
    dev.del();
    sh(&format!("cmp -n 25165824 {pat} <(tail -c +151553 {f})"));
    sh(&format!("cmp -n 151552 /dev/zero {f}"));
    // From the file out through the device.
    sh(&format!(
        "dd if={pat} of={f} bs=1M seek=33554432 oflag=seek_bytes conv=notrunc,fsync status=none"
    ));
    // Through the page cache this time (--buffered).
    let dev = Dev::add(&["loop", &f, "-q", "2", "--buffered", "--zero-copy", "off"]);
    sh(&format!(
        "cmp -n 25165824 {pat} <(dd if={} bs=1M skip=32 count=24 iflag=direct status=none)",
        dev.path
    ));
    dev.del();
    rm(pat);
    rm(&f);
}

/// mkfs, a tree of files, fsck, then the same files through a new device. ext4 runs on the
/// default 512-byte logical blocks with zero copy where offered, xfs on `--block-size 4096`
/// in copy mode.
fn fs_round_trip(fs: &str) {
    let bs = if fs == "ext4" { "512" } else { "4096" };
    let zc = if fs == "ext4" { "auto" } else { "off" };
    let f = "/tmp/ublk-fast-it-fs.img".to_string();
    sh(&format!("rm -f {f}; truncate -s 2G {f}"));
    let mnt = "/tmp/ublk-fast-it-mnt";
    sh(&format!("mkdir -p {mnt}"));
    let dev = Dev::add(&["loop", &f, "-q", "2", "--block-size", bs, "--zero-copy", zc]);
    assert_eq!(sh(&format!("blockdev --getss {}", dev.path)).trim(), bs);
    let _ = sh_any(&format!("modprobe {fs}"));
    let mkfs = if fs == "ext4" { "mkfs.ext4 -q -F" } else { "mkfs.xfs -q -f" };
    sh(&format!("{mkfs} {}", dev.path));
    sh(&format!("mount {} {mnt}", dev.path));
    // A tree: empty, tiny, unaligned, aligned, a few MiB, and one > 1 GiB of random data.
    sh(&format!(
        "cd {mnt} && mkdir -p a/b/c && : > empty && printf x > a/one && \
         head -c 4095 /dev/urandom > a/b/odd && head -c 4096 /dev/urandom > a/b/c/page && \
         head -c 1048583 /dev/urandom > a/meg && head -c 10M /dev/urandom > a/b/ten && \
         for i in $(seq 1 50); do head -c $((i * 1000)) /dev/urandom > a/b/c/f$i; done && \
         head -c 1100M /dev/urandom > big && sync"
    ));
    let sums = sh(&format!("cd {mnt} && find . -type f -print0 | sort -z | xargs -0 sha256sum"));
    assert!(sums.lines().count() >= 57, "{sums}");
    sh(&format!("umount {mnt}"));
    let fsck = if fs == "ext4" { "fsck.ext4 -fn" } else { "xfs_repair -n" };
    sh(&format!("{fsck} {}", dev.path));
    assert!(dev.stat("flushes") > 0, "the filesystem sent no FLUSH");
    assert_eq!(dev.stat("flushes"), dev.stat("backend_fsyncs"));
    dev.del();
    // A new device on the same backing store sees the same files.
    let dev = Dev::add(&["loop", &f, "--block-size", bs]);
    sh(&format!("mount {} {mnt}", dev.path));
    let again = sh(&format!("cd {mnt} && find . -type f -print0 | sort -z | xargs -0 sha256sum"));
    assert_eq!(sums, again, "{fs}: files changed across device re-creation");
    sh(&format!("umount {mnt}"));
    dev.del();
    rm(&f);
    println!(
        "{fs}: {} files, sha256 identical after re-creation, fsck clean",
        sums.lines().count()
    );
}

#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn ext4_survives_fsck_and_device_recreation() {
    fs_round_trip("ext4");
}

#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn xfs_survives_repair_check_and_device_recreation() {
    fs_round_trip("xfs");
}

#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn flush_and_fua_reach_the_backing_store() {
    let f = backing("durable", 32, "/dev/zero");
    let dev = Dev::add(&["loop", &f]);
    let (flush0, fsync0) = (dev.stat("flushes"), dev.stat("backend_fsyncs"));
    // O_DSYNC direct writes to a block device are FUA writes.
    for i in 0..7 {
        sh(&format!("dd if=/dev/urandom of={} bs=4k count=1 seek={i} oflag=direct,dsync conv=notrunc status=none", dev.path));
    }
    assert_eq!(dev.stat("fua_writes"), 7, "the kernel did not send FUA");
    assert_eq!(dev.stat("backend_dsync_writes"), 7, "FUA writes were not written with RWF_DSYNC");
    // fsync on the device is a FLUSH, served with fdatasync on the backing file.
    for _ in 0..5 {
        sh(&format!(
            "python3 -c 'import os; fd = os.open(\"{}\", os.O_WRONLY); os.fsync(fd)'",
            dev.path
        ));
    }
    let flushes = dev.stat("flushes") - flush0;
    let fsyncs = dev.stat("backend_fsyncs") - fsync0;
    println!(
        "7 dsync writes -> 7 FUA -> 7 RWF_DSYNC; 5 fsync -> {flushes} FLUSH -> {fsyncs} fdatasync"
    );
    assert!(flushes >= 5, "{flushes} flushes for 5 fsyncs");
    assert_eq!(flushes, fsyncs);
    dev.del();
    rm(&f);
}

fn allocated_bytes(p: &str) -> u64 {
    sh(&format!("stat -c %b {p}")).trim().parse::<u64>().unwrap() * 512
}

#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn discard_punches_holes_and_write_zeroes_zeroes() {
    let f = backing("discard", 64, "/dev/urandom");
    let dev = Dev::add(&["loop", &f]);
    let before = allocated_bytes(&f);
    sh(&format!("blkdiscard -o 8M -l 16M {}", dev.path));
    let after = allocated_bytes(&f);
    println!("allocated {before} -> {after} bytes after discarding 16 MiB");
    assert!(before - after >= 16 << 20, "discard freed only {} bytes", before - after);
    sh(&format!(
        "cmp -n 16777216 /dev/zero <(dd if={} bs=1M skip=8 count=16 iflag=direct status=none)",
        dev.path
    ));
    assert!(dev.stat("discards") > 0);
    // Write zeroes (BLKZEROOUT) over random data.
    sh(&format!("blkdiscard -z -o 40M -l 4M {}", dev.path));
    sh(&format!(
        "cmp -n 4194304 /dev/zero <(dd if={} bs=1M skip=40 count=4 iflag=direct status=none)",
        dev.path
    ));
    assert!(dev.stat("write_zeroes") > 0);
    // Outside the ranges the data is untouched.
    sh(&format!("cmp -n 8388608 {f} <(dd if={} bs=1M count=8 iflag=direct status=none)", dev.path));
    dev.del();
    // --no-discard: the device offers no discard at all.
    let dev = Dev::add(&["loop", &f, "--no-discard"]);
    let o = sh_any(&format!("blkdiscard -o 0 -l 1M {}", dev.path));
    assert!(!o.status.success(), "discard accepted with --no-discard");
    dev.del();
    rm(&f);
}

#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn two_devices_verify_at_once() {
    let f1 = backing("two-a", 64, "/dev/zero");
    let f2 = backing("two-b", 64, "/dev/zero");
    let d1 = Dev::add(&["loop", &f1, "-q", "2"]);
    let d2 = Dev::add(&["loop", &f2, "-q", "1", "--zero-copy", "off"]);
    let run = |dev: String| {
        std::thread::spawn(move || {
            fio(&[
                "--name=both",
                &format!("--filename={dev}"),
                "--ioengine=io_uring",
                "--direct=1",
                "--rw=randwrite",
                "--bs=16k",
                "--iodepth=32",
                "--size=48M",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
            ])
        })
    };
    let (a, b) = (run(d1.path.clone()), run(d2.path.clone()));
    for r in [a.join().unwrap(), b.join().unwrap()] {
        let (ios, errs) = fio_totals(&r);
        assert!(ios >= 2 * 3072, "{ios}");
        assert_eq!(errs, 0);
    }
    d1.del();
    d2.del();
    rm(&f1);
    rm(&f2);
}

#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn read_only_device_refuses_writes() {
    let f = backing("ro", 16, "/dev/urandom");
    let dev = Dev::add(&["loop", &f, "--read-only"]);
    assert_eq!(sh(&format!("blockdev --getro {}", dev.path)).trim(), "1");
    let o =
        sh_any(&format!("dd if=/dev/zero of={} bs=4k count=1 oflag=direct status=none", dev.path));
    assert!(!o.status.success(), "write to a read-only device succeeded");
    sh(&format!("cmp {f} <(dd if={} bs=1M iflag=direct status=none)", dev.path));
    assert_eq!(dev.info()["args"][1], "--read-only");
    dev.del();
    rm(&f);
}

#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn loop_bad_input_table() {
    require_driver();
    let b = bin();
    let empty = "/tmp/ublk-fast-it-empty.img";
    let odd = "/tmp/ublk-fast-it-odd.img";
    sh(&format!("rm -f {empty}; touch {empty}; head -c 5000 /dev/zero > {odd}"));
    let used = backing("used", 16, "/dev/zero");
    let dev = Dev::add(&["loop", &used]);
    // A file on a read-only filesystem cannot be served read-write.
    let ro = "/tmp/ublk-fast-it-rofs";
    sh(&format!("mkdir -p {ro} && mount -t tmpfs -o size=16M tmpfs {ro} && truncate -s 8M {ro}/f && mount -o remount,ro {ro}"));
    let cases = [
        (format!("{b} loop /tmp/ublk-fast-it-missing.img"), "no such file"),
        (format!("{b} loop /tmp"), "is a directory"),
        (format!("{b} loop {empty}"), "is empty"),
        (format!("{b} loop {odd}"), "not a multiple of the 512-byte block size"),
        (format!("{b} loop {odd} --block-size 4096"), "not a multiple of the 4096-byte block size"),
        (format!("{b} loop {used}"), "already in use by another ublk-fast device"),
        (format!("{b} loop {used} --block-size 3000"), "must be 512, 1024, 2048 or 4096"),
        (format!("{b} loop {ro}/f"), "read-only filesystem: add --read-only"),
        (
            format!("setpriv --reuid=65534 --regid=65534 --clear-groups {b} loop {used}"),
            "is not open to you: run as root",
        ),
    ];
    for (cmd, expect) in &cases {
        check_refused(cmd, expect);
    }
    // Read-only on the read-only filesystem works.
    let rodev = Dev::add(&["loop", &format!("{ro}/f"), "--read-only"]);
    rodev.del();
    sh(&format!("umount {ro}"));
    dev.del();
    // A filesystem that refuses O_DIRECT (ramfs) gets the --buffered hint; --buffered works.
    let rd = "/tmp/ublk-fast-it-ramfs";
    sh(&format!("mkdir -p {rd} && mount -t ramfs ramfs {rd} && head -c 8M /dev/zero > {rd}/f"));
    let vfs = format!("{rd}/f");
    check_refused(&format!("{b} loop {vfs}"), "--buffered");
    let d = Dev::add(&["loop", &vfs, "--buffered"]);
    sh(&format!("dd if=/dev/urandom of={} bs=64k count=4 oflag=direct status=none", d.path));
    d.del();
    sh(&format!("umount {rd}"));
    for p in [empty, odd, used.as_str()] {
        rm(p);
    }
    assert!(Path::new("/dev/ublk-control").exists());
}

/// The engine's modes each carry a filesystem: mkfs, files, fsck, and the same bytes after the
/// device is recreated in the same mode.
#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn ext4_in_every_engine_mode() {
    let f = backing("modes", 128, "/dev/zero");
    let src = "/tmp/ublk-fast-it-modes-src";
    let mnt = "/tmp/ublk-fast-it-modes-mnt";
    sh(&format!(
        "rm -rf {src} {mnt} && mkdir -p {src} {mnt} && for i in 1 2 3 4 5 6; do \
         head -c $((i * 700000)) /dev/urandom > {src}/f$i; done"
    ));
    let sums = sh(&format!("cd {src} && sha256sum f*"));
    for mode in [
        "--zero-copy=off",
        "--zero-copy=auto",
        "--zero-copy=off --sqpoll",
        "--zero-copy=auto --sqpoll -q 2",
        "--user-copy",
        "--user-copy --sqpoll -q 2",
        "--batch-io",
        "--batch-io --zero-copy=off -q 2",
        "--batch-io --user-copy",
        "--batch-io --sqpoll -q 2",
    ] {
        if skip_mode(mode) {
            continue;
        }
        let mut args = vec!["loop", &f];
        args.extend(mode.split_whitespace());
        let dev = Dev::add(&args);
        let setup = dev.info()["setup"].as_str().unwrap().to_string();
        sh(&format!(
            "mkfs.ext4 -q -F {p} && mount {p} {mnt} && cp {src}/f* {mnt}/ && umount {mnt} && \
             fsck.ext4 -fn {p}",
            p = dev.path
        ));
        dev.del();
        let dev = Dev::add(&args);
        sh(&format!(
            "mount {p} {mnt} && cd {mnt} && echo '{sums}' | sha256sum --quiet -c - && cd / && \
             umount {mnt}",
            p = dev.path
        ));
        dev.del();
        println!("{mode}: ext4 made, fsck clean, 6 files intact after re-creation; {setup}");
    }
    rm(&f);
    let _ = std::fs::remove_dir_all(src);
}

/// The `dm-N` node of device-mapper device `name` (the guest has no udev to make
/// /dev/mapper links; devtmpfs makes /dev/dm-N).
fn dm_node(name: &str) -> String {
    sh(&format!(
        "for d in /sys/block/dm-*; do [ \"$(cat $d/dm/name)\" = {name} ] && basename $d; done; true"
    ))
    .trim()
    .to_string()
}

/// A backing device that answers slowly (dm-delay, 1.5 s per request): the request is logged
/// once as slow (past --slow-io-ms), counted, and `list --json` shows the oldest request's age
/// while it waits; it still completes, with its data.
#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn slow_backend_io_is_logged_counted_and_its_age_shown() {
    require_driver();
    if sh_any("modprobe dm_delay").status.code() != Some(0) {
        skip("this kernel has no dm_delay");
        return;
    }
    let f = backing("slow", 64, "/dev/zero");
    let kl = KLoop::new(&f);
    let name = "ublk-fast-it-slow";
    let sectors = 64 * 2048;
    sh(&format!("dmsetup create {name} --table '0 {sectors} delay {} 0 1500'", kl.0));
    let mapper = format!("/dev/{}", dm_node(name));
    let dev = Dev::add(&["loop", &mapper, "--slow-io-ms", "500", "-q", "1", "--no-part-scan"]);
    let before = dev.stat("slow_ios");
    let writer = std::process::Command::new("dd")
        .args(["if=/dev/urandom", &format!("of={}", dev.path), "bs=4k", "count=1", "oflag=direct"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The age is published by a once-a-second check: watch it for as long as the write is in
    // flight (1.5 s, so at least one check sees it, at 500 ms or more if it is the last one).
    let mut writer = writer;
    let mut oldest = 0;
    while writer.try_wait().unwrap().is_none() {
        oldest = oldest.max(dev.info()["queue_oldest_io_ms"][0].as_u64().unwrap_or(0));
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let out = writer.wait_with_output().unwrap();
    assert!(out.status.success(), "the slow write failed");
    // Its check runs every second: wait for the one after the write completed.
    std::thread::sleep(std::time::Duration::from_millis(1200));
    let slow = dev.stat("slow_ios") - before;
    let after = dev.info()["queue_oldest_io_ms"][0].as_u64().unwrap_or(u64::MAX);
    let log = std::fs::read_to_string("/run/ublk-fast/daemon.log").unwrap_or_default();
    let line = log.lines().rev().find(|l| l.contains("slow I/O")).unwrap_or("").to_string();
    println!("1.5 s write: oldest in flight seen {oldest} ms, then {after} ms; slow_ios +{slow}");
    println!("log: {line}");
    assert!(oldest >= 500, "list --json showed the oldest request at {oldest} ms");
    assert_eq!(after, 0, "the oldest-age gauge did not fall back to 0");
    assert!(slow >= 1, "the slow write was not counted");
    assert!(line.contains(&format!("dev {}", dev.id)) && line.contains("WRITE"), "{line}");
    dev.del();
    sh(&format!("dmsetup remove {name}"));
    drop(kl);
    rm(&f);
}

/// Max completion latency (µs) of a 3 s qd1 random-read fio on `dev`.
fn read_max_latency_us(dev: &str) -> u64 {
    let r = fio(&[
        "--name=lat",
        &format!("--filename={dev}"),
        "--ioengine=io_uring",
        "--direct=1",
        "--rw=randread",
        "--bs=4k",
        "--iodepth=1",
        "--runtime=3",
        "--time_based",
        "--size=64M",
    ]);
    r["jobs"][0]["read"]["clat_ns"]["max"].as_u64().unwrap() / 1000
}

/// A discard that takes seconds in the backing device (dm-delay holds writes and discards 5 s)
/// does not stall the reads on the same queue: it runs as an io_uring block command on the
/// ring, not as a BLKDISCARD ioctl on the core thread.
#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn a_long_discard_does_not_stall_reads_on_its_queue() {
    require_driver();
    if sh_any("modprobe dm_delay").status.code() != Some(0) {
        skip("this kernel has no dm_delay");
        return;
    }
    let f = backing("discard-stall", 256, "/dev/urandom");
    let kl = KLoop::new(&f);
    let name = "ublk-fast-it-discard";
    let sectors = 256 * 2048;
    // Reads pass at once; writes and discards wait 10 s (longer than the reads below take to
    // run, fio's start included, in an emulated guest).
    sh(&format!("dmsetup create {name} --table '0 {sectors} delay {d} 0 0 {d} 0 10000'", d = kl.0));
    let dm = dm_node(name);
    let mapper = format!("/dev/{dm}");
    let max = sh(&format!("cat /sys/block/{dm}/queue/discard_max_bytes")).trim().to_string();
    if max == "0" {
        sh(&format!("dmsetup remove {name}"));
        skip("dm-delay over loop offers no discard here");
        return;
    }
    let dev = Dev::add(&["loop", &mapper, "-q", "1", "--no-part-scan"]);
    let before = read_max_latency_us(&dev.path);
    let allocated = allocated_bytes(&f);
    let t0 = std::time::Instant::now();
    let mut discard = std::process::Command::new("blkdiscard").arg(&dev.path).spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let during = read_max_latency_us(&dev.path);
    let still = discard.try_wait().unwrap().is_none();
    let st = discard.wait().unwrap();
    let took = t0.elapsed();
    let freed = allocated.saturating_sub(allocated_bytes(&f));
    println!(
        "qd1 reads, max latency: {before} µs before, {during} µs during a whole-device discard \
         (still running at the end: {still}, then {st:?} after {took:?}, {freed} bytes freed)"
    );
    assert!(st.success(), "blkdiscard failed");
    // The kernel's BLKDISCARD reports success even when the device refused the discard
    // (EOPNOTSUPP): that it happened is seen in the backing file, whose blocks are freed.
    assert!(freed >= 200 << 20, "the discard did not reach the backing file: {freed} bytes freed");
    if !still {
        // dm-delay did not hold the discard long enough here: a stall could not be seen.
        skip("the backing device finished the discard before the reads: no stall to observe");
        dev.del();
        sh(&format!("dmsetup remove {name}"));
        drop(kl);
        rm(&f);
        return;
    }
    let limit = (2 * before).max(50_000);
    assert!(during <= limit, "reads stalled during the discard: {during} µs > {limit} µs");
    dev.del();
    sh(&format!("dmsetup remove {name}"));
    drop(kl);
    rm(&f);
}

/// A 4 KiB-aligned buffer for O_DIRECT.
struct Aligned(*mut u8);

impl Aligned {
    fn new() -> Aligned {
        let l = std::alloc::Layout::from_size_align(4096, 4096).unwrap();
        // SAFETY: a non-zero size; freed in Drop with the same layout.
        Aligned(unsafe { std::alloc::alloc_zeroed(l) })
    }
    fn buf(&mut self) -> &mut [u8] {
        // SAFETY: 4096 bytes owned by this value.
        unsafe { std::slice::from_raw_parts_mut(self.0, 4096) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in new() with this layout.
        unsafe {
            std::alloc::dealloc(self.0, std::alloc::Layout::from_size_align(4096, 4096).unwrap())
        }
    }
}

/// A backing device that fails for 2 s out of every 5 (dm-flakey) under random writes of
/// stamped blocks: the failed writes reach the writer as errors, every write acknowledged reads
/// back intact afterwards, and the device serves on once the backing device is back.
#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn flakey_backing_device_errors_reach_the_issuer_and_nothing_acknowledged_is_lost() {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    require_driver();
    if sh_any("modprobe dm_flakey").status.code() != Some(0) {
        skip("this kernel has no dm_flakey");
        return;
    }
    let f = backing("flakey", 64, "/dev/zero");
    let kl = KLoop::new(&f);
    let name = "ublk-fast-it-flakey";
    let sectors = 64 * 2048;
    sh(&format!("dmsetup create {name} --table '0 {sectors} flakey {} 0 3 2'", kl.0));
    let mapper = format!("/dev/{}", dm_node(name));
    let dev = Dev::add(&["loop", &mapper, "-q", "2", "--no-part-scan"]);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&dev.path)
        .unwrap();
    let blocks = 64 * 256u64;
    // What each block must hold: Some(generation) once a write of it was acknowledged; a
    // failed write makes the block unknown (the device may or may not have written it).
    let mut want: Vec<Option<u64>> = vec![None; blocks as usize];
    let mut known = vec![true; blocks as usize];
    let mut buf = Aligned::new();
    let (mut ok, mut failed) = (0u64, 0u64);
    let t = std::time::Instant::now();
    let mut gen = 0u64;
    while t.elapsed() < std::time::Duration::from_secs(8) {
        gen += 1;
        let b = gen.wrapping_mul(2654435761) % blocks;
        let stamp = (b << 32) ^ gen;
        for (i, w) in buf.buf().chunks_mut(8).enumerate() {
            w.copy_from_slice(&(stamp.wrapping_add(i as u64)).to_le_bytes());
        }
        match file.write_at(buf.buf(), b * 4096) {
            Ok(4096) => {
                want[b as usize] = Some(stamp);
                known[b as usize] = true;
                ok += 1;
            }
            _ => {
                known[b as usize] = false;
                failed += 1;
            }
        }
    }
    println!("8 s of writes over a device failing 2 s in 5: {ok} acknowledged, {failed} failed");
    assert!(failed > 0, "no write failed: the backing device never failed");
    assert!(ok > 0);
    // The backing device comes back for good.
    sh(&format!(
        "dmsetup suspend {name} && dmsetup reload {name} --table '0 {sectors} linear {} 0' && dmsetup resume {name}",
        kl.0
    ));
    let mut checked = 0;
    for b in 0..blocks {
        let Some(stamp) = want[b as usize].filter(|_| known[b as usize]) else { continue };
        file.read_exact_at(buf.buf(), b * 4096).unwrap();
        let got = u64::from_le_bytes(buf.buf()[..8].try_into().unwrap());
        assert_eq!(got, stamp, "block {b}: an acknowledged write was lost");
        checked += 1;
    }
    println!("acknowledged writes read back intact: {checked} blocks ({} KiB)", checked * 4);
    assert!(dev.stat("io_errors") > 0, "the errors were not counted");
    file.write_at(buf.buf(), 0).expect("the device serves again");
    drop(file);
    dev.del();
    sh(&format!("dmsetup remove {name}"));
    drop(kl);
    rm(&f);
}

/// Per-block metadata (UBLK_F_INTEGRITY) with T10-DIF type 1 protection information: the
/// kernel generates the PI of every write and checks it on every read, the server keeps it in
/// the metadata file beside the data. Written data reads back (its PI checked), fio verify
/// passes, the sysfs profile is the one asked for, the metadata survives a re-add, and a
/// corrupted PI byte makes the read of that block fail while its neighbours still read: the
/// check is real.
#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn metadata_with_pi_round_trips_and_the_kernel_checks_it() {
    require_driver();
    if !offers("INTEGRITY") {
        skip("this ublk driver does not offer INTEGRITY (Linux 7.0+, CONFIG_BLK_DEV_INTEGRITY)");
        return;
    }
    let f = backing("integrity", 32, "/dev/zero");
    let meta = format!("{f}.meta");
    rm(&meta);
    let args = ["loop", f.as_str(), "--metadata-size", "8", "--pi", "t10dif", "--pi-reftag"];
    let dev = Dev::add(&args);
    let sys =
        |n: &str| sh(&format!("cat /sys/block/ublkb{}/integrity/{n}", dev.id)).trim().to_string();
    let (format, interval) = (sys("format"), sys("protection_interval_bytes"));
    println!("integrity profile: {format}, interval {interval}, setup: {}", dev.info()["setup"]);
    assert_eq!(format, "T10-DIF-TYPE1-CRC");
    assert_eq!(interval, "512");
    assert_eq!(std::fs::metadata(&meta).unwrap().len(), (32 << 20) / 512 * 8);
    // 4 MiB of random data, read back through the kernel's PI check.
    sh("dd if=/dev/urandom of=/tmp/ublk-fast-it-integrity.src bs=1M count=4 status=none");
    sh(&format!(
        "dd if=/tmp/ublk-fast-it-integrity.src of={} bs=64k oflag=direct status=none",
        dev.path
    ));
    sh(&format!(
        "cmp /tmp/ublk-fast-it-integrity.src <(dd if={} bs=64k count=64 iflag=direct status=none)",
        dev.path
    ));
    let written = std::fs::read(&meta).unwrap();
    assert!(written[..8].iter().any(|&b| b != 0xff), "no PI was stored for block 0");
    // fio verify, mixed sizes, behind the first 4 MiB.
    let r = fio(&[
        "--name=pi",
        &format!("--filename={}", dev.path),
        "--ioengine=io_uring",
        "--direct=1",
        "--rw=randwrite",
        "--bsrange=4k-128k",
        "--iodepth=16",
        "--offset=4M",
        "--size=16M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
    ]);
    assert_eq!(r["jobs"][0]["error"].as_u64(), Some(0), "fio verify failed");
    dev.del();
    // Flip one byte of block 0's guard tag; block 8 (4 KiB on) is untouched.
    sh(&format!("printf '\\x5a' | dd of={meta} bs=1 seek=0 count=1 conv=notrunc status=none"));
    let dev = Dev::add(&args);
    sh(&format!(
        "cmp -n 4096 <(dd if=/tmp/ublk-fast-it-integrity.src bs=4k skip=1 count=1 status=none) \
         <(dd if={} bs=4k skip=1 count=1 iflag=direct status=none)",
        dev.path
    ));
    let bad = sh_any(&format!("dd if={} of=/dev/null bs=4k count=1 iflag=direct", dev.path));
    println!(
        "after re-adding, block 1 reads back; block 0 with a corrupted guard: {:?} {}",
        bad.status,
        String::from_utf8_lossy(&bad.stderr).lines().next().unwrap_or("")
    );
    assert!(!bad.status.success(), "a block with corrupted PI read back without an error");
    dev.del();
    rm(&f);
    rm(&meta);
    rm("/tmp/ublk-fast-it-integrity.src");
}
