#!/bin/bash
# Guest side of `bench/run.sh spread`: one device queue served by one core vs by every core
# (UBLK_F_PER_IO_DAEMON: the queue's tags spread over the cores), in one boot, alternating,
# RUNS runs each: ublk-fast null and loop (on brd) with `-q 1`, `--spread-tags` against the
# default (one core per queue). 4k randread/randwrite at qd16 with one and two fio jobs.
#   spread.sh OUT.md [RUNTIME_S] [RUNS]
set -euo pipefail
OUT=$1; RT=${2:-5}; RUNS=${3:-3}
B=${UBLK_FAST_BIN:-$(pwd)/target/release/ublk-fast}
W=$(mktemp -d /tmp/bench.XXXX)
modprobe ublk_drv
modprobe brd rd_nr=1 rd_size=1048576
dd if=/dev/zero of=/dev/ram0 bs=1M count=1024 status=none
JOBS="randread:4k:16:1 randread:4k:16:2 randwrite:4k:16:2 randread:4k:1:2"
PEERS="null-1core null-spread loop-1core loop-spread"
. "$(dirname "$0")/fio-cells.sh"
for run in $(seq 1 "$RUNS"); do
  order=$PEERS
  [ $((run % 2)) = 0 ] && order=$(echo $PEERS | tr ' ' '\n' | tac | tr '\n' ' ')
  for peer in $order; do
    case $peer in
      null-1core) DEV=$($B null --size 4G -q 1) ;;
      null-spread) DEV=$($B null --size 4G -q 1 --spread-tags) ;;
      loop-1core) DEV=$($B loop /dev/ram0 -q 1) ;;
      loop-spread) DEV=$($B loop /dev/ram0 -q 1 --spread-tags) ;;
    esac
    for j in $JOBS; do run_fio "$DEV" "$j" "$run" "$peer"; echo "run $run $peer $j done"; done
    $B del -n "${DEV#/dev/ublkb}"
  done
done
python3 - "$W" "$OUT" "$RUNS" "$RT" "$JOBS" "$PEERS" <<'PY'
import json, sys, statistics, subprocess, os
w, out, runs, rt, jobs, peers = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5].split(), sys.argv[6].split()
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
    f.write("# One queue on every core (PER_IO_DAEMON) vs one queue on one core\n\n")
    f.write(f"Guest kernel {kv}, {os.cpu_count()} vCPUs, **qemu TCG software emulation**: absolute numbers mean "
            f"little, only the ratios inside this one boot do. Every device has one queue (`-q 1`): `-1core` "
            f"by default, `-spread` with `--spread-tags` (its tags split between the {os.cpu_count()} "
            f"core threads). loop on a `brd` ramdisk. fio io_uring, direct=1, {rt} s per run (+1 s ramp), "
            f"{runs} runs per cell alternating the order; medians. Job: rw:bs:qd:jobs. CPU/IO: whole-guest "
            f"busy CPU time per I/O (µs), fio included; enters/IO: io_uring_enter calls per I/O.\n\n")
    f.write("| job | peer | IOPS | spread / 1 core | p50 µs | p99 µs | CPU/IO µs | enters/IO |\n")
    f.write("|---|---|---:|---:|---:|---:|---:|---:|\n")
    for job in jobs:
        for peer in peers:
            m = med[peer, job]
            one = peer.replace("-spread", "-1core")
            ratio = f"{m[0]/med[one, job][0]:.2f}" if peer.endswith("-spread") else ""
            f.write(f"| {job} | {peer} | {m[0]:.0f} | {ratio} | {m[1]:.0f} | {m[2]:.0f} | {m[3]:.1f} | {m[4]:.2f} |\n")
print(open(out).read())
PY
rm -rf "$W"
