# Shared helpers for the image scripts. Source it; it defines functions only.

# Where slow, input-keyed artefacts live across checkouts. Never required: a cold run
# rebuilds whatever is missing.
PIMESH_CACHE=${PIMESH_CACHE:-/var/cache/pimesh}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEBIAN_SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
SUITE=${SUITE:-trixie}

log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Prints the non-comment lines of package list files, one per line.
package_list() { sed -e 's/#.*//' -e 's/[[:space:]]//g' "$@" | grep -v '^$'; }

# Prints a short hash over the contents of files and over strings: the cache key of
# whatever they produce. File paths are not part of it, so every checkout shares the key.
input_key() {
  local item
  for item in "$@"; do
    if [ -f "$item" ]; then sha256sum < "$item"; else printf '%s\n' "$item"; fi
  done | sha256sum | cut -c1-16
}

# Removes the cached siblings of $1 (same prefix, other keys): superseded inputs.
prune_cache() {
  local keep=$1 prefix=$2 entry
  for entry in "$prefix"*; do
    [ "$entry" = "$keep" ] || [ ! -e "$entry" ] || { log "cache: removing superseded $entry"; rm -rf "$entry"; }
  done
}

# Host CA certificates (this machine reaches the registries through an intercepting proxy)
# copied into a root filesystem so that apt and cargo inside it trust the same roots.
copy_host_cas() {
  local root=$1
  if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
    mkdir -p "$root/usr/local/share/ca-certificates"
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
  fi
}
