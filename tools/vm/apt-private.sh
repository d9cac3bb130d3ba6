# Sourced by tools/vm/setup.sh and bench/peer-debs.sh: a download-only apt configuration of
# our own, so packages can be fetched without touching the host's apt state or installing.

# apt_private DIR SOURCES-LINE...: writes DIR/apt.conf (and the directories it names) whose
# sources are the given sources.list lines. Use it with APT_CONFIG=DIR/apt.conf; the caller
# runs `apt-get update`.
apt_private() {
  local d=$1; shift
  mkdir -p "$d/etc/sources.list.d" "$d/etc/preferences.d" "$d/lists/partial" \
    "$d/cache/archives/partial"
  touch "$d/status" "$d/etc/preferences"
  printf '%s\n' "$@" > "$d/etc/sources.list"
  cat > "$d/apt.conf" <<CONF
Dir::Etc::SourceList "$d/etc/sources.list";
Dir::Etc::SourceParts "$d/etc/sources.list.d";
Dir::Etc::Preferences "$d/etc/preferences";
Dir::Etc::PreferencesParts "$d/etc/preferences.d";
Dir::State::Lists "$d/lists";
Dir::State::status "$d/status";
Dir::Cache "$d/cache";
APT::Architecture "amd64";
Acquire::Languages "none";
CONF
}
