"""Power cuts on a site of arm64 boards in QEMU during trust rotations and joins: a soak,
run by `make soak-powercut` (each cut costs a boot or two, so `make test` leaves it out;
the same paths are cut by kill -9 in `supervisor/tests/join.rs` on every commit).

The site is formed as in test_site.py (pi-1 the init node, pi-2 joined by its seed alone,
pi-1's status API a service reached from pi-2 through both proxies). Then
PIMESH_VM_SITE_POWER_CUTS cuts (QEMU killed: no shutdown, no sync), alternating:

- **rotation**: pi-1 holds the site's anchor key (imported as an operator does for
  `pimesh-supervisor trust rotate-issuer`) and rotates its issuer in a loop; the cut lands
  at a random instant of it. After the boot the trust root is one whole generation (its
  issuer key is its certificate's, the certificate verifies under the site's anchor), so
  is pi-1's node credential, and pi-2 reaches pi-1's service through both proxies again.
- **join**: a new board, fresh from the image with the join seed, is cut at a random
  instant of its join (from the first state its status shows until a while after it says
  joined). After the boot it ends joined, with a certificate for the key it holds, naming
  it, under the site's anchor; and pi-1's join records show it joined.
"""

import os
import random
import shutil
import time

import pytest

from harness.lan_hub import LanHub
from harness.qemu import Node
from harness.qemu_site import (SITE, boot_first_two, check_pair, give_cluster_config, lan_card,
                               seed, served_through_mesh, site_keys, wait)

CUTS = int(os.environ.get("PIMESH_VM_SITE_POWER_CUTS", "0"))
JOIN_TIMEOUT = float(os.environ.get("PIMESH_QEMU_JOIN_TIMEOUT", "600"))
# The seconds after a new board's status first answers in which its join is cut: its join
# takes about half of it in QEMU here, so some cuts land after it says joined.
JOIN_WINDOW_S = 40.0
ROTATION_WINDOW_S = 6.0
ROTATE_IN_A_LOOP = ("setsid sh -c 'while :; do pimesh-supervisor trust rotate-issuer; done' "
                    ">/dev/null 2>&1 </dev/null &")

pytestmark = pytest.mark.skipif(CUTS == 0, reason="a soak: make soak-powercut N=...")


def read(node, path):
    return node.ssh(f"cat {path}") + "\n"


def check_trust_root(node, anchor):
    """The node's trust root (the linked generation) and its node credential, whole."""
    check_pair(read(node, "/var/lib/pimesh/trust/issuer.pem"), read(node, "/var/lib/pimesh/trust/issuer.key"),
               anchor, "pi-1's issuer")
    check_credential(node, "pi-1", anchor)


def check_credential(node, name, anchor, joined=False):
    """The node credential: key, certificate, name; a joined node's also holds the anchor
    it pinned (the init node's anchor is its trust root's)."""
    identity = "/var/lib/pimesh/identity"
    check_pair(read(node, f"{identity}/node.pem"), read(node, f"{identity}/node.key"), anchor,
               f"{name}'s node credential", uri=f"spiffe://{SITE}/node/{name}")
    if joined:
        assert read(node, f"{identity}/anchor.pem") == anchor, f"{name}: another anchor in its identity"


def join_state(node):
    try:
        return node.status()["join"]["state"]
    except (OSError, ValueError, KeyError):
        return None


def test_power_cuts_during_rotations_and_joins_leave_whole_credentials(base_image, ssh_key, tmp_path):
    key, public = ssh_key("powercut@qemu")
    keys = site_keys(str(tmp_path / "keys"))
    with open(os.path.join(keys["dir"], "anchor.pem")) as f:
        anchor = f.read()
    lan = LanHub()
    first, second = boot_first_two(base_image, keys, key, public, str(tmp_path), lan)
    live = [first, second]
    rng = random.Random(int(os.environ.get("PIMESH_SOAK_SEED", "11")))
    seen = {"rotation": {}, "join": {}}
    try:
        for node in live:
            node.wait_for_ssh()
        wait("pi-2 joined", lambda: second.status()["join"]["state"] == "joined", JOIN_TIMEOUT)
        give_cluster_config(live)
        wait("pi-1's service through both proxies", lambda: served_through_mesh(second), 300)
        with open(os.path.join(keys["dir"], "anchor.key")) as f:
            first.ssh(f"umask 077; cat > /root/anchor.key <<'EOF'\n{f.read()}EOF")
        first.ssh("pimesh-supervisor trust import-anchor-key /root/anchor.key && rm /root/anchor.key")

        boards = 2
        for cut in range(CUTS):
            if cut % 2 == 0:
                before = first.ssh("readlink /var/lib/pimesh/trust")
                first.ssh(ROTATE_IN_A_LOOP)
                time.sleep(rng.uniform(0.0, ROTATION_WINDOW_S))
                first.kill()  # the power cut
                first = Node(first.workdir, base_image, None, key, fresh_disk=False, lan=lan_card(lan, 1)).boot()
                live[0] = first
                first.wait_for_ssh()
                # The old generation or a newer one, whole either way.
                after = first.ssh("readlink /var/lib/pimesh/trust")
                check_trust_root(first, anchor)
                wait(f"cut {cut}: pi-1's service through both proxies", lambda: served_through_mesh(second), 300)
                kind, state = "rotation", ("a newer generation" if after != before else "the same generation")
            else:
                boards += 1
                name = f"pi-{boards}"
                folder = str(tmp_path / name)
                os.makedirs(folder)
                board = Node(folder, base_image, seed(keys, "join", name, public), key,
                             lan=lan_card(lan, boards)).boot()
                try:
                    board.wait_for_ssh()
                    state = wait(f"{name}'s status", lambda: join_state(board), 120, 0.3)
                    until = time.monotonic() + rng.uniform(0.0, JOIN_WINDOW_S)
                    while time.monotonic() < until:
                        state = join_state(board) or state
                        time.sleep(0.3)
                    board.kill()  # the power cut
                    board = Node(folder, base_image, None, key, fresh_disk=False, lan=lan_card(lan, boards)).boot()
                    board.wait_for_ssh()
                    wait(f"cut {cut}: {name} joined after the cut", lambda: join_state(board) == "joined",
                         JOIN_TIMEOUT)
                    check_credential(board, name, anchor, joined=True)
                    wait(f"cut {cut}: {name}'s join in a server's records", lambda: [
                        j for server in (first, second) for j in server.status()["joins"]
                        if j["node"] == name and j["result"] == "joined"], 60)
                finally:
                    board.kill()
                    shutil.rmtree(folder, ignore_errors=True)
                kind = "join"
            seen[kind][state] = seen[kind].get(state, 0) + 1
            print(f"cut {cut}: {kind} cut ({state}); every credential whole after the boot", flush=True)
        print(f"SITE POWER CUTS {CUTS}: after the rotation cuts pi-1 held {seen['rotation']}; "
              f"the join cuts came while the board was {seen['join']}; every credential whole")
    finally:
        for node in live:
            node.kill()
        lan.close()
