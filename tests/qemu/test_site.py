"""Two boards of the real arm64 image form a site in QEMU aarch64, with nothing but their
seeds: each VM has its NAT card (SSH and the status API for the test) and a second card on
a site LAN shared by the two, made of QEMU socket networking over 127.0.0.1 (no DHCP on
it: the boards give themselves IPv4 link-local addresses, and mDNS stays on that LAN).

The first card is the site's init node (the seed and the site's trust root from
`pimeshctl site init`); the second has the same seed with `role = "join"` and nothing
else. The second board finds the first by mDNS, joins, and becomes a server (the site
wants three). Then a request from the second board to a service on the first crosses both
proxies with mTLS: the service is the first node's own status API, so the answer names
the node that served it.
"""

import json
import os
import re
import subprocess
import time

import pytest

from harness.paths import host_binary
from harness.ports import free_port
from harness.qemu import BOOT_OFFSET, Node
from harness.wait import wait_for

PIMESHCTL = host_binary("pimeshctl")
JOIN_TIMEOUT = float(os.environ.get("PIMESH_QEMU_JOIN_TIMEOUT", "600"))
CLUSTER = ('site = "lab"\n\n[services.status]\nport = 4200\nlocal_port = 14200\n'
           'nodes = ["pi-1"]\n')
# GET /status through the local proxy's port for the service, with bash alone (the image
# has no curl).
SERVED_BY_PI_1 = re.compile(r'"name":\s*"pi-1"')
GET_THROUGH_MESH = ("exec 3<>/dev/tcp/127.0.0.1/14200 && "
                    "printf 'GET /status HTTP/1.1\\r\\nHost: status\\r\\nConnection: close\\r\\n\\r\\n' >&3 && "
                    "timeout 20 cat <&3")


def wait(what, predicate, timeout, interval=3):
    return wait_for(what, predicate, timeout=timeout, interval=interval,
                    expected=(OSError, ValueError, KeyError, RuntimeError))


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("site")
    out = str(folder / "lab")
    subprocess.run([PIMESHCTL, "site", "init", "lab", "--out", out], capture_output=True, check=True)
    with open(os.path.join(out, "join-token")) as f:
        token = f.read().strip()
    return {"dir": out, "token": token}


def seed(keys, role, node, public):
    # mDNS on the site LAN card only: QEMU's NAT card (eth0) relays a guest's multicast onto
    # the host's network.
    return (f'site = "lab"\nrole = "{role}"\nnode = "{node}"\njoin_token = "{keys["token"]}"\n'
            'mdns_interfaces = ["eth1"]\n'
            f'ssh_authorized_keys = ["{public}"]\n')


def listening(port):
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True).stdout
    return bool(out.strip())


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
    lan = f"127.0.0.1:{free_port()}"
    first_dir, second_dir = str(tmp_path / "pi-1"), str(tmp_path / "pi-2")
    os.makedirs(first_dir)
    os.makedirs(second_dir)
    first = Node(first_dir, base_image, seed(keys, "init", "pi-1", public), key,
                 lan={"LAN_LISTEN": lan, "LAN_MAC": "52:54:00:50:00:01"})
    # What `pimeshctl image configure --trust` writes onto the first card (the image has
    # the folder).
    for name in ("anchor.pem", "issuer.pem", "issuer.key"):
        first.write_boot_file(os.path.join(keys["dir"], name), f"pimesh-trust/{name}")
    second = Node(second_dir, base_image, seed(keys, "join", "pi-2", public), key,
                  lan={"LAN_CONNECT": lan, "LAN_MAC": "52:54:00:50:00:02"})
    nodes = [first, second]
    try:
        first.boot()
        wait("the first VM listening on the LAN socket", lambda: listening(lan.rsplit(":", 1)[1]), 60, 0.2)
        second.boot()
        started = second.started
        for node in nodes:
            node.wait_for_ssh()
        status = wait("pi-2 joined", lambda: (s := second.status())["join"]["state"] == "joined" and s,
                      JOIN_TIMEOUT)
        figures["qemu_second_board_joined_s"] = round(time.monotonic() - started, 1)
        assert status["join"]["role"] == "server", status["join"]
        assert status["join"]["via"]["node"] == "pi-1", status["join"]
        assert status["join"]["via"]["address"].startswith("169.254."), status["join"]
        assert second.ssh("test -f /var/lib/pimesh/trust/issuer.key && echo yes") == "yes"
        joins = wait("the join in pi-1's status", lambda: [
            j for j in first.status()["joins"] if j["node"] == "pi-2" and j["result"] == "joined"], 60)
        assert joins[0]["from"].startswith("169.254."), joins

        # The site configuration, as the central server would deliver it.
        for node in nodes:
            node.ssh(f"cat > /etc/pimesh/cluster.toml.new <<'EOF'\n{CLUSTER}EOF\n"
                     "mv /etc/pimesh/cluster.toml.new /etc/pimesh/cluster.toml")
        try:
            answer = wait("pi-1's status through both proxies from pi-2",
                          lambda: (out := second.ssh(GET_THROUGH_MESH, check=False, timeout=60))
                          and SERVED_BY_PI_1.search(out) and out, 300)
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
