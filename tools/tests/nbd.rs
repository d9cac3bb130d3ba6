//! The nbd target against real NBD servers in the guest: nbdkit (file, memory; its log and
//! error filters) and qemu-nbd (a qcow2 image). Data is verified end to end (fio crc32c, a
//! checksum of the whole device against the server's backing store after `del`, ext4 + fsck);
//! the server is killed and restarted under load; a server gone for good fails I/O with EIO.

mod common;

use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A server process, killed on drop.
struct Server {
    child: Option<Child>,
    argv: Vec<String>,
    /// How to tell it is ready: a Unix socket path, or a TCP port on 127.0.0.1.
    ready: Ready,
}

#[derive(Clone)]
enum Ready {
    Unix(String),
    Tcp(u16),
}

impl Server {
    fn start(argv: &[&str], ready: Ready) -> Option<Server> {
        if !Path::new(&format!("/usr/bin/{}", argv[0])).exists()
            && !Path::new(&format!("/usr/sbin/{}", argv[0])).exists()
        {
            skip(&format!("{} is not installed (tools/vm/setup.sh installs it)", argv[0]));
            return None;
        }
        let mut s =
            Server { child: None, argv: argv.iter().map(|a| a.to_string()).collect(), ready };
        s.spawn();
        Some(s)
    }

    fn spawn(&mut self) {
        if let Ready::Unix(p) = &self.ready {
            let _ = std::fs::remove_file(p);
        }
        let child = Command::new(&self.argv[0])
            .args(&self.argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start the NBD server");
        self.child = Some(child);
        let t = Instant::now();
        loop {
            let up = match &self.ready {
                Ready::Unix(p) => Path::new(p).exists(),
                Ready::Tcp(port) => TcpStream::connect(("127.0.0.1", *port)).is_ok(),
            };
            if up {
                return;
            }
            assert!(t.elapsed() < Duration::from_secs(20), "{:?} did not come up", self.argv);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: the server dies without a word to its clients.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn nbdkit_file_tcp(file: &str, port: u16) -> Option<Server> {
    let p = port.to_string();
    Server::start(
        &["nbdkit", "-f", "-i", "127.0.0.1", "-p", &p, "-e", "disk", "file", file],
        Ready::Tcp(port),
    )
}

fn nbdkit_file_unix(file: &str, sock: &str) -> Option<Server> {
    Server::start(
        &["nbdkit", "-f", "-U", sock, "-e", "disk", "file", file],
        Ready::Unix(sock.into()),
    )
}

fn image(name: &str, mb: u64) -> String {
    let p = format!("/tmp/ublk-fast-nbd-{name}.img");
    sh(&format!("truncate -s 0 {p} && truncate -s {mb}M {p}"));
    p
}

/// fio random read/write with crc32c verify at 4k, 64k and 1m; returns the I/Os done.
fn fio_verify(dev: &str, size: &str) -> u64 {
    let mut ios = 0;
    for bs in ["4k", "64k", "1m"] {
        let r = fio(&[
            "--name=nbd-verify",
            &format!("--filename={dev}"),
            "--ioengine=io_uring",
            "--direct=1",
            "--rw=randrw",
            &format!("--bs={bs}"),
            "--iodepth=32",
            &format!("--size={size}"),
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
        ]);
        let (n, errs) = fio_totals(&r);
        assert_eq!(errs, 0, "fio {bs} on {dev} reported errors");
        ios += n;
    }
    ios
}

fn sha256(path: &str, bytes: u64) -> String {
    let mb = bytes >> 20;
    sh(&format!("dd if={path} bs=1M count={mb} iflag=direct status=none | sha256sum"))
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// ext4 on the device: mkfs, a file written and checked, fsck clean.
fn ext4_roundtrip(dev: &str) {
    let mnt = format!("/tmp/mnt-{}", dev.replace('/', "_"));
    sh(&format!("mkfs.ext4 -q -F {dev} && mkdir -p {mnt} && mount {dev} {mnt}"));
    sh(&format!(
        "head -c 24M /dev/urandom > /tmp/nbd-payload && cp /tmp/nbd-payload {mnt}/f && sync"
    ));
    let a = sh(&format!("sha256sum < {mnt}/f"));
    sh(&format!("umount {mnt} && mount {dev} {mnt}"));
    let b = sh(&format!("sha256sum < {mnt}/f"));
    assert_eq!(a, b, "the file changed across a remount");
    assert_eq!(a, sh("sha256sum < /tmp/nbd-payload"));
    sh(&format!("umount {mnt} && fsck.ext4 -n -f {dev}"));
}

#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn nbdkit_over_tcp_and_unix_every_byte_right() {
    require_driver();
    for transport in ["tcp", "unix"] {
        let file = image(&format!("kit-{transport}"), 128);
        sh(&format!("dd if=/dev/urandom of={file} bs=1M count=128 conv=notrunc status=none"));
        let sock = "/tmp/ublk-fast-nbdkit.sock";
        let (server, uri) = match transport {
            "tcp" => (nbdkit_file_tcp(&file, 10900), "nbd://127.0.0.1:10900/disk".to_string()),
            _ => (nbdkit_file_unix(&file, sock), format!("nbd+unix:///disk?socket={sock}")),
        };
        let Some(server) = server else { return };
        let dev = Dev::add(&["nbd", &uri]);
        let info = dev.info();
        println!("{transport}: {uri}: {} queue(s)", info["queues"]);
        assert_eq!(sh(&format!("blockdev --getsize64 {}", dev.path)).trim(), "134217728");
        // What the server's file held is what the device reads.
        assert_eq!(
            sha256(&dev.path, 128 << 20),
            sha256(&file, 128 << 20),
            "{transport}: first read"
        );
        let ios = fio_verify(&dev.path, "32M");
        // Replies time the server's round trip (one whose send CQE is reaped after it, in
        // the same turn, goes untimed: hence not all).
        let (n, ns) = (dev.stat("backend_rtt_count"), dev.stat("backend_rtt_ns"));
        assert!(n > ios / 2, "{transport}: {n} round trips timed for {ios} I/Os");
        assert!(ns > 0 && ns / n < 10_000_000_000, "{transport}: {ns} ns over {n} round trips");
        println!("{transport}: {n} server round trips timed, mean {} µs", ns / n / 1000);
        let seen = sha256(&dev.path, 128 << 20);
        dev.del();
        drop(server);
        assert_eq!(seen, sha256(&file, 128 << 20), "{transport}: the server's file after del");
        println!("{transport}: fio verify {ios} I/Os; device == backing file (128 MiB)");
        let server = match transport {
            "tcp" => nbdkit_file_tcp(&file, 10900),
            _ => nbdkit_file_unix(&file, sock),
        };
        let dev = Dev::add(&["nbd", &uri]);
        ext4_roundtrip(&dev.path);
        dev.del();
        drop(server);
        let _ = std::fs::remove_file(&file);
        println!("{transport}: ext4 mkfs + file + fsck clean");
    }
}

/// Zero copy (`--zero-copy on`): write data leaves from the request's own pages (WRITE_FIXED on
/// the socket) and read data lands in them (READ_FIXED), over TCP and a Unix socket, and
/// across a server restart, where the held requests are sent again from their fixed buffers.
#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn zero_copy_moves_data_from_and_into_the_requests_pages() {
    require_driver();
    if !offers("AUTO_BUF_REG") {
        skip("this ublk driver does not offer AUTO_BUF_REG: nbd zero copy untried");
        return;
    }
    let file = image("zc", 64);
    sh(&format!("dd if=/dev/urandom of={file} bs=1M count=64 conv=notrunc status=none"));
    let sock = "/tmp/ublk-fast-nbdkit-zc.sock";
    for transport in ["tcp", "unix"] {
        let (server, uri) = match transport {
            "tcp" => (nbdkit_file_tcp(&file, 10904), "nbd://127.0.0.1:10904/disk".to_string()),
            _ => (nbdkit_file_unix(&file, sock), format!("nbd+unix:///disk?socket={sock}")),
        };
        let Some(server) = server else { return };
        let dev = Dev::add(&["nbd", &uri, "--zero-copy", "on"]);
        assert!(uses_zero_copy(&dev), "{transport}: not in zero copy: {}", dev.info());
        assert_eq!(sha256(&dev.path, 64 << 20), sha256(&file, 64 << 20), "{transport}: first read");
        let ios = fio_verify(&dev.path, "16M");
        let seen = sha256(&dev.path, 64 << 20);
        dev.del();
        drop(server);
        assert_eq!(seen, sha256(&file, 64 << 20), "{transport}: the server's file after del");
        println!("zero copy, {transport}: fio verify {ios} I/Os; device == backing file (64 MiB)");
    }
    // A restart mid-fio: what was in flight is sent again from the requests' pages.
    let Some(mut server) = nbdkit_file_tcp(&file, 10904) else { return };
    let dev = Dev::add(&["nbd", "nbd://127.0.0.1:10904/disk", "--zero-copy", "on"]);
    let fio = spawn_fio(&[
        "--name=zc-restart",
        &format!("--filename={}", dev.path),
        "--ioengine=io_uring",
        "--direct=1",
        "--rw=randwrite",
        "--bsrange=4k-16k",
        "--iodepth=16",
        "--size=48M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
    ]);
    // Kill it once fio is well into its writes (its start-up alone takes seconds here).
    let t = Instant::now();
    while dev.stat("writes") < 500 {
        assert!(t.elapsed() < Duration::from_secs(60), "fio did not get going in 60 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    server.kill();
    std::thread::sleep(Duration::from_secs(1));
    server.spawn();
    let out = fio.wait_with_output().expect("fio");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "fio failed: {text}\n{}", String::from_utf8_lossy(&out.stderr));
    let (ios, errs) = fio_totals(&fio_report(&text).expect("fio JSON"));
    assert_eq!(errs, 0, "fio saw errors across the restart");
    let stats = &dev.info()["stats"];
    let reconnects = stats["backend_reconnects"].as_u64().unwrap_or(0);
    let resent = stats["backend_resent"].as_u64().unwrap_or(0);
    assert!(reconnects >= 1, "the restart went unnoticed ({ios} I/Os)");
    // Writes were in flight when the server died (fio still ran): they went out again.
    assert!(resent >= 1, "nothing was sent again: fio ended before the kill? ({ios} I/Os)");
    let seen = sha256(&dev.path, 64 << 20);
    dev.del();
    drop(server);
    assert_eq!(seen, sha256(&file, 64 << 20), "device and server file differ after the restart");
    println!(
        "zero copy, restart: fio {ios} I/Os, 0 errors, verify passed; {reconnects} reconnect(s), {resent} resent"
    );
    let _ = std::fs::remove_file(&file);
}

#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn qemu_nbd_serves_a_qcow2_volume() {
    require_driver();
    let img = "/tmp/ublk-fast-nbd-vol.qcow2";
    sh(&format!("rm -f {img} && qemu-img create -q -f qcow2 {img} 96M"));
    let sock = "/tmp/ublk-fast-qemu-nbd.sock";
    // --persistent and --shared: the CLI's check and the service each connect.
    let Some(server) = Server::start(
        &["qemu-nbd", "-k", sock, "-x", "vol", "-f", "qcow2", "--persistent", "--shared=8", img],
        Ready::Unix(sock.into()),
    ) else {
        return;
    };
    let dev = Dev::add(&["nbd", &format!("nbd+unix:///vol?socket={sock}")]);
    let ios = fio_verify(&dev.path, "32M");
    let seen = sha256(&dev.path, 96 << 20);
    dev.del();
    drop(server);
    let raw = "/tmp/ublk-fast-nbd-vol.raw";
    sh(&format!("qemu-img convert -f qcow2 -O raw {img} {raw}"));
    assert_eq!(seen, sha256(raw, 96 << 20), "qcow2 content after del");
    println!("qemu-nbd qcow2: fio verify {ios} I/Os; device == qemu-img convert of the image");
    let _ = std::fs::remove_file(raw);
    let _ = std::fs::remove_file(img);
}

/// The device's queue limits as sysfs reports them.
fn queue_attr(dev: &str, attr: &str) -> String {
    let name = dev.trim_start_matches("/dev/");
    sh(&format!("cat /sys/block/{name}/queue/{attr}")).trim().to_string()
}

#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn flush_fua_trim_and_zeroes_reach_the_server_and_missing_ones_are_not_offered() {
    require_driver();
    let log = "/tmp/ublk-fast-nbdkit.log";
    let _ = std::fs::remove_file(log);
    let sock = "/tmp/ublk-fast-nbdkit-log.sock";
    let logarg = format!("logfile={log}");
    let Some(server) = Server::start(
        &["nbdkit", "-f", "-U", sock, "--filter=log", "memory", "64M", &logarg],
        Ready::Unix(sock.into()),
    ) else {
        return;
    };
    let uri = format!("nbd+unix:///?socket={sock}");
    let dev = Dev::add(&["nbd", &uri]);
    assert_eq!(queue_attr(&dev.path, "write_cache"), "write back");
    assert_eq!(queue_attr(&dev.path, "fua"), "1");
    assert_ne!(queue_attr(&dev.path, "discard_max_bytes"), "0");
    assert_ne!(queue_attr(&dev.path, "write_zeroes_max_bytes"), "0");
    let p = &dev.path;
    sh(&format!("dd if=/dev/urandom of={p} bs=64k count=4 oflag=direct,sync status=none"));
    sh(&format!("blkdiscard -o 0 -l 1M {p}"));
    sh(&format!("blkdiscard -z -o 1M -l 1M {p}"));
    sh(&format!(
        "fio --name=fua --filename={p} --ioengine=io_uring --direct=1 --rw=write --bs=4k \
         --size=64k --fsync=1 --output=/dev/null"
    ));
    sh(&format!("dd if={p} of=/dev/null bs=64k count=4 iflag=direct status=none"));
    dev.del();
    drop(server);
    let text = std::fs::read_to_string(log).unwrap();
    for what in ["Read", "Write", "Flush", "Trim", "Zero", "fua=1"] {
        let n = text.lines().filter(|l| l.contains(what)).count();
        println!("nbdkit log: {what}: {n} lines");
        assert!(n > 0, "nbdkit's log shows no {what}:\n{}", &text[..text.len().min(3000)]);
    }
    // A server without write zeroes, FUA or trim: the device does not offer them.
    let Some(server) = Server::start(
        &[
            "nbdkit",
            "-f",
            "-U",
            sock,
            "--filter=nozero",
            "--filter=fua",
            "memory",
            "64M",
            // The fua filter's default mode: FUA is not advertised.
            "zeromode=none",
        ],
        Ready::Unix(sock.into()),
    ) else {
        return;
    };
    let dev = Dev::add(&["nbd", &uri]);
    println!(
        "nozero (zeromode=none) + fua (default: none): write_zeroes_max_bytes {}, fua {}, write_cache {}",
        queue_attr(&dev.path, "write_zeroes_max_bytes"),
        queue_attr(&dev.path, "fua"),
        queue_attr(&dev.path, "write_cache")
    );
    assert_eq!(queue_attr(&dev.path, "write_zeroes_max_bytes"), "0");
    assert_eq!(queue_attr(&dev.path, "fua"), "0");
    dev.del();
    drop(server);
    // Read-only: the device is read-only and refuses writes.
    let Some(server) = Server::start(
        &["nbdkit", "-f", "-r", "-U", sock, "memory", "64M"],
        Ready::Unix(sock.into()),
    ) else {
        return;
    };
    let dev = Dev::add(&["nbd", &uri]);
    assert_eq!(sh(&format!("blockdev --getro {}", dev.path)).trim(), "1");
    let o =
        sh_any(&format!("dd if=/dev/zero of={} bs=4k count=1 oflag=direct status=none", dev.path));
    assert!(!o.status.success(), "a write to a read-only export succeeded");
    dev.del();
    drop(server);
}

#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn server_killed_and_restarted_twice_mid_fio_loses_nothing() {
    require_driver();
    let file = image("restart", 256);
    let port = 10901;
    let Some(mut server) = nbdkit_file_tcp(&file, port) else { return };
    let dev = Dev::add(&["nbd", &format!("nbd://127.0.0.1:{port}/disk"), "--reconnect-timeout=60"]);
    let p = dev.path.clone();
    // Writes with verify, long enough to span both restarts.
    let fio = spawn_fio(&[
        "--name=restart",
        &format!("--filename={p}"),
        "--ioengine=io_uring",
        "--direct=1",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--size=48M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
    ]);
    for round in 1..=2 {
        std::thread::sleep(Duration::from_secs(3));
        server.kill();
        println!("round {round}: server killed");
        std::thread::sleep(Duration::from_secs(2));
        server.spawn();
        println!("round {round}: server back");
    }
    let out = fio.wait_with_output().expect("fio");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "fio failed: {text}\n{}", String::from_utf8_lossy(&out.stderr));
    let r = fio_report(&text).expect("fio JSON");
    let (ios, errs) = fio_totals(&r);
    assert_eq!(errs, 0, "fio saw errors across the restarts");
    let info = dev.info();
    let reconnects = info["stats"]["backend_reconnects"].as_u64().unwrap_or(0);
    let resent = info["stats"]["backend_resent"].as_u64().unwrap_or(0);
    println!("fio {ios} I/Os, 0 errors, verify passed; reconnects {reconnects}, resent {resent}");
    assert!(reconnects >= 2, "expected 2 reconnects, saw {reconnects}");
    let seen = sha256(&p, 256 << 20);
    dev.del();
    drop(server);
    assert_eq!(seen, sha256(&file, 256 << 20), "device and server file differ after the restarts");
    let _ = std::fs::remove_file(&file);
}

#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn server_gone_past_the_reconnect_timeout_fails_io_and_del_works() {
    require_driver();
    let sock = "/tmp/ublk-fast-nbdkit-gone.sock";
    let Some(mut server) =
        Server::start(&["nbdkit", "-f", "-U", sock, "memory", "64M"], Ready::Unix(sock.into()))
    else {
        return;
    };
    let dev = Dev::add(&["nbd", &format!("nbd+unix:///?socket={sock}"), "--reconnect-timeout=3"]);
    sh(&format!("dd if=/dev/zero of={} bs=64k count=16 oflag=direct status=none", dev.path));
    server.kill();
    let t = Instant::now();
    let o = sh_any(&format!("dd if={} of=/dev/null bs=4k count=1 iflag=direct", dev.path));
    let took = t.elapsed();
    println!("read with no server: {:?} after {took:.1?}: {}", o.status, stderr(&o).trim());
    assert!(!o.status.success(), "a read with no server succeeded");
    assert!(stderr(&o).contains("Input/output error"), "{}", stderr(&o));
    assert!(took < Duration::from_secs(30), "the read took {took:?}");
    // New I/O fails fast now.
    let t = Instant::now();
    let o = sh_any(&format!("dd if={} of=/dev/null bs=4k count=1 iflag=direct", dev.path));
    assert!(!o.status.success());
    println!("second read: failed after {:.1?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(3), "new I/O did not fail fast");
    // The server comes back: so does the device.
    server.spawn();
    let t = Instant::now();
    loop {
        let o = sh_any(&format!("dd if={} of=/dev/null bs=4k count=1 iflag=direct", dev.path));
        if o.status.success() {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "the device did not come back");
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("server back: reads work again after {:.1?}", t.elapsed());
    server.kill();
    let t = Instant::now();
    dev.del();
    println!("del with the server gone: {:.1?}", t.elapsed());
}

#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn server_errors_reach_the_issuer_and_the_device_keeps_serving() {
    require_driver();
    let sock = "/tmp/ublk-fast-nbdkit-err.sock";
    let trigger = "/tmp/ublk-fast-nbd-errors-on";
    let _ = std::fs::remove_file(trigger);
    let f = format!("error-file={trigger}");
    let Some(server) = Server::start(
        &[
            "nbdkit",
            "-f",
            "-U",
            sock,
            "--filter=error",
            "memory",
            "64M",
            "error=EIO",
            "error-rate=100%",
            &f,
        ],
        Ready::Unix(sock.into()),
    ) else {
        return;
    };
    let dev = Dev::add(&["nbd", &format!("nbd+unix:///?socket={sock}")]);
    let p = &dev.path;
    sh(&format!("dd if=/dev/urandom of={p} bs=64k count=16 oflag=direct status=none"));
    let before = sha256(p, 1 << 20);
    std::fs::write(trigger, b"").unwrap();
    let w = sh_any(&format!("dd if=/dev/zero of={p} bs=4k count=1 oflag=direct status=none"));
    let r = sh_any(&format!("dd if={p} of=/dev/null bs=4k count=1 iflag=direct status=none"));
    println!(
        "with errors on: write {:?}: {}; read {:?}: {}",
        w.status,
        stderr(&w).trim(),
        r.status,
        stderr(&r).trim()
    );
    assert!(!w.status.success() && stderr(&w).contains("Input/output error"));
    assert!(!r.status.success() && stderr(&r).contains("Input/output error"));
    std::fs::remove_file(trigger).unwrap();
    assert_eq!(sha256(p, 1 << 20), before, "the failed write changed data");
    assert_eq!(dev.stat("backend_reconnects"), 0, "a server error dropped the connection");
    dev.del();
    drop(server);
}

#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn nbd_bad_input_is_one_line_and_leaves_nothing() {
    require_driver();
    let b = bin();
    check_refused(&format!("{b} nbd http://example.com/x"), "nbd://");
    check_refused(&format!("{b} nbd nbds://127.0.0.1/x"), "TLS");
    check_refused(&format!("{b} nbd nbd+unix:///x"), "socket=");
    check_refused(&format!("{b} nbd nbd://127.0.0.1:1/x"), "refused");
    check_refused(&format!("{b} nbd 'nbd+unix:///x?socket=/tmp/no-such.sock'"), "no-such.sock");
    // A server that is not NBD.
    let py = "import socket,time\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
              s.bind(('127.0.0.1',10902)); s.listen(4)\nwhile True:\n  c,_=s.accept(); c.sendall(b'HTTP/1.0 200 OK\\r\\n\\r\\nhello world'); time.sleep(0.2); c.close()\n";
    std::fs::write("/tmp/not-nbd.py", py).unwrap();
    let mut fake = Command::new("python3").arg("/tmp/not-nbd.py").spawn().unwrap();
    let t = Instant::now();
    while TcpStream::connect(("127.0.0.1", 10902)).is_err() && t.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    check_refused(&format!("{b} nbd nbd://127.0.0.1:10902/x"), "NBD");
    let _ = fake.kill();
    let _ = fake.wait();
    // An export the server does not have.
    let sock = "/tmp/ublk-fast-nbdkit-bad.sock";
    let Some(server) = Server::start(
        &[
            "nbdkit",
            "-f",
            "-U",
            sock,
            "--filter=exportname",
            "memory",
            "16M",
            "exportname=right",
            "exportname-strict=true",
        ],
        Ready::Unix(sock.into()),
    ) else {
        return;
    };
    check_refused(&format!("{b} nbd 'nbd+unix:///wrong?socket={sock}'"), "wrong");
    check_refused(
        &format!("{b} nbd 'nbd+unix:///right?socket={sock}' --connections 0"),
        "connections",
    );
    drop(server);
}
