#!/usr/bin/env bash
# Assembles the Pimesh image from the cached Debian root filesystem and this checkout:
#   ARCH=arm64  out/pimesh-<version>-arm64.img.xz and .sha256 — an SD card image with a
#               Raspberry Pi boot partition (FAT32) and the root filesystem (ext4), built
#               without loop devices or mounts;
#   ARCH=amd64  out/pimesh-<version>-amd64.root/ — the same system as a folder, for tests
#               in systemd-nspawn.
# Binaries come from out/bin/<target>/ (make cross for arm64, cargo for amd64).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
. "$here/lib.sh"

ARCH=${ARCH:-arm64}
VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$repo/Cargo.toml" | head -1)
case "$ARCH" in
  arm64) bin_dir="$repo/out/bin/aarch64" ;;
  amd64) bin_dir="$repo/out/bin/x86_64" ;;
  *) die "ARCH must be arm64 or amd64, not '$ARCH'" ;;
esac
# The MBR disk identifier ("Pime"); partitions are PARTUUID=50696d65-01 and -02.
DISK_ID=50696d65
BOOT_MIB=256
FIRST_MIB=4

"$here/host-deps.sh" >&2
rootfs_tar=$(ARCH=$ARCH "$here/rootfs.sh")
k3s_bin=$(ARCH=$ARCH "$here/k3s.sh")
for bin in pimesh-supervisor pimesh-proxy pimesh-control; do
  [ -x "$bin_dir/$bin" ] || die "$bin_dir/$bin is missing: build it first (make cross)"
done

work="$repo/out/work-$ARCH"
stage="$work/root"
rm -rf "$work"
mkdir -p "$stage"
log "assemble: $ARCH image $VERSION from $(basename "$rootfs_tar")"
start=$(date +%s)
tar -C "$stage" --numeric-owner --xattrs --xattrs-include='*' -xpf "$rootfs_tar"

# --- Pimesh's files --------------------------------------------------------------------
install -d "$stage/usr/share/pimesh" "$stage/usr/share/doc/pimesh"
install -m 0755 "$bin_dir/pimesh-supervisor" "$bin_dir/pimesh-proxy" "$bin_dir/pimesh-control" "$stage/usr/bin/"
install -m 0644 "$repo"/systemd/*.service "$repo"/systemd/*.socket "$stage/usr/lib/systemd/system/"
cp -a "$here/overlay/." "$stage/"
install -D -m 0644 "$repo/systemd/pimesh.sysusers" "$stage/usr/lib/sysusers.d/pimesh.conf"
# The users exist in the image itself (systemd-sysusers.service would make them at boot).
systemd-sysusers --root="$stage" "$stage/usr/lib/sysusers.d/pimesh.conf"
install -D -m 0644 "$repo/systemd/pimesh.tmpfiles" "$stage/usr/lib/tmpfiles.d/pimesh.conf"
install -m 0644 "$repo/configs/pimesh.toml" "$stage/usr/share/pimesh/pimesh.toml.template"
install -m 0644 "$repo/configs/pimesh.example.toml" "$stage/usr/share/pimesh/pimesh.example.toml"
install -m 0644 "$repo/configs/cluster.example.toml" "$stage/usr/share/pimesh/cluster.example.toml"
install -m 0644 "$repo/configs/supervisor.toml" "$stage/usr/share/pimesh/supervisor.toml"
install -m 0644 "$repo/README.md" "$stage/usr/share/doc/pimesh/README.md"
if [ -n "$k3s_bin" ]; then
  install -D -m 0755 "$k3s_bin" "$stage/usr/local/bin/k3s"
fi
systemctl --root="$stage" --quiet enable \
  pimesh-supervisor.service pimesh-growroot.service pimesh-ssh-hostkeys.service \
  systemd-networkd.service systemd-resolved.service chrony.service
# e2scrub checks ext4 volumes through LVM snapshots; a node has no LVM, so its units only
# cost boot time (5 s of an emulated boot) and a weekly wake-up.
systemctl --root="$stage" --quiet mask e2scrub_reap.service e2scrub_all.timer
# A container has no partitions to fsck or remount.
[ "$ARCH" = amd64 ] && systemctl --root="$stage" --quiet mask \
  systemd-remount-fs.service pimesh-growroot.service

kver=$(ls "$stage/usr/lib/modules" 2>/dev/null | head -1 || true)
if [ "$ARCH" = arm64 ]; then
  # --- trim what a Pi appliance never uses, then re-index the modules ------------------
  before=$(du -sm "$stage" | cut -f1)
  while read -r pattern; do
    # shellcheck disable=SC2086 # the pattern is a glob on purpose
    rm -rf "$stage"/$pattern
  done < <(package_list "$here/trim-arm64.txt")
  # Every supported board: wired Ethernet in its device tree, and the drivers of its
  # Ethernet, SD card and USB built in, in the initramfs or (Ethernet) still on the root
  # filesystem. Before depmod, so that a module the trim removed still has its aliases.
  log "assemble: checking the boards' device trees and drivers"
  "$here/check-boards.py" --dtbs "$stage/boot/firmware" --root "$stage" \
    --initrd "$stage/boot/firmware/initrd.img-$kver" >&2
  depmod -b "$stage" "$kver"
  log "assemble: trimmed $((before - $(du -sm "$stage" | cut -f1))) MiB"

  # The boot partition holds the seed, without which the node cannot start: systemd waits
  # up to 10 min for its device instead of the default 90 s before it gives up (emergency
  # mode). On a Pi the card is there at once; under emulation on a loaded host, udev has
  # taken longer than 90 s to make the by-partuuid link.
  cat > "$stage/etc/fstab" <<FSTAB
# <file system>          <mount point>   <type> <options>                 <dump> <pass>
PARTUUID=$DISK_ID-02     /               ext4   defaults,noatime,commit=30  0      1
PARTUUID=$DISK_ID-01     /boot/firmware  vfat   defaults,noatime,umask=0022,x-systemd.device-timeout=10min 0      0
FSTAB
  # Keep the kernel package's own boot-partition hook writing what we write below.
  printf 'ROOTPART=PARTUUID=%s-02\nCONSOLES="ttyS1,115200 tty0"\n' "$DISK_ID" \
    > "$stage/etc/default/raspi-firmware"
fi

binaries_json=$(cd "$stage/usr/bin" && sha256sum pimesh-supervisor pimesh-proxy pimesh-control \
  | jq -R 'split("  ") | {(.[1]): .[0]}' | jq -s add)
k3s_json=$(if [ -n "$k3s_bin" ]; then
  jq -n --arg v "${K3S_BIN:+$("$k3s_bin" --version 2>/dev/null | head -1 || echo given)}" \
    --arg pinned "$(sed -n 's/^K3S_VERSION=//p' "$here/k3s.sh")" \
    '{present: true, path: "/usr/local/bin/k3s", version: (if $v == "" then $pinned else $v end)}'
else
  jq -n --arg pinned "$(sed -n 's/^K3S_VERSION=//p' "$here/k3s.sh")" \
    '{present: false, pinned: $pinned, reason: "not downloadable on the build machine and no K3S_BIN given"}'
fi)
jq -n --arg version "$VERSION" --arg arch "$ARCH" --arg suite "$SUITE" --arg kernel "$kver" \
  --arg commit "$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
  --arg built "$(date -u +%FT%TZ)" --argjson binaries "$binaries_json" --argjson k3s "$k3s_json" \
  --arg rootfs "$(basename "$rootfs_tar")" \
  '{name: "pimesh", version: $version, arch: $arch, debian: $suite, kernel: $kernel,
    git_commit: $commit, built_at: $built, rootfs: $rootfs, binaries: $binaries, k3s: $k3s}' \
  > "$stage/usr/share/pimesh/manifest.json"

if [ "$ARCH" = amd64 ]; then
  out="$repo/out/pimesh-$VERSION-amd64.root"
  rm -rf "$out"
  mv "$stage" "$out"
  rm -rf "$work"
  log "assemble: $out in $(( $(date +%s) - start ))s"
  exit 0
fi

# --- boot partition (FAT32) ------------------------------------------------------------
boot="$work/boot"
mkdir -p "$boot"
# raspi-firmware's hook filled /boot/firmware: firmware, DTBs, kernel and initrd.
find "$stage/boot/firmware" -mindepth 1 -maxdepth 1 -exec mv -t "$boot" {} +
rm -f "$boot/config.txt" "$boot/cmdline.txt"
[ -f "$boot/vmlinuz-$kver" ] && [ -f "$boot/initrd.img-$kver" ] \
  || die "the root filesystem has no kernel $kver and initrd on /boot/firmware"
cat > "$boot/config.txt" <<CONFIG
# Raspberry Pi firmware configuration (Pimesh). The kernel package rewrites this file
# when the kernel is updated; extra settings belong in /etc/default/raspi-firmware-custom.
arm_64bit=1
enable_uart=1
upstream_kernel=1
kernel=vmlinuz-$kver
initramfs initrd.img-$kver
CONFIG
echo "console=ttyS1,115200 console=tty0 root=PARTUUID=$DISK_ID-02 rootfstype=ext4 rw fsck.repair=yes net.ifnames=0 rootwait $(cat "$here/overlay/etc/default/raspi-extra-cmdline")" \
  > "$boot/cmdline.txt"
install -m 0644 "$repo/configs/pimesh.toml" "$boot/pimesh.toml"
rm -f "$work/boot.img"
mkfs.vfat -C -F 32 -n PIMESH-BOOT -i "$DISK_ID" "$work/boot.img" $((BOOT_MIB * 1024)) >/dev/null
mcopy -s -p -m -i "$work/boot.img" "$boot"/* ::/
# Where `pimeshctl image configure --trust` writes the site's anchor: made here, by
# mtools, because the FAT crate pimeshctl uses writes folders fsck.vfat calls malformed.
mmd -i "$work/boot.img" ::/pimesh-trust
fsck.vfat -n "$work/boot.img" >/dev/null || die "the boot partition fails fsck.vfat -n"

# --- root partition (ext4) -------------------------------------------------------------
used_mib=$(du -sm "$stage" | cut -f1)
root_mib=$(( used_mib * 13 / 10 + 128 ))
mkfs.ext4 -q -F -L pimesh-root -m 2 -E root_owner=0:0 -d "$stage" "$work/root.img" "${root_mib}M"

# --- disk: MBR with a fixed identifier, then both partitions at their offsets -----------
image="$repo/out/pimesh-$VERSION-arm64.img"
total_mib=$(( FIRST_MIB + BOOT_MIB + root_mib ))
rm -f "$image" "$image.xz" "$image.xz.sha256"
truncate -s "${total_mib}M" "$image"
sfdisk -q "$image" <<TABLE
label: dos
label-id: 0x$DISK_ID
unit: sectors

start=$((FIRST_MIB * 2048)), size=$((BOOT_MIB * 2048)), type=c, bootable
start=$(((FIRST_MIB + BOOT_MIB) * 2048)), type=83
TABLE
dd if="$work/boot.img" of="$image" bs=1M seek="$FIRST_MIB" conv=notrunc,sparse status=none
dd if="$work/root.img" of="$image" bs=1M seek="$((FIRST_MIB + BOOT_MIB))" conv=notrunc,sparse status=none
log "assemble: raw image $total_mib MiB (root ${used_mib} MiB used of ${root_mib} MiB); compressing"
xz -T2 -6 -f -k "$image"
(cd "$repo/out" && sha256sum "$(basename "$image").xz" > "$(basename "$image").xz.sha256")
rm -f "$image"
rm -rf "$work"
log "assemble: out/$(basename "$image").xz $(du -m "$image.xz" | cut -f1) MiB in $(( $(date +%s) - start ))s"
