#!/usr/bin/env python3
"""`make bench-proxy-instructions`: instructions each proxy pair executes per request, under
callgrind — a figure that other load on the machine does not move, so runs compare.

Rows (client -> A -> TLS 1.3 mTLS -> B -> nginx on 127.0.0.1, as bench/proxy.py):
  haproxy       HAProxy A and B in TCP mode, HTTP/1.1 keepalive client
  pimesh-h1     pimesh-proxy A and B, HTTP/1.1 keepalive client
  pimesh-h2     the same with an HTTP/2 client (h2load, one connection, 10 streams at once)
  pimesh-tcp    the service declared opaque TCP: HTTP/1.1 keepalive through one tunnel

Method: both proxies run under `valgrind --tool=callgrind --instr-atstart=no`; after the
pair is ready, instrumentation is switched on, WARMUP requests are sent, the counters are
zeroed, REQUESTS requests are sent, and the counters are dumped. Instructions per request =
Ir of A + Ir of B over the measured requests (every thread of each process). Callgrind also
leaves a profile per proxy (BENCH_KEEP_TMP=1 keeps them: callgrind_annotate FILE).

Environment: BENCH_REQUESTS (default 2000), BENCH_WARMUP (default 200), BENCH_ROWS,
PIMESH_BIN_DIR (as bench/proxy.py), BENCH_KEEP_TMP=1.
"""

import glob
import http.client
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import proxy as bench
from table import Table

REQUESTS = int(os.environ.get("BENCH_REQUESTS", "2000"))
WARMUP = int(os.environ.get("BENCH_WARMUP", "200"))
ROWS = ("haproxy", "pimesh-h1", "pimesh-h2", "pimesh-tcp")
# Under callgrind a proxy runs tens of times slower: its start and first handshake too.
bench.wait_ready.__defaults__ = (300,)
bench.wait_port.__defaults__ = (300,)


class CallgrindProcs(bench.Procs):
    """Starts the proxies (names `haproxy-*`, `pimesh-*`) under callgrind."""

    def start(self, name, argv, **kw):
        if name.startswith(("haproxy-", "pimesh-")):
            out = os.path.join(self.tmp, f"{name}.callgrind")
            argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                    f"--callgrind-out-file={out}", "--dump-instr=no", *argv]
        return super().start(name, argv, **kw)


def callgrind_control(pid, *flags):
    r = subprocess.run(["callgrind_control", *flags, str(pid)], capture_output=True, text=True,
                       timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"callgrind_control {' '.join(flags)} {pid}: "
                           f"{(r.stderr or r.stdout).strip()}")


def dumped_ir(tmp, name):
    """Ir of the newest dump of `name` (callgrind writes FILE.<n> per dump)."""
    files = sorted(glob.glob(os.path.join(tmp, f"{name}.callgrind.*")),
                   key=lambda f: int(f.rsplit(".", 1)[1]) if f.rsplit(".", 1)[1].isdigit() else -1)
    if not files:
        raise RuntimeError(f"no callgrind dump of {name} in {tmp}")
    total = 0
    with open(files[-1]) as f:
        for line in f:
            m = re.match(r"(?:summary|totals):\s+(\d+)", line)
            if m:
                total = int(m.group(1))
    return total, files[-1]


def keepalive_requests(url, n):
    """`n` GETs on one HTTP/1.1 keepalive connection; every answer must be `ok`."""
    host, port = url.split("//", 1)[1].rstrip("/").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    for _ in range(n):
        conn.request("GET", "/")
        response = conn.getresponse()
        body = response.read()
        if response.status != 200 or body != b"ok\n":
            raise RuntimeError(f"GET {url}: {response.status} {body[:80]!r}")
    conn.close()


def h2_requests(url, n):
    h2load = shutil.which("h2load")
    if not h2load:
        raise bench.Unavailable("h2load not found (nghttp2-client): bench/install-load-tools.sh")
    r = subprocess.run([h2load, "-n", str(n), "-c", "1", "-m", "10", url],
                       capture_output=True, text=True, timeout=1800)
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", r.stdout)
    if r.returncode != 0 or not done or int(done.group(2)) != n:
        raise RuntimeError(f"h2load exited {r.returncode}: {r.stdout[:600]} {r.stderr[-200:]}")


def measure(procs, tmp, name, pair, url, send):
    send(url, WARMUP)
    for p in pair:
        callgrind_control(p.pid, "-z")
    started = time.monotonic()
    send(url, REQUESTS)
    seconds = time.monotonic() - started
    for p in pair:
        callgrind_control(p.pid, "--dump")
        callgrind_control(p.pid, "--instr=off")
    irs = []
    for p in pair:
        # The dump is written asynchronously: wait for it.
        deadline = time.monotonic() + 120
        while True:
            try:
                ir, _ = dumped_ir(procs.tmp, p.bench_name)
                if ir:
                    break
            except RuntimeError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"no dump from {p.bench_name}")
            time.sleep(0.5)
        irs.append(ir)
    bench.log(f"{name}: {REQUESTS} requests in {seconds:.1f}s under callgrind")
    return [ir / REQUESTS for ir in irs]


def main():
    wanted = [r.strip() for r in os.environ.get("BENCH_ROWS", ",".join(ROWS)).split(",") if r.strip()]
    for tool in ("valgrind", "callgrind_control"):
        if not shutil.which(tool):
            sys.exit(f"bench-proxy-instructions: {tool} not found (Debian package valgrind)")
    tmp = tempfile.mkdtemp(prefix="bench-proxy-ir.")
    procs = CallgrindProcs(tmp)
    rows = {}
    try:
        backend_port = bench.free_port()
        bench.start_nginx(procs, tmp, backend_port)
        for name in wanted:
            mark = len(procs.procs)
            try:
                if name == "haproxy":
                    pair, url = bench.start_haproxy_pair(procs, tmp, backend_port)
                    send = keepalive_requests
                elif name == "pimesh-h1":
                    pair, url = bench.start_pimesh_pair(procs, tmp, backend_port)
                    send = keepalive_requests
                elif name == "pimesh-h2":
                    # The proxy delivers in the client's HTTP version: an h2c backend.
                    h2_port = bench.free_port()
                    bench.start_nginx(procs, tmp, h2_port, http2=True)
                    pair, url = bench.start_pimesh_pair(procs, tmp, h2_port, check=False)
                    send = h2_requests
                elif name == "pimesh-tcp":
                    pair, url = bench.start_pimesh_pair(procs, tmp, backend_port, protocol="tcp")
                    send = keepalive_requests
                else:
                    raise bench.Unavailable(f"unknown row {name!r}")
                for p in pair:
                    callgrind_control(p.pid, "--instr=on")
                rows[name] = measure(procs, tmp, name, pair, url, send)
            except bench.Unavailable as err:
                rows[name] = f"n/a ({err})"
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as err:
                rows[name] = f"n/a (measurement failed: {err})"
            finally:
                for p in list(procs.procs[mark:]):
                    procs.stop(p, timeout=60)
        table = Table("proxy-instructions")
        table.setup(f"callgrind Ir per request over {REQUESTS} requests after {WARMUP} warm-up "
                    "ones; A = client side, B = server side; every thread of each proxy")
        for name in wanted:
            r = rows.get(name)
            if isinstance(r, list):
                table.row(f"instructions per request: {name} A", r[0] / 1000, "k", ".1f")
                table.row(f"instructions per request: {name} B", r[1] / 1000, "k", ".1f")
                table.row(f"instructions per request: {name} A+B", sum(r) / 1000, "k", ".1f")
            else:
                table.note(f"{name}: {r}")
        table.print()
    finally:
        procs.stop_all()
        if os.environ.get("BENCH_KEEP_TMP") == "1":
            bench.log(f"kept {tmp} (callgrind profiles: *.callgrind.*)")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if not any(isinstance(r, list) for r in rows.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
