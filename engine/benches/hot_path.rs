//! Host micro-benchmarks of the per-I/O work the queue loop does outside the kernel: tag state
//! transitions, user_data encoding, building the COMMIT_AND_FETCH SQE, and the counter and
//! histogram updates. No ublk driver needed: `cargo bench -p ublk-fast-engine`.
//! Prints ns per operation (best of 5 rounds); compare runs on one machine only.
//! `-- --quick` runs a tenth of the iterations (what `tools/test.sh` does, so every CI log shows
//! the numbers).

use std::hint::black_box;
use std::time::Instant;

use io_uring::{opcode, types};
use ublk_fast_engine::batch::Batch;
use ublk_fast_engine::buf::IoBufs;
use ublk_fast_engine::mode::Data;
use ublk_fast_engine::op::{Op, UserData};
use ublk_fast_engine::queue::Placement;
use ublk_fast_engine::ring::{self, Enter};
use ublk_fast_engine::stats::{QueueStats, StatsRegion};
use ublk_fast_engine::tag::Tag;
use ublk_fast_engine::uapi::*;

fn bench(name: &str, iters: u64, mut f: impl FnMut(u64)) {
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        for i in 0..iters {
            f(i);
        }
        best = best.min(t.elapsed().as_nanos() as f64 / iters as f64);
    }
    println!("{name:<44} {best:>8.2} ns/op");
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let n: u64 = if quick { 500_000 } else { 5_000_000 };
    let ring_iters = n / 50;
    bench("user_data encode+decode", n, |i| {
        let u = UserData::new(1, i as u16, Op::Target(1), (i >> 3) as u16);
        black_box(UserData::decode(black_box(u.encode())));
    });
    let mut tags = vec![Tag::new(); 128];
    for t in &mut tags {
        t.fetch();
    }
    bench("tag deliver+issue+reap+commit", n, |i| {
        let t = &mut tags[(i & 127) as usize];
        let g = t.deliver();
        t.issue();
        black_box(t.reap(g));
        t.commit();
    });
    bench("COMMIT_AND_FETCH SQE build (zero copy)", n, |i| {
        let cmd = ublksrv_io_cmd { q_id: 0, tag: i as u16, result: 4096, addr: 0 };
        let reg = ublk_auto_buf_reg {
            index: i as u16,
            flags: UBLK_AUTO_BUF_REG_FALLBACK,
            ..Default::default()
        };
        let sqe = opcode::UringCmd16::new(types::Fixed(0), UBLK_U_IO_COMMIT_AND_FETCH_REQ)
            .cmd(cmd.to_bytes())
            .addr(Some(reg.to_sqe_addr()))
            .build()
            .user_data(i);
        black_box(sqe);
    });
    // BATCH_IO: a loop turn stages its results and builds one COMMIT for all of them.
    let batch_ring = ring::Ring::new(8, 16, None).unwrap();
    let at = Placement { slot: 0, file_base: 0, buf_base: 0, bgid: 0 };
    match Batch::new(&batch_ring.uring, 0, 128, Data::ZeroCopy, Vec::new(), at) {
        Ok(mut b) => {
            bench("BATCH_IO: stage 32 results + COMMIT SQE build", n / 32, |i| {
                for k in 0..32 {
                    b.stage(((i * 32 + k) & 127) as u16, 4096);
                }
                let (slot, sqe) = b.commit().unwrap();
                black_box(sqe);
                b.committed(slot, 32 * 8);
            });
            println!("(BATCH_IO line: 32 requests; divide by 32 for per I/O)");
        }
        Err(e) => println!("BATCH_IO: skipped ({e})"),
    }
    bench("READ_FIXED SQE build", n, |i| {
        let sqe = opcode::ReadFixed::new(types::Fixed(1), std::ptr::null_mut(), 4096, i as u16)
            .offset(i << 12)
            .build()
            .user_data(i);
        black_box(sqe);
    });
    let stats = StatsRegion::create(None, 1).unwrap();
    let q = stats.queue(0);
    bench("counters: 2 bumps (single writer)", n, |i| {
        QueueStats::bump(&q.writes, 1);
        QueueStats::bump(&q.written_bytes, black_box(i & 0xfff));
    });
    bench("latency histogram record", n, |i| {
        q.lat[1].record(black_box((i * 7919) % 2_000_000), false);
    });
    // The arena a queue allocates once at start (64 x 512 KiB, copy mode: locked).
    bench("buffer arena: allocate+lock+free 32 MiB", 20, |_| {
        black_box(IoBufs::new(64, 512 * 1024, true).unwrap());
    });
    // One loop iteration's syscall: submit a batch of 32 NOPs and wait for them, entering the
    // ring through its registered fd (what the queues do) and through the plain fd.
    let mut uring = ring::build(64, 128, None).unwrap();
    let enter = Enter::new(&uring);
    let round = |uring: &mut io_uring::IoUring, registered: bool| {
        for k in 0..32 {
            let sqe = opcode::Nop::new().build().user_data(k);
            // SAFETY: a NOP points at no memory.
            unsafe { uring.submission().push(&sqe).unwrap() };
        }
        if registered {
            enter.submit_and_wait(uring, 32).unwrap();
        } else {
            uring.submit_and_wait(32).unwrap();
        }
        uring.completion().for_each(drop);
    };
    bench("batch of 32 NOPs, registered ring fd", ring_iters, |_| round(&mut uring, true));
    bench("batch of 32 NOPs, plain ring fd", ring_iters, |_| round(&mut uring, false));
    println!("(NOP lines: one submit+wait of 32; divide by 32 for per I/O)");
}
