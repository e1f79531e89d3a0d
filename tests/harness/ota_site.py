"""A Pimesh site for over-the-air tests: its keys (made by the real `pimeshctl site init`),
the real `pimesh-central` serving it, and a node container whose seed points at it.

The central server and `pimeshctl` are host binaries (`make host-bins`) run inside the
container's network namespace (nsenter -n), so the node reaches the central server on its
own 127.0.0.1 exactly as it would reach a remote one: over TLS, with its node certificate.

`forge()` builds revision documents independently of the Rust code (the signed format is
written out here from its definition and signed with openssl), so tests can hand the node
documents that the real central server would never serve: tampered, for another site,
replayed, oversized, truncated, garbage, or validly signed over an invalid configuration.
"""

import base64
import json
import os
import re
import struct
import subprocess
import tempfile
import time

from harness import scratch
from harness.container import Container
from harness.paths import host_binary

PIMESHCTL = host_binary("pimeshctl")
CENTRAL = host_binary("pimesh-central")
PORT = 8443
FORMAT = "pimesh-revision/1"
HOSTILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hostile_central.py")


def sha256_hex(text):
    import hashlib
    return hashlib.sha256(text.encode()).hexdigest()


def cluster_config(site, max_connections=1000, services=("web",), replicas=3, extra=""):
    """A small valid site configuration; each argument changes what a different unit reads."""
    text = f'site = "{site}"\n\n[control]\nreplicas = {replicas}\n\n[proxy]\nmax_connections = {max_connections}\n'
    for index, name in enumerate(services):
        text += f'\n[services.{name}]\nport = {8080 + index}\nnodes = ["pi-a"]\n'
    return text + extra


class Site:
    def __init__(self, name="lab", node="pi-a", ota=None, address="127.0.0.1", port=PORT,
                 byo_init=False, netns=None):
        """`address`:`port` is where nodes reach the central server (a QEMU guest reaches
        the host's 127.0.0.1 as 10.0.2.2); the server listens on 127.0.0.1:`port` of the
        network namespace it runs in (the container's, or the host's without one), or with
        `netns` on every address of that named namespace (a test's LAN, where `address` is
        the namespace's own address on the LAN).

        The node joins the site and is enrolled by hand (`pimeshctl node sign`); with
        `byo_init` it is the site's init node instead, given the site's anchor and issuer
        on its boot partition, and signs its own certificate."""
        self.byo_init = byo_init
        self.name = name
        self.node = node
        self.netns = netns
        self.address = address
        self.port = port
        self.dir = scratch.folder("pimesh-site-")
        self.keys = os.path.join(self.dir, name)
        self.container = None
        out = subprocess.run([PIMESHCTL, "site", "init", name, "--central-url",
                              f"https://{address}:{port}", "--out", self.keys],
                             capture_output=True, text=True, check=True).stdout
        self.public_key = re.search(r'public_key = "([^"]+)"', out).group(1)
        self.server_cert = os.path.join(self.dir, "server.pem")
        self.server_key = os.path.join(self.dir, "server.key")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:P-256", "-nodes", "-days", "30", "-subj", f"/CN={address}",
                        "-addext", f"subjectAltName=IP:{address},IP:127.0.0.1",
                        "-addext", "basicConstraints=critical,CA:FALSE",
                        "-addext", "extendedKeyUsage=serverAuth",
                        "-keyout", self.server_key, "-out", self.server_cert],
                       capture_output=True, check=True)
        self.central_config = os.path.join(self.dir, "central.toml")
        with open(self.central_config, "w") as f:
            listen = "0.0.0.0" if netns else "127.0.0.1"
            f.write(f'listen = "{listen}:{port}"\nstate_dir = "{self.dir}/state"\n'
                    f'tls_cert = "{self.server_cert}"\ntls_key = "{self.server_key}"\n'
                    f'long_poll_max = "60s"\n\n[[sites]]\nname = "{name}"\n'
                    f'anchor = "{self.keys}/anchor.pem"\npublic_key = "{self.public_key}"\n')
        self.ota = ota or {}
        self.central = None
        self.hostile = None
        self.revision = 0

    # --- the node ------------------------------------------------------------------------
    def seed(self, top=""):
        """The node's seed; `top` adds top-level settings (e.g. ssh_authorized_keys)."""
        with open(os.path.join(self.keys, "join-token")) as f:
            token = f.read().strip()
        role = "init" if self.byo_init else "join"
        return (f'site = "{self.name}"\nrole = "{role}"\nnode = "{self.node}"\njoin_token = "{token}"\n{top}\n'
                + self.central_table())

    def central_table(self):
        """The seed's `[central]` table: where the central server is, its CA and the
        site's revision key."""
        with open(self.server_cert) as f:
            ca = f.read()
        return (f'[central]\nurl = "https://{self.address}:{self.port}"\npublic_key = "{self.public_key}"\n'
                f'ca = """\n{ca}"""\n')

    def supervisor_config(self):
        lines = "".join(f"{key} = {value}\n" for key, value in self.ota.items())
        return f"[ota]\n{lines}"

    def boot_node(self):
        """Boots the node, starts the central server, and enrolls the node: signs the
        request its supervisor made with `pimeshctl node sign`."""
        self.container = Container()
        self.container.write("/boot/firmware/pimesh.toml", self.seed())
        self.container.write("/etc/pimesh/supervisor.toml", self.supervisor_config())
        # What `pimeshctl image configure --trust` writes: the anchor, and for the init
        # node its issuer too.
        for name in ("anchor.pem", "issuer.pem", "issuer.key") if self.byo_init else ("anchor.pem",):
            with open(os.path.join(self.keys, name)) as f:
                self.container.write(f"/boot/firmware/pimesh-trust/{name}", f.read())
        self.container.boot()
        self.start_central()
        if self.byo_init:
            self.container.wait_for("the OTA client to start polling",
                                    lambda: self.ota_status()["state"] == "idle", timeout=30)
            return self.container
        csr = self.node_path("/var/lib/pimesh/identity/node.csr")
        self.container.wait_for("the node's certificate request", lambda: os.path.exists(csr))
        self.container.write("/var/lib/pimesh/identity/node.pem", self.sign_node(csr))
        self.container.wait_for("the OTA client to start polling",
                                lambda: self.ota_status()["state"] == "idle", timeout=30)
        return self.container

    def sign_node(self, csr_path):
        """The certificate chain for the node's request, as `pimeshctl node sign` makes it."""
        chain = os.path.join(self.dir, "node.pem")
        subprocess.run([PIMESHCTL, "node", "sign", csr_path, "--site-dir", self.keys, "--node",
                        self.node, "--out", chain], capture_output=True, text=True, check=True)
        with open(chain) as f:
            return f.read()

    def node_path(self, path):
        return os.path.join(self.container.root, path.lstrip("/"))

    def ota_status(self):
        return self.container.status()["ota"]

    def active_config(self):
        """The node's /etc/pimesh/cluster.toml, None when absent."""
        try:
            with open(self.node_path("/etc/pimesh/cluster.toml")) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def proxy_config(self):
        code, body = self.container.http_get("http://127.0.0.1:4191/config")
        if code != 200:
            raise RuntimeError(f"proxy /config: {code} {body}")
        return json.loads(body)

    def wait_committed(self, revision, timeout=60):
        return self.container.wait_for(
            f"revision {revision} committed",
            lambda: (lambda s: s if s["committed"] == revision and s["state"] == "idle" else None)(
                self.ota_status()), timeout=timeout)

    # --- the central server --------------------------------------------------------------
    def in_netns(self, argv):
        """argv in the central server's network namespace: the named one, else the node
        container's (as is, without either)."""
        if self.netns:
            return ["nsenter", f"--net=/run/netns/{self.netns}", *argv]
        if self.container is None:
            return list(argv)
        return ["nsenter", "-t", str(self.container.leader), "-n", *argv]

    def start_central(self):
        log = open(os.path.join(self.dir, "central.log"), "a")
        self.central = subprocess.Popen(self.in_netns([CENTRAL, "--config", self.central_config]),
                                        stdout=log, stderr=log)
        self.wait_port()

    def ensure_central(self):
        """The real central server serving, whatever a test left: the hostile one stopped,
        the real one started when it is not running."""
        self.stop_hostile()
        if self.central is None or self.central.poll() is not None:
            self.central = None
            self.start_central()

    def kill_central(self):
        if self.central and self.central.poll() is None:
            self.central.kill()
            self.central.wait(timeout=10)
        self.central = None

    def wait_port(self):
        deadline = time.monotonic() + 20
        probe = f"import socket; socket.create_connection(('127.0.0.1', {self.port}), 1)"
        while time.monotonic() < deadline:
            if subprocess.run(self.in_netns(["python3", "-c", probe]),
                              capture_output=True).returncode == 0:
                return
            time.sleep(0.1)
        raise AssertionError(f"nothing listens on 127.0.0.1:{self.port}")

    def ctl(self, *args, check=True):
        result = subprocess.run(self.in_netns([PIMESHCTL, *args]), capture_output=True, text=True)
        if check and result.returncode != 0:
            raise AssertionError(f"pimeshctl {' '.join(args)}: {result.stderr}")
        return result

    def publish(self, config, try_mode=False):
        """Publishes `config` as the next revision through the real central server."""
        path = os.path.join(self.dir, "cluster.toml")
        with open(path, "w") as f:
            f.write(config)
        self.revision += 1
        args = ["config", "publish", path, "--site-dir", self.keys, "--central",
                f"https://127.0.0.1:{self.port}", "--central-ca", self.server_cert,
                "--revision", str(self.revision)]
        self.ctl(*args, *(["--try"] if try_mode else []))
        return self.revision

    def rollout(self, revision):
        """`pimeshctl rollout status --revision N -o json` (signed with the site folder's
        key) and its exit code (0, or 3 when halted or aborted)."""
        result = self.ctl("rollout", "status", "--revision", str(revision), "-o", "json",
                          "--site-dir", self.keys, "--central", f"https://127.0.0.1:{self.port}",
                          "--central-ca", self.server_cert, check=False)
        if result.returncode not in (0, 3):
            raise AssertionError(f"pimeshctl rollout status: {result.stderr}")
        return json.loads(result.stdout), result.returncode

    def fleet_status(self):
        """`pimeshctl status -o json` and its exit code (0 healthy, 3 not)."""
        result = self.ctl("status", "-o", "json", "--site-dir", self.keys,
                          "--central", f"https://127.0.0.1:{self.port}",
                          "--central-ca", self.server_cert, check=False)
        if result.returncode not in (0, 3):
            raise AssertionError(f"pimeshctl status: {result.stderr}")
        return json.loads(result.stdout), result.returncode

    def central_report(self, node=None):
        """What the central server holds for this node (or `node`): its stored report."""
        path = os.path.join(self.dir, "state", self.name, "reports", f"{node or self.node}.json")
        with open(path) as f:
            return json.load(f)

    # --- a hostile server ----------------------------------------------------------------
    def start_hostile(self):
        """Replaces the central server with one that serves whatever `offer()` gives it,
        once each, and records the node's reports."""
        self.kill_central()
        self.hostile_dir = os.path.join(self.dir, "hostile")
        os.makedirs(self.hostile_dir, exist_ok=True)
        log = open(os.path.join(self.dir, "hostile.log"), "a")
        self.hostile = subprocess.Popen(self.in_netns(
            ["python3", HOSTILE, str(self.port), self.server_cert, self.server_key,
             os.path.join(self.keys, "anchor.pem"), self.hostile_dir]), stdout=log, stderr=log)
        self.wait_port()

    def stop_hostile(self):
        if self.hostile:
            self.hostile.kill()
            self.hostile.wait(timeout=10)
            self.hostile = None

    def offer(self, document):
        temp = os.path.join(self.hostile_dir, ".offer")
        with open(temp, "wb") as f:
            f.write(document)
        os.rename(temp, os.path.join(self.hostile_dir, "offer"))

    def hostile_reports(self):
        try:
            with open(os.path.join(self.hostile_dir, "reports.jsonl")) as f:
                return [json.loads(line) for line in f if line.strip()]
        except FileNotFoundError:
            return []

    def forge(self, config, revision, site=None, mode="apply", key_dir=None):
        """A revision document signed with the site key (or another site's), built from the
        format's definition: FORMAT NUL, len+site, revision, mode byte, len+config."""
        site = site or self.name
        payload = (FORMAT.encode() + b"\0" + struct.pack(">Q", len(site)) + site.encode()
                   + struct.pack(">Q", revision) + bytes([1 if mode == "try" else 0])
                   + struct.pack(">Q", len(config.encode())) + config.encode())
        signature = openssl_ed25519_sign(os.path.join(key_dir or self.keys, "signing.pk8"), payload)
        return json.dumps({"format": FORMAT, "site": site, "revision": revision, "mode": mode,
                           "config": config,
                           "signature": base64.b64encode(signature).decode()}).encode()

    def close(self):
        self.kill_central()
        self.stop_hostile()
        if self.container:
            self.container.shutdown()


def openssl_ed25519_sign(pk8_path, payload):
    """Ed25519 signature with openssl. `pimeshctl` writes PKCS#8 v2 (seed and public key),
    which openssl 3.0 does not read; the seed is re-wrapped as PKCS#8 v1."""
    with open(pk8_path, "rb") as f:
        der = f.read()
    prefix = bytes.fromhex("302e020100300506032b657004220420")
    with tempfile.TemporaryDirectory() as tmp:
        key, data = os.path.join(tmp, "key.der"), os.path.join(tmp, "payload")
        with open(key, "wb") as f:
            f.write(prefix + der[16:48])
        with open(data, "wb") as f:
            f.write(payload)
        return subprocess.run(["openssl", "pkeyutl", "-sign", "-inkey", key, "-keyform", "DER",
                               "-rawin", "-in", data], capture_output=True, check=True).stdout
