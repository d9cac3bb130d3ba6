#!/bin/bash
# Runs the integration test binaries listed in $1 (one path a line) with --ignored, one test at
# a time (they share the kernel's device table), where ublk_drv is loaded. A test that cannot
# run here prints "SKIP: reason" (common::skip) and is counted as skipped, not passed. Prints
# the skip reasons and one closing line "integration: N passed, M failed, K skipped". Called by tools/test.sh through tools/vm/run.sh.
set -u
list=$1; filter=${2:-}
modprobe ublk_drv || { echo "it.sh: cannot load ublk_drv"; exit 1; }
modprobe loop 2>/dev/null
echo "kernel $(uname -r), $(nproc) CPUs, $(awk '/MemTotal/{print int($2/1024)" MiB"}' /proc/meminfo), fio $(fio --version)"
passed=0; failed=0; skipped=0; rc=0; reasons=$(mktemp)
while read -r bin; do
  [ -x "$bin" ] || { echo "it.sh: missing $bin"; rc=1; continue; }
  echo "--- $(basename "$bin")"
  out=$(mktemp)
  # shellcheck disable=SC2086
  "$bin" --ignored --test-threads=1 --nocapture $filter 2>&1 | tee "$out"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
  p=$(sed -n 's/^test result: .*\. \([0-9]*\) passed; \([0-9]*\) failed.*/\1/p' "$out" | tail -1)
  f=$(sed -n 's/^test result: .*\. \([0-9]*\) passed; \([0-9]*\) failed.*/\2/p' "$out" | tail -1)
  # `test NAME ... SKIP: why` (the reason may also start a line of its own).
  k=$(grep -c 'SKIP: ' "$out")
  grep -o 'SKIP: .*' "$out" | sed "s|^|  $(basename "$bin" | sed 's/-[0-9a-f]*$//'): |" >> "$reasons"
  passed=$((passed + ${p:-0} - k)); failed=$((failed + ${f:-0})); skipped=$((skipped + k))
  rm -f "$out"
done < "$list"
# Leave nothing behind, and say so if a test did.
left=$(ls /sys/class/ublk-char 2>/dev/null | wc -l)
[ "$left" = 0 ] || { echo "it.sh: $left ublk device(s) left behind"; rc=1; }
if [ "$skipped" -gt 0 ]; then echo "skipped tests:"; cat "$reasons"; fi
rm -f "$reasons"
echo "integration: $passed passed, $failed failed, $skipped skipped"
[ "$failed" = 0 ] || rc=1
exit $rc
