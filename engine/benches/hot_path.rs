//! Host micro-benchmarks of the per-I/O work the queue loop does outside the kernel: tag state
//! transitions, user_data encoding, building the COMMIT_AND_FETCH SQE, and the counter and
//! histogram updates. No ublk driver needed: `cargo bench -p ublk-fast-engine`.
//! Prints ns per operation (best of 5 rounds); compare runs on one machine only.

use std::hint::black_box;
use std::time::Instant;

use io_uring::{opcode, types};
use ublk_fast_engine::stats::{QueueStats, StatsRegion};
use ublk_fast_engine::tag::{Kind, Tag, UserData};
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
    const N: u64 = 5_000_000;
    bench("user_data encode+decode", N, |i| {
        let u = UserData { tag: i as u16, kind: Kind::Target, sub: 1, gen: (i >> 3) as u16 };
        black_box(UserData::decode(black_box(u.encode())));
    });
    let mut tags = vec![Tag::new(); 128];
    for t in &mut tags {
        t.fetch();
    }
    bench("tag deliver+issue+reap+commit", N, |i| {
        let t = &mut tags[(i & 127) as usize];
        let g = t.deliver();
        t.issue();
        black_box(t.reap(g));
        t.commit();
    });
    bench("COMMIT_AND_FETCH SQE build (zero copy)", N, |i| {
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
    bench("READ_FIXED SQE build", N, |i| {
        let sqe = opcode::ReadFixed::new(types::Fixed(1), std::ptr::null_mut(), 4096, i as u16)
            .offset(i << 12)
            .build()
            .user_data(i);
        black_box(sqe);
    });
    let stats = StatsRegion::create(None, 1).unwrap();
    let q = stats.queue(0);
    bench("counters: 2 bumps (single writer)", N, |i| {
        QueueStats::bump(&q.writes, 1);
        QueueStats::bump(&q.written_bytes, black_box(i & 0xfff));
    });
    bench("latency histogram record", N, |i| {
        q.lat[1].record(black_box((i * 7919) % 2_000_000), false);
    });
}
