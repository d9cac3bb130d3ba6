#!/bin/bash
# Guest side of `bench/run.sh latency`: the latency mode (--poll-us) at low queue depth, in one
# boot, alternating, RUNS runs each: ublk-fast null and loop (on brd) with and without
# --poll-us, against null_blk and the kernel loop driver on brd. 4k randread/randwrite at qd1
# and qd4, one and two fio jobs.
#   latency.sh OUT.md [RUNTIME_S] [RUNS] [POLL_US]
set -euo pipefail
OUT=$1; RT=${2:-5}; RUNS=${3:-3}; POLL=${4:-50}
B=${UBLK_FAST_BIN:-$(pwd)/target/release/ublk-fast}
W=$(mktemp -d /tmp/bench.XXXX)
modprobe ublk_drv; modprobe loop
modprobe null_blk nr_devices=1 queue_mode=2 irqmode=0 gb=4 submit_queues=2
modprobe brd rd_nr=2 rd_size=1048576
dd if=/dev/zero of=/dev/ram0 bs=1M count=1024 status=none
dd if=/dev/zero of=/dev/ram1 bs=1M count=1024 status=none
JOBS="randread:4k:1:1 randwrite:4k:1:1 randread:4k:4:1 randread:4k:1:2 randwrite:4k:4:2"
PEERS="uf-null uf-null-poll null_blk uf-loop uf-loop-poll kernel-loop"

. "$(dirname "$0")/fio-cells.sh"
for run in $(seq 1 "$RUNS"); do
  order=$PEERS
  [ $((run % 2)) = 0 ] && order=$(echo $PEERS | tr ' ' '\n' | tac | tr '\n' ' ')
  for peer in $order; do
    case $peer in
      uf-null) DEV=$($B null --size 4G -q 2) ;;
      uf-null-poll) DEV=$($B null --size 4G -q 2 --poll-us "$POLL") ;;
      null_blk) DEV=/dev/nullb0 ;;
      uf-loop) DEV=$($B loop /dev/ram0 -q 2) ;;
      uf-loop-poll) DEV=$($B loop /dev/ram0 -q 2 --poll-us "$POLL") ;;
      kernel-loop) DEV=$(losetup --direct-io=on -f --show /dev/ram1) ;;
    esac
    for j in $JOBS; do run_fio "$DEV" "$j" "$run" "$peer"; echo "run $run $peer $j done"; done
    case $peer in
      null_blk) ;;
      kernel-loop) losetup -d "$DEV" ;;
      *) $B del -n "${DEV#/dev/ublkb}" ;;
    esac
  done
done
python3 - "$W" "$OUT" "$RUNS" "$RT" "$JOBS" "$PEERS" "$POLL" <<'PY'
import json, sys, statistics, subprocess, os
w, out, runs, rt, jobs, peers, poll = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5].split(), sys.argv[6].split(), sys.argv[7]
hz = os.sysconf("SC_CLK_TCK")
def load(peer, job, run):
    base = f"{w}/{peer}.{job}.{run}"
    j = json.load(open(base + ".json"))["jobs"][0]
    d = j["read"] if "read" in job.split(":")[0] else j["write"]
    p = d["clat_ns"].get("percentile", {})
    a0, _, b0, _, e0, e1 = map(int, open(base + ".cpu").read().split())
    ios = d["total_ios"] or 1
    return d["iops"], p.get("50.000000", 0) / 1000, p.get("99.000000", 0) / 1000, (b0 - a0) / hz * 1e6 / ios, (e1 - e0) / ios
kv = subprocess.run(["uname", "-r"], capture_output=True, text=True).stdout.strip()
med = {}
for job in jobs:
    for peer in peers:
        vals = [load(peer, job, i) for i in range(1, runs + 1)]
        med[peer, job] = [statistics.median(v[k] for v in vals) for k in range(5)]
with open(out, "w") as f:
    f.write("# Latency mode (--poll-us) at low queue depth\n\n")
    f.write(f"Guest kernel {kv}, {os.cpu_count()} vCPUs, **qemu TCG software emulation**: absolute numbers mean "
            f"little, only the ratios inside this one boot do. `-poll` rows: `--poll-us {poll}`. ublk-fast devices "
            f"have 2 queues (one per vCPU); null_blk (queue_mode=2, irqmode=0, 2 submit queues); loop peers on "
            f"`brd` ramdisks (one each), kernel loop with direct I/O. fio io_uring, direct=1, {rt} s per run "
            f"(+1 s ramp), {runs} runs per cell alternating the order; medians. Job: rw:bs:qd:jobs. CPU/IO: "
            f"whole-guest busy CPU time per I/O (µs), fio included; enters/IO: ublk-fast's io_uring_enter "
            f"calls per I/O (polls included).\n\n")
    f.write("| job | peer | IOPS | vs no poll | vs kernel | p50 µs | p99 µs | CPU/IO µs | enters/IO |\n")
    f.write("|---|---|---:|---:|---:|---:|---:|---:|---:|\n")
    for job in jobs:
        for peer in peers:
            m = med[peer, job]
            base = peer.replace("-poll", "")
            kern = "null_blk" if "null" in peer else "kernel-loop"
            vs_np = f"{m[0]/med[base, job][0]:.2f}" if peer.endswith("-poll") else ""
            vs_k = f"{m[0]/med[kern, job][0]:.2f}" if peer.startswith("uf-") else ""
            enters = f"{m[4]:.2f}" if peer.startswith("uf-") else ""
            f.write(f"| {job} | {peer} | {m[0]:.0f} | {vs_np} | {vs_k} | {m[1]:.0f} | {m[2]:.0f} | {m[3]:.1f} | {enters} |\n")
print(open(out).read())
PY
rm -rf "$W"
