#!/bin/bash
# Runs the integration test binaries listed in $1 (one path a line) with --ignored, one test at
# a time (they share the kernel's device table), where ublk_drv is loaded. A test that cannot
# run here prints "SKIP: reason" (common::skip) and is counted as skipped, not passed.
#
# Each test runs in a process of its own under a watchdog (IT_TEST_LIMIT seconds, default
# 900): a test that hangs (a kernel or daemon bug, a wait without bound) is failed with the
# kernel stacks of every blocked task, the daemon's log and the processes left, then everything
# it left is killed and deleted, and the suite goes on. Without it one hang ate the CI's whole
# budget and said nothing about where it hung.
#
# Prints the time each test took, the skip reasons, and one closing line
# "integration: N passed, M failed, K skipped". Called by tools/test.sh through tools/vm/run.sh.
set -u
list=$1; filter=${2:-}
limit=${IT_TEST_LIMIT:-900}
modprobe ublk_drv || { echo "it.sh: cannot load ublk_drv"; exit 1; }
modprobe loop 2>/dev/null
echo "kernel $(uname -r), $(nproc) CPUs, $(awk '/MemTotal/{print int($2/1024)" MiB"}' /proc/meminfo), fio $(fio --version)"
passed=0; failed=0; skipped=0; rc=0; reasons=$(mktemp); out=$(mktemp); hung=()
# The release binary the tests drive (common::bin): next to the test binaries' deps folder.
ublk=$(dirname "$(head -1 "$list")")/../ublk-fast

# What a hung test leaves for whoever reads the log: where every blocked task sleeps.
diagnose() {
  echo "=== it.sh: $1 ran past ${limit}s: diagnostics"
  echo "--- processes (not sleeping interruptibly, or ours)"
  ps -eo pid,ppid,stat,etimes,wchan:32,args | awk 'NR==1 || $3 !~ /^[SI]/ || /ublk|fio|dd |blk|mkfs|fsck|nbd|qemu/' \
    | grep -v ' awk \| ps -eo' | cut -c1-200
  for p in $(ps -eo pid,stat | awk '$2 ~ /^D/ {print $1}') $(pgrep -x ublk-fast); do
    for task in /proc/"$p"/task/*; do
      [ -r "$task/stack" ] || continue
      echo "--- stack of $(cat "$task/comm" 2>/dev/null) (pid $p, tid ${task##*/}, $(awk '{print $3}' "$task/stat" 2>/dev/null))"
      cat "$task/stack" 2>/dev/null
    done
  done
  echo "--- ublk devices: $(ls /sys/class/ublk-char 2>/dev/null | tr '\n' ' ')"
  timeout 10 "$ublk" list 2>&1 | head -40
  echo "--- daemon log (last 60 lines)"
  tail -n 60 /run/ublk-fast/daemon.log 2>/dev/null
  echo "--- kernel log (last 150 lines; sysrq-w: the blocked tasks)"
  echo w > /proc/sysrq-trigger 2>/dev/null; sleep 1
  dmesg | tail -n 150
  echo "=== it.sh: end of diagnostics"
}

# Leaves the kernel's device table and the processes as a fresh test expects them.
clean_up() {
  pkill -9 -x fio 2>/dev/null; pkill -9 -x ublk-fast 2>/dev/null
  pkill -9 -x blkdiscard 2>/dev/null; pkill -9 -x dd 2>/dev/null
  sleep 1
  timeout 60 "$ublk" del --all >/dev/null 2>&1
  # A udevd a test started and did not stop leaves its socket, by which dmsetup decides that
  # udev runs: every later dmsetup would then wait forever for udev to confirm its events.
  pgrep -x systemd-udevd >/dev/null || rm -f /run/udev/control
  for d in $(dmsetup ls 2>/dev/null | awk '/^ublk-fast-it/ {print $1}'); do
    timeout 10 dmsetup remove -f "$d" >/dev/null 2>&1
  done
}

while read -r bin; do
  [ -x "$bin" ] || { echo "it.sh: missing $bin"; rc=1; continue; }
  name=$(basename "$bin" | sed 's/-[0-9a-f]*$//')
  echo "--- $(basename "$bin")"
  # shellcheck disable=SC2086
  tests=$("$bin" --ignored --list --format=terse $filter 2>/dev/null | sed -n 's/: test$//p')
  for t in $tests; do
    # Few processes per test: each costs tens of ms in an emulated guest, times ~80 tests.
    : > "$out"
    t0=$EPOCHREALTIME
    # A session of its own, so that the watchdog can end the test and every child it started.
    setsid "$bin" --ignored --exact --test-threads=1 --nocapture "$t" > "$out" 2>&1 &
    pid=$!
    # Shows the output as it comes; ends by itself (after a last read) once the test ended.
    tail -s 0.1 -f --pid=$pid -n +1 "$out" 2>/dev/null &
    tailpid=$!
    timeout "$limit" tail -s 0.1 --pid=$pid -f /dev/null
    if kill -0 $pid 2>/dev/null; then
      diagnose "$name::$t"
      kill -9 -- -$pid 2>/dev/null
      wait $pid 2>/dev/null
      clean_up
      hung+=("$name::$t")
      echo "test $t ... FAILED (hung: killed after ${limit}s)"
      failed=$((failed + 1)); rc=1
    else
      wait $pid; trc=$?
      text=$(<"$out")
      p=""; f=0; k=0
      if [[ $text =~ test\ result:\ [^.]*\.\ ([0-9]+)\ passed\;\ ([0-9]+)\ failed ]]; then
        p=${BASH_REMATCH[1]}; f=${BASH_REMATCH[2]}
      fi
      if [[ $text == *"SKIP: "* ]]; then
        # `test NAME ... SKIP: why` (the reason may also start a line of its own).
        k=$(grep -c 'SKIP: ' "$out")
        grep -o 'SKIP: .*' "$out" | sed "s|^|  $name: |" >> "$reasons"
      fi
      # A binary that died without its summary (a crash) is a failure too.
      if [ -z "$p" ] || { [ "$trc" != 0 ] && [ "$f" = 0 ]; }; then f=1; p=0; fi
      passed=$((passed + p - k)); failed=$((failed + f)); skipped=$((skipped + k))
      # A failed test may leave a device mid-teardown in the service: the next test starts
      # from nothing rather than inherit it.
      if [ "$trc" != 0 ]; then
        rc=1
        echo "--- it.sh: $name::$t failed; the daemon log's last 40 lines:"
        tail -n 40 /run/ublk-fast/daemon.log 2>/dev/null
        clean_up
      fi
    fi
    wait $tailpid 2>/dev/null
    t1=$EPOCHREALTIME
    echo "  ($name::$t took $(( (${t1//[.,]/} - ${t0//[.,]/}) / 1000 )) ms)"
  done
done < "$list"
# Leave nothing behind, and say so if a test did.
left=$(ls /sys/class/ublk-char 2>/dev/null | wc -l)
[ "$left" = 0 ] || { echo "it.sh: $left ublk device(s) left behind"; rc=1; }
if [ "$skipped" -gt 0 ]; then echo "skipped tests:"; cat "$reasons"; fi
if [ "${#hung[@]}" -gt 0 ]; then echo "hung tests (killed after ${limit}s): ${hung[*]}"; fi
rm -f "$reasons" "$out"
echo "integration: $passed passed, $failed failed, $skipped skipped"
[ "$failed" = 0 ] || rc=1
exit $rc
