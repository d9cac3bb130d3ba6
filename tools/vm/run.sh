#!/bin/bash
# tools/vm/run.sh - run ONE command where ublk_drv exists: directly on the host
# when it has ublk, else inside a qemu (TCG) guest booting a Debian kernel with
# ublk_drv. Streams the command's output, exits with its status.
#
#   tools/vm/run.sh [-t SECS] [-c CPUS] [-m MEM] [-r DIR[:DIR...]] [-v] [-k] -- CMD [ARGS...]
#
# The command runs as root under bash, in the caller's current directory. In
# the guest the whole host filesystem is visible through an overlay whose
# writes are thrown away at power-off, except below the read-write dirs: the
# cache dir ($UBLK_FAST_VM_DIR), the repo's target/ dir ($CARGO_TARGET_DIR too
# when set), and every -r dir. /tmp is a tmpfs of up to 90% of guest RAM.
# ublk_drv is modprobe'd before the command runs.
#
# Options:
#   -t SECS   wall-clock timeout (default 1800); exit 124
#   -c CPUS   vCPUs (default 2)
#   -m MEM    guest RAM, qemu syntax (default 6G)
#   -r DIRS   colon-separated host dirs shared read-write, in addition to the
#             defaults (may be repeated; absolute or relative to the cwd)
#   -v        show kernel boot messages and the init's own messages
#   -k        keep the per-run dir ($UBLK_FAST_VM_DIR/runs/run.*)
# Environment:
#   UBLK_FAST_VM_DIR  cache dir (default /var/tmp/ublk-fast-vm); setup.sh runs
#                     automatically when it is not ready
#   UBLK_FAST_VM_ENV  space-separated names of host variables to copy into the
#                     guest (the guest starts from an empty environment plus
#                     PATH HOME TERM LANG USER and UBLK_FAST_IN_VM=1)
#   UBLK_FAST_NO_VM   0 = always boot the VM, even when the host has ublk_drv
#   QEMU="path [args]" / VMLINUX=path  override the qemu binary / guest kernel
# Exit status: the command's; 124 on timeout; 255 if the VM failed (a VM that
# failed before the command started is retried once).
set -u
HERE=$(dirname "$(readlink -f "$0")")
W=${UBLK_FAST_VM_DIR:-/var/tmp/ublk-fast-vm}
TIMEOUT=1800; CPUS=2; MEM=6G; EXTRA_RW=""; VERBOSE=0; KEEP=0
usage() { sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
while getopts "t:c:m:r:vkh" o; do
  case $o in
    t) TIMEOUT=$OPTARG;; c) CPUS=$OPTARG;; m) MEM=$OPTARG;;
    r) EXTRA_RW="$EXTRA_RW:$OPTARG";; v) VERBOSE=1;; k) KEEP=1;;
    *) usage;;
  esac
done
shift $((OPTIND-1))
[ $# -ge 1 ] || usage

# ---------------------------------------------------------------- direct mode
host_has_ublk() {
  [ -e /dev/ublk-control ] && return 0
  modprobe ublk_drv 2>/dev/null || return 1
  # udev may create the node a moment after the module loads
  for _ in 1 2 3 4 5 6 7 8 9 10; do [ -e /dev/ublk-control ] && return 0; sleep 0.1; done
  return 1
}
if [ "${UBLK_FAST_NO_VM:-1}" != 0 ] && host_has_ublk; then
  echo "run.sh: host has ublk_drv, running directly (UBLK_FAST_NO_VM=0 forces the VM)" >&2
  timeout -k 10 "$TIMEOUT" bash -c 'exec "$@"' bash "$@"
  rc=$?
  [ $rc = 124 ] || [ $rc = 137 ] && { echo "run.sh: TIMEOUT after ${TIMEOUT}s" >&2; exit 124; }
  exit $rc
fi

# ---------------------------------------------------------------- VM mode
[ "$(id -u)" = 0 ] || { echo "run.sh: the VM needs root (virtiofsd); try: sudo -E $0 ..." >&2; exit 255; }

# setup when the cache is missing, or the init script changed
KVER=$(sed -n 1p "$W/READY" 2>/dev/null)
if [ -z "$KVER" ] || [ ! -e "$W/vmlinux" ] || [ ! -e "$W/guest-initramfs.cpio.gz" ] ||
   [ ! -e "$W/kernel/usr/lib/modules/$KVER/modules.dep" ] ||
   [ "$(cat "$W/INIT_SUM" 2>/dev/null)" != "$(sha256sum "$HERE/init" | cut -c1-16)" ]; then
  echo "run.sh: VM cache $W not ready (or tools/vm/init changed), running tools/vm/setup.sh" >&2
  "$HERE/setup.sh" >&2 || { echo "run.sh: setup.sh failed" >&2; exit 255; }
  KVER=$(sed -n 1p "$W/READY")
fi
VMLINUX=${VMLINUX:-$W/vmlinux}
INITRD=$W/guest-initramfs.cpio.gz
MODDIR=$W/kernel/usr/lib/modules

if [ -z "${QEMU:-}" ]; then
  if [ -x "$W/qemu10/usr/bin/qemu-system-x86_64" ]; then
    QEMU="$W/qemu10/usr/bin/qemu-system-x86_64 -L $W/qemu10/usr/share/qemu"
  else
    QEMU=qemu-system-x86_64
  fi
fi
if [ -x /usr/lib/qemu/virtiofsd ]; then        # Debian 12: the C one in qemu-system-common
  VIRTIOFSD=(/usr/lib/qemu/virtiofsd -o source=/ -o cache=auto -o sandbox=chroot -o xattr)
elif [ -x /usr/libexec/virtiofsd ]; then       # Debian 13+: the Rust package virtiofsd
  VIRTIOFSD=(/usr/libexec/virtiofsd --shared-dir / --cache auto --sandbox chroot --xattr)
else
  echo "run.sh: no virtiofsd found; run tools/vm/setup.sh" >&2; exit 255
fi

# read-write dirs: cache dir, <repo>/target, $CARGO_TARGET_DIR, -r dirs
TOP=$(git -C "$HERE" rev-parse --show-toplevel 2>/dev/null || (cd "$HERE/../.." && pwd))
mkdir -p "$TOP/target"
RW="$W:$TOP/target"
[ -n "${CARGO_TARGET_DIR:-}" ] && mkdir -p "$CARGO_TARGET_DIR" && RW="$RW:$(readlink -f "$CARGO_TARGET_DIR")"
IFS=: read -ra extra <<< "$EXTRA_RW"
for d in "${extra[@]}"; do
  [ -n "$d" ] || continue
  [ -d "$d" ] || { echo "run.sh: -r $d: no such directory" >&2; exit 2; }
  RW="$RW:$(readlink -f "$d")"
done
case "$RW" in *[[:space:]]*) echo "run.sh: shared dirs must not contain whitespace: $RW" >&2; exit 2;; esac

mkdir -p "$W/runs"
RUN=$(mktemp -d "$W/runs/run.XXXXXX")
# the guest script: environment, modprobe, same cwd, exact argv
{
  echo "export UBLK_FAST_IN_VM=1"
  for v in ${UBLK_FAST_VM_ENV:-}; do
    [[ "$v" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || { echo "run.sh: UBLK_FAST_VM_ENV: bad name '$v'" >&2; continue; }
    [ -n "${!v+set}" ] && printf 'export %s=%q\n' "$v" "${!v}"
  done
  echo "modprobe ublk_drv || echo 'run.sh: warning: modprobe ublk_drv failed in the guest' >&2"
  echo "cd $(printf '%q' "$PWD") 2>/dev/null || { echo 'run.sh: warning: the cwd is not visible in the guest, running in /' >&2; cd /; }"
  printf 'exec'; printf ' %q' "$@"; echo
} > "$RUN/cmd.sh"

VFSD_PID=""; QEMU_PID=""
cleanup() {
  [ -n "$QEMU_PID" ] && kill "$QEMU_PID" 2>/dev/null && wait "$QEMU_PID" 2>/dev/null
  [ -n "$VFSD_PID" ] && kill "$VFSD_PID" 2>/dev/null && wait "$VFSD_PID" 2>/dev/null
  if [ "$KEEP" = 1 ]; then echo "run.sh: kept $RUN" >&2; else rm -rf "$RUN"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

QUIET="quiet"; [ "$VERBOSE" = 1 ] && QUIET="ublkvm.verbose=1"
APPEND="console=ttyS0 $QUIET panic=-1 mitigations=off ublkvm.script=$RUN/cmd.sh ublkvm.rc=$RUN/rc ublkvm.started=$RUN/started ublkvm.moddir=$MODDIR ublkvm.rw=$RW"
START=$SECONDS

# boot once; returns the command's status, 124 on timeout, 255 on VM failure
boot() {
  rm -f "$RUN/rc" "$RUN/started" "$RUN/vfs.sock"
  "${VIRTIOFSD[@]}" --socket-path="$RUN/vfs.sock" >"$RUN/virtiofsd.log" 2>&1 &
  VFSD_PID=$!
  for _ in $(seq 250); do [ -S "$RUN/vfs.sock" ] && break; sleep 0.02; done
  if [ ! -S "$RUN/vfs.sock" ]; then
    echo "run.sh: virtiofsd did not start:" >&2; cat "$RUN/virtiofsd.log" >&2; return 255
  fi
  local left=$(( TIMEOUT - (SECONDS - START) )) qrc
  [ $left -gt 0 ] || return 124
  # qemu in the background + wait, so that INT/TERM traps run at once
  # shellcheck disable=SC2086
  timeout -k 5 "$left" $QEMU -accel tcg,thread=multi,tb-size=1024 -cpu max \
    -smp "$CPUS" -m "$MEM" \
    -object memory-backend-memfd,id=mem,size="$MEM",share=on -machine pc,memory-backend=mem \
    -nodefaults -no-user-config -display none -no-reboot \
    -chardev stdio,id=con,signal=off -serial chardev:con \
    -chardev socket,id=vfs,path="$RUN/vfs.sock" \
    -device vhost-user-fs-pci,chardev=vfs,tag=hostroot,queue-size=1024 \
    -kernel "$VMLINUX" -initrd "$INITRD" -append "$APPEND" </dev/null &
  QEMU_PID=$!
  wait $QEMU_PID; qrc=$?
  QEMU_PID=""
  kill "$VFSD_PID" 2>/dev/null; wait "$VFSD_PID" 2>/dev/null; VFSD_PID=""
  if [ $qrc = 124 ] || [ $qrc = 137 ]; then return 124; fi
  [ -s "$RUN/rc" ] && return "$(cat "$RUN/rc")"
  echo "run.sh: VM ended without an exit status (qemu rc=$qrc)" >&2
  return 255
}

boot; rc=$?
if [ $rc = 255 ] && [ ! -e "$RUN/started" ]; then
  echo "run.sh: the VM failed before the command started; retrying once" >&2
  boot; rc=$?
fi
[ $rc = 124 ] && echo "run.sh: TIMEOUT after ${TIMEOUT}s" >&2
exit $rc
