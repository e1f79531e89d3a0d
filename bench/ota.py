"""`make bench-ota`: how long over-the-air configuration takes, end to end, with the
image's default OTA settings (settle 2 s, health deadline 60 s).

- publish → applied and reported: from the start of `pimeshctl config publish` until the
  central server has stored the node's `applied` report for that revision (the proxy
  reloaded, the health gate held for its settle time);
- bad revision → rolled back and reported: a revision the proxy refuses, until the
  central server has the node's `rolled-back` report (the node back on the old revision).

Prints figures; asserts nothing about speed.
"""

import os
import statistics
import time

from harness import scratch
from harness.ota_site import Site, cluster_config
from table import Table

PUBLISHES = int(os.environ.get("PIMESH_BENCH_PUBLISHES", "30"))
ROLLBACKS = int(os.environ.get("PIMESH_BENCH_ROLLBACKS", "5"))


def until_reported(site, revision, state, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            report = site.central_report()
            if report["state"] == state and (state != "applied" or report["revision"] == revision):
                if state != "rolled-back" or f"revision {revision}" in report["detail"]:
                    return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    raise AssertionError(f"revision {revision}: no {state} report within {timeout}s")


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main():
    site = Site(ota={})
    passed = False
    try:
        site.boot_node()
        site.wait_committed(site.publish(cluster_config(site.name)))
        applied = []
        for n in range(PUBLISHES):
            config = cluster_config(site.name, max_connections=1001 + n)
            start = time.monotonic()
            revision = site.publish(config)
            until_reported(site, revision, "applied")
            applied.append(time.monotonic() - start)
        rolled = []
        for n in range(ROLLBACKS):
            start = time.monotonic()
            revision = site.publish(cluster_config(site.name, max_connections=4000000000 - n))
            until_reported(site, revision, "rolled-back")
            rolled.append(time.monotonic() - start)
        pid = site.container.main_pid("pimesh-supervisor.service")
        rss = site.container.run(["grep", "VmRSS", f"/proc/{pid}/status"]).stdout.split()[1]
        passed = True
    finally:
        site.close()
        scratch.finish(passed)
    table = Table("ota")
    table.setup(f"OTA on a node (nspawn, default settings: settle 2 s), {PUBLISHES} publishes, "
                f"{ROLLBACKS} bad revisions")
    table.row("publish → applied + reported, p50", statistics.median(applied) * 1000, "ms", ".0f")
    table.row("publish → applied + reported, p99", percentile(applied, 0.99) * 1000, "ms", ".0f")
    table.row("publish → applied + reported, max", max(applied) * 1000, "ms", ".0f")
    table.row("bad revision → rolled back + reported, p50", statistics.median(rolled) * 1000, "ms", ".0f")
    table.row("bad revision → rolled back + reported, max", max(rolled) * 1000, "ms", ".0f")
    table.row("supervisor RSS after", int(rss) / 1024, "MiB", ".1f")
    table.print()


if __name__ == "__main__":
    main()
