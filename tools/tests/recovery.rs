//! Crash and take-over: `kill -9` of a daemon under write load, `recover`, and not one byte
//! acknowledged before the crash may be lost.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn wait_state(dev: &Dev, want: &str, limit: Duration) {
    let t = Instant::now();
    loop {
        let s = dev.info()["state"].as_str().unwrap_or("").to_string();
        if s == want {
            println!("state {want} after {:.1?}", t.elapsed());
            return;
        }
        assert!(t.elapsed() < limit, "state {s}, wanted {want} within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn kill9(pid: i64) {
    // SAFETY: signalling a daemon process by pid.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0, "kill -9 {pid}");
}

fn recover(dev: &Dev) {
    let o = ublk(&["recover", "-n", &dev.id.to_string()]);
    assert!(o.status.success(), "recover failed: {}", stderr(&o));
    assert_eq!(stdout(&o).trim(), dev.path);
}

/// Starts fio writing 32 MiB of crc32c-stamped 4k blocks at a limited rate (so a crash or a
/// hand-over lands mid-run), then verifying all of it.
fn spawn_verified_writes(dev: &Dev, name: &str) -> std::process::Child {
    Command::new("fio")
        .args([
            &format!("--name={name}"),
            &format!("--filename={}", dev.path),
            "--ioengine=io_uring",
            "--direct=1",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=32M",
            "--rate_iops=2000",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--output-format=json",
            "--eta=never",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for that fio: it must succeed with no errors.
fn expect_clean_fio(fio: std::process::Child, what: &str) {
    let out = fio.wait_with_output().unwrap();
    assert!(out.status.success(), "fio across the {what} failed: {}{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    let v: serde_json::Value = serde_json::from_str(&text[text.find('{').unwrap()..]).unwrap();
    assert_eq!(fio_totals(&v).1, 0);
}

#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn kill_9_under_verified_write_load_then_recover_loses_nothing() {
    for zc in ["auto", "off"] {
        let f = format!("/tmp/ublk-fast-it-recover-{zc}.img");
        sh(&format!("rm -f {f} && truncate -s 64M {f}"));
        let dev = Dev::add(&["loop", &f, "-q", "2", "--recovery=reissue", "--zero-copy", zc]);
        let pid = dev.info()["pid"].as_i64().unwrap();
        let fio = spawn_verified_writes(&dev, "crash");
        std::thread::sleep(Duration::from_millis(1500));
        kill9(pid);
        wait_state(&dev, "QUIESCED", Duration::from_secs(20));
        recover(&dev);
        wait_state(&dev, "LIVE", Duration::from_secs(5));
        let new_pid = dev.info()["pid"].as_i64().unwrap();
        assert_ne!(new_pid, pid);
        expect_clean_fio(fio, "crash");
        println!(
            "zero copy {zc}: daemon {pid} killed mid-write, {new_pid} took over, 32 MiB verified"
        );
        dev.del();
        let _ = std::fs::remove_file(&f);
    }
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
    check_refused(&format!("{b} recover -n 999"), "no usable record");
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
    require_driver();
    if !stdout(&ublk(&["features"])).contains("QUIESCE") {
        println!("SKIP: this ublk driver does not offer QUIESCE");
        return;
    }
    let f = "/tmp/ublk-fast-it-quiesce.img";
    sh(&format!("rm -f {f} && truncate -s 64M {f}"));
    let dev = Dev::add(&["loop", f, "-q", "2", "--recovery=reissue"]);
    let pid = dev.info()["pid"].as_i64().unwrap();
    let fio = spawn_verified_writes(&dev, "upgrade");
    std::thread::sleep(Duration::from_millis(1500));
    let o = ublk(&["quiesce", "-n", &dev.id.to_string()]);
    assert!(o.status.success(), "quiesce failed: {}", stderr(&o));
    assert!(!daemons().contains(&(pid as i32)), "the old daemon still runs after quiesce");
    wait_state(&dev, "QUIESCED", Duration::from_secs(10));
    recover(&dev);
    wait_state(&dev, "LIVE", Duration::from_secs(5));
    expect_clean_fio(fio, "hand-over");
    println!("quiesce + recover under load: 32 MiB verified, 0 fio errors");
    // A device without --recovery cannot be quiesced.
    let plain = Dev::add(&["null", "--size", "16M"]);
    check_refused(&format!("{} quiesce -n {}", bin(), plain.id), "cannot be quiesced");
    plain.del();
    dev.del();
    let _ = std::fs::remove_file(f);
}
