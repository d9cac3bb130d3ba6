//! The stripe target: RAID-0 over files. Data written through the device reads back (fio
//! crc32c verify, zero copy and copy), and lands where the layout says: chunk i of the device
//! is chunk i / N of member i % N, checked byte for byte in the members after `del`; discard and
//! write zeroes split the same way.

mod common;

use common::*;

fn member(name: &str, mb: u64) -> String {
    let p = format!("/tmp/ublk-fast-it-stripe-{name}.img");
    sh(&format!("rm -f {p} && truncate -s {mb}M {p}"));
    p
}

#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn stripe_verifies_and_follows_its_layout() {
    require_driver();
    for (mode, chunk) in [("--zero-copy=auto", "64K"), ("--zero-copy=off", "16K")] {
        let ms: Vec<String> = (0..3).map(|i| member(&format!("m{i}"), 32)).collect();
        let dev = Dev::add(&["stripe", &ms[0], &ms[1], &ms[2], "--chunk", chunk, mode]);
        let size: u64 = sh(&format!("blockdev --getsize64 {}", dev.path)).trim().parse().unwrap();
        assert_eq!(size, 96 << 20, "3 x 32 MiB members");
        let r = fio(&[
            "--name=stripe",
            &format!("--filename={}", dev.path),
            "--ioengine=io_uring",
            "--direct=1",
            "--rw=randwrite",
            "--bssplit=4k/30:16k/20:64k/20:256k/20:1m/10",
            "--iodepth=32",
            "--size=96M",
            "--io_size=48M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
        ]);
        let (ios, errs) = fio_totals(&r);
        assert_eq!(errs, 0);
        // A known image through the device, then the layout in the members.
        sh(&format!(
            "head -c 96M /dev/urandom > /tmp/stripe-img && dd if=/tmp/stripe-img of={} bs=1M oflag=direct status=none",
            dev.path
        ));
        let back = sh(&format!("dd if={} bs=1M iflag=direct status=none | sha256sum", dev.path));
        assert_eq!(back, sh("sha256sum < /tmp/stripe-img"), "{mode}: read back differs");
        // Discard and write zeroes, split over the members like data: both read back zeros
        // (from the device, and in the members where the layout puts them).
        sh(&format!(
            "blkdiscard -o 1M -l 2M {} && blkdiscard -z -o 8M -l 1M {}",
            dev.path, dev.path
        ));
        sh("python3 -c \"f=open('/tmp/stripe-img','r+b'); [ (f.seek(o), f.write(bytes(l))) for o,l in ((1<<20,2<<20),(8<<20,1<<20)) ]\"");
        let back = sh(&format!("dd if={} bs=1M iflag=direct status=none | sha256sum", dev.path));
        assert_eq!(back, sh("sha256sum < /tmp/stripe-img"), "{mode}: discarded ranges");
        dev.del();
        let check = format!(
            "import sys\nc={}\nimg=open('/tmp/stripe-img','rb').read()\nm=[open(p,'rb').read() for p in sys.argv[1:]]\n\
             n=len(m)\nfor i in range(len(img)//c):\n  a=img[i*c:(i+1)*c]; b=m[i%n][(i//n)*c:(i//n+1)*c]\n  \
             assert a==b, f'chunk {{i}} is not at member {{i%n}} offset {{(i//n)*c}}'\nprint(len(img)//c, 'chunks in place')",
            if chunk == "64K" { 65536 } else { 16384 }
        );
        std::fs::write("/tmp/stripe-check.py", check).unwrap();
        let out = sh(&format!("python3 /tmp/stripe-check.py {}", ms.join(" ")));
        println!("stripe {mode} chunk {chunk}: fio verify {ios} I/Os; {}", out.trim());
        for m in &ms {
            let _ = std::fs::remove_file(m);
        }
    }
    let _ = std::fs::remove_file("/tmp/stripe-img");
}

#[test]
#[ignore = "needs the ublk driver: run through tools/test.sh"]
fn stripe_bad_input_is_one_line_and_leaves_nothing() {
    require_driver();
    let b = bin();
    let a = member("bad-a", 8);
    let c = member("bad-c", 8);
    check_refused(&format!("{b} stripe {a}"), "2 to 8");
    check_refused(&format!("{b} stripe {a} {c} --chunk 3000"), "power of two");
    check_refused(&format!("{b} stripe {a} /tmp/no-such-member"), "no-such-member");
    let _ = std::fs::remove_file(a);
    let _ = std::fs::remove_file(c);
}
