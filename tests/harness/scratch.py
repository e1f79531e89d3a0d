"""Scratch folders of a test session (a site's keys and central server state, a LAN's
DHCP leases and logs) under /var/tmp.

Invariant: a folder made here is removed at the end of a session in which every test
passed, and kept (its path printed) after a failure, for the logs it holds. Once a test of
the session has failed, every container shut down keeps its whole journal here (a
container's own disk goes with it)."""

import os
import shutil
import subprocess
import tempfile

_MADE = []
_FAILED = []
_JOURNALS = []


def folder(prefix):
    """A new empty folder whose name starts with `prefix`; removed with the session's."""
    path = tempfile.mkdtemp(prefix=prefix, dir="/var/tmp")
    _MADE.append(path)
    return path


def finish(passed):
    """Removes the session's folders when it `passed`; otherwise names the ones kept."""
    if passed:
        for path in _MADE:
            shutil.rmtree(path, ignore_errors=True)
    elif _MADE:
        print("\nscratch folders kept for their logs: " + " ".join(_MADE))
    _MADE.clear()
    _FAILED.clear()
    _JOURNALS.clear()


def note_failure(test):
    """Records that `test` (its node id) failed: containers shut down from now on keep
    their journals."""
    _FAILED.append(test)


def keep_journal(container, label):
    """After a failure in this session: writes the running `container`'s journal (every
    unit, microsecond times) to `<journals folder>/<label>.log`. Never raises: a journal
    that cannot be read is noted in its file instead."""
    if not _FAILED or not container.leader:
        return
    if not _JOURNALS:
        _JOURNALS.append(folder("pimesh-journals-"))
    path = os.path.join(_JOURNALS[0], f"{label}.log")
    try:
        out = subprocess.run(["nsenter", "-t", str(container.leader), "-a", "journalctl", "--no-pager",
                              "-o", "short-precise"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as err:
        out = f"journal not read: {err!r}\n"
    with open(path, "a") as f:
        f.write(out)
