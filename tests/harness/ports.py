"""Free TCP ports on the host's loopback, below the kernel's ephemeral range.

A port learnt free and bound a moment later (by QEMU's port forwarding, the central
server, a proxy) can be taken in between by the kernel for a client socket when it lies in
the ephemeral range (32768 and up on Debian); below it, only another listener can take it.
Within one process no port is handed out twice.
"""

import itertools
import random
import socket

LOWEST = 15000


def _ephemeral_start():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return max(LOWEST + 1000, min(32768, int(f.read().split()[0])))
    except (OSError, ValueError, IndexError):
        return 32768


_HIGH = _ephemeral_start()
_CURSOR = itertools.count(random.randrange(LOWEST, _HIGH))


def free_port():
    """A port of 127.0.0.1 that nothing was bound to a moment ago."""
    span = _HIGH - LOWEST
    for _ in range(span):
        port = LOWEST + (next(_CURSOR) - LOWEST) % span
        with socket.socket() as s:
            try:
                # Every address: a listener on 127.0.0.1 or 0.0.0.0 shows either way.
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port between {LOWEST} and {_HIGH - 1}")
