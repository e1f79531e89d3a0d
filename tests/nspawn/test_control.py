"""The control plane on a real node: the amd64 root filesystem booted in systemd-nspawn
as its site's init node (real systemd, D-Bus, unit sandboxing and users).

The supervisor makes the site's trust root, signs the node's own certificate and starts
three control replicas (`pimesh-control@1..3`, user `pimesh-control`) and the proxy, told
where the replicas are. The proxy gets its leaf from a replica and watches discovery;
replicas killed are healed while the proxy fails over; an issuer rotation by the
supervisor reaches the replicas without a restart, and the proxy's next leaf comes from
the new issuer.

One node serves every case; each case starts once every unit is ready and the proxy holds
a leaf from a replica (the `node` fixture), so the cases pass in any order.
"""

import base64
import hashlib
import json
import os

import pytest

from harness.container import booted

PROXY = "pimesh-proxy.service"
CONTROLS = [f"pimesh-control@{n}.service" for n in (1, 2, 3)]
SEED = 'site = "lab"\nrole = "init"\nnode = "pi-a"\n'
TRUST = "/var/lib/pimesh/trust"


@pytest.fixture(scope="module")
def booted_node():
    with booted(SEED) as container:
        yield container


@pytest.fixture
def node(booted_node):
    """The node with every unit ready and the proxy holding a leaf from a replica (or its
    saved copy of one)."""
    booted_node.wait_for("every unit ready", lambda: all(
        u["ready"] for u in booted_node.status()["units"]), timeout=60)
    booted_node.wait_for("the proxy's leaf from a replica", lambda: (
        (c := proxy_config(booted_node)) and c["identity"]
        and c["identity"]["source"] in ("control", "cache")))
    return booted_node


def proxy_config(node):
    return node.proxy_config()


def issuer_sha256(node):
    """The SHA-256 of the issuer certificate in the node's trust folder (DER), as the
    proxy's /config shows the issuer its leaf chains to."""
    with open(os.path.join(node.root, TRUST.lstrip("/"), "issuer.pem")) as f:
        body = "".join(line for line in f.read().splitlines() if not line.startswith("-----"))
    return hashlib.sha256(base64.b64decode(body)).hexdigest()


def address(unit):
    """Where replica N of `pimesh-control@N.service` listens."""
    return f"127.0.0.1:{8085 + int(unit.split('@')[1].split('.')[0])}"


def loads(node, unit):
    """How many times the replica has loaded its inputs (start, reloads)."""
    return node.journal(unit).count("loaded: site lab")


def test_the_init_node_runs_three_replicas_and_its_proxy_takes_its_leaf_from_them(node):
    status = node.status()
    assert status["control"]["runs_replicas"]
    assert status["control"]["proxy_control"] == ["127.0.0.1:8086", "127.0.0.1:8087", "127.0.0.1:8088"]
    for unit in CONTROLS:
        assert node.show(unit, "User")["User"] == "pimesh-control"
    key = os.path.join(node.root, TRUST.lstrip("/"), "issuer.key")
    assert os.stat(key).st_mode & 0o777 == 0o600

    config = node.wait_for("the proxy's leaf from a replica", lambda: (
        (c := proxy_config(node)) and c["identity"] and c["identity"]["source"] == "control" and c))
    assert config["identity"]["ids"] == ["spiffe://lab/node/pi-a"]
    assert config["enrollment"]["signed_by"] in status["control"]["proxy_control"]
    assert config["control"]["connected"] and config["control"]["source"] == "live"


def test_killed_replicas_are_healed_and_the_proxy_keeps_watching(node):
    before = proxy_config(node)["control"]["replica"]
    victims = [u for u in CONTROLS if address(u) == before]
    victims += [u for u in CONTROLS if u not in victims][:1]
    pids = {u: node.main_pid(u) for u in victims}
    for unit, pid in pids.items():
        node.kill(pid)

    def healed():
        units = {u["name"]: u for u in node.status()["units"]}
        return all(units[u]["ready"] and units[u]["main_pid"] not in (None, 0, pids[u]) for u in victims)

    node.wait_for("the killed replicas healed", healed, timeout=30)
    control = node.wait_for("the proxy watching a replica", lambda: (
        (c := proxy_config(node)["control"]) and c["connected"] and c))
    assert control["source"] == "live"
    assert proxy_config(node)["identity"]["source"] in ("control", "cache")


def test_an_issuer_rotation_reaches_the_replicas_without_a_restart(node):
    old_issuer = issuer_sha256(node)
    assert proxy_config(node)["identity"]["issuer_sha256"] == old_issuer
    replica_pids = [node.main_pid(u) for u in CONTROLS]
    loaded_before = [loads(node, u) for u in CONTROLS]

    rotated = node.run(["pimesh-supervisor", "trust", "rotate-issuer"])
    assert "issuer rotated" in rotated.stdout
    new_issuer = issuer_sha256(node)
    assert new_issuer != old_issuer
    status = json.loads(node.run(["pimesh-supervisor", "trust", "status"]).stdout)
    assert len(status["anchors"]) == 1, "an issuer rotation keeps the anchor"

    # The replicas notice the swapped trust folder by themselves (no restart, no reload);
    # a proxy start asks for a leaf at once.
    node.wait_for("every replica on the new issuer", lambda: all(
        loads(node, u) > before for u, before in zip(CONTROLS, loaded_before)), timeout=10)
    node.systemctl("restart", PROXY)
    config = node.wait_for("a leaf from the new issuer", lambda: (
        (c := proxy_config(node)) and c["identity"] and c["identity"]["issuer_sha256"] == new_issuer and c),
        timeout=30)
    assert config["identity"]["source"] == "control"
    assert [node.main_pid(u) for u in CONTROLS] == replica_pids, "replicas were not restarted"
