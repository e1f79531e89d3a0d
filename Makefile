# Pimesh. `make image` builds the Raspberry Pi image; `make test` runs every test, the
# QEMU aarch64 boot of that image included. Both install what they need (Debian, root).
SHELL := /bin/bash
.DEFAULT_GOAL := help
VERSION := $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' Cargo.toml | head -1)
IMAGE := out/pimesh-$(VERSION)-arm64.img.xz
AMD64_ROOT := out/pimesh-$(VERSION)-amd64.root
# Everything the image is made of: a change to any of these rebuilds it.
IMAGE_INPUTS := $(shell git ls-files Cargo.toml Cargo.lock README.md image systemd configs \
	runtime schema identity meshtls revision join kube meshstats supervisor proxy control third_party 2>/dev/null)
# The daemons that run on a node (the image's binaries).
NODE_CRATES := -p pimesh-supervisor -p pimesh-proxy -p pimesh-control
# The cargo profile of the host's daemons and tools (the amd64 root, the tests' central
# server and pimeshctl) and of `cargo test`: `host` (Cargo.toml: dependencies optimised,
# the workspace's crates as in a debug build), one build shared by the unit tests and the
# daemons the other tests run; `release`, as the image's, for the benchmarks that measure
# those daemons.
HOST_PROFILE := host
# Where cargo puts them (CI shares a target folder between clones); the tests' harness
# finds them through PIMESH_HOST_PROFILE (tests/harness/paths.py).
HOST_BIN = $(or $(CARGO_TARGET_DIR),target)/$(HOST_PROFILE)
export PIMESH_HOST_PROFILE = $(HOST_PROFILE)

.PHONY: fuzz test-fuzz soak-powercut central help deps image image-amd64 cross host-bins test test-containers test-rust test-qemu test-nspawn test-site test-k3s demo qemu qemu-site bench-site bench-boot \
	bench bench-heal bench-ota bench-wear bench-central bench-rollouts bench-replicas bench-proxy bench-proxy-instructions bench-control lint clean

help:
	@echo "make image        build $(IMAGE) (the Raspberry Pi SD card image)"
	@echo "make test         run all tests: Rust (host) and the QEMU aarch64 boot of the image"
	@echo "make qemu         boot the image in QEMU (SSH on 127.0.0.1:2222, status on 127.0.0.1:4200)"
	@echo "make qemu-site    two VMs of the image on one LAN: the second joins the first by itself"
	@echo "make cross        build the aarch64 release binaries into out/bin/aarch64/"
	@echo "make image-amd64  build the amd64 root filesystem ($(AMD64_ROOT)) for nspawn tests"
	@echo "make central      run the central server locally with a demo site"
	@echo "make bench-boot   measure boot to supervisor READY against boot without Pimesh"
	@echo "make test-nspawn  test the supervisor against real systemd/D-Bus (amd64 root in systemd-nspawn)"
	@echo "make test-site    several nspawn nodes on one bridge form a site by themselves (plug-in join)"
	@echo "make test-k3s     the site test with K3S_BIN=<a real k3s> instead of the K3s fixture"
	@echo "make demo         the Fleetman demo across a site of nspawn nodes, its page checked in headless"
	@echo "                  Chromium (PIMESH_DEMO_HOLD=1: then kept up on http://127.0.0.1:8080/ until Ctrl-C)"
	@echo "make bench-site   four nspawn nodes forming a site: start/lease → certificate per node, daemons' memory"
	@echo "make bench-heal   measure kill/hang → ready again and the supervisor's CPU and RSS"
	@echo "make bench-ota    measure publish → applied on a node, and bad revision → rolled back"
	@echo "make bench-central measure the central server under 5000 long-polling nodes"
	@echo "make bench-proxy  measure the mesh path (two proxies, mTLS) next to two HAProxy instances and direct"
	@echo "make bench-proxy-instructions  instructions per request of each proxy pair (callgrind)"
	@echo "make bench-control measure CSR -> certificate, replica RSS, config change -> every proxy, failover"
	@echo "make bench        all of the benchmarks above"

deps:
	./image/host-deps.sh

image: $(IMAGE)

$(IMAGE): $(IMAGE_INPUTS)
	./image/host-deps.sh
	./image/cross.sh
	ARCH=arm64 ./image/assemble.sh

cross:
	./image/cross.sh

# The node's daemons (for the amd64 root) and the host tools the tests drive them with
# (pimesh-demo: the site test copies it into its nodes and drives the page with it).
host-bins:
	cargo build --profile $(HOST_PROFILE) --locked $(NODE_CRATES) -p pimesh-central -p pimesh-ctl -p k3s-fixture -p pimesh-demo
	install -D -m 0755 -t out/bin/x86_64 $(HOST_BIN)/pimesh-supervisor $(HOST_BIN)/pimesh-proxy \
		$(HOST_BIN)/pimesh-control

image-amd64: host-bins
	./image/host-deps.sh
	ARCH=amd64 ./image/assemble.sh

# The containers' root is built first (one cargo build at a time: two would only share
# the cores), then the arm64 image (cross build and assembly, CPU-bound) is built while the
# container tests run (they mostly wait on conditions, and must pass on a loaded machine
# anyway); the QEMU tests then boot it.
test: test-rust
	$(MAKE) --no-print-directory image-amd64
	$(MAKE) --no-print-directory -j2 --output-sync=recurse test-containers $(IMAGE)
	$(MAKE) --no-print-directory test-qemu

test-containers: image-amd64
	$(MAKE) --no-print-directory test-nspawn
	$(MAKE) --no-print-directory test-site
	$(MAKE) --no-print-directory test-fuzz

# The proxy's interception test needs iptables (host-deps installs it).
test-rust:
	./image/host-deps.sh
	cargo test --profile $(HOST_PROFILE) --locked --workspace

test-qemu: $(IMAGE) host-bins
	./tests/qemu/run.sh

test-nspawn: image-amd64
	./tests/nspawn/run.sh

# Several nodes that form a site by themselves (plug-in join), each in its own namespace.
test-site: image-amd64
	./tests/site/run.sh

# The Fleetman demo (demo/) across a site of nspawn nodes: the site test's demo case alone
# (the site boots for it). PIMESH_DEMO_HOLD=1 keeps it up after its checks, the page
# forwarded to http://127.0.0.1:8080/ of this machine, until Ctrl-C.
demo: image-amd64
	./tests/site/run.sh -k demo

# The same site with a real K3s on every node: K3S_BIN=/path/to/k3s make test-k3s (without
# it, the K3s fixture runs, as in test-site).
test-k3s: image-amd64
	K3S_BIN="$(K3S_BIN)" ./tests/site/run.sh

lint:
	cargo fmt --all -- --check
	cargo clippy --locked --workspace --all-targets -- -D warnings

# Figures of the site harness (start → certificate and lease → certificate per node,
# daemons' memory), no asserts on them: once with the LAN's DHCP server checking each
# address by ping before offering it (dnsmasq's default: leases ~3 s apart), once without.
bench-site: image-amd64
	./tests/site/run.sh -k cards_form | tee /dev/stderr | grep '^FIGURES' || true
	PIMESH_SITE_DHCP_PING=0 ./tests/site/run.sh -k cards_form | tee /dev/stderr | grep '^FIGURES' || true

# Power cuts at scale: N QEMU kills at random instants, 5 in 8 during OTA applies (every
# boot holds the old or the new revision whole), the rest during issuer rotations and joins
# on a two-board site (every credential whole). The two soaks run one after the other
# (tests/qemu/soak.sh says why); N=100 took 2 h from a built image (6 Dec).
N ?= 100
soak-powercut: $(IMAGE) host-bins
	./tests/qemu/soak.sh $$(( (5 * $(N) + 4) / 8 )) $$(( $(N) - (5 * $(N) + 4) / 8 ))

# Two VMs of the image on one LAN: the second joins the first by itself; kept up until Ctrl-C.
qemu-site: $(IMAGE) host-bins
	PIMESH_QEMU_SITE_HOLD=1 ./tests/qemu/run.sh test_site.py

qemu: $(IMAGE)
	./image/host-deps.sh
	mkdir -p out/qemu
	xz -dc $(IMAGE) > out/qemu/base.img
	@if [ -n "$(SEED)" ]; then mcopy -o -i out/qemu/base.img@@4M "$(SEED)" ::/pimesh.toml; fi
	rm -f out/qemu/overlay.qcow2
	qemu-img create -q -f qcow2 -b base.img -F raw out/qemu/overlay.qcow2 8G
	@echo "Booting; the console is here (Ctrl-a x quits). SSH: ssh -p 2222 root@127.0.0.1 (keys from the seed);"
	@echo "status: curl http://127.0.0.1:4200/status"
	DISK_FORMAT=qcow2 BOOT_FROM=out/qemu/base.img ./image/qemu.sh out/qemu/overlay.qcow2

central:
	./central/demo.sh

clean:
	rm -rf out target

# Fuzzes every parser that takes outside input for FUZZ_SECONDS each (nightly and
# cargo-fuzz); the corpus is kept under fuzz/corpus/. Not part of CI (time).
FUZZ_SECONDS ?= 60
fuzz:
	./fuzz/run.sh $(FUZZ_SECONDS)

# The fuzz smoke of `make test`: every target for FUZZ_SMOKE_SECONDS from its seeds, the
# instrumented build kept under /var/cache/pimesh (about 1.5 min when cold).
FUZZ_SMOKE_SECONDS ?= 10
test-fuzz:
	FUZZ_TARGET_DIR=$${PIMESH_CACHE:-/var/cache/pimesh}/fuzz-target ./fuzz/run.sh $(FUZZ_SMOKE_SECONDS)

# Benchmarks: one target per figure table, all run by bench/run.sh (bench/README.md says
# what each measures and the table every one prints).
bench: bench-heal bench-ota bench-wear bench-central bench-rollouts bench-replicas bench-boot bench-proxy bench-control

# The benchmarks that measure the amd64 root's daemons measure them built as the image's
# are (a target's variables hold for what it builds first).
bench-heal bench-ota bench-wear bench-site: HOST_PROFILE = release

# kill/hang of a managed unit -> ready again, the supervisor's CPU and RSS (bench/heal.py).
bench-heal: image-amd64
	./bench/run.sh heal

# publish -> applied and reported, bad revision -> rolled back (bench/ota.py).
bench-ota: image-amd64
	./bench/run.sh ota

# bytes the Pimesh daemons and their journal write per day, idle and with traffic (bench/wear.py).
bench-wear: image-amd64
	./bench/run.sh wear

# boot to supervisor READY and multi-user, with and without Pimesh (bench/boot.py).
bench-boot: $(IMAGE)
	./bench/run.sh boot

# The central server under 5000 long-polling mTLS nodes: memory per parked long-poll,
# fan-out latency of one publish, requests/s (bench/central.rs).
bench-central:
	./bench/run.sh central

# Staged rollouts at fleet scale: 50 sites × 100 nodes, waves of 1 %, 10 %, 100 %: publish →
# complete, and a bad report → halted (bench/rollouts.rs).
bench-rollouts:
	./bench/run.sh rollouts

# Two central replicas on one PostgreSQL server: publish on one → long-polls on both answered.
bench-replicas:
	./bench/run.sh replicas

# The data path the mesh adds (client -> proxy A -> mTLS -> proxy B -> nginx) against two
# HAProxy instances and direct: req/s, proxy CPU per request, conn-close req/s, p50/p99 at a
# fixed 5000 req/s, RSS idle and with 1000 connections (bench/proxy.py).
bench-proxy:
	./bench/run.sh proxy

# Instructions per request of each proxy pair under callgrind (HAProxy, pimesh with an
# HTTP/1.1 client, an HTTP/2 client (h2load) and opaque TCP): figures that noise does not
# move (bench/proxy_instructions.py).
bench-proxy-instructions:
	./bench/run.sh proxy-instructions

# Control replicas and proxies of a temporary site on 127.0.0.1: CSR -> certificate p50/p99,
# a replica's RSS, config change -> every proxy p50/p99, failover time (bench/control.rs).
bench-control:
	./bench/run.sh control
