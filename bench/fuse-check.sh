#!/bin/bash
# Data check of the fuse-loop peer of bench/peers.sh: bench/fuse-file serves a 64 MiB backing
# file, a kernel loop device (direct I/O) sits on its file, and fio writes and verifies through
# it (4k random writes with crc32c, then 512-byte ones, which fuse-file serves through its
# buffered fallback); at the end the loop device and the backing file must hold the same bytes.
# Guest side (it needs root, FUSE and loop):
#   cargo build --release --manifest-path bench/fuse-file/Cargo.toml
#   tools/vm/run.sh -t 900 -- bench/fuse-check.sh
# FUSE_FILE_BIN overrides the binary. Exits non-zero on any mismatch.
set -euo pipefail
F=${FUSE_FILE_BIN:-$(pwd)/bench/fuse-file/target/release/fuse-file}
[ -x "$F" ] || { echo "fuse-check: no fuse-file binary at $F" >&2; exit 1; }
W=$(mktemp -d /tmp/fuse-check.XXXX)
IMG=$W/backing.img; MNT=$W/mnt
DEV=""; PID=""
cleanup() {
  set +e
  [ -n "$DEV" ] && losetup -d "$DEV"
  [ -n "$PID" ] && kill -TERM "$PID" 2>/dev/null && wait "$PID"
  mountpoint -q "$MNT" && umount -l "$MNT"
  rm -rf "$W"
}
trap cleanup EXIT
modprobe fuse 2>/dev/null || true
modprobe loop 2>/dev/null || true

truncate -s 64M "$IMG"; mkdir "$MNT"
"$F" --backing "$IMG" --mountpoint "$MNT" --threads "$(nproc)" 2>"$W/log" &
PID=$!
for _ in $(seq 100); do [ -f "$MNT/disk" ] && break; sleep 0.1; done
[ -f "$MNT/disk" ] || { cat "$W/log" >&2; exit 1; }
DEV=$(losetup --direct-io=on -f --show "$MNT/disk")
echo "fuse-check: $DEV on $MNT/disk, dio=$(cat "/sys/block/${DEV#/dev/}/loop/dio"), logical block $(cat "/sys/block/${DEV#/dev/}/queue/logical_block_size")"

check() { # name fio-args...
  local name=$1; shift
  if fio --name="$name" --filename="$DEV" --ioengine=io_uring --direct=1 --verify=crc32c \
      --verify_fatal=1 --verify_state_save=0 --eta=never --output="$W/$name.out" "$@"; then
    echo "fuse-check: $name: $(grep -oE '(write|read): IOPS=[^,]*' "$W/$name.out" | tr '\n' ' ')verified"
  else
    cat "$W/$name.out" >&2; echo "fuse-check: $name: FAILED" >&2; exit 1
  fi
}
check randwrite-4k --rw=randwrite --bs=4k --iodepth=16 --size=32M
check randwrite-512 --rw=randwrite --bs=512 --iodepth=16 --size=1M --offset=40M
check randrw-64k --rw=randrw --bs=64k --iodepth=8 --size=16M --offset=48M

cmp "$DEV" "$IMG" && echo "fuse-check: the loop device and the backing file are identical"
losetup -d "$DEV"; DEV=""
kill -TERM "$PID"; rc=0; wait "$PID" || rc=$?; PID=""
cat "$W/log"
[ $rc = 0 ] || { echo "fuse-check: fuse-file exited with status $rc" >&2; exit 1; }
! mountpoint -q "$MNT" || { echo "fuse-check: $MNT still mounted after fuse-file exited" >&2; exit 1; }
echo "fuse-check: PASS"
