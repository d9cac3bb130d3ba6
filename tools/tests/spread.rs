//! One queue served by several cores (UBLK_F_PER_IO_DAEMON): each core thread fetches and
//! commits its share of the queue's tags, and the data still verifies in every data mode.

mod common;

use std::collections::BTreeMap;

use common::*;

/// CPU ticks (user + system) of each core thread of process `pid`, by thread name.
fn core_ticks(pid: i64) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let dir = t.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if !comm.starts_with("ublk-core") {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap_or_default();
        // Fields after the ")" that ends the name: utime and stime are the 12th and 13th.
        let rest: Vec<&str> =
            stat.rsplit_once(')').map_or("", |r| r.1).split_whitespace().collect();
        let ticks = rest[11].parse::<u64>().unwrap() + rest[12].parse::<u64>().unwrap();
        out.insert(comm.trim().to_string(), ticks);
    }
    out
}

#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn one_queue_is_served_by_every_core_and_its_data_verifies() {
    require_driver();
    if !offers("PER_IO_DAEMON") {
        skip("this ublk driver does not offer PER_IO_DAEMON (Linux 6.16+)");
        return;
    }
    let ncpu: usize = sh("nproc").trim().parse().unwrap();
    if ncpu < 2 {
        skip("one CPU: nothing to spread over");
        return;
    }
    let img = "/tmp/spread.img";
    sh(&format!("rm -f {img} && truncate -s 256M {img}"));
    for mode in ["--zero-copy=auto", "--zero-copy=off", "--user-copy"] {
        let mut args = vec!["loop", img, "-q", "1", "--spread-tags"];
        args.extend(mode.split_whitespace());
        let dev = Dev::add(&args);
        let info = dev.info();
        let tag_cpus = info["tag_cpus"][0].as_array().unwrap().len();
        assert_eq!(tag_cpus, ncpu, "{mode}: one queue on {ncpu} CPUs: {}", info["tag_cpus"]);
        let l = stdout(&ublk(&["list", "-n", &dev.id.to_string()]));
        assert!(l.contains("0->cpu") && l.contains("+cpu"), "{mode}: {l}");
        let pid = info["pid"].as_i64().unwrap();
        let before = core_ticks(pid);
        // Two jobs, each on its own 64 MiB, written and verified.
        let job = |rw: &str| {
            format!(
                "fio --name=spread --filename={} --direct=1 --ioengine=io_uring --rw={rw} \
                 --bs=4k --iodepth=16 --numjobs=2 --size=64M --offset_increment=64M \
                 --verify=crc32c --verify_fatal=1 --do_verify=1 --group_reporting \
                 --output-format=terse --minimal >/dev/null",
                dev.path
            )
        };
        sh(&format!("cd /tmp && {}", job("randwrite")));
        let after = core_ticks(pid);
        let delta: BTreeMap<&String, u64> =
            after.iter().map(|(k, v)| (k, v - before.get(k).copied().unwrap_or(0))).collect();
        let total: u64 = delta.values().sum();
        println!(
            "{mode}: {} ({}); core ticks during fio: {delta:?}",
            info["setup"], info["tag_cpus"]
        );
        assert!(delta.len() >= 2 && total > 0, "{mode}: {delta:?}");
        for (core, d) in &delta {
            assert!(*d * 10 >= total, "{mode}: {core} did {d} of {total} ticks: not spread");
        }
        // The same bytes are in the file, read back through the device by one reader.
        sh(&format!("cmp -n 134217728 {img} {} || (echo differ; exit 1)", dev.path));
        assert_eq!(dev.stat("io_errors"), 0, "{mode}");
        dev.del();
    }
    // Not asked for: one core per queue.
    let dev = Dev::add(&["loop", img, "-q", "1"]);
    assert_eq!(dev.info()["tag_cpus"][0].as_array().unwrap().len(), 1);
    dev.del();
    let _ = std::fs::remove_file(img);
}
