#!/bin/bash
# Builds libfuse's high-performance passthrough example (example/passthrough_hp.cc) with
# FUSE-over-io_uring support, as a benchmark peer at /var/tmp/ublk-fast-peers/bin/passthrough_hp,
# from Debian packages only. Host side, run as the owner of $PEERS; building needs neither root
# nor the fuse module.
#   bench/build-fuse.sh
# Environment: PEERS (default /var/tmp/ublk-fast-peers): everything (the source package, the
# .debs, the extracted source, the static dependencies, meson's venv, the build, the binary)
# goes under it, nothing into the repo.
# Idempotent: each step is skipped when its output is already there (rm -rf $PEERS/src/fuse-*
# $PEERS/build/libfuse to redo the extraction and the configuration; rm $PEERS/debs/fuse3_*
# to fetch sid's current fuse3; ninja rebuilds only what changed, the binary is always copied).
#
# Versions used when this was written:
#   fuse3 (source)  3.18.3-1 (sid; trixie has only 3.17.2), upstream tarball
#                   fuse3_3.18.3.orig.tar.gz, through a download-only apt configuration for sid
#                   deb-src made at $PEERS/apt-sid (`apt-get source --download-only`, hashes
#                   checked against the signed Sources index). Debian carries no patches on it;
#                   the tarball is unpacked with tar, debian/ is not used.
#   liburing-dev    2.9-1 (trixie main), as for build-kublk.sh, through $PEERS/apt;
#   libnuma-dev     2.0.16-1 (bookworm main, through a third download-only configuration at
#                   $PEERS/apt-bookworm): libfuse builds its io_uring transport only when both
#                   liburing and libnuma are found (numa_alloc_local per queue). Not trixie's
#                   2.0.19: its libnuma.a is built against glibc 2.41 and wants __isoc23_strtoul
#                   and the like, which bookworm's glibc 2.36 lacks (liburing.a has no such
#                   problem: it does not use libc);
#   linux-libc-dev  6.12.117-1 (trixie main), only its <linux/blkdev.h>: liburing 2.9's
#                   <liburing/compat.h> includes it and bookworm's 6.1 headers lack it;
#   meson 1.12.1, ninja 1.13.2 from PyPI, in a venv at $PEERS/venv (made with the host's
#   /usr/bin/python3 3.11); g++ 12.2 (bookworm) compiles passthrough_hp.cc with libfuse's own
#   cpp_std=c++20 as is, no extra flags.
# liburing.a and libnuma.a (copied, with their headers, into $PEERS/fuse-deps, a lib/ with no
# .so beside them and .pc files of our own) and libfuse3.a (-Ddefault_library=static) are linked
# in statically; only glibc, libstdc++ and libgcc_s stay dynamic (the guest boots the host's root
# file system, which has those but not liburing, libnuma or libfuse3). The script checks that
# with ldd and fails otherwise, and fails if meson did not turn on HAVE_URING (libfuse's
# meson.build silently drops io_uring when liburing, libnuma or the SQE128 link test is missing,
# and `-o io_uring` is then accepted and ignored).
#
# Using it (guest, root; kernel built with CONFIG_FUSE_IO_URING):
#   modprobe fuse; echo 1 > /sys/module/fuse/parameters/enable_uring
#   passthrough_hp --foreground --nopassthrough --direct-io \
#       -o io_uring -o io_uring_q_depth=D SRC MNT &
#   ... (umount MNT, or fusermount3 -u MNT; SIGINT/SIGTERM makes it unmount and exit)
# The io_uring options are libfuse's (lib/fuse_lowlevel.c fuse_ll_opts, doc/README.fuse-io-uring;
# both listed by --help under "Fuse lowlevel options"), not passthrough_hp's: `-o io_uring`
# asks for FUSE_OVER_IO_URING at FUSE_INIT, `-o io_uring_q_depth=D` sets the entries per queue
# (default 8). The environment variables FUSE_URING_ENABLE=1 and FUSE_URING_QUEUE_DEPTH=D set the
# same defaults. There is one ring queue per possible CPU (get_nprocs_conf()), each served by
# its own thread pinned to that CPU; --num-threads and --single do not change that (they size
# the /dev/fuse worker loop, which still carries FUSE_INIT and whatever the kernel does not send
# over the ring). Each ring entry has a payload buffer of max_write plus a header, and
# passthrough_hp asks for max_write 4 MiB, so a ring is CPUs x D x ~4 MiB of numa_alloc_local
# memory (mapped, touched only as requests use it). Without the ring libfuse just serves /dev/fuse: with no message at all when the
# kernel does not offer FUSE_OVER_IO_URING in FUSE_INIT (enable_uring 0, or a kernel without it;
# seen on a 6.18 host with enable_uring N: the mount worked, no io_uring fd), with one line on
# stderr (`fuse: failed to start io-uring: ...`; syslog when daemonized) when it offers it but the
# ring setup fails. So check: `ls -l /proc/PID/fd | grep -c io_uring` counts one
# anon_inode:[io_uring] per CPU when the ring is in use (0 without); --debug-fuse also logs
# `starting io-uring q-depth=D` (but slows everything down).
# passthrough_hp's own options (cxxopts, example/passthrough_hp.cc parse_options):
#   --foreground        stay in the foreground (otherwise it daemonizes and logs to syslog)
#   --num-threads N     max libfuse worker threads of the /dev/fuse loop (default -1: libfuse's
#                       10); --single: single-threaded /dev/fuse loop; --clone-fd: one
#                       /dev/fuse fd per worker thread
#   --direct-io         FOPEN_DIRECT_IO on every open (no page cache in the fuse mount)
#   --nopassthrough     pass-through is ON by default: with FUSE_CAP_PASSTHROUGH (kernel >= 6.9,
#                       root) reads and writes go straight from the kernel to the backing file and
#                       never reach the server nor the ring. So benchmark the transport with
#                       --nopassthrough (and --direct-io, or O_DIRECT, which it then honours;
#                       without them --nopassthrough turns the writeback cache on, unless
#                       --nocache).
#   --nocache (attribute/entry timeout 0, no writeback cache), --nosplice, --debug,
#   --debug-fuse (both imply --foreground), -o OPT[,OPT] (mount options; fsname=SRC and
#   default_permissions are added), --help.
# It needs exactly two arguments, SRC (a directory) and MNT.
set -euo pipefail
P=${PEERS:-/var/tmp/ublk-fast-peers}
LU=$P/liburing
NUMA=$P/numa
DEPS=$P/fuse-deps
VENV=$P/venv
B=$P/build/libfuse
BIN=$P/bin/passthrough_hp
MESON_VER=1.12.1
NINJA_VER=1.13.2
mkdir -p "$P/debs" "$P/src" "$P/build" "$P/bin"

WHO=build-fuse
. "$(dirname "$(readlink -f "$0")")/peer-debs.sh"

# 1. meson and ninja, from PyPI into a venv of our own (not system-wide).
if [ ! -x "$VENV/bin/meson" ] || [ ! -x "$VENV/bin/ninja" ]; then
  echo "build-fuse: installing meson $MESON_VER and ninja $NINJA_VER into $VENV"
  PY=/usr/bin/python3; [ -x $PY ] || PY=python3
  $PY -m venv "$VENV"
  "$VENV/bin/pip" install -q "meson==$MESON_VER" "ninja==$NINJA_VER"
fi
echo "build-fuse: meson $("$VENV/bin/meson" --version), ninja $("$VENV/bin/ninja" --version)"

# 2. fuse3's source package from sid, through a download-only deb-src configuration.
debian_suite apt-sid deb-src sid
if ! ls "$P/debs"/fuse3_*.orig.tar.* >/dev/null 2>&1; then
  echo "build-fuse: downloading the fuse3 source package (sid) into $P/debs"
  aptget "$P/apt-sid/apt.conf" source --download-only fuse3
fi
ORIG=$(ls "$P/debs"/fuse3_*.orig.tar.* | grep -v '\.asc$' | sort -V | tail -1)
DSC=$(ls "$P/debs"/fuse3_*.dsc | sort -V | tail -1)
FVER=$(sed -n 's/^Version: //p' "$DSC")
UVER=$(basename "$ORIG" | sed 's/^fuse3_\(.*\)\.orig\.tar\..*$/\1/')
echo "build-fuse: fuse3 $FVER ($(basename "$ORIG"))"
case $UVER in 3.18.*) ;; *) echo "build-fuse: warning: written for fuse3 3.18, this is $UVER" >&2;; esac

# 3. liburing-dev (2.9) and linux-libc-dev from trixie main, through the same download-only
#    configuration as build-kublk.sh ($P/apt), and libnuma-dev from bookworm main (the host's
#    and the guest's glibc), unpacked with dpkg -x.
debian_suite apt deb trixie
need=()
for pkg in liburing-dev liburing2 linux-libc-dev; do
  [ -n "$(deb_of $pkg)" ] || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "build-fuse: downloading ${need[*]} (trixie) into $P/debs"
  aptget "$P/apt/apt.conf" download "${need[@]}"
fi
debian_suite apt-bookworm deb bookworm
if [ -z "$(deb_of libnuma-dev)" ]; then
  echo "build-fuse: downloading libnuma-dev (bookworm) into $P/debs"
  aptget "$P/apt-bookworm/apt.conf" download libnuma-dev
fi
unpack_liburing "$LU"
if [ ! -f "$NUMA/usr/lib/x86_64-linux-gnu/libnuma.a" ]; then
  echo "build-fuse: unpacking libnuma-dev into $NUMA"
  dpkg -x "$(deb_of libnuma-dev)" "$NUMA"
fi
LUVER=$(dpkg-deb -f "$(deb_of liburing-dev)" Version)
NUVER=$(dpkg-deb -f "$(deb_of libnuma-dev)" Version)
LHVER=$(dpkg-deb -f "$(deb_of linux-libc-dev)" Version)
echo "build-fuse: liburing-dev $LUVER, libnuma-dev $NUVER, linux-libc-dev $LHVER (<linux/blkdev.h>)"

# A pkg-config file for a static library in $DEPS.
static_pc() { # NAME VERSION DESCRIPTION LIB
  cat > "$DEPS/lib/pkgconfig/$1.pc" <<EOF
prefix=$DEPS
libdir=\${prefix}/lib
includedir=\${prefix}/include

Name: $1
Version: $2
Description: $3
Libs: -L\${libdir} -l$4
Cflags: -I\${includedir}
EOF
}

# 4. $DEPS: the two static libraries alone in their lib/ (so -luring and -lnuma cannot pick a
#    .so), their headers plus linux/blkdev.h in include/, and .pc files pointing there.
if [ ! -f "$DEPS/lib/pkgconfig/numa.pc" ]; then
  echo "build-fuse: gathering the static liburing and libnuma into $DEPS"
  rm -rf "$DEPS"
  mkdir -p "$DEPS/lib/pkgconfig" "$DEPS/include/linux"
  cp "$LU/usr/lib/x86_64-linux-gnu/liburing.a" "$NUMA/usr/lib/x86_64-linux-gnu/libnuma.a" "$DEPS/lib/"
  cp -r "$LU/usr/include/." "$NUMA/usr/include/." "$DEPS/include/"
  dpkg-deb --fsys-tarfile "$(deb_of linux-libc-dev)" | tar -xO ./usr/include/linux/blkdev.h \
    > "$DEPS/include/linux/blkdev.h"
  static_pc liburing "${LUVER%%-*}" "io_uring library (static, from liburing-dev $LUVER)" uring
  static_pc numa "${NUVER%%-*}" "NUMA policy library (static, from libnuma-dev $NUVER)" numa
fi

# 5. The upstream tarball, unpacked with tar.
SRCDIR=$P/src/$(tar -tf "$ORIG" | sed -n '1s|/.*||p')  # (sed, not head: no SIGPIPE)
if [ ! -f "$SRCDIR/example/passthrough_hp.cc" ]; then
  echo "build-fuse: unpacking $(basename "$ORIG") into $P/src"
  tar -xf "$ORIG" -C "$P/src"
fi

# 6. Configure: static libfuse3, the examples, no utils/tests; io_uring must be on.
if [ ! -f "$B/build.ninja" ]; then
  echo "build-fuse: meson setup $B"
  PKG_CONFIG_PATH=$DEPS/lib/pkgconfig PATH=$VENV/bin:$PATH \
    meson setup "$B" "$SRCDIR" --prefix=/usr --buildtype=release -Ddefault_library=static \
      -Denable-io-uring=true -Dexamples=true -Dutils=false -Dtests=false
fi
if ! grep -qx '#define HAVE_URING' "$B/fuse_config.h"; then
  echo "build-fuse: HAVE_URING is not set in $B/fuse_config.h: libfuse would be built without" \
       "FUSE-over-io_uring; meson's findings:" >&2
  grep -i 'liburing\|numa\|SQE128' "$B/meson-logs/meson-log.txt" | tail -20 >&2 || true
  exit 1
fi
echo "build-fuse: HAVE_URING set"

# 7. Build passthrough_hp (and the static libfuse3 under it).
PATH=$VENV/bin:$PATH ninja -C "$B" example/passthrough_hp
nm "$B/example/passthrough_hp" | grep ' T fuse_uring_start$' >/dev/null ||
  { echo "build-fuse: passthrough_hp has no fuse_uring_start: no io_uring in it" >&2; exit 1; }
cp "$B/example/passthrough_hp" "$BIN.tmp"
mv "$BIN.tmp" "$BIN"

# 8. Only glibc, libstdc++ and libgcc_s may be dynamic.
echo "build-fuse: ldd $BIN"
ldd "$BIN" | sed 's/^/  /'
bad=$(ldd "$BIN" | awk '{print $1}' |
  grep -Ev '^(linux-vdso\.so\.1|libstdc\+\+\.so\.6|libm\.so\.6|libdl\.so\.2|libpthread\.so\.0|librt\.so\.1|libgcc_s\.so\.1|libc\.so\.6|/lib64/ld-linux-x86-64\.so\.2)$' || true)
[ -z "$bad" ] || { echo "build-fuse: unexpected shared libraries: $bad" >&2; exit 1; }

echo "build-fuse: built from fuse3 $FVER, liburing-dev $LUVER, libnuma-dev $NUVER"
echo "passthrough_hp: $BIN"
help=$("$BIN" --help)   # (not piped into head: SIGPIPE under pipefail)
case $help in *Usage:*"-o io_uring "*) ;; *) echo "build-fuse: unexpected --help output" >&2; exit 1;; esac
printf '%s\n' "$help" | sed -n '1,2p;/io_uring/p'
