//! A drop-in for users of ublksrv, rublk and kublk: their spellings are accepted, `list`
//! prints their two-line layout, `features` names every flag as the UAPI does.

mod common;

use common::*;

fn flags(dev: &Dev) -> Vec<String> {
    dev.info()["flags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_string())
        .collect()
}

/// Their spellings create what ours do, checked against the driver's view of each device.
#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn their_spellings_create_the_same_devices() {
    require_driver();
    let f = "/tmp/ublk-fast-it-compat.img";
    sh(&format!("rm -f {f} && truncate -s 64M {f}"));
    // ublksrv / kublk: add -t loop -f FILE -q N -d D -z
    if offers("AUTO_BUF_REG") {
        let d = Dev::add(&["add", "-t", "loop", "-f", f, "-q", "1", "-d", "64", "-z"]);
        let v = d.info();
        assert_eq!((v["queues"].as_u64(), v["depth"].as_u64()), (Some(1), Some(64)), "{v}");
        assert_eq!(v["target"], "loop");
        assert!(flags(&d).contains(&"AUTO_BUF_REG".to_string()), "-z is zero copy");
        let r = fio(&[
            "--name=compat",
            &format!("--filename={}", d.path),
            "--ioengine=io_uring",
            "--direct=1",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=8M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
        ]);
        assert_eq!(fio_totals(&r).1, 0);
        d.del();
    }
    // --number, -u (user copy), --buffered_io
    let d = Dev::add(&["add", "-t", "loop", "-f", f, "--number", "9", "-u", "--buffered_io"]);
    assert_eq!(d.id, 9);
    assert!(flags(&d).contains(&"USER_COPY".to_string()));
    assert!(d.info()["args"].as_array().unwrap().iter().any(|a| a == "--buffered"));
    d.del();
    // -r 1 [-i 1 | -e 1]: recovery as ublksrv spells it.
    for (spelling, want) in [
        (vec!["-r", "1"], vec!["USER_RECOVERY"]),
        (vec!["-r", "1", "-i", "1"], vec!["USER_RECOVERY", "USER_RECOVERY_REISSUE"]),
        (vec!["-r", "1", "-e", "1"], vec!["USER_RECOVERY", "USER_RECOVERY_FAIL_IO"]),
        (vec!["-r", "0"], vec![]),
    ] {
        let mut args = vec!["add", "-t", "null", "--size", "16M"];
        args.extend(&spelling);
        let d = Dev::add(&args);
        let got = flags(&d);
        for w in &want {
            assert!(got.contains(&w.to_string()), "{spelling:?}: {got:?}");
        }
        assert_eq!(got.iter().any(|g| g.starts_with("USER_RECOVERY")), !want.is_empty());
        d.del();
    }
    // -b: batch commands.
    if offers("BATCH_IO") {
        let d = Dev::add(&["add", "-t", "null", "--size", "16M", "-b"]);
        assert!(flags(&d).contains(&"BATCH_IO".to_string()));
        d.del();
    }
    // del -a removes every device; list -a lists them all.
    let a = Dev::add(&["add", "-t", "null", "--size", "16M"]);
    let b = Dev::add(&["add", "-t", "null", "--size", "16M"]);
    let all = stdout(&ublk(&["list", "-a"]));
    for d in [&a, &b] {
        assert!(all.contains(&format!("dev id {}: ", d.id)), "{all}");
    }
    let o = ublk(&["del", "-a"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(wait_gone(&a.path) && wait_gone(&b.path));
    std::mem::forget(a);
    std::mem::forget(b);
    let bad = format!("{} add -t null -z --zero-copy=off", bin());
    check_refused(&bad, "-z means --zero-copy=on");
    check_refused(&format!("{} add -t null -i 1", bin()), "give -r 1 too");
    let _ = std::fs::remove_file(f);
}

/// `list` prints ublksrv's two lines per device (and ours after them), `list -v` more;
/// `features` prints the mask and one UAPI name a line, none unknown; `help` works.
#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn list_features_and_help_speak_their_format() {
    require_driver();
    let d = Dev::add(&["null", "--size", "1G", "-q", "1", "-d", "32"]);
    let pid = d.info()["pid"].as_i64().unwrap();
    let out = stdout(&ublk(&["list"]));
    let mut lines = out.lines();
    let first = lines.next().unwrap_or("");
    assert_eq!(
        first,
        format!(
            "dev id {}: nr_hw_queues 1 queue_depth 32 block size 512 dev_capacity 2097152",
            d.id
        )
    );
    let second = lines.next().unwrap_or("");
    assert!(
        second.starts_with(&format!("\tmax rq size 524288 daemon pid {pid} flags 0x")),
        "{second}"
    );
    assert!(second.ends_with(" state LIVE"), "{second}");
    assert!(out.contains("\ttarget null --size=1073741824"), "{out}");
    let verbose = stdout(&ublk(&["list", "-v"]));
    assert!(verbose.contains("\tqueue 0: kernel CPUs ["), "{verbose}");
    assert!(verbose.contains("\tstats "), "{verbose}");
    d.del();
    let feats = stdout(&ublk(&["features"]));
    assert!(feats.starts_with("ublk driver features: 0x"), "{feats}");
    assert!(!feats.contains("BIT") && !feats.to_lowercase().contains("unknown"), "{feats}");
    assert!(feats.lines().skip(1).all(|l| l.trim_start().contains("UBLK_F_")), "{feats}");
    assert!(feats.contains("UBLK_F_SUPPORT_ZERO_COPY") || !offers("ZERO_COPY"), "{feats}");
    for args in [vec!["help"], vec!["help", "add"], vec!["help", "del"]] {
        let o = ublk(&args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        assert!(stdout(&o).contains("Usage:"), "{args:?}");
    }
    println!("{feats}");
}
