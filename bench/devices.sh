#!/bin/bash
# Guest side of `bench/run.sh devices`: many devices at once. For 1, 4 and 16 devices (null,
# and loop on brd ramdisks, 2 queues each), one fio job drives all of them round-robin (4k
# random reads, and writes, at depth 64 in all, so fio's own cost stays the same whatever the
# count); servers: ublk-fast (one process for all devices, zero copy), and one daemon per
# device each: kublk (the kernel selftests' server; default copy mode and --auto_zc) and rublk
# (zero copy), where their binaries exist; and the kernel's own drivers as the floor (null_blk
# with N devices, the kernel loop driver on the same ramdisks): what fio and the block layer
# alone cost as the device count grows. Alternating order, RUNS runs, medians.
#   devices.sh OUT.md [RUNTIME_S] [RUNS]
# Environment: UBLK_FAST_BIN, RUBLK_BIN (as bench/peers.sh), KUBLK_BIN (default
# /var/tmp/ublk-fast-peers/bin/kublk, built by bench/build-kublk.sh), COUNTS (default "1 4 16").
# Reported: aggregate IOPS (median, min-max), p99 completion latency, whole-guest CPU per I/O
# (busy ticks of /proc/stat over completed I/Os), the servers' own CPU per I/O (utime+stime
# of their processes, io_uring workers included), ublk-fast's io_uring_enter calls per I/O, and
# the server's threads (io_uring's own iou-wrk/iou-sqp workers aside).
set -euo pipefail
OUT=$1; RT=${2:-5}; RUNS=${3:-3}
B=${UBLK_FAST_BIN:-$(pwd)/target/release/ublk-fast}
R=${RUBLK_BIN:-/var/tmp/ublk-fast-peers/bin/rublk}
K=${KUBLK_BIN:-/var/tmp/ublk-fast-peers/bin/kublk}
COUNTS=${COUNTS:-"1 4 16"}
MAXN=16; for n in $COUNTS; do [ "$n" -gt $MAXN ] && MAXN=$n; done
W=$(mktemp -d /tmp/bench-devices.XXXX)
TCK=$(getconf CLK_TCK)
SERVERS="kernel ublk-fast"
if [ -x "$K" ]; then SERVERS="$SERVERS kublk kublk-autozc"; else
  echo "devices: kublk skipped: no binary at $K (bench/build-kublk.sh builds it)" >&2
fi
if [ -x "$R" ]; then SERVERS="$SERVERS rublk"; else
  echo "devices: rublk skipped: no binary at $R (cargo install --locked --no-default-features --root /var/tmp/ublk-fast-peers rublk)" >&2
fi
modprobe ublk_drv
modprobe brd rd_nr=$MAXN rd_size=65536
modprobe loop
# brd allocates a page on its first write: fill every ramdisk first, or the runs with more
# devices pay for allocations that the one-device runs paid once, early.
for i in $(seq 0 $((MAXN - 1))); do dd if=/dev/zero of=/dev/ram$i bs=1M count=64 status=none; done
cleanup() {
  set +e
  "$B" del --all >/dev/null 2>&1
  [ -x "$R" ] && "$R" del -a >/dev/null 2>&1
  [ -x "$K" ] && "$K" del -a >/dev/null 2>&1
  losetup -D; lsmod | grep -q '^null_blk' && rmmod null_blk
  rmmod brd; rm -rf "$W"
}
trap cleanup EXIT

DEVS=""
setup() { # server kind n
  local s=$1 k=$2 n=$3 i
  DEVS=""
  for i in $(seq 0 $((n - 1))); do
    case $s:$k in
      kernel:null) [ "$i" = 0 ] && modprobe null_blk queue_mode=2 nr_devices="$n" gb=1 irqmode=0 \
                     submit_queues=2 hw_queue_depth=128
                   d=/dev/nullb$i ;;
      kernel:loop) d=$(losetup -f --show --direct-io=on /dev/ram$i) ;;
      ublk-fast:null) d=$("$B" null --size 1G -q 2 -d 128) ;;
      ublk-fast:loop) d=$("$B" loop /dev/ram$i -q 2 -d 128) ;;
      kublk:null) "$K" add -t null -q 2 -d 128 -n $((100 + i)) --quiet >/dev/null; d=/dev/ublkb$((100 + i)) ;;
      kublk:loop) "$K" add -t loop -q 2 -d 128 -n $((100 + i)) --quiet /dev/ram$i >/dev/null; d=/dev/ublkb$((100 + i)) ;;
      kublk-autozc:null) "$K" add -t null -q 2 -d 128 -n $((100 + i)) --auto_zc --quiet >/dev/null; d=/dev/ublkb$((100 + i)) ;;
      kublk-autozc:loop) "$K" add -t loop -q 2 -d 128 -n $((100 + i)) --auto_zc --quiet /dev/ram$i >/dev/null; d=/dev/ublkb$((100 + i)) ;;
      rublk:null) "$R" add null -n $((100 + i)) -q 2 -d 128 --zero-copy --quiet >/dev/null; d=/dev/ublkb$((100 + i)) ;;
      rublk:loop) "$R" add loop -n $((100 + i)) -q 2 -d 128 --zero-copy --quiet -f /dev/ram$i >/dev/null; d=/dev/ublkb$((100 + i)) ;;
    esac
    for _ in $(seq 50); do [ -b "$d" ] && break; sleep 0.1; done
    DEVS="$DEVS $d"
  done
}
teardown() {
  case $1:$2 in
    kernel:null) rmmod null_blk ;;
    kernel:loop) for d in $DEVS; do losetup -d "$d"; done ;;
    ublk-fast:*) "$B" del --all >/dev/null ;;
    rublk:*) "$R" del -a >/dev/null 2>&1 || true ;;
    kublk*:*) for d in $DEVS; do "$K" del -n "${d#/dev/ublkb}" >/dev/null 2>&1 || true; done ;;
  esac
}
PIDS=""
server_pids() { # the processes serving $DEVS (none for the kernel's drivers)
  PIDS=$(for d in $DEVS; do if [[ $d == /dev/ublkb* ]]; then
    "$B" list -n "${d#/dev/ublkb}" --json | sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' | head -1; fi; done | sort -u)
}
threads() { # the server processes' threads, io_uring workers aside
  [ -n "$PIDS" ] || { echo 0; return; }
  for p in $PIDS; do cat /proc/$p/task/*/comm 2>/dev/null; done | grep -vc '^iou-' || true
}
server_ticks() { # utime+stime of the server processes, every thread (io_uring workers too)
  local t=0 p
  for p in $PIDS; do t=$((t + $(awk '{print $14 + $15}' /proc/$p/stat 2>/dev/null || echo 0))); done
  echo $t
}
enters() { # ublk-fast's io_uring_enter calls, every device
  [ "$1" = ublk-fast ] || { echo 0; return; }
  "$B" list --json | python3 -c 'import json,sys; print(sum(d["stats"]["ring_enters"] for d in json.load(sys.stdin)))'
}
busy() { local _ u n s i io irq sirq st rest; read -r _ u n s i io irq sirq st rest < /proc/stat; echo $((u + n + s + irq + sirq + st)); }

for run in $(seq 1 "$RUNS"); do
  order=$SERVERS
  [ $((run % 2)) = 0 ] && order=$(echo $SERVERS | tr ' ' '\n' | tac | tr '\n' ' ')
  for n in $COUNTS; do
    for k in null loop; do
      for s in $order; do
        setup "$s" "$k" "$n"
        server_pids
        th=$(threads)
        files=$(echo $DEVS | tr ' ' ':')
        for rw in randread randwrite; do
          f="$W/$s.$k.$n.$rw.$run"
          b0=$(busy); c0=$(server_ticks); e0=$(enters "$s")
          fio --name=devs --filename="$files" --file_service_type=roundrobin --ioengine=io_uring \
              --direct=1 --rw=$rw --bs=4k --iodepth=64 --runtime="$RT" --time_based --ramp_time=1 \
              --size=64M --eta=never --output-format=json --output="$f.json" >/dev/null ||
            { echo "devices: fio failed: $s $k $n $rw" >&2; rm -f "$f.json"; continue; }
          b1=$(busy); c1=$(server_ticks); e1=$(enters "$s")
          echo "$b0 $b1 $TCK $th $c0 $c1 $e0 $e1" > "$f.cpu"
        done
        teardown "$s" "$k"
        echo "devices: run $run $s $k x$n done ($th threads)" >&2
      done
    done
  done
done

python3 - "$W" "$OUT" "$RUNS" "$RT" "$SERVERS" "$COUNTS" "$(uname -r)" "$(nproc)" <<'PY'
import json, sys, statistics, os
w, out, runs, rt, servers, counts, kernel, ncpu = sys.argv[1:9]
runs, servers, counts = int(runs), servers.split(), [int(c) for c in counts.split()]
def load(s, k, n, rw, run):
    base = f"{w}/{s}.{k}.{n}.{rw}.{run}"
    if not os.path.exists(base + ".json"):
        return None
    j = json.load(open(base + ".json"))["jobs"][0]
    d = j["read"] if rw == "randread" else j["write"]
    b0, b1, tck, th, c0, c1, e0, e1 = map(int, open(base + ".cpu").read().split())
    p99 = d["clat_ns"].get("percentile", {}).get("99.000000", 0) / 1e3
    # CPU ticks cover the ramp too: the I/Os over the same span are estimated from the rate.
    ios = d["iops"] * (float(rt) + 1) or 1
    return {"iops": d["iops"], "p99": p99, "cpu": (b1 - b0) / tck * 1e6 / ios,
            "own": (c1 - c0) / tck * 1e6 / ios if s != "kernel" else None,
            "enters": (e1 - e0) / ios if s == "ublk-fast" else None, "th": th}
def med(rs, key):
    v = [r[key] for r in rs if r[key] is not None]
    return statistics.median(v) if v else None
lines = [f"# Many devices at once: ublk-fast (one process) vs kublk and rublk (one daemon per device), with the kernel's own drivers as the floor", "",
         f"Guest kernel {kernel}, {ncpu} vCPUs (qemu TCG: emulated, compare ratios inside this file only).",
         f"One fio job, 4k, iodepth 64 in all, round-robin over every device; {rt} s (+1 s ramp) x {runs} runs, alternating order; medians (min-max).",
         "CPU/IO: whole-guest busy CPU time per completed I/O (fio, block layer, driver and server). Server CPU/IO: the serving processes' own utime+stime per I/O, their io_uring workers included (none for the kernel's drivers). Enters/IO: ublk-fast's io_uring_enter calls per I/O. Threads: the serving processes' threads, io_uring workers aside.",
         "`kernel` is null_blk (N devices, 2 submit queues, no interrupt emulation) for null, and the kernel loop driver with direct I/O on the same ramdisks for loop: what fio and the block layer cost alone as the device count grows.", ""]
lines.append("| kind | devices | job | server | IOPS median (min-max) | p99 µs | CPU/IO µs | server CPU/IO µs | enters/IO | threads |")
lines.append("|---|---:|---|---|---:|---:|---:|---:|---:|---:|")
one = {}
f = lambda v, fmt: "-" if v is None else format(v, fmt)
for k in ("null", "loop"):
    for n in counts:
        for rw in ("randread", "randwrite"):
            for s in servers:
                rs = [r for r in (load(s, k, n, rw, i) for i in range(1, runs + 1)) if r]
                if not rs:
                    continue
                iops = [r["iops"] for r in rs]
                one[(s, k, rw, n)] = {key: med(rs, key) for key in ("iops", "cpu", "own")}
                lines.append(f"| {k}{' (brd)' if k == 'loop' else ''} | {n} | {rw} | {s} | {med(rs, 'iops'):,.0f} ({min(iops):,.0f}-{max(iops):,.0f}) | "
                             f"{med(rs, 'p99'):,.0f} | {med(rs, 'cpu'):.1f} | {f(med(rs, 'own'), '.1f')} | {f(med(rs, 'enters'), '.2f')} | {rs[0]['th'] if s != 'kernel' else '-'} |")
lines += ["", "Ratios (medians): IOPS at N devices over 1, and against each peer; CPU per I/O at N devices over 1 (whole guest; the server's own).", ""]
for k in ("null", "loop"):
    for rw in ("randread", "randwrite"):
        for n in counts:
            a = one.get(("ublk-fast", k, rw, n))
            base = one.get(("ublk-fast", k, rw, counts[0]))
            kn, k1 = one.get(("kernel", k, rw, n)), one.get(("kernel", k, rw, counts[0]))
            parts = []
            if a and base:
                parts.append(f"ublk-fast IOPS x{n} / x{counts[0]}: {a['iops'] / base['iops']:.2f}")
                parts.append(f"CPU/IO x{n} / x{counts[0]}: {a['cpu'] / base['cpu']:.2f} (own {a['own'] / base['own']:.2f})")
            if kn and k1:
                parts.append(f"kernel's CPU/IO x{n} / x{counts[0]}: {kn['cpu'] / k1['cpu']:.2f}")
            for peer in ("kernel", "kublk", "kublk-autozc", "rublk"):
                r = one.get((peer, k, rw, n))
                if a and r:
                    parts.append(f"ublk-fast / {peer}: {a['iops'] / r['iops']:.2f}")
            if parts:
                lines.append(f"- {k} {rw} x{n}: " + "; ".join(parts))
open(out, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
