# Sourced by bench/nbd.sh and bench/profile.sh (guest side): the NBD servers the nbd
# benchmarks run against, and the kernel's nbd client as the peer, on 127.0.0.1:10809, export
# "disk".

NBD_SRV_PID=
# nbd_server_start nbdkit | qemu-nbd IMG: starts the server in the background (nbdkit serves
# a 1 GiB memory export; qemu-nbd serves IMG, raw) and waits up to 10 s until it listens.
nbd_server_start() {
  case $1 in
    nbdkit) nbdkit -f -i 127.0.0.1 -p 10809 -e disk memory 1G & ;;
    qemu-nbd) qemu-nbd -p 10809 -b 127.0.0.1 -x disk -f raw --persistent --shared=16 "$2" & ;;
  esac
  NBD_SRV_PID=$!
  for _ in $(seq 100); do
    (exec 3<>/dev/tcp/127.0.0.1/10809) 2>/dev/null && return 0
    sleep 0.1
  done
  echo "$0: $1 did not come up" >&2; exit 1
}
nbd_server_stop() { kill "$NBD_SRV_PID"; wait "$NBD_SRV_PID" 2>/dev/null || true; }

# The kernel client on /dev/nbd0 with CONNS connections (needs modprobe nbd).
knbd_attach() { nbd-client -N disk 127.0.0.1 10809 /dev/nbd0 -C "$1" -b 4096 >/dev/null; } # CONNS
knbd_detach() { nbd-client -d /dev/nbd0 >/dev/null; }
