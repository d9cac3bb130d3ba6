//! Unprivileged devices (UBLK_F_UNPRIVILEGED_DEV), as two non-root users would meet them: the
//! real udevd with only dist/60-ublk-fast.rules hands the nodes over, each user runs a service
//! of their own under $XDG_RUNTIME_DIR, and the kernel keeps one user off the other's device.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const UDEVD: &str = "/lib/systemd/systemd-udevd";

/// The real udevd, in a mount namespace of its own whose rules directories hold nothing but
/// ublk-fast's rules (pointed at the binary under test): the nodes it changes are the
/// system's, the rules it reads are only ours.
struct Udevd {
    child: Child,
    /// Whether a udevd ran before ours: if not, its control socket must not outlive ours.
    had_control: bool,
}

/// The file by which libudev (and so dmsetup) decides that udev runs: left behind, every later
/// `dmsetup` waits forever for a udev that will never confirm its event.
const UDEV_CONTROL: &str = "/run/udev/control";

impl Udevd {
    fn start() -> Udevd {
        let rules = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../dist/60-ublk-fast.rules"
        ))
        .expect("dist/60-ublk-fast.rules")
        .replace("/usr/local/bin/ublk-fast", bin());
        std::fs::write("/tmp/60-ublk-fast.rules", rules).unwrap();
        let script =
            "set -e; for d in /etc/udev/rules.d /usr/lib/udev/rules.d /run/udev/rules.d; do \
             mkdir -p $d; mount -t tmpfs tmpfs $d; done; \
             cp /tmp/60-ublk-fast.rules /etc/udev/rules.d/; exec $0";
        let had_control = std::path::Path::new(UDEV_CONTROL).exists();
        let child = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", script, UDEVD])
            .stdin(Stdio::null())
            .spawn()
            .expect("start udevd");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !std::path::Path::new(UDEV_CONTROL).exists() {
            assert!(Instant::now() < deadline, "udevd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        sh("udevadm control --ping --timeout=10");
        Udevd { child, had_control }
    }
}

impl Drop for Udevd {
    fn drop(&mut self) {
        let _ = sh_any("udevadm control --exit --timeout=10");
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !self.had_control {
            // udevd leaves its socket behind when it exits.
            let _ = std::fs::remove_file(UDEV_CONTROL);
        }
    }
}

/// A non-root user: `useradd`ed once, with a 0700 runtime directory of their own.
struct User {
    name: &'static str,
    uid: u32,
    run: String,
}

impl User {
    fn make(name: &'static str, groups: &str) -> User {
        if sh_any(&format!("id -u {name}")).status.success() {
            sh(&format!("userdel {name}"));
        }
        let g = if groups.is_empty() { String::new() } else { format!("-G {groups}") };
        sh(&format!("useradd -M -s /bin/sh {g} {name}"));
        let uid: u32 = sh(&format!("id -u {name}")).trim().parse().unwrap();
        let run = format!("/run/user/{uid}");
        sh(&format!("mkdir -p {run} && chown {name}:{name} {run} && chmod 0700 {run}"));
        User { name, uid, run }
    }

    /// `cmd` run by bash as this user, with the environment a login would give.
    fn sh(&self, cmd: &str) -> std::process::Output {
        Command::new("setpriv")
            .args([
                &format!("--reuid={}", self.name),
                &format!("--regid={}", self.name),
                "--init-groups",
                "--reset-env",
                "env",
                &format!("XDG_RUNTIME_DIR={}", self.run),
                "bash",
                "-c",
                cmd,
            ])
            .stdin(Stdio::null())
            .output()
            .expect("setpriv")
    }

    fn ublk(&self, args: &str) -> std::process::Output {
        self.sh(&format!("{} {args}", bin()))
    }
}

fn owner_and_mode(path: &str) -> String {
    sh(&format!("stat -c '%u %a' {path}")).trim().to_string()
}

#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn two_users_each_serve_their_own_device_and_cannot_touch_the_other() {
    require_driver();
    if !offers("UNPRIVILEGED_DEV") {
        skip("this ublk driver does not offer UNPRIVILEGED_DEV");
        return;
    }
    for tool in [UDEVD, "/usr/sbin/useradd", "/usr/bin/setpriv", "/usr/bin/unshare"] {
        if !std::path::Path::new(tool).exists() {
            skip(&format!("{tool} is missing (tools/vm/setup.sh installs udev)"));
            return;
        }
    }
    if !sh_any("getent group ublk").status.success() {
        sh("groupadd --system ublk");
    }
    let alice = User::make("ublkalice", "ublk");
    let bob = User::make("ublkbob", "ublk");
    let carol = User::make("ublkcarol", "");
    let udevd = Udevd::start();
    sh("udevadm trigger --action=add /sys/devices/virtual/misc/ublk-control && udevadm settle -t 10");
    assert_eq!(
        sh("stat -c '%G %a' /dev/ublk-control").trim(),
        "ublk 660",
        "the rules open /dev/ublk-control to group ublk"
    );

    // Not in the group: one line saying what to do, nothing created.
    let o = carol.ublk("null --size 16M");
    assert!(!o.status.success());
    let err = stderr(&o);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("dist/60-ublk-fast.rules"), "{err}");
    println!("carol (not in ublk): {}", err.trim_end());

    // What the driver refuses an unprivileged device is refused before anything exists.
    let before = dev_ids();
    for (opt, expect) in [("--zero-copy=on", "--zero-copy=on"), ("--recovery", "--recovery")] {
        let o = alice.ublk(&format!("null --size 16M {opt}"));
        let err = stderr(&o);
        assert!(!o.status.success(), "{opt} accepted");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains(expect) && err.contains("root"), "{err}");
        println!("alice {opt}: {}", err.trim_end());
    }
    assert_eq!(dev_ids(), before, "a refused add left a device");

    // Alice's device, on a file of hers, served by a service of her own.
    let img = "/tmp/ublkalice.img";
    let _ = std::fs::remove_file(img);
    let o = alice.sh(&format!("truncate -s 64M {img}"));
    assert!(o.status.success());
    let o = alice.ublk(&format!("loop {img}"));
    assert!(o.status.success(), "alice's add: {}", stderr(&o));
    println!("alice's add: {}{}", stdout(&o), stderr(&o));
    let dev = stdout(&o).trim().to_string();
    let id: u32 = dev.trim_start_matches("/dev/ublkb").parse().unwrap();
    let cdev = format!("/dev/ublkc{id}");
    sh("udevadm settle -t 10");
    assert_eq!(owner_and_mode(&cdev), format!("{} 660", alice.uid));
    assert_eq!(owner_and_mode(&dev), format!("{} 660", alice.uid));
    let records = format!("{}/ublk-fast", alice.run);
    assert!(std::path::Path::new(&format!("{records}/{id}.json")).exists());
    assert!(!std::path::Path::new(&format!("/run/ublk-fast/{id}.json")).exists());

    // Her data goes through the device to her file, and back.
    let o = alice.sh(&format!(
        "head -c 4M /dev/urandom > /tmp/ublkalice.pat && \
         dd if=/tmp/ublkalice.pat of={dev} bs=1M oflag=direct status=none && \
         dd if={dev} of=/tmp/ublkalice.back bs=1M count=4 iflag=direct status=none && \
         cmp /tmp/ublkalice.pat /tmp/ublkalice.back && \
         cmp -n 4194304 /tmp/ublkalice.pat {img} && \
         cd /tmp && fio --name=v --filename={dev} --direct=1 --ioengine=io_uring --rw=randwrite --bs=4k \
             --size=32M --offset=16M --iodepth=16 --verify=crc32c --verify_fatal=1 --output-format=terse >/dev/null"
    ));
    assert!(o.status.success(), "alice's I/O: {}{}", stdout(&o), stderr(&o));
    let l = alice.ublk(&format!("list -n {id}"));
    assert!(l.status.success(), "{}", stderr(&l));
    let listing = stdout(&l);
    let flags = listing
        .split("flags 0x")
        .nth(1)
        .and_then(|s| u64::from_str_radix(s.split_whitespace().next()?, 16).ok())
        .unwrap();
    assert_ne!(flags & (1 << 5), 0, "UNPRIVILEGED_DEV in {listing}");
    assert!(listing.contains("state LIVE"), "{listing}");
    println!("alice's list:\n{listing}");

    // Bob, in the same group, can neither read her records nor touch her device.
    let o = bob.sh(&format!("ls {records} || cat {records}/{id}.json"));
    assert!(!o.status.success(), "bob read alice's records: {}", stdout(&o));
    let o = bob.sh(&format!("dd if={dev} of=/dev/null bs=4k count=1 iflag=direct"));
    assert!(!o.status.success(), "bob read alice's device");
    let o = bob.ublk(&format!("del -n {id}"));
    let err = stderr(&o);
    assert!(!o.status.success(), "bob deleted alice's device");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("not yours"), "{err}");
    println!("bob's del: {}", err.trim_end());
    // Bob's `list` shows neither her device nor root's, and says nothing of them.
    let o = ublk(&["null", "--size", "16M"]);
    assert!(o.status.success(), "root's add: {}", stderr(&o));
    let root_id = stdout(&o).trim().trim_start_matches("/dev/ublkb").to_string();
    let o = bob.ublk("list");
    assert!(o.status.success(), "bob's list: {}", stderr(&o));
    assert_eq!(stdout(&o), "", "bob sees devices not his");
    assert_eq!(stderr(&o), "", "bob's list complains");
    assert!(ublk(&["del", "-n", &root_id]).status.success());
    assert!(std::path::Path::new(&cdev).exists(), "the device is still there");
    let o = alice.sh(&format!("cmp -n 4194304 /tmp/ublkalice.pat {dev}"));
    assert!(o.status.success(), "alice's data after bob's tries: {}", stderr(&o));

    // Root sees it too (GET_DEV_INFO2 with the path).
    let l = ublk(&["list", "-n", &id.to_string()]);
    assert!(l.status.success(), "root's list: {}", stderr(&l));

    // `del --safe` (TRY_STOP_DEV, which the driver allows a device's owner): refused while
    // she holds the device open, then her device goes with it once idle.
    let safe = offers("SAFE_STOP_DEV");
    if safe {
        let mut holder = Command::new("setpriv")
            .args([
                &format!("--reuid={}", alice.name),
                &format!("--regid={}", alice.name),
                "--init-groups",
                "--reset-env",
                "sh",
                "-c",
                &format!("exec 3<{dev}; echo open; exec sleep 60"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("alice's holder");
        let mut line = String::new();
        let out = holder.stdout.take().unwrap();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line).unwrap();
        assert_eq!(line.trim(), "open", "alice's holder did not open {dev}");
        let o = alice.ublk(&format!("del --safe -n {id}"));
        let err = stderr(&o);
        let _ = holder.kill();
        let _ = holder.wait();
        assert!(!o.status.success(), "alice's del --safe of an open device succeeded");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains("is open"), "{err}");
        println!("alice's del --safe while open: {}", err.trim_end());
        let o = alice.sh(&format!("cmp -n 4194304 /tmp/ublkalice.pat {dev}"));
        assert!(o.status.success(), "alice's device after a refused del --safe: {}", stderr(&o));
    } else {
        skip("this ublk driver does not offer SAFE_STOP_DEV: alice's del --safe untried");
    }

    // Alice deletes it (safely where the driver can); her service, idle, goes.
    let pid = std::fs::read_to_string(format!("{records}/service.lock")).unwrap_or_default();
    let o = alice.ublk(&format!("del {}-n {id}", if safe { "--safe " } else { "" }));
    assert!(o.status.success(), "alice's del: {}", stderr(&o));
    assert!(wait_gone(&cdev), "{cdev} still there after del");
    let pid: i32 = pid.trim().parse().unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while pid > 0 && std::path::Path::new(&format!("/proc/{pid}")).exists() {
        assert!(Instant::now() < deadline, "alice's idle service {pid} did not exit");
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(udevd);
    let _ = std::fs::remove_file(img);
    println!("two users: alice served and deleted her own device; bob and carol were refused");
}
