//! Every bad input gets one clear line on stderr, a non-zero exit, and leaves no device or
//! daemon behind.

mod common;

use std::process::Command;

use common::*;

#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn bad_input_table() {
    require_driver();
    let b = bin();
    let offline = sh("nproc --all").trim().parse::<usize>().unwrap() + 100;
    let cases: Vec<(String, &str)> = vec![
        (format!("{b} nosuch"), "unrecognized subcommand 'nosuch'"),
        (format!("{b} null --bogus"), "unexpected argument '--bogus'"),
        (format!("{b} --bogus null"), "unexpected argument '--bogus'"),
        (format!("{b} null -d 0"), "0 is not in 1..=4096"),
        (format!("{b} null --depth 4097"), "4097 is not in 1..=4096"),
        (format!("{b} null -q 0"), "0 is not in 1..=4096"),
        (format!("{b} null --cpus {offline}"), "is not online"),
        (format!("{b} null --cpus 0-{offline}"), "is not online"),
        (format!("{b} null --cpus 3-1"), "runs backwards"),
        (format!("{b} null --cpus x"), "is not a CPU number"),
        (format!("{b} null --size 0"), "non-zero multiple of 512"),
        (format!("{b} null --size 1000"), "non-zero multiple of 512"),
        (format!("{b} null --size 1X"), "unknown unit"),
        (format!("{b} null --size G"), "is not a size"),
        (format!("{b} -n 3 list"), "do not apply to `list`"),
        (format!("{b} del"), "--id"),
        (format!("{b} del -n 999"), "no ublk device with id 999"),
        (format!("{b} list -n 999"), "no ublk device with id 999"),
        (format!("{b} loop"), "<PATH>"),
        (format!("{b} loop /nonexistent/file"), "no such file"),
        (format!("{b} loop /tmp"), "is a directory"),
        (format!("{b} loop /dev/null"), "neither a regular file nor a block device"),
        // Conflicting options: the same option twice with different values.
        (format!("{b} -q 2 null -q 3"), "--queues is given twice, as 2 and 3"),
        (format!("{b} --zero-copy on add null --zero-copy off"), "--zero-copy is given twice"),
        (format!("{b} --recovery=reissue null --recovery=fail-io"), "--recovery is given twice"),
        (format!("{b} recover"), "--id"),
        (format!("{b} recover -n x"), "invalid value 'x'"),
        (format!("{b} -q 2 recover -n 1"), "do not apply to `recover`"),
        (format!("{b} quiesce -n 999"), "no ublk device with id 999"),
        // The fault target.
        (format!("{b} fault null"), "nothing to inject"),
        (format!("{b} fault --fail"), "requires a subcommand"),
        (format!("{b} fault --every 0 --fail null"), "0 is not in 1..="),
        (format!("{b} fault --delay-ms 0 null"), "0 is not in 1..=60000"),
        (format!("{b} fault --fail=bogus null"), "possible values: eio"),
        (format!("{b} fault --op bogus --fail null"), "possible values: any, read"),
        (format!("{b} fault --fail loop /nonexistent"), "no such file"),
        (format!("{b} --recovery reissue null"), "write `--recovery=reissue`"),
        (format!("{b} null --sqpoll 5"), "write `--sqpoll=5`"),
        (format!("{b} null --sqpoll-cpu 0"), "--sqpoll"),
        (format!("{b} null --user-copy --zero-copy=on"), "pick one"),
        (format!("{b} null --sqpoll --sqpoll-cpu {offline}"), "is not online"),
    ];
    for (cmd, expect) in &cases {
        check_refused(cmd, expect);
    }
}

#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn taken_id_is_refused_and_the_first_device_survives() {
    let dev = Dev::add(&["null", "--size", "16M", "-n", "7"]);
    check_refused(&format!("{} null --size 16M -n 7", bin()), "device id is taken");
    assert_eq!(dev.info()["state"], "LIVE");
    dev.del();
}

#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn a_user_who_may_not_open_the_control_device_is_refused() {
    require_driver();
    check_refused(
        &format!("setpriv --reuid=65534 --regid=65534 --clear-groups {} null", bin()),
        "is not open to you: run as root",
    );
    check_refused(
        &format!("setpriv --reuid=65534 --regid=65534 --clear-groups {} list", bin()),
        "is not open to you: run as root",
    );
}

#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn io_uring_disabled_is_refused() {
    require_driver();
    let knob = "/proc/sys/kernel/io_uring_disabled";
    let Ok(old) = std::fs::read_to_string(knob) else {
        skip(&format!("this kernel has no {knob}"));
        return;
    };
    let devs = dev_ids();
    std::fs::write(knob, "2").unwrap();
    let o = sh_any(&format!("{} null --size 16M", bin()));
    std::fs::write(knob, old.trim()).unwrap();
    assert!(!o.status.success());
    let err = stderr(&o);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("io_uring is disabled"), "{err}");
    assert_eq!(dev_ids(), devs);
}

#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn missing_driver_is_refused_with_the_fix() {
    require_driver();
    if !dev_ids().is_empty() {
        skip("devices exist, cannot unload ublk_drv");
        return;
    }
    let rm = Command::new("rmmod").arg("ublk_drv").output().unwrap();
    if !rm.status.success() {
        skip(&format!("cannot unload ublk_drv (built in?): {}", stderr(&rm).trim()));
        return;
    }
    let o = sh_any(&format!("{} null --size 16M", bin()));
    let l = sh_any(&format!("{} list", bin()));
    require_driver();
    for out in [o, l] {
        assert!(!out.status.success());
        let err = stderr(&out);
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains("modprobe ublk_drv"), "{err}");
    }
}

#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn memlock_limit_is_checked_before_anything_is_created() {
    require_driver();
    // Root without CAP_IPC_LOCK, as in many containers, with a 1 MiB RLIMIT_MEMLOCK.
    let jail = |args: &str| {
        format!(
            "ulimit -l 1024 && exec setpriv --bounding-set=-ipc_lock --inh-caps=-ipc_lock {} {args}",
            bin()
        )
    };
    check_refused(&jail("null --size 16M -q 1 --zero-copy=off"), "RLIMIT_MEMLOCK is 1024 KiB");
    check_refused(&jail("null --size 16M -q 1 -d 4 --user-copy"), "need 2048 KiB locked");
    // Zero copy locks nothing of ours: the same limit is enough.
    let o = sh_any(&jail("null --size 16M -q 1 --zero-copy=on"));
    assert!(o.status.success(), "zero copy under a 1 MiB memlock limit: {}", stderr(&o));
    let path = stdout(&o).trim().to_string();
    let id = path.trim_start_matches("/dev/ublkb").to_string();
    sh(&format!("dd if={path} of=/dev/null bs=64k count=16 iflag=direct status=none"));
    let o = ublk(&["del", "-n", &id]);
    assert!(o.status.success());
    println!("1 MiB memlock: copy modes refused with the KiB needed; zero copy serves");
}

#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn copy_buffers_use_hugetlb_pages_when_reserved() {
    require_driver();
    let knob = "/proc/sys/vm/nr_hugepages";
    let old = std::fs::read_to_string(knob).unwrap();
    // One queue of depth 128 x 512 KiB = 64 MiB = 32 huge pages.
    std::fs::write(knob, "40").unwrap();
    let got: u32 = std::fs::read_to_string(knob).unwrap().trim().parse().unwrap();
    if got < 32 {
        std::fs::write(knob, old.trim()).unwrap();
        skip(&format!("the kernel reserved only {got} of 40 huge pages"));
        return;
    }
    let dev = Dev::add(&["null", "--size", "64M", "-q", "1", "--zero-copy=off"]);
    let setup = dev.info()["setup"].as_str().unwrap().to_string();
    let free: u32 = sh("awk '/HugePages_Free/{print $2}' /proc/meminfo").trim().parse().unwrap();
    let r = fio(&[
        "--name=huge",
        &format!("--filename={}", dev.path),
        "--ioengine=io_uring",
        "--direct=1",
        "--rw=randrw",
        "--bs=128k",
        "--iodepth=16",
        "--size=64M",
    ]);
    assert_eq!(fio_totals(&r).1, 0);
    dev.del();
    let after: u32 = sh("awk '/HugePages_Free/{print $2}' /proc/meminfo").trim().parse().unwrap();
    std::fs::write(knob, old.trim()).unwrap();
    assert!(setup.contains("2 MiB hugetlb pages"), "{setup}");
    assert_eq!(after - free, 32, "the arena's 32 huge pages were not all given back");
    println!("{setup}; 32 huge pages taken while serving and all returned after del");
}
