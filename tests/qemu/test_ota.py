"""Over-the-air configuration on the real arm64 image in QEMU, with power cuts.

The central server runs on the host (127.0.0.1, reached by the guest as 10.0.2.2) with a
site made by `pimeshctl site init`; the node boots with a seed naming it, is enrolled
with `pimeshctl node sign`, and takes a revision. Then, a few times: a new revision is
published and QEMU is killed (the power cut) at a random instant while the node applies
it — on a timer started with the publish, a log-uniform delay of 10 ms to 4 s (as many
cuts in the first tenth of a second as between 0.4 and 4 s), so some come before the node
has the revision, some during its apply and the rest in its trial and commit. The node
boots again from the same disk, with the central server stopped until its configuration
has been read (what it holds is what the cut left, not a revision fetched after the
boot), and must hold the old or the new revision whole, then converge on the new one —
with the proxy running exactly that configuration.
"""

import os
import random
import threading
import time

import pytest

from harness.ota_site import Site, cluster_config, sha256_hex
from harness.ports import free_port
from harness.power_cut import log_uniform
from harness.qemu import Node
from harness.wait import wait_for

POWER_CUTS = int(os.environ.get("PIMESH_VM_POWER_CUTS", "3"))


@pytest.fixture(scope="module")
def site():
    site = Site(node="pi-q", address="10.0.2.2", port=free_port())
    try:
        site.start_central()
        yield site
    finally:
        site.close()


def active_config(node):
    return node.ssh("cat /etc/pimesh/cluster.toml 2>/dev/null || true") + "\n"


def proxy_sha(node, timeout=120):
    """The SHA-256 of the configuration the proxy runs (its admin /config), once the proxy
    answers: after a boot the revision may be committed before the proxy is up."""
    deadline = time.monotonic() + timeout
    while (config := node.proxy_config()) is None:
        assert time.monotonic() < deadline, f"the proxy's admin did not answer in {timeout}s"
        time.sleep(2)
    return config["sha256"]


def wait_enrolled(node, timeout=120):
    """Waits until the node took the certificate put there by hand: its join stops
    (`manual`) and its proxy answers."""
    deadline = time.monotonic() + timeout
    while node.status()["join"]["state"] != "manual":
        assert time.monotonic() < deadline, f"the node did not take its certificate: {node.status()['join']}"
        time.sleep(1)
    proxy_sha(node, timeout=max(1, deadline - time.monotonic()))


def wait_committed(node, revision, timeout=240):
    deadline = time.monotonic() + timeout
    ota = {}
    while time.monotonic() < deadline:
        ota = node.status()["ota"]
        if ota["committed"] == revision and ota["state"] == "idle":
            return ota
        time.sleep(2)
    raise TimeoutError(f"revision {revision} not committed after {timeout}s: {ota}")


def test_power_cuts_during_apply_leave_the_old_or_the_new_revision(site, tmp_path, base_image, ssh_key):
    key, public = ssh_key("ota@e2e")
    # QEMU's NAT card relays a guest's multicast onto the host's network: no mDNS on it.
    seed = site.seed(top=f'ssh_authorized_keys = ["{public}"]\nmdns_interfaces = []\n')
    image = base_image
    workdir = str(tmp_path / "node")
    os.makedirs(workdir)
    node = Node(workdir, image, seed, key).boot()
    try:
        node.wait_for_ssh()
        node.wait_for_status()
        csr = str(tmp_path / "node.csr")
        deadline = time.monotonic() + 120
        while not node.ssh("cat /var/lib/pimesh/identity/node.csr 2>/dev/null || true"):
            assert time.monotonic() < deadline, "no certificate request on the node"
            time.sleep(2)
        with open(csr, "w") as f:
            f.write(node.ssh("cat /var/lib/pimesh/identity/node.csr") + "\n")
        chain = site.sign_node(csr)
        node.ssh(f"umask 022; cat > /var/lib/pimesh/identity/node.pem <<'EOF'\n{chain}EOF\nsync")
        wait_enrolled(node)
        config = cluster_config(site.name, max_connections=1000)
        wait_committed(node, site.publish(config))
        assert active_config(node) == config
        assert proxy_sha(node) == sha256_hex(config)

        rng = random.Random(int(os.environ.get("PIMESH_SOAK_SEED", "7")))
        held = {"old": 0, "new": 0}
        for cut in range(POWER_CUTS):
            old, new = config, cluster_config(site.name, max_connections=1001 + cut,
                                              services=("web", f"svc{cut}"))
            cut_in = log_uniform(rng, 0.01, 4.0)
            power_cut = threading.Timer(cut_in, node.kill)  # the power cut
            power_cut.start()
            revision = site.publish(new)
            power_cut.join()
            site.kill_central()
            node = Node(workdir, image, None, key, fresh_disk=False).boot()
            node.wait_for_ssh()
            on_disk = active_config(node)
            site.start_central()
            assert on_disk in (old, new), f"cut {cut}: cluster.toml is neither revision:\n{on_disk}"
            which = "new" if on_disk == new else "old"
            held[which] += 1
            print(f"cut {cut}: cut {cut_in:.3f} s after the publish began, the node held the {which} revision")
            node.wait_for_status()
            wait_committed(node, revision)
            assert active_config(node) == new
            assert proxy_sha(node) == sha256_hex(new)
            # The report leaves the node's outbox after the commit, on the outbox's own retry
            # schedule (the central server was away for the boot).
            wait_for(f"cut {cut}: the central server's record of revision {revision}",
                     lambda: site.central_report()["revision"] == revision, timeout=120, interval=1,
                     expected=(OSError, KeyError, ValueError))
            config = new
        print(f"POWER CUTS {POWER_CUTS}: every boot consistent; the old revision held after "
              f"{held['old']}, the new after {held['new']}")
        node.poweroff()
    finally:
        node.kill()
