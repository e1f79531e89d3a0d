#!/usr/bin/env bash
# Runs the multi-node site tests: several nodes of the amd64 root (make image-amd64), each
# booted in systemd-nspawn in its own network namespace on one bridge the test makes.
#   tests/site/run.sh [pytest args]   the tests (all of this folder's by default)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
"$here/../../image/host-deps.sh" >/dev/null   # systemd-nspawn, nsenter, dnsmasq, python3
python3 -c 'import pytest' 2>/dev/null || python3 -m pip install -q pytest
python3 -c 'import yaml' 2>/dev/null || python3 -m pip install -q pyyaml
cd "$here"
exec python3 -m pytest -v -s -p no:cacheprovider "${@:-.}"
