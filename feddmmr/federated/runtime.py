"""How many CPUs training uses, sized to the CPUs this process can really have.

torch starts one OpenMP thread per core and every parallel op waits for all of them. When another
process holds one of those cores (a second pipeline step, a test run, another user), each op waits
for the thread that shares a core: on the 2-core machine a round of 100 clients took 6.1 s instead
of 1.7 s with two threads, and 2.1 s with one. A passive wait policy does not cure it (2.5 s loaded)
and costs the idle machine (3.4 s), because the threads sleep between the many small ops of a round.

So CPU training runs one worker process per usable CPU with one torch thread each (``workers``): the
processes never wait on each other within a round, and a busy core slows the round only by the time it
takes from it. Usable CPUs are the affinity mask, capped by a cgroup CPU quota.

Evaluation (and the vectorized executor) run in the training process itself, whose thread count
follows the free CPUs: ``ThreadPool.update`` (called at each round start) counts the CPU time other
processes used on this process's CPUs since the last call (``/proc/stat`` minus this process's own
time) and sets ``free CPUs = usable - busy``, at least one.

``runtime.threads`` in params.yaml or the environment variable ``FEDDMMR_THREADS`` fixes both counts
instead (the variable wins); 1 trains in the process itself.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch

from feddmmr.errors import FeddmmrError

ENV = "FEDDMMR_THREADS"


def usable_cpus(cpu_max: str | Path = "/sys/fs/cgroup/cpu.max") -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota (``cpu_max``)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path(cpu_max).read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return n


def requested_threads(param: int = 0) -> int:
    """The fixed CPU count asked for (FEDDMMR_THREADS, else ``runtime.threads``); 0 = size it to the CPUs."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return param
    if not raw.isdigit():
        raise FeddmmrError(f"{ENV}={raw!r} must be a whole number of threads (0 = follow the free CPUs)")
    return int(raw)


def _busy_seconds(cpus: set[int]) -> float | None:
    """CPU seconds spent busy (not idle or waiting on I/O) on ``cpus`` since boot, from /proc/stat."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    busy = 0
    for line in lines:
        name, *values = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            v = [int(x) for x in values]
            busy += sum(v[:8]) - v[3] - v[4]                     # all states but idle and iowait
    return busy / tick


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")     # utime, stime


class ThreadPool:
    """torch's thread count for a training run: fixed, or the CPUs left free by other processes."""

    def __init__(self, param: int = 0):
        self.fixed = requested_threads(param)
        self.usable = usable_cpus()
        self.cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(self.usable))
        self.others = 0.0                                         # CPUs other processes kept busy lately
        self.workers: list[int] = []                              # our worker processes (see count_as_own)
        self._last = self._sample()
        self.threads = self._set(self.fixed or self.usable)

    def _sample(self) -> tuple[float, float, float | None]:
        t = os.times()
        own = t.user + t.system + sum(_cpu_seconds(pid) for pid in self.workers)
        return time.monotonic(), own, _busy_seconds(self.cpus)

    def count_as_own(self, pids: list[int]) -> None:
        """CPU time of these processes (this run's training workers) is this run's, not other processes' load."""
        self.workers = list(pids)
        self._last = self._sample()

    def _set(self, n: int) -> int:
        if n != torch.get_num_threads():
            torch.set_num_threads(n)
        return n

    def update(self) -> int:
        """Re-size from the load since the last call; returns the thread count now in use."""
        if self.fixed:
            return self.threads
        now = self._sample()
        wall = now[0] - self._last[0]
        if wall > 0.05 and now[2] is not None and self._last[2] is not None:
            busy = (now[2] - self._last[2]) - (now[1] - self._last[1])
            self.others = max(0.0, busy / wall)
            self.threads = self._set(max(1, min(self.usable, round(self.usable - self.others))))
        self._last = now
        return self.threads

    def processes(self) -> int:
        """Worker processes for CPU training: the fixed count, else every usable CPU."""
        return self.fixed or self.usable

    def describe(self) -> str:
        mode = "fixed" if self.fixed else "following free CPUs"
        return (f"{self.threads} torch threads ({mode}; {self.usable} usable CPUs, other processes busy on "
                f"{self.others:.1f}, load average {os.getloadavg()[0]:.2f})")
