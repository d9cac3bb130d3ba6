#!/bin/bash
# Benchmarks, each in one guest boot (or directly where the host has ublk_drv):
#   bench/run.sh [loop] [RUNTIME_S] [RUNS]    -> bench/results/<date>-loop-vs-kernel.md
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
which=${1:-loop}; RT=${2:-5}; RUNS=${3:-3}
cargo build --release --quiet
mkdir -p bench/results
out=bench/results/$(date +%Y-%m-%d)-$which-vs-kernel.md
case $which in
  loop) tools/vm/run.sh -t 3000 -r "$PWD/bench/results" -- bench/loop-vs-kernel.sh "$out" "$RT" "$RUNS" ;;
  *) echo "bench/run.sh: unknown benchmark $which (known: loop)" >&2; exit 2 ;;
esac
