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
  instant of its join: a log-uniform delay (5 ms to JOIN_WINDOW_S) after it opens its
  first TCP connection on the site LAN (seen at the LAN hub: the join's first exchange,
  the trust bundle fetched from a server; its key and request are made just before), so
  the cuts spread over the exchange, the stores that follow and what comes after. After
  the boot it ends joined, with a certificate for the key it holds, naming it, under the
  site's anchor; and pi-1's join records show it joined. Each cut says whether the board
  had to join again after the boot (its join was not yet whole on disk) or not.
"""

import os
import random
import shutil
import threading
import time

import pytest

from harness.lan_hub import LanHub, mac_bytes, tcp_open_from
from harness.power_cut import log_uniform
from harness.qemu import Node
from harness.qemu_site import (CLUSTER, SITE, boot_first_two, check_pair, give_cluster_config, lan_card,
                               seed, served_through_mesh, site_keys, wait)

CUTS = int(os.environ.get("PIMESH_VM_SITE_POWER_CUTS", "0"))
JOIN_TIMEOUT = float(os.environ.get("PIMESH_QEMU_JOIN_TIMEOUT", "600"))
# The longest delay after a new board's first connection on the LAN before its join is cut.
JOIN_WINDOW_S = 5.0
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


def join_status(node):
    try:
        return node.status()["join"]
    except (OSError, ValueError, KeyError):
        return None


def join_state(node):
    return (join_status(node) or {}).get("state")


def cut_during_join(board, hub, mac, delay, timeout=420):
    """Kills the board `delay` seconds after it opens its first TCP connection on the site
    LAN (a timer, so nothing the test does meanwhile moves the cut). Returns the join state
    its status showed last before the cut (None: it never answered)."""
    opened = threading.Event()
    mac = mac_bytes(mac)

    def watcher(frame):
        if tcp_open_from(frame, mac):
            opened.set()
            return True
        return False

    hub.watch(watcher)
    try:
        while not opened.wait(1):
            board.assert_running()
            assert time.monotonic() < board.started + timeout, \
                f"the board opened no connection on the site LAN within {timeout}s"
    finally:
        hub.unwatch(watcher)
    cut = threading.Timer(delay, board.kill)  # the power cut
    cut.start()
    shown = None
    while cut.is_alive():
        state = join_state(board)
        if state and cut.is_alive():
            shown = state
        time.sleep(0.05)
    cut.join()
    return shown


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
                assert read(first, "/etc/pimesh/cluster.toml") == CLUSTER, \
                    f"cut {cut}: pi-1's site configuration is not the one it was given"
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
                    delay = log_uniform(rng, 0.005, JOIN_WINDOW_S)
                    shown = cut_during_join(board, lan, lan_card(lan, boards)["LAN_MAC"], delay)
                    board = Node(folder, base_image, None, key, fresh_disk=False, lan=lan_card(lan, boards)).boot()
                    board.wait_for_ssh()
                    after = wait(f"cut {cut}: {name} joined after the cut",
                                 lambda: (j := join_status(board)) and j["state"] == "joined" and j, JOIN_TIMEOUT)
                    check_credential(board, name, anchor, joined=True)
                    wait(f"cut {cut}: {name}'s join in a server's records", lambda: [
                        j for server in (first, second) for j in server.status()["joins"]
                        if j["node"] == name and j["result"] == "joined"], 60)
                    state = ("joined again after the boot" if after["attempts"] > 0
                             else "whole on disk before the cut")
                    print(f"cut {cut}: {name} cut {delay:.3f} s after its first connection on the LAN "
                          f"(its status: {shown or 'not answering yet'}); its join was {state}", flush=True)
                except BaseException:
                    keep_journals([board])  # its folder (disk, console, journal) is kept
                    raise
                finally:
                    board.kill()
                shutil.rmtree(folder, ignore_errors=True)
                kind = "join"
            seen[kind][state] = seen[kind].get(state, 0) + 1
            print(f"cut {cut}: {kind} cut ({state}); every credential whole after the boot", flush=True)
        print(f"SITE POWER CUTS {CUTS}: after the rotation cuts pi-1 held {seen['rotation']}; "
              f"the join cuts came while the board was {seen['join']}; every credential whole")
    except BaseException:
        keep_journals(live)
        raise
    finally:
        for node in live:
            node.kill()
        lan.close()


def keep_journals(nodes):
    """Each board's journal of this boot, in its folder (journal.txt), read before the
    boards are killed: the kill loses what the disk's volatile cache held."""
    for node in nodes:
        try:
            journal = node.ssh("journalctl -b --no-pager -o short-precise", check=False, timeout=120)
        except Exception as err:  # the board may be the one that failed
            journal = f"(no journal: {err})"
        with open(os.path.join(node.workdir, "journal.txt"), "w") as f:
            f.write(journal)
        print(f"{node.workdir}/journal.txt: the board's journal of this boot", flush=True)
