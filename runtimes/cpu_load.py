"""How much CPU other processes used while we measured: the machines are shared and noisy."""
from __future__ import annotations

import os
import time


def _system_busy_ticks() -> int | None:
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return None
    values = [int(v) for v in fields]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values[:8]) - idle


def _own_ticks() -> int | None:
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])  # utime + stime of all our threads


class ForeignLoad:
    """Context manager: `cores` = average number of cores busy with other processes meanwhile."""

    def __enter__(self):
        self.t0 = time.monotonic()
        self.busy0, self.own0 = _system_busy_ticks(), _own_ticks()
        self.cores = 0.0
        return self

    def __exit__(self, *exc):
        busy1, own1 = _system_busy_ticks(), _own_ticks()
        elapsed = time.monotonic() - self.t0
        if None in (self.busy0, self.own0, busy1, own1) or elapsed <= 0:
            return False
        hz = os.sysconf("SC_CLK_TCK")
        foreign = (busy1 - self.busy0) - (own1 - self.own0)
        self.cores = max(0.0, foreign / hz / elapsed)
        return False
