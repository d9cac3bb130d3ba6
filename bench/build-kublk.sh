#!/bin/bash
# Builds kublk, the kernel selftests' reference ublk server (tools/testing/selftests/ublk), as
# a benchmark peer at /var/tmp/ublk-fast-peers/bin/kublk, from Debian packages only. Host side,
# run as the owner of $PEERS; building needs neither root nor the ublk driver.
#   bench/build-kublk.sh
# Environment: PEERS (default /var/tmp/ublk-fast-peers): everything (the .debs, the extracted
# sources, the processed headers, liburing, the binary) goes under it, nothing into the repo.
# Idempotent: each step is skipped when its output is already there (rm -rf $PEERS/src
# $PEERS/build to redo the extraction and the headers; the binary is always relinked).
#
# Versions used when this was written:
#   linux-source-7.3  7.3.4-1~bpo13+1 (trixie-backports), through the VM's private apt
#                     configuration /var/tmp/ublk-fast-vm/apt/apt.conf (download only);
#   liburing-dev      2.9-1 (trixie main; bookworm's 2.3 is too old: kublk wants the newer
#                     io_uring API). The VM's configuration holds only the two backports
#                     suites, which have no liburing, so a second download-only one for trixie
#                     main is made at $PEERS/apt. Its liburing.a is linked in statically (glibc
#                     stays dynamic: the guest boots the host's root file system).
# Headers: the kernel's include/uapi/linux, run through its own scripts/headers_install.sh
# (as `make headers_install` does for the selftests' -I usr/include) into
# $PEERS/build/usr/include, which comes ahead of the host's /usr/include; asm/ stays the host's.
# Sources: every .c of the selftest but metadata_size.c (a separate tool), as its Makefile
# says: batch.c common.c fault_inject.c file_backed.c kublk.c null.c stripe.c.
#
# Using it (guest, root, modprobe ublk_drv):
#   kublk add -t null -q N -d D [-n ID]                 null target (250 GiB), copying
#   kublk add -t null -q N -d D -z [-n ID]              zero copy (UBLK_F_SUPPORT_ZERO_COPY,
#                                                        register/unregister buffer commands)
#   kublk add -t null -q N -d D --auto_zc [-n ID]       auto zero copy (UBLK_F_AUTO_BUF_REG)
#   kublk add -t loop -q N -d D [-n ID] FILE            loop target over FILE (opened O_DIRECT)
#   kublk add -t loop -q N -d D -z [-n ID] FILE         the same, zero copy
#   kublk add -t loop -q N -d D --auto_zc [-n ID] FILE  the same, auto zero copy
#   kublk del -n ID      (or: kublk del -a, which tries ids 0..254)
#   kublk list [-n ID]; kublk features; kublk help (exit 0; any unknown command, --help
#   included, prints the same usage but exits non-zero)
# Defaults: -q 2 (max 32), -d 128 (max 1024), -n -1 (the driver picks), one I/O thread per
# queue (--nthreads T, --per_io_tasks change that). -z and --auto_zc exclude each other (and
# -u, -g) unless --auto_zc_fallback; the loop target refuses --auto_zc_fallback. --quiet
# silences the debug log; --foreground keeps the server in the foreground.
# `kublk add` daemonizes: it forks, the child calls setsid() and forks again, and the
# grandchild (stdin/out/err closed) runs the server; the parent waits on an eventfd that the
# server signals only after START_DEV has succeeded (the device is LIVE, /dev/ublkbID exists),
# prints `dev id ID: nr_hw_queues N queue_depth D ...` (and `daemon pid PID`) on stdout and exits
# 0, or exits 1 if the device failed to start. So `kublk add ...` returns with the device live;
# its id is in the first line of its output (`kublk add ... | sed -n 's/^dev id \([0-9]*\):.*/\1/p'`).
# `kublk del -n ID` stops the device, waits for the daemon to exit, and deletes it.
set -euo pipefail
P=${PEERS:-/var/tmp/ublk-fast-peers}
VM_APT=/var/tmp/ublk-fast-vm/apt/apt.conf
KPKG=linux-source-7.3
KDIR=$P/src/$KPKG
SELF=$KDIR/tools/testing/selftests/ublk
INC=$P/build/usr/include
LU=$P/liburing
BIN=$P/bin/kublk
mkdir -p "$P/debs" "$P/src" "$P/build" "$P/bin"

WHO=build-kublk
. "$(dirname "$(readlink -f "$0")")/peer-debs.sh"

# 1. The kernel source package (~167 MB), through the VM's apt configuration.
if [ -z "$(deb_of $KPKG)" ]; then
  echo "build-kublk: downloading $KPKG into $P/debs"
  aptget "$VM_APT" download $KPKG
fi
KDEB=$(deb_of $KPKG)
[ -n "$KDEB" ] || { echo "build-kublk: no $KPKG .deb in $P/debs" >&2; exit 1; }
echo "build-kublk: kernel source: $KPKG $(dpkg-deb -f "$KDEB" Version)"

# 2. liburing-dev (and liburing2, which it depends on) from trixie, through a download-only
#    apt configuration of our own, unpacked with dpkg -x (not installed).
debian_suite apt deb trixie
if [ -z "$(deb_of liburing-dev)" ] || [ -z "$(deb_of liburing2)" ]; then
  echo "build-kublk: downloading liburing-dev and liburing2 (trixie) into $P/debs"
  aptget "$P/apt/apt.conf" download liburing-dev liburing2
fi
unpack_liburing "$LU"
LUVER=$(dpkg-deb -f "$(deb_of liburing-dev)" Version)
echo "build-kublk: liburing-dev $LUVER"

# 3. Only what kublk needs out of the kernel tarball, streamed (the inner .tar.xz is never
#    written out): the selftest, the UAPI linux/ headers and the header installer.
if [ ! -f "$SELF/kublk.c" ]; then
  echo "build-kublk: extracting the ublk selftest, include/uapi/linux and scripts/headers_install.sh into $P/src"
  dpkg-deb --fsys-tarfile "$KDEB" | tar -xO ./usr/src/$KPKG.tar.xz |
    tar -xJ -C "$P/src" --wildcards "$KPKG/tools/testing/selftests/ublk/*" \
      "$KPKG/include/uapi/linux/*" "$KPKG/scripts/headers_install.sh" "$KPKG/scripts/unifdef.c"
fi

# 4. The 7.3 UAPI headers, processed as `make headers_install` does (strip __user and the like,
#    unifdef __KERNEL__), so <linux/ublk_cmd.h>, <linux/io_uring.h>, <linux/fs.h> (LBMD_PI_*)
#    and <linux/blkdev.h> (which liburing 2.9's compat.h includes) are the 7.3 ones.
if [ ! -f "$INC/linux/ublk_cmd.h" ]; then
  echo "build-kublk: installing the 7.3 UAPI linux/ headers into $INC"
  gcc -O2 -o "$KDIR/scripts/unifdef" "$KDIR/scripts/unifdef.c"
  n=0; bad=0
  while IFS= read -r h; do
    rel=${h#"$KDIR/include/uapi/"}
    mkdir -p "$(dirname "$INC/$rel")"
    if (cd "$KDIR" && sh scripts/headers_install.sh "$h" "$INC/$rel" 2>/dev/null); then
      n=$((n + 1)); else bad=$((bad + 1)); fi
  done < <(find "$KDIR/include/uapi/linux" -name '*.h')
  echo "build-kublk: $n headers installed, $bad refused by headers_install.sh"
  [ -f "$INC/linux/ublk_cmd.h" ] || { echo "build-kublk: no linux/ublk_cmd.h installed" >&2; exit 1; }
fi

# 5. Compile and link (flags as the selftest's Makefile and lib.mk, but -O2; liburing.a static).
SRCS=$(ls "$SELF"/*.c | grep -v '/metadata_size\.c$')
echo "build-kublk: gcc -O2 $(for s in $SRCS; do basename "$s"; done | paste -sd' ')"
gcc -O2 -Wall -Wno-address-of-packed-member -D_GNU_SOURCE= \
  -I "$INC" -I "$LU/usr/include" -I "$KDIR/tools/testing/selftests" \
  -o "$BIN.tmp" $SRCS "$LU/usr/lib/x86_64-linux-gnu/liburing.a" -lpthread -lm
mv "$BIN.tmp" "$BIN"

echo "build-kublk: built from $(basename "$KDEB") and liburing-dev $LUVER"
echo "kublk: $BIN"
{ "$BIN" help 2>&1 || true; } | head -5
