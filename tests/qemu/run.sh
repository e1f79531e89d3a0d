#!/usr/bin/env bash
# Runs the QEMU aarch64 tests of the built image (pytest; installed when missing).
#   tests/qemu/run.sh [pytest args]   the tests (all of this folder's by default)
# The shared fixtures are in tests/conftest.py and tests/harness/; the boot benchmark is
# bench/boot.py (make bench-boot).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
"$here/../../image/host-deps.sh" >/dev/null
python3 -c 'import pytest' 2>/dev/null || python3 -m pip install -q pytest
cd "$here"
if [ $# -gt 0 ]; then
  exec python3 -m pytest -v -s -p no:cacheprovider "$@"
fi
exec python3 -m pytest -v -s -p no:cacheprovider test_boot.py test_ota.py test_site.py
