"""Boot figures of the arm64 image in QEMU aarch64 (TCG): `make bench-boot`.

Boots one disk three times: first boot, a later boot, and a later boot with Pimesh's units
masked (the limit: the same system without Pimesh). For each: seconds from kernel start
to the supervisor's READY and to multi-user.target (systemd's own monotonic timestamps),
wall seconds from starting QEMU to the status API answering, and the supervisor's RSS.
Prints a table; asserts nothing.
"""

import os
import sys
import tempfile
import time

from node import Node, decompress, image_path, make_ssh_key

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
    seed = f'site = "bench"\nrole = "init"\nnode = "pi-bench"\nssh_authorized_keys = ["{pub}"]\n'
    rows = []
    node = Node(work, base, seed, key)
    rows.append(("first boot", measure(node, True)))
    for label, append, with_pimesh in [
        ("later boot", "", True),
        ("later boot, Pimesh units masked", " ".join(f"systemd.mask={u}" for u in PIMESH_UNITS), False),
    ]:
        again = Node(work, base, None, key, append=append, fresh_disk=False)
        rows.append((label, measure(again, with_pimesh)))

    print(f"\nBoot figures, QEMU aarch64 TCG ({os.cpu_count()} host cores), image {os.path.basename(image_path())}")
    print(f"{'boot':34} {'READY (s)':>10} {'multi-user (s)':>15} {'status wall (s)':>16} {'RSS (KiB)':>10}")
    for label, row in rows:
        def cell(key, fmt):
            width = int(fmt.split(".")[0].rstrip("d"))
            return format(row[key], fmt) if key in row else "-".rjust(width)
        print(f"{label:34} {cell('ready_s', '10.1f')} {cell('multi_user_s', '15.1f')} "
              f"{cell('status_wall_s', '16.1f')} {cell('rss_kib', '10d')}")
    for label, row in rows:
        print(f"  {label}: {row['userspace_s']}")


if __name__ == "__main__":
    sys.exit(main())
