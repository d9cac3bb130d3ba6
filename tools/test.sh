#!/bin/bash
# Runs every test: formatting and lints, host unit tests, then the integration tests against
# the real ublk driver (in a qemu guest when this host has no ublk_drv: tools/vm/run.sh).
#
#   tools/test.sh [FILTER]     FILTER: only integration tests whose name contains it
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
t0=$(date +%s)
step() { echo "=== [$(( $(date +%s) - t0 ))s] $*"; }

step "host packages (the tools the tests drive: fio, nbdkit, qemu-nbd, ...)"
tools/vm/setup.sh --packages
step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy -D warnings"
cargo clippy --all-targets --release --quiet -- -D warnings
step "host unit tests"
cargo test --release --quiet 2>&1 | grep -v '^$'

step "host micro-benchmarks of the hot path (quick; numbers for the log, not a pass/fail)"
cargo bench --quiet -p ublk-fast-engine --bench hot_path -- --quick

step "build integration tests"
cargo test --release --no-run --message-format=json -p ublk-fast 2>/dev/null \
  | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "test" in m["target"]["kind"]:
        print(m["executable"])
' > target/it-bins.txt
sed 's/^/  /' target/it-bins.txt

step "integration tests against ublk_drv"
tools/vm/run.sh -t 4800 -m 6G -- tools/it.sh target/it-bins.txt "${1:-}"
step "all tests passed"
