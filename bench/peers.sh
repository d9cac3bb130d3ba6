#!/bin/bash
# Guest side of `bench/run.sh peers`: ublk-fast against its peers in one boot, alternating, RUNS
# runs each, fio io_uring direct, medians. Peers: kernel null_blk (the floor for null), the
# kernel loop driver (direct I/O), rublk (libublk's generic targets) and kublk (the kernel
# selftests' server, default copy mode and --auto_zc) where their binaries exist, and
# fuse-loop: the kernel loop driver (direct I/O) on a file of a FUSE server, bench/fuse-file
# (O_DIRECT backing file, FOPEN_DIRECT_IO, one thread per vCPU), serving the same backing file;
# fuse-uring-loop: the same over libfuse 3.18's passthrough_hp on FUSE over io_uring (built by
# bench/build-fuse.sh; `-o io_uring`, --nopassthrough so every read and write reaches the server
# over the ring, --direct-io), serving the directory that holds the backing file.
#   peers.sh OUT.md [RUNTIME_S] [RUNS]
# Environment:
#   UBLK_FAST_BIN  the ublk-fast binary (default target/release/ublk-fast)
#   RUBLK_BIN      the rublk binary (default /var/tmp/ublk-fast-peers/bin/rublk); missing: skipped
#   KUBLK_BIN      the kublk binary (default /var/tmp/ublk-fast-peers/bin/kublk, built by
#                  bench/build-kublk.sh); missing: skipped
#   BACKING        what the loop peers serve (default ext4): ext4 or xfs = one 1 GiB file on that
#                  file system on a brd ramdisk, opened with O_DIRECT by every server; brd = the
#                  ramdisk itself (fuse-loop, which needs a file, is skipped); tmpfs = a file on
#                  the guest's tmpfs (an extra row only: tmpfs has no O_DIRECT of its own)
#   FUSE_FILE_BIN  the fuse-file binary (default bench/fuse-file/target/release/fuse-file, built by
#                  bench/run.sh peers); missing: skipped
#   FUSE_HP_BIN    libfuse's passthrough_hp with io_uring (default
#                  /var/tmp/ublk-fast-peers/bin/passthrough_hp, built by bench/build-fuse.sh);
#                  missing, or the kernel gives it no ring (no FUSE over io_uring): skipped
#   PEERS          which peers, space-separated (default: $DEFAULT_PEERS below: every engine
#                  mode for null, zero copy, batch and SQPOLL for loop; uf-loop-copy and
#                  uf-null-ucopy (--user-copy) are there to be asked for)
# A peer that cannot run (binary or module missing, device creation fails) is skipped with a
# printed reason; the script does not fail for it.
set -euo pipefail
OUT=$1; RT=${2:-5}; RUNS=${3:-3}
B=${UBLK_FAST_BIN:-$(pwd)/target/release/ublk-fast}
R=${RUBLK_BIN:-/var/tmp/ublk-fast-peers/bin/rublk}
F=${FUSE_FILE_BIN:-$(pwd)/bench/fuse-file/target/release/fuse-file}
K=${KUBLK_BIN:-/var/tmp/ublk-fast-peers/bin/kublk}
H=${FUSE_HP_BIN:-/var/tmp/ublk-fast-peers/bin/passthrough_hp}
BACKING=${BACKING:-ext4}
ALL_PEERS="uf-null uf-null-copy uf-null-ucopy uf-null-sqpoll uf-null-batch null_blk rublk-null rublk-null-copy kublk-null kublk-null-autozc uf-loop uf-loop-copy uf-loop-sqpoll uf-loop-batch kernel-loop fuse-loop fuse-uring-loop rublk-loop kublk-loop kublk-loop-autozc"
DEFAULT_PEERS="uf-null uf-null-copy uf-null-batch uf-null-sqpoll null_blk rublk-null rublk-null-copy kublk-null kublk-null-autozc uf-loop uf-loop-batch uf-loop-sqpoll kernel-loop fuse-loop fuse-uring-loop rublk-loop kublk-loop kublk-loop-autozc"
PEERS=${PEERS:-$DEFAULT_PEERS}
NQ=$(nproc); DEPTH=128; RUBLK_ID=50; KUBLK_ID=60
W=$(mktemp -d /tmp/bench.XXXX)
FS=/tmp/bench-fs      # ext4/xfs backing: the file system on /dev/ram0
case $BACKING in
  ext4|xfs) IMG=$FS/backing.img ;;
  brd) IMG=/dev/ram0 ;;
  tmpfs) IMG=/tmp/bench-backing.img ;;
  *) echo "peers: BACKING=$BACKING: ext4, xfs, brd or tmpfs" >&2; exit 2 ;;
esac
MNT=/tmp/bench-fuse   # fuse-loop's mount point; its file is $MNT/disk
HMNT=/tmp/bench-fuse-uring   # fuse-uring-loop's: the backing file's directory, mounted again
# FUSE over io_uring: entries per CPU queue (libfuse's default is 8; fio goes to depth 64).
HQD=64
# rw:bs:iodepth:numjobs
JOBS=${JOBS:-"randread:4k:1:1 randread:4k:4:1 randread:4k:64:1 randread:4k:64:2 randwrite:4k:1:1 randwrite:4k:4:1 randwrite:4k:64:1 randwrite:4k:64:2 read:128k:32:1 write:128k:32:1"}
TCK=$(getconf CLK_TCK)

CUR=""; DEV=""; DPID=""
teardown() { # the current peer's device
  case $CUR in
    uf-*) "$B" del -n "${DEV#/dev/ublkb}" ;;
    rublk-*) "$R" del -n "$RUBLK_ID" ;;
    kublk-*) "$K" del -n "$KUBLK_ID" >/dev/null ;;
    kernel-loop) losetup -d "$DEV" ;;
    fuse-loop|fuse-uring-loop) fuse_teardown ;;
  esac
  CUR=""; DEV=""; DPID=""
}
fuse_teardown() { # loop device first (it holds the FUSE file open), then the server, which unmounts
  local rc=0
  [ -n "$DEV" ] && losetup -d "$DEV"
  if [ -n "$DPID" ]; then kill -TERM "$DPID" 2>/dev/null || true; wait "$DPID" || rc=$?; fi
  [ $rc = 0 ] || echo "peers: the $CUR server exited with status $rc (log: $(tail -n 3 "$W/fuse-file.log" | tr '\n' ' '))" >&2
  for m in "$MNT" "$HMNT"; do if mountpoint -q "$m"; then umount "$m" || umount -l "$m"; fi; done
}
cleanup() {
  set +e
  [ -n "$CUR" ] && teardown
  lsmod | grep -q '^null_blk' && rmmod null_blk
  [ -d "$MNT" ] && ! mountpoint -q "$MNT" && rmdir "$MNT"
  [ -d "$HMNT" ] && ! mountpoint -q "$HMNT" && rmdir "$HMNT"
  case $BACKING in
    ext4|xfs) umount "$FS" 2>/dev/null; rmdir "$FS" 2>/dev/null ;;
    tmpfs) rm -f "$IMG" ;;
  esac
  rm -rf "$W"
}
trap cleanup EXIT

declare -A SKIP CMD
skip() { SKIP[$1]=$2; echo "peers: skipping $1: $2" >&2; }

modprobe ublk_drv
[ -x "$B" ] || { echo "peers: no ublk-fast binary at $B" >&2; exit 1; }
for p in $PEERS; do
  case $p in
    rublk-*) [ -x "$R" ] || skip "$p" "no rublk binary at $R (install: cargo install --locked --no-default-features --root /var/tmp/ublk-fast-peers rublk)" ;;
    kublk-*) [ -x "$K" ] || skip "$p" "no kublk binary at $K (bench/build-kublk.sh builds it)" ;;
    uf-*|null_blk|kernel-loop) ;;
    fuse-loop) modprobe fuse 2>/dev/null || true
      if [ ! -x "$F" ]; then skip "$p" "no fuse-file binary at $F (build: cargo build --release --manifest-path bench/fuse-file/Cargo.toml)"
      elif [ ! -c /dev/fuse ]; then skip "$p" "no /dev/fuse"
      elif [ "$BACKING" = brd ]; then skip "$p" "BACKING=brd: fuse-file serves a file"; fi ;;
    fuse-uring-loop) modprobe fuse 2>/dev/null || true
      if [ ! -x "$H" ]; then skip "$p" "no passthrough_hp at $H (bench/build-fuse.sh builds it)"
      elif [ ! -w /sys/module/fuse/parameters/enable_uring ]; then skip "$p" "this kernel's fuse has no enable_uring (no FUSE over io_uring)"
      elif [ "$BACKING" = brd ]; then skip "$p" "BACKING=brd: passthrough_hp serves a file"
      else echo 1 > /sys/module/fuse/parameters/enable_uring; fi ;;
    *) skip "$p" "unknown peer (known: $ALL_PEERS)" ;;
  esac
done
if [[ " $PEERS " == *" null_blk "* ]]; then
  # blk-mq, 1 GiB, completions inline (irqmode=0): the cheapest block device the kernel has.
  CMD[null_blk]="modprobe null_blk queue_mode=2 nr_devices=1 gb=1 irqmode=0 submit_queues=$NQ hw_queue_depth=$DEPTH"
  ${CMD[null_blk]} || skip null_blk "modprobe null_blk failed"
fi
if [[ " $PEERS " == *loop* ]]; then
  modprobe loop || true
  case $BACKING in
    ext4|xfs) modprobe brd rd_nr=1 rd_size=1310720
      if [ "$BACKING" = ext4 ]; then mkfs.ext4 -q -F /dev/ram0; else mkfs.xfs -q -f /dev/ram0; fi
      mkdir -p "$FS" && mount /dev/ram0 "$FS" ;;
    brd) modprobe brd rd_nr=1 rd_size=1048576 ;;
  esac
  echo "peers: writing the 1 GiB backing $IMG ($BACKING)" >&2
  dd if=/dev/urandom of=$IMG bs=1M count=1024 status=none conv=fsync
  echo "loop peers serve $IMG: $(case $BACKING in ext4|xfs) echo "a file on $BACKING on a 1.25 GiB brd ramdisk";; brd) echo "a 1 GiB brd ramdisk";; tmpfs) echo "a file on the guest's tmpfs";; esac)" >> "$W/notes"
fi
CMD[uf-null]="$B null --size 1G -q $NQ -d $DEPTH --zero-copy on"
CMD[uf-null-copy]="$B null --size 1G -q $NQ -d $DEPTH --zero-copy off"
CMD[uf-loop]="$B loop $IMG -q $NQ -d $DEPTH --zero-copy on"
CMD[uf-loop-copy]="$B loop $IMG -q $NQ -d $DEPTH --zero-copy off"
CMD[uf-null-ucopy]="$B null --size 1G -q $NQ -d $DEPTH --user-copy"
CMD[uf-null-sqpoll]="$B null --size 1G -q $NQ -d $DEPTH --zero-copy on --sqpoll"
CMD[uf-loop-sqpoll]="$B loop $IMG -q $NQ -d $DEPTH --zero-copy on --sqpoll"
CMD[uf-null-batch]="$B null --size 1G -q $NQ -d $DEPTH --zero-copy on --batch-io"
CMD[uf-loop-batch]="$B loop $IMG -q $NQ -d $DEPTH --zero-copy on --batch-io"
CMD[kernel-loop]="losetup --direct-io=on -f --show $IMG"
CMD[fuse-loop]="$F --backing $IMG --mountpoint $MNT --threads $NQ; losetup --direct-io=on -f --show $MNT/disk"
CMD[fuse-uring-loop]="$H --foreground --nopassthrough --direct-io -o io_uring -o io_uring_q_depth=$HQD $(dirname "$IMG") $HMNT; losetup --direct-io=on -f --show $HMNT/$(basename "$IMG")"
CMD[rublk-null]="$R add null -n $RUBLK_ID -q $NQ -d $DEPTH --zero-copy --quiet"
CMD[rublk-null-copy]="$R add null -n $RUBLK_ID -q $NQ -d $DEPTH --quiet"
CMD[rublk-loop]="$R add loop -n $RUBLK_ID -q $NQ -d $DEPTH --zero-copy --quiet -f $IMG"
CMD[kublk-null]="$K add -t null -q $NQ -d $DEPTH -n $KUBLK_ID --quiet"
CMD[kublk-null-autozc]="$K add -t null -q $NQ -d $DEPTH -n $KUBLK_ID --auto_zc --quiet"
CMD[kublk-loop]="$K add -t loop -q $NQ -d $DEPTH -n $KUBLK_ID --quiet $IMG"
CMD[kublk-loop-autozc]="$K add -t loop -q $NQ -d $DEPTH -n $KUBLK_ID --auto_zc --quiet $IMG"

# A FUSE server started in the background, then the kernel loop driver (direct I/O) on FILE, a
# file of its mount: sets DPID and DEV, or returns 1 (the caller has set CUR: the server is
# stopped with the peer either way).
fuse_loop() { # FILE server-command...
  local f=$1; shift
  "$@" 2>>"$W/fuse-file.log" &
  DPID=$!
  # The server mounts, then serves: the file shows once it answers lookups.
  for _ in $(seq 100); do [ -f "$f" ] && break; kill -0 "$DPID" 2>/dev/null || break; sleep 0.1; done
  [ -f "$f" ] || { cat "$W/fuse-file.log" >&2; return 1; }
  DEV=$(losetup --direct-io=on -f --show "$f")
}
setup() { # peer -> sets CUR DEV DPID, or returns 1
  local p=$1 out
  case $p in
    null_blk) DEV=/dev/nullb0; [ -b $DEV ] || return 1 ;;
    kernel-loop) DEV=$(${CMD[$p]}) || return 1 ;;
    uf-*) DEV=$(${CMD[$p]}) || return 1 ;;
    fuse-loop) mkdir -p "$MNT"; CUR=$p
      fuse_loop "$MNT/disk" "$F" --backing "$IMG" --mountpoint "$MNT" --threads "$NQ" || return 1 ;;
    fuse-uring-loop) mkdir -p "$HMNT"; CUR=$p
      fuse_loop "$HMNT/$(basename "$IMG")" "$H" --foreground --nopassthrough --direct-io -o io_uring \
        -o "io_uring_q_depth=$HQD" "$(dirname "$IMG")" "$HMNT" || return 1
      # libfuse falls back to /dev/fuse without a word when the kernel offers no ring: then
      # this is not the peer it claims to be.
      local rings; rings=$(ls -l "/proc/$DPID/fd" 2>/dev/null | grep -c 'io_uring' || true)
      if [ "$rings" = 0 ]; then echo "peers: passthrough_hp has no io_uring: not FUSE over io_uring" >&2; return 1; fi
      echo "$p: passthrough_hp has $rings io_uring fd(s) (FUSE over io_uring: one ring queue per CPU, depth $HQD)" >> "$W/notes" ;;
    kublk-*) out=$(${CMD[$p]} 2>&1) || { echo "$out" >&2; return 1; }
      DEV=/dev/ublkb$KUBLK_ID
      for _ in $(seq 50); do [ -b $DEV ] && break; sleep 0.1; done
      [ -b $DEV ] || { CUR=$p; return 1; } ;;
    rublk-*) out=$(${CMD[$p]} 2>&1) || { echo "$out" >&2; return 1; }
      DEV=/dev/ublkb$RUBLK_ID
      for _ in $(seq 50); do [ -b $DEV ] && break; sleep 0.1; done
      [ -b $DEV ] || { CUR=$p; return 1; } ;;
  esac
  CUR=$p
  case $p in uf-*|rublk-*|kublk-*)
    # The kernel's own record of the serving process works for any ublk server.
    DPID=$("$B" list -n "${DEV#/dev/ublkb}" --json | sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' | head -1) ;;
  esac
  case $p in kernel-loop|fuse-loop|fuse-uring-loop)
    # losetup falls back to buffered I/O (dio=0) where the kernel refuses direct I/O on the file.
    local dio; dio=$(cat "/sys/block/${DEV#/dev/}/loop/dio")
    echo "$p: $DEV dio=$dio$([ "$dio" = 1 ] || echo ' (direct I/O refused: the loop device is buffered)')" >> "$W/notes" ;;
  esac
  return 0
}

# Samples: the daemon's utime+stime (ticks), the guest's busy ticks, the device's completed I/Os.
sample() {
  local d=0 u n s i io irq sirq st rest r w
  [ -n "$DPID" ] && d=$(awk '{print $14 + $15}' "/proc/$DPID/stat")
  read -r _ u n s i io irq sirq st rest < /proc/stat
  read -r r _ _ _ w rest < "/sys/block/${DEV#/dev/}/stat"
  echo "$d $((u + n + s + irq + sirq + st)) $((r + w))"
}
# ublk-fast's own counters: SQEs queued and io_uring_enter calls, all queues.
counts() {
  case $CUR in uf-*)
    "$B" list -n "${DEV#/dev/ublkb}" --json |
      python3 -c 'import json,sys; s=json.load(sys.stdin)[0]["stats"]; print(s["sqes"], s["ring_enters"])' ;;
  *) echo "0 0" ;;
  esac
}
run_fio() { # job run
  local rw bs qd nj; IFS=: read -r rw bs qd nj <<< "$1"
  local f="$W/$CUR.$1.$2" s0 s1
  c0=$(counts); s0=$(sample)
  fio --name=b --filename="$DEV" --ioengine=io_uring --direct=1 --rw="$rw" --bs="$bs" --iodepth="$qd" \
      --numjobs="$nj" --group_reporting --runtime="$RT" --time_based --ramp_time=1 --size=1G \
      --eta=never --output-format=json --output="$f.json" >/dev/null || { echo "peers: fio failed: $CUR $1" >&2; rm -f "$f.json"; return 0; }
  s1=$(sample); c1=$(counts)
  echo "$s0 $s1 $TCK" > "$f.cpu"
  echo "$c0 $c1" > "$f.cnt"
}

for run in $(seq 1 "$RUNS"); do
  order=$PEERS
  [ $((run % 2)) = 0 ] && order=$(echo $PEERS | tr ' ' '\n' | tac | tr '\n' ' ')
  for p in $order; do
    [ -n "${SKIP[$p]:-}" ] && continue
    if ! setup "$p"; then
      [ -n "$CUR" ] && teardown
      skip "$p" "device creation failed: ${CMD[$p]}"; continue
    fi
    for j in $JOBS; do run_fio "$j" "$run"; done
    echo "peers: run $run $p ($DEV) done" >&2
    teardown
  done
done

for p in $PEERS; do
  if [ -n "${SKIP[$p]:-}" ]; then echo "skip $p ${SKIP[$p]}"; else echo "cmd $p ${CMD[$p]:-}"; fi
done > "$W/peers"
python3 - "$W" "$OUT" "$RUNS" "$RT" "$JOBS" "$PEERS" <<'PY'
import json, sys, statistics, subprocess, os
w, out, runs, rt, jobs, peers = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5].split(), sys.argv[6].split()
skipped, cmds = {}, {}
for line in open(f"{w}/peers"):
    kind, p, rest = (line.rstrip("\n").split(" ", 2) + [""])[:3]
    (skipped if kind == "skip" else cmds)[p] = rest
notes = open(f"{w}/notes").read().split("\n") if os.path.exists(f"{w}/notes") else []

def load(p, job, run):
    base = f"{w}/{p}.{job}.{run}"
    if not os.path.exists(base + ".json"):
        return None
    j = json.load(open(base + ".json"))["jobs"][0]
    d = j["read"] if job.split(":")[0] in ("read", "randread") else j["write"]
    pc = d["clat_ns"].get("percentile", {})
    d0, b0, i0, d1, b1, i1, tck = map(int, open(base + ".cpu").read().split())
    ios = max(i1 - i0, 1)
    q0, e0, q1, e1 = map(int, open(base + ".cnt").read().split()) if os.path.exists(base + ".cnt") else (0, 0, 0, 0)
    return [d["iops"], pc.get("50.000000", 0) / 1e3, pc.get("99.000000", 0) / 1e3, pc.get("99.900000", 0) / 1e3,
            (d1 - d0) / tck * 1e6 / ios, (b1 - b0) / tck * 1e6 / ios, (q1 - q0) / ios, (e1 - e0) / ios]

present = [p for p in peers if p not in skipped]
med, spread = {}, {}
for p in present:
    for job in jobs:
        vals = [v for v in (load(p, job, r) for r in range(1, runs + 1)) if v]
        if vals:
            med[p, job] = [statistics.median(v[k] for v in vals) for k in range(8)]
            spread[p, job] = (min(v[0] for v in vals), max(v[0] for v in vals))
present = [p for p in present if any((p, j) in med for j in jobs)]
daemon = lambda p: p.startswith("uf-") or p.startswith("rublk-") or p.startswith("kublk-") or p.startswith("fuse-")
PAIRS = [("uf-null", "null_blk"), ("uf-null", "rublk-null"), ("uf-null-copy", "rublk-null-copy"),
         ("uf-null", "kublk-null"), ("uf-null", "kublk-null-autozc"), ("uf-loop", "kublk-loop"),
         ("uf-loop", "kublk-loop-autozc"),
         ("uf-loop", "kernel-loop"), ("uf-loop", "rublk-loop"), ("uf-loop", "fuse-loop"), ("uf-loop", "fuse-uring-loop"), ("uf-loop-copy", "kernel-loop"),
         ("uf-null-ucopy", "rublk-null-copy"), ("uf-null-sqpoll", "uf-null"), ("uf-loop-sqpoll", "uf-loop"),
         ("uf-null-batch", "uf-null"), ("uf-loop-batch", "uf-loop"), ("uf-null-batch", "null_blk"),
         ("uf-loop-batch", "kernel-loop")]
pairs = [(a, b) for a, b in PAIRS if a in present and b in present]
GROUPS = [("null", [p for p in present if "null" in p]), ("loop", [p for p in present if "loop" in p])]

def cell(p, job, fmt):
    return fmt(med[p, job]) if (p, job) in med else "–"

kv = subprocess.run(["uname", "-r"], capture_output=True, text=True).stdout.strip()
L = []
L.append("# ublk-fast vs peers: kernel null_blk, kernel loop, kublk, rublk, loop over FUSE\n")
L.append(f"Guest kernel {kv}, {os.cpu_count()} vCPUs, **qemu TCG software emulation**: absolute numbers mean little, "
         f"only the ratios inside this one boot do (and they are not what real hardware would show: under TCG every "
         f"instruction costs about the same, so CPU work per I/O dominates). fio io_uring, direct=1, {rt} s per run "
         f"(+1 s ramp), {runs} runs per cell, each run going through the peers in the opposite order of the last; "
         f"medians. Jobs are `rw:bs:iodepth:numjobs` (numjobs 2: `--group_reporting`). Null devices are 1 GiB "
         f"(rublk null is 250 GiB, fio touches 1 GiB); the loop devices' backing is in the notes below the peers. "
         f"Every server runs {os.cpu_count()} queues of depth 128; fuse-loop is the kernel loop driver (direct I/O) on the "
         f"one file of bench/fuse-file, a FUSE server with {os.cpu_count()} threads (one /dev/fuse clone each) that serves "
         f"the same backing file with O_DIRECT pread/pwrite and opens it to the kernel with FOPEN_DIRECT_IO; "
         f"fuse-uring-loop is the kernel loop driver (direct I/O) on the same file through libfuse 3.18's passthrough_hp "
         f"over FUSE over io_uring (one ring queue per CPU, `--nopassthrough --direct-io`, see bench/build-fuse.sh).\n")
L.append("## Peers\n")
L.append("| peer | command |\n|---|---|")
for p in peers:
    L.append(f"| {p} | " + (f"skipped: {skipped[p]}" if p in skipped else f"`{cmds.get(p, '')}`") + " |")
L.append("")
L.extend(dict.fromkeys(n for n in notes if n))
L.append("\nuf-* is ublk-fast (`--zero-copy on`: `UBLK_F_AUTO_BUF_REG`; `-copy`: `--zero-copy off`); rublk `--zero-copy` "
         "is also `UBLK_F_AUTO_BUF_REG`, its default is copy mode.\n")
L.append("## IOPS (median, in brackets the lowest and highest run)\n")
L.append("| job | " + " | ".join(present) + " |")
L.append("|---|" + "---:|" * len(present))
for job in jobs:
    L.append(f"| {job} | " + " | ".join(
        cell(p, job, lambda v: f"{v[0]:.0f}") + (" ({:.0f}–{:.0f})".format(*spread[p, job]) if runs > 1 and (p, job) in spread else "")
        for p in present) + " |")
if pairs:
    L.append("\n## Ratios (IOPS, ublk-fast ÷ peer; > 1: ublk-fast is faster)\n")
    L.append("| job | " + " | ".join(f"{a} ÷ {b}" for a, b in pairs) + " |")
    L.append("|---|" + "---:|" * len(pairs))
    for job in jobs:
        L.append(f"| {job} | " + " | ".join(
            f"{med[a, job][0] / med[b, job][0]:.2f}" if (a, job) in med and (b, job) in med and med[b, job][0] else "–"
            for a, b in pairs) + " |")
L.append("\n## Completion latency p50 / p99 / p99.9 (µs)\n")
for g, ps in GROUPS:
    if not ps: continue
    L.append("| job | " + " | ".join(ps) + " |")
    L.append("|---|" + "---|" * len(ps))
    for job in jobs:
        L.append(f"| {job} | " + " | ".join(cell(p, job, lambda v: f"{v[1]:.0f} / {v[2]:.0f} / {v[3]:.0f}") for p in ps) + " |")
    L.append("")
L.append("## CPU per I/O (µs): server daemon / whole guest\n")
L.append("Server daemon: utime+stime of the server process, ublk or fuse-file (all its threads; stime includes the "
         "driver's work done in its context, such as the copies in copy mode or FUSE's copies through /dev/fuse) over the device's completed I/Os, from before "
         "fio starts to after it exits (ramp included; 10 ms tick resolution). Whole guest: all busy CPU time "
         "(fio, kernel, server) over the same I/Os; for the kernel peers it is the only figure.\n")
L.append("| job | " + " | ".join(present) + " |")
L.append("|---|" + "---:|" * len(present))
for job in jobs:
    L.append(f"| {job} | " + " | ".join(
        cell(p, job, (lambda v: f"{v[4]:.1f} / {v[5]:.1f}") if daemon(p) else (lambda v: f"– / {v[5]:.1f}"))
        for p in present) + " |")
ufs = [p for p in present if p.startswith("uf-")]
if ufs:
    L.append("\n## ublk-fast's ring work per I/O: SQEs queued / io_uring_enter calls\n")
    L.append("From the daemon's own counters over the same span as the CPU figures (ramp included). An SQE is a ublk "
             "command (FETCH/COMMIT, or a batch's PREP/FETCH/COMMIT) or a backend read/write; one enter both submits "
             "and waits.\n")
    L.append("| job | " + " | ".join(ufs) + " |")
    L.append("|---|" + "---:|" * len(ufs))
    for job in jobs:
        L.append(f"| {job} | " + " | ".join(cell(p, job, lambda v: f"{v[6]:.2f} / {v[7]:.2f}") for p in ufs) + " |")
open(out, "w").write("\n".join(L) + "\n")
print(open(out).read())
PY
