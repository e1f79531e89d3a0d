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
Every node starts with the same site configuration in `/etc/pimesh/cluster.toml` (as an
operator may put on the cards; the revisions published later replace it): a service `web`
on the init node that only the node `pi-d` may call, and control replicas that sign
leaves for 40 s, so that renewals happen within the test. The nodes boot in parallel.

Cases, in order (each builds on the site the previous ones left):
  1. the cards form the site by themselves: roles, issuer only on servers, leaves;
     K3s (the fixture, see below) runs on every node as its role says, with the config
     rendered for that role, and the cluster lists every node Ready; two of the three K3s
     servers hang and no supervisor restarts a K3s server (quorum), then all recover;
  2. each joined node's certificate is for its own name and its own key;
  3. a request from a client on pi-d to `web` on pi-a crosses both proxies with mTLS,
     and the allow list refuses the same request from pi-b (so the identity pi-a's proxy
     saw is the caller's node); a Kubernetes Service that the site config's manifest
     deploys (K3s servers only) is read from K3s's API by the control replicas and
     reached at its cluster IP from pi-a, through pi-a's iptables redirect and both
     proxies, at its endpoint on pi-c;
  4. one publish on the real central server (in the bridge's namespace, on the LAN's
     first address) reaches every node, and each reports it (with its K3s); a revision
     that changes `[k3s] disable` restarts each K3s server for its new config, in turn,
     and leaves the agent's K3s alone;
  5. the init node is powered off: the other nodes' proxies keep renewing their leaves
     from the joined servers' replicas before they run out (asking the lost node's
     replicas first costs no more than a hedging delay), a fifth card still joins the site, and a revision
     still applies on every live node;
  6. the init node is powered on again: it takes the revision it missed, its proxy learns
     the joined servers, and the nodes reach its service again, the one that joined while
     it was off too; the site's K3s lists five nodes Ready, three servers and two agents;
  7. the agent's cable is pulled for longer than its leaf's life while a revision goes
     out, then plugged back in: the node takes a fresh leaf and the revision it missed,
     and reaches the service again, by itself;
  8. a card with a wrong token is refused, says why, and changes nothing on the site;
  9. another site of the same name on the LAN: a card of ours whose seed lists the other
     site's server first sends it nothing (its bundle fails the token's pin) and joins
     ours; a card of the other site joins its own; neither site records the other's cards;
 10. a board re-flashed under the name of a running node (a new key) is refused that
     name while the old board lives, and takes it once the old board is gone;
 11. the LAN renumbers (a new DHCP server with other addresses, every cable down and up,
     the init node's last): the joined nodes find the servers again by mDNS, every proxy
     takes a fresh leaf, the init node (whom no node looked for) finds the other servers,
     the service answers again, and a revision reaches every node.
 12. the Fleetman demo (`demo/`, the host's `pimesh-demo` copied into the nodes) runs
     across the site: a revision places its services on pi-a (page, gateway, stable staff),
     pi-b (tracker, error injector) and pi-c (the TCP queue, with the simulator) and sends
     spans to a Zipkin collector the test runs on the bridge; each part is a transient
     unit of its node. `pimesh-demo page-check` drives the page in headless Chromium in the
     LAN's namespace: eight vehicles move, the live feed crosses both relays as
     WebSockets, ~10 % of 2000+ staff calls fail (the 90/10 split), and a fault published
     on the tracker shows on the page's mesh panel. A sampled request leaves a CLIENT and
     a SERVER span per mesh hop at the collector. `make demo` runs this case alone (the
     site boots for it), PIMESH_DEMO_HOLD=1 keeps it up with the page on 127.0.0.1:8080.

K3s cannot be had on our machines: every node runs the test fixture `k3s-fixture`
(`k3s-fixture/`, a stand-in that accepts exactly v1.34.3+k3s1's flags and config keys and
answers the Kubernetes API shapes the supervisor reads) as /usr/local/bin/k3s, unless
$K3S_BIN names a real K3s binary.

Figures (printed, never asserted; `make bench-site`): seconds from the supervisor's start
to the node's certificate, per node, the memory of each daemon on a server and on an
agent, seconds from plugging the cut-off node back in to its fresh leaf, and from the
renumbered LAN's cables up to every node's fresh leaf, and from the init node's cable back
in to a node reaching its service; for the demo: the staff error share
the page shows, seconds from the fault's publish to the page showing it, and each mesh
hop's latency at ~100 requests per second.
"""

import concurrent.futures
import contextlib
import json
import os
import time
import shutil
import subprocess
import tempfile
import threading
import uuid

import base64

import pytest
import yaml

from harness import scratch
from harness.container import Container
from harness.ota_site import Site
from harness.paths import host_binary
from harness.wait import wait_for

BRIDGE_NET = "192.168.215"
CENTRAL_PORT = 8443
JOIN_TIMEOUT = float(os.environ.get("PIMESH_SITE_JOIN_TIMEOUT", "180"))
# dnsmasq's default: before it offers an address it pings it and waits for no answer, one
# address at a time, so boards that boot together get their leases ~3 s apart (the fourth
# ~12 s in). PIMESH_SITE_DHCP_PING=0 runs the LAN's DHCP server without that check (as
# many routers do): `make bench-site` measures the join both ways.
DHCP_PING = os.environ.get("PIMESH_SITE_DHCP_PING", "1") != "0"
LEAF_LIFETIME = 40
# A Kubernetes Service of a namespace labelled for the mesh, as K3s's auto-deploy folder
# takes it: a Service without a selector and its EndpointSlice, whose one endpoint (a
# "pod" this test runs itself: the fixture runs no pods) listens at TRACKER_POD on pi-c.
TRACKER_IP, TRACKER_POD = "10.43.100.10", "10.42.3.7"
# The Gateway API's CRDs, a canary of the tracker (its one endpoint at CANARY_POD on pi-c)
# and an HTTPRoute that sends the tracker's requests marked `x-canary: 1` to it.
CANARY_POD = "10.42.3.8"


def k3s_manifest(name):
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "k3s", name)) as f:
        return "".join(line for line in f if not line.startswith("#"))


FLEET_MANIFEST, GATEWAY_MANIFEST = k3s_manifest("fleet.yaml"), k3s_manifest("gateway.yaml")
CLUSTER = ('site = "lab"\n\n[k3s]\nservers = 3\n\n'
           f'[k3s.manifests]\nfleet = """\n{FLEET_MANIFEST}"""\n'
           f'gateway = """\n{GATEWAY_MANIFEST}"""\n\n'
           '[services.web]\nport = 8080\nlocal_port = 18080\nnodes = ["pi-a"]\n'
           'allow = ["spiffe://lab/node/pi-d"]\n'
           '[services.echo]\nport = 8081\nlocal_port = 18081\nnodes = ["pi-c"]\n')
JOINERS = ("pi-b", "pi-c", "pi-d")
# What runs as K3s on every node: a real K3s binary, or the test fixture (`make host-bins`).
K3S_BIN = os.environ.get("K3S_BIN") or host_binary("k3s-fixture")
# The supervisor's K3S_STARTUP_GRACE: probe failures of a K3s process this young do not
# count towards a hang.
K3S_STARTUP_GRACE_S = 120
# The replicas sign short leaves in this test, so that renewals happen while it runs.
CONTROL_DROPIN = ("[Service]\nExecStart=\nExecStart=/usr/bin/pimesh-control --replica %i "
                  f"--leaf-lifetime {LEAF_LIFETIME} $PIMESH_CONTROL_ARGS\n")
# A tiny web app (the host's python3 in a node's network namespace: the root has none):
# answers every GET with the text "web on <argv[1]>", on port argv[2] of address argv[3]
# (127.0.0.1 when not given).
WEB_APP = r"""
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"web on {sys.argv[1]}".encode()
        self.send_response(200); self.send_header("content-length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
host = sys.argv[3] if len(sys.argv) > 3 else "127.0.0.1"
http.server.ThreadingHTTPServer((host, int(sys.argv[2])), H).serve_forever()
"""
# Steady requests through the local proxy's service port, one every 50 ms, until the file
# argv[2] exists (at most 20 minutes' worth): prints a JSON summary of what was answered.
STEADY_REQUESTS = r"""
import json, os, sys, time, urllib.request
ok = failed = 0
gap = last_ok = None
errors = []
start = time.monotonic()
for _ in range(24000):
    if os.path.exists(sys.argv[2]):
        break
    try:
        with urllib.request.urlopen(sys.argv[1], timeout=5) as r:
            r.read()
        now = time.monotonic()
        if last_ok is not None:
            gap = max(gap or 0, now - last_ok)
        ok, last_ok = ok + 1, now
    except Exception as e:
        failed += 1
        errors = (errors + [f"{time.monotonic() - start:.1f} s: {e!r}"])[-5:]
    time.sleep(0.05)
print(json.dumps({"ok": ok, "failed": failed, "longest_gap_s": gap, "last_errors": errors}))
"""
# GET through the local proxy's service port (the host's python3 in the node's network
# namespace); prints the status and the body.
GET_LOCAL = r"""
import sys, urllib.request, urllib.error
headers = dict(h.split(": ", 1) for h in sys.argv[2:])
try:
    with urllib.request.urlopen(urllib.request.Request(sys.argv[1], headers=headers), timeout=10) as r:
        print(r.status, r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode())
except Exception as e:
    print(0, repr(e))
"""

# GET over HTTPS with a client certificate (the host's python3 in a node's network
# namespace): argv URL CA CERT KEY; prints the body, fails on a non-2xx answer.
KUBE_GET = r"""
import ssl, sys, urllib.request
context = ssl.create_default_context(cafile=sys.argv[2])
context.load_cert_chain(sys.argv[3], sys.argv[4])
with urllib.request.urlopen(sys.argv[1], context=context, timeout=10) as r:
    print(r.read().decode())
"""


def sh(*argv):
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


class Lan:
    """A bridge in a network namespace of its own, with dnsmasq handing out addresses, and
    one namespace per node plugged into it by a veth pair (`eth0` on the node's side)."""

    def __init__(self):
        self.tag = uuid.uuid4().hex[:6]
        self.ns = f"pm-lan-{self.tag}"
        self.dir = scratch.folder("pimesh-lan-")
        self.nodes = []
        self.ports = {}
        self.dnsmasq = None
        sh("ip", "netns", "add", self.ns)
        sh("ip", "-n", self.ns, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.ns, "addr", "add", f"{BRIDGE_NET}.1/24", "dev", "br0")
        sh("ip", "-n", self.ns, "link", "set", "br0", "up")
        sh("ip", "-n", self.ns, "link", "set", "lo", "up")
        self.start_dhcp(50, 99)

    def start_dhcp(self, first, last):
        """dnsmasq on the bridge, leasing BRIDGE_NET.first to .last."""
        self.dnsmasq = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.ns}", "dnsmasq", "--keep-in-foreground",
             "--conf-file=/dev/null", "--port=0", "--interface=br0", "--bind-interfaces",
             f"--dhcp-range={BRIDGE_NET}.{first},{BRIDGE_NET}.{last},255.255.255.0,1h",
             "--dhcp-authoritative", f"--dhcp-leasefile={self.dir}/leases",
             f"--pid-file={self.dir}/dnsmasq.pid", "--log-facility=-"]
            + ([] if DHCP_PING else ["--no-ping"]),
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.dir, "dnsmasq.log"), "a"))

    def renumber(self, first, last):
        """Replaces the DHCP server by one that leases other addresses and knows no lease
        (a replaced router)."""
        self.dnsmasq.terminate()
        self.dnsmasq.wait(timeout=10)
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(self.dir, "leases"))
        self.start_dhcp(first, last)

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
        self.ports[ns] = outside
        return ns

    def cut(self, ns):
        """Unplugs the node in namespace `ns` from the bridge (its cable pulled)."""
        sh("ip", "-n", self.ns, "link", "set", self.ports[ns], "down")

    def heal(self, ns):
        """Plugs it back in."""
        sh("ip", "-n", self.ns, "link", "set", self.ports[ns], "up")

    @staticmethod
    def address(ns):
        """The node's IPv4 address on the bridge (from DHCP), None while it has none."""
        out = sh("ip", "-n", ns, "-4", "-o", "addr", "show", "dev", "eth0")
        for word in out.split():
            if word.startswith(BRIDGE_NET + "."):
                return word.split("/")[0]
        return None

    def close(self):
        if self.dnsmasq:
            self.dnsmasq.terminate()
            self.dnsmasq.wait(timeout=10)
        for ns in self.nodes + [self.ns]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


class SiteKeys:
    """The site as `pimeshctl site init` makes it; with `lan`, the real central server
    serves it on the LAN's own address (the bridge's namespace) and the seeds name it."""

    def __init__(self, name="lab", lan=None):
        self.central = Site(name=name, address=f"{BRIDGE_NET}.1", port=CENTRAL_PORT,
                            netns=lan.ns if lan else None)
        self.keys = self.central.keys
        self.name = name
        self.serving = lan is not None
        with open(os.path.join(self.keys, "join-token")) as f:
            self.token = f.read().strip()
        if self.serving:
            self.central.start_central()

    def seed(self, role, node, top=""):
        seed = (f'site = "{self.name}"\nrole = "{role}"\nnode = "{node}"\n'
                f'join_token = "{self.token}"\n{top}\n')
        return seed + (self.central.central_table() if self.serving else "")

    def read(self, name):
        with open(os.path.join(self.keys, name)) as f:
            return f.read()


def prepare_node(lan, keys, index, role, node, extra_files=None):
    """A container for `node` plugged into the LAN, its card written; not booted."""
    ns = lan.plug(index)
    container = Container(network=f"--network-namespace-path=/run/netns/{ns} --capability=CAP_NET_ADMIN",
                          label=node)
    container.netns = ns
    container.write("/boot/firmware/pimesh.toml", keys.seed(role, node))
    container.write("/etc/pimesh/cluster.toml", CLUSTER)
    container.write("/etc/systemd/system/pimesh-control@.service.d/test-leaf-lifetime.conf", CONTROL_DROPIN)
    # K3s: the fixture stand-in, or a real K3s given as $K3S_BIN.
    k3s = os.path.join(container.root, "usr/local/bin/k3s")
    os.makedirs(os.path.dirname(k3s), exist_ok=True)
    shutil.copyfile(K3S_BIN, k3s)
    os.chmod(k3s, 0o755)
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
    keys = None
    nodes = {}
    # Nodes powered off by a case (their disks kept), and the nodes of another site.
    down, others = {}, {}
    try:
        keys = SiteKeys(lan=lan)
        trust = {f"/boot/firmware/pimesh-trust/{name}": keys.read(name)
                 for name in ("anchor.pem", "issuer.pem", "issuer.key")}
        nodes["pi-a"] = prepare_node(lan, keys, 1, "init", "pi-a", trust)
        # Every other card: the same seed, role join, nothing else.
        for index, name in enumerate(JOINERS, start=2):
            nodes[name] = prepare_node(lan, keys, index, "join", name)
        boot_all(list(nodes.values()))
        yield {"lan": lan, "keys": keys, "nodes": nodes, "down": down, "others": others}
    finally:
        for container in [*nodes.values(), *down.values(), *others.values()]:
            container.shutdown()
        if keys is not None:
            keys.central.close()
        lan.close()


def joined(node):
    status = node.status()
    return status if status["join"]["state"] == "joined" else None


def leaf_source(node):
    config = node.proxy_config()
    return config and config["identity"] and config["identity"]["source"]


def seconds_to_join_from(node, unit, needle):
    """From the first message of `unit` containing `needle` to the supervisor's "joined
    the site", by the node's journal; None without either."""
    since = journal_times(node, unit, needle, program=unit)
    joined = journal_times(node, "pimesh-supervisor", "joined the site", program="pimesh-supervisor")
    return round(joined[0] - since[0], 1) if since and joined else None


def memory_mib(node, unit, field="VmRSS"):
    """The resident memory of the unit's main process (a container has no memory
    accounting of its own): `field` of /proc/PID/status, VmRSS (all of it) or RssAnon
    (without the mapped binary and libraries, which the test profile's large binaries
    make the bigger and more variable part)."""
    pid = node.main_pid(unit)
    status = node.run(["cat", f"/proc/{pid}/status"], check=False).stdout if pid else ""
    rss = next((line.split()[1] for line in status.splitlines() if line.startswith(f"{field}:")), None)
    return round(int(rss) / 1024, 1) if rss else None


def cpu_percent(node, unit):
    """The share of one core the unit's main process used since it started (its
    /proc/PID/stat times over its age), or None."""
    pid = node.main_pid(unit)
    if not pid:
        return None
    stat = node.run(["cat", f"/proc/{pid}/stat"], check=False).stdout
    uptime = node.run(["cat", "/proc/uptime"], check=False).stdout.split()
    fields = stat.rsplit(")", 1)[-1].split()
    if len(fields) < 20 or not uptime:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    used = (int(fields[11]) + int(fields[12])) / ticks
    age = float(uptime[0]) - int(fields[19]) / ticks
    return round(100 * used / age, 2) if age > 0 else None


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
        # The boards boot together and wait for their DHCP leases (see DHCP_PING): the
        # join's own share is the time from the lease.
        role = status["join"]["role"]
        figures[f"site_{name}_{role}_start_to_certificate_s"] = seconds_to_join_from(
            nodes[name], "pimesh-supervisor", "starting")
        figures[f"site_{name}_{role}_lease_to_certificate_s"] = seconds_to_join_from(
            nodes[name], "systemd-networkd", "DHCPv4 address")
    figures["site_dhcp_ping"] = DHCP_PING
    for kind, node in (("server", servers[0]), ("agent", agent)):
        for unit in ("pimesh-supervisor.service", "pimesh-proxy.service", "pimesh-control@1.service"):
            figures[f"site_{kind}_{unit.split('.')[0]}_memory_mib"] = memory_mib(node, unit)
            figures[f"site_{kind}_{unit.split('.')[0]}_anon_memory_mib"] = memory_mib(node, unit, "RssAnon")


def k3s_ready(node):
    status = node.status()
    return status if status["k3s"]["ready"] else None


def k3s_config(node):
    """The node's rendered K3s config, and its file mode."""
    path = os.path.join(node.root, "etc/rancher/k3s/config.yaml")
    with open(path) as f:
        return yaml.safe_load(f), os.stat(path).st_mode & 0o777


def kube_get(node, path):
    """GET `path` of the K3s API on `node` (in its network namespace) with the admin
    kubeconfig K3s wrote there: the parsed JSON."""
    with open(os.path.join(node.root, "etc/rancher/k3s/k3s.yaml")) as f:
        kubeconfig = yaml.safe_load(f)
    cluster = kubeconfig["clusters"][0]["cluster"]
    user = kubeconfig["users"][0]["user"]
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for name, data in (("ca", cluster["certificate-authority-data"]),
                           ("cert", user["client-certificate-data"]), ("key", user["client-key-data"])):
            files[name] = os.path.join(tmp, name)
            with open(files[name], "wb") as f:
                f.write(base64.b64decode(data))
        out = subprocess.run(["nsenter", "-t", str(node.leader), "-n", "python3", "-c", KUBE_GET,
                              cluster["server"] + path, files["ca"], files["cert"], files["key"]],
                             capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise RuntimeError(f"GET {path} on the K3s API: {out.stderr.strip()[-300:]}")
    return json.loads(out.stdout)


def k3s_unit(node, name):
    return next(u for u in node.status()["units"] if u["name"] == name)


def test_k3s_runs_on_every_node_configured_for_its_role_and_the_cluster_lists_them(site, figures):
    """K3s here is the test fixture (`k3s-fixture`, a stand-in executable that accepts
    exactly v1.34.3+k3s1's flags and config keys and serves the API shapes the supervisor
    reads), or $K3S_BIN."""
    nodes = site["nodes"]
    token = None
    servers = set()
    for name, node in nodes.items():
        status = node.wait_for(f"K3s ready on {name}", lambda node=node: k3s_ready(node),
                               timeout=180, interval=1)
        role = "server" if name == "pi-a" else status["join"]["role"]
        k3s = status["k3s"]
        assert k3s["present"] and k3s["role"] == role, k3s
        assert k3s["unit"] == ("k3s.service" if role == "server" else "k3s-agent.service"), k3s
        assert k3s_unit(node, k3s["unit"])["active_state"] == "active"
        config, mode = k3s_config(node)
        assert mode == 0o600, f"{name}: config.yaml holds the token: mode {mode:o}"
        assert config["node-name"] == name
        assert config["node-ip"] == Lan.address(node.netns), config
        token = token or config["token"]
        assert config["token"] == token, "one K3s token for the site"
        if name == "pi-a":
            # The first server of a three-server site starts embedded etcd.
            assert config.get("cluster-init") is True and "server" not in config, config
        else:
            via = status["join"]["via"]["address"].rsplit(":", 1)[0]
            assert config["server"] == f"https://{via}:6443", config
            assert "cluster-init" not in config
        if role == "server":
            servers.add(name)
            assert config["write-kubeconfig-mode"] == "0600"
            assert config["disable"] == ["traefik"]
            assert config["node-ip"] in config["tls-san"]
        else:
            # An agent fails on any server-only key.
            assert set(config) == {"server", "token", "node-name", "node-ip"}, config
        figures[f"site_{name}_{role}_supervisor_start_to_k3s_ready_s_fixture"] = round(
            time.time() - status["started_at"], 1)
        # The supervisor's cost with K3s managed (its quorum and readiness checks included).
        figures[f"site_{name}_{role}_supervisor_cpu_percent_with_k3s"] = cpu_percent(node, "pimesh-supervisor.service")
        figures[f"site_{name}_{role}_supervisor_memory_mib_with_k3s"] = memory_mib(node, "pimesh-supervisor.service")
    # The token never travels on the card.
    for node in nodes.values():
        with open(os.path.join(node.root, "boot/firmware/pimesh.toml")) as f:
            assert token not in f.read()
    # The cluster lists every node, Ready; the servers with the control-plane role.
    def listed():
        items = kube_get(nodes["pi-a"], "/api/v1/nodes")["items"]
        ready = {n["metadata"]["name"] for n in items
                 if any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"]["conditions"])}
        return ready >= set(nodes) and items
    items = nodes["pi-a"].wait_for("every node Ready in the K3s API", listed, timeout=120, interval=1)
    control_plane = {n["metadata"]["name"] for n in items
                     if n["metadata"]["labels"].get("node-role.kubernetes.io/control-plane") == "true"}
    assert control_plane == servers, (control_plane, servers)


def test_k3s_servers_are_never_restarted_while_that_would_break_quorum(site):
    """Two of the three K3s servers hang (SIGSTOP): the third loses etcd quorum and is not
    ready, yet no supervisor restarts its K3s (that would only take another member away);
    each says why in its status. Resumed, all three are ready again without a restart."""
    nodes = site["nodes"]
    servers = [name for name, node in nodes.items()
               if name == "pi-a" or node.status()["join"]["role"] == "server"]
    assert len(servers) == 3, servers
    before = {name: (nodes[name].main_pid("k3s.service"),
                     k3s_unit(nodes[name], "k3s.service")["restarts_by_pimesh"]) for name in servers}
    hung, third = servers[1:], servers[0]
    for name in hung:
        nodes[name].systemctl("kill", "--signal=SIGSTOP", "k3s.service")
    try:
        for name in servers:
            node = nodes[name]
            # A K3s process that started less than K3s's startup grace (120 s) ago counts
            # as hung only from the grace's end: the heal comes (and is held) then.
            held = node.wait_for(f"{name} holding back its K3s restart",
                                 lambda node=node: k3s_unit(node, "k3s.service")["held_back"],
                                 timeout=K3S_STARTUP_GRACE_S + 180, interval=1)
            assert "etcd" in held, held
        # The third's status says its K3s lost quorum and heals are held (shown every 5 s).
        third_node = nodes[third]
        third_node.wait_for(f"{third}'s status: K3s not ready, heals held",
                            lambda: (k := third_node.status()["k3s"])["ready"] is False
                            and k["quorum"]["hold"], timeout=60, interval=1)
    finally:
        for name in hung:
            nodes[name].systemctl("kill", "--signal=SIGCONT", "k3s.service")
    for name in servers:
        node = nodes[name]
        node.wait_for(f"K3s ready again on {name}", lambda node=node: k3s_ready(node), timeout=120, interval=1)
        after = (node.main_pid("k3s.service"), k3s_unit(node, "k3s.service")["restarts_by_pimesh"])
        assert after == before[name], f"{name}'s K3s was restarted: {before[name]} -> {after}"


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


def get_via_proxy(node, url, headers=()):
    """GET `url` from `node`'s network namespace; `headers` as "name: value" strings."""
    out = subprocess.run(["nsenter", "-t", str(node.leader), "-n", "python3", "-c", GET_LOCAL, url, *headers],
                         capture_output=True, text=True, timeout=40).stdout.strip()
    code, _, body = out.partition(" ")
    return int(code or 0), body


@contextlib.contextmanager
def serving_web(node, name, port=8080, host="127.0.0.1"):
    """The web app on `node` (in its network namespace) while the block runs."""
    app = subprocess.Popen(["nsenter", "-t", str(node.leader), "-n", "python3", "-c", WEB_APP, name, str(port), host],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        app.kill()
        app.wait()


def web_answer(node, name, timeout=90):
    """The answer of `web` on pi-a to a client on `node` once pi-a's proxy answers it: 200
    from the app for pi-d, 403 from the allow list for any other node (either needs mTLS
    between the two proxies and pi-a's address in `node`'s discovery)."""
    want = 200 if name == "pi-d" else 403

    def answered():
        code, body = get_via_proxy(node, "http://127.0.0.1:18080/")
        if code != want:
            # Reported as the last answer when the wait times out.
            raise RuntimeError(f"{code} {body[:300]}")
        return code, body

    return node.wait_for(f"web on pi-a answering {name} through both proxies", answered,
                         timeout=timeout, interval=1)


def test_a_request_crosses_both_proxies_with_mtls_and_the_allow_list_sees_the_caller(site):
    nodes = site["nodes"]
    a, b, d = nodes["pi-a"], nodes["pi-b"], nodes["pi-d"]
    with serving_web(a, "pi-a"):
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


# Sends a plain HTTP request to argv[1]:argv[2] and prints what came back (the host's
# python3 in a node's network namespace): nothing, when the other side just closes.
RAW_HTTP = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(b"GET / HTTP/1.1\r\nHost: tracker.fleet.svc.cluster.local\r\n\r\n")
got = b""
try:
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        got += chunk
except OSError:
    pass
print(repr(got))
"""


@contextlib.contextmanager
def pod_on(node, address, gateway):
    """A "pod" of `node`: a network namespace of its own, wired to the node by a veth whose
    node end is the pods' bridge `cni0` (`gateway`/24), as K3s's flannel would wire one
    (the fixture runs no pods). Yields the namespace's name."""
    ns = f"pm-pod-{uuid.uuid4().hex[:6]}"
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "-n", node.netns, "link", "add", "cni0", "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "-n", node.netns, "addr", "add", f"{gateway}/24", "dev", "cni0")
        sh("ip", "-n", node.netns, "link", "set", "cni0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "route", "add", "default", "via", gateway)
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def proxy_metric(node, name, **labels):
    """The sum of the proxy's metric `name` over the series with `labels`."""
    total = 0.0
    for line in node.http_get("http://127.0.0.1:4191/metrics")[1].splitlines():
        if not line.startswith(name + "{"):
            continue
        series, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in series for k, v in labels.items()):
            total += float(value)
    return total


def test_a_meshed_k3s_service_is_reached_from_another_node_through_both_proxies(site):
    """The site config carries a manifest (a namespace labelled for the mesh, a Service
    and its EndpointSlice with one endpoint on pi-c). Only the K3s servers get it in
    their auto-deploy folder; the servers' control replicas read the Service from K3s's
    API; a client on pi-a dials the Service's cluster IP, unchanged, and the supervisor's
    iptables redirect hands the connection to pi-a's proxy, which carries it by mTLS to
    pi-c's proxy, which delivers it to the endpoint's address on pi-c. A pod of pi-a
    (behind the pods' bridge) gets the same; a host of the LAN that dials pi-a's outbound
    port gets nothing. An HTTPRoute deployed the same way (with the Gateway API's CRDs)
    sends the tracker's requests marked `x-canary: 1` to its canary on pi-c, the rest to
    the tracker."""
    nodes = site["nodes"]
    a, c = nodes["pi-a"], nodes["pi-c"]
    for name, node in nodes.items():
        manifest = os.path.join(node.root, "var/lib/rancher/k3s/server/manifests/pimesh-fleet.yaml")
        if name == "pi-a" or node.status()["join"]["role"] == "server":
            assert node.wait_for(f"the fleet manifest in {name}'s auto-deploy folder",
                                 lambda manifest=manifest: os.path.exists(manifest), timeout=60, interval=1)
            with open(manifest) as f:
                kinds = [doc["kind"] for doc in yaml.safe_load_all(f.read())]
            assert kinds == ["Namespace", "Service", "EndpointSlice"], kinds
        else:
            assert not os.path.exists(manifest), f"{name} is an agent: K3s servers alone deploy manifests"
    services = a.wait_for("the tracker Service in the K3s API",
                          lambda: kube_get(a, "/api/v1/namespaces/fleet/services")["items"],
                          timeout=60, interval=1)
    assert services[0]["spec"]["clusterIP"] == TRACKER_IP, services
    # The "pod": an address of pi-c's own (the fixture has no CNI) with the web app on it.
    c.run(["ip", "addr", "add", f"{TRACKER_POD}/32", "dev", "lo"], check=False)
    with serving_web(c, "tracker pod on pi-c", port=8080, host=TRACKER_POD):
        answer = a.wait_for("the tracker Service answering pi-a at its cluster IP",
                            lambda: (r := get_via_proxy(a, f"http://{TRACKER_IP}/positions")) and r[0] == 200 and r,
                            timeout=120, interval=1)
        assert answer[1] == "web on tracker pod on pi-c", answer
        # Both proxies carried it: pi-a's outbound side and pi-c's inbound side count it,
        # labelled as Linkerd's dashboards select (the Service's namespace, mTLS).
        sent = proxy_metric(a, "request_total", direction="outbound", dst_service="tracker.fleet")
        received = proxy_metric(c, "request_total", direction="inbound", dst_service="tracker.fleet",
                                namespace="fleet", tls="true")
        assert sent >= 1 and received >= 1, (sent, received)
        # A pod of pi-a (behind the pods' bridge cni0) dials the cluster IP too: redirected
        # as it comes in, it goes the same way.
        with pod_on(a, "10.42.9.5", "10.42.9.1") as pod:
            out = subprocess.run(["ip", "netns", "exec", pod, "python3", "-c", GET_LOCAL,
                                  f"http://{TRACKER_IP}/from-a-pod"],
                                 capture_output=True, text=True, timeout=40).stdout.strip()
            assert out == "200 web on tracker pod on pi-c", out
        assert proxy_metric(a, "request_total", direction="outbound", dst_service="tracker.fleet") > sent
        # The HTTPRoute from the cluster: marked requests go to the canary, the rest stay.
        c.run(["ip", "addr", "add", f"{CANARY_POD}/32", "dev", "lo"], check=False)
        with serving_web(c, "tracker canary on pi-c", port=8080, host=CANARY_POD):
            canary = a.wait_for("the tracker's marked requests answered by its canary",
                                lambda: (r := get_via_proxy(a, f"http://{TRACKER_IP}/positions", ["x-canary: 1"]))
                                and r == (200, "web on tracker canary on pi-c") and r,
                                timeout=120, interval=1)
            assert canary == (200, "web on tracker canary on pi-c"), canary
            for _ in range(5):
                plain = get_via_proxy(a, f"http://{TRACKER_IP}/positions")
                assert plain == (200, "web on tracker pod on pi-c"), plain
            matched = proxy_metric(a, "pimesh_route_matched_total", service="tracker.fleet", route="tracker-canary/0")
            assert matched >= 1, matched
        # A host of the LAN (pi-b) that dials pi-a's outbound port gets nothing: the port
        # serves only this node's processes and redirected connections.
        b = nodes["pi-b"]
        answer = subprocess.run(["nsenter", "-t", str(b.leader), "-n", "python3", "-c", RAW_HTTP,
                                 Lan.address(a.netns), "4140"],
                                capture_output=True, text=True, timeout=40)
        assert answer.stdout.strip() == "b''", (answer.stdout, answer.stderr)
    # pi-a's nat table sends the Services' range to the proxy, never the proxy's own
    # connections, and from the pods' bridge only among what comes in.
    rules = a.run(["iptables", "-w", "-t", "nat", "-S"]).stdout
    assert "10.43.0.0/16" in rules and "REDIRECT" in rules and "--uid-owner" in rules, rules
    assert "-A PREROUTING -d 10.43.0.0/16 -i cni0 -p tcp -j PIMESH-K3S-SERVICES" in rules, rules


# From this revision on, the site's K3s also disables servicelb: a `[k3s]` change that
# K3s servers restart for (set by the case that publishes it).
K3S_CHANGE = {"from_revision": None}
K3S_DISABLE_MORE = '[k3s]\nservers = 3\ndisable = ["traefik", "servicelb"]\n'


# From revision `from_revision` on, the site also runs the Fleetman demo (its services
# placed on pi-a, pi-b and pi-c, spans to the test's collector at `zipkin_url`), and from
# `fault_from` on, half the tracker's requests are aborted (set by the demo case).
DEMO = {"from_revision": None, "zipkin_url": None, "fault_from": None}


def demo_config(number):
    """The demo's part of revision `number`'s site config (README: demo/README.md)."""
    fault = DEMO["fault_from"] is not None and number >= DEMO["fault_from"]
    tracker_fault = 'fault = { abort = { status = 503, percent = 50.0 } }\n' if fault else ""
    return (f'\n[proxy]\nzipkin_url = "{DEMO["zipkin_url"]}"\n'
            '\n[services.fleetman-webapp]\nport = 8090\nnodes = ["pi-a"]\n'
            '[services.fleetman-api-gateway]\nport = 8084\nnodes = ["pi-a"]\n'
            '[services.fleetman-staff-service-stable]\nport = 8082\nnodes = ["pi-a"]\n'
            f'[services.fleetman-position-tracker]\nport = 8081\nnodes = ["pi-b"]\n{tracker_fault}'
            '[services.error-injector]\nport = 8083\nnodes = ["pi-b"]\n'
            '[services.fleetman-queue]\nport = 61616\nnodes = ["pi-c"]\nprotocol = "tcp"\nlocal_port = 16161\n'
            '[services.fleetman-staff-service]\nsplit = [\n'
            '  { service = "fleetman-staff-service-stable", weight = 90 },\n'
            '  { service = "error-injector", weight = 10 },\n]\n')


# Revision `revision` goes to `canary` (a node's own name) first, then to every node (set
# by the case that publishes it).
ROLLOUT = {"revision": None, "canary": None}


def revision_config(number):
    """The site configuration of revision `number`: the cards' one and a service of its own
    (and the demo's services once the demo case publishes them)."""
    config = CLUSTER
    start = K3S_CHANGE["from_revision"]
    if start is not None and number >= start:
        config = config.replace("[k3s]\nservers = 3\n", K3S_DISABLE_MORE)
    if DEMO["from_revision"] is not None and number >= DEMO["from_revision"]:
        config += demo_config(number)
    if ROLLOUT["revision"] == number:
        config += f'\n[rollout]\ncanary = ["{ROLLOUT["canary"]}"]\nwaves = [100]\n'
    return config + f'\n[services.rev{number}]\nport = {9000 + number}\nnodes = ["pi-b"]\n'


def publish(site):
    """Publishes the next revision through the real central server; returns its number."""
    central = site["keys"].central
    return central.publish(revision_config(central.revision + 1))


def wait_revision(site, name, node, revision, timeout=180):
    """Waits until `node` runs `revision` (committed, its cluster.toml that revision's) and
    the central server holds its report of it."""
    central = site["keys"].central

    def applied():
        status = node.status()
        ota = status["ota"]
        return ota["committed"] == revision and ota["state"] == "idle" and status

    # `name` is the test's; the central server knows the node by its own.
    node_name = node.wait_for(f"{name} on revision {revision}", applied, timeout=timeout, interval=1)["node"]["name"]
    with open(os.path.join(node.root, "etc/pimesh/cluster.toml")) as f:
        assert f.read() == revision_config(revision), f"{name}: cluster.toml is not revision {revision}"

    def reported():
        try:
            return central.central_report(node_name)["revision"] == revision
        except FileNotFoundError:
            return False

    node.wait_for(f"{name}'s report of revision {revision} at the central server", reported,
                  timeout=60, interval=1)


def test_one_publish_reaches_every_node_and_each_reports_it(site):
    """The revision is staged: pi-c's node first (the plan's canary), then every node once
    the canary reported it applied, as the central server's rollout says."""
    central = site["keys"].central
    canary = site["nodes"]["pi-c"].status()["node"]["name"]
    ROLLOUT.update(revision=central.revision + 1, canary=canary)
    published_at = time.time() - 1
    revision = publish(site)
    wait_revision(site, "pi-c", site["nodes"]["pi-c"], revision)
    for name, node in site["nodes"].items():
        wait_revision(site, name, node, revision)
    rollout = site["nodes"]["pi-a"].wait_for(
        f"the rollout of revision {revision} complete",
        lambda: (r := central.rollout(revision)[0])["state"] == "complete" and r,
        timeout=120, interval=1)
    assert [w["nodes"] for w in rollout["waves"]][0] == [canary], rollout
    assert central.central_report(canary)["about"] == revision
    # Every other node began applying it only after the canary committed it (the
    # supervisors' journals, one clock).
    supervisor = "pimesh-supervisor.service"
    committed = journal_times(site["nodes"]["pi-c"], supervisor, "revision committed", published_at)
    assert committed, "the canary's journal says it committed the revision"
    for name, node in site["nodes"].items():
        node_name = node.status()["node"]["name"]
        assert node_name in rollout["applied"], (name, rollout)
        if name == "pi-c":
            continue
        began = journal_times(node, supervisor, "applying a new revision", published_at)
        assert began and min(began) > min(committed), (name, began, committed)
    for name, node in site["nodes"].items():
        # The report carries the node's K3s (what `pimeshctl status` shows per node).
        role = "server" if name == "pi-a" else node.status()["join"]["role"]
        node_name = node.status()["node"]["name"]
        k3s = node.wait_for(f"{name}'s K3s, ready, in its report at the central server",
                            lambda node_name=node_name: (k := central.central_report(node_name).get("k3s"))
                            and k["ready"] and k, timeout=120, interval=1)
        assert k3s["role"] == role, (name, k3s)
        # And when its certificates expire (the dashboard's column): its own, the issuer's
        # and the anchor's, each in the future, none outliving the one that signed it.
        dates = central.central_report(node_name).get("certificates") or {}
        assert set(dates) == {"node", "issuer", "anchor"}, (name, dates)
        assert time.time() < dates["node"] <= dates["issuer"] <= dates["anchor"], (name, dates)


def k3s_unit_of(role):
    return "k3s.service" if role == "server" else "k3s-agent.service"


def journal_times(node, unit, text, since=0, program=None):
    """When (Unix seconds, microsecond precision) `unit` logged a message containing
    `text` since `since`, oldest first; with `program`, only what that program logged
    (not systemd about the unit)."""
    out = node.run(["journalctl", "-u", unit, "--no-pager", "-o", "json", "--since", f"@{int(since)}"],
                   check=False).stdout
    times = []
    for line in out.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if program is not None and entry.get("SYSLOG_IDENTIFIER") != program:
            continue
        if text in str(entry.get("MESSAGE", "")):
            times.append(int(entry["__REALTIME_TIMESTAMP"]) / 1e6)
    return times


def test_a_revision_that_changes_k3s_settings_restarts_each_k3s_server_in_turn(site):
    """`[k3s] disable` changes over the air: every K3s server renders its new config and
    restarts K3s for it, once its quorum guard lets it go down, and is ready again before
    its health gate passes; an agent's config holds no such setting and its K3s keeps
    running."""
    nodes = site["nodes"]
    roles = {name: "server" if name == "pi-a" else node.status()["join"]["role"]
             for name, node in nodes.items()}
    before = {name: nodes[name].main_pid(k3s_unit_of(role)) for name, role in roles.items()}
    K3S_CHANGE["from_revision"] = site["keys"].central.revision + 1
    published_at = time.time() - 1
    revision = publish(site)
    for name, node in nodes.items():
        wait_revision(site, name, node, revision, timeout=600)
    for name, role in roles.items():
        node = nodes[name]
        node.wait_for(f"K3s ready on {name}", lambda node=node: k3s_ready(node), timeout=180, interval=1)
        config, _ = k3s_config(node)
        pid = node.main_pid(k3s_unit_of(role))
        if role == "server":
            assert config["disable"] == ["traefik", "servicelb"], (name, config)
            assert pid != before[name], f"{name}'s K3s server was not restarted for its new config"
        else:
            assert "disable" not in config, (name, config)
            assert pid == before[name], f"{name}'s K3s agent was restarted for nothing"
    # In turn: each server took the site's restart lease (a Lease in K3s's API) before its
    # restart and gave it back once ready; no two held it at once.
    held = {}
    for name, role in roles.items():
        if role != "server":
            continue
        node = nodes[name]
        took = journal_times(node, "pimesh-supervisor.service", "took the site's K3s restart lease", published_at)
        released = node.wait_for(
            f"{name} gave the restart lease back",
            lambda node=node: journal_times(node, "pimesh-supervisor.service",
                                            "released the site's K3s restart lease", published_at),
            timeout=60, interval=1)
        assert took, f"{name} restarted its K3s server without the site's restart lease"
        held[name] = (min(took), max(released))
    spans = sorted(held.values())
    for (_, first_end), (second_start, _) in zip(spans, spans[1:]):
        assert first_end <= second_start, f"two servers held the restart lease at once: {held}"


def leaf_not_after(node):
    config = node.proxy_config()
    return config and config["identity"] and config["identity"]["source"] == "control" and \
        config["identity"]["not_after"]


@contextlib.contextmanager
def steady_requests(node, url, workdir):
    """Requests from `node` to `url` every 50 ms while the block runs; yields a dict that
    holds the summary (ok, failed, longest_gap_s, last_errors) once the block ends."""
    stop = os.path.join(workdir, f"steady-stop-{node.leader}")
    if os.path.exists(stop):
        os.remove(stop)
    load = subprocess.Popen(["nsenter", "-t", str(node.leader), "-n", "python3", "-c", STEADY_REQUESTS, url, stop],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    summary = {}
    try:
        yield summary
    finally:
        with open(stop, "w"):
            pass
        out, _ = load.communicate(timeout=60)
        summary.update(json.loads(out or "{}"))


def test_the_site_survives_the_loss_of_its_init_node(site, figures, tmp_path):
    nodes = site["nodes"]
    c, d = nodes["pi-c"], nodes["pi-d"]
    with serving_web(c, "pi-c", port=8081):
        def echoed():
            code, body = get_via_proxy(d, "http://127.0.0.1:18081/")
            if code != 200:
                # Reported as the last answer when the wait times out.
                raise RuntimeError(f"{code} {body[:300]}")
            return True

        d.wait_for("echo on pi-c through both proxies from pi-d", echoed, timeout=90, interval=1)
        # Traffic between two other nodes while one of the three servers is lost: none of
        # it may fail (the data path does not cross the lost node, and each proxy's
        # control plane fails over to the remaining servers' replicas).
        expiries_before = {name: leaf_expiries(nodes[name]) for name in JOINERS}
        proxies_before = {name: proxy_pid(nodes[name]) for name in JOINERS}
        with steady_requests(d, "http://127.0.0.1:18081/", str(tmp_path)) as load:
            started = time.monotonic()
            a = nodes.pop("pi-a")
            a.power_off(timeout=20)
            load["power_off_at_s"] = round(time.monotonic() - started, 1)
            site["down"]["pi-a"] = a
            before = {name: leaf_not_after(nodes[name]) for name in JOINERS}
            # Leaves of LEAF_LIFETIME seconds renew at two thirds of their life: two renewals
            # later every leaf was signed after the init node was gone, by the joined
            # servers' replicas.
            for name in JOINERS:
                node = nodes[name]
                first = node.wait_for(f"{name}: a leaf renewed without the init node",
                                      lambda node=node, name=name: (n := leaf_not_after(node)) and n > before[name] and n,
                                      timeout=LEAF_LIFETIME * 3, interval=1)
                node.wait_for(f"{name}: a second renewal",
                              lambda node=node, first=first: (n := leaf_not_after(node)) and n > first,
                              timeout=LEAF_LIFETIME * 3, interval=1)
    # pi-d -> pi-c, one request every 50 ms, while the init node was lost.
    figures["site_server_loss_requests_ok"] = load.get("ok")
    figures["site_server_loss_requests_failed"] = load.get("failed")
    figures["site_server_loss_longest_gap_s"] = round(load.get("longest_gap_s") or 0, 2)
    # Goal: none failed (a figure). The test asserts what a user checks: the site keeps
    # serving (at most 5 % failed: a request in flight to a proxy's old peer connection
    # may fail) and any outage is brief (no gap over 5 s); it prints pi-d's journals.
    def why():
        journal = lambda unit: "\n".join(d.journal(unit).splitlines()[-40:])
        return (f"{json.dumps(load)}\n--- pi-d's proxy:\n{journal('pimesh-proxy.service')}"
                f"\n--- pi-d's supervisor:\n{journal('pimesh-supervisor.service')}")
    broken = [what for held, what in (
        (load.get("ok", 0) > 100, "100 requests or fewer succeeded"),
        (load.get("failed", 0) * 20 <= load.get("ok", 0), "more than 5 % of the requests failed"),
        ((load.get("longest_gap_s") or 0) <= 5, "an outage longer than 5 s"),
    ) if not held]
    # No proxy's leaf ran out: the replicas of the servers still up renewed every one in
    # time, however many of the lost node's replicas were asked first.
    ran_out = [name for name in JOINERS if leaf_expiries(nodes[name]) > expiries_before[name]]
    if ran_out:
        broken.append(f"the leaves of {', '.join(ran_out)} ran out unrenewed")
    # No proxy was restarted: a node whose join named only the lost server finds the
    # others on the LAN, and its proxy already knows them from discovery.
    restarted = [name for name in JOINERS if proxy_pid(nodes[name]) != proxies_before[name]]
    if restarted:
        broken.append(f"the proxies of {', '.join(restarted)} were restarted")
    journals = why() if broken else ""
    print(f"server loss: {load}")
    # A fifth card joins through the remaining servers.
    e = prepare_node(site["lan"], site["keys"], 5, "join", "pi-e")
    nodes["pi-e"] = e
    e.boot()
    e.wait_for("pi-e joined", lambda: joined(e), timeout=JOIN_TIMEOUT, interval=1)
    # A board plugged into a running site (here, one whose init node is lost).
    figures["site_late_node_start_to_certificate_s"] = seconds_to_join_from(e, "pimesh-supervisor", "starting")
    figures["site_late_node_lease_to_certificate_s"] = seconds_to_join_from(e, "systemd-networkd", "DHCPv4 address")
    e.wait_for("pi-e's proxy leaf", lambda: leaf_source(e) == "control", timeout=120, interval=1)
    # A revision still applies on every live node, the new one too.
    revision = publish(site)
    for name, node in nodes.items():
        wait_revision(site, name, node, revision)
    # Asserted only now, so that the tests after this one find the site they build on
    # (pi-e joined) and fail only for their own reasons.
    assert not broken, f"while the init node was lost, {' and '.join(broken)}: {journals}"


def proxy_pid(node):
    """The main PID of the node's proxy (changes when it restarts)."""
    return node.run(["systemctl", "show", "-p", "MainPID", "--value", "pimesh-proxy.service"],
                    check=False).stdout.strip()


def leaf_expiries(node):
    """How often the node's proxy logged that its leaf ran out before a renewal."""
    return node.journal("pimesh-proxy.service").count(
        "the leaf expired before any control replica renewed it")


def control_replicas_known(node):
    """How many control replicas the node's proxy knows (its start list and the servers
    its discovery answers name)."""
    metrics = node.http_get("http://127.0.0.1:4191/metrics")[1]
    line = next((l for l in metrics.splitlines() if l.startswith("pimesh_control_replicas")), None)
    return int(float(line.split()[-1])) if line else 0


def test_the_init_node_returns_and_catches_up(site):
    nodes = site["nodes"]
    a = site["down"].pop("pi-a")
    a.boot()
    nodes["pi-a"] = a
    a.wait_for("the init node back", lambda: a.status()["join"]["state"] == "init", timeout=60, interval=1)
    a.wait_for("pi-a's proxy leaf from a replica", lambda: leaf_source(a) == "control", timeout=120, interval=1)
    # It takes the revision published while it was off.
    wait_revision(site, "pi-a", a, site["keys"].central.revision)
    # Its proxy learns the servers that joined from the site's discovery (three replicas of
    # its own, and the other servers' beside them).
    a.wait_for("pi-a's proxy knows the joined servers' replicas",
               lambda: control_replicas_known(a) > 3, timeout=120, interval=1)
    # The nodes reach pi-a's service again, pi-e too, which joined while pi-a was off.
    with serving_web(a, "pi-a"):
        for name in ("pi-d", "pi-e"):
            web_answer(nodes[name], name, timeout=120)
    # The site's K3s now has five nodes: three servers and two agents (pi-e joined as an
    # agent while pi-a was off), every one Ready in the API of the returned init node.
    e = nodes["pi-e"]
    k3s = e.wait_for("K3s ready on pi-e", lambda: k3s_ready(e), timeout=180, interval=1)["k3s"]
    assert (k3s["role"], k3s["unit"]) == ("agent", "k3s-agent.service"), k3s

    def five_ready():
        items = kube_get(a, "/api/v1/nodes")["items"]
        ready = {n["metadata"]["name"] for n in items
                 if any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"]["conditions"])}
        return ready >= set(nodes) and items
    items = a.wait_for("all five nodes Ready in pi-a's K3s API", five_ready, timeout=180, interval=1)
    servers = [n for n in items if n["metadata"]["labels"].get("node-role.kubernetes.io/control-plane") == "true"]
    assert len(items) == 5 and len(servers) == 3, [n["metadata"]["name"] for n in servers]


def test_a_node_cut_off_longer_than_its_leaf_life_comes_back_by_itself(site, figures):
    nodes, lan = site["nodes"], site["lan"]
    name = next(n for n in JOINERS if nodes[n].status()["join"]["role"] == "agent")
    node = nodes[name]
    started_at = node.status()["started_at"]
    lan.cut(node.netns)
    try:
        held = node.wait_for(f"{name}'s leaf", lambda: leaf_not_after(node), timeout=30, interval=1)
        # The site moves on without it.
        missed = publish(site)
        for other in ("pi-a", "pi-e"):
            wait_revision(site, other, nodes[other], missed)
        # Cut off from every replica, the node cannot renew: its leaf runs out.
        node.wait_for(f"{name}'s leaf past its end", lambda: time.time() > held + 5,
                      timeout=LEAF_LIFETIME * 3, interval=1)
        renewed = leaf_not_after(node)
        assert not renewed or renewed == held, f"{name} renewed its leaf while cut off"
    finally:
        lan.heal(node.netns)
    healed = time.monotonic()
    node.wait_for(f"{name}: a fresh leaf once plugged back in",
                  lambda: (n := leaf_not_after(node)) and n > time.time(), timeout=180, interval=1)
    figures["site_cut_off_node_fresh_leaf_after_replug_s"] = round(time.monotonic() - healed, 1)
    wait_revision(site, name, node, missed)
    with serving_web(nodes["pi-a"], "pi-a"):
        web_answer(node, name, timeout=120)
    # It came back by itself: the same supervisor, no reboot, nothing done on the node.
    assert node.status()["started_at"] == started_at


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


def anchor_of(node):
    with open(os.path.join(node.root, "var/lib/pimesh/identity/anchor.pem")) as f:
        return f.read()


def join_names(node):
    return {j["node"] for j in node.status()["joins"]}


def test_another_site_on_the_lan_gets_nothing_of_ours_and_its_cards_join_their_own(site):
    lan, keys, nodes, others = site["lan"], site["keys"], site["nodes"], site["others"]
    # Another site with the same name (another anchor) on the same LAN: its init node
    # announces itself like ours, and a card of that site joins it by mDNS.
    other = SiteKeys("lab")
    trust = {f"/boot/firmware/pimesh-trust/{name}": other.read(name)
             for name in ("anchor.pem", "issuer.pem", "issuer.key")}
    others["pi-r"] = r = prepare_node(lan, other, 8, "init", "pi-r", trust)
    others["pi-s"] = s = prepare_node(lan, other, 9, "join", "pi-s")
    boot_all([r, s])
    r.wait_for("the other site's init node", lambda: r.status()["join"]["state"] == "init", timeout=60)
    rogue = r.wait_for("pi-r's address", lambda: Lan.address(r.netns), timeout=60, interval=1)
    # A card of our site whose seed lists pi-r's address first (say, an address that a
    # device of another site took since): the rogue's bundle does not match the token's
    # pin, so the card sends it nothing and joins through our server listed next.
    ours = Lan.address(nodes["pi-a"].netns)
    seed = keys.seed("join", "pi-f", top=f'servers = ["{rogue}", "{ours}"]')
    nodes["pi-f"] = f = prepare_node(lan, keys, 10, "join", "pi-f", {"/boot/firmware/pimesh.toml": seed})
    f.boot()
    status = f.wait_for("pi-f joined", lambda: joined(f), timeout=JOIN_TIMEOUT, interval=1)
    assert status["join"]["via"]["address"].startswith(ours + ":"), status["join"]
    assert anchor_of(f) == keys.read("anchor.pem")
    journal = f.run(["journalctl", "-u", "pimesh-supervisor.service", "--no-pager", "-o", "verbose"]).stdout
    assert f"rogue server at {rogue}:" in journal, "pi-f never asked the rogue (the test would prove nothing)"
    status = s.wait_for("pi-s joined its own site", lambda: joined(s), timeout=JOIN_TIMEOUT, interval=1)
    assert status["join"]["via"]["address"].startswith(rogue + ":"), status["join"]
    assert anchor_of(s) == other.read("anchor.pem")
    # Neither site heard a join of the other's cards.
    r.wait_for("pi-s in pi-r's joins", lambda: "pi-s" in join_names(r), timeout=30, interval=1)
    assert join_names(r) == {"pi-s"}, r.status()["joins"]
    for name, node in nodes.items():
        assert "pi-s" not in join_names(node), (name, node.status()["joins"])


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


def seed_lists_servers(node):
    with open(os.path.join(node.root, "boot/firmware/pimesh.toml")) as f:
        return any(line.startswith("servers =") for line in f)


def proxy_knows_a_renumbered_server(node):
    """Whether `node`'s proxy knows a control replica of another node at a renumbered
    address (.100 and up)."""
    config = node.proxy_config() or {}
    replicas = ((config.get("control") or {}).get("replicas")) or []
    own = Lan.address(node.netns)
    return any(int(ip.rsplit(".", 1)[1]) >= 100 and ip != own
               for ip in (replica.rsplit(":", 1)[0] for replica in replicas)
               if not ip.startswith("127."))


def test_the_site_finds_itself_again_when_the_lan_renumbers(site, figures):
    """A new DHCP server leases other addresses, and the switch lost power on the way (every
    cable down, then up): every address the joins recorded leads nowhere at once. The init
    node's cable goes back in last, once the others have found each other again: no
    relocation round of theirs could see it, and as the site's first node it has no join
    record to relocate by, so the servers must find it (or it them) on their own."""
    lan = site["lan"]
    # The site's members (a refused card is on the LAN but in no site) that look for their
    # servers by mDNS: a card whose seed lists its servers' addresses keeps to what the
    # operator wrote (the seed's `servers` override mDNS), so it is left out here.
    nodes = {name: node for name, node in site["nodes"].items()
             if node.status()["join"]["state"] in ("init", "joined") and not seed_lists_servers(node)}
    others = {name: node for name, node in nodes.items() if name != "pi-a"}
    lan.renumber(100, 149)
    for node in nodes.values():
        lan.cut(node.netns)
    renumbered_at = time.time()
    for node in others.values():
        lan.heal(node.netns)
    start = time.monotonic()

    def renumbered(node):
        return (ip := Lan.address(node.netns)) and int(ip.rsplit(".", 1)[1]) >= 100

    for name, node in others.items():
        node.wait_for(f"{name} on a new address", lambda node=node: renumbered(node), timeout=180, interval=1)
    # Every proxy takes a leaf signed after the renumbering from a replica, and knows
    # another node's replica at its new address (the nodes found each other by mDNS).
    for name, node in others.items():
        node.wait_for(f"{name}: a leaf signed at the new addresses",
                      lambda node=node: (n := leaf_not_after(node)) and n > renumbered_at + LEAF_LIFETIME,
                      timeout=240, interval=1)
        node.wait_for(f"{name}'s proxy knowing a server at its new address",
                      lambda node=node: proxy_knows_a_renumbered_server(node),
                      timeout=240, interval=1)
    figures["site_renumbered_lan_every_leaf_renewed_s"] = round(time.monotonic() - start, 1)
    # The init node comes back on the renumbered LAN.
    a = nodes["pi-a"]
    lan.heal(a.netns)
    plugged = time.monotonic()
    a.wait_for("pi-a on a new address", lambda: renumbered(a), timeout=180, interval=1)
    # A node that joined through the old addresses reaches pi-a's service again.
    with serving_web(a, "pi-a"):
        web_answer(nodes["pi-e"], "pi-e", timeout=240)
    figures["site_renumbered_init_node_reached_again_s"] = round(time.monotonic() - plugged, 1)
    revision = publish(site)
    for name, node in nodes.items():
        wait_revision(site, name, node, revision)


# The demo case: a Zipkin span collector in the LAN's namespace (the host's python3), on
# argv[1] (the bridge's address) and a port of its own choosing, written to argv[2]; each
# POSTed batch of spans is appended to argv[3] as one line of JSON.
SPAN_COLLECTOR = r"""
import http.server, json, os, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        try:
            spans = json.loads(body)
        except ValueError:
            spans = []
        with open(sys.argv[3], "a") as f:
            f.write(json.dumps(spans) + "\n")
        self.send_response(202); self.send_header("content-length", "0"); self.end_headers()
    def log_message(self, *a): pass
server = http.server.ThreadingHTTPServer((sys.argv[1], 0), H)
with open(sys.argv[2] + ".tmp", "w") as f:
    f.write(str(server.server_address[1]))
os.rename(sys.argv[2] + ".tmp", sys.argv[2])
server.serve_forever()
"""
# GET argv[1] with the header argv[2]: argv[3] (the host's python3 in the LAN's namespace);
# prints the status.
TRACED_GET = r"""
import sys, urllib.request, urllib.error
request = urllib.request.Request(sys.argv[1], headers={sys.argv[2]: sys.argv[3]})
try:
    with urllib.request.urlopen(request, timeout=10) as r:
        r.read(); print(r.status)
except urllib.error.HTTPError as e:
    print(e.code)
"""
# argv[3] requests per second to http://argv[1]:8090argv[2] for argv[4] seconds, from
# four keep-alive connections (the host's python3 in the LAN's namespace); prints a JSON
# summary: how many, how many answered 200, the rate reached, p50/p95/max milliseconds.
STEADY_LOAD = r"""
import http.client, json, sys, threading, time
host, path, rate, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
workers = 4
latencies, statuses, lock = [], {}, threading.Lock()
start = time.monotonic() + 0.2
def work(index):
    conn = None
    n = 0
    while True:
        at = start + (n * workers + index) / rate
        if at > start + seconds:
            return
        delay = at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        n += 1
        began = time.monotonic()
        try:
            conn = conn or http.client.HTTPConnection(host, 8090, timeout=10)
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            status = response.status
        except Exception:
            conn, status = None, 0
        took = (time.monotonic() - began) * 1000
        with lock:
            latencies.append(took)
            statuses[status] = statuses.get(status, 0) + 1
threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
for t in threads: t.start()
for t in threads: t.join()
elapsed = time.monotonic() - start
latencies.sort()
q = lambda p: round(latencies[min(len(latencies) - 1, int(p * len(latencies)))], 2) if latencies else None
print(json.dumps({"requests": len(latencies), "ok": statuses.get(200, 0), "statuses": statuses,
                  "rate_per_s": round(len(latencies) / elapsed, 1), "p50_ms": q(0.5),
                  "p95_ms": q(0.95), "max_ms": round(latencies[-1], 2) if latencies else None}))
"""
# Where each part of the demo runs (node, part, its flags): pi-a serves the page (to the
# LAN: the browser is not on the node), its gateway and the stable staff service; pi-b the
# tracker and the error injector; pi-c the queue and the simulator. Every call crosses the
# nodes' proxies; the queue's TCP through each node's `local_port` listener.
DEMO_PARTS = [
    ("pi-c", "queue", []),
    ("pi-b", "tracker", ["--queue", "127.0.0.1:16161"]),
    ("pi-b", "injector", []),
    ("pi-a", "staff", []),
    ("pi-a", "api-gateway", []),
    ("pi-a", "webapp", ["--listen", "0.0.0.0:8090"]),
    ("pi-c", "simulator", ["--queue", "127.0.0.1:16161"]),
]
DEMO_HEALTH = {"queue": None, "tracker": 8081, "injector": 8083, "staff": 8082, "api-gateway": 8084,
               "webapp": 8090, "simulator": None}


def demo_node(nodes, name):
    """The live container of node `name` (a re-flashed board if the old one is gone)."""
    return nodes.get(name) or nodes[f"{name}-reflashed"]


def latency_histogram(node, direction, service):
    """The proxy's `response_latency_ms` of `direction` to `service`: (sum, count,
    {le: cumulative count})."""
    total = count = 0.0
    buckets = {}
    labels = (f'direction="{direction}"', f'dst_service="{service}"')
    for line in node.http_get("http://127.0.0.1:4191/metrics")[1].splitlines():
        if not line.startswith("response_latency_ms") or not all(label in line for label in labels):
            continue
        series, _, value = line.rpartition(" ")
        if series.startswith("response_latency_ms_sum"):
            total += float(value)
        elif series.startswith("response_latency_ms_count"):
            count += float(value)
        elif series.startswith("response_latency_ms_bucket"):
            le = series.split('le="', 1)[1].split('"', 1)[0]
            buckets[le] = buckets.get(le, 0.0) + float(value)
    return total, count, buckets


def hop_latency(before, after):
    """Mean and p50 (the first bucket bound holding half the requests) in milliseconds
    between two `latency_histogram` reads."""
    count = after[1] - before[1]
    if count <= 0:
        return None
    bounds = sorted(((float("inf") if le == "+Inf" else float(le)), after[2][le] - before[2].get(le, 0.0))
                    for le in after[2])
    p50 = next((bound for bound, n in bounds if n >= count / 2), None)
    return {"requests": int(count), "mean_ms": round((after[0] - before[0]) / count, 2),
            "p50_le_ms": p50}


def test_the_fleetman_demo_runs_across_the_site(site, figures, tmp_path):
    """The demo app (`demo/`, `pimesh-demo`) across three nodes, its page in headless
    Chromium on the LAN; `make demo` runs this case alone (PIMESH_DEMO_HOLD=1 keeps it up)."""
    lan, nodes, central = site["lan"], site["nodes"], site["keys"].central
    parts_nodes = {name: demo_node(nodes, name) for name in ("pi-a", "pi-b", "pi-c")}
    # Alone (`make demo`), the site has just booted: its cards join first.
    for name, node in parts_nodes.items():
        node.wait_for(f"{name} in the site", lambda node=node: node.status()["join"]["state"] in ("init", "joined"),
                      timeout=JOIN_TIMEOUT, interval=1)
        node.wait_for(f"{name}'s proxy leaf from a replica", lambda node=node: leaf_source(node) == "control",
                      timeout=120, interval=1)
    members = {name: node for name, node in nodes.items()
               if node.status()["join"]["state"] in ("init", "joined") and not seed_lists_servers(node)}
    binary = host_binary("pimesh-demo")
    for node in members.values():
        dest = os.path.join(node.root, "usr/local/bin/pimesh-demo")
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copyfile(binary, dest)
        os.chmod(dest, 0o755)
    # The span collector, on the bridge's own address.
    spans_file, port_file = str(tmp_path / "spans.jsonl"), str(tmp_path / "collector-port")
    collector = subprocess.Popen(["ip", "netns", "exec", lan.ns, "python3", "-c", SPAN_COLLECTOR,
                                  f"{BRIDGE_NET}.1", port_file, spans_file],
                                 stdout=subprocess.DEVNULL, stderr=open(str(tmp_path / "collector.log"), "w"))
    started = []
    checker = None
    try:
        collector_port = wait_for("the span collector's port",
                                  lambda: os.path.exists(port_file) and open(port_file).read().strip(), timeout=30)
        DEMO["zipkin_url"] = f"http://{BRIDGE_NET}.1:{collector_port}/api/v2/spans"
        DEMO["from_revision"] = central.revision + 1
        revision = publish(site)
        for name, node in members.items():
            wait_revision(site, name, node, revision)
        # Each part as a transient unit of its node.
        for name, part, flags in DEMO_PARTS:
            node = parts_nodes[name]
            node.run(["systemd-run", f"--unit=demo-{part}", "--collect", "--setenv=RUST_LOG=info",
                      "/usr/local/bin/pimesh-demo", part, *flags])
            started.append((node, part))
        for name, part, _ in DEMO_PARTS:
            node, port = parts_nodes[name], DEMO_HEALTH[part]
            node.wait_for(f"demo-{part} active on {name}",
                          lambda node=node, part=part: node.show(f"demo-{part}.service", "ActiveState")["ActiveState"] == "active",
                          timeout=60, interval=0.5)
            if port:
                node.wait_for(f"demo-{part} answering on {name}",
                              lambda node=node, port=port: node.http_get(f"http://127.0.0.1:{port}/healthz")[0] == 200,
                              timeout=60, interval=0.5)
        webapp = Lan.address(parts_nodes["pi-a"].netns)
        page = f"http://{webapp}:8090/"

        # One sampled trace from the LAN through the page's API: the proxies join it and
        # send a CLIENT and a SERVER span per mesh hop to the collector.
        trace_id = uuid.uuid4().hex
        traceparent = f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"
        def traced():
            out = subprocess.run(["ip", "netns", "exec", lan.ns, "python3", "-c", TRACED_GET,
                                  page + "api/staff/truck-01", "traceparent", traceparent],
                                 capture_output=True, text=True, timeout=40).stdout.strip()
            return out in ("200", "500") and out
        wait_for("a traced request answered through the mesh", traced, timeout=120, interval=1)

        def hops():
            seen = set()
            if os.path.exists(spans_file):
                with open(spans_file) as f:
                    for line in f:
                        for span in json.loads(line):
                            if span.get("traceId", "").lower().rjust(32, "0") == trace_id:
                                dst = span.get("tags", {}).get("pimesh.dst_service", "")
                                hop = "gateway" if dst == "fleetman-api-gateway" else \
                                    "staff" if dst.startswith("fleetman-staff-service") or dst == "error-injector" else dst
                                seen.add((hop, span.get("kind")))
            want = {(hop, kind) for hop in ("gateway", "staff") for kind in ("CLIENT", "SERVER")}
            if not want <= seen:
                raise RuntimeError(f"spans of the trace so far: {sorted(seen)}")
            return seen
        seen = wait_for("CLIENT and SERVER spans of both mesh hops at the collector", hops, timeout=120, interval=1)
        print(f"demo: trace {trace_id}: spans {sorted(seen)}")

        # The page in headless Chromium, in the LAN's namespace (it reaches only the LAN).
        shots = str(tmp_path / "demo-screenshots")
        checker = subprocess.Popen(
            ["ip", "netns", "exec", lan.ns, binary, "page-check", "--url", page + "?staff_hz=100",
             "--screenshots", shots, "--staff-calls", "2000", "--fault-on", "fleetman-position-tracker",
             "--timeout", "300"],
            stdout=subprocess.PIPE, stderr=open(str(tmp_path / "page-check.log"), "w"), text=True)
        watchdog = threading.Timer(1800, checker.kill)
        watchdog.start()
        phases = {}
        try:
            for line in checker.stdout:
                phase = json.loads(line)
                print(f"demo: page-check {line.strip()}")
                phases[phase["phase"]] = phase
                if phase["phase"] == "waiting-fault":
                    DEMO["fault_from"] = central.revision + 1
                    published = time.monotonic()
                    revision = publish(site)
                    for name in ("pi-a", "pi-b"):
                        wait_revision(site, name, parts_nodes[name], revision)
                    figures["demo_fault_publish_to_applied_on_pi_a_pi_b_s"] = round(time.monotonic() - published, 1)
        finally:
            watchdog.cancel()
        code = checker.wait(timeout=60)
        with open(str(tmp_path / "page-check.log")) as f:
            log = f.read()[-3000:]
        assert code == 0, f"page-check exited {code}; phases {phases}\n{log}"
        assert phases["loaded"]["vehicles"] == 8, phases
        feed = phases["moving"]["feed"]
        assert feed.count(": websocket") == 2 and "polling" not in feed, feed
        staff = phases["staff"]
        # Binomial(2000, 0.1): a standard deviation of 0.67 points, so ± 3 is 4.5 of them.
        assert staff["calls"] >= 2000, staff
        assert 0.07 <= staff["share"] <= 0.13, staff
        assert "fault" in phases, phases
        figures["demo_staff_calls"] = staff["calls"]
        figures["demo_staff_error_share"] = staff["share"]
        figures["demo_fault_seen_on_page_s"] = phases["fault"]["seconds"]
        print(f"demo: screenshots in {shots}")

        # Latency per hop at ~100 requests per second: the client's own timing, and the
        # proxies' histograms on pi-a (outbound: each hop as its caller saw it, the hops
        # after it included; inbound: the gateway's side of the first hop).
        a = parts_nodes["pi-a"]
        series = [("outbound", "fleetman-api-gateway"), ("inbound", "fleetman-api-gateway"),
                  ("outbound", "fleetman-staff-service"), ("inbound", "fleetman-staff-service-stable")]
        before = {s: latency_histogram(a, *s) for s in series}
        out = subprocess.run(["ip", "netns", "exec", lan.ns, "python3", "-c", STEADY_LOAD, webapp,
                              "/api/staff/truck-02", "100", "10"],
                             capture_output=True, text=True, timeout=120)
        load = json.loads(out.stdout or "{}")
        after = {s: latency_histogram(a, *s) for s in series}
        figures["demo_load_client_to_webapp"] = load
        for (direction, service) in series:
            figures[f"demo_hop_{direction}_{service}_latency"] = hop_latency(before[(direction, service)],
                                                                             after[(direction, service)])
        print(f"demo: load {load}")

        if os.environ.get("PIMESH_DEMO_HOLD"):
            hold(lan, webapp, shots)
    finally:
        if checker and checker.poll() is None:
            checker.kill()
            checker.wait()
        for node, part in reversed(started):
            node.run(["systemctl", "stop", f"demo-{part}.service"], check=False, timeout=60)
        collector.terminate()
        collector.wait(timeout=10)


def hold(lan, webapp, shots):
    """Keeps the demo up until Ctrl-C, the page forwarded to 127.0.0.1:8080 of this machine."""
    forward = subprocess.Popen(
        ["socat", "TCP-LISTEN:8080,bind=127.0.0.1,fork,reuseaddr",
         f"EXEC:ip netns exec {lan.ns} socat STDIO TCP\\:{webapp}\\:8090"],
        start_new_session=True)  # Ctrl-C is the test's to take
    print(f"\n\nThe demo runs: open http://127.0.0.1:8080/ on this machine (forwarded into the site's "
          f"LAN to pi-a's webapp at {webapp}:8090; from another machine: ssh -L 8080:127.0.0.1:8080 "
          f"<this machine>). The tracker keeps the fault the case published (half its requests "
          f"answered 503). Screenshots: {shots}. Ctrl-C stops it.\n", flush=True)
    try:
        while True:
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = forward.wait(timeout=60)
                raise AssertionError(f"the forwarder on 127.0.0.1:8080 exited ({code}): is the port taken?")
    except KeyboardInterrupt:
        pass
    finally:
        forward.terminate()
        forward.wait(timeout=10)
