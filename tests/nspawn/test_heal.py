"""The supervisor against real systemd and D-Bus: the amd64 root filesystem booted in
systemd-nspawn. Each case breaks a managed unit (or the supervisor, or D-Bus) the way the
world does, and checks that the supervisor heals it through systemd and says so in /status.

Three containers, one per class: `node` runs the default configuration (the proxy and
control replicas 1..3); `troubled` runs a configuration that names a unit that does not exist and a short
escalation ladder, with control replica 3 made to fail at once every time (a drop-in whose
ExecStart says "unknown flag" and exits 2); `watched` gives the supervisor a 4 s watchdog (a drop-in) to show
that it feeds it while healthy and is restarted by systemd when it stalls.

Each case starts by waiting for the health it needs, so the cases of a class pass in any
order; what the supervisor did on its own at first boot is recorded by the `node` fixture
before any case breaks anything.
"""

import re
import time

import pytest

from harness.container import booted

PROXY = "pimesh-proxy.service"
CONTROLS = [f"pimesh-control@{n}.service" for n in (1, 2, 3)]
READY_URL = {PROXY: "http://127.0.0.1:4191/ready",
             **{f"pimesh-control@{n}.service": f"http://127.0.0.1:{8085 + n}/ready" for n in (1, 2, 3)}}
TROUBLED_CONFIG = """
[heal]
escalate_after = 2
backoff_max_ms = 4000

[[unit]]
name = "pimesh-proxy.service"
ready_url = "http://127.0.0.1:4191/ready"

[[unit]]
name = "pimesh-control@3.service"
ready_url = "http://127.0.0.1:8088/ready"
dependencies = ["pimesh-control@1.service"]

[[unit]]
name = "pimesh-does-not-exist.service"
"""
# Fails at once, as a daemon given a bad flag does, saying why on stderr.
ALWAYS_FAILING = ("[Service]\nExecStart=\n"
                  "ExecStart=/bin/sh -c 'echo \"pimesh-control: unknown flag --no-such-flag\" >&2; exit 2'\n")
SHORT_WATCHDOG = "[Service]\nWatchdogSec=4s\n"
# Control replicas run only on a node holding the site issuer: each node here is its site's
# init node, which makes the trust root on first boot.
INIT_SEED = 'site = "lab"\nrole = "init"\nnode = "pi-a"\n'


class FirstStart:
    """The node once the supervisor has started every managed unit on its own: the units'
    MainPIDs and /status at that moment."""

    def __init__(self, pids, status):
        self.pids = pids
        self.status = status


@pytest.fixture(scope="class")
def node():
    with booted(INIT_SEED) as container:
        pids = container.wait_for("every unit ready", lambda: all_healthy(container, [PROXY, *CONTROLS]))
        container.first_start = FirstStart(pids, container.status())
        yield container


@pytest.fixture(scope="class")
def troubled():
    with booted(INIT_SEED, {"/etc/pimesh/supervisor.toml": TROUBLED_CONFIG,
                            "/etc/systemd/system/pimesh-control@3.service.d/fail.conf": ALWAYS_FAILING}) as container:
        yield container


@pytest.fixture(scope="class")
def watched():
    with booted(INIT_SEED, {"/etc/systemd/system/pimesh-supervisor.service.d/watchdog.conf": SHORT_WATCHDOG}) as container:
        yield container


def healthy(container, unit):
    """The unit's MainPID when systemd says active, /status says ready, and its readiness
    endpoint answers 200; else None."""
    report = container.unit_status(unit)
    if report["active_state"] != "active" or report["ready"] is not True:
        return None
    if container.http_get(READY_URL[unit])[0] != 200:
        return None
    return report["main_pid"]


def all_healthy(container, units):
    pids = {unit: healthy(container, unit) for unit in units}
    return pids if all(pids.values()) else None


def process_starts(container, unit):
    """How many times systemd started the unit's process, from the journal."""
    log = container.run(["journalctl", "-u", unit, "--no-pager", "-o", "cat"], check=False).stdout
    return len(re.findall(r"^Starting ", log, re.MULTILINE))


class TestDefaultNode:
    """The default configuration: the proxy and control replicas 1..3.
    The container is powered off after the last case."""

    def test_the_supervisor_starts_every_managed_unit(self, node):
        pids, status = node.first_start.pids, node.first_start.status
        assert status["config_errors"] == []
        assert status["supervisor_config"]["source"] == "defaults"
        assert status["dbus"]["connected"] is True
        for unit in status["units"]:
            assert unit["desired_state"] == "running"
            assert unit["last_action"]["action"] == "start", unit
            assert "inactive" in unit["last_action"]["reason"]
        assert len(set(pids.values())) == 4

    def test_kill_9_of_a_managed_unit_is_healed(self, node):
        old = node.wait_for("proxy ready", lambda: healthy(node, PROXY))
        node.kill(old, "KILL")
        new = node.wait_for("proxy ready again", lambda: (pid := healthy(node, PROXY)) and pid != old and pid,
                            timeout=30)
        assert new != old
        assert node.show(PROXY, "NRestarts")["NRestarts"] != "0"

    def test_a_hung_unit_is_detected_by_its_probe_and_restarted(self, node):
        unit = CONTROLS[1]
        old = node.wait_for("replica 2 ready", lambda: healthy(node, unit))
        before = node.unit_status(unit)["restarts_by_pimesh"]
        stopped = time.monotonic()
        node.kill(old, "STOP")
        new = node.wait_for("replica 2 restarted", lambda: (pid := healthy(node, unit)) and pid != old and pid,
                            timeout=30)
        took = time.monotonic() - stopped
        report = node.unit_status(unit)
        assert new != old
        assert report["restarts_by_pimesh"] == before + 1
        assert report["last_action"]["action"] == "restart"
        assert "hung" in report["last_action"]["reason"]
        # The supervisor's metrics say the same: the restart counted, the unit up again.
        code, metrics = node.http_get("http://127.0.0.1:4200/metrics")
        assert code == 200, metrics
        restarts = report["action_counts"]["restart"]
        assert f'pimesh_supervisor_heal_actions_total{{unit="{unit}",action="restart"}} {restarts}' in metrics, metrics
        assert f'pimesh_supervisor_unit_up{{unit="{unit}"}} 1' in metrics, metrics
        # Never before the 3 s threshold; that it was the probe and not systemd's watchdog
        # is what the reason above says.
        assert took >= 3, took
        assert "readiness probe failing" in node.journal("pimesh-supervisor.service")

    def test_a_killed_supervisor_readopts_running_units_without_restarting_them(self, node):
        units = [PROXY, *CONTROLS]
        pids = node.wait_for("every unit ready", lambda: all_healthy(node, units))
        old_supervisor = node.main_pid("pimesh-supervisor.service")
        node.kill(old_supervisor, "KILL")
        node.wait_for("a new supervisor", lambda: node.main_pid("pimesh-supervisor.service") not in (0, old_supervisor))
        node.wait_for("its status API", lambda: node.status()["units"][0]["active_state"] == "active")
        time.sleep(5)  # several probe intervals: time to do something wrong
        after = node.wait_for("every unit ready", lambda: all_healthy(node, units))
        assert after == pids
        for unit in node.status()["units"]:
            assert unit["restarts_by_pimesh"] == 0, unit
            assert unit["last_action"] is None, unit

    def test_after_a_dbus_restart_the_supervisor_reconnects_and_still_heals(self, node):
        node.wait_for("connected", lambda: node.status()["dbus"]["connected"])
        before = node.status()["dbus"]["connections"]
        node.systemctl("restart", "dbus.service")
        node.wait_for("reconnected", lambda: (d := node.status()["dbus"])["connected"] and d["connections"] > before,
                      timeout=30)
        # A stopped unit is something only the supervisor heals (systemd's Restart= does not).
        unit = CONTROLS[0]
        node.wait_for("replica 1 ready", lambda: healthy(node, unit))
        node.systemctl("stop", unit)
        node.wait_for("replica 1 started again", lambda: healthy(node, unit), timeout=30)
        report = node.unit_status(unit)
        assert report["last_action"]["action"] == "start"
        assert "inactive" in report["last_action"]["reason"]
        assert "lost the connection to systemd" in node.journal("pimesh-supervisor.service")


class TestTroubledNode:
    """A unit that does not exist, and control replica 3 failing at once every time.
    The container is powered off after the last case."""

    def test_a_unit_that_does_not_exist_is_reported_and_the_others_are_managed(self, troubled):
        missing = "pimesh-does-not-exist.service"
        troubled.wait_for("the error", lambda: troubled.unit_status(missing)["error"])
        report = troubled.unit_status(missing)
        assert "no such unit" in report["error"]
        assert report["load_state"] == "not-found"
        assert report["last_action"] is None
        assert any(missing in e and "no such unit" in e for e in troubled.status()["config_errors"])
        assert troubled.status()["supervisor_config"]["source"] == "file"
        assert "cannot manage pimesh-does-not-exist.service" in troubled.journal("pimesh-supervisor.service")
        old = troubled.wait_for("proxy ready", lambda: healthy(troubled, PROXY))
        troubled.kill(old, "KILL")
        troubled.wait_for("proxy ready again", lambda: (pid := healthy(troubled, PROXY)) and pid != old, timeout=30)

    def test_a_unit_failing_at_once_backs_off_escalates_and_never_hot_loops(self, troubled):
        unit = "pimesh-control@3.service"
        troubled.wait_for("the escalation ladder to reach its top",
                          lambda: troubled.unit_status(unit)["escalation"] == "reboot-refused", timeout=90)
        report = troubled.unit_status(unit)
        assert "allow_reboot is false" in report["last_action"]["reason"]
        # Why it fails is in the status: the last lines it logged, read as it is healed.
        assert any("unknown flag --no-such-flag" in line for line in report["last_log"]), report["last_log"]
        log = troubled.journal("pimesh-supervisor.service")
        assert "reset-failed-and-start" in log
        assert "restart-dependencies" in log  # the first rung restarted control@1
        # Over a window at the backoff cap (4 s, jittered down to 3 s): at most one heal
        # attempt per 3 s, and each lets systemd start the process at most StartLimitBurst=5
        # times before the start limit stops it.
        window = 20
        actions_before = report["restarts_by_pimesh"]
        starts_before = process_starts(troubled, unit)
        time.sleep(window)
        actions = troubled.unit_status(unit)["restarts_by_pimesh"] - actions_before
        starts = process_starts(troubled, unit) - starts_before
        print(f"\n  over {window}s: {actions} heal actions, {starts} process starts")
        assert 1 <= actions <= window / 3 + 1, actions
        assert starts <= 5 * (actions + 1), starts
        assert troubled.unit_status(PROXY)["active_state"] == "active"


class TestWatchdog:
    """The supervisor with a 4 s watchdog.
    The container is powered off after the last case."""

    def test_a_stalled_supervisor_is_restarted_by_its_watchdog_and_readopts_the_units(self, watched):
        supervisor = "pimesh-supervisor.service"
        units = [PROXY, *CONTROLS]
        pids = watched.wait_for("every unit ready", lambda: all_healthy(watched, units))
        time.sleep(6)  # longer than the watchdog: a healthy loop keeps feeding it
        assert watched.show(supervisor, "NRestarts")["NRestarts"] == "0"
        old = watched.main_pid(supervisor)
        watched.kill(old, "STOP")
        watched.wait_for("systemd's watchdog to restart the supervisor",
                         lambda: watched.main_pid(supervisor) not in (0, old), timeout=30)
        assert "Watchdog timeout" in watched.journal(supervisor)
        watched.wait_for("the new supervisor's status", lambda: watched.status()["units"][0]["ready"] is True)
        after = watched.wait_for("every unit ready", lambda: all_healthy(watched, units))
        assert after == pids
        for unit in watched.status()["units"]:
            assert unit["restarts_by_pimesh"] == 0, unit
