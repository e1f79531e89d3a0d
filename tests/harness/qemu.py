"""A Pimesh node: the real arm64 image booted in QEMU (-M virt, TCG) by image/qemu.sh.

Each node gets its own sparse copy of the image (grown to DISK_GIB, so first boot has
room to grow into), its own seed written into the FAT boot partition with mtools (no
mount), free host ports forwarded to SSH and to the status API, and a serial console log.

With PIMESH_QEMU_VOLATILE_CACHE=1 (the power-cut soak) the disk is served to QEMU by
nbdkit with its cache filter in writeback mode: a disk with a volatile write cache, which
keeps what the guest wrote and did not flush in that cache only, so a power cut (`kill`:
QEMU, then nbdkit) loses it as an SD card's controller may. Without it, a kill of QEMU
loses only the guest's page cache: every write the guest sent reaches the file.
"""

import base64
import json
import os
import shutil
import subprocess
import time
import urllib.request

from harness import http_helpers
from harness.paths import REPO
from harness.ports import free_port

BOOT_OFFSET = 4 * 1024 * 1024
DISK_GIB = 4
BOOT_TIMEOUT = float(os.environ.get("PIMESH_BOOT_TIMEOUT", "420"))
VOLATILE_CACHE = os.environ.get("PIMESH_QEMU_VOLATILE_CACHE") == "1"


def decompress(image, dest):
    with open(dest, "wb") as out:
        subprocess.run(["xz", "-dc", "-T2", image], stdout=out, check=True)
    return dest


def make_ssh_key(path, comment):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path], check=True)
    with open(path + ".pub") as f:
        return f.read().strip()


class Node:
    def __init__(self, workdir, base_image, seed_text, ssh_key, credential_pubkey=None, append="",
                 fresh_disk=True, lan=None, nvme_mib=None, watchdog=False):
        """A node in `workdir`. With fresh_disk=False the disk already there (booted
        before) is booted again as it is. `lan`: a second network card on a site LAN of
        VMs, as `image/qemu.sh` takes it ({"LAN_LISTEN" or "LAN_CONNECT": "127.0.0.1:PORT",
        "LAN_MAC": ...}). `nvme_mib`: a blank (sparse, all zeros) NVMe disk of that size,
        `nvme.img` in `workdir`, kept when the disk is not fresh. `watchdog`: a hardware
        watchdog card (QEMU's i6300esb) whose firing ends QEMU (every boot is -no-reboot)."""
        self.lan = lan or {}
        self.nvme = os.path.join(workdir, "nvme.img") if nvme_mib else None
        if self.nvme and (fresh_disk or not os.path.exists(self.nvme)):
            with open(self.nvme, "wb") as f:
                f.truncate(nvme_mib * 1024**2)
        self.workdir = workdir
        self.disk = os.path.join(workdir, "disk.img")
        self.console = os.path.join(workdir, "console.log")
        self.ssh_key = ssh_key
        self.ssh_port = free_port()
        self.status_port = free_port()
        self.process = None
        self.disk_server = None
        if fresh_disk or not os.path.exists(self.disk):
            shutil.copyfile(base_image, self.disk)
            os.truncate(self.disk, DISK_GIB * 1024**3)
        if seed_text is not None:
            seed = os.path.join(workdir, "pimesh.toml")
            with open(seed, "w") as f:
                f.write(seed_text)
            self.write_boot_file(seed, "pimesh.toml")
        self.append = append
        self.watchdog = watchdog
        if credential_pubkey:
            # systemd's own provisioning (tmpfiles.d/provision.conf) installs this as root's
            # authorized key: a way in that does not depend on the seed.
            encoded = base64.b64encode((credential_pubkey + "\n").encode()).decode()
            self.append += f" systemd.set_credential_binary=ssh.authorized_keys.root:{encoded}"

    def write_boot_file(self, source, name):
        subprocess.run(["mcopy", "-o", "-i", f"{self.disk}@@{BOOT_OFFSET}", source, f"::/{name}"], check=True)

    def read_boot_file(self, name):
        return subprocess.run(
            ["mtype", "-i", f"{self.disk}@@{BOOT_OFFSET}", f"::/{name}"], check=True, capture_output=True, text=True
        ).stdout

    def boot(self):
        env = dict(os.environ, SSH_PORT=str(self.ssh_port), STATUS_PORT=str(self.status_port),
                   CONSOLE=self.console, APPEND=self.append, **self.lan)
        if self.nvme:
            env["NVME_DISK"] = self.nvme
        if self.watchdog:
            env["WATCHDOG"] = "1"
        if VOLATILE_CACHE:
            env["DISK_NBD"] = self._serve_disk()
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [os.path.join(REPO, "image", "qemu.sh"), self.disk],
            env=env, stdin=subprocess.DEVNULL,
            stdout=open(os.path.join(self.workdir, "qemu.out"), "w"), stderr=subprocess.STDOUT,
        )
        return self

    def _serve_disk(self):
        """Starts nbdkit serving the disk with a volatile write cache; returns its socket."""
        socket_path = os.path.join(self.workdir, "disk.sock")
        if os.path.exists(socket_path):
            os.unlink(socket_path)
        self.disk_server = subprocess.Popen(
            ["nbdkit", "--foreground", "--unix", socket_path, "--filter=cache", "file", self.disk,
             "cache=writeback"],
            stdin=subprocess.DEVNULL, stdout=open(os.path.join(self.workdir, "nbdkit.log"), "w"),
            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not os.path.exists(socket_path):
            if self.disk_server.poll() is not None:
                raise RuntimeError(f"nbdkit exited with {self.disk_server.returncode}: see {self.workdir}/nbdkit.log")
            assert time.monotonic() < deadline, "nbdkit made no socket in 30 s"
            time.sleep(0.05)
        return socket_path

    # --- reaching the node ------------------------------------------------------------
    def ssh(self, command, check=True, timeout=60):
        args = ["ssh", "-i", self.ssh_key, "-p", str(self.ssh_port),
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10", "-o", "BatchMode=yes",
                "root@127.0.0.1", command]
        result = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"ssh {command!r} failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout.strip()

    def wait_for_ssh(self):
        """Waits until root can log in over SSH; returns the seconds since QEMU started."""
        deadline = self.started + BOOT_TIMEOUT
        while time.monotonic() < deadline:
            self.assert_running()
            if self._ssh_ok():
                return time.monotonic() - self.started
            time.sleep(3)
        raise TimeoutError(f"no SSH within {BOOT_TIMEOUT}s; console tail:\n{self.console_tail()}")

    def _ssh_ok(self):
        try:
            return self.ssh("echo ok", check=False, timeout=30) == "ok"
        except subprocess.TimeoutExpired:
            return False

    def wait_for_unit_active(self, unit, timeout=120):
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.ssh(f"systemctl is-active {unit}", check=False)
            if state == "active":
                return
            time.sleep(2)
        raise TimeoutError(f"{unit} is {state!r}, not active, after {timeout}s")

    def wait_until_settled(self, timeout=180):
        """Waits until systemd has finished booting; returns is-system-running's answer."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.ssh("systemctl is-system-running", check=False)
            if state not in ("starting", "initializing", ""):
                return state
            time.sleep(2)
        return state

    def status(self):
        url = f"http://127.0.0.1:{self.status_port}/status"
        with urllib.request.urlopen(url, timeout=20) as response:
            assert response.status == 200
            return json.loads(response.read())

    def wait_for_status(self, timeout=60):
        deadline = time.monotonic() + timeout
        error = None
        while time.monotonic() < deadline:
            try:
                return self.status()
            except OSError as e:
                error = e
                time.sleep(2)
        raise TimeoutError(f"status API not reachable on the forwarded port: {error}")

    def unit_property(self, unit, prop):
        return self.ssh(f"systemctl show -p {prop} --value {unit}")

    def proxy_config(self, check=False):
        """The proxy's admin /config, read on the node over SSH with bash's /dev/tcp (the
        image has no HTTP client); None when it does not answer JSON."""
        return http_helpers.json_body(self.ssh(http_helpers.PROXY_CONFIG_OVER_BASH, check=check))

    def host_key_fingerprint(self):
        scan = subprocess.run(["ssh-keyscan", "-t", "ed25519", "-p", str(self.ssh_port), "127.0.0.1"],
                              capture_output=True, text=True, timeout=30).stdout
        line = next(l for l in scan.splitlines() if "ssh-ed25519" in l)
        return subprocess.run(["ssh-keygen", "-l", "-f", "-"], input=line, capture_output=True,
                              text=True, check=True).stdout.split()[1]

    # --- stopping -----------------------------------------------------------------------
    def poweroff(self, timeout=180):
        """Powers the node off from inside and returns QEMU's exit code."""
        self.ssh("systemctl poweroff --no-block", check=False)
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"the node did not power off within {timeout}s:\n{self.console_tail()}")
        if self.disk_server:
            # The guest flushed its disk as it shut down: nothing is left in the cache.
            self.disk_server.terminate()
            self.disk_server.wait()
        return code

    def kill(self):
        """The power cut: QEMU killed, then the disk's server with what its cache held."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.disk_server and self.disk_server.poll() is None:
            self.disk_server.kill()
            self.disk_server.wait()

    def assert_running(self):
        if self.process.poll() is not None:
            raise RuntimeError(f"QEMU exited with {self.process.returncode}:\n{self.console_tail()}")

    def console_tail(self, lines=40):
        try:
            with open(self.console, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no console log)"
