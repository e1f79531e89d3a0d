"""Stops one thread of a running process, and only that one, until the process ends.

A stop signal (SIGSTOP) would stop every thread of the process; ptrace stops one:
PTRACE_SEIZE attaches to the thread without stopping it, PTRACE_INTERRUPT then stops it.
A thread stays stopped only while its tracer lives, so the tracer is its own process:

    python3 freeze.py TID

prints "frozen" once the thread is stopped, then waits for the thread's ptrace events
until the process ends (a signal meant for the thread is passed on, and the thread
stopped again). `Frozen` runs it from a test.
"""

import ctypes
import os
import subprocess
import sys

PTRACE_CONT = 7
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_EVENT_STOP = 128
WALL = 0x40000000  # __WALL: wait for a tracee that is not this process's child


def freeze(tid):
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    libc.ptrace.restype = ctypes.c_long

    def ptrace(request, data=0):
        if libc.ptrace(request, tid, None, ctypes.c_void_p(data)) == -1:
            err = ctypes.get_errno()
            raise OSError(err, f"ptrace({request:#x}) on thread {tid}: {os.strerror(err)}")

    ptrace(PTRACE_SEIZE)
    ptrace(PTRACE_INTERRUPT)
    announced = False
    while True:
        try:
            _, status = os.waitpid(tid, WALL)
        except ChildProcessError:
            return
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            return
        if not os.WIFSTOPPED(status):
            continue
        if status >> 16 == PTRACE_EVENT_STOP:
            if not announced:
                print("frozen", flush=True)
                announced = True
            continue
        # A signal for this thread: delivered, then the thread is stopped again.
        ptrace(PTRACE_CONT, os.WSTOPSIG(status))
        ptrace(PTRACE_INTERRUPT)


class Frozen:
    """Thread `tid` (a host TID) stopped for as long as its process lives, or until
    `release()`."""

    def __init__(self, tid):
        self.tid = tid
        self.tracer = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(tid)],
                                       stdout=subprocess.PIPE, text=True)
        line = self.tracer.stdout.readline().strip()
        if line != "frozen":
            self.tracer.kill()
            raise RuntimeError(f"cannot stop thread {tid}: the tracer said {line!r}")

    def ended(self):
        """Whether the tracer is gone: the thread's process has ended."""
        return self.tracer.poll() is not None

    def release(self):
        """Detaches (the thread runs again) if the process still lives."""
        if self.tracer.poll() is None:
            self.tracer.kill()
        self.tracer.wait(timeout=10)


def host_pid(container_leader, pid_in_container):
    """The host PID of process `pid_in_container` of the container whose init is host
    process `container_leader`."""
    namespace = os.readlink(f"/proc/{container_leader}/ns/pid")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry}/ns/pid") != namespace:
                continue
            with open(f"/proc/{entry}/status") as f:
                for line in f:
                    if line.startswith("NSpid:"):
                        ids = line.split()[1:]
                        if ids and int(ids[-1]) == pid_in_container:
                            return int(entry)
        except OSError:
            continue
    raise LookupError(f"no process {pid_in_container} in the container of {container_leader}")


if __name__ == "__main__":
    freeze(int(sys.argv[1]))
