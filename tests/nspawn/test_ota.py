"""Over-the-air configuration end to end: `pimeshctl` → the real `pimesh-central` → the
supervisor on a node (the amd64 root filesystem booted in systemd-nspawn, real systemd and
D-Bus) → its proxy and control replicas. One site and one node for the whole file; each
case first brings the node to the revision it starts from (`given`), so the cases pass in
any order (run in file order, each starts where the one before ended, and `given` has
nothing to publish).

The node's OTA settings are shortened for the test (health deadline 15 s, settle 1 s,
trial window 12 s, bundles up to 64 KiB, mesh traffic measured every 2 s); everything else
is the image's default.
"""

import contextlib
import json
import os
import random
import shutil
import subprocess
import time

import pytest

from harness.ota_site import Site, cluster_config, sha256_hex

PROXY = "pimesh-proxy.service"
CONTROLS = [f"pimesh-control@{n}.service" for n in (1, 2, 3)]
OTA = {"health_deadline_ms": 15000, "settle_ms": 1000, "try_window_ms": 12000,
       "long_poll_wait_s": 20, "max_bundle_bytes": 65536, "traffic_every_s": 2}
# The `web` app of the site configuration (port 8080 on the node): 200, or 500 for /fail.
WEB_APP = r"""
import http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        code = 500 if self.path.startswith("/fail") else 200
        self.send_response(code); self.send_header("content-length", "2"); self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", 8080), H).serve_forever()
"""
# Requests to `web` through the node's proxy (its outbound port as an HTTP proxy), one in
# four to /fail, one every 50 ms until the file argv[1] exists (at most 5 minutes' worth).
CALL_WEB = r"""
import os, sys, time, urllib.request, urllib.error
opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": "http://127.0.0.1:4140"}))
for n in range(6000):
    if os.path.exists(sys.argv[1]):
        break
    try:
        opener.open("http://web/fail" if n % 4 == 3 else "http://web/", timeout=5).read()
    except (urllib.error.URLError, OSError):
        pass
    time.sleep(0.05)
"""
# Power-cut iterations restart the supervisor at once, not after systemd's growing delay.
QUICK_RESTART = "[Service]\nRestartSec=200ms\nRestartSteps=0\n"


@pytest.fixture(scope="module")
def booted_site():
    # The site's init node (given the site's anchor and issuer): it runs the control
    # replicas whose restarts the cases below check.
    site = Site(ota=OTA, byo_init=True)
    try:
        site.boot_node()
        yield site
    finally:
        site.close()


@pytest.fixture
def site(booted_site):
    """The site with the real central server serving, whatever a case before left, and
    the node's OTA client idle."""
    booted_site.ensure_central()
    booted_site.container.wait_for("the OTA client idle",
                                   lambda: booted_site.ota_status()["state"] == "idle", timeout=60)
    return booted_site


def given(site, config):
    """The node running `config` as its committed revision: published (and waited for)
    unless it already does."""
    status = site.ota_status()
    if site.active_config() != config or status["state"] != "idle" or status["committed"] == 0:
        site.wait_committed(site.publish(config))


def outcome(site, state):
    """The node's last reported outcome when it is `state` and nothing is pending."""
    status = site.ota_status()
    last = status["last_outcome"]
    if last and last["state"] == state and status["state"] == "idle":
        return status
    return None


def test_a_published_revision_is_applied_on_the_node_and_reported(site):
    config = cluster_config(site.name)
    revision = site.publish(config)
    site.wait_committed(revision)
    assert site.active_config() == config
    assert site.proxy_config()["sha256"] == sha256_hex(config)
    report = site.central_report()
    assert (report["revision"], report["state"]) == (revision, "applied")
    fleet, code = site.fleet_status()
    assert code == 0 and fleet["healthy"], fleet
    node = next(n for s in fleet["sites"] for n in s["nodes"] if n["node"] == site.node)
    # No K3s on this node.
    assert (node["revision"], node["state"], node["k3s"], node["healthy"]) == (revision, "applied", None, True), node


def test_only_the_units_that_read_a_change_are_touched(site):
    given(site, cluster_config(site.name))
    proxy_pid = site.container.main_pid(PROXY)
    control_pids = [site.container.main_pid(unit) for unit in CONTROLS]

    config = cluster_config(site.name, max_connections=2000)
    site.wait_committed(site.publish(config))
    assert site.proxy_config()["sha256"] == sha256_hex(config)
    assert site.container.main_pid(PROXY) == proxy_pid, "the proxy reloads in place"
    assert [site.container.main_pid(u) for u in CONTROLS] == control_pids, "replicas untouched"

    config = cluster_config(site.name, max_connections=2000, services=("web", "api"))
    site.wait_committed(site.publish(config))
    assert site.proxy_config()["sha256"] == sha256_hex(config)
    assert site.container.main_pid(PROXY) == proxy_pid
    assert [site.container.main_pid(u) for u in CONTROLS] == control_pids, \
        "a services change reloads the control replicas in place"
    def replica_loaded_both():
        journal = site.container.run(["journalctl", "-u", "pimesh-control@1.service", "-o", "cat"]).stdout
        return "loaded: site lab, 2 placed service(s)" in journal
    site.container.wait_for("replica 1 serving the new services", replica_loaded_both, timeout=15)


def test_the_replica_count_follows_the_site_configuration(site):
    given(site, cluster_config(site.name, max_connections=2000, services=("web", "api")))
    proxy_pid = site.container.main_pid(PROXY)
    kept_pids = [site.container.main_pid(unit) for unit in CONTROLS[:2]]

    two = cluster_config(site.name, max_connections=2000, services=("web", "api"), replicas=2)
    site.wait_committed(site.publish(two))
    site.container.wait_for(
        "replica 3 stopped",
        lambda: site.container.show(CONTROLS[2], "ActiveState")["ActiveState"] == "inactive",
        timeout=15)
    status = site.container.status()
    assert [unit["name"] for unit in status["units"]] == [PROXY, *CONTROLS[:2]]
    assert status["control"]["replicas"] == CONTROLS[:2]
    env = site.container.run(["cat", "/run/pimesh/proxy.env"]).stdout
    # The init node is a server: its proxy heartbeats that, with its replicas' ports.
    assert ("PIMESH_PROXY_ARGS=--control 127.0.0.1:8086,127.0.0.1:8087 "
            "--role server --server-replicas 8086,8087\n") in env, env
    assert site.container.main_pid(PROXY) == proxy_pid, "the proxy keeps running"
    assert [site.container.main_pid(u) for u in CONTROLS[:2]] == kept_pids, \
        "the replicas that stay keep running"

    three = cluster_config(site.name, max_connections=2000, services=("web", "api"))
    site.wait_committed(site.publish(three))
    # Committed: the health gate saw every unit of the new set active and ready.
    assert site.container.show(CONTROLS[2], "ActiveState")["ActiveState"] == "active"
    status = site.container.status()
    assert [unit["name"] for unit in status["units"]] == [PROXY, *CONTROLS]
    assert status["control"]["replicas"] == CONTROLS
    code, _ = site.container.http_get("http://127.0.0.1:8088/ready")
    assert code == 200, "replica 3 serves again"
    assert site.container.main_pid(PROXY) == proxy_pid


def test_a_revision_the_proxy_refuses_is_rolled_back(site):
    given(site, cluster_config(site.name, max_connections=2000, services=("web", "api")))
    good = site.active_config()
    committed = site.ota_status()["committed"]
    # Schema-valid (the schema's highest), but this node lacks the open files for it
    # (two per connection, above systemd's hard limit of 524288): the proxy refuses it
    # and its readiness fails, so the health gate fails.
    bad = cluster_config(site.name, max_connections=262144, services=("web", "api"))
    revision = site.publish(bad)
    status = site.container.wait_for("the rollback", lambda: outcome(site, "rolled-back"), timeout=60)
    assert status["committed"] == committed
    assert f"revision {revision}" in status["last_outcome"]["detail"]
    assert "max_connections" in status["last_outcome"]["detail"]
    assert site.active_config() == good
    assert site.proxy_config()["sha256"] == sha256_hex(good)
    report = site.central_report()
    assert report["state"] == "rolled-back" and "max_connections" in report["detail"]


def test_a_trial_revision_reverts_unless_a_newer_one_confirms_it(site):
    given(site, cluster_config(site.name, max_connections=2000, services=("web", "api")))
    good = site.active_config()
    committed = site.ota_status()["committed"]
    trial = cluster_config(site.name, max_connections=3000, services=("web", "api"))
    revision = site.publish(trial, try_mode=True)
    site.container.wait_for("the trial", lambda: site.ota_status()["state"] == "trying"
                            and site.ota_status()["pending"] == revision, timeout=30)
    assert site.active_config() == trial
    assert site.central_report()["state"] == "trying"
    status = site.container.wait_for("the revert", lambda: outcome(site, "reverted"), timeout=60)
    assert "not confirmed by a newer revision within 12s" in status["last_outcome"]["detail"], status
    assert status["committed"] == committed
    assert site.active_config() == good
    assert site.proxy_config()["sha256"] == sha256_hex(good)

    # Confirmed: the same configuration published again as a normal revision in the window.
    revision = site.publish(trial, try_mode=True)
    site.container.wait_for("the second trial", lambda: site.ota_status()["state"] == "trying"
                            and site.ota_status()["pending"] == revision, timeout=30)
    confirmed = site.publish(trial)
    site.wait_committed(confirmed)
    time.sleep(13)  # past the first trial's window: nothing reverts any more
    assert site.ota_status()["committed"] == confirmed
    assert site.active_config() == trial


def test_a_trial_revision_goes_back_at_once_when_its_rollout_is_aborted(site):
    given(site, cluster_config(site.name, max_connections=3000, services=("web", "api")))
    good = site.active_config()
    committed = site.ota_status()["committed"]
    # The canary wave also waits for `pi-late` (not heard from yet, not offline for 10
    # minutes): the rollout runs while the node is on trial.
    rollout = f'[rollout]\ncanary = ["{site.node}", "pi-late"]\noffline_after = "10m"\n'
    trial = cluster_config(site.name, max_connections=3200, services=("web", "api"), extra=rollout)
    revision = site.publish(trial, try_mode=True)
    site.container.wait_for("the trial", lambda: site.ota_status()["state"] == "trying"
                            and site.ota_status()["pending"] == revision, timeout=30)
    site.ctl("rollout", "abort", "--revision", str(revision), "--site-dir", site.keys,
             "--central", f"https://127.0.0.1:{site.port}", "--central-ca", site.server_cert)
    status = site.container.wait_for("the revert", lambda: outcome(site, "reverted"), timeout=60)
    # Told by the central server, not at the end of the 12 s window.
    detail = status["last_outcome"]["detail"]
    assert f"the rollout of revision {revision} was aborted at the central server" in detail, status
    assert status["committed"] == committed
    assert site.active_config() == good
    assert site.proxy_config()["sha256"] == sha256_hex(good)
    rollout, code = site.rollout(revision)
    assert (rollout["state"], code) == ("aborted", 3)
    site.container.wait_for("the revert reported", lambda: site.central_report()["state"] == "reverted",
                            timeout=60)


def test_reports_wait_on_disk_while_the_central_server_is_down(site):
    given(site, cluster_config(site.name, max_connections=3000, services=("web", "api")))
    trial = cluster_config(site.name, max_connections=3500, services=("web", "api"))
    revision = site.publish(trial, try_mode=True)
    site.container.wait_for("the trial", lambda: site.ota_status()["pending"] == revision, timeout=30)
    site.kill_central()
    site.container.wait_for("the revert with the central server down",
                            lambda: outcome(site, "reverted"), timeout=60)
    assert site.ota_status()["queued_reports"] >= 1
    outbox = site.node_path("/var/lib/pimesh/ota/outbox")
    assert os.listdir(outbox), "the report is on disk"
    # The supervisor itself dies and comes back: the report is still there.
    site.container.kill(site.container.main_pid("pimesh-supervisor.service"))
    site.container.wait_for("the supervisor back", lambda: site.ota_status()["state"] == "idle", timeout=60)
    assert site.ota_status()["queued_reports"] >= 1
    site.start_central()
    site.container.wait_for("the queued report at the central server",
                            lambda: site.central_report()["state"] == "reverted", timeout=60)
    site.container.wait_for("an empty outbox", lambda: site.ota_status()["queued_reports"] == 0)


def test_bad_documents_are_refused_reported_and_change_nothing(site):
    given(site, cluster_config(site.name, max_connections=3000, services=("web", "api")))
    good = site.active_config()
    committed = site.ota_status()["committed"]
    replay = open(os.path.join(site.dir, "state", site.name, "revisions", f"{committed}.json"), "rb").read()
    # Claimed revisions above any published so far: 100 to 104 in file order.
    first = max(100, site.revision + 1)
    valid = site.forge(good, first)
    tampered = json.loads(site.forge(good, first + 1))
    tampered["config"] = tampered["config"].replace("max_connections = 3000", "max_connections = 9")
    elsewhere = os.path.join(site.dir, "elsewhere")
    shutil.copytree(site.keys, elsewhere)  # the same signing key reused for another site
    cases = [
        ("tampered", json.dumps(tampered).encode(), "signature does not verify"),
        ("for another site", site.forge(good.replace(f'"{site.name}"', '"elsewhere"'), first + 2,
                                        site="elsewhere", key_dir=elsewhere), "for site elsewhere"),
        ("replayed", replay, "not newer"),
        ("older", site.forge(good, 1), "not newer"),
        ("truncated", valid[: len(valid) // 2], "not a pimesh-revision/1 document"),
        ("oversized", site.forge(good + "#" * 70000 + "\n", first + 3), "more than the 65536 allowed"),
        ("garbage", os.urandom(300), "not a pimesh-revision/1 document"),
        ("signed but invalid", site.forge(f'site = "{site.name}"\n[control]\nreplicas = 12\n', first + 4),
         "control.replicas"),
    ]
    site.start_hostile()
    try:
        for name, document, expected in cases:
            before = len(site.hostile_reports())
            site.offer(document)
            site.container.wait_for(f"the node's report on the {name} document",
                                    lambda: len(site.hostile_reports()) > before, timeout=30)
            report = site.hostile_reports()[-1]
            assert report["state"] == "rejected", (name, report)
            assert expected in report["detail"], (name, report)
            assert report["revision"] == committed, (name, report)
            assert site.active_config() == good, name
            assert site.ota_status()["committed"] == committed, name
            assert site.proxy_config()["sha256"] == sha256_hex(good), name
    finally:
        site.stop_hostile()
        site.start_central()
    # The refused documents claimed revisions up to first + 4: the site moves past them.
    site.revision = first + 100


def web_traffic(site):
    """`web`'s line in the traffic of the node's last report at the central server, with
    the traffic, when `web` is in it."""
    traffic = site.central_report().get("traffic") or {}
    web = [s for s in traffic.get("services", []) if s["service"] == "web"]
    return (traffic, web[0]) if web else None


@contextlib.contextmanager
def calling_web(site, name):
    """The `web` app on the node, called through its proxy while the block runs."""
    in_netns = ["nsenter", "-t", str(site.container.leader), "-n", "python3", "-c"]
    stop = os.path.join(site.dir, f"stop-calling-web-{name}")
    app = subprocess.Popen(in_netns + [WEB_APP], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    calls = subprocess.Popen(in_netns + [CALL_WEB, stop], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        with open(stop, "w"):
            pass
        calls.wait(timeout=30)
        app.kill()
        app.wait()


def test_the_nodes_mesh_traffic_reaches_the_central_server_with_its_reports(site):
    given(site, cluster_config(site.name))
    with calling_web(site, "first"):
        def reported_web():
            found = web_traffic(site)
            return found and found[1]["answered"] >= 8 and found[1]["failures"] > 0 and found
        traffic, web = site.container.wait_for("the node's report carrying web's traffic", reported_web,
                                               timeout=90, interval=0.5)
    # One call in four fails (500): the window's success rate says so, give or take the
    # calls in flight at its edges.
    success = (web["answered"] - web["failures"]) / web["answered"]
    assert 0.5 <= success <= 0.9, web
    assert web["requests"] >= web["answered"] - 1, web
    assert 1 <= traffic["window_s"] <= 10, traffic
    assert web["p50_us"] > 0 and web["p99_us"] >= web["p50_us"], web
    # The node's own status shows what it measured.
    measured = site.container.status()["traffic"]
    assert measured is None or measured["services"][0]["service"] == "web", measured
    # The operator's view of the fleet carries it too.
    fleet, _ = site.fleet_status()
    node = next(n for s in fleet["sites"] for n in s["nodes"] if n["node"] == site.node)
    assert node["traffic"]["services"], node
    # The calls stopped: a window without them leaves the traffic out of the next report.
    site.container.wait_for("a report without web's traffic", lambda: web_traffic(site) is None,
                            timeout=90, interval=0.5)
    committed = site.central_report()
    # A supervisor that restarts with nothing to apply still refreshes its last outcome
    # when the traffic comes back.
    site.container.kill(site.container.main_pid("pimesh-supervisor.service"))
    site.container.wait_for("the supervisor back", lambda: site.ota_status()["state"] == "idle", timeout=60)
    with calling_web(site, "after-restart"):
        site.container.wait_for("web's traffic reported after the restart", lambda: web_traffic(site),
                                timeout=90, interval=0.5)
    again = site.central_report()
    assert (again["state"], again["revision"]) == (committed["state"], committed["revision"]), again


def test_a_power_cut_during_apply_leaves_the_old_or_the_new_revision_whole(site):
    container = site.container
    drop_in = "/etc/systemd/system/pimesh-supervisor.service.d/quick-restart.conf"
    container.write(drop_in, QUICK_RESTART)
    container.systemctl("daemon-reload")
    try:
        power_cuts(site, container)
    finally:
        os.remove(site.node_path(drop_in))
        container.systemctl("daemon-reload")


def power_cuts(site, container):
    rng = random.Random(20261126)
    iterations = int(os.environ.get("PIMESH_POWER_CUTS", "50"))
    seen = {"old": 0, "new": 0}
    for iteration in range(iterations):
        old = site.active_config()
        services = ("web", "api") if iteration % 3 else ("web", "api", f"batch{iteration}")
        new = cluster_config(site.name, max_connections=1000 + iteration, services=services)
        revision = site.publish(new)
        time.sleep(rng.uniform(0.0, 1.5))
        container.kill(container.main_pid("pimesh-supervisor.service"))
        on_disk = site.active_config()
        assert on_disk in (old, new), f"iteration {iteration}: cluster.toml is neither revision"
        seen["old" if on_disk == old else "new"] += 1
        site.wait_committed(revision, timeout=60)
        assert site.active_config() == new
        assert site.proxy_config()["sha256"] == sha256_hex(new), f"iteration {iteration}"
    print(f"power cuts: {iterations}, cut before the switch: {seen['old']}, after: {seen['new']}")
    assert site.central_report()["state"] == "applied"
