"""Honest watchdogs under real systemd: a daemon feeds systemd's watchdog only while its
key task makes progress, not from a timer.

The central server runs as its shipped unit (`pimesh-central.service`, the host's
binary (`make host-bins`) copied into the container, the watchdog shortened by a drop-in). Its
accept loop runs on the thread that drives the runtime's main future, its watchdog task
on the runtime's worker threads. The test stops that one thread (ptrace: the other
threads run on, so a timer-fed watchdog would go on feeding systemd) and sees systemd
kill the server for its watchdog and start it again.
"""

import os
import shutil
import subprocess
import time

import pytest

from harness.container import booted
from harness.freeze import Frozen, host_pid
from harness.ota_site import CENTRAL, Site

UNIT = "pimesh-central.service"
WATCHDOG_SEC = 8  # more than twice the server's 2 s self-probe of its accept loop
SEED = 'site = "lab"\nrole = "init"\nnode = "pi-a"\n'
FETCH = """
import ssl, sys, urllib.request, urllib.error
context = ssl.create_default_context(cafile=sys.argv[2])
try:
    with urllib.request.urlopen(sys.argv[1], timeout=5, context=context) as r:
        print(r.status)
except urllib.error.HTTPError as e:
    print(e.code)
except Exception as e:
    print(0, repr(e))
"""


@pytest.fixture(scope="module")
def central():
    site = Site()
    with open(site.server_cert) as f:
        cert = f.read()
    with open(site.server_key) as f:
        key = f.read()
    with open(os.path.join(site.keys, "anchor.pem")) as f:
        anchor = f.read()
    files = {
        "/etc/pimesh-central/central.toml": (
            'listen = "127.0.0.1:8443"\nstate_dir = "/var/lib/pimesh-central"\n'
            'tls_cert = "/etc/pimesh-central/tls.pem"\ntls_key = "/etc/pimesh-central/tls.key"\n'
            f'[[sites]]\nname = "lab"\nanchor = "/etc/pimesh-central/lab-anchor.pem"\n'
            f'public_key = "{site.public_key}"\n'),
        "/etc/pimesh-central/tls.pem": cert,
        "/etc/pimesh-central/tls.key": key,
        "/etc/pimesh-central/lab-anchor.pem": anchor,
        # The unit (and its restart) waits for network-online.target, which a container
        # with only a loopback reaches after wait-online's 2 min timeout, not at once.
        "/etc/systemd/system/systemd-networkd-wait-online.service.d/loopback.conf":
            "[Service]\nExecStart=\nExecStart=/bin/true\n",
        # No core dump of the killed server: the test needs only the restart.
        f"/etc/systemd/system/{UNIT}.d/watchdog.conf":
            f"[Service]\nWatchdogSec={WATCHDOG_SEC}s\nLimitCORE=0\n",
    }
    with booted(SEED, files) as container:
        binary = os.path.join(container.root, "usr/bin/pimesh-central")
        shutil.copy2(CENTRAL, binary)
        container.systemctl("start", "--no-block", UNIT)
        container.site = site
        yield container


def wait_quietly(predicate, timeout):
    """Whether `predicate` came true within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def version_status(container):
    """The status of GET /v1/version from inside the container, over TLS checked against
    the server's certificate; 0 when nothing answered."""
    out = subprocess.run(["nsenter", "-t", str(container.leader), "-n", "python3", "-c", FETCH,
                          "https://127.0.0.1:8443/v1/version", container.site.server_cert],
                         capture_output=True, text=True, timeout=30).stdout
    return int(out.split()[0]) if out.split() else 0


def test_a_stalled_accept_loop_gets_the_central_server_restarted_by_its_watchdog(central):
    if not wait_quietly(lambda: version_status(central) == 200, timeout=180):
        pytest.fail("the central server does not serve:\n"
                    + central.systemctl("status", UNIT, check=False).stdout
                    + central.journal(UNIT)[-3000:])
    old = central.main_pid(UNIT)
    # Longer than the watchdog: a turning accept loop keeps feeding it.
    time.sleep(WATCHDOG_SEC * 1.5)
    assert central.show(UNIT, "NRestarts")["NRestarts"] == "0"
    assert central.main_pid(UNIT) == old

    pid = host_pid(central.leader, old)
    frozen = Frozen(pid)
    try:
        central.wait_for("systemd's watchdog to restart the central server",
                         lambda: central.main_pid(UNIT) not in (0, old), timeout=90)
        journal = central.journal(UNIT)
        assert "a key task stalled" in journal, journal[-2000:]
        assert "Watchdog timeout" in journal, journal[-2000:]
        assert central.wait_for("the restarted server serving",
                                lambda: version_status(central) == 200, timeout=60)
        assert central.show(UNIT, "NRestarts")["NRestarts"] == "1"
        central.wait_for("the stopped thread's process to be gone", frozen.ended, timeout=30)
    finally:
        frozen.release()
