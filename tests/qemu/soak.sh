#!/usr/bin/env bash
# The power-cut soak (make soak-powercut N=...): the OTA cuts (one VM, test_ota.py), then
# the site's rotation and join cuts (two to three VMs, test_powercut_site.py), each line
# prefixed with the time and its soak; fails when either fails. One after the other, not
# side by side: the emulated VMs (TCG) are CPU-bound, so on two cores the two soaks take
# as long in all side by side, and each cut's time says less. The VMs' disks have a
# volatile write cache (tests/harness/qemu.py): a cut loses what the guest wrote and did
# not flush.
#   tests/qemu/soak.sh OTA_CUTS SITE_CUTS
set -uo pipefail
export PIMESH_QEMU_VOLATILE_CACHE=${PIMESH_QEMU_VOLATILE_CACHE:-1}
export PYTHONUNBUFFERED=1  # each line timed when the test writes it
here=$(cd "$(dirname "$0")" && pwd)
ota_cuts=$1 site_cuts=$2
start=$(date +%s)
# Prefixes each line with the time of day and the soak's name.
label() { while IFS= read -r line; do printf '%(%H:%M:%S)T %s %s\n' -1 "$1" "$line"; done; }
PIMESH_VM_POWER_CUTS=$ota_cuts "$here/run.sh" test_ota.py -k power_cuts 2>&1 | label 'ota: '
ota_rc=${PIPESTATUS[0]}
ota_done=$(date +%s)
echo "soak: $ota_cuts OTA cuts (exit $ota_rc) in $(( ota_done - start )) s"
PIMESH_VM_SITE_POWER_CUTS=$site_cuts "$here/run.sh" test_powercut_site.py 2>&1 | label 'site:'
site_rc=${PIPESTATUS[0]}
echo "soak: $site_cuts site cuts (exit $site_rc) in $(( $(date +%s) - ota_done )) s"
echo "soak: $ota_cuts OTA cuts (exit $ota_rc), $site_cuts site cuts (exit $site_rc) in $(( $(date +%s) - start )) s"
[ $ota_rc -eq 0 ] && [ $site_rc -eq 0 ]
