#!/bin/bash
# Guest side of tools/demo.sh (runs where /dev/ublk-control exists).
set -euo pipefail
B=$(pwd)/target/release/ublk-fast
modprobe ublk_drv 2>/dev/null || true
echo "=== kernel $(uname -r), $(nproc) CPUs"
$B features | head -1
IMG=/tmp/ublk-fast-demo.img
truncate -s 1G $IMG
echo "=== ublk-fast loop $IMG"
DEV=$($B loop $IMG)
echo "created $DEV"
$B list
PID=$($B list --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["pid"])')
echo "=== served by the node service, pid $PID, threads: $(cat /proc/$PID/task/*/comm | grep -v '^iou-' | tr '\n' ' ')"
echo "=== fio: 4k random writes, crc32c verified, 20 s at most"
fio --name=demo --filename="$DEV" --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k \
    --iodepth=32 --size=64M --runtime=20 --verify=crc32c --do_verify=1 --verify_fatal=1 \
    --eta=never --output-format=terse --terse-version=3 \
  | awk -F';' '{printf "fio: write %s IOPS, read-back %s IOPS, verified, errors: %s\n", $49, $8, $5}'
echo "=== ext4 on $DEV"
mkfs.ext4 -q -F "$DEV"
mkdir -p /tmp/demo-mnt && mount "$DEV" /tmp/demo-mnt
head -c 32M /dev/urandom > /tmp/demo-mnt/data
sum1=$(sha256sum < /tmp/demo-mnt/data)
sync && umount /tmp/demo-mnt
fsck.ext4 -fn "$DEV" >/dev/null && echo "fsck.ext4: clean"
mount "$DEV" /tmp/demo-mnt
sum2=$(sha256sum < /tmp/demo-mnt/data)
umount /tmp/demo-mnt
[ "$sum1" = "$sum2" ] && echo "32 MiB file read back with the same sha256 after remount"
echo "=== what the service counted for $DEV"
$B list --json | python3 -c 'import json,sys; d=json.load(sys.stdin)[0]; print(json.dumps(d["stats"], indent=1))'
ID=${DEV#/dev/ublkb}
$B del -n "$ID"
[ ! -e "$DEV" ] && echo "=== deleted $DEV; done"
rm -f $IMG
