#!/usr/bin/env python3
"""Checks that the image gives every supported board its wired Ethernet, SD card, USB and
hardware watchdog.

    check-boards.py --dtbs DIR
        The device trees in DIR (the boot partition's files): each supported board's tree
        (decompiled with `dtc -I dtb -O dts`) has an enabled Ethernet node of the driver that
        board needs, its SD card and USB controller nodes, and its watchdog.

    check-boards.py --dtbs DIR --root ROOT --initrd FILE
        And the drivers behind those nodes, found through ROOT's module aliases (device-tree
        `compatible` strings, PCI IDs) and followed through everything a node depends on
        (its parent buses, and the clocks, resets, pin controllers, regulators, GPIOs, PHYs
        and interrupt controllers its properties point at):
          - what the root filesystem needs (SD card, USB) is built into the kernel or in the
            initramfs FILE;
          - what wired Ethernet and the watchdog need is built in, in the initramfs, or in
            ROOT's modules.
        Run it after trimming ROOT's modules and before re-indexing them: the aliases then
        still name every driver the kernel was built with, so a trimmed one shows as missing.

Prints one line per board and exits 1 with the reasons when a board falls short.
"""

import argparse
import fnmatch
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Board:
    name: str
    dtb: str
    ethernet: tuple  # accepted `compatible` strings of the wired Ethernet MAC
    sd: tuple  # `compatible` strings of the SD card (or eMMC) controller
    # Drivers the device tree cannot name: PCI devices matched by class, and the xHCI host
    # that a USB controller's glue driver creates.
    root_drivers: tuple = ()


GENET = ("brcm,bcm2711-genet-v5",)
RP1_GEM = ("raspberrypi,rp1-gem", "cdns,macb")
# The Pi 4 family's EMMC2 (the SD card, or a CM4's eMMC); the Pi 5's SDHCI (the SD card,
# and the Wi-Fi's SDIO, which takes the same drivers).
PI4_SD = ("brcm,bcm2711-emmc2",)
PI5_SD = ("brcm,bcm2712-sdhci",)
# Root-filesystem drivers the device trees cannot name. Pi 4 and 400: their USB ports' VIA
# VL805 on PCIe takes a class driver (its `usb` node carries only the firmware reset that
# loads the VL805's firmware). Pi 5: the RP1's DWC3 glue creates an xhci-hcd device, and
# NVMe disks sit on the external PCIe connector.
PI4_EXTRA = ("xhci_pci",)
PI5_EXTRA = ("xhci_plat_hcd", "nvme")

BOARDS = (
    Board("Raspberry Pi 4 Model B", "bcm2711-rpi-4-b.dtb", GENET, PI4_SD, PI4_EXTRA),
    Board("Raspberry Pi 400", "bcm2711-rpi-400.dtb", GENET, PI4_SD, PI4_EXTRA),
    Board("Compute Module 4 on its IO board", "bcm2711-rpi-cm4-io.dtb", GENET, PI4_SD),
    Board("Raspberry Pi 5 Model B (BCM2712 C1)", "bcm2712-rpi-5-b.dtb", RP1_GEM, PI5_SD, PI5_EXTRA),
    Board("Raspberry Pi 5 Model B (BCM2712 D0)", "bcm2712-d-rpi-5-b.dtb", RP1_GEM, PI5_SD, PI5_EXTRA),
)

# Every board's hardware watchdog is in the SoC's power-management block (BCM2711, BCM2712),
# whose driver creates the watchdog as a platform device the device tree cannot name.
WATCHDOG = ("brcm,bcm2835-pm-wdt",)
WATCHDOG_DRIVERS = ("bcm2835_wdt",)

# Every board: the root filesystem, and a USB disk (SCSI disk over USB mass storage or UAS).
ROOT_DRIVERS = ("ext4", "sd_mod", "usb_storage", "uas")
# The boards' Ethernet PHYs (Broadcom BCM54213PE, BCM54210PE) are matched by PHY ID, not by
# the device tree.
ETHERNET_DRIVERS = ("broadcom",)

# Properties that point at the nodes a device depends on: phandle lists, and specifier
# lists whose argument count is the provider's `#...-cells`.
PHANDLE_LISTS = re.compile(r"^(interrupt-parent|phy-handle|pinctrl-\d+|.+-supply)$")
SPECIFIER_LISTS = {
    "clocks": "#clock-cells", "resets": "#reset-cells", "power-domains": "#power-domain-cells",
    "phys": "#phy-cells", "dmas": "#dma-cells", "mboxes": "#mbox-cells", "iommus": "#iommu-cells",
    "interrupts-extended": "#interrupt-cells", "msi-parent": "#msi-cells",
}
GPIO_LISTS = re.compile(r"^([\w,.+]+-)?gpios?$")


# --- device trees ---------------------------------------------------------------------------

@dataclass
class Node:
    path: str
    props: dict = field(default_factory=dict)  # name -> raw value text ("" for flags)
    children: list = field(default_factory=list)
    parent: "Node" = None

    @property
    def name(self):
        return self.path.rsplit("/", 1)[-1].split("@", 1)[0] or "/"

    def strings(self, prop):
        """A string-list property (`"a\\0b"`) as a list of strings."""
        raw = self.props.get(prop)
        if raw is None:
            return []
        return [s for part in re.findall(r'"((?:[^"\\]|\\.)*)"', raw) for s in part.split("\\0")]

    def cells(self, prop):
        raw = self.props.get(prop, "")
        return [int(c, 0) for group in re.findall(r"<([^>]*)>", raw) for c in group.split()]

    def enabled(self):
        node = self
        while node:
            status = node.strings("status")
            if status and status[0] not in ("okay", "ok"):
                return False
            node = node.parent
        return True


def decompile(dtb):
    result = subprocess.run(["dtc", "-q", "-I", "dtb", "-O", "dts", dtb], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{dtb}: dtc failed: {result.stderr.strip()}")
    return result.stdout


def parse_dts(text):
    """Parses dtc's own dts output (one property or node bracket per line) into a tree;
    returns {path: Node}."""
    nodes = {}
    stack = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("/dts-v1/") or line.startswith("/memreserve/"):
            continue
        if line.endswith("{"):
            name = line[:-1].strip().split(":")[-1].strip()  # drop a label
            if not stack:
                path = "/"
            else:
                path = stack[-1].path.rstrip("/") + "/" + name
            node = Node(path, parent=stack[-1] if stack else None)
            if stack:
                stack[-1].children.append(node)
            nodes[path] = node
            stack.append(node)
        elif line == "};":
            stack.pop()
        elif line.endswith(";") and stack:
            name, _, value = line[:-1].partition("=")
            stack[-1].props[name.strip()] = value.strip()
        else:
            raise SystemExit(f"unexpected dts line {number}: {line!r}")
    return nodes


def dependencies(nodes, start):
    """`start` and every node it depends on: parent buses and phandle targets, transitively."""
    by_phandle = {}
    for node in nodes.values():
        for prop in ("phandle", "linux,phandle"):
            if prop in node.props:
                by_phandle[node.cells(prop)[0]] = node
    seen = {}
    todo = [start]
    while todo:
        node = todo.pop()
        if node is None or node.path in seen:
            continue
        seen[node.path] = node
        todo.append(node.parent)
        for prop in node.props:
            if PHANDLE_LISTS.match(prop):
                todo.extend(by_phandle.get(cell) for cell in node.cells(prop))
                continue
            count = SPECIFIER_LISTS.get(prop) or ("#gpio-cells" if GPIO_LISTS.match(prop) else None)
            if count is None:
                continue
            cells = node.cells(prop)
            i = 0
            while i < len(cells):
                provider = by_phandle.get(cells[i])
                todo.append(provider)
                args = provider.cells(count) if provider else []
                i += 1 + (args[0] if args else 0)
    return list(seen.values())


# --- kernel modules -----------------------------------------------------------------------

def norm(module):
    return module.replace("-", "_")


class Modules:
    """The kernel's drivers: aliases from modules.alias and modules.builtin.modinfo, module
    files from modules.dep, and what the root filesystem and the initramfs hold."""

    def __init__(self, root, initrd):
        base = os.path.join(root, "usr/lib/modules")
        versions = sorted(os.listdir(base))
        if len(versions) != 1:
            raise SystemExit(f"{base}: expected one kernel, found {versions}")
        self.version = versions[0]
        self.dir = os.path.join(base, self.version)
        self.aliases = []  # (pattern, module)
        with open(os.path.join(self.dir, "modules.alias")) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and parts[0] == "alias":
                    self.aliases.append((parts[1], norm(parts[2])))
        self.builtin = set()
        with open(os.path.join(self.dir, "modules.builtin.modinfo"), "rb") as f:
            for entry in f.read().split(b"\0"):
                module, _, rest = entry.decode(errors="replace").partition(".")
                if not module:
                    continue
                self.builtin.add(norm(module))
                if rest.startswith("alias="):
                    self.aliases.append((rest[len("alias="):], norm(module)))
        self.paths = {}  # module -> path relative to self.dir
        self.deps = {}
        with open(os.path.join(self.dir, "modules.dep")) as f:
            for line in f:
                path, _, deps = line.partition(":")
                module = norm(os.path.basename(path).split(".ko")[0])
                self.paths[module] = path
                self.deps[module] = [norm(os.path.basename(d).split(".ko")[0]) for d in deps.split()]
        self.in_initrd = {norm(os.path.basename(p).split(".ko")[0])
                          for p in initrd_files(initrd) if ".ko" in os.path.basename(p)}

    def drivers_for(self, node):
        """The modules whose aliases match the node's device (empty when none does)."""
        found = set()
        compatibles = node.strings("compatible")
        for compatible in compatibles:
            pci = re.fullmatch(r"pci([0-9a-f]{1,4}),([0-9a-f]{1,4})", compatible)
            if pci:
                vendor, device = (f"{int(x, 16):08X}" for x in pci.groups())
                for pattern, module in self.aliases:
                    # Only drivers that name the vendor: a class driver's alias matches any
                    # vendor, and the device tree does not give the class.
                    m = re.match(r"pci:v([0-9A-F]+)d([0-9A-F*]+)", pattern)
                    if m and m.group(1) == vendor and fnmatch.fnmatchcase(device, m.group(2)):
                        found.add(module)
        if compatibles:
            device_type = (node.strings("device_type") or ["<NULL>"])[0]
            modalias = f"of:N{node.name}T{device_type}" + "".join(f"C{c}" for c in compatibles)
            found.update(module for pattern, module in self.aliases
                         if pattern.startswith("of:") and fnmatch.fnmatchcase(modalias, pattern))
        return found

    def with_deps(self, module):
        out, todo = set(), [module]
        while todo:
            m = todo.pop()
            if m not in out:
                out.add(m)
                todo.extend(self.deps.get(m, []))
        return out

    def missing(self, modules, place):
        """The modules (with their dependencies) that are neither built in nor in `place`:
        "initrd", or "root" (the initramfs or the root filesystem's module files)."""
        gone = []
        for module in sorted(modules):
            for m in sorted(self.with_deps(module)):
                if m in self.builtin or m in self.in_initrd:
                    continue
                if place == "root" and m in self.paths and os.path.exists(os.path.join(self.dir, self.paths[m])):
                    continue
                if m not in self.paths:
                    gone.append(f"{m} (the kernel has no such module)")
                elif place == "initrd":
                    gone.append(f"{m} (not in the initramfs)")
                else:
                    gone.append(f"{m} (removed from the root filesystem)")
        return sorted(set(gone))


def initrd_files(path):
    """File names in an initramfs: concatenated cpio (newc) archives, each plain or
    compressed (zstd, xz, gzip)."""
    with open(path, "rb") as f:
        data = f.read()
    names = []
    while data:
        if data[:6] in (b"070701", b"070702"):
            data = cpio_names(data, names)
            data = data.lstrip(b"\0")
            continue
        tool = {b"\x28\xb5\x2f\xfd": "zstd", b"\xfd7zX": "xz", b"\x1f\x8b\x08\x00": "gzip"}.get(data[:4])
        if tool is None:
            raise SystemExit(f"{path}: unknown initramfs format at {data[:8]!r}")
        data = subprocess.run([tool, "-dc"], input=data, capture_output=True, check=True).stdout
    return names


def cpio_names(data, names):
    """Appends the names in the newc archive at the start of `data`; returns what follows it."""
    offset = 0
    while True:
        header = data[offset:offset + 110]
        namesize = int(header[94:102], 16)
        filesize = int(header[54:62], 16)
        name = data[offset + 110:offset + 110 + namesize - 1].decode(errors="replace")
        offset += (110 + namesize + 3) & ~3
        offset += (filesize + 3) & ~3
        if name == "TRAILER!!!":
            return data[offset:]
        names.append(name)


# --- the check ----------------------------------------------------------------------------

def check_board(board, dtbs, modules):
    """Returns (summary, problems) for one board."""
    path = os.path.join(dtbs, board.dtb)
    if not os.path.exists(path):
        return f"{board.dtb} missing", [f"{board.dtb}: not on the boot partition"]
    nodes = parse_dts(decompile(path))
    problems = []
    macs = [n for n in nodes.values() if set(n.strings("compatible")) & set(board.ethernet)]
    enabled = [n for n in macs if n.enabled()]
    if not enabled:
        why = (f"its Ethernet nodes are disabled: {', '.join(n.path for n in macs)}" if macs
               else f"no node compatible with {' or '.join(board.ethernet)}")
        problems.append(f"{board.dtb}: no wired Ethernet: {why}")
    sd = [n for n in nodes.values() if set(n.strings("compatible")) & set(board.sd) and n.enabled()]
    # USB host controllers: the Pi 4 and 400's VL805, the SoC's DWC2 (the CM4's host port),
    # the Pi 5's two DWC3 in the RP1.
    usb = [n for n in nodes.values() if n.name == "usb" and n.enabled()]
    if not sd:
        problems.append(f"{board.dtb}: no enabled SD card controller ({' or '.join(board.sd)})")
    if not usb:
        problems.append(f"{board.dtb}: no enabled USB controller (`usb` node)")
    watchdogs = [n for n in nodes.values() if set(n.strings("compatible")) & set(WATCHDOG) and n.enabled()]
    if not watchdogs:
        problems.append(f"{board.dtb}: no enabled hardware watchdog ({' or '.join(WATCHDOG)})")
    summary = ((f"Ethernet {enabled[0].path} ({enabled[0].strings('compatible')[0]})" if enabled
                else "no Ethernet") + f", {len(sd)} SD and {len(usb)} USB controllers, "
               + (f"watchdog {watchdogs[0].path}" if watchdogs else "no watchdog"))
    if modules is None:
        return summary, problems

    def needed(starts):
        drivers = set()
        for start in starts:
            for node in dependencies(nodes, start):
                if node.enabled():
                    drivers |= modules.drivers_for(node)
        return drivers

    root = needed(sd + usb) | set(board.root_drivers) | set(ROOT_DRIVERS)
    ethernet = needed(enabled) | set(ETHERNET_DRIVERS)
    watchdog = needed(watchdogs) | set(WATCHDOG_DRIVERS)
    for module in modules.missing(root, "initrd"):
        problems.append(f"{board.dtb}: the root filesystem (SD card, USB) needs {module}")
    for module in modules.missing(ethernet, "root"):
        problems.append(f"{board.dtb}: wired Ethernet needs {module}")
    for module in modules.missing(watchdog, "root"):
        problems.append(f"{board.dtb}: the hardware watchdog needs {module}")
    summary += (f"; root drivers: {', '.join(sorted(m for m in root if m not in modules.builtin))} "
                f"(+{len(root & modules.builtin)} built in); Ethernet drivers: "
                f"{', '.join(sorted(m for m in ethernet if m not in modules.builtin))}; watchdog "
                f"drivers: {', '.join(sorted(m for m in watchdog if m not in modules.builtin))}")
    return summary, problems


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtbs", required=True, help="folder holding the boards' .dtb files")
    parser.add_argument("--root", help="root filesystem whose kernel modules to check")
    parser.add_argument("--initrd", help="the initramfs the boards boot with")
    args = parser.parse_args()
    if bool(args.root) != bool(args.initrd):
        parser.error("--root and --initrd go together")
    modules = Modules(args.root, args.initrd) if args.root else None
    problems = []
    for board in BOARDS:
        summary, found = check_board(board, args.dtbs, modules)
        print(f"{'ok  ' if not found else 'FAIL'} {board.name} ({board.dtb}): {summary}")
        problems += found
    if problems:
        print("\n".join(["", "boards not supported by this image:"] + [f"  {p}" for p in problems]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
