#!/bin/bash
# The main job, end to end on a fresh machine: build ublk-fast, then where ublk_drv exists (in a
# qemu guest when this host has none; tools/vm/run.sh sets that up on first use) serve a file as
# /dev/ublkbN, put ext4 on it, do verified I/O, print what happened, and remove the device.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
echo "=== building ublk-fast (release)"
cargo build --release --quiet
exec tools/vm/run.sh -t 900 -- tools/demo-guest.sh
