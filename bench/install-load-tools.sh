#!/usr/bin/env bash
# Installs the load tools and peers for `make bench-proxy` (Debian, root):
#   wrk, haproxy, nginx-light, openssl, h2load (nghttp2-client), valgrind from Debian (only those missing), and oha built with
#   `cargo install` at a pinned version, cached by version under /var/cache/pimesh/tools.
# The Debian haproxy/nginx are never left running as system services: the bench starts its
# own instances on free ports with its own configs.
# Prints the oha binary path on the last line of stdout ("OHA=<path>").
set -euo pipefail

OHA_VERSION="${OHA_VERSION:-1.16.0}"
TOOLS_DIR="${PIMESH_TOOLS_DIR:-/var/cache/pimesh/tools}"
OHA_ROOT="$TOOLS_DIR/oha-$OHA_VERSION"

log() { echo "install-load-tools: $*" >&2; }
have() { command -v "$1" >/dev/null 2>&1; }

pkgs=()
have wrk || pkgs+=(wrk)
have haproxy || [ -x /usr/sbin/haproxy ] || pkgs+=(haproxy)
have nginx || [ -x /usr/sbin/nginx ] || pkgs+=(nginx-light)
have openssl || pkgs+=(openssl)
have h2load || pkgs+=(nghttp2-client)
have valgrind || pkgs+=(valgrind)
have python3 || pkgs+=(python3)

if [ "${#pkgs[@]}" -gt 0 ]; then
  log "apt-get install ${pkgs[*]}"
  # Keep maintainer scripts from starting haproxy/nginx as services.
  policy=/usr/sbin/policy-rc.d
  had_policy=0
  [ -e "$policy" ] && had_policy=1
  if [ "$had_policy" = 0 ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod 0755 "$policy"
    trap 'rm -f "$policy"' EXIT
  fi
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q --no-install-recommends "${pkgs[@]}" >&2; then
    apt-get update -q >&2
    apt-get install -y -q --no-install-recommends "${pkgs[@]}" >&2
  fi
  if [ "$had_policy" = 0 ]; then rm -f "$policy"; trap - EXIT; fi
fi

# Whatever happened before (an install without policy-rc.d, a systemd machine): stop and
# disable the system services, so they hold no ports and burn no CPU during the bench.
for svc in haproxy nginx; do
  if have systemctl && [ -d /run/systemd/system ]; then
    systemctl disable --now "$svc" >/dev/null 2>&1 || true
  else
    if have service; then service "$svc" stop >/dev/null 2>&1 || true; fi
    if have update-rc.d; then update-rc.d "$svc" disable >/dev/null 2>&1 || true; fi
  fi
done
# A leftover system nginx/haproxy started by init scripts (pid files of the packages' configs).
for pidf in /run/nginx.pid /run/haproxy.pid; do
  if [ -s "$pidf" ]; then
    pid=$(cat "$pidf")
    if kill -0 "$pid" 2>/dev/null; then log "stopping system service pid $pid ($pidf)"; kill "$pid" || true; fi
  fi
done

# oha, cached by version.
oha_bin="$OHA_ROOT/bin/oha"
if [ -x "$oha_bin" ] && "$oha_bin" --version >/dev/null 2>&1; then
  log "oha $OHA_VERSION cached at $oha_bin"
else
  have cargo || { log "cargo not found: oha needs the Rust toolchain (rustup)"; exit 1; }
  log "building oha $OHA_VERSION (cargo install --locked, ~6 min on 2 idle cores)"
  mkdir -p "$TOOLS_DIR"
  rm -rf "$TOOLS_DIR"/oha-*.tmp.*   # what an interrupted or failed build left
  tmp_root="$OHA_ROOT.tmp.$$"
  # Default features: oha 1.16 does not compile without its TLS feature. Its own target dir,
  # never the workspace's; kept on failure so a retry reuses what was built.
  CARGO_TARGET_DIR="$TOOLS_DIR/.build-oha-$OHA_VERSION" \
    cargo install oha --version "=$OHA_VERSION" --locked --root "$tmp_root" >&2
  rm -rf "$OHA_ROOT"
  mv "$tmp_root" "$OHA_ROOT"
  rm -rf "$TOOLS_DIR/.build-oha-$OHA_VERSION"
  "$oha_bin" --version >&2
fi
echo "OHA=$oha_bin"
