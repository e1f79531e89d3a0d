"""The site trust root on the init node (amd64 root in systemd-nspawn, real systemd).

`generated`: an init node with nothing on its boot partition creates the site's anchor and
issuer once (keys 0600), keeps them across restarts, and lets the operator export the
anchor's key and remove it from the node.

`imported`: bring your own anchor — the site folder's anchor and issuer on the boot
partition (what `pimeshctl image configure --trust` writes), pinned by the seed's join
token; the node imports them, takes the keys off the boot partition, signs its own node
certificate with the site issuer, and takes configuration from the central server that
knows the same anchor, with no enrollment by hand.
"""

import hashlib
import os
import ssl
import stat

import pytest

from harness.container import Container, booted
from harness.ota_site import Site, cluster_config, sha256_hex

TRUST = "/var/lib/pimesh/trust"


def anchor_sha256(pem_text):
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem_text)).hexdigest()


def mode(container, path):
    return stat.S_IMODE(os.stat(os.path.join(container.root, path.lstrip("/"))).st_mode)


@pytest.fixture
def init_node():
    with booted('site = "lab"\nrole = "init"\nnode = "pi-a"\n') as container:
        yield container


def proxy_identity(container):
    """The identity in the proxy's /config, None while it does not answer."""
    config = container.proxy_config()
    return config.get("identity") if config else None


def test_an_init_node_generates_the_site_root_once_and_can_give_up_the_anchor_key(init_node):
    trust = init_node.wait_for("the trust root", lambda: init_node.status()["trust"]["present"]
                               and init_node.status()["trust"])
    assert trust["source"] == "generated" and trust["anchor_key_on_node"]
    with open(os.path.join(init_node.root, TRUST.lstrip("/"), "anchor.pem")) as f:
        assert trust["anchor_sha256"] == anchor_sha256(f.read())
    assert mode(init_node, TRUST + "/issuer.key") == 0o600
    assert mode(init_node, TRUST + "/anchor.key") == 0o600
    assert mode(init_node, TRUST + "/anchor.pem") == 0o644

    init_node.systemctl("restart", "pimesh-supervisor.service")
    again = init_node.wait_for("the supervisor back", lambda: init_node.status()["trust"])
    assert again["source"] == "existing"
    assert again["anchor_sha256"] == trust["anchor_sha256"], "the root is made once"

    control_uid = int(init_node.run(["id", "-u", "pimesh-control"]).stdout)
    issuer_key = os.path.join(init_node.root, TRUST.lstrip("/"), "issuer.key")
    assert os.stat(issuer_key).st_uid == control_uid, "the issuer key belongs to the replicas' user"

    init_node.run(["pimesh-supervisor", "trust", "export-anchor-key", "/root/anchor.key"])
    with open(os.path.join(init_node.root, "root/anchor.key")) as f:
        assert "BEGIN PRIVATE KEY" in f.read()
    assert mode(init_node, "/root/anchor.key") == 0o600
    assert not os.path.exists(os.path.join(init_node.root, TRUST.lstrip("/"), "anchor.key"))
    init_node.systemctl("restart", "pimesh-supervisor.service")
    after = init_node.wait_for("the supervisor back", lambda: init_node.status()["trust"])
    assert after["anchor_sha256"] == trust["anchor_sha256"]
    assert not after["anchor_key_on_node"]


def test_an_init_node_imports_the_operators_anchor_and_enrolls_itself():
    site = Site(byo_init=True)
    try:
        container = site.boot_node()  # waits until the OTA client polls: no enrollment by hand
        trust = container.status()["trust"]
        with open(os.path.join(site.keys, "anchor.pem")) as f:
            assert trust["anchor_sha256"] == anchor_sha256(f.read())
        assert trust["source"] in ("imported", "existing") and not trust["anchor_key_on_node"]
        boot_trust = os.path.join(container.root, "boot/firmware/pimesh-trust")
        assert sorted(os.listdir(boot_trust)) == ["anchor.pem", "issuer.pem"], "keys moved off /boot"
        assert mode(container, TRUST + "/issuer.key") == 0o600

        config = cluster_config(site.name)
        site.wait_committed(site.publish(config))
        assert site.proxy_config()["sha256"] == sha256_hex(config)
        assert site.central_report()["state"] == "applied"

        # The proxy reads the node credential from its files (the key is its user's) and
        # takes it up without a restart.
        proxy_uid = int(container.run(["id", "-u", "pimesh-proxy"]).stdout)
        node_key = os.path.join(container.root, "var/lib/pimesh/identity/node.key")
        assert os.stat(node_key).st_uid == proxy_uid and mode(container, "/var/lib/pimesh/identity/node.key") == 0o600

        identity = container.wait_for("the proxy's node identity", lambda: proxy_identity(container))
        assert identity["node"] == site.node and identity["site"] == site.name
        assert f"spiffe://{site.name}/node/{site.node}" in identity["ids"]
    finally:
        site.close()


def test_a_seed_pinning_another_anchor_is_refused():
    site = Site(byo_init=True)
    other = Site(name="lab")  # another site folder with the same name: another anchor
    try:
        container = Container()
        site.container = container
        container.write("/boot/firmware/pimesh.toml", site.seed())
        for name in ("anchor.pem", "issuer.pem", "issuer.key"):
            with open(os.path.join(other.keys, name)) as f:
                container.write(f"/boot/firmware/pimesh-trust/{name}", f.read())
        container.boot()
        trust = container.wait_for("the refusal", lambda: container.status()["trust"]["error"]
                                   and container.status()["trust"])
        assert not trust["present"]
        assert "join token pins" in trust["error"], trust
        assert not os.path.exists(os.path.join(container.root, TRUST.lstrip("/")))
    finally:
        site.close()
        other.close()


def test_a_joining_node_enrolled_by_hand_gives_its_proxy_the_certificate_without_a_restart():
    site = Site()  # role join: the operator signs the node's request (pimeshctl node sign)
    try:
        container = site.boot_node()
        status = container.status()
        assert not status["control"]["runs_replicas"], "no issuer here: no replicas"
        assert "no site issuer" in status["control"]["note"]
        assert {u["name"] for u in status["units"]} == {"pimesh-proxy.service"}
        proxy_uid = int(container.run(["id", "-u", "pimesh-proxy"]).stdout)
        node_key = os.path.join(container.root, "var/lib/pimesh/identity/node.key")
        assert os.stat(node_key).st_uid == proxy_uid
        assert mode(container, "/var/lib/pimesh/identity/node.key") == 0o600
        with open(os.path.join(site.keys, "anchor.pem")) as f, \
                open(os.path.join(container.root, "var/lib/pimesh/identity/anchor.pem")) as g:
            assert f.read() == g.read(), "the card's anchor, checked against the join token"

        identity = container.wait_for("the proxy's node identity", lambda: proxy_identity(container))
        assert identity["node"] == site.node and identity["source"] == "node-credential"
        pid = container.main_pid("pimesh-proxy.service")
        started = int(container.run(["stat", "-c", "%Y", f"/proc/{pid}"]).stdout)
        signed = os.stat(os.path.join(container.root, "var/lib/pimesh/identity/node.pem")).st_mtime
        assert started <= signed, "the proxy running since before the certificate took it up"
    finally:
        site.close()
