"""`make bench-boot`: boot figures of the arm64 image in QEMU aarch64 (TCG).

Boots one disk three times: first boot, a later boot, and a later boot with Pimesh's units
masked (the limit: the same system without Pimesh). For each: seconds from kernel start
to the supervisor's READY and to multi-user.target (systemd's own monotonic timestamps),
wall seconds from starting QEMU to the status API answering, and the supervisor's RSS.
Prints the figures; asserts nothing.
"""

import os
import sys
import tempfile
import time

from harness.paths import image_path
from harness.qemu import Node, decompress, make_ssh_key
from table import Table

PIMESH_UNITS = ["pimesh-supervisor.service", "pimesh-growroot.service", "pimesh-status-lan.socket"]


def measure(node, with_pimesh):
    node.boot()
    node.wait_for_ssh()
    row = {}
    if with_pimesh:
        node.wait_for_unit_active("pimesh-supervisor.service")
        node.wait_for_status(timeout=120)
        row["status_wall_s"] = time.monotonic() - node.started
        row["ready_s"] = int(node.unit_property("pimesh-supervisor.service", "ActiveEnterTimestampMonotonic")) / 1e6
        pid = node.unit_property("pimesh-supervisor.service", "MainPID")
        row["rss_kib"] = int(node.ssh(f"awk '/VmRSS/ {{print $2}}' /proc/{pid}/status"))
    node.wait_until_settled()
    row["multi_user_s"] = int(node.unit_property("multi-user.target", "ActiveEnterTimestampMonotonic")) / 1e6
    row["userspace_s"] = node.ssh("systemd-analyze time | head -1")
    node.poweroff()
    return row


def main():
    work = tempfile.mkdtemp(prefix="pimesh-bench-boot-")
    base = decompress(image_path(), os.path.join(work, "pimesh.img"))
    key = os.path.join(work, "key")
    pub = make_ssh_key(key, "bench@host")
    # No mDNS on QEMU's NAT card, which relays a guest's multicast onto the host's network.
    seed = (f'site = "bench"\nrole = "init"\nnode = "pi-bench"\nssh_authorized_keys = ["{pub}"]\n'
            'mdns_interfaces = []\n')
    rows = []
    node = Node(work, base, seed, key)
    rows.append(("first boot", measure(node, True)))
    for label, append, with_pimesh in [
        ("later boot", "", True),
        ("later boot, Pimesh units masked", " ".join(f"systemd.mask={u}" for u in PIMESH_UNITS), False),
    ]:
        again = Node(work, base, None, key, append=append, fresh_disk=False)
        rows.append((label, measure(again, with_pimesh)))

    table = Table("boot")
    table.setup(f"QEMU aarch64 TCG ({os.cpu_count()} host cores), image {os.path.basename(image_path())}")
    table.setup("from kernel start: systemd's monotonic timestamps; wall: from starting QEMU")
    for label, row in rows:
        if "ready_s" in row:
            table.row(f"{label}: supervisor READY since kernel start", row["ready_s"], "s", ".1f")
        table.row(f"{label}: multi-user.target since kernel start", row["multi_user_s"], "s", ".1f")
        if "status_wall_s" in row:
            table.row(f"{label}: status API answering, wall", row["status_wall_s"], "s", ".1f")
        if "rss_kib" in row:
            table.row(f"{label}: supervisor RSS", row["rss_kib"], "KiB")
    for label, row in rows:
        table.note(f"{label}: {row['userspace_s']}")
    table.print()


if __name__ == "__main__":
    sys.exit(main())
