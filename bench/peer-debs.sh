# Sourced by bench/build-kublk.sh and bench/build-fuse.sh: Debian packages for the benchmark
# peers, fetched (never installed) into $P/debs through download-only apt configurations of
# our own under $P. The caller sets P (the peers' directory) and WHO (its name, for messages).

. "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/../tools/vm/apt-private.sh"

# The configuration for one Debian suite (deb or deb-src, main), made at $P/DIR if missing.
debian_suite() { # DIR deb|deb-src SUITE
  [ -f "$P/$1/apt.conf" ] && return 0
  echo "$WHO: making a download-only apt configuration for $3 $2 at $P/$1"
  apt_private "$P/$1" "$2 [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $3 main"
  APT_CONFIG=$P/$1/apt.conf apt-get update >/dev/null
}

# apt-get (download, or source --download-only) run in $P/debs; on failure the lists are
# updated and it is tried once more. As root apt warns that _apt cannot write there: harmless.
aptget() { # APT_CONF apt-get-arguments...
  local conf=$1; shift
  (cd "$P/debs" && APT_CONFIG=$conf apt-get "$@" 2>&1 | grep -v 'unsandboxed') ||
  { echo "$WHO: updating the lists of $conf and retrying"
    APT_CONFIG=$conf apt-get update >/dev/null
    (cd "$P/debs" && APT_CONFIG=$conf apt-get "$@" 2>&1 | grep -v 'unsandboxed'); }
}

# The newest .deb of PACKAGE in $P/debs (empty if none).
deb_of() { ls "$P/debs/$1"_*.deb 2>/dev/null | sort -V | tail -1; }

# liburing-dev and liburing2, unpacked into DIR with dpkg -x (not installed), if not yet.
unpack_liburing() { # DIR
  [ -f "$1/usr/lib/x86_64-linux-gnu/liburing.a" ] && return 0
  echo "$WHO: unpacking liburing into $1"
  dpkg -x "$(deb_of liburing-dev)" "$1"
  dpkg -x "$(deb_of liburing2)" "$1"
}
