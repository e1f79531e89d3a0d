"""A Pimesh node as a systemd-nspawn container: the amd64 root filesystem built by
`make image-amd64`, booted with its own systemd and D-Bus, so that the supervisor is tested
against the real thing.

Each container boots from a throw-away copy of the root filesystem (the built one stays
pristine), with a private network (its own 127.0.0.1, so ports never clash with the host
or another container). Commands run inside through nsenter into the namespaces of the
container's PID 1; HTTP to the container's loopback runs the host's python3 inside the
container's network namespace only.
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid

from harness import scratch
from harness.paths import root_path
from harness.wait import wait_for

BOOT_TIMEOUT = float(os.environ.get("PIMESH_NSPAWN_BOOT_TIMEOUT", "60"))


def _children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _comm(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


HTTP_GET = """
import sys, urllib.request, urllib.error
try:
    with urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])) as r:
        sys.stdout.write(str(r.status) + "\\n" + r.read().decode())
except urllib.error.HTTPError as e:
    sys.stdout.write(str(e.code) + "\\n" + e.read().decode())
except Exception as e:
    sys.stdout.write("0\\n" + repr(e))
"""


class Container:
    def __init__(self, workdir=None, root=None, network="--private-network", label=None):
        """`network`: systemd-nspawn's network option(s); by default a private network
        with only a loopback interface. `label` names the container in kept logs (its
        machine name by default)."""
        self.network = network
        self.workdir = workdir or tempfile.mkdtemp(prefix="pimesh-nspawn-", dir="/var/tmp")
        self.root = os.path.join(self.workdir, "root")
        self.log = os.path.join(self.workdir, "console.log")
        self.name = "pimesh-" + uuid.uuid4().hex[:8]
        self.label = label or self.name
        self.process = None
        self.leader = None
        subprocess.run(["cp", "-a", "--reflink=auto", root or root_path(), self.root], check=True)

    # --- before boot -------------------------------------------------------------------
    def write(self, path, text):
        """Writes a file into the container's root filesystem (before or after boot)."""
        dest = os.path.join(self.root, path.lstrip("/"))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with open(dest, "w") as f:
            f.write(text)

    # --- life --------------------------------------------------------------------------
    def boot(self):
        """Boots the container (again, after `power_off`, from the same disk)."""
        self.leader = None
        command = (f"systemd-nspawn -D {self.root} --register=no --keep-unit -b "
                   f"{self.network} --machine={self.name}")
        self.process = subprocess.Popen(["script", "-qfc", command, self.log],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + BOOT_TIMEOUT
        while self.leader is None:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"container did not start; see {self.log}")
            self.leader = self._find_leader()
            time.sleep(0.05)
        while True:
            state = self.run(["systemctl", "is-system-running"], check=False).stdout.strip()
            if state in ("running", "degraded"):
                return state
            if time.monotonic() > deadline:
                raise RuntimeError(f"container not booted after {BOOT_TIMEOUT}s ({state}); see {self.log}")
            time.sleep(0.2)

    def _find_leader(self):
        """PID (on the host) of the container's systemd: the child of systemd-nspawn."""
        todo = [self.process.pid]
        while todo:
            pid = todo.pop()
            kids = _children(pid)
            if _comm(pid) == "systemd-nspawn":
                for kid in kids:
                    if _comm(kid) == "systemd":
                        return kid
                return None
            todo.extend(kids)
        return None

    def shutdown(self, timeout=30):
        """Powers the container off, kills it if it will not go, and deletes its copy
        (after a failed test, its journal is kept first: `scratch.keep_journal`)."""
        scratch.keep_journal(self, self.label)
        try:
            self.power_off(timeout)
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def power_off(self, timeout=30):
        """Powers the container off (killed if it will not go); its disk stays for `boot`."""
        if self.process and self.process.poll() is None:
            if self.leader:
                # systemd's "power off" signal: needs no D-Bus and cannot block us.
                try:
                    os.kill(self.leader, signal.SIGRTMIN + 4)
                except ProcessLookupError:
                    pass
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                for pid, group in ((self.leader, False), (self.process.pid, True)):
                    try:
                        (os.killpg if group else os.kill)(pid, signal.SIGKILL)
                    except (ProcessLookupError, TypeError):
                        pass
                self.process.wait(timeout=10)

    # --- inside ------------------------------------------------------------------------
    def run(self, argv, check=True, timeout=30):
        """Runs argv inside the container (all its namespaces)."""
        return subprocess.run(["nsenter", "-t", str(self.leader), "-a", *argv],
                              capture_output=True, text=True, check=check, timeout=timeout)

    def systemctl(self, *args, check=True):
        return self.run(["systemctl", *args], check=check)

    def show(self, unit, *props):
        """systemd's view of `unit` as a dict of the given properties."""
        out = self.systemctl("show", unit, "-p", ",".join(props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def main_pid(self, unit):
        return int(self.show(unit, "MainPID")["MainPID"])

    def kill(self, pid, sig="KILL"):
        self.run(["kill", f"-{sig}", str(pid)])

    def http_get(self, url, timeout=2.0):
        """(status code, body) of GET url from inside the container's network; code 0 when
        nothing answered."""
        out = subprocess.run(["nsenter", "-t", str(self.leader), "-n", "python3", "-c", HTTP_GET,
                              url, str(timeout)], capture_output=True, text=True,
                             timeout=timeout + 10).stdout
        code, _, body = out.partition("\n")
        return int(code or 0), body

    def status(self):
        code, body = self.http_get("http://127.0.0.1:4200/status")
        if code != 200:
            raise RuntimeError(f"GET /status: {code} {body}")
        return json.loads(body)

    def unit_status(self, name):
        for unit in self.status()["units"]:
            if unit["name"] == name:
                return unit
        raise KeyError(name)

    def proxy_config(self):
        """The proxy's admin /config as JSON, None when it does not answer 200."""
        code, body = self.http_get("http://127.0.0.1:4191/config")
        return json.loads(body) if code == 200 else None

    def journal(self, unit):
        return self.run(["journalctl", "-u", unit, "--no-pager", "-o", "cat"], check=False).stdout

    def wait_for(self, what, predicate, timeout=30, interval=0.1):
        """Polls predicate() until it returns a true value (returned) or times out."""
        return wait_for(what, predicate, timeout=timeout, interval=interval)


@contextlib.contextmanager
def booted(seed, files=None):
    """A container with `seed` as its boot partition's pimesh.toml and `files` (path →
    text) written before boot, booted; powered off and deleted afterwards."""
    container = Container()
    try:
        container.write("/boot/firmware/pimesh.toml", seed)
        for path, text in (files or {}).items():
            container.write(path, text)
        container.boot()
        yield container
    finally:
        container.shutdown()
