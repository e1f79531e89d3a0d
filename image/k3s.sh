#!/usr/bin/env bash
# Finds K3s for the image and prints its path, or prints nothing when it cannot be had.
#   K3S_BIN=/path   use this binary (its version is whatever it is; recorded as given)
#   otherwise       download the pinned release and check its pinned SHA-256
# A download that fails or does not match is never used.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"

# Pinned release. The checksum is the one K3s publishes in sha256sum-arm64.txt for it.
K3S_VERSION=v1.34.3+k3s1
K3S_SHA256_ARM64=fa37b06df7ae82b46de6679a8682b6ece2adf531709bed6299086716c1038147
ARCH=${ARCH:-arm64}

if [ -n "${K3S_BIN:-}" ]; then
  [ -x "$K3S_BIN" ] || die "K3S_BIN=$K3S_BIN is not an executable file"
  log "k3s: using K3S_BIN=$K3S_BIN"
  echo "$K3S_BIN"
  exit 0
fi
[ "$ARCH" = arm64 ] || { log "k3s: no pinned K3s for $ARCH"; exit 0; }

cached="$PIMESH_CACHE/k3s/$K3S_VERSION/k3s-arm64"
if [ -x "$cached" ] && echo "$K3S_SHA256_ARM64  $cached" | sha256sum -c --quiet 2>/dev/null; then
  echo "$cached"
  exit 0
fi
url="https://github.com/k3s-io/k3s/releases/download/${K3S_VERSION//+/%2B}/k3s-arm64"
mkdir -p "$(dirname "$cached")"
if curl -fsSL --connect-timeout 10 --max-time 600 -o "$cached.partial" "$url" 2>/dev/null \
   && echo "$K3S_SHA256_ARM64  $cached.partial" | sha256sum -c --quiet; then
  chmod 0755 "$cached.partial"
  mv "$cached.partial" "$cached"
  log "k3s: downloaded $K3S_VERSION, checksum verified"
  echo "$cached"
else
  rm -f "$cached.partial"
  log "k3s: ***************************************************************"
  log "k3s: K3s $K3S_VERSION could not be downloaded here; the image is built"
  log "k3s: WITHOUT K3s (recorded in /usr/share/pimesh/manifest.json)."
  log "k3s: Set K3S_BIN=/path/to/k3s-arm64 to include a binary you have."
  log "k3s: ***************************************************************"
fi
