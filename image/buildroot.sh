#!/usr/bin/env bash
# Builds (or finds in the cache) the cross-compilation build root and prints its path: a
# Debian root of the image's release with Debian's Rust and the arm64 standard library, so
# that the binaries link against the image's own glibc.
#
# The toolchain is the release's own `rustc-web` (1.96, kept current by the release's point
# updates for the browsers), not backports' `rustc`: backports indexes one version per
# architecture and its arm64 build can lag the amd64 one (5 December: rustc 1.98.1 for
# amd64, libstd-rust-dev 1.97.1 for arm64), and the compiler and the arm64 standard library
# must be the same build. A point release moves every architecture together.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"

packages=(rustc-web cargo-web libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu libc6-dev-arm64-cross
          gcc libc6-dev pkg-config ca-certificates)
key=$(input_key "$here/buildroot.sh" "$SUITE" "${packages[*]}")
root="$PIMESH_CACHE/buildroot/$SUITE-$key"
if [ -f "$root/.pimesh-complete" ]; then
  log "buildroot: cached $root"
  echo "$root"
  exit 0
fi

"$here/host-deps.sh" >&2
mkdir -p "$PIMESH_CACHE/buildroot"
tmp="$root.partial-$$"
rm -rf "$tmp"
trap 'rm -rf "$tmp"' EXIT
log "buildroot: building $SUITE with ${packages[*]} -> $root"
start=$(date +%s)
mmdebstrap --mode=root --variant=apt --architectures=amd64,arm64 \
  --include=ca-certificates \
  --customize-hook="mkdir -p \"\$1/usr/local/share/ca-certificates\"" \
  --customize-hook='for c in /usr/local/share/ca-certificates/*.crt; do [ -e "$c" ] && cp "$c" "$1/usr/local/share/ca-certificates/"; done; chroot "$1" update-ca-certificates >/dev/null' \
  --customize-hook="chroot \"\$1\" apt-get install -y -q --no-install-recommends ${packages[*]}" \
  --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/archives/*.deb' \
  "$SUITE" "$tmp" \
  "deb $DEBIAN_MIRROR $SUITE main" >&2
touch "$tmp/.pimesh-complete"
rm -rf "$root"
mv "$tmp" "$root"
trap - EXIT
prune_cache "$root" "$PIMESH_CACHE/buildroot/$SUITE-"
log "buildroot: built in $(( $(date +%s) - start ))s"
chroot "$root" rustc --version >&2
echo "$root"
