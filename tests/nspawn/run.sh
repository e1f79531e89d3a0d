#!/usr/bin/env bash
# Runs the supervisor's tests against real systemd and D-Bus: the amd64 root filesystem
# (make image-amd64) booted in systemd-nspawn (pytest; installed when missing).
#   tests/nspawn/run.sh [pytest args]   the tests
#   tests/nspawn/run.sh --bench-heal    the heal benchmark (prints figures)
#   tests/nspawn/run.sh --bench-ota     the OTA benchmark (prints figures)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
"$here/../../image/host-deps.sh" >/dev/null   # systemd-nspawn, script, nsenter, python3
python3 -c 'import pytest' 2>/dev/null || python3 -m pip install -q pytest
cd "$here"
if [ "${1:-}" = --bench-heal ]; then
  exec python3 "$here/bench_heal.py"
fi
if [ "${1:-}" = --bench-ota ]; then
  exec python3 "$here/bench_ota.py"
fi
if [ $# -gt 0 ]; then
  exec python3 -m pytest -v -s -p no:cacheprovider "$@"
fi
exec python3 -m pytest -v -s -p no:cacheprovider test_heal.py test_ota.py test_trust.py test_control.py
