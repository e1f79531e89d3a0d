#!/usr/bin/env bash
# Runs the supervisor's tests against real systemd and D-Bus: the amd64 root filesystem
# (make image-amd64) booted in systemd-nspawn (pytest; installed when missing).
#   tests/nspawn/run.sh [pytest args]   the tests (all of this folder's by default)
# The shared fixtures are in tests/conftest.py and tests/harness/; the benchmarks that
# boot the same root are in bench/ (make bench-heal, make bench-ota).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
"$here/../../image/host-deps.sh" >/dev/null   # systemd-nspawn, script, nsenter, python3
python3 -c 'import pytest' 2>/dev/null || python3 -m pip install -q pytest
cd "$here"
if [ $# -gt 0 ]; then
  exec python3 -m pytest -v -s -p no:cacheprovider "$@"
fi
exec python3 -m pytest -v -s -p no:cacheprovider test_heal.py test_ota.py test_trust.py test_control.py test_network.py test_watchdog.py
