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

/// `resize`: the kernel's size changes while the device serves and is mounted; ext4 grows
/// into it with resize2fs and stays consistent. A loop target refuses a size its backing store
/// does not have; null takes any.
#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn resize_grows_a_mounted_filesystem() {
    if !offers("UPDATE_SIZE") {
        skip("this ublk driver does not offer UPDATE_SIZE");
        return;
    }
    let f = "/tmp/ublk-fast-it-resize.img";
    let mnt = "/tmp/ublk-fast-it-resize-mnt";
    sh(&format!("rm -rf {f} {mnt} && mkdir {mnt} && truncate -s 64M {f}"));
    let dev = Dev::add(&["loop", f]);
    let id = dev.id.to_string();
    let size =
        || sh(&format!("lsblk -b -n -d -o SIZE {}", dev.path)).trim().parse::<u64>().unwrap();
    assert_eq!(size(), 64 << 20);
    sh(&format!("mkfs.ext4 -q -F {} && mount {} {mnt}", dev.path, dev.path));
    sh(&format!("head -c 16M /dev/urandom > {mnt}/a && sync"));
    check_refused(&format!("{} resize -n {id} 128M", bin()), "smaller than 134217728");
    sh(&format!("truncate -s 128M {f}"));
    let o = ublk(&["resize", "-n", &id, "128M"]);
    assert!(o.status.success(), "resize: {}", stderr(&o));
    assert_eq!(size(), 128 << 20, "the kernel's size after resize");
    sh(&format!("resize2fs {} >/dev/null 2>&1", dev.path));
    let blocks: u64 = sh(&format!("df -B1 --output=size {mnt} | tail -1")).trim().parse().unwrap();
    assert!(blocks > 100 << 20, "ext4 did not grow: {blocks}");
    sh(&format!("head -c 48M /dev/urandom > {mnt}/b && sync"));
    let sums = sh(&format!("sha256sum {mnt}/a {mnt}/b"));
    sh(&format!("umount {mnt}"));
    let fsck = sh_any(&format!("fsck.ext4 -fn {}", dev.path));
    assert!(fsck.status.success(), "fsck after the resize: {}", stdout(&fsck));
    sh(&format!("mount {} {mnt}", dev.path));
    assert_eq!(sh(&format!("sha256sum {mnt}/a {mnt}/b")), sums);
    sh(&format!("umount {mnt}"));
    dev.del();
    let null = Dev::add(&["null", "--size", "1G"]);
    let o = ublk(&["resize", "-n", &null.id.to_string(), "3G"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        sh(&format!("lsblk -b -n -d -o SIZE {}", null.path)).trim(),
        (3u64 << 30).to_string()
    );
    null.del();
    let _ = std::fs::remove_file(f);
    println!(
        "loop 64M -> 128M under a mounted ext4 (resize2fs, fsck clean, data intact); null 1G -> 3G"
    );
}

/// `del --safe` refuses while the device is open (a mounted filesystem, a program holding it)
/// and deletes it once it is not.
#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn del_safe_refuses_an_open_device() {
    if !offers("SAFE_STOP_DEV") {
        skip("this ublk driver does not offer SAFE_STOP_DEV");
        return;
    }
    let mut dev = Dev::add(&["null", "--size", "64M"]);
    let id = dev.id.to_string();
    let held = std::fs::File::open(&dev.path).unwrap();
    check_refused(&format!("{} del --safe -n {id}", bin()), "is open");
    assert_eq!(dev.info()["state"], "LIVE", "a refused del --safe changed the device");
    sh(&format!("dd if={} of=/dev/null bs=4k count=4 iflag=direct status=none", dev.path));
    drop(held);
    let o = ublk(&["del", "--safe", "-n", &id]);
    assert!(o.status.success(), "del --safe of an idle device: {}", stderr(&o));
    assert!(wait_gone(&dev.path));
    dev.id = u32::MAX;
}

/// Partitions on a device appear as /dev/ublkbNpM; with --no-part-scan they do not.
#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn partitions_are_scanned_unless_no_part_scan() {
    if !offers("NO_AUTO_PART_SCAN") {
        skip("this ublk driver does not offer NO_AUTO_PART_SCAN");
        return;
    }
    let f = "/tmp/ublk-fast-it-parts.img";
    sh(&format!("rm -f {f} && truncate -s 64M {f}"));
    // An MBR with one Linux partition: sectors 2048..34816 (written by hand: no sfdisk needed).
    let mut mbr = [0u8; 512];
    mbr[446 + 4] = 0x83;
    mbr[446 + 8..446 + 12].copy_from_slice(&2048u32.to_le_bytes());
    mbr[446 + 12..446 + 16].copy_from_slice(&32768u32.to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new().write(true).open(f).unwrap();
        file.write_all(&mbr).unwrap();
    }
    let part = |d: &Dev| format!("{}p1", d.path);
    let seen = |p: &str| {
        let t = std::time::Instant::now();
        while t.elapsed() < std::time::Duration::from_secs(5) {
            if std::path::Path::new(p).exists() {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        false
    };
    let d = Dev::add(&["loop", f]);
    assert!(seen(&part(&d)), "{} did not appear", part(&d));
    d.del();
    let d = Dev::add(&["loop", f, "--no-part-scan"]);
    assert!(!seen(&part(&d)), "{} appeared with --no-part-scan", part(&d));
    assert!(d.info()["flags"].as_array().unwrap().iter().any(|x| x == "NO_AUTO_PART_SCAN"));
    d.del();
    let _ = std::fs::remove_file(f);
}

/// `del --all` deletes ublk-fast's own devices and leaves another server's; `--all-servers`
/// deletes those too. The other server is the kernel selftests' kublk, where bench/ built it.
#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn del_all_leaves_other_servers_devices() {
    require_driver();
    let kublk = "/var/tmp/ublk-fast-peers/bin/kublk";
    if !std::path::Path::new(kublk).exists() {
        skip("no kublk here (bench/build-kublk.sh builds it)");
        return;
    }
    let o = sh_any(&format!("{kublk} add -t null -q 1 -d 32 -n 200"));
    assert!(o.status.success(), "kublk add: {}{}", stdout(&o), stderr(&o));
    let theirs = "/dev/ublkb200";
    let ours = Dev::add(&["null", "--size", "16M"]);
    let o = ublk(&["del", "--all"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(wait_gone(&ours.path), "our device survived del --all");
    std::mem::forget(ours);
    assert!(std::path::Path::new(theirs).exists(), "del --all deleted kublk's device");
    let o = ublk(&["del", "--all", "--all-servers"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(wait_gone(theirs), "del --all --all-servers left kublk's device");
}
