#!/bin/bash
# Guest side of `bench/run.sh metrics`: the same fio job on a null device with metrics off and
# with metrics on (scraped every second), alternating, RUNS runs each, medians.
#   metrics-overhead.sh OUT.md [RUNTIME_S] [RUNS]
set -euo pipefail
OUT=$1; RT=${2:-5}; RUNS=${3:-5}
B=$(pwd)/target/release/ublk-fast
W=$(mktemp -d /tmp/bench.XXXX)
modprobe ublk_drv
for run in $(seq 1 "$RUNS"); do
  order="off on"; [ $((run % 2)) = 0 ] && order="on off"
  for mode in $order; do
    if [ $mode = on ]; then DEV=$($B null --size 4G --metrics 127.0.0.1:9633)
    else DEV=$($B null --size 4G); fi
    # The same scraper runs in both modes (with metrics off it finds nothing listening), so the
    # guest's CPUs carry the same load and only the daemon's side differs.
    python3 -c '
import time, urllib.request
while True:
    try: urllib.request.urlopen("http://127.0.0.1:9633/metrics").read()
    except OSError: pass
    time.sleep(1)' &
    SCRAPER=$!
    fio --name=m --filename="$DEV" --ioengine=io_uring --direct=1 --rw=randread --bs=4k \
        --iodepth=32 --runtime="$RT" --time_based --ramp_time=1 --eta=never \
        --output-format=json --output="$W/$mode.$run.json" >/dev/null
    kill $SCRAPER; wait $SCRAPER 2>/dev/null || true
    $B del -n "${DEV#/dev/ublkb}"
    echo "run $run metrics $mode done"
  done
done
python3 - "$W" "$OUT" "$RUNS" "$RT" <<'PY'
import json, sys, statistics, os, subprocess
w, out, runs, rt = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
iops = {m: [json.load(open(f"{w}/{m}.{r}.json"))["jobs"][0]["read"]["iops"] for r in range(1, runs + 1)] for m in ("off", "on")}
med = {m: statistics.median(v) for m, v in iops.items()}
kv = subprocess.run(["uname", "-r"], capture_output=True, text=True).stdout.strip()
with open(out, "w") as f:
    f.write("# Metrics overhead: ublk-fast null, 4k randread qd32, metrics off vs on (scraped every 1 s)\n\n")
    f.write(f"Guest kernel {kv}, {os.cpu_count()} vCPUs, **qemu TCG software emulation**: only the ratio means anything. "
            f"{runs} alternating runs of {rt} s each; medians.\n\n")
    f.write("| metrics | runs (IOPS) | median IOPS |\n|---|---|---:|\n")
    for m in ("off", "on"):
        f.write(f"| {m} | {', '.join('%.0f' % v for v in iops[m])} | {med[m]:.0f} |\n")
    f.write(f"\nDifference (on vs off): {100 * (med['on'] - med['off']) / med['off']:+.1f} %\n")
print(open(out).read())
PY
rm -rf "$W"
