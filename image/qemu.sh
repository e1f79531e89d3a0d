#!/usr/bin/env bash
# Boots a Pimesh arm64 disk in QEMU (-M virt, TCG) with the kernel and initrd taken from
# the disk's own boot partition, so the boot is that of the SD card minus the Pi firmware.
#   qemu.sh DISK            DISK: a raw image file (it is written to: pass a copy)
# Environment:
#   SSH_PORT (2222)         host 127.0.0.1 port forwarded to the node's SSH
#   STATUS_PORT (4200)      host 127.0.0.1 port forwarded to the node's status API
#                           (through pimesh-status-lan.socket, pulled in for this boot)
#   CONSOLE (stdio)         `stdio`, or a file to write the serial console to
#   APPEND                  extra kernel command line (e.g. systemd.set_credential=...)
#   MEM (2048), CPUS (2)
#   NVME_DISK               a raw image file attached as an NVMe disk (serial pimesh-nvme),
#                           as a Pi 5's M.2 HAT holds one
#   WATCHDOG                1: an Intel 6300ESB watchdog card (QEMU's PCI watchdog, a
#                           stand-in for the Pi's own) that resets the VM when it fires;
#                           with -no-reboot, as every boot here, QEMU then exits
#   DISK_NBD                a unix socket where an NBD server serves DISK (the power-cut
#                           soak's disk with a volatile write cache): the VM's disk is that
#                           server's, DISK is only read for the kernel and initrd
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"

disk=${1:?usage: qemu.sh DISK}
[ -f "$disk" ] || die "$disk: no such disk image"
SSH_PORT=${SSH_PORT:-2222}
STATUS_PORT=${STATUS_PORT:-4200}
CONSOLE=${CONSOLE:-stdio}
boot_offset=$((4 * 1024 * 1024))

# The kernel and initrd named by the boot partition's config.txt.
# BOOT_FROM: a raw image holding the boot partition when DISK is a qcow2 overlay on it.
boot_disk=${BOOT_FROM:-$disk}
scratch="$disk.boot"
mkdir -p "$scratch"
mcopy -n -i "$boot_disk@@$boot_offset" ::/config.txt "$scratch/config.txt"
kernel=$(sed -n 's/^kernel=//p' "$scratch/config.txt")
initrd=$(sed -n 's/^initramfs \([^ ]*\).*/\1/p' "$scratch/config.txt")
mcopy -n -i "$boot_disk@@$boot_offset" "::/$kernel" "$scratch/kernel"
mcopy -n -i "$boot_disk@@$boot_offset" "::/$initrd" "$scratch/initrd"
mcopy -n -i "$boot_disk@@$boot_offset" ::/cmdline.txt "$scratch/cmdline.txt"
# The Pi's console settings swapped for QEMU virt's PL011 UART.
cmdline="$(sed -e 's/console=[^ ]*//g' "$scratch/cmdline.txt" | tr -s ' ') console=ttyAMA0,115200"
# Emulation only: with KASLR on a Cortex-A72 the kernel forces page table isolation, and
# TCG flushes its whole software TLB on each of KPTI's address-space switches (every entry
# to the kernel): boots take twice as long. An emulated CPU has no side channels to close,
# so QEMU boots without KPTI and the Spectre mitigations; the card's cmdline.txt keeps both.
cmdline+=" kpti=0 mitigations=off"
cmdline+=" systemd.wants=pimesh-status-lan.socket ${APPEND:-}"

# A second network card on a site LAN shared with other VMs, when asked for: QEMU socket
# networking over 127.0.0.1 only: LAN_CONNECT=127.0.0.1:PORT of a hub (as the tests run,
# tests/harness/lan_hub.py) or of a VM started with LAN_LISTEN=127.0.0.1:PORT; LAN_MAC
# tells the cards apart. Nothing on it reaches the host's network.
lan=()
if [ -n "${LAN_LISTEN:-}" ]; then
  lan=(-netdev "socket,id=lan,listen=$LAN_LISTEN" -device "virtio-net-pci,netdev=lan,mac=${LAN_MAC:?}")
elif [ -n "${LAN_CONNECT:-}" ]; then
  lan=(-netdev "socket,id=lan,connect=$LAN_CONNECT" -device "virtio-net-pci,netdev=lan,mac=${LAN_MAC:?}")
fi

nvme=()
if [ -n "${NVME_DISK:-}" ]; then
  [ -f "$NVME_DISK" ] || die "$NVME_DISK: no such disk image"
  nvme=(-drive "file=$NVME_DISK,if=none,id=nv,format=raw" -device "nvme,serial=pimesh-nvme,drive=nv")
fi

watchdog=()
if [ "${WATCHDOG:-0}" = 1 ]; then
  watchdog=(-device i6300esb -action watchdog=reset)
fi

drive="file=$disk,format=${DISK_FORMAT:-raw}"
if [ -n "${DISK_NBD:-}" ]; then
  drive="file=nbd+unix:///?socket=$DISK_NBD,format=raw"
fi

case "$CONSOLE" in
  stdio) serial=(-serial mon:stdio) ;;
  *) serial=(-serial "file:$CONSOLE" -monitor none) ;;
esac
exec qemu-system-aarch64 -M virt -cpu cortex-a72 -smp "${CPUS:-2}" -m "${MEM:-2048}" \
  -accel tcg,thread=multi -display none -no-reboot \
  -kernel "$scratch/kernel" -initrd "$scratch/initrd" -append "$cmdline" \
  -drive "$drive,if=none,id=disk,cache=${DISK_CACHE:-writeback}" -device virtio-blk-pci,drive=disk \
  -netdev "user,id=net0,hostfwd=tcp:127.0.0.1:$SSH_PORT-:22,hostfwd=tcp:127.0.0.1:$STATUS_PORT-:4201" \
  -device virtio-net-pci,netdev=net0 -device virtio-rng-pci \
  "${lan[@]}" "${nvme[@]}" "${watchdog[@]}" "${serial[@]}"
