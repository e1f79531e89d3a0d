"""The real arm64 Pimesh image, booted in QEMU aarch64: what a user checks after flashing.

Case 1 boots with a valid seed written into the boot partition and a blank NVMe disk (K3s's
data goes on it); case 2 with a broken one.
Each powers the node off cleanly at the end. Whichever of the two boots second checks that
the two nodes made from one image have different host keys. Case 3 boots with a hardware
watchdog card and hangs its init.
"""

import json
import os
import re
import subprocess
import time

import pytest

from harness.paths import REPO
from harness.qemu import BOOT_OFFSET, DISK_GIB, Node


@pytest.fixture(scope="module")
def host_keys():
    """The SSH host key fingerprint each booted node presented, by case."""
    return {}


def assert_own_host_key(host_keys, case, presented):
    """Records `presented` for `case`, after checking that no other node had it."""
    for other, fingerprint in host_keys.items():
        assert presented != fingerprint, f"two nodes from one image share a host key ({other}, {case})"
    host_keys[case] = presented


@pytest.fixture
def node_factory(tmp_path):
    nodes = []

    def make(**kwargs):
        node = Node(str(tmp_path), **kwargs)
        nodes.append(node)
        return node.boot()

    yield make
    for node in nodes:
        node.kill()


MESH_UNITS = {"pimesh-proxy.service", "pimesh-control@1.service", "pimesh-control@2.service",
              "pimesh-control@3.service"}


def wait_for_units_ready(node, also=lambda units: True, timeout=120):
    """Polls /status until every managed unit is active and ready (and `also` holds)."""
    deadline = time.monotonic() + timeout
    units = {}
    while time.monotonic() < deadline:
        units = {u["name"]: u for u in node.status()["units"]}
        if units and all(u["active_state"] == "active" and u["ready"] for u in units.values()) and also(units):
            return units
        time.sleep(1)
    raise TimeoutError(f"managed units not all ready after {timeout}s: {json.dumps(units, indent=1)}")


def wait_for_proxy_identity(node, accept, timeout=120):
    """Polls the proxy's /config until its identity satisfies `accept`; returns it."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        config = node.proxy_config()
        last = config and config.get("identity")
        if last and accept(last):
            return last
        time.sleep(3)
    raise TimeoutError(f"proxy identity not as expected after {timeout}s: {last!r}; "
                       f"enrollment: {config and config.get('enrollment')!r}")


def wait_for_datastore(node, timeout=180):
    """Polls /status until K3s's data folder is settled and its disk's fsync was timed."""
    deadline = time.monotonic() + timeout
    datastore = None
    while time.monotonic() < deadline:
        datastore = node.status()["k3s"].get("datastore")
        if datastore and datastore["state"] in ("disk", "sd-card") and datastore["fsync_ms"]:
            return datastore
        time.sleep(2)
    raise TimeoutError(f"k3s.datastore not settled after {timeout}s: {datastore!r}")


def root_partition_sectors(disk):
    table = json.loads(subprocess.run(["sfdisk", "-J", disk], capture_output=True, text=True, check=True).stdout)
    return table["partitiontable"]["partitions"][1]


def test_image_ships_no_host_keys_and_a_blank_seed(base_image):
    root = root_partition_sectors(base_image)
    listing = subprocess.run(["debugfs", "-R", "ls /etc/ssh", f"{base_image}?offset={root['start'] * 512}"],
                             capture_output=True, text=True, check=True).stdout
    assert "sshd_config" in listing, listing
    assert "ssh_host_" not in listing, "host keys must be generated on first boot, never shipped"
    seed = subprocess.run(["mtype", "-i", f"{base_image}@@{BOOT_OFFSET}", "::/pimesh.toml"],
                          capture_output=True, text=True, check=True).stdout
    settings = [l for l in seed.splitlines() if l.strip() and not l.lstrip().startswith("#")]
    assert settings == [], f"the shipped seed is a commented template: {settings}"
    config = subprocess.run(["mtype", "-i", f"{base_image}@@{BOOT_OFFSET}", "::/config.txt"],
                            capture_output=True, text=True, check=True).stdout
    cmdline = subprocess.run(["mtype", "-i", f"{base_image}@@{BOOT_OFFSET}", "::/cmdline.txt"],
                             capture_output=True, text=True, check=True).stdout
    assert "arm_64bit=1" in config and "enable_uart=1" in config
    assert "root=PARTUUID=50696d65-02" in cmdline
    assert "cgroup_memory=1" in cmdline and "cgroup_enable=memory" in cmdline
    files = subprocess.run(["mdir", "-b", "-i", f"{base_image}@@{BOOT_OFFSET}", "::/"],
                           capture_output=True, text=True, check=True).stdout
    for dtb in ("bcm2711-rpi-4-b.dtb", "bcm2711-rpi-400.dtb", "bcm2711-rpi-cm4-io.dtb", "bcm2712-rpi-5-b.dtb"):
        assert dtb in files, f"{dtb} missing from the boot partition"
    assert "start4.elf" in files and "fixup4.dat" in files


def test_every_supported_board_has_wired_ethernet_and_a_watchdog_in_its_device_tree(base_image, tmp_path):
    """The boot partition's device trees, decompiled with dtc: an enabled Ethernet node of
    the driver each supported board needs (GENET on the Pi 4 family, the RP1's Cadence GEM
    on the Pi 5), the SD card and USB controller nodes, and the hardware watchdog that
    systemd feeds (the power-management block's)."""
    subprocess.run(["mcopy", "-n", "-i", f"{base_image}@@{BOOT_OFFSET}", "::/*.dtb", str(tmp_path)], check=True)
    result = subprocess.run([os.path.join(REPO, "image", "check-boards.py"), "--dtbs", str(tmp_path)],
                            capture_output=True, text=True)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    for board in ("Pi 4 Model B", "Pi 400", "Compute Module 4", "Pi 5 Model B (BCM2712 C1)",
                  "Pi 5 Model B (BCM2712 D0)"):
        assert re.search(rf"^ok .*{re.escape(board)}.*Ethernet /.*watchdog /", result.stdout, re.M), result.stdout


def test_first_boot_with_a_valid_seed(base_image, ssh_key, node_factory, host_keys, figures):
    seed_key, seed_pub = ssh_key("seed@e2e")
    seed = (
        'site = "e2e-site"\n'
        'role = "init"\n'
        'node = "pi-e2e"\n'
        'servers = ["10.0.0.10"]\n'
        # QEMU's NAT card relays a guest's multicast onto the host's network: no mDNS on it.
        'mdns_interfaces = []\n'
        f'ssh_authorized_keys = ["{seed_pub}"]\n'
    )
    # Only the seed grants SSH access here: logging in proves the seed's keys were applied.
    node = node_factory(base_image=base_image, seed_text=seed, ssh_key=seed_key, nvme_mib=256)
    image_root_bytes = root_partition_sectors(node.disk)["size"] * 512
    figures["ssh_after_s"] = node.wait_for_ssh()
    node.wait_for_unit_active("pimesh-supervisor.service")

    status = node.wait_for_status()
    assert status["seed"]["state"] == "valid", status["seed"]
    summary = status["seed"]["summary"]
    assert summary["site"] == "e2e-site"
    assert summary["role"] == "init"
    assert summary["servers"] == ["10.0.0.10"]
    assert summary["ssh_authorized_keys"] == 1
    assert status["node"]["name"] == "pi-e2e"
    assert status["k3s"]["present"] is False, "this build machine cannot fetch K3s"
    assert status["image"]["arch"] == "arm64"
    assert status["image"]["k3s"]["present"] is False
    assert {t["task"]: t["outcome"] for t in status["setup"]} == {
        "hostname": "changed", "ssh-authorized-keys": "changed"}

    # K3s's data folder goes on the blank NVMe disk: formatted and mounted by systemd's
    # transient units for the supervisor, and the disk's fsync timed.
    datastore = wait_for_datastore(node)
    assert datastore["state"] == "disk", datastore
    assert datastore["device"] == "/dev/nvme0n1", datastore
    assert datastore["mounted_at"] == "/var/lib/rancher", datastore
    assert (datastore["filesystem"], datastore["label"]) == ("ext4", "pimesh-data"), datastore
    assert datastore["fsync_ms"]["error"] is None and datastore["fsync_ms"]["last"] > 0, datastore
    assert "NVMe" in datastore["chosen_because"], datastore
    mount = node.ssh("findmnt -no SOURCE,FSTYPE,OPTIONS /var/lib/rancher")
    assert mount.startswith("/dev/nvme0n1 ext4") and "noatime" in mount, mount
    assert node.ssh("blkid -o value -s LABEL /dev/nvme0n1") == "pimesh-data"

    # First-boot tasks.
    assert node.ssh("hostname") == "pi-e2e"
    assert node.ssh("cat /etc/hostname") == "pi-e2e"
    root_bytes = int(node.ssh("findmnt -bno SIZE /"))
    assert root_bytes > image_root_bytes * 2, (root_bytes, image_root_bytes)
    assert root_bytes > (DISK_GIB - 1) * 1024**3, f"root filesystem not grown to the disk: {root_bytes}"
    keygen_log = node.ssh("journalctl -b -o cat -u pimesh-ssh-hostkeys.service")
    presented = node.host_key_fingerprint()
    assert presented in keygen_log, f"sshd presents {presented}, generated this boot: {keygen_log}"
    assert_own_host_key(host_keys, "valid-seed", presented)

    state = node.wait_until_settled()
    failed = node.ssh("systemctl --failed --no-legend --plain")
    assert failed == "", f"failed units:\n{failed}"
    assert state == "running", state
    assert node.unit_property("pimesh-supervisor.service", "NRestarts") == "0"

    # The supervisor starts the mesh units and heals them through systemd's D-Bus API.
    units = wait_for_units_ready(node)
    assert set(units) == MESH_UNITS, units.keys()
    killed = units["pimesh-proxy.service"]["main_pid"]
    node.ssh(f"kill -9 {killed}")
    healed = wait_for_units_ready(node, lambda u: u["pimesh-proxy.service"]["main_pid"] != killed)
    assert healed["pimesh-proxy.service"]["active_state"] == "active"

    # The proxy takes its leaf from this node's control replicas.
    identity = wait_for_proxy_identity(node, lambda i: i.get("source") == "control")
    assert identity["ids"] == ["spiffe://e2e-site/node/pi-e2e"], identity

    # Figures for the closing note (printed, never asserted).
    def rss_kib(unit):
        pid = node.unit_property(unit, "MainPID")
        return int(node.ssh(f"awk '/VmRSS/ {{print $2}}' /proc/{pid}/status"))

    figures["supervisor_rss_kib"] = rss_kib("pimesh-supervisor.service")
    figures["proxy_rss_kib"] = rss_kib("pimesh-proxy.service")
    figures["control_replica_rss_kib"] = [rss_kib(f"pimesh-control@{n}.service") for n in (1, 2, 3)]
    figures["ready_since_kernel_s"] = int(node.unit_property(
        "pimesh-supervisor.service", "ActiveEnterTimestampMonotonic")) / 1e6
    figures["multi_user_since_kernel_s"] = int(node.unit_property(
        "multi-user.target", "ActiveEnterTimestampMonotonic")) / 1e6

    assert node.poweroff() == 0
    with open(node.console, errors="replace") as f:
        assert "reboot: Power down" in f.read()


def test_broken_seed_is_reported_and_nothing_crashes(base_image, ssh_key, node_factory, host_keys):
    console_key, console_pub = ssh_key("console@e2e")
    broken = 'site = "e2e-site"\nrole = "captain"\n'
    # The broken seed grants nothing; the operator's way in is a systemd credential.
    node = node_factory(base_image=base_image, seed_text=broken, ssh_key=console_key,
                        credential_pubkey=console_pub)
    node.wait_for_ssh()
    node.wait_for_unit_active("pimesh-supervisor.service")

    status = node.wait_for_status()
    seed = status["seed"]
    assert seed["state"] == "invalid", seed
    assert seed["error"]["file"] == "/boot/firmware/pimesh.toml"
    assert seed["error"]["line"] == 2
    assert seed["error"]["key"] == "role"
    assert "`init` or `join`" in seed["reason"]

    journal = node.ssh("journalctl -b -o cat -u pimesh-supervisor.service")
    assert re.search(r"/boot/firmware/pimesh\.toml:2:\d+: key `role`", journal), journal

    # The node still named itself: pimesh- and the end of its machine ID.
    machine_id = node.ssh("cat /etc/machine-id")
    assert node.ssh("hostname") == f"pimesh-{machine_id[-6:]}"
    assert status["node"]["name"] == f"pimesh-{machine_id[-6:]}"

    state = node.wait_until_settled()
    assert node.ssh("systemctl --failed --no-legend --plain") == ""
    assert state == "running", state
    assert node.unit_property("pimesh-supervisor.service", "NRestarts") == "0"
    assert node.unit_property("pimesh-supervisor.service", "ActiveState") == "active"

    assert_own_host_key(host_keys, "broken-seed", node.host_key_fingerprint())
    assert node.poweroff() == 0


def test_a_node_whose_init_hangs_is_reset_by_its_hardware_watchdog(base_image, ssh_key, node_factory):
    """The image has systemd feed the board's hardware watchdog (`RuntimeWatchdogSec=15s`);
    QEMU's i6300esb card stands in for the Pi's bcm2835 one. While PID 1 runs, the node
    stays up well past the watchdog's timeout; once PID 1 is frozen (its crash handler
    freezes it on SIGSEGV, as on a real crash) nothing feeds the watchdog and it resets the
    board: here QEMU exits, every boot of these tests being -no-reboot."""
    key, public = ssh_key("watchdog@e2e")
    node = node_factory(base_image=base_image, seed_text=None, ssh_key=key,
                        credential_pubkey=public, watchdog=True)
    node.wait_for_ssh()
    assert node.ssh("systemctl show -p RuntimeWatchdogUSec --value") == "15s"

    # systemd opens the device once its driver has loaded (udev, during boot).
    device = "/sys/class/watchdog/watchdog0"
    deadline = time.monotonic() + 180
    while node.ssh(f"cat {device}/state 2>/dev/null || true") != "active":
        node.assert_running()
        assert time.monotonic() < deadline, node.ssh(f"ls -l {device}/ 2>&1; journalctl -b -o cat | grep -i watchdog", check=False)
        time.sleep(2)
    assert node.ssh(f"cat {device}/identity") == "i6300ESB timer"
    assert node.ssh(f"cat {device}/timeout") == "15"

    # Fed: still up three timeouts later (by the node's own clock).
    def uptime():
        return float(node.ssh("cut -d' ' -f1 /proc/uptime"))

    armed_at = uptime()
    while uptime() < armed_at + 45:
        node.assert_running()
        time.sleep(3)

    # Not fed: PID 1 frozen, the watchdog resets the node. An orderly reboot or power-off
    # (systemd's, or its emergency one) would print the kernel's `reboot:` line; a reset
    # by the watchdog card prints nothing.
    def console_bytes():
        with open(node.console, "rb") as f:
            return f.read()

    before = len(console_bytes())
    frozen_at = time.monotonic()
    node.ssh("kill -SEGV 1", check=False, timeout=30)
    try:
        code = node.process.wait(timeout=240)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the watchdog did not reset the node in 240 s:\n{node.console_tail()}")
    assert code == 0, code
    after = console_bytes()[before:].decode(errors="replace")
    assert "reboot:" not in after, f"the node shut down by itself, not by the watchdog:\n{after}"
    assert "Kernel panic" not in after, after
    print(f"FIGURES watchdog: reset {time.monotonic() - frozen_at:.0f} s after PID 1 froze")
