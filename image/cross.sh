#!/usr/bin/env bash
# Builds the release binaries for aarch64 in the build root (Debian's Rust, the image's
# glibc) and copies them to out/bin/aarch64/. Cargo's own cache and target folder live in
# the build cache, so a fresh checkout rebuilds only Pimesh's crates.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
. "$here/lib.sh"

root=$("$here/buildroot.sh")
target=aarch64-unknown-linux-gnu
out="$repo/out/bin/aarch64"
cargo_home="$PIMESH_CACHE/cargo-home"
target_dir="$PIMESH_CACHE/cross-target"
mkdir -p "$out" "$cargo_home" "$target_dir" "$root/src" "$root/cargo-home" "$root/target"

log "cross: building release binaries for $target in $root"
start=$(date +%s)
# Mounts made inside the private mount namespace vanish when the build exits.
unshare --mount --propagation private -- sh -euc '
  root=$1 repo=$2 cargo_home=$3 target_dir=$4 target=$5
  mount --rbind /dev "$root/dev"
  mount -t proc proc "$root/proc"
  mount --bind "$repo" "$root/src"
  mount --bind "$cargo_home" "$root/cargo-home"
  mount --bind "$target_dir" "$root/target"
  cp /etc/resolv.conf "$root/etc/resolv.conf"
  exec chroot "$root" env -i PATH=/usr/bin:/bin HOME=/root \
    CARGO_HOME=/cargo-home CARGO_TARGET_DIR=/target \
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
    CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc \
    CARGO_TERM_COLOR=never \
    sh -c "cd /src && cargo build --release --locked --target $target -p pimesh-supervisor -p pimesh-proxy -p pimesh-control"
' sh "$root" "$repo" "$cargo_home" "$target_dir" "$target" >&2
for bin in pimesh-supervisor pimesh-proxy pimesh-control; do
  install -m 0755 "$target_dir/$target/release/$bin" "$out/$bin"
done
log "cross: built in $(( $(date +%s) - start ))s: $(cd "$out" && ls | tr '\n' ' ')"
