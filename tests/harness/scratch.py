"""Scratch folders of a test session (a site's keys and central server state, a LAN's
DHCP leases and logs) under /var/tmp.

Invariant: a folder made here is removed at the end of a session in which every test
passed, and kept (its path printed) after a failure, for the logs it holds."""

import shutil
import tempfile

_MADE = []


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
