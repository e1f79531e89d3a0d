#!/usr/bin/env bash
# `make bench-proxy`: installs the load tools (cached), builds pimesh-proxy and pimesh-ctl,
# and runs bench.py (direct, HAProxy and pimesh rows; one table). A pimesh build that fails
# does not stop the bench: its row says why.
set -euo pipefail
cd "$(dirname "$0")/../../.."

oha_line=$(./tests/bench/install-load-tools.sh | tail -1)
export OHA="${oha_line#OHA=}"

target_dir="${CARGO_TARGET_DIR:-target}"
case "$target_dir" in /*) ;; *) target_dir="$PWD/$target_dir" ;; esac
build_log=$(mktemp)
trap 'rm -f "$build_log"' EXIT
echo "bench-proxy: cargo build --release --locked -p pimesh-proxy -p pimesh-ctl" >&2
if cargo build --release --locked -p pimesh-proxy -p pimesh-ctl 2>&1 | tee "$build_log" >&2; then
  unset PIMESH_BUILD_ERROR
else
  first_error=$(grep -m1 -E '^error' "$build_log" || tail -1 "$build_log")
  export PIMESH_BUILD_ERROR="cargo build failed: $first_error"
fi
export PIMESH_BIN_DIR="$target_dir/release"
python3 tests/bench/proxy/bench.py
