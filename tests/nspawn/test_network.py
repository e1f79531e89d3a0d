"""Zero-configuration networking of a node: the image's systemd-networkd, systemd-resolved
and chrony settings, on a LAN made of two network namespaces joined by a veth pair. One
holds the node (the amd64 root booted in systemd-nspawn; its end is `eth0`, which the
image's 20-wired.network matches); the other is a laptop on the same switch (`lan0`),
played by the host's python3 and, later, a DHCP server (dnsmasq).

In order, on one boot:
  1. no DHCP server: the node gives itself an IPv4 link-local address (169.254.0.0/16);
  2. systemd-resolved holds UDP 5353 for name resolution only; a responder on the node (a
     stand-in for the supervisor's mdns-sd: SO_REUSEADDR and SO_REUSEPORT) binds beside it
     and answers the laptop's query for the node's name with the link-local address;
  3. with that responder still bound, the node resolves the laptop's .local name through
     resolved (glibc, as any program on the node would);
  4. a DHCP server appears: the node takes its lease and drops the link-local address;
  5. chrony is skipped in a container (it needs CAP_SYS_TIME) and no unit failed.
"""

import ipaddress
import json
import os
import subprocess
import time
import uuid

import pytest

from harness.container import Container

LAPTOP_LL = "169.254.250.1"
DHCP_NET = ipaddress.ip_network("192.168.213.0/24")
DHCP_SERVER = "192.168.213.1"

# The laptop: queries 224.0.0.251:5353 for NAME (type A, from port 5353, TTL 255) once a
# second until an answer for NAME arrives; prints its addresses as JSON.
MDNS_QUERY = r"""
import json, socket, struct, sys, time
name, local, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])

def encode(n):
    return b"".join(bytes([len(p)]) + p.encode() for p in n.rstrip(".").split(".")) + b"\0"

def read_name(msg, at):
    labels, jumped, end = [], False, at
    while True:
        length = msg[at]
        if length & 0xC0 == 0xC0:
            if not jumped:
                end = at + 2
            at, jumped = ((length & 0x3F) << 8) | msg[at + 1], True
            continue
        if length == 0:
            return ".".join(labels), (end if jumped else at + 1)
        labels.append(msg[at + 1:at + 1 + length].decode(errors="replace"))
        at += 1 + length

def answers(msg):
    _, flags, qd, an, ns, ar = struct.unpack("!6H", msg[:12])
    at = 12
    for _ in range(qd):
        _, at = read_name(msg, at)
        at += 4
    for _ in range(an + ns + ar):
        rname, at = read_name(msg, at)
        rtype, _, _, rdlen = struct.unpack("!HHIH", msg[at:at + 10])
        at += 10
        if rtype == 1 and rdlen == 4:
            yield rname.lower(), socket.inet_ntoa(msg[at:at + 4])
        at += rdlen

s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
s.bind(("0.0.0.0", 5353))
s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, socket.inet_aton("224.0.0.251") + socket.inet_aton(local))
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(local))
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)
s.settimeout(1.0)
query = struct.pack("!6H", 0, 0, 1, 0, 0, 0) + encode(name) + struct.pack("!HH", 1, 1)
deadline = time.monotonic() + timeout
while time.monotonic() < deadline:
    s.sendto(query, ("224.0.0.251", 5353))
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        try:
            msg, _ = s.recvfrom(9000)
        except socket.timeout:
            break
        if len(msg) < 12 or not struct.unpack("!H", msg[2:4])[0] & 0x8000:
            continue  # a query (ours, looped back, or another host's)
        found = sorted({a for n, a in answers(msg) if n == name.lower().rstrip(".")})
        if found:
            print(json.dumps(found))
            sys.exit(0)
print("null")
"""

# A responder (run on the node's side and on the laptop's): binds UDP 5353 the way mdns-sd
# does (SO_REUSEADDR and SO_REUSEPORT), joins the group on IFNAME, says "bound", then answers
# every query for NAME (type A or ANY) with ADDRESS, by multicast, as RFC 6762 asks.
MDNS_RESPOND = r"""
import socket, struct, sys
name, address, ifname = sys.argv[1].lower().rstrip("."), sys.argv[2], sys.argv[3]
wanted = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
s.bind(("0.0.0.0", 5353))
mreqn = socket.inet_aton("224.0.0.251") + socket.inet_aton("0.0.0.0") + struct.pack("i", socket.if_nametoindex(ifname))
s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)
print("bound", flush=True)
while True:
    msg, sender = s.recvfrom(9000)
    if len(msg) < 12 or struct.unpack("!H", msg[2:4])[0] & 0x8000:
        continue  # an answer, not a query
    at = 12
    for _ in range(struct.unpack("!H", msg[4:6])[0]):
        end = msg.index(b"\0", at) + 1
        qname, (qtype, _) = msg[at:end].lower(), struct.unpack("!HH", msg[end:end + 4])
        at = end + 4
        if qname == wanted and qtype in (1, 255):
            answer = (struct.pack("!6H", 0, 0x8400, 0, 1, 0, 0) + wanted
                      + struct.pack("!HHIH", 1, 0x8001, 120, 4) + socket.inet_aton(address))
            s.sendto(answer, ("224.0.0.251", 5353))
            print("answered", sender[0], flush=True)
"""


def sh(*argv):
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def ipv4_addresses(node, ifname="eth0"):
    out = node.run(["ip", "-j", "-4", "addr", "show", "dev", ifname], check=False).stdout
    try:
        links = json.loads(out or "[]")
    except ValueError:
        return []
    return [ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}")
            for link in links for a in link.get("addr_info", [])]


def link_local(addresses):
    return [a for a in addresses if a.ip in ipaddress.ip_network("169.254.0.0/16")]


class Responder:
    """MDNS_RESPOND in a network namespace, for as long as the `with` block runs."""

    def __init__(self, netns, name, address, ifname):
        self.name, self.address = name, address
        self.argv = ["nsenter", f"--net=/run/netns/{netns}", "python3", "-c", MDNS_RESPOND, name, address, ifname]

    def __enter__(self):
        self.process = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = self.process.stdout.readline().strip()
        if first != "bound":
            self.process.kill()
            raise AssertionError(f"could not bind UDP 5353: {first!r} {self.process.stderr.read()}")
        return self

    def __exit__(self, *exc):
        self.process.kill()
        self.process.wait()


def mdns_query(netns, name, local, timeout=30):
    out = subprocess.run(["nsenter", f"--net=/run/netns/{netns}", "python3", "-c", MDNS_QUERY, name, local,
                          str(timeout)], capture_output=True, text=True, timeout=timeout + 30)
    return json.loads(out.stdout.strip() or "null")


@pytest.fixture(scope="module")
def lan(tmp_path_factory):
    """Two network namespaces (node, laptop) joined by a veth pair: eth0 on the node's
    side, lan0 (169.254.250.1/16) on the laptop's."""
    tag = uuid.uuid4().hex[:6]
    names = {"node": f"pm-node-{tag}", "laptop": f"pm-lan-{tag}"}
    for netns in names.values():
        sh("ip", "netns", "add", netns)
    try:
        sh("ip", "link", "add", f"pmn{tag}", "type", "veth", "peer", "name", f"pml{tag}")
        sh("ip", "link", "set", f"pmn{tag}", "netns", names["node"])
        sh("ip", "-n", names["node"], "link", "set", f"pmn{tag}", "name", "eth0")
        sh("ip", "link", "set", f"pml{tag}", "netns", names["laptop"])
        sh("ip", "-n", names["laptop"], "link", "set", f"pml{tag}", "name", "lan0")
        sh("ip", "-n", names["laptop"], "addr", "add", f"{LAPTOP_LL}/16", "dev", "lan0")
        sh("ip", "-n", names["laptop"], "link", "set", "lan0", "up")
        sh("ip", "-n", names["laptop"], "link", "set", "lo", "up")
        yield names | {"dir": str(tmp_path_factory.mktemp("lan"))}
    finally:
        for netns in names.values():
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)


@pytest.fixture(scope="module")
def node(lan):
    # nspawn grants CAP_NET_ADMIN only with a network it makes itself; networkd needs it.
    container = Container(network=f"--network-namespace-path=/run/netns/{lan['node']} "
                                  "--capability=CAP_NET_ADMIN")
    try:
        container.boot()
        yield container
    finally:
        container.shutdown()


@pytest.fixture(scope="module")
def node_responder(node, lan):
    """A stand-in for the supervisor's mDNS responder on the node, bound to UDP 5353 beside
    systemd-resolved (which must hold it first, as at boot), answering for the node's name
    with its link-local address."""
    held = node.wait_for("systemd-resolved on UDP 5353",
                         lambda: "systemd-resolve" in node.run(["ss", "-Hulpn", "sport = :5353"]).stdout,
                         timeout=60, interval=1)
    assert held
    ll = node.wait_for("an IPv4 link-local address on eth0",
                       lambda: link_local(ipv4_addresses(node)), timeout=120, interval=1)
    name = node.run(["hostname"]).stdout.strip() + ".local"
    with Responder(lan["node"], name, str(ll[0].ip), "eth0") as responder:
        yield responder


@pytest.fixture(scope="module")
def dhcp_server(lan):
    """dnsmasq on the laptop's side, started by the test that needs it."""
    processes = []

    def start():
        sh("ip", "-n", lan["laptop"], "addr", "add", f"{DHCP_SERVER}/{DHCP_NET.prefixlen}", "dev", "lan0")
        first, last = DHCP_NET[50], DHCP_NET[99]
        processes.append(subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{lan['laptop']}", "dnsmasq", "--keep-in-foreground",
             "--conf-file=/dev/null", "--port=0", "--interface=lan0", "--bind-interfaces",
             f"--dhcp-range={first},{last},{DHCP_NET.netmask},1h", "--dhcp-authoritative",
             f"--dhcp-leasefile={lan['dir']}/leases", f"--pid-file={lan['dir']}/dnsmasq.pid",
             "--log-dhcp", "--log-facility=-"],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(lan["dir"], "dnsmasq.log"), "w")))

    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=10)


class TestZeroConfigNetwork:
    def test_without_dhcp_the_node_takes_a_link_local_address(self, node):
        started = time.monotonic()
        addresses = node.wait_for("an IPv4 link-local address on eth0",
                                  lambda: link_local(ipv4_addresses(node)), timeout=120, interval=1)
        print(f"\nIPv4 link-local {addresses[0]} {time.monotonic() - started:.1f}s after the node booted")
        assert addresses[0].network == ipaddress.ip_network("169.254.0.0/16")

    def test_a_responder_binds_beside_resolved_and_answers_for_the_node(self, node, lan, node_responder):
        assert node.run(["resolvectl", "mdns", "eth0"]).stdout.split()[-1] == "resolve"
        name, ll = node_responder.name, node_responder.address
        found = node.wait_for(f"an mDNS answer for {name}",
                              lambda: mdns_query(lan["laptop"], name, LAPTOP_LL, timeout=10), timeout=120, interval=1)
        assert found == [ll], found

    def test_the_node_resolves_a_laptops_local_name_through_resolved(self, node, lan, node_responder):
        name = f"laptop-{uuid.uuid4().hex[:6]}.local"
        with Responder(lan["laptop"], name, LAPTOP_LL, "lan0"):
            def resolved():
                out = node.run(["getent", "ahostsv4", name], check=False).stdout
                return {line.split()[0] for line in out.splitlines()}

            found = node.wait_for(f"{name} through glibc and systemd-resolved", resolved, timeout=120, interval=1)
        assert found == {LAPTOP_LL}, found
        assert node_responder.process.poll() is None, "the node's responder died"

    def test_a_dhcp_lease_replaces_the_link_local_address(self, node, dhcp_server):
        dhcp_server()
        started = time.monotonic()

        def leased_only():
            addresses = ipv4_addresses(node)
            leased = [a for a in addresses if a.ip in DHCP_NET]
            return leased if leased and not link_local(addresses) else None

        leased = node.wait_for("a DHCP lease on eth0 and no link-local address", leased_only,
                               timeout=240, interval=1)
        print(f"\nDHCP {leased[0]} {time.monotonic() - started:.1f}s after the server started")

    def test_chrony_is_skipped_in_a_container_and_no_unit_failed(self, node):
        chrony = node.show("chrony.service", "UnitFileState", "ConditionResult", "ActiveState")
        assert chrony == {"UnitFileState": "enabled", "ConditionResult": "no", "ActiveState": "inactive"}, chrony
        assert node.run(["systemctl", "--failed", "--plain", "--no-legend"]).stdout.strip() == ""
