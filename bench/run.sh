#!/usr/bin/env bash
# Runs one benchmark; it prints its figures as one table (bench/README.md).
#   bench/run.sh heal      kill/hang → ready again, the supervisor's CPU and RSS (nspawn)
#   bench/run.sh ota       publish → applied, bad revision → rolled back (nspawn)
#   bench/run.sh wear      bytes Pimesh writes to a node's storage per day (nspawn)
#   bench/run.sh boot      boot to READY and multi-user, with and without Pimesh (QEMU)
#   bench/run.sh central   pimesh-central under 5000 long-polling mTLS nodes
#   bench/run.sh control   control replicas and proxies of a temporary site
#   bench/run.sh rollouts  staged rollouts: 50 sites × 100 long-polling mTLS nodes
#   bench/run.sh replicas  two central replicas on PostgreSQL: publish → long-polls on both
#   bench/run.sh proxy     the mesh path next to HAProxy and direct
#   bench/run.sh proxy-instructions   instructions per request under callgrind
# heal, ota and wear need the amd64 root (make image-amd64) and the host binaries, boot the arm64
# image (make image): `make bench-NAME` builds what each needs first. Arguments after the
# name go to the benchmark (central, control).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
# The Python benchmarks share the system tests' harness (tests/harness/).
export PYTHONPATH="$repo/tests${PYTHONPATH:+:$PYTHONPATH}"
name="${1:-}"
shift || true
case "$name" in
  heal|ota|wear|boot)
    ./image/host-deps.sh >/dev/null   # systemd-nspawn, nsenter, QEMU, python3
    exec python3 "bench/$name.py" "$@"
    ;;
  central)
    exec cargo bench --locked -p pimesh-bench --bench central -- --nodes 5000 "$@"
    ;;
  control)
    exec cargo bench --locked -p pimesh-bench --bench control -- "$@"
    ;;
  rollouts)
    exec cargo bench --locked -p pimesh-bench --bench rollouts -- "$@"
    ;;
  replicas)
    ./image/host-deps.sh >/dev/null   # Debian's PostgreSQL server
    exec cargo bench --locked -p pimesh-bench --bench replicas -- "$@"
    ;;
  proxy|proxy-instructions)
    # Load tools (cached), then pimesh-proxy and pimeshctl. A pimesh build that fails does
    # not stop the bench: its row says why.
    oha_line=$(./bench/install-load-tools.sh | tail -1)
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
    if [ "$name" = proxy ]; then
      python3 bench/proxy.py "$@"
    else
      python3 bench/proxy_instructions.py "$@"
    fi
    ;;
  *)
    sed -n '2,11p' "$0" >&2
    exit 2
    ;;
esac
