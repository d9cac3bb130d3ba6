#!/bin/bash
# Benchmarks, each in one guest boot (or directly where the host has ublk_drv):
#   bench/run.sh loop [RUNTIME_S] [RUNS]      -> bench/results/<date>-loop-vs-kernel.md
#   bench/run.sh metrics [RUNTIME_S] [RUNS]   -> bench/results/<date>-metrics-overhead.md
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
which=${1:-loop}; RT=${2:-5}; RUNS=${3:-3}
cargo build --release --quiet
mkdir -p bench/results
d=$(date +%Y-%m-%d)
case $which in
  loop) tools/vm/run.sh -t 3000 -r "$PWD/bench/results" -- \
          bench/loop-vs-kernel.sh "bench/results/$d-loop-vs-kernel.md" "$RT" "$RUNS" ;;
  metrics) tools/vm/run.sh -t 3000 -r "$PWD/bench/results" -- \
          bench/metrics-overhead.sh "bench/results/$d-metrics-overhead.md" "$RT" "${3:-5}" ;;
  *) echo "bench/run.sh: unknown benchmark $which (known: loop, metrics)" >&2; exit 2 ;;
esac
