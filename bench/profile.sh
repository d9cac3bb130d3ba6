#!/bin/bash
# Guest side of `bench/run.sh profile`: where the CPU goes, by `perf record -a` (cpu-clock: the
# only event software emulation has) while fio drives one device, for ublk-fast and the kernel
# peers at qd1 and qd64. The report lists, per case, the share of samples by process and by
# symbol (kernel and ublk-fast; release builds keep symbols).
#   profile.sh OUT.md [SECONDS]
# Environment: BACKING=ext4 profiles the loop cases only, on a fully written 1 GiB file of ext4
#   on a brd ramdisk (bench/peers.sh's default backing, where ublk-fast loses to the kernel
#   loop driver): reads and writes at qd1 and qd64, ublk-fast against the kernel loop driver.
#   BACKING=nbd profiles the nbd target against the kernel's nbd client (nbd-client, one
#   connection per queue) on an nbdkit memory export over TCP, reads and writes at qd1 (where
#   ublk-fast is 0.6-0.75x the kernel client) and reads at qd64.
set -euo pipefail
OUT=$1; S=${2:-4}
B=${UBLK_FAST_BIN:-$(pwd)/target/release/ublk-fast}
P=$(command -v perf) || { echo "profile: no perf binary" >&2; exit 1; }
W=$(mktemp -d /tmp/prof.XXXX)
BACKING=${BACKING:-tmpfs}
FS=/tmp/prof-fs
modprobe ublk_drv; modprobe loop
case $BACKING in
  tmpfs) IMG=/tmp/prof-backing.img ;;
  ext4) IMG=$FS/backing.img
    modprobe brd rd_nr=1 rd_size=1310720
    mkfs.ext4 -q -F /dev/ram0 && mkdir -p $FS && mount /dev/ram0 $FS ;;
  nbd) IMG=/tmp/prof-backing.img
    modprobe nbd nbds_max=2
    . "$(dirname "$(readlink -f "$0")")/nbd-server.sh"
    nbd_server_start nbdkit ;;
  *) echo "profile: BACKING=$BACKING: tmpfs, ext4 or nbd" >&2; exit 2 ;;
esac
modprobe null_blk queue_mode=2 nr_devices=1 gb=1 irqmode=0 submit_queues="$(nproc)" hw_queue_depth=128
# No sparse holes (tmpfs would zero pages; ext4 would allocate on every write).
[ "$BACKING" = nbd ] || dd if=/dev/urandom of=$IMG bs=1M count=1024 status=none conv=fsync
cleanup() {
  set +e; "$B" del --all >/dev/null 2>&1; losetup -D; rmmod null_blk; rm -rf "$W" $IMG
  [ "$BACKING" = ext4 ] && { umount $FS; rmdir $FS; rmmod brd; }
  [ "$BACKING" = nbd ] && nbd_server_stop
}
trap cleanup EXIT
# case: name|device setup|fio rw|bs|qd
CASES="uf-null qd1|uf null --size 1G --zero-copy on|randread|4k|1
uf-null qd64|uf null --size 1G --zero-copy on|randread|4k|64
uf-null-batch qd64|uf null --size 1G --zero-copy on --batch-io|randread|4k|64
null_blk qd1|nullb|randread|4k|1
null_blk qd64|nullb|randread|4k|64
uf-loop qd64|uf loop $IMG --zero-copy on|randwrite|4k|64
kernel-loop qd64|kloop|randwrite|4k|64"
if [ "$BACKING" = ext4 ]; then
  CASES="uf-loop qd1|uf loop $IMG --zero-copy on|randwrite|4k|1
kernel-loop qd1|kloop|randwrite|4k|1
uf-loop qd64|uf loop $IMG --zero-copy on|randwrite|4k|64
kernel-loop qd64|kloop|randwrite|4k|64
uf-loop qd64|uf loop $IMG --zero-copy on|randread|4k|64
kernel-loop qd64|kloop|randread|4k|64"
fi
if [ "$BACKING" = nbd ]; then
  N=nbd://127.0.0.1:10809/disk
  # Fill the export once, so reads read data (not holes) on both clients.
  DEV=$($B nbd $N)
  fio --name=fill --filename="$DEV" --ioengine=io_uring --direct=1 --rw=write --bs=1m --iodepth=8 \
      --size=1G --eta=never --output=/dev/null
  NQ=$($B list -n "${DEV#/dev/ublkb}" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["queues"])')
  $B del -n "${DEV#/dev/ublkb}"
  CASES="uf-nbd qd1|uf nbd $N|randread|4k|1
kernel-nbd qd1|knbd|randread|4k|1
uf-nbd qd1|uf nbd $N|randwrite|4k|1
kernel-nbd qd1|knbd|randwrite|4k|1
uf-nbd qd64|uf nbd $N|randread|4k|64
kernel-nbd qd64|knbd|randread|4k|64"
fi
{
  echo "# Where the CPU goes: perf in the guest (backing: $BACKING)"
  echo
  echo "Guest kernel $(uname -r), $(nproc) vCPUs, **qemu TCG software emulation** (every instruction costs"
  echo "about the same, so these shares show work done, not cache or pipeline effects). \`perf record -a -e"
  echo "cpu-clock -F 499\` for ${S} s while fio (io_uring, direct, 1 job) runs; shares of all samples, by"
  echo "process (swapper is the idle loop), then the busiest symbols outside the idle loop."
} > "$OUT"
while IFS='|' read -r name setup rw bs qd; do
  case $setup in
    uf\ *) DEV=$($B ${setup#uf }) ;;
    nullb) DEV=/dev/nullb0 ;;
    kloop) DEV=$(losetup --direct-io=on -f --show $IMG) ;;
    knbd) knbd_attach "$NQ"; DEV=/dev/nbd0 ;;
  esac
  fio --name=p --filename="$DEV" --ioengine=io_uring --direct=1 --rw="$rw" --bs="$bs" --iodepth="$qd" \
      --runtime=$((S + 3)) --time_based --size=1G --eta=never --output-format=json --output="$W/fio.json" >/dev/null &
  FIO=$!
  sleep 1.5
  "$P" record -a -e cpu-clock -F 499 -o "$W/perf.data" -- sleep "$S" >/dev/null 2>&1
  wait $FIO
  iops=$(python3 -c 'import json,sys; j=json.load(open(sys.argv[1]))["jobs"][0]; print(int(j["read"]["iops"] + j["write"]["iops"]))' "$W/fio.json")
  {
    echo
    echo "## $name ($rw $bs, qd$qd): $iops IOPS"
    echo
    echo '```'
    "$P" report -i "$W/perf.data" --stdio --sort comm --percent-limit 2 2>/dev/null | grep -v '^#' | sed '/^$/d' | head -8
    echo
    # Busy time only: the idle loop (swapper) is left out of the symbol list.
    "$P" report -i "$W/perf.data" --stdio --sort comm,sym --percent-limit 0.6 2>/dev/null | grep -v '^#' | sed '/^$/d' | grep -v swapper | head -24
    echo '```'
  } >> "$OUT"
  case $setup in
    uf\ *) $B del -n "${DEV#/dev/ublkb}" ;;
    kloop) losetup -d "$DEV" ;;
    knbd) knbd_detach ;;
  esac
  echo "profile: $name done" >&2
done <<< "$CASES"
cat "$OUT"
