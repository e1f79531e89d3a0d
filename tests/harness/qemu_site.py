"""A site of arm64 boards in QEMU: the site's keys, the seeds of its cards, the site LAN
(a hub on 127.0.0.1 that every board's second card connects to, `harness.lan_hub`; no
DHCP: the boards give themselves IPv4 link-local addresses and mDNS stays on that LAN),
and the checks a user makes of a board's trust files on the host with `openssl`."""

import os
import re
import subprocess
import tempfile

from harness.paths import host_binary
from harness.qemu import Node
from harness.wait import wait_for

PIMESHCTL = host_binary("pimeshctl")
SITE = "lab"
# The site configuration, as the central server would deliver it: pi-1's own status API
# as a service, reached from other boards on their local port 14200.
CLUSTER = (f'site = "{SITE}"\n\n[services.status]\nport = 4200\nlocal_port = 14200\n'
           'nodes = ["pi-1"]\n')
# GET /status through the local proxy's port for the service, with bash alone (the image
# has no curl).
SERVED_BY_PI_1 = re.compile(r'"name":\s*"pi-1"')
GET_THROUGH_MESH = ("exec 3<>/dev/tcp/127.0.0.1/14200 && "
                    "printf 'GET /status HTTP/1.1\\r\\nHost: status\\r\\nConnection: close\\r\\n\\r\\n' >&3 && "
                    "timeout 20 cat <&3")
TRUST_ON_CARD = ("anchor.pem", "issuer.pem", "issuer.key")


def wait(what, predicate, timeout, interval=3):
    """wait_for with the errors a booting VM gives while it is not there yet."""
    return wait_for(what, predicate, timeout=timeout, interval=interval,
                    expected=(OSError, ValueError, KeyError, RuntimeError, subprocess.TimeoutExpired))


def site_keys(folder):
    """`pimeshctl site init` in `folder`: {"dir": the site folder, "token": the join token}."""
    out = os.path.join(folder, SITE)
    subprocess.run([PIMESHCTL, "site", "init", SITE, "--out", out], capture_output=True, check=True)
    with open(os.path.join(out, "join-token")) as f:
        token = f.read().strip()
    return {"dir": out, "token": token}


def seed(keys, role, node, public):
    # mDNS on the site LAN card only: QEMU's NAT card (eth0) relays a guest's multicast onto
    # the host's network.
    return (f'site = "{SITE}"\nrole = "{role}"\nnode = "{node}"\njoin_token = "{keys["token"]}"\n'
            'mdns_interfaces = ["eth1"]\n'
            f'ssh_authorized_keys = ["{public}"]\n')


def put_trust_on_card(node, keys):
    """What `pimeshctl image configure --trust` writes onto the init node's card (the image
    has the folder)."""
    for name in TRUST_ON_CARD:
        node.write_boot_file(os.path.join(keys["dir"], name), f"pimesh-trust/{name}")


def lan_card(hub, index):
    """The site LAN card of board `index`: connected to the LAN hub."""
    return {"LAN_CONNECT": hub.address, "LAN_MAC": f"52:54:00:50:00:{index:02x}"}


def served_through_mesh(node):
    """pi-1's status as `node` gets it through both proxies, or None."""
    out = node.ssh(GET_THROUGH_MESH, check=False, timeout=60)
    return out if out and SERVED_BY_PI_1.search(out) else None


def openssl(*args, stdin=None):
    result = subprocess.run(["openssl", *args], input=stdin, capture_output=True, text=True)
    if result.returncode != 0:
        raise AssertionError(f"openssl {' '.join(args)}: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


def check_pair(cert_pem, key_pem, anchor_pem, what, uri=None):
    """Asserts that `key_pem` is the key of the first certificate of `cert_pem`, that the
    chain verifies under `anchor_pem` (the intermediates from the chain itself), and that
    the certificate names `uri` when given."""
    with tempfile.TemporaryDirectory() as folder:
        def put(name, text):
            path = os.path.join(folder, name)
            with open(path, "w") as f:
                f.write(text)
            return path

        cert, anchor = put("cert.pem", cert_pem), put("anchor.pem", anchor_pem)
        key = put("key.pem", key_pem)
        assert openssl("x509", "-noout", "-pubkey", "-in", cert) == openssl("pkey", "-pubout", "-in", key), \
            f"{what}: the key is not the certificate's"
        verified = openssl("verify", "-CAfile", anchor, "-untrusted", cert, cert)
        assert verified.strip().endswith("OK"), f"{what}: {verified}"
        if uri:
            names = openssl("x509", "-noout", "-ext", "subjectAltName", "-in", cert)
            assert f"URI:{uri}" in names, f"{what}: {names}"


def first_two(base_image, keys, ssh_key, public, folder, hub):
    """pi-1 (the init node, the site's trust on its card) and pi-2 (the join seed and
    nothing else) on the LAN of `hub`, not yet powered on; returns (pi-1, pi-2)."""
    dirs = [os.path.join(folder, name) for name in ("pi-1", "pi-2")]
    for d in dirs:
        os.makedirs(d)
    first = Node(dirs[0], base_image, seed(keys, "init", "pi-1", public), ssh_key, lan=lan_card(hub, 1))
    put_trust_on_card(first, keys)
    second = Node(dirs[1], base_image, seed(keys, "join", "pi-2", public), ssh_key, lan=lan_card(hub, 2))
    return first, second


def boot_first_two(base_image, keys, ssh_key, public, folder, hub):
    """Powers on both boards of `first_two` at once; returns (pi-1, pi-2)."""
    first, second = first_two(base_image, keys, ssh_key, public, folder, hub)
    return first.boot(), second.boot()


def give_cluster_config(nodes):
    """Writes CLUSTER as each node's active site configuration, whole and durable as the
    supervisor writes a revision: the new file synced, renamed over the old, the folder
    synced (a rename alone may reach the disk before the data: a power cut soon after
    leaves an empty file)."""
    for node in nodes:
        node.ssh(f"cat > /etc/pimesh/cluster.toml.new <<'EOF'\n{CLUSTER}EOF\n"
                 "sync /etc/pimesh/cluster.toml.new && "
                 "mv /etc/pimesh/cluster.toml.new /etc/pimesh/cluster.toml && sync /etc/pimesh")
