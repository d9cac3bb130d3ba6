//! A device's geometry is what the kernel granted, not what was asked: queues (at most one per
//! CPU), depth, block size and maximum I/O size, in every data mode; and every queue runs on a
//! CPU the kernel maps to that queue.

mod common;

use std::time::Instant;

use common::*;

fn cpus() -> usize {
    sh("nproc").trim().parse().unwrap()
}

/// A cpulist as sysfs prints it: `0, 1` (blk-mq) or `0-3,8` (cpu/online).
fn parse_cpus(s: &str) -> Vec<usize> {
    let mut v = Vec::new();
    for part in s.trim().split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => v.extend(a.parse::<usize>().unwrap()..=b.parse::<usize>().unwrap()),
            None => v.push(part.parse().unwrap()),
        }
    }
    v.sort_unstable();
    v
}

fn as_cpus(v: &serde_json::Value) -> Vec<usize> {
    v.as_array().unwrap().iter().map(|c| c.as_u64().unwrap() as usize).collect()
}

/// For 1 queue, one per CPU and more queues than CPUs: `list --json` reports, for each queue,
/// the kernel's own CPUs for it (`/sys/block/ublkbN/mq/Q/cpu_list`), and the queue's thread
/// runs on one of them; with one queue per CPU no two queues share a CPU.
#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn every_queue_runs_on_a_cpu_the_kernel_maps_to_it() {
    require_driver();
    let n = cpus();
    for asked in [1, n, 2 * n] {
        let dev = Dev::add(&["null", "--size", "1G", "-q", &asked.to_string()]);
        let info = dev.info();
        let queues = info["queues"].as_u64().unwrap() as usize;
        assert_eq!(queues, asked.min(n), "-q {asked} on {n} CPUs");
        let pinned = as_cpus(&info["queue_cpus"]);
        let affinity = info["queue_affinity"].as_array().unwrap();
        assert_eq!((pinned.len(), affinity.len()), (queues, queues), "{info}");
        for q in 0..queues {
            let sysfs = sh(&format!("cat /sys/block/ublkb{}/mq/{q}/cpu_list", dev.id));
            let kernel = parse_cpus(&sysfs);
            assert_eq!(as_cpus(&affinity[q]), kernel, "-q {asked}: queue {q} affinity");
            assert!(kernel.contains(&pinned[q]), "-q {asked}: queue {q} on CPU {}", pinned[q]);
            println!("-q {asked}: queue {q}: kernel CPUs {kernel:?}, served on CPU {}", pinned[q]);
        }
        if queues == n {
            let mut distinct = pinned.clone();
            distinct.dedup();
            assert_eq!(distinct.len(), n, "-q {asked}: queues share a CPU: {pinned:?}");
        }
        dev.del();
    }
}

/// `-q` beyond the CPU count: the device gets one queue per CPU, one notice line says so, and
/// it serves.
#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn more_queues_than_cpus_get_what_the_kernel_grants_with_a_notice() {
    require_driver();
    let n = cpus();
    let asked = (2 * n).to_string();
    let o = ublk(&["null", "--size", "1G", "-q", &asked]);
    assert!(o.status.success(), "-q {asked}: {}", stderr(&o));
    let path = stdout(&o).trim().to_string();
    let dev = Dev { id: path.trim_start_matches("/dev/ublkb").parse().unwrap(), path };
    let err = stderr(&o);
    let want = format!(
        "ublk-fast: notice: -q {asked}: this machine has {n} CPUs, the device has {n} queues"
    );
    assert!(err.starts_with(&want), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(dev.info()["queues"], n);
    sh(&format!("dd if={} of=/dev/null bs=1M count=8 iflag=direct status=none", dev.path));
    dev.del();
}

/// Creates one device per (queues, block size) of `batch` in `mode` at `depth`, checks the
/// kernel's geometry, verifies them all with one fio (crc32c), deletes them and checks that
/// nothing is left; returns the I/Os verified.
fn verify_batch(mode: &str, depth: u32, batch: &[(usize, u32)], n: usize) -> u64 {
    let t = Instant::now();
    let mut devs = Vec::new();
    let mut job = String::from(
        "[global]\nioengine=io_uring\ndirect=1\nrw=randwrite\nbssplit=4k/50:64k/30:1m/20\n\
         size=8M\nverify=crc32c\ndo_verify=1\nverify_fatal=1\n",
    );
    for &(q, bs) in batch {
        let f = format!("/tmp/ublk-fast-it-geometry-{q}-{bs}.img");
        sh(&format!("rm -f {f} && truncate -s 8M {f}"));
        let (qs, ds, bss) = (q.to_string(), depth.to_string(), bs.to_string());
        let mut args = vec!["loop", &f, "--block-size", &bss, "-q", &qs, "-d", &ds];
        args.extend(mode.split_whitespace());
        let dev = Dev::add(&args);
        let info = dev.info();
        assert_eq!(info["queues"], q.min(n), "{args:?}: {info}");
        assert_eq!(info["depth"], depth, "{args:?}: {info}");
        assert_eq!(info["block_size"], bs, "{args:?}: {info}");
        let max_io = info["max_io_bytes"].as_u64().unwrap();
        let kernel_kb = sh(&format!("cat /sys/block/ublkb{}/queue/max_hw_sectors_kb", dev.id));
        assert_eq!(kernel_kb.trim().parse::<u64>().unwrap() << 10, max_io, "{args:?}");
        job += &format!("[q{q}-bs{bs}]\nfilename={}\niodepth={}\n", dev.path, depth.min(32));
        println!(
            "{mode:<26} -q {q} ({} granted) -d {depth:<4} bs {bs:<4} max I/O {} KiB",
            q.min(n),
            max_io >> 10
        );
        devs.push((dev, f));
    }
    let jobfile = "/tmp/ublk-fast-it-geometry.fio";
    std::fs::write(jobfile, job).unwrap();
    let r = fio(&[jobfile]);
    let (ios, errs) = fio_totals(&r);
    assert_eq!(errs, 0, "{mode} -d {depth}");
    assert_eq!(r["jobs"].as_array().unwrap().len(), devs.len());
    for (dev, f) in devs {
        dev.del();
        let _ = std::fs::remove_file(f);
    }
    assert!(dev_ids().is_empty(), "{mode} -d {depth} left {:?}", dev_ids());
    assert!(daemons().is_empty(), "{mode} -d {depth} left {:?}", daemons());
    println!("  -> {} device(s), {ios} I/Os verified, {:.1?}", batch.len(), t.elapsed());
    ios
}

/// Every combination of queues {1, CPUs, 2 x CPUs}, depth {1, 2, 128, 4096}, logical block
/// {512, 4096}, per-tag and batch commands, in one data mode: the device is created with the
/// kernel's geometry, passes a fio crc32c verify, and is deleted with nothing left behind. The
/// six devices of one (mode, depth) are verified by one fio at once (two or three at a time at
/// depth 4096). One test per data mode, so that each stays minutes long.
fn geometry_matrix(data: &str) {
    require_driver();
    if data == "--zero-copy=on" && !offers("AUTO_BUF_REG") {
        skip("this ublk driver does not offer AUTO_BUF_REG (Linux 6.16+)");
        return;
    }
    let n = cpus();
    let modes: Vec<String> = ["", "--batch-io"]
        .into_iter()
        .map(|cmds| format!("{data} {cmds}"))
        .filter(|mode| !skip_mode(mode))
        .collect();
    let t0 = Instant::now();
    let (mut combos, mut ios_all, mut refused) = (0, 0, 0);
    let shapes: Vec<(usize, u32)> =
        [1, n, 2 * n].into_iter().flat_map(|q| [(q, 512u32), (q, 4096)]).collect();
    for mode in &modes {
        for depth in [1u32, 2, 128, 4096] {
            if depth == 1 && mode.contains("--batch-io") {
                // The driver's limit, refused before anything is created.
                let cmd = format!("{} null -d 1 {mode}", bin());
                check_refused(&cmd, "--batch-io needs --depth 2 or more");
                refused += 6;
                continue;
            }
            // Every queue of a core shares its ring's 16384 fixed buffers, of which a queue
            // takes one per tag (two in zero copy, for the fallback): at depth 4096 the devices
            // are verified a few at a time (so no core can get more), otherwise the six at once.
            let at_once = match depth {
                4096 if mode.contains("--zero-copy=on") => 2,
                4096 => 3,
                _ => shapes.len(),
            };
            for batch in shapes.chunks(at_once) {
                let ios = verify_batch(mode, depth, batch, n);
                combos += batch.len();
                ios_all += ios;
            }
        }
    }
    println!(
        "geometry matrix {data}: {combos} combinations passed ({ios_all} I/Os verified), {refused} \
         refused with the driver's limit, in {:.0?}",
        t0.elapsed()
    );
}

#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn geometry_matrix_zero_copy_verifies() {
    geometry_matrix("--zero-copy=on");
}

#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn geometry_matrix_copy_verifies() {
    geometry_matrix("--zero-copy=off");
}

#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn geometry_matrix_user_copy_verifies() {
    geometry_matrix("--user-copy");
}

/// `--cpus 0 -q 2`: both queues on one core thread and one ring (their fixed files, buffers,
/// FETCH buffer groups and `user_data` space partitioned), in every data mode, per-tag and
/// batch: fio crc32c verify with both queues busy.
#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn two_queues_share_one_core_ring_in_every_mode() {
    require_driver();
    let f = "/tmp/ublk-fast-it-shared-ring.img";
    sh(&format!("rm -f {f} && truncate -s 64M {f}"));
    for mode in [
        "--zero-copy=on",
        "--zero-copy=off",
        "--user-copy",
        "--zero-copy=on --batch-io",
        "--zero-copy=off --batch-io",
        "--user-copy --batch-io",
    ] {
        if skip_mode(mode) || (mode.contains("=on") && !offers("AUTO_BUF_REG")) {
            println!("SKIP {mode}: not offered by this driver");
            continue;
        }
        let mut args = vec!["loop", f, "--cpus", "0", "-q", "2", "-d", "64"];
        args.extend(mode.split_whitespace());
        let dev = Dev::add(&args);
        let info = dev.info();
        assert_eq!(as_cpus(&info["queue_cpus"]), vec![0, 0], "{mode}: {info}");
        let pid = info["pid"].as_i64().unwrap();
        let threads = sh(&format!("cat /proc/{pid}/task/*/comm"));
        let cores: Vec<&str> = threads.lines().filter(|t| t.starts_with("ublk-core")).collect();
        assert_eq!(cores, vec!["ublk-core0"], "{mode}: threads {threads}");
        let r = fio(&[
            "--name=shared",
            &format!("--filename={}", dev.path),
            "--ioengine=io_uring",
            "--direct=1",
            "--rw=randwrite",
            "--bssplit=4k/60:64k/30:512k/10",
            "--iodepth=32",
            "--numjobs=2",
            "--size=32M",
            "--offset_increment=32M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--cpus_allowed_policy=split",
            "--cpus_allowed=0-1",
        ]);
        let (ios, errs) = fio_totals(&r);
        assert_eq!(errs, 0, "{mode}");
        let per_queue: Vec<u64> = dev.info()["queue_requests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert!(per_queue.len() == 2 && per_queue.iter().all(|&n| n > 0), "{mode}: {per_queue:?}");
        println!("{mode}: 2 queues on CPU 0's ring ({per_queue:?} requests), {ios} I/Os verified");
        dev.del();
    }
    let _ = std::fs::remove_file(f);
}
