"""How much CPU other processes used while we measured (the machines are shared and noisy), and our
own helper processes stopped while the engine times."""
from __future__ import annotations

import contextlib
import os
import signal
import time


def usable_cpus() -> int:
    """The cores this process may run on (its affinity), else every core the machine has."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _system_busy_ticks() -> int | None:
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return None
    values = [int(v) for v in fields]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values[:8]) - idle


def _stat_fields(pid="self") -> list[str] | None:
    """/proc/PID/stat from the field after the command name on (field 3, the state, is item 0)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _own_ticks() -> int | None:
    fields = _stat_fields()
    return None if fields is None else int(fields[11]) + int(fields[12])  # utime + stime of all our threads


def _ticks_of(pids) -> int:
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])
    return total


def identity(pid: int) -> tuple[int, int] | None:
    """(pid, start time) of a live process: a pid alone may be reused by another process once it ends."""
    fields = _stat_fields(pid)
    return None if fields is None else (int(pid), int(fields[19]))


def _is(proc: tuple[int, int]) -> bool:
    return identity(proc[0]) == tuple(proc)


@contextlib.contextmanager
def stopped(procs):
    """Our helper processes (identities) stopped meanwhile, and continued after: the engine times alone.

    Why: the OBS database is built in a child process while profiling compiles engines, which use one
    core; the timing of each run needs the machine to itself. A process that has ended (or whose pid now
    names another process) is left alone."""
    held = []
    try:
        for proc in procs or ():
            if _is(proc):
                try:
                    os.kill(proc[0], signal.SIGSTOP)
                except OSError:
                    continue
                held.append(proc)
        deadline = time.monotonic() + 0.5
        for proc in held:   # the stop takes effect at the process's next trip through the kernel
            while time.monotonic() < deadline:
                fields = _stat_fields(proc[0])
                if fields is None or fields[0] in ("T", "t", "Z", "X"):
                    break
                time.sleep(0.001)
        yield
    finally:
        for proc in held:
            if _is(proc):
                try:
                    os.kill(proc[0], signal.SIGCONT)
                except OSError:
                    pass


class ForeignLoad:
    """Context manager: `cores` = average number of cores busy with other processes meanwhile; the
    processes in `ours` (pids of our own helpers) do not count."""

    def __init__(self, ours=()):
        self.ours = list(ours)

    def _ours_ticks(self) -> int | None:
        own = _own_ticks()
        return None if own is None else own + _ticks_of(self.ours)

    def __enter__(self):
        self.t0 = time.monotonic()
        self.busy0, self.own0 = _system_busy_ticks(), self._ours_ticks()
        self.cores = 0.0
        return self

    def __exit__(self, *exc):
        busy1, own1 = _system_busy_ticks(), self._ours_ticks()
        elapsed = time.monotonic() - self.t0
        if None in (self.busy0, self.own0, busy1, own1) or elapsed <= 0:
            return False
        hz = os.sysconf("SC_CLK_TCK")
        foreign = (busy1 - self.busy0) - (own1 - self.own0)
        self.cores = max(0.0, foreign / hz / elapsed)
        return False
