#!/usr/bin/env bash
# Installs what the build machine (Debian 12, root) needs to build and boot the image.
# Idempotent: does nothing when every tool is already present at a usable version.
set -euo pipefail

# `make -j` runs several targets that call this script at once: one installs at a time,
# the others wait and then find everything present.
exec 9>/run/lock/pimesh-host-deps.lock
flock 9

need=()
have() { command -v "$1" >/dev/null 2>&1; }

# qemu 10, mmdebstrap 1.5 and e2fsprogs 1.47 (mkfs.ext4 -d from a tarball) come from
# bookworm-backports; the rest from bookworm.
for tool in mmdebstrap qemu-system-aarch64 qemu-system-x86_64 qemu-aarch64-static mcopy mkfs.vfat \
            sfdisk depmod dtc xz unshare systemd-nspawn ssh-keygen ssh script curl jq python3 zstd openssl nsenter iptables ip systemd-sysusers dnsmasq \
            chromium socat nbdkit; do
  have "$tool" || need+=("$tool")
done
# The central server's replica tests start Debian's PostgreSQL server themselves.
compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || need+=(postgresql)
# Read the whole version text first: `grep -q` closing the pipe early would fail mke2fs
# with SIGPIPE, which pipefail reports as a missing tool.
e2fs_ok() { local v; v=$(mke2fs -V 2>&1) || true; [[ $v =~ mke2fs\ 1\.(47|48|49) ]]; }
e2fs_ok || need+=(e2fsprogs-backports)

if [ "${#need[@]}" -gt 0 ]; then
  echo "host-deps: installing for: ${need[*]}"
  if . /etc/os-release && [ "${VERSION_CODENAME:-}" = bookworm ]; then
    if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
      cat > /etc/apt/sources.list.d/pimesh-bookworm-backports.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    fi
    bpo=(-t bookworm-backports)
  else
    bpo=()
  fi
  apt-get -o DPkg::Lock::Timeout=600 update -q
  apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${bpo[@]}" \
    mmdebstrap qemu-system-arm qemu-system-x86 qemu-user-static qemu-utils e2fsprogs
  apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends \
    mtools dosfstools fdisk xz-utils util-linux systemd-container openssh-client \
    bsdutils curl jq python3 zstd ca-certificates binfmt-support arch-test openssl iptables iproute2 \
    debian-archive-keyring gpg kmod systemd device-tree-compiler dnsmasq-base
  # Headless Chromium drives the demo's page in demo/tests/page.rs; the fonts make its
  # screenshots legible.
  apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends chromium fonts-liberation
  # PostgreSQL's server for central/tests/replicas.rs, which starts its own in a
  # temporary folder: the package's default cluster (a server on port 5432) is not made.
  mkdir -p /etc/postgresql-common/createcluster.d
  echo 'create_main_cluster = false' > /etc/postgresql-common/createcluster.d/pimesh.conf
  apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends postgresql
  # `make demo` forwards 127.0.0.1:8080 of this machine into the site test's LAN; the
  # power-cut soak gives its VMs a disk with a volatile write cache (nbdkit's cache filter).
  apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends socat nbdkit
fi

# Run arm64 programs (the rootfs' maintainer scripts, cross-built binaries) transparently.
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
  conf=/usr/lib/binfmt.d/qemu-aarch64.conf
  [ -f "$conf" ] || { echo "host-deps: $conf missing (qemu-user-static)" >&2; exit 1; }
  cat "$conf" > /proc/sys/fs/binfmt_misc/register
fi
echo "host-deps: ready"
