#!/usr/bin/env bash
# Builds (or finds in the cache) the base Debian root filesystem of the image as a tarball
# and prints its path. ARCH=arm64 is the Raspberry Pi image; ARCH=amd64 the same system for
# fast tests in systemd-nspawn. The tarball holds only Debian packages and their
# configuration; Pimesh's own files are layered on by assemble.sh, so a code change never
# rebuilds this (13 minutes under emulation).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"

ARCH=${ARCH:-arm64}
case "$ARCH" in arm64|amd64) ;; *) die "ARCH must be arm64 or amd64, not '$ARCH'";; esac

key=$(input_key "$here/rootfs.sh" "$here/packages.txt" "$here/packages-$ARCH.txt" \
  "$here/initramfs-modules" "$SUITE" "$ARCH")
out="$PIMESH_CACHE/rootfs/$ARCH-$SUITE-$key.tar"
if [ -s "$out" ]; then
  log "rootfs: cached $out"
  echo "$out"
  exit 0
fi

"$here/host-deps.sh" >&2
mkdir -p "$PIMESH_CACHE/rootfs"
include=$(package_list "$here/packages.txt" "$here/packages-$ARCH.txt" | paste -sd, -)
components=main
sources=()
if [ "$ARCH" = arm64 ]; then
  components=main,non-free-firmware
  # The kernel alone comes from backports (packages-arm64.txt names it with /trixie-backports):
  # backports' default priority keeps every other package on trixie.
  sources+=("deb $DEBIAN_MIRROR $SUITE-backports main")
fi
tmp="${out%.tar}.partial-$$.tar"
trap 'rm -f "$tmp"' EXIT
log "rootfs: building $ARCH ($SUITE) -> $out"
start=$(date +%s)
# Documentation, manuals and translations are not needed on an appliance; copyright
# notices stay.
mmdebstrap --mode=root --format=tar --variant=minbase --arch="$ARCH" --components="$components" \
  --include="$include" \
  --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/info/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-include=/usr/share/locale/locale.alias' \
  --dpkgopt='path-exclude=/usr/share/lintian/*' \
  --dpkgopt=force-confdef --dpkgopt=force-confold \
  --setup-hook='mkdir -p "$1/etc/initramfs-tools/conf.d" "$1/etc/default"' \
  --setup-hook="cp '$here/initramfs-modules' \"\$1/etc/initramfs-tools/modules\"" \
  --setup-hook='printf "MODULES=list\nCOMPRESS=zstd\n" > "$1/etc/initramfs-tools/conf.d/pimesh.conf"' \
  --setup-hook='printf "ROOTPART=LABEL=pimesh-root\nCONSOLES=\"ttyS1,115200 tty0\"\n" > "$1/etc/default/raspi-firmware"' \
  --customize-hook='echo pimesh > "$1/etc/hostname"' \
  --customize-hook='printf "uninitialized\n" > "$1/etc/machine-id"; rm -f "$1/var/lib/dbus/machine-id"' \
  --customize-hook='rm -f "$1"/etc/ssh/ssh_host_*' \
  --customize-hook='chroot "$1" usermod -p "*" root' \
  --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/var/log/*.log' \
  "$SUITE" "$tmp" \
  "deb $DEBIAN_MIRROR $SUITE ${components//,/ }" \
  "deb $DEBIAN_MIRROR $SUITE-updates ${components//,/ }" \
  "deb $DEBIAN_SECURITY_MIRROR $SUITE-security ${components//,/ }" \
  "${sources[@]}" >&2
mv "$tmp" "$out"
trap - EXIT
prune_cache "$out" "$PIMESH_CACHE/rootfs/$ARCH-$SUITE-"
log "rootfs: built in $(( $(date +%s) - start ))s, $(du -h "$out" | cut -f1)"
echo "$out"
