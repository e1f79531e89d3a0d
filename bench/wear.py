"""`make bench-wear` (prints figures, asserts nothing): what Pimesh writes to a node's
storage per day, the SD card's wear.

An init node (supervisor, proxy, three control replicas) is the amd64 root filesystem
booted in systemd-nspawn, its files on the host's ext4. After every unit is ready and a
settle time, two windows of WEAR_SECONDS each are measured: idle, then with steady mesh
traffic (RATE requests/s of HTTP/1.1 keep-alive through the proxy's outbound port to a
service on the node, over the proxy's own mTLS inbound). For each window:

- each Pimesh daemon's `write_bytes` from /proc/<pid>/io: bytes it caused to be written
  to storage (its state files; page-cache writes counted when dirtied);
- the journal entries of the Pimesh units (count, and bytes as `journalctl -o export`
  prints them, before journald's compression and indexes);
- systemd-journald's own `write_bytes` (every unit's logging, so an upper bound of what
  Pimesh's logging costs);

each extrapolated to a day. The goal for Pimesh itself is at most 10 MB per day.

Then the same two windows on a node of a site with the real central server (`pimesh-central`
in the node's network namespace, the harness of the OTA tests): the node long-polls it for
revisions, queues its outcome reports on disk before it sends them, and sends its mesh
traffic from memory every `traffic_every` (300 s by default) when the traffic changed. `WEAR_NODES=alone` or
`central` measures one of the two.
"""

import json
import os
import subprocess
import sys
import time

from harness import scratch
from harness.container import booted
from harness.freeze import host_pid
from harness.ota_site import Site
from table import Table

SECONDS = float(os.environ.get("WEAR_SECONDS", "600"))
SETTLE = float(os.environ.get("WEAR_SETTLE", "60"))
RATE = int(os.environ.get("RATE", "50"))
NODES = os.environ.get("WEAR_NODES", "alone,central").split(",")
DAY = 86_400

SEED = 'site = "lab"\nrole = "init"\nnode = "pi-a"\n'
CLUSTER = ('site = "lab"\n\n[control]\nreplicas = 3\n\n'
           '[services.web]\nport = 8080\nnodes = ["pi-a"]\nlocal_port = 8180\n')
DAEMONS = ["pimesh-supervisor.service", "pimesh-proxy.service",
           *[f"pimesh-control@{n}.service" for n in (1, 2, 3)]]

# Runs in the container's network namespace: an HTTP server for the `web` service.
BACKEND = r"""
import http.server
class Quiet(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = b"web\n"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", 8080), Quiet).serve_forever()
"""

# Runs in the container's network namespace: `rate` requests/s for `seconds` through the
# proxy's outbound port, on one keep-alive connection, and no longer than `seconds` (on a
# busy machine it may send fewer); prints how many got a 200 and how many did not.
LOAD = r"""
import http.client, sys, time
rate, seconds = int(sys.argv[1]), float(sys.argv[2])
ok = failed = 0
connection = None
start = time.monotonic()
for i in range(int(rate * seconds)):
    if time.monotonic() - start >= seconds:
        break
    due = start + i / rate
    pause = due - time.monotonic()
    if pause > 0:
        time.sleep(pause)
    try:
        if connection is None:
            connection = http.client.HTTPConnection("127.0.0.1", 4140, timeout=5)
        connection.request("GET", "/", headers={"host": "web"})
        response = connection.getresponse()
        response.read()
        ok += response.status == 200
        failed += response.status != 200
    except Exception:
        failed += 1
        connection = None
print(ok, failed)
"""


def in_netns(container, code, *args, **popen):
    return subprocess.Popen(["nsenter", "-t", str(container.leader), "-n", sys.executable, "-c",
                             code, *map(str, args)], **popen)


def written(pid):
    """`write_bytes` of host process `pid`, None when it is gone."""
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                if line.startswith("write_bytes:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def pids(container):
    """Host PIDs of the Pimesh daemons and of journald."""
    found = {}
    for unit in [*DAEMONS, "systemd-journald.service"]:
        inner = container.main_pid(unit)
        found[unit] = host_pid(container.leader, inner) if inner else None
    return found


def journal_entries(container, since, until):
    """(entries, export bytes) of the Pimesh units' journal between two epoch times."""
    units = [arg for unit in DAEMONS for arg in ("-u", unit)]
    out = container.run(["journalctl", "--no-pager", "-o", "export", f"--since=@{since:.0f}",
                         f"--until=@{until:.0f}", *units], check=False, timeout=120).stdout
    entries = sum(1 for line in out.splitlines() if line.startswith("__CURSOR="))
    return entries, len(out.encode())


def journal_writers(container, since, until, top=3):
    """The units (or syslog identifiers) with the most journal entries of every unit between
    two epoch times, as (name, entries), busiest first: who journald writes for."""
    out = container.run(["journalctl", "--no-pager", "-o", "json", f"--since=@{since:.0f}",
                         f"--until=@{until:.0f}", "--output-fields=_SYSTEMD_UNIT,SYSLOG_IDENTIFIER"],
                        check=False, timeout=120).stdout
    counts = {}
    for line in out.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        name = entry.get("_SYSTEMD_UNIT") or entry.get("SYSLOG_IDENTIFIER") or "?"
        counts[name] = counts.get(name, 0) + 1
    return sorted(counts.items(), key=lambda item: -item[1])[:top]


def since_start(container, table):
    """Rows: what each daemon wrote from its start to now (first-boot keys, certificates
    and state), which also shows that the counters see the daemons' writes."""
    for unit, pid in pids(container).items():
        if unit not in DAEMONS or not pid:
            continue
        with open(f"/proc/{pid}/stat") as f:
            started = int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        with open("/proc/uptime") as f:
            age = float(f.read().split()[0]) - started
        table.row(f"from start ({age:.0f} s ago): {unit} writes", written(pid) / 1e3, "kB", ".1f")


def window(container, seconds):
    """Bytes written over `seconds` per daemon, journal entries and journald's writes."""
    before_pids = pids(container)
    before = {unit: written(pid) for unit, pid in before_pids.items() if pid}
    since = time.time()
    time.sleep(seconds)
    until = time.time()
    after_pids = pids(container)
    result = {}
    for unit, pid in before_pids.items():
        start, end = before.get(unit), written(pid) if pid else None
        restarted = after_pids.get(unit) != pid
        result[unit] = None if start is None or end is None or restarted else end - start
    result["journal"] = journal_entries(container, since, until)
    result["writers"] = journal_writers(container, since, until)
    return result, until - since


def per_day(value, seconds):
    return value * DAY / seconds / 1e6


def report(table, label, measured, seconds):
    pimesh = 0
    for unit in DAEMONS:
        value = measured[unit]
        if value is None:
            table.row(f"{label}: {unit} writes", "restarted", "")
            continue
        pimesh += value
        table.row(f"{label}: {unit} writes", per_day(value, seconds), "MB/day", ".2f")
    entries, exported = measured["journal"]
    table.row(f"{label}: Pimesh journal entries", entries * DAY / seconds, "per day", ".0f")
    table.row(f"{label}: Pimesh journal entries, export size", per_day(exported, seconds),
              "MB/day", ".2f")
    table.row(f"{label}: Pimesh total (daemons + journal export)",
              per_day(pimesh + exported, seconds), "MB/day", ".2f")
    journald = measured["systemd-journald.service"]
    if journald is not None:
        table.row(f"{label}: journald writes, every unit", per_day(journald, seconds),
                  "MB/day", ".2f")
    writers = ", ".join(f"{name} {count}" for name, count in measured["writers"]) or "none"
    table.note(f"{label}: the journal's busiest writers (entries in the window): {writers}")


def measure(table, container, label=""):
    """The figures of `container`, a node whose site configuration places the `web`
    service on it: from its start, then an idle window and one with traffic."""
    backend = in_netns(container, BACKEND)
    try:
        container.wait_for("every unit ready", lambda: all(
            container.http_get(url)[0] == 200 for url in (
                "http://127.0.0.1:4191/ready",
                *[f"http://127.0.0.1:{8085 + n}/ready" for n in (1, 2, 3)])), timeout=180)
        container.wait_for("the web service through the proxy", lambda: container.http_get(
            "http://127.0.0.1:8180/", timeout=5)[0] == 200, timeout=120)
        time.sleep(SETTLE)
        since_start(container, table)
        idle, seconds = window(container, SECONDS)
        report(table, f"{label}idle", idle, seconds)
        load = in_netns(container, LOAD, RATE, SECONDS + 5, stdout=subprocess.PIPE, text=True)
        time.sleep(2)
        busy, seconds = window(container, SECONDS)
        ok, failed = map(int, load.communicate(timeout=SECONDS + 120)[0].split())
        report(table, f"{label}{RATE} req/s", busy, seconds)
        table.note(f"{label}traffic: {ok} requests answered 200, {failed} not")
    finally:
        backend.kill()
        backend.wait()


def with_central(table):
    """`measure` on the init node of a site whose configuration came from the real
    central server, which it keeps long-polling and reporting to."""
    site = Site(byo_init=True)
    passed = False
    try:
        container = site.boot_node()
        revision = site.publish(CLUSTER)
        site.wait_committed(revision, timeout=120)
        measure(table, container, label="with central: ")
        reports = site.central_report()
        table.note(f"with central: the node's last report at the central server: state "
                   f"{reports.get('state')}, revision {reports.get('revision')}, traffic "
                   f"{'reported' if reports.get('traffic') else 'none'}")
        passed = True
    finally:
        site.close()
        # The site's scratch folder (keys, the central server's state and log) goes
        # unless the run failed.
        scratch.finish(passed)


def main():
    table = Table("wear")
    table.setup(f"an init node in systemd-nspawn (supervisor, proxy, 3 replicas); windows of "
                f"{SECONDS:.0f} s after {SETTLE:.0f} s of settling; traffic {RATE} req/s")
    table.setup("write_bytes from /proc/<pid>/io; journal bytes as journalctl -o export; "
                "extrapolated to a day")
    if "alone" in NODES:
        with booted(SEED, {"/etc/pimesh/cluster.toml": CLUSTER}) as container:
            measure(table, container)
    if "central" in NODES:
        with_central(table)
    table.print()


if __name__ == "__main__":
    main()
