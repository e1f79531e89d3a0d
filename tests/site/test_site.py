"""A site of several nodes, formed by themselves: each node is a systemd-nspawn container of
the amd64 root built by the image recipe (real systemd, D-Bus, supervisor, proxy, control
replicas), in its own network namespace, all joined to one bridge that the test makes in
a namespace of its own (with dnsmasq as the site's DHCP server). Nothing leaves the machine:
every address is inside the test's namespaces, and mDNS stays on the test's bridge.

The cards are flashed the way an operator would: `pimeshctl site init` makes the site, the
init node's card gets the site's trust root (`pimesh-trust/`) and a seed with
`role = "init"`; every other card gets the same seed with `role = "join"` and nothing
else — no anchor, no server list, no step after boot. The site asks for two servers
(`[k3s] servers = 2`), so the first node to join becomes a server and the next an agent.
"""

import base64
import hashlib
import os
import subprocess
import tempfile
import uuid

import pytest

from harness.container import Container
from harness.paths import host_binary

PIMESHCTL = host_binary("pimeshctl")
BRIDGE_NET = "192.168.215"
JOIN_TIMEOUT = float(os.environ.get("PIMESH_SITE_JOIN_TIMEOUT", "180"))
CLUSTER = 'site = "lab"\n\n[k3s]\nservers = 2\n'


def sh(*argv):
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


class Lan:
    """A bridge in a network namespace of its own, with dnsmasq handing out addresses, and
    one namespace per node plugged into it by a veth pair (`eth0` on the node's side)."""

    def __init__(self):
        self.tag = uuid.uuid4().hex[:6]
        self.ns = f"pm-lan-{self.tag}"
        self.dir = tempfile.mkdtemp(prefix="pimesh-lan-", dir="/var/tmp")
        self.nodes = []
        self.dnsmasq = None
        sh("ip", "netns", "add", self.ns)
        sh("ip", "-n", self.ns, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.ns, "addr", "add", f"{BRIDGE_NET}.1/24", "dev", "br0")
        sh("ip", "-n", self.ns, "link", "set", "br0", "up")
        sh("ip", "-n", self.ns, "link", "set", "lo", "up")
        self.dnsmasq = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.ns}", "dnsmasq", "--keep-in-foreground",
             "--conf-file=/dev/null", "--port=0", "--interface=br0", "--bind-interfaces",
             f"--dhcp-range={BRIDGE_NET}.50,{BRIDGE_NET}.99,255.255.255.0,1h",
             "--dhcp-authoritative", f"--dhcp-leasefile={self.dir}/leases",
             f"--pid-file={self.dir}/dnsmasq.pid", "--log-facility=-"],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.dir, "dnsmasq.log"), "w"))

    def plug(self, index):
        """A namespace for node `index`, plugged into the bridge; returns its name."""
        ns = f"pm-n{index}-{self.tag}"
        outside, inside = f"pmb{index}{self.tag}", f"pmi{index}{self.tag}"
        sh("ip", "netns", "add", ns)
        self.nodes.append(ns)
        sh("ip", "link", "add", inside, "type", "veth", "peer", "name", outside)
        sh("ip", "link", "set", inside, "netns", ns)
        sh("ip", "-n", ns, "link", "set", inside, "name", "eth0")
        sh("ip", "link", "set", outside, "netns", self.ns)
        sh("ip", "-n", self.ns, "link", "set", outside, "master", "br0")
        sh("ip", "-n", self.ns, "link", "set", outside, "up")
        return ns

    def close(self):
        if self.dnsmasq:
            self.dnsmasq.terminate()
            self.dnsmasq.wait(timeout=10)
        for ns in self.nodes + [self.ns]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


class SiteKeys:
    """The site as `pimeshctl site init` makes it."""

    def __init__(self, name="lab"):
        self.dir = tempfile.mkdtemp(prefix="pimesh-site-", dir="/var/tmp")
        self.keys = os.path.join(self.dir, name)
        subprocess.run([PIMESHCTL, "site", "init", name, "--out", self.keys],
                       capture_output=True, text=True, check=True)
        self.name = name
        with open(os.path.join(self.keys, "join-token")) as f:
            self.token = f.read().strip()

    def seed(self, role, node):
        return f'site = "{self.name}"\nrole = "{role}"\nnode = "{node}"\njoin_token = "{self.token}"\n'

    def read(self, name):
        with open(os.path.join(self.keys, name)) as f:
            return f.read()


def boot_node(lan, keys, index, role, node, extra_files=None):
    ns = lan.plug(index)
    container = Container(network=f"--network-namespace-path=/run/netns/{ns} --capability=CAP_NET_ADMIN")
    container.write("/boot/firmware/pimesh.toml", keys.seed(role, node))
    container.write("/etc/pimesh/cluster.toml", CLUSTER)
    for path, text in (extra_files or {}).items():
        container.write(path, text)
    container.boot()
    return container


@pytest.fixture(scope="module")
def site():
    lan = Lan()
    keys = SiteKeys()
    nodes = {}
    try:
        trust = {f"/boot/firmware/pimesh-trust/{name}": keys.read(name)
                 for name in ("anchor.pem", "issuer.pem", "issuer.key")}
        nodes["pi-a"] = boot_node(lan, keys, 1, "init", "pi-a", trust)
        # Every other card: the same seed, role join, nothing else.
        nodes["pi-b"] = boot_node(lan, keys, 2, "join", "pi-b")
        nodes["pi-c"] = boot_node(lan, keys, 3, "join", "pi-c")
        yield {"lan": lan, "keys": keys, "nodes": nodes}
    finally:
        for container in nodes.values():
            container.shutdown()
        lan.close()


def joined(node):
    status = node.status()
    return status if status["join"]["state"] == "joined" else None


def leaf_source(node):
    config = node.proxy_config()
    return config and config["identity"] and config["identity"]["source"]


def test_the_cards_form_a_site_by_themselves(site):
    nodes = site["nodes"]
    a, b, c = nodes["pi-a"], nodes["pi-b"], nodes["pi-c"]
    assert a.wait_for("the init node", lambda: a.status()["join"]["state"] == "init", timeout=60)
    # pi-b and pi-c race; the first to join is the site's second server, the other an agent.
    statuses = {name: node.wait_for(f"{name} joined", lambda node=node: joined(node), timeout=JOIN_TIMEOUT,
                                    interval=1)
                for name, node in (("pi-b", b), ("pi-c", c))}
    roles = sorted(s["join"]["role"] for s in statuses.values())
    assert roles == ["agent", "server"], statuses
    for name, status in statuses.items():
        via = status["join"]["via"]
        assert via["node"] == "pi-a" or via["node"] in nodes, status["join"]
        assert status["join"]["last_error"] is None, status["join"]
    server = b if statuses["pi-b"]["join"]["role"] == "server" else c
    agent = c if server is b else b
    # A server node holds the issuer and runs replicas; an agent never holds the issuer.
    assert os.path.exists(os.path.join(server.root, "var/lib/pimesh/trust/issuer.key"))
    assert not os.path.exists(os.path.join(agent.root, "var/lib/pimesh/trust/issuer.key"))
    server.wait_for("the server's replicas", lambda: server.status()["control"]["runs_replicas"], timeout=60)
    assert not agent.status()["control"]["runs_replicas"]
    # Every proxy holds a leaf from a replica.
    for name, node in nodes.items():
        node.wait_for(f"{name}'s proxy leaf from a replica", lambda node=node: leaf_source(node) == "control",
                      timeout=120, interval=1)
    # The init node's replicas recorded both joins.
    joins = a.wait_for("both joins in the init node's status",
                       lambda: (j := a.status()["joins"]) and {r["node"] for r in j if r["result"] == "joined"}
                       >= {"pi-b", "pi-c"} and j, timeout=30, interval=1)
    assert all(r["from"].startswith(BRIDGE_NET) for r in joins if r["result"] == "joined"), joins


def test_the_node_certificates_are_the_nodes_own(site):
    keys = site["keys"]
    anchor = keys.read("anchor.pem")
    for name in ("pi-b", "pi-c"):
        node = site["nodes"][name]
        identity = os.path.join(node.root, "var/lib/pimesh/identity")
        with open(os.path.join(identity, "anchor.pem")) as f:
            assert f.read() == anchor
        out = subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in",
                              os.path.join(identity, "node.pem")], capture_output=True, text=True, check=True).stdout
        assert f"URI:spiffe://lab/node/{name}" in out, out
        cert_key = subprocess.run(["openssl", "x509", "-noout", "-pubkey", "-in", os.path.join(identity, "node.pem")],
                                  capture_output=True, text=True, check=True).stdout
        own_key = subprocess.run(["openssl", "pkey", "-pubout", "-in", os.path.join(identity, "node.key")],
                                 capture_output=True, text=True, check=True).stdout
        assert cert_key == own_key, f"{name}: the certificate is for the key the node made"
