#!/bin/bash
# Benchmarks, each in one guest boot (or directly where the host has ublk_drv):
#   bench/run.sh loop [RUNTIME_S] [RUNS]      -> bench/results/<date>-loop-vs-kernel.md
#   bench/run.sh metrics [RUNTIME_S] [RUNS]   -> bench/results/<date>-metrics-overhead.md
#   bench/run.sh devices [RUNTIME_S] [RUNS]   -> bench/results/<date>-devices.md: 1, 4 and 16
#     devices (null, loop on brd) at once, ublk-fast's one process vs kublk's and rublk's daemon
#     per device (kublk: bench/build-kublk.sh builds it)
#   bench/run.sh nbd [RUNTIME_S] [RUNS]       -> bench/results/<date>-nbd.md: ublk-fast nbd vs
#     the kernel's nbd client (nbd-client, same connection count) on nbdkit and qemu-nbd
#   bench/run.sh latency [RUNTIME_S] [RUNS] [POLL_US] -> bench/results/<date>-latency.md: the
#     latency mode (--poll-us) at qd1/qd4 against null_blk and kernel loop on brd
#   bench/run.sh spread [RUNTIME_S] [RUNS]    -> bench/results/<date>-spread.md: a one-queue
#     device served by one core vs by every core (PER_IO_DAEMON), null and loop on brd
#   bench/run.sh soak [SECONDS]               -> bench/results/<date>-soak.md (default 1200 s;
#     not in CI): devices under verified writes while the service is killed and restarted,
#     devices are handed over, re-added, a backing device flips to dm-flakey; nothing lost
#   bench/run.sh profile [SECONDS]            -> bench/results/<date>-profile.md (perf in the
#     guest: CPU shares by process and symbol, ublk-fast vs null_blk and kernel loop;
#     BACKING=ext4: the loop cases on a file of ext4 on brd -> <date>-profile-ext4.md;
#     BACKING=nbd: the nbd target vs the kernel's nbd client on nbdkit -> <date>-profile-nbd.md)
#   bench/run.sh peers [RUNTIME_S] [RUNS]     -> bench/results/<date>-peers.md
#     ublk-fast null/loop vs kernel null_blk, kernel loop, kublk (bench/build-kublk.sh) and rublk (if installed:
#     cargo install --locked --no-default-features --root /var/tmp/ublk-fast-peers rublk).
#     UBLK_FAST_BIN=path uses that binary instead of building target/release; RUBLK_BIN=path,
#     PEERS="uf-null null_blk ..." (see bench/peers.sh) pick the peer binary and the peers.
#     The FUSE peer's server (bench/fuse-file, its own crate) is built too, unless
#     FUSE_FILE_BIN=path names one; the FUSE-over-io_uring peer needs bench/build-fuse.sh
#     (libfuse 3.18's passthrough_hp; FUSE_HP_BIN=path names another).
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
which=${1:-loop}; RT=${2:-5}; RUNS=${3:-3}
[ "$which" = peers ] && [ -n "${UBLK_FAST_BIN:-}" ] || cargo build --release --quiet
[ "$which" != peers ] || [ -n "${FUSE_FILE_BIN:-}" ] ||
  cargo build --release --quiet --manifest-path bench/fuse-file/Cargo.toml
mkdir -p bench/results
d=$(date +%Y-%m-%d)
case $which in
  loop) tools/vm/run.sh -t 3000 -r "$PWD/bench/results" -- \
          bench/loop-vs-kernel.sh "bench/results/$d-loop-vs-kernel.md" "$RT" "$RUNS" ;;
  metrics) tools/vm/run.sh -t 3000 -r "$PWD/bench/results" -- \
          bench/metrics-overhead.sh "bench/results/$d-metrics-overhead.md" "$RT" "${3:-5}" ;;
  peers) UBLK_FAST_VM_ENV="UBLK_FAST_BIN RUBLK_BIN KUBLK_BIN FUSE_FILE_BIN FUSE_HP_BIN PEERS BACKING JOBS" tools/vm/run.sh -t 5400 -r "$PWD/bench/results" -- \
          bench/peers.sh "bench/results/$d-peers.md" "$RT" "$RUNS" ;;
  devices) UBLK_FAST_VM_ENV="UBLK_FAST_BIN RUBLK_BIN KUBLK_BIN COUNTS" tools/vm/run.sh -t 5400 -r "$PWD/bench/results" -- \
          bench/devices.sh "bench/results/$d-devices.md" "$RT" "$RUNS" ;;
  nbd) UBLK_FAST_VM_ENV="UBLK_FAST_BIN ZC POLL JOBS" tools/vm/run.sh -t 3000 -r "$PWD/bench/results" -- \
          bench/nbd.sh "bench/results/$d-nbd.md" "$RT" "$RUNS" ;;
  latency) UBLK_FAST_VM_ENV="UBLK_FAST_BIN" tools/vm/run.sh -t 3000 -r "$PWD/bench/results" -- \
          bench/latency.sh "bench/results/$d-latency.md" "$RT" "$RUNS" "${4:-50}" ;;
  spread) UBLK_FAST_VM_ENV="UBLK_FAST_BIN" tools/vm/run.sh -t 3000 -r "$PWD/bench/results" -- \
          bench/spread.sh "bench/results/$d-spread.md" "$RT" "$RUNS" ;;
  soak) UBLK_FAST_VM_ENV="UBLK_FAST_BIN" tools/vm/run.sh -t $(( ${2:-1200} + 900 )) -r "$PWD/bench/results" -- \
          bench/soak.sh "bench/results/$d-soak.md" "${2:-1200}" ;;
  profile) UBLK_FAST_VM_ENV="BACKING" tools/vm/run.sh -t 1200 -r "$PWD/bench/results" -- \
          bench/profile.sh "bench/results/$d-profile${BACKING:+-$BACKING}.md" "$RT" ;;
  *) echo "bench/run.sh: unknown benchmark $which (known: loop, metrics, peers, devices, nbd, latency, spread, soak, profile)" >&2; exit 2 ;;
esac
