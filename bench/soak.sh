#!/bin/bash
# Guest side of `bench/run.sh soak SECONDS`: a long, hostile run. Devices: loop on a file, loop
# on brd, stripe over two files, nbd on nbdkit (all --recovery=reissue), a null device, and a
# loop device on a dm device that is flipped to dm-flakey now and then. Each data device has a
# writer (fio random writes of crc32c-stamped blocks, verify state saved). Meanwhile a driver
# picks at random, every few seconds: kill -9 of the service and `ublk-fast serve` (takes every
# device over), quiesce + recover of one device, delete and re-add of the idle null device, a
# flip of the flakey device (failing 2 s), a metrics scrape. At the end the writers stop and
# every block they had acknowledged is read back and checked.
#   soak.sh OUT.md SECONDS
# Reports cycles survived per action, bytes verified, errors fio saw (must be 0 except on the
# flakey device), leaked devices, processes and file descriptors (must be 0).
set -uo pipefail
OUT=$1; SECS=${2:-1200}
B=${UBLK_FAST_BIN:-$(pwd)/target/release/ublk-fast}
W=$(mktemp -d /tmp/soak.XXXX)
modprobe ublk_drv; modprobe loop; modprobe brd rd_nr=1 rd_size=262144; modprobe dm_flakey
log() { echo "[soak $(( $(date +%s) - T0 ))s] $*"; }
T0=$(date +%s)
PORT=9677
fail=0

truncate -s 256M $W/f0.img $W/s0.img $W/s1.img $W/flk.img
FL=$(losetup -f --show $W/flk.img)
SECT=$(blockdev --getsz "$FL")
dmsetup create soakflk --table "0 $SECT linear $FL 0"
FLK=/dev/$(for d in /sys/block/dm-*; do [ "$(cat $d/dm/name)" = soakflk ] && basename $d; done)
nbdkit -f -U $W/nbd.sock memory 256M & NBDKIT=$!
for _ in $(seq 100); do [ -S $W/nbd.sock ] && break; sleep 0.1; done

declare -A DEV
add() { # name args...
  local n=$1; shift
  local p; p=$($B "$@" --recovery=reissue --metrics 127.0.0.1:$PORT) || { log "add $n failed"; fail=1; return; }
  DEV[$n]=$p; log "$n: $p ($*)"
}
add file loop $W/f0.img
add brd loop /dev/ram0
add stripe stripe $W/s0.img $W/s1.img
add nbd nbd "nbd+unix:///?socket=$W/nbd.sock"
add flakey loop "$FLK" --no-part-scan
NULL=$($B null --size 1G)
fds_before=$(ls /proc/$(pgrep -xo ublk-fast)/fd | wc -l)

# One writer per data device, in passes: each pass writes 64 MiB of crc32c-stamped 4k blocks
# at random (300 IOPS), then reads back every block it had acknowledged. A line per pass:
# "ios errors verified_bytes verify_errors".
writer() { # name dev end
  local n=$1 dev=$2 until=$3 pass=0
  while [ "$(date +%s)" -lt "$until" ]; do
    pass=$((pass + 1)); rm -rf $W/st-$n; mkdir -p $W/st-$n
    local job="--name=soak --filename=$dev --aux-path=$W/st-$n --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k --iodepth=8 --size=64M --verify=crc32c"
    local extra=""; [ "$n" = flakey ] && extra="--continue_on_error=write"
    fio $job --do_verify=0 --verify_state_save=1 --rate_iops=300 $extra \
        --output-format=json --output=$W/w-$n-$pass.json >/dev/null 2>&1
    local w v
    w=$(python3 -c "import json;j=json.load(open('$W/w-$n-$pass.json'))['jobs'][0];print(j['write']['total_ios'], j.get('total_err',0) or j['error'])" 2>/dev/null || echo "0 fio-failed")
    v=$(fio $job --verify_only --verify_state_load=1 --verify_fatal=1 --output-format=json 2>/dev/null \
        | python3 -c "import json,sys;t=sys.stdin.read();j=json.loads(t[t.find('{'):])['jobs'][0];print(j['read']['io_bytes'], j['error'])" 2>/dev/null || echo "0 verify-failed")
    echo "$w $v" >> $W/res-$n
  done
}
WEND=$(( $(date +%s) + SECS - 90 ))
declare -A FIO
for n in "${!DEV[@]}"; do
  writer "$n" "${DEV[$n]}" "$WEND" &
  FIO[$n]=$!
done

declare -A COUNT
end=$(( $(date +%s) + SECS - 10 ))
while [ "$(date +%s)" -lt "$end" ]; do
  sleep $(( 3 + RANDOM % 5 ))
  case $(( RANDOM % 5 )) in
    0) pid=$(pgrep -xo ublk-fast); kill -9 "$pid"; sleep 1
       $B serve --metrics 127.0.0.1:$PORT >/dev/null 2>&1 || { log "serve after kill -9 failed"; fail=1; }
       # The plain null device dies with its service (no --recovery): add it again.
       sleep 1; [ -e "$NULL" ] || NULL=$($B null --size 1G)
       COUNT[kill9]=$(( ${COUNT[kill9]:-0} + 1 )); log "kill -9 $pid, served again" ;;
    1) names=(file brd stripe nbd); n=${names[RANDOM % 4]}; id=${DEV[$n]#/dev/ublkb}
       if $B quiesce -n "$id" >/dev/null 2>&1; then
         $B recover -n "$id" >/dev/null 2>&1 || { log "recover $n failed"; fail=1; }
         COUNT[handover]=$(( ${COUNT[handover]:-0} + 1 )); log "quiesce + recover $n"
       else COUNT[quiesce_busy]=$(( ${COUNT[quiesce_busy]:-0} + 1 )); fi ;;
    2) $B del -n "${NULL#/dev/ublkb}" >/dev/null && NULL=$($B null --size 1G) || { log "null re-add failed"; fail=1; }
       COUNT[readd]=$(( ${COUNT[readd]:-0} + 1 )) ;;
    3) dmsetup suspend soakflk && dmsetup reload soakflk --table "0 $SECT flakey $FL 0 0 2" && dmsetup resume soakflk
       sleep 2
       dmsetup suspend soakflk && dmsetup reload soakflk --table "0 $SECT linear $FL 0" && dmsetup resume soakflk
       COUNT[flakey]=$(( ${COUNT[flakey]:-0} + 1 )); log "flakey flipped for 2 s" ;;
    4) curl -sf -m 5 http://127.0.0.1:$PORT/metrics >/dev/null 2>&1 || python3 -c "import urllib.request;urllib.request.urlopen('http://127.0.0.1:$PORT/metrics',timeout=5).read()" \
         || { log "scrape failed"; COUNT[scrape_fail]=$(( ${COUNT[scrape_fail]:-0} + 1 )); }
       COUNT[scrape]=$(( ${COUNT[scrape]:-0} + 1 )) ;;
  esac
done
log "stopping the writers"
for n in "${!FIO[@]}"; do wait "${FIO[$n]}"; echo "$?" > $W/rc-$n; done

rows=""
total=0
for n in file brd stripe nbd flakey; do
  [ -n "${DEV[$n]:-}" ] && [ -f $W/res-$n ] || continue
  read -r passes ios errs vb verrs < <(awk '{p++; i+=$1; if ($2!="0") e+=($2~/^[0-9]+$/?$2:1); v+=$3; if ($4!="0") ve+=($4~/^[0-9]+$/?$4:1)} END {print p, i, e+0, v, ve+0}' $W/res-$n)
  total=$(( total + vb ))
  rows="$rows| $n | ${DEV[$n]} | $passes | $ios | $errs | $(( vb >> 20 )) MiB | $verrs |\n"
  if [ "$n" != flakey ] && { [ "$errs" != 0 ] || [ "$verrs" != 0 ]; }; then fail=1; fi
done
fds_after=$(ls /proc/$(pgrep -xo ublk-fast)/fd | wc -l)
for n in "${!DEV[@]}"; do $B del -n "${DEV[$n]#/dev/ublkb}" >/dev/null 2>&1; done
$B del -n "${NULL#/dev/ublkb}" >/dev/null 2>&1
$B shutdown >/dev/null 2>&1
sleep 2
left_devs=$(ls /sys/class/ublk-char 2>/dev/null | wc -l)
left_procs=$(pgrep -xc ublk-fast || true)
kill $NBDKIT; dmsetup remove soakflk; losetup -d "$FL"
{
  echo "# Soak: $SECS s of writes under kill -9, hand-overs, re-adds, a flakey device and scrapes"
  echo
  echo "Guest kernel $(uname -r), $(nproc) vCPUs, qemu TCG. Every data device --recovery=reissue;"
  echo "writers: passes of 64 MiB of fio 4k random writes, crc32c-stamped, 300 IOPS, iodepth 8; after"
  echo "each pass every block it had acknowledged is read back (fio verify_only from its saved state)."
  echo
  echo "| action | times |"; echo "|---|---:|"
  for k in "${!COUNT[@]}"; do echo "| $k | ${COUNT[$k]} |"; done
  echo
  echo "| device | path | passes | writes | errors fio saw | verified | verify errors |"
  echo "|---|---|---:|---:|---:|---:|---:|"
  printf "$rows"
  echo
  echo "Bytes verified in all: $(( total >> 20 )) MiB. Leaked after del + shutdown: $left_devs devices, $left_procs processes;"
  echo "the service's open fds before the run $fds_before, at the end (after kill -9s, a new process) $fds_after."
  echo
  [ "$fail" = 0 ] && echo "Result: PASS" || echo "Result: FAIL (see the log)"
} > "$OUT"
cat "$OUT"
rm -rf "$W"
exit $fail
