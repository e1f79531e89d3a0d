"""`make bench-heal` (prints figures, asserts nothing): the amd64 root filesystem booted in
systemd-nspawn, the default supervisor configuration.

- kill -9 of a managed unit's main process → its readiness endpoint answers 200 again from
  a new process: p50/p99 over KILLS kills, rotating over the four units (so systemd's start
  limit, 5 in 30 s per unit, is never reached);
- SIGSTOP (a hang) → detected by the probe and ready again, over HANGS hangs;
- the supervisor's RSS and CPU time (utime+stime from /proc) at idle and during a restart
  storm (all four units killed every STORM_PERIOD s for STORM_SECONDS s).

The timing loop runs inside the container's network namespace (it polls 127.0.0.1 every
few milliseconds); kills and systemctl run through nsenter into the whole container.
"""

import json
import os
import subprocess
import sys
import time

from harness.container import booted
from table import Table

KILLS = int(os.environ.get("KILLS", "32"))
HANGS = int(os.environ.get("HANGS", "6"))
STORM_SECONDS = float(os.environ.get("STORM_SECONDS", "20"))
STORM_PERIOD = float(os.environ.get("STORM_PERIOD", "0.3"))
IDLE_SECONDS = float(os.environ.get("IDLE_SECONDS", "10"))

UNITS = {"pimesh-proxy.service": 4191, **{f"pimesh-control@{n}.service": 8085 + n for n in (1, 2, 3)}}

# Runs inside the container's network namespace: argv = leader pid, mode, count, units json.
INNER = r"""
import json, subprocess, sys, time, urllib.request
leader, mode, count, units = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
def inside(*argv):
    return subprocess.run(["nsenter", "-t", leader, "-a", *argv], capture_output=True, text=True).stdout.strip()
def main_pid(unit):
    return int(inside("systemctl", "show", "-P", "MainPID", unit) or 0)
def ready(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=0.5) as r:
            return r.status == 200
    except Exception:
        return False
def wait_ready(unit, port, not_pid, timeout=60):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if ready(port):
            pid = main_pid(unit)
            if pid and pid != not_pid:
                return pid
        time.sleep(0.005)
    return None
names = list(units)
results = []
for i in range(count):
    unit = names[i % len(names)] if mode == "kill" else names[1 + i % (len(names) - 1)]
    port = units[unit]
    old = wait_ready(unit, port, 0)
    time.sleep(0.5 if mode == "kill" else 1.0)
    start = time.monotonic()
    inside("kill", "-KILL" if mode == "kill" else "-STOP", str(old))
    new = wait_ready(unit, port, old)
    took = time.monotonic() - start
    results.append({"unit": unit, "seconds": took if new else None})
    time.sleep(1.5 if mode == "kill" else 0.5)
print(json.dumps(results))
"""

STORM = r"""
import subprocess, sys, time
leader, seconds, period, units = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4:]
def inside(*argv):
    return subprocess.run(["nsenter", "-t", leader, "-a", *argv], capture_output=True, text=True).stdout.strip()
end = time.monotonic() + seconds
kills = 0
while time.monotonic() < end:
    for unit in units:
        pid = inside("systemctl", "show", "-P", "MainPID", unit)
        if pid and pid != "0":
            inside("kill", "-KILL", pid)
            kills += 1
    time.sleep(period)
print(kills)
"""


def supervisor_host_pid(container):
    ns = os.readlink(f"/proc/{container.leader}/ns/pid")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                if f.read().strip() != "pimesh-supervis":
                    continue
            if os.readlink(f"/proc/{entry}/ns/pid") == ns:
                return int(entry)
        except OSError:
            continue
    raise RuntimeError("no pimesh-supervisor process in the container")


def usage(pid):
    """(CPU seconds so far, RSS in KiB) of the process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (fields 14, 15)
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return cpu, rss


def percentile(values, p):
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def timed(container, mode, count):
    out = subprocess.run(["nsenter", "-t", str(container.leader), "-n", sys.executable, "-c", INNER,
                          str(container.leader), mode, str(count), json.dumps(UNITS)],
                         capture_output=True, text=True, check=True).stdout
    results = json.loads(out)
    seconds = [r["seconds"] for r in results if r["seconds"] is not None]
    return seconds, len(results) - len(seconds)


def window(pid, seconds, during=None):
    cpu0, rss0 = usage(pid)
    start = time.monotonic()
    peak = rss0
    extra = during() if during else None
    while time.monotonic() - start < seconds:
        time.sleep(0.5)
        peak = max(peak, usage(pid)[1])
    cpu1, rss1 = usage(pid)
    elapsed = time.monotonic() - start
    return (cpu1 - cpu0) / elapsed * 100, peak, extra


def main():
    table = Table("heal")
    table.setup("the amd64 root in systemd-nspawn, default supervisor configuration; "
                f"idle windows of {IDLE_SECONDS:.0f} s")
    # The site's init node: it holds the issuer, so it runs the control replicas.
    with booted('site = "lab"\nrole = "init"\nnode = "pi-a"\n') as container:
        container.wait_for("every unit ready", lambda: all(
            u["ready"] for u in container.status()["units"]), timeout=60)
        pid = supervisor_host_pid(container)
        time.sleep(2)
        idle_cpu, idle_rss, _ = window(pid, IDLE_SECONDS)
        table.row("supervisor idle: CPU", idle_cpu, "%", ".2f")
        table.row("supervisor idle: RSS", idle_rss, "KiB")

        seconds, lost = timed(container, "kill", KILLS)
        table.row("kill -9 → ready again, p50", percentile(seconds, 50) * 1000, "ms", ".0f")
        table.row("kill -9 → ready again, p99", percentile(seconds, 99) * 1000, "ms", ".0f")
        table.row("kill -9 → ready again, max", max(seconds) * 1000, "ms", ".0f")
        table.row("kill -9 → ready again, kills", len(seconds), "count")
        table.row("kill -9 → not ready again within 60 s", lost, "count")

        seconds, lost = timed(container, "hang", HANGS)
        table.setup("SIGSTOP: hang threshold 3 s, probe every 1 s")
        table.row("SIGSTOP → detected and ready again, p50", percentile(seconds, 50) * 1000, "ms", ".0f")
        table.row("SIGSTOP → detected and ready again, max", max(seconds) * 1000, "ms", ".0f")
        table.row("SIGSTOP → detected and ready again, hangs", len(seconds), "count")
        table.row("SIGSTOP → not ready again within 60 s", lost, "count")

        storm = subprocess.Popen(["nsenter", "-t", str(container.leader), "-n", sys.executable, "-c", STORM,
                                  str(container.leader), str(STORM_SECONDS), str(STORM_PERIOD), *UNITS],
                                 stdout=subprocess.PIPE, text=True)
        storm_cpu, storm_rss, _ = window(pid, STORM_SECONDS)
        kills = storm.communicate(timeout=60)[0].strip()
        status = container.status()
        actions = sum(u["restarts_by_pimesh"] for u in status["units"])
        table.setup(f"restart storm: every unit killed every {STORM_PERIOD} s for {STORM_SECONDS:.0f} s")
        table.row("restart storm: kills", kills, "count")
        table.row("restart storm: supervisor CPU", storm_cpu, "%", ".2f")
        table.row("restart storm: supervisor peak RSS", storm_rss, "KiB")
        table.row("restart storm: heal actions so far", actions, "count")
        container.wait_for("every unit ready again", lambda: all(
            u["ready"] for u in container.status()["units"]), timeout=120)
        after_cpu, after_rss, _ = window(pid, IDLE_SECONDS)
        table.row("supervisor idle after the storm: CPU", after_cpu, "%", ".2f")
        table.row("supervisor idle after the storm: RSS", after_rss, "KiB")
    table.print()


if __name__ == "__main__":
    main()
