//! The node service: one process and one thread per CPU serve every device; its control
//! socket; adding and deleting devices never pauses the others; crash, SIGTERM and restart
//! hand every device over; systemd's own verifier accepts the unit.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const SOCK: &str = "/run/ublk-fast/control.sock";

fn cpus() -> usize {
    sh("nproc").trim().parse().unwrap()
}

/// The service's own threads (io_uring's workers, `iou-wrk`/`iou-sqp`, come and go with the
/// kernel's needs and are not counted).
fn threads(pid: i64) -> Vec<String> {
    // An io_uring worker may exit between the glob and its read: that one is not ours anyway.
    let o = sh_any(&format!("cat /proc/{pid}/task/*/comm"));
    stdout(&o).lines().filter(|t| !t.starts_with("iou-")).map(str::to_string).collect()
}

/// One raw request line over the control socket; the answer line.
fn raw_request(line: &[u8]) -> String {
    let mut s = UnixStream::connect(SOCK).expect("connect to the control socket");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(line).unwrap();
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn shutdown_service() {
    let o = ublk(&["shutdown"]);
    assert!(o.status.success(), "shutdown: {}", stderr(&o));
    let t = Instant::now();
    while !daemons().is_empty() {
        assert!(t.elapsed() < Duration::from_secs(30), "the service outlived shutdown");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `serve` runs one process with one core thread per CPU; a second `serve` names the pid that
/// serves; the socket is 0600 in a 0700 directory; malformed and oversized requests get an
/// error answer and change nothing; `shutdown` deletes every device and stops it.
#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn serve_runs_one_process_and_its_socket_refuses_bad_requests() {
    require_driver();
    let n = cpus();
    let o = ublk(&["serve"]);
    assert!(o.status.success(), "serve: {}", stderr(&o));
    let procs = daemons();
    assert_eq!(procs.len(), 1, "{procs:?}");
    let pid = i64::from(procs[0]);
    let second = ublk(&["serve"]);
    assert!(!second.status.success());
    let err = stderr(&second);
    assert!(err.contains(&format!("already runs (pid {pid})")), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    let mode = |p: &str| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("/run/ublk-fast"), 0o700);
    assert_eq!(mode(SOCK), 0o600);
    let adj = sh(&format!("cat /proc/{pid}/oom_score_adj"));
    assert_eq!(adj.trim(), "-900", "the service's oom_score_adj");
    let all = threads(pid);
    let cores = all.iter().filter(|t| t.starts_with("ublk-core")).count();
    assert_eq!(cores, n, "one core thread per CPU: {all:?}");
    assert!(all.len() - cores <= 4, "more than 4 control threads: {all:?}");
    let dev = Dev::add(&["null", "--size", "64M"]);
    for f in ["json", "stats"] {
        assert_eq!(mode(&format!("/run/ublk-fast/{}.{f}", dev.id)), 0o600, "{f} file mode");
    }
    for bad in [
        b"nonsense\n".to_vec(),
        b"{\"version\":99,\"op\":\"status\"}\n".to_vec(),
        b"{\"version\":1,\"op\":\"del\",\"id\":\"x\"}\n".to_vec(),
        b"{\"version\":1,\"op\":\"explode\"}\n".to_vec(),
        b"{\"version\":1,\"op\":\"del\",\"id\":0,\"all\":true}\n".to_vec(),
        [vec![b'x'; 100_000], b"\n".to_vec()].concat(),
    ] {
        let answer = raw_request(&bad);
        let v: serde_json::Value = serde_json::from_str(answer.trim()).unwrap_or_default();
        assert_eq!(v["ok"], false, "{answer}");
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{answer}");
        println!("refused: {}", v["error"]);
    }
    // Nothing changed: the device still serves, the service still answers.
    assert_eq!(dev.info()["state"], "LIVE");
    let st = raw_request(b"{\"version\":1,\"op\":\"status\"}\n");
    let v: serde_json::Value = serde_json::from_str(st.trim()).unwrap();
    assert_eq!(v["status"]["devices"], serde_json::json!([dev.id]), "{st}");
    assert_eq!(v["status"]["pid"], pid);
    // The service stays after its last device goes (it was started by `serve`).
    let path = dev.path.clone();
    dev.del();
    assert_eq!(daemons(), procs);
    let dev = Dev::add(&["null", "--size", "64M"]);
    assert_eq!(dev.info()["pid"], pid);
    shutdown_service();
    assert!(wait_gone(&path));
    assert!(!std::path::Path::new(&dev.path).exists(), "shutdown left {}", dev.path);
    assert!(dev_ids().is_empty());
    std::mem::forget(dev);
    if n >= 2 {
        // A device's --cpus must be among the service's.
        let o = ublk(&["serve", "--cpus", "0"]);
        assert!(o.status.success(), "serve --cpus 0: {}", stderr(&o));
        check_refused(
            &format!("{} null --cpus 1", bin()),
            "CPU 1 is not one of the service's CPUs",
        );
        shutdown_service();
    }
}

/// One process serves 1 and 16 devices with the same threads; a device's `--cpus` outside
/// the service's is refused with one line; fio verify on one device while 20 others are added,
/// loaded and deleted sees no error and no completion gap over 1 s.
#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn adding_and_deleting_devices_never_pauses_the_others() {
    require_driver();
    let n = cpus();
    let f = "/tmp/ublk-fast-it-steady.img";
    sh(&format!("rm -f {f} && truncate -s 256M {f}"));
    let steady = Dev::add(&["loop", f, "-q", "2"]);
    let pid = steady.info()["pid"].as_i64().unwrap();
    let base = threads(pid).len();
    if n >= 2 {
        // The service runs on every CPU; a device may take a subset, not more.
        check_refused(&format!("{} null --cpus {}", bin(), n + 7), "is not online");
    }
    let lat = "/tmp/ublk-fast-it-steady";
    let _ = std::fs::remove_file(format!("{lat}_lat.1.log"));
    let fio = spawn_fio(&[
        "--name=steady",
        &format!("--filename={}", steady.path),
        "--ioengine=io_uring",
        "--direct=1",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=8",
        "--size=64M",
        "--rate_iops=800",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        &format!("--write_lat_log={lat}"),
        "--log_avg_msec=0",
    ]);
    std::thread::sleep(Duration::from_secs(2));
    let mut many = Vec::new();
    for i in 0..20 {
        let size = "32M".to_string();
        let args: Vec<&str> = if i % 2 == 0 {
            vec!["null", "--size", &size, "-q", "1", "-d", "32"]
        } else {
            vec!["null", "--size", &size, "-q", "2", "-d", "64", "--zero-copy=off"]
        };
        let d = Dev::add(&args);
        assert_eq!(d.info()["pid"], pid, "device {} in another process", d.id);
        sh(&format!("dd if={} of=/dev/null bs=64k count=64 iflag=direct status=none", d.path));
        many.push(d);
        if many.len() == 15 {
            // 16 devices in all now: the same threads as with one.
            assert_eq!(threads(pid).len(), base, "threads grew with devices: {:?}", threads(pid));
            println!("16 devices, {base} threads ({n} core threads)");
        }
    }
    for d in many {
        d.del();
    }
    let out = fio.wait_with_output().unwrap();
    assert!(out.status.success(), "fio: {}{}", stdout(&out), stderr(&out));
    assert_eq!(fio_totals(&fio_report(&stdout(&out)).unwrap()).1, 0);
    // Completion times (ms) of every write and verify read: no gap over a second.
    let log = std::fs::read_to_string(format!("{lat}_lat.1.log")).unwrap();
    let times: Vec<u64> =
        log.lines().filter_map(|l| l.split(',').next()?.trim().parse().ok()).collect();
    let gap = times.windows(2).map(|w| w[1].saturating_sub(w[0])).max().unwrap_or(0);
    assert!(times.len() > 1000, "only {} completions logged", times.len());
    assert!(gap < 1000, "a completion gap of {gap} ms while devices came and went");
    println!("{} completions, longest gap {gap} ms, 64 MiB verified", times.len());
    steady.del();
    let _ = std::fs::remove_file(f);
    let _ = std::fs::remove_file(format!("{lat}_lat.1.log"));
}

/// kill -9 of the service with three `--recovery=reissue` devices under verified writes and
/// a plain one: `ublk-fast serve` takes the three over by itself (the writers never see an
/// error and every acknowledged block reads back) and deletes the plain one.
#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn kill_9_of_the_service_then_serve_takes_every_device_over() {
    require_driver();
    let mut devs = Vec::new();
    for i in 0..3 {
        let f = format!("/tmp/ublk-fast-it-svc-crash-{i}.img");
        let dir = format!("/tmp/ublk-fast-it-svc-crash-state-{i}");
        sh(&format!("rm -rf {f} {dir} && mkdir {dir} && truncate -s 32M {f}"));
        let zc = if i == 1 { "--zero-copy=off" } else { "--zero-copy=auto" };
        let dev = Dev::add(&["loop", &f, "-q", "2", "--recovery=reissue", zc]);
        devs.push((dev, f, dir));
    }
    let plain = Dev::add(&["null", "--size", "16M"]);
    let pid = plain.info()["pid"].as_i64().unwrap();
    assert!(devs.iter().all(|(d, _, _)| d.info()["pid"] == pid), "one process serves all");
    let writers: Vec<_> = devs
        .iter()
        .map(|(d, _, dir)| {
            let mut a = crash_job(&d.path, dir, "32M");
            a.extend(
                ["--rate_iops=800", "--do_verify=0", "--verify_state_save=1"].map(String::from),
            );
            spawn_fio(&a.iter().map(String::as_str).collect::<Vec<_>>())
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    // SAFETY: signalling the service by pid.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    for (d, _, _) in &devs {
        wait_state(d, "QUIESCED", Duration::from_secs(20));
    }
    let o = ublk(&["serve"]);
    assert!(o.status.success(), "serve: {}", stderr(&o));
    for (d, _, _) in &devs {
        wait_state(d, "LIVE", Duration::from_secs(20));
        assert_ne!(d.info()["pid"], pid);
    }
    assert!(wait_gone(&plain.path), "the plain device of the dead service was not deleted");
    std::mem::forget(plain);
    let mut total = 0;
    for w in writers {
        let out = w.wait_with_output().unwrap();
        assert!(out.status.success(), "a writer failed across the crash: {}", stderr(&out));
    }
    for (d, f, dir) in devs {
        let v = verify_acknowledged(&d.path, &dir, "32M");
        total += v;
        d.del();
        let _ = std::fs::remove_file(f);
        let _ = std::fs::remove_dir_all(dir);
    }
    println!(
        "kill -9 of the service, 3 devices taken over by the next: {} MiB verified",
        total >> 20
    );
    shutdown_service();
}

/// SIGTERM under verified writes: the plain device is deleted after its I/O, the
/// `--recovery` device is quiesced and left; the next service takes it over and the writer
/// sees no error (an upgrade).
#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn sigterm_hands_recovery_devices_to_the_next_service() {
    require_driver();
    if !offers("QUIESCE") {
        skip("this ublk driver does not offer QUIESCE");
        return;
    }
    let o = ublk(&["serve"]);
    assert!(o.status.success(), "serve: {}", stderr(&o));
    let f = "/tmp/ublk-fast-it-upgrade.img";
    let dir = "/tmp/ublk-fast-it-upgrade-state";
    sh(&format!("rm -rf {f} {dir} && mkdir {dir} && truncate -s 32M {f}"));
    let dev = Dev::add(&["loop", f, "-q", "2", "--recovery=reissue"]);
    let plain = Dev::add(&["null", "--size", "16M"]);
    let pid = dev.info()["pid"].as_i64().unwrap();
    let mut a = crash_job(&dev.path, dir, "32M");
    a.extend(["--rate_iops=800", "--do_verify=0", "--verify_state_save=1"].map(String::from));
    let writer = spawn_fio(&a.iter().map(String::as_str).collect::<Vec<_>>());
    std::thread::sleep(Duration::from_secs(3));
    // SAFETY: signalling the service by pid.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
    let t = Instant::now();
    while daemons().contains(&(pid as i32)) {
        assert!(t.elapsed() < Duration::from_secs(60), "the service did not exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(wait_gone(&plain.path), "SIGTERM left the plain device");
    std::mem::forget(plain);
    wait_state(&dev, "QUIESCED", Duration::from_secs(10));
    let o = ublk(&["serve"]);
    assert!(o.status.success(), "serve: {}", stderr(&o));
    wait_state(&dev, "LIVE", Duration::from_secs(20));
    let out = writer.wait_with_output().unwrap();
    assert!(out.status.success(), "the writer saw the upgrade: {}", stderr(&out));
    let v = verify_acknowledged(&dev.path, dir, "32M");
    println!("SIGTERM + new service under load: {} KiB verified, 0 errors", v >> 10);
    dev.del();
    shutdown_service();
    let _ = std::fs::remove_file(f);
    let _ = std::fs::remove_dir_all(dir);
}

/// systemd's own verifier accepts the unit the project ships.
#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn the_systemd_unit_verifies() {
    let unit = concat!(env!("CARGO_MANIFEST_DIR"), "/../dist/ublk-fast.service");
    if Command::new("systemd-analyze").arg("--version").stdout(Stdio::null()).status().is_err() {
        skip("no systemd-analyze here");
        return;
    }
    // The unit names /usr/local/bin/ublk-fast: verify it against this build, put there.
    let dir = std::env::temp_dir().join("ublk-fast-unit");
    let _ = std::fs::create_dir_all(&dir);
    let text = std::fs::read_to_string(unit).unwrap().replace("/usr/local/bin/ublk-fast", bin());
    let copy = dir.join("ublk-fast.service");
    std::fs::write(&copy, text).unwrap();
    let o = Command::new("systemd-analyze").arg("verify").arg(&copy).output().unwrap();
    let err = stderr(&o);
    // Messages about other units on this system are not ours.
    let ours: Vec<&str> = err.lines().filter(|l| l.contains("ublk-fast")).collect();
    assert!(o.status.success() && ours.is_empty(), "systemd-analyze verify: {err}");
    println!("systemd-analyze verify: ok");
}

/// The service dies between ADD_DEV and the device serving (a test hook aborts it there): the
/// device was recorded as soon as the kernel knew it, so the next service finds it and
/// deletes it (it never served; nobody holds its data). Nothing is left unrecorded.
#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn a_crash_while_adding_leaves_no_unknown_device() {
    require_driver();
    shutdown_service();
    let before = dev_ids();
    let o = Command::new(bin())
        .args(["null", "--size", "16M"])
        .env("UBLK_FAST_TEST_CRASH_AFTER_ADD", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    println!("add with a crash after ADD_DEV: {:?}: {}", o.status, stderr(&o).trim());
    assert!(!o.status.success(), "the add succeeded although its service died");
    assert!(stderr(&o).lines().count() == 1, "not one line: {}", stderr(&o));
    let left: Vec<u32> = dev_ids().into_iter().filter(|i| !before.contains(i)).collect();
    println!("devices the dead service left: {left:?}");
    assert_eq!(left.len(), 1, "the crash should leave the half-created device");
    let id = left[0];
    assert!(std::path::Path::new(&format!("/run/ublk-fast/{id}.json")).exists(), "no record");
    // The next service deals with it at start (what it says then goes to the caller's stderr).
    let o = ublk(&["serve"]);
    assert!(o.status.success(), "serve: {}", stderr(&o));
    let said = stderr(&o);
    let t = Instant::now();
    while dev_ids().contains(&id) {
        assert!(t.elapsed() < Duration::from_secs(20), "dev {id} still there");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!std::path::Path::new(&format!("/run/ublk-fast/{id}.json")).exists());
    // Its log is complete once it ended.
    shutdown_service();
    let log = std::fs::read_to_string("/run/ublk-fast/daemon.log").unwrap_or_default() + &said;
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains(&format!("dev {id}:")) && l.contains("died while creating it"))
        .unwrap_or("");
    println!("the next service: {line}");
    assert!(!line.is_empty(), "the next service did not say why it deleted dev {id}");
}

/// A write stuck in its backend (the fault target holds it 60 s) does not hold `del` or
/// SIGTERM past the drain limit (here 5 s, UBLK_FAST_DRAIN_LIMIT_S): the device's backend
/// operations are cancelled, the write completes, the device goes.
#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn a_stuck_backend_holds_neither_del_nor_sigterm_past_the_drain_limit() {
    require_driver();
    shutdown_service();
    let add = || {
        let o = Command::new(bin())
            .args(["fault", "--op", "write", "--delay-ms", "60000", "null", "--size", "16M"])
            .env("UBLK_FAST_DRAIN_LIMIT_S", "5")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(o.status.success(), "add: {}", stderr(&o));
        stdout(&o).trim().to_string()
    };
    let stuck_write = |path: &str| {
        let w = Command::new("dd")
            .args(["if=/dev/zero", &format!("of={path}"), "bs=4k", "count=1", "oflag=direct"])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_secs(1));
        w
    };
    // del
    let path = add();
    let id = path.trim_start_matches("/dev/ublkb").to_string();
    let w = stuck_write(&path);
    let t = Instant::now();
    let o = ublk(&["del", "-n", &id]);
    let took = t.elapsed();
    let out = w.wait_with_output().unwrap();
    println!(
        "del with a write stuck for 60 s: {:?} after {took:.1?}; the write: {:?}",
        o.status, out.status
    );
    assert!(o.status.success(), "del: {}", stderr(&o));
    assert!(took < Duration::from_secs(20), "del took {took:?}");
    assert!(wait_gone(&path));
    // SIGTERM
    let path = add();
    let pid = daemons()[0];
    let w = stuck_write(&path);
    let t = Instant::now();
    // SAFETY: signalling the service by pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        assert!(t.elapsed() < Duration::from_secs(30), "the service still runs after SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = t.elapsed();
    let out = w.wait_with_output().unwrap();
    println!(
        "SIGTERM with a write stuck for 60 s: the service ended after {took:.1?}; the write: {:?}",
        out.status
    );
    assert!(took < Duration::from_secs(20), "SIGTERM took {took:?}");
    assert!(wait_gone(&path), "the device outlived its service");
    let log = std::fs::read_to_string("/run/ublk-fast/daemon.log").unwrap_or_default();
    assert!(log.contains("cancelling its backend operations"), "no drain-limit line in the log");
}

/// Runs `cmd` for at most 20 s: true if it succeeded. A command still running then is left
/// (it may be stuck in the kernel), with the kernel's blocked-task report in the console.
// A command stuck in the kernel cannot be waited for: it is deliberately left.
#[allow(clippy::zombie_processes)]
fn bounded(cmd: &mut Command, what: &str) -> bool {
    let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(20) {
        if let Some(st) = child.try_wait().unwrap() {
            return st.success();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let stack = std::fs::read_to_string(format!("/proc/{}/stack", child.id())).unwrap_or_default();
    println!("{what}: still running after 20 s; its stack:\n{stack}");
    let _ = std::fs::write("/proc/sysrq-trigger", "w");
    false
}

/// A write held below the backend, where io_uring cannot cancel it (a suspended device-mapper
/// device keeps the bio), does not hang `del` or the service: STOP_DEV gives up after the
/// control limit (here 4 s, UBLK_FAST_CTRL_LIMIT_S) with a line that names it, the service
/// keeps answering and serving its other device, and once the backing device resumes the
/// stop ends and the device is deleted.
#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn a_stop_the_kernel_cannot_finish_does_not_hang_the_service() {
    require_driver();
    if sh_any("modprobe dm_mod && modprobe loop && which dmsetup").status.code() != Some(0) {
        skip("no device-mapper or dmsetup here");
        return;
    }
    shutdown_service();
    let file = "/var/tmp/ublk-fast-it-stuck.img";
    sh(&format!("rm -f {file}; truncate -s 64M {file}"));
    let kl = sh(&format!("losetup --direct-io=on -f --show {file}")).trim().to_string();
    let name = "ublk-fast-it-stuck";
    sh(&format!("dmsetup create {name} --table '0 131072 linear {kl} 0'"));
    let dm = sh(&format!(
        "for d in /sys/block/dm-*; do [ \"$(cat $d/dm/name)\" = {name} ] && basename $d; done; true"
    ));
    let mapper = format!("/dev/{}", dm.trim());
    let env = [("UBLK_FAST_DRAIN_LIMIT_S", "1"), ("UBLK_FAST_CTRL_LIMIT_S", "4")];
    let other = Dev::add_with_env(&["null", "--size", "16M"], &env);
    let mut dev = Dev::add(&["loop", &mapper, "--no-part-scan"]);
    let id = dev.id;
    sh(&format!("dmsetup suspend {name}"));
    let writer = Command::new("dd")
        .args(["if=/dev/zero", &format!("of={}", dev.path), "bs=4k", "count=1", "oflag=direct"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let t = Instant::now();
    let o = ublk(&["del", "-n", &dev.id.to_string()]);
    let took = t.elapsed();
    println!(
        "del with a write held by a suspended dm device: {:?} after {took:.1?}: {}",
        o.status,
        stderr(&o).trim()
    );
    // The service still answers, and serves its other device.
    let t = Instant::now();
    let listed = bounded(Command::new(bin()).arg("list"), "list");
    let read = bounded(
        Command::new("dd").args([
            &format!("if={}", other.path),
            "of=/dev/null",
            "bs=4k",
            "count=256",
            "iflag=direct",
        ]),
        "a read on the other device",
    );
    println!(
        "meanwhile: list ok {listed}, a read on the other device ok {read}, in {:.1?}",
        t.elapsed()
    );
    sh(&format!("dmsetup resume {name}"));
    let w = writer.wait_with_output().unwrap();
    let gone = wait_gone(&dev.path);
    // The block device goes when STOP_DEV ends; the service deletes the device just after.
    let said = format!("dev {}: its late stop ended", dev.id);
    let t = Instant::now();
    let late = loop {
        let log = std::fs::read_to_string("/run/ublk-fast/daemon.log").unwrap_or_default();
        let line = log.lines().rev().find(|l| l.contains(&said)).map(str::to_string);
        if line.is_some() || t.elapsed() > Duration::from_secs(10) {
            break line;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    println!("after resume: the write {:?}, device gone: {gone}, log: {late:?}", w.status);
    if gone {
        dev.id = u32::MAX;
    }
    other.del();
    let _ = sh_any(&format!("dmsetup remove {name}; losetup -d {kl}; rm -f {file}"));
    assert!(!o.status.success(), "del succeeded with its STOP_DEV held");
    let said = format!("STOP_DEV on dev {} did not finish within 4 s", id);
    assert!(stderr(&o).contains(&said), "{}", stderr(&o));
    assert!(took < Duration::from_secs(20), "del took {took:?}");
    assert!(listed && read, "the service stopped serving");
    assert!(gone, "the device was not deleted once its stop ended");
    assert!(late.is_some(), "no line saying the late stop ended");
}

/// A command that starts the service does not wait for it forever: past the READY wait (here
/// 3 s, UBLK_FAST_READY_WAIT_S; the service holds READY 20 s through a test hook) it fails with
/// a line saying what it waited for, and no device is left.
#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn a_command_waits_for_a_starting_service_only_so_long() {
    require_driver();
    shutdown_service();
    let before = dev_ids();
    let t = Instant::now();
    let o = Command::new(bin())
        .args(["null", "--size", "16M"])
        .env("UBLK_FAST_READY_WAIT_S", "3")
        .env("UBLK_FAST_TEST_HOLD_READY_S", "20")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let took = t.elapsed();
    println!(
        "add while the service holds READY: {:?} after {took:.1?}: {}",
        o.status,
        stderr(&o).trim()
    );
    assert!(!o.status.success(), "the add succeeded");
    assert!(stderr(&o).contains("did not report READY within 3 s"), "{}", stderr(&o));
    assert!(took < Duration::from_secs(15), "the add took {took:?}");
    assert_eq!(dev_ids(), before, "a device was left");
    // The service, once ready, is reachable and serves; then it goes.
    std::thread::sleep(Duration::from_secs(20));
    let dev = Dev::add(&["null", "--size", "16M"]);
    dev.del();
    shutdown_service();
}
