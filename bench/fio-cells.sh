# Sourced by bench/latency.sh and bench/spread.sh: one fio cell on a device, with the guest's
# busy CPU time and (for a ublk-fast device) its io_uring_enter calls around it.
# Needs: $B (ublk-fast binary), $RT (seconds per run), $W (the work directory).
# run_fio DEV rw:bs:qd:jobs RUN PEER -> $W/PEER.JOB.RUN.json (fio) and .cpu (samples)
busy_total() { awk '/^cpu /{print $2+$3+$4+$7+$8, $2+$3+$4+$5+$6+$7+$8}' /proc/stat; }
stat_of() { # dev counter -> summed over queues
  $B list -n "${1#/dev/ublkb}" --json | python3 -c "import json,sys; print(json.load(sys.stdin)[0]['stats'].get('$2', 0))"
}
run_fio() { # dev job run peer
  local rw bs qd nj; IFS=: read -r rw bs qd nj <<< "$2"
  local a b e0 e1
  a=$(busy_total)
  e0=0; [[ $1 == /dev/ublkb* ]] && e0=$(stat_of "$1" ring_enters)
  fio --name=b --filename="$1" --ioengine=io_uring --direct=1 --rw="$rw" --bs="$bs" --iodepth="$qd" \
      --numjobs="$nj" --group_reporting --runtime="$RT" --time_based --ramp_time=1 --size=1G \
      --eta=never --output-format=json --output="$W/$4.$2.$3.json" >/dev/null
  b=$(busy_total)
  e1=0; [[ $1 == /dev/ublkb* ]] && e1=$(stat_of "$1" ring_enters)
  echo "$a $b $e0 $e1" > "$W/$4.$2.$3.cpu"
}
