#!/usr/bin/env python3
"""`make bench-proxy`: the path a mesh adds, measured: client -> proxy A (plaintext) -> mTLS -> proxy B -> backend.

Four rows, all on 127.0.0.1:
  direct      client -> nginx
  haproxy     client -> HAProxy A (TCP, plain) -> TLS 1.3 mTLS -> HAProxy B (TCP) -> nginx
  pimesh      client -> pimesh-proxy A (outbound) -> mTLS -> pimesh-proxy B (inbound) -> nginx
  pimesh-tcp  the same, the service declared opaque TCP (one tunnel per client connection)

Instruction counts per request (noise-free, comparable across runs) and an HTTP/2 client
row are measured by bench/proxy_instructions.py (`make bench-proxy-instructions`).

Columns: wrk keepalive req/s and the proxies' CPU per request (utime+stime of both proxy
processes from /proc/PID/stat over the run, divided by the requests completed), wrk with
`Connection: close` (a new connection, so a new TLS handshake between the proxies, per
request), oha at a fixed 5000 req/s with latency correction (p50/p99 and the p99 added over
direct), and the proxies' VmRSS idle and with 1000 open idle client connections on proxy A.

On 2 cores the load generator, nginx and both proxies share the machine: requests/s are
bounded by that sharing, CPU per request and latency at a fixed rate are what compare. A
note says how much CPU other processes (builds, tests) took during each row's runs: with
much of it, latency figures above all are not comparable.

Environment (all optional):
  OHA                 oha binary (default: found on PATH or under /var/cache/pimesh/tools)
  PIMESH_BIN_DIR      where pimesh-proxy and pimeshctl (package pimesh-ctl) are (default: target/release)
  PIMESH_BUILD_ERROR  set by the Makefile when the build failed: the pimesh row says why
  BENCH_DURATION      seconds per wrk/oha run (default 10)
  BENCH_ROWS          comma list of rows to run (default direct,haproxy,pimesh,pimesh-tcp;
                      pimesh-tcp: the same path with the service as opaque TCP, a tunnel)
  BENCH_P99_ROUNDS    paired fixed-rate rounds (default 5; 0: none): after the rows, direct,
                      HAProxy and Pimesh all stand ready and each round runs oha against
                      each of them in turn (the order rotating): the added p99 is taken
                      within a round, so drift between rounds (other load, the host's
                      clock speed) cancels; the median and the range are reported
  BENCH_KEEP_TMP=1    keep the temp dir (configs, certs, logs) for inspection
Stops by itself; kills everything it started, also on error or SIGINT/SIGTERM.
"""

import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from harness.http_helpers import get as http_get
from harness.paths import host_binary
from harness.ports import free_port
from table import Table

DURATION = int(os.environ.get("BENCH_DURATION", "10"))
P99_ROUNDS = int(os.environ.get("BENCH_P99_ROUNDS", "5"))
WRK_THREADS = 2
WRK_CONNS = 50
CLOSE_CONNS = 20
RATE = 5000
OHA_CONNS = 50
IDLE_CONNS = 1000
CLK_TCK = os.sysconf("SC_CLK_TCK")

PIMESH_MAX_CONNECTIONS = 4000
# Seconds the idle connections are held before their RSS is read.
IDLE_SETTLE_S = 3

GOALS = {
    "cpu_us": 25.0,         # keepalive, both hops, per request
    "added_p99_ms": 0.5,    # at 5000 req/s, over direct
    "close_x_haproxy": 5.0, # conn-close req/s at least this many times HAProxy's
    "rss_idle_mib": 10.0,   # per proxy
    "rss_1000_mib": 20.0,   # proxy A with 1000 open client connections
}


# Every row, in the table's order.
ROWS = ("direct", "haproxy", "pimesh", "pimesh-tcp")


def log(msg):
    print(f"bench-proxy: {msg}", file=sys.stderr, flush=True)


class Unavailable(Exception):
    """A row cannot be measured; the message goes into the table."""


# --------------------------------------------------------------------------- processes

class Procs:
    """Every process the bench starts, each in its own process group; all killed at exit."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.procs = []

    def start(self, name, argv, **kw):
        logf = open(os.path.join(self.tmp, f"{name}.log"), "wb")
        p = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True, **kw)
        p.bench_name = name
        p.bench_log = logf.name
        self.procs.append(p)
        return p

    def stop(self, p, timeout=5):
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
        else:
            # The leader exited; take down anything it left in its group.
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if p in self.procs:
            self.procs.remove(p)

    def stop_all(self):
        for p in reversed(list(self.procs)):
            self.stop(p)


def log_tail(p, lines=3):
    """The first lines of what a process printed (where a failed start says why)."""
    try:
        with open(p.bench_log, errors="replace") as f:
            text = [l.strip() for l in f.read().splitlines() if l.strip()]
    except OSError:
        return ""
    alerts = [l for l in text if re.search(r"ALERT|error|unknown|cannot|invalid", l, re.I)]
    return " | ".join((alerts or text)[:lines]) or "(no output)"


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # After "pid (comm)": state is field 3, utime 14, stime 15 (1-based over the whole line).
    return int(fields[11]) + int(fields[12])


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def wait_port(host, port, proc, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise Unavailable(f"{proc.bench_name} exited with {proc.returncode}: {log_tail(proc)}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise Unavailable(f"{proc.bench_name} did not listen on {host}:{port} within {timeout}s")


def check_body(url):
    status, body = http_get(url)
    if status != 200 or body != b"ok\n":
        raise Unavailable(f"GET {url} answered {status} {body[:80]!r}")


# --------------------------------------------------------------------------- the backend

def start_nginx(procs, tmp, port, http2=False):
    """nginx answering `ok` on 127.0.0.1:`port`: HTTP/1.1, or with `http2` HTTP/2 (h2c, prior
    knowledge) as well."""
    d = os.path.join(tmp, "nginx-h2" if http2 else "nginx")
    os.makedirs(d)
    conf = os.path.join(d, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""
daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    server {{
        listen 127.0.0.1:{port} backlog=4096{" http2" if http2 else ""};
        location / {{
            default_type text/plain;
            return 200 "ok\\n";
        }}
    }}
}}
""")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    p = procs.start("nginx-h2" if http2 else "nginx", [nginx, "-p", d, "-c", conf, "-e", f"{d}/error.log"])
    wait_port("127.0.0.1", port, p)
    return p


# --------------------------------------------------------------------------- haproxy

def openssl(*args, cwd):
    r = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)}: {r.stderr.strip()}")
    return r


def make_haproxy_certs(d):
    """A P-256 CA, a server cert for B and a client cert for A (cert+key in one PEM each)."""
    os.makedirs(d)
    ec = ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]
    openssl("genpkey", *ec, "-out", "ca.key", cwd=d)
    openssl("req", "-x509", "-new", "-key", "ca.key", "-subj", "/CN=bench CA", "-days", "2",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-out", "ca.pem", cwd=d)
    for name, eku, san in (("server", "serverAuth", "DNS:b.bench,IP:127.0.0.1"),
                           ("client", "clientAuth", "DNS:a.bench")):
        openssl("genpkey", *ec, "-out", f"{name}.key", cwd=d)
        openssl("req", "-new", "-key", f"{name}.key", "-subj", f"/CN={name}",
                "-out", f"{name}.csr", cwd=d)
        ext = os.path.join(d, f"{name}.ext")
        with open(ext, "w") as f:
            f.write(f"basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                    f"extendedKeyUsage={eku}\nsubjectAltName={san}\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-extfile", ext, "-out", f"{name}.crt", cwd=d)
        with open(os.path.join(d, f"{name}.pem"), "w") as out:
            for part in (f"{name}.crt", f"{name}.key"):
                with open(os.path.join(d, part)) as f:
                    out.write(f.read())


def start_haproxy_pair(procs, tmp, backend_port):
    d = os.path.join(tmp, "haproxy")
    make_haproxy_certs(d)
    port_a, port_b = free_port(), free_port()
    common = """global
    nbthread 1
    maxconn 4000
    ssl-default-bind-options ssl-min-ver TLSv1.3
    ssl-default-server-options ssl-min-ver TLSv1.3
defaults
    mode tcp
    timeout connect 5s
    timeout client 120s
    timeout server 120s
"""
    conf_a = os.path.join(d, "a.cfg")
    with open(conf_a, "w") as f:
        f.write(common + f"""frontend outbound
    bind 127.0.0.1:{port_a}
    default_backend to_b
backend to_b
    server b 127.0.0.1:{port_b} ssl crt {d}/client.pem ca-file {d}/ca.pem verify required ssl-min-ver TLSv1.3
""")
    conf_b = os.path.join(d, "b.cfg")
    with open(conf_b, "w") as f:
        f.write(common + f"""frontend inbound
    bind 127.0.0.1:{port_b} ssl crt {d}/server.pem ca-file {d}/ca.pem verify required ssl-min-ver TLSv1.3
    default_backend app
backend app
    server app 127.0.0.1:{backend_port}
""")
    hap = shutil.which("haproxy") or "/usr/sbin/haproxy"
    for conf in (conf_a, conf_b):
        r = subprocess.run([hap, "-c", "-q", "-f", conf], capture_output=True, text=True)
        if r.returncode != 0:
            raise Unavailable(f"haproxy -c {conf}: {(r.stdout + r.stderr).strip()}")
    b = procs.start("haproxy-b", [hap, "-db", "-f", conf_b])
    wait_port("127.0.0.1", port_b, b)
    a = procs.start("haproxy-a", [hap, "-db", "-f", conf_a])
    wait_port("127.0.0.1", port_a, a)
    url = f"http://127.0.0.1:{port_a}/"
    check_body(url)
    return [a, b], url


# --------------------------------------------------------------------------- pimesh

def run_checked(argv, what, **kw):
    r = subprocess.run(argv, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        msg = (r.stderr or r.stdout).strip().splitlines()
        raise Unavailable(f"{what} failed ({r.returncode}): {' '.join(msg[-3:])}")
    return r


def make_pimesh_identities(tmp, ctl, site):
    """Site trust root from pimesh-ctl, per node a P-256 key + CSR from openssl, signed by
    `pimesh-ctl node sign`; each proxy gets DIR/{node.pem,node.key,anchor.pem}."""
    site_dir = os.path.join(tmp, "pimesh", "site")
    run_checked([ctl, "site", "init", site, "--out", site_dir], "pimesh-ctl site init")
    dirs = {}
    for node in ("a", "b"):
        d = os.path.join(tmp, "pimesh", f"id{node.upper()}")
        os.makedirs(d)
        key, csr = os.path.join(d, "node.key"), os.path.join(d, "node.csr")
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                "-out", key, cwd=d)
        os.chmod(key, 0o600)
        san = f"subjectAltName=URI:spiffe://{site}/node/{node}"
        sign = [ctl, "node", "sign", csr, "--site-dir", site_dir, "--node", node,
                "--out", os.path.join(d, "node.pem")]
        errors = []
        for subj in ("/", f"/CN={node}"):
            try:
                openssl("req", "-new", "-key", key, "-subj", subj, "-addext", san,
                        "-out", csr, cwd=d)
                run_checked(sign, f"pimesh-ctl node sign (subject {subj!r})")
                break
            except (RuntimeError, Unavailable) as err:
                errors.append(str(err))
        else:
            raise Unavailable("; ".join(errors))
        shutil.copy(os.path.join(site_dir, "anchor.pem"), os.path.join(d, "anchor.pem"))
        dirs[node] = d
    return dirs


def wait_ready(admin, procs_list, timeout=15):
    url = f"http://{admin}/ready"
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        for p in procs_list:
            if p.poll() is not None:
                raise Unavailable(f"{p.bench_name} exited with {p.returncode}: {log_tail(p)}")
        try:
            status, body = http_get(url, timeout=1)
            if status == 200:
                return
            last = f"{status} {body.decode(errors='replace').strip()[:200]}"
        except OSError as err:
            last = str(err)
        time.sleep(0.1)
    raise Unavailable(f"GET {url} not 200 within {timeout}s (last: {last})")


def start_pimesh_pair(procs, tmp, backend_port, protocol="http", check=True):
    """Proxies A and B with one service `backend` (nginx) of `protocol`, reached through
    A's local port; returns ([A, B], the URL through the pair). `check`: GET it once over
    HTTP/1.1 (not for a backend that speaks only HTTP/2)."""
    tmp = tempfile.mkdtemp(prefix=f"pair-{protocol}-", dir=tmp)
    build_error = os.environ.get("PIMESH_BUILD_ERROR")
    if build_error:
        raise Unavailable(f"pimesh-proxy did not become ready: {build_error}")
    bin_dir = os.environ.get("PIMESH_BIN_DIR") or os.path.dirname(host_binary("pimesh-proxy"))
    proxy = os.path.join(bin_dir, "pimesh-proxy")
    # The pimesh-ctl package's binary is `pimeshctl`.
    ctl = next((os.path.join(bin_dir, n) for n in ("pimeshctl", "pimesh-ctl")
                if os.access(os.path.join(bin_dir, n), os.X_OK)), os.path.join(bin_dir, "pimeshctl"))
    for b in (proxy, ctl):
        if not os.access(b, os.X_OK):
            raise Unavailable(f"pimesh-proxy did not become ready: {b} not built")
    try:
        ids = make_pimesh_identities(tmp, ctl, "bench")
    except Unavailable as err:
        raise Unavailable(f"pimesh-proxy did not become ready: identity: {err}")
    # The pimesh wiring's addresses (the cluster.toml names the inbound ones).
    a_inbound, b_inbound = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    a_outbound, b_outbound = f"127.0.0.1:{free_port()}", f"127.0.0.2:{free_port()}"
    a_admin, b_admin = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    local_port = free_port()
    conf = os.path.join(tmp, "pimesh", "cluster.toml")
    with open(conf, "w") as f:
        f.write(f"""site = "bench"

[nodes.a]
address = "{a_inbound}"

[nodes.b]
address = "{b_inbound}"

[services.backend]
port = {backend_port}
nodes = ["b"]
local_port = {local_port}
protocol = "{protocol}"

# As HAProxy's maxconn here. The default (10000) needs 20064 open files, above this
# machine's hard limit (20000), which a sandbox without CAP_SYS_RESOURCE cannot raise.
[proxy]
max_connections = {PIMESH_MAX_CONNECTIONS}
""")
    def argv(node, inbound, outbound, admin, local_ip):
        return [proxy, "--config", conf, "--identity-dir", ids[node],
                "--inbound-addr", inbound, "--outbound-addr", outbound,
                "--admin-addr", admin, "--local-ip", local_ip]
    b = procs.start("pimesh-b", argv("b", b_inbound, b_outbound, b_admin, "127.0.0.2"),
                    env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")})
    a = procs.start("pimesh-a", argv("a", a_inbound, a_outbound, a_admin, "127.0.0.1"),
                    env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")})
    try:
        wait_ready(b_admin, [b])
        wait_ready(a_admin, [a, b])
        url = f"http://127.0.0.1:{local_port}/"
        wait_port("127.0.0.1", local_port, a)
        if check:
            check_body(url)
    except Unavailable as err:
        raise Unavailable(f"pimesh-proxy did not become ready: {err}")
    return [a, b], url


# --------------------------------------------------------------------------- load

def cpu_of(pids):
    return sum(cpu_ticks(p) for p in pids)


# CPU that other processes on the machine took during the load runs (noise), per row:
# machine busy time (/proc/stat) less the bench's own processes (nginx, the proxies, the
# load tools as reaped children).
OWN_PIDS = []
NOISE = {}
CURRENT_ROW = [None]


def machine_ticks():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]  # idle + iowait
    return sum(v[:8]) - idle, sum(v[:8])


def children_ticks():
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (ru.ru_utime + ru.ru_stime) * CLK_TCK


def run_tool(argv, timeout):
    def own():
        total = children_ticks()
        for pid in OWN_PIDS:
            try:
                total += cpu_ticks(pid)
            except OSError:
                pass
        return total
    busy0, all0 = machine_ticks()
    own0 = own()
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    busy1, all1 = machine_ticks()
    other = max((busy1 - busy0) - (own() - own0), 0)
    acc = NOISE.setdefault(CURRENT_ROW[0], [0.0, 0.0])
    acc[0] += other
    acc[1] += all1 - all0
    if r.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {r.returncode}: {(r.stderr or r.stdout).strip()[-400:]}")
    return r.stdout


def wrk(url, conns, close, pids):
    argv = ["wrk", "-t", str(WRK_THREADS), "-c", str(conns), "-d", f"{DURATION}s",
            "--timeout", "5s"]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(url)
    before = cpu_of(pids)
    out = run_tool(argv, DURATION + 30)
    after = cpu_of(pids)
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    if not m:
        raise RuntimeError(f"cannot read wrk output: {out}")
    requests = int(m.group(1))
    secs = float(m.group(2)) * {"s": 1, "ms": 1e-3, "m": 60}.get(m.group(3), 1)
    errors = 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        # A server closing after `Connection: close` shows as read errors in wrk: ignore those.
        errors += int(m.group(1)) + int(m.group(3)) + int(m.group(4))
        if not close:
            errors += int(m.group(2))
    ok = max(requests - errors, 0)
    cpu_us = ((after - before) / CLK_TCK * 1e6 / ok) if (pids and ok) else None
    return {"rps": ok / secs if secs else 0.0, "requests": requests, "errors": errors,
            "cpu_us": cpu_us}


def oha_bin():
    if os.environ.get("OHA"):
        return os.environ["OHA"]
    found = shutil.which("oha")
    if found:
        return found
    base = "/var/cache/pimesh/tools"
    if os.path.isdir(base):
        for d in sorted(os.listdir(base), reverse=True):
            cand = os.path.join(base, d, "bin", "oha")
            if d.startswith("oha-") and os.access(cand, os.X_OK):
                return cand
    raise RuntimeError("oha not found: run bench/install-load-tools.sh")


def oha_fixed_rate(url, pids):
    argv = [oha_bin(), "-z", f"{DURATION}s", "-q", str(RATE), "-c", str(OHA_CONNS),
            "--latency-correction", "--no-tui", "--output-format", "json", url]
    before = cpu_of(pids)
    out = run_tool(argv, DURATION + 60)
    after = cpu_of(pids)
    data = json.loads(out)
    summary = data["summary"]
    pct = data["latencyPercentiles"]
    ok = sum(v for k, v in data.get("statusCodeDistribution", {}).items() if k == "200")
    # Requests still in flight when -z ends are cut off: not failures.
    errs = {k: v for k, v in data.get("errorDistribution", {}).items()
            if "aborted due to deadline" not in k}
    errors = sum(errs.values())
    return {
        "p50_ms": pct["p50"] * 1e3,
        "p99_ms": pct["p99"] * 1e3,
        "rps": summary.get("requestsPerSec"),
        "ok": ok,
        "errors": errors,
        "error_kinds": errs,
        "success": summary.get("successRate"),
        "cpu_us": ((after - before) / CLK_TCK * 1e6 / ok) if (pids and ok) else None,
    }


def hold_idle_connections(url, n):
    """n plain TCP connections to the URL's host:port, each with one keepalive request
    answered; returns the open sockets (the caller closes them)."""
    m = re.match(r"http://([\d.]+):(\d+)/", url)
    host, port = m.group(1), int(m.group(2))
    req = f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: keep-alive\r\n\r\n".encode()
    socks = []
    try:
        for _ in range(n):
            s = socket.create_connection((host, port), timeout=10)
            s.sendall(req)
            socks.append(s)
        for s in socks:
            buf = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    raise RuntimeError("connection closed before the response")
                buf += chunk
                head, sep, body = buf.partition(b"\r\n\r\n")
                if sep:
                    m = re.search(rb"content-length:\s*(\d+)", head, re.I)
                    if not head.startswith(b"HTTP/1.1 200"):
                        raise RuntimeError(f"answered {head.splitlines()[0]!r}")
                    if m and len(body) >= int(m.group(1)):
                        break
        return socks
    except BaseException:
        for s in socks:
            s.close()
        raise


# --------------------------------------------------------------------------- a row

def measure_row(name, url, pids):
    row = {"name": name}
    if pids:
        row["rss_idle"] = [rss_kib(p) for p in pids]
        # The connections' own cost, on a proxy that has not yet carried the load runs
        # (whose peaks the allocator keeps): measured again after them below.
        row["rss_1000_fresh"] = rss_with_idle_connections(name, url, pids)
        time.sleep(1)
    log(f"{name}: wrk keepalive {DURATION}s, {WRK_CONNS} connections")
    row["keepalive"] = wrk(url, WRK_CONNS, False, pids)
    time.sleep(1)
    log(f"{name}: wrk Connection: close {DURATION}s, {CLOSE_CONNS} connections")
    row["close"] = wrk(url, CLOSE_CONNS, True, pids)
    time.sleep(1)
    log(f"{name}: oha {RATE} req/s {DURATION}s")
    row["fixed"] = oha_fixed_rate(url, pids)
    if pids:
        time.sleep(1)
        row["rss_1000"] = rss_with_idle_connections(name, url, pids)
    return row


def rss_with_idle_connections(name, url, pids):
    """The processes' RSS (KiB) while IDLE_CONNS idle client connections are open."""
    log(f"{name}: {IDLE_CONNS} idle client connections")
    socks = hold_idle_connections(url, IDLE_CONNS)
    try:
        # Steady state of 1000 idle connections, not the burst of their 1000
        # simultaneous first requests: the same wait for every row.
        time.sleep(IDLE_SETTLE_S)
        return [rss_kib(p) for p in pids]
    finally:
        for s in socks:
            s.close()


# --------------------------------------------------------------------------- the table

def paired_p99_rounds(procs, tmp, nginx, backend_port, direct_url, wanted):
    """BENCH_P99_ROUNDS rounds of oha at the fixed rate against direct and each proxy pair
    in `wanted` (HAProxy, Pimesh), all started once and left idle between runs; returns
    {name: [p99 added over direct, one per round]}. Each round's order is rotated, so no
    target always runs first or after the same one."""
    tmp = os.path.join(tmp, "rounds")  # the pairs' own configs, keys and logs
    os.makedirs(tmp)
    targets = [("direct", direct_url, [])]
    if "haproxy" in wanted:
        pair, url = start_haproxy_pair(procs, tmp, backend_port)
        targets.append(("haproxy", url, pair))
    if "pimesh" in wanted:
        pair, url = start_pimesh_pair(procs, tmp, backend_port)
        targets.append(("pimesh", url, pair))
    added = {name: [] for name, _, _ in targets[1:]}
    for round_no in range(P99_ROUNDS):
        shift = round_no % len(targets)
        order = targets[shift:] + targets[:shift]
        p99 = {}
        for name, url, pair in order:
            CURRENT_ROW[0] = f"rounds:{name}"
            OWN_PIDS[:] = [nginx.pid] + [p.pid for p in pair]
            log(f"p99 round {round_no + 1}/{P99_ROUNDS}: {name}")
            p99[name] = oha_fixed_rate(url, [p.pid for p in pair])["p99_ms"]
            time.sleep(1)
        for name in added:
            added[name].append(p99[name] - p99["direct"])
        log("p99 round " + f"{round_no + 1}: direct {p99['direct']:.2f} ms, "
            + ", ".join(f"{name} {v[-1]:+.2f} ms" for name, v in added.items()))
    return added


def noise_note(key, label):
    """The note on how much of the machine other processes took while `key`'s runs ran."""
    busy = NOISE.get(key)
    if not (busy and busy[1]):
        return []
    share = 100.0 * busy[0] / busy[1]
    return [f"{label}: other processes on the machine took {share:.0f}% of its CPU during the runs"
            + (" (noisy: figures less reliable)" if share > 10 else "")]


def median(values):
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def fmt(v, spec, na="-"):
    return na if v is None else format(v, spec)


def mib(kib):
    return kib / 1024.0


def print_table(rows, notes, rounds):
    direct = rows.get("direct")
    direct_p99 = direct["fixed"]["p99_ms"] if isinstance(direct, dict) else None
    measured = [(name, rows[name]) for name in ROWS if isinstance(rows.get(name), dict)]
    table = Table("proxy")
    table.setup(f"client -> A (plain) -> TLS 1.3 mTLS -> B -> nginx, 127.0.0.1, "
                f"{os.cpu_count()} cores shared by load, backend and proxies; {DURATION}s per run")
    table.setup(f"keepalive: wrk -t{WRK_THREADS} -c{WRK_CONNS}; conn-close: wrk -t{WRK_THREADS} "
                f"-c{CLOSE_CONNS} -H 'Connection: close'; fixed rate: oha -q {RATE} -c{OHA_CONNS} "
                f"--latency-correction. CPU = utime+stime of both proxy processes / requests.")
    table.setup("conn-close: HAProxy in TCP mode makes a TLS handshake A->B per client connection; "
                "a proxy that keeps its A->B mTLS connections open does not.")
    figures = [
        ("keepalive requests/s", "req/s", ".0f", lambda r: r["keepalive"]["rps"]),
        ("keepalive proxy CPU per request, both hops", "µs", ".1f", lambda r: r["keepalive"]["cpu_us"]),
        ("conn-close requests/s", "req/s", ".0f", lambda r: r["close"]["rps"]),
        ("conn-close proxy CPU per request, both hops", "µs", ".1f", lambda r: r["close"]["cpu_us"]),
        (f"{RATE} req/s latency p50", "ms", ".2f", lambda r: r["fixed"]["p50_ms"]),
        (f"{RATE} req/s latency p99", "ms", ".2f", lambda r: r["fixed"]["p99_ms"]),
        (f"{RATE} req/s p99 added over direct", "ms", "+.2f",
         lambda r: None if (direct_p99 is None or r is direct) else r["fixed"]["p99_ms"] - direct_p99),
    ]
    for label, unit, spec, get in figures:
        for name, r in measured:
            value = get(r)
            if value is not None:
                table.row(f"{label}: {name}", value, unit, spec)
    memory = [("rss_idle", "RSS idle"),
              ("rss_1000_fresh", f"RSS with {IDLE_CONNS} open connections, before any load"),
              ("rss_1000", f"RSS with {IDLE_CONNS} open connections, after the load runs")]
    for key, label in memory:
        for name, r in measured:
            values = r.get(key)
            if not values:
                continue
            for proxy, kib in zip("AB", values):
                table.row(f"{label}: {name} {proxy}", mib(kib), "MiB", ".1f")
            table.row(f"{label}: {name} A+B", mib(sum(values)), "MiB", ".1f")
    for name, values in rounds.items():
        if values:
            table.row(f"{RATE} req/s p99 added over direct, median of {len(values)} paired rounds: {name}",
                      median(values), "ms", "+.2f")
    for name in ROWS:
        if isinstance(rows.get(name), str):
            table.note(f"{name}: {rows[name]}")
    for line in goal_lines(rows, direct_p99):
        table.note(line)
    if rounds.get("pimesh"):
        pm = rounds["pimesh"]
        hp = rounds.get("haproxy") or []
        verdict = "PASS" if median(pm) <= GOALS["added_p99_ms"] else "FAIL"
        table.note(f"goal: added p99 at {RATE} req/s over direct <= {GOALS['added_p99_ms']} ms, "
                   f"median of {len(pm)} paired rounds: pimesh {median(pm):+.2f} ms [{verdict}] "
                   f"(rounds {', '.join(f'{v:+.2f}' for v in pm)}; {sum(v <= GOALS['added_p99_ms'] for v in pm)} "
                   f"of {len(pm)} within the goal)"
                   + (f", haproxy {median(hp):+.2f} ms (rounds {', '.join(f'{v:+.2f}' for v in hp)})" if hp else ""))
    for n in notes:
        table.note(f"note: {n}")
    table.print()


def goal_lines(rows, direct_p99):
    """One line per goal: the goal, pimesh's figure and verdict, HAProxy's for reference."""
    pm, hp = rows.get("pimesh"), rows.get("haproxy")
    pm = pm if isinstance(pm, dict) else None
    hp = hp if isinstance(hp, dict) else None

    def added(r):
        return None if (r is None or direct_p99 is None) else r["fixed"]["p99_ms"] - direct_p99

    def verdict(v, goal, le=True):
        if v is None:
            return "n/a"
        return "PASS" if (v <= goal if le else v >= goal) else "FAIL"

    hp_close = hp["close"]["rps"] if hp else None
    items = [
        ("keepalive proxy CPU/request, both hops", f"<= {GOALS['cpu_us']:.0f} µs",
         lambda r: r["keepalive"]["cpu_us"], GOALS["cpu_us"], True, "{:.1f} µs"),
        (f"added p99 at {RATE} req/s over direct", f"<= {GOALS['added_p99_ms']} ms",
         added, GOALS["added_p99_ms"], True, "{:+.2f} ms"),
        ("conn-close req/s", f">= {GOALS['close_x_haproxy']:.0f}x HAProxy"
         + (f" (= {GOALS['close_x_haproxy'] * hp_close:.0f})" if hp_close else ""),
         lambda r: r["close"]["rps"],
         GOALS["close_x_haproxy"] * hp_close if hp_close else None, False, "{:.0f} req/s"),
        ("RSS idle, largest proxy", f"<= {GOALS['rss_idle_mib']:.0f} MiB",
         lambda r: mib(max(r["rss_idle"])), GOALS["rss_idle_mib"], True, "{:.1f} MiB"),
        (f"RSS proxy A with {IDLE_CONNS} open connections, after the load runs",
         f"<= {GOALS['rss_1000_mib']:.0f} MiB",
         lambda r: mib(r["rss_1000"][0]), GOALS["rss_1000_mib"], True, "{:.1f} MiB"),
        (f"RSS proxy A with {IDLE_CONNS} open connections, before any load",
         f"<= {GOALS['rss_1000_mib']:.0f} MiB",
         lambda r: mib(r["rss_1000_fresh"][0]), GOALS["rss_1000_mib"], True, "{:.1f} MiB"),
    ]
    lines = []
    for label, goal_text, get, goal, le, vf in items:
        def val(r):
            if r is None:
                return None
            try:
                return get(r)
            except (KeyError, TypeError, ValueError, IndexError):
                return None
        pv, hv = val(pm), val(hp)
        ok = verdict(pv, goal, le) if goal is not None else "n/a"
        lines.append(f"goal: {label} {goal_text}: pimesh {'n/a' if pv is None else vf.format(pv)} [{ok}], "
                     f"haproxy {'n/a' if hv is None else vf.format(hv)}")
    return lines


# --------------------------------------------------------------------------- main

def raise_nofile():
    """Up to 65536 open files for the bench and what it starts (as a unit's LimitNOFILE)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 65536:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (65536, 65536))  # root only
            soft, hard = 65536, 65536
        except (ValueError, OSError):
            pass
    want = max(soft, min(hard, 65536))
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < IDLE_CONNS * 2 + 200:
        log(f"warning: open-file limit {want} is low for {IDLE_CONNS} connections")


def main():
    t0 = time.monotonic()
    wanted = [r.strip() for r in os.environ.get("BENCH_ROWS", "direct,haproxy,pimesh,pimesh-tcp").split(",") if r.strip()]
    for tool in ("wrk", "openssl"):
        if not shutil.which(tool):
            sys.exit(f"bench-proxy: {tool} not found: run bench/install-load-tools.sh")
    oha_bin()
    raise_nofile()

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    tmp = tempfile.mkdtemp(prefix="bench-proxy.")
    procs = Procs(tmp)
    rows, notes = {}, []
    try:
        backend_port = free_port()
        nginx = start_nginx(procs, tmp, backend_port)
        direct_url = f"http://127.0.0.1:{backend_port}/"
        check_body(direct_url)
        for name in wanted:
            pair = []
            mark = len(procs.procs)
            CURRENT_ROW[0] = name
            try:
                if name == "direct":
                    url, pair = direct_url, []
                elif name == "haproxy":
                    pair, url = start_haproxy_pair(procs, tmp, backend_port)
                elif name == "pimesh":
                    pair, url = start_pimesh_pair(procs, tmp, backend_port)
                elif name == "pimesh-tcp":
                    pair, url = start_pimesh_pair(procs, tmp, backend_port, protocol="tcp")
                else:
                    raise Unavailable(f"unknown row {name!r}")
                OWN_PIDS[:] = [nginx.pid] + [p.pid for p in pair]
                rows[name] = measure_row(name, url, [p.pid for p in pair])
                for part in ("keepalive", "close", "fixed"):
                    r = rows[name][part]
                    errs = r.get("errors") or 0
                    if errs:
                        kinds = r.get("error_kinds")
                        notes.append(f"{name} {part}: {errs} failed requests (not counted)"
                                     + (f": {kinds}" if kinds else ""))
                notes += noise_note(name, name)
                if rows[name]["fixed"]["rps"] and rows[name]["fixed"]["rps"] < RATE * 0.95:
                    notes.append(f"{name}: oha reached only {rows[name]['fixed']['rps']:.0f} "
                                 f"of {RATE} req/s")
            except Unavailable as err:
                log(f"{name}: {err}")
                rows[name] = f"n/a ({err})"
            except (RuntimeError, OSError, subprocess.TimeoutExpired, KeyError, ValueError) as err:
                log(f"{name}: measurement failed: {err}")
                rows[name] = f"n/a (measurement failed: {err})"
            finally:
                # Everything this row started, also what a failed start left behind.
                for p in list(procs.procs[mark:]):
                    procs.stop(p)
        rounds = {}
        if P99_ROUNDS > 0 and "direct" in wanted and ({"haproxy", "pimesh"} & set(wanted)):
            mark = len(procs.procs)
            try:
                rounds = paired_p99_rounds(procs, tmp, nginx, backend_port, direct_url, wanted)
            except Unavailable as err:
                notes.append(f"paired p99 rounds not run: {err}")
            except (RuntimeError, OSError, subprocess.TimeoutExpired, KeyError, ValueError) as err:
                notes.append(f"paired p99 rounds failed: {err}")
            finally:
                for p in list(procs.procs[mark:]):
                    procs.stop(p)
            for name in rounds:
                notes += noise_note(f"rounds:{name}", f"paired rounds, {name}")
        print_table(rows, notes, rounds)
        log(f"done in {time.monotonic() - t0:.0f}s")
    finally:
        procs.stop_all()
        if os.environ.get("BENCH_KEEP_TMP") == "1":
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    # direct and haproxy are the reference: without them the figures mean nothing.
    for name in ("direct", "haproxy"):
        if name in wanted and not isinstance(rows.get(name), dict):
            sys.exit(1)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt as err:
        sys.exit(f"bench-proxy: interrupted ({err})")
