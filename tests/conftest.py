"""Fixtures every system test folder shares (the harness package holds the code)."""

import json
import os

import pytest

from harness import scratch
from harness.paths import image_path
from harness.qemu import decompress, make_ssh_key


@pytest.fixture(scope="session")
def base_image(tmp_path_factory):
    """The arm64 image under test, decompressed once per session (each QEMU node boots
    its own copy of it)."""
    return decompress(image_path(), str(tmp_path_factory.mktemp("image") / "pimesh.img"))


@pytest.fixture
def ssh_key(tmp_path_factory):
    """Makes an SSH key pair: ssh_key(comment) -> (private key path, public key line)."""
    folder = tmp_path_factory.mktemp("keys")

    def make(comment):
        path = str(folder / comment.replace("@", "-at-"))
        return path, make_ssh_key(path, comment)

    return make


@pytest.fixture(scope="session")
def figures():
    """Figures a session's tests take (printed, never asserted): one `FIGURES {json}` line
    at the end, and the same JSON in $PIMESH_FIGURES when it is set."""
    taken = {}
    yield taken
    if taken:
        print("\nFIGURES " + json.dumps(taken, sort_keys=True))
        path = os.environ.get("PIMESH_FIGURES")
        if path:
            with open(path, "w") as f:
                json.dump(taken, f, indent=2, sort_keys=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Notes a failed test, so that containers shut down after it keep their journals."""
    report = yield
    if report.failed:
        scratch.note_failure(item.nodeid)
    return report


def pytest_sessionfinish(session, exitstatus):
    """The session's scratch folders go when every test passed and stay after a failure."""
    scratch.finish(passed=exitstatus == pytest.ExitCode.OK)
