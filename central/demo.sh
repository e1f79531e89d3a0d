#!/usr/bin/env bash
# `make central`: runs the central server locally with a demo site "demo-site", creating
# (once) the site's keys with pimeshctl and a self-signed server certificate under
# out/central-demo/. Prints how to publish to it; stops on Ctrl-C.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
demo="$repo/out/central-demo"
bin="$repo/target/release"
cargo build --release --locked -p pimesh-central -p pimesh-ctl
mkdir -p "$demo"
if [ ! -d "$demo/demo-site" ]; then
  "$bin/pimeshctl" site init demo-site --central-url https://localhost:8443 --out "$demo/demo-site" \
    | tee "$demo/seed-values.txt"
fi
if [ ! -f "$demo/server.pem" ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 365 \
    -subj /CN=localhost -addext subjectAltName=DNS:localhost \
    -addext basicConstraints=critical,CA:FALSE -addext extendedKeyUsage=serverAuth \
    -keyout "$demo/server.key" -out "$demo/server.pem" 2>/dev/null
fi
public_key=$(sed -n 's/^public_key = "\(.*\)"$/\1/p' "$demo/seed-values.txt")
cat > "$demo/central.toml" <<TOML
listen = "127.0.0.1:8443"
state_dir = "$demo/state"
tls_cert = "$demo/server.pem"
tls_key = "$demo/server.key"
long_poll_max = "60s"

[[sites]]
name = "demo-site"
anchor = "$demo/demo-site/anchor.pem"
public_key = "$public_key"
TOML
cat <<HELP
Central server on https://localhost:8443 with site demo-site. In another terminal:
  sed 's/fleet-depot-7/demo-site/' configs/cluster.example.toml > /tmp/demo-cluster.toml
  $bin/pimeshctl config publish /tmp/demo-cluster.toml --site-dir $demo/demo-site \\
      --central https://localhost:8443 --central-ca $demo/server.pem
  $bin/pimeshctl status --site-dir $demo/demo-site \\
      --central https://localhost:8443 --central-ca $demo/server.pem
  $bin/pimeshctl dashboard --site-dir $demo/demo-site \\
      --central https://localhost:8443 --central-ca $demo/server.pem   # open the URL it prints
HELP
exec "$bin/pimesh-central" --config "$demo/central.toml"
