#!/bin/bash
# tools/vm/setup.sh - one-time, idempotent setup for tools/vm/run.sh.
#
# Installs a few host packages with apt, and caches under
# ${UBLK_FAST_VM_DIR:-/var/tmp/ublk-fast-vm}:
#   - a Debian kernel that has ublk_drv (linux-image-cloud-amd64 from
#     trixie-backports by default), downloaded through a private apt config
#     (never installed; the host's apt state is untouched), unpacked, depmod'ed,
#     plus an uncompressed vmlinux (boots faster under TCG)
#   - the guest initramfs (static busybox + tools/vm/init + overlay.ko)
#   - qemu 10 from bookworm-backports, unpacked (QEMU10=1, default)
# When everything is there (stamp file $W/READY) it only checks that the host
# packages are installed (dpkg -s) and rebuilds the initramfs if tools/vm/init
# changed: a second run takes about a second.
#
# Usage: setup.sh [--packages]   (--packages: install the host packages only)
# Environment: UBLK_FAST_VM_DIR, SUITE (default trixie-backports),
#   FLAVOUR (cloud-amd64 | amd64), QEMU10=1|0, MIRROR (Debian mirror URL),
#   FORCE=1 (redo everything).
set -euo pipefail
SETUP_VERSION=1
HERE=$(dirname "$(readlink -f "$0")")
. "$HERE/apt-private.sh"
W=${UBLK_FAST_VM_DIR:-/var/tmp/ublk-fast-vm}
SUITE=${SUITE:-trixie-backports}
FLAVOUR=${FLAVOUR:-cloud-amd64}
QEMU10=${QEMU10:-1}
FORCE=${FORCE:-0}
HOST_PKGS="udev qemu-system-x86 qemu-system-common fio busybox-static cpio kmod xz-utils zstd
  util-linux e2fsprogs xfsprogs python3 procps prometheus nbdkit nbd-client qemu-utils dmsetup"
t0=$EPOCHREALTIME
step() { printf 'setup: [%6ss] %s\n' "$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.1f", b-a}')" "$*"; }

SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
mkdir -p "$W"
# one setup at a time (run.sh calls this automatically; two runs may race)
exec 9>"$W/.setup.lock"
flock 9

INIT_SUM=$(sha256sum "$HERE/init" | cut -c1-16)
STAMP_WANT="setup=$SETUP_VERSION suite=$SUITE flavour=$FLAVOUR qemu10=$QEMU10"

# ---- host packages: dpkg -s each, apt-get only when something is missing
missing_pkgs() {
  local p m=""
  for p in $HOST_PKGS; do
    dpkg -s "$p" 2>/dev/null | grep -q '^Status: install ok installed' || m="$m $p"
  done
  echo "$m"
}
missing=$(missing_pkgs)
if [ -n "$missing" ]; then
  step "host packages: installing$missing"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
  # apt may remove an installed package to satisfy a new one: a host with a newer qemu-utils
  # (e.g. from bookworm-backports) loses it to Debian's older qemu-system-x86. Install again
  # what is gone, in the version that fits.
  gone=$(missing_pkgs)
  if [ -n "$gone" ]; then
    step "host packages: apt removed$gone to install the others; installing it again"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $gone >/dev/null
    gone=$(missing_pkgs)
    [ -z "$gone" ] || { echo "setup: cannot install$gone alongside the others; install them by hand" >&2; exit 1; }
  fi
else
  step "host packages: all installed"
fi
# virtiofsd: Debian 12 ships the C one in qemu-system-common; newer Debian has a
# separate (Rust) package `virtiofsd`
if [ ! -x /usr/lib/qemu/virtiofsd ] && [ ! -x /usr/libexec/virtiofsd ]; then
  step "host packages: no virtiofsd in qemu-system-common, installing package virtiofsd"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends virtiofsd >/dev/null
fi
# --packages: only the host packages (tools/test.sh: the host tests use nbdkit and qemu-nbd too)
[ "${1:-}" = --packages ] && { step "host packages only: done"; exit 0; }

# build_initramfs KVER: static busybox + init + uncompressed overlay.ko
build_initramfs() {
  local kver=$1 md=$W/kernel/usr/lib/modules/$1 t
  t=$(mktemp -d)
  mkdir -p "$t/bin"
  cp "$(command -v busybox || echo /bin/busybox)" "$t/bin/busybox"
  install -m 755 "$HERE/init" "$t/init"
  # busybox insmod cannot load .ko.xz/.ko.zst: carry it uncompressed
  local ko
  ko=$(find "$md/kernel/fs/overlayfs" -name 'overlay.ko*' | head -1)
  case "$ko" in
    *.xz) xz -dc "$ko" > "$t/overlay.ko";;
    *.zst) zstd -dcq "$ko" > "$t/overlay.ko";;
    *.ko) cp "$ko" "$t/overlay.ko";;
    *) echo "setup: no overlay.ko (built in?)";;
  esac
  (cd "$t" && find . | cpio -o -H newc --quiet | gzip -1) > "$W/guest-initramfs.cpio.gz.new"
  mv "$W/guest-initramfs.cpio.gz.new" "$W/guest-initramfs.cpio.gz"
  echo "$INIT_SUM" > "$W/INIT_SUM"
  rm -rf "$t"
}

# ---- fast path: everything cached
if [ "$FORCE" != 1 ] && [ -s "$W/READY" ] && grep -qxF "$STAMP_WANT" <(sed -n 2p "$W/READY"); then
  KVER=$(sed -n 1p "$W/READY")
  ok=1
  for f in "$W/vmlinux" "$W/guest-initramfs.cpio.gz" "$W/kernel/usr/lib/modules/$KVER/modules.dep"; do
    [ -e "$f" ] || { ok=0; echo "setup: cache incomplete, missing $f"; }
  done
  if [ $ok = 1 ]; then
    if [ "$(cat "$W/INIT_SUM" 2>/dev/null)" != "$INIT_SUM" ]; then
      step "tools/vm/init changed: rebuilding the initramfs"
      build_initramfs "$KVER"
    fi
    step "cached: kernel $KVER in $W"
    exit 0
  fi
fi
rm -f "$W/READY"
mkdir -p "$W/debs" "$W/runs"

step "private apt config for $SUITE and bookworm-backports (download only, host apt untouched)"
# the Debian mirror this machine already uses
if [ -z "${MIRROR:-}" ]; then
  MIRROR=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [ -n "$MIRROR" ] || MIRROR=$(awk '$1=="deb" && $2 ~ /debian\/?$/ {print $2; exit}' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true)
  [ -n "$MIRROR" ] || MIRROR=http://deb.debian.org/debian
fi
A=$W/apt
lines=()
for s in $(echo "$SUITE bookworm-backports" | tr ' ' '\n' | sort -u); do
  lines+=("deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR $s main")
done
apt_private "$A" "${lines[@]}"
export APT_CONFIG=$A/apt.conf
apt-get update -qq

step "download kernel linux-image-$FLAVOUR from $SUITE"
cd "$W/debs"
# dl PKG/SUITE or PKG=VERSION -> downloads it (if not there yet), prints the .deb file name
dl() {
  local f
  # (run elsewhere: --print-uris prints nothing when the file is already in cwd)
  f=$(cd "$A" && apt-get download --print-uris "$1" | awk '{print $2}' | head -1)
  [ -n "$f" ] || { echo "setup: cannot resolve $1" >&2; return 1; }
  [ -s "$f" ] || apt-get download -q "$1" >/dev/null 2>&1 || { echo "setup: download of $1 failed" >&2; return 1; }
  echo "$f"
}
deps() { dpkg-deb -f "$1" Depends | tr ',' '\n' | sed 's/^ *//; s/ .*//'; }
META=$(dl "linux-image-$FLAVOUR/$SUITE")
IMG=$(deps "$META" | grep -E "^linux-image-[0-9].*-$FLAVOUR(-unsigned)?$" | head -1)
[ -n "$IMG" ] || { echo "setup: $META depends on no linux-image-*" >&2; exit 1; }
IMGDEB=$(dl "$IMG/$SUITE")
DEBS="$IMGDEB"
# from 7.x the kernel is split into linux-image / linux-base / linux-binary / linux-modules
for p in $(deps "$IMGDEB" | grep -E '^linux-(base|binary|modules)-[0-9]' || true); do
  DEBS="$DEBS $(dl "$p/$SUITE")"
done
echo "setup: kernel debs: $DEBS ($(du -ch $DEBS | tail -1 | cut -f1))"
KVER=${IMG#linux-image-}; KVER=${KVER%-unsigned}

step "unpack kernel $KVER, depmod"
KD=$W/k-$KVER
rm -rf "$KD"; mkdir -p "$KD"
for d in $DEBS; do dpkg-deb -x "$d" "$KD"; done
# old-style packages put modules in /lib/modules and the image in /boot
if [ -d "$KD/lib/modules/$KVER" ] && [ ! -d "$KD/usr/lib/modules/$KVER" ]; then
  mkdir -p "$KD/usr/lib/modules"; mv "$KD/lib/modules/$KVER" "$KD/usr/lib/modules/"
fi
MD=$KD/usr/lib/modules/$KVER
[ -f "$MD/vmlinuz" ] || cp "$KD/boot/vmlinuz-$KVER" "$MD/vmlinuz"
[ -f "$MD/config" ] || cp "$KD/boot/config-$KVER" "$MD/config"
ln -sfn "k-$KVER" "$W/kernel"
grep -q '^CONFIG_BLK_DEV_UBLK=[my]' "$MD/config" || { echo "setup: kernel $KVER has no CONFIG_BLK_DEV_UBLK" >&2; exit 1; }
depmod -b "$KD/usr" "$KVER"
# drop old kernels
for old in "$W"/k-* "$W"/vmlinux-*; do
  case "$old" in "$KD"|"$W/vmlinux-$KVER"|"$W/k-*"|"$W/vmlinux-*") ;; *) rm -rf "$old";; esac
done

step "extract uncompressed vmlinux (faster boot under TCG)"
if python3 - "$MD/vmlinuz" "$W/vmlinux-$KVER" <<'EOF'
import sys, subprocess
data = open(sys.argv[1], 'rb').read()
for magic, cmd in ((b'\x28\xb5\x2f\xfd', ['zstd', '-dcq']), (b'\xfd7zXZ\x00', ['xz', '-dcq']),
                   (b'\x1f\x8b\x08', ['gzip', '-dcq'])):
    i = data.find(magic)
    while i >= 0:
        out = subprocess.run(cmd, input=data[i:], capture_output=True).stdout
        if out[:4] == b'\x7fELF':
            open(sys.argv[2], 'wb').write(out); sys.exit(0)
        i = data.find(magic, i + 1)
sys.exit(1)
EOF
then ln -sfn "vmlinux-$KVER" "$W/vmlinux"
else echo "setup: could not extract vmlinux, will boot vmlinuz"; ln -sfn "$MD/vmlinuz" "$W/vmlinux"
fi

step "guest initramfs"
build_initramfs "$KVER"

Q10=0
if [ "$QEMU10" = 1 ]; then
  step "qemu 10 from bookworm-backports (unpacked to $W/qemu10, not installed)"
  V=$(apt-cache madison qemu-system-x86 | awk -F'|' '/bookworm-backports/{gsub(/ /,"",$2); print $2; exit}')
  rm -rf "$W/qemu10"
  if [ -n "$V" ]; then
    mkdir -p "$W/qemu10"
    for p in qemu-system-x86 qemu-system-common qemu-system-data; do
      f=$(dl "$p=$V"); DEBS="$DEBS $f"
      dpkg-deb -x "$f" "$W/qemu10"
    done
    if ldd "$W/qemu10/usr/bin/qemu-system-x86_64" | grep -q 'not found'; then
      echo "setup: qemu $V misses libraries, run.sh will use the system qemu"; rm -rf "$W/qemu10"
    else
      Q10=1; echo "setup: qemu $V"
    fi
  else
    echo "setup: no qemu in bookworm-backports, run.sh will use the system qemu"
  fi
fi
unset APT_CONFIG
# keep only the debs in use (a re-run with FORCE=1 does not download them again)
for f in "$W"/debs/*.deb; do
  case " $DEBS " in *" ${f##*/} "*) ;; *) rm -f "$f";; esac
done

printf '%s\n%s\n' "$KVER" "$STAMP_WANT" > "$W/READY"
step "done: kernel $KVER, cache $W ($(du -sh "$W" | cut -f1)); try: tools/vm/run.sh -- uname -r"
