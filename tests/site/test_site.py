"""A site of several nodes, formed by themselves: each node is a systemd-nspawn container of
the amd64 root built by the image recipe (real systemd, D-Bus, supervisor, proxy, control
replicas), in its own network namespace, all joined to one bridge that the test makes in
a namespace of its own (with dnsmasq as the site's DHCP server). Nothing leaves the machine:
every address is inside the test's namespaces, and mDNS stays on the test's bridge.

The cards are flashed the way an operator would: `pimeshctl site init` makes the site, the
init node's card gets the site's trust root (`pimesh-trust/`) and a seed with
`role = "init"`; every other card gets the same seed with `role = "join"` and nothing
else — no anchor, no server list, no step after boot. The site asks for three servers
(`[k3s] servers = 3`), so with four cards the init node and the first two nodes to join
are servers and the last an agent.
Every node starts with the same site configuration in `/etc/pimesh/cluster.toml` (what
the central server would deliver over the air; OTA has its own tests): a service `web`
on the init node that only the node `pi-d` may call, and control replicas that sign
leaves for 40 s, so that renewals happen within the test. The nodes boot in parallel.

Cases, in order (each builds on the site the previous ones left):
  1. the cards form the site by themselves: roles, issuer only on servers, leaves;
  2. each joined node's certificate is for its own name and its own key;
  3. a request from a client on pi-d to `web` on pi-a crosses both proxies with mTLS,
     and the allow list refuses the same request from pi-b (so the identity pi-a's proxy
     saw is the caller's node);
  4. the init node is powered off: the other nodes' proxies keep renewing their leaves
     from the joined servers' replicas, and a fifth card still joins the site;
  5. a card with a wrong token is refused, says why, and changes nothing on the site;
  6. a board re-flashed under the name of a running node (a new key) is refused that
     name while the old board lives, and takes it once the old board is gone.

Figures (printed, never asserted; `make bench-site`): seconds from the supervisor's start
to the node's certificate, per node, and the memory of each daemon on a server and on an
agent.
"""

import concurrent.futures
import datetime
import os
import time
import subprocess
import tempfile
import uuid

import pytest

from harness.container import Container
from harness.paths import host_binary

PIMESHCTL = host_binary("pimeshctl")
BRIDGE_NET = "192.168.215"
JOIN_TIMEOUT = float(os.environ.get("PIMESH_SITE_JOIN_TIMEOUT", "180"))
LEAF_LIFETIME = 40
CLUSTER = ('site = "lab"\n\n[k3s]\nservers = 3\n\n'
           '[services.web]\nport = 8080\nlocal_port = 18080\nnodes = ["pi-a"]\n'
           'allow = ["spiffe://lab/node/pi-d"]\n')
JOINERS = ("pi-b", "pi-c", "pi-d")
# The replicas sign short leaves in this test, so that renewals happen while it runs.
CONTROL_DROPIN = ("[Service]\nExecStart=\nExecStart=/usr/bin/pimesh-control --replica %i "
                  f"--leaf-lifetime {LEAF_LIFETIME} $PIMESH_CONTROL_ARGS\n")
# A tiny web app (the host's python3 in a node's network namespace: the root has none):
# answers every GET with the text "web on <argv[1]>".
WEB_APP = r"""
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"web on {sys.argv[1]}".encode()
        self.send_response(200); self.send_header("content-length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", 8080), H).serve_forever()
"""
# GET through the local proxy's service port (the host's python3 in the node's network
# namespace); prints the status and the body.
GET_LOCAL = r"""
import sys, urllib.request, urllib.error
try:
    with urllib.request.urlopen(sys.argv[1], timeout=10) as r:
        print(r.status, r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode())
except Exception as e:
    print(0, repr(e))
"""


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


def prepare_node(lan, keys, index, role, node, extra_files=None):
    """A container for `node` plugged into the LAN, its card written; not booted."""
    ns = lan.plug(index)
    container = Container(network=f"--network-namespace-path=/run/netns/{ns} --capability=CAP_NET_ADMIN")
    container.write("/boot/firmware/pimesh.toml", keys.seed(role, node))
    container.write("/etc/pimesh/cluster.toml", CLUSTER)
    container.write("/etc/systemd/system/pimesh-control@.service.d/test-leaf-lifetime.conf", CONTROL_DROPIN)
    for path, text in (extra_files or {}).items():
        container.write(path, text)
    return container


def boot_all(containers):
    """Boots the containers in parallel; raises the first failure."""
    with concurrent.futures.ThreadPoolExecutor(len(containers)) as pool:
        for future in [pool.submit(c.boot) for c in containers]:
            future.result()


@pytest.fixture(scope="module")
def site():
    lan = Lan()
    keys = SiteKeys()
    nodes = {}
    try:
        trust = {f"/boot/firmware/pimesh-trust/{name}": keys.read(name)
                 for name in ("anchor.pem", "issuer.pem", "issuer.key")}
        nodes["pi-a"] = prepare_node(lan, keys, 1, "init", "pi-a", trust)
        # Every other card: the same seed, role join, nothing else.
        for index, name in enumerate(JOINERS, start=2):
            nodes[name] = prepare_node(lan, keys, index, "join", name)
        boot_all(list(nodes.values()))
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


def seconds_to_join(status):
    """From the supervisor's start to the node's certificate (the join record's time)."""
    joined_at = datetime.datetime.fromisoformat(status["join"]["joined_at"].replace("Z", "+00:00"))
    return joined_at.timestamp() - status["started_at"]


def memory_mib(node, unit):
    """The resident memory of the unit's main process (a container has no memory
    accounting of its own)."""
    pid = node.main_pid(unit)
    status = node.run(["cat", f"/proc/{pid}/status"], check=False).stdout if pid else ""
    rss = next((line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")), None)
    return round(int(rss) / 1024, 1) if rss else None


def test_the_cards_form_a_site_by_themselves(site, figures):
    nodes = site["nodes"]
    a = nodes["pi-a"]
    assert a.wait_for("the init node", lambda: a.status()["join"]["state"] == "init", timeout=60)
    # The joiners race: the first two to join are the site's other servers, the last an agent.
    statuses = {name: nodes[name].wait_for(f"{name} joined", lambda node=nodes[name]: joined(node),
                                           timeout=JOIN_TIMEOUT, interval=1)
                for name in JOINERS}
    roles = sorted(s["join"]["role"] for s in statuses.values())
    assert roles == ["agent", "server", "server"], {n: s["join"] for n, s in statuses.items()}
    for name, status in statuses.items():
        assert status["join"]["last_error"] is None, status["join"]
        assert status["join"]["via"]["address"].startswith(BRIDGE_NET), status["join"]
    servers = [nodes[n] for n, s in statuses.items() if s["join"]["role"] == "server"]
    agent = next(nodes[n] for n, s in statuses.items() if s["join"]["role"] == "agent")
    # A server node holds the issuer and runs replicas; an agent never holds the issuer.
    for server in servers:
        assert os.path.exists(os.path.join(server.root, "var/lib/pimesh/trust/issuer.key"))
        server.wait_for("a joined server's replicas",
                        lambda server=server: server.status()["control"]["runs_replicas"], timeout=60)
    assert not os.path.exists(os.path.join(agent.root, "var/lib/pimesh/trust/issuer.key"))
    assert not agent.status()["control"]["runs_replicas"]
    # Every proxy holds a leaf from a replica.
    for name, node in nodes.items():
        node.wait_for(f"{name}'s proxy leaf from a replica", lambda node=node: leaf_source(node) == "control",
                      timeout=120, interval=1)
    # The servers' replicas recorded every join, with the joiner's address on the LAN.
    def recorded():
        records = [r for node in [a, *servers] for r in node.status()["joins"] if r["result"] == "joined"]
        return {r["node"] for r in records} >= set(JOINERS) and records
    records = a.wait_for("every join in the servers' status", recorded, timeout=30, interval=1)
    assert all(r["from"].startswith(BRIDGE_NET) for r in records), records
    for name, status in statuses.items():
        figures[f"site_{name}_{status['join']['role']}_start_to_certificate_s"] = round(seconds_to_join(status), 1)
    for kind, node in (("server", servers[0]), ("agent", agent)):
        for unit in ("pimesh-supervisor.service", "pimesh-proxy.service", "pimesh-control@1.service"):
            figures[f"site_{kind}_{unit.split('.')[0]}_memory_mib"] = memory_mib(node, unit)


def test_the_node_certificates_are_the_nodes_own(site):
    keys = site["keys"]
    anchor = keys.read("anchor.pem")
    for name in JOINERS:
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


def get_via_proxy(node, url):
    out = subprocess.run(["nsenter", "-t", str(node.leader), "-n", "python3", "-c", GET_LOCAL, url],
                         capture_output=True, text=True, timeout=40).stdout.strip()
    code, _, body = out.partition(" ")
    return int(code or 0), body


def test_a_request_crosses_both_proxies_with_mtls_and_the_allow_list_sees_the_caller(site):
    nodes = site["nodes"]
    a, b, d = nodes["pi-a"], nodes["pi-b"], nodes["pi-d"]
    app = subprocess.Popen(["nsenter", "-t", str(a.leader), "-n", "python3", "-c", WEB_APP, "pi-a"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        answer = d.wait_for("web on pi-a through both proxies from pi-d",
                            lambda: (r := get_via_proxy(d, "http://127.0.0.1:18080/")) and r[0] == 200 and r,
                            timeout=90, interval=1)
        assert answer[1] == "web on pi-a", answer
        # pi-b's proxy may learn pi-a's address a little later (discovery converges as the
        # proxies heartbeat to every server's replicas); then the allow list answers.
        refused = b.wait_for("pi-b's request answered by pi-a's proxy",
                             lambda: (r := get_via_proxy(b, "http://127.0.0.1:18080/")) and r[0] != 503 and r,
                             timeout=90, interval=1)
        assert refused[0] == 403, refused
        metrics = a.http_get("http://127.0.0.1:4191/metrics")[1]
        assert "tls_handshake" in metrics or "inbound" in metrics
    finally:
        app.kill()
        app.wait()


def leaf_not_after(node):
    config = node.proxy_config()
    return config and config["identity"] and config["identity"]["source"] == "control" and \
        config["identity"]["not_after"]


def test_the_site_survives_the_loss_of_its_init_node(site):
    nodes = site["nodes"]
    nodes.pop("pi-a").shutdown(timeout=20)
    before = {name: leaf_not_after(nodes[name]) for name in JOINERS}
    # Leaves of LEAF_LIFETIME seconds renew at two thirds of their life: two renewals later
    # every leaf was signed after the init node was gone, by the joined servers' replicas.
    for name in JOINERS:
        node = nodes[name]
        first = node.wait_for(f"{name}: a leaf renewed without the init node",
                              lambda node=node, name=name: (n := leaf_not_after(node)) and n > before[name] and n,
                              timeout=LEAF_LIFETIME * 3, interval=1)
        node.wait_for(f"{name}: a second renewal",
                      lambda node=node, first=first: (n := leaf_not_after(node)) and n > first,
                      timeout=LEAF_LIFETIME * 3, interval=1)
    # A fifth card joins through the remaining servers.
    e = prepare_node(site["lan"], site["keys"], 5, "join", "pi-e")
    nodes["pi-e"] = e
    e.boot()
    e.wait_for("pi-e joined", lambda: joined(e), timeout=JOIN_TIMEOUT, interval=1)
    e.wait_for("pi-e's proxy leaf", lambda: leaf_source(e) == "control", timeout=120, interval=1)


def test_a_card_with_a_wrong_token_is_refused_and_changes_nothing(site):
    keys = site["keys"]
    wrong_secret = keys.token.split("::")[0] + "::" + "W" * 24
    seed = keys.seed("join", "pi-x").replace(keys.token, wrong_secret)
    x = prepare_node(site["lan"], keys, 6, "join", "pi-x", {"/boot/firmware/pimesh.toml": seed})
    site["nodes"]["pi-x"] = x
    x.boot()
    status = x.wait_for("pi-x refused", lambda: (s := x.status())["join"]["state"] == "refused" and s,
                        timeout=JOIN_TIMEOUT, interval=1)
    assert "wrong_token" in status["join"]["last_error"], status["join"]
    assert not os.path.exists(os.path.join(x.root, "var/lib/pimesh/identity/node.pem"))
    servers = [node for name, node in site["nodes"].items() if name != "pi-x"]
    joins = servers[0].wait_for("the refusal in a server's joins", lambda: [
        j for node in servers for j in node.status()["joins"] if j["node"] == "pi-x"], timeout=30, interval=1)
    assert all(j["result"] == "wrong_token" for j in joins), joins
    # Nothing changed on the site: the nodes keep their roles and no pi-x appears.
    for node in servers:
        assert node.status()["join"]["state"] in ("init", "joined")


def node_key_sha256(node):
    out = subprocess.run(["openssl", "pkey", "-pubout", "-in",
                          os.path.join(node.root, "var/lib/pimesh/identity/node.key")],
                         capture_output=True, text=True, check=True).stdout
    return out


def test_a_reflashed_board_takes_its_name_back_once_the_old_one_is_gone(site):
    nodes = site["nodes"]
    name = next(n for n in JOINERS if nodes[n].status()["join"]["role"] == "agent")
    old = nodes[name]
    old_key = node_key_sha256(old)
    # The same card, flashed again: a new root filesystem, a new key, the same name.
    new = prepare_node(site["lan"], site["keys"], 7, "join", name)
    nodes[f"{name}-reflashed"] = new
    new.boot()
    status = new.wait_for(f"the re-flashed {name} refused while the old board lives",
                          lambda: (s := new.status())["join"]["last_error"] and "name_taken" in s["join"]["last_error"]
                          and s, timeout=JOIN_TIMEOUT, interval=1)
    assert status["join"]["state"] != "joined", status["join"]
    del nodes[name]
    old.shutdown(timeout=20)
    status = new.wait_for(f"the re-flashed {name} joined", lambda: joined(new), timeout=JOIN_TIMEOUT, interval=1)
    assert status["join"]["last_error"] is None, status["join"]
    assert node_key_sha256(new) != old_key, "the re-flashed board made its own key"
    new.wait_for(f"the re-flashed {name}'s proxy leaf", lambda: leaf_source(new) == "control",
                 timeout=120, interval=1)
