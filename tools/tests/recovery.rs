//! Crash and take-over: `kill -9` of a daemon under write load, `recover`, and not one byte
//! acknowledged before the crash may be lost.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn kill9(pid: i64) {
    // SAFETY: signalling a daemon process by pid.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0, "kill -9 {pid}");
}

fn recover(dev: &Dev) {
    let o = ublk(&["recover", "-n", &dev.id.to_string()]);
    assert!(o.status.success(), "recover failed: {}", stderr(&o));
    assert_eq!(stdout(&o).trim(), dev.path);
}

/// Starts fio writing `size` of crc32c-stamped 4k blocks at a limited rate (so a crash or a
/// hand-over lands mid-run), then verifying all of it.
fn spawn_verified_writes(dev: &Dev, name: &str, size: &str) -> std::process::Child {
    spawn_fio(&[
        &format!("--name={name}"),
        &format!("--filename={}", dev.path),
        "--ioengine=io_uring",
        "--direct=1",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        &format!("--size={size}"),
        "--rate_iops=2000",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
    ])
}

/// Under verified writes of `size`, `quiesce` hands the device over (its service lets it go)
/// and `recover` takes it back: fio sees no error and verifies every byte.
fn hand_over_under_writes(dev: &Dev, size: &str, what: &str) {
    let pid = dev.info()["pid"].as_i64().unwrap();
    let fio = spawn_verified_writes(dev, what, size);
    std::thread::sleep(Duration::from_millis(1500));
    let t = Instant::now();
    let o = ublk(&["quiesce", "-n", &dev.id.to_string()]);
    assert!(o.status.success(), "quiesce ({what}) failed: {}", stderr(&o));
    let took = t.elapsed();
    assert!(!daemons().contains(&(pid as i32)), "the old daemon still runs after quiesce");
    wait_state(dev, "QUIESCED", Duration::from_secs(10));
    recover(dev);
    wait_state(dev, "LIVE", Duration::from_secs(5));
    expect_clean_fio(fio, what);
    println!("{what}: quiesce in {took:.1?}, then recover: {size} verified, 0 fio errors");
}

/// Waits for that fio: it must succeed with no errors.
fn expect_clean_fio(fio: std::process::Child, what: &str) {
    let out = fio.wait_with_output().unwrap();
    assert!(out.status.success(), "fio across the {what} failed: {}{}", stdout(&out), stderr(&out));
    let v = fio_report(&stdout(&out)).expect("fio printed no JSON report");
    assert_eq!(fio_totals(&v).1, 0);
}

/// Starts the crash job at 1000 writes/s, saving fio's verify state on exit
/// (`verify_state_save`): what was acknowledged is what `verify_acknowledged` checks later.
fn spawn_stateful_writes(dev: &Dev, dir: &str) -> std::process::Child {
    let mut args = crash_job(&dev.path, dir, "32M");
    args.extend(["--rate_iops=1000", "--do_verify=0", "--verify_state_save=1"].map(String::from));
    spawn_fio(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// The writing fio's exit: (succeeded, errors, bytes written).
fn fio_outcome(fio: std::process::Child) -> (bool, String, u64) {
    let out = fio.wait_with_output().unwrap();
    let written = fio_report(&stdout(&out))
        .and_then(|v| v["jobs"][0]["write"]["io_bytes"].as_u64())
        .unwrap_or(0);
    let errs: String = stderr(&out).lines().filter(|l| l.contains("err")).take(2).collect();
    (out.status.success(), errs, written)
}

#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn kill_9_under_verified_write_load_then_recover_loses_nothing() {
    // (recovery mode, queues, zero copy, kill/recover cycles in a row). Only reissue: the
    // other modes fail some writes, and fio's saved verify state counts a failed write as
    // written; `failing_modes_lose_no_acknowledged_write` covers them with its own bookkeeping.
    let cases = [
        ("reissue", "2", "auto", "", 5),
        ("reissue", "1", "off", "", 1),
        ("reissue", "2", "auto", "--batch-io", 2),
        // The smallest and the largest queue depth the driver takes.
        ("reissue", "1", "off", "-d 1", 1),
        ("reissue", "2", "auto", "-d 4096", 1),
        ("reissue", "2", "off", "-d 4096", 1),
    ];
    let mut total = 0;
    for (mode, queues, zc, more, cycles) in cases {
        if skip_mode(more) {
            continue;
        }
        let name = format!("{mode}-{queues}-{zc}{}", more.replace([' ', '-'], ""));
        let f = format!("/tmp/ublk-fast-it-recover-{name}.img");
        let dir = format!("/tmp/ublk-fast-it-recover-state-{name}");
        sh(&format!("rm -rf {f} {dir} && mkdir {dir} && truncate -s 32M {f}"));
        let recovery = format!("--recovery={mode}");
        let mut args = vec!["loop", &f, "-q", queues, &recovery, "--zero-copy", zc];
        args.extend(more.split_whitespace());
        let dev = Dev::add(&args);
        for cycle in 1..=cycles {
            let pid = dev.info()["pid"].as_i64().unwrap();
            // This daemon's counters may include the previous cycle's writes.
            let base = dev.stat("writes");
            let mut fio = spawn_stateful_writes(&dev, &dir);
            // Kill once the writer is well under way (fio can take seconds to start here).
            let t = Instant::now();
            while dev.stat("writes") < base + 1000 && t.elapsed() < Duration::from_secs(30) {
                std::thread::sleep(Duration::from_millis(500));
            }
            assert!(fio.try_wait().unwrap().is_none(), "the writer ended before the kill");
            kill9(pid);
            // The dead daemon's counters stay readable until the next one starts: the kill
            // must have landed mid-run.
            let before = dev.stat("writes") - base;
            assert!(before > 0 && before < 6_000, "killed after {before} of 8192 writes");
            let want = if mode == "fail-io" { "FAIL_IO" } else { "QUIESCED" };
            wait_state(&dev, want, Duration::from_secs(20));
            recover(&dev);
            wait_state(&dev, "LIVE", Duration::from_secs(5));
            assert_ne!(dev.info()["pid"].as_i64().unwrap(), pid);
            let (ok, errs, written) = fio_outcome(fio);
            // Reissue hides the crash from the writer.
            assert!(ok, "fio failed across a reissue crash: {errs}");
            assert_eq!(written, 32 << 20);
            let verified = verify_acknowledged(&dev.path, &dir, "32M");
            assert!(verified > 0, "nothing was acknowledged before the crash");
            total += verified;
            println!(
                "{mode} q{queues} zero-copy {zc} {more}: crash {cycle}/{cycles} after {before} writes: \
                 writer {} ({} KiB written{}), {} KiB acknowledged and verified",
                if ok { "finished" } else { "failed" },
                written >> 10,
                if errs.is_empty() { String::new() } else { format!("; {errs}") },
                verified >> 10
            );
        }
        dev.del();
        let _ = std::fs::remove_file(&f);
        let _ = std::fs::remove_dir_all(&dir);
    }
    println!("kill -9 / recover: {} MiB verified in all", total >> 20);
}

/// The content of block `blk` as written in round `round`: unique per (round, block).
fn pattern(round: u64, blk: u64, out: &mut [u8]) {
    for (i, w) in out.chunks_exact_mut(8).enumerate() {
        // splitmix64 of (round, block, word)
        let mut z = (round << 40 ^ blk << 12 ^ i as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        w.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
}

/// A page-aligned 4 KiB buffer for O_DIRECT.
struct Block(*mut u8);
impl Block {
    const LAYOUT: std::alloc::Layout = match std::alloc::Layout::from_size_align(4096, 4096) {
        Ok(l) => l,
        Err(_) => panic!(),
    };
    fn new() -> Block {
        // SAFETY: a non-zero-sized layout.
        Block(unsafe { std::alloc::alloc_zeroed(Self::LAYOUT) })
    }
    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: 4096 bytes allocated in new(), owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.0, 4096) }
    }
}
impl Drop for Block {
    fn drop(&mut self) {
        // SAFETY: allocated in new() with this layout.
        unsafe { std::alloc::dealloc(self.0, Self::LAYOUT) }
    }
}

/// Writes every 4 KiB block of `path` once, in a shuffled order, from 8 threads with O_DIRECT,
/// and returns which writes the device acknowledged (true) or failed (false).
fn write_all_blocks(path: &str, blocks: u64, round: u64) -> Vec<Option<bool>> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Mutex;
    let mut order: Vec<u64> = (0..blocks).collect();
    let mut x = round.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    for i in (1..order.len()).rev() {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        order.swap(i, (x >> 33) as usize % (i + 1));
    }
    let next = AtomicU64::new(0);
    let acked = Mutex::new(vec![None; blocks as usize]);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(path)
                    .unwrap();
                let mut buf = Block::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= blocks {
                        return;
                    }
                    let blk = order[i as usize];
                    pattern(round, blk, buf.bytes());
                    let ok = f.write_at(buf.bytes(), blk * 4096).is_ok_and(|n| n == 4096);
                    acked.lock().unwrap()[blk as usize] = Some(ok);
                    // About 1000 writes/s in all, so a crash lands mid-run.
                    std::thread::sleep(Duration::from_millis(8));
                }
            });
        }
    });
    acked.into_inner().unwrap()
}

/// Reads back every acknowledged block and compares it with what was written; returns the
/// bytes verified.
fn verify_acked(path: &str, round: u64, acked: &[Option<bool>]) -> u64 {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path).unwrap();
    let (mut got, mut want) = (Block::new(), vec![0u8; 4096]);
    let mut n = 0;
    for (blk, a) in acked.iter().enumerate() {
        if *a != Some(true) {
            continue;
        }
        f.read_exact_at(got.bytes(), blk as u64 * 4096).unwrap();
        pattern(round, blk as u64, &mut want);
        assert!(got.bytes() == &want[..], "block {blk}: acknowledged write lost after the crash");
        n += 4096;
    }
    n
}

#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn failing_modes_lose_no_acknowledged_write() {
    let mut total = 0;
    for (mode, queues, zc, more) in [
        ("requeue", "1", "auto", ""),
        ("requeue", "2", "off", ""),
        ("fail-io", "2", "auto", ""),
        ("fail-io", "1", "off", ""),
        ("requeue", "2", "off", "--batch-io"),
        ("fail-io", "1", "auto", "--batch-io"),
    ] {
        if skip_mode(more) {
            continue;
        }
        let f = format!("/tmp/ublk-fast-it-acked-{mode}-{queues}-{zc}.img");
        sh(&format!("rm -f {f} && truncate -s 32M {f}"));
        let recovery = format!("--recovery={mode}");
        let mut args = vec!["loop", &f, "-q", queues, &recovery, "--zero-copy", zc];
        args.extend(more.split_whitespace());
        let dev = Dev::add(&args);
        let pid = dev.info()["pid"].as_i64().unwrap();
        let path = dev.path.clone();
        let writer = std::thread::spawn(move || write_all_blocks(&path, 8192, 1));
        let t = Instant::now();
        while dev.stat("writes") < 1000 && t.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(500));
        }
        assert!(!writer.is_finished(), "the writer ended before the kill");
        kill9(pid);
        let before = dev.stat("writes");
        let want = if mode == "fail-io" { "FAIL_IO" } else { "QUIESCED" };
        wait_state(&dev, want, Duration::from_secs(20));
        // Let the writer run into the gap: fail-io fails its writes, requeue holds them.
        std::thread::sleep(Duration::from_secs(1));
        recover(&dev);
        wait_state(&dev, "LIVE", Duration::from_secs(5));
        let acked = writer.join().unwrap();
        let ok = acked.iter().filter(|a| **a == Some(true)).count();
        let failed = acked.iter().filter(|a| **a == Some(false)).count();
        assert_eq!(ok + failed, 8192);
        if mode == "fail-io" {
            assert!(failed > 0, "no write failed while no daemon ran (fail-io)");
        }
        let verified = verify_acked(&dev.path, 1, &acked);
        total += verified;
        println!(
            "{mode} q{queues} zero-copy {zc} {more}: killed after {before} writes; {failed} writes \
             failed, {ok} acknowledged: {} KiB read back identical",
            verified >> 10
        );
        dev.del();
        let _ = std::fs::remove_file(&f);
    }
    println!("failing modes: {} MiB of acknowledged writes verified", total >> 20);
}

#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn acknowledged_writes_survive_a_crash_in_every_recovery_mode() {
    for mode in ["requeue", "reissue", "fail-io"] {
        let f = format!("/tmp/ublk-fast-it-ack-{mode}.img");
        let pat = "/tmp/ublk-fast-it-ack-pattern";
        sh(&format!("rm -f {f} && truncate -s 32M {f} && head -c 8M /dev/urandom > {pat}"));
        let dev = Dev::add(&["loop", &f, &format!("--recovery={mode}")]);
        sh(&format!("dd if={pat} of={} bs=1M oflag=direct conv=fsync status=none", dev.path));
        for cycle in 1..=2 {
            kill9(dev.info()["pid"].as_i64().unwrap());
            let want = if mode == "fail-io" { "FAIL_IO" } else { "QUIESCED" };
            wait_state(&dev, want, Duration::from_secs(20));
            if mode == "fail-io" {
                // With no daemon, I/O fails at once instead of waiting.
                let t = Instant::now();
                let o = sh_any(&format!(
                    "dd if={} of=/dev/null bs=4k count=1 iflag=direct status=none",
                    dev.path
                ));
                assert!(!o.status.success(), "I/O succeeded with no daemon in fail-io mode");
                assert!(
                    t.elapsed() < Duration::from_secs(10),
                    "fail-io I/O took {:?}",
                    t.elapsed()
                );
            }
            recover(&dev);
            wait_state(&dev, "LIVE", Duration::from_secs(5));
            sh(&format!("cmp -n 8388608 {pat} {}", dev.path));
            println!("{mode}: crash {cycle}: 8 MiB intact after recovery");
        }
        dev.del();
        let _ = std::fs::remove_file(&f);
    }
}

#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn recover_refuses_what_it_cannot_take_over() {
    require_driver();
    let b = bin();
    check_refused(&format!("{b} recover -n 999"), "no ublk device with id 999");
    // A LIVE device already has its daemon: recover must refuse and leave it serving.
    let live = Dev::add(&["null", "--size", "16M", "--recovery"]);
    let pid = live.info()["pid"].as_i64().unwrap();
    check_refused(&format!("{b} recover -n {}", live.id), "is LIVE");
    assert_eq!(live.info()["state"], "LIVE");
    assert_eq!(live.info()["pid"].as_i64().unwrap(), pid);
    sh(&format!("dd if={} of=/dev/null bs=4k count=1 iflag=direct status=none", live.path));
    live.del();
    // A missing record is refused like an unknown device.
    let gone = Dev::add(&["null", "--size", "16M", "--recovery"]);
    kill9(gone.info()["pid"].as_i64().unwrap());
    wait_state(&gone, "QUIESCED", Duration::from_secs(20));
    let rec = format!("/run/ublk-fast/{}.json", gone.id);
    let saved = std::fs::read(&rec).unwrap();
    std::fs::remove_file(&rec).unwrap();
    check_refused(&format!("{b} recover -n {}", gone.id), "no usable record");
    std::fs::write(&rec, saved).unwrap();
    recover(&gone);
    gone.del();
    // A record whose backing store is no longer the same file is not taken over.
    let moved = "/tmp/ublk-fast-it-replaced.img";
    sh(&format!("rm -f {moved} && truncate -s 16M {moved}"));
    let dev = Dev::add(&["loop", moved, "--recovery"]);
    kill9(dev.info()["pid"].as_i64().unwrap());
    wait_state(&dev, "QUIESCED", Duration::from_secs(20));
    sh(&format!("rm {moved} && truncate -s 16M {moved}"));
    check_refused(&format!("{b} recover -n {}", dev.id), "is no longer the one it was created on");
    assert_eq!(dev.info()["state"], "QUIESCED", "a refused take-over changed the device");
    dev.del();
    let _ = std::fs::remove_file(moved);
    // A device without --recovery dies with its daemon: I/O fails fast, recover refuses, del cleans up.
    let f = "/tmp/ublk-fast-it-norecovery.img";
    sh(&format!("rm -f {f} && truncate -s 16M {f}"));
    let dev = Dev::add(&["loop", f]);
    kill9(dev.info()["pid"].as_i64().unwrap());
    let t = Instant::now();
    loop {
        let o = sh_any(&format!(
            "dd if={} of=/dev/null bs=4k count=1 iflag=direct status=none",
            dev.path
        ));
        if !o.status.success() {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(15), "I/O still succeeds with the daemon dead");
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("I/O fails {:.1?} after the daemon was killed", t.elapsed());
    let o = ublk(&["recover", "-n", &dev.id.to_string()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("not created with --recovery"), "{}", stderr(&o));
    dev.del();
    // A corrupt record is refused with the same one line.
    let dev = Dev::add(&["loop", f, "--recovery"]);
    let rec = format!("/run/ublk-fast/{}.json", dev.id);
    let saved = std::fs::read(&rec).unwrap();
    std::fs::write(&rec, b"{ not json").unwrap();
    kill9(dev.info()["pid"].as_i64().unwrap());
    wait_state(&dev, "QUIESCED", Duration::from_secs(20));
    check_refused(&format!("{b} recover -n {}", dev.id), "no usable record");
    std::fs::write(&rec, saved).unwrap();
    recover(&dev);
    dev.del();
    let _ = std::fs::remove_file(f);
}

#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn quiesce_hands_the_device_to_a_new_daemon_under_verified_load() {
    if !offers("QUIESCE") {
        skip("this ublk driver does not offer QUIESCE");
        return;
    }
    let f = "/tmp/ublk-fast-it-quiesce.img";
    if !skip_mode("--batch-io") {
        // The driver does not drain a batch device's in-flight I/O on QUIESCE_DEV (some
        // writes failed with EIO in one of two runs): quiesce refuses and says what to do.
        sh(&format!("rm -f {f} && truncate -s 64M {f}"));
        let dev = Dev::add(&["loop", f, "--recovery=reissue", "--batch-io"]);
        let id = dev.id.to_string();
        check_refused(&format!("{} quiesce -n {id}", bin()), "run `ublk-fast recover -n");
        assert_eq!(dev.info()["state"], "LIVE", "a refused quiesce changed the device");
        dev.del();
    }
    sh(&format!("rm -f {f} && truncate -s 64M {f}"));
    let dev = Dev::add(&["loop", f, "-q", "2", "--recovery=reissue"]);
    hand_over_under_writes(&dev, "32M", "hand-over under load");
    dev.del();
    // A request being served when the driver looks for fetches to abort re-arms its fetch on
    // commit, and in the driver's code nothing but a ring exit aborts that one. With every 4th
    // write held 300 ms by the backend, some always are being served.
    sh(&format!("rm -f {f} && truncate -s 64M {f}"));
    let dev = Dev::add(&[
        "fault",
        "--op",
        "write",
        "--every",
        "4",
        "--delay-ms",
        "300",
        "loop",
        f,
        "-q",
        "2",
        "--recovery=reissue",
    ]);
    hand_over_under_writes(&dev, "4M", "hand-over with writes being served");
    dev.del();
    // A device without --recovery cannot be quiesced.
    let plain = Dev::add(&["null", "--size", "16M"]);
    check_refused(&format!("{} quiesce -n {}", bin(), plain.id), "cannot be quiesced");
    plain.del();
    let _ = std::fs::remove_file(f);
}

#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn ext4_mounted_across_a_crash_stays_consistent() {
    require_driver();
    let f = "/tmp/ublk-fast-it-ext4-crash.img";
    let mnt = "/tmp/ublk-fast-it-ext4-crash";
    let src = "/tmp/ublk-fast-it-ext4-crash-src";
    sh(&format!("rm -rf {f} {mnt} {src} && mkdir -p {mnt} {src} && truncate -s 256M {f}"));
    let dev = Dev::add(&["loop", f, "-q", "2", "--recovery=reissue"]);
    sh(&format!("mkfs.ext4 -q -F {} && mount {} {mnt}", dev.path, dev.path));
    // Files written and fsync'ed before the crash: these must survive it bit for bit.
    sh(&format!(
        "for i in $(seq 1 16); do head -c $((i * 131072 + 4096)) /dev/urandom > {src}/f$i; \
         dd if={src}/f$i of={mnt}/f$i bs=1M conv=fsync status=none; done"
    ));
    let sums = sh(&format!("cd {src} && sha256sum f*"));
    // A writer keeps the filesystem busy through the crash.
    let mut writer = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "i=0; while :; do dd if=/dev/urandom of={mnt}/busy$((i % 8)) bs=64k count=8 \
             conv=fsync status=none || exit 1; i=$((i + 1)); done"
        ))
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let pid = dev.info()["pid"].as_i64().unwrap();
    kill9(pid);
    wait_state(&dev, "QUIESCED", Duration::from_secs(20));
    recover(&dev);
    wait_state(&dev, "LIVE", Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(1000));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(writer.id() as i32, libc::SIGKILL) };
    let _ = writer.wait();
    sh("sync");
    sh(&format!("cd {mnt} && echo '{sums}' | sha256sum --quiet -c -"));
    sh(&format!("umount {mnt}"));
    let fsck = sh_any(&format!("fsck.ext4 -fn {}", dev.path));
    assert!(
        fsck.status.success(),
        "fsck.ext4 -fn after the crash: {}{}",
        stdout(&fsck),
        stderr(&fsck)
    );
    sh(&format!("mount {} {mnt} && cd {mnt} && echo '{sums}' | sha256sum --quiet -c -", dev.path));
    sh(&format!("umount {mnt}"));
    println!("ext4 mounted through kill -9 + recover: fsck clean, 16 fsync'ed files intact");
    dev.del();
    let _ = std::fs::remove_file(f);
    let _ = std::fs::remove_dir_all(src);
}
