"""Two boards of the real arm64 image form a site in QEMU aarch64, with nothing but their
seeds: each VM has its NAT card (SSH and the status API for the test) and a second card on
a site LAN shared by the two: a hub on 127.0.0.1 their QEMU socket cards connect to (no
DHCP on it: the boards give themselves IPv4 link-local addresses, and mDNS stays on that
LAN).

The first card is the site's init node (the seed and the site's trust root from
`pimeshctl site init`); the second has the same seed with `role = "join"` and nothing
else. The first board runs alone until it announces that its LAN has no DHCP server (it
held only a link-local address for the whole lease grace); then the second is plugged in
(powered on), finds the first by mDNS, joins at once over its link-local address instead
of waiting out its own lease grace, and becomes a server (the site wants three). Then a
request from the second board to a service on the first crosses both proxies with mTLS:
the service is the first node's own status API, so the answer names the node that
served it.
"""

import json
import os
import time

import pytest

from harness.lan_hub import LanHub
from harness.qemu_site import (GET_THROUGH_MESH, first_two, give_cluster_config,
                               served_through_mesh, site_keys, wait)

JOIN_TIMEOUT = float(os.environ.get("PIMESH_QEMU_JOIN_TIMEOUT", "600"))
# What pi-2's supervisor logs when it joins over link-local because pi-1 said the LAN has
# no DHCP server (without that word it would wait out its 60 s lease grace first).
JOINED_OVER_LINK_LOCAL = "joining over this node's link-local address"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return site_keys(str(tmp_path_factory.mktemp("site")))


def hold(nodes, key):
    """`make qemu-site`: keeps the site up, saying how to watch it, until Ctrl-C."""
    print("\nThe site is up (Ctrl-C stops both VMs):")
    for name, node in zip(("pi-1 (init)", "pi-2 (joined)"), nodes):
        print(f"  {name}: ssh -i {key} -p {node.ssh_port} -o StrictHostKeyChecking=no root@127.0.0.1"
              f"   status: curl -s http://127.0.0.1:{node.status_port}/status | jq .join"
              f"   console: tail -f {node.console}")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


def test_a_second_board_joins_with_nothing_but_its_seed_and_a_request_crosses_both(
        base_image, ssh_key, keys, tmp_path, figures):
    key, public = ssh_key("site@qemu")
    hub = LanHub()
    first, second = first_two(base_image, keys, key, public, str(tmp_path), hub)
    nodes = [first, second]
    try:
        first.boot()
        first.wait_for_ssh()
        wait("pi-1 announcing a LAN without DHCP",
             lambda: first.status()["join"]["lan_without_dhcp"] is True, JOIN_TIMEOUT)
        second.boot()  # plugged in
        started = second.started
        second.wait_for_ssh()
        status = wait("pi-2 joined", lambda: (s := second.status())["join"]["state"] == "joined" and s,
                      JOIN_TIMEOUT)
        figures["qemu_second_board_joined_s"] = round(time.monotonic() - started, 1)
        said = second.ssh(f"journalctl -b -u pimesh-supervisor --no-pager -o cat | grep -F \"{JOINED_OVER_LINK_LOCAL}\"",
                          check=False)
        assert JOINED_OVER_LINK_LOCAL in said, \
            f"pi-2 did not join on pi-1's word that the LAN has no DHCP: {status['join']}"
        assert status["join"]["role"] == "server", status["join"]
        assert status["join"]["via"]["node"] == "pi-1", status["join"]
        assert status["join"]["via"]["address"].startswith("169.254."), status["join"]
        assert second.ssh("test -f /var/lib/pimesh/trust/issuer.key && echo yes") == "yes"
        joins = wait("the join in pi-1's status", lambda: [
            j for j in first.status()["joins"] if j["node"] == "pi-2" and j["result"] == "joined"], 60)
        assert joins[0]["from"].startswith("169.254."), joins

        # The site configuration, as the central server would deliver it.
        give_cluster_config(nodes)
        try:
            answer = wait("pi-1's status through both proxies from pi-2",
                          lambda: served_through_mesh(second), 300)
        except AssertionError:
            # What an operator would look at: the answer, each proxy's view, the addresses.
            print("answer:", second.ssh(GET_THROUGH_MESH, check=False, timeout=60)[:600])
            for node in nodes:
                print("proxy:", json.dumps({k: (node.proxy_config() or {}).get(k)
                                            for k in ("control", "services", "identity")})[:2000])
                print("addresses:", node.ssh("ip -4 -br addr", check=False))
            raise
        assert answer.startswith("HTTP/1.1 200"), answer[:200]
        figures["qemu_join_to_first_request_s"] = round(time.monotonic() - started, 1)
        if os.environ.get("PIMESH_QEMU_SITE_HOLD"):
            hold(nodes, key)
    finally:
        for node in nodes:
            node.kill()
        hub.close()
