#!/bin/bash
# Guest side of `bench/run.sh nbd`: ublk-fast's nbd target vs the kernel's nbd client
# (nbd-client, as many connections as ublk-fast has queues) on the same NBD server, in one
# boot, alternating, RUNS runs each, fio io_uring direct. Servers: nbdkit (memory plugin) and
# qemu-nbd (a raw file on tmpfs), both over TCP on 127.0.0.1. ZC=1 (the default; ZC=0 leaves
# it out) adds ublk-fast in zero copy (`--zero-copy on`: WRITE_FIXED/READ_FIXED on the socket
# from and into the requests' pages, simple replies) as a third client. POLL=N adds ublk-fast in
# latency mode (`--poll-us N`) as another; JOBS="rw:bs:qd ..." picks the jobs.
#   nbd.sh OUT.md [RUNTIME_S] [RUNS]
set -euo pipefail
OUT=$1; RT=${2:-5}; RUNS=${3:-3}
B=${UBLK_FAST_BIN:-$(pwd)/target/release/ublk-fast}
W=$(mktemp -d /tmp/bench.XXXX)
modprobe ublk_drv; modprobe nbd nbds_max=4
CPUS=$(nproc)
PEERS="ublk-fast kernel-nbd"
[ "${ZC:-1}" = 0 ] || PEERS="$PEERS ublk-fast-zc"
[ -z "${POLL:-}" ] || PEERS="$PEERS ublk-fast-poll"
JOBS=${JOBS:-"randread:4k:1 randread:4k:64 randwrite:4k:1 randwrite:4k:64 read:128k:32"}
IMG=/tmp/bench-nbd.img
truncate -s 1G $IMG

. "$(dirname "$(readlink -f "$0")")/nbd-server.sh"

busy_total() { awk '/^cpu /{print $2+$3+$4+$7+$8, $2+$3+$4+$5+$6+$7+$8}' /proc/stat; }
run_fio() { # dev job run peer server
  local rw=${2%%:*} rest=${2#*:}; local bs=${rest%%:*} qd=${rest#*:}
  local a b
  a=$(busy_total)
  fio --name=b --filename="$1" --ioengine=io_uring --direct=1 --rw="$rw" --bs="$bs" --iodepth="$qd" \
      --runtime="$RT" --time_based --ramp_time=1 --size=1G --numjobs=1 --eta=never \
      --output-format=json --output="$W/$5.$4.$2.$3.json" >/dev/null
  b=$(busy_total)
  echo "$a $b" > "$W/$5.$4.$2.$3.cpu"
}

for server in nbdkit qemu-nbd; do
  nbd_server_start $server $IMG
  # Fill the export once, so reads read data (not holes) on both peers.
  DEV=$($B nbd nbd://127.0.0.1:10809/disk)
  fio --name=fill --filename="$DEV" --ioengine=io_uring --direct=1 --rw=write --bs=1m --iodepth=8 \
      --size=1G --eta=never --output=/dev/null
  Q=$($B list -n "${DEV#/dev/ublkb}" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["queues"])')
  $B del -n "${DEV#/dev/ublkb}"
  echo "$server: ublk-fast has $Q queue(s); the kernel client gets -C $Q"
  echo "$Q" > "$W/$server.queues"
  for run in $(seq 1 "$RUNS"); do
    order=$PEERS
    [ $((run % 2)) = 0 ] && order=$(echo $PEERS | tr ' ' '\n' | tac | tr '\n' ' ')
    for peer in $order; do
      case $peer in
        ublk-fast) DEV=$($B nbd nbd://127.0.0.1:10809/disk) ;;
        ublk-fast-zc) DEV=$($B nbd nbd://127.0.0.1:10809/disk --zero-copy on) ;;
        ublk-fast-poll) DEV=$($B nbd nbd://127.0.0.1:10809/disk --poll-us "$POLL") ;;
        kernel-nbd) knbd_attach "$Q"; DEV=/dev/nbd0 ;;
      esac
      for j in $JOBS; do run_fio "$DEV" "$j" "$run" "$peer" "$server"; echo "$server run $run $peer $j done"; done
      if [ "$peer" = kernel-nbd ]; then knbd_detach; else $B del -n "${DEV#/dev/ublkb}"; fi
    done
  done
  nbd_server_stop
done

python3 - "$W" "$OUT" "$RUNS" "$RT" "$JOBS" "$CPUS" "$PEERS" "${POLL:-}" <<'PY'
import json, sys, statistics, subprocess, os
w, out, runs, rt, jobs, cpus = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5].split(), sys.argv[6]
peers, poll = sys.argv[7].split(), sys.argv[8]
hz = os.sysconf("SC_CLK_TCK")
def load(server, peer, job, run):
    base = f"{w}/{server}.{peer}.{job}.{run}"
    j = json.load(open(base + ".json"))["jobs"][0]
    d = j["read"] if "read" in job.split(":")[0] else j["write"]
    p = d["clat_ns"].get("percentile", {})
    a0, _, b0, _ = map(int, open(base + ".cpu").read().split())
    ios = d["total_ios"] or 1
    # Whole-guest busy CPU time over the run (ramp included) per I/O done, in µs.
    cpu_us = (b0 - a0) / hz * 1e6 / ios
    return d["iops"], p.get("99.000000", 0) / 1000, cpu_us
kv = subprocess.run(["uname", "-r"], capture_output=True, text=True).stdout.strip()
with open(out, "w") as f:
    f.write("# ublk-fast nbd vs the kernel's nbd client\n\n")
    f.write(f"Guest kernel {kv}, {cpus} vCPUs, **qemu TCG software emulation**: absolute numbers mean little, "
            f"only the ratios inside this one boot do. Servers in the same guest, over TCP on 127.0.0.1: nbdkit "
            f"(memory plugin, 1 GiB) and qemu-nbd (raw 1 GiB file on tmpfs, --shared=16). Both clients get the same "
            f"number of connections (ublk-fast: one per queue; kernel: nbd-client -C). fio io_uring, direct=1, "
            f"{rt} s per run (+1 s ramp), {runs} runs per cell alternating which client goes first; medians. "
            f"CPU/IO: whole-guest busy CPU time (client, server, fio) per I/O, µs."
            + (" ublk-fast zc: the same with `--zero-copy on`." if "ublk-fast-zc" in peers else "")
            + (f" ublk-fast poll: the same with `--poll-us {poll}`." if "ublk-fast-poll" in peers else "") + "\n\n")
    for server in ("nbdkit", "qemu-nbd"):
        q = open(f"{w}/{server}.queues").read().strip()
        f.write(f"## {server} ({q} connection(s) each)\n\n")
        f.write("| job (rw:bs:qd) | ublk-fast IOPS | kernel nbd IOPS | ratio | ublk-fast p99 µs | kernel p99 µs | ublk-fast CPU/IO µs | kernel CPU/IO µs |\n")
        f.write("|---|---:|---:|---:|---:|---:|---:|---:|\n")
        r = {}
        for job in jobs:
            for peer in peers:
                vals = [load(server, peer, job, i) for i in range(1, runs + 1)]
                r[peer, job] = [statistics.median(v[k] for v in vals) for k in range(3)]
            u, k = r["ublk-fast", job], r["kernel-nbd", job]
            f.write(f"| {job} | {u[0]:.0f} | {k[0]:.0f} | {u[0]/k[0]:.2f} | {u[1]:.0f} | {k[1]:.0f} | {u[2]:.1f} | {k[2]:.1f} |\n")
        f.write("\n")
        for peer, what, tag in (("ublk-fast-zc", "Zero copy (`--zero-copy on`)", "zc"),
                                ("ublk-fast-poll", f"Latency mode (`--poll-us {poll}`)", "poll")):
            if peer not in peers:
                continue
            f.write(f"{what} against copy mode and the kernel client:\n\n")
            f.write(f"| job (rw:bs:qd) | {tag} IOPS | {tag} ÷ copy | {tag} ÷ kernel | {tag} p99 µs | {tag} CPU/IO µs |\n")
            f.write("|---|---:|---:|---:|---:|---:|\n")
            for job in jobs:
                z, u, k = r[peer, job], r["ublk-fast", job], r["kernel-nbd", job]
                f.write(f"| {job} | {z[0]:.0f} | {z[0]/u[0]:.2f} | {z[0]/k[0]:.2f} | {z[1]:.0f} | {z[2]:.1f} |\n")
            f.write("\n")
print(open(out).read())
PY
rm -rf "$W" $IMG
