"""Waiting for a condition with a deadline, never for a fixed time."""

import time


def wait_for(what, predicate, timeout=30, interval=0.1, expected=(KeyError, RuntimeError, ValueError)):
    """Polls predicate() until it returns a true value, and returns that value. Exceptions
    of the `expected` kinds count as "not yet" (the last one is reported); at `timeout`
    seconds an AssertionError names `what`."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except expected as err:
            last = err
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
