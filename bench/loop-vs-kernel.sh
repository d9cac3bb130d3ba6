#!/bin/bash
# Guest side of bench/run.sh: ublk-fast loop vs the kernel's loop driver (direct I/O) over the
# same backing file, in one boot, alternating, RUNS runs each, fio io_uring direct.
#   loop-vs-kernel.sh OUT.md [RUNTIME_S] [RUNS]
set -euo pipefail
OUT=$1; RT=${2:-5}; RUNS=${3:-3}
B=$(pwd)/target/release/ublk-fast
W=$(mktemp -d /tmp/bench.XXXX)
modprobe ublk_drv; modprobe loop
IMG=/tmp/bench-backing.img
dd if=/dev/urandom of=$IMG bs=1M count=1024 status=none
JOBS="randread:4k:1 randread:4k:32 randread:4k:128 randwrite:4k:1 randwrite:4k:32 randwrite:4k:128 read:128k:32 write:128k:32"
run_fio() { # dev job run peer
  local rw=${2%%:*} rest=${2#*:}; local bs=${rest%%:*} qd=${rest#*:}
  fio --name=b --filename="$1" --ioengine=io_uring --direct=1 --rw="$rw" --bs="$bs" --iodepth="$qd" \
      --runtime="$RT" --time_based --ramp_time=1 --size=1G --numjobs=1 --eta=never \
      --output-format=json --output="$W/$4.$2.$3.json" >/dev/null
}
for run in $(seq 1 "$RUNS"); do
  order="ublk-fast ublk-fast-copy kernel-loop"
  [ $((run % 2)) = 0 ] && order="kernel-loop ublk-fast-copy ublk-fast"
  for peer in $order; do
    case $peer in
      ublk-fast) DEV=$($B loop $IMG) ;;                      # zero copy where offered
      ublk-fast-copy) DEV=$($B loop $IMG --zero-copy off) ;;
      kernel-loop) DEV=$(losetup --direct-io=on -f --show $IMG) ;;
    esac
    for j in $JOBS; do run_fio "$DEV" "$j" "$run" "$peer"; echo "run $run $peer $j done"; done
    if [ "$peer" = kernel-loop ]; then losetup -d "$DEV"; else $B del -n "${DEV#/dev/ublkb}"; fi
  done
done
python3 - "$W" "$OUT" "$RUNS" "$RT" "$JOBS" <<'PY'
import json, sys, statistics, subprocess, os
w, out, runs, rt, jobs = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5].split()
def load(peer, job, run):
    j = json.load(open(f"{w}/{peer}.{job}.{run}.json"))["jobs"][0]
    d = j["read"] if "read" in job.split(":")[0] else j["write"]
    p = d["clat_ns"].get("percentile", {})
    return d["iops"], p.get("50.000000", 0) / 1000, p.get("99.000000", 0) / 1000, p.get("99.900000", 0) / 1000
rows = []
for job in jobs:
    r = {}
    for peer in ("ublk-fast", "ublk-fast-copy", "kernel-loop"):
        vals = [load(peer, job, i) for i in range(1, runs + 1)]
        r[peer] = [statistics.median(v[k] for v in vals) for k in range(4)]
    rows.append((job, r))
kv = subprocess.run(["uname", "-r"], capture_output=True, text=True).stdout.strip()
with open(out, "w") as f:
    f.write(f"# ublk-fast loop vs kernel loop (direct I/O)\n\n")
    f.write(f"Guest kernel {kv}, {os.cpu_count()} vCPUs, **qemu TCG software emulation**: absolute numbers "
            f"mean little, only the ratios inside this one boot do. Backing file: 1 GiB on the guest's tmpfs. "
            f"fio io_uring, direct=1, {rt} s per run (+1 s ramp), {runs} runs per cell alternating which peer goes "
            f"first; medians. Latency: completion latency percentiles in µs.\n\n")
    f.write("`ublk-fast` is the default (zero copy, `UBLK_F_AUTO_BUF_REG`, where the driver offers it); "
            "`ublk-fast copy` is `--zero-copy off`.\n\n")
    f.write("| job (rw:bs:qd) | ublk-fast IOPS | ublk-fast copy IOPS | kernel loop IOPS | ratio ublk-fast / kernel | ratio copy / kernel "
            "| ublk-fast p50/p99/p99.9 µs | copy p50/p99/p99.9 µs | kernel loop p50/p99/p99.9 µs |\n")
    f.write("|---|---:|---:|---:|---:|---:|---|---|---|\n")
    lat = lambda x: f"{x[1]:.0f} / {x[2]:.0f} / {x[3]:.0f}"
    for job, r in rows:
        u, c, k = r["ublk-fast"], r["ublk-fast-copy"], r["kernel-loop"]
        f.write(f"| {job} | {u[0]:.0f} | {c[0]:.0f} | {k[0]:.0f} | {u[0]/k[0]:.2f} | {c[0]/k[0]:.2f} | {lat(u)} | {lat(c)} | {lat(k)} |\n")
print(open(out).read())
PY
rm -rf "$W" $IMG
